//! Redaction of sensitive keys, and renaming of keys that claim an identity.
//!
//! - A label or span attribute whose key contains one of the configured patterns
//!   (ASCII case-insensitive; default: secret, token, password, passwd, credential,
//!   api_key, apikey, auth, cookie, session) keeps its key and has its value replaced by
//!   [`REDACTED`] before anything is stored, so no original value is ever exported.
//! - A label key that claims the producer's identity (`service`, `service_id`,
//!   `sender_service_id`: every key logd refuses, [`logd::is_identity_key`], and
//!   metricsd's own [`IDENTITY_KEYS`] and [`IDENTITY_PREFIXES`], compared in lower case
//!   with `-` and `.` read as `_`) is
//!   renamed `exported_<key>` (Prometheus' convention for a target label clash): the
//!   producer's word never competes with the kernel-derived `producer_service`, and its
//!   data is kept. Each rename is counted.

/// The value a redacted label or attribute is exported with.
pub const REDACTED: &str = "[redacted]";

/// Keys that claim an identity only metricsd may state, beyond those logd refuses
/// ([`logd::record::IDENTITY_KEYS`]).
pub const IDENTITY_KEYS: &[&str] = &["peer", "unit"];

/// Key prefixes that claim an identity, beyond logd's ([`logd::record::IDENTITY_PREFIXES`]).
pub const IDENTITY_PREFIXES: &[&str] = &["peer_", "producer_"];

/// The redaction policy.
#[derive(Clone, Debug)]
pub struct Redactor {
    patterns: Vec<String>,
}

impl Redactor {
    /// A policy redacting keys that contain any of `patterns` (case-insensitive).
    pub fn new(patterns: &[String]) -> Self {
        Self {
            patterns: patterns.iter().map(|p| p.to_ascii_lowercase()).collect(),
        }
    }

    /// Whether values under `key` must be redacted.
    pub fn is_sensitive(&self, key: &str) -> bool {
        let lower = key.to_ascii_lowercase();
        self.patterns.iter().any(|p| lower.contains(p.as_str()))
    }
}

/// Whether a label key claims an identity (see the module docs): every key logd would
/// refuse in an exported record, so a renamed label never costs an export, and
/// metricsd's own.
pub fn is_identity_key(key: &str) -> bool {
    logd::is_identity_key(key) || logd::key_in_lists(key, IDENTITY_KEYS, IDENTITY_PREFIXES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedactionConfig;

    #[test]
    fn default_patterns_match_case_insensitively() {
        let r = Redactor::new(&RedactionConfig::default().patterns);
        for k in [
            "password",
            "DB_PASSWORD",
            "x_api_key",
            "Auth",
            "session_id",
            "apikey",
        ] {
            assert!(r.is_sensitive(k), "{k}");
        }
        for k in ["route", "status", "method", "user"] {
            assert!(!r.is_sensitive(k), "{k}");
        }
    }

    #[test]
    fn identity_keys_are_recognised() {
        for k in [
            "service",
            "Service",
            "service_id",
            "sender_service_id",
            "service.name",
            "_pid",
            "peer",
            "Peer-Pid",
            "producer_service",
            "unit",
        ] {
            assert!(is_identity_key(k), "{k}");
        }
        for k in ["route", "services", "status"] {
            assert!(!is_identity_key(k), "{k}");
        }
    }
}
