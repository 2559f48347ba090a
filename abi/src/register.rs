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
/// Longest value of a [`RegisterKind::METADATA`] entry (a unit or a description), in
/// bytes (ABI 1.1).
pub const MAX_METADATA_VALUE_LEN: usize = 200;
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
    /// A metric's metadata (ABI 1.1): the name is the metric's name, the labels are
    /// `kind` (`counter`, `gauge` or `histogram`), `unit` and `description`, each
    /// optional but `kind`, values up to [`MAX_METADATA_VALUE_LEN`] bytes. No sample
    /// ever carries the key: the registration itself is the message.
    pub const METADATA: Self = Self(7);

    /// The kind's name, or `None` for a value this ABI version does not define.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::COUNTER => "counter",
            Self::GAUGE => "gauge",
            Self::HISTOGRAM => "histogram",
            Self::SPAN => "span",
            Self::ATTR => "attr",
            Self::STRING => "string",
            Self::METADATA => "metadata",
            _ => return None,
        })
    }

    const fn has_labels(self) -> bool {
        matches!(
            self,
            Self::COUNTER | Self::GAUGE | Self::HISTOGRAM | Self::METADATA
        )
    }

    /// Longest label value this kind takes.
    const fn max_value_len(self) -> usize {
        match self {
            Self::METADATA => MAX_METADATA_VALUE_LEN,
            _ => MAX_LABEL_VALUE_LEN,
        }
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
            Self::UnknownKind(k) => write!(f, "registered kind {k} is unknown, expected 1 to 7"),
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
                "label value must be at most {MAX_LABEL_VALUE_LEN} bytes (metadata values \
                 {MAX_METADATA_VALUE_LEN}) of UTF-8 without control characters"
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
        if v.len() > what.max_value_len() || check_value_text(v.as_bytes()).is_err() {
            return Err(RegisterError::LabelValue);
        }
        if labels[..i].iter().any(|(other, _)| other == k) {
            return Err(RegisterError::DuplicateLabel);
        }
        data_len += 2 + k.len() + v.len();
    }
    if data_len > MAX_REGISTER_DATA_LEN {
        // Only metadata's longer values can get here.
        return Err(RegisterError::DataLength(data_len as u32));
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
/// ring order; call [`RegistrationBuf::interrupt`] when any other record arrives.
#[derive(Clone, Debug)]
pub struct RegistrationBuf {
    head: Option<Register>,
    received: usize,
    bytes: [u8; MAX_REGISTER_DATA_LEN],
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
            bytes: [0; MAX_REGISTER_DATA_LEN],
        }
    }

    /// Whether a registration has started and is not yet complete.
    pub fn is_pending(&self) -> bool {
        self.head.is_some()
    }

    /// Abandons a pending registration because a record of another kind arrived.
    /// Returns [`RegisterError::Interrupted`] if one was pending.
    pub fn interrupt(&mut self) -> Result<(), RegisterError> {
        match self.head.take() {
            Some(_) => Err(RegisterError::Interrupted),
            None => Ok(()),
        }
    }

    /// Feeds one registration record. Returns the registration once its last piece
    /// has arrived, `Ok(None)` while more are expected, or why it was refused (the
    /// pending registration is then dropped).
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

    /// Ok(true): complete; Ok(false): more to come.
    fn feed_inner(&mut self, record: &Record) -> Result<bool, RegisterError> {
        match record.kind {
            RecordKind::REGISTER => {
                if self.head.take().is_some() {
                    // A well-formed ring never starts a registration inside another.
                    return Err(RegisterError::Interrupted);
                }
                let head: Register = record.view();
                self.received = 0;
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
                self.head = Some(head);
                Ok(false)
            }
            RecordKind::REGISTER_DATA => {
                let Some(head) = self.head else {
                    return Err(RegisterError::Sequence);
                };
                let data: RegisterData = record.view();
                if data.key != head.key
                    || usize::from(data.seq) * REGISTER_DATA_PER_RECORD != self.received
                {
                    return Err(RegisterError::Sequence);
                }
                let want = head.data_len as usize - self.received;
                let take = want.min(REGISTER_DATA_PER_RECORD);
                self.bytes[self.received..self.received + take]
                    .copy_from_slice(&data.bytes[..take]);
                self.received += take;
                Ok(self.received == head.data_len as usize)
            }
            _ => Err(RegisterError::Interrupted),
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
        if value.len() > head.what.max_value_len() {
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
        let description = "d".repeat(MAX_METADATA_VALUE_LEN);
        round_trip(
            5,
            RegisterKind::METADATA,
            "http.requests",
            &[
                ("kind", "counter"),
                ("unit", "bytes"),
                ("description", &description),
            ],
        );
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
        let too_long = "d".repeat(MAX_METADATA_VALUE_LEN + 1);
        assert_eq!(
            encode_registration(
                1,
                RegisterKind::METADATA,
                "a",
                &[("description", &too_long)],
                &mut out
            ),
            Err(RegisterError::LabelValue)
        );
        let long = "d".repeat(MAX_LABEL_VALUE_LEN + 1);
        assert_eq!(
            encode_registration(1, c, "a", &[("k", &long)], &mut out),
            Err(RegisterError::LabelValue),
            "only metadata takes long values"
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
}
