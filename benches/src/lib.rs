//! Criterion benchmarks of the telemetry pipeline against its peers.
