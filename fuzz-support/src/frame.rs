//! `logd_frame`: logd's frame decoders, requests and replies, with a round trip of
//! everything they accept.
//!
//! The first byte picks the frame's kind (one of the seven, or any byte), the second its
//! version (mostly 1) and the rest is the body. An accepted request whose records all
//! validate re-encodes to the very bytes it came from; an accepted query and a STATS
//! request do too. An accepted reply re-encodes to a frame that decodes to an equal
//! reply (replies carry fields a decoder ignores or maps, so their bytes may differ).

use logd::config::Limits;
use logd::frame::{self, Header, QueryReply, Reply, Request};

use crate::input::Input;

const KINDS: [u8; 7] = [
    frame::KIND_APPEND,
    frame::KIND_QUERY,
    frame::KIND_STATS,
    frame::KIND_APPEND_OK,
    frame::KIND_QUERY_OK,
    frame::KIND_STATS_OK,
    frame::KIND_ERROR,
];

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let choice = input.u8();
    let kind = KINDS
        .get(usize::from(choice % 8))
        .copied()
        .unwrap_or(choice);
    let version = match input.u8() {
        v @ 0xf0.. => v & 0x0f,
        _ => frame::VERSION,
    };
    let body = input.bytes(usize::MAX);
    let header = Header {
        body_len: u32::try_from(body.len()).unwrap_or(u32::MAX),
        version,
        kind,
        flags: 0,
    };
    let mut whole = header_bytes(&header);
    whole.extend_from_slice(body);

    if kind & 0x80 == 0 {
        request(&header, body, &whole);
    } else {
        reply(&header, body);
    }
}

fn header_bytes(h: &Header) -> Vec<u8> {
    let mut b = h.body_len.to_le_bytes().to_vec();
    b.extend([h.version, h.kind]);
    b.extend(h.flags.to_le_bytes());
    b
}

fn request(header: &Header, body: &[u8], whole: &[u8]) {
    let limits = Limits::default();
    let decoded = match frame::decode_request(header, body, &limits) {
        Ok(r) => r,
        Err(reject) => {
            assert!(!reject.message.is_empty());
            return;
        }
    };
    assert_eq!(header.version, frame::VERSION);
    match decoded {
        Request::Append(raws) => {
            assert!(raws.len() <= limits.max_records_per_frame as usize);
            let records: Result<Vec<_>, _> = raws.iter().map(|r| r.validate(&limits)).collect();
            if let Ok(records) = records {
                for (raw, record) in raws.iter().zip(&records) {
                    assert_eq!(raw.scope, record.scope.as_bytes());
                    assert_eq!(raw.message, record.message.as_bytes());
                    assert_eq!(raw.fields.len(), record.fields.len());
                }
                assert_eq!(frame::encode_append(&records), whole, "APPEND round trip");
                assert_eq!(frame::append_frame_len(&records), whole.len());
            }
        }
        Request::Query(q) => assert_eq!(frame::encode_query(&q), whole, "QUERY round trip"),
        Request::Stats => assert_eq!(frame::encode_stats_request(), whole, "STATS round trip"),
    }
}

fn reply(header: &Header, body: &[u8]) {
    let Ok(decoded) = frame::decode_reply(header, body) else {
        return;
    };
    let again = match &decoded {
        Reply::Append(report) => frame::encode_append_reply(&report.statuses),
        Reply::Query(page) => {
            let mut reply = QueryReply::new(usize::MAX);
            for r in &page.records {
                assert!(reply.push(r), "an unbounded page takes every record");
            }
            reply.finish(page.next_cursor, page.more)
        }
        Reply::Stats(stats) => frame::encode_stats_reply(stats),
        Reply::Error(e) => frame::encode_error(e.class, e.reason, &e.message),
    };
    let (head, rest) = again.split_at(frame::HEADER_LEN);
    let mut h = [0u8; frame::HEADER_LEN];
    h.copy_from_slice(head);
    let h = Header::parse(h);
    assert_eq!(h.body_len as usize, rest.len());
    assert_eq!(h.kind, header.kind);
    match frame::decode_reply(&h, rest) {
        Ok(back) => assert_eq!(back, decoded, "reply round trip"),
        Err(e) => panic!("a re-encoded reply does not decode: {e}"),
    }
}
