//! The scrape endpoint over a real socket: every series in every format with exact
//! values, name and label translation, and the endpoint's bounds and refusals.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Control, WAIT, config, start, watchdog};
use metricsd::histogram::{Exponential, index_u64};
use metricsd::scrape;
use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model as pb;
use prost::Message;
use telemetry_abi::{Record, RegisterKind};

const PROTOBUF: &str =
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited";
const OPENMETRICS: &str = "application/openmetrics-text;version=1.0.0";

fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (u16, String, Vec<u8>) {
    scrape::get(addr, path, accept, Duration::from_secs(10), 64 << 20).expect("GET")
}

fn text(addr: SocketAddr, accept: Option<&str>) -> String {
    let (code, _, body) = get(addr, "/metrics", accept);
    assert_eq!(code, 200);
    String::from_utf8(body).expect("utf-8")
}

fn families(addr: SocketAddr) -> Vec<pb::MetricFamily> {
    let (code, ct, body) = get(addr, "/metrics", Some(PROTOBUF));
    assert_eq!(code, 200);
    assert!(ct.starts_with("application/vnd.google.protobuf"), "{ct}");
    let mut buf = body.as_slice();
    let mut out = Vec::new();
    while !buf.is_empty() {
        out.push(pb::MetricFamily::decode_length_delimited(&mut buf).expect("delimited"));
    }
    out
}

/// The sample line `name{labels} value` of the text exposition, by prefix.
fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
    let found: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
    assert_eq!(found.len(), 1, "one line starting {prefix:?} in:\n{text}");
    found[0]
}

#[test]
fn every_series_is_scraped_exactly_in_every_format() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.prometheus.listen = Some("127.0.0.1:0".into());
    cfg.histograms.insert("fixed".into(), vec![10, 100]);
    let (daemon, _sink) = start(cfg, &["web"]);
    let addr = daemon.prometheus_addr().expect("endpoint");
    let control = Control::connect(daemon.socket_path());
    let mut r = control.ring(1024);
    r.register(
        1,
        RegisterKind::COUNTER,
        "http.requests",
        &[("route", "/a"), ("service", "fake")],
    );
    r.register(2, RegisterKind::GAUGE, "queue.depth", &[]);
    r.register(
        3,
        RegisterKind::HISTOGRAM,
        "payload.bytes",
        &[("a.b", "1"), ("a_b", "2")],
    );
    r.register(4, RegisterKind::HISTOGRAM, "fixed", &[]);
    // Two names that translate alike: kept apart.
    r.register(5, RegisterKind::COUNTER, "jobs.done", &[]);
    r.register(6, RegisterKind::COUNTER, "jobs_done", &[]);
    r.push(Record::counter(1, 41));
    r.push(Record::counter(1, 1));
    r.push(Record::gauge(2, -17));
    let values = [0u64, 1, 2, 3, 4, 1000, 1024, 1025, 1 << 40];
    let mut reference = Exponential::new();
    for v in values {
        r.push(Record::histogram(3, v));
        reference.record(v);
    }
    for v in [5u64, 10, 11, 1000] {
        r.push(Record::histogram(4, v));
    }
    r.push(Record::counter(5, 3));
    r.push(Record::counter(6, 4));
    daemon.flush(WAIT).expect("flush");

    let t = text(addr, None);
    assert!(t.contains("# TYPE http_requests_total counter"), "{t}");
    assert_eq!(
        line(&t, "http_requests_total{"),
        r#"http_requests_total{service="web",exported_service="fake",route="/a"} 42"#
    );
    assert_eq!(
        line(&t, "queue_depth{"),
        r#"queue_depth{service="web"} -17"#
    );
    // Classic buckets at powers of two, cumulative.
    let sum: u64 = values.iter().sum();
    let h = r#"{service="web",a_b="1",a_b_2="2""#;
    assert_eq!(
        line(&t, &format!("payload_bytes_count{h}")),
        format!("payload_bytes_count{h}}} 9")
    );
    assert_eq!(
        line(&t, &format!("payload_bytes_sum{h}")),
        format!("payload_bytes_sum{h}}} {sum}.0")
    );
    for (le, want) in [
        ("0", 1),
        ("1", 2),
        ("2", 3),
        ("4", 5),
        ("1024", 7),
        ("2048", 8),
        ("+Inf", 9),
    ] {
        assert_eq!(
            line(&t, &format!("payload_bytes_bucket{h},le=\"{le}\"}}")),
            format!("payload_bytes_bucket{h},le=\"{le}\"}} {want}")
        );
    }
    assert_eq!(
        line(&t, r#"fixed_bucket{service="web",le="10"}"#)
            .rsplit(' ')
            .next(),
        Some("2")
    );
    assert_eq!(
        line(&t, r#"fixed_bucket{service="web",le="100"}"#)
            .rsplit(' ')
            .next(),
        Some("3")
    );
    assert_eq!(
        line(&t, r#"fixed_bucket{service="web",le="+Inf"}"#)
            .rsplit(' ')
            .next(),
        Some("4")
    );
    // Distinct, and the rename counted.
    assert_eq!(
        line(&t, "jobs_done_total{"),
        r#"jobs_done_total{service="web"} 3"#
    );
    assert_eq!(
        line(&t, "jobs_done_2_total{"),
        r#"jobs_done_2_total{service="web"} 4"#
    );
    assert_eq!(
        line(
            &t,
            "metricsd_prometheus_renamed{service=\"metricsd\",what=\"metric\"}"
        ),
        r#"metricsd_prometheus_renamed{service="metricsd",what="metric"} 1"#
    );
    assert!(
        t.contains(r#"metricsd_records_drained_total{service="metricsd"}"#),
        "{t}"
    );
    assert!(!t.contains("# EOF"));

    let om = text(addr, Some(OPENMETRICS));
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE http_requests counter"), "{om}");
    assert_eq!(
        line(&om, "http_requests_total{"),
        r#"http_requests_total{service="web",exported_service="fake",route="/a"} 42"#
    );

    // Protobuf: native buckets equal the reference histogram's at the same schema.
    let fams = families(addr);
    let fam = fams
        .iter()
        .find(|f| f.name == "payload_bytes")
        .expect("payload_bytes");
    let hist = fam.metric[0].histogram.as_ref().expect("histogram");
    assert_eq!(hist.sample_count, 9);
    assert_eq!(hist.sample_sum, sum as f64);
    let want = reference.native();
    assert_eq!(hist.schema, want.schema);
    assert_eq!(hist.zero_threshold, 0.0);
    assert_eq!(hist.zero_count, 1);
    let spans: Vec<(i32, u32)> = hist
        .positive_span
        .iter()
        .map(|s| (s.offset, s.length))
        .collect();
    assert_eq!(spans, want.positive.spans);
    assert_eq!(hist.positive_delta, want.positive.deltas);
    // Decoding the spans gives each value's bucket (Prometheus index = ours + 1).
    let mut expect = std::collections::BTreeMap::new();
    for v in values.iter().filter(|&&v| v > 0) {
        *expect
            .entry(index_u64(*v, want.schema).expect("nonzero") + 1)
            .or_insert(0u64) += 1;
    }
    assert_eq!(
        want.positive.buckets(),
        expect.into_iter().collect::<Vec<_>>()
    );
    let counter = fams
        .iter()
        .find(|f| f.name == "http_requests_total")
        .expect("counter");
    assert_eq!(
        counter.metric[0].counter.as_ref().map(|c| c.value),
        Some(42.0)
    );
    daemon.shutdown();
}

#[test]
fn wrong_paths_methods_and_oversized_or_slow_requests_are_refused_and_counted() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.prometheus.listen = Some("127.0.0.1:0".into());
    cfg.prometheus.max_request_bytes = 512;
    cfg.prometheus.timeout_ms = 300;
    let (daemon, _sink) = start(cfg, &["web"]);
    let addr = daemon.prometheus_addr().expect("endpoint");
    daemon.flush(WAIT).expect("flush");

    assert_eq!(get(addr, "/", None).0, 404);
    assert_eq!(get(addr, "/metrics/x", None).0, 404);
    assert_eq!(get(addr, "/metrics?x=1", None).0, 200);
    let raw = |req: &[u8]| -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(req).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let post = raw(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert!(post.contains("Allow: GET"), "{post}");
    let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 600));
    big.extend(b"\r\n\r\n");
    assert!(raw(&big).starts_with("HTTP/1.1 431"));
    assert!(raw(b"garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    // An idle connection is closed after the timeout, unanswered.
    let mut idle = TcpStream::connect(addr).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = Vec::new();
    let _ = idle.read_to_end(&mut out);
    assert!(out.is_empty());

    let stats = daemon.scrape_stats().expect("stats");
    let wait_for = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + WAIT;
        while !f() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for("refusals counted", &|| {
        stats.refused("not_found") == 2
            && stats.refused("method_not_allowed") == 1
            && stats.refused("request_too_large") == 1
            && stats.refused("bad_request") == 1
            && stats.refused("timeout") == 1
    });
    let t = text(addr, None);
    assert!(
        t.contains(r#"metricsd_scrape_refused_total{service="metricsd",reason="not_found"} 2"#),
        "{t}"
    );
    assert!(
        t.contains(r#"metricsd_scrape_served_total{service="metricsd"} 1"#),
        "{t}"
    );
    daemon.shutdown();
}

#[test]
fn a_scrape_past_max_connections_is_answered_503() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.prometheus.listen = Some("127.0.0.1:0".into());
    cfg.prometheus.max_connections = 1;
    cfg.prometheus.timeout_ms = 5_000;
    let (daemon, _sink) = start(cfg, &["web"]);
    let addr = daemon.prometheus_addr().expect("endpoint");
    daemon.flush(WAIT).expect("flush");
    // The first connection holds the only slot while it sends nothing; the accept
    // loop takes connections in order, so the second finds the slot taken.
    let _held = TcpStream::connect(addr).expect("connect");
    // Answered 503 when the request had arrived before the answer; otherwise the
    // reset of the unread request may beat the answer to the client.
    if let Ok((code, _, _)) = scrape::get(addr, "/metrics", None, Duration::from_secs(10), 1 << 20)
    {
        assert_eq!(code, 503);
    }
    assert_eq!(daemon.scrape_stats().expect("stats").refused("busy"), 1);
    daemon.shutdown();
}

#[test]
fn an_expired_counter_comes_back_as_a_reset() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.prometheus.listen = Some("127.0.0.1:0".into());
    cfg.series.idle_ttl_ms = 100;
    cfg.series.idle_ttl_bound_ms = 100;
    let (daemon, _sink) = start(cfg, &["web"]);
    let addr = daemon.prometheus_addr().expect("endpoint");
    let control = Control::connect(daemon.socket_path());
    let mut r = control.ring(1024);
    r.register(1, RegisterKind::COUNTER, "jobs.done", &[]);
    r.push(Record::counter(1, 40));
    daemon.flush(WAIT).expect("flush");
    let series = r#"jobs_done_total{service="web"}"#;
    assert_eq!(line(&text(addr, None), series), format!("{series} 40"));

    // Idle past its TTL: exported one last time, then gone from the scrape.
    let deadline = std::time::Instant::now() + WAIT;
    while daemon.snapshot().expect("snapshot").store.expired == 0 {
        assert!(std::time::Instant::now() < deadline, "never expired");
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.flush(WAIT).expect("flush");
    let t = text(addr, None);
    assert!(!t.contains(series), "{t}");

    // The same key records again: a new series from zero, which a Prometheus reads as
    // a counter reset (40, then 2): rate() and increase() handle it.
    r.push(Record::counter(1, 2));
    daemon.flush(WAIT).expect("flush");
    assert_eq!(line(&text(addr, None), series), format!("{series} 2"));
    let snap = daemon.snapshot().expect("snapshot");
    assert_eq!(snap.store.recreated, 1);
}
