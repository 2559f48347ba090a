//! Unit tests of the protocol on the heap and mapped regions.
#![expect(unsafe_code, reason = "lays a MappedRegion over a test buffer")]

use std::sync::Arc;
use std::vec::Vec;

use telemetry_abi::{CONSUMER_FLAG_QUARANTINED, Geometry, Record, RecordKind};

use crate::sync::Ordering;
use crate::{Full, HeapRegion, Reader, Region, Violation, Writer};

fn pair(capacity: u64) -> (Writer<Arc<HeapRegion>>, Reader<Arc<HeapRegion>>) {
    let region = Arc::new(HeapRegion::new(capacity).expect("valid capacity"));
    (Writer::new(region.clone()), Reader::new(region))
}

fn drain_values<R: Region>(reader: &mut Reader<R>, budget: u64) -> Vec<u64> {
    let mut out = Vec::new();
    reader
        .drain(budget, |r| out.push(r.words[0]))
        .expect("not quarantined");
    out
}

#[test]
fn records_cross_in_order_across_wrap_arounds() {
    let (mut w, mut r) = pair(4);
    let mut next = 0u64;
    let mut expected = 0u64;
    for round in 0..50 {
        for _ in 0..(round % 4 + 1) {
            w.push(Record::counter(1, next))
                .expect("room after each drain");
            next += 1;
        }
        for v in drain_values(&mut r, 64) {
            assert_eq!(v, expected);
            expected += 1;
        }
    }
    assert_eq!(expected, next);
    assert!(next > 4 * 10, "wrapped many times");
}

#[test]
fn a_full_ring_refuses_and_counts_drops() {
    let (mut w, mut r) = pair(4);
    for i in 0..4 {
        w.push(Record::counter(1, i)).expect("room");
    }
    assert_eq!(w.push(Record::counter(1, 99)), Err(Full));
    assert_eq!(w.stage(Record::counter(1, 99)), Err(Full));
    assert_eq!(w.push_all(&[Record::counter(1, 99); 2]), Err(Full));
    assert_eq!(w.dropped(), 4);
    assert_eq!(w.try_push(Record::counter(1, 99)), Err(Full));
    assert_eq!(w.dropped(), 4, "try_push leaves accounting to the caller");
    assert_eq!(drain_values(&mut r, 64), [0, 1, 2, 3]);
    assert_eq!(
        r.stats().producer_dropped,
        4,
        "the reader sees the shared counter"
    );
    w.push(Record::counter(1, 4)).expect("room again");
    assert_eq!(drain_values(&mut r, 64), [4]);
}

#[test]
fn push_all_is_all_or_nothing_and_publishes_once() {
    let (mut w, mut r) = pair(8);
    w.push_all(&[
        Record::counter(1, 0),
        Record::counter(1, 1),
        Record::counter(1, 2),
    ])
    .expect("fits");
    assert_eq!(w.free(), 5);
    assert_eq!(w.push_all(&[Record::counter(1, 9); 6]), Err(Full));
    assert_eq!(w.free(), 5, "nothing of a refused batch was written");
    assert_eq!(drain_values(&mut r, 64), [0, 1, 2]);
}

#[test]
fn push_with_builds_each_record_in_place_all_or_nothing_with_staged_ones() {
    let (mut w, mut r) = pair(8);
    w.stage(Record::counter(1, 100)).expect("room");
    let mut asked = Vec::new();
    w.push_with(3, |i| {
        asked.push(i);
        Record::counter(1, i)
    })
    .expect("fits");
    assert_eq!(asked, [0, 1, 2], "each record asked for once, in order");
    assert_eq!(w.staged(), 0, "the staged record went out with the batch");
    // Four records unread: a batch of five does not fit, and nothing of it is asked for.
    let mut called = false;
    let refused = w.push_with(5, |_| {
        called = true;
        Record::counter(1, 9)
    });
    assert_eq!(refused, Err(Full));
    assert!(!called);
    assert_eq!((w.dropped(), w.free()), (5, 4));
    assert_eq!(drain_values(&mut r, 64), [100, 0, 1, 2]);
    // Around the end of the slots: positions 4..11 land in slots 4..7 and 0..3.
    w.push_with(8, |i| Record::counter(1, 10 + i))
        .expect("the reader released everything");
    assert_eq!(drain_values(&mut r, 64), (10..18).collect::<Vec<_>>());
    w.push_with(0, |_| Record::counter(1, 0))
        .expect("nothing to write");
    assert_eq!(r.pending(), Ok(0));
}

#[test]
fn staged_records_are_invisible_until_flush() {
    let (mut w, mut r) = pair(8);
    w.stage(Record::counter(1, 1)).expect("room");
    w.stage(Record::counter(1, 2)).expect("room");
    assert_eq!(w.staged(), 2);
    assert_eq!(r.pending(), Ok(0));
    assert!(drain_values(&mut r, 64).is_empty());
    w.flush();
    assert_eq!(w.staged(), 0);
    assert_eq!(drain_values(&mut r, 64), [1, 2]);
}

#[test]
fn the_budget_bounds_each_drain() {
    let (mut w, mut r) = pair(16);
    for i in 0..10 {
        w.stage(Record::counter(1, i)).expect("room");
    }
    w.flush();
    let d = r.drain(3, |_| {}).expect("fine");
    assert_eq!((d.consumed, d.remaining), (3, 7));
    assert_eq!(drain_values(&mut r, 100), [3, 4, 5, 6, 7, 8, 9]);
}

#[test]
fn unknown_kinds_are_counted_not_delivered() {
    let (mut w, mut r) = pair(8);
    w.push(Record {
        kind: RecordKind(0x4242),
        ..Record::counter(1, 7)
    })
    .expect("room");
    w.push(Record::default()).expect("room");
    w.push(Record::counter(1, 8)).expect("room");
    let mut seen = Vec::new();
    let d = r.drain(64, |rec| seen.push(rec.words[0])).expect("fine");
    assert_eq!(seen, [8]);
    assert_eq!((d.consumed, d.delivered, d.unknown_kind), (3, 1, 2));
    assert_eq!(r.stats().unknown_kind, 2);
}

#[test]
fn the_consumer_line_never_sets_the_read_position() {
    for scribble in [3, 1 << 40, u64::MAX, 0x9e37_79b9_7f4a_7c15] {
        let region = Arc::new(HeapRegion::new(8).expect("valid"));
        let mut w = Writer::new(region.clone());
        // The producer writes the consumer's word before the reader attaches...
        region.read_pos().store(scribble, Ordering::Relaxed);
        let mut r = Reader::new(region.clone());
        assert_eq!(r.position(), 0, "a fresh ring is read from 0");
        for i in 0..3 {
            w.push(Record::counter(1, i)).expect("room");
        }
        assert_eq!(drain_values(&mut r, 64), [0, 1, 2]);
        // ...and again between drains: the reader keeps its own position.
        region.read_pos().store(scribble, Ordering::Relaxed);
        w.push(Record::counter(1, 3)).expect("room");
        assert_eq!(drain_values(&mut r, 64), [3]);
        assert_eq!(r.position(), 4);
        assert_eq!(r.quarantined(), None, "scribble {scribble:#x}");
        assert_eq!(region.read_pos().load(Ordering::Relaxed), 4);
    }
}

#[test]
fn a_write_position_both_behind_and_far_ahead_counts_as_moved_back_once() {
    // (last accepted write position, the one seen next, the violation)
    let moved_back = |before: u64, now: u64| Violation::WriteMovedBack { before, now };
    let cases = [
        (5, 4, moved_back(5, 4)), // behind, and 2^64 - 1 ahead of read 5
        (5, 5 + (1 << 63), moved_back(5, 5 + (1 << 63))), // exactly 2^63 on: behind
        (
            5,
            4 + (1 << 63),
            Violation::WriteOutOfRange {
                read: 5,
                write: 4 + (1 << 63),
            },
        ),
        (5, 5 + 9, Violation::WriteOutOfRange { read: 5, write: 14 }),
        (0, 1 << 63, moved_back(0, 1 << 63)), // a fresh ring: measured from 0
    ];
    for (before, now, want) in cases {
        let region = Arc::new(HeapRegion::new(8).expect("valid"));
        let mut w = Writer::new(region.clone());
        let mut r = Reader::new(region.clone());
        for i in 0..before {
            w.push(Record::counter(1, i)).expect("room");
            assert_eq!(drain_values(&mut r, 8), [i]);
        }
        region.write_pos().store(now, Ordering::Release);
        let err = r
            .drain(8, |_| panic!("nothing delivered"))
            .expect_err("violation");
        assert_eq!(err.0, want, "{before} then {now}");
        let s = r.stats();
        assert_eq!(
            s.write_moved_back + s.write_out_of_range,
            1,
            "one violation"
        );
        assert!(r.pending().is_err(), "quarantined for good");
        assert_eq!(r.stats().write_moved_back + r.stats().write_out_of_range, 1);
    }
}

#[test]
fn a_write_position_past_capacity_quarantines() {
    let region = Arc::new(HeapRegion::new(8).expect("valid"));
    let mut r = Reader::new(region.clone());
    let w = Writer::new(region.clone());
    region.write_pos().store(9, Ordering::Release);
    let err = r
        .drain(64, |_| panic!("nothing may be delivered"))
        .expect_err("violation");
    assert_eq!(err.0, Violation::WriteOutOfRange { read: 0, write: 9 });
    assert_eq!(r.stats().write_out_of_range, 1);
    assert!(w.is_abandoned(), "the producer can see it was quarantined");
    assert_ne!(
        region.consumer_flags().load(Ordering::Relaxed) & CONSUMER_FLAG_QUARANTINED,
        0
    );
    // Even a now-sane position is never read again.
    region.write_pos().store(1, Ordering::Release);
    assert!(r.drain(64, |_| panic!("quarantined")).is_err());
    assert_eq!(r.stats().write_out_of_range, 1, "counted once, when found");
}

#[test]
fn a_write_position_moving_back_quarantines() {
    let (mut w, mut r) = pair(8);
    for i in 0..4 {
        w.push(Record::counter(1, i)).expect("room");
    }
    assert_eq!(drain_values(&mut r, 2), [0, 1]);
    r.region().write_pos().store(3, Ordering::Release);
    let err = r.pending().expect_err("moved back");
    assert_eq!(err.0, Violation::WriteMovedBack { before: 4, now: 3 });
    assert_eq!(r.stats().write_moved_back, 1);
}

#[test]
fn a_write_position_behind_the_reader_quarantines() {
    let (mut w, mut r) = pair(8);
    w.push(Record::counter(1, 0)).expect("room");
    assert_eq!(drain_values(&mut r, 8), [0]);
    r.region().write_pos().store(u64::MAX, Ordering::Release);
    assert!(r.drain(8, |_| {}).is_err());
    assert_eq!(
        r.quarantined().map(|v| v.reason()),
        Some("write_moved_back")
    );
}

#[test]
fn a_write_position_just_under_half_the_range_ahead_is_out_of_range_not_back() {
    // Positions compare by wrapping difference: up to 2^63 - 1 ahead is ahead.
    let (w, mut r) = pair(8);
    assert_eq!((w.capacity(), r.capacity()), (8, 8));
    let write = u64::MAX / 2;
    r.region().write_pos().store(write, Ordering::Release);
    let err = r.pending().expect_err("out of range");
    assert_eq!(err.0, Violation::WriteOutOfRange { read: 0, write });
}

#[test]
fn a_shrinking_dropped_counter_is_counted_but_tolerated() {
    let (mut w, mut r) = pair(2);
    w.count_dropped(10);
    assert_eq!(r.pending(), Ok(0));
    assert_eq!(r.stats().dropped_moved_back, 0, "a rise is not a move down");
    r.region().dropped().store(3, Ordering::Relaxed);
    assert_eq!(r.pending(), Ok(0));
    let s = r.stats();
    assert_eq!((s.producer_dropped, s.dropped_moved_back), (10, 1));
    // Once per move down, not once per look while it stays low.
    assert_eq!(r.pending(), Ok(0));
    assert_eq!(r.pending(), Ok(0));
    assert_eq!(r.stats().dropped_moved_back, 1);
    r.region().dropped().store(2, Ordering::Relaxed);
    assert_eq!(r.pending(), Ok(0));
    r.region().dropped().store(11, Ordering::Relaxed);
    assert_eq!(r.pending(), Ok(0));
    let s = r.stats();
    assert_eq!((s.producer_dropped, s.dropped_moved_back), (11, 2));
}

#[test]
fn positions_near_u64_max_wrap_by_difference() {
    let region = Arc::new(HeapRegion::new(4).expect("valid"));
    let start = u64::MAX - 5;
    region.write_pos().store(start, Ordering::Relaxed);
    region.read_pos().store(start, Ordering::Relaxed);
    let (mut w, mut r) = (
        Writer::new(region.clone()),
        Reader::starting_at(region, start),
    );
    for i in 0..20 {
        w.push(Record::counter(1, i)).expect("room");
        assert_eq!(drain_values(&mut r, 4), [i]);
    }
    assert_eq!(r.position(), start.wrapping_add(20));
}

#[test]
fn dropping_the_reader_tells_the_writer() {
    let (w, r) = pair(2);
    assert!(!w.is_abandoned());
    drop(r);
    assert!(w.is_abandoned());
}

#[test]
fn mapped_region_lays_out_the_abi_and_attaches() {
    use crate::{MapError, MappedRegion};
    use core::ptr::NonNull;
    use telemetry_abi::{HeaderError, MAGIC, RECORDS_OFFSET};

    let geometry = Geometry::new(8).expect("valid");
    let mut words = vec![0u64; geometry.region_len() / 8];
    let len = words.len() * 8;
    let base = NonNull::new(words.as_mut_ptr().cast::<u8>()).expect("non-null");
    // SAFETY: `words` outlives both regions and is only accessed through them here.
    let region = unsafe { MappedRegion::init(base, len, geometry, 77) }.expect("fits");
    let mut w = Writer::new(&region);
    w.push(Record::counter(5, 6)).expect("room");
    // SAFETY: as above.
    let attached = unsafe { MappedRegion::attach(base, len) }.expect("valid header");
    assert_eq!(attached.geometry(), geometry);
    assert_eq!(attached.header_epoch(), 77);
    let debug = format!("{attached:?}");
    assert!(
        debug.starts_with("MappedRegion") && debug.contains("capacity: 8"),
        "{debug}"
    );
    let mut r = Reader::new(&attached);
    assert_eq!(drain_values(&mut r, 8), [6]);
    drop(r);
    assert_eq!(words[0], MAGIC);
    assert_eq!(
        words[RECORDS_OFFSET / 8],
        u64::from(RecordKind::COUNTER.0) | (5 << 32)
    );

    words[0] = 1;
    let base = NonNull::new(words.as_mut_ptr().cast::<u8>()).expect("non-null");
    // SAFETY: as above.
    let err = unsafe { MappedRegion::attach(base, len) }.expect_err("bad magic");
    assert_eq!(err, MapError::Header(HeaderError::BadMagic { found: 1 }));
    // SAFETY: as above; the shorter length is inside the buffer.
    let err = unsafe { MappedRegion::attach(base, 64) }.expect_err("too small");
    assert!(matches!(
        err,
        MapError::Header(HeaderError::RegionTooSmall { .. })
    ));

    use core::error::Error;
    let bad_magic = MapError::Header(HeaderError::BadMagic { found: 1 });
    assert!(
        bad_magic
            .to_string()
            .starts_with("region header refused: bad magic 0x0000000000000001"),
        "{bad_magic}"
    );
    let source = bad_magic.source().map(ToString::to_string);
    assert_eq!(source, Some(HeaderError::BadMagic { found: 1 }.to_string()));
    assert_eq!(
        MapError::Misaligned.to_string(),
        "region base address is not 8-byte aligned"
    );
    assert!(MapError::Misaligned.source().is_none());
}

#[test]
fn a_closed_ring_tells_the_writer_what_was_never_read() {
    let (mut w, mut r) = pair(8);
    for i in 0..5 {
        w.push(Record::counter(1, i)).expect("room");
    }
    w.stage(Record::counter(1, 99)).expect("room");
    assert_eq!(drain_values(&mut r, 2), [0, 1]);
    assert!(!w.is_closed());
    drop(r);
    assert!(w.is_closed());
    let mut unread = Vec::new();
    assert_eq!(w.for_each_unconsumed(|rec| unread.push(rec.words[0])), 3);
    assert_eq!(
        unread,
        [2, 3, 4],
        "published and unread; the staged record was never published"
    );
    // A read position more than a capacity behind is a lie: nothing is visited.
    w.region()
        .read_pos()
        .store(5u64.wrapping_sub(9), Ordering::Relaxed);
    let mut visited = 0;
    assert_eq!(w.for_each_unconsumed(|_| visited += 1), 0);
    assert_eq!(visited, 0);
}

/// A ring of `capacity` whose reader defers its release, after `n` counters (values 0
/// to `n - 1`) were pushed and read.
fn deferring_after(capacity: u64, n: u64) -> (Writer<Arc<HeapRegion>>, Reader<Arc<HeapRegion>>) {
    let (mut w, mut r) = pair(capacity);
    r.defer_release();
    for i in 0..n {
        w.push(Record::counter(1, i)).expect("room");
    }
    assert_eq!(drain_values(&mut r, 64), (0..n).collect::<Vec<_>>());
    (w, r)
}

#[test]
fn a_deferred_release_bounds_what_the_writer_may_overwrite() {
    let (mut w, mut r) = deferring_after(4, 4);
    // Read but not released: the slots still hold what a restarted consumer needs.
    assert_eq!(w.push(Record::counter(1, 4)), Err(Full));
    assert_eq!(r.released(), 0);
    r.release(2);
    assert_eq!(r.released(), 2);
    w.push(Record::counter(1, 4)).expect("two slots released");
    w.push(Record::counter(1, 5)).expect("two slots released");
    assert_eq!(w.push(Record::counter(1, 6)), Err(Full));
    // Behind an earlier release, or past what was read (even by one, within a ring
    // of the last release): ignored.
    r.release(1);
    r.release(9);
    r.release(5);
    assert_eq!(r.released(), 2);
    assert_eq!(r.region().read_pos().load(Ordering::Relaxed), 2);
    assert_eq!(drain_values(&mut r, 64), [4, 5]);
    assert_eq!(r.released(), 2, "draining alone releases nothing");
    // What a deferring reader read is counted as it is read.
    r.release(6);
    w.push(Record {
        kind: RecordKind(0x4242),
        ..Record::counter(1, 6)
    })
    .expect("room");
    w.push(Record::counter(1, 7)).expect("room");
    assert_eq!(drain_values(&mut r, 64), [7]);
    let st = r.stats();
    assert_eq!((st.consumed, st.delivered, st.unknown_kind), (8, 7, 1));
    // A clean close releases everything read before raising the flag.
    drop(r);
    assert!(w.is_closed());
    assert_eq!(w.for_each_unconsumed(|_| {}), 0);
}

#[test]
fn a_quarantined_deferring_reader_releases_nothing_more_when_dropped() {
    let (w, mut r) = deferring_after(8, 3);
    r.release(1);
    // The producer breaks the protocol: what was read after the release is not
    // accounted for, so it stays unreleased.
    r.region().write_pos().store(1 << 40, Ordering::Release);
    assert!(r.drain(64, |_| {}).is_err());
    let region = r.region().clone();
    drop(r);
    assert_eq!(region.read_pos().load(Ordering::Relaxed), 1);
    assert!(w.is_closed());
}

/// A heap region that checks every `prepare_write` hint against the consumer's read
/// position (the hinted slot must be one the consumer has released) and against the
/// write that follows it (the hinted slot is the one 32 records past it).
struct HintChecked {
    inner: HeapRegion,
    hints: std::cell::Cell<u64>,
    /// The slot of the last hint, until the write it precedes.
    pending: std::cell::Cell<Option<usize>>,
}

impl HintChecked {
    fn new(capacity: u64) -> Self {
        Self {
            inner: HeapRegion::new(capacity).expect("valid capacity"),
            hints: std::cell::Cell::new(0),
            pending: std::cell::Cell::new(None),
        }
    }
}

// SAFETY: forwards every data access to `inner`, which upholds the contract; the hint
// only checks positions and counts.
unsafe impl Region for HintChecked {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn write_pos(&self) -> &crate::sync::AtomicU64 {
        self.inner.write_pos()
    }
    fn dropped(&self) -> &crate::sync::AtomicU64 {
        self.inner.dropped()
    }
    fn read_pos(&self) -> &crate::sync::AtomicU64 {
        self.inner.read_pos()
    }
    fn consumer_flags(&self) -> &crate::sync::AtomicU64 {
        self.inner.consumer_flags()
    }
    unsafe fn write_slot(&self, slot: usize, record: Record) {
        if let Some(hinted) = self.pending.take() {
            let capacity = self.geometry().capacity() as usize;
            assert_eq!(
                hinted,
                (slot + 32) % capacity,
                "the hint before slot {slot}"
            );
        }
        // SAFETY: the caller's guarantees are passed on unchanged.
        unsafe { self.inner.write_slot(slot, record) }
    }
    fn prepare_write(&self, slot: usize) {
        let capacity = u64::from(self.geometry().capacity());
        assert!((slot as u64) < capacity, "hinted slot {slot} of {capacity}");
        assert!(
            self.pending.replace(Some(slot)).is_none(),
            "two hints, one write"
        );
        let read = self.read_pos().load(Ordering::Relaxed);
        let published = self.write_pos().load(Ordering::Relaxed);
        // The slots the consumer has not released: positions read..published (and the
        // writer's staged ones, which it owns). None of them may be hinted.
        for position in read..published {
            assert_ne!(
                (position % capacity) as usize,
                slot,
                "hinted slot {slot} holds unread position {position} (read {read})"
            );
        }
        self.hints.set(self.hints.get() + 1);
    }
    unsafe fn read_slot(&self, slot: usize) -> Record {
        // SAFETY: the caller's guarantees are passed on unchanged.
        unsafe { self.inner.read_slot(slot) }
    }
}

#[test]
fn the_write_hint_never_names_a_slot_the_consumer_has_not_released() {
    let region = HintChecked::new(64);
    let mut w = Writer::new(&region);
    let mut r = Reader::new(&region);
    let mut next = 0u64;
    // Fill to full and drain a little at a time, so the writer runs close behind the
    // reader for many laps: the hint's distance (32) is half the ring.
    for round in 0..200u64 {
        while w.try_push(Record::counter(1, next)).is_ok() {
            next += 1;
        }
        let got = drain_values(&mut r, round % 7 + 1);
        assert_eq!(got.len() as u64, round % 7 + 1);
    }
    assert!(next > 64 * 10, "many laps: {next}");
    assert!(region.hints.get() > 0, "the writer did hint");
}

/// Pushes counters `first..first + n` as one batch, by `push_all` (`all`) or
/// `push_with`; whether they fit.
fn push_batch<R: Region>(w: &mut Writer<R>, first: u64, n: u64, all: bool) -> bool {
    if all {
        let batch: Vec<Record> = (first..first + n).map(|v| Record::counter(1, v)).collect();
        w.push_all(&batch).is_ok()
    } else {
        w.push_with(n, |i| Record::counter(1, first + i)).is_ok()
    }
}

#[test]
fn the_batch_paths_hint_only_released_slots_each_32_records_ahead() {
    let region = HintChecked::new(64);
    let mut w = Writer::new(&region);
    let mut r = Reader::new(&region);
    let mut next = 0u64;
    // Batches of 1 to 9 records (both batch paths) into a ring drained a little at a
    // time, so batches start at every distance behind the reader, full included.
    for round in 0..400u64 {
        let n = round % 9 + 1;
        if push_batch(&mut w, next, n, round % 2 == 0) {
            next += n;
        }
        let _ = drain_values(&mut r, round % 5 + 1);
    }
    let _ = drain_values(&mut r, 64);
    // The reader close behind a writer whose view of it is fresh: the ring filled (so
    // the next batch reloads the read position), drained to `unread` records, then a
    // batch that reaches the hint's distance, 32 records past the read position.
    for unread in 1..=31u64 {
        while w.try_push(Record::counter(1, next)).is_ok() {
            next += 1;
        }
        let _ = drain_values(&mut r, 64 - unread);
        let n = 33 - unread;
        assert!(push_batch(&mut w, next, n, unread % 2 == 0), "room");
        next += n;
        let rest = drain_values(&mut r, 64);
        assert_eq!(
            rest.last().copied(),
            Some(next - 1),
            "every record in order"
        );
    }
    assert!(next > 64 * 5, "many laps: {next}");
    assert!(region.hints.get() > 0, "the writer did hint");
}

#[test]
fn looks_empty_follows_publication_and_never_judges() {
    let (mut w, mut r) = pair(8);
    assert!(r.looks_empty());
    w.stage(Record::counter(1, 1)).expect("room");
    assert!(r.looks_empty(), "staged records are not published");
    w.flush();
    assert!(!r.looks_empty());
    assert_eq!(drain_values(&mut r, 64), [1]);
    assert!(r.looks_empty());
    // A write position far ahead is not empty, and is judged only by the next drain.
    r.region().write_pos().store(1 << 40, Ordering::Release);
    assert!(!r.looks_empty());
    assert!(r.quarantined().is_none());
    assert!(r.drain(64, |_| {}).is_err());
    assert!(r.looks_empty(), "a quarantined ring is never drained again");
}

#[test]
fn a_full_ring_left_unread_is_visited_whole() {
    let (mut w, r) = pair(4);
    for i in 0..4 {
        w.push(Record::counter(1, i)).expect("room");
    }
    drop(r);
    let mut unread = Vec::new();
    assert_eq!(w.for_each_unconsumed(|rec| unread.push(rec.words[0])), 4);
    assert_eq!(unread, [0, 1, 2, 3]);
}
