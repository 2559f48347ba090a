//! `prometheus_roundtrip`: metricsd's Prometheus exposition (`metricsd::prometheus::render`)
//! of any series set, read back.
//!
//! The OpenMetrics text is parsed by a strict reader of the OpenMetrics 1.0 grammar
//! (below: every line, every escape, `# EOF` last, each family's samples together and
//! named for its type, no sample twice), the protobuf by prost into Prometheus' own
//! messages. Both must equal what a model of the documented exposition predicts from
//! the series alone: the families (grouped by name and kind, named by
//! `family_name`, a clash resolved with `_2`, `_3`, ... in order of original name and
//! kind), each sample's labels (`service` first, then the keys by `label_key` in order,
//! a clash within the series resolved the same way), every value exactly (counters and
//! integer gauges as integers in the text; float gauges bit for bit, NaN included), the
//! classic buckets of each histogram counted from its observations, its count and sum,
//! the native buckets of protobuf against each observation's bucket, and the rename
//! counts the exposition reports about itself. Prometheus text 0.0.4 must render too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use metricsd::aggregate::{MetricKind, Value};
use metricsd::histogram::{Histogram, index, index_u64};
use metricsd::prometheus::{self, Format, family_name, label_key, proto};
use metricsd::snapshot::Snapshot;

use crate::input::Input;
use crate::series::{Generated, Observation, generate};

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let generated = generate(&mut input);
    let snapshot = Snapshot {
        series: generated.iter().map(|g| g.series.clone()).collect(),
        ..Snapshot::default()
    };
    let snapshot = Arc::new(snapshot);
    let model = Model::new(&generated);

    let render = |format| {
        prometheus::render(Arc::clone(&snapshot), Vec::new(), format)
            .unwrap_or_else(|e| panic!("{format:?} refused: {e}"))
    };
    let om = render(Format::OpenMetrics);
    assert_eq!(om.metric_renames, model.metric_renames, "metric renames");
    assert_eq!(om.label_renames, model.label_renames, "label renames");
    let text = String::from_utf8(om.body).unwrap_or_else(|e| panic!("not UTF-8: {e}"));
    let parsed = parse_openmetrics(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    model.check_text(&parsed, &text);

    let pb = render(Format::Protobuf);
    let families = prometheus::decode(&pb.body).unwrap_or_else(|e| panic!("protobuf: {e}"));
    model.check_protobuf(&families);

    let plain = render(Format::Text);
    assert!(!plain.body.is_empty());
}

/// What one exposed sample set holds.
#[derive(Debug, Clone)]
enum Expect {
    Counter(u128),
    Gauge(i64),
    Float(f64),
    /// A generated series' histogram.
    Histogram(usize),
    /// The exposition's own count of metric (`true`) or label renames.
    Renamed(bool),
}

#[derive(Debug)]
struct Member {
    labels: Vec<(String, String)>,
    value: Expect,
}

#[derive(Debug)]
struct Family {
    name: String,
    kind: MetricKind,
    help: String,
    members: Vec<Member>,
}

/// The exposition the documentation describes.
struct Model<'a> {
    generated: &'a [Generated],
    families: Vec<Family>,
    metric_renames: u64,
    label_renames: u64,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn sample_names(name: &str, kind: MetricKind) -> Vec<String> {
    match kind {
        MetricKind::Counter => vec![name.to_owned(), format!("{name}_total")],
        MetricKind::Gauge => vec![name.to_owned()],
        MetricKind::Histogram | MetricKind::SpanDuration => ["", "_count", "_sum", "_bucket"]
            .iter()
            .map(|s| format!("{name}{s}"))
            .collect(),
    }
}

fn help(kind: MetricKind, name: &str) -> String {
    let what = match kind {
        MetricKind::Counter => "counter",
        MetricKind::Gauge => "gauge",
        MetricKind::Histogram => "histogram",
        MetricKind::SpanDuration => "span duration histogram (nanoseconds) of span",
    };
    if name
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
    {
        format!("{what} {name}")
    } else {
        what.to_owned()
    }
}

/// The exposed labels of a series: `service`, then each key translated, a clash
/// renamed `<key>_2`, `<key>_3`, ...; and how many renames that took.
fn exposed_labels(service: &str, labels: &[(String, String)]) -> (Vec<(String, String)>, u64) {
    let mut out = vec![("service".to_owned(), service.to_owned())];
    let mut renames = 0;
    for (k, v) in labels {
        let base = label_key(k).into_owned();
        assert!(
            valid_name(&base) && !base.starts_with("__"),
            "label key {k:?} exposed as {base:?}"
        );
        assert!(!matches!(base.as_str(), "service" | "le" | "quantile"));
        let mut key = base.clone();
        let mut n = 2;
        while out.iter().any(|(k, _)| *k == key) {
            key = format!("{base}_{n}");
            n += 1;
            renames += 1;
        }
        out.push((key, v.clone()));
    }
    (out, renames)
}

impl<'a> Model<'a> {
    fn new(generated: &'a [Generated]) -> Self {
        // (name, kind) -> members, in series order, then the exposition's own two
        // rename gauges (service `metricsd`), filled in once the renames are known.
        let mut groups: BTreeMap<(String, MetricKind), Vec<Member>> = BTreeMap::new();
        let mut label_renames = 0;
        for (i, g) in generated.iter().enumerate() {
            let s = &g.series;
            let value = match &s.value {
                Value::Counter { total } => Expect::Counter(*total),
                Value::Gauge { value: None } => continue,
                Value::Gauge { value: Some(v) } => Expect::Gauge(*v),
                Value::FloatGauge { value } => Expect::Float(*value),
                Value::Histogram(_) => Expect::Histogram(i),
            };
            let (labels, renames) = exposed_labels(&s.service, &s.labels);
            label_renames += renames;
            groups
                .entry((s.name.to_string(), s.kind))
                .or_default()
                .push(Member { labels, value });
        }
        for what in ["metric", "label"] {
            groups
                .entry(("metricsd.prometheus.renamed".to_owned(), MetricKind::Gauge))
                .or_default()
                .push(Member {
                    labels: vec![
                        ("service".to_owned(), "metricsd".to_owned()),
                        ("what".to_owned(), what.to_owned()),
                    ],
                    value: Expect::Renamed(what == "metric"),
                });
        }
        let mut taken: HashSet<String> = HashSet::new();
        let mut families = Vec::new();
        let mut metric_renames = 0;
        for ((name, kind), members) in groups {
            let base = family_name(&name, kind);
            // Series whose exposed labels coincide are never merged: the later one goes
            // to the first family of the name that does not have those labels yet.
            let mut parts: Vec<Vec<Member>> = Vec::new();
            for m in members {
                match parts
                    .iter_mut()
                    .find(|p| p.iter().all(|o| o.labels != m.labels))
                {
                    Some(p) => p.push(m),
                    None => parts.push(vec![m]),
                }
            }
            for members in parts {
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
                assert!(valid_name(&chosen), "{name:?} exposed as {chosen:?}");
                taken.extend(sample_names(&chosen, kind));
                families.push(Family {
                    name: chosen,
                    kind,
                    help: help(kind, &name),
                    members,
                });
            }
        }
        Self {
            generated,
            families,
            metric_renames,
            label_renames,
        }
    }

    fn histogram(&self, i: usize) -> (&Histogram, &[Observation]) {
        let g = &self.generated[i];
        match &g.series.value {
            Value::Histogram(h) => (h, &g.observations),
            other => panic!("not a histogram: {other:?}"),
        }
    }

    fn check_text(&self, parsed: &[TextFamily], text: &str) {
        let names: Vec<&str> = parsed.iter().map(|f| f.name.as_str()).collect();
        let want: Vec<&str> = self.families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, want, "families, in order\n{text}");
        for (f, p) in self.families.iter().zip(parsed) {
            let kind = match f.kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
                MetricKind::Histogram | MetricKind::SpanDuration => "histogram",
            };
            assert_eq!(p.kind, kind, "{}", f.name);
            assert_eq!(p.help.as_deref(), Some(f.help.as_str()), "{}", f.name);
            // Samples of one label set, by sample name.
            let mut by_labels: HashMap<Vec<(String, String)>, Vec<&TextSample>> = HashMap::new();
            for s in &p.samples {
                let mut labels = s.labels.clone();
                if s.name.ends_with("_bucket") {
                    labels.retain(|(k, _)| k != "le");
                }
                by_labels.entry(labels).or_default().push(s);
            }
            assert_eq!(
                by_labels.len(),
                f.members.len(),
                "{}: label sets\n{text}",
                f.name
            );
            for m in &f.members {
                let samples = by_labels
                    .get(&m.labels)
                    .unwrap_or_else(|| panic!("{}: no sample {:?}\n{text}", f.name, m.labels));
                self.check_text_member(f, m, samples, text);
            }
        }
    }

    /// The value of a member, the rename counts resolved.
    fn value(&self, m: &Member) -> Expect {
        match m.value {
            Expect::Renamed(true) => Expect::Gauge(self.metric_renames as i64),
            Expect::Renamed(false) => Expect::Gauge(self.label_renames as i64),
            ref v => v.clone(),
        }
    }

    fn check_text_member(&self, f: &Family, m: &Member, samples: &[&TextSample], text: &str) {
        let ctx = || format!("{} {:?}\n{text}", f.name, m.labels);
        match self.value(m) {
            Expect::Counter(total) => {
                assert_eq!(samples.len(), 1, "{}", ctx());
                assert_eq!(samples[0].name, format!("{}_total", f.name), "{}", ctx());
                assert_counter_text(&samples[0].value, total);
            }
            Expect::Gauge(v) => {
                assert_eq!(samples.len(), 1, "{}", ctx());
                assert_eq!(samples[0].name, f.name, "{}", ctx());
                assert_eq!(samples[0].value, v.to_string(), "{}", ctx());
            }
            Expect::Float(v) => {
                assert_eq!(samples.len(), 1, "{}", ctx());
                assert_eq!(samples[0].name, f.name, "{}", ctx());
                assert_same_float(number(&samples[0].value), v, &ctx);
            }
            Expect::Renamed(_) => unreachable!("resolved by `value`"),
            Expect::Histogram(i) => {
                let (h, observations) = self.histogram(i);
                let one = |suffix: &str| {
                    let name = format!("{}{suffix}", f.name);
                    let found: Vec<_> = samples.iter().filter(|s| s.name == name).collect();
                    assert_eq!(found.len(), 1, "{name}: {}", ctx());
                    number(&found[0].value)
                };
                assert_eq!(one("_count"), observations.len() as f64, "{}", ctx());
                assert_same_float(one("_sum"), h.sum(), &ctx);
                let buckets: Vec<(f64, f64)> = samples
                    .iter()
                    .filter(|s| s.name == format!("{}_bucket", f.name))
                    .map(|s| {
                        let le = s.labels.iter().find(|(k, _)| k == "le");
                        let le = le.map_or(f64::NAN, |(_, v)| number(v));
                        (le, number(&s.value))
                    })
                    .collect();
                assert_eq!(
                    buckets.len() + 2,
                    samples.len(),
                    "only _count, _sum and _bucket: {}",
                    ctx()
                );
                check_classic(h, observations, &buckets, &ctx);
            }
        }
    }

    fn check_protobuf(&self, families: &[proto::MetricFamily]) {
        let names: Vec<String> = families.iter().map(|f| f.name.clone()).collect();
        let want: Vec<String> = self
            .families
            .iter()
            .map(|f| match f.kind {
                MetricKind::Counter => format!("{}_total", f.name),
                _ => f.name.clone(),
            })
            .collect();
        assert_eq!(names, want, "protobuf families");
        for (f, p) in self.families.iter().zip(families) {
            let ctx = || format!("{}: {p:?}", f.name);
            let ty = match f.kind {
                MetricKind::Counter => proto::MetricType::Counter,
                MetricKind::Gauge => proto::MetricType::Gauge,
                MetricKind::Histogram | MetricKind::SpanDuration => proto::MetricType::Histogram,
            };
            assert_eq!(p.r#type, ty as i32, "{}", ctx());
            assert_eq!(p.help, f.help, "{}", ctx());
            assert_eq!(p.metric.len(), f.members.len(), "{}", ctx());
            for (m, pm) in f.members.iter().zip(&p.metric) {
                let labels: Vec<(String, String)> = pm
                    .label
                    .iter()
                    .map(|l| (l.name.clone(), l.value.clone()))
                    .collect();
                assert_eq!(labels, m.labels, "{}", ctx());
                match self.value(m) {
                    Expect::Counter(total) => {
                        let c = pm.counter.as_ref().unwrap_or_else(|| panic!("{}", ctx()));
                        assert_eq!(c.value, total as f64, "{}", ctx());
                    }
                    Expect::Gauge(v) => {
                        let g = pm.gauge.as_ref().unwrap_or_else(|| panic!("{}", ctx()));
                        assert_eq!(g.value, v as f64, "{}", ctx());
                    }
                    Expect::Float(v) => {
                        let g = pm.gauge.as_ref().unwrap_or_else(|| panic!("{}", ctx()));
                        assert_same_float(g.value, v, &ctx);
                    }
                    Expect::Renamed(_) => unreachable!("resolved by `value`"),
                    Expect::Histogram(i) => {
                        let (h, observations) = self.histogram(i);
                        let ph = pm.histogram.as_ref().unwrap_or_else(|| panic!("{}", ctx()));
                        assert_eq!(ph.sample_count, observations.len() as u64, "{}", ctx());
                        assert_same_float(ph.sample_sum, h.sum(), &ctx);
                        let buckets: Vec<(f64, f64)> = ph
                            .bucket
                            .iter()
                            .map(|b| (b.upper_bound, b.cumulative_count as f64))
                            .collect();
                        check_classic(h, observations, &buckets, &ctx);
                        check_native(h, observations, ph, &ctx);
                    }
                }
            }
        }
    }
}

/// A counter's text value: the exact integer up to 2^64 - 1, else the `f64` nearest.
fn assert_counter_text(text: &str, total: u128) {
    if let Ok(v) = u64::try_from(total) {
        assert_eq!(text, v.to_string(), "counter {total}");
    } else {
        assert_eq!(number(text), total as f64, "counter {total} as {text}");
    }
}

fn assert_same_float(got: f64, want: f64, ctx: &dyn Fn() -> String) {
    assert!(
        got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
        "{got} for {want}: {}",
        ctx()
    );
}

/// Classic buckets: strictly increasing `le`, `+Inf` last, each cumulative count the
/// observations at most `le`, and the same list metricsd's histogram gives.
fn check_classic(
    h: &Histogram,
    observations: &[Observation],
    buckets: &[(f64, f64)],
    ctx: &dyn Fn() -> String,
) {
    assert_eq!(
        buckets.last().map(|b| b.0),
        Some(f64::INFINITY),
        "{}",
        ctx()
    );
    assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0), "{}", ctx());
    for &(le, cumulative) in buckets {
        let want = observations.iter().filter(|o| o.at_most(le)).count();
        assert_eq!(cumulative, want as f64, "le {le}: {}", ctx());
        if let Histogram::Exponential(_) = h {
            assert!(
                le.is_infinite() || le == 0.0 || (le > 0.0 && le.log2().fract() == 0.0),
                "an exponential histogram's classic bound {le} is a power of two: {}",
                ctx()
            );
        }
    }
    let classic: Vec<(f64, f64)> = h
        .classic()
        .iter()
        .map(|c| (c.le, c.cumulative as f64))
        .collect();
    assert_eq!(buckets, classic, "{}", ctx());
}

/// Native buckets (protobuf): schema `min(scale, 8)`, zero threshold 0, and every
/// observation in the bucket its value falls in at that schema (Prometheus' index is
/// one more than the OpenTelemetry index metricsd uses).
fn check_native(
    h: &Histogram,
    observations: &[Observation],
    ph: &proto::Histogram,
    ctx: &dyn Fn() -> String,
) {
    let Histogram::Exponential(e) = h else {
        assert!(
            ph.positive_span.is_empty() && ph.negative_span.is_empty(),
            "{}",
            ctx()
        );
        return;
    };
    let schema = e.scale().min(8);
    assert_eq!(ph.schema, schema, "{}", ctx());
    assert_eq!(ph.zero_threshold, 0.0, "{}", ctx());
    let mut zero = 0;
    let mut positive: BTreeMap<i32, u64> = BTreeMap::new();
    let mut negative: BTreeMap<i32, u64> = BTreeMap::new();
    for o in observations {
        let (side, i) = match *o {
            Observation::Int(0) => {
                zero += 1;
                continue;
            }
            Observation::Int(v) => (&mut positive, index_u64(v, schema)),
            Observation::Float(0.0) => {
                zero += 1;
                continue;
            }
            Observation::Float(v) if v < 0.0 => (&mut negative, index(-v, schema)),
            Observation::Float(v) => (&mut positive, index(v, schema)),
        };
        let i = i.unwrap_or_else(|| panic!("no index for {o:?}: {}", ctx()));
        *side.entry(i + 1).or_insert(0) += 1;
    }
    assert_eq!(ph.zero_count, zero, "{}", ctx());
    let decode = |spans: &[proto::BucketSpan], deltas: &[i64]| -> BTreeMap<i32, u64> {
        let mut out = BTreeMap::new();
        let mut at = 0i32;
        let mut count = 0i64;
        let mut deltas = deltas.iter();
        for (n, span) in spans.iter().enumerate() {
            at += span.offset;
            assert!(n == 0 || span.offset >= 0, "a span going back: {}", ctx());
            for _ in 0..span.length {
                count += deltas
                    .next()
                    .unwrap_or_else(|| panic!("too few deltas: {}", ctx()));
                assert!(count >= 0, "a negative bucket count: {}", ctx());
                if count > 0 {
                    out.insert(at, count as u64);
                }
                at += 1;
            }
        }
        assert!(deltas.next().is_none(), "too many deltas: {}", ctx());
        out
    };
    assert_eq!(
        decode(&ph.positive_span, &ph.positive_delta),
        positive,
        "{}",
        ctx()
    );
    assert_eq!(
        decode(&ph.negative_span, &ph.negative_delta),
        negative,
        "{}",
        ctx()
    );
}

/// A number of the OpenMetrics grammar (`NaN`, `+Inf`, `-Inf` and the real numbers).
fn number(text: &str) -> f64 {
    let ok = match text.to_ascii_lowercase().trim_start_matches(['+', '-']) {
        "inf" | "infinity" => true,
        "nan" => !text.starts_with(['+', '-']),
        t => {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        }
    };
    assert!(ok, "{text:?} is not an OpenMetrics number");
    text.parse()
        .unwrap_or_else(|e| panic!("{text:?} is not a number: {e}"))
}

/// One sample line.
#[derive(Debug)]
struct TextSample {
    name: String,
    labels: Vec<(String, String)>,
    value: String,
}

/// One family of an OpenMetrics exposition.
#[derive(Debug)]
struct TextFamily {
    name: String,
    kind: String,
    help: Option<String>,
    samples: Vec<TextSample>,
}

/// A strict reader of the OpenMetrics 1.0 text format, as far as metricsd writes it
/// (no units, exemplars or timestamps).
fn parse_openmetrics(text: &str) -> Result<Vec<TextFamily>, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .ok_or("the exposition does not end in `# EOF`")?;
    let mut families: Vec<TextFamily> = Vec::new();
    let mut seen: HashSet<(String, Vec<(String, String)>)> = HashSet::new();
    for line in body.split_terminator('\n') {
        if let Some(rest) = line.strip_prefix("# ") {
            let (what, rest) = rest
                .split_once(' ')
                .ok_or_else(|| format!("bad line {line:?}"))?;
            let (name, arg) = rest
                .split_once(' ')
                .ok_or_else(|| format!("bad line {line:?}"))?;
            if !valid_name(name) {
                return Err(format!("bad metric name in {line:?}"));
            }
            let family = match families.last_mut() {
                Some(f) if f.name == name && f.samples.is_empty() => f,
                _ => {
                    if families.iter().any(|f| f.name == name) {
                        return Err(format!("family {name} appears twice"));
                    }
                    families.push(TextFamily {
                        name: name.to_owned(),
                        kind: "unknown".to_owned(),
                        help: None,
                        samples: Vec::new(),
                    });
                    families.last_mut().ok_or("no family")?
                }
            };
            match what {
                "HELP" => family.help = Some(unescape(arg, false)?),
                "TYPE" => family.kind = arg.to_owned(),
                _ => return Err(format!("unknown descriptor {line:?}")),
            }
            continue;
        }
        let family = families
            .last_mut()
            .ok_or_else(|| format!("a sample before any family: {line:?}"))?;
        let (name, labels, value) = sample_line(line)?;
        let suffixes: &[&str] = match family.kind.as_str() {
            "counter" => &["_total", "_created"],
            "gauge" => &[""],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            other => return Err(format!("unexpected type {other}")),
        };
        let ok = name
            .strip_prefix(family.name.as_str())
            .is_some_and(|s| suffixes.contains(&s));
        if !ok {
            return Err(format!("sample {name} in family {}", family.name));
        }
        let mut keys = HashSet::new();
        for (k, _) in &labels {
            if !valid_name(k) || !keys.insert(k.as_str()) {
                return Err(format!("bad or repeated label {k:?} in {line:?}"));
            }
        }
        if !seen.insert((name.clone(), labels.clone())) {
            return Err(format!("sample {line:?} twice"));
        }
        family.samples.push(TextSample {
            name,
            labels,
            value,
        });
    }
    Ok(families)
}

type SampleLine = (String, Vec<(String, String)>, String);

fn sample_line(line: &str) -> Result<SampleLine, String> {
    let end = line
        .find(['{', ' '])
        .ok_or_else(|| format!("no value in {line:?}"))?;
    let name = &line[..end];
    if !valid_name(name) {
        return Err(format!("bad sample name in {line:?}"));
    }
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = inner
                .split_once("=\"")
                .ok_or_else(|| format!("bad label in {line:?}"))?;
            // The value runs to the first unescaped quote.
            let mut escaped = false;
            let close = after
                .char_indices()
                .find(|&(_, c)| {
                    let end = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    end
                })
                .map(|(i, _)| i)
                .ok_or_else(|| format!("unterminated label value in {line:?}"))?;
            labels.push((key.to_owned(), unescape(&after[..close], true)?));
            inner = &after[close + 1..];
            if let Some(after) = inner.strip_prefix(',') {
                inner = after;
                if inner.starts_with('}') {
                    return Err(format!("a trailing comma in {line:?}"));
                }
            } else if !inner.starts_with('}') {
                return Err(format!("labels not separated in {line:?}"));
            }
        }
    }
    let value = rest
        .strip_prefix(' ')
        .ok_or_else(|| format!("no space before the value in {line:?}"))?;
    if value.contains(' ') {
        return Err(format!("more than a value in {line:?}"));
    }
    Ok((name.to_owned(), labels, value.to_owned()))
}

/// Undoes OpenMetrics escapes: `\\`, `\n`, and `\"` in label values.
fn unescape(s: &str, quotes: bool) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                Some('"') => out.push('"'),
                other => return Err(format!("bad escape \\{other:?} in {s:?}")),
            },
            '"' if quotes => return Err(format!("an unescaped quote in {s:?}")),
            '\n' => return Err(format!("a raw newline in {s:?}")),
            c => out.push(c),
        }
    }
    Ok(out)
}
