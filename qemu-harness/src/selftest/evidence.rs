//! Reading the evidence back from logd: metricsd's exported series, spans and health
//! series, each taken only from records metricsd itself appended (logd's kernel-derived
//! sender pid must be metricsd's), and bounded polling while an export is on its way.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use logd::{Client, Query, StoredRecord};
use metricsd::MetricKind;
use metricsd::schema::{HEALTH_SERVICE, SCOPE_DAEMON, SCOPE_METRICS, SCOPE_SPANS};

/// How long one check may wait for metricsd's exports to bring the expected values.
pub const WAIT: Duration = Duration::from_secs(20);
/// Pause between two looks at logd while waiting.
const POLL: Duration = Duration::from_millis(50);
/// Most records read for one series or span name.
const MAX_RECORDS: usize = 100_000;

/// A connection to logd, knowing which process is metricsd.
pub struct Logd {
    path: PathBuf,
    client: Client,
    metricsd_pid: u32,
}

impl Logd {
    /// Connects and finds metricsd's start marker (`scope = "metricsd"`,
    /// `message = "metricsd.start"`): its sender pid, as logd's kernel stamp says, is the
    /// only pid whose records count as metricsd's exports.
    pub fn connect(path: &Path) -> Result<Self> {
        let mut client = Client::connect(path)
            .with_context(|| format!("connecting to logd at {}", path.display()))?;
        let starts = client
            .query_all(&Query::new().scope(SCOPE_DAEMON), MAX_RECORDS)
            .context("querying metricsd's start marker")?;
        let pids: Vec<u32> = starts
            .iter()
            .filter(|r| r.record.message == "metricsd.start")
            .map(|r| r.sender.pid)
            .collect();
        let metricsd_pid = match pids.as_slice() {
            [pid] => *pid,
            other => bail!(
                "expected one metricsd start marker in logd, found {}",
                other.len()
            ),
        };
        Ok(Self {
            path: path.to_owned(),
            client,
            metricsd_pid,
        })
    }

    /// The logd socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection, for the hardening checks.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// A new connection (after logd closed this one on purpose).
    pub fn reconnect(&mut self) -> Result<()> {
        self.client = Client::connect(&self.path).context("reconnecting to logd")?;
        Ok(())
    }

    /// Every record matching `query`, refusing any that metricsd did not send.
    fn metricsd_records(&mut self, query: &Query) -> Result<Vec<StoredRecord>> {
        let records = self.client.query_all(query, MAX_RECORDS)?;
        if let Some(r) = records.iter().find(|r| r.sender.pid != self.metricsd_pid) {
            bail!(
                "record #{} matching {:?} was sent by pid {} ({}), not metricsd (pid {})",
                r.id,
                query.fields,
                r.sender.pid,
                r.sender.service,
                self.metricsd_pid
            );
        }
        Ok(records)
    }

    /// Every exported record of the series `id` (the `series` field), oldest first.
    pub fn series_records(&mut self, id: &str) -> Result<Vec<StoredRecord>> {
        self.metricsd_records(&Query::new().scope(SCOPE_METRICS).field("series", id))
    }

    /// The latest exported record of the series `id`.
    pub fn series_last(&mut self, id: &str) -> Result<Option<StoredRecord>> {
        Ok(self.series_records(id)?.pop())
    }

    /// Every exported record of metric `name` of `service` (any labels).
    pub fn metric_records(&mut self, service: &str, name: &str) -> Result<Vec<StoredRecord>> {
        self.metricsd_records(
            &Query::new()
                .scope(SCOPE_METRICS)
                .field("producer_service", service)
                .field("metric", name),
        )
    }

    /// The current value of one of metricsd's health series (0 while never exported:
    /// health series are exported when they change, from their first nonzero value).
    pub fn health(
        &mut self,
        kind: MetricKind,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<i128> {
        let id = metricsd::series_id(HEALTH_SERVICE, kind, name, labels);
        match self.series_last(&id)? {
            None => Ok(0),
            Some(r) => field_i128(&r, "value"),
        }
    }

    /// A health counter.
    pub fn health_counter(&mut self, name: &str, labels: &[(&str, &str)]) -> Result<i128> {
        self.health(MetricKind::Counter, name, labels)
    }

    /// Every reported span called `name` of `service`.
    pub fn spans(&mut self, service: &str, name: &str) -> Result<Vec<StoredRecord>> {
        self.metricsd_records(
            &Query::new()
                .scope(SCOPE_SPANS)
                .field("producer_service", service)
                .field("span", name),
        )
    }
}

/// A field's value, or an error naming the record.
pub fn field<'a>(r: &'a StoredRecord, key: &str) -> Result<&'a str> {
    r.record.get(key).with_context(|| {
        format!(
            "record #{} ({}) has no field `{key}`",
            r.id, r.record.message
        )
    })
}

/// A field parsed as an integer.
pub fn field_i128(r: &StoredRecord, key: &str) -> Result<i128> {
    let text = field(r, key)?;
    text.parse().with_context(|| {
        format!(
            "record #{} field `{key}` = {text:?} is not an integer",
            r.id
        )
    })
}

/// Waits until `check` passes: it returns `Ok(Ok(value))` on a match, `Ok(Err(what))`
/// while the evidence is not (yet) what is expected, `Err` when reading failed. After
/// `limit` the last `what` is the error.
pub fn wait_for<T>(
    limit: Duration,
    mut check: impl FnMut() -> Result<std::result::Result<T, String>>,
) -> Result<T> {
    let started = Instant::now();
    loop {
        match check()? {
            Ok(value) => return Ok(value),
            Err(what) => {
                if started.elapsed() >= limit {
                    bail!(
                        "{what} (still so after {:.1} s)",
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        }
        thread::sleep(POLL);
    }
}

/// `Ok(())` when `got == want`, else a message naming `what`.
pub fn same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    got: T,
    want: T,
) -> std::result::Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, expected {want:?}"))
    }
}
