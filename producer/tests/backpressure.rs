//! Counters under a ring forced full on purpose: increments coalesce and arrive whole;
//! what is still owed when a thread exits with its ring full is counted, not hidden.
//!
//! One test, so nothing else in this process drains the rings while they are full.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::{Server, sum, watchdog};
use nexus_metrics::{Config, DropReason, RegisterKind, counter, gauge, histogram};

#[test]
fn counters_are_late_never_short_and_exit_losses_are_counted() {
    let _dog = watchdog(Duration::from_secs(30));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metricsd.sock");
    let server = Server::start(&path, 64);
    nexus_metrics::install(Config::new().socket(&path)).expect("first install");

    // 1. Fill a 64-record ring with nobody draining, drain, flush: the sum is exact.
    let (filled_tx, filled_rx) = mpsc::channel();
    let (drained_tx, drained_rx) = mpsc::channel::<()>();
    let producer = std::thread::spawn(move || {
        let c = counter!("bp.coalesced");
        let g = gauge!("bp.level");
        let h = histogram!("bp.latency");
        let mut total = 0;
        for i in 0..10_000u64 {
            c.increment(i % 7 + 1);
            total += i % 7 + 1;
        }
        // Float gauge increments on the full ring wait like counter increments.
        for _ in 0..1000 {
            g.add_f64(0.5);
        }
        for _ in 0..200 {
            g.add_f64(-0.25);
        }
        // Other records on a full ring are dropped and counted.
        for _ in 0..5 {
            h.record(1);
        }
        let pending_before_drain = !nexus_metrics::flush();
        filled_tx
            .send((total, pending_before_drain))
            .expect("main thread waits");
        drained_rx.recv().expect("main thread drains");
        // The ring has room again: the pending delta goes out.
        assert!(nexus_metrics::flush(), "nothing left pending after a drain");
    });
    let (total, pending_before_drain) = filled_rx.recv().expect("producer fills");
    assert!(pending_before_drain, "the ring really was full");
    let stats = nexus_metrics::stats();
    assert!(stats.coalesced > 10_000, "{stats:?}");
    assert_eq!(
        stats.dropped(DropReason::RingFull),
        5,
        "the histogram samples"
    );
    server.drain();
    drained_tx.send(()).expect("producer waits");
    producer.join().expect("producer");

    server.find(RegisterKind::COUNTER, "bp.coalesced", |ring, key| {
        let records = ring.records_of(key);
        assert!(records.len() < 64, "coalesced into few records");
        assert_eq!(sum(&records), total, "late, never short");
        assert_eq!(ring.producer_dropped, 5, "only the histogram samples");
        assert!(ring.registered_before_use(key));
        assert!(ring.unregistered.is_empty());
    });
    server.find(RegisterKind::GAUGE, "bp.level", |ring, key| {
        let records = ring.records_of(key);
        assert!(!records.is_empty() && records.len() < 64, "coalesced");
        let level: f64 = records
            .iter()
            .map(|r| {
                assert_eq!(r.kind, telemetry_abi::RecordKind::GAUGE_F64_ADD);
                f64::from_bits(r.words[0])
            })
            .sum();
        assert_eq!(level, 450.0, "every increment arrived");
        assert!(ring.registered_before_use(key));
    });

    // 2. A thread that exits with its ring still full cannot write what it owes: the
    //    TLS destructor counts it (one record per pending key) instead of hiding it.
    let before = nexus_metrics::stats();
    std::thread::spawn(|| {
        let c = counter!("bp.exit_full");
        for _ in 0..1000 {
            c.increment(1);
        }
    })
    .join()
    .expect("producer");
    let after = nexus_metrics::stats();
    assert_eq!(
        after.dropped(DropReason::RingFull) - before.dropped(DropReason::RingFull),
        1,
        "one pending key given up at exit"
    );
    assert_eq!(before.lost_increments, 0);
    server.find(RegisterKind::COUNTER, "bp.exit_full", |ring, key| {
        assert_eq!(ring.producer_dropped, 1, "also in the ring's dropped word");
        let written = sum(&ring.records_of(key));
        assert!(written > 0 && written < 1000);
        assert_eq!(
            written + after.lost_increments,
            1000,
            "written + lost = recorded"
        );
    });

    // 3. `flush_for` waits for room: with a consumer draining meanwhile, a thread
    //    that ends owing increments writes them all before it goes.
    let (filled_tx, filled_rx) = mpsc::channel();
    let producer = std::thread::spawn(move || {
        let c = counter!("bp.flush_for");
        for _ in 0..1000 {
            c.increment(1);
        }
        filled_tx.send(()).expect("main thread waits");
        nexus_metrics::flush_for(Duration::from_secs(10))
    });
    filled_rx.recv().expect("producer fills");
    std::thread::sleep(Duration::from_millis(20));
    server.drain();
    assert!(
        producer.join().expect("producer"),
        "flushed once the ring had room"
    );
    assert_eq!(
        nexus_metrics::stats().lost_increments,
        after.lost_increments
    );
    server.find(RegisterKind::COUNTER, "bp.flush_for", |ring, key| {
        assert_eq!(sum(&ring.records_of(key)), 1000);
    });
}
