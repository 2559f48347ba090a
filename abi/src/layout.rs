//! The region: header line, producer line, consumer line, then the records.

use core::fmt;
use core::mem::{offset_of, size_of};

use static_assertions::const_assert_eq;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::record::RECORD_SIZE;

/// `b"NXTRING1"` read as a little-endian `u64`: the first eight bytes of every region.
pub const MAGIC: u64 = u64::from_le_bytes(*b"NXTRING1");

/// The ABI major version. A reader refuses a region whose major differs from its own.
pub const ABI_MAJOR: u16 = 1;

/// The ABI minor version. Minor versions only add meaning to reserved words and to
/// bytes past the v1.0 header; a reader accepts every minor of its major.
pub const ABI_MINOR: u16 = 2;

/// The unit of separation between the header, the producer's line and the consumer's
/// line. 128 bytes, not 64: on x86-64 the spatial prefetcher pulls cache lines in
/// adjacent pairs, so two 64-byte lines written by different cores still contend.
pub const LINE_SIZE: usize = 128;

/// Offset of the [`Header`] in the region.
pub const HEADER_OFFSET: usize = 0;
/// Offset of the [`ProducerLine`] in the region.
pub const PRODUCER_LINE_OFFSET: usize = LINE_SIZE;
/// Offset of the [`ConsumerLine`] in the region.
pub const CONSUMER_LINE_OFFSET: usize = 2 * LINE_SIZE;
/// Offset of record 0 in a v1.0 region (the value a v1.0 writer puts in `header_size`).
pub const RECORDS_OFFSET: usize = 3 * LINE_SIZE;

/// Offset of the producer's write position (a `u64`, atomically accessed).
pub const WRITE_POS_OFFSET: usize = PRODUCER_LINE_OFFSET + offset_of!(ProducerLine, write_pos);
/// Offset of the producer's dropped-record counter (a `u64`, atomically accessed).
pub const DROPPED_OFFSET: usize = PRODUCER_LINE_OFFSET + offset_of!(ProducerLine, dropped);
/// Offset of the consumer's read position (a `u64`, atomically accessed).
pub const READ_POS_OFFSET: usize = CONSUMER_LINE_OFFSET + offset_of!(ConsumerLine, read_pos);
/// Offset of the consumer's state flags (a `u64`, atomically accessed).
pub const CONSUMER_FLAGS_OFFSET: usize =
    CONSUMER_LINE_OFFSET + offset_of!(ConsumerLine, consumer_flags);

/// Consumer flag: the consumer found a protocol violation and stopped reading this ring.
pub const CONSUMER_FLAG_QUARANTINED: u64 = 1 << 0;
/// Consumer flag: the consumer has let go of this ring; nothing written will be read.
pub const CONSUMER_FLAG_CLOSED: u64 = 1 << 1;

/// The smallest capacity, in records.
pub const MIN_CAPACITY: u32 = 2;
/// The largest capacity, in records (512 MiB of records at 32 bytes each).
pub const MAX_CAPACITY: u32 = 1 << 24;

/// The first line of a region. Written once by the side that creates the region, before
/// it is shared; never trusted afterwards (the consumer keeps its own [`Geometry`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: u64,
    /// [`ABI_MAJOR`] of the writer of this header.
    pub abi_major: u16,
    /// [`ABI_MINOR`] of the writer of this header.
    pub abi_minor: u16,
    /// Bytes before record 0: [`RECORDS_OFFSET`] in v1.0; later minors may grow it in
    /// whole [`LINE_SIZE`] steps.
    pub header_size: u32,
    /// Bytes per record: [`RECORD_SIZE`] for every v1 minor.
    pub record_size: u32,
    /// Records in the ring: a power of two in `MIN_CAPACITY..=MAX_CAPACITY`.
    pub capacity: u32,
    /// The grant generation: chosen by the consumer, different for every grant it
    /// makes, so a producer can tell a new ring from an old one after a restart.
    pub epoch: u64,
    /// Written as zero; a later minor may give these meaning.
    pub reserved: [u64; 12],
}
const_assert_eq!(size_of::<Header>(), LINE_SIZE);
const_assert_eq!(offset_of!(Header, abi_major), 8);
const_assert_eq!(offset_of!(Header, header_size), 12);
const_assert_eq!(offset_of!(Header, record_size), 16);
const_assert_eq!(offset_of!(Header, capacity), 20);
const_assert_eq!(offset_of!(Header, epoch), 24);
const_assert_eq!(offset_of!(Header, reserved), 32);

/// The producer's line: written only by the producer, read by the consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ProducerLine {
    /// Records published so far (a free-running position; slot = `pos % capacity`).
    /// Stored with Release after the records it covers are written.
    pub write_pos: u64,
    /// Records the producer gave up on because the ring was full. Monotonic.
    pub dropped: u64,
    /// Written as zero; a later minor may give these meaning.
    pub reserved: [u64; 14],
}
const_assert_eq!(size_of::<ProducerLine>(), LINE_SIZE);
const_assert_eq!(offset_of!(ProducerLine, dropped), 8);

/// The consumer's line: written only by the consumer, read by the producer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ConsumerLine {
    /// Records consumed so far. Stored with Release after the records it covers were
    /// copied out; the producer may then overwrite their slots.
    pub read_pos: u64,
    /// [`CONSUMER_FLAG_QUARANTINED`], [`CONSUMER_FLAG_CLOSED`]; other bits zero.
    pub consumer_flags: u64,
    /// Written as zero; a later minor may give these meaning.
    pub reserved: [u64; 14],
}
const_assert_eq!(size_of::<ConsumerLine>(), LINE_SIZE);
const_assert_eq!(offset_of!(ConsumerLine, consumer_flags), 8);

const_assert_eq!(WRITE_POS_OFFSET, 128);
const_assert_eq!(DROPPED_OFFSET, 136);
const_assert_eq!(READ_POS_OFFSET, 256);
const_assert_eq!(CONSUMER_FLAGS_OFFSET, 264);
const_assert_eq!(RECORDS_OFFSET, 384);
const_assert_eq!(RECORDS_OFFSET % RECORD_SIZE, 0);

/// The shape of a ring, as the consumer keeps it privately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    capacity: u32,
    records_offset: u32,
}

/// A capacity outside the allowed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeometryError {
    /// The capacity asked for, in records.
    pub capacity: u64,
}

impl fmt::Display for GeometryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ring capacity {} records is not allowed: expected a power of two from {} to {}",
            self.capacity, MIN_CAPACITY, MAX_CAPACITY
        )
    }
}

impl core::error::Error for GeometryError {}

impl Geometry {
    /// A v1.0 geometry of `capacity` records.
    pub const fn new(capacity: u64) -> Result<Self, GeometryError> {
        if capacity < MIN_CAPACITY as u64
            || capacity > MAX_CAPACITY as u64
            || !capacity.is_power_of_two()
        {
            return Err(GeometryError { capacity });
        }
        Ok(Self {
            capacity: capacity as u32,
            records_offset: RECORDS_OFFSET as u32,
        })
    }

    /// Records in the ring (a power of two).
    pub const fn capacity(&self) -> u32 {
        self.capacity
    }

    /// `capacity - 1`: `pos & mask()` is the slot of position `pos`.
    pub const fn mask(&self) -> u64 {
        self.capacity as u64 - 1
    }

    /// Byte offset of record 0.
    pub const fn records_offset(&self) -> usize {
        self.records_offset as usize
    }

    /// Byte offset of the record at free-running position `pos`.
    pub const fn record_offset(&self, pos: u64) -> usize {
        self.records_offset as usize + (pos & self.mask()) as usize * RECORD_SIZE
    }

    /// Bytes the whole region needs.
    pub const fn region_len(&self) -> usize {
        self.records_offset as usize + self.capacity as usize * RECORD_SIZE
    }
}

/// Why a header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The region is shorter than a header, or shorter than its geometry needs.
    RegionTooSmall {
        /// Bytes the header's geometry needs.
        needed: u64,
        /// Bytes the region has.
        actual: u64,
    },
    /// The first eight bytes are not [`MAGIC`].
    BadMagic {
        /// What was found.
        found: u64,
    },
    /// The region was written for another ABI major.
    MajorMismatch {
        /// The region's major.
        found: u16,
    },
    /// `record_size` is not [`RECORD_SIZE`].
    RecordSize {
        /// The region's record size.
        found: u32,
    },
    /// `header_size` is below [`RECORDS_OFFSET`] or not a multiple of [`LINE_SIZE`].
    HeaderSize {
        /// The region's header size.
        found: u32,
    },
    /// `capacity` is not a power of two in range.
    Capacity {
        /// The region's capacity.
        found: u32,
    },
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::RegionTooSmall { needed, actual } => {
                write!(f, "region is {actual} bytes, its header needs {needed}")
            }
            Self::BadMagic { found } => {
                write!(
                    f,
                    "bad magic {found:#018x}, expected {MAGIC:#018x} (\"NXTRING1\")"
                )
            }
            Self::MajorMismatch { found } => {
                write!(
                    f,
                    "ABI major {found} is not supported, expected {ABI_MAJOR}"
                )
            }
            Self::RecordSize { found } => {
                write!(f, "record size {found} bytes, expected {RECORD_SIZE}")
            }
            Self::HeaderSize { found } => write!(
                f,
                "header size {found} bytes, expected a multiple of {LINE_SIZE} \
                 of at least {RECORDS_OFFSET}"
            ),
            Self::Capacity { found } => write!(
                f,
                "capacity {found} records, expected a power of two from {MIN_CAPACITY} \
                 to {MAX_CAPACITY}"
            ),
        }
    }
}

impl core::error::Error for HeaderError {}

impl Header {
    /// The v1.0 header for `geometry`, with the grant generation `epoch`.
    pub const fn new(geometry: Geometry, epoch: u64) -> Self {
        Self {
            magic: MAGIC,
            abi_major: ABI_MAJOR,
            abi_minor: ABI_MINOR,
            header_size: geometry.records_offset,
            record_size: RECORD_SIZE as u32,
            capacity: geometry.capacity,
            epoch,
            reserved: [0; 12],
        }
    }

    /// Reads a header from the first bytes of a region (a copy; never a reference).
    pub fn read_from_region(region: &[u8]) -> Result<Self, HeaderError> {
        match Self::read_from_prefix(region) {
            Ok((header, _)) => Ok(header),
            Err(_) => Err(HeaderError::RegionTooSmall {
                needed: RECORDS_OFFSET as u64,
                actual: region.len() as u64,
            }),
        }
    }

    /// Checks this header against the versioning rules and a region of `region_len`
    /// bytes, and returns the geometry it describes.
    pub fn validate(&self, region_len: usize) -> Result<Geometry, HeaderError> {
        if self.magic != MAGIC {
            return Err(HeaderError::BadMagic { found: self.magic });
        }
        if self.abi_major != ABI_MAJOR {
            return Err(HeaderError::MajorMismatch {
                found: self.abi_major,
            });
        }
        if self.record_size as usize != RECORD_SIZE {
            return Err(HeaderError::RecordSize {
                found: self.record_size,
            });
        }
        if (self.header_size as usize) < RECORDS_OFFSET
            || self.header_size as usize % LINE_SIZE != 0
        {
            return Err(HeaderError::HeaderSize {
                found: self.header_size,
            });
        }
        let mut geometry = match Geometry::new(self.capacity as u64) {
            Ok(geometry) => geometry,
            Err(_) => {
                return Err(HeaderError::Capacity {
                    found: self.capacity,
                });
            }
        };
        geometry.records_offset = self.header_size;
        let needed = geometry.records_offset as u64 + geometry.capacity as u64 * RECORD_SIZE as u64;
        if needed > region_len as u64 {
            return Err(HeaderError::RegionTooSmall {
                needed,
                actual: region_len as u64,
            });
        }
        Ok(geometry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_flags_are_the_specs_bits() {
        // abi/README.md: bit 0 quarantined, bit 1 closed.
        assert_eq!(CONSUMER_FLAG_QUARANTINED, 1 << 0);
        assert_eq!(CONSUMER_FLAG_CLOSED, 1 << 1);
    }

    #[test]
    fn magic_spells_the_ring_name() {
        assert_eq!(&MAGIC.to_le_bytes(), b"NXTRING1");
    }

    #[test]
    fn geometry_accepts_only_powers_of_two_in_range() {
        assert!(Geometry::new(0).is_err());
        assert!(Geometry::new(1).is_err());
        assert!(Geometry::new(3).is_err());
        assert!(Geometry::new(u64::from(MAX_CAPACITY) * 2).is_err());
        let g = Geometry::new(8).expect("8 is allowed");
        assert_eq!(g.capacity(), 8);
        assert_eq!(g.mask(), 7);
        assert_eq!(g.record_offset(9), RECORDS_OFFSET + RECORD_SIZE);
        assert_eq!(g.region_len(), RECORDS_OFFSET + 8 * RECORD_SIZE);
    }

    #[test]
    fn header_round_trips_through_bytes() {
        let g = Geometry::new(64).expect("64 is allowed");
        let h = Header::new(g, 99);
        let bytes = h.as_bytes();
        let back = Header::read_from_region(bytes).expect("a whole header");
        assert_eq!(back, h);
        assert_eq!(back.validate(g.region_len()), Ok(g));
    }

    #[test]
    fn header_errors_name_what_is_wrong() {
        let g = Geometry::new(64).expect("64 is allowed");
        let good = Header::new(g, 1);
        let len = g.region_len();

        let h = Header { magic: 5, ..good };
        assert_eq!(h.validate(len), Err(HeaderError::BadMagic { found: 5 }));
        let h = Header {
            abi_major: 2,
            ..good
        };
        assert_eq!(
            h.validate(len),
            Err(HeaderError::MajorMismatch { found: 2 })
        );
        let h = Header {
            abi_minor: 9,
            ..good
        };
        assert_eq!(h.validate(len), Ok(g), "any minor of the major is accepted");
        let h = Header {
            abi_minor: 0,
            ..good
        };
        assert_eq!(h.validate(len), Ok(g), "a 1.0 region is read as before");
        let h = Header {
            record_size: 64,
            ..good
        };
        assert_eq!(h.validate(len), Err(HeaderError::RecordSize { found: 64 }));
        let h = Header {
            header_size: 200,
            ..good
        };
        assert_eq!(h.validate(len), Err(HeaderError::HeaderSize { found: 200 }));
        // Each rule alone: whole lines but fewer than three, and more than three lines
        // but not whole ones.
        for found in [256, 400] {
            let h = Header {
                header_size: found,
                ..good
            };
            assert_eq!(
                h.validate(len + 128),
                Err(HeaderError::HeaderSize { found })
            );
        }
        let h = Header {
            capacity: 65,
            ..good
        };
        assert_eq!(h.validate(len), Err(HeaderError::Capacity { found: 65 }));
        assert_eq!(
            good.validate(len - 1),
            Err(HeaderError::RegionTooSmall {
                needed: len as u64,
                actual: len as u64 - 1
            })
        );
        assert!(Header::read_from_region(&[0u8; 10]).is_err());
    }

    #[test]
    fn errors_name_the_bad_value_and_what_was_expected() {
        extern crate alloc;
        use alloc::string::ToString;
        let cases: [(&dyn fmt::Display, &str); 7] = [
            (
                &GeometryError { capacity: 3 },
                "capacity 3 records is not allowed: expected a power of two from 2 to 16777216",
            ),
            (
                &HeaderError::RegionTooSmall {
                    needed: 900,
                    actual: 10,
                },
                "region is 10 bytes, its header needs 900",
            ),
            (
                &HeaderError::BadMagic { found: 5 },
                "bad magic 0x0000000000000005",
            ),
            (&HeaderError::MajorMismatch { found: 2 }, "2"),
            (&HeaderError::RecordSize { found: 64 }, "64"),
            (&HeaderError::HeaderSize { found: 200 }, "200"),
            (&HeaderError::Capacity { found: 65 }, "65"),
        ];
        for (error, text) in cases {
            let message = error.to_string();
            assert!(message.contains(text), "{message:?} lacks {text:?}");
        }
    }

    #[test]
    fn a_larger_header_of_a_later_minor_moves_the_records() {
        let g = Geometry::new(4).expect("4 is allowed");
        let h = Header {
            header_size: 512,
            abi_minor: 1,
            ..Header::new(g, 1)
        };
        let g2 = h
            .validate(512 + 4 * RECORD_SIZE)
            .expect("a grown header is fine");
        assert_eq!(g2.records_offset(), 512);
        assert_eq!(g2.region_len(), 512 + 4 * RECORD_SIZE);
    }
}
