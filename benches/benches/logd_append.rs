//! APPEND throughput of logd over a real Unix socket: one record per frame (one round
//! trip per record) against batched frames, both against the same in-process server.
//!
//! Run: `cargo bench -p telemetry-benches --bench logd_append -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use logd::{Client, Config, Level, Record, Server};

/// A record shaped like one metricsd export: a counter's name, value and window.
fn export_record(i: u64) -> Record {
    Record::new(Level::Info, "metrics.export", "requests_total")
        .field("subject", "checkout")
        .field("kind", "counter")
        .field("value", i.to_string())
        .field("window_ms", "10000")
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("logd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut config = Config {
        socket: dir.join("logd.sock"),
        ..Config::default()
    };
    // Measure the protocol and journal, not the rate limiter.
    config.quota.records_per_sec = u64::MAX / 4;
    config.quota.records_burst = u64::MAX / 4;
    config.quota.bytes_per_sec = u64::MAX / 4;
    config.quota.bytes_burst = u64::MAX / 4;
    let server = Server::bind(config).expect("bind").spawn().expect("spawn");
    let mut client = Client::connect(server.path()).expect("connect");

    const N: u64 = 100;
    let records: Vec<Record> = (0..N).map(export_record).collect();
    let mut g = c.benchmark_group("logd_append");
    g.throughput(Throughput::Elements(N));
    g.bench_function("one_record_per_frame_x100", |b| {
        b.iter(|| {
            for r in &records {
                let report = client.append(std::slice::from_ref(r)).expect("append");
                black_box(report);
            }
        });
    });
    g.bench_function("batched_100_per_frame", |b| {
        b.iter(|| black_box(client.append(&records).expect("append")));
    });
    let big: Vec<Record> = (0..1000).map(export_record).collect();
    g.throughput(Throughput::Elements(1000));
    g.bench_function("batched_1000_per_frame", |b| {
        b.iter(|| black_box(client.append(&big).expect("append")));
    });
    g.finish();
    drop(client);
    server.shutdown().expect("shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
