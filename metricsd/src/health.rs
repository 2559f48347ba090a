//! metricsd's own health: why records were rejected, by class and reason.

use std::fmt;

/// The three reject classes every refusal falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// The input was malformed or meaningless.
    InvalidArgs,
    /// A bound was reached.
    OverLimit,
    /// Too much too fast.
    RateLimited,
}

impl Class {
    /// The exported name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgs => "invalid_args",
            Self::OverLimit => "over_limit",
            Self::RateLimited => "rate_limited",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = ($name:literal, $class:ident),)*) => {
        /// Why one record (or registration) was rejected by the drain loop.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The exported name.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }

            /// The class the reason belongs to.
            pub const fn class(self) -> Class {
                match self {
                    $(Self::$variant => Class::$class,)*
                }
            }
        }
    };
}

reasons! {
    /// A kind the ABI does not define (withheld by the reader).
    UnknownKind = ("unknown_kind", InvalidArgs),
    /// A record's key was never registered in its ring.
    UnregisteredKey = ("unregistered_key", InvalidArgs),
    /// A record's kind does not match its key's registered kind.
    KindMismatch = ("kind_mismatch", InvalidArgs),
    /// A malformed registration (the ABI's checks refused it).
    BadRegistration = ("bad_registration", InvalidArgs),
    /// A registration started and another record arrived before it was complete.
    RegistrationInterrupted = ("registration_interrupted", InvalidArgs),
    /// A key re-registered with different content; the first is kept.
    RegistrationConflict = ("registration_conflict", InvalidArgs),
    /// The ring's key table is full (`rings.max_keys_per_ring`).
    KeyTableFull = ("key_table_full", OverLimit),
    /// A new series found every cap and the overflow cap reached; its samples are
    /// counted here instead of summed.
    SeriesCap = ("series_cap", OverLimit),
    /// A span id of zero.
    SpanIdZero = ("span_id_zero", InvalidArgs),
    /// (v1.1) A `span_open` not immediately preceded by its `span_trace`.
    SpanNoTrace = ("span_no_trace", InvalidArgs),
    /// (v1.1) A `span_trace` with a zero trace id.
    SpanTraceZero = ("span_trace_zero", InvalidArgs),
    /// A span started with an id already open in its ring.
    SpanDuplicate = ("span_duplicate", InvalidArgs),
    /// An end or attribute for a span not open in its ring.
    SpanUnknown = ("span_unknown", InvalidArgs),
    /// A span ended under another name than it started with.
    SpanNameMismatch = ("span_name_mismatch", InvalidArgs),
    /// A span status the ABI does not define.
    SpanStatus = ("span_status", InvalidArgs),
    /// A span ended before it started (its clock went back).
    SpanEndBeforeStart = ("span_end_before_start", InvalidArgs),
    /// A span attribute's value type is unknown, or its string is not registered.
    AttrValue = ("attr_value", InvalidArgs),
    /// Too many spans open (`spans.max_live`).
    LiveSpansFull = ("live_spans_full", OverLimit),
    /// Too many attributes on one span (`spans.max_attrs`).
    AttrsFull = ("attrs_full", OverLimit),
    /// A float sample that is NaN or infinite (a gauge set or increment, a histogram
    /// observation).
    NotFinite = ("not_finite", InvalidArgs),
    /// A metric's metadata past the metadata cap (one per series allowed in total).
    MetadataCap = ("metadata_cap", OverLimit),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts per [`Reason`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RejectCounts {
    counts: [u64; Reason::ALL.len()],
}

impl RejectCounts {
    /// Adds `n` rejects for `reason`.
    #[inline]
    pub fn add(&mut self, reason: Reason, n: u64) {
        let i = reason as usize;
        self.counts[i] = self.counts[i].saturating_add(n);
    }

    /// Rejects counted for `reason`.
    pub fn get(&self, reason: Reason) -> u64 {
        self.counts[reason as usize]
    }

    /// Rejects counted in `class`.
    pub fn class_total(&self, class: Class) -> u64 {
        Reason::ALL
            .iter()
            .filter(|r| r.class() == class)
            .map(|r| self.get(*r))
            .sum()
    }

    /// Every rejects counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(reason, count)` for every reason with a nonzero count.
    pub fn nonzero(&self) -> impl Iterator<Item = (Reason, u64)> + '_ {
        Reason::ALL
            .iter()
            .map(|r| (*r, self.get(*r)))
            .filter(|(_, n)| *n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_roll_up_by_class() {
        let mut c = RejectCounts::default();
        c.add(Reason::UnregisteredKey, 2);
        c.add(Reason::KindMismatch, 1);
        c.add(Reason::SeriesCap, 5);
        assert_eq!(c.class_total(Class::InvalidArgs), 3);
        assert_eq!(c.class_total(Class::OverLimit), 5);
        assert_eq!(c.class_total(Class::RateLimited), 0);
        assert_eq!(c.total(), 8);
        assert_eq!(c.nonzero().count(), 3);
        assert_eq!(Reason::LiveSpansFull.class().as_str(), "over_limit");
    }
}
