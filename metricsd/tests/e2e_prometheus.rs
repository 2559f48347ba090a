//! A real Prometheus (Debian's `prometheus` package, 2.42) scrapes a metricsd that two
//! producer processes feed, and its query API returns exactly what the producers
//! recorded: counter totals, gauge values, histogram `_count`, `_sum` and every classic
//! bucket; a second Prometheus with `--enable-feature=native-histograms` (which scrapes
//! protobuf and keeps native histograms) returns the same `histogram_count()` and
//! `histogram_sum()`. `promtool check metrics` accepts the exposition.
//!
//! The package is fetched with `apt-get download` (after `apt-get update` if that
//! fails) and unpacked with `dpkg -x` under `target/tmp/prometheus-deb`, once; nothing
//! is installed. If it cannot be had, the test fails saying so, unless
//! `NEXUS_SKIP_REAL_PROMETHEUS=1` asks to skip it.

mod e2e_support;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e_support::{
    Producer, WAIT, child, config, start_logd, start_metricsd, wait_closed, watchdog,
};
use nexus_metrics::{Config, Counter, Gauge, Histogram};

/// Set to `1` to skip (with a message) when the package cannot be fetched.
const SKIP_VAR: &str = "NEXUS_SKIP_REAL_PROMETHEUS";

/// How long to wait for Prometheus to scrape and answer with the final values.
const PROM_WAIT: Duration = Duration::from_secs(90);

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The unpacked package's `usr/bin`, fetching it on first use; `None` to skip.
fn provision() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("prometheus-deb");
    let bin = root.join("usr/bin");
    if bin.join("prometheus").is_file() && bin.join("promtool").is_file() {
        return Some(bin);
    }
    let download = root.with_extension("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download).expect("create the download directory");
    let fetch = || {
        run(Command::new("apt-get")
            .args(["download", "prometheus"])
            .current_dir(&download))
    };
    let fetched = fetch().or_else(|first| {
        eprintln!("apt-get download failed ({first}); running apt-get update and retrying");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        fetch()
    });
    if let Err(why) = fetched {
        if std::env::var(SKIP_VAR).is_ok_and(|v| v == "1") {
            eprintln!(
                "SKIPPED: Debian's prometheus package cannot be fetched ({why}); {SKIP_VAR}=1"
            );
            return None;
        }
        panic!(
            "this test needs Debian's `prometheus` package (2.42), fetched with `apt-get \
             download prometheus`, and could not get it: {why}\nSet {SKIP_VAR}=1 to skip it \
             on a machine without Debian's archive."
        );
    }
    let deb = std::fs::read_dir(&download)
        .expect("read the download directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("apt-get download left a .deb");
    let staging = root.with_extension("staging");
    let _ = std::fs::remove_dir_all(&staging);
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&staging)).expect("dpkg -x the package");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&staging, &root).expect("move the unpacked package in place");
    let _ = std::fs::remove_dir_all(&download);
    Some(bin)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A Prometheus process, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    fn start(bin: &Path, dir: &Path, name: &str, target: SocketAddr, native: bool) -> Self {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: metricsd\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write prometheus.yml");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = dir.join("prometheus.log");
        let logfile = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(bin.join("prometheus"));
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(logfile);
        if native {
            cmd.arg("--enable-feature=native-histograms");
        }
        let child = cmd.spawn().expect("start prometheus");
        Self { child, addr, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The instant vector of `query`: `(labels, value)` per series.
    fn query(&self, query: &str) -> Option<Vec<(BTreeMap<String, String>, f64)>> {
        let path = format!("/api/v1/query?query={}", percent_encode(query));
        let (code, _, body) =
            metricsd::scrape::get(self.addr, &path, None, Duration::from_secs(5), 16 << 20).ok()?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        let result = v.get("data")?.get("result")?.as_array()?;
        result
            .iter()
            .map(|r| {
                let labels = r
                    .get("metric")?
                    .as_object()?
                    .iter()
                    .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect::<Option<BTreeMap<_, _>>>()?;
                let value = r.get("value")?.get(1)?.as_str()?.parse().ok()?;
                Some((labels, value))
            })
            .collect()
    }

    /// The single value of `query`.
    fn scalar(&self, query: &str) -> Option<f64> {
        match self.query(query)?.as_slice() {
            [(_, v)] => Some(*v),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What one producer recorded.
#[derive(Debug)]
struct Tally {
    requests_a: u64,
    requests_b: u64,
    temperature: i64,
    values: Vec<u64>,
}

/// The workload of producer `n`: different per producer, deterministic.
fn workload(n: u64) -> Tally {
    let mut values = vec![0, 1, 2, 3, 4, 5, 7, 8, 9, 1023, 1024, 1025, 1 << 20];
    values.extend((0..200).map(|i| (i * 7919 + n * 104_729) % 50_000));
    Tally {
        requests_a: 1000 + n * 17,
        requests_b: 3 + n,
        temperature: -40 + n as i64 * 61,
        values,
    }
}

#[test]
#[ignore = "a child half of real_prometheus_scrapes_exact_values"]
fn child_records_a_known_workload() {
    let Some(socket) = child::socket() else {
        return;
    };
    let _dog = watchdog("the producer", Duration::from_secs(60));
    nexus_metrics::install(Config::new().socket(&socket).ring_capacity(4096))
        .expect("first install");
    let n: u64 = std::env::var("E2E_PRODUCER")
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("E2E_PRODUCER");
    let w = workload(n);
    let a = Counter::new("e2e.requests", &[("route", "/a")]);
    let b = Counter::new("e2e.requests", &[("route", "/b")]);
    for _ in 0..w.requests_a {
        a.increment(1);
    }
    b.increment(w.requests_b);
    let g = Gauge::new("e2e.temperature_celsius", &[]);
    g.set(12345);
    g.set(w.temperature);
    let h = Histogram::new("e2e.payload_bytes", &[]);
    for &v in &w.values {
        h.record(v);
    }
    assert!(nexus_metrics::flush_for(Duration::from_secs(10)), "flushed");
    let s = nexus_metrics::stats();
    let csv: Vec<String> = w.values.iter().map(u64::to_string).collect();
    child::report(
        "tally",
        &[
            ("requests_a", &w.requests_a),
            ("requests_b", &w.requests_b),
            ("temperature", &w.temperature),
            ("values", &csv.join(",")),
            ("dropped", &s.dropped_total()),
        ],
    );
}

#[test]
fn real_prometheus_scrapes_exact_values() {
    let _dog = watchdog("the real Prometheus test", Duration::from_secs(600));
    let Some(bin) = provision() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.prometheus.listen = Some("127.0.0.1:0".into());
    let logd = start_logd(&cfg.logd_socket);
    let daemon = start_metricsd(cfg);
    let target = daemon.prometheus_addr().expect("the scrape endpoint");

    // Two producer processes, each its own service.
    let mut tallies = BTreeMap::new();
    for n in 0..2u64 {
        let service = format!("svc{n}");
        let mut p = Producer::spawn(
            "child_records_a_known_workload",
            &service,
            daemon.socket_path(),
            &[("E2E_PRODUCER", &n.to_string())],
        );
        let r = p.expect("tally");
        p.finish();
        assert_eq!(r.u64("dropped"), 0, "{r:?}");
        let t = Tally {
            requests_a: r.u64("requests_a"),
            requests_b: r.u64("requests_b"),
            temperature: r.str("temperature").parse().expect("number"),
            values: r
                .str("values")
                .split(',')
                .map(|v| v.parse().expect("number"))
                .collect(),
        };
        wait_closed(&daemon, &service, 1);
        tallies.insert(service, t);
    }
    daemon.flush(WAIT).expect("flush");

    // promtool accepts the exposition (Prometheus text, as it reads).
    let (code, _, exposition) =
        metricsd::scrape::get(target, "/metrics", None, WAIT, 64 << 20).expect("scrape metricsd");
    assert_eq!(code, 200);
    let mut promtool = Command::new(bin.join("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(&exposition)
        .expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool ends");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&exposition)
    );

    let classic = Prometheus::start(&bin, dir.path(), "classic", target, false);
    let native = Prometheus::start(&bin, dir.path(), "native", target, true);

    let deadline = Instant::now() + PROM_WAIT;
    loop {
        let last_diff = match compare(&classic, &native, &tallies) {
            Ok(checked) => {
                eprintln!("real Prometheus: {checked} values exact");
                break;
            }
            Err(diff) => diff,
        };
        assert!(
            Instant::now() < deadline,
            "Prometheus never returned the producers' values: {last_diff}\n\
             classic log:\n{}\nnative log:\n{}",
            classic.log(),
            native.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    drop((classic, native));
    daemon.shutdown();
    logd.shutdown().expect("logd stops");
}

/// Compares everything once; `Err` names the first difference.
fn compare(
    classic: &Prometheus,
    native: &Prometheus,
    tallies: &BTreeMap<String, Tally>,
) -> Result<usize, String> {
    let checked = std::cell::Cell::new(0usize);
    let expect = |p: &Prometheus, q: String, want: f64| -> Result<(), String> {
        match p.scalar(&q) {
            Some(v) if v == want => {
                checked.set(checked.get() + 1);
                Ok(())
            }
            got => Err(format!("{q}: got {got:?}, want {want}")),
        }
    };
    for (service, t) in tallies {
        let sum: u64 = t.values.iter().sum();
        let count = t.values.len() as f64;
        for p in [classic, native] {
            expect(
                p,
                format!(r#"e2e_requests_total{{service="{service}",route="/a"}}"#),
                t.requests_a as f64,
            )?;
            expect(
                p,
                format!(r#"e2e_requests_total{{service="{service}",route="/b"}}"#),
                t.requests_b as f64,
            )?;
            expect(
                p,
                format!(r#"e2e_temperature_celsius{{service="{service}"}}"#),
                t.temperature as f64,
            )?;
        }
        expect(
            classic,
            format!(r#"e2e_payload_bytes_count{{service="{service}"}}"#),
            count,
        )?;
        expect(
            classic,
            format!(r#"e2e_payload_bytes_sum{{service="{service}"}}"#),
            sum as f64,
        )?;
        expect(
            native,
            format!(r#"histogram_count(e2e_payload_bytes{{service="{service}"}})"#),
            count,
        )?;
        expect(
            native,
            format!(r#"histogram_sum(e2e_payload_bytes{{service="{service}"}})"#),
            sum as f64,
        )?;
        // Every classic bucket: its cumulative count is the number of values <= le.
        let q = format!(r#"e2e_payload_bytes_bucket{{service="{service}"}}"#);
        let buckets = classic.query(&q).ok_or(format!("{q}: no answer"))?;
        if buckets.len() < 3 {
            return Err(format!("{q}: {} buckets", buckets.len()));
        }
        let mut les = Vec::new();
        for (labels, got) in &buckets {
            let le_text = labels
                .get("le")
                .ok_or(format!("{q}: a bucket without le"))?;
            let le: f64 = le_text.parse().map_err(|_| format!("{q}: le {le_text}"))?;
            let want = t.values.iter().filter(|&&v| (v as f64) <= le).count() as f64;
            if *got != want {
                return Err(format!("{q}: le {le_text}: got {got}, want {want}"));
            }
            les.push(le);
            checked.set(checked.get() + 1);
        }
        les.sort_by(f64::total_cmp);
        // The bounds are 0, then consecutive powers of two, then +Inf.
        let finite: Vec<f64> = les.iter().copied().filter(|l| l.is_finite()).collect();
        let powers_ok = finite.windows(2).skip(1).all(|w| w[1] == 2.0 * w[0]);
        if les.last() != Some(&f64::INFINITY) || finite.first() != Some(&0.0) || !powers_ok {
            return Err(format!("{q}: unexpected bounds {les:?}"));
        }
    }
    Ok(checked.get())
}
