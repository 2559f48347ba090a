//! What a demo producer tells the demo when it is done: every series it recorded and the
//! exact aggregate it expects metricsd to have exported, plus its own drop counts.
//!
//! A producer prints one [`Report`] as a single JSON line on stdout after
//! `nexus_metrics::flush_for`; the demo compares it with what logd holds
//! ([`super::verify`]). Nothing here is hard-coded: the expectations are whatever the
//! producer actually recorded in this run.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::aggregate::MetricKind;
use crate::histogram::Exponential;

/// How strictly a report's series are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Every series exists in logd with exactly the expected aggregate, and the service
    /// has no other series.
    Exact,
    /// Counters only; a label set past metricsd's caps has no series of its own and its
    /// total must be in the metric's overflow series (`otel.metric.overflow=true`),
    /// which must then equal the sum of those label sets exactly.
    Overflow,
}

/// The aggregate one series must have.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Expect {
    /// A counter: the sum of every increment.
    Counter {
        /// The sum.
        total: u64,
    },
    /// A gauge: the last value set (one writer thread per gauge series).
    Gauge {
        /// The value.
        last: i64,
    },
    /// A histogram: observations, their sum, and every bucket (the producer's own
    /// exponential histogram of the same values).
    Histogram {
        /// Observations.
        count: u64,
        /// Their sum.
        sum: u64,
        /// The buckets.
        buckets: Box<Exponential>,
    },
    /// A span name's duration histogram: spans ended under that name.
    SpanDuration {
        /// Spans ended.
        count: u64,
    },
}

impl Expect {
    /// The metricsd kind of the series.
    pub const fn kind(&self) -> MetricKind {
        match self {
            Self::Counter { .. } => MetricKind::Counter,
            Self::Gauge { .. } => MetricKind::Gauge,
            Self::Histogram { .. } => MetricKind::Histogram,
            Self::SpanDuration { .. } => MetricKind::SpanDuration,
        }
    }

    /// Merges what another thread recorded into the same series (counters, histograms
    /// and span counts add; a gauge keeps `other`, so give each gauge one thread).
    pub fn merge(&mut self, other: Self) {
        match (self, other) {
            (Self::Counter { total }, Self::Counter { total: t }) => *total += t,
            (
                Self::Histogram {
                    count,
                    sum,
                    buckets,
                },
                Self::Histogram {
                    count: c,
                    sum: s,
                    buckets: b,
                },
            ) => {
                *count += c;
                *sum += s;
                buckets.merge(&b);
            }
            (Self::SpanDuration { count }, Self::SpanDuration { count: c }) => *count += c,
            (me, other) => *me = other,
        }
    }
}

/// One series a producer recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeriesReport {
    /// The metric or span name.
    pub name: String,
    /// Labels as recorded (any order).
    pub labels: Vec<(String, String)>,
    /// The aggregate expected.
    pub expect: Expect,
}

/// What the hostile producer did, so the demo can check each effect.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostileReport {
    /// Rings it was granted.
    pub rings: u32,
    /// Garbage records it published (unknown kinds, unregistered keys, bad spans, ...).
    pub garbage_records: u64,
    /// Rings whose write position it moved more than a capacity ahead.
    pub scribbled_ahead: u32,
    /// Rings whose write position it moved back.
    pub scribbled_back: u32,
    /// Scribbled rings it then saw flagged as quarantined by metricsd.
    pub saw_quarantined: u32,
    /// Times it lowered its ring's shared `dropped` counter after metricsd read it.
    pub dropped_lowered: u32,
    /// The highest `dropped` value it claimed.
    pub dropped_claimed: u64,
    /// Malformed grant requests it sent (each answered `INVALID_ARGS`).
    pub bad_grant_requests: u32,
    /// The counter it wrote under another service's metric name, labelled
    /// `service=<victim>` to claim that identity: it must land under `hostile`.
    pub impersonation: Option<SeriesReport>,
    /// The service it pretended to be.
    pub impersonated: String,
}

/// A demo producer's report (one JSON line on its stdout).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The role it played (`--role`).
    pub role: String,
    /// How its series are checked.
    pub check: Check,
    /// Requests (or calls) it handled.
    pub requests: u64,
    /// Every series it recorded, with the aggregate expected.
    pub series: Vec<SeriesReport>,
    /// `nexus_metrics::stats()` drops by reason (nonzero only).
    pub dropped: BTreeMap<String, u64>,
    /// Counter increments given up at thread exit (must be 0).
    pub lost_increments: u64,
    /// Records left in a ring whose metricsd never closed it (must be 0; see
    /// `nexus_metrics::Stats::unconfirmed`).
    #[serde(default)]
    pub unconfirmed: u64,
    /// Counter increments that waited for room (late, not lost).
    pub coalesced: u64,
    /// Rings its threads claimed.
    pub rings_claimed: u64,
    /// Present for the hostile producer.
    pub hostile: Option<HostileReport>,
}

impl Report {
    /// A report of `role` with nothing dropped, coalesced or claimed yet.
    pub fn new(role: &str, check: Check, requests: u64, series: Vec<SeriesReport>) -> Self {
        Self {
            role: role.to_owned(),
            check,
            requests,
            series,
            dropped: BTreeMap::new(),
            lost_increments: 0,
            unconfirmed: 0,
            coalesced: 0,
            rings_claimed: 0,
            hostile: None,
        }
    }

    /// Records the producer itself dropped (exact totals need zero for every kind but
    /// counters, which coalesce instead).
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }
}

/// A series' identity within one producer: kind, name, sorted labels.
type SeriesKey = (MetricKind, String, Vec<(String, String)>);

/// Series merged by `(kind, name, sorted labels)`.
#[derive(Debug, Default)]
pub struct Tally {
    series: BTreeMap<SeriesKey, Expect>,
}

impl Tally {
    /// Adds what was recorded into one series.
    pub fn add(&mut self, name: &str, labels: &[(&str, &str)], expect: Expect) {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        labels.sort();
        self.merge_in((expect.kind(), name.to_owned(), labels), expect);
    }

    fn merge_in(&mut self, key: (MetricKind, String, Vec<(String, String)>), expect: Expect) {
        match self.series.entry(key) {
            std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().merge(expect),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(expect);
            }
        }
    }

    /// Merges another tally (another thread's).
    pub fn absorb(&mut self, other: Tally) {
        for (key, expect) in other.series {
            self.merge_in(key, expect);
        }
    }

    /// The series, in a stable order.
    pub fn into_series(self) -> Vec<SeriesReport> {
        self.series
            .into_iter()
            .map(|((_, name, labels), expect)| SeriesReport {
                name,
                labels,
                expect,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_merge_per_series_and_round_trip_as_json() {
        let mut a = Tally::default();
        a.add("c", &[("b", "2"), ("a", "1")], Expect::Counter { total: 3 });
        let hist = |values: &[u64]| {
            let mut h = Exponential::new();
            values.iter().for_each(|&v| h.record(v));
            Expect::Histogram {
                count: values.len() as u64,
                sum: values.iter().sum(),
                buckets: Box::new(h),
            }
        };
        a.add("h", &[], hist(&[10]));
        let mut b = Tally::default();
        b.add("c", &[("a", "1"), ("b", "2")], Expect::Counter { total: 4 });
        b.add("h", &[], hist(&[2, 3]));
        b.add("g", &[], Expect::Gauge { last: -7 });
        a.absorb(b);
        let series = a.into_series();
        assert_eq!(series.len(), 3);
        assert_eq!(series[0].expect, Expect::Counter { total: 7 });
        assert_eq!(series[2].expect, hist(&[10, 2, 3]), "histograms merge");
        assert_eq!(
            series[0].labels,
            [("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        let report = Report {
            rings_claimed: 1,
            ..Report::new("checkout", Check::Exact, 1, series)
        };
        let line = serde_json::to_string(&report).expect("serializes");
        assert!(!line.contains('\n'));
        let back: Report = serde_json::from_str(&line).expect("parses");
        assert_eq!(back, report);
    }
}
