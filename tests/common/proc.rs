//! Running a process from a test: the real binary, its output collected by threads,
//! pipes, and a bound on how long it may take.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::poll_until;

/// The binary cargo built for this test run.
pub const MICROVM: &str = env!("CARGO_BIN_EXE_microvm");

/// Copies everything `src` yields into `dst` on a thread of its own, until end of stream
/// or an error.
pub fn pump(mut src: impl Read + Send + 'static, dst: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => dst.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

/// Waits up to `limit` for `child` to exit; past it, kills it and returns `None`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let mut status = None;
    let _ = poll_until(Instant::now() + limit, "", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: a valid 2-element array for pipe2(2).
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: two fresh descriptors we own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// What a finished run left.
pub struct Run {
    /// The exit code, -1 when a signal ended it.
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Runs `cmd` with stdout and stderr collected. `input`, when given, is written to its
/// stdin, which stays open until it exits (an end of input is news to a guest's console,
/// which says so on stderr); otherwise stdin is /dev/null. Fails the test if it has not
/// ended within `limit`: no input may make microvm hang.
pub fn run_bounded(mut cmd: Command, input: Option<&[u8]>, limit: Duration) -> Run {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, err) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let readers = [
        pump(child.stdout.take().unwrap(), out.clone()),
        pump(child.stderr.take().unwrap(), err.clone()),
    ];
    let mut stdin = child.stdin.take();
    if let (Some(s), Some(input)) = (stdin.as_mut(), input) {
        s.write_all(input).unwrap();
    }
    let Some(status) = wait_exit(&mut child, limit) else {
        panic!("microvm did not exit within {limit:?}: {cmd:?}");
    };
    drop(stdin);
    for r in readers {
        r.join().unwrap();
    }
    let stdout = std::mem::take(&mut *out.lock().unwrap());
    let stderr = String::from_utf8_lossy(&err.lock().unwrap()).into_owned();
    Run {
        status: status.code().unwrap_or(-1),
        stdout,
        stderr,
    }
}
