//! A child process forked after the library was used inherits its parent's rings and
//! connection. Its first record must not land in the parent's ring (a second writer
//! would corrupt it) and it must not write the parent's held-back counter increments
//! again: it connects on its own, gets its own ring and starts from nothing. A span the
//! parent had open at the fork ends in the parent's ring once, from the parent: the
//! child's copy of its guard ends nowhere and is counted as dropped.
#![expect(
    unsafe_code,
    reason = "fork(), waitpid() and _exit() around the test's child"
)]

mod common;

use std::time::Duration;

use common::{Server, counter_totals, install_with_fast_reconnect, watchdog};
use nexus_metrics::{DropReason, Span, counter, span};
use telemetry_abi::{RecordKind, RegisterKind};

const NAME: &str = "fork.requests";
const SPAN: &str = "fork.work";
/// Increments the parent makes before the fork: more than its 64-record ring holds,
/// so some are held back as a pending delta when it forks.
const PARENT: u64 = 200;
const CHILD: u64 = 1000;

/// The child's whole life: ends its copy of the parent's open span, makes one increment
/// of `CHILD`, writes it out, then `_exit`s.
fn child(span: Span) -> ! {
    let ok = std::panic::catch_unwind(move || {
        drop(span);
        counter!(NAME).increment(CHILD);
        let flushed = nexus_metrics::flush_for(Duration::from_secs(5));
        let stats = nexus_metrics::stats();
        // The parent had dropped nothing; the span's end, with no ring of the
        // parent's to go to, is the child's one drop.
        flushed
            && nexus_metrics::forks() == 1
            && stats.dropped_total() == 1
            && stats.dropped(DropReason::NoMetricsd) == 1
    });
    // SAFETY: `_exit` ends the child at once, without running the parent's atexit
    // handlers or the test harness's teardown in this copy of the process.
    unsafe { libc::_exit(if matches!(ok, Ok(true)) { 0 } else { 1 }) }
}

#[test]
fn a_forked_child_records_into_a_ring_of_its_own() {
    let _dog = watchdog(Duration::from_secs(30));
    let (_dir, path) = install_with_fast_reconnect();
    let server = Server::start(&path, 64);

    // The parent opens a span, then fills its ring without a drain, so the rest of
    // its increments wait as a pending delta.
    let open = span!(SPAN);
    for _ in 0..PARENT {
        counter!(NAME).increment(1);
    }
    let before = nexus_metrics::stats();
    assert!(before.coalesced > 0, "some increments wait: {before:?}");
    assert_eq!(before.dropped_total(), 0, "nothing dropped: {before:?}");
    assert_eq!(nexus_metrics::forks(), 0);

    // SAFETY: the child runs only `child()`, which touches the library and exits
    // with `_exit`; nothing it inherits is unwound or dropped twice.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        child(open);
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked; `status` is a valid out-pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child recorded and flushed, dropping only the span's end (status {status:#x})"
    );

    // The parent writes what it held back, now that the server drained its ring, and
    // ends its span.
    server.drain();
    drop(open);
    assert!(nexus_metrics::flush_for(Duration::from_secs(5)));
    server.drain();
    assert_eq!(
        counter_totals(&server, NAME),
        [PARENT, CHILD],
        "the parent's ring has exactly the parent's increments, the child's its own"
    );
    let span_records = server.with_rings(|rings| {
        rings
            .iter()
            .map(|r| {
                let Some(key) = r.key_of(RegisterKind::SPAN, SPAN) else {
                    return (0, 0);
                };
                let records = r.records_of(key);
                let count = |kind| records.iter().filter(|rec| rec.kind == kind).count();
                (count(RecordKind::SPAN_OPEN), count(RecordKind::SPAN_CLOSE))
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(
        span_records,
        [(1, 1), (0, 0)],
        "the span started and ended once, in the parent's ring; none in the child's"
    );
    assert_eq!(
        nexus_metrics::stats().dropped_total(),
        0,
        "the parent lost nothing"
    );
    assert_eq!(server.connections(), 2, "the child connected on its own");
    assert_eq!(nexus_metrics::forks(), 0, "the parent is not a child");
}
