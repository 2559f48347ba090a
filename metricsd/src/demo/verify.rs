//! The demo's check, through logd only: query what metricsd exported and compare it with
//! what the producers report they recorded, exactly.
//!
//! For each service, one query (`scope = metrics`, field `producer_service = <service>`)
//! returns every record metricsd exported for it; the last record of each `series` is
//! its final value (series values are cumulative). Then:
//!
//! - [`Check::Exact`] services: every reported series exists with exactly the reported
//!   aggregate (counter `value`, gauge `value`, histogram `count`, `sum`, scale, zero
//!   bucket and every bucket count, span duration `count`), and the service has no series it did not report.
//! - [`Check::Overflow`] services: a label set with a series of its own has exactly its
//!   total; the rest must be in the metric's overflow series, whose value must equal
//!   their sum exactly (and there must be some: the flood must have overflowed).
//! - The hostile producer ([`verify_hostile`]): its impersonating counter is under its
//!   own service with the `service` label renamed, and metricsd's health series count
//!   exactly the violations, quarantined rings, lowered drop counts, malformed grant
//!   requests and garbage records (each rejected exactly once) it reports.
//! - Spans ([`verify_spans`]): every span the producers ended was exported, every
//!   exported span is a span record in logd or counted past logd's span rate, and every
//!   span record in logd is exactly (ids, parent, name, status, times) a span a
//!   producer ended, from the span logs the producers write.
//!
//! Used by `metricsd demo` and by the QEMU selftest.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use logd::{Client, Query, StoredRecord};

use super::producer::{SPAN_ENTRY_BYTES, SpanEntry};

use super::report::{Check, Expect, HostileReport, Report, SeriesReport};
use crate::aggregate::{MetricKind, OVERFLOW_LABEL, series_id};
use crate::schema::{HEALTH_SERVICE, SCOPE_METRICS, SCOPE_SPANS};

/// Most records one service's query may return.
const MAX_RECORDS: usize = 2_000_000;

/// One difference between what a producer recorded and what logd holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// A span record in logd differs from the span the producer ended (or has none).
    Span {
        /// The span id (16 hex digits).
        span_id: String,
        /// What differs.
        problem: String,
    },
    /// A reported series has no record in logd.
    Missing {
        /// The series id.
        series: String,
    },
    /// A field of the last record differs.
    Value {
        /// The series id.
        series: String,
        /// The field compared.
        field: &'static str,
        /// What the producer recorded.
        expected: String,
        /// What logd holds (`None`: the field is absent).
        found: Option<String>,
    },
    /// logd has a series of this service the producer did not record.
    Unexpected {
        /// The series id.
        series: String,
    },
    /// A flooding service's metric never overflowed (the check would prove nothing).
    NoOverflow {
        /// The service.
        service: String,
        /// The metric.
        metric: String,
    },
    /// A flooding metric got another number of series of its own than the cap allows.
    Cap {
        /// The service.
        service: String,
        /// The metric.
        metric: String,
        /// Label sets with a series of their own.
        own_series: u64,
        /// What the caps allow for it.
        cap: u64,
    },
    /// A producer dropped records itself, so exact totals cannot be expected.
    ProducerDropped {
        /// The service.
        service: String,
        /// Drops by reason.
        dropped: String,
    },
    /// A series of the scrape of `GET /metrics` differs from what was recorded.
    Scrape {
        /// The series, as scraped (family and labels).
        series: String,
        /// What was compared.
        field: &'static str,
        /// What the producer recorded.
        expected: String,
        /// What the scrape held (`None`: absent).
        found: Option<String>,
    },
    /// A health series of metricsd does not count what the hostile producer did.
    Health {
        /// The series id.
        series: String,
        /// Expected value (`N` or `at least N`).
        expected: String,
        /// The value in logd (`None`: no record).
        found: Option<String>,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Span { span_id, problem } => write!(f, "span {span_id}: {problem}"),
            Self::Missing { series } => write!(f, "{series}: no record in logd"),
            Self::Value {
                series,
                field,
                expected,
                found,
            } => write!(
                f,
                "{series}: {field} is {} in logd, the producer recorded {expected}",
                found.as_deref().unwrap_or("absent")
            ),
            Self::Scrape {
                series,
                field,
                expected,
                found,
            } => write!(
                f,
                "{series}: {field} is {} in the scrape, the producer recorded {expected}",
                found.as_deref().unwrap_or("absent")
            ),
            Self::Unexpected { series } => {
                write!(f, "{series}: in logd, but the producer never recorded it")
            }
            Self::NoOverflow { service, metric } => write!(
                f,
                "{service}/{metric}: no label set overflowed, so the cap was never exercised"
            ),
            Self::Cap {
                service,
                metric,
                own_series,
                cap,
            } => write!(
                f,
                "{service}/{metric}: {own_series} label sets got a series of their own, the caps allow {cap}"
            ),
            Self::ProducerDropped { service, dropped } => write!(
                f,
                "producer {service} dropped records itself ({dropped}); its totals cannot be exact"
            ),
            Self::Health {
                series,
                expected,
                found,
            } => write!(
                f,
                "{series}: {} in logd, expected {expected}",
                found.as_deref().unwrap_or("no record")
            ),
        }
    }
}

/// What a flooding service's check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverflowCheck {
    /// The service.
    pub service: String,
    /// The metric.
    pub metric: String,
    /// Label sets with a series of their own.
    pub own_series: u64,
    /// Label sets that landed in the overflow series.
    pub overflowed: u64,
    /// The overflow series' total (equal to what those label sets recorded).
    pub overflow_total: u64,
    /// The metric's total over every label set.
    pub total: u64,
}

/// The outcome of a check.
#[derive(Clone, Debug, Default)]
pub struct Verification {
    /// Services checked.
    pub services: u64,
    /// Series compared (each one reported series, or one overflow series).
    pub series_checked: u64,
    /// logd records read.
    pub records_read: u64,
    /// Flooding services.
    pub overflow: Vec<OverflowCheck>,
    /// Health series compared for the hostile producer.
    pub health_checked: u64,
    /// Span records in logd.
    pub spans_in_logd: u64,
    /// Of which with `status = error`.
    pub error_spans_in_logd: u64,
    /// Spans the producers ended.
    pub spans_ended: u64,
    /// Spans metricsd exported (`metricsd.spans.exported`).
    pub spans_exported: u64,
    /// Exported spans past logd's span rate (`metricsd.spans.not_logged`).
    pub spans_not_logged: u64,
    /// Span records in logd matched field by field with a span a producer ended.
    pub spans_verified: u64,
    /// Every difference found, in order.
    pub mismatches: Vec<Mismatch>,
}

impl Verification {
    /// Whether everything matched.
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// Why logd could not be asked.
#[derive(Debug)]
pub struct VerifyError(pub logd::ClientError);

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "querying logd: {}", self.0)
    }
}

impl std::error::Error for VerifyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// The last record of every series of one exporting service, read from logd.
#[derive(Debug, Default)]
pub struct Exported {
    latest: HashMap<String, StoredRecord>,
    records: u64,
}

impl Exported {
    /// Every `scope = metrics` record whose `producer_service` is `service`; with
    /// `sender_pid`, only those logd stamped as sent by that process (metricsd), so
    /// nothing another local process appended to logd is counted.
    pub fn query(
        client: &mut Client,
        service: &str,
        sender_pid: Option<u32>,
    ) -> Result<Self, VerifyError> {
        let q = Query::new()
            .scope(SCOPE_METRICS)
            .field("producer_service", service);
        let records = client.query_all(&q, MAX_RECORDS).map_err(VerifyError)?;
        let mut out = Self::default();
        for r in records {
            if sender_pid.is_some_and(|pid| r.sender.pid != pid) {
                continue;
            }
            out.records += 1;
            let Some(series) = r.record.get("series").map(str::to_owned) else {
                continue;
            };
            match out.latest.get(&series) {
                Some(old) if old.id > r.id => {}
                _ => {
                    out.latest.insert(series, r);
                }
            }
        }
        Ok(out)
    }

    /// The last record of `series`.
    pub fn get(&self, series: &str) -> Option<&StoredRecord> {
        self.latest.get(series)
    }

    /// A field of the last record of `series`.
    pub fn field(&self, series: &str, field: &str) -> Option<&str> {
        self.get(series)?.record.get(field)
    }

    /// Every series id.
    pub fn series(&self) -> impl Iterator<Item = &str> {
        self.latest.keys().map(String::as_str)
    }
}

fn id_of(service: &str, s: &SeriesReport) -> String {
    series_id(service, s.expect.kind(), &s.name, &s.labels)
}

fn csv(counts: &[u64]) -> String {
    let parts: Vec<String> = counts.iter().map(u64::to_string).collect();
    parts.join(",")
}

/// Compares one series' last record with what was recorded.
fn compare(exported: &Exported, series: &str, expect: &Expect, out: &mut Vec<Mismatch>) {
    if exported.get(series).is_none() {
        out.push(Mismatch::Missing {
            series: series.to_owned(),
        });
        return;
    }
    let fields: Vec<(&'static str, String)> = match expect {
        Expect::Counter { total } => vec![("value", total.to_string())],
        Expect::Gauge { last } => vec![("value", last.to_string())],
        Expect::Histogram {
            count,
            sum,
            buckets,
        } => {
            // Every bucket: the producer's own histogram of the same values, so the
            // scale, the zero bucket and each bucket count must match exactly.
            let mut f = vec![
                ("count", count.to_string()),
                ("sum", sum.to_string()),
                ("scale", buckets.scale().to_string()),
                ("zero_count", buckets.zero_count().to_string()),
            ];
            if !buckets.positive().is_empty() {
                f.push(("positive_offset", buckets.positive().offset().to_string()));
                f.push(("positive_buckets", csv(buckets.positive().counts())));
            }
            f
        }
        Expect::SpanDuration { count } => vec![("count", count.to_string())],
    };
    for (field, expected) in fields {
        let found = exported.field(series, field);
        if found != Some(expected.as_str()) {
            out.push(Mismatch::Value {
                series: series.to_owned(),
                field,
                expected,
                found: found.map(str::to_owned),
            });
        }
    }
}

/// Checks every report against logd. `reports` pairs each report with the service name
/// metricsd gave its producer; `sender_pid` is metricsd's pid as logd stamps it (see
/// [`Exported::query`]).
///
/// ```no_run
/// use std::path::Path;
/// use metricsd::demo::{report::Report, verify};
///
/// // Each producer printed its report as one JSON line (`metricsd demo-producer`).
/// let line = r#"{"role":"checkout","check":"exact","requests":0,"series":[],"dropped":{},"lost_increments":0,"coalesced":0,"rings_claimed":0,"hostile":null}"#;
/// let report: Report = serde_json::from_str(line)?;
/// let v = verify::verify(Path::new("/run/logd.sock"), &[("checkout".into(), report)], None)?;
/// println!("{} series exact: {}", v.series_checked, v.ok());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn verify(
    logd_socket: &Path,
    reports: &[(String, Report)],
    sender_pid: Option<u32>,
) -> Result<Verification, VerifyError> {
    let mut client = Client::connect(logd_socket).map_err(VerifyError)?;
    let mut v = Verification::default();
    for (service, report) in reports {
        if report.hostile.is_some() {
            continue;
        }
        v.services += 1;
        if report.dropped_total() > 0 || report.lost_increments > 0 || report.unconfirmed > 0 {
            let mut dropped: Vec<String> = report
                .dropped
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            if report.lost_increments > 0 {
                dropped.push(format!("lost increments {}", report.lost_increments));
            }
            if report.unconfirmed > 0 {
                dropped.push(format!("unconfirmed {}", report.unconfirmed));
            }
            v.mismatches.push(Mismatch::ProducerDropped {
                service: service.clone(),
                dropped: dropped.join(", "),
            });
        }
        let exported = Exported::query(&mut client, service, sender_pid)?;
        v.records_read += exported.records;
        match report.check {
            Check::Exact => exact(service, report, &exported, &mut v),
            Check::Overflow => overflow(service, report, &exported, &mut v),
        }
    }
    Ok(v)
}

fn exact(service: &str, report: &Report, exported: &Exported, v: &mut Verification) {
    let mut reported = std::collections::HashSet::new();
    for s in &report.series {
        let id = id_of(service, s);
        compare(exported, &id, &s.expect, &mut v.mismatches);
        v.series_checked += 1;
        reported.insert(id);
    }
    let mut unexpected: Vec<&str> = exported
        .series()
        .filter(|id| !reported.contains(*id))
        .collect();
    unexpected.sort_unstable();
    for series in unexpected {
        v.mismatches.push(Mismatch::Unexpected {
            series: series.to_owned(),
        });
    }
}

fn overflow(service: &str, report: &Report, exported: &Exported, v: &mut Verification) {
    let mut per_metric: BTreeMap<&str, OverflowCheck> = BTreeMap::new();
    for s in &report.series {
        let Expect::Counter { total } = s.expect else {
            continue;
        };
        let check = per_metric
            .entry(s.name.as_str())
            .or_insert_with(|| OverflowCheck {
                service: service.to_owned(),
                metric: s.name.clone(),
                ..OverflowCheck::default()
            });
        check.total += total;
        let id = id_of(service, s);
        if exported.get(&id).is_some() {
            compare(exported, &id, &s.expect, &mut v.mismatches);
            v.series_checked += 1;
            check.own_series += 1;
        } else {
            check.overflowed += 1;
            check.overflow_total += total;
        }
    }
    for (metric, check) in per_metric {
        let id = series_id(service, MetricKind::Counter, metric, &[OVERFLOW_LABEL]);
        if check.overflowed == 0 {
            v.mismatches.push(Mismatch::NoOverflow {
                service: service.to_owned(),
                metric: metric.to_owned(),
            });
        } else {
            compare(
                exported,
                &id,
                &Expect::Counter {
                    total: check.overflow_total,
                },
                &mut v.mismatches,
            );
            v.series_checked += 1;
        }
        v.overflow.push(check);
    }
}

/// Checks that each flooding metric got exactly `cap` series of its own (the number
/// metricsd's caps allow it, given that it recorded more label sets than that).
pub fn verify_caps(v: &mut Verification, cap: u64) {
    for o in &v.overflow {
        let want = cap.min(o.own_series + o.overflowed);
        if o.own_series != want {
            v.mismatches.push(Mismatch::Cap {
                service: o.service.clone(),
                metric: o.metric.clone(),
                own_series: o.own_series,
                cap: want,
            });
        }
    }
}

/// A health series [`verify_hostile`] compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthExpect {
    /// The series id.
    pub series: String,
    /// The value it must have.
    pub value: u64,
    /// Whether more is fine (for counts that may legitimately run ahead).
    pub at_least: bool,
}

/// The health series [`verify_hostile`] compares, with the value each must have.
pub fn hostile_expectations(h: &HostileReport) -> Vec<HealthExpect> {
    let c = MetricKind::Counter;
    let health = |name: &str, labels: &[(&str, &str)], value: u32, at_least: bool| HealthExpect {
        series: series_id(HEALTH_SERVICE, c, name, labels),
        value: u64::from(value),
        at_least,
    };
    vec![
        health(
            "metricsd.rings.quarantined",
            &[],
            h.scribbled_ahead + h.scribbled_back,
            false,
        ),
        health(
            "metricsd.violations",
            &[("reason", "write_out_of_range")],
            h.scribbled_ahead,
            false,
        ),
        health(
            "metricsd.violations",
            &[("reason", "write_moved_back")],
            h.scribbled_back,
            false,
        ),
        health(
            "metricsd.violations",
            &[("reason", "dropped_moved_back")],
            h.dropped_lowered,
            // The reader counts each move down once (not once per pass that sees it).
            false,
        ),
        health(
            "metricsd.grant.refused",
            &[("class", "invalid_args")],
            h.bad_grant_requests,
            false,
        ),
    ]
}

/// Checks the hostile producer's effects through logd: its impersonating counter is its
/// own (under `service`, the identity label renamed `exported_service`), and metricsd's
/// health series count exactly what it did. Assumes it was the only misbehaving
/// producer of this metricsd.
pub fn verify_hostile(
    logd_socket: &Path,
    service: &str,
    h: &HostileReport,
    sender_pid: Option<u32>,
    v: &mut Verification,
) -> Result<(), VerifyError> {
    let mut client = Client::connect(logd_socket).map_err(VerifyError)?;
    let own = Exported::query(&mut client, service, sender_pid)?;
    v.records_read += own.records;
    if let Some(imp) = &h.impersonation {
        let labels: Vec<(String, String)> = imp
            .labels
            .iter()
            .map(|(k, val)| {
                let key = if crate::redact::is_identity_key(k) {
                    format!("exported_{k}")
                } else {
                    k.clone()
                };
                (key, val.clone())
            })
            .collect();
        let id = series_id(service, imp.expect.kind(), &imp.name, &labels);
        compare(&own, &id, &imp.expect, &mut v.mismatches);
        v.series_checked += 1;
    }
    let health = Exported::query(&mut client, HEALTH_SERVICE, sender_pid)?;
    v.records_read += health.records;
    for e in hostile_expectations(h) {
        let found = health.field(&e.series, "value");
        v.health_checked += 1;
        let value = found.and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        let matches = if e.at_least {
            value >= e.value
        } else {
            value == e.value && (found.is_some() || e.value == 0)
        };
        if !matches {
            v.mismatches.push(Mismatch::Health {
                series: e.series,
                expected: if e.at_least {
                    format!("at least {}", e.value)
                } else {
                    e.value.to_string()
                },
                found: found.map(str::to_owned),
            });
        }
    }
    // Every garbage record rejected exactly once, and nothing else rejected.
    let rejects: u64 = health
        .latest
        .values()
        .filter(|r| r.record.get("metric") == Some("metricsd.rejects"))
        .filter_map(|r| r.record.get("value")?.parse::<u64>().ok())
        .sum();
    v.health_checked += 1;
    if rejects != h.garbage_records {
        v.mismatches.push(Mismatch::Health {
            series: series_id(
                HEALTH_SERVICE,
                MetricKind::Counter,
                "metricsd.rejects",
                &[("*", "*")],
            ),
            expected: format!(
                "{} (the hostile producer's garbage records)",
                h.garbage_records
            ),
            found: Some(format!("{rejects} summed over every reason")),
        });
    }
    Ok(())
}

/// Checks spans two ways. Counts: every span the producers ended was exported
/// (`metricsd.spans.exported` equals the spans ended, nothing rate limited), and every
/// exported span is either a span record in logd or counted past logd's span rate
/// (`metricsd.spans.not_logged`). Contents: every span record in logd is one the
/// producers ended (read from their span logs, `logs`: service and file), with exactly
/// its trace id, span id, parent, name, status, start, end and duration.
pub fn verify_spans(
    logd_socket: &Path,
    reports: &[(String, Report)],
    logs: &[(String, std::path::PathBuf)],
    sender_pid: Option<u32>,
    v: &mut Verification,
) -> Result<(), VerifyError> {
    let ended: u64 = reports
        .iter()
        .flat_map(|(_, r)| &r.series)
        .map(|s| match s.expect {
            Expect::SpanDuration { count } => count,
            _ => 0,
        })
        .sum();
    let mut client = Client::connect(logd_socket).map_err(VerifyError)?;
    let spans = client
        .query_all(&Query::new().scope(SCOPE_SPANS), MAX_RECORDS)
        .map_err(VerifyError)?;
    let spans: Vec<&StoredRecord> = spans
        .iter()
        .filter(|r| sender_pid.is_none_or(|pid| r.sender.pid == pid))
        .collect();
    v.records_read += spans.len() as u64;
    v.spans_in_logd = spans.len() as u64;
    v.error_spans_in_logd = spans
        .iter()
        .filter(|r| r.record.get("status") == Some("error"))
        .count() as u64;
    v.spans_ended = ended;
    let health = Exported::query(&mut client, HEALTH_SERVICE, sender_pid)?;
    let counter = |name: &str, labels: &[(&str, &str)]| {
        let id = series_id(HEALTH_SERVICE, MetricKind::Counter, name, labels);
        let n: u64 = health
            .field(&id, "value")
            .and_then(|f| f.parse().ok())
            .unwrap_or(0);
        (id, n)
    };
    let (exported_id, exported) = counter("metricsd.spans.exported", &[]);
    let (limited_id, limited) = counter("metricsd.spans.dropped", &[("reason", "rate_limited")]);
    let (not_logged_id, not_logged) = counter("metricsd.spans.not_logged", &[]);
    v.spans_exported = exported;
    v.spans_not_logged = not_logged;
    v.health_checked += 3;
    for (id, expected, found) in [
        (exported_id, format!("{ended} (every span ended)"), exported),
        (limited_id, "0".to_owned(), limited),
        (
            not_logged_id,
            format!(
                "{} (spans exported {exported} - span records in logd {})",
                exported.saturating_sub(v.spans_in_logd),
                v.spans_in_logd
            ),
            not_logged,
        ),
    ] {
        let want: u64 = expected
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX);
        if want != found {
            v.mismatches.push(Mismatch::Health {
                series: id,
                expected,
                found: Some(found.to_string()),
            });
        }
    }

    // Every span record in logd, matched against the producers' own span logs.
    let mut in_logd: HashMap<&str, &StoredRecord> = HashMap::with_capacity(spans.len());
    for r in &spans {
        if let Some(id) = r.record.get("span_id") {
            if in_logd.insert(id, r).is_some() {
                v.mismatches.push(Mismatch::Span {
                    span_id: id.to_owned(),
                    problem: "exported twice".into(),
                });
            }
        }
    }
    for (service, path) in logs {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                v.mismatches.push(Mismatch::Span {
                    span_id: "*".into(),
                    problem: format!("{service}'s span log {} is unreadable: {e}", path.display()),
                });
                continue;
            }
        };
        for chunk in bytes.chunks_exact(SPAN_ENTRY_BYTES) {
            let mut b = [0u8; SPAN_ENTRY_BYTES];
            b.copy_from_slice(chunk);
            let e = SpanEntry::from_bytes(&b);
            let id = format!("{:016x}", e.span_id);
            let Some(rec) = in_logd.remove(id.as_str()) else {
                continue;
            };
            v.spans_verified += 1;
            let parent = format!("{:016x}", e.parent_id);
            let want: [(&str, Option<String>); 8] = [
                ("producer_service", Some(service.clone())),
                (
                    "span",
                    SpanEntry::NAMES
                        .get(usize::from(e.name))
                        .map(|n| (*n).to_owned()),
                ),
                ("trace_id", Some(format!("{:032x}", e.trace_id))),
                ("parent_id", (e.parent_id != 0).then_some(parent)),
                (
                    "status",
                    Some(if e.status == 2 { "error" } else { "ok" }.to_owned()),
                ),
                ("start_ns", Some(e.start_ns.to_string())),
                ("end_ns", Some(e.end_ns.to_string())),
                (
                    "duration_ns",
                    Some(e.end_ns.saturating_sub(e.start_ns).to_string()),
                ),
            ];
            for (field, expected) in want {
                let found = rec.record.get(field).map(str::to_owned);
                if found != expected {
                    v.mismatches.push(Mismatch::Span {
                        span_id: id.clone(),
                        problem: format!(
                            "{field} is {} in logd, the producer recorded {}",
                            found.as_deref().unwrap_or("absent"),
                            expected.as_deref().unwrap_or("none")
                        ),
                    });
                }
            }
        }
    }
    for id in in_logd.keys() {
        v.mismatches.push(Mismatch::Span {
            span_id: (*id).to_owned(),
            problem: "in logd, but no producer ended such a span".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use logd::{Level, Record};

    use super::*;
    use crate::demo::report::SeriesReport;

    fn counter(service: &str, name: &str, labels: &[(&str, &str)], value: u64) -> Record {
        let mut r = Record::new(Level::Info, SCOPE_METRICS, name)
            .field(
                "series",
                series_id(service, MetricKind::Counter, name, labels),
            )
            .field("producer_service", service)
            .field("kind", "counter")
            .field("value", value.to_string());
        for (k, v) in labels {
            r = r.field(format!("label.{k}"), *v);
        }
        r
    }

    /// `(name, labels, total)` of a counter a test producer reports.
    type Recorded<'a> = (&'a str, &'a [(&'a str, &'a str)], u64);

    fn report(check: Check, series: &[Recorded<'_>]) -> Report {
        let series = series
            .iter()
            .map(|(name, labels, total)| SeriesReport {
                name: (*name).into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
                expect: Expect::Counter { total: *total },
            })
            .collect();
        Report {
            rings_claimed: 1,
            ..Report::new("web", check, 0, series)
        }
    }

    #[test]
    fn the_check_reads_the_last_record_and_finds_every_kind_of_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = logd::Server::bind(logd::Config {
            socket: dir.path().join("logd.sock"),
            ..logd::Config::default()
        })
        .and_then(logd::Server::spawn)
        .expect("logd");
        let mut c = Client::connect(server.path()).expect("connect");
        let a: &[(&str, &str)] = &[("route", "/a")];
        let b: &[(&str, &str)] = &[("route", "/b")];
        let over: &[(&str, &str)] = &[OVERFLOW_LABEL];
        c.append(&[
            counter("web", "req", a, 3),
            counter("web", "req", a, 7), // the last record is the total
            counter("web", "req", b, 2),
            counter("web", "extra", &[], 1),
            counter("flood", "calls", &[("user", "1")], 4),
            counter("flood", "calls", over, 11),
        ])
        .expect("append");

        let exact = |series: &[Recorded<'_>]| {
            verify(
                server.path(),
                &[("web".into(), report(Check::Exact, series))],
                None,
            )
            .expect("query")
        };
        let v = exact(&[("req", a, 7), ("req", b, 2), ("extra", &[], 1)]);
        assert!(v.ok(), "{:?}", v.mismatches);
        assert_eq!(v.series_checked, 3);

        let v = exact(&[("req", a, 8), ("req", b, 2), ("extra", &[], 1)]);
        assert!(matches!(
            &v.mismatches[..],
            [Mismatch::Value { field: "value", .. }]
        ));
        let v = exact(&[("req", a, 7), ("req", b, 2)]);
        assert!(matches!(&v.mismatches[..], [Mismatch::Unexpected { .. }]));
        let v = exact(&[
            ("req", a, 7),
            ("req", b, 2),
            ("extra", &[], 1),
            ("gone", &[], 1),
        ]);
        assert!(matches!(&v.mismatches[..], [Mismatch::Missing { .. }]));

        let flood = |rest: u64| {
            let two: &[(&str, &str)] = &[("user", "2")];
            let three: &[(&str, &str)] = &[("user", "3")];
            let one: &[(&str, &str)] = &[("user", "1")];
            let mut v = verify(
                server.path(),
                &[(
                    "flood".into(),
                    report(
                        Check::Overflow,
                        &[("calls", one, 4), ("calls", two, 5), ("calls", three, rest)],
                    ),
                )],
                None,
            )
            .expect("query");
            verify_caps(&mut v, 1);
            v
        };
        let v = flood(6);
        assert!(v.ok(), "{:?}", v.mismatches);
        assert_eq!(v.overflow[0].overflowed, 2);
        assert_eq!(v.overflow[0].overflow_total, 11);
        let v = flood(7);
        assert!(
            matches!(&v.mismatches[..], [Mismatch::Value { series, .. }] if series.contains("overflow")),
            "{:?}",
            v.mismatches
        );
        server.shutdown().expect("logd stops");
    }
}
