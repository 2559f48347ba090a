//! Hostile producers: rejects counted by reason, quarantine, fairness.

mod common;

use std::sync::{Arc, Mutex};

use common::{Control, WAIT, config, start, watchdog};
use metricsd::drain::{Drainer, NewRing};
use metricsd::export::ExportQueue;
use metricsd::snapshot::GrantStats;
use metricsd::{Class, Reason};
use telemetry_abi::{Record, RecordKind, RegisterKind, SpanStatus};
use telemetry_ring::{MemfdRegion, Region, Writer};

#[test]
fn malformed_records_are_rejected_and_counted_by_reason() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, _sink) = start(config(dir.path()), &["evil"]);
    let control = Control::connect(daemon.socket_path());
    let mut r = control.ring(256);
    r.register(1, RegisterKind::COUNTER, "c", &[]);
    r.register(2, RegisterKind::SPAN, "op", &[]);
    r.push(Record::counter(9, 1)); // unregistered key
    r.push(Record::counter(0, 1)); // key 0 is never registered
    r.push(Record::gauge(1, 1)); // kind mismatch: a counter key
    r.push(Record::histogram(2, 1)); // kind mismatch: a span key
    r.push(Record {
        kind: RecordKind(0x7777),
        flags: 0,
        key: 1,
        words: [1, 2, 3],
    }); // unknown kind
    r.push(Record::default()); // kind 0
    r.push(Record {
        words: [5, 1, 0],
        ..Record::counter(1, 5)
    }); // a reserved word set: ignored, the sample counts
    r.push(Record::span_start(2, 0, 0, 10)); // span id 0
    r.push(Record::span_end(2, 77, 20, SpanStatus::OK)); // unknown span
    r.push(Record::span_start(2, 5, 0, 100));
    r.push(Record::span_end(2, 5, 120, SpanStatus(9))); // unknown status
    r.register(1, RegisterKind::COUNTER, "other", &[]); // conflicting re-registration
    r.register(1, RegisterKind::COUNTER, "c", &[]); // identical: fine
    // A registration head with its data missing, interrupted by a sample.
    let out = common::registration(3, RegisterKind::COUNTER, "x", &[("k", "v")]);
    assert!(out.len() >= 2);
    r.push(out[0]);
    r.push(Record::counter(1, 7)); // interrupts, then counts
    r.push(Record::counter(1, 1));
    let snap = daemon.settle(WAIT).expect("settle");
    let rj = &snap.rejects;
    assert_eq!(rj.get(Reason::UnregisteredKey), 2);
    assert_eq!(rj.get(Reason::KindMismatch), 2);
    assert_eq!(rj.get(Reason::UnknownKind), 2);
    assert_eq!(rj.get(Reason::SpanIdZero), 1);
    assert_eq!(rj.get(Reason::SpanUnknown), 1);
    assert_eq!(rj.get(Reason::SpanStatus), 1);
    assert_eq!(rj.get(Reason::RegistrationConflict), 1);
    assert_eq!(rj.get(Reason::RegistrationInterrupted), 1);
    assert_eq!(rj.total(), 11);
    assert_eq!(rj.class_total(Class::InvalidArgs), 11);
    assert_eq!(
        snap.counter("evil", "c", &[]),
        Some(13),
        "valid samples still count"
    );
    assert!(
        snap.counter("evil", "other", &[]).is_none(),
        "first registration kept"
    );
    daemon.shutdown();
}

#[test]
fn a_quarantined_ring_leaves_other_rings_exact() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, _sink) = start(config(dir.path()), &["good", "evil"]);
    let good_ctl = Control::connect(daemon.socket_path());
    let mut good = good_ctl.ring(64);
    let evil_ctl = Control::connect(daemon.socket_path());
    let mut evil = evil_ctl.ring(64);
    good.register(1, RegisterKind::COUNTER, "ok", &[]);
    evil.register(1, RegisterKind::COUNTER, "ok", &[]);
    for _ in 0..100 {
        good.push_wait(Record::counter(1, 3));
    }
    evil.push(Record::counter(1, 1));
    daemon.settle(WAIT).expect("settle");
    // Scribble: publish a write position far past the read position.
    let region = evil.writer.region();
    region
        .write_pos()
        .store(u64::MAX / 3, std::sync::atomic::Ordering::Release);
    for _ in 0..100 {
        good.push_wait(Record::counter(1, 3));
    }
    let snap = daemon.settle(WAIT).expect("settle");
    assert_eq!(snap.counter("good", "ok", &[]), Some(600));
    assert_eq!(
        snap.counter("evil", "ok", &[]),
        Some(1),
        "only what it published before"
    );
    assert_eq!(snap.violations.write_out_of_range, 1);
    assert_eq!(snap.drain.rings_quarantined, 1);
    let q: Vec<_> = snap.rings.iter().filter_map(|r| r.quarantined).collect();
    assert_eq!(q, ["write_out_of_range"]);
    assert!(evil.writer.is_abandoned(), "the producer can see it");
    // Later passes skip it without counting it again.
    let again = daemon.settle(WAIT).expect("settle");
    assert_eq!(again.violations.write_out_of_range, 1);
    daemon.shutdown();
}

/// Ring `id` of connection `id`, service `s<id>`.
fn ring(id: u32, capacity: u64) -> (NewRing, Writer<MemfdRegion>) {
    common::new_ring(id, u64::from(id), &format!("s{id}"), 1, capacity)
}

#[test]
fn a_flooding_ring_does_not_starve_a_quiet_one() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.drain.budget = 8;
    let mut d = Drainer::new(
        &cfg,
        ExportQueue::new(1000),
        Arc::new(Mutex::new(GrantStats::default())),
    );
    let (flood_ring, mut flood) = ring(1, 1024);
    let (quiet_ring, mut quiet) = ring(2, 64);
    d.add_ring(flood_ring);
    d.add_ring(quiet_ring);
    let reg = common::registration(1, RegisterKind::COUNTER, "c", &[]);
    flood.push_all(&reg).expect("room");
    quiet.push_all(&reg).expect("room");
    for _ in 0..1000 {
        flood.push(Record::counter(1, 1)).expect("room");
    }
    for _ in 0..3 {
        quiet.push(Record::counter(1, 1)).expect("room");
    }
    // One pass: the quiet ring is fully served; the flood got exactly its budget.
    let consumed = d.pass();
    let snap = d.snapshot();
    assert_eq!(consumed, 8 + reg.len() as u64 + 3);
    assert_eq!(snap.counter("s2", "c", &[]), Some(3));
    let flood_snap = snap.rings.iter().find(|r| r.id == 1).expect("ring 1");
    assert_eq!(flood_snap.consumed, 8);
    assert_eq!(flood_snap.pending, 1000 + reg.len() as u64 - 8);
    assert_eq!(snap.drain.lag, flood_snap.pending);
    // The rest arrives over later passes, exactly.
    while d.pass() > 0 {}
    assert_eq!(d.snapshot().counter("s1", "c", &[]), Some(1000));
}

#[test]
fn key_table_and_live_span_caps_are_over_limit() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.rings.max_keys_per_ring = 2;
    cfg.spans.max_live = 1;
    let mut d = Drainer::new(
        &cfg,
        ExportQueue::new(1000),
        Arc::new(Mutex::new(GrantStats::default())),
    );
    let (r, mut w) = ring(1, 256);
    d.add_ring(r);
    for (key, kind, name) in [
        (1, RegisterKind::SPAN, "a"),
        (2, RegisterKind::COUNTER, "b"),
        (3, RegisterKind::COUNTER, "c"),
    ] {
        let reg = common::registration(key, kind, name, &[]);
        w.push_all(&reg).expect("room");
    }
    w.push(Record::span_start(1, 1, 0, 0)).expect("room");
    w.push(Record::span_start(1, 2, 0, 0)).expect("room");
    w.push(Record::counter(3, 1)).expect("room");
    while d.pass() > 0 {}
    let s = d.snapshot();
    assert_eq!(s.rejects.get(Reason::KeyTableFull), 1);
    assert_eq!(s.rejects.get(Reason::LiveSpansFull), 1);
    assert_eq!(s.rejects.get(Reason::UnregisteredKey), 1);
    assert_eq!(s.rejects.class_total(Class::OverLimit), 2);
    assert_eq!(s.spans.live, 1);
}

/// A producer that writes the consumer's read position right after each grant, before
/// it publishes anything, and again between its publishes: every ring is still read
/// from position 0, every sample counted once, nothing rejected or quarantined.
#[test]
fn a_producer_writing_the_consumer_line_never_moves_the_read_position() {
    use telemetry_ring::sync::Ordering;
    watchdog();
    const RINGS: u32 = 64;
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, _sink) = start(config(dir.path()), &["scribbler"]);
    let control = Control::connect(daemon.socket_path());
    // 3 and 2^40 (each once made the consumer skip the registration or quarantine the
    // ring), then a different pseudo-random word per ring.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut scribble = |i: u32| match i % 3 {
        0 => 3,
        1 => 1u64 << 40,
        _ => {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    };
    let mut rings = Vec::new();
    for i in 0..RINGS {
        let ring = control.ring(1024);
        // First thing after the grant, racing the consumer's attach.
        let word = scribble(i);
        ring.writer
            .region()
            .read_pos()
            .store(word, Ordering::Release);
        rings.push((ring, word));
    }
    for (i, (ring, word)) in rings.iter_mut().enumerate() {
        let label = i.to_string();
        ring.register(1, RegisterKind::COUNTER, "scribbled", &[("ring", &label)]);
        for n in 1..=50u64 {
            ring.push(Record::counter(1, n));
        }
        ring.writer
            .region()
            .read_pos()
            .store(*word, Ordering::Release);
    }
    let published = |rings: &[(common::Ring, u64)]| -> u64 {
        rings
            .iter()
            .map(|(r, _)| r.writer.region().write_pos().load(Ordering::Acquire))
            .sum()
    };
    let first_published = published(&rings);
    let first = daemon.settle(WAIT).expect("settle");
    // Later scribbles, between drains, change nothing either.
    for (ring, word) in &mut rings {
        ring.writer
            .region()
            .read_pos()
            .store(word.rotate_left(17), Ordering::Release);
        for n in 51..=100u64 {
            ring.push(Record::counter(1, n));
        }
    }
    let snap = daemon.settle(WAIT).expect("settle");
    assert_eq!(first.drain.records, first_published, "first half, all read");
    assert_eq!(snap.drain.records, published(&rings), "all read");
    assert_eq!(snap.violations, Default::default(), "no violation");
    assert_eq!(snap.drain.rings_quarantined, 0);
    assert_eq!(snap.rejects.total(), 0, "nothing rejected");
    assert_eq!(snap.rings.len(), RINGS as usize);
    for (ring, _) in &rings {
        let state = snap
            .rings
            .iter()
            .find(|r| r.id == ring.id)
            .expect("ring known");
        let end = ring.writer.region().write_pos().load(Ordering::Acquire);
        assert_eq!(state.consumed, end, "ring {}: from 0 to its end", ring.id);
        assert_eq!(state.quarantined, None);
    }
    for i in 0..RINGS {
        let label = i.to_string();
        assert_eq!(
            snap.counter("scribbler", "scribbled", &[("ring", &label)]),
            Some(5050),
            "ring {i}"
        );
    }
    daemon.shutdown();
}
