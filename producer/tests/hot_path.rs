//! A rough sanity check of the hot path's cost, not a benchmark (those live in
//! `benches/`) and not a timing assertion: it prints nanoseconds per call and checks
//! only that every record arrived.
//!
//! `cargo test -p nexus-metrics --release --test hot_path -- --ignored --nocapture`
//!
//! Each measurement runs laps that fit in the ring (so nothing drains during a lap and
//! every record takes the fast path); the main thread drains between laps, as metricsd
//! would from another core. The baseline is the ring's own `Writer::push` on a ring of
//! the same size, drained the same way: the floor the library adds to.

mod common;

use std::hint::black_box;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::{Server, sum, watchdog};
use nexus_metrics::{Clock, Config, MonotonicClock, RegisterKind, counter, histogram, span};
use telemetry_abi::{Geometry, Record};
use telemetry_ring::{MemfdRegion, Reader, Writer};

/// Ring capacity in records (128 KiB of records).
const CAPACITY: u32 = 4096;
/// Records per lap.
const LAP: u64 = CAPACITY as u64 - 64;
/// Timed laps per measurement (after one untimed lap).
const LAPS: u64 = 512;

/// Runs `lap` once untimed and `LAPS` times timed, calling `drain` after each; prints
/// the mean and the best lap per call.
fn measure(what: &str, records_per_call: u64, lap: &mut dyn FnMut(u64), drain: &dyn Fn()) {
    let calls = LAP / records_per_call;
    let (mut timed, mut best) = (Duration::ZERO, Duration::MAX);
    for i in 0..=LAPS {
        let start = Instant::now();
        lap(calls);
        let took = start.elapsed();
        if i > 0 {
            timed += took;
            best = best.min(took);
        }
        drain();
    }
    println!(
        "{what:36} mean {:6.2} ns/call, best lap {:6.2} ns/call",
        timed.as_nanos() as f64 / (LAPS * calls) as f64,
        best.as_nanos() as f64 / calls as f64
    );
}

#[test]
#[ignore = "prints timings; run with --release --ignored --nocapture"]
fn hot_path_cost() {
    let _dog = watchdog(Duration::from_secs(120));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metricsd.sock");
    let server = Server::start(&path, CAPACITY);
    nexus_metrics::install(Config::new().socket(&path)).expect("first install");

    let geometry = Geometry::new(u64::from(CAPACITY)).expect("capacity");
    let baseline = Arc::new(MemfdRegion::create("baseline", geometry, 1).expect("memfd"));
    let baseline_reader = Mutex::new(Reader::new(Arc::clone(&baseline)));

    let (lap_done, lap_done_rx) = mpsc::channel::<()>();
    let (drained, drained_rx) = mpsc::channel::<()>();
    let producer = std::thread::spawn(move || {
        let drain = || {
            lap_done.send(()).expect("main drains");
            drained_rx.recv().expect("main drains");
        };
        let mut writer = Writer::new(baseline);
        measure(
            "baseline: Writer::push (no library)",
            1,
            &mut |n| {
                for _ in 0..n {
                    let _ = writer.push(Record::counter(1, black_box(1)));
                }
            },
            &drain,
        );
        measure(
            "counter!(literal).increment",
            1,
            &mut |n| {
                for _ in 0..n {
                    counter!("hot.counter", "route" => "/a").increment(black_box(1));
                }
            },
            &drain,
        );
        let handle = counter!("hot.counter", "route" => "/a");
        measure(
            "Counter handle .increment",
            1,
            &mut |n| {
                for _ in 0..n {
                    handle.increment(black_box(1));
                }
            },
            &drain,
        );
        measure(
            "histogram!(literal).record",
            1,
            &mut |n| {
                for i in 0..n {
                    histogram!("hot.histogram").record(black_box(i));
                }
            },
            &drain,
        );
        measure(
            "span!(literal) start+end",
            2,
            &mut |n| {
                for _ in 0..n {
                    let _s = span!("hot.span");
                }
            },
            &drain,
        );
        measure(
            "MonotonicClock::now_ns (vDSO)",
            1,
            &mut |n| {
                for _ in 0..n {
                    black_box(MonotonicClock.now_ns());
                }
            },
            &drain,
        );
    });
    while lap_done_rx.recv().is_ok() {
        server.drain();
        let _ = baseline_reader.lock().expect("lock").drain(u64::MAX, |r| {
            black_box(r);
        });
        if drained.send(()).is_err() {
            break;
        }
    }
    producer.join().expect("producer");

    server.find(RegisterKind::COUNTER, "hot.counter", |ring, key| {
        assert_eq!(sum(&ring.records_of(key)), 2 * (LAPS + 1) * LAP);
        assert_eq!(ring.producer_dropped, 0);
    });
}
