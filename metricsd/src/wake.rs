//! A stop flag that also wakes a thread blocked in `poll(2)`.
//!
//! The grant thread sleeps in `poll` with no timeout, so an idle metricsd does not wake
//! up to look at a flag. Raising the signal sets the flag and makes an eventfd readable;
//! the grant thread polls that eventfd beside its sockets.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::event::{EventfdFlags, eventfd};

/// A one-way stop signal: a flag plus an eventfd that becomes readable when it is raised.
#[derive(Debug)]
pub struct StopSignal {
    raised: AtomicBool,
    fd: OwnedFd,
}

impl StopSignal {
    /// A signal not yet raised.
    pub fn new() -> io::Result<Self> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Self {
            raised: AtomicBool::new(false),
            fd,
        })
    }

    /// Sets the flag, then wakes whoever polls [`fd`](Self::fd).
    pub fn raise(&self) {
        // ORDERING: pairs with the Acquire load in `is_raised`; the eventfd write only
        // wakes the poller, which then reads the flag.
        self.raised.store(true, Ordering::Release);
        // A full counter (after 2^64 - 2 raises) is the only failure: it is readable then.
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Whether [`raise`](Self::raise) was called.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// The eventfd to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{PollFd, PollFlags, Timespec};

    fn readable(s: &StopSignal) -> bool {
        let mut fds = [PollFd::new(&s.fd, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        rustix::event::poll(&mut fds, Some(&zero)).expect("poll");
        !fds[0].revents().is_empty()
    }

    #[test]
    fn raising_sets_the_flag_and_makes_the_fd_readable() {
        let s = StopSignal::new().expect("eventfd");
        assert!(!s.is_raised());
        assert!(!readable(&s));
        s.raise();
        assert!(s.is_raised());
        assert!(readable(&s));
        s.raise();
        assert!(readable(&s), "raising twice stays readable");
    }
}
