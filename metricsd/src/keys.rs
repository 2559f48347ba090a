//! A ring's key table: what each key registered in that ring is bound to.
//!
//! Registration is per ring: a key means nothing outside the ring that registered it.
//! The table is bounded (`rings.max_keys_per_ring`). Keys below the bound are looked up
//! by index (the producer library numbers keys from 1), others in a hash map, so a
//! hostile producer's choice of keys cannot slow the lookup.

use std::collections::HashMap;
use std::sync::Arc;

use telemetry_abi::{RegisterKind, Registration};

use crate::aggregate::SeriesId;

/// What a registered key resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A counter, gauge or histogram series.
    Series(SeriesId),
    /// A series the caps refused: samples are counted (`series_cap`), not summed.
    Refused,
    /// A span name and its duration histogram (`None` when the caps refused it).
    Span {
        /// The span's name.
        name: Arc<str>,
        /// The duration series.
        duration: Option<SeriesId>,
    },
    /// A span attribute key.
    Attr {
        /// The key.
        key: Arc<str>,
        /// Whether values under it are redacted.
        sensitive: bool,
    },
    /// A string value for span attributes.
    Str(Arc<str>),
}

/// One registered key.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The registered kind.
    pub what: RegisterKind,
    /// Name then label keys and values, as registered (to detect a conflicting
    /// re-registration).
    content: Box<[Box<str>]>,
    /// What it resolves to.
    pub target: Target,
}

impl Entry {
    /// The registered name.
    pub fn name(&self) -> &str {
        self.content.first().map_or("", |n| n)
    }

    /// The registered labels, as the producer gave them.
    pub fn labels(&self) -> Vec<(&str, &str)> {
        self.content
            .get(1..)
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|kv| (&*kv[0], &*kv[1]))
            .collect()
    }

    /// The series this entry holds a binding to, if any.
    pub fn series(&self) -> Option<SeriesId> {
        match self.target {
            Target::Series(id) => Some(id),
            Target::Span { duration, .. } => duration,
            _ => None,
        }
    }
}

/// The outcome of [`KeyTable::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// A new key, and there is room.
    New,
    /// Already registered with the same content: nothing to do.
    Same,
    /// Already registered with other content: refuse.
    Conflict,
    /// The table is full.
    Full,
}

fn content_of(reg: &Registration<'_>) -> Box<[Box<str>]> {
    let mut v: Vec<Box<str>> = Vec::with_capacity(1 + 2 * reg.labels().len());
    v.push(reg.name.into());
    for l in reg.labels() {
        v.push(l.key.into());
        v.push(l.value.into());
    }
    v.into_boxed_slice()
}

fn same_content(entry: &Entry, reg: &Registration<'_>) -> bool {
    let labels = reg.labels();
    entry.what == reg.what
        && entry.content.len() == 1 + 2 * labels.len()
        && *entry.content[0] == *reg.name
        && labels.iter().enumerate().all(|(i, l)| {
            *entry.content[1 + 2 * i] == *l.key && *entry.content[2 + 2 * i] == *l.value
        })
}

/// A ring's keys.
#[derive(Debug)]
pub struct KeyTable {
    direct: Vec<u32>,
    sparse: HashMap<u32, u32>,
    entries: Vec<Entry>,
    max: usize,
}

impl KeyTable {
    /// An empty table holding at most `max` keys.
    pub fn new(max: u32) -> Self {
        Self {
            direct: Vec::new(),
            sparse: HashMap::new(),
            entries: Vec::new(),
            max: max as usize,
        }
    }

    /// Keys registered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of `key`.
    #[inline]
    pub fn get(&self, key: u32) -> Option<&Entry> {
        let slot = match self.direct.get(key as usize) {
            Some(&slot) => slot,
            None if (key as usize) < self.max => 0,
            None => self.sparse.get(&key).copied().unwrap_or(0),
        };
        slot.checked_sub(1)
            .and_then(|i| self.entries.get(i as usize))
    }

    /// How a registration of `reg` would be received.
    pub fn check(&self, reg: &Registration<'_>) -> Check {
        match self.get(reg.key) {
            Some(e) if same_content(e, reg) => Check::Same,
            Some(_) => Check::Conflict,
            None if self.entries.len() >= self.max => Check::Full,
            None => Check::New,
        }
    }

    /// The entry of `key`, to rebind it.
    pub fn get_mut(&mut self, key: u32) -> Option<&mut Entry> {
        let slot = match self.direct.get(key as usize) {
            Some(&slot) => slot,
            None if (key as usize) < self.max => 0,
            None => self.sparse.get(&key).copied().unwrap_or(0),
        };
        slot.checked_sub(1)
            .and_then(|i| self.entries.get_mut(i as usize))
    }

    /// Every entry, in registration order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// Binds `reg.key` (which [`check`](Self::check) found `New`) to `target`.
    pub fn insert(&mut self, reg: &Registration<'_>, target: Target) {
        if self.entries.len() >= self.max || self.get(reg.key).is_some() {
            return;
        }
        self.entries.push(Entry {
            what: reg.what,
            content: content_of(reg),
            target,
        });
        let slot = self.entries.len() as u32;
        let key = reg.key as usize;
        if key < self.max {
            if self.direct.len() <= key {
                self.direct.resize(key + 1, 0);
            }
            self.direct[key] = slot;
        } else {
            self.sparse.insert(reg.key, slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry_abi::{MAX_REGISTER_RECORDS, Record, RegistrationBuf, encode_registration};

    fn with_reg(key: u32, name: &str, labels: &[(&str, &str)], f: impl FnOnce(&Registration<'_>)) {
        let mut out = [Record::default(); MAX_REGISTER_RECORDS];
        let n =
            encode_registration(key, RegisterKind::COUNTER, name, labels, &mut out).expect("valid");
        let mut buf = RegistrationBuf::new();
        for r in &out[..n - 1] {
            assert!(buf.feed(r).expect("valid").is_none());
        }
        let reg = buf.feed(&out[n - 1]).expect("valid").expect("complete");
        f(&reg);
    }

    #[test]
    fn keys_bind_once_and_conflicts_are_seen() {
        let (seven, eight) = test_ids();
        let mut t = KeyTable::new(2);
        with_reg(1, "a", &[("x", "1")], |r| {
            assert_eq!(t.check(r), Check::New);
            t.insert(r, Target::Series(seven));
        });
        with_reg(1, "a", &[("x", "1")], |r| {
            assert_eq!(t.check(r), Check::Same)
        });
        with_reg(1, "a", &[("x", "2")], |r| {
            assert_eq!(t.check(r), Check::Conflict)
        });
        with_reg(1_000_000, "b", &[], |r| {
            assert_eq!(t.check(r), Check::New);
            t.insert(r, Target::Series(eight));
        });
        with_reg(3, "c", &[], |r| assert_eq!(t.check(r), Check::Full));
        assert_eq!(
            t.get(1).map(|e| e.target.clone()),
            Some(Target::Series(seven))
        );
        assert_eq!(
            t.get(1_000_000).map(|e| e.target.clone()),
            Some(Target::Series(eight))
        );
        assert!(t.get(2).is_none());
        assert!(t.get(u32::MAX).is_none());
        assert_eq!(t.len(), 2);
        let e = t.get(1).expect("registered");
        assert_eq!((e.name(), e.labels()), ("a", vec![("x", "1")]));
        assert_eq!(e.series(), Some(seven));
    }

    /// Two distinct series ids from a real store.
    fn test_ids() -> (SeriesId, SeriesId) {
        use crate::aggregate::{MetricKind, Resolved, Store};
        use crate::config::{RedactionConfig, SeriesConfig};
        use crate::redact::Redactor;
        let mut s = Store::new(
            SeriesConfig::default(),
            Redactor::new(&RedactionConfig::default().patterns),
            &std::collections::BTreeMap::new(),
        );
        let svc = s.service("t");
        let mut id = |n: &str| match s.resolve(svc, MetricKind::Counter, n, &[]) {
            Resolved::Series(id) => id,
            Resolved::Refused => panic!("fits"),
        };
        (id("seven"), id("eight"))
    }
}
