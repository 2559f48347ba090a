//! The grant protocol: the only IPC of the pipeline, one request per ring.
//!
//! A producer connects to the consumer's control socket (on Linux a Unix
//! `SOCK_SEQPACKET` socket, so each message is one frame) and keeps the connection for
//! its lifetime: the consumer learns the producer's identity from the kernel at accept
//! time (`SO_PEERCRED`), and end-of-file tells it the producer is gone. Each
//! [`GrantRequest`] asks for one ring; the [`GrantResponse`] carries the ring's fd as
//! `SCM_RIGHTS` ancillary data when `status` is [`GrantStatus::OK`]. Nothing else is
//! ever sent: samples travel through the rings only.

use core::fmt;
use core::mem::size_of;

use static_assertions::const_assert_eq;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::layout::MIN_CAPACITY;

/// `b"NXGR"` read as a little-endian `u32`: the first four bytes of every grant frame.
pub const GRANT_MAGIC: u32 = u32::from_le_bytes(*b"NXGR");
/// The grant protocol version.
pub const GRANT_VERSION: u16 = 1;
/// Bytes in every grant frame, request or response.
pub const GRANT_FRAME_SIZE: usize = 32;

/// What a grant request asks for: an open enum over `u16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(transparent)]
pub struct GrantOp(pub u16);

impl GrantOp {
    /// Grant one more ring.
    pub const RING: Self = Self(1);
    /// Return a ring granted by an earlier consumer that ended without closing it
    /// (ABI 1.2): its memfd travels with the request as `SCM_RIGHTS`, and the consumer
    /// finishes it from the durable position its own log recorded, then closes it.
    pub const RETURN: Self = Self(2);
}

/// A producer's request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GrantRequest {
    /// [`GRANT_MAGIC`].
    pub magic: u32,
    /// [`GRANT_VERSION`].
    pub version: u16,
    /// What is asked for.
    pub op: GrantOp,
    /// Records wanted; zero for the consumer's default. The consumer may grant less.
    pub capacity: u32,
    /// Zero.
    pub flags: u32,
    /// A label for diagnostics (the producer's thread id, say); never trusted.
    pub hint: u64,
    /// Zero.
    pub reserved: u64,
}
const_assert_eq!(size_of::<GrantRequest>(), GRANT_FRAME_SIZE);

/// The answer to a request: an open enum over `u16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(transparent)]
pub struct GrantStatus(pub u16);

impl GrantStatus {
    /// Granted: the fd arrives with this frame.
    pub const OK: Self = Self(0);
    /// The request was malformed (bad magic, version, op or capacity).
    pub const INVALID_ARGS: Self = Self(1);
    /// The producer's service holds as many rings as its policy allows.
    pub const OVER_LIMIT: Self = Self(2);
    /// Too many requests too fast.
    pub const RATE_LIMITED: Self = Self(3);
    /// The consumer could not create a ring (out of memory, say); try later.
    pub const UNAVAILABLE: Self = Self(4);
    /// The consumer's grant policy does not let this peer (its uid, gid or service) ask.
    pub const DENIED: Self = Self(5);

    /// The status's name, or `None` for a value this version does not define.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::OK => "ok",
            Self::INVALID_ARGS => "invalid_args",
            Self::OVER_LIMIT => "over_limit",
            Self::RATE_LIMITED => "rate_limited",
            Self::UNAVAILABLE => "unavailable",
            Self::DENIED => "denied",
            _ => return None,
        })
    }
}

/// The consumer's response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GrantResponse {
    /// [`GRANT_MAGIC`].
    pub magic: u32,
    /// [`GRANT_VERSION`].
    pub version: u16,
    /// The outcome.
    pub status: GrantStatus,
    /// The consumer's id for the ring (stable for the ring's life; zero if refused).
    pub ring_id: u32,
    /// Records in the granted ring (zero if refused).
    pub capacity: u32,
    /// The epoch written in the ring's header (zero if refused).
    pub epoch: u64,
    /// Zero.
    pub reserved: u64,
}
const_assert_eq!(size_of::<GrantResponse>(), GRANT_FRAME_SIZE);

impl GrantRequest {
    /// A request for one ring of `capacity` records (zero: the consumer's default).
    pub const fn ring(capacity: u32, hint: u64) -> Self {
        Self {
            magic: GRANT_MAGIC,
            version: GRANT_VERSION,
            op: GrantOp::RING,
            capacity,
            flags: 0,
            hint,
            reserved: 0,
        }
    }

    /// A request returning the ring whose memfd is sent with it (ABI 1.2).
    pub const fn return_ring(hint: u64) -> Self {
        Self {
            op: GrantOp::RETURN,
            ..Self::ring(0, hint)
        }
    }

    /// Whether magic, version and op are ones this version understands.
    pub fn is_well_formed(&self) -> bool {
        self.magic == GRANT_MAGIC
            && self.version == GRANT_VERSION
            && (self.op == GrantOp::RING || self.op == GrantOp::RETURN)
    }

    /// Parses one received frame as a consumer does: exactly [`GRANT_FRAME_SIZE`]
    /// bytes, the magic, version and op this version defines, zero `flags` and
    /// `reserved`, and a capacity that is zero (the consumer's default) or a power of two
    /// of at least [`MIN_CAPACITY`]. How much of the capacity is granted is the
    /// consumer's policy, not part of the frame's validity.
    ///
    /// ```
    /// use telemetry_abi::{GrantRequest, GrantRequestError};
    /// use zerocopy::IntoBytes;
    ///
    /// let request = GrantRequest::ring(1024, 7);
    /// assert_eq!(GrantRequest::parse(request.as_bytes()), Ok(request));
    /// assert_eq!(
    ///     GrantRequest::parse(GrantRequest::ring(3, 7).as_bytes()),
    ///     Err(GrantRequestError::Capacity(3))
    /// );
    /// ```
    pub fn parse(frame: &[u8]) -> Result<Self, GrantRequestError> {
        let request =
            Self::read_from_bytes(frame).map_err(|_| GrantRequestError::Size(frame.len()))?;
        if request.magic != GRANT_MAGIC {
            return Err(GrantRequestError::Magic(request.magic));
        }
        if request.version != GRANT_VERSION {
            return Err(GrantRequestError::Version(request.version));
        }
        if request.op != GrantOp::RING && request.op != GrantOp::RETURN {
            return Err(GrantRequestError::Op(request.op.0));
        }
        if request.flags != 0 || request.reserved != 0 {
            return Err(GrantRequestError::Reserved);
        }
        let c = request.capacity;
        if request.op == GrantOp::RETURN && c != 0 {
            return Err(GrantRequestError::Capacity(c));
        }
        if c != 0 && (c < MIN_CAPACITY || !c.is_power_of_two()) {
            return Err(GrantRequestError::Capacity(c));
        }
        Ok(request)
    }
}

/// Why a received grant frame is not a valid [`GrantRequest`]; the consumer answers
/// each with [`GrantStatus::INVALID_ARGS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantRequestError {
    /// The frame is not [`GRANT_FRAME_SIZE`] bytes long.
    Size(usize),
    /// The first four bytes are not [`GRANT_MAGIC`].
    Magic(u32),
    /// The protocol version is not [`GRANT_VERSION`].
    Version(u16),
    /// The op is not one this version defines.
    Op(u16),
    /// `flags` or `reserved` is not zero.
    Reserved,
    /// The capacity is neither zero nor a power of two of at least [`MIN_CAPACITY`].
    Capacity(u32),
}

impl fmt::Display for GrantRequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Size(n) => write!(f, "grant frame is {n} bytes, expected {GRANT_FRAME_SIZE}"),
            Self::Magic(m) => write!(
                f,
                "grant frame magic is {m:#010x}, expected {GRANT_MAGIC:#010x} (\"NXGR\")"
            ),
            Self::Version(v) => {
                write!(
                    f,
                    "grant protocol version {v} is unknown, expected {GRANT_VERSION}"
                )
            }
            Self::Op(op) => write!(
                f,
                "grant op {op} is unknown, expected 1 (grant a ring) or 2 (return a ring)"
            ),
            Self::Reserved => f.write_str("grant request flags and reserved words must be zero"),
            Self::Capacity(c) => write!(
                f,
                "capacity {c} is not a power of two of at least {MIN_CAPACITY}, \
                 expected one or 0 for the consumer's default"
            ),
        }
    }
}

impl core::error::Error for GrantRequestError {}

impl GrantResponse {
    /// A successful grant.
    pub const fn granted(ring_id: u32, capacity: u32, epoch: u64) -> Self {
        Self {
            magic: GRANT_MAGIC,
            version: GRANT_VERSION,
            status: GrantStatus::OK,
            ring_id,
            capacity,
            epoch,
            reserved: 0,
        }
    }

    /// A refusal.
    pub const fn refused(status: GrantStatus) -> Self {
        Self {
            magic: GRANT_MAGIC,
            version: GRANT_VERSION,
            status,
            ring_id: 0,
            capacity: 0,
            epoch: 0,
            reserved: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_bytes() {
        let req = GrantRequest::ring(4096, 17);
        let back = GrantRequest::read_from_bytes(req.as_bytes()).expect("32 bytes");
        assert!(back.is_well_formed());
        assert_eq!(back, req);
        assert_eq!(&req.as_bytes()[..4], b"NXGR");

        let resp = GrantResponse::granted(3, 4096, 9);
        assert_eq!(GrantResponse::read_from_bytes(resp.as_bytes()), Ok(resp));
        assert_eq!(
            GrantResponse::refused(GrantStatus::OVER_LIMIT)
                .status
                .name(),
            Some("over_limit")
        );
        assert_eq!(GrantStatus(77).name(), None);
    }

    #[test]
    fn every_status_has_its_spec_name() {
        let names = [
            (GrantStatus::OK, "ok"),
            (GrantStatus::INVALID_ARGS, "invalid_args"),
            (GrantStatus::OVER_LIMIT, "over_limit"),
            (GrantStatus::RATE_LIMITED, "rate_limited"),
            (GrantStatus::UNAVAILABLE, "unavailable"),
            (GrantStatus::DENIED, "denied"),
        ];
        for (i, (status, name)) in names.into_iter().enumerate() {
            assert_eq!(status.0, i as u16, "abi/README.md numbers them 0 to 5");
            assert_eq!(status.name(), Some(name));
        }
        assert_eq!(GrantStatus(6).name(), None);
    }

    #[test]
    fn parse_names_each_malformed_field() {
        let good = GrantRequest::ring(0, 5);
        assert_eq!(GrantRequest::parse(good.as_bytes()), Ok(good));
        assert_eq!(
            GrantRequest::parse(&good.as_bytes()[..31]),
            Err(GrantRequestError::Size(31))
        );
        let long = [0u8; 33];
        assert_eq!(GrantRequest::parse(&long), Err(GrantRequestError::Size(33)));
        let bad = |r: GrantRequest| GrantRequest::parse(r.as_bytes());
        assert_eq!(
            bad(GrantRequest { magic: 1, ..good }),
            Err(GrantRequestError::Magic(1))
        );
        assert_eq!(
            bad(GrantRequest { version: 2, ..good }),
            Err(GrantRequestError::Version(2))
        );
        assert_eq!(
            bad(GrantRequest {
                op: GrantOp(0),
                ..good
            }),
            Err(GrantRequestError::Op(0))
        );
        assert_eq!(
            bad(GrantRequest { flags: 1, ..good }),
            Err(GrantRequestError::Reserved)
        );
        assert_eq!(
            bad(GrantRequest {
                reserved: 1 << 63,
                ..good
            }),
            Err(GrantRequestError::Reserved)
        );
        for c in [1, 3, 6, 1000, u32::MAX] {
            assert_eq!(
                bad(GrantRequest::ring(c, 0)),
                Err(GrantRequestError::Capacity(c))
            );
        }
        for c in [2, 4, 1 << 24, 1 << 31] {
            assert_eq!(bad(GrantRequest::ring(c, 0)), Ok(GrantRequest::ring(c, 0)));
        }
    }

    #[test]
    fn parse_errors_name_the_bad_value_and_the_expected_one() {
        extern crate alloc;
        use alloc::string::ToString;
        let cases = [
            (GrantRequestError::Size(31), "31 bytes, expected 32"),
            (
                GrantRequestError::Magic(1),
                "0x00000001, expected 0x5247584e",
            ),
            (
                GrantRequestError::Version(2),
                "version 2 is unknown, expected 1",
            ),
            (GrantRequestError::Op(9), "op 9 is unknown"),
            (GrantRequestError::Reserved, "must be zero"),
            (
                GrantRequestError::Capacity(3),
                "capacity 3 is not a power of two",
            ),
        ];
        for (error, text) in cases {
            let message = error.to_string();
            assert!(message.contains(text), "{message:?} lacks {text:?}");
        }
    }

    #[test]
    fn malformed_requests_are_recognised() {
        let good = GrantRequest::ring(0, 0);
        assert!(!GrantRequest { magic: 0, ..good }.is_well_formed());
        assert!(!GrantRequest { version: 2, ..good }.is_well_formed());
        assert!(
            !GrantRequest {
                op: GrantOp(9),
                ..good
            }
            .is_well_formed()
        );
    }
}
