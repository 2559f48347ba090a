//! QUERY: filters, paging with cursors, long polling, identity stamping and policy.

mod common;

use std::time::Duration;

use common::{config, my_uid, records, start, watchdog};
use logd::policy::ServiceRule;
use logd::{Client, Level, Query, Record};

#[test]
fn filters_select_by_service_scope_level_time_and_field() {
    let _w = watchdog(30, "query_filters");
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let mut c = Client::connect(server.path()).unwrap();
    let batch = vec![
        Record::new(Level::Debug, "net.tcp", "connect").field("peer", "a"),
        Record::new(Level::Warn, "net.udp", "drop").field("peer", "b"),
        Record::new(Level::Error, "disk", "full").field("dev", "sda"),
        Record::new(Level::Info, "net", "up")
            .field("peer", "a")
            .field("dev", "eth0"),
    ];
    c.append(&batch).unwrap();
    let msgs = |c: &mut Client, q: Query| -> Vec<String> {
        c.query(&q)
            .unwrap()
            .records
            .into_iter()
            .map(|r| r.record.message)
            .collect()
    };
    assert_eq!(msgs(&mut c, Query::new()).len(), 4);
    assert_eq!(
        msgs(&mut c, Query::new().scope("net.*")),
        ["connect", "drop"]
    );
    assert_eq!(msgs(&mut c, Query::new().scope("net")), ["up"]);
    assert_eq!(
        msgs(&mut c, Query::new().min_level(Level::Warn)),
        ["drop", "full"]
    );
    assert_eq!(
        msgs(&mut c, Query::new().field("peer", "a")),
        ["connect", "up"]
    );
    assert_eq!(
        msgs(&mut c, Query::new().field("peer", "a").field("dev", "eth0")),
        ["up"]
    );
    let me = format!("uid:{}", my_uid());
    assert_eq!(msgs(&mut c, Query::new().service(me)).len(), 4);
    assert!(msgs(&mut c, Query::new().service("nobody")).is_empty());

    let all = c.query(&Query::new()).unwrap().records;
    let t = all[0].received_ns;
    assert_eq!(msgs(&mut c, Query::new().until_ns(t)).len(), 0);
    assert_eq!(
        msgs(&mut c, Query::new().since_ns(t).until_ns(t + 1)).len(),
        4
    );
}

#[test]
fn pages_follow_the_cursor_in_record_order() {
    let _w = watchdog(30, "query_paging");
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let mut c = Client::connect(server.path()).unwrap();
    let ids = c.append(&records("p", 25)).unwrap().ids();
    let mut q = Query::new().limit(10);
    let mut seen = Vec::new();
    let mut mores = Vec::new();
    loop {
        let page = c.query(&q).unwrap();
        seen.extend(page.records.iter().map(|r| r.id));
        mores.push(page.more);
        if !page.more {
            break;
        }
        q = q.cursor(page.next_cursor);
    }
    assert_eq!(seen, ids);
    assert_eq!(mores, [true, true, false]);
    // Caught up: an empty page that keeps the cursor.
    let page = c.query(&Query::new().cursor(ids[24])).unwrap();
    assert!(page.records.is_empty() && !page.more);
    assert_eq!(page.next_cursor, ids[24]);
    // A filtered query's cursor skips what it examined.
    let page = c.query(&Query::new().field("i", "3")).unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.next_cursor, ids[24]);
}

#[test]
fn long_poll_returns_a_record_appended_while_waiting() {
    let _w = watchdog(30, "query_long_poll");
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path()));
    let path = server.path().to_owned();
    let waiter = std::thread::spawn(move || {
        let mut c = Client::connect(&path).unwrap();
        c.query(&Query::new().scope("late").wait_ms(20_000))
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut c = Client::connect(server.path()).unwrap();
    c.append(&records("early", 1)).unwrap();
    let id = c.append(&records("late", 1)).unwrap().ids()[0];
    let page = waiter.join().unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.records[0].id, id);
}

#[test]
fn policy_names_the_sender_and_the_stamp_is_the_kernels() {
    let _w = watchdog(30, "query_policy");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.services = vec![ServiceRule {
        name: "tester".into(),
        uid: my_uid(),
    }];
    let server = start(cfg);
    let mut c = Client::connect(server.path()).unwrap();
    c.append(&records("x", 2)).unwrap();
    let page = c.query(&Query::new().service("tester")).unwrap();
    assert_eq!(page.records.len(), 2);
    for r in &page.records {
        assert_eq!(r.sender.service, "tester");
        assert_eq!(r.sender.pid, std::process::id());
        assert_eq!(r.sender.uid, my_uid());
        assert_eq!(r.sender.gid, rustix::process::getgid().as_raw());
        assert!(r.received_ns > 0);
    }
    let s = c.stats().unwrap();
    assert_eq!(s.senders[0].service, "tester");
}

#[test]
fn a_page_of_the_smallest_records_reads_back() {
    // A one-byte service name and records with an empty scope and message are the
    // smallest stored records logd writes (46 bytes); every client path must read a page
    // of them.
    let _w = watchdog(30, "query_short_records");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.services = vec![ServiceRule {
        name: "a".into(),
        uid: my_uid(),
    }];
    let server = start(cfg);
    let mut c = Client::connect(server.path()).unwrap();
    let empty = vec![Record::new(Level::Info, "", ""); 5];
    let ids = c.append(&empty).unwrap().ids();
    assert_eq!(ids.len(), 5);

    let page = c.query(&Query::new().service("a")).unwrap();
    assert_eq!(page.records.len(), 5);
    for (r, id) in page.records.iter().zip(&ids) {
        assert_eq!(r.id, *id);
        assert_eq!(r.sender.service, "a");
        assert_eq!(r.record, Record::new(Level::Info, "", ""));
        assert_eq!(logd::frame::stored_record_len(r), 46);
    }
    let all: Vec<u64> = c
        .query_all(&Query::new().service("a").limit(2), 100)
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(all, ids);
}
