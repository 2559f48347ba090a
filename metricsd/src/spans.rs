//! Spans: the live table, completion, expiry, orphans, and the export rate limit.
//!
//! Ids are W3C Trace Context ids: a 128-bit trace id and a 64-bit span id.
//!
//! - ABI v1.1 producers choose them (unique across processes, machines and restarts)
//!   and write them in `span_trace` + `span_open`; a span is known by its producer
//!   connection and its span id, so it may be closed (and given attributes) from any
//!   ring of that connection: a span that ends on another thread. A close or attribute
//!   that arrives before its open (the rings are drained one after another) is held,
//!   at most [`MAX_EARLY`] of them, for up to the TTL.
//! - ABI v1.0 producers number spans per ring. metricsd derives a 64-bit span id from
//!   (a seed random per metricsd run, the ring, the per-ring id) through a bijective
//!   mixer, and a trace id: a root starts a trace, a child inherits its parent's trace
//!   through the live table, and a child whose parent is not open gets a trace id
//!   derived from the parent's.
//!
//! Bounds: at most `spans.max_live` open spans (past it a start is refused
//! `over_limit`), each with at most `spans.max_attrs` attributes; a span open longer than
//! `spans.ttl_ms` (metricsd's clock, from when its start was drained) is expired. Spans
//! open on a connection whose producer disconnected are orphaned. Expired and orphaned
//! spans are reported like completed ones, with their outcome.
//!
//! Late attributes: a v1.1 span's attribute may be written in one ring (the thread
//! that opened it) and its close in another (the thread it moved to), and the close
//! may be drained first. An attribute for a span that completed since the last export
//! is added to the completed span while it waits to be exported, so it is not lost.
//!
//! Export: every reported span is exported unless the rate limit
//! (`export.spans_per_second`, a token bucket holding one second's worth) is exhausted;
//! what it drops is counted by reason ([`SpanStats::rate_limited`]). The span-duration
//! histograms are fed on completion, whether or not the span is exported.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use telemetry_abi::SpanStatus;

use crate::aggregate::SeriesId;
use crate::health::Reason;

/// Closes and attributes held for spans whose open has not been drained yet.
pub const MAX_EARLY: usize = 4096;

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
}

/// A span reported for export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinishedSpan {
    /// The producer's service.
    pub service: Arc<str>,
    /// The span's name.
    pub name: Arc<str>,
    /// Its trace (nonzero).
    pub trace_id: u128,
    /// Itself (nonzero).
    pub span_id: u64,
    /// Its parent (0: the root of its trace).
    pub parent_id: u64,
    /// W3C trace flags.
    pub flags: u8,
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
}

/// 32 lowercase hex digits.
pub fn trace_hex(id: u128) -> String {
    format!("{id:032x}")
}

/// 16 lowercase hex digits.
pub fn span_hex(id: u64) -> String {
    format!("{id:016x}")
}

#[derive(Debug)]
struct Live {
    service: Arc<str>,
    name_key: u32,
    name: Arc<str>,
    duration: Option<SeriesId>,
    trace_id: u128,
    span_id: u64,
    parent_id: u64,
    flags: u8,
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
    /// Reported spans handed to the exporters.
    pub exported: u64,
    /// Reported spans dropped by the export rate limit.
    pub rate_limited: u64,
    /// Exported spans appended to logd.
    pub logged: u64,
    /// Exported spans past logd's span rate (still exported over OTLP).
    pub not_logged: u64,
    /// Closes and attributes held now for spans whose open was not drained yet.
    pub early: u64,
}

/// A completed span and the duration series to observe it in.
pub struct Completed {
    /// The duration histogram of its name, if the caps gave it one.
    pub duration_series: Option<SeriesId>,
    /// The duration.
    pub duration_ns: u64,
}

/// Where a span's ids live: a v1.1 span is known by its connection, a v1.0 span by
/// its ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// A v1.0 span: the ring, ids per ring.
    Ring(u32),
    /// A v1.1 span: the producer's control connection, trace-global ids.
    Connection(u64),
}

/// A close or attribute that arrived before its span's open.
#[derive(Debug)]
enum Early {
    Close {
        name_key: u32,
        status: SpanStatus,
        end_ns: u64,
    },
    Attr(Arc<str>, String),
}

/// The tables' hasher: foldhash, seeded at random per table. Span ids are the
/// producer's, so a table keyed by them needs a seed a producer cannot know; the
/// standard library's SipHash has one too but cost about a third of each span's work
/// (three lookups of a 24-byte key per span).
type TableHasher = foldhash::fast::RandomState;

/// The span tables.
pub struct Spans {
    live: HashMap<(Scope, u64), Live, TableHasher>,
    early: HashMap<(Scope, u64), (Instant, Vec<Early>), TableHasher>,
    early_len: usize,
    max_live: usize,
    ttl: Duration,
    max_attrs: usize,
    seed: u64,
    rate: f64,
    tokens: f64,
    refilled: Instant,
    logd: Bucket,
    ready: Vec<FinishedSpan>,
    /// Where in `ready` each v1.1 span completed since the last export is, for its
    /// late attributes (as many entries as `ready` at most).
    recent: HashMap<(Scope, u64), usize, TableHasher>,
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
    /// Where its ids live.
    pub scope: Scope,
    /// The span id (nonzero): trace-global (v1.1) or per ring (v1.0).
    pub id: u64,
    /// The parent's id (0: a root), in the same form.
    pub parent: u64,
    /// The trace (v1.1; `None` for v1.0, derived here) and its W3C flags.
    pub trace: Option<(u128, u8)>,
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

/// A bijection on u64 (the splitmix64 finalizer).
const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Spans {
    /// Tables with these bounds, exporting at most `per_second` spans a second
    /// (bursts of one second's worth).
    pub fn new(max_live: u32, ttl: Duration, max_attrs: u32, per_second: u32) -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        Self {
            live: HashMap::default(),
            early: HashMap::default(),
            early_len: 0,
            max_live: max_live as usize,
            ttl,
            max_attrs: max_attrs as usize,
            seed: h.finish(),
            rate: f64::from(per_second),
            tokens: f64::from(per_second),
            refilled: Instant::now(),
            logd: Bucket::new(u32::MAX),
            ready: Vec::new(),
            recent: HashMap::default(),
            stats: SpanStats::default(),
        }
    }

    /// The exported 64-bit id of a v1.0 span numbered `local` in `ring` (nonzero for
    /// a nonzero `local`, distinct for distinct pairs below 2^40 per ring).
    fn v1_0_id(&self, ring: u32, local: u64) -> u64 {
        let raw = (u64::from(ring) << 40) ^ local;
        match mix(raw.wrapping_add(self.seed)) {
            0 => mix(self.seed) | 1,
            id => id,
        }
    }

    fn v1_0_trace(&self, ring: u32, local: u64) -> u128 {
        let id = self.v1_0_id(ring, local);
        (u128::from(mix(id ^ self.seed.rotate_left(17)) | 1) << 64) | u128::from(id)
    }

    /// Opens a span; applies any close or attributes that arrived before it.
    pub fn start(&mut self, s: Start, now: Instant) -> Result<Option<Completed>, Reason> {
        let key = (s.scope, s.id);
        let (trace_id, span_id, parent_id, flags) = match (s.scope, s.trace) {
            (Scope::Connection(_), Some((trace, flags))) => (trace, s.id, s.parent, flags),
            (Scope::Ring(ring), _) => {
                let span_id = self.v1_0_id(ring, s.id);
                if s.parent == 0 {
                    (self.v1_0_trace(ring, s.id), span_id, 0, 1)
                } else {
                    let parent_id = self.v1_0_id(ring, s.parent);
                    let trace = self
                        .live
                        .get(&(s.scope, s.parent))
                        .map_or_else(|| self.v1_0_trace(ring, s.parent), |p| p.trace_id);
                    (trace, span_id, parent_id, 1)
                }
            }
            (Scope::Connection(_), None) => return Err(Reason::SpanNoTrace),
        };
        let live = self.live.len();
        // One lookup for the duplicate check and the insert.
        let Entry::Vacant(slot) = self.live.entry(key) else {
            return Err(Reason::SpanDuplicate);
        };
        if live >= self.max_live {
            return Err(Reason::LiveSpansFull);
        }
        slot.insert(Live {
            service: s.service,
            name_key: s.name_key,
            name: s.name,
            duration: s.duration,
            trace_id,
            span_id,
            parent_id,
            flags,
            start_ns: s.start_ns,
            opened: now,
            attrs: Vec::new(),
        });
        self.stats.started += 1;
        self.stats.live = self.live.len() as u64;
        if self.early.is_empty() {
            return Ok(None);
        }
        let Some((_, early)) = self.early.remove(&key) else {
            return Ok(None);
        };
        self.early_len -= early.len();
        self.stats.early = self.early_len as u64;
        let mut done = None;
        for e in early {
            match e {
                Early::Attr(k, v) => self.attr(s.scope, s.id, k, v, now)?,
                Early::Close {
                    name_key,
                    status,
                    end_ns,
                } => done = self.end(s.scope, s.id, name_key, status, end_ns, now)?,
            }
        }
        Ok(done)
    }

    fn hold(&mut self, scope: Scope, id: u64, e: Early, now: Instant) -> Result<(), Reason> {
        if !matches!(scope, Scope::Connection(_)) || self.early_len >= MAX_EARLY {
            return Err(Reason::SpanUnknown);
        }
        self.early
            .entry((scope, id))
            .or_insert_with(|| (now, Vec::new()))
            .1
            .push(e);
        self.early_len += 1;
        self.stats.early = self.early_len as u64;
        Ok(())
    }

    /// Adds an attribute (already redacted) to an open span.
    pub fn attr(
        &mut self,
        scope: Scope,
        id: u64,
        key: Arc<str>,
        value: String,
        now: Instant,
    ) -> Result<(), Reason> {
        let Some(span) = self.live.get_mut(&(scope, id)) else {
            if let Some(done) = self
                .recent
                .get(&(scope, id))
                .and_then(|&i| self.ready.get_mut(i))
            {
                // Completed already (its close was drained first): still added.
                return add_attr(&mut done.attrs, key, value, self.max_attrs);
            }
            return self.hold(scope, id, Early::Attr(key, value), now);
        };
        add_attr(&mut span.attrs, key, value, self.max_attrs)
    }

    /// Ends an open span. `Ok(None)`: its open has not been drained yet (a v1.1 span
    /// closed on another thread); the close is held until it is.
    pub fn end(
        &mut self,
        scope: Scope,
        id: u64,
        name_key: u32,
        status: SpanStatus,
        end_ns: u64,
        now: Instant,
    ) -> Result<Option<Completed>, Reason> {
        // One lookup for the checks and the removal.
        let open = match self.live.entry((scope, id)) {
            Entry::Vacant(_) => {
                if status.name().is_none() {
                    return Err(Reason::SpanStatus);
                }
                let e = Early::Close {
                    name_key,
                    status,
                    end_ns,
                };
                self.hold(scope, id, e, now)?;
                return Ok(None);
            }
            Entry::Occupied(o) if o.get().name_key != name_key => {
                return Err(Reason::SpanNameMismatch);
            }
            Entry::Occupied(_) if status.name().is_none() => return Err(Reason::SpanStatus),
            Entry::Occupied(o) => o,
        };
        let live = open.remove();
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
        if self.report(live, Some(end_ns), Outcome::Ended(status), now)
            && matches!(scope, Scope::Connection(_))
        {
            self.recent.insert((scope, id), self.ready.len() - 1);
        }
        Ok(Some(done))
    }

    /// Reports every span still open in `scope` as orphaned; returns how many.
    pub fn orphan(&mut self, scope: Scope, now: Instant) -> u64 {
        let keys: Vec<(Scope, u64)> = self.live.keys().filter(|k| k.0 == scope).copied().collect();
        for key in &keys {
            if let Some(live) = self.live.remove(key) {
                self.report(live, None, Outcome::Orphaned, now);
            }
        }
        self.stats.orphaned += keys.len() as u64;
        self.stats.live = self.live.len() as u64;
        keys.len() as u64
    }

    /// Expires spans open longer than the TTL, and closes and attributes held longer
    /// than the TTL for an open that never came (returned as the second number, to
    /// be counted `span_unknown`); returns how many spans expired.
    pub fn expire(&mut self, now: Instant) -> (u64, u64) {
        let ttl = self.ttl;
        let keys: Vec<(Scope, u64)> = self
            .live
            .iter()
            .filter(|(_, l)| now.saturating_duration_since(l.opened) > ttl)
            .map(|(k, _)| *k)
            .collect();
        for key in &keys {
            if let Some(live) = self.live.remove(key) {
                self.report(live, None, Outcome::Expired, now);
            }
        }
        self.stats.expired += keys.len() as u64;
        self.stats.live = self.live.len() as u64;
        let stale: Vec<(Scope, u64)> = self
            .early
            .iter()
            .filter(|(_, (at, _))| now.saturating_duration_since(*at) > ttl)
            .map(|(k, _)| *k)
            .collect();
        let mut dropped = 0;
        for key in stale {
            if let Some((_, v)) = self.early.remove(&key) {
                dropped += v.len() as u64;
                self.early_len -= v.len();
            }
        }
        self.stats.early = self.early_len as u64;
        (keys.len() as u64, dropped)
    }

    /// Hands a span that ended (`end_ns`), was orphaned or expired to the exporters, if
    /// the rate limit allows (whether it did); what it drops is only counted (and never
    /// built).
    fn report(&mut self, live: Live, end_ns: Option<u64>, outcome: Outcome, now: Instant) -> bool {
        // The drain loop passes one `now` per pass: the bucket refills once per pass.
        if now > self.refilled {
            let elapsed = now.duration_since(self.refilled).as_secs_f64();
            self.refilled = now;
            self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        }
        if self.tokens < 1.0 {
            self.stats.rate_limited += 1;
            return false;
        }
        self.tokens -= 1.0;
        self.stats.exported += 1;
        self.ready.push(finish(live, end_ns, outcome));
        true
    }

    /// Limits the spans [`take_ready`](Self::take_ready) marks for logd to
    /// `per_second` (bursts of one second's worth).
    pub fn set_logd_rate(&mut self, per_second: u32) {
        self.logd = Bucket::new(per_second);
    }

    /// The spans reported since the last call, in the order they finished, and how
    /// many of the first of them go to logd (the rest are past logd's span rate).
    pub fn take_ready(&mut self, now: Instant) -> (Vec<FinishedSpan>, usize) {
        let ready = std::mem::take(&mut self.ready);
        self.recent.clear();
        let logged = self.logd.take(ready.len() as u64, now);
        self.stats.logged += logged;
        self.stats.not_logged += ready.len() as u64 - logged;
        (ready, logged as usize)
    }

    /// Running totals.
    pub fn stats(&self) -> SpanStats {
        self.stats
    }
}

/// A token bucket of `rate` a second holding one second's worth.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    refilled: Option<Instant>,
}

impl Bucket {
    fn new(per_second: u32) -> Self {
        Self {
            rate: f64::from(per_second),
            tokens: f64::from(per_second),
            refilled: None,
        }
    }

    /// Takes up to `want` tokens; returns how many.
    fn take(&mut self, want: u64, now: Instant) -> u64 {
        if let Some(then) = self.refilled {
            let elapsed = now.saturating_duration_since(then).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        }
        self.refilled = Some(self.refilled.map_or(now, |t| t.max(now)));
        let got = (self.tokens.floor().max(0.0) as u64).min(want);
        self.tokens -= got as f64;
        got
    }
}

/// Sets attribute `key` of a span: a key it has already gets the new value (the latest
/// wins); a new one is refused past `max` attributes.
fn add_attr(
    attrs: &mut Vec<(Arc<str>, String)>,
    key: Arc<str>,
    value: String,
    max: usize,
) -> Result<(), Reason> {
    if let Some(slot) = attrs.iter_mut().find(|(k, _)| *k == key) {
        slot.1 = value;
        return Ok(());
    }
    if attrs.len() >= max {
        return Err(Reason::AttrsFull);
    }
    attrs.push((key, value));
    Ok(())
}

fn finish(live: Live, end_ns: Option<u64>, outcome: Outcome) -> FinishedSpan {
    FinishedSpan {
        service: live.service,
        name: live.name,
        trace_id: live.trace_id,
        span_id: live.span_id,
        parent_id: live.parent_id,
        flags: live.flags,
        start_ns: live.start_ns,
        end_ns,
        outcome,
        attrs: live.attrs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v10(ring: u32, id: u64, parent: u64, t: u64) -> Start {
        Start {
            scope: Scope::Ring(ring),
            id,
            parent,
            trace: None,
            name_key: 1,
            name: Arc::from("op"),
            duration: None,
            start_ns: t,
            service: Arc::from("web"),
        }
    }

    fn v11(conn: u64, trace: u128, id: u64, parent: u64, t: u64) -> Start {
        Start {
            scope: Scope::Connection(conn),
            id,
            parent,
            trace: Some((trace, 1)),
            name_key: 1,
            name: Arc::from("op"),
            duration: None,
            start_ns: t,
            service: Arc::from("web"),
        }
    }

    #[test]
    fn v1_0_spans_get_global_ids_and_follow_parents() {
        let now = Instant::now();
        let mut s = Spans::new(10, Duration::from_secs(60), 8, 1000);
        s.start(v10(1, 1, 0, 100), now).expect("root");
        s.start(v10(1, 2, 1, 110), now).expect("child");
        s.start(v10(1, 3, 99, 120), now).expect("parent gone");
        assert_eq!(
            s.start(v10(1, 3, 0, 0), now).err(),
            Some(Reason::SpanDuplicate)
        );
        let d = s
            .end(Scope::Ring(1), 2, 1, SpanStatus::OK, 150, now)
            .expect("ends")
            .expect("was open");
        assert_eq!(d.duration_ns, 40);
        assert_eq!(
            s.end(Scope::Ring(1), 1, 2, SpanStatus::OK, 1, now).err(),
            Some(Reason::SpanNameMismatch)
        );
        s.end(Scope::Ring(1), 1, 1, SpanStatus::OK, 1100, now)
            .expect("ends");
        s.end(Scope::Ring(1), 3, 1, SpanStatus::ERROR, 121, now)
            .expect("ends");
        // A v1.0 end in another ring is unknown there, and not held.
        assert_eq!(
            s.end(Scope::Ring(2), 1, 1, SpanStatus::OK, 1, now).err(),
            Some(Reason::SpanUnknown)
        );
        let (spans, _) = s.take_ready(now);
        assert_eq!(spans.len(), 3);
        let (child, root, lone) = (&spans[0], &spans[1], &spans[2]);
        assert_eq!(child.parent_id, root.span_id);
        assert_eq!(child.trace_id, root.trace_id);
        assert_eq!(root.parent_id, 0);
        assert_eq!(root.trace_id as u64, root.span_id);
        assert_ne!(lone.trace_id, root.trace_id);
        assert_ne!(lone.parent_id, 0);
        assert_eq!(lone.outcome, Outcome::Ended(SpanStatus::ERROR));
        assert_eq!(s.stats().exported, 3);
    }

    #[test]
    fn v1_1_spans_keep_their_ids_and_may_close_before_their_open_is_drained() {
        let now = Instant::now();
        let mut s = Spans::new(10, Duration::from_secs(60), 8, 1000);
        let trace = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736u128;
        // The close and an attribute (another thread's ring) are drained first.
        let c = Scope::Connection(7);
        s.attr(c, 0xaa, Arc::from("k"), "old".into(), now)
            .expect("held");
        s.attr(c, 0xaa, Arc::from("k"), "v".into(), now)
            .expect("held");
        assert!(
            s.end(c, 0xaa, 1, SpanStatus::ERROR, 500, now)
                .expect("held")
                .is_none()
        );
        assert_eq!(s.stats().early, 3);
        let done = s
            .start(v11(7, trace, 0xaa, 0x00f0_67aa_0ba9_02b7, 200), now)
            .expect("opens")
            .expect("and completes");
        assert_eq!(done.duration_ns, 300);
        assert_eq!(s.stats().early, 0);
        let (spans, _) = s.take_ready(now);
        assert_eq!(spans.len(), 1);
        assert_eq!(
            (spans[0].trace_id, spans[0].span_id, spans[0].parent_id),
            (trace, 0xaa, 0x00f0_67aa_0ba9_02b7)
        );
        assert_eq!(
            spans[0].attrs,
            vec![(Arc::from("k"), "v".to_owned())],
            "a key set twice: the latest value"
        );
        assert_eq!(span_hex(0xaa), "00000000000000aa");
        assert_eq!(trace_hex(trace), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn an_attribute_drained_after_its_close_joins_the_completed_span() {
        let now = Instant::now();
        let mut s = Spans::new(10, Duration::from_secs(60), 2, 1000);
        let trace = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736u128;
        let c = Scope::Connection(3);
        // Opened (thread A's ring), closed (thread B's ring, drained first: held), and
        // the open completes it; then A's attribute written before the close.
        assert!(
            s.end(c, 0xbb, 1, SpanStatus::OK, 900, now)
                .expect("held")
                .is_none()
        );
        s.start(v11(3, trace, 0xbb, 0, 100), now)
            .expect("opens")
            .expect("and completes");
        s.attr(c, 0xbb, Arc::from("k"), "late".into(), now)
            .expect("joins the completed span");
        s.attr(c, 0xbb, Arc::from("k"), "later".into(), now)
            .expect("the latest wins");
        s.attr(c, 0xbb, Arc::from("j"), "1".into(), now)
            .expect("a second key");
        assert_eq!(
            s.attr(c, 0xbb, Arc::from("x"), "2".into(), now).err(),
            Some(Reason::AttrsFull),
            "the attribute bound holds for late ones too"
        );
        let (spans, _) = s.take_ready(now);
        assert_eq!(spans.len(), 1);
        assert_eq!(
            spans[0].attrs,
            vec![
                (Arc::from("k"), "later".to_owned()),
                (Arc::from("j"), "1".to_owned())
            ]
        );
        assert_eq!(s.stats().early, 0, "nothing left held");
        // After the export the span is gone: a later attribute waits as an early one.
        s.attr(c, 0xbb, Arc::from("k"), "gone".into(), now)
            .expect("held");
        assert_eq!(s.stats().early, 1);
    }

    #[test]
    fn orphans_expiry_rate_limit_and_caps() {
        let now = Instant::now();
        let mut s = Spans::new(2, Duration::from_millis(10), 1, 1);
        s.start(v10(1, 1, 0, 0), now).expect("fits");
        s.start(v11(2, 5, 1, 0, 0), now).expect("fits");
        assert_eq!(
            s.start(v10(2, 2, 0, 0), now).err(),
            Some(Reason::LiveSpansFull)
        );
        s.attr(Scope::Ring(1), 1, Arc::from("k"), "v".into(), now)
            .expect("fits");
        assert_eq!(
            s.attr(Scope::Ring(1), 1, Arc::from("k2"), "v".into(), now)
                .err(),
            Some(Reason::AttrsFull)
        );
        assert_eq!(s.orphan(Scope::Ring(1), now), 1);
        // One token a second: the second report in the same instant is rate limited.
        assert_eq!(s.expire(now + Duration::from_millis(11)), (1, 0));
        let (spans, _) = s.take_ready(now);
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].outcome, Outcome::Orphaned);
        assert_eq!(s.stats().rate_limited, 1);
        assert_eq!(s.stats().live, 0);
        // An early close for an open that never comes is dropped after the TTL.
        let c = Scope::Connection(3);
        let _ = s.end(c, 9, 1, SpanStatus::OK, 1, now);
        assert_eq!(s.expire(now + Duration::from_millis(20)), (0, 1));
        assert_eq!(s.stats().early, 0);
    }
}
