//! A metricsd that dies without closing its rings gives a producer thread no account of
//! what it left unread. The thread keeps such a ring as retired, waiting for a close
//! that never comes; when a newer ring retires, or the thread exits, it lets the old one
//! go and counts the records its consumer never read as unconfirmed: neither dropped
//! (a slow last drain might still read them) nor resent (which could count them twice),
//! but not silent either.

mod common;

use std::time::Duration;

use common::{Server, counter_total, install_with_fast_reconnect, wait_until, watchdog};
use nexus_metrics::counter;

const LIMIT: Duration = Duration::from_secs(10);
const NAME: &str = "cw.requests";

/// The counter increments `server` read for `NAME`, over all its rings.
fn total(server: &Server) -> u64 {
    counter_total(server, NAME)
}

/// Stops `server` the way a crash looks to a producer: the connection drops and the
/// rings are never closed (the server's readers stay alive, unread), then waits until
/// the library has seen the hang-up.
fn crash(server: &mut Server, generation: u64) {
    server.stop();
    wait_until(LIMIT, "the hang-up to be seen", || {
        nexus_metrics::generation() >= generation
    });
}

#[test]
fn records_left_in_rings_of_a_crashed_metricsd_are_counted_unconfirmed() {
    let _dog = watchdog(Duration::from_secs(30));
    let (_dir, path) = install_with_fast_reconnect();

    // The servers outlive the producer thread: a dropped server closes its rings,
    // which is exactly what a crashed metricsd does not do.
    let mut first = Server::start(&path, 64);
    let recorder = {
        let path = path.clone();
        std::thread::spawn(move || {
            // 1. The first metricsd reads one increment, then crashes with a second
            //    one unread.
            counter!(NAME).increment(1);
            assert_eq!(total(&first), 1);
            counter!(NAME).increment(10);
            crash(&mut first, 1);

            // 2. A new metricsd: the thread's next record retires the first ring (not
            //    closed, so it waits) and claims a ring here, which reads 100 and
            //    crashes with 1000 unread.
            let mut second = Server::start(&path, 64);
            counter!(NAME).increment(100);
            assert_eq!(total(&second), 100);
            counter!(NAME).increment(1000);
            crash(&mut second, 2);

            // 3. Another one: retiring the second ring gives up the first, whose one
            //    unread record is now counted.
            let third = Server::start(&path, 64);
            let before = nexus_metrics::stats().unconfirmed;
            counter!(NAME).increment(5);
            assert_eq!(total(&third), 5);
            assert_eq!(
                nexus_metrics::stats().unconfirmed - before,
                1,
                "the first ring's unread increment"
            );
            (first, second, third)
        })
    };
    // 4. The thread exits holding the second ring as retired: its one unread record
    //    is counted then.
    let (first, second, third) = recorder.join().expect("the recording thread");

    let stats = nexus_metrics::stats();
    assert_eq!(stats.unconfirmed, 2, "{stats:?}");
    assert_eq!(
        stats.dropped_total(),
        0,
        "nothing is claimed dropped: {stats:?}"
    );
    assert_eq!(stats.rings_claimed, 3, "{stats:?}");
    // The stopped servers' readers are still alive, so reading now finds the two
    // unconfirmed increments: the case for not counting them as dropped. They were not
    // resent either: every increment is counted exactly once.
    assert_eq!(
        [&first, &second, &third].map(total),
        [1 + 10, 100 + 1000, 5],
        "each unconfirmed increment stayed in its own ring"
    );
}
