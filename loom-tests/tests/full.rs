//! Model 2: a full ring refuses records, and every attempted record is either delivered
//! or counted as dropped, exactly once.
//!
//! Capacity 2 and four attempts that never wait for room, while the reader drains
//! concurrently: depending on the interleaving, zero to two of the last attempts find
//! the ring full. Even attempts use `push` (which counts its own drop); odd attempts use
//! `try_push` and count the drop with `count_dropped`, the caller-accounted path.
#![cfg(telemetry_loom)]

mod common;

use common::{check, drain_into, in_order, pair, record};
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;
use telemetry_ring::Region;

const CAPACITY: u64 = 2;
const ATTEMPTS: u64 = 4;

const PREEMPTION_BOUND: Option<usize> = Some(5);

#[test]
fn every_record_is_delivered_or_counted_as_dropped() {
    let explored = check(PREEMPTION_BOUND, || {
        let (mut writer, mut reader) = pair(CAPACITY);
        let done = Arc::new(AtomicBool::new(false));
        let writer_done = Arc::clone(&done);
        let producer = thread::spawn(move || {
            let mut accepted = Vec::new();
            for i in 0..ATTEMPTS {
                let pushed = if i % 2 == 0 {
                    writer.push(record(i))
                } else {
                    writer
                        .try_push(record(i))
                        .inspect_err(|_| writer.count_dropped(1))
                };
                if pushed.is_ok() {
                    accepted.push(i);
                }
            }
            // ORDERING: Release so that the reader, once it sees `done`, sees the final
            // write position and dropped count too.
            writer_done.store(true, Ordering::Release);
            (writer, accepted)
        });

        let mut seen = Vec::new();
        loop {
            let finished = done.load(Ordering::Acquire);
            let drained = drain_into(&mut reader, CAPACITY, &mut seen).expect("not quarantined");
            if finished && drained.remaining == 0 {
                break;
            }
            if drained.consumed == 0 {
                thread::yield_now();
            }
        }

        let (writer, accepted) = producer.join().expect("the writer finished");
        assert_eq!(
            seen, accepted,
            "delivered exactly the accepted records, in order"
        );
        assert!(
            seen.len() as u64 >= CAPACITY && in_order(&seen[..CAPACITY as usize]),
            "the first two always fit: {accepted:?}"
        );
        assert_eq!(
            seen.len() as u64 + writer.dropped(),
            ATTEMPTS,
            "delivered + dropped == attempted (delivered {seen:?}, dropped {})",
            writer.dropped()
        );
        assert_eq!(
            writer.region().dropped().load(Ordering::Relaxed),
            writer.dropped()
        );
        assert_eq!(
            reader.stats().producer_dropped,
            writer.dropped(),
            "the reader's last drain saw the writer's final dropped count"
        );
        assert_eq!(reader.stats().dropped_moved_back, 0);
        assert_eq!(reader.pending(), Ok(0));
    });
    eprintln!("full: {explored} executions");
}
