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

/// Prints a message to COM1, then runs `then`.
fn print_then(msg: &str, then: &[u8]) -> Vec<u8> {
    let mut c = mov_dx(0x3f8);
    let msg_addr = LOAD_ADDR + 14 + then.len() as u16;
    let [lo, hi] = msg_addr.to_le_bytes();
    c.extend([0xbe, lo, hi]); // mov si, msg
    c.extend([0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]); // lodsb; test al,al; jz +3; out dx,al; jmp -8
    c.extend(then);
    assert_eq!(c.len(), usize::from(msg_addr - LOAD_ADDR));
    c.extend(msg.as_bytes());
    c.push(0);
    c
}

/// Prints a NUL-terminated message to COM1, then powers off.
fn hello_guest(msg: &str) -> Vec<u8> {
    print_then(msg, &poweroff())
}

/// Writes `code` to the exit-code port 0xf4.
fn exit_code(code: u8) -> Vec<u8> {
    vec![0xb0, code, 0xe6, 0xf4, 0xf4] // mov al,code; out 0xf4,al; hlt
}

/// Spins forever (jmp $): a guest that never stops by itself.
const SPIN: [u8; 2] = [0xeb, 0xfe];

/// Marks "init reached" on the boot-timer port 0xf5.
const BOOT_TIMER: [u8; 2] = [0xe6, 0xf5]; // out 0xf5,al

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
    run_with(name, guest, input, &[])
}

/// [`run`] with extra microvm arguments.
fn run_with(name: &str, guest: &[u8], input: &[u8], args: &[&str]) -> Run {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (any KVM, PVM included)"
    );
    let img = image(name, guest);
    let mut child = Command::new(MICROVM)
        .args(args)
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

// ---- test guests in CI: exit-code port, --expect, --fail-on, --timeout, --report -------

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("microvm-tiny-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn exit_code_port_sets_the_status_after_flushing_the_console() {
    let d = scratch("exit3");
    let log = d.join("console.log");
    let spec = format!("mux:stdio,file={}", log.display());
    let r = run_with(
        "exit3",
        &print_then("last words\n", &exit_code(3)),
        b"",
        &["--console", &spec],
    );
    assert_eq!(r.status, 3, "stderr: {}", r.stderr);
    assert_eq!(r.stdout, b"last words\n");
    assert_eq!(std::fs::read(&log).unwrap(), b"last words\n");
    assert!(r.stderr.contains("guest exit code 3"), "{}", r.stderr);
    assert!(r.stderr.contains("  | last words"), "tail: {}", r.stderr);
    let r = run_with("exit0", &print_then("fine\n", &exit_code(0)), b"", &[]);
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    assert!(r.stderr.is_empty(), "a pass prints nothing: {}", r.stderr);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn expect_patterns_in_order_end_the_run_with_zero() {
    let g = print_then("step one\nstep two\n", &SPIN);
    let r = run_with(
        "expect",
        &g,
        b"",
        &["--expect", "one", "--expect", "two", "--timeout", "60s"],
    );
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    // Out of order: "one" never follows "two", so the timeout ends the run.
    let r = run_with(
        "expect-order",
        &g,
        b"",
        &[
            "--expect",
            "two",
            "--expect",
            "one",
            "--timeout",
            "2s",
            "--tail-lines",
            "1",
        ],
    );
    assert_eq!(r.status, 124, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("--timeout 2s expired"), "{}", r.stderr);
    assert!(r.stderr.contains("  | step two"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("  | step one"),
        "one tail line only: {}",
        r.stderr
    );
}

#[test]
fn fail_on_ends_the_run_at_once() {
    let g = print_then("booting\nBUG: kernel NULL pointer dereference\n", &SPIN);
    let r = run_with(
        "fail-on",
        &g,
        b"",
        &[
            "--fail-on",
            "Kernel panic",
            "--fail-on",
            "BUG:",
            "--timeout",
            "60s",
        ],
    );
    assert_eq!(r.status, 123, "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains(r#"--fail-on "BUG:" appeared"#),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("  | BUG: kernel NULL"), "{}", r.stderr);
}

#[test]
fn guest_stopping_before_its_expectations_fails() {
    let r = run_with(
        "unmet",
        &hello_guest("nothing to see\n"),
        b"",
        &["--expect", "ALL PASSED"],
    );
    assert_eq!(r.status, 121, "stderr: {}", r.stderr);
    assert!(
        r.stderr
            .contains(r#"guest powered off before --expect "ALL PASSED" appeared"#),
        "{}",
        r.stderr
    );
}

#[test]
fn report_and_boot_timer() {
    let d = scratch("report");
    let report = d.join("report.json");
    let spec = format!("mux:stdio,ring,sock={}", d.join("c.sock").display());
    let mut then = BOOT_TIMER.to_vec();
    then.extend(exit_code(0));
    let start = Instant::now();
    let r = run_with(
        "report",
        &print_then("hello\n", &then),
        b"",
        &[
            "--boot-timer",
            "--console",
            &spec,
            "--report",
            report.to_str().unwrap(),
        ],
    );
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    let boot_ms: f64 = r
        .stderr
        .split("boot time: ")
        .nth(1)
        .and_then(|s| s.split(" ms").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no boot time on stderr: {}", r.stderr));
    assert!(
        boot_ms > 0.0 && boot_ms < wall_ms,
        "{boot_ms} ms of {wall_ms} ms"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(j["exit"]["reason"], "guest-exit");
    assert_eq!(j["exit"]["status"], 0);
    assert_eq!(j["guest_exit_code"], 0);
    let boot = j["boot_time_ms"].as_f64().unwrap();
    assert!(
        (boot - boot_ms).abs() < 0.2,
        "report {boot} vs stderr {boot_ms}"
    );
    assert!(boot <= j["wall_time_ms"].as_f64().unwrap());
    let c = &j["consoles"][0];
    assert_eq!(c["output_bytes"], 6);
    assert_eq!(c["frontends"][0]["name"], "ttyS0");
    assert_eq!(c["frontends"][0]["bytes_out"], 6);
    let backend = |name: &str| {
        c["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("no backend {name} in {c}"))
            .clone()
    };
    assert_eq!(backend("stdout")["bytes_out"], 6);
    assert_eq!(backend("stdout")["dropped"], 0);
    assert_eq!(backend("ring")["bytes_out"], 6);
    assert_eq!(c["sockets"][0]["clients_seen"], 0);
    assert!(!d.join("c.sock").exists(), "socket file removed at exit");
    std::fs::remove_dir_all(d).unwrap();
}
