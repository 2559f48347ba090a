//! `metricsd_drain`: metricsd's record validation and aggregation, through the drain
//! loop's real path (a sealed memfd ring, its `Reader`, the per-ring key table and
//! registration assembler, the series store under small caps).
//!
//! The input is a producer's program: registrations (well-formed or not), samples,
//! span records and raw records, published in batches, with drain passes, exports and
//! (rarely) a scribbled write position in between. The published records are then run
//! through a small model of the validation rules, and the drainer's totals compared:
//! every record consumed, each registration and sample accepted or rejected for the
//! reason the model gives, counter totals exact, every accepted sample in exactly one
//! series, overflow samples all in overflow series. Span records are checked more
//! loosely: each costs at most one reject and is otherwise the span table's business.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use metricsd::aggregate::{MetricKind, Value};
use metricsd::drain::{Drainer, NewRing};
use metricsd::export::ExportQueue;
use metricsd::snapshot::{GrantStats, Snapshot};
use metricsd::{Config, Reason};
use telemetry_abi::{
    AttrValueType, Geometry, MAX_REGISTER_RECORDS, Record, RecordKind, RegisterError, RegisterKind,
    Registration, RegistrationBuf, Sample, SpanStatus, encode_registration,
};
use telemetry_ring::{MemfdRegion, Region, Writer};
use zerocopy::FromBytes;

use crate::input::Input;

/// Records per ring: small, so that batches wrap around it.
const CAPACITY: u64 = 64;
/// Keys a ring may register: small, so that the table fills.
const MAX_KEYS: u32 = 6;
/// `series.max_total`, which also caps the metric metadata entries.
const MAX_TOTAL: u32 = 6;

const NAMES: [&str; 6] = ["a", "b.c", "http.requests", "x y", "a=b", ""];
const LABEL_KEYS: [&str; 6] = ["route", "k", "token", "service", "1bad", "route"];
const LABEL_VALUES: [&str; 4] = ["/", "v", "", "\u{85}"];

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut config = Config::default();
    config.drain.budget = 1 + u32::from(input.below(64));
    config.rings.max_keys_per_ring = MAX_KEYS;
    config.series.max_total = MAX_TOTAL;
    config.series.max_per_service = 4;
    config.series.max_per_metric = 2;
    // Never reached by an input's few registrations: no series is ever refused, so
    // every accepted sample lands in some series.
    config.series.max_overflow = 1000;
    config.spans.max_live = 4;
    config.spans.max_attrs = 2;
    let grant = Arc::new(Mutex::new(GrantStats::default()));
    let mut drainer = Drainer::new(&config, ExportQueue::new(1024), grant);

    let geometry = Geometry::new(CAPACITY).unwrap_or_else(|e| panic!("{e}"));
    let region = MemfdRegion::create("fuzz", geometry, 1).unwrap_or_else(|e| panic!("{e}"));
    let fd = region
        .fd()
        .try_clone_to_owned()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut writer = Writer::new(MemfdRegion::attach(fd).unwrap_or_else(|e| panic!("{e}")));
    drainer.add_ring(NewRing {
        id: 1,
        connection: 1,
        service: Arc::from("fuzz"),
        region,
        epoch: 1,
        logged: None,
    });

    let mut published: Vec<Record> = Vec::new();
    let mut batch: Vec<Record> = Vec::new();
    let mut scribbled = false;
    while !input.is_empty() {
        match input.below(16) {
            0..=2 => {
                let records = registration(&mut input);
                if batch.len() + records.len() > CAPACITY as usize {
                    publish(&mut writer, &mut drainer, &mut batch, &mut published);
                }
                batch.extend(records);
            }
            3..=7 => batch.push(sample(&mut input)),
            8 => batch.push(span(&mut input)),
            9 => batch.push(Record::read_from_bytes(&input.array::<32>()).unwrap_or_default()),
            10 | 11 => publish(&mut writer, &mut drainer, &mut batch, &mut published),
            12 | 13 => {
                drainer.pass();
            }
            14 => drainer.export(),
            _ => {
                if input.below(8) == 0 {
                    // A hostile move of the write position: from here on only the
                    // quarantine accounting is checked.
                    let w = writer.region().write_pos();
                    let v = w.load(std::sync::atomic::Ordering::Relaxed);
                    let delta = u64::from(input.u8()).wrapping_sub(128);
                    w.store(v.wrapping_add(delta), std::sync::atomic::Ordering::Release);
                    scribbled = true;
                }
            }
        }
        if batch.len() >= CAPACITY as usize / 2 {
            publish(&mut writer, &mut drainer, &mut batch, &mut published);
        }
    }
    publish(&mut writer, &mut drainer, &mut batch, &mut published);
    for _ in 0..=published.len() {
        if drainer.pass() == 0 {
            break;
        }
    }
    drainer.export();
    let snap = drainer.snapshot();
    check_violations(&snap);
    if !scribbled {
        check_totals(&snap, &published);
    }
}

/// Publishes the batch in one store, draining until it fits (a scribbled or
/// quarantined ring may never make room: then the batch is dropped).
fn publish(
    writer: &mut Writer<MemfdRegion>,
    drainer: &mut Drainer,
    batch: &mut Vec<Record>,
    published: &mut Vec<Record>,
) {
    for _ in 0..2 * CAPACITY {
        if batch.is_empty() || writer.push_all(batch).is_ok() {
            published.append(batch);
            return;
        }
        drainer.pass();
    }
    batch.clear();
}

fn pick<'a>(input: &mut Input<'_>, from: &[&'a str]) -> &'a str {
    from[usize::from(input.u8()) % from.len()]
}

fn key(input: &mut Input<'_>) -> u32 {
    match input.below(16) {
        0 => 0,
        1 => u32::MAX,
        k => u32::from(k % 8),
    }
}

/// A registration, usually well-formed, sometimes with a piece missing or altered.
fn registration(input: &mut Input<'_>) -> Vec<Record> {
    let key = key(input);
    let what = RegisterKind(u16::from(1 + input.below(7)));
    let name = pick(input, &NAMES);
    let labels: Vec<(&str, &str)> = (0..input.below(4))
        .map(|_| (pick(input, &LABEL_KEYS), pick(input, &LABEL_VALUES)))
        .collect();
    let mut out = [Record::default(); MAX_REGISTER_RECORDS];
    let Ok(n) = encode_registration(key, what, name, &labels, &mut out) else {
        return Vec::new();
    };
    let mut records = out[..n].to_vec();
    match input.below(8) {
        0 if n > 1 => {
            records.pop();
        }
        1 => {
            let i = usize::from(input.u8()) % n;
            let at = usize::from(input.below(32));
            let mut bytes = zerocopy::IntoBytes::as_bytes(&records[i]).to_vec();
            bytes[at] ^= 1 | input.u8();
            records[i] = Record::read_from_bytes(&bytes).unwrap_or_default();
        }
        _ => {}
    }
    records
}

fn sample(input: &mut Input<'_>) -> Record {
    let key = key(input);
    let value = match input.below(4) {
        0 => input.u64(),
        _ => u64::from(input.u8()),
    };
    let mut r = match input.below(3) {
        0 => Record::counter(key, value),
        1 => Record::gauge(key, value as i64),
        _ => Record::histogram(key, value),
    };
    if input.below(16) == 0 {
        r.flags = 1;
    }
    if input.below(16) == 0 {
        r.words[1 + usize::from(input.below(2))] = 1;
    }
    r
}

fn span(input: &mut Input<'_>) -> Record {
    let key = key(input);
    let id = u64::from(input.below(4));
    match input.below(3) {
        0 => Record::span_start(key, id, u64::from(input.below(4)), u64::from(input.u8())),
        1 => Record::span_end(
            key,
            id,
            u64::from(input.u8()),
            SpanStatus(u16::from(input.below(4))),
        ),
        _ => Record::span_attr(
            key,
            id,
            AttrValueType(u16::from(input.below(4))),
            u64::from(input.below(8)),
        ),
    }
}

fn check_violations(snap: &Snapshot) {
    let v = &snap.violations;
    assert!(snap.drain.rings_quarantined <= 1);
    assert_eq!(v.quarantining(), snap.drain.rings_quarantined, "{v:?}");
    let ring = snap
        .rings
        .first()
        .unwrap_or_else(|| panic!("the ring is listed"));
    assert_eq!(
        ring.quarantined.is_some(),
        snap.drain.rings_quarantined == 1
    );
}

/// What the model expects of the published records.
#[derive(Default)]
struct Expected {
    rejects: HashMap<Reason, u64>,
    /// Records of other kinds (spans), left to the span table: each is rejected at
    /// most once.
    others: u64,
    registrations: u64,
    keys: usize,
    counter_total: u128,
    samples: HashMap<MetricKind, u64>,
}

/// A ring's key table as the model keeps it: the kind and content of each key.
type Keys = HashMap<u32, (RegisterKind, Vec<String>)>;

fn content(reg: &Registration<'_>) -> Vec<String> {
    let mut c = vec![reg.name.to_owned()];
    for l in reg.labels() {
        c.push(l.key.to_owned());
        c.push(l.value.to_owned());
    }
    c
}

fn model(records: &[Record]) -> Expected {
    let mut e = Expected::default();
    let mut keys = Keys::new();
    let mut buf = RegistrationBuf::new();
    let mut described: std::collections::HashSet<String> = std::collections::HashSet::new();
    let reject = |e: &mut Expected, r: Reason| *e.rejects.entry(r).or_insert(0) += 1;
    for record in records {
        let kind = record.kind;
        if !kind.is_known() {
            reject(&mut e, Reason::UnknownKind);
            continue;
        }
        // Anything but a data record ends a pending registration, a new head included
        // (abi/README.md, section 3.1): the interrupted one is refused, counted once.
        if kind != RecordKind::REGISTER_DATA && buf.interrupt().is_err() {
            reject(&mut e, Reason::RegistrationInterrupted);
        }
        if kind == RecordKind::REGISTER || kind == RecordKind::REGISTER_DATA {
            match buf.feed(record) {
                Ok(None) => {}
                Ok(Some(reg)) => match keys.get(&reg.key) {
                    Some((what, c)) if *what == reg.what && *c == content(&reg) => {}
                    Some(_) => reject(&mut e, Reason::RegistrationConflict),
                    None if keys.len() >= MAX_KEYS as usize => reject(&mut e, Reason::KeyTableFull),
                    // Metric metadata (ABI 1.1): one entry per metric name, at most
                    // `series.max_total` of them; past it the registration is refused.
                    None if reg.what == RegisterKind::METADATA
                        && !described.contains(reg.name)
                        && described.len() >= MAX_TOTAL as usize =>
                    {
                        reject(&mut e, Reason::MetadataCap)
                    }
                    None => {
                        if reg.what == RegisterKind::METADATA {
                            described.insert(reg.name.to_owned());
                        }
                        keys.insert(reg.key, (reg.what, content(&reg)));
                        e.registrations += 1;
                    }
                },
                Err(RegisterError::Interrupted) => reject(&mut e, Reason::RegistrationInterrupted),
                Err(_) => reject(&mut e, Reason::BadRegistration),
            }
            continue;
        }
        let (want, metric) = match kind {
            RecordKind::COUNTER => (RegisterKind::COUNTER, MetricKind::Counter),
            RecordKind::GAUGE => (RegisterKind::GAUGE, MetricKind::Gauge),
            RecordKind::HISTOGRAM => (RegisterKind::HISTOGRAM, MetricKind::Histogram),
            _ => {
                e.others += 1;
                continue;
            }
        };
        let s: Sample = record.view();
        // `flags` and the reserved words are ignored (abi/README.md, section 3).
        match keys.get(&s.key) {
            None => reject(&mut e, Reason::UnregisteredKey),
            Some((what, _)) if *what != want => reject(&mut e, Reason::KindMismatch),
            Some(_) => {
                *e.samples.entry(metric).or_insert(0) += 1;
                if metric == MetricKind::Counter {
                    e.counter_total += u128::from(s.value);
                }
            }
        }
    }
    e.keys = keys.len();
    e
}

fn check_totals(snap: &Snapshot, published: &[Record]) {
    let e = model(published);
    assert_eq!(
        snap.drain.records,
        published.len() as u64,
        "every record consumed"
    );
    assert_eq!(snap.drain.rings_quarantined, 0);
    assert_eq!(
        snap.drain.registrations, e.registrations,
        "registrations accepted"
    );
    assert_eq!(snap.rings[0].keys, e.keys, "keys bound in the ring");

    // Each reason at least as often as the model says; the surplus only from span
    // records, at most one each.
    let mut surplus = 0;
    let mut beyond = Vec::new();
    for &reason in Reason::ALL {
        let (got, want) = (
            snap.rejects.get(reason),
            e.rejects.get(&reason).copied().unwrap_or(0),
        );
        assert!(
            got >= want,
            "{reason}: {got} rejects, the model expects {want}"
        );
        surplus += got - want;
        if got > want {
            beyond.push(format!("{reason} +{}", got - want));
        }
    }
    assert!(
        surplus <= e.others,
        "{surplus} rejects beyond the model ({}), {} records of other kinds",
        beyond.join(", "),
        e.others
    );

    let mut counter_total = 0u128;
    let mut samples: HashMap<MetricKind, u64> = HashMap::new();
    let mut overflow_samples = 0;
    for s in &snap.series {
        *samples.entry(s.kind).or_insert(0) += s.samples;
        if s.overflow {
            overflow_samples += s.samples;
        }
        match &s.value {
            Value::Counter { total } => counter_total += total,
            Value::Gauge { value } => assert_eq!(value.is_some(), s.samples > 0, "{s:?}"),
            _ => {}
        }
    }
    assert_eq!(counter_total, e.counter_total, "counter totals");
    for kind in [
        MetricKind::Counter,
        MetricKind::Gauge,
        MetricKind::Histogram,
    ] {
        let got = samples.get(&kind).copied().unwrap_or(0);
        let want = e.samples.get(&kind).copied().unwrap_or(0);
        // Other records may add samples too (a span's duration is its own kind).
        assert!(
            (want..=want + e.others).contains(&got),
            "{kind:?}: {got} samples aggregated, the model accepted {want}"
        );
    }
    assert_eq!(
        snap.store.overflow_samples, overflow_samples,
        "overflow samples"
    );
    assert_eq!(snap.store.refused_registrations, 0);
}
