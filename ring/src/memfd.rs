//! The production region on Linux: a sealed memfd, mapped shared.
//!
//! The consumer creates it ([`MemfdRegion::create`]): a memfd of exactly the region's
//! size, sealed against shrinking and growing (so no producer can make the consumer's
//! mapping fault) and against further seal changes, then mapped and laid out. The fd is
//! the capability: the producer maps it with [`MemfdRegion::attach`], which checks the
//! size, the seals and the header before anything is read.
#![expect(unsafe_code, reason = "maps and unmaps the shared memory")]

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};
use telemetry_abi::{Geometry, Record};

use crate::mapped::{MapError, MappedRegion};
use crate::region::Region;
use crate::sync::AtomicU64;

/// The seals every ring memfd carries.
const SEALS: SealFlags = SealFlags::SHRINK
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

/// A ring region in a sealed memfd, mapped into this process.
pub struct MemfdRegion {
    fd: OwnedFd,
    len: usize,
    region: MappedRegion,
}

impl fmt::Debug for MemfdRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemfdRegion")
            .field("fd", &self.fd)
            .field("len", &self.len)
            .field("region", &self.region)
            .finish()
    }
}

/// Why a memfd region could not be created or attached.
#[derive(Debug)]
pub enum MemfdError {
    /// A system call failed.
    Os {
        /// Which step (`memfd_create`, `ftruncate`, `seal`, `fstat`, `mmap`).
        step: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The fd's size is not one a region can have.
    Size {
        /// The size found, in bytes.
        found: u64,
    },
    /// The fd lacks the shrink/grow seals, so its owner could make us fault.
    NotSealed,
    /// The mapped memory does not hold an acceptable region.
    Map(MapError),
}

impl fmt::Display for MemfdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Os { step, source } => write!(f, "{step} failed: {source}"),
            Self::Size { found } => write!(
                f,
                "memfd is {found} bytes, too large to map as a ring region"
            ),
            Self::NotSealed => {
                f.write_str("memfd is not sealed against shrink and grow; refusing to map it")
            }
            Self::Map(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for MemfdError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Os { source, .. } => Some(source),
            Self::Map(e) => Some(e),
            _ => None,
        }
    }
}

fn os(step: &'static str) -> impl FnOnce(rustix::io::Errno) -> MemfdError {
    move |errno| MemfdError::Os {
        step,
        source: errno.into(),
    }
}

impl MemfdRegion {
    /// Creates, sizes, seals, maps and lays out a new region of `geometry` with the
    /// grant generation `epoch`. `name` shows in `/proc/<pid>/fd` (debugging only).
    pub fn create(name: &str, geometry: Geometry, epoch: u64) -> Result<Self, MemfdError> {
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(os("memfd_create"))?;
        let len = geometry.region_len();
        rustix::fs::ftruncate(&fd, len as u64).map_err(os("ftruncate"))?;
        rustix::fs::fcntl_add_seals(&fd, SEALS).map_err(os("seal"))?;
        let base = map(&fd, len)?;
        // SAFETY: `base` is a fresh shared mapping of `len` bytes that lives until `Drop`
        // unmaps it, after the `MappedRegion` (a field of the same struct) is gone; no
        // other process has the fd yet.
        let region = unsafe { MappedRegion::init(base, len, geometry, epoch) };
        match region {
            Ok(region) => Ok(Self { fd, len, region }),
            Err(e) => {
                unmap(base, len);
                Err(MemfdError::Map(e))
            }
        }
    }

    /// Maps a region received as an fd (the producer's side): checks that it is sealed
    /// against shrinking and growing, that its size fits, and that its header is valid.
    pub fn attach(fd: OwnedFd) -> Result<Self, MemfdError> {
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(os("fcntl_get_seals"))?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
            return Err(MemfdError::NotSealed);
        }
        let stat = rustix::fs::fstat(&fd).map_err(os("fstat"))?;
        let size = u64::try_from(stat.st_size).unwrap_or(0);
        let max = Geometry::new(u64::from(telemetry_abi::MAX_CAPACITY))
            .map(|g| g.region_len() as u64 + 64 * telemetry_abi::LINE_SIZE as u64)
            .unwrap_or(0);
        if size == 0 || size > max {
            return Err(MemfdError::Size { found: size });
        }
        let len = size as usize;
        let base = map(&fd, len)?;
        // SAFETY: `base` is a shared mapping of the whole sealed fd (it cannot shrink
        // under us); it stays mapped until `Drop`, after the `MappedRegion` is gone.
        match unsafe { MappedRegion::attach(base, len) } {
            Ok(region) => Ok(Self { fd, len, region }),
            Err(e) => {
                unmap(base, len);
                Err(MemfdError::Map(e))
            }
        }
    }

    /// The fd: the capability to hand to a producer.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a region holds at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The mapped region.
    pub fn mapped(&self) -> &MappedRegion {
        &self.region
    }
}

fn map(fd: &OwnedFd, len: usize) -> Result<NonNull<u8>, MemfdError> {
    // SAFETY: a fresh mapping chosen by the kernel (null hint), so nothing existing is
    // replaced; the fd is a memfd sized to at least `len` and sealed against shrinking.
    let ptr = unsafe {
        rustix::mm::mmap(
            core::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
            fd,
            0,
        )
    }
    .map_err(os("mmap"))?;
    NonNull::new(ptr.cast::<u8>()).ok_or(MemfdError::Os {
        step: "mmap",
        source: io::Error::other("null mapping"),
    })
}

fn unmap(base: NonNull<u8>, len: usize) {
    // SAFETY: `base`/`len` is exactly one mapping made by `map`, unmapped once, with no
    // references into it left (the `MappedRegion` over it is gone or never made).
    // A failure leaves the mapping in place: a leak, not unsoundness.
    let _ = unsafe { rustix::mm::munmap(base.as_ptr().cast(), len) };
}

impl Drop for MemfdRegion {
    fn drop(&mut self) {
        unmap(self.region.base(), self.len);
    }
}

// SAFETY: forwards to the mapped region, which upholds the contract while the mapping
// lives, and the mapping lives as long as `self`.
unsafe impl Region for MemfdRegion {
    fn geometry(&self) -> Geometry {
        self.region.geometry()
    }
    fn write_pos(&self) -> &AtomicU64 {
        self.region.write_pos()
    }
    fn dropped(&self) -> &AtomicU64 {
        self.region.dropped()
    }
    fn read_pos(&self) -> &AtomicU64 {
        self.region.read_pos()
    }
    fn consumer_flags(&self) -> &AtomicU64 {
        self.region.consumer_flags()
    }
    #[inline(always)]
    unsafe fn write_slot(&self, slot: usize, record: Record) {
        // SAFETY: the caller's guarantees are passed on unchanged.
        unsafe { self.region.write_slot(slot, record) }
    }
    #[inline(always)]
    fn prepare_write(&self, slot: usize) {
        self.region.prepare_write(slot);
    }
    #[inline(always)]
    unsafe fn read_slot(&self, slot: usize) -> Record {
        // SAFETY: the caller's guarantees are passed on unchanged.
        unsafe { self.region.read_slot(slot) }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use rustix::fs::{MemfdFlags, SealFlags};
    use telemetry_abi::Geometry;

    use super::{MemfdError, MemfdRegion};
    use crate::{MapError, Region};

    fn geometry() -> Geometry {
        Geometry::new(16).expect("a valid geometry")
    }

    /// A fresh memfd of `len` bytes with `seals`.
    fn memfd(len: u64, seals: SealFlags) -> rustix::fd::OwnedFd {
        let fd = rustix::fs::memfd_create("test", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .expect("memfd_create");
        rustix::fs::ftruncate(&fd, len).expect("ftruncate");
        rustix::fs::fcntl_add_seals(&fd, seals).expect("seal");
        fd
    }

    #[test]
    fn a_region_reports_its_size_and_debug_names_its_parts() {
        let region = MemfdRegion::create("test", geometry(), 7).expect("create");
        assert_eq!(region.len(), geometry().region_len());
        assert!(!region.is_empty());
        assert_eq!(region.geometry(), geometry());
        let debug = format!("{region:?}");
        for part in ["MemfdRegion", "fd", "len", "region"] {
            assert!(debug.contains(part), "{debug}");
        }
        assert!(
            debug.contains(&geometry().region_len().to_string()),
            "{debug}"
        );
    }

    #[test]
    fn attach_refuses_an_unsealed_memfd() {
        let len = geometry().region_len() as u64;
        for seals in [SealFlags::empty(), SealFlags::SHRINK, SealFlags::GROW] {
            let err = MemfdRegion::attach(memfd(len, seals)).expect_err("not sealed");
            assert!(matches!(err, MemfdError::NotSealed), "{err:?}");
            assert!(err.to_string().contains("not sealed"), "{err}");
            assert!(err.source().is_none());
        }
    }

    #[test]
    fn attach_refuses_an_empty_or_oversized_memfd() {
        let sealed = SealFlags::SHRINK | SealFlags::GROW;
        let err = MemfdRegion::attach(memfd(0, sealed)).expect_err("empty");
        assert!(matches!(err, MemfdError::Size { found: 0 }), "{err:?}");
        assert!(err.to_string().contains("memfd is 0 bytes"), "{err}");
        assert!(err.source().is_none());
        let max = Geometry::new(u64::from(telemetry_abi::MAX_CAPACITY))
            .expect("the largest geometry")
            .region_len() as u64
            + 64 * telemetry_abi::LINE_SIZE as u64;
        // The largest size accepted maps (and then fails on its zero header), one more
        // byte is refused before mapping.
        let err = MemfdRegion::attach(memfd(max + 1, sealed)).expect_err("too large");
        assert!(
            matches!(err, MemfdError::Size { found } if found == max + 1),
            "{err:?}"
        );
        let err = MemfdRegion::attach(memfd(max, sealed)).expect_err("a zero header");
        assert!(matches!(err, MemfdError::Map(_)), "{err:?}");
    }

    #[test]
    fn attach_refuses_a_bad_header_and_names_why() {
        let sealed = SealFlags::SHRINK | SealFlags::GROW;
        let fd = memfd(geometry().region_len() as u64, sealed);
        let err = MemfdRegion::attach(fd).expect_err("a zero header");
        let MemfdError::Map(inner) = &err else {
            panic!("{err:?}");
        };
        assert!(matches!(inner, MapError::Header(_)), "{inner:?}");
        // The message is the map error's own, and the map error is the source.
        assert_eq!(err.to_string(), inner.to_string());
        let source = err.source().expect("a source");
        assert_eq!(source.to_string(), inner.to_string());
    }

    #[test]
    fn an_os_error_names_its_step_and_keeps_its_cause() {
        let err = MemfdError::Os {
            step: "mmap",
            source: std::io::Error::other("no memory"),
        };
        assert_eq!(err.to_string(), "mmap failed: no memory");
        assert_eq!(
            err.source().map(|s| s.to_string()).as_deref(),
            Some("no memory")
        );
    }

    #[test]
    fn dropping_a_region_unmaps_it() {
        // More regions, one after another, than the process may have mappings at once
        // (`vm.max_map_count`): each must be unmapped when dropped, or `mmap` fails.
        let max: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(65_530);
        // A machine that allows millions of mappings would make this slow: cap it.
        for i in 0..max.min(1 << 20) + 1_000 {
            let region = MemfdRegion::create("test", geometry(), i)
                .unwrap_or_else(|e| panic!("region {i}: {e}"));
            drop(region);
        }
    }

    #[test]
    fn a_created_region_attaches_through_its_fd() {
        let region = MemfdRegion::create("test", geometry(), 7).expect("create");
        let fd = region.fd().try_clone_to_owned().expect("dup");
        let other = MemfdRegion::attach(fd).expect("attach");
        assert_eq!(other.len(), region.len());
        assert_eq!(other.geometry(), region.geometry());
        // Both mappings see one memory.
        region
            .write_pos()
            .store(5, core::sync::atomic::Ordering::Release);
        assert_eq!(
            other
                .write_pos()
                .load(core::sync::atomic::Ordering::Acquire),
            5
        );
        other
            .dropped()
            .store(3, core::sync::atomic::Ordering::Release);
        assert_eq!(
            region.dropped().load(core::sync::atomic::Ordering::Acquire),
            3
        );
        other
            .read_pos()
            .store(2, core::sync::atomic::Ordering::Release);
        assert_eq!(
            region
                .read_pos()
                .load(core::sync::atomic::Ordering::Acquire),
            2
        );
        other
            .consumer_flags()
            .store(1, core::sync::atomic::Ordering::Release);
        assert_eq!(
            region
                .consumer_flags()
                .load(core::sync::atomic::Ordering::Acquire),
            1
        );
    }
}
