//! Host tier (docs/TESTING.md): the console hub's streams and clients. A real `Hub`, real
//! unix/TCP sockets in temp dirs, driven by a real `event_manager::EventManager` loop on
//! a thread (no KVM): every client gets the same stream, history then live output,
//! input whole and in order, limits, read-only and single-writer roles, `microvm
//! attach`'s client code, a TCP listener and a file log, bad socket paths, the last
//! output at shutdown.

mod common;

use common::fs::tmpdir;
use common::hub::{Vm, pattern};
use common::net::{connect, read_n, read_until, tcp_connect};
use common::proc::pipe;
use common::wait_until;
use microvm::mux::Hub;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
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
    let ((in_r, in_w), (out_r, out_w)) = (pipe(), pipe());
    let opts = attach_to(&p);
    let refused = microvm::mux::attach::attach_fds(&opts, in_r.as_raw_fd(), out_w.as_raw_fd());
    match refused {
        Err(microvm::mux::MuxError::Refused(why)) => {
            assert!(why.contains("console busy"), "{why}")
        }
        other => panic!("attach to a full console: {other:?}"),
    }
    drop((in_r, in_w, out_r, out_w));
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
    let mut c = tcp_connect(addr);
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
    let ((in_r, in_w), (out_r, out_w)) = (pipe(), pipe());
    let opts = attach_to(&p);
    let (r, w) = (in_r.as_raw_fd(), out_w.as_raw_fd());
    let t = std::thread::spawn(move || microvm::mux::attach::attach_fds(&opts, r, w));
    wait_until("attached", || vm.clients() == 1);
    // SAFETY: writing to our pipe's write end.
    unsafe { libc::write(in_w.as_raw_fd(), b"typed".as_ptr().cast(), 5) };
    wait_until("typed input", || {
        vm.uart.lock().unwrap().received == b"typed"
    });
    vm.writer.clone().write_all(b"live").unwrap();
    // SAFETY: reading into a local buffer from our pipe's read end.
    let mut got = Vec::new();
    while got.len() < 12 {
        let mut buf = [0u8; 64];
        let n = unsafe { libc::read(out_r.as_raw_fd(), buf.as_mut_ptr().cast(), 64) };
        assert!(n > 0);
        got.extend_from_slice(&buf[..n as usize]);
    }
    assert_eq!(got, b"history;live");
    // The VM going away ends attach with status 0.
    let hub = vm.stop();
    drop(hub);
    assert_eq!(t.join().unwrap().unwrap(), 0);
    drop((in_r, in_w, out_r, out_w));
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
