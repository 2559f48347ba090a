//! The demo's second check: one scrape of metricsd's `GET /metrics` (Prometheus
//! protobuf, the format a Prometheus with native histograms asks for), compared with
//! what the producers report they recorded, exactly.
//!
//! For [`Check::Exact`] services every reported series must be in the scrape under its
//! Prometheus name with `service="<service>"`: counter value, gauge value, histogram
//! count, sum, every classic bucket and every native bucket (the producer's own
//! exponential histogram of the same values, at the same schema), span duration count;
//! and the service must have no other series. For [`Check::Overflow`] services each
//! label set's own series equals its total and the `otel_metric_overflow="true"` series
//! equals the sum of the rest. Decoding uses the message types `prometheus-client`
//! generates from Prometheus' own `metrics.proto`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model as pb;
use prost::Message;

use super::report::{Check, Expect, Report};
use super::verify::{Mismatch, Verification};
use crate::aggregate::MetricKind;
use crate::histogram::Histogram;
use crate::prometheus::{Format, family_name, label_key};

/// Most bytes the demo reads from its scrape.
const MAX_SCRAPE: usize = 256 << 20;

/// What the scrape showed.
#[derive(Clone, Debug, Default)]
pub struct ScrapeCheck {
    /// The endpoint scraped.
    pub addr: Option<SocketAddr>,
    /// Bytes received.
    pub bytes: usize,
    /// Metric families in it.
    pub families: usize,
    /// Series in it.
    pub series: usize,
    /// Series compared with the producers' reports.
    pub compared: u64,
}

type Key = (String, Vec<(String, String)>);

fn key(family: &str, service: &str, labels: &[(String, String)]) -> Key {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (label_key(k).into_owned(), v.clone()))
        .collect();
    l.push(("service".to_owned(), service.to_owned()));
    l.sort();
    (family.to_owned(), l)
}

fn scraped_key(family: &str, m: &pb::Metric) -> Key {
    let mut l: Vec<(String, String)> = m
        .label
        .iter()
        .map(|p| (p.name.clone(), p.value.clone()))
        .collect();
    l.sort();
    (family.to_owned(), l)
}

/// The protobuf family name of metric `name` of `kind` (counters carry `_total`).
fn pb_family(name: &str, kind: MetricKind) -> String {
    let f = family_name(name, kind);
    if kind == MetricKind::Counter {
        format!("{f}_total")
    } else {
        f
    }
}

fn mismatch(
    out: &mut Verification,
    series: String,
    field: &'static str,
    expected: String,
    found: Option<String>,
) {
    out.mismatches.push(Mismatch::Scrape {
        series,
        field,
        expected,
        found,
    });
}

/// Compares one scraped metric with what was recorded.
fn compare(id: &str, m: Option<&pb::Metric>, expect: &Expect, v: &mut Verification) {
    let Some(m) = m else {
        mismatch(v, id.to_owned(), "series", "present".into(), None);
        return;
    };
    let mut check = |field: &'static str, want: String, got: Option<String>| {
        if got.as_deref() != Some(want.as_str()) {
            mismatch(v, id.to_owned(), field, want, got);
        }
    };
    match expect {
        Expect::Counter { total } => check(
            "value",
            (*total as f64).to_string(),
            m.counter.as_ref().map(|c| c.value.to_string()),
        ),
        Expect::Gauge { last } => check(
            "value",
            (*last as f64).to_string(),
            m.gauge.as_ref().map(|g| g.value.to_string()),
        ),
        Expect::SpanDuration { count } => check(
            "count",
            count.to_string(),
            m.histogram.as_ref().map(|h| h.sample_count.to_string()),
        ),
        Expect::Histogram {
            count,
            sum,
            buckets,
        } => {
            let h = m.histogram.as_ref();
            check(
                "count",
                count.to_string(),
                h.map(|h| h.sample_count.to_string()),
            );
            check(
                "sum",
                (*sum as f64).to_string(),
                h.map(|h| h.sample_sum.to_string()),
            );
            let classic: Vec<String> = Histogram::Exponential((**buckets).clone())
                .classic()
                .iter()
                .filter(|b| b.le.is_finite())
                .map(|b| format!("{}:{}", b.le, b.cumulative))
                .collect();
            let got: Option<Vec<String>> = h.map(|h| {
                h.bucket
                    .iter()
                    .filter(|b| b.upper_bound.is_finite())
                    .map(|b| format!("{}:{}", b.upper_bound, b.cumulative_count))
                    .collect()
            });
            check(
                "classic buckets",
                classic.join(" "),
                got.map(|g| g.join(" ")),
            );
            let n = buckets.native();
            let native = format!(
                "schema {} zero {} spans {:?} deltas {:?}",
                n.schema, n.zero_count, n.positive.spans, n.positive.deltas
            );
            let got = h.map(|h| {
                let spans: Vec<(i32, u32)> = h
                    .positive_span
                    .iter()
                    .map(|s| (s.offset, s.length))
                    .collect();
                format!(
                    "schema {} zero {} spans {:?} deltas {:?}",
                    h.schema, h.zero_count, spans, h.positive_delta
                )
            });
            check("native buckets", native, got);
        }
    }
}

/// Scrapes `addr` once and compares it with `reports` (service, report), adding any
/// difference to `v`. An error is a failed scrape (no answer, not 200, undecodable).
pub fn verify_scrape(
    addr: SocketAddr,
    reports: &[(String, Report)],
    v: &mut Verification,
) -> Result<ScrapeCheck, String> {
    let accept = Format::Protobuf.content_type();
    let (code, content_type, body) = crate::scrape::get(
        addr,
        "/metrics",
        Some(accept),
        Duration::from_secs(30),
        MAX_SCRAPE,
    )
    .map_err(|e| format!("GET http://{addr}/metrics: {e}"))?;
    if code != 200 || !content_type.starts_with("application/vnd.google.protobuf") {
        return Err(format!(
            "GET http://{addr}/metrics answered {code} ({content_type})"
        ));
    }
    let mut check = ScrapeCheck {
        addr: Some(addr),
        bytes: body.len(),
        ..ScrapeCheck::default()
    };
    let mut scraped: HashMap<Key, pb::Metric> = HashMap::new();
    let mut buf = body.as_slice();
    while !buf.is_empty() {
        let f = pb::MetricFamily::decode_length_delimited(&mut buf)
            .map_err(|e| format!("the scrape is not delimited MetricFamily messages: {e}"))?;
        check.families += 1;
        for m in f.metric {
            check.series += 1;
            scraped.insert(scraped_key(&f.name, &m), m);
        }
    }
    let service_of = |k: &Key| {
        k.1.iter()
            .find(|(n, _)| n == "service")
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    for (service, report) in reports {
        if report.hostile.is_some() {
            continue;
        }
        match report.check {
            Check::Exact => {
                let mut seen = 0;
                for s in &report.series {
                    let family = pb_family(&s.name, s.expect.kind());
                    let k = key(&family, service, &s.labels);
                    let id = format!("scrape {family}{:?}", k.1);
                    compare(&id, scraped.get(&k), &s.expect, v);
                    check.compared += 1;
                    seen += 1;
                }
                let have = scraped.keys().filter(|k| service_of(k) == *service).count();
                if have != seen {
                    mismatch(
                        v,
                        format!("scrape service={service}"),
                        "series",
                        seen.to_string(),
                        Some(have.to_string()),
                    );
                }
            }
            Check::Overflow => {
                let mut rest: BTreeMap<String, u64> = BTreeMap::new();
                for s in &report.series {
                    let Expect::Counter { total } = s.expect else {
                        continue;
                    };
                    let family = pb_family(&s.name, MetricKind::Counter);
                    let k = key(&family, service, &s.labels);
                    match scraped.get(&k) {
                        Some(m) => {
                            let id = format!("scrape {family}{:?}", k.1);
                            compare(&id, Some(m), &s.expect, v);
                            check.compared += 1;
                        }
                        None => *rest.entry(family).or_insert(0) += total,
                    }
                }
                for (family, total) in rest {
                    let labels = [("otel.metric.overflow".to_owned(), "true".to_owned())];
                    let k = key(&family, service, &labels);
                    let id = format!("scrape {family}{:?}", k.1);
                    compare(&id, scraped.get(&k), &Expect::Counter { total }, v);
                    check.compared += 1;
                }
            }
        }
    }
    Ok(check)
}
