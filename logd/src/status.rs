//! Reply statuses and reject reasons, as they travel on the wire.

use core::fmt;

/// Why logd refused something. The three reject classes of the design, `Internal` for a
/// failure that is logd's own (the disk journal could not be written), and `Denied` for a
/// query about records the peer may not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Wire status 1: the request or record is malformed or claims an identity.
    InvalidArgs,
    /// Wire status 2: a size or count bound was exceeded.
    OverLimit,
    /// Wire status 3: the sender's token bucket is empty.
    RateLimited,
    /// Wire status 4: logd could not store the record (not the client's fault).
    Internal,
    /// Wire status 5: the peer asked for records its uid may not read (the `[access]`
    /// policy).
    Denied,
}

impl Reject {
    /// The wire status byte.
    pub const fn to_wire(self) -> u8 {
        match self {
            Reject::InvalidArgs => 1,
            Reject::OverLimit => 2,
            Reject::RateLimited => 3,
            Reject::Internal => 4,
            Reject::Denied => 5,
        }
    }

    /// The reject for a wire status byte; `None` for 0 (ok) and unknown values.
    pub const fn from_wire(v: u8) -> Option<Reject> {
        match v {
            1 => Some(Reject::InvalidArgs),
            2 => Some(Reject::OverLimit),
            3 => Some(Reject::RateLimited),
            4 => Some(Reject::Internal),
            5 => Some(Reject::Denied),
            _ => None,
        }
    }

    /// The class name used in STATS and docs (`"invalid_args"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Reject::InvalidArgs => "invalid_args",
            Reject::OverLimit => "over_limit",
            Reject::RateLimited => "rate_limited",
            Reject::Internal => "internal",
            Reject::Denied => "denied",
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The finer reason behind a [`Reject`], one byte on the wire. Unknown values decode as
/// [`Reason::Other`] so an older client keeps working against a newer logd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// 0: no reason given (used with status ok).
    None,
    /// 1: the frame body does not parse (truncated, trailing bytes, bad count).
    Malformed,
    /// 2: the frame's version byte is not one logd speaks.
    UnsupportedVersion,
    /// 3: the frame's kind byte is not a request kind, or reserved flags are set.
    UnknownKind,
    /// 4: a level byte above 4.
    BadLevel,
    /// 5: a scope, message, key or value is not UTF-8.
    BadUtf8,
    /// 6: a field key claims a sender identity.
    IdentityClaim,
    /// 7: an empty field key.
    EmptyKey,
    /// 8: the frame is larger than `max_frame_bytes`.
    FrameTooLarge,
    /// 9: more records in one APPEND than `max_records_per_frame`.
    TooManyRecords,
    /// 10: more fields than `max_fields`.
    TooManyFields,
    /// 11: a key longer than `max_key_bytes`.
    KeyTooLong,
    /// 12: a value longer than `max_value_bytes`.
    ValueTooLong,
    /// 13: a scope longer than `max_scope_bytes`.
    ScopeTooLong,
    /// 14: a message longer than `max_message_bytes`.
    MessageTooLong,
    /// 15: the sender's records/s bucket is empty.
    RecordRate,
    /// 16: the sender's bytes/s bucket is empty.
    ByteRate,
    /// 17: logd already serves `max_connections` clients.
    TooManyConnections,
    /// 18: the disk journal could not be written.
    Storage,
    /// 19: the frame did not arrive completely within `frame_timeout_ms`.
    Timeout,
    /// 20: a QUERY names a service whose records the peer's uid may not read.
    QueryWithoutAcl,
    /// Any other byte (from a newer logd).
    Other(u8),
}

impl Reason {
    /// The wire byte.
    pub const fn to_wire(self) -> u8 {
        match self {
            Reason::None => 0,
            Reason::Malformed => 1,
            Reason::UnsupportedVersion => 2,
            Reason::UnknownKind => 3,
            Reason::BadLevel => 4,
            Reason::BadUtf8 => 5,
            Reason::IdentityClaim => 6,
            Reason::EmptyKey => 7,
            Reason::FrameTooLarge => 8,
            Reason::TooManyRecords => 9,
            Reason::TooManyFields => 10,
            Reason::KeyTooLong => 11,
            Reason::ValueTooLong => 12,
            Reason::ScopeTooLong => 13,
            Reason::MessageTooLong => 14,
            Reason::RecordRate => 15,
            Reason::ByteRate => 16,
            Reason::TooManyConnections => 17,
            Reason::Storage => 18,
            Reason::Timeout => 19,
            Reason::QueryWithoutAcl => 20,
            Reason::Other(v) => v,
        }
    }

    /// The reason for a wire byte.
    pub const fn from_wire(v: u8) -> Reason {
        match v {
            0 => Reason::None,
            1 => Reason::Malformed,
            2 => Reason::UnsupportedVersion,
            3 => Reason::UnknownKind,
            4 => Reason::BadLevel,
            5 => Reason::BadUtf8,
            6 => Reason::IdentityClaim,
            7 => Reason::EmptyKey,
            8 => Reason::FrameTooLarge,
            9 => Reason::TooManyRecords,
            10 => Reason::TooManyFields,
            11 => Reason::KeyTooLong,
            12 => Reason::ValueTooLong,
            13 => Reason::ScopeTooLong,
            14 => Reason::MessageTooLong,
            15 => Reason::RecordRate,
            16 => Reason::ByteRate,
            17 => Reason::TooManyConnections,
            18 => Reason::Storage,
            19 => Reason::Timeout,
            20 => Reason::QueryWithoutAcl,
            v => Reason::Other(v),
        }
    }

    /// The snake-case name (`"identity_claim"`).
    pub fn name(self) -> String {
        let s = match self {
            Reason::None => "none",
            Reason::Malformed => "malformed",
            Reason::UnsupportedVersion => "unsupported_version",
            Reason::UnknownKind => "unknown_kind",
            Reason::BadLevel => "bad_level",
            Reason::BadUtf8 => "bad_utf8",
            Reason::IdentityClaim => "identity_claim",
            Reason::EmptyKey => "empty_key",
            Reason::FrameTooLarge => "frame_too_large",
            Reason::TooManyRecords => "too_many_records",
            Reason::TooManyFields => "too_many_fields",
            Reason::KeyTooLong => "key_too_long",
            Reason::ValueTooLong => "value_too_long",
            Reason::ScopeTooLong => "scope_too_long",
            Reason::MessageTooLong => "message_too_long",
            Reason::RecordRate => "record_rate",
            Reason::ByteRate => "byte_rate",
            Reason::TooManyConnections => "too_many_connections",
            Reason::Storage => "storage",
            Reason::Timeout => "timeout",
            Reason::QueryWithoutAcl => "query_without_acl",
            Reason::Other(v) => return format!("reason_{v}"),
        };
        s.to_owned()
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip() {
        for v in 0..=255u8 {
            assert_eq!(Reason::from_wire(v).to_wire(), v);
            if let Some(r) = Reject::from_wire(v) {
                assert_eq!(r.to_wire(), v);
            }
        }
        assert_eq!(Reject::from_wire(0), None);
        assert_eq!(Reason::from_wire(200).name(), "reason_200");
    }
}

/// The outcome of one record of an APPEND.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordStatus {
    /// Stored under this record id.
    Accepted(u64),
    /// Refused, with the class and the finer reason.
    Rejected(Reject, Reason),
}

impl RecordStatus {
    /// The record id if accepted.
    pub fn id(&self) -> Option<u64> {
        match *self {
            RecordStatus::Accepted(id) => Some(id),
            RecordStatus::Rejected(..) => None,
        }
    }

    /// The reject class if refused.
    pub fn reject(&self) -> Option<Reject> {
        match *self {
            RecordStatus::Accepted(_) => None,
            RecordStatus::Rejected(r, _) => Some(r),
        }
    }
}

/// Per-record outcome of an APPEND, in the order the records were given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendReport {
    /// One entry per record sent.
    pub statuses: Vec<RecordStatus>,
}

impl AppendReport {
    /// How many records were stored.
    pub fn accepted(&self) -> usize {
        self.statuses.iter().filter(|s| s.id().is_some()).count()
    }

    /// How many records were refused.
    pub fn rejected(&self) -> usize {
        self.statuses.len() - self.accepted()
    }

    /// How many records were refused with this class.
    pub fn rejected_as(&self, class: Reject) -> usize {
        self.statuses
            .iter()
            .filter(|s| s.reject() == Some(class))
            .count()
    }

    /// Whether every record was stored.
    pub fn all_accepted(&self) -> bool {
        self.rejected() == 0
    }

    /// The ids of the stored records, in order.
    pub fn ids(&self) -> Vec<u64> {
        self.statuses.iter().filter_map(RecordStatus::id).collect()
    }
}
