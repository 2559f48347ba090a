//! Each thread's state: its ring (claimed lazily), its key table, its counts and its
//! open span.
//!
//! The hot path is: one thread-local access, a `RefCell` borrow flag, one relaxed load
//! of the ring generation compared with the ring's, then the core recorder's
//! registered-bit check and ring push. Everything else (claiming, reclaiming, backoff,
//! registration, counting drops) sits behind `#[cold]` functions.

use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use telemetry_abi::{Record, RecordKind, RegisterKind, SpanStatus};
use telemetry_ring::{MemfdRegion, Writer};

use crate::global::{count_unavailable, global, monotonic_ns};
use crate::intern::{GlobalRegistry, KeyError};
use crate::key::{Discarded, Key, KeyTable};
use crate::recorder::{AttrValue, Delivery, Dropped, Recorder, SpanId};
use crate::source::{ClaimError, forks, generation};
use crate::stats::{Counts, DropReason, Event};
use crate::trace::{SpanContext, next_ids};

type GlobalRecorder = Recorder<MemfdRegion, Box<[u64]>, GlobalRegistry>;

/// No span: the thread's innermost open span when it has none.
pub(crate) const NO_SPAN: SpanContext = SpanContext {
    trace_id: 0,
    span_id: 0,
    flags: 0,
};

/// Open spans a thread tracks as the implicit parents of its next spans; a span opened
/// deeper is recorded as usual but does not become the implicit parent.
const MAX_NESTED: usize = 16;

/// Records made without a ring between two looks at the clock for a retry.
const RETRY_CHECK_EVERY: u32 = 16;

/// Entries in the per-thread cache of `&'static str` attribute keys and values.
const STR_CACHE: usize = 16;

struct Ring {
    recorder: GlobalRecorder,
    /// The generation the ring belongs to; the ring is stale once it differs from
    /// [`generation()`].
    generation: u64,
}

enum Slot {
    /// No ring, nothing tried yet (or the last one went stale): claim on the next record.
    Unclaimed,
    Ready(Ring),
    /// The last claim failed: drop records until `retry_at_ns`.
    Waiting {
        reason: DropReason,
        countdown: u32,
        retry_at_ns: u64,
        backoff_ns: u64,
    },
}

pub(crate) struct Local {
    slot: Slot,
    /// The key table while no ring holds it (pending counter deltas survive a ring).
    table: Option<KeyTable<Box<[u64]>>>,
    counts: Option<Arc<Counts>>,
    /// This thread's serial number in the process (the grant request's hint).
    thread: u64,
    /// Rings this thread has claimed.
    rings: u64,
    /// The spans this thread opened and has not ended, outermost first (the first
    /// `depth`): the innermost is the implicit parent of the next span it opens.
    open: [SpanContext; MAX_NESTED],
    depth: usize,
    /// (address, length, kind, key) of recently interned `&'static str`s.
    strs: [(usize, usize, u16, u32); STR_CACHE],
    /// A released ring its consumer had not closed yet: metricsd hangs up on a producer
    /// before its last drain of the producer's rings, so a thread can let go of a ring
    /// while records it wrote after that drain's look at the write position are still
    /// unread. Checked again on slow paths ([`Local::check_retired`]) until metricsd
    /// closes it, then accounted for like a ring found closed at release. One per thread;
    /// a ring whose consumer never closes it (a crash) is let go when the next one
    /// retires or the thread exits, its unread records counted as unconfirmed
    /// ([`Local::let_go_retired`]).
    retired: Option<Writer<MemfdRegion>>,
    /// [`forks`] when this state was last known to be this process's own.
    forks: u64,
    /// The thread's exit accounting has run ([`ExitGuard`]): no ring is claimed and
    /// nothing allocated any more; records are counted as unavailable.
    exited: bool,
}

thread_local! {
    /// The thread's state. It has no drop glue, so the hot path reaches it at a plain
    /// thread-local address: a thread-local with a destructor is checked on every
    /// access and registers the destructor on the first, and that registration call in
    /// the same function made an out-of-line record save five registers on every call.
    /// The state is torn down by [`ExitGuard`] instead.
    static LOCAL: ManuallyDrop<RefCell<Local>> =
        const { ManuallyDrop::new(RefCell::new(Local::new())) };
    /// Touched on a cold path once the state holds something to give back (a ring, a
    /// thread's counts); its destructor runs the state's thread-exit accounting.
    static EXIT: ExitGuard = const { ExitGuard };
}

/// Runs `Local`'s `Drop` (thread-exit accounting, unmapping its rings) when the thread
/// exits, leaving behind a state that claims nothing more.
struct ExitGuard;

impl Drop for ExitGuard {
    fn drop(&mut self) {
        // Take the state out under the borrow, drop it after: its accounting may look
        // at other thread-locals but never at this one.
        let state = LOCAL.with(|cell| {
            cell.try_borrow_mut()
                .ok()
                .map(|mut local| std::mem::replace(&mut *local, Local::exited()))
        });
        drop(state);
    }
}

/// Makes sure the thread's exit accounting will run. A thread already past it (its
/// guard destroyed) cannot register again; its state is then `exited`.
fn arm_exit() {
    let _ = EXIT.try_with(|_| ());
}

static NEXT_THREAD: AtomicU64 = AtomicU64::new(1);

/// One kind of record, applied to the core recorder. A type per kind (rather than
/// one enum) gives each its own copy of the thread-local access, small enough to
/// inline, with the key and value in registers.
pub(crate) trait Op: Copy {
    /// The fast path: writes the record if nothing else is needed first (no pending
    /// deltas, the key registered in this ring, room). False changes nothing: the
    /// caller takes the slow path, which applies the op in full.
    fn fast(self, recorder: &mut GlobalRecorder) -> bool;
    fn apply(self, recorder: &mut GlobalRecorder) -> Result<Delivery, Dropped>;
    /// Holds the record's state in the key table while the thread has no ring (see
    /// [`crate::hold`]); false: the kind is not held, or the table refused it.
    fn hold(self, _table: &mut KeyTable<Box<[u64]>>) -> bool {
        false
    }
}

/// A counter increment: key, amount.
#[derive(Clone, Copy)]
pub(crate) struct CounterOp(pub(crate) u32, pub(crate) u64);

/// A gauge set: key, value.
#[derive(Clone, Copy)]
pub(crate) struct GaugeOp(pub(crate) u32, pub(crate) i64);

/// A histogram observation: key, value.
#[derive(Clone, Copy)]
pub(crate) struct HistogramOp(pub(crate) u32, pub(crate) u64);

impl Op for CounterOp {
    #[inline(always)]
    fn fast(self, recorder: &mut GlobalRecorder) -> bool {
        recorder.try_fast(self.0, Record::counter(self.0, self.1))
    }
    #[inline(always)]
    fn apply(self, recorder: &mut GlobalRecorder) -> Result<Delivery, Dropped> {
        recorder.counter_raw(self.0, self.1)
    }
    fn hold(self, table: &mut KeyTable<Box<[u64]>>) -> bool {
        table.add_pending(self.0, self.1)
    }
}

impl Op for GaugeOp {
    #[inline(always)]
    fn fast(self, recorder: &mut GlobalRecorder) -> bool {
        recorder.try_fast(self.0, Record::gauge(self.0, self.1))
    }
    #[inline(always)]
    fn apply(self, recorder: &mut GlobalRecorder) -> Result<Delivery, Dropped> {
        recorder
            .sample_raw(Record::gauge(self.0, self.1))
            .map(|()| Delivery::Written)
    }
    fn hold(self, table: &mut KeyTable<Box<[u64]>>) -> bool {
        table.hold_gauge(self.0, self.1)
    }
}

impl Op for HistogramOp {
    #[inline(always)]
    fn fast(self, recorder: &mut GlobalRecorder) -> bool {
        recorder.try_fast(self.0, Record::histogram(self.0, self.1))
    }
    #[inline(always)]
    fn apply(self, recorder: &mut GlobalRecorder) -> Result<Delivery, Dropped> {
        recorder
            .sample_raw(Record::histogram(self.0, self.1))
            .map(|()| Delivery::Written)
    }
}

/// A float gauge set: key, value.
#[derive(Clone, Copy)]
pub(crate) struct GaugeF64Op(pub(crate) u32, pub(crate) f64);

/// A float gauge increment (negative: decrement): key, amount. Coalesced on a full ring.
#[derive(Clone, Copy)]
pub(crate) struct GaugeAddOp(pub(crate) u32, pub(crate) f64);

/// A float histogram observation: key, value.
#[derive(Clone, Copy)]
pub(crate) struct HistogramF64Op(pub(crate) u32, pub(crate) f64);

/// The registration of a key no sample carries (a metric's metadata): key.
#[derive(Clone, Copy)]
pub(crate) struct DeclareOp(pub(crate) u32);

impl Op for GaugeF64Op {
    #[inline(always)]
    fn fast(self, recorder: &mut GlobalRecorder) -> bool {
        recorder.try_fast(self.0, Record::gauge_f64(self.0, self.1))
    }
    #[inline(always)]
    fn apply(self, recorder: &mut GlobalRecorder) -> Result<Delivery, Dropped> {
        recorder
            .gauge_f64_raw(self.0, self.1)
            .map(|()| Delivery::Written)
    }
    fn hold(self, table: &mut KeyTable<Box<[u64]>>) -> bool {
        self.1.is_finite() && table.hold_gauge_f64(self.0, self.1)
    }
}

impl Op for GaugeAddOp {
    #[inline(always)]
    fn fast(self, recorder: &mut GlobalRecorder) -> bool {
        recorder.try_fast(self.0, Record::gauge_f64_add(self.0, self.1))
    }
    #[inline(always)]
    fn apply(self, recorder: &mut GlobalRecorder) -> Result<Delivery, Dropped> {
        recorder.gauge_add_f64_raw(self.0, self.1)
    }
    fn hold(self, table: &mut KeyTable<Box<[u64]>>) -> bool {
        table.add_pending_f64(self.0, self.1)
    }
}

impl Op for HistogramF64Op {
    #[inline(always)]
    fn fast(self, recorder: &mut GlobalRecorder) -> bool {
        recorder.try_fast(self.0, Record::histogram_f64(self.0, self.1))
    }
    #[inline(always)]
    fn apply(self, recorder: &mut GlobalRecorder) -> Result<Delivery, Dropped> {
        recorder
            .sample_raw(Record::histogram_f64(self.0, self.1))
            .map(|()| Delivery::Written)
    }
}

impl Op for DeclareOp {
    fn fast(self, _recorder: &mut GlobalRecorder) -> bool {
        // Always the slow path: declarations are rare and write no sample.
        false
    }
    fn apply(self, recorder: &mut GlobalRecorder) -> Result<Delivery, Dropped> {
        match Key::new(self.0) {
            Some(key) => recorder.declare(key).map(|()| Delivery::Written),
            None => Err(Dropped::UnknownKey),
        }
    }
}

/// Records `op` in the calling thread's ring.
///
/// The fast path runs alone under the borrow and calls nothing, so where it is not
/// inlined (a function with several call sites of one kind of record keeps one
/// out-of-line copy) it is a leaf and saves no registers: the ring's lines come back
/// from the consumer's core and x86 commits stores in order, so any store a record adds
/// waits behind the ring's. The rest is [`record_slow`], which takes the borrow again.
/// With the cold path called from inside the borrow instead, a loop recording four
/// handles in turn cost two to three times as much a record (`benches/README.md` as of
/// commit a8cb4ac, "Runs 11 to 13").
///
/// `try_with`, not `with`: `with` is a separate generic function around `try_with`
/// that a build without LTO did not inline into the caller's loop, so every record
/// paid a call with its arguments passed through the stack. `try_with` is the one the
/// compiler inlines where it inlines anything, and this state (constant-initialised,
/// no destructor) is never inaccessible, so its error arm is dead code; it would count
/// as unavailable.
#[inline(always)]
pub(crate) fn record(op: impl Op) {
    let written = LOCAL.try_with(|cell| match cell.try_borrow_mut() {
        Ok(mut local) => local.try_fast(op),
        Err(_) => false,
    });
    if written != Ok(true) {
        record_slow(op);
    }
}

/// Everything [`record`]'s fast path does not do, under a new borrow.
#[cold]
#[inline(never)]
fn record_slow(op: impl Op) {
    let done = LOCAL.try_with(|cell| match cell.try_borrow_mut() {
        Ok(mut local) => {
            local.record_cold(op);
            true
        }
        Err(_) => false,
    });
    if done != Ok(true) {
        count_unavailable(1);
    }
}

/// Counts a record a no-op handle dropped.
#[cold]
#[inline(never)]
pub(crate) fn count_noop(reason: DropReason) {
    with_local(|local| local.count(Event::Dropped(reason), 1));
}

/// Runs `f` on the thread's state (let go of first if it is a forked parent's, see
/// [`Local::leave_parent`]), or counts an unavailable record. Every entry but the
/// record fast path comes through here; that one reaches `Local::ring` when it misses.
fn with_local<T>(f: impl FnOnce(&mut Local) -> T) -> Option<T> {
    let result = LOCAL.with(|cell| {
        cell.try_borrow_mut().ok().map(|mut local| {
            local.leave_parent();
            f(&mut local)
        })
    });
    if result.is_none() {
        count_unavailable(1);
    }
    result
}

/// Writes the thread's pending counter deltas; true when none is left.
pub(crate) fn flush() -> bool {
    with_local(Local::flush).unwrap_or(false)
}

/// Like [`flush`], retrying every 50 µs until `timeout` has passed.
pub(crate) fn flush_for(timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if flush() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// A started span, as its guard remembers it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Started {
    /// Its trace context (span id 0: never started).
    pub(crate) ctx: SpanContext,
    /// The thread that opened it (its serial number in the process).
    pub(crate) thread: u64,
    /// The ring generation it was opened in: it can end only on a ring of the same.
    pub(crate) generation: u64,
}

impl Started {
    pub(crate) const NONE: Self = Self {
        ctx: NO_SPAN,
        thread: 0,
        generation: 0,
    };
}

/// Where a new span hangs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Parent {
    /// The thread's innermost open span, or a new trace if none.
    Current,
    /// This span (of this process or one a `traceparent` named).
    Of(SpanContext),
}

/// Opens span `name` under `parent`.
pub(crate) fn span_start(name: u32, parent: Parent) -> Started {
    let now = global().now_ns();
    with_local(|local| local.span_start(name, parent, now, true)).unwrap_or(Started::NONE)
}

/// Opens span `name` under `parent` without making it the thread's implicit parent:
/// a `tracing` span's children are the ones its registry names.
#[cfg(feature = "tracing")]
pub(crate) fn span_open_detached(name: u32, parent: Parent) -> Started {
    let now = global().now_ns();
    with_local(|local| local.span_start(name, parent, now, false)).unwrap_or(Started::NONE)
}

/// Writes the attributes `attrs` (interned keys and values) of a started span, in the
/// calling thread's ring (any ring of the connection the span was opened on).
#[cfg(feature = "tracing")]
pub(crate) fn span_notes(started: Started, attrs: &[(u32, AttrValue)]) {
    if started.ctx.span_id == 0 || attrs.is_empty() {
        return;
    }
    with_local(|local| local.span_notes(started, attrs));
}

/// Closes a started span (on any thread).
pub(crate) fn span_end(name: u32, started: Started, status: SpanStatus) {
    let now = global().now_ns();
    with_local(|local| local.span_end(name, started, status, now));
}

/// A span attribute value before interning.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RawAttr {
    U64(u64),
    I64(i64),
    Str(&'static str),
}

/// Sets an attribute of a started span.
pub(crate) fn span_attr(started: Started, attr: &'static str, value: RawAttr) {
    with_local(|local| local.span_attr(started, attr, value));
}

impl Local {
    const fn new() -> Self {
        Self {
            slot: Slot::Unclaimed,
            table: None,
            counts: None,
            thread: 0,
            rings: 0,
            open: [NO_SPAN; MAX_NESTED],
            depth: 0,
            strs: [(0, 0, 0, 0); STR_CACHE],
            retired: None,
            forks: 0,
            exited: false,
        }
    }

    /// What a thread's state becomes once its exit accounting ran.
    fn exited() -> Self {
        let mut local = Self::new();
        local.exited = true;
        local
    }

    /// Writes `op`'s record if nothing else is needed first; false changes nothing.
    #[inline(always)]
    fn try_fast(&mut self, op: impl Op) -> bool {
        match &mut self.slot {
            Slot::Ready(ring) => ring.generation == generation() && op.fast(&mut ring.recorder),
            _ => false,
        }
    }

    /// Everything but the fast path: no ring yet (or a stale one), a key not yet
    /// registered in this ring, pending deltas to write first, a full ring.
    #[cold]
    #[inline(never)]
    fn record_cold(&mut self, op: impl Op) {
        let result = match self.ring() {
            Ok(ring) => op.apply(&mut ring.recorder),
            Err(reason) => {
                if crate::hold::hold(self, op, reason) {
                    return self.count(Event::Held, 1);
                }
                return self.count(Event::Dropped(reason), 1);
            }
        };
        self.settle(result);
    }

    /// Counts what the core recorder did with a record that did not simply go in, and
    /// notices a ring its consumer abandoned.
    #[cold]
    #[inline(never)]
    fn settle(&mut self, result: Result<Delivery, Dropped>) {
        let event = match result {
            Ok(Delivery::Written) => return,
            Ok(Delivery::Coalesced) => Event::Coalesced,
            Err(Dropped::RingFull) => Event::Dropped(DropReason::RingFull),
            // Handles only carry keys the interner gave out, all inside the table.
            Err(Dropped::UnknownKey) => Event::Dropped(DropReason::Invalid),
        };
        self.count(event, 1);
        if let Slot::Ready(ring) = &mut self.slot {
            if matches!(result, Ok(Delivery::Coalesced) | Err(Dropped::RingFull))
                && ring.recorder.is_abandoned()
            {
                // metricsd closed or quarantined the ring: claim a new one next time.
                ring.generation = generation().wrapping_sub(1);
            }
        }
    }

    /// The thread's usable ring, claiming one if it has none (or a stale one) and the
    /// backoff allows. Every slow path comes through here, so this is also where a
    /// retired ring is looked at again.
    fn ring(&mut self) -> Result<&mut Ring, DropReason> {
        // The common case, a current ring with nothing to look after, skips the checks
        // below, each of which would find nothing to do.
        let current = !self.exited
            && self.retired.is_none()
            && self.forks == forks()
            && matches!(&self.slot, Slot::Ready(ring) if ring.generation == generation());
        if !current {
            self.ring_slow()?;
        }
        match &mut self.slot {
            Slot::Ready(ring) => Ok(ring),
            _ => Err(DropReason::NoMetricsd),
        }
    }

    /// [`ring`](Self::ring) when the thread has no current ring, a retired one to
    /// account for, or is a forked child: makes the slot ready or says why not.
    #[cold]
    fn ring_slow(&mut self) -> Result<(), DropReason> {
        if self.exited {
            return Err(DropReason::Unavailable);
        }
        self.leave_parent();
        self.check_retired();
        let mut backoff_ns = 0;
        match &mut self.slot {
            Slot::Ready(ring) if ring.generation == generation() => {}
            Slot::Ready(_) => self.release(),
            Slot::Unclaimed => {}
            Slot::Waiting {
                reason,
                countdown,
                retry_at_ns,
                backoff_ns: previous,
            } => {
                *countdown = countdown.saturating_sub(1);
                if *countdown > 0 {
                    return Err(*reason);
                }
                *countdown = RETRY_CHECK_EVERY;
                if monotonic_ns() < *retry_at_ns {
                    return Err(*reason);
                }
                backoff_ns = *previous;
            }
        }
        if !matches!(self.slot, Slot::Ready(_)) {
            self.claim(backoff_ns)?;
        }
        Ok(())
    }

    /// In a child process after `fork()`, the thread's first slow path finds state made
    /// in the parent: the ring, the retired ring and the pending counter deltas are the
    /// parent's, who still writes that ring and still owes those deltas. Lets all of it
    /// go without writing or counting anything (the child's copy of the mappings is
    /// unmapped), so the child claims a ring of its own and starts with a fresh key
    /// table. The parent's spans open in this thread end as `no_metricsd` here.
    fn leave_parent(&mut self) {
        let forks = forks();
        if self.forks == forks {
            return;
        }
        self.forks = forks;
        self.slot = Slot::Unclaimed;
        self.table = None;
        self.retired = None;
        self.depth = 0;
    }

    /// Drops the current ring, keeping the key table (and its pending deltas).
    ///
    /// If metricsd closed the ring after its last drain (a restart, say), what it had
    /// not read is known exactly: counter increments among it go back into the pending
    /// deltas (so they reach the next ring: late, never short) and every other record
    /// is counted as dropped. A ring not closed yet is kept as the thread's retired ring
    /// and accounted for the same way once it is. A ring whose consumer vanished without
    /// closing it (a crash) gives no such account: its unread records are counted as
    /// unconfirmed when the thread lets go of it.
    fn release(&mut self) {
        if let Slot::Ready(ring) = std::mem::replace(&mut self.slot, Slot::Unclaimed) {
            let (mut writer, mut table, _) = ring.recorder.into_parts();
            if writer.is_closed() {
                let lost = salvage(&mut writer, |held| match held {
                    Held::Counter(key, n) => table.add_pending(key, n),
                    Held::GaugeAdd(key, x) => table.add_pending_f64(key, x),
                });
                self.count_salvage_loss(lost);
            } else {
                self.let_go_retired();
                self.retired = Some(writer);
            }
            self.table = Some(table);
        }
        self.depth = 0;
    }

    /// Accounts for the retired ring once its consumer has closed it: its unread
    /// counter increments become pending deltas of the current key table (the ring's,
    /// or the one kept while there is no ring), the rest is counted as dropped.
    fn check_retired(&mut self) {
        let Some(mut writer) = self.retired.take_if(|w| w.is_closed()) else {
            return;
        };
        let lost = match (&mut self.slot, &mut self.table) {
            (Slot::Ready(ring), _) => salvage(&mut writer, |held| match held {
                Held::Counter(key, n) => ring.recorder.hold_back(key, n),
                Held::GaugeAdd(key, x) => ring.recorder.hold_back_f64(key, x),
            }),
            (_, Some(table)) => salvage(&mut writer, |held| match held {
                Held::Counter(key, n) => table.add_pending(key, n),
                Held::GaugeAdd(key, x) => table.add_pending_f64(key, x),
            }),
            // No key table at all: nothing can hold the increments.
            (_, None) => salvage(&mut writer, |_| false),
        };
        self.count_salvage_loss(lost);
    }

    /// Gives up the retired ring while its consumer has not closed it: the records it
    /// has not read may never be read (metricsd crashed) or may still be (a slow last
    /// drain), so they are counted as unconfirmed, neither dropped nor resent.
    /// Registrations are not counted: a new ring gets its own.
    fn let_go_retired(&mut self) {
        let Some(mut writer) = self.retired.take() else {
            return;
        };
        let mut unread = 0;
        writer.for_each_unconsumed(|record| {
            if !matches!(
                record.kind,
                RecordKind::REGISTER | RecordKind::REGISTER_DATA
            ) {
                unread += 1;
            }
        });
        if unread > 0 {
            self.count(Event::Unconfirmed, unread);
        }
    }

    fn count_salvage_loss(&mut self, lost: u64) {
        if lost > 0 {
            self.count(Event::Dropped(DropReason::NoMetricsd), lost);
        }
    }

    #[cold]
    #[inline(never)]
    fn claim(&mut self, previous_backoff_ns: u64) -> Result<(), DropReason> {
        let global = global();
        if self.thread == 0 {
            // ORDERING: Relaxed: a unique number, nothing published with it.
            self.thread = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
        }
        match global.source.claim(self.thread) {
            Ok((writer, info)) => {
                let table = self.table.take().unwrap_or_else(new_table);
                self.rings += 1;
                self.depth = 0; // (span depth)
                let mut recorder = Recorder::new(writer, table, GlobalRegistry);
                // The metrics' metadata described so far, for this ring's consumer (a
                // new metricsd after a restart knows nothing). Cold: once per ring.
                for key in global.metadata_keys().into_iter().filter_map(Key::new) {
                    if recorder.declare(key).is_err() {
                        self.count(Event::Dropped(DropReason::RingFull), 1);
                    }
                }
                self.slot = Slot::Ready(Ring {
                    recorder,
                    generation: info.generation,
                });
                self.count(Event::RingClaimed, 1);
                Ok(())
            }
            Err(e) => {
                let reason = match e {
                    ClaimError::Unreachable { .. } => DropReason::NoMetricsd,
                    ClaimError::Refused(status)
                        if status == telemetry_abi::GrantStatus::OVER_LIMIT =>
                    {
                        DropReason::OverLimit
                    }
                    _ => DropReason::Refused,
                };
                let backoff_ns = if previous_backoff_ns == 0 {
                    global.retry_min_ns
                } else {
                    previous_backoff_ns
                        .saturating_mul(2)
                        .min(global.retry_max_ns)
                };
                self.slot = Slot::Waiting {
                    reason,
                    countdown: RETRY_CHECK_EVERY,
                    retry_at_ns: monotonic_ns().saturating_add(backoff_ns),
                    backoff_ns,
                };
                self.count(Event::ClaimFailed, 1);
                Err(reason)
            }
        }
    }

    fn count(&mut self, event: Event, n: u64) {
        if self.exited {
            // After the exit accounting nothing is allocated: a drop goes to the
            // process-wide count of records with no usable thread state.
            if let Event::Dropped(_) = event {
                count_unavailable(n);
            }
            return;
        }
        if self.counts.is_none() {
            arm_exit();
        }
        self.counts
            .get_or_insert_with(|| global().thread_counts())
            .add_local(event, n);
    }

    fn flush(&mut self) -> bool {
        self.check_retired();
        let has_pending = match (&self.slot, &self.table) {
            (Slot::Ready(ring), _) => ring.recorder.pending_keys() > 0,
            (_, Some(table)) => table.pending_keys() > 0,
            _ => false,
        };
        if !has_pending {
            return true;
        }
        match self.ring() {
            Ok(ring) => ring.recorder.flush() == 0,
            Err(_) => false,
        }
    }

    fn span_start(&mut self, name: u32, parent: Parent, now: u64, implicit: bool) -> Started {
        let current = match self.depth {
            0 => NO_SPAN,
            d => self.open[d - 1],
        };
        let ring = match self.ring() {
            Ok(ring) => ring,
            Err(reason) => {
                self.count(Event::Dropped(reason), 1);
                return Started::NONE;
            }
        };
        let parent = match parent {
            Parent::Current => current,
            Parent::Of(p) => p,
        };
        let (span_id, root_trace) = next_ids();
        let ctx = if parent.span_id == 0 {
            SpanContext {
                trace_id: root_trace,
                span_id,
                flags: 1,
            }
        } else {
            SpanContext {
                trace_id: parent.trace_id,
                span_id,
                flags: parent.flags,
            }
        };
        let generation = ring.generation;
        let result = match (Key::new(name), SpanId::new(span_id)) {
            (Some(name), Some(id)) => {
                ring.recorder
                    .span_open(name, ctx.trace_id, id, parent.span_id, ctx.flags, now)
            }
            _ => Err(Dropped::UnknownKey),
        };
        match result {
            Ok(()) => {
                if implicit && self.depth < MAX_NESTED {
                    self.open[self.depth] = ctx;
                    self.depth += 1;
                }
                Started {
                    ctx,
                    thread: self.thread,
                    generation,
                }
            }
            Err(e) => {
                self.settle(Err(e));
                Started::NONE
            }
        }
    }

    fn span_end(&mut self, name: u32, started: Started, status: SpanStatus, now: u64) {
        if started.ctx.span_id == 0 {
            // Never started (counted then): nothing to end.
            return;
        }
        if started.thread == self.thread {
            // Ending on the thread that opened it: it and whatever this thread opened
            // inside it and sent elsewhere (or leaked) stop being implicit parents.
            if let Some(i) = self.open[..self.depth]
                .iter()
                .rposition(|c| c.span_id == started.ctx.span_id)
            {
                self.depth = i;
            }
        }
        let result = match self.ring() {
            // Any ring of the connection the span was opened on will do.
            Ok(ring) if ring.generation == started.generation => {
                match (Key::new(name), SpanId::new(started.ctx.span_id)) {
                    (Some(name), Some(id)) => ring.recorder.span_close(name, id, now, status),
                    _ => Err(Dropped::UnknownKey),
                }
            }
            // The connection it was opened on is gone (metricsd restarted).
            Ok(_) => return self.count(Event::Dropped(DropReason::NoMetricsd), 1),
            Err(reason) => return self.count(Event::Dropped(reason), 1),
        };
        if let Err(e) = result {
            self.settle(Err(e));
        }
    }

    fn span_attr(&mut self, started: Started, attr: &'static str, value: RawAttr) {
        if started.ctx.span_id == 0 {
            return;
        }
        let attr = match self.intern_str(RegisterKind::ATTR, attr) {
            Ok(key) => key,
            Err(reason) => return self.count(Event::Dropped(reason), 1),
        };
        let value = match value {
            RawAttr::U64(v) => AttrValue::U64(v),
            RawAttr::I64(v) => AttrValue::I64(v),
            RawAttr::Str(s) => match self.intern_str(RegisterKind::STRING, s) {
                Ok(key) => AttrValue::Str(key),
                Err(reason) => return self.count(Event::Dropped(reason), 1),
            },
        };
        let result = match (self.ring(), SpanId::new(started.ctx.span_id)) {
            (Ok(ring), Some(id)) if ring.generation == started.generation => {
                ring.recorder.span_note(id, attr, value)
            }
            (Err(reason), _) => return self.count(Event::Dropped(reason), 1),
            _ => return self.count(Event::Dropped(DropReason::NoMetricsd), 1),
        };
        if let Err(e) = result {
            self.settle(Err(e));
        }
    }

    #[cfg(feature = "tracing")]
    fn span_notes(&mut self, started: Started, attrs: &[(u32, AttrValue)]) {
        let ring = match self.ring() {
            Ok(ring) if ring.generation == started.generation => ring,
            // The connection it was opened on is gone (metricsd restarted).
            Ok(_) => {
                return self.count(Event::Dropped(DropReason::NoMetricsd), attrs.len() as u64);
            }
            Err(reason) => return self.count(Event::Dropped(reason), attrs.len() as u64),
        };
        let Some(id) = SpanId::new(started.ctx.span_id) else {
            return;
        };
        let (mut full, mut unknown) = (0u64, 0u64);
        for (attr, value) in attrs {
            let result = match Key::new(*attr) {
                Some(attr) => ring.recorder.span_note(id, attr, *value),
                None => Err(Dropped::UnknownKey),
            };
            match result {
                Ok(()) => {}
                Err(Dropped::RingFull) => full += 1,
                Err(Dropped::UnknownKey) => unknown += 1,
            }
        }
        if full > 0 {
            // Once through `settle`, which also notices a ring metricsd let go.
            self.settle(Err(Dropped::RingFull));
            self.count(Event::Dropped(DropReason::RingFull), full - 1);
        }
        if unknown > 0 {
            self.count(Event::Dropped(DropReason::Invalid), unknown);
        }
    }

    /// The key of a `&'static str` attribute key or string value, cached by address.
    fn intern_str(&mut self, kind: RegisterKind, s: &'static str) -> Result<Key, DropReason> {
        let (addr, len) = (s.as_ptr() as usize, s.len());
        let slot = ((addr >> 3) ^ len ^ usize::from(kind.0)) % STR_CACHE;
        let (a, l, k, key) = self.strs[slot];
        if (a, l, k) == (addr, len, kind.0) {
            if let Some(key) = Key::new(key) {
                return Ok(key);
            }
        }
        let key = global()
            .interner
            .intern(kind, s, &[])
            .map_err(|e| match e {
                KeyError::Invalid(_) => DropReason::Invalid,
                KeyError::Limit { .. } => DropReason::KeyLimit,
            })?;
        self.strs[slot] = (addr, len, kind.0, key.get());
        Ok(key)
    }
}

/// A key table for every key the process may register (the cold path's one
/// allocation per thread).
fn new_table() -> KeyTable<Box<[u64]>> {
    let keys = global().interner.max_keys() as usize + 1;
    KeyTable::new(vec![0; KeyTable::<Box<[u64]>>::words_for(keys)].into_boxed_slice())
}

impl Local {
    /// The key table kept while the thread has no ring, made on first use; `None`
    /// once the thread's exit accounting ran or while a ring holds the table.
    pub(crate) fn ringless_table(&mut self) -> Option<&mut KeyTable<Box<[u64]>>> {
        if self.exited || matches!(self.slot, Slot::Ready(_)) {
            return None;
        }
        if self.table.is_none() {
            arm_exit();
        }
        Some(self.table.get_or_insert_with(new_table))
    }
}

/// A delta found unread in a closed ring, to be held back for the next one.
#[derive(Clone, Copy)]
enum Held {
    /// A counter increment: key, amount.
    Counter(u32, u64),
    /// A float gauge increment: key, amount.
    GaugeAdd(u32, f64),
}

/// Visits what `writer` published and its (closed) consumer never read: counter
/// and float gauge increments are offered to `hold`, registrations skipped (a new ring
/// gets its own), everything else lost. Returns the records lost.
fn salvage(writer: &mut Writer<MemfdRegion>, mut hold: impl FnMut(Held) -> bool) -> u64 {
    let mut lost = 0;
    writer.for_each_unconsumed(|record| match record.kind {
        RecordKind::COUNTER => {
            if !hold(Held::Counter(record.key, record.words[0])) {
                lost += 1;
            }
        }
        RecordKind::GAUGE_F64_ADD => {
            if !hold(Held::GaugeAdd(record.key, f64::from_bits(record.words[0]))) {
                lost += 1;
            }
        }
        // Registrations are written again on the next ring before use.
        RecordKind::REGISTER | RecordKind::REGISTER_DATA => {}
        _ => lost += 1,
    });
    lost
}

impl Drop for Local {
    fn drop(&mut self) {
        // Best effort at thread exit: account for a retired ring metricsd has closed by
        // now (or count what it left unread as unconfirmed if it has not), then write
        // what counters still owe; what cannot be written now (the ring is still full,
        // or there is no ring) is counted as dropped, one record per key.
        self.leave_parent();
        self.check_retired();
        self.let_go_retired();
        let (reason, lost) = match &mut self.slot {
            Slot::Ready(ring) => {
                let lost = if ring.recorder.flush() > 0 {
                    ring.recorder.discard_pending()
                } else {
                    Discarded::default()
                };
                (DropReason::RingFull, lost)
            }
            _ => match &mut self.table {
                Some(table) => (DropReason::NoMetricsd, table.discard_pending()),
                None => (DropReason::NoMetricsd, Discarded::default()),
            },
        };
        if lost.keys > 0 {
            self.count(Event::Dropped(reason), u64::from(lost.keys));
            self.count(Event::LostIncrements, lost.increments);
        }
        if let Some(counts) = self.counts.take() {
            global().retire(&counts);
        }
    }
}
