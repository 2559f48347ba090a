//! The pipeline benchmarks, every contender of a comparison in one group, in the same
//! run:
//!
//! - `producer_cost`: nanoseconds per call on the producer's thread with a warm handle:
//!   `nexus-metrics`' `counter!`, `Counter`, `histogram!`, `Histogram`, four handles
//!   recorded in turn (the end-to-end child's mix, see [`NexusMix`]) and a `span!`
//!   start + end, against the `metrics` crate's `counter!` / `histogram!` (and its cached
//!   handles, and the same mix) with an in-process recorder installed (metrics-util's
//!   `Registry` with `AtomicStorage`, what exporters such as metrics-exporter-prometheus
//!   build on). The ring's own `Writer::push` is the floor. Calls are timed in laps of
//!   4096; between laps a consumer on the other core empties what was recorded (our
//!   memfd rings of 65536 records, metricsd's default; the `metrics` registry's
//!   histogram buckets, as an exporter's upkeep does), so every record finds room and
//!   lines the consumer read must come back to the producer, as in production.
//! - `end_to_end`: samples per second from a producer process into aggregates: the child
//!   records a round of 262144 samples through `nexus-metrics` into a real in-process
//!   `metricsd::Daemon` (its ring granted over the control socket), against a
//!   StatsD-style design where the child sends one Unix datagram per sample (DogStatsD
//!   text, `name:1|c|#k:v`) to a receiver that parses and aggregates into a `HashMap`.
//!   Same sample mix for both (two counter and two histogram series, alternating); a
//!   round is timed from the command to the child until its last sample is aggregated,
//!   and both sides' totals are checked exactly at the end.
//! - `metricsd_drain`: records per second one metricsd core validates and aggregates:
//!   `Drainer::pass` over four rings another core filled (counters, histograms, a mix,
//!   spans).
//! - `metricsd_idle_pass`: one `Drainer::pass` over 1000 empty rings, what each of an
//!   idle metricsd's wake-ups costs.
//!
//! Run with `cargo bench -p telemetry-benches --bench pipeline`; the results are in
//! `benches/README.md`. After each group, a plain full run (no arguments) also prints an
//! interleaved pass: every contender once per round, order rotated, median [min, max]
//! (see [`want_interleaved`]). The `producer_cost` pass runs 101 short rounds and
//! compares within each round: ns above the ring's push (the library's own share), the
//! ratio to the `metrics` crate's peer, and the rounds under 5 ns.
//!
//! The producer runs on CPU 0 and the consumer (metricsd, the StatsD receiver, the
//! rings' drain thread) on CPU 1, pinned unless `TELEMETRY_BENCH_NO_PIN` is set. The
//! binary is its own child process: `end_to_end` re-executes it with
//! `TELEMETRY_BENCH_PIPELINE_CHILD` set, and `main` then acts as the producer process.
//! `TELEMETRY_BENCH_PRODUCER_RING`, `TELEMETRY_BENCH_E2E_SAMPLES` and
//! `TELEMETRY_BENCH_E2E_RING` change the ring sizes and the round, to compare.

use std::collections::HashMap;
use std::hint::{black_box, spin_loop};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group};
use metrics::{Key, KeyName, Metadata, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use metricsd::drain::{Drainer, NewRing};
use metricsd::export::ExportQueue;
use metricsd::histogram::Exponential;
use metricsd::snapshot::GrantStats;
use metricsd::{Daemon, DaemonHandle, MemorySink, Snapshot, Value};
use nexus_metrics::{ClaimError, RingInfo, RingSource};
use telemetry_abi::{Geometry, MAX_REGISTER_RECORDS, Record, RegisterKind, SpanStatus};
use telemetry_benches::{
    CONSUMER_CPU, INTERLEAVED_ENV, NO_PIN_ENV, PRODUCER_CPU, interleave, paired, pin,
    plain_full_run, summary,
};
use telemetry_ring::{MemfdRegion, Reader, Writer};

/// Set in the environment of the re-executed bench binary: it is a child producer of
/// this kind (`nexus` or `statsd`).
const CHILD_ENV: &str = "TELEMETRY_BENCH_PIPELINE_CHILD";
/// The child's socket: metricsd's control socket, or the StatsD receiver's.
const CHILD_SOCKET_ENV: &str = "TELEMETRY_BENCH_PIPELINE_SOCKET";

/// A latency-like value for sample `i`: spread over ~20 exponential buckets.
#[inline(always)]
fn sample_value(i: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 44) + 100
}

/// The sample mix through `nexus-metrics` handles: two counter and two histogram series,
/// cycled. The end-to-end child records it, and so does a `producer_cost` contender:
/// with several call sites of each handle kind in one loop, the compiler no longer
/// treats each record as the only use of its fast path, as it does in the one-handle
/// loops.
struct NexusMix {
    a: nexus_metrics::Counter,
    latency_a: nexus_metrics::Histogram,
    b: nexus_metrics::Counter,
    latency_b: nexus_metrics::Histogram,
}

impl NexusMix {
    fn new() -> Self {
        Self {
            a: nexus_metrics::counter!("http.requests", "route" => "/a", "status" => "200"),
            latency_a: nexus_metrics::histogram!("http.latency_ns", "route" => "/a"),
            b: nexus_metrics::counter!("http.requests", "route" => "/b", "status" => "500"),
            latency_b: nexus_metrics::histogram!("http.latency_ns", "route" => "/b"),
        }
    }

    /// Sample `i` of the mix.
    #[inline(always)]
    fn record(&self, i: u64) {
        match i & 3 {
            0 => self.a.increment(1),
            1 => self.latency_a.record(sample_value(i)),
            2 => self.b.increment(1),
            _ => self.latency_b.record(sample_value(i)),
        }
    }
}

/// The same mix through the `metrics` crate's handles.
struct MetricsMix {
    a: metrics::Counter,
    latency_a: metrics::Histogram,
    b: metrics::Counter,
    latency_b: metrics::Histogram,
}

impl MetricsMix {
    fn new() -> Self {
        Self {
            a: metrics::counter!("http.requests", "route" => "/a", "status" => "200"),
            latency_a: metrics::histogram!("http.latency_ns", "route" => "/a"),
            b: metrics::counter!("http.requests", "route" => "/b", "status" => "500"),
            latency_b: metrics::histogram!("http.latency_ns", "route" => "/b"),
        }
    }

    #[inline(always)]
    fn record(&self, i: u64) {
        match i & 3 {
            0 => self.a.increment(1),
            1 => self.latency_a.record(sample_value(i) as f64),
            2 => self.b.increment(1),
            _ => self.latency_b.record(sample_value(i) as f64),
        }
    }
}

// --- Producer cost ---------------------------------------------------------------------

/// Records per ring granted to the producer threads of this process. Overridable with
/// `TELEMETRY_BENCH_PRODUCER_RING` (a power of two) to compare ring sizes.
const PRODUCER_RING: u32 = 65536;
/// Calls per timed lap; the consumer empties the rings between laps.
const LAP: u64 = 4096;

fn producer_ring() -> u32 {
    env_or("TELEMETRY_BENCH_PRODUCER_RING", PRODUCER_RING)
}

/// What the consumer thread does when a lap ends.
const MODE_IDLE: u8 = 0;
/// Drain every ring until it is empty.
const MODE_RINGS: u8 = 1;
/// Empty the `metrics` recorder's histograms (an exporter's upkeep) and read its
/// counters.
const MODE_METRICS: u8 = 2;
const MODE_EXIT: u8 = 3;

/// Grants this process's producer threads memfd rings without a daemon: the writer gets
/// a second mapping of the memfd, the consumer thread a `Reader` on the first.
struct BenchSource {
    readers: Mutex<Sender<Reader<MemfdRegion>>>,
    next_id: AtomicU32,
}

/// A new memfd ring of `capacity` records: the consumer's mapping, and a writer on a
/// second mapping of the same memfd (as a producer process would attach it).
fn memfd_pair(capacity: u32) -> Result<(MemfdRegion, Writer<MemfdRegion>), ClaimError> {
    let geometry =
        Geometry::new(u64::from(capacity)).map_err(|_| ClaimError::Protocol("capacity"))?;
    let region = MemfdRegion::create("pipeline-bench", geometry, 1).map_err(ClaimError::Attach)?;
    let fd = region
        .fd()
        .try_clone_to_owned()
        .map_err(|source| ClaimError::Unreachable {
            step: "dup",
            source,
        })?;
    let writer = Writer::new(MemfdRegion::attach(fd).map_err(ClaimError::Attach)?);
    Ok((region, writer))
}

impl RingSource for BenchSource {
    fn claim(&self, _hint: u64) -> Result<(Writer<MemfdRegion>, RingInfo), ClaimError> {
        let capacity = producer_ring();
        let (region, writer) = memfd_pair(capacity)?;
        self.readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Reader::new(region))
            .map_err(|_| ClaimError::Protocol("the consumer thread is gone"))?;
        Ok((
            writer,
            RingInfo {
                // ORDERING: Relaxed: a unique number.
                ring_id: self.next_id.fetch_add(1, Ordering::Relaxed),
                capacity,
                epoch: 1,
                generation: nexus_metrics::generation(),
            },
        ))
    }
}

/// The `metrics` crate's recorder for the comparison: metrics-util's `Registry` with
/// `AtomicStorage` (atomic counters, lock-free histogram buckets), the storage
/// metrics-exporter-prometheus builds on, without any exporter.
struct AtomicRecorder(Arc<Registry<Key, AtomicStorage>>);

impl metrics::Recorder for AtomicRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> metrics::Counter {
        self.0
            .get_or_create_counter(key, |c| metrics::Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> metrics::Gauge {
        self.0
            .get_or_create_gauge(key, |g| metrics::Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> metrics::Histogram {
        self.0
            .get_or_create_histogram(key, |h| metrics::Histogram::from_arc(h.clone()))
    }
}

/// The consumer thread on the other core: at the end of each lap it empties what the
/// producer recorded (our rings, or the `metrics` registry's histograms), then lets the
/// producer go on.
struct Consumer {
    shared: Arc<ConsumerShared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct ConsumerShared {
    mode: AtomicU8,
    /// Laps ended by the producer.
    lap: AtomicU64,
    /// Laps the consumer has emptied.
    done: AtomicU64,
    /// Records drained from rings, histogram values emptied.
    records: AtomicU64,
    histogram_values: AtomicU64,
}

impl Consumer {
    fn start(
        readers: Receiver<Reader<MemfdRegion>>,
        registry: Arc<Registry<Key, AtomicStorage>>,
    ) -> Self {
        let shared = Arc::new(ConsumerShared::default());
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            pin(CONSUMER_CPU);
            consume(&readers, &registry, &s);
        });
        Self {
            shared,
            thread: Some(thread),
        }
    }

    fn set(&self, mode: u8) {
        // ORDERING: Release pairs with the consumer's Acquire: it sees the mode before
        // the next lap.
        self.shared.mode.store(mode, Ordering::Release);
    }

    /// Ends a lap: waits until the consumer has emptied everything recorded.
    fn end_lap(&self) {
        // ORDERING: Release/Acquire pair with the consumer's: the lap's records are
        // published before it looks, and its read positions are seen after.
        let lap = self.shared.lap.fetch_add(1, Ordering::Release) + 1;
        while self.shared.done.load(Ordering::Acquire) != lap {
            spin_loop();
        }
    }

    /// Runs `iters` calls of `body` (`body(n)` makes `n` calls) in laps of at most
    /// `lap` calls, the consumer emptying the rings between laps; returns the time
    /// spent in the laps. Not inlined, so a profiler can single it out (one call per
    /// lap of thousands of calls).
    #[inline(never)]
    fn laps(&self, iters: u64, lap: u64, mut body: impl FnMut(u64)) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let n = left.min(lap);
            let start = Instant::now();
            body(n);
            total += start.elapsed();
            self.end_lap();
            left -= n;
        }
        total
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.set(MODE_EXIT);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn consume(
    rx: &Receiver<Reader<MemfdRegion>>,
    registry: &Registry<Key, AtomicStorage>,
    shared: &ConsumerShared,
) {
    let mut readers: Vec<Reader<MemfdRegion>> = Vec::new();
    let mut sum = 0u64;
    let mut seen = 0u64;
    loop {
        // ORDERING: Acquire pairs with `Consumer::end_lap`'s Release.
        let lap = shared.lap.load(Ordering::Acquire);
        let mode = shared.mode.load(Ordering::Acquire);
        if mode == MODE_EXIT {
            break;
        }
        if lap == seen {
            if mode == MODE_IDLE {
                std::thread::sleep(Duration::from_millis(1));
            } else {
                spin_loop();
            }
            continue;
        }
        while let Ok(reader) = rx.try_recv() {
            readers.push(reader);
        }
        match mode {
            MODE_METRICS => {
                let mut values = 0u64;
                registry.visit_histograms(|_, h| h.clear_with(|v| values += v.len() as u64));
                registry.visit_counters(|_, c| sum = sum.wrapping_add(c.load(Ordering::Relaxed)));
                // ORDERING: Relaxed: a counter.
                shared.histogram_values.fetch_add(values, Ordering::Relaxed);
            }
            _ => {
                for reader in &mut readers {
                    while let Ok(d) = reader.drain(4096, |r| sum = sum.wrapping_add(r.words[0])) {
                        if d.consumed == 0 {
                            break;
                        }
                        // ORDERING: Relaxed: a counter.
                        shared.records.fetch_add(d.consumed, Ordering::Relaxed);
                    }
                }
            }
        }
        seen = lap;
        // ORDERING: Release pairs with `end_lap`'s Acquire: the read positions are
        // stored before the producer goes on.
        shared.done.store(lap, Ordering::Release);
    }
    black_box(sum);
}

/// The recorders both sides of `producer_cost` use, installed once per process.
struct Recorders {
    consumer: Consumer,
    baseline: Mutex<Writer<MemfdRegion>>,
}

fn recorders() -> &'static Recorders {
    static RECORDERS: OnceLock<Recorders> = OnceLock::new();
    RECORDERS.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        let (region, baseline) = memfd_pair(producer_ring()).expect("a memfd ring");
        tx.send(Reader::new(region)).expect("the receiver is here");
        nexus_metrics::install(nexus_metrics::Config::new().source(BenchSource {
            readers: Mutex::new(tx),
            next_id: AtomicU32::new(1),
        }))
        .expect("nothing recorded before");
        let registry = Arc::new(Registry::atomic());
        metrics::set_global_recorder(AtomicRecorder(registry.clone()))
            .expect("no other metrics recorder");
        Recorders {
            consumer: Consumer::start(rx, registry),
            baseline: Mutex::new(baseline),
        }
    })
}

/// One producer-cost contender: `n` calls in laps, the consumer emptying between laps;
/// returns the time spent in the laps. The writer is the floor's own ring.
type ProducerRun = fn(&Consumer, &mut Writer<MemfdRegion>, u64) -> Duration;

/// The producer-cost contenders, in the order they run: each of ours next to its
/// `metrics` counterpart. Name, what the consumer empties, the run.
const PRODUCER_CONTENDERS: [(&str, u8, ProducerRun); 14] = [
    ("ring/Writer::push (floor)", MODE_RINGS, |c, w, n| {
        c.laps(n, LAP, |k| {
            for _ in 0..k {
                let _ = w.push(Record::counter(1, black_box(1)));
            }
        })
    }),
    // The floor with the write position published once every 8 records instead of once
    // a record: what publishing less often would save the producer.
    (
        "ring/Writer::stage, flush every 8",
        MODE_RINGS,
        |c, w, n| {
            c.laps(n, LAP, |k| {
                for i in 0..k {
                    let _ = w.stage(Record::counter(1, black_box(1)));
                    if i % 8 == 7 {
                        w.flush();
                    }
                }
                w.flush();
            })
        },
    ),
    ("nexus/counter!.increment", MODE_RINGS, |c, _, n| {
        c.laps(n, LAP, |k| {
            for _ in 0..k {
                nexus_metrics::counter!("bench.requests", "route" => "/a", "status" => "200")
                    .increment(black_box(1));
            }
        })
    }),
    ("metrics/counter!.increment", MODE_METRICS, |c, _, n| {
        c.laps(n, LAP, |k| {
            for _ in 0..k {
                metrics::counter!("bench.requests", "route" => "/a", "status" => "200")
                    .increment(black_box(1));
            }
        })
    }),
    ("nexus/Counter.increment", MODE_RINGS, |c, _, n| {
        let h = nexus_metrics::counter!("bench.requests", "route" => "/a", "status" => "200");
        c.laps(n, LAP, |k| {
            for _ in 0..k {
                h.increment(black_box(1));
            }
        })
    }),
    ("metrics/Counter.increment", MODE_METRICS, |c, _, n| {
        let h = metrics::counter!("bench.requests", "route" => "/a", "status" => "200");
        c.laps(n, LAP, |k| {
            for _ in 0..k {
                h.increment(black_box(1));
            }
        })
    }),
    ("nexus/histogram!.record", MODE_RINGS, |c, _, n| {
        let mut v = 0u64;
        c.laps(n, LAP, |k| {
            for _ in 0..k {
                v += 1;
                nexus_metrics::histogram!("bench.latency_ns", "route" => "/a")
                    .record(sample_value(black_box(v)));
            }
        })
    }),
    ("metrics/histogram!.record", MODE_METRICS, |c, _, n| {
        let mut v = 0u64;
        c.laps(n, LAP, |k| {
            for _ in 0..k {
                v += 1;
                metrics::histogram!("bench.latency_ns", "route" => "/a")
                    .record(sample_value(black_box(v)) as f64);
            }
        })
    }),
    ("nexus/Histogram.record", MODE_RINGS, |c, _, n| {
        let h = nexus_metrics::histogram!("bench.latency_ns", "route" => "/a");
        let mut v = 0u64;
        c.laps(n, LAP, |k| {
            for _ in 0..k {
                v += 1;
                h.record(sample_value(black_box(v)));
            }
        })
    }),
    ("metrics/Histogram.record", MODE_METRICS, |c, _, n| {
        let h = metrics::histogram!("bench.latency_ns", "route" => "/a");
        let mut v = 0u64;
        c.laps(n, LAP, |k| {
            for _ in 0..k {
                v += 1;
                h.record(sample_value(black_box(v)) as f64);
            }
        })
    }),
    ("nexus/4 handles, mixed", MODE_RINGS, |c, _, n| {
        let mix = NexusMix::new();
        let mut seq = 0u64;
        c.laps(n, LAP, |k| {
            for i in seq..seq + k {
                mix.record(black_box(i));
            }
            seq += k;
        })
    }),
    ("metrics/4 handles, mixed", MODE_METRICS, |c, _, n| {
        let mix = MetricsMix::new();
        let mut seq = 0u64;
        c.laps(n, LAP, |k| {
            for i in seq..seq + k {
                mix.record(black_box(i));
            }
            seq += k;
        })
    }),
    // Three records per span: a third as many calls per lap.
    ("nexus/span!_start_end", MODE_RINGS, |c, _, n| {
        c.laps(n, LAP / 3, |k| {
            for _ in 0..k {
                let span = nexus_metrics::span!("bench.span");
                black_box(&span);
            }
        })
    }),
    // What a span pays its clock: one `CLOCK_MONOTONIC` read of the span clock (a span
    // takes two, at its start and its end).
    ("clock/CLOCK_MONOTONIC read", MODE_RINGS, |c, _, n| {
        c.laps(n, LAP, |k| {
            for _ in 0..k {
                black_box(nexus_metrics::Clock::now_ns(&nexus_metrics::MonotonicClock));
            }
        })
    }),
];

/// Calls per contender per round of the interleaved pass (64 laps).
const INTERLEAVED_CALLS: u64 = 1 << 18;
/// Rounds of the interleaved `producer_cost` pass: many short rounds, so that the
/// per-round comparisons have a narrow confidence interval.
const PRODUCER_ROUNDS: usize = 101;

/// Each `nexus-metrics` contender's peer in the `metrics` crate.
const METRICS_PEERS: [(&str, &str); 5] = [
    ("nexus/counter!.increment", "metrics/counter!.increment"),
    ("nexus/Counter.increment", "metrics/Counter.increment"),
    ("nexus/histogram!.record", "metrics/histogram!.record"),
    ("nexus/Histogram.record", "metrics/Histogram.record"),
    ("nexus/4 handles, mixed", "metrics/4 handles, mixed"),
];

/// Prints the interleaved `producer_cost` pass: ns/call per contender; for ours, the
/// ns above the ring's push in the same round (the library's own share) and the
/// per-round ratio to the `metrics` crate's peer; and how many rounds were under the
/// 5 ns target.
fn print_producer_rounds(ns: &[Vec<f64>]) {
    let position = |name: &str| {
        PRODUCER_CONTENDERS
            .iter()
            .position(|(n, ..)| *n == name)
            .expect("a contender")
    };
    let floor = position("ring/Writer::push (floor)");
    let above_floor = |i: usize| {
        let mut d: Vec<f64> = ns[i].iter().zip(&ns[floor]).map(|(a, f)| a - f).collect();
        d.sort_by(f64::total_cmp);
        format!("{:.1}", d[d.len() / 2])
    };
    println!(
        "\ninterleaved producer_cost: {PRODUCER_ROUNDS} rounds x {INTERLEAVED_CALLS} calls per \
         contender, order rotated each round. ns/call median [min, max]; above the floor: \
         median per-round difference; ratio to the metrics crate's peer: median per-round \
         ratio (95 % CI) [p25, p75] and rounds below it."
    );
    println!("| contender | ns/call | rounds under 5 ns | ns above the floor | / metrics peer |");
    println!("| --- | --- | --- | --- | --- |");
    for (i, (name, ..)) in PRODUCER_CONTENDERS.iter().enumerate() {
        let peer = METRICS_PEERS
            .iter()
            .find(|(ours, _)| ours == name)
            .map(|(_, peer)| position(peer));
        let (above, versus) = match (name.starts_with("nexus/"), peer) {
            (true, Some(p)) => (above_floor(i), paired(&ns[i], &ns[p])),
            (true, None) => (above_floor(i), "-".to_owned()),
            _ => ("-".to_owned(), "-".to_owned()),
        };
        let under = ns[i].iter().filter(|v| **v < 5.0).count();
        println!(
            "| {name} | {} | {under}/{} | {above} | {versus} |",
            summary(&mut ns[i].clone()),
            ns[i].len()
        );
    }
}

fn producer_cost(c: &mut Criterion) {
    if !wanted("producer_cost") {
        return;
    }
    pin(PRODUCER_CPU);
    let rec = recorders();
    let consumer = &rec.consumer;
    let mut baseline = rec.baseline.lock().unwrap_or_else(PoisonError::into_inner);
    // Claim this thread's ring and register the keys before anything is measured.
    for (_, mode, run) in PRODUCER_CONTENDERS {
        consumer.set(mode);
        run(consumer, &mut baseline, 2 * LAP);
    }
    let before = nexus_metrics::stats();

    let mut group = c.benchmark_group("producer_cost");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (name, mode, run) in PRODUCER_CONTENDERS {
        group.bench_function(name, |b| {
            consumer.set(mode);
            b.iter_custom(|iters| run(consumer, &mut baseline, iters))
        });
    }
    group.finish();

    if want_interleaved("producer_cost") {
        let mut ns = vec![Vec::new(); PRODUCER_CONTENDERS.len()];
        let (rounds, n) = (PRODUCER_ROUNDS, PRODUCER_CONTENDERS.len());
        interleave("interleaved producer_cost", rounds, n, |i| {
            let (_, mode, run) = PRODUCER_CONTENDERS[i];
            consumer.set(mode);
            let took = run(consumer, &mut baseline, INTERLEAVED_CALLS);
            ns[i].push(took.as_secs_f64() * 1e9 / INTERLEAVED_CALLS as f64);
        });
        print_producer_rounds(&ns);
    }
    consumer.set(MODE_IDLE);

    let after = nexus_metrics::stats();
    let dropped = after.dropped_total() - before.dropped_total();
    let coalesced = after.coalesced - before.coalesced;
    eprintln!(
        "producer_cost: rings of {} records; nexus-metrics dropped {dropped} records and \
         coalesced {coalesced} increments; the consumer drained {} records and emptied {} \
         metrics histogram values",
        producer_ring(),
        // ORDERING: Relaxed: counters.
        consumer.shared.records.load(Ordering::Relaxed),
        consumer.shared.histogram_values.load(Ordering::Relaxed),
    );
    assert_eq!((dropped, coalesced), (0, 0), "every record found room");
}

// --- End to end ------------------------------------------------------------------------

/// Samples per measured round (a multiple of 4: the mix cycles through four series).
const E2E_SAMPLES_DEFAULT: u64 = 1 << 18;
/// Records per granted ring: room for a whole round, so the producer never finds its
/// ring full and nothing is dropped or coalesced (checked).
const E2E_RING_DEFAULT: u32 = 1 << 19;

/// `TELEMETRY_BENCH_E2E_SAMPLES` / `TELEMETRY_BENCH_E2E_RING` override the defaults above
/// (to compare ring sizes); the child inherits them.
fn e2e_samples() -> u64 {
    (env_or("TELEMETRY_BENCH_E2E_SAMPLES", E2E_SAMPLES_DEFAULT) / 4 * 4).max(4)
}

fn e2e_ring() -> u32 {
    env_or("TELEMETRY_BENCH_E2E_RING", E2E_RING_DEFAULT)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
/// Rounds of the interleaved end-to-end pass (a StatsD round takes about a second).
const E2E_INTERLEAVED_ROUNDS: usize = 7;
/// How long the parent waits on a child or the daemon before declaring it stuck.
const WAIT: Duration = Duration::from_secs(60);

/// The StatsD text of sample `i` of the mix (DogStatsD's tag syntax). Returns its length.
fn statsd_sample(i: u64, buf: &mut [u8; 128]) -> usize {
    let mut w = &mut buf[..];
    let _ = match i & 3 {
        0 => w.write_all(b"http.requests:1|c|#route:/a,status:200"),
        1 => write!(w, "http.latency_ns:{}|h|#route:/a", sample_value(i)),
        2 => w.write_all(b"http.requests:1|c|#route:/b,status:500"),
        _ => write!(w, "http.latency_ns:{}|h|#route:/b", sample_value(i)),
    };
    128 - w.len()
}

/// The child producer: records `n` samples of the mix on each command read from stdin
/// (a little-endian `u64`; 0 means exit), then answers with its counts of dropped
/// records and coalesced increments and the nanoseconds it spent recording.
fn child_main(kind: &str) -> io::Result<()> {
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    pin(PRODUCER_CPU);
    let socket = std::env::var_os(CHILD_SOCKET_ENV)
        .map(PathBuf::from)
        .ok_or_else(|| io::Error::other("no socket in the environment"))?;
    match kind {
        "nexus" => {
            nexus_metrics::install(
                nexus_metrics::Config::new()
                    .socket(socket)
                    .ring_capacity(e2e_ring()),
            )
            .map_err(io::Error::other)?;
            let mix = NexusMix::new();
            serve_rounds(
                |i| {
                    mix.record(i);
                    Ok(())
                },
                || {
                    nexus_metrics::flush_for(Duration::from_secs(5));
                    let stats = nexus_metrics::stats();
                    (stats.dropped_total(), stats.coalesced)
                },
            )
        }
        "statsd" => {
            let sender = UnixDatagram::unbound()?;
            sender.connect(&socket)?;
            let mut buf = [0u8; 128];
            serve_rounds(
                |i| {
                    let len = statsd_sample(i, &mut buf);
                    // Blocking: a full receive queue waits, so nothing is lost.
                    sender.send(&buf[..len]).map(|_| ())
                },
                || (0, 0),
            )
        }
        _ => Err(io::Error::other(format!("unknown child kind {kind}"))),
    }
}

/// The child's command loop: for each command `n` read from stdin, records samples
/// `seq..seq + n` of the mix with `record` (timed), then lets `settle` finish the round
/// and answers with the counts it returns (dropped, coalesced) and the recording time.
fn serve_rounds(
    mut record: impl FnMut(u64) -> io::Result<()>,
    mut settle: impl FnMut() -> (u64, u64),
) -> io::Result<()> {
    let mut stdin = io::stdin().lock();
    let mut stdout = io::stdout().lock();
    let mut seq = 0u64;
    loop {
        let mut word = [0u8; 8];
        stdin.read_exact(&mut word)?;
        let n = u64::from_le_bytes(word);
        if n == 0 {
            return Ok(());
        }
        let start = Instant::now();
        for i in seq..seq + n {
            record(i)?;
        }
        let took = start.elapsed().as_nanos() as u64;
        seq += n;
        let (dropped, coalesced) = settle();
        stdout.write_all(&dropped.to_le_bytes())?;
        stdout.write_all(&coalesced.to_le_bytes())?;
        stdout.write_all(&took.to_le_bytes())?;
        stdout.flush()?;
    }
}

/// A child producer process, told to exit (and killed) when dropped.
struct ChildProducer {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

impl ChildProducer {
    fn spawn(kind: &str, socket: &Path) -> io::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(CHILD_ENV, kind)
            .env(CHILD_SOCKET_ENV, socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// Tells the child to record `n` samples.
    fn command(&mut self, n: u64) {
        self.stdin
            .write_all(&n.to_le_bytes())
            .and_then(|()| self.stdin.flush())
            .expect("the child producer is gone");
    }

    /// Waits for the child to finish its command; returns its counts of dropped
    /// records and coalesced increments, and the nanoseconds it spent recording.
    fn wait_done(&mut self) -> (u64, u64, u64) {
        let mut done = [0u8; 24];
        self.stdout
            .read_exact(&mut done)
            .expect("the child producer did not finish its command");
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&done[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        (word(0), word(1), word(2))
    }
}

impl Drop for ChildProducer {
    fn drop(&mut self) {
        let _ = self.stdin.write_all(&0u64.to_le_bytes());
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Samples metricsd has aggregated into the mix's series.
fn aggregated(snapshot: &Snapshot) -> u64 {
    snapshot
        .series
        .iter()
        .filter(|s| &*s.name == "http.requests" || &*s.name == "http.latency_ns")
        .map(|s| s.samples)
        .sum()
}

/// What the rounds of one `end_to_end` contender measured, beyond criterion's times.
#[derive(Debug, Default)]
struct Rounds {
    /// Rounds run (warm-up included).
    rounds: u64,
    /// Time from the command to the last sample aggregated, summed.
    total_ns: u128,
    /// Time the child spent recording, summed.
    producer_ns: u128,
    /// Snapshots taken to see the end of a round (metricsd only).
    polls: u64,
}

impl Rounds {
    fn add(&mut self, elapsed: Duration, producer_ns: u64) {
        self.rounds += 1;
        self.total_ns += elapsed.as_nanos();
        self.producer_ns += u128::from(producer_ns);
    }

    fn report(&self, name: &str) {
        let samples = (self.rounds * e2e_samples()).max(1) as f64;
        eprintln!(
            "end_to_end/{name}: {} rounds; mean {:.1} ns per sample from command to aggregate, \
             of which the producer process spent {:.1} ns recording; {:.1} snapshots per round",
            self.rounds,
            self.total_ns as f64 / samples,
            self.producer_ns as f64 / samples,
            self.polls as f64 / self.rounds.max(1) as f64,
        );
    }
}

/// One round through metricsd: the time from the command to the child until every
/// sample of the round is aggregated.
fn metricsd_round(
    daemon: &DaemonHandle,
    child: &mut ChildProducer,
    base: &mut u64,
    stats: &mut Rounds,
) -> Duration {
    let target = *base + e2e_samples();
    let start = Instant::now();
    child.command(e2e_samples());
    loop {
        stats.polls += 1;
        let got = aggregated(&daemon.snapshot().expect("a snapshot"));
        if got >= target {
            assert_eq!(
                got, target,
                "metricsd aggregated more samples than recorded"
            );
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "metricsd stopped aggregating at {got}"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
    let elapsed = start.elapsed();
    let (dropped, coalesced, producer_ns) = child.wait_done();
    assert_eq!(
        (dropped, coalesced),
        (0, 0),
        "the producer's ring filled up"
    );
    *base = target;
    stats.add(elapsed, producer_ns);
    elapsed
}

/// What the StatsD-style receiver keeps per series.
enum Aggregate {
    Counter(u64),
    /// The same exponential histogram metricsd keeps.
    Histogram(Box<Exponential>),
}

/// A StatsD-style receiver: parses `name:value|type|#tags` and aggregates by name,
/// type and tags (the tags as sent: the producer already orders them).
struct StatsdAggregator {
    series: HashMap<Box<str>, Aggregate>,
    key: String,
    rejected: u64,
}

impl StatsdAggregator {
    fn new() -> Self {
        Self {
            series: HashMap::new(),
            key: String::with_capacity(128),
            rejected: 0,
        }
    }

    fn ingest(&mut self, datagram: &[u8]) {
        if self.parse(datagram).is_none() {
            self.rejected += 1;
        }
    }

    #[inline]
    fn parse(&mut self, datagram: &[u8]) -> Option<()> {
        let text = std::str::from_utf8(datagram).ok()?;
        let (name, rest) = text.split_once(':')?;
        let (value, rest) = rest.split_once('|')?;
        let (kind, tags) = match rest.split_once('|') {
            Some((kind, tags)) => (kind, tags.strip_prefix('#')?),
            None => (rest, ""),
        };
        let value: u64 = value.parse().ok()?;
        self.key.clear();
        self.key.push_str(name);
        self.key.push('|');
        self.key.push_str(kind);
        self.key.push('|');
        self.key.push_str(tags);
        if !self.series.contains_key(self.key.as_str()) {
            let fresh = match kind {
                "c" => Aggregate::Counter(0),
                "h" | "ms" | "d" => Aggregate::Histogram(Box::new(Exponential::new())),
                _ => return None,
            };
            self.series.insert(self.key.as_str().into(), fresh);
        }
        match self.series.get_mut(self.key.as_str())? {
            Aggregate::Counter(total) => *total += value,
            Aggregate::Histogram(h) => h.record(value),
        }
        Some(())
    }

    fn samples(&self) -> u64 {
        self.series
            .values()
            .map(|a| match a {
                Aggregate::Counter(total) => *total,
                Aggregate::Histogram(h) => h.count(),
            })
            .sum()
    }
}

/// One round through the StatsD-style receiver (this thread): the time from the command
/// to the child until every datagram of the round is parsed and aggregated.
fn statsd_round(
    socket: &UnixDatagram,
    child: &mut ChildProducer,
    aggregator: &mut StatsdAggregator,
    stats: &mut Rounds,
) -> Duration {
    let mut buf = [0u8; 256];
    let start = Instant::now();
    child.command(e2e_samples());
    for _ in 0..e2e_samples() {
        let len = socket.recv(&mut buf).expect("a datagram from the child");
        aggregator.ingest(&buf[..len]);
    }
    let elapsed = start.elapsed();
    let (_, _, producer_ns) = child.wait_done();
    stats.add(elapsed, producer_ns);
    elapsed
}

fn end_to_end(c: &mut Criterion) {
    if !wanted("end_to_end") {
        return;
    }
    // metricsd's threads, and the StatsD receiver, run on the consumer CPU.
    pin(CONSUMER_CPU);
    let dir = std::env::temp_dir().join(format!("pipeline-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let mut config = metricsd::Config {
        socket: dir.join("metricsd.sock"),
        logd_socket: dir.join("logd.sock"),
        ..metricsd::Config::default()
    };
    config.rings.capacity = e2e_ring();
    config.rings.max_capacity = config.rings.max_capacity.max(e2e_ring());
    let daemon = Daemon::new(config)
        .sink(MemorySink::new())
        .spawn()
        .expect("metricsd starts");
    daemon.wait_ready(WAIT).expect("metricsd ready");
    let mut nexus = ChildProducer::spawn("nexus", daemon.socket_path()).expect("spawn a child");

    let statsd_path = dir.join("statsd.sock");
    let statsd = UnixDatagram::bind(&statsd_path).expect("bind the StatsD socket");
    statsd.set_read_timeout(Some(WAIT)).expect("a read timeout");
    let mut statsd_child = ChildProducer::spawn("statsd", &statsd_path).expect("spawn a child");
    let mut aggregator = StatsdAggregator::new();

    // The first round claims the ring and registers the keys; it is not measured.
    let mut base = 0u64;
    let mut ours = Rounds::default();
    let mut theirs = Rounds::default();
    metricsd_round(&daemon, &mut nexus, &mut base, &mut ours);
    statsd_round(&statsd, &mut statsd_child, &mut aggregator, &mut theirs);

    let mut group = c.benchmark_group("end_to_end");
    group
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(e2e_samples()))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    group.bench_function("nexus_metrics->metricsd", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| metricsd_round(&daemon, &mut nexus, &mut base, &mut ours))
                .sum()
        })
    });
    group.bench_function("statsd_uds_datagram_per_sample", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| statsd_round(&statsd, &mut statsd_child, &mut aggregator, &mut theirs))
                .sum()
        })
    });
    group.finish();

    if want_interleaved("end_to_end") {
        let mut rates = [Vec::new(), Vec::new()];
        interleave("interleaved end_to_end", E2E_INTERLEAVED_ROUNDS, 2, |i| {
            let took = if i == 0 {
                metricsd_round(&daemon, &mut nexus, &mut base, &mut ours)
            } else {
                statsd_round(&statsd, &mut statsd_child, &mut aggregator, &mut theirs)
            };
            rates[i].push(e2e_samples() as f64 / took.as_secs_f64() / 1e6);
        });
        println!(
            "\ninterleaved end_to_end: {E2E_INTERLEAVED_ROUNDS} rounds x {} samples per \
             contender, order rotated each round; million samples/s, median [min, max]",
            e2e_samples()
        );
        println!("| design | M samples/s |");
        println!("| --- | --- |");
        println!("| nexus_metrics->metricsd | {} |", summary(&mut rates[0]));
        println!(
            "| statsd_uds_datagram_per_sample | {} |",
            summary(&mut rates[1])
        );
    }

    // Both sides hold exactly what was recorded.
    let per_series = |r: u64| r * e2e_samples() / 4;
    let snapshot = daemon.snapshot().expect("a snapshot");
    for s in snapshot
        .series
        .iter()
        .filter(|s| &*s.name == "http.requests" || &*s.name == "http.latency_ns")
    {
        match &s.value {
            Value::Counter { total } => {
                assert_eq!(*total, u128::from(per_series(ours.rounds)), "{}", s.id())
            }
            Value::Histogram(h) => {
                assert_eq!(h.count(), per_series(ours.rounds), "{}", s.id())
            }
            _ => panic!("unexpected series {}", s.id()),
        }
    }
    assert_eq!(aggregated(&snapshot), ours.rounds * e2e_samples());
    assert_eq!(aggregator.rejected, 0);
    assert_eq!(aggregator.series.len(), 4);
    assert_eq!(aggregator.samples(), theirs.rounds * e2e_samples());
    eprintln!(
        "end_to_end: exact totals on both sides ({} samples per round)",
        e2e_samples()
    );
    ours.report("nexus_metrics->metricsd");
    theirs.report("statsd_uds_datagram_per_sample");
    drop(nexus);
    drop(statsd_child);
    daemon.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

// --- metricsd drain --------------------------------------------------------------------

/// Rings the drainer serves (one per producing thread of a service).
const DRAIN_RINGS: usize = 4;
/// Records per drain ring.
const DRAIN_RING: u32 = 16384;
/// Records written into each ring per measured round (the whole ring).
const DRAIN_FILL: u64 = DRAIN_RING as u64;
/// Series per metric kind (label values `/r0`..`/r15`).
const SERIES: u32 = 16;
/// Key layout in every ring.
const COUNTER_KEY: u32 = 1;
const HISTOGRAM_KEY: u32 = COUNTER_KEY + SERIES;
const GAUGE_KEY: u32 = HISTOGRAM_KEY + SERIES;
const SPAN_KEY: u32 = GAUGE_KEY + SERIES;

/// The records of one drain variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mix {
    Counters,
    Histograms,
    /// Half counters, 3/8 histograms, 1/8 gauges.
    Mixed,
    /// Whole spans of the W3C model, three records each: `span_trace`, `span_open`,
    /// `span_close` (each close also observes the span's duration histogram). A fill
    /// holds 5461 spans and one gauge set (16384 is not a multiple of three).
    Spans,
}

/// Writes every key's registration into a ring, as the producer library does before a
/// key's first record there.
fn register_all(writer: &mut Writer<MemfdRegion>) {
    let routes: Vec<String> = (0..SERIES).map(|i| format!("/r{i}")).collect();
    let mut out = [Record::default(); MAX_REGISTER_RECORDS];
    let mut register = |key: u32, what: RegisterKind, name: &str, labels: &[(&str, &str)]| {
        let n = telemetry_abi::encode_registration(key, what, name, labels, &mut out)
            .expect("a valid registration");
        writer
            .push_all(&out[..n])
            .expect("room for the registrations");
    };
    for (i, route) in (0u32..).zip(&routes) {
        register(
            COUNTER_KEY + i,
            RegisterKind::COUNTER,
            "drain.requests",
            &[("route", route), ("status", "200")],
        );
        register(
            HISTOGRAM_KEY + i,
            RegisterKind::HISTOGRAM,
            "drain.latency_ns",
            &[("route", route)],
        );
        register(
            GAUGE_KEY + i,
            RegisterKind::GAUGE,
            "drain.queue_depth",
            &[("route", route)],
        );
    }
    register(SPAN_KEY, RegisterKind::SPAN, "drain.span", &[]);
}

/// Record `j` of `mix` in ring `ring` (0-based), whose span ids continue from
/// `span_base`. The rings share one producer connection, so span ids carry the ring in
/// their top bits to stay unique across them, as a producer's thread-mixed ids do.
#[inline]
fn mix_record(mix: Mix, ring: u64, j: u64, span_base: u64) -> Record {
    let series = (j % u64::from(SERIES)) as u32;
    match mix {
        Mix::Counters => Record::counter(COUNTER_KEY + series, 1),
        Mix::Histograms => Record::histogram(HISTOGRAM_KEY + series, sample_value(j)),
        Mix::Mixed => match j & 7 {
            0 | 2 | 4 | 6 => Record::counter(COUNTER_KEY + series, 1),
            1 | 3 | 5 => Record::histogram(HISTOGRAM_KEY + series, sample_value(j)),
            _ => Record::gauge(GAUGE_KEY + series, j as i64),
        },
        Mix::Spans => {
            let id = (ring + 1) << 40 | (span_base + j / 3 + 1);
            let start = 1_000 * (span_base + j / 3);
            match j % 3 {
                _ if j >= DRAIN_FILL - DRAIN_FILL % 3 => {
                    Record::gauge(GAUGE_KEY + series, j as i64)
                }
                0 => Record::span_trace(SPAN_KEY, id, u128::from(id) << 64 | 1, 1),
                1 => Record::span_open(SPAN_KEY, id, 0, start),
                _ => Record::span_close(SPAN_KEY, id, start + sample_value(j), SpanStatus::OK),
            }
        }
    }
}

/// The drain contenders.
const DRAIN_CONTENDERS: [(&str, Mix); 4] = [
    ("counters", Mix::Counters),
    ("histograms", Mix::Histograms),
    ("mix", Mix::Mixed),
    ("spans", Mix::Spans),
];

/// Fills the drain rings from the producer CPU on request.
struct Filler {
    commands: Sender<Mix>,
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl Filler {
    fn start(mut writers: Vec<Writer<MemfdRegion>>) -> Self {
        let (commands, rx) = mpsc::channel::<Mix>();
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            pin(PRODUCER_CPU);
            for w in &mut writers {
                register_all(w);
            }
            let _ = done_tx.send(());
            let mut span_base = 0u64;
            while let Ok(mix) = rx.recv() {
                for (ring, w) in (0u64..).zip(&mut writers) {
                    for j in 0..DRAIN_FILL {
                        // The drainer emptied the ring before asking: there is room.
                        let _ = w.stage(mix_record(mix, ring, j, span_base));
                    }
                    w.flush();
                }
                span_base += DRAIN_FILL;
                if done_tx.send(()).is_err() {
                    return;
                }
            }
        });
        Self {
            commands,
            done,
            thread: Some(thread),
        }
    }

    fn fill(&self, mix: Mix) {
        self.commands.send(mix).expect("the filler is running");
        self.done
            .recv_timeout(WAIT)
            .expect("the filler filled the rings");
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.commands, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One round: the rings filled (untimed), then `Drainer::pass` until they are empty.
fn drain_round(drainer: &mut Drainer, filler: &Filler, mix: Mix) -> Duration {
    filler.fill(mix);
    let want = DRAIN_RINGS as u64 * DRAIN_FILL;
    let mut consumed = 0;
    let start = Instant::now();
    while consumed < want {
        let n = drainer.pass();
        assert!(n > 0, "the rings hold records");
        consumed += n;
    }
    let elapsed = start.elapsed();
    assert_eq!(consumed, want);
    elapsed
}

fn metricsd_drain(c: &mut Criterion) {
    if !wanted("metricsd_drain") {
        return;
    }
    pin(CONSUMER_CPU);
    let config = metricsd::Config::default();
    let mut drainer = Drainer::new(
        &config,
        ExportQueue::new(config.export.queue_records),
        Arc::new(Mutex::new(GrantStats::default())),
    );
    let mut writers = Vec::new();
    for id in 0..DRAIN_RINGS {
        let (region, writer) = memfd_pair(DRAIN_RING).expect("a memfd ring");
        drainer.add_ring(NewRing {
            id: id as u32 + 1,
            connection: 1,
            service: Arc::from("bench"),
            region,
            epoch: 1,
            logged: None,
        });
        writers.push(writer);
    }
    let filler = Filler::start(writers);
    filler
        .done
        .recv_timeout(WAIT)
        .expect("the registrations are written");
    while drainer.pass() > 0 {}

    let mut group = c.benchmark_group("metricsd_drain");
    group
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(DRAIN_RINGS as u64 * DRAIN_FILL))
        .sample_size(20)
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(3));
    for (name, mix) in DRAIN_CONTENDERS {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| drain_round(&mut drainer, &filler, mix))
                    .sum()
            })
        });
    }
    group.finish();

    if want_interleaved("metricsd_drain") {
        let records = (DRAIN_RINGS as u64 * DRAIN_FILL) as f64;
        let mut rates = vec![Vec::new(); DRAIN_CONTENDERS.len()];
        let (rounds, n) = (INTERLEAVED_ROUNDS, DRAIN_CONTENDERS.len());
        interleave("interleaved metricsd_drain", rounds, n, |i| {
            // Several fills per round: one is only a millisecond.
            let took: Duration = (0..8)
                .map(|_| drain_round(&mut drainer, &filler, DRAIN_CONTENDERS[i].1))
                .sum();
            rates[i].push(8.0 * records / took.as_secs_f64() / 1e6);
        });
        println!(
            "\ninterleaved metricsd_drain: {INTERLEAVED_ROUNDS} rounds x 8 fills of {records} \
             records per contender, order rotated each round; million records/s, median \
             [min, max]"
        );
        println!("| records | M records/s |");
        println!("| --- | --- |");
        for (i, (name, _)) in DRAIN_CONTENDERS.iter().enumerate() {
            println!("| {name} | {} |", summary(&mut rates[i]));
        }
    }

    let snapshot = drainer.snapshot();
    assert_eq!(snapshot.rejects.total(), 0, "{:?}", snapshot.rejects);
    eprintln!(
        "metricsd_drain: {} records drained, {} series, no rejects",
        snapshot.drain.records,
        snapshot.series.len()
    );
}

/// Rings in the idle-pass bench: what `scale_1000_rings` grants.
const IDLE_RINGS: usize = 1000;

/// One `Drainer::pass` over 1000 granted rings that are all empty: the cost of each of
/// an idle metricsd's wake-ups (one load of each ring's write position, compared with
/// the reader's own read position).
fn metricsd_idle_pass(c: &mut Criterion) {
    if !wanted("metricsd_idle_pass") {
        return;
    }
    pin(CONSUMER_CPU);
    let config = metricsd::Config::default();
    let mut drainer = Drainer::new(
        &config,
        ExportQueue::new(config.export.queue_records),
        Arc::new(Mutex::new(GrantStats::default())),
    );
    // The writers stay alive: a ring whose writer is gone is still drained.
    let mut writers = Vec::with_capacity(IDLE_RINGS);
    for id in 0..IDLE_RINGS {
        let (region, writer) = memfd_pair(1024).expect("a memfd ring");
        drainer.add_ring(NewRing {
            id: id as u32 + 1,
            connection: 1 + id as u64 / 10,
            service: Arc::from("idle"),
            region,
            epoch: 1,
            logged: None,
        });
        writers.push(writer);
    }
    let mut group = c.benchmark_group("metricsd_idle_pass");
    group
        .throughput(Throughput::Elements(IDLE_RINGS as u64))
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("1000 empty rings", |b| {
        b.iter(|| assert_eq!(black_box(drainer.pass()), 0))
    });
    group.finish();
    drop(writers);
}

// --- Harness ---------------------------------------------------------------------------

/// Rounds of the interleaved passes.
const INTERLEAVED_ROUNDS: usize = 15;

/// The groups, as criterion names them.
const GROUPS: [&str; 4] = [
    "producer_cost",
    "end_to_end",
    "metricsd_drain",
    "metricsd_idle_pass",
];

/// The filters criterion was given: its arguments but the options and their values.
fn filters() -> Vec<String> {
    // Criterion's options that take a value as the next argument.
    const WITH_VALUE: [&str; 10] = [
        "--profile-time",
        "--warm-up-time",
        "--measurement-time",
        "--sample-size",
        "--save-baseline",
        "--baseline",
        "--noise-threshold",
        "--significance-level",
        "--confidence-level",
        "--nresamples",
    ];
    let mut filters: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if WITH_VALUE.contains(&arg.as_str()) {
            args.next();
        } else if !arg.starts_with("--") {
            filters.push(arg);
        }
    }
    filters
}

/// Whether `group` should set up at all: false only when every filter given names
/// another group (`-- metricsd_drain/spans`), so a run under `valgrind --tool=callgrind`
/// of one group does not also set up the others (their producers, child processes and
/// clock reads). Any other filter is criterion's to match, and every group sets up.
fn wanted(group: &str) -> bool {
    let filters = filters();
    filters.is_empty()
        || !filters.iter().all(|f| {
            GROUPS
                .iter()
                .any(|g| *g != group && (f == g || f.starts_with(&format!("{g}/"))))
        })
}

/// Criterion runs one benchmark after the other, and on a shared VM the cost of a
/// cache-line transfer between the two vCPUs drifts over seconds to minutes. After each
/// group, a plain full run also runs every contender of the group once per round, order
/// rotated, so all see the same mixture of conditions, and prints median [min, max].
/// With `TELEMETRY_BENCH_INTERLEAVED=1` and a filter (`-- producer_cost`), only the
/// passes of the groups whose names contain the filter run.
fn want_interleaved(group: &str) -> bool {
    match std::env::var(INTERLEAVED_ENV).as_deref() {
        Ok("1") => {
            let filters = filters();
            filters.is_empty() || filters.iter().any(|f| group.contains(f.as_str()))
        }
        Ok(_) => false,
        Err(_) => plain_full_run(),
    }
}

criterion_group!(
    benches,
    producer_cost,
    end_to_end,
    metricsd_drain,
    metricsd_idle_pass
);

fn main() -> ExitCode {
    if let Some(kind) = std::env::var_os(CHILD_ENV) {
        return match child_main(&kind.to_string_lossy()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pipeline bench child: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if std::env::var_os(NO_PIN_ENV).is_none() {
        eprintln!(
            "pipeline bench: producers pinned to CPU {PRODUCER_CPU}, consumers to CPU {CONSUMER_CPU}"
        );
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    ExitCode::SUCCESS
}
