//! Hot-path instrumentation for services and drivers: counters, gauges, histograms and
//! spans written into a shared-memory ring.
#![cfg_attr(not(any(feature = "std", test)), no_std)]

mod clock;
mod key;
mod recorder;
mod registry;

pub use clock::{Clock, ManualClock};
pub use key::{Key, KeyTable};
pub use recorder::{AttrValue, Delivery, Dropped, Recorder, RecorderStats, SpanId};
pub use registry::{Descriptor, RegistrationScratch, Registry, StaticRegistry};
pub use telemetry_abi::{RegisterKind, SpanStatus};
