//! metricsd at its ring cap answers OVER_LIMIT: the thread works without a ring,
//! holds counter increments, drops and counts other records, never blocks, and keeps
//! the one connection.

mod common;

use std::time::Duration;

use common::{Server, watchdog};
use nexus_metrics::{Config, DropReason, counter, histogram};
use telemetry_abi::GrantStatus;

#[test]
fn over_limit_drops_are_counted_and_the_connection_is_kept() {
    let _dog = watchdog(Duration::from_secs(20));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metricsd.sock");
    let server = Server::start_with(&path, 64, Some(GrantStatus::OVER_LIMIT));
    nexus_metrics::install(
        Config::new()
            .socket(&path)
            .retry(Duration::from_millis(1), Duration::from_millis(2)),
    )
    .expect("first install");

    std::thread::spawn(|| {
        for _ in 0..1_000 {
            counter!("over.requests").increment(1);
            histogram!("over.latency_ns").record(5);
            std::thread::sleep(Duration::from_micros(20));
        }
    })
    .join()
    .expect("producer");

    let stats = nexus_metrics::stats();
    assert_eq!(stats.dropped(DropReason::OverLimit), 1_000, "{stats:?}");
    assert_eq!(stats.held, 1_000, "increments held: {stats:?}");
    // The thread exited without ever getting a ring: the held key is given up.
    assert_eq!(stats.lost_increments, 1_000, "{stats:?}");
    assert_eq!(stats.dropped(DropReason::NoMetricsd), 1, "{stats:?}");
    assert_eq!(stats.rings_claimed, 0);
    assert!(stats.claim_failures >= 2, "retried: {stats:?}");
    assert_eq!(server.messages() as u64, stats.claim_failures);
    assert_eq!(server.connections(), 1, "refusals keep the connection");
}
