//! Test guests in CI with a real Linux guest: the exit-code port, `--expect`,
//! `--fail-on`, `--timeout`, `--boot-timer`, `--report`, and the worked example of
//! docs/CI.md (examples/ci/).

use std::time::Instant;

use crate::common::contains;
use crate::common::fs::Scratch;
use crate::prepare::ci_example_dir;
use crate::vm::{Client, Ctx};
use crate::{CaseFn, INIT_MARK};

pub const CASES: &[(&str, CaseFn)] = &[
    (
        "ci_exit_code_flushes_every_backend",
        ci_exit_code_flushes_every_backend,
    ),
    (
        "ci_expect_boot_timer_and_report",
        ci_expect_boot_timer_and_report,
    ),
    ("ci_timeout_on_a_hung_guest", ci_timeout_on_a_hung_guest),
    ("ci_worked_example", ci_worked_example),
];

/// With the crash cases at the end of the suite (see `cases_boot::LAST`).
pub const LAST: &[(&str, CaseFn)] = &[("ci_fail_on_catches_a_panic", ci_fail_on_catches_a_panic)];

/// The guest prints a marker and exits 3 through the exit-code register (devmem): microvm exits 3, and the
/// marker reached the file log and a socket client before it did.
fn ci_exit_code_flushes_every_backend(ctx: &Ctx) -> Result<(), String> {
    let dir = Scratch::new("ciexit")?;
    let (sock, log) = (dir.path("c.sock"), dir.path("console.log"));
    let spec = format!("mux:stdio,sock={},file={}", sock.display(), log.display());
    let mut vm = ctx.spawn(&[
        "--console",
        &spec,
        "--cmdline",
        r#"mvcmd="echo LAST-$((40+2)); devmem 0xc0000000 8 3""#,
    ])?;
    let client = Client::connect("viewer", &sock, vm.deadline).map_err(|e| vm.fail(&e))?;
    vm.wait_for(INIT_MARK)?;
    vm.expect_exit(3)?;
    let got = client.finish(vm.deadline)?;
    if !contains(&got, b"LAST-42") {
        return Err(vm.fail("the socket client did not get LAST-42 before the exit"));
    }
    let file = std::fs::read(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    if !contains(&file, b"LAST-42") {
        return Err(vm.fail("the file log does not hold LAST-42"));
    }
    let err = vm.stderr();
    if !err.contains("guest exit code 3") || !err.contains("| LAST-42") {
        return Err(vm.fail("stderr lacks the exit reason or the console tail"));
    }
    Ok(())
}

/// `--expect` ends a guest that would run for ten minutes with 0, the boot timer is
/// plausible, and the report holds what went through the consoles.
fn ci_expect_boot_timer_and_report(ctx: &Ctx) -> Result<(), String> {
    let dir = Scratch::new("ciexpect")?;
    let report = dir.path("report.json");
    let start = Instant::now();
    let mut vm = ctx.spawn(&[
        "--expect",
        "EXP-42",
        "--boot-timer",
        "--report",
        report.to_str().ok_or("report path")?,
        "--cmdline",
        r#"mvcmd="echo EXP-$((6*7)); sleep 600""#,
    ])?;
    vm.wait_for(INIT_MARK)?;
    vm.expect_exit(0)?;
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    let err = vm.stderr();
    let boot_ms: f64 = err
        .split("boot time: ")
        .nth(1)
        .and_then(|s| s.split(" ms").next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| vm.fail("no `boot time: N ms` on stderr"))?;
    if !(boot_ms > 0.0 && boot_ms < wall_ms) {
        return Err(vm.fail(&format!("boot time {boot_ms} ms, run {wall_ms} ms")));
    }
    let text = std::fs::read_to_string(&report).map_err(|e| vm.fail(&format!("report: {e}")))?;
    let j: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| vm.fail(&format!("report: {e}\n{text}")))?;
    let check = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(format!("report: {what}\n{text}"))
        }
    };
    check(j["exit"]["reason"] == "expect-met", "exit.reason")?;
    check(j["exit"]["status"] == 0, "exit.status")?;
    check(j["guest_exit_code"].is_null(), "guest_exit_code")?;
    check(j["expect"]["matched"] == 1, "expect.matched")?;
    let boot = j["boot_time_ms"].as_f64().unwrap_or(-1.0);
    check((boot - boot_ms).abs() < 0.2, "boot_time_ms equals stderr's")?;
    check(
        boot < j["wall_time_ms"].as_f64().unwrap_or(0.0),
        "wall_time_ms",
    )?;
    let c = &j["consoles"][0];
    let out = c["output_bytes"].as_u64().unwrap_or(0);
    let fe = |name: &str| {
        c["frontends"]
            .as_array()
            .and_then(|a| a.iter().find(|f| f["name"] == name))
            .and_then(|f| f["bytes_out"].as_u64())
            .unwrap_or(0)
    };
    // earlycon on ttyS0, then hvc0: both wrote, and together they are the stream.
    check(fe("ttyS0") > 0 && fe("hvc0") > 0, "both frontends wrote")?;
    check(
        fe("ttyS0") + fe("hvc0") == out,
        "frontend bytes add up to the stream",
    )?;
    let stdout = c["backends"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["name"] == "stdout"))
        .ok_or_else(|| format!("report: no stdout backend\n{text}"))?;
    check(stdout["bytes_out"] == out, "stdout got the whole stream")?;
    check(stdout["dropped"] == 0, "stdout dropped nothing")?;
    let got = vm.output().len() as u64;
    check(
        got == out,
        &format!("stdout bytes {got} == output_bytes {out}"),
    )?;
    Ok(())
}

/// A guest that hangs is stopped by `--timeout` with 124; stderr shows why and its
/// last console lines.
fn ci_timeout_on_a_hung_guest(ctx: &Ctx) -> Result<(), String> {
    let mut vm = ctx.spawn(&[
        "--timeout",
        "40s",
        "--cmdline",
        r#"mvcmd="echo HANG-$((1+1)); sleep 600""#,
    ])?;
    vm.wait_for("HANG-2")?;
    vm.expect_exit(124)?;
    let err = vm.stderr();
    if !err.contains("--timeout 40s expired") || !err.contains("| HANG-2") {
        return Err(vm.fail("stderr lacks the timeout or the console tail"));
    }
    Ok(())
}

/// `--fail-on 'Kernel panic'` catches a deliberate panic: status 123, the panic line in
/// the console tail on stderr.
fn ci_fail_on_catches_a_panic(ctx: &Ctx) -> Result<(), String> {
    let mut vm = ctx.spawn(&[
        "--fail-on",
        "Kernel panic",
        "--cmdline",
        r#"mvcmd="echo c > /proc/sysrq-trigger""#,
    ])?;
    vm.wait_for(INIT_MARK)?;
    vm.expect_exit(123)?;
    let err = vm.stderr();
    if !err.contains(r#"--fail-on "Kernel panic" appeared"#) || !err.contains("| ") {
        return Err(vm.fail("stderr lacks the fail-on reason or the console tail"));
    }
    if !err
        .lines()
        .any(|l| l.starts_with("  | ") && l.contains("Kernel panic"))
    {
        return Err(vm.fail("the console tail on stderr does not show the panic line"));
    }
    Ok(())
}

/// docs/CI.md's worked example, as written there (the default command line: the
/// example's init knows nothing about consoles): examples/ci/make-initrd.sh builds a
/// test initramfs around pass.sh and fail.sh; the passing test exits microvm with 0,
/// the failing one with its status 3, the console log and the report kept.
fn ci_worked_example(ctx: &Ctx) -> Result<(), String> {
    let dir = Scratch::new("ciexample")?;
    for (name, status) in [("pass", 0), ("fail", 3)] {
        let initrd = ci_example_dir().join(format!("ci-{name}.gz"));
        let log = dir.path(&format!("{name}.log"));
        let report = dir.path(&format!("{name}.json"));
        let spec = format!("mux:stdio,file={}", log.display());
        let mut cmd = std::process::Command::new(&ctx.bin);
        cmd.arg("--kernel")
            .arg(&ctx.kernel)
            .arg("--initrd")
            .arg(&initrd)
            .args(&ctx.common_args)
            .args(["--console", &spec])
            .args(["--fail-on", "Kernel panic", "--timeout", "5m"])
            .args(["--boot-timer", "--report"])
            .arg(&report)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
        let mut vm = ctx.start(cmd, None)?;
        vm.wait_for(&format!("/test.sh exited with status {status}"))?;
        vm.expect_exit(status)?;
        let text = std::fs::read_to_string(&log).map_err(|e| vm.fail(&format!("log: {e}")))?;
        let want = if status == 0 {
            "ALL TESTS PASSED"
        } else {
            "FAIL: /etc/does-not-exist is missing"
        };
        if !text.contains(want) {
            return Err(vm.fail(&format!("{name}: console.log lacks {want:?}")));
        }
        let r = std::fs::read_to_string(&report).map_err(|e| vm.fail(&format!("report: {e}")))?;
        let j: serde_json::Value = serde_json::from_str(&r).map_err(|e| format!("{e}: {r}"))?;
        if j["guest_exit_code"] != status || j["boot_time_ms"].as_f64().is_none() {
            return Err(vm.fail(&format!("{name}: report {r}")));
        }
    }
    Ok(())
}
