//! Tier-3 tests: boot the reference Linux guest (Debian cloud kernel + our busybox
//! initramfs, prepared by `scripts/guest.sh`) with the real `microvm` binary.
//!
//! `harness = false`: this `main()` picks where the cases run.
//! - `MICROVM_RIG=inner` (we are inside the rig's L1) or a host whose KVM boots ordinary
//!   kernels (`direct`): run every case here.
//! - otherwise (`nested`, e.g. a PVM host): re-run this very executable inside the nested
//!   rig, `scripts/rig.sh --payload <this exe> -- /rig/<exe name> ARGS`, booting L1 once
//!   for all cases, streaming its output and propagating its status.
//!
//! Environment: `MICROVM_BIN` (default: the cargo-built binary), `MICROVM_KERNEL`,
//! `MICROVM_INITRD` (default: `$MICROVM_CACHE/guest/…`), `MICROVM_RIG=direct|nested|inner`,
//! `MICROVM_TEST_TIMEOUT` (seconds per wait; default 180 in the rig, 60 direct),
//! `MICROVM_TEST_REPEAT` (run each case N times, for flake hunting),
//! `MICROVM_TEST_BUDGET` (seconds for the whole suite, default 720; cases left when it is
//! spent fail), `MICROVM_RIG_ARGS` (extra scripts/rig.sh options in nested mode).
//! Output follows libtest's format; argv: first non-flag argument is a substring filter,
//! `--exact`, `--skip S`, `--list` are honoured, other libtest flags are ignored.

use std::env;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

type CaseFn = fn(&Ctx) -> Result<(), String>;

mod cases_boot;
mod cases_ci;
mod cases_console;
mod cases_run;
#[path = "../common/pki.rs"]
mod pki;
#[path = "../common/pty.rs"]
mod pty;

/// Every case, in run order.
fn all_cases() -> Vec<(&'static str, CaseFn)> {
    [
        cases_boot::CASES,
        cases_console::CASES,
        cases_ci::CASES,
        cases_run::CASES,
        cases_ci::LAST,
        cases_run::LAST,
        cases_boot::LAST,
    ]
    .concat()
}

pub const INIT_MARK: &str = "microvm-guest: init reached";
pub const SHELL_MARK: &str = "microvm-guest: shell ready";

// ---------------------------------------------------------------------------------------
// Running one microvm process

#[derive(Clone)]
struct Ctx {
    bin: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    timeout: Duration,
    /// Given to every microvm run (see `run_cases`).
    common_args: Vec<String>,
    /// The microvm processes the running case started, for the watchdog.
    live: Arc<Mutex<Vec<Live>>>,
}

/// A microvm process as the watchdog sees it.
struct Live {
    pid: u32,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
}

impl Ctx {
    /// `microvm --kernel K --initrd I EXTRA...`, not started.
    fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--kernel")
            .arg(&self.kernel)
            .arg("--initrd")
            .arg(&self.initrd)
            .args(&self.common_args)
            .args(extra);
        cmd
    }

    /// Spawns `microvm --kernel K --initrd I EXTRA...` with piped stdio.
    fn spawn(&self, extra: &[&str]) -> Result<Vm, String> {
        let mut cmd = self.command(extra);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        self.start(cmd, None)
    }

    /// Starts `cmd` with stderr piped. The console is read from `console` (input, output)
    /// when given (e.g. a pty master), else from the child's piped stdin and stdout.
    fn start(
        &self,
        mut cmd: Command,
        console: Option<(Box<dyn Write + Send>, Box<dyn Read + Send>)>,
    ) -> Result<Vm, String> {
        cmd.stderr(Stdio::piped());
        let cmdline = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", self.bin.display()))?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        self.live.lock().unwrap().push(Live {
            pid: child.id(),
            out: out.clone(),
            err: err.clone(),
        });
        let (input, output): (Option<Box<dyn Write + Send>>, Box<dyn Read + Send>) = match console {
            Some((i, o)) => (Some(i), o),
            None => (
                child
                    .stdin
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Write + Send>),
                Box::new(child.stdout.take().ok_or("stdout is not piped")?),
            ),
        };
        let readers = vec![
            pump(output, out.clone()),
            pump(
                child.stderr.take().ok_or("stderr is not piped")?,
                err.clone(),
            ),
        ];
        Ok(Vm {
            stdin: input,
            child,
            out,
            err,
            readers,
            timeout: self.timeout,
            deadline: Instant::now() + self.timeout,
            cmdline,
            status: None,
        })
    }
}

fn pump(mut src: impl Read + Send + 'static, dst: Arc<Mutex<Vec<u8>>>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => dst.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

/// A running microvm. Dropping it kills the process if it is still running.
struct Vm {
    child: Child,
    /// The console input (the child's stdin, or a pty master).
    stdin: Option<Box<dyn Write + Send>>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<thread::JoinHandle<()>>,
    timeout: Duration,
    /// One deadline per case, counted from spawn.
    deadline: Instant,
    cmdline: String,
    status: Option<ExitStatus>,
}

impl Vm {
    /// The console output as received, byte-exact.
    fn output(&self) -> Vec<u8> {
        self.out.lock().unwrap().clone()
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).replace('\r', "")
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).replace('\r', "")
    }

    /// Kills the process and builds a failure message with the console and stderr tails.
    fn fail(&mut self, what: &str) -> String {
        self.kill();
        format!(
            "{what}\n  command: {}\n  exit: {}\n---- guest console (stdout) tail ----\n{}\n---- stderr tail ----\n{}",
            self.cmdline,
            self.status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "killed by the test".into()),
            tail(&self.stdout(), 40),
            tail(&self.stderr(), 20),
        )
    }

    fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.stdin.take();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(s)) = self.child.try_wait()
        {
            self.status = Some(s);
            // Let the readers drain the pipes.
            for r in self.readers.drain(..) {
                let _ = r.join();
            }
        }
        self.status
    }

    /// Waits until a stdout line contains `needle`; returns that line.
    fn wait_for(&mut self, needle: &str) -> Result<String, String> {
        let deadline = self.deadline;
        loop {
            let exited = self.poll_exit();
            // The kernel echoes its command line (which holds mvcmd="..." with the
            // markers' source text): never match there.
            let found = self
                .stdout()
                .lines()
                .filter(|l| !l.contains("Command line:") && !l.contains("command line parameters"))
                .find(|l| l.contains(needle))
                .map(str::to_string);
            if let Some(line) = found {
                return Ok(line);
            }
            if let Some(s) = exited {
                return Err(self.fail(&format!("microvm exited ({s}) before printing {needle:?}")));
            }
            if Instant::now() > deadline {
                return Err(self.fail(&format!(
                    "timed out ({:?} per case) waiting for {needle:?}",
                    self.timeout
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn send(&mut self, text: &str) -> Result<(), String> {
        let res = match self.stdin.as_mut() {
            Some(s) => s.write_all(text.as_bytes()).and_then(|_| s.flush()),
            None => return Err(self.fail("stdin already closed")),
        };
        res.map_err(|e| self.fail(&format!("writing {text:?} to microvm's stdin: {e}")))
    }

    /// Waits for the process to exit and checks its exit code.
    fn expect_exit(&mut self, code: i32) -> Result<(), String> {
        let deadline = self.deadline;
        loop {
            if let Some(s) = self.poll_exit() {
                return if s.code() == Some(code) {
                    Ok(())
                } else {
                    Err(self.fail(&format!("expected exit status {code}, got {s}")))
                };
            }
            if Instant::now() > deadline {
                return Err(self.fail(&format!(
                    "timed out ({:?} per case) waiting for microvm to exit",
                    self.timeout
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A scratch directory for one case, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(case: &str) -> Result<Scratch, String> {
        let dir = env::temp_dir().join(format!("mvtest-{}-{case}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `cond` every 20 ms until it holds or `deadline` passes.
fn wait_until(deadline: Instant, what: &str, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle, 0).is_some()
}

/// Position of `needle` in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// The MD5 of `data` in hex, computed by the host's `md5sum` (coreutils or busybox).
fn md5_hex(data: &[u8]) -> Result<String, String> {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run md5sum: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("md5sum stdin")?;
    let data = data.to_vec();
    let feeder = thread::spawn(move || stdin.write_all(&data));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("md5sum: {e}"))?;
    let _ = feeder.join();
    let hex: String = String::from_utf8_lossy(&out.stdout)
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    if hex.len() == 32 {
        Ok(hex)
    } else {
        Err(format!(
            "md5sum printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// A console socket client that reads everything into a buffer.
struct Client {
    name: String,
    stream: UnixStream,
    buf: Arc<Mutex<Vec<u8>>>,
    reader: Option<thread::JoinHandle<()>>,
}

/// Connects to the console socket at `path`, retrying until `deadline` (the VMM creates
/// the socket while it starts).
fn connect(path: &Path, deadline: Instant) -> Result<UnixStream, String> {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("cannot connect to {}: {e}", path.display()));
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Client {
    fn connect(name: &str, path: &Path, deadline: Instant) -> Result<Client, String> {
        let stream = connect(path, deadline)?;
        let buf = Arc::new(Mutex::new(Vec::new()));
        let reader = stream
            .try_clone()
            .map_err(|e| format!("{name}: clone socket: {e}"))?;
        Ok(Client {
            name: name.to_string(),
            reader: Some(pump(reader, buf.clone())),
            stream,
            buf,
        })
    }

    fn bytes(&self) -> Vec<u8> {
        self.buf.lock().unwrap().clone()
    }

    fn send(&mut self, data: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(data)
            .map_err(|e| format!("{}: writing to the console socket: {e}", self.name))
    }

    fn wait_for(&self, needle: &str, deadline: Instant) -> Result<(), String> {
        wait_until(
            deadline,
            &format!("{needle:?} on socket client {}", self.name),
            || contains(&self.buf.lock().unwrap(), needle.as_bytes()),
        )
        .map_err(|e| {
            format!(
                "{e}; it received {} bytes, tail:\n{}",
                self.buf.lock().unwrap().len(),
                tail(&String::from_utf8_lossy(&self.bytes()), 10)
            )
        })
    }

    /// Waits for the server to close the connection; returns everything received.
    fn finish(mut self, deadline: Instant) -> Result<Vec<u8>, String> {
        let reader = self.reader.take();
        wait_until(
            deadline,
            &format!("EOF on socket client {}", self.name),
            || reader.as_ref().is_none_or(|r| r.is_finished()),
        )?;
        if let Some(r) = reader {
            let _ = r.join();
        }
        Ok(self.bytes())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// Harness

#[derive(Debug, PartialEq)]
enum Mode {
    Inner,
    Direct,
    Nested(String),
}

fn mode() -> Mode {
    match env::var("MICROVM_RIG").as_deref() {
        Ok("inner") => return Mode::Inner,
        Ok("direct") => return Mode::Direct,
        Ok("nested") => return Mode::Nested("MICROVM_RIG=nested".into()),
        _ => {}
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Mode::Nested(
            "the host /dev/kvm is PVM (/sys/module/kvm_pvm), which boots only PVM-enabled kernels"
                .into(),
        );
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Mode::Direct,
        Err(e) => Mode::Nested(format!("the host has no usable /dev/kvm ({e})")),
    }
}

struct Opts {
    filter: Option<String>,
    exact: bool,
    skip: Vec<String>,
    list: bool,
    ignored_only: bool,
}

fn parse_args(args: &[String]) -> Opts {
    const WITH_VALUE: &[&str] = &[
        "--test-threads",
        "--format",
        "--color",
        "--logfile",
        "-Z",
        "--shuffle-seed",
        "--skip",
    ];
    let mut o = Opts {
        filter: None,
        exact: false,
        skip: vec![],
        list: false,
        ignored_only: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--exact" => o.exact = true,
            "--list" => o.list = true,
            "--ignored" => o.ignored_only = true,
            "--skip" => o.skip.extend(it.next().cloned()),
            f if WITH_VALUE.contains(&f) => {
                it.next();
            }
            f if f.starts_with("--skip=") => o.skip.push(f["--skip=".len()..].to_string()),
            f if f.starts_with('-') => {}
            f if o.filter.is_none() => o.filter = Some(f.to_string()),
            _ => {}
        }
    }
    o
}

fn selected(o: &Opts) -> Vec<(&'static str, CaseFn)> {
    all_cases()
        .into_iter()
        .filter(|(name, _)| match &o.filter {
            None => true,
            Some(f) if o.exact => name == f,
            Some(f) => name.contains(f.as_str()),
        })
        .filter(|(name, _)| !o.skip.iter().any(|s| name.contains(s.as_str())))
        .filter(|_| !o.ignored_only)
        .collect()
}

fn result_line(passed: usize, failed: usize, filtered: usize, start: Instant) -> String {
    format!(
        "test result: {}. {passed} passed; {failed} failed; 0 ignored; 0 measured; {filtered} filtered out; finished in {:.2}s",
        if failed == 0 { "ok" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    )
}

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let opts = parse_args(&args);
    let cases = selected(&opts);
    let filtered = all_cases().len() - cases.len();
    if opts.list {
        for (name, _) in &cases {
            println!("{name}: test");
        }
        println!("\n{} tests, 0 benchmarks", cases.len());
        return;
    }
    let start = Instant::now();
    if cases.is_empty() {
        println!(
            "\nrunning 0 tests\n\n{}\n",
            result_line(0, 0, filtered, start)
        );
        return;
    }
    let code = match mode() {
        Mode::Inner => run_cases(&cases, filtered, true),
        Mode::Direct => {
            prepare_guest_on_host();
            prepare_ci_example();
            run_cases(&cases, filtered, false)
        }
        Mode::Nested(why) => run_nested(&args, &cases, filtered, &why),
    };
    std::process::exit(code);
}

fn cache_guest_dir() -> PathBuf {
    let cache = env::var_os("MICROVM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/microvm")
        });
    cache.join("guest")
}

fn microvm_bin() -> PathBuf {
    env::var_os("MICROVM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_microvm")))
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// Where the worked CI example's test initramfs images are (`ci-pass.gz`, `ci-fail.gz`):
/// `MICROVM_CI_EXAMPLE` (set to /rig inside the nested rig), else the cache.
pub fn ci_example_dir() -> PathBuf {
    env::var_os("MICROVM_CI_EXAMPLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_guest_dir().with_file_name("ci-example"))
}

/// Builds the worked example's two test initramfs images (docs/CI.md) on the host with
/// examples/ci/make-initrd.sh, exactly as a user would. Returns their paths.
fn prepare_ci_example() -> Vec<PathBuf> {
    let dir = cache_guest_dir().with_file_name("ci-example");
    let _ = std::fs::create_dir_all(&dir);
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ci");
    let mut out = Vec::new();
    for name in ["pass", "fail"] {
        let img = dir.join(format!("ci-{name}.gz"));
        let ok = Command::new("sh")
            .arg(example.join("make-initrd.sh"))
            .arg(example.join(format!("{name}.sh")))
            .arg(&img)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!(
                "boot: examples/ci/make-initrd.sh {name}.sh failed; the ci_worked_example case will fail"
            );
        }
        out.push(img);
    }
    out.extend(prepare_run_guests(&dir));
    out
}

/// For the naive-init and `microvm run` cases: the guest's virtio modules (copied from
/// the reference guest's modules-l2) and `tprog`, a small dynamically linked Rust program
/// (tests/boot/tprog.rs, built here with rustc) that prints its arguments and exits
/// with the number in its first one.
fn prepare_run_guests(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let modules = cache_guest_dir().join("modules-l2");
    for e in std::fs::read_dir(&modules).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "ko") {
            let dst = dir.join(e.file_name());
            if std::fs::copy(&p, &dst).is_ok() {
                out.push(dst);
            }
        }
    }
    let tprog = dir.join("tprog");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/boot/tprog.rs");
    let ok = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["-O", "--edition", "2021", "-o"])
        .arg(&tprog)
        .arg(&src)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        out.push(tprog);
    } else {
        eprintln!(
            "boot: rustc {} failed; the run_* cases will fail",
            src.display()
        );
    }
    out
}

/// On the host, make sure the reference guest exists (guest.sh is instant when cached
/// and rebuilds the initramfs when resources/guest changed).
fn prepare_guest_on_host() {
    if env::var_os("MICROVM_KERNEL").is_some() && env::var_os("MICROVM_INITRD").is_some() {
        return;
    }
    let ok = Command::new("bash")
        .arg(script("guest.sh"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("boot: scripts/guest.sh failed; the cases below will fail");
    }
}

fn run_cases(cases: &[(&'static str, CaseFn)], filtered: usize, inner: bool) -> i32 {
    let guest = cache_guest_dir();
    let timeout = env::var("MICROVM_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if inner { 180 } else { 60 });
    // Whole-suite budget, so a VMM that hangs in every case cannot hold CI for
    // cases x timeout: once spent, the remaining cases fail at once (never skipped).
    let budget = Duration::from_secs(
        env::var("MICROVM_TEST_BUDGET")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(720),
    );
    let mut ctx = Ctx {
        bin: microvm_bin(),
        kernel: env::var_os("MICROVM_KERNEL")
            .map(PathBuf::from)
            .unwrap_or(guest.join("vmlinuz")),
        initrd: env::var_os("MICROVM_INITRD")
            .map(PathBuf::from)
            .unwrap_or(guest.join("initrd.gz")),
        timeout: Duration::from_secs(timeout),
        common_args: Vec::new(),
        live: Arc::new(Mutex::new(Vec::new())),
    };
    // In the rig's L1 (QEMU TCG emulating SVM), an L2 vCPU that spins with interrupts off
    // (Linux's hvc console write waits so for the device to take its buffer) does not
    // take L1's interrupts: whatever else is queued on that L1 CPU waits for the spin,
    // and the spin may be waiting for it (the event loop, the reader draining the
    // console). So L1 keeps CPUs for vCPU threads (`isolcpus`, scripts/rig.sh) and the
    // vCPUs go there; real hardware does not need this.
    if inner
        && let Ok(isolated) = std::fs::read_to_string("/sys/devices/system/cpu/isolated")
        && !isolated.trim().is_empty()
    {
        ctx.common_args = vec!["--vcpu-affinity".into(), isolated.trim().to_string()];
    }
    let start = Instant::now();
    // MICROVM_TEST_REPEAT=N runs each case N times (flake hunting).
    let repeat = env::var("MICROVM_TEST_REPEAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1usize)
        .max(1);
    let cases: Vec<_> = cases
        .iter()
        .flat_map(|c| std::iter::repeat_n(*c, repeat))
        .collect();
    println!("\nrunning {} tests", cases.len());
    let (mut passed, mut failures, mut hung_once) = (0, Vec::new(), Vec::new());
    for (name, f) in &cases {
        print!("test {name} ... ");
        let _ = std::io::stdout().flush();
        let t = Instant::now();
        let mut attempt = || {
            let left = budget.saturating_sub(start.elapsed());
            ctx.timeout = Duration::from_secs(timeout).min(left);
            if left.is_zero() {
                Err(Outcome::Failed(format!(
                    "suite time budget ({budget:?}, MICROVM_TEST_BUDGET) spent; not run"
                )))
            } else {
                run_guarded(&ctx, *f)
            }
        };
        // A case the watchdog had to stop gets one more attempt, said loudly: in the
        // nested rig L1 itself has been seen to wedge (TCG's nested SVM), and one such
        // hiccup must not hide the other cases' results. The first attempt's picture
        // stays in the log, and the summary lists the case.
        let res = match attempt() {
            Err(Outcome::Hung(picture)) => {
                println!("HUNG; the watchdog's picture:\n{picture}\n");
                print!("test {name} (second attempt after a hang) ... ");
                let _ = std::io::stdout().flush();
                hung_once.push(*name);
                attempt()
            }
            other => other,
        }
        .map_err(|o| match o {
            Outcome::Failed(m) | Outcome::Hung(m) => m,
        });
        let secs = t.elapsed().as_secs_f64();
        match res {
            Ok(()) => {
                println!("ok");
                passed += 1;
            }
            Err(msg) => {
                println!("FAILED");
                println!("---- {name} ({secs:.1}s) ----\n{msg}\n");
                failures.push(*name);
            }
        }
        eprintln!("boot: {name} took {secs:.1}s");
    }
    if !hung_once.is_empty() {
        println!("\ncases the watchdog stopped once (see HUNG above):");
        for n in &hung_once {
            println!("    {n}");
        }
    }
    if !failures.is_empty() {
        println!("\nfailures:");
        for n in &failures {
            println!("    {n}");
        }
    }
    println!(
        "\n{}\n",
        result_line(passed, failures.len(), filtered, start)
    );
    if failures.is_empty() { 0 } else { 101 }
}

/// Why a case did not pass.
enum Outcome {
    /// It returned an error (or panicked).
    Failed(String),
    /// The watchdog stopped it; the text is where it was stuck.
    Hung(String),
}

/// How long past its own deadline a case may run before the watchdog steps in.
const WATCHDOG_GRACE: Duration = Duration::from_secs(60);

/// Runs one case on a thread of its own under a watchdog. Every wait in a case has the
/// case's deadline, but a blocking call (a write into a full pty, a join, a process that
/// cannot die) could still hold it forever and, with it, the whole rig. Past the deadline
/// plus `WATCHDOG_GRACE` the watchdog fails the case with a picture of where everything
/// is stuck (the case's threads and the microvm processes it started: state, wchan,
/// kernel stacks, console tails), kills those processes and moves on to the next case.
fn run_guarded(ctx: &Ctx, f: CaseFn) -> Result<(), Outcome> {
    ctx.live.lock().unwrap().clear();
    let (tx, rx) = std::sync::mpsc::channel();
    let case_ctx = ctx.clone();
    let worker = thread::Builder::new()
        .name("case".into())
        .spawn(move || {
            let _ = tx.send(f(&case_ctx));
        })
        .map_err(|e| Outcome::Failed(format!("cannot start the case's thread: {e}")))?;
    match rx.recv_timeout(ctx.timeout + WATCHDOG_GRACE) {
        Ok(res) => {
            let _ = worker.join();
            res.map_err(Outcome::Failed)
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            let _ = worker.join();
            Err(Outcome::Failed(
                "the case panicked (see its message above)".into(),
            ))
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            let picture = hang_picture(ctx);
            let exe = ctx
                .bin
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            for l in ctx.live.lock().unwrap().iter() {
                // Only a pid that still runs microvm (one the case reaped may be reused).
                let cmd = std::fs::read(format!("/proc/{}/cmdline", l.pid)).unwrap_or_default();
                if exe.as_ref().is_some_and(|e| contains(&cmd, e.as_bytes())) {
                    // SAFETY: kill(2) has no memory effects; the pid runs our microvm.
                    unsafe { libc::kill(l.pid as i32, libc::SIGKILL) };
                }
            }
            // Give the case a moment to notice; a thread still stuck is left behind.
            let late = rx.recv_timeout(Duration::from_secs(20));
            Err(Outcome::Hung(format!(
                "the case was still running {WATCHDOG_GRACE:?} past its deadline ({:?}): the \
                 watchdog killed its microvm processes ({}).\n{picture}",
                ctx.timeout,
                match late {
                    Ok(_) => "it then returned",
                    Err(_) => "it is still stuck and left behind",
                }
            )))
        }
    }
}

/// Where a hung case and its microvm processes are: every thread's state, wchan and
/// kernel stack (readable as root, i.e. in the rig), and the consoles' tails.
fn hang_picture(ctx: &Ctx) -> String {
    let mut s = String::from("---- the test's threads ----\n");
    s += &threads_picture("self");
    for l in ctx.live.lock().unwrap().iter() {
        s += &format!("---- microvm pid {} ----\n", l.pid);
        s += &threads_picture(&l.pid.to_string());
        s += &format!(
            "---- its console (stdout) tail ----\n{}\n---- its stderr tail ----\n{}\n",
            tail(&String::from_utf8_lossy(&l.out.lock().unwrap()), 30),
            tail(&String::from_utf8_lossy(&l.err.lock().unwrap()), 15)
        );
    }
    s
}

fn threads_picture(pid: &str) -> String {
    let dir = format!("/proc/{pid}/task");
    let Ok(tasks) = std::fs::read_dir(&dir) else {
        return format!("(gone: no {dir})\n");
    };
    let mut s = String::new();
    for t in tasks.flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let state = read("status")
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or("")
            .to_string();
        s += &format!(
            "{} {:?} {state} wchan={}\n",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan")
        );
        for frame in read("stack").lines().take(12) {
            s += &format!("    {frame}\n");
        }
    }
    s
}

/// Re-runs this executable inside the nested rig and relays its output.
fn run_nested(
    args: &[String],
    cases: &[(&'static str, CaseFn)],
    filtered: usize,
    why: &str,
) -> i32 {
    let start = Instant::now();
    let exe = env::current_exe().expect("current_exe");
    let exe_name = exe.file_name().unwrap().to_string_lossy().into_owned();
    eprintln!("boot: running the cases inside the nested rig (QEMU TCG L1 with kvm_amd): {why}");
    let mut cmd = Command::new("bash");
    cmd.arg(script("rig.sh"))
        .env("MICROVM_BIN", microvm_bin())
        .arg("--payload")
        .arg(&exe);
    for img in prepare_ci_example() {
        if img.exists() {
            cmd.arg("--payload").arg(img);
        }
    }
    cmd.arg("--env").arg("MICROVM_CI_EXAMPLE=/rig");
    for var in [
        "MICROVM_TEST_TIMEOUT",
        "MICROVM_TEST_BUDGET",
        "MICROVM_TEST_REPEAT",
        "RUST_BACKTRACE",
        "RUST_LOG",
    ] {
        if let Ok(v) = env::var(var) {
            cmd.arg("--env").arg(format!("{var}={v}"));
        }
    }
    // L1 safety timeout: the suite budget plus slack for building and booting L1.
    let budget: u64 = env::var("MICROVM_TEST_BUDGET")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(720);
    cmd.arg("--timeout").arg((budget + 300).to_string());
    // Extra rig.sh options, e.g. MICROVM_RIG_ARGS="--timeout 600 --with-qemu".
    if let Ok(extra) = env::var("MICROVM_RIG_ARGS") {
        cmd.args(extra.split_whitespace());
    }
    cmd.arg("--").arg(format!("/rig/{exe_name}")).args(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            println!("boot: cannot start scripts/rig.sh: {e}");
            println!("\n{}\n", result_line(0, cases.len(), filtered, start));
            return 101;
        }
    };
    let (mut seen_result, mut passed) = (false, 0);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        if line.starts_with("test result: ") {
            seen_result = true;
        }
        if line.starts_with("test ") && line.ends_with(" ... ok") {
            passed += 1;
        }
        println!("{line}");
    }
    let status = child.wait().map(|s| s.code().unwrap_or(1)).unwrap_or(1);
    if !seen_result {
        println!(
            "boot: the rig ended (status {status}) before the cases finished; unfinished cases count as failed"
        );
        println!(
            "\n{}\n",
            result_line(passed, cases.len().saturating_sub(passed), filtered, start)
        );
        return if status == 0 { 101 } else { status };
    }
    status
}
