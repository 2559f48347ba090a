//! The process-wide key registry: name, kind and label set interned once to a key,
//! with the key's registration records encoded once and read without a lock.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, OnceLock, PoisonError};

use telemetry_abi::{
    MAX_LABELS, MAX_REGISTER_RECORDS, Record, RegisterError, RegisterKind, encode_registration,
};

use crate::key::Key;
use crate::registry::{RegistrationScratch, Registry};

/// Why a name could not be given a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// The name, a label or the label count was refused.
    Invalid(RegisterError),
    /// The process already registered as many keys as its limit allows.
    Limit {
        /// The limit ([`Config::max_keys`](crate::Config::max_keys)).
        max_keys: u32,
    },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(e) => write!(f, "registration refused: {e}"),
            Self::Limit { max_keys } => write!(
                f,
                "key limit reached: this process already registered {max_keys} keys"
            ),
        }
    }
}

impl std::error::Error for KeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Invalid(e) => Some(e),
            Self::Limit { .. } => None,
        }
    }
}

/// Keys per lazily allocated chunk of the record table.
const CHUNK: usize = 64;

type Labels = Box<[(Box<str>, Box<str>)]>;
/// What a key stands for: kind, name, labels sorted by key.
type Identity = (u16, Box<str>, Labels);
type Entries = Box<[OnceLock<Box<[OnceLock<Box<[Record]>>]>>]>;

/// Name + kind + labels -> key, and key -> registration records.
pub(crate) struct Interner {
    index: Mutex<HashMap<Identity, u32>>,
    /// Registration records by key, set once (under `index`'s lock) before the key is
    /// handed out, read without a lock.
    entries: Entries,
    max_keys: u32,
}

impl fmt::Debug for Interner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interner")
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl Interner {
    pub(crate) fn new(max_keys: u32) -> Self {
        let chunks = (max_keys as usize + 1).div_ceil(CHUNK);
        Self {
            index: Mutex::new(HashMap::new()),
            entries: (0..chunks).map(|_| OnceLock::new()).collect(),
            max_keys,
        }
    }

    /// The key of `kind` `name` with `labels` (in any order: they are sorted by key),
    /// registering it on first sight.
    pub(crate) fn intern(
        &self,
        kind: RegisterKind,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<Key, KeyError> {
        self.intern_if(kind, name, labels, || true)
    }

    /// Like [`intern`](Self::intern), but a key not yet handed out is made only if
    /// `allow_new` says so (asked under the lock); otherwise `KeyError::Limit`.
    pub(crate) fn intern_if(
        &self,
        kind: RegisterKind,
        name: &str,
        labels: &[(&str, &str)],
        allow_new: impl FnOnce() -> bool,
    ) -> Result<Key, KeyError> {
        if labels.len() > MAX_LABELS {
            return Err(KeyError::Invalid(RegisterError::LabelCount(labels.len())));
        }
        let mut sorted = [("", ""); MAX_LABELS];
        let sorted = &mut sorted[..labels.len()];
        sorted.copy_from_slice(labels);
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let id = (
            kind.0,
            Box::<str>::from(name),
            sorted
                .iter()
                .map(|(k, v)| (Box::<str>::from(*k), Box::<str>::from(*v)))
                .collect::<Labels>(),
        );

        let mut index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&key) = index.get(&id) {
            return Key::new(key).ok_or(KeyError::Invalid(RegisterError::ZeroKey));
        }
        let next = index.len() as u32 + 1;
        // Validate before the limit: a bad name is `Invalid` whether or not room is left.
        let mut scratch = [Record::default(); MAX_REGISTER_RECORDS];
        let n = encode_registration(next, kind, name, sorted, &mut scratch)
            .map_err(KeyError::Invalid)?;
        if next > self.max_keys || !allow_new() {
            return Err(KeyError::Limit {
                max_keys: self.max_keys,
            });
        }
        let chunk = self.entries[next as usize / CHUNK]
            .get_or_init(|| (0..CHUNK).map(|_| OnceLock::new()).collect());
        // Never set before: keys are handed out once, in order, under the lock.
        let _ = chunk[next as usize % CHUNK].set(scratch[..n].into());
        index.insert(id, next);
        Key::new(next).ok_or(KeyError::Invalid(RegisterError::ZeroKey))
    }

    /// The registration records of `key`, if it was handed out.
    pub(crate) fn records(&self, key: u32) -> Option<&[Record]> {
        let chunk = self.entries.get(key as usize / CHUNK)?.get()?;
        chunk.get(key as usize % CHUNK)?.get().map(|r| &**r)
    }

    /// Keys handed out.
    pub(crate) fn len(&self) -> u32 {
        self.index
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u32
    }

    pub(crate) fn max_keys(&self) -> u32 {
        self.max_keys
    }
}

/// The [`Registry`] view of the process-wide interner, for the per-thread recorders.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GlobalRegistry;

impl Registry for GlobalRegistry {
    fn registration<'a>(
        &'a self,
        key: Key,
        _scratch: &'a mut RegistrationScratch,
    ) -> Option<&'a [Record]> {
        crate::global::global().interner.records(key.get())
    }
}

#[cfg(test)]
mod tests {
    use telemetry_abi::RegistrationBuf;

    use super::*;

    #[test]
    fn interning_is_idempotent_and_label_order_free() {
        let interner = Interner::new(3);
        let c = RegisterKind::COUNTER;
        let a = interner.intern(c, "req", &[("b", "2"), ("a", "1")]);
        let b = interner.intern(c, "req", &[("a", "1"), ("b", "2")]);
        assert_eq!(a, b);
        let key = a.expect("valid").get();
        assert_eq!(key, 1);

        let mut buf = RegistrationBuf::new();
        let records = interner.records(key).expect("registered");
        let (last, head) = records.split_last().expect("at least one record");
        for record in head {
            assert_eq!(buf.feed(record), Ok(None));
        }
        let reg = buf.feed(last).expect("well-formed").expect("complete");
        let labels: Vec<_> = reg.labels().iter().map(|l| (l.key, l.value)).collect();
        assert_eq!(labels, [("a", "1"), ("b", "2")]);

        assert_ne!(interner.intern(RegisterKind::GAUGE, "req", &[]), b);
        assert!(matches!(
            interner.intern(c, "bad name=", &[]),
            Err(KeyError::Invalid(RegisterError::NameByte(b'=')))
        ));
        assert!(interner.intern(c, "third", &[]).is_ok());
        assert_eq!(
            interner.intern(c, "fourth", &[]),
            Err(KeyError::Limit { max_keys: 3 })
        );
        assert_eq!(interner.len(), 3);
        assert!(interner.records(4).is_none() && interner.records(0).is_none());
    }
}
