//! The in-memory journal: bounded by records and bytes, with fair-share eviction.
//!
//! When a new record does not fit, the record evicted is the oldest one of the sender
//! holding the most of the resource that ran out (records or bytes); on a tie the
//! incoming sender pays. So a sender flooding at full speed is always the largest holder
//! and evicts only its own records, while a sender holding no more than an equal share is
//! never evicted by another.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;

use crate::quota::SenderKey;
use crate::record::StoredRecord;

struct Entry {
    rec: StoredRecord,
    cost: u64,
    key: SenderKey,
}

#[derive(Default)]
struct Holding {
    ids: VecDeque<u64>,
    bytes: u64,
}

/// The bounded in-memory journal.
pub struct Journal {
    max_records: u64,
    max_bytes: u64,
    records: BTreeMap<u64, Entry>,
    holders: HashMap<SenderKey, Holding>,
    bytes: u64,
    /// The largest id ever evicted (0: none): below it, the memory journal may have
    /// gaps that only the disk journal fills.
    max_evicted: u64,
}

/// A record that was evicted to make room: whose it was.
pub type Evicted = SenderKey;

impl Journal {
    /// An empty journal with these bounds.
    pub fn new(max_records: u64, max_bytes: u64) -> Journal {
        Journal {
            max_records: max_records.max(1),
            max_bytes,
            records: BTreeMap::new(),
            holders: HashMap::new(),
            bytes: 0,
            max_evicted: 0,
        }
    }

    /// Records held.
    pub fn len(&self) -> u64 {
        self.records.len() as u64
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Bytes held (encoded record sizes).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// `(records, bytes)` held by one sender.
    pub fn held(&self, key: &SenderKey) -> (u64, u64) {
        self.holders
            .get(key)
            .map_or((0, 0), |h| (h.ids.len() as u64, h.bytes))
    }

    /// The largest id ever evicted from memory (0: none).
    pub fn max_evicted(&self) -> u64 {
        self.max_evicted
    }

    /// The smallest id held, if any.
    pub fn first_id(&self) -> Option<u64> {
        self.records.first_key_value().map(|(&id, _)| id)
    }

    /// Whether a record id is held.
    pub fn contains(&self, id: u64) -> bool {
        self.records.contains_key(&id)
    }

    /// Records with id greater than `after`, in id order.
    pub fn after(&self, after: u64) -> impl Iterator<Item = &StoredRecord> {
        self.records
            .range((Bound::Excluded(after), Bound::Unbounded))
            .map(|(_, e)| &e.rec)
    }

    /// Stores a record under `key`, evicting as needed; returns whose records were
    /// evicted (one entry per record). A record larger than `max_bytes` is not stored
    /// (config validation makes that impossible for a record that passed the limits).
    pub fn insert(&mut self, key: SenderKey, rec: StoredRecord) -> Vec<Evicted> {
        let cost = rec.cost() as u64;
        let mut evicted = Vec::new();
        if cost > self.max_bytes || self.records.contains_key(&rec.id) {
            return evicted;
        }
        loop {
            let by_count = self.len() + 1 > self.max_records;
            let by_bytes = self.bytes + cost > self.max_bytes;
            if !by_count && !by_bytes {
                break;
            }
            let Some(victim) = self.largest(&key, by_count) else {
                break;
            };
            if self.evict_oldest(&victim) {
                evicted.push(victim);
            } else {
                break;
            }
        }
        let id = rec.id;
        let h = self.holders.entry(key.clone()).or_default();
        // Ids normally arrive in order; recovery may not, so keep each holder sorted.
        match h.ids.back() {
            Some(&last) if last > id => {
                let pos = h.ids.partition_point(|&x| x < id);
                h.ids.insert(pos, id);
            }
            _ => h.ids.push_back(id),
        }
        h.bytes += cost;
        self.bytes += cost;
        self.records.insert(id, Entry { rec, cost, key });
        evicted
    }

    /// The holder with the most records (`by_count`) or bytes; ties go to `prefer`.
    fn largest(&self, prefer: &SenderKey, by_count: bool) -> Option<SenderKey> {
        let measure = |h: &Holding| {
            if by_count {
                h.ids.len() as u64
            } else {
                h.bytes
            }
        };
        let mut best: Option<(&SenderKey, u64)> =
            self.holders.get(prefer).map(|h| (prefer, measure(h)));
        for (k, h) in &self.holders {
            let m = measure(h);
            if best.is_none_or(|(_, b)| m > b) {
                best = Some((k, m));
            }
        }
        best.filter(|(_, m)| *m > 0).map(|(k, _)| k.clone())
    }

    fn evict_oldest(&mut self, key: &SenderKey) -> bool {
        let Some(h) = self.holders.get_mut(key) else {
            return false;
        };
        let Some(id) = h.ids.pop_front() else {
            return false;
        };
        let empty = h.ids.is_empty();
        self.max_evicted = self.max_evicted.max(id);
        if let Some(e) = self.records.remove(&id) {
            h.bytes = h.bytes.saturating_sub(e.cost);
            self.bytes = self.bytes.saturating_sub(e.cost);
            debug_assert_eq!(&e.key, key);
        }
        if empty {
            self.holders.remove(key);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Identity, Level, Record};

    fn rec(id: u64, pid: u32) -> StoredRecord {
        StoredRecord {
            id,
            received_ns: id,
            sender: Identity {
                service: "s".into(),
                pid,
                uid: 0,
                gid: 0,
            },
            record: Record::new(Level::Info, "x", "m"),
        }
    }

    fn key(pid: u32) -> SenderKey {
        SenderKey {
            service: "s".into(),
            pid: Some(pid),
        }
    }

    #[test]
    fn flooder_evicts_only_itself() {
        let mut j = Journal::new(10, u64::MAX);
        for id in 1..=3 {
            assert!(j.insert(key(1), rec(id, 1)).is_empty());
        }
        for id in 4..=1000 {
            for e in j.insert(key(2), rec(id, 2)) {
                assert_eq!(e, key(2));
            }
        }
        assert_eq!(j.len(), 10);
        assert_eq!(j.held(&key(1)).0, 3);
        let ids: Vec<u64> = j.after(0).map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 2, 3, 994, 995, 996, 997, 998, 999, 1000]);
    }

    #[test]
    fn byte_bound_holds() {
        let one = rec(1, 1).cost() as u64;
        let mut j = Journal::new(1000, one * 4);
        for id in 1..=20 {
            j.insert(key(1), rec(id, 1));
            assert!(j.bytes() <= one * 4);
        }
        assert_eq!(j.len(), 4);
        assert_eq!(j.after(0).next().map(|r| r.id), Some(17));
        assert_eq!(j.after(18).count(), 2);
    }
}
