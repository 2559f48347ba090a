//! The ABI spec's answers (`abi/README.md`), each checked against a real metricsd over
//! real grants and memfds: reserved words, registrations across publishes and
//! interruptions, what a refused registration costs, the grant's capacity rule and
//! unknown ops, unknown kinds, and a fresh ring's positions.

mod common;

use common::{Control, WAIT, config, registration, start, watchdog};
use metricsd::{Class, Reason};
use telemetry_abi::{
    AttrValueType, CONSUMER_FLAGS_OFFSET, DROPPED_OFFSET, GrantOp, GrantRequest, GrantStatus,
    PRODUCER_LINE_OFFSET, READ_POS_OFFSET, RECORDS_OFFSET, Record, RecordKind, RegisterKind,
    SpanStatus, WRITE_POS_OFFSET,
};
use telemetry_ring::Region;
use telemetry_ring::sync::Ordering;
use zerocopy::IntoBytes;

#[test]
fn reserved_words_are_ignored_in_samples_spans_and_registrations() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, sink) = start(config(dir.path()), &["web"]);
    let c = Control::connect(daemon.socket_path());
    let mut r = c.ring(1024);
    // A registration whose head's reserved bytes and last piece's padding are set.
    let mut reg = registration(1, RegisterKind::COUNTER, "hits", &[("route", "/a")]);
    reg[0].words[1] = u64::MAX;
    reg[0].words[2] = 0x1234;
    let last = reg.len() - 1;
    reg[last].words[2] |= 0xff00_0000_0000_0000;
    r.writer.push_all(&reg).expect("room");
    r.register(2, RegisterKind::GAUGE, "depth", &[]);
    r.register(3, RegisterKind::HISTOGRAM, "size", &[]);
    r.register(4, RegisterKind::SPAN, "op", &[]);
    r.register(5, RegisterKind::ATTR, "rows", &[]);
    let garbage = |mut rec: Record, flags: bool, from_word: usize| {
        if flags {
            rec.flags = 0xbeef;
        }
        for w in &mut rec.words[from_word..] {
            *w = 0xdead_beef_0bad_f00d;
        }
        rec
    };
    r.push(garbage(Record::counter(1, 5), true, 1));
    r.push(garbage(Record::counter(1, 6), false, 1));
    r.push(garbage(Record::gauge(2, -7), true, 1));
    r.push(garbage(Record::histogram(3, 9), true, 1));
    r.push(garbage(Record::span_start(4, 1, 0, 100), true, 3));
    r.push(garbage(
        Record::span_attr(5, 1, AttrValueType::U64, 42),
        false,
        2,
    ));
    r.push(garbage(
        Record::span_end(4, 1, 160, SpanStatus::OK),
        false,
        2,
    ));
    let snap = daemon.flush(WAIT).expect("flush");
    assert_eq!(
        snap.rejects.total(),
        0,
        "nothing refused: {:?}",
        snap.rejects
    );
    assert_eq!(snap.counter("web", "hits", &[("route", "/a")]), Some(11));
    assert_eq!(snap.gauge("web", "depth", &[]), Some(-7));
    let histogram = snap.histogram("web", "size", &[]).expect("histogram");
    assert_eq!(
        (histogram.count(), histogram.sum_text()),
        (1, "9".to_owned())
    );
    assert_eq!((snap.spans.started, snap.spans.ended), (1, 1));
    let span = sink.find("span", "op");
    let span = span.first().expect("span exported");
    assert_eq!(span.get("duration_ns"), Some("60"));
    assert_eq!(span.get("status"), Some("ok"));
    assert_eq!(span.get("attr.rows"), Some("42"));
    daemon.shutdown();
}

#[test]
fn a_registration_split_across_two_publishes_is_accepted() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, _sink) = start(config(dir.path()), &["web"]);
    let c = Control::connect(daemon.socket_path());
    let mut r = c.ring(1024);
    let long = "x".repeat(60);
    let reg = registration(1, RegisterKind::COUNTER, "split", &[("k", &long)]);
    assert!(reg.len() >= 4);
    // The head and first piece, drained before the rest is even written.
    r.writer.push_all(&reg[..2]).expect("room");
    let mid = daemon.settle(WAIT).expect("settle");
    assert_eq!(mid.drain.records, 2);
    assert_eq!(mid.drain.registrations, 0, "not complete yet");
    r.writer.push_all(&reg[2..]).expect("room");
    r.push(Record::counter(1, 3));
    let snap = daemon.settle(WAIT).expect("settle");
    assert_eq!(snap.rejects.total(), 0);
    assert_eq!(snap.drain.registrations, 1);
    assert_eq!(snap.counter("web", "split", &[("k", &long)]), Some(3));
    daemon.shutdown();
}

#[test]
fn a_record_inside_a_registration_refuses_it_once_and_is_handled_on_its_own() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, _sink) = start(config(dir.path()), &["web"]);
    let c = Control::connect(daemon.socket_path());
    let mut r = c.ring(1024);
    r.register(1, RegisterKind::COUNTER, "ok", &[]);
    let reg = registration(2, RegisterKind::COUNTER, "cut", &[("k", &"y".repeat(60))]);
    assert!(reg.len() >= 4);
    r.writer.push_all(&reg[..2]).expect("room");
    r.push(Record::counter(1, 10)); // interrupts; counted on its own key
    r.push(Record::counter(2, 1)); // the interrupted key never got bound
    r.writer.push_all(&reg[2..]).expect("room"); // the rest: passed over, not counted
    // A head inside a registration interrupts it too, and starts its own.
    let other = registration(3, RegisterKind::COUNTER, "next", &[]);
    r.writer.push_all(&reg[..2]).expect("room");
    r.writer.push_all(&other).expect("room");
    r.writer.push_all(&reg[2..]).expect("room");
    r.push(Record::counter(3, 4));
    let snap = daemon.settle(WAIT).expect("settle");
    let rj = &snap.rejects;
    assert_eq!(rj.get(Reason::RegistrationInterrupted), 2);
    assert_eq!(rj.get(Reason::UnregisteredKey), 1);
    assert_eq!(rj.total(), 3, "{rj:?}");
    assert_eq!(snap.counter("web", "ok", &[]), Some(10));
    assert_eq!(snap.counter("web", "next", &[]), Some(4));
    assert!(
        snap.find(
            "web",
            metricsd::MetricKind::Counter,
            "cut",
            &[("k", &"y".repeat(60))]
        )
        .is_none()
    );
    daemon.shutdown();
}

#[test]
fn a_refused_registration_costs_one_reject_however_many_records_it_has() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.rings.max_keys_per_ring = 3;
    let (daemon, _sink) = start(cfg, &["web"]);
    let c = Control::connect(daemon.socket_path());
    let mut r = c.ring(1024);
    let v = "v".repeat(64);
    let labels = [("a", v.as_str()), ("b", v.as_str()), ("c", v.as_str())];
    let good = registration(9, RegisterKind::COUNTER, "long", &labels);
    assert!(good.len() >= 9, "{} records", good.len());
    // Refused at its head (an unknown registered kind).
    let mut bad = good.clone();
    bad[0].flags = 77;
    r.writer.push_all(&bad).expect("room");
    // Refused in its middle (a piece out of sequence).
    let mut bad = good.clone();
    bad[3].flags = 30;
    r.writer.push_all(&bad).expect("room");
    // Refused when complete (a control character in a label value).
    let mut bad = good.clone();
    let last = bad.len() - 1;
    let at = bad[last]
        .as_bytes()
        .iter()
        .rposition(|b| *b == b'v')
        .expect("a value byte");
    bad[last].as_mut_bytes()[at] = 0x7f;
    r.writer.push_all(&bad).expect("room");
    // Pieces without their head.
    r.writer.push_all(&good[1..]).expect("room");
    // Refused for conflicting with the key's first registration.
    r.register(1, RegisterKind::COUNTER, "first", &[]);
    r.writer
        .push_all(&registration(1, RegisterKind::COUNTER, "other", &labels))
        .expect("room");
    // Refused for a full key table (3 keys).
    r.register(2, RegisterKind::COUNTER, "second", &[]);
    r.register(3, RegisterKind::COUNTER, "third", &[]);
    r.writer.push_all(&good).expect("room");
    let snap = daemon.settle(WAIT).expect("settle");
    let rj = &snap.rejects;
    assert_eq!(rj.get(Reason::BadRegistration), 4, "{rj:?}");
    assert_eq!(rj.get(Reason::RegistrationConflict), 1);
    assert_eq!(rj.get(Reason::KeyTableFull), 1);
    assert_eq!(rj.total(), 6, "one per refused registration: {rj:?}");
    assert_eq!(rj.class_total(Class::InvalidArgs), 5);
    assert_eq!(snap.drain.registrations, 3);
    daemon.shutdown();
}

#[test]
fn the_grant_takes_powers_of_two_from_2_and_refuses_other_capacities_and_ops() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.rings.max_capacity = 1 << 16;
    let (daemon, _sink) = start(cfg, &["web"]);
    let c = Control::connect(daemon.socket_path());
    for capacity in [1, 3, 6, 1000, (1 << 16) + 1, u32::MAX] {
        let (resp, fd) = c.request(capacity);
        assert_eq!(
            resp.status,
            GrantStatus::INVALID_ARGS,
            "capacity {capacity}"
        );
        assert!(fd.is_none());
    }
    for op in [0u16, 2, 0xffff] {
        let req = GrantRequest {
            op: GrantOp(op),
            ..GrantRequest::ring(0, 0)
        };
        let (resp, fd) = c.raw(req.as_bytes());
        assert_eq!(resp.status, GrantStatus::INVALID_ARGS, "op {op}");
        assert!(fd.is_none());
    }
    for (asked, granted) in [(2, 2), (0, 1024), (1 << 16, 1 << 16), (1 << 31, 1 << 16)] {
        let (resp, fd) = c.request(asked);
        assert_eq!(resp.status, GrantStatus::OK, "capacity {asked}");
        assert_eq!(resp.capacity, granted, "capacity {asked}");
        let region = telemetry_ring::MemfdRegion::attach(fd.expect("fd")).expect("attach");
        assert_eq!(u64::from(region.geometry().capacity()), u64::from(granted));
    }
    let snap = daemon.snapshot().expect("snapshot");
    assert_eq!(snap.grant.refused.get("invalid_args"), Some(&9));
    assert_eq!(snap.grant.granted, 4);
    daemon.shutdown();
}

#[test]
fn a_fresh_ring_starts_at_position_zero_with_zero_lines() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, _sink) = start(config(dir.path()), &["web"]);
    let c = Control::connect(daemon.socket_path());
    let (resp, fd) = c.request(64);
    assert_eq!(resp.status, GrantStatus::OK);
    let fd = fd.expect("fd");
    // Read the whole region as the producer maps it, byte for byte.
    let len = rustix::fs::fstat(&fd).expect("fstat").st_size as usize;
    assert_eq!(len, RECORDS_OFFSET + 64 * 32);
    let mut bytes = vec![0u8; len];
    let mut at = 0;
    while at < len {
        let n = rustix::io::pread(&fd, &mut bytes[at..], at as u64).expect("pread");
        assert!(n > 0);
        at += n;
    }
    let word = |off: usize| u64::from_le_bytes(bytes[off..off + 8].try_into().expect("8"));
    assert_eq!(word(WRITE_POS_OFFSET), 0, "write_pos");
    assert_eq!(word(DROPPED_OFFSET), 0, "dropped");
    assert_eq!(word(READ_POS_OFFSET), 0, "read_pos");
    assert_eq!(word(CONSUMER_FLAGS_OFFSET), 0, "consumer_flags");
    assert!(bytes[32..128].iter().all(|b| *b == 0), "header reserved");
    assert!(
        bytes[PRODUCER_LINE_OFFSET..].iter().all(|b| *b == 0),
        "lines and slots"
    );
    // The first record goes to slot 0.
    let region = telemetry_ring::MemfdRegion::attach(fd).expect("attach");
    let mut w = telemetry_ring::Writer::new(region);
    w.push(Record::counter(1, 1)).expect("room");
    assert_eq!(w.region().write_pos().load(Ordering::Acquire), 1);
    let snap = daemon.settle(WAIT).expect("settle");
    assert_eq!(snap.rings[0].consumed, 1);
    assert_eq!(snap.rejects.get(Reason::UnregisteredKey), 1);
    daemon.shutdown();
}

#[test]
fn unknown_record_kinds_are_rejected_one_by_one_and_the_ring_carries_on() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, _sink) = start(config(dir.path()), &["web"]);
    let c = Control::connect(daemon.socket_path());
    let mut r = c.ring(1024);
    r.register(1, RegisterKind::COUNTER, "hits", &[]);
    // 0x04 to 0x06 are ABI 1.1's float samples and 0x13 to 0x16 its span records; the
    // rest of 0x04 to 0x1f stays undefined.
    for kind in [0x00, 0x07, 0x0f, 0x17, 0x1f, 0x22, 0x4242, 0xffff] {
        r.push(Record {
            kind: RecordKind(kind),
            ..Record::counter(1, 1000)
        });
        r.push(Record::counter(1, 1));
    }
    // An unknown registered kind (7 is ABI 1.1's metric metadata): one bad
    // registration.
    let mut reg = registration(2, RegisterKind::COUNTER, "later", &[]);
    reg[0].flags = 99;
    r.writer.push_all(&reg).expect("room");
    let snap = daemon.settle(WAIT).expect("settle");
    assert_eq!(snap.rejects.get(Reason::UnknownKind), 8);
    assert_eq!(snap.rejects.get(Reason::BadRegistration), 1);
    assert_eq!(snap.rejects.total(), 9);
    assert_eq!(snap.counter("web", "hits", &[]), Some(8));
    assert_eq!(snap.drain.rings_quarantined, 0);
    daemon.shutdown();
}

/// Sends `request` with `fd` attached (`SCM_RIGHTS`) and reads the one answer.
fn send_with_fd(
    c: &Control,
    request: &GrantRequest,
    fd: std::os::fd::BorrowedFd<'_>,
) -> GrantStatus {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::mem::MaybeUninit;
    let fds = [fd];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    rustix::net::sendmsg(
        &c.fd,
        &[std::io::IoSlice::new(request.as_bytes())],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .expect("sendmsg");
    let mut buf = [0u8; 64];
    let (n, _) = rustix::net::recv(&c.fd, &mut buf, rustix::net::RecvFlags::empty()).expect("recv");
    assert_eq!(n, 32, "one answer frame");
    <telemetry_abi::GrantResponse as zerocopy::FromBytes>::read_from_bytes(&buf[..32])
        .expect("32 bytes")
        .status
}

#[test]
fn a_returned_ring_is_refused_unless_the_log_knows_it_as_a_dead_daemons() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.retention.dir = Some(dir.path().join("history"));
    let (daemon, _sink) = start(cfg, &["web"]);
    let c = Control::connect(daemon.socket_path());
    let ret = GrantRequest::return_ring(0);
    // Without an fd, and with a capacity: refused, the connection still usable.
    let (resp, fd) = c.raw(ret.as_bytes());
    assert_eq!(resp.status, GrantStatus::INVALID_ARGS);
    assert!(fd.is_none());
    let with_capacity = GrantRequest {
        capacity: 1024,
        ..ret
    };
    assert_eq!(
        c.raw(with_capacity.as_bytes()).0.status,
        GrantStatus::INVALID_ARGS
    );
    // A ring of this very daemon, still live: refused (it is being drained).
    let live = c.ring(1024);
    assert_eq!(
        send_with_fd(&c, &ret, live.writer.region().fd()),
        GrantStatus::INVALID_ARGS
    );
    // A ring nobody granted (the producer made the memfd itself): refused.
    let forged = telemetry_ring::MemfdRegion::create(
        "forged",
        telemetry_abi::Geometry::new(1024).expect("pow2"),
        live.writer.region().mapped().header_epoch() + 1,
    )
    .expect("memfd");
    assert_eq!(
        send_with_fd(&c, &ret, forged.fd()),
        GrantStatus::INVALID_ARGS
    );
    // A grant request with an fd attached: refused.
    assert_eq!(
        send_with_fd(&c, &GrantRequest::ring(0, 0), forged.fd()),
        GrantStatus::INVALID_ARGS
    );
    let snap = daemon.snapshot().expect("snapshot");
    assert_eq!(snap.grant.refused.get("invalid_args"), Some(&5));
    assert_eq!(
        snap.grant.refused_reasons.get("return_without_fd"),
        Some(&1)
    );
    assert_eq!(snap.grant.refused_reasons.get("unexpected_fd"), Some(&1));
    assert_eq!(snap.grant.returned, 0);
    daemon.shutdown();
}
