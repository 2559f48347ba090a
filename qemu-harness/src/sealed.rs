//! The sealed producer (`guest-sealed`): proof at the system-call level that recording
//! sends no IPC per sample, or anything else through the kernel.
//!
//! The process claims its ring from metricsd and registers every key through
//! `nexus-metrics` (the real grant, ring and handles), then seals itself with seccomp
//! filters and records `samples` counter increments, gauge sets, histogram observations
//! and spans (each with an attribute), [`BATCH`] iterations at a time with a wait for
//! metricsd to drain in between (spinning on the ring's read position through a second
//! mapping), so that nothing is ever dropped. Then it waits to
//! be told to exit. Its parent (the host test `tests/sealed.rs`, or the guest
//! selftest's `no ipc per sample` step) checks metricsd's totals exactly and that the
//! process exited with status 0, not killed by `SIGSYS`.
//!
//! The filters (seccomp BPF built and loaded with `seccompiler`, which keeps our code
//! free of `unsafe`), all installed by the recording thread once the ring is claimed
//! and every key registered:
//! - every thread (`SECCOMP_FILTER_FLAG_TSYNC`): `exit` and `exit_group` run;
//!   `sigaltstack` and `munmap` are refused with `EPERM`, not executed, because
//!   `std::process::exit` makes exactly these two (to free the main thread's signal
//!   stack) before `exit_group`, and a refusal still lets the process exit normally;
//!   `prctl(PR_SET_NO_NEW_PRIVS)` and `seccomp(SECCOMP_SET_MODE_FILTER)` run, because
//!   installing the later filters takes them, and they can only add restrictions; any
//!   other system call kills the process (`SIGSYS`);
//! - the recording thread, on top: `exit` and `exit_group` run, anything else (the
//!   four above included) kills the process.
//!
//! So from the moment the filters are in, the recording thread attempts no system call
//! at all, and the kernel executes none of the process's but `exit_group`. The other
//! two threads sit in a system call they entered before the filters: the main thread
//! in `read` on stdin (where the parent's `exit` line arrives) and `nexus-metrics`'
//! connection watcher in `poll`; the recording thread checks both in
//! `/proc/self/task/<tid>/syscall` before it installs the filters, since a call entered
//! before is not filtered but the next one would be. Span timestamps come from
//! `CLOCK_MONOTONIC` through the vDSO (no system call) when the kernel's clocksource
//! offers one there (`tsc`, `kvm-clock`, ...); otherwise a counter clock times them and
//! its first line says so.

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nexus_metrics::{
    ClaimError, Clock, Counter, Gauge, Histogram, RingInfo, RingSource, SocketSource, SpanName,
    Status,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use telemetry_ring::{MemfdRegion, Region, Writer};

/// The first line it prints, when it has started its recording thread (before the
/// seal): `sealed: started clock=... clocksource=...`.
pub const STARTED: &str = "sealed: started";
/// What the parent writes on stdin once it has checked the totals.
pub const EXIT_COMMAND: &str = "exit";
/// Records in the sealed producer's ring.
pub const RING_CAPACITY: u32 = 1 << 16;
/// Iterations recorded between two waits for metricsd (each writes six records: a
/// counter, a gauge, a histogram, a span start, attribute and end).
pub const BATCH: u64 = 8192;
/// The counter's name (each iteration adds `i % 7 + 1`).
pub const COUNTER: &str = "sealed.requests";
/// The gauge's name (each iteration sets `i - samples / 2`).
pub const GAUGE: &str = "sealed.depth";
/// The histogram's name (each iteration observes `i`).
pub const HISTOGRAM: &str = "sealed.size";
/// The span's name (each iteration opens and ends one, status ok).
pub const SPAN: &str = "sealed.op";
/// The span attribute's key (the iteration number).
pub const ATTR: &str = "sealed.rows";

/// What the producer records for `samples` iterations, as metricsd must aggregate it
/// (the warm-up before the seal adds a zero increment, a gauge set to 0 that a later
/// one replaces, an observation of 0 and one span).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The counter's total.
    pub counter: u64,
    /// The gauge's last value.
    pub gauge: i64,
    /// Histogram observations (the warm-up's included).
    pub histogram_count: u64,
    /// Their sum.
    pub histogram_sum: u128,
    /// Spans ended (the warm-up's included).
    pub spans: u64,
}

impl Expected {
    /// The totals of a run of `samples` iterations.
    #[must_use]
    pub fn of(samples: u64) -> Self {
        Self {
            counter: (0..samples).map(|i| i % 7 + 1).sum(),
            gauge: gauge_value(samples.saturating_sub(1), samples),
            histogram_count: samples + 1,
            histogram_sum: (0..u128::from(samples)).sum(),
            spans: samples + 1,
        }
    }
}

fn gauge_value(i: u64, samples: u64) -> i64 {
    i as i64 - (samples / 2) as i64
}

/// The clock spans are timed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SpanClock {
    /// `CLOCK_MONOTONIC` through the vDSO.
    Monotonic,
    /// A counter, on a kernel whose clocksource the vDSO cannot read.
    Counter,
}

/// A clock that counts: each reading is one more nanosecond than the last.
struct CounterClock(AtomicU64);

impl Clock for CounterClock {
    fn now_ns(&self) -> u64 {
        // ORDERING: Relaxed: one recording thread reads it.
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

static COUNTER_CLOCK: CounterClock = CounterClock(AtomicU64::new(1));

/// Clocksources whose reading the vDSO serves without a system call.
const VDSO_CLOCKSOURCES: &[&str] = &[
    "tsc",
    "kvm-clock",
    "hyperv_clocksource_tsc_page",
    "arch_sys_counter",
];

fn span_clock() -> (SpanClock, String) {
    let source =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e})"));
    if VDSO_CLOCKSOURCES.contains(&source.as_str()) {
        (SpanClock::Monotonic, source)
    } else {
        (SpanClock::Counter, source)
    }
}

/// A ring source that claims from metricsd's socket and keeps a second mapping of each
/// ring, through which the recording thread sees metricsd's read position.
struct Observed {
    inner: SocketSource,
    rings: Arc<Mutex<Vec<MemfdRegion>>>,
}

impl RingSource for Observed {
    fn claim(&self, hint: u64) -> Result<(Writer<MemfdRegion>, RingInfo), ClaimError> {
        let (writer, info) = self.inner.claim(hint)?;
        let second = writer
            .region()
            .fd()
            .try_clone_to_owned()
            .ok()
            .and_then(|fd| MemfdRegion::attach(fd).ok());
        if let Some(region) = second {
            self.rings
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(region);
        }
        Ok((writer, info))
    }
}

/// The recording thread's progress, for the main thread.
static STATE: AtomicU8 = AtomicU8::new(STARTING);
const STARTING: u8 = 0;
const SEALED: u8 = 1;
const FAILED: u8 = 2;

/// System call numbers of this architecture.
mod nr {
    pub const EXIT: i64 = libc::SYS_exit;
    pub const EXIT_GROUP: i64 = libc::SYS_exit_group;
    pub const MUNMAP: i64 = libc::SYS_munmap;
    pub const SIGALTSTACK: i64 = libc::SYS_sigaltstack;
    pub const PRCTL: i64 = libc::SYS_prctl;
    pub const SECCOMP: i64 = libc::SYS_seccomp;
    pub const READ: i64 = libc::SYS_read;
    #[cfg(target_arch = "x86_64")]
    pub const POLLS: &[i64] = &[libc::SYS_poll, libc::SYS_ppoll];
    #[cfg(not(target_arch = "x86_64"))]
    pub const POLLS: &[i64] = &[libc::SYS_ppoll];
}

fn target_arch() -> Result<TargetArch> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| anyhow::anyhow!("seccomp filters for {}: {e:?}", std::env::consts::ARCH))
}

/// A compiled filter: `matched` for the calls in `rules`, `otherwise` for the rest.
fn compile(
    rules: Vec<(i64, Vec<SeccompRule>)>,
    matched: SeccompAction,
    otherwise: SeccompAction,
) -> Result<BpfProgram> {
    let filter = SeccompFilter::new(
        rules.into_iter().collect(),
        otherwise,
        matched,
        target_arch()?,
    )
    .context("build a seccomp filter")?;
    filter.try_into().context("compile a seccomp filter")
}

/// `arg0 == value`.
fn arg0_is(value: u64) -> Result<Vec<SeccompRule>> {
    let condition = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
        .context("a seccomp condition")?;
    Ok(vec![
        SeccompRule::new(vec![condition]).context("a seccomp rule")?,
    ])
}

/// The three filters, in the order they are installed: for every thread, the calls
/// that may run at all (anything else kills the process), then the two refused with
/// `EPERM`; last, for the recording thread only, `exit` and `exit_group` alone.
///
/// The first lets `prctl(PR_SET_NO_NEW_PRIVS)` and `seccomp(SECCOMP_SET_MODE_FILTER)`
/// through, because installing the next two filters takes them; they can only add
/// restrictions, and the recording thread's own filter shuts them too.
fn filters() -> Result<[BpfProgram; 3]> {
    let everyone = compile(
        vec![
            (nr::EXIT, vec![]),
            (nr::EXIT_GROUP, vec![]),
            (nr::SIGALTSTACK, vec![]),
            (nr::MUNMAP, vec![]),
            (nr::PRCTL, arg0_is(libc::PR_SET_NO_NEW_PRIVS as u64)?),
            (
                nr::SECCOMP,
                arg0_is(u64::from(libc::SECCOMP_SET_MODE_FILTER))?,
            ),
        ],
        SeccompAction::Allow,
        SeccompAction::KillProcess,
    )?;
    let refused = compile(
        vec![(nr::SIGALTSTACK, vec![]), (nr::MUNMAP, vec![])],
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
    )?;
    let recorder = compile(
        vec![(nr::EXIT, vec![]), (nr::EXIT_GROUP, vec![])],
        SeccompAction::Allow,
        SeccompAction::KillProcess,
    )?;
    Ok([everyone, refused, recorder])
}

/// The system call a thread of this process is blocked in, from
/// `/proc/self/task/<tid>/syscall` (`None` while it runs).
fn blocked_in(tid: &str) -> Result<Option<i64>> {
    let path = format!("/proc/self/task/{tid}/syscall");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let first = text.split_whitespace().next().unwrap_or("");
    Ok(first.parse().ok())
}

/// Waits until the main thread is blocked in `read` and every other thread but the
/// calling one in `poll`; returns how many other threads there are.
fn wait_others_blocked(own: &str, main: &str) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut others = 0;
        let mut not_yet = Vec::new();
        for entry in std::fs::read_dir("/proc/self/task").context("list /proc/self/task")? {
            let tid = entry.context("list /proc/self/task")?.file_name();
            let tid = tid.to_string_lossy();
            if tid == own {
                continue;
            }
            others += 1;
            let call = blocked_in(&tid)?;
            let ok = match call {
                Some(n) if tid == main => n == nr::READ,
                Some(n) => nr::POLLS.contains(&n),
                None => false,
            };
            if !ok {
                not_yet.push(format!("thread {tid} in system call {call:?}"));
            }
        }
        if not_yet.is_empty() {
            return Ok(others);
        }
        if Instant::now() > deadline {
            bail!(
                "after 20 s the main thread is not in read or another not in poll: {}",
                not_yet.join(", ")
            );
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Runs the sealed producer against metricsd at `socket`; returns only on an error
/// found before sealing (after it, the process ends by `exit` on the parent's word).
///
/// With `probe`, the recording thread makes one system call (`getpid`) right after the
/// seal, which must kill the process with `SIGSYS`: the check that the filters bite.
pub fn run(socket: &Path, samples: u64, probe: bool) -> Result<()> {
    let (clock, clocksource) = span_clock();
    let rings = Arc::new(Mutex::new(Vec::new()));
    let mut config = nexus_metrics::Config::new()
        .ring_capacity(RING_CAPACITY)
        .source(Observed {
            inner: SocketSource::new(socket).capacity(RING_CAPACITY),
            rings: Arc::clone(&rings),
        });
    if clock == SpanClock::Counter {
        config = config.clock(&COUNTER_CLOCK);
    }
    nexus_metrics::install(config).map_err(|_| anyhow::anyhow!("nexus-metrics installed twice"))?;
    let main_tid = std::process::id().to_string();

    thread::Builder::new()
        .name("sealed-recorder".into())
        .spawn(move || {
            if let Err(e) = record(&main_tid, samples, probe, &rings) {
                eprintln!("sealed: FAIL before sealing: {e:#}");
                // ORDERING: Release: the message above is written before the flag.
                STATE.store(FAILED, Ordering::Release);
            }
        })
        .context("spawn the recording thread")?;

    let mut out = std::io::stdout().lock();
    writeln!(out, "{STARTED} clock={clock:?} clocksource={clocksource}")?;
    out.flush()?;
    drop(out);
    // Blocks in `read` until the parent says exit: the recording thread waits for this
    // thread to be in `read` before it seals the process. Exactly one `read`: once it
    // returns, a second one would kill the process, so whatever it brought is the word
    // (the parent writes the line with one `write`, which a pipe delivers whole).
    let mut word = [0u8; 64];
    let read = std::io::stdin().lock().read(&mut word);
    // ORDERING: Acquire pairs with the recording thread's Release stores.
    let state = STATE.load(Ordering::Acquire);
    let code = match (read, state) {
        (Ok(n), SEALED) if word[..n].trim_ascii() == EXIT_COMMAND.as_bytes() => 0,
        _ => 1,
    };
    // With the filters in, this makes `sigaltstack` and `munmap` (refused) and then
    // `exit_group`.
    std::process::exit(code)
}

/// The recording thread: claims and warms up, seals, records, then idles.
fn record(
    main_tid: &str,
    samples: u64,
    probe: bool,
    rings: &Mutex<Vec<MemfdRegion>>,
) -> Result<()> {
    let counter = Counter::try_new(COUNTER, &[])?;
    let gauge = Gauge::try_new(GAUGE, &[])?;
    let histogram = Histogram::try_new(HISTOGRAM, &[])?;
    let span = SpanName::try_new(SPAN)?;
    // Warm up: the first record claims the ring (the grant) and each first use of a
    // key registers it in the ring; all of it before the seal. A zero increment, a
    // gauge and a histogram value and a span that the totals below account for.
    counter.increment(0);
    gauge.set(0);
    histogram.record(0);
    {
        let s = span.enter();
        s.attr(ATTR, 0u64);
        s.set_status(Status::Ok);
    }
    ensure!(
        nexus_metrics::flush(),
        "the warm-up's counter is still pending"
    );
    let observer = {
        let mut rings = rings.lock().unwrap_or_else(PoisonError::into_inner);
        ensure!(
            rings.len() == 1,
            "{} rings claimed, expected 1",
            rings.len()
        );
        rings.pop().context("the ring")?
    };
    let stats = nexus_metrics::stats();
    ensure!(
        stats.dropped_total() == 0 && stats.rings_claimed == 1,
        "warm-up: {} dropped, {} rings claimed",
        stats.dropped_total(),
        stats.rings_claimed
    );
    wait_drained(&observer);

    // Seal: the main thread must be in its `read`, the watcher in its `poll`.
    let own = rustix::thread::gettid().as_raw_nonzero().to_string();
    let others = wait_others_blocked(&own, main_tid)?;
    ensure!(
        others == 2,
        "{others} other threads, expected the main thread and the watcher"
    );
    let [everyone, refused, recorder] = filters()?;
    seccompiler::apply_filter_all_threads(&everyone).context("seal every thread")?;
    seccompiler::apply_filter_all_threads(&refused).context("seal every thread")?;
    seccompiler::apply_filter(&recorder).context("seal the recording thread")?;
    // ORDERING: Release: nothing to publish but the state itself.
    STATE.store(SEALED, Ordering::Release);
    if probe {
        let _ = rustix::process::getpid();
    }

    // From here on: no system call. The handles, the thread-local ring, the span
    // clock (vDSO) and the wait below use memory only.
    let mut i = 0;
    while i < samples {
        let end = (i + BATCH).min(samples);
        for n in i..end {
            counter.increment(n % 7 + 1);
            gauge.set(gauge_value(n, samples));
            histogram.record(n);
            let s = span.enter();
            s.attr(ATTR, n);
            s.set_status(Status::Ok);
        }
        i = end;
        wait_drained(&observer);
    }
    // Idle until the main thread ends the process: returning would run this thread's
    // exit path (thread-local destructors unmap the ring), which makes system calls.
    loop {
        std::hint::spin_loop();
    }
}

/// Spins until metricsd has read everything published in the ring.
fn wait_drained(ring: &MemfdRegion) {
    loop {
        // ORDERING: Acquire pairs with metricsd's Release store of its read position.
        let read = ring.read_pos().load(Ordering::Acquire);
        // ORDERING: Relaxed: our own thread's writer stored it.
        let write = ring.write_pos().load(Ordering::Relaxed);
        if read == write {
            return;
        }
        std::hint::spin_loop();
    }
}

/// The parent's side: a running sealed producer.
pub struct Sealed {
    child: Child,
    stderr: Arc<Mutex<String>>,
    /// Its first line ([`STARTED`]).
    pub started: String,
}

impl Sealed {
    /// Starts `exe` against metricsd at `socket` and waits (at most `timeout`) for its
    /// first line, which comes before it seals itself.
    pub fn spawn(
        exe: &Path,
        socket: &Path,
        samples: u64,
        probe: bool,
        timeout: Duration,
    ) -> Result<Self> {
        let mut command = Command::new(exe);
        command
            .arg("--metricsd")
            .arg(socket)
            .arg("--samples")
            .arg(samples.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if probe {
            command.arg("--probe-syscall");
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("start {}", exe.display()))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(err) = child.stderr.take() {
            let keep = Arc::clone(&stderr);
            thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    let mut all = keep.lock().unwrap_or_else(PoisonError::into_inner);
                    all.push_str(&line);
                    all.push('\n');
                }
            });
        }
        let out = child.stdout.take().context("the child's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut sealed = Self {
            child,
            stderr,
            started: String::new(),
        };
        match rx.recv_timeout(timeout) {
            Ok(line) if line.starts_with(STARTED) => sealed.started = line.trim().to_owned(),
            other => {
                let status = sealed.kill();
                bail!(
                    "no first line from the sealed producer within {timeout:?} ({other:?}); \
                     {status}; stderr: {}",
                    sealed.stderr()
                );
            }
        }
        Ok(sealed)
    }

    /// What the child wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Fails if the child has exited already (it must wait for [`Self::finish`]).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self
            .child
            .try_wait()
            .context("wait for the sealed producer")?
        {
            bail!(
                "the sealed producer ended early: {}; stderr: {}",
                describe(status),
                self.stderr()
            );
        }
        Ok(())
    }

    /// Tells the child to exit and waits (at most `timeout`) for its status.
    pub fn finish(mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(mut stdin) = self.child.stdin.take() {
            // A child that died already cannot read it; its status says why.
            // One `write` of the whole line: the child reads exactly once.
            let _ = stdin.write_all(format!("{EXIT_COMMAND}\n").as_bytes());
        }
        self.wait(timeout)
    }

    /// Waits (at most `timeout`) for the child to end by itself.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .context("wait for the sealed producer")?
            {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let status = self.kill();
                bail!("the sealed producer did not exit within {timeout:?}; {status}");
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn kill(&mut self) -> String {
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => format!("killed: {}", describe(status)),
            Err(e) => format!("could not be reaped: {e}"),
        }
    }
}

impl Drop for Sealed {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.kill();
        }
    }
}

/// `exit status 0`, or `killed by signal 31 (SIGSYS)`.
#[must_use]
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) if sig == libc::SIGSYS => format!("killed by signal {sig} (SIGSYS)"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status}"),
    }
}
