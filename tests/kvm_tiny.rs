//! Tier 2: the real binary runs tiny hand-assembled real-mode guests on the host's KVM
//! (PVM included: it runs real-mode code). They drive the real UART, bus, vCPU loop,
//! event loop and ACPI power-off path.

#[path = "common/pki.rs"]
mod pki;
#[path = "common/pty.rs"]
mod pty;

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

/// Runs `before`, prints a message to COM1, then runs `after`.
fn print_between(before: &[u8], msg: &str, after: &[u8]) -> Vec<u8> {
    let mut c = before.to_vec();
    c.extend(mov_dx(0x3f8));
    let msg_addr = LOAD_ADDR + (c.len() + 11 + after.len()) as u16;
    let [lo, hi] = msg_addr.to_le_bytes();
    c.extend([0xbe, lo, hi]); // mov si, msg
    c.extend([0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]); // lodsb; test al,al; jz +3; out dx,al; jmp -8
    c.extend(after);
    assert_eq!(c.len(), usize::from(msg_addr - LOAD_ADDR));
    c.extend(msg.as_bytes());
    c.push(0);
    c
}

/// Prints a message to COM1, then runs `then`.
fn print_then(msg: &str, then: &[u8]) -> Vec<u8> {
    print_between(&[], msg, then)
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

// ---- shared by the sections below; the fault matrix with real guests (docs/RELIABILITY.md)

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

/// A scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("microvm-tiny-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---- test guests in CI: exit-code port, --expect, --fail-on, --timeout, --report -------

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
    // Where the stuck guest was: SPIN (jmp $) right after the 14-byte print loop.
    let spin = u64::from(LOAD_ADDR) + 14;
    assert!(
        r.stderr
            .contains(&format!("vCPU 0 when the time ran out: rip={spin:#x} ")),
        "{}",
        r.stderr
    );
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

/// `code` followed by: print `msg` on COM1, power off.
fn then_print(code: Vec<u8>, msg: &str) -> Vec<u8> {
    print_between(&code, msg, &poweroff())
}

/// Spins forever, never touching a device (so never reading its input).
fn spin_guest() -> Vec<u8> {
    SPIN.to_vec()
}

/// Writes bytes 0, 1, 2, ... (wrapping) to COM1 forever, waiting for LSR.THRE before
/// each one like a real driver (so a congested console paces it).
fn counter_flood_guest() -> Vec<u8> {
    let mut c = vec![0x30, 0xdb]; // 0: xor bl, bl
    c.extend(mov_dx(0x3fd)); // 2: mov dx, LSR
    c.extend([0xec, 0xa8, 0x20, 0x74, 0xfb]); // 5: in al,dx; test al,0x20; jz 5
    c.extend(mov_dx(0x3f8)); // 10
    c.extend([0x88, 0xd8, 0xee, 0xfe, 0xc3]); // 13: mov al,bl; out dx,al; inc bl
    c.extend([0xeb, 0xee]); // 18: jmp 2
    c
}

/// 4096 pseudo-random reads and writes over COM1's eight registers, then LCR, MCR and
/// IER set back to a sane state, then a message.
fn random_uart_guest(msg: &str) -> Vec<u8> {
    let mut c = vec![0xb9, 0x00, 0x10, 0xbb, 0x34, 0x12]; // mov cx,4096; mov bx,0x1234
    let top = c.len();
    c.extend([0x89, 0xd8, 0xd1, 0xe0, 0xd1, 0xe0, 0x01, 0xd8]); // ax = bx * 5
    c.extend([0x05, 0x3b, 0x00, 0x89, 0xc3]); // add ax,0x3b; mov bx,ax
    c.extend([0x89, 0xda, 0x83, 0xe2, 0x07, 0x81, 0xc2, 0xf8, 0x03]); // dx = 0x3f8 + (bx & 7)
    c.extend([0x88, 0xf8, 0xf6, 0xc3, 0x08, 0x74, 0x03]); // al = bh; test bl,8; jz in
    c.extend([0xee, 0xeb, 0x01, 0xec]); // out dx,al; jmp next; in: in al,dx
    let rel = top as isize - (c.len() as isize + 2);
    c.extend([0xe2, rel as i8 as u8]); // next: loop top
    for (port, val) in [(0x3fbu16, 0x03u8), (0x3fc, 0x08), (0x3f9, 0x00)] {
        c.extend(mov_dx(port));
        c.extend([0xb0, val, 0xee]);
    }
    then_print(c, msg)
}

/// A running microvm with its stdout and stderr collected by threads.
struct Vmm {
    child: std::process::Child,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    img: PathBuf,
}

fn collect(mut r: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
}

impl Vmm {
    /// Starts microvm on `guest` with `args`; stdout (when piped) and stderr are collected.
    fn start(name: &str, guest: &[u8], args: &[&str], stdin: Stdio, stdout: Stdio) -> Vmm {
        Vmm::start_with(name, guest, args, stdin, stdout, true)
    }

    /// [`Vmm::start`]; a piped stdout is left in `child.stdout` unless `collect_stdout`.
    fn start_with(
        name: &str,
        guest: &[u8],
        args: &[&str],
        stdin: Stdio,
        stdout: Stdio,
        collect_stdout: bool,
    ) -> Vmm {
        Vmm::spawn(name, guest, args, stdin, stdout, collect_stdout, |_| {})
    }

    /// [`Vmm::start_with`], after `prepare` changed the command (environment, umask).
    fn spawn(
        name: &str,
        guest: &[u8],
        args: &[&str],
        stdin: Stdio,
        stdout: Stdio,
        collect_stdout: bool,
        prepare: impl FnOnce(&mut Command),
    ) -> Vmm {
        let img = image(name, guest);
        let mut cmd = Command::new(MICROVM);
        cmd.arg("--real-mode-image")
            .arg(&img)
            .args(args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped());
        prepare(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        if collect_stdout && let Some(o) = child.stdout.take() {
            collect(o, out.clone());
        }
        collect(child.stderr.take().unwrap(), err.clone());
        Vmm {
            child,
            out,
            err,
            img,
        }
    }

    fn wait_for(&self, what: &str, mut f: impl FnMut(&Vmm) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; stdout {:?}, stderr {}",
                String::from_utf8_lossy(&self.out.lock().unwrap()),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stdout_has(&self, needle: &[u8]) -> bool {
        self.out
            .lock()
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits (bounded) for the exit status; the collectors get what is left.
    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                panic!("microvm did not exit; stderr {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        std::thread::sleep(Duration::from_millis(50));
        st
    }

    /// Resident memory of the microvm process, in KiB.
    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.img);
    }
}

fn connect(p: &std::path::Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(p) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                return s;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect to {p:?}: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

fn read_until(s: &mut UnixStream, needle: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(needle.len()).any(|w| w == needle) {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "EOF before {needle:?}: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// The lines microvm printed on stderr.
fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[test]
fn sigterm_sigint_and_sighup_stop_cleanly_with_128_plus_n() {
    for (sig, code) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
    ] {
        let d = scratch(&format!("sig{sig}"));
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
        read_until(&mut client, b"hello"); // the history
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

#[test]
fn stale_socket_from_a_killed_run_is_reclaimed() {
    let d = scratch("stale");
    let sock = d.join("c.sock");
    let spec = format!("mux:stdio,sock={}", sock.display());
    let args = ["--console", spec.as_str()];
    let mut first = Vmm::start(
        "stale1",
        &echo_guest(),
        &args,
        Stdio::piped(),
        Stdio::piped(),
    );
    first.wait_for("socket", |_| sock.exists());
    first.signal(libc::SIGKILL);
    first.wait();
    assert!(sock.exists(), "a killed run leaves its socket file");
    let mut second = Vmm::start(
        "stale2",
        &echo_guest(),
        &args,
        Stdio::piped(),
        Stdio::piped(),
    );
    second.wait_for("stale socket notice", |v| {
        v.stderr().contains("removed stale console socket")
    });
    let mut c = connect(&sock);
    c.write_all(b"ok q").unwrap();
    read_until(&mut c, b"ok q");
    let st = second.wait();
    assert_eq!(st.code(), Some(0), "stderr {}", second.stderr());
    assert!(!sock.exists());
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn log_on_a_full_disk_is_reported_once_and_the_vm_goes_on() {
    let mut vm = Vmm::start(
        "devfull",
        &echo_guest(),
        &["--console", "mux:stdio,file=/dev/full,ring"],
        Stdio::piped(),
        Stdio::piped(),
    );
    let mut stdin = vm.child.stdin.take().unwrap();
    for b in [b"a", b"b", b"c"] {
        stdin.write_all(b).unwrap();
        vm.wait_for("echo", |v| v.stdout_has(b));
    }
    stdin.write_all(b"q").unwrap();
    let st = vm.wait();
    assert_eq!(st.code(), Some(0), "stderr {}", vm.stderr());
    assert_eq!(*vm.out.lock().unwrap(), b"abcq");
    assert_eq!(
        lines(&vm.stderr()),
        ["microvm: console backend file /dev/full dropped: No space left on device (os error 28)"]
    );
}

/// Unmounts a tmpfs when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn log_on_a_full_tmpfs_is_reported_once_and_the_vm_goes_on() {
    let d = scratch("tmpfs");
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16k", "tmpfs"])
        .arg(&mnt)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        // Only root can mount (CI and the project's machines run as root); the /dev/full
        // test covers the same error path.
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    }
    let _m = Mount(mnt.clone());
    let log = mnt.join("console.log");
    let spec = format!("mux:stdio,file={}", log.display());
    let mut vm = Vmm::start(
        "tmpfs",
        &echo_guest(),
        &["--console", &spec],
        Stdio::piped(),
        Stdio::piped(),
    );
    let mut stdin = vm.child.stdin.take().unwrap();
    // 64 KiB through the echo guest: the 16 KiB file system fills up on the way.
    let input: Vec<u8> = (0..64 * 1024).map(|i| b'a' + (i % 16) as u8).collect();
    stdin.write_all(&input).unwrap();
    vm.wait_for("all echoed", |v| v.out.lock().unwrap().len() >= input.len());
    stdin.write_all(b"q").unwrap();
    let st = vm.wait();
    assert_eq!(st.code(), Some(0), "stderr {}", vm.stderr());
    let mut want = input.clone();
    want.push(b'q');
    assert!(*vm.out.lock().unwrap() == want, "stdout lost bytes");
    let logged = std::fs::read(&log).unwrap();
    assert!(logged.len() <= 16 << 10 && !logged.is_empty());
    assert!(
        want.starts_with(&logged),
        "the log holds a prefix of the stream"
    );
    let err = vm.stderr();
    assert_eq!(lines(&err).len(), 1, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    drop(_m);
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn file_log_rotated_away_goes_on_in_a_new_file() {
    let d = scratch("rotated");
    let log = d.join("console.log");
    let spec = format!("mux:stdio,file={}", log.display());
    let mut vm = Vmm::start(
        "rotated",
        &echo_guest(),
        &["--console", &spec],
        Stdio::piped(),
        Stdio::piped(),
    );
    let mut stdin = vm.child.stdin.take().unwrap();
    stdin.write_all(b"one").unwrap();
    vm.wait_for("one logged", |_| {
        std::fs::read(&log).unwrap_or_default() == b"one"
    });
    std::fs::rename(&log, d.join("console.log.1")).unwrap();
    // The log looks for its path again at most once a second.
    std::thread::sleep(Duration::from_millis(1100));
    stdin.write_all(b"two").unwrap();
    vm.wait_for("two echoed", |v| v.stdout_has(b"onetwo"));
    stdin.write_all(b"q").unwrap();
    assert_eq!(vm.wait().code(), Some(0), "stderr {}", vm.stderr());
    assert_eq!(std::fs::read(d.join("console.log.1")).unwrap(), b"one");
    assert_eq!(std::fs::read(&log).unwrap(), b"twoq");
    assert!(lines(&vm.stderr()).is_empty(), "{}", vm.stderr());
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn closed_stdout_or_a_broken_pipe_never_stops_the_vm() {
    use std::os::unix::process::CommandExt;
    // stdout closed before microvm starts (the runtime puts /dev/null there).
    let img = image("closed", &hello_guest("lost\n"));
    let mut cmd = Command::new(MICROVM);
    cmd.arg("--real-mode-image").arg(&img);
    // SAFETY: close(2) is async-signal-safe; fd 1 is the child's own.
    unsafe {
        cmd.pre_exec(|| {
            libc::close(1);
            Ok(())
        });
    }
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    std::fs::remove_file(img).unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));

    // A pipe whose reader went away: EPIPE (never SIGPIPE), said once, the VM goes on.
    let d = scratch("epipe");
    let sock = d.join("c.sock");
    let spec = format!("mux:stdio,sock={}", sock.display());
    let mut vm = Vmm::start_with(
        "epipe",
        &echo_guest(),
        &["--console", &spec],
        Stdio::null(),
        Stdio::piped(),
        false,
    );
    // Close our end of its stdout before the guest writes anything.
    drop(vm.child.stdout.take());
    let mut c = connect(&sock);
    c.write_all(b"x").unwrap();
    read_until(&mut c, b"x");
    c.write_all(b"yq").unwrap();
    read_until(&mut c, b"yq");
    let st = vm.wait();
    assert_eq!(st.code(), Some(0), "stderr {}", vm.stderr());
    let err = vm.stderr();
    assert_eq!(
        err.matches("stdout").count(),
        1,
        "the closed stdout is reported once: {err}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn stdin_at_eof_the_vm_goes_on() {
    let d = scratch("eof");
    let sock = d.join("c.sock");
    let spec = format!("mux:stdio,sock={}", sock.display());
    let mut vm = Vmm::start(
        "eof",
        &echo_guest(),
        &["--console", &spec],
        Stdio::null(),
        Stdio::piped(),
    );
    let mut c = connect(&sock);
    c.write_all(b"hi").unwrap();
    read_until(&mut c, b"hi");
    c.write_all(b"q").unwrap();
    let st = vm.wait();
    assert_eq!(st.code(), Some(0), "stderr {}", vm.stderr());
    assert_eq!(*vm.out.lock().unwrap(), b"hiq");
    assert_eq!(
        lines(&vm.stderr()),
        ["microvm: stdin closed; the VM goes on"]
    );
    let _ = std::fs::remove_dir_all(d);
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
        let img = image(&format!("mem{mem}"), &hello_guest("mem ok\n"));
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

#[test]
fn a_guest_that_never_reads_its_input_keeps_memory_bounded() {
    let d = scratch("noread");
    let sock = d.join("c.sock");
    let spec = format!("mux:stdio,sock={}", sock.display());
    let mut vm = Vmm::start(
        "noread",
        &spin_guest(),
        &["--console", &spec],
        Stdio::piped(),
        Stdio::piped(),
    );
    let mut stdin = vm.child.stdin.take().unwrap();
    let c = connect(&sock);
    let base = vm.rss_kib();
    // 16 MiB from the terminal and 16 MiB from a client: both writers block once the
    // hub's input buffer is full and it stops reading them.
    let t1 = std::thread::spawn(move || {
        let chunk = vec![b'i'; 1 << 16];
        let mut sent = 0usize;
        while sent < 16 << 20 && stdin.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
        sent
    });
    let mut c2 = c.try_clone().unwrap();
    let t2 = std::thread::spawn(move || {
        let chunk = vec![b's'; 1 << 16];
        let mut sent = 0usize;
        while sent < 16 << 20 && c2.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
        sent
    });
    std::thread::sleep(Duration::from_secs(3));
    let grown = vm.rss_kib().saturating_sub(base);
    assert!(
        !t1.is_finished() && !t2.is_finished(),
        "writers were not held back"
    );
    assert!(grown < 8 << 10, "microvm grew by {grown} KiB holding input");
    // Still responsive: SIGTERM ends it promptly.
    vm.signal(libc::SIGTERM);
    let st = vm.wait();
    assert_eq!(st.code(), Some(143), "stderr {}", vm.stderr());
    let _ = c.shutdown(std::net::Shutdown::Both);
    let (a, b) = (t1.join().unwrap(), t2.join().unwrap());
    assert!(a < 16 << 20 && b < 16 << 20, "held back: {a} {b}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn uart_flood_memory_stays_flat_stalled_client_cut_off_ring_holds_the_tail() {
    let secs: u64 = std::env::var("MICROVM_FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let d = scratch("flood");
    let sock = d.join("c.sock");
    let spec = format!("mux:stdio,sock={}:queue=64K,ring=64K", sock.display());
    let mut vm = Vmm::start_with(
        "flood",
        &counter_flood_guest(),
        &["--console", &spec],
        Stdio::null(),
        Stdio::piped(),
        false,
    );
    // Read stdout ourselves: check every byte follows the one before (nothing lost).
    let mut out = vm.child.stdout.take().unwrap();
    let stalled = connect(&sock);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let (mut total, mut next) = (0u64, 0u8);
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let n = out.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                assert_eq!(b, next, "stdout lost or reordered a byte at {total}");
                next = next.wrapping_add(1);
                total += 1;
            }
        }
        total
    });
    std::thread::sleep(Duration::from_secs(2));
    let early = vm.rss_kib();
    std::thread::sleep(Duration::from_secs(secs.saturating_sub(2)));
    let late = vm.rss_kib();
    assert!(
        late < early + (16 << 10),
        "RSS grew from {early} to {late} KiB under a {secs} s flood"
    );
    vm.wait_for("stalled client cut off", |v| v.stderr().contains("cut off"));
    // A late joiner gets the history: the last 64 KiB, contiguous.
    let mut late_joiner = connect(&sock);
    let mut hist = vec![0u8; 64 << 10];
    late_joiner.read_exact(&mut hist).unwrap();
    assert!(
        hist.windows(2).all(|w| w[1] == w[0].wrapping_add(1)),
        "ring history is not a contiguous tail"
    );
    vm.signal(libc::SIGTERM);
    let st = vm.wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total = reader.join().unwrap();
    assert_eq!(st.code(), Some(143), "stderr {}", vm.stderr());
    assert!(total > 64 << 10, "only {total} bytes in {secs} s");
    eprintln!("flood: {total} bytes on stdout in {secs} s, RSS {early} -> {late} KiB");
    drop(stalled);
    let _ = std::fs::remove_dir_all(d);
}

// ---- stderr, panics and a second signal (docs/RELIABILITY.md, "Hub bounds") ---------

/// Runs microvm on `guest` with `stderr` as its stderr (stdin and stdout /dev/null) and
/// waits (bounded) for its status.
fn run_with_stderr(
    name: &str,
    guest: &[u8],
    args: &[&str],
    stderr: Stdio,
    env: &[(&str, &str)],
) -> i32 {
    let img = image(name, guest);
    let mut child = Command::new(MICROVM)
        .arg("--real-mode-image")
        .arg(&img)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("microvm hung with stderr {name}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = std::fs::remove_file(img);
    st.code().unwrap_or(-1)
}

/// A pipe: (read end, write end).
fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: a valid 2-element array for pipe2(2).
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: two fresh descriptors we own.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

/// stderr a pipe nobody drains (full before microvm starts), or one whose reader is
/// gone: the guest's exit code is still the status and the report is written (the old
/// VMM hung on a full stderr, or panicked on a closed one and exited 1 or 101).
#[test]
fn a_full_or_closed_stderr_never_changes_the_outcome() {
    use std::os::fd::AsRawFd;
    let d = scratch("stderr");
    for case in ["full", "closed"] {
        let report = d.join(format!("{case}.json"));
        let (r, w) = pipe();
        if case == "full" {
            // Fill it (non-blocking for the filling only), then hand it over blocking.
            // SAFETY: fcntl on our own fd.
            unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
            let chunk = [b'#'; 4096];
            // SAFETY: writing a valid buffer to our own pipe.
            while unsafe { libc::write(w.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) } > 0 {}
            // SAFETY: as above.
            unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETFL, 0) };
        }
        let reader = (case == "full").then_some(r);
        // `sock` without a path logs its path at start: the first stderr write.
        let code = run_with_stderr(
            case,
            &print_then("hello\n", &exit_code(3)),
            &[
                "--console",
                &format!(
                    "mux:stdio,sock={}",
                    d.join(format!("{case}.sock")).display()
                ),
                "--report",
                report.to_str().unwrap(),
            ],
            Stdio::from(w),
            &[],
        );
        assert_eq!(code, 3, "stderr {case}");
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(j["guest_exit_code"], 3, "report with stderr {case}");
        drop(reader);
    }
    let _ = std::fs::remove_dir_all(d);
}

/// A panic on a vCPU thread (under its seccomp filter) or on the event loop ends the
/// VM with status 1, one line saying where, and the report (the old VMM's vCPU panic left
/// the VM hung; under the filters its panic hook tripped seccomp).
#[test]
fn a_panic_on_any_thread_ends_the_vm_with_status_1() {
    let d = scratch("panic");
    for thread in ["vcpu", "event-loop"] {
        let report = d.join(format!("{thread}.json"));
        let img = image(thread, &spin_guest());
        let out = Command::new(MICROVM)
            .arg("--real-mode-image")
            .arg(&img)
            .args(["--console", "ring", "--report", report.to_str().unwrap()])
            .env("MICROVM_TEST_PANIC", thread)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let _ = std::fs::remove_file(img);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{thread}: {stderr}");
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

/// SIGTERM waits (a bounded time) for the terminal to take the guest's last output; a
/// second SIGTERM ends microvm at once, 128+15 all the same.
#[test]
fn a_second_sigterm_ends_the_flush_at_once() {
    let d = scratch("sigterm2");
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

// ---- --junit: KTAP/TAP results from the console ----------------------------------------

/// KUnit's output as the kernel prints it (timestamps, `\r\n`, nested suites, a failed
/// expectation, a skip and a todo), then kselftest's runner with a nested program.
const KTAP_SAMPLE: &str = "[    0.5] KTAP version 1\r\n[    0.5] 1..2\r\n\
[    0.5]     KTAP version 1\r\n[    0.5]     # Subtest: example\r\n\
[    0.5]     1..4\r\n[    0.5]     ok 1 example_simple_test\r\n\
[    0.5]     # example_fail: EXPECTATION FAILED at lib/kunit/example.c:42\r\n\
[    0.5]     not ok 2 example_fail\r\n\
[    0.5]     ok 3 example_skip # SKIP this test should be skipped\r\n\
[    0.5]     not ok 4 example_todo # TODO not done yet\r\n\
[    0.5] not ok 1 example\r\n[    0.5]     KTAP version 1\r\n\
[    0.5]     # Subtest: math\r\n[    0.5]     1..1\r\n[    0.5]     ok 1 add\r\n\
[    0.5] ok 2 math\r\n\
TAP version 13\n1..2\n# selftests: net: socket\n# TAP version 13\n# 1..3\n\
# ok 1 socket create\n# not ok 2 socket bind # port in use\n# ok 3 socket listen # SKIP no ipv6\n\
ok 1 selftests: net: socket\nnot ok 2 selftests: net: plain # exit=1\n";

/// `$MICROVM_CACHE/junit-10.xsd` (scripts/deps.sh fetches it from pytest's sdist).
fn junit_xsd() -> PathBuf {
    let cache = std::env::var_os("MICROVM_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/microvm"),
        PathBuf::from,
    );
    let xsd = cache.join("junit-10.xsd");
    assert!(
        xsd.exists(),
        "{} missing: run scripts/deps.sh (make test does)",
        xsd.display()
    );
    xsd
}

/// `xmllint --schema junit-10.xsd FILE` accepts it.
fn assert_valid_junit(file: &std::path::Path) {
    let out = Command::new("xmllint")
        .arg("--noout")
        .arg("--schema")
        .arg(junit_xsd())
        .arg(file)
        .output()
        .expect("xmllint (libxml2-utils, installed by scripts/deps.sh)");
    assert!(
        out.status.success(),
        "xmllint rejects {}:\n{}\n{}",
        file.display(),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(file).unwrap_or_default()
    );
}

#[test]
fn junit_from_a_ktap_guest_validates() {
    let d = scratch("junit");
    let (junit, report) = (d.join("results.xml"), d.join("report.json"));
    let r = run_with(
        "junit",
        &hello_guest(KTAP_SAMPLE),
        b"",
        &[
            "--junit",
            junit.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(r.status, 122, "stderr: {}", r.stderr);
    assert!(
        r.stderr
            .contains("3 of 9 KTAP/TAP tests failed, 0 never reported"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("microvm: not ok: ktap/example: example_fail"),
        "{}",
        r.stderr
    );
    assert_valid_junit(&junit);
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains(r#"<testsuites name="microvm" tests="9" failures="3" errors="0""#),
        "{xml}"
    );
    assert!(
        xml.contains(
            r#"<testsuite name="ktap/example" tests="4" failures="1" errors="0" skipped="2""#
        ),
        "{xml}"
    );
    assert!(
        xml.contains("EXPECTATION FAILED at lib/kunit/example.c:42</failure>"),
        "{xml}"
    );
    assert!(
        xml.contains(r#"<testsuite name="ktap-2/net: socket""#),
        "{xml}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(j["exit"]["reason"], "tests-failed");
    assert_eq!(j["exit"]["status"], 122);
    assert_eq!(j["tests"]["tests"], 9);
    assert_eq!(j["tests"]["failures"], 3);
    assert_eq!(j["tests"]["skipped"], 3);
    // Every test passing: the guest's clean stop stands (status 0), the file validates.
    let r = run_with(
        "junit-pass",
        &hello_guest("TAP version 13\n1..2\nok 1 a\nok 2 b # SKIP later\n"),
        b"",
        &["--junit", junit.to_str().unwrap()],
    );
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    assert_valid_junit(&junit);
    // No result at all fails a --junit run: a CI job must not pass on no tests.
    let r = run_with(
        "junit-none",
        &hello_guest("hello\n"),
        b"",
        &["--junit", junit.to_str().unwrap()],
    );
    assert_eq!(r.status, 122, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("no KTAP/TAP test result"), "{}", r.stderr);
    assert_valid_junit(&junit);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn junit_error_case_for_a_guest_that_panics_mid_test() {
    let d = scratch("junit-panic");
    let junit = d.join("results.xml");
    let text = "KTAP version 1\n1..3\nok 1 first\n# running second\n\
[   12.0] Kernel panic - not syncing: test crash\n\
[   12.1] ---[ end Kernel panic - not syncing: test crash ]---\n";
    let r = run_with(
        "junit-panic",
        &print_then(text, &SPIN),
        b"",
        &["--junit", junit.to_str().unwrap()],
    );
    assert_eq!(
        r.status, 125,
        "a panic keeps its status; stderr: {}",
        r.stderr
    );
    assert_valid_junit(&junit);
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains(r#"tests="3" failures="0" errors="2""#),
        "{xml}"
    );
    assert!(
        xml.contains(r#"<testcase name="test 2 (no result: guest kernel panic: Kernel panic - not syncing: test crash)""#),
        "{xml}"
    );
    assert!(
        xml.contains("Kernel panic - not syncing: test crash\n"),
        "{xml}"
    );
    assert!(xml.contains("running second"), "{xml}");
    std::fs::remove_dir_all(d).unwrap();
}

// ---- --send-after: scripted input --------------------------------------------------------

#[test]
fn send_after_types_each_text_once_its_pattern_appeared() {
    let d = scratch("send-after");
    let report = d.join("report.json");
    // The guest prints a prompt, then echoes what it gets until 'q'.
    let r = run_with(
        "send-after",
        &print_then("login: ", &echo_guest()),
        b"",
        &[
            "--send-after",
            "login: ",
            r"root\n",
            "--send-after",
            "root",
            r"\x41\cdq",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    assert_eq!(r.stdout, b"login: root\nA\x04q");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let source = j["consoles"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "send-after")
        .cloned()
        .unwrap_or_default();
    assert_eq!(source["bytes_in"], 8, "{j}");
    assert_eq!(j["send_after"]["done"], 2, "{j}");
    // A step whose pattern never comes: the timeout says which one it waited for.
    let r = run_with(
        "send-after-stuck",
        &print_then("login: ", &SPIN),
        b"",
        &[
            "--send-after",
            "login: ",
            "x",
            "--send-after",
            "Password: ",
            "y",
            "--timeout",
            "2s",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(r.status, 124, "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains(
            r#"microvm: --send-after: 1 of 2 steps done; still waiting for "Password: ""#
        ),
        "{}",
        r.stderr
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(j["send_after"]["steps"], 2, "{j}");
    assert_eq!(j["send_after"]["done"], 1, "{j}");
    std::fs::remove_dir_all(d).unwrap();
}

// ---- the PVM host refusal ------------------------------------------------------------------

/// On a PVM host (this project's machines: `/sys/module/kvm_pvm`), an ordinary kernel
/// (the reference guest's Debian kernel, `make guest`) is refused in one line that says
/// why and what to do, instead of hanging; on any other host it is not refused.
#[test]
fn an_ordinary_kernel_on_a_pvm_host_is_refused_in_one_line() {
    let kernel = junit_xsd().with_file_name("guest").join("vmlinuz");
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

// ---- who may type into the guest (docs/SECURITY.md's threat model) -----------------------

/// A free loopback port (bound and released: another process could take it meanwhile,
/// which would fail the test loudly, not pass it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects to a TCP console once it listens.
fn tcp_connect(port: u16) -> std::net::TcpStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                return s;
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot connect to port {port}: {e}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// The whole path, seccomp filters on: a TLS console with tokens on the event loop; a
/// silent connection and an HTTP POST meanwhile; `microvm attach` over TLS drives the
/// echo guest, which powers off on `q`.
#[test]
fn tls_token_console_under_seccomp_with_attach() {
    let d = scratch("tls-console");
    let p = pki::Pki::make(&d).unwrap();
    let token = pki::token(&d, "vm.token", "kvm-tiny-secret-0123456789").unwrap();
    let port = free_port();
    let spec = format!(
        "mux:stdio,tcp=127.0.0.1:{port}:token-file={}:tls-cert={}:tls-key={}",
        token.display(),
        p.server_cert.display(),
        p.server_key.display()
    );
    let mut vm = Vmm::start(
        "tls-console",
        &echo_guest(),
        &["--console", &spec],
        Stdio::piped(),
        Stdio::piped(),
    );
    let silent = tcp_connect(port);
    let curl = pki::curl_post_pwned(&format!("https://127.0.0.1:{port}/"), Some(&p.ca));
    let body = String::from_utf8_lossy(&curl.stdout);
    assert!(
        body.contains("not a web server"),
        "curl over TLS got {body:?}, {}; microvm: {}",
        String::from_utf8_lossy(&curl.stderr),
        vm.stderr()
    );
    let mut attach = Command::new(MICROVM)
        .args(["attach", &format!("tcp://127.0.0.1:{port}"), "--token-file"])
        .arg(&token)
        .arg("--ca")
        .arg(&p.ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let attached = Arc::new(Mutex::new(Vec::new()));
    collect(attach.stdout.take().unwrap(), attached.clone());
    let mut input = attach.stdin.take().unwrap();
    input.write_all(b"hello over tls").unwrap();
    vm.wait_for("the echo", |v| v.stdout_has(b"hello over tls"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&attached.lock().unwrap()).contains("hello over tls") {
        assert!(Instant::now() < deadline, "attach got no echo");
        std::thread::sleep(Duration::from_millis(5));
    }
    input.write_all(b"q").unwrap();
    let st = vm.wait();
    assert_eq!(st.code(), Some(0), "stderr {}", vm.stderr());
    assert!(
        vm.stderr().contains("an HTTP request"),
        "the refusal is logged: {}",
        vm.stderr()
    );
    assert!(attach.wait().unwrap().success());
    assert_eq!(
        String::from_utf8_lossy(&attached.lock().unwrap()),
        "hello over tlsq",
        "attach relays the console only"
    );
    drop(silent);
    let _ = std::fs::remove_dir_all(d);
}

/// The report of a run with `--console mux:stdio,sock` (default path).
fn run_default_socket(runtime: &std::path::Path, report: &std::path::Path) -> Vmm {
    let runtime = runtime.to_path_buf();
    Vmm::spawn(
        "default-sock",
        &echo_guest(),
        &[
            "--console",
            "mux:stdio,sock",
            "--report",
            report.to_str().unwrap(),
        ],
        Stdio::piped(),
        Stdio::piped(),
        true,
        move |c| {
            c.env("XDG_RUNTIME_DIR", runtime);
        },
    )
}

#[test]
fn default_socket_lives_in_a_private_runtime_dir_never_a_shared_one() {
    use std::os::unix::fs::PermissionsExt;
    let d = scratch("runtime");
    // A directory anyone may write (like /tmp): microvm makes its own private one in it.
    let shared = d.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let report = d.join("r.json");
    let mut vm = run_default_socket(&shared, &report);
    vm.wait_for("the socket's path", |v| {
        v.stderr().contains("console socket: ")
    });
    let err = vm.stderr();
    let path = err
        .lines()
        .find_map(|l| l.split("console socket: ").nth(1))
        .unwrap()
        .trim()
        .to_string();
    let private = shared.join("microvm");
    assert!(path.starts_with(private.to_str().unwrap()), "{path}");
    let m = std::fs::symlink_metadata(&private).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.permissions().mode() & 0o777, 0o700);
    assert!(std::path::Path::new(&format!("{path}.lock")).exists());
    let mut c = connect(std::path::Path::new(&path));
    c.write_all(b"q").unwrap();
    assert_eq!(vm.wait().code(), Some(0), "stderr {}", vm.stderr());
    let j = std::fs::read_to_string(&report).unwrap();
    assert!(j.contains(&format!("\"name\": \"{path}\"")), "{j}");
    assert!(!std::path::Path::new(&path).exists());
    assert!(!std::path::Path::new(&format!("{path}.lock")).exists());

    // That directory opened up to others, or replaced by a link: refused, nothing bound.
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut vm = run_default_socket(&shared, &report);
    assert_eq!(vm.wait().code(), Some(1), "stderr {}", vm.stderr());
    let err = vm.stderr();
    assert_eq!(lines(&err).len(), 1, "{err}");
    assert!(err.contains("has mode 0777"), "{err}");
    assert_eq!(std::fs::read_dir(&private).unwrap().count(), 0);
    std::fs::remove_dir(&private).unwrap();
    let elsewhere = d.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &private).unwrap();
    let mut vm = run_default_socket(&shared, &report);
    assert_eq!(vm.wait().code(), Some(1), "stderr {}", vm.stderr());
    assert!(
        vm.stderr().contains("is a symbolic link"),
        "{}",
        vm.stderr()
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(d);
}

/// In the child, before exec: umask 000, and a symlink to `victim` at `prefix` + the
/// child's own pid (where microvm used to put its report's temporary file). No
/// allocation between fork and exec: the path is built in a stack buffer.
fn plant_in_child(cmd: &mut Command, victim: &std::path::Path, prefix: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let victim = std::ffi::CString::new(victim.as_os_str().as_bytes()).unwrap();
    let prefix = prefix.as_os_str().as_bytes().to_vec();
    assert!(prefix.len() < 200);
    // SAFETY: the closure only calls async-signal-safe functions (getpid, umask,
    // symlink) on stack buffers and data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(0);
            let mut buf = [0u8; 256];
            buf[..prefix.len()].copy_from_slice(&prefix);
            let mut n = prefix.len();
            let mut digits = [0u8; 12];
            let mut pid = libc::getpid() as u32;
            let mut k = digits.len();
            loop {
                k -= 1;
                digits[k] = b'0' + (pid % 10) as u8;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            for &b in &digits[k..] {
                buf[n] = b;
                n += 1;
            }
            libc::symlink(victim.as_ptr(), buf.as_ptr().cast());
            Ok(())
        });
    }
}

#[test]
fn planted_symlinks_change_nothing_outside_microvms_files() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let d = scratch("symlinks");
    let victim = d.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The report itself and its old predictable temporary name are links to the victim;
    // the umask is 000.
    let report = d.join("r.json");
    symlink(&victim, &report).unwrap();
    let mut vm = Vmm::spawn(
        "symlink-report",
        &hello_guest("hi\n"),
        &["--report", report.to_str().unwrap()],
        Stdio::null(),
        Stdio::piped(),
        true,
        |c| plant_in_child(c, &victim, &d.join(".r.json.tmp-")),
    );
    assert_eq!(vm.wait().code(), Some(0), "stderr {}", vm.stderr());
    let m = std::fs::symlink_metadata(&report).unwrap();
    assert!(m.is_file(), "the link was replaced by the report");
    assert_eq!(
        m.permissions().mode() & 0o777,
        0o600,
        "0600 under umask 000"
    );
    assert!(
        std::fs::read_to_string(&report)
            .unwrap()
            .contains("\"exit\"")
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

    // A link at a log path or a socket path: refused with one line, the victim untouched.
    for (spec, told) in [
        (
            format!("mux:stdio,file={}", d.join("log").display()),
            "is a symbolic link",
        ),
        (
            format!("mux:stdio,sock={}", d.join("c.sock").display()),
            "is not a socket",
        ),
    ] {
        let _ = std::fs::remove_file(d.join("log"));
        let _ = std::fs::remove_file(d.join("c.sock"));
        symlink(&victim, d.join("log")).unwrap();
        symlink(&victim, d.join("c.sock")).unwrap();
        let r = run_with(
            "symlink-log",
            &hello_guest("hi\n"),
            b"",
            &["--console", &spec],
        );
        assert_eq!(r.status, 1, "{spec}: {}", r.stderr);
        assert_eq!(lines(&r.stderr).len(), 1, "{}", r.stderr);
        assert!(r.stderr.contains(told), "{}", r.stderr);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let m = std::fs::metadata(&victim).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o644);
    }
    let _ = std::fs::remove_dir_all(d);
}

/// Runs `guest` with MICROVM_EXIT_STATS=1; returns stdout and vCPU 0's exit counts
/// (`io_out`, `coalesced_writes`) parsed from its stats line.
fn run_counting_exits(name: &str, guest: &[u8]) -> (Vec<u8>, u64, u64) {
    let img = image(name, guest);
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
