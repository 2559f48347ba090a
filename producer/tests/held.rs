//! No metricsd, no loss: counter increments and gauge sets made while nobody listens
//! are held per key in the thread's key table and arrive, exactly, once metricsd is
//! there; histogram observations made meanwhile are dropped and counted.
//!
//! One test: the counts below are process-wide and exact.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::{Server, counter_total, install_with_fast_reconnect, watchdog};
use nexus_metrics::{DropReason, RegisterKind, counter, gauge, histogram};

#[test]
fn counters_and_gauges_recorded_while_metricsd_is_down_arrive_after_it_starts() {
    let _dog = watchdog(Duration::from_secs(30));
    let (_dir, path) = install_with_fast_reconnect();

    const INCREMENTS: u64 = 5_000;
    const OBSERVATIONS: u64 = 300;
    let (recorded_tx, recorded_rx) = mpsc::channel();
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let producer = std::thread::spawn(move || {
        let c = counter!("held.requests", "route" => "/a");
        let g = gauge!("held.depth");
        let h = histogram!("held.latency_ns");
        let mut expected = 0;
        for i in 0..INCREMENTS {
            c.increment(i % 7 + 1);
            expected += i % 7 + 1;
            g.set(-(i as i64));
            if i < OBSERVATIONS {
                h.record(i);
            }
            if i % 500 == 0 {
                // Let backoff periods pass, so claims really are retried meanwhile.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        g.set(77);
        assert!(!nexus_metrics::flush(), "held state waits for a ring");
        recorded_tx.send(expected).expect("main is waiting");
        started_rx.recv().expect("main starts metricsd");
        // Reattach: the held state goes into the new ring ahead of anything else.
        assert!(
            nexus_metrics::flush_for(Duration::from_secs(10)),
            "held state delivered once metricsd is there"
        );
    });

    let expected = recorded_rx.recv().expect("producer recorded");
    let stats = nexus_metrics::stats();
    assert_eq!(stats.rings_claimed, 0, "nobody listened: {stats:?}");
    assert!(stats.claim_failures >= 2, "claims were retried: {stats:?}");
    assert_eq!(
        stats.held,
        INCREMENTS + INCREMENTS + 1,
        "every counter increment and gauge set held: {stats:?}"
    );
    assert_eq!(
        stats.dropped(DropReason::NoMetricsd),
        OBSERVATIONS,
        "histogram observations dropped and counted: {stats:?}"
    );

    let server = Server::start(&path, 1024);
    started_tx.send(()).expect("producer waits");
    producer.join().expect("producer must not panic");
    server.drain();

    assert_eq!(counter_total(&server, "held.requests"), expected);
    let gauges = server.find(RegisterKind::GAUGE, "held.depth", |ring, key| {
        ring.records_of(key)
    });
    let values: Vec<i64> = gauges.iter().map(|r| r.words[0] as i64).collect();
    assert_eq!(values, [77], "one set of the last value");
    assert_eq!(
        server.find(RegisterKind::COUNTER, "held.requests", |ring, key| {
            ring.records_of(key).len()
        }),
        1,
        "one coalesced increment"
    );
    let stats = nexus_metrics::stats();
    assert_eq!(stats.rings_claimed, 1, "{stats:?}");
    assert_eq!(stats.lost_increments, 0, "{stats:?}");
    assert_eq!(stats.dropped_total(), OBSERVATIONS, "{stats:?}");
}
