//! The facades' backends against the in-test grant server, record by record: the
//! `metrics` recorder's names, no-ops and `absolute`, metadata sent once per ring, and
//! the `tracing` layer's trees, split when they outgrow their bound.
//!
//! One test, so nothing else in this process installs a recorder or a subscriber.

mod common;

use std::time::Duration;

use common::{Server, sum, watchdog};
use nexus_metrics::{Config, DropReason, RegisterKind, TracingLayer};
use telemetry_abi::{RecordKind, SpanEnd, SpanStart};
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

    // tracing: a root with more children than a tree holds.
    let children = TracingLayer::MAX_TREE_SPANS + 44;
    {
        let secret = "s3cr3t";
        let root = tracing::info_span!("f.root", job = 7u64, route = "/a", api_token = secret);
        let _in_root = root.enter();
        for i in 0..children {
            let child = tracing::info_span!("f.child", i = i as u64);
            let _in_child = child.enter();
        }
    }
    assert_eq!(TracingLayer::split_trees(), 44, "each child past the bound");
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
                common::Event::Record(r) if r.kind == RecordKind::SPAN_ATTR => {
                    ring.keys.get(&r.key).map(|reg| reg.name.clone())
                }
                _ => None,
            })
            .collect();
        for want in ["job", "route", "api_token"] {
            assert!(attrs.iter().any(|a| a == want), "{want} in {attrs:?}");
        }
    });

    // Every span started once and ended once; the root's tree holds the first children,
    // the rest are trees of their own.
    server.with_rings(|rings| {
        let mut starts = Vec::new();
        let mut ends = Vec::new();
        for ring in rings {
            let root_key = ring.key_of(RegisterKind::SPAN, "f.root");
            let child_key = ring.key_of(RegisterKind::SPAN, "f.child");
            for e in &ring.events {
                let common::Event::Record(r) = e else {
                    continue;
                };
                match r.kind {
                    RecordKind::SPAN_START => {
                        let s: SpanStart = r.view();
                        starts.push((Some(s.name) == root_key, Some(s.name) == child_key, s));
                    }
                    RecordKind::SPAN_END => ends.push(r.view::<SpanEnd>()),
                    _ => {}
                }
            }
        }
        assert_eq!(starts.len(), children + 1);
        assert_eq!(ends.len(), children + 1);
        let root = starts
            .iter()
            .find(|(is_root, _, _)| *is_root)
            .map(|(_, _, s)| s.span_id)
            .expect("the root");
        let under_root = starts
            .iter()
            .filter(|(_, is_child, s)| *is_child && s.parent_id == root)
            .count();
        let alone = starts
            .iter()
            .filter(|(_, is_child, s)| *is_child && s.parent_id == 0)
            .count();
        assert_eq!(under_root, TracingLayer::MAX_TREE_SPANS);
        assert_eq!(alone, 44);
    });
}
