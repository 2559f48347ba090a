//! The scrape endpoint: `GET /metrics` over HTTP/1.1, off unless `[prometheus] listen`
//! (or `metricsd serve --prometheus-listen ADDR`) names an address.
//!
//! The drain thread publishes a [`ScrapeView`] into a [`Published`] slot at every export
//! interval (and on `flush`); a scrape takes the latest one (an `Arc`, under a lock held
//! only to clone the pointer) and renders it on the scrape's own thread through
//! [`crate::prometheus`]. So a scrape never waits for the drain thread and the drain
//! thread never waits for a scrape; values are as of the last export (at most
//! `export.interval_ms` old). Publishing is incremental: the drain thread keeps a
//! [`ScrapeTable`] and copies into it only the series that changed since the last
//! export, which the export walks anyway; unchanged series are shared between views.
//!
//! Bounds (all in `[prometheus]`, see `metricsd/README.md`):
//!
//! - at most `max_connections` scrapes at once (default 4), each on its own thread;
//!   a connection past it gets `503` and is closed;
//! - the request head (request line and headers) is at most `max_request_bytes`
//!   (default 8192; past it `431`), and must arrive within `timeout_ms` (default 10 s;
//!   past it the connection is closed); each write of the response must progress within
//!   `timeout_ms` too;
//! - the response is at most `max_response_bytes` (default 256 MiB; past it `500`);
//! - one request per connection (`Connection: close`); a request body is never read.
//!
//! Answers: `GET /metrics` (a query string is ignored) 200; another path 404; another
//! method on `/metrics` 405 with `Allow: GET`; a malformed request 400.
//! Counted (health series `metricsd.scrape.*`, exported to logd and scraped like the
//! others): scrapes served, failures (render or write errors, responses over the
//! bound) and refusals by reason.
//!
//! The HTTP request head is parsed by `httparse` (hyper's parser). A server crate such
//! as `tiny_http` was not used: it starts a thread per connection without a limit, reads
//! header lines without a length limit and sets no read or write timeout, so none of
//! the bounds above could be kept from outside it.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::aggregate::{MetricKind, Series, Store};
use crate::config::PrometheusConfig;
use crate::prometheus::{Format, Prepared, render_view};
use crate::schema::labels;
use crate::snapshot::HealthSeries;

/// What a scrape renders: every series as of the last export, and the health series.
///
/// The series are shared, not copied, between consecutive views: they sit in chunks of
/// [`CHUNK`] slots, each series behind its own `Arc`, and a view holds the chunks by
/// `Arc` as well. Publishing a view after an export copies only the series that changed
/// (and the pointer arrays of the chunks they are in).
#[derive(Clone, Debug, Default)]
pub struct ScrapeView {
    chunks: Vec<Arc<Chunk>>,
    health: Vec<HealthSeries>,
}

/// Slots per chunk of a [`ScrapeView`].
pub const CHUNK: usize = 1024;

type Chunk = Vec<Option<Arc<Entry>>>;

/// A series and what it exposes besides its values (its labels never change).
#[derive(Clone, Debug)]
struct Entry {
    series: Series,
    prepared: Arc<Prepared>,
}

impl Entry {
    fn new(s: &Series) -> Self {
        Self {
            prepared: Arc::new(Prepared::of(&s.service, &s.labels)),
            series: s.clone(),
        }
    }

    /// Whether `s` has this entry's identity (so its prepared labels still hold).
    fn same_labels(&self, s: &Series) -> bool {
        self.series.service == s.service
            && (Arc::ptr_eq(&self.series.labels, &s.labels) || self.series.labels == s.labels)
    }
}

impl ScrapeView {
    /// Every series, in slot order.
    pub fn series(&self) -> impl Iterator<Item = &Series> {
        self.entries().map(|(s, _)| s)
    }

    /// Every series with its prepared labels, in slot order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&Series, &Prepared)> {
        self.chunks
            .iter()
            .flat_map(|c| c.iter().flatten().map(|e| (&e.series, &*e.prepared)))
    }

    /// The health series.
    pub fn health(&self) -> &[HealthSeries] {
        &self.health
    }
}

/// The drain thread's copy of the series store for scrapes, kept up to date per
/// export from the slots that changed ([`Store::take_slot_changes`]).
///
/// Memory: one copy of every live series (as much as the store's own series), plus,
/// while a scrape still renders an older view, the older copies of the series that
/// changed since (at most one view per concurrent scrape, `prometheus.max_connections`,
/// and the one published).
#[derive(Debug, Default)]
pub struct ScrapeTable {
    chunks: Vec<Arc<Chunk>>,
    tracking: bool,
}

impl ScrapeTable {
    /// An empty table; the first [`ScrapeTable::update`] fills it from the whole store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Brings the table up to date with `store`: the first call copies every series
    /// and starts the store recording its slot changes; later calls copy only the
    /// slots recorded since.
    pub fn update(&mut self, store: &mut Store) {
        let slots = store.slot_count();
        let changed: Vec<u32> = if self.tracking {
            store.take_slot_changes()
        } else {
            store.track_slot_changes(true);
            self.tracking = true;
            (0..slots as u32).collect()
        };
        let chunks = slots.div_ceil(CHUNK);
        self.chunks.truncate(chunks);
        while self.chunks.len() < chunks {
            self.chunks.push(Arc::new(Vec::new()));
        }
        for index in changed {
            let (c, i) = (index as usize / CHUNK, index as usize % CHUNK);
            let Some(chunk) = self.chunks.get_mut(c) else {
                continue; // a slot dropped from the table's end since
            };
            // Copies the chunk's pointers only if a published view still holds it.
            let chunk = Arc::make_mut(chunk);
            if chunk.len() <= i {
                chunk.resize(i + 1, None);
            }
            let Some(entry) = chunk.get_mut(i) else {
                continue;
            };
            let Some(s) = store.series_at(index) else {
                *entry = None;
                continue;
            };
            match entry.as_mut().and_then(Arc::get_mut) {
                // Not shared with a view: overwritten in place.
                Some(old) if old.same_labels(s) => old.series.clone_from(s),
                Some(old) => *old = Entry::new(s),
                None => {
                    let fresh = match entry.as_deref() {
                        // Shared: a new entry, with the labels prepared before.
                        Some(old) if old.same_labels(s) => Entry {
                            series: s.clone(),
                            prepared: old.prepared.clone(),
                        },
                        _ => Entry::new(s),
                    };
                    *entry = Some(Arc::new(fresh));
                }
            }
        }
        // The last chunk holds no slot past the store's end.
        if let Some(last) = self.chunks.last_mut() {
            let keep = slots - (chunks - 1) * CHUNK;
            if last.len() > keep {
                Arc::make_mut(last).truncate(keep);
            }
        }
    }

    /// A view of the table as it is, with these health series.
    pub fn view(&self, health: Vec<HealthSeries>) -> ScrapeView {
        ScrapeView {
            chunks: self.chunks.clone(),
            health,
        }
    }
}

/// The latest view the drain thread published for scrapes.
#[derive(Debug, Default)]
pub struct Published {
    latest: Mutex<Option<Arc<ScrapeView>>>,
}

impl Published {
    /// An empty slot (a scrape before the first publish is answered 503).
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the published view.
    pub fn publish(&self, view: Arc<ScrapeView>) {
        // The old view is dropped outside the lock.
        let old = self
            .latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(view);
        drop(old);
    }

    /// The latest view.
    pub fn latest(&self) -> Option<Arc<ScrapeView>> {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Why requests were refused.
pub const REFUSAL_REASONS: [&str; 7] = [
    "busy",
    "bad_request",
    "request_too_large",
    "timeout",
    "not_found",
    "method_not_allowed",
    "not_ready",
];

/// The endpoint's own counters.
#[derive(Debug, Default)]
pub struct ScrapeStats {
    /// Scrapes answered 200.
    pub scrapes: AtomicU64,
    /// Scrapes that failed: render errors, responses past the bound, write errors.
    pub failures: AtomicU64,
    /// Refusals, by [`REFUSAL_REASONS`] index.
    pub refused: [AtomicU64; REFUSAL_REASONS.len()],
    active: AtomicU64,
}

impl ScrapeStats {
    fn refuse(&self, reason: &str) {
        let slot = REFUSAL_REASONS
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.refused.get(i));
        if let Some(c) = slot {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The refusals counted for `reason`.
    pub fn refused(&self, reason: &str) -> u64 {
        REFUSAL_REASONS
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.refused.get(i))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The counters as health series.
    pub fn health(&self) -> Vec<HealthSeries> {
        let c = MetricKind::Counter;
        let mut out = vec![
            HealthSeries {
                kind: c,
                name: "metricsd.scrape.served",
                labels: labels(&[]),
                value: self.scrapes.load(Ordering::Relaxed).into(),
            },
            HealthSeries {
                kind: c,
                name: "metricsd.scrape.failures",
                labels: labels(&[]),
                value: self.failures.load(Ordering::Relaxed).into(),
            },
        ];
        for (i, reason) in REFUSAL_REASONS.iter().enumerate() {
            let n = self.refused.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
            out.push(HealthSeries {
                kind: c,
                name: "metricsd.scrape.refused",
                labels: labels(&[("reason", reason)]),
                value: n.into(),
            });
        }
        out
    }
}

/// A running endpoint; dropping it stops it.
#[derive(Debug)]
pub struct ScrapeServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<ScrapeStats>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Clone, Debug)]
struct Limits {
    max_connections: u64,
    max_request: usize,
    max_response: u64,
    timeout: Duration,
}

impl ScrapeServer {
    /// Binds `addr` and serves `published` until dropped, counting into `stats` (which
    /// the drain loop exports as health series).
    pub fn start(
        addr: SocketAddr,
        config: &PrometheusConfig,
        published: Arc<Published>,
        stats: Arc<ScrapeStats>,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let limits = Limits {
            max_connections: u64::from(config.max_connections),
            max_request: config.max_request_bytes as usize,
            max_response: config.max_response_bytes,
            timeout: Duration::from_millis(config.timeout_ms),
        };
        let (s, st) = (stop.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("metricsd-scrape".to_owned())
            .spawn(move || accept_loop(&listener, &s, &st, &limits, &published))?;
        Ok(Self {
            addr,
            stop,
            stats,
            thread: Some(thread),
        })
    }

    /// The address served (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint's counters.
    pub fn stats(&self) -> &ScrapeStats {
        &self.stats
    }
}

impl Drop for ScrapeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    stats: &Arc<ScrapeStats>,
    limits: &Limits,
    published: &Arc<Published>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(stream) = conn else {
            // Out of descriptors and the like: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = stream.set_write_timeout(Some(limits.timeout));
        if stats.active.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            stats.active.fetch_sub(1, Ordering::AcqRel);
            stats.refuse("busy");
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            respond_empty(&stream, 503, "Service Unavailable", &[]);
            continue;
        }
        let (st, lim, pb) = (stats.clone(), limits.clone(), published.clone());
        let spawned = std::thread::Builder::new()
            .name("metricsd-scrape-conn".to_owned())
            .spawn(move || {
                serve(stream, &st, &lim, &pb);
                st.active.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            stats.active.fetch_sub(1, Ordering::AcqRel);
            stats.failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn respond_empty(mut stream: &TcpStream, code: u16, reason: &str, extra: &[(&str, &str)]) {
    let mut head =
        format!("HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n");
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
}

/// Reads the request head: `Ok(None)` if it did not fit or did not arrive in time
/// (already answered and counted).
fn read_head(stream: &mut TcpStream, stats: &ScrapeStats, limits: &Limits) -> Option<Vec<u8>> {
    let deadline = Instant::now() + limits.timeout;
    let mut buf = vec![0u8; limits.max_request];
    let mut len = 0;
    loop {
        if buf
            .get(..len)
            .is_some_and(|b| b.windows(4).any(|w| w == b"\r\n\r\n"))
        {
            buf.truncate(len);
            return Some(buf);
        }
        if len == buf.len() {
            stats.refuse("request_too_large");
            respond_empty(stream, 431, "Request Header Fields Too Large", &[]);
            return None;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            stats.refuse("timeout");
            return None;
        }
        match stream.read(buf.get_mut(len..).unwrap_or_default()) {
            Ok(0) => {
                stats.refuse("bad_request");
                return None;
            }
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                stats.refuse("timeout");
                return None;
            }
            Err(_) => {
                stats.refuse("bad_request");
                return None;
            }
        }
    }
}

fn serve(mut stream: TcpStream, stats: &ScrapeStats, limits: &Limits, published: &Published) {
    let Some(head) = read_head(&mut stream, stats, limits) else {
        return;
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let (method, path) = match req.parse(&head) {
        Ok(httparse::Status::Complete(_)) => (
            req.method.unwrap_or("").to_owned(),
            req.path.unwrap_or("").to_owned(),
        ),
        _ => {
            stats.refuse("bad_request");
            respond_empty(&stream, 400, "Bad Request", &[]);
            return;
        }
    };
    let path = path.split('?').next().unwrap_or("");
    if path != "/metrics" {
        stats.refuse("not_found");
        respond_empty(&stream, 404, "Not Found", &[]);
        return;
    }
    if method != "GET" {
        stats.refuse("method_not_allowed");
        respond_empty(&stream, 405, "Method Not Allowed", &[("Allow", "GET")]);
        return;
    }
    let accept = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("accept"))
        .and_then(|h| std::str::from_utf8(h.value).ok());
    let format = Format::negotiate(accept);
    let Some(view) = published.latest() else {
        stats.refuse("not_ready");
        respond_empty(&stream, 503, "Service Unavailable", &[("Retry-After", "1")]);
        return;
    };
    // The endpoint's own counters are health series of the snapshot (as of the last
    // export, like every other series).
    let body = match render_view(&view, format) {
        Ok(r) if r.body.len() as u64 <= limits.max_response => r.body,
        _ => {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            respond_empty(&stream, 500, "Internal Server Error", &[]);
            return;
        }
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        format.content_type(),
        body.len()
    );
    let sent = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(&body))
        .and_then(|()| stream.flush());
    if sent.is_ok() {
        stats.scrapes.fetch_add(1, Ordering::Relaxed);
    } else {
        stats.failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// A minimal client: `GET path` on `addr` with `accept`, returning the status, the
/// `Content-Type` and the body. HTTP/1.0, so the server answers without chunked
/// encoding and closes. For the demo, the tests and the QEMU selftest; reads at most
/// `max_bytes` and gives up after `timeout` (per read).
pub fn get(
    addr: SocketAddr,
    path: &str,
    accept: Option<&str>,
    timeout: Duration,
    max_bytes: usize,
) -> io::Result<(u16, String, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(a) = accept {
        req.push_str(&format!("Accept: {a}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.take(max_bytes as u64).read_to_end(&mut raw)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let body_at = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(bad("malformed HTTP response head")),
    };
    let code = resp.code.unwrap_or(0);
    let content_type = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-type"))
        .map(|h| String::from_utf8_lossy(h.value).into_owned())
        .unwrap_or_default();
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let body = raw.get(body_at..).unwrap_or_default().to_vec();
    if length.is_some_and(|l| l != body.len()) {
        return Err(bad("HTTP body shorter than its Content-Length"));
    }
    Ok((code, content_type, body))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::aggregate::{Resolved, SeriesId};
    use crate::config::{RedactionConfig, SeriesConfig};
    use crate::redact::Redactor;

    fn store() -> Store {
        let caps = SeriesConfig {
            max_total: 10_000,
            max_per_metric: 10_000,
            max_per_service: 10_000,
            expiry_scan: 100_000,
            idle_ttl_ms: 1,
            idle_ttl_bound_ms: 1,
            ..SeriesConfig::default()
        };
        Store::new(
            caps,
            Redactor::new(&RedactionConfig::default().patterns),
            &BTreeMap::new(),
        )
    }

    fn create(store: &mut Store, from: usize, to: usize) -> Vec<SeriesId> {
        let svc = store.service("web");
        (from..to)
            .map(|i| {
                let kind = [
                    MetricKind::Counter,
                    MetricKind::Gauge,
                    MetricKind::Histogram,
                ][i % 3];
                let label = i.to_string();
                match store.resolve(svc, kind, "m", &[("i", &label)]) {
                    Resolved::Series(id) => id,
                    Resolved::Refused => panic!("within the caps"),
                }
            })
            .collect()
    }

    fn touch(store: &mut Store, ids: &[SeriesId], v: u64) {
        for &id in ids {
            store.add(id, v);
            store.set(id, v as i64);
            store.observe(id, v);
        }
    }

    fn series(view: &ScrapeView) -> Vec<Series> {
        view.series().cloned().collect()
    }

    /// After every kind of change, the incrementally updated view holds exactly the
    /// store's series, and a view taken earlier is left as it was.
    #[test]
    fn the_table_follows_the_store_and_old_views_stay_as_they_were() {
        let mut store = store();
        let mut table = ScrapeTable::new();
        let ids = create(&mut store, 0, 3000); // three chunks
        touch(&mut store, &ids, 5);
        store.take_dirty();
        table.update(&mut store);
        let first = table.view(Vec::new());
        let want: Vec<Series> = store.all().cloned().collect();
        assert_eq!(series(&first), want);
        assert_eq!(want.len(), 3000);

        // Some change, some are created (one never sampled: exposed at zero).
        touch(&mut store, &ids[1000..1010], 7);
        let more = create(&mut store, 3000, 3100);
        touch(&mut store, &more[1..], 1);
        store.take_dirty();
        table.update(&mut store);
        let second = table.view(Vec::new());
        assert_eq!(series(&second), store.all().cloned().collect::<Vec<_>>());
        assert_eq!(series(&first), want, "an older view is not changed");
        // Unchanged series are shared with the older view, not copied.
        let shared = first
            .series()
            .zip(second.series())
            .filter(|(a, b)| std::ptr::eq(*a, *b))
            .count();
        assert_eq!(shared, 3000 - 10);

        // Every series expires (the slot table then shrinks), then new ones come.
        store.take_dirty();
        store.sweep(u64::MAX, |_| {});
        assert!(store.is_empty());
        table.update(&mut store);
        assert!(series(&table.view(Vec::new())).is_empty());
        let again = create(&mut store, 5000, 5500);
        touch(&mut store, &again, 3);
        store.take_dirty();
        table.update(&mut store);
        assert_eq!(
            series(&table.view(Vec::new())),
            store.all().cloned().collect::<Vec<_>>()
        );
        assert_eq!(series(&second).len(), 3100, "still as it was");

        // A view renders what its series, rendered from a snapshot, render.
        for view in [&first, &second, &table.view(Vec::new())] {
            let snapshot = Arc::new(crate::snapshot::Snapshot {
                series: series(view),
                ..Default::default()
            });
            for format in [Format::OpenMetrics, Format::Text, Format::Protobuf] {
                let a = render_view(view, format).expect("renders");
                let b = crate::prometheus::render(snapshot.clone(), Vec::new(), format)
                    .expect("renders");
                assert_eq!(a.body, b.body, "{format:?}");
            }
        }
    }
}
