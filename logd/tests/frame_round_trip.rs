//! Every reply logd encodes decodes back to itself, whatever it holds: generated
//! APPEND_OK, QUERY_OK, STATS_OK and ERROR replies, including the smallest items each
//! can carry (empty strings, empty lists).

use logd::frame::{self, ErrorReply, Header, QueryReply, Reply};
use logd::stats::DiskStats;
use logd::{
    AppendReport, Identity, Level, QueryPage, Reason, Record, RecordStatus, Reject, RejectCounts,
    SenderStats, Stats, StoredRecord,
};
use proptest::prelude::*;

fn split(frame: &[u8]) -> (Header, &[u8]) {
    let mut hb = [0u8; frame::HEADER_LEN];
    hb.copy_from_slice(&frame[..frame::HEADER_LEN]);
    (Header::parse(hb), &frame[frame::HEADER_LEN..])
}

fn decode(frame: &[u8]) -> Reply {
    let (h, body) = split(frame);
    assert_eq!(h.body_len as usize, body.len());
    frame::decode_reply(&h, body).expect("an encoded reply decodes")
}

/// Short strings, empty ones often: the minimum sizes are where decoders go wrong.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z]{1,3}", "\\PC{0,12}"]
}

fn level() -> impl Strategy<Value = Level> {
    (0u8..=4).prop_map(|v| Level::from_wire(v).expect("0-4 are levels"))
}

fn reject() -> impl Strategy<Value = Reject> {
    (1u8..=4).prop_map(|v| Reject::from_wire(v).expect("1-4 are classes"))
}

fn reason() -> impl Strategy<Value = Reason> {
    any::<u8>().prop_map(Reason::from_wire)
}

fn record() -> impl Strategy<Value = Record> {
    (
        level(),
        text(),
        text(),
        proptest::collection::vec((text(), text()), 0..3),
    )
        .prop_map(|(level, scope, message, fields)| {
            let mut r = Record::new(level, scope, message);
            r.fields = fields;
            r
        })
}

fn stored() -> impl Strategy<Value = StoredRecord> {
    (
        any::<u64>(),
        any::<u64>(),
        text(),
        any::<(u32, u32, u32)>(),
        record(),
    )
        .prop_map(
            |(id, received_ns, service, (pid, uid, gid), record)| StoredRecord {
                id,
                received_ns,
                sender: Identity {
                    service,
                    pid,
                    uid,
                    gid,
                },
                record,
            },
        )
}

fn rejects() -> impl Strategy<Value = RejectCounts> {
    any::<(u64, u64, u64, u64)>().prop_map(|(invalid_args, over_limit, rate_limited, internal)| {
        RejectCounts {
            invalid_args,
            over_limit,
            rate_limited,
            internal,
        }
    })
}

fn sender() -> impl Strategy<Value = SenderStats> {
    (
        text(),
        prop_oneof![Just(None), (1u32..).prop_map(Some)],
        any::<(u32, u32)>(),
        any::<(u64, u64, u64, u64)>(),
        rejects(),
    )
        .prop_map(
            |(
                service,
                pid,
                (uid, connections),
                (accepted, held_records, held_bytes, evicted),
                rejected,
            )| {
                SenderStats {
                    service,
                    pid,
                    uid,
                    connections,
                    accepted,
                    held_records,
                    held_bytes,
                    evicted,
                    rejected,
                }
            },
        )
}

fn stats() -> impl Strategy<Value = Stats> {
    (
        any::<(u64, u32, u64, u64)>(),
        rejects(),
        any::<(u64, u64, u64)>(),
        (any::<bool>(), any::<(u64, u64, u64, u64, u64)>()),
        proptest::collection::vec(sender(), 0..4),
    )
        .prop_map(
            |(
                (uptime_ms, connections, accepted, evicted),
                rejected,
                (journal_records, journal_bytes, next_id),
                (enabled, (bytes, segments, recovered, corrupt_skipped, errors)),
                senders,
            )| Stats {
                uptime_ms,
                connections,
                accepted,
                evicted,
                rejected,
                journal_records,
                journal_bytes,
                next_id,
                disk: DiskStats {
                    enabled,
                    bytes,
                    segments,
                    recovered,
                    corrupt_skipped,
                    errors,
                },
                senders,
            },
        )
}

fn status() -> impl Strategy<Value = RecordStatus> {
    prop_oneof![
        any::<u64>().prop_map(RecordStatus::Accepted),
        (reject(), reason()).prop_map(|(c, r)| RecordStatus::Rejected(c, r)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn append_ok_round_trips(statuses in proptest::collection::vec(status(), 0..8)) {
        let f = frame::encode_append_reply(&statuses);
        prop_assert_eq!(decode(&f), Reply::Append(AppendReport { statuses }));
    }

    #[test]
    fn query_ok_round_trips(records in proptest::collection::vec(stored(), 0..8),
                            next_cursor in any::<u64>(), more in any::<bool>()) {
        let mut page = QueryReply::new(1 << 20);
        for r in &records {
            prop_assert!(page.push(r));
        }
        let f = page.finish(next_cursor, more);
        prop_assert_eq!(decode(&f), Reply::Query(QueryPage { records, next_cursor, more }));
    }

    #[test]
    fn stats_ok_round_trips(s in stats()) {
        let f = frame::encode_stats_reply(&s);
        prop_assert_eq!(decode(&f), Reply::Stats(s));
    }

    #[test]
    fn error_round_trips(class in reject(), reason in reason(), message in text()) {
        let f = frame::encode_error(class, reason, &message);
        prop_assert_eq!(decode(&f), Reply::Error(ErrorReply { class, reason, message }));
    }
}
