//! A single-producer/single-consumer ring of fixed-size telemetry records in shared
//! memory, written for a consumer that must survive a hostile producer.
//!
//! Who uses this crate: `nexus-metrics` (the producer library) writes through a
//! [`Writer`]; `metricsd` drains through a [`Reader`]. The byte layout both sides see
//! is `telemetry-abi`'s; this crate is the protocol over it and the only crate in the
//! workspace with `unsafe` code.
//!
//! ```
//! use std::sync::Arc;
//! use telemetry_abi::Record;
//! use telemetry_ring::{HeapRegion, Reader, Writer};
//!
//! let region = Arc::new(HeapRegion::new(1024).expect("a power of two"));
//! let (mut writer, mut reader) = (Writer::new(region.clone()), Reader::new(region));
//! for i in 0..10 {
//!     writer.stage(Record::histogram(3, i)).expect("room");
//! }
//! writer.flush(); // one Release store publishes all ten
//! let mut sum = 0;
//! let drained = reader.drain(64, |r| sum += r.words[0]).expect("well-behaved producer");
//! assert_eq!((drained.delivered, sum), (10, 45));
//! ```
//!
//! # The protocol
//!
//! Positions are free-running `u64`s compared only by difference. The writer stores
//! records into slots `write % capacity`, then publishes with a Release store of the
//! write position; the reader Acquire-loads it once per drain, copies records out, and
//! releases the slots with a Release store of the read position, which the writer
//! Acquire-loads only when its cached copy says the ring is full. The reader keeps the
//! geometry and its read position to itself and quarantines the ring if the write
//! position is ever more than a capacity ahead or moves back.
//!
//! # Regions
//!
//! - [`HeapRegion`]: one process (tests, benchmarks, the loom models).
//! - [`MappedRegion`]: the ABI layout at any address (a driver's shared pages).
//! - `MemfdRegion` (Linux, `std`): a sealed memfd, the capability a producer is granted.
//!
//! A child process inherits its parent's mappings, so a writer must not be used on both
//! sides of `fork()`: `on_fork_child` (Linux, `std`) lets a producer library notice.
#![cfg_attr(not(any(feature = "std", test)), no_std)]

#[cfg(feature = "alloc")]
extern crate alloc;

mod error;
#[cfg(all(feature = "std", target_os = "linux", not(telemetry_loom)))]
mod fork;
#[cfg(feature = "alloc")]
mod heap;
#[cfg(not(telemetry_loom))]
mod mapped;
#[cfg(all(feature = "std", target_os = "linux", not(telemetry_loom)))]
mod memfd;
mod reader;
mod region;
pub mod sync;
mod writer;

pub use error::{Full, Quarantined, Violation};
#[cfg(all(feature = "std", target_os = "linux", not(telemetry_loom)))]
pub use fork::on_fork_child;
#[cfg(feature = "alloc")]
pub use heap::HeapRegion;
#[cfg(not(telemetry_loom))]
pub use mapped::{MapError, MappedRegion};
#[cfg(all(feature = "std", target_os = "linux", not(telemetry_loom)))]
pub use memfd::{MemfdError, MemfdRegion};
pub use reader::{Drained, Reader, ReaderStats};
pub use region::Region;
pub use writer::Writer;

#[cfg(all(test, not(telemetry_loom)))]
mod tests;
