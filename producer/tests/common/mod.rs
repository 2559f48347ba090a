//! A tiny grant server for the behaviour tests: a real `SOCK_SEQPACKET` listener, real
//! sealed memfd rings sent with `SCM_RIGHTS`, and a `telemetry_ring::Reader` per ring
//! that decodes what the library wrote.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::collections::HashMap;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::net::{
    AddressFamily, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, Shutdown,
    SocketAddrUnix, SocketFlags, SocketType,
};
use telemetry_abi::{
    GRANT_FRAME_SIZE, Geometry, GrantOp, GrantRequest, GrantResponse, GrantStatus, Record,
    RecordKind, RegisterKind, RegistrationBuf,
};
use telemetry_ring::{MemfdRegion, Reader};
use zerocopy::{FromBytes, IntoBytes};

/// What a registration said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reg {
    pub kind: RegisterKind,
    pub name: String,
    pub labels: Vec<(String, String)>,
}

/// One ring in ring order: a registration completed, or another record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Registered(u32),
    Record(Record),
}

/// Everything read from one granted ring.
pub struct RingLog {
    pub ring_id: u32,
    pub hint: u64,
    reader: Option<Reader<Arc<MemfdRegion>>>,
    buf: RegistrationBuf,
    /// This ring's key table.
    pub keys: HashMap<u32, Reg>,
    pub events: Vec<Event>,
    /// Records whose key was not registered in this ring before them.
    pub unregistered: Vec<Record>,
    /// Malformed registrations.
    pub bad_registrations: usize,
    /// The producer's `dropped` word as last seen.
    pub producer_dropped: u64,
}

impl RingLog {
    fn drain(&mut self) {
        let Some(reader) = self.reader.as_mut() else {
            return;
        };
        let mut records = Vec::new();
        reader
            .drain(u64::MAX, |r| records.push(r))
            .expect("the library never breaks the ring protocol");
        self.producer_dropped = reader.stats().producer_dropped;
        for r in records {
            match r.kind {
                RecordKind::REGISTER | RecordKind::REGISTER_DATA => match self.buf.feed(&r) {
                    Ok(Some(reg)) => {
                        let entry = Reg {
                            kind: reg.what,
                            name: reg.name.to_owned(),
                            labels: reg
                                .labels()
                                .iter()
                                .map(|l| (l.key.to_owned(), l.value.to_owned()))
                                .collect(),
                        };
                        self.keys.insert(reg.key, entry);
                        self.events.push(Event::Registered(reg.key));
                    }
                    Ok(None) => {}
                    Err(_) => self.bad_registrations += 1,
                },
                _ => {
                    if self.buf.interrupt().is_err() {
                        self.bad_registrations += 1;
                    }
                    let mut keys = vec![r.key];
                    if r.kind == RecordKind::SPAN_ATTR && r.flags == 2 {
                        // A string value is a key too.
                        keys.push(r.words[1] as u32);
                    }
                    if keys.iter().any(|k| !self.keys.contains_key(k)) {
                        self.unregistered.push(r);
                    }
                    self.events.push(Event::Record(r));
                }
            }
        }
    }

    /// The key this ring registered for `kind` `name` (labels in any order).
    pub fn key_of(&self, kind: RegisterKind, name: &str) -> Option<u32> {
        self.keys
            .iter()
            .find(|(_, r)| r.kind == kind && r.name == name)
            .map(|(k, _)| *k)
    }

    /// Records (not registrations) with key `key`, in ring order.
    pub fn records_of(&self, key: u32) -> Vec<Record> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Record(r) if r.key == key => Some(*r),
                _ => None,
            })
            .collect()
    }

    /// Whether `key`'s registration comes before every record carrying it.
    pub fn registered_before_use(&self, key: u32) -> bool {
        let first_reg = self
            .events
            .iter()
            .position(|e| *e == Event::Registered(key));
        let first_use = self
            .events
            .iter()
            .position(|e| matches!(e, Event::Record(r) if r.key == key));
        match (first_reg, first_use) {
            (Some(reg), Some(used)) => reg < used,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

struct Inner {
    capacity: u32,
    refuse: Option<GrantStatus>,
    stop: AtomicBool,
    next_ring: AtomicU32,
    connections: AtomicUsize,
    messages: AtomicUsize,
    returns: AtomicUsize,
    conns: Mutex<Vec<Arc<OwnedFd>>>,
    rings: Mutex<Vec<RingLog>>,
}

/// The grant server.
pub struct Server {
    path: PathBuf,
    inner: Arc<Inner>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens at `path`, granting rings of `capacity` records.
    pub fn start(path: &Path, capacity: u32) -> Self {
        Self::start_with(path, capacity, None)
    }

    /// Listens at `path`, answering every request with `refuse` (or granting when
    /// `None`).
    pub fn start_with(path: &Path, capacity: u32, refuse: Option<GrantStatus>) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .expect("socket");
        let addr = SocketAddrUnix::new(path).expect("socket path");
        rustix::net::bind(&listener, &addr).expect("bind");
        rustix::net::listen(&listener, 16).expect("listen");
        let inner = Arc::new(Inner {
            capacity,
            refuse,
            stop: AtomicBool::new(false),
            next_ring: AtomicU32::new(1),
            connections: AtomicUsize::new(0),
            messages: AtomicUsize::new(0),
            returns: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            rings: Mutex::new(Vec::new()),
        });
        let state = Arc::clone(&inner);
        let accept = std::thread::spawn(move || accept_loop(&listener, &state));
        Self {
            path: path.to_owned(),
            inner,
            accept: Some(accept),
        }
    }

    /// Stops accepting and hangs up on every producer (as a dying metricsd would),
    /// keeping what was read.
    pub fn stop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        for conn in self
            .inner
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = rustix::net::shutdown(&*conn, Shutdown::Both);
        }
        if let Some(accept) = self.accept.take() {
            accept.join().expect("accept thread");
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// Drains every ring into its log.
    pub fn drain(&self) {
        for ring in self
            .inner
            .rings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter_mut()
        {
            ring.drain();
        }
    }

    /// Runs `f` over the ring logs (after draining).
    pub fn with_rings<T>(&self, f: impl FnOnce(&[RingLog]) -> T) -> T {
        let mut rings = self
            .inner
            .rings
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for ring in rings.iter_mut() {
            ring.drain();
        }
        f(&rings)
    }

    /// Closes ring `ring_id` as metricsd does when it lets a ring go (drops its reader,
    /// which marks the ring closed).
    pub fn close_ring(&self, ring_id: u32) {
        for ring in self
            .inner
            .rings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter_mut()
        {
            if ring.ring_id == ring_id {
                ring.reader = None;
            }
        }
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Grant requests (op 1) received on all connections.
    pub fn messages(&self) -> usize {
        self.inner.messages.load(Ordering::SeqCst)
    }

    /// Rings handed back (op 2), each refused: this server keeps no log.
    pub fn returns(&self) -> usize {
        self.inner.returns.load(Ordering::SeqCst)
    }

    /// Rings granted.
    pub fn rings(&self) -> usize {
        self.inner
            .rings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The ring that registered `kind` `name`, with the key: `f(ring, key)`.
    pub fn find<T>(&self, kind: RegisterKind, name: &str, f: impl FnOnce(&RingLog, u32) -> T) -> T {
        self.with_rings(|rings| {
            let (ring, key) = rings
                .iter()
                .find_map(|r| r.key_of(kind, name).map(|k| (r, k)))
                .unwrap_or_else(|| panic!("no ring registered {name}"));
            f(ring, key)
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: &OwnedFd, state: &Arc<Inner>) {
    while !state.stop.load(Ordering::SeqCst) {
        match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
            Ok(conn) => {
                let conn = Arc::new(conn);
                state.connections.fetch_add(1, Ordering::SeqCst);
                state
                    .conns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Arc::clone(&conn));
                let state = Arc::clone(state);
                std::thread::spawn(move || serve(&conn, &state));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn serve(conn: &OwnedFd, state: &Inner) {
    loop {
        let mut frame = [0u8; 64];
        let n = match rustix::net::recv(conn, &mut frame, RecvFlags::empty()) {
            Ok((n, _)) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return,
        };
        if n == 0 || state.stop.load(Ordering::SeqCst) {
            return;
        }
        let request = GrantRequest::read_from_bytes(&frame[..GRANT_FRAME_SIZE]).expect("32 bytes");
        assert_eq!(n, GRANT_FRAME_SIZE);
        assert!(request.is_well_formed(), "library sent {request:?}");
        if request.op == GrantOp::RETURN {
            // A ring of a dead consumer handed back: this server keeps no log, so it
            // refuses as a consumer without one does.
            state.returns.fetch_add(1, Ordering::SeqCst);
            let response = GrantResponse::refused(GrantStatus::INVALID_ARGS);
            let _ = rustix::net::send(conn, response.as_bytes(), SendFlags::NOSIGNAL);
            continue;
        }
        state.messages.fetch_add(1, Ordering::SeqCst);
        if let Some(status) = state.refuse {
            let response = GrantResponse::refused(status);
            let _ = rustix::net::send(conn, response.as_bytes(), SendFlags::NOSIGNAL);
            continue;
        }
        let ring_id = state.next_ring.fetch_add(1, Ordering::SeqCst);
        let epoch = u64::from(ring_id) + 1000;
        let geometry = Geometry::new(u64::from(state.capacity)).expect("capacity");
        let region = Arc::new(MemfdRegion::create("test-ring", geometry, epoch).expect("memfd"));
        let response = GrantResponse::granted(ring_id, state.capacity, epoch);
        let fds = [region.fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        // Register the ring before answering, so a test that sees the producer's
        // records also sees the ring.
        state
            .rings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(RingLog {
                ring_id,
                hint: request.hint,
                reader: Some(Reader::new(Arc::clone(&region))),
                buf: RegistrationBuf::new(),
                keys: HashMap::new(),
                events: Vec::new(),
                unregistered: Vec::new(),
                bad_registrations: 0,
                producer_dropped: 0,
            });
        if rustix::net::sendmsg(
            conn.as_fd(),
            &[IoSlice::new(response.as_bytes())],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .is_err()
        {
            return;
        }
    }
}

/// Aborts the whole test binary if the guard is not dropped within `limit`.
pub struct Watchdog(Arc<AtomicBool>);

pub fn watchdog(limit: Duration) -> Watchdog {
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if flag.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("watchdog: test still running after {limit:?}; aborting");
        std::process::abort();
    });
    Watchdog(done)
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Installs the library on a socket path in a fresh temporary directory, reconnecting
/// 1 to 5 ms apart (the restart tests). Returns the directory (keep it alive) and the
/// path, where nothing listens yet.
pub fn install_with_fast_reconnect() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metricsd.sock");
    nexus_metrics::install(
        nexus_metrics::Config::new()
            .socket(&path)
            .retry(Duration::from_millis(1), Duration::from_millis(5)),
    )
    .expect("first install");
    (dir, path)
}

/// Polls `cond` every millisecond until it holds; panics after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Counter deltas with key `key` summed.
pub fn sum(records: &[Record]) -> u64 {
    records.iter().map(|r| r.words[0]).sum()
}

/// The increments of counter `name` each ring of `server` read (after draining), in
/// grant order; 0 for a ring that never registered it.
pub fn counter_totals(server: &Server, name: &str) -> Vec<u64> {
    server.with_rings(|rings| {
        rings
            .iter()
            .map(|r| {
                r.key_of(RegisterKind::COUNTER, name)
                    .map_or(0, |k| sum(&r.records_of(k)))
            })
            .collect()
    })
}

/// The increments of counter `name` that `server` read, over all its rings.
pub fn counter_total(server: &Server, name: &str) -> u64 {
    counter_totals(server, name).iter().sum()
}
