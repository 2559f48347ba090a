//! The shared-memory contract between a telemetry producer and `metricsd`.
//!
//! Who uses this crate: the ring (`telemetry-ring`), the producer library
//! (`nexus-metrics`), `metricsd`, and anyone writing a compatible producer in another
//! language. Every byte both sides of a ring see is defined here and nowhere else; the
//! full written specification is `abi/README.md`.
//!
//! A region is one header line, the producer's line, the consumer's line, then
//! `capacity` fixed-size [`Record`]s:
//!
//! ```
//! use telemetry_abi::{Header, Record, RecordKind, Geometry};
//!
//! let geometry = Geometry::new(1024).expect("1024 is a power of two in range");
//! let header = Header::new(geometry, 7);
//! assert_eq!(header.validate(geometry.region_len()), Ok(geometry));
//!
//! let record = Record::counter(42, 3);
//! assert_eq!(record.kind, RecordKind::COUNTER);
//! assert_eq!(record.key, 42);
//! ```
//!
//! Nothing in this crate trusts its input: every type is plain old data (any bit pattern
//! is a valid value), and meaning is checked by explicit validation after a copy.
#![no_std]
#![forbid(unsafe_code)]

mod grant;
mod layout;
mod record;
mod register;

pub use grant::{
    GRANT_FRAME_SIZE, GRANT_MAGIC, GRANT_VERSION, GrantOp, GrantRequest, GrantRequestError,
    GrantResponse, GrantStatus,
};
pub use layout::{
    ABI_MAJOR, ABI_MINOR, CONSUMER_FLAG_CLOSED, CONSUMER_FLAG_QUARANTINED, CONSUMER_FLAGS_OFFSET,
    CONSUMER_LINE_OFFSET, ConsumerLine, DROPPED_OFFSET, Geometry, GeometryError, HEADER_OFFSET,
    Header, HeaderError, LINE_SIZE, MAGIC, MAX_CAPACITY, MIN_CAPACITY, PRODUCER_LINE_OFFSET,
    ProducerLine, READ_POS_OFFSET, RECORDS_OFFSET, WRITE_POS_OFFSET,
};
pub use record::{
    AttrValueType, RECORD_SIZE, Record, RecordKind, Sample, SpanAttr, SpanEnd, SpanStart,
    SpanStatus, SpanTrace,
};
pub use register::{
    Label, MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN, MAX_LABELS, MAX_METADATA_VALUE_LEN,
    MAX_NAME_LEN, MAX_REGISTER_DATA_LEN, MAX_REGISTER_RECORDS, REGISTER_DATA_PER_RECORD, Register,
    RegisterData, RegisterError, RegisterKind, Registration, RegistrationBuf, encode_registration,
};
