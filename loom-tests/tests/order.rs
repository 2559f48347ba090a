//! Model 1: records cross in order, none torn, across several wrap-arounds.
//!
//! Capacity 2 and five records: the writer laps the ring twice, so every slot is
//! reused while the reader may still be copying its previous record, and the writer
//! must reload the reader's position (the read-position Release/Acquire pair) to make
//! progress. The write-position pair is what makes every copied record whole.
#![cfg(telemetry_loom)]

mod common;

use common::{check, drain_into, in_order, pair, record};
use loom::thread;

const CAPACITY: u64 = 2;
const RECORDS: u64 = 5;

const PREEMPTION_BOUND: Option<usize> = Some(4);

#[test]
fn records_cross_in_order_without_tearing_across_wrap_arounds() {
    let explored = check(PREEMPTION_BOUND, || {
        let (mut writer, mut reader) = pair(CAPACITY);
        let producer = thread::spawn(move || {
            for i in 0..RECORDS {
                // `try_push` leaves a full ring to the caller: wait for room.
                while writer.try_push(record(i)).is_err() {
                    thread::yield_now();
                }
            }
            writer
        });

        let mut seen = Vec::new();
        while (seen.len() as u64) < RECORDS {
            let drained = drain_into(&mut reader, CAPACITY, &mut seen).expect("not quarantined");
            assert!(in_order(&seen), "out of order: {seen:?}");
            if drained.consumed == 0 {
                thread::yield_now();
            }
        }

        let writer = producer.join().expect("the writer finished");
        assert_eq!(writer.dropped(), 0, "try_push never counts a drop");
        assert_eq!(reader.pending(), Ok(0), "nothing past the five records");
        let stats = reader.stats();
        assert_eq!((stats.consumed, stats.delivered), (RECORDS, RECORDS));
        assert_eq!(reader.position(), RECORDS);
    });
    eprintln!("order: {explored} executions");
}
