//! `SELFTEST: prometheus scrape`: a counter, a gauge and an exponential histogram
//! recorded through nexus-metrics, then metricsd's `GET /metrics` scraped over loopback
//! (`[prometheus] listen` of the guest config) in Prometheus protobuf until the scrape
//! holds exactly what was recorded: the counter total, the gauge's last value, the
//! histogram's count, sum, zero count, schema, every native bucket and every classic
//! bucket. Expected buckets are computed here, independently of metricsd's mapping
//! (`expect::scale1_index`, exact integers; classic bounds compared value by value).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use metricsd::prometheus::{Format, decode, proto};
use nexus_metrics::{Counter, Gauge, Histogram};

use super::Ctx;
use super::evidence::{WAIT, wait_for};
use super::expect;

/// Values from 1 to 2^40 (plus 0): 40 powers of two, so the histogram settles at scale 1
/// (scale 2 would need 161 buckets).
fn values() -> Vec<u64> {
    let mut v = vec![0, 1, 2, 3, 4, 5, 1023, 1024, 1025];
    v.extend((20..=40).map(|k| 1u64 << k));
    v
}

fn find<'a>(
    families: &'a [proto::MetricFamily],
    name: &str,
    service: &str,
) -> Option<&'a proto::Metric> {
    families
        .iter()
        .find(|f| f.name == name)?
        .metric
        .iter()
        .find(|m| {
            m.label
                .iter()
                .any(|l| l.name == "service" && l.value == service)
        })
}

/// What differs between one scrape and what was recorded.
fn diff(families: &[proto::MetricFamily], service: &str, total: u64, last: i64) -> Vec<String> {
    let mut diffs = Vec::new();
    let counter = find(families, "selftest_scrape_requests_total", service)
        .and_then(|m| m.counter.as_ref())
        .map(|c| c.value);
    if counter != Some(total as f64) {
        diffs.push(format!("counter {counter:?}, recorded {total}"));
    }
    let gauge = find(families, "selftest_scrape_depth", service)
        .and_then(|m| m.gauge.as_ref())
        .map(|g| g.value);
    if gauge != Some(last as f64) {
        diffs.push(format!("gauge {gauge:?}, recorded {last}"));
    }
    let values = values();
    let Some(h) =
        find(families, "selftest_scrape_sizes", service).and_then(|m| m.histogram.as_ref())
    else {
        diffs.push("no histogram selftest_scrape_sizes".to_owned());
        return diffs;
    };
    let sum: u64 = values.iter().sum();
    if (h.sample_count, h.sample_sum) != (values.len() as u64, sum as f64) {
        diffs.push(format!(
            "histogram count {} sum {}, recorded {} values summing to {sum}",
            h.sample_count,
            h.sample_sum,
            values.len()
        ));
    }
    // Native: schema 1, Prometheus bucket i = (2^((i-1)/2), 2^(i/2)], i.e. our scale-1
    // index plus one.
    let (zeros, _, _) = expect::scale1_buckets(&values);
    let mut want: BTreeMap<i32, u64> = BTreeMap::new();
    for &v in values.iter().filter(|&&v| v > 0) {
        *want.entry(expect::scale1_index(v) + 1).or_insert(0) += 1;
    }
    let mut got: BTreeMap<i32, u64> = BTreeMap::new();
    let (mut index, mut count, mut deltas) = (0i32, 0i64, h.positive_delta.iter());
    for (n, span) in h.positive_span.iter().enumerate() {
        index = if n == 0 {
            span.offset
        } else {
            index + span.offset
        };
        for _ in 0..span.length {
            count += deltas.next().copied().unwrap_or(0);
            if count != 0 {
                got.insert(index, count as u64);
            }
            index += 1;
        }
    }
    if h.schema != 1 || h.zero_count != zeros || got != want {
        diffs.push(format!(
            "native schema {} zero {} buckets {got:?}; recorded schema 1 zero {zeros} buckets {want:?}",
            h.schema, h.zero_count
        ));
    }
    // Classic: every bucket counts the values <= its bound.
    for b in &h.bucket {
        let want = values
            .iter()
            .filter(|&&v| (v as f64) <= b.upper_bound)
            .count() as u64;
        if b.cumulative_count != want {
            diffs.push(format!(
                "classic le {}: {}, recorded {want} values <= it",
                b.upper_bound, b.cumulative_count
            ));
        }
    }
    if h.bucket.len() < 40 {
        diffs.push(format!("only {} classic buckets", h.bucket.len()));
    }
    diffs
}

pub(crate) fn run(ctx: &mut Ctx) -> Result<String> {
    let listen = ctx
        .metricsd_config
        .prometheus
        .listen
        .clone()
        .context("metricsd's config has no [prometheus] listen")?;
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("prometheus.listen {listen:?}"))?;
    let total = 1234u64;
    let requests = Counter::new("selftest.scrape.requests", &[("route", "/p")]);
    for _ in 0..total - 34 {
        requests.increment(1);
    }
    requests.increment(34);
    let depth = Gauge::new("selftest.scrape.depth", &[]);
    depth.set(-7);
    depth.set(42);
    let sizes = Histogram::new("selftest.scrape.sizes", &[]);
    for v in values() {
        sizes.record(v);
    }
    let service = ctx.service.clone();
    let mut scrapes = 0u32;
    let bytes = wait_for(WAIT, || {
        scrapes += 1;
        let got = metricsd::scrape::get(
            addr,
            "/metrics",
            Some(Format::Protobuf.content_type()),
            Duration::from_secs(5),
            64 << 20,
        );
        let (code, _, body) = match got {
            Ok(r) => r,
            Err(e) => return Ok(Err(format!("GET http://{addr}/metrics: {e}"))),
        };
        if code != 200 {
            return Ok(Err(format!("GET http://{addr}/metrics answered {code}")));
        }
        let families = decode(&body).context("decoding the protobuf scrape")?;
        let diffs = diff(&families, &service, total, 42);
        Ok(if diffs.is_empty() {
            Ok(body.len())
        } else {
            Err(diffs.join("; "))
        })
    })?;
    Ok(format!(
        "scraped http://{addr}/metrics ({bytes} bytes, scrape {scrapes}): counter {total}, gauge 42, histogram of {} values: count, sum, schema 1, every native and classic bucket exact",
        values().len()
    ))
}
