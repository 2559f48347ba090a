//! The guest selftest: a producer that exercises every feature through the real grant,
//! ring and export path, and prints each ladder marker only after reading the evidence
//! back from logd and comparing it with the exact expected values.
//!
//! Who uses it: the `guest-selftest` binary (run by the guest init in the `full` plan)
//! and the `guest-hostile` binary it starts. It also runs on the host against a `logd
//! serve` and a `metricsd serve` (see `qemu-harness/README.md`), which is how it is
//! developed.
//!
//! Each step records through `nexus-metrics` (or talks to logd directly), computes what
//! metricsd must export from what it recorded, then polls logd (bounded, see
//! [`evidence::WAIT`]) until the exported records match exactly. Only records whose
//! logd stamp says metricsd sent them count. A step prints `SELFTEST: <step> ok` after
//! its match, or `SELFTEST: <step> FAIL: <what differed>`, after which the selftest stops
//! and exits non-zero.

pub mod backpressure;
pub mod evidence;
pub mod expect;
pub mod hardening;
pub mod hostile;
pub mod ipc;
pub mod metrics;
pub mod prometheus;
pub mod retention;
pub mod security;
pub mod spans;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::markers::{SELFTEST_DONE, SELFTEST_FAIL};
use evidence::Logd;

/// What the selftest is pointed at.
#[derive(Debug, Clone)]
pub struct Options {
    /// logd's socket.
    pub logd: PathBuf,
    /// metricsd's control socket.
    pub metricsd: PathBuf,
    /// The config file logd was started with (its limits are what is tested).
    pub logd_config: Option<PathBuf>,
    /// The config file metricsd was started with (caps, bucket layouts).
    pub metricsd_config: Option<PathBuf>,
}

/// What every step can use.
pub struct Ctx {
    /// Evidence from logd.
    pub logd: Logd,
    /// logd's config.
    pub logd_config: logd::Config,
    /// metricsd's config.
    pub metricsd_config: metricsd::Config,
    /// metricsd's control socket (for the child processes).
    pub metricsd_socket: PathBuf,
    /// This process's service name as metricsd's default policy names it: the
    /// executable's file name.
    pub service: String,
}

/// A step: its name on the ladder and what it does. `run` returns a short summary of
/// what was compared, printed after the `ok` marker.
pub struct Step {
    /// The name between `SELFTEST: ` and ` ok` / ` FAIL`.
    pub name: &'static str,
    /// The check.
    pub run: fn(&mut Ctx) -> Result<String>,
}

/// The steps, in ladder order (the `full` ladder in [`crate::markers`] lists the same).
pub const STEPS: &[Step] = &[
    Step {
        name: "logd hardening rejects",
        run: hardening::run,
    },
    Step {
        name: "metrics security rejects",
        run: security::run,
    },
    Step {
        name: "metrics counters",
        run: metrics::counters,
    },
    Step {
        name: "metrics gauges",
        run: metrics::gauges,
    },
    Step {
        name: "metrics histograms",
        run: metrics::histograms,
    },
    Step {
        name: "prometheus scrape",
        run: prometheus::run,
    },
    Step {
        name: "tracing spans",
        run: spans::run,
    },
    Step {
        name: "no ipc per sample",
        run: ipc::run,
    },
    Step {
        name: "lossless counters under backpressure",
        run: backpressure::run,
    },
    Step {
        name: "metrics retention",
        run: retention::run,
    },
];

/// `SELFTEST: <name> ok`.
#[must_use]
pub fn ok_marker(name: &str) -> String {
    format!("SELFTEST: {name} ok")
}

/// `SELFTEST: <name> FAIL`.
#[must_use]
pub fn fail_marker(name: &str) -> String {
    format!("SELFTEST: {name} FAIL")
}

/// Prints one whole line on stdout at once.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // Nowhere to report a console that cannot be written.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs every step in order; stops at the first failure.
pub fn run(options: &Options) -> ExitCode {
    let started = Instant::now();
    let mut ctx = match setup(options) {
        Ok(ctx) => ctx,
        Err(e) => {
            say(&format!("{SELFTEST_FAIL}: setup: {e:#}"));
            return ExitCode::FAILURE;
        }
    };
    for step in STEPS {
        let t = Instant::now();
        match (step.run)(&mut ctx) {
            Ok(summary) => say(&format!(
                "{} ({:.2} s): {summary}",
                ok_marker(step.name),
                t.elapsed().as_secs_f64()
            )),
            Err(e) => {
                say(&format!("{}: {e:#}", fail_marker(step.name)));
                return ExitCode::FAILURE;
            }
        }
    }
    say(&format!(
        "{SELFTEST_DONE} ({} steps in {:.2} s)",
        STEPS.len(),
        started.elapsed().as_secs_f64()
    ));
    ExitCode::SUCCESS
}

fn setup(options: &Options) -> Result<Ctx> {
    nexus_metrics::install(
        nexus_metrics::Config::new()
            .socket(&options.metricsd)
            .clock(&spans::CLOCK),
    )
    .context("installing the metrics recorder")?;
    let logd_config = match &options.logd_config {
        Some(path) => logd::Config::load(path)?,
        None => logd::Config::default(),
    };
    let metricsd_config = match &options.metricsd_config {
        Some(path) => metricsd::Config::load(path)?,
        None => metricsd::Config::default(),
    };
    Ok(Ctx {
        logd: Logd::connect(&options.logd)?,
        logd_config,
        metricsd_config,
        metricsd_socket: options.metricsd.clone(),
        service: exe_service_name()?,
    })
}

/// metricsd's default name for this process: its executable's file name.
pub fn exe_service_name() -> Result<String> {
    let exe = std::env::current_exe().context("reading /proc/self/exe")?;
    exe_name(&exe)
}

fn exe_name(exe: &Path) -> Result<String> {
    let name = exe
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", exe.display()))?;
    Ok(name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect())
}

/// Runs a child process to completion within `limit`, returning its stdout. Non-zero
/// exit or a timeout is an error carrying its output.
pub fn run_child(mut command: Command, limit: Duration) -> Result<String> {
    let what = format!("{command:?}");
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let (status, stdout, stderr) = wait_child(child, limit).with_context(|| what.clone())?;
    if !status.success() {
        bail!("{what} exited with {status}; stdout: {stdout:?}; stderr: {stderr:?}");
    }
    Ok(stdout)
}

fn wait_child(
    mut child: Child,
    limit: Duration,
) -> Result<(std::process::ExitStatus, String, String)> {
    let mut out = child.stdout.take().context("child stdout")?;
    let mut err = child.stderr.take().context("child stderr")?;
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            bail!("still running after {} s; killed", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok((status, stdout, stderr))
}

/// The `key=value` words of the line of `text` starting with `prefix`.
pub fn report_fields(text: &str, prefix: &str) -> Result<Vec<(String, String)>> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .with_context(|| format!("no line starting with {prefix:?} in {text:?}"))?;
    Ok(line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// The value of `key` in report fields, parsed.
pub fn report_value<T: std::str::FromStr>(fields: &[(String, String)], key: &str) -> Result<T> {
    let text = fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .with_context(|| format!("report has no `{key}`"))?;
    text.parse()
        .map_err(|_| anyhow::anyhow!("report `{key}` = {text:?} does not parse"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ladder::line_has_fail;
    use crate::markers;

    #[test]
    fn steps_are_the_full_ladder_in_order() {
        let ladder: Vec<_> = markers::FULL.iter().map(|s| (s.ok, s.fail)).collect();
        let selftest: Vec<_> = ladder
            .iter()
            .filter(|(ok, _)| ok.starts_with("SELFTEST: ") && *ok != SELFTEST_DONE)
            .map(|(ok, fail)| ((*ok).to_owned(), (*fail).to_owned()))
            .collect();
        let ours: Vec<_> = STEPS
            .iter()
            .map(|s| (ok_marker(s.name), fail_marker(s.name)))
            .collect();
        assert_eq!(ours, selftest);
        for (ok, _) in &ours {
            assert!(!line_has_fail(&format!("{ok} (1.00 s): 3 series exact")));
        }
    }

    #[test]
    fn service_names_follow_metricsd_policy() {
        assert_eq!(
            exe_name(Path::new("/bin/guest-selftest")).expect("name"),
            "guest-selftest"
        );
        assert_eq!(exe_name(Path::new("/x/a b")).expect("name"), "a_b");
    }

    #[test]
    fn reports_parse() {
        let text = "noise\nhostile: ring=3 valid_total=21\n";
        let fields = report_fields(text, "hostile:").expect("found");
        assert_eq!(
            report_value::<u64>(&fields, "valid_total").expect("parses"),
            21
        );
        assert!(report_value::<u64>(&fields, "missing").is_err());
        assert!(report_fields(text, "other:").is_err());
    }
}
