//! Support for the end-to-end tests: producer processes, a metricsd in-process on a
//! private socket, a real in-process logd, and read-back helpers.
//!
//! A producer process is this test binary run again with one of its ignored child
//! tests (`<child> --exact --ignored --nocapture --test-threads=1`); the child records
//! through `nexus-metrics` exactly as a service would. The parent and the child talk
//! through the child's stdout (lines holding [`MARK`], parsed into a [`Report`]) and
//! stdin (one command per line). Everything the child prints is kept and shown only if
//! the parent test fails.
#![allow(dead_code, reason = "each test binary uses a different subset")]

// The config and the logd every test starts from, shared with the other integration tests.
#[path = "../common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::fmt::Display;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use metricsd::{Config, Daemon, DaemonHandle, MetricKind, Peer, Snapshot, Value, series_id};

pub use common::start_logd;
#[allow(
    unused_imports,
    reason = "the real-binary helpers serve some test binaries, not all"
)]
pub use common::{Control, Ring, Serving, registration, rss_kb};

/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// Marks a line of the child's stdout meant for the parent.
pub const MARK: &str = "@@e2e ";

/// The child's metricsd control socket.
pub const SOCKET_VAR: &str = "E2E_METRICSD_SOCKET";

/// The service name the parent's identity policy gives the child.
pub const SERVICE_VAR: &str = "E2E_SERVICE";

/// Aborts the process if it is still alive after `limit`, unless dropped first.
#[must_use = "the watchdog is disarmed when dropped"]
pub struct Watchdog {
    _armed: mpsc::Sender<()>,
}

/// Arms a [`Watchdog`] for `what`.
pub fn watchdog(what: &'static str, limit: Duration) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: {what} still running after {limit:?}; aborting");
            std::process::abort();
        }
    });
    Watchdog { _armed: tx }
}

/// A metricsd config on private sockets in `dir`, exporting every 50 ms and retrying a
/// failed export after 20 ms.
pub fn config(dir: &Path) -> Config {
    let mut c = common::base_config(dir);
    c.export.retry_ms = 20;
    c
}

/// The test's identity policy: the service named by the producer process's
/// [`SERVICE_VAR`] (read from `/proc/<pid>/environ`, by the pid the kernel reported),
/// else `unnamed`.
pub fn identify(peer: &Peer) -> String {
    std::fs::read(format!("/proc/{}/environ", peer.pid))
        .ok()
        .and_then(|env| {
            env.split(|b| *b == 0).find_map(|var| {
                var.strip_prefix(SERVICE_VAR.as_bytes())
                    .and_then(|rest| rest.strip_prefix(b"="))
                    .map(|name| String::from_utf8_lossy(name).into_owned())
            })
        })
        .unwrap_or_else(|| "unnamed".to_owned())
}

/// Starts metricsd with `config`, the test identity policy and its logd sink, and
/// waits until its start marker was read back from logd.
pub fn start_metricsd(config: Config) -> DaemonHandle {
    let daemon = Daemon::new(config)
        .identify(identify)
        .spawn()
        .expect("metricsd starts");
    daemon
        .wait_ready(WAIT)
        .expect("metricsd's start marker read back from logd");
    daemon
}

/// Waits until metricsd has seen `rings` rings of `service`, all closed (the producer
/// exited and its rings were drained a last time), and returns that snapshot.
pub fn wait_closed(daemon: &DaemonHandle, service: &str, rings: usize) -> Snapshot {
    wait_for("the producer's rings to close", || {
        let s = daemon.snapshot().ok()?;
        let mine: Vec<_> = s.rings.iter().filter(|r| r.service == service).collect();
        (mine.len() == rings && mine.iter().all(|r| r.closed)).then_some(s)
    })
}

/// The count and sum of the histogram `name` with `labels` of `service` in `snap`;
/// panics if there is no such histogram.
pub fn histogram_count_sum(
    snap: &Snapshot,
    service: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> (u64, u128) {
    let series = snap
        .find(service, MetricKind::Histogram, name, labels)
        .unwrap_or_else(|| panic!("no histogram {service} {name} {labels:?}"));
    match &series.value {
        Value::Histogram(h) => (
            h.count(),
            h.integer_sum().expect("integer observations only"),
        ),
        other => panic!("not a histogram: {other:?}"),
    }
}

/// Every record of logd at `path` matching `query`, oldest first.
pub fn query(path: &Path, query: &logd::Query) -> Vec<logd::StoredRecord> {
    let mut client = logd::Client::connect(path).expect("connect to logd");
    client.query_all(query, 1_000_000).expect("query logd")
}

/// Every exported record of the series `series` (a [`metricsd::series_id`]).
pub fn series_records(path: &Path, series: &str) -> Vec<logd::StoredRecord> {
    query(
        path,
        &logd::Query::new().scope("metrics").field("series", series),
    )
}

/// The field `key` of the last exported record of `series`.
pub fn last_field(path: &Path, series: &str, key: &str) -> Option<String> {
    series_records(path, series)
        .last()
        .and_then(|r| r.record.get(key).map(str::to_owned))
}

/// Asserts that the last exported record of the counter `name` with `labels` of
/// `service` holds the value `want`; returns the counter's series id.
#[track_caller]
pub fn assert_counter_exported(
    path: &Path,
    service: &str,
    name: &str,
    labels: &[(&str, &str)],
    want: impl Display,
) -> String {
    let id = series_id(service, MetricKind::Counter, name, labels);
    assert_eq!(
        last_field(path, &id, "value"),
        Some(want.to_string()),
        "{id}"
    );
    id
}

/// The last exported value of metricsd's own counter `name` with `labels` (one of its
/// health series).
pub fn health(path: &Path, name: &str, labels: &[(&str, &str)]) -> Option<String> {
    last_field(
        path,
        &series_id("metricsd", MetricKind::Counter, name, labels),
        "value",
    )
}

/// The sum of the `delta` fields of every exported record of `series`.
pub fn delta_sum(path: &Path, series: &str) -> u128 {
    series_records(path, series)
        .iter()
        .map(|r| {
            r.record
                .get("delta")
                .expect("a counter record has a delta")
                .parse::<u128>()
                .expect("delta is a number")
        })
        .sum()
}

/// What a child reported: one line `<tag> key=value ...`.
#[derive(Debug)]
pub struct Report {
    /// The tag.
    pub tag: String,
    fields: HashMap<String, String>,
}

impl Report {
    fn parse(line: &str) -> Self {
        let mut words = line.split_whitespace();
        let tag = words.next().unwrap_or_default().to_owned();
        let fields = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self { tag, fields }
    }

    /// The field `key`.
    pub fn str(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("report {} has no field {key}: {self:?}", self.tag))
    }

    /// The field `key` as a number.
    pub fn u64(&self, key: &str) -> u64 {
        self.str(key)
            .parse()
            .unwrap_or_else(|_| panic!("report {} field {key} is not a number", self.tag))
    }
}

/// A producer process: this test binary running one of its child tests.
pub struct Producer {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    output: Arc<Mutex<String>>,
    status: Option<ExitStatus>,
}

fn keep_lines(
    stream: impl Read + Send + 'static,
    label: &'static str,
    output: Arc<Mutex<String>>,
    reports: Option<mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            output
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_str(&format!("[{label}] {line}\n"));
            if let (Some(tx), Some(at)) = (&reports, line.find(MARK)) {
                let _ = tx.send(line[at + MARK.len()..].to_owned());
            }
        }
    });
}

impl Producer {
    /// Runs the child test `child_test` as service `service`, attached to metricsd at
    /// `socket`, with the extra environment `vars`.
    pub fn spawn(child_test: &str, service: &str, socket: &Path, vars: &[(&str, &str)]) -> Self {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut cmd = Command::new(exe);
        cmd.args([
            child_test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SOCKET_VAR, socket)
        .env(SERVICE_VAR, service)
        .env_remove(nexus_metrics::SOCKET_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the producer process");
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        keep_lines(stdout, "stdout", output.clone(), Some(tx));
        keep_lines(stderr, "stderr", output.clone(), None);
        let stdin = child.stdin.take();
        Self {
            name: format!("{child_test} ({service})"),
            child,
            stdin,
            lines,
            output,
            status: None,
        }
    }

    /// The process id (metricsd sees it with `SO_PEERCRED`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the child's next report, which must be tagged `tag`.
    pub fn expect(&mut self, tag: &str) -> Report {
        let line = match self.lines.recv_timeout(WAIT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!("{}: no report `{tag}` within {WAIT:?}", self.name)
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.wait_exit();
                panic!("{}: exited ({status}) before reporting `{tag}`", self.name)
            }
        };
        let report = Report::parse(&line);
        assert_eq!(report.tag, tag, "{}: unexpected report {line:?}", self.name);
        report
    }

    /// The child's next report, if one arrives within `timeout`; it must be tagged `tag`.
    pub fn poll(&mut self, tag: &str, timeout: Duration) -> Option<Report> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                let report = Report::parse(&line);
                assert_eq!(report.tag, tag, "{}: unexpected report {line:?}", self.name);
                Some(report)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.wait_exit();
                panic!("{}: exited ({status}) before reporting `{tag}`", self.name)
            }
        }
    }

    /// Sends the child one command line.
    pub fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot send {command:?}: {e}", self.name));
    }

    fn wait_exit(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.status = Some(status);
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let status = self.child.wait().expect("wait after kill");
                self.status = Some(status);
                panic!("{}: did not exit within {WAIT:?}; killed", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the child to exit and asserts its test passed.
    pub fn finish(&mut self) {
        self.stdin = None;
        let status = self.wait_exit();
        assert!(status.success(), "{}: failed ({status})", self.name);
    }

    /// Kills the child with `SIGKILL` and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the producer");
        self.status = Some(self.child.wait().expect("reap the producer"));
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        if std::thread::panicking() {
            // Give the reader threads a moment to take the last lines.
            std::thread::sleep(Duration::from_millis(50));
            let output = self.output.lock().unwrap_or_else(PoisonError::into_inner);
            eprintln!(
                "---- output of {} ({:?}) ----\n{output}---- end ----",
                self.name, self.status
            );
        }
    }
}

/// The child side.
pub mod child {
    use super::*;

    /// The metricsd socket, when run by a parent test; `None` when the child test was
    /// run on its own (`cargo test -- --ignored`), which has nothing to do.
    pub fn socket() -> Option<PathBuf> {
        let socket = std::env::var_os(SOCKET_VAR).map(PathBuf::from);
        if socket.is_none() {
            eprintln!("a child half of an end-to-end test: run by its parent test only");
        }
        socket
    }

    /// Reports `fields` under `tag` to the parent.
    pub fn report(tag: &str, fields: &[(&str, &dyn Display)]) {
        let mut line = format!("{MARK}{tag}");
        for (k, v) in fields {
            line.push_str(&format!(" {k}={v}"));
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .expect("report to the parent");
    }

    /// Reads the parent's next command; exits if the parent is gone.
    pub fn command() -> String {
        let mut line = String::new();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) | Err(_) => {
                eprintln!("the parent test is gone");
                std::process::exit(2);
            }
            Ok(_) => line.trim().to_owned(),
        }
    }

    /// Reads the parent's next command, which must be `want`.
    pub fn expect_command(want: &str) {
        let got = command();
        assert_eq!(got, want, "unexpected command from the parent");
    }

    /// Retries `check` every millisecond until it holds or [`WAIT`] passes.
    pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
        common::wait_within(what, WAIT, Duration::from_millis(1), || {
            check().then_some(())
        });
    }
}

/// Retries `check` every 5 ms until it returns `Some`, or panics after [`WAIT`].
pub fn wait_for<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    common::wait_within(what, WAIT, Duration::from_millis(5), check)
}
