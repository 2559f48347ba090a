//! Without metricsd the library holds counter state per key, counts what it dropped,
//! never panics, and retries claiming on a coarse schedule rather than per sample; a
//! thread that exits still holding counter state counts it as lost. Also: the key
//! limit and refused names give no-op handles whose records are counted.
//!
//! One test: the counts below are process-wide and exact.

mod common;

use std::time::Duration;

use common::watchdog;
use nexus_metrics::{Config, Counter, DropReason, KeyError, counter, histogram, span};

const MAX_KEYS: u32 = 8;

#[test]
fn no_metricsd_means_counted_drops_and_bounded_retries() {
    let _dog = watchdog(Duration::from_secs(20));
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nobody-listens.sock");
    nexus_metrics::install(
        Config::new()
            .socket(&missing)
            .max_keys(MAX_KEYS)
            .retry(Duration::from_millis(1), Duration::from_millis(5)),
    )
    .expect("first install");

    const SAMPLES: u64 = 3_000;
    std::thread::spawn(|| {
        let c = counter!("absent.requests", "route" => "/a");
        let h = histogram!("absent.latency_ns");
        for i in 0..SAMPLES {
            c.increment(1);
            h.record(i);
            if i % 100 == 0 {
                // Let a few backoff periods pass, so retries really happen.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let s = span!("absent.span");
        s.attr("rows", 1u64);
        drop(s);
        assert!(!nexus_metrics::flush(), "held increments wait for a ring");
        // The thread exits holding them: one record lost, its increments counted.
    })
    .join()
    .expect("recording without metricsd must not panic");

    let stats = nexus_metrics::stats();
    assert_eq!(stats.rings_claimed, 0);
    // Counter increments were held, then given up at thread exit (one record for the
    // key, the increments counted); histograms and the span (counted once, as a whole;
    // its attribute and end are not written) dropped and counted.
    assert_eq!(stats.held, SAMPLES, "{stats:?}");
    assert_eq!(stats.lost_increments, SAMPLES, "{stats:?}");
    assert_eq!(
        stats.dropped(DropReason::NoMetricsd),
        SAMPLES + 1 + 1,
        "{stats:?}"
    );
    assert_eq!(stats.dropped_total(), SAMPLES + 2);
    // Claims are retried at most once per 16 records without a ring (and then only
    // when the backoff has passed), never per sample; and they were retried.
    assert!(stats.claim_failures >= 2, "{stats:?}");
    assert!(
        stats.claim_failures <= 1 + (2 * SAMPLES + 2) / 16,
        "{stats:?}"
    );

    // The key limit: 3 keys used above (counter, histogram, span name); "rows" was
    // never interned because the span was dropped.
    assert_eq!(stats.keys, 3);
    let mut handles = Vec::new();
    for i in 0..MAX_KEYS {
        handles.push(Counter::new(&format!("absent.extra{i}"), &[]));
    }
    assert_eq!(nexus_metrics::stats().keys, MAX_KEYS);
    assert!(handles[..5].iter().all(|h| h.key().is_some()));
    assert!(
        handles[5..].iter().all(|h| h.key().is_none()),
        "past the limit: no-ops"
    );
    assert_eq!(
        Counter::try_new("absent.one_more", &[]),
        Err(KeyError::Limit { max_keys: MAX_KEYS })
    );
    // Existing names still resolve to their keys.
    assert!(Counter::try_new("absent.extra0", &[]).is_ok());

    std::thread::spawn(move || {
        for h in &handles[5..] {
            h.increment(1);
        }
        counter!("bad name=").increment(1);
        Counter::noop().increment(1);
    })
    .join()
    .expect("no-op handles must not panic");
    let stats = nexus_metrics::stats();
    assert_eq!(stats.dropped(DropReason::KeyLimit), 3);
    assert_eq!(stats.dropped(DropReason::Invalid), 1);
    assert_eq!(
        stats.dropped_total(),
        SAMPLES + 2 + 3 + 1,
        "an explicit no-op counts nothing"
    );
}
