//! The drain loop: one thread, every ring, a budget per ring per pass.
//!
//! Each pass gives every open ring at most `drain.budget` records, so a flooding
//! producer cannot starve the others; a quarantined ring is skipped (counted once).
//! Every record is copied out once by the ring's `Reader` and validated on the copy:
//! its kind, its key (registered in this ring), the key's registered kind, the fields
//! that must be zero, span ids and statuses. Each reject is counted with its reason.
//! Registrations are assembled per ring. Nothing here blocks on a producer: a pass that
//! found every ring empty sleeps (`drain.idle_min_us`, doubling up to
//! `drain.idle_max_us`, and `drain.deep_idle_ms` once every ring has been empty for
//! `drain.deep_idle_after_ms`) on the command channel, so a new ring or a snapshot request
//! wakes it at once.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use telemetry_abi::{
    AttrValueType, Record, RecordKind, RegisterError, RegisterKind, Registration, RegistrationBuf,
    Sample, SpanAttr, SpanEnd, SpanStart, SpanTrace,
};
use telemetry_ring::{MemfdRegion, Reader};

use crate::aggregate::{MetricKind, Resolved, SeriesId, Store};
use crate::config::Config;
use crate::export::ExportQueue;
use crate::health::{Class, Reason, RejectCounts};
use crate::keys::{Check, KeyTable, Target};
use crate::redact::{REDACTED, Redactor};
use crate::schema::{self, Window};
use crate::snapshot::{DrainStats, GrantStats, HealthSeries, RingSnapshot, Snapshot, Violations};
use crate::spans::{FinishedSpan, Scope, Spans, Start};

/// A ring the grant server created, handed to the drain loop before the producer
/// hears of it.
pub struct NewRing {
    /// The ring's id.
    pub id: u32,
    /// The control connection it was granted on.
    pub connection: u64,
    /// The producer's service.
    pub service: Arc<str>,
    /// The region.
    pub region: MemfdRegion,
    /// The epoch written in its header.
    pub epoch: u64,
    /// Told once the ring is in the write-ahead log (at once without one), so a ring
    /// is never handed to a producer before a later daemon could know it.
    pub logged: Option<Sender<()>>,
}

/// A ring an earlier metricsd granted, handed back by its producer (grant op 2).
pub struct ReturnedRing {
    /// The id this daemon gives it while finishing it.
    pub id: u32,
    /// The control connection it arrived on.
    pub connection: u64,
    /// The service the kernel names that connection's peer.
    pub service: Arc<str>,
    /// The region, attached (sealed, header accepted) but otherwise untrusted.
    pub region: MemfdRegion,
    /// Where the answer goes.
    pub reply: Sender<telemetry_abi::GrantStatus>,
}

/// What the other threads ask of the drain loop.
pub enum Command {
    /// Start draining a ring.
    AddRing(NewRing),
    /// Finish a ring an earlier daemon left unclosed, then close it.
    ReturnRing(ReturnedRing),
    /// A producer disconnected: drain its rings a last time, orphan their spans, free.
    CloseConnection(u64),
    /// Answer with a snapshot after the next full pass.
    Snapshot(Sender<Snapshot>),
    /// Build an export now (after the next full pass), then answer.
    ExportNow(Sender<()>),
    /// Export a last time and stop.
    Shutdown,
}

struct RingState {
    id: u32,
    connection: u64,
    service: Arc<str>,
    service_idx: u32,
    reader: Reader<MemfdRegion>,
    keys: KeyTable,
    regbuf: Box<RegistrationBuf>,
    quarantine_counted: bool,
    pending: u64,
    /// A `span_trace` waiting for its `span_open`: (span id, name key, trace, flags).
    trace: Option<(u64, u32, u128, u8)>,
    /// The epoch written in its header when it was granted.
    epoch: u64,
    /// The durable position last logged (and released to the producer).
    logged_pos: u64,
    /// The records of the registration being assembled (with a write-ahead log).
    reg_raw: Vec<Record>,
    /// Registrations completed and not logged yet, their raw records.
    reg_done: Vec<Record>,
}

/// The state the drain loop owns: rings, aggregates, spans, and counts.
pub struct Drainer {
    budget: u64,
    max_keys: u32,
    rings: Vec<RingState>,
    store: Store,
    spans: Spans,
    redactor: Redactor,
    rejects: RejectCounts,
    violations: Violations,
    stats: DrainStats,
    closed: VecDeque<RingSnapshot>,
    grant: Arc<Mutex<GrantStats>>,
    queue: Arc<ExportQueue>,
    last_export_ns: u64,
    last_health: HashMap<String, i128>,
    scrape_stats: Option<Arc<crate::scrape::ScrapeStats>>,
    otlp: Option<crate::otlp::Handoff>,
    /// Rollup history on disk (`[retention]`), fed at each export.
    retention: Option<crate::retention::Retention>,
    /// The write-ahead log (with `[retention]`): counters exactly once across a crash.
    wal: Option<crate::wal::Wal>,
}

/// One health series: kind, name, labels, value.
type HealthRow<'a> = (MetricKind, &'static str, Vec<(&'a str, String)>, i128);

/// Closed rings kept in snapshots (the most recent).
const CLOSED_KEPT: usize = 64;

/// Now, in ns since the Unix epoch.
pub(crate) fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The kind a sample record needs its key registered as.
fn sample_kind(kind: RecordKind) -> Option<RegisterKind> {
    match kind {
        RecordKind::COUNTER => Some(RegisterKind::COUNTER),
        RecordKind::GAUGE | RecordKind::GAUGE_F64 | RecordKind::GAUGE_F64_ADD => {
            Some(RegisterKind::GAUGE)
        }
        RecordKind::HISTOGRAM | RecordKind::HISTOGRAM_F64 => Some(RegisterKind::HISTOGRAM),
        _ => None,
    }
}

fn register_reason(e: RegisterError) -> Reason {
    match e {
        RegisterError::Interrupted => Reason::RegistrationInterrupted,
        _ => Reason::BadRegistration,
    }
}

/// The part of the drainer a record handler needs, borrowed apart from the rings.
struct Ctx<'a> {
    store: &'a mut Store,
    spans: &'a mut Spans,
    redactor: &'a Redactor,
    rejects: &'a mut RejectCounts,
    registrations: &'a mut u64,
    now: Instant,
}

struct RingCtx<'a> {
    id: u32,
    connection: u64,
    trace: &'a mut Option<(u64, u32, u128, u8)>,
    service: &'a Arc<str>,
    service_idx: u32,
    keys: &'a mut KeyTable,
    regbuf: &'a mut RegistrationBuf,
    /// With a write-ahead log: the raw records of the registration being assembled,
    /// and of those completed (`None` without a log).
    reg_log: Option<(&'a mut Vec<Record>, &'a mut Vec<Record>)>,
}

impl Ctx<'_> {
    fn reject(&mut self, r: Reason) {
        self.rejects.add(r, 1);
    }

    /// The hot path: a sample outside a registration is validated and aggregated here,
    /// inlined into the drain loop; everything else goes to [`Ctx::record_slow`].
    #[inline]
    fn record(&mut self, ring: &mut RingCtx<'_>, record: Record) {
        if let Some(want) = sample_kind(record.kind) {
            if !ring.regbuf.is_pending() {
                if let Err(reason) = self.sample(ring, want, record) {
                    self.reject(reason);
                }
                return;
            }
        }
        self.record_slow(ring, record);
    }

    // Always inlined into the drain loop: as calls, this and the `Store` update it makes
    // cost about a fifth of each record's instructions (prologues, spills; callgrind on
    // `benches/benches/pipeline.rs`, `metricsd_drain`).
    #[inline(always)]
    fn sample(
        &mut self,
        ring: &mut RingCtx<'_>,
        want: RegisterKind,
        record: Record,
    ) -> Result<(), Reason> {
        // `flags` and the reserved words are ignored, as the ABI says v1.x readers do: a
        // later minor version may give them meaning.
        let s: Sample = record.view();
        let entry = ring.keys.get(record.key).ok_or(Reason::UnregisteredKey)?;
        if entry.what != want {
            return Err(Reason::KindMismatch);
        }
        let id = match entry.target {
            Target::Series(id) => id,
            Target::Refused => return Err(Reason::SeriesCap),
            _ => return Err(Reason::KindMismatch),
        };
        if let Some(x) = float_value(record.kind, s.value) {
            if !x.is_finite() {
                return Err(Reason::NotFinite);
            }
        }
        if self.apply(id, record.kind, s.value) {
            Ok(())
        } else {
            self.rebind(ring, record.key, record.kind, s.value)
        }
    }

    /// Aggregates one sample into series `id`; `false` when `id` expired.
    #[inline(always)]
    fn apply(&mut self, id: SeriesId, kind: RecordKind, value: u64) -> bool {
        match kind {
            RecordKind::COUNTER => self.store.add(id, value),
            RecordKind::GAUGE => self.store.set(id, value as i64),
            RecordKind::HISTOGRAM => self.store.observe(id, value),
            kind => apply_float(self.store, id, kind, f64::from_bits(value)),
        }
    }

    /// A sample on a key whose series expired: the key's registration is resolved again
    /// (a new series, or the overflow series if the caps are reached now) and the sample
    /// aggregated there.
    #[cold]
    #[inline(never)]
    fn rebind(
        &mut self,
        ring: &mut RingCtx<'_>,
        key: u32,
        kind: RecordKind,
        value: u64,
    ) -> Result<(), Reason> {
        let Some(entry) = ring.keys.get_mut(key) else {
            return Err(Reason::UnregisteredKey);
        };
        let metric = match entry.what {
            RegisterKind::COUNTER => MetricKind::Counter,
            RegisterKind::GAUGE => MetricKind::Gauge,
            _ => MetricKind::Histogram,
        };
        let labels = entry.labels();
        let resolved = self
            .store
            .resolve(ring.service_idx, metric, entry.name(), &labels);
        match resolved {
            Resolved::Series(id) => {
                entry.target = Target::Series(id);
                // A series just resolved is live: this cannot fail.
                self.apply(id, kind, value);
                Ok(())
            }
            Resolved::Refused => {
                entry.target = Target::Refused;
                Err(Reason::SeriesCap)
            }
        }
    }

    /// A span ended whose name's duration series expired while it was open: the name's
    /// entry is bound to the series found or made again, and the duration observed there.
    #[cold]
    #[inline(never)]
    fn rebind_duration(&mut self, ring: &mut RingCtx<'_>, name_key: u32, duration_ns: u64) {
        let Some(entry) = ring.keys.get_mut(name_key) else {
            return;
        };
        let Target::Span { name, duration } = &mut entry.target else {
            return;
        };
        match self
            .store
            .resolve(ring.service_idx, MetricKind::SpanDuration, name, &[])
        {
            Resolved::Series(id) => {
                *duration = Some(id);
                self.store.observe(id, duration_ns);
            }
            Resolved::Refused => *duration = None,
        }
    }

    #[inline(never)]
    fn record_slow(&mut self, ring: &mut RingCtx<'_>, record: Record) {
        let kind = record.kind;
        // Anything but a data record ends a pending registration, a new head included:
        // the interrupted registration is refused, counted once.
        if kind != RecordKind::REGISTER_DATA && ring.regbuf.interrupt().is_err() {
            self.reject(Reason::RegistrationInterrupted);
        }
        if kind == RecordKind::REGISTER || kind == RecordKind::REGISTER_DATA {
            if let Some((raw, _)) = &mut ring.reg_log {
                if kind == RecordKind::REGISTER {
                    raw.clear();
                }
                raw.push(record);
            }
            let before = *self.registrations;
            match ring.regbuf.feed(&record) {
                Ok(None) => {}
                Ok(Some(reg)) => register(self, ring.keys, ring.service_idx, &reg),
                Err(e) => self.reject(register_reason(e)),
            }
            if let Some((raw, done)) = &mut ring.reg_log {
                if *self.registrations != before {
                    done.append(raw);
                } else if !ring.regbuf.is_pending() {
                    // Refused, passed over, or an identical re-registration: nothing
                    // a replay needs.
                    raw.clear();
                }
            }
            return;
        }
        if let Err(reason) = self.validated(ring, record) {
            self.reject(reason);
        }
    }

    fn validated(&mut self, ring: &mut RingCtx<'_>, record: Record) -> Result<(), Reason> {
        if let Some(want) = sample_kind(record.kind) {
            return self.sample(ring, want, record);
        }
        let entry = ring.keys.get(record.key);
        match record.kind {
            RecordKind::SPAN_TRACE => {
                let t: SpanTrace = record.view();
                let Target::Span { .. } = entry.ok_or(Reason::UnregisteredKey)?.target else {
                    return Err(Reason::KindMismatch);
                };
                if t.span_id == 0 {
                    return Err(Reason::SpanIdZero);
                }
                if t.trace_id() == 0 {
                    return Err(Reason::SpanTraceZero);
                }
                let earlier = ring
                    .trace
                    .replace((t.span_id, t.name, t.trace_id(), t.flags as u8));
                match earlier {
                    // A trace record whose open never came.
                    Some(_) => Err(Reason::SpanNoTrace),
                    None => Ok(()),
                }
            }
            RecordKind::SPAN_START | RecordKind::SPAN_OPEN => {
                let s: SpanStart = record.view();
                let trace = ring.trace.take();
                let Target::Span { name, duration } = &entry.ok_or(Reason::UnregisteredKey)?.target
                else {
                    return Err(Reason::KindMismatch);
                };
                if s.span_id == 0 {
                    return Err(Reason::SpanIdZero);
                }
                let (scope, trace) = if kind_is_v1_1(record.kind) {
                    match trace {
                        Some((id, name, trace, flags)) if id == s.span_id && name == s.name => {
                            (Scope::Connection(ring.connection), Some((trace, flags)))
                        }
                        _ => return Err(Reason::SpanNoTrace),
                    }
                } else {
                    (Scope::Ring(ring.id), None)
                };
                let start = Start {
                    scope,
                    id: s.span_id,
                    parent: s.parent_id,
                    trace,
                    name_key: s.name,
                    name: name.clone(),
                    duration: *duration,
                    start_ns: s.start_ns,
                    service: ring.service.clone(),
                };
                if let Some(done) = self.spans.start(start, self.now)? {
                    // A close that arrived first (another thread's ring) completed it.
                    if let Some(series) = done.duration_series {
                        if !self.store.observe(series, done.duration_ns) {
                            self.rebind_duration(ring, s.name, done.duration_ns);
                        }
                    }
                }
                Ok(())
            }
            RecordKind::SPAN_END | RecordKind::SPAN_CLOSE => {
                let e: SpanEnd = record.view();
                let Target::Span { .. } = entry.ok_or(Reason::UnregisteredKey)?.target else {
                    return Err(Reason::KindMismatch);
                };
                if e.span_id == 0 {
                    return Err(Reason::SpanIdZero);
                }
                let scope = scope_of(record.kind, ring);
                let done = self
                    .spans
                    .end(scope, e.span_id, e.name, e.status, e.end_ns, self.now)?;
                if let Some(done) = done {
                    if let Some(series) = done.duration_series {
                        if !self.store.observe(series, done.duration_ns) {
                            self.rebind_duration(ring, e.name, done.duration_ns);
                        }
                    }
                }
                Ok(())
            }
            RecordKind::SPAN_ATTR | RecordKind::SPAN_NOTE => {
                let a: SpanAttr = record.view();
                let Target::Attr { key, sensitive } = &entry.ok_or(Reason::UnregisteredKey)?.target
                else {
                    return Err(Reason::KindMismatch);
                };
                if a.span_id == 0 {
                    return Err(Reason::SpanIdZero);
                }
                let value = match a.value_type {
                    AttrValueType::U64 => a.value.to_string(),
                    AttrValueType::I64 => (a.value as i64).to_string(),
                    AttrValueType::STRING => {
                        let k = u32::try_from(a.value).map_err(|_| Reason::AttrValue)?;
                        match ring.keys.get(k).map(|e| &e.target) {
                            Some(Target::Str(s)) => s.to_string(),
                            _ => return Err(Reason::AttrValue),
                        }
                    }
                    _ => return Err(Reason::AttrValue),
                };
                let value = if *sensitive {
                    REDACTED.to_owned()
                } else {
                    value
                };
                let scope = scope_of(record.kind, ring);
                self.spans
                    .attr(scope, a.span_id, key.clone(), value, self.now)
            }
            // The reader withholds unknown kinds; INVALID (0) is the one left.
            _ => Err(Reason::UnknownKind),
        }
    }
}

/// The value of a float sample (ABI 1.1), `None` for the integer kinds.
#[inline(always)]
fn float_value(kind: RecordKind, bits: u64) -> Option<f64> {
    match kind {
        RecordKind::GAUGE_F64 | RecordKind::GAUGE_F64_ADD | RecordKind::HISTOGRAM_F64 => {
            Some(f64::from_bits(bits))
        }
        _ => None,
    }
}

/// Aggregates a float sample (ABI 1.1, finite: checked before) into series `id`, off the
/// integer samples' inlined path; `false` when `id` expired.
#[inline(never)]
fn apply_float(store: &mut Store, id: SeriesId, kind: RecordKind, value: f64) -> bool {
    match kind {
        RecordKind::GAUGE_F64 => store.set_f64(id, value),
        RecordKind::GAUGE_F64_ADD => store.add_f64(id, value),
        // Finite, so never refused.
        _ => store.observe_f64(id, value).unwrap_or(true),
    }
}

/// Whether a span record kind is one of ABI v1.1's (trace-global ids).
fn kind_is_v1_1(kind: RecordKind) -> bool {
    matches!(
        kind,
        RecordKind::SPAN_OPEN | RecordKind::SPAN_CLOSE | RecordKind::SPAN_NOTE
    )
}

/// Where a span record's id lives: its connection (v1.1) or its ring (v1.0).
fn scope_of(kind: RecordKind, ring: &RingCtx<'_>) -> Scope {
    if kind_is_v1_1(kind) {
        Scope::Connection(ring.connection)
    } else {
        Scope::Ring(ring.id)
    }
}

fn register(ctx: &mut Ctx<'_>, keys: &mut KeyTable, service: u32, reg: &Registration<'_>) {
    match keys.check(reg) {
        Check::Same => return,
        Check::Conflict => return ctx.reject(Reason::RegistrationConflict),
        Check::Full => return ctx.reject(Reason::KeyTableFull),
        Check::New => {}
    }
    let labels: Vec<(&str, &str)> = reg.labels().iter().map(|l| (l.key, l.value)).collect();
    let series = |ctx: &mut Ctx<'_>, kind| match ctx.store.resolve(service, kind, reg.name, &labels)
    {
        Resolved::Series(id) => Target::Series(id),
        Resolved::Refused => Target::Refused,
    };
    let target = match reg.what {
        RegisterKind::COUNTER => series(ctx, MetricKind::Counter),
        RegisterKind::GAUGE => series(ctx, MetricKind::Gauge),
        RegisterKind::HISTOGRAM => series(ctx, MetricKind::Histogram),
        RegisterKind::SPAN => Target::Span {
            name: Arc::from(reg.name),
            duration: match series(ctx, MetricKind::SpanDuration) {
                Target::Series(id) => Some(id),
                _ => None,
            },
        },
        RegisterKind::ATTR => Target::Attr {
            key: Arc::from(reg.name),
            sensitive: ctx.redactor.is_sensitive(reg.name),
        },
        RegisterKind::STRING => Target::Str(Arc::from(reg.name)),
        RegisterKind::METADATA => match ctx.store.describe(service, reg.name, &labels) {
            Ok(()) => Target::Metadata,
            Err(reason) => return ctx.reject(reason),
        },
        // The assembler refuses unknown kinds; nothing else reaches here.
        _ => return ctx.reject(Reason::BadRegistration),
    };
    keys.insert(reg, target);
    *ctx.registrations += 1;
}

impl Drainer {
    /// A drainer configured by `config`, exporting into `queue` and reading grant
    /// totals from `grant`.
    pub fn new(config: &Config, queue: Arc<ExportQueue>, grant: Arc<Mutex<GrantStats>>) -> Self {
        let redactor = Redactor::new(&config.redaction.patterns);
        let mut spans = Spans::new(
            config.spans.max_live,
            Duration::from_millis(config.spans.ttl_ms),
            config.spans.max_attrs,
            config.export.spans_per_second,
        );
        spans.set_logd_rate(config.export.logd_spans_per_second);
        Self {
            budget: u64::from(config.drain.budget),
            max_keys: config.rings.max_keys_per_ring,
            rings: Vec::new(),
            store: Store::new(config.series.clone(), redactor.clone(), &config.histograms),
            spans,
            redactor,
            rejects: RejectCounts::default(),
            violations: Violations::default(),
            stats: DrainStats::default(),
            closed: VecDeque::new(),
            grant,
            queue,
            last_export_ns: wall_ns(),
            last_health: HashMap::new(),
            scrape_stats: None,
            otlp: None,
            retention: None,
            wal: None,
        }
    }

    /// Opens the write-ahead log in `dir` (rotating files at `file_bytes`), replaying
    /// what an earlier daemon logged into the store. Returns the epoch base this
    /// daemon's grants must use.
    pub fn open_wal(
        &mut self,
        dir: &std::path::Path,
        file_bytes: u64,
    ) -> Result<u64, crate::wal::WalError> {
        let crate::wal::Opened {
            mut wal,
            epoch_base,
            windows,
        } = crate::wal::Wal::open(dir, file_bytes, &mut self.store)?;
        if let Some(r) = &mut self.retention {
            // A window the disk has from after the checkpoint that logged it was
            // closed and written since: the disk's copy is the newer one.
            let on_disk = r.written_since(windows.earliest());
            let (open, closed) = windows.to_restore(&on_disk);
            for id in self.store.ids().collect::<Vec<_>>() {
                if let Some(s) = self.store.get(id) {
                    r.prime(s);
                }
            }
            r.restore(open, closed);
        }
        wal.start(&self.store, self.retention.as_ref())?;
        self.wal = Some(wal);
        Ok(epoch_base)
    }

    /// The write-ahead log's totals, if there is one.
    pub fn wal_stats(&self) -> Option<crate::wal::WalStats> {
        self.wal.as_ref().map(|w| w.stats().clone())
    }

    /// Logs every ring's new durable position and the changed series with one
    /// `write`, then releases the logged positions to the producers. `extra`: rings
    /// being closed, already out of the list.
    fn commit_wal(&mut self, extra: &mut [RingState]) {
        let Some(wal) = &mut self.wal else {
            return;
        };
        let mut positions = Vec::new();
        for ring in self.rings.iter_mut().chain(extra.iter_mut()) {
            if !ring.reg_done.is_empty() {
                wal.registered(ring.epoch, &ring.reg_done);
                ring.reg_done.clear();
            }
            if ring.reader.quarantined().is_some() {
                continue;
            }
            let pos = ring.reader.position();
            // Inside a registration, the durable position stays at its head: a replay
            // reads the whole registration again.
            let durable = if ring.regbuf.is_pending() {
                pos.wrapping_sub(ring.reg_raw.len() as u64)
            } else {
                pos
            };
            if durable != ring.logged_pos {
                positions.push((ring.epoch, durable));
            }
        }
        wal.commit(&self.store, self.store.dirty_ids(), &positions);
        for ring in self.rings.iter_mut().chain(extra.iter_mut()) {
            if let Some(&(_, pos)) = positions.iter().find(|(e, _)| *e == ring.epoch) {
                ring.reader.release(pos);
                ring.logged_pos = pos;
            }
        }
    }

    /// Finishes a ring an earlier daemon left unclosed and its producer handed back:
    /// validated like any ring (the header's epoch is only a name to look up; the log
    /// decides where reading starts, which service it must belong to and its size),
    /// read from the logged durable position up to its write position (at most one
    /// capacity), its registrations replayed from the log, then closed.
    pub fn return_ring(&mut self, r: ReturnedRing) -> telemetry_abi::GrantStatus {
        use telemetry_abi::GrantStatus;
        let epoch = r.region.mapped().header_epoch();
        let capacity = u64::from(telemetry_ring::Region::geometry(&r.region).capacity());
        let Some(wal) = &mut self.wal else {
            return GrantStatus::INVALID_ARGS;
        };
        let logged = match wal.ring(epoch) {
            Some(l) if !l.live && l.service == r.service && l.capacity == capacity => l.clone(),
            _ => {
                wal.count_return(false);
                return GrantStatus::INVALID_ARGS;
            }
        };
        wal.ring_taken(epoch);
        let service_idx = self.store.service(&r.service);
        self.store.ring_opened(service_idx);
        let mut reader = Reader::starting_at(r.region, logged.position);
        reader.defer_release();
        let mut ring = RingState {
            id: r.id,
            connection: r.connection,
            service: r.service,
            service_idx,
            reader,
            keys: KeyTable::new(self.max_keys),
            regbuf: Box::new(RegistrationBuf::new()),
            quarantine_counted: false,
            pending: 0,
            trace: None,
            epoch,
            logged_pos: logged.position,
            reg_raw: Vec::new(),
            reg_done: Vec::new(),
        };
        // The registrations, through the same checks as when they first arrived (not
        // logged again: the log has them).
        {
            let mut ctx = Ctx {
                store: &mut self.store,
                spans: &mut self.spans,
                redactor: &self.redactor,
                rejects: &mut self.rejects,
                registrations: &mut self.stats.registrations,
                now: Instant::now(),
            };
            let mut rctx = RingCtx {
                id: ring.id,
                connection: ring.connection,
                trace: &mut ring.trace,
                service: &ring.service,
                service_idx,
                keys: &mut ring.keys,
                regbuf: &mut ring.regbuf,
                reg_log: None,
            };
            for record in &logged.registrations {
                ctx.record(&mut rctx, *record);
            }
        }
        self.rings.push(ring);
        let index = self.rings.len() - 1;
        let now = Instant::now();
        let mut left = capacity;
        while left > 0 && self.rings[index].reader.quarantined().is_none() {
            let n = self.drain_ring(index, left, now);
            if n == 0 {
                break;
            }
            left -= n;
        }
        let mut ring = vec![self.rings.swap_remove(index)];
        self.commit_wal(&mut ring);
        if let Some(wal) = &mut self.wal {
            wal.retired(epoch);
            wal.count_return(true);
            wal.commit(&self.store, &[], &[]);
        }
        let ring = ring.swap_remove(0);
        self.spans.orphan(Scope::Ring(ring.id), now);
        for series in ring.keys.entries().filter_map(|e| e.series()) {
            self.store.unbind(series);
        }
        self.store.ring_closed(ring.service_idx);
        self.stats.rings_closed += 1;
        // Dropping the reader releases what it read and raises the ring's CLOSED flag.
        drop(ring);
        GrantStatus::OK
    }

    /// Keeps rollup history in `retention`, fed at each export.
    pub fn with_retention(mut self, retention: Option<crate::retention::Retention>) -> Self {
        self.retention = retention;
        self
    }

    /// Seals the rollup segments being written (a clean stop).
    pub fn close_retention(&mut self) {
        if let Some(r) = self.retention.take() {
            r.close();
        }
    }

    /// Also hands each interval's changed series and reported spans to the OTLP
    /// exporter.
    pub fn set_otlp(&mut self, handoff: crate::otlp::Handoff) {
        self.otlp = Some(handoff);
    }

    /// Starts draining `ring`.
    pub fn add_ring(&mut self, ring: NewRing) {
        let service_idx = self.store.service(&ring.service);
        self.store.ring_opened(service_idx);
        let mut reader = Reader::new(ring.region);
        if let Some(wal) = &mut self.wal {
            reader.defer_release();
            wal.ring_granted(ring.epoch, &ring.service, reader.capacity());
            wal.commit(&self.store, &[], &[]);
        }
        if let Some(tx) = &ring.logged {
            let _ = tx.send(());
        }
        self.rings.push(RingState {
            id: ring.id,
            connection: ring.connection,
            service: ring.service,
            service_idx,
            reader,
            keys: KeyTable::new(self.max_keys),
            regbuf: Box::new(RegistrationBuf::new()),
            quarantine_counted: false,
            pending: 0,
            trace: None,
            epoch: ring.epoch,
            logged_pos: 0,
            reg_raw: Vec::new(),
            reg_done: Vec::new(),
        });
        self.stats.rings_open = self.rings.len() as u64;
    }

    /// Drains `ring` once with `budget`; returns records consumed.
    fn drain_ring(&mut self, index: usize, budget: u64, now: Instant) -> u64 {
        let Self {
            rings,
            store,
            spans,
            redactor,
            rejects,
            violations,
            stats,
            ..
        } = self;
        let Some(ring) = rings.get_mut(index) else {
            return 0;
        };
        let RingState {
            id,
            connection,
            trace,
            service,
            service_idx,
            reader,
            keys,
            regbuf,
            quarantine_counted,
            pending,
            reg_raw,
            reg_done,
            ..
        } = ring;
        let logging = self.wal.is_some();
        let mut ctx = Ctx {
            store,
            spans,
            redactor,
            rejects,
            registrations: &mut stats.registrations,
            now,
        };
        let mut rctx = RingCtx {
            id: *id,
            connection: *connection,
            trace,
            service,
            service_idx: *service_idx,
            keys,
            regbuf,
            reg_log: logging.then_some((reg_raw, reg_done)),
        };
        let before = reader.stats();
        let result = reader.drain(budget, |record| ctx.record(&mut rctx, record));
        let after = reader.stats();
        violations.dropped_moved_back += after.dropped_moved_back - before.dropped_moved_back;
        match result {
            Ok(d) => {
                ctx.rejects.add(Reason::UnknownKind, d.unknown_kind);
                *pending = d.remaining;
                stats.records += d.consumed;
                d.consumed
            }
            Err(_) => {
                if !*quarantine_counted {
                    *quarantine_counted = true;
                    stats.rings_quarantined += 1;
                    violations.write_out_of_range +=
                        after.write_out_of_range - before.write_out_of_range;
                    violations.write_moved_back += after.write_moved_back - before.write_moved_back;
                }
                *pending = 0;
                0
            }
        }
    }

    /// One pass: every ring, at most `budget` records each. Returns records consumed.
    pub fn pass(&mut self) -> u64 {
        let now = Instant::now();
        let mut consumed = 0;
        let mut lag = 0;
        for i in 0..self.rings.len() {
            let ring = &mut self.rings[i];
            if ring.reader.quarantined().is_some() {
                continue;
            }
            // Most rings of a large idle fleet are empty: one load decides, without
            // setting up a drain (an idle pass over 1000 rings stays in microseconds).
            if ring.reader.looks_empty() {
                ring.pending = 0;
                continue;
            }
            consumed += self.drain_ring(i, self.budget, now);
            lag += self.rings[i].pending;
        }
        if consumed > 0 {
            self.commit_wal(&mut []);
        }
        self.stats.passes += 1;
        self.stats.lag = lag;
        let took = u64::try_from(now.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.pass_ns_max = self.stats.pass_ns_max.max(took);
        consumed
    }

    /// A producer disconnected: drain each of its rings a last time (at most one
    /// capacity of records: the fd may live on elsewhere), orphan their open spans,
    /// and free them.
    pub fn close_connection(&mut self, connection: u64) {
        let now = Instant::now();
        let mut closing = Vec::new();
        let mut i = 0;
        while i < self.rings.len() {
            if self.rings[i].connection != connection {
                i += 1;
                continue;
            }
            let capacity = self.rings[i].reader.capacity();
            let mut left = capacity;
            while left > 0 && self.rings[i].reader.quarantined().is_none() {
                let n = self.drain_ring(i, left, now);
                if n == 0 {
                    break;
                }
                left -= n;
            }
            closing.push(self.rings.swap_remove(i));
        }
        // What the last drains read is logged before the rings are released to their
        // producer for good (dropping a reader releases everything it read).
        self.commit_wal(&mut closing);
        if let Some(wal) = &mut self.wal {
            for ring in &closing {
                wal.retired(ring.epoch);
            }
            wal.commit(&self.store, &[], &[]);
        }
        for ring in closing {
            self.spans.orphan(Scope::Ring(ring.id), now);
            for series in ring.keys.entries().filter_map(|e| e.series()) {
                self.store.unbind(series);
            }
            self.store.ring_closed(ring.service_idx);
            let mut snap = ring_snapshot(&ring);
            snap.closed = true;
            if self.closed.len() >= CLOSED_KEPT {
                self.closed.pop_front();
            }
            self.closed.push_back(snap);
            self.stats.rings_closed += 1;
            // Dropping the reader raises the ring's CLOSED flag; the memfd is unmapped.
        }
        self.spans.orphan(Scope::Connection(connection), now);
        self.stats.rings_open = self.rings.len() as u64;
    }

    /// Builds this interval's export and queues it.
    pub fn export(&mut self) {
        let now = Instant::now();
        let (_, early_dropped) = self.spans.expire(now);
        self.rejects.add(Reason::SpanUnknown, early_dropped);
        let end = wall_ns().max(self.last_export_ns);
        let window = Window {
            start_ns: self.last_export_ns,
            end_ns: end,
        };
        self.last_export_ns = end;
        let mut records = Vec::new();
        let mut otlp_series = Vec::new();
        let exported = self.store.take_dirty();
        for &id in &exported {
            let Some(s) = self.store.get(id) else {
                continue;
            };
            if self.otlp.is_some() {
                otlp_series.push(s.clone());
            }
            let total = match s.value {
                crate::aggregate::Value::Counter { total } => Some(total),
                _ => None,
            };
            let delta = total.map_or(0, |t| t - s.exported_total);
            let meta = self.store.metadata(&s.service, &s.name);
            records.push(schema::series_record(s, delta, window, meta.map(|m| &**m)));
            if let Some(r) = &mut self.retention {
                r.observe(s, delta, end);
            }
            self.store.exported(id, total, end);
        }
        let retention = &mut self.retention;
        self.store.sweep(end, |s| {
            records.push(schema::expired_record(s, window));
            if let Some(r) = retention {
                r.forget(&s.id());
            }
        });
        if let Some(r) = &mut self.retention {
            r.close_due(end);
        }
        if let Some(wal) = &mut self.wal {
            wal.checkpoint(&self.store, &exported, self.retention.as_ref());
        }
        if let Some(r) = &mut self.retention {
            r.tick(end);
        }
        let (spans, logged): (Vec<FinishedSpan>, usize) = self.spans.take_ready(now);
        records.extend(spans[..logged].iter().map(schema::span_record));
        if let Some(otlp) = &self.otlp {
            let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
            let mono_ns = i128::from(mono.tv_sec) * 1_000_000_000 + i128::from(mono.tv_nsec);
            let now_unix = wall_ns();
            otlp.submit(crate::otlp::Batch {
                series: otlp_series,
                spans,
                time_unix_ns: now_unix,
                mono_to_unix_ns: i128::from(now_unix) - mono_ns,
            });
        }
        self.stats.exports += 1;
        self.health_records(window, &mut records);
        self.stats.pass_ns_max = 0;
        self.queue.push(records);
    }

    fn health_records(&mut self, window: Window, out: &mut Vec<logd::Record>) {
        for row in self.health_rows() {
            let id = crate::aggregate::series_id(
                schema::HEALTH_SERVICE,
                row.kind,
                row.name,
                &row.labels,
            );
            let last = self.last_health.get(&id).copied();
            if last == Some(row.value) {
                continue;
            }
            let delta = row.value - last.unwrap_or(0);
            out.push(schema::health_record(
                row.kind,
                row.name,
                &row.labels,
                row.value,
                delta,
                window,
            ));
            self.last_health.insert(id, row.value);
        }
    }

    /// metricsd's own health series, as of now.
    pub fn health_rows(&self) -> Vec<HealthSeries> {
        let snap = self.snapshot_core();
        let export = self.queue.stats();
        let grant = self
            .grant
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut h: Vec<HealthRow<'_>> = Vec::new();
        let c = MetricKind::Counter;
        let g = MetricKind::Gauge;
        h.push((
            c,
            "metricsd.records.drained",
            vec![],
            snap.drain.records.into(),
        ));
        h.push((g, "metricsd.drain.lag", vec![], snap.drain.lag.into()));
        h.push((
            g,
            "metricsd.drain.longest_pass",
            vec![],
            (snap.drain.pass_ns_max / 1000).into(),
        ));
        h.push((
            g,
            "metricsd.rings.open",
            vec![],
            snap.drain.rings_open.into(),
        ));
        h.push((
            c,
            "metricsd.rings.quarantined",
            vec![],
            snap.drain.rings_quarantined.into(),
        ));
        for (reason, n) in self.rejects.nonzero() {
            h.push((
                c,
                "metricsd.rejects",
                vec![
                    ("class", reason.class().as_str().into()),
                    ("reason", reason.as_str().into()),
                ],
                n.into(),
            ));
        }
        for (reason, n) in [
            ("write_out_of_range", self.violations.write_out_of_range),
            ("write_moved_back", self.violations.write_moved_back),
            ("dropped_moved_back", self.violations.dropped_moved_back),
        ] {
            if n > 0 {
                h.push((
                    c,
                    "metricsd.violations",
                    vec![("reason", reason.into())],
                    n.into(),
                ));
            }
        }
        for r in &snap.rings {
            if r.producer_dropped > 0 {
                h.push((
                    c,
                    "metricsd.ring.dropped",
                    vec![("ring", r.id.to_string()), ("producer", r.service.clone())],
                    r.producer_dropped.into(),
                ));
            }
        }
        let st = self.store.stats();
        h.push((g, "metricsd.series", vec![], st.series.into()));
        h.push((
            c,
            "metricsd.overflow.registrations",
            vec![],
            st.overflowed_registrations.into(),
        ));
        h.push((
            c,
            "metricsd.overflow.samples",
            vec![],
            st.overflow_samples.into(),
        ));
        h.push((
            c,
            "metricsd.labels.redacted",
            vec![],
            st.labels_redacted.into(),
        ));
        h.push((
            g,
            "metricsd.series.overflow",
            vec![],
            st.overflow_series.into(),
        ));
        h.push((c, "metricsd.series.expired", vec![], st.expired.into()));
        h.push((
            c,
            "metricsd.series.expired_overflow",
            vec![],
            st.expired_overflow.into(),
        ));
        h.push((c, "metricsd.series.recreated", vec![], st.recreated.into()));
        h.push((g, "metricsd.services", vec![], st.services.into()));
        h.push((
            c,
            "metricsd.services.released",
            vec![],
            st.services_released.into(),
        ));
        let sp = self.spans.stats();
        h.push((g, "metricsd.spans.live", vec![], sp.live.into()));
        h.push((c, "metricsd.spans.orphaned", vec![], sp.orphaned.into()));
        h.push((c, "metricsd.spans.expired", vec![], sp.expired.into()));
        h.push((c, "metricsd.spans.ended", vec![], sp.ended.into()));
        h.push((c, "metricsd.spans.exported", vec![], sp.exported.into()));
        h.push((
            c,
            "metricsd.spans.dropped",
            vec![("reason", "rate_limited".into())],
            sp.rate_limited.into(),
        ));
        h.push((g, "metricsd.spans.early", vec![], sp.early.into()));
        h.push((c, "metricsd.spans.logged", vec![], sp.logged.into()));
        h.push((c, "metricsd.spans.not_logged", vec![], sp.not_logged.into()));
        h.push((
            c,
            "metricsd.export.failures",
            vec![],
            export.failures.into(),
        ));
        h.push((c, "metricsd.export.dropped", vec![], export.dropped.into()));
        h.push((c, "metricsd.export.refused", vec![], export.refused.into()));
        if let Some(otlp) = &self.otlp {
            let o = otlp.shared().stats();
            for (signal, n) in &o.accepted {
                let l = vec![("signal", signal.as_str().into())];
                h.push((c, "metricsd.otlp.accepted", l, (*n).into()));
            }
            for (signal, n) in &o.requests_ok {
                let l = vec![("signal", signal.as_str().into())];
                h.push((c, "metricsd.otlp.requests", l, (*n).into()));
            }
            for (signal, n) in &o.rejected {
                let l = vec![("signal", signal.as_str().into())];
                h.push((c, "metricsd.otlp.rejected", l, (*n).into()));
            }
            for (signal, n) in &o.retries {
                let l = vec![("signal", signal.as_str().into())];
                h.push((c, "metricsd.otlp.retries", l, (*n).into()));
            }
            for (reason, n) in &o.failures {
                let l = vec![("reason", reason.clone())];
                h.push((c, "metricsd.otlp.failures", l, (*n).into()));
            }
            for ((signal, reason), n) in &o.dropped {
                let l = vec![
                    ("signal", signal.as_str().into()),
                    ("reason", reason.clone()),
                ];
                h.push((c, "metricsd.otlp.dropped", l, (*n).into()));
            }
            h.push((
                g,
                "metricsd.otlp.pending",
                vec![],
                otlp.shared().pending().into(),
            ));
        }
        h.push((c, "metricsd.grant.messages", vec![], grant.messages.into()));
        h.push((c, "metricsd.grant.granted", vec![], grant.granted.into()));
        for (class, n) in &grant.refused {
            h.push((
                c,
                "metricsd.grant.refused",
                vec![("class", (*class).into())],
                (*n).into(),
            ));
        }
        let retention_rows = self
            .retention
            .as_ref()
            .map(crate::retention::Retention::health)
            .unwrap_or_default();
        for (counter, name, labels, value) in retention_rows {
            let kind = if counter { c } else { g };
            h.push((kind, name, labels, value));
        }
        if let Some(w) = &self.wal {
            let st = w.stats();
            h.push((c, "metricsd.wal.bytes", vec![], st.bytes.into()));
            h.push((c, "metricsd.wal.commits", vec![], st.commits.into()));
            h.push((
                c,
                "metricsd.wal.write_errors",
                vec![],
                st.write_errors.into(),
            ));
            h.push((
                g,
                "metricsd.wal.restored_series",
                vec![],
                st.restored_series.into(),
            ));
            h.push((
                g,
                "metricsd.wal.returnable_rings",
                vec![],
                st.returnable_rings.into(),
            ));
            for (outcome, n) in [("finished", st.returned), ("refused", st.returns_refused)] {
                h.push((
                    c,
                    "metricsd.wal.returned",
                    vec![("outcome", outcome.into())],
                    n.into(),
                ));
            }
            h.push((
                c,
                "metricsd.wal.lost",
                vec![("kind", "histogram".into())],
                st.lost_histogram.into(),
            ));
            h.push((
                c,
                "metricsd.wal.replay_bad_frames",
                vec![],
                st.replay_bad_frames.into(),
            ));
        }
        for (reason, n) in &grant.refused_reasons {
            h.push((
                c,
                "metricsd.grant.refused_reason",
                vec![("reason", (*reason).into())],
                (*n).into(),
            ));
        }
        h.push((g, "metricsd.rings.bytes", vec![], grant.ring_bytes.into()));
        let mut rows: Vec<HealthSeries> = h
            .into_iter()
            .map(|(kind, name, labels, value)| {
                let pairs: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                HealthSeries {
                    kind,
                    name,
                    labels: schema::labels(&pairs),
                    value,
                }
            })
            .collect();
        if let Some(scrape) = &self.scrape_stats {
            rows.extend(scrape.health());
        }
        rows
    }

    /// Includes the scrape endpoint's counters in the health series.
    pub fn set_scrape_stats(&mut self, stats: Arc<crate::scrape::ScrapeStats>) {
        self.scrape_stats = Some(stats);
    }

    fn snapshot_core(&self) -> Snapshot {
        let mut rings: Vec<RingSnapshot> = self.rings.iter().map(ring_snapshot).collect();
        rings.extend(self.closed.iter().cloned());
        Snapshot {
            series: Vec::new(),
            metadata: Vec::new(),
            rings,
            rejects: self.rejects.clone(),
            violations: self.violations,
            store: self.store.stats(),
            spans: self.spans.stats(),
            drain: self.stats,
            grant: GrantStats::default(),
            export: Default::default(),
            health: Vec::new(),
        }
    }

    /// The full snapshot.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = self.snapshot_core();
        s.series = self.store.all().cloned().collect();
        s.metadata = self.store.all_metadata();
        s.grant = self
            .grant
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        s.export = self.queue.stats();
        s.health = self.health_rows();
        s
    }

    /// Brings `table` up to date with the series store (copying only the series that
    /// changed since its last update) and returns the view scrapes render.
    pub fn scrape_view(
        &mut self,
        table: &mut crate::scrape::ScrapeTable,
    ) -> crate::scrape::ScrapeView {
        table.update(&mut self.store);
        table.view(self.health_rows())
    }

    /// Rejects counted in `class`.
    pub fn rejects_in(&self, class: Class) -> u64 {
        self.rejects.class_total(class)
    }
}

fn ring_snapshot(r: &RingState) -> RingSnapshot {
    let st = r.reader.stats();
    RingSnapshot {
        id: r.id,
        connection: r.connection,
        service: r.service.to_string(),
        capacity: r.reader.capacity(),
        consumed: st.consumed,
        producer_dropped: st.producer_dropped,
        pending: r.pending,
        keys: r.keys.len(),
        quarantined: r.reader.quarantined().map(|v| v.reason()),
        closed: false,
    }
}

/// How the drain loop sleeps when every ring is empty (`[drain]` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdlePolicy {
    /// First sleep after an empty pass; doubled after each further empty pass.
    pub min: Duration,
    /// Longest sleep while recently busy.
    pub max: Duration,
    /// After this long with nothing drained, sleep `deep` instead.
    pub deep_after: Duration,
    /// The sleep once idle for `deep_after`.
    pub deep: Duration,
    /// Time between exports (no sleep runs past the next export).
    pub interval: Duration,
}

impl IdlePolicy {
    /// The policy `config` sets.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let d = &config.drain;
        Self {
            min: Duration::from_micros(u64::from(d.idle_min_us)),
            max: Duration::from_micros(u64::from(d.idle_max_us)),
            deep_after: Duration::from_millis(u64::from(d.deep_idle_after_ms)),
            deep: Duration::from_millis(u64::from(d.deep_idle_ms)),
            interval: config.export_interval(),
        }
    }

    /// The sleep after an empty pass, given the current short backoff and how long
    /// every ring has been empty.
    fn sleep(&self, backoff: Duration, idle_for: Duration) -> Duration {
        if idle_for >= self.deep_after {
            self.deep.max(backoff)
        } else {
            backoff
        }
    }
}

/// Runs the drain loop until [`Command::Shutdown`] or every sender is gone.
pub fn run(
    mut d: Drainer,
    rx: Receiver<Command>,
    policy: IdlePolicy,
    published: Option<Arc<crate::scrape::Published>>,
) {
    let mut backoff = policy.min;
    let mut idle_since: Option<Instant> = None;
    let mut next_export = Instant::now() + policy.interval;
    let mut table = crate::scrape::ScrapeTable::new();
    if let Some(p) = &published {
        // Scrapes before the first export see the (empty) start.
        p.publish(Arc::new(d.scrape_view(&mut table)));
    }
    let mut snapshots: Vec<Sender<Snapshot>> = Vec::new();
    let mut exports: Vec<Sender<()>> = Vec::new();
    let mut stop = false;
    let handle = |d: &mut Drainer,
                  cmd: Command,
                  snapshots: &mut Vec<Sender<Snapshot>>,
                  exports: &mut Vec<Sender<()>>|
     -> bool {
        match cmd {
            Command::AddRing(r) => d.add_ring(r),
            Command::ReturnRing(r) => {
                let reply = r.reply.clone();
                let status = d.return_ring(r);
                let _ = reply.send(status);
            }
            Command::CloseConnection(c) => d.close_connection(c),
            Command::Snapshot(tx) => snapshots.push(tx),
            Command::ExportNow(tx) => exports.push(tx),
            Command::Shutdown => return true,
        }
        false
    };
    loop {
        let mut commands = false;
        loop {
            match rx.try_recv() {
                Ok(cmd) => {
                    commands = true;
                    stop |= handle(&mut d, cmd, &mut snapshots, &mut exports);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    stop = true;
                    break;
                }
            }
        }
        let consumed = d.pass();
        let now = Instant::now();
        if now >= next_export || !exports.is_empty() || stop {
            d.export();
            if let Some(p) = &published {
                // Once per export, never per scrape: scrapes render from this view,
                // which copies only the series the export found changed.
                p.publish(Arc::new(d.scrape_view(&mut table)));
            }
            next_export = now + policy.interval;
            for tx in exports.drain(..) {
                let _ = tx.send(());
            }
        }
        if !snapshots.is_empty() {
            let snap = d.snapshot();
            for tx in snapshots.drain(..) {
                let _ = tx.send(snap.clone());
            }
        }
        if stop {
            d.close_retention();
            if let Some(w) = &mut d.wal {
                w.sync();
            }
            return;
        }
        if consumed == 0 && !commands {
            let since = *idle_since.get_or_insert(now);
            let sleep = policy.sleep(backoff, now.saturating_duration_since(since));
            let wait = sleep.min(next_export.saturating_duration_since(Instant::now()));
            match rx.recv_timeout(wait) {
                Ok(cmd) => {
                    // A new ring or a request: be responsive again.
                    idle_since = None;
                    backoff = policy.min;
                    stop |= handle(&mut d, cmd, &mut snapshots, &mut exports);
                }
                Err(RecvTimeoutError::Timeout) => backoff = (backoff * 2).min(policy.max),
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
        } else {
            idle_since = None;
            backoff = policy.min;
        }
    }
}

#[cfg(test)]
mod idle_tests {
    use super::IdlePolicy;
    use std::time::Duration;

    #[test]
    fn the_sleep_deepens_only_after_the_idle_threshold() {
        let p = IdlePolicy {
            min: Duration::from_micros(100),
            max: Duration::from_micros(1000),
            deep_after: Duration::from_secs(1),
            deep: Duration::from_millis(100),
            interval: Duration::from_secs(1),
        };
        let b = Duration::from_micros(400);
        assert_eq!(p.sleep(b, Duration::from_millis(999)), b);
        assert_eq!(
            p.sleep(b, Duration::from_secs(1)),
            Duration::from_millis(100)
        );
        // A configured deep sleep shorter than the backoff never shortens it.
        let shallow = IdlePolicy {
            deep: Duration::from_micros(50),
            ..p
        };
        assert_eq!(shallow.sleep(b, Duration::from_secs(5)), b);
    }
}
