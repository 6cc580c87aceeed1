//! Files microvm creates, and where: the one place that opens them.
//!
//! Invariants:
//! * No file microvm writes is reached through a symbolic link: logs, the report, its
//!   temporary file and lock files are opened with `O_NOFOLLOW` (a planted link is an
//!   error naming it, never followed), and a rename replaces a link instead of writing
//!   through it.
//! * A temporary file has an unpredictable name (64 random bits) and is created with
//!   `O_EXCL`: nobody can plant it in advance.
//! * New files are mode 0600 whatever the umask (they hold the guest's console); an
//!   existing log that others may read, or that belongs to another user, is used but
//!   gets a warning.
//! * Default console sockets live in a private runtime directory ([`runtime_dir`]):
//!   `$XDG_RUNTIME_DIR/microvm/`, `/run/microvm/` for root, else `/tmp/microvm-UID/`
//!   (created 0700; an existing one must be a real directory, ours, with no group or
//!   other bits), never directly in a directory others can write.
//! * A unix socket path is guarded by a lock file beside it ([`PathLock`]), so two
//!   microvm processes never fight over one name.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Mode of every file microvm creates unless asked otherwise.
pub const PRIVATE_MODE: u32 = 0o600;

/// Errors creating or checking microvm's files.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A symbolic link where microvm creates or writes a file.
    #[error("{what} '{}' is a symbolic link; microvm does not write through links (remove it or name the real file)", .path.display())]
    Symlink {
        /// What the file is for ("console log", "--report").
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// Any other failure creating, writing or renaming.
    #[error("cannot write {what} '{}': {source}", .path.display())]
    Io {
        /// What the file is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The runtime directory is not private.
    #[error("console socket directory '{}' {why}; fix it, set XDG_RUNTIME_DIR, or give the socket a path (sock=PATH)", .path.display())]
    NotPrivate {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Another process holds the lock on a socket path.
    #[error("console socket '{}' is in use by another microvm (it holds '{}')", .path.display(), .lock.display())]
    Locked {
        /// The socket path.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
}

impl FilesError {
    fn io(what: &'static str, path: &Path, source: io::Error) -> FilesError {
        if source.raw_os_error() == Some(libc::ELOOP) {
            FilesError::Symlink {
                what,
                path: path.to_path_buf(),
            }
        } else {
            FilesError::Io {
                what,
                path: path.to_path_buf(),
                source,
            }
        }
    }

    /// The OS error behind it, for callers that report `io::Error`s.
    pub fn into_io(self) -> io::Error {
        match self {
            FilesError::Io { source, .. } => source,
            other => io::Error::other(other.to_string()),
        }
    }
}

/// The effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// 64 random bits as 16 hex digits (`getrandom(2)`; the clock and pid mixed in should it
/// fail, which it does not on any kernel microvm runs on).
pub fn random_hex() -> String {
    let mut b = [0u8; 8];
    // SAFETY: `b` is valid and writable for its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        b = (t ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Opens (creating it 0600 if missing) `path` for appending, without following a
/// symlink and without waiting in `open` (`O_NONBLOCK`: a FIFO without a reader fails
/// with `ENXIO` instead). An existing regular file that others may read or write, or
/// that another user owns, gets a warning.
pub fn open_append(path: &Path, what: &'static str) -> io::Result<File> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(PRIVATE_MODE)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)?;
    if let Ok(m) = file.metadata()
        && m.is_file()
    {
        warn_if_shared(&m, path, what);
    }
    Ok(file)
}

/// Warns when a file microvm writes the console to is open to others.
fn warn_if_shared(m: &std::fs::Metadata, path: &Path, what: &str) {
    let mode = m.mode() & 0o777;
    if m.uid() != euid() {
        log::warn!(
            "warning: {what} '{}' belongs to another user (uid {}); it may read what the guest prints",
            path.display(),
            m.uid()
        );
    } else if mode & 0o077 != 0 {
        log::warn!(
            "warning: {what} '{}' has mode {mode:04o}: other users may read what the guest prints (chmod 600 it)",
            path.display()
        );
    }
}

/// Writes `data` to `path` atomically: into a fresh temporary file beside it (random
/// name, `O_EXCL | O_NOFOLLOW`, mode 0600), synced, then renamed over `path` (a link at
/// `path` is replaced, not followed). On failure the temporary is removed.
pub fn write_atomic(path: &Path, data: &[u8], what: &'static str) -> Result<(), FilesError> {
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", random_hex()));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_MODE)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| FilesError::io(what, &tmp, e))?;
    let res = f
        .write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| FilesError::io(what, &tmp, e))
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| FilesError::io(what, path, e)));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// The private directory default console sockets go in, created if needed (see the
/// module doc): `$XDG_RUNTIME_DIR/microvm`, `/run/microvm` for root, else
/// `/tmp/microvm-UID`.
pub fn runtime_dir() -> Result<PathBuf, FilesError> {
    let uid = euid();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() && d.is_dir() => d.join("microvm"),
        _ if uid == 0 => PathBuf::from("/run/microvm"),
        _ => PathBuf::from(format!("/tmp/microvm-{uid}")),
    };
    private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` mode 0700 if missing; then it must be a directory (not a link), owned
/// by us, with no group or other permissions.
pub fn private_dir(dir: &Path) -> Result<(), FilesError> {
    let not_private = |why: String| FilesError::NotPrivate {
        path: dir.to_path_buf(),
        why,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(not_private(format!("cannot be created ({e})"))),
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| not_private(e.to_string()))?;
    if m.file_type().is_symlink() {
        return Err(not_private("is a symbolic link".into()));
    }
    if !m.is_dir() {
        return Err(not_private("is not a directory".into()));
    }
    if m.uid() != euid() {
        return Err(not_private(format!(
            "belongs to another user (uid {})",
            m.uid()
        )));
    }
    let mode = m.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(not_private(format!(
            "has mode {mode:04o}: other users could replace the socket (chmod 700 it)"
        )));
    }
    Ok(())
}

/// An exclusive `flock` on `PATH.lock`, held while microvm serves a socket at PATH.
#[derive(Debug)]
pub struct PathLock {
    file: File,
    path: PathBuf,
    id: (u64, u64),
}

impl PathLock {
    /// Takes the lock for the socket at `socket`, or says who has it.
    pub fn acquire(socket: &Path) -> Result<PathLock, FilesError> {
        let mut name = socket.as_os_str().to_os_string();
        name.push(".lock");
        let path = PathBuf::from(name);
        // The file may be replaced between open and flock (a holder releasing it
        // unlinks it): lock, then check the path still names what we locked.
        for _ in 0..8 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(PRIVATE_MODE)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| FilesError::io("console socket lock", &path, e))?;
            // SAFETY: flock on our own open descriptor.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Err(FilesError::Locked {
                        path: socket.to_path_buf(),
                        lock: path,
                    });
                }
                return Err(FilesError::io("console socket lock", &path, e));
            }
            let m = file
                .metadata()
                .map_err(|e| FilesError::io("console socket lock", &path, e))?;
            let id = (m.dev(), m.ino());
            if std::fs::symlink_metadata(&path).is_ok_and(|n| (n.dev(), n.ino()) == id) {
                return Ok(PathLock { file, path, id });
            }
        }
        Err(FilesError::Locked {
            path: socket.to_path_buf(),
            lock: path,
        })
    }

    /// Removes the lock file (still holding the lock, so nobody else has it meanwhile).
    pub fn release(&self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
        let _ = &self.file;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::test_util::scratch_dir;
    use std::os::unix::fs::{PermissionsExt, symlink};

    #[test]
    fn atomic_write_is_private_and_never_follows_links() {
        let d = scratch_dir("files-atomic");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let p = d.join("r.json");
        symlink(&victim, &p).unwrap();
        // SAFETY: umask only changes this process's creation mask (restored below).
        let old = unsafe { libc::umask(0) };
        let res = write_atomic(&p, b"{}\n", "--report");
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        res.unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.is_file(), "the link was replaced by the report");
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            2,
            "no temporary left"
        );
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn temporary_names_are_unpredictable() {
        let a = random_hex();
        let b = random_hex();
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }

    #[test]
    fn append_refuses_a_link() {
        let d = scratch_dir("files-append");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let p = d.join("log");
        symlink(&victim, &p).unwrap();
        let e = open_append(&p, "console log").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        let msg = FilesError::io("console log", &p, e).to_string();
        assert!(msg.contains("symbolic link"), "{msg}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let f = open_append(&d.join("new"), "console log").unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn private_dir_checks() {
        let d = scratch_dir("files-private");
        let ok = d.join("ok");
        private_dir(&ok).unwrap();
        let m = std::fs::metadata(&ok).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
        private_dir(&ok).unwrap();
        let wide = d.join("wide");
        std::fs::create_dir(&wide).unwrap();
        std::fs::set_permissions(&wide, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&wide).unwrap_err().to_string();
        assert!(e.contains("mode 0777"), "{e}");
        let link = d.join("link");
        symlink(&ok, &link).unwrap();
        let e = private_dir(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let file = d.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(private_dir(&file).is_err());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn lock_is_exclusive_and_released() {
        let d = scratch_dir("files-lock");
        let sock = d.join("c.sock");
        let a = PathLock::acquire(&sock).unwrap();
        let e = PathLock::acquire(&sock).unwrap_err();
        assert!(matches!(e, FilesError::Locked { .. }), "{e}");
        a.release();
        drop(a);
        assert!(!d.join("c.sock.lock").exists());
        let b = PathLock::acquire(&sock).unwrap();
        b.release();
        let _ = std::fs::remove_dir_all(d);
    }
}
