//! Exact aggregation through real grants, real memfds and the real drain loop.

mod common;

use common::{Control, WAIT, config, start, watchdog};
use metricsd::histogram::Histogram;
use metricsd::{MetricKind, Value};
use telemetry_abi::{Record, RegisterKind};

#[test]
fn counter_totals_are_exact_across_rings_and_exported() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, sink) = start(config(dir.path()), &["web"]);
    let control = Control::connect(daemon.socket_path());
    let mut a = control.ring(64);
    let mut b = control.ring(64);
    a.register(
        1,
        RegisterKind::COUNTER,
        "http.requests",
        &[("route", "/a")],
    );
    b.register(
        7,
        RegisterKind::COUNTER,
        "http.requests",
        &[("route", "/a")],
    );
    let mut want: u128 = 0;
    for i in 0..10_000u64 {
        let d = i % 7 + 1;
        want += u128::from(d);
        if i % 2 == 0 {
            a.push_wait(Record::counter(1, d));
        } else {
            b.push_wait(Record::counter(7, d));
        }
    }
    // A delta near u64::MAX does not wrap the total.
    a.push_wait(Record::counter(1, u64::MAX));
    want += u128::from(u64::MAX);
    let snap = daemon.flush(WAIT).expect("flush");
    assert_eq!(
        snap.counter("web", "http.requests", &[("route", "/a")]),
        Some(want)
    );
    assert_eq!(snap.rejects.total(), 0);
    let exported = sink.find("series", "web/counter/http.requests{route=\"/a\"}");
    let last = exported.last().expect("exported");
    assert_eq!(last.get("value"), Some(want.to_string().as_str()));
    assert_eq!(last.get("producer_service"), Some("web"));
    assert_eq!(last.get("label.route"), Some("/a"));
    let deltas: u128 = exported
        .iter()
        .map(|r| {
            r.get("delta")
                .and_then(|d| d.parse::<u128>().ok())
                .expect("delta")
        })
        .sum();
    assert_eq!(deltas, want, "window deltas add up to the total");
    daemon.shutdown();
}

#[test]
fn histogram_buckets_and_gauges_are_exact() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.histograms.insert("lat".into(), vec![10, 100, 1000]);
    let (daemon, sink) = start(cfg, &["web"]);
    let control = Control::connect(daemon.socket_path());
    let mut r = control.ring(256);
    r.register(1, RegisterKind::HISTOGRAM, "lat", &[]);
    r.register(2, RegisterKind::HISTOGRAM, "size", &[]);
    r.register(3, RegisterKind::GAUGE, "temp", &[]);
    for v in [0, 10, 11, 100, 101, 1000, 1001, u64::MAX] {
        r.push(Record::histogram(1, v));
    }
    for v in [0, 1, 2, 3, 4, 5, 1 << 63, (1 << 63) + 1] {
        r.push(Record::histogram(2, v));
    }
    r.push(Record::gauge(3, 5));
    r.push(Record::gauge(3, -42));
    let snap = daemon.flush(WAIT).expect("flush");
    match snap.histogram("web", "lat", &[]) {
        Some(Histogram::Explicit(h)) => assert_eq!(h.counts(), [2, 2, 2, 2]),
        other => panic!("lat has a configured layout: {other:?}"),
    }
    let Some(Histogram::Exponential(size)) = snap.histogram("web", "size", &[]) else {
        panic!("size is exponential");
    };
    // 1 to 2^63 + 1 spans 64 powers of two: scale 1 (2 buckets per power, 128 in all)
    // fits 160 buckets, scale 2 would not. At scale 1 bucket i is (2^(i/2), 2^((i+1)/2)]:
    // 1 -> -1, 2 -> 1, 3 and 4 -> 3 (2.83 < v <= 4), 5 -> 4, 2^63 -> 125, 2^63 + 1 -> 126.
    assert_eq!(size.scale(), 1);
    assert_eq!(size.zero_count(), 1);
    let nonzero: Vec<(i32, u64)> = size.positive().iter().filter(|b| b.1 > 0).collect();
    assert_eq!(
        nonzero,
        [(-1, 1), (1, 1), (3, 2), (4, 1), (125, 1), (126, 1)]
    );
    let rec = sink.find("series", "web/histogram/size{}");
    let rec = rec.last().expect("exported");
    assert_eq!(rec.get("scale"), Some("1"));
    assert_eq!(rec.get("zero_count"), Some("1"));
    assert_eq!(rec.get("positive_offset"), Some("-1"));
    let mut dense = vec![0u64; 128];
    for (i, c) in nonzero {
        dense[(i + 1) as usize] = c;
    }
    let dense: Vec<String> = dense.iter().map(u64::to_string).collect();
    assert_eq!(rec.get("positive_buckets"), Some(dense.join(",").as_str()));
    assert_eq!(snap.gauge("web", "temp", &[]), Some(-42));
    let rec = sink.find("series", "web/histogram/lat{}");
    let rec = rec.last().expect("exported");
    assert_eq!(rec.get("bounds"), Some("10,100,1000,+Inf"));
    assert_eq!(rec.get("buckets"), Some("2,2,2,2"));
    assert_eq!(rec.get("count"), Some("8"));
    let sum: u128 = [0u128, 10, 11, 100, 101, 1000, 1001, u128::from(u64::MAX)]
        .iter()
        .sum();
    assert_eq!(rec.get("sum"), Some(sum.to_string().as_str()));
    daemon.shutdown();
}

#[test]
fn caps_and_overflow_are_exact() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.series.max_per_metric = 3;
    cfg.series.max_per_service = 5;
    let (daemon, sink) = start(cfg, &["flood"]);
    let control = Control::connect(daemon.socket_path());
    let mut r = control.ring(1024);
    // 10 user ids on one metric: 3 series fit, 7 go to the overflow series.
    for u in 0..10u32 {
        let v = format!("u{u}");
        r.register(u + 1, RegisterKind::COUNTER, "logins", &[("user", &v)]);
        r.push(Record::counter(u + 1, u64::from(u) + 1));
    }
    // Another metric: 2 more fit the per-service cap (5), the third overflows.
    for u in 0..3u32 {
        let v = format!("p{u}");
        r.register(100 + u, RegisterKind::COUNTER, "pages", &[("path", &v)]);
        r.push(Record::counter(100 + u, 10));
    }
    let snap = daemon.flush(WAIT).expect("flush");
    assert_eq!(snap.counter_sum("flood", "logins"), 55, "totals stay right");
    assert_eq!(
        snap.counter("flood", "logins", &[("otel.metric.overflow", "true")]),
        Some(4 + 5 + 6 + 7 + 8 + 9 + 10)
    );
    assert_eq!(
        snap.counter("flood", "pages", &[("otel.metric.overflow", "true")]),
        Some(10)
    );
    assert_eq!(snap.counter_sum("flood", "pages"), 30);
    assert_eq!(snap.store.series, 5);
    assert_eq!(snap.store.overflowed_registrations, 8);
    assert_eq!(snap.store.overflow_samples, 8);
    let overflow = sink.find(
        "series",
        "flood/counter/logins{otel.metric.overflow=\"true\"}",
    );
    assert_eq!(overflow.last().and_then(|r| r.get("value")), Some("49"));
    assert_eq!(
        overflow
            .last()
            .and_then(|r| r.get("label.otel.metric.overflow")),
        Some("true")
    );
    daemon.shutdown();
}

#[test]
fn sensitive_labels_and_attributes_are_redacted_and_identity_labels_renamed() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, sink) = start(config(dir.path()), &["auth"]);
    let control = Control::connect(daemon.socket_path());
    let mut r = control.ring(256);
    r.register(
        1,
        RegisterKind::COUNTER,
        "logins",
        &[
            ("Password", "hunter2"),
            ("service", "fake"),
            ("route", "/x"),
        ],
    );
    r.push(Record::counter(1, 3));
    r.register(2, RegisterKind::SPAN, "login", &[]);
    r.register(3, RegisterKind::ATTR, "session_token", &[]);
    r.register(4, RegisterKind::ATTR, "user", &[]);
    r.register(5, RegisterKind::STRING, "s3cr3t-value", &[]);
    r.register(6, RegisterKind::STRING, "alice", &[]);
    r.push(Record::span_start(2, 1, 0, 1000));
    r.push(Record::span_attr(
        3,
        1,
        telemetry_abi::AttrValueType::STRING,
        5,
    ));
    r.push(Record::span_attr(
        4,
        1,
        telemetry_abi::AttrValueType::STRING,
        6,
    ));
    r.push(Record::span_end(2, 1, 1500, telemetry_abi::SpanStatus::OK));
    let snap = daemon.flush(WAIT).expect("flush");
    let s = snap
        .series
        .iter()
        .find(|s| &*s.name == "logins")
        .expect("series");
    assert_eq!(
        &*s.labels,
        &[
            ("Password".to_owned(), "[redacted]".to_owned()),
            ("exported_service".to_owned(), "fake".to_owned()),
            ("route".to_owned(), "/x".to_owned()),
        ]
    );
    let all = sink.state().records.clone();
    assert!(
        all.iter().all(|r| r
            .fields
            .iter()
            .all(|(_, v)| !v.contains("hunter2") && !v.contains("s3cr3t"))),
        "no secret value reaches the sink"
    );
    let span = sink.find("span", "login");
    let span = span.first().expect("span exported");
    assert_eq!(span.get("attr.session_token"), Some("[redacted]"));
    assert_eq!(span.get("attr.user"), Some("alice"));
    assert_eq!(span.get("duration_ns"), Some("500"));
    assert_eq!(span.get("producer_service"), Some("auth"));
    let rec = sink.find("metric", "logins");
    assert_eq!(
        rec.last().and_then(|r| r.get("label.exported_service")),
        Some("fake")
    );
    assert!(rec.last().is_some_and(|r| r.get("label.service").is_none()));
    assert_eq!(snap.store.labels_redacted, 1);
    assert_eq!(snap.store.labels_renamed, 1);
    // A span duration histogram per name.
    let d = snap
        .find("auth", MetricKind::SpanDuration, "login", &[])
        .expect("duration series");
    match &d.value {
        Value::Histogram(h) => assert_eq!((h.count(), h.integer_sum()), (1, Some(500))),
        other => panic!("not a histogram: {other:?}"),
    }
    daemon.shutdown();
}

#[test]
fn span_rate_limit_exports_up_to_the_limit_and_counts_the_rest_by_reason() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.export.spans_per_second = 2;
    cfg.export.interval_ms = 60_000; // only explicit flushes export
    let (daemon, sink) = start(cfg, &["api"]);
    let control = Control::connect(daemon.socket_path());
    let mut r = control.ring(256);
    r.register(1, RegisterKind::SPAN, "op", &[]);
    // Durations 10, 50, 30, 20 (ok) and 1 (error), all within one second.
    for (id, d) in [(1u64, 10u64), (2, 50), (3, 30), (4, 20)] {
        r.push(Record::span_start(1, id, 0, 1000));
        r.push(Record::span_end(
            1,
            id,
            1000 + d,
            telemetry_abi::SpanStatus::OK,
        ));
    }
    r.push(Record::span_start(1, 5, 0, 1000));
    r.push(Record::span_end(
        1,
        5,
        1001,
        telemetry_abi::SpanStatus::ERROR,
    ));
    let snap = daemon.flush(WAIT).expect("flush");
    assert_eq!(snap.spans.ended, 5);
    assert_eq!(snap.spans.exported, 2);
    assert_eq!(snap.spans.rate_limited, 3);
    let spans = sink.find("span", "op");
    let got: Vec<&str> = spans
        .iter()
        .map(|s| s.get("duration_ns").unwrap_or(""))
        .collect();
    assert_eq!(got, ["10", "50"], "the first two, in the order they ended");
    let dropped = sink.find(
        "series",
        "metricsd/counter/metricsd.spans.dropped{reason=\"rate_limited\"}",
    );
    assert_eq!(dropped.last().and_then(|r| r.get("value")), Some("3"));
    // The duration histogram saw all five.
    let d = snap
        .find("api", MetricKind::SpanDuration, "op", &[])
        .expect("duration series");
    match &d.value {
        Value::Histogram(h) => assert_eq!((h.count(), h.integer_sum()), (5, Some(111))),
        other => panic!("not a histogram: {other:?}"),
    }
    daemon.shutdown();
}

#[test]
fn v1_1_spans_close_in_another_ring_of_their_connection_and_bad_ones_are_refused() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.export.interval_ms = 60_000; // only explicit flushes export
    let (daemon, sink) = start(cfg, &["api"]);
    let control = Control::connect(daemon.socket_path());
    let mut a = control.ring(256);
    let mut b = control.ring(256);
    let trace = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736u128;
    let remote_parent = 0x00f0_67aa_0ba9_02b7u64;
    for r in [&mut a, &mut b] {
        r.register(1, RegisterKind::SPAN, "op", &[]);
        r.register(2, RegisterKind::ATTR, "rows", &[]);
    }
    // Ring b (another thread) closes and annotates the span; the drain loop may read
    // b before a: the close is held until the open arrives.
    b.push(Record::span_note(
        2,
        0xaa,
        telemetry_abi::AttrValueType::U64,
        7,
    ));
    b.push(Record::span_close(
        1,
        0xaa,
        1250,
        telemetry_abi::SpanStatus::OK,
    ));
    a.push(Record::span_trace(1, 0xaa, trace, 1));
    a.push(Record::span_open(1, 0xaa, remote_parent, 1000));
    // Refused: an open without its trace record, a zero trace id.
    a.push(Record::span_open(1, 0xbb, 0, 1000));
    a.push(Record::span_trace(1, 0xcc, 0, 1));
    let snap = daemon.flush(WAIT).expect("flush");
    assert_eq!(snap.spans.ended, 1);
    assert_eq!(snap.spans.live, 0);
    assert_eq!(snap.spans.early, 0);
    let rejects: Vec<(&str, u64)> = snap
        .rejects
        .nonzero()
        .map(|(r, n)| (r.as_str(), n))
        .collect();
    assert_eq!(rejects, [("span_no_trace", 1), ("span_trace_zero", 1)]);
    let spans = sink.find("span", "op");
    assert_eq!(spans.len(), 1);
    let s = &spans[0];
    assert_eq!(s.get("trace_id"), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    assert_eq!(s.get("span_id"), Some("00000000000000aa"));
    assert_eq!(s.get("parent_id"), Some("00f067aa0ba902b7"));
    assert_eq!(s.get("duration_ns"), Some("250"));
    assert_eq!(s.get("status"), Some("ok"));
    assert_eq!(s.get("attr.rows"), Some("7"));
    // A second connection cannot close the first one's spans.
    let other = Control::connect(daemon.socket_path());
    let mut c = other.ring(256);
    c.register(1, RegisterKind::SPAN, "op", &[]);
    a.push(Record::span_trace(1, 0xdd, trace, 1));
    a.push(Record::span_open(1, 0xdd, 0, 1000));
    c.push(Record::span_close(
        1,
        0xdd,
        2000,
        telemetry_abi::SpanStatus::OK,
    ));
    let snap = daemon.flush(WAIT).expect("flush");
    assert_eq!(snap.spans.live, 1, "still open on its own connection");
    assert_eq!(
        snap.spans.early, 1,
        "the stranger's close is held, not applied"
    );
    daemon.shutdown();
}

#[test]
fn export_failures_are_counted_retried_and_never_lose_the_total() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.export.retry_ms = 5;
    cfg.export.interval_ms = 60_000;
    let (daemon, sink) = start(cfg, &["web"]);
    let control = Control::connect(daemon.socket_path());
    let mut r = control.ring(256);
    r.register(1, RegisterKind::COUNTER, "n", &[]);
    r.push(Record::counter(1, 40));
    sink.state().fail_appends = 3;
    let snap = daemon.flush(WAIT).expect("flush");
    assert_eq!(snap.export.failures, 3);
    assert_eq!(snap.export.pending, 0);
    let rec = sink.find("series", "web/counter/n{}");
    assert_eq!(rec.len(), 1, "stored once, after the retries");
    assert_eq!(rec[0].get("value"), Some("40"));
    r.push(Record::counter(1, 2));
    daemon.flush(WAIT).expect("flush");
    let failures = sink.find("series", "metricsd/counter/metricsd.export.failures{}");
    assert_eq!(failures.last().and_then(|r| r.get("value")), Some("3"));
    assert_eq!(
        sink.find("series", "web/counter/n{}")
            .last()
            .and_then(|r| r.get("value")),
        Some("42")
    );
    daemon.shutdown();
}
