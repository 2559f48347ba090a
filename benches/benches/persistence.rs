//! What the write-ahead log costs the drain loop.
//!
//! - `persistence_drain`: records per second one metricsd core validates, aggregates and
//!   (with the log) persists: `Drainer::pass` over four rings of 16 384 counter records
//!   each (64 series), until they are empty, with the write-ahead log off and on (one
//!   group commit, one `write`, per pass; the slots released after it), in the same run.
//!   The rings are filled by the bench thread between measurements (not timed).
//! - Printed after the group: the log's bytes per exported series, over 200 export
//!   intervals of four passes each, split into group commits and export checkpoints
//!   (with the rollup store on, so checkpoints carry the open windows).
//!
//! `cargo bench -p telemetry-benches --bench persistence`

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use metricsd::drain::{Drainer, NewRing};
use metricsd::export::ExportQueue;
use metricsd::snapshot::GrantStats;
use telemetry_abi::{Geometry, MAX_REGISTER_RECORDS, Record, RegisterKind, encode_registration};
use telemetry_benches::{CONSUMER_CPU, interleave, pin, summary};
use telemetry_ring::{MemfdRegion, Writer};

const RINGS: usize = 4;
const RING: u32 = 16_384;
/// Counter series per ring (each ring's own label value, so 64 in all).
const KEYS: u32 = 16;
const ROUNDS: usize = 101;
/// Fills per contender per interleaved round (about 30 ms of draining).
const FILLS: u64 = 32;

struct Bench {
    drainer: Drainer,
    writers: Vec<Writer<MemfdRegion>>,
    dir: Option<PathBuf>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn setup(log: bool) -> Bench {
    let mut config = metricsd::Config::default();
    let dir = log.then(|| {
        let d = std::env::temp_dir().join(format!(
            "persistence-bench-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    });
    config.retention.dir = dir.clone();
    let retention = metricsd::retention::Retention::open(&config.retention).expect("retention");
    let mut drainer = Drainer::new(
        &config,
        ExportQueue::new(config.export.queue_records),
        Arc::new(Mutex::new(GrantStats::default())),
    )
    .with_retention(retention);
    if let Some(d) = &dir {
        drainer
            .open_wal(&d.join("wal"), config.retention.wal_file_bytes)
            .expect("the log opens");
    }
    let mut writers = Vec::new();
    for id in 0..RINGS {
        let geometry = Geometry::new(u64::from(RING)).expect("a power of two");
        let region = MemfdRegion::create("persistence-bench", geometry, 1 + id as u64)
            .expect("a memfd ring");
        let fd = region.fd().try_clone_to_owned().expect("dup");
        let mut writer = Writer::new(MemfdRegion::attach(fd).expect("attach"));
        drainer.add_ring(NewRing {
            id: id as u32 + 1,
            connection: 1,
            service: Arc::from("bench"),
            region,
            epoch: 1 + id as u64,
            logged: None,
        });
        let ring = format!("r{id}");
        for k in 0..KEYS {
            let mut out = [Record::default(); MAX_REGISTER_RECORDS];
            let route = format!("/k{k}");
            let n = encode_registration(
                1 + k,
                RegisterKind::COUNTER,
                "bench.requests",
                &[("ring", &ring), ("route", &route)],
                &mut out,
            )
            .expect("a valid registration");
            writer.push_all(&out[..n]).expect("room");
        }
        writers.push(writer);
    }
    while drainer.pass() > 0 {}
    Bench {
        drainer,
        writers,
        dir,
    }
}

/// Fills every ring (untimed), then drains them; returns the drain's time.
fn round(b: &mut Bench, seed: u64) -> Duration {
    for w in &mut b.writers {
        let free = w.free();
        for i in 0..free {
            let key = 1 + ((seed + i) % u64::from(KEYS)) as u32;
            w.stage(Record::counter(key, 1 + i % 3)).expect("room");
        }
        w.flush();
    }
    let want = RINGS as u64 * u64::from(RING);
    let mut consumed = 0;
    let start = Instant::now();
    while consumed < want {
        let n = b.drainer.pass();
        assert!(n > 0, "the rings hold records");
        consumed += n;
    }
    start.elapsed()
}

fn persistence_drain(c: &mut Criterion) {
    pin(CONSUMER_CPU);
    let mut benches = [setup(false), setup(true)];
    let names = ["log off", "log on (group commit per pass)"];
    let records = RINGS as u64 * u64::from(RING);
    let mut group = c.benchmark_group("persistence_drain");
    group
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(records))
        .sample_size(20)
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(3));
    for (b, name) in benches.iter_mut().zip(names) {
        group.bench_function(name, |bencher| {
            bencher.iter_custom(|iters| (0..iters).map(|i| round(b, i)).sum())
        });
    }
    group.finish();

    let mut rates = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    let mut last = [0.0; 2];
    interleave("interleaved persistence_drain", ROUNDS, 2, |i| {
        let took: Duration = (0..FILLS).map(|s| round(&mut benches[i], s)).sum();
        let rate = FILLS as f64 * records as f64 / took.as_secs_f64() / 1e6;
        rates[i].push(rate);
        last[i] = rate;
        if i == 1 {
            ratios.push(last[1] / last[0]);
        }
    });
    println!(
        "\ninterleaved persistence_drain: {ROUNDS} rounds x {FILLS} fills of {records} counter \
         records per contender, order rotated each round; million records/s, median [min, max]"
    );
    println!("| drain | M records/s |");
    println!("| --- | --- |");
    for (i, name) in names.iter().enumerate() {
        println!("| {name} | {} |", summary(&mut rates[i]));
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "| log on / log off, per round | {:.3} [{:.3}, {:.3}] |",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );

    // Bytes the log takes per exported series: export intervals of four passes each.
    let b = &mut benches[1];
    let intervals = 200u64;
    let (mut in_commits, mut in_checkpoints) = (0u64, 0u64);
    let mut prev = b.drainer.wal_stats().expect("the log is on").bytes;
    for i in 0..intervals {
        round(b, i);
        let mid = b.drainer.wal_stats().expect("on").bytes;
        b.drainer.export();
        let after = b.drainer.wal_stats().expect("on").bytes;
        in_commits += mid - prev;
        in_checkpoints += after - mid;
        prev = after;
    }
    let series = u64::from(KEYS) * RINGS as u64;
    let per = |n: u64| n as f64 / (intervals * series) as f64;
    println!(
        "\nwrite-ahead log: {intervals} export intervals of 4 passes, {series} counter series \
         changed in each: {:.1} bytes per exported series per interval ({:.1} in the 4 group \
         commits, {:.1} in the export checkpoint with its rollup windows)",
        per(in_commits + in_checkpoints),
        per(in_commits),
        per(in_checkpoints),
    );
}

criterion_group!(benches, persistence_drain);
criterion_main!(benches);
