//! The fixed-size record and its per-kind views.
//!
//! Every record is 32 bytes: a common 8-byte head (`kind`, `flags`, `key`) and 24 bytes
//! whose meaning depends on the kind. Each kind has a view struct of the same size; a
//! consumer copies the raw [`Record`] out of shared memory once, then reinterprets the
//! copy as the view its kind names. All views are plain old data: any bit pattern is a
//! valid value, and meaning (a known kind, a registered key, a value in range) is
//! checked by the consumer on the copy.

use core::mem::{offset_of, size_of};

use static_assertions::const_assert_eq;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Bytes per record. See `abi/README.md` for the measurement behind the choice.
pub const RECORD_SIZE: usize = 32;

/// What a record is: an open enum over `u16`. Values not named here are valid bit
/// patterns that a consumer must reject (and count) rather than misread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(transparent)]
pub struct RecordKind(pub u16);

impl RecordKind {
    /// Never written. An all-zero slot decodes as this and is rejected.
    pub const INVALID: Self = Self(0);
    /// A counter increment: [`Sample`], `value` is the `u64` amount added.
    pub const COUNTER: Self = Self(0x01);
    /// A gauge set: [`Sample`], `value` is the new `i64` value (two's complement).
    pub const GAUGE: Self = Self(0x02);
    /// A histogram observation: [`Sample`], `value` is the observed `u64`.
    pub const HISTOGRAM: Self = Self(0x03);
    /// A gauge set to a float (ABI 1.1): [`Sample`], `value` holds the new value's
    /// `f64` bits. Written to a gauge series.
    pub const GAUGE_F64: Self = Self(0x04);
    /// A gauge moved by a float amount (ABI 1.1): [`Sample`], `value` holds the
    /// `f64` bits of the amount added (negative to decrement). Written to a gauge
    /// series. Like counter increments, these are deltas a producer may coalesce.
    pub const GAUGE_F64_ADD: Self = Self(0x05);
    /// A float histogram observation (ABI 1.1): [`Sample`], `value` holds the
    /// observation's `f64` bits. Written to a histogram series.
    pub const HISTOGRAM_F64: Self = Self(0x06);
    /// A span opened: [`SpanStart`].
    pub const SPAN_START: Self = Self(0x10);
    /// A span closed: [`SpanEnd`].
    pub const SPAN_END: Self = Self(0x11);
    /// An attribute of an open span: [`SpanAttr`].
    pub const SPAN_ATTR: Self = Self(0x12);
    /// (v1.1) The trace of the [`SPAN_OPEN`](Self::SPAN_OPEN) record that immediately
    /// follows it in the same ring: [`SpanTrace`].
    pub const SPAN_TRACE: Self = Self(0x13);
    /// (v1.1) A span opened with a trace-global id: [`SpanStart`], preceded by its
    /// [`SPAN_TRACE`](Self::SPAN_TRACE).
    pub const SPAN_OPEN: Self = Self(0x14);
    /// (v1.1) A span opened by [`SPAN_OPEN`](Self::SPAN_OPEN) closed, in any ring of
    /// the same producer connection: [`SpanEnd`].
    pub const SPAN_CLOSE: Self = Self(0x15);
    /// (v1.1) An attribute of a span opened by [`SPAN_OPEN`](Self::SPAN_OPEN), in any
    /// ring of the same producer connection: [`SpanAttr`].
    pub const SPAN_NOTE: Self = Self(0x16);
    /// The start of a registration: [`crate::Register`].
    pub const REGISTER: Self = Self(0x20);
    /// A piece of a registration's payload: [`crate::RegisterData`].
    pub const REGISTER_DATA: Self = Self(0x21);

    /// Bit `k` is set when kind `k` is one this ABI version defines (all are below 64).
    const KNOWN: u64 = (1 << Self::COUNTER.0)
        | (1 << Self::GAUGE.0)
        | (1 << Self::HISTOGRAM.0)
        | (1 << Self::GAUGE_F64.0)
        | (1 << Self::GAUGE_F64_ADD.0)
        | (1 << Self::HISTOGRAM_F64.0)
        | (1 << Self::SPAN_START.0)
        | (1 << Self::SPAN_END.0)
        | (1 << Self::SPAN_ATTR.0)
        | (1 << Self::SPAN_TRACE.0)
        | (1 << Self::SPAN_OPEN.0)
        | (1 << Self::SPAN_CLOSE.0)
        | (1 << Self::SPAN_NOTE.0)
        | (1 << Self::REGISTER.0)
        | (1 << Self::REGISTER_DATA.0);

    /// Whether this ABI version defines the kind: one compare and one bit test, cheap
    /// enough for a consumer to ask of every record it copies out.
    #[inline(always)]
    pub const fn is_known(self) -> bool {
        self.0 < 64 && (Self::KNOWN >> self.0) & 1 == 1
    }

    /// The kind's name, or `None` for a value this ABI version does not define.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::COUNTER => "counter",
            Self::GAUGE => "gauge",
            Self::HISTOGRAM => "histogram",
            Self::GAUGE_F64 => "gauge_f64",
            Self::GAUGE_F64_ADD => "gauge_f64_add",
            Self::HISTOGRAM_F64 => "histogram_f64",
            Self::SPAN_START => "span_start",
            Self::SPAN_END => "span_end",
            Self::SPAN_ATTR => "span_attr",
            Self::SPAN_TRACE => "span_trace",
            Self::SPAN_OPEN => "span_open",
            Self::SPAN_CLOSE => "span_close",
            Self::SPAN_NOTE => "span_note",
            Self::REGISTER => "register",
            Self::REGISTER_DATA => "register_data",
            _ => return None,
        })
    }
}

/// The raw record as it sits in a ring slot. Use the `Record::*` constructors to build
/// one and [`Record::view`] to read one as its kind's view.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Record {
    /// What this record is.
    pub kind: RecordKind,
    /// Kind-specific small field (status, value type, registered kind, sequence).
    pub flags: u16,
    /// The interned key the record refers to (a series, a span name, an attribute).
    /// Zero is never a valid key.
    pub key: u32,
    /// Kind-specific payload.
    pub words: [u64; 3],
}
const_assert_eq!(size_of::<Record>(), RECORD_SIZE);
const_assert_eq!(offset_of!(Record, flags), 2);
const_assert_eq!(offset_of!(Record, key), 4);
const_assert_eq!(offset_of!(Record, words), 8);

impl Default for RecordKind {
    fn default() -> Self {
        Self::INVALID
    }
}

/// A counter, gauge or histogram sample. A sample carries no timestamp: the consumer's
/// drain window dates it (a clock read costs more than the whole record).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Sample {
    /// [`RecordKind::COUNTER`], [`RecordKind::GAUGE`] or [`RecordKind::HISTOGRAM`].
    pub kind: RecordKind,
    /// Zero.
    pub flags: u16,
    /// The registered series.
    pub key: u32,
    /// The increment (counter), new value (gauge, as `i64`) or observation (histogram).
    pub value: u64,
    /// Zero.
    pub reserved: [u64; 2],
}
const_assert_eq!(size_of::<Sample>(), RECORD_SIZE);
const_assert_eq!(offset_of!(Sample, value), 8);

/// How a span ended: an open enum over `u16`, carried in [`SpanEnd::status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(transparent)]
pub struct SpanStatus(pub u16);

impl SpanStatus {
    /// No status was set.
    pub const UNSET: Self = Self(0);
    /// The work succeeded.
    pub const OK: Self = Self(1);
    /// The work failed.
    pub const ERROR: Self = Self(2);

    /// The status's name, or `None` for a value this ABI version does not define.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::UNSET => "unset",
            Self::OK => "ok",
            Self::ERROR => "error",
            _ => return None,
        })
    }
}

/// A span opened. Span ids are chosen by the producer without randomness (a per-ring
/// sequence); the consumer makes them globally unique by pairing them with the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SpanStart {
    /// [`RecordKind::SPAN_START`].
    pub kind: RecordKind,
    /// Zero.
    pub flags: u16,
    /// The registered span name.
    pub name: u32,
    /// This span's id within the ring; never zero.
    pub span_id: u64,
    /// The enclosing span's id within the same ring, or zero for a root span.
    pub parent_id: u64,
    /// Start time, nanoseconds of the producer's `CLOCK_MONOTONIC`.
    pub start_ns: u64,
}
const_assert_eq!(size_of::<SpanStart>(), RECORD_SIZE);
const_assert_eq!(offset_of!(SpanStart, span_id), 8);
const_assert_eq!(offset_of!(SpanStart, parent_id), 16);
const_assert_eq!(offset_of!(SpanStart, start_ns), 24);

/// A span closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SpanEnd {
    /// [`RecordKind::SPAN_END`].
    pub kind: RecordKind,
    /// How it ended.
    pub status: SpanStatus,
    /// The registered span name (the same as at the start).
    pub name: u32,
    /// The id given at the start.
    pub span_id: u64,
    /// End time, nanoseconds of the producer's `CLOCK_MONOTONIC`.
    pub end_ns: u64,
    /// Zero.
    pub reserved: u64,
}
const_assert_eq!(size_of::<SpanEnd>(), RECORD_SIZE);
const_assert_eq!(offset_of!(SpanEnd, status), 2);
const_assert_eq!(offset_of!(SpanEnd, end_ns), 16);

/// (v1.1) The trace a span belongs to: written immediately before the span's
/// [`RecordKind::SPAN_OPEN`], in the same ring and the same publication.
///
/// Trace ids are 128-bit and span ids 64-bit, both nonzero and unique across
/// processes, machines and restarts (the W3C Trace Context ids): a producer derives
/// them from a random seed taken once per process and a counter, so no system call or
/// lock is spent per span.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SpanTrace {
    /// [`RecordKind::SPAN_TRACE`].
    pub kind: RecordKind,
    /// The W3C `trace-flags` byte in bits 0..8 (bit 0: sampled); bits 8..16 zero.
    pub flags: u16,
    /// The registered span name (the same as in the `SPAN_OPEN` that follows).
    pub name: u32,
    /// The span's id (the same as in the `SPAN_OPEN` that follows); never zero.
    pub span_id: u64,
    /// The trace id's high 64 bits (its first 16 hex digits); the whole id is never zero.
    pub trace_hi: u64,
    /// The trace id's low 64 bits (its last 16 hex digits).
    pub trace_lo: u64,
}
const_assert_eq!(size_of::<SpanTrace>(), RECORD_SIZE);
const_assert_eq!(offset_of!(SpanTrace, span_id), 8);
const_assert_eq!(offset_of!(SpanTrace, trace_hi), 16);
const_assert_eq!(offset_of!(SpanTrace, trace_lo), 24);

impl SpanTrace {
    /// The 128-bit trace id.
    pub const fn trace_id(&self) -> u128 {
        ((self.trace_hi as u128) << 64) | self.trace_lo as u128
    }
}

/// How to read [`SpanAttr::value`]: an open enum over `u16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(transparent)]
pub struct AttrValueType(pub u16);

impl AttrValueType {
    /// An unsigned integer.
    pub const U64: Self = Self(0);
    /// A signed integer (two's complement).
    pub const I64: Self = Self(1);
    /// A registered string: the value is its key (a [`crate::RegisterKind::STRING`]).
    pub const STRING: Self = Self(2);
}

/// An attribute of an open span.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SpanAttr {
    /// [`RecordKind::SPAN_ATTR`].
    pub kind: RecordKind,
    /// How to read `value`.
    pub value_type: AttrValueType,
    /// The registered attribute key.
    pub attr: u32,
    /// The span it belongs to.
    pub span_id: u64,
    /// The value, read as `value_type` says.
    pub value: u64,
    /// Zero.
    pub reserved: u64,
}
const_assert_eq!(size_of::<SpanAttr>(), RECORD_SIZE);
const_assert_eq!(offset_of!(SpanAttr, value), 16);

impl Record {
    /// A counter increment of `delta` on series `key`.
    #[inline(always)]
    pub const fn counter(key: u32, delta: u64) -> Self {
        Self {
            kind: RecordKind::COUNTER,
            flags: 0,
            key,
            words: [delta, 0, 0],
        }
    }

    /// A gauge set to `value` on series `key`.
    #[inline(always)]
    pub const fn gauge(key: u32, value: i64) -> Self {
        Self {
            kind: RecordKind::GAUGE,
            flags: 0,
            key,
            words: [value as u64, 0, 0],
        }
    }

    /// A histogram observation of `value` on series `key`.
    #[inline(always)]
    pub const fn histogram(key: u32, value: u64) -> Self {
        Self {
            kind: RecordKind::HISTOGRAM,
            flags: 0,
            key,
            words: [value, 0, 0],
        }
    }

    /// A gauge set to the float `value` on series `key` (ABI 1.1).
    #[inline(always)]
    pub const fn gauge_f64(key: u32, value: f64) -> Self {
        Self {
            kind: RecordKind::GAUGE_F64,
            flags: 0,
            key,
            words: [value.to_bits(), 0, 0],
        }
    }

    /// A gauge moved by the float `delta` on series `key` (ABI 1.1).
    #[inline(always)]
    pub const fn gauge_f64_add(key: u32, delta: f64) -> Self {
        Self {
            kind: RecordKind::GAUGE_F64_ADD,
            flags: 0,
            key,
            words: [delta.to_bits(), 0, 0],
        }
    }

    /// A float observation of `value` on histogram series `key` (ABI 1.1).
    #[inline(always)]
    pub const fn histogram_f64(key: u32, value: f64) -> Self {
        Self {
            kind: RecordKind::HISTOGRAM_F64,
            flags: 0,
            key,
            words: [value.to_bits(), 0, 0],
        }
    }

    /// Span `span_id` named `name` opened at `start_ns` under `parent_id` (0: a root).
    #[inline(always)]
    pub const fn span_start(name: u32, span_id: u64, parent_id: u64, start_ns: u64) -> Self {
        Self {
            kind: RecordKind::SPAN_START,
            flags: 0,
            key: name,
            words: [span_id, parent_id, start_ns],
        }
    }

    /// Span `span_id` named `name` closed at `end_ns` with `status`.
    #[inline(always)]
    pub const fn span_end(name: u32, span_id: u64, end_ns: u64, status: SpanStatus) -> Self {
        Self {
            kind: RecordKind::SPAN_END,
            flags: status.0,
            key: name,
            words: [span_id, end_ns, 0],
        }
    }

    /// Attribute `attr` of span `span_id` set to `value`, read as `value_type`.
    #[inline(always)]
    pub const fn span_attr(attr: u32, span_id: u64, value_type: AttrValueType, value: u64) -> Self {
        Self {
            kind: RecordKind::SPAN_ATTR,
            flags: value_type.0,
            key: attr,
            words: [span_id, value, 0],
        }
    }

    /// (v1.1) The trace record of span `span_id` named `name`: trace `trace_id`, W3C
    /// trace flags `trace_flags`. The [`span_open`](Self::span_open) record follows it.
    #[inline(always)]
    pub const fn span_trace(name: u32, span_id: u64, trace_id: u128, trace_flags: u8) -> Self {
        Self {
            kind: RecordKind::SPAN_TRACE,
            flags: trace_flags as u16,
            key: name,
            words: [span_id, (trace_id >> 64) as u64, trace_id as u64],
        }
    }

    /// (v1.1) Span `span_id` (trace-global) named `name` opened at `start_ns` under
    /// `parent_id` (0: the root of its trace).
    #[inline(always)]
    pub const fn span_open(name: u32, span_id: u64, parent_id: u64, start_ns: u64) -> Self {
        Self {
            kind: RecordKind::SPAN_OPEN,
            flags: 0,
            key: name,
            words: [span_id, parent_id, start_ns],
        }
    }

    /// (v1.1) Span `span_id` named `name` closed at `end_ns` with `status`.
    #[inline(always)]
    pub const fn span_close(name: u32, span_id: u64, end_ns: u64, status: SpanStatus) -> Self {
        Self {
            kind: RecordKind::SPAN_CLOSE,
            flags: status.0,
            key: name,
            words: [span_id, end_ns, 0],
        }
    }

    /// (v1.1) Attribute `attr` of span `span_id` set to `value`, read as `value_type`.
    #[inline(always)]
    pub const fn span_note(attr: u32, span_id: u64, value_type: AttrValueType, value: u64) -> Self {
        Self {
            kind: RecordKind::SPAN_NOTE,
            flags: value_type.0,
            key: attr,
            words: [span_id, value, 0],
        }
    }

    /// Reinterprets this copy as the view `V` (any 32-byte view of this module or of
    /// [`crate::Register`] / [`crate::RegisterData`]). Which view is right is the
    /// caller's reading of `kind`; every view accepts every bit pattern.
    #[inline]
    pub fn view<V: FromBytes + KnownLayout + Immutable>(&self) -> V {
        // A view is exactly RECORD_SIZE bytes (asserted beside each one), so the read
        // cannot come up short; should a caller pass a view of another size, they get
        // the zero value rather than a panic.
        V::read_from_bytes(self.as_bytes()).unwrap_or_else(|_| V::new_zeroed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_lay_out_the_documented_bytes() {
        let r = Record::counter(0x0102_0304, 0x1111);
        let b = r.as_bytes();
        assert_eq!(&b[0..2], &1u16.to_le_bytes());
        assert_eq!(&b[4..8], &0x0102_0304u32.to_le_bytes());
        assert_eq!(&b[8..16], &0x1111u64.to_le_bytes());
        assert_eq!(&b[16..32], &[0u8; 16]);

        let s: SpanStart = Record::span_start(3, 10, 9, 12345).view();
        assert_eq!(
            (s.kind, s.name, s.span_id, s.parent_id, s.start_ns),
            (RecordKind::SPAN_START, 3, 10, 9, 12345)
        );

        let e: SpanEnd = Record::span_end(3, 10, 20000, SpanStatus::ERROR).view();
        assert_eq!(
            (e.status, e.span_id, e.end_ns),
            (SpanStatus::ERROR, 10, 20000)
        );

        let g: Sample = Record::gauge(4, -5).view();
        assert_eq!(g.value as i64, -5);

        for (r, kind) in [
            (Record::gauge_f64(4, -2.5), 0x04),
            (Record::gauge_f64_add(4, -2.5), 0x05),
            (Record::histogram_f64(4, -2.5), 0x06),
        ] {
            let b = r.as_bytes();
            assert_eq!(&b[0..2], &u16::to_le_bytes(kind));
            assert_eq!(&b[8..16], &(-2.5f64).to_bits().to_le_bytes());
            assert_eq!(&b[16..32], &[0u8; 16]);
            assert!(r.kind.is_known());
        }

        let a: SpanAttr = Record::span_attr(6, 10, AttrValueType::I64, 7).view();
        assert_eq!(
            (a.attr, a.span_id, a.value_type, a.value),
            (6, 10, AttrValueType::I64, 7)
        );
    }

    #[test]
    fn v1_1_span_records_lay_out_the_documented_bytes() {
        let trace = 0x0af7_6519_16cd_43dd_8448_eb21_1c80_319cu128;
        let r = Record::span_trace(3, 0xb7ad_6b71_6920_3331, trace, 1);
        let b = r.as_bytes();
        assert_eq!(&b[0..2], &0x13u16.to_le_bytes());
        assert_eq!(&b[2..4], &1u16.to_le_bytes());
        assert_eq!(&b[4..8], &3u32.to_le_bytes());
        assert_eq!(&b[8..16], &0xb7ad_6b71_6920_3331u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x0af7_6519_16cd_43ddu64.to_le_bytes());
        assert_eq!(&b[24..32], &0x8448_eb21_1c80_319cu64.to_le_bytes());
        let t: SpanTrace = r.view();
        assert_eq!((t.trace_id(), t.flags, t.name), (trace, 1, 3));

        let o: SpanStart = Record::span_open(3, 10, 9, 12345).view();
        assert_eq!(
            (o.kind, o.name, o.span_id, o.parent_id, o.start_ns),
            (RecordKind::SPAN_OPEN, 3, 10, 9, 12345)
        );
        let c: SpanEnd = Record::span_close(3, 10, 20000, SpanStatus::OK).view();
        assert_eq!(
            (c.kind, c.status, c.span_id, c.end_ns),
            (RecordKind::SPAN_CLOSE, SpanStatus::OK, 10, 20000)
        );
        let n: SpanAttr = Record::span_note(6, 10, AttrValueType::U64, 7).view();
        assert_eq!(
            (n.kind, n.attr, n.span_id, n.value),
            (RecordKind::SPAN_NOTE, 6, 10, 7)
        );
    }

    #[test]
    fn unknown_kinds_have_no_name() {
        assert_eq!(RecordKind(0x7777).name(), None);
        for k in 0..=u16::MAX {
            let kind = RecordKind(k);
            assert_eq!(kind.is_known(), kind.name().is_some(), "kind {k:#x}");
        }
        assert_eq!(RecordKind::INVALID.name(), None);
        assert_eq!(RecordKind::HISTOGRAM.name(), Some("histogram"));
        assert_eq!(SpanStatus(9).name(), None);
        assert_eq!(Record::default().kind, RecordKind::INVALID);
    }

    #[test]
    fn span_statuses_have_the_spec_values_and_names() {
        let statuses = [
            (SpanStatus::UNSET, 0, "unset"),
            (SpanStatus::OK, 1, "ok"),
            (SpanStatus::ERROR, 2, "error"),
        ];
        for (status, value, name) in statuses {
            assert_eq!((status.0, status.name()), (value, Some(name)));
        }
        assert_eq!(SpanStatus(3).name(), None);
    }
}
