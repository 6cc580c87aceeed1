//! Integration tests of the console hub: a real `Hub`, real unix/TCP sockets in temp dirs,
//! driven by a real `event_manager::EventManager` loop on a thread. No KVM.

#[path = "common/hub.rs"]
mod hub;
#[path = "common/pty.rs"]
mod pty;

use hub::{TIMEOUT, Vm, connect, pattern, read_n, tmpdir, wait_until};

use microvm::mux::{ConsoleSpec, Hub, HubConfig};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[test]
fn clients_see_the_same_stream() {
    let d = tmpdir("same");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("mux:sock={},ring=4K", p.display()));
    let mode = std::fs::metadata(&p).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut cs: Vec<UnixStream> = (0..3).map(|_| connect(&p)).collect();
    wait_until("3 clients", || vm.clients() == 3);
    let data = pattern(300_000, 1);
    let mut w = vm.writer.clone();
    let d2 = data.clone();
    let t = std::thread::spawn(move || {
        for c in d2.chunks(1000) {
            w.write_all(c).unwrap();
        }
    });
    for c in cs.iter_mut() {
        assert!(read_n(c, data.len()) == data, "client stream differs");
    }
    t.join().unwrap();
    assert_eq!(vm.hub.lock().unwrap().history(), data[data.len() - 4096..]);
    let hub = vm.stop();
    drop(hub);
    assert!(!p.exists(), "socket file removed on shutdown");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn late_joiner_gets_history_then_live() {
    let d = tmpdir("late");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("sock={}", p.display()));
    let mut w = vm.writer.clone();
    w.write_all(b"Linux version 6.1 ... boot log\r\n").unwrap();
    wait_until("history", || !vm.hub.lock().unwrap().history().is_empty());
    let mut c = connect(&p);
    assert_eq!(read_n(&mut c, 32), b"Linux version 6.1 ... boot log\r\n");
    wait_until("client", || vm.clients() == 1);
    w.write_all(b"login: ").unwrap();
    assert_eq!(read_n(&mut c, 7), b"login: ");
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn one_mib_paste_reaches_the_guest_whole_and_in_order() {
    let d = tmpdir("paste");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("mux:sock={},ring", p.display()));
    let paste = pattern(1 << 20, 7);
    let mut c = connect(&p);
    let mut c2 = c.try_clone().unwrap();
    let p2 = paste.clone();
    let t = std::thread::spawn(move || c2.write_all(&p2).unwrap());
    // Meanwhile the guest prints (echo-like output) and the client must keep reading it.
    let uart = vm.uart.clone();
    wait_until("paste delivered", || {
        uart.lock().unwrap().received.len() >= paste.len()
    });
    t.join().unwrap();
    assert!(
        uart.lock().unwrap().received == paste,
        "paste corrupted or reordered"
    );
    drop(c.write_all(b""));
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn pastes_from_two_clients_are_not_interleaved_within_a_read() {
    let d = tmpdir("two");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("sock={}", p.display()));
    let mut a = connect(&p);
    let mut b = connect(&p);
    wait_until("clients", || vm.clients() == 2);
    // Small writes each fit one read: each must arrive contiguous.
    for i in 0..200u32 {
        a.write_all(format!("[a{i:04}]").as_bytes()).unwrap();
        b.write_all(format!("[b{i:04}]").as_bytes()).unwrap();
    }
    let want = 200 * 7 * 2;
    wait_until("input", || vm.uart.lock().unwrap().received.len() >= want);
    let got = String::from_utf8(vm.uart.lock().unwrap().received.clone()).unwrap();
    let (mut na, mut nb) = (0, 0);
    for tok in got.split_terminator(']') {
        let tok = tok.strip_prefix('[').unwrap();
        let (who, n) = tok.split_at(1);
        let n: u32 = n.parse().unwrap();
        match who {
            "a" => {
                assert_eq!(n, na);
                na += 1;
            }
            _ => {
                assert_eq!(n, nb);
                nb += 1;
            }
        }
    }
    assert_eq!((na, nb), (200, 200));
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn non_reading_client_is_cut_off_others_get_every_byte() {
    let d = tmpdir("stall");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("mux:sock={}:queue=4M,ring=64K", p.display()));
    let stalled = connect(&p);
    let mut good = connect(&p);
    wait_until("clients", || vm.clients() == 2);
    let total = 16 << 20;
    let received = Arc::new(AtomicUsize::new(0));
    let r2 = received.clone();
    let reader = std::thread::spawn(move || {
        let mut sum = 0u64;
        let mut n = 0usize;
        let mut buf = vec![0; 1 << 16];
        while n < total {
            let k = good.read(&mut buf).unwrap();
            assert!(k > 0, "good client disconnected after {n} bytes");
            for &b in &buf[..k] {
                sum = sum.wrapping_mul(31).wrapping_add(b as u64);
            }
            n += k;
            r2.store(n, Ordering::Release);
        }
        (sum, good)
    });
    let data = pattern(1 << 20, 3);
    let mut want = 0u64;
    let mut w = vm.writer.clone();
    for i in 0..16 {
        // The "guest" is faster than any reader; pace it on the good reader only so the
        // test does not depend on machine speed. The stalled client falls further behind.
        wait_until("reader progress", || {
            received.load(Ordering::Acquire) + (2 << 20) >= i << 20
        });
        for c in data.chunks(4096) {
            w.write_all(c).unwrap();
        }
        for &b in &data {
            want = want.wrapping_mul(31).wrapping_add(b as u64);
        }
    }
    let (sum, good) = reader.join().unwrap();
    assert_eq!(sum, want);
    wait_until("stalled client cut off", || vm.clients() == 1);
    drop((stalled, good));
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

/// `microvm attach`'s stdin and stdout for its client code: two pipes (read, write ends).
fn attach_pipes() -> ([i32; 2], [i32; 2]) {
    let (mut inp, mut out) = ([0; 2], [0; 2]);
    // SAFETY: valid 2-element arrays for pipe(2).
    unsafe {
        assert_eq!(libc::pipe(inp.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(out.as_mut_ptr()), 0);
    }
    (inp, out)
}

/// `microvm attach SOCKET`.
fn attach_to(sock: &Path) -> microvm::mux::AttachOptions {
    microvm::mux::AttachOptions {
        target: sock.display().to_string(),
        ..Default::default()
    }
}

#[test]
fn clients_beyond_the_limit_are_refused_with_a_message() {
    let d = tmpdir("limit");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("sock={}:max-clients=2", p.display()));
    let _a = connect(&p);
    let _b = connect(&p);
    wait_until("clients", || vm.clients() == 2);
    let mut c = connect(&p);
    let mut msg = String::new();
    c.read_to_string(&mut msg).unwrap();
    assert!(msg.contains("max-clients=2"), "{msg}");
    assert_eq!(vm.clients(), 2);
    // `microvm attach` relays the message and fails (status 1), not "console closed".
    let (inp, out) = attach_pipes();
    let opts = attach_to(&p);
    let refused = microvm::mux::attach::attach_fds(&opts, inp[0], out[1]);
    match refused {
        Err(microvm::mux::MuxError::Refused(why)) => {
            assert!(why.contains("console busy"), "{why}")
        }
        other => panic!("attach to a full console: {other:?}"),
    }
    for fd in [inp[0], inp[1], out[0], out[1]] {
        // SAFETY: closing the pipe fds created above.
        unsafe { libc::close(fd) };
    }
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn read_only_viewers_input_is_ignored() {
    let d = tmpdir("ro");
    let p = d.join("c.sock");
    let q = d.join("w.sock");
    let vm = Vm::start(&format!("mux:sock={}:ro,sock={}", p.display(), q.display()));
    let mut viewer = connect(&p);
    let mut typist = connect(&q);
    wait_until("clients", || vm.clients() == 2);
    viewer.write_all(b"rm -rf /\n").unwrap();
    typist.write_all(b"ls\n").unwrap();
    wait_until("input", || vm.uart.lock().unwrap().received.len() >= 3);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.uart.lock().unwrap().received, b"ls\n");
    let mut w = vm.writer.clone();
    w.write_all(b"out").unwrap();
    assert_eq!(read_n(&mut viewer, 3), b"out");
    assert_eq!(read_n(&mut typist, 3), b"out");
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

fn read_until(s: &mut UnixStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "EOF before {needle:?}: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn single_writer_takeover_tells_the_others() {
    let d = tmpdir("sw");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("sock={}:single-writer", p.display()));
    let mut a = connect(&p);
    wait_until("a", || vm.clients() == 1);
    let mut b = connect(&p);
    read_until(&mut b, "another client has the keyboard");
    a.write_all(b"a").unwrap();
    wait_until("a's input", || vm.uart.lock().unwrap().received == b"a");
    b.write_all(b"b").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        vm.uart.lock().unwrap().received,
        b"a",
        "non-holder input ignored"
    );
    b.write_all(b"\x01w").unwrap();
    read_until(&mut b, "you have the keyboard");
    read_until(&mut a, "took the keyboard");
    b.write_all(b"B").unwrap();
    a.write_all(b"x").unwrap();
    wait_until("b's input", || vm.uart.lock().unwrap().received == b"aB");
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn tcp_listener_and_file_log() {
    let d = tmpdir("tcp");
    let log = d.join("console.log");
    let vm = Vm::start(&format!(
        "mux:tcp=127.0.0.1:0:insecure,file={}:timestamps",
        log.display()
    ));
    let addr = vm.hub.lock().unwrap().tcp_addrs()[0];
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    wait_until("client", || vm.clients() == 1);
    let mut w = vm.writer.clone();
    w.write_all(b"hello\nworld\n").unwrap();
    assert_eq!(read_n(&mut c, 12), b"hello\nworld\n");
    vm.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].ends_with("Z hello") && lines[1].ends_with("Z world"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn attach_relays_both_ways() {
    let d = tmpdir("attach");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("sock={}", p.display()));
    vm.writer.clone().write_all(b"history;").unwrap();
    wait_until("history", || !vm.hub.lock().unwrap().history().is_empty());
    let (inp, out) = attach_pipes();
    let opts = attach_to(&p);
    let t = std::thread::spawn(move || microvm::mux::attach::attach_fds(&opts, inp[0], out[1]));
    wait_until("attached", || vm.clients() == 1);
    // SAFETY: writing to our pipe's write end.
    unsafe { libc::write(inp[1], b"typed".as_ptr().cast(), 5) };
    wait_until("typed input", || {
        vm.uart.lock().unwrap().received == b"typed"
    });
    vm.writer.clone().write_all(b"live").unwrap();
    // SAFETY: reading into a local buffer from our pipe's read end.
    let mut got = Vec::new();
    while got.len() < 12 {
        let mut buf = [0u8; 64];
        let n = unsafe { libc::read(out[0], buf.as_mut_ptr().cast(), 64) };
        assert!(n > 0);
        got.extend_from_slice(&buf[..n as usize]);
    }
    assert_eq!(got, b"history;live");
    // The VM going away ends attach with status 0.
    let hub = vm.stop();
    drop(hub);
    assert_eq!(t.join().unwrap().unwrap(), 0);
    for fd in [inp[0], inp[1], out[0], out[1]] {
        // SAFETY: closing the pipe fds created above.
        unsafe { libc::close(fd) };
    }
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn bad_socket_paths_are_errors_that_name_them() {
    let d = tmpdir("bad");
    let f = d.join("precious.txt");
    std::fs::write(&f, b"keep me").unwrap();
    let exit = || EventFd::new(EFD_NONBLOCK).unwrap();
    let e = Hub::new(&format!("sock={}", f.display()).parse().unwrap(), exit()).unwrap_err();
    assert!(
        e.to_string().contains("precious.txt") && e.to_string().contains("not a socket"),
        "{e}"
    );
    assert_eq!(std::fs::read(&f).unwrap(), b"keep me");
    let e = Hub::new(
        &format!("sock={}/nodir/c.sock", d.display())
            .parse()
            .unwrap(),
        exit(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    // An earlier backend is cleaned up when a later one fails.
    let ok = d.join("ok.sock");
    let spec = format!("mux:sock={},sock={}", ok.display(), f.display());
    assert!(Hub::new(&spec.parse().unwrap(), exit()).is_err());
    assert!(!ok.exists(), "first socket removed after the second failed");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn exit_eventfd_untouched_without_escape() {
    let d = tmpdir("exit");
    let vm = Vm::start(&format!("sock={}", d.join("c.sock").display()));
    assert!(vm.exit.read().is_err(), "no exit requested");
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

// ---- stdio backend, in a child process (the hub owns fds 0 and 1) -------------------

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
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("tick 3") {
        let n = out.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "child stdout ended: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    drop(out); // broken pipe from now on
    wait_until("socket", || p.exists());
    let mut c = connect(&p);
    read_until(&mut c, "tick 30"); // still running well after stdout went away
    c.write_all(b"quit").unwrap();
    let st = ch.wait().unwrap();
    assert!(st.success(), "{st:?}");
    let _ = std::fs::remove_dir_all(d);
}

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

#[test]
fn shutdown_delivers_the_last_output_to_a_slow_client() {
    let d = tmpdir("lastwords");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("sock={}", p.display()));
    let mut c = connect(&p);
    wait_until("1 client", || vm.clients() == 1);
    // The guest's last output arrives as the VM stops: more than the socket buffer holds,
    // read slowly by the client while the hub shuts down.
    let data = pattern(600_000, 7);
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0; 16 << 10];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            std::thread::sleep(Duration::from_millis(5));
            if got.len() >= 600_000 {
                return got;
            }
        }
    });
    let mut w = vm.writer.clone();
    w.write_all(&data).unwrap();
    let hub = vm.stop();
    let got = reader.join().unwrap();
    assert_eq!(
        got.len(),
        data.len(),
        "the client got every byte before the exit"
    );
    assert!(got == data);
    drop(hub);
    let _ = std::fs::remove_dir_all(d);
}

// ---- socket backend faults (docs/RELIABILITY.md) --------------------------------------

#[test]
fn socket_mode_0600_by_default_or_as_asked() {
    let d = tmpdir("mode");
    for (opt, want) in [("", 0o600), (":mode=0660", 0o660), (":mode=0", 0)] {
        let p = d.join("c.sock");
        let vm = Vm::start(&format!("sock={}{opt}", p.display()));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{opt}");
        vm.stop();
        assert!(!p.exists());
    }
    let _ = std::fs::remove_dir_all(d);
}

/// A thousand clients connect and leave quickly (some type, some read, some vanish at
/// once, some are refused as over the limit) while the guest prints: the hub keeps
/// serving, ends with no client left, and the next client works normally.
#[test]
fn connect_storm() {
    let d = tmpdir("storm");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("mux:sock={}:max-clients=16,ring=4K", p.display()));
    let stop = Arc::new(AtomicBool::new(false));
    let printer = {
        let mut w = vm.writer.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                w.write_all(format!("line {i}\r\n").as_bytes()).unwrap();
                i += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let start = Instant::now();
    let refused = Arc::new(AtomicUsize::new(0));
    let storm: Vec<_> = (0..8)
        .map(|t| {
            let p = p.clone();
            let refused = refused.clone();
            std::thread::spawn(move || {
                for i in 0..125 {
                    let mut s = UnixStream::connect(&p).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    match (t + i) % 4 {
                        0 => {}
                        1 => {
                            let _ = s.write_all(b"x");
                        }
                        2 => {
                            let mut buf = [0u8; 512];
                            if let Ok(n) = s.read(&mut buf)
                                && String::from_utf8_lossy(&buf[..n]).contains("console busy")
                            {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            let _ = s.shutdown(std::net::Shutdown::Write);
                        }
                    }
                }
            })
        })
        .collect();
    for t in storm {
        t.join().unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "1000 connections took {:?}",
        start.elapsed()
    );
    wait_until("all storm clients gone", || vm.clients() == 0);
    // Only storm input ever reached the guest.
    let got = vm.uart.lock().unwrap().received.clone();
    assert!(got.iter().all(|&b| b == b'x'), "{got:?}");
    // The next client is served as usual: history, live output, input.
    let mut c = connect(&p);
    read_until(&mut c, "line");
    c.write_all(b"after the storm").unwrap();
    wait_until("input after the storm", || {
        vm.uart
            .lock()
            .unwrap()
            .received
            .ends_with(b"after the storm")
    });
    stop.store(true, Ordering::Release);
    printer.join().unwrap();
    eprintln!(
        "storm: 1000 connections in {:?}, {} told 'console busy'",
        start.elapsed(),
        refused.load(Ordering::Relaxed)
    );
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

/// A client that vanishes while the hub is writing to it (output queued behind a full
/// socket buffer) is dropped quietly; the other client gets every byte.
#[test]
fn client_disconnecting_mid_output_is_dropped_others_complete() {
    let d = tmpdir("midout");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("sock={}", p.display()));
    let leaver = connect(&p);
    let mut stayer = connect(&p);
    wait_until("clients", || vm.clients() == 2);
    let data = pattern(768 << 10, 11);
    let reader = std::thread::spawn(move || (read_n(&mut stayer, 768 << 10), stayer));
    let mut w = vm.writer.clone();
    for c in data[..256 << 10].chunks(4096) {
        w.write_all(c).unwrap();
    }
    // The leaver never read: the hub has output queued for it. It goes now.
    std::thread::sleep(Duration::from_millis(100));
    drop(leaver);
    for c in data[256 << 10..].chunks(4096) {
        w.write_all(c).unwrap();
    }
    let (got, _stayer) = reader.join().unwrap();
    assert!(got == data, "the staying client's stream differs");
    wait_until("leaver dropped", || vm.clients() == 1);
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

/// A client that disconnects in the middle of pasting: everything it sent before going
/// is delivered, whole and in order; input from others goes on after it.
#[test]
fn client_disconnecting_mid_paste_loses_nothing_it_sent() {
    let d = tmpdir("midin");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("sock={}", p.display()));
    let paste = pattern(200 << 10, 5);
    let mut c = connect(&p);
    // Half the paste, then the client is gone (closed with data still unread by the hub).
    c.write_all(&paste[..100 << 10]).unwrap();
    drop(c);
    wait_until("half paste delivered", || {
        vm.uart.lock().unwrap().received.len() >= 100 << 10
    });
    assert!(vm.uart.lock().unwrap().received == paste[..100 << 10]);
    wait_until("client gone", || vm.clients() == 0);
    let mut other = connect(&p);
    other.write_all(b"next").unwrap();
    wait_until("next input", || {
        vm.uart.lock().unwrap().received.ends_with(b"next")
    });
    assert_eq!(vm.uart.lock().unwrap().received.len(), (100 << 10) + 4);
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

// ---- the fault rows of the hub rebuild (docs/RELIABILITY.md, "Hub bounds") ------------

/// Two clients take the keyboard from each other thousands of times while a third never
/// reads: every takeover is announced to the third, yet what it holds stays within the
/// notice limit (the old hub queued every notice, growing without bound).
#[test]
fn keyboard_war_with_an_idle_client_stays_bounded() {
    let d = tmpdir("war");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("sock={}:single-writer", p.display()));
    let mut a = connect(&p);
    wait_until("a", || vm.clients() == 1);
    let mut b = connect(&p);
    read_until(&mut b, "another client has the keyboard");
    let idle = connect(&p);
    wait_until("3 clients", || vm.clients() == 3);
    for _ in 0..3000 {
        b.write_all(b"\x01w").unwrap();
        read_until(&mut b, "you have the keyboard");
        a.write_all(b"\x01w").unwrap();
        read_until(&mut a, "you have the keyboard");
    }
    let mem = vm.hub.lock().unwrap().memory();
    let idle_charged: usize = mem
        .sinks
        .iter()
        .filter(|(name, _)| name.starts_with("client 3 "))
        .map(|(_, n)| *n)
        .sum();
    assert!(
        idle_charged <= microvm::mux::NOTICE_MAX,
        "the idle client holds {idle_charged} bytes of notices"
    );
    assert!(mem.total() < 2 << 20, "hub memory {mem:?}");
    assert_eq!(vm.clients(), 3, "nobody was cut off for a few notices");
    drop(idle);
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

/// Fifteen clients never read while the guest prints a byte at a time (the UART's
/// pattern) and nothing paces it: they cost the hub no memory of their own (a client is
/// a position in the one shared ring), and each is cut off once too far behind.
#[test]
fn never_reading_clients_cost_nothing_and_are_cut_off() {
    let d = tmpdir("nonreaders");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("sock={}", p.display()));
    let clients: Vec<UnixStream> = (0..15).map(|_| connect(&p)).collect();
    wait_until("15 clients", || vm.clients() == 15);
    let mut w = vm.writer.clone();
    let mut most = 0;
    for i in 0..(4 << 20) {
        w.write_all(&[b'0' + (i % 10) as u8]).unwrap();
        if i % 4096 == 0 {
            std::thread::yield_now();
            let mem = vm.hub.lock().unwrap().memory();
            most = most.max(mem.sinks.iter().map(|(_, n)| *n).sum::<usize>());
            assert!(mem.ring <= 1 << 20, "ring {}", mem.ring);
        }
    }
    assert_eq!(most, 0, "clients held queues of their own");
    wait_until("all cut off", || vm.clients() == 0);
    let stats = vm.hub.lock().unwrap().stats();
    assert_eq!(stats.listeners[0].clients_cut_off, 15);
    drop(clients);
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// A FIFO as log with no reader is refused at once, naming it (the old hub hung in open).
#[test]
fn fifo_log_without_a_reader_is_refused_not_waited_for() {
    let d = tmpdir("fifo-noreader");
    let f = d.join("log.fifo");
    mkfifo(&f);
    let exit = EventFd::new(EFD_NONBLOCK).unwrap();
    let spec: ConsoleSpec = format!("file={}", f.display()).parse().unwrap();
    let e = Hub::new(&spec, exit).unwrap_err().to_string();
    assert!(
        e.contains("log.fifo") && e.contains("FIFO with no reader"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(d);
}

/// A FIFO log whose reader stops never stalls the rest: a socket client gets every byte
/// while the FIFO drops and counts, and the reader, when it resumes, is told how much it
/// lost where it lost it.
#[test]
fn fifo_log_with_a_stopped_reader_never_stalls_the_others() {
    let d = tmpdir("fifo-stopped");
    let f = d.join("log.fifo");
    mkfifo(&f);
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&f)
        .unwrap();
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("mux:sock={},file={}", p.display(), f.display()));
    let mut c = connect(&p);
    wait_until("client", || vm.clients() == 1);
    let data = pattern(3 << 20, 9);
    let want = data.clone();
    let received = Arc::new(AtomicUsize::new(0));
    let r2 = received.clone();
    let r = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(want.len());
        let mut buf = vec![0; 1 << 16];
        while got.len() < want.len() {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "the client was disconnected");
            got.extend_from_slice(&buf[..n]);
            r2.store(got.len(), Ordering::Release);
        }
        got == want
    });
    let mut w = vm.writer.clone();
    for (i, chunk) in data.chunks(4096).enumerate() {
        // Nothing paces this "guest" (a FIFO log never does): keep it within reach of
        // the client, which is what the test is about, not the client's own limit.
        wait_until("client progress", || {
            received.load(Ordering::Acquire) + (512 << 10) >= i * 4096
        });
        w.write_all(chunk).unwrap();
    }
    assert!(r.join().unwrap(), "the socket client's stream differs");
    let dropped = || {
        vm.hub
            .lock()
            .unwrap()
            .stats()
            .backends
            .iter()
            .find(|b| b.name.starts_with("file "))
            .map_or(0, |b| b.dropped)
    };
    assert!(
        dropped() > 0,
        "the FIFO dropped nothing although nobody read it"
    );
    // The reader resumes: it gets a prefix of the stream, then the notice.
    let mut got = Vec::new();
    wait_until("the drop notice", || {
        let mut buf = [0u8; 65536];
        if let Ok(n) = reader.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).contains("bytes of console output dropped here")
    });
    let at = got.windows(10).position(|w| w == b"\r\n[microvm").unwrap();
    assert!(
        data.starts_with(&got[..at]),
        "the FIFO's bytes before the notice are the stream's start"
    );
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

/// A full listener lets a newcomer in by closing the client idle longest (once idle
/// for `evict_idle`), who is told why: idle connections cannot lock everyone out.
#[test]
fn full_listener_makes_room_by_closing_an_idle_client() {
    let d = tmpdir("evict");
    let p = d.join("c.sock");
    let cfg = HubConfig {
        evict_idle: Duration::from_millis(200),
        ..HubConfig::default()
    };
    let vm = Vm::start_with(&format!("sock={}:max-clients=2", p.display()), cfg);
    let mut first = connect(&p);
    let _second = connect(&p);
    wait_until("2 clients", || vm.clients() == 2);
    std::thread::sleep(Duration::from_millis(300));
    let mut third = connect(&p);
    let msg = read_until(&mut first, "disconnected: idle");
    assert!(msg.contains("a new client needed the place"), "{msg}");
    vm.writer.clone().write_all(b"for the newcomer").unwrap();
    read_until(&mut third, "for the newcomer");
    let stats = vm.hub.lock().unwrap().stats();
    assert_eq!(stats.listeners[0].clients_idle_closed, 1);
    assert_eq!(stats.listeners[0].clients_refused, 0);
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

/// `idle-timeout=`: a client that neither types nor takes output is told and closed.
#[test]
fn idle_timeout_closes_a_silent_client() {
    let d = tmpdir("idle");
    let p = d.join("c.sock");
    let vm = Vm::start(&format!("sock={}:idle-timeout=300ms", p.display()));
    let mut c = connect(&p);
    let msg = read_until(&mut c, "idle]");
    assert!(msg.contains("disconnected after 300ms idle"), "{msg}");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    wait_until("client gone", || vm.clients() == 0);
    assert_eq!(
        vm.hub.lock().unwrap().stats().listeners[0].clients_idle_closed,
        1
    );
    vm.stop();
    let _ = std::fs::remove_dir_all(d);
}

/// A client that keeps reading, but at 2 KB/s, holds the exit for the shutdown limit at
/// most (the old hub waited up to a minute).
#[test]
fn shutdown_gives_up_on_a_crawling_client_at_its_limit() {
    let d = tmpdir("crawl");
    let p = d.join("c.sock");
    let cfg = HubConfig {
        shutdown_limit: Duration::from_secs(1),
        ..HubConfig::default()
    };
    let vm = Vm::start_with(&format!("sock={}", p.display()), cfg);
    let mut c = connect(&p);
    wait_until("client", || vm.clients() == 1);
    let stop = Arc::new(AtomicBool::new(false));
    let crawler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 200];
            while !stop.load(Ordering::Acquire) {
                if matches!(c.read(&mut buf), Ok(0) | Err(_)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    vm.writer.clone().write_all(&pattern(1 << 20, 4)).unwrap();
    let hub = vm.stop();
    let summary = hub.lock().unwrap().last_shutdown().cloned().unwrap();
    assert!(summary.hit_limit && summary.gave_up == 1, "{summary:?}");
    stop.store(true, Ordering::Release);
    drop(hub);
    crawler.join().unwrap();
    let _ = std::fs::remove_dir_all(d);
}

/// Not a test by itself: the child half of the EMFILE test (runs only with MUX_EMFILE
/// set): a hub whose process runs out of file descriptors while clients connect.
#[test]
#[ignore]
fn emfile_child() {
    let Ok(sock) = std::env::var("MUX_EMFILE") else {
        return;
    };
    let vm = Vm::start(&format!("sock={sock}:max-clients=64"));
    // RLIMIT_NOFILE caps descriptor *numbers*, and a runner may hand the test high
    // numbered descriptors with holes below them: limit at the highest open one + 1,
    // then fill every hole, so the hub has no descriptor left at all.
    let top = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    // Lower only the soft limit: an unprivileged process cannot raise the hard one,
    // and CI runners have hard limits of their own.
    lim.rlim_cur = (top + 1).min(lim.rlim_max);
    // SAFETY: a valid rlimit, soft <= hard.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
    let mut fillers = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => fillers.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("filling descriptors: {e}"),
        }
    }
    // One slot for the ready file, closed again once written: the first client
    // takes it and every later accept fails with EMFILE.
    fillers.pop();
    std::fs::write(format!("{sock}.ready"), b"").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let stats = vm.hub.lock().unwrap().stats();
    println!("accept_failures={}", stats.listeners[0].accept_failures);
    std::process::exit(0);
}

/// Out of file descriptors, accept fails while the listener stays readable: the hub
/// backs off (100 ms doubling) instead of spinning and flooding the log (the old hub
/// logged 151,307 lines in 3.5 s).
#[test]
fn accept_backs_off_when_out_of_file_descriptors() {
    let d = tmpdir("emfile");
    let p = d.join("c.sock");
    let ready = d.join("c.sock.ready");
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "emfile_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MUX_EMFILE", &p)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    wait_until("child ready", || {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            let mut out = String::new();
            let _ = child.stdout.take().map(|mut o| o.read_to_string(&mut out));
            panic!("the child hub exited before it was ready ({st}): {out}{err}");
        }
        ready.exists()
    });
    let _clients: Vec<UnixStream> = (0..20).map(|_| connect(&p)).collect();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failures: u64 = stdout
        .lines()
        .find_map(|l| l.split_once("accept_failures=").map(|(_, n)| n))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in {stdout}"));
    assert!(
        failures >= 1,
        "accept never failed: the test did not run out of fds"
    );
    assert!(
        failures <= 40,
        "{failures} accept failures in 3 s: not backing off"
    );
    let log_lines = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains("cannot accept"))
        .count();
    assert!(log_lines as u64 <= failures, "{log_lines} log lines");
    let _ = std::fs::remove_dir_all(d);
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
