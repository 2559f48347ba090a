//! Model 3: a batch published by one `flush()` (or one `push_all`) becomes visible all
//! at once: the reader never sees part of a batch.
//!
//! Capacity 4: batch A is three records staged one by one and published by `flush()`;
//! batch B is two records published by `push_all`, which has to wait until the reader
//! has released batch A's slots (it wraps around). The reader drains with a budget of
//! the whole capacity, so after every drain the records it has seen must end on a
//! batch boundary.
#![cfg(telemetry_loom)]

mod common;

use common::{check, drain_into, in_order, pair, record};
use loom::thread;

const CAPACITY: u64 = 4;
const BATCH_A: u64 = 3;
const BATCH_B: u64 = 2;
const TOTAL: u64 = BATCH_A + BATCH_B;

const PREEMPTION_BOUND: Option<usize> = None;

#[test]
fn a_flushed_batch_is_seen_whole_or_not_at_all() {
    let explored = check(PREEMPTION_BOUND, || {
        let (mut writer, mut reader) = pair(CAPACITY);
        let producer = thread::spawn(move || {
            for i in 0..BATCH_A {
                writer.stage(record(i)).expect("room for batch A");
            }
            assert_eq!(writer.staged(), BATCH_A);
            writer.flush();
            assert_eq!(writer.staged(), 0);

            let batch_b: Vec<_> = (BATCH_A..TOTAL).map(record).collect();
            while writer.free() < BATCH_B {
                thread::yield_now();
            }
            writer.push_all(&batch_b).expect("free() said it fits");
            assert_eq!(writer.dropped(), 0);
        });

        let mut seen = Vec::new();
        while (seen.len() as u64) < TOTAL {
            let drained = drain_into(&mut reader, CAPACITY, &mut seen).expect("not quarantined");
            assert!(in_order(&seen), "out of order: {seen:?}");
            assert!(
                matches!(seen.len() as u64, 0 | BATCH_A | TOTAL),
                "a partial batch was visible: {seen:?}"
            );
            if drained.consumed == 0 {
                thread::yield_now();
            }
        }

        producer.join().expect("the writer finished");
        assert_eq!(reader.pending(), Ok(0));
    });
    eprintln!("batch: {explored} executions");
}
