//! `SELFTEST: tracing spans`: a root span, a child with attributes and an error status,
//! and a span left without a status, timed by an injected clock so every timestamp and
//! duration is known exactly. Read back: ids (the producer's local ids inside metricsd's
//! global ids), the parent link, the trace id, the status, start, end and duration, the
//! attributes (a sensitive one redacted), and the root's span-duration histogram.

use anyhow::{Context, Result, bail};
use logd::StoredRecord;
use metricsd::MetricKind;
use nexus_metrics::{ManualClock, Status, span};

use super::Ctx;
use super::evidence::{WAIT, wait_for};
use super::expect;

/// The selftest's span clock, installed with the recorder: spans carry exactly the
/// times this clock is set to.
pub static CLOCK: ManualClock = ManualClock::new(1_000_000_000);

/// One span as it must be exported.
struct Want {
    name: &'static str,
    span: u64,
    parent: Option<u64>,
    trace: u128,
    status: &'static str,
    start: u64,
    end: u64,
    attrs: Vec<(&'static str, &'static str)>,
}

fn check(want: &Want, records: &[StoredRecord]) -> Result<std::result::Result<(), String>> {
    let [r] = records else {
        return Ok(Err(format!(
            "{}: {} span records, expected 1",
            want.name,
            records.len()
        )));
    };
    let mut diffs = Vec::new();
    let mut expected = vec![
        ("span_id", Some(format!("{:016x}", want.span))),
        ("trace_id", Some(format!("{:032x}", want.trace))),
        ("parent_id", want.parent.map(|p| format!("{p:016x}"))),
        ("status", Some(want.status.to_owned())),
        ("start_ns", Some(want.start.to_string())),
        ("end_ns", Some(want.end.to_string())),
        ("duration_ns", Some((want.end - want.start).to_string())),
    ];
    let attr_keys: Vec<String> = want
        .attrs
        .iter()
        .map(|(k, _)| format!("attr.{k}"))
        .collect();
    for ((_, v), key) in want.attrs.iter().zip(&attr_keys) {
        expected.push((key.as_str(), Some((*v).to_owned())));
    }
    for (key, value) in expected {
        let got = r.record.get(key);
        if got != value.as_deref() {
            diffs.push(format!("{key} = {got:?}, expected {value:?}"));
        }
    }
    let attrs = r
        .record
        .fields
        .iter()
        .filter(|(k, _)| k.starts_with("attr."))
        .count();
    if attrs != want.attrs.len() {
        diffs.push(format!("{attrs} attributes, expected {}", want.attrs.len()));
    }
    Ok(if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {}", want.name, diffs.join(", ")))
    })
}

pub(crate) fn run(ctx: &mut Ctx) -> Result<String> {
    let t0 = 5_000_000_000u64;
    CLOCK.set(t0);
    let (root, child, idle, trace, idle_trace);
    {
        let request = span!("selftest.request");
        root = request.id().context("the root span was dropped")?;
        trace = request
            .context()
            .context("the root span was dropped")?
            .trace_id;
        CLOCK.advance(1_500);
        {
            let db = span!("selftest.db", parent: &request);
            child = db.id().context("the child span was dropped")?;
            db.attr("rows", 5u64);
            db.attr("route", "/a");
            db.attr("auth_token", "hunter2");
            CLOCK.advance(2_250);
            db.set_status(Status::Error);
        }
        CLOCK.advance(250);
        request.set_status(Status::Ok);
    }
    CLOCK.advance(1_000);
    {
        let quiet = span!("selftest.idle");
        idle = quiet.id().context("the idle span was dropped")?;
        idle_trace = quiet
            .context()
            .context("the idle span was dropped")?
            .trace_id;
        CLOCK.advance(7);
    }
    let wants = [
        Want {
            name: "selftest.request",
            span: root,
            parent: None,
            trace,
            status: "ok",
            start: t0,
            end: t0 + 4_000,
            attrs: vec![],
        },
        Want {
            name: "selftest.db",
            span: child,
            parent: Some(root),
            trace,
            status: "error",
            start: t0 + 1_500,
            end: t0 + 3_750,
            attrs: vec![("rows", "5"), ("route", "/a"), ("auth_token", "[redacted]")],
        },
        Want {
            name: "selftest.idle",
            span: idle,
            parent: None,
            trace: idle_trace,
            status: "unset",
            start: t0 + 5_000,
            end: t0 + 5_007,
            attrs: vec![],
        },
    ];

    // The root's duration histogram (layout configured by span name).
    let bounds = ctx
        .metricsd_config
        .histograms
        .get("selftest.request")
        .cloned()
        .context("metricsd's config has no layout for the selftest.request span")?;
    let duration = [4_000u64];
    let histogram_id = metricsd::series_id::<&str, &str>(
        &ctx.service,
        MetricKind::SpanDuration,
        "selftest.request",
        &[],
    );
    let histogram_want = [
        ("count", "1".to_owned()),
        ("sum", expect::sum(&duration).to_string()),
        ("bounds", expect::bounds_text(&bounds)),
        (
            "buckets",
            expect::csv(&expect::bucket_counts(&bounds, &duration)),
        ),
    ];

    let service = ctx.service.clone();
    if trace == idle_trace || trace as u64 != root {
        bail!(
            "trace ids: the root's {trace:032x} must end in its span id {root:016x} and differ \
             from the idle span's {idle_trace:032x}"
        );
    }
    wait_for(WAIT, || {
        let mut diffs = Vec::new();
        for want in &wants {
            if let Err(d) = check(want, &ctx.logd.spans(&service, want.name)?)? {
                diffs.push(d);
            }
        }
        match ctx.logd.series_last(&histogram_id)? {
            None => diffs.push(format!("{histogram_id}: no record")),
            Some(r) => {
                for (key, want) in &histogram_want {
                    let got = r.record.get(key);
                    if got != Some(want.as_str()) {
                        diffs.push(format!("{histogram_id} {key} = {got:?}, expected {want:?}"));
                    }
                }
            }
        }
        Ok(if diffs.is_empty() {
            Ok(())
        } else {
            Err(diffs.join("; "))
        })
    })?;
    Ok(format!(
        "3 spans: ids {root:016x}/{child:016x}/{idle:016x} in traces {trace:032x} (root and \
         child) and {idle_trace:032x}, parent link, status ok/error/unset, durations \
         4000/2250/7 ns exact, attributes (secret redacted), duration histogram exact"
    ))
}
