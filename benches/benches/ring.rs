//! The ring benchmarks, every contender in the same run:
//!
//! - `ring_producer`: producer cost per record with a consumer draining on the other
//!   core: our `Writer` (single push, `stage` x 64 + `flush`, `push_all` of 64,
//!   `push_with` of 64) against
//!   rtrb (`push`, `write_chunk_uninit`, `write_chunk`) and crossbeam-queue `ArrayQueue`.
//!   Timed as [`Mode::Bursts`]: the producer's own time for bursts into a ring with room,
//!   while the consumer drains them.
//! - `ring_thread_to_thread`: end-to-end records/s, thread to thread ([`Mode::Sustained`]).
//! - `ring_process_to_process`: end-to-end records/s from a child process through a
//!   memfd ring, and the design the ring replaces: one `UnixDatagram` send per record.
//! - `record_size`: 16, 32, 64 and 128-byte records through one protocol, for the ABI's
//!   choice of a 32-byte record.
//!
//! Every contender's producer loop is inlined into its producer closure (ours are passed
//! as generic functions, not function pointers), so all pay the same call structure.
//!
//! Run with `cargo bench -p telemetry-benches --bench ring`; the results are in
//! `benches/README.md`.
//!
//! After criterion, a plain full run (no arguments) prints an interleaved pass: every
//! thread-to-thread contender again, one run each per round for 201 rounds, order
//! rotated, so that all see the same machine, with each contender's per-round ratio to
//! the rtrb peer the issue names (median, its 95 % confidence interval, and the rounds
//! it was below the peer); then the record sizes (see [`interleaved`]).
//! `TELEMETRY_BENCH_INTERLEAVED=1 cargo bench -p telemetry-benches --bench ring -- none`
//! runs only that pass (about a minute); `TELEMETRY_BENCH_ROUNDS` changes its rounds.
//!
//! Every ring holds 4096 records. In [`Mode::Sustained`] the producer retries on a full
//! ring (spinning), so the number is a sustained rate: the rate of the slower side. The
//! producer runs on CPU 0 and the consumer on CPU 1 (pinned unless
//! `TELEMETRY_BENCH_NO_PIN` is set). Sustained samples are timed by bursts of 16 Ki
//! records, median burst (see [`Clock`]); `TELEMETRY_BENCH_WHOLE=1` times them first
//! record to last instead, and `TELEMETRY_BENCH_VERBOSE=1` prints each sample's burst
//! quantiles.
//!
//! The binary is its own child process: the process-to-process benches re-execute it
//! with `TELEMETRY_BENCH_RING_CHILD` set, and `main` then acts as the producer process
//! instead of starting criterion. The child's stdin is a Unix stream socket; the parent
//! hands it the memfd (or the datagram socket) over it with SCM_RIGHTS, as metricsd
//! grants a ring, then sends it commands.

use std::hint::{black_box, spin_loop};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group};
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
use rtrb::{PushError, RingBuffer};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use telemetry_abi::{Geometry, Record};
use telemetry_benches::{
    CONSUMER_CPU, NO_PIN_ENV, PRODUCER_CPU, interleave, paired, pin, summary, want_interleaved,
};
use telemetry_ring::{HeapRegion, MemfdRegion, Reader, Region, Writer};
use zerocopy::{FromBytes, IntoBytes};

/// Records per ring, for every contender.
const CAPACITY: usize = 4096;
/// Records per batch on the batch paths.
const BATCH: usize = 64;
/// Set in the environment of the re-executed bench binary: it is the child producer.
const CHILD_ENV: &str = "TELEMETRY_BENCH_RING_CHILD";

/// The record every contender moves: the ABI's 32-byte record, its sequence number in
/// `words[0]`.
#[inline(always)]
fn record(seq: u64) -> Record {
    Record::counter(1, seq)
}

/// What a consumer takes from a record: its sequence number if the record is whole
/// (every field exactly as [`record`] wrote it), else `u64::MAX`, which breaks the
/// consumers' sum check. So every consumer reads each record in full, as a real one
/// (metricsd) must, and all do the same work: a consumer summing `words[0]` alone
/// reads 8 of a peer's 32 bytes per record (the compiler drops the rest), while our
/// `Reader` copies each record out whole to check its kind, and that difference moves
/// rtrb `push`'s producer cost on this machine (`benches/README.md` as of commit a8cb4ac,
/// "Runs 1 to 3").
#[inline(always)]
fn seq_of(r: &Record) -> u64 {
    let seq = r.words[0];
    // Word by word, in registers: the derived `==` goes through the stack with mixed
    // widths, and its store-forwarding stalls would set both consumers' pace.
    let got: [u64; 4] = zerocopy::transmute!(*r);
    let want: [u64; 4] = zerocopy::transmute!(record(seq));
    let diff = got
        .iter()
        .zip(want)
        .fold(0, |diff, (got, want)| diff | (got ^ want));
    if diff == 0 { seq } else { u64::MAX }
}

/// The sum of the sequence numbers `0..n`, which the consumer must have seen.
fn expected_sum(n: u64) -> u64 {
    (0..n).fold(0u64, u64::wrapping_add)
}

// --- Thread to thread ----------------------------------------------------------------

/// Records per burst: the clocks below take a timestamp each time this many more
/// records have been written (or read).
const BURST: u64 = 16 * 1024;

/// Set in the environment to time each sample as a whole instead of by bursts.
const WHOLE_ENV: &str = "TELEMETRY_BENCH_WHOLE";

/// Set in the environment to print each sample's burst quantiles to stderr.
const VERBOSE_ENV: &str = "TELEMETRY_BENCH_VERBOSE";

/// Timestamps a run every [`BURST`] records, so that a sample can be measured two ways:
///
/// - by bursts (the default): the median time per record over the sample's bursts,
///   times the records in the sample. On a shared machine either thread of a pair is
///   regularly descheduled for a few milliseconds; during that time the other side
///   fills (or empties) the ring in microseconds and then waits, so a whole-sample time
///   measures the scheduler's co-scheduling of two spinning threads, not the ring. A
///   burst is 16 Ki records (tens of microseconds for a ring, far below a scheduling
///   slice), so most bursts run with both sides on CPU and the median is their rate;
/// - as a whole (`TELEMETRY_BENCH_WHOLE=1`): first record to last. On an idle machine
///   the two agree.
///
/// The consumer's clock also publishes its count of records read (see [`Mode::Bursts`]).
struct Clock {
    marks: Vec<(u64, Instant)>,
    next: u64,
    progress: Option<Arc<CachePadded<AtomicU64>>>,
}

impl Clock {
    /// A clock for a run of `n` records (allocates its marks up front) that, if given
    /// `progress`, stores every count it is ticked with there.
    fn new(n: u64, progress: Option<Arc<CachePadded<AtomicU64>>>) -> Self {
        Self {
            marks: Vec::with_capacity(usize::try_from(n / BURST + 2).unwrap_or(0)),
            next: BURST,
            progress,
        }
    }

    /// Notes that `done` records are through; timestamps when a burst is complete.
    #[inline(always)]
    fn tick(&mut self, done: u64) {
        if let Some(progress) = &self.progress {
            progress.store(done, Ordering::Release);
        }
        if done >= self.next {
            self.mark(done);
        }
    }

    #[cold]
    #[inline(never)]
    fn mark(&mut self, done: u64) {
        self.marks.push((done, Instant::now()));
        self.next = (done / BURST + 1) * BURST;
    }

    /// Timestamps the end of the run at `done` records (unless a tick just did).
    fn stop(&mut self, done: u64) {
        if self.marks.last().is_none_or(|&(last, _)| last != done) {
            self.marks.push((done, Instant::now()));
        }
    }

    /// The sample's time for `n` records from `start`: by bursts, or as a whole.
    fn measure(&self, start: Instant, n: u64) -> Duration {
        let whole = self
            .marks
            .last()
            .map_or(Duration::ZERO, |&(_, end)| end.duration_since(start));
        if std::env::var_os(WHOLE_ENV).is_some() {
            return whole;
        }
        let mut per_record: Vec<f64> = Vec::with_capacity(self.marks.len());
        let mut previous = (0, start);
        for &(done, at) in &self.marks {
            let records = done - previous.0;
            // Only full-size bursts: a consumer's last drain may be a short one.
            if records >= BURST / 2 {
                per_record.push(at.duration_since(previous.1).as_secs_f64() / records as f64);
            }
            previous = (done, at);
        }
        if per_record.len() < 3 {
            return whole;
        }
        per_record.sort_by(f64::total_cmp);
        if std::env::var_os(VERBOSE_ENV).is_some() {
            let ns = |q: f64| per_record[((per_record.len() - 1) as f64 * q) as usize] * 1e9;
            let whole = whole.as_secs_f64() * 1e9 / n as f64;
            eprintln!(
                "  {} bursts, ns/record p10 {:.1} p50 {:.1} p90 {:.1}; whole sample {whole:.1}",
                per_record.len(),
                ns(0.1),
                ns(0.5),
                ns(0.9),
            );
        }
        Duration::from_secs_f64(per_record[per_record.len() / 2] * n as f64)
    }
}

/// What one sample measured.
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// [`Mode::Sustained`]: until the producer has written (and published) its last
    /// record. [`Mode::Bursts`]: the producer's own time (see there).
    producer: Duration,
    /// Until the consumer has read the last record ([`Mode::Sustained`] only; in
    /// [`Mode::Bursts`] it includes the producer's pauses).
    end_to_end: Duration,
}

/// Records per timed burst in [`Mode::Bursts`]: a quarter of the ring, so a burst
/// started on an empty ring never finds it full.
const PRODUCER_BURST: u64 = CAPACITY as u64 / 4;

/// How a pair runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The producer writes without pause and waits out a full ring: both sides at
    /// full speed, so the rate is the slower side's. This is the end-to-end throughput.
    Sustained,
    /// The producer's cost per record: it waits (untimed) until the consumer has read
    /// everything, then times a burst of [`PRODUCER_BURST`] records while the consumer
    /// drains them concurrently on the other core. A burst never finds the ring full,
    /// so the consumer's speed does not set the figure, only the producer's own work and
    /// the cache-line traffic the consumer's draining causes it. The sample is the
    /// median burst's time per record, times the records in the sample.
    Bursts,
}

/// Runs `consume` on the consumer CPU and, once it is running, `produce` on this thread
/// on the producer CPU, one burst at a time (`produce(first, count)` writes the records
/// `first..first + count`), as `mode` says. Checks that the consumer saw exactly the
/// records `0..n`.
fn run_pair(
    name: &str,
    n: u64,
    mode: Mode,
    mut produce: impl FnMut(u64, u64),
    consume: impl FnOnce(u64, &mut Clock) -> u64 + Send,
) -> Timing {
    let ready = AtomicBool::new(false);
    let progress = Arc::new(CachePadded::new(AtomicU64::new(0)));
    let (start, producer, consumer, sum) = std::thread::scope(|s| {
        let ready = &ready;
        // Only the bursts need the consumer's count; a sustained run's consumer does
        // not publish it.
        let consumer_progress = (mode == Mode::Bursts).then(|| Arc::clone(&progress));
        let consumer = s.spawn(move || {
            pin(CONSUMER_CPU);
            let mut clock = Clock::new(n, consumer_progress);
            ready.store(true, Ordering::Release);
            let sum = consume(n, &mut clock);
            clock.stop(n);
            (sum, clock)
        });
        pin(PRODUCER_CPU);
        let mut clock = Clock::new(n, None);
        while !ready.load(Ordering::Acquire) {
            spin_loop();
        }
        let start = Instant::now();
        let mut first = 0;
        let producer = match mode {
            Mode::Sustained => {
                while first < n {
                    let count = BURST.min(n - first);
                    produce(first, count);
                    first += count;
                    clock.tick(first);
                }
                clock.stop(n);
                clock.measure(start, n)
            }
            Mode::Bursts => {
                let mut per_record = Vec::with_capacity((n / PRODUCER_BURST + 1) as usize);
                while first < n {
                    let count = PRODUCER_BURST.min(n - first);
                    while progress.load(Ordering::Acquire) != first {
                        spin_loop();
                    }
                    let began = Instant::now();
                    produce(first, count);
                    per_record.push(began.elapsed().as_secs_f64() / count as f64);
                    first += count;
                }
                per_record.sort_by(f64::total_cmp);
                per_record
                    .get(per_record.len() / 2)
                    .map_or(Duration::ZERO, |median| {
                        Duration::from_secs_f64(median * n as f64)
                    })
            }
        };
        let (sum, consumer) = consumer.join().expect("the consumer thread panicked");
        (start, producer, consumer, sum)
    });
    assert_eq!(sum, expected_sum(n), "{name}: records lost or duplicated");
    Timing {
        producer,
        end_to_end: consumer.measure(start, n),
    }
}

/// Drains `n` records from our ring, returning the sum of their sequence numbers.
fn drain_ours<R: Region>(reader: &mut Reader<R>, n: u64, clock: &mut Clock) -> u64 {
    let mut sum = 0u64;
    let mut got = 0;
    while got < n {
        let drained = reader
            .drain(CAPACITY as u64, |r| sum = sum.wrapping_add(seq_of(&r)))
            .expect("the bench's writer never breaks the protocol");
        if drained.consumed == 0 {
            spin_loop();
            continue;
        }
        got += drained.consumed;
        clock.tick(got);
    }
    sum
}

/// Waits until the writer has room for `n` records and returns how many it has. The
/// batch paths call this only when their own count of room runs out, so the consumer's
/// line is read as rarely as the writer's cached read position would read it.
fn wait_room<R: Region>(writer: &mut Writer<R>, n: u64) -> u64 {
    loop {
        let free = writer.free();
        if free >= n {
            return free;
        }
        spin_loop();
    }
}

/// Our single-record path: `try_push` (a full ring is waited out, not counted as a
/// loss; its success path is `push`'s), one Release store per record.
#[inline(always)]
fn ours_push<R: Region>(writer: &mut Writer<R>, first: u64, n: u64) {
    for seq in first..first + n {
        while writer.try_push(record(seq)).is_err() {
            spin_loop();
        }
    }
}

/// Our batch path: `stage` each record, `flush` (one Release store) every `BATCH`.
#[inline(always)]
fn ours_stage_flush<R: Region>(writer: &mut Writer<R>, first: u64, n: u64) {
    let mut room = 0u64;
    for (i, seq) in (first..first + n).enumerate() {
        if room == 0 {
            room = wait_room(writer, 1);
        }
        // Room was seen above, so this never fails (the sum check would catch it).
        let _ = writer.stage(record(seq));
        room -= 1;
        if i % BATCH == BATCH - 1 {
            writer.flush();
        }
    }
    writer.flush();
}

/// Our all-or-nothing batch path: `push_all` of `BATCH` records built on the stack.
#[inline(always)]
fn ours_push_all<R: Region>(writer: &mut Writer<R>, first: u64, n: u64) {
    let mut batch = [Record::default(); BATCH];
    let mut room = 0u64;
    let mut seq = first;
    while seq < first + n {
        let len = (BATCH as u64).min(first + n - seq);
        for (i, slot) in batch[..len as usize].iter_mut().enumerate() {
            *slot = record(seq + i as u64);
        }
        if room < len {
            room = wait_room(writer, len);
        }
        let _ = writer.push_all(&batch[..len as usize]);
        room -= len;
        seq += len;
    }
}

/// Our closure batch path: `push_with` of `BATCH` records, each built straight into its
/// slot, as rtrb's `write_chunk_uninit` + `fill_from_iter` does.
#[inline(always)]
fn ours_push_with<R: Region>(writer: &mut Writer<R>, first: u64, n: u64) {
    let mut room = 0u64;
    let mut seq = first;
    while seq < first + n {
        let len = (BATCH as u64).min(first + n - seq);
        if room < len {
            room = wait_room(writer, len);
        }
        let base = seq;
        let _ = writer.push_with(len, |i| record(base + i));
        room -= len;
        seq += len;
    }
}

fn heap_ring() -> (Writer<Arc<HeapRegion>>, Reader<Arc<HeapRegion>>) {
    let region = Arc::new(HeapRegion::new(CAPACITY as u64).expect("a valid capacity"));
    (Writer::new(Arc::clone(&region)), Reader::new(region))
}

/// Runs one of our producer paths against our reader. `produce` is a generic function,
/// not a function pointer, and `#[inline(always)]`, so that its loop is inlined into
/// the producer's closure as the peers' loops are (a call through a pointer keeps the
/// writer's fields in memory, which costs a store per record that the peers do not
/// pay).
fn ours_heap(
    name: &str,
    n: u64,
    mode: Mode,
    produce: impl Fn(&mut Writer<Arc<HeapRegion>>, u64, u64),
) -> Timing {
    let (mut writer, mut reader) = heap_ring();
    run_pair(
        name,
        n,
        mode,
        |first, count| produce(&mut writer, first, count),
        move |n, clock| drain_ours(&mut reader, n, clock),
    )
}

fn memfd_ring() -> MemfdRegion {
    let geometry = Geometry::new(CAPACITY as u64).expect("a valid capacity");
    MemfdRegion::create("telemetry-bench", geometry, 1).expect("a memfd ring")
}

/// rtrb's consumer at its best: every readable slot as one chunk, one commit.
fn drain_rtrb(consumer: &mut rtrb::Consumer<Record>, n: u64, clock: &mut Clock) -> u64 {
    let mut sum = 0u64;
    let mut got = 0;
    while got < n {
        let available = consumer.slots();
        if available == 0 {
            spin_loop();
            continue;
        }
        if let Ok(chunk) = consumer.read_chunk(available) {
            for r in chunk {
                sum = sum.wrapping_add(seq_of(&r));
            }
            got += available as u64;
            clock.tick(got);
        }
    }
    sum
}

fn rtrb_push(n: u64, mode: Mode) -> Timing {
    let (mut producer, mut consumer) = RingBuffer::<Record>::new(CAPACITY);
    let produce = |first: u64, count: u64| {
        for seq in first..first + count {
            let mut r = record(seq);
            while let Err(PushError::Full(back)) = producer.push(r) {
                r = back;
                spin_loop();
            }
        }
    };
    run_pair("rtrb/push", n, mode, produce, move |n, clock| {
        drain_rtrb(&mut consumer, n, clock)
    })
}

fn rtrb_write_chunk_uninit(n: u64, mode: Mode) -> Timing {
    let (mut producer, mut consumer) = RingBuffer::<Record>::new(CAPACITY);
    let produce = |first: u64, count: u64| {
        let mut seq = first;
        while seq < first + count {
            let len = (BATCH as u64).min(first + count - seq);
            match producer.write_chunk_uninit(len as usize) {
                Ok(chunk) => {
                    chunk.fill_from_iter((seq..).map(record));
                    seq += len;
                }
                Err(_) => spin_loop(),
            }
        }
    };
    run_pair(
        "rtrb/write_chunk_uninit",
        n,
        mode,
        produce,
        move |n, clock| drain_rtrb(&mut consumer, n, clock),
    )
}

fn rtrb_write_chunk(n: u64, mode: Mode) -> Timing {
    let (mut producer, mut consumer) = RingBuffer::<Record>::new(CAPACITY);
    let produce = |first: u64, count: u64| {
        let mut seq = first;
        while seq < first + count {
            let len = (BATCH as u64).min(first + count - seq);
            match producer.write_chunk(len as usize) {
                Ok(mut chunk) => {
                    let (head, tail) = chunk.as_mut_slices();
                    for (i, slot) in head.iter_mut().chain(tail).enumerate() {
                        *slot = record(seq + i as u64);
                    }
                    chunk.commit_all();
                    seq += len;
                }
                Err(_) => spin_loop(),
            }
        }
    };
    run_pair("rtrb/write_chunk", n, mode, produce, move |n, clock| {
        drain_rtrb(&mut consumer, n, clock)
    })
}

fn crossbeam_push(n: u64, mode: Mode) -> Timing {
    let queue = ArrayQueue::<Record>::new(CAPACITY);
    let produce = |first: u64, count: u64| {
        for seq in first..first + count {
            let mut r = record(seq);
            while let Err(back) = queue.push(r) {
                r = back;
                spin_loop();
            }
        }
    };
    let consume = |n: u64, clock: &mut Clock| {
        let mut sum = 0u64;
        let mut got = 0;
        while got < n {
            // Pop until empty, then tick once, as the other consumers tick once a drain.
            let before = got;
            while let Some(r) = queue.pop() {
                sum = sum.wrapping_add(seq_of(&r));
                got += 1;
            }
            if got == before {
                spin_loop();
            } else {
                clock.tick(got);
            }
        }
        sum
    };
    run_pair("crossbeam/ArrayQueue::push", n, mode, produce, consume)
}

/// A thread-to-thread contender: moves `n` records through a fresh ring.
type Contender = (&'static str, fn(u64, Mode) -> Timing);

fn ours_heap_push(n: u64, mode: Mode) -> Timing {
    ours_heap("ours/push", n, mode, ours_push)
}

fn ours_heap_stage_flush(n: u64, mode: Mode) -> Timing {
    ours_heap("ours/stage_flush_64", n, mode, ours_stage_flush)
}

fn ours_heap_push_all(n: u64, mode: Mode) -> Timing {
    ours_heap("ours/push_all_64", n, mode, ours_push_all)
}

fn ours_heap_push_with(n: u64, mode: Mode) -> Timing {
    ours_heap("ours/push_with_64", n, mode, ours_push_with)
}

/// The producer-cost contenders, in the order they run.
const PRODUCER_CONTENDERS: [Contender; 8] = [
    ("ours/push", ours_heap_push),
    ("ours/stage_flush_64", ours_heap_stage_flush),
    ("ours/push_all_64", ours_heap_push_all),
    ("ours/push_with_64", ours_heap_push_with),
    ("rtrb/push", rtrb_push),
    ("rtrb/write_chunk_uninit_64", rtrb_write_chunk_uninit),
    ("rtrb/write_chunk_64", rtrb_write_chunk),
    ("crossbeam/ArrayQueue_push", crossbeam_push),
];

/// The end-to-end contenders (thread to thread).
const END_TO_END_CONTENDERS: [Contender; 7] = [
    ("ours/push", ours_heap_push),
    ("ours/stage_flush_64", ours_heap_stage_flush),
    ("ours/push_all_64", ours_heap_push_all),
    ("ours/push_with_64", ours_heap_push_with),
    ("rtrb/push", rtrb_push),
    ("rtrb/write_chunk_uninit_64", rtrb_write_chunk_uninit),
    ("rtrb/write_chunk_64", rtrb_write_chunk),
];

fn producer_cost(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring_producer");
    configure(&mut group);
    for (name, run) in PRODUCER_CONTENDERS {
        group.bench_function(name, |b| b.iter_custom(|n| run(n, Mode::Bursts).producer));
    }
    group.finish();
}

fn thread_to_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring_thread_to_thread");
    configure(&mut group);
    group.throughput(Throughput::Elements(1));
    for (name, run) in END_TO_END_CONTENDERS {
        group.bench_function(name, |b| {
            b.iter_custom(|n| run(n, Mode::Sustained).end_to_end)
        });
    }
    group.finish();
}

// --- Process to process --------------------------------------------------------------

/// Child modes, the first byte the child receives (with the fd).
const MODE_RING: u8 = 1;
const MODE_DATAGRAM: u8 = 2;
/// Child commands: `[op, n]` as two little-endian `u64`s.
const OP_EXIT: u64 = 0;
const OP_PUSH: u64 = 1;
const OP_BATCH: u64 = 2;
/// How long the parent waits on the child before declaring it stuck.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends one mode byte with `fd` attached.
fn send_fd(socket: &UnixStream, mode: u8, fd: BorrowedFd<'_>) -> io::Result<()> {
    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("SCM_RIGHTS does not fit its buffer"));
    }
    rustix::net::sendmsg(
        socket,
        &[IoSlice::new(&[mode])],
        &mut control,
        SendFlags::empty(),
    )?;
    Ok(())
}

/// Receives one mode byte and the fd attached to it.
fn receive_fd(socket: &UnixStream) -> io::Result<(u8, OwnedFd)> {
    let mut mode = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(&mut mode)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    if received.bytes != 1 {
        return Err(io::Error::other("the parent sent no mode byte"));
    }
    let fd = control.drain().find_map(|message| match message {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    });
    let fd = fd.ok_or_else(|| io::Error::other("the parent sent no fd"))?;
    Ok((mode[0], fd))
}

/// The child producer process, killed when dropped.
struct ChildProducer {
    child: Child,
    control: UnixStream,
}

impl ChildProducer {
    /// Re-executes this binary as a child producer and hands it `fd` for `mode`.
    fn spawn(mode: u8, fd: BorrowedFd<'_>) -> io::Result<Self> {
        let (control, child_end) = UnixStream::pair()?;
        let child = Command::new(std::env::current_exe()?)
            .env(CHILD_ENV, "1")
            .stdin(Stdio::from(OwnedFd::from(child_end)))
            .stdout(Stdio::null())
            .spawn()?;
        control.set_read_timeout(Some(CHILD_TIMEOUT))?;
        let producer = Self { child, control };
        send_fd(&producer.control, mode, fd)?;
        Ok(producer)
    }

    /// Tells the child to write `n` records with `op`.
    fn command(&mut self, op: u64, n: u64) {
        let mut message = [0u8; 16];
        message[..8].copy_from_slice(&op.to_le_bytes());
        message[8..].copy_from_slice(&n.to_le_bytes());
        self.control
            .write_all(&message)
            .expect("the child producer is gone");
    }

    /// Waits for the child to report the command done.
    fn wait_done(&mut self) {
        let mut done = [0u8; 8];
        self.control
            .read_exact(&mut done)
            .expect("the child producer did not finish its command");
    }

    /// Panics if the child has exited (called while waiting for its records).
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the child producer exited early: {status}");
        }
    }
}

impl Drop for ChildProducer {
    fn drop(&mut self) {
        let mut message = [0u8; 16];
        message[..8].copy_from_slice(&OP_EXIT.to_le_bytes());
        let _ = self.control.write_all(&message);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parent side of the ring benches: a child writes through a memfd ring the parent
/// created and handed it; the parent drains and checks every sequence number.
fn process_ring(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, op: u64) {
    let region = memfd_ring();
    let mut reader = Reader::new(&region);
    let mut child = ChildProducer::spawn(MODE_RING, region.fd()).expect("spawn the child");
    let mut next = 0u64;
    group.bench_function(name, |b| {
        b.iter_custom(|n| {
            pin(CONSUMER_CPU);
            let mut bad = 0u64;
            let mut got = 0;
            let mut idle = 0u32;
            let mut clock = Clock::new(n, None);
            let start = Instant::now();
            child.command(op, n);
            while got < n {
                let drained = reader
                    .drain(CAPACITY as u64, |r| {
                        bad += u64::from(seq_of(&r) != next);
                        next = next.wrapping_add(1);
                    })
                    .expect("the child never breaks the protocol");
                got += drained.consumed;
                clock.tick(got);
                if drained.consumed == 0 {
                    spin_loop();
                    idle += 1;
                    if idle % (1 << 20) == 0 {
                        child.check_alive();
                    }
                }
            }
            clock.stop(n);
            child.wait_done();
            assert_eq!((bad, got), (0, n), "{name}: records out of sequence");
            clock.measure(start, n)
        });
    });
}

/// The design the ring replaces: one datagram per record between two processes.
fn process_datagram(group: &mut BenchmarkGroup<'_, WallTime>, name: &str) {
    let (ours, theirs) = UnixDatagram::pair().expect("a datagram socket pair");
    ours.set_read_timeout(Some(CHILD_TIMEOUT))
        .expect("a read timeout");
    let mut child = ChildProducer::spawn(MODE_DATAGRAM, theirs.as_fd()).expect("spawn the child");
    drop(theirs);
    let mut next = 0u64;
    group.bench_function(name, |b| {
        b.iter_custom(|n| {
            pin(CONSUMER_CPU);
            let mut buf = [0u8; 64];
            let mut bad = 0u64;
            let mut clock = Clock::new(n, None);
            let start = Instant::now();
            child.command(OP_PUSH, n);
            for got in 1..=n {
                let len = ours.recv(&mut buf).expect("a datagram from the child");
                let seq = Record::read_from_bytes(&buf[..len]).map_or(u64::MAX, |r| seq_of(&r));
                bad += u64::from(seq != next);
                next = next.wrapping_add(1);
                clock.tick(got);
            }
            clock.stop(n);
            child.wait_done();
            assert_eq!(bad, 0, "{name}: datagrams out of sequence");
            clock.measure(start, n)
        });
    });
}

fn process_to_process(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring_process_to_process");
    configure(&mut group);
    group.throughput(Throughput::Elements(1));
    process_ring(&mut group, "ours_memfd/push", OP_PUSH);
    process_ring(&mut group, "ours_memfd/stage_flush_64", OP_BATCH);
    process_datagram(&mut group, "unix_datagram/send_per_record");
    group.finish();
}

/// The child producer: attaches what the parent handed over and writes records on
/// command until told to exit (or the parent dies: PDEATHSIG).
fn child_main() -> io::Result<()> {
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    pin(PRODUCER_CPU);
    let mut control = UnixStream::from(io::stdin().as_fd().try_clone_to_owned()?);
    let (mode, fd) = receive_fd(&control)?;
    let mut ring = None;
    let mut datagram = None;
    match mode {
        MODE_RING => {
            let region = MemfdRegion::attach(fd).map_err(io::Error::other)?;
            ring = Some(Writer::new(region));
        }
        MODE_DATAGRAM => datagram = Some(UnixDatagram::from(fd)),
        _ => return Err(io::Error::other(format!("unknown mode {mode}"))),
    }
    let mut seq = 0u64;
    loop {
        let mut message = [0u8; 16];
        control.read_exact(&mut message)?;
        let [op, n] =
            <[u64; 2]>::read_from_bytes(&message).map_err(|_| io::ErrorKind::InvalidData)?;
        let (op, n) = (u64::from_le(op), u64::from_le(n));
        match (op, &mut ring, &datagram) {
            (OP_EXIT, ..) => return Ok(()),
            (OP_PUSH, Some(writer), _) => ours_push(writer, seq, n),
            (OP_BATCH, Some(writer), _) => ours_stage_flush(writer, seq, n),
            (OP_PUSH, None, Some(socket)) => {
                for s in seq..seq + n {
                    socket.send(record(s).as_bytes())?;
                }
            }
            _ => return Err(io::Error::other(format!("unknown command {op}"))),
        }
        seq += n;
        control.write_all(&[1u8; 8])?;
    }
}

// --- Record size ---------------------------------------------------------------------

/// One cache line of ring words.
#[repr(C, align(64))]
struct Line([AtomicU64; 8]);

/// A word alone on its own pair of lines (the adjacent-line prefetcher pulls pairs).
#[repr(C, align(128))]
struct Padded(AtomicU64);

/// A minimal copy of the ring protocol for records of `W` words: slots written and read
/// word by word with Relaxed atomics (as `MappedRegion` reads shared memory), the
/// write position published with Release, the read position cached by the writer and
/// reloaded only when the ring looks full, the reader releasing slots once per drain.
/// Bench-only; it exists so the record size can vary.
struct WordRing<const W: usize> {
    write: Padded,
    read: Padded,
    lines: Box<[Line]>,
}

impl<const W: usize> WordRing<W> {
    const MASK: u64 = CAPACITY as u64 - 1;

    fn new() -> Self {
        let lines = (0..CAPACITY * W / 8)
            .map(|_| Line(std::array::from_fn(|_| AtomicU64::new(0))))
            .collect();
        Self {
            write: Padded(AtomicU64::new(0)),
            read: Padded(AtomicU64::new(0)),
            lines,
        }
    }

    #[inline(always)]
    fn word(&self, index: usize) -> &AtomicU64 {
        &self.lines[index / 8].0[index % 8]
    }
}

struct WordWriter<'a, const W: usize> {
    ring: &'a WordRing<W>,
    write: u64,
    cached_read: u64,
}

impl<const W: usize> WordWriter<'_, W> {
    /// Writes one record, publishing it (and anything written before) if `publish`.
    #[inline(always)]
    fn try_push(&mut self, words: &[u64; W], publish: bool) -> bool {
        if self.write.wrapping_sub(self.cached_read) >= CAPACITY as u64 {
            self.cached_read = self.ring.read.0.load(Ordering::Acquire);
            if self.write.wrapping_sub(self.cached_read) >= CAPACITY as u64 {
                return false;
            }
        }
        let base = (self.write & WordRing::<W>::MASK) as usize * W;
        for (i, word) in words.iter().enumerate() {
            self.ring.word(base + i).store(*word, Ordering::Relaxed);
        }
        self.write = self.write.wrapping_add(1);
        if publish {
            self.flush();
        }
        true
    }

    #[inline(always)]
    fn flush(&mut self) {
        self.ring.write.0.store(self.write, Ordering::Release);
    }
}

fn drain_words<const W: usize>(ring: &WordRing<W>, n: u64, clock: &mut Clock) -> u64 {
    let mut read = 0u64;
    let mut sum = 0u64;
    while read < n {
        let write = ring.write.0.load(Ordering::Acquire);
        if write == read {
            spin_loop();
            continue;
        }
        for pos in read..write {
            let base = (pos & WordRing::<W>::MASK) as usize * W;
            let mut words = [0u64; W];
            for (i, word) in words.iter_mut().enumerate() {
                *word = ring.word(base + i).load(Ordering::Relaxed);
            }
            sum = sum.wrapping_add(black_box(words)[0]);
        }
        read = write;
        ring.read.0.store(read, Ordering::Release);
        clock.tick(read);
    }
    sum
}

/// Pushes `n` records of `W` words, publishing every `batch` records.
fn word_ring<const W: usize>(n: u64, batch: u64) -> Timing {
    let ring = WordRing::<W>::new();
    let mut writer = WordWriter {
        ring: &ring,
        write: 0,
        cached_read: 0,
    };
    let produce = |first: u64, count: u64| {
        for seq in first..first + count {
            let publish = seq % batch == batch - 1;
            while !writer.try_push(&[seq; W], publish) {
                spin_loop();
            }
        }
        writer.flush();
    };
    run_pair("record_size", n, Mode::Sustained, produce, |n, clock| {
        drain_words(&ring, n, clock)
    })
}

/// A record-size contender: its name, its bytes per record, and its run.
type SizeContender = (&'static str, u64, fn(u64) -> Timing);

/// The record-size contenders: each size published per record and per 64 records.
const SIZE_CONTENDERS: [SizeContender; 8] = [
    ("16B/push", 16, |n| word_ring::<2>(n, 1)),
    ("16B/batch_64", 16, |n| word_ring::<2>(n, BATCH as u64)),
    ("32B/push", 32, |n| word_ring::<4>(n, 1)),
    ("32B/batch_64", 32, |n| word_ring::<4>(n, BATCH as u64)),
    ("64B/push", 64, |n| word_ring::<8>(n, 1)),
    ("64B/batch_64", 64, |n| word_ring::<8>(n, BATCH as u64)),
    ("128B/push", 128, |n| word_ring::<16>(n, 1)),
    ("128B/batch_64", 128, |n| word_ring::<16>(n, BATCH as u64)),
];

fn record_size(c: &mut Criterion) {
    let mut group = c.benchmark_group("record_size");
    configure(&mut group);
    for (name, bytes, run) in SIZE_CONTENDERS {
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(name, |b| b.iter_custom(|n| run(n).producer));
    }
    group.finish();
}

// --- Interleaved ---------------------------------------------------------------------

/// Records per run in the interleaved pass.
const INTERLEAVED_RECORDS: u64 = 1 << 19;
/// Rounds of the interleaved pass's ring contenders, unless `TELEMETRY_BENCH_ROUNDS`
/// says otherwise: enough that the median per-round ratio's 95 % confidence interval
/// is a few percent wide on this VM.
const INTERLEAVED_ROUNDS: usize = 201;
/// Rounds of the interleaved pass's record sizes (their differences are large).
const SIZE_ROUNDS: usize = 15;
/// Set to a number of rounds for the interleaved pass's ring contenders.
const ROUNDS_ENV: &str = "TELEMETRY_BENCH_ROUNDS";

/// Criterion runs one benchmark after the other, and on a shared VM the cost of a
/// cache-line transfer between the two vCPUs drifts over seconds to minutes, so
/// contenders measured a minute apart may see different machines. This pass runs every
/// thread-to-thread contender once per round, in a rotated order, for
/// [`INTERLEAVED_ROUNDS`] rounds of [`INTERLEAVED_RECORDS`] records (once timed as
/// [`Mode::Bursts`], once as [`Mode::Sustained`]), so each sees the same mixture of
/// conditions; it prints median [min, max] per contender, and each contender's
/// per-round ratio to the peer the issue names ([`paired`]). Then the record sizes,
/// [`SIZE_ROUNDS`] rounds.
fn interleaved() {
    let ns = |d: Duration| d.as_secs_f64() * 1e9 / INTERLEAVED_RECORDS as f64;
    let rounds = match std::env::var(ROUNDS_ENV) {
        Ok(text) => match text.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!(
                    "ring bench: {ROUNDS_ENV}={text:?} is not a number of rounds (expected \
                     a positive integer); using {INTERLEAVED_ROUNDS}"
                );
                INTERLEAVED_ROUNDS
            }
        },
        Err(_) => INTERLEAVED_ROUNDS,
    };
    println!(
        "\ninterleaved: {rounds} rounds x {INTERLEAVED_RECORDS} records per contender, order \
         rotated each round; ns/record, median [min, max]"
    );
    let contenders: Vec<Contender> = PRODUCER_CONTENDERS.to_vec();
    let mut producer = vec![Vec::new(); contenders.len()];
    let mut end_to_end = vec![Vec::new(); contenders.len()];
    interleave("interleaved", rounds, contenders.len(), |i| {
        let run = contenders[i].1;
        producer[i].push(ns(run(INTERLEAVED_RECORDS, Mode::Bursts).producer));
        end_to_end[i].push(ns(run(INTERLEAVED_RECORDS, Mode::Sustained).end_to_end));
    });
    // Per-round ratios first: `summary` sorts the series in place.
    let position = |peer: &str| {
        contenders
            .iter()
            .position(|(name, _)| *name == peer)
            .expect("the peer is a contender")
    };
    let (push, chunk) = (
        position("rtrb/push"),
        position("rtrb/write_chunk_uninit_64"),
    );
    let producer_ratio: Vec<String> = (0..contenders.len())
        .map(|i| paired(&producer[i], &producer[push]))
        .collect();
    // Each path against rtrb's path of its kind: single pushes against `push`, batches
    // against rtrb's best batch path.
    let end_to_end_ratio: Vec<String> = (0..contenders.len())
        .map(|i| {
            let batch = contenders[i].0.contains("_64");
            let peer = if batch { chunk } else { push };
            paired(&end_to_end[i], &end_to_end[peer])
        })
        .collect();
    println!(
        "producer: Mode::Bursts; end-to-end: Mode::Sustained. Ratios are per round (the \
         two contenders ran a few milliseconds apart): median (its 95 % confidence \
         interval) [p25, p75], and the rounds in which the contender was below the peer; \
         below 1 is faster."
    );
    println!(
        "| contender | producer ns/record | producer / rtrb push | end-to-end ns/record \
         | end-to-end / rtrb peer (push for single pushes, write_chunk_uninit_64 for \
         batches) |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (i, (name, _)) in contenders.iter().enumerate() {
        println!(
            "| {name} | {} | {} | {} | {} |",
            summary(&mut producer[i]),
            producer_ratio[i],
            summary(&mut end_to_end[i]),
            end_to_end_ratio[i],
        );
    }

    let mut sizes = vec![Vec::new(); SIZE_CONTENDERS.len()];
    interleave(
        "interleaved record sizes",
        SIZE_ROUNDS,
        SIZE_CONTENDERS.len(),
        |i| {
            sizes[i].push(ns((SIZE_CONTENDERS[i].2)(INTERLEAVED_RECORDS).producer));
        },
    );
    println!("\n| record size | producer ns/record | GB/s at the median |");
    println!("| --- | --- | --- |");
    for (i, (name, bytes, _)) in SIZE_CONTENDERS.iter().enumerate() {
        let text = summary(&mut sizes[i]);
        let median = sizes[i][sizes[i].len() / 2];
        println!("| {name} | {text} | {:.2} |", *bytes as f64 / median);
    }
}

// --- Harness -------------------------------------------------------------------------

/// Every group: short warm-up, flat sampling (each sample is one long sustained run
/// with its own consumer thread), few samples, so the whole binary takes under three
/// minutes.
fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}

criterion_group!(
    benches,
    producer_cost,
    thread_to_thread,
    process_to_process,
    record_size
);

fn main() -> ExitCode {
    if std::env::var_os(CHILD_ENV).is_some() {
        return match child_main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ring bench child: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 && std::env::var_os(NO_PIN_ENV).is_none() {
        eprintln!(
            "ring bench: producer pinned to CPU {PRODUCER_CPU}, consumer to CPU {CONSUMER_CPU}"
        );
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    if want_interleaved() {
        interleaved();
    }
    ExitCode::SUCCESS
}
