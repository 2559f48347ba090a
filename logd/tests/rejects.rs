//! Every reject class, through a real socket: the status and reason in the reply, and the
//! per-class and per-sender counters in STATS.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{config, flood_command, flood_from_env, records, start, watchdog};
use logd::frame::{self, Reply};
use logd::{Client, ClientError, Level, Query, Reason, Record, RecordStatus, Reject, Stats};

fn me(stats: &Stats) -> &logd::SenderStats {
    stats
        .senders
        .iter()
        .find(|s| s.pid == Some(std::process::id()))
        .expect("this process is a sender")
}

fn error_of(reply: Reply) -> (Reject, Reason) {
    match reply {
        Reply::Error(e) => (e.class, e.reason),
        other => panic!("expected ERROR, got {other:?}"),
    }
}

#[test]
fn reject_oversized_frame_is_over_limit_and_closes() {
    let _w = watchdog(30, "reject_oversized_frame");
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let mut c = Client::connect(server.path()).unwrap();
    // A header announcing a 2 MiB body: refused before logd reads (or allocates) it.
    let mut header = Vec::new();
    header.extend_from_slice(&(2u32 << 20).to_le_bytes());
    header.extend_from_slice(&[frame::VERSION, frame::KIND_APPEND, 0, 0]);
    let (class, reason) = error_of(c.request_raw(&header).unwrap());
    assert_eq!((class, reason), (Reject::OverLimit, Reason::FrameTooLarge));
    // The stream cannot be resynchronised, so logd closed it.
    assert!(c.stats().unwrap_err().is_connection_lost());

    let mut c = Client::connect(server.path()).unwrap();
    let s = c.stats().unwrap();
    assert_eq!(s.rejected.over_limit, 1);
    assert_eq!(me(&s).rejected.over_limit, 1);

    // The client refuses to build an oversized frame at all, sending nothing.
    let huge = Record::new(Level::Info, "s", "x".repeat(2 << 20));
    assert!(matches!(
        c.append(&[huge]),
        Err(ClientError::RecordTooLarge { index: 0, .. })
    ));
    assert_eq!(c.stats().unwrap().rejected.over_limit, 1);
}

#[test]
fn reject_too_many_records_in_one_frame() {
    let _w = watchdog(30, "reject_too_many_records");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_records_per_frame = 4;
    let server = start(cfg);
    let mut c = Client::connect(server.path()).unwrap();
    match c.append_frame(&records("s", 5)) {
        Err(ClientError::Rejected(e)) => {
            assert_eq!(
                (e.class, e.reason),
                (Reject::OverLimit, Reason::TooManyRecords)
            );
            assert!(e.message.contains('4'), "{}", e.message);
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // The framing was intact, so the connection goes on; the client splits batches.
    let opts = c.options().clone();
    drop(c);
    let mut c = Client::connect_with(
        server.path(),
        logd::ClientOptions {
            max_records_per_frame: 4,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(c.append(&records("s", 9)).unwrap().accepted(), 9);
    let s = c.stats().unwrap();
    assert_eq!(s.rejected.over_limit, 1);
    assert_eq!(me(&s).accepted, 9);
}

#[test]
fn reject_over_limit_per_record_bounds() {
    let _w = watchdog(30, "reject_over_limit_per_record_bounds");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_fields = 2;
    cfg.limits.max_key_bytes = 8;
    cfg.limits.max_value_bytes = 16;
    cfg.limits.max_scope_bytes = 8;
    cfg.limits.max_message_bytes = 32;
    let server = start(cfg);
    let mut c = Client::connect(server.path()).unwrap();
    let ok = Record::new(Level::Info, "scope", "fine").field("k", "v");
    let batch = vec![
        ok.clone(),
        ok.clone().field("a", "1").field("b", "2"),
        Record::new(Level::Info, "s", "m").field("k".repeat(9), "v"),
        Record::new(Level::Info, "s", "m").field("k", "v".repeat(17)),
        Record::new(Level::Info, "s".repeat(9), "m"),
        Record::new(Level::Info, "s", "m".repeat(33)),
        ok.clone(),
    ];
    let report = c.append(&batch).unwrap();
    let got: Vec<_> = report
        .statuses
        .iter()
        .map(|s| match s {
            RecordStatus::Accepted(_) => None,
            RecordStatus::Rejected(c, r) => Some((*c, *r)),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            None,
            Some((Reject::OverLimit, Reason::TooManyFields)),
            Some((Reject::OverLimit, Reason::KeyTooLong)),
            Some((Reject::OverLimit, Reason::ValueTooLong)),
            Some((Reject::OverLimit, Reason::ScopeTooLong)),
            Some((Reject::OverLimit, Reason::MessageTooLong)),
            None,
        ]
    );
    // Exactly at the bounds is fine.
    let edge = Record::new(Level::Info, "s".repeat(8), "m".repeat(32))
        .field("k".repeat(8), "v".repeat(16))
        .field("x", "");
    assert!(c.append(&[edge]).unwrap().all_accepted());
    let s = c.stats().unwrap();
    assert_eq!(s.rejected.over_limit, 5);
    assert_eq!(me(&s).rejected.over_limit, 5);
    assert_eq!(s.accepted, 3);
    assert_eq!(c.query(&Query::new()).unwrap().records.len(), 3);
}

#[test]
fn reject_invalid_args_malformed_frames_keep_the_connection() {
    let _w = watchdog(30, "reject_invalid_args_malformed_frames");
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let mut c = Client::connect(server.path()).unwrap();
    let good = frame::encode_append(&records("s", 2));

    let with_body = |kind: u8, version: u8, flags: u16, body: &[u8]| {
        let mut f = Vec::new();
        f.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
        f.push(version);
        f.push(kind);
        f.extend_from_slice(&flags.to_le_bytes());
        f.extend_from_slice(body);
        f
    };
    let body = &good[frame::HEADER_LEN..];
    let mut trailing = body.to_vec();
    trailing.push(7);
    let mut bad_count = body.to_vec();
    bad_count[..4].copy_from_slice(&1000u32.to_le_bytes());
    let cases = [
        (
            with_body(frame::KIND_APPEND, 1, 0, &body[..body.len() - 3]),
            Reason::Malformed,
        ),
        (
            with_body(frame::KIND_APPEND, 1, 0, &trailing),
            Reason::Malformed,
        ),
        (
            with_body(frame::KIND_APPEND, 1, 0, &bad_count),
            Reason::Malformed,
        ),
        (
            with_body(frame::KIND_APPEND, 2, 0, body),
            Reason::UnsupportedVersion,
        ),
        (
            with_body(frame::KIND_APPEND, 1, 1, body),
            Reason::UnknownKind,
        ),
        (with_body(0x42, 1, 0, body), Reason::UnknownKind),
        (with_body(frame::KIND_STATS, 1, 0, b"x"), Reason::Malformed),
        (
            with_body(frame::KIND_QUERY, 1, 0, &[0; 5]),
            Reason::Malformed,
        ),
    ];
    for (f, reason) in &cases {
        let (class, r) = error_of(c.request_raw(f).unwrap());
        assert_eq!((class, r), (Reject::InvalidArgs, *reason));
    }
    // Still the same connection, still in sync.
    assert!(matches!(c.request_raw(&good).unwrap(), Reply::Append(r) if r.accepted() == 2));
    let s = c.stats().unwrap();
    assert_eq!(s.rejected.invalid_args, cases.len() as u64);
    assert_eq!(me(&s).rejected.invalid_args, cases.len() as u64);
    assert_eq!(s.accepted, 2);
}

#[test]
fn reject_invalid_args_bad_level_utf8_and_empty_key() {
    let _w = watchdog(30, "reject_invalid_args_bad_level_utf8");
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let mut c = Client::connect(server.path()).unwrap();
    // Hand-built APPEND: [good, level 9, non-UTF-8 message, empty key].
    let mut body = Vec::new();
    body.extend_from_slice(&4u32.to_le_bytes());
    let rec = |b: &mut Vec<u8>, level: u8, msg: &[u8], key: &[u8]| {
        b.push(level);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.push(b's');
        b.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_le_bytes());
        b.extend_from_slice(msg);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&u32::try_from(key.len()).unwrap().to_le_bytes());
        b.extend_from_slice(key);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.push(b'v');
    };
    rec(&mut body, 2, b"ok", b"k");
    rec(&mut body, 9, b"ok", b"k");
    rec(&mut body, 2, b"\xff\xfe", b"k");
    rec(&mut body, 2, b"ok", b"");
    let mut f = Vec::new();
    f.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
    f.extend_from_slice(&[frame::VERSION, frame::KIND_APPEND, 0, 0]);
    f.extend_from_slice(&body);
    let Reply::Append(report) = c.request_raw(&f).unwrap() else {
        panic!("expected APPEND_OK");
    };
    assert!(matches!(report.statuses[0], RecordStatus::Accepted(_)));
    assert_eq!(
        report.statuses[1..],
        [
            RecordStatus::Rejected(Reject::InvalidArgs, Reason::BadLevel),
            RecordStatus::Rejected(Reject::InvalidArgs, Reason::BadUtf8),
            RecordStatus::Rejected(Reject::InvalidArgs, Reason::EmptyKey),
        ]
    );
    let s = c.stats().unwrap();
    assert_eq!(me(&s).rejected.invalid_args, 3);
    assert_eq!(s.accepted, 1);
}

#[test]
fn reject_identity_spoofing_is_invalid_args() {
    let _w = watchdog(30, "reject_identity_spoofing");
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let mut c = Client::connect(server.path()).unwrap();
    let claims = [
        "service",
        "service_id",
        "sender_service_id",
        "Service-Name",
        "sender.pid",
        "uid",
        "_PID",
        "_SYSTEMD_UNIT",
    ];
    let batch: Vec<Record> = claims
        .iter()
        .map(|k| Record::new(Level::Warn, "spoof", "I am root").field(*k, "root"))
        .collect();
    let report = c.append(&batch).unwrap();
    for (k, s) in claims.iter().zip(&report.statuses) {
        assert_eq!(
            *s,
            RecordStatus::Rejected(Reject::InvalidArgs, Reason::IdentityClaim),
            "{k}"
        );
    }
    // Nothing was stored, and an honest record is stamped with what the kernel saw.
    assert!(c.query(&Query::new()).unwrap().records.is_empty());
    let honest = Record::new(Level::Info, "spoof", "honest").field("subject", "checkout");
    assert!(c.append(&[honest]).unwrap().all_accepted());
    let page = c.query(&Query::new()).unwrap();
    let stamped = &page.records[0].sender;
    assert_eq!(stamped.pid, std::process::id());
    assert_eq!(stamped.uid, common::my_uid());
    assert_eq!(stamped.service, format!("uid:{}", common::my_uid()));
    let s = c.stats().unwrap();
    assert_eq!(me(&s).rejected.invalid_args, claims.len() as u64);
}

#[test]
fn reject_rate_limited_records_per_sender() {
    let _w = watchdog(60, "reject_rate_limited_records");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.quota.records_per_sec = 1;
    cfg.quota.records_burst = 50;
    let server = start(cfg);
    // A noisy child process spends its own bucket...
    let flood = flood_command(server.path(), 4).output().unwrap();
    assert!(
        flood.status.success(),
        "{}",
        String::from_utf8_lossy(&flood.stderr)
    );
    // ...and this process still has its whole burst.
    let mut c = Client::connect(server.path()).unwrap();
    let report = c.append(&records("quiet", 50)).unwrap();
    assert_eq!(report.accepted(), 50);
    let report = c.append(&records("quiet", 10)).unwrap();
    assert!(report.rejected_as(Reject::RateLimited) >= 9, "{report:?}");
    assert!(report.statuses.iter().all(|s| matches!(
        s,
        RecordStatus::Accepted(_) | RecordStatus::Rejected(Reject::RateLimited, Reason::RecordRate)
    )));
    let s = c.stats().unwrap();
    let noisy = s
        .senders
        .iter()
        .find(|p| p.pid.is_some() && p.pid != Some(std::process::id()) && p.accepted > 0)
        .expect("the flooder is listed");
    // The flooder sent 4 x 500 records with a 50-record burst.
    assert!(noisy.accepted >= 50 && noisy.accepted < 2000, "{noisy:?}");
    assert_eq!(noisy.accepted + noisy.rejected.rate_limited, 2000);
    assert_eq!(
        me(&s).rejected.rate_limited,
        report.rejected_as(Reject::RateLimited) as u64
    );
    assert_eq!(
        s.rejected.rate_limited,
        noisy.rejected.rate_limited + me(&s).rejected.rate_limited
    );
}

#[test]
fn reject_rate_limited_bytes() {
    let _w = watchdog(30, "reject_rate_limited_bytes");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_frame_bytes = 4096;
    cfg.journal.segment_bytes = 4096;
    cfg.quota.bytes_per_sec = 1;
    cfg.quota.bytes_burst = 4096;
    let server = start(cfg);
    let mut c = Client::connect(server.path()).unwrap();
    let big: Vec<Record> = (0..8)
        .map(|_| Record::new(Level::Info, "s", "x".repeat(1000)))
        .collect();
    let mut report = logd::AppendReport::default();
    for r in &big {
        report
            .statuses
            .extend(c.append(std::slice::from_ref(r)).unwrap().statuses);
    }
    // Each record costs a little over 1000 bytes (its stored encoding), so three fit
    // the 4096-byte burst and a fourth does not; the refill (1 byte/s) is negligible.
    let n = report.accepted();
    assert_eq!(n, 3, "{report:?}");
    assert!(
        report.statuses[n..]
            .iter()
            .all(|s| *s == RecordStatus::Rejected(Reject::RateLimited, Reason::ByteRate))
    );
    assert_eq!(me(&c.stats().unwrap()).rejected.rate_limited, 5);
}

#[test]
fn reject_too_many_connections() {
    let _w = watchdog(30, "reject_too_many_connections");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_connections = 2;
    let server = start(cfg);
    let mut a = Client::connect(server.path()).unwrap();
    let _b = Client::connect(server.path()).unwrap();
    a.stats().unwrap();
    let mut third = UnixStream::connect(server.path()).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let h = frame::read_frame(&mut third, 1 << 20, &mut buf).unwrap();
    let (class, reason) = error_of(frame::decode_reply(&h, &buf).unwrap());
    assert_eq!(
        (class, reason),
        (Reject::OverLimit, Reason::TooManyConnections)
    );
    assert_eq!(
        third.read(&mut [0u8; 1]).unwrap(),
        0,
        "closed after the refusal"
    );
    let s = a.stats().unwrap();
    assert_eq!(s.connections, 2);
    assert_eq!(s.rejected.over_limit, 1);
}

#[test]
fn reject_slow_frame_is_over_limit_after_timeout() {
    let _w = watchdog(30, "reject_slow_frame");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.frame_timeout_ms = 300;
    let server = start(cfg);
    let mut s = UnixStream::connect(server.path()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Half a header, then silence.
    s.write_all(&[20, 0, 0, 0]).unwrap();
    let mut buf = Vec::new();
    let h = frame::read_frame(&mut s, 1 << 20, &mut buf).unwrap();
    let (class, reason) = error_of(frame::decode_reply(&h, &buf).unwrap());
    assert_eq!((class, reason), (Reject::OverLimit, Reason::Timeout));
    let mut c = Client::connect(server.path()).unwrap();
    assert_eq!(c.stats().unwrap().rejected.over_limit, 1);
}

#[test]
fn reject_query_with_too_many_field_matches() {
    let _w = watchdog(30, "reject_query_too_many_matches");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_fields = 1;
    let server = start(cfg);
    let mut c = Client::connect(server.path()).unwrap();
    match c.query(&Query::new().field("a", "1").field("b", "2")) {
        Err(ClientError::Rejected(e)) => {
            assert_eq!(
                (e.class, e.reason),
                (Reject::OverLimit, Reason::TooManyFields)
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(
        c.query(&Query::new().field("a", "1"))
            .unwrap()
            .records
            .is_empty()
    );
}

/// Not a test on its own: the child process of the rate-limit test (`flood_command`).
#[test]
#[ignore = "helper process for the rate-limit and quota tests"]
fn flood_helper() {
    let mut answered = 0;
    let batches = flood_from_env(|report| answered += report.statuses.len());
    assert_eq!(answered, batches * 500);
}
