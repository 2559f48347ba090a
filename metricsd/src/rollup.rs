//! Rollups: per series, aggregates over fixed windows at three resolutions (10 s,
//! 1 min, 1 h), built from what each export says about the series.
//!
//! Every export carries, per changed series, what happened in its window: a counter's
//! delta, a gauge's last value, a histogram's cumulative bucket counts. A rollup window
//! of step `s` starting at `t` (a multiple of `s`, ns since the Unix epoch) takes every
//! export whose window *ends* in `[t, t + s)`:
//!
//! | kind | rollup |
//! | --- | --- |
//! | counter | the sum of the deltas |
//! | gauge | the last, min, max and mean of the values exported (one per export) |
//! | histogram, span duration (configured layout) | the observations' count, sum and per-bucket counts within the window (differences of the cumulative counts, merged bucket-wise) |
//! | histogram, span duration (exponential) | the window's observations as an exponential histogram: the cumulative one less the previous export's, taken at the current scale (the previous one downscaled exactly first); windows merge with [`Exponential::merge`], which downscales the finer exactly |
//!
//! A gauge's min, max and mean are over the values the exports carried (one per export
//! interval in which the gauge was set), not over every set between them.
//!
//! Windows are closed (and handed to the segment store) once time has passed their end;
//! a closed window of a series never changes again.

use std::sync::Arc;

use crate::histogram::{Buckets, Exponential};

/// A resolution: its index (0, 1, 2), its step and its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resolution(pub u8);

impl Resolution {
    /// Every resolution, finest first.
    pub const ALL: [Self; 3] = [Self(0), Self(1), Self(2)];

    /// The window length, ns.
    pub const fn step_ns(self) -> u64 {
        match self.0 {
            0 => 10 * SECOND_NS,
            1 => 60 * SECOND_NS,
            _ => 3600 * SECOND_NS,
        }
    }

    /// `10s`, `1m`, `1h`.
    pub const fn name(self) -> &'static str {
        match self.0 {
            0 => "10s",
            1 => "1m",
            _ => "1h",
        }
    }

    /// The resolution with index `i`.
    pub const fn from_index(i: u8) -> Option<Self> {
        if i < 3 { Some(Self(i)) } else { None }
    }

    /// The start of the window of this resolution holding `t_ns`.
    pub const fn window_of(self, t_ns: u64) -> u64 {
        t_ns - t_ns % self.step_ns()
    }
}

/// One second in ns.
pub const SECOND_NS: u64 = 1_000_000_000;

/// What one export said about a series.
#[derive(Clone, Debug, PartialEq)]
pub enum Sample {
    /// An exponential histogram's observations within the export window (already
    /// differenced against the previous export).
    Exponential(Exponential),
    /// A counter's increase within the export window.
    Counter(u128),
    /// A gauge's value at the export.
    Gauge(i64),
    /// A histogram's observations within the export window (already differenced
    /// against the previous export): count, sum, per-bucket counts, and its layout's
    /// bounds as exported text (`0,1,2,...,+Inf`).
    Histogram {
        /// The layout's bounds as text.
        bounds: Arc<str>,
        /// Observations.
        count: u64,
        /// Their sum.
        sum: u128,
        /// Per bucket.
        buckets: Box<[u64]>,
    },
}

/// The aggregate of one window.
#[derive(Clone, Debug, PartialEq)]
pub enum Agg {
    /// An exponential histogram's observations in the window.
    Exponential(Exponential),
    /// Sum of the counter's deltas.
    Counter {
        /// The sum.
        delta: u128,
    },
    /// The gauge's values.
    Gauge {
        /// The last value, in export order.
        last: i64,
        /// The smallest.
        min: i64,
        /// The largest.
        max: i64,
        /// Their sum (the mean is `sum / count`).
        sum: i128,
        /// How many.
        count: u64,
    },
    /// Histogram observations in the window.
    Histogram {
        /// The layout's bounds as text; windows merge only with the same layout.
        bounds: Arc<str>,
        /// Observations.
        count: u64,
        /// Their sum.
        sum: u128,
        /// Per bucket.
        buckets: Box<[u64]>,
    },
}

/// Why two aggregates could not be merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeError {
    /// Different kinds (a series' kind never changes; this is a corrupt input).
    Kind,
    /// Histograms with different layouts.
    Layout,
}

impl Agg {
    /// The aggregate of one sample.
    pub fn of(sample: &Sample) -> Self {
        match sample {
            Sample::Counter(d) => Self::Counter { delta: *d },
            Sample::Exponential(h) => Self::Exponential(h.clone()),
            Sample::Gauge(v) => Self::Gauge {
                last: *v,
                min: *v,
                max: *v,
                sum: i128::from(*v),
                count: 1,
            },
            Sample::Histogram {
                bounds,
                count,
                sum,
                buckets,
            } => Self::Histogram {
                bounds: bounds.clone(),
                count: *count,
                sum: *sum,
                buckets: buckets.clone(),
            },
        }
    }

    /// Merges `later` (a later window, or a later sample of the same window) into
    /// `self`.
    pub fn merge(&mut self, later: &Self) -> Result<(), MergeError> {
        match (self, later) {
            (Self::Counter { delta }, Self::Counter { delta: d }) => {
                *delta = delta.saturating_add(*d);
                Ok(())
            }
            (
                Self::Gauge {
                    last,
                    min,
                    max,
                    sum,
                    count,
                },
                Self::Gauge {
                    last: l,
                    min: mi,
                    max: ma,
                    sum: s,
                    count: c,
                },
            ) => {
                *last = *l;
                *min = (*min).min(*mi);
                *max = (*max).max(*ma);
                *sum = sum.saturating_add(*s);
                *count = count.saturating_add(*c);
                Ok(())
            }
            (
                Self::Histogram {
                    bounds,
                    count,
                    sum,
                    buckets,
                },
                Self::Histogram {
                    bounds: b,
                    count: c,
                    sum: s,
                    buckets: bs,
                },
            ) => {
                if bounds != b || buckets.len() != bs.len() {
                    return Err(MergeError::Layout);
                }
                merge_explicit_buckets(buckets, bs);
                *count = count.saturating_add(*c);
                *sum = sum.saturating_add(*s);
                Ok(())
            }
            (Self::Exponential(a), Self::Exponential(b)) => {
                a.merge(b);
                Ok(())
            }
            _ => Err(MergeError::Kind),
        }
    }

    /// The kind's name (`counter`, `gauge`, `histogram`).
    pub const fn kind_name(&self) -> &'static str {
        match self {
            Self::Counter { .. } => "counter",
            Self::Gauge { .. } => "gauge",
            Self::Histogram { .. } | Self::Exponential(_) => "histogram",
        }
    }
}

/// Merges the bucket counts of two windows of the same configured layout: bucket by
/// bucket. (Exponential histograms merge with [`Exponential::merge`], which downscales
/// the finer of the two exactly first: `2^k` neighbouring buckets become one.)
pub fn merge_explicit_buckets(into: &mut [u64], from: &[u64]) {
    for (a, b) in into.iter_mut().zip(from) {
        *a = a.saturating_add(*b);
    }
}

/// The observations `now` holds beyond `prev` (an earlier state of the same
/// cumulative histogram), at `now`'s scale: `prev` is downscaled exactly to it first,
/// then subtracted bucket by bucket. `None` when `prev` is not an earlier state of
/// `now` (a reset: fewer observations, a finer scale, or a bucket that shrank). The sum
/// is exact while both sums are integers; min and max of the window are unknown.
pub fn exponential_difference(now: &Exponential, prev: &Exponential) -> Option<Exponential> {
    if now.count() < prev.count() {
        return None;
    }
    let p = prev.downscaled(now.scale());
    if p.scale() != now.scale() {
        return None;
    }
    let side = |n: &Buckets, p: &Buckets| -> Option<(i32, Vec<u64>)> {
        let mut counts = n.counts().to_vec();
        for (i, c) in p.iter().filter(|&(_, c)| c > 0) {
            let k = usize::try_from(i.checked_sub(n.offset())?).ok()?;
            let slot = counts.get_mut(k)?;
            *slot = slot.checked_sub(c)?;
        }
        Some((n.offset(), counts))
    };
    let zero = now.zero_count().checked_sub(p.zero_count())?;
    let sum = match (now.integer_sum(), p.integer_sum()) {
        (Some(a), Some(b)) => a.checked_sub(b)? as f64,
        _ => now.sum() - p.sum(),
    };
    Exponential::from_parts(
        now.scale(),
        zero,
        side(now.positive(), p.positive())?,
        side(now.negative(), p.negative())?,
        sum,
        None,
    )
}

/// A closed window of one series at one resolution.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// The series identity (`Series::id`).
    pub series: Arc<str>,
    /// The resolution.
    pub resolution: Resolution,
    /// The window's start, ns since the Unix epoch (a multiple of the step).
    pub start_ns: u64,
    /// The aggregate.
    pub agg: Agg,
}

/// A histogram's cumulative state at an export: bounds, count, sum, per bucket.
type Cumulative = (Arc<str>, u64, u128, Box<[u64]>);

/// The open windows of one series, one per resolution.
#[derive(Debug, Default)]
struct Open {
    windows: [Option<(u64, Agg)>; 3],
    /// The histogram's cumulative (count, sum, per-bucket) at the last export, to
    /// difference the next one against.
    last_histogram: Option<Cumulative>,
    /// An exponential histogram's cumulative state at the last export.
    last_exponential: Option<Exponential>,
}

/// Open windows of every series; closes them into [`Point`]s as time passes.
///
/// Memory: per series one entry (its id, three open aggregates and, for a histogram,
/// its last cumulative counts), bounded by metricsd's series caps; entries of series
/// that expired are removed with [`Rollups::forget`].
#[derive(Debug, Default)]
pub struct Rollups {
    open: std::collections::HashMap<Arc<str>, Open>,
    /// Samples that could not be merged (a kind or layout change), counted.
    pub mismatches: u64,
}

impl Rollups {
    /// No open windows.
    pub fn new() -> Self {
        Self::default()
    }

    /// Series with open windows.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether no series has an open window.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Adds what an export ending at `t_ns` said about `series`. A window this
    /// sample does not belong to (time moved on) is closed into `closed` first.
    pub fn observe(&mut self, series: &str, sample: &Sample, t_ns: u64, closed: &mut Vec<Point>) {
        let open = match self.open.get_mut(series) {
            Some(open) => open,
            None => self.open.entry(Arc::from(series)).or_default(),
        };
        let agg = Agg::of(sample);
        for res in Resolution::ALL {
            let start = res.window_of(t_ns);
            let slot = &mut open.windows[usize::from(res.0)];
            match slot {
                Some((s, a)) if *s == start => {
                    if a.merge(&agg).is_err() {
                        self.mismatches += 1;
                    }
                }
                _ => {
                    if let Some((s, a)) = slot.take() {
                        closed.push(Point {
                            series: Arc::from(series),
                            resolution: res,
                            start_ns: s,
                            agg: a,
                        });
                    }
                    *slot = Some((start, agg.clone()));
                }
            }
        }
    }

    /// A histogram's window sample from its cumulative counts at an export, differenced
    /// against the previous export of `series` (the first export, or one after a layout
    /// change or a reset, counts from zero).
    pub fn histogram_sample(
        &mut self,
        series: &str,
        bounds: &str,
        count: u64,
        sum: u128,
        counts: &[u64],
    ) -> Sample {
        let open = match self.open.get_mut(series) {
            Some(open) => open,
            None => self.open.entry(Arc::from(series)).or_default(),
        };
        let (d_count, d_sum, d_buckets) = match &open.last_histogram {
            Some((b, c, s, prev))
                if &**b == bounds && prev.len() == counts.len() && *c <= count =>
            {
                let buckets = counts
                    .iter()
                    .zip(prev.iter())
                    .map(|(n, p)| n.saturating_sub(*p))
                    .collect();
                (count - c, sum.saturating_sub(*s), buckets)
            }
            _ => (count, sum, Box::from(counts)),
        };
        let bounds: Arc<str> = match &open.last_histogram {
            Some((b, ..)) if &**b == bounds => b.clone(),
            _ => Arc::from(bounds),
        };
        open.last_histogram = Some((bounds.clone(), count, sum, Box::from(counts)));
        Sample::Histogram {
            bounds,
            count: d_count,
            sum: d_sum,
            buckets: d_buckets,
        }
    }

    /// An exponential histogram's window sample from its cumulative state at an
    /// export, differenced against the previous export of `series` (the first export,
    /// or one after a reset, counts from zero).
    pub fn exponential_sample(&mut self, series: &str, now: &Exponential) -> Sample {
        let open = match self.open.get_mut(series) {
            Some(open) => open,
            None => self.open.entry(Arc::from(series)).or_default(),
        };
        let window = open
            .last_exponential
            .as_ref()
            .and_then(|prev| exponential_difference(now, prev))
            .unwrap_or_else(|| now.clone());
        open.last_exponential = Some(now.clone());
        Sample::Exponential(window)
    }

    /// Closes every window that ended at or before `now_ns` into `closed`.
    pub fn close_due(&mut self, now_ns: u64, closed: &mut Vec<Point>) {
        for (series, open) in &mut self.open {
            for res in Resolution::ALL {
                let slot = &mut open.windows[usize::from(res.0)];
                if let Some((s, _)) = slot {
                    if s.saturating_add(res.step_ns()) <= now_ns {
                        if let Some((s, a)) = slot.take() {
                            closed.push(Point {
                                series: series.clone(),
                                resolution: res,
                                start_ns: s,
                                agg: a,
                            });
                        }
                    }
                }
            }
        }
    }

    /// Closes every open window of `series` (it expired) into `closed` and forgets it.
    pub fn forget(&mut self, series: &str, closed: &mut Vec<Point>) {
        if let Some((id, open)) = self.open.remove_entry(series) {
            for (i, slot) in open.windows.into_iter().enumerate() {
                if let Some((s, a)) = slot {
                    closed.push(Point {
                        series: id.clone(),
                        resolution: Resolution(i as u8),
                        start_ns: s,
                        agg: a,
                    });
                }
            }
        }
    }

    /// The open windows of `series`, finest first.
    pub fn open_of(&self, series: &str) -> Vec<Point> {
        let Some((id, open)) = self.open.get_key_value(series) else {
            return Vec::new();
        };
        open.windows
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                w.as_ref().map(|(s, a)| Point {
                    series: id.clone(),
                    resolution: Resolution(i as u8),
                    start_ns: *s,
                    agg: a.clone(),
                })
            })
            .collect()
    }

    /// Puts back an open window a write-ahead log held (replacing what is open at its
    /// resolution).
    pub fn restore(&mut self, p: Point) {
        let open = match self.open.get_mut(&*p.series) {
            Some(open) => open,
            None => self.open.entry(p.series.clone()).or_default(),
        };
        open.windows[usize::from(p.resolution.0)] = Some((p.start_ns, p.agg));
    }

    /// The open (not yet closed) windows of series matching `select` at `res`.
    pub fn open_points(&self, res: Resolution, mut select: impl FnMut(&str) -> bool) -> Vec<Point> {
        let mut out = Vec::new();
        for (series, open) in &self.open {
            if !select(series) {
                continue;
            }
            if let Some((s, a)) = &open.windows[usize::from(res.0)] {
                out.push(Point {
                    series: series.clone(),
                    resolution: res,
                    start_ns: *s,
                    agg: a.clone(),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_close_when_time_moves_past_them() {
        let mut r = Rollups::new();
        let mut closed = Vec::new();
        let t0 = 1_000 * 3600 * SECOND_NS; // on an hour boundary
        r.observe("s", &Sample::Counter(3), t0 + SECOND_NS, &mut closed);
        r.observe("s", &Sample::Counter(4), t0 + 9 * SECOND_NS, &mut closed);
        assert!(closed.is_empty());
        r.observe("s", &Sample::Counter(5), t0 + 10 * SECOND_NS, &mut closed);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].agg, Agg::Counter { delta: 7 });
        assert_eq!(
            (closed[0].resolution, closed[0].start_ns),
            (Resolution(0), t0)
        );
        closed.clear();
        r.close_due(t0 + 60 * SECOND_NS, &mut closed);
        let mut got: Vec<_> = closed
            .iter()
            .map(|p| (p.resolution.0, p.agg.clone()))
            .collect();
        got.sort_by_key(|(r, _)| *r);
        assert_eq!(
            got,
            [
                (0, Agg::Counter { delta: 5 }),
                (1, Agg::Counter { delta: 12 })
            ]
        );
    }

    #[test]
    fn exponential_windows_are_exact_differences_across_a_scale_change() {
        let mut cumulative = Exponential::new();
        for v in [3, 5, 5, 100, 0] {
            cumulative.record(v);
        }
        let before = cumulative.clone();
        // The second window's observations; the huge one forces a lower scale.
        let mut window = Exponential::new();
        for v in [7, 5, 0, 1 << 40, 9_999] {
            cumulative.record(v);
            window.record(v);
        }
        assert!(
            cumulative.scale() < before.scale(),
            "the range grew: the scale dropped"
        );
        let diff = exponential_difference(&cumulative, &before).expect("an earlier state");
        let window = window.downscaled(diff.scale());
        assert_eq!(diff.scale(), window.scale());
        assert_eq!(diff.count(), 5);
        assert_eq!(diff.zero_count(), window.zero_count());
        let nonzero = |b: &Buckets| b.iter().filter(|&(_, c)| c > 0).collect::<Vec<_>>();
        assert_eq!(nonzero(diff.positive()), nonzero(window.positive()));
        assert_eq!(diff.sum(), (7 + 5 + (1u64 << 40) + 9_999) as f64);
        // Merged back onto the first window, the cumulative histogram's buckets.
        let mut merged = before.downscaled(diff.scale());
        merged.merge(&diff);
        assert_eq!(nonzero(merged.positive()), nonzero(cumulative.positive()));
        assert_eq!(merged.zero_count(), cumulative.zero_count());
        // Not an earlier state: a reset.
        assert!(exponential_difference(&before, &cumulative).is_none());
    }

    #[test]
    fn gauges_keep_last_min_max_and_sum() {
        let mut a = Agg::of(&Sample::Gauge(5));
        for v in [-2, 9, 4] {
            a.merge(&Agg::of(&Sample::Gauge(v))).expect("same kind");
        }
        assert_eq!(
            a,
            Agg::Gauge {
                last: 4,
                min: -2,
                max: 9,
                sum: 16,
                count: 4
            }
        );
        assert_eq!(a.merge(&Agg::Counter { delta: 1 }), Err(MergeError::Kind));
    }

    #[test]
    fn histogram_samples_are_differences_of_cumulative_counts() {
        let mut r = Rollups::new();
        let first = r.histogram_sample("h", "1,+Inf", 3, 10, &[2, 1]);
        let second = r.histogram_sample("h", "1,+Inf", 7, 30, &[3, 4]);
        assert_eq!(
            second,
            Sample::Histogram {
                bounds: Arc::from("1,+Inf"),
                count: 4,
                sum: 20,
                buckets: Box::from([1, 3].as_slice()),
            }
        );
        let mut agg = Agg::of(&first);
        agg.merge(&Agg::of(&second)).expect("same layout");
        assert_eq!(
            agg,
            Agg::Histogram {
                bounds: Arc::from("1,+Inf"),
                count: 7,
                sum: 30,
                buckets: Box::from([3, 4].as_slice()),
            },
            "two windows merged equal the cumulative counts"
        );
    }
}
