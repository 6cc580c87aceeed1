//! The one home of the helpers the test crates share (docs/TESTING.md). A host-tier crate
//! says `mod common;`, the boot tier `#[path = "../common/mod.rs"] mod common;`.
//!
//! - `mod.rs`: waiting (`poll_until`, `wait_until`, `retry`) and byte/text searches.
//! - [`fs`]: scratch directories and files, FIFOs.
//! - [`net`]: connecting to console sockets and reading from them.
//! - [`proc`]: running a process (the real binary, its pipes) with a bound on its time.
//! - [`tiny`]: tiny hand-assembled real-mode guests and their images.
//! - [`vmm`]: the real binary running a tiny guest.
//! - [`hub`]: a real console hub in this process (no KVM).
//! - [`pki`], [`pty`]: test certificates and tokens; pseudo-terminals.
//!
//! Failures: the host-tier helpers fail the test (panic) with a message saying what was
//! awaited; those the boot tier's harness uses return `Result<_, String>` (`poll_until`,
//! `retry`, `net::connect_until`, `fs::Scratch`), and the panicking ones wrap them.
#![allow(dead_code)] // each crate uses a part

pub mod fs;
pub mod hub;
pub mod net;
pub mod pki;
pub mod proc;
pub mod pty;
pub mod tiny;
pub mod vmm;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a host-tier test waits for anything (a condition, a connection, a read, an
/// exit) before it fails: a bound for a hang, never a speed check.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `cond` until it holds or `deadline` passes: every millisecond at first, backing
/// off to every 20 ms (a wait that is long anyway costs little CPU, a short one little
/// time).
pub fn poll_until(
    deadline: Instant,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> Result<(), String> {
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// [`poll_until`] for [`TIMEOUT`] from now; a timeout fails the test.
pub fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    if let Err(e) = poll_until(Instant::now() + TIMEOUT, what, cond) {
        panic!("{e}");
    }
}

/// Calls `f` until it succeeds or `deadline` passes (e.g. connecting to a socket the VMM
/// is still creating); the error is the last one `f` returned.
pub fn retry<T>(deadline: Instant, mut f: impl FnMut() -> std::io::Result<T>) -> Result<T, String> {
    let (mut got, mut last) = (None, String::new());
    let _ = poll_until(deadline, "", || match f() {
        Ok(v) => {
            got = Some(v);
            true
        }
        Err(e) => {
            last = e.to_string();
            false
        }
    });
    got.ok_or(last)
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle, 0).is_some()
}

/// Position of `needle` in `hay` at or after `from`.
pub fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() {
        return (from <= hay.len()).then_some(from);
    }
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// The non-blank lines of `s` (what microvm printed on stderr).
pub fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// `$MICROVM_CACHE`, else `~/.cache/microvm`: where scripts/guest.sh puts the reference
/// guest (`guest/`) and scripts/deps.sh the JUnit schema (`junit-10.xsd`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MICROVM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/microvm")
        })
}
