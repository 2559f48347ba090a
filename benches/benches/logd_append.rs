//! APPEND throughput of logd over a real Unix socket with the disk journal on, against
//! `rsyslogd` receiving over a Unix socket and writing to a file, in the same run.
//!
//! Contenders (each a round of 100 records shaped like metricsd exports, one
//! throughput unit per record):
//!
//! - `logd journal/one_record_per_frame`: one APPEND per record, each answered (a round
//!   trip per record) after its write to the active segment;
//! - `logd journal/one_record_per_frame_pipelined`: one APPEND per record, all 100
//!   written before their replies are read (`Client::append_each`);
//! - `logd journal/batched_100_per_frame`: one APPEND of 100 records, one write;
//! - `logd journal/batched_1000_per_frame`: ten rounds' worth per APPEND;
//! - `logd journal fsync/batched_100_per_frame`: `journal.fsync = true`, every APPEND's
//!   reply waits for an `fdatasync` that covers it;
//! - `logd journal fsync/4_clients_batched_100_per_frame`: the same from four clients at
//!   once (a round is each sending 100 records, 400 in all): group commit lets
//!   concurrent APPENDs share an `fdatasync`;
//! - `rsyslog/one_record_per_datagram`: `rsyslogd` (imuxsock on a private socket, omfile
//!   to a file, rate limiting off, no sync, as its defaults): 100 datagrams, timed until
//!   the file holds every line. A datagram gets no reply, so this is a pipeline, not a
//!   round trip per record.
//!
//! rsyslog is found as `$RSYSLOGD`, `/usr/sbin/rsyslogd`, or installed on first use
//! without touching the system: `apt-get download` of it and the three libraries it
//! needs beyond a Debian base (libestr0, libfastjson4, liblognorm5), `dpkg -x` into
//! `target/bench-cache/rsyslog`. If none of that works, the peer is skipped with a line
//! saying why.
//!
//! After the criterion group, a plain full run also prints an interleaved pass: every
//! contender once per round, order rotated, with the per-round ratio to rsyslog (see
//! [`want_interleaved`]).
//!
//! Run: `cargo bench -p telemetry-benches --bench logd_append`

use std::hint::black_box;
use std::io::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use logd::{Client, Config, Level, Record, RunningServer, Server};
use telemetry_benches::want_interleaved;

/// Records per round.
const N: u64 = 100;
/// Rounds of the interleaved pass.
const INTERLEAVED_ROUNDS: usize = 25;

/// Clients of the group-commit contender.
const CLIENTS: usize = 4;
/// Width of the value field: every record has the same size.
const VALUE_DIGITS: usize = 12;

/// A record shaped like one metricsd export: a counter's name, value and window.
fn export_record(i: u64) -> Record {
    Record::new(Level::Info, "metrics.export", "requests_total")
        .field("subject", "checkout")
        .field("kind", "counter")
        .field("value", format!("{i:0VALUE_DIGITS$}"))
        .field("window_ms", "10000")
}

/// The same record as one syslog line (RFC 3164 local form, as `logger` sends it).
fn syslog_line(i: u64) -> String {
    format!(
        "<14>metrics.export: requests_total subject=checkout kind=counter \
         value={i:0VALUE_DIGITS$} window_ms=10000"
    )
}

/// A logd with the disk journal in `dir`, limits that measure the protocol and the
/// journal rather than the rate limiter.
fn start_logd(dir: &Path, fsync: bool) -> RunningServer {
    std::fs::create_dir_all(dir).expect("bench dir");
    let mut config = Config {
        socket: dir.join("logd.sock"),
        journal_dir: Some(dir.join("journal")),
        ..Config::default()
    };
    config.journal.fsync = fsync;
    config.quota.records_per_sec = u64::MAX / 4;
    config.quota.records_burst = u64::MAX / 4;
    config.quota.bytes_per_sec = u64::MAX / 4;
    config.quota.bytes_burst = u64::MAX / 4;
    Server::bind(config).expect("bind").spawn().expect("spawn")
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("logd-bench-{}", std::process::id()));
    let server = start_logd(&dir.join("plain"), false);
    let synced = start_logd(&dir.join("fsync"), true);
    let mut client = Client::connect(server.path()).expect("connect");
    let mut synced_client = Client::connect(synced.path()).expect("connect");
    let mut synced_clients: Vec<Client> = (0..CLIENTS)
        .map(|_| Client::connect(synced.path()).expect("connect"))
        .collect();
    let rsyslog = Rsyslog::start(&dir.join("rsyslog"));

    let records: Vec<Record> = (0..N).map(export_record).collect();
    let big: Vec<Record> = (0..1000).map(export_record).collect();
    let lines: Vec<String> = (0..N).map(syslog_line).collect();

    let mut g = c.benchmark_group("logd_append");
    g.sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(N));
    g.bench_function("logd journal/one_record_per_frame", |b| {
        b.iter(|| {
            for r in &records {
                let report = client.append(std::slice::from_ref(r)).expect("append");
                assert_eq!(report.accepted(), 1);
            }
        });
    });
    g.bench_function("logd journal/one_record_per_frame_pipelined", |b| {
        b.iter(|| {
            let report = client.append_each(&records).expect("append");
            assert_eq!(report.accepted(), N as usize);
            black_box(report)
        });
    });
    g.bench_function("logd journal/batched_100_per_frame", |b| {
        b.iter(|| {
            let report = client.append(&records).expect("append");
            assert_eq!(report.accepted(), N as usize);
            black_box(report)
        });
    });
    g.bench_function("logd journal fsync/batched_100_per_frame", |b| {
        b.iter(|| {
            let report = synced_client.append(&records).expect("append");
            assert_eq!(report.accepted(), N as usize);
            black_box(report)
        });
    });
    g.throughput(Throughput::Elements(N * CLIENTS as u64));
    g.bench_function("logd journal fsync/4_clients_batched_100_per_frame", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for c in &mut synced_clients {
                    let records = &records;
                    s.spawn(move || {
                        for _ in 0..iters {
                            let report = c.append(records).expect("append");
                            assert_eq!(report.accepted(), N as usize);
                        }
                    });
                }
            });
            start.elapsed()
        });
    });
    g.throughput(Throughput::Elements(N));
    if let Some(rsyslog) = &rsyslog {
        g.bench_function("rsyslog/one_record_per_datagram", |b| {
            b.iter_custom(|iters| rsyslog.round(&lines, iters));
        });
    }
    g.throughput(Throughput::Elements(1000));
    g.bench_function("logd journal/batched_1000_per_frame", |b| {
        b.iter(|| {
            let report = client.append(&big).expect("append");
            assert_eq!(report.accepted(), 1000);
            black_box(report)
        });
    });
    g.finish();

    if want_interleaved() {
        // Criterion runs the contenders one after the other, and on a shared VM the
        // speed changes between them: here each round runs every contender once, order
        // rotated, and the ratios to rsyslog are taken within each round.
        const CONTENDERS: [&str; 7] = [
            "logd, one record per frame, round trip each",
            "logd, one record per frame, pipelined",
            "logd, 100 per frame",
            "logd, 1000 per frame",
            "logd, fsync, 100 per frame, one client",
            "logd, fsync, 100 per frame, four clients",
            "rsyslog, one record per datagram",
        ];
        const RSYSLOG: usize = 6;
        // Records per contender per round: 20 rounds of 100 (the 1000-record frames: 2;
        // the four clients: 20 each).
        const PER_ROUND: u64 = 2000;
        let n = if rsyslog.is_some() {
            CONTENDERS.len()
        } else {
            RSYSLOG
        };
        let mut rates = vec![Vec::new(); n];
        telemetry_benches::interleave("interleaved logd_append", INTERLEAVED_ROUNDS, n, |i| {
            let start = Instant::now();
            let records_done = match i {
                0 => {
                    for _ in 0..PER_ROUND / N {
                        for r in &records {
                            let report = client.append(std::slice::from_ref(r)).expect("append");
                            assert_eq!(report.accepted(), 1);
                        }
                    }
                    PER_ROUND
                }
                1 => {
                    for _ in 0..PER_ROUND / N {
                        let report = client.append_each(&records).expect("append");
                        assert_eq!(report.accepted(), N as usize);
                    }
                    PER_ROUND
                }
                2 => {
                    for _ in 0..PER_ROUND / N {
                        let report = client.append(&records).expect("append");
                        assert_eq!(report.accepted(), N as usize);
                    }
                    PER_ROUND
                }
                3 => {
                    for _ in 0..PER_ROUND / 1000 {
                        let report = client.append(&big).expect("append");
                        assert_eq!(report.accepted(), 1000);
                    }
                    PER_ROUND
                }
                4 => {
                    for _ in 0..PER_ROUND / N {
                        let report = synced_client.append(&records).expect("append");
                        assert_eq!(report.accepted(), N as usize);
                    }
                    PER_ROUND
                }
                5 => {
                    // Each client sends a round's worth: a shorter run would time the
                    // threads' start more than the commits.
                    let per_client = PER_ROUND / N;
                    std::thread::scope(|s| {
                        for c in &mut synced_clients {
                            let records = &records;
                            s.spawn(move || {
                                for _ in 0..per_client {
                                    let report = c.append(records).expect("append");
                                    assert_eq!(report.accepted(), N as usize);
                                }
                            });
                        }
                    });
                    per_client * N * CLIENTS as u64
                }
                _ => match &rsyslog {
                    Some(r) => {
                        r.round(&lines, PER_ROUND / N);
                        PER_ROUND
                    }
                    None => 0,
                },
            };
            rates[i].push(records_done as f64 / start.elapsed().as_secs_f64() / 1e3);
        });
        println!(
            "\ninterleaved logd_append: {INTERLEAVED_ROUNDS} rounds of {PER_ROUND} records per \
             contender, order rotated each round; thousand records/s, median [min, max], and \
             the per-round ratio to rsyslog: median (95 % CI of the median) [quartiles], \
             rounds below rsyslog"
        );
        println!("| contender | K records/s | / rsyslog per round |");
        println!("| --- | --- | --- |");
        for (i, name) in CONTENDERS.iter().enumerate().take(n) {
            let versus = match rates.get(RSYSLOG) {
                Some(peer) if i != RSYSLOG => telemetry_benches::paired(&rates[i], peer),
                _ => "-".to_owned(),
            };
            println!(
                "| {name} | {} | {versus} |",
                telemetry_benches::summary(&mut rates[i].clone())
            );
        }
    }

    drop(client);
    drop(synced_client);
    drop(synced_clients);
    server.shutdown().expect("shutdown");
    synced.shutdown().expect("shutdown");
    drop(rsyslog);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A private `rsyslogd`: imuxsock on `dir/rsyslog.sock`, every message's text to
/// `dir/messages`, one line each.
struct Rsyslog {
    child: Child,
    socket: UnixDatagram,
    target: PathBuf,
    out: PathBuf,
    /// Bytes one line takes in the output file.
    line_bytes: u64,
    /// Lines written so far.
    sent: std::cell::Cell<u64>,
}

impl Rsyslog {
    fn start(dir: &Path) -> Option<Self> {
        let (binary, modules) = match find_rsyslogd() {
            Ok(found) => found,
            Err(why) => {
                eprintln!("logd_append: rsyslog peer SKIPPED: {why}");
                return None;
            }
        };
        std::fs::create_dir_all(dir).expect("rsyslog dir");
        let target = dir.join("rsyslog.sock");
        let out = dir.join("messages");
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                "global(workDirectory=\"{dir}\")\n\
                 module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
                 input(type=\"imuxsock\" Socket=\"{sock}\" RateLimit.Interval=\"0\")\n\
                 template(name=\"text\" type=\"string\" string=\"%msg%\\n\")\n\
                 action(type=\"omfile\" file=\"{out}\" template=\"text\")\n",
                dir = dir.display(),
                sock = target.display(),
                out = out.display(),
            ),
        )
        .expect("rsyslog.conf");
        let mut cmd = Command::new(&binary);
        cmd.arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .arg("-M")
            .arg(&modules)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(lib) = binary
            .parent()
            .and_then(Path::parent)
            .map(|usr| usr.join("lib"))
            .filter(|_| !binary.starts_with("/usr/sbin"))
        {
            cmd.env("LD_LIBRARY_PATH", multiarch_dir(&lib).unwrap_or(lib));
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "logd_append: rsyslog peer SKIPPED: cannot run {}: {e}",
                    binary.display()
                );
                return None;
            }
        };
        let socket = UnixDatagram::unbound().expect("datagram socket");
        let mut r = Self {
            child,
            socket,
            target,
            out,
            line_bytes: 0,
            sent: std::cell::Cell::new(0),
        };
        // The socket appears once imuxsock runs; one line tells the size of each.
        let deadline = Instant::now() + Duration::from_secs(20);
        while r
            .socket
            .send_to(syslog_line(0).as_bytes(), &r.target)
            .is_err()
        {
            if Instant::now() > deadline {
                eprintln!("logd_append: rsyslog peer SKIPPED: its socket never appeared");
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        while r.out_bytes() == 0 {
            if Instant::now() > deadline {
                eprintln!("logd_append: rsyslog peer SKIPPED: it never wrote the first line");
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        r.line_bytes = r.out_bytes();
        r.sent.set(1);
        eprintln!(
            "logd_append: rsyslog peer {} ({} bytes a line)",
            binary.display(),
            r.line_bytes
        );
        Some(r)
    }

    fn out_bytes(&self) -> u64 {
        std::fs::metadata(&self.out).map_or(0, |m| m.len())
    }

    /// `iters` rounds of `lines`, one datagram each, timed until the file holds them all.
    fn round(&self, lines: &[String], iters: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..iters {
            for l in lines {
                self.socket
                    .send_to(l.as_bytes(), &self.target)
                    .expect("send to rsyslog");
            }
        }
        let sent = self.sent.get() + iters * lines.len() as u64;
        self.sent.set(sent);
        let want = sent * self.line_bytes;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let have = self.out_bytes();
            if have >= want {
                assert_eq!(have, want, "rsyslog wrote more than was sent");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "rsyslog wrote {have} of {want} bytes"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        start.elapsed()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `<lib>/<multiarch>` directory that holds rsyslog's modules, if any.
fn multiarch_dir(lib: &Path) -> Option<PathBuf> {
    std::fs::read_dir(lib)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("rsyslog").join("imuxsock.so").exists())
}

/// `rsyslogd` and its module directory: `$RSYSLOGD`, the system's, or one unpacked into
/// the bench cache (downloaded there on first use).
fn find_rsyslogd() -> Result<(PathBuf, PathBuf), String> {
    let modules_of = |binary: &Path| -> Result<(PathBuf, PathBuf), String> {
        let lib = binary
            .parent()
            .and_then(Path::parent)
            .map(|usr| usr.join("lib"))
            .ok_or_else(|| format!("{}: no lib directory beside it", binary.display()))?;
        let arch = multiarch_dir(&lib)
            .ok_or_else(|| format!("no rsyslog/imuxsock.so under {}", lib.display()))?;
        Ok((binary.to_owned(), arch.join("rsyslog")))
    };
    if let Some(b) = std::env::var_os("RSYSLOGD") {
        return modules_of(Path::new(&b));
    }
    let system = Path::new("/usr/sbin/rsyslogd");
    if system.exists() {
        return modules_of(system);
    }
    let cache = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bench-cache/rsyslog")
        .canonicalize()
        .or_else(|_| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-cache/rsyslog");
            std::fs::create_dir_all(&p).and_then(|()| p.canonicalize())
        })
        .map_err(|e| format!("cannot create the bench cache: {e}"))?;
    let root = cache.join("root");
    let binary = root.join("usr/sbin/rsyslogd");
    if !binary.exists() {
        eprintln!(
            "logd_append: installing rsyslog into {} (apt-get download + dpkg -x)",
            cache.display()
        );
        let packages = ["rsyslog", "libestr0", "libfastjson4", "liblognorm5"];
        let status = Command::new("apt-get")
            .arg("download")
            .args(packages)
            .current_dir(&cache)
            .status()
            .map_err(|e| format!("cannot run apt-get: {e}"))?;
        if !status.success() {
            return Err(format!("apt-get download {} failed", packages.join(" ")));
        }
        for deb in std::fs::read_dir(&cache)
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        {
            let status = Command::new("dpkg")
                .arg("-x")
                .arg(&deb)
                .arg(&root)
                .status()
                .map_err(|e| format!("cannot run dpkg: {e}"))?;
            if !status.success() {
                return Err(format!("dpkg -x {} failed", deb.display()));
            }
        }
        let _ = std::io::stderr().flush();
    }
    modules_of(&binary)
}

criterion_group!(benches, bench);
criterion_main!(benches);
