//! Model 5: a producer that publishes a bogus write position is caught before the
//! reader copies anything it should not: the reader returns `Quarantined`, counts the
//! violation once, raises the quarantine flag, delivers nothing beyond the records
//! that were validly published, and never touches a slot the writer may be writing
//! (loom's `UnsafeCell` tracking fails the model on any such racing copy; the heap
//! region's slot access is bounds-checked, so a bad index could only read a default
//! record, which `drain_into` would reject as an unknown kind).
//!
//! A bogus position that stays within `read..=read + capacity` is indistinguishable from
//! a real one and is outside what any reader can detect (the mapped region copies such
//! slots race-tolerantly); these models cover what the reader promises to detect: a
//! position more than a capacity ahead, and one that moves back.
#![cfg(telemetry_loom)]

mod common;

use common::{Shared, check, drain_into, in_order, pair, record};
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;
use telemetry_abi::CONSUMER_FLAG_QUARANTINED;
use telemetry_ring::{Quarantined, Reader, Region, Violation};

const CAPACITY: u64 = 2;

const HOSTILE_THREAD_PREEMPTION_BOUND: Option<usize> = Some(4);

/// Checks what a quarantined reader must do from now on: refuse every drain with the
/// same violation, without counting it again, and leave the flag raised.
fn assert_stays_quarantined(reader: &mut Reader<Shared>, violation: Violation) {
    let before = reader.stats();
    let mut seen = Vec::new();
    assert_eq!(
        drain_into(reader, CAPACITY, &mut seen),
        Err(Quarantined(violation))
    );
    assert_eq!(reader.pending(), Err(Quarantined(violation)));
    assert!(seen.is_empty(), "a quarantined reader delivered {seen:?}");
    assert_eq!(reader.stats(), before, "counted once, not once per drain");
    assert_eq!(reader.quarantined(), Some(violation));
    let flags = reader.region().consumer_flags().load(Ordering::Relaxed);
    assert_ne!(flags & CONSUMER_FLAG_QUARANTINED, 0, "flag raised");
}

/// The writer publishes record 0, then publishes `bogus` (more than a capacity ahead of
/// anything the reader can have read), then writes slot 1 concurrently with the reader.
fn detects_a_position_out_of_range(bogus: u64) {
    let explored = check(None, move || {
        let (mut writer, mut reader) = pair(CAPACITY);
        let done = Arc::new(AtomicBool::new(false));
        let writer_done = Arc::clone(&done);
        let producer = thread::spawn(move || {
            writer.push(record(0)).expect("room");
            // ORDERING: Release, as a real writer would publish: the lie is the value.
            writer.region().write_pos().store(bogus, Ordering::Release);
            // A reader that believed `bogus` would copy slot 1 while this writes it.
            writer.stage(record(1)).expect("room");
            writer_done.store(true, Ordering::Release);
            writer
        });

        let mut seen = Vec::new();
        let quarantined = loop {
            let finished = done.load(Ordering::Acquire);
            match drain_into(&mut reader, CAPACITY, &mut seen) {
                Err(quarantined) => break quarantined,
                Ok(drained) => {
                    assert!(!finished, "the bogus position {bogus} went undetected");
                    if drained.consumed == 0 {
                        thread::yield_now();
                    }
                }
            }
        };

        assert!(seen.len() <= 1 && in_order(&seen), "delivered {seen:?}");
        let violation = Violation::WriteOutOfRange {
            read: seen.len() as u64,
            write: bogus,
        };
        assert_eq!(quarantined, Quarantined(violation));
        let stats = reader.stats();
        assert_eq!((stats.write_out_of_range, stats.write_moved_back), (1, 0));
        assert_eq!(stats.delivered, seen.len() as u64);
        assert_stays_quarantined(&mut reader, violation);

        let writer = producer.join().expect("the writer finished");
        assert!(writer.is_abandoned(), "the writer can see the quarantine");
    });
    eprintln!("hostile, write position {bogus}: {explored} executions");
}

#[test]
fn a_position_just_over_a_capacity_ahead_is_quarantined() {
    // The reader has read at most 1 record, so 1 + CAPACITY + 1 is out of range for it.
    detects_a_position_out_of_range(CAPACITY + 2);
}

#[test]
fn a_position_far_ahead_is_quarantined() {
    detects_a_position_out_of_range(1 << 40);
}

#[test]
fn a_position_moving_back_is_quarantined() {
    let explored = check(None, || {
        let (mut writer, mut reader) = pair(CAPACITY);
        let published = Arc::new(AtomicBool::new(false));
        let observed = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (w_published, w_observed, w_done) = (
            Arc::clone(&published),
            Arc::clone(&observed),
            Arc::clone(&done),
        );
        let producer = thread::spawn(move || {
            writer.push(record(0)).expect("room");
            writer.push(record(1)).expect("room");
            w_published.store(true, Ordering::Release);
            while !w_observed.load(Ordering::Acquire) {
                thread::yield_now();
            }
            // The reader has seen position 2 and read one record: moving back to 1
            // looks like an empty ring, not an out-of-range one, so only the
            // moved-back check can catch it.
            writer.region().write_pos().store(1, Ordering::Release);
            // Slot 0 is free (the reader released it); a reader that believed the
            // position would not read it, but one that misread it would race here.
            writer.stage(record(2)).expect("room");
            w_done.store(true, Ordering::Release);
            writer
        });

        let mut seen = Vec::new();
        while !published.load(Ordering::Acquire) {
            thread::yield_now();
        }
        let drained = drain_into(&mut reader, 1, &mut seen).expect("not quarantined yet");
        assert_eq!((seen.as_slice(), drained.remaining), (&[0][..], 1));
        observed.store(true, Ordering::Release);

        let quarantined = loop {
            let finished = done.load(Ordering::Acquire);
            match drain_into(&mut reader, CAPACITY, &mut seen) {
                Err(quarantined) => break quarantined,
                Ok(drained) => {
                    assert!(!finished, "the move back went undetected");
                    if drained.consumed == 0 {
                        thread::yield_now();
                    }
                }
            }
        };

        // Record 1 may have been delivered before the move back was published.
        assert!(seen.len() <= 2 && in_order(&seen), "delivered {seen:?}");
        let violation = Violation::WriteMovedBack { before: 2, now: 1 };
        assert_eq!(quarantined, Quarantined(violation));
        let stats = reader.stats();
        assert_eq!((stats.write_out_of_range, stats.write_moved_back), (0, 1));
        assert_stays_quarantined(&mut reader, violation);

        let writer = producer.join().expect("the writer finished");
        assert!(writer.is_abandoned());
    });
    eprintln!("hostile, moved back: {explored} executions");
}

/// A third, hostile thread stores an out-of-range position while the real writer
/// publishes two records: whichever store the reader sees last decides the outcome, and
/// every outcome must be safe.
#[test]
fn a_hostile_thread_racing_the_writer_is_caught_or_harmless() {
    const BOGUS: u64 = 2 * CAPACITY + 1;
    let explored = check(HOSTILE_THREAD_PREEMPTION_BOUND, || {
        let (mut writer, mut reader) = pair(CAPACITY);
        let region = Shared::clone(writer.region());
        let writer_done = Arc::new(AtomicBool::new(false));
        let hostile_done = Arc::new(AtomicBool::new(false));
        let (w_done, h_done) = (Arc::clone(&writer_done), Arc::clone(&hostile_done));
        let producer = thread::spawn(move || {
            writer.push(record(0)).expect("room");
            writer.push(record(1)).expect("room");
            w_done.store(true, Ordering::Release);
            writer
        });
        let hostile = thread::spawn(move || {
            region.write_pos().store(BOGUS, Ordering::Relaxed);
            h_done.store(true, Ordering::Release);
        });

        let mut seen = Vec::new();
        let outcome = loop {
            let finished =
                writer_done.load(Ordering::Acquire) && hostile_done.load(Ordering::Acquire);
            match drain_into(&mut reader, CAPACITY, &mut seen) {
                Err(quarantined) => break Some(quarantined),
                Ok(drained) if finished && drained.remaining == 0 => break None,
                Ok(drained) => {
                    if drained.consumed == 0 {
                        thread::yield_now();
                    }
                }
            }
        };

        producer.join().expect("the writer finished");
        hostile.join().expect("the hostile thread finished");
        assert!(seen.len() <= 2 && in_order(&seen), "delivered {seen:?}");
        let last = reader.region().write_pos().load(Ordering::Relaxed);
        let stats = reader.stats();
        match outcome {
            Some(quarantined) => {
                assert_eq!(
                    quarantined,
                    Quarantined(Violation::WriteOutOfRange {
                        read: seen.len() as u64,
                        write: BOGUS
                    })
                );
                assert_eq!((stats.write_out_of_range, stats.write_moved_back), (1, 0));
                assert_stays_quarantined(&mut reader, quarantined.0);
            }
            None => {
                assert_ne!(last, BOGUS, "the bogus position was the last word, unseen");
                assert_eq!(seen, [0, 1], "an undisturbed ring delivers everything");
                assert_eq!((stats.write_out_of_range, stats.write_moved_back), (0, 0));
            }
        }
    });
    eprintln!("hostile thread: {explored} executions");
}
