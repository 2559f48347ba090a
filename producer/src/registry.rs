//! Where a [`Recorder`](crate::Recorder) finds what a key means, to write its
//! registration into a ring before the key's first record there.

use telemetry_abi::{
    MAX_REGISTER_RECORDS, Record, RegisterError, RegisterKind, encode_registration,
};

use crate::key::Key;

/// Scratch space a [`Registry`] may encode a registration into.
pub type RegistrationScratch = [Record; MAX_REGISTER_RECORDS];

/// Maps keys to their registrations. The caller of the `no_std` core provides one (a
/// [`StaticRegistry`] over a table of names, say); the `std` recorder uses the
/// process-wide registry behind the macros.
pub trait Registry {
    /// The registration records of `key` (a `Register` and its data records, as
    /// [`encode_registration`] writes them), either borrowed from `self` or encoded
    /// into `scratch`; `None` if the key is unknown.
    fn registration<'a>(
        &'a self,
        key: Key,
        scratch: &'a mut RegistrationScratch,
    ) -> Option<&'a [Record]>;
}

impl<G: Registry + ?Sized> Registry for &G {
    fn registration<'a>(
        &'a self,
        key: Key,
        scratch: &'a mut RegistrationScratch,
    ) -> Option<&'a [Record]> {
        (**self).registration(key, scratch)
    }
}

/// What one key stands for: its kind, name and labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor<'a> {
    /// The kind registered.
    pub kind: RegisterKind,
    /// The name (for [`RegisterKind::STRING`], the string itself).
    pub name: &'a str,
    /// Labels (counters, gauges and histograms only).
    pub labels: &'a [(&'a str, &'a str)],
}

impl<'a> Descriptor<'a> {
    /// A counter series.
    pub const fn counter(name: &'a str, labels: &'a [(&'a str, &'a str)]) -> Self {
        Self {
            kind: RegisterKind::COUNTER,
            name,
            labels,
        }
    }

    /// A gauge series.
    pub const fn gauge(name: &'a str, labels: &'a [(&'a str, &'a str)]) -> Self {
        Self {
            kind: RegisterKind::GAUGE,
            name,
            labels,
        }
    }

    /// A histogram series.
    pub const fn histogram(name: &'a str, labels: &'a [(&'a str, &'a str)]) -> Self {
        Self {
            kind: RegisterKind::HISTOGRAM,
            name,
            labels,
        }
    }

    /// A span name.
    pub const fn span(name: &'a str) -> Self {
        Self {
            kind: RegisterKind::SPAN,
            name,
            labels: &[],
        }
    }

    /// A span attribute key.
    pub const fn attr(name: &'a str) -> Self {
        Self {
            kind: RegisterKind::ATTR,
            name,
            labels: &[],
        }
    }

    /// A string attribute value.
    pub const fn string(value: &'a str) -> Self {
        Self {
            kind: RegisterKind::STRING,
            name: value,
            labels: &[],
        }
    }

    /// Encodes this descriptor's registration under `key` into `out`.
    pub fn encode(&self, key: Key, out: &mut [Record]) -> Result<usize, RegisterError> {
        encode_registration(key.get(), self.kind, self.name, self.labels, out)
    }
}

/// A fixed table of descriptors: key `i + 1` is `descriptors[i]`. For drivers and
/// kernels that know every series up front.
///
/// ```
/// use nexus_metrics::{Descriptor, Key, StaticRegistry};
///
/// static METRICS: StaticRegistry<'static> = StaticRegistry::new(&[
///     Descriptor::counter("irq.handled", &[("line", "3")]),
///     Descriptor::histogram("irq.latency_ns", &[]),
/// ]);
/// assert_eq!(METRICS.validate(), Ok(()));
/// assert_eq!(METRICS.key(1).map(Key::get), Some(2));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct StaticRegistry<'a> {
    descriptors: &'a [Descriptor<'a>],
}

impl<'a> StaticRegistry<'a> {
    /// The registry whose key `i + 1` is `descriptors[i]`.
    pub const fn new(descriptors: &'a [Descriptor<'a>]) -> Self {
        Self { descriptors }
    }

    /// The key of `descriptors[index]`, or `None` past the end.
    pub const fn key(&self, index: usize) -> Option<Key> {
        if index < self.descriptors.len() && index < u32::MAX as usize {
            Key::new(index as u32 + 1)
        } else {
            None
        }
    }

    /// Checks that every descriptor encodes; returns the first refusal and its index.
    pub fn validate(&self) -> Result<(), (usize, RegisterError)> {
        let mut scratch = [Record::default(); MAX_REGISTER_RECORDS];
        for (index, descriptor) in self.descriptors.iter().enumerate() {
            let Some(key) = self.key(index) else {
                return Err((index, RegisterError::ZeroKey));
            };
            descriptor
                .encode(key, &mut scratch)
                .map_err(|e| (index, e))?;
        }
        Ok(())
    }
}

impl Registry for StaticRegistry<'_> {
    fn registration<'s>(
        &'s self,
        key: Key,
        scratch: &'s mut RegistrationScratch,
    ) -> Option<&'s [Record]> {
        let descriptor = self.descriptors.get(key.get() as usize - 1)?;
        let n = descriptor.encode(key, scratch).ok()?;
        Some(&scratch[..n])
    }
}
