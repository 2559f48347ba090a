//! Where exports go: the [`Sink`] trait, logd ([`LogdSink`]) and an in-memory sink for
//! tests ([`MemorySink`]).

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use logd::{Client, Query, Record, RecordStatus, Reject};

/// What became of one appended record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Stored (acknowledged with a record id).
    Stored,
    /// Refused for now (rate limit, storage trouble): retry later.
    Retry,
    /// Refused for good (malformed or too large): counted, not retried.
    Refused,
}

/// A failed exchange with the sink: nothing in the batch is known to be stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkError(pub String);

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SinkError {}

/// A destination for exported records.
pub trait Sink: Send {
    /// Appends `records`; one [`Delivery`] per record, in order.
    fn append(&mut self, records: &[Record]) -> Result<Vec<Delivery>, SinkError>;
    /// How many stored records have field `key` equal to `value` (read back).
    fn count_matching(&mut self, key: &str, value: &str) -> Result<usize, SinkError>;
}

/// logd, through its client library. Connects lazily and reconnects after a failure.
pub struct LogdSink {
    path: PathBuf,
    client: Option<Client>,
}

impl fmt::Debug for LogdSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogdSink")
            .field("path", &self.path)
            .field("connected", &self.client.is_some())
            .finish()
    }
}

impl LogdSink {
    /// A sink appending to the logd listening at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            client: None,
        }
    }

    fn client(&mut self) -> Result<&mut Client, SinkError> {
        if self.client.is_none() {
            let c = Client::connect(&self.path).map_err(|e| SinkError(e.to_string()))?;
            self.client = Some(c);
        }
        self.client
            .as_mut()
            .ok_or_else(|| SinkError("not connected".into()))
    }
}

impl Sink for LogdSink {
    fn append(&mut self, records: &[Record]) -> Result<Vec<Delivery>, SinkError> {
        let result = self.client()?.append(records);
        match result {
            Ok(report) => Ok(report
                .statuses
                .iter()
                .map(|s| match s {
                    RecordStatus::Accepted(_) => Delivery::Stored,
                    RecordStatus::Rejected(Reject::RateLimited | Reject::Internal, _) => {
                        Delivery::Retry
                    }
                    RecordStatus::Rejected(..) => Delivery::Refused,
                })
                .collect()),
            Err(e) => {
                self.client = None;
                Err(SinkError(e.to_string()))
            }
        }
    }

    fn count_matching(&mut self, key: &str, value: &str) -> Result<usize, SinkError> {
        let q = Query::new().field(key, value);
        let result = self.client()?.query_all(&q, 1000);
        match result {
            Ok(records) => Ok(records.len()),
            Err(e) => {
                self.client = None;
                Err(SinkError(e.to_string()))
            }
        }
    }
}

/// The shared state of a [`MemorySink`].
#[derive(Debug, Default)]
pub struct MemoryState {
    /// Every stored record, in order.
    pub records: Vec<Record>,
    /// Fail this many appends (whole exchange) before succeeding again.
    pub fail_appends: u32,
    /// Answer `Retry` for this many records before storing again.
    pub retry_records: u32,
}

/// An in-memory sink; clones share the same state, so a test keeps one and hands the
/// other to the daemon.
#[derive(Clone, Debug, Default)]
pub struct MemorySink {
    state: Arc<Mutex<MemoryState>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared state.
    pub fn state(&self) -> MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stored records whose `key` field equals `value`.
    pub fn find(&self, key: &str, value: &str) -> Vec<Record> {
        self.state()
            .records
            .iter()
            .filter(|r| r.get(key) == Some(value))
            .cloned()
            .collect()
    }
}

impl Sink for MemorySink {
    fn append(&mut self, records: &[Record]) -> Result<Vec<Delivery>, SinkError> {
        let mut st = self.state();
        if st.fail_appends > 0 {
            st.fail_appends -= 1;
            return Err(SinkError("injected failure".into()));
        }
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            if st.retry_records > 0 {
                st.retry_records -= 1;
                out.push(Delivery::Retry);
            } else {
                st.records.push(r.clone());
                out.push(Delivery::Stored);
            }
        }
        Ok(out)
    }

    fn count_matching(&mut self, key: &str, value: &str) -> Result<usize, SinkError> {
        Ok(self
            .state()
            .records
            .iter()
            .filter(|r| r.get(key) == Some(value))
            .count())
    }
}
