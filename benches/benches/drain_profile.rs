//! Not a timing bench: the drain loop of `pipeline`'s `metricsd_drain`, alone, for
//! instruction counts under callgrind (which cannot run the `pipeline` binary: its
//! producer benches read the clock through the vDSO, which valgrind does not map).
//!
//! One thread fills four memfd rings of 16384 records with one mix (the same keys and
//! values as `metricsd_drain`), then `Drainer::pass` empties them; `ROUNDS` times.
//!
//! ```sh
//! cargo bench -p telemetry-benches --bench drain_profile --no-run
//! valgrind --tool=callgrind --toggle-collect='*Drainer*pass*' \
//!     target/release/deps/drain_profile-<hash> histograms 20
//! ```
//!
//! Instructions per record = the collected `Ir` / the records it prints. Arguments:
//! the mix (`counters`, `histograms`, `mix`), then the rounds (default 20). Run by
//! `cargo bench` with no arguments it drains one round of each mix and checks the totals.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use metricsd::Value;
use metricsd::drain::{Drainer, NewRing};
use metricsd::export::ExportQueue;
use metricsd::snapshot::GrantStats;
use telemetry_abi::{Geometry, MAX_REGISTER_RECORDS, Record, RegisterKind};
use telemetry_ring::{MemfdRegion, Writer};

const RINGS: usize = 4;
const RING: u32 = 16384;
const SERIES: u32 = 16;
const COUNTER_KEY: u32 = 1;
const HISTOGRAM_KEY: u32 = COUNTER_KEY + SERIES;
const GAUGE_KEY: u32 = HISTOGRAM_KEY + SERIES;

/// The `pipeline` bench's observation values: spread over about a power of two.
fn sample_value(i: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 44) + 100
}

fn record(mix: &str, j: u64) -> Record {
    let series = (j % u64::from(SERIES)) as u32;
    match mix {
        "counters" => Record::counter(COUNTER_KEY + series, 1),
        "histograms" => Record::histogram(HISTOGRAM_KEY + series, sample_value(j)),
        _ => match j & 7 {
            0 | 2 | 4 | 6 => Record::counter(COUNTER_KEY + series, 1),
            1 | 3 | 5 => Record::histogram(HISTOGRAM_KEY + series, sample_value(j)),
            _ => Record::gauge(GAUGE_KEY + series, j as i64),
        },
    }
}

fn register_all(w: &mut Writer<MemfdRegion>) {
    let mut out = [Record::default(); MAX_REGISTER_RECORDS];
    for i in 0..SERIES {
        let route = format!("/r{i}");
        for (key, what, name, labels) in [
            (
                COUNTER_KEY + i,
                RegisterKind::COUNTER,
                "drain.requests",
                vec![("route", route.as_str()), ("status", "200")],
            ),
            (
                HISTOGRAM_KEY + i,
                RegisterKind::HISTOGRAM,
                "drain.latency_ns",
                vec![("route", route.as_str())],
            ),
            (
                GAUGE_KEY + i,
                RegisterKind::GAUGE,
                "drain.queue_depth",
                vec![("route", route.as_str())],
            ),
        ] {
            let n = telemetry_abi::encode_registration(key, what, name, &labels, &mut out)
                .expect("a valid registration");
            w.push_all(&out[..n]).expect("room for the registrations");
        }
    }
}

fn run(mix: &str, rounds: u64) -> u64 {
    let config = metricsd::Config::default();
    let mut drainer = Drainer::new(
        &config,
        ExportQueue::new(config.export.queue_records),
        Arc::new(Mutex::new(GrantStats::default())),
    );
    let mut writers = Vec::new();
    for id in 0..RINGS {
        let geometry = Geometry::new(u64::from(RING)).expect("a power of two");
        let region = MemfdRegion::create("drain-profile", geometry, 1).expect("memfd");
        let fd = region.fd().try_clone_to_owned().expect("dup");
        let mut writer = Writer::new(MemfdRegion::attach(fd).expect("attach"));
        register_all(&mut writer);
        drainer.add_ring(NewRing {
            id: id as u32 + 1,
            connection: 1,
            service: Arc::from("bench"),
            region,
        });
        writers.push(writer);
    }
    while drainer.pass() > 0 {}
    let mut drained = 0;
    for _ in 0..rounds {
        for w in &mut writers {
            for j in 0..u64::from(RING) {
                w.stage(record(mix, j))
                    .expect("the drainer emptied the ring");
            }
            w.flush();
        }
        loop {
            let n = drainer.pass();
            if n == 0 {
                break;
            }
            drained += n;
        }
    }
    let snapshot = drainer.snapshot();
    assert_eq!(snapshot.rejects.total(), 0, "{:?}", snapshot.rejects);
    let aggregated: u64 = snapshot.series.iter().map(|s| s.samples).sum();
    assert_eq!(aggregated, drained, "every record aggregated");
    let counted: u128 = snapshot
        .series
        .iter()
        .map(|s| match &s.value {
            Value::Counter { total } => *total,
            Value::Histogram(h) => u128::from(h.count()),
            _ => 0,
        })
        .sum();
    let gauges = if mix == "mix" { drained / 8 } else { 0 };
    assert_eq!(counted + u128::from(gauges), u128::from(drained));
    drained
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mixes: Vec<&str> = match args.first().map(String::as_str) {
        Some(m @ ("counters" | "histograms" | "mix")) => vec![m],
        Some(other) => {
            eprintln!("drain_profile: unknown mix {other:?}: expected counters, histograms or mix");
            return ExitCode::FAILURE;
        }
        None => vec!["counters", "histograms", "mix"],
    };
    let rounds = match args.get(1).map(|r| r.parse::<u64>()) {
        None => 1,
        Some(Ok(r)) => r,
        Some(Err(_)) => {
            eprintln!("drain_profile: rounds must be a number");
            return ExitCode::FAILURE;
        }
    };
    for mix in mixes {
        let drained = run(mix, rounds);
        println!("drain_profile: {mix}: {drained} records drained and aggregated");
    }
    ExitCode::SUCCESS
}
