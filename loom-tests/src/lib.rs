//! Loom models of the telemetry ring protocol.
//!
//! This crate has no code of its own: the models are the integration tests in
//! `loom-tests/tests/`, and each is gated with `#![cfg(telemetry_loom)]`, so a normal
//! `cargo test --workspace` compiles them to nothing. Under `--cfg telemetry_loom`,
//! `telemetry-ring` swaps its atomics and slot cells for loom's (`ring/src/sync.rs`),
//! and each model runs the real `Writer` and `Reader` over a `HeapRegion` under every
//! interleaving (and every permitted weak-memory outcome) loom explores.
//!
//! Run them in release mode, with a target directory of their own so the different
//! `RUSTFLAGS` do not invalidate the normal build cache:
//!
//! ```text
//! RUSTFLAGS="--cfg telemetry_loom" cargo test -p telemetry-loom-tests --release --target-dir target/loom
//! ```
//!
//! `loom-tests/README.md` says what each model checks, how long the run takes, and which
//! models fail when the ring's Release/Acquire pairs are weakened to Relaxed.
