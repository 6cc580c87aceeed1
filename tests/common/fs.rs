//! Scratch directories and files. Every one is under `$TMPDIR/microvm-test-PID-…`, so the
//! crates (one process each) never meet; within a crate each test names its own.

use std::path::{Path, PathBuf};

/// `$TMPDIR/microvm-test-PID-NAME`, emptied if it existed, created.
pub fn fresh_dir(name: &str) -> Result<PathBuf, String> {
    let d = std::env::temp_dir().join(format!("microvm-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
    Ok(d)
}

/// A fresh empty directory for one test (see [`fresh_dir`]); the test removes it.
pub fn tmpdir(name: &str) -> PathBuf {
    fresh_dir(name).unwrap_or_else(|e| panic!("{e}"))
}

/// A fresh directory for one boot case (see [`fresh_dir`]), removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(case: &str) -> Result<Scratch, String> {
        fresh_dir(case).map(Scratch)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `NAME` in this process's shared directory `$TMPDIR/microvm-test-PID` (created, never
/// emptied: for files each test names uniquely).
pub fn tmp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("microvm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Makes a FIFO (mode 0600) at `p`.
pub fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}
