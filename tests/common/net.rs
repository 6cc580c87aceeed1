//! Connecting to console sockets (unix and TCP) and reading what they send.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use super::{TIMEOUT, contains, retry};

/// Connects to the unix socket at `path`, retrying until `deadline` (the VMM creates the
/// socket while it starts). No read timeout: the caller's reader decides.
pub fn connect_until(path: &Path, deadline: Instant) -> Result<UnixStream, String> {
    retry(deadline, || UnixStream::connect(path))
        .map_err(|e| format!("cannot connect to {}: {e}", path.display()))
}

/// [`connect_until`] for [`TIMEOUT`], with a read timeout of [`TIMEOUT`]; fails the test
/// if it cannot connect.
pub fn connect(path: &Path) -> UnixStream {
    let s = connect_until(path, Instant::now() + TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Connects to a TCP console once it listens, with a read timeout of [`TIMEOUT`].
pub fn tcp_connect(addr: SocketAddr) -> TcpStream {
    let s = retry(Instant::now() + TIMEOUT, || TcpStream::connect(addr))
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// A free loopback port (bound and released: another process could take it meanwhile,
/// which would fail the test loudly, not pass it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
        .port()
}

/// Reads until `needle` has arrived; returns all read (lossy UTF-8). End of stream, or
/// the stream's read timeout, before it fails the test.
pub fn read_until(s: &mut impl Read, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !contains(&got, needle.as_bytes()) {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "EOF before {needle:?}: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Exactly `n` bytes.
pub fn read_n(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    s.read_exact(&mut v).unwrap();
    v
}
