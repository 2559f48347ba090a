//! The process-wide recorder: configuration, installation, statistics.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use rustix::time::{ClockId, clock_gettime};

use crate::clock::Clock;
use crate::intern::Interner;
use crate::socket::SocketSource;
use crate::source::RingSource;
use crate::stats::{Counts, DropReason, Event, Stats};

/// Keys a process may register unless [`Config::max_keys`] says otherwise.
pub const DEFAULT_MAX_KEYS: u32 = 4096;

/// The largest [`Config::max_keys`]: every thread that records holds a key table of
/// about 8.4 bytes per key (34 KiB at the default 4096 keys, 8.4 MiB at this limit).
pub const MAX_KEYS_LIMIT: u32 = 1 << 20;

/// `CLOCK_MONOTONIC` in nanoseconds, read through the vDSO (no system call).
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    #[inline]
    fn now_ns(&self) -> u64 {
        monotonic_ns()
    }
}

#[inline]
pub(crate) fn monotonic_ns() -> u64 {
    let t = clock_gettime(ClockId::Monotonic);
    (t.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(t.tv_nsec as u64)
}

/// How the process-wide recorder is set up. Install one with [`install`] before the
/// first record; without it the defaults apply (metricsd at [`default_socket_path`],
/// [`DEFAULT_MAX_KEYS`], `CLOCK_MONOTONIC`).
///
/// [`default_socket_path`]: crate::default_socket_path
pub struct Config {
    source: Option<Box<dyn RingSource>>,
    socket: Option<std::path::PathBuf>,
    ring_capacity: u32,
    max_keys: u32,
    clock: Option<&'static (dyn Clock + Sync)>,
    retry_min: Duration,
    retry_max: Duration,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("custom_source", &self.source.is_some())
            .field("socket", &self.socket)
            .field("ring_capacity", &self.ring_capacity)
            .field("max_keys", &self.max_keys)
            .field("custom_clock", &self.clock.is_some())
            .field("retry_min", &self.retry_min)
            .field("retry_max", &self.retry_max)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

impl Config {
    /// The defaults.
    pub fn new() -> Self {
        Self {
            source: None,
            socket: None,
            ring_capacity: 0,
            max_keys: DEFAULT_MAX_KEYS,
            clock: None,
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_secs(1),
        }
    }

    /// Claims rings from `source` instead of metricsd's control socket (the socket
    /// settings below then do not apply).
    pub fn source(mut self, source: impl RingSource + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Finds metricsd's control socket at `path` instead of
    /// [`default_socket_path`](crate::default_socket_path).
    pub fn socket(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// Records per ring to ask metricsd for, rounded up to a power of two (default
    /// zero: metricsd's configured default; it may grant less).
    pub fn ring_capacity(mut self, records: u32) -> Self {
        self.ring_capacity = records;
        self
    }

    /// The most keys (series, span names, attribute keys, strings) the process may
    /// register; past it, new handles are no-ops that count their records as dropped
    /// ([`DropReason::KeyLimit`]). Clamped to 1..=[`MAX_KEYS_LIMIT`].
    pub fn max_keys(mut self, max_keys: u32) -> Self {
        self.max_keys = max_keys.clamp(1, MAX_KEYS_LIMIT);
        self
    }

    /// Takes span timestamps from `clock` instead of `CLOCK_MONOTONIC`.
    pub fn clock(mut self, clock: &'static (dyn Clock + Sync)) -> Self {
        self.clock = Some(clock);
        self
    }

    /// How long a thread without a ring waits before claiming again, and how long the
    /// socket waits between connection attempts: `min` after the first failure,
    /// doubling up to `max` (default 10 ms to 1 s).
    pub fn retry(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max.max(min);
        self
    }
}

/// [`install`] was too late.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlreadyInstalled;

impl fmt::Display for AlreadyInstalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the metrics recorder is already set up (installed, or used with the defaults); \
             install it before the first record",
        )
    }
}

impl std::error::Error for AlreadyInstalled {}

/// Sets up the process-wide recorder. Call it once, early in `main`, before anything
/// records or registers a metric ("libraries emit, executables install").
pub fn install(config: Config) -> Result<(), AlreadyInstalled> {
    let mut config = Some(config);
    GLOBAL.get_or_init(|| Global::new(config.take().unwrap_or_default()));
    if config.is_none() {
        Ok(())
    } else {
        Err(AlreadyInstalled)
    }
}

pub(crate) struct Global {
    pub(crate) source: Box<dyn RingSource>,
    pub(crate) interner: Interner,
    pub(crate) clock: Option<&'static (dyn Clock + Sync)>,
    pub(crate) retry_min_ns: u64,
    pub(crate) retry_max_ns: u64,
    threads: Mutex<Threads>,
}

/// The counts of live threads, and the sum of those that exited.
#[derive(Default)]
struct Threads {
    live: Vec<Arc<Counts>>,
    exited: Counts,
}

static GLOBAL: OnceLock<Global> = OnceLock::new();

/// Drops counted where no thread-local state was usable.
static UNAVAILABLE: AtomicU64 = AtomicU64::new(0);

pub(crate) fn global() -> &'static Global {
    GLOBAL.get_or_init(|| Global::new(Config::new()))
}

impl Global {
    fn new(config: Config) -> Self {
        crate::source::watch_forks();
        let source = config.source.unwrap_or_else(|| {
            let path = config.socket.unwrap_or_else(crate::default_socket_path);
            Box::new(
                SocketSource::new(path)
                    .capacity(config.ring_capacity)
                    .retry(config.retry_min, config.retry_max),
            )
        });
        Self {
            source,
            interner: Interner::new(config.max_keys),
            clock: config.clock,
            retry_min_ns: config.retry_min.as_nanos().min(u128::from(u64::MAX)) as u64,
            retry_max_ns: config.retry_max.as_nanos().min(u128::from(u64::MAX)) as u64,
            threads: Mutex::default(),
        }
    }

    /// The span clock's reading.
    #[inline]
    pub(crate) fn now_ns(&self) -> u64 {
        match self.clock {
            Some(clock) => clock.now_ns(),
            None => monotonic_ns(),
        }
    }

    /// A new thread's counts, registered for [`stats`].
    pub(crate) fn thread_counts(&self) -> Arc<Counts> {
        let counts = Arc::new(Counts::default());
        self.lock_threads().live.push(Arc::clone(&counts));
        counts
    }

    /// Folds an exiting thread's counts into the exited total.
    pub(crate) fn retire(&self, counts: &Arc<Counts>) {
        let mut threads = self.lock_threads();
        threads.exited.absorb(counts);
        threads.live.retain(|c| !Arc::ptr_eq(c, counts));
    }

    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Threads> {
        self.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts `n` records dropped with no usable thread-local state.
#[cold]
pub(crate) fn count_unavailable(n: u64) {
    // ORDERING: Relaxed: a counter.
    UNAVAILABLE.fetch_add(n, Ordering::Relaxed);
}

/// What the process-wide recorder has dropped, coalesced and claimed so far, summed
/// over every thread. Takes a lock: not for hot paths.
pub fn stats() -> Stats {
    let global = global();
    let mut stats = Stats::default();
    {
        let threads = global.lock_threads();
        threads.exited.sum_into(&mut stats);
        for counts in &threads.live {
            counts.sum_into(&mut stats);
        }
    }
    let unavailable = Counts::default();
    // ORDERING: Relaxed: a counter.
    let n = UNAVAILABLE.load(Ordering::Relaxed);
    unavailable.add_local(Event::Dropped(DropReason::Unavailable), n);
    unavailable.sum_into(&mut stats);
    stats.keys = global.interner.len();
    stats
}
