//! Spans: the live table, completion, expiry, orphans, and the per-interval export
//! ranking.
//!
//! Ids: a producer numbers its spans per ring (nonzero, no randomness). metricsd makes
//! them global by pairing them with the ring's id: a [`GlobalId`] is `(ring, local)`,
//! exported as 32 hex digits (16 for the ring, 16 for the local id). A span's trace id
//! is its root's global id: a root (parent 0) starts a trace, a child inherits its
//! parent's trace through the live table. A child whose parent is not open (already
//! ended, expired, or never seen) keeps the parent link, and its trace id is the
//! parent's global id.
//!
//! Bounds: at most `spans.max_live` open spans (past it a start is refused
//! `over_limit`), each with at most `spans.max_attrs` attributes; a span open longer than
//! `spans.ttl_ms` (metricsd's clock, from when its start was drained) is expired. Spans
//! open in a ring whose producer disconnected are orphaned. Expired and orphaned spans
//! are reported like completed ones, with their outcome.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use telemetry_abi::SpanStatus;

use crate::aggregate::SeriesId;
use crate::health::Reason;

/// A span's global id: the ring's id and the producer's per-ring id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GlobalId {
    /// The ring (metricsd's id, as in the grant response).
    pub ring: u32,
    /// The producer's id within the ring.
    pub local: u64,
}

impl fmt::Display for GlobalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.ring, self.local)
    }
}

/// How a reported span ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The producer ended it with this status.
    Ended(SpanStatus),
    /// Its producer disconnected while it was open.
    Orphaned,
    /// It stayed open longer than the TTL.
    Expired,
}

impl Outcome {
    /// The exported `status`: `unset`, `ok`, `error`, `orphaned` or `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ended(s) => s.name().unwrap_or("unset"),
            Self::Orphaned => "orphaned",
            Self::Expired => "expired",
        }
    }

    fn urgent(self) -> bool {
        !matches!(
            self,
            Self::Ended(SpanStatus::OK) | Self::Ended(SpanStatus::UNSET)
        )
    }
}

/// A span reported for export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinishedSpan {
    /// The producer's service.
    pub service: Arc<str>,
    /// The span's name.
    pub name: Arc<str>,
    /// Its trace.
    pub trace: GlobalId,
    /// Itself.
    pub id: GlobalId,
    /// Its parent, if not a root.
    pub parent: Option<GlobalId>,
    /// Start, producer's `CLOCK_MONOTONIC` ns.
    pub start_ns: u64,
    /// End, producer's `CLOCK_MONOTONIC` ns (`None` when orphaned or expired).
    pub end_ns: Option<u64>,
    /// How it ended.
    pub outcome: Outcome,
    /// Attributes, redacted.
    pub attrs: Vec<(Arc<str>, String)>,
}

impl FinishedSpan {
    /// `end - start` when it ended.
    pub fn duration_ns(&self) -> Option<u64> {
        self.end_ns.map(|e| e.saturating_sub(self.start_ns))
    }

    fn rank(&self) -> (bool, u64) {
        (self.outcome.urgent(), self.duration_ns().unwrap_or(0))
    }
}

struct Ranked(FinishedSpan, u64);

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        // More urgent, then slower, then earlier seen (lower sequence) ranks higher.
        self.0
            .rank()
            .cmp(&other.0.rank())
            .then(other.1.cmp(&self.1))
    }
}

#[derive(Debug)]
struct Live {
    service: Arc<str>,
    name_key: u32,
    name: Arc<str>,
    duration: Option<SeriesId>,
    trace: GlobalId,
    parent: Option<GlobalId>,
    start_ns: u64,
    opened: Instant,
    attrs: Vec<(Arc<str>, String)>,
}

/// Running totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpanStats {
    /// Spans open now.
    pub live: u64,
    /// Spans started.
    pub started: u64,
    /// Spans ended by their producer.
    pub ended: u64,
    /// Spans orphaned by a disconnect.
    pub orphaned: u64,
    /// Spans expired by the TTL.
    pub expired: u64,
    /// Reported spans left out of an export by the per-interval budget.
    pub not_exported: u64,
}

/// A completed span and the duration series to observe it in.
pub struct Completed {
    /// The duration histogram of its name, if the caps gave it one.
    pub duration_series: Option<SeriesId>,
    /// The duration.
    pub duration_ns: u64,
}

/// The span tables.
pub struct Spans {
    live: HashMap<(u32, u64), Live>,
    max_live: usize,
    ttl: Duration,
    max_attrs: usize,
    budget: usize,
    ranked: BinaryHeap<Reverse<Ranked>>,
    seq: u64,
    skipped_this_interval: u64,
    stats: SpanStats,
}

impl fmt::Debug for Spans {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spans")
            .field("live", &self.live.len())
            .field("stats", &self.stats)
            .finish()
    }
}

/// The start of a span, as validated by the drain loop.
pub struct Start {
    /// The ring.
    pub ring: u32,
    /// The producer's id (nonzero).
    pub id: u64,
    /// The parent's id (0: a root).
    pub parent: u64,
    /// The registered name key.
    pub name_key: u32,
    /// The name.
    pub name: Arc<str>,
    /// The duration histogram.
    pub duration: Option<SeriesId>,
    /// The producer's start time.
    pub start_ns: u64,
    /// The service.
    pub service: Arc<str>,
}

impl Spans {
    /// Tables with these bounds; `budget` spans are exported per interval.
    pub fn new(max_live: u32, ttl: Duration, max_attrs: u32, budget: u32) -> Self {
        Self {
            live: HashMap::new(),
            max_live: max_live as usize,
            ttl,
            max_attrs: max_attrs as usize,
            budget: budget as usize,
            ranked: BinaryHeap::new(),
            seq: 0,
            skipped_this_interval: 0,
            stats: SpanStats::default(),
        }
    }

    /// Opens a span.
    pub fn start(&mut self, s: Start, now: Instant) -> Result<(), Reason> {
        let key = (s.ring, s.id);
        if self.live.contains_key(&key) {
            return Err(Reason::SpanDuplicate);
        }
        if self.live.len() >= self.max_live {
            return Err(Reason::LiveSpansFull);
        }
        let own = GlobalId {
            ring: s.ring,
            local: s.id,
        };
        let (trace, parent) = if s.parent == 0 {
            (own, None)
        } else {
            let parent = GlobalId {
                ring: s.ring,
                local: s.parent,
            };
            let trace = self
                .live
                .get(&(s.ring, s.parent))
                .map_or(parent, |p| p.trace);
            (trace, Some(parent))
        };
        self.live.insert(
            key,
            Live {
                service: s.service,
                name_key: s.name_key,
                name: s.name,
                duration: s.duration,
                trace,
                parent,
                start_ns: s.start_ns,
                opened: now,
                attrs: Vec::new(),
            },
        );
        self.stats.started += 1;
        self.stats.live = self.live.len() as u64;
        Ok(())
    }

    /// Adds an attribute (already redacted) to an open span.
    pub fn attr(&mut self, ring: u32, id: u64, key: Arc<str>, value: String) -> Result<(), Reason> {
        let Some(span) = self.live.get_mut(&(ring, id)) else {
            return Err(Reason::SpanUnknown);
        };
        if span.attrs.len() >= self.max_attrs {
            return Err(Reason::AttrsFull);
        }
        span.attrs.push((key, value));
        Ok(())
    }

    /// Ends an open span.
    pub fn end(
        &mut self,
        ring: u32,
        id: u64,
        name_key: u32,
        status: SpanStatus,
        end_ns: u64,
    ) -> Result<Completed, Reason> {
        let key = (ring, id);
        match self.live.get(&key) {
            None => return Err(Reason::SpanUnknown),
            Some(l) if l.name_key != name_key => return Err(Reason::SpanNameMismatch),
            Some(_) if status.name().is_none() => return Err(Reason::SpanStatus),
            Some(_) => {}
        }
        let Some(live) = self.live.remove(&key) else {
            return Err(Reason::SpanUnknown);
        };
        self.stats.live = self.live.len() as u64;
        if end_ns < live.start_ns {
            // Ended, but meaninglessly: the span is closed and the end refused.
            return Err(Reason::SpanEndBeforeStart);
        }
        self.stats.ended += 1;
        let done = Completed {
            duration_series: live.duration,
            duration_ns: end_ns - live.start_ns,
        };
        self.report(finish(live, ring, id, Some(end_ns), Outcome::Ended(status)));
        Ok(done)
    }

    /// Reports every span still open in `ring` as orphaned; returns how many.
    pub fn orphan_ring(&mut self, ring: u32) -> u64 {
        let keys: Vec<(u32, u64)> = self.live.keys().filter(|k| k.0 == ring).copied().collect();
        for key in &keys {
            if let Some(live) = self.live.remove(key) {
                self.report(finish(live, key.0, key.1, None, Outcome::Orphaned));
            }
        }
        self.stats.orphaned += keys.len() as u64;
        self.stats.live = self.live.len() as u64;
        keys.len() as u64
    }

    /// Expires spans open longer than the TTL; returns how many.
    pub fn expire(&mut self, now: Instant) -> u64 {
        let ttl = self.ttl;
        let keys: Vec<(u32, u64)> = self
            .live
            .iter()
            .filter(|(_, l)| now.saturating_duration_since(l.opened) > ttl)
            .map(|(k, _)| *k)
            .collect();
        for key in &keys {
            if let Some(live) = self.live.remove(key) {
                self.report(finish(live, key.0, key.1, None, Outcome::Expired));
            }
        }
        self.stats.expired += keys.len() as u64;
        self.stats.live = self.live.len() as u64;
        keys.len() as u64
    }

    fn report(&mut self, span: FinishedSpan) {
        self.seq += 1;
        let ranked = Reverse(Ranked(span, self.seq));
        if self.ranked.len() < self.budget {
            self.ranked.push(ranked);
            return;
        }
        self.skipped_this_interval += 1;
        self.stats.not_exported += 1;
        if let Some(lowest) = self.ranked.peek() {
            if ranked < *lowest {
                // `Reverse`: less means ranks higher than the lowest kept.
                self.ranked.pop();
                self.ranked.push(ranked);
            }
        }
    }

    /// The spans to export this interval, most important first, and how many reported
    /// spans were left out by the budget; starts the next interval.
    pub fn take_interval(&mut self) -> (Vec<FinishedSpan>, u64) {
        let mut spans: Vec<Ranked> = std::mem::take(&mut self.ranked)
            .into_iter()
            .map(|Reverse(r)| r)
            .collect();
        spans.sort_by(|a, b| b.cmp(a));
        let skipped = std::mem::take(&mut self.skipped_this_interval);
        (spans.into_iter().map(|r| r.0).collect(), skipped)
    }

    /// Running totals.
    pub fn stats(&self) -> SpanStats {
        self.stats
    }
}

fn finish(live: Live, ring: u32, id: u64, end_ns: Option<u64>, outcome: Outcome) -> FinishedSpan {
    FinishedSpan {
        service: live.service,
        name: live.name,
        trace: live.trace,
        id: GlobalId { ring, local: id },
        parent: live.parent,
        start_ns: live.start_ns,
        end_ns,
        outcome,
        attrs: live.attrs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(ring: u32, id: u64, parent: u64, t: u64) -> Start {
        Start {
            ring,
            id,
            parent,
            name_key: 1,
            name: Arc::from("op"),
            duration: None,
            start_ns: t,
            service: Arc::from("web"),
        }
    }

    #[test]
    fn traces_follow_parents_and_budget_keeps_errors_then_slowest() {
        let now = Instant::now();
        let mut s = Spans::new(10, Duration::from_secs(60), 8, 2);
        s.start(start(1, 1, 0, 100), now).expect("root");
        s.start(start(1, 2, 1, 110), now).expect("child");
        s.start(start(1, 3, 99, 120), now).expect("orphan parent");
        assert_eq!(
            s.start(start(1, 3, 0, 0), now).err(),
            Some(Reason::SpanDuplicate)
        );
        let d = s.end(1, 2, 1, SpanStatus::OK, 150).expect("ends");
        assert_eq!(d.duration_ns, 40);
        assert_eq!(
            s.end(1, 1, 2, SpanStatus::OK, 1).err(),
            Some(Reason::SpanNameMismatch)
        );
        s.end(1, 1, 1, SpanStatus::OK, 1100).expect("ends");
        s.end(1, 3, 1, SpanStatus::ERROR, 121).expect("ends");
        let (spans, skipped) = s.take_interval();
        assert_eq!(skipped, 1);
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].outcome, Outcome::Ended(SpanStatus::ERROR));
        assert_eq!(spans[0].trace, GlobalId { ring: 1, local: 99 });
        assert_eq!(spans[1].id.local, 1, "the slowest ok span");
        assert_eq!(spans[1].trace, spans[1].id);
        assert_eq!(s.stats().not_exported, 1);
        assert_eq!(
            GlobalId { ring: 1, local: 2 }.to_string(),
            "00000000000000010000000000000002"
        );
    }

    #[test]
    fn orphans_expiry_and_caps() {
        let now = Instant::now();
        let mut s = Spans::new(2, Duration::from_millis(10), 1, 10);
        s.start(start(1, 1, 0, 0), now).expect("fits");
        s.start(start(2, 1, 0, 0), now).expect("fits");
        assert_eq!(
            s.start(start(2, 2, 0, 0), now).err(),
            Some(Reason::LiveSpansFull)
        );
        s.attr(1, 1, Arc::from("k"), "v".into()).expect("fits");
        assert_eq!(
            s.attr(1, 1, Arc::from("k2"), "v".into()).err(),
            Some(Reason::AttrsFull)
        );
        assert_eq!(s.orphan_ring(1), 1);
        assert_eq!(s.expire(now + Duration::from_millis(11)), 1);
        let (spans, _) = s.take_interval();
        let outcomes: Vec<_> = spans.iter().map(|x| x.outcome).collect();
        assert!(outcomes.contains(&Outcome::Orphaned) && outcomes.contains(&Outcome::Expired));
        assert_eq!(s.stats().live, 0);
    }
}
