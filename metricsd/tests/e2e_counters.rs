//! End to end, counters under backpressure: a producer process records through
//! `nexus-metrics` into a ring far too small for its burst while metricsd's drain
//! sleeps between passes; the totals metricsd aggregates and exports to logd still equal
//! the sum of the increments exactly.

mod e2e_support;

use std::time::Duration;

use e2e_support::{
    Producer, WAIT, assert_counter_exported, child, config, delta_sum, histogram_count_sum,
    start_logd, start_metricsd, wait_closed, watchdog,
};
use nexus_metrics::{Config, DropReason, counter, histogram};

/// Producing threads in the child.
const THREADS: u64 = 2;
/// Loop iterations per thread.
const BURST: u64 = 100_000;
/// Records per ring: a burst is thousands of times larger.
const RING: u32 = 64;

/// The `/b` counter's increment at iteration `i`.
fn amount(i: u64) -> u64 {
    i % 7 + 1
}

#[test]
fn counter_totals_are_exact_after_a_forced_ring_full_episode() {
    let _dog = watchdog("the ring-full test", Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    // Held off: a 64-record ring, and a drain that sleeps 20 ms after a pass that found
    // nothing, while the producer writes a record every few nanoseconds.
    cfg.rings.capacity = RING;
    cfg.rings.max_capacity = RING;
    cfg.drain.idle_min_us = 20_000;
    cfg.drain.idle_max_us = 20_000;
    let logd_path = cfg.logd_socket.clone();
    let logd = start_logd(&logd_path);
    let daemon = start_metricsd(cfg);

    let mut producer = Producer::spawn(
        "child_records_bursts_into_a_tiny_ring",
        "burst",
        daemon.socket_path(),
        &[],
    );
    let report = producer.expect("done");
    producer.finish();
    println!("producer: {report:?}");

    // The episode happened: increments were held back because the ring was full.
    assert!(
        report.u64("coalesced") > 0,
        "the ring was never full: {report:?}"
    );
    assert_eq!(
        report.u64("lost"),
        0,
        "flush_for wrote every held-back increment"
    );
    assert_eq!(report.u64("rings"), THREADS, "one ring per thread");
    assert_eq!(report.u64("claim_failures"), 0);
    let ring_full = report.u64("ring_full");
    assert_eq!(
        report.u64("dropped_total"),
        ring_full,
        "only histogram samples were dropped, for a full ring"
    );

    // Wait for metricsd to see the producer go (its rings drained a last time).
    wait_closed(&daemon, "burst", THREADS as usize);
    let snap = daemon.flush(WAIT).expect("flush");

    let want_a = u128::from(THREADS * BURST);
    let want_b = u128::from(THREADS * (0..BURST).map(amount).sum::<u64>());
    assert_eq!(
        snap.counter("burst", "e2e.requests", &[("route", "/a")]),
        Some(want_a)
    );
    assert_eq!(
        snap.counter("burst", "e2e.requests", &[("route", "/b")]),
        Some(want_b)
    );
    // Other records lost to the full ring are counted exactly, per ring.
    let (count, _) = histogram_count_sum(&snap, "burst", "e2e.burst.value", &[]);
    assert_eq!(
        count + ring_full,
        report.u64("histograms"),
        "aggregated + dropped = recorded"
    );
    let rings: Vec<_> = snap.rings.iter().filter(|r| r.service == "burst").collect();
    assert_eq!(
        rings.iter().map(|r| r.producer_dropped).sum::<u64>(),
        ring_full,
        "the rings' dropped words agree with the producer's stats"
    );
    assert!(
        rings
            .iter()
            .all(|r| r.pending == 0 && r.quarantined.is_none())
    );
    assert_eq!(snap.rejects.total(), 0, "{:?}", snap.rejects);

    // Exported to logd: the last value is the total, and the window deltas add up to it.
    for (route, want) in [("/a", want_a), ("/b", want_b)] {
        let labels = [("route", route)];
        let id = assert_counter_exported(&logd_path, "burst", "e2e.requests", &labels, want);
        assert_eq!(delta_sum(&logd_path, &id), want, "{id}");
    }
    for ring in rings.iter().filter(|r| r.producer_dropped > 0) {
        let ring_id = ring.id.to_string();
        assert_counter_exported(
            &logd_path,
            "metricsd",
            "metricsd.ring.dropped",
            &[("ring", ring_id.as_str()), ("producer", "burst")],
            ring.producer_dropped,
        );
    }

    daemon.shutdown();
    logd.shutdown().expect("logd stops");
}

#[test]
#[ignore = "child half of counter_totals_are_exact_after_a_forced_ring_full_episode, run by it"]
fn child_records_bursts_into_a_tiny_ring() {
    let Some(socket) = child::socket() else {
        return;
    };
    let _dog = watchdog("the burst producer", Duration::from_secs(60));
    nexus_metrics::install(Config::new().socket(&socket).ring_capacity(RING))
        .expect("first install");
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            std::thread::spawn(|| {
                let a = counter!("e2e.requests", "route" => "/a");
                let b = counter!("e2e.requests", "route" => "/b");
                let h = histogram!("e2e.burst.value");
                let mut histograms = 0u64;
                for i in 0..BURST {
                    a.increment(1);
                    b.increment(amount(i));
                    if i % 16 == 0 {
                        h.record(i);
                        histograms += 1;
                    }
                }
                assert!(
                    nexus_metrics::flush_for(Duration::from_secs(30)),
                    "held-back increments written before the thread ends"
                );
                histograms
            })
        })
        .collect();
    let histograms: u64 = threads
        .into_iter()
        .map(|t| t.join().expect("producer thread"))
        .sum();
    let s = nexus_metrics::stats();
    child::report(
        "done",
        &[
            ("coalesced", &s.coalesced),
            ("ring_full", &s.dropped(DropReason::RingFull)),
            ("dropped_total", &s.dropped_total()),
            ("lost", &s.lost_increments),
            ("rings", &s.rings_claimed),
            ("claim_failures", &s.claim_failures),
            ("histograms", &histograms),
        ],
    );
}
