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
/// each other's slots), two to a cache line as in the shared layout, so no record
/// straddles two lines.
#[derive(Debug)]
pub struct HeapRegion {
    geometry: Geometry,
    producer: CachePadded<[AtomicU64; 2]>,
    consumer: CachePadded<[AtomicU64; 2]>,
    lines: Box<[SlotLine]>,
}

/// Records per cache line.
const PER_LINE: usize = 2;

/// One cache line of record slots. Line-aligned: a slot array aligned only to its 8-byte
/// words would let every other record straddle two lines, so each push and each copy
/// could touch two lines (the shared layout starts its records on a line boundary).
#[derive(Debug)]
#[repr(C, align(64))]
struct SlotLine([Cell<Record>; PER_LINE]);

// A line exactly (loom's checked cells are larger; their layout does not matter).
#[cfg(not(telemetry_loom))]
const _: () = assert!(core::mem::size_of::<SlotLine>() == 64);

// SAFETY: `HeapRegion` is shared between exactly one writer and one reader. The atomics
// are `Sync`; the slot cells are accessed under the ring protocol, which gives each slot
// to one side at a time and hands it over with a Release store / Acquire load pair (the
// loom models check this). The cells hold plain `Copy` data with no interior pointers.
unsafe impl Sync for HeapRegion {}

impl HeapRegion {
    /// A region of `capacity` records (a power of two from 2 to 2^24).
    pub fn new(capacity: u64) -> Result<Self, GeometryError> {
        let geometry = Geometry::new(capacity)?;
        // A capacity is a power of two from 2, so it fills whole lines.
        let lines: Vec<SlotLine> = (0..geometry.capacity() as usize / PER_LINE)
            .map(|_| SlotLine(core::array::from_fn(|_| Cell::new(Record::default()))))
            .collect();
        Ok(Self {
            geometry,
            producer: CachePadded::new([AtomicU64::new(0), AtomicU64::new(0)]),
            consumer: CachePadded::new([AtomicU64::new(0), AtomicU64::new(0)]),
            lines: lines.into_boxed_slice(),
        })
    }

    /// The cell of `slot`.
    ///
    /// # Safety
    ///
    /// `slot < capacity` (the `Region` contract's precondition).
    #[inline(always)]
    unsafe fn slot(&self, slot: usize) -> &Cell<Record> {
        debug_assert!(slot < self.geometry.capacity() as usize);
        // The lines as one array of cells: one shift and add per slot, where indexing
        // line then cell costs five instructions on the push path.
        #[cfg(not(telemetry_loom))]
        // SAFETY: a `SlotLine` is `PER_LINE` cells and nothing else (`repr(C)`, its size
        // asserted above), so the boxed lines are `capacity` contiguous cells, and
        // `slot < capacity` stays inside them.
        return unsafe { &*self.lines.as_ptr().cast::<Cell<Record>>().add(slot) };
        // Loom's cells are larger than a record: index line, then cell.
        #[cfg(telemetry_loom)]
        // SAFETY: `slot < capacity = lines.len() * PER_LINE`, so both indices are in
        // bounds.
        unsafe {
            self.lines
                .get_unchecked(slot / PER_LINE)
                .0
                .get_unchecked(slot % PER_LINE)
        }
    }
}

// SAFETY: the geometry never changes; a slot below the capacity (the callers'
// precondition) is one cell of `lines`; the four atomics are distinct fields of `self`.
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
    unsafe fn write_slot(&self, slot: usize, record: Record) {
        // SAFETY: `slot < capacity`, the caller is the only writer and the reader is off
        // this slot (the trait's contract), so this is the only access to the cell.
        unsafe { self.slot(slot) }.with_mut(|p| unsafe { p.write(record) });
    }
    unsafe fn read_slot(&self, slot: usize) -> Record {
        // SAFETY: `slot < capacity`; the slot was published to the only reader and the
        // writer does not touch it until the reader releases it (the trait's contract).
        unsafe { self.slot(slot) }.with(|p| unsafe { p.read() })
    }
}
