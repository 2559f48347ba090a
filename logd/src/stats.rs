//! STATS: the counters logd reports.

use crate::status::Reject;

/// Reject counters, one per class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RejectCounts {
    /// `invalid_args` rejects.
    pub invalid_args: u64,
    /// `over_limit` rejects.
    pub over_limit: u64,
    /// `rate_limited` rejects.
    pub rate_limited: u64,
    /// `internal` failures (disk journal errors).
    pub internal: u64,
    /// `denied` queries (`query_without_acl`: records the peer's uid may not read).
    pub denied: u64,
}

impl RejectCounts {
    /// Adds `n` to the class's counter.
    pub fn add(&mut self, class: Reject, n: u64) {
        let c = match class {
            Reject::InvalidArgs => &mut self.invalid_args,
            Reject::OverLimit => &mut self.over_limit,
            Reject::RateLimited => &mut self.rate_limited,
            Reject::Internal => &mut self.internal,
            Reject::Denied => &mut self.denied,
        };
        *c = c.saturating_add(n);
    }

    /// The counter of one class.
    pub fn get(&self, class: Reject) -> u64 {
        match class {
            Reject::InvalidArgs => self.invalid_args,
            Reject::OverLimit => self.over_limit,
            Reject::RateLimited => self.rate_limited,
            Reject::Internal => self.internal,
            Reject::Denied => self.denied,
        }
    }

    /// Adds every counter of `other`.
    pub fn merge(&mut self, other: &RejectCounts) {
        self.invalid_args = self.invalid_args.saturating_add(other.invalid_args);
        self.over_limit = self.over_limit.saturating_add(other.over_limit);
        self.rate_limited = self.rate_limited.saturating_add(other.rate_limited);
        self.internal = self.internal.saturating_add(other.internal);
        self.denied = self.denied.saturating_add(other.denied);
    }
}

/// Counters of one sender.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SenderStats {
    /// Service name (policy).
    pub service: String,
    /// The process, when budgets are per process (`quota.key = "process"`); `None` when
    /// budgets are per service.
    pub pid: Option<u32>,
    /// User id of the sender.
    pub uid: u32,
    /// Connections open now.
    pub connections: u32,
    /// Records stored.
    pub accepted: u64,
    /// Records held in the in-memory journal now.
    pub held_records: u64,
    /// Bytes held in the in-memory journal now.
    pub held_bytes: u64,
    /// Of this sender's records, how many were evicted to make room.
    pub evicted: u64,
    /// Rejects, per class (a refused record counts 1; a refused frame counts 1).
    pub rejected: RejectCounts,
}

/// The on-disk journal's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiskStats {
    /// Whether a journal directory is configured.
    pub enabled: bool,
    /// Bytes in segment files now.
    pub bytes: u64,
    /// Segment files now.
    pub segments: u64,
    /// Records recovered at startup.
    pub recovered: u64,
    /// Torn or corrupt records skipped at startup.
    pub corrupt_skipped: u64,
    /// Write or sync failures since startup.
    pub errors: u64,
}

/// Everything STATS returns.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Milliseconds since this logd started.
    pub uptime_ms: u64,
    /// Connections open now.
    pub connections: u32,
    /// Records stored since start.
    pub accepted: u64,
    /// Records evicted from the in-memory journal to make room.
    pub evicted: u64,
    /// Rejects per class, all senders together (including senders no longer listed).
    pub rejected: RejectCounts,
    /// Records held in the in-memory journal.
    pub journal_records: u64,
    /// Bytes held in the in-memory journal.
    pub journal_bytes: u64,
    /// The id the next stored record will get.
    pub next_id: u64,
    /// On-disk journal.
    pub disk: DiskStats,
    /// Per sender (bounded by `max_senders`; senders with no connection are folded into
    /// the totals when room is needed).
    pub senders: Vec<SenderStats>,
}
