//! Model 4: the reader never copies a record past the published write position: records
//! staged but not flushed stay invisible, and arrive after `flush()`.
//!
//! The writer publishes record 0, stages record 1, tells the reader (`staged`), and
//! then stages record 2 while the reader drains. The reader must deliver record 0 only
//! and report nothing pending; loom would also flag its copy of slot 1 or 2 as a race
//! with the writer's (unpublished) slot write. After the reader says it has checked,
//! the writer flushes and records 1 and 2 arrive, in order.
#![cfg(telemetry_loom)]

mod common;

use common::{check, drain_into, in_order, pair, record};
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;

const CAPACITY: u64 = 4;

const PREEMPTION_BOUND: Option<usize> = None;

#[test]
fn staged_records_stay_invisible_until_flushed() {
    let explored = check(PREEMPTION_BOUND, || {
        let (mut writer, mut reader) = pair(CAPACITY);
        let staged = Arc::new(AtomicBool::new(false));
        let checked = Arc::new(AtomicBool::new(false));
        let (writer_staged, writer_checked) = (Arc::clone(&staged), Arc::clone(&checked));
        let producer = thread::spawn(move || {
            writer.push(record(0)).expect("room");
            writer.stage(record(1)).expect("room");
            // ORDERING: Release/Acquire with the reader: once it sees `staged`, record 0's
            // publication happened before its next drain.
            writer_staged.store(true, Ordering::Release);
            writer.stage(record(2)).expect("room");
            while !writer_checked.load(Ordering::Acquire) {
                thread::yield_now();
            }
            assert_eq!(writer.staged(), 2);
            writer.flush();
        });

        let mut seen = Vec::new();
        while !staged.load(Ordering::Acquire) {
            thread::yield_now();
        }
        drain_into(&mut reader, CAPACITY, &mut seen).expect("not quarantined");
        assert_eq!(seen, [0], "only the published record is visible");
        assert_eq!(reader.pending(), Ok(0), "staged records are not pending");
        checked.store(true, Ordering::Release);

        while seen.len() < 3 {
            let drained = drain_into(&mut reader, CAPACITY, &mut seen).expect("not quarantined");
            if drained.consumed == 0 {
                thread::yield_now();
            }
        }
        assert!(in_order(&seen), "out of order: {seen:?}");

        producer.join().expect("the writer finished");
        assert_eq!(reader.pending(), Ok(0));
    });
    eprintln!("unpublished: {explored} executions");
}
