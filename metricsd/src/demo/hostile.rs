//! The demo's hostile producer, in safe Rust: it is granted rings through the real
//! grant protocol, like any producer, and then breaks every rule it can reach.
//!
//! 1. Sends malformed grant requests on its own control connection (each must be
//!    answered `INVALID_ARGS` and counted).
//! 2. On ring A: registers another service's metric with a `service=<victim>` label
//!    (identity comes from the kernel, so this must land under `hostile`, the label
//!    renamed `exported_service`), publishes garbage records (unknown kinds,
//!    unregistered keys, spans that were never started), raises its shared `dropped`
//!    counter and then lowers it, and finally moves the write position far past the
//!    read position: metricsd must quarantine the ring (`write_out_of_range`).
//! 3. On ring B: moves the write position back after metricsd read it
//!    (`write_moved_back`).
//! 4. On ring C: floods garbage until the run ends (per-ring budgets keep the others
//!    served).
//!
//! Every step waits for metricsd's read position (the consumer's line of the ring) so
//! each effect is certain, with a timeout so nothing hangs. [`run`] returns what it did
//! ([`HostileReport`]); [`super::verify::verify_hostile`] checks each effect through logd.

use std::fmt;
use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nexus_metrics::{RingSource, SocketSource};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags,
    SocketType,
};
use telemetry_abi::{
    AttrValueType, GRANT_FRAME_SIZE, GrantRequest, GrantResponse, GrantStatus,
    MAX_REGISTER_RECORDS, Record, RecordKind, RegisterKind, SpanStatus, encode_registration,
};
use telemetry_ring::{MemfdRegion, Region, Writer};
use zerocopy::{FromBytes, IntoBytes};

use super::Rng;
use super::report::{Expect, HostileReport, SeriesReport};

/// The service the hostile producer pretends to be (with a `service` label).
pub const VICTIM: &str = "checkout";
/// The metric it writes under the victim's name.
pub const IMPERSONATED_METRIC: &str = "http.requests";
/// Labels of the impersonating counter (the `service` key claims an identity).
pub const IMPERSONATED_LABELS: [(&str, &str); 3] = [
    ("route", "/checkout"),
    ("service", VICTIM),
    ("status", "200"),
];
/// The `dropped` value it claims before lowering it.
pub const DROPPED_CLAIM: u64 = 4242;

/// How long any one step may wait for metricsd.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the hostile producer could not carry out its plan.
#[derive(Debug)]
pub enum HostileError {
    /// metricsd did not grant a ring.
    Claim(nexus_metrics::ClaimError),
    /// The raw control connection failed.
    Control(&'static str, std::io::Error),
    /// metricsd answered a malformed grant request with something else than
    /// `INVALID_ARGS`.
    NotRefused(u16),
    /// metricsd did not read the ring (or flag it) within the step timeout.
    Timeout(&'static str),
    /// Encoding a registration failed (a bug in the demo).
    Encode(String),
}

impl fmt::Display for HostileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Claim(e) => write!(f, "claiming a ring: {e}"),
            Self::Control(step, e) => write!(f, "raw control connection ({step}): {e}"),
            Self::NotRefused(s) => write!(
                f,
                "a malformed grant request was answered with status {s}, expected INVALID_ARGS (1)"
            ),
            Self::Timeout(what) => write!(f, "timed out after {STEP_TIMEOUT:?} waiting for {what}"),
            Self::Encode(e) => write!(f, "encoding a registration: {e}"),
        }
    }
}

impl std::error::Error for HostileError {}

/// Runs the hostile plan against metricsd's control socket at `socket` for `duration`
/// (the garbage flood on ring C lasts until then).
///
/// ```no_run
/// use std::{path::Path, time::Duration};
/// use metricsd::demo::{hostile, verify};
///
/// let report = hostile::run(Path::new("/run/metricsd.sock"), Duration::from_secs(2))?;
/// // Later, once metricsd flushed: check each effect through logd.
/// let mut v = verify::Verification::default();
/// verify::verify_hostile(Path::new("/run/logd.sock"), "hostile", &report, None, &mut v)?;
/// assert!(v.ok(), "{:?}", v.mismatches);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn run(socket: &Path, duration: Duration) -> Result<HostileReport, HostileError> {
    let start = Instant::now();
    let mut rng = Rng::new(u64::from(std::process::id()) ^ 0xbad5eed);
    let mut report = HostileReport {
        impersonated: VICTIM.to_owned(),
        ..HostileReport::default()
    };

    report.bad_grant_requests = bad_grant_requests(socket)?;

    let source = SocketSource::new(socket).capacity(4096);
    let claim = |hint| source.claim(hint).map_err(HostileError::Claim);

    // Ring A: impersonation, garbage, a lie about drops, then far ahead.
    let (mut a, _) = claim(1)?;
    report.rings += 1;
    let mut reg = [Record::default(); MAX_REGISTER_RECORDS];
    let n = encode_registration(
        1,
        RegisterKind::COUNTER,
        IMPERSONATED_METRIC,
        &IMPERSONATED_LABELS,
        &mut reg,
    )
    .map_err(|e| HostileError::Encode(format!("{e:?}")))?;
    push_all(&mut a, &reg[..n])?;
    let mut impersonated = 0;
    for _ in 0..100 {
        let k = 1 + rng.below(9);
        push(&mut a, Record::counter(1, k))?;
        impersonated += k;
    }
    report.impersonation = Some(SeriesReport {
        name: IMPERSONATED_METRIC.to_owned(),
        labels: IMPERSONATED_LABELS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        expect: Expect::Counter {
            total: impersonated,
        },
    });
    for _ in 0..500 {
        push(&mut a, garbage(&mut rng))?;
        report.garbage_records += 1;
    }
    wait_read(&a, "ring A to be read")?;
    // Claim drops, make sure metricsd saw the claim, then take it back.
    // ORDERING: Relaxed: the push below publishes it (Release on the write position).
    a.region().dropped().store(DROPPED_CLAIM, Ordering::Relaxed);
    report.dropped_claimed = DROPPED_CLAIM;
    push(&mut a, garbage(&mut rng))?;
    report.garbage_records += 1;
    wait_read(&a, "the dropped claim to be read")?;
    // ORDERING: Relaxed: as above.
    a.region().dropped().store(7, Ordering::Relaxed);
    push(&mut a, garbage(&mut rng))?;
    report.garbage_records += 1;
    wait_read(&a, "the lowered dropped count to be read")?;
    report.dropped_lowered += 1;
    scribble(&a, a.capacity() * 4 + 3);
    report.scribbled_ahead += 1;
    report.saw_quarantined += u32::from(wait_abandoned(&a, "ring A's quarantine")?);

    // Ring B: published, read, then moved back.
    let (mut b, _) = claim(2)?;
    report.rings += 1;
    for _ in 0..64 {
        push(&mut b, garbage(&mut rng))?;
        report.garbage_records += 1;
    }
    wait_read(&b, "ring B to be read")?;
    scribble(&b, 0u64.wrapping_sub(16));
    report.scribbled_back += 1;
    report.saw_quarantined += u32::from(wait_abandoned(&b, "ring B's quarantine")?);

    // Ring C: garbage as fast as metricsd takes it, until the end of the run.
    let (mut c, _) = claim(3)?;
    report.rings += 1;
    while start.elapsed() < duration {
        for _ in 0..256 {
            match c.try_push(garbage(&mut rng)) {
                Ok(()) => report.garbage_records += 1,
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }
    wait_read(&c, "ring C to be read")?;
    Ok(report)
}

/// Sends three malformed grant requests on a fresh connection; returns how many were
/// answered `INVALID_ARGS` (all of them, or an error).
fn bad_grant_requests(socket: &Path) -> Result<u32, HostileError> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| HostileError::Control("socket", e.into()))?;
    for id in [
        rustix::net::sockopt::Timeout::Recv,
        rustix::net::sockopt::Timeout::Send,
    ] {
        rustix::net::sockopt::set_socket_timeout(&fd, id, Some(STEP_TIMEOUT))
            .map_err(|e| HostileError::Control("setsockopt", e.into()))?;
    }
    let addr =
        SocketAddrUnix::new(socket).map_err(|e| HostileError::Control("address", e.into()))?;
    rustix::net::connect(&fd, &addr).map_err(|e| HostileError::Control("connect", e.into()))?;

    let mut bad_magic = GrantRequest::ring(0, 0);
    bad_magic.magic ^= 0xffff;
    let mut bad_capacity = GrantRequest::ring(0, 0);
    bad_capacity.capacity = 3;
    let good = GrantRequest::ring(0, 0);
    let frames: [&[u8]; 3] = [
        bad_magic.as_bytes(),
        bad_capacity.as_bytes(),
        &good.as_bytes()[..7],
    ];
    let mut refused = 0;
    for frame in frames {
        rustix::net::send(&fd, frame, SendFlags::NOSIGNAL)
            .map_err(|e| HostileError::Control("send", e.into()))?;
        let mut buf = [0u8; GRANT_FRAME_SIZE];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = rustix::net::recvmsg(
            &fd,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|e| HostileError::Control("recv", e.into()))?;
        let response = GrantResponse::read_from_bytes(&buf[..msg.bytes.min(GRANT_FRAME_SIZE)])
            .map_err(|_| {
                HostileError::Control(
                    "recv",
                    std::io::Error::other(format!("a {}-byte answer", msg.bytes)),
                )
            })?;
        if response.status != GrantStatus::INVALID_ARGS {
            return Err(HostileError::NotRefused(response.status.0));
        }
        refused += 1;
    }
    Ok(refused)
}

/// A record metricsd must reject: an unknown kind, a sample on a key never registered,
/// a span end or attribute for a span never started, a span id of zero.
fn garbage(rng: &mut Rng) -> Record {
    let key = 1000 + rng.below(1 << 20) as u32;
    let w = [rng.next(), rng.next(), rng.next()];
    match rng.below(6) {
        0 => Record {
            // Kinds 0x0100.. are not defined by the ABI.
            kind: RecordKind(0x0100 | rng.below(0xfe00) as u16),
            flags: rng.next() as u16,
            key,
            words: w,
        },
        1 => Record::counter(key, w[0]),
        2 => Record::histogram(key, w[0]),
        3 => Record::span_end(key, w[0] | 1, w[1], SpanStatus::OK),
        4 => Record::span_attr(key, w[0] | 1, AttrValueType::U64, w[1]),
        _ => Record::span_start(key, 0, 0, w[1]),
    }
}

fn push(w: &mut Writer<MemfdRegion>, r: Record) -> Result<(), HostileError> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while w.try_push(r).is_err() {
        if Instant::now() >= deadline {
            return Err(HostileError::Timeout("room in the ring"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

fn push_all(w: &mut Writer<MemfdRegion>, rs: &[Record]) -> Result<(), HostileError> {
    for r in rs {
        push(w, *r)?;
    }
    Ok(())
}

/// Waits until metricsd's read position reaches everything published.
fn wait_read(w: &Writer<MemfdRegion>, what: &'static str) -> Result<(), HostileError> {
    let region = w.region();
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        // ORDERING: Relaxed: our own last store of the write position.
        let write = region.write_pos().load(Ordering::Relaxed);
        // ORDERING: Acquire pairs with the consumer's Release store of its read position.
        let read = region.read_pos().load(Ordering::Acquire);
        if read == write {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(HostileError::Timeout(what));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Moves the shared write position by `delta` (wrapping), behind the writer's back.
fn scribble(w: &Writer<MemfdRegion>, delta: u64) {
    let pos = w.region().write_pos();
    // ORDERING: Relaxed load of our own position; Release so the bogus value is seen
    // like any publication.
    let now = pos.load(Ordering::Relaxed);
    pos.store(now.wrapping_add(delta), Ordering::Release);
}

/// Waits until metricsd flags the ring (quarantined or closed); true when it did.
fn wait_abandoned(w: &Writer<MemfdRegion>, what: &'static str) -> Result<bool, HostileError> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !w.is_abandoned() {
        if Instant::now() >= deadline {
            return Err(HostileError::Timeout(what));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(true)
}
