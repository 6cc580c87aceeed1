//! Tier 2: the real binary runs tiny hand-assembled real-mode guests on the host's KVM
//! (PVM included: it runs real-mode code). They drive the real UART, bus, vCPU loop,
//! event loop and ACPI power-off path.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MICROVM: &str = env!("CARGO_BIN_EXE_microvm");
const LOAD_ADDR: u16 = 0x1000;

/// Assembles "mov dx, imm16".
fn mov_dx(port: u16) -> Vec<u8> {
    let [lo, hi] = port.to_le_bytes();
    vec![0xba, lo, hi]
}

/// Power off through the ACPI sleep control register: SLP_TYP=5, SLP_EN.
fn poweroff() -> Vec<u8> {
    let mut c = mov_dx(0x600);
    c.extend([0xb0, 0x34, 0xee, 0xf4]); // mov al,0x34; out dx,al; hlt
    c
}

/// Prints a NUL-terminated message to COM1, then powers off.
fn hello_guest(msg: &str) -> Vec<u8> {
    let mut c = mov_dx(0x3f8);
    let msg_addr = LOAD_ADDR + 21;
    let [lo, hi] = msg_addr.to_le_bytes();
    c.extend([0xbe, lo, hi]); // mov si, msg
    c.extend([0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]); // lodsb; test al,al; jz +3; out dx,al; jmp -8
    c.extend(poweroff());
    assert_eq!(c.len(), 21);
    c.extend(msg.as_bytes());
    c.push(0);
    c
}

/// Echoes every byte received on COM1 (polling LSR.DR) until it sees 'q', then powers off.
fn echo_guest() -> Vec<u8> {
    let mut c = Vec::new();
    c.extend(mov_dx(0x3fd)); // 0: mov dx, LSR
    c.extend([0xec, 0xa8, 0x01, 0x74, 0xfb]); // 3: in al,dx; test al,1; jz 3
    c.extend(mov_dx(0x3f8)); // 8: mov dx, RBR/THR
    c.extend([0xec, 0xee]); // 11: in al,dx; out dx,al
    c.extend([0x3c, b'q', 0x75, 0xef]); // 13: cmp al,'q'; jne 0
    c.extend(poweroff()); // 17
    c
}

/// Resets the machine the way `reboot=k` does: command 0xFE to the i8042 at port 0x64.
fn i8042_reset_guest() -> Vec<u8> {
    vec![0xb0, 0xfe, 0xe6, 0x64, 0xf4] // mov al,0xfe; out 0x64,al; hlt
}

/// Writes to ports no device decodes, reads them back, and prints what it read.
fn unclaimed_port_guest() -> Vec<u8> {
    let mut c = vec![0xb0, 0x55, 0xe6, 0x70, 0xe4, 0x71]; // mov al,0x55; out 0x70,al; in al,0x71
    c.extend(mov_dx(0x3f8));
    c.push(0xee); // out dx,al
    c.extend(poweroff());
    c
}

fn image(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("microvm-tiny-{}-{name}.bin", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

struct Run {
    status: i32,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs microvm on `guest` with `input` on stdin; a safety timeout kills it.
fn run(name: &str, guest: &[u8], input: &[u8]) -> Run {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (any KVM, PVM included)"
    );
    let img = image(name, guest);
    let mut child = Command::new(MICROVM)
        .arg("--real-mode-image")
        .arg(&img)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("microvm did not exit within the safety timeout");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    std::fs::remove_file(img).unwrap();
    Run {
        status: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

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
        let img = image("pin1", &hello_guest("pinned\n"));
        let out = Command::new(MICROVM)
            .args(["--vcpu-affinity", "0", "--real-mode-image"])
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"pinned\n");
        return;
    }
    let last = (cpus - 1).to_string();
    let img = image("pin", &echo_guest());
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
