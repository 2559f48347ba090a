//! A ring region over raw shared memory: the layout `telemetry-abi` specifies, at an
//! address the caller provides (an `mmap` of a memfd, a driver's shared pages).
//!
//! This module touches raw memory, so it opts in to `unsafe`. Every read of the region
//! and every write of its header and positions goes through `AtomicU64::from_ptr` on an
//! 8-aligned word inside the mapping: the other side of a shared region may be another
//! process that writes anything at any time, and word-wise atomic access makes such
//! races yield garbage values, never undefined behaviour on this side.
//!
//! The one exception is the producer's record write on x86-64: two 16-byte stores
//! instead of four 8-byte ones (see [`MappedRegion::write_slot`]). The consumer never
//! writes a slot, so those stores have no racing writer; they only race with a consumer
//! that reads a slot before it was published, which the protocol rules out and which
//! would at worst read a torn record (copied once, then validated, as every record is).
//! The writer's `PREFETCHW` hint ([`MappedRegion::prepare_write`]) is inline assembly
//! too, but accesses no data.
#![expect(
    unsafe_code,
    reason = "the one module that addresses raw shared memory"
)]

use core::fmt;
use core::ptr::NonNull;

use telemetry_abi::{
    CONSUMER_FLAGS_OFFSET, DROPPED_OFFSET, Geometry, Header, HeaderError, LINE_SIZE,
    READ_POS_OFFSET, RECORD_SIZE, Record, WRITE_POS_OFFSET,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::region::Region;
use crate::sync::{AtomicU64, Ordering};

const WORDS_PER_RECORD: usize = RECORD_SIZE / 8;

/// A ring region at a caller-provided address, laid out as `telemetry-abi` says.
pub struct MappedRegion {
    base: NonNull<u8>,
    /// Record 0's address: `base` plus the geometry's records offset, computed once so
    /// that a slot's address is one shift and one add on the writer's path.
    records: NonNull<u8>,
    geometry: Geometry,
    /// Whether the CPU has `PREFETCHW` (see [`MappedRegion::prepare_write`]).
    prefetchw: bool,
}

/// Whether the CPU implements `PREFETCHW` (CPUID leaf 8000_0001h, ECX bit 8): every
/// AMD64 processor, and Intel's since Broadwell.
#[cfg(target_arch = "x86_64")]
fn has_prefetchw() -> bool {
    use core::arch::x86_64::__cpuid;
    let max_extended = __cpuid(0x8000_0000).eax;
    max_extended >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn has_prefetchw() -> bool {
    false
}

impl fmt::Debug for MappedRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedRegion")
            .field("base", &self.base)
            .field("geometry", &self.geometry)
            .finish()
    }
}

// SAFETY: a `MappedRegion` is an address plus an immutable geometry; every access
// through it is an atomic word access, which is sound from any thread.
unsafe impl Send for MappedRegion {}
// SAFETY: as for `Send`: shared access is only ever atomic word access.
unsafe impl Sync for MappedRegion {}

/// The address or length handed to a `MappedRegion` cannot hold a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The base address is not aligned to 8 bytes.
    Misaligned,
    /// The header is missing, malformed, or describes more memory than was given.
    Header(HeaderError),
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Misaligned => f.write_str("region base address is not 8-byte aligned"),
            Self::Header(e) => write!(f, "region header refused: {e}"),
        }
    }
}

impl core::error::Error for MapError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Misaligned => None,
            Self::Header(e) => Some(e),
        }
    }
}

impl MappedRegion {
    /// Lays out a new region at `base`: writes the header for `geometry` and `epoch`
    /// and zeroes both lines. The records are left as they are (the consumer never
    /// reads a slot that was not published).
    ///
    /// # Safety
    ///
    /// `base` points to `len` bytes that are valid for reads and writes for as long as
    /// the returned region (and any writer or reader over it) is used, and nobody else
    /// accesses them until this call returns.
    pub unsafe fn init(
        base: NonNull<u8>,
        len: usize,
        geometry: Geometry,
        epoch: u64,
    ) -> Result<Self, MapError> {
        if base.as_ptr() as usize % 8 != 0 {
            return Err(MapError::Misaligned);
        }
        let header = Header::new(geometry, epoch);
        header.validate(len).map_err(MapError::Header)?;
        // SAFETY: `validate` checked the geometry against `len`.
        let region = unsafe { Self::validated(base, geometry) };
        let mut words = [0u64; LINE_SIZE / 8];
        words.as_mut_bytes().copy_from_slice(header.as_bytes());
        // Header line, then the producer's and consumer's lines, all zero but the header.
        for (i, word) in words
            .iter()
            .chain([0u64; 2 * LINE_SIZE / 8].iter())
            .enumerate()
        {
            // SAFETY: `i * 8` is below the records offset, inside the `len` bytes the
            // caller vouched for (validated above), and 8-aligned.
            unsafe { region.word(i * 8) }.store(*word, Ordering::Relaxed);
        }
        Ok(region)
    }

    /// Takes a region someone else laid out at `base`: copies its header once,
    /// validates it against `len`, and keeps that geometry privately from then on.
    ///
    /// # Safety
    ///
    /// `base` points to `len` bytes that stay valid for reads and writes (by this and
    /// other processes) for as long as the returned region is used.
    pub unsafe fn attach(base: NonNull<u8>, len: usize) -> Result<Self, MapError> {
        if base.as_ptr() as usize % 8 != 0 {
            return Err(MapError::Misaligned);
        }
        if len < LINE_SIZE {
            return Err(MapError::Header(HeaderError::RegionTooSmall {
                needed: LINE_SIZE as u64,
                actual: len as u64,
            }));
        }
        let mut words = [0u64; LINE_SIZE / 8];
        for (i, word) in words.iter_mut().enumerate() {
            // SAFETY: `i * 8 < LINE_SIZE <= len`, 8-aligned, inside the caller's memory.
            let atomic = unsafe { AtomicU64::from_ptr(base.as_ptr().add(i * 8).cast::<u64>()) };
            *word = atomic.load(Ordering::Relaxed);
        }
        let header = Header::read_from_bytes(words.as_bytes()).map_err(|_| {
            MapError::Header(HeaderError::RegionTooSmall {
                needed: LINE_SIZE as u64,
                actual: len as u64,
            })
        })?;
        let geometry = header.validate(len).map_err(MapError::Header)?;
        // SAFETY: `validate` checked the geometry against `len`.
        Ok(unsafe { Self::validated(base, geometry) })
    }

    /// The region at `base` with `geometry`.
    ///
    /// # Safety
    ///
    /// `geometry` was validated against the length of the memory at `base`: its records
    /// area lies inside it.
    unsafe fn validated(base: NonNull<u8>, geometry: Geometry) -> Self {
        // SAFETY: the records offset is inside the validated region (the caller's
        // contract), so the pointer stays inside the same allocation.
        let records = unsafe { base.add(geometry.records_offset()) };
        Self {
            base,
            records,
            geometry,
            prefetchw: has_prefetchw(),
        }
    }

    /// The region's grant epoch as the header says now (informational: a producer may
    /// have rewritten it; the consumer keeps its own).
    pub fn header_epoch(&self) -> u64 {
        // SAFETY: byte 24 of the header lies inside the validated region and is 8-aligned.
        unsafe { self.word(24) }.load(Ordering::Relaxed)
    }

    /// The address the region starts at.
    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// The first word of `slot`.
    ///
    /// # Safety
    ///
    /// `slot < capacity`: the result then points inside the validated region (no
    /// masking here; the callers mask with the same geometry).
    #[inline(always)]
    unsafe fn slot_ptr(&self, slot: usize) -> *mut u64 {
        // SAFETY: `records_offset + capacity * RECORD_SIZE` is within the validated
        // region length, so the slot's bytes lie inside the caller's memory.
        unsafe { self.records.as_ptr().add(slot * RECORD_SIZE) }.cast::<u64>()
    }

    /// The atomic word at byte `offset` of the region.
    ///
    /// # Safety
    ///
    /// `offset + 8 <= region_len` and `offset % 8 == 0`.
    unsafe fn word(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: the caller keeps `offset` inside the region and aligned; the region's
        // memory outlives `self` (constructor contract), and is only accessed atomically.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast::<u64>()) }
    }
}

// SAFETY: the geometry is fixed at construction and validated against the mapping's
// length, so every slot below its capacity (the callers' precondition) lies inside the
// records area; the four atomics are distinct words of the validated producer and consumer
// lines.
unsafe impl Region for MappedRegion {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn write_pos(&self) -> &AtomicU64 {
        // SAFETY: a fixed offset inside the producer's line, 8-aligned.
        unsafe { self.word(WRITE_POS_OFFSET) }
    }
    fn dropped(&self) -> &AtomicU64 {
        // SAFETY: a fixed offset inside the producer's line, 8-aligned.
        unsafe { self.word(DROPPED_OFFSET) }
    }
    fn read_pos(&self) -> &AtomicU64 {
        // SAFETY: a fixed offset inside the consumer's line, 8-aligned.
        unsafe { self.word(READ_POS_OFFSET) }
    }
    fn consumer_flags(&self) -> &AtomicU64 {
        // SAFETY: a fixed offset inside the consumer's line, 8-aligned.
        unsafe { self.word(CONSUMER_FLAGS_OFFSET) }
    }
    #[inline(always)]
    unsafe fn write_slot(&self, slot: usize, record: Record) {
        debug_assert!(slot < self.geometry.capacity() as usize);
        let words: [u64; WORDS_PER_RECORD] = zerocopy::transmute!(record);
        // The slot's address once: `word` would load `base` again after every store,
        // which the compiler cannot tell apart from this region's own fields.
        // SAFETY: `slot < capacity`, the caller's precondition.
        let at = unsafe { self.slot_ptr(slot) };
        // Two 16-byte stores instead of four 8-byte ones. Measured once against the
        // four-store write built into the same binary (the pipeline bench's floor,
        // interleaved, 101 rounds a pass): 1.5 against 1.9 ns a push in the pass where
        // transfers between the cores were fast, the same in two passes where they were
        // slow. Fewer stores waiting behind the slot line's transfer is the likely
        // reason; in `HeapRegion` under the ring bench's concurrent drain the same
        // change measured slower, so it is made here only.
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::{__m128i, _mm_set_epi64x, _mm_storeu_si128};
            let [w0, w1, w2, w3] = words.map(|w| w as i64);
            // SAFETY: SSE2 is part of x86-64, so the intrinsics are available. `at` is a
            // record slot inside the validated region (`slot_ptr`), 32 bytes from an
            // 8-aligned address: words 0-1 and 2-3 are inside it, and unaligned stores
            // need no more alignment. This writer is the slot's only writer and the
            // consumer does not read it until the Release store of the write position
            // that follows (the trait's contract), so nothing accesses these bytes
            // concurrently.
            unsafe {
                _mm_storeu_si128(at.cast::<__m128i>(), _mm_set_epi64x(w1, w0));
                _mm_storeu_si128(at.add(2).cast::<__m128i>(), _mm_set_epi64x(w3, w2));
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        for (i, word) in words.iter().enumerate() {
            // SAFETY: `at` is a record slot inside the validated region (`slot_ptr`),
            // 8-aligned; word `i` of 4 stays inside it.
            unsafe { AtomicU64::from_ptr(at.add(i)) }.store(*word, Ordering::Relaxed);
        }
    }
    /// Asks for the slot's line with intent to write (`PREFETCHW`), where the CPU has
    /// the instruction. The line was last read by the consumer, a lap ago, so a store to
    /// it waits for the line to come back, and the stores behind it wait in order; the
    /// [`Writer`](crate::Writer) asks some records ahead, which overlaps that transfer
    /// with the writes before it.
    #[inline(always)]
    fn prepare_write(&self, slot: usize) {
        if !self.prefetchw {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // The address by wrapping arithmetic, so no bound is assumed here: the
            // writer passes a slot below the capacity, and a prefetch of any other
            // address would still be harmless.
            let at = self
                .records
                .as_ptr()
                .wrapping_add(slot.wrapping_mul(RECORD_SIZE));
            // SAFETY: `PREFETCHW` is a hint the CPU has (checked when the region was
            // made): it never faults, whatever the address, changes no memory contents
            // and no flags, and reads only its address register.
            unsafe {
                core::arch::asm!(
                    "prefetchw [{0}]",
                    in(reg) at,
                    options(nostack, preserves_flags, readonly),
                );
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = slot;
    }
    #[inline(always)]
    unsafe fn read_slot(&self, slot: usize) -> Record {
        debug_assert!(slot < self.geometry.capacity() as usize);
        // SAFETY: `slot < capacity`, the caller's precondition.
        let at = unsafe { self.slot_ptr(slot) };
        let mut words = [0u64; WORDS_PER_RECORD];
        for (i, word) in words.iter_mut().enumerate() {
            // SAFETY: as in `write_slot`: inside the slot, 8-aligned. The load is atomic,
            // so a concurrent hostile write gives a torn value, never UB.
            *word = unsafe { AtomicU64::from_ptr(at.add(i)) }.load(Ordering::Relaxed);
        }
        zerocopy::transmute!(words)
    }
}
