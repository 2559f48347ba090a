//! The facades' backends against the in-test grant server, record by record: the
//! `metrics` recorder's names, no-ops and `absolute`, metadata sent once per ring, and
//! the `tracing` layer's spans: parents, trace ids, a span closed on another thread,
//! `traceparent` in and out.
//!
//! One test, so nothing else in this process installs a recorder or a subscriber.

mod common;

use std::time::Duration;

use common::{Server, sum, watchdog};
use nexus_metrics::{Config, DropReason, RegisterKind, TracingLayer};
use telemetry_abi::{RecordKind, SpanEnd, SpanStart, SpanTrace};
use tracing_subscriber::layer::SubscriberExt;

#[test]
fn metrics_and_tracing_through_the_facades_record_by_record() {
    let _dog = watchdog(Duration::from_secs(30));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metricsd.sock");
    let server = Server::start(&path, 1 << 14);
    nexus_metrics::install(Config::new().socket(&path)).expect("first install");
    nexus_metrics::MetricsRecorder::new()
        .install()
        .expect("the first metrics recorder");
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(TracingLayer::new()),
    )
    .expect("the first subscriber");

    // metrics: a label key outside the ring's spelling is respelled; an absolute value
    // adds what it exceeds; a key that cannot be registered is a counted no-op.
    metrics::describe_counter!("f.requests", metrics::Unit::Count, "Requests");
    metrics::describe_counter!("f.requests", metrics::Unit::Count, "Requests");
    for _ in 0..3 {
        metrics::counter!("f.requests", "http-method" => "GET").increment(2);
    }
    metrics::counter!("f.total").absolute(10);
    metrics::counter!("f.total").absolute(4);
    metrics::counter!("f.total").absolute(15);
    let before = nexus_metrics::stats().dropped(DropReason::Invalid);
    let long = "v".repeat(65);
    metrics::counter!("f.refused", "k" => long).increment(1);
    assert_eq!(
        nexus_metrics::stats().dropped(DropReason::Invalid) - before,
        1,
        "a label value over 64 bytes: one counted drop"
    );

    // tracing: a root with children; one child closes on another thread; a span
    // continues an incoming `traceparent`.
    let children = 300;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (root_ctx, remote_ctx) = {
        let secret = "s3cr3t";
        let root = tracing::info_span!("f.root", job = 7u64, route = "/a", api_token = secret);
        let _in_root = root.enter();
        for i in 0..children {
            let child = tracing::info_span!("f.child", i = i as u64);
            let _in_child = child.enter();
        }
        let moved = tracing::info_span!("f.moved");
        std::thread::spawn(move || drop(moved))
            .join()
            .expect("the closing thread");
        let remote = tracing::info_span!(parent: None, "f.remote", traceparent = incoming);
        let root_ctx = TracingLayer::context(&root).expect("the root's context");
        (root_ctx, TracingLayer::context(&remote).expect("a context"))
    };
    assert_eq!(
        (remote_ctx.trace_id, remote_ctx.flags),
        (0x4bf92f3577b34da6a3ce929d0e0e4736, 1),
        "the incoming trace continued"
    );
    assert_eq!(
        TracingLayer::context(&tracing::Span::none()),
        None,
        "a disabled span has none"
    );
    assert!(nexus_metrics::flush());
    server.drain();

    server.find(RegisterKind::COUNTER, "f.requests", |ring, key| {
        let reg = &ring.keys[&key];
        assert_eq!(reg.labels, [("http_method".to_owned(), "GET".to_owned())]);
        assert_eq!(sum(&ring.records_of(key)), 6);
    });
    server.find(RegisterKind::COUNTER, "f.total", |ring, key| {
        assert_eq!(sum(&ring.records_of(key)), 15, "10, then 5 more");
    });
    server.find(RegisterKind::METADATA, "f.requests", |ring, key| {
        let reg = &ring.keys[&key];
        // Sorted by key, as every registration's labels are.
        let want = [
            ("description", "Requests"),
            ("kind", "counter"),
            ("unit", "count"),
        ];
        let got: Vec<(&str, &str)> = reg
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(got, want);
        assert!(ring.records_of(key).is_empty(), "a registration only");
        let registrations = ring
            .keys
            .values()
            .filter(|r| r.kind == RegisterKind::METADATA)
            .count();
        assert_eq!(registrations, 1, "described twice, sent once");
    });

    // The root's attributes, the sensitive one too (metricsd redacts it on export).
    server.find(RegisterKind::SPAN, "f.root", |ring, _| {
        let attrs: Vec<String> = ring
            .events
            .iter()
            .filter_map(|e| match e {
                common::Event::Record(r) if r.kind == RecordKind::SPAN_NOTE => {
                    ring.keys.get(&r.key).map(|reg| reg.name.clone())
                }
                _ => None,
            })
            .collect();
        for want in ["job", "route", "api_token"] {
            assert!(attrs.iter().any(|a| a == want), "{want} in {attrs:?}");
        }
        assert_eq!(
            attrs.iter().filter(|a| *a == "i").count(),
            children,
            "each child's attribute"
        );
    });

    // Every span opened once (its trace record just before) and closed once, in
    // whichever ring its thread had; children under the root, in its trace.
    server.with_rings(|rings| {
        let mut opens = Vec::new();
        let mut closes = Vec::new();
        for ring in rings {
            let name_of = |key| {
                ring.keys
                    .get(&key)
                    .map_or_else(String::new, |r| r.name.clone())
            };
            let mut trace: Option<SpanTrace> = None;
            for e in &ring.events {
                let common::Event::Record(r) = e else {
                    continue;
                };
                match r.kind {
                    RecordKind::SPAN_TRACE => trace = Some(r.view()),
                    RecordKind::SPAN_OPEN => {
                        let o: SpanStart = r.view();
                        let t = trace.take().expect("a trace record before each open");
                        assert_eq!(t.span_id, o.span_id);
                        opens.push((name_of(o.name), t.trace_id(), o));
                    }
                    RecordKind::SPAN_CLOSE => {
                        let c: SpanEnd = r.view();
                        closes.push((name_of(c.name), c));
                    }
                    _ => {}
                }
            }
        }
        assert_eq!(opens.len(), children + 3, "root, children, moved, remote");
        assert_eq!(closes.len(), children + 3);
        let mut ids: Vec<u64> = opens.iter().map(|(_, _, o)| o.span_id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), opens.len(), "distinct span ids");
        for (_, c) in &closes {
            assert!(
                ids.binary_search(&c.span_id).is_ok(),
                "closes an opened span"
            );
        }
        let (_, root_trace, root) = opens
            .iter()
            .find(|(n, _, _)| n == "f.root")
            .expect("the root");
        assert_eq!(root.parent_id, 0, "a root");
        assert_eq!(
            (root.span_id, *root_trace),
            (root_ctx.span_id, root_ctx.trace_id),
            "TracingLayer::context names the root"
        );
        for (name, trace, o) in &opens {
            match name.as_str() {
                "f.child" | "f.moved" => {
                    assert_eq!((o.parent_id, *trace), (root.span_id, *root_trace));
                }
                "f.remote" => {
                    assert_eq!(o.parent_id, 0x00f0_67aa_0ba9_02b7, "the remote parent");
                    assert_eq!(*trace, 0x4bf92f3577b34da6a3ce929d0e0e4736);
                    assert_eq!(o.span_id, remote_ctx.span_id);
                }
                "f.root" => {}
                other => panic!("an unexpected span {other}"),
            }
        }
    });
}
