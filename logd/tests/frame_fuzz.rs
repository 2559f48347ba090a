//! The frame decoders never panic on arbitrary bytes, and a live logd fed garbage keeps
//! serving.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{config, records, start, watchdog};
use logd::config::Limits;
use logd::frame::{self, Header};
use logd::{Client, Query};
use proptest::prelude::*;

fn header(kind: u8, version: u8, flags: u16, len: usize) -> Header {
    Header {
        body_len: u32::try_from(len).expect("test bodies are small"),
        version,
        kind,
        flags,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn request_decoder_never_panics(kind in any::<u8>(), version in 0u8..3, flags in 0u16..2,
                                    body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let h = header(kind, version, flags, body.len());
        if let Ok(frame::Request::Append(raws)) = frame::decode_request(&h, &body, &Limits::default()) {
            for r in raws {
                let _ = r.validate(&Limits::default());
            }
        }
    }

    #[test]
    fn reply_decoder_never_panics(kind in prop_oneof![Just(0x81u8), Just(0x82), Just(0x83), Just(0xff), any::<u8>()],
                                  body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let h = header(kind, 1, 0, body.len());
        let _ = frame::decode_reply(&h, &body);
    }

    #[test]
    fn mutated_valid_frames_never_panic(flip in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                                        cut in any::<prop::sample::Index>()) {
        let mut f = frame::encode_append(&records("fuzz", 3));
        f.extend(frame::encode_query(&Query::new().field("a", "b")));
        for (i, b) in flip {
            let i = i.index(f.len());
            f[i] ^= b;
        }
        let body = &f[frame::HEADER_LEN..];
        let body = &body[..cut.index(body.len() + 1)];
        for kind in [frame::KIND_APPEND, frame::KIND_QUERY, frame::KIND_STATS] {
            let _ = frame::decode_request(&header(kind, 1, 0, body.len()), body, &Limits::default());
        }
        for kind in [frame::KIND_APPEND_OK, frame::KIND_QUERY_OK, frame::KIND_STATS_OK, frame::KIND_ERROR] {
            let _ = frame::decode_reply(&header(kind, 1, 0, body.len()), body);
        }
    }
}

/// A bounded fuzz loop against a live server: 300 connections each sending random or
/// mutated bytes; afterwards logd still answers and has stored every honest record.
#[test]
fn live_server_survives_garbage() {
    let _w = watchdog(60, "live_fuzz");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.frame_timeout_ms = 200;
    let server = start(cfg);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let valid = frame::encode_append(&records("fuzz", 2));
    let mut honest = 0;
    for round in 0..300 {
        let mut s = UnixStream::connect(server.path()).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let bytes: Vec<u8> = if round % 2 == 0 {
            let n = usize::try_from(next() % 200).unwrap();
            (0..n)
                .map(|_| u8::try_from(next() & 0xff).unwrap())
                .collect()
        } else {
            let mut v = valid.clone();
            let i = usize::try_from(next()).unwrap() % v.len();
            v[i] ^= u8::try_from(next() & 0xff).unwrap() | 1;
            v
        };
        // The write may fail if logd already refused and closed: that is fine.
        let _ = s.write_all(&bytes);
        if round % 50 == 0 {
            let mut c = Client::connect(server.path()).unwrap();
            honest += c.append(&records("honest", 3)).unwrap().accepted();
        }
    }
    let mut c = Client::connect(server.path()).unwrap();
    let stored = c.query_all(&Query::new().scope("honest"), 1000).unwrap();
    assert_eq!(stored.len(), honest);
    assert_eq!(honest, 18);
    let s = c.stats().unwrap();
    assert!(s.rejected.invalid_args + s.rejected.over_limit > 0);
}
