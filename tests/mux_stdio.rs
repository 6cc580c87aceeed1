//! Host tier (docs/TESTING.md): the console hub's stdio backend, in a child process of
//! this test (the hub owns fds 0 and 1): stdin at EOF and a closed stdout never stop the
//! VM; on a terminal (a pty) raw mode while running, the Ctrl-A keys, the terminal
//! restored on quit, SIGTERM and SIGABRT, its flags never changed. No KVM.

mod common;

use common::fs::tmpdir;
use common::hub::Vm;
use common::net::{connect, read_until};
use common::{TIMEOUT, pty, wait_until};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Not a test by itself: the child half of the stdio tests (runs only with MUX_CHILD set).
#[test]
#[ignore]
fn stdio_child() {
    let Ok(mode) = std::env::var("MUX_CHILD") else {
        return;
    };
    let spec = std::env::var("MUX_SPEC").unwrap();
    // As the binary does before any console exists (microvm::vmm::signals).
    microvm::vmm::signals::install_for_client();
    let vm = Vm::start(&spec);
    let mut w = vm.writer.clone();
    let start = Instant::now();
    let mut i = 0;
    loop {
        w.write_all(format!("tick {i}\r\n").as_bytes()).unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
        let quit = match mode.as_str() {
            "pipe" => String::from_utf8_lossy(&vm.uart.lock().unwrap().received).contains("quit"),
            _ => vm.exit.read().is_ok(),
        };
        if quit {
            break;
        }
        if start.elapsed() > TIMEOUT {
            std::process::exit(3);
        }
    }
    drop(vm.stop());
    // Skip libtest's summary: stdout may be closed on purpose.
    std::process::exit(0);
}

fn child(mode: &str, spec: &str) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args([
        "stdio_child",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("MUX_CHILD", mode)
    .env("MUX_SPEC", spec)
    .stderr(std::process::Stdio::null());
    c
}

#[test]
fn stdin_eof_and_closed_stdout_do_not_stop_the_vm() {
    let d = tmpdir("pipe");
    let p = d.join("c.sock");
    let mut ch = child("pipe", &format!("mux:stdio,sock={}", p.display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(ch.stdin.take()); // EOF on stdin at once
    let mut out = ch.stdout.take().unwrap();
    read_until(&mut out, "tick 3");
    drop(out); // broken pipe from now on
    wait_until("socket", || p.exists());
    let mut c = connect(&p);
    read_until(&mut c, "tick 30"); // still running well after stdout went away
    c.write_all(b"quit").unwrap();
    let st = ch.wait().unwrap();
    assert!(st.success(), "{st:?}");
    let _ = std::fs::remove_dir_all(d);
}

/// [`pty::termios`] of `fd`; an error fails the test.
fn termios(fd: &impl AsRawFd) -> libc::termios {
    pty::termios(fd.as_raw_fd()).unwrap()
}

fn read_pty_until(master: RawFd, needle: &str) -> String {
    let mut got = Vec::new();
    let start = Instant::now();
    while !String::from_utf8_lossy(&got).contains(needle) {
        assert!(
            start.elapsed() < TIMEOUT,
            "no {needle:?} in {:?}",
            String::from_utf8_lossy(&got)
        );
        let mut p = libc::pollfd {
            fd: master,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 100) } <= 0 {
            continue;
        }
        let mut buf = [0u8; 512];
        // SAFETY: buf is valid and writable.
        let n = unsafe { libc::read(master, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            got.extend_from_slice(&buf[..n as usize]);
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn tty_raw_mode_escape_keys_and_restore_on_quit() {
    let (pty_master, slave) = pty::openpty(None).unwrap();
    let master = pty_master.as_raw_fd();
    let before = termios(&slave);
    assert!(before.c_lflag & libc::ICANON != 0);
    let (sin, sout) = (slave.try_clone().unwrap(), slave.try_clone().unwrap());
    let mut ch = child("tty", "stdio")
        .stdin(std::process::Stdio::from(sin))
        .stdout(std::process::Stdio::from(sout))
        .spawn()
        .unwrap();
    read_pty_until(master, "tick 2");
    let raw = termios(&slave);
    assert!(
        raw.c_lflag & (libc::ICANON | libc::ECHO) == 0,
        "raw mode while running"
    );
    // SAFETY: writing a short buffer to the pty master.
    unsafe { libc::write(master, b"\x01h".as_ptr().cast(), 2) };
    read_pty_until(master, "Ctrl-A x");
    // SAFETY: as above.
    unsafe { libc::write(master, b"\x01x".as_ptr().cast(), 2) };
    let st = ch.wait().unwrap();
    assert!(st.success(), "{st:?}");
    let after = termios(&slave);
    assert_eq!(
        after.c_lflag, before.c_lflag,
        "terminal restored after Ctrl-A x"
    );
    assert_eq!(after.c_oflag, before.c_oflag);

    // Killed by SIGTERM: the handler restores the terminal, then the default action runs.
    let (sin, sout) = (slave.try_clone().unwrap(), slave.try_clone().unwrap());
    let mut ch = child("tty", "stdio")
        .stdin(std::process::Stdio::from(sin))
        .stdout(std::process::Stdio::from(sout))
        .spawn()
        .unwrap();
    read_pty_until(master, "tick 2");
    assert!(termios(&slave).c_lflag & libc::ICANON == 0);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(ch.id() as i32, libc::SIGTERM) };
    let st = ch.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGTERM), "{st:?}");
    let after = termios(&slave);
    assert_eq!(
        after.c_lflag, before.c_lflag,
        "terminal restored after Ctrl-A x"
    );
    assert_eq!(after.c_oflag, before.c_oflag);
}

/// The stdio backend never sets O_NONBLOCK on the terminal it shares with its parent
/// (it writes through a description of its own), so nothing is left behind by a
/// SIGKILL; SIGABRT restores the terminal like SIGTERM does.
#[test]
fn tty_flags_are_never_changed_and_sigabrt_restores_the_terminal() {
    let (pty_master, slave) = pty::openpty(None).unwrap();
    let master = pty_master.as_raw_fd();
    let before = termios(&slave);
    // SAFETY: F_GETFL on our own fd.
    let flags = || unsafe { libc::fcntl(slave.as_raw_fd(), libc::F_GETFL) };
    let start = |slave: &std::os::fd::OwnedFd| {
        let (sin, sout) = (slave.try_clone().unwrap(), slave.try_clone().unwrap());
        child("tty", "stdio")
            .stdin(std::process::Stdio::from(sin))
            .stdout(std::process::Stdio::from(sout))
            .spawn()
            .unwrap()
    };
    let mut ch = start(&slave);
    read_pty_until(master, "tick 2");
    assert!(
        termios(&slave).c_lflag & libc::ICANON == 0,
        "raw while running"
    );
    assert_eq!(
        flags() & libc::O_NONBLOCK,
        0,
        "O_NONBLOCK on the shared terminal"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(ch.id() as i32, libc::SIGABRT) };
    let st = ch.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGABRT), "{st:?}");
    let after = termios(&slave);
    assert_eq!(
        after.c_lflag, before.c_lflag,
        "terminal restored after SIGABRT"
    );
    // SIGKILL cannot be caught: raw mode stays (as with any program), O_NONBLOCK never
    // was set.
    let mut ch = start(&slave);
    read_pty_until(master, "tick 2");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(ch.id() as i32, libc::SIGKILL) };
    ch.wait().unwrap();
    assert_eq!(
        flags() & libc::O_NONBLOCK,
        0,
        "O_NONBLOCK left after SIGKILL"
    );
    assert_eq!(after.c_oflag, before.c_oflag);
}
