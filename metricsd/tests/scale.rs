//! Scale: 100 producer processes with 10 recording threads each (1000 rings) against the
//! real metricsd binary. Every counter total read back from logd is exact, every
//! histogram observation is aggregated or counted as dropped by its producer, the
//! slowest ring's drain latency (the longest drain pass, exported by metricsd) is
//! reported, and metricsd's memory per ring is checked against the stated bound.

mod e2e_support;

use std::collections::HashMap;
use std::path::Path;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use e2e_support::{
    Control, Producer, Ring, Serving, child, query, rss_kb, start_logd, wait_for, watchdog,
};
use nexus_metrics::{Config, DropReason, counter, histogram};
use telemetry_abi::{Record, RegisterKind};

const PROCESSES: u64 = 100;
const THREADS: u64 = 10;
/// Counter increments per thread (each 1), and every fourth also a histogram sample.
const PER_THREAD: u64 = 10_000;
/// Records per ring.
const RING: u32 = 1024;
/// What metricsd may hold per granted ring beyond the ring's own pages (its mapping,
/// reader, key table and registration buffer, the grant server's entry): the bound the
/// README states.
const PER_RING_OVERHEAD_KB: u64 = 64;
/// What metricsd may hold per counter series (its slot, index entries, labels, the
/// copies the export and scrape snapshots keep): the bound the README states.
const PER_COUNTER_SERIES_BYTES: u64 = 4096;
/// The same per histogram series with all 160 buckets of one side in use.
const PER_HISTOGRAM_SERIES_BYTES: u64 = 8192;

/// The latest value of each series of `metric` in logd, by series without its service.
fn latest(logd: &Path, metric: &str, field: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for r in query(logd, &logd::Query::new().field("metric", metric)) {
        let series = r.record.get("series").expect("series");
        let (_service, series) = series.split_once('/').expect("service/...");
        let v = r.record.get(field).expect("value").parse().expect("number");
        out.insert(series.to_owned(), v);
    }
    out
}

/// The largest value metricsd's health gauge `name` took in logd.
fn health_max(logd: &Path, name: &str) -> u64 {
    query(
        logd,
        &logd::Query::new()
            .field("producer_service", "metricsd")
            .field("metric", name),
    )
    .iter()
    .filter_map(|r| r.record.get("value")?.parse().ok())
    .max()
    .unwrap_or(0)
}

#[test]
fn scale_1000_rings_every_total_exact() {
    let _dog = watchdog("the 1000-ring scale test", Duration::from_secs(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let logd_path = dir.path().join("logd.sock");
    let _logd = start_logd(&logd_path);
    let daemon = Serving::start(
        dir.path(),
        &format!(
            "[rings]\ncapacity = {RING}\nper_service = 1024\nmax_total = 1024\n\n\
             [series]\nmax_total = 5000\nmax_per_service = 5000\nmax_per_metric = 5000\n\n\
             [export]\ninterval_ms = 250\nqueue_records = 1000000\n"
        ),
    );
    let pid = daemon.pid();
    let socket = dir.path().join("metricsd.sock");
    let rss_idle = rss_kb(pid);

    // Every process first holds its ten rings (a warm-up series, not checked), then all
    // record at once: the test is about 1000 rings draining together, not about 1000
    // simultaneous grants (which on this 2-vCPU VM can take longer than a producer's
    // 1 s claim limit; a thread that misses it retries, dropping what it records
    // meanwhile, counted).
    let mut producers: Vec<Producer> = (0..PROCESSES)
        .map(|p| {
            Producer::spawn(
                "child_records_from_ten_threads",
                "scale",
                &socket,
                &[("SCALE_PROC", &p.to_string())],
            )
        })
        .collect();
    for p in &mut producers {
        // At least one ring per thread: a claim that timed out in the grant storm
        // reconnects, and the rings of the old connection are claimed again.
        let ready = p.expect("ready");
        assert!(
            ready.u64("rings") >= THREADS,
            "one ring per thread: {ready:?}"
        );
    }
    let rss_granted = rss_kb(pid);
    let started = Instant::now();
    for p in &mut producers {
        p.send("go");
    }
    let mut dropped_histograms = 0;
    for p in &mut producers {
        let done = p.expect("done");
        assert_eq!(done.u64("lost_increments"), 0);
        // Only histogram samples are ever dropped (increments wait): mostly for a full
        // ring, and under a grant storm also while a thread re-claims a ring whose
        // connection it lost. Every drop is counted by the producer, whatever its reason.
        dropped_histograms += done.u64("dropped_total");
    }
    let recorded_in = started.elapsed();

    // Every counter exact in logd (increments are never lost, only late).
    let want_counter = PER_THREAD;
    let counters = wait_for("every counter total in logd", || {
        let c = latest(&logd_path, "scale.ops", "value");
        (c.len() as u64 == PROCESSES * THREADS && c.values().all(|v| *v == want_counter))
            .then_some(c)
    });
    let drained_in = started.elapsed();
    assert_eq!(counters.len() as u64, PROCESSES * THREADS);
    // Histogram samples: aggregated + dropped (counted) = recorded.
    let observed: u64 = latest(&logd_path, "scale.size", "count").values().sum();
    assert_eq!(
        observed + dropped_histograms,
        PROCESSES * THREADS * PER_THREAD / 4
    );
    // While the producers are still connected: metricsd's memory per ring.
    let rss_loaded = rss_kb(pid);
    let per_ring_kb = (rss_loaded.saturating_sub(rss_idle)) / (PROCESSES * THREADS);
    let ring_kb = (u64::from(RING) * 32 + 384).div_ceil(1024);
    let slowest_pass_us = health_max(&logd_path, "metricsd.drain.longest_pass");
    println!(
        "{} rings, {} counter increments and {} histogram samples recorded in {:.2} s, \
         all counters exact in logd after {:.2} s; histogram samples dropped (counted): \
         {dropped_histograms}; slowest drain pass (the longest any ring waited \
         between visits): {slowest_pass_us} us; metricsd RSS {rss_idle} kB idle, \
         {rss_granted} kB with 1000 rings granted, {rss_loaded} kB with every ring \
         drained: {per_ring_kb} kB per ring ({ring_kb} kB of it the ring itself)",
        PROCESSES * THREADS,
        PROCESSES * THREADS * PER_THREAD,
        PROCESSES * THREADS * PER_THREAD / 4,
        recorded_in.as_secs_f64(),
        drained_in.as_secs_f64(),
    );
    assert!(
        per_ring_kb <= ring_kb + PER_RING_OVERHEAD_KB,
        "{per_ring_kb} kB per ring; the bound is the ring's {ring_kb} kB + \
         {PER_RING_OVERHEAD_KB} kB"
    );
    for p in &mut producers {
        p.send("exit");
    }
    for p in &mut producers {
        p.finish();
    }
}

/// The latest value of metricsd's own gauge or counter `name` in logd.
fn health_last(logd: &Path, name: &str) -> u64 {
    query(
        logd,
        &logd::Query::new()
            .field("producer_service", "metricsd")
            .field("metric", name),
    )
    .last()
    .and_then(|r| r.record.get("value")?.parse().ok())
    .unwrap_or(0)
}

/// How many bytes the real metricsd's RSS grows by per series when `series` series are
/// registered on fresh rings (`KEYS_PER_RING` keys each), each fed `samples(key)`, and
/// the records are drained: measured from a fresh daemon whose rings are granted.
fn bytes_per_series(
    series: u32,
    what: RegisterKind,
    samples: impl Fn(u32) -> Vec<Record>,
) -> (u64, String) {
    const KEYS_PER_RING: u32 = 2000;
    let dir = tempfile::tempdir().expect("tempdir");
    let logd_path = dir.path().join("logd.sock");
    let _logd = start_logd(&logd_path);
    let daemon = Serving::start(
        dir.path(),
        "[rings]\ncapacity = 4096\n\n\
         [series]\nmax_total = 20000\nmax_per_service = 20000\nmax_per_metric = 20000\n\n\
         [export]\ninterval_ms = 250\nqueue_records = 100000\n",
    );
    let pid = daemon.pid();
    let control = Control::connect(&dir.path().join("metricsd.sock"));
    let mut rings: Vec<Ring> = (0..series.div_ceil(KEYS_PER_RING))
        .map(|_| control.ring(0))
        .collect();
    // Every ring granted and an export or two done: what grows from here is series.
    std::thread::sleep(Duration::from_millis(600));
    let before = rss_kb(pid);
    let mut records = 0;
    for (i, ring) in rings.iter_mut().enumerate() {
        let first = 1 + i as u32 * KEYS_PER_RING;
        let keys = KEYS_PER_RING.min(series - i as u32 * KEYS_PER_RING);
        for key in first..first + keys {
            let id = format!("{key:06}");
            ring.register_wait(
                key,
                what,
                "mem.series",
                &[("id", &id), ("zone", "eu-west-1")],
            );
            for r in samples(key) {
                ring.push_wait(r);
                records += 1;
            }
        }
    }
    wait_for("every series created and every sample drained", || {
        let created = health_last(&logd_path, "metricsd.series");
        let drained = health_last(&logd_path, "metricsd.records.drained");
        (created >= u64::from(series) && drained >= records).then_some(())
    });
    // Two more exports: their buffers are part of what a series costs.
    std::thread::sleep(Duration::from_millis(600));
    let after = rss_kb(pid);
    let per_series = after.saturating_sub(before) * 1024 / u64::from(series);
    (
        per_series,
        format!(
            "RSS {before} kB with {} rings, {after} kB with {series} series",
            rings.len()
        ),
    )
}

/// Memory per series, checked against the stated bounds: the real metricsd's RSS grows
/// by at most [`PER_COUNTER_SERIES_BYTES`] for each of 8000 counter series (two labels)
/// and by at most [`PER_HISTOGRAM_SERIES_BYTES`] for each of 2000 exponential histogram
/// series whose 160 positive buckets are all in use, each kind in a fresh daemon.
#[test]
fn scale_memory_per_series_within_the_stated_bounds() {
    let _dog = watchdog("the memory-per-series test", Duration::from_secs(240));
    let (per_counter, counters) = bytes_per_series(8000, RegisterKind::COUNTER, |key| {
        vec![Record::counter(key, 1)]
    });
    // 160 values a factor 1.09 apart: at scale 3 (8 buckets per power of two, a factor
    // 1.0905 each) they take 160 neighbouring buckets, the most a side holds.
    let values: Vec<u64> = (0..160)
        .map(|i| (1000.0 * 1.09f64.powi(i)) as u64)
        .collect();
    let (per_histogram, histograms) = bytes_per_series(2000, RegisterKind::HISTOGRAM, |key| {
        values.iter().map(|&v| Record::histogram(key, v)).collect()
    });
    println!(
        "metricsd, counters: {counters}: {per_counter} bytes per series (bound \
         {PER_COUNTER_SERIES_BYTES}); histograms of 160 buckets: {histograms}: \
         {per_histogram} bytes per series (bound {PER_HISTOGRAM_SERIES_BYTES})"
    );
    assert!(
        per_counter <= PER_COUNTER_SERIES_BYTES,
        "{per_counter} bytes per counter series; the bound is {PER_COUNTER_SERIES_BYTES}"
    );
    assert!(
        per_histogram <= PER_HISTOGRAM_SERIES_BYTES,
        "{per_histogram} bytes per histogram series; the bound is {PER_HISTOGRAM_SERIES_BYTES}"
    );
}

/// Child: ten threads, each its own ring, counter `scale.ops{proc, thread}` and the
/// process's histogram `scale.size{proc}`; then waits for the parent's `exit`.
#[test]
#[ignore = "a child process of scale_1000_rings_every_total_exact"]
fn child_records_from_ten_threads() {
    let Some(socket) = child::socket() else {
        return;
    };
    let proc = std::env::var("SCALE_PROC").expect("SCALE_PROC");
    nexus_metrics::install(Config::new().socket(&socket).ring_capacity(RING)).expect("install");
    let go = Arc::new(Barrier::new(THREADS as usize + 1));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let proc = proc.clone();
            let go = go.clone();
            std::thread::spawn(move || {
                let thread = t.to_string();
                let warm = counter!("scale.warmup");
                while nexus_metrics::stats().rings_claimed < THREADS {
                    warm.increment(1);
                    std::thread::sleep(Duration::from_millis(5));
                }
                let c = counter!("scale.ops", "proc" => proc.as_str(), "thread" => thread);
                let h = histogram!("scale.size", "proc" => proc.as_str());
                go.wait();
                for i in 0..PER_THREAD {
                    c.increment(1);
                    if i % 4 == 0 {
                        h.record(i);
                    }
                }
                // Held-back increments, written once the ring has room. A thousand
                // threads on two cores: retry every 20 ms, not `flush_for`'s 50 us, so
                // the waiting threads leave metricsd the CPU to drain with.
                let deadline = Instant::now() + Duration::from_secs(120);
                while !nexus_metrics::flush() {
                    assert!(Instant::now() < deadline, "increments never written");
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    child::wait_until("ten rings", || {
        nexus_metrics::stats().rings_claimed >= THREADS
    });
    child::report("ready", &[("rings", &nexus_metrics::stats().rings_claimed)]);
    child::expect_command("go");
    go.wait();
    for t in threads {
        t.join().expect("recording thread");
    }
    let st = nexus_metrics::stats();
    child::report(
        "done",
        &[
            ("rings", &st.rings_claimed),
            ("lost_increments", &st.lost_increments),
            ("dropped", &st.dropped(DropReason::RingFull)),
            ("dropped_total", &st.dropped_total()),
        ],
    );
    child::expect_command("exit");
}
