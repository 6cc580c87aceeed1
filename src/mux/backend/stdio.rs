//! The process's stdin and stdout as hub ports.
//!
//! stdout is written without blocking and WITHOUT touching the open file description
//! the parent (a shell, a CI runner) shares: setting `O_NONBLOCK` there would leak into
//! the parent's terminal and stay after a crash. Instead:
//! * a pipe, FIFO, terminal or other device is opened again through `/proc/self/fd/1`,
//!   which gives microvm a description of its own, made non-blocking;
//! * a socket is written with `send(MSG_DONTWAIT)`;
//! * a regular file is written directly (it never reports "would block");
//! * should `/proc` not be available, a write is only attempted when `poll` says the fd
//!   takes output, and never more than `PIPE_BUF` bytes at once.

use super::{Port, cvt};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The most written at once when falling back to poll-then-write.
const PIPE_BUF: usize = 4096;

enum How {
    /// A private non-blocking description of the same file.
    Own(OwnedFd),
    /// `send(MSG_DONTWAIT)` on fd 1.
    Socket,
    /// Plain writes to fd 1 (a regular file).
    Direct,
    /// `poll` before each write to fd 1, at most `PIPE_BUF` bytes.
    Polled,
}

/// fd 1, written without blocking (see the module doc).
pub(crate) struct StdoutPort {
    how: How,
}

impl StdoutPort {
    /// Chooses how to write fd 1 without blocking.
    pub(crate) fn open() -> io::Result<StdoutPort> {
        // SAFETY: fstat writes one stat into the live local.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; fd 1 is only queried.
        if unsafe { libc::fstat(libc::STDOUT_FILENO, &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let how = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => How::Direct,
            libc::S_IFSOCK => How::Socket,
            _ => match reopen_nonblocking(libc::STDOUT_FILENO) {
                Some(fd) => How::Own(fd),
                None => How::Polled,
            },
        };
        Ok(StdoutPort { how })
    }
}

/// A new description of the file open at `fd`, non-blocking, close-on-exec, and never
/// becoming our controlling terminal.
fn reopen_nonblocking(fd: RawFd) -> Option<OwnedFd> {
    let path = format!("/proc/self/fd/{fd}\0");
    // SAFETY: `path` is NUL-terminated; the result is checked.
    let new = unsafe {
        libc::open(
            path.as_ptr().cast(),
            libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
        )
    };
    // SAFETY: `new` is a fresh descriptor we own.
    (new >= 0).then(|| unsafe { OwnedFd::from_raw_fd(new) })
}

fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is a valid slice for buf.len() bytes.
    cvt(unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) })
}

impl Port for StdoutPort {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let r = match &self.how {
                How::Own(fd) => write_fd(fd.as_raw_fd(), buf),
                How::Direct => write_fd(libc::STDOUT_FILENO, buf),
                How::Socket => cvt(
                    // SAFETY: buf is valid for buf.len() bytes; MSG_NOSIGNAL keeps a
                    // vanished peer from raising SIGPIPE.
                    unsafe {
                        libc::send(
                            libc::STDOUT_FILENO,
                            buf.as_ptr().cast(),
                            buf.len(),
                            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                        )
                    },
                ),
                How::Polled => {
                    let mut p = libc::pollfd {
                        fd: libc::STDOUT_FILENO,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, no wait.
                    if unsafe { libc::poll(&mut p, 1, 0) } != 1 {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    write_fd(libc::STDOUT_FILENO, &buf[..buf.len().min(PIPE_BUF)])
                }
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn fd(&self) -> Option<RawFd> {
        match &self.how {
            How::Own(fd) => Some(fd.as_raw_fd()),
            How::Direct => None,
            How::Socket | How::Polled => Some(libc::STDOUT_FILENO),
        }
    }
}

/// fd 0. Only read when poll says readable (or when not pollable: a regular file or
/// /dev/null, whose reads never block), so O_NONBLOCK is not required on it.
pub(crate) struct StdinPort;

impl Port for StdinPort {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is a valid, writable slice for buf.len() bytes.
            let r =
                cvt(unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) });
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn fd(&self) -> Option<RawFd> {
        Some(libc::STDIN_FILENO)
    }
}
