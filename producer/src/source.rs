//! Where per-thread rings come from: the [`RingSource`] trait, and the generation that
//! tells every thread its ring went stale.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use telemetry_abi::GrantStatus;
use telemetry_ring::{MemfdError, MemfdRegion, Writer};

/// Grants rings to producing threads. The default is
/// [`SocketSource`](crate::SocketSource) (metricsd's control socket, memfd over
/// `SCM_RIGHTS`); another kernel's capability mechanism implements this trait instead.
///
/// `claim` runs on the claiming thread's slow path (first record, or after its ring
/// went stale), never per sample. It may block briefly but must not wait without a
/// bound.
pub trait RingSource: Send + Sync {
    /// One new ring for the calling thread. `hint` is a diagnostic label (the thread's
    /// serial number in this process), never trusted by the consumer.
    fn claim(&self, hint: u64) -> Result<(Writer<MemfdRegion>, RingInfo), ClaimError>;
}

/// What is known about a granted ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingInfo {
    /// The consumer's id for the ring.
    pub ring_id: u32,
    /// Records in the ring.
    pub capacity: u32,
    /// The epoch in the ring's header.
    pub epoch: u64,
    /// The [`generation`] the ring belongs to: once [`invalidate`] moves past it, every
    /// thread holding such a ring claims a new one.
    pub generation: u64,
}

/// Why no ring was granted.
#[derive(Debug)]
pub enum ClaimError {
    /// No consumer to ask: the socket is missing, refused the connection, or the
    /// connection broke. Retried with backoff.
    Unreachable {
        /// What failed (`connect`, `send`, `recv`, or `backoff` while waiting to retry).
        step: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The consumer refused (`over_limit`: this service holds as many rings as its
    /// policy allows; `rate_limited`, `unavailable`, `invalid_args`).
    Refused(GrantStatus),
    /// The consumer answered something this version does not understand.
    Protocol(&'static str),
    /// The granted fd could not be mapped as a ring.
    Attach(MemfdError),
}

impl fmt::Display for ClaimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable { step, source } => {
                write!(f, "metricsd is unreachable ({step}: {source})")
            }
            Self::Refused(status) => match status.name() {
                Some(name) => write!(f, "metricsd refused the ring: {name}"),
                None => write!(
                    f,
                    "metricsd refused the ring with unknown status {}",
                    status.0
                ),
            },
            Self::Protocol(what) => write!(f, "grant protocol error: {what}"),
            Self::Attach(e) => write!(f, "granted ring could not be attached: {e}"),
        }
    }
}

impl std::error::Error for ClaimError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unreachable { source, .. } => Some(source),
            Self::Attach(e) => Some(e),
            _ => None,
        }
    }
}

/// The generation every thread compares its ring against: one relaxed load per record.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The current ring generation. A [`RingSource`] stamps each ring it grants with it.
#[inline(always)]
pub fn generation() -> u64 {
    // ORDERING: Relaxed: advisory. A thread that sees the old value a little longer
    // writes a few more records into a ring nobody reads (they are lost with the
    // consumer that died), then sees the new value and claims again.
    GENERATION.load(Ordering::Relaxed)
}

/// Declares every ring of generation `stale` dead (the consumer went away): each thread
/// holding one claims a new ring on its next record. Does nothing if the generation
/// already moved on. Returns the current generation.
pub fn invalidate(stale: u64) -> u64 {
    // ORDERING: Relaxed: see `generation`; nothing is published through this word.
    match GENERATION.compare_exchange(
        stale,
        stale.wrapping_add(1),
        Ordering::Relaxed,
        Ordering::Relaxed,
    ) {
        Ok(_) => stale.wrapping_add(1),
        Err(now) => now,
    }
}
