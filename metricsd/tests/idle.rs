//! An idle metricsd sleeps: the real binary with 1 000 granted rings and no traffic
//! wakes at most 20 times a second (counted by the kernel over 10 s), and a record
//! written after the silence is still aggregated and exported.

mod common;

use std::time::{Duration, Instant};

use common::{Control, Ring, Serving, start_logd};
use telemetry_abi::{Record, RegisterKind};

/// Rings granted: ten connections of a hundred rings each.
const CONNECTIONS: usize = 10;
const RINGS_PER_CONNECTION: usize = 100;
/// The measured window.
const WINDOW: Duration = Duration::from_secs(10);
/// The bound under test: wake-ups per second, all threads together.
const MAX_WAKEUPS_PER_SEC: u64 = 20;

/// Voluntary context switches (a thread went to sleep: each wake-up ends one) and CPU
/// nanoseconds of every thread of `pid`. Involuntary switches are preemptions by other
/// work on a busy machine, not wake-ups, and are left out.
fn usage(pid: u32) -> (u64, u64) {
    let (mut switches, mut cpu_ns) = (0, 0);
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
    for task in tasks.flatten() {
        let dir = task.path();
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue; // a thread that just ended
        };
        for line in status.lines() {
            if let Some(n) = line.strip_prefix("voluntary_ctxt_switches:") {
                switches += n.trim().parse::<u64>().expect("a count");
            }
        }
        if let Ok(s) = std::fs::read_to_string(dir.join("schedstat")) {
            cpu_ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .expect("schedstat starts with the time on CPU");
        }
    }
    (switches, cpu_ns)
}

#[test]
fn idle_wakeups_of_a_metricsd_with_1000_rings_stay_under_20_a_second() {
    common::watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let logd = start_logd(&dir.path().join("logd.sock"));
    let daemon = Serving::start(
        dir.path(),
        &format!(
            "[rings]\ncapacity = 1024\nper_service = 1000\ngrant_burst = {RINGS_PER_CONNECTION}\n"
        ),
    );
    let pid = daemon.pid();

    let socket = dir.path().join("metricsd.sock");
    let controls: Vec<Control> = (0..CONNECTIONS)
        .map(|_| Control::connect(&socket))
        .collect();
    let mut rings: Vec<Ring> = Vec::new();
    let granting = Instant::now();
    for c in &controls {
        for _ in 0..RINGS_PER_CONNECTION {
            rings.push(c.ring(0));
        }
    }
    assert_eq!(rings.len(), CONNECTIONS * RINGS_PER_CONNECTION);
    println!(
        "{} rings granted one after the other in {:.0} ms",
        rings.len(),
        granting.elapsed().as_secs_f64() * 1e3
    );

    // Let the drain loop reach its idle sleep (one second of empty passes), then count.
    std::thread::sleep(Duration::from_millis(1500));
    let (s0, c0) = usage(pid);
    let t0 = Instant::now();
    std::thread::sleep(WINDOW);
    let (s1, c1) = usage(pid);
    let secs = t0.elapsed().as_secs_f64();
    let wakeups = s1 - s0;
    let cpu_share = (c1 - c0) as f64 / (secs * 1e9) * 100.0;
    println!(
        "idle metricsd, {} rings: {wakeups} wake-ups (voluntary context switches) in {secs:.1} s ({:.1}/s), \
         {:.3} ms on CPU ({cpu_share:.4} % of a core)",
        rings.len(),
        wakeups as f64 / secs,
        (c1 - c0) as f64 / 1e6,
    );
    assert!(
        wakeups <= MAX_WAKEUPS_PER_SEC * WINDOW.as_secs(),
        "{wakeups} wake-ups in {} s; the bound is {MAX_WAKEUPS_PER_SEC} a second",
        WINDOW.as_secs()
    );

    // After the silence, one counter increment in the last ring is drained and exported.
    let ring = rings.last_mut().expect("rings");
    ring.register(1, RegisterKind::COUNTER, "idle.wakeup", &[]);
    ring.push(Record::counter(1, 41));
    let written = Instant::now();
    let mut client = logd::Client::connect(dir.path().join("logd.sock")).expect("logd");
    let deadline = written + Duration::from_secs(20);
    let value = loop {
        let page = client
            .query(&logd::Query::new().field("metric", "idle.wakeup"))
            .expect("query");
        if let Some(v) = page
            .records
            .iter()
            .rev()
            .find_map(|r| r.record.get("value").map(str::to_owned))
        {
            break v;
        }
        assert!(Instant::now() < deadline, "the record was never exported");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(value, "41");
    println!(
        "a record written after the silence was in logd {:.0} ms later",
        written.elapsed().as_secs_f64() * 1e3
    );
    drop(controls);
    drop(logd);
}
