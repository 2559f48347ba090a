//! The consumer's half, written for a producer that may be hostile.
//!
//! Calls [`Region::read_slot`], whose precondition the protocol below provides.
#![expect(
    unsafe_code,
    reason = "copies record slots out under the ring protocol"
)]

use telemetry_abi::{CONSUMER_FLAG_CLOSED, CONSUMER_FLAG_QUARANTINED, Record};

use crate::error::{Quarantined, Violation};
use crate::region::Region;
use crate::sync::Ordering;

/// What one [`Reader::drain`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Records consumed (delivered plus rejected).
    pub consumed: u64,
    /// Records handed to the callback.
    pub delivered: u64,
    /// Records rejected because their kind is not one the ABI defines.
    pub unknown_kind: u64,
    /// Records published and still unread after this drain (the budget ran out).
    pub remaining: u64,
}

/// Running totals of a reader, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Records consumed in all.
    pub consumed: u64,
    /// Records handed to callbacks.
    pub delivered: u64,
    /// Records rejected for an unknown kind.
    pub unknown_kind: u64,
    /// Times the write position was out of range (each quarantines the ring).
    pub write_out_of_range: u64,
    /// Times the write position moved back (each quarantines the ring).
    pub write_moved_back: u64,
    /// Times the shared dropped counter went down (counted, not quarantined: it only
    /// misreports the producer's own losses).
    pub dropped_moved_back: u64,
    /// The producer's dropped-record count, the highest value seen.
    pub producer_dropped: u64,
}

/// The consumer's half of a ring.
///
/// It trusts nothing the producer can write: it keeps the geometry and its read
/// position privately, reads the shared write position once per drain and checks it,
/// copies each record out exactly once before looking at it, and bounds its work by a
/// per-call budget. A protocol violation quarantines the ring: it is counted, the
/// consumer flag is raised, and every later drain returns [`Quarantined`].
#[derive(Debug)]
pub struct Reader<R: Region> {
    region: R,
    mask: u64,
    capacity: u64,
    read: u64,
    last_write: u64,
    /// The shared dropped counter as last read (a decrease is counted once, when seen).
    last_dropped: u64,
    quarantine: Option<Violation>,
    stats: ReaderStats,
    /// Whether the shared read position waits for [`release`](Self::release) instead
    /// of following each drain.
    deferred: bool,
    /// The position last released to the producer while release is deferred.
    released: u64,
}

impl<R: Region> Reader<R> {
    /// The reader of a fresh `region`, starting at position 0, where every new region's
    /// positions start.
    ///
    /// It never reads the consumer line: a producer can write that word too (between
    /// the grant and this call, or at any time), and no word a producer can write may
    /// set where the consumer reads. Create readers only over regions the consumer side
    /// laid out.
    pub fn new(region: R) -> Self {
        Self::starting_at(region, 0)
    }

    /// The reader of `region`, starting at `read`, a position the consumer kept itself
    /// (never one read back from the region). Its first drain expects the write
    /// position within a capacity ahead of `read`.
    pub fn starting_at(region: R, read: u64) -> Self {
        let geometry = region.geometry();
        Self {
            mask: geometry.mask(),
            capacity: u64::from(geometry.capacity()),
            region,
            read,
            last_write: read,
            last_dropped: 0,
            quarantine: None,
            stats: ReaderStats::default(),
            deferred: false,
            released: read,
        }
    }

    /// Makes the shared read position wait for [`release`](Self::release): a
    /// consumer that persists what it reads (a write-ahead log) releases slots to the
    /// producer only once what they held is durable, so the producer never overwrites
    /// a record the consumer would need again after a crash. Dropping the reader still
    /// releases everything read (a clean close).
    pub fn defer_release(&mut self) {
        self.deferred = true;
    }

    /// Releases the slots below `position` to the producer. A position beyond what
    /// was read, or behind an earlier release, is ignored: the producer only ever sees
    /// the read position move forward, and never past what was read.
    pub fn release(&mut self, position: u64) {
        let behind_read = self.read.wrapping_sub(position);
        let past_released = position.wrapping_sub(self.released);
        if behind_read > self.capacity || past_released > self.capacity {
            return;
        }
        self.released = position;
        // ORDERING: Release pairs with the writer's Acquire reload of the read
        // position: our copies of these slots happen-before it overwrites them.
        self.region.read_pos().store(position, Ordering::Release);
    }

    /// Copies out up to `budget` published records, oldest first, and hands each one
    /// with a known kind to `deliver`; the rest are counted in [`Drained::unknown_kind`].
    /// The slots are released to the producer once, at the end.
    ///
    /// Returns [`Quarantined`] without touching the records if the producer broke the
    /// protocol, now or before.
    pub fn drain(
        &mut self,
        budget: u64,
        mut deliver: impl FnMut(Record),
    ) -> Result<Drained, Quarantined> {
        let available = self.available()?;
        let take = available.min(budget);
        let mut drained = Drained {
            remaining: available - take,
            ..Drained::default()
        };
        for i in 0..take {
            let slot = (self.read.wrapping_add(i) & self.mask) as usize;
            // SAFETY: masked by the private geometry, `slot < capacity`; it lies in
            // `read..write`, published to us by the Acquire load in `available`; the
            // producer may not reuse it until we store `read` below. A producer breaking
            // that rule only races with a race-tolerant copy.
            let record = unsafe { self.region.read_slot(slot) };
            if record.kind.is_known() {
                drained.delivered += 1;
                deliver(record);
            } else {
                drained.unknown_kind += 1;
            }
        }
        drained.consumed = take;
        if take > 0 {
            self.read = self.read.wrapping_add(take);
            if self.deferred {
                self.stats.consumed += drained.consumed;
                self.stats.delivered += drained.delivered;
                self.stats.unknown_kind += drained.unknown_kind;
                return Ok(drained);
            }
            // ORDERING: Release pairs with the writer's Acquire reload of the read
            // position: our copies above happen-before it overwrites these slots.
            self.region.read_pos().store(self.read, Ordering::Release);
        }
        self.stats.consumed += drained.consumed;
        self.stats.delivered += drained.delivered;
        self.stats.unknown_kind += drained.unknown_kind;
        Ok(drained)
    }

    /// Whether the producer has published nothing beyond our read position, by one
    /// load of the write position and no other effect: a cheap look before a drain, for a
    /// consumer that visits many rings. A hostile write position is not judged here; the
    /// next [`drain`](Self::drain) judges it.
    #[inline]
    pub fn looks_empty(&self) -> bool {
        if self.quarantine.is_some() {
            return true;
        }
        // ORDERING: Relaxed is enough for a hint: nothing is read on its strength; a
        // drain that follows loads the position again with Acquire.
        self.region.write_pos().load(Ordering::Relaxed) == self.read
    }

    /// Records published and not yet read, after checking the write position.
    pub fn pending(&mut self) -> Result<u64, Quarantined> {
        self.available()
    }

    /// Loads the write position once, checks it, and returns how many records it
    /// publishes beyond our read position.
    fn available(&mut self) -> Result<u64, Quarantined> {
        if let Some(violation) = self.quarantine {
            return Err(Quarantined(violation));
        }
        // ORDERING: Acquire pairs with the writer's Release store of the write position:
        // the records below it are fully written before we copy them.
        let write = self.region.write_pos().load(Ordering::Acquire);
        let available = write.wrapping_sub(self.read);
        if write.wrapping_sub(self.last_write) > u64::MAX / 2 {
            return Err(self.quarantine_for(Violation::WriteMovedBack {
                before: self.last_write,
                now: write,
            }));
        }
        if available > self.capacity {
            return Err(self.quarantine_for(Violation::WriteOutOfRange {
                read: self.read,
                write,
            }));
        }
        self.last_write = write;
        self.observe_dropped();
        Ok(available)
    }

    fn observe_dropped(&mut self) {
        // ORDERING: Relaxed: an informational counter the producer may lie about.
        let dropped = self.region.dropped().load(Ordering::Relaxed);
        // Each move down counted once, not once per drain while the word stays low.
        if dropped < self.last_dropped {
            self.stats.dropped_moved_back += 1;
        }
        self.last_dropped = dropped;
        self.stats.producer_dropped = self.stats.producer_dropped.max(dropped);
    }

    #[cold]
    fn quarantine_for(&mut self, violation: Violation) -> Quarantined {
        match violation {
            Violation::WriteOutOfRange { .. } => self.stats.write_out_of_range += 1,
            Violation::WriteMovedBack { .. } => self.stats.write_moved_back += 1,
        }
        self.quarantine = Some(violation);
        // ORDERING: Relaxed: advisory to the producer; nothing is published through it.
        self.region
            .consumer_flags()
            .fetch_or(CONSUMER_FLAG_QUARANTINED, Ordering::Relaxed);
        Quarantined(violation)
    }

    /// The violation that quarantined this ring, if any.
    pub fn quarantined(&self) -> Option<Violation> {
        self.quarantine
    }

    /// Running totals.
    pub fn stats(&self) -> ReaderStats {
        self.stats
    }

    /// The position last released to the producer (the read position unless release
    /// is deferred).
    pub fn released(&self) -> u64 {
        if self.deferred {
            self.released
        } else {
            self.read
        }
    }

    /// The reader's own read position.
    pub fn position(&self) -> u64 {
        self.read
    }

    /// The ring's capacity in records.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The region this reader reads from.
    pub fn region(&self) -> &R {
        &self.region
    }
}

impl<R: Region> Drop for Reader<R> {
    fn drop(&mut self) {
        if self.deferred && self.quarantine.is_none() {
            // A clean close: everything read is accounted for by the consumer.
            self.release(self.read);
        }
        // ORDERING: Release pairs with `Writer::is_closed`'s Acquire load: a producer
        // that sees the flag also sees our final read position (stored before it), so
        // it knows exactly which records were never read.
        self.region
            .consumer_flags()
            .fetch_or(CONSUMER_FLAG_CLOSED, Ordering::Release);
    }
}
