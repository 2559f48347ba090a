//! The grant server: the control socket, the only IPC of the pipeline.
//!
//! A Unix `SOCK_SEQPACKET` listener; one thread polls it and every connection (at most
//! `rings.max_connections`, all non-blocking). At accept, the kernel's `SO_PEERCRED`
//! names the peer and [`Identify`] maps it to a service, bound to every ring granted on
//! that connection. Each 32-byte [`GrantRequest`] is answered with one
//! [`GrantResponse`], carrying the ring's memfd as `SCM_RIGHTS` when granted. Refusals:
//! `INVALID_ARGS` (wrong size, magic, version, op, nonzero reserved words, or a
//! capacity that is not a power of two), `OVER_LIMIT` (the service's or the daemon's
//! ring cap, or too many services), `RATE_LIMITED` (a per-connection token bucket),
//! `UNAVAILABLE` (the memfd could not be made). End of file means the producer is gone.
//!
//! Nothing here blocks on a producer: every socket call is non-blocking, and a peer
//! whose replies cannot be sent at once is disconnected.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix,
    SocketFlags, SocketType,
};
use telemetry_abi::{
    GRANT_FRAME_SIZE, Geometry, GrantRequest, GrantResponse, GrantStatus, MIN_CAPACITY,
};
use telemetry_ring::MemfdRegion;
use zerocopy::{FromBytes, IntoBytes};

use crate::config::RingsConfig;
use crate::drain::{Command, NewRing};
use crate::identity::{Identify, Peer, bound_service};
use crate::snapshot::{ConnectionStats, GrantStats};
use crate::wake::StopSignal;

/// Why the control socket could not be set up.
#[derive(Debug)]
pub enum GrantError {
    /// Another metricsd answers on the socket.
    InUse(PathBuf),
    /// A system call failed.
    Os {
        /// Which step.
        step: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl fmt::Display for GrantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InUse(p) => write!(
                f,
                "control socket {} is in use by a running metricsd; stop it or choose \
                 another path with --socket",
                p.display()
            ),
            Self::Os { step, path, source } => {
                write!(f, "{step} {} failed: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for GrantError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Os { source, .. } => Some(source),
            Self::InUse(_) => None,
        }
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

struct Conn {
    fd: OwnedFd,
    id: u64,
    service: Arc<str>,
    rings: u32,
    bucket: Bucket,
}

/// The control socket server.
pub struct GrantServer {
    listener: OwnedFd,
    path: PathBuf,
    /// The socket file this server created, so that it removes only its own: a newer
    /// instance may have replaced the file at `path` since.
    created: FileId,
    cfg: RingsConfig,
    identify: Box<dyn Identify>,
    tx: Sender<Command>,
    stats: Arc<Mutex<GrantStats>>,
    conns: Vec<Conn>,
    next_conn: u64,
    next_ring: u32,
    epoch_base: u64,
    rings_by_service: HashMap<Arc<str>, u32>,
    rings_total: u32,
    services: HashSet<Arc<str>>,
}

fn os<'p>(step: &'static str, path: &'p Path) -> impl FnOnce(Errno) -> GrantError + 'p {
    move |e| GrantError::Os {
        step,
        path: path.to_owned(),
        source: e.into(),
    }
}

/// Which file a path named: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The file at `path` now (not following a symlink).
    fn lstat(path: &Path) -> Result<Self, Errno> {
        rustix::fs::lstat(path).map(|st| Self {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    /// The file at `path` now, if any.
    fn of(path: &Path) -> Option<Self> {
        Self::lstat(path).ok()
    }
}

/// Removes the socket file at `path` only if it is still the one `created` names.
///
/// An instance that exits must not take away the path of a newer instance that bound
/// it after the old file was removed or replaced. (Between the check and the unlink
/// another process could still replace the file; closing that window would need an
/// unlink by inode, which POSIX does not have. The window is one system call wide.)
fn remove_if_ours(path: &Path, created: FileId) -> bool {
    if FileId::of(path) == Some(created) {
        std::fs::remove_file(path).is_ok()
    } else {
        false
    }
}

/// Binds a SOCK_SEQPACKET listener at `path`, replacing a stale socket file but never
/// one a live daemon answers on. Returns the listener and the socket file's identity.
fn bind(path: &Path) -> Result<(OwnedFd, FileId), GrantError> {
    let addr = SocketAddrUnix::new(path).map_err(os("address", path))?;
    if path.exists() {
        let probe = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(os("socket", path))?;
        if rustix::net::connect(&probe, &addr).is_ok() {
            return Err(GrantError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(|source| GrantError::Os {
            step: "remove stale socket",
            path: path.to_owned(),
            source,
        })?;
    }
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(os("socket", path))?;
    rustix::net::bind(&fd, &addr).map_err(os("bind", path))?;
    let created = FileId::lstat(path).map_err(os("stat", path))?;
    // Any local process may ask; who it is comes from the kernel, not the file mode.
    rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(0o666)).map_err(os("chmod", path))?;
    rustix::net::listen(&fd, 128).map_err(os("listen", path))?;
    Ok((fd, created))
}

impl GrantServer {
    /// Binds the control socket.
    pub fn bind(
        path: &Path,
        cfg: RingsConfig,
        identify: Box<dyn Identify>,
        tx: Sender<Command>,
        stats: Arc<Mutex<GrantStats>>,
    ) -> Result<Self, GrantError> {
        let (listener, created) = bind(path)?;
        let epoch_base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
            << 32;
        Ok(Self {
            listener,
            path: path.to_owned(),
            created,
            cfg,
            identify,
            tx,
            stats,
            conns: Vec::new(),
            next_conn: 1,
            next_ring: 1,
            epoch_base,
            rings_by_service: HashMap::new(),
            rings_total: 0,
            services: HashSet::new(),
        })
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, GrantStats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves until `stop` is raised, then closes every connection (their rings are
    /// drained a last time) and removes the socket file if it is still the one this
    /// server bound (a newer instance may own the path by then). Between events the
    /// thread sleeps in `poll` with no timeout: an idle metricsd's grant thread does not
    /// wake until a producer connects, sends or leaves, or `stop` is raised.
    pub fn run(mut self, stop: &StopSignal) {
        while !stop.is_raised() {
            let (listener_ready, ready) = {
                let mut fds = Vec::with_capacity(2 + self.conns.len());
                fds.push(PollFd::new(&self.listener, PollFlags::IN));
                fds.push(PollFd::from_borrowed_fd(stop.fd(), PollFlags::IN));
                for c in &self.conns {
                    fds.push(PollFd::new(&c.fd, PollFlags::IN));
                }
                if rustix::event::poll(&mut fds, None).is_err() {
                    continue;
                }
                let listener_ready = !fds[0].revents().is_empty();
                let ready: Vec<bool> = fds[2..].iter().map(|f| !f.revents().is_empty()).collect();
                (listener_ready, ready)
            };
            if stop.is_raised() {
                break;
            }
            let mut gone = Vec::new();
            for (i, r) in ready.iter().enumerate() {
                if *r && !self.serve(i) {
                    gone.push(i);
                }
            }
            for i in gone.into_iter().rev() {
                self.close(i);
            }
            if listener_ready {
                self.accept();
            }
        }
        while !self.conns.is_empty() {
            self.close(self.conns.len() - 1);
        }
        remove_if_ours(&self.path, self.created);
    }

    fn accept(&mut self) {
        for _ in 0..16 {
            let fd = match rustix::net::accept_with(
                &self.listener,
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            ) {
                Ok(fd) => fd,
                Err(_) => return,
            };
            if self.conns.len() >= self.cfg.max_connections as usize {
                self.stats().refused_connections += 1;
                continue; // dropping `fd` closes it: the producer sees EOF and retries later
            }
            let Ok(cred) = rustix::net::sockopt::socket_peercred(&fd) else {
                continue;
            };
            let id = self.next_conn;
            self.next_conn += 1;
            let peer = Peer::from_credentials(
                id,
                cred.pid.as_raw_nonzero().get() as u32,
                cred.uid.as_raw(),
                cred.gid.as_raw(),
            );
            let service: Arc<str> = Arc::from(bound_service(&*self.identify, &peer));
            {
                let mut st = self.stats();
                st.accepted += 1;
                st.connections.insert(
                    id,
                    ConnectionStats {
                        id,
                        pid: peer.pid,
                        uid: peer.uid,
                        service: service.to_string(),
                        messages: 0,
                        rings: 0,
                    },
                );
            }
            self.conns.push(Conn {
                fd,
                id,
                service,
                rings: 0,
                bucket: Bucket {
                    tokens: f64::from(self.cfg.grant_burst),
                    last: Instant::now(),
                },
            });
        }
    }

    /// Reads up to 16 messages from connection `i`; false when it is gone.
    fn serve(&mut self, i: usize) -> bool {
        for _ in 0..16 {
            let mut buf = [0u8; 64];
            let n = match rustix::net::recv(
                &self.conns[i].fd,
                &mut buf[..],
                RecvFlags::DONTWAIT | RecvFlags::TRUNC,
            ) {
                Ok((_, 0)) => return false,
                Ok((_, n)) => n,
                Err(Errno::AGAIN) => return true,
                Err(Errno::INTR) => continue,
                Err(_) => return false,
            };
            let response = self.handle(i, &buf[..n.min(buf.len())], n);
            self.count(i, &response);
            if !self.reply(i, response) {
                return false;
            }
        }
        true
    }

    /// Counts a message and its answer under one lock, so no snapshot sees a message
    /// whose outcome is not counted yet.
    fn count(&self, i: usize, reply: &Reply) {
        let conn_id = self.conns[i].id;
        let status = reply.response.status;
        let mut st = self.stats();
        st.messages += 1;
        if status == GrantStatus::OK {
            st.granted += 1;
        } else {
            *st.refused
                .entry(status.name().unwrap_or("unknown"))
                .or_insert(0) += 1;
        }
        if let Some(c) = st.connections.get_mut(&conn_id) {
            c.messages += 1;
            if status == GrantStatus::OK {
                c.rings += 1;
            }
        }
    }

    fn handle(&mut self, i: usize, bytes: &[u8], len: usize) -> Reply {
        let conn_id = self.conns[i].id;
        let rate = f64::from(self.cfg.grant_rate_per_sec);
        let burst = f64::from(self.cfg.grant_burst);
        let bucket = &mut self.conns[i].bucket;
        let now = Instant::now();
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.last).as_secs_f64() * rate).min(burst);
        bucket.last = now;
        if bucket.tokens < 1.0 {
            return self.refuse(GrantStatus::RATE_LIMITED);
        }
        bucket.tokens -= 1.0;

        let request = match GrantRequest::read_from_bytes(bytes) {
            Ok(r) if len == GRANT_FRAME_SIZE => r,
            _ => return self.refuse(GrantStatus::INVALID_ARGS),
        };
        if !request.is_well_formed() || request.flags != 0 || request.reserved != 0 {
            return self.refuse(GrantStatus::INVALID_ARGS);
        }
        let capacity = match request.capacity {
            0 => self.cfg.capacity,
            c if c < MIN_CAPACITY || !c.is_power_of_two() => {
                return self.refuse(GrantStatus::INVALID_ARGS);
            }
            c => c.min(self.cfg.max_capacity),
        };
        let service = self.conns[i].service.clone();
        let held = self.rings_by_service.get(&service).copied().unwrap_or(0);
        let new_service = !self.services.contains(&service);
        if held >= self.cfg.per_service
            || self.rings_total >= self.cfg.max_total
            || (new_service && self.services.len() >= self.cfg.max_services as usize)
        {
            return self.refuse(GrantStatus::OVER_LIMIT);
        }
        let Ok(geometry) = Geometry::new(u64::from(capacity)) else {
            return self.refuse(GrantStatus::INVALID_ARGS);
        };
        let id = self.next_ring;
        let epoch = self.epoch_base | u64::from(id);
        let region = match MemfdRegion::create(&format!("metricsd-ring-{id}"), geometry, epoch) {
            Ok(r) => r,
            Err(_) => return self.refuse(GrantStatus::UNAVAILABLE),
        };
        let fd = match region.fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(_) => return self.refuse(GrantStatus::UNAVAILABLE),
        };
        self.next_ring = self.next_ring.wrapping_add(1).max(1);
        // The drain loop is told of the ring before the producer has its fd; its reader
        // starts at 0 whatever the producer writes to the consumer line meanwhile.
        let sent = self.tx.send(Command::AddRing(NewRing {
            id,
            connection: conn_id,
            service: service.clone(),
            region,
        }));
        if sent.is_err() {
            return self.refuse(GrantStatus::UNAVAILABLE);
        }
        self.services.insert(service.clone());
        *self.rings_by_service.entry(service).or_insert(0) += 1;
        self.rings_total += 1;
        self.conns[i].rings += 1;
        Reply {
            response: GrantResponse::granted(id, capacity, epoch),
            fd: Some(fd),
        }
    }

    fn refuse(&self, status: GrantStatus) -> Reply {
        Reply {
            response: GrantResponse::refused(status),
            fd: None,
        }
    }

    fn reply(&self, i: usize, reply: Reply) -> bool {
        let conn = &self.conns[i];
        let bytes = reply.response.as_bytes();
        let iov = [IoSlice::new(bytes)];
        let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
        let result = match &reply.fd {
            Some(fd) => {
                let fds = [fd.as_fd()];
                let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                    return false;
                }
                rustix::net::sendmsg(&conn.fd, &iov, &mut control, flags)
            }
            None => rustix::net::send(&conn.fd, bytes, flags),
        };
        matches!(result, Ok(n) if n == bytes.len())
    }

    fn close(&mut self, i: usize) {
        let conn = self.conns.swap_remove(i);
        if let Some(n) = self.rings_by_service.get_mut(&conn.service) {
            *n = n.saturating_sub(conn.rings);
        }
        self.rings_total = self.rings_total.saturating_sub(conn.rings);
        self.stats().connections.remove(&conn.id);
        let _ = self.tx.send(Command::CloseConnection(conn.id));
    }
}

struct Reply {
    response: GrantResponse,
    fd: Option<OwnedFd>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Daemon, MemorySink};

    fn daemon(socket: &Path) -> crate::DaemonHandle {
        let config = Config {
            socket: socket.to_owned(),
            logd_socket: socket.with_extension("logd"),
            ..Config::default()
        };
        Daemon::new(config)
            .sink(MemorySink::new())
            .spawn()
            .expect("daemon starts")
    }

    fn answers(path: &Path) -> bool {
        let probe = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socket");
        let addr = SocketAddrUnix::new(path).expect("address");
        rustix::net::connect(&probe, &addr).is_ok()
    }

    #[test]
    fn an_old_instance_leaves_a_newer_instances_socket_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("metricsd.sock");
        let old = daemon(&path);
        // The path is taken over: the old file goes, a newer instance binds a new one.
        std::fs::remove_file(&path).expect("remove");
        let new = daemon(&path);
        old.shutdown();
        assert!(
            path.exists(),
            "the old instance removed the newer one's socket"
        );
        assert!(answers(&path), "the newer instance still answers");
        new.shutdown();
        assert!(!path.exists(), "an instance removes its own socket");
    }

    #[test]
    fn remove_if_ours_checks_the_inode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"a").expect("write");
        let first = FileId::of(&path).expect("exists");
        let replacement = dir.path().join("g");
        std::fs::write(&replacement, b"b").expect("write");
        std::fs::rename(&replacement, &path).expect("rename");
        assert!(!remove_if_ours(&path, first), "another file at the path");
        assert!(path.exists());
        let second = FileId::of(&path).expect("exists");
        assert!(remove_if_ours(&path, second));
        assert!(!path.exists());
    }
}
