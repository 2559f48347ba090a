//! The `no_std` core: records over one ring the caller provides.

use core::fmt;
use core::num::NonZeroU64;

use telemetry_abi::{AttrValueType, MAX_REGISTER_RECORDS, Record, SpanStatus};
use telemetry_ring::{Region, Writer};

use crate::key::{Discarded, Key, KeyTable};
use crate::registry::Registry;

/// Why a record was not written. Each is counted in [`RecorderStats`]; a full ring is
/// also counted in the ring's shared `dropped` word, which metricsd exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dropped {
    /// The ring had no room for the record (or for its key's registration).
    RingFull,
    /// The key is zero, past the key table's capacity, or unknown to the registry.
    UnknownKey,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RingFull => "ring is full: record dropped",
            Self::UnknownKey => "key is not in the registry or the key table: record dropped",
        })
    }
}

impl core::error::Error for Dropped {}

/// Where a counter increment went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Delivery {
    /// Written to the ring.
    Written,
    /// The ring was full: added to the key's pending delta, written ahead of a later
    /// record that finds room (or by [`Recorder::flush`]).
    Coalesced,
}

/// A span's id within its ring: a nonzero per-ring sequence, no randomness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanId(NonZeroU64);

impl SpanId {
    /// The id's number.
    pub const fn get(self) -> u64 {
        self.0.get()
    }

    /// The id numbered `raw`, or `None` for zero.
    pub const fn new(raw: u64) -> Option<Self> {
        match NonZeroU64::new(raw) {
            Some(id) => Some(Self(id)),
            None => None,
        }
    }
}

/// A span attribute's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttrValue {
    /// An unsigned integer.
    U64(u64),
    /// A signed integer.
    I64(i64),
    /// A string, registered as a [`RegisterKind::STRING`](telemetry_abi::RegisterKind::STRING) key.
    Str(Key),
}

/// What a [`Recorder`] has counted. Only slow paths touch these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecorderStats {
    /// Records dropped because the ring was full (pending counter deltas given up by
    /// [`Recorder::discard_pending`] count one record per key).
    pub ring_full: u64,
    /// Records dropped because their key was unknown.
    pub unknown_key: u64,
    /// Counter increments that found the ring full and were held back.
    pub coalesced: u64,
    /// Registrations written into rings.
    pub registrations: u64,
}

/// Records counters, gauges, histograms and spans into one ring, writing each key's
/// registration into the ring before its first record there.
///
/// This is the whole producer protocol without an allocator, a socket or a thread: a
/// driver or kernel gives it a [`Writer`] over its ring (a
/// [`MappedRegion`](telemetry_ring::MappedRegion) of shared pages, say), a
/// [`KeyTable`] over storage it owns and a [`Registry`] of what its keys mean. Never
/// blocks, allocates or panics; a full ring drops the record and counts it, except
/// counter increments, which coalesce per key and are written late, never lost
/// (unless given up with [`discard_pending`](Self::discard_pending)).
///
/// ```
/// use std::sync::Arc;
/// use nexus_metrics::{Descriptor, KeyTable, Recorder, StaticRegistry};
/// use telemetry_ring::{HeapRegion, Reader, Writer};
///
/// static METRICS: StaticRegistry<'static> = StaticRegistry::new(&[
///     Descriptor::counter("irq.handled", &[("line", "3")]),
/// ]);
/// let handled = METRICS.key(0).expect("declared above");
///
/// let region = Arc::new(HeapRegion::new(64).expect("a power of two"));
/// let mut reader = Reader::new(region.clone());
/// let mut storage = [0u64; KeyTable::<&mut [u64]>::words_for(64)];
/// let mut recorder = Recorder::new(Writer::new(region), KeyTable::new(&mut storage[..]), METRICS);
///
/// recorder.counter(handled, 1).expect("a known key");
/// recorder.counter(handled, 2).expect("a known key");
/// let mut kinds = Vec::new();
/// reader.drain(64, |r| kinds.push(r.kind.name())).expect("well-behaved");
/// // The registration (one head and one data record) comes first, once.
/// assert_eq!(kinds, [Some("register"), Some("register_data"), Some("counter"), Some("counter")]);
/// ```
#[derive(Debug)]
pub struct Recorder<R: Region, S, G> {
    writer: Writer<R>,
    table: KeyTable<S>,
    registry: G,
    next_span: u64,
    stats: RecorderStats,
}

impl<R, S, G> Recorder<R, S, G>
where
    R: Region,
    S: AsRef<[u64]> + AsMut<[u64]>,
    G: Registry,
{
    /// A recorder writing to `writer`'s ring, which holds no registration of ours yet.
    /// Pending counter deltas already in `table` are kept and written first.
    pub fn new(writer: Writer<R>, mut table: KeyTable<S>, registry: G) -> Self {
        table.clear_registered();
        Self {
            writer,
            table,
            registry,
            next_span: 1,
            stats: RecorderStats::default(),
        }
    }

    /// Adds `n` to counter `key`. On a full ring the increment is held back and
    /// written later (coalesced with others of the same key).
    #[inline]
    pub fn counter(&mut self, key: Key, n: u64) -> Result<Delivery, Dropped> {
        self.counter_raw(key.get(), n)
    }

    /// Sets gauge `key` to `value`.
    #[inline]
    pub fn gauge(&mut self, key: Key, value: i64) -> Result<(), Dropped> {
        self.sample_raw(Record::gauge(key.get(), value))
    }

    /// Records `value` in histogram `key`.
    #[inline]
    pub fn histogram(&mut self, key: Key, value: u64) -> Result<(), Dropped> {
        self.sample_raw(Record::histogram(key.get(), value))
    }

    /// Sets gauge `key` to the float `value`. A float increment of the key still held
    /// back (see [`gauge_add_f64`](Self::gauge_add_f64)) happened before this set, so
    /// the set supersedes it once written.
    #[inline]
    pub fn gauge_f64(&mut self, key: Key, value: f64) -> Result<(), Dropped> {
        self.gauge_f64_raw(key.get(), value)
    }

    /// Adds the float `delta` to gauge `key` (negative to decrement). On a full ring
    /// the amount is held back and written later, summed with the key's later
    /// increments, as counter increments are: late, never lost.
    #[inline]
    pub fn gauge_add_f64(&mut self, key: Key, delta: f64) -> Result<Delivery, Dropped> {
        self.gauge_add_f64_raw(key.get(), delta)
    }

    /// Records the float `value` in histogram `key`.
    #[inline]
    pub fn histogram_f64(&mut self, key: Key, value: f64) -> Result<(), Dropped> {
        self.sample_raw(Record::histogram_f64(key.get(), value))
    }

    /// Makes sure `key`'s registration is in the ring, writing nothing else: for keys no
    /// sample ever carries, such as a metric's metadata.
    pub fn declare(&mut self, key: Key) -> Result<(), Dropped> {
        if self.table.is_registered(key.get()) {
            return Ok(());
        }
        self.register_cold(key.get())
    }

    /// Opens span `name` at `start_ns` under `parent` (a span of this ring; `None`
    /// for a root) and returns its id.
    pub fn span_start(
        &mut self,
        name: Key,
        parent: Option<SpanId>,
        start_ns: u64,
    ) -> Result<SpanId, Dropped> {
        let id = SpanId(NonZeroU64::new(self.next_span).unwrap_or(NonZeroU64::MIN));
        let parent = parent.map_or(0, SpanId::get);
        self.sample_raw(Record::span_start(name.get(), id.get(), parent, start_ns))?;
        self.next_span = id.get().checked_add(1).unwrap_or(1);
        Ok(id)
    }

    /// Closes span `span` (named `name`) at `end_ns` with `status`.
    pub fn span_end(
        &mut self,
        name: Key,
        span: SpanId,
        end_ns: u64,
        status: SpanStatus,
    ) -> Result<(), Dropped> {
        self.sample_raw(Record::span_end(name.get(), span.get(), end_ns, status))
    }

    /// An attribute value's wire type and word; a string value's key is registered in
    /// the ring first.
    fn attr_wire(&mut self, value: AttrValue) -> Result<(AttrValueType, u64), Dropped> {
        Ok(match value {
            AttrValue::U64(v) => (AttrValueType::U64, v),
            AttrValue::I64(v) => (AttrValueType::I64, v as u64),
            AttrValue::Str(k) => {
                if !self.table.is_registered(k.get()) {
                    self.register_cold(k.get())?;
                }
                (AttrValueType::STRING, u64::from(k.get()))
            }
        })
    }

    /// Sets attribute `attr` of the open span `span` to `value`. A string value's key
    /// is registered in the ring first, like `attr`'s.
    pub fn span_attr(&mut self, span: SpanId, attr: Key, value: AttrValue) -> Result<(), Dropped> {
        let (value_type, raw) = self.attr_wire(value)?;
        self.sample_raw(Record::span_attr(attr.get(), span.get(), value_type, raw))
    }

    /// (ABI v1.1) Opens span `span_id` named `name` in trace `trace_id` at `start_ns`
    /// under `parent_id` (0: the root of its trace): a `span_trace` and a `span_open`
    /// record, published together. The ids are the caller's: trace-global, nonzero.
    pub fn span_open(
        &mut self,
        name: Key,
        trace_id: u128,
        span_id: SpanId,
        parent_id: u64,
        trace_flags: u8,
        start_ns: u64,
    ) -> Result<(), Dropped> {
        let records = [
            Record::span_trace(name.get(), span_id.get(), trace_id, trace_flags),
            Record::span_open(name.get(), span_id.get(), parent_id, start_ns),
        ];
        if !(self.table.pending_keys() == 0 && self.table.is_registered(name.get())) {
            self.register_cold(name.get())?;
        }
        match self.writer.push_all(&records) {
            Ok(()) => Ok(()),
            Err(_) => self.full(),
        }
    }

    /// (ABI v1.1) Closes span `span_id` (named `name`, opened by
    /// [`span_open`](Self::span_open) in any ring of this process) at `end_ns`.
    pub fn span_close(
        &mut self,
        name: Key,
        span_id: SpanId,
        end_ns: u64,
        status: SpanStatus,
    ) -> Result<(), Dropped> {
        self.sample_raw(Record::span_close(
            name.get(),
            span_id.get(),
            end_ns,
            status,
        ))
    }

    /// (ABI v1.1) Sets attribute `attr` of span `span_id` (opened by
    /// [`span_open`](Self::span_open) in any ring of this process) to `value`.
    pub fn span_note(
        &mut self,
        span_id: SpanId,
        attr: Key,
        value: AttrValue,
    ) -> Result<(), Dropped> {
        let (value_type, raw) = self.attr_wire(value)?;
        self.sample_raw(Record::span_note(
            attr.get(),
            span_id.get(),
            value_type,
            raw,
        ))
    }

    /// Writes pending counter deltas while the ring has room. Returns how many keys
    /// still hold one (zero: nothing is owed).
    pub fn flush(&mut self) -> u32 {
        self.flush_pending();
        self.table.pending_keys()
    }

    /// Gives up every pending counter delta, counting one dropped record per key (in
    /// the stats and the ring's `dropped` word). Returns what was given up. For a
    /// producer about to exit with its ring still full.
    pub fn discard_pending(&mut self) -> Discarded {
        let discarded = self.table.discard_pending();
        self.writer.count_dropped(u64::from(discarded.keys));
        self.stats.ring_full += u64::from(discarded.keys);
        discarded
    }

    /// Holds back `n` increments of counter `key` as a pending delta, written ahead of a
    /// later record (as a full ring's increments are). False (and nothing held) if the
    /// key is out of range or the sum would overflow.
    #[cfg_attr(
        not(feature = "std"),
        expect(dead_code, reason = "the std recorder salvages closed rings")
    )]
    pub(crate) fn hold_back(&mut self, key: u32, n: u64) -> bool {
        self.table.add_pending(key, n)
    }

    /// Moves to a new ring: forgets which keys were registered (the new ring has
    /// none), restarts span ids, keeps pending counter deltas. Returns the old writer.
    pub fn replace_writer(&mut self, writer: Writer<R>) -> Writer<R> {
        self.table.clear_registered();
        self.next_span = 1;
        core::mem::replace(&mut self.writer, writer)
    }

    /// Whether the consumer quarantined or closed the ring (nothing written will be
    /// read). Reads shared memory: check it on a slow path.
    pub fn is_abandoned(&self) -> bool {
        self.writer.is_abandoned()
    }

    /// The writer.
    pub fn writer(&self) -> &Writer<R> {
        &self.writer
    }

    /// What this recorder has counted.
    pub fn stats(&self) -> RecorderStats {
        self.stats
    }

    /// Keys holding a pending counter delta.
    pub fn pending_keys(&self) -> u32 {
        self.table.pending_keys()
    }

    /// Takes the recorder apart.
    pub fn into_parts(self) -> (Writer<R>, KeyTable<S>, G) {
        (self.writer, self.table, self.registry)
    }

    /// The counter hot path on a raw key (0 or out of range: the slow path drops it).
    #[inline(always)]
    pub(crate) fn counter_raw(&mut self, key: u32, n: u64) -> Result<Delivery, Dropped> {
        if self.table.pending_keys() == 0
            && self.table.is_registered(key)
            && self.writer.try_push(Record::counter(key, n)).is_ok()
        {
            return Ok(Delivery::Written);
        }
        // A pending sum that would overflow a u64: `add_pending` refuses it.
        self.delta_cold(Record::counter(key, n), |t| t.add_pending(key, n))
    }

    /// A float gauge set on a raw key.
    #[inline(always)]
    pub(crate) fn gauge_f64_raw(&mut self, key: u32, value: f64) -> Result<(), Dropped> {
        if self.table.pending_keys() == 0 && self.table.is_registered(key) {
            return match self.writer.push(Record::gauge_f64(key, value)) {
                Ok(()) => Ok(()),
                Err(_) => self.full(),
            };
        }
        self.gauge_f64_cold(key, value)
    }

    #[cold]
    #[inline(never)]
    fn gauge_f64_cold(&mut self, key: u32, value: f64) -> Result<(), Dropped> {
        self.sample_cold(Record::gauge_f64(key, value))?;
        // Written: a word held back from before the set is superseded by it.
        if self.table.is_float(key) || self.table.is_held_gauge(key) {
            self.table.clear_pending(key);
        }
        Ok(())
    }

    /// A float gauge increment on a raw key: written, or held back on a full ring.
    #[inline(always)]
    pub(crate) fn gauge_add_f64_raw(&mut self, key: u32, delta: f64) -> Result<Delivery, Dropped> {
        if self.table.pending_keys() == 0
            && self.table.is_registered(key)
            && self
                .writer
                .try_push(Record::gauge_f64_add(key, delta))
                .is_ok()
        {
            return Ok(Delivery::Written);
        }
        // Not finite, or the key holds a counter's delta: `add_pending_f64` refuses it.
        self.delta_cold(Record::gauge_f64_add(key, delta), |t| {
            t.add_pending_f64(key, delta)
        })
    }

    /// Holds back the float gauge increment `delta` of `key`, as a full ring's are.
    #[cfg_attr(
        not(feature = "std"),
        expect(dead_code, reason = "the std recorder salvages closed rings")
    )]
    pub(crate) fn hold_back_f64(&mut self, key: u32, delta: f64) -> bool {
        self.table.add_pending_f64(key, delta)
    }

    /// The fast path of every record kind, on the raw `key` (`record.key`): writes
    /// `record` when no pending delta must go first, the key is registered in this ring
    /// and there is room. False changes nothing and counts nothing: the caller goes on
    /// to [`counter_raw`](Self::counter_raw) or [`sample_raw`](Self::sample_raw). The
    /// key comes separately so that its check reads it where the caller has it, not
    /// back out of the record under construction.
    #[inline(always)]
    #[cfg_attr(
        not(feature = "std"),
        expect(dead_code, reason = "the std recorder's fast path")
    )]
    pub(crate) fn try_fast(&mut self, key: u32, record: Record) -> bool {
        debug_assert_eq!(key, record.key);
        self.table.pending_keys() == 0
            && self.table.is_registered(key)
            && self.writer.try_push(record).is_ok()
    }

    /// The hot path of every other record, on the raw key in `record.key`.
    #[inline(always)]
    pub(crate) fn sample_raw(&mut self, record: Record) -> Result<(), Dropped> {
        if self.table.pending_keys() == 0 && self.table.is_registered(record.key) {
            return match self.writer.push(record) {
                Ok(()) => Ok(()),
                Err(_) => self.full(),
            };
        }
        self.sample_cold(record)
    }

    /// The cold path of a delta a full ring may hold back (a counter or float gauge
    /// increment): written after the pending deltas if there is room, else held back
    /// by `hold`; when it cannot be held (an overflowing or non-finite sum, a key holding
    /// the other kind), dropped and counted.
    #[cold]
    #[inline(never)]
    fn delta_cold(
        &mut self,
        record: Record,
        hold: impl FnOnce(&mut KeyTable<S>) -> bool,
    ) -> Result<Delivery, Dropped> {
        let key = record.key;
        if !self.table.contains(key) {
            self.stats.unknown_key += 1;
            return Err(Dropped::UnknownKey);
        }
        self.flush_pending();
        if self.table.pending_keys() == 0
            && self.ensure_registered(key)?
            && self.writer.try_push(record).is_ok()
        {
            return Ok(Delivery::Written);
        }
        if hold(&mut self.table) {
            self.stats.coalesced += 1;
            Ok(Delivery::Coalesced)
        } else {
            self.writer.count_dropped(1);
            self.full()
        }
    }

    #[cold]
    #[inline(never)]
    fn sample_cold(&mut self, record: Record) -> Result<(), Dropped> {
        self.register_cold(record.key)?;
        match self.writer.push(record) {
            Ok(()) => Ok(()),
            Err(_) => self.full(),
        }
    }

    /// Flushes pending deltas, then makes sure `key`'s registration is in the ring.
    #[cold]
    #[inline(never)]
    fn register_cold(&mut self, key: u32) -> Result<(), Dropped> {
        if !self.table.contains(key) {
            self.stats.unknown_key += 1;
            return Err(Dropped::UnknownKey);
        }
        self.flush_pending();
        if self.ensure_registered(key)? {
            Ok(())
        } else {
            // The record this registration was for will not be written.
            self.writer.count_dropped(1);
            self.full()
        }
    }

    fn full<T>(&mut self) -> Result<T, Dropped> {
        self.stats.ring_full += 1;
        Err(Dropped::RingFull)
    }

    /// Writes `key`'s registration unless the ring has it. `Ok(false)`: no room.
    fn ensure_registered(&mut self, key: u32) -> Result<bool, Dropped> {
        if self.table.is_registered(key) {
            return Ok(true);
        }
        let mut scratch = [Record::default(); MAX_REGISTER_RECORDS];
        let records = Key::new(key).and_then(|k| self.registry.registration(k, &mut scratch));
        let Some(records) = records else {
            self.stats.unknown_key += 1;
            return Err(Dropped::UnknownKey);
        };
        // Check the room first: `push_all` would count the registration's records as
        // dropped, and they are not: they are retried with the key's next record.
        if self.writer.free() < records.len() as u64 || self.writer.push_all(records).is_err() {
            return Ok(false);
        }
        self.table.set_registered(key);
        self.stats.registrations += 1;
        Ok(true)
    }

    fn flush_pending(&mut self) {
        let mut from = 1;
        while let Some((key, delta)) = self.table.next_pending(from) {
            match self.ensure_registered(key) {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => {
                    // Unknown to the registry: it can never be written.
                    self.table.clear_pending(key);
                    self.writer.count_dropped(1);
                    from = key.saturating_add(1);
                    continue;
                }
            }
            let record = if self.table.is_held_gauge(key) && self.table.is_float(key) {
                // A float gauge set while there was no ring, and its increments since.
                Record::gauge_f64(key, f64::from_bits(delta))
            } else if self.table.is_held_gauge(key) {
                // A gauge set while there was no ring: its last value, bit for bit.
                Record::gauge(key, delta as i64)
            } else if self.table.is_float(key) {
                Record::gauge_f64_add(key, f64::from_bits(delta))
            } else {
                Record::counter(key, delta)
            };
            if self.writer.try_push(record).is_err() {
                return;
            }
            self.table.clear_pending(key);
            from = key.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::vec::Vec;

    use telemetry_abi::{RecordKind, RegistrationBuf, SpanAttr, SpanEnd, SpanStart, SpanTrace};
    use telemetry_ring::{HeapRegion, Reader};

    use super::*;
    use crate::registry::{Descriptor, StaticRegistry};

    static METRICS: StaticRegistry<'static> = StaticRegistry::new(&[
        Descriptor::counter("requests", &[("route", "/a")]),
        Descriptor::gauge("depth", &[]),
        Descriptor::histogram("latency_ns", &[]),
        Descriptor::span("handle"),
        Descriptor::attr("rows"),
        Descriptor::string("ok value"),
    ]);

    fn key(i: usize) -> Key {
        METRICS.key(i).expect("declared")
    }

    type TestRecorder = Recorder<Arc<HeapRegion>, Vec<u64>, StaticRegistry<'static>>;

    fn setup(capacity: u64) -> (TestRecorder, Reader<Arc<HeapRegion>>) {
        let region = Arc::new(HeapRegion::new(capacity).expect("power of two"));
        let table = KeyTable::new(std::vec![0; KeyTable::<Vec<u64>>::words_for(64)]);
        let recorder = Recorder::new(Writer::new(region.clone()), table, METRICS);
        (recorder, Reader::new(region))
    }

    /// Drains everything: (registered keys in order, non-registration records).
    fn drain(reader: &mut Reader<Arc<HeapRegion>>) -> (Vec<u32>, Vec<Record>) {
        let mut buf = RegistrationBuf::new();
        let (mut registered, mut records) = (Vec::new(), Vec::new());
        reader
            .drain(u64::MAX, |r| match r.kind {
                RecordKind::REGISTER | RecordKind::REGISTER_DATA => {
                    if let Some(reg) = buf.feed(&r).expect("well-formed registration") {
                        registered.push(reg.key);
                    }
                }
                _ => {
                    assert!(!buf.is_pending(), "a sample interrupted a registration");
                    records.push(r);
                }
            })
            .expect("not quarantined");
        (registered, records)
    }

    #[test]
    fn float_gauge_increments_coalesce_on_a_full_ring_and_a_set_supersedes_them() {
        // 8 slots: the gauge's registration (2) + 6 samples fill it.
        let (mut rec, mut reader) = setup(8);
        let depth = key(1);
        assert_eq!(rec.gauge_add_f64(depth, 1.5), Ok(Delivery::Written));
        for _ in 0..5 {
            assert_eq!(rec.gauge_add_f64(depth, 0.5), Ok(Delivery::Written));
        }
        assert_eq!(rec.gauge_add_f64(depth, 2.0), Ok(Delivery::Coalesced));
        assert_eq!(rec.gauge_add_f64(depth, -0.75), Ok(Delivery::Coalesced));
        assert_eq!(rec.pending_keys(), 1);
        let (_, records) = drain(&mut reader);
        assert_eq!(records.len(), 6);
        // Room again: the held-back sum goes first, then the new record.
        assert_eq!(rec.histogram_f64(key(2), 0.125), Ok(()));
        let (registered, records) = drain(&mut reader);
        assert_eq!(registered, [key(2).get()]);
        assert_eq!(records[0].kind, RecordKind::GAUGE_F64_ADD);
        assert_eq!(f64::from_bits(records[0].words[0]), 1.25);
        assert_eq!(records[1].kind, RecordKind::HISTOGRAM_F64);
        assert_eq!(f64::from_bits(records[1].words[0]), 0.125);
        assert_eq!(rec.pending_keys(), 0);
        assert_eq!(rec.stats().coalesced, 2);

        // A set written while an increment is held back supersedes it.
        while rec.gauge_add_f64(depth, 1.0) == Ok(Delivery::Written) {}
        assert_eq!(rec.gauge_add_f64(depth, 9.0), Ok(Delivery::Coalesced));
        let _ = drain(&mut reader);
        assert_eq!(rec.gauge_f64(depth, -3.0), Ok(()));
        let (_, records) = drain(&mut reader);
        let kinds: Vec<_> = records.iter().map(|r| r.kind).collect();
        // The increment held back before the set is written ahead of it.
        assert_eq!(kinds, [RecordKind::GAUGE_F64_ADD, RecordKind::GAUGE_F64]);
        assert_eq!(f64::from_bits(records[1].words[0]), -3.0);
        assert_eq!(rec.pending_keys(), 0);
        assert_eq!(rec.stats().ring_full, 0, "nothing dropped");
    }

    #[test]
    fn declare_writes_only_the_registration_once() {
        let (mut rec, mut reader) = setup(8);
        rec.declare(key(1)).expect("room");
        rec.declare(key(1)).expect("already there");
        let (registered, records) = drain(&mut reader);
        assert_eq!(registered, [key(1).get()]);
        assert!(records.is_empty());
    }

    #[test]
    fn registration_precedes_first_use_once_per_ring() {
        let (mut rec, mut reader) = setup(64);
        assert_eq!(rec.gauge(key(1), -4), Ok(()));
        assert_eq!(rec.gauge(key(1), 9), Ok(()));
        assert_eq!(rec.histogram(key(2), 77), Ok(()));
        let (registered, records) = drain(&mut reader);
        assert_eq!(registered, [key(1).get(), key(2).get()]);
        let values: Vec<u64> = records.iter().map(|r| r.words[0]).collect();
        assert_eq!(values, [(-4i64) as u64, 9, 77]);

        // A new ring gets the registrations again.
        let region = Arc::new(HeapRegion::new(64).expect("power of two"));
        let mut reader2 = Reader::new(region.clone());
        rec.replace_writer(Writer::new(region));
        assert_eq!(rec.gauge(key(1), 1), Ok(()));
        assert_eq!(drain(&mut reader2).0, [key(1).get()]);
        assert_eq!(rec.stats().registrations, 3);
    }

    #[test]
    fn counters_coalesce_on_a_full_ring_and_arrive_whole() {
        let (mut rec, mut reader) = setup(8);
        let mut total = 0;
        let mut coalesced = 0;
        for n in 1..=100u64 {
            total += n;
            if rec.counter(key(0), n) == Ok(Delivery::Coalesced) {
                coalesced += 1;
            }
        }
        assert!(coalesced > 0, "an 8-record ring must fill");
        assert_eq!(rec.pending_keys(), 1);
        assert_eq!(
            rec.writer().dropped(),
            0,
            "nothing was dropped, only delayed"
        );

        let (_, first) = drain(&mut reader);
        // A gauge that finds room is preceded by the pending delta.
        assert_eq!(rec.gauge(key(1), 5), Ok(()));
        assert_eq!(rec.pending_keys(), 0);
        let (_, second) = drain(&mut reader);
        let sum: u64 = first
            .iter()
            .chain(&second)
            .filter(|r| r.kind == RecordKind::COUNTER)
            .map(|r| r.words[0])
            .sum();
        assert_eq!(sum, total);
        let kinds: Vec<_> = second.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RecordKind::COUNTER, RecordKind::GAUGE]);
    }

    #[test]
    fn full_ring_drops_other_records_and_counts_them() {
        let (mut rec, _reader) = setup(4);
        // Registration (2 records) + 2 samples fill the ring.
        assert_eq!(rec.histogram(key(2), 1), Ok(()));
        assert_eq!(rec.histogram(key(2), 2), Ok(()));
        assert_eq!(rec.histogram(key(2), 3), Err(Dropped::RingFull));
        assert_eq!(
            rec.gauge(key(1), 3),
            Err(Dropped::RingFull),
            "no room to register"
        );
        assert_eq!(rec.writer().dropped(), 2);
        assert_eq!(rec.stats().ring_full, 2);
        assert_eq!(rec.counter(key(0), 5), Ok(Delivery::Coalesced));
        assert_eq!(
            rec.discard_pending(),
            Discarded {
                keys: 1,
                increments: 5
            }
        );
        assert_eq!(rec.writer().dropped(), 3);
    }

    #[test]
    fn unknown_keys_are_dropped_and_counted() {
        let (mut rec, _reader) = setup(16);
        let past_table = Key::new(64).expect("nonzero");
        let not_declared = Key::new(40).expect("nonzero");
        assert_eq!(rec.counter(past_table, 1), Err(Dropped::UnknownKey));
        assert_eq!(rec.gauge(not_declared, 1), Err(Dropped::UnknownKey));
        assert_eq!(rec.counter_raw(0, 1), Err(Dropped::UnknownKey));
        assert_eq!(rec.stats().unknown_key, 3);
    }

    #[test]
    fn spans_carry_ids_parents_and_attributes() {
        let (mut rec, mut reader) = setup(64);
        let outer = rec.span_start(key(3), None, 100).expect("room");
        let inner = rec.span_start(key(3), Some(outer), 150).expect("room");
        rec.span_attr(inner, key(4), AttrValue::U64(12))
            .expect("room");
        rec.span_attr(inner, key(4), AttrValue::Str(key(5)))
            .expect("room");
        rec.span_end(key(3), inner, 190, SpanStatus::ERROR)
            .expect("room");
        rec.span_end(key(3), outer, 200, SpanStatus::OK)
            .expect("room");
        let (registered, records) = drain(&mut reader);
        assert_eq!(registered, [key(3).get(), key(4).get(), key(5).get()]);
        let s0: SpanStart = records[0].view();
        let s1: SpanStart = records[1].view();
        assert_eq!((s0.span_id, s0.parent_id, s0.start_ns), (1, 0, 100));
        assert_eq!((s1.span_id, s1.parent_id, s1.start_ns), (2, 1, 150));
        let a: SpanAttr = records[3].view();
        assert_eq!(
            (a.span_id, a.value_type, a.value),
            (2, AttrValueType::STRING, 6)
        );
        let e: SpanEnd = records[4].view();
        assert_eq!((e.span_id, e.end_ns, e.status), (2, 190, SpanStatus::ERROR));
    }

    #[test]
    fn v1_1_spans_write_trace_and_open_together_and_close_with_their_ids() {
        let (mut rec, mut reader) = setup(64);
        let trace = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736u128;
        let id = SpanId::new(0xb7ad_6b71_6920_3331).expect("nonzero");
        rec.span_open(key(3), trace, id, 0x00f0_67aa_0ba9_02b7, 1, 100)
            .expect("room");
        rec.span_note(id, key(4), AttrValue::I64(-2)).expect("room");
        rec.span_close(key(3), id, 250, SpanStatus::OK)
            .expect("room");
        let (registered, records) = drain(&mut reader);
        assert_eq!(registered, [key(3).get(), key(4).get()]);
        let kinds: Vec<RecordKind> = records.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                RecordKind::SPAN_TRACE,
                RecordKind::SPAN_OPEN,
                RecordKind::SPAN_NOTE,
                RecordKind::SPAN_CLOSE
            ]
        );
        let t: SpanTrace = records[0].view();
        assert_eq!((t.trace_id(), t.span_id, t.flags), (trace, id.get(), 1));
        let o: SpanStart = records[1].view();
        assert_eq!(
            (o.span_id, o.parent_id, o.start_ns),
            (id.get(), 0x00f0_67aa_0ba9_02b7, 100)
        );
        let n: SpanAttr = records[2].view();
        assert_eq!((n.span_id, n.value as i64), (id.get(), -2));
        let c: SpanEnd = records[3].view();
        assert_eq!(
            (c.span_id, c.end_ns, c.status),
            (id.get(), 250, SpanStatus::OK)
        );
        // A full ring takes neither record of an open: nothing half-written.
        let (mut rec, mut reader) = setup(4);
        rec.span_open(key(3), trace, id, 0, 1, 1).expect("room");
        assert_eq!(
            rec.span_open(key(3), trace, id, 0, 1, 2),
            Err(Dropped::RingFull)
        );
        let (_, records) = drain(&mut reader);
        assert_eq!(records.len(), 2, "the first open only");
    }
}
