//! Registration (interning): a name and its label set are written once, bound to a
//! small key, and every later record carries only the key.
//!
//! A registration is one [`Register`] record followed, in the same ring and without
//! anything in between, by `ceil(data_len / 24)` [`RegisterData`] records carrying the
//! payload: the name's bytes, then per label a length byte, the key's bytes, a length
//! byte and the value's bytes. A producer writes all of them with one publication, so a
//! well-behaved ring never shows a partial registration; the consumer assembles them
//! with a [`RegistrationBuf`], which needs no allocation and rejects anything malformed.

use core::fmt;
use core::mem::size_of;

use static_assertions::const_assert_eq;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::record::{RECORD_SIZE, Record, RecordKind};

/// Longest metric, span, attribute or string name, in bytes.
pub const MAX_NAME_LEN: usize = 96;
/// Most labels on one series.
pub const MAX_LABELS: usize = 8;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_LEN: usize = 32;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_LEN: usize = 64;
/// Longest registration payload, in bytes: a name and every label at its longest.
pub const MAX_REGISTER_DATA_LEN: usize =
    MAX_NAME_LEN + MAX_LABELS * (2 + MAX_LABEL_KEY_LEN + MAX_LABEL_VALUE_LEN);
/// Payload bytes per [`RegisterData`] record.
pub const REGISTER_DATA_PER_RECORD: usize = 24;
/// Most records one registration takes (the [`Register`] plus its data records).
pub const MAX_REGISTER_RECORDS: usize =
    1 + MAX_REGISTER_DATA_LEN.div_ceil(REGISTER_DATA_PER_RECORD);

/// What a key is bound to: an open enum over `u16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(transparent)]
pub struct RegisterKind(pub u16);

impl RegisterKind {
    /// A counter series (name and labels).
    pub const COUNTER: Self = Self(1);
    /// A gauge series (name and labels).
    pub const GAUGE: Self = Self(2);
    /// A histogram series (name and labels).
    pub const HISTOGRAM: Self = Self(3);
    /// A span name (no labels).
    pub const SPAN: Self = Self(4);
    /// A span attribute key (no labels; label-key spelling).
    pub const ATTR: Self = Self(5);
    /// A string value for span attributes (no labels; label-value spelling).
    pub const STRING: Self = Self(6);

    /// The kind's name, or `None` for a value this ABI version does not define.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::COUNTER => "counter",
            Self::GAUGE => "gauge",
            Self::HISTOGRAM => "histogram",
            Self::SPAN => "span",
            Self::ATTR => "attr",
            Self::STRING => "string",
            _ => return None,
        })
    }

    const fn has_labels(self) -> bool {
        matches!(self, Self::COUNTER | Self::GAUGE | Self::HISTOGRAM)
    }
}

/// The first record of a registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Register {
    /// [`RecordKind::REGISTER`].
    pub kind: RecordKind,
    /// What the key is bound to.
    pub what: RegisterKind,
    /// The key being bound; never zero.
    pub key: u32,
    /// Bytes of the name at the start of the payload.
    pub name_len: u16,
    /// Labels after the name.
    pub label_count: u16,
    /// Bytes of payload in the data records that follow.
    pub data_len: u32,
    /// Zero.
    pub reserved: [u64; 2],
}
const_assert_eq!(size_of::<Register>(), RECORD_SIZE);

/// One piece of a registration's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RegisterData {
    /// [`RecordKind::REGISTER_DATA`].
    pub kind: RecordKind,
    /// Index of this piece, from zero.
    pub seq: u16,
    /// The key of the [`Register`] this continues.
    pub key: u32,
    /// Payload bytes; past `data_len`, zero.
    pub bytes: [u8; REGISTER_DATA_PER_RECORD],
}
const_assert_eq!(size_of::<RegisterData>(), RECORD_SIZE);

/// Why a registration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// Key zero is reserved.
    ZeroKey,
    /// The registered kind is not one this ABI defines.
    UnknownKind(u16),
    /// The name is empty or longer than [`MAX_NAME_LEN`].
    NameLength(usize),
    /// The name holds a byte its kind does not allow.
    NameByte(u8),
    /// More than [`MAX_LABELS`] labels, or labels on a kind that takes none.
    LabelCount(usize),
    /// A label key is empty, longer than [`MAX_LABEL_KEY_LEN`], or badly spelled.
    LabelKey,
    /// A label value is longer than [`MAX_LABEL_VALUE_LEN`] or holds a control
    /// character or invalid UTF-8.
    LabelValue,
    /// Two labels share a key.
    DuplicateLabel,
    /// The payload length does not match the name and labels it should hold.
    DataLength(u32),
    /// A data record arrived out of order or for another key.
    Sequence,
    /// Another record arrived before the registration was complete.
    Interrupted,
    /// The output slice cannot hold the registration's records.
    OutputTooSmall(usize),
}

impl fmt::Display for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ZeroKey => f.write_str("key 0 is reserved; keys start at 1"),
            Self::UnknownKind(k) => write!(f, "registered kind {k} is unknown, expected 1 to 6"),
            Self::NameLength(n) => {
                write!(f, "name is {n} bytes, expected 1 to {MAX_NAME_LEN}")
            }
            Self::NameByte(b) => write!(
                f,
                "name byte {b:#04x} is not allowed: names are printable ASCII without \
                 quotes, backslash, braces, '=' or ','"
            ),
            Self::LabelCount(n) => {
                write!(
                    f,
                    "{n} labels given, expected at most {MAX_LABELS} (none on spans)"
                )
            }
            Self::LabelKey => write!(
                f,
                "label key must be 1 to {MAX_LABEL_KEY_LEN} bytes of [A-Za-z0-9_.], \
                 not starting with a digit or '.'"
            ),
            Self::LabelValue => write!(
                f,
                "label value must be at most {MAX_LABEL_VALUE_LEN} bytes of UTF-8 \
                 without control characters"
            ),
            Self::DuplicateLabel => f.write_str("two labels share a key"),
            Self::DataLength(n) => write!(
                f,
                "payload length {n} does not match its name and labels \
                 (at most {MAX_REGISTER_DATA_LEN})"
            ),
            Self::Sequence => f.write_str("registration data out of sequence"),
            Self::Interrupted => f.write_str("registration interrupted by another record"),
            Self::OutputTooSmall(n) => write!(f, "registration needs {n} records of output"),
        }
    }
}

impl core::error::Error for RegisterError {}

/// One label of a series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Label<'a> {
    /// The label's key.
    pub key: &'a str,
    /// The label's value.
    pub value: &'a str,
}

/// A complete, validated registration, borrowed from the [`RegistrationBuf`] that
/// assembled it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registration<'a> {
    /// The key being bound.
    pub key: u32,
    /// What it is bound to.
    pub what: RegisterKind,
    /// The name (for [`RegisterKind::STRING`], the string value).
    pub name: &'a str,
    labels: [Label<'a>; MAX_LABELS],
    label_count: usize,
}

impl<'a> Registration<'a> {
    /// The labels, in the order the producer gave them.
    pub fn labels(&self) -> &[Label<'a>] {
        &self.labels[..self.label_count]
    }
}

fn name_byte_ok(b: u8) -> bool {
    (0x20..0x7f).contains(&b) && !matches!(b, b'"' | b'\\' | b'{' | b'}' | b'=' | b',')
}

fn check_name(what: RegisterKind, name: &[u8]) -> Result<(), RegisterError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(RegisterError::NameLength(name.len()));
    }
    match what {
        RegisterKind::STRING => check_value_text(name)
            .map(|_| ())
            .map_err(|()| RegisterError::NameByte(first_control(name))),
        RegisterKind::ATTR => check_label_key(name).map_err(|()| RegisterError::NameByte(name[0])),
        _ => match name.iter().find(|&&b| !name_byte_ok(b)) {
            Some(&b) => Err(RegisterError::NameByte(b)),
            None if name[0] == b' ' => Err(RegisterError::NameByte(b' ')),
            None => Ok(()),
        },
    }
}

fn first_control(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .copied()
        .find(|b| *b < 0x20 || *b == 0x7f)
        .unwrap_or(0xff)
}

fn check_label_key(key: &[u8]) -> Result<(), ()> {
    let ok = !key.is_empty()
        && key.len() <= MAX_LABEL_KEY_LEN
        && !key[0].is_ascii_digit()
        && key[0] != b'.'
        && key
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.');
    if ok { Ok(()) } else { Err(()) }
}

fn check_value_text(value: &[u8]) -> Result<&str, ()> {
    let text = core::str::from_utf8(value).map_err(|_| ())?;
    if text.chars().any(char::is_control) {
        Err(())
    } else {
        Ok(text)
    }
}

/// Encodes a registration of `key` as `what` with `name` and `labels` into `out`, and
/// returns how many records it took (at most [`MAX_REGISTER_RECORDS`]). Nothing is
/// written to `out` when the input is refused.
pub fn encode_registration(
    key: u32,
    what: RegisterKind,
    name: &str,
    labels: &[(&str, &str)],
    out: &mut [Record],
) -> Result<usize, RegisterError> {
    if key == 0 {
        return Err(RegisterError::ZeroKey);
    }
    if what.name().is_none() {
        return Err(RegisterError::UnknownKind(what.0));
    }
    check_name(what, name.as_bytes())?;
    if labels.len() > MAX_LABELS || (!what.has_labels() && !labels.is_empty()) {
        return Err(RegisterError::LabelCount(labels.len()));
    }
    let mut data_len = name.len();
    for (i, (k, v)) in labels.iter().enumerate() {
        check_label_key(k.as_bytes()).map_err(|()| RegisterError::LabelKey)?;
        if v.len() > MAX_LABEL_VALUE_LEN || check_value_text(v.as_bytes()).is_err() {
            return Err(RegisterError::LabelValue);
        }
        if labels[..i].iter().any(|(other, _)| other == k) {
            return Err(RegisterError::DuplicateLabel);
        }
        data_len += 2 + k.len() + v.len();
    }
    let records = 1 + data_len.div_ceil(REGISTER_DATA_PER_RECORD);
    if out.len() < records {
        return Err(RegisterError::OutputTooSmall(records));
    }

    let head = Register {
        kind: RecordKind::REGISTER,
        what,
        key,
        name_len: name.len() as u16,
        label_count: labels.len() as u16,
        data_len: data_len as u32,
        reserved: [0; 2],
    };
    out[0] = Record::read_from_bytes(head.as_bytes()).unwrap_or_default();

    // Stream the payload bytes into the data records without a staging buffer.
    let mut writer = DataWriter {
        key,
        out: &mut out[1..records],
        at: 0,
    };
    writer.put(name.as_bytes());
    for (k, v) in labels {
        writer.put(&[k.len() as u8]);
        writer.put(k.as_bytes());
        writer.put(&[v.len() as u8]);
        writer.put(v.as_bytes());
    }
    Ok(records)
}

struct DataWriter<'o> {
    key: u32,
    out: &'o mut [Record],
    at: usize,
}

impl DataWriter<'_> {
    fn put(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let (index, offset) = (
                self.at / REGISTER_DATA_PER_RECORD,
                self.at % REGISTER_DATA_PER_RECORD,
            );
            if offset == 0 {
                let data = RegisterData {
                    kind: RecordKind::REGISTER_DATA,
                    seq: index as u16,
                    key: self.key,
                    bytes: [0; REGISTER_DATA_PER_RECORD],
                };
                self.out[index] = Record::read_from_bytes(data.as_bytes()).unwrap_or_default();
            }
            // Payload byte `offset` of a data record sits at byte 8 + offset.
            let record = self.out[index].as_mut_bytes();
            record[8 + offset] = b;
            self.at += 1;
        }
    }
}

/// Assembles registrations from records copied out of a ring, without allocating.
///
/// Feed it every [`RecordKind::REGISTER`] and [`RecordKind::REGISTER_DATA`] record in
/// ring order; call [`RegistrationBuf::interrupt`] first whenever any other record
/// arrives, a new [`RecordKind::REGISTER`] included (feeding a head abandons a pending
/// registration without reporting it).
///
/// A refused registration costs exactly one error, whatever its length and whatever
/// refused it: after the error, the assembler passes over the rest of that
/// registration's data records (its key, increasing sequence numbers below the count its
/// length needs, or [`MAX_REGISTER_RECORDS`]` - 1` when the length was unusable)
/// without reporting them again, even with other records in between. A run of data
/// records without a head counts once in the same way.
#[derive(Clone, Debug)]
pub struct RegistrationBuf {
    head: Option<Register>,
    received: usize,
    skip: Option<Skip>,
    bytes: [u8; MAX_REGISTER_DATA_LEN],
}

/// The rest of a refused registration, passed over without another error.
#[derive(Clone, Copy, Debug)]
struct Skip {
    key: u32,
    /// The lowest sequence number still to pass over (they must increase).
    next: u16,
    /// One past the last sequence number the registration can have.
    end: u16,
}

/// Data records a registration of `data_len` payload bytes takes, bounded by the most
/// any registration may take.
fn pieces(data_len: u32) -> u16 {
    let most = MAX_REGISTER_RECORDS - 1;
    let len = usize::try_from(data_len).unwrap_or(usize::MAX);
    len.div_ceil(REGISTER_DATA_PER_RECORD).min(most) as u16
}

impl Default for RegistrationBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl RegistrationBuf {
    /// An empty assembler.
    pub const fn new() -> Self {
        Self {
            head: None,
            received: 0,
            skip: None,
            bytes: [0; MAX_REGISTER_DATA_LEN],
        }
    }

    /// Whether a registration has started and is not yet complete.
    pub fn is_pending(&self) -> bool {
        self.head.is_some()
    }

    /// Abandons a pending registration because a record of another kind arrived.
    /// Returns [`RegisterError::Interrupted`] if one was pending; its remaining data
    /// records will be passed over.
    pub fn interrupt(&mut self) -> Result<(), RegisterError> {
        match self.head.take() {
            Some(head) => {
                self.skip = Some(Skip {
                    key: head.key,
                    next: (self.received / REGISTER_DATA_PER_RECORD) as u16,
                    end: pieces(head.data_len),
                });
                Err(RegisterError::Interrupted)
            }
            None => Ok(()),
        }
    }

    /// Feeds one registration record. Returns the registration once its last piece
    /// has arrived, `Ok(None)` while more are expected (or while the rest of a refused
    /// registration is passed over), or why it was refused (the pending registration
    /// is then dropped).
    pub fn feed(&mut self, record: &Record) -> Result<Option<Registration<'_>>, RegisterError> {
        let result = self.feed_inner(record);
        if !matches!(result, Ok(false)) {
            // Complete or refused: either way nothing stays pending.
            let head = self.head.take();
            if let (Ok(true), Some(head)) = (result, head) {
                return parse(&head, &self.bytes[..head.data_len as usize]).map(Some);
            }
        }
        result.map(|_| None)
    }

    /// Ok(true): complete; Ok(false): more to come, or a piece passed over.
    fn feed_inner(&mut self, record: &Record) -> Result<bool, RegisterError> {
        match record.kind {
            RecordKind::REGISTER => {
                self.head = None;
                let head: Register = record.view();
                self.received = 0;
                let passed_over = self.skip.replace(Skip {
                    key: head.key,
                    next: 0,
                    end: pieces(head.data_len),
                });
                if head.key == 0 {
                    return Err(RegisterError::ZeroKey);
                }
                if head.what.name().is_none() {
                    return Err(RegisterError::UnknownKind(head.what.0));
                }
                if head.data_len as usize > MAX_REGISTER_DATA_LEN
                    || head.name_len == 0
                    || u32::from(head.name_len) > head.data_len
                {
                    return Err(RegisterError::DataLength(head.data_len));
                }
                // Accepted: its pieces are assembled, not passed over; those of a
                // registration refused before it still are, once it is complete.
                self.skip = passed_over;
                self.head = Some(head);
                Ok(false)
            }
            RecordKind::REGISTER_DATA => {
                let data: RegisterData = record.view();
                let Some(head) = self.head else {
                    if let Some(skip) = &mut self.skip {
                        if data.key == skip.key && data.seq >= skip.next && data.seq < skip.end {
                            skip.next = data.seq + 1;
                            return Ok(false);
                        }
                    }
                    // A piece without its head: it and the pieces that follow it count
                    // as one refused registration.
                    self.skip = Some(Skip {
                        key: data.key,
                        next: data.seq.saturating_add(1),
                        end: pieces(MAX_REGISTER_DATA_LEN as u32),
                    });
                    return Err(RegisterError::Sequence);
                };
                let expected = self.received / REGISTER_DATA_PER_RECORD;
                if data.key != head.key || usize::from(data.seq) != expected {
                    // The offender took the place of piece `expected` (or belongs to
                    // another registration); the pending one's later pieces follow.
                    let next = expected as u16 + u16::from(data.key == head.key);
                    self.skip = Some(Skip {
                        key: head.key,
                        next,
                        end: pieces(head.data_len),
                    });
                    return Err(RegisterError::Sequence);
                }
                let want = head.data_len as usize - self.received;
                let take = want.min(REGISTER_DATA_PER_RECORD);
                // Bytes past `data_len` are ignored, like every reserved byte.
                self.bytes[self.received..self.received + take]
                    .copy_from_slice(&data.bytes[..take]);
                self.received += take;
                Ok(self.received == head.data_len as usize)
            }
            _ => self.interrupt().map(|()| false),
        }
    }
}

fn parse<'a>(head: &Register, data: &'a [u8]) -> Result<Registration<'a>, RegisterError> {
    let bad_len = RegisterError::DataLength(head.data_len);
    let name_len = usize::from(head.name_len);
    let name_bytes = data.get(..name_len).ok_or(bad_len)?;
    check_name(head.what, name_bytes)?;
    let name = core::str::from_utf8(name_bytes).map_err(|_| RegisterError::NameByte(0xff))?;
    let count = usize::from(head.label_count);
    if count > MAX_LABELS || (!head.what.has_labels() && count > 0) {
        return Err(RegisterError::LabelCount(count));
    }
    let mut labels = [Label::default(); MAX_LABELS];
    let mut rest = &data[name_len..];
    for i in 0..count {
        let (key, after) = take_prefixed(rest).ok_or(bad_len)?;
        let (value, after) = take_prefixed(after).ok_or(bad_len)?;
        rest = after;
        check_label_key(key).map_err(|()| RegisterError::LabelKey)?;
        if value.len() > MAX_LABEL_VALUE_LEN {
            return Err(RegisterError::LabelValue);
        }
        let value = check_value_text(value).map_err(|()| RegisterError::LabelValue)?;
        let key = core::str::from_utf8(key).map_err(|_| RegisterError::LabelKey)?;
        if labels[..i].iter().any(|l| l.key == key) {
            return Err(RegisterError::DuplicateLabel);
        }
        labels[i] = Label { key, value };
    }
    if !rest.is_empty() {
        return Err(bad_len);
    }
    Ok(Registration {
        key: head.key,
        what: head.what,
        name,
        labels,
        label_count: count,
    })
}

fn take_prefixed(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&len, rest) = bytes.split_first()?;
    let len = usize::from(len);
    (rest.len() >= len).then(|| rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(key: u32, what: RegisterKind, name: &str, labels: &[(&str, &str)]) {
        let mut out = [Record::default(); MAX_REGISTER_RECORDS];
        let n = encode_registration(key, what, name, labels, &mut out).expect("valid input");
        let mut buf = RegistrationBuf::new();
        for record in &out[..n - 1] {
            assert_eq!(buf.feed(record), Ok(None));
            assert!(buf.is_pending());
        }
        let reg = buf.feed(&out[n - 1]).expect("valid").expect("complete");
        assert_eq!((reg.key, reg.what, reg.name), (key, what, name));
        let got: std_like::Pairs = reg.labels().iter().map(|l| (l.key, l.value)).collect();
        assert_eq!(got.as_slice(), labels);
        assert!(!buf.is_pending());
    }

    /// A tiny fixed-capacity collection so the tests stay `no_std`.
    mod std_like {
        pub struct Pairs<'a>(pub [(&'a str, &'a str); 8], pub usize);
        impl<'a> FromIterator<(&'a str, &'a str)> for Pairs<'a> {
            fn from_iter<I: IntoIterator<Item = (&'a str, &'a str)>>(iter: I) -> Self {
                let mut p = Pairs([("", ""); 8], 0);
                for item in iter {
                    p.0[p.1] = item;
                    p.1 += 1;
                }
                p
            }
        }
        impl<'a> Pairs<'a> {
            pub fn as_slice(&self) -> &[(&'a str, &'a str)] {
                &self.0[..self.1]
            }
        }
    }

    #[test]
    fn registrations_round_trip() {
        round_trip(
            1,
            RegisterKind::COUNTER,
            "http.requests",
            &[("route", "/a"), ("status", "200")],
        );
        round_trip(2, RegisterKind::SPAN, "GET /users", &[]);
        round_trip(3, RegisterKind::STRING, "naïve value", &[]);
        round_trip(4, RegisterKind::ATTR, "db.rows", &[]);
        let long_value = "v".repeat(MAX_LABEL_VALUE_LEN);
        let long_key = "k".repeat(MAX_LABEL_KEY_LEN);
        let keys = ["a", "b", "c", "d", "e", "f", "g"];
        let mut labels = [("", ""); MAX_LABELS];
        for (i, k) in keys.iter().enumerate() {
            labels[i] = (k, long_value.as_str());
        }
        labels[7] = (long_key.as_str(), long_value.as_str());
        round_trip(
            u32::MAX,
            RegisterKind::HISTOGRAM,
            &"n".repeat(MAX_NAME_LEN),
            &labels,
        );
    }

    #[test]
    fn encoding_refuses_bad_input_and_writes_nothing() {
        let mut out = [Record::default(); MAX_REGISTER_RECORDS];
        let c = RegisterKind::COUNTER;
        assert_eq!(
            encode_registration(0, c, "a", &[], &mut out),
            Err(RegisterError::ZeroKey)
        );
        assert_eq!(
            encode_registration(1, RegisterKind(99), "a", &[], &mut out),
            Err(RegisterError::UnknownKind(99))
        );
        assert_eq!(
            encode_registration(1, c, "", &[], &mut out),
            Err(RegisterError::NameLength(0))
        );
        assert_eq!(
            encode_registration(1, c, "a=b", &[], &mut out),
            Err(RegisterError::NameByte(b'='))
        );
        assert_eq!(
            encode_registration(1, c, "a", &[("1x", "v")], &mut out),
            Err(RegisterError::LabelKey)
        );
        assert_eq!(
            encode_registration(1, c, "a", &[("k", "\n")], &mut out),
            Err(RegisterError::LabelValue)
        );
        assert_eq!(
            encode_registration(1, c, "a", &[("k", "1"), ("k", "2")], &mut out),
            Err(RegisterError::DuplicateLabel)
        );
        assert_eq!(
            encode_registration(1, RegisterKind::SPAN, "a", &[("k", "1")], &mut out),
            Err(RegisterError::LabelCount(1))
        );
        assert_eq!(
            encode_registration(1, c, "abc", &[], &mut out[..1]),
            Err(RegisterError::OutputTooSmall(2))
        );
        assert!(out.iter().all(|r| *r == Record::default()));
    }

    #[test]
    fn assembly_rejects_malformed_sequences() {
        let mut out = [Record::default(); MAX_REGISTER_RECORDS];
        let n = encode_registration(
            5,
            RegisterKind::GAUGE,
            "queue.depth.of.a.long.name",
            &[("q", "x")],
            &mut out,
        )
        .expect("valid");
        assert!(n >= 3);

        let mut buf = RegistrationBuf::new();
        assert_eq!(
            buf.feed(&out[2]),
            Err(RegisterError::Sequence),
            "data before head"
        );
        assert_eq!(buf.feed(&out[0]), Ok(None));
        assert_eq!(
            buf.feed(&out[2]),
            Err(RegisterError::Sequence),
            "skipped a piece"
        );
        assert!(!buf.is_pending());

        assert_eq!(buf.feed(&out[0]), Ok(None));
        assert_eq!(buf.interrupt(), Err(RegisterError::Interrupted));
        assert_eq!(buf.interrupt(), Ok(()));

        let mut head: Register = out[0].view();
        head.data_len = MAX_REGISTER_DATA_LEN as u32 + 1;
        let bad = Record::read_from_bytes(head.as_bytes()).expect("32 bytes");
        assert_eq!(
            buf.feed(&bad),
            Err(RegisterError::DataLength(head.data_len))
        );

        // Lie about the label count: the payload no longer parses.
        let mut head: Register = out[0].view();
        head.label_count = 2;
        let bad = Record::read_from_bytes(head.as_bytes()).expect("32 bytes");
        assert_eq!(buf.feed(&bad), Ok(None));
        let mut last = Ok(None);
        for r in &out[1..n] {
            last = buf.feed(r).map(|o| o.map(|r| r.key));
        }
        assert_eq!(last, Err(RegisterError::DataLength(head.data_len)));
    }

    fn encoded(what: RegisterKind, name: &str, labels: &[(&str, &str)]) -> ([Record; 38], usize) {
        let mut out = [Record::default(); MAX_REGISTER_RECORDS];
        let n = encode_registration(9, what, name, labels, &mut out).expect("valid input");
        (out, n)
    }

    /// Feeds `records` and returns the errors seen and the keys of the registrations
    /// completed.
    fn assemble(buf: &mut RegistrationBuf, records: &[Record]) -> (usize, [u32; 4]) {
        let (mut errors, mut done, mut n) = (0, [0u32; 4], 0);
        for r in records {
            let fed = if r.kind == RecordKind::REGISTER || r.kind == RecordKind::REGISTER_DATA {
                if r.kind == RecordKind::REGISTER && buf.interrupt().is_err() {
                    errors += 1;
                }
                buf.feed(r).map(|o| o.map(|reg| reg.key))
            } else {
                buf.interrupt().map(|()| None)
            };
            match fed {
                Ok(Some(key)) => {
                    done[n] = key;
                    n += 1;
                }
                Ok(None) => {}
                Err(_) => errors += 1,
            }
        }
        (errors, done)
    }

    #[test]
    fn span_attribute_and_string_registrations_carry_the_string_alone() {
        for (what, text) in [
            (RegisterKind::SPAN, "db.query"),
            (RegisterKind::ATTR, "db.rows"),
            (RegisterKind::STRING, "naïve, with \"quotes\" = fine"),
        ] {
            let (out, n) = encoded(what, text, &[]);
            assert_eq!(n, 1 + text.len().div_ceil(REGISTER_DATA_PER_RECORD));
            let head: Register = out[0].view();
            assert_eq!(head.what, what);
            assert_eq!(usize::from(head.name_len), text.len());
            assert_eq!(head.data_len as usize, text.len(), "data_len = name_len");
            assert_eq!(head.label_count, 0);
            assert_eq!(head.reserved, [0, 0]);
            let mut payload = [0u8; 3 * REGISTER_DATA_PER_RECORD];
            for (i, r) in out[1..n].iter().enumerate() {
                let d: RegisterData = r.view();
                assert_eq!(
                    (d.kind, d.seq, d.key),
                    (RecordKind::REGISTER_DATA, i as u16, 9)
                );
                payload[i * 24..i * 24 + 24].copy_from_slice(&d.bytes);
            }
            assert_eq!(&payload[..text.len()], text.as_bytes());
            assert!(
                payload[text.len()..].iter().all(|b| *b == 0),
                "zero padding"
            );
            round_trip(9, what, text, &[]);
        }
    }

    #[test]
    fn nothing_registered_may_be_empty_but_a_label_value() {
        let mut out = [Record::default(); MAX_REGISTER_RECORDS];
        for what in [1, 2, 3, 4, 5, 6].map(RegisterKind) {
            assert_eq!(
                encode_registration(1, what, "", &[], &mut out),
                Err(RegisterError::NameLength(0)),
                "{what:?}"
            );
        }
        assert_eq!(
            encode_registration(1, RegisterKind::COUNTER, "a", &[("", "v")], &mut out),
            Err(RegisterError::LabelKey)
        );
        round_trip(1, RegisterKind::COUNTER, "a", &[("k", "")]);
        // An empty head (name_len 0) is refused by the assembler too.
        let (recs, _) = encoded(RegisterKind::SPAN, "x", &[]);
        let mut head: Register = recs[0].view();
        head.name_len = 0;
        head.data_len = 0;
        let bad = Record::read_from_bytes(head.as_bytes()).expect("32 bytes");
        assert_eq!(
            RegistrationBuf::new().feed(&bad),
            Err(RegisterError::DataLength(0))
        );
    }

    #[test]
    fn spelling_rules_per_registered_kind() {
        let mut out = [Record::default(); MAX_REGISTER_RECORDS];
        let mut enc =
            |what, name: &str| encode_registration(1, what, name, &[], &mut out).map(|_| ());
        let (span, attr, string) = (RegisterKind::SPAN, RegisterKind::ATTR, RegisterKind::STRING);
        // Span names follow the series-name rules.
        assert_eq!(
            enc(span, "GET /users/:id ~ok "),
            Ok(()),
            "spaces inside and at the end"
        );
        assert_eq!(enc(span, " lead"), Err(RegisterError::NameByte(b' ')));
        for b in [b'"', b'\\', b'{', b'}', b'=', b','] {
            let name = [b'a', b];
            let name = core::str::from_utf8(&name).expect("ASCII");
            assert_eq!(enc(span, name), Err(RegisterError::NameByte(b)));
        }
        assert_eq!(
            enc(span, "caf\u{e9}"),
            Err(RegisterError::NameByte(0xc3)),
            "ASCII only"
        );
        assert_eq!(enc(span, &"s".repeat(96)), Ok(()));
        assert_eq!(
            enc(span, &"s".repeat(97)),
            Err(RegisterError::NameLength(97))
        );
        // Attribute keys follow the label-key rules, 1 to 32 bytes.
        assert_eq!(enc(attr, "db.rows_2"), Ok(()));
        assert_eq!(enc(attr, &"k".repeat(32)), Ok(()));
        assert!(enc(attr, &"k".repeat(33)).is_err());
        assert!(enc(attr, "2xx").is_err());
        assert!(enc(attr, ".x").is_err());
        assert!(enc(attr, "a-b").is_err());
        // String values: UTF-8 without control characters, 1 to 96 bytes.
        assert_eq!(
            enc(string, &"\u{e9}".repeat(48)),
            Ok(()),
            "96 bytes of 2-byte chars"
        );
        assert_eq!(
            enc(string, &"\u{e9}".repeat(49)),
            Err(RegisterError::NameLength(98))
        );
        assert_eq!(enc(string, "{a=b, \"c\\\"}"), Ok(()), "any printable text");
    }

    #[test]
    fn control_characters_are_exactly_c0_del_and_c1() {
        let refused = [
            '\u{0}', '\u{9}', '\u{1f}', '\u{7f}', '\u{80}', '\u{85}', '\u{9f}',
        ];
        let allowed = [
            ' ', '~', '\u{a0}', '\u{ad}', '\u{200b}', '\u{2028}', '\u{2029}', '\u{feff}',
        ];
        let mut out = [Record::default(); MAX_REGISTER_RECORDS];
        let mut buf = [0u8; 8];
        for (c, ok) in refused
            .iter()
            .map(|c| (c, false))
            .chain(allowed.iter().map(|c| (c, true)))
        {
            let text: &str = c.encode_utf8(&mut buf);
            let value =
                encode_registration(1, RegisterKind::COUNTER, "a", &[("k", text)], &mut out);
            let string = encode_registration(1, RegisterKind::STRING, text, &[], &mut out);
            assert_eq!(value.is_ok(), ok, "label value U+{:04X}", u32::from(*c));
            assert_eq!(string.is_ok(), ok, "string value U+{:04X}", u32::from(*c));
        }
        // The assembler (the consumer's side) applies the same rule: patch a valid
        // string registration's bytes into U+0085 and into malformed UTF-8.
        for patch in [&[0xc2u8, 0x85][..], &[0xc0, 0x80], &[0xed, 0xa0]] {
            let (mut recs, n) = encoded(RegisterKind::STRING, "ab", &[]);
            assert_eq!(n, 2);
            recs[1].as_mut_bytes()[8..10].copy_from_slice(patch);
            let mut assembler = RegistrationBuf::new();
            assert_eq!(assembler.feed(&recs[0]), Ok(None));
            assert!(assembler.feed(&recs[1]).is_err(), "{patch:x?} refused");
        }
    }

    #[test]
    fn reserved_bytes_of_a_registration_are_ignored() {
        let labels = [("route", "/a")];
        let (mut recs, n) = encoded(RegisterKind::COUNTER, "http.requests", &labels);
        let mut head: Register = recs[0].view();
        head.reserved = [u64::MAX, 0x5a5a];
        recs[0] = Record::read_from_bytes(head.as_bytes()).expect("32 bytes");
        let used = head.data_len as usize % REGISTER_DATA_PER_RECORD;
        assert!(used > 0, "the last piece has padding");
        for b in &mut recs[n - 1].as_mut_bytes()[8 + used..] {
            *b = 0xee;
        }
        let mut buf = RegistrationBuf::new();
        for r in &recs[..n - 1] {
            assert_eq!(buf.feed(r), Ok(None));
        }
        let reg = buf.feed(&recs[n - 1]).expect("accepted").expect("complete");
        assert_eq!((reg.key, reg.name), (9, "http.requests"));
        assert_eq!(
            reg.labels(),
            [Label {
                key: "route",
                value: "/a"
            }]
        );
    }

    #[test]
    fn a_refused_registration_costs_one_error_however_long() {
        let long = "v".repeat(60);
        let labels = [
            ("a", long.as_str()),
            ("b", long.as_str()),
            ("c", long.as_str()),
        ];
        let (good, n) = encoded(RegisterKind::GAUGE, "queue.depth", &labels);
        assert!(n >= 8, "a registration of many pieces: {n}");
        let sample = Record::gauge(9, 1);
        let next = encoded(RegisterKind::COUNTER, "after", &[]);
        let mut next_good = next.0;
        // The registration after each broken one has key 10.
        let mut head: Register = next_good[0].view();
        head.key = 10;
        next_good[0] = Record::read_from_bytes(head.as_bytes()).expect("32 bytes");
        for r in &mut next_good[1..next.1] {
            r.key = 10;
        }

        let mut cases: [([Record; 40], usize, &str); 6] = [([Record::default(); 40], 0, ""); 6];
        let mut build =
            |i: usize, what: &'static str, edit: &dyn Fn(&mut [Record; 40]) -> usize| {
                let mut seq = [Record::default(); 40];
                seq[..n].copy_from_slice(&good[..n]);
                let len = edit(&mut seq);
                cases[i] = (seq, len, what);
            };
        build(0, "head of an unknown kind", &|s| {
            s[0].flags = 77;
            n
        });
        build(1, "head with an impossible length", &|s| {
            s[0].words[0] = (s[0].words[0] & 0xffff_ffff) | (5000u64 << 32);
            n
        });
        build(2, "a piece out of sequence", &|s| {
            s[3].flags = 7;
            n
        });
        build(3, "interrupted by a sample", &|s| {
            s.copy_within(4..n, 5);
            s[4] = sample;
            n + 1
        });
        build(4, "spelling refused when complete", &|s| {
            s[n - 1].as_mut_bytes()[8] = 0x01;
            n
        });
        build(5, "pieces without a head", &|s| {
            s.copy_within(1..n, 0);
            n - 1
        });
        for (seq, len, what) in &cases {
            let mut records = [Record::default(); 60];
            records[..*len].copy_from_slice(&seq[..*len]);
            records[*len..*len + next.1].copy_from_slice(&next_good[..next.1]);
            let mut buf = RegistrationBuf::new();
            let (errors, done) = assemble(&mut buf, &records[..len + next.1]);
            assert_eq!(errors, 1, "{what}: one error");
            assert_eq!(done[0], 10, "{what}: the next registration is assembled");
        }
        // A new head inside a registration interrupts it and starts its own.
        let mut records = [Record::default(); 60];
        records[..3].copy_from_slice(&good[..3]);
        records[3..3 + next.1].copy_from_slice(&next_good[..next.1]);
        records[3 + next.1..3 + next.1 + n - 3].copy_from_slice(&good[3..n]);
        let (errors, done) = assemble(&mut RegistrationBuf::new(), &records[..next.1 + n]);
        assert_eq!(
            (errors, done[0]),
            (1, 10),
            "interrupted once, the new one assembled"
        );
    }
}
