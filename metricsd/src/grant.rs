//! The grant server: the control socket, the only IPC of the pipeline.
//!
//! A Unix `SOCK_SEQPACKET` listener; one thread polls it and every connection (at most
//! `rings.max_connections`, all non-blocking). At accept, the kernel's `SO_PEERCRED`
//! names the peer and [`Identify`] maps it to a service, bound to every ring granted on
//! that connection. Each 32-byte [`GrantRequest`] is answered with one
//! [`GrantResponse`], carrying the ring's memfd as `SCM_RIGHTS` when granted. Refusals:
//! `INVALID_ARGS` (wrong size, magic, version, op, nonzero reserved words, or a
//! capacity that is not a power of two), `DENIED` (the `[grants]` policy does not list
//! the peer), `OVER_LIMIT` (the service's or the daemon's ring cap, too many services,
//! or the ring's bytes past `rings.max_total_bytes` or the uid's
//! `rings.max_bytes_per_uid`), `RATE_LIMITED` (a per-connection token bucket),
//! `UNAVAILABLE` (the memfd could not be made). Every refusal is counted by status, and
//! the policy and byte refusals also by reason. End of file means the producer is gone.
//!
//! Nothing here blocks on a producer: every socket call is non-blocking, and a peer
//! whose replies cannot be sent at once is disconnected.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use telemetry_abi::{
    GRANT_FRAME_SIZE, Geometry, GrantOp, GrantRequest, GrantResponse, GrantStatus,
};
use telemetry_ring::MemfdRegion;
use zerocopy::IntoBytes;

use crate::config::RingsConfig;
use crate::drain::{Command, NewRing, ReturnedRing};
use crate::identity::{Identify, Peer, bound_service};
use crate::snapshot::{ConnectionStats, GrantStats};
use crate::wake::StopSignal;
use logd::privilege::SocketAccess;

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
    uid: u32,
    /// Whether the `[grants]` policy lets this peer ask.
    allowed: bool,
    rings: u32,
    /// Bytes of the rings granted on this connection and still held.
    bytes: u64,
    bucket: Bucket,
}

/// Who may ask for rings: the `[grants]` lists with names resolved. Empty lists: anyone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrantPolicy {
    /// Allowed uids.
    pub uids: Vec<u32>,
    /// Allowed gids (the peer's gid from `SO_PEERCRED`).
    pub gids: Vec<u32>,
    /// Allowed services (as the identity policy names the peer).
    pub services: Vec<String>,
}

impl GrantPolicy {
    /// Whether a peer with these credentials and service may ask for rings.
    pub fn allows(&self, uid: u32, gid: u32, service: &str) -> bool {
        (self.uids.is_empty() && self.gids.is_empty() && self.services.is_empty())
            || self.uids.contains(&uid)
            || self.gids.contains(&gid)
            || self.services.iter().any(|s| s == service)
    }
}

/// Why a request was refused, for the refusals whose status alone does not say.
const REFUSED_POLICY: &str = "policy";
const REFUSED_TOTAL_BYTES: &str = "total_bytes";
const REFUSED_UID_BYTES: &str = "uid_bytes";
const REFUSED_RETURN_NO_FD: &str = "return_without_fd";
const REFUSED_RETURN_ATTACH: &str = "return_unusable";
const REFUSED_UNEXPECTED_FD: &str = "unexpected_fd";

/// The control socket server.
pub struct GrantServer {
    listener: OwnedFd,
    path: PathBuf,
    /// The socket file this server created, so that it removes only its own: a newer
    /// instance may have replaced the file at `path` since.
    created: FileId,
    cfg: RingsConfig,
    policy: GrantPolicy,
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
    /// Ring bytes held, all uids; at most `cfg.max_total_bytes`.
    bytes_total: u64,
    /// Ring bytes held per uid (entries of uids holding none removed); each at most
    /// `cfg.max_bytes_per_uid`.
    bytes_by_uid: HashMap<u32, u64>,
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
fn bind(path: &Path, access: SocketAccess) -> Result<(OwnedFd, FileId), GrantError> {
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
    // By default any local process may ask (mode 0666): who it is comes from the kernel,
    // and the grant policy and byte bounds apply per peer.
    access.apply(path).map_err(|source| GrantError::Os {
        step: "set owner and mode of",
        path: path.to_owned(),
        source,
    })?;
    rustix::net::listen(&fd, 128).map_err(os("listen", path))?;
    Ok((fd, created))
}

impl GrantServer {
    /// Binds the control socket.
    pub fn bind(
        path: &Path,
        access: GrantAccess,
        identify: Box<dyn Identify>,
        tx: Sender<Command>,
        stats: Arc<Mutex<GrantStats>>,
    ) -> Result<Self, GrantError> {
        let GrantAccess {
            rings: cfg,
            policy,
            socket,
        } = access;
        let (listener, created) = bind(path, socket)?;
        let epoch_base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
            << 32;
        Ok(Self {
            listener,
            path: path.to_owned(),
            created,
            cfg,
            policy,
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
            bytes_total: 0,
            bytes_by_uid: HashMap::new(),
        })
    }

    /// Grants from now on use epochs `base | ring id`: a base above every epoch an
    /// earlier daemon logged, so a ring handed back is never confused with a new one.
    pub fn set_epoch_base(&mut self, base: u64) {
        self.epoch_base = self.epoch_base.max(base);
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
            let allowed = self.policy.allows(peer.uid, peer.gid, &service);
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
                uid: peer.uid,
                allowed,
                rings: 0,
                bytes: 0,
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
            // Room for one fd (a returned ring); any more are closed as they drop.
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let n = match rustix::net::recvmsg(
                &self.conns[i].fd,
                &mut [IoSliceMut::new(&mut buf[..])],
                &mut control,
                RecvFlags::DONTWAIT | RecvFlags::TRUNC | RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(msg) if msg.bytes == 0 => return false,
                Ok(msg) => msg.bytes,
                Err(Errno::AGAIN) => return true,
                Err(Errno::INTR) => continue,
                Err(_) => return false,
            };
            let mut fd = None;
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(mut fds) = message {
                    fd = fd.or_else(|| fds.next());
                }
            }
            let response = self.handle(i, &buf[..n.min(buf.len())], n, fd);
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
        if reply.returned && status == GrantStatus::OK {
            st.returned += 1;
            if let Some(c) = st.connections.get_mut(&conn_id) {
                c.messages += 1;
            }
            return;
        }
        if status == GrantStatus::OK {
            st.granted += 1;
            st.ring_bytes = self.bytes_total;
            st.ring_bytes_peak = st.ring_bytes_peak.max(self.bytes_total);
        } else {
            *st.refused
                .entry(status.name().unwrap_or("unknown"))
                .or_insert(0) += 1;
            if let Some(reason) = reply.reason {
                *st.refused_reasons.entry(reason).or_insert(0) += 1;
            }
        }
        if let Some(c) = st.connections.get_mut(&conn_id) {
            c.messages += 1;
            if status == GrantStatus::OK {
                c.rings += 1;
            }
        }
    }

    fn handle(&mut self, i: usize, bytes: &[u8], len: usize, fd: Option<OwnedFd>) -> Reply {
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

        // A frame longer than the buffer arrives truncated; `len` is its real length.
        let request = match GrantRequest::parse(bytes) {
            Ok(r) if len == GRANT_FRAME_SIZE => r,
            _ => return self.refuse(GrantStatus::INVALID_ARGS),
        };
        if !self.conns[i].allowed {
            return self.refuse_for(GrantStatus::DENIED, REFUSED_POLICY);
        }
        if request.op == GrantOp::RETURN {
            return self.take_back(i, fd);
        }
        if fd.is_some() {
            // Only a returned ring travels with an fd.
            return self.refuse_for(GrantStatus::INVALID_ARGS, REFUSED_UNEXPECTED_FD);
        }
        let capacity = match request.capacity {
            0 => self.cfg.capacity,
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
        let bytes = geometry.region_len() as u64;
        let uid = self.conns[i].uid;
        let uid_bytes = self.bytes_by_uid.get(&uid).copied().unwrap_or(0);
        if self.bytes_total.saturating_add(bytes) > self.cfg.max_total_bytes {
            return self.refuse_for(GrantStatus::OVER_LIMIT, REFUSED_TOTAL_BYTES);
        }
        if uid_bytes.saturating_add(bytes) > self.cfg.max_bytes_per_uid {
            return self.refuse_for(GrantStatus::OVER_LIMIT, REFUSED_UID_BYTES);
        }
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
        let (logged, is_logged) = std::sync::mpsc::channel();
        let sent = self.tx.send(Command::AddRing(NewRing {
            id,
            connection: conn_id,
            service: service.clone(),
            region,
            epoch,
            logged: Some(logged),
        }));
        if sent.is_err() {
            return self.refuse(GrantStatus::UNAVAILABLE);
        }
        // The ring should be in the write-ahead log before its producer writes to it: a
        // ring a later daemon does not know cannot be handed back. A drain loop that
        // does not answer within 5 s (it never blocks that long) is not waited for.
        let _ = is_logged.recv_timeout(std::time::Duration::from_secs(5));
        self.services.insert(service.clone());
        *self.rings_by_service.entry(service).or_insert(0) += 1;
        self.rings_total += 1;
        self.conns[i].rings += 1;
        self.conns[i].bytes += bytes;
        self.bytes_total += bytes;
        *self.bytes_by_uid.entry(uid).or_insert(0) += bytes;
        Reply {
            response: GrantResponse::granted(id, capacity, epoch),
            fd: Some(fd),
            reason: None,
            returned: false,
        }
    }

    /// A ring handed back (op 2): attached as any producer-supplied memory must be
    /// (sealed against resizing, a size its header explains, a header this consumer
    /// accepts), then finished by the drain loop, which decides from its log whether
    /// the ring is one it may finish. Waits for the drain loop's answer (it reads at
    /// most one capacity of records), at most 10 s.
    fn take_back(&mut self, i: usize, fd: Option<OwnedFd>) -> Reply {
        let Some(fd) = fd else {
            return self.refuse_for(GrantStatus::INVALID_ARGS, REFUSED_RETURN_NO_FD);
        };
        let region = match MemfdRegion::attach(fd) {
            Ok(region) => region,
            Err(e) => {
                eprintln!("metricsd: a returned ring was refused: {e}");
                return self.refuse_for(GrantStatus::INVALID_ARGS, REFUSED_RETURN_ATTACH);
            }
        };
        let id = self.next_ring;
        self.next_ring = self.next_ring.wrapping_add(1).max(1);
        let (reply, answer) = std::sync::mpsc::channel();
        let sent = self.tx.send(Command::ReturnRing(ReturnedRing {
            id,
            connection: self.conns[i].id,
            service: self.conns[i].service.clone(),
            region,
            reply,
        }));
        if sent.is_err() {
            return self.refuse(GrantStatus::UNAVAILABLE);
        }
        match answer.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(status) => Reply {
                response: GrantResponse::refused(status),
                fd: None,
                reason: None,
                returned: true,
            },
            Err(_) => self.refuse(GrantStatus::UNAVAILABLE),
        }
    }

    /// Refuses with `status`, counted under `reason` as well.
    fn refuse_for(&self, status: GrantStatus, reason: &'static str) -> Reply {
        Reply {
            reason: Some(reason),
            ..self.refuse(status)
        }
    }

    fn refuse(&self, status: GrantStatus) -> Reply {
        Reply {
            response: GrantResponse::refused(status),
            fd: None,
            reason: None,
            returned: false,
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
        self.bytes_total = self.bytes_total.saturating_sub(conn.bytes);
        if let Some(b) = self.bytes_by_uid.get_mut(&conn.uid) {
            *b = b.saturating_sub(conn.bytes);
            if *b == 0 {
                self.bytes_by_uid.remove(&conn.uid);
            }
        }
        {
            let mut st = self.stats();
            st.connections.remove(&conn.id);
            st.ring_bytes = self.bytes_total;
        }
        let _ = self.tx.send(Command::CloseConnection(conn.id));
    }
}

/// What the grant server enforces: the ring bounds, who may ask, and the socket file's
/// owner and mode.
#[derive(Clone, Debug)]
pub struct GrantAccess {
    /// `[rings]`.
    pub rings: RingsConfig,
    /// `[grants]`, resolved.
    pub policy: GrantPolicy,
    /// The control socket file's owner, group and mode.
    pub socket: SocketAccess,
}

struct Reply {
    response: GrantResponse,
    fd: Option<OwnedFd>,
    /// For a refusal the status alone does not explain: the reason it is counted under.
    reason: Option<&'static str>,
    /// The answer to a returned ring (op 2), not a grant.
    returned: bool,
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
