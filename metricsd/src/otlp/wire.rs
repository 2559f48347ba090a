//! The OTLP requests written straight into a byte buffer: the bytes prost writes for
//! the `opentelemetry-proto` messages [`super::metrics_request`] and
//! [`super::traces_request`] build, without building them.
//!
//! Why: building the message tree costs an owned `String` per attribute key and value,
//! a `Vec` per bucket array and per byte id, and prost then computes each nested
//! message's length again at every level above it. Here each field is written once, in
//! the order prost writes them (by field number; proto3 defaults left out, `optional`
//! and `oneof` fields written whenever set). A nested message's length is reserved as
//! five bytes and, once the message is written, stored in the fewest bytes, with the
//! body moved up. The unit tests compare the output with prost's byte for byte.

use std::collections::BTreeMap;

use crate::protowire::{encode_varint, encode_varints, encoded_len_varint, put_varint};

use super::{SCOPE_NAME, SpanFields, start_of};
use crate::aggregate::{MetricKind, Series, Value};
use crate::histogram::{Buckets, Histogram as Hist};
use crate::spans::FinishedSpan;

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

/// `AggregationTemporality::Cumulative`.
const CUMULATIVE: u64 = 2;
/// `SpanKind::Internal`.
const INTERNAL: u64 = 1;

struct Writer<'a> {
    buf: &'a mut Vec<u8>,
}

impl Writer<'_> {
    fn key(&mut self, field: u64, wire: u64) {
        encode_varint(field << 3 | wire, self.buf);
    }

    /// Starts an embedded message; [`Writer::end`] closes it.
    fn begin(&mut self, field: u64) -> usize {
        self.key(field, LEN);
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 5]);
        at
    }

    fn end(&mut self, at: usize) {
        let body = at + 5;
        let len = self.buf.len() - body;
        let mut head = [0u8; 10];
        let n = put_varint(len as u64, &mut head);
        self.buf[at..at + n].copy_from_slice(&head[..n]);
        if n < 5 {
            self.buf.copy_within(body.., at + n);
            self.buf.truncate(self.buf.len() - (5 - n));
        }
    }

    /// A string or bytes field (left out when empty).
    fn bytes(&mut self, field: u64, b: &[u8]) {
        if !b.is_empty() {
            self.bytes_always(field, b);
        }
    }

    /// A string or bytes field that is set (a `oneof` member): written even when empty.
    fn bytes_always(&mut self, field: u64, b: &[u8]) {
        self.key(field, LEN);
        encode_varint(b.len() as u64, self.buf);
        self.buf.extend_from_slice(b);
    }

    fn fixed64(&mut self, field: u64, v: u64) {
        if v != 0 {
            self.fixed64_always(field, v);
        }
    }

    fn fixed64_always(&mut self, field: u64, v: u64) {
        self.key(field, FIXED64);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// An `optional double`: written whenever set.
    fn double_opt(&mut self, field: u64, v: Option<f64>) {
        if let Some(v) = v {
            self.fixed64_always(field, v.to_bits());
        }
    }

    fn varint(&mut self, field: u64, v: u64) {
        if v != 0 {
            self.key(field, VARINT);
            encode_varint(v, self.buf);
        }
    }

    fn sint32(&mut self, field: u64, v: i32) {
        self.varint(field, u64::from(((v << 1) ^ (v >> 31)) as u32));
    }

    /// `KeyValue { key, value: AnyValue { string_value } }`.
    fn string_kv(&mut self, field: u64, key: &str, value: &str) {
        let any = 1 + encoded_len_varint(value.len() as u64) + value.len();
        let key_len = if key.is_empty() {
            0
        } else {
            1 + encoded_len_varint(key.len() as u64) + key.len()
        };
        let kv = key_len + 1 + encoded_len_varint(any as u64) + any;
        self.key(field, LEN);
        encode_varint(kv as u64, self.buf);
        self.bytes(1, key.as_bytes());
        self.key(2, LEN);
        encode_varint(any as u64, self.buf);
        self.bytes_always(1, value.as_bytes());
    }

    /// `resource` (field 1) then the start of the one scope-level message (field 2)
    /// with its `scope` (field 1); returns the scope-level message to close.
    fn resource_and_scope(&mut self, service: &str, instance: &str) -> usize {
        let r = self.begin(1);
        self.string_kv(1, "service.name", service);
        self.string_kv(1, "service.instance.id", instance);
        self.end(r);
        let scope_level = self.begin(2);
        let s = self.begin(1);
        self.bytes(1, SCOPE_NAME.as_bytes());
        self.bytes(2, env!("CARGO_PKG_VERSION").as_bytes());
        self.end(s);
        scope_level
    }
}

/// The bytes of `metrics_request(series, instance, start_unix_ns, time_unix_ns)`
/// encoded by prost, appended to `out`.
pub(super) fn metrics(
    series: &[&Series],
    instance: &str,
    start_unix_ns: u64,
    time_unix_ns: u64,
    out: &mut Vec<u8>,
) {
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
    let mut w = Writer { buf: out };
    for (service, metrics) in by_service {
        let rm = w.begin(1);
        let sm = w.resource_and_scope(service, instance);
        for ((name, kind), group) in metrics {
            let m = w.begin(2);
            w.bytes(1, name.as_bytes());
            if kind == MetricKind::SpanDuration {
                w.bytes(3, b"ns");
            }
            let t = (start_unix_ns, time_unix_ns);
            match kind {
                MetricKind::Counter => {
                    let d = w.begin(7);
                    for s in &group {
                        if let Value::Counter { total } = s.value {
                            let v = i64::try_from(total).unwrap_or(i64::MAX);
                            number_point(&mut w, s, Number::Int(v), t);
                        }
                    }
                    w.varint(2, CUMULATIVE);
                    w.varint(3, 1);
                    w.end(d);
                }
                MetricKind::Gauge => {
                    let d = w.begin(5);
                    for s in &group {
                        match s.value {
                            Value::Gauge { value: Some(v) } => {
                                number_point(&mut w, s, Number::Int(v), t);
                            }
                            Value::FloatGauge { value } => {
                                number_point(&mut w, s, Number::Double(value), t);
                            }
                            _ => {}
                        }
                    }
                    w.end(d);
                }
                MetricKind::Histogram | MetricKind::SpanDuration => histograms(&mut w, &group, t),
            }
            w.end(m);
        }
        w.end(sm);
        w.end(rm);
    }
}

fn attributes(w: &mut Writer<'_>, field: u64, s: &Series) {
    for (k, v) in s.labels.iter() {
        w.string_kv(field, k, v);
    }
}

/// A `NumberDataPoint`'s value (`oneof`: written even when zero).
enum Number {
    Int(i64),
    Double(f64),
}

/// A `NumberDataPoint` (field 1 of `Sum` and `Gauge`).
fn number_point(w: &mut Writer<'_>, s: &Series, v: Number, (start, time): (u64, u64)) {
    let p = w.begin(1);
    w.fixed64(2, start_of(s, start));
    w.fixed64(3, time);
    match v {
        Number::Double(d) => w.fixed64_always(4, d.to_bits()),
        Number::Int(i) => w.fixed64_always(6, i as u64),
    }
    attributes(w, 7, s);
    w.end(p);
}

/// `Histogram` (explicit layouts) or `ExponentialHistogram` data, as `histogram_data`.
fn histograms(w: &mut Writer<'_>, group: &[&Series], (start, time): (u64, u64)) {
    let explicit = group
        .iter()
        .any(|s| matches!(s.value, Value::Histogram(Hist::Explicit(_))));
    if explicit {
        let d = w.begin(9);
        for s in group {
            let Value::Histogram(all @ Hist::Explicit(h)) = &s.value else {
                continue;
            };
            let p = w.begin(1);
            w.fixed64(2, start_of(s, start));
            w.fixed64(3, time);
            w.fixed64(4, all.count());
            w.double_opt(5, Some(all.sum()));
            if !h.counts().is_empty() {
                w.key(6, LEN);
                encode_varint(8 * h.counts().len() as u64, w.buf);
                for c in h.counts() {
                    w.buf.extend_from_slice(&c.to_le_bytes());
                }
            }
            if !h.bounds().is_empty() {
                w.key(7, LEN);
                encode_varint(8 * h.bounds().len() as u64, w.buf);
                for &b in h.bounds() {
                    w.buf.extend_from_slice(&(b as f64).to_le_bytes());
                }
            }
            attributes(w, 9, s);
            w.double_opt(11, all.min());
            w.double_opt(12, all.max());
            w.end(p);
        }
        w.varint(2, CUMULATIVE);
        w.end(d);
        return;
    }
    let d = w.begin(10);
    for s in group {
        let Value::Histogram(Hist::Exponential(h)) = &s.value else {
            continue;
        };
        let p = w.begin(1);
        attributes(w, 1, s);
        w.fixed64(2, start_of(s, start));
        w.fixed64(3, time);
        w.fixed64(4, h.count());
        w.double_opt(5, Some(h.sum()));
        w.sint32(6, h.scale());
        w.fixed64(7, h.zero_count());
        buckets(w, 8, h.positive());
        buckets(w, 9, h.negative());
        w.double_opt(12, h.min());
        w.double_opt(13, h.max());
        w.end(p);
    }
    w.varint(2, CUMULATIVE);
    w.end(d);
}

/// `ExponentialHistogramDataPoint.Buckets`: offset and packed counts.
fn buckets(w: &mut Writer<'_>, field: u64, b: &Buckets) {
    let offset = u64::from(((b.offset() << 1) ^ (b.offset() >> 31)) as u32);
    let counts = b.counts();
    let packed: usize = counts.iter().map(|&c| encoded_len_varint(c)).sum();
    let len = if offset != 0 {
        1 + encoded_len_varint(offset)
    } else {
        0
    } + if counts.is_empty() {
        0
    } else {
        1 + encoded_len_varint(packed as u64) + packed
    };
    w.key(field, LEN);
    encode_varint(len as u64, w.buf);
    w.varint(1, offset);
    if !counts.is_empty() {
        w.key(2, LEN);
        encode_varint(packed as u64, w.buf);
        encode_varints(counts, packed, w.buf);
    }
}

/// The bytes of `traces_request(spans, instance, mono_to_unix_ns, reported_unix_ns)`
/// encoded by prost, appended to `out`.
pub(super) fn traces(
    spans: &[&FinishedSpan],
    instance: &str,
    mono_to_unix_ns: i128,
    reported_unix_ns: u64,
    out: &mut Vec<u8>,
) {
    let mut by_service: BTreeMap<&str, Vec<&FinishedSpan>> = BTreeMap::new();
    for s in spans {
        by_service.entry(&s.service).or_default().push(s);
    }
    let mut w = Writer { buf: out };
    for (service, spans) in by_service {
        let rs = w.begin(1);
        let ss = w.resource_and_scope(service, instance);
        for s in spans {
            let f = SpanFields::of(s, mono_to_unix_ns, reported_unix_ns);
            let p = w.begin(2);
            w.bytes(1, &s.trace_id.to_be_bytes());
            w.bytes(2, &s.span_id.to_be_bytes());
            if s.parent_id != 0 {
                w.bytes(4, &s.parent_id.to_be_bytes());
            }
            w.bytes(5, s.name.as_bytes());
            w.varint(6, INTERNAL);
            w.fixed64(7, f.start);
            w.fixed64(8, f.end);
            for (k, v) in &s.attrs {
                w.string_kv(9, k, v);
            }
            if let Some(outcome) = f.outcome {
                w.string_kv(9, "nexus.span.outcome", outcome);
            }
            let message = f.message.as_bytes();
            let status_len = if message.is_empty() {
                0
            } else {
                1 + encoded_len_varint(message.len() as u64) + message.len()
            } + if f.code != 0 { 2 } else { 0 };
            w.key(15, LEN);
            encode_varint(status_len as u64, w.buf);
            w.bytes(2, message);
            w.varint(3, f.code as u64);
            if s.flags != 0 {
                w.key(16, FIXED32);
                w.buf.extend_from_slice(&u32::from(s.flags).to_le_bytes());
            }
            w.end(p);
        }
        w.end(ss);
        w.end(rs);
    }
}
