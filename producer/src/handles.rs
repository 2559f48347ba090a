//! Counter, gauge and histogram handles: registered once, then a `Copy` key.

use std::sync::atomic::{AtomicU64, Ordering};

use telemetry_abi::RegisterKind;

use crate::global::global;
use crate::intern::KeyError;
use crate::key::Key;
use crate::local::{
    self, CounterOp, DeclareOp, GaugeAddOp, GaugeF64Op, GaugeOp, HistogramF64Op, HistogramOp,
};
use crate::stats::DropReason;

/// A registered key, or a no-op and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Handle {
    /// The key; zero for a no-op.
    pub(crate) key: u32,
    /// For a no-op: what its records count as (`None`: an explicit no-op, uncounted).
    noop: Option<DropReason>,
}

impl Handle {
    pub(crate) const NOOP: Self = Self { key: 0, noop: None };

    /// The handle of a key the interner gave out.
    #[cfg_attr(
        not(feature = "tracing"),
        expect(dead_code, reason = "used by the tracing facade only")
    )]
    pub(crate) const fn key(key: u32) -> Self {
        Self { key, noop: None }
    }

    /// A no-op whose records count as [`DropReason::Invalid`].
    #[cfg_attr(
        not(any(feature = "metrics", feature = "tracing")),
        expect(dead_code, reason = "used by the facades only")
    )]
    pub(crate) const fn invalid() -> Self {
        Self {
            key: 0,
            noop: Some(DropReason::Invalid),
        }
    }

    pub(crate) fn register(
        kind: RegisterKind,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<Self, KeyError> {
        global()
            .interner
            .intern(kind, name, labels)
            .map(|key| Self {
                key: key.get(),
                noop: None,
            })
    }

    pub(crate) fn register_or_noop(
        kind: RegisterKind,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Self {
        Self::register(kind, name, labels).unwrap_or_else(|e| Self {
            key: 0,
            noop: Some(match e {
                KeyError::Invalid(_) => DropReason::Invalid,
                KeyError::Limit { .. } => DropReason::KeyLimit,
            }),
        })
    }

    /// Counts a record sent to a no-op handle.
    #[cold]
    #[inline(never)]
    pub(crate) fn dropped(self) {
        if let Some(reason) = self.noop {
            local::count_noop(reason);
        }
    }

    fn pack(self) -> u64 {
        let reason = match self.noop {
            None => 0,
            Some(r) => 1 + DropReason::ALL.iter().position(|x| *x == r).unwrap_or(0) as u64,
        };
        1 << 63 | reason << 32 | u64::from(self.key)
    }

    fn unpack(word: u64) -> Self {
        let key = word as u32;
        if key != 0 {
            // Only a no-op (key 0) carries a reason.
            return Self { key, noop: None };
        }
        let reason = ((word >> 32) & 0xff) as usize;
        Self {
            key,
            noop: reason
                .checked_sub(1)
                .and_then(|i| DropReason::ALL.get(i).copied()),
        }
    }
}

/// A macro's call site, one `static` each: the handle cached there (zero until the first
/// call registers it) and the name and labels that register it. The hot path loads one
/// word; the name and labels are read only on the cold path, by the site's address, so
/// a call never spills them to the stack for a registration that happened long ago.
#[doc(hidden)]
#[derive(Debug)]
pub struct Site {
    cached: AtomicU64,
    name: &'static str,
    labels: &'static [(&'static str, &'static str)],
}

impl Site {
    #[doc(hidden)]
    pub const fn new(name: &'static str, labels: &'static [(&'static str, &'static str)]) -> Self {
        Self {
            cached: AtomicU64::new(0),
            name,
            labels,
        }
    }

    #[inline(always)]
    pub(crate) fn get(&self, kind: RegisterKind) -> Handle {
        // ORDERING: Acquire pairs with the Release below: the key's registration records
        // (stored in the interner before the key was returned) are visible to a thread
        // that sees the key.
        let word = self.cached.load(Ordering::Acquire);
        // A registered key is never zero, so its low half alone decides the common
        // case; the rest of the word is decoded only for a no-op.
        let key = word as u32;
        if key != 0 {
            return Handle { key, noop: None };
        }
        self.get_cold(word, kind)
    }

    /// Not yet registered (zero), or a no-op with its reason.
    #[cold]
    #[inline(never)]
    fn get_cold(&self, word: u64, kind: RegisterKind) -> Handle {
        if word != 0 {
            return Handle::unpack(word);
        }
        let handle = Handle::register_or_noop(kind, self.name, self.labels);
        // ORDERING: Release pairs with the Acquire in `get`. Two threads racing here
        // store the same value: interning is idempotent.
        self.cached.store(handle.pack(), Ordering::Release);
        handle
    }
}

macro_rules! handle_type {
    ($(#[$doc:meta])* $name:ident, $kind:expr, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct $name(Handle);

        impl $name {
            #[doc = concat!("Registers the ", $what, " `name` with `labels` (any order), or finds")]
            /// the key it already has.
            pub fn try_new(name: &str, labels: &[(&str, &str)]) -> Result<Self, KeyError> {
                Handle::register($kind, name, labels).map(Self)
            }

            /// Like [`try_new`](Self::try_new), but a refused name or the process's key
            /// limit gives a no-op handle whose records are counted as dropped
            /// ([`DropReason::Invalid`] / [`DropReason::KeyLimit`]).
            pub fn new(name: &str, labels: &[(&str, &str)]) -> Self {
                Self(Handle::register_or_noop($kind, name, labels))
            }

            /// A handle that records nothing and counts nothing.
            pub const fn noop() -> Self {
                Self(Handle::NOOP)
            }

            /// The key, or `None` for a no-op handle.
            pub fn key(&self) -> Option<Key> {
                Key::new(self.0.key)
            }

            #[doc(hidden)]
            #[inline(always)]
            pub fn __site(site: &Site) -> Self {
                Self(site.get($kind))
            }

            #[cfg_attr(
                not(any(feature = "metrics", feature = "tracing")),
                expect(dead_code, reason = "used by the facades only")
            )]
            pub(crate) fn from_handle(handle: Handle) -> Self {
                Self(handle)
            }
        }
    };
}

handle_type!(
    /// A monotonic counter. `counter!("http.requests", "route" => "/a").increment(1)`.
    ///
    /// Increments are never lost to a full ring: they wait (coalesced per key) and are
    /// written ahead of the thread's next record that finds room, by [`flush`](crate::flush),
    /// or at thread exit.
    Counter,
    RegisterKind::COUNTER,
    "counter"
);

handle_type!(
    /// A gauge: the last value set wins. `gauge!("queue.depth").set(5)`.
    Gauge,
    RegisterKind::GAUGE,
    "gauge"
);

handle_type!(
    /// A histogram of raw `u64` observations; metricsd owns the bucket layout.
    /// `histogram!("latency_ns", "route" => "/a").record(1234)`.
    Histogram,
    RegisterKind::HISTOGRAM,
    "histogram"
);

impl Counter {
    /// Adds `n`.
    #[inline(always)]
    pub fn increment(&self, n: u64) {
        if self.0.key == 0 {
            return self.0.dropped();
        }
        local::record(CounterOp(self.0.key, n));
    }
}

impl Gauge {
    /// Sets the gauge to `value`.
    #[inline(always)]
    pub fn set(&self, value: i64) {
        if self.0.key == 0 {
            return self.0.dropped();
        }
        local::record(GaugeOp(self.0.key, value));
    }
}

impl Gauge {
    /// Sets the gauge to the float `value`.
    #[inline(always)]
    pub fn set_f64(&self, value: f64) {
        if self.0.key == 0 {
            return self.0.dropped();
        }
        local::record(GaugeF64Op(self.0.key, value));
    }

    /// Adds `delta` to the gauge (negative to decrement). Like counter increments,
    /// these are never lost to a full ring: they wait, summed per key, and are written
    /// ahead of the thread's next record that finds room.
    #[inline(always)]
    pub fn add_f64(&self, delta: f64) {
        if self.0.key == 0 {
            return self.0.dropped();
        }
        local::record(GaugeAddOp(self.0.key, delta));
    }
}

impl Histogram {
    /// Records one observation.
    #[inline(always)]
    pub fn record(&self, value: u64) {
        if self.0.key == 0 {
            return self.0.dropped();
        }
        local::record(HistogramOp(self.0.key, value));
    }

    /// Records one float observation.
    #[inline(always)]
    pub fn record_f64(&self, value: f64) {
        if self.0.key == 0 {
            return self.0.dropped();
        }
        local::record(HistogramF64Op(self.0.key, value));
    }
}

/// What a metric's [`describe`] names it as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricType {
    /// A counter.
    Counter,
    /// A gauge.
    Gauge,
    /// A histogram.
    Histogram,
}

impl MetricType {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// Sends metricsd the unit (say `bytes`, `seconds`; empty for none) and description of
/// the metric `name`, once: the registration is written into the calling thread's ring
/// now and into every ring claimed after, and metricsd keeps it with the metric's
/// series and exports it. A description longer than
/// [`MAX_METADATA_VALUE_LEN`](telemetry_abi::MAX_METADATA_VALUE_LEN) bytes is cut at a
/// character boundary. Describing a metric again replaces what metricsd shows.
pub fn describe(
    kind: MetricType,
    name: &str,
    unit: &str,
    description: &str,
) -> Result<(), KeyError> {
    let cut = |s: &str| {
        let mut end = s.len().min(telemetry_abi::MAX_METADATA_VALUE_LEN);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_owned()
    };
    let (unit, description) = (cut(unit), cut(description));
    let mut labels = vec![("kind", kind.as_str())];
    if !unit.is_empty() {
        labels.push(("unit", unit.as_str()));
    }
    if !description.is_empty() {
        labels.push(("description", description.as_str()));
    }
    let key = global()
        .interner
        .intern(RegisterKind::METADATA, name, &labels)?;
    {
        let mut known = global()
            .metadata
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.contains(&key.get()) {
            return Ok(());
        }
        known.push(key.get());
    }
    local::record(DeclareOp(key.get()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    static_assertions::assert_impl_all!(Counter: Send, Sync, Copy);
    static_assertions::assert_impl_all!(Gauge: Send, Sync, Copy);
    static_assertions::assert_impl_all!(Histogram: Send, Sync, Copy);
    static_assertions::const_assert!(core::mem::size_of::<Counter>() <= 8);

    #[test]
    fn handles_pack_losslessly() {
        for handle in [
            Handle { key: 7, noop: None },
            Handle::NOOP,
            Handle {
                key: 0,
                noop: Some(DropReason::KeyLimit),
            },
            Handle {
                key: u32::MAX,
                noop: None,
            },
        ] {
            assert_ne!(handle.pack(), 0, "zero means not yet cached");
            assert_eq!(Handle::unpack(handle.pack()), handle);
        }
    }
}
