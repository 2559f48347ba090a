//! `metricsd demo`: the whole pipeline on one machine, checked end to end through logd.
//!
//! The demo starts logd and metricsd in this process on private sockets in a fresh
//! temporary directory (metricsd exporting every 250 ms), then runs producer
//! **processes**: it re-executes its own binary as `metricsd demo-producer --role R`
//! with `NEXUS_METRICSD_SOCKET` set. metricsd names each producer from the kernel's
//! `SO_PEERCRED` pid: the demo knows which pid it started in which role and maps it with
//! [`Daemon::identify`]; nothing a producer writes names its service.
//!
//! - well-behaved services ([`producer::SERVICES`], `checkout`, `search`, `inventory` by
//!   default): requests over two threads, counters with `route` and `status` labels,
//!   latency histograms, nested spans (some with error status), a gauge per worker;
//! - `flood`: [`producer::FLOOD_USERS`] distinct `user_id` label values, past
//!   metricsd's per-metric cap, so most land in the overflow series;
//! - `hostile` ([`hostile`]): malformed grant requests, garbage records, a lie about its
//!   drops, write positions moved far ahead and backwards, an impersonation attempt.
//!
//! A child waits for `go` on stdin before it records (so its pid is mapped first), and
//! prints one JSON [`report::Report`] line when done (after `flush_for`). While they
//! run, the demo prints one progress line per second from
//! [`DaemonHandle::snapshot`](crate::DaemonHandle::snapshot).
//! At the end it flushes metricsd, then **queries logd** ([`verify`]) and compares every
//! series each producer recorded, exactly; it prints a [`Summary`] and `demo: ok` only
//! when every comparison matched.

pub mod hostile;
pub mod producer;
pub mod report;
pub mod scrape_check;
pub mod verify;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Config;
use crate::daemon::{Daemon, DaemonError};
use crate::health::Class;
use crate::identity::Peer;
use crate::snapshot::Snapshot;
use crate::top::human;
use report::Report;
use verify::Verification;

/// The hidden subcommand a producer child runs.
pub const PRODUCER_COMMAND: &str = "demo-producer";
/// The role name of the flooding producer.
pub const FLOOD_ROLE: &str = "flood";
/// The role name of the hostile producer.
pub const HOSTILE_ROLE: &str = "hostile";
/// metricsd's export interval in the demo.
pub const EXPORT_INTERVAL_MS: u64 = 250;

/// A small deterministic generator (SplitMix64) for workloads; not for secrets.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    #[expect(
        clippy::should_implement_trait,
        reason = "an infinite generator, not an iterator"
    )]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`; 0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// How the demo runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The metricsd binary to re-execute for the producers (normally this one).
    pub program: PathBuf,
    /// How long the producers work.
    pub duration: Duration,
    /// Well-behaved services (1 to [`producer::SERVICES`]`.len()`).
    pub producers: usize,
    /// Requests per second per well-behaved service, and calls per second for the flood.
    pub rate: u64,
    /// Keep logd and metricsd serving after the summary, until SIGINT or SIGTERM.
    pub keep_sockets: bool,
    /// Also export to this OTLP/HTTP collector (`http://host:port`).
    pub otlp_endpoint: Option<String>,
}

/// What the OTLP collector accepted, when the demo exported to one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OtlpSummary {
    /// The collector's base URL.
    pub endpoint: String,
    /// Requests answered 2xx.
    pub requests: u64,
    /// Metric points accepted.
    pub points: u64,
    /// Spans accepted.
    pub spans: u64,
    /// Points and spans rejected in partial successes.
    pub rejected: u64,
    /// Retries.
    pub retries: u64,
    /// Failed attempts.
    pub failures: u64,
    /// Points and spans dropped.
    pub dropped: u64,
}

impl Options {
    /// The defaults: 8 s, 3 services, 20 000 requests/s each.
    pub fn new(program: PathBuf) -> Self {
        Self {
            program,
            duration: Duration::from_secs(8),
            producers: 3,
            rate: 20_000,
            keep_sockets: false,
            otlp_endpoint: None,
        }
    }
}

/// Why the demo could not run (a failed check is not an error: see [`Summary::ok`]).
#[derive(Debug)]
pub enum DemoError {
    /// Bad options.
    Options(String),
    /// The private directory could not be made.
    Dir(PathBuf, std::io::Error),
    /// logd did not start.
    Logd(logd::ServerError),
    /// metricsd did not start or stopped answering.
    Daemon(DaemonError),
    /// A producer process could not be started or talked to.
    Spawn(String, std::io::Error),
    /// A producer failed: it exited unsuccessfully or its report was unreadable.
    Producer(String, String),
    /// logd could not be queried.
    Verify(verify::VerifyError),
    /// Writing the output failed.
    Output(std::io::Error),
    /// SIGINT or SIGTERM arrived while the producers ran (they were stopped).
    Interrupted,
}

impl fmt::Display for DemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Options(e) => f.write_str(e),
            Self::Dir(p, e) => write!(
                f,
                "cannot create the private directory {}: {e}",
                p.display()
            ),
            Self::Logd(e) => write!(f, "starting logd: {e}"),
            Self::Daemon(e) => write!(f, "metricsd: {e}"),
            Self::Spawn(role, e) => write!(f, "producer {role}: {e}"),
            Self::Producer(role, e) => write!(f, "producer {role}: {e}"),
            Self::Verify(e) => write!(f, "{e}"),
            Self::Output(e) => write!(f, "writing output: {e}"),
            Self::Interrupted => f.write_str("interrupted; producers stopped"),
        }
    }
}

impl std::error::Error for DemoError {}

impl From<DaemonError> for DemoError {
    fn from(e: DaemonError) -> Self {
        Self::Daemon(e)
    }
}

/// One producer's line in the summary.
#[derive(Clone, Debug, Serialize)]
pub struct ProducerSummary {
    /// The service metricsd gave it.
    pub service: String,
    /// Its pid.
    pub pid: u32,
    /// Requests (or calls, or garbage records) it made.
    pub requests: u64,
    /// What `requests` counts.
    pub unit: &'static str,
    /// Series it reported.
    pub series: usize,
    /// Records it dropped itself, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Counter increments that waited for room.
    pub coalesced: u64,
    /// Rings it claimed.
    pub rings: u64,
}

/// What the demo measured and checked.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Whether every check passed.
    pub ok: bool,
    /// The first mismatch, if any.
    pub failure: Option<String>,
    /// How many mismatches in all.
    pub mismatches: usize,
    /// Seconds the producers ran.
    pub seconds: f64,
    /// Records metricsd drained from rings.
    pub records_drained: u64,
    /// Average records drained per second while producers ran.
    pub drained_per_sec: f64,
    /// The highest one-second rate seen.
    pub peak_drained_per_sec: f64,
    /// Records drained per service (the hostile's are garbage, rejected).
    pub drained_by_service: BTreeMap<String, u64>,
    /// The producers.
    pub producers: Vec<ProducerSummary>,
    /// Ordinary series.
    pub series: u64,
    /// Overflow series.
    pub overflow_series: u64,
    /// Registrations bound to an overflow series.
    pub overflow_registrations: u64,
    /// Samples aggregated into overflow series.
    pub overflow_samples: u64,
    /// The producers' own dropped counts per ring as metricsd read them, by service.
    pub ring_drops: BTreeMap<String, u64>,
    /// Rejects by class.
    pub rejects_by_class: BTreeMap<String, u64>,
    /// Rejects by reason.
    pub rejects_by_reason: BTreeMap<String, u64>,
    /// Violations by reason.
    pub violations: BTreeMap<String, u64>,
    /// Rings quarantined.
    pub rings_quarantined: u64,
    /// Rings granted.
    pub rings_granted: u64,
    /// Grant refusals by class.
    pub grant_refused: BTreeMap<String, u64>,
    /// Spans the producers report they ended.
    pub spans_ended: u64,
    /// Spans metricsd handed to its exporters.
    pub spans_exported: u64,
    /// Spans the export rate limit dropped.
    pub spans_rate_limited: u64,
    /// Span records in logd.
    pub spans_in_logd: u64,
    /// Of which matched field by field with the span its producer ended.
    pub spans_verified: u64,
    /// Exported spans past logd's span rate (sent over OTLP only, when configured).
    pub spans_not_logged: u64,
    /// Points and spans the OTLP collector accepted, when `--otlp-endpoint` is set.
    pub otlp: Option<OtlpSummary>,
    /// Of which with `status = error`.
    pub error_spans_in_logd: u64,
    /// Records logd acknowledged.
    pub export_stored: u64,
    /// Failed exchanges with logd.
    pub export_failures: u64,
    /// Records dropped from metricsd's full export queue.
    pub export_dropped: u64,
    /// Records logd refused for good.
    pub export_refused: u64,
    /// Records logd evicted from its journal.
    pub logd_evicted: u64,
    /// logd records the check read.
    pub verified_records_read: u64,
    /// Services checked.
    pub verified_services: u64,
    /// Series compared exactly.
    pub verified_series: u64,
    /// The scrape endpoint scraped at the end (`ADDR:PORT`).
    pub scrape_addr: Option<String>,
    /// Bytes of that scrape.
    pub scrape_bytes: usize,
    /// Series in it.
    pub scrape_series: usize,
    /// Of which compared with the producers' reports.
    pub scrape_compared: u64,
    /// Health series compared for the hostile producer.
    pub verified_health: u64,
    /// The flood's overflow checks: (metric, own series, label sets in overflow,
    /// overflow total, metric total).
    pub flood: Vec<(String, u64, u64, u64, u64)>,
    /// The private directory (removed unless `--keep-sockets`).
    pub dir: String,
}

/// The role of each producer, in spawn order: the services, the flood, the hostile.
fn roles(producers: usize) -> Vec<&'static str> {
    let mut roles: Vec<&'static str> = producer::SERVICES
        .iter()
        .take(producers)
        .map(|s| s.name)
        .collect();
    roles.push(FLOOD_ROLE);
    roles.push(HOSTILE_ROLE);
    roles
}

/// A running producer child.
struct Running {
    role: &'static str,
    pid: u32,
    child: Child,
    stdout: Option<JoinHandle<std::io::Result<String>>>,
    status: Option<std::process::ExitStatus>,
}

/// A fresh private directory under the system temp dir (mode 0700).
fn private_dir() -> Result<PathBuf, DemoError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("nexus-demo-{}-{nanos:x}", std::process::id()));
    let mut builder = std::fs::DirBuilder::new();
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(&dir)
        .map_err(|e| DemoError::Dir(dir.clone(), e))?;
    Ok(dir)
}

/// The environment variable naming the file a demo producer writes every span it
/// ended to ([`producer::SpanEntry`] after [`producer::SpanEntry`]).
pub const SPAN_LOG_ENV: &str = "NEXUS_DEMO_SPAN_LOG";

/// The span log of `role` in the demo's directory.
fn span_log_path(dir: &Path, role: &str) -> PathBuf {
    dir.join(format!("spans-{role}.bin"))
}

fn spawn(
    opts: &Options,
    role: &'static str,
    socket: &Path,
    names: &Mutex<HashMap<u32, String>>,
) -> Result<Running, DemoError> {
    let seconds = format!("{:.3}", opts.duration.as_secs_f64());
    let dir = socket.parent().unwrap_or(Path::new("."));
    let mut child = Command::new(&opts.program)
        .args([PRODUCER_COMMAND, "--role", role, "--seconds", &seconds])
        .args(["--rate", &opts.rate.to_string()])
        .env(nexus_metrics::SOCKET_ENV, socket)
        .env(SPAN_LOG_ENV, span_log_path(dir, role))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            DemoError::Spawn(
                role.to_owned(),
                std::io::Error::new(
                    e.kind(),
                    format!("cannot run {}: {e}", opts.program.display()),
                ),
            )
        })?;
    let pid = child.id();
    // The child records nothing before `go`, so this mapping is in place when it
    // connects.
    names
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(pid, role.to_owned());
    let stdout = child.stdout.take().map(|mut out| {
        std::thread::spawn(move || {
            let mut s = String::new();
            out.read_to_string(&mut s).map(|_| s)
        })
    });
    Ok(Running {
        role,
        pid,
        child,
        stdout,
        status: None,
    })
}

/// Progress: one line per second while the producers run.
struct Progress {
    start: Instant,
    last: (Instant, u64),
    peak: f64,
}

impl Progress {
    fn line(&mut self, s: &Snapshot, out: &mut dyn Write) -> std::io::Result<()> {
        let now = Instant::now();
        let dt = now.duration_since(self.last.0).as_secs_f64().max(1e-6);
        let rate = (s.drain.records.saturating_sub(self.last.1)) as f64 / dt;
        self.peak = self.peak.max(rate);
        self.last = (now, s.drain.records);
        let drops: u64 = s.rings.iter().map(|r| r.producer_dropped).sum();
        writeln!(
            out,
            "[{:5.1}s] drained {:>9}/s | series {:>5} | drops {:>5} | overflow {:>9} samples | rejects {:>9} | violations {} | quarantined {} | rings {}",
            self.start.elapsed().as_secs_f64(),
            human(rate),
            s.store.series,
            drops,
            s.store.overflow_samples,
            s.rejects.total(),
            s.violations.quarantining() + s.violations.dropped_moved_back,
            s.drain.rings_quarantined,
            s.drain.rings_open,
        )
    }
}

/// Runs the demo; human output (progress and summary) goes to `out`. Returns the
/// summary, whose `ok` says whether every check passed.
///
/// ```no_run
/// use std::time::Duration;
/// // `program` must be a metricsd binary: it is re-executed as `demo-producer`.
/// let mut opts = metricsd::demo::Options::new("/usr/bin/metricsd".into());
/// opts.duration = Duration::from_secs(3);
/// let summary = metricsd::demo::run(&opts, &mut std::io::stdout())?;
/// assert!(summary.ok, "first mismatch: {:?}", summary.failure);
/// # Ok::<(), metricsd::demo::DemoError>(())
/// ```
pub fn run(opts: &Options, out: &mut dyn Write) -> Result<Summary, DemoError> {
    if opts.producers == 0 || opts.producers > producer::SERVICES.len() {
        return Err(DemoError::Options(format!(
            "--producers {} is out of range: expected 1 to {} well-behaved services",
            opts.producers,
            producer::SERVICES.len()
        )));
    }
    if opts.duration.is_zero() {
        return Err(DemoError::Options(
            "--seconds must be more than 0 (e.g. --seconds 8)".into(),
        ));
    }
    let dir = private_dir()?;
    let result = run_in(opts, &dir, out);
    if !opts.keep_sockets {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(opts: &Options, dir: &Path, out: &mut dyn Write) -> Result<Summary, DemoError> {
    let w = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(DemoError::Output);
    let logd_socket = dir.join("logd.sock");
    let socket = dir.join("metricsd.sock");
    let logd = logd::Server::bind(logd::Config {
        socket: logd_socket.clone(),
        ..logd::Config::default()
    })
    .and_then(logd::Server::spawn)
    .map_err(DemoError::Logd)?;

    let mut config = Config {
        socket: socket.clone(),
        logd_socket: logd_socket.clone(),
        ..Config::default()
    };
    config.export.interval_ms = EXPORT_INTERVAL_MS;
    config.otlp.endpoint = opts.otlp_endpoint.clone();
    // The scrape endpoint on a loopback port the kernel picks, scraped once at the end.
    config.prometheus.listen = Some("127.0.0.1:0".to_owned());
    let names: Arc<Mutex<HashMap<u32, String>>> = Arc::default();
    let lookup = Arc::clone(&names);
    let daemon = Daemon::new(config.clone())
        .identify(move |peer: &Peer| {
            lookup
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&peer.pid)
                .cloned()
                .unwrap_or_else(|| format!("unknown:{}", peer.pid))
        })
        .spawn()?;
    daemon.wait_ready(Duration::from_secs(10))?;

    let roles = roles(opts.producers);
    w(
        out,
        format!(
            "demo: logd and metricsd on private sockets in {} (export every {EXPORT_INTERVAL_MS} ms)",
            dir.display()
        ),
    )?;
    let mut running = Vec::new();
    for role in &roles {
        running.push(spawn(opts, role, &socket, &names)?);
    }
    w(
        out,
        format!(
            "demo: {} producer processes for {:.1} s: {}",
            running.len(),
            opts.duration.as_secs_f64(),
            running
                .iter()
                .map(|r| format!("{} (pid {})", r.role, r.pid))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )?;
    let started = Instant::now();
    for r in &mut running {
        if let Some(mut stdin) = r.child.stdin.take() {
            stdin
                .write_all(b"go\n")
                .map_err(|e| DemoError::Spawn(r.role.to_owned(), e))?;
        }
    }

    let first = daemon.snapshot()?;
    let mut progress = Progress {
        start: started,
        last: (Instant::now(), first.drain.records),
        peak: 0.0,
    };
    let records_at_start = first.drain.records;
    // Ctrl-C while producers run: stop them and clean up instead of dying at once
    // (which would leave the private directory behind).
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted)).map_err(DemoError::Output)?;
    }
    let deadline = started + opts.duration + Duration::from_secs(30);
    let mut next_tick = started + Duration::from_secs(1);
    loop {
        let mut alive = 0;
        for r in &mut running {
            if r.status.is_none() {
                match r.child.try_wait() {
                    Ok(Some(status)) => r.status = Some(status),
                    Ok(None) => alive += 1,
                    Err(e) => return Err(DemoError::Spawn(r.role.to_owned(), e)),
                }
            }
        }
        if alive == 0 {
            break;
        }
        // ORDERING: Relaxed: a flag polled every 20 ms; nothing is published through it.
        if interrupted.load(std::sync::atomic::Ordering::Relaxed) {
            for r in &mut running {
                if r.status.is_none() {
                    let _ = r.child.kill();
                    r.status = r.child.wait().ok();
                }
            }
            return Err(DemoError::Interrupted);
        }
        if Instant::now() >= deadline {
            let mut stuck = Vec::new();
            for r in &mut running {
                if r.status.is_none() {
                    stuck.push(r.role);
                    let _ = r.child.kill();
                    r.status = r.child.wait().ok();
                }
            }
            return Err(DemoError::Producer(
                stuck.join(", "),
                "did not finish in time; killed".into(),
            ));
        }
        if Instant::now() >= next_tick {
            let snap = daemon.snapshot()?;
            progress.line(&snap, out).map_err(DemoError::Output)?;
            next_tick += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ran = started.elapsed();

    let mut reports: Vec<(String, Report)> = Vec::new();
    let mut producers = Vec::new();
    for r in &mut running {
        let text = match r.stdout.take().map(JoinHandle::join) {
            Some(Ok(Ok(text))) => text,
            _ => String::new(),
        };
        if !r.status.is_some_and(|s| s.success()) {
            return Err(DemoError::Producer(
                r.role.to_owned(),
                format!(
                    "exited with {} (its stderr is above)",
                    r.status.map_or("no status".into(), |s| s.to_string())
                ),
            ));
        }
        let line = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let report: Report = serde_json::from_str(line).map_err(|e| {
            DemoError::Producer(
                r.role.to_owned(),
                format!("unreadable report ({e}): {line:.200}"),
            )
        })?;
        producers.push(ProducerSummary {
            service: r.role.to_owned(),
            pid: r.pid,
            requests: report.requests,
            unit: match r.role {
                HOSTILE_ROLE => "garbage records",
                FLOOD_ROLE => "calls",
                _ => "requests",
            },
            series: report.series.len(),
            dropped: report.dropped.clone(),
            coalesced: report.coalesced,
            rings: if report.hostile.is_some() {
                report.hostile.as_ref().map_or(0, |h| u64::from(h.rings))
            } else {
                report.rings_claimed
            },
        });
        reports.push((r.role.to_owned(), report));
    }

    // Everything the producers published is drained, exported and acknowledged by logd.
    let snap = daemon.flush(Duration::from_secs(30))?;
    let sender = Some(std::process::id());
    let mut v = verify::verify(&logd_socket, &reports, sender).map_err(DemoError::Verify)?;
    for (service, report) in &reports {
        if let Some(h) = &report.hostile {
            verify::verify_hostile(&logd_socket, service, h, sender, &mut v)
                .map_err(DemoError::Verify)?;
        }
    }
    let logs: Vec<(String, PathBuf)> = reports
        .iter()
        .filter(|(role, r)| r.hostile.is_none() && role != FLOOD_ROLE)
        .map(|(role, _)| (role.clone(), span_log_path(dir, role)))
        .collect();
    verify::verify_spans(&logd_socket, &reports, &logs, sender, &mut v)
        .map_err(DemoError::Verify)?;
    // The flood is one metric, the only one of its service, so the per-metric and
    // per-service caps bound it (the demo's total cap, 10000, is far from reached).
    let cap = u64::from(
        config
            .series
            .max_per_metric
            .min(config.series.max_per_service),
    );
    verify::verify_caps(&mut v, cap);
    let otlp = match (&opts.otlp_endpoint, daemon.otlp_stats()) {
        (Some(endpoint), Some(_)) => {
            // Everything handed to the OTLP exporter is sent (or given up) first.
            daemon.flush_otlp(Duration::from_secs(120))?;
            let o = daemon.otlp_stats().unwrap_or_default();
            let sum = |m: &BTreeMap<crate::otlp::Signal, u64>| m.values().sum::<u64>();
            let summary = OtlpSummary {
                endpoint: endpoint.clone(),
                requests: sum(&o.requests_ok),
                points: o
                    .accepted
                    .get(&crate::otlp::Signal::Metrics)
                    .copied()
                    .unwrap_or(0),
                spans: o
                    .accepted
                    .get(&crate::otlp::Signal::Traces)
                    .copied()
                    .unwrap_or(0),
                rejected: sum(&o.rejected),
                retries: sum(&o.retries),
                failures: o.failures.values().sum(),
                dropped: o.dropped.values().sum(),
            };
            if summary.spans != v.spans_exported {
                v.mismatches.push(verify::Mismatch::Span {
                    span_id: "*".into(),
                    problem: format!(
                        "the OTLP collector accepted {} spans, metricsd exported {}",
                        summary.spans, v.spans_exported
                    ),
                });
            }
            Some(summary)
        }
        _ => None,
    };
    let scrape = match daemon.prometheus_addr() {
        Some(addr) => scrape_check::verify_scrape(addr, &reports, &mut v),
        None => Err("metricsd serves no /metrics".to_owned()),
    };
    let scrape = scrape.unwrap_or_else(|why| {
        v.mismatches.push(verify::Mismatch::Scrape {
            series: "GET /metrics".to_owned(),
            field: "answer",
            expected: "200 with delimited protobuf".to_owned(),
            found: Some(why),
        });
        scrape_check::ScrapeCheck::default()
    });
    let evicted = logd::Client::connect(&logd_socket)
        .and_then(|mut c| c.stats())
        .map_err(|e| DemoError::Verify(verify::VerifyError(e)))?
        .evicted;

    let drained = snap.drain.records.saturating_sub(records_at_start);
    let summary = summarize(
        &snap,
        &v,
        Extras {
            otlp,
            seconds: ran.as_secs_f64(),
            drained,
            peak: progress.peak,
            producers,
            evicted,
            dir,
            scrape,
        },
    );
    print_summary(&summary, out).map_err(DemoError::Output)?;

    if opts.keep_sockets {
        keep_serving(dir, &logd_socket, &socket, out)?;
    }
    daemon.shutdown();
    let _ = logd.shutdown();
    Ok(summary)
}

struct Extras<'a> {
    otlp: Option<OtlpSummary>,
    seconds: f64,
    drained: u64,
    peak: f64,
    producers: Vec<ProducerSummary>,
    evicted: u64,
    dir: &'a Path,
    scrape: scrape_check::ScrapeCheck,
}

fn summarize(s: &Snapshot, v: &Verification, x: Extras<'_>) -> Summary {
    let mut ring_drops = BTreeMap::new();
    let mut drained_by_service = BTreeMap::new();
    for r in &s.rings {
        *drained_by_service.entry(r.service.clone()).or_insert(0) += r.consumed;
        if r.producer_dropped > 0 {
            *ring_drops.entry(r.service.clone()).or_insert(0) += r.producer_dropped;
        }
    }
    let rejects_by_class = [Class::InvalidArgs, Class::OverLimit, Class::RateLimited]
        .iter()
        .map(|c| (c.as_str().to_owned(), s.rejects.class_total(*c)))
        .collect();
    let rejects_by_reason = s
        .rejects
        .nonzero()
        .map(|(r, n)| (r.as_str().to_owned(), n))
        .collect();
    let violations = [
        ("write_out_of_range", s.violations.write_out_of_range),
        ("write_moved_back", s.violations.write_moved_back),
        ("dropped_moved_back", s.violations.dropped_moved_back),
    ]
    .iter()
    .map(|(k, n)| ((*k).to_owned(), *n))
    .collect();
    Summary {
        ok: v.ok(),
        failure: v.mismatches.first().map(ToString::to_string),
        mismatches: v.mismatches.len(),
        seconds: x.seconds,
        records_drained: x.drained,
        drained_per_sec: x.drained as f64 / x.seconds.max(1e-6),
        peak_drained_per_sec: x.peak,
        drained_by_service,
        producers: x.producers,
        series: s.store.series,
        overflow_series: s.store.overflow_series,
        overflow_registrations: s.store.overflowed_registrations,
        overflow_samples: s.store.overflow_samples,
        ring_drops,
        rejects_by_class,
        rejects_by_reason,
        violations,
        rings_quarantined: s.drain.rings_quarantined,
        rings_granted: s.grant.granted,
        grant_refused: s
            .grant
            .refused
            .iter()
            .map(|(k, n)| ((*k).to_owned(), *n))
            .collect(),
        spans_ended: v.spans_ended,
        spans_exported: s.spans.exported,
        spans_rate_limited: s.spans.rate_limited,
        spans_in_logd: v.spans_in_logd,
        spans_verified: v.spans_verified,
        spans_not_logged: v.spans_not_logged,
        otlp: x.otlp.clone(),
        error_spans_in_logd: v.error_spans_in_logd,
        export_stored: s.export.stored,
        export_failures: s.export.failures,
        export_dropped: s.export.dropped,
        export_refused: s.export.refused,
        logd_evicted: x.evicted,
        verified_records_read: v.records_read,
        verified_services: v.services,
        verified_series: v.series_checked,
        scrape_addr: x.scrape.addr.map(|a| a.to_string()),
        scrape_bytes: x.scrape.bytes,
        scrape_series: x.scrape.series,
        scrape_compared: x.scrape.compared,
        verified_health: v.health_checked,
        flood: v
            .overflow
            .iter()
            .map(|o| {
                (
                    format!("{}/{}", o.service, o.metric),
                    o.own_series,
                    o.overflowed,
                    o.overflow_total,
                    o.total,
                )
            })
            .collect(),
        dir: x.dir.display().to_string(),
    }
}

fn list(m: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = m
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// Prints the summary (and the verdict line) as text.
pub fn print_summary(s: &Summary, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "\nsummary")?;
    writeln!(
        out,
        "  drained        {} records in {:.1} s: {}/s average, {}/s peak",
        s.records_drained,
        s.seconds,
        human(s.drained_per_sec),
        human(s.peak_drained_per_sec)
    )?;
    writeln!(
        out,
        "                 by service: {}",
        list(&s.drained_by_service)
    )?;
    for p in &s.producers {
        writeln!(
            out,
            "  producer       {:<10} pid {:<7} {:>9} {}, {} series, {} rings, dropped by itself: {}",
            p.service,
            p.pid,
            p.requests,
            p.unit,
            p.series,
            p.rings,
            list(&p.dropped)
        )?;
    }
    writeln!(
        out,
        "  series         {} (+{} overflow series: {} registrations, {} samples)",
        s.series, s.overflow_series, s.overflow_registrations, s.overflow_samples
    )?;
    writeln!(
        out,
        "  drops          producers' own counts per ring: {}",
        list(&s.ring_drops)
    )?;
    writeln!(
        out,
        "  rejects        {} ({})",
        list(&s.rejects_by_class),
        list(&s.rejects_by_reason)
    )?;
    writeln!(
        out,
        "  violations     {} ({} rings quarantined)",
        list(&s.violations),
        s.rings_quarantined
    )?;
    writeln!(
        out,
        "  grant          {} rings granted, refused: {}",
        s.rings_granted,
        list(&s.grant_refused)
    )?;
    writeln!(
        out,
        "  spans          {} ended by the producers, {} exported by metricsd ({} dropped by its rate limit)",
        s.spans_ended, s.spans_exported, s.spans_rate_limited
    )?;
    writeln!(
        out,
        "                 in logd: {} span records ({} with status=error), {} of them checked field by field (ids, parent, status, times) against the span its producer ended; {} past logd's span rate",
        s.spans_in_logd, s.error_spans_in_logd, s.spans_verified, s.spans_not_logged
    )?;
    if let Some(o) = &s.otlp {
        writeln!(
            out,
            "  otlp           {}: accepted {} points and {} spans in {} requests; rejected {}, retries {}, failures {}, dropped {}",
            o.endpoint, o.points, o.spans, o.requests, o.rejected, o.retries, o.failures, o.dropped
        )?;
    }
    writeln!(
        out,
        "  export         {} records stored in logd; failures {}, dropped {}, refused {}; logd evicted {}",
        s.export_stored, s.export_failures, s.export_dropped, s.export_refused, s.logd_evicted
    )?;
    for (metric, own, over, over_total, total) in &s.flood {
        writeln!(
            out,
            "  overflow       {metric}: {own} label sets with their own series, {over} in the overflow series (total {over_total}); the metric's total {total} all accounted for"
        )?;
    }
    writeln!(
        out,
        "  verification   read {} records back from logd: {} series of {} services and {} health series compared with what the producers recorded; scraped http://{}/metrics once (protobuf, {} bytes, {} series): {} series compared, every bucket; {}",
        s.verified_records_read,
        s.verified_series,
        s.verified_services,
        s.verified_health,
        s.scrape_addr.as_deref().unwrap_or("(none)"),
        s.scrape_bytes,
        s.scrape_series,
        s.scrape_compared,
        if s.ok {
            "all exact".to_owned()
        } else {
            format!("{} mismatches", s.mismatches)
        }
    )?;
    match &s.failure {
        None => writeln!(out, "demo: ok"),
        Some(f) => writeln!(out, "demo: FAIL {f}"),
    }
}

/// `--keep-sockets`: serve until SIGINT or SIGTERM.
fn keep_serving(
    dir: &Path,
    logd_socket: &Path,
    socket: &Path,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(DemoError::Output)?;
    writeln!(
        out,
        "\nlogd and metricsd keep serving (Ctrl-C to stop; {} is removed then):\n  \
         metricsd top --logd-socket {}\n  \
         logd query --socket {} --field producer_service=checkout\n  \
         NEXUS_METRICSD_SOCKET={} cargo run -p nexus-metrics --example service",
        dir.display(),
        logd_socket.display(),
        logd_socket.display(),
        socket.display()
    )
    .map_err(DemoError::Output)?;
    out.flush().map_err(DemoError::Output)?;
    let _ = signals.forever().next();
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// The producer child's `main`: waits for `go` on stdin, plays `role` for `duration`
/// (at `rate` requests or calls per second), and prints its [`Report`] as one JSON line.
pub fn producer_main(role: &str, duration: Duration, rate: u64) -> Result<(), String> {
    if ![FLOOD_ROLE, HOSTILE_ROLE].contains(&role) && producer::Service::named(role).is_none() {
        let known: Vec<&str> = producer::SERVICES.iter().map(|s| s.name).collect();
        return Err(format!(
            "unknown role {role:?}: expected {FLOOD_ROLE}, {HOSTILE_ROLE} or one of {}",
            known.join(", ")
        ));
    }
    let mut go = String::new();
    BufReader::new(std::io::stdin())
        .read_line(&mut go)
        .map_err(|e| format!("reading stdin: {e}"))?;
    if go.trim() != "go" {
        return Err(format!(
            "expected `go` on stdin (the demo starts this), got {:?}",
            go.trim()
        ));
    }
    let workload = producer::Workload {
        duration,
        threads: 2,
        rate,
    };
    let report = match role {
        HOSTILE_ROLE => {
            let socket = nexus_metrics::default_socket_path();
            let h = hostile::run(&socket, duration).map_err(|e| e.to_string())?;
            let (requests, rings) = (h.garbage_records, u64::from(h.rings));
            Report {
                rings_claimed: rings,
                hostile: Some(h),
                ..Report::new(role, report::Check::Exact, requests, Vec::new())
            }
        }
        FLOOD_ROLE => {
            producer::install().map_err(|e| e.to_string())?;
            producer::run_flood(workload).map_err(|e| e.to_string())?
        }
        name => {
            let service =
                producer::Service::named(name).ok_or_else(|| format!("unknown role {name:?}"))?;
            producer::install().map_err(|e| e.to_string())?;
            let report = producer::run_service(service, workload).map_err(|e| e.to_string())?;
            if let Some(path) = std::env::var_os(SPAN_LOG_ENV) {
                producer::write_span_log(Path::new(&path))
                    .map_err(|e| format!("writing the span log: {e}"))?;
            }
            report
        }
    };
    let line = serde_json::to_string(&report).map_err(|e| format!("encoding the report: {e}"))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("writing the report: {e}"))
}
