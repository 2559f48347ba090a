//! Wiring: the grant server, the drain loop and the exporter, each on its own thread,
//! with an in-process API for tests, `metricsd top` and the demo.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::drain::{self, Command, Drainer};
use crate::export::{self, ExportQueue};
use crate::grant::{GrantAccess, GrantError, GrantServer};
use crate::identity::{Identify, Policy};
use crate::scrape::{Published, ScrapeServer, ScrapeStats};
use crate::sink::{LogdSink, Sink};
use crate::snapshot::{GrantStats, Snapshot};
use crate::wake::StopSignal;

/// Why the daemon could not start, or stopped answering.
#[derive(Debug)]
pub enum DaemonError {
    /// The configuration is invalid.
    Config(crate::config::ConfigError),
    /// The control socket could not be set up.
    Grant(GrantError),
    /// A thread could not be started.
    Spawn(std::io::Error),
    /// The eventfd that wakes the grant thread at shutdown could not be made.
    StopSignal(std::io::Error),
    /// The retention directory could not be opened.
    Retention(crate::retention::OpenError),
    /// The write-ahead log could not be opened.
    Wal(crate::wal::WalError),
    /// Started as root with `user` set, and the switch to that user failed.
    Privilege(logd::privilege::PrivilegeError),
    /// The drain loop did not answer within the time given.
    Timeout(&'static str),
    /// The drain loop is gone.
    Stopped,
    /// The scrape endpoint could not listen on its address.
    Prometheus(std::net::SocketAddr, std::io::Error),
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => write!(f, "{e}"),
            Self::Grant(e) => write!(f, "{e}"),
            Self::Spawn(e) => write!(f, "cannot start a thread: {e}"),
            Self::StopSignal(e) => write!(f, "cannot create the stop eventfd: {e}"),
            Self::Retention(e) => write!(f, "{e}"),
            Self::Wal(e) => write!(f, "{e}"),
            Self::Privilege(e) => write!(f, "{e}"),
            Self::Timeout(what) => write!(f, "timed out waiting for {what}"),
            Self::Stopped => f.write_str("the drain loop has stopped"),
            Self::Prometheus(addr, e) => write!(
                f,
                "cannot serve /metrics on {addr} (prometheus.listen / --prometheus-listen): {e}"
            ),
        }
    }
}

impl std::error::Error for DaemonError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Config(e) => Some(e),
            Self::Grant(e) => Some(e),
            Self::Spawn(e) | Self::StopSignal(e) | Self::Prometheus(_, e) => Some(e),
            Self::Retention(e) => Some(e),
            Self::Wal(e) => Some(e),
            Self::Privilege(e) => Some(e),
            _ => None,
        }
    }
}

/// File descriptors a daemon of `config` may hold at once: one memfd per ring, one
/// socket per control connection, and a margin for the listener, the eventfd, logd's
/// connection, the binary's own files and the standard streams.
pub fn fds_needed(config: &Config) -> u64 {
    u64::from(config.rings.max_total) + u64::from(config.rings.max_connections) + 64
}

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to what `config`
/// can need, within the hard limit: many systems start services with a soft limit of
/// 1024, below the default caps (1024 rings and 256 connections). Returns the soft
/// limit now in force; below [`fds_needed`] when the hard limit does not allow more.
pub fn raise_open_file_limit(config: &Config) -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let need = fds_needed(config);
    let mut limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= need {
        return current;
    }
    let want = limit.maximum.map_or(need, |max| need.min(max));
    limit.current = Some(want);
    match setrlimit(Resource::Nofile, limit) {
        Ok(()) => want,
        Err(_) => current,
    }
}

/// Builds a daemon: the config, then optionally another identity policy or sink.
pub struct Daemon {
    config: Config,
    identify: Option<Box<dyn Identify>>,
    sink: Option<Box<dyn Sink>>,
}

impl fmt::Debug for Daemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Daemon")
            .field("config", &self.config)
            .finish()
    }
}

impl Daemon {
    /// A daemon of `config`, with the configured identity policy, exporting to the logd
    /// at `config.logd_socket`.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            identify: None,
            sink: None,
        }
    }

    /// Starts a daemon of `config` with the defaults (see [`Daemon::new`]).
    pub fn start(config: Config) -> Result<DaemonHandle, DaemonError> {
        Self::new(config).spawn()
    }

    /// Uses `identify` instead of the configured `[[services]]` policy.
    #[must_use]
    pub fn identify(mut self, identify: impl Identify + 'static) -> Self {
        self.identify = Some(Box::new(identify));
        self
    }

    /// Exports to `sink` instead of logd.
    #[must_use]
    pub fn sink(mut self, sink: impl Sink + 'static) -> Self {
        self.sink = Some(Box::new(sink));
        self
    }

    /// Binds the control socket and starts the threads. The socket accepts producers
    /// when this returns; [`DaemonHandle::wait_ready`] waits for the first export
    /// round trip.
    pub fn spawn(self) -> Result<DaemonHandle, DaemonError> {
        let config = self.config;
        config.validate().map_err(DaemonError::Config)?;
        let identify = self
            .identify
            .unwrap_or_else(|| Box::new(Policy::new(&config.services)));
        let sink = self
            .sink
            .unwrap_or_else(|| Box::new(LogdSink::new(&config.logd_socket)));
        let (tx, rx) = mpsc::channel();
        let grant_stats = Arc::new(Mutex::new(GrantStats::default()));
        let access = GrantAccess {
            rings: config.rings.clone(),
            policy: config.grant_policy().map_err(DaemonError::Config)?,
            socket: config.socket_access().map_err(DaemonError::Config)?,
        };
        let run_as = config.run_as().map_err(DaemonError::Config)?;
        let server = GrantServer::bind(
            &config.socket,
            access,
            identify,
            tx.clone(),
            grant_stats.clone(),
        )
        .map_err(DaemonError::Grant)?;
        // Started as root with `user` set: switch before any thread of this daemon
        // starts (a credential change applies to the calling thread only, so it is
        // refused if any other thread already runs).
        if let Some(to) = run_as {
            logd::privilege::drop_privileges(to).map_err(DaemonError::Privilege)?;
        }

        let queue = ExportQueue::new(config.export.queue_records);
        let stop = Arc::new(StopSignal::new().map_err(DaemonError::StopSignal)?);
        let instance = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(f)
                .map_err(DaemonError::Spawn)
        };

        let q = queue.clone();
        let (batch, retry) = (
            config.export.batch_records as usize,
            Duration::from_millis(config.export.retry_ms),
        );
        let inst = instance.clone();
        threads.push(spawn(
            "metricsd-export",
            Box::new(move || export::run(q, sink, inst, batch, retry)),
        )?);

        let retention =
            crate::retention::Retention::open(&config.retention).map_err(DaemonError::Retention)?;
        let mut drainer =
            Drainer::new(&config, queue.clone(), grant_stats).with_retention(retention);
        let mut server = server;
        if let (Some(dir), true) = (&config.retention.dir, config.retention.wal) {
            let base = drainer
                .open_wal(&dir.join("wal"), config.retention.wal_file_bytes)
                .map_err(DaemonError::Wal)?;
            server.set_epoch_base(base);
        }
        let mut otlp_shared = None;
        if config.otlp.endpoint.is_some() {
            let (handoff, rx) = crate::otlp::channel(&config.otlp);
            let shared = handoff.shared().clone();
            otlp_shared = Some(shared.clone());
            drainer.set_otlp(handoff);
            let otlp_config = config.otlp.clone();
            let start_unix_ns = crate::drain::wall_ns();
            let s = stop.clone();
            let stopping: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || s.is_raised());
            threads.push(spawn(
                "metricsd-otlp",
                Box::new(move || {
                    crate::otlp::run(rx, shared, otlp_config, start_unix_ns, stopping)
                }),
            )?);
        }
        let scrape = match config
            .prometheus
            .listen_addr()
            .map_err(DaemonError::Config)?
        {
            Some(addr) => {
                let published = Arc::new(Published::new());
                let stats = Arc::new(ScrapeStats::default());
                drainer.set_scrape_stats(stats.clone());
                let server =
                    ScrapeServer::start(addr, &config.prometheus, published.clone(), stats)
                        .map_err(|e| DaemonError::Prometheus(addr, e))?;
                Some((published, server))
            }
            None => None,
        };
        let published = scrape.as_ref().map(|(p, _)| p.clone());
        let idle = drain::IdlePolicy::from_config(&config);
        let drain_thread = spawn(
            "metricsd-drain",
            Box::new(move || drain::run(drainer, rx, idle, published)),
        )?;

        let s = stop.clone();
        let grant_thread = spawn("metricsd-grant", Box::new(move || server.run(&s)))?;

        Ok(DaemonHandle {
            tx,
            stop,
            queue,
            socket: config.socket.clone(),
            instance,
            otlp: otlp_shared,
            grant_thread: Some(grant_thread),
            drain_thread: Some(drain_thread),
            export_threads: threads,
            scrape: scrape.map(|(_, s)| s),
        })
    }
}

/// A running daemon. Dropping it shuts it down.
pub struct DaemonHandle {
    tx: Sender<Command>,
    stop: Arc<StopSignal>,
    queue: Arc<ExportQueue>,
    socket: PathBuf,
    instance: String,
    otlp: Option<Arc<crate::otlp::Shared>>,
    grant_thread: Option<JoinHandle<()>>,
    drain_thread: Option<JoinHandle<()>>,
    export_threads: Vec<JoinHandle<()>>,
    scrape: Option<ScrapeServer>,
}

impl fmt::Debug for DaemonHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaemonHandle")
            .field("socket", &self.socket)
            .field("instance", &self.instance)
            .finish()
    }
}

impl DaemonHandle {
    /// The control socket producers connect to.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The `instance` field of this run's start marker in logd.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The address `GET /metrics` is served on, if `[prometheus] listen` is set (with
    /// the port the kernel chose for port 0).
    pub fn prometheus_addr(&self) -> Option<std::net::SocketAddr> {
        self.scrape.as_ref().map(ScrapeServer::local_addr)
    }

    /// The scrape endpoint's counters, if it runs.
    pub fn scrape_stats(&self) -> Option<&crate::scrape::ScrapeStats> {
        self.scrape.as_ref().map(ScrapeServer::stats)
    }

    /// Whether the start marker was appended and read back from the sink.
    pub fn is_ready(&self) -> bool {
        self.queue.stats().ready
    }

    /// Waits until [`is_ready`](Self::is_ready).
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), DaemonError> {
        let deadline = Instant::now() + timeout;
        while !self.is_ready() {
            if Instant::now() >= deadline {
                return Err(DaemonError::Timeout("the first export round trip"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// A snapshot taken after a full drain pass that began after this call.
    pub fn snapshot(&self) -> Result<Snapshot, DaemonError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Command::Snapshot(tx))
            .map_err(|_| DaemonError::Stopped)?;
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| DaemonError::Timeout("a snapshot"))
    }

    /// Snapshots until no ring has records pending (everything published before this
    /// call is aggregated), or `timeout`.
    pub fn settle(&self, timeout: Duration) -> Result<Snapshot, DaemonError> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.snapshot()?;
            if s.drain.lag == 0 {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(DaemonError::Timeout("the rings to drain"));
            }
        }
    }

    /// Drains, builds an export now, and waits until the sink has acknowledged (or
    /// refused) everything queued; returns a snapshot taken after.
    pub fn flush(&self, timeout: Duration) -> Result<Snapshot, DaemonError> {
        let deadline = Instant::now() + timeout;
        self.settle(timeout)?;
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Command::ExportNow(tx))
            .map_err(|_| DaemonError::Stopped)?;
        rx.recv_timeout(timeout)
            .map_err(|_| DaemonError::Timeout("an export"))?;
        while self.queue.stats().pending > 0 {
            if Instant::now() >= deadline {
                return Err(DaemonError::Timeout("the sink to acknowledge the export"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.snapshot()
    }

    /// The OTLP exporter's totals, when an endpoint is configured.
    pub fn otlp_stats(&self) -> Option<crate::otlp::OtlpStats> {
        self.otlp.as_ref().map(|s| s.stats())
    }

    /// Export intervals handed to the OTLP exporter and not finished yet (at most
    /// `otlp.queue_batches` waiting plus the one in hand).
    pub fn otlp_pending(&self) -> Option<u64> {
        self.otlp.as_ref().map(|s| s.pending())
    }

    /// Like [`flush`](Self::flush), then waits until the OTLP exporter has finished
    /// every interval handed to it (sent, dropped or given up; see
    /// [`otlp_stats`](Self::otlp_stats) for which).
    pub fn flush_otlp(&self, timeout: Duration) -> Result<Snapshot, DaemonError> {
        let deadline = Instant::now() + timeout;
        let snap = self.flush(timeout)?;
        if let Some(shared) = &self.otlp {
            while shared.pending() > 0 {
                if Instant::now() >= deadline {
                    return Err(DaemonError::Timeout("the OTLP exporter to finish"));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(snap)
    }

    /// Asks a producer connection to be treated as closed is not possible from here;
    /// this stops everything: the grant server (closing every connection, whose rings
    /// are drained a last time), the drain loop (after a last export), the exporter
    /// (after a last attempt).
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.stop.raise();
        self.scrape = None;
        if let Some(t) = self.grant_thread.take() {
            let _ = t.join();
        }
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.drain_thread.take() {
            let _ = t.join();
        }
        self.queue.stop();
        for t in self.export_threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        self.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_covers_every_ring_and_connection() {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let config = Config::default();
        assert_eq!(fds_needed(&config), 1024 + 256 + 64);
        // Start from a soft limit below the need, as many service managers do.
        let mut low = getrlimit(Resource::Nofile);
        let hard = low.maximum.unwrap_or(u64::MAX);
        low.current = Some(256.min(hard));
        setrlimit(Resource::Nofile, low).expect("lowering the soft limit is allowed");
        let limit = raise_open_file_limit(&config);
        assert_eq!(limit, fds_needed(&config).min(hard));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(limit));
    }
}
