//! The facade benchmarks, every contender of a comparison in one group, in the same run:
//!
//! - `facades_metrics`: one `metrics::counter!("bench.requests").increment(1)` with a
//!   static key through `nexus_metrics::MetricsRecorder` against
//!   `metrics-exporter-prometheus`'s `PrometheusRecorder` (both installed as the
//!   thread's local recorder, so both pay the same facade lookup), and one increment of
//!   a `metrics::Counter` handle taken from each; our native `Counter` handle as the
//!   floor.
//! - `facades_tracing`: one span created, entered, exited and closed
//!   (`info_span!` + `enter` + drops) through a `tracing_subscriber::Registry` with our
//!   `TracingLayer`, with a no-op layer (`Identity`), and with `tracing-opentelemetry`'s
//!   layer over the OpenTelemetry SDK's tracer with its batch span processor (an
//!   exporter that discards, on the processor's own thread).
//!
//! Our rings are granted by an in-process source (memfd rings of 65536 records, the
//! daemon's default). Calls are timed in laps of 4096; between laps a consumer thread
//! on the other core empties every ring (untimed, for every contender alike), so each
//! call finds room and the lines the consumer read come back to the producer, as in
//! production. The producer runs on CPU 0 and the consumer on CPU 1 (unless
//! `TELEMETRY_BENCH_NO_PIN` is set).
//!
//! Run with `cargo bench -p telemetry-benches --bench facades`; the results are in
//! `benches/README.md`. A plain full run (no filter) then prints an interleaved pass:
//! every contender once per round, order rotated, 51 rounds, each contender's median
//! [min, max] ns per call and the per-round ratios of the comparisons (which cancel
//! most of a shared VM's drift between rounds).

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use nexus_metrics::{ClaimError, RingInfo, RingSource};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use telemetry_abi::Geometry;
use telemetry_benches::{CONSUMER_CPU, PRODUCER_CPU, pin};
use telemetry_ring::{MemfdRegion, Reader, Writer};
use tracing_subscriber::layer::SubscriberExt;

/// Records per ring, metricsd's default: room for a whole lap ([`LAP`] calls) of the dearest
/// contender, a span (three records), so no contender is measured on a full ring.
const RING: u32 = 65536;

/// Grants memfd rings without a daemon and hands their readers to the drain thread.
struct BenchSource {
    readers: Mutex<Sender<Reader<MemfdRegion>>>,
    next_id: AtomicU32,
}

impl RingSource for BenchSource {
    fn claim(&self, _hint: u64) -> Result<(Writer<MemfdRegion>, RingInfo), ClaimError> {
        let geometry =
            Geometry::new(u64::from(RING)).map_err(|_| ClaimError::Protocol("capacity"))?;
        let region =
            MemfdRegion::create("facades-bench", geometry, 1).map_err(ClaimError::Attach)?;
        let fd = region
            .fd()
            .try_clone_to_owned()
            .map_err(|source| ClaimError::Unreachable {
                step: "dup",
                source,
            })?;
        let writer = Writer::new(MemfdRegion::attach(fd).map_err(ClaimError::Attach)?);
        self.readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Reader::new(region))
            .map_err(|_| ClaimError::Protocol("the drain thread is gone"))?;
        Ok((
            writer,
            RingInfo {
                // ORDERING: Relaxed: a unique number.
                ring_id: self.next_id.fetch_add(1, Ordering::Relaxed),
                capacity: RING,
                epoch: 1,
                generation: nexus_metrics::generation(),
            },
        ))
    }
}

/// Calls per timed lap; between laps (untimed) the drain thread on the other core
/// empties every ring, so each call finds room and the ring's lines must come back from
/// the consumer's core, as in production.
const LAP: u64 = 4096;
const _: () = assert!(LAP * 3 <= RING as u64, "a lap of spans fits the ring");

/// The lap handshake between the producer and the drain thread.
struct Laps {
    asked: AtomicU64,
    done: AtomicU64,
}

static LAPS: Laps = Laps {
    asked: AtomicU64::new(0),
    done: AtomicU64::new(0),
};

/// Empties every granted ring each time the producer asks, on the consumer's core.
fn drain(rx: Receiver<Reader<MemfdRegion>>) {
    pin(CONSUMER_CPU);
    let mut readers = Vec::new();
    let mut sum = 0u64;
    let mut seen = 0;
    loop {
        // ORDERING: Acquire pairs with the producer's Release in `lap`: the records of
        // the lap are published before it asks.
        let asked = LAPS.asked.load(Ordering::Acquire);
        if asked == seen {
            std::hint::spin_loop();
            std::thread::yield_now();
            continue;
        }
        readers.extend(rx.try_iter());
        for reader in &mut readers {
            while let Ok(d) = reader.drain(4096, |r| sum = sum.wrapping_add(r.words[0])) {
                if d.consumed == 0 {
                    break;
                }
            }
        }
        seen = asked;
        black_box(sum);
        // ORDERING: Release pairs with the producer's Acquire: the read positions are
        // stored before it goes on.
        LAPS.done.store(seen, Ordering::Release);
    }
}

/// Runs `f` `iters` times in laps of [`LAP`], the rings emptied between laps; returns
/// the time spent in the laps only.
fn laps(iters: u64, mut f: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let k = left.min(LAP);
        let start = Instant::now();
        for _ in 0..k {
            f();
        }
        total += start.elapsed();
        left -= k;
        // ORDERING: Release/Acquire pair with the drain thread's (see `drain`).
        let lap = LAPS.asked.fetch_add(1, Ordering::Release) + 1;
        while LAPS.done.load(Ordering::Acquire) != lap {
            std::hint::spin_loop();
        }
    }
    total
}

/// Installs nexus-metrics over the bench source once per process.
fn install() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || drain(rx));
        nexus_metrics::install(nexus_metrics::Config::new().source(BenchSource {
            readers: Mutex::new(tx),
            next_id: AtomicU32::new(1),
        }))
        .expect("nothing recorded before");
        pin(PRODUCER_CPU);
    });
}

fn facades_metrics(c: &mut Criterion) {
    install();
    let ours = nexus_metrics::MetricsRecorder::new();
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let mut g = c.benchmark_group("facades_metrics");
    g.bench_function("ours/counter!.increment", |b| {
        let _local = metrics::set_default_local_recorder(&ours);
        b.iter_custom(|n| {
            laps(n, || {
                metrics::counter!("bench.requests").increment(black_box(1))
            })
        });
    });
    g.bench_function("prometheus/counter!.increment", |b| {
        let _local = metrics::set_default_local_recorder(&prometheus);
        b.iter_custom(|n| {
            laps(n, || {
                metrics::counter!("bench.requests").increment(black_box(1))
            })
        });
    });
    g.bench_function("ours/Counter.increment", |b| {
        let counter = metrics::with_local_recorder(&ours, || metrics::counter!("bench.handle"));
        b.iter_custom(|n| laps(n, || counter.increment(black_box(1))));
    });
    g.bench_function("prometheus/Counter.increment", |b| {
        let counter =
            metrics::with_local_recorder(&prometheus, || metrics::counter!("bench.handle"));
        b.iter_custom(|n| laps(n, || counter.increment(black_box(1))));
    });
    g.bench_function("native/Counter.increment (floor)", |b| {
        let counter = nexus_metrics::counter!("bench.native");
        b.iter_custom(|n| laps(n, || counter.increment(black_box(1))));
    });
    g.finish();
    let stats = nexus_metrics::stats();
    eprintln!(
        "facades_metrics: dropped {} coalesced {}",
        stats.dropped_total(),
        stats.coalesced
    );
}

/// An OpenTelemetry exporter that discards every batch.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        black_box(batch);
        Ok(())
    }
}

#[inline(always)]
fn one_span() {
    let span = tracing::info_span!("bench.span");
    let entered = span.enter();
    black_box(&entered);
    drop(entered);
    drop(span);
}

fn facades_tracing(c: &mut Criterion) {
    install();
    let mut g = c.benchmark_group("facades_tracing");
    g.bench_function("registry+noop/span", |b| {
        let subscriber =
            tracing_subscriber::registry().with(tracing_subscriber::layer::Identity::new());
        tracing::subscriber::with_default(subscriber, || b.iter_custom(|n| laps(n, one_span)));
    });
    g.bench_function("registry+ours/span", |b| {
        let subscriber = tracing_subscriber::registry().with(nexus_metrics::TracingLayer::new());
        tracing::subscriber::with_default(subscriber, || b.iter_custom(|n| laps(n, one_span)));
    });
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Discard)
        .build();
    g.bench_function("registry+opentelemetry(batch)/span", |b| {
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("bench"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || b.iter_custom(|n| laps(n, one_span)));
    });
    g.finish();
    let _ = provider.shutdown();
    let stats = nexus_metrics::stats();
    eprintln!("facades_tracing: dropped {}", stats.dropped_total());
}

/// Rounds of the interleaved pass, and laps per contender per round.
const ROUNDS: usize = 51;
const ROUND_LAPS: u64 = 8;

/// The interleaved pass: every contender once per round (order rotated), ns per call;
/// prints each contender's median [min, max] and the per-round ratios of the
/// comparisons the facades are judged by. Runs after the criterion groups on a plain
/// full run (no filter), as the other benches' passes do.
fn interleaved() {
    install();
    let ours = nexus_metrics::MetricsRecorder::new();
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let ours_handle = metrics::with_local_recorder(&ours, || metrics::counter!("bench.handle"));
    let prometheus_handle =
        metrics::with_local_recorder(&prometheus, || metrics::counter!("bench.handle"));
    let native = nexus_metrics::counter!("bench.native");
    let noop = tracing::Dispatch::new(
        tracing_subscriber::registry().with(tracing_subscriber::layer::Identity::new()),
    );
    let layer = tracing::Dispatch::new(
        tracing_subscriber::registry().with(nexus_metrics::TracingLayer::new()),
    );
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Discard)
        .build();
    let otel = tracing::Dispatch::new(
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("bench"))),
    );
    let calls = ROUND_LAPS * LAP;
    let names = [
        "ours/counter!.increment",
        "prometheus/counter!.increment",
        "ours/Counter.increment",
        "prometheus/Counter.increment",
        "native/Counter.increment",
        "registry+noop/span",
        "registry+ours/span",
        "registry+opentelemetry(batch)/span",
    ];
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    telemetry_benches::interleave("facades", ROUNDS, names.len(), |k| {
        let spent = match k {
            0 => metrics::with_local_recorder(&ours, || {
                laps(calls, || {
                    metrics::counter!("bench.requests").increment(black_box(1))
                })
            }),
            1 => metrics::with_local_recorder(&prometheus, || {
                laps(calls, || {
                    metrics::counter!("bench.requests").increment(black_box(1))
                })
            }),
            2 => laps(calls, || ours_handle.increment(black_box(1))),
            3 => laps(calls, || prometheus_handle.increment(black_box(1))),
            4 => laps(calls, || native.increment(black_box(1))),
            5 => tracing::dispatcher::with_default(&noop, || laps(calls, one_span)),
            6 => tracing::dispatcher::with_default(&layer, || laps(calls, one_span)),
            _ => tracing::dispatcher::with_default(&otel, || laps(calls, one_span)),
        };
        ns[k].push(spent.as_nanos() as f64 / calls as f64);
    });
    let _ = provider.shutdown();
    println!("\ninterleaved pass: {ROUNDS} rounds of {calls} calls per contender, ns per call");
    for (name, values) in names.iter().zip(&ns) {
        let mut v = values.clone();
        println!("  {name:<40} {}", telemetry_benches::summary(&mut v));
    }
    let ratio = |a: usize, b: usize| {
        println!(
            "  {} / {}: {}",
            names[a],
            names[b],
            telemetry_benches::paired(&ns[a], &ns[b])
        );
    };
    println!("per-round ratios:");
    ratio(0, 1);
    ratio(2, 3);
    ratio(2, 4);
    ratio(6, 5);
    ratio(7, 6);
    let stats = nexus_metrics::stats();
    println!(
        "  nexus-metrics: dropped {}, coalesced {}",
        stats.dropped_total(),
        stats.coalesced
    );
}

criterion_group!(benches, facades_metrics, facades_tracing);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    if std::env::args().skip(1).all(|arg| arg == "--bench") {
        interleaved();
    }
}
