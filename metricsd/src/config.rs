//! Configuration: one TOML file, every limit with a documented default.
//!
//! Every field has a default, so metricsd runs with no file at all. Unknown keys are
//! refused (`deny_unknown_fields`), and [`Config::validate`] refuses values out of range
//! with an error naming the key and the expected form. The full list, with defaults, is
//! in `metricsd/README.md`; the doc comment of each field below says the same.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use logd::IdSpec;
use serde::Deserialize;
use telemetry_abi::{Geometry, MAX_CAPACITY, MIN_CAPACITY};

/// Most explicit bucket bounds in a histogram layout: with the `+Inf` bucket that makes
/// 160 buckets, the OpenTelemetry limit for a histogram.
pub const MAX_HISTOGRAM_BOUNDS: usize = 159;

/// The largest explicit bucket bound, 2^53: Prometheus' `le` and OTLP's
/// `explicit_bounds` are `f64`, exact for every integer up to it, so no two bounds can
/// be exported as one.
pub const MAX_HISTOGRAM_BOUND: u64 = 1 << 53;

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The control socket. Default: `$NEXUS_METRICSD_SOCKET`, else
    /// `$XDG_RUNTIME_DIR/metricsd.sock`, else `/run/metricsd.sock`.
    pub socket: PathBuf,
    /// logd's socket. Default: `$LOGD_SOCKET`, else `$XDG_RUNTIME_DIR/logd.sock`,
    /// else `/run/logd.sock`.
    pub logd_socket: PathBuf,
    /// Permission bits of the control socket file (default `0o666`: by default any local
    /// uid may ask for rings, bounded per uid and in total; with `[grants]` limited to a
    /// group, `0o660` and `socket_group` keep the others from connecting at all).
    pub socket_mode: u32,
    /// Owner of the control socket file (a uid or user name; default: metricsd's user).
    pub socket_owner: Option<IdSpec>,
    /// Group of the control socket file (a gid or group name; default: metricsd's group).
    pub socket_group: Option<IdSpec>,
    /// When started as root: the user to switch to once the control socket is bound
    /// (a uid or user name; default: stay as started).
    pub user: Option<IdSpec>,
    /// The group to switch to with `user` (default: the user's primary group).
    pub group: Option<IdSpec>,
    /// Rings and the grant protocol.
    pub rings: RingsConfig,
    /// Who may ask for rings.
    pub grants: GrantsConfig,
    /// Network listeners (the Prometheus and OTLP endpoints).
    pub network: NetworkConfig,
    /// The drain loop.
    pub drain: DrainConfig,
    /// Series caps.
    pub series: SeriesConfig,
    /// Spans.
    pub spans: SpansConfig,
    /// Export to logd.
    pub export: ExportConfig,
    /// Export to an OpenTelemetry collector over OTLP/HTTP (off unless `endpoint`).
    pub otlp: OtlpConfig,
    /// Redaction of sensitive label and attribute keys.
    pub redaction: RedactionConfig,
    /// The Prometheus scrape endpoint (off unless `listen` is set).
    pub prometheus: PrometheusConfig,
    /// Histogram bucket layouts by metric (or span) name: strictly increasing `u64`
    /// upper bounds (inclusive) up to [`MAX_HISTOGRAM_BOUND`], at most
    /// [`MAX_HISTOGRAM_BOUNDS`] of them; a `+Inf` bucket is
    /// always added. Names not listed use the exponential histogram with an automatic
    /// scale.
    pub histograms: BTreeMap<String, Vec<u64>>,
    /// Identity rules, first match wins (see [`ServiceRule`]).
    pub services: Vec<ServiceRule>,
    /// Rollup history on disk (off without `retention.dir`).
    pub retention: crate::retention::RetentionConfig,
}

/// `[rings]`: ring geometry and the grant protocol's limits.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RingsConfig {
    /// Records in a ring when the request asks for 0 (default 65536; a power of two).
    pub capacity: u32,
    /// Largest ring granted; larger requests get this many (default 1048576).
    pub max_capacity: u32,
    /// Rings one service may hold at once (default 64); past it: `OVER_LIMIT`.
    pub per_service: u32,
    /// Rings held by all services at once (default 1024); past it: `OVER_LIMIT`.
    pub max_total: u32,
    /// Control connections open at once (default 256); more are closed at accept.
    pub max_connections: u32,
    /// Distinct services known (default 1024); a new one past it: `OVER_LIMIT`.
    pub max_services: u32,
    /// Sustained grant requests per second per connection (default 10); past the
    /// burst: `RATE_LIMITED`.
    pub grant_rate_per_sec: u32,
    /// Grant requests a connection may make at once before the rate applies
    /// (default 64).
    pub grant_burst: u32,
    /// Most keys registered in one ring (default 4096).
    pub max_keys_per_ring: u32,
    /// Bytes of shared memory granted as rings at once, all uids together (default
    /// 1 GiB); a ring past it: `OVER_LIMIT`.
    pub max_total_bytes: u64,
    /// Bytes of shared memory granted as rings at once to the processes of one uid
    /// (default 256 MiB); a ring past it: `OVER_LIMIT`.
    pub max_bytes_per_uid: u64,
}

/// `[grants]`: who may ask for rings. With every list empty (the default) any local uid
/// may, within the `[rings]` bounds; otherwise a peer must match at least one entry of
/// one list, and every request of any other peer is refused `DENIED` and counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrantsConfig {
    /// Users (uids or names) whose processes may ask.
    pub uids: Vec<IdSpec>,
    /// Groups (gids or names): a peer whose gid (`SO_PEERCRED`) is listed may ask.
    pub gids: Vec<IdSpec>,
    /// Services (as the identity policy names the peer) that may ask.
    pub services: Vec<String>,
}

/// `[network]`: the rule every network listener follows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Allow a listener on an address other than loopback (default false: a
    /// non-loopback listen address is refused, naming the key). `--allow-non-loopback`
    /// sets it too.
    pub allow_non_loopback: bool,
}

/// `[drain]`: the drain loop.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// Records taken from one ring per pass (default 4096), so a flooding producer
    /// cannot starve the others.
    pub budget: u32,
    /// Shortest sleep after a pass that found every ring empty, in microseconds
    /// (default 100); doubled after each further empty pass.
    pub idle_min_us: u32,
    /// Longest such sleep, in microseconds (default 1000).
    pub idle_max_us: u32,
    /// After this long with every ring empty, in milliseconds (default 1000), the drain
    /// loop sleeps `deep_idle_ms` between passes instead.
    pub deep_idle_after_ms: u32,
    /// The sleep between passes once idle that long, in milliseconds (default 100, and
    /// never past the next export): an idle metricsd wakes about ten times a second, and
    /// a record written after a long silence is drained within this bound. A new ring,
    /// a snapshot or a shutdown still wakes it at once.
    pub deep_idle_ms: u32,
}

/// `[series]`: hard cardinality caps.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeriesConfig {
    /// Series in all (default 10000).
    pub max_total: u32,
    /// Series of one metric name of one service (default 1000).
    pub max_per_metric: u32,
    /// Series of one service (default 2000).
    pub max_per_service: u32,
    /// Overflow series (one per service and metric) in all (default 1000). Past it a
    /// new series is refused `over_limit` and its samples are counted, not summed.
    pub max_overflow: u32,
    /// A series no live ring has registered expires after this long without a sample,
    /// in milliseconds (default 300000, five minutes: Prometheus's own staleness
    /// window, so a scraper polling every minute still sees the final value several
    /// times before the series goes).
    pub idle_ttl_ms: u64,
    /// A series that a connected producer still has registered expires after this long
    /// without a sample, in milliseconds (default 3600000, one hour): long enough that
    /// a rarely recorded series of a live process stays, short enough that label values
    /// a long-running process stopped using give their cap slots back.
    pub idle_ttl_bound_ms: u64,
    /// Series slots looked at for expiry per export (default 4096): the sweep is
    /// incremental, so a store of N series is swept every N / 4096 exports.
    pub expiry_scan: u32,
}

/// `[spans]`: live-span bounds.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpansConfig {
    /// Spans open at once across all rings (default 10000); past it a start is
    /// refused `over_limit`.
    pub max_live: u32,
    /// A span open longer than this is expired and reported as such, in milliseconds
    /// (default 300000).
    pub ttl_ms: u64,
    /// Attributes kept per span (default 8, at most 8); more are refused `over_limit`.
    pub max_attrs: u32,
}

/// `[otlp]`: OTLP/HTTP protobuf export to an OpenTelemetry collector (see
/// `metricsd::otlp`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// The collector's base URL, `http://host:port` (`/v1/metrics` and `/v1/traces`
    /// are appended). Unset: no OTLP export.
    pub endpoint: Option<String>,
    /// `service.instance.id` of every resource (default: the host name).
    pub instance_id: Option<String>,
    /// Export intervals waiting for the exporter thread at most (default 4); past it
    /// an interval's points and spans are dropped and counted (`queue_full`).
    pub queue_batches: u32,
    /// Points or spans per request at most (default 8192).
    pub max_batch_points: u32,
    /// Bytes per request body at most (default 4194304, a collector's default receive
    /// limit).
    pub max_request_bytes: u32,
    /// Timeout of one request, in milliseconds (default 10000).
    pub timeout_ms: u64,
    /// First retry delay, in milliseconds (default 200); doubles per retry.
    pub retry_initial_ms: u64,
    /// Longest retry delay, in milliseconds (default 5000; a longer `Retry-After` is
    /// cut to it).
    pub retry_max_ms: u64,
    /// A request still failing this long after its first attempt is dropped and
    /// counted (`gave_up`), in milliseconds (default 60000).
    pub give_up_ms: u64,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            instance_id: None,
            queue_batches: 4,
            max_batch_points: 8192,
            max_request_bytes: 4 << 20,
            timeout_ms: 10_000,
            retry_initial_ms: 200,
            retry_max_ms: 5000,
            give_up_ms: 60_000,
        }
    }
}

/// `[export]`: the export to logd.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Milliseconds between exports (default 1000).
    pub interval_ms: u64,
    /// Reported spans (completed, orphaned, expired) exported per second at most
    /// (default 200000; a token bucket holding one second's worth). What the limit
    /// drops is counted (`metricsd.spans.dropped{reason="rate_limited"}`).
    pub spans_per_second: u32,
    /// Of those, span records appended to logd per second at most (default 1000; a
    /// token bucket holding one second's worth): logd is the bounded local record,
    /// an OTLP collector gets every exported span. Spans past it are counted
    /// (`metricsd.spans.not_logged`).
    pub logd_spans_per_second: u32,
    /// Records waiting for logd at most (default 100000); past it the oldest are
    /// dropped and counted.
    pub queue_records: u32,
    /// Records per APPEND (default 512).
    pub batch_records: u32,
    /// Milliseconds to wait before retrying after a failed APPEND (default 200).
    pub retry_ms: u64,
}

/// `[prometheus]`: the scrape endpoint, `GET /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    /// `ADDR:PORT` to serve `GET /metrics` on, e.g. `127.0.0.1:9464` (default: none, no
    /// endpoint). `--prometheus-listen` overrides it.
    pub listen: Option<String>,
    /// Scrapes served at once (default 4); a connection past it is answered 503 and
    /// closed.
    pub max_connections: u32,
    /// Largest request head accepted, in bytes (default 8192); past it: 431.
    pub max_request_bytes: u32,
    /// Largest response, in bytes (default 268435456 = 256 MiB); a larger exposition
    /// is answered 500 and counted as a failure.
    pub max_response_bytes: u64,
    /// Time a client has to send its request, and to take each write of the
    /// response, in milliseconds (default 10000); a slower or idle one is closed.
    pub timeout_ms: u64,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        Self {
            listen: None,
            max_connections: 4,
            max_request_bytes: 8192,
            max_response_bytes: 256 << 20,
            timeout_ms: 10_000,
        }
    }
}

impl PrometheusConfig {
    /// The address to listen on, if any.
    pub fn listen_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        match &self.listen {
            None => Ok(None),
            Some(text) => text.parse().map(Some).map_err(|_| {
                invalid(
                    "prometheus.listen",
                    format!("{text:?}"),
                    "an IP address and port, such as \"127.0.0.1:9464\" or \"[::1]:9464\"",
                )
            }),
        }
    }
}

/// `[redaction]`: sensitive keys.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedactionConfig {
    /// A label or attribute key containing one of these (ASCII case-insensitive) has
    /// its value replaced by `[redacted]` before anything is exported. Default:
    /// secret, token, password, passwd, credential, api_key, apikey, auth, cookie,
    /// session.
    pub patterns: Vec<String>,
}

/// `[[services]]`: one identity rule. A rule names the service of a producer whose
/// kernel-reported credentials match every matcher it sets (at least one); the first
/// matching rule wins. With no match the service is the executable's file name
/// (`/proc/<pid>/exe`), else `uid:<n>`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRule {
    /// The service name: 1 to 64 bytes of `[A-Za-z0-9_.:-]`.
    pub name: String,
    /// Match this user id.
    pub uid: Option<u32>,
    /// Match this process id.
    pub pid: Option<u32>,
    /// Match this executable path exactly (as `/proc/<pid>/exe` reads).
    pub exe: Option<PathBuf>,
}

/// Why a configuration was refused.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML did not parse or named an unknown key (the message names it).
    Parse(String),
    /// A value is out of range.
    Invalid {
        /// The key, as written in the file (`rings.capacity`).
        key: String,
        /// The value found.
        found: String,
        /// What is expected.
        expected: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, source } => {
                write!(f, "cannot read config {}: {source}", path.display())
            }
            Self::Parse(msg) => write!(f, "config: {msg}"),
            Self::Invalid {
                key,
                found,
                expected,
            } => write!(f, "config key `{key}` = {found}: expected {expected}"),
        }
    }
}

impl From<logd::config::ConfigError> for ConfigError {
    fn from(e: logd::config::ConfigError) -> Self {
        match e {
            logd::config::ConfigError::Invalid { key, expected } => Self::Invalid {
                key: key.to_owned(),
                found: "this value".to_owned(),
                expected,
            },
            other => Self::Parse(other.to_string()),
        }
    }
}

/// Bytes of shared memory one ring of `capacity` records takes (header and records).
pub fn ring_bytes(capacity: u32) -> u64 {
    Geometry::new(u64::from(capacity)).map_or(u64::MAX, |g| g.region_len() as u64)
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn env_socket(var: &str, file: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return Path::new(&dir).join(file);
    }
    Path::new("/run").join(file)
}

/// The control socket path when neither config nor flag names one.
pub fn default_socket_path() -> PathBuf {
    env_socket("NEXUS_METRICSD_SOCKET", "metricsd.sock")
}

/// logd's socket path when neither config nor flag names one.
pub fn default_logd_socket_path() -> PathBuf {
    env_socket("LOGD_SOCKET", "logd.sock")
}

/// The default redaction patterns.
pub const DEFAULT_REDACTION_PATTERNS: &[&str] = &[
    "secret",
    "token",
    "password",
    "passwd",
    "credential",
    "api_key",
    "apikey",
    "auth",
    "cookie",
    "session",
];

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: default_socket_path(),
            logd_socket: default_logd_socket_path(),
            socket_mode: 0o666,
            socket_owner: None,
            socket_group: None,
            user: None,
            group: None,
            rings: RingsConfig::default(),
            grants: GrantsConfig::default(),
            network: NetworkConfig::default(),
            drain: DrainConfig::default(),
            series: SeriesConfig::default(),
            spans: SpansConfig::default(),
            export: ExportConfig::default(),
            otlp: OtlpConfig::default(),
            redaction: RedactionConfig::default(),
            prometheus: PrometheusConfig::default(),
            histograms: BTreeMap::new(),
            services: Vec::new(),
            retention: crate::retention::RetentionConfig::default(),
        }
    }
}

impl Default for RingsConfig {
    fn default() -> Self {
        Self {
            capacity: 65536,
            max_capacity: 1 << 20,
            per_service: 64,
            max_total: 1024,
            max_connections: 256,
            max_services: 1024,
            grant_rate_per_sec: 10,
            grant_burst: 64,
            max_keys_per_ring: 4096,
            max_total_bytes: 1 << 30,
            max_bytes_per_uid: 256 << 20,
        }
    }
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            budget: 4096,
            idle_min_us: 100,
            idle_max_us: 1000,
            deep_idle_after_ms: 1000,
            deep_idle_ms: 100,
        }
    }
}

impl Default for SeriesConfig {
    fn default() -> Self {
        Self {
            max_total: 10_000,
            max_per_metric: 1000,
            max_per_service: 2000,
            max_overflow: 1000,
            idle_ttl_ms: 300_000,
            idle_ttl_bound_ms: 3_600_000,
            expiry_scan: 4096,
        }
    }
}

impl Default for SpansConfig {
    fn default() -> Self {
        Self {
            max_live: 10_000,
            ttl_ms: 300_000,
            max_attrs: 8,
        }
    }
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            interval_ms: 1000,
            spans_per_second: 200_000,
            logd_spans_per_second: 1000,
            queue_records: 100_000,
            batch_records: 512,
            retry_ms: 200,
        }
    }
}

impl Default for RedactionConfig {
    fn default() -> Self {
        Self {
            patterns: DEFAULT_REDACTION_PATTERNS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        }
    }
}

fn invalid(key: &str, found: impl fmt::Display, expected: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        found: found.to_string(),
        expected: expected.into(),
    }
}

fn in_range<T: PartialOrd + fmt::Display + Copy>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            value,
            format!("an integer from {min} to {max}"),
        ));
    }
    Ok(())
}

fn ring_capacity(key: &str, value: u32) -> Result<(), ConfigError> {
    if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&value) || !value.is_power_of_two() {
        return Err(invalid(
            key,
            value,
            format!("a power of two from {MIN_CAPACITY} to {MAX_CAPACITY} (records)"),
        ));
    }
    Ok(())
}

/// Whether `name` is a valid service name: 1 to 64 bytes of `[A-Za-z0-9_.:-]`.
pub fn valid_service_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

impl Config {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a file (unknown keys refused) without checking ranges, for a
    /// caller that applies command-line overrides first and then calls
    /// [`Config::validate`].
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Checks every value against its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = &self.rings;
        ring_capacity("rings.capacity", r.capacity)?;
        ring_capacity("rings.max_capacity", r.max_capacity)?;
        if r.capacity > r.max_capacity {
            return Err(invalid(
                "rings.capacity",
                r.capacity,
                format!("at most rings.max_capacity ({})", r.max_capacity),
            ));
        }
        in_range("rings.per_service", r.per_service, 1, 65536)?;
        in_range("rings.max_total", r.max_total, 1, 65536)?;
        in_range("rings.max_connections", r.max_connections, 1, 65536)?;
        in_range("rings.max_services", r.max_services, 1, 1 << 20)?;
        in_range(
            "rings.grant_rate_per_sec",
            r.grant_rate_per_sec,
            1,
            1_000_000,
        )?;
        in_range("rings.grant_burst", r.grant_burst, 1, 1_000_000)?;
        in_range("rings.max_keys_per_ring", r.max_keys_per_ring, 1, 1 << 20)?;
        let default_ring = ring_bytes(r.capacity);
        for (key, v) in [
            ("rings.max_total_bytes", r.max_total_bytes),
            ("rings.max_bytes_per_uid", r.max_bytes_per_uid),
        ] {
            if v < default_ring {
                return Err(invalid(
                    key,
                    v,
                    format!(
                        "at least the bytes of one ring of rings.capacity records ({default_ring})"
                    ),
                ));
            }
        }
        self.grant_policy()?;
        self.socket_access()?;
        self.run_as()?;

        self.retention
            .validate()
            .map_err(|(key, found, expected)| invalid(key, found, expected))?;

        let d = &self.drain;
        in_range("drain.budget", d.budget, 1, MAX_CAPACITY)?;
        in_range("drain.idle_min_us", d.idle_min_us, 1, 1_000_000)?;
        in_range("drain.idle_max_us", d.idle_max_us, d.idle_min_us, 1_000_000)?;
        in_range(
            "drain.deep_idle_after_ms",
            d.deep_idle_after_ms,
            1,
            3_600_000,
        )?;
        in_range("drain.deep_idle_ms", d.deep_idle_ms, 1, 10_000)?;

        let s = &self.series;
        in_range("series.max_total", s.max_total, 1, 10_000_000)?;
        in_range("series.max_per_metric", s.max_per_metric, 1, 10_000_000)?;
        in_range("series.max_per_service", s.max_per_service, 1, 10_000_000)?;
        in_range("series.max_overflow", s.max_overflow, 1, 10_000_000)?;
        in_range("series.idle_ttl_ms", s.idle_ttl_ms, 1, 365 * 86_400_000)?;
        in_range(
            "series.idle_ttl_bound_ms",
            s.idle_ttl_bound_ms,
            1,
            365 * 86_400_000,
        )?;
        in_range("series.expiry_scan", s.expiry_scan, 1, 10_000_000)?;

        let sp = &self.spans;
        in_range("spans.max_live", sp.max_live, 1, 10_000_000)?;
        in_range("spans.ttl_ms", sp.ttl_ms, 1, 86_400_000)?;
        in_range("spans.max_attrs", sp.max_attrs, 0, 8)?;

        let e = &self.export;
        in_range("export.interval_ms", e.interval_ms, 10, 3_600_000)?;
        in_range(
            "export.spans_per_second",
            e.spans_per_second,
            0,
            100_000_000,
        )?;
        in_range(
            "export.logd_spans_per_second",
            e.logd_spans_per_second,
            0,
            100_000_000,
        )?;
        in_range("export.queue_records", e.queue_records, 1, 100_000_000)?;
        in_range("export.batch_records", e.batch_records, 1, 4096)?;
        in_range("export.retry_ms", e.retry_ms, 1, 600_000)?;

        let o = &self.otlp;
        if let Some(url) = &o.endpoint {
            let rest = url.strip_prefix("http://").unwrap_or("");
            if rest.is_empty() || rest.starts_with('/') || rest.contains(['?', '#', ' ']) {
                return Err(invalid(
                    "otlp.endpoint",
                    url,
                    "an http:// URL with a host, e.g. http://127.0.0.1:4318 (https is not supported)",
                ));
            }
        }
        in_range("otlp.queue_batches", o.queue_batches, 1, 1024)?;
        in_range("otlp.max_batch_points", o.max_batch_points, 1, 1_000_000)?;
        in_range(
            "otlp.max_request_bytes",
            o.max_request_bytes,
            1024,
            64 << 20,
        )?;
        in_range("otlp.timeout_ms", o.timeout_ms, 1, 600_000)?;
        in_range("otlp.retry_initial_ms", o.retry_initial_ms, 1, 600_000)?;
        in_range(
            "otlp.retry_max_ms",
            o.retry_max_ms,
            o.retry_initial_ms,
            600_000,
        )?;
        in_range("otlp.give_up_ms", o.give_up_ms, 1, 86_400_000)?;

        let p = &self.prometheus;
        if let Some(addr) = p.listen_addr()? {
            crate::listen::listen_addr_allowed(addr, self.network.allow_non_loopback).map_err(
                |e| {
                    invalid(
                        "prometheus.listen",
                        format!("{:?}", addr.to_string()),
                        e.to_string(),
                    )
                },
            )?;
        }
        in_range("prometheus.max_connections", p.max_connections, 1, 1024)?;
        in_range(
            "prometheus.max_request_bytes",
            p.max_request_bytes,
            256,
            1 << 20,
        )?;
        in_range(
            "prometheus.max_response_bytes",
            p.max_response_bytes,
            1 << 16,
            1 << 34,
        )?;
        in_range("prometheus.timeout_ms", p.timeout_ms, 10, 600_000)?;

        for (i, p) in self.redaction.patterns.iter().enumerate() {
            if p.is_empty() || p.len() > 64 || !p.is_ascii() {
                return Err(invalid(
                    &format!("redaction.patterns[{i}]"),
                    format!("{p:?}"),
                    "1 to 64 ASCII characters (matched case-insensitively within a key)",
                ));
            }
        }

        for (name, bounds) in &self.histograms {
            let key = format!("histograms.\"{name}\"");
            if bounds.is_empty() || bounds.len() > MAX_HISTOGRAM_BOUNDS {
                return Err(invalid(
                    &key,
                    format!("{} bounds", bounds.len()),
                    format!("1 to {MAX_HISTOGRAM_BOUNDS} upper bounds"),
                ));
            }
            if let Some(w) = bounds.windows(2).find(|w| w[0] >= w[1]) {
                return Err(invalid(
                    &key,
                    format!("{} then {}", w[0], w[1]),
                    "strictly increasing unsigned integers (inclusive upper bounds)",
                ));
            }
            if let Some(b) = bounds.iter().find(|&&b| b > MAX_HISTOGRAM_BOUND) {
                return Err(invalid(
                    &key,
                    format!("bound {b}"),
                    format!(
                        "bounds of at most {MAX_HISTOGRAM_BOUND} (2^53, exact as the f64 the exports carry)"
                    ),
                ));
            }
        }

        for (i, rule) in self.services.iter().enumerate() {
            if !valid_service_name(&rule.name) {
                return Err(invalid(
                    &format!("services[{i}].name"),
                    format!("{:?}", rule.name),
                    "1 to 64 bytes of [A-Za-z0-9_.:-]",
                ));
            }
            if rule.name == crate::schema::HEALTH_SERVICE {
                return Err(invalid(
                    &format!("services[{i}].name"),
                    format!("{:?}", rule.name),
                    "any name but \"metricsd\", which is reserved for metricsd's own health series",
                ));
            }
            if rule.uid.is_none() && rule.pid.is_none() && rule.exe.is_none() {
                return Err(invalid(
                    &format!("services[{i}]"),
                    format!("a rule naming {:?} with no matcher", rule.name),
                    "at least one of uid, pid, exe",
                ));
            }
        }
        Ok(())
    }

    /// The `[grants]` lists with names resolved.
    pub fn grant_policy(&self) -> Result<crate::grant::GrantPolicy, ConfigError> {
        let g = &self.grants;
        for (i, name) in g.services.iter().enumerate() {
            if !valid_service_name(name) {
                return Err(invalid(
                    &format!("grants.services[{i}]"),
                    format!("{name:?}"),
                    "1 to 64 bytes of [A-Za-z0-9_.:-]",
                ));
            }
        }
        Ok(crate::grant::GrantPolicy {
            uids: g
                .uids
                .iter()
                .map(|u| u.uid("grants.uids"))
                .collect::<Result<_, _>>()?,
            gids: g
                .gids
                .iter()
                .map(|u| u.gid("grants.gids"))
                .collect::<Result<_, _>>()?,
            services: g.services.clone(),
        })
    }

    /// The control socket file's resolved owner, group and mode.
    pub fn socket_access(&self) -> Result<logd::privilege::SocketAccess, ConfigError> {
        Ok(logd::privilege::SocketAccess::new(
            self.socket_mode,
            self.socket_owner.as_ref(),
            self.socket_group.as_ref(),
        )?)
    }

    /// The resolved `user`/`group` to drop to, if any.
    pub fn run_as(&self) -> Result<Option<logd::privilege::RunAs>, ConfigError> {
        if self.user.is_none() && self.group.is_some() {
            return Err(invalid(
                "group",
                format!("{:?}", self.group),
                "`user` too (group is the group to switch to with user)",
            ));
        }
        Ok(self
            .user
            .as_ref()
            .map(|u| logd::privilege::RunAs::new(u, self.group.as_ref()))
            .transpose()?)
    }

    /// The export interval.
    pub fn export_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.export.interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deployed_config_validates() {
        let c = Config::from_toml(include_str!("../../deploy/metricsd.toml"))
            .expect("the deployed config");
        assert_eq!(c.rings.max_total_bytes, 1 << 30);
        assert_eq!(c.rings.max_bytes_per_uid, 256 << 20);
    }

    #[test]
    fn a_non_loopback_prometheus_listener_needs_the_opt_in() {
        let e = Config::from_toml("[prometheus]\nlisten = \"0.0.0.0:9464\"\n")
            .expect_err("every interface without the opt-in");
        let msg = e.to_string();
        assert!(
            msg.contains("prometheus.listen") && msg.contains("allow_non_loopback"),
            "{msg}"
        );
        Config::from_toml("[prometheus]\nlisten = \"127.0.0.1:9464\"\n").expect("loopback");
        Config::from_toml(
            "[network]\nallow_non_loopback = true\n[prometheus]\nlisten = \"0.0.0.0:9464\"\n",
        )
        .expect("with the opt-in");
    }

    #[test]
    fn byte_bounds_below_one_ring_and_bad_grant_services_are_named() {
        let e = Config::from_toml("[rings]\nmax_total_bytes = 10\n").expect_err("refused");
        assert!(e.to_string().contains("rings.max_total_bytes"), "{e}");
        let e = Config::from_toml("[rings]\nmax_bytes_per_uid = 10\n").expect_err("refused");
        assert!(e.to_string().contains("rings.max_bytes_per_uid"), "{e}");
        let e = Config::from_toml("[grants]\nservices = [\"a b\"]\n").expect_err("refused");
        assert!(e.to_string().contains("grants.services[0]"), "{e}");
        let e = Config::from_toml("socket_mode = 0o4777\n").expect_err("refused");
        assert!(e.to_string().contains("socket_mode"), "{e}");
        let e = Config::from_toml("[grants]\nuids = [\"no-such-user-x\"]\n").expect_err("refused");
        assert!(e.to_string().contains("grants.uids"), "{e}");
    }

    #[test]
    fn no_file_means_defaults_that_validate() {
        let c = Config::from_toml("").expect("empty is fine");
        assert_eq!(c.rings.max_keys_per_ring, 4096);
        assert_eq!(c.export.interval_ms, 1000);
        assert_eq!(c.redaction.patterns.len(), 10);
        Config::default().validate().expect("defaults validate");
    }

    #[test]
    fn a_full_file_parses() {
        let c = Config::from_toml(
            r#"
            socket = "/tmp/m.sock"
            [rings]
            capacity = 1024
            per_service = 2
            [drain]
            budget = 16
            [export]
            interval_ms = 250
            [histograms]
            "http.latency_ns" = [100, 1000, 10000]
            [[services]]
            name = "web"
            uid = 1000
            "#,
        )
        .expect("valid");
        assert_eq!(c.rings.capacity, 1024);
        assert_eq!(c.rings.per_service, 2);
        assert_eq!(c.drain.budget, 16);
        assert_eq!(c.histograms["http.latency_ns"], vec![100, 1000, 10000]);
        assert_eq!(c.services[0].uid, Some(1000));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[rings]\ncapacty = 8\n").expect_err("typo");
        let msg = err.to_string();
        assert!(msg.contains("capacty"), "{msg}");
        let err = Config::from_toml("bogus = 1\n").expect_err("unknown");
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key_and_the_form() {
        let err = Config::from_toml("[rings]\ncapacity = 1000\n").expect_err("not pow2");
        let msg = err.to_string();
        assert!(
            msg.contains("rings.capacity") && msg.contains("power of two"),
            "{msg}"
        );
        let err = Config::from_toml("[histograms]\nx = [5, 5]\n").expect_err("not increasing");
        assert!(err.to_string().contains("strictly increasing"), "{err}");
        // 2^53 + 1 and 2^53 + 2 would both be exported as the `f64` 2^53 + 2.
        let err = Config::from_toml("[histograms]\nx = [9007199254740993, 9007199254740994]\n")
            .expect_err("past 2^53");
        assert!(
            err.to_string().contains("bound 9007199254740993") && err.to_string().contains("2^53"),
            "{err}"
        );
        Config::from_toml("[histograms]\nx = [1, 9007199254740992]\n").expect("2^53 is exact");
        let err = Config::from_toml("[[services]]\nname = \"a\"\n").expect_err("no matcher");
        assert!(err.to_string().contains("services[0]"), "{err}");
        let err = Config::from_toml("[[services]]\nname = \"metricsd\"\nuid = 0\n")
            .expect_err("reserved name");
        assert!(
            err.to_string().contains("services[0].name") && err.to_string().contains("reserved"),
            "{err}"
        );
        let err = Config::from_toml("[drain]\nbudget = \"x\"\n").expect_err("type");
        assert!(err.to_string().contains("budget"), "{err}");
        let err = Config::from_toml("[spans]\nmax_attrs = 9\n").expect_err("range");
        assert!(err.to_string().contains("spans.max_attrs"), "{err}");
    }
}
