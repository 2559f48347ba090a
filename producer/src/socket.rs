//! The default [`RingSource`]: metricsd's control socket.
//!
//! One `SOCK_SEQPACKET` connection per process, opened on the first claim and held for
//! the process's life (metricsd reads the producer's identity from it with
//! `SO_PEERCRED` and takes end-of-file as the producer's exit). Each claim sends one
//! `GrantRequest` and reads one `GrantResponse`, with the ring's memfd as `SCM_RIGHTS`
//! when granted. A watcher thread per connection sleeps in `poll` for the hang-up only;
//! when metricsd goes away it [`invalidate`](crate::invalidate)s the connection's
//! generation, so every thread drops its ring on its next record and claims again. A
//! child process after `fork()` opens a connection of its own, so metricsd sees the
//! child's identity and grants it its own rings.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, poll};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, Shutdown, SocketAddrUnix, SocketFlags,
    SocketType, socket_with, sockopt,
};
use telemetry_abi::{
    GRANT_FRAME_SIZE, GRANT_MAGIC, GRANT_VERSION, GrantRequest, GrantResponse, GrantStatus,
};
use telemetry_ring::{MemfdRegion, Writer};
use zerocopy::{FromBytes, IntoBytes};

use crate::source::{ClaimError, RingInfo, RingSource, forks, generation, invalidate};

/// The environment variable naming metricsd's control socket.
pub const SOCKET_ENV: &str = "NEXUS_METRICSD_SOCKET";

/// Where metricsd's control socket is: `$NEXUS_METRICSD_SOCKET` if set, else
/// `$XDG_RUNTIME_DIR/metricsd.sock`, else `/run/metricsd.sock`.
pub fn default_socket_path() -> PathBuf {
    if let Some(path) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        return Path::new(&dir).join("metricsd.sock");
    }
    PathBuf::from("/run/metricsd.sock")
}

/// Claims rings from metricsd over its Unix control socket.
///
/// ```no_run
/// use nexus_metrics::{Config, SocketSource};
///
/// let source = SocketSource::new("/run/user/1000/metricsd.sock").capacity(8192);
/// nexus_metrics::install(Config::new().source(source)).expect("first to install");
/// ```
#[derive(Debug)]
pub struct SocketSource {
    path: PathBuf,
    capacity: u32,
    timeout: Duration,
    retry_min: Duration,
    retry_max: Duration,
    conn: Arc<Mutex<Conn>>,
}

#[derive(Debug, Default)]
struct Conn {
    sock: Option<Arc<OwnedFd>>,
    /// The generation rings granted over `sock` belong to.
    generation: u64,
    /// No connect attempt before this.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// [`forks`] when this state was made: a child must not use its parent's socket.
    forks: u64,
}

impl Conn {
    /// In a child process after `fork()`: forgets the parent's connection without
    /// shutting it down (the parent still uses it). The child's copy of the fd stays
    /// open until `exec` (it is close-on-exec) or exit: the parent's watcher thread,
    /// which holds the other reference, does not exist in the child.
    fn forget_parent(&mut self) {
        *self = Self {
            forks: forks(),
            ..Self::default()
        };
    }

    /// Closes the connection (metricsd sees end-of-file and releases our rings) and
    /// makes every thread drop the rings it granted.
    fn close(&mut self) {
        if let Some(sock) = self.sock.take() {
            // Wakes the watcher out of `poll` (and tells metricsd) even though the
            // watcher still holds the fd.
            let _ = rustix::net::shutdown(&*sock, Shutdown::Both);
            invalidate(self.generation);
        }
    }
}

/// Why one request/response exchange failed.
enum Exchange {
    /// The connection is unusable: close it.
    Broken(&'static str, io::Error),
    /// The connection is fine; the claim failed.
    Failed(ClaimError),
}

impl SocketSource {
    /// A source connecting to `path`, asking for metricsd's default ring capacity, with
    /// a 1 s limit on each socket operation and reconnect attempts 10 ms to 1 s apart.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            capacity: 0,
            timeout: Duration::from_secs(1),
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_secs(1),
            conn: Arc::default(),
        }
    }

    /// A source for [`default_socket_path`].
    pub fn from_env() -> Self {
        Self::new(default_socket_path())
    }

    /// Records per ring to ask for, rounded up to a power of two (zero: metricsd's
    /// default; it may grant less).
    pub fn capacity(mut self, records: u32) -> Self {
        self.capacity = match records {
            0 => 0,
            n => n
                .max(telemetry_abi::MIN_CAPACITY)
                .checked_next_power_of_two()
                .unwrap_or(telemetry_abi::MAX_CAPACITY),
        };
        self
    }

    /// The longest any socket operation may block a claiming thread.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The first and the longest wait between failed connection attempts (doubling).
    pub fn retry(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max.max(min);
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn connect(&self, conn: &mut Conn) -> Result<Arc<OwnedFd>, ClaimError> {
        let now = Instant::now();
        if conn.retry_at.is_some_and(|at| now < at) {
            return Err(ClaimError::Unreachable {
                step: "backoff",
                source: io::Error::new(io::ErrorKind::WouldBlock, "waiting to retry connect"),
            });
        }
        match self.open() {
            Ok(sock) => {
                let sock = Arc::new(sock);
                conn.generation = generation();
                conn.retry_at = None;
                conn.backoff = Duration::ZERO;
                let watched = Arc::clone(&sock);
                let state = Arc::clone(&self.conn);
                let generation = conn.generation;
                let spawned = std::thread::Builder::new()
                    .name("nexus-metrics-watch".into())
                    .spawn(move || watch(&watched, generation, &state));
                if let Err(e) = spawned {
                    // Without a watcher a metricsd restart would go unnoticed.
                    let _ = rustix::net::shutdown(&*sock, Shutdown::Both);
                    return Err(self.failed(conn, now, "spawn", e));
                }
                conn.sock = Some(Arc::clone(&sock));
                Ok(sock)
            }
            Err((step, e)) => Err(self.failed(conn, now, step, e)),
        }
    }

    fn failed(
        &self,
        conn: &mut Conn,
        now: Instant,
        step: &'static str,
        e: io::Error,
    ) -> ClaimError {
        conn.backoff = if conn.backoff.is_zero() {
            self.retry_min
        } else {
            (conn.backoff * 2).min(self.retry_max)
        };
        conn.retry_at = Some(now + conn.backoff);
        ClaimError::Unreachable { step, source: e }
    }

    fn open(&self) -> Result<OwnedFd, (&'static str, io::Error)> {
        let sock = socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| ("socket", e.into()))?;
        // Bound every later send, recv (and the connect of a full backlog).
        for id in [sockopt::Timeout::Recv, sockopt::Timeout::Send] {
            sockopt::set_socket_timeout(&sock, id, Some(self.timeout))
                .map_err(|e| ("setsockopt", e.into()))?;
        }
        let addr = SocketAddrUnix::new(self.path.as_path()).map_err(|e| ("connect", e.into()))?;
        retry_intr(|| rustix::net::connect(&sock, &addr)).map_err(|e| ("connect", e.into()))?;
        Ok(sock)
    }

    fn exchange(
        &self,
        sock: &OwnedFd,
        hint: u64,
    ) -> Result<(Writer<MemfdRegion>, RingInfo), Exchange> {
        let request = GrantRequest::ring(self.capacity, hint);
        let sent = retry_intr(|| rustix::net::send(sock, request.as_bytes(), SendFlags::NOSIGNAL))
            .map_err(|e| Exchange::Broken("send", e.into()))?;
        if sent != GRANT_FRAME_SIZE {
            return Err(Exchange::Broken("send", io::Error::other("short send")));
        }

        // One byte more than a frame, to notice an oversized answer.
        let mut frame = [0u8; GRANT_FRAME_SIZE + 1];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = retry_intr(|| {
            rustix::net::recvmsg(
                sock,
                &mut [IoSliceMut::new(&mut frame)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
        })
        .map_err(|e| Exchange::Broken("recv", e.into()))?;
        let mut fd = None;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(mut fds) = message {
                // Any extra fds are closed as the iterator drops.
                fd = fd.or_else(|| fds.next());
            }
        }
        if msg.bytes == 0 {
            return Err(Exchange::Broken(
                "recv",
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "metricsd closed the connection",
                ),
            ));
        }
        if msg.bytes != GRANT_FRAME_SIZE || msg.flags.contains(ReturnFlags::TRUNC) {
            return Err(Exchange::Broken(
                "recv",
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "grant response is not one 32-byte frame",
                ),
            ));
        }
        let response = GrantResponse::read_from_bytes(&frame[..GRANT_FRAME_SIZE])
            .map_err(|_| Exchange::Failed(ClaimError::Protocol("unreadable response")))?;
        if response.magic != GRANT_MAGIC || response.version != GRANT_VERSION {
            return Err(Exchange::Broken(
                "recv",
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "grant response has a bad magic or version",
                ),
            ));
        }
        if response.status != GrantStatus::OK {
            return Err(Exchange::Failed(ClaimError::Refused(response.status)));
        }
        let fd = fd.ok_or(Exchange::Failed(ClaimError::Protocol(
            "granted without a file descriptor",
        )))?;
        let region =
            MemfdRegion::attach(fd).map_err(|e| Exchange::Failed(ClaimError::Attach(e)))?;
        let writer = Writer::new(region);
        let info = RingInfo {
            ring_id: response.ring_id,
            capacity: writer.capacity() as u32,
            epoch: response.epoch,
            generation: 0,
        };
        Ok((writer, info))
    }
}

impl SocketSource {
    /// Sends a return request (op 2) with `ring`'s memfd and reads the answer: `Ok(true)`
    /// when the consumer finished the ring, `Ok(false)` when it refused; `Err` when the
    /// connection broke.
    fn give_back(&self, sock: &OwnedFd, ring: &MemfdRegion, hint: u64) -> io::Result<bool> {
        let request = GrantRequest::return_ring(hint);
        let fds = [ring.fd()];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("no room for the fd"));
        }
        let sent = retry_intr(|| {
            rustix::net::sendmsg(
                sock,
                &[IoSlice::new(request.as_bytes())],
                &mut control,
                SendFlags::NOSIGNAL,
            )
        })?;
        if sent != GRANT_FRAME_SIZE {
            return Err(io::Error::other("short send"));
        }
        let mut frame = [0u8; GRANT_FRAME_SIZE + 1];
        let n = retry_intr(|| rustix::net::recv(sock, &mut frame, RecvFlags::empty()))?.0;
        if n != GRANT_FRAME_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "return answer is not one 32-byte frame",
            ));
        }
        let response = GrantResponse::read_from_bytes(&frame[..GRANT_FRAME_SIZE])
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "unreadable answer"))?;
        if response.magic != GRANT_MAGIC || response.version != GRANT_VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "return answer has a bad magic or version",
            ));
        }
        Ok(response.status == GrantStatus::OK)
    }
}

impl RingSource for SocketSource {
    fn hand_back(&self, ring: &MemfdRegion, hint: u64) -> bool {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if conn.forks != forks() {
            conn.forget_parent();
        }
        let sock = match conn.sock.clone() {
            Some(sock) => sock,
            None => match self.connect(&mut conn) {
                Ok(sock) => sock,
                Err(_) => return false,
            },
        };
        match self.give_back(&sock, ring, hint) {
            Ok(ok) => ok,
            Err(_) => {
                conn.close();
                false
            }
        }
    }

    fn claim(&self, hint: u64) -> Result<(Writer<MemfdRegion>, RingInfo), ClaimError> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if conn.forks != forks() {
            conn.forget_parent();
        }
        // A held connection that broke since the last claim (metricsd restarted and the
        // watcher has not run yet, say) gets one immediate reconnect; a fresh one that
        // fails backs off.
        loop {
            let (sock, fresh) = match conn.sock.clone() {
                Some(sock) => (sock, false),
                None => (self.connect(&mut conn)?, true),
            };
            match self.exchange(&sock, hint) {
                Ok((writer, mut info)) => {
                    info.generation = conn.generation;
                    return Ok((writer, info));
                }
                Err(Exchange::Failed(e)) => return Err(e),
                Err(Exchange::Broken(step, source)) => {
                    conn.close();
                    if fresh {
                        return Err(self.failed(&mut conn, Instant::now(), step, source));
                    }
                }
            }
        }
    }
}

/// Sleeps until `sock` hangs up, then retires its generation.
fn watch(sock: &OwnedFd, generation: u64, state: &Mutex<Conn>) {
    loop {
        // Only the hang-up is asked for: a response arriving for a claim (readable
        // data) must not wake us. HUP and ERR are always reported.
        let mut fds = [PollFd::new(sock, PollFlags::RDHUP)];
        match poll(&mut fds, None) {
            Ok(_) => {
                let events = fds[0].revents();
                if events.intersects(
                    PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR | PollFlags::NVAL,
                ) {
                    break;
                }
            }
            Err(Errno::INTR) => {}
            Err(_) => break,
        }
    }
    let mut conn = state.lock().unwrap_or_else(PoisonError::into_inner);
    if conn.sock.as_ref().is_some_and(|s| std::ptr::eq(&**s, sock)) {
        conn.close();
    } else {
        invalidate(generation);
    }
}

fn retry_intr<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> rustix::io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => {}
            other => return other,
        }
    }
}
