//! The telemetry daemon: grants rings, drains them, aggregates under hard caps and
//! exports to logd.
//!
//! Who uses this crate: the `metricsd` binary, and tests, `metricsd top` and the demo,
//! which run a daemon in-process. Producers never link it: they use `nexus-metrics`
//! and talk to the control socket.
//!
//! ```no_run
//! use std::time::Duration;
//! use metricsd::{Config, Daemon};
//!
//! let mut config = Config::default();
//! config.socket = "/tmp/metricsd-example.sock".into();
//! config.logd_socket = "/tmp/logd-example.sock".into();
//! let daemon = Daemon::start(config)?;
//! daemon.wait_ready(Duration::from_secs(10))?; // a start marker went to logd and back
//! let snapshot = daemon.snapshot()?;
//! println!("{} series, {} rejects", snapshot.series.len(), snapshot.rejects.total());
//! daemon.shutdown();
//! # Ok::<(), metricsd::DaemonError>(())
//! ```
//!
//! The threads: the grant server ([`grant`]) answers the control socket; the drain loop
//! ([`drain`]) owns every ring, the series store ([`aggregate`]) and the span tables
//! ([`spans`]) and builds each interval's export ([`schema`]); the exporter
//! ([`export`]) sends it to a [`Sink`] (logd), and, when an endpoint is configured, the
//! OTLP exporter ([`otlp`]) to an OpenTelemetry collector. The export schema is in [`schema`] and
//! `metricsd/README.md`.

pub mod aggregate;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod drain;
pub mod export;
pub mod grant;
pub mod health;
pub mod histogram;
pub mod identity;
pub mod keys;
pub mod listen;
pub mod otlp;
pub mod probe;
pub mod prometheus;
mod protowire;
pub mod redact;
pub mod retention;
pub mod rollup;
pub mod schema;
pub mod scrape;
pub mod segment;
pub mod sink;
pub mod snapshot;
pub mod spans;
pub mod top;
pub mod wake;

pub use aggregate::{MetricKind, MetricMetadata, Series, Value, series_id};
pub use config::Config;
pub use daemon::{Daemon, DaemonError, DaemonHandle};
pub use health::{Class, Reason};
pub use histogram::Histogram;
pub use identity::{Identify, Peer, Policy};
pub use sink::{LogdSink, MemorySink, Sink};
pub use snapshot::Snapshot;
