//! Expected values, computed from what the selftest recorded: bucket placement written
//! here independently of metricsd's (a bound is an inclusive upper bound, Prometheus
//! `le`), and the text forms metricsd exports them in.

/// The bucket of `v > 0` in an exponential histogram at scale 1, where bucket `i` is
/// `(2^(i/2), 2^((i+1)/2)]`: the largest `i` with `2^i < v^2`, in exact integers.
#[must_use]
pub fn scale1_index(v: u64) -> i32 {
    let sq = u128::from(v) * u128::from(v);
    let bits = 128 - sq.leading_zeros() as i32;
    if sq.is_power_of_two() {
        bits - 2
    } else {
        bits - 1
    }
}

/// `values` in an exponential histogram at scale 1: the zero count, the first nonzero
/// bucket's index and the count of every bucket from there to the last nonzero one.
#[must_use]
pub fn scale1_buckets(values: &[u64]) -> (u64, i32, Vec<u64>) {
    let zeros = values.iter().filter(|&&v| v == 0).count() as u64;
    let indices: Vec<i32> = values
        .iter()
        .filter(|&&v| v > 0)
        .map(|&v| scale1_index(v))
        .collect();
    let (Some(&lo), Some(&hi)) = (indices.iter().min(), indices.iter().max()) else {
        return (zeros, 0, Vec::new());
    };
    let mut counts = vec![0u64; (hi - lo + 1) as usize];
    for i in indices {
        counts[(i - lo) as usize] += 1;
    }
    (zeros, lo, counts)
}

/// The count per bucket (`+Inf` last) of `values` under the inclusive upper `bounds`:
/// a value lands in the first bucket whose bound is at least the value.
#[must_use]
pub fn bucket_counts(bounds: &[u64], values: &[u64]) -> Vec<u64> {
    let mut counts = vec![0u64; bounds.len() + 1];
    for &v in values {
        let mut i = bounds.len();
        for (j, &b) in bounds.iter().enumerate() {
            if v <= b {
                i = j;
                break;
            }
        }
        counts[i] += 1;
    }
    counts
}

/// Bounds as metricsd exports them: comma-separated, `+Inf` last.
#[must_use]
pub fn bounds_text(bounds: &[u64]) -> String {
    let mut parts: Vec<String> = bounds.iter().map(u64::to_string).collect();
    parts.push("+Inf".to_owned());
    parts.join(",")
}

/// Numbers comma-separated.
#[must_use]
pub fn csv(values: &[u64]) -> String {
    let parts: Vec<String> = values.iter().map(u64::to_string).collect();
    parts.join(",")
}

/// Values on and around every bound (`b - 1`, `b`, `b + 1`), plus 0 and `u64::MAX`:
/// the cases where an off-by-one in placement shows.
#[must_use]
pub fn boundary_values(bounds: &[u64]) -> Vec<u64> {
    let mut values = vec![0, u64::MAX];
    for &b in bounds {
        values.extend([b.saturating_sub(1), b, b.saturating_add(1)]);
    }
    values
}

/// The sum of `values` without overflow.
#[must_use]
pub fn sum(values: &[u64]) -> u128 {
    values.iter().map(|&v| u128::from(v)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_inclusive_upper_bound() {
        let bounds = [10, 100];
        assert_eq!(bucket_counts(&bounds, &[0, 9, 10]), [3, 0, 0]);
        assert_eq!(bucket_counts(&bounds, &[11, 100, 101]), [0, 2, 1]);
        assert_eq!(bucket_counts(&bounds, &[u64::MAX]), [0, 0, 1]);
        assert_eq!(bounds_text(&bounds), "10,100,+Inf");
    }

    #[test]
    fn scale1_buckets_are_half_powers_of_two() {
        // (1, 1.41]: -1 holds 1; (1.41, 2]: 1 holds 2; (2.83, 4]: 3 holds 3 and 4;
        // (4, 5.66]: 4 holds 5; 2^63 closes 125; 2^63 + 1 opens 126.
        assert_eq!(
            [1, 2, 3, 4, 5, 1 << 63, (1 << 63) + 1, u64::MAX].map(scale1_index),
            [-1, 1, 3, 3, 4, 125, 126, 127]
        );
        let (zeros, offset, counts) = scale1_buckets(&[0, 1, 2, 3, 4]);
        assert_eq!((zeros, offset, counts), (1, -1, vec![1, 0, 1, 0, 2]));
    }

    #[test]
    fn boundary_values_straddle_each_bound() {
        let v = boundary_values(&[10]);
        assert_eq!(v, [0, u64::MAX, 9, 10, 11]);
        assert_eq!(sum(&[u64::MAX, 1]), u128::from(u64::MAX) + 1);
    }
}
