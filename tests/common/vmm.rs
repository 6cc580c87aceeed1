//! The real binary running a tiny real-mode guest ([`super::tiny`]): to its end
//! ([`run`]), or in the background while the test drives it ([`Vmm`]).

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::proc::{MICROVM, Run, pump, run_bounded, wait_exit};
use super::{TIMEOUT, contains, poll_until, tiny};

/// Runs microvm on `guest` with `input` on stdin; a safety timeout kills it.
pub fn run(name: &str, guest: &[u8], input: &[u8]) -> Run {
    run_with(name, guest, input, &[])
}

/// [`run`] with extra microvm arguments.
pub fn run_with(name: &str, guest: &[u8], input: &[u8], args: &[&str]) -> Run {
    tiny::need_kvm();
    let img = tiny::image(name, guest);
    let mut cmd = Command::new(MICROVM);
    cmd.args(args).arg("--real-mode-image").arg(&img);
    let r = run_bounded(cmd, Some(input), Duration::from_secs(60));
    std::fs::remove_file(img).unwrap();
    r
}

/// A running microvm with its stdout and stderr collected by threads.
pub struct Vmm {
    pub child: Child,
    pub out: Arc<Mutex<Vec<u8>>>,
    pub err: Arc<Mutex<Vec<u8>>>,
    img: std::path::PathBuf,
}

impl Vmm {
    /// Starts microvm on `guest` with `args`; stdout (when piped) and stderr are collected.
    pub fn start(name: &str, guest: &[u8], args: &[&str], stdin: Stdio, stdout: Stdio) -> Vmm {
        Vmm::start_with(name, guest, args, stdin, stdout, true)
    }

    /// [`Vmm::start`]; a piped stdout is left in `child.stdout` unless `collect_stdout`.
    pub fn start_with(
        name: &str,
        guest: &[u8],
        args: &[&str],
        stdin: Stdio,
        stdout: Stdio,
        collect_stdout: bool,
    ) -> Vmm {
        Vmm::spawn(name, guest, args, stdin, stdout, collect_stdout, |_| {})
    }

    /// [`Vmm::start_with`], after `prepare` changed the command (environment, umask).
    pub fn spawn(
        name: &str,
        guest: &[u8],
        args: &[&str],
        stdin: Stdio,
        stdout: Stdio,
        collect_stdout: bool,
        prepare: impl FnOnce(&mut Command),
    ) -> Vmm {
        let img = tiny::image(name, guest);
        let mut cmd = Command::new(MICROVM);
        cmd.arg("--real-mode-image")
            .arg(&img)
            .args(args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped());
        prepare(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        if collect_stdout && let Some(o) = child.stdout.take() {
            pump(o, out.clone());
        }
        pump(child.stderr.take().unwrap(), err.clone());
        Vmm {
            child,
            out,
            err,
            img,
        }
    }

    /// Waits (for [`TIMEOUT`]) until `f` holds; a timeout fails the test, showing
    /// microvm's stdout and stderr.
    pub fn wait_for(&self, what: &str, mut f: impl FnMut(&Vmm) -> bool) {
        if let Err(e) = poll_until(Instant::now() + TIMEOUT, what, || f(self)) {
            panic!(
                "{e}; stdout {:?}, stderr {}",
                String::from_utf8_lossy(&self.out.lock().unwrap()),
                self.stderr()
            );
        }
    }

    pub fn stdout_has(&self, needle: &[u8]) -> bool {
        contains(&self.out.lock().unwrap(), needle)
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits (for [`TIMEOUT`]) for the exit status; the collectors get what is left.
    pub fn wait(&mut self) -> ExitStatus {
        let Some(st) = wait_exit(&mut self.child, TIMEOUT) else {
            panic!("microvm did not exit; stderr {}", self.stderr());
        };
        std::thread::sleep(Duration::from_millis(50));
        st
    }

    /// Resident memory of the microvm process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.img);
    }
}
