//! A non-blocking one-shot timer (timerfd) for the hub's deadlines: idle clients and the
//! end of an accept back-off. Created before the seccomp filters; only `timerfd_settime`
//! and `read` are used afterwards.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// The shortest delay armed (a deadline already past fires after this).
const MIN_DELAY: Duration = Duration::from_millis(1);

/// A monotonic timerfd armed for at most one deadline.
pub(crate) struct Timer {
    fd: OwnedFd,
    armed: Option<Instant>,
}

impl Timer {
    pub(crate) fn new() -> io::Result<Timer> {
        // SAFETY: plain timerfd_create; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Timer { fd, armed: None })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Fires at `deadline` at the latest. An earlier wake-up already armed is kept (the
    /// caller finds nothing due and arms again), so a deadline that keeps moving later
    /// (an active client's idle deadline) costs no syscall.
    pub(crate) fn arm(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        let Some(deadline) = deadline else {
            return Ok(());
        };
        if self.armed.is_some_and(|a| a <= deadline) {
            return Ok(());
        }
        let delay = deadline
            .saturating_duration_since(Instant::now())
            .max(MIN_DELAY);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: delay.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: libc::c_long::from(delay.subsec_nanos() as i32),
            },
        };
        // SAFETY: `spec` is a valid itimerspec; a null old value is allowed.
        if unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) }
            != 0
        {
            return Err(io::Error::last_os_error());
        }
        self.armed = Some(deadline);
        Ok(())
    }

    /// Clears the expiry (the fd is readable until then).
    pub(crate) fn ack(&mut self) {
        let mut n = [0u8; 8];
        // SAFETY: reads at most 8 bytes into the live local; non-blocking.
        unsafe { libc::read(self.fd.as_raw_fd(), n.as_mut_ptr().cast(), 8) };
        self.armed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_the_earliest_deadline_armed() {
        let mut t = Timer::new().unwrap();
        let mut p = libc::pollfd {
            fd: t.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        t.arm(Some(Instant::now())).unwrap();
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 5000) }, 1);
        t.ack();
        t.arm(Some(Instant::now() + Duration::from_secs(60)))
            .unwrap();
        t.arm(None).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 20) }, 0);
    }
}
