//! The producer's half.
//!
//! Calls [`Region::write_slot`], whose precondition the protocol below provides.
#![expect(unsafe_code, reason = "writes record slots under the ring protocol")]

use telemetry_abi::{CONSUMER_FLAG_CLOSED, CONSUMER_FLAG_QUARANTINED, Record};

use crate::error::Full;
use crate::region::Region;
use crate::sync::Ordering;

/// The producer's half of a ring: writes records and publishes them.
///
/// Never blocks, allocates or panics. The consumer's position is cached and reloaded
/// only when the ring looks full, so a push that finds room touches no line the
/// consumer writes.
///
/// ```
/// use std::sync::Arc;
/// use telemetry_abi::Record;
/// use telemetry_ring::{HeapRegion, Reader, Writer};
///
/// let region = Arc::new(HeapRegion::new(8).expect("8 is a valid capacity"));
/// let mut writer = Writer::new(region.clone());
/// let mut reader = Reader::new(region);
///
/// writer.push(Record::counter(1, 5)).expect("room for one");
/// writer.stage(Record::counter(1, 6)).expect("room for two");
/// writer.flush();
///
/// let mut seen = Vec::new();
/// reader.drain(16, |r| seen.push(r.words[0])).expect("not quarantined");
/// assert_eq!(seen, [5, 6]);
/// ```
#[derive(Debug)]
pub struct Writer<R: Region> {
    region: R,
    mask: u64,
    capacity: u64,
    /// `capacity - PREPARE_AHEAD`, or 0 for a ring of at most that many records: with
    /// fewer records than this unread (as last seen), a write has room and the slot
    /// [`PREPARE_AHEAD`] on is released, so it may be hinted (see [`Self::roomy`]).
    roomy_below: u64,
    /// Next position to write. Staged records lie between the shared write position
    /// (what the consumer can see, which only this writer stores) and here.
    write: u64,
    /// The consumer's read position as last loaded.
    cached_read: u64,
    /// Records given up on; mirrored to the shared `dropped` word.
    dropped: u64,
}

impl<R: Region> Writer<R> {
    /// The writer of `region`, continuing from the positions the region holds (zero
    /// for a new region).
    pub fn new(region: R) -> Self {
        let geometry = region.geometry();
        // ORDERING: Relaxed is enough at attach: a new region's words are zero and the
        // region reached this thread through a synchronising hand-over (a spawn, a
        // channel, an fd received over a socket).
        let write = region.write_pos().load(Ordering::Relaxed);
        let cached_read = region.read_pos().load(Ordering::Acquire);
        let dropped = region.dropped().load(Ordering::Relaxed);
        let capacity = u64::from(geometry.capacity());
        Self {
            mask: geometry.mask(),
            capacity,
            roomy_below: capacity.saturating_sub(PREPARE_AHEAD),
            region,
            write,
            cached_read,
            dropped,
        }
    }

    /// Writes `record` and publishes it together with anything staged. On a full ring
    /// nothing is written, the record is counted as dropped, and `Err(Full)` returned.
    #[inline]
    pub fn push(&mut self, record: Record) -> Result<(), Full> {
        let Some(hint) = self.room_for_one() else {
            self.count_dropped(1);
            return Err(Full);
        };
        self.write_and_publish(record, hint);
        Ok(())
    }

    /// Like [`push`](Self::push), but a full ring is not counted as a drop: the caller
    /// keeps the record and will account for it (for example by coalescing a counter
    /// increment into a later record).
    #[inline]
    pub fn try_push(&mut self, record: Record) -> Result<(), Full> {
        let Some(hint) = self.room_for_one() else {
            return Err(Full);
        };
        self.write_and_publish(record, hint);
        Ok(())
    }

    /// Writes `record` without publishing it: it becomes visible at the next
    /// [`flush`](Self::flush) or publishing push. On a full ring the record is counted as
    /// dropped and `Err(Full)` returned.
    #[inline]
    pub fn stage(&mut self, record: Record) -> Result<(), Full> {
        let Some(hint) = self.room_for_one() else {
            self.count_dropped(1);
            return Err(Full);
        };
        self.write = self.write_next(record, hint);
        Ok(())
    }

    /// Writes all of `records` and publishes them (and anything staged) with one store,
    /// or, if they do not all fit, writes none of them, counts them all as dropped and
    /// returns `Err(Full)`. Publication is all or nothing for the slice.
    pub fn push_all(&mut self, records: &[Record]) -> Result<(), Full> {
        let n = records.len() as u64;
        if !self.has_room(n) {
            self.count_dropped(n);
            return Err(Full);
        }
        self.write_run(n, records.iter().copied());
        Ok(())
    }

    /// Writes `n` records, the `i`th being `record(i)`, straight into their slots and
    /// publishes them (and anything staged) with one store: the batch path with no
    /// copy through the caller's memory. If they do not all fit, `record` is not
    /// called, nothing is written, the `n` records are counted as dropped and
    /// `Err(Full)` returned. Publication is all or nothing for the batch.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use telemetry_abi::Record;
    /// use telemetry_ring::{HeapRegion, Reader, Writer};
    ///
    /// let region = Arc::new(HeapRegion::new(8).expect("8 is a valid capacity"));
    /// let (mut writer, mut reader) = (Writer::new(region.clone()), Reader::new(region));
    /// writer.push_with(3, |i| Record::counter(1, 10 + i)).expect("room for three");
    /// let mut seen = Vec::new();
    /// reader.drain(8, |r| seen.push(r.words[0])).expect("not quarantined");
    /// assert_eq!(seen, [10, 11, 12]);
    /// ```
    #[inline]
    pub fn push_with(&mut self, n: u64, mut record: impl FnMut(u64) -> Record) -> Result<(), Full> {
        if !self.has_room(n) {
            self.count_dropped(n);
            return Err(Full);
        }
        self.write_run(n, (0..n).map(&mut record));
        Ok(())
    }

    /// Publishes every staged record. Cheap when nothing is staged.
    #[inline]
    pub fn flush(&mut self) {
        if self.published() != self.write {
            self.publish();
        }
    }

    /// The write position last published. This writer is the only one that stores it,
    /// so it is read back here (once per flush, never on a push) instead of each push
    /// storing a private copy. A push must not load it: the consumer polls that line,
    /// and a push that read its position from it measured two to three times slower.
    #[inline(always)]
    fn published(&self) -> u64 {
        // ORDERING: Relaxed: the word's only writer reads its own last store.
        self.region.write_pos().load(Ordering::Relaxed)
    }

    /// Publishes up to `write`.
    #[inline(always)]
    fn publish(&mut self) {
        // ORDERING: Release pairs with the reader's Acquire load of the write position:
        // the slot writes before it happen-before the reader's copies.
        self.region.write_pos().store(self.write, Ordering::Release);
    }

    /// Counts `n` records the caller gave up on (for example because a push returned
    /// `Full` from [`try_push`](Self::try_push) and it will not retry).
    pub fn count_dropped(&mut self, n: u64) {
        self.dropped = self.dropped.wrapping_add(n);
        // ORDERING: Relaxed: an informational counter; no data is published through it.
        self.region.dropped().store(self.dropped, Ordering::Relaxed);
    }

    /// Records this writer has counted as dropped.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Records that fit now without blocking (reloads the consumer's position).
    pub fn free(&mut self) -> u64 {
        self.refresh();
        self.capacity
            .saturating_sub(self.write.wrapping_sub(self.cached_read))
    }

    /// Records staged and not yet published.
    pub fn staged(&self) -> u64 {
        self.write.wrapping_sub(self.published())
    }

    /// The ring's capacity in records.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the consumer has quarantined or closed this ring: nothing written will
    /// be read any more.
    pub fn is_abandoned(&self) -> bool {
        // ORDERING: Relaxed: advisory; the producer only stops wasting effort.
        let flags = self.region.consumer_flags().load(Ordering::Relaxed);
        flags & (CONSUMER_FLAG_QUARANTINED | CONSUMER_FLAG_CLOSED) != 0
    }

    /// Whether the consumer has closed this ring after its last drain: what it had not
    /// read by then ([`for_each_unconsumed`](Self::for_each_unconsumed)) it never will.
    pub fn is_closed(&self) -> bool {
        // ORDERING: Acquire pairs with the consumer's Release store of its final read
        // position, made before the flag (see `Reader`'s `Drop`): seeing the flag means
        // seeing that position.
        let flags = self.region.consumer_flags().load(Ordering::Acquire);
        flags & CONSUMER_FLAG_CLOSED != 0
    }

    /// Copies out, oldest first, every record this writer published that the consumer
    /// has not consumed, and returns how many. Once the ring [`is_closed`](Self::is_closed),
    /// these are exactly the records nobody will read, so the producer can account for
    /// them: send counter increments again on another ring, count the rest as dropped.
    /// Returns 0 without visiting anything if the consumer's position is not within a
    /// capacity behind ours.
    pub fn for_each_unconsumed(&mut self, mut visit: impl FnMut(Record)) -> u64 {
        // ORDERING: Acquire pairs with the reader's Release store of the read position.
        let read = self.region.read_pos().load(Ordering::Acquire);
        let unconsumed = self.published().wrapping_sub(read);
        if unconsumed > self.capacity {
            return 0;
        }
        for i in 0..unconsumed {
            let slot = (read.wrapping_add(i) & self.mask) as usize;
            // SAFETY: the slot is masked by the private geometry, so below the capacity;
            // we are the ring's only writer (`&mut self`), so no write to this slot can
            // happen while we copy it; a reader may be copying it too, which is a read
            // beside a read.
            visit(unsafe { self.region.read_slot(slot) });
        }
        unconsumed
    }

    /// The region this writer writes to.
    pub fn region(&self) -> &R {
        &self.region
    }

    /// Whether the ring, as last seen, has room for a record and [`PREPARE_AHEAD`]
    /// more: the common case, decided by one comparison. The slot `PREPARE_AHEAD` on
    /// from the write position is then one the consumer has released, so a write may
    /// hint it to the region. When false, [`has_room`](Self::has_room) decides.
    #[inline(always)]
    fn roomy(&self) -> bool {
        self.write.wrapping_sub(self.cached_read) < self.roomy_below
    }

    /// Whether one record fits: `Some(hint)`, where `hint` says [`roomy`](Self::roomy)
    /// decided it (so the write may hint ahead), or `None` for a full ring.
    #[inline(always)]
    fn room_for_one(&mut self) -> Option<bool> {
        let roomy = self.roomy();
        (roomy || self.has_room(1)).then_some(roomy)
    }

    #[inline(always)]
    fn has_room(&mut self, n: u64) -> bool {
        let used = self.write.wrapping_sub(self.cached_read);
        if used <= self.capacity && n <= self.capacity - used {
            return true;
        }
        self.refresh();
        let used = self.write.wrapping_sub(self.cached_read);
        used <= self.capacity && n <= self.capacity - used
    }

    #[cold]
    fn refresh(&mut self) {
        // ORDERING: Acquire pairs with the reader's Release store of the read position:
        // its copies out of the slots below it happen-before we overwrite them.
        self.cached_read = self.region.read_pos().load(Ordering::Acquire);
    }

    /// The batch paths' loop once `has_room(n)` said yes: writes the first `n` of
    /// `records` (fewer if it yields fewer) from the write position on, then publishes
    /// them with anything staged by one store. The position is kept in a local and every
    /// field loaded before the slots' stores, so the loop stores each record and
    /// nothing else (a position kept in `self` is stored and loaded again around every
    /// record: the compiler cannot tell that the slots' stores leave it alone). Each
    /// record is hinted as a single push's is ([`Self::put`]), whenever the cached read
    /// position shows the slot [`PREPARE_AHEAD`] records on released.
    #[inline(always)]
    fn write_run(&mut self, n: u64, records: impl Iterator<Item = Record>) {
        let position = self.region.write_pos();
        let (mask, cached_read, roomy_below) = (self.mask, self.cached_read, self.roomy_below);
        let mut write = self.write;
        for record in records.take(n as usize) {
            let hint = write.wrapping_sub(cached_read) < roomy_below;
            // SAFETY: `has_room(n)` showed `n` records fit from `self.write`, and at most
            // `n` are written (the `take`); we are the only writer (`&mut self`).
            unsafe { Self::put(&self.region, mask, write, record, hint) };
            write = write.wrapping_add(1);
        }
        self.write = write;
        // ORDERING: Release pairs with the reader's Acquire load of the write position:
        // the slot writes before it happen-before the reader's copies.
        position.store(write, Ordering::Release);
    }

    /// The pushes' path once `roomy` or `has_room` said yes (`hint`: `roomy` did):
    /// writes `record` and publishes it with anything staged. The write position's
    /// address is taken before the slot's stores and the new position kept in a
    /// register, so nothing is loaded again after them (the compiler cannot tell that
    /// those stores, through pointers into the region, leave the writer's own fields
    /// alone).
    #[inline(always)]
    fn write_and_publish(&mut self, record: Record, hint: bool) {
        let position = self.region.write_pos();
        let next = self.write_next(record, hint);
        self.write = next;
        // ORDERING: Release pairs with the reader's Acquire load of the write position:
        // the slot writes before it happen-before the reader's copies.
        position.store(next, Ordering::Release);
    }

    /// Stores `record` in the slot of the write position, hinting ahead when `hint`
    /// (`roomy` said yes; see [`Self::put`]), and returns the next position, once
    /// `has_room` or `roomy` showed `write - read < capacity`. Every field is loaded
    /// before the slot's stores.
    #[inline(always)]
    fn write_next(&self, record: Record, hint: bool) -> u64 {
        // SAFETY: `roomy` or `has_room` showed `write - read < capacity`; we are the only
        // writer (the callers hold `&mut self`).
        unsafe { Self::put(&self.region, self.mask, self.write, record, hint) };
        self.write.wrapping_add(1)
    }

    /// Stores `record` in the slot of position `write` (`mask`: the geometry's), first
    /// hinting the slot [`PREPARE_AHEAD`] records on to the region when `hint`: the
    /// caller's cached read position showed the consumer has released it, so the hint
    /// never pulls a line the consumer is about to read away from it. The one store of
    /// a record, for the single and the batch paths; `mask` and `write` come in as
    /// values so that a loop keeps them in registers.
    ///
    /// # Safety
    ///
    /// `mask` is this writer's geometry's, the caller showed `write - read < capacity`
    /// (the slot is not among those published and unread) and is the only writer.
    #[inline(always)]
    unsafe fn put(region: &R, mask: u64, write: u64, record: Record, hint: bool) {
        if hint {
            let ahead = write.wrapping_add(PREPARE_AHEAD);
            region.prepare_write((ahead & mask) as usize);
        }
        let slot = (write & mask) as usize;
        // SAFETY: masked by the private geometry, `slot < capacity`; the caller's
        // guarantees make the slot ours to write.
        unsafe { region.write_slot(slot, record) };
    }
}

/// How far ahead of the record it writes the writer tells the region which slot it
/// will write ([`Region::prepare_write`]): 32 records, 16 cache lines. On a mapped
/// region on x86-64 that is a `PREFETCHW`. Of the distances measured against each other
/// (16, 32, 64 and 96 records, and no hint), 32 gave the cheapest push where transfers
/// between the cores were slow, and cost about 0.3 ns where they were fast; the figures
/// are in `benches/README.md` as of commit a8cb4ac ("Run 6").
const PREPARE_AHEAD: u64 = 32;
