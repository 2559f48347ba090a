//! Small per-operation errors.

use core::fmt;

/// The ring had no room: nothing was written. Returned by every `Writer` push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ring is full")
    }
}

impl core::error::Error for Full {}

/// A way a producer broke the ring protocol. Any one of them quarantines the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Violation {
    /// The write position is more than a capacity ahead of the read position (or
    /// behind it): `write - read > capacity`.
    WriteOutOfRange {
        /// The reader's own read position.
        read: u64,
        /// The write position the producer published.
        write: u64,
    },
    /// The write position went back from a value already observed.
    WriteMovedBack {
        /// The write position observed before.
        before: u64,
        /// The write position observed now.
        now: u64,
    },
}

impl Violation {
    /// A short stable name for counting and export.
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::WriteOutOfRange { .. } => "write_out_of_range",
            Self::WriteMovedBack { .. } => "write_moved_back",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::WriteOutOfRange { read, write } => write!(
                f,
                "write position {write} is out of range of read position {read} \
                 (expected 0..=capacity records ahead)"
            ),
            Self::WriteMovedBack { before, now } => {
                write!(f, "write position moved back from {before} to {now}")
            }
        }
    }
}

impl core::error::Error for Violation {}

/// The ring is quarantined: the reader found a protocol violation earlier and will not
/// read it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quarantined(pub Violation);

impl fmt::Display for Quarantined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ring quarantined: {}", self.0)
    }
}

impl core::error::Error for Quarantined {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use core::error::Error;

    use super::*;

    #[test]
    fn errors_say_what_happened_with_the_positions() {
        assert_eq!(Full.to_string(), "ring is full");
        let range = Violation::WriteOutOfRange { read: 4, write: 70 };
        assert_eq!(
            range.to_string(),
            "write position 70 is out of range of read position 4 \
             (expected 0..=capacity records ahead)"
        );
        let back = Violation::WriteMovedBack { before: 9, now: 3 };
        assert_eq!(back.to_string(), "write position moved back from 9 to 3");
        assert_eq!(
            Quarantined(back).to_string(),
            "ring quarantined: write position moved back from 9 to 3"
        );
        let source = Quarantined(range).source().map(ToString::to_string);
        assert_eq!(
            source,
            Some(range.to_string()),
            "the violation is the source"
        );
        assert_eq!(range.reason(), "write_out_of_range");
        assert_eq!(back.reason(), "write_moved_back");
    }
}
