//! Series lifecycle: short-lived producer processes with fresh label values, 50
//! generations of them, far beyond `series.max_total`. With a short idle TTL every
//! generation gets its own series (none lands in overflow), the final value of every
//! expired series is in logd exactly, the live series count returns to zero, and the
//! real metricsd binary's RSS after the churn stays within a bound of its RSS before.
//! A series recorded once per TTL minus a margin never expires.

mod e2e_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e_support::{Producer, Serving, child, query, rss_kb, start_logd, wait_for, watchdog};
use nexus_metrics::{Config, counter};

const GENERATIONS: u64 = 50;
/// Series per generation: `churn.requests{gen, worker}` for each worker.
const WORKERS: u64 = 30;
/// The cap on series in all: two generations do not fit at once.
const MAX_TOTAL: u64 = 40;
/// The idle TTL of the churn.
const TTL_MS: u64 = 200;
/// The idle TTL of the keep-alive test, and the producer's period (TTL minus a margin).
const KEEP_TTL_MS: u64 = 3000;
const KEEP_PERIOD_MS: u64 = 1000;
/// RSS growth allowed over the whole churn: the slot table, hash maps and interned
/// strings of one generation's series, with room for the allocator keeping freed pages.
const RSS_GROWTH_BOUND_KB: u64 = 4096;

fn start_daemon(dir: &Path, ttl_ms: u64) -> Serving {
    Serving::start(
        dir,
        &format!(
            "[export]\ninterval_ms = 50\n\n[series]\nmax_total = {MAX_TOTAL}\n\
             max_per_service = {MAX_TOTAL}\nmax_per_metric = {MAX_TOTAL}\n\
             idle_ttl_ms = {ttl_ms}\nidle_ttl_bound_ms = {ttl_ms}\n"
        ),
    )
}

/// The latest value of metricsd's health series `name` in logd.
fn health(logd: &Path, name: &str) -> Option<u64> {
    query(
        logd,
        &logd::Query::new()
            .field("producer_service", "metricsd")
            .field("metric", name),
    )
    .iter()
    .rev()
    .find_map(|r| r.record.get("value")?.parse().ok())
}

/// Every record of `churn.requests` in logd: (series without its service, value,
/// expired). The service is the producer's executable name, which the kernel gives.
fn churn_records(logd: &Path) -> Vec<(String, u64, bool)> {
    query(logd, &logd::Query::new().field("metric", "churn.requests"))
        .iter()
        .map(|r| {
            let f = |k| r.record.get(k).expect("field").to_owned();
            let series = f("series");
            let (_service, series) = series.split_once('/').expect("service/kind/name");
            (
                series.to_owned(),
                f("value").parse().expect("a count"),
                r.record.get("expired") == Some("true"),
            )
        })
        .collect()
}

#[test]
fn series_churn_gives_every_generation_its_own_series_and_frees_them() {
    let _dog = watchdog("the series churn test", Duration::from_secs(240));
    let dir = tempfile::tempdir().expect("tempdir");
    let logd_path = dir.path().join("logd.sock");
    let _logd = start_logd(&logd_path);
    let daemon = start_daemon(dir.path(), TTL_MS);
    let pid = daemon.pid();
    let socket = dir.path().join("metricsd.sock");

    // Warm up with one generation so the baseline RSS includes a worked-in allocator.
    let run = |generation: u64| -> BTreeMap<String, u64> {
        let mut p = Producer::spawn(
            "child_records_one_generation",
            "churn",
            &socket,
            &[("CHURN_GEN", &generation.to_string())],
        );
        let done = p.expect("done");
        p.finish();
        assert_eq!(done.u64("series"), WORKERS);
        (0..WORKERS)
            .map(|w| {
                (
                    format!("counter/churn.requests{{gen=\"{generation}\",worker=\"{w}\"}}"),
                    w + 1,
                )
            })
            .collect()
    };
    // A generation is gone once metricsd counted all of its series expired; then no
    // series is live.
    let wait_expired = |generations: u64| {
        wait_for("a generation's series to expire", || {
            (health(&logd_path, "metricsd.series.expired") == Some(generations * WORKERS))
                .then_some(())
        });
        assert_eq!(health(&logd_path, "metricsd.series"), Some(0));
    };
    let mut expected = run(0);
    wait_expired(1);
    let rss_before = rss_kb(pid);

    for generation in 1..GENERATIONS {
        expected.extend(run(generation));
        wait_expired(generation + 1);
    }
    let rss_after = rss_kb(pid);

    // Every generation had its own series: nothing ever overflowed, and each series'
    // final value was exported once, marked expired, exactly as recorded.
    assert_eq!(
        health(&logd_path, "metricsd.overflow.registrations").unwrap_or(0),
        0
    );
    let records = churn_records(&logd_path);
    let mut finals: BTreeMap<String, u64> = BTreeMap::new();
    for (series, value, expired) in &records {
        assert!(!series.contains("otel.metric.overflow"), "{series}");
        if *expired {
            assert!(
                finals.insert(series.clone(), *value).is_none(),
                "{series} expired twice"
            );
        }
    }
    assert_eq!(finals.len(), expected.len(), "series expired");
    for (series, value) in &expected {
        assert_eq!(finals.get(series), Some(value), "final value of {series}");
    }
    let expired = health(&logd_path, "metricsd.series.expired").expect("expired count");
    assert_eq!(expired, GENERATIONS * WORKERS);
    assert!(
        expected.len() as u64 > 10 * MAX_TOTAL,
        "the churn goes far beyond the cap"
    );
    println!(
        "{} series in {GENERATIONS} generations through a cap of {MAX_TOTAL}; metricsd RSS \
         {rss_before} kB before, {rss_after} kB after",
        expected.len()
    );
    assert!(
        rss_after <= rss_before + RSS_GROWTH_BOUND_KB,
        "RSS grew from {rss_before} kB to {rss_after} kB"
    );
}

#[test]
fn a_series_recorded_within_its_ttl_never_expires() {
    let _dog = watchdog("the series keep-alive test", Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("tempdir");
    let logd_path = dir.path().join("logd.sock");
    let _logd = start_logd(&logd_path);
    let _daemon = start_daemon(dir.path(), KEEP_TTL_MS);
    let socket = dir.path().join("metricsd.sock");
    let mut p = Producer::spawn("child_records_rarely", "rare", &socket, &[]);
    let done = p.expect("done");
    p.finish();
    let total = done.u64("total");
    // The last increment's series expires only after the producer stopped.
    let finals = wait_for("the series to expire after the last sample", || {
        let recs = churn_records(&logd_path);
        let finals: Vec<u64> = recs.iter().filter(|r| r.2).map(|r| r.1).collect();
        (!finals.is_empty()).then_some(finals)
    });
    assert_eq!(
        finals,
        vec![total],
        "one expiry, after the last sample, with the full total"
    );
}

/// Child: one generation's series, each counted `worker + 1` times, then exit.
#[test]
#[ignore = "a child process of series_churn_gives_every_generation_its_own_series_and_frees_them"]
fn child_records_one_generation() {
    let Some(socket) = child::socket() else {
        return;
    };
    let generation = std::env::var("CHURN_GEN").expect("CHURN_GEN");
    nexus_metrics::install(Config::new().socket(&socket).ring_capacity(1024)).expect("install");
    for w in 0..WORKERS {
        let worker = w.to_string();
        counter!("churn.requests", "gen" => generation, "worker" => worker).increment(w + 1);
    }
    assert!(nexus_metrics::flush_for(Duration::from_secs(10)));
    child::report("done", &[("series", &WORKERS)]);
}

/// Child: one series, one increment every `KEEP_PERIOD_MS` (a third of the TTL, a margin
/// a loaded machine's scheduling does not eat), six times, then exit.
#[test]
#[ignore = "a child process of a_series_recorded_within_its_ttl_never_expires"]
fn child_records_rarely() {
    let Some(socket) = child::socket() else {
        return;
    };
    nexus_metrics::install(Config::new().socket(&socket).ring_capacity(1024)).expect("install");
    let c = counter!("churn.requests", "gen" => "rare");
    let start = Instant::now();
    for i in 0..6u64 {
        c.increment(1);
        assert!(nexus_metrics::flush_for(Duration::from_secs(10)));
        let next = start + Duration::from_millis((i + 1) * KEEP_PERIOD_MS);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    child::report("done", &[("total", &6)]);
}
