//! One microvm process of a boot case ([`Vm`]), started by the case's context ([`Ctx`]),
//! and a console socket client ([`Client`]). Every wait is bounded by the case's
//! deadline and a failure is an `Err` with the console's and stderr's tails.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::net::connect_until;
use crate::common::proc::pump;
use crate::common::{contains, poll_until};

#[derive(Clone)]
pub struct Ctx {
    pub bin: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub timeout: Duration,
    /// Given to every microvm run (see `run_cases`).
    pub common_args: Vec<String>,
    /// The microvm processes the running case started, for the watchdog.
    pub live: Arc<Mutex<Vec<Live>>>,
}

/// A microvm process as the watchdog sees it.
pub struct Live {
    pub pid: u32,
    pub out: Arc<Mutex<Vec<u8>>>,
    pub err: Arc<Mutex<Vec<u8>>>,
}

impl Ctx {
    /// `microvm --kernel K --initrd I EXTRA...` (the reference guest), not started.
    pub fn command(&self, extra: &[&str]) -> Command {
        self.command_for(&self.kernel, &self.initrd, extra)
    }

    /// `microvm --kernel KERNEL --initrd INITRD EXTRA...` (another guest), not started.
    pub fn command_for(&self, kernel: &Path, initrd: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--kernel")
            .arg(kernel)
            .arg("--initrd")
            .arg(initrd)
            .args(&self.common_args)
            .args(extra);
        cmd
    }

    /// Spawns `microvm --kernel K --initrd I EXTRA...` with piped stdio.
    pub fn spawn(&self, extra: &[&str]) -> Result<Vm, String> {
        let mut cmd = self.command(extra);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        self.start(cmd, None)
    }

    /// Starts `cmd` with stderr piped. The console is read from `console` (input, output)
    /// when given (e.g. a pty master), else from the child's piped stdin and stdout.
    pub fn start(
        &self,
        mut cmd: Command,
        console: Option<(Box<dyn Write + Send>, Box<dyn Read + Send>)>,
    ) -> Result<Vm, String> {
        cmd.stderr(Stdio::piped());
        let cmdline = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", self.bin.display()))?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        self.live.lock().unwrap().push(Live {
            pid: child.id(),
            out: out.clone(),
            err: err.clone(),
        });
        let (input, output): (Option<Box<dyn Write + Send>>, Box<dyn Read + Send>) = match console {
            Some((i, o)) => (Some(i), o),
            None => (
                child
                    .stdin
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Write + Send>),
                Box::new(child.stdout.take().ok_or("stdout is not piped")?),
            ),
        };
        let readers = vec![
            pump(output, out.clone()),
            pump(
                child.stderr.take().ok_or("stderr is not piped")?,
                err.clone(),
            ),
        ];
        Ok(Vm {
            stdin: input,
            child,
            out,
            err,
            readers,
            timeout: self.timeout,
            deadline: Instant::now() + self.timeout,
            cmdline,
            status: None,
        })
    }
}

/// A running microvm. Dropping it kills the process if it is still running.
pub struct Vm {
    child: Child,
    /// The console input (the child's stdin, or a pty master).
    stdin: Option<Box<dyn Write + Send>>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<thread::JoinHandle<()>>,
    timeout: Duration,
    /// One deadline per case, counted from spawn.
    pub deadline: Instant,
    cmdline: String,
    status: Option<ExitStatus>,
}

impl Vm {
    /// The console output as received, byte-exact.
    pub fn output(&self) -> Vec<u8> {
        self.out.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).replace('\r', "")
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).replace('\r', "")
    }

    /// Kills the process and builds a failure message with the console and stderr tails.
    pub fn fail(&mut self, what: &str) -> String {
        self.kill();
        format!(
            "{what}\n  command: {}\n  exit: {}\n---- guest console (stdout) tail ----\n{}\n---- stderr tail ----\n{}",
            self.cmdline,
            self.status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "killed by the test".into()),
            tail(&self.stdout(), 40),
            tail(&self.stderr(), 20),
        )
    }

    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.stdin.take();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(s)) = self.child.try_wait()
        {
            self.status = Some(s);
            // Let the readers drain the pipes.
            for r in self.readers.drain(..) {
                let _ = r.join();
            }
        }
        self.status
    }

    /// Waits until a stdout line contains `needle`; returns that line.
    pub fn wait_for(&mut self, needle: &str) -> Result<String, String> {
        let deadline = self.deadline;
        loop {
            let exited = self.poll_exit();
            // The kernel echoes its command line (which holds mvcmd="..." with the
            // markers' source text): never match there.
            let found = self
                .stdout()
                .lines()
                .filter(|l| !l.contains("Command line:") && !l.contains("command line parameters"))
                .find(|l| l.contains(needle))
                .map(str::to_string);
            if let Some(line) = found {
                return Ok(line);
            }
            if let Some(s) = exited {
                return Err(self.fail(&format!("microvm exited ({s}) before printing {needle:?}")));
            }
            if Instant::now() > deadline {
                return Err(self.fail(&format!(
                    "timed out ({:?} per case) waiting for {needle:?}",
                    self.timeout
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn send(&mut self, text: &str) -> Result<(), String> {
        let res = match self.stdin.as_mut() {
            Some(s) => s.write_all(text.as_bytes()).and_then(|_| s.flush()),
            None => return Err(self.fail("stdin already closed")),
        };
        res.map_err(|e| self.fail(&format!("writing {text:?} to microvm's stdin: {e}")))
    }

    /// Waits for the process to exit and checks its exit code.
    pub fn expect_exit(&mut self, code: i32) -> Result<(), String> {
        let deadline = self.deadline;
        loop {
            if let Some(s) = self.poll_exit() {
                return if s.code() == Some(code) {
                    Ok(())
                } else {
                    Err(self.fail(&format!("expected exit status {code}, got {s}")))
                };
            }
            if Instant::now() > deadline {
                return Err(self.fail(&format!(
                    "timed out ({:?} per case) waiting for microvm to exit",
                    self.timeout
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The MD5 of `data` in hex, computed by the host's `md5sum` (coreutils or busybox).
pub fn md5_hex(data: &[u8]) -> Result<String, String> {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run md5sum: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("md5sum stdin")?;
    let data = data.to_vec();
    let feeder = thread::spawn(move || stdin.write_all(&data));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("md5sum: {e}"))?;
    let _ = feeder.join();
    let hex: String = String::from_utf8_lossy(&out.stdout)
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    if hex.len() == 32 {
        Ok(hex)
    } else {
        Err(format!(
            "md5sum printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// A console socket client that reads everything into a buffer.
pub struct Client {
    name: String,
    pub stream: UnixStream,
    buf: Arc<Mutex<Vec<u8>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Client {
    pub fn connect(name: &str, path: &Path, deadline: Instant) -> Result<Client, String> {
        let stream = connect_until(path, deadline)?;
        let buf = Arc::new(Mutex::new(Vec::new()));
        let reader = stream
            .try_clone()
            .map_err(|e| format!("{name}: clone socket: {e}"))?;
        Ok(Client {
            name: name.to_string(),
            reader: Some(pump(reader, buf.clone())),
            stream,
            buf,
        })
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.buf.lock().unwrap().clone()
    }

    pub fn send(&mut self, data: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(data)
            .map_err(|e| format!("{}: writing to the console socket: {e}", self.name))
    }

    pub fn wait_for(&self, needle: &str, deadline: Instant) -> Result<(), String> {
        poll_until(
            deadline,
            &format!("{needle:?} on socket client {}", self.name),
            || contains(&self.buf.lock().unwrap(), needle.as_bytes()),
        )
        .map_err(|e| {
            format!(
                "{e}; it received {} bytes, tail:\n{}",
                self.buf.lock().unwrap().len(),
                tail(&String::from_utf8_lossy(&self.bytes()), 10)
            )
        })
    }

    /// Waits for the server to close the connection; returns everything received.
    pub fn finish(mut self, deadline: Instant) -> Result<Vec<u8>, String> {
        let reader = self.reader.take();
        poll_until(
            deadline,
            &format!("EOF on socket client {}", self.name),
            || reader.as_ref().is_none_or(|r| r.is_finished()),
        )?;
        if let Some(r) = reader {
            let _ = r.join();
        }
        Ok(self.bytes())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
