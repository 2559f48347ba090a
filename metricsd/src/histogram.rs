//! Histogram bucket layouts.
//!
//! Every layout is a list of inclusive upper bounds (Prometheus `le` semantics) plus a
//! final `+Inf` bucket. A value `v` lands in the first bucket whose bound is `>= v`.
//!
//! The default layout is base-2 exponential with 66 buckets:
//!
//! | bucket | upper bound (inclusive) | values |
//! | --- | --- | --- |
//! | 0 | 0 | `0` |
//! | 1 | 1 | `1` |
//! | k (2..=64) | 2^(k-1) | `2^(k-2) < v <= 2^(k-1)` |
//! | 65 | +Inf | `v > 2^63` |
//!
//! Configured layouts (`[histograms]`) hold at most 159 bounds, so at most 160 buckets.

use std::sync::Arc;

/// Buckets in the default base-2 exponential layout.
pub const EXP_BUCKETS: usize = 66;

/// A bucket layout: inclusive upper bounds, then an implicit `+Inf` bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// The base-2 exponential layout described in the module docs.
    Exponential,
    /// Explicit inclusive upper bounds, strictly increasing.
    Explicit(Arc<[u64]>),
}

impl Layout {
    /// Number of buckets, `+Inf` included.
    pub fn buckets(&self) -> usize {
        match self {
            Self::Exponential => EXP_BUCKETS,
            Self::Explicit(bounds) => bounds.len() + 1,
        }
    }

    /// The bucket `value` lands in.
    #[inline]
    pub fn index(&self, value: u64) -> usize {
        match self {
            Self::Exponential => exp_index(value),
            Self::Explicit(bounds) => bounds.partition_point(|&b| b < value),
        }
    }

    /// The bucket the float `value` lands in. Every bound is an integer, so a bound is
    /// at least `value` exactly when it is at least `value` rounded up: a float lands
    /// in the same bucket as its ceiling (anything at or below zero in the first
    /// bucket whose bound is at least zero, which is the first), exactly as the
    /// inclusive `le` bounds say. NaN lands in the last bucket; callers refuse it first.
    pub fn index_f64(&self, value: f64) -> usize {
        if value.is_nan() {
            return self.buckets() - 1;
        }
        if value <= 0.0 {
            return self.index(0);
        }
        let ceiling = value.ceil();
        if ceiling >= 18_446_744_073_709_551_616.0 {
            // Above u64::MAX: past every bound.
            return self.buckets() - 1;
        }
        self.index(ceiling as u64)
    }

    /// The upper bound of bucket `i` as exported text (`+Inf` for the last).
    pub fn bound_text(&self, i: usize) -> String {
        match self {
            Self::Exponential => match i {
                0 => "0".to_owned(),
                1..=64 => (1u64 << (i - 1)).to_string(),
                _ => "+Inf".to_owned(),
            },
            Self::Explicit(bounds) => bounds
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), u64::to_string),
        }
    }

    /// Every bound, comma-separated, `+Inf` last.
    pub fn bounds_text(&self) -> String {
        let mut out = String::new();
        for i in 0..self.buckets() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&self.bound_text(i));
        }
        out
    }
}

/// Bucket of `value` in the exponential layout: 0 for 0, else `1 + ceil(log2 v)`.
#[inline]
fn exp_index(value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + (64 - (value - 1).leading_zeros()) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_buckets_follow_the_table() {
        let l = Layout::Exponential;
        let cases = [
            (0, 0),
            (1, 1),
            (2, 2),
            (3, 3),
            (4, 3),
            (5, 4),
            (8, 4),
            (9, 5),
            (1 << 63, 64),
            ((1 << 63) + 1, 65),
            (u64::MAX, 65),
        ];
        for (v, i) in cases {
            assert_eq!(l.index(v), i, "value {v}");
            let bound = l.bound_text(i);
            if bound != "+Inf" {
                assert!(v <= bound.parse::<u64>().expect("number"), "{v} <= {bound}");
            }
        }
        assert_eq!(l.buckets(), 66);
        assert!(l.bounds_text().starts_with("0,1,2,4,8,"));
        assert!(l.bounds_text().ends_with(",9223372036854775808,+Inf"));
    }

    #[test]
    fn floats_land_where_their_inclusive_bounds_say() {
        let l = Layout::Exponential;
        for (v, i) in [
            (-5.0, 0),
            (0.0, 0),
            (0.25, 1),
            (1.0, 1),
            (1.0001, 2),
            (2.0, 2),
            (2.5, 3),
            (4.0, 3),
            (4.000001, 4),
            (1e30, 65),
            (f64::INFINITY, 65),
        ] {
            assert_eq!(l.index_f64(v), i, "value {v}");
        }
        let e = Layout::Explicit(Arc::from(vec![10, 100]));
        assert_eq!(
            [-1.0, 9.5, 10.0, 10.5, 100.0, 100.1].map(|v| e.index_f64(v)),
            [0, 0, 0, 1, 1, 2]
        );
    }

    #[test]
    fn explicit_bounds_are_inclusive() {
        let l = Layout::Explicit(Arc::from(vec![10, 100]));
        assert_eq!(l.buckets(), 3);
        assert_eq!([0, 10, 11, 100, 101].map(|v| l.index(v)), [0, 0, 1, 1, 2]);
        assert_eq!(l.bounds_text(), "10,100,+Inf");
    }
}
