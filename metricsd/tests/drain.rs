//! The drain loop driven directly, without a daemon (threads only for an exporter and,
//! in the last test, `drain::run` itself): float samples, metadata, refused and expired
//! series, v1.1 span records, exports and their deltas, the write-ahead log's release
//! of ring slots, returned rings, closed connections, the producer violations and the
//! health series that report them, scrape views, and the loop's commands and idle
//! back-off.

mod common;

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{registration, watchdog};
use metricsd::aggregate::MetricKind;
use metricsd::drain::{Command, Drainer, IdlePolicy, NewRing, ReturnedRing};
use metricsd::export::ExportQueue;
use metricsd::otlp::Batch;
use metricsd::scrape::{Published, ScrapeStats, ScrapeTable};
use metricsd::snapshot::{GrantStats, HealthSeries, Snapshot};
use metricsd::{Class, Config, MemorySink, Reason};
use telemetry_abi::{AttrValueType, Geometry, GrantStatus, Record, RegisterKind, SpanStatus};
use telemetry_ring::{MemfdRegion, Region, Writer};

const SERVICE: &str = "svc";

fn drainer(config: &Config) -> (Drainer, Arc<ExportQueue>) {
    let queue = ExportQueue::new(100_000);
    let grant = Arc::new(Mutex::new(GrantStats::default()));
    (Drainer::new(config, queue.clone(), grant), queue)
}

/// A ring of service [`SERVICE`], and its producer's writer.
fn ring(id: u32, connection: u64, epoch: u64, capacity: u64) -> (NewRing, Writer<MemfdRegion>) {
    common::new_ring(id, connection, SERVICE, epoch, capacity)
}

/// Ring 1 of connection 1 (64 records), added to `d`: its writer.
fn first_ring(d: &mut Drainer) -> Writer<MemfdRegion> {
    let (r, w) = ring(1, 1, 1, 64);
    d.add_ring(r);
    w
}

fn push(w: &mut Writer<MemfdRegion>, records: &[Record]) {
    w.push_all(records).expect("the ring has room");
}

fn register(w: &mut Writer<MemfdRegion>, key: u32, what: RegisterKind, name: &str) {
    push(w, &registration(key, what, name, &[]));
}

/// Passes until a pass consumes nothing.
fn settle(d: &mut Drainer) {
    for _ in 0..1000 {
        if d.pass() == 0 {
            return;
        }
    }
    panic!("the drainer never ran dry");
}

fn health(rows: &[HealthSeries], name: &str) -> Vec<(Vec<(String, String)>, i128)> {
    rows.iter()
        .filter(|r| r.name == name)
        .map(|r| (r.labels.to_vec(), r.value))
        .collect()
}

fn samples(snap: &Snapshot, kind: MetricKind, name: &str) -> u64 {
    snap.find(SERVICE, kind, name, &[]).map_or(0, |s| s.samples)
}

#[test]
fn float_samples_set_add_and_observe_and_non_finite_ones_are_refused() {
    watchdog();
    let (mut d, _q) = drainer(&Config::default());
    let mut w = first_ring(&mut d);
    register(&mut w, 1, RegisterKind::GAUGE, "g");
    register(&mut w, 2, RegisterKind::HISTOGRAM, "h");
    push(
        &mut w,
        &[
            Record::gauge_f64(1, 2.5),
            Record::gauge_f64_add(1, 1.25),
            Record::gauge_f64(1, f64::NAN),
            Record::gauge_f64_add(1, f64::INFINITY),
            Record::histogram_f64(2, 0.5),
            Record::histogram_f64(2, 1.5),
            Record::histogram_f64(2, f64::NEG_INFINITY),
        ],
    );
    settle(&mut d);
    let snap = d.snapshot();
    assert_eq!(snap.float_gauge(SERVICE, "g", &[]), Some(3.75));
    let h = snap.histogram(SERVICE, "h", &[]).expect("the histogram");
    assert_eq!((h.count(), h.sum()), (2, 2.0));
    assert_eq!(snap.rejects.get(Reason::NotFinite), 3);
    assert_eq!(snap.rejects.total(), 3);
}

#[test]
fn a_metric_description_is_a_registration_like_any_other() {
    watchdog();
    let (mut d, _q) = drainer(&Config::default());
    let mut w = first_ring(&mut d);
    push(
        &mut w,
        &registration(
            1,
            RegisterKind::METADATA,
            "c",
            &[("kind", "counter"), ("unit", "bytes")],
        ),
    );
    register(&mut w, 2, RegisterKind::COUNTER, "c");
    push(&mut w, &[Record::counter(2, 4)]);
    settle(&mut d);
    let snap = d.snapshot();
    assert_eq!(snap.rejects.total(), 0, "{:?}", snap.rejects);
    assert_eq!(snap.drain.registrations, 2);
    let meta = snap.metadata_of(SERVICE, "c").expect("described");
    assert_eq!(meta.unit.as_deref(), Some("bytes"));
    assert_eq!(snap.counter(SERVICE, "c", &[]), Some(4));
}

#[test]
fn a_sample_on_a_refused_series_counts_as_series_cap() {
    watchdog();
    let mut config = Config::default();
    config.series.max_per_metric = 1;
    config.series.max_overflow = 0;
    let (mut d, _q) = drainer(&config);
    let mut w = first_ring(&mut d);
    push(
        &mut w,
        &registration(1, RegisterKind::COUNTER, "c", &[("k", "a")]),
    );
    push(
        &mut w,
        &registration(2, RegisterKind::COUNTER, "c", &[("k", "b")]),
    );
    push(&mut w, &[Record::counter(1, 1), Record::counter(2, 1)]);
    settle(&mut d);
    let snap = d.snapshot();
    assert_eq!(snap.counter(SERVICE, "c", &[("k", "a")]), Some(1));
    assert_eq!(snap.rejects.get(Reason::SeriesCap), 1);
    assert_eq!(snap.rejects.total(), 1, "{:?}", snap.rejects);
}

/// A config whose series expire at the first export after a sample, bound or not.
fn expiring() -> Config {
    let mut config = Config::default();
    config.series.idle_ttl_ms = 0;
    config.series.idle_ttl_bound_ms = 0;
    config
}

/// Exports until the store has expired `n` series in all.
fn expire(d: &mut Drainer, n: u64) {
    for _ in 0..1000 {
        d.export();
        if d.snapshot().store.expired >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the series never expired");
}

#[test]
fn samples_on_expired_series_make_them_again_with_their_kind() {
    watchdog();
    let (mut d, _q) = drainer(&expiring());
    let mut w = first_ring(&mut d);
    register(&mut w, 1, RegisterKind::COUNTER, "c");
    register(&mut w, 2, RegisterKind::GAUGE, "g");
    register(&mut w, 3, RegisterKind::HISTOGRAM, "h");
    push(
        &mut w,
        &[
            Record::counter(1, 10),
            Record::gauge(2, -3),
            Record::histogram(3, 7),
        ],
    );
    settle(&mut d);
    expire(&mut d, 3);
    assert!(d.snapshot().series.is_empty());
    push(
        &mut w,
        &[
            Record::counter(1, 5),
            Record::gauge(2, 9),
            Record::histogram(3, 8),
        ],
    );
    settle(&mut d);
    let snap = d.snapshot();
    assert_eq!(snap.counter(SERVICE, "c", &[]), Some(5), "counted afresh");
    assert_eq!(snap.gauge(SERVICE, "g", &[]), Some(9));
    assert_eq!(
        snap.histogram(SERVICE, "h", &[]).map(|h| h.count()),
        Some(1)
    );
    assert_eq!(snap.store.recreated, 3);
    assert_eq!(snap.rejects.total(), 0, "{:?}", snap.rejects);
}

#[test]
fn a_span_ending_after_its_duration_series_expired_is_observed_again() {
    watchdog();
    let (mut d, _q) = drainer(&expiring());
    let mut w = first_ring(&mut d);
    register(&mut w, 1, RegisterKind::SPAN, "op");
    push(&mut w, &[Record::span_start(1, 5, 0, 100)]);
    settle(&mut d);
    expire(&mut d, 1);
    push(&mut w, &[Record::span_end(1, 5, 350, SpanStatus::OK)]);
    settle(&mut d);
    let snap = d.snapshot();
    let s = snap
        .find(SERVICE, MetricKind::SpanDuration, "op", &[])
        .expect("the duration series, made again");
    assert_eq!(s.samples, 1);
    assert_eq!(snap.rejects.total(), 0, "{:?}", snap.rejects);
}

/// A drainer handing its exports to an OTLP channel too.
fn with_otlp(config: &Config) -> (Drainer, Receiver<Batch>) {
    let (mut d, _q) = drainer(config);
    let (handoff, rx) = metricsd::otlp::channel(&config.otlp);
    d.set_otlp(handoff);
    (d, rx)
}

#[test]
fn a_span_open_takes_only_its_own_trace_record() {
    watchdog();
    let (mut d, rx) = with_otlp(&Config::default());
    let mut w = first_ring(&mut d);
    register(&mut w, 1, RegisterKind::SPAN, "op");
    register(&mut w, 2, RegisterKind::SPAN, "other");
    push(
        &mut w,
        &[
            // Another span's trace record: the open is refused.
            Record::span_trace(1, 6, 0xabc, 1),
            Record::span_open(1, 5, 0, 100),
            // The same span id under another name: refused too.
            Record::span_trace(2, 7, 0xabc, 1),
            Record::span_open(1, 7, 0, 100),
            // Its own.
            Record::span_trace(1, 8, 0xabc, 1),
            Record::span_open(1, 8, 0, 100),
            Record::span_close(1, 8, 300, SpanStatus::OK),
        ],
    );
    settle(&mut d);
    d.export();
    let snap = d.snapshot();
    assert_eq!(
        snap.rejects.get(Reason::SpanNoTrace),
        2,
        "{:?}",
        snap.rejects
    );
    let batch = rx.try_recv().expect("a batch");
    let ids: Vec<(u64, u128)> = batch
        .spans
        .iter()
        .map(|s| (s.span_id, s.trace_id))
        .collect();
    assert_eq!(ids, [(8, 0xabc)]);
}

#[test]
fn a_close_read_before_its_open_is_observed_once() {
    watchdog();
    let (mut d, _q) = drainer(&Config::default());
    // Two rings of one connection: the close is in the ring drained first.
    let (first, mut closer) = ring(1, 7, 1, 64);
    let (second, mut opener) = ring(2, 7, 2, 64);
    d.add_ring(first);
    d.add_ring(second);
    register(&mut closer, 1, RegisterKind::SPAN, "op");
    register(&mut opener, 1, RegisterKind::SPAN, "op");
    push(
        &mut closer,
        &[Record::span_close(1, 9, 400, SpanStatus::OK)],
    );
    push(
        &mut opener,
        &[
            Record::span_trace(1, 9, 0xdef, 0),
            Record::span_open(1, 9, 0, 100),
        ],
    );
    settle(&mut d);
    let snap = d.snapshot();
    assert_eq!(snap.rejects.total(), 0, "{:?}", snap.rejects);
    assert_eq!(samples(&snap, MetricKind::SpanDuration, "op"), 1);
    assert_eq!(snap.spans.ended, 1);
}

#[test]
fn attributes_keep_their_sign_and_otlp_batches_carry_the_clock_offset() {
    watchdog();
    let (mut d, rx) = with_otlp(&Config::default());
    let mut w = first_ring(&mut d);
    register(&mut w, 1, RegisterKind::SPAN, "op");
    register(&mut w, 2, RegisterKind::ATTR, "delta");
    register(&mut w, 3, RegisterKind::ATTR, "size");
    push(
        &mut w,
        &[
            Record::span_start(1, 4, 0, 100),
            Record::span_attr(2, 4, AttrValueType::I64, (-5i64) as u64),
            Record::span_attr(3, 4, AttrValueType::U64, u64::MAX),
            Record::span_end(1, 4, 200, SpanStatus::OK),
        ],
    );
    settle(&mut d);
    let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let mono_ns = i128::from(mono.tv_sec) * 1_000_000_000 + i128::from(mono.tv_nsec);
    let wall_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as i128;
    d.export();
    let batch = rx.try_recv().expect("a batch");
    let span = batch.spans.first().expect("the span");
    let attrs: Vec<(&str, &str)> = span.attrs.iter().map(|(k, v)| (&**k, v.as_str())).collect();
    assert_eq!(attrs, [("delta", "-5"), ("size", "18446744073709551615")]);
    // The offset between the clocks, as taken here and at the export: equal but for the
    // time between each pair of readings (20 ms allows for a preemption) and any step
    // of the wall clock.
    let offset = wall_ns - mono_ns;
    assert!(
        (batch.mono_to_unix_ns - offset).abs() < 20_000_000,
        "{} against {offset}",
        batch.mono_to_unix_ns
    );
    assert!(batch.time_unix_ns as i128 >= wall_ns);
    let rows = d.health_rows();
    assert_eq!(health(&rows, "metricsd.otlp.pending"), [(vec![], 1)]);
}

/// Runs the exporter into a memory sink until `queue` is empty, then stops it.
fn exported(queue: &Arc<ExportQueue>) -> Vec<logd::Record> {
    let sink = MemorySink::new();
    let exporter = {
        let (queue, sink) = (queue.clone(), sink.clone());
        std::thread::spawn(move || {
            metricsd::export::run(
                queue,
                Box::new(sink),
                "drain-test".into(),
                1000,
                Duration::from_millis(10),
            );
        })
    };
    common::wait_within(
        "the exporter to empty its queue",
        common::WAIT,
        Duration::from_millis(2),
        || {
            let st = queue.stats();
            (st.ready && st.pending == 0).then_some(())
        },
    );
    queue.stop();
    exporter.join().expect("the exporter");
    sink.state().records.clone()
}

fn field<'a>(r: &'a logd::Record, key: &str) -> &'a str {
    r.get(key)
        .unwrap_or_else(|| panic!("no field {key} in {r:?}"))
}

#[test]
fn exports_carry_counter_and_health_deltas_in_their_window() {
    watchdog();
    let (mut d, queue) = drainer(&Config::default());
    let mut w = first_ring(&mut d);
    register(&mut w, 1, RegisterKind::COUNTER, "c");
    push(&mut w, &[Record::counter(1, 10)]);
    settle(&mut d);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as u64;
    d.export();
    push(&mut w, &[Record::counter(1, 5), Record::counter(1, 2)]);
    settle(&mut d);
    d.export();
    assert_eq!(d.snapshot().drain.exports, 2);
    let records = exported(&queue);
    let counter: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r.get("metric") == Some("c"))
        .map(|r| (field(r, "value"), field(r, "delta")))
        .collect();
    assert_eq!(counter, [("10", "10"), ("17", "7")]);
    let drained: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r.get("metric") == Some("metricsd.records.drained"))
        .map(|r| (field(r, "value"), field(r, "delta")))
        .collect();
    // A registration (a head and a data record) and a sample, then two samples.
    assert_eq!(drained, [("3", "3"), ("5", "2")]);
    let c = records
        .iter()
        .find(|r| r.get("metric") == Some("c"))
        .expect("the counter");
    let end: u64 = field(c, "window_end_ns").parse().expect("a number");
    assert!(
        end >= before,
        "the window ends at the export: {end} < {before}"
    );
}

#[test]
fn rejects_are_counted_by_class() {
    watchdog();
    let (mut d, _q) = drainer(&Config::default());
    let mut w = first_ring(&mut d);
    push(&mut w, &[Record::counter(1, 1), Record::counter(2, 1)]);
    settle(&mut d);
    assert_eq!(d.rejects_in(Class::InvalidArgs), 2);
}

/// A config with the write-ahead log's files kept small.
const WAL_FILE_BYTES: u64 = 1 << 20;

#[test]
fn with_the_log_a_ring_is_released_as_its_records_are_logged_and_idle_passes_write_nothing() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let (mut d, _q) = drainer(&Config::default());
    let base = d.open_wal(dir.path(), WAL_FILE_BYTES).expect("the log");
    assert!(
        base >= now_secs << 32,
        "an epoch base below the clock's: {base:#x}"
    );
    let (first, mut w1) = ring(1, 1, base + 1, 16);
    let (second, mut w2) = ring(2, 1, base + 2, 16);
    d.add_ring(first);
    d.add_ring(second);
    register(&mut w1, 1, RegisterKind::COUNTER, "a");
    register(&mut w2, 1, RegisterKind::COUNTER, "b");
    push(&mut w1, &[Record::counter(1, 1); 7]);
    push(&mut w2, &[Record::counter(1, 1); 3]);
    let registered = registration(1, RegisterKind::COUNTER, "a", &[]).len() as u64;
    assert_eq!(d.pass(), 2 * registered + 10);
    // Every slot that pass read was logged and handed back at its end: each ring takes
    // a full capacity again.
    push(&mut w1, &[Record::counter(1, 2); 16]);
    push(&mut w2, &[Record::counter(1, 2); 16]);
    settle(&mut d);
    let snap = d.snapshot();
    assert_eq!(snap.counter(SERVICE, "a", &[]), Some(39));
    assert_eq!(snap.counter(SERVICE, "b", &[]), Some(35));
    let stats = d.wal_stats().expect("the log's totals");
    assert!(stats.commits > 0 && stats.bytes > 0, "{stats:?}");
    for _ in 0..10 {
        assert_eq!(d.pass(), 0);
    }
    assert_eq!(
        d.wal_stats().expect("the log").commits,
        stats.commits,
        "an idle pass commits nothing"
    );
    drop(d);
    let (mut again, _q) = drainer(&Config::default());
    let next = again.open_wal(dir.path(), WAL_FILE_BYTES).expect("the log");
    assert!(next > base + 2, "{next:#x} after {base:#x}");
}

#[test]
fn a_returned_ring_is_finished_from_its_logged_position() {
    watchdog();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut d, _q) = drainer(&Config::default());
    let base = d.open_wal(dir.path(), WAL_FILE_BYTES).expect("the log");
    let epoch = base + 1;
    let (r, mut w) = ring(1, 1, epoch, 16);
    let fd = r.region.fd().try_clone_to_owned().expect("dup");
    d.add_ring(r);
    // A second ring, read to its end before the daemon goes.
    let (quiet, mut qw) = ring(2, 1, epoch + 1, 16);
    let quiet_fd = quiet.region.fd().try_clone_to_owned().expect("dup");
    d.add_ring(quiet);
    register(&mut qw, 1, RegisterKind::COUNTER, "quiet");
    push(&mut qw, &[Record::counter(1, 2)]);
    // A registration interrupted by a sample, a refused one, and two that hold: the
    // log keeps exactly the two, each whole (several records with its labels).
    let c = registration(1, RegisterKind::COUNTER, "c", &[("route", "/a")]);
    assert!(c.len() > 1);
    push(&mut w, &c[..1]);
    push(&mut w, &[Record::counter(9, 1)]);
    push(&mut w, &c);
    push(&mut w, &registration(1, RegisterKind::GAUGE, "clash", &[]));
    push(
        &mut w,
        &registration(2, RegisterKind::GAUGE, "g", &[("k", "v")]),
    );
    push(&mut w, &[Record::counter(1, 3), Record::gauge(2, 1)]);
    settle(&mut d);
    assert_eq!(
        d.snapshot().counter(SERVICE, "c", &[("route", "/a")]),
        Some(3)
    );
    // Written after the last pass: read by no one when the daemon goes.
    push(&mut w, &[Record::counter(1, 4), Record::gauge(2, 8)]);
    drop(d);

    let (mut d, _q) = drainer(&Config::default());
    d.open_wal(dir.path(), WAL_FILE_BYTES).expect("the log");
    let returned = |id: u32, service: &str, region: MemfdRegion| {
        let (reply, _answer) = std::sync::mpsc::channel();
        ReturnedRing {
            id,
            connection: 2,
            service: Arc::from(service),
            region,
            reply,
        }
    };
    let attach = || MemfdRegion::attach(fd.try_clone().expect("dup")).expect("attach");
    assert_eq!(
        d.return_ring(returned(5, "another", attach())),
        GrantStatus::INVALID_ARGS,
        "another service's ring"
    );
    let bigger =
        MemfdRegion::create("drain", Geometry::new(32).expect("pow2"), epoch).expect("memfd");
    assert_eq!(
        d.return_ring(returned(5, SERVICE, bigger)),
        GrantStatus::INVALID_ARGS,
        "not the size logged"
    );
    assert_eq!(
        d.return_ring(returned(5, SERVICE, attach())),
        GrantStatus::OK
    );
    let snap = d.snapshot();
    assert_eq!(snap.counter(SERVICE, "c", &[("route", "/a")]), Some(7));
    assert_eq!(snap.gauge(SERVICE, "g", &[("k", "v")]), Some(8));
    assert_eq!(snap.drain.rings_closed, 1);
    assert_eq!(snap.drain.rings_open, 0);
    assert_eq!(snap.rejects.total(), 0, "{:?}", snap.rejects);
    // Nothing left to read: finished at once, its total as logged.
    let quiet = MemfdRegion::attach(quiet_fd).expect("attach");
    assert_eq!(d.return_ring(returned(7, SERVICE, quiet)), GrantStatus::OK);
    let snap = d.snapshot();
    assert_eq!(snap.counter(SERVICE, "quiet", &[]), Some(2));
    assert_eq!(snap.drain.rings_closed, 2);
    assert_eq!(
        d.return_ring(returned(6, SERVICE, attach())),
        GrantStatus::INVALID_ARGS,
        "finished once"
    );
    let rows = d.health_rows();
    let returns = health(&rows, "metricsd.wal.returned");
    assert!(returns.contains(&(vec![("outcome".into(), "finished".into())], 2)));
    assert!(returns.contains(&(vec![("outcome".into(), "refused".into())], 3)));
}

#[test]
fn producer_violations_are_counted_once_and_reported() {
    watchdog();
    let (mut d, _q) = drainer(&Config::default());
    let (honest, mut hw) = ring(1, 1, 1, 64);
    let (moving, mut mw) = ring(2, 2, 2, 64);
    let (leaping, mut lw) = ring(3, 3, 3, 64);
    let (receding, mut rw) = ring(4, 4, 4, 64);
    d.add_ring(honest);
    d.add_ring(moving);
    d.add_ring(leaping);
    d.add_ring(receding);
    for w in [&mut hw, &mut mw, &mut lw, &mut rw] {
        register(w, 1, RegisterKind::COUNTER, "c");
    }
    // Ring 2 reports 5 drops, then 2: its dropped counter moved back (the larger
    // figure stands).
    mw.region()
        .dropped()
        .store(5, std::sync::atomic::Ordering::Release);
    push(&mut mw, &[Record::counter(1, 1)]);
    settle(&mut d);
    mw.region()
        .dropped()
        .store(2, std::sync::atomic::Ordering::Release);
    push(&mut mw, &[Record::counter(1, 1)]);
    settle(&mut d);
    push(&mut mw, &[Record::counter(1, 1)]);
    // Ring 3 puts its write position far past its capacity, ring 4 behind what was
    // read.
    lw.region()
        .write_pos()
        .store(1 << 40, std::sync::atomic::Ordering::Release);
    rw.region()
        .write_pos()
        .store(1, std::sync::atomic::Ordering::Release);
    push(&mut hw, &[Record::counter(1, 1)]);
    settle(&mut d);
    settle(&mut d);
    let snap = d.snapshot();
    let v = snap.violations;
    assert_eq!(
        (
            v.dropped_moved_back,
            v.write_out_of_range,
            v.write_moved_back
        ),
        (1, 1, 1)
    );
    assert_eq!(snap.drain.rings_quarantined, 2);
    assert_eq!(
        snap.counter_sum(SERVICE, "c"),
        4,
        "the honest ring and ring 2"
    );
    let rows = d.health_rows();
    let mut violations = health(&rows, "metricsd.violations");
    violations.sort();
    assert_eq!(
        violations,
        [
            (vec![("reason".into(), "dropped_moved_back".into())], 1),
            (vec![("reason".into(), "write_moved_back".into())], 1),
            (vec![("reason".into(), "write_out_of_range".into())], 1),
        ]
    );
    assert_eq!(
        health(&rows, "metricsd.ring.dropped"),
        [(
            vec![
                ("producer".into(), SERVICE.into()),
                ("ring".into(), "2".into())
            ],
            5
        )],
        "only the ring that reports drops"
    );
}

#[test]
fn lag_is_what_the_budget_left_and_the_longest_pass_is_in_microseconds() {
    watchdog();
    let mut config = Config::default();
    config.drain.budget = 4;
    let (mut d, _q) = drainer(&config);
    let mut w = first_ring(&mut d);
    register(&mut w, 1, RegisterKind::COUNTER, "c");
    push(&mut w, &[Record::counter(1, 1); 10]);
    assert_eq!(d.pass(), 4);
    assert_eq!(d.pass(), 4);
    let snap = d.snapshot();
    assert_eq!(snap.drain.passes, 2);
    let published = registration(1, RegisterKind::COUNTER, "c", &[]).len() as u64 + 10;
    assert_eq!(snap.drain.lag, published - 8);
    let longest = health(&d.health_rows(), "metricsd.drain.longest_pass");
    assert_eq!(
        longest,
        [(vec![], i128::from(snap.drain.pass_ns_max / 1000))]
    );
    settle(&mut d);
    assert_eq!(d.snapshot().drain.lag, 0);
}

#[test]
fn closing_a_connection_drains_and_closes_only_its_rings() {
    watchdog();
    let (mut d, _q) = drainer(&Config::default());
    let (other, mut ow) = ring(1, 2, 1, 8);
    let (full, mut fw) = ring(2, 1, 2, 8);
    let (empty, _ew) = ring(3, 1, 3, 8);
    d.add_ring(other);
    d.add_ring(full);
    d.add_ring(empty);
    register(&mut ow, 1, RegisterKind::COUNTER, "o");
    register(&mut fw, 1, RegisterKind::COUNTER, "c");
    settle(&mut d);
    // A full ring, never drained before the producer goes.
    push(&mut fw, &[Record::counter(1, 1); 8]);
    push(&mut ow, &[Record::counter(1, 1)]);
    d.close_connection(1);
    let snap = d.snapshot();
    assert_eq!(
        snap.counter(SERVICE, "c", &[]),
        Some(8),
        "drained a last time"
    );
    assert_eq!(snap.counter(SERVICE, "o", &[]), Some(0), "not drained yet");
    assert_eq!((snap.drain.rings_open, snap.drain.rings_closed), (1, 2));
    let mut listed: Vec<(u32, bool)> = snap.rings.iter().map(|r| (r.id, r.closed)).collect();
    listed.sort_unstable();
    assert_eq!(listed, [(1, false), (2, true), (3, true)]);
    settle(&mut d);
    assert_eq!(d.snapshot().counter(SERVICE, "o", &[]), Some(1));

    // Snapshots keep the 64 most recently closed rings.
    for id in 10..80 {
        let (r, _w) = ring(id, u64::from(id), 1, 2);
        d.add_ring(r);
        d.close_connection(u64::from(id));
    }
    let snap = d.snapshot();
    let closed: Vec<u32> = snap
        .rings
        .iter()
        .filter(|r| r.closed)
        .map(|r| r.id)
        .collect();
    assert_eq!(closed, (16..80).collect::<Vec<_>>());
    assert_eq!(snap.drain.rings_closed, 72);
}

#[test]
fn the_idle_policy_is_the_drain_section_of_the_config() {
    let mut config = Config::default();
    config.drain.idle_min_us = 30;
    config.drain.idle_max_us = 700;
    config.drain.deep_idle_after_ms = 1500;
    config.drain.deep_idle_ms = 90;
    config.export.interval_ms = 2500;
    assert_eq!(
        IdlePolicy::from_config(&config),
        IdlePolicy {
            min: Duration::from_micros(30),
            max: Duration::from_micros(700),
            deep_after: Duration::from_millis(1500),
            deep: Duration::from_millis(90),
            interval: Duration::from_millis(2500),
        }
    );
}

#[test]
fn a_scrape_view_holds_the_series_and_the_scrape_endpoints_own_counters() {
    watchdog();
    let (mut d, _q) = drainer(&Config::default());
    let stats = Arc::new(ScrapeStats::default());
    stats.scrapes.store(3, Ordering::Relaxed);
    d.set_scrape_stats(stats);
    let mut w = first_ring(&mut d);
    register(&mut w, 1, RegisterKind::COUNTER, "c");
    push(&mut w, &[Record::counter(1, 5)]);
    settle(&mut d);
    let view = d.scrape_view(&mut ScrapeTable::new());
    let series: Vec<(&str, u64)> = view.series().map(|s| (&*s.name, s.samples)).collect();
    assert_eq!(series, [("c", 1)]);
    assert_eq!(
        health(view.health(), "metricsd.scrape.served"),
        [(vec![], 3)]
    );
    let published = registration(1, RegisterKind::COUNTER, "c", &[]).len() as i128 + 1;
    assert_eq!(
        health(view.health(), "metricsd.records.drained"),
        [(vec![], published)]
    );
}

/// Asks the running drain loop for a snapshot.
fn ask(tx: &Sender<Command>) -> Snapshot {
    let (stx, srx) = std::sync::mpsc::channel();
    tx.send(Command::Snapshot(stx)).expect("the loop runs");
    srx.recv_timeout(common::WAIT).expect("a snapshot")
}

#[test]
fn the_drain_loop_exports_when_asked_or_due_and_stops_on_shutdown() {
    watchdog();
    let (d, queue) = drainer(&Config::default());
    let (tx, rx) = std::sync::mpsc::channel();
    // An export interval no test waits for: every export here is asked for.
    let policy = IdlePolicy {
        min: Duration::from_micros(100),
        max: Duration::from_millis(2),
        deep_after: Duration::from_secs(3600),
        deep: Duration::from_millis(10),
        interval: Duration::from_secs(3600),
    };
    let published = Arc::new(Published::new());
    let running = {
        let published = published.clone();
        std::thread::spawn(move || metricsd::drain::run(d, rx, policy, Some(published)))
    };
    let (r, mut w) = ring(1, 1, 1, 64);
    tx.send(Command::AddRing(r)).expect("the loop runs");
    register(&mut w, 1, RegisterKind::COUNTER, "c");
    push(&mut w, &[Record::counter(1, 5)]);
    let snap = common::wait_within(
        "the sample to be drained",
        common::WAIT,
        Duration::from_millis(1),
        || Some(ask(&tx)).filter(|snap| snap.counter(SERVICE, "c", &[]) == Some(5)),
    );
    assert_eq!(snap.drain.exports, 0, "none due, none asked for");
    let first = published.latest().expect("published at the start");
    assert_eq!(first.series().count(), 0);

    let (etx, erx) = std::sync::mpsc::channel();
    tx.send(Command::ExportNow(etx)).expect("the loop runs");
    erx.recv_timeout(common::WAIT).expect("the export");
    assert_eq!(ask(&tx).drain.exports, 1, "one export, the one asked for");
    let view = published.latest().expect("published at the export");
    assert_eq!(view.series().map(|s| &*s.name).collect::<Vec<_>>(), ["c"]);

    // Idle: each empty pass doubles the sleep before the next (from 100 us to 2 ms), so
    // 300 ms without records take a few hundred passes at most, however slow or fast
    // the machine (a loop that did not back off would pass thousands of times).
    let before = ask(&tx).drain.passes;
    std::thread::sleep(Duration::from_millis(300));
    let idle_passes = ask(&tx).drain.passes - before;
    assert!(
        idle_passes <= 300,
        "{idle_passes} passes in 300 ms of idleness"
    );
    // The shutdown reaches the loop in its sleep.
    tx.send(Command::Shutdown).expect("the loop runs");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(running.join().is_ok());
    });
    assert_eq!(done_rx.recv_timeout(common::WAIT), Ok(true), "stopped");
    let records = exported(&queue);
    let counter: Vec<&str> = records
        .iter()
        .filter(|r| r.get("metric") == Some("c"))
        .map(|r| field(r, "value"))
        .collect();
    // The export asked for; the one at shutdown has nothing new for `c`.
    assert_eq!(counter, ["5"]);
}
