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
//! counted (`series_cap`), not summed. Series live as long as metricsd.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use crate::config::SeriesConfig;
use crate::histogram::{Histogram, NotFinite};
use crate::redact::{REDACTED, Redactor, is_identity_key};

/// Index of a series in the store.
pub type SeriesId = u32;

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
    /// Counter total when last exported (for the window delta).
    pub(crate) exported_total: u128,
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
            exported_total: 0,
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
}

/// The outcome of resolving a registration to a series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Aggregate into this series.
    Series(SeriesId),
    /// Every cap, the overflow cap included, is reached.
    Refused,
}

/// Every series, under caps.
#[derive(Debug)]
pub struct Store {
    caps: SeriesConfig,
    redactor: Redactor,
    layouts: BTreeMap<String, Arc<[u64]>>,
    series: Vec<Series>,
    index: HashMap<SeriesKey, SeriesId>,
    overflow_index: HashMap<(u32, MetricKind, Arc<str>), SeriesId>,
    services: Vec<ServiceState>,
    service_index: HashMap<Arc<str>, u32>,
    dirty: Vec<SeriesId>,
    stats: StoreStats,
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
            series: Vec::new(),
            index: HashMap::new(),
            overflow_index: HashMap::new(),
            services: Vec::new(),
            service_index: HashMap::new(),
            dirty: Vec::new(),
            stats: StoreStats::default(),
        }
    }

    /// The redaction policy.
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// The index of service `name`, interning it (the grant server bounds how many
    /// services there are).
    pub fn service(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.service_index.get(name) {
            return i;
        }
        let name: Arc<str> = Arc::from(name);
        let i = self.services.len() as u32;
        self.services.push(ServiceState {
            name: name.clone(),
            series: 0,
            per_metric: HashMap::new(),
        });
        self.service_index.insert(name, i);
        i
    }

    /// The configured bounds for histograms (and span durations) named `name`; `None`
    /// means exponential.
    pub fn layout(&self, name: &str) -> Option<Arc<[u64]>> {
        self.layouts.get(name).cloned()
    }

    /// Resolves a registration of `name` with `labels` (as the producer gave them) in
    /// `service` to a series, creating it if the caps allow, else binding it to the
    /// metric's overflow series.
    pub fn resolve(
        &mut self,
        service: u32,
        kind: MetricKind,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Resolved {
        let Some(state) = self.services.get(service as usize) else {
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
            let id = self.push(service_name, kind, name.clone(), key.labels.clone(), false);
            self.index.insert(key, id);
            self.stats.series += 1;
            if let Some(state) = self.services.get_mut(service as usize) {
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
        let id = self.push(service_name, kind, name, labels, true);
        self.overflow_index.insert(okey, id);
        self.stats.overflow_series += 1;
        self.stats.overflowed_registrations += 1;
        Resolved::Series(id)
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
        let id = self.series.len() as SeriesId;
        self.series.push(Series {
            service,
            kind,
            name,
            labels,
            overflow,
            value,
            samples: 0,
            exported_total: 0,
            dirty: false,
        });
        id
    }

    // `touch`, `add`, `set` and `observe` are always inlined into the drain loop's
    // per-record path (see `Ctx::sample` in `drain.rs`).
    #[inline(always)]
    fn touch(&mut self, id: SeriesId) -> Option<&mut Series> {
        let s = self.series.get_mut(id as usize)?;
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
    pub fn add(&mut self, id: SeriesId, delta: u64) {
        if let Some(Series {
            value: Value::Counter { total },
            ..
        }) = self.touch(id)
        {
            *total += u128::from(delta);
        }
    }

    /// Sets gauge `id` to `value`.
    #[inline(always)]
    pub fn set(&mut self, id: SeriesId, value: i64) {
        if let Some(Series {
            value: Value::Gauge { value: v },
            ..
        }) = self.touch(id)
        {
            *v = Some(value);
        }
    }

    /// Records observation `value` in histogram `id`.
    #[inline(always)]
    pub fn observe(&mut self, id: SeriesId, value: u64) {
        if let Some(Series {
            value: Value::Histogram(h),
            ..
        }) = self.touch(id)
        {
            h.record(value);
        }
    }

    /// Records observation `value` in histogram `id`; NaN and infinities are refused
    /// (the caller counts them) and leave the series untouched.
    #[inline(always)]
    pub fn observe_f64(&mut self, id: SeriesId, value: f64) -> Result<(), NotFinite> {
        if !value.is_finite() {
            return Err(NotFinite);
        }
        if let Some(Series {
            value: Value::Histogram(h),
            ..
        }) = self.touch(id)
        {
            h.record_f64(value)?;
        }
        Ok(())
    }

    /// The series changed since the last call, clearing their changed mark.
    pub fn take_dirty(&mut self) -> Vec<SeriesId> {
        let ids = std::mem::take(&mut self.dirty);
        for &id in &ids {
            if let Some(s) = self.series.get_mut(id as usize) {
                s.dirty = false;
            }
        }
        ids
    }

    /// Series `id`.
    pub fn get(&self, id: SeriesId) -> Option<&Series> {
        self.series.get(id as usize)
    }

    /// Records the counter total last exported (for the next window's delta).
    pub(crate) fn set_exported_total(&mut self, id: SeriesId, total: u128) {
        if let Some(s) = self.series.get_mut(id as usize) {
            s.exported_total = total;
        }
    }

    /// Every series.
    pub fn all(&self) -> &[Series] {
        &self.series
    }

    /// Running totals.
    pub fn stats(&self) -> StoreStats {
        self.stats
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
            .iter()
            .map(|x| match x.value {
                Value::Counter { total } => total,
                _ => 0,
            })
            .sum();
        assert_eq!(total, 10 + 11 + 12 + 13 + 14, "totals stay correct");
        assert_eq!(s.stats().series, 2);
        assert_eq!(s.stats().overflowed_registrations, 3);
        assert_eq!(s.stats().overflow_samples, 3);
        // The overflow cap (1) is used by "req": a second metric is refused.
        s.resolve(svc, MetricKind::Counter, "other", &[("a", "1")]);
        s.resolve(svc, MetricKind::Counter, "other", &[("a", "2")]);
        assert_eq!(
            s.resolve(svc, MetricKind::Counter, "other", &[("a", "3")]),
            Resolved::Refused
        );
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
}
