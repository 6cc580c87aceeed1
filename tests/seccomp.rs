//! Host tier (docs/TESTING.md): a thread of the real binary that breaks the rules, under
//! its seccomp filter, with a tiny real-mode guest on the host's KVM. The test-only
//! `MICROVM_TEST_SECCOMP_VIOLATION` hook makes the event loop or a vCPU thread call
//! `socket(AF_INET, ...)` right after its filter is installed: microvm must die with one
//! line naming the thread and the syscall, status 1, and the terminal restored; with
//! `--no-seccomp` the same run must go on as usual. The `MICROVM_TEST_PANIC` hook panics
//! on a filtered thread: status 1, one line, the report, and no seccomp trip. The hooks
//! exist only in a build with the `test-hooks` feature (`make test` has it); without it
//! the tests that need them fail at once, saying so.

mod common;

use common::TIMEOUT;
use common::proc::{MICROVM, run_bounded};
use common::tiny::{self, hello_guest, spin_guest};
use common::{fs::tmpdir, pty};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const HOOK: &str = "MICROVM_TEST_SECCOMP_VIOLATION";

/// Fails the test unless the binary has its test hooks (a run without them would wait
/// on a guest that never breaks a rule, or prove nothing).
#[cfg(not(feature = "test-hooks"))]
fn need_hooks() {
    panic!(
        "these tests drive the binary's test hooks: build with --features test-hooks (make test does)"
    );
}

/// The hooks are built in.
#[cfg(feature = "test-hooks")]
fn need_hooks() {}

/// The guest of these runs: prints "hello", powers off.
fn hello_image(name: &str) -> PathBuf {
    tiny::need_kvm();
    tiny::image(name, &hello_guest("hello\n"))
}

/// Runs the hello guest with `hook` set (or unset) and `extra` arguments.
fn run_with_hook(name: &str, hook: Option<&str>, extra: &[&str]) -> Output {
    if hook.is_some() {
        need_hooks();
    }
    let img = hello_image(name);
    let mut cmd = Command::new(MICROVM);
    cmd.arg("--real-mode-image").arg(&img).args(extra);
    cmd.stdin(Stdio::null());
    match hook {
        Some(h) => cmd.env(HOOK, h),
        None => cmd.env_remove(HOOK),
    };
    let out = cmd.output().unwrap();
    std::fs::remove_file(img).unwrap();
    out
}

/// The stderr lines that mention seccomp.
fn seccomp_lines(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.contains("seccomp"))
        .map(str::to_string)
        .collect()
}

fn assert_refused(out: &Output, thread: &str) {
    let lines = seccomp_lines(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "status {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines.len(), 1, "one line expected: {lines:?}");
    let want = format!(
        "microvm: seccomp: thread {thread} made forbidden syscall {} (socket); exiting",
        libc::SYS_socket
    );
    assert!(lines[0].starts_with(&want), "{:?} vs {want:?}", lines[0]);
}

#[test]
fn event_loop_socket_is_refused() {
    let out = run_with_hook("el", Some("event-loop"), &[]);
    assert_refused(&out, "event-loop");
}

#[test]
fn vcpu_socket_is_refused_before_the_guest_runs() {
    let out = run_with_hook("vcpu", Some("vcpu"), &[]);
    assert_refused(&out, "vcpu0");
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
}

#[test]
fn no_seccomp_lets_the_same_runs_go_on() {
    for hook in ["event-loop", "vcpu"] {
        let out = run_with_hook(&format!("off-{hook}"), Some(hook), &["--no-seccomp"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{hook}: stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, b"hello\n", "{hook}");
        assert!(seccomp_lines(&out.stderr).is_empty(), "{hook}");
    }
}

#[test]
fn filtered_run_is_unchanged() {
    let out = run_with_hook("on", None, &[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"hello\n");
    assert!(seccomp_lines(&out.stderr).is_empty());
}

/// The local modes of the terminal `fd` ([`pty::termios`]); an error fails the test.
fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    pty::termios(fd.as_raw_fd()).unwrap().c_lflag
}

/// On a terminal (raw mode on), the SIGSYS handler restores the terminal before exiting,
/// from a vCPU thread as from the event loop.
#[test]
fn violation_on_a_terminal_restores_it() {
    need_hooks();
    for (hook, thread) in [("vcpu", "vcpu0"), ("event-loop", "event-loop")] {
        let (master, slave) = pty::openpty(None).unwrap();
        let cooked = lflag(&slave);
        assert_ne!(cooked & libc::ICANON, 0);
        let img = hello_image(&format!("pty-{hook}"));
        let out = Command::new(MICROVM)
            .arg("--real-mode-image")
            .arg(&img)
            .env(HOOK, hook)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        std::fs::remove_file(img).unwrap();
        assert_refused(&out, thread);
        let line = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(line.ends_with("\r\n"), "raw-mode line ending: {line:?}");
        assert_eq!(lflag(&slave), cooked, "{hook}: terminal not restored");
        drop(master);
    }
}

/// A panic on a vCPU thread (under its seccomp filter) or on the event loop ends the
/// VM with status 1, one line saying where, and the report (the old VMM's vCPU panic left
/// the VM hung; under the filters its panic hook tripped seccomp).
#[test]
fn a_panic_on_any_thread_ends_the_vm_with_status_1() {
    need_hooks();
    let d = tmpdir("panic");
    for thread in ["vcpu", "event-loop"] {
        let report = d.join(format!("{thread}.json"));
        let img = tiny::image(thread, &spin_guest());
        let mut cmd = Command::new(MICROVM);
        cmd.arg("--real-mode-image")
            .arg(&img)
            .args(["--console", "ring", "--report", report.to_str().unwrap()])
            .env("MICROVM_TEST_PANIC", thread);
        let out = run_bounded(cmd, None, TIMEOUT);
        let _ = std::fs::remove_file(img);
        let stderr = out.stderr;
        assert_eq!(out.status, 1, "{thread}: {stderr}");
        assert!(
            stderr.contains("internal error: thread"),
            "{thread}: {stderr}"
        );
        assert!(stderr.contains("MICROVM_TEST_PANIC"), "{thread}: {stderr}");
        assert!(!stderr.contains("seccomp"), "{thread}: {stderr}");
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(j["exit"]["reason"], "error", "{thread}");
    }
    let _ = std::fs::remove_dir_all(d);
}
