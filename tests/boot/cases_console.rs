//! Console cases: the hub's backends and the virtio console (hvc0) with a real guest.
//!
//! The default command line makes hvc0 the guest's console (earlycon on the UART), and
//! our init moves its shell onto hvc0, so these exercise the virtio console end to end;
//! the UART's early output shares the same hub stream.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::common::fs::Scratch;
use crate::common::net::{connect_until, free_port};
use crate::common::proc::pump;
use crate::common::{contains, find, pki, poll_until, pty};
use crate::vm::{Client, Ctx, md5_hex};
use crate::{CaseFn, INIT_MARK, SHELL_MARK};

pub const CASES: &[(&str, CaseFn)] = &[
    (
        "console_mux_same_stream_everywhere",
        console_mux_same_stream_everywhere,
    ),
    ("console_flood_stalled_client", console_flood_stalled_client),
    ("console_socket_paste_1mib", console_socket_paste_1mib),
    (
        "console_terminal_size_and_escape",
        console_terminal_size_and_escape,
    ),
    ("console_uart_only_paste", console_uart_only_paste),
    ("console_serial_own_hub", console_serial_own_hub),
    ("console_tls_token_shell", console_tls_token_shell),
];

/// A scratch directory and the spec of a hub with every backend kind:
/// `mux:sock=DIR/console.sock,stdio,ring,file=DIR/console.log`.
fn full_mux(case: &str) -> Result<(Scratch, String), String> {
    let dir = Scratch::new(case)?;
    let spec = format!(
        "mux:sock={},stdio,ring,file={}",
        dir.path("console.sock").display(),
        dir.path("console.log").display()
    );
    Ok((dir, spec))
}

/// `--console mux:sock,stdio,ring,file`: a marker typed through a socket client runs in
/// the guest shell (on hvc0) and reaches stdout, the file, every client and `microvm
/// attach`; a late joiner gets the boot log replayed; input from stdin reaches the guest
/// too; at the end every backend holds the very same byte stream.
fn console_mux_same_stream_everywhere(ctx: &Ctx) -> Result<(), String> {
    let (dir, spec) = full_mux("mux")?;
    let (sock, log) = (dir.path("console.sock"), dir.path("console.log"));
    let mut vm = ctx.spawn(&["--console", &spec])?;
    let deadline = vm.deadline;
    let mut early = Client::connect("early", &sock, deadline).map_err(|e| vm.fail(&e))?;
    vm.wait_for(SHELL_MARK)?;

    // Socket input -> guest shell -> every backend. `tty` shows the shell is on hvc0.
    early.send(b"tty; echo SOCK-$((6*7))\n")?;
    vm.wait_for("SOCK-42")?;
    early.wait_for("SOCK-42", deadline)?;
    if !vm.stdout().lines().any(|l| l.trim() == "/dev/hvc0") {
        return Err(vm.fail("`tty` in the guest shell did not print /dev/hvc0"));
    }

    // A late joiner first gets the history (the boot log), then live output.
    let late = Client::connect("late", &sock, deadline)?;
    late.wait_for(INIT_MARK, deadline)?;
    late.wait_for("SOCK-42", deadline)?;

    // Terminal (stdin) input reaches the guest; the output reaches both clients.
    vm.send("echo STDIN-$((2+3))\n")?;
    vm.wait_for("STDIN-5")?;
    early.wait_for("STDIN-5", deadline)?;
    late.wait_for("STDIN-5", deadline)?;

    // `microvm attach` as a client (no tty: plain relay).
    let mut attach = Command::new(&ctx.bin)
        .arg("attach")
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| vm.fail(&format!("cannot start microvm attach: {e}")))?;
    let attach_out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let attach_reader = pump(
        attach.stdout.take().ok_or("attach stdout")?,
        attach_out.clone(),
    );
    let res = (|| {
        poll_until(
            deadline,
            "the boot log replayed to `microvm attach`",
            || contains(&attach_out.lock().unwrap(), b"STDIN-5"),
        )?;
        let mut input = attach.stdin.take().ok_or("attach stdin")?;
        input
            .write_all(b"echo ATTACH-$((3*3))\n")
            .map_err(|e| format!("writing to microvm attach: {e}"))?;
        poll_until(deadline, "ATTACH-9 echoed to `microvm attach`", || {
            contains(&attach_out.lock().unwrap(), b"ATTACH-9")
        })
    })();
    if let Err(e) = res {
        let _ = attach.kill();
        return Err(vm.fail(&e));
    }
    vm.wait_for("ATTACH-9")?;
    early.wait_for("ATTACH-9", deadline)?;
    late.wait_for("ATTACH-9", deadline)?;

    vm.send("poweroff -f\n")?;
    vm.expect_exit(0)?;
    // The VMM is gone: every client saw EOF; `microvm attach` exits 0 on its own.
    let status = attach
        .wait()
        .map_err(|e| format!("waiting for microvm attach: {e}"))?;
    let _ = attach_reader.join();
    if !status.success() {
        return Err(format!(
            "microvm attach exited with {status} when the VM stopped"
        ));
    }

    let stdout = vm.output();
    let file = std::fs::read(&log).map_err(|e| format!("reading {}: {e}", log.display()))?;
    let early = early.finish(deadline)?;
    let late = late.finish(deadline)?;
    let attached = attach_out.lock().unwrap().clone();
    if stdout.is_empty() || !contains(&stdout, b"ATTACH-9") {
        return Err(vm.fail("stdout lacks the stream"));
    }
    for (name, got) in [
        ("the file log", &file),
        ("the early client", &early),
        ("the late joiner (history + live)", &late),
        ("microvm attach (history + live)", &attached),
    ] {
        if *got != stdout {
            return Err(format!(
                "{name} differs from stdout: {} vs {} bytes, first difference at byte {}",
                got.len(),
                stdout.len(),
                got.iter()
                    .zip(&stdout)
                    .position(|(a, b)| a != b)
                    .unwrap_or(got.len().min(stdout.len()))
            ));
        }
    }
    Ok(())
}

const FLOOD: usize = 16 << 20;

/// The guest writes 16 MiB of random bytes to hvc0 (raw mode) while one socket client
/// never reads and another disconnects mid-stream: the guest finishes, the stalled client
/// is cut off (and the log says so), and stdout, the file log and a reading client each
/// receive every byte (MD5 equal to the guest's).
fn console_flood_stalled_client(ctx: &Ctx) -> Result<(), String> {
    let (dir, spec) = full_mux("flood")?;
    let (sock, log) = (dir.path("console.sock"), dir.path("console.log"));
    // printk quiet: a kernel message on hvc0 in the middle of the data would be part of
    // the stream (correctly), but would break the MD5 comparison.
    let cmd = format!(
        "mvcmd=\"echo 1 > /proc/sys/kernel/printk; head -c {FLOOD} /dev/urandom > /tmp/f; \
         echo FLOOD-MD5-$(md5sum < /tmp/f); stty -F /dev/hvc0 raw -echo; \
         echo FLOOD-BEGIN-$((1+1)); cat /tmp/f; echo FLOOD-END-$((1+1))\""
    );
    let mut vm = ctx.spawn(&["--console", &spec, "--cmdline", &cmd])?;
    let deadline = vm.deadline;
    let reader = Client::connect("reader", &sock, deadline).map_err(|e| vm.fail(&e))?;
    let stalled = connect_until(&sock, deadline)?;
    let quitter = Client::connect("quitter", &sock, deadline)?;
    vm.wait_for(INIT_MARK)?;
    vm.wait_for("FLOOD-MD5-")?;
    // The quitter leaves once the flood is under way.
    poll_until(deadline, "the flood to start", || {
        quitter.bytes().len() > 64 << 10 && contains(&quitter.bytes(), b"FLOOD-BEGIN-2")
    })
    .map_err(|e| vm.fail(&e))?;
    drop(quitter);
    if let Err(e) = vm.expect_exit(0) {
        let file_len = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        return Err(format!(
            "{e}\nreceived so far: stdout {} bytes, file {file_len} bytes, reading client {} bytes",
            vm.output().len(),
            reader.bytes().len()
        ));
    }
    drop(stalled);

    let stdout = vm.output();
    let want = guest_md5(&stdout, b"FLOOD-MD5-").ok_or_else(|| vm.fail("no FLOOD-MD5 line"))?;
    let file = std::fs::read(&log).map_err(|e| format!("reading {}: {e}", log.display()))?;
    let reader = reader.finish(deadline)?;
    let check = || -> Result<(), String> {
        for (name, got) in [
            ("stdout", &stdout),
            ("the file log", &file),
            ("the reading client", &reader),
        ] {
            let begin = b"FLOOD-BEGIN-2\n";
            let start = find(got, begin, 0)
                .ok_or_else(|| format!("{name}: no FLOOD-BEGIN marker in {} bytes", got.len()))?
                + begin.len();
            let data = got.get(start..start + FLOOD).ok_or_else(|| {
                format!(
                    "{name}: only {} of {FLOOD} flood bytes arrived",
                    got.len() - start
                )
            })?;
            if !got[start + FLOOD..].starts_with(b"FLOOD-END-2") {
                return Err(format!(
                    "{name}: the flood is not followed by FLOOD-END (bytes added or lost)"
                ));
            }
            let md5 = md5_hex(data)?;
            if md5 != want {
                return Err(format!("{name}: MD5 {md5} differs from the guest's {want}"));
            }
        }
        Ok(())
    };
    if let Err(e) = check() {
        let longest = [&stdout, &file, &reader]
            .into_iter()
            .max_by_key(|b| b.len())
            .cloned()
            .unwrap_or_default();
        let tail = &longest[longest.len().saturating_sub(300)..];
        return Err(format!(
            "{e}\n  stdout {} bytes, file {} bytes, reading client {} bytes\n  \
             stream tail (escaped): {}\n  stderr:\n{}",
            stdout.len(),
            file.len(),
            reader.len(),
            tail.escape_ascii(),
            vm.stderr()
        ));
    }
    let stderr = vm.stderr();
    if !stderr.contains("cut off") {
        return Err(format!(
            "the stalled client was not reported cut off; stderr:\n{stderr}"
        ));
    }
    Ok(())
}

/// The 32 hex digits after `tag` (skipping the kernel's echo of the command line, where
/// `tag` is followed by `$(`).
fn guest_md5(out: &[u8], tag: &[u8]) -> Option<String> {
    let mut from = 0;
    while let Some(p) = find(out, tag, from) {
        let hex = out.get(p + tag.len()..p + tag.len() + 32)?;
        if hex.iter().all(u8::is_ascii_hexdigit) {
            return Some(String::from_utf8_lossy(hex).into_owned());
        }
        from = p + 1;
    }
    None
}

const PASTE: usize = 1 << 20;
const UART_PASTE: usize = 64 << 10;

/// `len` bytes of xorshift noise, never 0x0f (see `console_socket_paste_1mib`).
fn paste_bytes(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            match (x >> 24) as u8 {
                0x0f => 0x0e,
                b => b,
            }
        })
        .collect()
}

/// Pastes `len` bytes through a socket client into a guest that reads them raw from
/// `dev` and prints their MD5; compares it with ours.
fn paste_case(ctx: &Ctx, case: &str, dev: &str, len: usize, extra: &[&str]) -> Result<(), String> {
    let dir = Scratch::new(case)?;
    let sock = dir.path("console.sock");
    let spec = format!("mux:sock={},stdio", sock.display());
    let cmd = format!(
        "mvcmd=\"stty -F {dev} raw -echo; echo PASTE-READY-$((1+1)); \
         echo PASTE-MD5-$(head -c {len} {dev} | md5sum)\""
    );
    let mut args = vec!["--console", &spec, "--cmdline", &cmd];
    args.extend_from_slice(extra);
    let mut vm = ctx.spawn(&args)?;
    let deadline = vm.deadline;
    let client = Client::connect("paster", &sock, deadline).map_err(|e| vm.fail(&e))?;
    client
        .wait_for("PASTE-READY-2", deadline)
        .map_err(|e| vm.fail(&e))?;
    let paste = paste_bytes(len);
    let want = md5_hex(&paste)?;
    // The hub reads the socket only as fast as the guest takes the bytes: write from a
    // thread so the case's deadline still holds.
    let mut stream = client
        .stream
        .try_clone()
        .map_err(|e| format!("clone socket: {e}"))?;
    let writer = std::thread::spawn(move || stream.write_all(&paste));
    vm.expect_exit(0)?;
    if let Ok(Err(e)) = writer.join() {
        return Err(format!("writing the paste: {e}"));
    }
    let got = guest_md5(&vm.output(), b"PASTE-MD5-")
        .ok_or_else(|| vm.fail("the guest printed no PASTE-MD5 line"))?;
    if got != want {
        return Err(vm.fail(&format!("the guest read MD5 {got}, the paste was {want}")));
    }
    Ok(())
}

/// The UART alone: a paste a thousand times its 64-byte FIFO squeezes through whole and in
/// order (the hub holds what does not fit and stops reading the socket while full). Not
/// 1 MiB: every byte the guest reads is a port-I/O exit, far too slow in the nested rig.
fn console_uart_only_paste(ctx: &Ctx) -> Result<(), String> {
    paste_case(
        ctx,
        "uartpaste",
        "/dev/ttyS0",
        UART_PASTE,
        &["--no-virtio-console"],
    )
}

/// `--serial` gives the UART a hub of its own: the early console (UART) goes to one file,
/// the guest's console and shell (hvc0) to the other.
fn console_serial_own_hub(ctx: &Ctx) -> Result<(), String> {
    let dir = Scratch::new("serialhub")?;
    let (con, ser) = (dir.path("console.log"), dir.path("serial.log"));
    let console = format!("mux:stdio,file={}", con.display());
    let serial = format!("file={}", ser.display());
    let mut vm = ctx.spawn(&[
        "--console",
        &console,
        "--serial",
        &serial,
        "--cmdline",
        r#"mvcmd="echo HVC-$((4*4)); echo SER-$((5*5)) > /dev/ttyS0""#,
    ])?;
    vm.wait_for("HVC-16")?;
    vm.expect_exit(0)?;
    let read =
        |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let (con, ser) = (read(&con)?, read(&ser)?);
    if !contains(&ser, b"Linux version") || !contains(&ser, b"SER-25") {
        return Err(vm.fail("the --serial file lacks the early boot log or SER-25"));
    }
    if !contains(&con, INIT_MARK.as_bytes()) || !contains(&con, b"HVC-16") {
        return Err(vm.fail("the --console file lacks the init marker or HVC-16"));
    }
    if contains(&con, b"SER-25") || contains(&ser, b"HVC-16") {
        return Err(vm.fail("output of one hub leaked into the other"));
    }
    Ok(())
}

/// A 1 MiB paste of (nearly) every byte value into a socket client reaches the guest
/// (hvc0 in raw mode) whole and in order: the guest's MD5 of what it read equals ours.
/// Not 0x0f: Linux's hvc driver takes Ctrl-O on the console as its magic-SysRq prefix and
/// eats it and the next byte (a guest kernel habit, whatever the VMM does).
fn console_socket_paste_1mib(ctx: &Ctx) -> Result<(), String> {
    paste_case(ctx, "paste", "/dev/hvc0", PASTE, &[])
}

/// A real terminal (a pty, as tmux or a terminal emulator gives): hvc0's size is the
/// terminal's and follows a resize (SIGWINCH), Ctrl-A h shows the keys, Ctrl-A x quits
/// with status 0, and the terminal is back in its original (cooked) mode afterwards.
fn console_terminal_size_and_escape(ctx: &Ctx) -> Result<(), String> {
    let (master, slave) = pty::openpty(Some((37, 101))).map_err(|e| format!("openpty: {e}"))?;
    let termios = |fd| pty::termios(fd).map_err(|e| format!("tcgetattr: {e}"));
    let before = termios(master.as_raw_fd())?;
    let mut cmd = ctx.command(&[]);
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("dup pty: {e}"));
    cmd.stdin(Stdio::from(dup(&slave)?))
        .stdout(Stdio::from(dup(&slave)?));
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe calls (setsid, ioctl) on its own fd 0.
    unsafe {
        cmd.pre_exec(|| {
            // A session of its own with the pty as controlling terminal, so that the
            // kernel sends it SIGWINCH on resize.
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let reader = std::fs::File::from(dup(&master)?);
    let writer = std::fs::File::from(dup(&master)?);
    let mut vm = ctx.start(cmd, Some((Box::new(writer), Box::new(reader))))?;
    drop(slave);
    vm.wait_for(SHELL_MARK)?;
    vm.send("stty size\n")?;
    vm.wait_for("37 101")?;

    pty::set_winsize(master.as_raw_fd(), 40, 120).map_err(|e| format!("TIOCSWINSZ: {e}"))?;
    // The resize reaches the guest asynchronously (signal -> event loop -> config
    // interrupt): ask until it shows, within the case's deadline.
    let deadline = vm.deadline;
    loop {
        vm.send("stty size\n")?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        if vm.stdout().lines().any(|l| l.trim() == "40 120") {
            break;
        }
        if Instant::now() > deadline {
            return Err(vm.fail("hvc0 never showed the new size 40 120 after the resize"));
        }
    }

    vm.send("\x01h")?;
    vm.wait_for("Ctrl-A x")?;
    vm.send("\x01x")?;
    vm.expect_exit(0)?;
    let after = termios(master.as_raw_fd())?;
    if (after.c_lflag & (libc::ICANON | libc::ECHO))
        != (before.c_lflag & (libc::ICANON | libc::ECHO))
        || after.c_oflag != before.c_oflag
        || after.c_iflag != before.c_iflag
    {
        return Err(format!(
            "terminal modes not restored after Ctrl-A x: lflag {:#x} -> {:#x}, iflag {:#x} -> {:#x}, oflag {:#x} -> {:#x}",
            before.c_lflag,
            after.c_lflag,
            before.c_iflag,
            after.c_iflag,
            before.c_oflag,
            after.c_oflag
        ));
    }
    Ok(())
}

/// A network console as the user would set it up: `tcp=` with a token and TLS. A
/// stranger with a wrong token is refused and told so (attach exits 1); `microvm attach
/// tcp://... --token-file --ca` drives the guest's shell (on hvc0) and powers it off.
fn console_tls_token_shell(ctx: &Ctx) -> Result<(), String> {
    let dir = Scratch::new("tls")?;
    let certs = pki::Pki::make(&dir.path(""))?;
    let token = pki::token(&dir.path(""), "vm.token", "boot-rig-secret-0123456789")?;
    let port = free_port();
    let spec = format!(
        "mux:stdio,tcp=127.0.0.1:{port}:token-file={}:tls-cert={}:tls-key={}",
        token.display(),
        certs.server_cert.display(),
        certs.server_key.display()
    );
    let mut vm = ctx.spawn(&["--console", &spec])?;
    let deadline = vm.deadline;
    vm.wait_for(SHELL_MARK)?;

    // A stranger with a guessed token, through the same client: refused, told why.
    let guessed = pki::token(&dir.path(""), "guessed.token", "guessed-0123456789abcdef")?;
    let attach_cmd = |token: &std::path::Path| {
        let mut c = Command::new(&ctx.bin);
        c.args(["attach", &format!("tcp://127.0.0.1:{port}"), "--token-file"])
            .arg(token)
            .arg("--ca")
            .arg(&certs.ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let mut stranger = attach_cmd(&guessed)
        .spawn()
        .map_err(|e| vm.fail(&format!("cannot start microvm attach: {e}")))?;
    if let Some(mut i) = stranger.stdin.take() {
        let _ = i.write_all(b"echo pwned\n");
    }
    let told = stranger
        .wait_with_output()
        .map_err(|e| format!("waiting for microvm attach: {e}"))?;
    let err = String::from_utf8_lossy(&told.stderr);
    if told.status.code() != Some(1) || !err.contains("wrong token") || !told.stdout.is_empty() {
        return Err(vm.fail(&format!(
            "a wrong token: attach exited {}, said {err:?}, relayed {} bytes",
            told.status,
            told.stdout.len()
        )));
    }

    let mut attach = attach_cmd(&token)
        .spawn()
        .map_err(|e| vm.fail(&format!("cannot start microvm attach: {e}")))?;
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = pump(attach.stdout.take().ok_or("attach stdout")?, out.clone());
    let mut input = attach.stdin.take().ok_or("attach stdin")?;
    let res = input
        .write_all(b"echo AUTH-$((6*7)); tty\n")
        .map_err(|e| format!("writing to microvm attach: {e}"))
        .and_then(|_| {
            poll_until(
                deadline,
                "AUTH-42 through the authenticated console",
                || contains(&out.lock().unwrap(), b"AUTH-42"),
            )
        });
    if let Err(e) = res {
        let _ = attach.kill();
        return Err(vm.fail(&e));
    }
    vm.wait_for("AUTH-42")?;
    input
        .write_all(b"poweroff -f\n")
        .map_err(|e| format!("writing to microvm attach: {e}"))?;
    vm.expect_exit(0)?;
    let status = attach
        .wait()
        .map_err(|e| format!("waiting for microvm attach: {e}"))?;
    let _ = reader.join();
    if !status.success() {
        return Err(format!("microvm attach exited with {status}"));
    }
    if vm.stdout().lines().any(|l| l.trim() == "pwned") {
        return Err("the stranger's input reached the guest".into());
    }
    Ok(())
}
