//! OTLP export end to end: producer processes -> metricsd -> OTLP/HTTP -> the official
//! `opentelemetry-proto` Python messages (decoding every request) and the `rotel`
//! collector (accepting every request), both installed from PyPI into a venv cached
//! under `target/`; faults (503 with `Retry-After`, a receiver that never answers); and
//! trace context across processes and threads.

mod e2e_support;
mod otlp_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::TcpListener;
use std::time::Duration;

use e2e_support::{
    Producer, Report, WAIT, child, config, start_logd, start_metricsd, wait_closed, wait_for,
    watchdog,
};
use metricsd::otlp::{OtlpStats, Signal};
use nexus_metrics::{Config, ManualClock, Status, counter, gauge, histogram, span};
use otlp_support::{Receiver, Rotel, python};
use serde_json::Value as Json;

/// The producers' clock starts here.
const T0: u64 = 5_000_000_000;

static CLOCK: ManualClock = ManualClock::new(T0);

/// Histogram observations each producer records (spanning many buckets, with zero).
const OBSERVATIONS: [u64; 9] = [0, 1, 2, 3, 100, 1000, 1024, 1025, 1 << 40];

/// The producer: counters, a gauge, a histogram and spans (one ended on another
/// thread), on a manual clock; reports every span as `span id=... trace=... parent=...
/// name=... status=... start=... end=... attr=k:v`.
#[test]
#[ignore = "child half of real_collector_receives_every_point_and_span_exactly, run by it"]
fn child_records_everything() {
    let Some(socket) = child::socket() else {
        return;
    };
    let _dog = watchdog("the OTLP producer", Duration::from_secs(60));
    nexus_metrics::install(Config::new().socket(&socket).clock(&CLOCK)).expect("first install");
    let n: u64 = std::env::var("OTLP_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let pause: u64 = std::env::var("OTLP_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut spans = Vec::new();
    for i in 0..n {
        std::thread::sleep(Duration::from_millis(pause));
        counter!("otlp.requests", "route" => "/a").increment(i + 1);
        counter!("otlp.requests", "route" => "/b").increment(2);
        gauge!("otlp.depth").set(i as i64 - 1);
        for v in OBSERVATIONS {
            histogram!("otlp.bytes").record(v);
        }
        let root = span!("otlp.request");
        root.attr("route", "/a");
        root.attr("i", i);
        let start = CLOCK_NOW();
        CLOCK.advance(100);
        let db = span!("otlp.db", parent: &root);
        let db_start = CLOCK_NOW();
        CLOCK.advance(40 + i);
        db.set_status(if i % 2 == 0 {
            Status::Ok
        } else {
            Status::Error
        });
        let db_ctx = db.context().expect("recorded");
        drop(db);
        let db_end = CLOCK_NOW();
        // A span opened here and ended on another thread.
        let moved = span!("otlp.moved", parent: &root);
        let moved_ctx = moved.context().expect("recorded");
        let moved_start = CLOCK_NOW();
        let moved_end = std::thread::spawn(move || {
            CLOCK.advance(7);
            moved.set_status(Status::Ok);
            drop(moved);
            assert!(nexus_metrics::flush_for(WAIT));
            CLOCK_NOW()
        })
        .join()
        .expect("the other thread");
        CLOCK.advance(3);
        root.set_status(Status::Ok);
        let root_ctx = root.context().expect("recorded");
        drop(root);
        let end = CLOCK_NOW();
        let root_attrs = format!("route:/a,i:{i}");
        spans.push((root_ctx, 0u64, "otlp.request", "ok", start, end, root_attrs));
        let db_status = if i % 2 == 0 { "ok" } else { "error" };
        spans.push((
            db_ctx,
            root_ctx.span_id,
            "otlp.db",
            db_status,
            db_start,
            db_end,
            String::new(),
        ));
        spans.push((
            moved_ctx,
            root_ctx.span_id,
            "otlp.moved",
            "ok",
            moved_start,
            moved_end,
            String::new(),
        ));
    }
    assert!(nexus_metrics::flush_for(WAIT));
    for (ctx, parent, name, status, start, end, attrs) in spans {
        child::report(
            "span",
            &[
                ("id", &format!("{:016x}", ctx.span_id)),
                ("trace", &format!("{:032x}", ctx.trace_id)),
                ("parent", &format!("{parent:016x}")),
                ("name", &name),
                ("status", &status),
                ("start", &start),
                ("end", &end),
                ("attrs", &attrs),
            ],
        );
    }
    let stats = nexus_metrics::stats();
    child::report("done", &[("n", &n), ("dropped", &stats.dropped_total())]);
}

#[expect(non_snake_case, reason = "reads like the clock it samples")]
fn CLOCK_NOW() -> u64 {
    nexus_metrics::Clock::now_ns(&CLOCK)
}

/// What the producers said they recorded, per service.
struct Expected {
    spans: Vec<Report>,
    n: u64,
}

fn run_producer(service: &str, socket: &std::path::Path, n: u64) -> Expected {
    run_producer_paced(service, socket, n, 0)
}

/// Like [`run_producer`], pausing `pause_ms` before each round.
fn run_producer_paced(service: &str, socket: &std::path::Path, n: u64, pause_ms: u64) -> Expected {
    let mut p = Producer::spawn(
        "child_records_everything",
        service,
        socket,
        &[
            ("OTLP_N", &n.to_string()),
            ("OTLP_PAUSE_MS", &pause_ms.to_string()),
        ],
    );
    let mut spans = Vec::new();
    for _ in 0..3 * n {
        spans.push(p.expect("span"));
    }
    let done = p.expect("done");
    assert_eq!(done.u64("dropped"), 0, "the producer dropped nothing");
    p.finish();
    Expected { spans, n }
}

fn counter_of(stats: &OtlpStats, f: fn(&OtlpStats) -> &BTreeMap<Signal, u64>, s: Signal) -> u64 {
    f(stats).get(&s).copied().unwrap_or(0)
}

fn str_of(v: &Json) -> &str {
    v.as_str().unwrap_or_default()
}

/// The last value of each metric point per (service, name, attributes), from every
/// decoded metrics request in order (values are cumulative).
fn last_points(requests: &[Json]) -> BTreeMap<(String, String, String), Json> {
    let mut last = BTreeMap::new();
    for r in requests {
        for p in r["points"].as_array().into_iter().flatten() {
            let key = (
                str_of(&p["resource"]["service.name"]).to_owned(),
                str_of(&p["name"]).to_owned(),
                p["attributes"].to_string(),
            );
            last.insert(key, p.clone());
        }
    }
    last
}

/// Checks one service's points against what its producer recorded, exactly.
fn check_points(last: &BTreeMap<(String, String, String), Json>, service: &str, n: u64) {
    let get = |name: &str, attrs: &str| -> &Json {
        last.get(&(service.to_owned(), name.to_owned(), attrs.to_owned()))
            .unwrap_or_else(|| panic!("no point {service} {name} {attrs}"))
    };
    let a = get("otlp.requests", r#"{"route":"/a"}"#);
    assert_eq!(str_of(&a["kind"]), "sum");
    assert_eq!(a["monotonic"], Json::Bool(true));
    assert_eq!(a["temporality"], 2, "cumulative");
    assert_eq!(str_of(&a["value"]), (n * (n + 1) / 2).to_string());
    let b = get("otlp.requests", r#"{"route":"/b"}"#);
    assert_eq!(str_of(&b["value"]), (2 * n).to_string());
    let depth = get("otlp.depth", "{}");
    assert_eq!(str_of(&depth["kind"]), "gauge");
    assert_eq!(str_of(&depth["value"]), (n as i64 - 2).to_string());
    let h = get("otlp.bytes", "{}");
    assert_eq!(h["count"], n * OBSERVATIONS.len() as u64);
    let sum: u64 = OBSERVATIONS.iter().sum::<u64>() * n;
    assert_eq!(h["sum"].as_f64(), Some(sum as f64));
    check_buckets(h, &OBSERVATIONS, n);
    // Durations of every span: the histogram per span name.
    let d = get("otlp.db", "{}");
    assert_eq!(str_of(&d["kind"]), "exponential_histogram");
    assert_eq!(d["count"], n);
}

/// Every bucket of a decoded histogram point holds exactly the observations that fall
/// in it, each recorded `times` times: checked from the bucket boundaries the point
/// itself declares, so the check is independent of how metricsd chose them.
fn check_buckets(h: &Json, observations: &[u64], times: u64) {
    let counts: Vec<u64> = h["bucket_counts"]
        .as_array()
        .expect("bucket counts")
        .iter()
        .map(|c| c.as_u64().expect("a count"))
        .collect();
    match str_of(&h["kind"]) {
        "histogram" => {
            let bounds: Vec<f64> = h["bounds"]
                .as_array()
                .expect("bounds")
                .iter()
                .map(|b| b.as_f64().expect("a bound"))
                .collect();
            assert_eq!(counts.len(), bounds.len() + 1);
            for (i, got) in counts.iter().enumerate() {
                let lo = if i == 0 {
                    f64::NEG_INFINITY
                } else {
                    bounds[i - 1]
                };
                let hi = bounds.get(i).copied().unwrap_or(f64::INFINITY);
                let want = observations
                    .iter()
                    .filter(|&&v| (v as f64) > lo && (v as f64) <= hi)
                    .count() as u64
                    * times;
                assert_eq!(*got, want, "bucket {i} ({lo}, {hi}]");
            }
        }
        "exponential_histogram" => {
            let scale = h["scale"].as_i64().expect("scale");
            let offset = h["offset"].as_i64().expect("offset");
            let zeros = observations.iter().filter(|&&v| v == 0).count() as u64 * times;
            assert_eq!(h["zero_count"], zeros, "zero count");
            let mut want: BTreeMap<i64, u64> = BTreeMap::new();
            for &v in observations.iter().filter(|&&v| v > 0) {
                *want.entry(exponential_index(v, scale)).or_default() += times;
            }
            for (i, got) in counts.iter().enumerate() {
                let index = offset + i as i64;
                let expected = want.remove(&index).unwrap_or(0);
                assert_eq!(*got, expected, "bucket {index} at scale {scale}");
            }
            assert!(
                want.is_empty(),
                "observations outside the buckets sent: {want:?}"
            );
            let min = observations.iter().min().copied().unwrap_or(0);
            let max = observations.iter().max().copied().unwrap_or(0);
            assert_eq!(h["min"].as_f64(), Some(min as f64));
            assert_eq!(h["max"].as_f64(), Some(max as f64));
        }
        other => panic!("not a histogram: {other}"),
    }
}

/// The OpenTelemetry exponential bucket of `v > 0` at `scale` (bucket `i` holds
/// `base^i < v <= base^(i+1)`, `base = 2^(2^-scale)`), computed independently of
/// metricsd: exactly for powers of two (which sit on a boundary), from `log2` otherwise
/// (no other integer is on a boundary at a positive scale, and none at all at a scale
/// of 0 or below).
fn exponential_index(v: u64, scale: i64) -> i64 {
    if v.is_power_of_two() {
        let k = i64::from(v.trailing_zeros());
        let boundary = if scale >= 0 {
            k << scale
        } else {
            let d = 1i64 << -scale;
            (k + d - 1) / d
        };
        return boundary - 1;
    }
    ((v as f64).log2() * 2f64.powi(scale as i32)).floor() as i64
}

/// Every span the producers reported arrived exactly once, exactly.
fn check_spans(requests: &[Json], expected: &[(&str, &Expected)]) {
    let mut got: BTreeMap<String, Json> = BTreeMap::new();
    for r in requests {
        for s in r["spans"].as_array().into_iter().flatten() {
            let id = str_of(&s["span_id"]).to_owned();
            assert!(
                got.insert(id.clone(), s.clone()).is_none(),
                "span {id} twice"
            );
        }
    }
    let mut want_total = 0;
    for (service, e) in expected {
        for r in &e.spans {
            want_total += 1;
            let s = got
                .get(r.str("id"))
                .unwrap_or_else(|| panic!("span {} never arrived", r.str("id")));
            assert_eq!(str_of(&s["resource"]["service.name"]), *service);
            assert_eq!(str_of(&s["trace_id"]), r.str("trace"));
            let parent = if r.str("parent") == "0000000000000000" {
                ""
            } else {
                r.str("parent")
            };
            assert_eq!(
                str_of(&s["parent_span_id"]),
                parent,
                "parent of {}",
                r.str("id")
            );
            assert_eq!(str_of(&s["name"]), r.str("name"));
            let code = match r.str("status") {
                "ok" => 1,
                "error" => 2,
                _ => 0,
            };
            assert_eq!(s["status"], code, "status of {}", r.str("id"));
            let duration = s["end"].as_u64().expect("end") - s["start"].as_u64().expect("start");
            assert_eq!(
                duration,
                r.u64("end") - r.u64("start"),
                "duration of {}",
                r.str("id")
            );
            let mut attrs: BTreeMap<String, String> = BTreeMap::new();
            for kv in r.str("attrs").split(',').filter(|s| !s.is_empty()) {
                let (k, v) = kv.split_once(':').expect("k:v");
                attrs.insert(k.to_owned(), v.to_owned());
            }
            let got_attrs: BTreeMap<String, String> = s["attributes"]
                .as_object()
                .expect("attributes")
                .iter()
                .map(|(k, v)| (k.clone(), str_of(v).to_owned()))
                .collect();
            assert_eq!(got_attrs, attrs, "attributes of {}", r.str("id"));
        }
    }
    assert_eq!(got.len(), want_total, "no span that nobody recorded");
}

#[test]
fn real_collector_receives_every_point_and_span_exactly() {
    let _dog = watchdog("the real-collector test", Duration::from_secs(600));
    let python = python();
    let dir = tempfile::tempdir().expect("tempdir");
    let rotel = Rotel::start(&python, dir.path());
    let receiver = Receiver::start(&python, dir.path(), Some(rotel.port), 0, 0);
    let mut cfg = config(dir.path());
    cfg.otlp.endpoint = Some(receiver.endpoint());
    cfg.otlp.instance_id = Some("test-host".into());
    cfg.otlp.max_batch_points = 16; // several requests per interval
    let logd = start_logd(&cfg.logd_socket);
    let daemon = start_metricsd(cfg);

    let a = run_producer("checkout", daemon.socket_path(), 5);
    let b = run_producer("search", daemon.socket_path(), 3);
    // One ring per thread: the main one and one per moved span.
    wait_closed(&daemon, "checkout", 1 + a.n as usize);
    wait_closed(&daemon, "search", 1 + b.n as usize);
    let snap = daemon.flush_otlp(WAIT).expect("flush to the collector");
    assert_eq!(snap.rejects.total(), 0, "{:?}", snap.rejects);
    assert_eq!(snap.spans.ended, 3 * (a.n + b.n));
    assert_eq!(snap.spans.exported, snap.spans.ended);

    let requests = receiver.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert!(
            r.get("error").is_none(),
            "the official messages decode it: {r}"
        );
        assert_eq!(str_of(&r["content_type"]), "application/x-protobuf");
        assert_eq!(r["collector_status"], 200, "rotel accepted it: {r}");
        assert_eq!(r["answered"], 200);
    }
    let metrics: Vec<Json> = requests
        .iter()
        .filter(|r| str_of(&r["path"]) == "/v1/metrics")
        .cloned()
        .collect();
    let traces: Vec<Json> = requests
        .iter()
        .filter(|r| str_of(&r["path"]) == "/v1/traces")
        .cloned()
        .collect();
    for r in &metrics {
        let points = r["points"].as_array().expect("points").len();
        assert!(points <= 16, "a request holds at most max_batch_points");
        for p in r["points"].as_array().into_iter().flatten() {
            assert_eq!(str_of(&p["resource"]["service.instance.id"]), "test-host");
            assert_eq!(str_of(&p["scope"]), "metricsd");
        }
    }
    let last = last_points(&metrics);
    check_points(&last, "checkout", a.n);
    check_points(&last, "search", b.n);
    check_spans(&traces, &[("checkout", &a), ("search", &b)]);

    // What metricsd counts as accepted is exactly what arrived.
    let stats = daemon.otlp_stats().expect("OTLP is on");
    let points: u64 = metrics
        .iter()
        .map(|r| r["points"].as_array().map_or(0, Vec::len) as u64)
        .sum();
    let spans: u64 = traces
        .iter()
        .map(|r| r["spans"].as_array().map_or(0, Vec::len) as u64)
        .sum();
    assert_eq!(counter_of(&stats, |s| &s.accepted, Signal::Metrics), points);
    assert_eq!(counter_of(&stats, |s| &s.accepted, Signal::Traces), spans);
    assert_eq!(spans, snap.spans.exported);
    assert!(
        stats.failures.is_empty() && stats.dropped.is_empty(),
        "{stats:?}"
    );
    daemon.shutdown();
    logd.shutdown().expect("logd stops");
}

#[test]
fn otlp_retries_503_with_retry_after_and_loses_nothing() {
    let _dog = watchdog("the 503 test", Duration::from_secs(600));
    let python = python();
    let dir = tempfile::tempdir().expect("tempdir");
    // The first 3 requests are answered 503, Retry-After: 1.
    let receiver = Receiver::start(&python, dir.path(), None, 3, 1);
    let mut cfg = config(dir.path());
    cfg.otlp.endpoint = Some(receiver.endpoint());
    cfg.otlp.retry_initial_ms = 5_000; // Retry-After (1 s) must be what is honoured
    cfg.otlp.retry_max_ms = 5_000;
    let logd = start_logd(&cfg.logd_socket);
    let daemon = start_metricsd(cfg);
    let a = run_producer("checkout", daemon.socket_path(), 4);
    wait_closed(&daemon, "checkout", 1 + a.n as usize);
    daemon.flush_otlp(Duration::from_secs(120)).expect("flush");
    let requests = receiver.requests();
    let refused = requests.iter().filter(|r| r["answered"] == 503).count();
    assert_eq!(refused, 3);
    let accepted: Vec<Json> = requests
        .iter()
        .filter(|r| r["answered"] == 200)
        .cloned()
        .collect();
    let metrics: Vec<Json> = accepted
        .iter()
        .filter(|r| str_of(&r["path"]) == "/v1/metrics")
        .cloned()
        .collect();
    let traces: Vec<Json> = accepted
        .iter()
        .filter(|r| str_of(&r["path"]) == "/v1/traces")
        .cloned()
        .collect();
    check_points(&last_points(&metrics), "checkout", a.n);
    check_spans(&traces, &[("checkout", &a)]);
    let stats = daemon.otlp_stats().expect("OTLP is on");
    let retries: u64 = stats.retries.values().sum();
    assert_eq!(retries, 3, "{stats:?}");
    assert_eq!(stats.failures.get("http_503"), Some(&3));
    assert!(stats.dropped.is_empty(), "nothing lost: {stats:?}");
    daemon.shutdown();
    logd.shutdown().expect("logd stops");
}

#[test]
fn otlp_receiver_that_never_answers_bounds_the_queue_and_counts_drops() {
    let _dog = watchdog("the silent-receiver test", Duration::from_secs(300));
    let dir = tempfile::tempdir().expect("tempdir");
    // Accepts connections, reads nothing, answers nothing.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in silent.incoming().take(64).flatten() {
            conns.push(c);
        }
        // Keep them open until the process exits.
        std::thread::sleep(Duration::from_secs(3600));
        let _ = conns.first_mut().map(|c| c.read(&mut [0u8; 1]));
    });
    drop(held);
    let mut cfg = config(dir.path());
    cfg.otlp.endpoint = Some(format!("http://127.0.0.1:{port}"));
    cfg.otlp.queue_batches = 2;
    cfg.otlp.timeout_ms = 200;
    cfg.otlp.retry_initial_ms = 50;
    cfg.otlp.give_up_ms = 400;
    cfg.export.interval_ms = 20;
    cfg.prometheus.listen = Some("127.0.0.1:0".into());
    let logd = start_logd(&cfg.logd_socket);
    let daemon = start_metricsd(cfg);
    // Rounds 30 ms apart, exports every 20 ms: far more intervals than the exporter,
    // stuck on each request, can take.
    let a = run_producer_paced("checkout", daemon.socket_path(), 20, 30);
    wait_closed(&daemon, "checkout", 1 + a.n as usize);
    // Draining is unaffected: every span and every counter increment was aggregated.
    let snap = daemon.flush(WAIT).expect("flush to logd");
    assert_eq!(snap.spans.ended, 3 * a.n);
    let total = |route: &str| {
        snap.find(
            "checkout",
            metricsd::MetricKind::Counter,
            "otlp.requests",
            &[("route", route)],
        )
        .map(|s| s.value.clone())
    };
    assert_eq!(
        total("/a"),
        Some(metricsd::Value::Counter {
            total: u128::from(a.n * (a.n + 1) / 2)
        })
    );
    // The Prometheus endpoint serves the same exact totals meanwhile.
    let addr = daemon.prometheus_addr().expect("scrape endpoint");
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    conn.set_read_timeout(Some(WAIT)).expect("timeout");
    std::io::Write::write_all(
        &mut conn,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .expect("send the scrape");
    let mut page = String::new();
    conn.read_to_string(&mut page).expect("read the scrape");
    assert!(page.starts_with("HTTP/1.1 200"), "{page:.200}");
    let want = format!("{}", a.n * (a.n + 1) / 2);
    assert!(
        page.lines().any(|l| l.starts_with("otlp_requests_total{")
            && l.contains(r#"route="/a""#)
            && l.ends_with(&format!(" {want}"))),
        "otlp_requests_total{{route=\"/a\"}} {want} in {page}"
    );
    // The exporter gives up on what it cannot send and drops what does not fit, and
    // counts both; the hand-off never holds more than its bound.
    let stats = wait_for("drops to be counted", || {
        let pending = daemon.otlp_pending().expect("OTLP is on");
        assert!(
            pending <= 3,
            "the hand-off holds 2 intervals and 1 in hand: {pending}"
        );
        let s = daemon.otlp_stats()?;
        let dropped = |why: &str| {
            s.dropped
                .iter()
                .any(|((_, reason), n)| reason == why && *n > 0)
        };
        let transport = s.failures.get("transport").copied().unwrap_or(0) > 0;
        (dropped("gave_up") && dropped("queue_full") && transport).then_some(s)
    });
    assert_eq!(
        stats.accepted.values().sum::<u64>(),
        0,
        "nothing accepted: {stats:?}"
    );
    assert!(stats.requests_ok.is_empty());
    daemon.shutdown();
    logd.shutdown().expect("logd stops");
}

// ---------------------------------------------------------------------------------
// Trace context across processes and threads
// ---------------------------------------------------------------------------------

/// The first process: opens a root span, reports its `traceparent`, waits for the
/// parent test's go, then ends it.
#[test]
#[ignore = "child half of trace_context_crosses_processes_and_threads, run by it"]
fn child_starts_the_trace() {
    let Some(socket) = child::socket() else {
        return;
    };
    let _dog = watchdog("the first traced producer", Duration::from_secs(60));
    nexus_metrics::install(Config::new().socket(&socket).clock(&CLOCK)).expect("first install");
    let root = span!("frontend.request");
    let ctx = root.context().expect("recorded");
    child::report(
        "traceparent",
        &[
            ("value", &root.traceparent().expect("recorded")),
            ("id", &format!("{:016x}", ctx.span_id)),
            ("start", &CLOCK_NOW()),
        ],
    );
    child::expect_command("end");
    CLOCK.advance(1_000);
    root.set_status(Status::Ok);
    drop(root);
    assert!(nexus_metrics::flush_for(WAIT));
    child::report("ended", &[("end", &CLOCK_NOW())]);
}

/// The second process: continues the trace named by `TRACEPARENT`, opens a child span
/// on this thread and ends it on another one.
#[test]
#[ignore = "child half of trace_context_crosses_processes_and_threads, run by it"]
fn child_continues_the_trace() {
    let Some(socket) = child::socket() else {
        return;
    };
    let _dog = watchdog("the second traced producer", Duration::from_secs(60));
    nexus_metrics::install(Config::new().socket(&socket).clock(&CLOCK)).expect("first install");
    let incoming = std::env::var("TRACEPARENT").expect("TRACEPARENT");
    let server = nexus_metrics::SpanName::new("backend.handle")
        .enter_traceparent(&incoming)
        .expect("a valid traceparent");
    let server_ctx = server.context().expect("recorded");
    let outgoing = server.traceparent().expect("recorded");
    let work = span!("backend.work"); // under `server`, the innermost open span
    let work_ctx = work.context().expect("recorded");
    let start = CLOCK_NOW();
    let end = std::thread::spawn(move || {
        CLOCK.advance(250);
        work.set_status(Status::Error);
        drop(work); // ends on this other thread
        assert!(nexus_metrics::flush_for(WAIT));
        CLOCK_NOW()
    })
    .join()
    .expect("the other thread");
    CLOCK.advance(10);
    drop(server);
    assert!(nexus_metrics::flush_for(WAIT));
    child::report(
        "ids",
        &[
            ("server", &format!("{:016x}", server_ctx.span_id)),
            ("work", &format!("{:016x}", work_ctx.span_id)),
            ("work_start", &start),
            ("work_end", &end),
            ("outgoing", &outgoing),
        ],
    );
}

#[test]
fn trace_context_crosses_processes_and_threads() {
    let _dog = watchdog("the trace-context test", Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let logd_path = cfg.logd_socket.clone();
    let logd = start_logd(&logd_path);
    let daemon = start_metricsd(cfg);

    let mut first = Producer::spawn(
        "child_starts_the_trace",
        "frontend",
        daemon.socket_path(),
        &[],
    );
    let tp = first.expect("traceparent");
    let traceparent = tp.str("value").to_owned();
    let ctx = nexus_metrics::SpanContext::from_traceparent(&traceparent).expect("well formed");
    let trace = format!("{:032x}", ctx.trace_id);
    let mut second = Producer::spawn(
        "child_continues_the_trace",
        "backend",
        daemon.socket_path(),
        &[("TRACEPARENT", &traceparent)],
    );
    let ids = second.expect("ids");
    second.finish();
    first.send("end");
    first.expect("ended");
    first.finish();
    wait_closed(&daemon, "frontend", 1);
    wait_closed(&daemon, "backend", 2);
    let snap = daemon.flush(WAIT).expect("flush");
    assert_eq!(snap.rejects.total(), 0, "{:?}", snap.rejects);
    assert_eq!((snap.spans.ended, snap.spans.live), (3, 0));

    let spans = e2e_support::query(&logd_path, &logd::Query::new().scope("spans"));
    let by_id: BTreeMap<&str, &logd::Record> = spans
        .iter()
        .map(|s| (s.record.get("span_id").unwrap_or(""), &s.record))
        .collect();
    assert_eq!(by_id.len(), 3, "{spans:#?}");
    let traces: BTreeSet<&str> = by_id.values().filter_map(|r| r.get("trace_id")).collect();
    assert_eq!(traces, BTreeSet::from([trace.as_str()]), "one trace");
    let root = by_id[tp.str("id")];
    assert_eq!(root.get("parent_id"), None);
    assert_eq!(root.get("producer_service"), Some("frontend"));
    let server = by_id[ids.str("server")];
    assert_eq!(server.get("parent_id"), Some(tp.str("id")));
    assert_eq!(server.get("producer_service"), Some("backend"));
    let work = by_id[ids.str("work")];
    assert_eq!(work.get("parent_id"), Some(ids.str("server")));
    assert_eq!(work.get("status"), Some("error"));
    let d = ids.u64("work_end") - ids.u64("work_start");
    assert_eq!(d, 250);
    assert_eq!(work.get("duration_ns"), Some(d.to_string().as_str()));
    // The outgoing traceparent names the server span in the same trace.
    assert_eq!(
        ids.str("outgoing"),
        format!("00-{trace}-{}-01", ids.str("server"))
    );
    daemon.shutdown();
    logd.shutdown().expect("logd stops");
}
