//! `microvm attach TARGET`: a console client, so users need no socat (socat, `nc -U`
//! and `openssl s_client` work too, see the README).
//!
//! TARGET is a unix socket path or `tcp://HOST:PORT`. With `--ca CERT` the connection is
//! TLS (the server's certificate must chain to CERT and name HOST); `--cert`/`--key`
//! present a client certificate. With `--token-file F` the first line sent is
//! `token SECRET` (the console protocol, `auth.rs`). On a token or TLS console the
//! server's first line says the role (`microvm: ok writer` / `ok viewer`) or why it
//! refused (then attach prints it and exits 1); it is not relayed. A plain console that
//! is full sends "microvm: console busy: ..." and closes: attach relays it and exits 1.
//!
//! Raw mode when stdin is a tty (restored on every exit path). Keys (tty only):
//! Ctrl-] or Ctrl-A d detaches; Ctrl-A Ctrl-A sends one Ctrl-A; any other Ctrl-A pair is
//! sent as is (so Ctrl-A w reaches a single-writer console to take the keyboard).
//! With `read_only` (or as a viewer) nothing typed is sent. When stdin ends (a pipe),
//! output keeps being relayed until the VM closes the console.

use super::MuxError;
use super::auth::{self, Secret};
use super::backend::Port;
use super::backend::socket::Stream;
use super::escape::{EscapeAction, EscapeKeys, EscapeParser};
use super::listener::busy_refusal;
use super::tls::{self, TlsStream};
use crate::host::logging::one_line;
use crate::host::term::{self, RawMode};
use std::io::{self, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Stop reading the keyboard while this much typed input waits for the socket.
const MAX_OUTBOUND: usize = 64 << 10;
/// What a plain console's connection keeps of its first bytes, to tell a "console busy"
/// refusal (then closed) from a console that ended.
const HEAD_KEPT: usize = 256;
/// How long connecting, the TLS handshake and the server's first line may take.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// What `microvm attach` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct AttachOptions {
    /// A unix socket path, or `tcp://HOST:PORT`.
    pub target: String,
    /// Send nothing typed.
    pub read_only: bool,
    /// Send `token SECRET` with the secret in this file first.
    pub token_file: Option<PathBuf>,
    /// TLS: trust this CA (PEM).
    pub ca: Option<PathBuf>,
    /// TLS: present this client certificate (PEM) ...
    pub cert: Option<PathBuf>,
    /// ... with this key.
    pub key: Option<PathBuf>,
}

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

/// `tcp://HOST:PORT` -> (HOST, PORT); HOST may be `[v6]`.
fn parse_tcp_target(target: &str) -> Option<(String, u16)> {
    let rest = target.strip_prefix("tcp://")?;
    let (host, port) = rest.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

/// Connects to `opts.target` (TLS when `opts.ca`), non-blocking.
fn connect(opts: &AttachOptions) -> Result<Stream, MuxError> {
    let connect_err = |source| MuxError::Connect {
        target: opts.target.clone(),
        source,
    };
    if !opts.target.starts_with("tcp://") {
        if opts.ca.is_some() {
            return Err(MuxError::AttachUsage(
                "--ca, --cert and --key are for tcp://HOST:PORT consoles",
            ));
        }
        let s = UnixStream::connect(&opts.target).map_err(connect_err)?;
        s.set_nonblocking(true).map_err(MuxError::Attach)?;
        return Ok(Stream::Unix(s));
    }
    let (host, port) =
        parse_tcp_target(&opts.target).ok_or(MuxError::AttachUsage("expected tcp://HOST:PORT"))?;
    let addrs: Vec<_> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(connect_err)?
        .collect();
    let mut last = io::Error::from(io::ErrorKind::AddrNotAvailable);
    let mut sock = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, GREETING_TIMEOUT) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let sock = sock.ok_or_else(|| connect_err(last))?;
    sock.set_nonblocking(true).map_err(MuxError::Attach)?;
    let _ = sock.set_nodelay(true);
    let Some(ca) = &opts.ca else {
        return Ok(Stream::Tcp(sock));
    };
    let identity = match (&opts.cert, &opts.key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => return Err(MuxError::AttachUsage("--cert and --key go together")),
    };
    let cfg = tls::client_config(ca, identity)?;
    Ok(Stream::Tls(Box::new(TlsStream::client(sock, cfg, &host)?)))
}

/// Connect to a console and relay stdin/stdout until detach or until the VM closes the
/// console. Returns the process exit status to use (0).
pub fn attach(opts: &AttachOptions) -> Result<i32, MuxError> {
    attach_fds(opts, libc::STDIN_FILENO, libc::STDOUT_FILENO)
}

/// The server's first line on an authenticated console, read by the relay loop.
struct Greeting {
    line: Vec<u8>,
    deadline: Instant,
}

/// [`attach`] with explicit input and output fds (tests use pipes).
pub fn attach_fds(opts: &AttachOptions, input: RawFd, output: RawFd) -> Result<i32, MuxError> {
    let token: Option<Secret> = opts
        .token_file
        .as_deref()
        .map(auth::read_token_file)
        .transpose()?;
    let mut conn = connect(opts)?;
    let mut read_only = opts.read_only;
    let mut outbound: Vec<u8> = Vec::new();
    if let Some(t) = &token {
        outbound.extend_from_slice(b"token ");
        outbound.extend_from_slice(t.expose());
        outbound.push(b'\n');
    }
    // A token or TLS console answers with its first line (the role, or why not).
    let mut greeting = (token.is_some() || opts.ca.is_some()).then(|| Greeting {
        line: Vec::new(),
        deadline: Instant::now() + GREETING_TIMEOUT,
    });
    let stdin_fd = input;
    let tty = term::is_tty(stdin_fd);
    let _raw = if tty { RawMode::enter(stdin_fd)? } else { None };
    let announce = |role: &str, read_only: bool| {
        if tty {
            say(&format!(
                "[microvm attach: {}{role}{}; {}]",
                opts.target,
                if read_only { ", read-only" } else { "" },
                super::escape::ATTACH_ESCAPE_HELP
            ));
        }
    };
    if greeting.is_none() {
        announce("", read_only);
    }
    let mut parser = EscapeParser::new(EscapeKeys::Attach);
    let mut stdin_eof = false;
    let mut buf = vec![0u8; 64 << 10];
    // The first bytes relayed, while fewer than HEAD_KEPT (dropped past that).
    let mut head: Option<Vec<u8>> = Some(Vec::new());
    loop {
        let timeout = match &greeting {
            Some(g) => {
                let left = g.deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    conn.finish();
                    return Err(MuxError::Refused(
                        "no answer from the console in time".into(),
                    ));
                }
                left.as_millis().min(i32::MAX as u128) as i32
            }
            None => -1,
        };
        let want_out = !outbound.is_empty() || conn.buffered();
        let mut fds = [
            libc::pollfd {
                fd: if stdin_eof || outbound.len() >= MAX_OUTBOUND || greeting.is_some() {
                    -1
                } else {
                    stdin_fd
                },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: conn.fd().unwrap_or(-1),
                events: libc::POLLIN | if want_out { libc::POLLOUT } else { 0 },
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of 2 pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(MuxError::Attach(e));
        }
        let sock_ev = fds[1].revents;
        if sock_ev & libc::POLLOUT != 0 {
            if conn.push_buffered().is_err() {
                return Ok(0);
            }
            if !send(&mut conn, &mut outbound) {
                return Ok(0);
            }
        }
        if sock_ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => {
                        if let Some(g) = &greeting {
                            return Err(MuxError::Refused(if g.line.is_empty() {
                                "the console closed the connection".into()
                            } else {
                                one_line(&String::from_utf8_lossy(&g.line))
                                    .trim()
                                    .to_string()
                            }));
                        }
                        if let Some(refusal) = head.as_deref().and_then(busy_refusal) {
                            return Err(MuxError::Refused(refusal));
                        }
                        if tty {
                            say("\r\n[microvm attach: console closed]");
                        }
                        return Ok(0);
                    }
                    Ok(n) => {
                        let mut data = &buf[..n];
                        if let Some(g) = greeting.as_mut() {
                            let end = data.iter().position(|&b| b == b'\n');
                            let take = end.map_or(data.len(), |i| i + 1);
                            g.line.extend_from_slice(&data[..take]);
                            data = &data[take..];
                            if end.is_none() && g.line.len() < 512 {
                                continue;
                            }
                            let line = String::from_utf8_lossy(&g.line).trim_end().to_string();
                            let Some(role) = line.strip_prefix("microvm: ok ") else {
                                conn.finish();
                                return Err(MuxError::Refused(one_line(&line)));
                            };
                            read_only |= role == "viewer";
                            announce(&format!(" as {}", one_line(role)), read_only);
                            greeting = None;
                        }
                        if let Some(h) = head.as_mut() {
                            h.extend_from_slice(data);
                            if h.len() > HEAD_KEPT {
                                head = None;
                            }
                        }
                        if write_all_fd(output, data).is_err() {
                            return Ok(0);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset && greeting.is_none() => {
                        return Ok(0);
                    }
                    Err(e) => return Err(MuxError::Attach(e)),
                }
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
                let _ = conn.write(&outbound);
                conn.finish();
                say("\r\n[microvm attach: detached]");
                return Ok(0);
            }
            if !send(&mut conn, &mut outbound) {
                return Ok(0);
            }
        }
    }
}

/// Sends what it can of `outbound` now; false when the connection is gone.
fn send(conn: &mut Stream, outbound: &mut Vec<u8>) -> bool {
    if outbound.is_empty() {
        return true;
    }
    match conn.write(outbound) {
        Ok(n) => {
            outbound.drain(..n);
            true
        }
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_targets() {
        assert_eq!(
            parse_tcp_target("tcp://127.0.0.1:4444"),
            Some(("127.0.0.1".into(), 4444))
        );
        assert_eq!(parse_tcp_target("tcp://[::1]:1"), Some(("::1".into(), 1)));
        assert_eq!(
            parse_tcp_target("tcp://localhost:80"),
            Some(("localhost".into(), 80))
        );
        for bad in [
            "tcp://:1",
            "tcp://h",
            "tcp://h:x",
            "tcp://h:99999",
            "/tmp/s",
        ] {
            assert_eq!(parse_tcp_target(bad), None, "{bad}");
        }
    }
}
