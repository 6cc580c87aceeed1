//! vmmtime: boot-timing helper for scripts/bench.sh, run inside the rig's L1 (busybox has
//! no sub-second clock). Built by cargo (`cargo build --release -p microvm-tools`).
//!
//! usage: vmmtime --mark STR --guest-mem-mib N [--log FILE] [--at STR]... [--kvm-stats DIR]
//!                [--timeout S] -- CMD ARGS...
//!
//! Spawns CMD (stdin /dev/null, stdout piped, stderr to the log), and prints one line:
//!   vmmtime: init_ms=T1 exit_ms=T2 status=S rss_kib=R guest_kib=G rss_excl_guest_kib=E
//! T1: process start -> first stdout line containing STR; T2: start -> exit.
//! RSS is sampled from /proc/PID/smaps when STR appears: R is the sum of all mappings'
//! Rss, G the Rss of the guest-memory mappings (anonymous mappings whose Size is at least
//! the guest memory size; QEMU and microvm both map guest RAM as one such region), and
//! E = R - G: the VMM's own resident memory.
//! Each `--at STR` adds `atK_ms=T atK_rss_excl_guest_kib=E` (K = 1, 2, ...): the time and
//! the VMM's own RSS when the first line containing STR appears (e.g. markers the guest
//! prints around a console flood). `--timeout S` kills CMD (SIGKILL) after S seconds; the
//! line then says `status=timeout`, or `status=unkillable` (and vmmtime returns) when CMD
//! has not died 10 s later (e.g. stuck in the kernel in a nested KVM).
//! CPU time: `init_cpu_ms` is the CPU time all of CMD's threads had used when STR
//! appeared (the sum of /proc/PID/task/*/schedstat), `cpu_ms` what CMD used in all
//! (getrusage(RUSAGE_CHILDREN) after it exited: user + system). `init_threads` lists
//! each thread's CPU time when STR appeared (`name:ms,...`).
//! `--kvm-stats DIR` adds KVM's exit counters (see `read_kvm_stats`) to each `--at` marker
//! as `atK_kvm_exits=N ...`: the difference between two markers is what the guest cost
//! in VM exits in between, whatever the VMM.
//! Bad arguments: one line on stderr and exit status 2; a log file that cannot be created
//! or a CMD that cannot be started: one line and exit status 1 (no timing line then).
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

fn smaps_rss(pid: u32, guest_kib: u64) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut guest) = (0u64, 0u64);
    let (mut size, mut anon) = (0u64, false);
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let first = it.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // Mapping header: "start-end perms offset dev inode [path]"
            let path = line.split_whitespace().nth(5);
            anon = path.is_none();
            size = 0;
        } else if first == "Size:" {
            size = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        } else if first == "Rss:" {
            let rss: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += rss;
            if anon && size >= guest_kib {
                guest += rss;
            }
        }
    }
    Some((total, guest))
}

/// CPU time (ms) used so far by each live thread of `pid`, by thread name.
fn thread_cpu_ms(pid: u32) -> Option<Vec<(String, f64)>> {
    let mut threads = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = t.ok()?.path();
        let text = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        let ns = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let name: String = name.trim().chars().filter(|c| !c.is_whitespace()).collect();
        threads.push((name, ns as f64 / 1e6));
    }
    Some(threads)
}

/// CPU time (ms) used so far by all live threads of `pid`.
fn task_cpu_ms(pid: u32) -> Option<f64> {
    thread_cpu_ms(pid).map(|t| t.iter().map(|(_, ms)| ms).sum())
}

/// KVM's VM-wide exit counters from its debugfs directory (`--kvm-stats DIR`, e.g.
/// /sys/kernel/debug/kvm): `exits=N io_exits=N mmio_exits=N irq_exits=N halt_exits=N`,
/// summed over the host's live VMs (the bench runs one at a time).
fn read_kvm_stats(dir: &str) -> String {
    ["exits", "io_exits", "mmio_exits", "irq_exits", "halt_exits"]
        .iter()
        .filter_map(|name| {
            let v = std::fs::read_to_string(format!("{dir}/{name}")).ok()?;
            Some(format!("kvm_{name}={}", v.trim()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPU time (ms, user + system) of the waited-for children of this process.
fn children_cpu_ms() -> Option<f64> {
    // SAFETY: rusage is plain integers, for which all-zero bytes are a valid value.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into the rusage struct it is given, which lives here.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut r) } != 0 {
        return None;
    }
    let ms = |t: &libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    Some(ms(&r.ru_utime) + ms(&r.ru_stime))
}

/// The command line: `--mark`, `--guest-mem-mib`, the optional flags, then `-- CMD...`.
struct Opts {
    mark: String,
    mem_mib: u64,
    log: Option<String>,
    ats: Vec<String>,
    kvm_stats: Option<String>,
    timeout: Option<u64>,
    cmd: Vec<String>,
}

const USAGE: &str = "usage: vmmtime --mark STR --guest-mem-mib N [--log FILE] [--at STR]... [--kvm-stats DIR] [--timeout S] -- CMD ARGS...";

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        mark: String::new(),
        mem_mib: 0,
        log: None,
        ats: Vec::new(),
        kvm_stats: None,
        timeout: None,
        cmd: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            o.cmd = it.by_ref().cloned().collect();
            break;
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{a} needs a value ({USAGE})"))?
            .clone();
        let number = |what: &str| {
            value
                .parse::<u64>()
                .map_err(|_| format!("{a} takes {what}, got '{value}'"))
        };
        match a.as_str() {
            "--mark" => o.mark = value.clone(),
            "--guest-mem-mib" => o.mem_mib = number("a size in MiB")?,
            "--timeout" => o.timeout = Some(number("a number of seconds")?),
            "--kvm-stats" => o.kvm_stats = Some(value.clone()),
            "--at" => o.ats.push(value.clone()),
            "--log" => o.log = Some(value.clone()),
            _ => return Err(format!("unknown argument {a} ({USAGE})")),
        }
    }
    if o.cmd.is_empty() || o.mark.is_empty() {
        return Err(USAGE.into());
    }
    Ok(o)
}

/// One line on stderr, then exit with `status`.
fn fail(status: i32, msg: &str) -> ! {
    eprintln!("vmmtime: {msg}");
    std::process::exit(status);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Opts {
        mark,
        mem_mib,
        log,
        ats,
        kvm_stats,
        timeout,
        cmd,
    } = parse_args(&args).unwrap_or_else(|e| fail(2, &e));
    let mut ats: Vec<(String, Option<f64>, Option<u64>, String)> = ats
        .into_iter()
        .map(|s| (s, None, None, String::new()))
        .collect();
    let mut logf = log.map(|p| {
        std::fs::File::create(&p)
            .unwrap_or_else(|e| fail(1, &format!("cannot create the log file {p}: {e}")))
    });
    let stderr = match &logf {
        Some(f) => Stdio::from(f.try_clone().unwrap_or_else(|e| {
            fail(
                1,
                &format!("cannot share the log file with {}: {e}", cmd[0]),
            )
        })),
        None => Stdio::null(),
    };
    let start = Instant::now();
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| fail(1, &format!("cannot start {}: {e}", cmd[0])));
    let pid = child.id();
    let timed_out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(secs) = timeout {
        let flag = timed_out.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(secs));
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            // The child may have exited already; kill(2) on a reaped pid is harmless here
            // because vmmtime exits right after the child does. kill(2) itself, not a
            // `kill` program: L1's PATH may have none, and then nothing was ever killed.
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            let _ = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            // A process stuck in the kernel (a nested vCPU that never returns) does not
            // die, and its stdout never closes: report that instead of waiting forever.
            std::thread::sleep(std::time::Duration::from_secs(10));
            println!(
                "vmmtime: init_ms=- exit_ms=- status=unkillable rss_kib=- guest_kib=- rss_excl_guest_kib=- init_cpu_ms=- cpu_ms=- init_threads=-"
            );
            std::process::exit(0);
        });
    }
    let (mut init_ms, mut rss, mut init_cpu) = (None, None, None);
    let mut init_threads = String::from("-");
    let Some(stdout) = child.stdout.take() else {
        fail(1, "the child's stdout is not a pipe"); // impossible: piped above
    };
    let mut out = BufReader::new(stdout);
    let mut line = Vec::new();
    while out.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
        let text = String::from_utf8_lossy(&line);
        if init_ms.is_none() && text.contains(&mark) {
            init_ms = Some(start.elapsed().as_secs_f64() * 1e3);
            init_cpu = task_cpu_ms(pid);
            if let Some(t) = thread_cpu_ms(pid) {
                let parts: Vec<String> = t.iter().map(|(n, ms)| format!("{n}:{ms:.0}")).collect();
                init_threads = parts.join(",");
            }
            rss = smaps_rss(pid, mem_mib * 1024);
        }
        for (s, t, r, k) in ats.iter_mut() {
            if t.is_none() && text.contains(s.as_str()) {
                *t = Some(start.elapsed().as_secs_f64() * 1e3);
                *r = smaps_rss(pid, mem_mib * 1024).map(|(r, g)| r - g);
                *k = kvm_stats.as_deref().map(read_kvm_stats).unwrap_or_default();
            }
        }
        if let Some(f) = logf.as_mut() {
            let _ = f.write_all(&line);
        }
        line.clear();
    }
    let status = child
        .wait()
        .unwrap_or_else(|e| fail(1, &format!("cannot wait for {}: {e}", cmd[0])));
    let exit_ms = start.elapsed().as_secs_f64() * 1e3;
    let fmt = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
    let (r, g) = rss
        .map(|(r, g)| (r.to_string(), g.to_string()))
        .unwrap_or(("-".into(), "-".into()));
    let e = rss
        .map(|(r, g)| (r - g).to_string())
        .unwrap_or_else(|| "-".into());
    let mut at_fields = String::new();
    for (k, (_, t, r, stats)) in ats.iter().enumerate() {
        let r = r.map(|r| r.to_string()).unwrap_or_else(|| "-".into());
        at_fields += &format!(
            " at{}_ms={} at{}_rss_excl_guest_kib={r}",
            k + 1,
            fmt(*t),
            k + 1
        );
        for kv in stats.split_whitespace() {
            at_fields += &format!(" at{}_{kv}", k + 1);
        }
    }
    let cpu_ms = children_cpu_ms();
    println!(
        "vmmtime: init_ms={} exit_ms={exit_ms:.0} status={} rss_kib={r} guest_kib={g} rss_excl_guest_kib={e} init_cpu_ms={} cpu_ms={} init_threads={init_threads}{at_fields}",
        fmt(init_ms),
        if timed_out.load(std::sync::atomic::Ordering::SeqCst) {
            "timeout".to_string()
        } else {
            status.code().unwrap_or(-1).to_string()
        },
        init_cpu
            .map(|v| format!("{v:.1}"))
            .unwrap_or_else(|| "-".into()),
        cpu_ms
            .map(|v| format!("{v:.1}"))
            .unwrap_or_else(|| "-".into()),
    );
}
