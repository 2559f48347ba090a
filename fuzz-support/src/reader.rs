//! `ring_reader`: the ring's [`Reader`] over a heap region that the input rewrites
//! between drains, as a hostile producer may rewrite every byte it maps.
//!
//! The input is a program: write any byte of any record slot, set or nudge the write
//! position, the dropped counter, the consumer's read position or its flags (whole words
//! or single bytes), drain with a budget, or ask what is pending. After every drain the
//! reader's result is compared with a model of the protocol that keeps its own read
//! position: records are delivered in slot order exactly as written, unknown kinds are
//! counted and withheld, the position advances by exactly what was consumed, nothing the
//! producer writes moves it, and each violation quarantines the ring once, is counted
//! once, raises the flag, and leaves the position where it was.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use telemetry_abi::{CONSUMER_FLAG_QUARANTINED, Record};
use telemetry_ring::{
    Drained, HeapRegion, Quarantined, Reader, ReaderStats, Region, Violation, Writer,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::input::Input;

/// What the reader must have done, computed without it.
struct Model {
    capacity: u64,
    read: u64,
    last_write: u64,
    last_dropped: u64,
    quarantine: Option<Violation>,
    stats: ReaderStats,
    /// The bytes of every slot as last written.
    slots: Vec<Record>,
}

/// The four shared words a producer can write.
fn word(region: &HeapRegion, which: u8) -> &std::sync::atomic::AtomicU64 {
    match which % 4 {
        0 => region.write_pos(),
        1 => region.dropped(),
        2 => region.read_pos(),
        _ => region.consumer_flags(),
    }
}

/// Stores `record` in `slot` without publishing it, by a writer that believes the ring
/// is empty at `slot`: the shared positions are pointed there for its attach and put
/// back afterwards, so the reader's view of them is unchanged.
fn write_slot(region: &Arc<HeapRegion>, slot: u64, record: Record) {
    let (write, read) = (region.write_pos(), region.read_pos());
    let saved = (write.load(Ordering::Relaxed), read.load(Ordering::Relaxed));
    write.store(slot, Ordering::Relaxed);
    read.store(slot, Ordering::Relaxed);
    let mut writer = Writer::new(region.clone());
    assert!(writer.stage(record).is_ok(), "an empty ring has room");
    write.store(saved.0, Ordering::Relaxed);
    read.store(saved.1, Ordering::Relaxed);
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let capacity = 2u64 << input.below(6);
    let region = match HeapRegion::new(capacity) {
        Ok(r) => Arc::new(r),
        Err(e) => panic!("capacity {capacity}: {e}"),
    };
    let mut reader = Reader::new(region.clone());
    let mut model = Model {
        capacity,
        read: 0,
        last_write: 0,
        last_dropped: 0,
        quarantine: None,
        stats: ReaderStats::default(),
        slots: vec![Record::default(); capacity as usize],
    };
    while !input.is_empty() {
        match input.below(10) {
            0 => {
                let slot = u64::from(input.u8()) % capacity;
                let at = usize::from(input.below(32));
                let mut record = model.slots[slot as usize];
                record.as_mut_bytes()[at] = input.u8();
                model.slots[slot as usize] = record;
                write_slot(&region, slot, record);
            }
            1 => {
                let slot = u64::from(input.u8()) % capacity;
                let record = Record::read_from_bytes(&input.array::<32>()).unwrap_or_default();
                model.slots[slot as usize] = record;
                write_slot(&region, slot, record);
            }
            // Publish a few more: the well-behaved producer's move.
            2 | 3 => {
                let w = region.write_pos();
                let step = u64::from(input.below(8));
                w.store(
                    w.load(Ordering::Relaxed).wrapping_add(step),
                    Ordering::Release,
                );
            }
            // Move a word by a small signed amount, or around a capacity away.
            4 => {
                let w = word(&region, input.u8());
                let delta =
                    i64::from(input.u8() as i8) + i64::from(input.below(3)) * capacity as i64;
                w.store(
                    w.load(Ordering::Relaxed).wrapping_add_signed(delta),
                    Ordering::Release,
                );
            }
            5 => word(&region, input.u8()).store(input.u64(), Ordering::Release),
            6 => {
                let w = word(&region, input.u8());
                let shift = 8 * u32::from(input.below(8));
                let byte = u64::from(input.u8());
                let v = (w.load(Ordering::Relaxed) & !(0xff << shift)) | (byte << shift);
                w.store(v, Ordering::Release);
            }
            7 => {
                let got = reader.pending();
                model.check(&region, got);
            }
            _ => {
                let budget = match input.below(4) {
                    0 => u64::MAX,
                    _ => u64::from(input.u8()),
                };
                drain(&region, &mut reader, &mut model, budget);
            }
        }
        assert_eq!(reader.position(), model.read, "read position");
        assert_eq!(reader.quarantined(), model.quarantine);
        assert_eq!(reader.stats(), model.stats);
    }
    // However the run went, a last drain of everything obeys the same rules.
    drain(&region, &mut reader, &mut model, u64::MAX);
}

impl Model {
    /// Checks the reader's verdict on the write position the region holds now against
    /// the protocol, and applies it: the records available, or a violation that
    /// quarantines. Both a move back and a jump out of range may hold at once; either
    /// is then a correct answer. Returns the records available when the check passed.
    fn check(&mut self, region: &HeapRegion, got: Result<u64, Quarantined>) -> Option<u64> {
        if let Some(v) = self.quarantine {
            assert_eq!(
                got,
                Err(Quarantined(v)),
                "a quarantined ring stays quarantined"
            );
            return None;
        }
        let write = region.write_pos().load(Ordering::Relaxed);
        let moved_back = write.wrapping_sub(self.last_write) > u64::MAX / 2;
        let available = write.wrapping_sub(self.read);
        let out_of_range = available > self.capacity;
        match got {
            Ok(n) => {
                assert!(
                    !moved_back && !out_of_range,
                    "write {write} accepted after {} with read {}",
                    self.last_write,
                    self.read
                );
                assert_eq!(n, available);
                self.last_write = write;
                let dropped = region.dropped().load(Ordering::Relaxed);
                if dropped < self.last_dropped {
                    self.stats.dropped_moved_back += 1;
                }
                self.last_dropped = dropped;
                self.stats.producer_dropped = self.stats.producer_dropped.max(dropped);
                Some(n)
            }
            Err(Quarantined(v)) => {
                let back = Violation::WriteMovedBack {
                    before: self.last_write,
                    now: write,
                };
                let range = Violation::WriteOutOfRange {
                    read: self.read,
                    write,
                };
                match v {
                    _ if moved_back && v == back => self.stats.write_moved_back += 1,
                    _ if out_of_range && v == range => self.stats.write_out_of_range += 1,
                    _ => panic!(
                        "{v:?} reported for write {write}, last seen {}, read {}",
                        self.last_write, self.read
                    ),
                }
                self.quarantine = Some(v);
                let flags = region.consumer_flags().load(Ordering::Relaxed);
                assert_ne!(
                    flags & CONSUMER_FLAG_QUARANTINED,
                    0,
                    "quarantine flag raised"
                );
                None
            }
        }
    }
}

/// One drain, checked against the model.
fn drain(
    region: &HeapRegion,
    reader: &mut Reader<Arc<HeapRegion>>,
    model: &mut Model,
    budget: u64,
) {
    let mut delivered = Vec::new();
    let got = reader.drain(budget, |r| delivered.push(r));
    let Some(available) = model.check(region, got.map(|d| d.consumed + d.remaining)) else {
        assert!(
            delivered.is_empty(),
            "a quarantined drain delivered records"
        );
        return;
    };
    let take = available.min(budget);
    let expected: Vec<Record> = (0..take)
        .map(|i| model.slots[(model.read.wrapping_add(i) % model.capacity) as usize])
        .filter(|r| r.kind.is_known())
        .collect();
    assert_eq!(
        delivered, expected,
        "records delivered in slot order, unknown kinds withheld"
    );
    let known = expected.len() as u64;
    let drained = Drained {
        consumed: take,
        delivered: known,
        unknown_kind: take - known,
        remaining: available - take,
    };
    assert_eq!(got, Ok(drained));
    model.read = model.read.wrapping_add(take);
    model.stats.consumed += take;
    model.stats.delivered += known;
    model.stats.unknown_kind += take - known;
    if take > 0 {
        let shared = region.read_pos().load(Ordering::Relaxed);
        assert_eq!(
            shared, model.read,
            "the read position is released after a drain"
        );
    }
}
