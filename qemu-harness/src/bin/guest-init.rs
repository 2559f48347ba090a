//! The guest's `/init` (PID 1 in the QEMU proof run).
//!
//! 1. Mounts /proc, /sys, /dev (devtmpfs), /tmp and /run (tmpfs), checks them in
//!    /proc/self/mountinfo, and only then prints `init: mounts ok`.
//! 2. Reads the manifest the host packed at `/etc/qemu-harness/manifest.toml`.
//! 3. Starts each daemon in order, relays its stdout and stderr to the console line by
//!    line, and waits until it is ready: it printed its own readiness marker AND its
//!    socket exists. A daemon that exits first or is not ready in time is a FAIL.
//! 4. Runs each selftest in order, relaying its output (it prints its own markers); a
//!    non-zero exit or a timeout is a FAIL.
//! 5. Checks every daemon is still alive, stops them, drains the console and powers off.
//!
//! The init itself never prints `ok` or `ready` for anything but its mounts: those
//! markers belong to the programs that observed the effect.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use qemu_harness::ladder::line_has_marker;
use qemu_harness::manifest::{self, DaemonEntry, Manifest, SelftestEntry};
use qemu_harness::markers::{INIT_MOUNTS_FAIL, INIT_MOUNTS_OK};
use rustix::mount::MountFlags;

/// Poll period while waiting for a child.
const POLL: Duration = Duration::from_millis(10);
/// How long the init waits for a finished child's output to drain.
const DRAIN: Duration = Duration::from_secs(2);

fn main() {
    if !rustix::process::getpid().is_init() {
        eprintln!(
            "guest-init is the QEMU guest's /init: it mounts file systems and powers the \
             machine off, so it refuses to run unless it is PID 1"
        );
        std::process::exit(2);
    }
    match mount_all() {
        Ok(()) => {
            say(INIT_MOUNTS_OK);
            if let Err(e) = run() {
                say(&format!("init: FAIL: {e:#}"));
            }
        }
        Err(e) => say(&format!("{INIT_MOUNTS_FAIL}: {e:#}")),
    }
    power_off();
}

/// Writes one whole line to the console.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // Nowhere to report a console that cannot be written.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MountFlags,
    data: &'static std::ffi::CStr,
}

const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: MountFlags::NOSUID
            .union(MountFlags::NODEV)
            .union(MountFlags::NOEXEC),
        data: c"",
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: MountFlags::NOSUID
            .union(MountFlags::NODEV)
            .union(MountFlags::NOEXEC),
        data: c"",
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MountFlags::NOSUID,
        data: c"mode=0755",
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MountFlags::NOSUID.union(MountFlags::NODEV),
        data: c"mode=1777",
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MountFlags::NOSUID.union(MountFlags::NODEV),
        data: c"mode=0755",
    },
];

/// Mounts everything, then proves it from the kernel's own mount table.
fn mount_all() -> Result<()> {
    for m in MOUNTS {
        std::fs::create_dir_all(m.target).with_context(|| format!("mkdir {}", m.target))?;
        rustix::mount::mount(m.source, m.target, m.fstype, m.flags, m.data)
            .with_context(|| format!("mount -t {} {} {}", m.fstype, m.source, m.target))?;
    }
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for m in MOUNTS {
        if !is_mounted(&mountinfo, m.target, m.fstype) {
            bail!(
                "{} is not a {} mount in /proc/self/mountinfo",
                m.target,
                m.fstype
            );
        }
    }
    for path in ["/proc/self", "/dev/null", "/sys/kernel"] {
        if !Path::new(path).exists() {
            bail!("{path} does not exist after mounting");
        }
    }
    Ok(())
}

/// Whether a mountinfo table has `target` mounted with file system type `fstype`.
/// A line is `id parent major:minor root mount-point options [tags...] - fstype source ...`.
fn is_mounted(mountinfo: &str, target: &str, fstype: &str) -> bool {
    mountinfo.lines().any(|line| {
        let mount_point = line.split(' ').nth(4);
        let fs = line
            .split_once(" - ")
            .and_then(|(_, rest)| rest.split(' ').next());
        mount_point == Some(target) && fs == Some(fstype)
    })
}

fn run() -> Result<()> {
    let text = std::fs::read_to_string(manifest::GUEST_PATH)
        .with_context(|| format!("reading {}", manifest::GUEST_PATH))?;
    let manifest = Manifest::parse(&text)?;
    // The scrape step reaches metricsd over 127.0.0.1.
    qemu_harness::net::loopback_up().context("bringing the loopback interface up")?;
    say(&format!(
        "init: plan `{}`: {} daemon(s), {} selftest(s)",
        manifest.plan,
        manifest.daemons.len(),
        manifest.selftests.len()
    ));
    let mut daemons = Vec::new();
    for entry in &manifest.daemons {
        daemons.push(start_daemon(entry)?);
    }
    for entry in &manifest.selftests {
        run_selftest(entry)?;
    }
    for daemon in &mut daemons {
        if let Some(status) = daemon.spawned.child.try_wait()? {
            bail!(
                "daemon {} exited during the selftests ({status})",
                daemon.name
            );
        }
    }
    for daemon in &mut daemons {
        daemon.spawned.child.kill().ok();
        daemon.spawned.child.wait().ok();
        daemon.spawned.drain();
    }
    say("init: all selftests exited 0; powering off");
    Ok(())
}

/// A child whose output is relayed to the console.
struct Spawned {
    child: Child,
    relays: Vec<JoinHandle<()>>,
}

impl Spawned {
    /// Starts `path args`, relaying stdout and stderr; stdout lines are also sent on the
    /// returned channel.
    fn start(path: &str, args: &[String]) -> Result<(Self, Receiver<String>)> {
        let mut child = Command::new(path)
            .args(args)
            .env("PATH", "/bin")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {path}"))?;
        let (tx, rx) = mpsc::channel();
        let mut relays = Vec::new();
        if let Some(out) = child.stdout.take() {
            relays.push(relay(out, Some(tx)));
        }
        if let Some(err) = child.stderr.take() {
            relays.push(relay(err, None));
        }
        Ok((Self { child, relays }, rx))
    }

    /// Waits (bounded) for the relays to print everything the child wrote.
    fn drain(&mut self) {
        let until = Instant::now() + DRAIN;
        while Instant::now() < until && !self.relays.iter().all(JoinHandle::is_finished) {
            thread::sleep(POLL);
        }
    }
}

/// Copies `from` to the console line by line, unchanged, so markers reach the host as
/// the child printed them.
fn relay(from: impl Read + Send + 'static, lines: Option<Sender<String>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&raw);
                    let line = text.trim_end_matches(['\n', '\r']);
                    say(line);
                    if let Some(tx) = &lines {
                        // The init stops listening once the daemon is ready.
                        let _ = tx.send(line.to_owned());
                    }
                }
            }
        }
    })
}

struct Daemon {
    name: String,
    spawned: Spawned,
}

fn is_socket(path: &str) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Starts a daemon and waits until it printed its readiness marker and its socket exists.
fn start_daemon(entry: &DaemonEntry) -> Result<Daemon> {
    let (mut spawned, lines) = Spawned::start(&entry.path, &entry.args)
        .with_context(|| format!("daemon {}", entry.name))?;
    let started = Instant::now();
    let limit = Duration::from_millis(entry.ready_timeout_ms);
    let mut marker = false;
    loop {
        match lines.recv_timeout(POLL) {
            Ok(line) => marker |= line_has_marker(&line, &entry.ready_line),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => thread::sleep(POLL),
        }
        let socket = entry.socket.as_deref().is_none_or(is_socket);
        if marker && socket {
            say(&format!(
                "init: daemon {} is up (pid {}): marker {:?} seen{}",
                entry.name,
                spawned.child.id(),
                entry.ready_line,
                entry
                    .socket
                    .as_deref()
                    .map_or(String::new(), |s| format!(", socket {s} exists"))
            ));
            return Ok(Daemon {
                name: entry.name.clone(),
                spawned,
            });
        }
        if let Some(status) = spawned.child.try_wait()? {
            spawned.drain();
            bail!(
                "daemon {} exited ({status}) before it was ready",
                entry.name
            );
        }
        if started.elapsed() > limit {
            spawned.child.kill().ok();
            spawned.child.wait().ok();
            spawned.drain();
            bail!(
                "daemon {} not ready after {} ms: marker {:?} {}, socket {}",
                entry.name,
                entry.ready_timeout_ms,
                entry.ready_line,
                if marker { "seen" } else { "not seen" },
                match (&entry.socket, socket) {
                    (Some(path), true) => format!("{path} exists"),
                    (Some(path), false) => format!("{path} missing"),
                    (None, _) => "not required".to_owned(),
                }
            );
        }
    }
}

/// Runs a selftest to completion; it prints its own markers.
fn run_selftest(entry: &SelftestEntry) -> Result<()> {
    let (mut spawned, _lines) = Spawned::start(&entry.path, &entry.args)
        .with_context(|| format!("selftest {}", entry.name))?;
    let started = Instant::now();
    let limit = Duration::from_millis(entry.timeout_ms);
    let status = loop {
        if let Some(status) = spawned.child.try_wait()? {
            break status;
        }
        if started.elapsed() > limit {
            spawned.child.kill().ok();
            spawned.child.wait().ok();
            spawned.drain();
            bail!(
                "selftest {} still running after {} ms",
                entry.name,
                entry.timeout_ms
            );
        }
        thread::sleep(POLL);
    };
    spawned.drain();
    if !status.success() {
        bail!("selftest {} exited with {status}", entry.name);
    }
    say(&format!("init: selftest {} exited 0", entry.name));
    Ok(())
}

/// Drains the console and powers off; never returns.
fn power_off() -> ! {
    // What is still in the UART's buffer would be lost with the machine.
    let _ = rustix::termios::tcdrain(std::io::stdout());
    rustix::fs::sync();
    if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::PowerOff) {
        // Under -no-reboot a reset ends QEMU as well.
        say(&format!("init: poweroff FAIL: {e}; resetting instead"));
        let _ = rustix::termios::tcdrain(std::io::stdout());
        let _ = rustix::system::reboot(rustix::system::RebootCommand::Restart);
    }
    // PID 1 must not exit (the kernel would panic); wait for the host's timeout.
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
1 1 0:2 / / rw - rootfs rootfs rw
22 1 0:20 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
23 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
24 1 0:5 / /dev rw,nosuid,relatime - devtmpfs devtmpfs rw,size=1k,mode=755
25 1 0:22 / /tmp rw,nosuid,nodev,relatime - tmpfs tmpfs rw
";

    #[test]
    fn reads_mountinfo() {
        assert!(is_mounted(MOUNTINFO, "/proc", "proc"));
        assert!(is_mounted(MOUNTINFO, "/sys", "sysfs"));
        assert!(is_mounted(MOUNTINFO, "/dev", "devtmpfs"));
        assert!(is_mounted(MOUNTINFO, "/tmp", "tmpfs"));
        assert!(!is_mounted(MOUNTINFO, "/run", "tmpfs"));
        assert!(!is_mounted(MOUNTINFO, "/proc", "tmpfs"));
    }
}
