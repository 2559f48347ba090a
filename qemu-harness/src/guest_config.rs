//! The daemons' config files in the `full` proof run. The runner packs them into the
//! initramfs; logd and metricsd are started with `--config` on them, and the selftest
//! reads the same files to know the limits it tests against (so a limit is written down
//! once, here).

/// logd's config in the guest.
pub const LOGD_PATH: &str = "/etc/logd.toml";

/// Default limits except the per-sender record budget: low enough that the selftest
/// bursts past it within a few frames, and still far above what metricsd exports (a
/// few hundred records per second at most in the proof run; metricsd retries what is
/// rate limited anyway).
pub const LOGD_TOML: &str = "\
# The QEMU proof run's logd (qemu-harness/src/guest_config.rs).
[quota]
records_per_sec = 1000
records_burst = 2000
";

/// metricsd's config in the guest.
pub const METRICSD_PATH: &str = "/etc/metricsd.toml";

/// A short export interval (the selftest polls logd for its evidence), a per-metric
/// series cap small enough for a quick cardinality flood, a short idle TTL for series
/// no connected producer has registered (the flood's, once its process exited), and
/// explicit bucket layouts for the histogram and span-duration checks.
pub const METRICSD_TOML: &str = "\
# The QEMU proof run's metricsd (qemu-harness/src/guest_config.rs).
[export]
interval_ms = 100

[series]
max_per_metric = 8
idle_ttl_ms = 500

[histograms]
\"selftest.latency_ns\" = [10, 100, 1000, 10000]
\"selftest.request\" = [1000, 4000, 10000]
";

/// A config file packed into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFile {
    /// Absolute path inside the guest (under a directory the initramfs creates).
    pub path: &'static str,
    /// The contents.
    pub contents: &'static str,
}

/// Every config file of the `full` run.
pub const FILES: &[GuestFile] = &[
    GuestFile {
        path: LOGD_PATH,
        contents: LOGD_TOML,
    },
    GuestFile {
        path: METRICSD_PATH,
        contents: METRICSD_TOML,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_valid_for_the_daemons() {
        let logd = logd::Config::parse(LOGD_TOML).expect("logd accepts it");
        assert!(logd.quota.records_burst < 4096, "one frame can exceed it");
        let metricsd = metricsd::Config::from_toml(METRICSD_TOML).expect("metricsd accepts it");
        assert!(metricsd.series.max_per_metric >= 2);
        assert!(metricsd.histograms.contains_key("selftest.latency_ns"));
        assert!(metricsd.histograms.contains_key("selftest.request"));
    }
}
