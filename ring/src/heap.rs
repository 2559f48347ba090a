//! A ring region on the heap, for one process: tests, the loom models, benchmarks.
//! Under `--cfg telemetry_loom` its atomics and cells are loom's, so every model
//! checks the same code that runs in production.
#![expect(unsafe_code, reason = "slot cells are shared under the ring protocol")]

use alloc::boxed::Box;
use alloc::vec::Vec;

use crossbeam_utils::CachePadded;
use telemetry_abi::{Geometry, GeometryError, Record};

use crate::region::Region;
use crate::sync::{AtomicU64, Cell};

/// A ring region on the heap. Share it between a [`Writer`](crate::Writer) and a
/// [`Reader`](crate::Reader) through an `Arc` or a reference.
///
/// The producer's and consumer's words sit on separate cache-padded lines, as they do
/// in a shared region; the slots are plain cells (the protocol keeps the two sides off
/// each other's slots).
#[derive(Debug)]
pub struct HeapRegion {
    geometry: Geometry,
    producer: CachePadded<[AtomicU64; 2]>,
    consumer: CachePadded<[AtomicU64; 2]>,
    slots: Box<[Cell<Record>]>,
}

// SAFETY: `HeapRegion` is shared between exactly one writer and one reader. The atomics
// are `Sync`; the slot cells are accessed under the ring protocol, which gives each slot
// to one side at a time and hands it over with a Release store / Acquire load pair (the
// loom models check this). The cells hold plain `Copy` data with no interior pointers.
unsafe impl Sync for HeapRegion {}

impl HeapRegion {
    /// A region of `capacity` records (a power of two from 2 to 2^24).
    pub fn new(capacity: u64) -> Result<Self, GeometryError> {
        let geometry = Geometry::new(capacity)?;
        let slots: Vec<Cell<Record>> = (0..geometry.capacity())
            .map(|_| Cell::new(Record::default()))
            .collect();
        Ok(Self {
            geometry,
            producer: CachePadded::new([AtomicU64::new(0), AtomicU64::new(0)]),
            consumer: CachePadded::new([AtomicU64::new(0), AtomicU64::new(0)]),
            slots: slots.into_boxed_slice(),
        })
    }
}

// SAFETY: the geometry never changes; slot access is bounds-checked by `get`, so an
// out-of-range slot touches nothing; the four atomics are distinct fields of `self`.
unsafe impl Region for HeapRegion {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn write_pos(&self) -> &AtomicU64 {
        &self.producer[0]
    }
    fn dropped(&self) -> &AtomicU64 {
        &self.producer[1]
    }
    fn read_pos(&self) -> &AtomicU64 {
        &self.consumer[0]
    }
    fn consumer_flags(&self) -> &AtomicU64 {
        &self.consumer[1]
    }
    unsafe fn write_slot(&self, slot: usize, record: &Record) {
        if let Some(cell) = self.slots.get(slot) {
            // SAFETY: the caller is the only writer and the reader is off this slot
            // (the trait's contract), so this is the only access to the cell.
            cell.with_mut(|p| unsafe { p.write(*record) });
        }
    }
    unsafe fn read_slot(&self, slot: usize) -> Record {
        match self.slots.get(slot) {
            // SAFETY: the slot was published to the only reader and the writer does not
            // touch it until the reader releases it (the trait's contract).
            Some(cell) => cell.with(|p| unsafe { p.read() }),
            None => Record::default(),
        }
    }
}
