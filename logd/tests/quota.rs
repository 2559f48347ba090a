//! Quota isolation with real processes: senders flooding at full speed from their own
//! processes evict only their own records, never a quiet sender's.

mod common;

use std::process::Stdio;

use common::{config, flood_command, flood_from_env, start, watchdog};
use logd::{Client, Level, Query, Record};

fn quiet_batch(from: usize, n: usize) -> Vec<Record> {
    (from..from + n)
        .map(|i| Record::new(Level::Info, "quiet", format!("quiet {i}")).field("who", "quiet"))
        .collect()
}

#[test]
fn quota_isolation_flooders_cannot_evict_a_quiet_sender() {
    let _w = watchdog(120, "quota_isolation");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.journal.max_records = 1000;
    cfg.quota.records_per_sec = 1_000_000_000;
    cfg.quota.records_burst = 1_000_000_000;
    let server = start(cfg);

    let mut quiet = Client::connect(server.path()).unwrap();
    let mut ids = quiet.append(&quiet_batch(0, 20)).unwrap().ids();

    // Two other processes flood: 40 frames of 500 records each, as fast as they can.
    let flooders: Vec<_> = (0..2)
        .map(|_| {
            flood_command(server.path(), 40)
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // The quiet sender keeps trickling while they flood.
    for i in 0..20 {
        ids.extend(quiet.append(&quiet_batch(20 + i, 1)).unwrap().ids());
    }
    for mut f in flooders {
        assert!(f.wait().unwrap().success(), "flooder failed");
    }
    assert_eq!(ids.len(), 40);

    // Every quiet record is still there, in order.
    let mine = quiet
        .query_all(&Query::new().field("who", "quiet").limit(7), 1000)
        .unwrap();
    assert_eq!(mine.iter().map(|r| r.id).collect::<Vec<_>>(), ids);

    let s = quiet.stats().unwrap();
    assert!(s.journal_records <= 1000);
    assert_eq!(s.accepted, 40 + 2 * 40 * 500);
    let me = s
        .senders
        .iter()
        .find(|p| p.pid == Some(std::process::id()))
        .unwrap();
    assert_eq!((me.evicted, me.held_records), (0, 40));
    let floods: Vec<_> = s
        .senders
        .iter()
        .filter(|p| p.pid != Some(std::process::id()))
        .collect();
    assert_eq!(floods.len(), 2);
    for f in &floods {
        assert_eq!(f.accepted, 40 * 500);
        assert_eq!(f.accepted, f.evicted + f.held_records);
        assert!(f.evicted > 0);
    }
    assert_eq!(s.evicted, floods.iter().map(|f| f.evicted).sum::<u64>());
}

#[test]
#[ignore = "helper process for the quota test"]
fn flood_helper() {
    let _ = flood_from_env(|report| assert!(report.all_accepted()));
}
