//! `sock[=PATH]` and `tcp=ADDR:PORT`: listeners and client streams.

use super::{BackendError, Port, cvt};
use crate::host::files::{FilesError, PathLock};
use crate::mux::spec::MAX_UNIX_PATH;
use crate::mux::tls::TlsStream;
use rustls::ServerConfig;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The default socket path for `sock` without a value: `microvm-PID.sock` in the
/// private runtime directory (`files::runtime_dir`; `-N` added for a second default
/// socket in the same process).
pub fn default_socket_path() -> Result<PathBuf, FilesError> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = crate::host::files::runtime_dir()?;
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    Ok(if n == 0 {
        dir.join(format!("microvm-{pid}.sock"))
    } else {
        dir.join(format!("microvm-{pid}-{n}.sock"))
    })
}

/// A listening socket of either family.
pub(crate) enum Listener {
    /// Unix; `id` is (dev, ino) of the socket file so shutdown removes only our own;
    /// `lock` guards the name while we serve it.
    Unix {
        l: UnixListener,
        path: PathBuf,
        id: (u64, u64),
        lock: PathLock,
    },
    /// TCP.
    Tcp(TcpListener),
}

impl Listener {
    pub(crate) fn fd(&self) -> RawFd {
        match self {
            Listener::Unix { l, .. } => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// Accept one pending client (non-blocking), with the peer's address for messages.
    pub(crate) fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Unix { l, .. } => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(true)?;
                Ok((Stream::Unix(s), "a local process".into()))
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nonblocking(true)?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), peer.to_string()))
            }
        }
    }

    /// Human name: the path or address.
    pub(crate) fn describe(&self) -> String {
        match self {
            Listener::Unix { path, .. } => path.display().to_string(),
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("tcp {a}"))
                .unwrap_or_else(|_| "tcp".into()),
        }
    }

    /// Remove our socket file (only if it is still the one we created), then its lock.
    pub(crate) fn remove_file(&self) {
        if let Listener::Unix { path, id, lock, .. } = self {
            if let Ok(m) = std::fs::symlink_metadata(path)
                && m.file_type().is_socket()
                && (m.dev(), m.ino()) == *id
            {
                let _ = std::fs::remove_file(path);
            }
            lock.release();
        }
    }
}

/// A connected client.
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
}

impl Stream {
    fn raw(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.fd(),
        }
    }

    /// A TCP connection becomes the server side of a TLS one.
    pub(crate) fn into_tls(self, cfg: Arc<ServerConfig>) -> io::Result<Stream> {
        match self {
            Stream::Tcp(s) => Ok(Stream::Tls(Box::new(TlsStream::server(s, cfg)?))),
            other => Ok(other),
        }
    }

    /// Looks at up to `buf.len()` received bytes without taking them (plain sockets;
    /// `WouldBlock` when none, `Ok(0)` at the end).
    pub(crate) fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf, libc::MSG_PEEK)
    }

    fn recv(&mut self, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid and writable for buf.len() bytes.
            let r = cvt(unsafe {
                libc::recv(
                    self.raw(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    flags | libc::MSG_DONTWAIT,
                )
            });
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Says we are done writing: a TLS close_notify, then the socket's FIN (the peer
    /// reads what was sent, then the end).
    pub(crate) fn finish(&mut self) {
        if let Stream::Tls(t) = self {
            t.close();
        }
        // SAFETY: shutdown on our own socket fd.
        unsafe { libc::shutdown(self.raw(), libc::SHUT_WR) };
    }

    /// The TLS handshake is still going on (never for a plain socket).
    pub(crate) fn handshaking(&self) -> bool {
        matches!(self, Stream::Tls(t) if t.handshaking())
    }

    /// The TLS peer presented a certificate the server's CA verified.
    pub(crate) fn peer_verified(&self) -> bool {
        matches!(self, Stream::Tls(t) if t.peer_verified())
    }
}

impl Port for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Stream::Tls(t) = self {
            return t.write(buf);
        }
        loop {
            // SAFETY: buf is valid for buf.len() bytes; MSG_NOSIGNAL keeps a vanished peer
            // from raising SIGPIPE.
            let r = cvt(unsafe {
                libc::send(
                    self.raw(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            });
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tls(t) => t.read(buf),
            _ => self.recv(buf, 0),
        }
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.raw())
    }

    fn write_first(&mut self, line: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tls(t) => t.write_line(line),
            _ => self.write(line),
        }
    }

    fn buffered(&self) -> bool {
        matches!(self, Stream::Tls(t) if t.buffered())
    }

    fn push_buffered(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(t) => t.push(),
            _ => Ok(()),
        }
    }

    fn input_buffered(&mut self) -> bool {
        match self {
            Stream::Tls(t) => t.input_buffered(),
            _ => false,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // At shutdown: a TLS client is told the session ends (close_notify).
        if let Stream::Tls(t) = self {
            t.close();
        }
        Ok(())
    }
}

/// Bind a unix stream listener at `path` with permissions `mode` (0600 unless the user
/// asked otherwise with `:mode=`).
///
/// Refuses a path that exists and is not a socket, or a socket someone listens on;
/// replaces a stale socket (connect gets ECONNREFUSED).
pub(crate) fn bind_unix(path: &Path, mode: u32) -> Result<Listener, BackendError> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() > MAX_UNIX_PATH {
        return Err(BackendError::PathTooLong {
            path: path.to_path_buf(),
            len: bytes.len(),
        });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(BackendError::DirMissing {
            what: "socket",
            dir,
            path: path.to_path_buf(),
        });
    }
    let not_a_socket = |m: std::fs::Metadata| {
        (!m.file_type().is_socket()).then(|| BackendError::NotASocket(path.to_path_buf()))
    };
    // Anything but a socket (a file, a planted link) is refused before any file of ours
    // appears beside it.
    if let Some(e) = std::fs::symlink_metadata(path).ok().and_then(not_a_socket) {
        return Err(e);
    }
    // Held until shutdown: a second microvm on this name stops here, before it could
    // take a live socket for a stale one.
    let lock = PathLock::acquire(path).map_err(|e| match e {
        FilesError::Locked { .. } => BackendError::SocketInUse(path.to_path_buf()),
        other => BackendError::Files(other),
    })?;
    bind_locked(path, mode, lock)
}

/// [`bind_unix`] once the name's lock is ours (released again on failure).
fn bind_locked(path: &Path, mode: u32, lock: PathLock) -> Result<Listener, BackendError> {
    let fail = |e: BackendError| {
        lock.release();
        Err(e)
    };
    match listen_locked(path, mode) {
        Ok((l, id)) => Ok(Listener::Unix {
            l,
            path: path.to_path_buf(),
            id,
            lock,
        }),
        Err(e) => fail(e),
    }
}

fn listen_locked(path: &Path, mode: u32) -> Result<(UnixListener, (u64, u64)), BackendError> {
    let bytes = path.as_os_str().as_bytes();
    let listen_err = |source: io::Error| BackendError::Listen {
        addr: path.display().to_string(),
        source,
    };
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(BackendError::NotASocket(path.to_path_buf()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(BackendError::SocketInUse(path.to_path_buf())),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                std::fs::remove_file(path).map_err(listen_err)?;
                log::info!("removed stale console socket {}", path.display());
            }
            Err(e) => return Err(listen_err(e)),
        }
    }

    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(listen_err(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // On Linux the socket file's mode comes from the socket inode's mode (minus umask),
    // so fchmod before bind makes the file no more open than `mode` from the start: no
    // window where others could connect.
    // SAFETY: fchmod on our own fd.
    unsafe {
        libc::fchmod(fd, mode as libc::mode_t);
    }
    // SAFETY: zeroed sockaddr_un is valid; we fill family and path (length checked above).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un and len covers the family and NUL-terminated path.
    if unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len) } != 0 {
        return Err(listen_err(io::Error::last_os_error()));
    }
    // Exactly `mode` (the umask may have narrowed it), and belt and braces where fchmod
    // before bind is not honoured.
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        let _ = std::fs::remove_file(path);
        return Err(listen_err(e));
    }
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(fd, 64) } != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(listen_err(e));
    }
    let m = std::fs::symlink_metadata(path).map_err(listen_err)?;
    if mode & 0o077 != 0 {
        log::warn!(
            "warning: console socket {} has mode {mode:04o}: other users may attach and type into the guest",
            path.display()
        );
    }
    Ok((UnixListener::from(owned), (m.dev(), m.ino())))
}

/// Bind a TCP listener (who may connect is the listener's admission's business).
pub(crate) fn bind_tcp(addr: SocketAddr) -> Result<Listener, BackendError> {
    let l = TcpListener::bind(addr).map_err(|source| BackendError::Listen {
        addr: addr.to_string(),
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(|source| BackendError::Listen {
            addr: addr.to_string(),
            source,
        })?;
    Ok(Listener::Tcp(l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::test_util::scratch_dir;

    #[test]
    fn mode_0600_and_removed() {
        let d = scratch_dir("sock-mode");
        let p = d.join("c.sock");
        let l = bind_unix(&p, 0o600).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        l.remove_file();
        assert!(!p.exists());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn mode_as_asked_whatever_the_umask() {
        let d = scratch_dir("sock-mode-asked");
        let p = d.join("c.sock");
        let l = bind_unix(&p, 0o660).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o660);
        l.remove_file();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn refuses_regular_file_and_keeps_it() {
        let d = scratch_dir("sock-reg");
        let p = d.join("c.sock");
        std::fs::write(&p, b"precious").unwrap();
        let e = bind_unix(&p, 0o600).err().unwrap();
        assert!(matches!(e, BackendError::NotASocket(_)), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn reclaims_stale_refuses_live() {
        let d = scratch_dir("sock-stale");
        let p = d.join("c.sock");
        // A live listener: refused.
        let live = UnixListener::bind(&p).unwrap();
        let e = bind_unix(&p, 0o600).err().unwrap();
        assert!(matches!(e, BackendError::SocketInUse(_)), "{e}");
        // Dropping the listener leaves a stale socket file: reclaimed.
        drop(live);
        assert!(p.exists());
        let l = bind_unix(&p, 0o600).unwrap();
        l.remove_file();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn missing_dir_and_too_long() {
        let e = bind_unix(Path::new("/nonexistent-xyz/c.sock"), 0o600)
            .err()
            .unwrap();
        assert!(matches!(e, BackendError::DirMissing { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent-xyz"));
        let long = PathBuf::from(format!("/tmp/{}", "y".repeat(110)));
        let e = bind_unix(&long, 0o600).err().unwrap();
        assert!(
            matches!(e, BackendError::PathTooLong { len: 115, .. }),
            "{e}"
        );
    }
}
