//! The telemetry daemon: grants rings, drains them, aggregates under hard caps and exports to logd.
