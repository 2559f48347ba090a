//! A hook into `fork()`, for users of rings that outlive it.
//!
//! A child process inherits its parent's memory, mappings included: a [`Writer`] the
//! parent holds is, in the child, a second writer into the same ring, which breaks the
//! single-producer rule and corrupts the parent's records. A producer library therefore
//! needs to learn, without a system call on its hot path, that it now runs in a child.
//! [`on_fork_child`] registers a function the C library calls in the child right after
//! `fork()` returns there (`pthread_atfork`); it can bump a generation word the hot path
//! already compares, so the first record after the fork takes the slow path.
//!
//! Only `fork()` through the C library runs the hook: a raw `clone` system call does
//! not, and neither does `vfork` (its child must `exec` or exit at once anyway).
//!
//! [`Writer`]: crate::Writer
#![expect(unsafe_code, reason = "registers a handler with pthread_atfork")]

/// Registers `handler` to run in every child process the calling process forks from
/// now on, in the forking thread, before `fork()` returns in the child. Returns the
/// C library's error number if it could not register (out of memory).
///
/// The child of a multi-threaded process has one thread, and every lock another
/// thread held at the fork stays held there for good: `handler` must do only what is
/// safe in a signal handler (atomic loads and stores, say), and take no lock and
/// allocate nothing. If it panics, the child aborts. Handlers run in the order they
/// were registered; one registered twice runs twice.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// static FORKS: AtomicU64 = AtomicU64::new(0);
///
/// extern "C" fn count_fork() {
///     // ORDERING: Relaxed: the child's only thread reads it later.
///     FORKS.fetch_add(1, Ordering::Relaxed);
/// }
///
/// telemetry_ring::on_fork_child(count_fork).expect("registered");
/// assert_eq!(FORKS.load(Ordering::Relaxed), 0, "counts only in children");
/// ```
pub fn on_fork_child(handler: extern "C" fn()) -> Result<(), i32> {
    // SAFETY: `pthread_atfork` takes three optional function pointers and copies them;
    // `handler` is a plain `extern "C" fn()` with no captured state, valid for the
    // program's life. Calling it in the child is sound whatever it does: a lock it
    // takes can deadlock, which is not undefined behaviour, and a panic cannot unwind
    // out of an `extern "C"` function (it aborts).
    match unsafe { libc::pthread_atfork(None, None, Some(handler)) } {
        0 => Ok(()),
        errno => Err(errno),
    }
}

#[cfg(test)]
mod tests {
    use core::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    static FORKED: AtomicU64 = AtomicU64::new(0);

    extern "C" fn mark() {
        // ORDERING: Relaxed: read by the same (only) thread of the child.
        FORKED.store(1, Ordering::Relaxed);
    }

    #[test]
    fn the_handler_runs_in_the_child_only() {
        on_fork_child(mark).expect("registered");
        // SAFETY: the child only loads an atomic and calls `_exit`, both
        // async-signal-safe, so the locks other test threads held at the fork do not
        // matter.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = if FORKED.load(Ordering::Relaxed) == 1 {
                0
            } else {
                3
            };
            // SAFETY: ends the child at once, without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid place for its status.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "the handler ran in the child");
        assert_eq!(FORKED.load(Ordering::Relaxed), 0, "and not in the parent");
    }
}
