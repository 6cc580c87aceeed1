//! The real binary's command line: every bad input gets one clear line on stderr and the
//! documented exit status (2 usage, 1 runtime), with no panic and no hang.

use std::path::PathBuf;
use std::process::Command;

const MICROVM: &str = env!("CARGO_BIN_EXE_microvm");

struct Out {
    code: i32,
    stderr: String,
    stdout: String,
}

fn microvm(args: &[&str]) -> Out {
    microvm_env(args, &[])
}

fn microvm_env(args: &[&str], env: &[(&str, &str)]) -> Out {
    let out = Command::new(MICROVM)
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
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
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    // clap's usage errors add a usage hint; ours are exactly one line.
    if o.stderr.starts_with("microvm:") {
        assert_eq!(lines.len(), 1, "{}", o.stderr);
    }
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("microvm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A syntactically valid 64-bit bzImage header with a tiny payload: enough for the loader
/// to place it, so that the checks after loading (initrd, command line) can be reached.
fn fake_bzimage() -> PathBuf {
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
    let p = tmp("fake-bzImage");
    std::fs::write(&p, img).unwrap();
    p
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
    let empty = tmp("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_error(&microvm(&["--kernel", empty.to_str().unwrap()]), 1, "empty");
    let garbage = tmp("garbage");
    std::fs::write(&garbage, vec![0x5au8; 65536]).unwrap();
    assert_error(
        &microvm(&["--kernel", garbage.to_str().unwrap()]),
        1,
        "no bzImage header",
    );
    let elf = tmp("elf");
    std::fs::write(&elf, b"\x7fELF\x02\x01\x01\0truncated").unwrap();
    assert_error(&microvm(&["--kernel", elf.to_str().unwrap()]), 1, "ELF");
}

#[test]
fn initrd_larger_than_memory() {
    let k = fake_bzimage();
    let rd = tmp("big-initrd");
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
