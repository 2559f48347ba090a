//! The demo's well-behaved producers: a small HTTP-like service and a service flooding
//! label cardinality, both built on `nexus-metrics` exactly as a service author would
//! use it, and each keeping an exact tally of what it recorded.
//!
//! Run in a child process (`metricsd demo-producer --role <name>`): the process-wide
//! recorder finds metricsd through `NEXUS_METRICSD_SOCKET`, each worker thread claims its
//! own ring on its first record, and every thread calls `nexus_metrics::flush_for`
//! before it ends, so the counters it reports are exactly what metricsd must export.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::histogram::Exponential;
use nexus_metrics::{Counter, DropReason, Gauge, Histogram, Status, span};

use super::Rng;
use super::report::{Check, Expect, Report, Tally};

/// The well-behaved services the demo can run, in order (`--producers N` takes the first
/// N): name, routes, the table their database span touches.
pub const SERVICES: &[Service] = &[
    Service {
        name: "checkout",
        routes: &["/cart", "/checkout", "/payment"],
        table: "orders",
    },
    Service {
        name: "search",
        routes: &["/search", "/suggest"],
        table: "index",
    },
    Service {
        name: "inventory",
        routes: &["/stock", "/reserve"],
        table: "stock",
    },
    Service {
        name: "payments",
        routes: &["/charge", "/refund"],
        table: "ledger",
    },
    Service {
        name: "shipping",
        routes: &["/quote", "/label"],
        table: "parcels",
    },
    Service {
        name: "accounts",
        routes: &["/login", "/profile"],
        table: "users",
    },
];

/// The label values the flooding service records under `user_id`: more than metricsd's
/// default `series.max_per_metric` (1000), so most of them land in the overflow series.
pub const FLOOD_USERS: u32 = 2500;

/// The flooding service's metric.
pub const FLOOD_METRIC: &str = "api.calls";

/// Response statuses, with the share of requests (per 100) that get each.
const STATUSES: [(&str, u64); 3] = [("200", 90), ("404", 5), ("500", 5)];

/// Ring size the demo producers ask for: room for a few seconds of records even if
/// metricsd is descheduled, so no histogram or span record is dropped.
pub const RING_CAPACITY: u32 = 1 << 17;

/// One well-behaved service.
#[derive(Clone, Copy, Debug)]
pub struct Service {
    /// The service name (the demo maps the child's pid to it).
    pub name: &'static str,
    /// Its HTTP routes.
    pub routes: &'static [&'static str],
    /// The table its `db.query` spans touch.
    pub table: &'static str,
}

impl Service {
    /// The service called `name`.
    pub fn named(name: &str) -> Option<&'static Service> {
        SERVICES.iter().find(|s| s.name == name)
    }
}

/// How long and how hard a producer works.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Wall time to work for.
    pub duration: Duration,
    /// Worker threads (each claims its own ring).
    pub threads: u32,
    /// Requests per second for the whole process (paced; 0: as fast as possible).
    pub rate: u64,
}

/// Why a producer could not run.
#[derive(Debug)]
pub enum ProducerError {
    /// A worker thread could not be started or panicked.
    Thread(String),
    /// The process-wide recorder was already set up.
    AlreadyInstalled,
}

impl fmt::Display for ProducerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Thread(e) => write!(f, "worker thread failed: {e}"),
            Self::AlreadyInstalled => f.write_str("the nexus-metrics recorder was already set up"),
        }
    }
}

impl std::error::Error for ProducerError {}

/// `CLOCK_MONOTONIC`, remembering per thread the last time it gave a span: the demo
/// producer learns each span's exact start and end that way, to check them in logd.
struct RecordingClock;

thread_local! {
    static LAST_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl nexus_metrics::Clock for RecordingClock {
    fn now_ns(&self) -> u64 {
        let t = nexus_metrics::Clock::now_ns(&nexus_metrics::MonotonicClock);
        LAST_NS.with(|c| c.set(t));
        t
    }
}

static RECORDING_CLOCK: RecordingClock = RecordingClock;

/// The time the span clock last gave on this thread.
fn last_span_time() -> u64 {
    LAST_NS.with(std::cell::Cell::get)
}

/// The bytes of one [`SpanEntry`] in a span log file.
pub const SPAN_ENTRY_BYTES: usize = 56;

/// A span a demo producer ended, as it recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanEntry {
    /// Its trace.
    pub trace_id: u128,
    /// Itself.
    pub span_id: u64,
    /// Its parent (0: a root).
    pub parent_id: u64,
    /// Start, `CLOCK_MONOTONIC` ns.
    pub start_ns: u64,
    /// End, `CLOCK_MONOTONIC` ns.
    pub end_ns: u64,
    /// 1 ok, 2 error.
    pub status: u8,
    /// 0 `http.request`, 1 `db.query`.
    pub name: u8,
}

impl SpanEntry {
    /// The span names, by [`SpanEntry::name`].
    pub const NAMES: [&'static str; 2] = ["http.request", "db.query"];

    /// Little-endian: trace id, span id, parent id, start, end, status, name, 6 zeros.
    pub fn to_bytes(&self) -> [u8; SPAN_ENTRY_BYTES] {
        let mut b = [0u8; SPAN_ENTRY_BYTES];
        b[0..16].copy_from_slice(&self.trace_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.span_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.parent_id.to_le_bytes());
        b[32..40].copy_from_slice(&self.start_ns.to_le_bytes());
        b[40..48].copy_from_slice(&self.end_ns.to_le_bytes());
        b[48] = self.status;
        b[49] = self.name;
        b
    }

    /// The inverse of [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(b: &[u8; SPAN_ENTRY_BYTES]) -> Self {
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let mut t = [0u8; 16];
        t.copy_from_slice(&b[0..16]);
        Self {
            trace_id: u128::from_le_bytes(t),
            span_id: u64_at(16),
            parent_id: u64_at(24),
            start_ns: u64_at(32),
            end_ns: u64_at(40),
            status: b[48],
            name: b[49],
        }
    }
}

/// Every span the worker threads ended, gathered as each thread finishes.
static SPAN_LOG: Mutex<Vec<SpanEntry>> = Mutex::new(Vec::new());

/// Writes the spans this process ended to `path` (one [`SpanEntry`] after another).
pub fn write_span_log(path: &std::path::Path) -> std::io::Result<u64> {
    let log = SPAN_LOG.lock().unwrap_or_else(PoisonError::into_inner);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for e in log.iter() {
        std::io::Write::write_all(&mut out, &e.to_bytes())?;
    }
    std::io::Write::flush(&mut out)?;
    Ok(log.len() as u64)
}

/// Sets up the process-wide recorder for a demo producer: larger rings, enough keys
/// for the flood, and a span clock that tells the producer each span's times. Call
/// before the first record.
pub fn install() -> Result<(), ProducerError> {
    nexus_metrics::install(
        nexus_metrics::Config::new()
            .ring_capacity(RING_CAPACITY)
            .max_keys(FLOOD_USERS + 256)
            .clock(&RECORDING_CLOCK),
    )
    .map_err(|_| ProducerError::AlreadyInstalled)
}

/// Sleeps so that `done` units of work after `start` do not run ahead of `per_sec`.
fn pace(start: Instant, done: u64, per_sec: u64) {
    if per_sec == 0 {
        return;
    }
    let due = Duration::from_secs_f64(done as f64 / per_sec as f64);
    if let Some(ahead) = due.checked_sub(start.elapsed()) {
        std::thread::sleep(ahead);
    }
}

/// Some work proportional to `rows`, standing in for the database.
fn work(rows: u64) -> u64 {
    let mut h = rows;
    for i in 0..rows * 8 {
        h = std::hint::black_box(h.rotate_left(5) ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    h
}

/// Runs the threads of a workload and merges their tallies.
fn run_threads(
    workload: Workload,
    worker: impl Fn(u32, Instant) -> (Tally, u64) + Send + Sync + Copy + 'static,
) -> Result<(Tally, u64), ProducerError> {
    let start = Instant::now();
    let threads: Vec<_> = (0..workload.threads.max(1))
        .map(|w| {
            std::thread::Builder::new()
                .name(format!("demo-worker-{w}"))
                .spawn(move || {
                    let result = worker(w, start);
                    // Write what counters still owe before the thread ends, so the
                    // reported totals are what metricsd must have.
                    nexus_metrics::flush_for(Duration::from_secs(5));
                    result
                })
                .map_err(|e| ProducerError::Thread(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let mut tally = Tally::default();
    let mut requests = 0;
    for t in threads {
        let (t, n) = t
            .join()
            .map_err(|_| ProducerError::Thread("a worker panicked".into()))?;
        tally.absorb(t);
        requests += n;
    }
    nexus_metrics::flush_for(Duration::from_secs(5));
    Ok((tally, requests))
}

fn report(role: &str, check: Check, tally: Tally, requests: u64) -> Report {
    let stats = nexus_metrics::stats();
    let dropped: BTreeMap<String, u64> = DropReason::ALL
        .iter()
        .map(|r| (r.name().to_owned(), stats.dropped(*r)))
        .filter(|(_, n)| *n > 0)
        .collect();
    Report {
        role: role.to_owned(),
        check,
        requests,
        series: tally.into_series(),
        dropped,
        lost_increments: stats.lost_increments,
        unconfirmed: stats.unconfirmed,
        coalesced: stats.coalesced,
        rings_claimed: stats.rings_claimed,
        hostile: None,
    }
}

/// A well-behaved service: each worker handles requests on the service's routes, each a
/// `http.request` span with a `db.query` child (errors on 500s), counting
/// `http.requests{route,status}` and `http.response_bytes{route}`, observing
/// `http.latency_ns{route}` (the measured handling time) and setting its own
/// `worker.queue_depth{worker}` gauge.
pub fn run_service(service: &'static Service, workload: Workload) -> Result<Report, ProducerError> {
    let per_thread = workload.rate / u64::from(workload.threads.max(1));
    let (tally, requests) = run_threads(workload, move |w, start| {
        serve(service, w, start, workload.duration, per_thread)
    })?;
    Ok(report(service.name, Check::Exact, tally, requests))
}

fn serve(
    service: &'static Service,
    worker: u32,
    start: Instant,
    duration: Duration,
    rate: u64,
) -> (Tally, u64) {
    let routes = service.routes;
    // Handles are registered once and cheap after; labels are dynamic here, so keep them.
    let requests: Vec<Vec<Counter>> = routes
        .iter()
        .map(|r| {
            STATUSES
                .iter()
                .map(|(s, _)| Counter::new("http.requests", &[("route", r), ("status", s)]))
                .collect()
        })
        .collect();
    let bytes: Vec<Counter> = routes
        .iter()
        .map(|r| Counter::new("http.response_bytes", &[("route", r)]))
        .collect();
    let latency: Vec<Histogram> = routes
        .iter()
        .map(|r| Histogram::new("http.latency_ns", &[("route", r)]))
        .collect();
    let worker_label = worker.to_string();
    let depth_gauge = Gauge::new("worker.queue_depth", &[("worker", &worker_label)]);

    let mut rng = Rng::new(u64::from(worker) << 32 ^ u64::from(std::process::id()));
    let mut request_counts = vec![[0u64; STATUSES.len()]; routes.len()];
    let mut byte_totals = vec![0u64; routes.len()];
    let mut latencies = vec![(0u64, 0u64, Exponential::new()); routes.len()];
    let mut depth: i64 = 0;
    let mut last_depth = None;
    let mut handled = 0u64;
    let mut span_log: Vec<SpanEntry> = Vec::new();
    while start.elapsed() < duration {
        for _ in 0..32 {
            let r = rng.below(routes.len() as u64) as usize;
            let roll = rng.below(100);
            let s = if roll < STATUSES[0].1 {
                0
            } else if roll < STATUSES[0].1 + STATUSES[1].1 {
                1
            } else {
                2
            };
            let failed = STATUSES[s].0 == "500";
            let began = Instant::now();
            let status = if failed { Status::Error } else { Status::Ok };
            let wire = if failed { 2 } else { 1 };
            {
                let request = span!("http.request");
                let request_start = last_span_time();
                request.attr("route", routes[r]);
                let query = span!("db.query", parent: &request);
                let query_start = last_span_time();
                let rows = 1 + rng.below(24);
                query.attr("table", service.table);
                query.attr("rows", rows);
                std::hint::black_box(work(rows));
                query.set_status(status);
                let query_ctx = query.context();
                drop(query);
                let query_end = last_span_time();
                request.set_status(status);
                let request_ctx = request.context();
                drop(request);
                let request_end = last_span_time();
                if let Some(rq) = request_ctx {
                    span_log.push(SpanEntry {
                        trace_id: rq.trace_id,
                        span_id: rq.span_id,
                        parent_id: 0,
                        start_ns: request_start,
                        end_ns: request_end,
                        status: wire,
                        name: 0,
                    });
                }
                if let Some(q) = query_ctx {
                    span_log.push(SpanEntry {
                        trace_id: q.trace_id,
                        span_id: q.span_id,
                        parent_id: request_ctx.map_or(0, |rq| rq.span_id),
                        start_ns: query_start,
                        end_ns: query_end,
                        status: wire,
                        name: 1,
                    });
                }
            }
            let took = began.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
            requests[r][s].increment(1);
            request_counts[r][s] += 1;
            let sent = if failed { 64 } else { 200 + rng.below(4000) };
            bytes[r].increment(sent);
            byte_totals[r] += sent;
            latency[r].record(took);
            latencies[r].0 += 1;
            latencies[r].1 += took;
            latencies[r].2.record(took);
            depth = (depth + rng.below(5) as i64 - 2).clamp(0, 64);
            depth_gauge.set(depth);
            last_depth = Some(depth);
            handled += 1;
        }
        pace(start, handled, rate);
    }

    SPAN_LOG
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extend(span_log);
    let mut tally = Tally::default();
    for (r, route) in routes.iter().enumerate() {
        for (s, (status, _)) in STATUSES.iter().enumerate() {
            let n = request_counts[r][s];
            if n > 0 {
                tally.add(
                    "http.requests",
                    &[("route", route), ("status", status)],
                    Expect::Counter { total: n },
                );
            }
        }
        if byte_totals[r] > 0 {
            tally.add(
                "http.response_bytes",
                &[("route", route)],
                Expect::Counter {
                    total: byte_totals[r],
                },
            );
        }
        let (count, sum, buckets) = std::mem::take(&mut latencies[r]);
        if count > 0 {
            tally.add(
                "http.latency_ns",
                &[("route", route)],
                Expect::Histogram {
                    count,
                    sum,
                    buckets: Box::new(buckets),
                },
            );
        }
    }
    if let Some(last) = last_depth {
        tally.add(
            "worker.queue_depth",
            &[("worker", &worker_label)],
            Expect::Gauge { last },
        );
    }
    if handled > 0 {
        tally.add("http.request", &[], Expect::SpanDuration { count: handled });
        tally.add("db.query", &[], Expect::SpanDuration { count: handled });
    }
    (tally, handled)
}

/// The flooding service: every call counts `api.calls{user_id}` for one of
/// [`FLOOD_USERS`] users, far more label values than metricsd keeps series for.
pub fn run_flood(workload: Workload) -> Result<Report, ProducerError> {
    let per_thread = workload.rate / u64::from(workload.threads.max(1));
    let (tally, calls) = run_threads(workload, move |w, start| {
        flood(w, start, workload.duration, per_thread)
    })?;
    Ok(report("flood", Check::Overflow, tally, calls))
}

fn flood(worker: u32, start: Instant, duration: Duration, rate: u64) -> (Tally, u64) {
    let users: Vec<String> = (0..FLOOD_USERS).map(|u| format!("u{u:05}")).collect();
    let handles: Vec<Counter> = users
        .iter()
        .map(|u| Counter::new(FLOOD_METRIC, &[("user_id", u)]))
        .collect();
    let mut totals = vec![0u64; users.len()];
    let mut rng = Rng::new(u64::from(worker) << 40 ^ u64::from(std::process::id()) ^ 0xf100d);
    let mut calls = 0u64;
    // First every user once, so the cap is reached at once; then random users.
    for (u, handle) in handles.iter().enumerate() {
        handle.increment(1);
        totals[u] += 1;
        calls += 1;
    }
    while start.elapsed() < duration {
        for _ in 0..64 {
            let u = rng.below(users.len() as u64) as usize;
            let n = 1 + rng.below(3);
            handles[u].increment(n);
            totals[u] += n;
            calls += 1;
        }
        pace(start, calls, rate);
    }
    let mut tally = Tally::default();
    for (u, total) in totals.into_iter().enumerate() {
        tally.add(
            FLOOD_METRIC,
            &[("user_id", &users[u])],
            Expect::Counter { total },
        );
    }
    (tally, calls)
}
