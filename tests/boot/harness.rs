//! The harness: libtest-style arguments and output, where the cases run (here, or this
//! executable again inside the nested rig), the per-case watchdog and the suite's time
//! budget.

use std::env;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::contains;
use crate::prepare::{cache_guest_dir, microvm_bin, prepare_ci_example, script};
use crate::vm::{Ctx, tail};
use crate::{CaseFn, all_cases};

#[derive(Debug, PartialEq)]
pub enum Mode {
    Inner,
    Direct,
    Nested(String),
}

/// Where the cases run. `MICROVM_RIG=inner|direct|nested` says so; otherwise the binary
/// under test decides, as the scripts do: `microvm kvm-mode` prints `direct` (this host's
/// KVM boots ordinary kernels) or `nested` on stdout, and its reason on stderr
/// (`microvm: kvm-mode: REASON`).
pub fn mode() -> Result<Mode, String> {
    match env::var("MICROVM_RIG").as_deref() {
        Ok("inner") => return Ok(Mode::Inner),
        Ok("direct") => return Ok(Mode::Direct),
        Ok("nested") => return Ok(Mode::Nested("MICROVM_RIG=nested".into())),
        _ => {}
    }
    let bin = microvm_bin();
    let out = Command::new(&bin)
        .arg("kvm-mode")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {} kvm-mode: {e}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reason = stderr
        .lines()
        .find_map(|l| l.strip_prefix("microvm: kvm-mode: "))
        .unwrap_or("no reason given")
        .to_string();
    match (out.status.success(), stdout.trim()) {
        (true, "direct") => Ok(Mode::Direct),
        (true, "nested") => Ok(Mode::Nested(reason)),
        _ => Err(format!(
            "{} kvm-mode ({}) printed {:?} and {:?}; expected `direct` or `nested` (or set MICROVM_RIG=direct|nested)",
            bin.display(),
            out.status,
            stdout.trim(),
            stderr.trim()
        )),
    }
}

pub struct Opts {
    pub filter: Option<String>,
    pub exact: bool,
    pub skip: Vec<String>,
    pub list: bool,
    pub ignored_only: bool,
}

pub fn parse_args(args: &[String]) -> Opts {
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

pub fn selected(o: &Opts) -> Vec<(&'static str, CaseFn)> {
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

pub fn result_line(passed: usize, failed: usize, filtered: usize, start: Instant) -> String {
    format!(
        "test result: {}. {passed} passed; {failed} failed; 0 ignored; 0 measured; {filtered} filtered out; finished in {:.2}s",
        if failed == 0 { "ok" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    )
}

pub fn run_cases(cases: &[(&'static str, CaseFn)], filtered: usize, inner: bool) -> i32 {
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
pub fn run_nested(
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
