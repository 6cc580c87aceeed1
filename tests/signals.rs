//! Host tier (docs/TESTING.md): how signals stop the real binary running a tiny real-mode
//! guest: SIGTERM, SIGINT and SIGHUP end it cleanly with 128+N (socket removed, log
//! flushed, clients told, the terminal restored), and a second SIGTERM cuts the flush
//! short.

mod common;

use common::fs::tmpdir;
use common::net::{connect, read_until};
use common::tiny::{counter_flood_guest, echo_guest};
use common::vmm::Vmm;
use common::{lines, pty};
use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

#[test]
fn sigterm_sigint_and_sighup_stop_cleanly_with_128_plus_n() {
    for (sig, code) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
    ] {
        let d = tmpdir(&format!("sig{sig}"));
        let sock = d.join("c.sock");
        let log = d.join("console.log");
        let spec = format!("mux:stdio,sock={},file={}", sock.display(), log.display());
        let mut vm = Vmm::start(
            &format!("sig{sig}"),
            &echo_guest(),
            &["--console", &spec],
            Stdio::piped(),
            Stdio::piped(),
        );
        let mut stdin = vm.child.stdin.take().unwrap();
        stdin.write_all(b"hello").unwrap();
        vm.wait_for("echo", |v| v.stdout_has(b"hello"));
        let mut client = connect(&sock);
        read_until(&mut client, "hello"); // the history
        vm.signal(sig);
        let st = vm.wait();
        assert_eq!(st.code(), Some(code), "stderr {}", vm.stderr());
        assert!(!sock.exists(), "socket file removed");
        assert_eq!(std::fs::read(&log).unwrap(), b"hello", "log flushed");
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest);
        assert!(rest.is_empty(), "the client sees the end: {rest:?}");
        assert_eq!(
            lines(&vm.stderr()),
            [format!("microvm: stopped by signal {sig}")],
        );
        drop(stdin);
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn sigterm_restores_the_terminal() {
    use std::os::fd::AsRawFd;
    let (_master, slave) = pty::openpty(None).unwrap();
    let termios = |fd| pty::termios(fd).unwrap();
    let before = termios(slave.as_raw_fd());
    assert!(before.c_lflag & libc::ICANON != 0);
    let (sin, sout) = (slave.try_clone().unwrap(), slave.try_clone().unwrap());
    let mut vm = Vmm::start(
        "pty",
        &echo_guest(),
        &[],
        Stdio::from(sin),
        Stdio::from(sout),
    );
    vm.wait_for("raw mode", |_| {
        termios(slave.as_raw_fd()).c_lflag & libc::ICANON == 0
    });
    vm.signal(libc::SIGTERM);
    let st = vm.wait();
    assert_eq!(st.code(), Some(143), "stderr {}", vm.stderr());
    let after = termios(slave.as_raw_fd());
    assert_eq!(after.c_lflag, before.c_lflag, "terminal restored");
    assert_eq!(after.c_iflag, before.c_iflag);
    assert_eq!(after.c_oflag, before.c_oflag);
}

/// SIGTERM waits (a bounded time) for the terminal to take the guest's last output; a
/// second SIGTERM ends microvm at once, 128+15 all the same.
#[test]
fn a_second_sigterm_ends_the_flush_at_once() {
    let d = tmpdir("sigterm2");
    for signals in [1, 2] {
        let log = d.join(format!("c{signals}.log"));
        let spec = format!("mux:stdio,file={}", log.display());
        // stdout is a pipe nobody reads: once it is full, the terminal is behind.
        let mut vm = Vmm::start_with(
            "sigterm2",
            &counter_flood_guest(),
            &["--console", &spec],
            Stdio::null(),
            Stdio::piped(),
            false,
        );
        vm.wait_for("stdout's pipe full, and more", |_| {
            std::fs::metadata(&log).is_ok_and(|m| m.len() > 80 << 10)
        });
        vm.signal(libc::SIGTERM);
        if signals == 2 {
            std::thread::sleep(Duration::from_millis(300));
            vm.signal(libc::SIGTERM);
        }
        let st = vm.wait();
        assert_eq!(st.code(), Some(143), "{signals} signal(s): {}", vm.stderr());
        let said = vm.stderr().contains("stopped by signal 15");
        assert_eq!(
            said,
            signals == 1,
            "the flush ran to its end only with one signal: {}",
            vm.stderr()
        );
    }
    let _ = std::fs::remove_dir_all(d);
}
