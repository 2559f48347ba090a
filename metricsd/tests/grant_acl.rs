//! Who may ask for rings and how much shared memory they get: the `[grants]` policy and
//! the ring-byte bounds (`rings.max_total_bytes`, `rings.max_bytes_per_uid`) under a
//! flood of grant requests from many connections and services, and, as root, from
//! processes of two uids.

#![expect(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use common::{Control, config, start, watchdog};
use logd::IdSpec;
use metricsd::config::ring_bytes;
use metricsd::{Daemon, MemorySink, Peer};
use telemetry_abi::GrantStatus;

/// What one flooding connection got; the connection and its rings are held until the
/// tally is dropped.
struct Tally {
    granted_bytes: u64,
    over_limit: u64,
    rings: Vec<OwnedFd>,
    conn: Control,
}

/// `connections` connections on `threads` threads, each asking `requests` times for
/// rings of 1024 to 16384 records, keeping every ring granted.
fn flood(socket: &Path, threads: usize, connections: usize, requests: usize) -> Vec<Tally> {
    let out = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for t in 0..threads {
            let out = Arc::clone(&out);
            s.spawn(move || {
                let mut tallies: Vec<Tally> = (0..connections)
                    .map(|_| Tally {
                        granted_bytes: 0,
                        over_limit: 0,
                        rings: Vec::new(),
                        conn: Control::connect(socket),
                    })
                    .collect();
                for r in 0..requests {
                    for tally in &mut tallies {
                        let capacity = 1024u32 << ((t + r) % 5);
                        let (resp, fd) = tally.conn.request(capacity);
                        match resp.status {
                            GrantStatus::OK => {
                                tally.granted_bytes += ring_bytes(resp.capacity);
                                tally.rings.push(fd.unwrap());
                            }
                            GrantStatus::OVER_LIMIT => tally.over_limit += 1,
                            other => panic!("unexpected status {other:?}"),
                        }
                    }
                }
                // Keep the connections (and so the rings) until the checks are done.
                out.lock().unwrap().extend(tallies);
            });
        }
    });
    Arc::try_unwrap(out).ok().unwrap().into_inner().unwrap()
}

/// A daemon whose connections belong to 12 services in turn, with ring counts and
/// request rates that never bind, so only the byte bounds do.
fn flood_daemon(dir: &Path, total: u64, per_uid: u64) -> metricsd::DaemonHandle {
    let mut cfg = config(dir);
    cfg.rings.max_total = 65536;
    cfg.rings.per_service = 65536;
    cfg.rings.grant_burst = 1_000_000;
    cfg.rings.grant_rate_per_sec = 1_000_000;
    cfg.rings.max_total_bytes = total;
    cfg.rings.max_bytes_per_uid = per_uid;
    let daemon = Daemon::new(cfg)
        .identify(|peer: &Peer| format!("svc{}", peer.connection % 12))
        .sink(MemorySink::new())
        .spawn()
        .unwrap();
    daemon.wait_ready(common::WAIT).unwrap();
    daemon
}

fn check_bound(tallies: &[Tally], daemon: &metricsd::DaemonHandle, bound: u64, reason: &str) {
    let granted: u64 = tallies.iter().map(|t| t.granted_bytes).sum();
    let refused: u64 = tallies.iter().map(|t| t.over_limit).sum();
    let snap = daemon.snapshot().unwrap();
    assert!(
        granted <= bound,
        "{granted} ring bytes granted past the bound of {bound}"
    );
    assert!(refused > 0, "the flood never reached the bound of {bound}");
    // The smallest ring still fitted while the flood lasted: the bound, not something
    // else, stopped it.
    assert!(
        granted + ring_bytes(1024 << 4) > bound,
        "only {granted} of {bound} bytes granted"
    );
    assert_eq!(snap.grant.ring_bytes, granted, "metricsd's own count");
    assert!(snap.grant.ring_bytes_peak <= bound);
    assert_eq!(snap.grant.refused.get("over_limit"), Some(&refused));
    assert_eq!(snap.grant.refused_reasons.get(reason), Some(&refused));
}

#[test]
fn ring_bytes_total_bound_holds_under_a_grant_flood() {
    watchdog();
    let dir = tempfile::tempdir().unwrap();
    let bound = 100 * ring_bytes(1024);
    let daemon = flood_daemon(dir.path(), bound, u64::MAX / 2);
    let tallies = flood(daemon.socket_path(), 8, 6, 12);
    check_bound(&tallies, &daemon, bound, "total_bytes");
    drop(tallies);
    daemon.shutdown();
}

#[test]
fn ring_bytes_per_uid_bound_holds_under_a_grant_flood() {
    watchdog();
    let dir = tempfile::tempdir().unwrap();
    let bound = 60 * ring_bytes(1024);
    let daemon = flood_daemon(dir.path(), u64::MAX / 2, bound);
    let tallies = flood(daemon.socket_path(), 8, 6, 12);
    check_bound(&tallies, &daemon, bound, "uid_bytes");
    daemon.shutdown();
}

#[test]
fn ring_bytes_are_released_when_a_connection_closes() {
    watchdog();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.rings.max_bytes_per_uid = 3 * ring_bytes(1024);
    let (daemon, _sink) = start(cfg, &["a", "b"]);
    let a = Control::connect(daemon.socket_path());
    let kept: Vec<_> = (0..3).map(|_| a.ring(1024)).collect();
    let b = Control::connect(daemon.socket_path());
    assert_eq!(b.request(1024).0.status, GrantStatus::OVER_LIMIT);
    drop(kept);
    drop(a);
    let deadline = std::time::Instant::now() + common::WAIT;
    while b.request(1024).0.status != GrantStatus::OK {
        assert!(std::time::Instant::now() < deadline, "bytes never released");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    daemon.shutdown();
}

#[test]
fn acl_grant_policy_refuses_unlisted_peers_and_counts_them() {
    watchdog();
    let dir = tempfile::tempdir().unwrap();
    let me = rustix::process::getuid().as_raw();
    let mut cfg = config(dir.path());
    // Listed: a uid that is not ours, and the service "web".
    cfg.grants.uids = vec![IdSpec::Id(me.wrapping_add(1))];
    cfg.grants.services = vec!["web".into()];
    let (daemon, _sink) = start(cfg, &["other", "web"]);
    let other = Control::connect(daemon.socket_path());
    for _ in 0..3 {
        let (resp, fd) = other.request(0);
        assert_eq!(resp.status, GrantStatus::DENIED);
        assert!(fd.is_none());
    }
    let web = Control::connect(daemon.socket_path());
    let (resp, fd) = web.request(0);
    assert_eq!(resp.status, GrantStatus::OK);
    assert!(fd.is_some());
    let snap = daemon.snapshot().unwrap();
    assert_eq!(snap.grant.refused.get("denied"), Some(&3));
    assert_eq!(snap.grant.refused_reasons.get("policy"), Some(&3));
    assert_eq!(snap.grant.granted, 1);
    daemon.shutdown();
}

#[test]
fn acl_ring_bytes_are_bounded_per_uid_across_two_uids() {
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "SKIPPED acl_ring_bytes_are_bounded_per_uid_across_two_uids: it runs producers \
             under two other uids and needs root (CI runs it as root); nothing was checked"
        );
        return;
    }
    watchdog();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("grant-child");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bound = 40 * ring_bytes(1024);
    let mut cfg = config(dir.path());
    cfg.rings.grant_burst = 1_000_000;
    cfg.rings.grant_rate_per_sec = 1_000_000;
    cfg.rings.max_bytes_per_uid = bound;
    let (daemon, _sink) = start(cfg, &["flood"]);
    // Each child floods from four connections, reports, and holds its rings until its
    // stdin closes; the second floods while the first holds a full budget.
    let mut children = Vec::new();
    let mut granted = HashMap::new();
    for uid in [61001u32, 61002] {
        let mut child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "grant_flood_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("METRICSD_FLOOD_SOCKET", daemon.socket_path())
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("granted-bytes: ") {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "uid {uid}'s child ended early"
            );
        }
        let n = line.split_once("granted-bytes: ").unwrap().1.trim();
        granted.insert(uid, n.parse::<u64>().unwrap());
        children.push((child, out));
    }
    let snap = daemon.snapshot().unwrap();
    for (uid, g) in &granted {
        assert!(
            *g <= bound,
            "uid {uid} got {g} bytes past the per-uid bound {bound}"
        );
        assert!(*g > 0, "uid {uid} got nothing");
    }
    let sum: u64 = granted.values().sum();
    assert!(
        sum > bound,
        "the second uid was held back by the first's use: {granted:?}"
    );
    assert_eq!(snap.grant.ring_bytes, sum);
    assert!(
        snap.grant
            .refused_reasons
            .get("uid_bytes")
            .copied()
            .unwrap_or(0)
            > 0
    );
    for (mut c, mut out) in children {
        drop(c.stdin.take());
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        assert!(c.wait().unwrap().success(), "a child failed: {rest}");
    }
    daemon.shutdown();
}

/// The child side of [`acl_ring_bytes_are_bounded_per_uid_across_two_uids`].
#[test]
#[ignore = "run as a child process by acl_ring_bytes_are_bounded_per_uid_across_two_uids"]
fn grant_flood_child() {
    let Ok(socket) = std::env::var("METRICSD_FLOOD_SOCKET") else {
        return;
    };
    let tallies = flood(Path::new(&socket), 1, 4, 30);
    let granted: u64 = tallies.iter().map(|t| t.granted_bytes).sum();
    println!("granted-bytes: {granted}");
    std::io::stdout().flush().unwrap();
    let mut rest = String::new();
    let _ = std::io::stdin().read_line(&mut rest);
    drop(tallies);
}

#[test]
fn acl_serve_as_root_drops_to_the_configured_user_after_binding() {
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "SKIPPED acl_serve_as_root_drops_to_the_configured_user_after_binding: it needs \
             root to switch users (CI runs it as root); nothing was checked"
        );
        return;
    }
    watchdog();
    const USER: u32 = 61001;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("m.sock");
    let logd_sock = dir.path().join("l.sock");
    let logd = common::start_logd(&logd_sock);
    let cfg_path = dir.path().join("metricsd.toml");
    std::fs::write(&cfg_path, "[export]\ninterval_ms = 100\nretry_ms = 20\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_metricsd"))
        .arg("serve")
        .arg("--config")
        .arg(&cfg_path)
        .arg("--socket")
        .arg(&sock)
        .arg("--logd-socket")
        .arg(&logd_sock)
        .args(["--user", &USER.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), "metricsd: ready");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let field = |key: &str| {
        let l = status.lines().find_map(|l| l.strip_prefix(key)).unwrap();
        l.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let want = format!("{USER} {USER} {USER} {USER}");
    assert_eq!(field("Uid:"), want);
    assert_eq!(field("Gid:"), want);
    assert_eq!(field("Groups:"), USER.to_string());
    assert_eq!(field("CapEff:"), "0000000000000000");
    // It still grants rings (memfds made as the new user) and its exports reach logd
    // stamped with the new uid.
    let c = Control::connect(&sock);
    let (resp, fd) = c.request(1024);
    assert_eq!(resp.status, GrantStatus::OK);
    assert!(fd.is_some());
    let mut client = logd::Client::connect(&logd_sock).unwrap();
    let start = client
        .query_all(&logd::Query::new().scope("metricsd"), 100)
        .unwrap();
    assert!(
        !start.is_empty() && start.iter().all(|r| r.sender.uid == USER),
        "{start:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
    logd.shutdown().unwrap();
}
