//! `SELFTEST: metrics counters`, `metrics gauges`, `metrics histograms`: values recorded
//! through nexus-metrics handles, and each exported series read back from logd and
//! compared field by field with what was recorded.

use anyhow::{Context, Result};
use logd::StoredRecord;
use metricsd::MetricKind;
use nexus_metrics::{Counter, Gauge, Histogram};

use super::Ctx;
use super::evidence::{WAIT, field, wait_for};
use super::expect;

/// What one series must look like in its latest export.
struct Want {
    id: String,
    kind: MetricKind,
    name: &'static str,
    /// Labels as exported (after metricsd's redaction and renaming).
    labels: Vec<(String, String)>,
    /// Exact fields of the latest record.
    fields: Vec<(&'static str, String)>,
    /// For counters: the cumulative total, which the window deltas must add up to.
    counter_total: Option<u128>,
}

impl Want {
    fn new(ctx: &Ctx, kind: MetricKind, name: &'static str, labels: &[(&str, &str)]) -> Self {
        Self {
            id: metricsd::series_id(&ctx.service, kind, name, labels),
            kind,
            name,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            fields: Vec::new(),
            counter_total: None,
        }
    }

    fn field(mut self, key: &'static str, value: impl ToString) -> Self {
        self.fields.push((key, value.to_string()));
        self
    }

    fn counter(self, total: u128) -> Self {
        let mut w = self.field("value", total);
        w.counter_total = Some(total);
        w
    }

    /// What differs between the exported records and this.
    fn diff(&self, service: &str, records: &[StoredRecord]) -> Result<Option<String>> {
        let Some(last) = records.last() else {
            return Ok(Some(format!("{}: no record in logd", self.id)));
        };
        let mut diffs = Vec::new();
        let mut expected: Vec<(String, String)> = vec![
            ("producer_service".into(), service.into()),
            ("metric".into(), self.name.into()),
            ("kind".into(), self.kind.as_str().into()),
        ];
        expected.extend(
            self.labels
                .iter()
                .map(|(k, v)| (format!("label.{k}"), v.clone())),
        );
        expected.extend(
            self.fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone())),
        );
        for (key, want) in &expected {
            let got = last.record.get(key);
            if got != Some(want.as_str()) {
                diffs.push(format!("{key} = {got:?}, expected {want:?}"));
            }
        }
        let labels = last
            .record
            .fields
            .iter()
            .filter(|(k, _)| k.starts_with("label."))
            .count();
        if labels != self.labels.len() {
            diffs.push(format!(
                "{labels} label fields, expected {}",
                self.labels.len()
            ));
        }
        if let Some(total) = self.counter_total {
            let mut deltas = 0u128;
            let mut previous_end = 0u128;
            for r in records {
                deltas += field(r, "delta")?.parse::<u128>().context("delta")?;
                let start: u128 = field(r, "window_start_ns")?.parse().context("window")?;
                let end: u128 = field(r, "window_end_ns")?.parse().context("window")?;
                if start >= end || start < previous_end {
                    diffs.push(format!(
                        "record #{} window {start}..{end} after a window ending at {previous_end}",
                        r.id
                    ));
                }
                previous_end = end;
            }
            if deltas != total {
                diffs.push(format!(
                    "window deltas over {} records add up to {deltas}, expected {total}",
                    records.len()
                ));
            }
        }
        Ok((!diffs.is_empty()).then(|| format!("{}: {}", self.id, diffs.join(", "))))
    }
}

/// Waits until every series matches.
fn verify(ctx: &mut Ctx, wants: &[Want]) -> Result<()> {
    let service = ctx.service.clone();
    wait_for(WAIT, || {
        let mut diffs = Vec::new();
        for w in wants {
            let records = ctx.logd.series_records(&w.id)?;
            if let Some(d) = w.diff(&service, &records)? {
                diffs.push(d);
            }
        }
        Ok(if diffs.is_empty() {
            Ok(())
        } else {
            Err(diffs.join("; "))
        })
    })
}

pub(crate) fn counters(ctx: &mut Ctx) -> Result<String> {
    let mut wants = Vec::new();

    let labels_a = [("route", "/a"), ("status", "200")];
    let a = Counter::new("selftest.requests", &labels_a);
    let mut total_a = 0u128;
    for k in 1..=100u64 {
        a.increment(k);
        total_a += u128::from(k);
    }
    wants
        .push(Want::new(ctx, MetricKind::Counter, "selftest.requests", &labels_a).counter(total_a));

    // The same metric, labels given in another order.
    let b = Counter::new("selftest.requests", &[("status", "500"), ("route", "/b")]);
    let mut total_b = 0u128;
    for _ in 0..7 {
        b.increment(3);
        total_b += 3;
    }
    wants.push(
        Want::new(
            ctx,
            MetricKind::Counter,
            "selftest.requests",
            &[("route", "/b"), ("status", "500")],
        )
        .counter(total_b),
    );

    // Past u64: metricsd sums into u128.
    let big = Counter::new("selftest.big", &[]);
    let mut total_big = 0u128;
    for delta in [u64::MAX / 2, u64::MAX / 2, 2] {
        big.increment(delta);
        total_big += u128::from(delta);
    }
    wants.push(Want::new(ctx, MetricKind::Counter, "selftest.big", &[]).counter(total_big));

    // A label claiming an identity is renamed, a sensitive one redacted (metricsd's
    // documented policy), so the exported series is not the one recorded.
    let odd = Counter::new(
        "selftest.labels",
        &[("service", "spoofed"), ("auth_token", "hunter2")],
    );
    odd.increment(1);
    wants.push(
        Want::new(
            ctx,
            MetricKind::Counter,
            "selftest.labels",
            &[
                ("auth_token", "[redacted]"),
                ("exported_service", "spoofed"),
            ],
        )
        .counter(1),
    );

    verify(ctx, &wants)?;
    // Nothing exported anywhere carries the secret.
    let service = ctx.service.clone();
    for r in ctx.logd.metric_records(&service, "selftest.labels")? {
        if r.record.fields.iter().any(|(_, v)| v.contains("hunter2")) {
            anyhow::bail!(
                "record #{} exports the redacted value: {:?}",
                r.id,
                r.record
            );
        }
    }
    Ok(format!(
        "{} series exact: requests /a {total_a}, /b {total_b}, big {total_big} (past u64), \
         identity label renamed, secret redacted; window deltas add up",
        wants.len()
    ))
}

/// A gauge's name, labels and the values set, in order.
type GaugeCase = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [i64],
);

pub(crate) fn gauges(ctx: &mut Ctx) -> Result<String> {
    let mut wants = Vec::new();
    let sets: [GaugeCase; 4] = [
        ("selftest.queue_depth", &[], &[5, -3, 42]),
        ("selftest.extreme", &[("end", "min")], &[0, i64::MIN]),
        ("selftest.extreme", &[("end", "max")], &[0, i64::MAX]),
        ("selftest.reset", &[], &[7, 0]),
    ];
    let mut summary = Vec::new();
    for (name, labels, values) in sets {
        let g = Gauge::new(name, labels);
        for &v in values {
            g.set(v);
        }
        let last = values.last().copied().unwrap_or_default();
        wants.push(Want::new(ctx, MetricKind::Gauge, name, labels).field("value", last));
        summary.push(format!("{name}{labels:?} = {last}"));
    }
    verify(ctx, &wants)?;
    Ok(format!(
        "{} series exact (last value set): {}",
        wants.len(),
        summary.join(", ")
    ))
}

pub(crate) fn histograms(ctx: &mut Ctx) -> Result<String> {
    let mut wants = Vec::new();
    let mut summary = Vec::new();

    // A configured layout: values on and around every bound.
    let name = "selftest.latency_ns";
    let bounds = ctx
        .metricsd_config
        .histograms
        .get(name)
        .cloned()
        .with_context(|| format!("metricsd's config has no layout for {name}"))?;
    let values = expect::boundary_values(&bounds);
    // The exponential default: powers of two, their neighbours, the extremes. 1 to
    // u64::MAX spans 64 powers of two: the histogram settles at scale 1 (128 buckets;
    // scale 2 would need 256 of at most 160).
    let exp_name = "selftest.sizes";
    let mut exp_values = vec![0, 1, 2, 3, 4, 5, 7, 8, 9, u64::MAX];
    exp_values.extend([32, 63].iter().flat_map(|&k| {
        let p = 1u64 << k;
        [p - 1, p, p + 1]
    }));

    {
        let h = Histogram::new(exp_name, &[("case", "boundaries")]);
        for &v in &exp_values {
            h.record(v);
        }
        let (zeros, offset, counts) = expect::scale1_buckets(&exp_values);
        wants.push(
            Want::new(
                ctx,
                MetricKind::Histogram,
                exp_name,
                &[("case", "boundaries")],
            )
            .field("count", exp_values.len())
            .field("sum", expect::sum(&exp_values))
            .field("scale", 1)
            .field("zero_count", zeros)
            .field("positive_offset", offset)
            .field("positive_buckets", expect::csv(&counts)),
        );
        summary.push(format!(
            "{exp_name}: {} values in {} exponential buckets at scale 1",
            exp_values.len(),
            counts.len()
        ));
    }
    {
        let h = Histogram::new(name, &[("case", "boundaries")]);
        for &v in &values {
            h.record(v);
        }
        let counts = expect::bucket_counts(&bounds, &values);
        wants.push(
            Want::new(ctx, MetricKind::Histogram, name, &[("case", "boundaries")])
                .field("count", values.len())
                .field("sum", expect::sum(&values))
                .field("bounds", expect::bounds_text(&bounds))
                .field("buckets", expect::csv(&counts)),
        );
        summary.push(format!(
            "{name}: {} values in {} buckets",
            values.len(),
            counts.len()
        ));
    }
    verify(ctx, &wants)?;
    Ok(format!(
        "bucket placement exact, count and sum exact: {}",
        summary.join("; ")
    ))
}
