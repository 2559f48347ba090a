//! The grant round trip `metricsd serve` makes before it prints `metricsd: ready`: it
//! connects to its own control socket like any producer, asks for the smallest ring,
//! and checks the answer and the ring it received (sealed memfd, valid header, the
//! granted capacity and epoch). Closing the connection frees the ring again.

use std::fmt;
use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendFlags, SocketAddrUnix,
    SocketFlags, SocketType, sockopt,
};
use telemetry_abi::{GRANT_FRAME_SIZE, GrantRequest, GrantResponse, GrantStatus, MIN_CAPACITY};
use telemetry_ring::{MemfdRegion, Region};
use zerocopy::{FromBytes, IntoBytes};

/// What a successful round trip granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    /// The ring's id.
    pub ring_id: u32,
    /// Its capacity in records.
    pub capacity: u32,
    /// Its epoch.
    pub epoch: u64,
}

/// Why the round trip failed.
#[derive(Debug)]
pub enum ProbeError {
    /// A system call on the control socket failed.
    Os {
        /// Which step.
        step: &'static str,
        /// The error.
        source: rustix::io::Errno,
    },
    /// The answer was not one 32-byte `GrantResponse`.
    Frame(usize),
    /// The grant was refused.
    Refused(GrantStatus),
    /// Granted, but no fd came with it.
    NoFd,
    /// The ring received does not match the grant.
    Ring(String),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Os { step, source } => write!(f, "{step} on the control socket: {source}"),
            Self::Frame(n) => write!(f, "answer of {n} bytes, expected {GRANT_FRAME_SIZE}"),
            Self::Refused(s) => write!(
                f,
                "the grant was refused: {}",
                s.name().unwrap_or("unknown status")
            ),
            Self::NoFd => f.write_str("granted without an fd"),
            Self::Ring(why) => write!(f, "the granted ring: {why}"),
        }
    }
}

impl std::error::Error for ProbeError {}

fn os(step: &'static str) -> impl FnOnce(rustix::io::Errno) -> ProbeError {
    move |source| ProbeError::Os { step, source }
}

/// Asks metricsd at `socket` for a ring of [`MIN_CAPACITY`] records, waiting at most
/// `timeout` for each step, and checks what arrives.
pub fn grant_round_trip(socket: &Path, timeout: Duration) -> Result<Granted, ProbeError> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(os("socket"))?;
    for id in [sockopt::Timeout::Recv, sockopt::Timeout::Send] {
        sockopt::set_socket_timeout(&fd, id, Some(timeout)).map_err(os("setsockopt"))?;
    }
    let addr = SocketAddrUnix::new(socket).map_err(os("address"))?;
    rustix::net::connect(&fd, &addr).map_err(os("connect"))?;
    let request = GrantRequest::ring(MIN_CAPACITY, u64::from(std::process::id()));
    rustix::net::send(&fd, request.as_bytes(), SendFlags::NOSIGNAL).map_err(os("send"))?;

    let mut buf = [0u8; 64];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = rustix::net::recvmsg(&fd, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
        .map_err(os("recvmsg"))?;
    let mut ring_fd: Option<OwnedFd> = None;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for f in fds {
                ring_fd = Some(f);
            }
        }
    }
    if msg.bytes != GRANT_FRAME_SIZE {
        return Err(ProbeError::Frame(msg.bytes));
    }
    let response = GrantResponse::read_from_bytes(&buf[..GRANT_FRAME_SIZE])
        .map_err(|_| ProbeError::Frame(0))?;
    if response.status != GrantStatus::OK {
        return Err(ProbeError::Refused(response.status));
    }
    let region = MemfdRegion::attach(ring_fd.ok_or(ProbeError::NoFd)?)
        .map_err(|e| ProbeError::Ring(e.to_string()))?;
    let capacity = region.geometry().capacity();
    if capacity != response.capacity || region.mapped().header_epoch() != response.epoch {
        return Err(ProbeError::Ring(format!(
            "capacity {capacity} and epoch {} in the header, {} and {} in the answer",
            region.mapped().header_epoch(),
            response.capacity,
            response.epoch
        )));
    }
    Ok(Granted {
        ring_id: response.ring_id,
        capacity,
        epoch: response.epoch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Daemon, MemorySink};

    #[test]
    fn a_round_trip_to_a_running_daemon_is_granted_and_freed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            socket: dir.path().join("m.sock"),
            logd_socket: dir.path().join("none.sock"),
            ..Config::default()
        };
        let daemon = Daemon::new(config)
            .sink(MemorySink::new())
            .spawn()
            .expect("daemon");
        let granted =
            grant_round_trip(daemon.socket_path(), Duration::from_secs(5)).expect("granted");
        assert_eq!(granted.capacity, MIN_CAPACITY);
        let snap = daemon.snapshot().expect("snapshot");
        assert_eq!(snap.grant.granted, 1);
        daemon.shutdown();
    }

    #[test]
    fn no_daemon_is_an_error_naming_the_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = grant_round_trip(&dir.path().join("absent.sock"), Duration::from_secs(1))
            .expect_err("nobody listens");
        assert!(
            err.to_string().starts_with("connect on the control socket"),
            "{err}"
        );
    }
}
