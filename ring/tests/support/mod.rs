//! Shared by the behaviour tests: hand a memfd to a child process over a Unix socket
//! with SCM_RIGHTS (as metricsd grants rings), and re-run this test binary as the
//! child.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::io::Read;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The environment variable that tells a re-run test binary which socket to fetch its
/// ring from.
pub const SOCKET_ENV: &str = "TELEMETRY_RING_TEST_SOCKET";

/// A fresh socket path for this process and `tag`.
pub fn socket_path(tag: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("telemetry-ring-{}-{tag}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Re-runs this test binary as a child that executes only the ignored test `entry`.
pub fn spawn_child(entry: &str, socket: &PathBuf) -> Child {
    Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            entry,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SOCKET_ENV, socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child test process")
}

/// Accepts one connection, waiting at most `timeout`.
pub fn accept_within(listener: &UnixListener, timeout: Duration) -> UnixStream {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => return stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("no child connected within {timeout:?}: {e}"),
        }
    }
}

/// Sends `fd` with one byte of payload.
pub fn send_fd(stream: &UnixStream, fd: impl AsFd) {
    let fds = [fd.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    rustix::net::sendmsg(
        stream,
        &[IoSlice::new(b"r")],
        &mut control,
        SendFlags::empty(),
    )
    .expect("sendmsg with SCM_RIGHTS");
}

/// Connects to the parent's socket and receives one fd.
pub fn receive_fd_from_parent() -> OwnedFd {
    let path = std::env::var_os(SOCKET_ENV).expect("child run without its socket");
    let stream = UnixStream::connect(path).expect("connect to parent");
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::empty(),
    )
    .expect("recvmsg");
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = message {
            if let Some(fd) = fds.next() {
                return fd;
            }
        }
    }
    panic!("parent sent no fd");
}

/// Waits for `child` to exit, killing it after `timeout`; returns whether it succeeded.
/// A failed child's output is printed, so its panic message is not lost.
pub fn wait_within(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            if !status.success() {
                let mut out = String::new();
                if let Some(mut s) = child.stdout.take() {
                    let _ = s.read_to_string(&mut out);
                }
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut out);
                }
                eprintln!("child output:\n{out}");
            }
            return status.success();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A small deterministic generator (xorshift64*), so failures replay.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
