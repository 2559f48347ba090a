//! Rollup history on disk: exact windows at every resolution, TTL and the disk bound
//! enforced by deleting whole segments, and replay after a torn tail or a corrupt
//! segment. Every test drives `Retention` with explicit times, as the drain loop does
//! at each export.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use metricsd::retention::{Query, Retention, RetentionConfig, Selector, read_points};
use metricsd::rollup::{Agg, Resolution, SECOND_NS, Sample};
use metricsd::segment::{self, Ending};

/// An hour boundary, ns since the Unix epoch.
const T0: u64 = 1_800_000_000 / 3600 * 3600 * SECOND_NS;

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn config(dir: &Path) -> RetentionConfig {
    RetentionConfig {
        dir: Some(dir.to_owned()),
        ..RetentionConfig::default()
    }
}

fn open(cfg: &RetentionConfig) -> Retention {
    Retention::open(cfg).expect("opens").expect("configured")
}

fn everything(selector: Selector, step_ns: u64) -> Query {
    Query {
        selector,
        since_ns: 1000 * 3600 * SECOND_NS,
        step_ns,
    }
}

const BOUNDS: &str = "1,2,4,+Inf";

/// What one export said: time, counter delta, gauge value, histogram cumulative counts.
struct Export {
    t: u64,
    delta: Option<u128>,
    gauge: Option<i64>,
    hist: Option<[u64; 4]>,
}

fn histogram_of(counts: &[u64; 4]) -> (u64, u128) {
    let count = counts.iter().sum();
    // The "sum" is a function of the counts, so windows can be checked by difference.
    let sum = counts
        .iter()
        .enumerate()
        .map(|(i, c)| u128::from(*c) * (1 << i))
        .sum();
    (count, sum)
}

fn feed(r: &mut Retention, exports: &[Export]) {
    for e in exports {
        if let Some(d) = e.delta {
            r.observe_sample("svc/counter/c{}", &Sample::Counter(d), e.t);
        }
        if let Some(g) = e.gauge {
            r.observe_sample("svc/gauge/g{}", &Sample::Gauge(g), e.t);
        }
        if let Some(h) = &e.hist {
            let (count, sum) = histogram_of(h);
            let s = r.histogram_sample("svc/histogram/h{}", BOUNDS, count, sum, h);
            r.observe_sample("svc/histogram/h{}", &s, e.t);
        }
        r.tick(e.t);
    }
}

fn exports(seed: u64, hours: u64) -> Vec<Export> {
    let mut rng = Rng(seed);
    let mut t = T0 + rng.below(SECOND_NS);
    let mut cumulative = [0u64; 4];
    let mut out = Vec::new();
    while t < T0 + hours * 3600 * SECOND_NS {
        let hist = (rng.below(3) > 0).then(|| {
            for c in &mut cumulative {
                *c += rng.below(5);
            }
            cumulative
        });
        out.push(Export {
            t,
            delta: (rng.below(4) > 0).then(|| u128::from(rng.below(1000))),
            gauge: (rng.below(3) > 0).then(|| rng.below(2001) as i64 - 1000),
            hist,
        });
        // Irregular intervals, sometimes with gaps longer than a 10 s window.
        t += if rng.below(50) == 0 {
            rng.below(40 * SECOND_NS)
        } else {
            SECOND_NS / 4 + rng.below(2 * SECOND_NS)
        };
    }
    out
}

/// The windows of `step` computed straight from the exports: counters summed, gauges
/// folded, histograms as the difference of the cumulative counts at the window's last
/// export and at the last export before the window.
fn expected(exports: &[Export], step: u64) -> [BTreeMap<u64, Agg>; 3] {
    let mut c = BTreeMap::new();
    let mut g: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
    let mut last_hist_before: BTreeMap<u64, [u64; 4]> = BTreeMap::new();
    let mut hist_end: BTreeMap<u64, [u64; 4]> = BTreeMap::new();
    let mut prev = [0u64; 4];
    for e in exports {
        let w = e.t - e.t % step;
        if let Some(d) = e.delta {
            *c.entry(w).or_insert(0u128) += d;
        }
        if let Some(v) = e.gauge {
            g.entry(w).or_default().push(v);
        }
        if let Some(h) = e.hist {
            last_hist_before.entry(w).or_insert(prev);
            hist_end.insert(w, h);
            prev = h;
        }
    }
    let counters = c
        .into_iter()
        .map(|(w, d)| (w, Agg::Counter { delta: d }))
        .collect();
    let gauges = g
        .into_iter()
        .map(|(w, vs)| {
            (
                w,
                Agg::Gauge {
                    last: *vs.last().expect("nonempty"),
                    min: *vs.iter().min().expect("nonempty"),
                    max: *vs.iter().max().expect("nonempty"),
                    sum: vs.iter().map(|v| i128::from(*v)).sum(),
                    count: vs.len() as u64,
                },
            )
        })
        .collect();
    let hists = hist_end
        .into_iter()
        .map(|(w, end)| {
            let before = last_hist_before[&w];
            let buckets: Vec<u64> = end.iter().zip(before).map(|(a, b)| a - b).collect();
            let (c1, s1) = histogram_of(&end);
            let (c0, s0) = histogram_of(&before);
            (
                w,
                Agg::Histogram {
                    bounds: Arc::from(BOUNDS),
                    count: c1 - c0,
                    sum: s1 - s0,
                    buckets: buckets.into_boxed_slice(),
                },
            )
        })
        .collect();
    [counters, gauges, hists]
}

fn answer(r: &Retention, series: &str, step: u64, now: u64) -> BTreeMap<u64, Agg> {
    let got = r
        .query(&everything(Selector::Series(series.to_owned()), step), now)
        .expect("a valid step");
    got.into_iter()
        .flat_map(|s| s.points)
        .collect::<BTreeMap<_, _>>()
}

#[test]
fn retention_rollups_are_exact_against_independently_computed_windows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let mut r = open(&cfg);
    let exports = exports(0x5eed, 3);
    feed(&mut r, &exports);
    let last = exports.last().expect("some").t;

    // Before the last windows close: the open ones answer from memory.
    let series = ["svc/counter/c{}", "svc/gauge/g{}", "svc/histogram/h{}"];
    for step in [10, 60, 300, 3600].map(|s| s * SECOND_NS) {
        let want = expected(&exports, step);
        for (i, s) in series.iter().enumerate() {
            assert_eq!(answer(&r, s, step, last + 1), want[i], "{s} step {step}");
        }
    }
    // Closed by time, then read back by a new store from disk alone.
    let later = last + 2 * 3600 * SECOND_NS;
    r.tick(later);
    r.close();
    let r = open(&cfg);
    assert_eq!(r.stats().replay_torn + r.stats().replay_corrupt, 0);
    for step in [10, 60, 120, 3600, 7200].map(|s| s * SECOND_NS) {
        let want = expected(&exports, step);
        for (i, s) in series.iter().enumerate() {
            assert_eq!(
                answer(&r, s, step, later),
                want[i],
                "{s} step {step} from disk"
            );
        }
    }
    // A step that no resolution divides is refused, naming the step.
    let e = r
        .query(
            &everything(Selector::Series(series[0].to_owned()), 15 * SECOND_NS),
            later,
        )
        .expect_err("15 s is not a multiple of 10 s");
    assert!(e.0.contains("step 15 s"), "{e}");
    // A label selector finds the series by name.
    let by_name = r
        .query(
            &everything(Selector::parse("c").expect("valid"), 3600 * SECOND_NS),
            later,
        )
        .expect("valid");
    assert_eq!(by_name.len(), 1);
    assert_eq!(&*by_name[0].series, series[0]);
}

/// Total bytes of every segment file under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    for res in Resolution::ALL {
        for (_, path) in segment::list(dir, res).expect("lists") {
            n += fs::metadata(&path).expect("exists").len();
        }
    }
    n
}

fn counters_every_second(
    r: &mut Retention,
    series: usize,
    seconds: u64,
    mut each: impl FnMut(&Retention, u64),
) {
    for s in 0..seconds {
        let t = T0 + s * SECOND_NS;
        for i in 0..series {
            r.observe_sample(
                &format!("svc/counter/c{{i=\"{i}\"}}"),
                &Sample::Counter(1),
                t,
            );
        }
        r.tick(t);
        each(r, t);
    }
}

#[test]
fn retention_disk_stays_under_its_bound_by_deleting_whole_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = RetentionConfig {
        segment_bytes: 4096,
        max_bytes: 4 * 4096,
        ..config(dir.path())
    };
    let mut r = open(&cfg);
    let mut max_seen = 0;
    counters_every_second(&mut r, 20, 3600, |r, _| {
        let bytes = disk_bytes(dir.path());
        assert!(bytes <= cfg.max_bytes, "{bytes} bytes on disk");
        // The store's count is the files plus the trailers reserved for unsealed ones.
        assert_eq!(bytes + unsealed_reserve(dir.path()), r.stats().bytes);
        max_seen = max_seen.max(bytes);
    });
    let stats = r.stats().clone();
    assert!(stats.deleted_bound > 0, "{stats:?}");
    assert!(
        max_seen > cfg.max_bytes / 2,
        "the bound was approached: {max_seen}"
    );
    // What is left is whole segments: every file scans clean (sealed, or the one being
    // written), and the 10 s windows left are the newest, without holes.
    let seqs: Vec<u64> = segment::list(dir.path(), Resolution(0))
        .expect("lists")
        .into_iter()
        .map(|(seq, path)| {
            let scan = segment::scan(&path).expect("reads");
            assert!(
                matches!(scan.ending, Ending::Sealed | Ending::Dirty),
                "{path:?}: {:?}",
                scan.ending
            );
            seq
        })
        .collect();
    assert!(!seqs.is_empty());
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "a contiguous run: {seqs:?}"
    );
    let points = read_points(dir.path(), Resolution(0), |s| s == "svc/counter/c{i=\"3\"}");
    let starts: Vec<u64> = points.iter().map(|p| p.start_ns).collect();
    assert!(
        starts.windows(2).all(|w| w[1] == w[0] + 10 * SECOND_NS),
        "no holes"
    );
    assert!(points.iter().all(|p| p.agg == Agg::Counter { delta: 10 }));
    assert_eq!(
        *starts.last().expect("some"),
        T0 + 3600 * SECOND_NS - 20 * SECOND_NS
    );
}

/// The trailer bytes reserved for unsealed segments, which the store counts and the
/// files do not hold yet.
fn unsealed_reserve(dir: &Path) -> u64 {
    let mut n = 0;
    for res in Resolution::ALL {
        for (_, path) in segment::list(dir, res).expect("lists") {
            if segment::scan(&path).expect("reads").ending == Ending::Dirty {
                n += segment::TRAILER;
            }
        }
    }
    n
}

#[test]
fn retention_ttl_deletes_whole_segments_per_resolution() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = RetentionConfig {
        segment_bytes: 4096,
        max_bytes: 1 << 30,
        ttl_10s_s: 120,
        ttl_1m_s: 1200,
        ttl_1h_s: 3600 * 24,
        ..config(dir.path())
    };
    let mut r = open(&cfg);
    let seconds = 2 * 3600;
    counters_every_second(&mut r, 5, seconds, |_, _| {});
    let now = T0 + (seconds - 1) * SECOND_NS;
    assert!(r.stats().deleted_ttl > 0, "{:?}", r.stats());
    for (res, ttl) in [(Resolution(0), 120), (Resolution(1), 1200)] {
        let files = segment::list(dir.path(), res).expect("lists");
        let seqs: Vec<u64> = files.iter().map(|(s, _)| *s).collect();
        assert!(
            seqs[0] > 0,
            "{}: the oldest segments were deleted",
            res.name()
        );
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "whole segments from the front"
        );
        // Every segment left holds a window younger than the TTL: a segment goes
        // whole, when its newest window expires.
        for (_, path) in &files {
            let scan = segment::scan(path).expect("reads");
            let newest_end = scan
                .points
                .iter()
                .map(|p| p.start_ns + res.step_ns())
                .max()
                .expect("not empty");
            assert!(
                newest_end + ttl * SECOND_NS > now,
                "{path:?} should have expired"
            );
        }
        let points = read_points(dir.path(), res, |s| s == "svc/counter/c{i=\"0\"}");
        let oldest = points.first().expect("recent windows kept").start_ns;
        assert!(
            oldest + ttl * SECOND_NS < now + 30 * res.step_ns(),
            "{}: oldest window {} s before now",
            res.name(),
            (now - oldest) / SECOND_NS
        );
    }
    // The hourly windows are all there (TTL a day).
    let hours = read_points(dir.path(), Resolution(2), |s| s == "svc/counter/c{i=\"0\"}");
    assert_eq!(hours.len(), 1, "the first hour closed; the second is open");
    assert_eq!(hours[0].agg, Agg::Counter { delta: 3600 });
}

/// Writes a few minutes of one counter and "crashes" (drops the store unsealed).
fn crashed_store(cfg: &RetentionConfig, seconds: u64) -> u64 {
    let mut r = open(cfg);
    for s in 0..seconds {
        let t = T0 + s * SECOND_NS;
        r.observe_sample("svc/counter/c{}", &Sample::Counter(u128::from(s)), t);
        r.tick(t);
    }
    drop(r);
    T0 + seconds * SECOND_NS
}

fn ten_second_windows(dir: &Path) -> Vec<(u64, Agg)> {
    read_points(dir, Resolution(0), |_| true)
        .into_iter()
        .map(|p| (p.start_ns, p.agg))
        .collect()
}

#[test]
fn retention_replay_after_a_torn_tail_is_idempotent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    crashed_store(&cfg, 300);
    let before = ten_second_windows(dir.path());
    assert_eq!(before.len(), 29, "windows closed before the crash");
    // A frame cut short at the end of the dirty segment, as a crash mid-write leaves.
    let (_, path) = segment::list(dir.path(), Resolution(0))
        .expect("lists")
        .pop()
        .expect("one");
    let good_len = fs::metadata(&path).expect("exists").len();
    let mut frame = Vec::new();
    segment::encode_frame(
        &metricsd::rollup::Point {
            series: Arc::from("svc/counter/c{}"),
            resolution: Resolution(0),
            start_ns: T0 + 1000 * SECOND_NS,
            agg: Agg::Counter { delta: 5 },
        },
        &mut frame,
    );
    let mut bytes = fs::read(&path).expect("reads");
    bytes.extend_from_slice(&frame[..frame.len() - 3]);
    fs::write(&path, &bytes).expect("writes");

    let r = open(&cfg);
    assert_eq!(r.stats().replay_torn, 1, "{:?}", r.stats());
    assert!(
        r.health()
            .iter()
            .any(|(_, name, labels, v)| *name == "metricsd.retention.replay"
                && labels[0].1 == "torn_tail"
                && *v == 1)
    );
    assert_eq!(
        ten_second_windows(dir.path()),
        before,
        "the good frames kept"
    );
    let scan = segment::scan(&path).expect("reads");
    assert_eq!(scan.ending, Ending::Sealed, "cut and sealed");
    assert_eq!(scan.file_len, good_len + segment::TRAILER);
    drop(r);
    // Replayed again: clean, the same windows.
    let mut r = open(&cfg);
    assert_eq!((r.stats().replay_torn, r.stats().replay_corrupt), (0, 0));
    assert_eq!(ten_second_windows(dir.path()), before);
    // And it goes on writing, into a new segment.
    r.observe_sample("svc/counter/c{}", &Sample::Counter(7), T0 + 400 * SECOND_NS);
    r.tick(T0 + 420 * SECOND_NS);
    let after = ten_second_windows(dir.path());
    assert_eq!(after.len(), before.len() + 1);
    assert_eq!(
        after.last(),
        Some(&(T0 + 400 * SECOND_NS, Agg::Counter { delta: 7 }))
    );
}

#[test]
fn retention_replay_after_a_corrupt_segment_keeps_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = RetentionConfig {
        segment_bytes: 4096,
        ..config(dir.path())
    };
    crashed_store(&cfg, 3000);
    let before = ten_second_windows(dir.path());
    let files = segment::list(dir.path(), Resolution(0)).expect("lists");
    assert!(files.len() >= 4, "{files:?}");
    // A flipped byte in the middle of the second segment, and a bad header in the third.
    let mut second = fs::read(&files[1].1).expect("reads");
    let mid = second.len() / 2;
    second[mid] ^= 0x10;
    fs::write(&files[1].1, &second).expect("writes");
    let mut third = fs::read(&files[2].1).expect("reads");
    third[0] ^= 0xff;
    fs::write(&files[2].1, &third).expect("writes");
    // What should survive: every other segment whole, the second up to the damage.
    let mut want: Vec<(u64, Agg)> = Vec::new();
    for (i, (_, path)) in files.iter().enumerate() {
        if i == 2 {
            continue;
        }
        let scan = segment::scan_bytes(&fs::read(path).expect("reads"));
        if i == 1 {
            assert!(
                matches!(scan.ending, Ending::Corrupt { .. }),
                "{:?}",
                scan.ending
            );
            assert!(!scan.points.is_empty(), "the damage is mid-segment");
        }
        want.extend(scan.points.into_iter().map(|p| (p.start_ns, p.agg)));
    }
    want.sort_by_key(|(t, _)| *t);
    assert!(want.len() < before.len());

    let r = open(&cfg);
    let stats = r.stats().clone();
    assert_eq!(stats.replay_corrupt, 2, "{stats:?}");
    let health = r.health();
    assert!(
        health
            .iter()
            .any(|(_, name, labels, v)| *name == "metricsd.retention.replay"
                && labels[0].1 == "corrupt"
                && *v == 2),
        "{health:?}"
    );
    assert!(
        !files[2].1.exists(),
        "a segment with an unreadable header is deleted"
    );
    let after = ten_second_windows(dir.path());
    assert_eq!(after, want);
    // Replay again: nothing new to report, the same windows.
    drop(r);
    let r = open(&cfg);
    assert_eq!((r.stats().replay_torn, r.stats().replay_corrupt), (0, 0));
    assert_eq!(ten_second_windows(dir.path()), after);
}

#[test]
fn retention_a_series_that_expires_and_returns_within_a_window_keeps_both_parts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let mut r = open(&cfg);
    let id = "svc/counter/c{}";
    r.observe_sample(id, &Sample::Counter(3), T0 + SECOND_NS);
    r.tick(T0 + SECOND_NS);
    // Expired: its open windows are closed and written now.
    r.forget(id);
    r.tick(T0 + 2 * SECOND_NS);
    // Back within the same 10 s window (and minute, and hour).
    r.observe_sample(id, &Sample::Counter(4), T0 + 5 * SECOND_NS);
    r.tick(T0 + 5 * SECOND_NS);
    for step in [10, 60, 3600] {
        let got = answer(&r, id, step * SECOND_NS, T0 + 6 * SECOND_NS);
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            [(T0, Agg::Counter { delta: 7 })],
            "step {step} s: disk and memory merged"
        );
    }
    r.tick(T0 + 3600 * SECOND_NS);
    r.close();
    let r = open(&cfg);
    let got = answer(&r, id, 10 * SECOND_NS, T0 + 7200 * SECOND_NS);
    assert_eq!(
        got.into_iter().collect::<Vec<_>>(),
        [(T0, Agg::Counter { delta: 7 })]
    );
}
