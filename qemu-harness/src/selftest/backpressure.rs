//! `SELFTEST: lossless counters under backpressure`: a child process (the selftest
//! re-executed with `backpressure-child`) asks for a 64-record ring and bursts far past
//! it with counter increments, then `flush_for`s what was held back. Its recorder's
//! statistics prove the ring was full (increments coalesced) and nothing was lost; the
//! total metricsd exports must equal the increments exactly.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use metricsd::MetricKind;
use nexus_metrics::{Counter, DropReason};

use super::evidence::{WAIT, field, wait_for};
use super::{Ctx, report_fields, report_value, run_child};

/// The child's argument.
pub const CHILD_ARG: &str = "backpressure-child";
/// The counter.
const METRIC: &str = "selftest.backpressure";
/// Records per ring the child asks for.
const RING: u32 = 64;
/// Increments in the burst.
const INCREMENTS: u64 = 200_000;
/// The report line's prefix.
const REPORT: &str = "backpressure:";

/// The child: install a small ring, burst, flush, report.
pub fn child(metricsd: &Path) -> Result<()> {
    nexus_metrics::install(
        nexus_metrics::Config::new()
            .socket(metricsd)
            .ring_capacity(RING),
    )
    .context("installing the recorder")?;
    let counter = Counter::new(METRIC, &[]);
    let mut total = 0u128;
    for i in 0..INCREMENTS {
        let n = 1 + i % 5;
        counter.increment(n);
        total += u128::from(n);
    }
    let flushed = nexus_metrics::flush_for(Duration::from_secs(30));
    let s = nexus_metrics::stats();
    println!(
        "{REPORT} ring={RING} increments={INCREMENTS} total={total} coalesced={} \
         flushed={} lost={} ring_full={} dropped={} rings={}",
        s.coalesced,
        u8::from(flushed),
        s.lost_increments,
        s.dropped(DropReason::RingFull),
        s.dropped_total(),
        s.rings_claimed
    );
    Ok(())
}

pub(crate) fn run(ctx: &mut Ctx) -> Result<String> {
    let exe = std::env::current_exe()?;
    let mut command = Command::new(&exe);
    command
        .arg(CHILD_ARG)
        .arg("--metricsd")
        .arg(&ctx.metricsd_socket);
    let out = run_child(command, Duration::from_secs(120)).context("the backpressure child")?;
    let report = report_fields(&out, REPORT)?;
    let total: u128 = report_value(&report, "total")?;
    let coalesced: u64 = report_value(&report, "coalesced")?;
    let flushed: u8 = report_value(&report, "flushed")?;
    let lost: u64 = report_value(&report, "lost")?;
    let dropped: u64 = report_value(&report, "dropped")?;
    ensure!(
        coalesced > 0,
        "no backpressure: none of {INCREMENTS} increments found the {RING}-record ring full"
    );
    ensure!(
        flushed == 1 && lost == 0 && dropped == 0,
        "the child lost increments: flushed {flushed}, lost {lost}, dropped {dropped}"
    );

    let id = metricsd::series_id::<&str, &str>(&ctx.service, MetricKind::Counter, METRIC, &[]);
    let want = total.to_string();
    wait_for(WAIT, || {
        let records = ctx.logd.series_records(&id)?;
        let Some(last) = records.last() else {
            return Ok(Err(format!("{id}: no record")));
        };
        let value = field(last, "value")?;
        if value != want {
            return Ok(Err(format!("{id} = {value}, expected {want}")));
        }
        let mut deltas = 0u128;
        for r in &records {
            deltas += field(r, "delta")?.parse::<u128>().context("delta")?;
        }
        Ok(if deltas == total {
            Ok(())
        } else {
            Err(format!(
                "{id}: window deltas add up to {deltas}, expected {total}"
            ))
        })
    })?;
    Ok(format!(
        "{INCREMENTS} increments (total {total}) into a {RING}-record ring: {coalesced} held \
         back and coalesced, 0 lost; exported total exact"
    ))
}
