//! The atomics and cells the ring protocol uses, named in one place so that the loom
//! models (`--cfg telemetry_loom`) can swap in loom's checked versions.

#[cfg(telemetry_loom)]
pub use loom::sync::atomic::{AtomicU64, Ordering};

#[cfg(not(telemetry_loom))]
pub use core::sync::atomic::{AtomicU64, Ordering};

/// An `UnsafeCell` with loom's closure-based access API, so the same ring code runs
/// against loom's race-detecting cell and the plain one.
#[cfg(all(feature = "alloc", telemetry_loom))]
#[derive(Debug)]
pub(crate) struct Cell<T>(loom::cell::UnsafeCell<T>);

#[cfg(all(feature = "alloc", not(telemetry_loom)))]
#[derive(Debug)]
pub(crate) struct Cell<T>(core::cell::UnsafeCell<T>);

#[cfg(feature = "alloc")]
impl<T> Cell<T> {
    pub(crate) fn new(value: T) -> Self {
        #[cfg(telemetry_loom)]
        return Self(loom::cell::UnsafeCell::new(value));
        #[cfg(not(telemetry_loom))]
        Self(core::cell::UnsafeCell::new(value))
    }

    /// Runs `f` with a shared pointer to the value.
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        #[cfg(telemetry_loom)]
        return self.0.with(f);
        #[cfg(not(telemetry_loom))]
        f(self.0.get())
    }

    /// Runs `f` with a mutable pointer to the value.
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        #[cfg(telemetry_loom)]
        return self.0.with_mut(f);
        #[cfg(not(telemetry_loom))]
        f(self.0.get())
    }
}
