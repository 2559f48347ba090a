//! Configuration: every bound with its default, loaded from TOML.
//!
//! Every field has a default, so an empty file (or no file) is a working config. Unknown
//! keys are refused, naming the key.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::access::{AccessConfig, IdSpec};
use crate::policy::ServiceRule;

/// The whole configuration of one logd.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where to listen. Default: `$XDG_RUNTIME_DIR/logd.sock`, else `/run/logd.sock`.
    pub socket: PathBuf,
    /// Permission bits of the socket file (default `0o666`: any local process may log,
    /// and who it is comes from the kernel; reading is limited by `[access]`, not by the
    /// mode). `0o660` with `socket_group` limits logging to one group.
    pub socket_mode: u32,
    /// Owner of the socket file (a uid or user name; default: the user logd binds as).
    pub socket_owner: Option<IdSpec>,
    /// Group of the socket file (a gid or group name; default: logd's group).
    pub socket_group: Option<IdSpec>,
    /// When started as root: the user to switch to once the socket is bound and the
    /// journal opened (a uid or user name; default: stay as started).
    pub user: Option<IdSpec>,
    /// The group to switch to with `user` (default: the user's primary group).
    pub group: Option<IdSpec>,
    /// Who reads every sender's records.
    pub access: AccessConfig,
    /// On-disk journal directory; `None` (default) keeps the journal in memory only.
    pub journal_dir: Option<PathBuf>,
    /// Per-frame and per-connection bounds.
    pub limits: Limits,
    /// Per-sender token buckets.
    pub quota: QuotaConfig,
    /// Journal sizes.
    pub journal: JournalConfig,
    /// `[[service]]` entries: uid to service-name policy.
    #[serde(rename = "service")]
    pub services: Vec<ServiceRule>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            socket: default_socket_path(),
            socket_mode: 0o666,
            socket_owner: None,
            socket_group: None,
            user: None,
            group: None,
            access: AccessConfig::default(),
            journal_dir: None,
            limits: Limits::default(),
            quota: QuotaConfig::default(),
            journal: JournalConfig::default(),
            services: Vec::new(),
        }
    }
}

/// `$XDG_RUNTIME_DIR/logd.sock` when that variable is set and non-empty, else
/// `/run/logd.sock`.
pub fn default_socket_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => Path::new(&dir).join("logd.sock"),
        _ => PathBuf::from("/run/logd.sock"),
    }
}

/// Bounds on what one client can push in one frame and one connection.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frame, header included, in either direction (default 1 MiB). A larger
    /// request is answered `over_limit` and the connection closed.
    pub max_frame_bytes: u32,
    /// Most records in one APPEND frame (default 4096); more: the frame is `over_limit`.
    pub max_records_per_frame: u32,
    /// Most fields per record (default 32), and field matches per QUERY.
    pub max_fields: u32,
    /// Longest field key in bytes (default 64).
    pub max_key_bytes: u32,
    /// Longest field value in bytes (default 4096).
    pub max_value_bytes: u32,
    /// Longest scope in bytes (default 128).
    pub max_scope_bytes: u32,
    /// Longest message in bytes (default 16384).
    pub max_message_bytes: u32,
    /// Most clients connected at once (default 64); one more is answered `over_limit`
    /// and closed.
    pub max_connections: u32,
    /// Most senders with their own counters (default 256, at least `max_connections`,
    /// at most 4096);
    /// beyond it, disconnected senders' counters fold into the totals.
    pub max_senders: u32,
    /// A frame, once begun, must arrive completely within this (default 10000 ms).
    pub frame_timeout_ms: u64,
    /// A connection idle between frames this long is closed (default 600000 ms).
    pub idle_timeout_ms: u64,
    /// A reply that cannot be written within this closes the connection (default 10000 ms).
    pub write_timeout_ms: u64,
    /// Most records in one QUERY page (default 1000).
    pub max_query_limit: u32,
    /// Most records examined by one QUERY page (default 100000), so a selective query
    /// cannot hold the journal lock for long; the page then says `more`.
    pub max_query_scan: u32,
    /// Longest long-poll wait of a QUERY (default 30000 ms).
    pub max_wait_ms: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_frame_bytes: 1 << 20,
            max_records_per_frame: 4096,
            max_fields: 32,
            max_key_bytes: 64,
            max_value_bytes: 4096,
            max_scope_bytes: 128,
            max_message_bytes: 16384,
            max_connections: 64,
            max_senders: 256,
            frame_timeout_ms: 10_000,
            idle_timeout_ms: 600_000,
            write_timeout_ms: 10_000,
            max_query_limit: 1000,
            max_query_scan: 100_000,
            max_wait_ms: 30_000,
        }
    }
}

/// What a per-sender budget is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuotaKey {
    /// One budget per sending process (uid + pid from SO_PEERCRED). Default: two
    /// processes of one service cannot starve each other.
    #[default]
    Process,
    /// One budget per service name (all processes the policy maps to it share it).
    Service,
}

/// Per-sender token buckets: a record is stored only if both buckets hold enough.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Budget key (default `"process"`).
    pub key: QuotaKey,
    /// Sustained records per second per sender (default 20000).
    pub records_per_sec: u64,
    /// Record bucket size (default 40000).
    pub records_burst: u64,
    /// Sustained bytes per second per sender (default 16 MiB), counted as encoded records.
    pub bytes_per_sec: u64,
    /// Byte bucket size (default 32 MiB).
    pub bytes_burst: u64,
}

impl Default for QuotaConfig {
    fn default() -> QuotaConfig {
        QuotaConfig {
            key: QuotaKey::Process,
            records_per_sec: 20_000,
            records_burst: 40_000,
            bytes_per_sec: 16 << 20,
            bytes_burst: 32 << 20,
        }
    }
}

/// Journal sizes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Most records held in memory (default 262144).
    pub max_records: u64,
    /// Most bytes held in memory, counted as encoded records (default 64 MiB).
    pub max_bytes: u64,
    /// A segment file is rotated once it reaches this size (default 8 MiB).
    pub segment_bytes: u64,
    /// Oldest segments are retired (their still-held records copied forward) once all
    /// segments exceed this (default 512 MiB; at least `2 * max_bytes + 2 * segment_bytes`).
    pub disk_max_bytes: u64,
    /// Acknowledge an APPEND only once an `fdatasync` of the segment covers its records,
    /// shared by the APPENDs written meanwhile (group commit; default false: a crash of
    /// logd loses nothing acknowledged, a crash of the machine can lose what the kernel
    /// had not written back).
    pub fsync: bool,
}

impl Default for JournalConfig {
    fn default() -> JournalConfig {
        JournalConfig {
            max_records: 262_144,
            max_bytes: 64 << 20,
            segment_bytes: 8 << 20,
            disk_max_bytes: 512 << 20,
            fsync: false,
        }
    }
}

/// Why a config could not be loaded.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (the message names the key).
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is out of its range.
    Invalid {
        /// The key, e.g. `limits.max_frame_bytes`.
        key: &'static str,
        /// What is expected.
        expected: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "cannot read config {}: {source}", path.display())
            }
            ConfigError::Parse { path, message } => {
                write!(f, "invalid config {}: {message}", path.display())
            }
            ConfigError::Invalid { key, expected } => {
                write!(f, "invalid config value `{key}`: expected {expected}")
            }
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every range; `bind` calls it too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let q = &self.quota;
        let j = &self.journal;
        let positive: [(&'static str, u64); 16] = [
            (
                "limits.max_records_per_frame",
                l.max_records_per_frame.into(),
            ),
            ("limits.max_fields", l.max_fields.into()),
            ("limits.max_key_bytes", l.max_key_bytes.into()),
            ("limits.max_value_bytes", l.max_value_bytes.into()),
            ("limits.max_scope_bytes", l.max_scope_bytes.into()),
            ("limits.max_message_bytes", l.max_message_bytes.into()),
            ("limits.max_connections", l.max_connections.into()),
            ("limits.frame_timeout_ms", l.frame_timeout_ms),
            ("limits.idle_timeout_ms", l.idle_timeout_ms),
            ("limits.write_timeout_ms", l.write_timeout_ms),
            ("limits.max_query_limit", l.max_query_limit.into()),
            ("limits.max_query_scan", l.max_query_scan.into()),
            ("quota.records_per_sec", q.records_per_sec),
            ("quota.bytes_per_sec", q.bytes_per_sec),
            ("journal.max_records", j.max_records),
            ("journal.segment_bytes", j.segment_bytes),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    expected: "a number greater than 0".into(),
                });
            }
        }
        if !(256..=(64 << 20)).contains(&l.max_frame_bytes) {
            return Err(ConfigError::Invalid {
                key: "limits.max_frame_bytes",
                expected: "256 ..= 67108864".into(),
            });
        }
        if l.max_senders > 4096 {
            return Err(ConfigError::Invalid {
                key: "limits.max_senders",
                expected: "at most 4096 (the STATS reply lists every sender)".into(),
            });
        }
        if l.max_senders < l.max_connections {
            return Err(ConfigError::Invalid {
                key: "limits.max_senders",
                expected: format!("at least limits.max_connections ({})", l.max_connections),
            });
        }
        if q.records_burst < 1 {
            return Err(ConfigError::Invalid {
                key: "quota.records_burst",
                expected: "at least 1".into(),
            });
        }
        let largest = u64::from(l.max_frame_bytes);
        if q.bytes_burst < largest {
            return Err(ConfigError::Invalid {
                key: "quota.bytes_burst",
                expected: format!(
                    "at least limits.max_frame_bytes ({largest}), so a largest record can pass"
                ),
            });
        }
        if j.max_bytes < largest {
            return Err(ConfigError::Invalid {
                key: "journal.max_bytes",
                expected: format!("at least limits.max_frame_bytes ({largest})"),
            });
        }
        if j.segment_bytes < largest {
            return Err(ConfigError::Invalid {
                key: "journal.segment_bytes",
                expected: format!("at least limits.max_frame_bytes ({largest})"),
            });
        }
        let need = j
            .max_bytes
            .saturating_mul(2)
            .saturating_add(j.segment_bytes.saturating_mul(2));
        if self.journal_dir.is_some() && j.disk_max_bytes < need {
            return Err(ConfigError::Invalid {
                key: "journal.disk_max_bytes",
                expected: format!("at least 2 * max_bytes + 2 * segment_bytes ({need})"),
            });
        }
        crate::policy::Policy::new(&self.services)?;
        crate::access::Access::new(&self.access)?;
        self.socket_access()?;
        self.run_as()?;
        Ok(())
    }

    /// The socket file's resolved owner, group and mode.
    pub fn socket_access(&self) -> Result<crate::privilege::SocketAccess, ConfigError> {
        crate::privilege::SocketAccess::new(
            self.socket_mode,
            self.socket_owner.as_ref(),
            self.socket_group.as_ref(),
        )
    }

    /// The resolved `user`/`group` to drop to, if any.
    pub fn run_as(&self) -> Result<Option<crate::privilege::RunAs>, ConfigError> {
        if self.user.is_none() && self.group.is_some() {
            return Err(ConfigError::Invalid {
                key: "group",
                expected: "`user` too (group is the group to switch to with user)".into(),
            });
        }
        self.user
            .as_ref()
            .map(|u| crate::privilege::RunAs::new(u, self.group.as_ref()))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_is_the_default() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[limits]\nmax_frame = 3\n").unwrap_err();
        assert!(e.to_string().contains("max_frame"), "{e}");
    }

    #[test]
    fn out_of_range_is_named() {
        let e = Config::parse("[limits]\nmax_fields = 0\n").unwrap_err();
        assert!(e.to_string().contains("limits.max_fields"), "{e}");
        let e = Config::parse("[limits]\nmax_connections = 10\nmax_senders = 5\n").unwrap_err();
        assert!(e.to_string().contains("limits.max_senders"), "{e}");
    }

    #[test]
    fn the_deployed_config_has_only_known_keys() {
        // Names are looked up when validated, on the machine it is deployed to; here only
        // the keys and their types are checked.
        let c: Config = toml::from_str(include_str!("../../deploy/logd.toml")).unwrap();
        assert_eq!(c.services[0].uid, IdSpec::Name("metricsd".into()));
        assert_eq!(
            c.access.reader_groups,
            [IdSpec::Name("telemetry-readers".into())]
        );
    }

    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            r#"
socket = "/tmp/x.sock"
journal_dir = "/tmp/j"
socket_mode = 0o660
socket_group = 0
[limits]
max_fields = 8
[quota]
key = "service"
records_per_sec = 10
[journal]
fsync = true
[access]
readers = [1000, "root"]
reader_groups = [4]
[[service]]
name = "metricsd"
uid = 998
"#,
        )
        .unwrap();
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(
            c.access.readers,
            [IdSpec::Id(1000), IdSpec::Name("root".into())]
        );
        assert_eq!(c.limits.max_fields, 8);
        assert_eq!(c.quota.key, QuotaKey::Service);
        assert_eq!(c.services.len(), 1);
        assert!(c.journal.fsync);
    }
}
