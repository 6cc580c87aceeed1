//! Host tier (docs/TESTING.md): the console hub under faults and hostile clients
//! (docs/RELIABILITY.md): socket modes, a storm of connections, clients vanishing
//! mid-output or mid-paste, a keyboard war beside an idle client, clients that never
//! read, a FIFO log without a reader or with a stopped one, a full listener, idle
//! timeouts, a crawling client at shutdown, running out of file descriptors. A real
//! `Hub` with real sockets, no KVM.

mod common;

use common::fs::{mkfifo, tmpdir};
use common::hub::{Vm, pattern};
use common::net::{connect, read_n, read_until};
use common::wait_until;
use microvm::mux::{ConsoleSpec, Hub, HubConfig};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

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
