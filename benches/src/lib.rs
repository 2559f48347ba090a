//! Criterion benchmarks of the telemetry pipeline against its peers. This library holds
//! what the bench binaries (`benches/*.rs`) share: where each side runs.

/// Where the producer (thread or child process) runs.
pub const PRODUCER_CPU: usize = 0;
/// Where the consumer (a reader thread, metricsd, the StatsD receiver) runs.
pub const CONSUMER_CPU: usize = 1;
/// Set in the environment to leave threads unpinned (to compare).
pub const NO_PIN_ENV: &str = "TELEMETRY_BENCH_NO_PIN";

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
