//! No IPC per sample, proven at the system-call level on the host: the sealed producer
//! (`guest-sealed`, see `qemu_harness::sealed`) records a million counter increments,
//! gauge sets, histogram observations and spans through `nexus-metrics` under seccomp
//! filters that kill it on any system call but `exit`/`exit_group`, against a real
//! metricsd exporting to a real logd. metricsd's totals, read back from logd, are exact
//! and the producer exits with status 0. A probe run makes one system call after the
//! seal and must die of `SIGSYS`, so the filters are known to bite.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use metricsd::{Config, Daemon, MetricKind, Snapshot};
use qemu_harness::sealed::{self, Expected, Sealed, describe};

const SAMPLES: u64 = 1_000_000;
const WAIT: Duration = Duration::from_secs(60);
const SERVICE: &str = "guest-sealed";

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_guest-sealed"))
}

fn watchdog() {
    thread::spawn(|| {
        thread::sleep(Duration::from_secs(240));
        eprintln!("watchdog: a sealed-producer test ran for 240 s; aborting");
        std::process::abort();
    });
}

fn config(dir: &Path) -> Config {
    let mut c = Config {
        socket: dir.join("metricsd.sock"),
        logd_socket: dir.join("logd.sock"),
        ..Config::default()
    };
    c.export.interval_ms = 100;
    c
}

fn start_logd(path: &Path) -> logd::RunningServer {
    let cfg = logd::Config {
        socket: path.to_owned(),
        ..logd::Config::default()
    };
    logd::Server::bind(cfg)
        .expect("logd binds")
        .spawn()
        .expect("logd runs")
}

fn samples(snap: &Snapshot, kind: MetricKind, name: &str) -> u64 {
    snap.find(SERVICE, kind, name, &[]).map_or(0, |s| s.samples)
}

fn last_field(logd: &Path, kind: MetricKind, name: &str, key: &str) -> String {
    let series = metricsd::series_id::<&str, &str>(SERVICE, kind, name, &[]);
    let mut client = logd::Client::connect(logd).expect("connect to logd");
    let q = logd::Query::new().scope("metrics").field("series", &series);
    let records = client.query_all(&q, 100_000).expect("query logd");
    let last = records
        .last()
        .unwrap_or_else(|| panic!("{series} not in logd"));
    last.record
        .get(key)
        .unwrap_or_else(|| panic!("{series} has no {key}"))
        .to_owned()
}

#[test]
fn a_million_samples_of_every_kind_with_every_system_call_forbidden() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let logd_path = cfg.logd_socket.clone();
    let logd = start_logd(&logd_path);
    let daemon = Daemon::new(cfg).spawn().expect("metricsd starts");
    daemon.wait_ready(WAIT).expect("metricsd ready");

    let mut child = Sealed::spawn(exe(), daemon.socket_path(), SAMPLES, false, WAIT)
        .expect("the sealed producer starts");
    println!("{}", child.started);
    let want = Expected::of(SAMPLES);
    // The producer cannot report anything once sealed: metricsd's totals tell when it
    // is done. It must still be alive meanwhile, waiting for its exit line.
    let deadline = Instant::now() + WAIT;
    let snap = loop {
        child.check_alive().expect("alive while recording");
        let snap = daemon.snapshot().expect("snapshot");
        if snap.counter(SERVICE, sealed::COUNTER, &[]) == Some(u128::from(want.counter))
            && samples(&snap, MetricKind::Histogram, sealed::HISTOGRAM) == want.histogram_count
            && snap.spans.ended == want.spans
        {
            break snap;
        }
        assert!(
            Instant::now() < deadline,
            "totals incomplete after {WAIT:?}: counter {:?}, histogram {}, spans {}; stderr: {}",
            snap.counter(SERVICE, sealed::COUNTER, &[]),
            samples(&snap, MetricKind::Histogram, sealed::HISTOGRAM),
            snap.spans.ended,
            child.stderr()
        );
        thread::sleep(Duration::from_millis(20));
    };
    let stderr = child.stderr();
    let status = child.finish(WAIT).expect("the sealed producer exits");
    assert!(
        status.success(),
        "the sealed producer must exit normally: {}; stderr: {stderr}",
        describe(status)
    );

    // One control message (the grant) and nothing dropped, rejected or held back.
    let conn = snap
        .grant
        .connections
        .values()
        .find(|c| c.service == SERVICE)
        .expect("its connection");
    assert_eq!((conn.messages, conn.rings), (1, 1));
    let ring = snap
        .rings
        .iter()
        .find(|r| r.service == SERVICE)
        .expect("its ring");
    assert_eq!(ring.producer_dropped, 0);
    // Seven records an iteration (the warm-up's too; a span is its trace, open and close
    // records), and five registrations (counter, gauge, histogram, span name, attribute
    // key) of a head and one data record each.
    assert_eq!(
        ring.consumed,
        7 * (SAMPLES + 1) + 5 * 2,
        "every record, registrations included"
    );
    assert_eq!(snap.rejects.total(), 0, "{:?}", snap.rejects);
    assert_eq!(snap.violations, Default::default());

    // The totals, read back from logd.
    let snap = daemon.flush(WAIT).expect("flush");
    assert_eq!(snap.spans.ended, want.spans);
    let counter = last_field(&logd_path, MetricKind::Counter, sealed::COUNTER, "value");
    assert_eq!(counter, want.counter.to_string());
    let gauge = last_field(&logd_path, MetricKind::Gauge, sealed::GAUGE, "value");
    assert_eq!(gauge, want.gauge.to_string());
    let count = last_field(
        &logd_path,
        MetricKind::Histogram,
        sealed::HISTOGRAM,
        "count",
    );
    assert_eq!(count, want.histogram_count.to_string());
    let sum = last_field(&logd_path, MetricKind::Histogram, sealed::HISTOGRAM, "sum");
    assert_eq!(sum, want.histogram_sum.to_string());
    let spans = last_field(&logd_path, MetricKind::SpanDuration, sealed::SPAN, "count");
    assert_eq!(spans, want.spans.to_string());
    println!(
        "{SAMPLES} samples of each kind recorded sealed; {} records drained; exit: {}",
        ring.consumed,
        describe(status)
    );
    daemon.shutdown();
    logd.shutdown().expect("logd stops");
}

#[test]
fn a_system_call_after_the_seal_kills_the_producer() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.logd_socket = dir.path().join("no-logd.sock");
    let daemon = Daemon::new(cfg).spawn().expect("metricsd starts");
    let mut child =
        Sealed::spawn(exe(), daemon.socket_path(), 10, true, WAIT).expect("the probe starts");
    let status = child.wait(WAIT).expect("the probe ends by itself");
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "one getpid after the seal must kill it: {}; stderr: {}",
        describe(status),
        child.stderr()
    );
    daemon.shutdown();
}
