//! The on-disk journal with the real binary: clean shutdown plus a deliberately torn tail,
//! a crash (SIGKILL), rotation and retention by size.

#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failed unwrap is a failed test"
)]

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use common::{Daemon, config, records, start, watchdog};
use logd::{Client, Level, Query, Record, StoredRecord};

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

fn all(c: &mut Client) -> Vec<StoredRecord> {
    c.query_all(&Query::new(), 1_000_000).unwrap()
}

#[test]
fn recovery_skips_a_torn_tail_and_keeps_everything_acknowledged() {
    let _w = watchdog(60, "recovery_torn_tail");
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    let jarg = jdir.to_str().unwrap();

    let d = Daemon::start(dir.path(), &["--journal-dir", jarg]);
    let mut c = Client::connect(&d.socket).unwrap();
    let ids = c.append(&records("disk", 100)).unwrap().ids();
    assert_eq!(ids.len(), 100);
    let before = all(&mut c);
    drop(c);
    assert!(d.terminate(), "clean shutdown exits 0");

    // A crash in the middle of writing one more record: half an entry at the tail.
    let segs = segments(&jdir);
    let last = segs.last().unwrap();
    let size = fs::metadata(last).unwrap().len();
    let mut f = OpenOptions::new().append(true).open(last).unwrap();
    f.write_all(&[0x40, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
        .unwrap();
    drop(f);

    let d = Daemon::start(dir.path(), &["--journal-dir", jarg]);
    let mut c = Client::connect(&d.socket).unwrap();
    assert_eq!(
        all(&mut c),
        before,
        "every acknowledged record is back, unchanged"
    );
    let s = c.stats().unwrap();
    assert_eq!((s.disk.recovered, s.disk.corrupt_skipped), (100, 1));
    assert_eq!(
        fs::metadata(last).unwrap().len(),
        size,
        "the torn tail was cut"
    );
    // New records continue the id sequence and survive the next restart too.
    let more = c.append(&records("disk", 5)).unwrap().ids();
    assert_eq!(more, (101..=105).collect::<Vec<_>>());
    drop(c);
    assert!(d.terminate());
    let d = Daemon::start(dir.path(), &["--journal-dir", jarg]);
    let mut c = Client::connect(&d.socket).unwrap();
    assert_eq!(all(&mut c).len(), 105);
    assert_eq!(c.stats().unwrap().disk.corrupt_skipped, 0);
}

#[test]
fn recovery_after_sigkill_keeps_acknowledged_records() {
    let _w = watchdog(60, "recovery_sigkill");
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    let jarg = jdir.to_str().unwrap();
    let d = Daemon::start(dir.path(), &["--journal-dir", jarg]);
    let mut c = Client::connect(&d.socket).unwrap();
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.extend(c.append(&records(&format!("batch{i}"), 10)).unwrap().ids());
    }
    drop(c);
    d.crash();
    // The stale socket file is detected and replaced.
    let d = Daemon::start(dir.path(), &["--journal-dir", jarg]);
    let mut c = Client::connect(&d.socket).unwrap();
    let got: Vec<u64> = all(&mut c).iter().map(|r| r.id).collect();
    assert_eq!(got, acked);
}

#[test]
fn rotation_and_retention_by_size_keep_the_memory_window() {
    let _w = watchdog(60, "rotation_retention");
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("journal");
    let mut cfg = config(dir.path());
    cfg.journal_dir = Some(jdir.clone());
    cfg.limits.max_frame_bytes = 4096;
    cfg.quota.bytes_burst = 1 << 30;
    cfg.journal.max_bytes = 16 * 1024;
    cfg.journal.segment_bytes = 8 * 1024;
    cfg.journal.disk_max_bytes = 48 * 1024;
    let server = start(cfg.clone());
    let mut c = Client::connect(server.path()).unwrap();
    // A quiet sender's records first, then a lot of another scope from the same sender.
    let keep = c
        .append(&[Record::new(Level::Error, "keep", "first").field("k", "v")])
        .unwrap()
        .ids();
    for _ in 0..40 {
        c.append(&records("bulk", 20)).unwrap();
    }
    let s = c.stats().unwrap();
    assert!(s.disk.segments > 1, "{:?}", s.disk);
    assert!(s.disk.bytes <= 48 * 1024 + 8 * 1024, "{:?}", s.disk);
    assert!(s.journal_bytes <= 16 * 1024);
    assert_eq!(s.disk.errors, 0);
    let before = all(&mut c);
    assert!(
        !before.iter().any(|r| r.id == keep[0]),
        "the oldest was evicted in memory"
    );
    drop(c);
    server.shutdown().unwrap();
    assert!(segments(&jdir).len() > 1);

    // After a restart the memory window is exactly what it was.
    let server = start(cfg);
    let mut c = Client::connect(server.path()).unwrap();
    assert_eq!(all(&mut c), before);
}

#[test]
fn group_commit_acknowledges_concurrent_appends_that_all_come_back() {
    let _w = watchdog(120, "group_commit");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.journal_dir = Some(dir.path().join("journal"));
    cfg.journal.fsync = true;
    let server = start(cfg.clone());
    let socket = server.path().to_owned();
    // Eight clients at once: their APPENDs wait for shared fdatasyncs.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket).unwrap();
                let mut ids = Vec::new();
                for i in 0..25 {
                    let report = c.append(&records(&format!("t{t}.b{i}"), 4)).unwrap();
                    assert_eq!(report.accepted(), 4, "{report:?}");
                    ids.extend(report.ids());
                }
                ids
            })
        })
        .collect();
    let mut acked: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    acked.sort_unstable();
    assert_eq!(acked.len(), 8 * 25 * 4);
    let mut c = Client::connect(&socket).unwrap();
    assert_eq!(c.stats().unwrap().disk.errors, 0);
    drop(c);
    server.shutdown().unwrap();
    // Everything acknowledged is on disk.
    let server = start(cfg);
    let mut c = Client::connect(server.path()).unwrap();
    let got: Vec<u64> = all(&mut c).iter().map(|r| r.id).collect();
    assert_eq!(got, acked);
}
