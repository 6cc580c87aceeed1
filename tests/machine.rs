//! Host tier (docs/TESTING.md): the machine a guest sees, with the real binary and tiny
//! real-mode guests on the host's KVM: the UART both ways, the bus (unclaimed ports),
//! power-off and i8042 reset, odd memory sizes, vCPU placement, KVM's coalesced port
//! writes reaching the UART in order; and the refusal of a kernel this host's KVM cannot
//! boot.

mod common;

use common::proc::MICROVM;
use common::tiny::{
    self, echo_guest, hello_guest, i8042_reset_guest, mov_dx, poweroff, random_uart_guest,
    unclaimed_port_guest,
};
use common::vmm::run;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn guest_output_reaches_stdout_and_poweroff_exits_zero() {
    let r = run("hello", &hello_guest("Hello from a tiny guest\n"), b"");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "Hello from a tiny guest\n"
    );
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
}

#[test]
fn input_reaches_the_guest_in_order_even_past_the_fifo() {
    // 300 bytes: more than the UART's 64-byte FIFO, so the feeder must wait for drains.
    let mut input: Vec<u8> = (0..300).map(|i| b'a' + (i % 26) as u8).collect();
    input.retain(|&b| b != b'q');
    input.push(b'q');
    let r = run("echo", &echo_guest(), &input);
    assert_eq!(r.stdout, input);
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
}

#[test]
fn i8042_reset_exits_zero() {
    let r = run("reset", &i8042_reset_guest(), b"");
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    assert!(r.stdout.is_empty());
}

#[test]
fn unclaimed_ports_read_all_ones() {
    let r = run("unclaimed", &unclaimed_port_guest(), b"");
    assert_eq!(r.stdout, [0xff]);
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
}

#[test]
fn random_uart_register_accesses_then_the_guest_prints() {
    let r = run("uart-random", &random_uart_guest("uart still works\n"), b"");
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    assert!(
        r.stdout.ends_with(b"uart still works\n"),
        "{:?}",
        String::from_utf8_lossy(&r.stdout)
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn odd_memory_sizes_boot() {
    // 16 MiB (the least), one page more, just below / across / above the 3 GiB MMIO gap.
    for mem in ["16M", "16388K", "3071M", "3G", "3076M", "4097M"] {
        let img = tiny::image(&format!("mem{mem}"), &hello_guest("mem ok\n"));
        let out = Command::new(MICROVM)
            .args(["--memory", mem, "--real-mode-image"])
            .arg(&img)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        std::fs::remove_file(img).unwrap();
        assert_eq!(out.stdout, b"mem ok\n", "--memory {mem}");
        assert_eq!(
            out.status.code(),
            Some(0),
            "--memory {mem}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `Cpus_allowed_list` of each thread of `pid`, by thread name.
fn thread_affinities(pid: u32) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        v.push((field("Name:"), field("Cpus_allowed_list:")));
    }
    v
}

#[test]
fn vcpu_affinity_pins_vcpus_and_keeps_the_event_loop_off_them() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        // One CPU: pinning is trivially satisfied and "the other CPUs" do not exist.
        // Assert the option is at least accepted and the guest runs.
        let img = tiny::image("pin1", &hello_guest("pinned\n"));
        let out = Command::new(MICROVM)
            .args(["--vcpu-affinity", "0", "--real-mode-image"])
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"pinned\n");
        return;
    }
    let last = (cpus - 1).to_string();
    let img = tiny::image("pin", &echo_guest());
    let mut child = Command::new(MICROVM)
        .args(["--vcpu-affinity", &last, "--real-mode-image"])
        .arg(&img)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The echo guest runs until it reads 'q': look at the threads meanwhile.
    let deadline = Instant::now() + Duration::from_secs(30);
    let threads = loop {
        let t = thread_affinities(child.id());
        if t.iter().any(|(n, _)| n == "vcpu0") {
            break t;
        }
        assert!(Instant::now() < deadline, "no vcpu0 thread appeared: {t:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"q").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    std::fs::remove_file(img).unwrap();
    assert_eq!(out.status.code(), Some(0));
    let vcpu = threads.iter().find(|(n, _)| n == "vcpu0").unwrap();
    assert_eq!(vcpu.1, last, "vcpu0 affinity: {threads:?}");
    let main = threads.iter().find(|(n, _)| n == "microvm").unwrap();
    let others = if cpus == 2 {
        "0".to_string()
    } else {
        format!("0-{}", cpus - 2)
    };
    assert_eq!(main.1, others, "event loop affinity: {threads:?}");
}

/// Runs `guest` with MICROVM_EXIT_STATS=1; returns stdout and vCPU 0's exit counts
/// (`io_out`, `coalesced_writes`) parsed from its stats line.
fn run_counting_exits(name: &str, guest: &[u8]) -> (Vec<u8>, u64, u64) {
    let img = tiny::image(name, guest);
    let out = Command::new(MICROVM)
        .env("MICROVM_EXIT_STATS", "1")
        .arg("--real-mode-image")
        .arg(&img)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    std::fs::remove_file(img).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("vcpu0 exits:"))
        .unwrap_or_else(|| panic!("no exit stats in: {stderr}"));
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    (out.stdout, field("io_out="), field("coalesced_writes="))
}

fn host_coalesces_pio() -> bool {
    kvm_ioctls::Kvm::new()
        .map(|k| k.check_extension(kvm_ioctls::Cap::CoalescedPio))
        .unwrap_or(false)
}

/// The guest prints 4 KiB on COM1 without polling LSR: with KVM's coalesced PIO, KVM
/// queues the THR writes and microvm replays them, in order, without an exit per byte
/// (one per ring-full, 170 entries); without it, every byte exits.
#[test]
fn uart_transmit_writes_are_coalesced_in_order() {
    let msg: String = (0..4096).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let (stdout, io_out, coalesced) = run_counting_exits("coalesce", &hello_guest(&msg));
    assert_eq!(String::from_utf8_lossy(&stdout), msg);
    if host_coalesces_pio() {
        assert!(
            io_out <= 4096 / 100 + 1,
            "{io_out} port-write exits for 4096 bytes"
        );
        assert!(
            coalesced >= 4096 - 4096 / 100,
            "only {coalesced} writes coalesced"
        );
    } else {
        assert!(
            io_out > 4096,
            "no coalescing here, every byte exits: {io_out}"
        );
    }
}

/// Coalesced writes reach the UART in the guest's order relative to other registers:
/// a divisor-latch write (THR's port with DLAB set) queued in the ring is applied before
/// the LCR write that clears DLAB, so it sets the divisor and prints nothing; the guest
/// reads the divisor back (an exit) and prints it after an 'X'.
#[test]
fn coalesced_writes_keep_their_order_against_other_registers() {
    let mut c = Vec::new();
    let out = |c: &mut Vec<u8>, port: u16, val: u8| {
        c.extend(mov_dx(port));
        c.extend([0xb0, val, 0xee]); // mov al,val; out dx,al
    };
    out(&mut c, 0x3fb, 0x80); // LCR: DLAB on
    out(&mut c, 0x3f8, b'B'); // DLL = 'B' (queued in the ring)
    out(&mut c, 0x3fb, 0x03); // LCR: DLAB off (exits: the ring is drained first)
    out(&mut c, 0x3f8, b'X'); // THR 'X' (queued)
    out(&mut c, 0x3fb, 0x80); // DLAB on
    c.extend(mov_dx(0x3f8));
    c.extend([0xec, 0x88, 0xc3]); // in al,dx (DLL); mov bl,al
    out(&mut c, 0x3fb, 0x03); // DLAB off
    c.extend(mov_dx(0x3f8));
    c.extend([0x88, 0xd8, 0xee]); // mov al,bl; out dx,al
    c.extend(poweroff());
    let (stdout, _, _) = run_counting_exits("order", &c);
    assert_eq!(String::from_utf8_lossy(&stdout), "XB");
}

/// On a PVM host (this project's machines: `/sys/module/kvm_pvm`), an ordinary kernel
/// (the reference guest's Debian kernel, `make guest`) is refused in one line that says
/// why and what to do, instead of hanging; on any other host it is not refused.
#[test]
fn an_ordinary_kernel_on_a_pvm_host_is_refused_in_one_line() {
    let kernel = common::cache_dir().join("guest").join("vmlinuz");
    assert!(
        kernel.exists(),
        "{} missing: run make guest",
        kernel.display()
    );
    let out = Command::new(MICROVM)
        .arg("--kernel")
        .arg(&kernel)
        .args(["--timeout", "5s", "--tail-lines", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with(&format!(
                "microvm: this host's KVM is PVM (kvm_pvm), which boots only PVM guest kernels, and {} is an ordinary kernel that would hang;",
                kernel.display()
            )) && stderr.contains("--pvm-guest"),
            "{stderr}"
        );
    } else {
        assert_ne!(
            out.status.code(),
            Some(1),
            "refused on a non-PVM host: {stderr}"
        );
        assert!(!stderr.contains("is PVM"), "{stderr}");
    }
}
