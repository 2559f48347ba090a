//! The hostile producer (`guest-hostile`): it claims a ring from metricsd like any
//! producer (nexus-metrics' [`SocketSource`]), then writes to it as it pleases, in safe
//! code: a valid registration and counter samples, invalid records of four kinds, and
//! finally a bogus write position, which metricsd must answer by quarantining the ring.
//! It prints one report line (`hostile: key=value ...`) of what it wrote, from which the
//! selftest computes what metricsd must have counted.
//!
//! It is a binary of its own so that metricsd's default identity policy (the
//! executable's file name) names it `guest-hostile`, a service apart from the
//! selftest's.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nexus_metrics::{RingSource, SocketSource};
use telemetry_abi::{MAX_REGISTER_RECORDS, Record, RecordKind, RegisterKind, encode_registration};
use telemetry_ring::{MemfdRegion, Region, Writer};

/// The counter the hostile registers properly.
pub const VALID_METRIC: &str = "hostile.valid";
/// The report line's prefix.
pub const REPORT: &str = "hostile:";
/// Records in the hostile's ring.
const CAPACITY: u32 = 256;
/// How long to wait for metricsd to drain or to quarantine.
const WAIT: Duration = Duration::from_secs(20);

/// Invalid records, each with the metricsd reject reason it must be counted under.
fn garbage() -> [(Record, &'static str); 4] {
    [
        (
            Record {
                kind: RecordKind(0x7777),
                flags: 0,
                key: 1,
                words: [1, 2, 3],
            },
            "unknown_kind",
        ),
        (Record::counter(99, 1), "unregistered_key"),
        (Record::gauge(1, 5), "kind_mismatch"),
        (
            // A registration piece without its head.
            Record {
                kind: RecordKind::REGISTER_DATA,
                flags: 0,
                key: 7,
                words: [0; 3],
            },
            "bad_registration",
        ),
    ]
}

/// The reasons the hostile's invalid records must be counted under, in report order.
pub const REASONS: [&str; 4] = [
    "unknown_kind",
    "unregistered_key",
    "kind_mismatch",
    "bad_registration",
];

fn push(writer: &mut Writer<MemfdRegion>, record: Record) -> Result<()> {
    writer
        .push(record)
        .map_err(|_| anyhow::anyhow!("the hostile's ring is full"))
}

/// Waits until `done` or [`WAIT`] passed.
fn wait(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > WAIT {
            bail!("{what}: not within {} s", WAIT.as_secs());
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Does everything and prints the report line.
pub fn run(metricsd: &Path) -> Result<()> {
    let source = SocketSource::new(metricsd).capacity(CAPACITY);
    let (mut writer, info) = source.claim(1).context("claiming a ring")?;

    // A proper registration and three samples of 7.
    let mut reg = [Record::default(); MAX_REGISTER_RECORDS];
    let n = encode_registration(1, RegisterKind::COUNTER, VALID_METRIC, &[], &mut reg)
        .map_err(|e| anyhow::anyhow!("encoding the registration: {e:?}"))?;
    writer
        .push_all(reg.get(..n).context("registration length")?)
        .map_err(|_| anyhow::anyhow!("the hostile's ring is full"))?;
    let mut valid_total = 0u64;
    for _ in 0..3 {
        push(&mut writer, Record::counter(1, 7))?;
        valid_total += 7;
    }
    // Invalid records.
    let mut counts = Vec::new();
    for (record, reason) in garbage() {
        push(&mut writer, record)?;
        counts.push(format!("{reason}=1"));
    }

    // Once metricsd has consumed all of it, a write position far past anything the
    // ring holds: a protocol violation.
    let capacity = writer.capacity();
    wait("metricsd draining the hostile ring", || {
        writer.free() == capacity
    })?;
    let bogus = u64::MAX / 3;
    writer.region().write_pos().store(bogus, Ordering::Release);
    wait("metricsd quarantining the hostile ring", || {
        writer.is_abandoned()
    })?;
    // Samples after the quarantine must never be counted.
    let after = 1000;
    let _ignored = writer.push(Record::counter(1, after));

    println!(
        "{REPORT} ring={} capacity={capacity} valid_total={valid_total} after_quarantine={after} \
         {} bogus_write_pos={bogus} quarantined=1",
        info.ring_id,
        counts.join(" ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_invalid_record_names_a_reported_reason() {
        let reasons: Vec<_> = garbage().iter().map(|(_, reason)| *reason).collect();
        assert_eq!(reasons, REASONS);
        for reason in REASONS {
            let known = metricsd::Reason::ALL.iter().any(|r| r.as_str() == reason);
            assert!(known, "{reason} is not a metricsd reject reason");
        }
    }
}
