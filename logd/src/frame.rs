//! The wire format, version 1. `logd/README.md` is its prose specification.
//!
//! Every frame is an 8-byte header and a body, all integers little-endian:
//!
//! ```text
//! u32 body_len   bytes after the header; 8 + body_len <= max_frame_bytes
//! u8  version    1
//! u8  kind       0x01 APPEND, 0x02 QUERY, 0x03 STATS (requests)
//!                0x81 APPEND_OK, 0x82 QUERY_OK, 0x83 STATS_OK, 0xFF ERROR (replies)
//! u16 flags      0 (reserved)
//! ```
//!
//! A `str` is `u32 len` + `len` bytes of UTF-8. Decoding never panics and never allocates
//! more than the body it was given; see the property test in `tests/frame_fuzz.rs`.

use std::io::{self, Read};

use crate::config::Limits;
use crate::query::{Query, QueryPage};
use crate::record::{Identity, Level, Record, StoredRecord, is_identity_key};
use crate::stats::{DiskStats, RejectCounts, SenderStats, Stats};
use crate::status::{AppendReport, Reason, RecordStatus, Reject};

/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Header bytes.
pub const HEADER_LEN: usize = 8;
/// Request: append records.
pub const KIND_APPEND: u8 = 0x01;
/// Request: query records.
pub const KIND_QUERY: u8 = 0x02;
/// Request: counters.
pub const KIND_STATS: u8 = 0x03;
/// Reply to APPEND.
pub const KIND_APPEND_OK: u8 = 0x81;
/// Reply to QUERY.
pub const KIND_QUERY_OK: u8 = 0x82;
/// Reply to STATS.
pub const KIND_STATS_OK: u8 = 0x83;
/// Reply refusing a whole frame.
pub const KIND_ERROR: u8 = 0xFF;
/// `min_level` byte meaning "no level filter" in a QUERY.
pub const NO_LEVEL: u8 = 0xFF;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Body length.
    pub body_len: u32,
    /// Version byte.
    pub version: u8,
    /// Kind byte.
    pub kind: u8,
    /// Flags (must be 0 in version 1).
    pub flags: u16,
}

impl Header {
    /// Parses the 8 header bytes (any bytes parse; meaning is checked by the caller).
    pub fn parse(b: [u8; HEADER_LEN]) -> Header {
        Header {
            body_len: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            version: b[4],
            kind: b[5],
            flags: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    /// The whole frame's length.
    pub fn frame_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.body_len)
    }
}

/// The body did not parse: truncated, trailing bytes, or a bad value. The text says where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl core::fmt::Display for Malformed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "malformed frame: {}", self.0)
    }
}

impl core::error::Error for Malformed {}

// ---------------------------------------------------------------------------------------
// The smallest encoding of each repeated item. A decoder checks a count against what is
// left with these (`Dec::count`), so they must never exceed what the encoder can write:
// each is the sum of its fixed fields with every string empty and every list empty, and
// the unit tests pin each against the encoder's own output.

/// A `str` with no bytes: its `u32` length alone.
const STR_MIN: usize = 4;
/// `u32` item count of a list.
const COUNT_LEN: usize = 4;
/// Smallest field (key, value) in a record or a query: two empty strings.
pub const MIN_FIELD_LEN: usize = STR_MIN + STR_MIN;
/// Smallest record in an APPEND: a level byte, empty scope and message, no fields.
pub const MIN_RECORD_LEN: usize = 1 + STR_MIN + STR_MIN + COUNT_LEN;
/// Smallest stored record in a QUERY_OK: id, receive time, pid, uid, gid, an empty
/// service name, then the smallest record.
pub const MIN_STORED_RECORD_LEN: usize = 8 + 8 + 4 + 4 + 4 + STR_MIN + MIN_RECORD_LEN;
/// One record's status in an APPEND_OK: status, reason, reserved `u16`, id.
pub const STATUS_LEN: usize = 1 + 1 + 2 + 8;
/// The four reject counters of a STATS_OK entry.
const REJECTS_LEN: usize = 4 * 8;
/// Smallest sender entry in a STATS_OK: an empty service name, pid, uid and connections,
/// four `u64` counters, then the reject counters.
pub const MIN_SENDER_LEN: usize = STR_MIN + 3 * 4 + 4 * 8 + REJECTS_LEN;

// ---------------------------------------------------------------------------------------
// Primitive encoding.

fn begin(kind: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&[0, 0, 0, 0, VERSION, kind, 0, 0]);
    b
}

/// Writes the body length into a buffer that [`begin`] started.
fn finish(mut b: Vec<u8>) -> Vec<u8> {
    let body = b.len().saturating_sub(HEADER_LEN);
    let len = u32::try_from(body).unwrap_or(u32::MAX);
    if let Some(h) = b.get_mut(0..4) {
        h.copy_from_slice(&len.to_le_bytes());
    }
    b
}

fn put_u8(b: &mut Vec<u8>, v: u8) {
    b.push(v);
}
fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_len(b: &mut Vec<u8>, n: usize) {
    put_u32(b, u32::try_from(n).unwrap_or(u32::MAX));
}
fn put_str(b: &mut Vec<u8>, s: &str) {
    put_len(b, s.len());
    b.extend_from_slice(s.as_bytes());
}
fn put_fields(b: &mut Vec<u8>, fields: &[(String, String)]) {
    put_len(b, fields.len());
    for (k, v) in fields {
        put_str(b, k);
        put_str(b, v);
    }
}

/// A bounds-checked reader over a body.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    /// Reads from the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Dec<'a> {
        Dec { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Malformed> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or_else(|| Malformed(format!("{what}: length overflows")))?;
        let s = self.buf.get(self.pos..end).ok_or_else(|| {
            Malformed(format!(
                "{what}: needs {n} bytes at offset {}, body has {}",
                self.pos,
                self.buf.len()
            ))
        })?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Malformed> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// One byte.
    pub fn u8(&mut self, what: &str) -> Result<u8, Malformed> {
        Ok(self.array::<1>(what)?[0])
    }
    /// A little-endian u16.
    pub fn u16(&mut self, what: &str) -> Result<u16, Malformed> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    /// A little-endian u32.
    pub fn u32(&mut self, what: &str) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    /// A little-endian u64.
    pub fn u64(&mut self, what: &str) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A `str` as raw bytes (UTF-8 not checked).
    pub fn bytes(&mut self, what: &str) -> Result<&'a [u8], Malformed> {
        let n = self.u32(what)?;
        let n = usize::try_from(n).map_err(|_| Malformed(format!("{what}: length too big")))?;
        self.take(n, what)
    }
    /// A `str`, UTF-8 checked.
    pub fn string(&mut self, what: &str) -> Result<String, Malformed> {
        let b = self.bytes(what)?;
        core::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| Malformed(format!("{what}: not UTF-8")))
    }
    /// A count of items each at least `min_item` bytes long, checked against what is left
    /// so no caller allocates for items that cannot be there.
    pub fn count(&mut self, what: &str, min_item: usize) -> Result<usize, Malformed> {
        let n = self.u32(what)?;
        let n = usize::try_from(n).map_err(|_| Malformed(format!("{what}: too big")))?;
        if n.saturating_mul(min_item.max(1)) > self.remaining() {
            return Err(Malformed(format!(
                "{what} = {n} but only {} bytes follow",
                self.remaining()
            )));
        }
        Ok(n)
    }
    /// Fails unless everything was read.
    pub fn end(&self) -> Result<(), Malformed> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(Malformed(format!(
                "{} trailing bytes at offset {}",
                self.remaining(),
                self.pos
            )))
        }
    }
}

fn fields(d: &mut Dec<'_>, what: &str) -> Result<Vec<(String, String)>, Malformed> {
    let n = d.count(what, MIN_FIELD_LEN)?;
    let mut v = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let k = d.string("field key")?;
        let val = d.string("field value")?;
        v.push((k, val));
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------
// Records.

/// Appends one record's APPEND encoding:
/// `u8 level, str scope, str message, u32 nfields, nfields x (str key, str value)`.
pub fn put_record(b: &mut Vec<u8>, r: &Record) {
    put_u8(b, r.level.to_wire());
    put_str(b, &r.scope);
    put_str(b, &r.message);
    put_fields(b, &r.fields);
}

/// The encoded length of a record in an APPEND.
pub fn record_len(r: &Record) -> usize {
    MIN_RECORD_LEN
        + r.scope.len()
        + r.message.len()
        + r.fields
            .iter()
            .map(|(k, v)| MIN_FIELD_LEN + k.len() + v.len())
            .sum::<usize>()
}

/// Appends a stored record's encoding (QUERY_OK and disk segments):
/// `u64 id, u64 received_ns, u32 pid, u32 uid, u32 gid, str service,` then the record.
pub fn put_stored(b: &mut Vec<u8>, r: &StoredRecord) {
    put_u64(b, r.id);
    put_u64(b, r.received_ns);
    put_u32(b, r.sender.pid);
    put_u32(b, r.sender.uid);
    put_u32(b, r.sender.gid);
    put_str(b, &r.sender.service);
    put_record(b, &r.record);
}

/// The encoded length of a stored record.
pub fn stored_record_len(r: &StoredRecord) -> usize {
    (MIN_STORED_RECORD_LEN - MIN_RECORD_LEN) + r.sender.service.len() + record_len(&r.record)
}

/// Reads one stored record.
pub fn get_stored(d: &mut Dec<'_>) -> Result<StoredRecord, Malformed> {
    let id = d.u64("id")?;
    let received_ns = d.u64("received_ns")?;
    let pid = d.u32("pid")?;
    let uid = d.u32("uid")?;
    let gid = d.u32("gid")?;
    let service = d.string("service")?;
    let lv = d.u8("level")?;
    let level = Level::from_wire(lv).ok_or_else(|| Malformed(format!("level {lv} > 4")))?;
    let scope = d.string("scope")?;
    let message = d.string("message")?;
    let fields = fields(d, "nfields")?;
    Ok(StoredRecord {
        id,
        received_ns,
        sender: Identity {
            service,
            pid,
            uid,
            gid,
        },
        record: Record {
            level,
            scope,
            message,
            fields,
        },
    })
}

/// A record as it arrived in an APPEND, before validation: the structure parsed, the
/// contents not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord<'a> {
    /// Level byte.
    pub level: u8,
    /// Scope bytes.
    pub scope: &'a [u8],
    /// Message bytes.
    pub message: &'a [u8],
    /// Field key/value bytes.
    pub fields: Vec<(&'a [u8], &'a [u8])>,
}

fn utf8(b: &[u8]) -> Result<&str, (Reject, Reason)> {
    core::str::from_utf8(b).map_err(|_| (Reject::InvalidArgs, Reason::BadUtf8))
}

impl RawRecord<'_> {
    /// Checks the record against the limits and the identity rule; on success, the record.
    pub fn validate(&self, limits: &Limits) -> Result<Record, (Reject, Reason)> {
        let level = Level::from_wire(self.level).ok_or((Reject::InvalidArgs, Reason::BadLevel))?;
        let over = |len: usize, max: u32| len > usize::try_from(max).unwrap_or(usize::MAX);
        if over(self.fields.len(), limits.max_fields) {
            return Err((Reject::OverLimit, Reason::TooManyFields));
        }
        if over(self.scope.len(), limits.max_scope_bytes) {
            return Err((Reject::OverLimit, Reason::ScopeTooLong));
        }
        if over(self.message.len(), limits.max_message_bytes) {
            return Err((Reject::OverLimit, Reason::MessageTooLong));
        }
        let scope = utf8(self.scope)?;
        let message = utf8(self.message)?;
        let mut fields = Vec::with_capacity(self.fields.len());
        for (k, v) in &self.fields {
            if k.is_empty() {
                return Err((Reject::InvalidArgs, Reason::EmptyKey));
            }
            if over(k.len(), limits.max_key_bytes) {
                return Err((Reject::OverLimit, Reason::KeyTooLong));
            }
            if over(v.len(), limits.max_value_bytes) {
                return Err((Reject::OverLimit, Reason::ValueTooLong));
            }
            let k = utf8(k)?;
            if is_identity_key(k) {
                return Err((Reject::InvalidArgs, Reason::IdentityClaim));
            }
            fields.push((k.to_owned(), utf8(v)?.to_owned()));
        }
        Ok(Record {
            level,
            scope: scope.to_owned(),
            message: message.to_owned(),
            fields,
        })
    }
}

fn get_raw_record<'a>(d: &mut Dec<'a>) -> Result<RawRecord<'a>, Malformed> {
    let level = d.u8("level")?;
    let scope = d.bytes("scope")?;
    let message = d.bytes("message")?;
    let n = d.count("nfields", MIN_FIELD_LEN)?;
    let mut fields = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let k = d.bytes("field key")?;
        let v = d.bytes("field value")?;
        fields.push((k, v));
    }
    Ok(RawRecord {
        level,
        scope,
        message,
        fields,
    })
}

// ---------------------------------------------------------------------------------------
// Requests.

/// An APPEND frame: `u32 count`, then `count` records.
pub fn encode_append(records: &[Record]) -> Vec<u8> {
    let mut b = begin(KIND_APPEND);
    put_len(&mut b, records.len());
    for r in records {
        put_record(&mut b, r);
    }
    finish(b)
}

/// Bytes an APPEND frame of these records takes.
pub fn append_frame_len(records: &[Record]) -> usize {
    HEADER_LEN + 4 + records.iter().map(record_len).sum::<usize>()
}

/// A QUERY frame: `u64 cursor, u32 limit, u32 wait_ms, u8 min_level (0xFF none),
/// u64 since_ns (0 none), u64 until_ns (u64::MAX none), str service ("" any),
/// str scope ("" any), u32 nmatch, nmatch x (str key, str value)`.
pub fn encode_query(q: &Query) -> Vec<u8> {
    let mut b = begin(KIND_QUERY);
    put_u64(&mut b, q.cursor);
    put_u32(&mut b, q.limit);
    put_u32(&mut b, q.wait_ms);
    put_u8(&mut b, q.min_level.map_or(NO_LEVEL, Level::to_wire));
    put_u64(&mut b, q.since_ns.unwrap_or(0));
    put_u64(&mut b, q.until_ns.unwrap_or(u64::MAX));
    put_str(&mut b, q.service.as_deref().unwrap_or(""));
    put_str(&mut b, q.scope.as_deref().unwrap_or(""));
    put_fields(&mut b, &q.fields);
    finish(b)
}

/// A STATS frame (empty body).
pub fn encode_stats_request() -> Vec<u8> {
    finish(begin(KIND_STATS))
}

/// A request as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// Records to validate and store.
    Append(Vec<RawRecord<'a>>),
    /// A query.
    Query(Query),
    /// A STATS request.
    Stats,
}

/// A whole-frame refusal: class, reason and a message for the ERROR reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameReject {
    /// Class.
    pub class: Reject,
    /// Reason.
    pub reason: Reason,
    /// Text for a human.
    pub message: String,
}

impl FrameReject {
    fn malformed(m: Malformed) -> FrameReject {
        FrameReject {
            class: Reject::InvalidArgs,
            reason: Reason::Malformed,
            message: m.0,
        }
    }
}

/// Decodes a request body whose header was already read (and its size checked).
pub fn decode_request<'a>(
    h: &Header,
    body: &'a [u8],
    limits: &Limits,
) -> Result<Request<'a>, FrameReject> {
    if h.version != VERSION {
        return Err(FrameReject {
            class: Reject::InvalidArgs,
            reason: Reason::UnsupportedVersion,
            message: format!("version {} is not supported; expected {VERSION}", h.version),
        });
    }
    if h.flags != 0 {
        return Err(FrameReject {
            class: Reject::InvalidArgs,
            reason: Reason::UnknownKind,
            message: format!("flags {:#06x} set; expected 0", h.flags),
        });
    }
    let mut d = Dec::new(body);
    match h.kind {
        KIND_APPEND => {
            let n = d
                .count("record count", MIN_RECORD_LEN)
                .map_err(FrameReject::malformed)?;
            if n > usize::try_from(limits.max_records_per_frame).unwrap_or(usize::MAX) {
                return Err(FrameReject {
                    class: Reject::OverLimit,
                    reason: Reason::TooManyRecords,
                    message: format!(
                        "{n} records in one frame; expected at most {}",
                        limits.max_records_per_frame
                    ),
                });
            }
            let mut recs = Vec::with_capacity(n);
            for _ in 0..n {
                recs.push(get_raw_record(&mut d).map_err(FrameReject::malformed)?);
            }
            d.end().map_err(FrameReject::malformed)?;
            Ok(Request::Append(recs))
        }
        KIND_QUERY => {
            let q = decode_query(&mut d).map_err(|m| FrameReject {
                class: Reject::InvalidArgs,
                reason: if m.0.starts_with("min_level") {
                    Reason::BadLevel
                } else {
                    Reason::Malformed
                },
                message: m.0,
            })?;
            if q.fields.len() > usize::try_from(limits.max_fields).unwrap_or(usize::MAX) {
                return Err(FrameReject {
                    class: Reject::OverLimit,
                    reason: Reason::TooManyFields,
                    message: format!(
                        "{} field matches; expected at most {}",
                        q.fields.len(),
                        limits.max_fields
                    ),
                });
            }
            Ok(Request::Query(q))
        }
        KIND_STATS => {
            d.end().map_err(FrameReject::malformed)?;
            Ok(Request::Stats)
        }
        k => Err(FrameReject {
            class: Reject::InvalidArgs,
            reason: Reason::UnknownKind,
            message: format!("kind {k:#04x} is not a request; expected 0x01, 0x02 or 0x03"),
        }),
    }
}

fn decode_query(d: &mut Dec<'_>) -> Result<Query, Malformed> {
    let cursor = d.u64("cursor")?;
    let limit = d.u32("limit")?;
    let wait_ms = d.u32("wait_ms")?;
    let lv = d.u8("min_level")?;
    let min_level = if lv == NO_LEVEL {
        None
    } else {
        Some(
            Level::from_wire(lv)
                .ok_or_else(|| Malformed(format!("min_level {lv}: expected 0-4 or 255")))?,
        )
    };
    let since = d.u64("since_ns")?;
    let until = d.u64("until_ns")?;
    let service = d.string("service")?;
    let scope = d.string("scope")?;
    let fields = fields(d, "nmatch")?;
    d.end()?;
    Ok(Query {
        service: (!service.is_empty()).then_some(service),
        scope: (!scope.is_empty()).then_some(scope),
        min_level,
        since_ns: (since != 0).then_some(since),
        until_ns: (until != u64::MAX).then_some(until),
        fields,
        cursor,
        limit,
        wait_ms,
    })
}

// ---------------------------------------------------------------------------------------
// Replies.

/// APPEND_OK: `u32 count`, then per record `u8 status (0 ok), u8 reason, u16 0, u64 id`
/// (id 0 when refused).
pub fn encode_append_reply(statuses: &[RecordStatus]) -> Vec<u8> {
    let mut b = begin(KIND_APPEND_OK);
    put_len(&mut b, statuses.len());
    for s in statuses {
        let (st, reason, id) = match *s {
            RecordStatus::Accepted(id) => (0, 0, id),
            RecordStatus::Rejected(c, r) => (c.to_wire(), r.to_wire(), 0),
        };
        put_u8(&mut b, st);
        put_u8(&mut b, reason);
        put_u16(&mut b, 0);
        put_u64(&mut b, id);
    }
    finish(b)
}

/// ERROR: `u8 status, u8 reason, u16 0, str message`.
pub fn encode_error(class: Reject, reason: Reason, message: &str) -> Vec<u8> {
    let mut b = begin(KIND_ERROR);
    put_u8(&mut b, class.to_wire());
    put_u8(&mut b, reason.to_wire());
    put_u16(&mut b, 0);
    put_str(&mut b, message);
    finish(b)
}

/// Builds a QUERY_OK frame record by record under a byte budget:
/// `u64 next_cursor, u8 more, u32 count, count x stored record`.
pub struct QueryReply {
    records: Vec<u8>,
    count: u32,
    budget: usize,
}

impl QueryReply {
    /// Fixed bytes before the records.
    const FIXED: usize = HEADER_LEN + 8 + 1 + 4;

    /// A reply that will not exceed `max_frame` bytes.
    pub fn new(max_frame: usize) -> QueryReply {
        QueryReply {
            records: Vec::new(),
            count: 0,
            budget: max_frame.saturating_sub(Self::FIXED),
        }
    }

    /// Adds a record if it fits; `false` when it does not (the page is full).
    pub fn push(&mut self, r: &StoredRecord) -> bool {
        if self.records.len() + stored_record_len(r) > self.budget || self.count == u32::MAX {
            return false;
        }
        put_stored(&mut self.records, r);
        self.count += 1;
        true
    }

    /// Records added.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether no record was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The frame.
    pub fn finish(self, next_cursor: u64, more: bool) -> Vec<u8> {
        let mut b = begin(KIND_QUERY_OK);
        b.reserve(self.records.len() + 13);
        put_u64(&mut b, next_cursor);
        put_u8(&mut b, u8::from(more));
        put_u32(&mut b, self.count);
        b.extend_from_slice(&self.records);
        finish(b)
    }
}

fn put_rejects(b: &mut Vec<u8>, r: &RejectCounts) {
    put_u64(b, r.invalid_args);
    put_u64(b, r.over_limit);
    put_u64(b, r.rate_limited);
    put_u64(b, r.internal);
}

fn get_rejects(d: &mut Dec<'_>) -> Result<RejectCounts, Malformed> {
    Ok(RejectCounts {
        invalid_args: d.u64("invalid_args")?,
        over_limit: d.u64("over_limit")?,
        rate_limited: d.u64("rate_limited")?,
        internal: d.u64("internal")?,
    })
}

/// STATS_OK: totals, disk counters, then `u32 nsenders` sender entries (see the README
/// for the exact order).
pub fn encode_stats_reply(s: &Stats) -> Vec<u8> {
    let mut b = begin(KIND_STATS_OK);
    put_u64(&mut b, s.uptime_ms);
    put_u32(&mut b, s.connections);
    put_u64(&mut b, s.accepted);
    put_u64(&mut b, s.evicted);
    put_rejects(&mut b, &s.rejected);
    put_u64(&mut b, s.journal_records);
    put_u64(&mut b, s.journal_bytes);
    put_u64(&mut b, s.next_id);
    put_u8(&mut b, u8::from(s.disk.enabled));
    put_u64(&mut b, s.disk.bytes);
    put_u64(&mut b, s.disk.segments);
    put_u64(&mut b, s.disk.recovered);
    put_u64(&mut b, s.disk.corrupt_skipped);
    put_u64(&mut b, s.disk.errors);
    put_len(&mut b, s.senders.len());
    for p in &s.senders {
        put_str(&mut b, &p.service);
        put_u32(&mut b, p.pid.unwrap_or(0));
        put_u32(&mut b, p.uid);
        put_u32(&mut b, p.connections);
        put_u64(&mut b, p.accepted);
        put_u64(&mut b, p.held_records);
        put_u64(&mut b, p.held_bytes);
        put_u64(&mut b, p.evicted);
        put_rejects(&mut b, &p.rejected);
    }
    finish(b)
}

fn decode_stats(d: &mut Dec<'_>) -> Result<Stats, Malformed> {
    let uptime_ms = d.u64("uptime_ms")?;
    let connections = d.u32("connections")?;
    let accepted = d.u64("accepted")?;
    let evicted = d.u64("evicted")?;
    let rejected = get_rejects(d)?;
    let journal_records = d.u64("journal_records")?;
    let journal_bytes = d.u64("journal_bytes")?;
    let next_id = d.u64("next_id")?;
    let disk = DiskStats {
        enabled: d.u8("disk.enabled")? != 0,
        bytes: d.u64("disk.bytes")?,
        segments: d.u64("disk.segments")?,
        recovered: d.u64("disk.recovered")?,
        corrupt_skipped: d.u64("disk.corrupt_skipped")?,
        errors: d.u64("disk.errors")?,
    };
    let n = d.count("nsenders", MIN_SENDER_LEN)?;
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        let service = d.string("sender.service")?;
        let pid = d.u32("sender.pid")?;
        senders.push(SenderStats {
            service,
            pid: (pid != 0).then_some(pid),
            uid: d.u32("sender.uid")?,
            connections: d.u32("sender.connections")?,
            accepted: d.u64("sender.accepted")?,
            held_records: d.u64("sender.held_records")?,
            held_bytes: d.u64("sender.held_bytes")?,
            evicted: d.u64("sender.evicted")?,
            rejected: get_rejects(d)?,
        });
    }
    d.end()?;
    Ok(Stats {
        uptime_ms,
        connections,
        accepted,
        evicted,
        rejected,
        journal_records,
        journal_bytes,
        next_id,
        disk,
        senders,
    })
}

/// An ERROR reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// Class.
    pub class: Reject,
    /// Reason.
    pub reason: Reason,
    /// logd's explanation.
    pub message: String,
}

/// A reply as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// APPEND_OK.
    Append(AppendReport),
    /// QUERY_OK.
    Query(QueryPage),
    /// STATS_OK.
    Stats(Stats),
    /// ERROR.
    Error(ErrorReply),
}

/// Decodes a reply body. Never panics; allocation is bounded by the body length.
pub fn decode_reply(h: &Header, body: &[u8]) -> Result<Reply, Malformed> {
    if h.version != VERSION {
        return Err(Malformed(format!(
            "reply version {}; expected {VERSION}",
            h.version
        )));
    }
    let mut d = Dec::new(body);
    let reply = match h.kind {
        KIND_APPEND_OK => {
            let n = d.count("status count", STATUS_LEN)?;
            let mut statuses = Vec::with_capacity(n);
            for _ in 0..n {
                let st = d.u8("status")?;
                let reason = Reason::from_wire(d.u8("reason")?);
                let _reserved = d.u16("reserved")?;
                let id = d.u64("id")?;
                statuses.push(match (st, Reject::from_wire(st)) {
                    (0, _) => RecordStatus::Accepted(id),
                    (_, Some(c)) => RecordStatus::Rejected(c, reason),
                    (s, None) => return Err(Malformed(format!("unknown status {s}"))),
                });
            }
            Reply::Append(AppendReport { statuses })
        }
        KIND_QUERY_OK => {
            let next_cursor = d.u64("next_cursor")?;
            let more = d.u8("more")? != 0;
            let n = d.count("record count", MIN_STORED_RECORD_LEN)?;
            let mut records = Vec::with_capacity(n);
            for _ in 0..n {
                records.push(get_stored(&mut d)?);
            }
            Reply::Query(QueryPage {
                records,
                next_cursor,
                more,
            })
        }
        KIND_STATS_OK => Reply::Stats(decode_stats(&mut d)?),
        KIND_ERROR => {
            let st = d.u8("status")?;
            let class =
                Reject::from_wire(st).ok_or_else(|| Malformed(format!("error status {st}")))?;
            let reason = Reason::from_wire(d.u8("reason")?);
            let _reserved = d.u16("reserved")?;
            let message = String::from_utf8_lossy(d.bytes("message")?).into_owned();
            Reply::Error(ErrorReply {
                class,
                reason,
                message,
            })
        }
        k => return Err(Malformed(format!("kind {k:#04x} is not a reply"))),
    };
    d.end()?;
    Ok(reply)
}

/// Why a frame could not be read from a stream.
#[derive(Debug)]
pub enum ReadError {
    /// The stream ended cleanly before a header.
    Closed,
    /// The header announced more than the allowed size.
    TooLarge {
        /// Announced frame length.
        len: u64,
        /// Allowed.
        max: usize,
    },
    /// An I/O error (including a truncated frame).
    Io(io::Error),
}

/// Reads one frame (blocking) into `body`, refusing frames over `max_frame` bytes before
/// allocating for them.
pub fn read_frame<R: Read>(
    r: &mut R,
    max_frame: usize,
    body: &mut Vec<u8>,
) -> Result<Header, ReadError> {
    let mut hb = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let Some(rest) = hb.get_mut(got..) else {
            break;
        };
        match r.read(rest) {
            Ok(0) if got == 0 => return Err(ReadError::Closed),
            Ok(0) => {
                return Err(ReadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream ended inside a frame header",
                )));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    let h = Header::parse(hb);
    if h.frame_len() > max_frame as u64 {
        return Err(ReadError::TooLarge {
            len: h.frame_len(),
            max: max_frame,
        });
    }
    body.clear();
    body.resize(h.body_len as usize, 0);
    r.read_exact(body).map_err(ReadError::Io)?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(frame: &[u8]) -> (Header, &[u8]) {
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&frame[..HEADER_LEN]);
        let h = Header::parse(hb);
        assert_eq!(h.body_len as usize, frame.len() - HEADER_LEN);
        (h, &frame[HEADER_LEN..])
    }

    #[test]
    fn append_round_trips_through_validation() {
        let recs = vec![
            Record::new(Level::Info, "s", "hello").field("k", "v"),
            Record::new(Level::Error, "", ""),
        ];
        let f = encode_append(&recs);
        assert_eq!(f.len(), append_frame_len(&recs));
        let (h, body) = split(&f);
        let Request::Append(raw) = decode_request(&h, body, &Limits::default()).unwrap() else {
            panic!("not an append");
        };
        let back: Vec<Record> = raw
            .iter()
            .map(|r| r.validate(&Limits::default()).unwrap())
            .collect();
        assert_eq!(back, recs);
    }

    #[test]
    fn query_round_trips() {
        let q = Query::new()
            .service("a")
            .scope("b*")
            .min_level(Level::Warn)
            .since_ns(5)
            .until_ns(9)
            .field("x", "y")
            .cursor(42)
            .limit(7)
            .wait_ms(3);
        let f = encode_query(&q);
        let (h, body) = split(&f);
        assert_eq!(
            decode_request(&h, body, &Limits::default()).unwrap(),
            Request::Query(q)
        );
    }

    #[test]
    fn replies_round_trip() {
        let statuses = vec![
            RecordStatus::Accepted(9),
            RecordStatus::Rejected(Reject::RateLimited, Reason::ByteRate),
        ];
        let f = encode_append_reply(&statuses);
        let (h, body) = split(&f);
        assert_eq!(
            decode_reply(&h, body).unwrap(),
            Reply::Append(AppendReport { statuses })
        );

        let rec = StoredRecord {
            id: 3,
            received_ns: 4,
            sender: Identity {
                service: "svc".into(),
                pid: 1,
                uid: 2,
                gid: 3,
            },
            record: Record::new(Level::Debug, "sc", "msg").field("a", "b"),
        };
        let mut qr = QueryReply::new(1 << 20);
        assert!(qr.push(&rec));
        let f = qr.finish(3, true);
        let (h, body) = split(&f);
        assert_eq!(
            decode_reply(&h, body).unwrap(),
            Reply::Query(QueryPage {
                records: vec![rec.clone()],
                next_cursor: 3,
                more: true
            })
        );
        let mut small = QueryReply::new(QueryReply::FIXED + stored_record_len(&rec) - 1);
        assert!(!small.push(&rec));

        let stats = Stats {
            uptime_ms: 1,
            accepted: 2,
            senders: vec![SenderStats {
                service: "x".into(),
                pid: Some(4),
                uid: 5,
                accepted: 6,
                ..SenderStats::default()
            }],
            ..Stats::default()
        };
        let f = encode_stats_reply(&stats);
        let (h, body) = split(&f);
        assert_eq!(decode_reply(&h, body).unwrap(), Reply::Stats(stats));

        let f = encode_error(Reject::OverLimit, Reason::FrameTooLarge, "too big");
        let (h, body) = split(&f);
        assert_eq!(
            decode_reply(&h, body).unwrap(),
            Reply::Error(ErrorReply {
                class: Reject::OverLimit,
                reason: Reason::FrameTooLarge,
                message: "too big".into()
            })
        );
    }

    /// The smallest stored record: an empty service name and an empty record.
    fn smallest_stored() -> StoredRecord {
        StoredRecord {
            id: 1,
            received_ns: 2,
            sender: Identity {
                service: String::new(),
                pid: 3,
                uid: 4,
                gid: 5,
            },
            record: Record::new(Level::Trace, "", ""),
        }
    }

    #[test]
    fn each_count_minimum_is_the_encoders_smallest_item() {
        let rec = Record::new(Level::Info, "", "");
        let mut b = Vec::new();
        put_record(&mut b, &rec);
        assert_eq!(b.len(), MIN_RECORD_LEN);
        assert_eq!(record_len(&rec), MIN_RECORD_LEN);

        let mut b = Vec::new();
        put_fields(&mut b, &[(String::new(), String::new())]);
        assert_eq!(b.len(), COUNT_LEN + MIN_FIELD_LEN);

        let stored = smallest_stored();
        let mut b = Vec::new();
        put_stored(&mut b, &stored);
        assert_eq!(b.len(), MIN_STORED_RECORD_LEN);
        assert_eq!(stored_record_len(&stored), MIN_STORED_RECORD_LEN);

        let f = encode_append_reply(&[RecordStatus::Accepted(1)]);
        assert_eq!(f.len(), HEADER_LEN + COUNT_LEN + STATUS_LEN);

        let empty = encode_stats_reply(&Stats::default());
        let one = encode_stats_reply(&Stats {
            senders: vec![SenderStats::default()],
            ..Stats::default()
        });
        assert_eq!(one.len() - empty.len(), MIN_SENDER_LEN);
    }

    #[test]
    fn a_page_of_smallest_records_round_trips() {
        for service in ["", "a", "abcd"] {
            let mut rec = smallest_stored();
            rec.sender.service = service.into();
            let mut qr = QueryReply::new(1 << 16);
            for _ in 0..7 {
                assert!(qr.push(&rec));
            }
            let f = qr.finish(9, false);
            let (h, body) = split(&f);
            assert_eq!(
                decode_reply(&h, body).unwrap(),
                Reply::Query(QueryPage {
                    records: vec![rec.clone(); 7],
                    next_cursor: 9,
                    more: false
                }),
                "service {service:?}"
            );
        }
        // One byte short of the smallest record is still refused before any allocation.
        let mut qr = QueryReply::new(1 << 16);
        assert!(qr.push(&smallest_stored()));
        let f = qr.finish(1, false);
        let (h, body) = split(&f);
        let cut = &body[..body.len() - 1];
        let h = Header {
            body_len: h.body_len - 1,
            ..h
        };
        let e = decode_reply(&h, cut).unwrap_err();
        assert!(e.0.contains("record count = 1"), "{e}");
    }

    #[test]
    fn validation_classes() {
        let l = Limits {
            max_fields: 1,
            max_key_bytes: 3,
            max_value_bytes: 3,
            max_scope_bytes: 3,
            max_message_bytes: 3,
            ..Limits::default()
        };
        let raw =
            |level, scope: &'static [u8], fields: Vec<(&'static [u8], &'static [u8])>| RawRecord {
                level,
                scope,
                message: b"m",
                fields,
            };
        let cases: Vec<(RawRecord<'static>, Reject, Reason)> = vec![
            (raw(9, b"s", vec![]), Reject::InvalidArgs, Reason::BadLevel),
            (
                raw(1, b"\xff", vec![]),
                Reject::InvalidArgs,
                Reason::BadUtf8,
            ),
            (
                raw(1, b"long", vec![]),
                Reject::OverLimit,
                Reason::ScopeTooLong,
            ),
            (
                raw(1, b"s", vec![(b"a", b"b"), (b"c", b"d")]),
                Reject::OverLimit,
                Reason::TooManyFields,
            ),
            (
                raw(1, b"s", vec![(b"", b"b")]),
                Reject::InvalidArgs,
                Reason::EmptyKey,
            ),
            (
                raw(1, b"s", vec![(b"abcd", b"b")]),
                Reject::OverLimit,
                Reason::KeyTooLong,
            ),
            (
                raw(1, b"s", vec![(b"a", b"bcde")]),
                Reject::OverLimit,
                Reason::ValueTooLong,
            ),
            (
                raw(1, b"s", vec![(b"pid", b"1")]),
                Reject::InvalidArgs,
                Reason::IdentityClaim,
            ),
        ];
        for (r, class, reason) in cases {
            assert_eq!(r.validate(&l), Err((class, reason)), "{r:?}");
        }
    }

    #[test]
    fn truncated_and_trailing_bodies_are_malformed() {
        let f = encode_append(&[Record::new(Level::Info, "s", "m")]);
        let (h, body) = split(&f);
        for cut in 0..body.len() {
            let e = decode_request(&h, &body[..cut], &Limits::default()).unwrap_err();
            assert_eq!(e.reason, Reason::Malformed);
        }
        let mut long = body.to_vec();
        long.push(0);
        let e = decode_request(&h, &long, &Limits::default()).unwrap_err();
        assert_eq!(e.reason, Reason::Malformed);
    }
}
