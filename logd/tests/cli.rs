//! The `logd` binary as an operator uses it: serve, query, stats, --json, --follow, help
//! and argument errors.

#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failed unwrap is a failed test"
)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use common::{Daemon, watchdog};
use logd::{Client, Level, Query, Record};

fn logd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_logd"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn query_and_stats_print_text_and_json() {
    let _w = watchdog(60, "cli_query_stats");
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let sock = d.socket.to_str().unwrap().to_owned();
    let mut c = Client::connect(&d.socket).unwrap();
    c.append(&[
        Record::new(Level::Warn, "net", "link down").field("dev", "eth0"),
        Record::new(Level::Info, "net", "link up").field("dev", "eth1"),
    ])
    .unwrap();

    let out = logd(&["query", "--socket", &sock, "--level", "warn"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert_eq!(s.lines().count(), 1, "{s}");
    assert!(s.contains("WARN net: link down dev=eth0"), "{s}");
    assert!(s.contains(&format!("[{}]", std::process::id())), "{s}");

    let out = logd(&["query", "--socket", &sock, "--field", "dev=eth1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["records"].as_array().unwrap().len(), 1);
    assert_eq!(v["records"][0]["message"], "link up");
    assert_eq!(v["records"][0]["fields"]["dev"], "eth1");
    assert_eq!(v["records"][0]["pid"], std::process::id());
    assert_eq!(v["more"], false);

    let out = logd(&["query", "--socket", &sock, "--limit", "1"]);
    assert_eq!(text(&out.stdout).lines().count(), 1);
    assert!(
        text(&out.stderr).contains("--cursor 1"),
        "{}",
        text(&out.stderr)
    );

    let out = logd(&["stats", "--socket", &sock, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["accepted"], 2);
    assert_eq!(v["rejected"]["invalid_args"], 0);
    let out = logd(&["stats", "--socket", &sock]);
    let s = text(&out.stdout);
    assert!(
        s.contains("accepted 2") && s.contains("rate_limited 0"),
        "{s}"
    );
    assert!(d.terminate());
    assert!(
        !dir.path().join("logd.sock").exists(),
        "socket removed on shutdown"
    );
}

#[test]
fn follow_prints_records_as_they_arrive() {
    let _w = watchdog(60, "cli_follow");
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let mut follower = Command::new(env!("CARGO_BIN_EXE_logd"))
        .args(["query", "--follow", "--json", "--scope", "live", "--socket"])
        .arg(&d.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let mut c = Client::connect(&d.socket).unwrap();
    for i in 0..3 {
        c.append(&[Record::new(Level::Info, "live", format!("tick {i}"))])
            .unwrap();
        c.append(&[Record::new(Level::Info, "other", "ignored")])
            .unwrap();
        let line = lines.next().unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["message"], format!("tick {i}"));
    }
    follower.kill().unwrap();
    follower.wait().unwrap();
}

#[test]
fn ready_check_prints_ready_only_once_its_start_record_is_queryable() {
    let _w = watchdog(60, "cli_ready_check");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("logd.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_logd"))
        .args(["serve", "--ready-check", "--socket"])
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = lines.next().unwrap().unwrap();
    assert_eq!(
        listening,
        format!("logd: listening on {}", socket.display())
    );
    assert_eq!(lines.next().unwrap().unwrap(), "logd: ready");
    // No waiting: by the time the marker is printed the record is already stored.
    let mut c = Client::connect(&socket).unwrap();
    let page = c.query(&Query::new().scope("logd")).unwrap();
    assert_eq!(page.records.len(), 1, "{:?}", page.records);
    let r = &page.records[0];
    assert_eq!(r.record.message, "ready");
    assert_eq!(r.sender.pid, pid, "logd appended it itself");
    let instance = r.record.get("instance").unwrap();
    assert!(instance.starts_with(&format!("{pid}-")), "{instance}");
    assert_eq!(c.stats().unwrap().accepted, 1);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn help_teaches_and_errors_name_the_argument() {
    let out = logd(&["--help"]);
    let s = text(&out.stdout);
    assert!(
        s.contains("Examples:") && s.contains("logd query --service"),
        "{s}"
    );
    let out = logd(&["query", "--help"]);
    let s = text(&out.stdout);
    assert!(
        s.contains("--follow") && s.contains("RFC 3339") && s.contains("Examples:"),
        "{s}"
    );

    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["query", "--level", "loud"],
            &["--level", "trace, debug, info, warn, error"],
        ),
        (
            &["query", "--since", "yesterday"],
            &["--since", "RFC 3339", "15m"],
        ),
        (&["query", "--field", "novalue"], &["--field", "KEY=VALUE"]),
        (&["query", "--limit", "many"], &["--limit"]),
        (
            &["query", "--limit", "0", "--socket", "/nonexistent"],
            &["--limit", "at least 1"],
        ),
    ];
    for (args, needles) in cases {
        let out = logd(args);
        assert!(!out.status.success(), "{args:?}");
        let e = text(&out.stderr);
        for n in needles {
            assert!(e.contains(n), "{args:?}: {e}");
        }
    }
    let out = logd(&["stats", "--socket", "/nonexistent/logd.sock"]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(
        e.contains("/nonexistent/logd.sock") && e.contains("logd serve"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_frame = 1\n").unwrap();
    let out = logd(&[
        "serve",
        "--socket",
        "/tmp/unused.sock",
        "--config",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(e.contains("max_frame") && e.contains("bad.toml"), "{e}");
}
