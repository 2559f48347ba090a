//! The logic of every fuzz target, as plain functions of the fuzzer's bytes.
//!
//! Who uses this crate: the `cargo fuzz` targets in `fuzz/fuzz_targets/` (one line
//! each, calling [`run`]) and this crate's replay test, which runs every file kept in
//! `fuzz/regressions/<target>/` through the same function on stable Rust as part of the
//! workspace's tests. Each function panics when the code under test breaks one of its
//! invariants, and returns normally otherwise.
//!
//! ```
//! // An ill-sized grant frame is refused, not a crash.
//! telemetry_fuzz::run("grant_request", b"NXGR").expect("a known target");
//! ```

pub mod config;
pub mod drain;
pub mod frame;
pub mod grant;
pub mod input;
pub mod otlp;
pub mod prometheus;
pub mod reader;
pub mod register;
pub mod series;

/// A target's logic: the fuzzer's bytes in, a panic on a broken invariant.
pub type Target = fn(&[u8]);

/// Every target: its name (the file name under `fuzz/fuzz_targets/` and the folder
/// under `fuzz/regressions/`) and its function.
pub const TARGETS: &[(&str, Target)] = &[
    ("grant_request", grant::run),
    ("logd_config", config::logd),
    ("logd_frame", frame::run),
    ("metricsd_config", config::metricsd),
    ("metricsd_drain", drain::run),
    ("otlp_roundtrip", otlp::run),
    ("prometheus_roundtrip", prometheus::run),
    ("registration", register::run),
    ("ring_reader", reader::run),
];

/// Runs `data` through the target called `name`; `None` if there is no such target.
pub fn run(name: &str, data: &[u8]) -> Option<()> {
    let (_, target) = TARGETS.iter().find(|(n, _)| *n == name)?;
    target(data);
    Some(())
}
