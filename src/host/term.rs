//! Terminal handling for the `stdio` backend and `microvm attach`: raw mode that is
//! restored on every exit path (drop, `shutdown`, and through [`restore_terminal`], which
//! is async-signal-safe, from the dispositions [`crate::vmm::signals`] installs: `atexit`,
//! panics, SIGTERM/SIGHUP/SIGINT/SIGQUIT/SIGABRT), the terminal's size, and its resize
//! watcher. Nothing here changes the file status flags of a descriptor shared with the
//! parent (the stdio backend writes through a private description, see
//! `backend::stdio`).

use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

/// Terminal errors.
#[derive(Debug, thiserror::Error)]
pub enum TermError {
    /// `tcgetattr` failed on a tty.
    #[error("cannot read terminal attributes: {0}")]
    GetAttr(io::Error),
    /// `tcsetattr` failed.
    #[error("cannot put the terminal in raw mode: {0}")]
    SetAttr(io::Error),
}

/// True when `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the fd number; any value is safe to pass.
    unsafe { libc::isatty(fd) == 1 }
}

/// Saved terminal state, readable from a signal handler.
struct Saved {
    /// 0 empty, 1 being written, 2 valid.
    state: AtomicU8,
    fd: AtomicI32,
    termios: UnsafeCell<libc::termios>,
}

// SAFETY: `termios` is only written while `state` is 1 (claimed by one thread through a
// compare-exchange from 0) and only read while `state` is 2; the atomics order the accesses.
unsafe impl Sync for Saved {}

static SAVED: Saved = Saved {
    state: AtomicU8::new(0),
    fd: AtomicI32::new(-1),
    // SAFETY: termios is a plain C struct of integers and arrays; all-zero is a valid value.
    termios: UnsafeCell::new(unsafe { std::mem::zeroed() }),
};

/// Restore the terminal's saved mode, if raw mode is active.
/// Async-signal-safe (only atomics and `tcsetattr`); idempotent.
pub fn restore_terminal() {
    if SAVED
        .state
        .compare_exchange(2, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        let fd = SAVED.fd.load(Ordering::Acquire);
        // SAFETY: state 1 is held by us, so nobody writes termios; the pointer is valid
        // for the static's lifetime. tcsetattr with a bad fd just fails.
        unsafe {
            libc::tcsetattr(fd, libc::TCSAFLUSH, SAVED.termios.get());
        }
        SAVED.state.store(0, Ordering::Release);
    }
}

/// Raw mode on a tty; restores the saved mode when dropped.
#[derive(Debug)]
pub struct RawMode {
    _private: (),
}

impl RawMode {
    /// Put `fd` in raw mode if it is a tty; `Ok(None)` when it is not one (no change made).
    /// Only one raw-mode session exists per process; a second call while one is active
    /// returns `Ok(None)`.
    pub fn enter(fd: RawFd) -> Result<Option<RawMode>, TermError> {
        if !is_tty(fd) {
            return Ok(None);
        }
        // SAFETY: all-zero termios is valid; tcgetattr fills it.
        let mut orig: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `orig` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut orig) } != 0 {
            return Err(TermError::GetAttr(io::Error::last_os_error()));
        }
        if SAVED
            .state
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Ok(None);
        }
        // SAFETY: state 1 is held by us: no reader or other writer touches termios.
        unsafe {
            *SAVED.termios.get() = orig;
        }
        SAVED.fd.store(fd, Ordering::Release);
        SAVED.state.store(2, Ordering::Release);
        let mut raw = orig;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            let err = io::Error::last_os_error();
            restore_terminal();
            return Err(TermError::SetAttr(err));
        }
        Ok(Some(RawMode { _private: () }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// True while a raw-mode session is active (log lines then need "\r\n").
pub fn raw_active() -> bool {
    SAVED.state.load(Ordering::Acquire) == 2
}

/// The size (columns, rows) of the terminal on `fd`, if it is one.
pub fn terminal_size(fd: RawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the live local `ws`; `fd` is only queried.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Calls `on_resize(columns, rows)` on the event loop when the terminal on `fd` changes size.
pub struct ResizeWatcher {
    evt: EventFd,
    fd: RawFd,
    on_resize: Box<dyn FnMut(u16, u16) + Send>,
}

impl ResizeWatcher {
    /// Watches `fd`'s terminal, woken by `evt` (from [`crate::vmm::signals::resize_events`]).
    pub fn new(evt: EventFd, fd: RawFd, on_resize: Box<dyn FnMut(u16, u16) + Send>) -> Self {
        ResizeWatcher { evt, fd, on_resize }
    }
}

impl MutEventSubscriber for ResizeWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != self.evt.as_raw_fd() {
            return;
        }
        let _ = self.evt.read();
        if let Some((cols, rows)) = terminal_size(self.fd) {
            (self.on_resize)(cols, rows);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.evt, EventSet::IN));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_a_tty_is_left_alone() {
        // In tests stdin is rarely a tty; a pipe certainly is not.
        let mut fds = [0; 2];
        // SAFETY: fds is a valid 2-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert!(RawMode::enter(fds[0]).unwrap().is_none());
        // SAFETY: closing the fds we just created.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}
