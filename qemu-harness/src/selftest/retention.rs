//! `SELFTEST: metrics retention`: a metricsd of the selftest's own (the same `metricsd`
//! binary, on its own socket and data directory, exporting to the same logd) is killed
//! with `SIGKILL` while a child process (the selftest re-executed with
//! `retention-child`) records counters into it, and started again on the same
//! directory. The child hands its rings back and finishes; then every counter total
//! metricsd exported to logd, and every rollup window `metricsd query` reads from disk
//! at 10 s, 1 min and 1 h, must add up to exactly what the child recorded, the windows of
//! each resolution aligned and disjoint and the finer ones summing to the coarser.
//!
//! The step's own metricsd keeps its `metricsd: ready` line and its log lines off the
//! console (they would be read as the ladder's): they are shown only on failure.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use logd::{Client, Query};
use metricsd::MetricKind;
use nexus_metrics::Counter;

use super::evidence::{WAIT, wait_for};
use super::{Ctx, report_fields, report_value};

/// The child's argument.
pub const CHILD_ARG: &str = "retention-child";
/// The counter (two label values).
const METRIC: &str = "selftest.retention";
const ROUTES: [&str; 2] = ["a", "b"];
/// The report line's prefix.
const REPORT: &str = "retention:";

/// The child: records into both series from two threads until its stdin says `stop`,
/// then flushes and reports what it recorded.
pub fn child(metricsd: &Path) -> Result<()> {
    nexus_metrics::install(
        nexus_metrics::Config::new()
            .socket(metricsd)
            .retry(Duration::from_millis(5), Duration::from_millis(50)),
    )
    .context("installing the recorder")?;
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = ROUTES
        .iter()
        .enumerate()
        .map(|(t, route)| {
            let stop = stop.clone();
            let counter = Counter::new(METRIC, &[("route", route)]);
            std::thread::spawn(move || {
                let mut total = 0u128;
                let mut i = t as u64;
                while !stop.load(Ordering::Relaxed) {
                    let n = 1 + i % 7;
                    counter.increment(n);
                    total += u128::from(n);
                    i += 1;
                    if i % 64 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                let flushed = nexus_metrics::flush_for(Duration::from_secs(30));
                (total, flushed)
            })
        })
        .collect();
    println!("{REPORT} recording");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    stop.store(true, Ordering::Relaxed);
    let mut fields = Vec::new();
    for (t, route) in threads.into_iter().zip(ROUTES) {
        let (total, flushed) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a recording thread panicked"))?;
        ensure!(flushed, "route {route}: flush_for timed out");
        fields.push(format!("{route}={total}"));
    }
    let s = nexus_metrics::stats();
    println!(
        "{REPORT} done {} rings={} lost={} unconfirmed={}",
        fields.join(" "),
        s.rings_claimed,
        s.lost_increments,
        s.unconfirmed
    );
    Ok(())
}

/// A `metricsd serve` of this step, its output kept for a failure message.
struct Instance {
    child: Child,
    pid: u32,
    output: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Instance {
    fn start(exe: &Path, config: &Path) -> Result<Self> {
        let mut child = Command::new(exe)
            .args(["serve", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let pid = child.id();
        let output = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (ready_tx, ready) = mpsc::channel();
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        for (stream, tx) in [
            (
                Box::new(stdout) as Box<dyn std::io::Read + Send>,
                Some(ready_tx),
            ),
            (Box::new(stderr), None),
        ] {
            let out = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if line.trim() == "metricsd: ready" {
                        if let Some(tx) = &tx {
                            let _ = tx.send(());
                        }
                    }
                    if let Ok(mut o) = out.lock() {
                        o.push(line);
                    }
                }
            });
        }
        let mut me = Self { child, pid, output };
        if ready.recv_timeout(Duration::from_secs(60)).is_err() {
            let lines = me.lines();
            let _ = me.child.kill();
            let _ = me.child.wait();
            bail!("metricsd (pid {pid}) not ready within 60 s; its output: {lines:?}");
        }
        Ok(me)
    }

    fn lines(&self) -> Vec<String> {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    fn kill9(mut self) -> Result<()> {
        self.child.kill().context("SIGKILL")?;
        let status = self.child.wait()?;
        use std::os::unix::process::ExitStatusExt;
        ensure!(
            status.signal() == Some(9),
            "metricsd (pid {}) ended with {status}, not by SIGKILL",
            self.pid
        );
        Ok(())
    }

    fn stop(mut self) -> Result<()> {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).context("SIGTERM")?;
        let status = self.child.wait()?;
        ensure!(
            status.success(),
            "metricsd (pid {}) stopped with {status}; its output: {:?}",
            self.pid,
            self.lines()
        );
        Ok(())
    }
}

/// The last exported `value` of `series` among the records `pid` sent.
fn last_value(logd: &Path, series: &str, pid: u32) -> Result<Option<u128>> {
    let mut client = Client::connect(logd).context("connecting to logd")?;
    let records = client
        .query_all(
            &Query::new().scope("metrics").field("series", series),
            1_000_000,
        )
        .context("querying logd")?;
    records
        .iter()
        .rev()
        .find(|r| r.sender.pid == pid)
        .map(|r| {
            r.record
                .get("value")
                .context("a series record without a value")?
                .parse::<u128>()
                .context("value")
        })
        .transpose()
}

/// `metricsd query` at `step` (its text form, `<series> <start_ns> delta=<n>` per
/// window): (window start, delta) of every window of `series`.
fn windows(exe: &Path, dir: &Path, series: &str, step: &str) -> Result<Vec<(u64, u128)>> {
    let out = Command::new(exe)
        .args(["query", "--dir"])
        .arg(dir)
        .args(["--series", series, "--since", "3h", "--step", step])
        .output()
        .context("running metricsd query")?;
    ensure!(
        out.status.success(),
        "metricsd query failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut points = Vec::new();
    for line in String::from_utf8(out.stdout)?.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [name, start, delta, ..] = words[..] else {
            continue;
        };
        ensure!(name == series, "query answered for {name}, asked {series}");
        let start: u64 = start
            .parse()
            .with_context(|| format!("start in {line:?}"))?;
        let delta: u128 = delta
            .strip_prefix("delta=")
            .and_then(|d| d.parse().ok())
            .with_context(|| format!("delta in {line:?}"))?;
        points.push((start, delta));
    }
    Ok(points)
}

/// Checks one resolution's windows: aligned to the step, increasing, adding up to
/// `total`. Returns them by start.
fn check_windows(
    points: &[(u64, u128)],
    step_ns: u64,
    total: u128,
    what: &str,
) -> Result<BTreeMap<u64, u128>> {
    let mut by_start = BTreeMap::new();
    for &(start, delta) in points {
        ensure!(
            start % step_ns == 0,
            "{what}: window {start} not aligned to {step_ns}"
        );
        ensure!(
            by_start.insert(start, delta).is_none(),
            "{what}: two windows start at {start}"
        );
    }
    let sum: u128 = by_start.values().sum();
    ensure!(
        sum == total,
        "{what}: windows add up to {sum}, recorded {total}"
    );
    Ok(by_start)
}

struct Recorder {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Recorder {
    fn wait_line(&self, prefix: &str, limit: Duration) -> Result<String> {
        let until = Instant::now() + limit;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(_) => bail!("the retention child printed no {prefix:?} line in time"),
            }
        }
    }
}

pub(crate) fn run(ctx: &mut Ctx) -> Result<String> {
    let exe = std::env::current_exe()?.with_file_name("metricsd");
    let dir = PathBuf::from(format!("/tmp/selftest-retention-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("metricsd.sock");
    let history = dir.join("history");
    let config = dir.join("metricsd.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {socket:?}\nlogd_socket = {:?}\n\n[rings]\ncapacity = 4096\n\n\
             [export]\ninterval_ms = 250\n\n[retention]\ndir = {history:?}\n",
            ctx.logd.path()
        ),
    )?;
    let logd_path = ctx.logd.path().to_owned();
    let first = Instance::start(&exe, &config)?;
    let first_pid = first.pid;

    let mut child = Command::new(std::env::current_exe()?)
        .arg(CHILD_ARG)
        .arg("--metricsd")
        .arg(&socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the retention child")?;
    let stdin = child.stdin.take().context("child stdin")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut rec = Recorder {
        child,
        stdin,
        lines,
    };
    rec.wait_line(&format!("{REPORT} recording"), Duration::from_secs(60))?;

    let ids: Vec<String> = ROUTES
        .iter()
        .map(|r| metricsd::series_id(&ctx.service, MetricKind::Counter, METRIC, &[("route", *r)]))
        .collect();
    // Mid-run: the first metricsd has exported both series (the child keeps recording).
    let mut before = Vec::new();
    for id in &ids {
        before.push(wait_for(WAIT, || {
            Ok(match last_value(&logd_path, id, first_pid)? {
                Some(v) if v > 0 => Ok(v),
                _ => Err(format!(
                    "{id}: nothing exported by metricsd pid {first_pid} yet"
                )),
            })
        })?);
    }
    first.kill9()?;
    std::thread::sleep(Duration::from_millis(300));
    let second = Instance::start(&exe, &config)?;
    let second_pid = second.pid;
    // The child reconnected and records into the new daemon.
    for (id, b) in ids.iter().zip(&before) {
        wait_for(WAIT, || {
            Ok(match last_value(&logd_path, id, second_pid)? {
                Some(v) if v > *b => Ok(()),
                other => Err(format!(
                    "{id}: metricsd pid {second_pid} exported {other:?}, not past {b} yet"
                )),
            })
        })?;
    }
    // Record on past the next 10 s boundary, so the 10 s windows are several and the
    // 1 min windows' sums of them mean something.
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let past = 10_000_000_000 - (now_ns % 10_000_000_000) as u64 + 300_000_000;
    std::thread::sleep(Duration::from_nanos(past));
    writeln!(rec.stdin, "stop")?;
    let done = rec.wait_line(&format!("{REPORT} done"), Duration::from_secs(60))?;
    let status = rec.child.wait()?;
    ensure!(status.success(), "the retention child exited with {status}");
    let report = report_fields(&done, REPORT)?;
    let lost: u64 = report_value(&report, "lost")?;
    let unconfirmed: u64 = report_value(&report, "unconfirmed")?;
    ensure!(
        lost == 0 && unconfirmed == 0,
        "the child lost {lost} increments and left {unconfirmed} records unconfirmed"
    );
    let totals: Vec<u128> = ROUTES
        .iter()
        .map(|r| report_value(&report, r))
        .collect::<Result<_>>()?;

    // Counter totals in logd, from the restarted daemon.
    for (id, total) in ids.iter().zip(&totals) {
        wait_for(WAIT, || {
            Ok(match last_value(&logd_path, id, second_pid)? {
                Some(v) if v == *total => Ok(()),
                other => Err(format!("{id} = {other:?} in logd, recorded {total}")),
            })
        })?;
    }
    let returned = {
        let id = metricsd::series_id(
            "metricsd",
            MetricKind::Counter,
            "metricsd.wal.returned",
            &[("outcome", "finished")],
        );
        last_value(&logd_path, &id, second_pid)?.unwrap_or(0)
    };
    ensure!(
        returned >= 1,
        "the restarted metricsd finished no returned ring (metricsd.wal.returned = {returned})"
    );
    second.stop()?;

    // Rollup windows from disk, every resolution.
    let mut summary = Vec::new();
    for (id, total) in ids.iter().zip(&totals) {
        let ten = check_windows(
            &windows(&exe, &history, id, "10s")?,
            10_000_000_000,
            *total,
            "10 s",
        )?;
        let min = check_windows(
            &windows(&exe, &history, id, "1m")?,
            60_000_000_000,
            *total,
            "1 min",
        )?;
        let hour = check_windows(
            &windows(&exe, &history, id, "1h")?,
            3_600_000_000_000,
            *total,
            "1 h",
        )?;
        ensure!(
            ten.len() >= 2,
            "{id}: recording crossed a 10 s boundary, yet {} window(s) of 10 s",
            ten.len()
        );
        for (start, delta) in &min {
            let inside: u128 = ten
                .range(*start..start + 60_000_000_000)
                .map(|(_, d)| d)
                .sum();
            ensure!(
                inside == *delta,
                "{id}: the 1 min window at {start} holds {delta}, its 10 s windows {inside}"
            );
        }
        summary.push(format!(
            "{total} in {} x 10 s, {} x 1 min, {} x 1 h windows",
            ten.len(),
            min.len(),
            hour.len()
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(format!(
        "metricsd pid {first_pid} SIGKILLed mid-run after exporting {before:?}, restarted as \
         pid {second_pid} ({returned} rings handed back and finished); counters exact in logd \
         and in the rollups: {}",
        summary.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_must_align_be_unique_and_add_up() {
        let ok = check_windows(&[(0, 3), (10, 4)], 10, 7, "t").expect("fine");
        assert_eq!(ok.len(), 2);
        assert!(check_windows(&[(0, 3), (10, 4)], 10, 8, "t").is_err());
        assert!(check_windows(&[(5, 7)], 10, 7, "t").is_err());
        assert!(check_windows(&[(0, 3), (0, 4)], 10, 7, "t").is_err());
    }
}
