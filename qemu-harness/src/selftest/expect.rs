//! Expected values, computed from what the selftest recorded: bucket placement written
//! here independently of metricsd's (a bound is an inclusive upper bound, Prometheus
//! `le`), and the text forms metricsd exports them in.

/// The upper bounds of metricsd's default layout, without `+Inf`: 0, 1, 2, 4, ..., 2^63.
#[must_use]
pub fn exponential_bounds() -> Vec<u64> {
    let mut bounds = vec![0];
    bounds.extend((0..64).map(|k| 1u64 << k));
    bounds
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

/// A span id as metricsd exports it: 16 hex digits of the ring id, 16 of the local id.
/// Returns `(ring, local)`.
#[must_use]
pub fn split_span_id(id: &str) -> Option<(u64, u64)> {
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let ring = u64::from_str_radix(id.get(..16)?, 16).ok()?;
    let local = u64::from_str_radix(id.get(16..)?, 16).ok()?;
    Some((ring, local))
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
    fn exponential_layout_has_66_buckets() {
        let bounds = exponential_bounds();
        assert_eq!(bounds.len() + 1, 66);
        let counts = bucket_counts(&bounds, &[0, 1, 2, 3, 4, 5, 1 << 63, (1 << 63) + 1]);
        assert_eq!(counts[..5], [1, 1, 1, 2, 1]);
        assert_eq!(counts[64], 1);
        assert_eq!(counts[65], 1);
    }

    #[test]
    fn boundary_values_straddle_each_bound() {
        let v = boundary_values(&[10]);
        assert_eq!(v, [0, u64::MAX, 9, 10, 11]);
        assert_eq!(sum(&[u64::MAX, 1]), u128::from(u64::MAX) + 1);
    }

    #[test]
    fn span_ids_split_into_ring_and_local() {
        assert_eq!(
            split_span_id("000000000000000a0000000000000003"),
            Some((10, 3))
        );
        assert_eq!(split_span_id("0a03"), None);
        assert_eq!(split_span_id("zz00000000000000000000000000000003"), None);
    }
}
