//! The Prometheus exposition: every series of a [`Snapshot`] (or of a scrape view), in
//! the format a scraper asks for, as the official `prometheus-client` encoder writes it.
//!
//! - [`Format::negotiate`] reads `Accept`: Prometheus protobuf (delimited
//!   `io.prometheus.client.MetricFamily`, with native histograms), OpenMetrics 1.0 text
//!   (ends in `# EOF`), or Prometheus text 0.0.4 (the default, also for no `Accept`).
//! - [`render_reference`] registers one `Collector` over the snapshot and encodes with
//!   `prometheus-client`: the definition of the bytes.
//! - [`render`] and [`render_view`] write the same bytes directly (the `writer` module
//!   says why), from one plan shared with the collector; unit tests compare the two
//!   byte for byte.
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
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, NativeHistogram, NativeHistogramBuckets, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

mod writer;

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

/// Where a sample comes from: an index into [`Plan::series`] or [`Plan::health`].
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
/// of the series whose keys needed more than borrowing. It borrows the series.
#[derive(Debug)]
struct Plan<'a> {
    series: Vec<&'a Series>,
    /// Per series (same index), its exposed labels.
    prepared: Vec<Cow<'a, Prepared>>,
    health: Vec<&'a HealthSeries>,
    health_prepared: Vec<Prepared>,
    families: Vec<Family>,
    metric_renames: u64,
    label_renames: u64,
}

/// What a series exposes besides its values: its labels as exposed (translated when a
/// key needed it), the renames that took, a hash of the exposed set (for the clash
/// check), and the labels as the formats write them: the text formats'
/// `service="…",k="v",…` (escaped) and protobuf's `LabelPair` fields.
/// A series' service and labels never change, so a [`crate::scrape::ScrapeView`] keeps
/// this with each series and a scrape only reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    translated: Option<Vec<(String, String)>>,
    renames: u64,
    hash: u64,
    text: String,
    /// The protobuf `label` fields of a `Metric` (`LabelPair`s, keys and lengths
    /// included).
    pb: Vec<u8>,
}

impl Prepared {
    /// The exposed labels of a series of `service` labelled `labels`.
    pub fn of(service: &str, labels: &[(String, String)]) -> Self {
        let (translated, renames) = match translate_labels(labels) {
            Some((t, n)) => (Some(t), n),
            None => (None, 0),
        };
        let exposed = translated.as_deref().unwrap_or(labels);
        let mut text = String::with_capacity(
            16 + exposed
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>(),
        );
        text.push_str("service=\"");
        writer::push_escaped(&mut text, service);
        text.push('"');
        let mut pb = Vec::new();
        writer::label_pair(&mut pb, "service", service);
        for (k, v) in exposed {
            text.push(',');
            text.push_str(k);
            text.push_str("=\"");
            writer::push_escaped(&mut text, v);
            text.push('"');
            writer::label_pair(&mut pb, k, v);
        }
        Self {
            hash: label_hash(service, exposed),
            translated,
            renames,
            text,
            pb,
        }
    }

    /// The exposed labels of a series whose own labels are `own`.
    fn labels<'s>(&'s self, own: &'s [(String, String)]) -> &'s [(String, String)] {
        self.translated.as_deref().unwrap_or(own)
    }
}

/// One sample as the encoders are asked to write it.
#[derive(Clone, Copy, Debug)]
enum Sample<'a> {
    CounterU64(u64),
    CounterF64(f64),
    GaugeI64(i64),
    GaugeF64(f64),
    Histogram(&'a Histogram),
    /// A gauge never set: nothing is written.
    Nothing,
}

/// One member of a family, resolved: its service, its exposed labels and its sample.
struct Member<'p> {
    service: &'p str,
    labels: &'p [(String, String)],
    prepared: &'p Prepared,
    sample: Sample<'p>,
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

/// Whether [`label_key`] leaves `key` as it is (the common case, checked without
/// building anything).
fn plain_key(key: &str) -> bool {
    const NAME: [bool; 256] = {
        let mut t = [false; 256];
        let mut c = 0;
        while c < 256 {
            t[c] = (c as u8).is_ascii_alphanumeric() || c == b'_' as usize;
            c += 1;
        }
        t
    };
    let b = key.as_bytes();
    match b.first() {
        None => false,
        Some(c) if c.is_ascii_digit() => false,
        Some(_) => {
            b.iter().all(|&c| NAME[usize::from(c)])
                && !b.starts_with(b"__")
                && !matches!(key, "service" | "le" | "quantile")
        }
    }
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
    let simple =
        labels.iter().all(|(k, _)| plain_key(k)) && labels.windows(2).all(|w| w[0].0 != w[1].0);
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

/// The name of the two health rows every exposition adds: the renames it made.
const RENAMED: &str = "metricsd.prometheus.renamed";

impl<'a> Plan<'a> {
    /// The plan over `series` and `health`, whose last two rows are the renamed-count
    /// rows [`renamed_rows`] makes (their values are filled in from the plan).
    fn new(
        series: Vec<&'a Series>,
        prepared: Vec<Option<&'a Prepared>>,
        health: Vec<&'a HealthSeries>,
    ) -> Self {
        let mut index: HashMap<(&str, MetricKind), usize> = HashMap::new();
        let mut groups: Vec<((&str, MetricKind), Vec<Source>)> = Vec::new();
        let mut last: Option<((&str, MetricKind), usize)> = None;
        let mut add = |key: (&'a str, MetricKind), src: Source| {
            let g = match last {
                Some((k, g)) if k == key => g,
                _ => {
                    let g = *index.entry(key).or_insert_with(|| {
                        groups.push((key, Vec::new()));
                        groups.len() - 1
                    });
                    last = Some((key, g));
                    g
                }
            };
            if let Some((_, members)) = groups.get_mut(g) {
                members.push(src);
            }
        };
        for (i, s) in series.iter().enumerate() {
            if matches!(s.value, Value::Gauge { value: None }) {
                continue;
            }
            add((&s.name, s.kind), Source::Series(i));
        }
        for (i, h) in health.iter().enumerate() {
            add((h.name, h.kind), Source::Health(i));
        }
        let prepared: Vec<Cow<'a, Prepared>> = series
            .iter()
            .zip(prepared.into_iter().chain(std::iter::repeat(None)))
            .map(|(s, p)| match p {
                Some(p) => Cow::Borrowed(p),
                None => Cow::Owned(Prepared::of(&s.service, &s.labels)),
            })
            .collect();
        let health_prepared: Vec<Prepared> = health
            .iter()
            .map(|h| Prepared::of(HEALTH_SERVICE, &h.labels))
            .collect();
        // A gauge never set is not exposed: nothing of it is renamed.
        let label_renames = series
            .iter()
            .zip(&prepared)
            .filter(|(s, _)| !matches!(s.value, Value::Gauge { value: None }))
            .map(|(_, p)| p.renames)
            .chain(health_prepared.iter().map(|p| p.renames))
            .sum();
        let mut taken: HashSet<String> = HashSet::new();
        let mut families = Vec::with_capacity(groups.len());
        let mut metric_renames = 0;
        // In order of original name and kind, as the rename rule says.
        groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for ((name, kind), members) in groups {
            let base = family_name(name, kind);
            for members in split_clashes(&prepared, &health_prepared, members) {
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
            series,
            prepared,
            health,
            health_prepared,
            families,
            metric_renames,
            label_renames,
        }
    }

    /// The value of health row `i`: its own, but for the two renamed-count rows last.
    fn health_value(&self, i: usize, h: &HealthSeries) -> i128 {
        let n = self.health.len();
        if h.name == RENAMED && i + 2 >= n {
            let count = if i + 2 == n {
                self.metric_renames
            } else {
                self.label_renames
            };
            return i128::from(count);
        }
        h.value
    }

    /// Member `src`, resolved (`None` for an index out of range, which the plan never
    /// makes).
    fn member(&self, src: Source) -> Option<Member<'_>> {
        match src {
            Source::Series(i) => {
                let s = *self.series.get(i)?;
                let prepared: &Prepared = self.prepared.get(i)?;
                let labels = prepared.labels(&s.labels);
                let sample = match &s.value {
                    Value::Counter { total } => match u64::try_from(*total) {
                        Ok(v) => Sample::CounterU64(v),
                        Err(_) => Sample::CounterF64(*total as f64),
                    },
                    Value::Gauge { value: Some(v) } => Sample::GaugeI64(*v),
                    Value::Gauge { value: None } => Sample::Nothing,
                    Value::FloatGauge { value } => Sample::GaugeF64(*value),
                    Value::Histogram(h) => Sample::Histogram(h),
                };
                Some(Member {
                    service: &s.service,
                    labels,
                    prepared,
                    sample,
                })
            }
            Source::Health(i) => {
                let h = *self.health.get(i)?;
                let prepared = self.health_prepared.get(i)?;
                let labels = prepared.labels(&h.labels);
                let value = self.health_value(i, h);
                let sample = match h.kind {
                    MetricKind::Counter => Sample::CounterU64(u64::try_from(value).unwrap_or(0)),
                    _ => Sample::GaugeI64(i64::try_from(value).unwrap_or(i64::MAX)),
                };
                Some(Member {
                    service: HEALTH_SERVICE,
                    labels,
                    prepared,
                    sample,
                })
            }
        }
    }
}

/// The two rows counting this exposition's renames (values filled in by the plan).
fn renamed_rows() -> [HealthSeries; 2] {
    ["metric", "label"].map(|what| HealthSeries {
        kind: MetricKind::Gauge,
        name: RENAMED,
        labels: crate::schema::labels(&[("what", what)]),
        value: 0,
    })
}

/// The members of one group split so that no two in a part expose the same label set
/// (translation can make two series' labels coincide: `a.b` and `a_b`, or `service`
/// renamed onto an existing `exported_service`): each member goes to the first part
/// that does not have its labels yet, so without a clash there is one part.
fn split_clashes(
    prepared: &[Cow<'_, Prepared>],
    health: &[Prepared],
    members: Vec<Source>,
) -> Vec<Vec<Source>> {
    if members.len() < 2 {
        return vec![members];
    }
    let hash = |member: Source| -> Option<u64> {
        match member {
            Source::Series(i) => prepared.get(i).map(|p| p.hash),
            Source::Health(i) => health.get(i).map(|p| p.hash),
        }
    };
    // Usually no two members clash, which the hashes of their exposed label sets show:
    // only two equal hashes call for the exact split.
    let mut hashes: HashSet<u64, BuildHasherDefault<Prehashed>> =
        HashSet::with_capacity_and_hasher(members.len(), BuildHasherDefault::default());
    let distinct = members
        .iter()
        .all(|&m| hash(m).is_none_or(|h| hashes.insert(h)));
    if distinct {
        return vec![members];
    }
    let mut parts: Vec<(HashSet<&str>, Vec<Source>)> = Vec::new();
    for member in members {
        // The label text is the exposed set, written out (keys are names, values
        // escaped): equal texts, equal sets.
        let key = match member {
            Source::Series(i) => prepared.get(i).map(|p| p.text.as_str()),
            Source::Health(i) => health.get(i).map(|p| p.text.as_str()),
        };
        let Some(key) = key else {
            continue;
        };
        match parts.iter_mut().find(|(seen, _)| !seen.contains(key)) {
            Some((seen, part)) => {
                seen.insert(key);
                part.push(member);
            }
            None => parts.push((HashSet::from([key]), vec![member])),
        }
    }
    parts.into_iter().map(|(_, part)| part).collect()
}

/// The hasher of a set of [`label_hash`] values: they are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A hash of an exposed label set (service, then each key and value), for the clash
/// check: equal sets hash equal; unequal sets that happen to hash equal only cost the
/// exact check.
fn label_hash(service: &str, labels: &[(String, String)]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h: u64 = 0;
    let mut add = |s: &str| {
        let b = s.as_bytes();
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        let mut w = [0u8; 8];
        w[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        h = (h.rotate_left(5) ^ b.len() as u64).wrapping_mul(K);
    };
    add(service);
    for (k, v) in labels {
        add(k);
        add(v);
    }
    h
}

fn metric_type(kind: MetricKind) -> MetricType {
    match kind {
        MetricKind::Counter => MetricType::Counter,
        MetricKind::Gauge => MetricType::Gauge,
        MetricKind::Histogram | MetricKind::SpanDuration => MetricType::Histogram,
    }
}

/// The reference encoder's collector: `prometheus-client` calls it at encode time and
/// it walks the snapshot through the same [`Plan`] as the direct writer.
#[derive(Debug)]
struct SnapshotCollector {
    snapshot: Arc<Snapshot>,
    extra: Vec<HealthSeries>,
}

impl SnapshotCollector {
    fn plan(&self) -> Plan<'_> {
        Plan::new(
            self.snapshot.series.iter().collect(),
            Vec::new(),
            self.snapshot.health.iter().chain(&self.extra).collect(),
        )
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let plan = self.plan();
        let mut labels: Vec<(&str, &str)> = Vec::new();
        let mut classic: Vec<(f64, u64)> = Vec::new();
        for family in &plan.families {
            let mut metric = encoder.encode_descriptor(
                &family.name,
                &family.help,
                None,
                metric_type(family.kind),
            )?;
            for &src in &family.members {
                let Some(member) = plan.member(src) else {
                    continue;
                };
                labels.clear();
                labels.push(("service", member.service));
                labels.extend(member.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                let mut m = metric.encode_family(&labels)?;
                match member.sample {
                    Sample::CounterU64(v) => m.encode_counter::<NoLabelSet, _, f64>(&v, None)?,
                    Sample::CounterF64(v) => m.encode_counter::<NoLabelSet, _, f64>(&v, None)?,
                    Sample::GaugeI64(v) => m.encode_gauge(&v)?,
                    Sample::GaugeF64(v) => m.encode_gauge(&v)?,
                    Sample::Histogram(h) => encode_histogram(&mut m, h, &mut classic)?,
                    Sample::Nothing => {}
                }
            }
        }
        Ok(())
    }
}

/// `h`'s classic buckets as `(le, count in that bucket)`, into `out`.
fn classic_buckets(h: &Histogram, out: &mut Vec<(f64, u64)>) {
    out.clear();
    let mut prev = 0;
    for b in h.classic() {
        out.push((b.le, b.cumulative - prev));
        prev = b.cumulative;
    }
}

fn encode_histogram(
    m: &mut prometheus_client::encoding::MetricEncoder<'_>,
    h: &Histogram,
    classic: &mut Vec<(f64, u64)>,
) -> Result<(), fmt::Error> {
    classic_buckets(h, classic);
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
            m.encode_histogram_with_native::<NoLabelSet>(h.sum(), h.count(), classic, None, native)
        }
        Histogram::Explicit(_) => {
            m.encode_histogram::<NoLabelSet>(h.sum(), h.count(), classic, None)
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

/// Renders `snapshot` and the `extra` health series (the endpoint's own) in `format`,
/// with the direct writer: the bytes [`render_reference`] gives.
pub fn render(
    snapshot: Arc<Snapshot>,
    extra: Vec<HealthSeries>,
    format: Format,
) -> Result<Rendered, RenderError> {
    let renamed = renamed_rows();
    let plan = Plan::new(
        snapshot.series.iter().collect(),
        Vec::new(),
        snapshot
            .health
            .iter()
            .chain(&extra)
            .chain(&renamed)
            .collect(),
    );
    render_plan(&plan, format)
}

/// Renders the series and health rows a [`crate::scrape::ScrapeView`] holds.
pub fn render_view(
    view: &crate::scrape::ScrapeView,
    format: Format,
) -> Result<Rendered, RenderError> {
    let renamed = renamed_rows();
    let (series, prepared) = view.entries().map(|(s, p)| (s, Some(p))).unzip();
    let plan = Plan::new(
        series,
        prepared,
        view.health().iter().chain(&renamed).collect(),
    );
    render_plan(&plan, format)
}

fn render_plan(plan: &Plan<'_>, format: Format) -> Result<Rendered, RenderError> {
    let body = match format {
        Format::Text => writer::text(plan, false)?,
        Format::OpenMetrics => writer::text(plan, true)?,
        Format::Protobuf => writer::protobuf(plan),
    };
    Ok(Rendered {
        body,
        metric_renames: plan.metric_renames,
        label_renames: plan.label_renames,
    })
}

/// Renders like [`render`], through the official `prometheus-client` encoder (a
/// `Collector` over the snapshot, encoded by its OpenMetrics, Prometheus text or
/// protobuf encoder). The exposition's format is defined by this encoder; [`render`]
/// writes the same bytes without building the encoder's intermediate values (its
/// protobuf encoder builds every message, label strings included, before writing).
/// Tests and fuzzing compare the two byte for byte.
pub fn render_reference(
    snapshot: Arc<Snapshot>,
    mut extra: Vec<HealthSeries>,
    format: Format,
) -> Result<Rendered, RenderError> {
    extra.extend(renamed_rows());
    let collector = SnapshotCollector { snapshot, extra };
    let (metric_renames, label_renames) = {
        let plan = collector.plan();
        (plan.metric_renames, plan.label_renames)
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
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
    use crate::histogram::Exponential;

    /// A histogram of `values` (`u64`) and `floats`, exponential or over `bounds`.
    fn hist(bounds: Option<&[u64]>, values: &[u64], floats: &[f64]) -> Value {
        let mut h = Histogram::new(bounds.map(Arc::from));
        for &v in values {
            h.record(v);
        }
        for &v in floats {
            h.record_f64(v).expect("finite");
        }
        Value::Histogram(h)
    }

    fn health(
        kind: MetricKind,
        name: &'static str,
        labels: &[(&str, &str)],
        value: i128,
    ) -> HealthSeries {
        HealthSeries {
            kind,
            name,
            labels: crate::schema::labels(labels),
            value,
        }
    }

    /// Every format through the direct writer and through `prometheus-client`: the same
    /// bytes, and the same rename counts.
    fn assert_identical(snapshot: Snapshot, extra: Vec<HealthSeries>) {
        let snapshot = Arc::new(snapshot);
        for format in [Format::OpenMetrics, Format::Text, Format::Protobuf] {
            let ours = render(snapshot.clone(), extra.clone(), format).expect("renders");
            let theirs =
                render_reference(snapshot.clone(), extra.clone(), format).expect("renders");
            if ours.body != theirs.body {
                let first = ours
                    .body
                    .iter()
                    .zip(&theirs.body)
                    .position(|(a, b)| a != b)
                    .unwrap_or(ours.body.len().min(theirs.body.len()));
                let at = first.saturating_sub(200);
                panic!(
                    "{format:?} differs at byte {first} of {} / {}:\nours:   {:?}\ntheirs: {:?}",
                    ours.body.len(),
                    theirs.body.len(),
                    String::from_utf8_lossy(&ours.body[at..(first + 200).min(ours.body.len())]),
                    String::from_utf8_lossy(&theirs.body[at..(first + 200).min(theirs.body.len())]),
                );
            }
            assert_eq!(ours.metric_renames, theirs.metric_renames);
            assert_eq!(ours.label_renames, theirs.label_renames);
        }
    }

    #[test]
    fn the_direct_writer_writes_what_prometheus_client_writes() {
        let c = MetricKind::Counter;
        let g = MetricKind::Gauge;
        let h = MetricKind::Histogram;
        let wide: Vec<u64> = (0..64)
            .map(|k| 1u64 << k)
            .chain([u64::MAX, 3, 5, 1000])
            .collect();
        let series = vec![
            Series::new(
                "web",
                c,
                "http.requests",
                &[("route", "/a"), ("status", "200")],
                Value::Counter { total: 42 },
            ),
            Series::new(
                "web",
                c,
                "http.requests",
                &[("route", "/b\"q\"\\\n"), ("status", "500")],
                Value::Counter { total: 0 },
            ),
            Series::new(
                "api",
                c,
                "http.requests",
                &[("route", "/a")],
                Value::Counter {
                    total: u128::from(u64::MAX) + 1,
                },
            ),
            Series::new("api", c, "jobs.done", &[], Value::Counter { total: 3 }),
            Series::new("api", c, "jobs_done", &[], Value::Counter { total: 4 }),
            Series::new(
                "api",
                c,
                "jobs_total",
                &[
                    ("service", "fake"),
                    ("le", "x"),
                    ("__name__", "y"),
                    ("a.b", "1"),
                    ("a_b", "2"),
                    ("9x", ""),
                ],
                Value::Counter { total: 5 },
            ),
            // Two series whose labels coincide once translated: kept apart.
            Series::new(
                "api",
                c,
                "clash",
                &[("a.b", "1")],
                Value::Counter { total: 1 },
            ),
            Series::new(
                "api",
                c,
                "clash",
                &[("a_b", "1")],
                Value::Counter { total: 2 },
            ),
            Series::new(
                "api",
                c,
                "clash",
                &[("a-b", "1")],
                Value::Counter { total: 3 },
            ),
            Series::new(
                "api",
                c,
                "over",
                &[("otel.metric.overflow", "true")],
                Value::Counter { total: 7 },
            ),
            Series::new(
                "web",
                g,
                "queue.depth",
                &[],
                Value::Gauge { value: Some(-17) },
            ),
            Series::new(
                "web",
                g,
                "queue.depth",
                &[("w", "1")],
                Value::Gauge { value: None },
            ),
            Series::new(
                "web",
                g,
                "queue.depth",
                &[("w", "2")],
                Value::Gauge {
                    value: Some(i64::MIN),
                },
            ),
            Series::new(
                "web",
                g,
                "temp_total",
                &[],
                Value::FloatGauge { value: 0.25 },
            ),
            Series::new(
                "web",
                g,
                "temp_total",
                &[("w", "z")],
                Value::FloatGauge { value: -0.0 },
            ),
            Series::new(
                "web",
                g,
                "temp_total",
                &[("w", "b")],
                Value::FloatGauge { value: 1e300 },
            ),
            Series::new(
                "web",
                g,
                "temp_total",
                &[("w", "c")],
                Value::FloatGauge { value: -1.5e-7 },
            ),
            Series::new(
                "web",
                g,
                "temp_total",
                &[("w", "d")],
                Value::FloatGauge {
                    value: f64::INFINITY,
                },
            ),
            Series::new(
                "web",
                g,
                "tab\there é",
                &[],
                Value::Gauge { value: Some(0) },
            ),
            Series::new(
                "web",
                h,
                "payload.bytes",
                &[("k", "v")],
                hist(None, &[0, 1, 2, 3, 4, 1000, 1024, 1025, 1 << 40], &[]),
            ),
            Series::new(
                "web",
                h,
                "payload.bytes",
                &[("k", "w")],
                hist(None, &[], &[]),
            ),
            Series::new(
                "web",
                h,
                "payload.bytes",
                &[("k", "x")],
                hist(None, &wide, &[]),
            ),
            Series::new(
                "web",
                h,
                "payload.bytes",
                &[("k", "y")],
                hist(None, &[], &[-3.5, -0.25, 0.0, 0.5, 1e-9, 7.75]),
            ),
            Series::new(
                "web",
                h,
                "payload.bytes",
                &[("k", "z")],
                hist(None, &[5, 5, 5], &[]),
            ),
            Series::new(
                "web",
                h,
                "size_bucket",
                &[],
                hist(
                    Some(&[10, 100, 1_000_000, 10_000_000, 1 << 53]),
                    &[5, 10, 11, 1000, 20_000_000, u64::MAX],
                    &[],
                ),
            ),
            Series::new(
                "web",
                h,
                "size_bucket",
                &[("e", "1")],
                hist(Some(&[1]), &[], &[]),
            ),
            Series::new(
                "web",
                MetricKind::SpanDuration,
                "GET /",
                &[("status", "ok")],
                hist(None, &[1_000, 2_000_000], &[]),
            ),
        ];
        let mut exp = Exponential::new();
        exp.record(9);
        let snapshot = Snapshot {
            series,
            health: vec![
                health(c, "metricsd.records.drained", &[], 123),
                health(
                    c,
                    "metricsd.rejects",
                    &[("class", "invalid_args"), ("reason", "unknown_kind")],
                    -1,
                ),
                health(g, "metricsd.drain.lag", &[], i128::from(i64::MAX) + 1),
                health(g, "metricsd.series", &[], -5),
            ],
            ..Snapshot::default()
        };
        let extra = vec![health(c, "metricsd.scrape.served", &[], 2)];
        let families = decode(
            &render(Arc::new(snapshot.clone()), extra.clone(), Format::Protobuf)
                .expect("renders")
                .body,
        )
        .expect("decodes");
        let clash: Vec<&str> = families
            .iter()
            .filter(|f| f.name.starts_with("clash"))
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(clash, ["clash_total", "clash_2_total", "clash_3_total"]);
        assert_identical(snapshot, extra);
        // Nothing at all.
        assert_identical(Snapshot::default(), Vec::new());
    }

    #[test]
    fn the_direct_writer_matches_on_random_series() {
        // xorshift: reproducible, no dependency.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let names = ["a.b", "a_b", "c", "d_total", "e_count", "f:g", "h-i", "1j"];
        let keys = ["k", "route", "service", "le", "x.y", "x_y", "__z"];
        let values = ["", "v", "\"", "\\", "\n", "é", "a b"];
        let layouts: [Option<&[u64]>; 3] = [
            None,
            Some(&[1, 2, 4]),
            Some(&[999_999, 1_000_000, 123_456_789]),
        ];
        for round in 0..20 {
            let mut series = Vec::new();
            for _ in 0..60 {
                let r = next();
                let kind = [
                    MetricKind::Counter,
                    MetricKind::Gauge,
                    MetricKind::Histogram,
                    MetricKind::SpanDuration,
                ][(r % 4) as usize];
                let name = names[(r >> 8) as usize % names.len()];
                let n_labels = (r >> 16) as usize % 4;
                let labels: Vec<(&str, &str)> = (0..n_labels)
                    .map(|i| {
                        let q = next();
                        (
                            keys[(q as usize + i) % keys.len()],
                            values[(q >> 32) as usize % values.len()],
                        )
                    })
                    .collect();
                let value = match kind {
                    MetricKind::Counter => Value::Counter {
                        total: u128::from(next() >> (next() % 64)),
                    },
                    MetricKind::Gauge => match next() % 3 {
                        0 => Value::Gauge {
                            value: Some(next() as i64),
                        },
                        1 => Value::Gauge { value: None },
                        _ => Value::FloatGauge {
                            value: f64::from_bits(next() >> 2) - 0.5,
                        },
                    },
                    _ => {
                        let vs: Vec<u64> =
                            (0..next() % 30).map(|_| next() >> (next() % 64)).collect();
                        let fs: Vec<f64> = (0..next() % 3)
                            .map(|_| (next() % 10_000) as f64 / 7.0 - 700.0)
                            .collect();
                        hist(layouts[(next() % 3) as usize], &vs, &fs)
                    }
                };
                series.push(Series::new(
                    ["web", "api", "a\"b"][round % 3],
                    kind,
                    name,
                    &labels,
                    value,
                ));
            }
            assert_identical(
                Snapshot {
                    series,
                    ..Snapshot::default()
                },
                Vec::new(),
            );
        }
    }

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
