//! Hot-path instrumentation for services and drivers: counters, gauges, histograms and
//! spans written into a shared-memory ring that `metricsd` drains.
//!
//! Who uses this crate: service authors (the macros and handles below, with the default
//! `std` feature), drivers and kernels (the `no_std` [`Recorder`] over a ring they
//! provide), and `metricsd`'s demo producers. A record is one 32-byte store into the
//! calling thread's own ring: no system call, lock, allocation or IPC message per sample.
//!
//! ```no_run
//! # #[cfg(feature = "std")] mod example {
//! use nexus_metrics::{counter, gauge, histogram, span, Status};
//!
//! fn handle(route: &'static str) {
//!     let request = span!("handle_request");
//!     counter!("http.requests", "route" => "/a", "status" => "200").increment(1);
//!     histogram!("latency_ns", "route" => "/a").record(1234);
//!     let query = span!("db.query", parent: &request);
//!     query.attr("rows", 5u64);
//!     query.attr("route", route);
//!     request.set_status(Status::Ok);
//!     gauge!("queue.depth").set(5);
//! }
//! # }
//! ```
//!
//! # What happens underneath
//!
//! - Each thread claims its own ring from metricsd on its first record (one grant
//!   message over metricsd's control socket, [`SocketSource`]; the fd arrives with
//!   `SCM_RIGHTS`). One connection per process is held open for its life.
//! - Names and label sets are interned once per process into keys; a key's
//!   registration is written into a ring before the key's first record there.
//! - Without metricsd, every record is dropped and counted ([`stats`]); the thread
//!   retries with backoff, never per sample. When metricsd restarts, a watcher thread
//!   sees the hang-up and every thread claims a new ring on its next record.
//! - A full ring drops the record and counts it, except counter increments: they
//!   coalesce per key and are written later, so totals arrive late but never short.
//!
//! # The facades
//!
//! Code instrumented with the `metrics` crate or `tracing` needs no change: with the
//! features `metrics` and `tracing`, the executable installs `MetricsRecorder` (a
//! `metrics::Recorder`) and adds `TracingLayer` (a `tracing_subscriber::Layer`) to its
//! registry, and every macro of the process records into the calling thread's ring with
//! the same caps, redaction and drop accounting as the native handles.
//!
//! # The `no_std` core
//!
//! [`Recorder`] over a [`telemetry_ring::Writer`], a [`KeyTable`] and a [`Registry`]
//! (say a [`StaticRegistry`]) is the same protocol without threads, sockets or an
//! allocator; build with `default-features = false`.
#![cfg_attr(not(any(feature = "std", test)), no_std)]

mod clock;
mod key;
mod recorder;
mod registry;

#[cfg(all(feature = "metrics", target_os = "linux"))]
mod facade_metrics;
#[cfg(all(any(feature = "metrics", feature = "tracing"), target_os = "linux"))]
mod facade_names;
#[cfg(all(feature = "tracing", target_os = "linux"))]
mod facade_tracing;
#[cfg(all(feature = "std", target_os = "linux"))]
mod global;
#[cfg(all(feature = "std", target_os = "linux"))]
mod handles;
#[cfg(all(feature = "std", target_os = "linux"))]
mod hold;
#[cfg(all(feature = "std", target_os = "linux"))]
mod intern;
#[cfg(all(feature = "std", target_os = "linux"))]
mod local;
#[cfg(all(feature = "std", target_os = "linux"))]
mod macros;
#[cfg(all(feature = "std", target_os = "linux"))]
mod socket;
#[cfg(all(feature = "std", target_os = "linux"))]
mod source;
#[cfg(all(feature = "std", target_os = "linux"))]
mod span;
#[cfg(all(feature = "std", target_os = "linux"))]
mod stats;
#[cfg(all(feature = "std", target_os = "linux"))]
mod trace;

pub use clock::{Clock, ManualClock};
pub use key::{Discarded, Key, KeyTable};
pub use recorder::{AttrValue, Delivery, Dropped, Recorder, RecorderStats, SpanId};
pub use registry::{Descriptor, RegistrationScratch, Registry, StaticRegistry};
pub use telemetry_abi::{RegisterKind, SpanStatus};

#[cfg(all(feature = "metrics", target_os = "linux"))]
pub use facade_metrics::MetricsRecorder;
#[cfg(all(feature = "tracing", target_os = "linux"))]
pub use facade_tracing::TracingLayer;
#[cfg(all(feature = "std", target_os = "linux"))]
pub use global::{
    AlreadyInstalled, Config, DEFAULT_MAX_KEYS, MAX_KEYS_LIMIT, MonotonicClock, install, stats,
};
#[cfg(all(feature = "std", target_os = "linux"))]
pub use handles::{Counter, Gauge, Histogram, MetricType, describe};
#[cfg(all(feature = "std", target_os = "linux"))]
pub use intern::KeyError;
#[cfg(all(feature = "std", target_os = "linux"))]
pub use socket::{SOCKET_ENV, SocketSource, default_socket_path};
#[cfg(all(feature = "std", target_os = "linux"))]
pub use source::{ClaimError, RingInfo, RingSource, forks, generation, invalidate};
#[cfg(all(feature = "std", target_os = "linux"))]
pub use span::{MAX_SPAN_ATTRS, Span, SpanName, SpanValue, Status};
#[cfg(all(feature = "std", target_os = "linux"))]
pub use stats::{DropReason, Stats};
#[cfg(all(feature = "std", target_os = "linux"))]
pub use trace::{SpanContext, Traceparent, TraceparentError};

/// Writes the calling thread's pending counter increments (held back by a full ring)
/// if its ring has room now. Returns true when nothing is left pending. Other threads'
/// increments are written by their own next record, their own `flush`, or at their
/// exit.
#[cfg(all(feature = "std", target_os = "linux"))]
pub fn flush() -> bool {
    local::flush()
}

/// Like [`flush`], but retries (sleeping 50 µs between tries) until the pending
/// increments are written or `timeout` has passed. For the end of a thread or process
/// whose totals must be exact: a thread that exits still owing increments gives them
/// up (counted in [`Stats::lost_increments`]).
#[cfg(all(feature = "std", target_os = "linux"))]
pub fn flush_for(timeout: std::time::Duration) -> bool {
    local::flush_for(timeout)
}

/// Implementation details of the macros. Not a stable API.
#[cfg(all(feature = "std", target_os = "linux"))]
#[doc(hidden)]
pub mod __private {
    pub use crate::handles::Site;

    /// Accepts `&str`, `String` and friends in the non-literal macro forms.
    #[inline(always)]
    pub fn as_str<S: AsRef<str> + ?Sized>(s: &S) -> &str {
        s.as_ref()
    }
}
