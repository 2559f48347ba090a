//! Queries read the disk journal too: records evicted from memory (fair-share eviction
//! under `journal.max_records`) are still answered, in id order, with the filters
//! applied, and paging moves on into memory without a gap or a duplicate.

mod common;

use common::{config, records, start, watchdog};
use logd::{Client, Query};

#[test]
fn queries_read_records_evicted_from_memory_back_from_disk() {
    let _w = watchdog(60, "disk_query");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.journal_dir = Some(dir.path().join("journal"));
    cfg.journal.max_records = 100;
    let server = start(cfg);
    let mut c = Client::connect(dir.path().join("logd.sock")).unwrap();
    let mut ids = Vec::new();
    for batch in 0..10 {
        let scope = if batch % 2 == 0 { "even" } else { "odd" };
        ids.extend(c.append(&records(scope, 100)).unwrap().ids());
    }
    assert_eq!(ids.len(), 1000);
    // Memory holds the newest 100; all 1000 come back, in order, paged.
    let all = c.query_all(&Query::new().limit(64), 1_000_000).unwrap();
    assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
    // Filters apply on disk as in memory.
    let odd = c.query_all(&Query::new().scope("odd"), 1_000_000).unwrap();
    assert_eq!(odd.len(), 500);
    assert!(odd.iter().all(|r| r.record.scope == "odd"));
    let one = c
        .query_all(&Query::new().scope("even").field("i", "7"), 1_000_000)
        .unwrap();
    assert_eq!(one.len(), 5, "one per even batch");
    // A cursor in the middle of the evicted range.
    let later = c
        .query_all(&Query::new().cursor(ids[449]), 1_000_000)
        .unwrap();
    assert_eq!(later.iter().map(|r| r.id).collect::<Vec<_>>(), ids[450..]);
    drop(c);
    server.shutdown().unwrap();
}
