//! Rollup history through the real binary: `metricsd serve` under a file size limit
//! (`RLIMIT_FSIZE`, set by the shell that starts it) keeps draining and exporting
//! exactly while its segment writes fail, reports the fault as a health series and a
//! log line, and `metricsd query` reads back what was written.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Control, WAIT, start_logd, watchdog};
use metricsd::retention::{Retention, RetentionConfig};
use metricsd::rollup::{Resolution, SECOND_NS, Sample};
use metricsd::segment::{self, Ending};
use telemetry_abi::{Record, RegisterKind};

const BIN: &str = env!("CARGO_BIN_EXE_metricsd");

/// Series the producer writes: enough that one 10 s window of them passes the limit.
const SERIES: u32 = 1000;
/// The file size limit, in the shell's `ulimit -f` blocks (512 bytes in POSIX sh). It
/// limits memfds too: rings must stay below it.
const LIMIT_BLOCKS: u32 = 128;
/// Records per ring (32 KiB of records).
const RING: u32 = 1024;

fn last_value(logd: &Path, series: &str) -> Option<String> {
    let mut client = logd::Client::connect(logd).ok()?;
    let found = client
        .query_all(
            &logd::Query::new().scope("metrics").field("series", series),
            100_000,
        )
        .ok()?;
    found.last()?.record.get("value").map(str::to_owned)
}

#[test]
fn retention_full_disk_is_counted_and_logged_and_draining_continues() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("m.sock");
    let logd_sock = dir.path().join("l.sock");
    let history = dir.path().join("history");
    let cfg_path = dir.path().join("metricsd.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[export]\ninterval_ms = 200\n[rings]\ncapacity = {RING}\n[retention]\ndir = {:?}\n",
            history.display().to_string()
        ),
    )
    .expect("write");
    let logd = start_logd(&logd_sock);
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -f {LIMIT_BLOCKS} && exec \"$0\" \"$@\""))
        .arg(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&cfg_path)
        .arg("--socket")
        .arg(&sock)
        .arg("--logd-socket")
        .arg(&logd_sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn metricsd");
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(line);
        }
    });
    let mut lines = Vec::new();
    let mut wait_line = |what: &str, limit: Duration, f: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {what} in {lines:#?}"));
            let hit = f(&line);
            lines.push(line);
            if hit {
                return;
            }
        }
    };
    wait_line("ready line", WAIT, &|l| l == "metricsd: ready");

    let control = Control::connect(&sock);
    let mut ring = control.ring(RING);
    for k in 1..=SERIES {
        let deadline = Instant::now() + WAIT;
        while ring.writer.free() < telemetry_abi::MAX_REGISTER_RECORDS as u64 {
            assert!(Instant::now() < deadline, "ring never drained");
            std::thread::sleep(Duration::from_millis(1));
        }
        ring.register(
            k,
            RegisterKind::COUNTER,
            "rt.requests",
            &[("i", &k.to_string())],
        );
    }
    // Record through a 10 s window boundary (and past it), then some more after the
    // first failed write.
    let mut pushed = 0u64;
    let mut round = |ring: &mut common::Ring| {
        for k in 1..=SERIES {
            ring.push_wait(Record::counter(k, 1));
        }
        pushed += 1;
    };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        round(&mut ring);
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_line("write error log line", Duration::from_secs(40), &|l| {
        l.contains("metricsd: retention:") && l.contains("file_too_large")
    });
    for _ in 0..10 {
        round(&mut ring);
    }
    // The daemon still drains and exports every increment exactly.
    let probe = format!("{}/counter/rt.requests{{i=\"7\"}}", service_of(&logd_sock));
    let deadline = Instant::now() + WAIT;
    loop {
        if last_value(&logd_sock, &probe).as_deref() == Some(pushed.to_string().as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{probe}: {:?} != {pushed}",
            last_value(&logd_sock, &probe)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The fault is a health series.
    let errors = last_value(
        &logd_sock,
        "metricsd/counter/metricsd.retention.write_errors{reason=\"file_too_large\"}",
    )
    .expect("the write error health series")
    .parse::<u64>()
    .expect("a number");
    assert!(errors > 0);
    let dropped = last_value(
        &logd_sock,
        "metricsd/counter/metricsd.retention.points.dropped{reason=\"file_too_large\"}",
    )
    .expect("the dropped windows health series");
    assert_ne!(dropped, "0");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");
    // Every segment is whole and within the limit: the failed writes were cut back.
    let mut files = 0;
    for (_, path) in segment::list(&history, Resolution(0)).expect("lists") {
        let scan = segment::scan(&path).expect("reads");
        assert!(scan.file_len <= u64::from(LIMIT_BLOCKS) * 512, "{path:?}");
        assert!(
            matches!(scan.ending, Ending::Sealed | Ending::Dirty),
            "{path:?}: {:?}",
            scan.ending
        );
        files += 1;
    }
    assert!(files > 0);
    logd.shutdown().expect("logd stops");
}

/// The service name logd records carry for this test's connections (the test
/// executable's name, as metricsd's default policy names it).
fn service_of(logd: &Path) -> String {
    let mut client = logd::Client::connect(logd).expect("connect");
    let found = client
        .query_all(
            &logd::Query::new()
                .scope("metrics")
                .field("metric", "rt.requests"),
            10,
        )
        .expect("query");
    found
        .first()
        .and_then(|r| r.record.get("producer_service"))
        .expect("a series record")
        .to_owned()
}

#[test]
fn retention_query_reads_windows_back_from_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = RetentionConfig {
        dir: Some(dir.path().to_owned()),
        ..RetentionConfig::default()
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as u64;
    let t0 = now - now % (3600 * SECOND_NS) - 3600 * SECOND_NS;
    let mut r = Retention::open(&cfg).expect("opens").expect("configured");
    let mut want = 0u128;
    for s in 0..1800u64 {
        let t = t0 + s * SECOND_NS;
        r.observe_sample(
            "web/counter/q.requests{route=\"/a\"}",
            &Sample::Counter(u128::from(s % 5)),
            t,
        );
        r.observe_sample(
            "web/counter/q.requests{route=\"/b\"}",
            &Sample::Counter(1),
            t,
        );
        r.observe_sample("web/gauge/q.depth{}", &Sample::Gauge(s as i64 % 7), t);
        want += u128::from(s % 5);
        r.tick(t);
    }
    r.tick(t0 + 1800 * SECOND_NS);
    r.close();
    let out = Command::new(BIN)
        .args(["query", "--dir"])
        .arg(dir.path())
        .args([
            "--select",
            "q.requests{route=\"/a\"}",
            "--since",
            "2h",
            "--step",
            "5m",
            "--json",
        ])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["series"], "web/counter/q.requests{route=\"/a\"}");
    assert_eq!(lines[0]["step_ns"], 300 * SECOND_NS);
    let points = lines[0]["points"].as_array().expect("points");
    assert_eq!(points.len(), 6, "half an hour in 5-minute steps: {text}");
    let total: u128 = points
        .iter()
        .map(|p| {
            p["delta"]
                .as_str()
                .expect("a decimal string")
                .parse::<u128>()
                .expect("a number")
        })
        .sum();
    assert_eq!(total, want);
    // Text output, a gauge, and a bad step.
    let out = Command::new(BIN)
        .args(["query", "--dir"])
        .arg(dir.path())
        .args([
            "--series",
            "web/gauge/q.depth{}",
            "--since",
            "2h",
            "--step",
            "30m",
        ])
        .output()
        .expect("runs");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains("min=0") && text.contains("max=6") && text.contains("count=1800"),
        "{text}"
    );
    let out = Command::new(BIN)
        .args(["query", "--dir"])
        .arg(dir.path())
        .args(["--select", "q.requests", "--step", "15s"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("step 15 s") && err.contains("multiple of 10s"),
        "{err}"
    );
}

/// Runs `metricsd query` over the last hour at 10 s steps and returns every point it
/// answers (JSON).
fn queried_points(dir: &Path, name: &str, logd: Option<&Path>) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(BIN);
    cmd.args(["query", "--dir"])
        .arg(dir)
        .args(["--select", name, "--since", "1h", "--step", "10s", "--json"]);
    if let Some(l) = logd {
        cmd.arg("--logd-socket").arg(l);
    }
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON"))
        .flat_map(|v| v["points"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Runs `metricsd query` and sums `field` over every point it answers.
fn queried_sum(dir: &Path, name: &str, logd: Option<&Path>, field: &str) -> u128 {
    queried_points(dir, name, logd)
        .iter()
        .map(|p| match &p[field] {
            serde_json::Value::String(s) => s.parse::<u128>().expect("a number"),
            v => u128::from(v.as_u64().expect("a number")),
        })
        .sum()
}

/// Runs `metricsd query` and sums the counter deltas it answers.
fn queried_total(dir: &Path, name: &str, logd: Option<&Path>) -> u128 {
    queried_points(dir, name, logd)
        .iter()
        .map(|p| {
            p["delta"]
                .as_str()
                .expect("a counter")
                .parse::<u128>()
                .expect("a number")
        })
        .sum()
}

#[test]
fn retention_query_answers_from_disk_and_the_daemons_exports_alike() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let history = dir.path().join("history");
    let mut cfg = common::config(dir.path());
    cfg.retention.dir = Some(history.clone());
    let logd = start_logd(&cfg.logd_socket);
    let logd_sock = cfg.logd_socket.clone();
    let daemon = metricsd::Daemon::start(cfg).expect("starts");
    daemon.wait_ready(WAIT).expect("ready");
    let control = Control::connect(daemon.socket_path());
    let mut ring = control.ring(1024);
    ring.register(1, RegisterKind::COUNTER, "qd.requests", &[("route", "/a")]);
    ring.register(2, RegisterKind::COUNTER, "qd.requests", &[("route", "/b")]);
    ring.register(3, RegisterKind::HISTOGRAM, "qd.latency", &[]);
    let mut observed = 0u128;
    let mut pushed = 0u128;
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_millis(1500) {
        n += 1;
        ring.push_wait(Record::counter(1 + (n % 2) as u32, n % 9));
        pushed += u128::from(n % 9);
        // Values over many powers of two: the exponential histogram's scale drops.
        ring.push_wait(Record::histogram(3, n * n * n * 977));
        observed += 1;
        std::thread::sleep(Duration::from_micros(300));
    }
    daemon.flush(WAIT).expect("exported");
    // Running: the open windows come from logd, the closed ones from disk.
    assert_eq!(
        queried_total(&history, "qd.requests", Some(&logd_sock)),
        pushed
    );
    assert_eq!(
        queried_sum(&history, "qd.latency", Some(&logd_sock), "count"),
        observed
    );
    let on_disk = queried_total(&history, "qd.requests", None);
    assert!(on_disk <= pushed);
    // Stopped cleanly: every window is on disk; logd adds nothing twice.
    daemon.shutdown();
    assert_eq!(queried_total(&history, "qd.requests", None), pushed);
    assert_eq!(
        queried_total(&history, "qd.requests", Some(&logd_sock)),
        pushed
    );
    assert_eq!(queried_sum(&history, "qd.latency", None, "count"), observed);
    logd.shutdown().expect("logd stops");
}
