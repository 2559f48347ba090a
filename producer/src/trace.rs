//! Trace context: W3C ids and the `traceparent` header.
//!
//! Ids are unique across processes, machines and restarts without a system call or a
//! lock per span: each process takes 128 random bits once (and again in a forked
//! child), each thread takes a number from a process-wide counter once, and each span
//! id is a per-thread counter mixed with them through a bijective 64-bit mixer. Two
//! spans of one process therefore never share an id (until one thread opens 2^40 of
//! them); across processes ids collide only by chance, with 64 random bits per id.

use std::cell::Cell;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A span's place in a distributed trace: what a `traceparent` header carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanContext {
    /// The 128-bit trace id; never zero.
    pub trace_id: u128,
    /// The 64-bit span id; never zero.
    pub span_id: u64,
    /// The W3C trace flags (bit 0: sampled).
    pub flags: u8,
}

/// Why a `traceparent` value was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceparentError {
    /// Not `00-<32 hex>-<16 hex>-<2 hex>` (lowercase hex, 55 bytes for version 00).
    Malformed,
    /// The version is `ff`, which W3C Trace Context forbids.
    BadVersion,
    /// The trace id or the span id is all zeros.
    ZeroId,
}

impl fmt::Display for TraceparentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Malformed => {
                "traceparent is malformed: expected 00-<32 lowercase hex>-<16 lowercase hex>-<2 lowercase hex>"
            }
            Self::BadVersion => "traceparent version ff is forbidden: expected 00",
            Self::ZeroId => "traceparent has an all-zero trace id or span id: expected nonzero ids",
        })
    }
}

impl std::error::Error for TraceparentError {}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn parse_hex(s: &[u8]) -> Option<u128> {
    s.iter().try_fold(0u128, |acc, &b| {
        Some((acc << 4) | u128::from(hex_value(b)?))
    })
}

impl SpanContext {
    /// Parses a W3C `traceparent` header value, e.g.
    /// `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`. A later version
    /// (not `00`, not `ff`) is read by its first four fields, as the spec asks.
    pub fn from_traceparent(value: &str) -> Result<Self, TraceparentError> {
        let b = value.trim().as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return Err(TraceparentError::Malformed);
        }
        let version = parse_hex(&b[0..2]).ok_or(TraceparentError::Malformed)?;
        if version == 0xff {
            return Err(TraceparentError::BadVersion);
        }
        if (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return Err(TraceparentError::Malformed);
        }
        let trace_id = parse_hex(&b[3..35]).ok_or(TraceparentError::Malformed)?;
        let span_id = parse_hex(&b[36..52]).ok_or(TraceparentError::Malformed)?;
        let flags = parse_hex(&b[53..55]).ok_or(TraceparentError::Malformed)?;
        if trace_id == 0 || span_id == 0 {
            return Err(TraceparentError::ZeroId);
        }
        Ok(Self {
            trace_id,
            span_id: span_id as u64,
            flags: flags as u8,
        })
    }

    /// The `traceparent` header value naming this span as the parent, without
    /// allocating: `00-<trace id>-<span id>-<flags>`.
    pub fn traceparent(&self) -> Traceparent {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 55];
        out[0] = b'0';
        out[1] = b'0';
        out[2] = b'-';
        for i in 0..32 {
            out[3 + i] = HEX[((self.trace_id >> (124 - 4 * i)) & 0xf) as usize];
        }
        out[35] = b'-';
        for i in 0..16 {
            out[36 + i] = HEX[((self.span_id >> (60 - 4 * i)) & 0xf) as usize];
        }
        out[52] = b'-';
        out[53] = HEX[usize::from(self.flags >> 4)];
        out[54] = HEX[usize::from(self.flags & 0xf)];
        Traceparent(out)
    }
}

/// A formatted `traceparent` header value (55 ASCII bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Traceparent([u8; 55]);

impl Traceparent {
    /// The header value.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits and dashes are ever written.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Display for Traceparent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Traceparent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Traceparent({})", self.as_str())
    }
}

/// A bijection on u64 (the splitmix64 finalizer): distinct inputs, distinct outputs.
const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The process's seeds and the fork count they were taken at.
struct Seeds {
    span: u64,
    trace: u64,
    forks: u64,
}

static SEEDS: OnceLock<std::sync::Mutex<Seeds>> = OnceLock::new();
static NEXT_THREAD: AtomicU64 = AtomicU64::new(1);

fn random_u64() -> u64 {
    // The standard library's hasher keys come from the OS's random source.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

fn fresh_seeds(forks: u64) -> Seeds {
    Seeds {
        span: random_u64(),
        trace: random_u64(),
        forks,
    }
}

/// (span seed, trace seed), taken again after a fork so a child never repeats its
/// parent's ids.
fn seeds() -> (u64, u64) {
    let forks = crate::source::forks();
    let cell = SEEDS.get_or_init(|| std::sync::Mutex::new(fresh_seeds(forks)));
    let mut s = cell
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if s.forks != forks {
        *s = fresh_seeds(forks);
    }
    (s.span, s.trace)
}

#[derive(Clone, Copy)]
struct ThreadIds {
    /// 0: not set up yet.
    thread: u64,
    next: u64,
    span_seed: u64,
    trace_seed: u64,
    forks: u64,
}

thread_local! {
    static IDS: Cell<ThreadIds> = const {
        Cell::new(ThreadIds { thread: 0, next: 0, span_seed: 0, trace_seed: 0, forks: 0 })
    };
}

#[cold]
#[inline(never)]
fn setup(ids: &mut ThreadIds) {
    let (span_seed, trace_seed) = seeds();
    *ids = ThreadIds {
        thread: NEXT_THREAD.fetch_add(1, Ordering::Relaxed),
        next: 0,
        span_seed,
        trace_seed,
        forks: crate::source::forks(),
    };
}

/// A new span id and the trace id a root span with it would start: nonzero, unique
/// within the process, random across processes. One thread-local read and write; the
/// fork check is one relaxed load.
pub(crate) fn next_ids() -> (u64, u128) {
    IDS.with(|cell| {
        let mut ids = cell.get();
        if ids.thread == 0 || ids.forks != crate::source::forks() {
            setup(&mut ids);
        }
        loop {
            let raw = (ids.thread << 40) | (ids.next & ((1 << 40) - 1));
            ids.next = ids.next.wrapping_add(1);
            let span = mix(raw.wrapping_add(ids.span_seed));
            if span != 0 {
                let trace_hi = mix(raw ^ ids.trace_seed) | 1;
                cell.set(ids);
                return (span, (u128::from(trace_hi) << 64) | u128::from(span));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_refuses_bad_input() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = SpanContext::from_traceparent(v).expect("the W3C example");
        assert_eq!(c.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(c.span_id, 0x00f067aa0ba902b7);
        assert_eq!(c.flags, 1);
        assert_eq!(c.traceparent().as_str(), v);
        let e = |s| SpanContext::from_traceparent(s).err();
        assert_eq!(
            e("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some(TraceparentError::ZeroId)
        );
        assert_eq!(
            e("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some(TraceparentError::BadVersion)
        );
        assert_eq!(
            e("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            Some(TraceparentError::Malformed)
        );
        assert_eq!(e("00-4bf9"), Some(TraceparentError::Malformed));
        assert_eq!(
            e("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"),
            Some(TraceparentError::Malformed)
        );
        // A later version may carry more fields.
        assert!(
            SpanContext::from_traceparent(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
            )
            .is_ok()
        );
    }

    #[test]
    fn ids_are_nonzero_and_distinct_across_threads() {
        let mut all = std::collections::HashSet::new();
        let handles: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..10_000).map(|_| next_ids()).collect::<Vec<_>>()))
            .collect();
        for h in handles {
            for (span, trace) in h.join().expect("no panic") {
                assert_ne!(span, 0);
                assert_ne!(trace >> 64, 0);
                assert!(all.insert(span), "span id {span:x} repeated");
            }
        }
        assert_eq!(all.len(), 40_000);
    }
}
