//! Helpers shared by the unit tests (compiled only for `cargo test`).

use std::path::PathBuf;

/// A fresh, empty scratch directory for one test: `$TMPDIR/microvm-unit-PID-TAG`. Tags
/// name the module and the test (`file-rotate`), so tests running in parallel in one
/// process never share a directory.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("microvm-unit-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
