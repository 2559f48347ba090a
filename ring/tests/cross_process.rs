//! Ten million records from a child process through a memfd ring it was handed as an
//! fd, every sequence number and checksum verified by the parent.

mod support;

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use telemetry_abi::{Geometry, Record, RecordKind};
use telemetry_ring::{MemfdRegion, Reader, Writer};

const RECORDS: u64 = 10_000_000;
const BATCH: u64 = 64;

fn checksum(seq: u64, salt: u64) -> u64 {
    (seq ^ salt)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(29)
        ^ 0xA5A5_5A5A_F00D_CAFE
}

fn record(seq: u64) -> Record {
    let salt = seq.wrapping_mul(0x1000_0000_01B3);
    Record {
        kind: RecordKind::HISTOGRAM,
        flags: 0,
        key: 7,
        words: [seq, salt, checksum(seq, salt)],
    }
}

#[test]
fn ten_million_records_cross_processes() {
    let path = support::socket_path("ten-million");
    let listener = UnixListener::bind(&path).expect("bind test socket");
    let region = MemfdRegion::create("cross-process", Geometry::new(1 << 16).expect("valid"), 1)
        .expect("create memfd ring");
    let mut child = support::spawn_child("child_writes_ten_million_records", &path);
    let stream = support::accept_within(&listener, Duration::from_secs(30));
    support::send_fd(&stream, region.fd());

    let mut reader = Reader::new(&region);
    let mut expected = 0u64;
    let mut bad = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while expected < RECORDS {
        let drained = reader
            .drain(4096, |r| {
                let [seq, salt, sum] = r.words;
                if seq != expected
                    || sum != checksum(seq, salt)
                    || r.key != 7
                    || r.kind != RecordKind::HISTOGRAM
                {
                    bad += 1;
                }
                expected += 1;
            })
            .expect("a well-behaved child never breaks the protocol");
        if drained.consumed == 0 {
            assert!(
                Instant::now() < deadline,
                "stalled at record {expected} of {RECORDS}"
            );
            std::thread::yield_now();
        }
    }
    assert!(
        support::wait_within(&mut child, Duration::from_secs(60)),
        "child failed"
    );
    assert_eq!(bad, 0, "records out of sequence or with a bad checksum");
    assert_eq!(expected, RECORDS);
    assert_eq!(reader.pending(), Ok(0), "nothing beyond the ten million");
    let stats = reader.stats();
    assert_eq!((stats.delivered, stats.producer_dropped), (RECORDS, 0));
    let _ = std::fs::remove_file(&path);
}

#[test]
#[ignore = "the child half of ten_million_records_cross_processes, run by it"]
fn child_writes_ten_million_records() {
    let region =
        MemfdRegion::attach(support::receive_fd_from_parent()).expect("attach granted ring");
    let mut writer = Writer::new(&region);
    let mut seq = 0;
    while seq < RECORDS {
        for _ in 0..BATCH.min(RECORDS - seq) {
            // try_push: a full ring is waited out here, not counted as a loss.
            while writer.try_push(record(seq)).is_err() {
                assert!(!writer.is_abandoned(), "parent gave up on the ring");
                std::thread::yield_now();
            }
            seq += 1;
        }
    }
    assert_eq!(writer.dropped(), 0);
}
