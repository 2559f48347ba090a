//! `SELFTEST: logd hardening rejects`: an oversized frame and oversized records, malformed
//! frames (raw bytes), records claiming an identity, and a burst past the per-sender
//! record budget. Each must get the documented status and reason, nothing refused may be
//! stored, the one good record must carry the kernel's identity, and logd's STATS for
//! this process must have moved by exactly what the replies said.

use anyhow::{Context, Result, bail, ensure};
use logd::frame::{HEADER_LEN, KIND_APPEND, KIND_STATS, Reply, VERSION};
use logd::policy::Policy;
use logd::{Level, Query, Reason, Record, RecordStatus, Reject, SenderStats, Stats};

use super::Ctx;

/// Scope of the probe records.
const SCOPE: &str = "selftest.hardening";
/// Scope of the rate-limit burst.
const RATE_SCOPE: &str = "selftest.rate";
/// Most frames sent while waiting for the budget to run out.
const MAX_RATE_FRAMES: usize = 20;

/// What this sender's STATS counters must have moved by.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    accepted: u64,
    invalid_args: u64,
    over_limit: u64,
    rate_limited: u64,
}

impl Tally {
    fn of(s: Option<&SenderStats>) -> Self {
        s.map_or_else(Self::default, |s| Self {
            accepted: s.accepted,
            invalid_args: s.rejected.invalid_args,
            over_limit: s.rejected.over_limit,
            rate_limited: s.rejected.rate_limited,
        })
    }

    fn since(self, before: Self) -> Self {
        Self {
            accepted: self.accepted.wrapping_sub(before.accepted),
            invalid_args: self.invalid_args.wrapping_sub(before.invalid_args),
            over_limit: self.over_limit.wrapping_sub(before.over_limit),
            rate_limited: self.rate_limited.wrapping_sub(before.rate_limited),
        }
    }
}

fn me(stats: &Stats, pid: u32) -> Option<&SenderStats> {
    stats.senders.iter().find(|s| s.pid == Some(pid))
}

/// A frame header: `body_len`, version, kind, flags.
fn header(body_len: u32, version: u8, kind: u8, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN);
    b.extend_from_slice(&body_len.to_le_bytes());
    b.push(version);
    b.push(kind);
    b.extend_from_slice(&flags.to_le_bytes());
    b
}

fn expect_error(reply: Reply, class: Reject, reason: Reason, what: &str) -> Result<()> {
    match reply {
        Reply::Error(e) if e.class == class && e.reason == reason => Ok(()),
        other => bail!(
            "{what}: got {other:?}, expected ERROR {class}/{}",
            reason.name()
        ),
    }
}

pub(crate) fn run(ctx: &mut Ctx) -> Result<String> {
    let pid = std::process::id();
    let uid = rustix::process::getuid().as_raw();
    let limits = ctx.logd_config.limits.clone();
    let quota = ctx.logd_config.quota.clone();
    let before_stats = ctx.logd.client().stats()?;
    let before = Tally::of(me(&before_stats, pid));
    let mut want = Tally::default();

    // An APPEND frame one byte past max_frame_bytes: refused from its header alone, and
    // the connection closed.
    let body = limits.max_frame_bytes - HEADER_LEN as u32 + 1;
    let reply = ctx
        .logd
        .client()
        .request_raw(&header(body, VERSION, KIND_APPEND, 0))?;
    expect_error(
        reply,
        Reject::OverLimit,
        Reason::FrameTooLarge,
        &format!("an APPEND frame of {} bytes", body as usize + HEADER_LEN),
    )?;
    want.over_limit += 1;
    ctx.logd.reconnect()?;

    // Malformed frames: the connection stays usable after each.
    let mut truncated = header(4, VERSION, KIND_APPEND, 0);
    truncated.extend_from_slice(&1u32.to_le_bytes()); // one record announced, none sent
    let malformed = [
        (
            truncated,
            Reason::Malformed,
            "an APPEND announcing a record it lacks",
        ),
        (
            header(0, VERSION + 1, KIND_STATS, 0),
            Reason::UnsupportedVersion,
            "version 2",
        ),
        (
            header(0, VERSION, 0x42, 0),
            Reason::UnknownKind,
            "kind 0x42",
        ),
        (
            header(0, VERSION, KIND_STATS, 1),
            Reason::UnknownKind,
            "nonzero flags",
        ),
    ];
    for (bytes, reason, what) in malformed {
        let reply = ctx.logd.client().request_raw(&bytes)?;
        expect_error(reply, Reject::InvalidArgs, reason, what)?;
        want.invalid_args += 1;
    }

    // One frame: a good record, three oversized ones, three claiming an identity.
    let nonce = format!("{pid}-{}", logd::time::now_ns());
    let good = Record::new(Level::Info, SCOPE, "probe")
        .field("probe", &nonce)
        .field("subject", "selftest");
    let long = |n: u32, c: &str| c.repeat(n as usize + 1);
    let frame = [
        good.clone(),
        Record::new(Level::Info, SCOPE, long(limits.max_message_bytes, "m")),
        Record::new(Level::Info, SCOPE, "v").field("v", long(limits.max_value_bytes, "v")),
        Record::new(Level::Info, SCOPE, "k").field(long(limits.max_key_bytes, "k"), "k"),
        Record::new(Level::Info, SCOPE, "spoof").field("service", "metricsd"),
        Record::new(Level::Info, SCOPE, "spoof").field("pid", "1"),
        Record::new(Level::Info, SCOPE, "spoof").field("_SYSTEMD_UNIT", "logd.service"),
    ];
    let expected = [
        None,
        Some((Reject::OverLimit, Reason::MessageTooLong)),
        Some((Reject::OverLimit, Reason::ValueTooLong)),
        Some((Reject::OverLimit, Reason::KeyTooLong)),
        Some((Reject::InvalidArgs, Reason::IdentityClaim)),
        Some((Reject::InvalidArgs, Reason::IdentityClaim)),
        Some((Reject::InvalidArgs, Reason::IdentityClaim)),
    ];
    let report = ctx.logd.client().append_frame(&frame)?;
    ensure!(
        report.statuses.len() == frame.len(),
        "{} statuses for {} records",
        report.statuses.len(),
        frame.len()
    );
    let mut good_id = 0;
    for (i, (got, want_status)) in report.statuses.iter().zip(expected).enumerate() {
        match (got, want_status) {
            (RecordStatus::Accepted(id), None) => {
                good_id = *id;
                want.accepted += 1;
            }
            (RecordStatus::Rejected(class, reason), Some((c, r)))
                if *class == c && *reason == r =>
            {
                match c {
                    Reject::OverLimit => want.over_limit += 1,
                    _ => want.invalid_args += 1,
                }
            }
            (got, want_status) => {
                bail!(
                    "record {i} of the probe frame: got {got:?}, expected {want_status:?} (None: stored)"
                )
            }
        }
    }

    // Only the good record is stored, stamped with the kernel's word for who sent it.
    let stored = ctx
        .logd
        .client()
        .query_all(&Query::new().scope(SCOPE), 1000)?;
    let service = Policy::new(&ctx.logd_config.services)
        .context("logd's service policy")?
        .service_for(uid);
    match stored.as_slice() {
        [r] if r.id == good_id
            && r.record == good
            && r.sender.pid == pid
            && r.sender.uid == uid
            && r.sender.service == service => {}
        other => bail!(
            "scope {SCOPE} holds {other:?}; expected only record #{good_id} {good:?} from \
             {service} pid {pid} uid {uid}"
        ),
    }

    // A burst past the per-sender record budget, in frames as large as the budget.
    let per_frame = quota
        .records_burst
        .min(u64::from(limits.max_records_per_frame))
        .max(1) as usize;
    let burst: Vec<Record> = (0..per_frame)
        .map(|i| Record::new(Level::Info, RATE_SCOPE, "burst").field("i", i.to_string()))
        .collect();
    let mut rate_limited = 0u64;
    let mut accepted_ids = Vec::new();
    let mut frames = 0;
    while rate_limited == 0 && frames < MAX_RATE_FRAMES {
        frames += 1;
        let report = ctx.logd.client().append_frame(&burst)?;
        for status in &report.statuses {
            match status {
                RecordStatus::Accepted(id) => {
                    want.accepted += 1;
                    accepted_ids.push(*id);
                }
                RecordStatus::Rejected(Reject::RateLimited, Reason::RecordRate) => {
                    rate_limited += 1;
                }
                other => bail!("burst frame {frames}: a record got {other:?}"),
            }
        }
    }
    ensure!(
        rate_limited > 0,
        "{frames} frames of {per_frame} records never ran out of the budget of {} records \
         (burst {})",
        quota.records_per_sec,
        quota.records_burst
    );
    want.rate_limited += rate_limited;

    // Read back: logd stored exactly the burst records it accepted, under the ids its
    // replies gave, and none of those it refused.
    let sent = frames * per_frame;
    let stored = ctx
        .logd
        .client()
        .query_all(&Query::new().scope(RATE_SCOPE), sent + 1)?;
    let mut stored_ids: Vec<u64> = stored
        .iter()
        .filter(|r| r.sender.pid == pid)
        .map(|r| r.id)
        .collect();
    stored_ids.sort_unstable();
    accepted_ids.sort_unstable();
    ensure!(
        stored_ids == accepted_ids,
        "scope {RATE_SCOPE} holds {} records from pid {pid}; logd accepted {} of the {sent} \
         burst records and refused {rate_limited} (ids stored {:?}..., accepted {:?}...)",
        stored_ids.len(),
        accepted_ids.len(),
        &stored_ids[..stored_ids.len().min(5)],
        &accepted_ids[..accepted_ids.len().min(5)]
    );

    // STATS: this sender's counters moved by exactly what the replies said, and the
    // totals by at least as much.
    let after_stats = ctx.logd.client().stats()?;
    let got = Tally::of(me(&after_stats, pid)).since(before);
    ensure!(
        got == want,
        "STATS for pid {pid} moved by {got:?}; the replies say {want:?}"
    );
    let totals = [
        (
            "invalid_args",
            after_stats.rejected.invalid_args - before_stats.rejected.invalid_args,
            want.invalid_args,
        ),
        (
            "over_limit",
            after_stats.rejected.over_limit - before_stats.rejected.over_limit,
            want.over_limit,
        ),
        (
            "rate_limited",
            after_stats.rejected.rate_limited - before_stats.rejected.rate_limited,
            want.rate_limited,
        ),
    ];
    for (class, total, mine) in totals {
        ensure!(
            total >= mine,
            "STATS total {class} moved by {total}, less than this sender's {mine}"
        );
    }
    Ok(format!(
        "frame_too_large 1, malformed 4, oversized records 3, identity claims 3, \
         rate_limited {rate_limited} of {} burst records, the {} accepted read back and \
         nothing refused stored; STATS for pid {pid}: \
         invalid_args +{}, over_limit +{}, rate_limited +{}, accepted +{}",
        frames * per_frame,
        accepted_ids.len(),
        got.invalid_args,
        got.over_limit,
        got.rate_limited,
        got.accepted
    ))
}
