//! The Prometheus exposition: every series of a [`Snapshot`], rendered through the
//! official `prometheus-client` encoder in the format a scraper asks for.
//!
//! - [`Format::negotiate`] reads `Accept`: Prometheus protobuf (delimited
//!   `io.prometheus.client.MetricFamily`, with native histograms), OpenMetrics 1.0 text
//!   (ends in `# EOF`), or Prometheus text 0.0.4 (the default, also for no `Accept`).
//! - [`render`] registers one `Collector` over the snapshot (no second copy of the
//!   values: the collector walks the snapshot while the encoder writes) and encodes.
//!
//! What is exposed:
//!
//! | source | family | samples |
//! | --- | --- | --- |
//! | counter | `<name>` (a trailing `_total` is dropped, the encoder adds it back) | `<name>_total` |
//! | gauge | `<name>` | `<name>` (a gauge never set has no sample) |
//! | histogram | `<name>` | `_count`, `_sum`, classic `_bucket{le}`; native buckets in protobuf |
//! | span durations | `<span name>_span_duration` (nanoseconds) | as histograms |
//! | health | `metricsd_...` (the table in `metricsd/README.md`) | counters and gauges |
//!
//! Every sample carries `service` = the producer's kernel-derived identity (`metricsd` for
//! health series) first; a producer's own identity-like label keys were renamed
//! `exported_<key>` when the series was registered, so none can override it. The overflow
//! series carries `otel_metric_overflow="true"`.
//!
//! Names and label keys follow Prometheus' rules: every character outside
//! `[A-Za-z0-9_]` becomes `_` (dots too; colons are left to recording rules), a leading
//! digit gets a `_` in front, label keys starting with `__` (reserved) get `label` in
//! front, and the keys `service`, `le` and `quantile` are renamed `exported_<key>`.
//! Gauges and histograms whose name ends in a suffix Prometheus gives meaning to
//! (`_total`, `_created`, `_count`, `_sum`, `_bucket`, `_info`) get `_gauge` or
//! `_histogram` appended. Two families whose names (or any of their samples' names)
//! would coincide after that are never merged: the later one, in order of original name
//! and kind, gets `_2` (`_3`, ...) appended; two label keys of one series that coincide
//! likewise. Two series of one family whose label sets coincide once translated (`a.b`
//! and `a_b`, or `service` renamed onto an existing `exported_service`) are not merged
//! either: the later one goes to a family of its own, named as above. Both kinds of
//! rename are counted in the exposition itself
//! (`metricsd_prometheus_renamed{what="metric"|"label"}`, only of what is exposed).
//!
//! Exactness: counters up to 2^64 - 1 and gauges are written as integers in the text
//! formats; protobuf, and Prometheus itself, hold `f64` (exact up to 2^53). Classic
//! buckets of an exponential histogram are its boundaries at scale `min(scale, 0)`
//! (powers of two, exact as `f64`); native buckets carry the full resolution at schema
//! `min(scale, 8)` with zero threshold 0. Histogram sums are `f64`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, NativeHistogram, NativeHistogramBuckets, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::aggregate::{MetricKind, Series, Value};
use crate::histogram::Histogram;
use crate::schema::HEALTH_SERVICE;
use crate::snapshot::{HealthSeries, Snapshot};

/// The exposition formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4.
    Text,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// Prometheus protobuf, delimited `MetricFamily` messages, with native histograms.
    Protobuf,
}

impl Format {
    /// The `Content-Type` of a response in this format.
    pub const fn content_type(self) -> &'static str {
        match self {
            Self::Text => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Protobuf => {
                "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"
            }
        }
    }

    /// The format an `Accept` header asks for: the acceptable media type with the
    /// highest `q` (ties: the first listed) that is one of ours; Prometheus text when
    /// there is no header or nothing in it is ours.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::Text;
        };
        let mut best: Option<(f64, Self)> = None;
        for item in accept.split(',') {
            let mut parts = item.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0;
            let mut proto = None;
            let mut encoding = None;
            let mut version = None;
            for p in parts {
                let Some((k, v)) = p.split_once('=') else {
                    continue;
                };
                let v = v.trim().trim_matches('"');
                match k.trim().to_ascii_lowercase().as_str() {
                    "q" => q = v.parse().unwrap_or(0.0),
                    "proto" => proto = Some(v.to_owned()),
                    "encoding" => encoding = Some(v.to_owned()),
                    "version" => version = Some(v.to_owned()),
                    _ => {}
                }
            }
            let format = match media.as_str() {
                "application/vnd.google.protobuf"
                    if proto.as_deref() == Some("io.prometheus.client.MetricFamily")
                        && encoding.as_deref() == Some("delimited") =>
                {
                    Some(Self::Protobuf)
                }
                "application/openmetrics-text"
                    if version.as_deref().is_none_or(|v| v == "1.0.0") =>
                {
                    Some(Self::OpenMetrics)
                }
                "text/plain" if version.as_deref().is_none_or(|v| v == "0.0.4") => Some(Self::Text),
                _ => None,
            };
            match format {
                Some(f) if q > 0.0 && best.is_none_or(|(bq, _)| q > bq) => best = Some((q, f)),
                _ => {}
            }
        }
        best.map_or(Self::Text, |(_, f)| f)
    }
}

/// Why an exposition could not be rendered.
#[derive(Debug)]
pub enum RenderError {
    /// The encoder refused (a value it cannot express).
    Encode,
    /// The protobuf messages could not be serialized.
    Protobuf(String),
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Encode => f.write_str("the Prometheus encoder refused a series"),
            Self::Protobuf(e) => write!(f, "protobuf encoding failed: {e}"),
        }
    }
}

impl std::error::Error for RenderError {}

/// A rendered exposition.
#[derive(Debug)]
pub struct Rendered {
    /// The body.
    pub body: Vec<u8>,
    /// Families renamed to stay distinct.
    pub metric_renames: u64,
    /// Label keys renamed to stay distinct within a series.
    pub label_renames: u64,
}

/// Where a sample comes from.
#[derive(Clone, Copy, Debug)]
enum Source {
    Series(usize),
    Health(usize),
}

/// One family of the exposition.
#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: MetricKind,
    members: Vec<Source>,
}

/// The plan of an exposition: families with their names, and the translated label sets
/// of the series whose keys needed more than borrowing.
#[derive(Debug)]
struct Plan {
    snapshot: Arc<Snapshot>,
    extra: Vec<HealthSeries>,
    families: Vec<Family>,
    labels: HashMap<(bool, usize), Vec<(String, String)>>,
    metric_renames: u64,
    label_renames: u64,
}

const RESERVED_SUFFIXES: [&str; 6] = ["_total", "_created", "_count", "_sum", "_bucket", "_info"];

/// `name` with every character outside `[A-Za-z0-9_]` as `_` and a `_` before a
/// leading digit (borrowed when already valid).
pub fn sanitize(name: &str) -> Cow<'_, str> {
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if valid {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 1);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(
        name.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
    );
    Cow::Owned(out)
}

/// The family name of metric `name` of `kind`, before collisions are resolved.
pub fn family_name(name: &str, kind: MetricKind) -> String {
    let mut n = sanitize(name).into_owned();
    match kind {
        MetricKind::Counter => {
            while n.len() > "_total".len() && n.ends_with("_total") {
                n.truncate(n.len() - "_total".len());
            }
        }
        MetricKind::Gauge => {
            if RESERVED_SUFFIXES.iter().any(|s| n.ends_with(s)) {
                n.push_str("_gauge");
            }
        }
        MetricKind::Histogram => {
            if RESERVED_SUFFIXES.iter().any(|s| n.ends_with(s)) {
                n.push_str("_histogram");
            }
        }
        MetricKind::SpanDuration => n.push_str("_span_duration"),
    }
    n
}

/// The label key `key` as exposed (before collisions within a series).
pub fn label_key(key: &str) -> Cow<'_, str> {
    let k = sanitize(key);
    if matches!(&*k, "service" | "le" | "quantile") {
        return Cow::Owned(format!("exported_{k}"));
    }
    if k.starts_with("__") {
        return Cow::Owned(format!("label{k}"));
    }
    k
}

/// The sample names a family of `kind` named `name` writes.
fn sample_names(name: &str, kind: MetricKind) -> Vec<String> {
    match kind {
        MetricKind::Counter => vec![name.to_owned(), format!("{name}_total")],
        MetricKind::Gauge => vec![name.to_owned()],
        MetricKind::Histogram | MetricKind::SpanDuration => vec![
            name.to_owned(),
            format!("{name}_count"),
            format!("{name}_sum"),
            format!("{name}_bucket"),
        ],
    }
}

fn help_text(kind: MetricKind, name: &str) -> String {
    let printable = name
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'\\');
    let what = match kind {
        MetricKind::Counter => "counter",
        MetricKind::Gauge => "gauge",
        MetricKind::Histogram => "histogram",
        MetricKind::SpanDuration => "span duration histogram (nanoseconds) of span",
    };
    if printable {
        format!("{what} {name}")
    } else {
        what.to_owned()
    }
}

/// Translated labels of one series: `None` if every key can be borrowed as is.
fn translate_labels(labels: &[(String, String)]) -> Option<(Vec<(String, String)>, u64)> {
    let simple = labels
        .iter()
        .all(|(k, _)| matches!(label_key(k), Cow::Borrowed(_)))
        && labels.windows(2).all(|w| w[0].0 != w[1].0);
    if simple {
        return None;
    }
    let mut seen: HashSet<String> = HashSet::new();
    seen.insert("service".to_owned());
    let mut renames = 0;
    let mut out = Vec::with_capacity(labels.len());
    for (k, v) in labels {
        let base = label_key(k).into_owned();
        let mut key = base.clone();
        let mut n = 2;
        while !seen.insert(key.clone()) {
            key = format!("{base}_{n}");
            n += 1;
            renames += 1;
        }
        out.push((key, v.clone()));
    }
    Some((out, renames))
}

impl Plan {
    fn new(snapshot: Arc<Snapshot>, extra: Vec<HealthSeries>) -> Self {
        let mut groups: BTreeMap<(&str, MetricKind), Vec<Source>> = BTreeMap::new();
        for (i, s) in snapshot.series.iter().enumerate() {
            if matches!(s.value, Value::Gauge { value: None }) {
                continue;
            }
            groups
                .entry((&s.name, s.kind))
                .or_default()
                .push(Source::Series(i));
        }
        for (i, h) in snapshot.health.iter().chain(&extra).enumerate() {
            groups
                .entry((h.name, h.kind))
                .or_default()
                .push(Source::Health(i));
        }
        let mut labels = HashMap::new();
        let mut label_renames = 0;
        for (i, s) in snapshot.series.iter().enumerate() {
            // A gauge never set is not exposed: nothing of it is renamed.
            if matches!(s.value, Value::Gauge { value: None }) {
                continue;
            }
            if let Some((l, n)) = translate_labels(&s.labels) {
                labels.insert((false, i), l);
                label_renames += n;
            }
        }
        for (i, h) in snapshot.health.iter().chain(&extra).enumerate() {
            if let Some((l, n)) = translate_labels(&h.labels) {
                labels.insert((true, i), l);
                label_renames += n;
            }
        }
        let mut taken: HashSet<String> = HashSet::new();
        let mut families = Vec::with_capacity(groups.len());
        let mut metric_renames = 0;
        for ((name, kind), members) in groups {
            let base = family_name(name, kind);
            for members in split_clashes(&snapshot, &extra, &labels, members) {
                let mut chosen = base.clone();
                let mut n = 2;
                while sample_names(&chosen, kind)
                    .iter()
                    .any(|s| taken.contains(s))
                {
                    chosen = format!("{base}_{n}");
                    n += 1;
                }
                if chosen != base {
                    metric_renames += 1;
                }
                taken.extend(sample_names(&chosen, kind));
                families.push(Family {
                    name: chosen,
                    help: help_text(kind, name),
                    kind,
                    members,
                });
            }
        }
        Self {
            snapshot,
            extra,
            families,
            labels,
            metric_renames,
            label_renames,
        }
    }

    fn health(&self, i: usize) -> Option<&HealthSeries> {
        let n = self.snapshot.health.len();
        if i < n {
            self.snapshot.health.get(i)
        } else {
            self.extra.get(i - n)
        }
    }
}

/// The members of one group split so that no two in a part expose the same label set
/// (translation can make two series' labels coincide: `a.b` and `a_b`, or `service`
/// renamed onto an existing `exported_service`): each member goes to the first part
/// that does not have its labels yet, so without a clash there is one part.
fn split_clashes(
    snapshot: &Snapshot,
    extra: &[HealthSeries],
    translated: &HashMap<(bool, usize), Vec<(String, String)>>,
    members: Vec<Source>,
) -> Vec<Vec<Source>> {
    if members.len() < 2 {
        return vec![members];
    }
    let exposed = |member: Source| -> Option<Vec<(&str, &str)>> {
        let (key, service, own) = match member {
            Source::Series(i) => {
                let s = snapshot.series.get(i)?;
                ((false, i), &*s.service, &s.labels[..])
            }
            Source::Health(i) => {
                let h = snapshot.health.iter().chain(extra).nth(i)?;
                ((true, i), HEALTH_SERVICE, &h.labels[..])
            }
        };
        let labels = translated.get(&key).map_or(own, |t| &t[..]);
        let mut out = Vec::with_capacity(labels.len() + 1);
        out.push(("service", service));
        out.extend(labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        Some(out)
    };
    // Each part: the label sets it has, and its members.
    type Part<'a> = (HashSet<Vec<(&'a str, &'a str)>>, Vec<Source>);
    let mut parts: Vec<Part<'_>> = Vec::new();
    for member in members {
        let Some(key) = exposed(member) else {
            continue;
        };
        match parts.iter_mut().find(|(seen, _)| !seen.contains(&key)) {
            Some((seen, part)) => {
                seen.insert(key);
                part.push(member);
            }
            None => parts.push((HashSet::from([key]), vec![member])),
        }
    }
    parts.into_iter().map(|(_, part)| part).collect()
}

/// The collector the registry calls at encode time: it walks the snapshot.
#[derive(Debug)]
struct SnapshotCollector(Arc<Plan>);

fn metric_type(kind: MetricKind) -> MetricType {
    match kind {
        MetricKind::Counter => MetricType::Counter,
        MetricKind::Gauge => MetricType::Gauge,
        MetricKind::Histogram | MetricKind::SpanDuration => MetricType::Histogram,
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let plan = &*self.0;
        let mut labels: Vec<(&str, &str)> = Vec::new();
        let mut classic: Vec<(f64, u64)> = Vec::new();
        for family in &plan.families {
            let mut metric = encoder.encode_descriptor(
                &family.name,
                &family.help,
                None,
                metric_type(family.kind),
            )?;
            for &member in &family.members {
                labels.clear();
                let (service, own, translated) = match member {
                    Source::Series(i) => {
                        let Some(s) = plan.snapshot.series.get(i) else {
                            continue;
                        };
                        (&*s.service, &s.labels, plan.labels.get(&(false, i)))
                    }
                    Source::Health(i) => {
                        let Some(h) = plan.health(i) else {
                            continue;
                        };
                        (HEALTH_SERVICE, &h.labels, plan.labels.get(&(true, i)))
                    }
                };
                labels.push(("service", service));
                match translated {
                    Some(t) => labels.extend(t.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
                    None => labels.extend(own.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
                }
                let mut m = metric.encode_family(&labels)?;
                match member {
                    Source::Series(i) => {
                        let Some(s) = plan.snapshot.series.get(i) else {
                            continue;
                        };
                        encode_series(&mut m, s, &mut classic)?;
                    }
                    Source::Health(i) => {
                        let Some(h) = plan.health(i) else {
                            continue;
                        };
                        match h.kind {
                            MetricKind::Counter => {
                                let v = u64::try_from(h.value).unwrap_or(0);
                                m.encode_counter::<NoLabelSet, _, f64>(&v, None)?;
                            }
                            _ => {
                                let v = i64::try_from(h.value).unwrap_or(i64::MAX);
                                m.encode_gauge(&v)?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn encode_series(
    m: &mut prometheus_client::encoding::MetricEncoder<'_>,
    s: &Series,
    classic: &mut Vec<(f64, u64)>,
) -> Result<(), fmt::Error> {
    match &s.value {
        Value::Counter { total } => match u64::try_from(*total) {
            Ok(v) => m.encode_counter::<NoLabelSet, _, f64>(&v, None),
            Err(_) => m.encode_counter::<NoLabelSet, _, f64>(&(*total as f64), None),
        },
        Value::Gauge { value } => match value {
            Some(v) => m.encode_gauge(v),
            None => Ok(()),
        },
        Value::FloatGauge { value } => m.encode_gauge(value),
        Value::Histogram(h) => {
            classic.clear();
            let mut prev = 0;
            for b in h.classic() {
                classic.push((b.le, b.cumulative - prev));
                prev = b.cumulative;
            }
            match h {
                Histogram::Exponential(e) => {
                    let n = e.native();
                    let native = NativeHistogram {
                        schema: n.schema,
                        zero_threshold: 0.0,
                        zero_count: n.zero_count,
                        negative: NativeHistogramBuckets {
                            spans: &n.negative.spans,
                            deltas: &n.negative.deltas,
                        },
                        positive: NativeHistogramBuckets {
                            spans: &n.positive.spans,
                            deltas: &n.positive.deltas,
                        },
                        created: None,
                    };
                    m.encode_histogram_with_native::<NoLabelSet>(
                        h.sum(),
                        h.count(),
                        classic,
                        None,
                        native,
                    )
                }
                Histogram::Explicit(_) => {
                    m.encode_histogram::<NoLabelSet>(h.sum(), h.count(), classic, None)
                }
            }
        }
    }
}

/// Prometheus' protobuf messages (`io.prometheus.client`), as `prometheus-client`
/// generates them from Prometheus' `metrics.proto`.
pub use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model as proto;

/// Decodes a protobuf exposition (delimited `MetricFamily` messages).
pub fn decode(mut body: &[u8]) -> Result<Vec<proto::MetricFamily>, prost::DecodeError> {
    use prost::Message as _;
    let mut out = Vec::new();
    while !body.is_empty() {
        out.push(proto::MetricFamily::decode_length_delimited(&mut body)?);
    }
    Ok(out)
}

/// Renders `snapshot` and the `extra` health series (the endpoint's own) in `format`.
pub fn render(
    snapshot: Arc<Snapshot>,
    mut extra: Vec<HealthSeries>,
    format: Format,
) -> Result<Rendered, RenderError> {
    // The renames are known before encoding, so they are part of this exposition: two
    // gauges, filled in once the plan has counted them.
    for what in ["metric", "label"] {
        extra.push(HealthSeries {
            kind: MetricKind::Gauge,
            name: "metricsd.prometheus.renamed",
            labels: crate::schema::labels(&[("what", what)]),
            value: 0,
        });
    }
    let mut plan = Plan::new(snapshot, extra);
    let counts = [plan.metric_renames, plan.label_renames];
    let n = plan.extra.len();
    for (row, count) in plan.extra[n - 2..].iter_mut().zip(counts) {
        row.value = i128::from(count);
    }
    let plan = Arc::new(plan);
    let (metric_renames, label_renames) = (plan.metric_renames, plan.label_renames);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(plan)));
    let body = match format {
        Format::Text => {
            let mut out = String::new();
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
                .map_err(|_| RenderError::Encode)?;
            out.into_bytes()
        }
        Format::OpenMetrics => {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry)
                .map_err(|_| RenderError::Encode)?;
            out.into_bytes()
        }
        Format::Protobuf => {
            prometheus_client::encoding::prometheus_protobuf::encode_to_vec(&registry)
                .map_err(|e| RenderError::Protobuf(e.to_string()))?
        }
    };
    Ok(Rendered {
        body,
        metric_renames,
        label_renames,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_q_and_defaults_to_text() {
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        // Prometheus 2.42's default header.
        let om = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(om)), Format::OpenMetrics);
        // With native histograms on.
        let pb = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(pb)), Format::Protobuf);
        assert_eq!(
            Format::negotiate(Some("application/vnd.google.protobuf;proto=other")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.2, application/openmetrics-text;q=0.1")),
            Format::Text
        );
    }

    #[test]
    fn names_follow_prometheus_rules() {
        assert_eq!(sanitize("http.requests"), "http_requests");
        assert_eq!(sanitize("9lives"), "_9lives");
        assert_eq!(sanitize("a:b-c/d"), "a_b_c_d");
        assert!(matches!(sanitize("ok_name"), Cow::Borrowed(_)));
        assert_eq!(family_name("jobs.total", MetricKind::Counter), "jobs");
        assert_eq!(
            family_name("jobs_total", MetricKind::Gauge),
            "jobs_total_gauge"
        );
        assert_eq!(
            family_name("size_bucket", MetricKind::Histogram),
            "size_bucket_histogram"
        );
        assert_eq!(
            family_name("GET /", MetricKind::SpanDuration),
            "GET___span_duration"
        );
        assert_eq!(label_key("service"), "exported_service");
        assert_eq!(label_key("le"), "exported_le");
        assert_eq!(label_key("__name__"), "label__name__");
        assert_eq!(label_key("otel.metric.overflow"), "otel_metric_overflow");
    }
}
