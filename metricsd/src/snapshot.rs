//! A point-in-time view of the daemon for tests, `metricsd top` and the demo.

use std::collections::BTreeMap;

use crate::aggregate::{MetricKind, MetricMetadata, Series, StoreStats, Value, series_id};
use crate::export::ExportStats;
use crate::health::RejectCounts;
use crate::histogram::Histogram;
use crate::spans::SpanStats;

/// One ring as the drain loop sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingSnapshot {
    /// The ring's id.
    pub id: u32,
    /// The control connection that was granted it.
    pub connection: u64,
    /// The producer's service.
    pub service: String,
    /// Records per ring.
    pub capacity: u64,
    /// Records consumed.
    pub consumed: u64,
    /// The producer's own dropped-record count (highest seen).
    pub producer_dropped: u64,
    /// Records published and unread after the last pass.
    pub pending: u64,
    /// Keys registered.
    pub keys: usize,
    /// The violation that quarantined it, by name.
    pub quarantined: Option<&'static str>,
    /// Whether its producer disconnected (the ring was drained a last time and freed).
    pub closed: bool,
}

/// Protocol violations (each quarantines its ring).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Violations {
    /// `write - read > capacity`.
    pub write_out_of_range: u64,
    /// The write position moved back.
    pub write_moved_back: u64,
    /// The shared dropped counter went down (counted, not quarantined).
    pub dropped_moved_back: u64,
}

impl Violations {
    /// Violations that quarantined a ring.
    pub fn quarantining(&self) -> u64 {
        self.write_out_of_range + self.write_moved_back
    }
}

/// Drain loop totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Passes over all rings.
    pub passes: u64,
    /// Records consumed from rings.
    pub records: u64,
    /// Registrations accepted (new keys bound).
    pub registrations: u64,
    /// Records pending in all rings after the last pass (drain lag).
    pub lag: u64,
    /// Rings open now.
    pub rings_open: u64,
    /// Rings quarantined (each counted once).
    pub rings_quarantined: u64,
    /// Rings freed after their producer disconnected.
    pub rings_closed: u64,
    /// Exports built.
    pub exports: u64,
    /// The longest pass since the last export, in ns: no ring waited longer than this
    /// between two visits of the drain loop.
    pub pass_ns_max: u64,
}

/// One control connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionStats {
    /// The connection id.
    pub id: u64,
    /// The peer's pid.
    pub pid: u32,
    /// The peer's uid.
    pub uid: u32,
    /// The service policy gave it.
    pub service: String,
    /// Control messages received on it.
    pub messages: u64,
    /// Rings granted on it.
    pub rings: u64,
}

/// Grant server totals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrantStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections closed at accept because `rings.max_connections` were open.
    pub refused_connections: u64,
    /// Control messages received, on every connection ever.
    pub messages: u64,
    /// Rings granted.
    pub granted: u64,
    /// Rings an earlier daemon left unclosed, handed back and finished (grant op 2).
    pub returned: u64,
    /// Refused requests by status name (`invalid_args`, `over_limit`, `rate_limited`,
    /// `unavailable`).
    pub refused: BTreeMap<&'static str, u64>,
    /// The refusals the status alone does not explain, by reason: `policy` (`DENIED`:
    /// not listed in `[grants]`), `total_bytes` and `uid_bytes` (`OVER_LIMIT`: the ring
    /// would pass `rings.max_total_bytes` or the uid's `rings.max_bytes_per_uid`).
    pub refused_reasons: BTreeMap<&'static str, u64>,
    /// Bytes of shared memory held as rings now (header and records of each ring).
    pub ring_bytes: u64,
    /// The most `ring_bytes` has been.
    pub ring_bytes_peak: u64,
    /// Open connections.
    pub connections: BTreeMap<u64, ConnectionStats>,
}

/// One of metricsd's own health series (the table in `metricsd/README.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSeries {
    /// Counter or gauge.
    pub kind: MetricKind,
    /// The name, e.g. `metricsd.records.drained`.
    pub name: &'static str,
    /// Labels, sorted by key.
    pub labels: std::sync::Arc<[(String, String)]>,
    /// The value.
    pub value: i128,
}

/// The whole view.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every series.
    pub series: Vec<Series>,
    /// Every described metric's unit and description, by service and name.
    pub metadata: Vec<MetricMetadata>,
    /// Open rings, then recently closed ones.
    pub rings: Vec<RingSnapshot>,
    /// Rejects by reason (and class).
    pub rejects: RejectCounts,
    /// Protocol violations.
    pub violations: Violations,
    /// Series store totals (overflow, redaction).
    pub store: StoreStats,
    /// Span totals.
    pub spans: SpanStats,
    /// Drain totals.
    pub drain: DrainStats,
    /// Grant totals.
    pub grant: GrantStats,
    /// Export totals.
    pub export: ExportStats,
    /// metricsd's health series (as exported).
    pub health: Vec<HealthSeries>,
}

impl Snapshot {
    /// The series of `service`, `kind`, `name` and `labels` (any order).
    pub fn find(
        &self,
        service: &str,
        kind: MetricKind,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<&Series> {
        let id = series_id(service, kind, name, labels);
        self.series.iter().find(|s| s.id() == id)
    }

    /// A counter's total.
    pub fn counter(&self, service: &str, name: &str, labels: &[(&str, &str)]) -> Option<u128> {
        match self.find(service, MetricKind::Counter, name, labels)?.value {
            Value::Counter { total } => Some(total),
            _ => None,
        }
    }

    /// A gauge's value.
    pub fn gauge(&self, service: &str, name: &str, labels: &[(&str, &str)]) -> Option<i64> {
        match self.find(service, MetricKind::Gauge, name, labels)?.value {
            Value::Gauge { value } => value,
            _ => None,
        }
    }

    /// A float gauge's value (a gauge set or moved by a float).
    pub fn float_gauge(&self, service: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.find(service, MetricKind::Gauge, name, labels)?.value {
            Value::FloatGauge { value } => Some(value),
            _ => None,
        }
    }

    /// The metadata of metric `name` of `service`, if it was described.
    pub fn metadata_of(&self, service: &str, name: &str) -> Option<&MetricMetadata> {
        self.metadata
            .iter()
            .find(|m| &*m.service == service && &*m.name == name)
    }

    /// A histogram.
    pub fn histogram(
        &self,
        service: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<&Histogram> {
        match &self
            .find(service, MetricKind::Histogram, name, labels)?
            .value
        {
            Value::Histogram(h) => Some(h),
            _ => None,
        }
    }

    /// Sum of every counter series named `name` of `service` (overflow included).
    pub fn counter_sum(&self, service: &str, name: &str) -> u128 {
        self.series
            .iter()
            .filter(|s| &*s.service == service && &*s.name == name)
            .map(|s| match s.value {
                Value::Counter { total } => total,
                _ => 0,
            })
            .sum()
    }
}
