//! The write-ahead log: what makes counters exactly once across a crash.
//!
//! After every drain pass that consumed records, the drain loop appends one group of
//! frames (one `write`, no sync: a killed process keeps the page cache) holding each
//! changed series' new state (a counter's total, a gauge's value, a histogram's
//! observation count) and each ring's new durable position; only then does it release
//! the ring's slots to the producer ([`telemetry_ring::Reader::release`]). So every
//! record before a ring's released position is in the log, and every record after it
//! is still in the ring. At each export it appends a checkpoint: every exported series'
//! exported counter total and its whole histogram. Rings granted, their registrations
//! (the raw records, so they are replayed through the same checks as any ring) and
//! their retirement are logged too.
//!
//! At start the log is replayed: series come back with their state, and each ring that
//! was live when the previous daemon died becomes returnable, at its logged position.
//! A producer that hands such a ring back (grant op 2) has it finished from that
//! position and closed. Counter increments are then in the log or in the ring, never
//! both. Histogram observations logged after the last checkpoint cannot be rebuilt
//! (the log holds their count, not their buckets): they are counted lost
//! (`metricsd.wal.lost{kind="histogram"}`). Replay then writes one self-contained file
//! with the state it rebuilt, syncs it and deletes the older files, so a second crash
//! during or right after a replay neither loses nor recounts anything.
//!
//! Files: `<dir>/wal-<seq>.log`, frames of `[u32 length][u32 CRC-32][payload]`. A torn
//! or corrupt frame ends the replay of its file (what follows it is ignored and
//! counted). A file is rotated at `retention.wal_file_bytes`: the new one starts with
//! the whole state, is synced, and the older ones are deleted. Bound: about two files
//! of that size, plus the state of every series and returnable ring.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use telemetry_abi::Record;
use zerocopy::{FromBytes, IntoBytes};

use crate::aggregate::{Labels, MetricKind, SeriesId, Store, Value};
use crate::histogram::{Histogram, Saved};

const START: u8 = 1;
const RING: u8 = 2;
const REGS: u8 = 3;
const RETIRE: u8 = 4;
const SERIES: u8 = 5;
const PASS: u8 = 6;
const CHECK: u8 = 7;
const LOST: u8 = 8;
const FORGET: u8 = 9;
const ROLLUPS: u8 = 10;

const V_COUNTER: u8 = 1;
const V_GAUGE_NONE: u8 = 2;
const V_GAUGE_INT: u8 = 3;
const V_GAUGE_FLOAT: u8 = 4;
const V_HIST_COUNT: u8 = 5;

/// A returnable ring older than this (by the wall clock of its last logged position)
/// is forgotten: its producer has had ten minutes to hand it back.
const RETURN_WINDOW_NS: u64 = 600 * 1_000_000_000;

/// A ring as the log knows it.
#[derive(Clone, Debug)]
pub struct LoggedRing {
    /// Its service, as the kernel named the producer when it was granted.
    pub service: Arc<str>,
    /// Records in it.
    pub capacity: u64,
    /// The durable position: every record before it is in the log.
    pub position: u64,
    /// Its registrations, the raw records in ring order.
    pub registrations: Vec<Record>,
    /// When its position was last logged (ns since the Unix epoch).
    pub touched_ns: u64,
    /// Whether a ring of this daemon (false: returnable, from an earlier daemon).
    pub live: bool,
}

/// What the log has done, for the health series.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Bytes appended.
    pub bytes: u64,
    /// Group commits (one `write` each).
    pub commits: u64,
    /// Appends that failed (then the slots are released anyway: draining goes on,
    /// durability is lost until a write succeeds).
    pub write_errors: u64,
    /// Series brought back at start.
    pub restored_series: u64,
    /// Rings the previous daemon left unclosed, returnable at start.
    pub returnable_rings: u64,
    /// Rings handed back and finished.
    pub returned: u64,
    /// Rings handed back and refused (unknown, another service's, live, mismatched).
    pub returns_refused: u64,
    /// Histogram observations drained by an earlier daemon after its last checkpoint
    /// (all daemons since the log began).
    pub lost_histogram: u64,
    /// Frames found torn or corrupt at replay (the rest of their file ignored).
    pub replay_bad_frames: u64,
}

/// What the log last holds for one series of the store.
#[derive(Clone, Debug, Default)]
struct Logged {
    generation: u32,
    /// The series' number in the current file (0: not defined there yet).
    no: u32,
    /// Whether anything is logged for this slot.
    live: bool,
    value: LoggedValue,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum LoggedValue {
    #[default]
    None,
    Counter(u128),
    Gauge(Option<i64>),
    Float(u64),
    HistCount(u64),
}

fn logged_value(v: &Value) -> LoggedValue {
    match v {
        Value::Counter { total } => LoggedValue::Counter(*total),
        Value::Gauge { value } => LoggedValue::Gauge(*value),
        Value::FloatGauge { value } => LoggedValue::Float(value.to_bits()),
        Value::Histogram(h) => LoggedValue::HistCount(h.count()),
    }
}

/// The log.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    /// Held open with an exclusive `flock`: one daemon per log.
    _lock: File,
    file: File,
    seq: u64,
    len: u64,
    max_len: u64,
    buf: Vec<u8>,
    logged: Vec<Logged>,
    next_no: u32,
    rings: HashMap<u64, LoggedRing>,
    epoch_base: u64,
    stats: WalStats,
    failing: bool,
    /// Files replayed at open, deleted once the rebuilt state is written.
    old: Vec<PathBuf>,
}

/// The log could not be opened.
#[derive(Debug)]
pub struct WalError {
    /// The directory.
    pub dir: PathBuf,
    /// What failed.
    pub error: io::Error,
}

impl std::fmt::Display for WalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "write-ahead log in {}: {} (expected a writable directory no other metricsd uses)",
            self.dir.display(),
            self.error
        )
    }
}

impl std::error::Error for WalError {}

fn log(line: std::fmt::Arguments<'_>) {
    eprintln!("metricsd: wal: {line}");
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_str(b: &mut Vec<u8>, s: &str) {
    put_u32(b, s.len() as u32);
    b.extend_from_slice(s.as_bytes());
}

/// Starts a frame; [`end_frame`] fills its length and CRC.
fn begin(b: &mut Vec<u8>, tag: u8) -> usize {
    let at = b.len();
    b.extend_from_slice(&[0; 8]);
    b.push(tag);
    at
}

fn end_frame(b: &mut [u8], at: usize) {
    let payload = &b[at + 8..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    b[at..at + 4].copy_from_slice(&len.to_le_bytes());
    b[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
    fn u128(&mut self) -> Option<u128> {
        self.take(16)?.try_into().ok().map(u128::from_le_bytes)
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

fn kind_code(k: MetricKind) -> u8 {
    match k {
        MetricKind::Counter => 1,
        MetricKind::Gauge => 2,
        MetricKind::Histogram => 3,
        MetricKind::SpanDuration => 4,
    }
}

fn kind_of(c: u8) -> Option<MetricKind> {
    Some(match c {
        1 => MetricKind::Counter,
        2 => MetricKind::Gauge,
        3 => MetricKind::Histogram,
        4 => MetricKind::SpanDuration,
        _ => return None,
    })
}

/// One series as replay rebuilds it.
#[derive(Debug)]
struct Replayed {
    service: String,
    kind: MetricKind,
    name: String,
    labels: Vec<(String, String)>,
    overflow: bool,
    created_ns: u64,
    value: LoggedValue,
    exported_total: u128,
    histogram: Option<Histogram>,
    /// The observation count of `histogram` (its last checkpoint).
    checkpoint_count: u64,
}

/// Where the retention store writes next, per resolution: (segment sequence number,
/// frames before it in that segment).
pub type Positions = [(u64, u64); 3];

/// Rollup windows a checkpoint held, with where the retention store was to write
/// next when it was taken: a window found on disk at or after that place was written
/// after the checkpoint, and the disk's copy wins.
#[derive(Debug, Default)]
pub struct LoggedWindows {
    /// Open windows, each with the positions of the checkpoint it came from.
    pub open: Vec<(crate::rollup::Point, Positions)>,
    /// Windows closed and not yet written at the last checkpoint.
    pub closed: Vec<crate::rollup::Point>,
    /// The positions of that last checkpoint.
    pub closed_at: Positions,
}

/// Where the retention store holds a window: (series, resolution index, start) to its
/// place on disk (segment sequence number, frame index).
pub type WrittenWindows = HashMap<(Arc<str>, u8, u64), (u64, u64)>;

impl LoggedWindows {
    /// The earliest checkpoint position per resolution: no window written before it
    /// can be newer than a logged one.
    pub fn earliest(&self) -> Positions {
        let mut from = self.closed_at;
        for (_, at) in &self.open {
            for (f, a) in from.iter_mut().zip(at) {
                *f = (*f).min(*a);
            }
        }
        from
    }

    /// The windows to put back into the retention store, open and closed: each one the
    /// disk does not hold at or after the place its checkpoint recorded (a copy written
    /// there is newer than the log's; one written before it, older).
    pub fn to_restore(
        self,
        on_disk: &WrittenWindows,
    ) -> (Vec<crate::rollup::Point>, Vec<crate::rollup::Point>) {
        let newer = |p: &crate::rollup::Point, at: &Positions| {
            on_disk
                .get(&(p.series.clone(), p.resolution.0, p.start_ns))
                .is_some_and(|w| *w >= at[usize::from(p.resolution.0)])
        };
        let open = self
            .open
            .into_iter()
            .filter(|(p, at)| !newer(p, at))
            .map(|(p, _)| p)
            .collect();
        let closed_at = self.closed_at;
        let closed = self
            .closed
            .into_iter()
            .filter(|p| !newer(p, &closed_at))
            .collect();
        (open, closed)
    }
}

#[derive(Debug, Default)]
struct ReplayState {
    /// Open windows by series identity (the latest checkpoint of each series).
    windows: HashMap<String, (Vec<crate::rollup::Point>, Positions)>,
    closed: Vec<crate::rollup::Point>,
    closed_at: Positions,
    /// By identity string, so a series defined in several files is one.
    series: HashMap<String, Replayed>,
    rings: HashMap<u64, LoggedRing>,
    epoch_base: u64,
    lost_histogram: u64,
    bad_frames: u64,
}

fn files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let path = e?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(seq) = name
            .strip_prefix("wal-")
            .and_then(|r| r.strip_suffix(".log"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

fn replay_file(bytes: &[u8], st: &mut ReplayState) {
    // Series numbers are per file.
    let mut by_no: HashMap<u32, String> = HashMap::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 8 {
            st.bad_frames += 1;
            return;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let Some(payload) = rest.get(8..8 + len) else {
            st.bad_frames += 1;
            return;
        };
        if crc32fast::hash(payload) != crc || replay_frame(payload, st, &mut by_no).is_none() {
            st.bad_frames += 1;
            return;
        }
        rest = &rest[8 + len..];
    }
}

fn replay_frame(
    payload: &[u8],
    st: &mut ReplayState,
    by_no: &mut HashMap<u32, String>,
) -> Option<()> {
    let mut c = Cur(payload);
    match c.u8()? {
        START => st.epoch_base = st.epoch_base.max(c.u64()?),
        RING => {
            let epoch = c.u64()?;
            let capacity = c.u64()?;
            let touched_ns = c.u64()?;
            let service = c.str()?;
            st.rings.insert(
                epoch,
                LoggedRing {
                    service: Arc::from(service),
                    capacity,
                    position: 0,
                    registrations: Vec::new(),
                    touched_ns,
                    live: false,
                },
            );
        }
        REGS => {
            let epoch = c.u64()?;
            let n = c.u32()? as usize;
            let mut regs = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                regs.push(Record::read_from_bytes(c.take(32)?).ok()?);
            }
            if let Some(r) = st.rings.get_mut(&epoch) {
                r.registrations.extend(regs);
            }
        }
        RETIRE => {
            st.rings.remove(&c.u64()?);
        }
        SERIES => {
            let no = c.u32()?;
            let kind = kind_of(c.u8()?)?;
            let overflow = c.u8()? != 0;
            let created_ns = c.u64()?;
            let service = c.str()?.to_owned();
            let name = c.str()?.to_owned();
            let n = c.u32()? as usize;
            let mut labels = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                labels.push((c.str()?.to_owned(), c.str()?.to_owned()));
            }
            let id = crate::aggregate::series_id(&service, kind, &name, &labels);
            st.series.entry(id.clone()).or_insert(Replayed {
                service,
                kind,
                name,
                labels,
                overflow,
                created_ns,
                value: LoggedValue::None,
                exported_total: 0,
                histogram: None,
                checkpoint_count: 0,
            });
            by_no.insert(no, id);
        }
        FORGET => {
            if let Some(id) = by_no.remove(&c.u32()?) {
                st.series.remove(&id);
                st.windows.remove(&id);
            }
        }
        PASS => {
            let now = c.u64()?;
            let rings = c.u32()?;
            for _ in 0..rings {
                let epoch = c.u64()?;
                let pos = c.u64()?;
                if let Some(r) = st.rings.get_mut(&epoch) {
                    r.position = pos;
                    r.touched_ns = now;
                }
            }
            let n = c.u32()?;
            for _ in 0..n {
                let no = c.u32()?;
                let value = match c.u8()? {
                    V_COUNTER => LoggedValue::Counter(c.u128()?),
                    V_GAUGE_NONE => LoggedValue::Gauge(None),
                    V_GAUGE_INT => LoggedValue::Gauge(Some(c.u64()? as i64)),
                    V_GAUGE_FLOAT => LoggedValue::Float(c.u64()?),
                    V_HIST_COUNT => LoggedValue::HistCount(c.u64()?),
                    _ => return None,
                };
                if let Some(s) = by_no.get(&no).and_then(|id| st.series.get_mut(id)) {
                    s.value = value;
                }
            }
        }
        CHECK => {
            let n = c.u32()?;
            for _ in 0..n {
                let no = c.u32()?;
                let exported_total = c.u128()?;
                let json_len = c.u32()? as usize;
                let json = c.take(json_len)?;
                let histogram = if json.is_empty() {
                    None
                } else {
                    let saved: Saved = serde_json::from_slice(json).ok()?;
                    Some(Histogram::from_saved(saved)?)
                };
                if let Some(s) = by_no.get(&no).and_then(|id| st.series.get_mut(id)) {
                    s.exported_total = exported_total;
                    if let Some(h) = histogram {
                        s.checkpoint_count = h.count();
                        s.histogram = Some(h);
                    }
                }
            }
        }
        LOST => st.lost_histogram = st.lost_histogram.max(c.u64()?),
        ROLLUPS => {
            let mut at = [(0, 0); 3];
            for p in &mut at {
                *p = (c.u64()?, c.u64()?);
            }
            let points = |c: &mut Cur<'_>| -> Option<Vec<crate::rollup::Point>> {
                let n = c.u32()? as usize;
                let mut out = Vec::with_capacity(n.min(4096));
                for _ in 0..n {
                    let len = c.u32()? as usize;
                    let frame = c.take(len)?;
                    out.push(crate::segment::decode_payload(frame.get(8..)?)?);
                }
                Some(out)
            };
            let n = c.u32()?;
            for _ in 0..n {
                let no = c.u32()?;
                let windows = points(&mut c)?;
                if let Some(id) = by_no.get(&no) {
                    st.windows.insert(id.clone(), (windows, at));
                }
            }
            st.closed = points(&mut c)?;
            st.closed_at = at;
        }
        _ => return None,
    }
    Some(())
}

/// What replay hands the daemon besides the restored store.
#[derive(Debug)]
pub struct Opened {
    /// The log.
    pub wal: Wal,
    /// The epoch base this daemon's grants must use (above every earlier daemon's).
    pub epoch_base: u64,
    /// Rollup windows to put back into the retention store.
    pub windows: LoggedWindows,
}

impl Wal {
    /// Opens the log in `dir` (created if missing), locks it against a second daemon and
    /// replays every file into `store`. [`start`](Self::start) then writes the rebuilt
    /// state as one synced file and deletes the older ones.
    pub fn open(dir: &Path, max_len: u64, store: &mut Store) -> Result<Opened, WalError> {
        let err = |error| WalError {
            dir: dir.to_owned(),
            error,
        };
        fs::create_dir_all(dir).map_err(err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(err)?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |e| {
                err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("locked by another metricsd ({e})"),
                ))
            },
        )?;
        let mut st = ReplayState::default();
        let old = files(dir).map_err(err)?;
        for (_, path) in &old {
            let mut bytes = Vec::new();
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(err)?;
            replay_file(&bytes, &mut st);
        }
        let now = crate::drain::wall_ns();
        let secs = now / 1_000_000_000;
        let epoch_base = (secs << 32).max(st.epoch_base.saturating_add(1 << 32));
        let seq = old.last().map_or(1, |(s, _)| s + 1);
        let path = dir.join(format!("wal-{seq}.log"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(err)?;
        let windows = LoggedWindows {
            open: st
                .windows
                .drain()
                .filter(|(id, _)| st.series.contains_key(id))
                .flat_map(|(_, (points, at))| points.into_iter().map(move |p| (p, at)))
                .collect(),
            closed: std::mem::take(&mut st.closed),
            closed_at: st.closed_at,
        };
        let mut lost = st.lost_histogram;
        let mut stats = WalStats {
            replay_bad_frames: st.bad_frames,
            ..WalStats::default()
        };
        for s in st.series.into_values() {
            let value = match (s.kind, s.value, s.histogram) {
                (MetricKind::Counter, LoggedValue::Counter(total), _) => Value::Counter { total },
                (MetricKind::Counter, _, _) => continue,
                (MetricKind::Gauge, LoggedValue::Gauge(v), _) => Value::Gauge { value: v },
                (MetricKind::Gauge, LoggedValue::Float(bits), _) => Value::FloatGauge {
                    value: f64::from_bits(bits),
                },
                (MetricKind::Gauge, _, _) => Value::Gauge { value: None },
                (_, value, h) => {
                    let logged = match value {
                        LoggedValue::HistCount(n) => n,
                        _ => 0,
                    };
                    lost += logged.saturating_sub(s.checkpoint_count);
                    match h {
                        Some(h) => Value::Histogram(h),
                        None => Value::Histogram(Histogram::new(store.layout(&s.name))),
                    }
                }
            };
            let labels: Labels = Arc::from(s.labels);
            store.restore(
                &s.service,
                s.kind,
                &s.name,
                labels,
                s.overflow,
                s.created_ns,
                value,
                s.exported_total,
            );
            stats.restored_series += 1;
        }
        let rings: HashMap<u64, LoggedRing> = st
            .rings
            .into_iter()
            .filter(|(_, r)| now.saturating_sub(r.touched_ns) < RETURN_WINDOW_NS)
            .collect();
        stats.returnable_rings = rings.len() as u64;
        stats.lost_histogram = lost;
        let wal = Self {
            dir: dir.to_owned(),
            _lock: lock,
            file,
            seq,
            len: 0,
            max_len,
            buf: Vec::new(),
            logged: Vec::new(),
            next_no: 1,
            rings,
            epoch_base,
            stats,
            failing: false,
            old: old.into_iter().map(|(_, p)| p).collect(),
        };
        if wal.stats.restored_series > 0 || wal.stats.returnable_rings > 0 || lost > 0 {
            log(format_args!(
                "replayed {} series, {} rings returnable, {} histogram observations lost so far, {} bad frames",
                wal.stats.restored_series,
                wal.stats.returnable_rings,
                lost,
                wal.stats.replay_bad_frames
            ));
        }
        Ok(Opened {
            wal,
            epoch_base,
            windows,
        })
    }

    /// Writes the state replay rebuilt (the store, and the retention store's windows
    /// once they were put back) as one synced file, then deletes the older files.
    pub fn start(
        &mut self,
        store: &Store,
        retention: Option<&crate::retention::Retention>,
    ) -> Result<(), WalError> {
        self.write_state(store, retention)
            .map_err(|error| WalError {
                dir: self.dir.clone(),
                error,
            })?;
        for path in std::mem::take(&mut self.old) {
            let _ = fs::remove_file(path);
        }
        Ok(())
    }

    /// The totals.
    pub fn stats(&self) -> &WalStats {
        &self.stats
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ring with `epoch`, if the log knows it.
    pub fn ring(&self, epoch: u64) -> Option<&LoggedRing> {
        self.rings.get(&epoch)
    }

    /// Counts a handed-back ring as finished or refused.
    pub fn count_return(&mut self, finished: bool) {
        if finished {
            self.stats.returned += 1;
        } else {
            self.stats.returns_refused += 1;
        }
    }

    /// Logs (at the next commit) a ring granted by this daemon.
    pub fn ring_granted(&mut self, epoch: u64, service: &Arc<str>, capacity: u64) {
        let at = begin(&mut self.buf, RING);
        put_u64(&mut self.buf, epoch);
        put_u64(&mut self.buf, capacity);
        put_u64(&mut self.buf, crate::drain::wall_ns());
        put_str(&mut self.buf, service);
        end_frame(&mut self.buf, at);
        self.rings.insert(
            epoch,
            LoggedRing {
                service: service.clone(),
                capacity,
                position: 0,
                registrations: Vec::new(),
                touched_ns: crate::drain::wall_ns(),
                live: true,
            },
        );
    }

    /// Marks a returned ring live while this daemon finishes it.
    pub fn ring_taken(&mut self, epoch: u64) {
        if let Some(r) = self.rings.get_mut(&epoch) {
            r.live = true;
        }
    }

    /// Logs (at the next commit) a registration completed in ring `epoch`.
    pub fn registered(&mut self, epoch: u64, records: &[Record]) {
        let Some(ring) = self.rings.get_mut(&epoch) else {
            return;
        };
        ring.registrations.extend_from_slice(records);
        let at = begin(&mut self.buf, REGS);
        put_u64(&mut self.buf, epoch);
        put_u32(&mut self.buf, records.len() as u32);
        for r in records {
            self.buf.extend_from_slice(r.as_bytes());
        }
        end_frame(&mut self.buf, at);
    }

    /// Logs (at the next commit) that ring `epoch` was closed: nothing of it is needed
    /// again.
    pub fn retired(&mut self, epoch: u64) {
        if self.rings.remove(&epoch).is_some() {
            let at = begin(&mut self.buf, RETIRE);
            put_u64(&mut self.buf, epoch);
            end_frame(&mut self.buf, at);
        }
    }

    fn slot(&mut self, id: SeriesId) -> &mut Logged {
        let i = id.index() as usize;
        if self.logged.len() <= i {
            self.logged.resize(i + 1, Logged::default());
        }
        let l = &mut self.logged[i];
        if !l.live || l.generation != id.generation() {
            *l = Logged {
                generation: id.generation(),
                no: 0,
                live: true,
                value: LoggedValue::None,
            };
        }
        l
    }

    /// Defines series `id` in the current file if it is not yet; returns its number.
    fn define(&mut self, store: &Store, id: SeriesId) -> Option<u32> {
        let s = store.get(id)?;
        if self.slot(id).no != 0 {
            return Some(self.slot(id).no);
        }
        let no = self.next_no;
        self.next_no += 1;
        let b = &mut self.buf;
        let at = begin(b, SERIES);
        put_u32(b, no);
        b.push(kind_code(s.kind));
        b.push(u8::from(s.overflow));
        put_u64(b, s.created_ns);
        put_str(b, &s.service);
        put_str(b, &s.name);
        put_u32(b, s.labels.len() as u32);
        for (k, v) in s.labels.iter() {
            put_str(b, k);
            put_str(b, v);
        }
        end_frame(b, at);
        self.slot(id).no = no;
        Some(no)
    }

    /// Appends the pass frame: `positions` (epoch, durable position) and the series
    /// among `candidates` whose state changed since it was last logged. Then writes
    /// everything queued with one `write`. Returns whether it reached the file (the
    /// caller releases the slots either way; a failure is counted and logged).
    pub fn commit(
        &mut self,
        store: &Store,
        candidates: &[SeriesId],
        positions: &[(u64, u64)],
    ) -> bool {
        let mut entries: Vec<(u32, LoggedValue)> = Vec::new();
        for &id in candidates {
            let Some(s) = store.get(id) else { continue };
            let v = logged_value(&s.value);
            if self.slot(id).value == v {
                continue;
            }
            let Some(no) = self.define(store, id) else {
                continue;
            };
            self.slot(id).value = v;
            entries.push((no, v));
        }
        let now = crate::drain::wall_ns();
        if !entries.is_empty() || !positions.is_empty() {
            let b = &mut self.buf;
            let at = begin(b, PASS);
            put_u64(b, now);
            put_u32(b, positions.len() as u32);
            for &(epoch, pos) in positions {
                put_u64(b, epoch);
                put_u64(b, pos);
            }
            put_u32(b, entries.len() as u32);
            for (no, v) in entries {
                put_u32(b, no);
                match v {
                    LoggedValue::Counter(t) => {
                        b.push(V_COUNTER);
                        b.extend_from_slice(&t.to_le_bytes());
                    }
                    LoggedValue::Gauge(None) | LoggedValue::None => b.push(V_GAUGE_NONE),
                    LoggedValue::Gauge(Some(x)) => {
                        b.push(V_GAUGE_INT);
                        put_u64(b, x as u64);
                    }
                    LoggedValue::Float(bits) => {
                        b.push(V_GAUGE_FLOAT);
                        put_u64(b, bits);
                    }
                    LoggedValue::HistCount(n) => {
                        b.push(V_HIST_COUNT);
                        put_u64(b, n);
                    }
                }
            }
            end_frame(b, at);
        }
        for &(epoch, pos) in positions {
            if let Some(r) = self.rings.get_mut(&epoch) {
                r.position = pos;
                r.touched_ns = now;
            }
        }
        self.flush()
    }

    fn flush(&mut self) -> bool {
        if self.buf.is_empty() {
            return true;
        }
        let result = self.file.write_all(&self.buf);
        let n = self.buf.len() as u64;
        self.buf.clear();
        match result {
            Ok(()) => {
                self.len += n;
                self.stats.bytes += n;
                self.stats.commits += 1;
                if self.failing {
                    self.failing = false;
                    log(format_args!("appending works again"));
                }
                true
            }
            Err(e) => {
                self.stats.write_errors += 1;
                if !self.failing {
                    self.failing = true;
                    log(format_args!(
                        "append failed, slots released without durability until it works: {e}"
                    ));
                }
                // The file may hold part of a frame now: replay stops there. Start a
                // new file at the next checkpoint so later frames are not behind it.
                self.len = self.max_len;
                false
            }
        }
    }

    /// The export checkpoint: each series in `exported` (just exported) gets its
    /// exported counter total and its whole histogram logged; series that expired are
    /// forgotten. Rotates the file when it passed its bound.
    pub fn checkpoint(
        &mut self,
        store: &Store,
        exported: &[SeriesId],
        retention: Option<&crate::retention::Retention>,
    ) {
        if self.len >= self.max_len {
            if let Err(e) = self.rotate(store, retention) {
                self.stats.write_errors += 1;
                log(format_args!("rotation failed: {e}"));
            }
            return;
        }
        let mut forget = Vec::new();
        for (i, l) in self.logged.iter_mut().enumerate() {
            if !l.live {
                continue;
            }
            let id_live = store
                .generation_at(i as u32)
                .is_some_and(|generation| generation == l.generation);
            if !id_live {
                if l.no != 0 {
                    forget.push(l.no);
                }
                *l = Logged::default();
            }
        }
        for no in forget {
            let at = begin(&mut self.buf, FORGET);
            put_u32(&mut self.buf, no);
            end_frame(&mut self.buf, at);
        }
        let mut entries = Vec::new();
        for &id in exported {
            let Some(s) = store.get(id) else { continue };
            let hist = match &s.value {
                Value::Histogram(h) => serde_json::to_vec(&h.saved()).unwrap_or_default(),
                Value::Counter { .. } => Vec::new(),
                _ => continue,
            };
            let Some(no) = self.define(store, id) else {
                continue;
            };
            entries.push((no, s.exported_total, hist));
        }
        if let Some(r) = retention {
            let mut frame = Vec::new();
            let mut put_points = |b: &mut Vec<u8>, points: &[crate::rollup::Point]| {
                put_u32(b, points.len() as u32);
                for p in points {
                    frame.clear();
                    crate::segment::encode_frame(p, &mut frame);
                    put_u32(b, frame.len() as u32);
                    b.extend_from_slice(&frame);
                }
            };
            let mut windows = Vec::new();
            for &id in exported {
                let Some(s) = store.get(id) else { continue };
                let Some(no) = self.define(store, id) else {
                    continue;
                };
                windows.push((no, r.open_of(&s.id())));
            }
            let b = &mut self.buf;
            let at = begin(b, ROLLUPS);
            for (seq, frames) in r.positions() {
                put_u64(b, seq);
                put_u64(b, frames);
            }
            put_u32(b, windows.len() as u32);
            for (no, points) in &windows {
                put_u32(b, *no);
                put_points(b, points);
            }
            put_points(b, r.pending());
            end_frame(b, at);
        }
        if !entries.is_empty() {
            let b = &mut self.buf;
            let at = begin(b, CHECK);
            put_u32(b, entries.len() as u32);
            for (no, total, hist) in entries {
                put_u32(b, no);
                b.extend_from_slice(&total.to_le_bytes());
                put_u32(b, hist.len() as u32);
                b.extend_from_slice(&hist);
            }
            end_frame(b, at);
        }
        self.flush();
    }

    /// Writes the whole state into the current (empty) file and syncs it.
    fn write_state(
        &mut self,
        store: &Store,
        retention: Option<&crate::retention::Retention>,
    ) -> io::Result<()> {
        self.buf.clear();
        self.logged.clear();
        self.next_no = 1;
        let at = begin(&mut self.buf, START);
        put_u64(&mut self.buf, self.epoch_base);
        end_frame(&mut self.buf, at);
        let at = begin(&mut self.buf, LOST);
        put_u64(&mut self.buf, self.stats.lost_histogram);
        end_frame(&mut self.buf, at);
        let rings: Vec<(u64, LoggedRing)> =
            self.rings.iter().map(|(e, r)| (*e, r.clone())).collect();
        let mut positions = Vec::with_capacity(rings.len());
        for (epoch, r) in &rings {
            let at = begin(&mut self.buf, RING);
            put_u64(&mut self.buf, *epoch);
            put_u64(&mut self.buf, r.capacity);
            put_u64(&mut self.buf, r.touched_ns);
            put_str(&mut self.buf, &r.service);
            end_frame(&mut self.buf, at);
            if !r.registrations.is_empty() {
                let at = begin(&mut self.buf, REGS);
                put_u64(&mut self.buf, *epoch);
                put_u32(&mut self.buf, r.registrations.len() as u32);
                for rec in &r.registrations {
                    self.buf.extend_from_slice(rec.as_bytes());
                }
                end_frame(&mut self.buf, at);
            }
            positions.push((*epoch, r.position));
        }
        let ids: Vec<SeriesId> = store.ids().collect();
        self.commit(store, &ids, &positions);
        let touched: Vec<(u64, u64)> = rings.iter().map(|(e, r)| (*e, r.touched_ns)).collect();
        for (e, t) in touched {
            if let Some(r) = self.rings.get_mut(&e) {
                r.touched_ns = t;
            }
        }
        let all: Vec<SeriesId> = store.ids().collect();
        self.checkpoint_entries(store, &all, retention);
        if self.failing {
            return Err(io::Error::other("appending the state failed"));
        }
        self.file.sync_data()
    }

    fn checkpoint_entries(
        &mut self,
        store: &Store,
        ids: &[SeriesId],
        retention: Option<&crate::retention::Retention>,
    ) {
        let max = self.max_len;
        // Never rotate from inside a rotation.
        self.max_len = u64::MAX;
        self.checkpoint(store, ids, retention);
        self.max_len = max;
    }

    /// Starts a new file holding the whole state, syncs it, deletes the older ones.
    fn rotate(
        &mut self,
        store: &Store,
        retention: Option<&crate::retention::Retention>,
    ) -> io::Result<()> {
        let seq = self.seq + 1;
        let path = self.dir.join(format!("wal-{seq}.log"));
        self.file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        self.seq = seq;
        self.len = 0;
        self.failing = false;
        self.write_state(store, retention)?;
        for (s, p) in files(&self.dir)? {
            if s < seq {
                let _ = fs::remove_file(p);
            }
        }
        Ok(())
    }

    /// Syncs the file (a clean stop).
    pub fn sync(&mut self) {
        let _ = self.flush();
        let _ = self.file.sync_data();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::{Agg, Point, Resolution};

    fn window(series: &str, resolution: u8, start_ns: u64) -> Point {
        Point {
            series: Arc::from(series),
            resolution: Resolution(resolution),
            start_ns,
            agg: Agg::Counter { delta: 1 },
        }
    }

    fn names(points: &[Point]) -> Vec<&str> {
        points.iter().map(|p| &*p.series).collect()
    }

    #[test]
    fn logged_windows_come_back_unless_the_disk_wrote_them_after_their_checkpoint() {
        let early = [(3, 5), (2, 0), (1, 9)];
        let late = [(4, 1), (2, 3), (1, 9)];
        let logged = LoggedWindows {
            open: vec![
                (window("a", 0, 100), early),
                (window("b", 0, 100), late),
                (window("c", 1, 200), late),
                (window("d", 2, 300), early),
                (window("e", 1, 100), early),
            ],
            closed: vec![window("f", 0, 100), window("g", 1, 100)],
            closed_at: [(4, 0), (2, 2), (1, 9)],
        };
        assert_eq!(logged.earliest(), [(3, 5), (2, 0), (1, 9)]);
        let on_disk: WrittenWindows = [
            // At its checkpoint's place: written after it, the disk's copy wins.
            (("a", 0, 100), (3, 5)),
            // Before its checkpoint's place: an older copy.
            (("b", 0, 100), (3, 7)),
            // Another resolution's window of the same series and start.
            (("b", 1, 100), (9, 9)),
            // After the place of its own resolution (2, 3), before resolution 0's.
            (("c", 1, 200), (2, 5)),
            (("d", 2, 300), (1, 8)),
            // Another start.
            (("e", 1, 200), (9, 9)),
            (("f", 0, 100), (4, 0)),
            (("g", 1, 100), (2, 1)),
        ]
        .into_iter()
        .map(|((s, r, t), at)| ((Arc::from(s), r, t), at))
        .collect();
        let (open, closed) = logged.to_restore(&on_disk);
        assert_eq!(names(&open), ["b", "d", "e"]);
        assert_eq!(names(&closed), ["g"]);
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        let at = begin(&mut b, tag);
        b.extend_from_slice(body);
        end_frame(&mut b, at);
        b
    }

    fn start(base: u64) -> Vec<u8> {
        frame(START, &base.to_le_bytes())
    }

    #[test]
    fn replay_stops_at_a_torn_or_corrupt_frame_and_keeps_what_came_before() {
        let mut bytes = start(1 << 32);
        bytes.extend(start(5 << 32));
        let whole = bytes.len();
        bytes.extend(start(9 << 32));
        // Every cut inside the last frame: the first two frames count, one bad frame.
        for cut in whole + 1..bytes.len() {
            let mut st = ReplayState::default();
            replay_file(&bytes[..cut], &mut st);
            assert_eq!(st.epoch_base, 5 << 32, "cut at {cut}");
            assert_eq!(st.bad_frames, 1, "cut at {cut}");
        }
        // A flipped byte in the second frame: only the first counts.
        let mut flipped = bytes.clone();
        flipped[whole - 1] ^= 1;
        let mut st = ReplayState::default();
        replay_file(&flipped, &mut st);
        assert_eq!((st.epoch_base, st.bad_frames), (1 << 32, 1));
        // The whole file: all three, nothing bad.
        let mut st = ReplayState::default();
        replay_file(&bytes, &mut st);
        assert_eq!((st.epoch_base, st.bad_frames), (9 << 32, 0));
    }

    #[test]
    fn opening_a_torn_log_counts_its_bad_frame() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = start(3);
        bytes.extend_from_slice(&[1, 2, 3]);
        fs::write(dir.path().join("wal-1.log"), &bytes).expect("write");
        let mut store = expiring_store();
        let opened = Wal::open(dir.path(), 1 << 20, &mut store).expect("replay");
        assert_eq!(opened.wal.stats().replay_bad_frames, 1);
        assert!(opened.epoch_base >= 4 << 32);
    }

    #[test]
    fn a_retired_ring_is_not_returnable_and_positions_follow_the_last_pass() {
        let mut bytes = Vec::new();
        for epoch in [7u64, 8] {
            let mut body = Vec::new();
            put_u64(&mut body, epoch);
            put_u64(&mut body, 1024);
            put_u64(&mut body, 1);
            put_str(&mut body, "web");
            bytes.extend(frame(RING, &body));
        }
        let mut pass = Vec::new();
        put_u64(&mut pass, 2);
        put_u32(&mut pass, 2);
        for (e, p) in [(7u64, 100u64), (8, 50)] {
            put_u64(&mut pass, e);
            put_u64(&mut pass, p);
        }
        put_u32(&mut pass, 0);
        bytes.extend(frame(PASS, &pass));
        bytes.extend(frame(RETIRE, &8u64.to_le_bytes()));
        let mut st = ReplayState::default();
        replay_file(&bytes, &mut st);
        assert_eq!(st.bad_frames, 0);
        assert_eq!(st.rings.len(), 1);
        let ring = &st.rings[&7];
        assert_eq!(
            (ring.position, ring.capacity, &*ring.service),
            (100, 1024, "web")
        );
        assert!(!ring.live);
    }

    /// A store whose series expire after 10 ms idle, as the drain loop's would.
    fn expiring_store() -> Store {
        use crate::config::{RedactionConfig, SeriesConfig};
        Store::new(
            SeriesConfig {
                idle_ttl_ms: 10,
                idle_ttl_bound_ms: 1000,
                ..SeriesConfig::default()
            },
            crate::redact::Redactor::new(&RedactionConfig::default().patterns),
            &std::collections::BTreeMap::new(),
        )
    }

    fn counter(store: &mut Store, service: u32, label: &str) -> SeriesId {
        match store.resolve(service, MetricKind::Counter, "req", &[("l", label)]) {
            crate::aggregate::Resolved::Series(id) => id,
            crate::aggregate::Resolved::Refused => panic!("refused"),
        }
    }

    /// Each series' counter total after a replay, by its label.
    fn replayed(dir: &Path) -> std::collections::BTreeMap<String, u128> {
        let mut store = expiring_store();
        let opened = Wal::open(dir, 1 << 20, &mut store).expect("replay");
        drop(opened);
        store
            .ids()
            .filter_map(|id| {
                let s = store.get(id)?;
                match s.value {
                    Value::Counter { total } => Some((s.labels[0].1.to_string(), total)),
                    _ => None,
                }
            })
            .collect()
    }

    #[test]
    fn every_series_is_logged_under_its_own_number_even_in_a_reused_slot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = expiring_store();
        let mut wal = Wal::open(dir.path(), 1 << 20, &mut store)
            .expect("open")
            .wal;
        wal.start(&store, None).expect("start");
        let web = store.service("web");
        store.ring_opened(web);
        // Several series in their own slots, logged over two passes.
        let ids: Vec<SeriesId> = (0..6)
            .map(|i| counter(&mut store, web, &format!("s{i}")))
            .collect();
        for (i, &id) in ids.iter().enumerate() {
            assert!(store.add(id, 10 + i as u64));
        }
        assert!(wal.commit(&store, &ids, &[]));
        assert!(store.add(ids[3], 100));
        assert!(wal.commit(&store, &ids, &[]));
        // One expires; a new series takes its slot and is logged before any checkpoint
        // could forget the old one.
        let old = counter(&mut store, web, "old");
        store.unbind(old);
        assert!(store.add(old, 5));
        assert!(wal.commit(&store, &[old], &[]));
        let t0 = store.get(old).expect("live").created_ns;
        store.take_dirty();
        store.exported(old, Some(5), t0);
        let mut expired = 0;
        store.sweep(t0 + 10_000_000, |_| expired += 1);
        assert_eq!(expired, 1);
        let new = counter(&mut store, web, "new");
        assert_eq!(new.index(), old.index(), "the slot is reused");
        assert!(store.add(new, 7));
        assert!(wal.commit(&store, &[new], &[]));
        // A kill: no checkpoint, no clean stop.
        drop(wal);
        let back = replayed(dir.path());
        for (i, want) in [10, 11, 12, 113, 14, 15].into_iter().enumerate() {
            assert_eq!(back.get(&format!("s{i}")), Some(&want), "s{i} in {back:?}");
        }
        assert_eq!(back.get("new"), Some(&7), "{back:?}");
        // The expired series comes back as it was logged (no checkpoint forgot it).
        assert!(matches!(back.get("old"), None | Some(&5)), "{back:?}");
    }
}
