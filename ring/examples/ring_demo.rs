//! Two processes, one sealed memfd ring: the parent creates the ring and hands the fd to
//! a child over a Unix socket (as metricsd grants rings); the child writes records as
//! fast as it can, the parent drains and verifies them and prints the throughput.
//!
//! `cargo run --release -p telemetry-ring --example ring_demo [RECORDS]`

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use telemetry_abi::{Geometry, Record};
use telemetry_ring::{MemfdRegion, Reader, Writer};

const CHILD_ENV: &str = "RING_DEMO_SOCKET";
const DEFAULT_RECORDS: u64 = 50_000_000;

fn main() -> ExitCode {
    let records = match std::env::args()
        .nth(1)
        .map(|a| a.replace('_', "").parse::<u64>())
    {
        None => DEFAULT_RECORDS,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!(
                "usage: ring_demo [RECORDS]  (a positive whole number, default {DEFAULT_RECORDS})"
            );
            return ExitCode::from(2);
        }
    };
    let result = match std::env::var_os(CHILD_ENV) {
        Some(path) => child(&path, records),
        None => parent(records),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ring_demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parent(records: u64) -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join(format!("ring-demo-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let region = MemfdRegion::create("ring-demo", Geometry::new(1 << 16)?, 1)?;
    println!(
        "ring: {} records of 32 bytes in a sealed memfd ({} bytes)",
        1 << 16,
        region.len()
    );
    let mut child = Command::new(std::env::current_exe()?)
        .arg(records.to_string())
        .env(CHILD_ENV, &path)
        .spawn()?;
    let (stream, _) = listener.accept()?;
    let fds = [region.fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    rustix::net::sendmsg(
        &stream,
        &[IoSlice::new(b"r")],
        &mut control,
        SendFlags::empty(),
    )?;
    println!(
        "granted the ring to child pid {}; draining {records} records",
        child.id()
    );

    let mut reader = Reader::new(&region);
    let (mut next, mut bad) = (0u64, 0u64);
    let start = Instant::now();
    let mut last_report = start;
    while next < records {
        let drained = reader.drain(4096, |r| {
            bad += u64::from(r.words[0] != next);
            next += 1;
        })?;
        if drained.consumed == 0 {
            std::thread::yield_now();
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            println!(
                "  {next} records ({:.0}%)",
                next as f64 * 100.0 / records as f64
            );
        }
    }
    let elapsed = start.elapsed();
    let status = child.wait()?;
    let _ = std::fs::remove_file(&path);
    if !status.success() || bad != 0 {
        return Err(format!("child exited with {status}; {bad} records out of sequence").into());
    }
    println!(
        "ok: {records} records crossed processes in {:.3} s: {:.1} M records/s, {:.2} ns per record, all in sequence",
        elapsed.as_secs_f64(),
        records as f64 / elapsed.as_secs_f64() / 1e6,
        elapsed.as_nanos() as f64 / records as f64
    );
    Ok(())
}

fn child(path: &std::ffi::OsStr, records: u64) -> Result<(), Box<dyn std::error::Error>> {
    let stream = UnixStream::connect(path)?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::empty(),
    )?;
    let fd = control
        .drain()
        .find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
        .ok_or("parent sent no fd")?;
    let region = MemfdRegion::attach(fd)?;
    let mut writer = Writer::new(&region);
    let mut seq = 0;
    while seq < records {
        // Stage as many as fit (up to 64) and publish them with one store; wait out a
        // full ring without counting it as a loss: the demo retries.
        let batch = writer.free().min(64).min(records - seq);
        for _ in 0..batch {
            writer.stage(Record::counter(1, seq))?;
            seq += 1;
        }
        writer.flush();
        if batch == 0 {
            std::hint::spin_loop();
        }
    }
    if writer.dropped() != 0 {
        return Err(format!("{} records dropped", writer.dropped()).into());
    }
    Ok(())
}
