//! What the boot cases need besides the binary: where the reference guest and the CI
//! example are, and preparing them (on the host, before the cases run or the rig boots).

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::cache_dir;
use crate::common::proc::MICROVM;

/// The reference guest: `$MICROVM_CACHE/guest` (scripts/guest.sh).
pub fn cache_guest_dir() -> PathBuf {
    cache_dir().join("guest")
}

/// The binary under test: `MICROVM_BIN`, else the one cargo built.
pub fn microvm_bin() -> PathBuf {
    env::var_os("MICROVM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(MICROVM))
}

pub fn script(name: &str) -> PathBuf {
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
pub fn prepare_ci_example() -> Vec<PathBuf> {
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
pub fn prepare_run_guests(dir: &Path) -> Vec<PathBuf> {
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
pub fn prepare_guest_on_host() {
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
