//! The client library: [`Client`] for request/reply, [`BufferedClient`] for a bounded
//! send queue with batching and reconnects.

use std::collections::VecDeque;
use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Limits;
use crate::frame::{self, ErrorReply, ReadError, Reply};
use crate::query::{Query, QueryPage};
use crate::record::{Record, StoredRecord};
use crate::stats::Stats;
use crate::status::{AppendReport, Reason, RecordStatus, Reject};

/// Client settings. The defaults match a logd with default limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Read and write timeout per request (default 10 s; `None` waits forever). A
    /// long-poll QUERY adds its `wait_ms` to the read timeout.
    pub timeout: Option<Duration>,
    /// Largest APPEND frame this client builds (default 1 MiB, logd's default
    /// `max_frame_bytes`); bigger batches are split.
    pub max_frame_bytes: usize,
    /// Most records per APPEND frame (default 4096, logd's default).
    pub max_records_per_frame: usize,
    /// Largest reply accepted (default 16 MiB).
    pub max_reply_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        let l = Limits::default();
        ClientOptions {
            timeout: Some(Duration::from_secs(10)),
            max_frame_bytes: l.max_frame_bytes as usize,
            max_records_per_frame: l.max_records_per_frame as usize,
            max_reply_bytes: 16 << 20,
        }
    }
}

/// Everything that can go wrong talking to logd.
#[derive(Debug)]
pub enum ClientError {
    /// Could not connect.
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The connection failed or timed out mid-request.
    Io(io::Error),
    /// logd closed the connection instead of replying.
    Closed,
    /// logd refused the whole frame (an ERROR reply).
    Rejected(ErrorReply),
    /// A record is too large for one frame; nothing was sent.
    RecordTooLarge {
        /// Index of the record in the batch.
        index: usize,
        /// Its APPEND frame size.
        len: usize,
        /// `ClientOptions::max_frame_bytes`.
        max: usize,
    },
    /// The reply was larger than `ClientOptions::max_reply_bytes`.
    ReplyTooLarge {
        /// Announced length.
        len: u64,
        /// Allowed.
        max: usize,
    },
    /// The reply did not parse or was of the wrong kind.
    Protocol(String),
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ClientError::Connect { path, source } => {
                write!(f, "cannot connect to logd at {}: {source}", path.display())
            }
            ClientError::Io(e) => write!(f, "logd connection: {e}"),
            ClientError::Closed => f.write_str("logd closed the connection"),
            ClientError::Rejected(e) => {
                write!(
                    f,
                    "logd refused the request: {} ({}): {}",
                    e.class, e.reason, e.message
                )
            }
            ClientError::RecordTooLarge { index, len, max } => write!(
                f,
                "record {index} needs a {len}-byte frame; the frame limit is {max} bytes"
            ),
            ClientError::ReplyTooLarge { len, max } => {
                write!(f, "reply of {len} bytes exceeds max_reply_bytes ({max})")
            }
            ClientError::Protocol(m) => write!(f, "bad reply from logd: {m}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect { source, .. } | ClientError::Io(source) => Some(source),
            _ => None,
        }
    }
}

impl ClientError {
    /// Whether the connection is unusable afterwards (reconnect before retrying).
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            ClientError::Io(_) | ClientError::Closed | ClientError::Protocol(_)
        ) || matches!(self, ClientError::Rejected(e) if matches!(e.reason,
            Reason::FrameTooLarge | Reason::Timeout | Reason::TooManyConnections))
    }
}

/// A connection to logd. One request at a time; replies come in order.
///
/// ```no_run
/// use logd::{client::Client, Level, Query, Record};
/// let mut c = Client::connect("/run/logd.sock")?;
/// let report = c.append(&[Record::new(Level::Info, "app", "started").field("version", "1.2")])?;
/// assert!(report.all_accepted());
/// let page = c.query(&Query::new().scope("app").limit(10))?;
/// for r in &page.records {
///     println!("{} {} {}", r.id, r.sender.service, r.record.message);
/// }
/// # Ok::<(), logd::client::ClientError>(())
/// ```
pub struct Client {
    /// Replies are read through a buffer (several at once when requests were pipelined);
    /// requests are written to the stream itself.
    stream: BufReader<UnixStream>,
    opts: ClientOptions,
    buf: Vec<u8>,
}

impl Client {
    /// Connects with default options.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_with(path, ClientOptions::default())
    }

    /// Connects with these options.
    pub fn connect_with(
        path: impl AsRef<Path>,
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        stream
            .set_write_timeout(opts.timeout)
            .map_err(ClientError::Io)?;
        stream
            .set_read_timeout(opts.timeout)
            .map_err(ClientError::Io)?;
        Ok(Client {
            stream: BufReader::with_capacity(PIPELINE_READ_BUF, stream),
            opts,
            buf: Vec::new(),
        })
    }

    /// The options in use.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// Appends records, splitting them into as few frames as the limits allow. The
    /// report has one status per record, in order. Checks every record's size first:
    /// on [`ClientError::RecordTooLarge`] nothing was sent. On another error, frames
    /// already acknowledged stay stored (the statuses up to there are lost with the
    /// error; retrying may store those records twice).
    pub fn append(&mut self, records: &[Record]) -> Result<AppendReport, ClientError> {
        let max = self.opts.max_frame_bytes;
        for (index, r) in records.iter().enumerate() {
            let len = frame::append_frame_len(core::slice::from_ref(r));
            if len > max {
                return Err(ClientError::RecordTooLarge { index, len, max });
            }
        }
        let mut report = AppendReport::default();
        for batch in batches(records, max, self.opts.max_records_per_frame) {
            let sent = self.append_frame(batch)?;
            if sent.statuses.len() != batch.len() {
                return Err(ClientError::Protocol(format!(
                    "{} statuses for {} records",
                    sent.statuses.len(),
                    batch.len()
                )));
            }
            report.statuses.extend(sent.statuses);
        }
        Ok(report)
    }

    /// Appends each record in its own APPEND frame, pipelined: up to [`PIPELINE_FRAMES`]
    /// frames are written at once before their replies are read (in order, as the
    /// protocol allows), so a frame costs no round trip of its own. The report has one
    /// status per record, in order. Checks every record's size first, as
    /// [`Client::append`] does; on another error, the frames already acknowledged stay
    /// stored.
    pub fn append_each(&mut self, records: &[Record]) -> Result<AppendReport, ClientError> {
        let max = self.opts.max_frame_bytes;
        for (index, r) in records.iter().enumerate() {
            let len = frame::append_frame_len(core::slice::from_ref(r));
            if len > max {
                return Err(ClientError::RecordTooLarge { index, len, max });
            }
        }
        let mut report = AppendReport::default();
        let mut out = Vec::new();
        for window in records.chunks(PIPELINE_FRAMES) {
            out.clear();
            for r in window {
                out.extend_from_slice(&frame::encode_append(core::slice::from_ref(r)));
            }
            self.stream
                .get_ref()
                .write_all(&out)
                .map_err(io_or_closed)?;
            for _ in window {
                match self.read_reply()? {
                    Reply::Append(r) if r.statuses.len() == 1 => {
                        report.statuses.extend(r.statuses);
                    }
                    Reply::Append(r) => {
                        return Err(ClientError::Protocol(format!(
                            "{} statuses for 1 record",
                            r.statuses.len()
                        )));
                    }
                    other => return Err(unexpected("APPEND_OK", &other)),
                }
            }
        }
        Ok(report)
    }

    /// Sends exactly one APPEND frame with these records (no splitting, no size check):
    /// for exercising logd's own limits.
    pub fn append_frame(&mut self, records: &[Record]) -> Result<AppendReport, ClientError> {
        match self.request_raw(&frame::encode_append(records))? {
            Reply::Append(r) => Ok(r),
            other => Err(unexpected("APPEND_OK", &other)),
        }
    }

    /// One page of a query.
    pub fn query(&mut self, q: &Query) -> Result<QueryPage, ClientError> {
        let extra = Duration::from_millis(u64::from(q.wait_ms));
        if q.wait_ms > 0 {
            let t = self.opts.timeout.map(|t| t + extra);
            self.stream
                .get_ref()
                .set_read_timeout(t)
                .map_err(ClientError::Io)?;
        }
        let result = self.request_raw(&frame::encode_query(q));
        if q.wait_ms > 0 {
            self.stream
                .get_ref()
                .set_read_timeout(self.opts.timeout)
                .map_err(ClientError::Io)?;
        }
        match result? {
            Reply::Query(p) => Ok(p),
            other => Err(unexpected("QUERY_OK", &other)),
        }
    }

    /// Every matching record from `q.cursor` on, following pages until logd says it is
    /// caught up or `max_records` were collected.
    pub fn query_all(
        &mut self,
        q: &Query,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, ClientError> {
        let mut q = q.clone();
        q.wait_ms = 0;
        let mut out = Vec::new();
        loop {
            let page = self.query(&q)?;
            let progressed = page.next_cursor != q.cursor;
            out.extend(page.records);
            if out.len() >= max_records {
                out.truncate(max_records);
                return Ok(out);
            }
            if !page.more || !progressed {
                return Ok(out);
            }
            q.cursor = page.next_cursor;
        }
    }

    /// logd's counters.
    pub fn stats(&mut self) -> Result<Stats, ClientError> {
        match self.request_raw(&frame::encode_stats_request())? {
            Reply::Stats(s) => Ok(s),
            other => Err(unexpected("STATS_OK", &other)),
        }
    }

    /// Sends arbitrary bytes as one request and reads one reply: for protocol tests and
    /// diagnostics. An ERROR reply is returned as [`Reply::Error`], not as an error.
    pub fn request_raw(&mut self, bytes: &[u8]) -> Result<Reply, ClientError> {
        self.stream
            .get_ref()
            .write_all(bytes)
            .map_err(io_or_closed)?;
        self.read_reply()
    }

    fn read_reply(&mut self) -> Result<Reply, ClientError> {
        let h = match frame::read_frame(&mut self.stream, self.opts.max_reply_bytes, &mut self.buf)
        {
            Ok(h) => h,
            Err(ReadError::Closed) => return Err(ClientError::Closed),
            Err(ReadError::TooLarge { len, max }) => {
                return Err(ClientError::ReplyTooLarge { len, max });
            }
            Err(ReadError::Io(e)) => return Err(io_or_closed(e)),
        };
        frame::decode_reply(&h, &self.buf).map_err(|m| ClientError::Protocol(m.0))
    }
}

fn io_or_closed(e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::UnexpectedEof => ClientError::Closed,
        _ => ClientError::Io(e),
    }
}

fn unexpected(expected: &str, got: &Reply) -> ClientError {
    match got {
        Reply::Error(e) => ClientError::Rejected(e.clone()),
        other => ClientError::Protocol(format!("expected {expected}, got {other:?}")),
    }
}

/// Frames [`Client::append_each`] writes before reading their replies: their replies
/// (a few dozen bytes each) fit the socket's buffer, so logd never blocks writing them
/// while the client is still writing.
pub const PIPELINE_FRAMES: usize = 256;
/// The client's read buffer for replies.
const PIPELINE_READ_BUF: usize = 16 << 10;

/// Splits records into runs that each fit one frame.
fn batches(records: &[Record], max_frame: usize, max_records: usize) -> Vec<&[Record]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = frame::HEADER_LEN + 4;
    for (i, r) in records.iter().enumerate() {
        let len = frame::record_len(r);
        if i > start && (size + len > max_frame || i - start >= max_records.max(1)) {
            out.extend(records.get(start..i));
            start = i;
            size = frame::HEADER_LEN + 4;
        }
        size += len;
    }
    if start < records.len() {
        out.extend(records.get(start..));
    }
    out
}

/// Why [`BufferedClient::push`] refused a record (which it hands back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushError {
    /// The queue holds `capacity` records; flush first.
    Full(Record),
    /// The record can never fit one frame.
    TooLarge(Record),
}

impl core::fmt::Display for PushError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PushError::Full(_) => f.write_str("send queue full; flush before pushing more"),
            PushError::TooLarge(_) => f.write_str("record larger than one frame"),
        }
    }
}

impl std::error::Error for PushError {}

/// A record logd refused during a flush, handed back so the caller can decide (a
/// `rate_limited` one may be pushed again later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The record.
    pub record: Record,
    /// The class.
    pub class: Reject,
    /// The reason.
    pub reason: Reason,
}

/// What one [`BufferedClient::flush`] achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Ids of the records stored, in queue order.
    pub ids: Vec<u64>,
    /// Records logd refused (removed from the queue).
    pub refused: Vec<Refused>,
}

/// A bounded send queue in front of a [`Client`]: `push` never blocks and never grows
/// past `capacity` records; `flush` sends the queue in batched frames, reconnecting if
/// the connection was lost. A record leaves the queue only once logd answered for it;
/// after a transport error the unanswered records stay queued (so a retry may store a
/// record twice if logd stored it but the answer was lost: at-least-once).
///
/// ```no_run
/// use logd::{client::BufferedClient, Level, Record};
/// let mut q = BufferedClient::new("/run/logd.sock", 10_000);
/// q.push(Record::new(Level::Info, "metrics", "requests_total").field("value", "42"))
///     .map_err(|e| e.to_string())?;
/// let report = q.flush()?;
/// println!("stored {} records, {} refused", report.ids.len(), report.refused.len());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct BufferedClient {
    path: PathBuf,
    opts: ClientOptions,
    client: Option<Client>,
    queue: VecDeque<Record>,
    capacity: usize,
}

impl BufferedClient {
    /// A queue of at most `capacity` records for the logd at `path` (connects lazily).
    pub fn new(path: impl Into<PathBuf>, capacity: usize) -> BufferedClient {
        BufferedClient::with_options(path, capacity, ClientOptions::default())
    }

    /// As [`BufferedClient::new`], with client options.
    pub fn with_options(
        path: impl Into<PathBuf>,
        capacity: usize,
        opts: ClientOptions,
    ) -> BufferedClient {
        BufferedClient {
            path: path.into(),
            opts,
            client: None,
            queue: VecDeque::new(),
            capacity,
        }
    }

    /// Queues a record, or hands it back if the queue is full or it cannot fit a frame.
    pub fn push(&mut self, record: Record) -> Result<(), PushError> {
        if frame::append_frame_len(core::slice::from_ref(&record)) > self.opts.max_frame_bytes {
            return Err(PushError::TooLarge(record));
        }
        if self.queue.len() >= self.capacity {
            return Err(PushError::Full(record));
        }
        self.queue.push_back(record);
        Ok(())
    }

    /// Records queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The bound given at construction.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sends everything queued. On error the records not yet answered stay queued and
    /// the connection is dropped (the next flush reconnects); records answered before
    /// the error are reported in no report (their ids are lost with the error).
    pub fn flush(&mut self) -> Result<FlushReport, ClientError> {
        let mut report = FlushReport::default();
        while !self.queue.is_empty() {
            let client = match &mut self.client {
                Some(c) => c,
                None => self
                    .client
                    .insert(Client::connect_with(&self.path, self.opts.clone())?),
            };
            let front: &[Record] = self.queue.make_contiguous();
            let take = batches(
                front,
                self.opts.max_frame_bytes,
                self.opts.max_records_per_frame,
            )
            .first()
            .map_or(0, |b| b.len());
            let batch: Vec<Record> = self.queue.range(..take).cloned().collect();
            let statuses = match client.append_frame(&batch) {
                Ok(r) if r.statuses.len() == batch.len() => r.statuses,
                Ok(r) => {
                    self.client = None;
                    return Err(ClientError::Protocol(format!(
                        "{} statuses for {} records",
                        r.statuses.len(),
                        batch.len()
                    )));
                }
                Err(e) => {
                    self.client = None;
                    return Err(e);
                }
            };
            self.queue.drain(..take);
            for (record, status) in batch.into_iter().zip(statuses) {
                match status {
                    RecordStatus::Accepted(id) => report.ids.push(id),
                    RecordStatus::Rejected(class, reason) => report.refused.push(Refused {
                        record,
                        class,
                        reason,
                    }),
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Level;

    #[test]
    fn batches_respect_both_bounds() {
        let recs: Vec<Record> = (0..10)
            .map(|i| Record::new(Level::Info, "s", "x".repeat(100 + i)))
            .collect();
        let all: usize = recs.iter().map(frame::record_len).sum();
        assert_eq!(batches(&recs, 1 << 20, 100).len(), 1);
        assert_eq!(batches(&recs, 1 << 20, 3).len(), 4);
        let b = batches(&recs, all / 2, 100);
        assert!(b.len() >= 2);
        assert_eq!(b.iter().map(|x| x.len()).sum::<usize>(), 10);
        for x in b {
            assert!(frame::append_frame_len(x) <= all / 2);
        }
    }

    #[test]
    fn queue_is_bounded() {
        let mut q = BufferedClient::new("/nonexistent/logd.sock", 2);
        let r = Record::new(Level::Info, "s", "m");
        q.push(r.clone()).unwrap();
        q.push(r.clone()).unwrap();
        assert_eq!(q.push(r.clone()), Err(PushError::Full(r)));
        let big = Record::new(Level::Info, "s", "x".repeat(2 << 20));
        assert!(matches!(q.push(big), Err(PushError::TooLarge(_))));
        assert!(matches!(q.flush(), Err(ClientError::Connect { .. })));
        assert_eq!(q.len(), 2);
    }
}
