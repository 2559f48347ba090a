//! Keys and the per-ring key table.
//!
//! A [`Key`] is the small number a registration binds a name (and labels) to; every
//! sample carries one. A [`KeyTable`] is the per-ring bookkeeping the
//! [`Recorder`](crate::Recorder) keeps for every key: whether the key's registration is
//! already in the ring, and the counter increments still waiting for room.

use core::fmt;
use core::num::NonZeroU32;

/// An interned key: nonzero, bound by a registration to a name, a kind and labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct Key(NonZeroU32);

impl Key {
    /// The key `raw`, or `None` for zero (reserved: never a valid key).
    #[inline]
    pub const fn new(raw: u32) -> Option<Self> {
        match NonZeroU32::new(raw) {
            Some(k) => Some(Self(k)),
            None => None,
        }
    }

    /// The key's number.
    #[inline]
    pub const fn get(self) -> u32 {
        self.0.get()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Pending counter deltas given up (see [`Recorder::discard_pending`](crate::Recorder::discard_pending)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Discarded {
    /// Keys that held a delta: one record each, counted as dropped.
    pub keys: u32,
    /// The sum of the deltas: counter increments that will never be written.
    pub increments: u64,
}

/// Keys per block: one bitmap word covers 64 keys.
const BLOCK: usize = 64;
/// Words one block of 64 keys takes: a registered bit per key, a pending bit per key,
/// a held-gauge bit per key, and one pending word per key (a counter delta, or a held
/// gauge's last value), in that order ([`REGISTERED`], [`PENDING`], [`GAUGES`],
/// [`DELTAS`]).
const WORDS_PER_BLOCK: usize = 3 + BLOCK;
/// A block's registered bitmap, its first word: a key's bit is found with one bounds
/// check against the storage (the words past the last whole block are zero and never
/// written, so a key past the capacity finds its bit clear or no word at all).
const REGISTERED: usize = 0;
/// A block's pending bitmap.
const PENDING: usize = 1;
/// A block's held-gauge bitmap: a key whose bit is set here and in [`PENDING`] holds a
/// gauge's last value (an `i64`'s bits) in its pending word, not a counter delta.
const GAUGES: usize = 2;
/// A block's pending words, one per key.
const DELTAS: usize = 3;

/// Where key `index`'s block starts in the storage.
#[inline(always)]
const fn block_start(index: usize) -> usize {
    index / BLOCK * WORDS_PER_BLOCK
}

/// Per-ring state for every key below [`capacity`](Self::capacity), kept in storage
/// the caller provides (a static array in a driver, a boxed slice in a service).
///
/// For `n` keys the storage needs [`KeyTable::words_for(n)`](Self::words_for) words
/// (about 8.4 bytes per key), in blocks of 64 keys: a "registered in this ring" bitmap,
/// a "has a pending word" bitmap, a "the pending word is a held gauge" bitmap, and the
/// pending words themselves (counter deltas, or the last value of a gauge set while
/// there was no ring).
///
/// ```
/// use nexus_metrics::KeyTable;
///
/// let mut storage = [0u64; KeyTable::<&mut [u64]>::words_for(128)];
/// let table = KeyTable::new(&mut storage[..]);
/// assert_eq!(table.capacity(), 128); // keys 1 to 127 (key 0 is never valid)
/// ```
#[derive(Debug)]
pub struct KeyTable<S> {
    storage: S,
    blocks: usize,
    pending_keys: u32,
}

impl<S: AsRef<[u64]> + AsMut<[u64]>> KeyTable<S> {
    /// Words of storage a table for keys `0..keys` needs.
    pub const fn words_for(keys: usize) -> usize {
        keys.div_ceil(BLOCK) * WORDS_PER_BLOCK
    }

    /// A table over `storage`, which is zeroed. Its capacity is the largest multiple of
    /// 64 keys the storage holds.
    pub fn new(mut storage: S) -> Self {
        storage.as_mut().fill(0);
        let blocks = storage.as_ref().len() / WORDS_PER_BLOCK;
        Self {
            storage,
            blocks,
            pending_keys: 0,
        }
    }

    /// Keys this table can track: `0..capacity` (key 0 is never valid).
    pub fn capacity(&self) -> usize {
        self.blocks * BLOCK
    }

    /// Keys holding a pending counter delta.
    #[inline]
    pub fn pending_keys(&self) -> u32 {
        self.pending_keys
    }

    /// Gives the storage back.
    pub fn into_storage(self) -> S {
        self.storage
    }

    /// Whether `key`'s registration is in the ring. False for keys past the capacity.
    #[inline(always)]
    pub(crate) fn is_registered(&self, key: u32) -> bool {
        let index = key as usize;
        // `get`, not indexing: no panic path on the hot path, and its bounds check is
        // the only one (see `REGISTERED`).
        self.storage
            .as_ref()
            .get(block_start(index) + REGISTERED)
            .is_some_and(|w| w & (1 << (index % BLOCK)) != 0)
    }

    pub(crate) fn contains(&self, key: u32) -> bool {
        key != 0 && (key as usize) < self.capacity()
    }

    pub(crate) fn set_registered(&mut self, key: u32) {
        if self.contains(key) {
            let index = key as usize;
            self.storage.as_mut()[block_start(index) + REGISTERED] |= 1 << (index % BLOCK);
        }
    }

    /// Forgets every registration (a new ring starts empty); pending deltas are kept.
    pub(crate) fn clear_registered(&mut self) {
        // Every whole block (`blocks` of them); the words past the last are never used.
        for block in self.storage.as_mut().chunks_exact_mut(WORDS_PER_BLOCK) {
            block[REGISTERED] = 0;
        }
    }

    /// Adds `n` to `key`'s pending delta. Returns false (and changes nothing) if the key
    /// is out of range or the sum would overflow.
    pub(crate) fn add_pending(&mut self, key: u32, n: u64) -> bool {
        if !self.contains(key) {
            return false;
        }
        let index = key as usize;
        let start = block_start(index);
        let words = self.storage.as_mut();
        let slot = start + DELTAS + index % BLOCK;
        let bit = 1u64 << (index % BLOCK);
        if words[start + GAUGES] & bit != 0 {
            // The key holds a gauge value: a key has one kind, so this is a misuse.
            return false;
        }
        let Some(sum) = words[slot].checked_add(n) else {
            return false;
        };
        if n == 0 {
            return true;
        }
        words[slot] = sum;
        let pending = &mut words[start + PENDING];
        if *pending & bit == 0 {
            *pending |= bit;
            self.pending_keys += 1;
        }
        true
    }

    /// Holds `value` as gauge `key`'s last value, replacing an older held value.
    /// Returns false (and changes nothing) if the key is out of range or holds a
    /// counter delta.
    pub(crate) fn hold_gauge(&mut self, key: u32, value: i64) -> bool {
        if !self.contains(key) {
            return false;
        }
        let index = key as usize;
        let start = block_start(index);
        let bit = 1u64 << (index % BLOCK);
        let words = self.storage.as_mut();
        let pending = words[start + PENDING] & bit != 0;
        if pending && words[start + GAUGES] & bit == 0 {
            return false;
        }
        words[start + DELTAS + index % BLOCK] = value as u64;
        words[start + GAUGES] |= bit;
        if !pending {
            words[start + PENDING] |= bit;
            self.pending_keys += 1;
        }
        true
    }

    /// Whether `key`'s pending word is a held gauge value (not a counter delta).
    pub(crate) fn is_held_gauge(&self, key: u32) -> bool {
        if !self.contains(key) {
            return false;
        }
        let index = key as usize;
        self.storage.as_ref()[block_start(index) + GAUGES] & (1 << (index % BLOCK)) != 0
    }

    /// The first key at or after `from` with a pending word, and the word (a counter
    /// delta, or a held gauge's value: see [`is_held_gauge`](Self::is_held_gauge)).
    pub(crate) fn next_pending(&self, from: u32) -> Option<(u32, u64)> {
        if self.pending_keys == 0 {
            return None;
        }
        let words = self.storage.as_ref();
        let mut index = from as usize;
        while index / BLOCK < self.blocks {
            let start = block_start(index);
            let word = words[start + PENDING] & (u64::MAX << (index % BLOCK));
            if word != 0 {
                let offset = word.trailing_zeros() as usize;
                let key = (index / BLOCK) * BLOCK + offset;
                return Some((key as u32, words[start + DELTAS + offset]));
            }
            index = (index / BLOCK + 1) * BLOCK;
        }
        None
    }

    /// Clears every pending word (counter deltas and held gauges alike; only counter
    /// deltas add to the increments given up).
    pub(crate) fn discard_pending(&mut self) -> Discarded {
        let mut discarded = Discarded {
            keys: self.pending_keys,
            increments: 0,
        };
        let mut from = 1;
        while let Some((key, delta)) = self.next_pending(from) {
            if !self.is_held_gauge(key) {
                discarded.increments = discarded.increments.wrapping_add(delta);
            }
            self.clear_pending(key);
            from = key.saturating_add(1);
        }
        discarded
    }

    /// Clears `key`'s pending word.
    pub(crate) fn clear_pending(&mut self, key: u32) {
        if !self.contains(key) {
            return;
        }
        let index = key as usize;
        let start = block_start(index);
        let words = self.storage.as_mut();
        let bit = 1u64 << (index % BLOCK);
        let pending = &mut words[start + PENDING];
        if *pending & bit != 0 {
            *pending &= !bit;
            words[start + GAUGES] &= !bit;
            words[start + DELTAS + index % BLOCK] = 0;
            self.pending_keys -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_nonzero() {
        assert_eq!(Key::new(0), None);
        assert_eq!(Key::new(7).map(Key::get), Some(7));
    }

    #[test]
    fn table_tracks_registration_and_pending_deltas() {
        let mut storage = [7u64; KeyTable::<&mut [u64]>::words_for(130)];
        let mut table = KeyTable::new(&mut storage[..]);
        assert_eq!(table.capacity(), 192);
        assert!(!table.is_registered(5), "storage was zeroed");
        table.set_registered(5);
        table.set_registered(191);
        table.set_registered(192); // out of range: ignored
        assert!(table.is_registered(5) && table.is_registered(191));
        assert!(!table.is_registered(192) && !table.is_registered(u32::MAX));

        assert!(table.add_pending(70, 3));
        assert!(table.add_pending(70, 4));
        assert!(table.add_pending(9, 1));
        assert!(!table.add_pending(0, 1), "key 0 is never valid");
        assert!(!table.add_pending(9, u64::MAX), "overflow refused");
        assert_eq!(table.pending_keys(), 2);
        assert_eq!(table.next_pending(0), Some((9, 1)));
        assert_eq!(table.next_pending(10), Some((70, 7)));
        assert_eq!(table.next_pending(71), None);
        table.clear_pending(9);
        assert_eq!(table.next_pending(0), Some((70, 7)));

        table.clear_registered();
        assert!(
            !table.is_registered(5) && !table.is_registered(191),
            "every block"
        );
        assert_eq!(table.pending_keys(), 1, "pending deltas survive a new ring");
        assert_eq!(table.next_pending(0), Some((70, 7)));
    }

    #[test]
    fn held_gauges_keep_the_last_value_apart_from_counter_deltas() {
        let mut storage = [0u64; KeyTable::<&mut [u64]>::words_for(128)];
        let mut table = KeyTable::new(&mut storage[..]);
        assert!(table.hold_gauge(3, -5));
        assert!(
            table.hold_gauge(3, 42),
            "a newer value replaces the held one"
        );
        assert!(table.add_pending(4, 7));
        assert!(!table.add_pending(3, 1), "a held gauge takes no delta");
        assert!(
            !table.hold_gauge(4, 1),
            "a counter delta takes no gauge value"
        );
        assert!(!table.hold_gauge(128, 1), "past the capacity");
        assert_eq!(table.pending_keys(), 2);
        assert!(table.is_held_gauge(3) && !table.is_held_gauge(4));
        assert_eq!(table.next_pending(0), Some((3, 42)));
        let neg = table.hold_gauge(3, -9);
        assert!(neg);
        assert_eq!(
            table.next_pending(0).map(|(k, w)| (k, w as i64)),
            Some((3, -9))
        );
        let discarded = table.discard_pending();
        assert_eq!(
            (discarded.keys, discarded.increments),
            (2, 7),
            "a gauge value is not an increment"
        );
        assert!(!table.is_held_gauge(3), "cleared with its pending bit");
        assert!(table.add_pending(3, 1), "the key is free again");
    }

    #[test]
    fn keys_past_the_capacity_are_never_registered() {
        // Storage for one block and most of another: the partial block is not part of
        // the table, and a key in it must not read a bit from its words.
        let mut storage = [0u64; KeyTable::<&mut [u64]>::words_for(64) + 40];
        let mut table = KeyTable::new(&mut storage[..]);
        assert_eq!(table.capacity(), 64);
        for key in 1..64 {
            table.set_registered(key);
            assert!(table.add_pending(key, u64::from(key)));
        }
        for key in [64, 65, 100, 127, 128, 1000, u32::MAX] {
            table.set_registered(key);
            assert!(!table.is_registered(key), "key {key}");
            assert!(!table.add_pending(key, 1), "key {key}");
        }
        assert_eq!(table.pending_keys(), 63);
        let discarded = table.discard_pending();
        assert_eq!((discarded.keys, discarded.increments), (63, 63 * 64 / 2));
        let _ = table.into_storage();
        assert!(
            storage[KeyTable::<&mut [u64]>::words_for(64)..]
                .iter()
                .all(|w| *w == 0)
        );
    }
}
