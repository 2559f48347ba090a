//! `registration`: the registration assembler ([`RegistrationBuf`]) and encoder
//! ([`encode_registration`]).
//!
//! The first byte picks a mode. Assembly mode feeds a stream of register, register-data
//! and other records, each shaped by the input, and checks every registration the
//! assembler accepts: the limits of `abi/README.md` hold, and it encodes and assembles
//! back to itself. Encoding mode builds a registration from the input and checks that
//! anything the encoder accepts, the assembler returns unchanged.

use telemetry_abi::{
    MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN, MAX_LABELS, MAX_NAME_LEN, MAX_REGISTER_DATA_LEN,
    MAX_REGISTER_RECORDS, Record, RecordKind, Register, RegisterData, RegisterKind, Registration,
    RegistrationBuf, encode_registration,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::input::Input;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    if input.u8() % 2 == 0 {
        assemble(&mut input);
    } else {
        encode(&mut input);
    }
}

fn assemble(input: &mut Input<'_>) {
    let mut buf = RegistrationBuf::new();
    // The head most recently fed, so data records can follow it in sequence.
    let mut head: Option<Register> = None;
    let mut next_seq = 0u16;
    while !input.is_empty() {
        let choice = input.u8();
        let mut record = Record::read_from_bytes(&input.array::<32>()).unwrap_or_default();
        match choice % 8 {
            // A head: a defined kind most of the time, small lengths.
            0..=1 => {
                let mut h: Register = record.view();
                h.kind = RecordKind::REGISTER;
                if choice & 0x10 == 0 {
                    h.what = RegisterKind(1 + u16::from(choice >> 5) % 6);
                    h.name_len %= 128;
                    h.label_count %= 10;
                    h.data_len %= MAX_REGISTER_DATA_LEN as u32 + 8;
                }
                if choice & 0x20 == 0 {
                    h.reserved = [0; 2];
                }
                record = Record::read_from_bytes(h.as_bytes()).unwrap_or_default();
            }
            // The next piece of the current registration, in sequence.
            2..=5 => {
                let mut d: RegisterData = record.view();
                d.kind = RecordKind::REGISTER_DATA;
                if let Some(h) = head {
                    if choice & 0x80 == 0 {
                        d.key = h.key;
                        d.seq = next_seq;
                    }
                }
                next_seq = next_seq.wrapping_add(1);
                record = Record::read_from_bytes(d.as_bytes()).unwrap_or_default();
            }
            // Another record in between: the drain loop interrupts the registration.
            6 => {
                let was_pending = buf.is_pending();
                assert_eq!(buf.interrupt().is_err(), was_pending);
                assert!(!buf.is_pending());
                continue;
            }
            // Anything at all, fed as it is.
            _ => {}
        }
        let kind = record.kind;
        if kind == RecordKind::REGISTER {
            head = Some(record.view());
            next_seq = 0;
        }
        let was_pending = buf.is_pending();
        let result = buf.feed(&record);
        if kind != RecordKind::REGISTER && kind != RecordKind::REGISTER_DATA {
            // Any other record is an interruption: it refuses a pending registration
            // and is otherwise nothing to the assembler.
            assert!(
                matches!(result, Ok(None) | Err(_)) && result.is_err() == was_pending,
                "a record of kind {kind:?} fed to the assembler (pending: {was_pending})"
            );
        }
        match result {
            Ok(Some(reg)) => {
                let data_len = head.map_or(0, |h| h.data_len);
                check_accepted(&reg, data_len);
                assert!(!buf.is_pending());
            }
            // An accepted head waits for its pieces; a piece may be assembled or passed
            // over (the rest of a refused registration); anything else interrupts.
            Ok(None) if kind == RecordKind::REGISTER => assert!(buf.is_pending()),
            Ok(None) => {}
            Err(e) => {
                assert!(!e.to_string().is_empty());
                assert!(!buf.is_pending(), "a refused registration stays pending");
            }
        }
    }
}

/// What every accepted registration satisfies, checked independently of the parser,
/// then the round trip through the encoder.
fn check_accepted(reg: &Registration<'_>, data_len: u32) {
    assert_ne!(reg.key, 0);
    assert!(reg.what.name().is_some(), "kind {:?}", reg.what);
    assert!((1..=MAX_NAME_LEN).contains(&reg.name.len()), "{reg:?}");
    assert!(!reg.name.chars().any(char::is_control), "{reg:?}");
    let series = matches!(
        reg.what,
        RegisterKind::COUNTER | RegisterKind::GAUGE | RegisterKind::HISTOGRAM
    );
    if series || reg.what == RegisterKind::SPAN {
        assert!(
            reg.name.bytes().all(|b| (0x20..0x7f).contains(&b)
                && !matches!(b, b'"' | b'\\' | b'{' | b'}' | b'=' | b',')),
            "{reg:?}"
        );
        assert!(!reg.name.starts_with(' '), "{reg:?}");
    }
    let labels = reg.labels();
    assert!(labels.len() <= MAX_LABELS && (series || labels.is_empty()));
    let mut payload = reg.name.len();
    for (i, l) in labels.iter().enumerate() {
        assert!((1..=MAX_LABEL_KEY_LEN).contains(&l.key.len()), "{reg:?}");
        assert!(l.value.len() <= MAX_LABEL_VALUE_LEN, "{reg:?}");
        assert!(!l.value.chars().any(char::is_control), "{reg:?}");
        assert!(labels[..i].iter().all(|o| o.key != l.key), "{reg:?}");
        payload += 2 + l.key.len() + l.value.len();
    }
    assert_eq!(payload, data_len as usize, "payload length of {reg:?}");

    let pairs: Vec<(&str, &str)> = labels.iter().map(|l| (l.key, l.value)).collect();
    let mut out = [Record::default(); MAX_REGISTER_RECORDS];
    let n = encode_registration(reg.key, reg.what, reg.name, &pairs, &mut out)
        .unwrap_or_else(|e| panic!("accepted {reg:?} but the encoder refuses it: {e}"));
    assert_eq!(n, 1 + (data_len as usize).div_ceil(24));
    let back = assemble_all(&out[..n]);
    assert_eq!(back.as_ref(), Some(&Owned::of(reg)));
}

/// A registration with owned strings, to compare across assemblers.
#[derive(Debug, PartialEq, Eq)]
struct Owned {
    key: u32,
    what: RegisterKind,
    name: String,
    labels: Vec<(String, String)>,
}

impl Owned {
    fn of(reg: &Registration<'_>) -> Self {
        Self {
            key: reg.key,
            what: reg.what,
            name: reg.name.to_owned(),
            labels: reg
                .labels()
                .iter()
                .map(|l| (l.key.to_owned(), l.value.to_owned()))
                .collect(),
        }
    }
}

/// Feeds `records` to a fresh assembler: the registration, once all have arrived.
fn assemble_all(records: &[Record]) -> Option<Owned> {
    let mut buf = RegistrationBuf::new();
    let (last, rest) = records.split_last()?;
    for r in rest {
        assert_eq!(buf.feed(r), Ok(None), "an encoded piece was refused");
    }
    match buf.feed(last) {
        Ok(Some(reg)) => Some(Owned::of(&reg)),
        other => panic!("the last encoded piece gave {other:?}"),
    }
}

/// Text from input bytes, one char per byte (Latin-1): ASCII as it is, the rest as
/// two-byte UTF-8, C1 controls included.
fn text(input: &mut Input<'_>, max: u8) -> String {
    let n = input.below(max);
    input
        .bytes(usize::from(n))
        .iter()
        .map(|&b| char::from(b))
        .collect()
}

fn encode(input: &mut Input<'_>) {
    let key = match input.below(4) {
        0 => 0,
        1 => u32::MAX,
        _ => u32::from(input.u8()),
    };
    let what = RegisterKind(u16::from(input.below(8)));
    let name = text(input, MAX_NAME_LEN as u8 + 8);
    let count = input.below(MAX_LABELS as u8 + 2);
    let labels: Vec<(String, String)> = (0..count)
        .map(|_| {
            let k = text(input, MAX_LABEL_KEY_LEN as u8 + 4);
            (k, text(input, MAX_LABEL_VALUE_LEN as u8 + 4))
        })
        .collect();
    let pairs: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut out = [Record::default(); MAX_REGISTER_RECORDS];
    match encode_registration(key, what, &name, &pairs, &mut out) {
        Ok(n) => {
            let expected = Owned {
                key,
                what,
                name,
                labels,
            };
            assert_eq!(assemble_all(&out[..n]), Some(expected));
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(
                out.iter().all(|r| *r == Record::default()),
                "refused, yet wrote"
            );
        }
    }
}
