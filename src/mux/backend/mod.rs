//! Backends: the byte endpoints a hub writes its output stream to and reads input from.
//!
//! Each concrete backend is a [`Port`]: non-blocking `write`/`read` plus the fd to poll.
//! Policies (lossless, bounded-then-cut-off) live in the hub, not here.

pub mod file;
pub mod socket;
pub mod stdio;

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// Errors setting up a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A path exists and is not a socket: refused, never deleted.
    #[error("console socket path '{0}' exists and is not a socket (refusing to touch it)")]
    NotASocket(PathBuf),
    /// A live server already listens there.
    #[error("console socket '{0}' is in use by another process")]
    SocketInUse(PathBuf),
    /// The parent directory is missing.
    #[error("directory '{dir}' for console {what} '{path}' does not exist")]
    DirMissing {
        /// "socket" or "log".
        what: &'static str,
        /// The directory.
        dir: PathBuf,
        /// The full path.
        path: PathBuf,
    },
    /// Longer than `sun_path`.
    #[error("unix socket path '{path}' is too long ({len} bytes, at most 107)")]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Creating, binding or listening failed.
    #[error("cannot listen on console socket '{addr}': {source}")]
    Listen {
        /// Path or address.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// A private file or directory could not be made (runtime directory, lock file).
    #[error(transparent)]
    Files(#[from] crate::host::files::FilesError),
    /// A token file is not usable.
    #[error(transparent)]
    Auth(#[from] crate::mux::auth::AuthError),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] crate::mux::tls::TlsError),
    /// A FIFO as log whose reader is not running.
    #[error("console log '{0}' is a FIFO with no reader; start its reader first")]
    FifoNoReader(PathBuf),
    /// A log path that is a symbolic link: never followed.
    #[error(
        "console log '{0}' is a symbolic link; microvm does not write through links (remove it or name the real file)"
    )]
    Symlink(PathBuf),
    /// Opening a log file failed.
    #[error("cannot open console log '{path}': {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// A non-blocking byte endpoint driven by the hub on the event-loop thread.
pub(crate) trait Port: Send {
    /// Write what can be written now; `WouldBlock` when nothing can.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Read available input; `Ok(0)` is end of input; `WouldBlock` when none.
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
    /// The fd to poll, if any (in-memory and file ports have none).
    fn fd(&self) -> Option<RawFd>;
    /// Make written data durable (files); best effort.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Writes a short line a fresh connection gets before anything else (the console's
    /// `ok` line, a busy notice): taken whole even while earlier TLS records still wait
    /// for the socket.
    fn write_first(&mut self, line: &[u8]) -> io::Result<usize> {
        self.write(line)
    }
    /// The port holds output of its own (TLS ciphertext) waiting for its fd to be
    /// writable.
    fn buffered(&self) -> bool {
        false
    }
    /// Sends what [`Port::buffered`] holds, until done or it would block.
    fn push_buffered(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Input is waiting inside the port (decrypted TLS) that polling its fd would not
    /// show.
    fn input_buffered(&mut self) -> bool {
        false
    }
    /// The hub could not be set up: undo what opening did (a log file it created and
    /// never wrote is removed), so that a failed start leaves no file behind.
    fn discard(&mut self) {}
}

/// `write(2)`/`send(2)` result to `io::Result`.
pub(crate) fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// In-memory ports for tests.
#[cfg(test)]
pub(crate) mod mem {
    use super::Port;
    use std::collections::VecDeque;
    use std::io;
    use std::os::fd::RawFd;
    use std::sync::{Arc, Mutex};

    /// What a test sees of a memory port.
    #[derive(Default, Debug)]
    pub struct MemState {
        /// Everything written.
        pub written: Vec<u8>,
        /// Bytes the port accepts before returning WouldBlock (None: unlimited).
        pub budget: Option<usize>,
        /// Max bytes per write call (0: unlimited).
        pub max_write: usize,
        /// Reads handed out one entry per read call.
        pub to_read: VecDeque<Vec<u8>>,
        /// Return EOF once `to_read` is empty.
        pub eof: bool,
        /// Fail writes with this error kind.
        pub fail: Option<io::ErrorKind>,
        /// Every successful read, tagged with a global sequence number.
        pub read_log: Vec<(u64, Vec<u8>)>,
    }

    static READ_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    /// A port backed by shared memory state.
    pub struct MemPort(pub Arc<Mutex<MemState>>);

    impl MemPort {
        pub fn new() -> (Self, Arc<Mutex<MemState>>) {
            let s = Arc::new(Mutex::new(MemState::default()));
            (MemPort(s.clone()), s)
        }
    }

    impl Port for MemPort {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            if let Some(k) = s.fail {
                return Err(k.into());
            }
            let mut n = buf.len();
            if s.max_write > 0 {
                n = n.min(s.max_write);
            }
            if let Some(b) = s.budget.as_mut() {
                n = n.min(*b);
                *b -= n;
            }
            if n == 0 && !buf.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            s.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            match s.to_read.pop_front() {
                Some(mut v) => {
                    let n = v.len().min(buf.len());
                    buf[..n].copy_from_slice(&v[..n]);
                    if n < v.len() {
                        let rest = v.split_off(n);
                        s.to_read.push_front(rest);
                    }
                    let seq = READ_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    s.read_log.push((seq, buf[..n].to_vec()));
                    Ok(n)
                }
                None if s.eof => Ok(0),
                None => Err(io::ErrorKind::WouldBlock.into()),
            }
        }

        fn fd(&self) -> Option<RawFd> {
            None
        }
    }
}
