//! The ABI spec is enough to write a producer in C: `abi/examples/producer.c`, written
//! from `abi/README.md` alone, is built with the system C compiler and run against a
//! real metricsd exporting to a real logd; every total it reports is read back from
//! logd exactly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{WAIT, config, start_logd, watchdog};
use metricsd::Daemon;

/// Samples per kind the C producer records (and a tenth as many spans).
const SAMPLES: u64 = 200_000;

/// Builds the example with `cc`, or says why not.
fn build(out: &Path) -> Result<(), String> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../abi/examples/producer.c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let built = Command::new(&cc)
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(out)
        .arg(&source)
        .output()
        .map_err(|e| format!("no C compiler: `{cc}` could not be run ({e})"))?;
    assert!(
        built.status.success(),
        "{} does not compile: {}",
        source.display(),
        String::from_utf8_lossy(&built.stderr)
    );
    Ok(())
}

/// `key=value` from the producer's report line.
fn field(report: &str, key: &str) -> String {
    report
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("`{key}` missing from the report: {report}"))
        .to_owned()
}

fn last_field(logd: &Path, series: &str, key: &str) -> String {
    let mut client = logd::Client::connect(logd).expect("connect to logd");
    let q = logd::Query::new().scope("metrics").field("series", series);
    let records = client.query_all(&q, 100_000).expect("query");
    let last = records
        .last()
        .unwrap_or_else(|| panic!("{series} not in logd"));
    last.record
        .get(key)
        .unwrap_or_else(|| panic!("{series} has no {key}"))
        .to_owned()
}

#[test]
fn a_producer_written_in_c_from_the_spec_gets_exact_totals() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    // The binary's file name is the service metricsd's default policy names it.
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("c-producer");
    if let Err(why) = build(&exe) {
        eprintln!("SKIPPED: the C producer test needs a C compiler: {why}");
        println!("SKIPPED: the C producer test needs a C compiler: {why}");
        return;
    }
    let cfg = config(dir.path());
    let server = start_logd(&cfg.logd_socket);
    let logd_path = cfg.logd_socket.clone();
    let socket = cfg.socket.clone();
    let daemon = Daemon::new(cfg).spawn().expect("metricsd starts");
    daemon
        .wait_ready(WAIT)
        .expect("ready: start marker read back");

    let out = Command::new(&exe)
        .arg(SAMPLES.to_string())
        .env("NEXUS_METRICSD_SOCKET", &socket)
        .output()
        .expect("run the C producer");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the C producer failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report = stdout
        .lines()
        .find(|l| l.starts_with("c-producer: ok"))
        .expect("a report line");

    // What the producer says it did, checked against what the loop must have done.
    let spans = SAMPLES / 10;
    let requests: u64 = (0..SAMPLES).map(|i| i % 5 + 1).sum::<u64>() + spans;
    assert_eq!(field(report, "requests"), requests.to_string());
    assert_eq!(field(report, "spans"), spans.to_string());
    let depth = (SAMPLES - 1) as i64 - (SAMPLES / 2) as i64;
    let latency_sum: u64 = (0..SAMPLES).map(|i| 7 * i).sum();

    let snap = daemon.flush(WAIT).expect("flush");
    assert_eq!(
        snap.rejects.total(),
        0,
        "nothing refused: {:?}",
        snap.rejects
    );
    assert_eq!(snap.violations, Default::default());
    assert_eq!(snap.drain.registrations, 8);
    assert_eq!(snap.spans.ended, spans);

    let service = "c-producer";
    let series =
        |kind: &str, name: &str, labels: &str| format!("{service}/{kind}/{name}{{{labels}}}");
    let requests_id = series("counter", "c.requests", r#"lang="c",route="/x""#);
    assert_eq!(
        last_field(&logd_path, &requests_id, "value"),
        requests.to_string()
    );
    assert_eq!(
        last_field(&logd_path, &requests_id, "producer_service"),
        service,
        "identity from the kernel"
    );
    let depth_id = series("gauge", "c.queue_depth", "");
    assert_eq!(
        last_field(&logd_path, &depth_id, "value"),
        depth.to_string()
    );
    let latency_id = series("histogram", "c.latency_ns", "");
    assert_eq!(
        last_field(&logd_path, &latency_id, "count"),
        SAMPLES.to_string()
    );
    assert_eq!(
        last_field(&logd_path, &latency_id, "sum"),
        latency_sum.to_string()
    );
    let duration_id = series("span_duration", "c.op", "");
    assert_eq!(
        last_field(&logd_path, &duration_id, "count"),
        spans.to_string()
    );
    assert_eq!(
        last_field(&logd_path, &duration_id, "sum"),
        field(report, "duration_sum")
    );

    // Exported spans carry both attributes, the string one by its registered value.
    let mut client = logd::Client::connect(&logd_path).expect("connect to logd");
    let q = logd::Query::new()
        .scope("spans")
        .field("producer_service", service);
    let exported = client.query_all(&q, 100_000).expect("query");
    assert!(!exported.is_empty(), "spans exported");
    let mut ids = std::collections::BTreeSet::new();
    for s in &exported {
        assert_eq!(s.record.get("attr.c.lang"), Some("C"));
        let rows: u64 = s
            .record
            .get("attr.c.rows")
            .expect("rows")
            .parse()
            .expect("a number");
        // metricsd derives a 64-bit span id from the ring and the producer's per-ring
        // id (ABI 1.0 spans): 16 hex digits, nonzero, one per span.
        let id = s.record.get("span_id").expect("span id");
        assert!(
            id.len() == 16 && u64::from_str_radix(id, 16).is_ok_and(|v| v != 0),
            "{id}"
        );
        assert!(ids.insert(id.to_owned()), "span id {id} twice");
        // The attribute is on its own span: its status follows from the same row count.
        let want = if rows % 3 == 2 { "error" } else { "ok" };
        assert_eq!(s.record.get("status"), Some(want));
    }
    daemon.shutdown();
    server.shutdown().expect("logd stops");
}
