//! A graceful metricsd restart hangs up on a producer before its last drain of the
//! producer's rings and closes them after it. A thread that notices the hang-up in
//! between lets go of its ring while the ring is still open, so the records it wrote
//! after the last drain's look at the write position cannot be accounted for yet. The
//! thread keeps the ring as retired and, once metricsd closes it, sends the counter
//! increments it finds unread to the new ring: the total stays exact.

mod common;

use std::time::Duration;

use common::{Server, counter_total, install_with_fast_reconnect, wait_until, watchdog};
use nexus_metrics::{DropReason, counter};

const LIMIT: Duration = Duration::from_secs(10);
const NAME: &str = "rw.requests";

/// The counter increments `server` read for `NAME`, over all its rings.
fn total(server: &Server) -> u64 {
    counter_total(server, NAME)
}

#[test]
fn increments_left_in_a_ring_released_before_it_closed_reach_the_next_ring() {
    let _dog = watchdog(Duration::from_secs(30));
    let (_dir, path) = install_with_fast_reconnect();
    let mut first = Server::start(&path, 64);

    // 1. Three increments, drained by the first metricsd: its last look at the ring.
    for _ in 0..3 {
        counter!(NAME).increment(1);
    }
    assert_eq!(total(&first), 3);
    let first_ring = first.with_rings(|rings| rings[0].ring_id);

    // 2. Two more land after that look, then metricsd hangs up without closing the
    //    ring yet (its reader is still alive), and a new one starts.
    counter!(NAME).increment(10);
    counter!(NAME).increment(100);
    first.stop();
    wait_until(LIMIT, "the hang-up to retire generation 0", || {
        nexus_metrics::generation() >= 1
    });
    let second = Server::start(&path, 64);

    // 3. The next increment finds its ring stale: the thread lets go of it (still
    //    open: it cannot tell what was read) and claims one from the new metricsd.
    counter!(NAME).increment(1000);
    assert_eq!(second.rings(), 1, "a ring from the new metricsd");
    assert_eq!(total(&second), 1000);

    // 4. The old metricsd closes the ring after its last drain, which never read the
    //    two increments. The thread's next cold path (here `flush`) finds the retired
    //    ring closed and sends them on.
    first.close_ring(first_ring);
    assert!(nexus_metrics::flush(), "nothing left owed");
    assert_eq!(total(&first), 3, "the old metricsd read no more");
    assert_eq!(
        total(&second),
        1000 + 10 + 100,
        "the unread increments reach the new ring"
    );
    let stats = nexus_metrics::stats();
    assert_eq!(stats.dropped(DropReason::NoMetricsd), 0, "{stats:?}");
}
