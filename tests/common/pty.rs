//! Pseudo-terminals for tests that give microvm a real terminal as stdio.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// A new pty pair (master, slave); `size` = (rows, cols), else the kernel's default 0x0.
pub fn openpty(size: Option<(u16, u16)>) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut m, mut s) = (-1, -1);
    let ws = size.map(|(rows, cols)| libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    });
    let ws_ptr = ws.as_ref().map_or(std::ptr::null(), |w| w as *const _);
    // SAFETY: openpty writes two fds into the live locals; the name buffer and termios are
    // null (defaults); `ws`, when given, outlives the call.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            ws_ptr,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just returned by openpty and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) })
}

/// The terminal modes of `fd` (a slave, or its master, which reports the slave's).
pub fn termios(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: a zeroed termios is a valid value; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a live local the call writes into.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t)
}

/// Resizes the terminal (the kernel sends SIGWINCH to its foreground process group).
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the live local.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
