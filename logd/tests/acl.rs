//! Read access by kernel identity: processes under two uids append, each reads back only
//! its own records (plain queries, cursor pages, `--follow`, STATS rows), a listed reader
//! reads both, and an unlisted uid asking for another's records is refused
//! `denied`/`query_without_acl` and counted.
//!
//! The children run under other uids (`Command::uid`, a fork + setuid + exec), so these
//! tests need root; CI runs them as root. Without root each test says so on stderr and
//! returns without checking anything.

#![expect(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{start, watchdog};
use logd::{Client, Config, IdSpec, Level, Query, Reason, Record, Reject};
use serde_json::Value;

/// Two writers, a listed reader and an unlisted user; none needs a passwd entry.
const UID_A: u32 = 61001;
const UID_B: u32 = 61002;
const READER: u32 = 61003;
const STRANGER: u32 = 61004;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Says loudly why nothing was checked.
fn skip(test: &str) {
    eprintln!(
        "SKIPPED {test}: the acl tests run children under other uids and need root \
         (CI runs them as root); nothing was checked"
    );
}

/// A directory every uid can reach, holding the socket and a copy of this test binary
/// (the build directory may sit under a home directory other uids cannot enter).
struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    exe: PathBuf,
    logd: PathBuf,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let exe = root.join("acl-child");
        std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let logd = root.join("logd");
        std::fs::copy(env!("CARGO_BIN_EXE_logd"), &logd).unwrap();
        std::fs::set_permissions(&logd, std::fs::Permissions::from_mode(0o755)).unwrap();
        World {
            _dir: dir,
            root,
            exe,
            logd,
        }
    }

    fn socket(&self) -> PathBuf {
        self.root.join("logd.sock")
    }

    /// logd with `READER` listed in `[access] readers`.
    fn config(&self) -> Config {
        let mut c = Config {
            socket: self.socket(),
            ..Config::default()
        };
        c.access.readers = vec![IdSpec::Id(READER)];
        c
    }

    /// Runs `acl_child` under `uid`/`uid` with `action` and returns its JSON result.
    fn child(&self, uid: u32, action: &str, args: &[(&str, String)]) -> Value {
        let mut cmd = Command::new(&self.exe);
        cmd.args([
            "--ignored",
            "--exact",
            "acl_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LOGD_ACL_SOCKET", self.socket())
        .env("LOGD_ACL_ACTION", action)
        .uid(uid)
        .gid(uid)
        .current_dir(&self.root)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for (k, v) in args {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "child {action} as uid {uid} failed");
        let text = String::from_utf8(out.stdout).unwrap();
        let line = text
            .lines()
            .find_map(|l| l.split_once("acl-result: ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("child {action} as uid {uid} printed no result: {text}"));
        serde_json::from_str(line).unwrap()
    }
}

/// Each record's (sender uid, tag field).
fn uids_and_tags(v: &Value) -> Vec<(u32, String)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                u32::try_from(r["uid"].as_u64().unwrap()).unwrap(),
                r["tag"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Appends the same three records as `uid`: tags `<uid>-0` .. `<uid>-2`. Returns their ids.
fn append_as(w: &World, uid: u32) -> Vec<u64> {
    let v = w.child(uid, "append", &[("LOGD_ACL_TAG", uid.to_string())]);
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap())
        .collect()
}

fn tags(uid: u32) -> Vec<(u32, String)> {
    (0..3).map(|i| (uid, format!("{uid}-{i}"))).collect()
}

#[test]
fn acl_each_uid_reads_only_its_own_records_and_a_reader_reads_both() {
    if !is_root() {
        return skip("acl_each_uid_reads_only_its_own_records_and_a_reader_reads_both");
    }
    let _w = watchdog(60, "acl read-back");
    let w = World::new();
    let server = start(w.config());
    // Root's own record too: nobody but root and the reader may see it.
    let mut root = Client::connect(server.path()).unwrap();
    let r = root
        .append(&[Record::new(Level::Info, "acl", "root").field("tag", "root")])
        .unwrap();
    assert!(r.all_accepted());
    let ids_a = append_as(&w, UID_A);
    let ids_b = append_as(&w, UID_B);
    assert_eq!((ids_a.len(), ids_b.len()), (3, 3));

    for (uid, other_first) in [(UID_A, ids_b[0]), (UID_B, ids_a[0])] {
        let v = w.child(
            uid,
            "read",
            &[("LOGD_ACL_CURSOR", (other_first - 1).to_string())],
        );
        // A plain query, page after page of one record, and a cursor placed right
        // before the other uid's first record: only this uid's records, all of them.
        assert_eq!(
            uids_and_tags(&v["all"]),
            tags(uid),
            "uid {uid}, plain query"
        );
        assert_eq!(uids_and_tags(&v["paged"]), tags(uid), "uid {uid}, paged");
        let from_cursor = uids_and_tags(&v["from_cursor"]);
        assert!(
            from_cursor.iter().all(|(u, _)| *u == uid),
            "uid {uid} read another uid's record from a cursor: {from_cursor:?}"
        );
        // Its own service by name is fine.
        assert_eq!(
            uids_and_tags(&v["own_service"]),
            tags(uid),
            "uid {uid} asking for its own service"
        );
    }

    // The listed reader reads root's record and both uids' records.
    let v = w.child(READER, "read", &[("LOGD_ACL_CURSOR", "0".into())]);
    let mut want = vec![(0, "root".to_owned())];
    want.extend(tags(UID_A));
    want.extend(tags(UID_B));
    assert_eq!(uids_and_tags(&v["all"]), want, "the listed reader");
    let v = w.child(
        READER,
        "deny",
        &[("LOGD_ACL_SERVICE", format!("uid:{UID_A}"))],
    );
    assert_eq!(uids_and_tags(&v["records"]), tags(UID_A));
    // Root reads everything as well.
    let all = root.query_all(&Query::new().scope("acl"), 100).unwrap();
    assert_eq!(all.len(), 7);
    server.shutdown().unwrap();
}

#[test]
fn reject_query_without_acl_is_an_error_and_counted() {
    if !is_root() {
        return skip("reject_query_without_acl_is_an_error_and_counted");
    }
    let _w = watchdog(60, "acl reject");
    let w = World::new();
    let server = start(w.config());
    append_as(&w, UID_A);
    let mut root = Client::connect(server.path()).unwrap();
    let before = root.stats().unwrap();

    // The unlisted user names uid A's service: refused with the class, reason and a
    // message that says what to do; B does the same for A and for root's service.
    let v = w.child(
        STRANGER,
        "deny",
        &[("LOGD_ACL_SERVICE", format!("uid:{UID_A}"))],
    );
    assert_eq!(v["class"], "denied", "{v}");
    assert_eq!(v["reason"], "query_without_acl", "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("uid {STRANGER}")) && msg.contains("[access]"),
        "{msg}"
    );
    let v = w.child(UID_B, "deny", &[("LOGD_ACL_SERVICE", "uid:0".into())]);
    assert_eq!(v["reason"], "query_without_acl", "{v}");

    // Counted: two more in total, one on each refused sender's row.
    let after = root.stats().unwrap();
    assert_eq!(after.rejected.denied - before.rejected.denied, 2);
    for uid in [STRANGER, UID_B] {
        let row = after.senders.iter().find(|s| s.uid == uid).unwrap();
        assert_eq!(row.rejected.denied, 1, "uid {uid}");
        assert_eq!(row.rejected.get(Reject::Denied), 1);
    }
    // The CLI says it too and fails.
    let out = Command::new(&w.logd)
        .args(["query", "--socket"])
        .arg(w.socket())
        .args(["--service", &format!("uid:{UID_A}")])
        .uid(STRANGER)
        .gid(STRANGER)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("denied") && err.contains("query_without_acl"),
        "{err}"
    );
    assert_eq!(Reason::QueryWithoutAcl.name(), "query_without_acl");
    server.shutdown().unwrap();
}

#[test]
fn acl_stats_rows_are_the_peers_own_unless_it_reads_all() {
    if !is_root() {
        return skip("acl_stats_rows_are_the_peers_own_unless_it_reads_all");
    }
    let _w = watchdog(60, "acl stats");
    let w = World::new();
    let server = start(w.config());
    append_as(&w, UID_A);
    append_as(&w, UID_B);
    for uid in [UID_A, UID_B] {
        let v = w.child(uid, "stats", &[]);
        let rows: Vec<u64> = v["senders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["uid"].as_u64().unwrap())
            .collect();
        // Its own append connection and its own stats connection, nothing else.
        assert!(
            !rows.is_empty() && rows.iter().all(|u| *u == u64::from(uid)),
            "uid {uid}: {rows:?}"
        );
        let accepted: u64 = v["senders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["accepted"].as_u64().unwrap())
            .sum();
        assert_eq!(accepted, 3, "uid {uid}");
    }
    let v = w.child(READER, "stats", &[]);
    let uids: Vec<u64> = v["senders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["uid"].as_u64().unwrap())
        .collect();
    for uid in [UID_A, UID_B, READER] {
        assert!(
            uids.contains(&u64::from(uid)),
            "reader misses uid {uid}: {uids:?}"
        );
    }
    server.shutdown().unwrap();
}

#[test]
fn acl_follow_shows_nothing_of_another_uid() {
    if !is_root() {
        return skip("acl_follow_shows_nothing_of_another_uid");
    }
    let _w = watchdog(60, "acl follow");
    let w = World::new();
    let server = start(w.config());
    append_as(&w, UID_B);
    // The real binary follows as uid A from the start of the journal.
    let mut follow = Command::new(&w.logd)
        .args(["query", "--follow", "--json", "--socket"])
        .arg(w.socket())
        .uid(UID_A)
        .gid(UID_A)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    // Then B, A, B, A append while it follows; A's last record is the end mark: records
    // come in id order, so once it arrived every earlier record had its chance.
    append_as(&w, UID_B);
    append_as(&w, UID_A);
    append_as(&w, UID_B);
    let last = append_as(&w, UID_A);
    let end = *last.last().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for line in BufReader::new(stdout).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        let id = v["id"].as_u64().unwrap();
        seen.push((v["uid"].as_u64().unwrap(), id));
        if id == end || Instant::now() > deadline {
            break;
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(seen.len(), 6, "A's six records: {seen:?}");
    assert!(
        seen.iter().all(|(uid, _)| *uid == u64::from(UID_A)),
        "follow as uid {UID_A} showed another uid's record: {seen:?}"
    );
    server.shutdown().unwrap();
}

/// The child side; does nothing unless started by [`World::child`].
#[test]
#[ignore = "run as a child process by the acl tests"]
fn acl_child() {
    let Ok(action) = std::env::var("LOGD_ACL_ACTION") else {
        return;
    };
    let socket = PathBuf::from(std::env::var("LOGD_ACL_SOCKET").unwrap());
    let result = child_action(&action, &socket);
    println!("acl-result: {result}");
}

fn record_json(r: &logd::StoredRecord) -> Value {
    let tag = r
        .record
        .fields
        .iter()
        .find(|(k, _)| k == "tag")
        .map_or("", |(_, v)| v.as_str());
    serde_json::json!({ "id": r.id, "uid": r.sender.uid, "tag": tag })
}

fn child_action(action: &str, socket: &Path) -> Value {
    let mut c = Client::connect(socket).unwrap();
    let env = |k: &str| std::env::var(k).unwrap();
    match action {
        "append" => {
            let tag = env("LOGD_ACL_TAG");
            let recs: Vec<Record> = (0..3)
                .map(|i| {
                    Record::new(Level::Info, "acl", "hello").field("tag", format!("{tag}-{i}"))
                })
                .collect();
            let report = c.append(&recs).unwrap();
            assert!(report.all_accepted(), "{report:?}");
            serde_json::json!({ "ids": report.ids() })
        }
        "read" => {
            let q = Query::new().scope("acl");
            let all: Vec<Value> = c
                .query_all(&q, 1000)
                .unwrap()
                .iter()
                .map(record_json)
                .collect();
            let mut paged = Vec::new();
            let mut cursor = 0;
            loop {
                let mut page_q = q.clone().limit(1);
                page_q.cursor = cursor;
                let page = c.query(&page_q).unwrap();
                paged.extend(page.records.iter().map(record_json));
                cursor = page.next_cursor;
                if !page.more {
                    break;
                }
            }
            let mut from = q.clone().limit(1);
            from.cursor = env("LOGD_ACL_CURSOR").parse().unwrap();
            let from_cursor: Vec<Value> = c
                .query(&from)
                .unwrap()
                .records
                .iter()
                .map(record_json)
                .collect();
            let me = rustix::process::getuid().as_raw();
            let own = c
                .query_all(&q.clone().service(format!("uid:{me}")), 1000)
                .unwrap();
            let own: Vec<Value> = own.iter().map(record_json).collect();
            serde_json::json!({ "all": all, "paged": paged, "from_cursor": from_cursor, "own_service": own })
        }
        "deny" => {
            let q = Query::new().scope("acl").service(env("LOGD_ACL_SERVICE"));
            match c.query(&q) {
                Ok(page) => {
                    let recs: Vec<Value> = page.records.iter().map(record_json).collect();
                    serde_json::json!({ "records": recs })
                }
                Err(logd::ClientError::Rejected(e)) => serde_json::json!({
                    "class": e.class.as_str(),
                    "reason": e.reason.name(),
                    "message": e.message,
                }),
                Err(other) => panic!("query: {other}"),
            }
        }
        "stats" => serde_json::to_value(c.stats().unwrap()).unwrap(),
        other => panic!("unknown action {other}"),
    }
}

/// The `Uid:`, `Gid:` and `Groups:` lines of `/proc/<pid>/status`.
fn credentials(pid: u32) -> (String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    (line("Uid:"), line("Gid:"), line("Groups:"))
}

#[test]
fn acl_serve_as_root_drops_to_the_configured_user_after_binding() {
    if !is_root() {
        return skip("acl_serve_as_root_drops_to_the_configured_user_after_binding");
    }
    let _w = watchdog(60, "acl privilege drop");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("logd.sock");
    let journal = dir.path().join("journal");
    let mut child = Command::new(env!("CARGO_BIN_EXE_logd"))
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--journal-dir")
        .arg(&journal)
        .args(["--user", &UID_A.to_string(), "--ready-check"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l == "logd: ready") {
        let line = lines.next().unwrap().unwrap();
        assert!(!line.contains("FAIL"), "{line}");
        seen.push(line);
    }
    assert!(
        seen.contains(&format!("logd: running as uid {UID_A} gid {UID_A}")),
        "{seen:?}"
    );
    // Real, effective, saved and filesystem ids all switched; no other group kept.
    let (uid, gid, groups) = credentials(child.id());
    let want = format!("{UID_A} {UID_A} {UID_A} {UID_A}");
    assert_eq!((uid.as_str(), gid.as_str()), (want.as_str(), want.as_str()));
    assert_eq!(groups, UID_A.to_string());
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    for caps in ["CapEff:", "CapPrm:"] {
        let line = status.lines().find(|l| l.starts_with(caps)).unwrap();
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
    // It still serves, and keeps writing its journal (handed over to it).
    let mut c = Client::connect(&socket).unwrap();
    let r = c
        .append(&[Record::new(Level::Info, "acl", "after the drop")])
        .unwrap();
    assert!(r.all_accepted(), "{r:?}");
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&journal).unwrap());
    assert_eq!(owner, UID_A);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn acl_records_read_back_from_the_disk_journal_stay_private() {
    if !is_root() {
        return skip("acl_records_read_back_from_the_disk_journal_stay_private");
    }
    let _w = watchdog(60, "acl disk read-back");
    let w = World::new();
    let mut config = w.config();
    config.journal_dir = Some(w.root.join("journal"));
    // Memory holds two records: most of what the uids append is read from disk.
    config.journal.max_records = 2;
    let server = start(config);
    let ids_a = append_as(&w, UID_A);
    let ids_b = append_as(&w, UID_B);
    append_as(&w, UID_A);
    for (uid, other_first) in [(UID_A, ids_b[0]), (UID_B, ids_a[0])] {
        let v = w.child(
            uid,
            "read",
            &[("LOGD_ACL_CURSOR", (other_first - 1).to_string())],
        );
        let mut want = tags(uid);
        if uid == UID_A {
            want.extend(tags(UID_A));
        }
        assert_eq!(uids_and_tags(&v["all"]), want, "uid {uid}, plain query");
        assert_eq!(uids_and_tags(&v["paged"]), want, "uid {uid}, paged");
        let from_cursor = uids_and_tags(&v["from_cursor"]);
        assert!(
            from_cursor.iter().all(|(u, _)| *u == uid),
            "uid {uid} read another uid's record from disk: {from_cursor:?}"
        );
    }
    let v = w.child(READER, "read", &[("LOGD_ACL_CURSOR", "0".into())]);
    assert_eq!(
        uids_and_tags(&v["all"]).len(),
        9,
        "the reader reads all nine"
    );
    server.shutdown().unwrap();
}
