//! The grant protocol: the only IPC of the pipeline, one request per ring.
//!
//! A producer connects to the consumer's control socket (on Linux a Unix
//! `SOCK_SEQPACKET` socket, so each message is one frame) and keeps the connection for
//! its lifetime: the consumer learns the producer's identity from the kernel at accept
//! time (`SO_PEERCRED`), and end-of-file tells it the producer is gone. Each
//! [`GrantRequest`] asks for one ring; the [`GrantResponse`] carries the ring's fd as
//! `SCM_RIGHTS` ancillary data when `status` is [`GrantStatus::OK`]. Nothing else is
//! ever sent: samples travel through the rings only.

use core::mem::size_of;

use static_assertions::const_assert_eq;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

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

    /// Whether magic, version and op are ones this version understands.
    pub fn is_well_formed(&self) -> bool {
        self.magic == GRANT_MAGIC && self.version == GRANT_VERSION && self.op == GrantOp::RING
    }
}

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
