//! Export to a real logd (in-process server, real socket) and the `metricsd serve`
//! binary's ready line.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Control, WAIT, config, start_logd, watchdog};
use metricsd::Daemon;
use telemetry_abi::{Record, RegisterKind};

#[test]
fn exported_totals_read_back_from_logd_exactly() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let server = start_logd(&cfg.logd_socket);
    let logd_path = cfg.logd_socket.clone();
    let daemon = Daemon::new(cfg)
        .identify(|_: &metricsd::Peer| "shop".to_owned())
        .spawn()
        .expect("starts");
    daemon
        .wait_ready(WAIT)
        .expect("start marker read back from logd");
    let c = Control::connect(daemon.socket_path());
    let mut r = c.ring(1024);
    r.register(1, RegisterKind::COUNTER, "orders", &[("status", "200")]);
    r.register(2, RegisterKind::HISTOGRAM, "latency_ns", &[]);
    for i in 0..5000u64 {
        r.push_wait(Record::counter(1, i % 3));
        r.push_wait(Record::histogram(2, i));
    }
    let snap = daemon.flush(WAIT).expect("flush");
    assert!(snap.export.stored > 0);
    assert_eq!(snap.export.failures, 0);
    let want: u64 = (0..5000u64).map(|i| i % 3).sum();

    let mut client = logd::Client::connect(&logd_path).expect("connect to logd");
    let q = logd::Query::new()
        .scope("metrics")
        .field("series", "shop/counter/orders{status=\"200\"}");
    let records = client.query_all(&q, 10_000).expect("query");
    let last = records.last().expect("exported to logd");
    assert_eq!(last.record.get("value"), Some(want.to_string().as_str()));
    assert_eq!(last.record.get("producer_service"), Some("shop"));
    let q = logd::Query::new().field("series", "shop/histogram/latency_ns{}");
    let records = client.query_all(&q, 10_000).expect("query");
    let last = records.last().expect("exported");
    assert_eq!(last.record.get("count"), Some("5000"));
    let sum: u64 = (0..5000).sum();
    assert_eq!(last.record.get("sum"), Some(sum.to_string().as_str()));
    daemon.shutdown();
    server.shutdown().expect("logd stops");
}

#[test]
fn serve_prints_ready_only_after_logd_answered() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("m.sock");
    let logd_sock = dir.path().join("l.sock");
    let cfg_path = dir.path().join("metricsd.toml");
    std::fs::write(&cfg_path, "[export]\ninterval_ms = 100\nretry_ms = 20\n").expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_metricsd"))
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
    let stderr = child.stderr.take().expect("stderr");
    let (err_tx, err_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = err_tx.send(line);
        }
    });
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // No logd yet: no ready line.
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "ready printed without logd"
    );
    let server = start_logd(&logd_sock);
    let line = rx.recv_timeout(WAIT).expect("ready once logd is up");
    assert_eq!(line, "metricsd: ready");
    // And only after a ring was granted through its own control socket: metricsd says so
    // on stderr before it prints the ready line (another pipe, so it may be read later).
    let mut said = Vec::new();
    while !said
        .iter()
        .any(|l: &String| l.starts_with("metricsd: grant round trip ok (ring 1, 2 records"))
    {
        match err_rx.recv_timeout(WAIT) {
            Ok(line) => said.push(line),
            Err(_) => panic!("no grant round trip before ready: {said:?}"),
        }
    }
    // The marker really is in logd.
    let mut client = logd::Client::connect(&logd_sock).expect("connect");
    let found = client
        .query_all(&logd::Query::new().scope("metricsd"), 100)
        .expect("query");
    assert_eq!(found.len(), 1);
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");
    assert!(!sock.exists(), "socket removed");
    server.shutdown().expect("logd stops");
}

#[test]
fn a_bad_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg_path = dir.path().join("bad.toml");
    std::fs::write(&cfg_path, "[rings]\ncapacity = 1000\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_metricsd"))
        .args(["serve", "--config"])
        .arg(&cfg_path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rings.capacity") && err.contains("power of two"),
        "{err}"
    );
}
