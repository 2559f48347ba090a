//! The telemetry daemon: grants rings, drains them, aggregates under hard caps and
//! exports to logd.
pub mod aggregate;
pub mod config;
pub mod health;
pub mod histogram;
pub mod identity;
pub mod keys;
pub mod redact;
pub mod spans;
