//! The export schema: how series, spans and metricsd's health become logd records.
//!
//! Every record is `level = info`. logd stamps the sender (metricsd itself); the
//! producer's kernel-derived service is the `producer_service` field.
//!
//! **Series** (`scope = "metrics"`, `message` = the metric name), one record per
//! changed series per export:
//!
//! | field | value |
//! | --- | --- |
//! | `series` | the series identity, `<service>/<kind>/<name>{k="v",...}` (labels sorted by key; `"` and `\` escaped) — one field match finds a series |
//! | `producer_service` | the producer's service |
//! | `metric` | the name |
//! | `kind` | `counter`, `gauge`, `histogram` or `span_duration` |
//! | `label.<key>` | one field per label (the overflow series has `label.otel.metric.overflow = true`) |
//! | `window_start_ns`, `window_end_ns` | the export window, ns since the Unix epoch (metricsd's clock) |
//! | `value` | counter: cumulative total since the series was created; gauge: last value (a decimal float once the gauge was set or moved by a float) |
//! | `unit`, `description` | what the producer described the metric as, when it did |
//! | `delta` | counter: increase within the window |
//! | `count`, `sum`, `min`, `max` | histogram: cumulative observations, their sum (an exact integer while only integers were recorded, else a decimal `f64`), the smallest and largest |
//! | `scale`, `zero_count`, `positive_offset`, `positive_buckets`, `negative_offset`, `negative_buckets` | exponential histogram (the default): the scale, observations equal to 0, and per side (present when it holds a bucket) the first bucket's index and the comma-separated count per bucket from there (see [`crate::histogram`]) |
//! | `bounds`, `buckets` | histogram with a configured layout: comma-separated inclusive upper bounds (`+Inf` last) and the count per bucket |
//!
//! **Spans** (`scope = "spans"`, `message` = the span name): `producer_service`, `span`
//! (the name), `trace_id` (32 hex digits), `span_id` (16 hex digits), `parent_id` (16
//! hex digits, absent for a root), `status` (`unset`,
//! `ok`, `error`, `orphaned`, `expired`), `start_ns`, `end_ns` and `duration_ns`
//! (producer's `CLOCK_MONOTONIC`; end and duration absent for orphaned and expired
//! spans), and `attr.<key>` per attribute (sensitive ones `[redacted]`).
//!
//! **Health** (`scope = "metrics"`, `producer_service = metricsd`): series in the same
//! schema, listed in `metricsd/README.md`.
//!
//! **Start marker** (`scope = "metricsd"`, `message = "metricsd.start"`): field
//! `instance`, read back before `metricsd: ready` is printed.

use std::sync::Arc;

use logd::{Level, Record};

use crate::aggregate::{MetricKind, MetricMetadata, Series, Value, series_id};
use crate::histogram::Histogram;
use crate::spans::{FinishedSpan, span_hex, trace_hex};

/// The scope of series records.
pub const SCOPE_METRICS: &str = "metrics";
/// The scope of span records.
pub const SCOPE_SPANS: &str = "spans";
/// The scope of the start marker.
pub const SCOPE_DAEMON: &str = "metricsd";
/// The service name metricsd's own health series carry.
pub const HEALTH_SERVICE: &str = "metricsd";

/// The export window, ns since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Start (the previous export).
    pub start_ns: u64,
    /// End (this export).
    pub end_ns: u64,
}

fn base(
    service: &str,
    kind: MetricKind,
    name: &str,
    labels: &[(String, String)],
    window: Window,
) -> Record {
    let mut r = Record::new(Level::Info, SCOPE_METRICS, name)
        .field("series", series_id(service, kind, name, labels))
        .field("producer_service", service)
        .field("metric", name)
        .field("kind", kind.as_str());
    for (k, v) in labels {
        r = r.field(format!("label.{k}"), v.as_str());
    }
    r.field("window_start_ns", window.start_ns.to_string())
        .field("window_end_ns", window.end_ns.to_string())
}

/// The record of a series; `delta` is the counter's increase in the window, `meta`
/// what the producer described the metric as (its `unit` and `description` fields).
/// `start_ns` is when the series was created: its cumulative value counts from there,
/// and a series that expired and came back has a new one.
pub fn series_record(
    s: &Series,
    delta: u128,
    window: Window,
    meta: Option<&MetricMetadata>,
) -> Record {
    let mut r = base(&s.service, s.kind, &s.name, &s.labels, window)
        .field("start_ns", s.created_ns.to_string());
    if let Some(meta) = meta {
        if let Some(unit) = &meta.unit {
            r = r.field("unit", &**unit);
        }
        if let Some(description) = &meta.description {
            r = r.field("description", &**description);
        }
    }
    match &s.value {
        Value::Counter { total } => r
            .field("value", total.to_string())
            .field("delta", delta.to_string()),
        Value::Gauge { value } => r.field("value", value.unwrap_or(0).to_string()),
        Value::FloatGauge { value } => r.field("value", value.to_string()),
        Value::Histogram(h) => {
            let mut r = r
                .field("count", h.count().to_string())
                .field("sum", h.sum_text());
            if let (Some(min), Some(max)) = (h.min(), h.max()) {
                r = r
                    .field("min", min.to_string())
                    .field("max", max.to_string());
            }
            match h {
                Histogram::Explicit(e) => r
                    .field("bounds", e.bounds_text())
                    .field("buckets", csv(e.counts())),
                Histogram::Exponential(e) => {
                    r = r
                        .field("scale", e.scale().to_string())
                        .field("zero_count", e.zero_count().to_string());
                    for (side, b) in [("positive", e.positive()), ("negative", e.negative())] {
                        if !b.is_empty() {
                            r = r
                                .field(format!("{side}_offset"), b.offset().to_string())
                                .field(format!("{side}_buckets"), csv(b.counts()));
                        }
                    }
                    r
                }
            }
        }
    }
}

/// The last record of a series that expired: its final value (`delta` 0, nothing new in
/// the window) and `expired = "true"`. It is removed from metricsd after this.
pub fn expired_record(s: &Series, window: Window) -> Record {
    series_record(s, 0, window, None).field("expired", "true")
}

/// The histogram a series record carries (the inverse of [`series_record`]), or `None`
/// if the record has no well-formed histogram fields. The sum is read as `f64`.
pub fn histogram_of(r: &Record) -> Option<Histogram> {
    fn list<T: std::str::FromStr>(text: &str) -> Option<Vec<T>> {
        if text.is_empty() {
            return Some(Vec::new());
        }
        text.split(',').map(|x| x.parse().ok()).collect()
    }
    let sum: f64 = r.get("sum")?.parse().ok()?;
    let min_max = match (r.get("min"), r.get("max")) {
        (Some(a), Some(b)) => Some((a.parse().ok()?, b.parse().ok()?)),
        _ => None,
    };
    if let Some(scale) = r.get("scale") {
        let side = |name: &str| -> Option<(i32, Vec<u64>)> {
            match r.get(&format!("{name}_offset")) {
                Some(o) => Some((o.parse().ok()?, list(r.get(&format!("{name}_buckets"))?)?)),
                None => Some((0, Vec::new())),
            }
        };
        let h = crate::histogram::Exponential::from_parts(
            scale.parse().ok()?,
            r.get("zero_count")?.parse().ok()?,
            side("positive")?,
            side("negative")?,
            sum,
            min_max,
        )?;
        return Some(Histogram::Exponential(h));
    }
    let bounds = r.get("bounds")?;
    let bounds = bounds.strip_suffix("+Inf")?.trim_end_matches(',');
    let h = crate::histogram::Explicit::from_parts(
        list(bounds)?,
        list(r.get("buckets")?)?,
        sum,
        min_max,
    )?;
    Some(Histogram::Explicit(h))
}

fn csv(counts: &[u64]) -> String {
    let parts: Vec<String> = counts.iter().map(u64::to_string).collect();
    parts.join(",")
}

/// A health series of metricsd itself (counters: `delta` too).
pub fn health_record(
    kind: MetricKind,
    name: &str,
    labels: &[(String, String)],
    value: i128,
    delta: i128,
    window: Window,
) -> Record {
    let r = base(HEALTH_SERVICE, kind, name, labels, window).field("value", value.to_string());
    if kind == MetricKind::Counter {
        r.field("delta", delta.to_string())
    } else {
        r
    }
}

/// The record of a reported span.
pub fn span_record(s: &FinishedSpan) -> Record {
    let mut r = Record::new(Level::Info, SCOPE_SPANS, &*s.name)
        .field("producer_service", &*s.service)
        .field("span", &*s.name)
        .field("trace_id", trace_hex(s.trace_id))
        .field("span_id", span_hex(s.span_id));
    if s.parent_id != 0 {
        r = r.field("parent_id", span_hex(s.parent_id));
    }
    r = r
        .field("status", s.outcome.as_str())
        .field("start_ns", s.start_ns.to_string());
    if let (Some(end), Some(d)) = (s.end_ns, s.duration_ns()) {
        r = r
            .field("end_ns", end.to_string())
            .field("duration_ns", d.to_string());
    }
    for (k, v) in &s.attrs {
        r = r.field(format!("attr.{k}"), v.as_str());
    }
    r
}

/// The start marker read back before `ready`.
pub fn start_record(instance: &str) -> Record {
    Record::new(Level::Info, SCOPE_DAEMON, "metricsd.start").field("instance", instance)
}

/// Labels as owned sorted pairs (for health series).
pub fn labels(pairs: &[(&str, &str)]) -> Arc<[(String, String)]> {
    let mut v: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    v.sort();
    Arc::from(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::Outcome;
    use telemetry_abi::SpanStatus;

    #[test]
    fn span_records_carry_ids_and_durations() {
        let s = FinishedSpan {
            service: Arc::from("web"),
            name: Arc::from("GET /"),
            trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
            span_id: 2,
            parent_id: 1,
            flags: 1,
            start_ns: 10,
            end_ns: Some(25),
            outcome: Outcome::Ended(SpanStatus::ERROR),
            attrs: vec![(Arc::from("password"), "[redacted]".into())],
        };
        let r = span_record(&s);
        assert_eq!(r.get("duration_ns"), Some("15"));
        assert_eq!(r.get("status"), Some("error"));
        assert_eq!(r.get("parent_id"), Some("0000000000000001"));
        assert_eq!(r.get("trace_id"), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(r.get("attr.password"), Some("[redacted]"));
        assert!(r.fields.iter().all(|(k, _)| !logd::is_identity_key(k)));
    }
}
