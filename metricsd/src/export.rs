//! The exporter: a bounded queue of records between the drain loop and the sink, and
//! the thread that appends them in batches.
//!
//! The drain loop never waits for logd: it pushes each interval's records into the
//! queue and goes back to draining. The exporter thread appends batches of at most
//! `export.batch_records`. A failed exchange is counted and the same records are
//! retried after `export.retry_ms`; records refused for now (logd's rate limit) are
//! counted and retried; records refused for good are counted and dropped. When the
//! queue holds `export.queue_records`, the oldest records are dropped and counted:
//! series values are cumulative, so the next export of a series still carries its
//! exact total. Nothing is counted as exported until the sink acknowledged it.
//!
//! Before the first batch the exporter appends a start marker and reads it back
//! (query by its `instance` field); only then is the daemon ready.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use logd::Record;

use crate::schema;
use crate::sink::{Delivery, Sink};

/// Exporter totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Records the sink acknowledged as stored.
    pub stored: u64,
    /// Failed exchanges with the sink (each retried).
    pub failures: u64,
    /// Records the sink refused for now (retried).
    pub retried: u64,
    /// Records the sink refused for good (dropped).
    pub refused: u64,
    /// Records dropped from a full queue (oldest first).
    pub dropped: u64,
    /// Records waiting (queued or in flight).
    pub pending: u64,
    /// Batches appended successfully.
    pub batches: u64,
    /// The start marker was appended and read back.
    pub ready: bool,
}

struct Inner {
    queue: VecDeque<Record>,
    in_flight: u64,
    stats: ExportStats,
}

/// The queue shared by the drain loop (producer) and the exporter thread.
pub struct ExportQueue {
    inner: Mutex<Inner>,
    wake: Condvar,
    cap: usize,
    stop: AtomicBool,
}

impl std::fmt::Debug for ExportQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportQueue")
            .field("cap", &self.cap)
            .field("stats", &self.stats())
            .finish()
    }
}

impl ExportQueue {
    /// A queue holding at most `cap` records.
    pub fn new(cap: u32) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                in_flight: 0,
                stats: ExportStats::default(),
            }),
            wake: Condvar::new(),
            cap: cap.max(1) as usize,
            stop: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues records, dropping (and counting) the oldest past the bound.
    pub fn push(&self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        let mut g = self.lock();
        for r in records {
            if g.queue.len() >= self.cap {
                g.queue.pop_front();
                g.stats.dropped += 1;
            }
            g.queue.push_back(r);
        }
        drop(g);
        self.wake.notify_one();
    }

    /// Totals (with `pending` filled in).
    pub fn stats(&self) -> ExportStats {
        let g = self.lock();
        let mut s = g.stats;
        s.pending = g.queue.len() as u64 + g.in_flight;
        s
    }

    /// Asks the exporter thread to finish (one last attempt is made).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_all();
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Waits up to `timeout` for records; takes at most `max` of them (in flight).
    fn take(&self, max: usize, timeout: Duration) -> Vec<Record> {
        let mut g = self.lock();
        if g.queue.is_empty() && !self.stopping() {
            g = self
                .wake
                .wait_timeout(g, timeout)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let n = g.queue.len().min(max);
        let batch: Vec<Record> = g.queue.drain(..n).collect();
        g.in_flight = batch.len() as u64;
        batch
    }

    /// Puts records back at the front (a failed exchange), oldest first, dropping what
    /// no longer fits.
    fn put_back(&self, records: Vec<Record>) {
        let mut g = self.lock();
        g.in_flight = 0;
        for r in records.into_iter().rev() {
            if g.queue.len() >= self.cap {
                g.stats.dropped += 1;
                continue;
            }
            g.queue.push_front(r);
        }
    }

    /// Sleeps up to `d`, waking early when stopped or when records arrive.
    fn pause(&self, d: Duration) {
        let g = self.lock();
        if self.stopping() {
            return;
        }
        drop(
            self.wake
                .wait_timeout(g, d)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0),
        );
    }

    fn update(&self, f: impl FnOnce(&mut ExportStats)) {
        let mut g = self.lock();
        f(&mut g.stats);
    }

    fn done(&self, retry: Vec<Record>) {
        let mut g = self.lock();
        g.in_flight = 0;
        for r in retry {
            if g.queue.len() >= self.cap {
                g.stats.dropped += 1;
                continue;
            }
            g.queue.push_back(r);
        }
    }
}

/// Runs the exporter until [`ExportQueue::stop`]: the start handshake, then batches.
pub fn run(
    queue: Arc<ExportQueue>,
    mut sink: Box<dyn Sink>,
    instance: String,
    batch: usize,
    retry: Duration,
) {
    // `push` and `stop` notify the queue's condition variable, so this timeout is only a
    // backstop: an idle exporter sleeps until there is something to send.
    let poll = Duration::from_secs(10);
    // The start handshake: append the marker, read it back.
    let marker = schema::start_record(&instance);
    let mut appended = false;
    while !queue.stopping() {
        if !appended {
            match sink.append(std::slice::from_ref(&marker)) {
                Ok(d) if d.first() == Some(&Delivery::Stored) => appended = true,
                Ok(_) | Err(_) => queue.update(|s| s.failures += 1),
            }
        }
        if appended {
            match sink.count_matching("instance", &instance) {
                Ok(n) if n > 0 => {
                    queue.update(|s| s.ready = true);
                    break;
                }
                Ok(_) | Err(_) => queue.update(|s| s.failures += 1),
            }
        }
        queue.pause(retry);
    }

    loop {
        let stopping = queue.stopping();
        let records = queue.take(batch, poll);
        if records.is_empty() {
            if stopping {
                return;
            }
            continue;
        }
        match sink.append(&records) {
            Ok(deliveries) => {
                let mut retry_records = Vec::new();
                let (mut stored, mut refused) = (0, 0);
                for (r, d) in records
                    .into_iter()
                    .zip(deliveries.iter().chain(std::iter::repeat(&Delivery::Retry)))
                {
                    match d {
                        Delivery::Stored => stored += 1,
                        Delivery::Refused => refused += 1,
                        Delivery::Retry => retry_records.push(r),
                    }
                }
                let retried = retry_records.len() as u64;
                queue.update(|s| {
                    s.stored += stored;
                    s.refused += refused;
                    s.retried += retried;
                    s.batches += 1;
                });
                queue.done(retry_records);
                if retried > 0 && !stopping {
                    queue.pause(retry);
                }
            }
            Err(_) => {
                queue.update(|s| s.failures += 1);
                queue.put_back(records);
                if stopping {
                    return;
                }
                queue.pause(retry);
            }
        }
        if stopping && queue.stats().pending == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::MemorySink;
    use logd::Level;

    fn rec(i: u32) -> Record {
        Record::new(Level::Info, "metrics", "x").field("i", i.to_string())
    }

    #[test]
    fn failures_are_retried_and_only_acknowledged_records_count() {
        let sink = MemorySink::new();
        sink.state().fail_appends = 3; // the marker's first attempts fail
        let q = ExportQueue::new(100);
        let (q2, s2) = (q.clone(), sink.clone());
        let t = std::thread::spawn(move || {
            run(
                q2,
                Box::new(s2),
                "test-1".into(),
                2,
                Duration::from_millis(1),
            )
        });
        q.push((0..5).map(rec).collect());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while q.stats().stored < 5 {
            assert!(
                std::time::Instant::now() < deadline,
                "watchdog: {:?}",
                q.stats()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        sink.state().fail_appends = 1;
        sink.state().retry_records = 1;
        q.push(vec![rec(5), rec(6)]);
        while q.stats().stored < 7 {
            assert!(
                std::time::Instant::now() < deadline,
                "watchdog: {:?}",
                q.stats()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        q.stop();
        t.join().expect("exporter thread");
        let st = q.stats();
        assert!(st.ready);
        assert_eq!(
            (st.stored, st.failures, st.retried, st.dropped),
            (7, 4, 1, 0)
        );
        let stored: Vec<String> = sink
            .state()
            .records
            .iter()
            .filter_map(|r| r.get("i").map(str::to_owned))
            .collect();
        let mut sorted = stored.clone();
        sorted.sort();
        assert_eq!(sorted, ["0", "1", "2", "3", "4", "5", "6"], "each once");
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_them() {
        let q = ExportQueue::new(3);
        q.push((0..5).map(rec).collect());
        let st = q.stats();
        assert_eq!((st.dropped, st.pending), (2, 3));
        let taken = q.take(10, Duration::ZERO);
        assert_eq!(taken[0].get("i"), Some("2"));
    }
}
