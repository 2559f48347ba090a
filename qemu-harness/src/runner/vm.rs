//! Boots the VM and feeds its serial console to the ladder checker.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use qemu_harness::ladder::{Checker, Climbed, Failure, Step};

use super::provision::Qemu;

/// How long the VM may take to power off after the last marker.
pub const POWEROFF_GRACE: Duration = Duration::from_secs(30);
/// How long the console is still read after a failure.
const AFTER_FAILURE: Duration = Duration::from_secs(2);
/// How long QEMU may take to exit once its console closed.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// How to boot.
#[derive(Debug)]
pub struct Vm {
    /// QEMU.
    pub qemu: Qemu,
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// vCPUs.
    pub smp: u32,
    /// Memory, as `-m` takes it.
    pub memory: String,
    /// The kernel command line.
    pub append: String,
}

impl Vm {
    /// The QEMU command line.
    pub fn command(&self) -> Command {
        let mut command = self.qemu.command();
        command
            // microvm: a minimal machine (virtio-mmio, no PCI) with little to emulate and
            // probe; its ISA serial port (ttyS0) is on by default and -nographic puts it
            // on stdio. There is no KVM here: TCG, software emulation.
            .args(["-M", "microvm", "-accel", "tcg", "-nographic", "-no-reboot"])
            .args(["-m", &self.memory, "-smp", &self.smp.to_string()])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &self.append]);
        command
    }
}

/// The kernel command line.
///
/// `panic=-1` turns a panic into a reset, which `-no-reboot` turns into QEMU exiting, so
/// a panic ends the run at once (the checker has seen the `Kernel panic` line by then).
/// (The `PCI: Fatal: No config space access function found` line that stays visible is
/// expected: microvm has no PCI bus.)
/// `tsc_early_khz` spares the kernel calibrating the TSC against emulated timers, which
/// sometimes hangs microvm boots under TCG.
pub fn kernel_cmdline(tsc_khz: Option<u64>, extra: &[String]) -> String {
    let mut append = String::from("console=ttyS0 panic=-1 quiet");
    if let Some(khz) = tsc_khz {
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }
    for arg in extra {
        append.push(' ');
        append.push_str(arg);
    }
    append
}

/// The host CPU's rate in kHz from `/proc/cpuinfo` text (the first `cpu MHz` line).
pub fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .filter(|line| line.starts_with("cpu MHz"))
        .find_map(|line| line.split_once(':'))
        .and_then(|(_, value)| value.trim().parse().ok())?;
    let khz = (mhz * 1000.0).round();
    // In range, so the cast is exact (NaN is not in any range).
    (1.0..1e9).contains(&khz).then_some(khz as u64)
}

/// The outcome of one boot.
#[derive(Debug)]
pub struct Boot {
    /// The ladder, climbed or failed.
    pub ladder: Result<Climbed, Box<Failure>>,
    /// When QEMU exited by itself after the last marker (the guest powered off), from
    /// the start; `None` when it had to be killed or the ladder failed.
    pub powered_off: Option<Duration>,
    /// QEMU's exit status.
    pub status: Option<ExitStatus>,
    /// Where the whole console was saved.
    pub console_log: PathBuf,
    /// What QEMU wrote on stderr.
    pub qemu_stderr: String,
    /// Console lines that came in the moments after a failure.
    pub after_failure: Vec<String>,
}

/// What a boot proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every marker seen, the VM powered off by itself and QEMU exited with status 0.
    Pass {
        /// Boot to the last marker.
        done: Duration,
        /// Boot to QEMU's exit.
        off: Duration,
    },
    /// Every marker seen, but the VM did not power off in time.
    NoPowerOff,
    /// Every marker seen and the VM powered off, but QEMU's exit status was not 0.
    QemuStatus(String),
    /// The ladder failed.
    Ladder,
}

impl Boot {
    /// The boot's verdict: the ladder, the power-off and QEMU's exit status together.
    #[must_use]
    pub fn verdict(&self) -> Verdict {
        match (&self.ladder, self.powered_off) {
            (Err(_), _) => Verdict::Ladder,
            (Ok(_), None) => Verdict::NoPowerOff,
            (Ok(climbed), Some(off)) => match self.status {
                Some(status) if status.success() => Verdict::Pass {
                    done: climbed.total(),
                    off,
                },
                Some(status) => Verdict::QemuStatus(status.to_string()),
                None => Verdict::QemuStatus("unknown (QEMU could not be waited for)".into()),
            },
        }
    }
}

/// Boots once, printing each marker as it is seen (and every line when `echo`).
pub fn boot(vm: &Vm, ladder: &[Step], work: &Path, run: u32, echo: bool) -> Result<Boot> {
    let console_log = work.join(format!("console-{run}.log"));
    let stderr_log = work.join(format!("qemu-stderr-{run}.log"));
    let mut log = File::create(&console_log)
        .with_context(|| format!("creating {}", console_log.display()))?;
    let mut command = vm.command();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&stderr_log)?);
    let start = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", vm.qemu.binary.display()))?;
    let stdout = child.stdout.take().context("QEMU stdout")?;

    // Lines are stamped when they arrive, so the checker's times are the console's.
    let (tx, rx) = mpsc::channel::<(String, Instant)>();
    let reader = thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&raw);
                    let line = line.trim_end_matches(['\n', '\r']).to_owned();
                    if tx.send((line, Instant::now())).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let mut checker = Checker::new(ladder, start);
    let mut failure = None;
    let mut done_at = None;
    let mut console_closed = false;
    loop {
        let now = Instant::now();
        let deadline = checker
            .deadline()
            .or_else(|| done_at.map(|at: Instant| at + POWEROFF_GRACE))
            .unwrap_or(now);
        match rx.recv_timeout(deadline.saturating_duration_since(now)) {
            Ok((line, at)) => {
                writeln!(log, "{line}")?;
                if echo {
                    println!("  | {line}");
                }
                match checker.feed(&line, at) {
                    Ok(Some(seen)) => {
                        println!(
                            "  [{:>6.2} s] {}  (+{:.2} s)",
                            seen.at.as_secs_f64(),
                            line.trim(),
                            seen.took.as_secs_f64()
                        );
                        if checker.is_done() {
                            done_at = Some(at);
                        }
                    }
                    Ok(None) => {}
                    Err(f) => {
                        failure = Some(f);
                        break;
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Err(f) = checker.check_time(Instant::now()) {
                    failure = Some(f);
                    break;
                }
                if done_at.is_some_and(|at| at.elapsed() >= POWEROFF_GRACE) {
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                console_closed = true;
                break;
            }
        }
    }

    // After a failure, keep what the guest says next for a moment (the init usually
    // reports what it saw), without changing the verdict.
    let mut after_failure = Vec::new();
    if failure.is_some() {
        let until = Instant::now() + AFTER_FAILURE;
        loop {
            match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok((line, _)) => {
                    writeln!(log, "{line}")?;
                    after_failure.push(line);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    console_closed = true;
                    break;
                }
                Err(RecvTimeoutError::Timeout) => break,
            }
        }
    }

    // QEMU exits by itself when the guest powers off (or resets, under -no-reboot); its
    // console closes just before, so give it a moment after the last line.
    let mut exited = child.try_wait()?;
    if console_closed {
        let until = Instant::now() + EXIT_GRACE;
        while exited.is_none() && Instant::now() < until {
            thread::sleep(Duration::from_millis(10));
            exited = child.try_wait()?;
        }
    }
    let powered_off = match exited {
        Some(_) if failure.is_none() && done_at.is_some() => Some(start.elapsed()),
        _ => None,
    };
    if exited.is_none() {
        child.kill().ok();
    }
    let status = child.wait().ok();
    reader.join().ok();
    let ladder = match failure {
        Some(f) => Err(f),
        None => checker.finish(Instant::now()),
    };
    let qemu_stderr = std::fs::read_to_string(&stderr_log).unwrap_or_default();
    Ok(Boot {
        ladder,
        powered_off,
        status,
        console_log,
        qemu_stderr,
        after_failure,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qemu_harness::ladder::FailureKind;
    use std::os::unix::fs::PermissionsExt;

    const LADDER: &[Step] = &[
        Step::new("init: mounts ok", "init: mounts FAIL", 20),
        Step::new("SELFTEST: done", "SELFTEST: FAIL", 20),
    ];

    /// Boots a shell script standing in for QEMU (it ignores QEMU's arguments); the work
    /// dir is returned with the outcome so the console log outlives the call.
    fn boot_fake(script: &str, ladder: &[Step]) -> (tempfile::TempDir, Boot) {
        let work = tempfile::tempdir().expect("tempdir");
        let qemu = work.path().join("fake-qemu");
        std::fs::write(&qemu, format!("#!/bin/sh\n{script}\n")).expect("write");
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let vm = Vm {
            qemu: Qemu {
                binary: qemu,
                unpacked: None,
            },
            kernel: "vmlinuz".into(),
            initrd: "initrd".into(),
            smp: 1,
            memory: "64M".into(),
            append: String::new(),
        };
        let outcome = boot(&vm, ladder, work.path(), 1, false).expect("boot");
        (work, outcome)
    }

    #[test]
    fn a_climbed_ladder_and_an_exit_is_a_pass() {
        let (_work, boot) = boot_fake(
            "echo '[ 0.1] Linux'; echo 'init: mounts ok'; echo 'SELFTEST: done'; \
             echo '[ 0.5] reboot: Power down'",
            LADDER,
        );
        assert!(matches!(boot.verdict(), Verdict::Pass { .. }));
        assert_eq!(boot.ladder.map(|c| c.seen.len()).ok(), Some(2));
        assert!(boot.powered_off.is_some());
        let log = std::fs::read_to_string(&boot.console_log).unwrap_or_default();
        assert!(log.contains("reboot: Power down"), "{log}");
    }

    #[test]
    fn a_climbed_ladder_with_a_non_zero_qemu_exit_fails() {
        let (_work, boot) = boot_fake(
            "echo 'init: mounts ok'; echo 'SELFTEST: done'; exit 3",
            LADDER,
        );
        assert!(boot.ladder.is_ok(), "every marker was seen");
        assert!(boot.powered_off.is_some());
        match boot.verdict() {
            Verdict::QemuStatus(status) => assert!(status.contains('3'), "{status}"),
            other => panic!("not failed for QEMU's status: {other:?}"),
        }
    }

    #[test]
    fn a_fail_line_stops_the_vm() {
        // `exec sleep` keeps the fake VM alive: the runner must kill it, not wait.
        let (_work, boot) = boot_fake(
            "echo 'init: mounts ok'; echo 'SELFTEST: FAIL: boom'; exec sleep 30",
            LADDER,
        );
        let failure = boot.ladder.expect_err("must fail");
        assert!(matches!(failure.kind, FailureKind::FailMarker { .. }));
        assert_eq!(failure.awaited, Some("SELFTEST: done"));
        assert!(boot.powered_off.is_none());
    }

    #[test]
    fn a_silent_vm_times_out_and_is_killed() {
        let ladder = [Step {
            timeout: Duration::from_millis(200),
            ..LADDER[0]
        }];
        let (_work, boot) = boot_fake("exec sleep 30", &ladder);
        let failure = boot.ladder.expect_err("must fail");
        assert!(matches!(failure.kind, FailureKind::Timeout { .. }));
        assert!(boot.status.is_some_and(|s| !s.success()));
    }

    #[test]
    fn a_vm_that_exits_early_leaves_the_step_missing() {
        let (_work, boot) = boot_fake(
            "echo 'init: mounts ok'; echo 'qemu: something broke' >&2; exit 1",
            LADDER,
        );
        let failure = boot.ladder.expect_err("must fail");
        assert_eq!(failure.kind, FailureKind::Missing);
        assert!(boot.qemu_stderr.contains("something broke"));
    }

    #[test]
    fn reads_cpu_mhz() {
        let text = "processor\t: 0\ncpu MHz\t\t: 2445.424\ncpu MHz\t\t: 1.0\n";
        assert_eq!(tsc_khz_from_cpuinfo(text), Some(2_445_424));
        assert_eq!(tsc_khz_from_cpuinfo("processor : 0\n"), None);
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : fast\n"), None);
    }

    #[test]
    fn cmdline_has_console_and_tsc() {
        let append = kernel_cmdline(Some(2_445_424), &["loglevel=7".to_owned()]);
        assert!(append.contains("console=ttyS0"));
        assert!(append.contains("tsc_early_khz=2445424"));
        assert!(append.ends_with(" loglevel=7"));
        assert!(!kernel_cmdline(None, &[]).contains("tsc_early_khz"));
    }
}
