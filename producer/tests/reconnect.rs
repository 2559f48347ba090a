//! metricsd goes away and comes back: the producer notices without a syscall on its
//! hot path (a watcher thread sees the hang-up and bumps the ring generation), drops
//! its dead ring, reconnects with backoff and registers its keys in the new ring.
//! A ring metricsd closes is noticed when it fills, and replaced over the same
//! connection.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Server, install_with_fast_reconnect, wait_until, watchdog};
use nexus_metrics::{DropReason, RegisterKind, counter};

const LIMIT: Duration = Duration::from_secs(10);

/// Whether some ring of `server` registered `name` and carries records for it.
fn has_samples(server: &Server, min_rings: usize) -> bool {
    server.with_rings(|rings| {
        rings.len() >= min_rings
            && rings[min_rings - 1..].iter().any(|r| {
                r.key_of(RegisterKind::COUNTER, "rc.requests")
                    .is_some_and(|k| r.registered_before_use(k) && !r.records_of(k).is_empty())
            })
    })
}

#[test]
fn producer_reconnects_after_metricsd_restarts_and_reclaims_closed_rings() {
    let _dog = watchdog(Duration::from_secs(40));
    let (_dir, path) = install_with_fast_reconnect();
    let mut first = Server::start(&path, 64);

    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                counter!("rc.requests").increment(1);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };

    // 1. The first metricsd sees the producer.
    wait_until(LIMIT, "samples at the first server", || {
        has_samples(&first, 1)
    });
    assert_eq!(first.connections(), 1);

    // 2. It dies; for a while nobody listens; a new one starts at the same path.
    assert_eq!(nexus_metrics::generation(), 0);
    first.stop();
    std::thread::sleep(Duration::from_millis(30));
    let second = Server::start(&path, 64);
    wait_until(LIMIT, "samples at the restarted server", || {
        has_samples(&second, 1)
    });
    assert_eq!(
        second.connections(),
        1,
        "a new connection to the new metricsd"
    );
    assert_eq!(second.rings(), 1);
    // The watcher retired generation 0 (a claim that reached the dying listener's
    // backlog may have retired one more).
    assert!(nexus_metrics::generation() >= 1);

    // 3. The new metricsd closes the ring (drops its reader): once the ring fills,
    //    the producer sees it abandoned and claims another over the same connection.
    let ring_id = second.with_rings(|rings| rings[0].ring_id);
    second.close_ring(ring_id);
    wait_until(LIMIT, "a second ring from the same connection", || {
        has_samples(&second, 2)
    });
    assert_eq!(second.connections(), 1);

    stop.store(true, Ordering::Relaxed);
    producer.join().expect("producer");
    let stats = nexus_metrics::stats();
    assert_eq!(stats.rings_claimed, 3, "{stats:?}");
    assert!(
        stats.held > 0,
        "increments made while nobody listened were held for the next ring: {stats:?}"
    );
    assert_eq!(stats.dropped(DropReason::NoMetricsd), 0, "{stats:?}");
    assert_eq!(
        second.messages(),
        2,
        "one grant request per ring, nothing else"
    );
    // The first server's ring, never closed, was offered back; this server keeps no
    // log and refused it (a metricsd with a write-ahead log finishes it).
    assert!(second.returns() >= 1);
}
