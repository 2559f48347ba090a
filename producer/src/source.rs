//! Where per-thread rings come from: the [`RingSource`] trait, and the generation that
//! tells every thread its ring went stale.

use std::fmt;
use std::io;
use std::sync::Once;
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
///
/// After `fork()`, the child's first record finds its inherited ring stale and claims
/// again in the child: a source that keeps per-process state (a connection) must not
/// use its parent's there. [`forks`] tells the two apart.
pub trait RingSource: Send + Sync {
    /// One new ring for the calling thread. `hint` is a diagnostic label (the thread's
    /// serial number in this process), never trusted by the consumer.
    fn claim(&self, hint: u64) -> Result<(Writer<MemfdRegion>, RingInfo), ClaimError>;

    /// Hands `ring` back to the consumer: a ring granted on an earlier connection
    /// whose consumer ended without closing it (it crashed). A consumer that logged the
    /// ring finishes it from the position it made durable and closes it; `true` when
    /// it answered that it did. The default source cannot: `false`.
    fn hand_back(&self, ring: &MemfdRegion, hint: u64) -> bool {
        let _ = (ring, hint);
        false
    }
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

/// Forks between the process that first used the library and this one.
static FORKS: AtomicU64 = AtomicU64::new(0);

/// Runs in a child process before `fork()` returns there (see [`watch_forks`]). Every
/// ring the child inherited is its parent's: moving the generation on makes each
/// thread's next record take the slow path, which sees [`forks`] changed and lets go of
/// the parent's state without touching it. Atomic adds only: the child may have
/// inherited any lock held.
extern "C" fn after_fork_in_child() {
    // ORDERING: Relaxed: the child's one thread reads both after `fork()` returns.
    FORKS.fetch_add(1, Ordering::Relaxed);
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Registers [`after_fork_in_child`] once per process, before the first ring is claimed.
pub(crate) fn watch_forks() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when the C library is out of memory for its handler list; the
        // library then works as before, without noticing forks.
        let _ = telemetry_ring::on_fork_child(after_fork_in_child);
    });
}

/// How many times the library's state has been carried across `fork()` into this
/// process: 0 in the process that first used it, 1 in a child it forked, and so on. A
/// [`RingSource`] that keeps a connection compares this with the count it connected
/// under, and opens its own connection in a child.
#[inline]
pub fn forks() -> u64 {
    // ORDERING: Relaxed: written only in a child before it returns from `fork()`.
    FORKS.load(Ordering::Relaxed)
}

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
