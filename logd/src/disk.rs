//! The on-disk journal: append-only segment files, a CRC-32 per record, rotation and
//! retention by size, recovery with torn-tail detection.
//!
//! A segment is `<first id, 20 digits>.seg`: the 8-byte magic `LOGDSEG1`, then entries
//! `u32 len, u32 crc32(payload), payload` where the payload is a stored record encoded as
//! in QUERY_OK. Records are written (one `write` per APPEND) before the APPEND is
//! acknowledged. With `fsync`, the server makes them durable after the write and before
//! the reply, outside its lock, one `fdatasync` for every APPEND written meanwhile
//! ([`Disk::sync_point`]; group commit).

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::JournalConfig;
use crate::frame::{self, Dec};
use crate::journal::Journal;
use crate::record::StoredRecord;

/// Segment file magic.
pub const MAGIC: &[u8; 8] = b"LOGDSEG1";
const ENTRY_HEADER: usize = 8;

struct Segment {
    first_id: u64,
    path: PathBuf,
    bytes: u64,
    /// The largest record id written to it (`u64::MAX`: unknown, a recovered segment).
    max_id: u64,
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Records read back, by id (duplicates from copy-forward merged).
    pub records: BTreeMap<u64, StoredRecord>,
    /// Torn or corrupt entries skipped (a torn tail counts once).
    pub corrupt: u64,
}

/// The open on-disk journal.
pub struct Disk {
    dir: PathBuf,
    segments: VecDeque<Segment>,
    /// Shared with the syncing thread of a group commit (see [`Disk::sync_point`]).
    active: Option<Arc<File>>,
    /// Bytes written since open, in all segments: the position a sync point names.
    written: u64,
    segment_bytes: u64,
    max_bytes: u64,
    max_entry: u64,
    fsync: bool,
    buf: Vec<u8>,
}

/// Why the disk journal failed.
#[derive(Debug)]
pub struct DiskError {
    /// What was being done.
    pub what: String,
    /// The OS error.
    pub source: io::Error,
}

impl core::fmt::Display for DiskError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for DiskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn ctx<T>(r: io::Result<T>, what: impl FnOnce() -> String) -> Result<T, DiskError> {
    r.map_err(|source| DiskError {
        what: what(),
        source,
    })
}

fn segment_name(first_id: u64) -> String {
    format!("{first_id:020}.seg")
}

impl Disk {
    /// Opens (creating) the directory and recovers every segment. A torn tail of the
    /// newest segment is cut off so new entries follow the last good one.
    pub fn open(
        dir: &Path,
        cfg: &JournalConfig,
        max_entry: u64,
    ) -> Result<(Disk, Recovered), DiskError> {
        ctx(fs::create_dir_all(dir), || {
            format!("cannot create journal dir {}", dir.display())
        })?;
        let mut found = Vec::new();
        let rd = ctx(fs::read_dir(dir), || {
            format!("cannot list journal dir {}", dir.display())
        })?;
        for ent in rd {
            let ent = ctx(ent, || format!("cannot list journal dir {}", dir.display()))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(stem) = name.strip_suffix(".seg") else {
                continue;
            };
            if stem.len() != 20 {
                continue;
            }
            if let Ok(first_id) = stem.parse::<u64>() {
                found.push((first_id, ent.path()));
            }
        }
        found.sort();
        let mut rec = Recovered::default();
        let mut segments = VecDeque::new();
        let n = found.len();
        for (i, (first_id, path)) in found.into_iter().enumerate() {
            let data = ctx(fs::read(&path), || {
                format!("cannot read {}", path.display())
            })?;
            let good = scan(&data, max_entry, &mut rec);
            let mut bytes = data.len() as u64;
            if good < data.len() && i + 1 == n {
                // Torn tail of the newest segment: cut it so appends follow good data.
                let f = ctx(OpenOptions::new().write(true).open(&path), || {
                    format!("cannot open {} to cut its torn tail", path.display())
                })?;
                ctx(f.set_len(good as u64), || {
                    format!("cannot cut torn tail of {}", path.display())
                })?;
                ctx(f.sync_all(), || format!("cannot sync {}", path.display()))?;
                bytes = good as u64;
            }
            segments.push_back(Segment {
                first_id,
                path,
                bytes,
                max_id: u64::MAX,
            });
        }
        // Append to the newest segment if it has a valid header and room.
        let mut active = None;
        if let Some(last) = segments.back() {
            if last.bytes >= MAGIC.len() as u64 && last.bytes < cfg.segment_bytes {
                active = Some(Arc::new(ctx(
                    OpenOptions::new().append(true).open(&last.path),
                    || format!("cannot open {}", last.path.display()),
                )?));
            }
        }
        let disk = Disk {
            dir: dir.to_owned(),
            segments,
            active,
            written: 0,
            segment_bytes: cfg.segment_bytes,
            max_bytes: cfg.disk_max_bytes,
            max_entry,
            fsync: cfg.fsync,
            buf: Vec::new(),
        };
        Ok((disk, rec))
    }

    /// Bytes in all segments.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Number of segments.
    pub fn segments(&self) -> u64 {
        self.segments.len() as u64
    }

    /// Writes records (one `write`); with `fsync` the caller then waits for a sync past
    /// [`Disk::sync_point`]. On error nothing may be acknowledged; a partial write is a
    /// torn tail that recovery skips.
    pub fn append(&mut self, recs: &[StoredRecord]) -> Result<(), DiskError> {
        let Some(first) = recs.first() else {
            return Ok(());
        };
        let need_new = match (&self.active, self.segments.back()) {
            (Some(_), Some(s)) => s.bytes >= self.segment_bytes,
            _ => true,
        };
        if need_new {
            self.rotate(first.id)?;
        }
        self.buf.clear();
        for r in recs {
            let start = self.buf.len();
            self.buf.extend_from_slice(&[0; ENTRY_HEADER]);
            frame::put_stored(&mut self.buf, r);
            let payload = self.buf.get(start + ENTRY_HEADER..).unwrap_or_default();
            let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
            let crc = crc32fast::hash(payload);
            if let Some(h) = self.buf.get_mut(start..start + ENTRY_HEADER) {
                h[..4].copy_from_slice(&len.to_le_bytes());
                h[4..].copy_from_slice(&crc.to_le_bytes());
            }
        }
        let (Some(f), Some(seg)) = (self.active.as_deref(), self.segments.back_mut()) else {
            return Err(DiskError {
                what: "no active segment".into(),
                source: io::Error::other("rotation left no segment"),
            });
        };
        let path = &seg.path;
        let mut f = f;
        ctx(f.write_all(&self.buf), || {
            format!("cannot write {}", path.display())
        })?;
        seg.bytes += self.buf.len() as u64;
        seg.max_id = recs.iter().fold(seg.max_id, |m, r| m.max(r.id));
        self.written += self.buf.len() as u64;
        Ok(())
    }

    /// Whether every APPEND waits for an `fdatasync` (`journal.fsync`).
    pub fn fsync(&self) -> bool {
        self.fsync
    }

    /// The active segment and the bytes written so far: an `fdatasync` of that file
    /// makes everything written up to that count durable (a segment is synced whole
    /// when it is rotated out, before anything is written to the next).
    pub fn sync_point(&self) -> Option<(Arc<File>, u64)> {
        self.active.as_ref().map(|f| (Arc::clone(f), self.written))
    }

    fn rotate(&mut self, first_id: u64) -> Result<(), DiskError> {
        if let Some(f) = self.active.take() {
            ctx(f.sync_all(), || "cannot sync the finished segment".into())?;
        }
        let mut first_id = first_id;
        // Copy-forward can make a new segment's first id older than an existing name.
        if let Some(last) = self.segments.back() {
            first_id = first_id.max(last.first_id + 1);
        }
        let path = self.dir.join(segment_name(first_id));
        let mut f = ctx(
            OpenOptions::new().create_new(true).append(true).open(&path),
            || format!("cannot create {}", path.display()),
        )?;
        ctx(f.write_all(MAGIC), || {
            format!("cannot write {}", path.display())
        })?;
        ctx(File::open(&self.dir).and_then(|d| d.sync_all()), || {
            format!("cannot sync dir {}", self.dir.display())
        })?;
        self.segments.push_back(Segment {
            first_id,
            path,
            bytes: MAGIC.len() as u64,
            max_id: 0,
        });
        self.active = Some(Arc::new(f));
        Ok(())
    }

    /// Retires the oldest segments while all segments exceed `disk_max_bytes`: records
    /// in them that the in-memory journal still holds are copied forward first, so disk
    /// retention never drops what fair-share eviction kept.
    pub fn enforce_retention(&mut self, journal: &Journal) -> Result<(), DiskError> {
        let mut rounds = self.segments.len();
        while self.bytes() > self.max_bytes && self.segments.len() > 1 && rounds > 0 {
            rounds -= 1;
            let Some(oldest) = self.segments.pop_front() else {
                break;
            };
            // If memory holds no id as old as the segment's newest, nothing in it is
            // copied forward and the file need not be read.
            if journal.first_id().is_none_or(|held| held > oldest.max_id) {
                ctx(fs::remove_file(&oldest.path), || {
                    format!("cannot remove {}", oldest.path.display())
                })?;
                continue;
            }
            let data = ctx(fs::read(&oldest.path), || {
                format!("cannot read {}", oldest.path.display())
            })?;
            let mut rec = Recovered::default();
            scan(&data, self.max_entry, &mut rec);
            let live: Vec<StoredRecord> = rec
                .records
                .into_values()
                .filter(|r| journal.contains(r.id))
                .collect();
            if !live.is_empty() {
                let copied = self.append(&live).and_then(|()| match &self.active {
                    // With fsync, the copies are durable before their old segment goes.
                    Some(f) if self.fsync => {
                        ctx(f.sync_data(), || "cannot sync the active segment".into())
                    }
                    _ => Ok(()),
                });
                if let Err(e) = copied {
                    self.segments.push_front(oldest);
                    return Err(e);
                }
            }
            ctx(fs::remove_file(&oldest.path), || {
                format!("cannot remove {}", oldest.path.display())
            })?;
        }
        Ok(())
    }

    /// The segment files, oldest first, and the largest entry a segment may hold (what
    /// [`read_range`] needs, taken under the server's lock and read without it).
    pub fn snapshot(&self) -> (Vec<PathBuf>, u64) {
        (
            self.segments.iter().map(|s| s.path.clone()).collect(),
            self.max_entry,
        )
    }

    /// Syncs the active segment (clean shutdown).
    pub fn sync(&mut self) -> Result<(), DiskError> {
        if let Some(f) = &self.active {
            ctx(f.sync_all(), || "cannot sync the active segment".into())?;
        }
        Ok(())
    }
}

/// The records with `after < id <= upto` that `keep` accepts, read from the segment
/// files `paths`, at most `max` of them (the smallest ids), in id order. A segment that
/// cannot be read (retired meanwhile) is skipped; damaged entries are skipped as in
/// recovery. Memory: at most `max` records.
pub fn read_range(
    paths: &[PathBuf],
    max_entry: u64,
    after: u64,
    upto: u64,
    max: usize,
    mut keep: impl FnMut(&StoredRecord) -> bool,
) -> BTreeMap<u64, StoredRecord> {
    let mut out = BTreeMap::new();
    for path in paths {
        let Ok(data) = fs::read(path) else {
            continue;
        };
        let mut rec = Recovered::default();
        scan(&data, max_entry, &mut rec);
        for (id, r) in rec.records.range(after.saturating_add(1)..=upto) {
            if out.len() >= max && out.last_key_value().is_some_and(|(last, _)| last < id) {
                break;
            }
            if keep(r) {
                out.insert(*id, r.clone());
                if out.len() > max {
                    out.pop_last();
                }
            }
        }
    }
    out
}

/// Reads entries from a segment's bytes into `rec`; returns the offset after the last
/// entry that could be framed (where a torn tail starts). A framed entry whose checksum
/// or contents are bad is skipped and counted; an unframeable one ends the scan.
fn scan(data: &[u8], max_entry: u64, rec: &mut Recovered) -> usize {
    if data.get(..MAGIC.len()) != Some(MAGIC.as_slice()) {
        if !data.is_empty() {
            rec.corrupt += 1;
        }
        return 0;
    }
    let mut pos = MAGIC.len();
    while pos < data.len() {
        let Some(h) = data.get(pos..pos + ENTRY_HEADER) else {
            rec.corrupt += 1;
            return pos;
        };
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let start = pos + ENTRY_HEADER;
        let end = start.saturating_add(len as usize);
        let payload = match data.get(start..end) {
            Some(p) if u64::from(len) <= max_entry => p,
            _ => {
                rec.corrupt += 1;
                return pos;
            }
        };
        if crc32fast::hash(payload) == crc {
            let mut d = Dec::new(payload);
            match frame::get_stored(&mut d).and_then(|r| d.end().map(|()| r)) {
                Ok(r) => {
                    rec.records.entry(r.id).or_insert(r);
                }
                Err(_) => rec.corrupt += 1,
            }
        } else {
            rec.corrupt += 1;
        }
        pos = end;
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Identity, Level, Record};

    fn rec(id: u64) -> StoredRecord {
        StoredRecord {
            id,
            received_ns: id,
            sender: Identity {
                service: "s".into(),
                pid: 1,
                uid: 0,
                gid: 0,
            },
            record: Record::new(Level::Info, "x", format!("m{id}")),
        }
    }

    #[test]
    fn scan_skips_bad_crc_and_stops_at_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = JournalConfig::default();
        let (mut d, r) = Disk::open(dir.path(), &cfg, 1 << 20).unwrap();
        assert!(r.records.is_empty());
        d.append(&[rec(1), rec(2), rec(3)]).unwrap();
        drop(d);
        let path = dir.path().join(segment_name(1));
        let mut data = fs::read(&path).unwrap();
        // Flip a byte inside record 2's payload, then add a torn half entry.
        let one = ENTRY_HEADER + frame::stored_record_len(&rec(1));
        data[MAGIC.len() + one + ENTRY_HEADER + 3] ^= 0xff;
        data.extend_from_slice(&[200, 0, 0, 0, 1, 2]);
        fs::write(&path, &data).unwrap();
        let (_d, r) = Disk::open(dir.path(), &cfg, 1 << 20).unwrap();
        assert_eq!(r.records.keys().copied().collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(r.corrupt, 2);
        assert_eq!(fs::metadata(&path).unwrap().len() as usize, data.len() - 6);
    }

    #[test]
    fn retention_copies_forward_what_memory_holds_and_drops_the_rest_unread() {
        use crate::quota::SenderKey;
        let dir = tempfile::tempdir().unwrap();
        let one = (ENTRY_HEADER + frame::stored_record_len(&rec(1))) as u64;
        let cfg = JournalConfig {
            segment_bytes: 10 * one,
            disk_max_bytes: 30 * one,
            ..JournalConfig::default()
        };
        let (mut d, _) = Disk::open(dir.path(), &cfg, 1 << 20).unwrap();
        let key = SenderKey {
            service: "s".into(),
            pid: Some(1),
        };
        // Memory holds record 1 and the newest ten, as fair-share eviction may leave it.
        let mut journal = Journal::new(11, u64::MAX);
        journal.insert(key.clone(), rec(1));
        for id in 1..=100 {
            d.append(&[rec(id)]).unwrap();
            if id > 90 {
                journal.insert(key.clone(), rec(id));
            }
            d.enforce_retention(&journal).unwrap();
        }
        assert!(d.bytes() <= 30 * one + 10 * one, "{} bytes", d.bytes());
        drop(d);
        let (_d, r) = Disk::open(dir.path(), &cfg, 1 << 20).unwrap();
        let ids: Vec<u64> = r.records.keys().copied().collect();
        assert!(ids.contains(&1), "record 1 was copied forward: {ids:?}");
        assert!((91..=100).all(|id| ids.contains(&id)), "{ids:?}");
        assert!(
            !ids.contains(&2),
            "what memory does not hold is retired: {ids:?}"
        );
    }
}
