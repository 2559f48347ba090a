//! Per-sender budgets: who a sender is for accounting, and its token buckets.

use std::time::Instant;

use crate::config::{QuotaConfig, QuotaKey};
use crate::record::Identity;
use crate::status::Reason;

/// The key budgets and journal shares are kept under.
///
/// With `quota.key = "process"` (default) each sending process (its pid from
/// SO_PEERCRED) is its own sender; with `"service"` every process the policy maps to one
/// service shares one budget and one share.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SenderKey {
    /// Service name from policy.
    pub service: String,
    /// The process, in `"process"` mode.
    pub pid: Option<u32>,
}

impl SenderKey {
    /// The key of an identity under a key mode.
    pub fn of(id: &Identity, mode: QuotaKey) -> SenderKey {
        SenderKey {
            service: id.service.clone(),
            pid: match mode {
                QuotaKey::Process => Some(id.pid),
                QuotaKey::Service => None,
            },
        }
    }
}

impl core::fmt::Display for SenderKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "{}[{pid}]", self.service),
            None => f.write_str(&self.service),
        }
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` held, starting full.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Bucket {
        #[expect(
            clippy::cast_precision_loss,
            reason = "rates and bursts far below 2^52; a token more or less is immaterial"
        )]
        let (rate, burst) = (rate as f64, burst.max(1) as f64);
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Whether `n` tokens are available (after refilling to `now`).
    pub fn has(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        #[expect(clippy::cast_precision_loss, reason = "n is at most a frame size")]
        let n = n as f64;
        self.tokens >= n
    }

    /// Takes `n` tokens; call after [`Bucket::has`] said yes.
    pub fn take(&mut self, n: u64) {
        #[expect(clippy::cast_precision_loss, reason = "n is at most a frame size")]
        let n = n as f64;
        self.tokens = (self.tokens - n).max(0.0);
    }
}

/// A sender's two buckets: records per second and bytes per second.
#[derive(Debug, Clone)]
pub struct Budget {
    records: Bucket,
    bytes: Bucket,
}

impl Budget {
    /// Full buckets per the config.
    pub fn new(q: &QuotaConfig, now: Instant) -> Budget {
        Budget {
            records: Bucket::new(q.records_per_sec, q.records_burst, now),
            bytes: Bucket::new(q.bytes_per_sec, q.bytes_burst, now),
        }
    }

    /// Charges one record of `bytes` bytes, or says which bucket is empty (charging
    /// neither).
    pub fn charge(&mut self, bytes: u64, now: Instant) -> Result<(), Reason> {
        if !self.records.has(1, now) {
            return Err(Reason::RecordRate);
        }
        if !self.bytes.has(bytes, now) {
            return Err(Reason::ByteRate);
        }
        self.records.take(1);
        self.bytes.take(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_at_rate_up_to_burst() {
        let t0 = Instant::now();
        let q = QuotaConfig {
            records_per_sec: 10,
            records_burst: 3,
            bytes_per_sec: 1000,
            bytes_burst: 100,
            ..QuotaConfig::default()
        };
        let mut b = Budget::new(&q, t0);
        for _ in 0..3 {
            assert_eq!(b.charge(1, t0), Ok(()));
        }
        assert_eq!(b.charge(1, t0), Err(Reason::RecordRate));
        // 100 ms later one record token is back; a 101-byte record never fits the burst.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.charge(101, t1), Err(Reason::ByteRate));
        assert_eq!(b.charge(10, t1), Ok(()));
        // A long pause refills only to the burst.
        let t2 = t1 + Duration::from_secs(100);
        for _ in 0..3 {
            assert_eq!(b.charge(1, t2), Ok(()));
        }
        assert_eq!(b.charge(1, t2), Err(Reason::RecordRate));
    }

    #[test]
    fn key_modes() {
        let id = Identity {
            service: "s".into(),
            pid: 9,
            uid: 1,
            gid: 1,
        };
        assert_eq!(SenderKey::of(&id, QuotaKey::Process).to_string(), "s[9]");
        assert_eq!(SenderKey::of(&id, QuotaKey::Service).to_string(), "s");
    }
}
