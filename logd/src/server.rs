//! The daemon: a Unix-socket listener, one thread per connection, shared journal state.
//!
//! Start it in-process (tests, the QEMU guest) with [`Server::bind`] and either
//! [`Server::run`] (blocks) or [`Server::spawn`] (a thread, stopped by
//! [`RunningServer::shutdown`] or on drop).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::access::Access;
use crate::config::{Config, ConfigError};
use crate::disk::{Disk, DiskError};
use crate::frame::{self, FrameReject, HEADER_LEN, Header, QueryReply, Request};
use crate::journal::Journal;
use crate::policy::Policy;
use crate::privilege::SocketAccess;
use crate::query::Query;
use crate::quota::{Budget, SenderKey};
use crate::record::{Identity, StoredRecord};
use crate::stats::{DiskStats, RejectCounts, SenderStats, Stats};
use crate::status::{Reason, RecordStatus, Reject};
use crate::time;

/// How often blocked threads look at the shutdown flag.
const TICK: Duration = Duration::from_millis(200);
/// A QUERY_OK may exceed `max_frame_bytes` by this much: the identity logd stamps on a
/// record that itself filled a whole APPEND frame (ids, times, pid/uid/gid, a service
/// name of at most 64 bytes) plus the reply's fixed part.
pub const REPLY_SLACK: usize = 128;

/// Why the server could not start or stopped with an error.
#[derive(Debug)]
pub enum ServerError {
    /// The config is invalid.
    Config(ConfigError),
    /// Another logd answers on the socket path.
    InUse(PathBuf),
    /// The socket path exists and is not a socket (logd will not delete it).
    NotASocket(PathBuf),
    /// The socket could not be bound or set up.
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The on-disk journal could not be opened or recovered.
    Disk(DiskError),
    /// An OS error while serving (accept loop, thread spawn).
    Io(io::Error),
    /// The server thread panicked (a bug).
    Panicked,
}

impl core::fmt::Display for ServerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ServerError::Config(e) => write!(f, "{e}"),
            ServerError::InUse(p) => write!(f, "another logd is listening on {}", p.display()),
            ServerError::NotASocket(p) => write!(
                f,
                "{} exists and is not a socket; remove it or choose another --socket",
                p.display()
            ),
            ServerError::Bind { path, source } => {
                write!(f, "cannot listen on {}: {source}", path.display())
            }
            ServerError::Disk(e) => write!(f, "journal: {e}"),
            ServerError::Io(e) => write!(f, "serving: {e}"),
            ServerError::Panicked => f.write_str("the server thread panicked"),
        }
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServerError::Config(e) => Some(e),
            ServerError::Bind { source, .. } | ServerError::Io(source) => Some(source),
            ServerError::Disk(e) => Some(e),
            _ => None,
        }
    }
}

struct SenderEntry {
    uid: u32,
    connections: u32,
    accepted: u64,
    evicted: u64,
    rejected: RejectCounts,
    budget: Budget,
    last_active: u64,
}

struct State {
    journal: Journal,
    disk: Option<Disk>,
    next_id: u64,
    senders: HashMap<SenderKey, SenderEntry>,
    accepted: u64,
    evicted: u64,
    rejected: RejectCounts,
    connections: u32,
    recovered: u64,
    corrupt: u64,
    disk_errors: u64,
    tick: u64,
}

struct Shared {
    config: Config,
    policy: Policy,
    access: Access,
    started: Instant,
    shutdown: AtomicBool,
    state: Mutex<State>,
    appended: Condvar,
    /// Group commit of the disk journal (`journal.fsync`).
    sync: Mutex<SyncState>,
    synced: Condvar,
}

/// Group commit: APPENDs that wrote to the disk journal wait, outside the server's
/// lock, until an `fdatasync` that started after their write has finished. One of them
/// (the leader) syncs for all written so far; the others wait for it, so concurrent
/// APPENDs share one `fdatasync`.
#[derive(Default)]
struct SyncState {
    /// The latest write: the active segment and bytes written up to there.
    latest: Option<(Arc<std::fs::File>, u64)>,
    /// Bytes known durable.
    synced: u64,
    /// The end of the last sync that failed: writes up to there are never acknowledged.
    failed: u64,
    /// A leader is syncing now.
    syncing: bool,
}

/// Why a group commit failed.
struct SyncFailed(io::Error);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; the counters stay usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopping(&self) -> bool {
        // ORDERING: pairs with the Release store in `ShutdownHandle::shutdown`.
        self.shutdown.load(Ordering::Acquire)
    }

    fn sync_lock(&self) -> MutexGuard<'_, SyncState> {
        self.sync.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns once the disk journal is durable up to `upto` bytes written: leads an
    /// `fdatasync` if none is running, else waits for the running one (and leads the
    /// next if that one began before `upto` was written). Fails if the sync that covered
    /// `upto` failed: those writes are never acknowledged, even if a later sync succeeds.
    fn durable(&self, upto: u64) -> Result<(), SyncFailed> {
        let mut g = self.sync_lock();
        loop {
            if g.failed >= upto {
                return Err(SyncFailed(io::Error::other(
                    "an fdatasync covering these records failed",
                )));
            }
            if g.synced >= upto {
                return Ok(());
            }
            if g.syncing {
                g = self.synced.wait(g).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let Some((file, target)) = g.latest.clone() else {
                return Ok(());
            };
            g.syncing = true;
            drop(g);
            let result = file.sync_data();
            g = self.sync_lock();
            g.syncing = false;
            match &result {
                Ok(()) => g.synced = g.synced.max(target),
                Err(_) => g.failed = g.failed.max(target),
            }
            self.synced.notify_all();
            if let Err(e) = result {
                return Err(SyncFailed(e));
            }
        }
    }
}

impl State {
    /// Counts a reject for a sender (if still listed) and in the totals.
    fn count_reject(&mut self, key: Option<&SenderKey>, class: Reject, n: u64) {
        self.rejected.add(class, n);
        if let Some(s) = key.and_then(|k| self.senders.get_mut(k)) {
            s.rejected.add(class, n);
        }
    }

    /// Registers a connection of a sender, retiring the least recently active
    /// disconnected sender's counters if the table is full.
    fn connect(&mut self, key: &SenderKey, uid: u32, config: &Config) {
        self.tick += 1;
        let tick = self.tick;
        if !self.senders.contains_key(key)
            && self.senders.len() >= config.limits.max_senders as usize
        {
            let victim = self
                .senders
                .iter()
                .filter(|(_, s)| s.connections == 0)
                .min_by_key(|(_, s)| s.last_active)
                .map(|(k, _)| k.clone());
            if let Some(v) = victim {
                self.senders.remove(&v);
            }
        }
        let e = self
            .senders
            .entry(key.clone())
            .or_insert_with(|| SenderEntry {
                uid,
                connections: 0,
                accepted: 0,
                evicted: 0,
                rejected: RejectCounts::default(),
                budget: Budget::new(&config.quota, Instant::now()),
                last_active: tick,
            });
        e.connections += 1;
        e.last_active = tick;
        self.connections += 1;
    }

    fn disconnect(&mut self, key: &SenderKey) {
        self.connections = self.connections.saturating_sub(1);
        if let Some(e) = self.senders.get_mut(key) {
            e.connections = e.connections.saturating_sub(1);
        }
    }
}

/// A bound, not yet running logd.
pub struct Server {
    listener: UnixListener,
    shared: Arc<Shared>,
    path: PathBuf,
}

/// Stops a running server from any thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

impl ShutdownHandle {
    /// Asks the server to stop: the accept loop and every connection end within about
    /// 200 ms, the disk journal is synced and the socket file removed by `run`.
    pub fn shutdown(&self) {
        // ORDERING: pairs with the Acquire load in `Shared::stopping`.
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.appended.notify_all();
    }
}

/// A server running on its own thread. Dropping it shuts it down and waits.
pub struct RunningServer {
    path: PathBuf,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl RunningServer {
    /// The socket path clients connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Stops the server and waits for it to finish (journal synced, socket removed).
    pub fn shutdown(mut self) -> Result<(), ServerError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), ServerError> {
        self.handle.shutdown();
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| ServerError::Panicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ignored = self.stop();
    }
}

fn bind_socket(path: &Path, access: SocketAccess) -> Result<UnixListener, ServerError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(ServerError::NotASocket(path.to_owned()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_owned()));
            }
            // A stale socket from a logd that did not shut down cleanly.
            std::fs::remove_file(path).map_err(|source| ServerError::Bind {
                path: path.to_owned(),
                source,
            })?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServerError::Bind {
                path: path.to_owned(),
                source,
            });
        }
    }
    let bind_err = |source| ServerError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    // By default any local process may log (mode 0666): who it is comes from the kernel,
    // and what it may read is decided per query, not by the socket mode.
    access.apply(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

impl Server {
    /// Validates the config, opens and recovers the disk journal (if configured) and
    /// binds the socket. When this returns, clients can connect (they are accepted once
    /// [`Server::run`] or [`Server::spawn`] runs).
    pub fn bind(config: Config) -> Result<Server, ServerError> {
        config.validate().map_err(ServerError::Config)?;
        let policy = Policy::new(&config.services).map_err(ServerError::Config)?;
        let access = Access::new(&config.access).map_err(ServerError::Config)?;
        let socket_access = config.socket_access().map_err(ServerError::Config)?;
        let j = &config.journal;
        let mut journal = Journal::new(j.max_records, j.max_bytes);
        let mut next_id = 1;
        let (mut recovered, mut corrupt) = (0, 0);
        let disk = match &config.journal_dir {
            Some(dir) => {
                let max_entry = u64::from(config.limits.max_frame_bytes) + REPLY_SLACK as u64;
                let (disk, rec) = Disk::open(dir, j, max_entry).map_err(ServerError::Disk)?;
                corrupt = rec.corrupt;
                recovered = rec.records.len() as u64;
                for (id, r) in rec.records {
                    next_id = next_id.max(id.saturating_add(1));
                    let key = SenderKey::of(&r.sender, config.quota.key);
                    journal.insert(key, r);
                }
                Some(disk)
            }
            None => None,
        };
        let listener = bind_socket(&config.socket, socket_access)?;
        let state = State {
            journal,
            disk,
            next_id,
            senders: HashMap::new(),
            accepted: 0,
            evicted: 0,
            rejected: RejectCounts::default(),
            connections: 0,
            recovered,
            corrupt,
            disk_errors: 0,
            tick: 0,
        };
        let path = config.socket.clone();
        Ok(Server {
            listener,
            path,
            shared: Arc::new(Shared {
                config,
                policy,
                access,
                started: Instant::now(),
                shutdown: AtomicBool::new(false),
                state: Mutex::new(state),
                appended: Condvar::new(),
                sync: Mutex::new(SyncState::default()),
                synced: Condvar::new(),
            }),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle that stops [`Server::run`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Runs on a new thread.
    pub fn spawn(self) -> Result<RunningServer, ServerError> {
        let handle = self.shutdown_handle();
        let path = self.path.clone();
        let thread = thread::Builder::new()
            .name("logd-accept".into())
            .spawn(move || self.run())
            .map_err(ServerError::Io)?;
        Ok(RunningServer {
            path,
            handle,
            thread: Some(thread),
        })
    }

    /// Serves until shut down; then waits for the connections to end, syncs the disk
    /// journal and removes the socket file.
    pub fn run(self) -> Result<(), ServerError> {
        let mut workers: Vec<JoinHandle<()>> = Vec::new();
        let result = self.accept_loop(&mut workers);
        self.shared.appended.notify_all();
        for w in workers {
            let _ignored = w.join();
        }
        let sync = match &mut self.shared.lock().disk {
            Some(d) => d.sync().map_err(ServerError::Disk),
            None => Ok(()),
        };
        let _ignored = std::fs::remove_file(&self.path);
        result.and(sync)
    }

    fn accept_loop(&self, workers: &mut Vec<JoinHandle<()>>) -> Result<(), ServerError> {
        let timeout = Timespec {
            tv_sec: 0,
            tv_nsec: i64::from(u32::try_from(TICK.as_nanos()).unwrap_or(200_000_000)),
        };
        while !self.shared.stopping() {
            let mut fds = [PollFd::new(&self.listener, PollFlags::IN)];
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(ServerError::Io(e.into())),
            }
            loop {
                match self.listener.accept() {
                    Ok((stream, _)) => {
                        workers.retain(|w| !w.is_finished());
                        if let Some(w) = self.admit(stream) {
                            workers.push(w);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                    // Out of file descriptors or memory: back off and keep serving.
                    Err(_) => {
                        thread::sleep(Duration::from_millis(50));
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Identifies a new connection and starts its thread, or refuses it.
    fn admit(&self, stream: UnixStream) -> Option<JoinHandle<()>> {
        let cred = rustix::net::sockopt::socket_peercred(&stream).ok()?;
        let pid = u32::try_from(cred.pid.as_raw_pid()).unwrap_or(0);
        let identity = self
            .shared
            .policy
            .identify(pid, cred.uid.as_raw(), cred.gid.as_raw());
        let key = SenderKey::of(&identity, self.shared.config.quota.key);
        let reads_all = self.shared.access.reads_all(identity.uid, identity.gid);
        let limits = &self.shared.config.limits;
        {
            let mut st = self.shared.lock();
            if st.connections >= limits.max_connections {
                st.count_reject(Some(&key), Reject::OverLimit, 1);
                drop(st);
                let msg = format!(
                    "{} connections open; limits.max_connections is {}",
                    limits.max_connections, limits.max_connections
                );
                let mut stream = stream;
                let _ignored = stream.set_nonblocking(false);
                let _ignored = stream.set_write_timeout(Some(TICK));
                let _ignored = stream.write_all(&frame::encode_error(
                    Reject::OverLimit,
                    Reason::TooManyConnections,
                    &msg,
                ));
                return None;
            }
            st.connect(&key, identity.uid, &self.shared.config);
        }
        let shared = Arc::clone(&self.shared);
        let key2 = key.clone();
        let spawned = thread::Builder::new()
            .name("logd-conn".into())
            .spawn(move || {
                let mut conn = Conn::new(stream, shared, key2, identity, reads_all);
                conn.serve();
                conn.shared.lock().disconnect(&conn.key);
            });
        match spawned {
            Ok(h) => Some(h),
            Err(_) => {
                self.shared.lock().disconnect(&key);
                None
            }
        }
    }
}

/// Why a connection stops.
enum Stop {
    Closed,
    Shutdown,
    Idle,
    Timeout,
    Io,
}

struct Conn {
    stream: UnixStream,
    shared: Arc<Shared>,
    key: SenderKey,
    identity: Identity,
    /// Root or listed in `[access]`: reads every sender's records and STATS rows.
    reads_all: bool,
    frame_deadline: Option<Instant>,
    /// Bytes read ahead from the stream: `rbuf[rstart..rend]` not consumed yet. A client
    /// that sends several requests before reading the replies (in order, as the
    /// protocol allows) has them read with one `read(2)`.
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    /// Replies not written yet: written before the connection blocks to read, or once
    /// they pass [`CONN_BUF`].
    wbuf: Vec<u8>,
}

/// Bytes of read-ahead and of held replies per connection.
const CONN_BUF: usize = 16 << 10;
/// Most APPEND frames of a pipelined burst stored together.
const BURST_FRAMES: usize = 64;

impl Conn {
    fn new(
        stream: UnixStream,
        shared: Arc<Shared>,
        key: SenderKey,
        identity: Identity,
        reads_all: bool,
    ) -> Self {
        Self {
            stream,
            shared,
            key,
            identity,
            reads_all,
            frame_deadline: None,
            rbuf: vec![0; CONN_BUF].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            wbuf: Vec::new(),
        }
    }

    /// Writes the held replies.
    fn flush(&mut self) -> io::Result<()> {
        let r = self.stream.write_all(&self.wbuf);
        self.wbuf.clear();
        if self.wbuf.capacity() > 4 * CONN_BUF {
            self.wbuf.shrink_to(CONN_BUF);
        }
        r
    }

    fn serve(&mut self) {
        let l = &self.shared.config.limits;
        let setup = self
            .stream
            .set_nonblocking(false)
            .and_then(|()| self.stream.set_read_timeout(Some(TICK)))
            .and_then(|()| {
                self.stream
                    .set_write_timeout(Some(Duration::from_millis(l.write_timeout_ms)))
            });
        if setup.is_err() {
            return;
        }
        let max_frame = l.max_frame_bytes as usize;
        let mut body = Vec::new();
        loop {
            self.frame_deadline = None;
            let mut hb = [0u8; HEADER_LEN];
            match self.fill(&mut hb) {
                Ok(()) => {}
                Err(Stop::Timeout) => return self.timed_out(),
                Err(_) => return,
            }
            let h = Header::parse(hb);
            if h.frame_len() > max_frame as u64 {
                let msg = format!(
                    "frame of {} bytes; limits.max_frame_bytes is {max_frame}",
                    h.frame_len()
                );
                self.refuse(Reject::OverLimit, Reason::FrameTooLarge, &msg);
                return;
            }
            body.clear();
            body.resize(h.body_len as usize, 0);
            match self.fill(&mut body) {
                Ok(()) => {}
                Err(Stop::Timeout) => return self.timed_out(),
                Err(_) => return,
            }
            let reply = match frame::decode_request(&h, &body, &self.shared.config.limits) {
                Ok(Request::Append(raws)) => {
                    let mut burst = Vec::new();
                    self.appends_ahead(max_frame, &mut burst);
                    if burst.is_empty() {
                        let statuses = self.append(&[&raws]);
                        statuses
                            .first()
                            .map_or_else(Vec::new, |s| frame::encode_append_reply(s))
                    } else {
                        self.append_burst(&raws, &burst)
                    }
                }
                Ok(Request::Query(q)) => self.query(&q),
                Ok(Request::Stats) => frame::encode_stats_reply(&self.stats()),
                Err(FrameReject {
                    class,
                    reason,
                    message,
                }) => {
                    self.shared.lock().count_reject(Some(&self.key), class, 1);
                    frame::encode_error(class, reason, &message)
                }
            };
            // A large reply (a query page) is written as it is, after those held.
            if reply.len() >= CONN_BUF {
                if self.flush().is_err() || self.stream.write_all(&reply).is_err() {
                    return;
                }
                continue;
            }
            self.wbuf.extend_from_slice(&reply);
            if self.wbuf.len() >= CONN_BUF && self.flush().is_err() {
                return;
            }
        }
    }

    /// Stores `first` and the frames pipelined behind it together, and returns their
    /// replies, in order (a frame that does not decode gets its error, as alone).
    fn append_burst(
        &mut self,
        first: &[frame::RawRecord<'_>],
        burst: &[(Header, Vec<u8>)],
    ) -> Vec<u8> {
        let limits = &self.shared.config.limits;
        let decoded: Vec<_> = burst
            .iter()
            .map(|(h, body)| frame::decode_request(h, body, limits))
            .collect();
        let mut frames = vec![first];
        for d in &decoded {
            if let Ok(Request::Append(raws)) = d {
                frames.push(raws);
            }
        }
        let mut statuses = self.append(&frames).into_iter();
        let mut replies = frame::encode_append_reply(&statuses.next().unwrap_or_default());
        for d in decoded {
            let reply = match d {
                Ok(Request::Append(_)) => {
                    frame::encode_append_reply(&statuses.next().unwrap_or_default())
                }
                Ok(_) => frame::encode_error(
                    Reject::InvalidArgs,
                    Reason::Malformed,
                    "expected an APPEND frame",
                ),
                Err(FrameReject {
                    class,
                    reason,
                    message,
                }) => {
                    self.shared.lock().count_reject(Some(&self.key), class, 1);
                    frame::encode_error(class, reason, &message)
                }
            };
            replies.extend_from_slice(&reply);
        }
        replies
    }

    fn timed_out(&mut self) {
        let msg = format!(
            "frame not complete within limits.frame_timeout_ms ({})",
            self.shared.config.limits.frame_timeout_ms
        );
        self.refuse(Reject::OverLimit, Reason::Timeout, &msg);
    }

    /// Counts and answers a whole-frame refusal after which the stream cannot be trusted
    /// to be in sync; the caller then closes it.
    fn refuse(&mut self, class: Reject, reason: Reason, msg: &str) {
        self.shared.lock().count_reject(Some(&self.key), class, 1);
        let _ignored = self.flush();
        let _ignored = self
            .stream
            .write_all(&frame::encode_error(class, reason, msg));
        let _ignored = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Fills `dst`, from the read-ahead first, honouring the idle timeout before a frame
    /// starts, the frame timeout once it has, and shutdown. Held replies are written
    /// before it blocks on the stream.
    fn fill(&mut self, dst: &mut [u8]) -> Result<(), Stop> {
        let l = &self.shared.config.limits;
        let idle_until = Instant::now() + Duration::from_millis(l.idle_timeout_ms);
        let frame_timeout = Duration::from_millis(l.frame_timeout_ms);
        let mut got = 0;
        while got < dst.len() {
            let (Some(rest), Some(ahead)) =
                (dst.get_mut(got..), self.rbuf.get(self.rstart..self.rend))
            else {
                break;
            };
            if !ahead.is_empty() {
                let n = ahead.len().min(rest.len());
                rest[..n].copy_from_slice(&ahead[..n]);
                self.rstart += n;
                got += n;
                if self.frame_deadline.is_none() {
                    self.frame_deadline = Some(Instant::now() + frame_timeout);
                }
                continue;
            }
            if !self.wbuf.is_empty() && self.flush().is_err() {
                return Err(Stop::Io);
            }
            if self.shared.stopping() {
                return Err(Stop::Shutdown);
            }
            // A large remainder goes straight into `dst`; a small one through the
            // read-ahead, which may bring the next requests along.
            let direct = rest.len() >= self.rbuf.len();
            let read = if direct {
                self.stream.read(rest)
            } else {
                self.stream.read(&mut self.rbuf)
            };
            match read {
                Ok(0) if got == 0 && self.frame_deadline.is_none() => return Err(Stop::Closed),
                Ok(0) => return Err(Stop::Io),
                Ok(n) if direct => {
                    got += n;
                    if self.frame_deadline.is_none() {
                        self.frame_deadline = Some(Instant::now() + frame_timeout);
                    }
                }
                Ok(n) => (self.rstart, self.rend) = (0, n),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    match self.frame_deadline {
                        Some(d) if Instant::now() > d => return Err(Stop::Timeout),
                        None if Instant::now() > idle_until => return Err(Stop::Idle),
                        _ => {}
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Stop::Io),
            }
        }
        Ok(())
    }

    /// Stores the records of one or more APPEND frames (a pipelined burst already read)
    /// together: one lock, one write to the disk journal, one sync wait; the statuses
    /// come back per frame, in order.
    fn append(&mut self, frames: &[&[frame::RawRecord<'_>]]) -> Vec<Vec<RecordStatus>> {
        let limits = &self.shared.config.limits;
        let validated: Vec<_> = frames
            .iter()
            .flat_map(|raws| raws.iter().map(|r| r.validate(limits)))
            .collect();
        let received_ns = time::now_ns();
        let now = Instant::now();
        let mut statuses = Vec::with_capacity(validated.len());
        let mut to_store: Vec<StoredRecord> = Vec::new();
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let key = &self.key;
        if !st.senders.contains_key(key) {
            // Retired while connected cannot happen (connected senders are kept), but be
            // safe: re-register without counting a new connection.
            st.connect(key, self.identity.uid, &self.shared.config);
            st.disconnect(key);
        }
        let mut rejected = RejectCounts::default();
        for v in validated {
            let rec = match v {
                Ok(rec) => rec,
                Err((class, reason)) => {
                    rejected.add(class, 1);
                    statuses.push(RecordStatus::Rejected(class, reason));
                    continue;
                }
            };
            let stored = StoredRecord {
                id: st.next_id,
                received_ns,
                sender: self.identity.clone(),
                record: rec,
            };
            let charged = match st.senders.get_mut(key) {
                Some(s) => s.budget.charge(stored.cost() as u64, now),
                None => Ok(()),
            };
            match charged {
                Ok(()) => {
                    st.next_id += 1;
                    statuses.push(RecordStatus::Accepted(stored.id));
                    to_store.push(stored);
                }
                Err(reason) => {
                    rejected.add(Reject::RateLimited, 1);
                    statuses.push(RecordStatus::Rejected(Reject::RateLimited, reason));
                }
            }
        }
        let mut sync_upto = None;
        if let Some(disk) = &mut st.disk {
            match disk.append(&to_store) {
                Ok(()) if disk.fsync() && !to_store.is_empty() => {
                    if let Some((file, written)) = disk.sync_point() {
                        sync_upto = Some(written);
                        // Lock order: the state, then the sync state.
                        self.shared.sync_lock().latest = Some((file, written));
                    }
                }
                Ok(()) => {}
                Err(e) => {
                    eprintln!("logd: {e}; refusing the batch as internal");
                    st.disk_errors += 1;
                    for s in &mut statuses {
                        if matches!(s, RecordStatus::Accepted(_)) {
                            *s = RecordStatus::Rejected(Reject::Internal, Reason::Storage);
                            rejected.add(Reject::Internal, 1);
                        }
                    }
                    to_store.clear();
                }
            }
        }
        let n = to_store.len() as u64;
        for rec in to_store {
            for victim in st.journal.insert(key.clone(), rec) {
                st.evicted += 1;
                if let Some(s) = st.senders.get_mut(&victim) {
                    s.evicted += 1;
                }
            }
        }
        st.accepted += n;
        st.rejected.merge(&rejected);
        st.tick += 1;
        let tick = st.tick;
        if let Some(s) = st.senders.get_mut(key) {
            s.accepted += n;
            s.rejected.merge(&rejected);
            s.last_active = tick;
        }
        if n > 0 {
            if let Some(disk) = &mut st.disk {
                if let Err(e) = disk.enforce_retention(&st.journal) {
                    eprintln!("logd: retention: {e}");
                    st.disk_errors += 1;
                }
            }
        }
        drop(guard);
        if n > 0 {
            self.shared.appended.notify_all();
        }
        if let Some(upto) = sync_upto {
            if let Err(SyncFailed(e)) = self.shared.durable(upto) {
                // Stored and readable, but not known durable: not acknowledged.
                eprintln!("logd: cannot sync the journal: {e}; refusing the batch as internal");
                let mut st = self.shared.lock();
                st.disk_errors += 1;
                let mut refused = RejectCounts::default();
                for s in &mut statuses {
                    if matches!(s, RecordStatus::Accepted(_)) {
                        *s = RecordStatus::Rejected(Reject::Internal, Reason::Storage);
                        refused.add(Reject::Internal, 1);
                    }
                }
                st.accepted = st.accepted.saturating_sub(n);
                st.rejected.merge(&refused);
                if let Some(s) = st.senders.get_mut(key) {
                    s.accepted = s.accepted.saturating_sub(n);
                    s.rejected.merge(&refused);
                }
            }
        }
        let mut statuses = statuses.into_iter();
        frames
            .iter()
            .map(|raws| statuses.by_ref().take(raws.len()).collect())
            .collect()
    }

    /// Moves the APPEND frames complete in the read-ahead (a client's pipelined burst)
    /// into `out`, at most [`BURST_FRAMES`] in all, stopping at the first frame of
    /// another kind, too large, or not complete yet.
    fn appends_ahead(&mut self, max_frame: usize, out: &mut Vec<(Header, Vec<u8>)>) {
        while out.len() + 1 < BURST_FRAMES {
            let Some(ahead) = self.rbuf.get(self.rstart..self.rend) else {
                return;
            };
            let Some(hb) = ahead.get(..HEADER_LEN).and_then(|b| b.try_into().ok()) else {
                return;
            };
            let h = Header::parse(hb);
            let len = h.frame_len();
            if h.kind != frame::KIND_APPEND || len > max_frame as u64 {
                return;
            }
            let Some(body) = ahead.get(HEADER_LEN..len as usize) else {
                return;
            };
            out.push((h, body.to_vec()));
            self.rstart += len as usize;
        }
    }

    /// Refuses a query that names another service than the peer's own when the peer
    /// may read only its own uid's records; counts the refusal.
    fn denied(&self, q: &Query) -> Option<Vec<u8>> {
        let other = q
            .service
            .as_deref()
            .filter(|s| !s.is_empty() && *s != self.identity.service)?;
        if self.reads_all {
            return None;
        }
        self.shared
            .lock()
            .count_reject(Some(&self.key), Reject::Denied, 1);
        let msg = format!(
            "uid {} may read only its own records (service {:?}), not those of service {:?}; \
             logd's [access] readers or reader_groups grant reading all",
            self.identity.uid, self.identity.service, other
        );
        Some(frame::encode_error(
            Reject::Denied,
            Reason::QueryWithoutAcl,
            &msg,
        ))
    }

    fn query(&mut self, q: &Query) -> Vec<u8> {
        if let Some(refused) = self.denied(q) {
            return refused;
        }
        let own_uid = (!self.reads_all).then_some(self.identity.uid);
        let l = &self.shared.config.limits;
        let limit = match q.limit {
            0 => l.max_query_limit,
            n => n.min(l.max_query_limit),
        };
        let max_reply = l.max_frame_bytes as usize + REPLY_SLACK;
        let wait = Duration::from_millis(u64::from(q.wait_ms.min(l.max_wait_ms)));
        let until = Instant::now() + wait;
        let mut cursor = q.cursor;
        let mut guard = self.shared.lock();
        // Records evicted from memory are still on disk: below the largest evicted id,
        // serve pages from the disk journal (and memory) first.
        if cursor < guard.journal.max_evicted() {
            if let Some((paths, max_entry)) = guard.disk.as_ref().map(Disk::snapshot) {
                let upto = guard.journal.max_evicted();
                drop(guard);
                return self.query_disk(q, own_uid, &paths, max_entry, upto, limit, max_reply);
            }
        }
        loop {
            let mut reply = QueryReply::new(max_reply);
            let mut more = false;
            let scan_max = l.max_query_scan as usize;
            for (scanned, r) in guard.journal.after(cursor).enumerate() {
                if reply.len() >= limit || scanned >= scan_max {
                    more = true;
                    break;
                }
                let readable = own_uid.is_none_or(|uid| r.sender.uid == uid);
                if readable && q.matches(r) && !reply.push(r) {
                    more = true;
                    break;
                }
                cursor = r.id;
            }
            let now = Instant::now();
            if !reply.is_empty() || more || now >= until || self.shared.stopping() {
                return reply.finish(cursor, more);
            }
            let step = (until - now).min(TICK);
            guard = self
                .shared
                .appended
                .wait_timeout(guard, step)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// One page of records with `q.cursor < id <= upto` from the disk journal and
    /// memory (a record retired from disk while this reads is still found in memory if
    /// memory holds it), read without holding the server's lock. An empty range moves
    /// the cursor to `upto`, where memory takes over.
    #[expect(
        clippy::too_many_arguments,
        reason = "one page's bounds, each from a different source"
    )]
    fn query_disk(
        &self,
        q: &Query,
        own_uid: Option<u32>,
        paths: &[std::path::PathBuf],
        max_entry: u64,
        upto: u64,
        limit: u32,
        max_reply: usize,
    ) -> Vec<u8> {
        let limit = limit as usize;
        // The same rule as in memory: a peer that may not read every sender sees only
        // records its own uid sent.
        let visible =
            |r: &StoredRecord| own_uid.is_none_or(|uid| r.sender.uid == uid) && q.matches(r);
        let mut found = crate::disk::read_range(paths, max_entry, q.cursor, upto, limit, visible);
        {
            let guard = self.shared.lock();
            for r in guard.journal.after(q.cursor) {
                if r.id > upto
                    || (found.len() >= limit
                        && found.last_key_value().is_some_and(|(l, _)| *l < r.id))
                {
                    break;
                }
                if visible(r) {
                    found.entry(r.id).or_insert_with(|| r.clone());
                    if found.len() > limit {
                        found.pop_last();
                    }
                }
            }
        }
        let mut reply = QueryReply::new(max_reply);
        let mut cursor = q.cursor;
        let mut full = false;
        for r in found.values() {
            if !reply.push(r) {
                full = true;
                break;
            }
            cursor = r.id;
        }
        if !full && found.len() < limit {
            // Nothing more on disk below `upto`: the next page continues in memory.
            cursor = upto;
        }
        reply.finish(cursor, true)
    }

    fn stats(&self) -> Stats {
        let st = self.shared.lock();
        let mut senders: Vec<SenderStats> = st
            .senders
            .iter()
            .filter(|(_, s)| self.reads_all || s.uid == self.identity.uid)
            .map(|(k, s)| {
                let (held_records, held_bytes) = st.journal.held(k);
                SenderStats {
                    service: k.service.clone(),
                    pid: k.pid,
                    uid: s.uid,
                    connections: s.connections,
                    accepted: s.accepted,
                    held_records,
                    held_bytes,
                    evicted: s.evicted,
                    rejected: s.rejected,
                }
            })
            .collect();
        senders.sort_by(|a, b| (&a.service, a.pid).cmp(&(&b.service, b.pid)));
        let disk = match &st.disk {
            Some(d) => DiskStats {
                enabled: true,
                bytes: d.bytes(),
                segments: d.segments(),
                recovered: st.recovered,
                corrupt_skipped: st.corrupt,
                errors: st.disk_errors,
            },
            None => DiskStats::default(),
        };
        Stats {
            uptime_ms: u64::try_from(self.shared.started.elapsed().as_millis()).unwrap_or(0),
            connections: st.connections,
            accepted: st.accepted,
            evicted: st.evicted,
            rejected: st.rejected,
            journal_records: st.journal.len(),
            journal_bytes: st.journal.bytes(),
            next_id: st.next_id,
            disk,
            senders,
        }
    }
}
