//! Test guests in CI as kernel developers run them (issue 13): a naive init on the
//! default command line, KTAP results to JUnit, `--send-after` at a login prompt,
//! `microvm run` with a host program; and the boot paths that had no Linux test: an ELF
//! vmlinux, and the virtio console found through the ACPI DSDT alone.
//!
//! Guests other than the reference one are built here with `microvm::ci::initramfs` from
//! the busybox of the machine the cases run on (the host, or the rig's L1) and the
//! virtio modules `prepare_run_guests` put beside the CI example.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use microvm::ci::initramfs::Initramfs;

use crate::common::contains;
use crate::common::fs::Scratch;
use crate::prepare::ci_example_dir;
use crate::vm::{Client, Ctx};
use crate::{CaseFn, INIT_MARK};

pub const CASES: &[(&str, CaseFn)] = &[
    (
        "console_naive_init_on_the_default_line",
        console_naive_init_on_the_default_line,
    ),
    ("ci_junit_from_a_linux_guest", ci_junit_from_a_linux_guest),
    (
        "ci_send_after_logs_in_at_getty",
        ci_send_after_logs_in_at_getty,
    ),
    ("run_host_program_exit_status", run_host_program_exit_status),
    ("boot_elf_vmlinux", boot_elf_vmlinux),
    (
        "boot_acpi_dsdt_alone_finds_virtio",
        boot_acpi_dsdt_alone_finds_virtio,
    ),
];

/// With the crash cases at the end of the suite (see `cases_boot::LAST`).
pub const LAST: &[(&str, CaseFn)] = &[(
    "ci_junit_error_case_for_a_panic_mid_test",
    ci_junit_error_case_for_a_panic_mid_test,
)];

fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"))
}

/// busybox with /bin/sh, the mount points, `init` and `extra` files; written to `out`.
fn build_initrd(
    out: &Path,
    init: &str,
    extra: &[(&str, &str)],
    modules: bool,
) -> Result<(), String> {
    let mut fs = Initramfs::new();
    fs.file("/bin/busybox", &busybox())
        .map_err(|e| e.to_string())?;
    fs.symlink("/bin/sh", "busybox");
    for d in ["/proc", "/sys", "/dev", "/tmp", "/root", "/etc"] {
        fs.dir(d);
    }
    if modules {
        fs.modules(&ci_example_dir(), &["virtio_mmio", "virtio_console"])
            .map_err(|e| e.to_string())?;
    }
    for (path, text) in extra {
        fs.file_from_bytes(path, text.as_bytes().to_vec(), 0o644);
    }
    fs.file_from_bytes("/init", init.as_bytes().to_vec(), 0o755);
    let cpio = fs.to_cpio().map_err(|e| e.to_string())?;
    std::fs::write(out, cpio).map_err(|e| format!("{}: {e}", out.display()))
}

/// `microvm --kernel KERNEL --initrd INITRD COMMON EXTRA...` with stdin and stdout piped.
fn command(ctx: &Ctx, kernel: &Path, initrd: &Path, extra: &[&str]) -> Command {
    let mut cmd = ctx.command_for(kernel, initrd, extra);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    cmd
}

/// How often `needle` occurs in `hay`.
fn count(hay: &[u8], needle: &str) -> usize {
    hay.windows(needle.len())
        .filter(|w| *w == needle.as_bytes())
        .count()
}

/// An init that knows nothing about consoles: it loads its modules and echoes. On
/// Debian's kernel (virtio_console a module) with the old `console=hvc0` default it had
/// no stdout at all.
const NAIVE_INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "naive: INIT-$((6*7))"
while read -r m; do insmod "/lib/modules/microvm/$m"; done </lib/modules/microvm/order
echo "<3>naive: KMSG-$((6*7))" >/dev/kmsg
echo "naive: HVC-$((6*7))" >/dev/hvc0
echo "naive: DONE-$((6*7))"
poweroff -f
"#;

/// Debian's stock kernel, a naive init, the default command line: init's lines (its
/// stdout, a kernel message it logs after loading virtio_console, a line it writes to
/// hvc0) reach stdout, a socket client and the file log exactly once each.
fn console_naive_init_on_the_default_line(ctx: &Ctx) -> Result<(), String> {
    let dir = Scratch::new("naive")?;
    let initrd = dir.path("naive.cpio");
    build_initrd(&initrd, NAIVE_INIT, &[], true)?;
    let (sock, log) = (dir.path("c.sock"), dir.path("console.log"));
    let spec = format!("mux:stdio,sock={},file={}", sock.display(), log.display());
    let cmd = command(ctx, &ctx.kernel, &initrd, &["--console", &spec]);
    let mut vm = ctx.start(cmd, None)?;
    let client = Client::connect("viewer", &sock, vm.deadline).map_err(|e| vm.fail(&e))?;
    vm.wait_for("DONE-42")?;
    vm.expect_exit(0)?;
    let socket = client.finish(vm.deadline)?;
    let file = std::fs::read(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    for (name, bytes) in [("stdout", vm.output()), ("socket", socket), ("file", file)] {
        for marker in ["INIT-42", "KMSG-42", "HVC-42", "DONE-42"] {
            let n = count(&bytes, marker);
            if n != 1 {
                return Err(vm.fail(&format!("{name}: {marker} {n} times, not once")));
            }
        }
        // The kernel's own log once too: its banner (from earlycon) and a message it
        // printed after virtio_console (and so hvc0) came up.
        if count(&bytes, "Linux version") != 1 {
            return Err(vm.fail(&format!("{name}: the kernel banner is not there once")));
        }
        if contains(&bytes, b"unable to open an initial console") {
            return Err(vm.fail(&format!("{name}: the kernel had no console for init")));
        }
    }
    Ok(())
}

/// A KTAP document printed by a Linux guest (nested suite, a failure, skips) through
/// hvc0: `--junit` writes the cases, `--report` counts them, the run fails with 122.
fn ci_junit_from_a_linux_guest(ctx: &Ctx) -> Result<(), String> {
    let dir = Scratch::new("junit")?;
    let (junit, report) = (dir.path("results.xml"), dir.path("report.json"));
    let ktap = r"KTAP version 1\n1..2\n    KTAP version 1\n    # Subtest: suite_a\n    1..3\n    ok 1 a1\n    # a2: expected 1, got 2\n    not ok 2 a2\n    ok 3 a3 # SKIP no hw\nnot ok 1 suite_a\nok 2 b # SKIP later\n";
    let mvcmd = format!("mvcmd=\"printf '{ktap}'\"");
    let mut vm = ctx.spawn(&[
        "--junit",
        junit.to_str().ok_or("path")?,
        "--report",
        report.to_str().ok_or("path")?,
        "--cmdline",
        &mvcmd,
    ])?;
    vm.wait_for(INIT_MARK)?;
    vm.expect_exit(122)?;
    let xml = std::fs::read_to_string(&junit).map_err(|e| vm.fail(&format!("junit: {e}")))?;
    for want in [
        r#"<testsuites name="microvm" tests="4" failures="1" errors="0""#,
        r#"<testsuite name="ktap/suite_a" tests="3" failures="1" errors="0" skipped="1""#,
        r#"<failure message="not ok">a2: expected 1, got 2</failure>"#,
        r#"<skipped message="later"/>"#,
    ] {
        if !xml.contains(want) {
            return Err(vm.fail(&format!("junit lacks {want}:\n{xml}")));
        }
    }
    let text = std::fs::read_to_string(&report).map_err(|e| vm.fail(&format!("report: {e}")))?;
    let j: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    if j["exit"]["reason"] != "tests-failed"
        || j["tests"]["failures"] != 1
        || j["tests"]["skipped"] != 2
    {
        return Err(vm.fail(&format!("report: {text}")));
    }
    if !vm.stderr().contains("microvm: not ok: ktap/suite_a: a2") {
        return Err(vm.fail("stderr does not name the failed test"));
    }
    Ok(())
}

/// A guest that panics in the middle of its tests: the test that was running is an
/// error case holding the panic lines; the panic keeps its status (125).
fn ci_junit_error_case_for_a_panic_mid_test(ctx: &Ctx) -> Result<(), String> {
    let dir = Scratch::new("junitpanic")?;
    let junit = dir.path("results.xml");
    let mut vm = ctx.spawn(&[
        "--junit",
        junit.to_str().ok_or("path")?,
        "--cmdline",
        r#"mvcmd="printf 'KTAP version 1\n1..2\nok 1 before\n# crashing now\n'; echo c > /proc/sysrq-trigger""#,
    ])?;
    vm.wait_for(INIT_MARK)?;
    vm.expect_exit(125)?;
    let xml = std::fs::read_to_string(&junit).map_err(|e| vm.fail(&format!("junit: {e}")))?;
    let ok = xml.contains(r#"tests="2" failures="0" errors="1""#)
        && xml.contains(r#"<testcase name="test 2 (no result: guest kernel panic"#)
        && xml.contains("crashing now")
        && xml.contains("Kernel panic - not syncing");
    if !ok {
        return Err(vm.fail(&format!(
            "junit lacks the error case with the panic:\n{xml}"
        )));
    }
    Ok(())
}

/// A guest whose init runs busybox's getty: `--send-after` answers the login and
/// password prompts and types a command at the shell prompt.
fn ci_send_after_logs_in_at_getty(ctx: &Ctx) -> Result<(), String> {
    let dir = Scratch::new("login")?;
    let initrd = dir.path("login.cpio");
    // `openssl passwd -1 -salt microvm secret` (MD5-crypt; Debian's busybox has no
    // cryptpw): a password login must be answered, an empty one would not ask.
    let shadow = "root:$1$microvm$Pl6.lcslv/2z3rmaulM0E.:19000:0:99999:7:::\n";
    let init = "#!/bin/sh\n/bin/busybox --install -s /bin\nmount -t proc proc /proc\n\
                mount -t sysfs sysfs /sys\nmount -t devtmpfs devtmpfs /dev\nhostname mvlogin\n\
                setsid getty -L 115200 console vt100\npoweroff -f\n";
    build_initrd(
        &initrd,
        init,
        &[
            ("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
            ("/etc/shadow", shadow),
            ("/etc/group", "root:x:0:\n"),
        ],
        false,
    )?;
    let cmd = command(
        ctx,
        &ctx.kernel,
        &initrd,
        &[
            "--send-after",
            "login: ",
            r"root\n",
            "--send-after",
            "Password: ",
            r"secret\n",
            "--send-after",
            "# ",
            r"echo LOGGED-$((6*7)) as $(id -un); poweroff -f\n",
        ],
    );
    let mut vm = ctx.start(cmd, None)?;
    vm.wait_for("Password: ")?;
    vm.wait_for("LOGGED-42 as root")?;
    vm.expect_exit(0)
}

/// `microvm run` with a dynamically linked host program: its output on the console,
/// its exit status as microvm's: 0 with the virtio modules (output through hvc0), 3
/// without them (through the UART).
fn run_host_program_exit_status(ctx: &Ctx) -> Result<(), String> {
    let tprog = ci_example_dir().join("tprog");
    for (code, modules) in [(0, true), (3, false)] {
        let mut cmd = Command::new(&ctx.bin);
        cmd.arg("run")
            .arg("--kernel")
            .arg(&ctx.kernel)
            .args(&ctx.common_args);
        if modules {
            cmd.arg("--modules").arg(ci_example_dir());
        }
        cmd.arg("--")
            .arg(&tprog)
            .arg(code.to_string())
            .arg("two words")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut vm = ctx.start(cmd, None)?;
        // The program prints its stderr line after its stdout line: both are whole then.
        vm.wait_for("tprog: stderr too")?;
        let args = format!(
            r#"tprog: hello from {} with ["{code}", "two words"]"#,
            tprog.display()
        );
        if !vm.stdout().lines().any(|l| l == args) {
            return Err(vm.fail(&format!("no line {args:?}")));
        }
        vm.expect_exit(code)?;
        if count(&vm.output(), "tprog: hello from") != 1 {
            return Err(vm.fail("the program's line is not there once"));
        }
    }
    Ok(())
}

/// The ELF vmlinux inside Debian's bzImage (extracted here as scripts/extract-vmlinux
/// would) boots to init with the reference initramfs.
fn boot_elf_vmlinux(ctx: &Ctx) -> Result<(), String> {
    let dir = Scratch::new("elf")?;
    let vmlinux = dir.path("vmlinux");
    let elf = microvm::arch::x86_64::kernel_probe::extract_vmlinux(&ctx.kernel)
        .map_err(|e| format!("extracting vmlinux: {e}"))?
        .ok_or("the bzImage's compression is not one microvm reads")?;
    if !elf.starts_with(b"\x7fELF") {
        return Err("the extracted payload is not ELF".into());
    }
    std::fs::write(&vmlinux, elf).map_err(|e| e.to_string())?;
    let cmd = command(
        ctx,
        &vmlinux,
        &ctx.initrd,
        &["--cmdline", r#"mvcmd="echo ELF-$((6*7))""#],
    );
    let mut vm = ctx.start(cmd, None)?;
    vm.wait_for(INIT_MARK)?;
    vm.wait_for("ELF-42")?;
    vm.expect_exit(0)
}

/// A command line with no `virtio_mmio.device=` at all: Debian's kernel still finds the
/// virtio console, through the DSDT's LNRO0005 device, and hvc0 works.
fn boot_acpi_dsdt_alone_finds_virtio(ctx: &Ctx) -> Result<(), String> {
    let mut vm = ctx.spawn(&[
        "--cmdline-replace",
        "console=ttyS0 reboot=k panic=1 pci=off 8250.nr_uarts=1 quiet",
        "--cmdline",
        r#"mvcmd="n=0xd; grep -q @${n}0000000 /proc/cmdline || echo NOPARAM-$((1+1)); ls -d /sys/bus/acpi/devices/LNRO0005:* && test -c /dev/hvc0 && echo HVC-OK-$((1+1)) >/dev/hvc0""#,
    ])?;
    vm.wait_for(INIT_MARK)?;
    vm.wait_for("NOPARAM-2")?;
    vm.wait_for("HVC-OK-2")?;
    vm.expect_exit(0)
}
