//! Shared helpers: a daemon on a private socket with an in-memory sink, a real logd
//! in-process, a grant client over the real control socket, and ring writers over the
//! granted memfds. The end-to-end tests' support module includes this one for the config
//! and logd every test starts from.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use metricsd::{Config, Daemon, DaemonHandle, MemorySink, Peer};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendFlags, SocketAddrUnix,
    SocketFlags, SocketType,
};
use telemetry_abi::{
    GrantRequest, GrantResponse, GrantStatus, MAX_REGISTER_RECORDS, Record, RegisterKind,
    encode_registration,
};
use telemetry_ring::{MemfdRegion, Writer};
use zerocopy::{FromBytes, IntoBytes};

/// Aborts the test process if a test hangs.
pub fn watchdog() {
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(120));
        eprintln!("watchdog: a test ran for 120 s; aborting");
        std::process::abort();
    });
}

pub const WAIT: Duration = Duration::from_secs(20);

/// Retries `check` every `poll` until it returns `Some`, or panics naming `what` once
/// `within` has passed.
pub fn wait_within<T>(
    what: &str,
    within: Duration,
    poll: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(t) = check() {
            return t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(poll);
    }
}

/// The config every test starts from: metricsd's and logd's sockets in `dir`, an export
/// every 50 ms.
pub fn base_config(dir: &Path) -> Config {
    let mut c = Config {
        socket: dir.join("metricsd.sock"),
        logd_socket: dir.join("logd.sock"),
        ..Config::default()
    };
    c.export.interval_ms = 50;
    c
}

/// A config for tests: [`base_config`] with 1024-record rings.
pub fn config(dir: &Path) -> Config {
    let mut c = base_config(dir);
    c.rings.capacity = 1024;
    c
}

/// A real logd, in-process, on `path`.
pub fn start_logd(path: &Path) -> logd::RunningServer {
    let cfg = logd::Config {
        socket: path.to_owned(),
        ..logd::Config::default()
    };
    logd::Server::bind(cfg)
        .expect("logd binds")
        .spawn()
        .expect("logd runs")
}

/// Starts a daemon whose connections are named, in accept order, by `services`
/// (connection n gets `services[n-1]`, later ones the last name).
pub fn start(config: Config, services: &[&str]) -> (DaemonHandle, MemorySink) {
    let names: Vec<String> = services.iter().map(|s| (*s).to_owned()).collect();
    let sink = MemorySink::new();
    let daemon = Daemon::new(config)
        .identify(move |peer: &Peer| {
            let i = (peer.connection as usize).saturating_sub(1);
            names
                .get(i)
                .or(names.last())
                .cloned()
                .unwrap_or_else(|| "test".to_owned())
        })
        .sink(sink.clone())
        .spawn()
        .expect("daemon starts");
    daemon.wait_ready(WAIT).expect("ready");
    (daemon, sink)
}

/// A ring made as the grant server makes one (a sealed memfd, `epoch` in its header),
/// to hand to a `Drainer` directly, and its producer's writer over a second mapping.
pub fn new_ring(
    id: u32,
    connection: u64,
    service: &str,
    epoch: u64,
    capacity: u64,
) -> (metricsd::drain::NewRing, Writer<MemfdRegion>) {
    let geometry = telemetry_abi::Geometry::new(capacity).expect("a power of two");
    let region = MemfdRegion::create("test", geometry, epoch).expect("memfd");
    let fd = region.fd().try_clone_to_owned().expect("dup");
    let writer = Writer::new(MemfdRegion::attach(fd).expect("attach"));
    let ring = metricsd::drain::NewRing {
        id,
        connection,
        service: std::sync::Arc::from(service),
        region,
        epoch,
        logged: None,
    };
    (ring, writer)
}

/// A producer's control connection.
pub struct Control {
    pub fd: OwnedFd,
}

impl Control {
    pub fn connect(path: &Path) -> Self {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socket");
        let addr = SocketAddrUnix::new(path).expect("address");
        rustix::net::connect(&fd, &addr).expect("connect");
        Self { fd }
    }

    /// Sends raw bytes as one message and reads the response (and fd, if any).
    pub fn raw(&self, bytes: &[u8]) -> (GrantResponse, Option<OwnedFd>) {
        rustix::net::send(&self.fd, bytes, SendFlags::NOSIGNAL).expect("send");
        let mut buf = [0u8; 64];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = rustix::net::recvmsg(&self.fd, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
            .expect("recvmsg");
        assert_eq!(msg.bytes, 32, "one response frame");
        let mut fd = None;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = m {
                for f in fds {
                    fd = Some(f);
                }
            }
        }
        let resp = GrantResponse::read_from_bytes(&buf[..32]).expect("32 bytes");
        (resp, fd)
    }

    /// Asks for a ring of `capacity` records.
    pub fn request(&self, capacity: u32) -> (GrantResponse, Option<OwnedFd>) {
        self.raw(GrantRequest::ring(capacity, 0).as_bytes())
    }

    /// Asks for a ring and maps it; panics if refused.
    pub fn ring(&self, capacity: u32) -> Ring {
        let (resp, fd) = self.request(capacity);
        assert_eq!(resp.status, GrantStatus::OK, "granted");
        let region = MemfdRegion::attach(fd.expect("an fd with OK")).expect("attach");
        Ring {
            id: resp.ring_id,
            writer: Writer::new(region),
        }
    }
}

/// The records of a registration of `key` as `what` named `name` with `labels`.
pub fn registration(
    key: u32,
    what: RegisterKind,
    name: &str,
    labels: &[(&str, &str)],
) -> Vec<Record> {
    let mut out = [Record::default(); MAX_REGISTER_RECORDS];
    let n = encode_registration(key, what, name, labels, &mut out).expect("valid registration");
    out[..n].to_vec()
}

/// A granted ring, written directly.
pub struct Ring {
    pub id: u32,
    pub writer: Writer<MemfdRegion>,
}

impl Ring {
    /// Registers `key` as `what` named `name` with `labels`.
    pub fn register(&mut self, key: u32, what: RegisterKind, name: &str, labels: &[(&str, &str)]) {
        let records = registration(key, what, name, labels);
        self.writer.push_all(&records).expect("room");
    }

    /// [`Ring::register`], waiting for room (the daemon drains meanwhile).
    pub fn register_wait(
        &mut self,
        key: u32,
        what: RegisterKind,
        name: &str,
        labels: &[(&str, &str)],
    ) {
        let records = registration(key, what, name, labels);
        let deadline = std::time::Instant::now() + WAIT;
        while self.writer.push_all(&records).is_err() {
            assert!(std::time::Instant::now() < deadline, "ring never drained");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    pub fn push(&mut self, r: Record) {
        self.writer.push(r).expect("room");
    }

    /// Pushes records, waiting for room (the daemon drains meanwhile).
    pub fn push_wait(&mut self, r: Record) {
        let deadline = std::time::Instant::now() + WAIT;
        while self.writer.try_push(r).is_err() {
            assert!(std::time::Instant::now() < deadline, "ring never drained");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The real `metricsd` binary, serving until dropped (then killed and reaped).
pub struct Serving(pub std::process::Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Serving {
    /// Writes `extra` (TOML sections) after the socket paths in `dir` into a config file,
    /// starts `metricsd serve --config` on it, and waits for its `metricsd: ready` line.
    pub fn start(dir: &Path, extra: &str) -> Self {
        use std::io::BufRead;
        let config = dir.join("metricsd.toml");
        let toml = format!(
            "socket = {:?}\nlogd_socket = {:?}\n\n{extra}",
            dir.join("metricsd.sock"),
            dir.join("logd.sock"),
        );
        std::fs::write(&config, toml).expect("config written");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_metricsd"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("metricsd starts");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("a line");
        assert_eq!(line.trim(), "metricsd: ready");
        Self(child)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// The resident set size of process `pid`, in kB.
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in kB")
}
