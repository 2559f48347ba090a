//! `otlp_roundtrip`: metricsd's OTLP encoder (`metricsd::otlp::encode`) on any series
//! and spans, with any request bounds, decoded back with prost into the official
//! `opentelemetry-proto` messages.
//!
//! Every request decodes; its body is within `max_bytes` and its item count within
//! `max_items` and equal to the points or spans the body holds; each resource names
//! its service and instance once per request, under the `metricsd` scope; every series
//! (an unset gauge aside) is one point and every span one span, across the requests,
//! exactly once, unless it alone encodes past `max_bytes`, which is counted instead.
//! Each point equals what the module's documentation predicts from the series alone:
//! counters as monotonic cumulative integer sums (saturating at `i64::MAX`), gauges as
//! integers or doubles (bit for bit), exponential histograms with the bucket of every
//! observation, explicit ones with their bounds and per-bucket counts, count, sum, min
//! and max, the start time the series' creation. Each span carries its ids, parent,
//! flags, name, times moved to the Unix epoch, status and attributes.

use std::collections::HashMap;

use metricsd::aggregate::{MetricKind, Series, Value};
use metricsd::histogram::{Histogram, index, index_u64};
use metricsd::otlp::{self, Batch, SCOPE_NAME, Signal};
use metricsd::spans::{FinishedSpan, Outcome};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, metric::Data, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{Span, span, status};
use prost::Message;
use telemetry_abi::SpanStatus;

use crate::input::Input;
use crate::series::{Generated, Observation, SERVICES, generate};

const INSTANCE: &str = "host-1";
const START: u64 = 1_000;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let generated = generate(&mut input);
    let spans: Vec<FinishedSpan> = (0..input.below(8)).map(|_| finished(&mut input)).collect();
    let batch = Batch {
        series: generated.iter().map(|g| g.series.clone()).collect(),
        spans,
        time_unix_ns: input.u64(),
        mono_to_unix_ns: i128::from(input.u64() as i64) * i128::from(input.below(3)),
    };
    let max_items = usize::from(input.below(16));
    let max_bytes = match input.below(4) {
        0 => usize::from(input.u16()),
        _ => 4 << 20,
    };
    let (requests, big_points, big_spans) =
        otlp::encode(&batch, INSTANCE, START, max_items, max_bytes);

    let mut points: Vec<(String, Point)> = Vec::new();
    let mut spans: Vec<(String, Span)> = Vec::new();
    for r in &requests {
        assert!(r.body.len() <= max_bytes, "{} bytes", r.body.len());
        assert!(r.items as usize <= max_items.max(1), "{} items", r.items);
        assert!(r.items > 0, "an empty request");
        let before = (points.len(), spans.len());
        match r.signal {
            Signal::Metrics => metrics(&r.body, &mut points),
            Signal::Traces => traces(&r.body, &mut spans),
        }
        let got = (points.len() - before.0) + (spans.len() - before.1);
        assert_eq!(
            r.items, got as u64,
            "items counted against those in the body"
        );
    }

    // Every exported series is one point, unless it alone is too large.
    let exported: Vec<&Generated> = generated
        .iter()
        .filter(|g| !matches!(g.series.value, Value::Gauge { value: None }))
        .collect();
    let mut too_big = 0;
    for g in &exported {
        let want = point(g, batch.time_unix_ns);
        let found: Vec<usize> = points
            .iter()
            .enumerate()
            .filter(|(_, (service, p))| **service == *g.series.service && p.same_series(&want))
            .map(|(i, _)| i)
            .collect();
        match found[..] {
            [i] => {
                let (_, got) = points.swap_remove(i);
                assert_eq!(got, want, "{:?}", g.series);
            }
            [] => {
                let alone =
                    otlp::metrics_request(&[&g.series], INSTANCE, START, batch.time_unix_ns);
                assert!(
                    alone.encoded_len() > max_bytes,
                    "{:?} missing, though it fits",
                    g.series
                );
                too_big += 1;
            }
            _ => panic!("{:?} exported {} times", g.series, found.len()),
        }
    }
    assert!(points.is_empty(), "points of no series: {points:?}");
    assert_eq!(big_points, too_big, "points too large to send, counted");

    let mut too_big = 0;
    for s in &batch.spans {
        let want = expected_span(s, batch.mono_to_unix_ns, batch.time_unix_ns);
        match spans
            .iter()
            .position(|(svc, got)| **svc == *s.service && *got == want)
        {
            Some(i) => {
                spans.swap_remove(i);
            }
            None => {
                let alone =
                    otlp::traces_request(&[s], INSTANCE, batch.mono_to_unix_ns, batch.time_unix_ns);
                assert!(
                    alone.encoded_len() > max_bytes,
                    "{s:?} missing or wrong:\n{want:?}\n{spans:?}"
                );
                too_big += 1;
            }
        }
    }
    assert!(spans.is_empty(), "spans of no input: {spans:?}");
    assert_eq!(big_spans, too_big, "spans too large to send, counted");
}

fn string(kv: &KeyValue) -> (String, String) {
    let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        other => panic!("{}: not a string: {other:?}", kv.key),
    };
    (kv.key.clone(), value)
}

/// The resource's service, checking its attributes.
fn service(resource: Option<&Resource>) -> String {
    let r = resource.unwrap_or_else(|| panic!("a resource"));
    let attrs: Vec<(String, String)> = r.attributes.iter().map(string).collect();
    match &attrs[..] {
        [(k1, service), (k2, instance)]
            if k1 == "service.name" && k2 == "service.instance.id" && instance == INSTANCE =>
        {
            assert!(SERVICES.contains(&service.as_str()), "{service}");
            service.clone()
        }
        other => panic!("resource attributes {other:?}"),
    }
}

/// One data point, with what identifies its series.
#[derive(Debug, PartialEq)]
struct Point {
    name: String,
    unit: String,
    attributes: Vec<(String, String)>,
    start: u64,
    time: u64,
    data: PointData,
}

#[derive(Debug, PartialEq)]
enum PointData {
    /// A monotonic cumulative sum.
    Sum(i64),
    Gauge(i64),
    /// Bits, so that NaN equals itself.
    GaugeF64(u64),
    Exponential {
        count: u64,
        sum: Option<u64>,
        scale: i32,
        zero_count: u64,
        positive: (i32, Vec<u64>),
        negative: (i32, Vec<u64>),
        min: Option<f64>,
        max: Option<f64>,
    },
    Explicit {
        count: u64,
        sum: Option<u64>,
        counts: Vec<u64>,
        bounds: Vec<u64>,
        min: Option<f64>,
        max: Option<f64>,
    },
}

impl Point {
    fn same_series(&self, other: &Self) -> bool {
        self.name == other.name
            && self.unit == other.unit
            && self.attributes == other.attributes
            && std::mem::discriminant(&self.data) == std::mem::discriminant(&other.data)
    }
}

fn bits(v: Option<f64>) -> Option<u64> {
    v.map(f64::to_bits)
}

/// Buckets without the empty ones at either end (which say nothing).
fn trimmed(b: &Buckets) -> (i32, Vec<u64>) {
    let counts = &b.bucket_counts;
    let Some(first) = counts.iter().position(|&c| c > 0) else {
        return (0, Vec::new());
    };
    let last = counts.iter().rposition(|&c| c > 0).unwrap_or(first);
    let offset = i32::try_from(first).map_or(i32::MAX, |f| b.offset.saturating_add(f));
    (offset, counts[first..=last].to_vec())
}

fn metrics(body: &[u8], out: &mut Vec<(String, Point)>) {
    let req = ExportMetricsServiceRequest::decode(body).unwrap_or_else(|e| panic!("{e}"));
    let mut services = Vec::new();
    for rm in &req.resource_metrics {
        let service = service(rm.resource.as_ref());
        services.push(service.clone());
        assert_eq!(rm.scope_metrics.len(), 1);
        let sm = &rm.scope_metrics[0];
        assert_eq!(sm.scope.as_ref().map(|s| s.name.as_str()), Some(SCOPE_NAME));
        let mut names = Vec::new();
        for m in &sm.metrics {
            let data = m
                .data
                .as_ref()
                .unwrap_or_else(|| panic!("{}: no data", m.name));
            names.push((m.name.clone(), m.unit.clone(), std::mem::discriminant(data)));
            let cumulative = AggregationTemporality::Cumulative as i32;
            let mut push = |attributes: &[KeyValue], start, time, data| {
                out.push((
                    service.clone(),
                    Point {
                        name: m.name.clone(),
                        unit: m.unit.clone(),
                        attributes: attributes.iter().map(string).collect(),
                        start,
                        time,
                        data,
                    },
                ))
            };
            match data {
                Data::Sum(s) => {
                    assert!(s.is_monotonic && s.aggregation_temporality == cumulative);
                    for p in &s.data_points {
                        let Some(number_data_point::Value::AsInt(v)) = p.value else {
                            panic!("a sum of {:?}", p.value);
                        };
                        push(
                            &p.attributes,
                            p.start_time_unix_nano,
                            p.time_unix_nano,
                            PointData::Sum(v),
                        );
                    }
                }
                Data::Gauge(g) => {
                    for p in &g.data_points {
                        let data = match p.value {
                            Some(number_data_point::Value::AsInt(v)) => PointData::Gauge(v),
                            Some(number_data_point::Value::AsDouble(v)) => {
                                PointData::GaugeF64(v.to_bits())
                            }
                            None => panic!("a gauge point without a value"),
                        };
                        push(
                            &p.attributes,
                            p.start_time_unix_nano,
                            p.time_unix_nano,
                            data,
                        );
                    }
                }
                Data::ExponentialHistogram(h) => {
                    assert_eq!(h.aggregation_temporality, cumulative);
                    for p in &h.data_points {
                        assert_eq!(p.zero_threshold, 0.0);
                        let side = |b: Option<&Buckets>| b.map_or((0, Vec::new()), trimmed);
                        push(
                            &p.attributes,
                            p.start_time_unix_nano,
                            p.time_unix_nano,
                            PointData::Exponential {
                                count: p.count,
                                sum: bits(p.sum),
                                scale: p.scale,
                                zero_count: p.zero_count,
                                positive: side(p.positive.as_ref()),
                                negative: side(p.negative.as_ref()),
                                min: p.min,
                                max: p.max,
                            },
                        );
                    }
                }
                Data::Histogram(h) => {
                    assert_eq!(h.aggregation_temporality, cumulative);
                    for p in &h.data_points {
                        push(
                            &p.attributes,
                            p.start_time_unix_nano,
                            p.time_unix_nano,
                            PointData::Explicit {
                                count: p.count,
                                sum: bits(p.sum),
                                counts: p.bucket_counts.clone(),
                                bounds: p.explicit_bounds.iter().map(|b| b.to_bits()).collect(),
                                min: p.min,
                                max: p.max,
                            },
                        );
                    }
                }
                Data::Summary(_) => panic!("a summary"),
            }
        }
        for (i, a) in names.iter().enumerate() {
            assert!(
                !names[..i].contains(a),
                "a metric twice in one resource: {a:?}"
            );
        }
    }
    let n = services.len();
    services.sort();
    services.dedup();
    assert_eq!(services.len(), n, "a service twice in one request");
}

fn traces(body: &[u8], out: &mut Vec<(String, Span)>) {
    let req = ExportTraceServiceRequest::decode(body).unwrap_or_else(|e| panic!("{e}"));
    let mut services = Vec::new();
    for rs in &req.resource_spans {
        let service = service(rs.resource.as_ref());
        services.push(service.clone());
        assert_eq!(rs.scope_spans.len(), 1);
        let ss = &rs.scope_spans[0];
        assert_eq!(ss.scope.as_ref().map(|s| s.name.as_str()), Some(SCOPE_NAME));
        out.extend(ss.spans.iter().map(|s| (service.clone(), s.clone())));
    }
    let n = services.len();
    services.sort();
    services.dedup();
    assert_eq!(services.len(), n, "a service twice in one request");
}

/// The point the documentation predicts for a series, from its observations.
fn point(g: &Generated, time: u64) -> Point {
    let s: &Series = &g.series;
    let data = match &s.value {
        Value::Counter { total } => PointData::Sum(i64::try_from(*total).unwrap_or(i64::MAX)),
        Value::Gauge { value } => PointData::Gauge(value.unwrap_or_else(|| panic!("unset"))),
        Value::FloatGauge { value } => PointData::GaugeF64(value.to_bits()),
        Value::Histogram(h) => histogram(h, &g.observations),
    };
    Point {
        name: s.name.to_string(),
        unit: if s.kind == MetricKind::SpanDuration {
            "ns"
        } else {
            ""
        }
        .to_owned(),
        attributes: s.labels.to_vec(),
        start: if s.created_ns > 0 {
            s.created_ns
        } else {
            START
        },
        time,
        data,
    }
}

fn as_f64(o: Observation) -> f64 {
    match o {
        Observation::Int(v) => v as f64,
        Observation::Float(v) => v,
    }
}

fn histogram(h: &Histogram, observations: &[Observation]) -> PointData {
    let count = observations.len() as u64;
    let min = observations.iter().map(|&o| as_f64(o)).reduce(f64::min);
    let max = observations.iter().map(|&o| as_f64(o)).reduce(f64::max);
    match h {
        Histogram::Explicit(e) => {
            let bounds = e.bounds();
            let mut counts = vec![0; bounds.len() + 1];
            for o in observations {
                let Observation::Int(v) = *o else {
                    panic!("explicit layouts get integers")
                };
                counts[bounds.iter().position(|&b| v <= b).unwrap_or(bounds.len())] += 1;
            }
            PointData::Explicit {
                count,
                sum: Some(h.sum().to_bits()),
                counts,
                bounds: bounds.iter().map(|&b| (b as f64).to_bits()).collect(),
                min,
                max,
            }
        }
        Histogram::Exponential(e) => {
            let scale = e.scale();
            let mut positive: HashMap<i32, u64> = HashMap::new();
            let mut negative: HashMap<i32, u64> = HashMap::new();
            let mut zero_count = 0;
            for &o in observations {
                let (side, i) = match o {
                    Observation::Int(0) => {
                        zero_count += 1;
                        continue;
                    }
                    Observation::Float(0.0) => {
                        zero_count += 1;
                        continue;
                    }
                    Observation::Int(v) => (&mut positive, index_u64(v, scale)),
                    Observation::Float(v) if v < 0.0 => (&mut negative, index(-v, scale)),
                    Observation::Float(v) => (&mut positive, index(v, scale)),
                };
                *side
                    .entry(i.unwrap_or_else(|| panic!("no index for {o:?}")))
                    .or_insert(0) += 1;
            }
            // Dense from the lowest bucket holding an observation; the encoder may
            // start lower or end higher with empty buckets, so compare trimmed.
            let dense = |m: &HashMap<i32, u64>| -> (i32, Vec<u64>) {
                let (Some(&lo), Some(&hi)) = (m.keys().min(), m.keys().max()) else {
                    return (0, Vec::new());
                };
                (
                    lo,
                    (lo..=hi).map(|i| m.get(&i).copied().unwrap_or(0)).collect(),
                )
            };
            PointData::Exponential {
                count,
                sum: Some(e.sum().to_bits()),
                scale,
                zero_count,
                positive: dense(&positive),
                negative: dense(&negative),
                min,
                max,
            }
        }
    }
}

/// A reported span of any shape.
fn finished(input: &mut Input<'_>) -> FinishedSpan {
    let outcome = match input.below(5) {
        0 => Outcome::Orphaned,
        1 => Outcome::Expired,
        n => Outcome::Ended(SpanStatus(u16::from(n - 2) + u16::from(input.below(2)) * 7)),
    };
    let start_ns = input.u64();
    FinishedSpan {
        service: SERVICES[usize::from(input.below(SERVICES.len() as u8))].into(),
        name: ["GET /", "", "é\n\"", "db.query"][usize::from(input.below(4))].into(),
        trace_id: u128::from(input.u64()) << 64 | u128::from(input.u64()) | 1,
        span_id: input.u64() | 1,
        parent_id: if input.below(2) == 0 { 0 } else { input.u64() },
        flags: input.u8(),
        start_ns,
        end_ns: match outcome {
            Outcome::Ended(_) => Some(start_ns.saturating_add(input.u64() >> input.below(64))),
            _ => None,
        },
        outcome,
        attrs: (0..input.below(3))
            .map(|_| {
                (
                    ["k", "http.route", ""][usize::from(input.below(3))].into(),
                    "v\"\\".repeat(usize::from(input.below(3))),
                )
            })
            .collect(),
    }
}

/// The span the documentation predicts.
fn expected_span(s: &FinishedSpan, mono_to_unix_ns: i128, reported: u64) -> Span {
    let to_unix = |mono: u64| -> u64 {
        u64::try_from((i128::from(mono) + mono_to_unix_ns).max(0)).unwrap_or(u64::MAX)
    };
    let kv = |k: &str, v: &str| KeyValue {
        key: k.to_owned(),
        value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
            value: Some(any_value::Value::StringValue(v.to_owned())),
        }),
        ..Default::default()
    };
    let mut attributes: Vec<KeyValue> = s.attrs.iter().map(|(k, v)| kv(k, v)).collect();
    let (code, message, end) = match s.outcome {
        Outcome::Ended(st) => {
            let code = if st == SpanStatus::OK {
                status::StatusCode::Ok
            } else if st == SpanStatus::ERROR {
                status::StatusCode::Error
            } else {
                status::StatusCode::Unset
            };
            let end = s
                .end_ns
                .unwrap_or_else(|| panic!("an ended span has an end"));
            (code, String::new(), to_unix(end))
        }
        Outcome::Orphaned | Outcome::Expired => {
            let what = if matches!(s.outcome, Outcome::Orphaned) {
                "orphaned"
            } else {
                "expired"
            };
            attributes.push(kv("nexus.span.outcome", what));
            (
                status::StatusCode::Error,
                what.to_owned(),
                reported.max(to_unix(s.start_ns)),
            )
        }
    };
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
        start_time_unix_nano: to_unix(s.start_ns),
        end_time_unix_nano: end,
        attributes,
        status: Some(opentelemetry_proto::tonic::trace::v1::Status {
            message,
            code: code as i32,
        }),
        ..Default::default()
    }
}
