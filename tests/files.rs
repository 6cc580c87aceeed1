//! Host tier (docs/TESTING.md): the files the real binary makes, and what another local
//! user could plant there (docs/SECURITY.md's threat model): the default socket in a
//! private runtime directory, a stale socket from a killed run reclaimed, planted
//! symbolic links at the report, its temporary name, a log or a socket path changing
//! nothing outside microvm's own files (umask 000 included).

mod common;

use common::fs::tmpdir;
use common::lines;
use common::net::{connect, read_until};
use common::tiny::{echo_guest, hello_guest};
use common::vmm::{Vmm, run_with};
use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn stale_socket_from_a_killed_run_is_reclaimed() {
    let d = tmpdir("stale");
    let sock = d.join("c.sock");
    let spec = format!("mux:stdio,sock={}", sock.display());
    let args = ["--console", spec.as_str()];
    let mut first = Vmm::start(
        "stale1",
        &echo_guest(),
        &args,
        Stdio::piped(),
        Stdio::piped(),
    );
    first.wait_for("socket", |_| sock.exists());
    first.signal(libc::SIGKILL);
    first.wait();
    assert!(sock.exists(), "a killed run leaves its socket file");
    let mut second = Vmm::start(
        "stale2",
        &echo_guest(),
        &args,
        Stdio::piped(),
        Stdio::piped(),
    );
    second.wait_for("stale socket notice", |v| {
        v.stderr().contains("removed stale console socket")
    });
    let mut c = connect(&sock);
    c.write_all(b"ok q").unwrap();
    read_until(&mut c, "ok q");
    let st = second.wait();
    assert_eq!(st.code(), Some(0), "stderr {}", second.stderr());
    assert!(!sock.exists());
    let _ = std::fs::remove_dir_all(d);
}

/// The report of a run with `--console mux:stdio,sock` (default path).
fn run_default_socket(runtime: &std::path::Path, report: &std::path::Path) -> Vmm {
    let runtime = runtime.to_path_buf();
    Vmm::spawn(
        "default-sock",
        &echo_guest(),
        &[
            "--console",
            "mux:stdio,sock",
            "--report",
            report.to_str().unwrap(),
        ],
        Stdio::piped(),
        Stdio::piped(),
        true,
        move |c| {
            c.env("XDG_RUNTIME_DIR", runtime);
        },
    )
}

#[test]
fn default_socket_lives_in_a_private_runtime_dir_never_a_shared_one() {
    use std::os::unix::fs::PermissionsExt;
    let d = tmpdir("runtime");
    // A directory anyone may write (like /tmp): microvm makes its own private one in it.
    let shared = d.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let report = d.join("r.json");
    let mut vm = run_default_socket(&shared, &report);
    vm.wait_for("the socket's path", |v| {
        v.stderr().contains("console socket: ")
    });
    let err = vm.stderr();
    let path = err
        .lines()
        .find_map(|l| l.split("console socket: ").nth(1))
        .unwrap()
        .trim()
        .to_string();
    let private = shared.join("microvm");
    assert!(path.starts_with(private.to_str().unwrap()), "{path}");
    let m = std::fs::symlink_metadata(&private).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.permissions().mode() & 0o777, 0o700);
    assert!(std::path::Path::new(&format!("{path}.lock")).exists());
    let mut c = connect(std::path::Path::new(&path));
    c.write_all(b"q").unwrap();
    assert_eq!(vm.wait().code(), Some(0), "stderr {}", vm.stderr());
    let j = std::fs::read_to_string(&report).unwrap();
    assert!(j.contains(&format!("\"name\": \"{path}\"")), "{j}");
    assert!(!std::path::Path::new(&path).exists());
    assert!(!std::path::Path::new(&format!("{path}.lock")).exists());

    // That directory opened up to others, or replaced by a link: refused, nothing bound.
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut vm = run_default_socket(&shared, &report);
    assert_eq!(vm.wait().code(), Some(1), "stderr {}", vm.stderr());
    let err = vm.stderr();
    assert_eq!(lines(&err).len(), 1, "{err}");
    assert!(err.contains("has mode 0777"), "{err}");
    assert_eq!(std::fs::read_dir(&private).unwrap().count(), 0);
    std::fs::remove_dir(&private).unwrap();
    let elsewhere = d.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &private).unwrap();
    let mut vm = run_default_socket(&shared, &report);
    assert_eq!(vm.wait().code(), Some(1), "stderr {}", vm.stderr());
    assert!(
        vm.stderr().contains("is a symbolic link"),
        "{}",
        vm.stderr()
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(d);
}

/// In the child, before exec: umask 000, and a symlink to `victim` at `prefix` + the
/// child's own pid (where microvm used to put its report's temporary file). No
/// allocation between fork and exec: the path is built in a stack buffer.
fn plant_in_child(cmd: &mut Command, victim: &std::path::Path, prefix: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let victim = std::ffi::CString::new(victim.as_os_str().as_bytes()).unwrap();
    let prefix = prefix.as_os_str().as_bytes().to_vec();
    assert!(prefix.len() < 200);
    // SAFETY: the closure only calls async-signal-safe functions (getpid, umask,
    // symlink) on stack buffers and data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(0);
            let mut buf = [0u8; 256];
            buf[..prefix.len()].copy_from_slice(&prefix);
            let mut n = prefix.len();
            let mut digits = [0u8; 12];
            let mut pid = libc::getpid() as u32;
            let mut k = digits.len();
            loop {
                k -= 1;
                digits[k] = b'0' + (pid % 10) as u8;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            for &b in &digits[k..] {
                buf[n] = b;
                n += 1;
            }
            libc::symlink(victim.as_ptr(), buf.as_ptr().cast());
            Ok(())
        });
    }
}

#[test]
fn planted_symlinks_change_nothing_outside_microvms_files() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let d = tmpdir("symlinks");
    let victim = d.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The report itself and its old predictable temporary name are links to the victim;
    // the umask is 000.
    let report = d.join("r.json");
    symlink(&victim, &report).unwrap();
    let mut vm = Vmm::spawn(
        "symlink-report",
        &hello_guest("hi\n"),
        &["--report", report.to_str().unwrap()],
        Stdio::null(),
        Stdio::piped(),
        true,
        |c| plant_in_child(c, &victim, &d.join(".r.json.tmp-")),
    );
    assert_eq!(vm.wait().code(), Some(0), "stderr {}", vm.stderr());
    let m = std::fs::symlink_metadata(&report).unwrap();
    assert!(m.is_file(), "the link was replaced by the report");
    assert_eq!(
        m.permissions().mode() & 0o777,
        0o600,
        "0600 under umask 000"
    );
    assert!(
        std::fs::read_to_string(&report)
            .unwrap()
            .contains("\"exit\"")
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

    // A link at a log path or a socket path: refused with one line, the victim untouched.
    for (spec, told) in [
        (
            format!("mux:stdio,file={}", d.join("log").display()),
            "is a symbolic link",
        ),
        (
            format!("mux:stdio,sock={}", d.join("c.sock").display()),
            "is not a socket",
        ),
    ] {
        let _ = std::fs::remove_file(d.join("log"));
        let _ = std::fs::remove_file(d.join("c.sock"));
        symlink(&victim, d.join("log")).unwrap();
        symlink(&victim, d.join("c.sock")).unwrap();
        let r = run_with(
            "symlink-log",
            &hello_guest("hi\n"),
            b"",
            &["--console", &spec],
        );
        assert_eq!(r.status, 1, "{spec}: {}", r.stderr);
        assert_eq!(lines(&r.stderr).len(), 1, "{}", r.stderr);
        assert!(r.stderr.contains(told), "{}", r.stderr);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let m = std::fs::metadata(&victim).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o644);
    }
    let _ = std::fs::remove_dir_all(d);
}
