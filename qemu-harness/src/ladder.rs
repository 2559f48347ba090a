//! The ladder checker: consumes console lines one at a time and decides, step by step,
//! whether the guest climbed the expected ladder of markers.
//!
//! It is pure: it never reads a clock or sleeps. Every call takes the `Instant` at which
//! its line arrived (or "now"), so tests drive time by hand and the runner passes real
//! `Instant`s.
//!
//! # Rules
//!
//! - Steps must be seen in order. A step's marker is seen when a console line, trimmed,
//!   starts with the marker and the marker is followed by the end of the line or by
//!   whitespace (see [`line_has_marker`]).
//! - Each step has its own timeout, counted from the moment the previous step was seen
//!   (the first step's from [`Checker::new`]).
//! - Any line holding the word `FAIL` fails the run (see [`line_has_fail`]), whether or not
//!   it is one of the ladder's own FAIL markers, and even after the last step.
//! - Any line holding `Kernel panic` fails the run, even after the last step.
//! - Any line holding `panicked at` (a Rust panic in any thread of any guest process,
//!   daemons included, as the standard panic hook prints it) fails the run, even after
//!   the last step.
//! - A marker of any step other than the awaited one (a later step, or an earlier one
//!   seen again) fails the run as out of order.
//! - When the console closes before the last step, the awaited step is missing.
//!
//! The first failure is final: later calls return the same failure.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// How many console lines a failure report shows.
pub const TAIL_LINES: usize = 25;

/// One rung of the ladder: the marker that proves it, the marker that refutes it and how
/// long it may take after the previous rung.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The marker that proves this step, e.g. `SELFTEST: metrics counters ok`.
    pub ok: &'static str,
    /// The marker the guest prints when this step's check failed,
    /// e.g. `SELFTEST: metrics counters FAIL`. It must contain the word `FAIL`.
    pub fail: &'static str,
    /// How long this step may take, counted from the previous step.
    pub timeout: Duration,
}

impl Step {
    /// A step with its ok marker, its FAIL marker and its timeout in seconds.
    #[must_use]
    pub const fn new(ok: &'static str, fail: &'static str, timeout_secs: u64) -> Self {
        Self {
            ok,
            fail,
            timeout: Duration::from_secs(timeout_secs),
        }
    }
}

/// Whether `line` shows `marker`: the trimmed line starts with the marker, followed by the
/// end of the line or whitespace (so `logd: ready` matches `logd: ready (pid 7)` but not
/// `logd: readyish`).
#[must_use]
pub fn line_has_marker(line: &str, marker: &str) -> bool {
    match line.trim().strip_prefix(marker) {
        Some(rest) => rest.is_empty() || rest.starts_with(char::is_whitespace),
        None => false,
    }
}

/// Whether `line` holds the word `FAIL` (upper case, not part of a longer word such as
/// `FAILED`; `:` `(` and other punctuation around it are fine).
#[must_use]
pub fn line_has_fail(line: &str) -> bool {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    line.match_indices("FAIL").any(|(at, word)| {
        let before = line[..at].chars().next_back();
        let after = line[at + word.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

/// Whether `line` reports a kernel panic.
#[must_use]
pub fn line_has_panic(line: &str) -> bool {
    line.contains("Kernel panic")
}

/// Whether `line` reports a Rust panic (`thread '...' panicked at src/...`).
#[must_use]
pub fn line_has_rust_panic(line: &str) -> bool {
    line.contains("panicked at")
}

/// A step that was seen, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Index of the step in the ladder.
    pub index: usize,
    /// The step's ok marker.
    pub marker: &'static str,
    /// Time since the checker started.
    pub at: Duration,
    /// Time since the previous step (or the start).
    pub took: Duration,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// The console closed (the VM exited) before the awaited marker was seen.
    Missing,
    /// A marker of another step was seen while this one was awaited.
    OutOfOrder {
        /// The marker that came out of turn.
        seen: &'static str,
        /// Its index in the ladder.
        seen_index: usize,
        /// The line that carried it.
        line: String,
    },
    /// A line holding `FAIL`.
    FailMarker {
        /// The line.
        line: String,
    },
    /// A line holding `Kernel panic`.
    KernelPanic {
        /// The line.
        line: String,
    },
    /// A line holding `panicked at`: a thread of a guest process panicked.
    Panicked {
        /// The line.
        line: String,
    },
    /// The awaited marker did not come within the step's timeout.
    Timeout {
        /// The step's timeout.
        limit: Duration,
    },
}

/// The first failure of a run: which step, what happened, and the last console lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What happened.
    pub kind: FailureKind,
    /// The index of the step that was awaited, or `None` when every step had been seen.
    pub step: Option<usize>,
    /// The awaited step's ok marker, or `None` when every step had been seen.
    pub awaited: Option<&'static str>,
    /// Number of steps in the ladder.
    pub steps: usize,
    /// Time since the checker started.
    pub at: Duration,
    /// The steps seen before the failure.
    pub seen: Vec<Seen>,
    /// The last console lines, oldest first (at most [`TAIL_LINES`]).
    pub last_lines: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.step, self.awaited) {
            (Some(i), Some(marker)) => write!(
                f,
                "ladder FAILED at step {}/{} `{marker}` after {:.1} s: ",
                i + 1,
                self.steps,
                self.at.as_secs_f64()
            )?,
            _ => write!(
                f,
                "ladder FAILED after all {} steps were seen, at {:.1} s: ",
                self.steps,
                self.at.as_secs_f64()
            )?,
        }
        match &self.kind {
            FailureKind::Missing => write!(f, "the console closed before the marker was seen")?,
            FailureKind::OutOfOrder {
                seen,
                seen_index,
                line,
            } => write!(
                f,
                "marker of step {} `{seen}` came out of order in line {line:?}",
                seen_index + 1
            )?,
            FailureKind::FailMarker { line } => write!(f, "FAIL marker in line {line:?}")?,
            FailureKind::KernelPanic { line } => write!(f, "kernel panic: {line:?}")?,
            FailureKind::Panicked { line } => write!(f, "a guest thread panicked: {line:?}")?,
            FailureKind::Timeout { limit } => write!(
                f,
                "the marker did not come within its {:.1} s timeout",
                limit.as_secs_f64()
            )?,
        }
        writeln!(f)?;
        for seen in &self.seen {
            writeln!(
                f,
                "  seen   step {:>2} `{}` at {:.2} s",
                seen.index + 1,
                seen.marker,
                seen.at.as_secs_f64()
            )?;
        }
        writeln!(f, "last {} console lines:", self.last_lines.len())?;
        for line in &self.last_lines {
            writeln!(f, "  | {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

/// A ladder climbed to the top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Climbed {
    /// Every step, in order, with its times.
    pub seen: Vec<Seen>,
}

impl Climbed {
    /// Time from the start to the last step.
    #[must_use]
    pub fn total(&self) -> Duration {
        self.seen.last().map_or(Duration::ZERO, |s| s.at)
    }
}

/// Consumes console lines and checks them against a ladder.
///
/// ```
/// use std::time::{Duration, Instant};
/// use qemu_harness::ladder::{Checker, Step};
///
/// const LADDER: &[Step] = &[
///     Step::new("logd: ready", "logd: FAIL", 30),
///     Step::new("SELFTEST: done", "SELFTEST: FAIL", 30),
/// ];
/// let t0 = Instant::now();
/// let mut checker = Checker::new(LADDER, t0);
/// checker.feed("[    0.5] booting", t0 + Duration::from_millis(500)).unwrap();
/// let seen = checker.feed("logd: ready", t0 + Duration::from_secs(2)).unwrap();
/// assert_eq!(seen.map(|s| s.index), Some(0));
/// checker.feed("SELFTEST: done", t0 + Duration::from_secs(3)).unwrap();
/// assert!(checker.is_done());
/// let climbed = checker.finish(t0 + Duration::from_secs(4)).unwrap();
/// assert_eq!(climbed.total(), Duration::from_secs(3));
/// ```
#[derive(Debug)]
pub struct Checker<'a> {
    steps: &'a [Step],
    next: usize,
    started: Instant,
    step_started: Instant,
    seen: Vec<Seen>,
    tail: VecDeque<String>,
    failed: Option<Box<Failure>>,
}

impl<'a> Checker<'a> {
    /// Starts checking `steps`; the first step's timeout counts from `now`.
    #[must_use]
    pub fn new(steps: &'a [Step], now: Instant) -> Self {
        Self {
            steps,
            next: 0,
            started: now,
            step_started: now,
            seen: Vec::with_capacity(steps.len()),
            tail: VecDeque::with_capacity(TAIL_LINES),
            failed: None,
        }
    }

    /// Whether every step has been seen (and nothing failed).
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.failed.is_none() && self.next == self.steps.len()
    }

    /// The steps seen so far.
    #[must_use]
    pub fn seen(&self) -> &[Seen] {
        &self.seen
    }

    /// The step awaited now, if any.
    #[must_use]
    pub fn awaited(&self) -> Option<&'a Step> {
        self.steps.get(self.next)
    }

    /// When the awaited step times out; `None` when all steps were seen or the run failed.
    #[must_use]
    pub fn deadline(&self) -> Option<Instant> {
        if self.failed.is_some() {
            return None;
        }
        self.awaited().map(|step| self.step_started + step.timeout)
    }

    /// Checks the awaited step's timeout against `now` (call it when no line came).
    pub fn check_time(&mut self, now: Instant) -> Result<(), Box<Failure>> {
        if let Some(failure) = &self.failed {
            return Err(failure.clone());
        }
        match self.awaited() {
            Some(step) if now.saturating_duration_since(self.step_started) > step.timeout => {
                Err(self.fail(
                    FailureKind::Timeout {
                        limit: step.timeout,
                    },
                    now,
                ))
            }
            _ => Ok(()),
        }
    }

    /// Feeds one console line that arrived at `now`. Returns the step it proved, if any.
    pub fn feed(&mut self, line: &str, now: Instant) -> Result<Option<Seen>, Box<Failure>> {
        // A line that arrives after the deadline does not rescue the step.
        self.check_time(now)?;
        let line = line.trim_end_matches(['\r', '\n']);
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_owned());

        if line_has_panic(line) {
            let kind = FailureKind::KernelPanic {
                line: line.to_owned(),
            };
            return Err(self.fail(kind, now));
        }
        if line_has_rust_panic(line) {
            let kind = FailureKind::Panicked {
                line: line.to_owned(),
            };
            return Err(self.fail(kind, now));
        }
        if line_has_fail(line) {
            let kind = FailureKind::FailMarker {
                line: line.to_owned(),
            };
            return Err(self.fail(kind, now));
        }
        if let Some(step) = self.awaited()
            && line_has_marker(line, step.ok)
        {
            let seen = Seen {
                index: self.next,
                marker: step.ok,
                at: now.saturating_duration_since(self.started),
                took: now.saturating_duration_since(self.step_started),
            };
            self.seen.push(seen.clone());
            self.next += 1;
            self.step_started = now;
            return Ok(Some(seen));
        }
        if let Some((index, step)) = self
            .steps
            .iter()
            .enumerate()
            .find(|(_, step)| line_has_marker(line, step.ok))
        {
            let kind = FailureKind::OutOfOrder {
                seen: step.ok,
                seen_index: index,
                line: line.to_owned(),
            };
            return Err(self.fail(kind, now));
        }
        Ok(None)
    }

    /// The console closed at `now`: the ladder is climbed or the awaited step is missing.
    pub fn finish(&mut self, now: Instant) -> Result<Climbed, Box<Failure>> {
        if let Some(failure) = &self.failed {
            return Err(failure.clone());
        }
        if self.next < self.steps.len() {
            // A step whose time ran out before the console closed timed out.
            self.check_time(now)?;
            return Err(self.fail(FailureKind::Missing, now));
        }
        Ok(Climbed {
            seen: self.seen.clone(),
        })
    }

    fn fail(&mut self, kind: FailureKind, now: Instant) -> Box<Failure> {
        let failure = Box::new(Failure {
            kind,
            step: self.awaited().map(|_| self.next),
            awaited: self.awaited().map(|s| s.ok),
            steps: self.steps.len(),
            at: now.saturating_duration_since(self.started),
            seen: self.seen.clone(),
            last_lines: self.tail.iter().cloned().collect(),
        });
        self.failed = Some(failure.clone());
        failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LADDER: &[Step] = &[
        Step::new("logd: ready", "logd: FAIL", 10),
        Step::new("metricsd: ready", "metricsd: FAIL", 5),
        Step::new(
            "SELFTEST: metrics counters ok",
            "SELFTEST: metrics counters FAIL",
            5,
        ),
        Step::new("SELFTEST: done", "SELFTEST: FAIL", 5),
    ];

    fn secs(t0: Instant, s: f64) -> Instant {
        t0 + Duration::from_secs_f64(s)
    }

    /// Feeds `(time, line)` pairs and returns the first failure, if any.
    fn run(lines: &[(f64, &str)], end: f64) -> Result<Climbed, Box<Failure>> {
        let t0 = Instant::now();
        let mut checker = Checker::new(LADDER, t0);
        for (at, line) in lines {
            checker.feed(line, secs(t0, *at))?;
        }
        checker.finish(secs(t0, end))
    }

    const GOOD: &[(f64, &str)] = &[
        (0.1, "[    0.000000] Linux version 6.1.0"),
        (1.5, "init: mounts ok"),
        (2.0, "logd: ready"),
        (2.5, "some daemon chatter"),
        (3.0, "metricsd: ready (exported 1 batch)"),
        (4.0, "SELFTEST: metrics counters ok"),
        (4.5, "SELFTEST: done"),
        (4.6, "[    4.600000] reboot: Power down"),
    ];

    #[test]
    fn good_ladder_passes_with_times() {
        let climbed = run(GOOD, 5.0).expect("good ladder");
        let markers: Vec<_> = climbed.seen.iter().map(|s| s.marker).collect();
        assert_eq!(
            markers,
            [
                "logd: ready",
                "metricsd: ready",
                "SELFTEST: metrics counters ok",
                "SELFTEST: done"
            ]
        );
        assert_eq!(climbed.total(), Duration::from_secs_f64(4.5));
        assert_eq!(climbed.seen[1].took, Duration::from_secs(1));
    }

    #[test]
    fn missing_marker_is_named() {
        let lines: Vec<_> = GOOD
            .iter()
            .copied()
            .filter(|(_, l)| !l.starts_with("SELFTEST: metrics counters"))
            .collect();
        // Without the counters marker, `SELFTEST: done` comes out of order.
        let failure = run(&lines, 5.0).expect_err("must fail");
        assert_eq!(failure.awaited, Some("SELFTEST: metrics counters ok"));
        assert!(matches!(
            failure.kind,
            FailureKind::OutOfOrder { seen_index: 3, .. }
        ));

        // The console closing early leaves the awaited step missing.
        let failure = run(&GOOD[..4], 4.0).expect_err("must fail");
        assert_eq!(failure.kind, FailureKind::Missing);
        assert_eq!(failure.step, Some(1));
        assert_eq!(failure.awaited, Some("metricsd: ready"));
        assert_eq!(failure.seen.len(), 1);
        assert_eq!(
            failure.last_lines.last().map(String::as_str),
            Some("some daemon chatter")
        );
    }

    #[test]
    fn out_of_order_marker_fails() {
        let lines = [(1.0, "metricsd: ready"), (2.0, "logd: ready")];
        let failure = run(&lines, 3.0).expect_err("must fail");
        assert_eq!(failure.awaited, Some("logd: ready"));
        assert!(matches!(
            failure.kind,
            FailureKind::OutOfOrder {
                seen: "metricsd: ready",
                seen_index: 1,
                ..
            }
        ));
        let text = failure.to_string();
        assert!(text.contains("step 1/4 `logd: ready`"), "{text}");
    }

    #[test]
    fn repeated_marker_fails() {
        let lines = [(1.0, "logd: ready"), (2.0, "logd: ready")];
        let failure = run(&lines, 3.0).expect_err("must fail");
        assert_eq!(failure.awaited, Some("metricsd: ready"));
        assert!(matches!(
            failure.kind,
            FailureKind::OutOfOrder { seen_index: 0, .. }
        ));
    }

    #[test]
    fn fail_marker_fails_at_the_awaited_step() {
        let lines = [
            (1.0, "logd: ready"),
            (2.0, "metricsd: ready"),
            (3.0, "SELFTEST: metrics counters FAIL: expected 3, got 2"),
            (3.5, "SELFTEST: done"),
        ];
        let failure = run(&lines, 4.0).expect_err("must fail");
        assert_eq!(failure.awaited, Some("SELFTEST: metrics counters ok"));
        assert!(
            matches!(failure.kind, FailureKind::FailMarker { ref line } if line.contains("expected 3"))
        );
    }

    #[test]
    fn any_fail_word_fails_even_after_the_last_step() {
        let mut lines = GOOD.to_vec();
        lines.push((4.7, "init: daemon logd FAIL: exited during shutdown"));
        let failure = run(&lines, 5.0).expect_err("must fail");
        assert_eq!(failure.step, None);
        assert!(matches!(failure.kind, FailureKind::FailMarker { .. }));
        assert!(failure.to_string().contains("after all 4 steps"));
    }

    #[test]
    fn a_rust_panic_in_any_thread_fails_even_after_the_last_step() {
        let panic = "[metricsd] thread 'drain' (12) panicked at metricsd/src/drain.rs:1:1:";
        let err = run(&[(0.5, "logd: ready"), (1.0, panic)], 2.0).expect_err("panic");
        assert_eq!(
            err.kind,
            FailureKind::Panicked {
                line: panic.to_owned()
            }
        );
        assert_eq!(err.awaited, Some("metricsd: ready"));
        let mut all: Vec<(f64, &str)> = LADDER
            .iter()
            .enumerate()
            .map(|(i, s)| (i as f64 * 0.1, s.ok))
            .collect();
        all.push((5.0, "thread 'main' panicked at src/main.rs:3:5:"));
        let err = run(&all, 6.0).expect_err("panic after the ladder");
        assert!(matches!(err.kind, FailureKind::Panicked { .. }));
        assert_eq!(err.awaited, None);
        assert!(!line_has_rust_panic(
            "the word panic alone, or panicked, is fine"
        ));
    }

    #[test]
    fn kernel_panic_fails() {
        let lines = [
            (1.0, "logd: ready"),
            (
                2.0,
                "[    2.000000] Kernel panic - not syncing: Attempted to kill init!",
            ),
        ];
        let failure = run(&lines, 3.0).expect_err("must fail");
        assert_eq!(failure.awaited, Some("metricsd: ready"));
        assert!(matches!(failure.kind, FailureKind::KernelPanic { .. }));
    }

    #[test]
    fn timeout_fails_on_a_late_line() {
        // metricsd: ready has 5 s after logd: ready (at 1 s); it comes at 6.5 s.
        let lines = [(1.0, "logd: ready"), (6.5, "metricsd: ready")];
        let failure = run(&lines, 7.0).expect_err("must fail");
        assert_eq!(failure.awaited, Some("metricsd: ready"));
        assert_eq!(
            failure.kind,
            FailureKind::Timeout {
                limit: Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn timeout_fails_with_no_line_and_deadline_is_exposed() {
        let t0 = Instant::now();
        let mut checker = Checker::new(LADDER, t0);
        assert_eq!(checker.deadline(), Some(secs(t0, 10.0)));
        checker.feed("logd: ready", secs(t0, 2.0)).expect("in time");
        assert_eq!(checker.deadline(), Some(secs(t0, 7.0)));
        assert!(checker.check_time(secs(t0, 7.0)).is_ok());
        let failure = checker.check_time(secs(t0, 7.1)).expect_err("late");
        assert_eq!(failure.step, Some(1));
        assert_eq!(checker.deadline(), None);
        // The first failure is final.
        assert_eq!(
            checker.feed("metricsd: ready", secs(t0, 7.2)),
            Err(failure.clone())
        );
        assert_eq!(checker.finish(secs(t0, 8.0)), Err(failure));
    }

    #[test]
    fn console_closing_after_the_deadline_is_a_timeout() {
        let failure = run(&[(1.0, "logd: ready")], 60.0).expect_err("must fail");
        assert!(matches!(failure.kind, FailureKind::Timeout { .. }));
    }

    #[test]
    fn marker_matching_rules() {
        assert!(line_has_marker("logd: ready", "logd: ready"));
        assert!(line_has_marker("  logd: ready (pid 7)\r", "logd: ready"));
        assert!(!line_has_marker("logd: readyish", "logd: ready"));
        assert!(!line_has_marker("xlogd: ready", "logd: ready"));
        assert!(!line_has_marker(
            "init: waiting for logd: ready",
            "logd: ready"
        ));
    }

    #[test]
    fn fail_word_rules() {
        assert!(line_has_fail("SELFTEST: metrics counters FAIL"));
        assert!(line_has_fail("init: daemon logd FAIL: exited"));
        assert!(line_has_fail("(FAIL)"));
        assert!(!line_has_fail("FAILED to frob"));
        assert!(!line_has_fail("Failed to frob"));
        assert!(!line_has_fail("NOFAIL"));
        assert!(!line_has_fail("FAIL_SAFE"));
    }

    #[test]
    fn tail_is_bounded() {
        let t0 = Instant::now();
        let mut checker = Checker::new(LADDER, t0);
        for i in 0..100 {
            checker.feed(&format!("line {i}"), t0).expect("no failure");
        }
        let failure = checker.finish(t0).expect_err("missing");
        assert_eq!(failure.last_lines.len(), TAIL_LINES);
        assert_eq!(
            failure.last_lines.last().map(String::as_str),
            Some("line 99")
        );
    }
}
