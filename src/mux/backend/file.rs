//! `file=PATH`: lossless append-mode log with optional rotation and line timestamps.
//!
//! A regular file is written directly (the hub's lossless policy: its backlog paces the
//! guest). A FIFO or a device is opened and written without blocking (never polled by
//! open: a FIFO without a reader is refused at start instead of hanging there) and gets
//! the drop-and-count policy: a reader that stops costs it bytes, never the VM's
//! progress. Rotation and the moved-file check apply to regular files only.

use super::{BackendError, Port};
use crate::host::files;
use crate::mux::spec::FileSpec;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often a write looks whether PATH still names the open file (moved away by a log
/// rotation that does not copy-truncate, or deleted); if not, the log is reopened there.
const REOPEN_CHECK: Duration = Duration::from_secs(1);

/// An append-mode log file. Writes go straight to the kernel (no user-space buffer),
/// so a crash loses nothing the hub had taken. When the file is renamed or removed
/// underneath (logrotate without copytruncate), output goes on to a new file at PATH
/// within [`REOPEN_CHECK`]; what was written before stays in the moved file.
pub(crate) struct FilePort {
    path: PathBuf,
    file: File,
    /// (dev, ino) of `file`.
    id: (u64, u64),
    /// `open` created the file (it did not exist): removed again if the hub is not set up.
    created: bool,
    last_check: Instant,
    check_every: Duration,
    size: u64,
    rotate: Option<u64>,
    keep: u32,
    /// A regular file (else a FIFO or device, written without blocking).
    regular: bool,
}

fn open_append(path: &Path) -> Result<File, BackendError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(BackendError::DirMissing {
            what: "log",
            dir: dir.to_path_buf(),
            path: path.to_path_buf(),
        });
    }
    // 0600 when created, never through a symlink, never waiting in open (a FIFO without
    // a reader would block it forever): `files::open_append`.
    let file =
        files::open_append(path, "console log").map_err(|source| match source.raw_os_error() {
            Some(libc::ENXIO) => BackendError::FifoNoReader(path.to_path_buf()),
            Some(libc::ELOOP) => BackendError::Symlink(path.to_path_buf()),
            _ => BackendError::Open {
                path: path.to_path_buf(),
                source,
            },
        })?;
    if file.metadata().is_ok_and(|m| m.is_file()) {
        // A regular file: plain blocking writes on our own description (O_NONBLOCK
        // means nothing for it anyway).
        // SAFETY: F_SETFL on our own descriptor with flags read from it.
        unsafe {
            let fd = file.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
    }
    Ok(file)
}

impl FilePort {
    /// Open (create) the log in append mode.
    pub(crate) fn open(spec: &FileSpec) -> Result<Self, BackendError> {
        let existed = std::fs::symlink_metadata(&spec.path).is_ok();
        let file = open_append(&spec.path)?;
        let meta = file.metadata().ok();
        let size = meta.as_ref().map_or(0, |m| m.len());
        let regular = meta.as_ref().is_some_and(|m| m.is_file());
        Ok(FilePort {
            path: spec.path.clone(),
            file,
            id: meta.map_or((0, 0), |m| (m.dev(), m.ino())),
            created: !existed,
            last_check: Instant::now(),
            check_every: REOPEN_CHECK,
            size,
            rotate: spec.rotate,
            keep: spec.keep.max(1),
            regular,
        })
    }

    /// A regular file (the lossless policy), not a FIFO or device.
    pub(crate) fn is_regular(&self) -> bool {
        self.regular
    }

    fn numbered(&self, n: u32) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    /// PATH.(keep-1) -> PATH.keep, ..., PATH -> PATH.1, then a fresh PATH.
    fn rotate_now(&mut self) -> io::Result<()> {
        for i in (1..self.keep).rev() {
            match std::fs::rename(self.numbered(i), self.numbered(i + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, self.numbered(1))?;
        self.reopen()
    }

    /// A fresh file at PATH (created if needed) in place of the open one.
    fn reopen(&mut self) -> io::Result<()> {
        self.file = open_append(&self.path).map_err(|e| match e {
            BackendError::Open { source, .. } => source,
            other => io::Error::other(other.to_string()),
        })?;
        let m = self.file.metadata()?;
        self.id = (m.dev(), m.ino());
        self.size = m.len();
        Ok(())
    }

    /// Reopens PATH when it no longer names the open file (rotated away, deleted).
    fn follow_path(&mut self) -> io::Result<()> {
        if self.last_check.elapsed() < self.check_every {
            return Ok(());
        }
        self.last_check = Instant::now();
        let moved = match std::fs::metadata(&self.path) {
            Ok(m) => (m.dev(), m.ino()) != self.id,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            // Cannot tell (e.g. a directory became unreadable): keep the open file.
            Err(_) => false,
        };
        if moved { self.reopen() } else { Ok(()) }
    }

    fn write_out(&mut self, data: &[u8]) -> io::Result<()> {
        self.follow_path()?;
        if let Some(limit) = self.rotate
            && self.size > 0
            && self.size + data.len() as u64 > limit
        {
            // Someone (logrotate copytruncate) may have truncated it: look again.
            self.size = self.file.metadata().map(|m| m.len()).unwrap_or(self.size);
            if self.size > 0 && self.size + data.len() as u64 > limit {
                self.rotate_now()?;
            }
        }
        self.file.write_all(data)?;
        self.size += data.len() as u64;
        Ok(())
    }
}

impl Port for FilePort {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.regular {
            self.write_out(buf)?;
            Ok(buf.len())
        } else {
            // O_NONBLOCK: what the reader has room for, or WouldBlock.
            self.file.write(buf)
        }
    }

    fn fd(&self) -> Option<RawFd> {
        // A FIFO or device is polled for room; a regular file always has it.
        (!self.regular).then(|| self.file.as_raw_fd())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.regular {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }

    fn discard(&mut self) {
        // Only a file this port created and never wrote to: nothing of the user's.
        if self.created
            && self.size == 0
            && std::fs::metadata(&self.path)
                .is_ok_and(|m| (m.dev(), m.ino()) == self.id && m.len() == 0)
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `2025-01-02T03:04:05.678Z ` (UTC, milliseconds), computed without a time crate.
/// `:timestamps`: the UTC time at the start of each line, stamped when the hub takes the
/// bytes (so a log that waits for its disk still shows when the guest wrote them).
#[derive(Debug)]
pub(crate) struct LineStamper {
    at_line_start: bool,
}

impl LineStamper {
    pub(crate) fn new() -> LineStamper {
        LineStamper {
            at_line_start: true,
        }
    }

    /// `data` with a timestamp before each line's first byte, appended to `out`.
    pub(crate) fn stamp(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let stamp = timestamp(SystemTime::now());
        for &b in data {
            if self.at_line_start {
                out.extend_from_slice(stamp.as_bytes());
                self.at_line_start = false;
            }
            out.push(b);
            if b == b'\n' {
                self.at_line_start = true;
            }
        }
    }
}

pub(crate) fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:03}Z ",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::test_util::scratch_dir;
    use std::time::Duration;

    fn spec(path: PathBuf) -> FileSpec {
        FileSpec {
            path,
            rotate: None,
            keep: 5,
            timestamps: false,
        }
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        let t = UNIX_EPOCH + Duration::from_millis(1_704_067_200_123 + 3_723_000);
        assert_eq!(timestamp(t), "2024-01-01T01:02:03.123Z ");
    }

    #[test]
    fn appends_and_keeps_existing() {
        let d = scratch_dir("file-append");
        let p = d.join("log");
        std::fs::write(&p, b"old\n").unwrap();
        let mut f = FilePort::open(&spec(p.clone())).unwrap();
        f.write(b"new\n").unwrap();
        f.flush().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"old\nnew\n");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn rotates_and_keeps_n() {
        let d = scratch_dir("file-rotate");
        let p = d.join("log");
        let mut s = spec(p.clone());
        s.rotate = Some(10);
        s.keep = 2;
        let mut f = FilePort::open(&s).unwrap();
        for chunk in [&b"aaaaaa"[..], b"bbbbbb", b"cccccc", b"dddddd"] {
            f.write(chunk).unwrap();
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"dddddd");
        assert_eq!(std::fs::read(d.join("log.1")).unwrap(), b"cccccc");
        assert_eq!(std::fs::read(d.join("log.2")).unwrap(), b"bbbbbb");
        assert!(!d.join("log.3").exists());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn timestamps_at_line_starts_only() {
        let mut st = LineStamper::new();
        let mut out = Vec::new();
        st.stamp(b"one\ntw", &mut out);
        st.stamp(b"o\nthree", &mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines.len(), 3);
        for (l, want) in lines.iter().zip(["one", "two", "three"]) {
            // "YYYY-MM-DDTHH:MM:SS.mmmZ " is 25 bytes.
            assert_eq!(&l[25..], want, "{text}");
            assert!(l[..25].ends_with("Z "));
        }
    }

    #[test]
    fn rotated_away_underneath_reopens_path() {
        let d = scratch_dir("file-moved");
        let p = d.join("log");
        let mut f = FilePort::open(&spec(p.clone())).unwrap();
        f.check_every = Duration::ZERO;
        f.write(b"one\n").unwrap();
        std::fs::rename(&p, d.join("log.1")).unwrap();
        f.write(b"two\n").unwrap();
        std::fs::remove_file(&p).unwrap();
        f.write(b"three\n").unwrap();
        assert_eq!(std::fs::read(d.join("log.1")).unwrap(), b"one\n");
        assert_eq!(std::fs::read(&p).unwrap(), b"three\n");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn copytruncate_underneath_leaves_no_hole() {
        let d = scratch_dir("file-copytruncate");
        let p = d.join("log");
        let mut f = FilePort::open(&spec(p.clone())).unwrap();
        f.write(b"before rotation\n").unwrap();
        // logrotate's copytruncate: copy away, then truncate in place.
        std::fs::copy(&p, d.join("log.1")).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        f.write(b"after\n").unwrap();
        assert_eq!(
            std::fs::read(&p).unwrap(),
            b"after\n",
            "append mode: no hole"
        );
        assert_eq!(
            std::fs::read(d.join("log.1")).unwrap(),
            b"before rotation\n"
        );
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn discard_removes_only_a_file_it_created_empty() {
        let d = scratch_dir("file-discard");
        let fresh = d.join("fresh");
        FilePort::open(&spec(fresh.clone())).unwrap().discard();
        assert!(!fresh.exists());
        let old = d.join("old");
        std::fs::write(&old, b"").unwrap();
        FilePort::open(&spec(old.clone())).unwrap().discard();
        assert!(old.exists(), "a file that was there is left alone");
        let used = d.join("used");
        let mut f = FilePort::open(&spec(used.clone())).unwrap();
        f.write(b"x").unwrap();
        f.discard();
        assert!(used.exists());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn missing_dir_is_named() {
        let e = FilePort::open(&spec("/nonexistent-dir-xyz/log".into()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent-dir-xyz"), "{e}");
    }
}
