//! `SELFTEST: metrics security rejects`: a hostile producer's ring quarantined (its
//! valid samples before the violation counted, nothing after), its invalid records
//! counted by reason, and a cardinality flood from a child process (the selftest
//! re-executed with `flood-child`) capped into the metric's overflow series with the
//! total exact. Once the flood's producer has exited, its series (the overflow series
//! too) expire after metricsd's short idle TTL in the guest, each exported one last time
//! with its exact final value, and the metric's cap is free again: a new label set gets
//! a series of its own. All read back from metricsd's series and health series in logd.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use metricsd::MetricKind;
use nexus_metrics::Counter;

use super::evidence::{WAIT, field, field_i128, wait_for};
use super::{Ctx, hostile, report_fields, report_value, run_child};

/// The flooded counter.
const FLOOD: &str = "selftest.flood";
/// The flood child's argument.
pub const FLOOD_ARG: &str = "flood-child";
/// The flood child's report line's prefix.
const FLOOD_REPORT: &str = "flood:";

/// The flood child: `n` label sets of [`FLOOD`], in order, label set `i` incremented by
/// `i + 1`, from one thread (so metricsd sees the registrations in this order); then
/// every increment written, and exit (its rings close, its series lose their last
/// binding).
pub fn flood_child(metricsd: &Path, n: usize) -> Result<()> {
    nexus_metrics::install(nexus_metrics::Config::new().socket(metricsd))
        .context("installing the recorder")?;
    for i in 0..n {
        Counter::new(FLOOD, &[("user", &flood_label(i))]).increment(i as u64 + 1);
    }
    let flushed = nexus_metrics::flush_for(Duration::from_secs(30));
    let s = nexus_metrics::stats();
    println!(
        "{FLOOD_REPORT} flushed={} dropped={} lost={}",
        u8::from(flushed),
        s.dropped_total(),
        s.lost_increments
    );
    Ok(())
}

fn flood_label(i: usize) -> String {
    format!("u{i:03}")
}
/// The overflow series' only label (OpenTelemetry's convention).
const OVERFLOW_LABEL: (&str, &str) = ("otel.metric.overflow", "true");

/// metricsd's health counters this step moves.
struct Health {
    rejects: BTreeMap<&'static str, i128>,
    rejects_total: i128,
    out_of_range: i128,
    quarantined: i128,
    overflow_registrations: i128,
    overflow_samples: i128,
    expired: i128,
}

impl Health {
    fn read(ctx: &mut Ctx) -> Result<Self> {
        let mut rejects = BTreeMap::new();
        for reason in hostile::REASONS {
            let n = ctx.logd.health_counter(
                "metricsd.rejects",
                &[("class", "invalid_args"), ("reason", reason)],
            )?;
            rejects.insert(reason, n);
        }
        // Every reason's series: the total must move by exactly what the hostile wrote.
        let mut last: BTreeMap<String, i128> = BTreeMap::new();
        for r in ctx.logd.metric_records("metricsd", "metricsd.rejects")? {
            last.insert(field(&r, "series")?.to_owned(), field_i128(&r, "value")?);
        }
        Ok(Self {
            rejects,
            rejects_total: last.values().sum(),
            out_of_range: ctx
                .logd
                .health_counter("metricsd.violations", &[("reason", "write_out_of_range")])?,
            quarantined: ctx.logd.health_counter("metricsd.rings.quarantined", &[])?,
            overflow_registrations: ctx
                .logd
                .health_counter("metricsd.overflow.registrations", &[])?,
            overflow_samples: ctx.logd.health_counter("metricsd.overflow.samples", &[])?,
            expired: ctx.logd.health_counter("metricsd.series.expired", &[])?,
        })
    }
}

pub(crate) fn run(ctx: &mut Ctx) -> Result<String> {
    let before = Health::read(ctx)?;

    // The hostile producer, a process and a service of its own.
    let exe = std::env::current_exe()?.with_file_name("guest-hostile");
    let hostile_service = super::exe_name(&exe)?;
    let mut command = Command::new(&exe);
    command.arg("--metricsd").arg(&ctx.metricsd_socket);
    let out = run_child(command, Duration::from_secs(60)).context("the hostile producer")?;
    let report = report_fields(&out, hostile::REPORT)?;
    let valid_total: u64 = report_value(&report, "valid_total")?;
    let mut garbage = BTreeMap::new();
    for reason in hostile::REASONS {
        garbage.insert(reason, report_value::<i128>(&report, reason)?);
    }
    let garbage_total: i128 = garbage.values().sum();
    let hostile_id = metricsd::series_id::<&str, &str>(
        &hostile_service,
        MetricKind::Counter,
        hostile::VALID_METRIC,
        &[],
    );

    // The flood: three times the per-metric series cap of one counter, one increment
    // of i + 1 per label value, from a child process of the same service.
    let cap = ctx.metricsd_config.series.max_per_metric as usize;
    let n = 3 * cap + 2;
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg(FLOOD_ARG)
        .arg("--metricsd")
        .arg(&ctx.metricsd_socket)
        .arg("--n")
        .arg(n.to_string());
    let out = run_child(command, Duration::from_secs(60)).context("the flood producer")?;
    let report = report_fields(&out, FLOOD_REPORT)?;
    for (key, want) in [("flushed", 1u64), ("dropped", 0), ("lost", 0)] {
        let got: u64 = report_value(&report, key)?;
        anyhow::ensure!(got == want, "flood producer: {key}={got}, expected {want}");
    }
    let mut own = BTreeMap::new();
    let mut overflow_total = 0u128;
    for i in 0..n {
        let user = flood_label(i);
        let delta = i as u64 + 1;
        // Registrations reach metricsd in the order the child made them: the first
        // `cap` label sets get series of their own, the rest the overflow series.
        let id = metricsd::series_id(&ctx.service, MetricKind::Counter, FLOOD, &[("user", &user)]);
        if i < cap {
            own.insert(id, u128::from(delta));
        } else {
            overflow_total += u128::from(delta);
        }
    }
    let overflow_id =
        metricsd::series_id(&ctx.service, MetricKind::Counter, FLOOD, &[OVERFLOW_LABEL]);
    let mut want = own.clone();
    want.insert(overflow_id.clone(), overflow_total);
    let overflowed = (n - cap) as i128;
    let service = ctx.service.clone();

    wait_for(WAIT, || {
        let mut diffs = Vec::new();
        let hostile = ctx.logd.series_last(&hostile_id)?;
        let got = hostile
            .map(|r| field(&r, "value").map(str::to_owned))
            .transpose()?;
        if got.as_deref() != Some(valid_total.to_string().as_str()) {
            diffs.push(format!(
                "{hostile_id} = {got:?}, expected {valid_total} (what it wrote before the violation)"
            ));
        }
        let now = Health::read(ctx)?;
        for (reason, n) in &garbage {
            let moved = now.rejects[reason] - before.rejects[reason];
            if moved != *n {
                diffs.push(format!(
                    "metricsd.rejects{{reason={reason}}} moved by {moved}, expected {n}"
                ));
            }
        }
        let moved = now.rejects_total - before.rejects_total;
        if moved != garbage_total {
            diffs.push(format!(
                "all rejects moved by {moved}, expected {garbage_total}"
            ));
        }
        for (what, moved, expected) in [
            (
                "metricsd.violations{reason=write_out_of_range}",
                now.out_of_range - before.out_of_range,
                1,
            ),
            (
                "metricsd.rings.quarantined",
                now.quarantined - before.quarantined,
                1,
            ),
            (
                "metricsd.overflow.registrations",
                now.overflow_registrations - before.overflow_registrations,
                overflowed,
            ),
            (
                "metricsd.overflow.samples",
                now.overflow_samples - before.overflow_samples,
                overflowed,
            ),
        ] {
            if moved != expected {
                diffs.push(format!("{what} moved by {moved}, expected {expected}"));
            }
        }
        // Exactly the expected series of the flooded metric exist, with exact totals.
        let mut got: BTreeMap<String, u128> = BTreeMap::new();
        for r in ctx.logd.metric_records(&service, FLOOD)? {
            let value = field(&r, "value")?
                .parse()
                .with_context(|| format!("record #{} value", r.id))?;
            got.insert(field(&r, "series")?.to_owned(), value);
        }
        if got != want {
            diffs.push(format!("{FLOOD} series: got {got:?}, expected {want:?}"));
        }
        Ok(if diffs.is_empty() {
            Ok(())
        } else {
            Err(diffs.join("; "))
        })
    })?;

    // The flood's producer has exited: each of its series (and the overflow series)
    // expires, exported one last time with its exact final value, marked expired.
    let expiring = want.len() as i128;
    wait_for(WAIT, || {
        let mut diffs = Vec::new();
        let mut finals: BTreeMap<String, u128> = BTreeMap::new();
        for r in ctx.logd.metric_records(&service, FLOOD)? {
            if r.record.get("expired") == Some("true") {
                let value = field(&r, "value")?
                    .parse()
                    .with_context(|| format!("record #{} value", r.id))?;
                finals.insert(field(&r, "series")?.to_owned(), value);
            }
        }
        if finals != want {
            diffs.push(format!(
                "expired {FLOOD} series: got {finals:?}, expected {want:?}"
            ));
        }
        let moved = Health::read(ctx)?.expired - before.expired;
        if moved < expiring {
            diffs.push(format!(
                "metricsd.series.expired moved by {moved}, expected at least {expiring}"
            ));
        }
        Ok(if diffs.is_empty() {
            Ok(())
        } else {
            Err(diffs.join("; "))
        })
    })?;
    // The cap is free again: a new label set gets a series of its own.
    let fresh = flood_label(n);
    Counter::new(FLOOD, &[("user", &fresh)]).increment(7);
    let fresh_id = metricsd::series_id(
        &ctx.service,
        MetricKind::Counter,
        FLOOD,
        &[("user", &fresh)],
    );
    wait_for(WAIT, || {
        let got = ctx
            .logd
            .series_last(&fresh_id)?
            .map(|r| field(&r, "value").map(str::to_owned))
            .transpose()?;
        Ok(if got.as_deref() == Some("7") {
            Ok(())
        } else {
            Err(format!(
                "{fresh_id} = {got:?}, expected 7 in a series of its own"
            ))
        })
    })?;
    Ok(format!(
        "hostile ring (service {hostile_service}) quarantined after {valid_total} valid, \
         {garbage_total} invalid records counted by reason; {n} label sets of {FLOOD} from \
         a child: {cap} series + overflow {overflow_total} (total exact); after it exited \
         all {expiring} expired with exact final values and the cap took a new series"
    ))
}
