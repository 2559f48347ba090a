//! The `demo` and `top` subcommands of the real binary.
//!
//! - `metricsd demo --seconds 3` runs end to end (logd, metricsd, five producer
//!   processes, the check through logd) and prints `demo: ok`. Tests run the debug
//!   build, whose drain loop is tens of times slower than the release build's, so the
//!   services are paced at 2000 requests/s (the release demo's default is 20 000):
//!   faster, their rings would fill and the producers would drop histogram and span
//!   records, which the demo then rightly reports as a failure.
//! - `metricsd top --once` against an in-process logd and metricsd shows what a producer
//!   recorded, and names the socket when logd is not there.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use metricsd::{Config, Daemon, Peer};

const BIN: &str = env!("CARGO_BIN_EXE_metricsd");

/// Runs the binary with `args`, killing it after `limit`.
fn run(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("metricsd runs");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "metricsd {args:?} ran longer than {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn demo_checks_the_pipeline_through_logd_and_says_ok() {
    let out = run(
        &["demo", "--seconds", "3", "--rate", "2000"],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.lines().any(|l| l == "demo: ok"),
        "no `demo: ok`:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("all exact"),
        "the verification line:\n{stdout}"
    );
    assert!(
        stdout.lines().filter(|l| l.starts_with('[')).count() >= 2,
        "live progress lines:\n{stdout}"
    );
}

#[test]
fn help_teaches_and_hides_the_producer_subcommand() {
    let out = run(&["--help"], Duration::from_secs(20));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("demo") && help.contains("top"), "{help}");
    assert!(!help.contains("demo-producer"), "hidden: {help}");
    let out = run(&["top", "--help"], Duration::from_secs(20));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("logd"),
        "top says where it reads from: {help}"
    );
    assert!(help.contains("Examples"), "{help}");
}

#[test]
fn top_once_shows_a_producers_series_from_logd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logd_socket = dir.path().join("logd.sock");
    let logd = logd::Server::bind(logd::Config {
        socket: logd_socket.clone(),
        ..logd::Config::default()
    })
    .and_then(logd::Server::spawn)
    .expect("logd starts");
    let mut config = Config {
        socket: dir.path().join("metricsd.sock"),
        logd_socket: logd_socket.clone(),
        ..Config::default()
    };
    config.export.interval_ms = 50;
    let daemon = Daemon::new(config)
        .identify(|_: &Peer| "web".to_owned())
        .spawn()
        .expect("metricsd starts");
    daemon
        .wait_ready(Duration::from_secs(20))
        .expect("metricsd ready");

    nexus_metrics::install(nexus_metrics::Config::new().socket(daemon.socket_path()))
        .expect("first install in this test binary");
    std::thread::spawn(|| {
        let c = nexus_metrics::Counter::new("http.requests", &[("route", "/a")]);
        for _ in 0..42 {
            c.increment(1);
        }
        nexus_metrics::flush_for(Duration::from_secs(5));
    })
    .join()
    .expect("recording thread");
    daemon.flush(Duration::from_secs(20)).expect("flush");

    let out = run(
        &[
            "top",
            "--once",
            "--logd-socket",
            logd_socket.to_str().expect("utf-8 path"),
        ],
        Duration::from_secs(20),
    );
    let view = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{view}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = view
        .lines()
        .find(|l| l.contains(r#"http.requests{route="/a"}"#))
        .unwrap_or_else(|| panic!("no row for the series:\n{view}"));
    assert!(row.starts_with("web "), "{row}");
    assert!(row.split_whitespace().any(|w| w == "42"), "{row}");
    assert!(view.contains("drained"), "health from logd:\n{view}");
    assert!(view.contains("rejects     invalid_args 0"), "{view}");
    assert!(!view.contains('\x1b'), "no screen clearing with --once");

    daemon.shutdown();
    logd.shutdown().expect("logd stops");
}

#[test]
fn top_names_the_socket_when_logd_is_not_there() {
    let missing = Path::new("/nonexistent/logd.sock");
    let out = run(
        &["top", "--once", "--logd-socket", "/nonexistent/logd.sock"],
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("--logd-socket"),
        "{err}"
    );
}
