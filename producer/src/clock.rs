//! Span timestamps: nanoseconds of `CLOCK_MONOTONIC`, behind a trait so tests (and
//! kernels with their own clock) can supply the time.

use core::sync::atomic::{AtomicU64, Ordering};

/// A source of span timestamps in nanoseconds. Production uses `CLOCK_MONOTONIC`
/// ([`MonotonicClock`](crate::MonotonicClock) with the `std` feature); the value must
/// never go backwards.
pub trait Clock {
    /// Now, in nanoseconds.
    fn now_ns(&self) -> u64;
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }
}

/// A clock that reads whatever it was last set to: exact timestamps for tests.
///
/// ```
/// use nexus_metrics::{Clock, ManualClock};
///
/// static CLOCK: ManualClock = ManualClock::new(1_000);
/// CLOCK.advance(250);
/// assert_eq!(CLOCK.now_ns(), 1_250);
/// ```
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock reading `now_ns`.
    pub const fn new(now_ns: u64) -> Self {
        Self {
            now: AtomicU64::new(now_ns),
        }
    }

    /// Sets the time.
    pub fn set(&self, now_ns: u64) {
        // ORDERING: Relaxed: a test sets the time on the thread that then reads it, or
        // hands over through a synchronising operation (a spawn, a join).
        self.now.store(now_ns, Ordering::Relaxed);
    }

    /// Moves the time forward by `ns`.
    pub fn advance(&self, ns: u64) {
        // ORDERING: Relaxed, as in `set`.
        self.now.fetch_add(ns, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        // ORDERING: Relaxed, as in `set`.
        self.now.load(Ordering::Relaxed)
    }
}
