//! The process's stdin and stdout as hub ports.

use super::{Port, cvt};
use std::io;
use std::os::fd::RawFd;

/// fd 1, non-blocking (the hub sets O_NONBLOCK and `term` restores it).
pub(crate) struct StdoutPort;

impl Port for StdoutPort {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is a valid slice for buf.len() bytes.
            let r =
                cvt(unsafe { libc::write(libc::STDOUT_FILENO, buf.as_ptr().cast(), buf.len()) });
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn fd(&self) -> Option<RawFd> {
        Some(libc::STDOUT_FILENO)
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
