//! Criterion benchmarks of the telemetry pipeline against its peers. This library holds
//! what the bench binaries (`benches/*.rs`) share: where each side runs.

/// Where the producer (thread or child process) runs.
pub const PRODUCER_CPU: usize = 0;
/// Where the consumer (a reader thread, metricsd, the StatsD receiver) runs.
pub const CONSUMER_CPU: usize = 1;
/// Set in the environment to leave threads unpinned (to compare).
pub const NO_PIN_ENV: &str = "TELEMETRY_BENCH_NO_PIN";

/// Set to `1` to run a bench's interleaved pass even when criterion got arguments (a
/// filter), or to `0` to skip it.
pub const INTERLEAVED_ENV: &str = "TELEMETRY_BENCH_INTERLEAVED";

/// Whether the bench binary runs as a plain full run (`cargo bench ... --bench <name>`:
/// no filter, no other option).
pub fn plain_full_run() -> bool {
    std::env::args().skip(1).all(|arg| arg == "--bench")
}

/// Whether to run a bench's interleaved pass: as [`INTERLEAVED_ENV`] says, and when it
/// is unset only on a plain full run.
pub fn want_interleaved() -> bool {
    match std::env::var(INTERLEAVED_ENV).as_deref() {
        Ok("1") => true,
        Ok(_) => false,
        Err(_) => plain_full_run(),
    }
}

/// Pins the calling thread (and the threads and child processes it starts afterwards,
/// which inherit its affinity) to `cpu`, unless `TELEMETRY_BENCH_NO_PIN` is set. Best
/// effort: on a machine without `cpu` the call fails and the thread keeps its affinity
/// (an unpinned run is still a valid, noisier measurement). Whether to pin is not
/// decided from `available_parallelism`: that follows the caller's affinity, which an
/// earlier pin has narrowed to one CPU.
pub fn pin(cpu: usize) {
    if std::env::var_os(NO_PIN_ENV).is_some() {
        return;
    }
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

/// An interleaved pass: `rounds` rounds in which each of `contenders` contenders runs
/// once (`run(i)` runs contender `i`), in an order rotated by one every round, so that
/// all of them see the same mixture of the machine's states and each runs next to the
/// others. Prints `label: round r of n, s` to stderr every 25 rounds: these passes run
/// for up to a couple of minutes.
pub fn interleave(label: &str, rounds: usize, contenders: usize, mut run: impl FnMut(usize)) {
    let began = std::time::Instant::now();
    for round in 0..rounds {
        if round % 25 == 0 {
            eprintln!(
                "{label}: round {round} of {rounds}, {:.0} s",
                began.elapsed().as_secs_f64()
            );
        }
        for k in 0..contenders {
            run((round + k) % contenders);
        }
    }
}

/// Median, minimum and maximum of `values`, one decimal: `median [min, max]`. Sorts
/// `values` in place.
pub fn summary(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    match (values.first(), values.get(values.len() / 2), values.last()) {
        (Some(min), Some(median), Some(max)) => format!("{median:.1} [{min:.1}, {max:.1}]"),
        _ => "-".to_owned(),
    }
}

/// How contender `a` compares with contender `b` over rounds in which both ran, a few
/// milliseconds apart: the per-round ratios `a[k] / b[k]` (which cancel most of a
/// shared VM's drift between rounds), their median with a 95 % confidence interval,
/// their quartiles, and in how many rounds `a` was below `b`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Paired {
    /// The median per-round ratio.
    pub median: f64,
    /// The 95 % confidence interval of the median ratio, from the order statistics of
    /// the ratios (distribution-free: it assumes only independent rounds).
    pub ci: (f64, f64),
    /// The first and third quartiles of the ratios.
    pub quartiles: (f64, f64),
    /// Rounds in which `a` was below `b`.
    pub below: usize,
    /// Rounds compared.
    pub rounds: usize,
}

impl Paired {
    /// The comparison of `a` to `b` (times, or anything where below is better), round
    /// by round; `None` without rounds or for series of different lengths.
    pub fn new(a: &[f64], b: &[f64]) -> Option<Self> {
        if a.is_empty() || a.len() != b.len() {
            return None;
        }
        let mut ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
        ratios.sort_by(f64::total_cmp);
        let n = ratios.len();
        let at = |i: usize| ratios[i.min(n - 1)];
        // The median's rank in a sample of n is Binomial(n, 1/2): the ranks n/2 -+
        // 1.96 * sqrt(n) / 2 bound it with 95 % confidence.
        let half_width = (0.98 * (n as f64).sqrt()).ceil() as usize;
        Some(Self {
            median: at(n / 2),
            ci: (
                at((n / 2).saturating_sub(half_width)),
                at(n / 2 + half_width),
            ),
            quartiles: (at(n / 4), at(3 * n / 4)),
            below: a.iter().zip(b).filter(|(a, b)| a < b).count(),
            rounds: n,
        })
    }
}

impl std::fmt::Display for Paired {
    /// `median (95 % CI lo-hi) [p25, p75] below in k/n`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} (CI {:.2}-{:.2}) [{:.2}, {:.2}] below in {}/{}",
            self.median,
            self.ci.0,
            self.ci.1,
            self.quartiles.0,
            self.quartiles.1,
            self.below,
            self.rounds
        )
    }
}

/// [`Paired::new`] as text: `-` when there is nothing to compare.
pub fn paired(a: &[f64], b: &[f64]) -> String {
    Paired::new(a, b).map_or_else(|| "-".to_owned(), |p| p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_rotates_the_order_every_round() {
        let mut order = Vec::new();
        interleave("test", 3, 3, |i| order.push(i));
        assert_eq!(order, [0, 1, 2, 1, 2, 0, 2, 0, 1]);
    }

    #[test]
    fn paired_ratios_are_per_round() {
        // a is b halved in every round, whatever the round's level.
        let b = [10.0, 40.0, 20.0, 80.0, 30.0];
        let a: Vec<f64> = b.iter().map(|x| x / 2.0).collect();
        let p = Paired::new(&a, &b).expect("equal lengths");
        assert_eq!((p.median, p.quartiles), (0.5, (0.5, 0.5)));
        assert_eq!((p.below, p.rounds), (5, 5));
    }

    #[test]
    fn the_median_interval_widens_with_fewer_rounds() {
        let b = vec![1.0; 201];
        let a: Vec<f64> = (0..201).map(|i| 0.8 + f64::from(i) * 0.002).collect();
        let p = Paired::new(&a, &b).expect("equal lengths");
        assert!((p.median - 1.0).abs() < 1e-9, "{p}");
        // 201 rounds: ranks 100 -+ 14.
        assert!(
            (p.ci.0 - 0.972).abs() < 1e-9 && (p.ci.1 - 1.028).abs() < 1e-9,
            "{p}"
        );
        assert_eq!(p.below, 100);
        let few = Paired::new(&a[..9], &b[..9]).expect("equal lengths");
        // 9 rounds: ranks 4 -+ 3, the second- and second-to-last values (the exact
        // binomial interval of the median at 96 %).
        assert!(
            (few.ci.0 - 0.802).abs() < 1e-9 && (few.ci.1 - 0.814).abs() < 1e-9,
            "{few}"
        );
        assert_eq!(Paired::new(&a, &b[..3]), None);
        assert_eq!(paired(&[], &[]), "-");
    }
}
