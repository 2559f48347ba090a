//! Histograms: the OpenTelemetry exponential histogram with an automatic scale, and
//! configured explicit layouts.
//!
//! # API notes
//!
//! - [`Exponential`]: `Exponential::new()` starts empty at [`MAX_SCALE`];
//!   [`record`](Exponential::record) takes a `u64`, [`record_f64`](Exponential::record_f64)
//!   an `f64` (`Err(NotFinite)` for NaN and ±infinity, which are not recorded; the caller
//!   counts them). [`merge`](Exponential::merge) adds another histogram, downscaling
//!   exactly. Read-out: [`scale`](Exponential::scale), [`zero_count`](Exponential::zero_count),
//!   [`positive`](Exponential::positive) / [`negative`](Exponential::negative) (each a
//!   [`Buckets`]: `offset()` and `counts()`, bucket `offset + i` at `counts()[i]`),
//!   [`count`](Exponential::count), [`sum`](Exponential::sum) (and the exact
//!   [`integer_sum`](Exponential::integer_sum) while only integers were recorded),
//!   [`min`](Exponential::min), [`max`](Exponential::max).
//! - Conversions: [`Exponential::native`] (Prometheus native histogram: schema = scale
//!   clamped to `[-4, 8]` by exact downscaling, spans and delta-encoded counts, Prometheus'
//!   bucket numbering) and [`Histogram::classic`] (cumulative `le` buckets).
//! - [`Histogram`] is what a series holds: `Exponential` or `Explicit` (configured bounds),
//!   with the same `record`, `record_f64`, `count`, `sum`, `quantile` and `classic`.
//! - [`index`] / [`index_u64`] map a value to its bucket at a scale; [`lower_bound`] and
//!   [`upper_bound`] give a bucket's boundaries.
//!
//! # The exponential histogram
//!
//! At scale `s`, the base is `2^(2^-s)` and bucket `i` holds the values `v` with
//! `base^i < |v| <= base^(i+1)` (upper bounds inclusive, as OpenTelemetry and Prometheus
//! define them). Zero goes to the zero bucket (`zero_count`, threshold 0); negative values
//! to the negative buckets, by their magnitude.
//!
//! A histogram starts at [`MAX_SCALE`] and keeps at most [`MAX_BUCKETS`] buckets on each
//! side of zero. When a value would widen the range past that, the histogram downscales:
//! each step halves the resolution and adds neighbour pairs of buckets (`i` and `i ^ 1`
//! share bucket `i >> 1`), so no count moves to a bucket that does not contain its value.
//! 160 buckets at scale -4 span more than the whole `f64` range, so the scale never goes
//! below [`MIN_SCALE`] = -4.
//!
//! # Exact placement
//!
//! Every value is mapped exactly, on boundaries too. A positive value is written
//! `m * 2^e` with a 64-bit mantissa `m` (`1 <= m < 2`; a `u64` keeps all its bits, an
//! `f64` its 53). At scales `<= 0` the index comes from `e` alone (an exact power of two
//! belongs to the bucket below). At positive scales the index within the octave is the
//! number of boundaries `2^(k / 2^s)` below `m`: they are irrational, so `m` is never equal
//! to one, and comparing `m` with `floor(2^63 * 2^(k / 2^s))` decides it exactly. That
//! table of floors is computed once with integer interval arithmetic (see [`table`]);
//! its test proves each entry is the floor.
//!
//! # Explicit layouts
//!
//! `[histograms]` in the config gives inclusive upper bounds (at most 159, so at most 160
//! buckets with `+Inf`). A value lands in the first bucket whose bound is `>= v`.

use std::fmt;
use std::sync::{Arc, LazyLock, OnceLock};

use serde::{Deserialize, Serialize};

/// Most buckets on each side of zero.
pub const MAX_BUCKETS: usize = 160;
/// The scale a histogram starts at: 1024 buckets per power of two.
pub const MAX_SCALE: i32 = 10;
/// The lowest scale a histogram reaches (160 buckets at -4 cover every `f64`).
pub const MIN_SCALE: i32 = -4;
/// The highest schema a Prometheus native histogram may have.
pub const NATIVE_MAX_SCHEMA: i32 = 8;
/// The lowest schema a Prometheus native histogram may have.
pub const NATIVE_MIN_SCHEMA: i32 = -4;

/// An observation that cannot be recorded: NaN or an infinity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotFinite;

impl fmt::Display for NotFinite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a histogram observation must be a finite number (not NaN or infinite)")
    }
}

impl std::error::Error for NotFinite {}

// ---------------------------------------------------------------------------------------
// The exact mapping.

/// The floors `floor(2^63 * 2^(k / 2^MAX_SCALE))` for `k` in `1..2^MAX_SCALE`.
///
/// Each entry is found by bisection on the integer `t` with the predicate
/// `(t / 2^63)^(2^MAX_SCALE) < 2^k`, which [`pow_below`] decides with rigorous
/// lower and upper bounds in 128-bit fixed point. The floor is the largest `t` for which
/// it holds.
pub mod table {
    use super::MAX_SCALE;

    /// Entries: `2^MAX_SCALE - 1` (k = 1 ..).
    pub const LEN: usize = (1 << MAX_SCALE) - 1;

    /// The high and low halves of `a * b`.
    fn mul_wide(a: u128, b: u128) -> (u128, u128) {
        const M: u128 = u64::MAX as u128;
        let (a1, a0) = (a >> 64, a & M);
        let (b1, b0) = (b >> 64, b & M);
        let p00 = a0 * b0;
        let p01 = a0 * b1;
        let p10 = a1 * b0;
        let p11 = a1 * b1;
        let mid = (p00 >> 64) + (p01 & M) + (p10 & M);
        let lo = (p00 & M) | (mid << 64);
        let hi = p11 + (p01 >> 64) + (p10 >> 64) + (mid >> 64);
        (hi, lo)
    }

    /// `x^2` for `x = m / 2^127 * 2^e` (`m` normalized: bit 127 set), rounded down or up.
    fn square(m: u128, e: i64, up: bool) -> (u128, i64) {
        let (hi, lo) = mul_wide(m, m);
        let (mut mant, exp, rest) = if hi >> 127 == 1 {
            (hi, 2 * e + 1, lo)
        } else {
            ((hi << 1) | (lo >> 127), 2 * e, lo << 1)
        };
        if up && rest != 0 {
            match mant.checked_add(1) {
                Some(v) => mant = v,
                None => return (1 << 127, exp + 1),
            }
        }
        (mant, exp)
    }

    /// Whether `(t / 2^63)^(2^MAX_SCALE) < 2^k`; `None` if the bounds cannot tell.
    pub fn pow_below(t: u64, k: u32) -> Option<bool> {
        let start = u128::from(t) << 64;
        let (mut lo, mut lo_e) = (start, 0i64);
        let (mut hi, mut hi_e) = (start, 0i64);
        for _ in 0..MAX_SCALE {
            (lo, lo_e) = square(lo, lo_e, false);
            (hi, hi_e) = square(hi, hi_e, true);
        }
        // A normalized mantissa puts the value in [2^e, 2^(e+1)).
        let k = i64::from(k);
        if hi_e < k {
            Some(true)
        } else if lo_e >= k {
            Some(false)
        } else {
            None
        }
    }

    /// The largest `t` with `pow_below(t, k)`, starting from a float estimate.
    pub fn floor_entry(k: u32) -> u64 {
        let below = |t: u64| pow_below(t, k) == Some(true);
        let estimate =
            (f64::from(k) / f64::from(1u32 << MAX_SCALE)).exp2() * 9.223_372_036_854_776e18;
        // `as` saturates; the estimate is within a few thousand units of the floor.
        let guess = estimate as u64;
        const SLACK: u64 = 1 << 20;
        let mut lo = guess.saturating_sub(SLACK).max(1 << 63);
        if !below(lo) {
            lo = 1 << 63;
        }
        let mut hi = guess.saturating_add(SLACK);
        if below(hi) {
            hi = u64::MAX;
        }
        // Invariant: below(lo), !below(hi) (2^63 is below: 1 < 2^k; u64::MAX is not).
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if below(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The table, built on first use (about a millisecond).
    pub fn get() -> &'static [u64] {
        &super::TABLE
    }
}

static TABLE: LazyLock<Box<[u64]>> =
    LazyLock::new(|| (1..=table::LEN as u32).map(table::floor_entry).collect());

/// Steps of the fast lookup per octave: `2^FAST_BITS` equal steps of the mantissa.
const FAST_BITS: u32 = 11;

/// The lookup that places a mantissa at [`MAX_SCALE`] with one table read and one
/// comparison, instead of a bisection over [`TABLE`].
///
/// The octave `[2^63, 2^64)` is cut into `2^FAST_BITS` equal steps of `2^52`. Two
/// neighbouring boundaries of [`MAX_SCALE`] are a factor `2^(1/1024)` apart, so at least
/// `2^63 * (2^(1/1024) - 1) > 0.00067 * 2^63` (one less for the floors), more than a
/// step (`2^63 / 2048 < 0.00049 * 2^63`): a step holds at most one boundary. `below[f]`
/// counts the boundaries under step `f`'s start; the count under a mantissa in step `f`
/// is that, plus one if the next boundary is under the mantissa too.
struct Fast {
    /// Boundaries below the start of each step.
    below: [u16; 1 << FAST_BITS],
    /// [`TABLE`], then `u64::MAX` (no mantissa is above it).
    bounds: [u64; 1 << MAX_SCALE],
}

static FAST: OnceLock<Box<Fast>> = OnceLock::new();

/// The fast lookup, built on first use.
#[inline(always)]
fn fast() -> &'static Fast {
    match FAST.get() {
        Some(fast) => fast,
        None => fast_init(),
    }
}

#[cold]
#[inline(never)]
fn fast_init() -> &'static Fast {
    FAST.get_or_init(build_fast)
}

fn build_fast() -> Box<Fast> {
    let table = table::get();
    let mut fast = Box::new(Fast {
        below: [0; 1 << FAST_BITS],
        bounds: [u64::MAX; 1 << MAX_SCALE],
    });
    for (slot, &t) in fast.bounds.iter_mut().zip(table) {
        *slot = t;
    }
    for (f, below) in fast.below.iter_mut().enumerate() {
        let start = (1u64 << 63) | ((f as u64) << (63 - FAST_BITS));
        // At most 1023: fits.
        *below = table.partition_point(|&t| t < start) as u16;
    }
    fast
}

/// How many boundaries of [`MAX_SCALE`] (table entries) are below `mantissa` (bit 63
/// set): 0 to `2^MAX_SCALE - 1`.
#[inline(always)]
fn boundaries_below(mantissa: u64) -> u32 {
    let fast = fast();
    let step = ((mantissa << 1) >> (64 - FAST_BITS)) as usize;
    let below = fast.below[step & ((1 << FAST_BITS) - 1)];
    let next = fast.bounds[usize::from(below) & ((1 << MAX_SCALE) - 1)];
    u32::from(below) + u32::from(next < mantissa)
}

/// A positive value as `m * 2^e`, `m` a 64-bit mantissa with bit 63 set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Normalized {
    mantissa: u64,
    exponent: i32,
}

impl Normalized {
    fn from_u64(v: u64) -> Option<Self> {
        if v == 0 {
            return None;
        }
        let lz = v.leading_zeros();
        Some(Self {
            mantissa: v << lz,
            exponent: 63 - lz as i32,
        })
    }

    /// `|v|` of a finite nonzero `f64`.
    fn from_f64(v: f64) -> Option<Self> {
        let bits = v.to_bits() & !(1 << 63);
        let field = (bits >> 52) as i32;
        let frac = bits & ((1 << 52) - 1);
        if field == 0x7ff || bits == 0 {
            return None;
        }
        if field == 0 {
            let lz = frac.leading_zeros();
            Some(Self {
                mantissa: frac << lz,
                exponent: -1074 + 63 - lz as i32,
            })
        } else {
            Some(Self {
                mantissa: (1 << 63) | (frac << 11),
                exponent: field - 1023,
            })
        }
    }

    #[inline(always)]
    fn index(self, scale: i32) -> i32 {
        let power_of_two = self.mantissa == 1 << 63;
        if scale <= 0 {
            return (self.exponent - i32::from(power_of_two)) >> -scale;
        }
        if power_of_two {
            return (self.exponent << scale) - 1;
        }
        // Boundaries of this scale are table entries k = j * 2^(MAX_SCALE - scale),
        // j in 1..2^scale. The entries below the mantissa are k = 1..=K (the table
        // increases), so the count of j with j * 2^(MAX_SCALE - scale) <= K is
        // K >> (MAX_SCALE - scale).
        let k = boundaries_below(self.mantissa);
        (self.exponent << scale) + (k >> (MAX_SCALE - scale)) as i32
    }

    /// [`Normalized::index`] by bisection over the table at `scale` (the reference the
    /// fast lookup is tested against).
    #[cfg(test)]
    fn index_bisect(self, scale: i32) -> i32 {
        let power_of_two = self.mantissa == 1 << 63;
        if scale <= 0 {
            return (self.exponent - i32::from(power_of_two)) >> -scale;
        }
        if power_of_two {
            return (self.exponent << scale) - 1;
        }
        let table = table::get();
        let stride = 1usize << (MAX_SCALE - scale);
        let (mut lo, mut hi) = (0usize, (1usize << scale) - 1);
        // Count of j in 1..=hi with entry < mantissa: bisect on the monotone predicate.
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            let below = table
                .get(mid * stride - 1)
                .is_some_and(|&t| t < self.mantissa);
            if below {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        (self.exponent << scale) + lo as i32
    }
}

/// The bucket of `|v|` at `scale` (`MIN_SCALE..=MAX_SCALE`); `None` for 0, NaN and
/// infinities.
pub fn index(v: f64, scale: i32) -> Option<i32> {
    Normalized::from_f64(v).map(|n| n.index(scale.clamp(MIN_SCALE, MAX_SCALE)))
}

/// The bucket of `v` at `scale` (`MIN_SCALE..=MAX_SCALE`); `None` for 0.
pub fn index_u64(v: u64, scale: i32) -> Option<i32> {
    Normalized::from_u64(v).map(|n| n.index(scale.clamp(MIN_SCALE, MAX_SCALE)))
}

/// The lower boundary (exclusive) of bucket `index` at `scale`: `2^(index / 2^scale)`.
/// Exact for scales `<= 0`; otherwise the nearest `f64` a correctly rounded `exp2` gives.
pub fn lower_bound(index: i32, scale: i32) -> f64 {
    if scale <= 0 {
        pow2(i64::from(index) << -scale)
    } else {
        let whole = index >> scale;
        let frac = index & ((1 << scale) - 1);
        (f64::from(frac) / f64::from(1u32 << scale)).exp2() * pow2(i64::from(whole))
    }
}

/// The upper boundary (inclusive) of bucket `index` at `scale`.
pub fn upper_bound(index: i32, scale: i32) -> f64 {
    lower_bound(index.saturating_add(1), scale)
}

/// `2^e` as `f64` (0 or infinity past the range).
fn pow2(e: i64) -> f64 {
    if e > 1023 {
        f64::INFINITY
    } else if e >= -1022 {
        f64::from_bits(((e + 1023) as u64) << 52)
    } else if e >= -1074 {
        f64::from_bits(1u64 << (e + 1074))
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------------------
// Buckets and the exponential histogram.

/// The buckets on one side of zero: bucket `offset + i` holds `counts[i]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buckets {
    offset: i32,
    counts: Vec<u64>,
}

impl Buckets {
    /// The index of the first bucket.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Counts, from bucket `offset` up; at most [`MAX_BUCKETS`].
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// `(index, count)` of every bucket held, zeros included.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (i32, u64)> + '_ {
        let offset = self.offset;
        self.counts
            .iter()
            .enumerate()
            .map(move |(i, &c)| (offset + i as i32, c))
    }

    fn last(&self) -> i32 {
        self.offset + self.counts.len() as i32 - 1
    }

    /// `(index, count)` at a scale `steps` lower, without copying: neighbours merged as
    /// [`Exponential::downscaled`] would merge them.
    fn grouped(&self, steps: i32) -> impl Iterator<Item = (i32, u64)> + '_ {
        let steps = steps.clamp(0, 31);
        let offset = i64::from(self.offset);
        let counts = &self.counts[..];
        let mut at = 0usize;
        std::iter::from_fn(move || {
            if at >= counts.len() {
                return None;
            }
            // The group of bucket `offset + at`, and the first bucket of the next group.
            let group = (offset + at as i64) >> steps;
            let next = (((group + 1) << steps) - offset).clamp(0, counts.len() as i64) as usize;
            let end = next.max(at + 1);
            let c = counts.get(at..end).map_or(0, |g| g.iter().sum());
            at = end;
            Some((group as i32, c))
        })
    }

    /// How many steps of downscaling make room for `index` (0 if it fits).
    fn steps_for(&self, index: i32) -> i32 {
        if self.counts.is_empty() {
            return 0;
        }
        let (mut lo, mut hi) = (self.offset.min(index), self.last().max(index));
        let mut steps = 0;
        while (i64::from(hi) - i64::from(lo)) >= MAX_BUCKETS as i64 {
            lo >>= 1;
            hi >>= 1;
            steps += 1;
        }
        steps
    }

    /// Adds `n` at `index`, which must fit (see `steps_for`).
    fn add(&mut self, index: i32, n: u64) {
        if self.counts.is_empty() {
            self.offset = index;
            self.counts.push(n);
            return;
        }
        if index < self.offset {
            let grow = (self.offset - index) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.offset = index;
        } else if index > self.last() {
            let len = (index - self.offset) as usize + 1;
            self.counts.resize(len, 0);
        }
        if let Some(c) = self.counts.get_mut((index - self.offset) as usize) {
            *c += n;
        }
    }

    /// Merges neighbour buckets `steps` times: bucket `i` moves to `i >> steps`.
    fn downscale(&mut self, steps: i32) {
        if steps <= 0 || self.counts.is_empty() {
            return;
        }
        let offset = self.offset >> steps;
        let len = (self.last() >> steps) - offset + 1;
        let mut counts = vec![0; len as usize];
        for (i, c) in self.iter() {
            if let Some(slot) = counts.get_mut(((i >> steps) - offset) as usize) {
                *slot += c;
            }
        }
        self.offset = offset;
        self.counts = counts;
    }
}

/// Downscaling steps that make the union of `a` and `b` fit in [`MAX_BUCKETS`].
fn union_steps(a: &Buckets, b: &Buckets) -> i32 {
    if b.is_empty() {
        return 0;
    }
    if a.is_empty() {
        return b.steps_for(b.offset);
    }
    let (mut lo, mut hi) = (a.offset.min(b.offset), a.last().max(b.last()));
    let mut steps = 0;
    while i64::from(hi) - i64::from(lo) >= MAX_BUCKETS as i64 {
        lo >>= 1;
        hi >>= 1;
        steps += 1;
    }
    steps
}

mod u128_text {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(D::Error::custom)
    }
}

/// Count, sum, min and max of the observations (shared by both histogram kinds).
///
/// The extremes start past each other (`min > max`: no observation), so recording one
/// is two comparisons rather than an `Option` update; the serialized form keeps them
/// optional ([`TotalsWire`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "TotalsWire", into = "TotalsWire")]
struct Totals {
    count: u64,
    /// Sum of the `u64` observations, exact.
    int_sum: u128,
    /// Sum of the `f64` observations.
    float_sum: f64,
    /// Whether any `f64` observation was recorded.
    floats: bool,
    /// Extremes of the `f64` observations (`+inf`, `-inf` while there are none).
    min: f64,
    max: f64,
    /// Extremes of the `u64` observations (`u64::MAX`, 0 while there are none), kept
    /// apart so that recording an integer converts nothing.
    int_min: u64,
    int_max: u64,
}

/// [`Totals`] as serialized: the sum as text (JSON has no u128), the extremes optional
/// (`None` where nothing of that kind was recorded).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TotalsWire {
    count: u64,
    #[serde(with = "u128_text")]
    int_sum: u128,
    float_sum: f64,
    floats: bool,
    min: Option<f64>,
    max: Option<f64>,
    #[serde(default)]
    int_min: Option<u64>,
    #[serde(default)]
    int_max: Option<u64>,
}

impl From<TotalsWire> for Totals {
    fn from(w: TotalsWire) -> Self {
        Self {
            count: w.count,
            int_sum: w.int_sum,
            float_sum: w.float_sum,
            floats: w.floats,
            min: w.min.unwrap_or(f64::INFINITY),
            max: w.max.unwrap_or(f64::NEG_INFINITY),
            int_min: w.int_min.unwrap_or(u64::MAX),
            int_max: w.int_max.unwrap_or(0),
        }
    }
}

impl From<Totals> for TotalsWire {
    fn from(t: Totals) -> Self {
        let floats = t.min <= t.max;
        let ints = t.int_min <= t.int_max;
        Self {
            count: t.count,
            int_sum: t.int_sum,
            float_sum: t.float_sum,
            floats: t.floats,
            min: floats.then_some(t.min),
            max: floats.then_some(t.max),
            int_min: ints.then_some(t.int_min),
            int_max: ints.then_some(t.int_max),
        }
    }
}

impl Default for Totals {
    fn default() -> Self {
        Self {
            count: 0,
            int_sum: 0,
            float_sum: 0.0,
            floats: false,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            int_min: u64::MAX,
            int_max: 0,
        }
    }
}

impl Totals {
    /// Totals from exported parts: a float sum, min and max as given.
    fn from_parts(count: u64, sum: f64, min_max: Option<(f64, f64)>) -> Self {
        let (min, max) = min_max.unwrap_or((f64::INFINITY, f64::NEG_INFINITY));
        Self {
            count,
            int_sum: 0,
            float_sum: sum,
            floats: true,
            min,
            max,
            int_min: u64::MAX,
            int_max: 0,
        }
    }

    #[inline(always)]
    fn extremes(&mut self, v: f64) {
        if v < self.min {
            self.min = v;
        }
        if v > self.max {
            self.max = v;
        }
    }

    #[inline(always)]
    fn record_u64(&mut self, v: u64) {
        self.count += 1;
        self.int_sum += u128::from(v);
        self.int_min = self.int_min.min(v);
        self.int_max = self.int_max.max(v);
    }

    #[inline(always)]
    fn record_f64(&mut self, v: f64) {
        self.count += 1;
        self.float_sum += v;
        self.floats = true;
        self.extremes(v);
    }

    fn merge(&mut self, o: &Self) {
        self.count += o.count;
        self.int_sum += o.int_sum;
        self.float_sum += o.float_sum;
        self.floats |= o.floats;
        if o.min <= o.max {
            self.extremes(o.min);
            self.extremes(o.max);
        }
        self.int_min = self.int_min.min(o.int_min);
        self.int_max = self.int_max.max(o.int_max);
    }

    /// The integer extremes as `f64`, if any integer was recorded.
    fn int_extremes(&self) -> Option<(f64, f64)> {
        (self.int_min <= self.int_max).then_some((self.int_min as f64, self.int_max as f64))
    }

    fn min(&self) -> Option<f64> {
        let floats = (self.min <= self.max).then_some(self.min);
        match (floats, self.int_extremes()) {
            (Some(f), Some((i, _))) => Some(f.min(i)),
            (f, i) => f.or(i.map(|i| i.0)),
        }
    }

    fn max(&self) -> Option<f64> {
        let floats = (self.min <= self.max).then_some(self.max);
        match (floats, self.int_extremes()) {
            (Some(f), Some((_, i))) => Some(f.max(i)),
            (f, i) => f.or(i.map(|i| i.1)),
        }
    }

    fn sum(&self) -> f64 {
        self.int_sum as f64 + self.float_sum
    }

    fn integer_sum(&self) -> Option<u128> {
        (!self.floats).then_some(self.int_sum)
    }
}

/// An OpenTelemetry exponential histogram with an automatic scale (see the module docs).
///
/// Serializable for the demo's producer reports; a deserialized histogram is only as
/// sound as its source (the demo reads its own child processes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exponential {
    scale: i32,
    zero_count: u64,
    positive: Buckets,
    negative: Buckets,
    totals: Totals,
}

impl Default for Exponential {
    fn default() -> Self {
        Self::new()
    }
}

impl Exponential {
    /// An empty histogram at [`MAX_SCALE`].
    pub fn new() -> Self {
        Self {
            scale: MAX_SCALE,
            zero_count: 0,
            positive: Buckets::default(),
            negative: Buckets::default(),
            totals: Totals::default(),
        }
    }

    /// A histogram from exported parts (as [`crate::schema`] writes them): `None` if the
    /// scale is outside `MIN_SCALE..=MAX_SCALE`, a side has more than [`MAX_BUCKETS`]
    /// buckets or its range overflows, or a count overflows. `sum`, `min` and `max` are
    /// taken as given; the count is the buckets' total.
    pub fn from_parts(
        scale: i32,
        zero_count: u64,
        positive: (i32, Vec<u64>),
        negative: (i32, Vec<u64>),
        sum: f64,
        min_max: Option<(f64, f64)>,
    ) -> Option<Self> {
        if !(MIN_SCALE..=MAX_SCALE).contains(&scale) {
            return None;
        }
        let side = |(offset, counts): (i32, Vec<u64>)| -> Option<Buckets> {
            if counts.len() > MAX_BUCKETS {
                return None;
            }
            offset.checked_add(counts.len() as i32)?;
            Some(Buckets { offset, counts })
        };
        let (positive, negative) = (side(positive)?, side(negative)?);
        let mut count = zero_count;
        for c in positive.counts.iter().chain(&negative.counts) {
            count = count.checked_add(*c)?;
        }
        Some(Self {
            scale,
            zero_count,
            positive,
            negative,
            totals: Totals::from_parts(count, sum, min_max),
        })
    }

    /// Records `v`.
    #[inline(always)]
    pub fn record(&mut self, v: u64) {
        self.totals.record_u64(v);
        match Normalized::from_u64(v) {
            Some(n) => self.place(n, false, 1),
            None => self.zero_count += 1,
        }
    }

    /// Records `v`; NaN and infinities are refused (and not counted here).
    #[inline]
    pub fn record_f64(&mut self, v: f64) -> Result<(), NotFinite> {
        if !v.is_finite() {
            return Err(NotFinite);
        }
        self.totals.record_f64(v);
        match Normalized::from_f64(v) {
            Some(n) => self.place(n, v < 0.0, 1),
            None => self.zero_count += 1,
        }
        Ok(())
    }

    /// Adds `count` at `n`'s bucket: in place when the bucket is held (the common case),
    /// else through [`Exponential::place_new`].
    #[inline(always)]
    fn place(&mut self, n: Normalized, negative: bool, count: u64) {
        let index = n.index(self.scale);
        let side = if negative {
            &mut self.negative
        } else {
            &mut self.positive
        };
        // Negative (below the offset) wraps to a large index: not held.
        let held = index.wrapping_sub(side.offset) as u32 as usize;
        match side.counts.get_mut(held) {
            Some(c) => *c += count,
            None => self.place_new(index, negative, count),
        }
    }

    /// [`Exponential::place`] for a bucket not held yet: the range widens, downscaling
    /// if it would pass [`MAX_BUCKETS`].
    #[cold]
    #[inline(never)]
    fn place_new(&mut self, mut index: i32, negative: bool, count: u64) {
        let side = if negative {
            &self.negative
        } else {
            &self.positive
        };
        let steps = side.steps_for(index);
        if steps > 0 {
            self.downscale(steps);
            index >>= steps;
        }
        let side = if negative {
            &mut self.negative
        } else {
            &mut self.positive
        };
        side.add(index, count);
    }

    /// Lowers the scale by `steps`, merging neighbour buckets exactly.
    fn downscale(&mut self, steps: i32) {
        let steps = steps.min(self.scale - MIN_SCALE);
        self.positive.downscale(steps);
        self.negative.downscale(steps);
        self.scale -= steps;
    }

    /// This histogram at `scale` or lower (never higher: finer buckets cannot be made up).
    pub fn downscaled(&self, scale: i32) -> Self {
        let mut h = self.clone();
        if scale < h.scale {
            h.downscale(h.scale - scale);
        }
        h
    }

    /// Adds every observation of `other`, at the lower of the two scales (lower still if
    /// the union needs more than [`MAX_BUCKETS`] buckets on a side).
    pub fn merge(&mut self, other: &Self) {
        let mut other = other.downscaled(self.scale);
        if other.scale < self.scale {
            self.downscale(self.scale - other.scale);
        }
        // Both at one scale: the steps the union of each side needs.
        let steps = union_steps(&self.positive, &other.positive)
            .max(union_steps(&self.negative, &other.negative));
        if steps > 0 {
            self.downscale(steps);
            other.downscale(steps);
        }
        for (i, c) in other.positive.iter().filter(|&(_, c)| c > 0) {
            self.positive.add(i, c);
        }
        for (i, c) in other.negative.iter().filter(|&(_, c)| c > 0) {
            self.negative.add(i, c);
        }
        self.zero_count += other.zero_count;
        self.totals.merge(&other.totals);
    }

    /// The current scale.
    pub fn scale(&self) -> i32 {
        self.scale
    }

    /// Observations equal to zero.
    pub fn zero_count(&self) -> u64 {
        self.zero_count
    }

    /// Buckets of positive observations.
    pub fn positive(&self) -> &Buckets {
        &self.positive
    }

    /// Buckets of negative observations (by magnitude).
    pub fn negative(&self) -> &Buckets {
        &self.negative
    }

    /// Observations.
    pub fn count(&self) -> u64 {
        self.totals.count
    }

    /// Sum of observations (exact while [`integer_sum`](Self::integer_sum) is `Some`
    /// and below 2^53).
    pub fn sum(&self) -> f64 {
        self.totals.sum()
    }

    /// The exact sum while only `u64` observations were recorded.
    pub fn integer_sum(&self) -> Option<u128> {
        self.totals.integer_sum()
    }

    /// The smallest observation (as `f64`: integers above 2^53 are rounded).
    pub fn min(&self) -> Option<f64> {
        self.totals.min()
    }

    /// The largest observation (as `f64`: integers above 2^53 are rounded).
    pub fn max(&self) -> Option<f64> {
        self.totals.max()
    }

    /// As a Prometheus native histogram.
    pub fn native(&self) -> Native {
        let steps = (self.scale - NATIVE_MAX_SCHEMA).max(0);
        Native {
            schema: (self.scale - steps).max(NATIVE_MIN_SCHEMA),
            zero_count: self.zero_count,
            positive: NativeBuckets::from_buckets(&self.positive, steps),
            negative: NativeBuckets::from_buckets(&self.negative, steps),
        }
    }

    /// Every bucket in value order, `(lower, upper, count)`: negatives from the most
    /// negative, the zero bucket as `(0, 0, n)`, then positives.
    fn ordered(&self) -> impl Iterator<Item = (f64, f64, u64)> + '_ {
        let s = self.scale;
        let neg = self
            .negative
            .iter()
            .rev()
            .map(move |(i, c)| (-upper_bound(i, s), -lower_bound(i, s), c));
        let zero = std::iter::once((0.0, 0.0, self.zero_count));
        let pos = self
            .positive
            .iter()
            .map(move |(i, c)| (lower_bound(i, s), upper_bound(i, s), c));
        neg.chain(zero).chain(pos)
    }
}

/// A Prometheus native histogram's buckets: spans of consecutive buckets and
/// delta-encoded counts, in Prometheus' numbering (bucket `i` holds
/// `(base^(i-1), base^i]`, one more than OpenTelemetry's index).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NativeBuckets {
    /// `(offset, length)`: the first span's offset is the first bucket's index, later
    /// offsets count the empty buckets since the previous span.
    pub spans: Vec<(i32, u32)>,
    /// Each bucket's count minus the previous bucket's (the first minus 0).
    pub deltas: Vec<i64>,
}

impl NativeBuckets {
    /// `b` at a scale `steps` lower (no grouping pass when `steps` is 0, the usual case
    /// at schemas up to 8).
    fn from_buckets(b: &Buckets, steps: i32) -> Self {
        // At most one delta, and one span, per bucket held.
        let most = b.counts.iter().filter(|&&c| c > 0).count();
        if steps <= 0 {
            Self::from_pairs(b.iter(), most)
        } else {
            Self::from_pairs(b.grouped(steps), most)
        }
    }

    fn from_pairs(pairs: impl Iterator<Item = (i32, u64)>, most: usize) -> Self {
        let mut out = Self {
            spans: Vec::with_capacity(most),
            deltas: Vec::with_capacity(most),
        };
        let mut prev_count: i64 = 0;
        let mut prev_index: Option<i32> = None;
        for (i, c) in pairs.filter(|&(_, c)| c > 0) {
            let index = i + 1;
            match (prev_index, out.spans.last_mut()) {
                (Some(p), Some(span)) if index == p + 1 => span.1 += 1,
                (Some(p), _) => out.spans.push((index - p - 1, 1)),
                (None, _) => out.spans.push((index, 1)),
            }
            prev_index = Some(index);
            let c = c as i64;
            out.deltas.push(c - prev_count);
            prev_count = c;
        }
        out
    }

    /// `(prometheus index, count)` of every bucket (decoding spans and deltas).
    pub fn buckets(&self) -> Vec<(i32, u64)> {
        let mut out = Vec::new();
        let mut deltas = self.deltas.iter();
        let mut count: i64 = 0;
        let mut index: i32 = 0;
        for (n, &(offset, len)) in self.spans.iter().enumerate() {
            index = if n == 0 { offset } else { index + offset };
            for _ in 0..len {
                count += deltas.next().copied().unwrap_or(0);
                out.push((index, count as u64));
                index += 1;
            }
        }
        out
    }
}

/// A Prometheus native histogram (the count, sum and zero threshold 0 come from the
/// histogram itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Native {
    /// The schema, `-4..=8`.
    pub schema: i32,
    /// Observations equal to zero.
    pub zero_count: u64,
    /// Positive buckets.
    pub positive: NativeBuckets,
    /// Negative buckets.
    pub negative: NativeBuckets,
}

// ---------------------------------------------------------------------------------------
// Explicit layouts and the series' histogram.

/// A histogram over configured inclusive upper bounds, then `+Inf`.
#[derive(Clone, Debug, PartialEq)]
pub struct Explicit {
    bounds: Arc<[u64]>,
    counts: Box<[u64]>,
    totals: Totals,
}

impl Explicit {
    /// Empty, over `bounds` (strictly increasing; the config checks them).
    pub fn new(bounds: Arc<[u64]>) -> Self {
        Self {
            counts: vec![0; bounds.len() + 1].into_boxed_slice(),
            bounds,
            totals: Totals::default(),
        }
    }

    /// A histogram from exported parts: `None` unless there is one count more than
    /// bounds and the bounds strictly increase. The count is the buckets' total.
    pub fn from_parts(
        bounds: Vec<u64>,
        counts: Vec<u64>,
        sum: f64,
        min_max: Option<(f64, f64)>,
    ) -> Option<Self> {
        if counts.len() != bounds.len() + 1 || bounds.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        let mut count: u64 = 0;
        for c in &counts {
            count = count.checked_add(*c)?;
        }
        Some(Self {
            bounds: Arc::from(bounds),
            counts: counts.into_boxed_slice(),
            totals: Totals::from_parts(count, sum, min_max),
        })
    }

    /// The bounds, without `+Inf`.
    pub fn bounds(&self) -> &[u64] {
        &self.bounds
    }

    /// Count per bucket, `+Inf` last (not cumulative).
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The bucket `v` lands in.
    pub fn index(&self, v: u64) -> usize {
        self.bounds.partition_point(|&b| b < v)
    }

    /// The bucket of a finite `v`: exact, also for bounds above 2^53.
    pub fn index_f64(&self, v: f64) -> usize {
        if v <= 0.0 {
            // Every bound is >= 0 >= v.
            return 0;
        }
        if v >= 18_446_744_073_709_551_616.0 {
            return self.bounds.len();
        }
        // For integer b: v <= b <=> ceil(v) <= b, and ceil(v) < 2^64 is exact.
        self.index(v.ceil() as u64)
    }

    /// Records `v`.
    #[inline]
    pub fn record(&mut self, v: u64) {
        let i = self.index(v);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.totals.record_u64(v);
    }

    /// Records `v`; NaN and infinities are refused.
    pub fn record_f64(&mut self, v: f64) -> Result<(), NotFinite> {
        if !v.is_finite() {
            return Err(NotFinite);
        }
        let i = self.index_f64(v);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.totals.record_f64(v);
        Ok(())
    }

    /// Every bound, comma-separated, `+Inf` last.
    pub fn bounds_text(&self) -> String {
        let mut parts: Vec<String> = self.bounds.iter().map(u64::to_string).collect();
        parts.push("+Inf".to_owned());
        parts.join(",")
    }
}

/// What a histogram series holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Histogram {
    /// The default: exponential with an automatic scale.
    Exponential(Exponential),
    /// A configured layout.
    Explicit(Explicit),
}

/// A classic cumulative bucket: observations `<= le`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Classic {
    /// The inclusive upper bound (`f64::INFINITY` for the last).
    pub le: f64,
    /// Observations `<= le`.
    pub cumulative: u64,
}

impl Histogram {
    /// An empty histogram: exponential, or over `bounds` if given.
    pub fn new(bounds: Option<Arc<[u64]>>) -> Self {
        match bounds {
            Some(b) => Self::Explicit(Explicit::new(b)),
            None => Self::Exponential(Exponential::new()),
        }
    }

    /// Records `v`.
    #[inline]
    pub fn record(&mut self, v: u64) {
        match self {
            Self::Exponential(h) => h.record(v),
            Self::Explicit(h) => h.record(v),
        }
    }

    /// Records `v`; NaN and infinities are refused.
    #[inline]
    pub fn record_f64(&mut self, v: f64) -> Result<(), NotFinite> {
        match self {
            Self::Exponential(h) => h.record_f64(v),
            Self::Explicit(h) => h.record_f64(v),
        }
    }

    fn totals(&self) -> &Totals {
        match self {
            Self::Exponential(h) => &h.totals,
            Self::Explicit(h) => &h.totals,
        }
    }

    /// Observations.
    pub fn count(&self) -> u64 {
        self.totals().count
    }

    /// Sum of observations.
    pub fn sum(&self) -> f64 {
        self.totals().sum()
    }

    /// The exact sum while only `u64` observations were recorded.
    pub fn integer_sum(&self) -> Option<u128> {
        self.totals().integer_sum()
    }

    /// The sum as text: the exact integer while only integers were recorded, else the
    /// shortest decimal that reads back as the `f64` sum.
    pub fn sum_text(&self) -> String {
        match self.integer_sum() {
            Some(s) => s.to_string(),
            None => format!("{}", self.sum()),
        }
    }

    /// The smallest observation.
    pub fn min(&self) -> Option<f64> {
        self.totals().min()
    }

    /// The largest observation.
    pub fn max(&self) -> Option<f64> {
        self.totals().max()
    }

    /// Classic cumulative `le` buckets, `+Inf` last. Explicit layouts give their bounds.
    /// Exponential histograms give their bucket boundaries at `min(scale, 0)`, which
    /// are powers of two and so exact as `f64` (finer detail is in the native buckets);
    /// negative observations count in every bucket, as `le` means.
    pub fn classic(&self) -> Vec<Classic> {
        let mut out = Vec::with_capacity(match self {
            Self::Explicit(h) => h.counts.len(),
            Self::Exponential(h) => h.positive.counts.len() + 2,
        });
        match self {
            Self::Explicit(h) => {
                let mut acc = 0;
                for (i, c) in h.counts.iter().enumerate() {
                    acc += c;
                    let le = h.bounds.get(i).map_or(f64::INFINITY, |&b| b as f64);
                    out.push(Classic {
                        le,
                        cumulative: acc,
                    });
                }
            }
            Self::Exponential(h) => {
                let (steps, scale) = (h.scale.max(0), h.scale.min(0));
                let mut acc: u64 = h.negative.counts.iter().sum::<u64>() + h.zero_count;
                if acc > 0 || h.positive.is_empty() {
                    out.push(Classic {
                        le: 0.0,
                        cumulative: acc,
                    });
                }
                for (i, c) in h.positive.grouped(steps) {
                    acc += c;
                    let le = upper_bound(i, scale);
                    if le.is_finite() {
                        out.push(Classic {
                            le,
                            cumulative: acc,
                        });
                    }
                }
                out.push(Classic {
                    le: f64::INFINITY,
                    cumulative: h.count(),
                });
            }
        }
        out
    }

    /// An upper estimate of the `q`-quantile (`0 <= q <= 1`): the upper bound of the
    /// bucket where the rank falls, clamped to the observed min and max, so at most one
    /// bucket width above the true value. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let (min, max) = (self.min()?, self.max()?);
        let mut acc = 0;
        let found = match self {
            Self::Explicit(h) => h.counts.iter().enumerate().find_map(|(i, &c)| {
                acc += c;
                (acc >= rank).then(|| h.bounds.get(i).map_or(max, |&b| b as f64))
            }),
            Self::Exponential(h) => h.ordered().find_map(|(_, upper, c)| {
                acc += c;
                (acc >= rank).then_some(upper)
            }),
        };
        Some(found.unwrap_or(max).clamp(min, max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference mapping by exact rational comparison for scales <= 0 and small positive
    /// scales: the bucket `i` with `base^i < v <= base^(i+1)`, found by comparing
    /// `v^(2^s)` with powers of two in exact big-integer arithmetic.
    fn reference_index(v: u64, scale: i32) -> i32 {
        use num_bigint::BigUint;
        assert!(v > 0);
        if scale <= 0 {
            // ceil(log2 v) - 1, then floor-divided by 2^-scale.
            let e = 63 - v.leading_zeros() as i32;
            let ceil_log = if v.is_power_of_two() { e } else { e + 1 };
            return (ceil_log - 1) >> -scale;
        }
        // v^(2^s) > 2^i <=> v > base^i. Find the largest i with 2^i < v^(2^s).
        let p = BigUint::from(v).pow(1u32 << scale);
        let bits = p.bits() as i32; // 2^(bits-1) <= p < 2^bits
        let mut i = bits - 1;
        if BigUint::from(1u8) << (i as u32) == p {
            i -= 1;
        }
        i
    }

    #[test]
    fn the_table_holds_exact_floors() {
        let t = table::get();
        assert_eq!(t.len(), table::LEN);
        for (n, &entry) in t.iter().enumerate() {
            let k = n as u32 + 1;
            assert_eq!(table::pow_below(entry, k), Some(true), "k {k}");
            assert_eq!(table::pow_below(entry + 1, k), Some(false), "k {k}");
        }
        assert!(t.windows(2).all(|w| w[0] < w[1]));
        // sqrt(2) * 2^63 = 13043817825332782212.349...
        assert_eq!(t[(1 << (MAX_SCALE - 1)) - 1], 13_043_817_825_332_782_212);
    }

    #[test]
    fn the_fast_lookup_agrees_with_bisection_at_every_boundary() {
        let t = table::get();
        // Each step of the fast lookup holds at most one boundary (what it relies on).
        for w in t.windows(2) {
            assert!(w[1] - w[0] > 1 << (63 - FAST_BITS));
        }
        let mut mantissas = vec![(1 << 63) + 1, u64::MAX, u64::MAX - 1];
        for &b in t {
            mantissas.extend([b - 1, b, b + 1]);
        }
        for f in 0..1u64 << FAST_BITS {
            let start = (1 << 63) | (f << (63 - FAST_BITS));
            mantissas.extend([start, start.wrapping_sub(1).max((1 << 63) + 1)]);
        }
        for mantissa in mantissas {
            let n = Normalized {
                mantissa,
                exponent: 7,
            };
            for scale in 1..=MAX_SCALE {
                assert_eq!(
                    n.index(scale),
                    n.index_bisect(scale),
                    "mantissa {mantissa:#x} at scale {scale}"
                );
            }
        }
    }

    #[test]
    fn powers_of_two_belong_to_the_bucket_below() {
        for scale in MIN_SCALE..=MAX_SCALE {
            for e in 0..64i32 {
                let want = if scale >= 0 {
                    (e << scale) - 1
                } else {
                    (e - 1) >> -scale
                };
                assert_eq!(
                    index_u64(1 << e, scale),
                    Some(want),
                    "2^{e} at scale {scale}"
                );
                assert_eq!(index(pow2(i64::from(e)), scale), Some(want), "2^{e} as f64");
            }
        }
    }

    #[test]
    fn boundaries_at_several_scales_match_the_reference() {
        for scale in [-4, -3, -1, 0, 1, 2, 3, 4] {
            for e in 0..62u32 {
                let p = 1u64 << e;
                for v in [
                    p.saturating_sub(1),
                    p,
                    p + 1,
                    p + p / 3,
                    3 * p,
                    p.saturating_mul(2) - 1,
                ] {
                    if v == 0 {
                        continue;
                    }
                    assert_eq!(
                        index_u64(v, scale),
                        Some(reference_index(v, scale)),
                        "{v} at scale {scale}"
                    );
                }
            }
        }
    }

    #[test]
    fn integers_next_to_irrational_boundaries_are_placed_exactly() {
        // For scale 1..=4 and boundaries 2^(i/2^s) near integers: test floor and ceil of
        // every boundary in the first 40 octaves.
        for scale in 1..=4 {
            for i in 0..(40 << scale) {
                let b = lower_bound(i, scale);
                for v in [b.floor() as u64, b.ceil() as u64, b.ceil() as u64 + 1] {
                    if v == 0 {
                        continue;
                    }
                    assert_eq!(
                        index_u64(v, scale),
                        Some(reference_index(v, scale)),
                        "{v} at scale {scale}"
                    );
                }
            }
        }
    }

    #[test]
    fn f64_and_u64_agree_on_integers_and_floats_step_past_boundaries() {
        for scale in MIN_SCALE..=MAX_SCALE {
            for e in -1074..1024i32 {
                let p = pow2(i64::from(e));
                let i = index(p, scale).expect("nonzero");
                // Where 2^e is a boundary of this scale, it is its bucket's upper bound and
                // the next float is in the next bucket; elsewhere both share a bucket.
                let boundary = scale >= 0 || e % (1 << -scale) == 0;
                let next = f64::from_bits(p.to_bits() + 1);
                // (Below 2^-1022 floats are too sparse for fine buckets.)
                if next.is_finite() && e >= -1022 {
                    let want = i + i32::from(boundary);
                    assert_eq!(index(next, scale), Some(want), "above 2^{e} at {scale}");
                }
                assert_eq!(index(-p, scale), Some(i), "negative magnitude");
            }
            for v in [1u64, 2, 3, 1000, 1 << 52, (1 << 53) - 1] {
                assert_eq!(index(v as f64, scale), index_u64(v, scale), "{v}");
            }
        }
        assert_eq!(index(0.0, 0), None);
        assert_eq!(index(f64::NAN, 0), None);
        assert_eq!(index(f64::INFINITY, 0), None);
    }

    #[test]
    fn large_u64_values_keep_every_bit() {
        // 2^60 + 1 rounds to 2^60 as an f64, which is a boundary: the u64 path must not.
        let v = (1u64 << 60) + 1;
        assert_eq!(index_u64(v, 0), Some(60));
        assert_eq!(index_u64(1 << 60, 0), Some(59));
        assert_eq!(index_u64(u64::MAX, 0), Some(63));
    }

    fn buckets_of(h: &Exponential) -> Vec<(i32, u64)> {
        h.positive.iter().filter(|&(_, c)| c > 0).collect()
    }

    #[test]
    fn a_narrow_range_stays_at_the_finest_scale() {
        let mut h = Exponential::new();
        for v in [1000, 1001, 1002, 1010] {
            h.record(v);
        }
        assert_eq!(h.scale(), MAX_SCALE);
        assert_eq!(h.count(), 4);
        assert_eq!(h.integer_sum(), Some(4013));
        let want: Vec<i32> = [1000u64, 1001, 1002, 1010]
            .iter()
            .map(|&v| index_u64(v, MAX_SCALE).expect("nonzero"))
            .collect();
        assert_eq!(buckets_of(&h).iter().map(|b| b.0).collect::<Vec<_>>(), want);
    }

    #[test]
    fn a_wide_range_downscales_to_fit_160_buckets() {
        let mut h = Exponential::new();
        h.record(1);
        h.record(u64::MAX);
        // 64 octaves in 160 buckets: scale 1 (2 per octave) gives 128.
        assert_eq!(h.scale(), 1);
        assert!(h.positive.counts().len() <= MAX_BUCKETS);
        assert_eq!(buckets_of(&h), vec![(-1, 1), (127, 1)]);
        h.record_f64(f64::MIN_POSITIVE / 4.0).expect("finite");
        h.record_f64(f64::MAX).expect("finite");
        assert_eq!(h.scale(), -4);
        assert!(h.positive.counts().len() <= MAX_BUCKETS);
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn zero_and_negatives_go_to_their_own_buckets() {
        let mut h = Exponential::new();
        h.record(0);
        h.record_f64(0.0).expect("finite");
        h.record_f64(-0.0).expect("finite");
        h.record_f64(-4.0).expect("finite");
        h.record_f64(2.5).expect("finite");
        assert_eq!(h.record_f64(f64::NAN), Err(NotFinite));
        assert_eq!(h.record_f64(f64::NEG_INFINITY), Err(NotFinite));
        assert_eq!(h.zero_count(), 3);
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum(), -1.5);
        assert_eq!(h.integer_sum(), None);
        assert_eq!(
            h.negative
                .iter()
                .filter(|&(_, c)| c > 0)
                .collect::<Vec<_>>(),
            vec![(index(4.0, h.scale()).expect("nonzero"), 1)]
        );
        assert_eq!((h.min(), h.max()), (Some(-4.0), Some(2.5)));
    }

    #[test]
    fn extremes_span_integers_and_floats_and_survive_serialization() {
        let mut h = Exponential::new();
        assert_eq!((h.min(), h.max()), (None, None));
        h.record(7);
        assert_eq!((h.min(), h.max()), (Some(7.0), Some(7.0)));
        h.record(u64::MAX);
        h.record_f64(3.5).expect("finite");
        assert_eq!((h.min(), h.max()), (Some(3.5), Some(u64::MAX as f64)));
        h.record_f64(1e30).expect("finite");
        h.record(0);
        assert_eq!((h.min(), h.max()), (Some(0.0), Some(1e30)));
        let text = serde_json::to_string(&h).expect("serializes");
        let back: Exponential = serde_json::from_str(&text).expect("deserializes");
        assert_eq!(back, h);
        let mut merged = Exponential::new();
        merged.merge(&back);
        assert_eq!((merged.min(), merged.max()), (Some(0.0), Some(1e30)));
        let mut ints = Explicit::new(Arc::from(vec![10u64, 20]));
        ints.record(15);
        ints.record(3);
        let ints = Histogram::Explicit(ints);
        assert_eq!((ints.min(), ints.max()), (Some(3.0), Some(15.0)));
    }

    #[test]
    fn native_buckets_shift_by_one_and_clamp_the_schema() {
        let mut h = Exponential::new();
        for v in [1u64, 2, 2, 3, 1 << 20] {
            h.record(v);
        }
        let n = h.native();
        assert_eq!(n.schema, 8.min(h.scale()));
        let want: Vec<(i32, u64)> = {
            let d = h.downscaled(n.schema);
            d.positive
                .iter()
                .filter(|&(_, c)| c > 0)
                .map(|(i, c)| (i + 1, c))
                .collect()
        };
        assert_eq!(n.positive.buckets(), want);
        // 1 -> OTel index -1 -> Prometheus index 0 at every schema.
        assert_eq!(n.positive.buckets()[0], (0, 1));
        assert_eq!(n.positive.deltas.iter().sum::<i64>(), 1, "last count");
    }

    #[test]
    fn classic_buckets_are_cumulative_at_powers_of_two() {
        let mut h = Histogram::new(None);
        for v in [0u64, 1, 2, 3, 4, 5, 1 << 40] {
            h.record(v);
        }
        let c = h.classic();
        let find = |le: f64| c.iter().find(|b| b.le == le).map(|b| b.cumulative);
        assert_eq!(find(0.0), Some(1));
        assert_eq!(find(1.0), Some(2));
        assert_eq!(find(2.0), Some(3));
        assert_eq!(find(4.0), Some(5));
        assert_eq!(find(8.0), Some(6));
        assert_eq!(find(f64::INFINITY), Some(7));
        assert!(
            c.windows(2)
                .all(|w| w[0].le < w[1].le && w[0].cumulative <= w[1].cumulative)
        );
    }

    #[test]
    fn explicit_bounds_are_inclusive_for_integers_and_floats() {
        let mut h = Explicit::new(Arc::from(vec![10, 100, u64::MAX - 1]));
        assert_eq!([0, 10, 11, 100, 101].map(|v| h.index(v)), [0, 0, 1, 1, 2]);
        assert_eq!(
            [-5.0, 0.0, 10.0, 10.000001, 100.0, 1e19, 2e19].map(|v| h.index_f64(v)),
            [0, 0, 0, 1, 1, 2, 3]
        );
        h.record(10);
        h.record_f64(10.5).expect("finite");
        assert_eq!(h.counts(), [1, 1, 0, 0]);
        assert_eq!(h.bounds_text(), format!("10,100,{},+Inf", u64::MAX - 1));
    }

    #[test]
    fn quantiles_are_bucket_upper_bounds() {
        let mut h = Histogram::new(None);
        for v in 1..=1000u64 {
            h.record(v);
        }
        let Histogram::Exponential(e) = &h else {
            panic!("exponential by default");
        };
        let width = (1.0f64 / f64::from(1u32 << e.scale())).exp2();
        let p50 = h.quantile(0.5).expect("some");
        let p99 = h.quantile(0.99).expect("some");
        // At most one bucket width above the true value.
        assert!(500.0 <= p50 && p50 <= 500.0 * width, "{p50}");
        assert!(990.0 <= p99 && p99 <= 990.0 * width, "{p99}");
        assert_eq!(h.quantile(1.0), Some(1000.0));
        assert_eq!(Histogram::new(None).quantile(0.5), None);
    }

    fn naive(values: &[u64], scale: i32) -> Vec<(i32, u64)> {
        let mut m = std::collections::BTreeMap::new();
        for &v in values {
            if let Some(i) = index_u64(v, scale) {
                *m.entry(i).or_insert(0u64) += 1;
            }
        }
        m.into_iter().collect()
    }

    proptest! {
        #[test]
        fn the_fast_lookup_agrees_with_bisection(mantissa in (1u64 << 63).., scale in 1i32..=MAX_SCALE) {
            let n = Normalized { mantissa, exponent: -3 };
            prop_assert_eq!(n.index(scale), n.index_bisect(scale));
        }

        #[test]
        fn every_value_is_in_its_bucket_at_the_final_scale(
            values in proptest::collection::vec(any::<u64>(), 1..200),
            small in proptest::collection::vec(0u64..5000, 0..200),
        ) {
            let all: Vec<u64> = values.iter().chain(&small).copied().collect();
            let mut h = Exponential::new();
            for &v in &all {
                h.record(v);
            }
            prop_assert!(h.positive.counts().len() <= MAX_BUCKETS);
            prop_assert_eq!(buckets_of(&h), naive(&all, h.scale()));
            prop_assert_eq!(h.zero_count(), all.iter().filter(|&&v| v == 0).count() as u64);
            prop_assert_eq!(h.count(), all.len() as u64);
            prop_assert_eq!(h.integer_sum(), Some(all.iter().map(|&v| u128::from(v)).sum()));
            // The final scale is the finest that fits.
            if h.scale() < MAX_SCALE {
                let finer = naive(&all, h.scale() + 1);
                let span = finer.last().map_or(0, |l| l.0) - finer.first().map_or(0, |f| f.0);
                prop_assert!(span >= MAX_BUCKETS as i32);
            }
        }

        #[test]
        fn merging_equals_recording_everything_into_one(
            a in proptest::collection::vec(any::<u64>(), 0..100),
            b in proptest::collection::vec(1u64..100_000, 0..100),
            c in proptest::collection::vec(-1e12f64..1e12, 0..50),
        ) {
            let mut ha = Exponential::new();
            let mut hb = Exponential::new();
            let mut one = Exponential::new();
            for &v in &a { ha.record(v); one.record(v); }
            for &v in &b { hb.record(v); one.record(v); }
            for &v in &c { hb.record_f64(v).expect("finite"); one.record_f64(v).expect("finite"); }
            ha.merge(&hb);
            // Both are at the finest scale the union fits in.
            let (m, o) = (ha, one);
            prop_assert_eq!(m.scale(), o.scale());
            prop_assert_eq!(buckets_of(&m), buckets_of(&o));
            prop_assert_eq!(
                m.negative.iter().filter(|&(_, c)| c > 0).collect::<Vec<_>>(),
                o.negative.iter().filter(|&(_, c)| c > 0).collect::<Vec<_>>()
            );
            prop_assert_eq!(m.zero_count(), o.zero_count());
            prop_assert_eq!(m.count(), o.count());
            prop_assert!(m.positive.counts().len() <= MAX_BUCKETS);
        }

        #[test]
        fn conversions_equal_an_explicit_downscale(
            values in proptest::collection::vec(1u64..1 << 30, 1..100),
            narrow in proptest::collection::vec(1000u64..1010, 1..50),
        ) {
            for set in [&values, &narrow] {
                let mut h = Exponential::new();
                set.iter().for_each(|&v| h.record(v));
                let d = h.downscaled(NATIVE_MAX_SCHEMA);
                let n = h.native();
                prop_assert_eq!(n.schema, d.scale());
                prop_assert_eq!(n.positive, NativeBuckets::from_pairs(d.positive.iter(), 0));
                // Classic: cumulative counts at the scale-0 boundaries, checked value by value.
                for b in Histogram::Exponential(h.clone()).classic() {
                    let want = set.iter().filter(|&&v| (v as f64) <= b.le).count() as u64;
                    prop_assert_eq!(b.cumulative, want, "le {}", b.le);
                }
            }
        }

        #[test]
        fn f64_placement_matches_the_bucket_bounds(v in 1e-300f64..1e300, scale in -4i32..=10) {
            let i = index(v, scale).expect("nonzero");
            // Bounds from exp2 are approximate at positive scales: check with a margin
            // that only excludes values within a few ulps of an irrational boundary.
            let (lo, hi) = (lower_bound(i, scale), upper_bound(i, scale));
            if scale <= 0 {
                prop_assert!(lo < v && v <= hi, "{} not in ({}, {}]", v, lo, hi);
            } else {
                prop_assert!(lo * (1.0 - 1e-12) < v && v <= hi * (1.0 + 1e-12));
            }
        }
    }
}
