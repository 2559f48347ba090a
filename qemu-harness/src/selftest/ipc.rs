//! `SELFTEST: no ipc per sample`: two threads record 100,000 samples (counter increments
//! and histogram observations) through their own rings. Each thread's first record
//! claims its ring: one grant message. metricsd's health series must show exactly that
//! many control messages and rings granted over the step (and messages equal to grants
//! plus refusals over its life), while every sample arrives exactly.

use std::collections::BTreeMap;
use std::thread;
use std::time::Duration;

use anyhow::{Result, ensure};
use metricsd::MetricKind;
use nexus_metrics::{Counter, Histogram};

use super::Ctx;
use super::evidence::{WAIT, field, field_i128, wait_for};

/// Recording threads.
const THREADS: u64 = 2;
/// Counter increments per thread.
const INCREMENTS: u64 = 40_000;
/// Histogram observations per thread.
const OBSERVATIONS: u64 = 10_000;

/// metricsd's grant counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Grants {
    messages: i128,
    granted: i128,
    refused: i128,
    drained: i128,
}

fn grants(ctx: &mut Ctx) -> Result<Grants> {
    let mut refused: BTreeMap<String, i128> = BTreeMap::new();
    for r in ctx
        .logd
        .metric_records("metricsd", "metricsd.grant.refused")?
    {
        refused.insert(field(&r, "series")?.to_owned(), field_i128(&r, "value")?);
    }
    Ok(Grants {
        messages: ctx.logd.health_counter("metricsd.grant.messages", &[])?,
        granted: ctx.logd.health_counter("metricsd.grant.granted", &[])?,
        refused: refused.values().sum(),
        drained: ctx.logd.health_counter("metricsd.records.drained", &[])?,
    })
}

pub(crate) fn run(ctx: &mut Ctx) -> Result<String> {
    let before = grants(ctx)?;
    let stats_before = nexus_metrics::stats();

    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                let label = t.to_string();
                let labels = [("thread", label.as_str())];
                let counter = Counter::new("selftest.ipc.samples", &labels);
                let histogram = Histogram::new("selftest.ipc.values", &labels);
                let mut sum = 0u128;
                for _ in 0..INCREMENTS {
                    counter.increment(1);
                }
                for i in 0..OBSERVATIONS {
                    histogram.record(i % 1000);
                    sum += u128::from(i % 1000);
                }
                let flushed = nexus_metrics::flush_for(Duration::from_secs(30));
                (flushed, sum)
            })
        })
        .collect();
    let mut sums = Vec::new();
    for w in workers {
        let (flushed, sum) = w
            .join()
            .map_err(|_| anyhow::anyhow!("a recording thread panicked"))?;
        ensure!(
            flushed,
            "a recording thread could not write its held-back increments"
        );
        sums.push(sum);
    }
    let samples = THREADS * (INCREMENTS + OBSERVATIONS);
    let stats = nexus_metrics::stats();
    let rings = stats.rings_claimed - stats_before.rings_claimed;
    let dropped = stats.dropped_total() - stats_before.dropped_total();
    ensure!(
        rings == THREADS && dropped == 0 && stats.claim_failures == stats_before.claim_failures,
        "the recorder claimed {rings} rings (expected {THREADS}), dropped {dropped} records, \
         {} claims failed",
        stats.claim_failures - stats_before.claim_failures
    );

    let service = ctx.service.clone();
    let mut wants = Vec::new();
    for (t, sum) in sums.iter().enumerate() {
        let label = t.to_string();
        let labels = [("thread", label.as_str())];
        wants.push((
            metricsd::series_id(
                &service,
                MetricKind::Counter,
                "selftest.ipc.samples",
                &labels,
            ),
            vec![("value", INCREMENTS.to_string())],
        ));
        wants.push((
            metricsd::series_id(
                &service,
                MetricKind::Histogram,
                "selftest.ipc.values",
                &labels,
            ),
            vec![
                ("count", OBSERVATIONS.to_string()),
                ("sum", sum.to_string()),
            ],
        ));
    }
    let rings_i = i128::from(rings);
    let after = wait_for(WAIT, || {
        let mut diffs = Vec::new();
        for (id, fields) in &wants {
            match ctx.logd.series_last(id)? {
                None => diffs.push(format!("{id}: no record")),
                Some(r) => {
                    for (key, want) in fields {
                        let got = r.record.get(key);
                        if got != Some(want.as_str()) {
                            diffs.push(format!("{id} {key} = {got:?}, expected {want:?}"));
                        }
                    }
                }
            }
        }
        let now = grants(ctx)?;
        let messages = now.messages - before.messages;
        let granted = now.granted - before.granted;
        if messages != rings_i || granted != rings_i {
            diffs.push(format!(
                "over the step metricsd saw {messages} control messages and granted {granted} \
                 rings; the recorder claimed {rings} rings"
            ));
        }
        if now.messages != now.granted + now.refused {
            diffs.push(format!(
                "over its life metricsd saw {} control messages for {} grants and {} refusals",
                now.messages, now.granted, now.refused
            ));
        }
        let drained = now.drained - before.drained;
        if drained < i128::from(samples) {
            diffs.push(format!(
                "metricsd drained {drained} records, fewer than {samples} samples"
            ));
        }
        Ok(if diffs.is_empty() {
            Ok(now)
        } else {
            Err(diffs.join("; "))
        })
    })?;
    Ok(format!(
        "{samples} samples from {THREADS} threads exact; control messages +{} = rings granted \
         +{} = rings claimed {rings}; records drained +{}",
        after.messages - before.messages,
        after.granted - before.granted,
        after.drained - before.drained
    ))
}
