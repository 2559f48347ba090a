//! A [`metrics::Recorder`] over the rings: `counter!`, `gauge!`, `histogram!` and
//! `describe_*` of the whole process (its dependencies included) go to the calling
//! thread's ring, with the same keys, caps, redaction and drop accounting as the native
//! handles.
//!
//! Every `metrics` macro call asks the recorder for a handle. The answer comes from a
//! per-thread cache of the handles that thread asked for (64 entries, direct-mapped by
//! the key's hash), checked against the key's hash and then its name and labels (by
//! address for a static key, by content for one built at run time): after a key's first
//! call on a thread, no lock, allocation or system call of ours, only a reference count
//! taken and released on an `Arc` that thread alone uses. A miss (a new key, or two keys
//! sharing an entry) interns the key in the process-wide table (a lock and a hash).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use metrics::{
    Counter as MCounter, CounterFn, Gauge as MGauge, GaugeFn, Histogram as MHistogram, HistogramFn,
    Key as MKey, KeyName, Metadata, SharedString, Unit,
};
use telemetry_abi::{MAX_LABELS, RegisterKind};

use crate::facade_names::{clean_label_key, clean_name};
use crate::global::global;
use crate::handles::{Counter, Gauge, Handle, Histogram, MetricType, describe};
use crate::local;
use crate::stats::DropReason;

/// The `metrics` facade's backend: install it once, early in `main`, with
/// [`MetricsRecorder::install`] (or `metrics::set_global_recorder`).
///
/// ```no_run
/// nexus_metrics::MetricsRecorder::new().install().expect("the first recorder");
/// metrics::describe_counter!("http.requests", metrics::Unit::Count, "Requests served");
/// metrics::counter!("http.requests", "route" => "/a").increment(1);
/// metrics::gauge!("queue.depth").set(2.5);
/// metrics::histogram!("latency.seconds").record(0.004);
/// ```
///
/// Names keep their spelling where the ring's rules allow it; a byte they refuse
/// (`" \ { } = ,` and control characters in names, anything but `[A-Za-z0-9_.]` in
/// label keys) becomes `_`. A key that still does not fit (a name over 96 bytes, more
/// than 8 labels, a label value over 64 bytes or with a control character) gets a
/// handle that records nothing and counts each record as dropped
/// ([`DropReason::Invalid`]). Values: counters take `u64` increments; `absolute(v)`
/// adds what `v` exceeds the highest absolute value seen for the key (process-wide);
/// gauges and histograms take `f64` and are carried as floats.
#[derive(Clone, Copy, Debug, Default)]
pub struct MetricsRecorder {
    _private: (),
}

impl MetricsRecorder {
    /// The recorder (it has no state: every handle lives in the process-wide tables).
    pub const fn new() -> Self {
        Self { _private: () }
    }

    /// Installs this recorder as the `metrics` facade's global recorder.
    pub fn install(self) -> Result<(), metrics::SetRecorderError<Self>> {
        metrics::set_global_recorder(self)
    }
}

/// Entries in each per-thread handle cache.
const CACHE: usize = 64;

/// A key's labels, copied.
type OwnedLabels = Box<[(Box<str>, Box<str>)]>;

/// One cached handle and what identifies its key: the key's hash, where its name and
/// labels were (a static key is the same memory on every call), and a copy of them (a
/// key built at run time, with labels from variables, is new memory on every call).
struct Entry<T> {
    hash: u64,
    name: (usize, usize),
    labels: (usize, usize),
    copy: (Box<str>, OwnedLabels),
    handle: Arc<T>,
}

impl<T> Entry<T> {
    #[inline(always)]
    fn matches(&self, key: &MKey, hash: u64) -> bool {
        let labels = key.labels().as_slice();
        self.hash == hash
            && ((self.name == (key.name().as_ptr() as usize, key.name().len())
                && self.labels == (labels.as_ptr() as usize, labels.len()))
                || self.same_content(key))
    }

    #[cold]
    #[inline(never)]
    fn same_content(&self, key: &MKey) -> bool {
        *self.copy.0 == *key.name()
            && self.copy.1.len() == key.labels().len()
            && self
                .copy
                .1
                .iter()
                .zip(key.labels())
                .all(|((k, v), l)| **k == *l.key() && **v == *l.value())
    }
}

struct Cache<T> {
    entries: [Option<Entry<T>>; CACHE],
}

impl<T> Cache<T> {
    const fn new() -> Self {
        Self {
            entries: [const { None }; CACHE],
        }
    }

    /// The thread's handle for `key`, made with `make` on a miss.
    #[inline(always)]
    fn get(&mut self, key: &MKey, make: impl FnOnce() -> T) -> Arc<T> {
        let hash = key.get_hash();
        let slot = (hash as usize) % CACHE;
        if let Some(entry) = &self.entries[slot] {
            if entry.matches(key, hash) {
                return Arc::clone(&entry.handle);
            }
        }
        self.fill(slot, key, hash, make)
    }

    #[cold]
    #[inline(never)]
    fn fill(&mut self, slot: usize, key: &MKey, hash: u64, make: impl FnOnce() -> T) -> Arc<T> {
        let labels = key.labels().as_slice();
        let handle = Arc::new(make());
        self.entries[slot] = Some(Entry {
            hash,
            name: (key.name().as_ptr() as usize, key.name().len()),
            labels: (labels.as_ptr() as usize, labels.len()),
            copy: (
                key.name().into(),
                key.labels()
                    .map(|l| (l.key().into(), l.value().into()))
                    .collect(),
            ),
            handle: Arc::clone(&handle),
        });
        handle
    }
}

thread_local! {
    static COUNTERS: RefCell<Cache<CounterHandle>> = const { RefCell::new(Cache::new()) };
    static GAUGES: RefCell<Cache<GaugeHandle>> = const { RefCell::new(Cache::new()) };
    static HISTOGRAMS: RefCell<Cache<HistogramHandle>> = const { RefCell::new(Cache::new()) };
}

/// The handle of `key` as a series of `kind`, interned process-wide (a no-op handle
/// counting `invalid` or `key_limit` when refused).
fn register(kind: RegisterKind, key: &MKey) -> Handle {
    if key.labels().len() > MAX_LABELS {
        return Handle::invalid();
    }
    let name = clean_name(key.name());
    let labels: Vec<(String, &str)> = key
        .labels()
        .map(|l| (clean_label_key(l.key()), l.value()))
        .collect();
    let pairs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    Handle::register_or_noop(kind, &name, &pairs)
}

/// Highest `absolute` value seen per key, for the whole process.
static ABSOLUTES: OnceLock<Box<[AtomicU64]>> = OnceLock::new();

struct CounterHandle(Counter);

impl CounterFn for CounterHandle {
    #[inline]
    fn increment(&self, value: u64) {
        self.0.increment(value);
    }

    fn absolute(&self, value: u64) {
        let Some(key) = self.0.key() else {
            return self.0.increment(value);
        };
        let table = ABSOLUTES.get_or_init(|| {
            (0..=global().interner.max_keys())
                .map(|_| AtomicU64::new(0))
                .collect()
        });
        let Some(highest) = table.get(key.get() as usize) else {
            return;
        };
        // ORDERING: Relaxed: the maximum is the only thing shared, and fetch_max makes
        // every increase counted by exactly one caller.
        let before = highest.fetch_max(value, Ordering::Relaxed);
        if value > before {
            self.0.increment(value - before);
        }
    }
}

struct GaugeHandle(Gauge);

impl GaugeFn for GaugeHandle {
    #[inline]
    fn increment(&self, value: f64) {
        self.0.add_f64(value);
    }

    #[inline]
    fn decrement(&self, value: f64) {
        self.0.add_f64(-value);
    }

    #[inline]
    fn set(&self, value: f64) {
        self.0.set_f64(value);
    }
}

struct HistogramHandle(Histogram);

impl HistogramFn for HistogramHandle {
    #[inline]
    fn record(&self, value: f64) {
        self.0.record_f64(value);
    }
}

fn describe_as(kind: MetricType, key: &KeyName, unit: Option<Unit>, description: &str) {
    let name = clean_name(key.as_str());
    let unit = unit.map_or("", |u| u.as_str());
    if describe(kind, &name, unit, description).is_err() {
        local::count_noop(DropReason::Invalid);
    }
}

impl metrics::Recorder for MetricsRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        describe_as(MetricType::Counter, &key, unit, &description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        describe_as(MetricType::Gauge, &key, unit, &description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        describe_as(MetricType::Histogram, &key, unit, &description);
    }

    #[inline]
    fn register_counter(&self, key: &MKey, _metadata: &Metadata<'_>) -> MCounter {
        let handle = COUNTERS.try_with(|cache| {
            cache.try_borrow_mut().ok().map(|mut cache| {
                cache.get(key, || {
                    CounterHandle(Counter::from_handle(register(RegisterKind::COUNTER, key)))
                })
            })
        });
        match handle {
            Ok(Some(handle)) => MCounter::from_arc(handle),
            _ => MCounter::from_arc(Arc::new(CounterHandle(Counter::from_handle(register(
                RegisterKind::COUNTER,
                key,
            ))))),
        }
    }

    #[inline]
    fn register_gauge(&self, key: &MKey, _metadata: &Metadata<'_>) -> MGauge {
        let handle = GAUGES.try_with(|cache| {
            cache.try_borrow_mut().ok().map(|mut cache| {
                cache.get(key, || {
                    GaugeHandle(Gauge::from_handle(register(RegisterKind::GAUGE, key)))
                })
            })
        });
        match handle {
            Ok(Some(handle)) => MGauge::from_arc(handle),
            _ => MGauge::from_arc(Arc::new(GaugeHandle(Gauge::from_handle(register(
                RegisterKind::GAUGE,
                key,
            ))))),
        }
    }

    #[inline]
    fn register_histogram(&self, key: &MKey, _metadata: &Metadata<'_>) -> MHistogram {
        let handle = HISTOGRAMS.try_with(|cache| {
            cache.try_borrow_mut().ok().map(|mut cache| {
                cache.get(key, || {
                    HistogramHandle(Histogram::from_handle(register(
                        RegisterKind::HISTOGRAM,
                        key,
                    )))
                })
            })
        });
        match handle {
            Ok(Some(handle)) => MHistogram::from_arc(handle),
            _ => MHistogram::from_arc(Arc::new(HistogramHandle(Histogram::from_handle(register(
                RegisterKind::HISTOGRAM,
                key,
            ))))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_tells_keys_apart() {
        static A: MKey = MKey::from_static_name("a");
        static B: MKey = MKey::from_static_name("b");
        let mut cache: Cache<u32> = Cache::new();
        let mut made = 0;
        let a = cache.get(&A, || {
            made += 1;
            1
        });
        let a2 = cache.get(&A, || 99);
        let b = cache.get(&B, || 2);
        assert_eq!((*a, *a2, *b, made), (1, 1, 2, 1));
        // The same key built at run time (new memory on every call): found by content.
        let dynamic = MKey::from_name(String::from("a"));
        assert_eq!(*cache.get(&dynamic, || 3), 1);
        let labelled = || MKey::from_parts(String::from("a"), vec![metrics::Label::new("k", "v")]);
        assert_eq!(*cache.get(&labelled(), || 4), 4, "another key");
        assert_eq!(*cache.get(&labelled(), || 5), 4, "found by content");
        let other = MKey::from_parts(String::from("a"), vec![metrics::Label::new("k", "w")]);
        assert_ne!(other.get_hash(), labelled().get_hash());
        assert_eq!(*cache.get(&other, || 6), 6);
    }
}
