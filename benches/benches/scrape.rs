//! Rendering one scrape of 100 000 series: metricsd's exposition in OpenMetrics text,
//! Prometheus text and protobuf, from the view the drain loop publishes (what a scrape
//! renders), against `metrics-exporter-prometheus` rendering the same series (Prometheus
//! text; its protobuf output needs `protoc` at build time, which this workspace does not
//! require), and against `prometheus-client`'s own encoders rendering the same
//! exposition (`render_reference`: the same bytes, asserted before the group).
//!
//! The series: 60 000 counters, 30 000 gauges and 10 000 histograms (20 observations
//! each, 1 to 2^20) over two services; the peer's histograms have power-of-two buckets
//! 1 to 2^20, like metricsd's classic buckets. Both sides are filled untimed; only the
//! render is timed.
//!
//! After the group, `drain_during_scrape` measures what a scrape costs the drain loop:
//! `Drainer::pass` latency over a ring of counter records, quiet and while another
//! thread renders the 100 000-series exposition in a loop; `publish_cost` times the
//! drain loop's own share, bringing its scrape table up to date and publishing a view.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group};
use metrics::{Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metricsd::aggregate::{MetricKind, Resolved, SeriesId, Store};
use metricsd::config::{RedactionConfig, SeriesConfig};
use metricsd::drain::{Drainer, NewRing};
use metricsd::export::ExportQueue;
use metricsd::prometheus::{Format, render_reference, render_view};
use metricsd::redact::Redactor;
use metricsd::scrape::{ScrapeTable, ScrapeView};
use metricsd::snapshot::{GrantStats, Snapshot};
use telemetry_abi::{Geometry, MAX_REGISTER_RECORDS, Record, RegisterKind};
use telemetry_benches::{CONSUMER_CPU, PRODUCER_CPU, pin};
use telemetry_ring::{MemfdRegion, Writer};

const COUNTERS: u32 = 60_000;
const GAUGES: u32 = 30_000;
const HISTOGRAMS: u32 = 10_000;
const OBSERVATIONS: u64 = 20;

/// A pseudo-random observation in 1..=2^20.
fn observation(i: u64, j: u64) -> u64 {
    let x = (i * 0x9E37_79B9 + j * 0x85EB_CA6B) ^ (i >> 7);
    1 + x % (1 << 20)
}

/// The workload in metricsd's store, and in the peer's recorder (left empty unless
/// `peer`).
fn workload(peer: bool) -> (Arc<Snapshot>, PrometheusHandle, Store) {
    let caps = SeriesConfig {
        max_total: 1_000_000,
        max_per_metric: 1_000_000,
        max_per_service: 1_000_000,
        max_overflow: 1_000,
        ..SeriesConfig::default()
    };
    let mut store = Store::new(
        caps,
        Redactor::new(&RedactionConfig::default().patterns),
        &BTreeMap::new(),
    );
    let services = [store.service("web"), store.service("api")];
    let service_names = ["web", "api"];
    let bounds: Vec<f64> = (0..=20).map(|k| f64::from(1u32 << k)).collect();
    let recorder = PrometheusBuilder::new()
        .set_buckets(&bounds)
        .expect("buckets")
        .build_recorder();
    let meta = Metadata::new(module_path!(), metrics::Level::INFO, None);
    let key = |name: &'static str, svc: usize, pairs: &[(&'static str, String)]| {
        let mut labels = vec![Label::new("service", service_names[svc])];
        labels.extend(pairs.iter().map(|(k, v)| Label::new(*k, v.clone())));
        Key::from_parts(name, labels)
    };
    let resolve = |store: &mut Store, kind, name, svc: usize, pairs: &[(&str, &str)]| match store
        .resolve(services[svc], kind, name, pairs)
    {
        Resolved::Series(id) => id,
        Resolved::Refused => panic!("the caps hold the workload"),
    };
    for i in 0..COUNTERS {
        let (svc, route, status) = (
            (i % 2) as usize,
            format!("/r{}", i / 10),
            format!("{}", 200 + i % 5),
        );
        let id = resolve(
            &mut store,
            MetricKind::Counter,
            "bench.requests",
            svc,
            &[("route", &route), ("status", &status)],
        );
        let v = u64::from(i) * 7 + 1;
        store.add(id, v);
        if peer {
            recorder
                .register_counter(
                    &key(
                        "bench_requests",
                        svc,
                        &[("route", route), ("status", status)],
                    ),
                    &meta,
                )
                .increment(v);
        }
    }
    for i in 0..GAUGES {
        let (svc, worker) = ((i % 2) as usize, i.to_string());
        let id = resolve(
            &mut store,
            MetricKind::Gauge,
            "bench.queue_depth",
            svc,
            &[("worker", &worker)],
        );
        let v = i64::from(i % 1000) - 500;
        store.set(id, v);
        if peer {
            recorder
                .register_gauge(&key("bench_queue_depth", svc, &[("worker", worker)]), &meta)
                .set(v as f64);
        }
    }
    for i in 0..HISTOGRAMS {
        let (svc, route) = ((i % 2) as usize, format!("/r{i}"));
        let id = resolve(
            &mut store,
            MetricKind::Histogram,
            "bench.latency",
            svc,
            &[("route", &route)],
        );
        let h = peer.then(|| {
            recorder.register_histogram(&key("bench_latency", svc, &[("route", route)]), &meta)
        });
        for j in 0..OBSERVATIONS {
            let v = observation(u64::from(i), j);
            store.observe(id, v);
            if let Some(h) = &h {
                h.record(v as f64);
            }
        }
    }
    let snapshot = Snapshot {
        series: store.all().cloned().collect(),
        ..Snapshot::default()
    };
    (Arc::new(snapshot), recorder.handle(), store)
}

fn scrape_render(c: &mut Criterion) {
    pin(CONSUMER_CPU);
    let (snapshot, handle, mut store) = workload(true);
    let series = snapshot.series.len();
    // What the drain loop publishes for scrapes (untimed here; `publish_cost` below).
    let mut table = ScrapeTable::new();
    table.update(&mut store);
    let view = Arc::new(table.view(Vec::new()));
    assert_eq!(view.series().count(), series);
    assert_eq!(series, (COUNTERS + GAUGES + HISTOGRAMS) as usize);
    for (name, format) in [
        ("openmetrics", Format::OpenMetrics),
        ("prometheus_text", Format::Text),
        ("protobuf", Format::Protobuf),
    ] {
        let r = render_view(&view, format).expect("renders");
        let reference = render_reference(snapshot.clone(), Vec::new(), format).expect("renders");
        assert_eq!(
            r.body, reference.body,
            "the same bytes as prometheus-client's"
        );
        eprintln!(
            "scrape_render: metricsd {name}: {} bytes for {series} series",
            r.body.len()
        );
    }
    let theirs = handle.render();
    eprintln!(
        "scrape_render: metrics-exporter-prometheus text: {} bytes, {} lines",
        theirs.len(),
        theirs.lines().count()
    );
    assert!(
        theirs.contains("bench_latency_bucket"),
        "the peer renders histograms"
    );

    let mut group = c.benchmark_group("scrape_render_100k");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    for (name, format) in [
        ("metricsd_openmetrics", Format::OpenMetrics),
        ("metricsd_protobuf", Format::Protobuf),
        ("metricsd_prometheus_text", Format::Text),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| black_box(render_view(&view, format).expect("renders").body.len()))
        });
    }
    // The same expositions through `prometheus-client`'s own encoders (the bytes are
    // the same: `render` is checked against `render_reference` in metricsd's tests).
    for (name, format) in [
        ("prometheus_client_openmetrics", Format::OpenMetrics),
        ("prometheus_client_protobuf", Format::Protobuf),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                black_box(
                    render_reference(snapshot.clone(), Vec::new(), format)
                        .expect("renders")
                        .body
                        .len(),
                )
            })
        });
    }
    group.bench_function("metrics_exporter_prometheus_text", |b| {
        b.iter(|| black_box(handle.render().len()))
    });
    group.finish();

    drain_during_scrape(view);
    publish_cost(store);
}

/// Counter records per round (four passes of the default budget).
const FILL: u64 = 16_384;
const ROUNDS: usize = 400;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn drain_during_scrape(view: Arc<ScrapeView>) {
    let config = metricsd::Config::default();
    let mut drainer = Drainer::new(
        &config,
        ExportQueue::new(config.export.queue_records),
        Arc::new(Mutex::new(GrantStats::default())),
    );
    let geometry = Geometry::new(1 << 16).expect("geometry");
    let region = MemfdRegion::create("scrape-bench", geometry, 1).expect("memfd");
    let fd = region.fd().try_clone_to_owned().expect("dup");
    let mut writer = Writer::new(MemfdRegion::attach(fd).expect("attach"));
    drainer.add_ring(NewRing {
        id: 1,
        connection: 1,
        service: Arc::from("bench"),
        region,
    });
    let mut out = [Record::default(); MAX_REGISTER_RECORDS];
    let n = telemetry_abi::encode_registration(
        1,
        RegisterKind::COUNTER,
        "drain.requests",
        &[],
        &mut out,
    )
    .expect("registration");
    writer.push_all(&out[..n]).expect("room");
    while drainer.pass() > 0 {}

    let renders = Arc::new(AtomicU64::new(0));
    // Rounds until at least `min_renders` scrapes were rendered meanwhile (and at least
    // ROUNDS rounds).
    let mut measure = |label: &str, min_renders: u64| {
        let mut passes = Vec::with_capacity(ROUNDS * 4);
        let mut rounds = 0;
        while rounds < ROUNDS || renders.load(Ordering::Relaxed) < min_renders {
            rounds += 1;
            for _ in 0..FILL {
                writer.push(Record::counter(1, 1)).expect("room");
            }
            loop {
                let start = Instant::now();
                let n = drainer.pass();
                let took = start.elapsed();
                if n == 0 {
                    break;
                }
                passes.push(took);
            }
        }
        passes.sort();
        eprintln!(
            "drain_during_scrape: {label}: {} passes of <= 4096 records: median {:?}, p99 {:?}, max {:?}",
            passes.len(),
            percentile(&passes, 0.5),
            percentile(&passes, 0.99),
            passes.last().copied().unwrap_or_default()
        );
    };
    measure("quiet", 0);
    let stop = Arc::new(AtomicBool::new(false));
    let (s, view, n) = (stop.clone(), view.clone(), renders.clone());
    let scraper = std::thread::spawn(move || {
        pin(PRODUCER_CPU);
        while !s.load(Ordering::Relaxed) {
            black_box(render_view(&view, Format::OpenMetrics).expect("renders"));
            n.fetch_add(1, Ordering::Relaxed);
        }
    });
    measure("while 100k-series scrapes render", 5);
    stop.store(true, Ordering::Relaxed);
    scraper.join().expect("the scraper");
    eprintln!(
        "drain_during_scrape: {} scrapes rendered meanwhile",
        renders.load(Ordering::Relaxed)
    );
    let _ = writer;
}

/// The drain loop's own share of serving scrapes: bringing its scrape table up to date
/// after an export and publishing a view. The first update copies all 100 000 series;
/// later ones copy the series the export found changed (1 % and all of them here), while
/// a scrape still holds the previous view (as a scrape in progress would).
fn publish_cost(mut store: Store) {
    let ids: Vec<SeriesId> = store.take_dirty();
    let mut table = ScrapeTable::new();
    let start = Instant::now();
    table.update(&mut store);
    let mut view = Arc::new(table.view(Vec::new()));
    eprintln!(
        "publish_cost: first update (every series copied): {:?} for {} series",
        start.elapsed(),
        view.series().count()
    );
    for (label, every) in [("1 % changed", 100), ("all changed", 1)] {
        let mut times = Vec::new();
        for round in 0..20u64 {
            for id in ids.iter().step_by(every) {
                store.add(*id, round + 1);
            }
            store.take_dirty(); // as the export does
            let held = view.clone(); // a scrape in progress
            let start = Instant::now();
            table.update(&mut store);
            view = Arc::new(table.view(Vec::new()));
            times.push(start.elapsed());
            drop(held);
        }
        times.sort();
        eprintln!(
            "publish_cost: update and publish, {label}: median {:?}, max {:?}",
            percentile(&times, 0.5),
            times.last().copied().unwrap_or_default()
        );
    }
}

criterion_group!(benches, scrape_render);

/// `SCRAPE_PROFILE=openmetrics|text|protobuf` renders that format `SCRAPE_PROFILE_N`
/// times (default 1) from metricsd's workload and exits: for profilers
/// (`valgrind --tool=callgrind --toggle-collect='*prometheus*render*'`), without the
/// peer's fill or the criterion loop.
fn main() {
    if let Ok(format) = std::env::var("SCRAPE_PROFILE") {
        let format = match format.as_str() {
            "openmetrics" => Format::OpenMetrics,
            "text" => Format::Text,
            "protobuf" => Format::Protobuf,
            other => panic!("SCRAPE_PROFILE={other}: expected openmetrics, text or protobuf"),
        };
        let n: usize = std::env::var("SCRAPE_PROFILE_N")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let (_, _, mut store) = workload(false);
        let mut table = ScrapeTable::new();
        table.update(&mut store);
        let view = table.view(Vec::new());
        for _ in 0..n {
            let r = render_view(&view, format).expect("renders");
            eprintln!("{} bytes", r.body.len());
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
