//! `microvm attach SOCKET`: a console client, so users need no socat (socat and
//! `nc -U` work too).
//!
//! Raw mode when stdin is a tty (restored on every exit path). Keys (tty only):
//! Ctrl-] or Ctrl-A d detaches; Ctrl-A Ctrl-A sends one Ctrl-A; any other Ctrl-A pair is
//! sent as is (so Ctrl-A w reaches a single-writer console to take the keyboard).
//! With `read_only` nothing typed is sent. When stdin ends (a pipe), output keeps being
//! relayed until the VM closes the console.

use super::MuxError;
use super::escape::{EscapeAction, EscapeKeys, EscapeParser};
use super::term::{self, RawMode};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Stop reading the keyboard while this much typed input waits for the socket.
const MAX_OUTBOUND: usize = 64 << 10;

fn write_all_fd(fd: i32, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: data is a valid slice for data.len() bytes.
        let r = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    let mut p = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, 1000) };
                    continue;
                }
                _ => return Err(e),
            }
        }
        data = &data[r as usize..];
    }
    Ok(())
}

fn say(msg: &str) {
    let end = if term::raw_active() { "\r\n" } else { "\n" };
    let _ = write!(io::stderr(), "{msg}{end}");
}

/// Connect to a console socket and relay stdin/stdout until detach or until the VM
/// closes the console. Returns the process exit status to use (0).
pub fn attach(path: &Path, read_only: bool) -> Result<i32, MuxError> {
    attach_fds(path, read_only, libc::STDIN_FILENO, libc::STDOUT_FILENO)
}

/// [`attach`] with explicit input and output fds (tests use pipes).
pub fn attach_fds(
    path: &Path,
    read_only: bool,
    input: RawFd,
    output: RawFd,
) -> Result<i32, MuxError> {
    let mut sock = UnixStream::connect(path).map_err(|source| MuxError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    sock.set_nonblocking(true).map_err(MuxError::Attach)?;
    let stdin_fd = input;
    let tty = term::is_tty(stdin_fd);
    let _raw = if tty { RawMode::enter(stdin_fd)? } else { None };
    if tty {
        say(&format!(
            "[microvm attach: {}{}; {}]",
            path.display(),
            if read_only { ", read-only" } else { "" },
            super::escape::ATTACH_ESCAPE_HELP
        ));
    }
    let mut parser = EscapeParser::new(EscapeKeys::Attach);
    let mut outbound: Vec<u8> = Vec::new();
    let mut stdin_eof = false;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: if stdin_eof || outbound.len() >= MAX_OUTBOUND {
                    -1
                } else {
                    stdin_fd
                },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN
                    | if outbound.is_empty() {
                        0
                    } else {
                        libc::POLLOUT
                    },
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of 2 pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(MuxError::Attach(e));
        }
        let sock_ev = fds[1].revents;
        if sock_ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            loop {
                match sock.read(&mut buf) {
                    Ok(0) => {
                        if tty {
                            say("\r\n[microvm attach: console closed]");
                        }
                        return Ok(0);
                    }
                    Ok(n) => {
                        if write_all_fd(output, &buf[..n]).is_err() {
                            return Ok(0);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(0),
                    Err(e) => return Err(MuxError::Attach(e)),
                }
            }
        }
        if sock_ev & libc::POLLOUT != 0 && !outbound.is_empty() {
            match sock.write(&outbound) {
                Ok(n) => {
                    outbound.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Ok(0),
            }
        }
        if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            // SAFETY: buf is valid and writable for buf.len() bytes.
            let n = unsafe { libc::read(stdin_fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    stdin_eof = true;
                }
                continue;
            }
            if n == 0 {
                stdin_eof = true;
                continue;
            }
            let data = &buf[..n as usize];
            let mut acts = Vec::new();
            if tty {
                let mut out = Vec::new();
                parser.feed(data, &mut out, &mut acts);
                if !read_only {
                    outbound.extend_from_slice(&out);
                }
            } else if !read_only {
                outbound.extend_from_slice(data);
            }
            if acts.contains(&EscapeAction::Detach) {
                // Send what was typed before the detach key, best effort.
                let _ = sock.write(&outbound);
                say("\r\n[microvm attach: detached]");
                return Ok(0);
            }
            if !outbound.is_empty() {
                match sock.write(&outbound) {
                    Ok(n) => {
                        outbound.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Ok(0),
                }
            }
        }
    }
}
