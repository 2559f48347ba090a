//! The process-wide recorder against a real grant server: registration, spans with an
//! injected clock, per-thread rings, no IPC per sample. (Forced-full rings are in
//! `backpressure.rs`, where no other test drains them.)
//!
//! One server and one installed recorder serve every test in this binary (the
//! recorder is process-wide); each test uses its own metric names and its own threads.

mod common;

use std::sync::mpsc;
use std::sync::{Barrier, OnceLock};
use std::time::Duration;

use common::{Server, sum, watchdog};
use nexus_metrics::{
    Config, DropReason, ManualClock, RegisterKind, SpanStatus, Status, counter, gauge, histogram,
    span,
};
use telemetry_abi::{AttrValueType, RecordKind, SpanAttr, SpanEnd, SpanStart, SpanTrace};

/// Ring capacity: small, so tests can fill rings on purpose.
const CAPACITY: u32 = 64;

static CLOCK: ManualClock = ManualClock::new(0);

fn server() -> &'static Server {
    static SERVER: OnceLock<(tempfile::TempDir, Server)> = OnceLock::new();
    let (_, server) = SERVER.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("metricsd.sock");
        let server = Server::start(&path, CAPACITY);
        nexus_metrics::install(Config::new().socket(&path).clock(&CLOCK))
            .expect("first install in this binary");
        (dir, server)
    });
    server
}

/// Runs `f` on a fresh thread (so it gets its own ring) and returns its result.
fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().expect("producer thread")
}

#[test]
fn registration_precedes_samples_and_decodes() {
    let _dog = watchdog(Duration::from_secs(20));
    let server = server();
    on_thread(|| {
        for _ in 0..2 {
            counter!("grant.requests", "status" => "200", "route" => "/a").increment(3);
        }
        gauge!("grant.depth").set(-5);
        histogram!("grant.latency_ns", "route" => "/a").record(1234);
    });

    server.find(RegisterKind::COUNTER, "grant.requests", |ring, key| {
        assert!(ring.unregistered.is_empty(), "{:?}", ring.unregistered);
        assert_eq!(ring.bad_registrations, 0);
        assert!(ring.registered_before_use(key));
        let reg = &ring.keys[&key];
        let labels: Vec<(&str, &str)> = reg
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            labels,
            [("route", "/a"), ("status", "200")],
            "sorted by key"
        );
        let records = ring.records_of(key);
        assert_eq!(records.len(), 2);
        assert!(records.iter().all(|r| r.kind == RecordKind::COUNTER));
        assert_eq!(sum(&records), 6);
        // Registered once per ring, not per record.
        let registrations = ring
            .events
            .iter()
            .filter(|e| **e == common::Event::Registered(key))
            .count();
        assert_eq!(registrations, 1);

        let depth = ring
            .key_of(RegisterKind::GAUGE, "grant.depth")
            .expect("gauge");
        assert!(ring.registered_before_use(depth));
        assert_eq!(ring.records_of(depth)[0].words[0] as i64, -5);
        let latency = ring
            .key_of(RegisterKind::HISTOGRAM, "grant.latency_ns")
            .expect("histogram");
        assert!(ring.registered_before_use(latency));
        let records = ring.records_of(latency);
        assert_eq!(
            (records[0].kind, records[0].words[0]),
            (RecordKind::HISTOGRAM, 1234)
        );
    });
}

#[test]
fn spans_with_an_injected_clock_are_exact() {
    let _dog = watchdog(Duration::from_secs(20));
    let server = server();
    let attr_drops_before = nexus_metrics::stats().dropped(DropReason::AttrLimit);
    on_thread(|| {
        CLOCK.set(1_000);
        let outer = span!("grant.outer");
        CLOCK.set(1_500);
        {
            let inner = span!("grant.inner");
            inner.attr("rows", 5u64);
            inner.attr("table", "users");
            inner.attr("delta", -3i64);
            inner.set_status(Status::Error);
            CLOCK.set(1_700);
        }
        CLOCK.set(1_800);
        let explicit = span!("grant.explicit", parent: &outer);
        for _ in 0..9 {
            explicit.attr("n", 1u8);
        }
        CLOCK.set(1_900);
        drop(explicit);
        outer.set_status(Status::Ok);
        CLOCK.set(2_000);
    });
    assert_eq!(
        nexus_metrics::stats().dropped(DropReason::AttrLimit) - attr_drops_before,
        1,
        "the ninth attribute"
    );

    server.find(RegisterKind::SPAN, "grant.outer", |ring, outer_key| {
        assert!(ring.unregistered.is_empty(), "{:?}", ring.unregistered);
        let inner_key = ring
            .key_of(RegisterKind::SPAN, "grant.inner")
            .expect("inner");
        let explicit_key = ring
            .key_of(RegisterKind::SPAN, "grant.explicit")
            .expect("explicit");
        // ABI 1.1: the trace record, then the open record, adjacent.
        let start = |key| -> (SpanTrace, SpanStart) {
            let r = ring.records_of(key);
            assert_eq!(r[0].kind, RecordKind::SPAN_TRACE);
            assert_eq!(r[1].kind, RecordKind::SPAN_OPEN);
            let (t, o): (SpanTrace, SpanStart) = (r[0].view(), r[1].view());
            assert_eq!(t.span_id, o.span_id);
            (t, o)
        };
        let end = |key| -> SpanEnd {
            let r = ring.records_of(key);
            let last = r.last().expect("an end");
            assert_eq!(last.kind, RecordKind::SPAN_CLOSE);
            last.view()
        };
        let ((ot, o), (it, i), (et, e)) = (start(outer_key), start(inner_key), start(explicit_key));
        // One trace; the root's trace id ends in its span id.
        assert_eq!(ot.trace_id(), it.trace_id());
        assert_eq!(ot.trace_id(), et.trace_id());
        assert_eq!(ot.trace_lo, o.span_id);
        assert_eq!(ot.flags, 1, "sampled");
        assert_eq!((o.start_ns, o.parent_id), (1_000, 0));
        assert_ne!(o.span_id, 0);
        assert_eq!((i.start_ns, i.parent_id), (1_500, o.span_id));
        assert_eq!((e.start_ns, e.parent_id), (1_800, o.span_id));
        assert!(o.span_id != i.span_id && i.span_id != e.span_id);

        let (oe, ie, ee) = (end(outer_key), end(inner_key), end(explicit_key));
        assert_eq!(
            (oe.span_id, oe.end_ns, oe.status),
            (o.span_id, 2_000, SpanStatus::OK)
        );
        assert_eq!(
            (ie.span_id, ie.end_ns, ie.status),
            (i.span_id, 1_700, SpanStatus::ERROR)
        );
        assert_eq!(
            (ee.span_id, ee.end_ns, ee.status),
            (e.span_id, 1_900, SpanStatus::UNSET)
        );

        let rows = ring.key_of(RegisterKind::ATTR, "rows").expect("attr key");
        let table = ring.key_of(RegisterKind::ATTR, "table").expect("attr key");
        let users = ring
            .key_of(RegisterKind::STRING, "users")
            .expect("string value");
        let attr = |key| -> SpanAttr { ring.records_of(key)[0].view() };
        let a = attr(rows);
        assert_eq!(
            (a.span_id, a.value_type, a.value),
            (i.span_id, AttrValueType::U64, 5)
        );
        let a = attr(table);
        assert_eq!(
            (a.span_id, a.value_type, a.value),
            (i.span_id, AttrValueType::STRING, u64::from(users))
        );
        let delta = ring.key_of(RegisterKind::ATTR, "delta").expect("attr key");
        assert_eq!(attr(delta).value as i64, -3);
        let n = ring.key_of(RegisterKind::ATTR, "n").expect("attr key");
        assert_eq!(ring.records_of(n).len(), 8, "at most 8 attributes per span");
    });
}

#[test]
fn each_thread_claims_its_own_ring() {
    let _dog = watchdog(Duration::from_secs(20));
    let server = server();
    let barrier = std::sync::Arc::new(Barrier::new(2));
    let threads: Vec<_> = ["grant.thread_a", "grant.thread_b"]
        .into_iter()
        .map(|name| {
            let barrier = std::sync::Arc::clone(&barrier);
            std::thread::spawn(move || {
                nexus_metrics::Counter::new(name, &[]).increment(1);
                // Both threads are alive at once: two rings, not one reused.
                barrier.wait();
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let a = server.find(RegisterKind::COUNTER, "grant.thread_a", |r, _| r.ring_id);
    let b = server.find(RegisterKind::COUNTER, "grant.thread_b", |r, _| r.ring_id);
    assert_ne!(a, b, "two threads, two rings");
    server.with_rings(|rings| {
        let hints: Vec<_> = rings
            .iter()
            .filter(|r| r.ring_id == a || r.ring_id == b)
            .map(|r| r.hint)
            .collect();
        assert_eq!(hints.len(), 2);
        assert_ne!(hints[0], hints[1], "one grant request per thread");
    });
}

#[test]
fn a_million_samples_send_no_message() {
    let _dog = watchdog(Duration::from_secs(30));
    let server = server();
    let (recorded_tx, recorded_rx) = mpsc::channel();
    let (drained_tx, drained_rx) = mpsc::channel::<()>();
    let producer = std::thread::spawn(move || {
        let c = counter!("grant.million");
        for _ in 0..1_000_000 {
            c.increment(1);
        }
        recorded_tx.send(()).expect("main thread waits");
        drained_rx.recv().expect("main thread drains");
        assert!(nexus_metrics::flush());
    });
    // Nothing drains while it records: the ring fills after ~60 records and the
    // rest coalesce, still without a message.
    recorded_rx.recv().expect("producer records");
    server.drain();
    drained_tx.send(()).expect("producer waits");
    producer.join().expect("producer");

    // Every message the server ever received was a grant request that got a ring
    // (one per thread in this binary), none per sample.
    assert_eq!(server.messages(), server.rings());
    assert_eq!(server.connections(), 1, "one connection per process");
    server.find(RegisterKind::COUNTER, "grant.million", |ring, key| {
        assert_eq!(sum(&ring.records_of(key)), 1_000_000);
        assert_eq!(ring.producer_dropped, 0);
    });
}
