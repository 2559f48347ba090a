//! A record made while a thread is exiting, from another thread-local's destructor,
//! after the library's own exit accounting ran: it must not claim a new ring (nothing
//! would give it back) and must not vanish. It either reaches the thread's ring (if that
//! destructor ran first) or is counted as `unavailable`, never both, never neither.

mod common;

use std::cell::Cell;
use std::time::Duration;

use common::{Server, counter_totals, install_with_fast_reconnect, watchdog};
use nexus_metrics::{DropReason, counter};

const NAME: &str = "exit.requests";

/// Records one increment of 1000 when the thread's thread-locals are destroyed.
struct RecordsOnExit(Cell<bool>);

impl Drop for RecordsOnExit {
    fn drop(&mut self) {
        if self.0.get() {
            counter!(NAME).increment(1000);
        }
    }
}

thread_local! {
    static LATE: RecordsOnExit = const { RecordsOnExit(Cell::new(false)) };
}

#[test]
fn a_record_from_a_late_destructor_claims_no_ring_and_is_accounted_for() {
    let _dog = watchdog(Duration::from_secs(30));
    let (_dir, path) = install_with_fast_reconnect();
    let server = Server::start(&path, 64);

    std::thread::spawn(|| {
        // Registered before the library's own exit hook (the first record arms it),
        // so with destructors run newest first it runs after the exit accounting.
        LATE.with(|late| late.0.set(true));
        counter!(NAME).increment(1);
        assert!(nexus_metrics::flush_for(Duration::from_secs(5)));
    })
    .join()
    .expect("the recording thread");

    let stats = nexus_metrics::stats();
    let totals = counter_totals(&server, NAME);
    assert_eq!(server.rings(), 1, "no ring claimed at exit: {stats:?}");
    let unavailable = stats.dropped(DropReason::Unavailable);
    assert!(
        (totals == [1 + 1000] && unavailable == 0) || (totals == [1] && unavailable == 1),
        "the late increment arrived or was counted, once: totals {totals:?}, {stats:?}"
    );
    println!("late record: totals {totals:?}, unavailable {unavailable}");
}
