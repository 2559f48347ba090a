//! What every model shares: the loom builder, a ring pair, and self-checking records.

use std::sync::Arc;

use telemetry_abi::{Record, RecordKind};
use telemetry_ring::{Drained, HeapRegion, Quarantined, Reader, Writer};

/// How the models share a region between threads. A plain `std::sync::Arc` is enough:
/// loom tracks the atomics and slot cells inside the region, and the ring implements
/// `Region` for `Arc<R>` (loom's `Arc` would only add leak tracking, and the ring has
/// no `Region` impl for it).
pub type Shared = Arc<HeapRegion>;

/// The key every model record carries.
pub const KEY: u32 = 7;

/// Runs `model` under loom's scheduler and returns the number of executions explored
/// (printed by the models with `--nocapture`, quoted in the README).
///
/// `preemption_bound` limits how many times one execution may switch threads at a
/// point where the running thread could have gone on; `None` explores every
/// interleaving. The bound is set here, per model, rather than through
/// `LOOM_MAX_PREEMPTIONS`, so every run of the README's command explores the same
/// schedules; `loom-tests/README.md` says which models need one and why.
pub fn check(preemption_bound: Option<usize>, model: impl Fn() + Sync + Send + 'static) -> usize {
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = preemption_bound;
    builder.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        model();
    });
    runs.load(std::sync::atomic::Ordering::Relaxed)
}

/// A writer and a reader over a new heap region of `capacity` records.
pub fn pair(capacity: u64) -> (Writer<Shared>, Reader<Shared>) {
    let region = Arc::new(HeapRegion::new(capacity).expect("a valid capacity"));
    (Writer::new(Arc::clone(&region)), Reader::new(region))
}

/// Record number `i`: a counter whose three payload words are derived from `i`, so a
/// record mixing two writes (torn) or an unwritten slot is caught by [`index_of`].
pub fn record(i: u64) -> Record {
    Record {
        words: [i, !i, i.wrapping_mul(3)],
        ..Record::counter(KEY, i)
    }
}

/// The number of a record built by [`record`], after checking it is whole.
pub fn index_of(record: &Record) -> u64 {
    assert_eq!(
        record.kind,
        RecordKind::COUNTER,
        "not a model record: {record:?}"
    );
    assert_eq!(record.key, KEY, "not a model record: {record:?}");
    let i = record.words[0];
    assert_eq!(
        record.words,
        [i, !i, i.wrapping_mul(3)],
        "a torn record: {record:?}"
    );
    i
}

/// One drain of up to `budget` records, appending each record's number to `seen` after
/// checking it is whole. The models write only known kinds, so an unknown kind means
/// the reader copied a slot that was never written for it.
pub fn drain_into(
    reader: &mut Reader<Shared>,
    budget: u64,
    seen: &mut Vec<u64>,
) -> Result<Drained, Quarantined> {
    let drained = reader.drain(budget, |record| seen.push(index_of(&record)))?;
    assert_eq!(
        drained.unknown_kind, 0,
        "the reader copied a slot never written for it"
    );
    assert_eq!(drained.delivered, drained.consumed);
    Ok(drained)
}

/// Whether `seen` is exactly `0, 1, 2, ...`: records in order, none lost or repeated.
pub fn in_order(seen: &[u64]) -> bool {
    seen.iter().copied().eq(0..seen.len() as u64)
}
