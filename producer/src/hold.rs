//! State held while a thread has no ring: counter increments and gauge sets wait per
//! key in the thread's key table and are delivered when a ring is claimed again.
//!
//! Without a ring (metricsd not running, unreachable, or refusing rings) a record has
//! nowhere to go. Counters and gauges are state, not events: the sum of increments and
//! the last value set are all a later reader needs. So the thread keeps them where it
//! already keeps pending counter deltas for a full ring: the key table, one word per
//! key (a delta, or the gauge's last value with a flag bit). The table is the one the
//! thread's rings use, allocated once on the first cold path (the same allocation a
//! claim makes), bounded by the process's key limit; holding a record writes one word
//! and never blocks. When a ring is claimed, the held words are written into it ahead
//! of the thread's next record (or by `flush()`), counters as one coalesced increment
//! per key and gauges as one set of the last value.
//!
//! Histogram observations and span records are events: they are dropped and counted
//! (`Stats::dropped`), as before. A thread that exits while still holding state counts
//! it as dropped (`no_metricsd`, one record per key) and the counter increments in
//! `Stats::lost_increments`: call `flush_for` before a thread ends to make sure.

use crate::local::{Local, Op};
use crate::stats::DropReason;

/// Holds `op`'s state for a thread without a ring, which it has for `reason`. True:
/// held (it will be delivered by a later ring); false: the caller counts it dropped.
pub(crate) fn hold(local: &mut Local, op: impl Op, reason: DropReason) -> bool {
    match reason {
        // No ring from metricsd (absent, unreachable, or refusing): hold.
        DropReason::NoMetricsd | DropReason::OverLimit | DropReason::Refused => {}
        // The thread's exit accounting has run: nothing may be allocated or held.
        _ => return false,
    }
    match local.ringless_table() {
        Some(table) => op.hold(table),
        None => false,
    }
}
