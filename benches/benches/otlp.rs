//! OTLP encoding: metricsd's encoder (its series and spans to the official
//! `opentelemetry-proto` messages, then prost) against the OpenTelemetry SDK's path
//! (its `ResourceMetrics` and `SpanData`, converted by `opentelemetry-proto`'s
//! transforms, the code the SDK's OTLP exporter runs, then the same prost encoding),
//! fed the same data in the same run.
//!
//! Run: `cargo bench -p telemetry-benches --bench otlp -- --warm-up-time 1 --measurement-time 3`
//!
//! `metricsd_encoder` is what the exporter runs (`encode_metrics` / `encode_traces`:
//! the request's protobuf bytes written directly into a reused buffer);
//! `metricsd_messages_prost` builds the same request as `opentelemetry-proto` messages
//! and encodes them with prost (the same bytes, checked in metricsd's unit tests).
//!
//! - `otlp_metrics`: 1000 points: 400 counters, 300 gauges and 300 exponential
//!   histograms (20 observations each, 1 to 100 000; at most 160 buckets from scale 10
//!   on both sides), each with its own `route`, `status` and `worker` labels, over 4
//!   services. Throughput is points per second.
//! - `otlp_spans`: 1000 finished spans, each with a parent, a status and two
//!   attributes. Throughput is spans per second.
//!
//! Each iteration builds the request from the data and encodes it to bytes; neither
//! side sends anything.

use std::borrow::Cow;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use metricsd::histogram::{Exponential, Histogram};
use metricsd::spans::{FinishedSpan, Outcome};
use metricsd::{MetricKind, Series, Value};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{
    Aggregation, InMemoryMetricExporter, Instrument, PeriodicReader, SdkMeterProvider, Stream,
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use prost::Message;

const POINTS: usize = 1000;
const SPANS: usize = 1000;
const SERVICES: [&str; 4] = ["checkout", "search", "inventory", "payments"];
const ROUTES: usize = 25;

fn route(i: usize) -> String {
    format!("/api/v1/r{}", i % ROUTES)
}

/// The observations of histogram `i`.
fn observations(i: usize) -> impl Iterator<Item = u64> {
    (0..20u64).map(move |k| 1 + (k * 4999 + i as u64 * 7) % 100_000)
}

fn our_series() -> Vec<Series> {
    let mut out = Vec::with_capacity(POINTS);
    for i in 0..POINTS {
        let service = SERVICES[i % SERVICES.len()];
        let (r, w) = (route(i), i.to_string());
        let labels = [
            ("route", r.as_str()),
            ("status", "200"),
            ("worker", w.as_str()),
        ];
        let s = if i < 400 {
            Series::new(
                service,
                MetricKind::Counter,
                "http.requests",
                &labels,
                Value::Counter {
                    total: 1000 + i as u128,
                },
            )
        } else if i < 700 {
            Series::new(
                service,
                MetricKind::Gauge,
                "queue.depth",
                &labels,
                Value::Gauge {
                    value: Some(i as i64),
                },
            )
        } else {
            let mut h = Exponential::new();
            for v in observations(i) {
                h.record(v);
            }
            Series::new(
                service,
                MetricKind::Histogram,
                "http.latency_ns",
                &labels,
                Value::Histogram(Histogram::Exponential(h)),
            )
        };
        out.push(s);
    }
    out
}

/// The same data recorded through the SDK and collected once.
fn sdk_metrics() -> Vec<opentelemetry_sdk::metrics::data::ResourceMetrics> {
    let exporter = InMemoryMetricExporter::default();
    let mut all = Vec::new();
    for service in SERVICES {
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            // Histograms as exponential histograms of at most 160 buckets starting at
            // scale 10, as metricsd's.
            .with_view(|i: &Instrument| {
                (i.name() == "http.latency_ns")
                    .then(|| {
                        Stream::builder()
                            .with_aggregation(Aggregation::Base2ExponentialHistogram {
                                max_size: 160,
                                max_scale: 10,
                                record_min_max: true,
                            })
                            .build()
                            .ok()
                    })
                    .flatten()
            })
            .with_resource(Resource::builder().with_service_name(service).build())
            .build();
        let meter = provider.meter("metricsd");
        let counter = meter.u64_counter("http.requests").build();
        let gauge = meter.i64_gauge("queue.depth").build();
        let histogram = meter.u64_histogram("http.latency_ns").build();
        for i in (0..POINTS).filter(|i| SERVICES[i % SERVICES.len()] == service) {
            let attrs = [
                KeyValue::new("route", route(i)),
                KeyValue::new("status", "200"),
                KeyValue::new("worker", i.to_string()),
            ];
            if i < 400 {
                counter.add(1000 + i as u64, &attrs);
            } else if i < 700 {
                gauge.record(i as i64, &attrs);
            } else {
                for v in observations(i) {
                    histogram.record(v, &attrs);
                }
            }
        }
        provider.force_flush().expect("collect");
        // The latest collection: this service's cumulative points, once.
        let latest = exporter.get_finished_metrics().expect("collected").pop();
        all.extend(latest);
        provider.shutdown().expect("shutdown");
        exporter.reset();
    }
    all
}

fn our_spans() -> Vec<FinishedSpan> {
    (0..SPANS)
        .map(|i| FinishedSpan {
            service: Arc::from(SERVICES[i % SERVICES.len()]),
            name: Arc::from(if i % 2 == 0 {
                "http.request"
            } else {
                "db.query"
            }),
            trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_0000 + (i as u128 / 2),
            span_id: 0x00f0_67aa_0ba9_0000 + i as u64,
            parent_id: 0x00f0_67aa_0ba9_0000 + (i as u64 & !1),
            flags: 1,
            start_ns: 1_000_000 + i as u64 * 1000,
            end_ns: Some(1_000_500 + i as u64 * 1000),
            outcome: Outcome::Ended(telemetry_abi::SpanStatus::OK),
            attrs: vec![
                (Arc::from("route"), route(i)),
                (Arc::from("rows"), (i % 24).to_string()),
            ],
        })
        .collect()
}

fn sdk_spans() -> Vec<(Resource, Vec<SpanData>)> {
    let ours = our_spans();
    SERVICES
        .iter()
        .map(|service| {
            let resource = Resource::builder().with_service_name(*service).build();
            let spans = ours
                .iter()
                .filter(|s| &*s.service == *service)
                .map(|s| SpanData {
                    span_context: SpanContext::new(
                        TraceId::from_bytes(s.trace_id.to_be_bytes()),
                        SpanId::from_bytes(s.span_id.to_be_bytes()),
                        TraceFlags::SAMPLED,
                        false,
                        TraceState::default(),
                    ),
                    parent_span_id: SpanId::from_bytes(s.parent_id.to_be_bytes()),
                    parent_span_is_remote: false,
                    span_kind: SpanKind::Internal,
                    name: Cow::Owned(s.name.to_string()),
                    start_time: SystemTime::UNIX_EPOCH + Duration::from_nanos(s.start_ns),
                    end_time: SystemTime::UNIX_EPOCH
                        + Duration::from_nanos(s.end_ns.unwrap_or(s.start_ns)),
                    attributes: s
                        .attrs
                        .iter()
                        .map(|(k, v)| KeyValue::new(k.to_string(), v.clone()))
                        .collect(),
                    dropped_attributes_count: 0,
                    events: SpanEvents::default(),
                    links: SpanLinks::default(),
                    status: Status::Ok,
                    instrumentation_scope: InstrumentationScope::builder("metricsd").build(),
                })
                .collect();
            (resource, spans)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let series = our_series();
    let refs: Vec<&Series> = series.iter().collect();
    let sdk = sdk_metrics();
    // The same points on both sides: 1000 data points in the SDK's requests too.
    let sdk_points: usize = sdk
        .iter()
        .map(|rm| {
            ExportMetricsServiceRequest::from(rm)
                .resource_metrics
                .iter()
                .flat_map(|r| &r.scope_metrics)
                .flat_map(|s| &s.metrics)
                .map(|m| {
                    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
                    match &m.data {
                        Some(Data::Sum(d)) => d.data_points.len(),
                        Some(Data::Gauge(d)) => d.data_points.len(),
                        Some(Data::Histogram(d)) => d.data_points.len(),
                        Some(Data::ExponentialHistogram(d)) => d.data_points.len(),
                        _ => 0,
                    }
                })
                .sum::<usize>()
        })
        .sum();
    assert_eq!(sdk_points, POINTS, "the SDK holds the same points");

    let mut g = c.benchmark_group("otlp_metrics");
    g.throughput(Throughput::Elements(POINTS as u64));
    g.bench_function("metricsd_encoder", |b| {
        let mut body = Vec::new();
        b.iter(|| {
            body.clear();
            metricsd::otlp::encode_metrics(black_box(&refs), "host", 1, 2, &mut body);
            black_box(body.len())
        });
    });
    g.bench_function("metricsd_messages_prost", |b| {
        b.iter(|| {
            let req = metricsd::otlp::metrics_request(black_box(&refs), "host", 1, 2);
            black_box(req.encode_to_vec())
        });
    });
    g.bench_function("otel_sdk_transform_prost", |b| {
        b.iter(|| {
            for rm in black_box(&sdk) {
                black_box(ExportMetricsServiceRequest::from(rm).encode_to_vec());
            }
        });
    });
    g.finish();

    let spans = our_spans();
    let span_refs: Vec<&FinishedSpan> = spans.iter().collect();
    let sdk_spans = sdk_spans();
    let resources: Vec<ResourceAttributesWithSchema> = sdk_spans
        .iter()
        .map(|(r, _)| ResourceAttributesWithSchema::from(r))
        .collect();
    let mut g = c.benchmark_group("otlp_spans");
    g.throughput(Throughput::Elements(SPANS as u64));
    g.bench_function("metricsd_encoder", |b| {
        let mut body = Vec::new();
        b.iter(|| {
            body.clear();
            metricsd::otlp::encode_traces(black_box(&span_refs), "host", 0, 0, &mut body);
            black_box(body.len())
        });
    });
    g.bench_function("metricsd_messages_prost", |b| {
        b.iter(|| {
            let req = metricsd::otlp::traces_request(black_box(&span_refs), "host", 0, 0);
            black_box(req.encode_to_vec())
        });
    });
    g.bench_function("otel_sdk_transform_prost", |b| {
        b.iter_batched(
            // The SDK exporter owns its batch; the copy handed to it is not timed.
            || sdk_spans.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>(),
            |batches| {
                for (batch, resource) in batches.into_iter().zip(&resources) {
                    let req = ExportTraceServiceRequest {
                        resource_spans: group_spans_by_resource_and_scope(batch, resource),
                    };
                    black_box(req.encode_to_vec());
                }
            },
            BatchSize::LargeInput,
        );
    });
    g.finish();
}

criterion_group!(benches, bench);

/// `OTLP_PROFILE=metrics|spans` encodes that request `OTLP_PROFILE_N` times (default
/// 100) from metricsd's data and exits: for profilers
/// (`valgrind --tool=callgrind --toggle-collect='*otlp*'`), without the SDK's set-up
/// or the criterion loop.
fn main() {
    if let Ok(what) = std::env::var("OTLP_PROFILE") {
        let n: usize = std::env::var("OTLP_PROFILE_N")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(100);
        let series = our_series();
        let refs: Vec<&Series> = series.iter().collect();
        let spans = our_spans();
        let span_refs: Vec<&FinishedSpan> = spans.iter().collect();
        let mut bytes = 0;
        for _ in 0..n {
            bytes += match what.as_str() {
                "metrics" => profile_metrics(&refs),
                "spans" => profile_spans(&span_refs),
                other => panic!("OTLP_PROFILE={other}: expected metrics or spans"),
            };
        }
        eprintln!("{bytes} bytes");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

#[inline(never)]
fn profile_metrics(refs: &[&Series]) -> usize {
    let mut body = Vec::new();
    metricsd::otlp::encode_metrics(black_box(refs), "host", 1, 2, &mut body);
    body.len()
}

#[inline(never)]
fn profile_spans(refs: &[&FinishedSpan]) -> usize {
    let mut body = Vec::new();
    metricsd::otlp::encode_traces(black_box(refs), "host", 0, 0, &mut body);
    body.len()
}
