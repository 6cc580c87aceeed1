//! `microvm run --kernel K [--include PATH]... [--modules DIR] -- PROGRAM ARGS`: a host
//! program as the workload of a fresh kernel, without a shared filesystem.
//!
//! The initramfs ([`crate::ci::initramfs`]) holds busybox (the host's, for the init script's
//! mounts, insmod and devmem), PROGRAM and every `--include`d path at their host paths
//! with their shared libraries, and, when the kernel has no virtio console built in and
//! `--modules` is given, virtio_mmio and virtio_console with their dependencies. It is
//! written to a memfd, which the loader reads like any initrd. The init script mounts
//! /proc, /sys, /dev and /tmp, loads the modules, runs PROGRAM with its stdio on hvc0
//! when there is one (else on the kernel's console), and writes its exit status to the
//! exit-code register, so microvm exits with it.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::ci::initramfs::{Initramfs, InitramfsError};

/// Where the host's busybox is looked for (after `$MICROVM_BUSYBOX`).
const BUSYBOX: &[&str] = &[
    "/bin/busybox",
    "/usr/bin/busybox",
    "/usr/sbin/busybox",
    "/sbin/busybox",
];
/// The modules the virtio console needs (dependencies are read from the modules).
const CONSOLE_MODULES: &[&str] = &["virtio_mmio", "virtio_console"];

/// Errors preparing `microvm run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// PROGRAM is not a file.
    #[error("microvm run: program {0} not found (give a path or a name in PATH)")]
    NoProgram(String),
    /// No busybox on the host.
    #[error(
        "microvm run needs busybox on the host for the guest's init (apt-get install busybox-static, or set MICROVM_BUSYBOX)"
    )]
    NoBusybox,
    /// Building the initramfs failed.
    #[error("microvm run: {0}")]
    Initramfs(#[from] InitramfsError),
    /// The memfd holding it could not be made.
    #[error("microvm run: cannot hold the initramfs in memory: {0}")]
    Memfd(std::io::Error),
}

impl RunError {
    /// True for a usage error (exit status 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, RunError::NoProgram(_))
    }
}

/// `s` quoted for the shell (single quotes).
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// PROGRAM as a path: as given when it has a `/`, else the first match in `PATH`.
fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn find_busybox() -> Option<PathBuf> {
    std::env::var_os("MICROVM_BUSYBOX")
        .map(PathBuf::from)
        .into_iter()
        .chain(BUSYBOX.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

/// The guest's /init for `argv` (the program as an absolute path first).
pub fn init_script(argv: &[String], lib_dirs: &[String], modules: bool) -> String {
    let cmd: Vec<String> = argv.iter().map(|a| quote(a)).collect();
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         # microvm run: the guest's init (written by microvm, see src/run_program.rs)\n\
         /bin/busybox mkdir -p /proc /sys /dev /tmp /root /bin /sbin /usr/bin /usr/sbin\n\
         /bin/busybox --install -s\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=linux\n\
         mount -t proc proc /proc; mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev 2>/dev/null; mount -t tmpfs tmpfs /tmp\n",
    );
    if !lib_dirs.is_empty() {
        s += &format!("export LD_LIBRARY_PATH={}\n", quote(&lib_dirs.join(":")));
    }
    if modules {
        s += "while read -r m; do\n    \
              insmod \"/lib/modules/microvm/$m\" || echo \"microvm run: insmod $m failed\" >&2\n\
              done </lib/modules/microvm/order\n";
    }
    s += "devmem 0xc0000001 8 1 2>/dev/null\ncd /\n";
    s += &format!(
        "if [ -c /dev/hvc0 ]; then\n    {cmd} </dev/hvc0 >/dev/hvc0 2>&1\nelse\n    {cmd}\nfi\n",
        cmd = cmd.join(" ")
    );
    s += "status=$?\n\
          devmem 0xc0000000 8 \"$status\" || echo \"microvm run: cannot write the exit-code register (/dev/mem); exit status $status lost\" >&2\n\
          poweroff -f\n";
    s
}

/// A memfd holding `data`, and its path for the loader (`/proc/self/fd/N`).
fn memfd(data: &[u8]) -> Result<(OwnedFd, PathBuf), RunError> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"microvm-initramfs".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(RunError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(owned);
    f.write_all(data).map_err(RunError::Memfd)?;
    Ok((
        OwnedFd::from(f),
        PathBuf::from(format!("/proc/self/fd/{fd}")),
    ))
}

/// The initramfs that runs `program` (its path or name first, then its arguments) with
/// the `include`d paths, and with the console's modules from `modules` when given: a
/// memfd, and its path for the loader (keep the fd open until the VM is built).
pub fn initramfs(
    program: &[String],
    include: &[PathBuf],
    modules: Option<&Path>,
) -> Result<(OwnedFd, PathBuf), RunError> {
    let name = program.first().map(String::as_str).unwrap_or_default();
    let path = find_program(name).ok_or_else(|| RunError::NoProgram(name.to_string()))?;
    let path = std::path::absolute(&path).map_err(|_| RunError::NoProgram(name.to_string()))?;
    let busybox = find_busybox().ok_or(RunError::NoBusybox)?;
    let mut fs = Initramfs::new();
    fs.file("/bin/busybox", &busybox)?;
    let mut lib_dirs = std::collections::BTreeSet::new();
    lib_dirs.extend(fs.include(&busybox)?);
    lib_dirs.extend(fs.include(&path)?);
    for p in include {
        lib_dirs.extend(fs.include(p)?);
    }
    if let Some(dir) = modules {
        fs.modules(dir, CONSOLE_MODULES)?;
    }
    let mut argv = vec![path.to_string_lossy().into_owned()];
    argv.extend(program.iter().skip(1).cloned());
    let dirs: Vec<String> = lib_dirs.into_iter().collect();
    fs.file_from_bytes(
        "/init",
        init_script(&argv, &dirs, modules.is_some()).into_bytes(),
        0o755,
    );
    memfd(&fs.to_cpio()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_script() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        let s = init_script(
            &["/x/prog".into(), "a b".into(), "$HOME".into()],
            &["/lib".into()],
            true,
        );
        assert!(
            s.contains("'/x/prog' 'a b' '$HOME' </dev/hvc0 >/dev/hvc0 2>&1"),
            "{s}"
        );
        assert!(s.contains("export LD_LIBRARY_PATH='/lib'"), "{s}");
        assert!(s.contains("insmod \"/lib/modules/microvm/$m\""), "{s}");
        assert!(s.contains("devmem 0xc0000000 8 \"$status\""), "{s}");
        let s = init_script(&["/x".into()], &[], false);
        assert!(
            !s.contains("insmod") && !s.contains("LD_LIBRARY_PATH"),
            "{s}"
        );
    }

    #[test]
    fn programs_are_found_by_path_or_name() {
        assert!(find_program("sh").is_some());
        assert!(find_program("/nonexistent/prog").is_none());
        assert!(find_program("no-such-program-here").is_none());
    }
}
