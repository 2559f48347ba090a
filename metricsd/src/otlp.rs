//! OTLP/HTTP export: series and spans to an OpenTelemetry collector.
//!
//! Off unless `[otlp] endpoint` (or `metricsd serve --otlp-endpoint`) is set. Each
//! export interval the drain loop hands the changed series and the reported spans to
//! this module's thread through a bounded channel (`otlp.queue_batches`; when it is
//! full the batch is dropped and its points counted, so a collector that never answers
//! costs the drain loop nothing). The thread encodes them as the official
//! `opentelemetry-proto` messages ([`metrics_request`], [`traces_request`]) and `POST`s
//! them to `<endpoint>/v1/metrics` and `<endpoint>/v1/traces` (`Content-Type:
//! application/x-protobuf`). The bytes are what prost writes for those messages; the
//! exporter writes them directly ([`encode_metrics`], [`encode_traces`]), which unit
//! tests compare with prost's encoding byte for byte:
//!
//! - one `ResourceMetrics` / `ResourceSpans` per producer service, with the resource
//!   attributes `service.name` (the kernel-derived service) and `service.instance.id`
//!   (`otlp.instance_id`, by default the host name: metricsd aggregates every process
//!   of a service on its machine, so the machine is the instance);
//! - counters as monotonic cumulative `Sum`s (integers, saturating at `i64::MAX`),
//!   gauges as `Gauge`s (integers, or doubles once a float set or moved them; a gauge
//!   never set has no point), histograms and span durations as cumulative
//!   `ExponentialHistogram`s mapped exactly (scale, zero count, positive and negative
//!   offsets and bucket counts, count, sum, min, max; a name with a configured layout as
//!   a `Histogram` with its explicit bounds); the start time of every cumulative point
//!   is its series' creation (a series that expired and came back starts again);
//! - spans with their trace id, span id, parent span id, W3C flags, start and end
//!   (the producer's `CLOCK_MONOTONIC` moved to the Unix epoch with metricsd's own
//!   clock offset), status (`ok`, `error`, `unset`; orphaned and expired spans are
//!   `error` with the outcome as the status message and an `nexus.span.outcome`
//!   attribute, ending when metricsd reported them) and attributes (string values).
//!
//! Requests are bounded: at most `otlp.max_batch_points` points or spans, and at most
//! `otlp.max_request_bytes` bytes (4 MiB, a collector's default receive limit; an
//! oversized request is split in half until it fits). A request is retried only on a
//! transport error or HTTP 429, 502, 503 or 504, with exponential backoff from
//! `otlp.retry_initial_ms` to `otlp.retry_max_ms` that honours `Retry-After` (seconds,
//! capped at `retry_max_ms`), and given up after `otlp.give_up_ms`; any other status
//! (400, 413, ...) drops it at once. Points and spans count as accepted only from a
//! 2xx answer, less what its `partial_success` says was rejected.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Histogram,
    HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    exponential_histogram_data_point, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use prost::Message;
use telemetry_abi::SpanStatus;

use crate::aggregate::{MetricKind, Series, Value};
use crate::config::OtlpConfig;
use crate::histogram::Histogram as Hist;
use crate::spans::{FinishedSpan, Outcome};

mod wire;

/// The instrumentation scope every metric and span is exported under.
pub const SCOPE_NAME: &str = "metricsd";

/// One export interval's worth, as the drain loop hands it over.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Changed series (cumulative values).
    pub series: Vec<Series>,
    /// Reported spans.
    pub spans: Vec<FinishedSpan>,
    /// The export time, ns since the Unix epoch.
    pub time_unix_ns: u64,
    /// Unix epoch ns minus `CLOCK_MONOTONIC` ns, when the batch was built.
    pub mono_to_unix_ns: i128,
}

/// Which OTLP signal a request carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Signal {
    /// `/v1/metrics`: the unit is a data point.
    Metrics,
    /// `/v1/traces`: the unit is a span.
    Traces,
}

impl Signal {
    /// `metrics` or `traces`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Metrics => "metrics",
            Self::Traces => "traces",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Self::Metrics => "/v1/metrics",
            Self::Traces => "/v1/traces",
        }
    }
}

/// What the exporter has counted, per signal. Every failure, retry and drop is here
/// and exported as a health series.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OtlpStats {
    /// Requests answered 2xx.
    pub requests_ok: BTreeMap<Signal, u64>,
    /// Points or spans accepted (2xx less partial-success rejections).
    pub accepted: BTreeMap<Signal, u64>,
    /// Points or spans the collector rejected in a partial success.
    pub rejected: BTreeMap<Signal, u64>,
    /// Retries, by signal.
    pub retries: BTreeMap<Signal, u64>,
    /// Failed attempts by reason (`transport`, `http_<status>`).
    pub failures: BTreeMap<String, u64>,
    /// Points or spans dropped, by signal and reason (`queue_full`, `http_<status>`,
    /// `gave_up`, `encode`).
    pub dropped: BTreeMap<(Signal, String), u64>,
}

/// State shared by the drain loop, the exporter thread and the daemon handle.
#[derive(Debug)]
pub struct Shared {
    stats: Mutex<OtlpStats>,
    /// Batches handed over and not yet finished (sent, dropped or given up).
    pending: AtomicU64,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut OtlpStats)) {
        f(&mut self.stats.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// The totals.
    pub fn stats(&self) -> OtlpStats {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Batches handed over and not finished yet.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }
}

/// The drain loop's end of the exporter.
#[derive(Debug, Clone)]
pub struct Handoff {
    tx: SyncSender<Batch>,
    shared: Arc<Shared>,
}

impl Handoff {
    /// Hands a batch to the exporter thread; drops (and counts) it when the channel is
    /// full. Never blocks.
    pub fn submit(&self, batch: Batch) {
        if batch.series.is_empty() && batch.spans.is_empty() {
            return;
        }
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        if let Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) = self.tx.try_send(batch)
        {
            self.shared.pending.fetch_sub(1, Ordering::AcqRel);
            let points = b.series.len() as u64;
            let spans = b.spans.len() as u64;
            self.shared.update(|s| {
                *s.dropped
                    .entry((Signal::Metrics, "queue_full".into()))
                    .or_default() += points;
                *s.dropped
                    .entry((Signal::Traces, "queue_full".into()))
                    .or_default() += spans;
            });
        }
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// A channel for `config.queue_batches` batches and the shared state.
pub fn channel(config: &OtlpConfig) -> (Handoff, Receiver<Batch>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_batches.max(1) as usize);
    let shared = Arc::new(Shared {
        stats: Mutex::new(OtlpStats::default()),
        pending: AtomicU64::new(0),
    });
    (Handoff { tx, shared }, rx)
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

fn resource(service: &str, instance: &str) -> Resource {
    Resource {
        attributes: vec![
            kv("service.name", service),
            kv("service.instance.id", instance),
        ],
        ..Default::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: SCOPE_NAME.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..Default::default()
    }
}

/// Encodes series into one metrics request (grouped by service, then metric).
pub fn metrics_request(
    series: &[&Series],
    instance: &str,
    start_unix_ns: u64,
    time_unix_ns: u64,
) -> ExportMetricsServiceRequest {
    let mut by_service: BTreeMap<&str, BTreeMap<(&str, MetricKind), Vec<&Series>>> =
        BTreeMap::new();
    for s in series {
        by_service
            .entry(&s.service)
            .or_default()
            .entry((&s.name, s.kind))
            .or_default()
            .push(s);
    }
    let resource_metrics = by_service
        .into_iter()
        .map(|(service, metrics)| ResourceMetrics {
            resource: Some(resource(service, instance)),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope()),
                metrics: metrics
                    .into_iter()
                    .map(|((name, kind), group)| {
                        metric(name, kind, &group, start_unix_ns, time_unix_ns)
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    ExportMetricsServiceRequest { resource_metrics }
}

/// The start of a series' cumulative value: its creation (a series that expired and
/// came back starts again), else `fallback` (metricsd's start).
fn start_of(s: &Series, fallback: u64) -> u64 {
    if s.created_ns > 0 {
        s.created_ns
    } else {
        fallback
    }
}

fn attributes(s: &Series) -> Vec<KeyValue> {
    s.labels.iter().map(|(k, v)| kv(k, v)).collect()
}

fn metric(name: &str, kind: MetricKind, group: &[&Series], start: u64, time: u64) -> Metric {
    let number = |s: &Series, v: i64| NumberDataPoint {
        attributes: attributes(s),
        start_time_unix_nano: start_of(s, start),
        time_unix_nano: time,
        value: Some(number_data_point::Value::AsInt(v)),
        ..Default::default()
    };
    let data = match kind {
        MetricKind::Counter => metric::Data::Sum(Sum {
            data_points: group
                .iter()
                .filter_map(|s| match s.value {
                    Value::Counter { total } => {
                        Some(number(s, i64::try_from(total).unwrap_or(i64::MAX)))
                    }
                    _ => None,
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        }),
        MetricKind::Gauge => metric::Data::Gauge(Gauge {
            data_points: group
                .iter()
                .filter_map(|s| match s.value {
                    Value::Gauge { value: Some(v) } => Some(number(s, v)),
                    Value::FloatGauge { value } => Some(NumberDataPoint {
                        value: Some(number_data_point::Value::AsDouble(value)),
                        ..number(s, 0)
                    }),
                    _ => None,
                })
                .collect(),
        }),
        MetricKind::Histogram | MetricKind::SpanDuration => histogram_data(group, start, time),
    };
    Metric {
        name: name.to_owned(),
        unit: if kind == MetricKind::SpanDuration {
            "ns".to_owned()
        } else {
            String::new()
        },
        data: Some(data),
        ..Default::default()
    }
}

/// Histogram points: `ExponentialHistogram` for the exponential series (scale, zero
/// count, positive and negative offsets and counts, count, sum, min, max, exactly as
/// metricsd holds them), `Histogram` with explicit bounds for a name given a layout in
/// the config (every series of a name has the same kind of layout).
fn histogram_data(group: &[&Series], start: u64, time: u64) -> metric::Data {
    let explicit = group
        .iter()
        .any(|s| matches!(s.value, Value::Histogram(Hist::Explicit(_))));
    if explicit {
        return metric::Data::Histogram(Histogram {
            data_points: group
                .iter()
                .filter_map(|s| match &s.value {
                    Value::Histogram(all @ Hist::Explicit(h)) => Some(HistogramDataPoint {
                        attributes: attributes(s),
                        start_time_unix_nano: start_of(s, start),
                        time_unix_nano: time,
                        count: all.count(),
                        sum: Some(all.sum()),
                        bucket_counts: h.counts().to_vec(),
                        explicit_bounds: h.bounds().iter().map(|&b| b as f64).collect(),
                        min: all.min(),
                        max: all.max(),
                        ..Default::default()
                    }),
                    _ => None,
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        });
    }
    let buckets = |b: &crate::histogram::Buckets| exponential_histogram_data_point::Buckets {
        offset: b.offset(),
        bucket_counts: b.counts().to_vec(),
    };
    metric::Data::ExponentialHistogram(ExponentialHistogram {
        data_points: group
            .iter()
            .filter_map(|s| match &s.value {
                Value::Histogram(Hist::Exponential(h)) => Some(ExponentialHistogramDataPoint {
                    attributes: attributes(s),
                    start_time_unix_nano: start_of(s, start),
                    time_unix_nano: time,
                    count: h.count(),
                    sum: Some(h.sum()),
                    scale: h.scale(),
                    zero_count: h.zero_count(),
                    positive: Some(buckets(h.positive())),
                    negative: Some(buckets(h.negative())),
                    min: h.min(),
                    max: h.max(),
                    zero_threshold: 0.0,
                    ..Default::default()
                }),
                _ => None,
            })
            .collect(),
        aggregation_temporality: AggregationTemporality::Cumulative as i32,
    })
}

/// What a reported span's OTLP fields are, beyond what it carries as is.
struct SpanFields<'a> {
    start: u64,
    end: u64,
    /// `status::StatusCode` as its number.
    code: i32,
    message: &'a str,
    /// The `nexus.span.outcome` attribute of an orphaned or expired span.
    outcome: Option<&'static str>,
}

impl SpanFields<'_> {
    fn of(s: &FinishedSpan, mono_to_unix_ns: i128, reported_unix_ns: u64) -> Self {
        let to_unix = |mono: u64| -> u64 {
            u64::try_from((i128::from(mono) + mono_to_unix_ns).max(0)).unwrap_or(u64::MAX)
        };
        let start = to_unix(s.start_ns);
        match s.outcome {
            Outcome::Ended(st) => SpanFields {
                start,
                end: to_unix(s.end_ns.unwrap_or(s.start_ns)),
                code: match st {
                    SpanStatus::OK => status::StatusCode::Ok,
                    SpanStatus::ERROR => status::StatusCode::Error,
                    _ => status::StatusCode::Unset,
                } as i32,
                message: "",
                outcome: None,
            },
            Outcome::Orphaned | Outcome::Expired => SpanFields {
                start,
                end: reported_unix_ns.max(start),
                code: status::StatusCode::Error as i32,
                message: s.outcome.as_str(),
                outcome: Some(s.outcome.as_str()),
            },
        }
    }
}

/// The OTLP span of a reported span.
pub fn otlp_span(s: &FinishedSpan, mono_to_unix_ns: i128, reported_unix_ns: u64) -> Span {
    let f = SpanFields::of(s, mono_to_unix_ns, reported_unix_ns);
    let mut attributes: Vec<KeyValue> = s.attrs.iter().map(|(k, v)| kv(k, v)).collect();
    if let Some(outcome) = f.outcome {
        attributes.push(kv("nexus.span.outcome", outcome));
    }
    Span {
        trace_id: s.trace_id.to_be_bytes().to_vec(),
        span_id: s.span_id.to_be_bytes().to_vec(),
        parent_span_id: if s.parent_id == 0 {
            Vec::new()
        } else {
            s.parent_id.to_be_bytes().to_vec()
        },
        flags: u32::from(s.flags),
        name: s.name.to_string(),
        kind: span::SpanKind::Internal as i32,
        start_time_unix_nano: f.start,
        end_time_unix_nano: f.end,
        attributes,
        status: Some(Status {
            message: f.message.to_owned(),
            code: f.code,
        }),
        ..Default::default()
    }
}

/// Encodes spans into one traces request (grouped by service).
pub fn traces_request(
    spans: &[&FinishedSpan],
    instance: &str,
    mono_to_unix_ns: i128,
    reported_unix_ns: u64,
) -> ExportTraceServiceRequest {
    let mut by_service: BTreeMap<&str, Vec<Span>> = BTreeMap::new();
    for s in spans {
        by_service.entry(&s.service).or_default().push(otlp_span(
            s,
            mono_to_unix_ns,
            reported_unix_ns,
        ));
    }
    ExportTraceServiceRequest {
        resource_spans: by_service
            .into_iter()
            .map(|(service, spans)| ResourceSpans {
                resource: Some(resource(service, instance)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope()),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

/// Appends to `out` the protobuf encoding of
/// `metrics_request(series, instance, start_unix_ns, time_unix_ns)`, byte for byte what
/// prost writes for it, without building the messages.
pub fn encode_metrics(
    series: &[&Series],
    instance: &str,
    start_unix_ns: u64,
    time_unix_ns: u64,
    out: &mut Vec<u8>,
) {
    wire::metrics(series, instance, start_unix_ns, time_unix_ns, out);
}

/// Appends to `out` the protobuf encoding of
/// `traces_request(spans, instance, mono_to_unix_ns, reported_unix_ns)`, byte for byte
/// what prost writes for it, without building the messages.
pub fn encode_traces(
    spans: &[&FinishedSpan],
    instance: &str,
    mono_to_unix_ns: i128,
    reported_unix_ns: u64,
    out: &mut Vec<u8>,
) {
    wire::traces(spans, instance, mono_to_unix_ns, reported_unix_ns, out);
}

/// An encoded request.
#[derive(Debug)]
pub struct Request {
    /// Which endpoint.
    pub signal: Signal,
    /// The protobuf body.
    pub body: Vec<u8>,
    /// Points or spans in it.
    pub items: u64,
}

/// Splits `items` into requests of at most `max_items` items and `max_bytes` bytes
/// (halving a chunk that encodes too large; a single item too large is dropped and
/// counted by the caller as `encode`).
fn split<T>(
    items: &[T],
    max_items: usize,
    max_bytes: usize,
    encode: &dyn Fn(&[T]) -> Vec<u8>,
    out: &mut Vec<(Vec<u8>, u64)>,
    too_big: &mut u64,
) {
    for chunk in items.chunks(max_items.max(1)) {
        let body = encode(chunk);
        if body.len() <= max_bytes {
            out.push((body, chunk.len() as u64));
        } else if chunk.len() == 1 {
            *too_big += 1;
        } else {
            let half = chunk.len() / 2;
            split(&chunk[..half], half, max_bytes, encode, out, too_big);
            split(&chunk[half..], half, max_bytes, encode, out, too_big);
        }
    }
}

/// Encodes a batch into bounded requests; returns them and the items too large to
/// send alone (per signal).
pub fn encode(
    batch: &Batch,
    instance: &str,
    start_unix_ns: u64,
    max_items: usize,
    max_bytes: usize,
) -> (Vec<Request>, u64, u64) {
    let mut out = Vec::new();
    // A gauge never set has no point: it is not an item of any request.
    let series: Vec<&Series> = batch
        .series
        .iter()
        .filter(|s| !matches!(s.value, Value::Gauge { value: None }))
        .collect();
    let mut bodies = Vec::new();
    let mut big_points = 0;
    split(
        &series,
        max_items,
        max_bytes,
        &|c: &[&Series]| {
            let mut body = Vec::new();
            encode_metrics(c, instance, start_unix_ns, batch.time_unix_ns, &mut body);
            body
        },
        &mut bodies,
        &mut big_points,
    );
    out.extend(bodies.drain(..).map(|(body, items)| Request {
        signal: Signal::Metrics,
        body,
        items,
    }));
    let spans: Vec<&FinishedSpan> = batch.spans.iter().collect();
    let mut big_spans = 0;
    split(
        &spans,
        max_items,
        max_bytes,
        &|c: &[&FinishedSpan]| {
            let mut body = Vec::new();
            encode_traces(
                c,
                instance,
                batch.mono_to_unix_ns,
                batch.time_unix_ns,
                &mut body,
            );
            body
        },
        &mut bodies,
        &mut big_spans,
    );
    out.extend(bodies.drain(..).map(|(body, items)| Request {
        signal: Signal::Traces,
        body,
        items,
    }));
    (out, big_points, big_spans)
}

/// How one attempt went.
enum Attempt {
    /// 2xx; the number rejected by a partial success.
    Accepted(u64),
    /// Worth retrying, after at least this long (a `Retry-After`).
    Retry(String, Option<Duration>),
    /// Not worth retrying.
    Fatal(String),
}

fn attempt(agent: &ureq::Agent, url: &str, req: &Request) -> Attempt {
    let response = agent
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .send(&req.body[..]);
    let mut response = match response {
        Ok(r) => r,
        Err(_) => return Attempt::Retry("transport".into(), None),
    };
    let status = response.status().as_u16();
    let reason = format!("http_{status}");
    if (200..300).contains(&status) {
        let body = response
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .unwrap_or_default();
        let rejected = match req.signal {
            Signal::Metrics => ExportMetricsServiceResponse::decode(&body[..])
                .ok()
                .and_then(|r| r.partial_success)
                .map_or(0, |p| p.rejected_data_points),
            Signal::Traces => ExportTraceServiceResponse::decode(&body[..])
                .ok()
                .and_then(|r| r.partial_success)
                .map_or(0, |p| p.rejected_spans),
        };
        return Attempt::Accepted(u64::try_from(rejected).unwrap_or(0).min(req.items));
    }
    match status {
        429 | 502 | 503 | 504 => {
            let after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            Attempt::Retry(reason, after)
        }
        _ => Attempt::Fatal(reason),
    }
}

/// Sends `req`, retrying as the module docs say, unless `stop` says the daemon is
/// stopping (then one attempt is made).
fn send(
    agent: &ureq::Agent,
    base: &str,
    req: &Request,
    config: &OtlpConfig,
    shared: &Shared,
    stopping: &dyn Fn() -> bool,
) {
    let url = format!("{base}{}", req.signal.path());
    let started = Instant::now();
    let mut backoff = Duration::from_millis(config.retry_initial_ms);
    let max = Duration::from_millis(config.retry_max_ms);
    let give_up = Duration::from_millis(config.give_up_ms);
    loop {
        match attempt(agent, &url, req) {
            Attempt::Accepted(rejected) => {
                shared.update(|s| {
                    *s.requests_ok.entry(req.signal).or_default() += 1;
                    *s.accepted.entry(req.signal).or_default() += req.items - rejected;
                    *s.rejected.entry(req.signal).or_default() += rejected;
                });
                return;
            }
            Attempt::Fatal(reason) => {
                shared.update(|s| {
                    *s.failures.entry(reason.clone()).or_default() += 1;
                    *s.dropped.entry((req.signal, reason)).or_default() += req.items;
                });
                return;
            }
            Attempt::Retry(reason, after) => {
                shared.update(|s| *s.failures.entry(reason).or_default() += 1);
                let wait = after.unwrap_or(backoff).min(max);
                if stopping() || started.elapsed() + wait > give_up {
                    shared.update(|s| {
                        *s.dropped.entry((req.signal, "gave_up".into())).or_default() += req.items;
                    });
                    return;
                }
                shared.update(|s| *s.retries.entry(req.signal).or_default() += 1);
                std::thread::sleep(wait);
                backoff = (backoff * 2).min(max);
            }
        }
    }
}

/// The default `service.instance.id`: the host name.
pub fn default_instance_id() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// Runs the exporter thread until every [`Handoff`] is gone and the channel is empty,
/// or `stopping` says so (then what is queued gets one attempt each).
pub fn run(
    rx: Receiver<Batch>,
    shared: Arc<Shared>,
    config: OtlpConfig,
    start_unix_ns: u64,
    stopping: Arc<dyn Fn() -> bool + Send + Sync>,
) {
    let Some(base) = config.endpoint.clone() else {
        return;
    };
    let base = base.trim_end_matches('/').to_owned();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(config.timeout_ms)))
        .http_status_as_error(false)
        .build()
        .into();
    let instance = config
        .instance_id
        .clone()
        .unwrap_or_else(default_instance_id);
    loop {
        let batch = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(b) => b,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let (requests, big_points, big_spans) = encode(
            &batch,
            &instance,
            start_unix_ns,
            config.max_batch_points as usize,
            config.max_request_bytes as usize,
        );
        if big_points + big_spans > 0 {
            shared.update(|s| {
                *s.dropped
                    .entry((Signal::Metrics, "encode".into()))
                    .or_default() += big_points;
                *s.dropped
                    .entry((Signal::Traces, "encode".into()))
                    .or_default() += big_spans;
            });
        }
        for req in &requests {
            send(&agent, &base, req, &config, &shared, &*stopping);
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::{Exponential, Histogram as H};

    fn series() -> Vec<Series> {
        let c = MetricKind::Counter;
        let g = MetricKind::Gauge;
        let mut exp = Exponential::new();
        for v in [0u64, 1, 2, 3, 1000, 1 << 40, u64::MAX] {
            exp.record(v);
        }
        for v in [-2.5, -1e-9, 0.0, 7.0] {
            exp.record_f64(v).expect("finite");
        }
        let mut small = Exponential::new();
        small.record(5);
        let mut explicit = H::new(Some(std::sync::Arc::from(&[10u64, 100, 1 << 60][..])));
        for v in [1u64, 10, 11, 5000] {
            explicit.record(v);
        }
        let mut created = Series::new("web", c, "late", &[], Value::Counter { total: 1 });
        created.created_ns = 123_456_789;
        vec![
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
                &[("route", ""), ("", "x")],
                Value::Counter { total: 0 },
            ),
            Series::new(
                "api",
                c,
                "http.requests",
                &[("é", "\"q\"")],
                Value::Counter { total: u128::MAX },
            ),
            created,
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
                &[("w", "0")],
                Value::Gauge { value: Some(0) },
            ),
            Series::new(
                "web",
                g,
                "queue.depth",
                &[("w", "1")],
                Value::Gauge { value: None },
            ),
            Series::new("web", g, "temp", &[], Value::FloatGauge { value: 0.5 }),
            Series::new(
                "web",
                MetricKind::Histogram,
                "lat",
                &[("k", "v")],
                Value::Histogram(H::Exponential(exp)),
            ),
            Series::new(
                "web",
                MetricKind::Histogram,
                "lat",
                &[],
                Value::Histogram(H::Exponential(Exponential::new())),
            ),
            Series::new(
                "web",
                MetricKind::Histogram,
                "lat",
                &[("k", "w")],
                Value::Histogram(H::Exponential(small)),
            ),
            Series::new(
                "api",
                MetricKind::Histogram,
                "size",
                &[],
                Value::Histogram(explicit),
            ),
            Series::new(
                "api",
                MetricKind::Histogram,
                "size",
                &[("x", "y")],
                Value::Histogram(H::new(Some(std::sync::Arc::from(&[1u64][..])))),
            ),
            Series::new(
                "api",
                MetricKind::SpanDuration,
                "GET /",
                &[("status", "ok")],
                Value::Histogram(H::Exponential(Exponential::new())),
            ),
        ]
    }

    fn spans() -> Vec<FinishedSpan> {
        let base = FinishedSpan {
            service: std::sync::Arc::from("web"),
            name: std::sync::Arc::from("GET /"),
            trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
            span_id: 0x00f0_67aa_0ba9_02b7,
            parent_id: 0,
            flags: 1,
            start_ns: 1_000,
            end_ns: Some(2_500),
            outcome: Outcome::Ended(SpanStatus::OK),
            attrs: vec![(std::sync::Arc::from("route"), "/a".to_owned())],
        };
        vec![
            base.clone(),
            FinishedSpan {
                parent_id: 7,
                flags: 0,
                outcome: Outcome::Ended(SpanStatus::ERROR),
                attrs: Vec::new(),
                ..base.clone()
            },
            FinishedSpan {
                service: std::sync::Arc::from("api"),
                name: std::sync::Arc::from(""),
                outcome: Outcome::Ended(SpanStatus::UNSET),
                start_ns: 0,
                end_ns: Some(0),
                attrs: vec![(std::sync::Arc::from(""), String::new())],
                ..base.clone()
            },
            FinishedSpan {
                outcome: Outcome::Orphaned,
                end_ns: None,
                ..base.clone()
            },
            FinishedSpan {
                outcome: Outcome::Expired,
                end_ns: None,
                start_ns: u64::MAX,
                ..base
            },
        ]
    }

    #[test]
    fn direct_metrics_encoding_is_prosts_byte_for_byte() {
        let all = series();
        let refs: Vec<&Series> = all.iter().collect();
        for (start, time) in [(1, 2), (0, 0), (u64::MAX, 1 << 40)] {
            let mut ours = Vec::new();
            encode_metrics(&refs, "host-1", start, time, &mut ours);
            assert_eq!(
                ours,
                metrics_request(&refs, "host-1", start, time).encode_to_vec()
            );
        }
        // Each series alone, and none.
        for s in &refs {
            let mut ours = Vec::new();
            encode_metrics(&[*s], "", 5, 6, &mut ours);
            assert_eq!(
                ours,
                metrics_request(&[*s], "", 5, 6).encode_to_vec(),
                "{s:?}"
            );
        }
        let mut ours = Vec::new();
        encode_metrics(&[], "h", 1, 2, &mut ours);
        assert_eq!(ours, metrics_request(&[], "h", 1, 2).encode_to_vec());
        // Big enough for multi-byte lengths at every level.
        let many: Vec<Series> = (0..3000)
            .map(|i| {
                Series::new(
                    ["a", "b"][i % 2],
                    MetricKind::Counter,
                    "n",
                    &[("worker", &i.to_string()), ("pad", &"x".repeat(i % 300))],
                    Value::Counter { total: i as u128 },
                )
            })
            .collect();
        let refs: Vec<&Series> = many.iter().collect();
        let mut ours = Vec::new();
        encode_metrics(&refs, "host", 1, 2, &mut ours);
        assert_eq!(ours, metrics_request(&refs, "host", 1, 2).encode_to_vec());
    }

    #[test]
    fn direct_traces_encoding_is_prosts_byte_for_byte() {
        let all = spans();
        let refs: Vec<&FinishedSpan> = all.iter().collect();
        for (offset, reported) in [
            (0, 0),
            (1_700_000_000_000_000_000, 1_700_000_000_000_000_500),
            (-5_000, 3),
            (i128::from(u64::MAX), u64::MAX),
        ] {
            let mut ours = Vec::new();
            encode_traces(&refs, "host-1", offset, reported, &mut ours);
            assert_eq!(
                ours,
                traces_request(&refs, "host-1", offset, reported).encode_to_vec()
            );
        }
        let many: Vec<FinishedSpan> = (0..3000u64)
            .map(|i| FinishedSpan {
                span_id: i + 1,
                attrs: vec![(std::sync::Arc::from("pad"), "y".repeat(i as usize % 200))],
                ..all[(i % 5) as usize].clone()
            })
            .collect();
        let refs: Vec<&FinishedSpan> = many.iter().collect();
        let mut ours = Vec::new();
        encode_traces(&refs, "host", 10, 20, &mut ours);
        assert_eq!(ours, traces_request(&refs, "host", 10, 20).encode_to_vec());
    }
}
