//! What the process-wide recorder dropped and why: [`stats()`](crate::stats).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a record was dropped by the process-wide recorder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// The thread had no ring because metricsd was unreachable (not running, socket
    /// missing, connection refused or broken), or its ring went away with the
    /// connection before the record (a span's end, say) could be written, or metricsd
    /// closed the ring (a restart) before reading the record. Counter increments are
    /// not dropped for the last reason: they go to the next ring.
    NoMetricsd,
    /// metricsd refused the ring: the service holds as many rings as its policy allows.
    OverLimit,
    /// metricsd refused the ring for another reason (`rate_limited`, `unavailable`,
    /// `invalid_args`), answered something unexpected, or sent a ring that could not
    /// be attached.
    Refused,
    /// The thread's ring was full. Counter increments are not dropped for this: they
    /// wait and coalesce; only pending deltas still unwritten at thread exit count here
    /// (one per key).
    RingFull,
    /// The handle is a no-op: the process already registered as many keys as allowed.
    KeyLimit,
    /// The handle is a no-op: its name, labels or attribute were refused (too long,
    /// bad characters, too many labels).
    Invalid,
    /// A span attribute past the per-span limit ([`MAX_SPAN_ATTRS`](crate::MAX_SPAN_ATTRS)).
    AttrLimit,
    /// The thread's recorder could not be used: the thread is exiting (its
    /// thread-local state is gone) or the record was made from inside the recorder
    /// (a signal handler interrupting a record, a `RingSource` that records).
    Unavailable,
}

impl DropReason {
    /// Every reason, in a stable order.
    pub const ALL: [Self; 8] = [
        Self::NoMetricsd,
        Self::OverLimit,
        Self::Refused,
        Self::RingFull,
        Self::KeyLimit,
        Self::Invalid,
        Self::AttrLimit,
        Self::Unavailable,
    ];

    /// A short stable name for export.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NoMetricsd => "no_metricsd",
            Self::OverLimit => "over_limit",
            Self::Refused => "refused",
            Self::RingFull => "ring_full",
            Self::KeyLimit => "key_limit",
            Self::Invalid => "invalid",
            Self::AttrLimit => "attr_limit",
            Self::Unavailable => "unavailable",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A snapshot of the process-wide recorder's counts, summed over every thread (live
/// and exited). Drops are in records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    dropped: [u64; DropReason::ALL.len()],
    /// Counter increments that found their ring full and were held back to be written
    /// later (coalesced per key). Not a loss.
    pub coalesced: u64,
    /// Counter increments given up: pending deltas still unwritten when their thread
    /// exited (its ring full, or no ring). Their records are counted in
    /// [`DropReason::RingFull`] / [`DropReason::NoMetricsd`], one per key; this is the
    /// amount they carried. Zero unless a thread exits owing increments: call
    /// [`flush_for`](crate::flush_for) before a thread ends to make sure.
    pub lost_increments: u64,
    /// Rings granted to this process's threads.
    pub rings_claimed: u64,
    /// Claims that failed (each is followed by a backoff).
    pub claim_failures: u64,
    /// Records a thread let go of unconfirmed: they were published into a ring whose
    /// consumer had neither read them nor closed the ring when the thread gave it up
    /// (a newer ring of the thread retired, or the thread exited). Normally metricsd
    /// closes a ring after its last drain and the thread accounts for what it left
    /// unread exactly (counter increments resent, the rest dropped); these rings never
    /// got that far, because metricsd crashed (then the records are lost) or restarted
    /// twice within one drain (then it may still read them). Not counted as dropped,
    /// and counter increments among them are not resent, which could count them twice.
    pub unconfirmed: u64,
    /// Counter increments and gauge sets made while their thread had no ring (no
    /// metricsd reachable, or it refused rings) and held per key in the thread's key
    /// table, to be delivered when a ring is claimed again. Not a loss; what a thread
    /// still holds when it exits is counted in [`DropReason::NoMetricsd`] (one record
    /// per key) and [`lost_increments`](Self::lost_increments).
    pub held: u64,
    /// Keys registered in the process (series, span names, attribute keys, strings).
    pub keys: u32,
}

impl Stats {
    /// Records dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    /// Records dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

/// Indices into a thread's counters past the drop reasons.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Event {
    Dropped(DropReason),
    Coalesced,
    LostIncrements,
    RingClaimed,
    ClaimFailed,
    Unconfirmed,
    Held,
}

const EVENTS: usize = DropReason::ALL.len() + 6;

impl Event {
    const fn index(self) -> usize {
        match self {
            Self::Dropped(r) => r.index(),
            Self::Held => EVENTS - 6,
            Self::Coalesced => EVENTS - 5,
            Self::Unconfirmed => EVENTS - 4,
            Self::LostIncrements => EVENTS - 3,
            Self::RingClaimed => EVENTS - 2,
            Self::ClaimFailed => EVENTS - 1,
        }
    }
}

/// One thread's counts: written by that thread only, read by [`stats()`](crate::stats).
#[derive(Debug, Default)]
pub(crate) struct Counts([AtomicU64; EVENTS]);

impl Counts {
    /// Adds `n` on the owning thread (no read-modify-write: it is the only writer).
    pub(crate) fn add_local(&self, event: Event, n: u64) {
        let word = &self.0[event.index()];
        // ORDERING: Relaxed: counters; `stats()` takes a momentary snapshot.
        word.store(
            word.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Adds every count of `other` into `self` (shared).
    pub(crate) fn absorb(&self, other: &Counts) {
        for (mine, theirs) in self.0.iter().zip(&other.0) {
            // ORDERING: Relaxed: counters.
            mine.fetch_add(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Adds these counts into `stats`.
    pub(crate) fn sum_into(&self, stats: &mut Stats) {
        // ORDERING: Relaxed: counters.
        let get = |e: Event| self.0[e.index()].load(Ordering::Relaxed);
        for reason in DropReason::ALL {
            stats.dropped[reason.index()] += get(Event::Dropped(reason));
        }
        stats.coalesced += get(Event::Coalesced);
        stats.lost_increments += get(Event::LostIncrements);
        stats.rings_claimed += get(Event::RingClaimed);
        stats.claim_failures += get(Event::ClaimFailed);
        stats.unconfirmed += get(Event::Unconfirmed);
        stats.held += get(Event::Held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_by_reason() {
        let a = Counts::default();
        a.add_local(Event::Dropped(DropReason::RingFull), 3);
        a.add_local(Event::Coalesced, 2);
        a.add_local(Event::Unconfirmed, 4);
        let b = Counts::default();
        b.add_local(Event::Dropped(DropReason::NoMetricsd), 5);
        b.absorb(&a);
        let mut stats = Stats::default();
        b.sum_into(&mut stats);
        assert_eq!(stats.dropped(DropReason::RingFull), 3);
        assert_eq!(stats.dropped(DropReason::NoMetricsd), 5);
        assert_eq!(stats.dropped_total(), 8);
        assert_eq!(stats.coalesced, 2);
        assert_eq!(stats.unconfirmed, 4);
        assert_eq!(stats.claim_failures, 0);
        let names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), 8);
        assert!(
            DropReason::ALL
                .iter()
                .enumerate()
                .all(|(i, r)| r.index() == i)
        );
    }
}
