//! Records: what a client sends ([`Record`]) and what logd keeps ([`StoredRecord`]).

use core::fmt;

/// Severity of a record. On the wire a `u8`: 0 trace, 1 debug, 2 info, 3 warn, 4 error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Wire value 0.
    Trace,
    /// Wire value 1.
    Debug,
    /// Wire value 2.
    Info,
    /// Wire value 3.
    Warn,
    /// Wire value 4.
    Error,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 5] = [
        Level::Trace,
        Level::Debug,
        Level::Info,
        Level::Warn,
        Level::Error,
    ];

    /// The wire value.
    pub const fn to_wire(self) -> u8 {
        self as u8
    }

    /// The level for a wire value, `None` for anything above 4.
    pub const fn from_wire(v: u8) -> Option<Level> {
        match v {
            0 => Some(Level::Trace),
            1 => Some(Level::Debug),
            2 => Some(Level::Info),
            3 => Some(Level::Warn),
            4 => Some(Level::Error),
            _ => None,
        }
    }

    /// The lower-case name (`"info"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing a [`Level`] from text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseLevelError(pub String);

impl fmt::Display for ParseLevelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown level {:?}: expected one of trace, debug, info, warn, error (or 0-4)",
            self.0
        )
    }
}

impl core::error::Error for ParseLevelError {}

impl core::str::FromStr for Level {
    type Err = ParseLevelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "trace" | "0" => Ok(Level::Trace),
            "debug" | "1" => Ok(Level::Debug),
            "info" | "2" => Ok(Level::Info),
            "warn" | "warning" | "3" => Ok(Level::Warn),
            "error" | "err" | "4" => Ok(Level::Error),
            _ => Err(ParseLevelError(s.to_owned())),
        }
    }
}

/// A record as a client sends it: a level, a scope, a message and key/value fields.
///
/// It carries no identity: logd stamps who sent it (from the kernel), when it arrived and
/// its id. A field whose key claims an identity (see [`is_identity_key`]) gets the whole
/// record rejected as `invalid_args`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Severity.
    pub level: Level,
    /// Where in the sender it comes from, e.g. `"metrics.export"`.
    pub scope: String,
    /// Human-readable text.
    pub message: String,
    /// Structured key/value pairs, in the sender's order.
    pub fields: Vec<(String, String)>,
}

impl Record {
    /// A record with no fields.
    pub fn new(level: Level, scope: impl Into<String>, message: impl Into<String>) -> Record {
        Record {
            level,
            scope: scope.into(),
            message: message.into(),
            fields: Vec::new(),
        }
    }

    /// Adds one field (builder style).
    #[must_use]
    pub fn field(mut self, key: impl Into<String>, value: impl Into<String>) -> Record {
        self.fields.push((key.into(), value.into()));
        self
    }

    /// The value of the first field named `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Who sent a record, as the kernel reported it (SO_PEERCRED) and policy named it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Service name from policy; `uid:<uid>` for a uid the policy does not name.
    pub service: String,
    /// The sending process id at connect time.
    pub pid: u32,
    /// The sending user id.
    pub uid: u32,
    /// The sending group id.
    pub gid: u32,
}

/// A record as logd keeps and returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Record id: assigned by logd, strictly increasing, never 0.
    pub id: u64,
    /// Receive time, nanoseconds since the Unix epoch (logd's clock).
    pub received_ns: u64,
    /// The sender, as the kernel saw it.
    pub sender: Identity,
    /// What the sender sent.
    pub record: Record,
}

impl StoredRecord {
    /// Bytes this record is charged against journal budgets (its encoded size).
    pub fn cost(&self) -> usize {
        crate::frame::stored_record_len(self)
    }
}

/// Identity-claiming keys that are rejected outright (compared after normalising: ASCII
/// lower case, `-` and `.` read as `_`).
pub const IDENTITY_KEYS: &[&str] = &[
    "service",
    "service_id",
    "service_name",
    "sender",
    "pid",
    "uid",
    "gid",
    "identity",
    "peer_pid",
    "peer_uid",
    "peer_gid",
];

/// Identity-claiming key prefixes (after the same normalising). A leading `_` is the
/// journald convention for fields only the log daemon may set.
pub const IDENTITY_PREFIXES: &[&str] = &["sender_", "service_", "logd_", "_"];

/// Whether a field key claims an identity that only logd may state.
///
/// ```
/// assert!(logd::is_identity_key("service"));
/// assert!(logd::is_identity_key("Sender-Service-Id"));
/// assert!(logd::is_identity_key("_PID"));
/// assert!(!logd::is_identity_key("subject"));
/// ```
pub fn is_identity_key(key: &str) -> bool {
    key_in_lists(key, IDENTITY_KEYS, IDENTITY_PREFIXES)
}

/// Whether `key`, compared in ASCII lower case with `-` and `.` read as `_`, is one of
/// `keys` or starts with one of `prefixes`: the matching rule of [`is_identity_key`],
/// for callers that guard their own lists of identity keys (metricsd's label rules).
pub fn key_in_lists(key: &str, keys: &[&str], prefixes: &[&str]) -> bool {
    // Byte by byte, without building the normalised key: the bytes of a non-ASCII
    // character are left as they are, as their character would be.
    let norm = |b: u8| match b {
        b'-' | b'.' => b'_',
        b => b.to_ascii_lowercase(),
    };
    let starts = |p: &str| {
        key.len() >= p.len() && key.bytes().zip(p.bytes()).all(|(k, want)| norm(k) == want)
    };
    keys.iter().any(|k| k.len() == key.len() && starts(k)) || prefixes.iter().any(|p| starts(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_round_trips_wire_and_text() {
        for l in Level::ALL {
            assert_eq!(Level::from_wire(l.to_wire()), Some(l));
            assert_eq!(l.as_str().parse::<Level>(), Ok(l));
        }
        assert_eq!(Level::from_wire(5), None);
        let err = "loud".parse::<Level>().unwrap_err();
        assert!(err.to_string().contains("loud"));
    }

    #[test]
    fn identity_keys_are_recognised_after_normalising() {
        for k in [
            "service",
            "SERVICE",
            "service_id",
            "service.id",
            "sender_service_id",
            "sender-service-id",
            "_SYSTEMD_UNIT",
            "peer_uid",
            "logd_sender",
            "pid",
        ] {
            assert!(is_identity_key(k), "{k}");
        }
        for k in [
            "subject",
            "name",
            "kind",
            "value",
            "unit",
            "peer",
            "services_total",
        ] {
            assert!(!is_identity_key(k), "{k}");
        }
    }
}
