//! The direct writer: a [`Plan`] straight into the response body, in exactly the bytes
//! `prometheus-client`'s encoders write for the same collector ([`super::render_reference`]).
//!
//! Why not the encoder itself on the hot path: for 100 000 series its text encoders
//! pass every label of every line through a chain of small writers (a histogram's label
//! set is encoded again for each of its ~24 lines), and its protobuf encoder builds
//! every `MetricFamily` message, with an owned `String` per label name and value, before
//! serializing them. Here a series' label text is built once and copied per line, and
//! protobuf fields are written into a reused buffer as they come. Numbers are
//! formatted by the crates the encoder uses (`itoa`, `dtoa`), floats in `le` labels of
//! Prometheus text by the same rules as its Go-style formatter. The unit tests compare
//! this writer's output with the encoder's byte for byte.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::protowire::{encode_varint, encoded_len_varint, put_varint};

use super::{Family, Plan, RenderError, Sample, classic_buckets};
use crate::aggregate::MetricKind;
use crate::histogram::Histogram;

/// The length of the last body rendered in each format (Prometheus text, OpenMetrics,
/// protobuf): the next one's first allocation, so the body is not grown (and copied)
/// a dozen times. Only a hint: bounded by the response limit like the body itself.
static LAST_LEN: [AtomicUsize; 3] = [const { AtomicUsize::new(0) }; 3];

/// A body's first capacity: the last body's length and a sixteenth, or `estimate`.
fn capacity(hint: &AtomicUsize, estimate: usize) -> usize {
    // ORDERING: Relaxed: a size hint; nothing is published through it.
    let last = hint.load(Ordering::Relaxed);
    if last > 0 {
        last + last / 16 + 4096
    } else {
        estimate + 4096
    }
}

/// Bytes a label value must escape in the text formats.
const ESCAPED: [bool; 256] = {
    let mut t = [false; 256];
    t[b'\\' as usize] = true;
    t[b'"' as usize] = true;
    t[b'\n' as usize] = true;
    t
};

/// `s` as a label value: `\`, `"` and newline escaped, as the text encoders do.
pub(super) fn push_escaped(out: &mut String, s: &str) {
    if !s.bytes().any(|b| ESCAPED[usize::from(b)]) {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The text encoders' float: `dtoa`, whose non-finite values are `NaN`, `inf`, `-inf`
/// (OpenMetrics) ...
fn om_float(v: f64) -> String {
    dtoa::Buffer::new().format(v).to_owned()
}

/// ... and Prometheus text's: `dtoa` for finite values, else `NaN`, `+Inf`, `-Inf`.
fn text_float(out: &mut String, v: f64) {
    if v.is_finite() {
        out.push_str(dtoa::Buffer::new().format_finite(v));
    } else {
        out.push_str(nonfinite(v));
    }
}

fn nonfinite(v: f64) -> &'static str {
    if v.is_nan() {
        "NaN"
    } else if v.is_sign_positive() {
        "+Inf"
    } else {
        "-Inf"
    }
}

/// A bucket bound in Prometheus text, as Go's `strconv.FormatFloat(v, 'g', -1, 64)`
/// writes it (and `prometheus-client`'s text encoder with it): whole numbers below 1e6
/// as integers, exponent notation outside `[1e-4, 1e6)` with a signed two-digit exponent.
fn go_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e6 {
        return itoa::Buffer::new().format(v as i64).to_owned();
    }
    if (1e-4..1e6).contains(&v.abs()) {
        return format!("{v}");
    }
    if !v.is_finite() {
        return nonfinite(v).to_owned();
    }
    let sci = format!("{v:e}");
    match sci.split_once('e') {
        Some((mantissa, exp)) => match exp.parse::<i32>() {
            Ok(e) => format!("{mantissa}e{e:+03}"),
            Err(_) => sci,
        },
        None => sci,
    }
}

/// A small cache of formatted bucket bounds: a scrape writes the same few bounds (powers
/// of two, configured layouts) hundreds of thousands of times.
struct Bounds {
    om: bool,
    slots: Vec<Option<(u64, String)>>,
}

impl Bounds {
    const SLOTS: usize = 256;

    fn new(om: bool) -> Self {
        Self {
            om,
            slots: vec![None; Self::SLOTS],
        }
    }

    fn get(&mut self, le: f64) -> &str {
        let bits = le.to_bits();
        let i = ((bits >> 52) ^ (bits >> 20) ^ bits) as usize % Self::SLOTS;
        let om = self.om;
        let slot = &mut self.slots[i];
        if !matches!(slot, Some((b, _)) if *b == bits) {
            let text = if om {
                if le == f64::INFINITY {
                    "+Inf".to_owned()
                } else {
                    om_float(le)
                }
            } else {
                go_float(le)
            };
            *slot = Some((bits, text));
        }
        slot.as_ref().map_or("", |(_, t)| t.as_str())
    }
}

/// OpenMetrics 1.0 text (`om`) or Prometheus text 0.0.4.
pub(super) fn text(plan: &Plan<'_>, om: bool) -> Result<Vec<u8>, RenderError> {
    let hint = &LAST_LEN[usize::from(om)];
    let mut out = String::with_capacity(capacity(hint, plan.series.len() * 96));
    let (mut head, mut tail) = (String::new(), String::new());
    let mut classic: Vec<(f64, u64)> = Vec::new();
    let mut bounds = Bounds::new(om);
    let mut int = itoa::Buffer::new();
    for family in &plan.families {
        descriptor(&mut out, family, om);
        let total = !om && family.kind == MetricKind::Counter;
        for &src in &family.members {
            let Some(m) = plan.member(src) else {
                continue;
            };
            if matches!(m.sample, Sample::Nothing) {
                continue;
            }
            let labels = m.prepared.text.as_str();
            // `name[_total]{labels}` (Prometheus text names every sample of a counter
            // family `_total`; OpenMetrics adds it to counter samples only).
            let line = |out: &mut String, suffix: &str| {
                out.push_str(&family.name);
                if total {
                    out.push_str("_total");
                }
                out.push_str(suffix);
                out.push('{');
                out.push_str(labels);
                out.push('}');
            };
            match m.sample {
                Sample::CounterU64(v) => {
                    line(&mut out, if om { "_total" } else { "" });
                    out.push(' ');
                    out.push_str(int.format(v));
                }
                Sample::CounterF64(v) => {
                    line(&mut out, if om { "_total" } else { "" });
                    out.push(' ');
                    if om {
                        out.push_str(&om_float(v));
                    } else {
                        text_float(&mut out, v);
                    }
                }
                Sample::GaugeI64(v) => {
                    line(&mut out, "");
                    out.push(' ');
                    out.push_str(int.format(v));
                }
                Sample::GaugeF64(v) => {
                    line(&mut out, "");
                    out.push(' ');
                    if om {
                        out.push_str(&om_float(v));
                    } else {
                        text_float(&mut out, v);
                    }
                }
                Sample::Histogram(h) => {
                    classic_buckets(h, &mut classic);
                    let (sum, count) = (h.sum(), h.count());
                    if om {
                        // The encoder refuses a native histogram without classic buckets.
                        if classic.is_empty() && matches!(h, Histogram::Exponential(_)) {
                            return Err(RenderError::Encode);
                        }
                        line(&mut out, "_sum");
                        out.push(' ');
                        out.push_str(&om_float(sum));
                        out.push('\n');
                        line(&mut out, "_count");
                        out.push(' ');
                        out.push_str(int.format(count));
                        out.push('\n');
                        // `name_bucket{le="x",labels} n`: the parts around `x` once.
                        head.clear();
                        head.push_str(&family.name);
                        head.push_str("_bucket{le=\"");
                        tail.clear();
                        tail.push_str("\",");
                        tail.push_str(labels);
                        tail.push_str("} ");
                        let mut cumulative = 0;
                        for &(le, n) in &classic {
                            cumulative += n;
                            out.push_str(&head);
                            out.push_str(bounds.get(le));
                            out.push_str(&tail);
                            out.push_str(int.format(cumulative));
                            out.push('\n');
                        }
                        continue;
                    }
                    // `name[_total]_bucket{labels,le="x"} n`, likewise.
                    head.clear();
                    head.push_str(&family.name);
                    if total {
                        head.push_str("_total");
                    }
                    head.push_str("_bucket{");
                    head.push_str(labels);
                    head.push_str(",le=\"");
                    let mut cumulative = 0;
                    let mut inf_seen = false;
                    for &(le, n) in &classic {
                        cumulative += n;
                        inf_seen |= le == f64::INFINITY;
                        out.push_str(&head);
                        out.push_str(bounds.get(le));
                        out.push_str("\"} ");
                        out.push_str(int.format(cumulative));
                        out.push('\n');
                    }
                    if !inf_seen {
                        out.push_str(&head);
                        out.push_str("+Inf\"} ");
                        out.push_str(int.format(count));
                        out.push('\n');
                    }
                    line(&mut out, "_sum");
                    out.push(' ');
                    text_float(&mut out, sum);
                    out.push('\n');
                    line(&mut out, "_count");
                    out.push(' ');
                    out.push_str(int.format(count));
                }
                Sample::Nothing => {}
            }
            out.push('\n');
        }
    }
    if om {
        out.push_str("# EOF\n");
    }
    // ORDERING: Relaxed: a size hint.
    hint.store(out.len(), Ordering::Relaxed);
    Ok(out.into_bytes())
}

fn descriptor(out: &mut String, family: &Family, om: bool) {
    let kind = match family.kind {
        MetricKind::Counter => "counter",
        MetricKind::Gauge => "gauge",
        MetricKind::Histogram | MetricKind::SpanDuration => "histogram",
    };
    let total = if !om && family.kind == MetricKind::Counter {
        "_total"
    } else {
        ""
    };
    let _ = write!(out, "# HELP {}{total} ", family.name);
    if om {
        out.push_str(&family.help);
    } else {
        for c in family.help.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
    }
    let _ = writeln!(out, "\n# TYPE {}{total} {kind}", family.name);
}

// Protobuf wire types.
const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;

fn key(buf: &mut Vec<u8>, field: u64, wire: u64) {
    encode_varint(field << 3 | wire, buf);
}

/// A length-delimited field (proto3: an empty string is not written).
fn bytes_field(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    if !bytes.is_empty() {
        message(buf, field, bytes);
    }
}

/// An embedded message (written even when empty: it is present).
fn message(buf: &mut Vec<u8>, field: u64, body: &[u8]) {
    key(buf, field, LEN);
    encode_varint(body.len() as u64, buf);
    buf.extend_from_slice(body);
}

fn double(buf: &mut Vec<u8>, field: u64, v: f64) {
    if v != 0.0 {
        key(buf, field, FIXED64);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

fn uint(buf: &mut Vec<u8>, field: u64, v: u64) {
    if v != 0 {
        key(buf, field, VARINT);
        encode_varint(v, buf);
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Prometheus protobuf: delimited `io.prometheus.client.MetricFamily` messages.
pub(super) fn protobuf(plan: &Plan<'_>) -> Vec<u8> {
    let hint = &LAST_LEN[2];
    let mut out = Vec::with_capacity(capacity(hint, plan.series.len() * 64));
    let mut inner = Vec::new();
    let mut classic: Vec<(f64, u64)> = Vec::new();
    for family in &plan.families {
        // The family's length is written once it is known, into five bytes reserved
        // here, and the family moved up to follow the fewest bytes that hold it.
        let at = out.len();
        out.extend_from_slice(&[0; 5]);
        let (name_total, kind) = match family.kind {
            MetricKind::Counter => (true, 0),
            MetricKind::Gauge => (false, 1),
            MetricKind::Histogram | MetricKind::SpanDuration => (false, 4),
        };
        let name_len = family.name.len() + if name_total { 6 } else { 0 };
        key(&mut out, 1, LEN);
        encode_varint(name_len as u64, &mut out);
        out.extend_from_slice(family.name.as_bytes());
        if name_total {
            out.extend_from_slice(b"_total");
        }
        bytes_field(&mut out, 2, family.help.as_bytes());
        uint(&mut out, 3, kind);
        for &src in &family.members {
            let Some(m) = plan.member(src) else {
                continue;
            };
            // The metric's length first (labels, then the value or the histogram
            // written aside), so the metric goes straight into the body.
            let labels = m.prepared.pb.len();
            let (field, value) = match m.sample {
                Sample::CounterU64(v) => (3, v as f64),
                Sample::CounterF64(v) => (3, v),
                Sample::GaugeI64(v) => (2, v as f64),
                Sample::GaugeF64(v) => (2, v),
                Sample::Histogram(h) => {
                    histogram(&mut inner, h, &mut classic);
                    (7, 0.0)
                }
                Sample::Nothing => continue,
            };
            let body = if field == 7 {
                inner.len()
            } else if value != 0.0 {
                9
            } else {
                0
            };
            let len = labels + 1 + encoded_len_varint(body as u64) + body;
            key(&mut out, 4, LEN);
            encode_varint(len as u64, &mut out);
            out.extend_from_slice(&m.prepared.pb);
            key(&mut out, field, LEN);
            encode_varint(body as u64, &mut out);
            if field == 7 {
                out.extend_from_slice(&inner);
            } else {
                double(&mut out, 1, value);
            }
        }
        let len = out.len() - at - 5;
        let mut head = [0u8; 10];
        let n = put_varint(len as u64, &mut head);
        if let (Some(dst), Some(src)) = (out.get_mut(at..at + n), head.get(..n)) {
            dst.copy_from_slice(src);
        }
        out.copy_within(at + 5.., at + n);
        out.truncate(out.len() - (5 - n));
    }
    // ORDERING: Relaxed: a size hint.
    hint.store(out.len(), Ordering::Relaxed);
    out
}

/// The length of a `LabelPair { name, value }` (empty strings are left out).
fn label_pair_len(k: &str, v: &str) -> usize {
    let field = |s: &str| {
        if s.is_empty() {
            0
        } else {
            1 + encoded_len_varint(s.len() as u64) + s.len()
        }
    };
    field(k) + field(v)
}

/// `label` (field 1 of `Metric`): a `LabelPair`.
pub(super) fn label_pair(out: &mut Vec<u8>, k: &str, v: &str) {
    key(out, 1, LEN);
    encode_varint(label_pair_len(k, v) as u64, out);
    bytes_field(out, 1, k.as_bytes());
    bytes_field(out, 2, v.as_bytes());
}

/// An `io.prometheus.client.Histogram` into `buf`: classic buckets, and for an
/// exponential histogram its native buckets (schema, zero count, spans and deltas).
fn histogram(buf: &mut Vec<u8>, h: &Histogram, classic: &mut Vec<(f64, u64)>) {
    buf.clear();
    classic_buckets(h, classic);
    uint(buf, 1, h.count());
    double(buf, 2, h.sum());
    let mut cumulative = 0;
    for &(le, n) in classic.iter() {
        cumulative += n;
        let len = if cumulative != 0 {
            1 + encoded_len_varint(cumulative)
        } else {
            0
        } + if le != 0.0 { 9 } else { 0 };
        key(buf, 3, LEN);
        encode_varint(len as u64, buf);
        uint(buf, 1, cumulative);
        double(buf, 2, le);
    }
    let Histogram::Exponential(e) = h else {
        return;
    };
    let n = e.native();
    if n.schema != 0 {
        key(buf, 5, VARINT);
        encode_varint(zigzag(i64::from(n.schema)) & 0xffff_ffff, buf);
    }
    uint(buf, 7, n.zero_count);
    for (spans_field, deltas_field, side) in [(9, 10, &n.negative), (12, 13, &n.positive)] {
        for &(offset, length) in &side.spans {
            let offset = zigzag(i64::from(offset)) & 0xffff_ffff;
            let len = if offset != 0 {
                1 + encoded_len_varint(offset)
            } else {
                0
            } + if length != 0 {
                1 + encoded_len_varint(u64::from(length))
            } else {
                0
            };
            key(buf, spans_field, LEN);
            encode_varint(len as u64, buf);
            uint(buf, 1, offset);
            uint(buf, 2, u64::from(length));
        }
        if !side.deltas.is_empty() {
            let len: usize = side
                .deltas
                .iter()
                .map(|&d| encoded_len_varint(zigzag(d)))
                .sum();
            key(buf, deltas_field, LEN);
            encode_varint(len as u64, buf);
            buf.reserve(len);
            for &d in &side.deltas {
                encode_varint(zigzag(d), buf);
            }
        }
    }
}
