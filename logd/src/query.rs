//! QUERY: the filter a client asks with and the page logd answers with.

use crate::record::{Level, StoredRecord};

/// A QUERY: every set filter must match. Results come in record-id order, starting after
/// `cursor`.
///
/// ```
/// use logd::{Level, Query};
/// let q = Query::new()
///     .service("metricsd")
///     .scope("metrics.*")
///     .min_level(Level::Info)
///     .field("name", "requests_total")
///     .limit(100);
/// assert_eq!(q.limit, 100);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Only records from this service (exact match on the stamped service name).
    pub service: Option<String>,
    /// Only this scope; a trailing `*` makes it a prefix match (`"metrics.*"`).
    pub scope: Option<String>,
    /// Only records at this level or above.
    pub min_level: Option<Level>,
    /// Only records received at or after this time (ns since the Unix epoch).
    pub since_ns: Option<u64>,
    /// Only records received before this time (ns since the Unix epoch).
    pub until_ns: Option<u64>,
    /// Only records having every one of these key/value fields.
    pub fields: Vec<(String, String)>,
    /// Start after this record id (0: from the oldest record held).
    pub cursor: u64,
    /// At most this many records (0: the server's `max_query_limit`; larger values are
    /// clamped to it).
    pub limit: u32,
    /// When nothing matches yet, wait up to this long for new records before answering
    /// (long poll for `--follow`; clamped to the server's `max_wait_ms`).
    pub wait_ms: u32,
}

impl Query {
    /// A query matching everything.
    pub fn new() -> Query {
        Query::default()
    }

    /// Filter by service.
    #[must_use]
    pub fn service(mut self, s: impl Into<String>) -> Query {
        self.service = Some(s.into());
        self
    }

    /// Filter by scope (trailing `*` for a prefix).
    #[must_use]
    pub fn scope(mut self, s: impl Into<String>) -> Query {
        self.scope = Some(s.into());
        self
    }

    /// Filter by minimum level.
    #[must_use]
    pub fn min_level(mut self, l: Level) -> Query {
        self.min_level = Some(l);
        self
    }

    /// Received at or after (ns since the Unix epoch).
    #[must_use]
    pub fn since_ns(mut self, t: u64) -> Query {
        self.since_ns = Some(t);
        self
    }

    /// Received before (ns since the Unix epoch).
    #[must_use]
    pub fn until_ns(mut self, t: u64) -> Query {
        self.until_ns = Some(t);
        self
    }

    /// Require a field with this exact key and value.
    #[must_use]
    pub fn field(mut self, k: impl Into<String>, v: impl Into<String>) -> Query {
        self.fields.push((k.into(), v.into()));
        self
    }

    /// Resume after this record id (a page's `next_cursor`).
    #[must_use]
    pub fn cursor(mut self, c: u64) -> Query {
        self.cursor = c;
        self
    }

    /// Page size.
    #[must_use]
    pub fn limit(mut self, n: u32) -> Query {
        self.limit = n;
        self
    }

    /// Long-poll time when nothing matches yet.
    #[must_use]
    pub fn wait_ms(mut self, ms: u32) -> Query {
        self.wait_ms = ms;
        self
    }

    /// Whether a stored record passes every filter (the cursor is not checked here).
    pub fn matches(&self, r: &StoredRecord) -> bool {
        if let Some(s) = &self.service {
            if r.sender.service != *s {
                return false;
            }
        }
        if let Some(scope) = &self.scope {
            let ok = match scope.strip_suffix('*') {
                Some(prefix) => r.record.scope.starts_with(prefix),
                None => r.record.scope == *scope,
            };
            if !ok {
                return false;
            }
        }
        if let Some(l) = self.min_level {
            if r.record.level < l {
                return false;
            }
        }
        if let Some(t) = self.since_ns {
            if r.received_ns < t {
                return false;
            }
        }
        if let Some(t) = self.until_ns {
            if r.received_ns >= t {
                return false;
            }
        }
        self.fields
            .iter()
            .all(|(k, v)| r.record.fields.iter().any(|(rk, rv)| rk == k && rv == v))
    }
}

/// One page of QUERY results.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryPage {
    /// Matching records, in id order.
    pub records: Vec<StoredRecord>,
    /// Pass this as the next query's `cursor` to continue (the last id examined; equal to
    /// the request's cursor when nothing newer was examined).
    pub next_cursor: u64,
    /// Whether more records may match after `next_cursor` right now (the page hit its
    /// limit, its byte budget or the scan bound). `false` means "caught up".
    pub more: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Identity, Record};

    fn rec(service: &str, scope: &str, level: Level, t: u64) -> StoredRecord {
        StoredRecord {
            id: 1,
            received_ns: t,
            sender: Identity {
                service: service.into(),
                pid: 1,
                uid: 2,
                gid: 3,
            },
            record: Record::new(level, scope, "m").field("k", "v"),
        }
    }

    #[test]
    fn filters_combine() {
        let r = rec("a", "metrics.export", Level::Warn, 100);
        assert!(Query::new().matches(&r));
        assert!(Query::new().service("a").matches(&r));
        assert!(!Query::new().service("b").matches(&r));
        assert!(Query::new().scope("metrics.*").matches(&r));
        assert!(!Query::new().scope("metrics").matches(&r));
        assert!(Query::new().min_level(Level::Warn).matches(&r));
        assert!(!Query::new().min_level(Level::Error).matches(&r));
        assert!(Query::new().since_ns(100).until_ns(101).matches(&r));
        assert!(!Query::new().until_ns(100).matches(&r));
        assert!(Query::new().field("k", "v").matches(&r));
        assert!(!Query::new().field("k", "w").matches(&r));
    }
}
