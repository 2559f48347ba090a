//! Rollup segments on disk: append-only files of checksummed frames, sealed when full,
//! deleted whole.
//!
//! A segment holds closed rollup windows ([`Point`]s) of one resolution, in
//! `<dir>/<resolution>/<seq>.seg` (`seq` 16 hex digits, increasing per resolution):
//!
//! | part | bytes | content |
//! | --- | --- | --- |
//! | header | 32 | magic `NXROLL\0\x01`, format version (u32, 1), resolution index (u32), sequence number (u64), CRC-32 of the previous 24 bytes (u32), zero (u32) |
//! | frame | 8 + n | payload length n (u32, at most [`MAX_FRAME`]), CRC-32 of the payload (u32), the payload: one point |
//! | trailer | 16 | `0xFFFF_FFFF`, CRC-32 of the next 8 bytes, frame count (u64): present only once the segment is sealed (clean) |
//!
//! All integers little-endian. A point's payload: resolution (u8), kind (u8: 1 counter,
//! 2 gauge, 3 histogram), series id length (u16) and bytes, window start (u64), then a
//! counter's delta (u128); a gauge's last, min, max (i64), sum (i128) and count (u64);
//! a histogram's count (u64), sum (u128), bounds text length (u16) and bytes, bucket
//! count (u16) and counts (u64 each); an exponential histogram's (kind 4) scale (i32),
//! zero count (u64), sum (f64 bits), then per side (positive, negative) the first
//! bucket's index (i32), bucket count (u16) and counts (u64 each).
//!
//! A segment without a trailer is dirty: the one being written, or one a crash left
//! behind. [`scan`] reads every frame whose checksum holds and reports how the file
//! ends: sealed, dirty, a torn tail (a frame cut short, as a crash mid-write leaves) or
//! corrupt (a frame whose checksum fails with more data after it, a bad trailer or a
//! bad header). Replay keeps the good frames before the problem, cuts the file there and
//! seals it, so a second replay finds a clean segment and reads the same points:
//! replay is idempotent: it never writes a point again. Two points of the same series,
//! resolution and window are two parts of that window (a series that expired and came
//! back within it) and a reader merges them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::rollup::{Agg, Point, Resolution};

/// The magic at the start of every segment.
pub const MAGIC: [u8; 8] = *b"NXROLL\0\x01";
/// The segment format version.
pub const VERSION: u32 = 1;
/// Header bytes.
pub const HEADER: u64 = 32;
/// Trailer bytes (reserved in every unsealed segment's size accounting).
pub const TRAILER: u64 = 16;
/// Largest frame payload: a point with a 64 KiB series id and 160 buckets is far below.
pub const MAX_FRAME: u32 = 1 << 20;
const TRAILER_MARK: u32 = u32::MAX;

/// How a scanned segment ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// A valid trailer, nothing after it.
    Sealed,
    /// Whole frames and no trailer (being written, or a clean crash between frames).
    Dirty,
    /// A frame cut short at `at` (a crash mid-write): the frames before it are good.
    TornTail {
        /// Where the good part ends.
        at: u64,
    },
    /// Damage at `at` that a torn write does not explain.
    Corrupt {
        /// Where the good part ends (0 with the header itself bad).
        at: u64,
        /// What was wrong.
        why: &'static str,
    },
}

/// What [`scan`] found in one segment.
#[derive(Debug)]
pub struct Scan {
    /// The resolution the header names (`None` with a bad header).
    pub resolution: Option<Resolution>,
    /// The sequence number the header names.
    pub seq: u64,
    /// The points of every good frame, in file order.
    pub points: Vec<Point>,
    /// Bytes of the good part (header and good frames).
    pub good_len: u64,
    /// The file's length.
    pub file_len: u64,
    /// How it ends.
    pub ending: Ending,
}

/// Encodes a segment header.
pub fn header(res: Resolution, seq: u64) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&u32::from(res.0).to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Encodes `point` as one frame (length, checksum, payload) appended to `out`.
pub fn encode_frame(point: &Point, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.push(point.resolution.0);
    let series = point.series.as_bytes();
    let series = &series[..series.len().min(usize::from(u16::MAX))];
    match &point.agg {
        Agg::Counter { delta } => {
            out.push(1);
            put_str(out, series);
            out.extend_from_slice(&point.start_ns.to_le_bytes());
            out.extend_from_slice(&delta.to_le_bytes());
        }
        Agg::Gauge {
            last,
            min,
            max,
            sum,
            count,
        } => {
            out.push(2);
            put_str(out, series);
            out.extend_from_slice(&point.start_ns.to_le_bytes());
            for v in [last, min, max] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&sum.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        Agg::Exponential(h) => {
            out.push(4);
            put_str(out, series);
            out.extend_from_slice(&point.start_ns.to_le_bytes());
            out.extend_from_slice(&h.scale().to_le_bytes());
            out.extend_from_slice(&h.zero_count().to_le_bytes());
            out.extend_from_slice(&h.sum().to_bits().to_le_bytes());
            for side in [h.positive(), h.negative()] {
                out.extend_from_slice(&side.offset().to_le_bytes());
                let n = side.counts().len().min(usize::from(u16::MAX));
                out.extend_from_slice(&(n as u16).to_le_bytes());
                for c in &side.counts()[..n] {
                    out.extend_from_slice(&c.to_le_bytes());
                }
            }
        }
        Agg::Histogram {
            bounds,
            count,
            sum,
            buckets,
        } => {
            out.push(3);
            put_str(out, series);
            out.extend_from_slice(&point.start_ns.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&sum.to_le_bytes());
            let b = bounds.as_bytes();
            put_str(out, &b[..b.len().min(usize::from(u16::MAX))]);
            let n = buckets.len().min(usize::from(u16::MAX));
            out.extend_from_slice(&(n as u16).to_le_bytes());
            for c in &buckets[..n] {
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
    }
    let payload_len = (out.len() - start - 8) as u32;
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s);
}

/// Encodes the trailer of a segment of `frames` frames.
pub fn trailer(frames: u64) -> [u8; TRAILER as usize] {
    let mut t = [0u8; TRAILER as usize];
    t[..4].copy_from_slice(&TRAILER_MARK.to_le_bytes());
    let count = frames.to_le_bytes();
    t[4..8].copy_from_slice(&crc32fast::hash(&count).to_le_bytes());
    t[8..].copy_from_slice(&count);
    t
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn arr<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.arr()?))
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_le_bytes(self.arr()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.arr()?))
    }
    fn u128(&mut self) -> Option<u128> {
        Some(u128::from_le_bytes(self.arr()?))
    }
    fn i128(&mut self) -> Option<i128> {
        Some(i128::from_le_bytes(self.arr()?))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = usize::from(self.u16()?);
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// Decodes one frame's payload (checksum already verified).
pub fn decode_payload(payload: &[u8]) -> Option<Point> {
    let mut c = Cursor(payload);
    let resolution = Resolution::from_index(c.u8()?)?;
    let kind = c.u8()?;
    let series: Arc<str> = Arc::from(c.str()?);
    let start_ns = c.u64()?;
    let agg = match kind {
        1 => Agg::Counter { delta: c.u128()? },
        2 => Agg::Gauge {
            last: c.i64()?,
            min: c.i64()?,
            max: c.i64()?,
            sum: c.i128()?,
            count: c.u64()?,
        },
        3 => {
            let count = c.u64()?;
            let sum = c.u128()?;
            let bounds = Arc::from(c.str()?);
            let n = usize::from(c.u16()?);
            let mut buckets = Vec::with_capacity(n);
            for _ in 0..n {
                buckets.push(c.u64()?);
            }
            Agg::Histogram {
                bounds,
                count,
                sum,
                buckets: buckets.into_boxed_slice(),
            }
        }
        4 => {
            let scale = c.i32()?;
            let zero = c.u64()?;
            let sum = f64::from_bits(c.u64()?);
            let mut sides = [(0i32, Vec::new()), (0i32, Vec::new())];
            for side in &mut sides {
                let offset = c.i32()?;
                let n = usize::from(c.u16()?);
                let mut counts = Vec::with_capacity(n);
                for _ in 0..n {
                    counts.push(c.u64()?);
                }
                *side = (offset, counts);
            }
            let [positive, negative] = sides;
            Agg::Exponential(crate::histogram::Exponential::from_parts(
                scale, zero, positive, negative, sum, None,
            )?)
        }
        _ => return None,
    };
    if !c.0.is_empty() {
        return None;
    }
    Some(Point {
        series,
        resolution,
        start_ns,
        agg,
    })
}

/// Reads a segment file and checks every frame. Only I/O errors are errors; damage is
/// reported in [`Scan::ending`].
pub fn scan(path: &Path) -> io::Result<Scan> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    Ok(scan_bytes(&bytes))
}

/// [`scan`] over bytes already read.
pub fn scan_bytes(bytes: &[u8]) -> Scan {
    let file_len = bytes.len() as u64;
    let mut out = Scan {
        resolution: None,
        seq: 0,
        points: Vec::new(),
        good_len: 0,
        file_len,
        ending: Ending::Dirty,
    };
    let bad_header = |out: Scan, why| Scan {
        ending: Ending::Corrupt { at: 0, why },
        ..out
    };
    if bytes.len() < HEADER as usize {
        // A crash while the header was being written leaves a short file.
        out.ending = Ending::TornTail { at: 0 };
        return out;
    }
    let h = &bytes[..HEADER as usize];
    if h[..8] != MAGIC {
        return bad_header(out, "bad magic");
    }
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    if crc32fast::hash(&h[..24]) != word(24) {
        return bad_header(out, "header checksum");
    }
    if word(28) != 0 {
        return bad_header(out, "reserved header word");
    }
    if word(8) != VERSION {
        return bad_header(out, "unknown version");
    }
    let Some(res) = u8::try_from(word(12)).ok().and_then(Resolution::from_index) else {
        return bad_header(out, "unknown resolution");
    };
    out.resolution = Some(res);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&h[16..24]);
    out.seq = u64::from_le_bytes(seq);
    let mut pos = HEADER as usize;
    let mut frames = 0u64;
    out.good_len = HEADER;
    loop {
        let rest = &bytes[pos..];
        if rest.is_empty() {
            out.ending = Ending::Dirty;
            return out;
        }
        if rest.len() < 8 {
            out.ending = Ending::TornTail { at: pos as u64 };
            return out;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == TRAILER_MARK {
            let ok = rest.len() >= TRAILER as usize && {
                let count = &rest[8..16];
                crc32fast::hash(count) == crc
                    && u64::from_le_bytes(count.try_into().unwrap_or([0xff; 8])) == frames
            };
            out.ending = if !ok && rest.len() < TRAILER as usize {
                Ending::TornTail { at: pos as u64 }
            } else if !ok {
                Ending::Corrupt {
                    at: pos as u64,
                    why: "bad trailer",
                }
            } else if rest.len() > TRAILER as usize {
                Ending::Corrupt {
                    at: pos as u64,
                    why: "data after the trailer",
                }
            } else {
                out.good_len = file_len;
                Ending::Sealed
            };
            return out;
        }
        if len > MAX_FRAME {
            out.ending = Ending::Corrupt {
                at: pos as u64,
                why: "frame length out of range",
            };
            return out;
        }
        let end = 8 + len as usize;
        if rest.len() < end {
            out.ending = Ending::TornTail { at: pos as u64 };
            return out;
        }
        let payload = &rest[8..end];
        let point = (crc32fast::hash(payload) == crc)
            .then(|| decode_payload(payload))
            .flatten();
        match point {
            Some(p) if p.resolution == res => out.points.push(p),
            _ => {
                // The last frame of a dirty file with a bad checksum is a torn write
                // (its bytes reached the file out of order); anything else is damage.
                out.ending = if rest.len() == end {
                    Ending::TornTail { at: pos as u64 }
                } else {
                    Ending::Corrupt {
                        at: pos as u64,
                        why: "frame checksum",
                    }
                };
                return out;
            }
        }
        frames += 1;
        pos += end;
        out.good_len = pos as u64;
    }
}

/// The path of segment `seq` of `res` under `dir`.
pub fn path_of(dir: &Path, res: Resolution, seq: u64) -> PathBuf {
    dir.join(res.name()).join(format!("{seq:016x}.seg"))
}

/// The sequence number in a segment file name (`<16 hex digits>.seg`).
pub fn seq_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Segment files of `res` under `dir`, by sequence number.
pub fn list(dir: &Path, res: Resolution) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let sub = dir.join(res.name());
    let entries = match fs::read_dir(&sub) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if let Some(seq) = seq_of(&path) {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

/// A segment being written.
#[derive(Debug)]
pub struct Writer {
    file: File,
    /// Its path.
    pub path: PathBuf,
    /// Its sequence number.
    pub seq: u64,
    /// Bytes written (header and frames).
    pub len: u64,
    /// Frames written.
    pub frames: u64,
}

impl Writer {
    /// Creates segment `seq` of `res` and writes its header. A failed write leaves no
    /// file behind (removed, best effort).
    pub fn create(dir: &Path, res: Resolution, seq: u64) -> io::Result<Self> {
        fs::create_dir_all(dir.join(res.name()))?;
        let path = path_of(dir, res, seq);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        if let Err(e) = file.write_all(&header(res, seq)) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(Self {
            file,
            path,
            seq,
            len: HEADER,
            frames: 0,
        })
    }

    /// Reopens a dirty segment whose good part is `good_len` bytes of `frames` frames,
    /// cutting anything after it.
    pub fn reopen(path: PathBuf, seq: u64, good_len: u64, frames: u64) -> io::Result<Self> {
        let file = OpenOptions::new().write(true).open(&path)?;
        file.set_len(good_len)?;
        let mut w = Self {
            file,
            path,
            seq,
            len: good_len,
            frames,
        };
        io::Seek::seek(&mut w.file, io::SeekFrom::Start(good_len))?;
        Ok(w)
    }

    /// Appends encoded frames (`count` of them). On an error the file is cut back to
    /// where it was (best effort: if that fails too, the next replay finds a torn tail).
    pub fn append(&mut self, bytes: &[u8], count: u64) -> io::Result<()> {
        if let Err(e) = self.file.write_all(bytes) {
            if self.file.set_len(self.len).is_ok() {
                let _ = io::Seek::seek(&mut self.file, io::SeekFrom::Start(self.len));
            }
            return Err(e);
        }
        self.len += bytes.len() as u64;
        self.frames += count;
        Ok(())
    }

    /// Writes the trailer and syncs: the segment is clean and never written again.
    /// On an error the file is cut back to its frames (best effort), left dirty: the
    /// next replay seals it.
    pub fn seal(mut self) -> io::Result<u64> {
        if let Err(e) = self.file.write_all(&trailer(self.frames)) {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.file.sync_data()?;
        Ok(self.len + TRAILER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(i: u64) -> Point {
        Point {
            series: Arc::from(format!("svc/counter/c{i}{{}}").as_str()),
            resolution: Resolution(1),
            start_ns: i * 60_000_000_000,
            agg: if i % 3 == 2 {
                Agg::Exponential(
                    crate::histogram::Exponential::from_parts(
                        -2,
                        i,
                        (-3, vec![1, 0, i]),
                        (5, vec![2]),
                        12.5,
                        None,
                    )
                    .expect("valid parts"),
                )
            } else if i % 2 == 0 {
                Agg::Counter {
                    delta: u128::from(i) << 70,
                }
            } else {
                Agg::Histogram {
                    bounds: Arc::from("1,+Inf"),
                    count: i,
                    sum: 3,
                    buckets: Box::from([i, 0].as_slice()),
                }
            },
        }
    }

    fn segment(n: u64, sealed: bool) -> Vec<u8> {
        let mut bytes = header(Resolution(1), 7).to_vec();
        for i in 0..n {
            encode_frame(&point(i), &mut bytes);
        }
        if sealed {
            bytes.extend_from_slice(&trailer(n));
        }
        bytes
    }

    #[test]
    fn frames_round_trip_and_trailers_seal() {
        let s = scan_bytes(&segment(5, true));
        assert_eq!(s.ending, Ending::Sealed);
        assert_eq!((s.seq, s.resolution), (7, Some(Resolution(1))));
        assert_eq!(s.points, (0..5).map(point).collect::<Vec<_>>());
        let d = scan_bytes(&segment(5, false));
        assert_eq!(d.ending, Ending::Dirty);
        assert_eq!(d.points.len(), 5);
    }

    #[test]
    fn every_cut_is_a_torn_tail_keeping_the_whole_frames() {
        let full = segment(4, false);
        let mut ends = vec![HEADER as usize];
        for i in 0..4 {
            let mut b = Vec::new();
            encode_frame(&point(i), &mut b);
            ends.push(ends[ends.len() - 1] + b.len());
        }
        for cut in 0..full.len() {
            let s = scan_bytes(&full[..cut]);
            let whole = ends.iter().filter(|e| **e <= cut).count().saturating_sub(1);
            assert_eq!(s.points.len(), whole, "cut at {cut}");
            if ends.contains(&cut) {
                assert_eq!(s.ending, Ending::Dirty, "cut at {cut}");
            } else {
                assert!(
                    matches!(s.ending, Ending::TornTail { .. }),
                    "cut at {cut}: {:?}",
                    s.ending
                );
            }
        }
    }

    #[test]
    fn a_flipped_byte_is_corruption_or_a_bad_header() {
        let full = segment(4, true);
        for at in 0..full.len() {
            let mut b = full.clone();
            b[at] ^= 0x40;
            let s = scan_bytes(&b);
            // A length field made longer than the file reads as a torn tail; either
            // way the damage is seen and the segment is not taken as clean.
            assert!(
                matches!(s.ending, Ending::Corrupt { .. } | Ending::TornTail { .. }),
                "flip at {at}: {:?}",
                s.ending
            );
            assert!(s.points.len() < 4 || at >= full.len() - TRAILER as usize);
            // What is kept is exactly a prefix of what was written.
            assert_eq!(
                s.points,
                (0..s.points.len() as u64).map(point).collect::<Vec<_>>()
            );
        }
    }
}
