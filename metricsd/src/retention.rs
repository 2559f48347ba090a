//! History: rollups of every exported series kept on disk in segments, each
//! resolution with its own TTL, total disk bounded, and a range query over memory
//! (open windows) and disk (closed ones).
//!
//! The drain loop hands every export to [`Retention::observe`] and calls
//! [`Retention::tick`] after it: windows that ended are closed ([`crate::rollup`]) and
//! appended to the resolution's current segment ([`crate::segment`]); a segment is
//! sealed (trailer, `fdatasync`) when the next frame would take it past
//! `retention.segment_bytes`. Expiry deletes whole sealed segments: those whose newest
//! window is older than their resolution's TTL, and, while the total would pass
//! `retention.max_bytes`, the oldest segments of the finest resolution that has sealed
//! ones (10 s before 1 min before 1 h). A window that
//! finds no room even then is dropped and counted: disk use never passes the bound.
//!
//! Faults never stop the drain loop: a failed write (a full disk: `ENOSPC`, or a file
//! size limit: `EFBIG`) cuts the segment back to its last whole frame, counts the
//! points lost by reason and logs one line to stderr when the state changes (the next
//! success logs the recovery); replay at start cuts a torn tail or a corrupt frame off
//! and seals what was good, and deletes a segment whose header is unreadable, each
//! counted and logged. Health series: `metricsd.retention.bytes`,
//! `metricsd.retention.segments`, `metricsd.retention.points.written`,
//! `metricsd.retention.points.dropped{reason}`, `metricsd.retention.write_errors{reason}`,
//! `metricsd.retention.segments.deleted{reason}`, `metricsd.retention.replay{outcome}`.
//!
//! What a crash loses: nothing with the write-ahead log ([`crate::wal`]), which
//! checkpoints the open windows and those closed but not yet written at every export
//! ([`Retention::close_due`] runs before the checkpoint, [`Retention::tick`] writes
//! after it); without it, the windows still open (at most one per series and
//! resolution). Closed windows are written before the next export and the page cache
//! survives the process; a sealed segment is also synced, so it survives the machine. A clean stop writes the open windows too (as a first part of each: the
//! next daemon's part is merged with it when read).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::aggregate::{Series, Value};
use crate::rollup::{Agg, Point, Resolution, Rollups, SECOND_NS};
use crate::segment::{self, Ending, TRAILER};

/// `[retention]`: rollup history on disk. Off without `dir`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Where segments live (one subdirectory per resolution: `10s`, `1m`, `1h`). No
    /// default: without it nothing is kept.
    pub dir: Option<PathBuf>,
    /// Disk bytes all segments may take together (default 64 MiB).
    pub max_bytes: u64,
    /// Bytes one segment may reach before it is sealed (default 1 MiB).
    pub segment_bytes: u64,
    /// How long 10-second windows are kept, seconds (default 86400: a day).
    pub ttl_10s_s: u64,
    /// How long 1-minute windows are kept, seconds (default 604800: a week).
    pub ttl_1m_s: u64,
    /// How long 1-hour windows are kept, seconds (default 7776000: 90 days).
    pub ttl_1h_s: u64,
    /// Keep a write-ahead log in `<dir>/wal` (default true): counters exactly once
    /// across a crash ([`crate::wal`]).
    pub wal: bool,
    /// Bytes a write-ahead log file may reach before a new one starts (default 8 MiB).
    pub wal_file_bytes: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_bytes: 64 << 20,
            segment_bytes: 1 << 20,
            ttl_10s_s: 86_400,
            ttl_1m_s: 604_800,
            ttl_1h_s: 7_776_000,
            wal: true,
            wal_file_bytes: 8 << 20,
        }
    }
}

impl RetentionConfig {
    /// The TTL of `res`, ns.
    pub fn ttl_ns(&self, res: Resolution) -> u64 {
        let s = match res.0 {
            0 => self.ttl_10s_s,
            1 => self.ttl_1m_s,
            _ => self.ttl_1h_s,
        };
        s.saturating_mul(SECOND_NS)
    }

    /// Checks the values; an error is (key, value found, expected form).
    pub fn validate(&self) -> Result<(), (&'static str, String, String)> {
        if !(4096..=1 << 40).contains(&self.segment_bytes) {
            return Err((
                "retention.segment_bytes",
                self.segment_bytes.to_string(),
                "bytes, 4096 to 2^40".to_owned(),
            ));
        }
        if self.max_bytes / 2 < self.segment_bytes {
            return Err((
                "retention.max_bytes",
                self.max_bytes.to_string(),
                format!(
                    "at least twice retention.segment_bytes ({})",
                    self.segment_bytes
                ),
            ));
        }
        if !(1 << 16..=1 << 30).contains(&self.wal_file_bytes) {
            return Err((
                "retention.wal_file_bytes",
                self.wal_file_bytes.to_string(),
                "bytes, 65536 to 2^30".to_owned(),
            ));
        }
        for (key, v, step) in [
            ("retention.ttl_10s_s", self.ttl_10s_s, 10),
            ("retention.ttl_1m_s", self.ttl_1m_s, 60),
            ("retention.ttl_1h_s", self.ttl_1h_s, 3600),
        ] {
            if v < step || v > 100 * 365 * 86_400 {
                return Err((
                    key,
                    v.to_string(),
                    format!("seconds, at least {step} and at most 100 years"),
                ));
            }
        }
        Ok(())
    }
}

/// One health series: (a counter, else a gauge), name, labels, value.
pub type HealthRow = (bool, &'static str, Vec<(&'static str, String)>, i128);

/// Why points were dropped or writes failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// `ENOSPC`: the filesystem is full.
    NoSpace,
    /// `EFBIG`: a file size limit (`RLIMIT_FSIZE`) or the filesystem's.
    FileTooLarge,
    /// Any other I/O error.
    Io,
    /// No room under `retention.max_bytes` even after deleting every sealed segment.
    DiskBound,
}

impl Fault {
    fn of(e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(28) => Self::NoSpace,
            Some(27) => Self::FileTooLarge,
            _ => Self::Io,
        }
    }

    /// The label value.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NoSpace => "no_space",
            Self::FileTooLarge => "file_too_large",
            Self::Io => "io",
            Self::DiskBound => "disk_bound",
        }
    }
}

/// Running totals, exported as health series.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionStats {
    /// Bytes of every segment (an unsealed one with its trailer reserved).
    pub bytes: u64,
    /// Segments on disk.
    pub segments: u64,
    /// Points (closed windows) written.
    pub points_written: u64,
    /// Points dropped, by reason.
    pub points_dropped: BTreeMap<Fault, u64>,
    /// Failed writes, by reason.
    pub write_errors: BTreeMap<Fault, u64>,
    /// Segments deleted for their TTL.
    pub deleted_ttl: u64,
    /// Segments deleted to stay under the disk bound.
    pub deleted_bound: u64,
    /// Segments found at replay with a torn tail (cut and sealed).
    pub replay_torn: u64,
    /// Segments found at replay corrupt (good prefix kept and sealed, or deleted).
    pub replay_corrupt: u64,
    /// Segments found clean at replay.
    pub replay_clean: u64,
    /// Samples whose kind or histogram layout did not match the series' open window.
    pub mismatches: u64,
}

#[derive(Debug)]
struct Sealed {
    path: PathBuf,
    bytes: u64,
    /// End of the newest window in it (0: none).
    newest_end_ns: u64,
}

#[derive(Debug, Default)]
struct Level {
    sealed: VecDeque<Sealed>,
    current: Option<(segment::Writer, u64)>,
    next_seq: u64,
}

/// The rollup store of one daemon: open windows in memory, closed ones on disk.
#[derive(Debug)]
pub struct Retention {
    cfg: RetentionConfig,
    dir: PathBuf,
    rollups: Rollups,
    levels: [Level; 3],
    stats: RetentionStats,
    closed: Vec<Point>,
    /// The fault of the last failed write, until a write succeeds (one log line per
    /// change).
    failing: Option<Fault>,
    /// Windows encoded for each resolution's current segment, not written yet.
    pending: [Queued; 3],
}

/// Encoded windows waiting for one append.
#[derive(Debug, Default)]
struct Queued {
    bytes: Vec<u8>,
    count: u64,
    newest_end_ns: u64,
}

/// A retention store could not be opened.
#[derive(Debug)]
pub struct OpenError {
    /// The directory.
    pub dir: PathBuf,
    /// What failed.
    pub error: io::Error,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "retention directory {}: {} (expected a writable directory)",
            self.dir.display(),
            self.error
        )
    }
}

impl std::error::Error for OpenError {}

fn log(line: fmt::Arguments<'_>) {
    eprintln!("metricsd: retention: {line}");
}

impl Retention {
    /// Opens the store in `cfg.dir` (`None` without one), replaying every segment: a
    /// torn tail or corrupt frame is cut off and the good part sealed, a segment with an
    /// unreadable header is deleted, each counted and logged.
    pub fn open(cfg: &RetentionConfig) -> Result<Option<Self>, OpenError> {
        let Some(dir) = cfg.dir.clone() else {
            return Ok(None);
        };
        let err = |error| OpenError {
            dir: dir.clone(),
            error,
        };
        fs::create_dir_all(&dir).map_err(err)?;
        let mut r = Self {
            cfg: cfg.clone(),
            dir: dir.clone(),
            rollups: Rollups::new(),
            levels: Default::default(),
            stats: RetentionStats::default(),
            closed: Vec::new(),
            failing: None,
            pending: Default::default(),
        };
        for res in Resolution::ALL {
            for (seq, path) in segment::list(&dir, res).map_err(err)? {
                r.replay_one(res, seq, path);
            }
        }
        r.recount();
        Ok(Some(r))
    }

    fn replay_one(&mut self, res: Resolution, seq: u64, path: PathBuf) {
        let level = &mut self.levels[usize::from(res.0)];
        level.next_seq = level.next_seq.max(seq.saturating_add(1));
        let scan = match segment::scan(&path) {
            Ok(s) => s,
            Err(e) => {
                log(format_args!(
                    "{}: unreadable, left alone: {e}",
                    path.display()
                ));
                self.stats.replay_corrupt += 1;
                return;
            }
        };
        let mismatch = scan.resolution.is_some_and(|r| r != res) || scan.seq != seq;
        let (keep, outcome) = match (&scan.ending, mismatch) {
            (_, true) => (false, "corrupt (header names another segment)"),
            (Ending::Sealed, _) => {
                self.stats.replay_clean += 1;
                (true, "")
            }
            (Ending::Dirty, _) => {
                self.stats.replay_clean += 1;
                (true, "")
            }
            (Ending::TornTail { at: 0 }, _) => {
                self.stats.replay_torn += 1;
                (false, "torn header")
            }
            (Ending::TornTail { .. }, _) => {
                self.stats.replay_torn += 1;
                (true, "torn tail cut")
            }
            (Ending::Corrupt { at: 0, .. }, _) => (false, "corrupt header"),
            (Ending::Corrupt { .. }, _) => (true, "corrupt frame: the frames before it kept"),
        };
        if matches!(scan.ending, Ending::Corrupt { .. }) || mismatch {
            self.stats.replay_corrupt += 1;
        }
        if !outcome.is_empty() {
            let why = match &scan.ending {
                Ending::Corrupt { why, .. } => why,
                _ => "",
            };
            log(format_args!(
                "{}: {outcome} {why} ({} of {} bytes good, {} windows kept)",
                path.display(),
                scan.good_len,
                scan.file_len,
                if keep { scan.points.len() } else { 0 },
            ));
        }
        if !keep {
            if let Err(e) = fs::remove_file(&path) {
                log(format_args!("{}: could not delete: {e}", path.display()));
            }
            return;
        }
        let newest_end_ns = scan
            .points
            .iter()
            .map(|p| p.start_ns.saturating_add(res.step_ns()))
            .max()
            .unwrap_or(0);
        let bytes = if scan.ending == Ending::Sealed {
            scan.file_len
        } else {
            // Cut what is not good and seal: the next replay finds it clean.
            let sealed =
                segment::Writer::reopen(path.clone(), seq, scan.good_len, scan.points.len() as u64)
                    .and_then(segment::Writer::seal);
            match sealed {
                Ok(n) => n,
                Err(e) => {
                    log(format_args!("{}: could not seal: {e}", path.display()));
                    scan.file_len
                }
            }
        };
        self.levels[usize::from(res.0)].sealed.push_back(Sealed {
            path,
            bytes,
            newest_end_ns,
        });
    }

    fn recount(&mut self) {
        let mut bytes = 0;
        let mut segments = 0;
        for level in &self.levels {
            for s in &level.sealed {
                bytes += s.bytes;
                segments += 1;
            }
            if let Some((w, _)) = &level.current {
                bytes += w.len + TRAILER;
                segments += 1;
            }
        }
        bytes += self
            .pending
            .iter()
            .map(|q| q.bytes.len() as u64)
            .sum::<u64>();
        self.stats.bytes = bytes;
        self.stats.segments = segments;
        self.stats.mismatches = self.rollups.mismatches;
    }

    /// The directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The totals.
    pub fn stats(&self) -> &RetentionStats {
        &self.stats
    }

    /// Takes what an export ending at `t_ns` said about `series` (`delta`: a counter's
    /// increase in the window).
    pub fn observe(&mut self, series: &Series, delta: u128, t_ns: u64) {
        let id = series.id();
        let sample = match &series.value {
            Value::Counter { .. } => crate::rollup::Sample::Counter(delta),
            Value::Gauge { value: Some(v) } => crate::rollup::Sample::Gauge(*v),
            Value::Gauge { value: None } => return,
            // The rollups keep integer gauges; a float gauge is exported and scraped but
            // has no rollup history.
            Value::FloatGauge { .. } => return,
            Value::Histogram(h) => match h {
                crate::histogram::Histogram::Exponential(e) => {
                    self.rollups.exponential_sample(&id, e)
                }
                crate::histogram::Histogram::Explicit(x) => {
                    let sum = h.integer_sum().unwrap_or_else(|| h.sum().max(0.0) as u128);
                    self.rollups
                        .histogram_sample(&id, &x.bounds_text(), h.count(), sum, x.counts())
                }
            },
        };
        self.observe_sample(&id, &sample, t_ns);
    }

    /// [`observe`](Self::observe) on a series id and sample.
    pub fn observe_sample(&mut self, series: &str, sample: &crate::rollup::Sample, t_ns: u64) {
        self.rollups.observe(series, sample, t_ns, &mut self.closed);
    }

    /// A histogram's window sample from its cumulative state (see
    /// [`Rollups::histogram_sample`]).
    pub fn histogram_sample(
        &mut self,
        series: &str,
        bounds: &str,
        count: u64,
        sum: u128,
        counts: &[u64],
    ) -> crate::rollup::Sample {
        self.rollups
            .histogram_sample(series, bounds, count, sum, counts)
    }

    /// Closes the windows that ended by `now_ns` without writing them yet (the next
    /// [`tick`](Self::tick) does): the write-ahead log checkpoints in between.
    pub fn close_due(&mut self, now_ns: u64) {
        self.rollups.close_due(now_ns, &mut self.closed);
    }

    /// The open windows of `series`.
    pub fn open_of(&self, series: &str) -> Vec<Point> {
        self.rollups.open_of(series)
    }

    /// Windows closed and not written yet.
    pub fn pending(&self) -> &[Point] {
        &self.closed
    }

    /// Per resolution, where the next window will be written: (segment sequence
    /// number, frames before it in that segment).
    pub fn positions(&self) -> crate::wal::Positions {
        let mut out = [(0, 0); 3];
        for (i, level) in self.levels.iter().enumerate() {
            out[i] = match &level.current {
                Some((w, _)) => (w.seq, w.frames + self.pending[i].count),
                None => (level.next_seq, 0),
            };
        }
        out
    }

    /// Every window on disk at or after `from` (per resolution), keyed by series,
    /// resolution and start, with where it is (segment sequence number, frame index).
    pub fn written_since(&self, from: crate::wal::Positions) -> crate::wal::WrittenWindows {
        let mut out = std::collections::HashMap::new();
        for res in Resolution::ALL {
            let (seq0, frame0) = from[usize::from(res.0)];
            let Ok(list) = segment::list(&self.dir, res) else {
                continue;
            };
            for (seq, path) in list.into_iter().filter(|(s, _)| *s >= seq0) {
                let Ok(scan) = segment::scan(&path) else {
                    continue;
                };
                for (i, p) in scan.points.into_iter().enumerate() {
                    let at = (seq, i as u64);
                    if seq == seq0 && at.1 < frame0 {
                        continue;
                    }
                    let e = out.entry((p.series, res.0, p.start_ns)).or_insert(at);
                    *e = (*e).max(at);
                }
            }
        }
        out
    }

    /// Puts back windows a write-ahead log held: open ones, and closed ones not
    /// written yet (written at the next tick).
    pub fn restore(&mut self, open: Vec<Point>, closed: Vec<Point>) {
        for p in open {
            self.rollups.restore(p);
        }
        self.closed.extend(closed);
    }

    /// Sets a restored series' cumulative state as the one its next export is
    /// differenced against (the state its last logged export had).
    pub fn prime(&mut self, series: &Series) {
        if let Value::Histogram(h) = &series.value {
            let id = series.id();
            match h {
                crate::histogram::Histogram::Exponential(e) => {
                    self.rollups.exponential_sample(&id, e);
                }
                crate::histogram::Histogram::Explicit(x) => {
                    let sum = h.integer_sum().unwrap_or_else(|| h.sum().max(0.0) as u128);
                    self.rollups.histogram_sample(
                        &id,
                        &x.bounds_text(),
                        h.count(),
                        sum,
                        x.counts(),
                    );
                }
            }
        }
    }

    /// `series` expired: its open windows are closed now and it is forgotten.
    pub fn forget(&mut self, series: &str) {
        self.rollups.forget(series, &mut self.closed);
    }

    /// Closes the windows that ended by `now_ns`, writes every closed window, then
    /// deletes segments past their TTL. Never fails: faults are counted and logged.
    pub fn tick(&mut self, now_ns: u64) {
        self.expire(now_ns);
        self.rollups.close_due(now_ns, &mut self.closed);
        let mut closed = std::mem::take(&mut self.closed);
        closed.sort_by_key(|p| (p.resolution, p.start_ns));
        let mut frame = Vec::new();
        for p in closed.drain(..) {
            frame.clear();
            segment::encode_frame(&p, &mut frame);
            self.write_point(&p, &frame);
        }
        self.closed = closed;
        for i in 0..3 {
            self.flush_pending(i);
        }
        self.expire(now_ns);
        self.recount();
    }

    /// Queues one encoded window for its resolution's current segment, rolling the
    /// segment and making room under the bound first. Queued windows are written with
    /// one `write` per segment ([`flush_pending`](Self::flush_pending)).
    fn write_point(&mut self, p: &Point, frame: &[u8]) {
        let i = usize::from(p.resolution.0);
        let len = frame.len() as u64;
        if let Some((w, _)) = &self.levels[i].current {
            let queued = self.pending[i].bytes.len() as u64;
            if w.len + queued + len + TRAILER > self.cfg.segment_bytes {
                self.flush_pending(i);
                self.seal_current(i);
            }
        }
        let new_segment = self.levels[i].current.is_none();
        let need = len
            + if new_segment {
                segment::HEADER + TRAILER
            } else {
                0
            };
        if !self.make_room(need) {
            *self
                .stats
                .points_dropped
                .entry(Fault::DiskBound)
                .or_default() += 1;
            return;
        }
        if new_segment {
            let seq = self.levels[i].next_seq;
            // The sequence number moves on even on failure: a file left half-made is
            // never reused.
            self.levels[i].next_seq = seq + 1;
            match segment::Writer::create(&self.dir, p.resolution, seq) {
                Ok(w) => self.levels[i].current = Some((w, 0)),
                Err(e) => {
                    self.write_failed(&e, 1, "creating a segment");
                    return;
                }
            }
        }
        let q = &mut self.pending[i];
        q.bytes.extend_from_slice(frame);
        q.count += 1;
        q.newest_end_ns = q
            .newest_end_ns
            .max(p.start_ns.saturating_add(p.resolution.step_ns()));
    }

    /// Writes the windows queued for resolution `i` in one append.
    fn flush_pending(&mut self, i: usize) {
        if self.pending[i].count == 0 {
            return;
        }
        let q = std::mem::take(&mut self.pending[i]);
        let result = match &mut self.levels[i].current {
            Some((w, newest)) => w.append(&q.bytes, q.count).map(|()| {
                *newest = (*newest).max(q.newest_end_ns);
            }),
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                self.stats.points_written += q.count;
                if let Some(f) = self.failing.take() {
                    log(format_args!("writes succeed again (after {})", f.name()));
                }
            }
            Err(e) => {
                self.write_failed(&e, q.count, "appending windows");
                // What this segment holds stays; new windows go to a new one.
                self.seal_current(i);
            }
        }
        // Keep the buffer's allocation for the next tick.
        let mut bytes = q.bytes;
        bytes.clear();
        self.pending[i].bytes = bytes;
    }

    fn write_failed(&mut self, e: &io::Error, points: u64, what: &str) {
        let fault = Fault::of(e);
        *self.stats.write_errors.entry(fault).or_default() += 1;
        *self.stats.points_dropped.entry(fault).or_default() += points;
        if self.failing != Some(fault) {
            log(format_args!(
                "{what} in {} failed ({}): {e}; {points} windows dropped, draining continues",
                self.dir.display(),
                fault.name()
            ));
            self.failing = Some(fault);
        }
    }

    fn seal_current(&mut self, i: usize) {
        let Some((w, newest_end_ns)) = self.levels[i].current.take() else {
            return;
        };
        let (path, len) = (w.path.clone(), w.len);
        let bytes = match w.seal() {
            Ok(n) => n,
            Err(e) => {
                // Left dirty: the next replay cuts and seals it.
                self.write_failed(&e, 0, "sealing a segment");
                len + TRAILER
            }
        };
        self.levels[i].sealed.push_back(Sealed {
            path,
            bytes,
            newest_end_ns,
        });
    }

    /// Deletes sealed segments (the finest resolution's oldest first) until `need` more bytes fit
    /// under the bound. False: they do not fit even with every sealed segment gone.
    fn make_room(&mut self, need: u64) -> bool {
        loop {
            self.recount();
            if self.stats.bytes + need <= self.cfg.max_bytes {
                return true;
            }
            // The finest resolution first: its windows are the most numerous and the
            // coarser ones summarize the same time for longer.
            let Some(i) = (0..3).find(|&i| !self.levels[i].sealed.is_empty()) else {
                return false;
            };
            if self.delete_front(i) {
                self.stats.deleted_bound += 1;
            } else {
                return false;
            }
        }
    }

    fn delete_front(&mut self, i: usize) -> bool {
        let Some(s) = self.levels[i].sealed.pop_front() else {
            return false;
        };
        match fs::remove_file(&s.path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => {
                log(format_args!("{}: could not delete: {e}", s.path.display()));
                self.levels[i].sealed.push_front(s);
                false
            }
        }
    }

    /// Deletes every sealed segment whose newest window is past its resolution's TTL.
    fn expire(&mut self, now_ns: u64) {
        for res in Resolution::ALL {
            let i = usize::from(res.0);
            let ttl = self.cfg.ttl_ns(res);
            let mut k = 0;
            while k < self.levels[i].sealed.len() {
                let s = &self.levels[i].sealed[k];
                if s.newest_end_ns.saturating_add(ttl) <= now_ns {
                    if let Some(s) = self.levels[i].sealed.remove(k) {
                        match fs::remove_file(&s.path) {
                            Ok(()) => self.stats.deleted_ttl += 1,
                            Err(e) => {
                                log(format_args!("{}: could not delete: {e}", s.path.display()));
                                self.levels[i].sealed.insert(k, s);
                                k += 1;
                            }
                        }
                    }
                } else {
                    k += 1;
                }
            }
        }
    }

    /// A clean stop: writes every window still open (a part of it: a later daemon's
    /// part of the same window is merged with it when read), then seals every current
    /// segment.
    pub fn close(mut self) {
        self.rollups.close_due(u64::MAX, &mut self.closed);
        let mut closed = std::mem::take(&mut self.closed);
        closed.sort_by_key(|p| (p.resolution, p.start_ns));
        let mut frame = Vec::new();
        for p in closed.drain(..) {
            frame.clear();
            segment::encode_frame(&p, &mut frame);
            self.write_point(&p, &frame);
        }
        for i in 0..3 {
            self.flush_pending(i);
            self.seal_current(i);
        }
    }

    /// The health series of the store.
    pub fn health(&self) -> Vec<HealthRow> {
        let s = &self.stats;
        let mut h = vec![
            (
                false,
                "metricsd.retention.bytes",
                vec![],
                i128::from(s.bytes),
            ),
            (
                false,
                "metricsd.retention.segments",
                vec![],
                i128::from(s.segments),
            ),
            (
                true,
                "metricsd.retention.points.written",
                vec![],
                i128::from(s.points_written),
            ),
            (
                true,
                "metricsd.retention.segments.deleted",
                vec![("reason", "ttl".to_owned())],
                i128::from(s.deleted_ttl),
            ),
            (
                true,
                "metricsd.retention.segments.deleted",
                vec![("reason", "disk_bound".to_owned())],
                i128::from(s.deleted_bound),
            ),
        ];
        for (outcome, n) in [
            ("clean", s.replay_clean),
            ("torn_tail", s.replay_torn),
            ("corrupt", s.replay_corrupt),
        ] {
            h.push((
                true,
                "metricsd.retention.replay",
                vec![("outcome", outcome.to_owned())],
                i128::from(n),
            ));
        }
        for (f, n) in &s.points_dropped {
            h.push((
                true,
                "metricsd.retention.points.dropped",
                vec![("reason", f.name().to_owned())],
                i128::from(*n),
            ));
        }
        for (f, n) in &s.write_errors {
            h.push((
                true,
                "metricsd.retention.write_errors",
                vec![("reason", f.name().to_owned())],
                i128::from(*n),
            ));
        }
        h
    }

    /// Answers a range query from memory (open windows) and disk (closed ones).
    pub fn query(&self, q: &Query, now_ns: u64) -> Result<Vec<QuerySeries>, QueryError> {
        let res = q.resolution()?;
        let mut points = read_points(&self.dir, res, |s| q.selector.matches(s));
        points.extend(self.rollups.open_points(res, |s| q.selector.matches(s)));
        Ok(q.assemble(points, now_ns))
    }
}

/// Every point of `res` under `dir` whose series `select` accepts, read from the
/// segments (damaged ones up to the damage). Two points of one series and window are
/// two parts of it (a series that expired and came back within the window) and are
/// merged; replay never writes a point again, so this counts nothing twice. Reading
/// never changes a segment.
pub fn read_points(
    dir: &std::path::Path,
    res: Resolution,
    mut select: impl FnMut(&str) -> bool,
) -> Vec<Point> {
    let mut out: BTreeMap<(Arc<str>, u64), Point> = BTreeMap::new();
    for (_, path) in segment::list(dir, res).unwrap_or_default() {
        let Ok(scan) = segment::scan(&path) else {
            continue;
        };
        for p in scan.points {
            if p.resolution == res && select(&p.series) {
                match out.get_mut(&(p.series.clone(), p.start_ns)) {
                    // A kind or layout change within one window keeps the first part.
                    Some(q) => {
                        let _ = q.agg.merge(&p.agg);
                    }
                    None => {
                        out.insert((p.series.clone(), p.start_ns), p);
                    }
                }
            }
        }
    }
    out.into_values().collect()
}

/// Which series a query asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// One series by its id (`<service>/<kind>/<name>{k="v",...}`).
    Series(String),
    /// A metric name and label matchers: `name` or `name{k="v",...}`; every series of
    /// that name (any service, any kind) whose labels include every pair given.
    Labels {
        /// The metric name.
        name: String,
        /// Label pairs that must match.
        labels: Vec<(String, String)>,
    },
}

/// A query that could not be answered; the message names the bad input and the
/// expected form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryError(pub String);

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QueryError {}

/// Parses `name{k="v",...}` (`"` and `\` in values escaped with `\`) into a name and
/// sorted label pairs; `name` alone has none.
pub fn parse_labels(s: &str) -> Option<(String, Vec<(String, String)>)> {
    let Some(open) = s.find('{') else {
        return (!s.is_empty()).then(|| (s.to_owned(), Vec::new()));
    };
    let name = &s[..open];
    let body = s[open + 1..].strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next() != Some('"') || key.is_empty() {
            return None;
        }
        let mut value = String::new();
        let mut closed = false;
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.push(chars.next()?),
                '"' => {
                    closed = true;
                    break;
                }
                c => value.push(c),
            }
        }
        if !closed {
            return None;
        }
        labels.push((key.trim().to_owned(), value));
        match chars.next() {
            None => break,
            Some(',') => {}
            Some(_) => return None,
        }
    }
    labels.sort();
    (!name.is_empty()).then(|| (name.to_owned(), labels))
}

impl Selector {
    /// Parses a selector: `name` or `name{k="v",...}`.
    pub fn parse(s: &str) -> Result<Self, QueryError> {
        let (name, labels) = parse_labels(s).ok_or_else(|| {
            QueryError(format!(
                "selector {s:?}: expected a metric name, optionally with labels: name{{k=\"v\",...}}"
            ))
        })?;
        Ok(Self::Labels { name, labels })
    }

    /// Whether the series `id` is selected.
    pub fn matches(&self, id: &str) -> bool {
        match self {
            Self::Series(s) => s == id,
            Self::Labels { name, labels } => {
                // <service>/<kind>/<name>{...}
                let mut parts = id.splitn(3, '/');
                let (Some(_), Some(_), Some(rest)) = (parts.next(), parts.next(), parts.next())
                else {
                    return false;
                };
                let Some((n, have)) = parse_labels(rest) else {
                    return false;
                };
                n == *name && labels.iter().all(|l| have.contains(l))
            }
        }
    }
}

/// A range query: which series, how far back, at what step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// Which series.
    pub selector: Selector,
    /// How far back from now, ns.
    pub since_ns: u64,
    /// The step, ns: a multiple of a resolution's step (10 s, 1 min or 1 h).
    pub step_ns: u64,
}

/// One series' answer: a point per step that had data.
#[derive(Clone, Debug, PartialEq)]
pub struct QuerySeries {
    /// The series id.
    pub series: Arc<str>,
    /// (step start ns, aggregate), in time order.
    pub points: Vec<(u64, Agg)>,
}

/// Parses a duration: a number and a unit `s`, `m`, `h` or `d` (`90s`, `1m`, `6h`).
pub fn parse_duration(s: &str) -> Result<u64, QueryError> {
    let bad = || {
        QueryError(format!(
            "duration {s:?}: expected a positive number and a unit s, m, h or d (e.g. 6h, 1m, 10s)"
        ))
    };
    let unit = s.chars().last().ok_or_else(bad)?;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(bad());
    }
    n.checked_mul(mult)
        .and_then(|v| v.checked_mul(SECOND_NS))
        .ok_or_else(bad)
}

impl Query {
    /// The coarsest resolution whose step divides the query's step.
    pub fn resolution(&self) -> Result<Resolution, QueryError> {
        Resolution::ALL
            .iter()
            .rev()
            .find(|r| self.step_ns >= r.step_ns() && self.step_ns % r.step_ns() == 0)
            .copied()
            .ok_or_else(|| {
                QueryError(format!(
                    "step {} s: expected a multiple of 10s (rollups are kept at 10s, 1m and 1h)",
                    self.step_ns / SECOND_NS
                ))
            })
    }

    /// Groups `points` (of one resolution) into steps within `[now - since, now)`.
    pub fn assemble(&self, points: Vec<Point>, now_ns: u64) -> Vec<QuerySeries> {
        let from = now_ns.saturating_sub(self.since_ns);
        let mut out: BTreeMap<Arc<str>, BTreeMap<u64, Agg>> = BTreeMap::new();
        for Point {
            series,
            start_ns: start,
            agg,
            ..
        } in points
        {
            if start < from || start >= now_ns {
                // Windows starting outside the range are left out whole.
                continue;
            }
            let step = start - start % self.step_ns;
            let steps = out.entry(series).or_default();
            match steps.get_mut(&step) {
                Some(a) => {
                    // Points come in time order per source (disk, then the open
                    // windows, which are newer). A kind or layout change inside one
                    // step keeps the earlier.
                    let _ = a.merge(&agg);
                }
                None => {
                    steps.insert(step, agg);
                }
            }
        }
        out.into_iter()
            .map(|(series, steps)| QuerySeries {
                series,
                points: steps.into_iter().collect(),
            })
            .collect()
    }
}

/// Writes a query's answer: one line per step (`<series> <start_ns> <fields>`), or with
/// `json` one object per series: `{"series", "kind", "step_ns", "points": [{"start_ns",
/// ...}]}` with a counter's `delta`, a gauge's `last`, `min`, `max`, `mean` and
/// `count`, a histogram's `count`, `sum`, `bounds` and `buckets`.
pub fn render(
    answer: &[QuerySeries],
    step_ns: u64,
    json: bool,
    out: &mut dyn io::Write,
) -> io::Result<()> {
    for s in answer {
        let kind = s.points.first().map_or("", |(_, a)| a.kind_name());
        if json {
            let points: Vec<serde_json::Value> = s
                .points
                .iter()
                .map(|(t, a)| {
                    let mut v = agg_json(a);
                    if let Some(o) = v.as_object_mut() {
                        o.insert("start_ns".into(), (*t).into());
                    }
                    v
                })
                .collect();
            let obj = serde_json::json!({
                "series": &*s.series,
                "kind": kind,
                "step_ns": step_ns,
                "points": points,
            });
            writeln!(out, "{obj}")?;
        } else {
            for (t, a) in &s.points {
                let fields = agg_json(a)
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .map(|(k, v)| match v {
                                serde_json::Value::String(s) => format!("{k}={s}"),
                                v => format!("{k}={v}"),
                            })
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                writeln!(out, "{} {t} {fields}", s.series)?;
            }
        }
    }
    Ok(())
}

/// An aggregate's fields as JSON (128-bit numbers as decimal strings).
pub fn agg_json(a: &Agg) -> serde_json::Value {
    match a {
        Agg::Counter { delta } => serde_json::json!({ "delta": delta.to_string() }),
        Agg::Gauge {
            last,
            min,
            max,
            sum,
            count,
        } => {
            let mean = if *count == 0 {
                0.0
            } else {
                *sum as f64 / *count as f64
            };
            serde_json::json!({ "last": last, "min": min, "max": max, "mean": mean, "count": count })
        }
        Agg::Exponential(h) => {
            let csv = |c: &[u64]| c.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
            serde_json::json!({
                "count": h.count(),
                "sum": h.sum(),
                "scale": h.scale(),
                "zero_count": h.zero_count(),
                "positive_offset": h.positive().offset(),
                "positive_buckets": csv(h.positive().counts()),
                "negative_offset": h.negative().offset(),
                "negative_buckets": csv(h.negative().counts()),
            })
        }
        Agg::Histogram {
            bounds,
            count,
            sum,
            buckets,
        } => serde_json::json!({
            "count": count,
            "sum": sum.to_string(),
            "bounds": &**bounds,
            "buckets": buckets.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
        }),
    }
}

/// The windows a running daemon still holds open (or closed but not yet written),
/// rebuilt from its export records in logd: the same inputs the daemon's rollups take,
/// so the same windows. `records` in logd order; only windows of `res` that start
/// after the newest window `disk` has for the series are returned (disk wins where it
/// has the window). Expired-series records and metricsd's own health series are not
/// rollup inputs and are skipped. A histogram's first record in `records` only sets
/// the baseline for the next one, unless the series started within that record's
/// window (then its cumulative counts are the window's).
pub fn windows_from_exports(
    records: &[logd::StoredRecord],
    disk: &[Point],
    res: Resolution,
    mut select: impl FnMut(&str) -> bool,
) -> Vec<Point> {
    let mut newest_on_disk: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for p in disk {
        let e = newest_on_disk.entry(&p.series).or_insert(0);
        *e = (*e).max(p.start_ns.saturating_add(1));
    }
    let after =
        |series: &str, start: u64| start >= newest_on_disk.get(series).copied().unwrap_or(0);
    let mut rollups = Rollups::new();
    let mut closed = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for stored in records {
        let r = &stored.record;
        let (Some(series), Some(end)) = (
            r.get("series"),
            r.get("window_end_ns").and_then(|v| v.parse::<u64>().ok()),
        ) else {
            continue;
        };
        if r.get("expired") == Some("true")
            || r.get("producer_service") == Some(crate::schema::HEALTH_SERVICE)
            || !select(series)
        {
            continue;
        }
        let num = |k: &str| r.get(k).and_then(|v| v.parse::<u128>().ok());
        let sample = match r.get("kind") {
            Some("counter") => num("delta").map(crate::rollup::Sample::Counter),
            Some("gauge") => r
                .get("value")
                .and_then(|v| v.parse::<i64>().ok())
                .map(crate::rollup::Sample::Gauge),
            Some("histogram" | "span_duration") if r.get("scale").is_some() => {
                let Some(now) = exponential_of(r) else {
                    continue;
                };
                let sample = rollups.exponential_sample(series, &now);
                let first = seen.insert(series.to_owned());
                let started_within = num("start_ns")
                    .zip(num("window_start_ns"))
                    .is_some_and(|(s, w)| s >= w);
                if first && !started_within {
                    continue;
                }
                Some(sample)
            }
            Some("histogram" | "span_duration") => {
                let buckets: Option<Vec<u64>> = r
                    .get("buckets")
                    .map(|b| b.split(',').map(|c| c.parse().ok()).collect())
                    .unwrap_or(None);
                let (Some(count), Some(sum), Some(bounds), Some(buckets)) = (
                    num("count").and_then(|c| u64::try_from(c).ok()),
                    num("sum"),
                    r.get("bounds"),
                    buckets,
                ) else {
                    continue;
                };
                let sample = rollups.histogram_sample(series, bounds, count, sum, &buckets);
                let first = seen.insert(series.to_owned());
                let started_within = num("start_ns")
                    .zip(num("window_start_ns"))
                    .is_some_and(|(s, w)| s >= w);
                if first && !started_within {
                    continue;
                }
                Some(sample)
            }
            _ => None,
        };
        let Some(sample) = sample else {
            continue;
        };
        if after(series, res.window_of(end)) {
            rollups.observe(series, &sample, end, &mut closed);
        }
    }
    rollups.close_due(u64::MAX, &mut closed);
    closed.retain(|p| p.resolution == res && after(&p.series, p.start_ns));
    closed
}

/// An exponential histogram from its exported fields (`scale`, `zero_count`, `sum`,
/// `positive_offset`/`positive_buckets`, `negative_offset`/`negative_buckets`; a side
/// without buckets is absent).
fn exponential_of(r: &logd::Record) -> Option<crate::histogram::Exponential> {
    let side = |name: &str| -> Option<(i32, Vec<u64>)> {
        match r.get(&format!("{name}_buckets")) {
            None => Some((0, Vec::new())),
            Some(csv) => {
                let offset = r.get(&format!("{name}_offset"))?.parse().ok()?;
                let counts: Option<Vec<u64>> = csv.split(',').map(|c| c.parse().ok()).collect();
                Some((offset, counts?))
            }
        }
    };
    crate::histogram::Exponential::from_parts(
        r.get("scale")?.parse().ok()?,
        r.get("zero_count")?.parse().ok()?,
        side("positive")?,
        side("negative")?,
        r.get("sum")?.parse().ok()?,
        None,
    )
}
