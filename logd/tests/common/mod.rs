//! Helpers shared by the behaviour tests: in-process servers, the real binary as a child
//! process, watchdogs.

#![allow(
    dead_code,
    reason = "each test file uses a different subset of these helpers"
)]
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use logd::{AppendReport, Client, Config, Level, Record, RunningServer, Server};

/// Aborts the whole test process if the guard is still alive after `secs`: a hang fails
/// loudly instead of stalling CI.
pub struct Watchdog(Arc<AtomicBool>);

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

pub fn watchdog(secs: u64, what: &'static str) -> Watchdog {
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if d.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("watchdog: {what} still running after {secs}s; aborting");
        std::process::abort();
    });
    Watchdog(done)
}

/// A default config with its socket in `dir`.
pub fn config(dir: &Path) -> Config {
    Config {
        socket: dir.join("logd.sock"),
        ..Config::default()
    }
}

/// Binds and spawns an in-process server.
pub fn start(config: Config) -> RunningServer {
    Server::bind(config).unwrap().spawn().unwrap()
}

/// `n` info records in `scope`, each with field `i`.
pub fn records(scope: &str, n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record::new(Level::Info, scope, format!("message {i}")).field("i", i.to_string()))
        .collect()
}

/// This test binary's `flood_helper` as a child process: a second sender with its own
/// pid that sends `batches` batches of 500 records to `socket` as fast as it can (see
/// [`flood_from_env`]).
pub fn flood_command(socket: &Path, batches: usize) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--ignored",
            "--exact",
            "flood_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LOGD_FLOOD_SOCKET", socket)
        .env("LOGD_FLOOD_BATCHES", batches.to_string());
    command
}

/// The body of a `flood_helper` started by [`flood_command`]: sends the batches it was
/// told to, hands each one's report to `check`, and returns how many it sent.
pub fn flood_from_env(mut check: impl FnMut(&AppendReport)) -> usize {
    let sock = std::env::var("LOGD_FLOOD_SOCKET").expect("LOGD_FLOOD_SOCKET");
    let batches: usize = std::env::var("LOGD_FLOOD_BATCHES")
        .unwrap()
        .parse()
        .unwrap();
    let mut c = Client::connect(sock).unwrap();
    let batch: Vec<Record> = (0..500)
        .map(|i| Record::new(Level::Debug, "flood", format!("flood {i}")).field("who", "flooder"))
        .collect();
    for _ in 0..batches {
        check(&c.append(&batch).unwrap());
    }
    batches
}

pub fn my_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The real `logd` binary running `serve` as a child process.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `logd serve --socket <dir>/logd.sock` plus `extra` args and waits for its
    /// "listening" line.
    pub fn start(dir: &Path, extra: &[&str]) -> Daemon {
        let socket = dir.join("logd.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_logd"))
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(
            line.trim_end(),
            format!("logd: listening on {}", socket.display()),
            "unexpected first line"
        );
        Daemon { child, socket }
    }

    /// SIGTERM and wait: a clean shutdown. Returns whether it exited successfully.
    pub fn terminate(mut self) -> bool {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        self.child.wait().unwrap().success()
    }

    /// SIGKILL and wait: a crash.
    pub fn crash(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
