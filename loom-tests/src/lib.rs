//! Loom models of the telemetry ring protocol.
