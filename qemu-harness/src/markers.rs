//! The expected ladders, in one place: every `ok` (or `ready`) marker with its matching
//! `FAIL` marker and its timeout.
//!
//! The guest prints these strings; the host checks them with [`crate::ladder::Checker`].
//! Daemons and selftests print their own markers, and only after the effect was
//! observed (for the selftest: read back from logd and compared exactly).
//!
//! Timeouts are generous because the guest runs under TCG (software emulation) on a
//! shared 2-core machine; `--timeout-factor` scales them all.

use crate::ladder::Step;

/// Printed by the guest init once /proc, /sys, /dev, /tmp and /run are mounted and
/// checked in /proc/self/mountinfo.
pub const INIT_MOUNTS_OK: &str = "init: mounts ok";
/// The init's FAIL marker for its mounts.
pub const INIT_MOUNTS_FAIL: &str = "init: mounts FAIL";

/// Printed by logd once it serves its socket (after a real round trip).
pub const LOGD_READY: &str = "logd: ready";
/// Printed by metricsd only after its first export round trip to logd succeeded.
pub const METRICSD_READY: &str = "metricsd: ready";

/// Printed by the fixture echo daemon after a round trip through its own socket.
pub const FIXTURE_READY: &str = "fixture-echo: ready";
/// Printed by the fixture selftest after an echo through the daemon compared exactly.
pub const FIXTURE_ROUND_TRIP_OK: &str = "SELFTEST: fixture echo round trip ok";
/// The fixture selftest's FAIL marker.
pub const FIXTURE_ROUND_TRIP_FAIL: &str = "SELFTEST: fixture echo round trip FAIL";

/// The selftest's last marker, printed after every check passed.
pub const SELFTEST_DONE: &str = "SELFTEST: done";
/// The selftest's FAIL marker for anything that is not one of its checks.
pub const SELFTEST_FAIL: &str = "SELFTEST: FAIL";

/// Time for the kernel to boot and the init to mount (about 2 s when the machine is idle).
const BOOT_SECS: u64 = 90;

/// The full proof ladder (preceded by the init's own mount step).
pub const FULL: &[Step] = &[
    Step::new(INIT_MOUNTS_OK, INIT_MOUNTS_FAIL, BOOT_SECS),
    Step::new(LOGD_READY, "logd: FAIL", 30),
    Step::new(METRICSD_READY, "metricsd: FAIL", 60),
    Step::new(
        "SELFTEST: logd hardening rejects ok",
        "SELFTEST: logd hardening rejects FAIL",
        60,
    ),
    Step::new(
        "SELFTEST: metrics security rejects ok",
        "SELFTEST: metrics security rejects FAIL",
        60,
    ),
    Step::new(
        "SELFTEST: metrics counters ok",
        "SELFTEST: metrics counters FAIL",
        60,
    ),
    Step::new(
        "SELFTEST: metrics gauges ok",
        "SELFTEST: metrics gauges FAIL",
        60,
    ),
    Step::new(
        "SELFTEST: metrics histograms ok",
        "SELFTEST: metrics histograms FAIL",
        60,
    ),
    Step::new(
        "SELFTEST: prometheus scrape ok",
        "SELFTEST: prometheus scrape FAIL",
        60,
    ),
    Step::new(
        "SELFTEST: tracing spans ok",
        "SELFTEST: tracing spans FAIL",
        60,
    ),
    Step::new(
        "SELFTEST: no ipc per sample ok",
        "SELFTEST: no ipc per sample FAIL",
        240,
    ),
    Step::new(
        "SELFTEST: lossless counters under backpressure ok",
        "SELFTEST: lossless counters under backpressure FAIL",
        120,
    ),
    Step::new(
        "SELFTEST: metrics retention ok",
        "SELFTEST: metrics retention FAIL",
        240,
    ),
    Step::new(SELFTEST_DONE, SELFTEST_FAIL, 30),
];

/// The developer ladder, without logd and metricsd. The init mounts,
/// starts the fixture echo daemon through the same daemon machinery (readiness line and
/// socket), runs the fixture selftest through the same selftest machinery, and powers off.
pub const INIT_ONLY: &[Step] = &[
    Step::new(INIT_MOUNTS_OK, INIT_MOUNTS_FAIL, BOOT_SECS),
    Step::new(FIXTURE_READY, "fixture-echo: FAIL", 30),
    Step::new(FIXTURE_ROUND_TRIP_OK, FIXTURE_ROUND_TRIP_FAIL, 30),
    Step::new(SELFTEST_DONE, SELFTEST_FAIL, 30),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ladder::{line_has_fail, line_has_marker};

    fn check(ladder: &[Step]) {
        for (i, step) in ladder.iter().enumerate() {
            assert!(
                line_has_fail(step.fail),
                "{:?} lacks the word FAIL",
                step.fail
            );
            assert!(!line_has_fail(step.ok), "{:?} holds FAIL", step.ok);
            assert!(
                step.ok.ends_with(" ok") || step.ok.ends_with(" ready") || step.ok == SELFTEST_DONE,
                "{:?} is neither ok, ready nor done",
                step.ok
            );
            // No marker may be mistaken for another one.
            for (j, other) in ladder.iter().enumerate() {
                if i != j {
                    assert!(
                        !line_has_marker(step.ok, other.ok),
                        "{} vs {}",
                        step.ok,
                        other.ok
                    );
                }
            }
        }
    }

    #[test]
    fn ladders_are_well_formed() {
        check(FULL);
        check(INIT_ONLY);
    }

    #[test]
    fn full_ladder_is_the_issue_ladder() {
        let ok: Vec<_> = FULL.iter().map(|s| s.ok).collect();
        assert_eq!(ok[1..3], [LOGD_READY, METRICSD_READY]);
        assert_eq!(ok.last(), Some(&SELFTEST_DONE));
        assert_eq!(ok.len(), 14);
    }
}
