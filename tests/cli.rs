//! Host tier (docs/TESTING.md): the real binary's command line. Every bad input gets one
//! clear line on stderr and the documented exit status (2 usage, 1 runtime), with no
//! panic and no hang; the runs that reach console set-up use a tiny real-mode guest.

mod common;

use common::TIMEOUT;
use common::fs::{mkfifo, tmp_path, tmpdir};
use common::proc::MICROVM;
use common::tiny::poweroff_image;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Out {
    code: i32,
    stderr: String,
    stdout: String,
}

fn microvm(args: &[&str]) -> Out {
    microvm_env(args, &[])
}

fn microvm_env(args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(MICROVM);
    cmd.args(args).envs(env.iter().copied());
    run_out(cmd)
}

/// Runs `cmd` (stdin /dev/null) and fails the test if it does not end within
/// [`TIMEOUT`]: no bad input may make microvm hang.
fn run_out(cmd: Command) -> Out {
    let r = common::proc::run_bounded(cmd, None, TIMEOUT);
    Out {
        code: r.status,
        stderr: r.stderr,
        stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
    }
}

/// Asserts a one-line error containing `needle` and exit status `code`.
fn assert_error(o: &Out, code: i32, needle: &str) {
    assert_eq!(o.code, code, "stderr: {}", o.stderr);
    assert!(
        o.stderr.contains(needle),
        "expected '{needle}' in: {}",
        o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    let lines = common::lines(&o.stderr);
    // clap's usage errors add a usage hint; ours are exactly one line.
    if o.stderr.starts_with("microvm:") {
        assert_eq!(lines.len(), 1, "{}", o.stderr);
    }
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A syntactically valid 64-bit bzImage header with a tiny payload: enough for the loader
/// to place it, so that the checks after loading (initrd, command line) can be reached.
fn fake_bzimage() -> PathBuf {
    let p = tmp_path("fake-bzImage");
    std::fs::write(&p, fake_bzimage_bytes()).unwrap();
    p
}

fn fake_bzimage_bytes() -> Vec<u8> {
    let mut img = vec![0u8; 5 * 512 + 4096];
    img[0x1f1] = 4; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    img[0x238..0x23c].copy_from_slice(&255u32.to_le_bytes()); // cmdline_size
    img[0x260..0x264].copy_from_slice(&(4u32 << 20).to_le_bytes()); // init_size
    img
}

#[test]
fn help_shows_examples_and_exit_statuses() {
    let o = microvm(&["--help"]);
    assert_eq!(o.code, 0);
    assert!(o.stdout.contains("Examples:"));
    assert!(o.stdout.contains("125 guest kernel panic"));
    assert!(o.stdout.contains("--console"));
}

#[test]
fn kernel_is_required() {
    assert_error(&microvm(&[]), 2, "--kernel");
}

#[test]
fn bad_vcpus() {
    assert_error(&microvm(&["--kernel", "k", "--vcpus", "0"]), 2, "--vcpus");
    assert_error(&microvm(&["--kernel", "k", "--vcpus", "255"]), 2, "--vcpus");
    assert_error(&microvm(&["--kernel", "k", "--vcpus", "two"]), 2, "--vcpus");
}

#[test]
fn bad_vcpu_affinity() {
    for bad in ["x", "3-1", "100000", ""] {
        assert_error(
            &microvm(&["--kernel", "k", "--vcpu-affinity", bad]),
            2,
            "--vcpu-affinity",
        );
    }
}

#[test]
fn bad_memory() {
    assert_error(
        &microvm(&["--kernel", "k", "--memory", "0"]),
        2,
        "too small",
    );
    assert_error(
        &microvm(&["--kernel", "k", "--memory", "1.5G"]),
        2,
        "invalid size '1.5G'",
    );
    assert_error(
        &microvm(&["--kernel", "k", "--memory", "64M1"]),
        2,
        "invalid size",
    );
    assert_error(
        &microvm(&["--kernel", "k", "--memory", "100T"]),
        2,
        "more than this host",
    );
    assert_error(
        &microvm(&["--kernel", "k", "--memory", "65537K"]),
        2,
        "multiple of 4K",
    );
}

#[test]
fn missing_unreadable_and_garbage_kernels() {
    assert_error(
        &microvm(&["--kernel", "/nonexistent/bzImage"]),
        1,
        "cannot read kernel /nonexistent/bzImage",
    );
    let dir = std::env::temp_dir();
    assert_error(
        &microvm(&["--kernel", dir.to_str().unwrap()]),
        1,
        "not a regular file",
    );
    let empty = tmp_path("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_error(&microvm(&["--kernel", empty.to_str().unwrap()]), 1, "empty");
    let garbage = tmp_path("garbage");
    std::fs::write(&garbage, vec![0x5au8; 65536]).unwrap();
    assert_error(
        &microvm(&["--kernel", garbage.to_str().unwrap()]),
        1,
        "no bzImage header",
    );
    let elf = tmp_path("elf");
    std::fs::write(&elf, b"\x7fELF\x02\x01\x01\0truncated").unwrap();
    assert_error(&microvm(&["--kernel", elf.to_str().unwrap()]), 1, "ELF");
}

#[test]
fn paths_with_control_characters_stay_on_one_line() {
    let o = microvm(&["--kernel", "/nonexistent/a\nb\x1b[2J"]);
    assert_error(&o, 1, "cannot read kernel /nonexistent/a\\nb\\u{1b}[2J");
}

#[test]
fn initrd_larger_than_memory() {
    let k = fake_bzimage();
    let rd = tmp_path("big-initrd");
    std::fs::write(&rd, vec![0u8; 40 << 20]).unwrap();
    let o = microvm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        rd.to_str().unwrap(),
        "--memory",
        "32M",
    ]);
    assert_error(&o, 2, "raise --memory");
    std::fs::remove_file(rd).unwrap();
    let o = microvm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_error(&o, 1, "cannot read initrd /nonexistent/initrd");
}

#[test]
fn command_line_too_long() {
    let k = fake_bzimage();
    let long = "x".repeat(300);
    let o = microvm(&["--kernel", k.to_str().unwrap(), "--cmdline-replace", &long]);
    assert_error(&o, 2, "this kernel accepts at most 255");
}

#[test]
fn missing_kvm_device() {
    let o = microvm_env(
        &["--kernel", "k"],
        &[("MICROVM_KVM_DEVICE", "/nonexistent/kvm")],
    );
    assert_error(&o, 1, "cannot open /nonexistent/kvm");
}

#[test]
fn wrong_types_missing_values_and_unknown_options() {
    for args in [
        &["--kernel", "k", "--memory"][..],
        &["--kernel", "k", "--vcpus", "1.5"],
        &["--kernel", "k", "--vcpus", "-1"],
        &["--kernel", "k", "--console"],
        &["--kernel"],
        &["--kernel", "k", "--no-such-option"],
        &["--kernel", "k", "--no-virtio-console=yes"],
        &["attach"],
    ] {
        let o = microvm(args);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(o.stderr.starts_with("error:"), "{args:?}: {}", o.stderr);
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    }
}

#[test]
fn conflicting_options() {
    let o = microvm(&["--real-mode-image", "x", "--initrd", "y"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("cannot be used with"), "{}", o.stderr);
    let o = microvm(&["--kernel", "k", "attach", "/tmp/s.sock"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
}

#[test]
fn bad_console_specs_are_usage_errors() {
    let long = format!("sock=/tmp/{}", "x".repeat(120));
    for (opt, spec, needle) in [
        (
            "--console",
            "mux:stdio,bogus",
            "unknown console backend 'bogus'",
        ),
        ("--console", "", "empty console spec"),
        ("--console", "mux:", "empty console spec"),
        ("--serial", "  ", "empty console spec"),
        (
            "--console",
            "mux:stdio,stdio",
            "duplicate console backend 'stdio'",
        ),
        ("--console", "stdio,ring", "need the 'mux:' prefix"),
        ("--console", "ring=0", "bad size '0'"),
        ("--console", "sock:max-clients=0", "max-clients=0"),
        ("--console", "sock:mode=999", "mode=999"),
        ("--console", "tcp=nowhere:1", "bad tcp address"),
        (
            "--console",
            "mux:stdio,tcp=127.0.0.1:4444",
            "a tcp console needs authentication",
        ),
        ("--console", "sock:insecure", "insecure is for tcp"),
        ("--console", &long, "is too long (125 bytes, at most 107)"),
        // Control characters are shown escaped: still one line.
        (
            "--console",
            "mux:stdio,bo\ngus\x1b[2J",
            "unknown console backend 'bo\\ngus\\u{1b}[2J'",
        ),
    ] {
        let o = microvm(&["--kernel", "k", opt, spec]);
        assert_error(&o, 2, needle);
        assert!(
            o.stderr.starts_with(&format!("microvm: {opt} ")),
            "{}",
            o.stderr
        );
    }
}

#[test]
fn stdio_on_two_consoles_is_a_usage_error() {
    let d = tmpdir("stdio2");
    let img = poweroff_image(&d);
    let o = microvm(&[
        "--real-mode-image",
        img.to_str().unwrap(),
        "--console",
        "stdio",
        "--serial",
        "mux:ring,stdio",
    ]);
    assert_error(&o, 2, "stdio is already used by another console");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn kernel_fifo_device_and_directory_do_not_hang() {
    let d = tmpdir("fifo");
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    for args in [
        &["--kernel", f][..],
        &["--kernel", "/dev/zero"],
        &["--kernel", "/dev/null"],
        &["--kernel", d.to_str().unwrap()],
        &["--real-mode-image", f],
        &["--real-mode-image", "/dev/zero"],
    ] {
        assert_error(&microvm(args), 1, "not a regular file");
    }
    let k = fake_bzimage();
    for rd in [f, "/dev/zero"] {
        let o = microvm(&["--kernel", k.to_str().unwrap(), "--initrd", rd]);
        assert_error(&o, 1, "not a regular file");
    }
    let _ = std::fs::remove_dir_all(d);
}

/// Runs microvm as user `nobody` (when the tests run as root, as CI does) or as is. As
/// `nobody` it runs a copy in `dir` (0755): the build tree may not be reachable for it.
fn as_unprivileged(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Out {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let bin = if root {
        let copy = dir.join("microvm");
        if !copy.exists() {
            std::fs::copy(MICROVM, &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        copy
    } else {
        PathBuf::from(MICROVM)
    };
    let mut cmd = Command::new(bin);
    cmd.args(args).envs(env.iter().copied());
    if root {
        cmd.uid(65534).gid(65534);
    }
    run_out(cmd)
}

#[test]
fn unreadable_kernel_and_no_permission_on_kvm() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let d = tmpdir("perm");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    // No permission on the KVM device: the real /dev/kvm for an unprivileged user when it
    // is root-only (as on the project's machines), else a device path nobody may open.
    let kvm_mode = std::fs::metadata("/dev/kvm").map(|m| m.permissions().mode() & 0o006);
    let denied = d.join("kvm-denied");
    std::fs::write(&denied, b"").unwrap();
    std::fs::set_permissions(&denied, std::fs::Permissions::from_mode(0o000)).unwrap();
    let env: Vec<(&str, &str)> = if root && kvm_mode.is_ok_and(|m| m == 0) {
        vec![]
    } else {
        vec![("MICROVM_KVM_DEVICE", denied.to_str().unwrap())]
    };
    let o = as_unprivileged(&d, &["--kernel", "k"], &env);
    assert_error(&o, 1, "Permission denied");
    assert!(o.stderr.contains("cannot open"), "{}", o.stderr);

    // An unreadable kernel, past a KVM device the user may open.
    let kernel = d.join("bzImage");
    std::fs::write(&kernel, fake_bzimage_bytes()).unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut env = Vec::new();
    let node = d.join("kvm");
    if root {
        // A KVM device node of our own that the unprivileged user may open.
        let c = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
        // SAFETY: mknod with a valid path; 10:232 is /dev/kvm.
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(10, 232)) };
        assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o666)).unwrap();
        env.push(("MICROVM_KVM_DEVICE", node.to_str().unwrap()));
    }
    let o = as_unprivileged(&d, &["--kernel", kernel.to_str().unwrap()], &env);
    assert_error(&o, 1, "cannot read kernel");
    assert!(o.stderr.contains("Permission denied"), "{}", o.stderr);
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn truncated_and_empty_kernels() {
    let d = tmpdir("trunc");
    let mut bz = fake_bzimage_bytes();
    bz[0x1f4..0x1f8].copy_from_slice(&(4096u32 / 16).to_le_bytes()); // syssize
    let elf_header = {
        let mut h = vec![0u8; 64];
        h[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\0");
        h[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        h[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86_64
        h[20..24].copy_from_slice(&1u32.to_le_bytes());
        h[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // entry
        h[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        h[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        h[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        h[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        h
    };
    let mut elf_past_eof = elf_header.clone();
    let mut ph = vec![0u8; 56];
    ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset, past the end
    ph[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // paddr
    ph[32..40].copy_from_slice(&0x10_0000u64.to_le_bytes()); // filesz
    ph[40..48].copy_from_slice(&0x10_0000u64.to_le_bytes()); // memsz
    elf_past_eof.extend_from_slice(&ph);
    for (name, bytes, needle) in [
        ("bz-empty", Vec::new(), "the file is empty"),
        ("bz-header-cut", bz[..0x203].to_vec(), "no bzImage header"),
        ("bz-setup-cut", bz[..0x300].to_vec(), "bzImage"),
        (
            "bz-no-kernel",
            bz[..5 * 512].to_vec(),
            "truncated: no kernel after the setup code",
        ),
        (
            "bz-kernel-cut",
            bz[..5 * 512 + 2000].to_vec(),
            "truncated: 2000 bytes of kernel",
        ),
        ("elf-magic-only", b"\x7fELF".to_vec(), "ELF"),
        ("elf-header-only", elf_header.clone(), "ELF"),
        ("elf-segment-past-eof", elf_past_eof, "ELF"),
    ] {
        let p = d.join(name);
        std::fs::write(&p, &bytes).unwrap();
        let o = microvm(&["--kernel", p.to_str().unwrap(), "--memory", "64M"]);
        assert_error(&o, 1, needle);
        assert!(
            o.stderr.contains("not a loadable x86_64"),
            "{name}: {}",
            o.stderr
        );
    }
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn odd_memory_sizes() {
    for (size, needle) in [
        ("15M", "too small"),
        ("16383K", "too small"),
        ("16777217B", "not a multiple of 4K"),
        ("16384B", "too small"),
        ("6\n4M", "invalid size '6\\n4M'"),
        ("-64M", "invalid size"),
        ("0x100M", "invalid size"),
        ("64 M", "invalid size"),
        ("1e3M", "invalid size"),
        ("", "invalid size"),
        ("99999999999999999999", "invalid size"),
        ("20000000T", "invalid size"),
    ] {
        let arg = format!("--memory={size}");
        assert_error(&microvm(&["--kernel", "k", &arg]), 2, needle);
    }
}

#[test]
fn socket_path_refusals_leave_files_alone() {
    let d = tmpdir("sockpath");
    let img = poweroff_image(&d);
    let img = img.to_str().unwrap();
    let precious = d.join("precious.txt");
    std::fs::write(&precious, b"keep me").unwrap();
    let o = microvm(&[
        "--real-mode-image",
        img,
        "--console",
        &format!("sock={}", precious.display()),
    ]);
    assert_error(&o, 1, "exists and is not a socket (refusing to touch it)");
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    let o = microvm(&[
        "--real-mode-image",
        img,
        "--console",
        &format!("sock={}/no/dir.sock", d.display()),
    ]);
    assert_error(&o, 1, "does not exist");
    assert_eq!(listing(&d), ["poweroff.bin", "precious.txt"]);
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn failed_starts_leave_no_file_behind() {
    let d = tmpdir("noleft");
    let img = poweroff_image(&d);
    let precious = d.join("precious.txt");
    std::fs::write(&precious, b"keep me").unwrap();
    let sock = d.join("c.sock");
    let log = d.join("console.log");
    // The kernel is refused before any console exists.
    let spec = format!("mux:sock={},file={}", sock.display(), log.display());
    assert_error(
        &microvm(&["--kernel", "/nonexistent/k", "--console", &spec]),
        1,
        "cannot read kernel",
    );
    // A later backend fails: the socket and the log made before it are removed.
    let spec = format!(
        "mux:sock={},file={},sock={}",
        sock.display(),
        log.display(),
        precious.display()
    );
    let o = microvm(&[
        "--real-mode-image",
        img.to_str().unwrap(),
        "--console",
        &spec,
    ]);
    assert_error(&o, 1, "not a socket");
    let spec = format!("mux:file={},file={}/no/dir.log", log.display(), d.display());
    let o = microvm(&[
        "--real-mode-image",
        img.to_str().unwrap(),
        "--console",
        &spec,
    ]);
    assert_error(&o, 1, "does not exist");
    assert_eq!(listing(&d), ["poweroff.bin", "precious.txt"]);
    // A run that starts and ends leaves its log, and removes its socket.
    let spec = format!("mux:sock={},file={}", sock.display(), log.display());
    let o = microvm(&[
        "--real-mode-image",
        img.to_str().unwrap(),
        "--console",
        &spec,
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(listing(&d), ["console.log", "poweroff.bin", "precious.txt"]);
    let _ = std::fs::remove_dir_all(d);
}

/// `--print-default-cmdline` prints the line microvm would boot with: hvc0 as the console
/// for a kernel with virtio_console built in (and without `--kernel`), the UART for one
/// without it (here: garbage, which tells nothing) or with `--no-virtio-console`; a
/// console in `--cmdline` is the only one; `--cmdline-replace` is exact. Scripts comparing
/// VMMs (`make bench`) rely on it.
#[test]
fn print_default_cmdline_follows_the_console_setup() {
    let with = microvm(&["--print-default-cmdline"]);
    assert_eq!(with.code, 0, "{}", with.stderr);
    assert!(
        with.stdout
            .starts_with("earlycon=uart8250,io,0x3f8 console=hvc0 "),
        "{}",
        with.stdout
    );
    let without = microvm(&["--print-default-cmdline", "--no-virtio-console"]);
    assert_eq!(without.code, 0, "{}", without.stderr);
    assert!(
        without.stdout.starts_with("console=ttyS0 ") && !without.stdout.contains("hvc0"),
        "{}",
        without.stdout
    );
    let d = tmpdir("printcmdline");
    let k = d.join("garbage");
    std::fs::write(&k, vec![0x5a; 4096]).unwrap();
    let k = k.to_str().unwrap();
    let unknown = microvm(&["--print-default-cmdline", "--kernel", k]);
    assert!(
        unknown
            .stdout
            .starts_with("earlycon=uart8250,io,0x3f8 console=ttyS0 ")
            && unknown
                .stdout
                .trim_end()
                .ends_with(" virtio_mmio.device=4K@0xd0000000:5"),
        "{}",
        unknown.stdout
    );
    let own = microvm(&[
        "--print-default-cmdline",
        "--kernel",
        k,
        "--cmdline",
        "console=hvc0",
    ]);
    assert_eq!(own.stdout.matches("console=").count(), 1, "{}", own.stdout);
    let exact = microvm(&[
        "--print-default-cmdline",
        "--cmdline-replace",
        "a=1",
        "--cmdline",
        "b=2",
    ]);
    assert_eq!(exact.stdout, "a=1 b=2\n");
    let _ = std::fs::remove_dir_all(d);
}

/// Bad `--send-after` values: an empty pattern, an unknown escape, a missing TEXT, too
/// much text; each a usage error in one line naming the step.
#[test]
fn bad_send_after_steps_are_usage_errors() {
    let k = "/nonexistent-kernel";
    let o = microvm(&["--kernel", k, "--send-after", "", "x"]);
    assert_error(&o, 2, "--send-after '' ...: empty pattern");
    let o = microvm(&["--kernel", k, "--send-after", "login: ", r"root\q"]);
    assert_error(
        &o,
        2,
        r#"--send-after "login: " "root\\q": unknown escape \q"#,
    );
    let o = microvm(&["--kernel", k, "--send-after", "login: "]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    let big = "x".repeat(40 << 10);
    let o = microvm(&[
        "--kernel",
        k,
        "--send-after",
        "a",
        &big,
        "--send-after",
        "b",
        &big,
    ]);
    assert_error(
        &o,
        2,
        "--send-after: 81920 bytes of text in all; at most 65536",
    );
}

/// `--junit` in a missing directory or naming a directory: a usage error at start.
#[test]
fn junit_path_is_checked_at_start() {
    let o = microvm(&[
        "--kernel",
        "/nonexistent-kernel",
        "--junit",
        "/nonexistent-dir/j.xml",
    ]);
    assert_error(
        &o,
        2,
        "--junit /nonexistent-dir/j.xml: directory /nonexistent-dir does not exist",
    );
    let o = microvm(&["--kernel", "/nonexistent-kernel", "--junit", "/tmp"]);
    assert_error(&o, 2, "--junit /tmp: is a directory");
}

#[test]
fn console_values_over_their_ceilings_are_usage_errors() {
    let d = tmpdir("ceilings");
    let img = poweroff_image(&d);
    for (spec, needle) in [
        ("ring=100G", "ring size too large (at most 256M)"),
        (
            "sock=/tmp/x.sock:queue=18446744073709551615",
            "queue size too large",
        ),
        ("sock=/tmp/x.sock:max-clients=5000", "from 1 to 1024"),
    ] {
        let o = microvm(&[
            "--real-mode-image",
            img.to_str().unwrap(),
            "--console",
            spec,
        ]);
        assert_error(&o, 2, needle);
    }
    let _ = std::fs::remove_dir_all(d);
}

/// max-clients is checked against the open-file limit before anything starts, with the
/// way out in the message (the old hub accepted it and then spun on EMFILE).
#[test]
fn max_clients_beyond_the_open_file_limit_is_refused_at_start() {
    let d = tmpdir("nofile");
    let img = poweroff_image(&d);
    let sock = d.join("c.sock");
    let mut cmd = Command::new(MICROVM);
    cmd.args([
        "--real-mode-image",
        img.to_str().unwrap(),
        "--console",
        &format!("sock={}:max-clients=200", sock.display()),
    ]);
    // SAFETY: setrlimit is async-signal-safe; the child only sets its own limit.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 48,
                rlim_max: 48,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = run_out(cmd);
    assert_error(&o, 2, "ulimit -n");
    assert!(o.stderr.contains("max-clients"), "{}", o.stderr);
    assert!(!sock.exists(), "no socket was created");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn console_log_fifo_without_a_reader_fails_at_once() {
    let d = tmpdir("logfifo");
    let img = poweroff_image(&d);
    let fifo = d.join("log.fifo");
    mkfifo(&fifo);
    let o = microvm(&[
        "--real-mode-image",
        img.to_str().unwrap(),
        "--console",
        &format!("mux:stdio,file={}", fifo.display()),
    ]);
    assert_error(&o, 1, "is a FIFO with no reader; start its reader first");
    let _ = std::fs::remove_dir_all(d);
}

/// `microvm run` with bad input: no program, a program that does not exist, `--initrd`
/// (the initramfs is built), modules missing from `--modules`; one line each, 2 for
/// usage errors and 1 for the missing module (the host's files).
#[test]
fn run_subcommand_bad_input() {
    let d = tmpdir("run");
    let k = d.join("kernel");
    std::fs::write(&k, vec![0x5a; 4096]).unwrap();
    let k = k.to_str().unwrap();
    let o = microvm(&["run", "--kernel", k]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    let o = microvm(&["run", "--kernel", k, "--", "/nonexistent/prog"]);
    assert_error(&o, 2, "microvm run: program /nonexistent/prog not found");
    let o = microvm(&["run", "--kernel", k, "--initrd", k, "--", "sh"]);
    assert_error(&o, 2, "microvm run builds its own initramfs; drop --initrd");
    let empty = d.join("modules");
    std::fs::create_dir_all(&empty).unwrap();
    let o = microvm(&[
        "run",
        "--kernel",
        k,
        "--modules",
        empty.to_str().unwrap(),
        "--",
        "sh",
    ]);
    assert_error(
        &o,
        1,
        "microvm run: module virtio_mmio not found under --modules",
    );
    let o = microvm(&["run", "--kernel", k, "--vcpus", "0", "--", "sh"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    let _ = std::fs::remove_dir_all(d);
}
