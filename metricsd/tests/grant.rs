//! The grant protocol over the real control socket.

mod common;

use std::time::{Duration, Instant};

use common::{Control, WAIT, config, start, watchdog};
use telemetry_abi::{GrantRequest, GrantStatus, Record, RegisterKind, SpanStatus};
use zerocopy::IntoBytes;

#[test]
fn malformed_requests_are_invalid_args_and_caps_are_over_limit() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.rings.per_service = 2;
    let (daemon, _sink) = start(cfg, &["web"]);
    let c = Control::connect(daemon.socket_path());
    let bad_magic = GrantRequest {
        magic: 1,
        ..GrantRequest::ring(0, 0)
    };
    for bytes in [
        bad_magic.as_bytes().to_vec(),
        GrantRequest::ring(1000, 0).as_bytes().to_vec(), // not a power of two
        GrantRequest {
            reserved: 1,
            ..GrantRequest::ring(0, 0)
        }
        .as_bytes()
        .to_vec(),
        vec![0u8; 7], // short frame
    ] {
        let (resp, fd) = c.raw(&bytes);
        assert_eq!(resp.status, GrantStatus::INVALID_ARGS);
        assert!(fd.is_none());
    }
    let first = c.ring(0);
    let (resp, fd) = c.request(1 << 30); // larger than allowed: granted smaller
    assert_eq!(resp.status, GrantStatus::OK);
    assert!(fd.is_some());
    assert_eq!(resp.capacity, 1 << 20);
    assert_ne!(resp.ring_id, first.id);
    // A second connection of the same service shares its cap.
    let c2 = Control::connect(daemon.socket_path());
    let (resp, fd) = c2.request(0);
    assert_eq!(resp.status, GrantStatus::OVER_LIMIT);
    assert!(fd.is_none());
    let snap = daemon.snapshot().expect("snapshot");
    assert_eq!(snap.grant.refused.get("invalid_args"), Some(&4));
    assert_eq!(snap.grant.refused.get("over_limit"), Some(&1));
    assert_eq!(snap.grant.granted, 2);
    assert_eq!(snap.grant.messages, 7);
    // When the first connection goes, its rings are freed and the cap frees up.
    drop(first);
    drop(c);
    let deadline = Instant::now() + WAIT;
    loop {
        let (resp, _fd) = c2.request(0);
        if resp.status == GrantStatus::OK {
            break;
        }
        assert!(Instant::now() < deadline, "cap never freed");
        std::thread::sleep(Duration::from_millis(5));
    }
    daemon.shutdown();
}

#[test]
fn request_floods_are_rate_limited() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.rings.grant_burst = 3;
    cfg.rings.grant_rate_per_sec = 1;
    let (daemon, _sink) = start(cfg, &["web"]);
    let c = Control::connect(daemon.socket_path());
    let statuses: Vec<GrantStatus> = (0..5).map(|_| c.request(64).0.status).collect();
    assert_eq!(&statuses[..3], &[GrantStatus::OK; 3]);
    assert_eq!(&statuses[3..], &[GrantStatus::RATE_LIMITED; 2]);
    let snap = daemon.snapshot().expect("snapshot");
    assert_eq!(snap.grant.refused.get("rate_limited"), Some(&2));
    daemon.shutdown();
}

#[test]
fn no_control_message_per_sample() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.drain.budget = 65536;
    let (daemon, _sink) = start(cfg, &["busy"]);
    let c = Control::connect(daemon.socket_path());
    let mut rings: Vec<_> = (0..3).map(|_| c.ring(65536)).collect();
    for r in &mut rings {
        r.register(1, RegisterKind::COUNTER, "n", &[]);
        r.register(2, RegisterKind::HISTOGRAM, "h", &[]);
    }
    const SAMPLES: u64 = 1_000_000;
    for i in 0..SAMPLES {
        let r = &mut rings[(i % 3) as usize];
        if i % 2 == 0 {
            r.push_wait(Record::counter(1, 1));
        } else {
            r.push_wait(Record::histogram(2, i));
        }
    }
    let snap = daemon.settle(WAIT).expect("settle");
    assert_eq!(snap.counter_sum("busy", "n"), u128::from(SAMPLES / 2));
    assert_eq!(snap.grant.granted, 3);
    assert_eq!(
        snap.grant.messages, snap.grant.granted,
        "one message per ring, none per sample"
    );
    let conn = snap.grant.connections.values().next().expect("connection");
    assert_eq!((conn.messages, conn.rings), (3, 3));
    daemon.shutdown();
}

#[test]
fn a_producer_that_dies_leaves_its_open_spans_reported_as_orphaned() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, sink) = start(config(dir.path()), &["doomed"]);
    let c = Control::connect(daemon.socket_path());
    let mut r = c.ring(256);
    r.register(1, RegisterKind::SPAN, "request", &[]);
    r.register(2, RegisterKind::SPAN, "db", &[]);
    r.register(3, RegisterKind::COUNTER, "n", &[]);
    r.push(Record::span_start(1, 1, 0, 1_000));
    r.push(Record::span_start(2, 2, 1, 1_100));
    r.push(Record::span_end(2, 2, 1_400, SpanStatus::OK));
    r.push(Record::span_start(2, 3, 1, 1_500));
    // Published, then the producer dies: no end for spans 1 and 3.
    r.push(Record::counter(3, 5));
    let ring_id = r.id;
    drop(r);
    drop(c);
    let deadline = Instant::now() + WAIT;
    let snap = loop {
        let s = daemon.snapshot().expect("snapshot");
        if s.spans.orphaned == 2 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "orphans never reported: {:?}",
            s.spans
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        snap.counter("doomed", "n", &[]),
        Some(5),
        "what it published counts"
    );
    assert_eq!(snap.spans.live, 0);
    assert!(snap.rings.iter().any(|x| x.id == ring_id && x.closed));
    daemon.flush(WAIT).expect("flush");
    let orphans = sink.find("status", "orphaned");
    let mut names: Vec<_> = orphans.iter().filter_map(|r| r.get("span")).collect();
    names.sort_unstable();
    assert_eq!(names, ["db", "request"]);
    let request = orphans
        .iter()
        .find(|r| r.get("span") == Some("request"))
        .expect("the root, orphaned");
    let (root, trace) = (request.get("span_id"), request.get("trace_id"));
    assert!(root.is_some() && trace.is_some_and(|t| t.len() == 32));
    assert!(orphans.iter().all(|r| r.get("trace_id") == trace));
    assert!(orphans.iter().all(|r| r.get("end_ns").is_none()));
    let done = sink.find("status", "ok");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].get("duration_ns"), Some("300"));
    assert_eq!(done[0].get("parent_id"), root);
    assert_eq!(done[0].get("trace_id"), trace);
    daemon.shutdown();
}
