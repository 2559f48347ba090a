//! What a ring lives in: the [`Region`] trait the [`Writer`](crate::Writer) and
//! [`Reader`](crate::Reader) are generic over.

#![expect(
    unsafe_code,
    reason = "defines the unsafe contract of ring memory and forwards it"
)]

use telemetry_abi::{Geometry, Record};

use crate::sync::AtomicU64;

/// The memory of one ring: its trusted geometry, the four shared words of the
/// protocol, and the record slots.
///
/// # Safety
///
/// An implementor guarantees that:
/// - `geometry()` always returns the same value, and `region_len()` bytes of memory
///   (when the region is memory-backed) stay mapped for the implementor's lifetime;
/// - `write_slot(slot, _)` and `read_slot(slot)` touch only the 32 bytes of `slot`
///   (their callers guarantee `slot < geometry().capacity()`);
/// - the four atomics are distinct and live as long as `self`.
pub unsafe trait Region {
    /// The geometry as the side that created the region set it (never re-read from
    /// shared memory).
    fn geometry(&self) -> Geometry;
    /// The producer's write position.
    fn write_pos(&self) -> &AtomicU64;
    /// The producer's count of records it gave up on.
    fn dropped(&self) -> &AtomicU64;
    /// The consumer's read position.
    fn read_pos(&self) -> &AtomicU64;
    /// The consumer's state flags (`CONSUMER_FLAG_*`).
    fn consumer_flags(&self) -> &AtomicU64;

    /// Stores `record` in `slot`.
    ///
    /// # Safety
    ///
    /// `slot < geometry().capacity()`; the caller is the ring's only writer and, by the
    /// protocol, the consumer is not reading `slot` (it lies between the read and the
    /// write position plus capacity).
    unsafe fn write_slot(&self, slot: usize, record: Record);

    /// A hint from the writer that it will write `slot` soon (the slot is free: the
    /// consumer has released it). A region may start bringing the slot's memory close
    /// for writing; it must not read or change the slot's contents. Does nothing by
    /// default.
    #[inline(always)]
    fn prepare_write(&self, slot: usize) {
        let _ = slot;
    }

    /// Copies the record out of `slot`.
    ///
    /// # Safety
    ///
    /// `slot < geometry().capacity()`, and no write to `slot` happens while it is
    /// copied: the caller is the ring's only reader and `slot` was published to it (the
    /// writer does not reuse it until the reader releases it), or the caller is the
    /// ring's only writer itself. Regions that may be shared with an untrusted writer
    /// implement this as a race-tolerant copy (see [`MappedRegion`](crate::MappedRegion)),
    /// so a writer breaking the protocol yields garbage values, never undefined
    /// behaviour.
    unsafe fn read_slot(&self, slot: usize) -> Record;
}

/// Implements [`Region`] for a pointer type by forwarding every call to its target.
macro_rules! forward_region {
    ($(#[$attr:meta])* $ptr:ty) => {
        $(#[$attr])*
        // SAFETY: forwards every call to the same `R`, which upholds the contract and
        // which the pointer keeps alive as long as itself.
        unsafe impl<R: Region + ?Sized> Region for $ptr {
            fn geometry(&self) -> Geometry {
                (**self).geometry()
            }
            fn write_pos(&self) -> &AtomicU64 {
                (**self).write_pos()
            }
            fn dropped(&self) -> &AtomicU64 {
                (**self).dropped()
            }
            fn read_pos(&self) -> &AtomicU64 {
                (**self).read_pos()
            }
            fn consumer_flags(&self) -> &AtomicU64 {
                (**self).consumer_flags()
            }
            unsafe fn write_slot(&self, slot: usize, record: Record) {
                // SAFETY: the caller's guarantees are passed on unchanged.
                unsafe { (**self).write_slot(slot, record) }
            }
            #[inline(always)]
            fn prepare_write(&self, slot: usize) {
                (**self).prepare_write(slot)
            }
            unsafe fn read_slot(&self, slot: usize) -> Record {
                // SAFETY: the caller's guarantees are passed on unchanged.
                unsafe { (**self).read_slot(slot) }
            }
        }
    };
}

forward_region!(&R);
forward_region!(
    #[cfg(feature = "alloc")]
    alloc::sync::Arc<R>
);
