//! Tier 2: the seccomp filters really refuse. The real binary runs a tiny real-mode guest on
//! the host's KVM with the test-only `MICROVM_TEST_SECCOMP_VIOLATION` hook, which makes the
//! event loop or a vCPU thread call `socket(AF_INET, ...)` right after its filter is
//! installed: microvm must die with one line naming the thread and the syscall, status 1,
//! and the terminal restored; with `--no-seccomp` the same run must go on as usual.

#[path = "common/pty.rs"]
mod pty;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const MICROVM: &str = env!("CARGO_BIN_EXE_microvm");
const HOOK: &str = "MICROVM_TEST_SECCOMP_VIOLATION";
const LOAD_ADDR: u16 = 0x1000;

/// Prints a NUL-terminated message to COM1, then powers off (ACPI S5), as in kvm_tiny.rs.
fn hello_guest(msg: &str) -> Vec<u8> {
    let mut c = vec![0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    let [lo, hi] = (LOAD_ADDR + 21).to_le_bytes();
    c.extend([0xbe, lo, hi]); // mov si, msg
    c.extend([0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]); // lodsb; test; jz; out; jmp
    c.extend([0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4]); // mov dx,0x600; mov al,0x34; out; hlt
    assert_eq!(c.len(), 21);
    c.extend(msg.as_bytes());
    c.push(0);
    c
}

fn image(name: &str) -> PathBuf {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (any KVM, PVM included)"
    );
    let p = std::env::temp_dir().join(format!("microvm-seccomp-{}-{name}.bin", std::process::id()));
    std::fs::write(&p, hello_guest("hello\n")).unwrap();
    p
}

fn run(name: &str, hook: Option<&str>, extra: &[&str]) -> Output {
    let img = image(name);
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
    let out = run("el", Some("event-loop"), &[]);
    assert_refused(&out, "event-loop");
}

#[test]
fn vcpu_socket_is_refused_before_the_guest_runs() {
    let out = run("vcpu", Some("vcpu"), &[]);
    assert_refused(&out, "vcpu0");
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
}

#[test]
fn no_seccomp_lets_the_same_runs_go_on() {
    for hook in ["event-loop", "vcpu"] {
        let out = run(&format!("off-{hook}"), Some(hook), &["--no-seccomp"]);
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
    let out = run("on", None, &[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"hello\n");
    assert!(seccomp_lines(&out.stderr).is_empty());
}

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    pty::termios(fd.as_raw_fd()).unwrap().c_lflag
}

/// On a terminal (raw mode on), the SIGSYS handler restores the terminal before exiting,
/// from a vCPU thread as from the event loop.
#[test]
fn violation_on_a_terminal_restores_it() {
    for (hook, thread) in [("vcpu", "vcpu0"), ("event-loop", "event-loop")] {
        let (master, slave) = pty::openpty(None).unwrap();
        let cooked = lflag(&slave);
        assert_ne!(cooked & libc::ICANON, 0);
        let img = image(&format!("pty-{hook}"));
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
