//! A set of series as the series store could hold it, shaped by the fuzzer's bytes, for
//! the exporters' round trips (`prometheus_roundtrip`, `otlp_roundtrip`).
//!
//! Names, services, label keys and values come from small pools of awkward spellings
//! (dots, leading digits, reserved suffixes and keys, names that collide once
//! translated) or are made of awkward characters (quotes, backslashes, newlines,
//! `{`, `}`, `=`, `,`, `#`, non-ASCII). Values cover the edges: counters past 2^64,
//! unset gauges, float gauges of any bit pattern (NaN and infinities included: a float
//! gauge's adds can overflow), exponential histograms of integer and float
//! observations (negative, zero, huge), and explicit layouts. No two series share
//! service, kind, name and labels, as in the store.

use metricsd::aggregate::{MetricKind, Series, Value};
use metricsd::histogram::Histogram;

use crate::input::Input;

/// One generated series and what was recorded into it.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The series, as the store would hold it.
    pub series: Series,
    /// The observations recorded into its histogram, in order (empty otherwise).
    pub observations: Vec<Observation>,
}

/// One histogram observation.
#[derive(Debug, Clone, Copy)]
pub enum Observation {
    /// An integer observation (`Histogram::record`).
    Int(u64),
    /// A float observation (`Histogram::record_f64`, finite).
    Float(f64),
}

impl Observation {
    /// Whether the observation is at most `le` (exactly, for integers).
    pub fn at_most(self, le: f64) -> bool {
        match self {
            Self::Float(v) => v <= le,
            Self::Int(v) => {
                if le >= 18_446_744_073_709_551_616.0 {
                    true
                } else if le < 0.0 {
                    false
                } else {
                    // `le` is below 2^64 here, so its floor converts exactly.
                    v <= le.floor() as u64
                }
            }
        }
    }
}

/// Producer services (kernel-derived in metricsd; never `metricsd` itself, which names
/// metricsd's own health series).
pub const SERVICES: [&str; 4] = ["web", "db", "a.b", "svc \"1\""];
const NAMES: [&str; 18] = [
    "http.requests",
    "http_requests",
    "http_requests_total",
    "jobs.total",
    "jobs_total",
    "9lives",
    "",
    "a",
    "a_total",
    "a_2",
    "a_2_total",
    "size_bucket",
    "x_count",
    "x_sum",
    "metricsd.prometheus.renamed",
    "GET /",
    "é",
    "a.b",
];
const KEYS: [&str; 14] = [
    "route",
    "service",
    "le",
    "quantile",
    "__name__",
    "a.b",
    "a_b",
    "a_b_2",
    "1x",
    "",
    "otel.metric.overflow",
    "exported_service",
    "what",
    "label__x",
];
const CHARS: [char; 17] = [
    'a', '_', '.', '1', '"', '\\', '\n', ' ', 'é', '{', '}', '=', ',', '#', '\u{85}', '\t', 'b',
];

fn text(input: &mut Input<'_>, pool: &[&str]) -> String {
    match input.below(4) {
        0 => (0..input.below(6))
            .map(|_| CHARS[usize::from(input.u8()) % CHARS.len()])
            .collect(),
        _ => pool[usize::from(input.u8()) % pool.len()].to_owned(),
    }
}

fn integer(input: &mut Input<'_>) -> u64 {
    match input.below(6) {
        0 => input.u64(),
        1 => 1 << input.below(64),
        2 => (1 << input.below(64)) + 1,
        _ => u64::from(input.u8()),
    }
}

fn float(input: &mut Input<'_>) -> f64 {
    match input.below(4) {
        0 => f64::from_bits(input.u64()),
        1 => f64::from(input.u16() as i16) / f64::from(1u32 << input.below(20)),
        2 => -(2f64.powi(i32::from(input.below(128)) - 64)),
        _ => 2f64.powi(i32::from(input.below(128)) - 64),
    }
}

/// A histogram layout per name, as the config gives it: `None` for exponential.
type Layouts = Vec<(String, Option<std::sync::Arc<[u64]>>)>;

fn layout(
    input: &mut Input<'_>,
    name: &str,
    layouts: &mut Layouts,
) -> Option<std::sync::Arc<[u64]>> {
    if let Some((_, l)) = layouts.iter().find(|(n, _)| n == name) {
        return l.clone();
    }
    let l = if input.below(4) == 0 {
        let mut bounds = Vec::new();
        let mut b = 0u64;
        for _ in 0..=input.below(5) {
            b = b.saturating_add(integer(input).max(1));
            if b > metricsd::config::MAX_HISTOGRAM_BOUND {
                break;
            }
            if bounds.last() != Some(&b) {
                bounds.push(b);
            }
        }
        (!bounds.is_empty()).then(|| bounds.into())
    } else {
        None
    };
    layouts.push((name.to_owned(), l.clone()));
    l
}

fn value(
    input: &mut Input<'_>,
    kind: MetricKind,
    name: &str,
    layouts: &mut Layouts,
) -> (Value, Vec<Observation>) {
    let mut observations = Vec::new();
    let value = match kind {
        MetricKind::Counter => Value::Counter {
            total: match input.below(4) {
                0 => u128::from(input.u64()) << 64 | u128::from(input.u64()),
                1 => u128::from(u64::MAX),
                _ => u128::from(integer(input)),
            },
        },
        MetricKind::Gauge => match input.below(4) {
            0 => Value::Gauge { value: None },
            1 => Value::FloatGauge {
                value: float(input),
            },
            _ => Value::Gauge {
                value: Some(integer(input) as i64),
            },
        },
        MetricKind::Histogram | MetricKind::SpanDuration => {
            let bounds = match kind {
                MetricKind::Histogram => layout(input, name, layouts),
                _ => None,
            };
            let explicit = bounds.is_some();
            let mut h = Histogram::new(bounds);
            for _ in 0..input.below(12) {
                if !explicit && kind == MetricKind::Histogram && input.below(4) == 0 {
                    let v = float(input);
                    if h.record_f64(v).is_ok() {
                        observations.push(Observation::Float(v));
                    }
                } else {
                    let v = integer(input);
                    h.record(v);
                    observations.push(Observation::Int(v));
                }
            }
            Value::Histogram(h)
        }
    };
    (value, observations)
}

/// Up to 12 distinct series (every histogram series of a name has the same layout).
pub fn generate(input: &mut Input<'_>) -> Vec<Generated> {
    let mut out: Vec<Generated> = Vec::new();
    let mut layouts = Layouts::new();
    for _ in 0..input.below(13) {
        let service = SERVICES[usize::from(input.below(SERVICES.len() as u8))];
        let kind = match input.below(4) {
            0 => MetricKind::Counter,
            1 => MetricKind::Gauge,
            2 => MetricKind::Histogram,
            _ => MetricKind::SpanDuration,
        };
        let name = text(input, &NAMES);
        let labels: Vec<(String, String)> = (0..input.below(4))
            .map(|_| (text(input, &KEYS), text(input, &NAMES)))
            .collect();
        let labels: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (value, observations) = value(input, kind, &name, &mut layouts);
        let mut series = Series::new(service, kind, &name, &labels, value);
        series.created_ns = u64::from(input.u16());
        let same = |g: &Generated| {
            g.series.service == series.service
                && g.series.kind == series.kind
                && g.series.name == series.name
                && g.series.labels == series.labels
        };
        if !out.iter().any(same) {
            out.push(Generated {
                series,
                observations,
            });
        }
    }
    out
}
