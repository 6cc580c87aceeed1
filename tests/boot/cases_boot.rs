//! The core boot cases: init, SMP, shell input, reboot/poweroff/panic exit statuses, memory.

use crate::vm::Ctx;
use crate::{CaseFn, INIT_MARK, SHELL_MARK};

pub const CASES: &[(&str, CaseFn)] = &[
    ("boots_to_init", boots_to_init),
    ("smp_two_vcpus", smp_two_vcpus),
    ("shell_input", shell_input),
    ("reboot_exits_zero", reboot_exits_zero),
    ("poweroff_exits_zero", poweroff_exits_zero),
    ("memory_flag", memory_flag),
];

/// Last of the whole suite: in the nested rig a guest that dies by triple fault has been
/// seen to crash L1 (TCG's nested SVM), which would take the remaining cases with it.
pub const LAST: &[(&str, CaseFn)] = &[("panic_exits_nonzero", panic_exits_nonzero)];

fn boots_to_init(ctx: &Ctx) -> Result<(), String> {
    let mut vm = ctx.spawn(&["--cmdline", r#"mvcmd="echo MARK-$((6*7))""#])?;
    vm.wait_for(INIT_MARK)?;
    vm.wait_for("MARK-42")?;
    vm.expect_exit(0)
}

fn smp_two_vcpus(ctx: &Ctx) -> Result<(), String> {
    let mut vm = ctx.spawn(&[
        "--vcpus",
        "2",
        "--cmdline",
        r#"mvcmd="echo CPUS-$(grep -c ^processor /proc/cpuinfo)-$(nproc)""#,
    ])?;
    vm.wait_for(INIT_MARK)?;
    let line = vm.wait_for("CPUS-")?;
    if !line.contains("CPUS-2-2") {
        return Err(vm.fail(&format!(
            "expected CPUS-2-2 (processor lines - nproc), got {line:?}"
        )));
    }
    vm.expect_exit(0)
}

fn shell_input(ctx: &Ctx) -> Result<(), String> {
    let mut vm = ctx.spawn(&[])?;
    vm.wait_for(INIT_MARK)?;
    vm.wait_for(SHELL_MARK)?;
    vm.send("echo IN-$((20+22))\n")?;
    vm.wait_for("IN-42")?;
    vm.send("poweroff -f\n")?;
    vm.expect_exit(0)
}

fn reboot_exits_zero(ctx: &Ctx) -> Result<(), String> {
    let mut vm = ctx.spawn(&["--cmdline", r#"mvcmd="reboot -f""#])?;
    vm.wait_for(INIT_MARK)?;
    vm.expect_exit(0)
}

fn poweroff_exits_zero(ctx: &Ctx) -> Result<(), String> {
    let mut vm = ctx.spawn(&["--cmdline", r#"mvcmd="poweroff -f""#])?;
    vm.wait_for(INIT_MARK)?;
    vm.expect_exit(0)
}

fn panic_exits_nonzero(ctx: &Ctx) -> Result<(), String> {
    let mut vm = ctx.spawn(&["--cmdline", r#"mvcmd="echo c > /proc/sysrq-trigger""#])?;
    vm.wait_for(INIT_MARK)?;
    vm.expect_exit(125)?;
    if !vm.stderr().to_lowercase().contains("panic") {
        return Err(vm.fail("exit status 125 but stderr does not mention `panic`"));
    }
    Ok(())
}

fn memory_flag(ctx: &Ctx) -> Result<(), String> {
    let mut vm = ctx.spawn(&[
        "--memory",
        "512M",
        "--cmdline",
        r#"mvcmd="echo MEM-$(awk '/MemTotal/{print $2}' /proc/meminfo)-KB""#,
    ])?;
    vm.wait_for(INIT_MARK)?;
    let line = vm.wait_for("-KB")?;
    let kb: Option<u64> = line
        .split("MEM-")
        .nth(1)
        .and_then(|s| s.split("-KB").next())
        .and_then(|s| s.trim().parse().ok());
    match kb {
        Some(kb) if (400 * 1024..=512 * 1024).contains(&kb) => {}
        _ => {
            return Err(vm.fail(&format!(
                "MemTotal should be within 400..=512 MiB, got {line:?}"
            )));
        }
    }
    vm.expect_exit(0)
}
