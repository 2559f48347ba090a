//! `SELFTEST: no ipc per sample`, in two parts.
//!
//! 1. Two threads record 100,000 samples (counter increments and histogram
//!    observations) through their own rings. Each thread's first record claims its
//!    ring: one grant message. metricsd's health series must show exactly that many
//!    control messages and rings granted over the step (and messages equal to grants
//!    plus refusals over its life), while every sample arrives exactly.
//! 2. The system-call proof, the same as the host test `tests/sealed.rs`:
//!    `guest-sealed` ([`crate::sealed`]) records [`SEALED_SAMPLES`] counter increments,
//!    gauge sets, histogram observations and spans under seccomp filters that kill it
//!    on any system call but `exit`/`exit_group`. Its totals must arrive in logd
//!    exactly, metricsd must count one control message for it, and it must exit with
//!    status 0 (not killed by `SIGSYS`) when told to.

use std::collections::BTreeMap;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use metricsd::MetricKind;
use nexus_metrics::{Counter, Histogram};

use super::Ctx;
use super::evidence::{WAIT, field, field_i128, wait_for};
use crate::sealed::{self, Expected, Sealed};

/// Recording threads.
const THREADS: u64 = 2;
/// Counter increments per thread.
const INCREMENTS: u64 = 40_000;
/// Histogram observations per thread.
const OBSERVATIONS: u64 = 10_000;

/// Iterations of the sealed producer in the guest: a million of each kind (six million
/// records), as in the host test. The kernel argument `SEALED_SAMPLES=<n>`
/// (`--kernel-arg`, which the init passes on in the environment) sets another count.
/// At this count one of four boots on a host loaded by other builds made no visible
/// progress in this step, cause not found (`README.md`, "Times"); this is the constant to
/// lower if the step stalls.
pub const SEALED_SAMPLES: u64 = 1_000_000;
/// How long the sealed producer's totals may take to arrive; with the step's other
/// waits this stays inside the ladder's 240 s for the step, so a failure is reported
/// by the step itself.
const SEALED_WAIT: Duration = Duration::from_secs(150);

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
    let sealed = sealed(ctx)?;
    Ok(format!(
        "{samples} samples from {THREADS} threads exact; control messages +{} = rings granted \
         +{} = rings claimed {rings}; records drained +{}; {sealed}",
        after.messages - before.messages,
        after.granted - before.granted,
        after.drained - before.drained
    ))
}

/// Part 2: the sealed producer.
fn sealed(ctx: &mut Ctx) -> Result<String> {
    let before = grants(ctx)?;
    let exe = std::env::current_exe()?.with_file_name("guest-sealed");
    let samples = match std::env::var("SEALED_SAMPLES") {
        Ok(text) => text
            .parse()
            .with_context(|| format!("SEALED_SAMPLES={text:?}: expected a number of iterations"))?,
        Err(_) => SEALED_SAMPLES,
    };
    let mut child = Sealed::spawn(&exe, &ctx.metricsd_socket, samples, false, WAIT)?;
    // metricsd's default policy names it after its executable.
    let service = "guest-sealed";
    let want = Expected::of(samples);
    let series = |kind, name| metricsd::series_id::<&str, &str>(service, kind, name, &[]);
    let wants = [
        (
            series(MetricKind::Counter, sealed::COUNTER),
            vec![("value", want.counter.to_string())],
        ),
        (
            series(MetricKind::Gauge, sealed::GAUGE),
            vec![("value", want.gauge.to_string())],
        ),
        (
            series(MetricKind::Histogram, sealed::HISTOGRAM),
            vec![
                ("count", want.histogram_count.to_string()),
                ("sum", want.histogram_sum.to_string()),
            ],
        ),
        (
            series(MetricKind::SpanDuration, sealed::SPAN),
            vec![("count", want.spans.to_string())],
        ),
    ];
    let arrived = wait_for(SEALED_WAIT, || {
        child.check_alive()?;
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
        if (now.messages - before.messages, now.granted - before.granted) != (1, 1) {
            diffs.push(format!(
                "metricsd saw {} control messages and granted {} rings for one ring",
                now.messages - before.messages,
                now.granted - before.granted
            ));
        }
        Ok(if diffs.is_empty() {
            Ok(now)
        } else {
            Err(diffs.join("; "))
        })
    });
    let after =
        arrived.with_context(|| format!("sealed producer's stderr: {:?}", child.stderr()))?;
    let started = child
        .started
        .trim_start_matches(sealed::STARTED)
        .trim()
        .to_owned();
    let stderr = child.stderr();
    let status = child.finish(WAIT)?;
    ensure!(
        status.success(),
        "the sealed producer must exit normally after its totals arrived: {}; stderr: {stderr}",
        sealed::describe(status),
    );
    Ok(format!(
        "sealed ({started}): {samples} samples of each kind with every system call \
         forbidden exact, control messages +{}, {}",
        after.messages - before.messages,
        sealed::describe(status)
    ))
}
