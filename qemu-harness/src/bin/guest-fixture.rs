//! The developer ladder's stand-in for a daemon and a selftest, so the init's daemon and
//! selftest machinery is proven end to end before logd and metricsd exist.
//!
//! - `guest-fixture daemon SOCKET`: serves a line echo on a Unix socket and prints
//!   `fixture-echo: ready` only after a line it sent through its own socket came back
//!   byte for byte.
//! - `guest-fixture selftest SOCKET`: sends a 4 KiB line through the daemon, prints
//!   `SELFTEST: fixture echo round trip ok` only if it came back byte for byte, then
//!   `SELFTEST: done`.
//!
//! Markers follow the proof-run rule: printed only after the effect was observed.
//!
//! To see the ladder turn red on purpose, boot with `--kernel-arg FIXTURE_BREAK=long-lines`:
//! the kernel hands unknown `NAME=value` parameters to the init's environment, the init
//! hands its environment to the daemon, and the daemon then truncates echoed lines over
//! 1 KiB. Its own short probe still passes (`fixture-echo: ready`); the selftest's 4 KiB
//! line does not (`SELFTEST: fixture echo round trip FAIL`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use qemu_harness::markers::{
    FIXTURE_READY, FIXTURE_ROUND_TRIP_FAIL, FIXTURE_ROUND_TRIP_OK, SELFTEST_DONE,
};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [mode, socket] if mode == "daemon" => match daemon(socket) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("fixture-echo: FAIL: {e:#}");
                ExitCode::FAILURE
            }
        },
        [mode, socket] if mode == "selftest" => match round_trip(socket, &payload()) {
            Ok(()) => {
                println!("{FIXTURE_ROUND_TRIP_OK}");
                println!("{SELFTEST_DONE}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{FIXTURE_ROUND_TRIP_FAIL}: {e:#}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: guest-fixture daemon SOCKET | guest-fixture selftest SOCKET");
            ExitCode::from(2)
        }
    }
}

/// A deterministic 4 KiB line (no newline inside).
fn payload() -> String {
    (0..4096u32)
        .map(|i| char::from(b'a' + u8::try_from(i % 26).unwrap_or(0)))
        .collect()
}

fn daemon(socket: &str) -> Result<()> {
    // A stale socket from an earlier run would make bind fail.
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).with_context(|| format!("binding {socket}"))?;
    let truncate = std::env::var("FIXTURE_BREAK").is_ok_and(|v| v == "long-lines");
    let server = thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || echo(stream, truncate));
        }
    });
    let probe = format!("ping from pid {}", std::process::id());
    round_trip(socket, &probe).context("round trip through its own socket")?;
    println!(
        "{FIXTURE_READY} (echoed {} bytes through {socket})",
        probe.len() + 1
    );
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the accept loop panicked"))
}

/// Echoes lines until the peer closes (cutting lines over 1 KiB when `truncate`, the
/// deliberate fault).
fn echo(stream: UnixStream, truncate: bool) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
        if truncate && line.len() > 1024 {
            line.truncate(1024);
            line.push(b'\n');
        }
        if writer.write_all(&line).is_err() {
            return;
        }
        line.clear();
    }
}

/// Sends `text` and a newline, and checks the same bytes come back.
fn round_trip(socket: &str, text: &str) -> Result<()> {
    let stream = UnixStream::connect(socket).with_context(|| format!("connecting {socket}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    writer.write_all(format!("{text}\n").as_bytes())?;
    let mut back = String::new();
    BufReader::new(stream)
        .read_line(&mut back)
        .context("reading the echo")?;
    let back = back.strip_suffix('\n').unwrap_or(&back);
    ensure!(
        back == text,
        "echo differs: sent {} bytes, got {} bytes back",
        text.len(),
        back.len()
    );
    Ok(())
}
