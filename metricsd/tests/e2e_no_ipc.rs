//! End to end, no IPC per sample: a producer process records one million samples
//! through `nexus-metrics` from several threads, and metricsd's control socket receives
//! no more messages than the rings it granted (one grant request per thread's ring).

mod e2e_support;

use std::time::{Duration, Instant};

use e2e_support::{
    Producer, WAIT, child, config, start_logd, start_metricsd, wait_closed, watchdog,
};
use metricsd::{MetricKind, Snapshot};
use nexus_metrics::{Config, DropReason, counter, gauge, histogram};

/// Recording threads in the child.
const THREADS: u64 = 4;
/// Samples in all.
const SAMPLES: u64 = 1_000_000;

/// Samples aggregated into the series `name` of the producer.
fn samples(snap: &Snapshot, kind: MetricKind, name: &str) -> u64 {
    snap.find("ipc", kind, name, &[]).map_or(0, |s| s.samples)
}

#[test]
fn a_million_samples_from_a_producer_process_send_no_control_message_per_sample() {
    let _dog = watchdog("the no-IPC test", Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.rings.capacity = 65_536;
    let logd = start_logd(&cfg.logd_socket);
    let daemon = start_metricsd(cfg);

    let mut producer = Producer::spawn(
        "child_records_a_million_samples",
        "ipc",
        daemon.socket_path(),
        &[],
    );
    // While it records: never a message beyond a grant request.
    let deadline = Instant::now() + WAIT;
    let done = loop {
        let snap = daemon.snapshot().expect("snapshot");
        assert!(
            snap.grant.messages <= snap.grant.granted,
            "control messages {} > rings granted {}",
            snap.grant.messages,
            snap.grant.granted
        );
        if let Some(done) = producer.poll("done", Duration::from_millis(20)) {
            break done;
        }
        assert!(Instant::now() < deadline, "the producer never finished");
    };
    assert_eq!(done.u64("samples"), SAMPLES);
    assert_eq!(done.u64("rings"), THREADS, "one ring per recording thread");
    assert_eq!(done.u64("claim_failures"), 0);
    assert_eq!(done.u64("lost"), 0);
    let ring_full = done.u64("ring_full");
    assert_eq!(done.u64("dropped_total"), ring_full);

    // The producer is still connected: its connection's own count.
    let snap = daemon.settle(WAIT).expect("settle");
    assert_eq!(snap.grant.granted, THREADS);
    assert_eq!(
        snap.grant.messages, snap.grant.granted,
        "one message per ring, none per sample"
    );
    let conn = snap
        .grant
        .connections
        .values()
        .find(|c| c.pid == producer.pid())
        .expect("the producer's connection");
    assert_eq!(
        (conn.service.as_str(), conn.messages, conn.rings),
        ("ipc", THREADS, THREADS)
    );

    producer.send("exit");
    producer.finish();
    wait_closed(&daemon, "ipc", THREADS as usize);
    let snap = daemon.settle(WAIT).expect("settle");
    assert_eq!(snap.grant.messages, THREADS, "its hang-up is not a message");

    // Every sample is accounted for: counter increments (each 1, never lost), histogram
    // and gauge samples aggregated, and records dropped for a full ring (counted).
    let counted = snap
        .counter("ipc", "e2e.ops", &[("op", "read")])
        .expect("counter");
    assert_eq!(counted, u128::from(SAMPLES / 2));
    let observed = samples(&snap, MetricKind::Histogram, "e2e.size")
        + samples(&snap, MetricKind::Gauge, "e2e.depth");
    assert_eq!(SAMPLES / 2 + observed + ring_full, SAMPLES);
    let rings: Vec<_> = snap.rings.iter().filter(|r| r.service == "ipc").collect();
    assert_eq!(
        rings.iter().map(|r| r.producer_dropped).sum::<u64>(),
        ring_full
    );
    assert_eq!(snap.rejects.total(), 0, "{:?}", snap.rejects);
    println!(
        "{SAMPLES} samples, {} records drained, {ring_full} dropped for a full ring, {} control messages",
        rings.iter().map(|r| r.consumed).sum::<u64>(),
        snap.grant.messages
    );

    daemon.shutdown();
    logd.shutdown().expect("logd stops");
}

#[test]
#[ignore = "child half of a_million_samples_from_a_producer_process_send_no_control_message_per_sample, run by it"]
fn child_records_a_million_samples() {
    let Some(socket) = child::socket() else {
        return;
    };
    let _dog = watchdog("the million-sample producer", Duration::from_secs(90));
    nexus_metrics::install(Config::new().socket(&socket)).expect("first install");
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            std::thread::spawn(|| {
                let per_thread = SAMPLES / THREADS;
                for i in 0..per_thread {
                    match i % 4 {
                        0 | 1 => counter!("e2e.ops", "op" => "read").increment(1),
                        2 => histogram!("e2e.size").record(i),
                        _ => gauge!("e2e.depth").set(i as i64),
                    }
                }
                assert!(nexus_metrics::flush_for(Duration::from_secs(30)));
                per_thread
            })
        })
        .collect();
    let samples: u64 = threads
        .into_iter()
        .map(|t| t.join().expect("recording thread"))
        .sum();
    let s = nexus_metrics::stats();
    child::report(
        "done",
        &[
            ("samples", &samples),
            ("rings", &s.rings_claimed),
            ("claim_failures", &s.claim_failures),
            ("lost", &s.lost_increments),
            ("ring_full", &s.dropped(DropReason::RingFull)),
            ("dropped_total", &s.dropped_total()),
        ],
    );
    // Stay connected until the parent has looked at this connection.
    child::expect_command("exit");
}
