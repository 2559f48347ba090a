//! Many clients at once: every record stored exactly once, ids unique and increasing,
//! each client's records in its own order.

mod common;

use common::{config, start, watchdog};
use logd::{Client, Level, Query, Record};

#[test]
fn concurrent_clients_each_get_every_record_stored_in_order() {
    let _w = watchdog(60, "concurrent_clients");
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let path = server.path().to_owned();
            std::thread::spawn(move || {
                let mut c = Client::connect(&path).unwrap();
                let mut ids = Vec::new();
                for b in 0..20 {
                    let batch: Vec<Record> = (0..10)
                        .map(|i| {
                            Record::new(Level::Info, "conc", format!("{t}/{b}/{i}"))
                                .field("t", t.to_string())
                        })
                        .collect();
                    ids.extend(c.append(&batch).unwrap().ids());
                    // Readers run alongside writers.
                    c.query(&Query::new().limit(5)).unwrap();
                }
                ids
            })
        })
        .collect();
    let per_thread: Vec<Vec<u64>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut c = Client::connect(server.path()).unwrap();
    let all = c.query_all(&Query::new().limit(333), 10_000).unwrap();
    assert_eq!(all.len(), 8 * 200);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    for (t, ids) in per_thread.iter().enumerate() {
        let mine: Vec<u64> = all
            .iter()
            .filter(|r| r.record.get("t") == Some(&t.to_string()))
            .map(|r| r.id)
            .collect();
        assert_eq!(&mine, ids);
        let msgs: Vec<String> = all
            .iter()
            .filter(|r| r.record.get("t") == Some(&t.to_string()))
            .map(|r| r.record.message.clone())
            .collect();
        let expected: Vec<String> = (0..20)
            .flat_map(|b| (0..10).map(move |i| format!("{t}/{b}/{i}")))
            .collect();
        assert_eq!(msgs, expected);
    }
    let s = c.stats().unwrap();
    assert_eq!(s.accepted, 1600);
    assert_eq!(s.rejected, logd::RejectCounts::default());
}

#[test]
fn pipelined_frames_each_get_their_own_reply_in_order() {
    let _w = watchdog(60, "pipelined_frames");
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let mut c = Client::connect(server.path()).unwrap();
    // More frames than one window, one of them refused (it claims an identity).
    let records: Vec<Record> = (0..1000)
        .map(|i| {
            let r = Record::new(Level::Info, "pipe", format!("m{i}"));
            if i == 600 {
                r.field("service", "someone-else")
            } else {
                r.field("i", i.to_string())
            }
        })
        .collect();
    let report = c.append_each(&records).unwrap();
    assert_eq!(report.statuses.len(), 1000);
    assert_eq!(report.accepted(), 999);
    assert!(
        report.statuses[600].id().is_none(),
        "{:?}",
        report.statuses[600]
    );
    let ids = report.ids();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase");
    // The connection is still in step: a plain request after the pipeline works.
    let stored = c.query_all(&Query::new().scope("pipe"), 10_000).unwrap();
    let messages: Vec<&str> = stored.iter().map(|r| r.record.message.as_str()).collect();
    let want: Vec<String> = (0..1000)
        .filter(|&i| i != 600)
        .map(|i| format!("m{i}"))
        .collect();
    assert_eq!(messages, want);
}

#[test]
fn a_malformed_frame_inside_a_pipelined_burst_gets_its_own_error_in_order() {
    use logd::frame::{self, Reply};
    let _w = watchdog(60, "pipelined_malformed");
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let mut c = Client::connect(server.path()).unwrap();
    let ok = |m: &str| frame::encode_append(&[Record::new(Level::Info, "burst", m)]);
    // An APPEND header whose body is three bytes of nothing: it cannot decode.
    let mut bad = vec![3, 0, 0, 0, 1, frame::KIND_APPEND, 0, 0];
    bad.extend_from_slice(&[9, 9, 9]);
    let mut burst = ok("first");
    burst.extend_from_slice(&bad);
    burst.extend_from_slice(&ok("third"));
    // One write; the replies are read one by one, in order.
    let first = c.request_raw(&burst).unwrap();
    let second = c.request_raw(&[]).unwrap();
    let third = c.request_raw(&[]).unwrap();
    let (Reply::Append(a), Reply::Error(e), Reply::Append(b)) = (first, second, third) else {
        panic!("expected APPEND_OK, ERROR, APPEND_OK");
    };
    assert_eq!((a.accepted(), b.accepted()), (1, 1));
    assert!(a.ids()[0] < b.ids()[0]);
    assert!(!e.message.is_empty());
    let stored = c.query_all(&Query::new().scope("burst"), 10).unwrap();
    let messages: Vec<&str> = stored.iter().map(|r| r.record.message.as_str()).collect();
    assert_eq!(messages, ["first", "third"]);
}
