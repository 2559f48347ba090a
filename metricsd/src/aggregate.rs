//! The series store: every aggregate, under hard caps, with the OpenTelemetry overflow
//! convention.
//!
//! A series is `(service, kind, name, labels)`. Labels are redacted and renamed (see
//! [`crate::redact`]) and sorted by key before the lookup, so the same set in another
//! order is the same series. A new series is created while the total, per-service and
//! per-metric caps all allow it; otherwise the registration is bound to the metric's
//! overflow series, whose only label is `otel.metric.overflow=true`, so totals stay
//! correct and the overflow is visible. Overflow series have their own cap
//! (`series.max_overflow`); past it the registration is refused and its samples are
//! counted (`series_cap`), not summed.
//!
//! Series expire. A series that received no sample for `series.idle_ttl_ms` (or, while
//! a live ring still has it registered, `series.idle_ttl_bound_ms`) is exported one
//! last time with its final value, then removed: its slot, its cap counts and its index
//! entries are freed. A [`SeriesId`] carries the slot's generation, so a ring whose key
//! was bound to an expired series finds out on its next sample and registers the series
//! again (a new series, from zero, with a new start time). Expiry is incremental: each
//! export looks at a bounded number of slots (`series.expiry_scan`), never the whole
//! store, and never on the per-record path.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::config::SeriesConfig;
use crate::histogram::{Histogram, NotFinite};
use crate::redact::{REDACTED, Redactor, is_identity_key};

/// A series in the store: its slot and the slot's generation, which changes when the
/// series expires, so a stale id never reaches the series that reuses the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeriesId {
    index: u32,
    generation: u32,
}

impl SeriesId {
    /// The slot index (stable while the series lives; reused after it expires).
    pub const fn index(self) -> u32 {
        self.index
    }

    /// The slot's generation when the id was handed out.
    pub(crate) const fn generation(self) -> u32 {
        self.generation
    }
}

/// The label every overflow series carries.
pub const OVERFLOW_LABEL: (&str, &str) = ("otel.metric.overflow", "true");

/// What a series aggregates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetricKind {
    /// Sum of `u64` increments.
    Counter,
    /// Last `i64` set, in drain order.
    Gauge,
    /// Bucket counts of `u64` observations.
    Histogram,
    /// Bucket counts of completed span durations (ns), one series per span name.
    SpanDuration,
}

impl MetricKind {
    /// The exported name (`kind` field).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
            Self::SpanDuration => "span_duration",
        }
    }
}

/// A sorted label set.
pub type Labels = Arc<[(String, String)]>;

/// The aggregate of one series.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Sum of every increment since the series was created.
    Counter {
        /// The sum.
        total: u128,
    },
    /// The last value set (`None` until one is).
    Gauge {
        /// The value.
        value: Option<i64>,
    },
    /// A gauge that was set or moved by a float (ABI 1.1): its value is a float from
    /// then on (an integer set after that is taken as a float).
    FloatGauge {
        /// The value: the last set plus every increment since, in drain order.
        value: f64,
    },
    /// Observations since the series was created: exponential with an automatic
    /// scale, or over the bounds configured for the name.
    Histogram(Histogram),
}

/// One series.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The producer's service (kernel-derived).
    pub service: Arc<str>,
    /// What it aggregates.
    pub kind: MetricKind,
    /// The metric (or span) name.
    pub name: Arc<str>,
    /// Labels, sorted by key, after redaction and renaming.
    pub labels: Labels,
    /// Whether this is an overflow series.
    pub overflow: bool,
    /// The aggregate.
    pub value: Value,
    /// Samples aggregated.
    pub samples: u64,
    /// When the series was created, ns since the Unix epoch: the start time of its
    /// cumulative value (a series that expires and comes back gets a new one).
    pub created_ns: u64,
    /// The end of the last export window in which it changed (its creation time until
    /// then), ns since the Unix epoch.
    pub last_active_ns: u64,
    /// Counter total when last exported (for the window delta).
    pub(crate) exported_total: u128,
    /// Key-table entries of live rings bound to it.
    pub(crate) bindings: u32,
    dirty: bool,
}

impl Series {
    /// A series outside any store (for exporters' tests and benches): `samples` zero,
    /// not dirty.
    pub fn new(
        service: &str,
        kind: MetricKind,
        name: &str,
        labels: &[(&str, &str)],
        value: Value,
    ) -> Self {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        labels.sort();
        Self {
            service: Arc::from(service),
            kind,
            name: Arc::from(name),
            labels: Arc::from(labels),
            overflow: false,
            value,
            samples: 0,
            created_ns: 0,
            last_active_ns: 0,
            exported_total: 0,
            bindings: 0,
            dirty: false,
        }
    }

    /// The series' identity as one string: `<service>/<kind>/<name>{k="v",...}` with
    /// labels sorted by key, and `"` and `\` in values escaped with `\`. This is the
    /// `series` field of every exported record.
    pub fn id(&self) -> String {
        series_id(&self.service, self.kind, &self.name, &self.labels)
    }
}

/// The identity string of a series (see [`Series::id`]): the `series` field of its
/// exported records. Labels may come in any order.
///
/// ```
/// use metricsd::{MetricKind, series_id};
/// let id = series_id("web", MetricKind::Counter, "http.requests", &[("status", "200"), ("route", "/a")]);
/// assert_eq!(id, r#"web/counter/http.requests{route="/a",status="200"}"#);
/// ```
pub fn series_id<K: AsRef<str>, V: AsRef<str>>(
    service: &str,
    kind: MetricKind,
    name: &str,
    labels: &[(K, V)],
) -> String {
    let mut sorted: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_ref(), v.as_ref()))
        .collect();
    sorted.sort_unstable();
    let mut s = format!("{service}/{}/{name}{{", kind.as_str());
    for (i, (k, v)) in sorted.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"");
        for c in v.chars() {
            if matches!(c, '"' | '\\') {
                s.push('\\');
            }
            s.push(c);
        }
        s.push('"');
    }
    s.push('}');
    s
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    service: u32,
    kind: MetricKind,
    name: Arc<str>,
    labels: Labels,
}

#[derive(Debug)]
struct ServiceState {
    name: Arc<str>,
    series: u32,
    per_metric: HashMap<Arc<str>, u32>,
    /// Rings of this service being drained.
    rings: u32,
}

/// Running totals of the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Ordinary series.
    pub series: u64,
    /// Overflow series.
    pub overflow_series: u64,
    /// Registrations bound to an overflow series because a cap was reached.
    pub overflowed_registrations: u64,
    /// Samples aggregated into overflow series.
    pub overflow_samples: u64,
    /// Registrations refused because the overflow cap was reached too.
    pub refused_registrations: u64,
    /// Label values replaced by `[redacted]`.
    pub labels_redacted: u64,
    /// Identity-claiming label keys renamed `exported_<key>`.
    pub labels_renamed: u64,
    /// Series (overflow series included) removed after their idle TTL.
    pub expired: u64,
    /// Of those, overflow series.
    pub expired_overflow: u64,
    /// Series created again after they had expired (among the most recent
    /// `EXPIRED_REMEMBERED` expiries).
    pub recreated: u64,
    /// Services whose last ring closed and last series expired: their caps and tables
    /// were freed.
    pub services_released: u64,
    /// Services known now.
    pub services: u64,
}

/// What a producer said about a metric (ABI 1.1 metadata registrations): kept per
/// service and metric name, exported with the metric's series records (`unit`,
/// `description`) and shown in snapshots for the exporters that leave the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricMetadata {
    /// The producer's service.
    pub service: Arc<str>,
    /// The metric's name.
    pub name: Arc<str>,
    /// The kind the producer described it as.
    pub kind: Option<MetricKind>,
    /// Its unit (`bytes`, `seconds`, ...), if given.
    pub unit: Option<Arc<str>>,
    /// Its description, if given.
    pub description: Option<Arc<str>>,
}

/// What [`Store::sweep`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Slots looked at.
    pub scanned: u32,
    /// Series expired.
    pub expired: u32,
}

/// How many expired series identities are remembered to count re-creations.
pub const EXPIRED_REMEMBERED: usize = 65_536;

/// The outcome of resolving a registration to a series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Aggregate into this series.
    Series(SeriesId),
    /// Every cap, the overflow cap included, is reached.
    Refused,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    series: Option<Series>,
}

/// Every series, under caps.
#[derive(Debug)]
pub struct Store {
    caps: SeriesConfig,
    redactor: Redactor,
    layouts: BTreeMap<String, Arc<[u64]>>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    index: HashMap<SeriesKey, SeriesId>,
    overflow_index: HashMap<(u32, MetricKind, Arc<str>), SeriesId>,
    services: Vec<Option<ServiceState>>,
    free_services: Vec<u32>,
    service_index: HashMap<Arc<str>, u32>,
    dirty: Vec<SeriesId>,
    /// Slots created, changed or freed since the last `take_slot_changes`, while a
    /// scrape table follows the store (`None` otherwise: nothing is recorded).
    slot_changes: Option<Vec<u32>>,
    sweep_cursor: usize,
    generation_floor: u32,
    expired_keys: HashSet<u64>,
    expired_order: VecDeque<u64>,
    stats: StoreStats,
    metadata: HashMap<Arc<str>, HashMap<Arc<str>, Arc<MetricMetadata>>>,
    metadata_count: u64,
}

/// A hash of a series' identity, to recognise it when it comes back after expiring.
fn identity_hash(service: &str, kind: MetricKind, name: &str, labels: &[(String, String)]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (service, kind, name, labels).hash(&mut h);
    h.finish()
}

impl Store {
    /// An empty store with these caps, redaction policy and histogram layouts.
    pub fn new(
        caps: SeriesConfig,
        redactor: Redactor,
        layouts: &BTreeMap<String, Vec<u64>>,
    ) -> Self {
        Self {
            caps,
            redactor,
            layouts: layouts
                .iter()
                .map(|(k, v)| (k.clone(), Arc::from(v.as_slice())))
                .collect(),
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            overflow_index: HashMap::new(),
            services: Vec::new(),
            free_services: Vec::new(),
            service_index: HashMap::new(),
            dirty: Vec::new(),
            slot_changes: None,
            sweep_cursor: 0,
            generation_floor: 0,
            expired_keys: HashSet::new(),
            expired_order: VecDeque::new(),
            stats: StoreStats::default(),
            metadata: HashMap::new(),
            metadata_count: 0,
        }
    }

    /// Keeps the metadata `labels` (`kind`, `unit`, `description`; others ignored) of
    /// metric `name` in `service`, replacing what an earlier description said. At most
    /// `series.max_total` metrics carry metadata; past that, a new one is refused.
    pub fn describe(
        &mut self,
        service: u32,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<(), crate::health::Reason> {
        let Some(Some(state)) = self.services.get(service as usize) else {
            return Err(crate::health::Reason::BadRegistration);
        };
        let service_name = state.name.clone();
        let mut meta = MetricMetadata {
            service: service_name.clone(),
            name: Arc::from(name),
            kind: None,
            unit: None,
            description: None,
        };
        for (k, v) in labels {
            match *k {
                "kind" => {
                    meta.kind = match *v {
                        "counter" => Some(MetricKind::Counter),
                        "gauge" => Some(MetricKind::Gauge),
                        "histogram" => Some(MetricKind::Histogram),
                        _ => None,
                    }
                }
                "unit" if !v.is_empty() => meta.unit = Some(Arc::from(*v)),
                "description" if !v.is_empty() => meta.description = Some(Arc::from(*v)),
                _ => {}
            }
        }
        let per_service = self.metadata.entry(service_name).or_default();
        if !per_service.contains_key(name) {
            if self.metadata_count >= u64::from(self.caps.max_total) {
                return Err(crate::health::Reason::MetadataCap);
            }
            self.metadata_count += 1;
        }
        per_service.insert(meta.name.clone(), Arc::new(meta));
        Ok(())
    }

    /// The metadata of metric `name` of `service`, if it was described.
    pub fn metadata(&self, service: &str, name: &str) -> Option<&Arc<MetricMetadata>> {
        self.metadata.get(service)?.get(name)
    }

    /// Every metric's metadata.
    pub fn all_metadata(&self) -> Vec<MetricMetadata> {
        let mut all: Vec<MetricMetadata> = self
            .metadata
            .values()
            .flat_map(|m| m.values().map(|x| (**x).clone()))
            .collect();
        all.sort_by(|a, b| (&a.service, &a.name).cmp(&(&b.service, &b.name)));
        all
    }

    /// The redaction policy.
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// The index of service `name`, interning it (the grant server bounds how many
    /// services there are at once; a service with no ring and no series is forgotten by
    /// [`sweep`](Self::sweep)).
    pub fn service(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.service_index.get(name) {
            return i;
        }
        let name: Arc<str> = Arc::from(name);
        let state = ServiceState {
            name: name.clone(),
            series: 0,
            per_metric: HashMap::new(),
            rings: 0,
        };
        let i = match self.free_services.pop() {
            Some(i) => {
                if let Some(slot) = self.services.get_mut(i as usize) {
                    *slot = Some(state);
                }
                i
            }
            None => {
                self.services.push(Some(state));
                (self.services.len() - 1) as u32
            }
        };
        self.service_index.insert(name, i);
        self.stats.services = self.service_index.len() as u64;
        i
    }

    /// A ring of service `service` is being drained (until [`ring_closed`](Self::ring_closed)).
    pub fn ring_opened(&mut self, service: u32) {
        if let Some(Some(st)) = self.services.get_mut(service as usize) {
            st.rings += 1;
        }
    }

    /// A ring of service `service` closed.
    pub fn ring_closed(&mut self, service: u32) {
        if let Some(Some(st)) = self.services.get_mut(service as usize) {
            st.rings = st.rings.saturating_sub(1);
        }
    }

    /// The configured bounds for histograms (and span durations) named `name`; `None`
    /// means exponential.
    pub fn layout(&self, name: &str) -> Option<Arc<[u64]>> {
        self.layouts.get(name).cloned()
    }

    /// Resolves a registration of `name` with `labels` (as the producer gave them) in
    /// `service` to a series, creating it if the caps allow, else binding it to the
    /// metric's overflow series. The caller holds a binding to the result until it
    /// calls [`unbind`](Self::unbind).
    pub fn resolve(
        &mut self,
        service: u32,
        kind: MetricKind,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Resolved {
        let resolved = self.resolve_unbound(service, kind, name, labels);
        if let Resolved::Series(id) = resolved {
            if let Some(s) = self.get_mut(id) {
                s.bindings += 1;
            }
        }
        resolved
    }

    /// Gives back a binding [`resolve`](Self::resolve) handed out (a stale id is ignored).
    pub fn unbind(&mut self, id: SeriesId) {
        if let Some(s) = self.get_mut(id) {
            s.bindings = s.bindings.saturating_sub(1);
        }
    }

    fn resolve_unbound(
        &mut self,
        service: u32,
        kind: MetricKind,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Resolved {
        let Some(Some(state)) = self.services.get(service as usize) else {
            return Resolved::Refused;
        };
        let service_name = state.name.clone();
        let mut clean: Vec<(String, String)> = Vec::with_capacity(labels.len());
        for (k, v) in labels {
            let value = if self.redactor.is_sensitive(k) {
                self.stats.labels_redacted += 1;
                REDACTED.to_owned()
            } else {
                (*v).to_owned()
            };
            let key = if is_identity_key(k) {
                self.stats.labels_renamed += 1;
                format!("exported_{k}")
            } else {
                (*k).to_owned()
            };
            clean.push((key, value));
        }
        clean.sort();
        // A renamed key may now equal a key the producer also gave: keep the first.
        clean.dedup_by(|a, b| a.0 == b.0);
        let name: Arc<str> = Arc::from(name);
        let key = SeriesKey {
            service,
            kind,
            name: name.clone(),
            labels: Arc::from(clean),
        };
        if let Some(&id) = self.index.get(&key) {
            return Resolved::Series(id);
        }
        let per_metric = state.per_metric.get(&name).copied().unwrap_or(0);
        let fits = self.stats.series < u64::from(self.caps.max_total)
            && state.series < self.caps.max_per_service
            && per_metric < self.caps.max_per_metric;
        if fits {
            self.note_recreated(&service_name, kind, &name, &key.labels);
            let id = self.push(service_name, kind, name.clone(), key.labels.clone(), false);
            self.index.insert(key, id);
            self.stats.series += 1;
            if let Some(Some(state)) = self.services.get_mut(service as usize) {
                state.series += 1;
                *state.per_metric.entry(name).or_insert(0) += 1;
            }
            return Resolved::Series(id);
        }
        let okey = (service, kind, name.clone());
        if let Some(&id) = self.overflow_index.get(&okey) {
            self.stats.overflowed_registrations += 1;
            return Resolved::Series(id);
        }
        if self.stats.overflow_series >= u64::from(self.caps.max_overflow) {
            self.stats.refused_registrations += 1;
            return Resolved::Refused;
        }
        let labels: Labels = Arc::from(vec![(
            OVERFLOW_LABEL.0.to_owned(),
            OVERFLOW_LABEL.1.to_owned(),
        )]);
        self.note_recreated(&service_name, kind, &name, &labels);
        let id = self.push(service_name, kind, name, labels, true);
        self.overflow_index.insert(okey, id);
        self.stats.overflow_series += 1;
        self.stats.overflowed_registrations += 1;
        Resolved::Series(id)
    }

    fn note_recreated(
        &mut self,
        service: &str,
        kind: MetricKind,
        name: &str,
        labels: &[(String, String)],
    ) {
        if self.expired_keys.is_empty() {
            return;
        }
        if self
            .expired_keys
            .remove(&identity_hash(service, kind, name, labels))
        {
            self.stats.recreated += 1;
        }
    }

    fn push(
        &mut self,
        service: Arc<str>,
        kind: MetricKind,
        name: Arc<str>,
        labels: Labels,
        overflow: bool,
    ) -> SeriesId {
        let value = match kind {
            MetricKind::Counter => Value::Counter { total: 0 },
            MetricKind::Gauge => Value::Gauge { value: None },
            MetricKind::Histogram | MetricKind::SpanDuration => {
                Value::Histogram(Histogram::new(self.layout(&name)))
            }
        };
        let now = crate::drain::wall_ns();
        let series = Series {
            service,
            kind,
            name,
            labels,
            overflow,
            value,
            samples: 0,
            created_ns: now,
            last_active_ns: now,
            exported_total: 0,
            bindings: 0,
            dirty: false,
        };
        let id = match self.free.pop() {
            Some(index) => {
                let slot = &mut self.slots[index as usize];
                slot.series = Some(series);
                SeriesId {
                    index,
                    generation: slot.generation,
                }
            }
            None => {
                let index = self.slots.len() as u32;
                let generation = self.generation_floor;
                self.slots.push(Slot {
                    generation,
                    series: Some(series),
                });
                SeriesId { index, generation }
            }
        };
        if let Some(changes) = &mut self.slot_changes {
            changes.push(id.index);
        }
        id
    }

    // `touch`, `add`, `set` and `observe` are always inlined into the drain loop's
    // per-record path (see `Ctx::sample` in `drain.rs`). Each returns `false` when `id`
    // is stale (its series expired): the caller registers the series again.
    #[inline(always)]
    fn touch(&mut self, id: SeriesId) -> Option<&mut Series> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        let s = slot.series.as_mut()?;
        s.samples += 1;
        if s.overflow {
            self.stats.overflow_samples += 1;
        }
        if !s.dirty {
            s.dirty = true;
            self.dirty.push(id);
        }
        Some(s)
    }

    /// Adds `delta` to counter `id`.
    #[inline(always)]
    pub fn add(&mut self, id: SeriesId, delta: u64) -> bool {
        match self.touch(id) {
            Some(Series {
                value: Value::Counter { total },
                ..
            }) => {
                *total += u128::from(delta);
                true
            }
            Some(_) => true,
            None => false,
        }
    }

    /// Sets gauge `id` to `value`.
    #[inline(always)]
    pub fn set(&mut self, id: SeriesId, value: i64) -> bool {
        match self.touch(id) {
            Some(Series {
                value: Value::Gauge { value: v },
                ..
            }) => {
                *v = Some(value);
                true
            }
            Some(_) => true,
            None => false,
        }
    }

    /// Sets gauge `id` to the float `value`; `false` when `id` expired.
    #[inline(always)]
    pub fn set_f64(&mut self, id: SeriesId, value: f64) -> bool {
        match self.touch(id) {
            Some(s) => {
                if matches!(s.value, Value::Gauge { .. } | Value::FloatGauge { .. }) {
                    s.value = Value::FloatGauge { value };
                }
                true
            }
            None => false,
        }
    }

    /// Adds the float `delta` to gauge `id` (an unset gauge counts from zero); `false`
    /// when `id` expired.
    #[inline(always)]
    pub fn add_f64(&mut self, id: SeriesId, delta: f64) -> bool {
        let Some(s) = self.touch(id) else {
            return false;
        };
        let current = match s.value {
            Value::Gauge { value } => value.unwrap_or(0) as f64,
            Value::FloatGauge { value } => value,
            _ => return true,
        };
        s.value = Value::FloatGauge {
            value: current + delta,
        };
        true
    }

    /// Records observation `value` in histogram `id`.
    #[inline(always)]
    pub fn observe(&mut self, id: SeriesId, value: u64) -> bool {
        match self.touch(id) {
            Some(Series {
                value: Value::Histogram(h),
                ..
            }) => {
                h.record(value);
                true
            }
            Some(_) => true,
            None => false,
        }
    }

    /// Records observation `value` in histogram `id`; NaN and infinities are refused
    /// (the caller counts them) and leave the series untouched. `Ok(false)` when `id`
    /// is stale (its series expired): the caller registers the series again.
    #[inline(always)]
    pub fn observe_f64(&mut self, id: SeriesId, value: f64) -> Result<bool, NotFinite> {
        if !value.is_finite() {
            return Err(NotFinite);
        }
        match self.touch(id) {
            Some(Series {
                value: Value::Histogram(h),
                ..
            }) => {
                h.record_f64(value)?;
                Ok(true)
            }
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }

    /// The series changed since the last export, without clearing anything.
    pub(crate) fn dirty_ids(&self) -> &[SeriesId] {
        &self.dirty
    }

    /// The generation of slot `index` while a series lives in it.
    pub(crate) fn generation_at(&self, index: u32) -> Option<u32> {
        let slot = self.slots.get(index as usize)?;
        slot.series.as_ref().map(|_| slot.generation)
    }

    /// Every live series' id.
    pub(crate) fn ids(&self) -> impl Iterator<Item = SeriesId> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, slot)| {
            slot.series.as_ref().map(|_| SeriesId {
                index: i as u32,
                generation: slot.generation,
            })
        })
    }

    /// Brings back a series the write-ahead log held (labels as stored: redacted,
    /// renamed, sorted), with its value, creation time and the total last exported;
    /// marked changed, so the next export carries it. A series already present is
    /// updated in place. Caps are not applied: the series was admitted under them.
    #[expect(
        clippy::too_many_arguments,
        reason = "one series' whole logged identity and state"
    )]
    pub(crate) fn restore(
        &mut self,
        service: &str,
        kind: MetricKind,
        name: &str,
        labels: Labels,
        overflow: bool,
        created_ns: u64,
        value: Value,
        exported_total: u128,
    ) -> SeriesId {
        let svc = self.service(service);
        let service_name: Arc<str> = match self.services.get(svc as usize) {
            Some(Some(state)) => state.name.clone(),
            _ => Arc::from(service),
        };
        let name: Arc<str> = Arc::from(name);
        let existing = if overflow {
            self.overflow_index.get(&(svc, kind, name.clone())).copied()
        } else {
            self.index
                .get(&SeriesKey {
                    service: svc,
                    kind,
                    name: name.clone(),
                    labels: labels.clone(),
                })
                .copied()
        };
        let id = match existing {
            Some(id) => id,
            None => {
                let id = self.push(service_name, kind, name.clone(), labels.clone(), overflow);
                if overflow {
                    self.overflow_index.insert((svc, kind, name), id);
                    self.stats.overflow_series += 1;
                } else {
                    self.index.insert(
                        SeriesKey {
                            service: svc,
                            kind,
                            name: name.clone(),
                            labels,
                        },
                        id,
                    );
                    self.stats.series += 1;
                    if let Some(Some(state)) = self.services.get_mut(svc as usize) {
                        state.series += 1;
                        *state.per_metric.entry(name).or_insert(0) += 1;
                    }
                }
                id
            }
        };
        if let Some(s) = self.get_mut(id) {
            s.value = value;
            s.created_ns = created_ns;
            s.exported_total = exported_total;
            if !s.dirty {
                s.dirty = true;
                self.dirty.push(id);
            }
        }
        id
    }

    /// The series changed since the last call, clearing their changed mark.
    pub fn take_dirty(&mut self) -> Vec<SeriesId> {
        let ids = std::mem::take(&mut self.dirty);
        if let Some(changes) = &mut self.slot_changes {
            changes.extend(ids.iter().map(|id| id.index));
        }
        for &id in &ids {
            if let Some(s) = self.get_mut(id) {
                s.dirty = false;
            }
        }
        ids
    }

    /// Series `id`, unless it expired.
    pub fn get(&self, id: SeriesId) -> Option<&Series> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.series.as_ref()
    }

    fn get_mut(&mut self, id: SeriesId) -> Option<&mut Series> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.series.as_mut()
    }

    /// Records what was exported of series `id` in the window ending at `end_ns`: the
    /// counter total (for the next window's delta) and that it was active then.
    pub(crate) fn exported(&mut self, id: SeriesId, total: Option<u128>, end_ns: u64) {
        if let Some(s) = self.get_mut(id) {
            if let Some(t) = total {
                s.exported_total = t;
            }
            s.last_active_ns = end_ns;
        }
    }

    /// Starts (or stops) recording which slots change, for [`Store::take_slot_changes`]:
    /// slots created or freed, and those [`Store::take_dirty`] reports. Recording costs
    /// nothing on the per-record path (changed series are already listed for export);
    /// what is recorded between two takes is bounded by the slots created, freed and
    /// exported in between.
    pub fn track_slot_changes(&mut self, on: bool) {
        self.slot_changes = on.then(Vec::new);
    }

    /// The slots recorded since the last call (in no order, possibly repeated).
    pub fn take_slot_changes(&mut self) -> Vec<u32> {
        self.slot_changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Slots in the table (live or free).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The series in slot `index`, if one lives there.
    pub fn series_at(&self, index: u32) -> Option<&Series> {
        self.slots.get(index as usize)?.series.as_ref()
    }

    /// Every live series, in slot order.
    pub fn all(&self) -> impl Iterator<Item = &Series> {
        self.slots.iter().filter_map(|s| s.series.as_ref())
    }

    /// Live series (overflow series included).
    pub fn len(&self) -> usize {
        (self.stats.series + self.stats.overflow_series) as usize
    }

    /// Whether no series is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Running totals.
    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// Looks at up to `series.expiry_scan` slots from where the last sweep stopped and
    /// expires each series idle for its TTL at `now_ns`: `on_expire` sees it one last
    /// time (to export its final value), then it is removed and its caps released. A
    /// series marked changed since the last export is never idle. Then forgets
    /// services with no ring and no series.
    pub fn sweep(&mut self, now_ns: u64, mut on_expire: impl FnMut(&Series)) -> Swept {
        let mut swept = Swept::default();
        let n = self.slots.len();
        let budget = (self.caps.expiry_scan as usize).min(n);
        let idle = self.caps.idle_ttl_ms.saturating_mul(1_000_000);
        let bound = self.caps.idle_ttl_bound_ms.saturating_mul(1_000_000);
        for _ in 0..budget {
            if self.sweep_cursor >= n {
                self.sweep_cursor = 0;
            }
            let index = self.sweep_cursor;
            self.sweep_cursor += 1;
            swept.scanned += 1;
            let Some(s) = self.slots[index].series.as_ref() else {
                continue;
            };
            let ttl = if s.bindings > 0 { bound } else { idle };
            if s.dirty || now_ns.saturating_sub(s.last_active_ns) < ttl {
                continue;
            }
            on_expire(s);
            self.remove(index);
            swept.expired += 1;
        }
        // Give memory back when the store has shrunk well below its peak.
        if swept.expired > 0 && self.free.len() > 1024 && self.free.len() * 2 > self.slots.len() {
            self.compact_tail();
        }
        self.release_services();
        swept
    }

    fn remove(&mut self, index: usize) {
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let Some(s) = slot.series.take() else {
            return;
        };
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index as u32);
        if let Some(changes) = &mut self.slot_changes {
            changes.push(index as u32);
        }
        let service = self.service_index.get(&s.service).copied();
        if s.overflow {
            if let Some(svc) = service {
                self.overflow_index.remove(&(svc, s.kind, s.name.clone()));
            }
            self.stats.overflow_series = self.stats.overflow_series.saturating_sub(1);
            self.stats.expired_overflow += 1;
        } else {
            if let Some(svc) = service {
                self.index.remove(&SeriesKey {
                    service: svc,
                    kind: s.kind,
                    name: s.name.clone(),
                    labels: s.labels.clone(),
                });
                if let Some(Some(st)) = self.services.get_mut(svc as usize) {
                    st.series = st.series.saturating_sub(1);
                    if let Some(m) = st.per_metric.get_mut(&s.name) {
                        *m = m.saturating_sub(1);
                        if *m == 0 {
                            st.per_metric.remove(&s.name);
                        }
                    }
                }
            }
            self.stats.series = self.stats.series.saturating_sub(1);
        }
        self.stats.expired += 1;
        let h = identity_hash(&s.service, s.kind, &s.name, &s.labels);
        if self.expired_keys.insert(h) {
            self.expired_order.push_back(h);
            while self.expired_order.len() > EXPIRED_REMEMBERED {
                if let Some(old) = self.expired_order.pop_front() {
                    self.expired_keys.remove(&old);
                }
            }
        }
    }

    /// Drops free slots at the end of the slot table. An id of a dropped slot is out of
    /// range, hence stale; a slot made again at that index starts at a generation above
    /// every generation a dropped slot had, so no old id can name it.
    fn compact_tail(&mut self) {
        while let Some(last) = self.slots.last() {
            if last.series.is_some() {
                break;
            }
            self.generation_floor = self.generation_floor.max(last.generation);
            self.slots.pop();
        }
        let len = self.slots.len() as u32;
        self.free.retain(|&i| i < len);
        self.slots.shrink_to_fit();
        self.index.shrink_to_fit();
        self.overflow_index.shrink_to_fit();
        self.dirty.shrink_to_fit();
    }

    fn release_services(&mut self) {
        let gone: Vec<u32> = self
            .services
            .iter()
            .enumerate()
            .filter_map(|(i, st)| match st {
                Some(st) if st.rings == 0 && st.series == 0 => Some(i as u32),
                _ => None,
            })
            .collect();
        for i in gone {
            let overflow_left = self.overflow_index.keys().any(|k| k.0 == i);
            if overflow_left {
                continue;
            }
            if let Some(slot) = self.services.get_mut(i as usize) {
                if let Some(st) = slot.take() {
                    self.service_index.remove(&st.name);
                    self.free_services.push(i);
                    self.stats.services_released += 1;
                }
            }
        }
        self.stats.services = self.service_index.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RedactionConfig, SeriesConfig};

    fn store(total: u32, per_metric: u32, per_service: u32, overflow: u32) -> Store {
        Store::new(
            SeriesConfig {
                max_total: total,
                max_per_metric: per_metric,
                max_per_service: per_service,
                max_overflow: overflow,
                ..SeriesConfig::default()
            },
            Redactor::new(&RedactionConfig::default().patterns),
            &BTreeMap::new(),
        )
    }

    #[test]
    fn label_order_does_not_matter_and_values_are_redacted() {
        let mut s = store(10, 10, 10, 10);
        let svc = s.service("web");
        let a = s.resolve(svc, MetricKind::Counter, "req", &[("b", "2"), ("a", "1")]);
        let b = s.resolve(svc, MetricKind::Counter, "req", &[("a", "1"), ("b", "2")]);
        assert_eq!(a, b);
        let Resolved::Series(id) = s.resolve(
            svc,
            MetricKind::Counter,
            "login",
            &[("api_token", "abc"), ("service", "x")],
        ) else {
            panic!("fits");
        };
        let series = s.get(id).expect("exists");
        assert_eq!(
            &*series.labels,
            &[
                ("api_token".to_owned(), "[redacted]".to_owned()),
                ("exported_service".to_owned(), "x".to_owned())
            ]
        );
        assert_eq!(
            series.id(),
            "web/counter/login{api_token=\"[redacted]\",exported_service=\"x\"}"
        );
        assert_eq!(
            (s.stats().labels_redacted, s.stats().labels_renamed),
            (1, 1)
        );
    }

    #[test]
    fn caps_send_new_series_to_the_overflow_series() {
        let mut s = store(100, 2, 100, 1);
        let svc = s.service("web");
        let mut ids = Vec::new();
        for i in 0..5 {
            let v = i.to_string();
            match s.resolve(svc, MetricKind::Counter, "req", &[("user", &v)]) {
                Resolved::Series(id) => ids.push(id),
                Resolved::Refused => panic!("overflow has room"),
            }
        }
        for (i, id) in ids.iter().enumerate() {
            s.add(*id, 10 + i as u64);
        }
        let overflow = s.get(ids[2]).expect("exists");
        assert!(overflow.overflow);
        assert_eq!(ids[2], ids[3]);
        assert_eq!(
            overflow.value,
            Value::Counter {
                total: 12 + 13 + 14
            }
        );
        let total: u128 = s
            .all()
            .map(|x| match x.value {
                Value::Counter { total } => total,
                _ => 0,
            })
            .sum();
        assert_eq!(total, 10 + 11 + 12 + 13 + 14, "totals stay correct");
        assert_eq!(s.stats().series, 2);
        assert_eq!(s.stats().overflowed_registrations, 3);
        assert_eq!(s.stats().overflow_samples, 3);
        let samples = |id: SeriesId| s.get(id).expect("live").samples;
        assert_eq!(
            (samples(ids[0]), samples(ids[1]), samples(ids[2])),
            (1, 1, 3)
        );
        // The overflow cap (1) is used by "req": a second metric is refused.
        s.resolve(svc, MetricKind::Counter, "other", &[("a", "1")]);
        s.resolve(svc, MetricKind::Counter, "other", &[("a", "2")]);
        assert_eq!(
            s.resolve(svc, MetricKind::Counter, "other", &[("a", "3")]),
            Resolved::Refused
        );
        assert_eq!(s.stats().refused_registrations, 1);
    }

    #[test]
    fn the_total_cap_holds_across_metrics_and_services() {
        let mut s = store(2, 10, 10, 10);
        let (web, db) = (s.service("web"), s.service("db"));
        let fresh = |s: &mut Store, svc, name| match s.resolve(svc, MetricKind::Counter, name, &[])
        {
            Resolved::Series(id) => !s.get(id).expect("live").overflow,
            Resolved::Refused => panic!("overflow has room"),
        };
        assert!(fresh(&mut s, web, "a"));
        assert!(fresh(&mut s, db, "b"));
        assert!(!fresh(&mut s, web, "c"), "a third series overflows");
        assert!(!fresh(&mut s, db, "d"));
        assert_eq!((s.stats().series, s.stats().overflow_series), (2, 2));
    }

    #[test]
    fn dirty_series_are_reported_once() {
        let mut s = store(10, 10, 10, 10);
        let svc = s.service("web");
        let Resolved::Series(id) = s.resolve(svc, MetricKind::Gauge, "temp", &[]) else {
            panic!("fits");
        };
        s.set(id, 5);
        s.set(id, -7);
        assert_eq!(s.take_dirty(), vec![id]);
        assert!(s.take_dirty().is_empty());
        assert_eq!(
            s.get(id).map(|x| x.value.clone()),
            Some(Value::Gauge { value: Some(-7) })
        );
    }

    fn ttl_store(total: u32, scan: u32) -> Store {
        Store::new(
            SeriesConfig {
                max_total: total,
                max_per_metric: total,
                max_per_service: total,
                max_overflow: 10,
                idle_ttl_ms: 10,
                idle_ttl_bound_ms: 1000,
                expiry_scan: scan,
            },
            Redactor::new(&RedactionConfig::default().patterns),
            &BTreeMap::new(),
        )
    }

    fn series(s: &mut Store, svc: u32, name: &str, label: &str) -> SeriesId {
        match s.resolve(svc, MetricKind::Counter, name, &[("l", label)]) {
            Resolved::Series(id) => id,
            Resolved::Refused => panic!("refused"),
        }
    }

    const MS: u64 = 1_000_000;

    /// `n` counters `req{l="0"}`, `req{l="1"}`, ... of service `web` (its ring open),
    /// in slot order.
    fn numbered(s: &mut Store, n: usize) -> (u32, Vec<SeriesId>) {
        let svc = s.service("web");
        s.ring_opened(svc);
        let ids = (0..n)
            .map(|i| series(s, svc, "req", &i.to_string()))
            .collect();
        (svc, ids)
    }

    /// Lets `ids` expire: unbound, exported at the first one's creation (after the
    /// store's changes are taken), then a sweep 10 ms later; others stay as they are.
    fn expire(s: &mut Store, ids: &[SeriesId]) -> Swept {
        let t0 = s.get(ids[0]).expect("live").created_ns;
        s.take_dirty();
        for &id in ids {
            s.unbind(id);
            s.exported(id, None, t0);
        }
        s.sweep(t0 + 10 * MS, |_| {})
    }

    #[test]
    fn an_idle_series_expires_with_its_final_value_and_frees_its_cap() {
        let mut s = ttl_store(2, 100);
        let svc = s.service("web");
        s.ring_opened(svc);
        let a = series(&mut s, svc, "req", "a");
        s.unbind(a);
        assert!(s.add(a, 5));
        let t0 = s.get(a).expect("live").created_ns;
        s.take_dirty();
        s.exported(a, Some(5), t0);
        // Not yet idle for the TTL.
        let mut finals = Vec::new();
        s.sweep(t0 + 9 * MS, |x| finals.push(x.value.clone()));
        assert!(finals.is_empty());
        s.sweep(t0 + 10 * MS, |x| finals.push(x.value.clone()));
        assert_eq!(finals, vec![Value::Counter { total: 5 }]);
        assert!(s.get(a).is_none());
        assert!(!s.add(a, 1), "a stale id aggregates nothing");
        assert_eq!((s.stats().series, s.stats().expired), (0, 1));
        // Its cap slot is free again: two new series fit a cap of 2, none overflows.
        let b = series(&mut s, svc, "req", "b");
        let c = series(&mut s, svc, "req", "c");
        assert!(!s.get(b).expect("b").overflow && !s.get(c).expect("c").overflow);
        assert_ne!(a, b);
        assert_eq!(a.index(), b.index(), "the slot is reused");
    }

    #[test]
    fn a_description_is_kept_per_service_and_metric_under_the_series_cap() {
        use crate::health::Reason;
        let mut s = store(2, 2, 2, 2);
        let web = s.service("web");
        let described = |s: &Store, svc: &str, name: &str| {
            s.metadata(svc, name).map(|m| {
                (
                    m.kind,
                    m.unit.as_deref().map(str::to_owned),
                    m.description.as_deref().map(str::to_owned),
                )
            })
        };
        let labels = [
            ("kind", "counter"),
            ("unit", "bytes"),
            ("description", "Sent."),
        ];
        assert_eq!(s.describe(web, "sent", &labels), Ok(()));
        let want = (
            Some(MetricKind::Counter),
            Some("bytes".into()),
            Some("Sent.".into()),
        );
        assert_eq!(described(&s, "web", "sent"), Some(want));
        assert_eq!(described(&s, "db", "sent"), None, "per service");
        // Described again: the latest wins; an empty unit or description is none.
        let again = [("kind", "gauge"), ("unit", ""), ("description", "")];
        assert_eq!(s.describe(web, "sent", &again), Ok(()));
        assert_eq!(
            described(&s, "web", "sent"),
            Some((Some(MetricKind::Gauge), None, None))
        );
        // Metrics described count against the series cap (2 here); a metric described
        // again does not.
        assert_eq!(s.describe(web, "recv", &[("kind", "histogram")]), Ok(()));
        assert_eq!(
            described(&s, "web", "recv").map(|d| d.0),
            Some(Some(MetricKind::Histogram))
        );
        assert_eq!(s.describe(web, "third", &[]), Err(Reason::MetadataCap));
        assert_eq!(described(&s, "web", "third"), None);
        assert_eq!(s.describe(web, "recv", &[("kind", "nonsense")]), Ok(()));
        assert_eq!(described(&s, "web", "recv").map(|d| d.0), Some(None));
        assert_eq!(s.all_metadata().len(), 2);
        // A service that was never opened: refused.
        assert_eq!(
            s.describe(99, "sent", &labels),
            Err(Reason::BadRegistration)
        );
    }

    #[test]
    fn float_gauges_and_float_observations() {
        let mut s = store(10, 10, 10, 10);
        let svc = s.service("web");
        let one = |s: &mut Store, kind, name| match s.resolve(svc, kind, name, &[]) {
            Resolved::Series(id) => id,
            Resolved::Refused => panic!("fits"),
        };
        let value = |s: &Store, id| s.get(id).expect("live").value.clone();
        let float = |value| Value::FloatGauge { value };
        // An unset gauge counts from zero; an integer gauge's value carries over.
        let g = one(&mut s, MetricKind::Gauge, "g");
        assert!(s.add_f64(g, 1.5));
        assert!(s.add_f64(g, 2.25));
        assert_eq!(value(&s, g), float(3.75));
        assert!(s.set_f64(g, -0.5));
        assert_eq!(value(&s, g), float(-0.5));
        let i = one(&mut s, MetricKind::Gauge, "i");
        assert!(s.set(i, 4));
        assert!(s.add_f64(i, 0.5));
        assert_eq!(value(&s, i), float(4.5));
        let j = one(&mut s, MetricKind::Gauge, "j");
        assert!(s.set(j, 4));
        assert!(s.set_f64(j, 0.25));
        assert_eq!(value(&s, j), float(0.25));
        // A float aimed at a counter leaves it alone.
        let c = one(&mut s, MetricKind::Counter, "c");
        assert!(s.add(c, 3));
        assert!(s.add_f64(c, 1.0) && s.set_f64(c, 2.0));
        assert_eq!(value(&s, c), Value::Counter { total: 3 });
        // Finite float observations are recorded; NaN and infinities refused.
        let h = one(&mut s, MetricKind::Histogram, "h");
        assert_eq!(s.observe_f64(h, 0.25), Ok(true));
        assert_eq!(s.observe_f64(h, f64::NAN), Err(NotFinite));
        assert_eq!(s.observe_f64(h, f64::INFINITY), Err(NotFinite));
        let Value::Histogram(hist) = value(&s, h) else {
            panic!("a histogram");
        };
        assert_eq!((hist.count(), hist.sum()), (1, 0.25));
        assert_eq!(s.observe_f64(c, 1.0), Ok(true), "not a histogram: ignored");
        // Every series touched is waiting for the next export.
        let mut dirty = s.dirty_ids().to_vec();
        dirty.sort_by_key(|id| id.index());
        assert_eq!(dirty, [g, i, j, c, h]);
    }

    #[test]
    fn an_expired_id_takes_no_float_and_its_slot_has_no_generation() {
        let mut s = ttl_store(10, 100);
        let svc = s.service("web");
        s.ring_opened(svc);
        let mut ids = Vec::new();
        for kind in [MetricKind::Gauge, MetricKind::Histogram] {
            let Resolved::Series(id) = s.resolve(svc, kind, "x", &[]) else {
                panic!("fits");
            };
            assert_eq!(s.generation_at(id.index()), Some(id.generation()));
            ids.push(id);
        }
        assert_eq!(expire(&mut s, &ids).expired, 2);
        assert!(!s.set_f64(ids[0], 1.0));
        assert!(!s.add_f64(ids[0], 1.0));
        assert_eq!(s.observe_f64(ids[1], 1.0), Ok(false));
        assert_eq!(s.generation_at(ids[0].index()), None);
    }

    #[test]
    fn a_restored_series_counts_once_and_is_updated_in_place() {
        let counter = |total| Value::Counter { total };
        // A counter `req` of `web` as the log holds it: labels, whether it is the
        // overflow series, created at, total, exported total.
        let restore = |s: &mut Store,
                       l: &[(&str, &str)],
                       overflow: bool,
                       created_ns: u64,
                       total: u128,
                       exported: u128| {
            let labels: Labels = Arc::from(
                l.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<Vec<_>>(),
            );
            s.restore(
                "web",
                MetricKind::Counter,
                "req",
                labels,
                overflow,
                created_ns,
                counter(total),
                exported,
            )
        };
        let mut s = store(10, 10, 10, 10);
        let plain = restore(&mut s, &[("l", "a")], false, 5, 9, 7);
        let over = restore(&mut s, &[OVERFLOW_LABEL], true, 6, 4, 0);
        assert_eq!((s.stats().series, s.stats().overflow_series), (1, 1));
        // Logged again (a later frame of the same series): the same series, updated.
        assert_eq!(restore(&mut s, &[("l", "a")], false, 5, 12, 9), plain);
        assert_eq!(restore(&mut s, &[OVERFLOW_LABEL], true, 6, 8, 0), over);
        assert_eq!((s.stats().series, s.stats().overflow_series), (1, 1));
        let got = s.get(plain).expect("live");
        assert_eq!(
            (got.value.clone(), got.exported_total, got.created_ns),
            (counter(12), 9, 5)
        );
        assert!(s.get(over).expect("live").overflow);
        assert_eq!(s.take_dirty().len(), 2, "both wait for the next export");
        // A registration of the same identity finds the restored series.
        let svc = s.service("web");
        assert_eq!(
            s.resolve(svc, MetricKind::Counter, "req", &[("l", "a")]),
            Resolved::Series(plain)
        );
        // A restored series fills its metric's and its service's caps (one each here).
        for (per_metric, per_service, name) in [(1, 10, "req"), (10, 1, "other")] {
            let mut s = store(10, per_metric, per_service, 10);
            restore(&mut s, &[("l", "a")], false, 5, 9, 7);
            let svc = s.service("web");
            let Resolved::Series(id) = s.resolve(svc, MetricKind::Counter, name, &[("l", "b")])
            else {
                panic!("overflow has room");
            };
            assert!(s.get(id).expect("live").overflow, "{name}");
        }
    }

    #[test]
    fn a_sweep_reports_its_work_and_compacts_only_past_1024_free_slots() {
        let mut s = ttl_store(3, 100);
        assert!(s.is_empty());
        assert_eq!(s.len(), 0);
        let svc = s.service("web");
        s.ring_opened(svc);
        let ids: Vec<SeriesId> = ["a", "b", "c"]
            .iter()
            .map(|l| series(&mut s, svc, "req", l))
            .collect();
        let Resolved::Series(over) = s.resolve(svc, MetricKind::Gauge, "g", &[]) else {
            panic!("overflow has room");
        };
        assert!(
            s.get(over).expect("live").overflow,
            "past the total cap of 3"
        );
        assert_eq!(s.len(), 4);
        assert!(!s.is_empty());
        // The first stays bound (a longer TTL); the other two expire.
        let t0 = s.get(ids[0]).expect("live").created_ns;
        for &id in &ids[1..] {
            s.unbind(id);
        }
        s.take_dirty();
        for &id in ids.iter().chain([&over]) {
            s.exported(id, None, t0);
        }
        s.unbind(over);
        let swept = s.sweep(t0 + 10 * MS, |_| {});
        assert_eq!((swept.scanned, swept.expired), (4, 3));
        assert_eq!(s.len(), 1);
        // Three free slots of four: far below the 1024 free slots that make a sweep give
        // memory back, so the slot table keeps its length.
        assert_eq!(s.slots.len(), 4);
    }

    #[test]
    fn a_sweep_that_frees_most_of_a_large_table_gives_the_tail_back() {
        let mut s = ttl_store(4000, 4000);
        let (svc, ids) = numbered(&mut s, 2100);
        // All but the first 100 expire: 2000 free slots of 2100, the whole tail.
        assert_eq!(expire(&mut s, &ids[100..]).expired, 2000);
        assert_eq!(s.slots.len(), 100, "the free tail is dropped");
        assert_eq!(s.len(), 100);
        // A new series after the compaction gets a fresh id; the old ones stay stale.
        let fresh = series(&mut s, svc, "req", "new");
        assert!(
            ids[100..]
                .iter()
                .all(|&old| old != fresh && s.get(old).is_none())
        );
    }

    #[test]
    fn a_sweep_gives_memory_back_only_past_1024_free_slots_and_half_the_table() {
        // (slots, expired at the tail): exactly 1024 free of 1500, and 1050 free of
        // 2100 (exactly half): neither is past both bounds, so nothing is given back.
        for (slots, free) in [(1500usize, 1024usize), (2100, 1050)] {
            let mut s = ttl_store(4000, 4000);
            let (_, ids) = numbered(&mut s, slots);
            assert_eq!(expire(&mut s, &ids[slots - free..]).expired as usize, free);
            assert_eq!(s.slots.len(), slots, "{free} free of {slots}");
        }
    }

    #[test]
    fn an_expired_series_frees_its_place_under_the_per_metric_cap_only() {
        let mut s = Store::new(
            SeriesConfig {
                max_per_metric: 2,
                idle_ttl_ms: 10,
                idle_ttl_bound_ms: 1000,
                ..SeriesConfig::default()
            },
            Redactor::new(&RedactionConfig::default().patterns),
            &BTreeMap::new(),
        );
        let svc = s.service("web");
        s.ring_opened(svc);
        let a = series(&mut s, svc, "req", "a");
        let _b = series(&mut s, svc, "req", "b");
        assert_eq!(expire(&mut s, &[a]).expired, 1);
        // "b" still holds one of the metric's two places.
        let c = series(&mut s, svc, "req", "c");
        let d = series(&mut s, svc, "req", "d");
        assert!(!s.get(c).expect("live").overflow);
        assert!(s.get(d).expect("live").overflow);
    }

    #[test]
    fn the_identities_remembered_after_expiring_are_the_latest_65536() {
        let mut s = ttl_store(70_000, 70_000);
        let n = EXPIRED_REMEMBERED + 1;
        let (svc, ids) = numbered(&mut s, n);
        assert_eq!(expire(&mut s, &ids).expired as usize, n);
        // The first to expire is forgotten, the second still remembered.
        let _ = series(&mut s, svc, "req", "0");
        assert_eq!(s.stats().recreated, 0);
        let _ = series(&mut s, svc, "req", "1");
        assert_eq!(s.stats().recreated, 1);
    }

    #[test]
    fn only_a_series_that_comes_back_after_expiring_counts_as_recreated() {
        let mut s = ttl_store(10, 100);
        let svc = s.service("web");
        s.ring_opened(svc);
        let a = series(&mut s, svc, "req", "a");
        assert_eq!(expire(&mut s, &[a]).expired, 1);
        // Other series, of the same name or another, are new ones.
        let _ = series(&mut s, svc, "req", "b");
        let _ = series(&mut s, svc, "other", "a");
        assert_eq!(s.stats().recreated, 0);
        let _ = series(&mut s, svc, "req", "a");
        assert_eq!(s.stats().recreated, 1);
    }

    #[test]
    fn a_bound_series_keeps_the_longer_ttl_and_a_changed_one_never_expires() {
        let mut s = ttl_store(10, 100);
        let svc = s.service("web");
        let bound = series(&mut s, svc, "req", "bound");
        let busy = series(&mut s, svc, "req", "busy");
        s.unbind(busy);
        let t0 = s.get(bound).expect("live").created_ns;
        assert!(s.add(busy, 1)); // changed since the last export: dirty
        let mut gone = Vec::new();
        s.sweep(t0 + 500 * MS, |x| gone.push(x.labels[0].1.clone()));
        assert!(gone.is_empty(), "{gone:?}");
        s.take_dirty();
        s.exported(busy, Some(1), t0 + 500 * MS);
        s.sweep(t0 + 505 * MS, |x| gone.push(x.labels[0].1.clone()));
        assert!(gone.is_empty(), "{gone:?}");
        s.sweep(t0 + 1000 * MS, |x| gone.push(x.labels[0].1.clone()));
        gone.sort();
        assert_eq!(gone, ["bound", "busy"]);
    }

    #[test]
    fn a_series_that_comes_back_starts_again_and_is_counted() {
        let mut s = ttl_store(10, 100);
        let svc = s.service("web");
        s.ring_opened(svc);
        let a = series(&mut s, svc, "req", "a");
        s.unbind(a);
        s.add(a, 7);
        let t0 = s.get(a).expect("live").created_ns;
        s.take_dirty();
        s.exported(a, Some(7), t0);
        s.sweep(t0 + 20 * MS, |_| {});
        std::thread::sleep(std::time::Duration::from_millis(2));
        let again = series(&mut s, svc, "req", "a");
        let back = s.get(again).expect("live");
        assert_eq!(back.value, Value::Counter { total: 0 });
        assert!(back.created_ns > t0);
        assert_eq!(s.stats().recreated, 1);
    }

    #[test]
    fn the_sweep_is_bounded_and_walks_the_whole_store_in_turns() {
        let mut s = ttl_store(100, 16);
        let svc = s.service("web");
        let ids: Vec<SeriesId> = (0..40)
            .map(|i| series(&mut s, svc, "req", &i.to_string()))
            .collect();
        for id in &ids {
            s.unbind(*id);
        }
        let t = crate::drain::wall_ns() + 100 * MS;
        let mut expired = 0;
        for _ in 0..3 {
            let w = s.sweep(t, |_| expired += 1);
            assert!(w.scanned <= 16);
        }
        assert_eq!(expired, 40);
        assert_eq!(s.stats().series, 0);
    }

    /// A store of one series in all, and service `name` (its ring open) holding it and
    /// an overflow series: (service, its own series, the overflow one).
    fn own_and_overflow(name: &str) -> (Store, u32, SeriesId, SeriesId) {
        let mut s = ttl_store(1, 100);
        let svc = s.service(name);
        s.ring_opened(svc);
        let own = series(&mut s, svc, "req", "a");
        let over = series(&mut s, svc, "req", "b");
        assert!(s.get(over).expect("live").overflow);
        (s, svc, own, over)
    }

    #[test]
    fn overflow_series_expire_and_services_are_released() {
        let (mut s, svc, own, over) = own_and_overflow("gone");
        for id in [own, over] {
            s.unbind(id);
        }
        let t = s.get(own).expect("live").created_ns + 100 * MS;
        s.sweep(t, |_| {});
        assert_eq!(s.stats().expired_overflow, 1);
        assert_eq!(s.stats().services, 1, "a ring is still open");
        s.ring_closed(svc);
        s.sweep(t, |_| {});
        assert_eq!((s.stats().services, s.stats().services_released), (0, 1));
        // The name comes back as a new service with its own caps.
        let svc2 = s.service("gone");
        let fresh = series(&mut s, svc2, "req", "c");
        assert!(!s.get(fresh).expect("live").overflow);
    }

    #[test]
    fn a_service_is_kept_while_its_overflow_series_lives() {
        let (mut s, keep, own, over) = own_and_overflow("keep");
        let idle = s.service("idle");
        s.ring_opened(idle);
        s.ring_closed(idle);
        // Its own series expires; the overflow series is still bound (the longer TTL).
        s.unbind(own);
        s.ring_closed(keep);
        let t = s.get(own).expect("live").created_ns + 100 * MS;
        s.sweep(t, |_| {});
        assert!(s.get(own).is_none() && s.get(over).is_some());
        assert_eq!((s.stats().services, s.stats().services_released), (1, 1));
        assert!(s.service_index.contains_key("keep"), "kept");
        assert!(!s.service_index.contains_key("idle"), "released");
        assert_eq!(s.service("keep"), keep, "the same service");
    }

    #[test]
    fn a_stale_id_never_names_a_slot_made_again_after_compaction() {
        let mut s = ttl_store(5000, 5000);
        let svc = s.service("web");
        s.ring_opened(svc);
        let ids: Vec<SeriesId> = (0..3000)
            .map(|i| series(&mut s, svc, "req", &i.to_string()))
            .collect();
        for id in &ids {
            s.unbind(*id);
        }
        let t = crate::drain::wall_ns() + 100 * MS;
        s.sweep(t, |_| {});
        assert!(s.is_empty(), "{:?}", s.stats());
        let fresh: Vec<SeriesId> = (0..3000)
            .map(|i| series(&mut s, svc, "req", &format!("n{i}")))
            .collect();
        for old in &ids {
            assert!(s.get(*old).is_none());
            assert!(!fresh.contains(old));
        }
    }
}
