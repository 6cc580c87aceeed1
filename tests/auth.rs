//! Host tier (docs/TESTING.md): who may type into the guest. Authenticated console
//! listeners with real TCP sockets, a real hub on an event loop (no KVM), `microvm
//! attach`'s client code, and plain tools (`openssl s_client`, `curl`, installed by
//! scripts/deps.sh); at the end the whole path in the real binary with its seccomp
//! filters on, a tiny real-mode guest on the host's KVM.

mod common;

use common::fs::tmpdir;
use common::hub::Vm;
use common::net::{free_port, read_until, tcp_connect};
use common::proc::{MICROVM, pipe, pump};
use common::tiny::echo_guest;
use common::vmm::Vmm;
use common::{pki, wait_until};
use microvm::mux::{AttachOptions, HubConfig, MuxError};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const WRITER: &str = "writer-secret-0123456789";
const VIEWER: &str = "viewer-secret-0123456789";

/// A scratch dir with the PKI and both token files.
struct Setup {
    dir: PathBuf,
    pki: pki::Pki,
    writer: PathBuf,
    viewer: PathBuf,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = tmpdir(name);
        let pki = pki::Pki::make(&dir).unwrap();
        let writer = pki::token(&dir, "writer.token", WRITER).unwrap();
        let viewer = pki::token(&dir, "viewer.token", VIEWER).unwrap();
        Setup {
            dir,
            pki,
            writer,
            viewer,
        }
    }

    /// `tcp=127.0.0.1:0:token-file=..:viewer-token-file=..` plus `extra` options.
    fn tokens_spec(&self, extra: &str) -> String {
        format!(
            "tcp=127.0.0.1:0:token-file={}:viewer-token-file={}{extra}",
            self.writer.display(),
            self.viewer.display()
        )
    }

    fn tls(&self) -> String {
        format!(
            ":tls-cert={}:tls-key={}",
            self.pki.server_cert.display(),
            self.pki.server_key.display()
        )
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn addr(vm: &Vm) -> SocketAddr {
    vm.hub.lock().unwrap().tcp_addrs()[0]
}

/// Everything until the server closes (a read timeout fails the test).
fn read_to_close(s: &mut TcpStream) -> String {
    let mut v = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => v.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("no end from the server: {e} (got {v:?})"),
        }
    }
    String::from_utf8_lossy(&v).into_owned()
}

fn received(vm: &Vm) -> Vec<u8> {
    vm.uart.lock().unwrap().received.clone()
}

fn unauthenticated(vm: &Vm) -> u64 {
    vm.hub.lock().unwrap().stats().listeners[0].clients_unauthenticated
}

/// `microvm attach`'s client on pipes.
struct Attached {
    input: std::fs::File,
    output: Arc<Mutex<Vec<u8>>>,
    run: JoinHandle<Result<i32, MuxError>>,
    reader: JoinHandle<()>,
}

fn attach(opts: AttachOptions) -> Attached {
    let (in_r, in_w) = pipe();
    let (out_r, out_w) = pipe();
    let run = std::thread::spawn(move || {
        let r = microvm::mux::attach::attach_fds(&opts, in_r.as_raw_fd(), out_w.as_raw_fd());
        drop((in_r, out_w));
        r
    });
    let output = Arc::new(Mutex::new(Vec::new()));
    let sink = output.clone();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(out_r);
        let mut buf = [0u8; 4096];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    Attached {
        input: std::fs::File::from(in_w),
        output,
        run,
        reader,
    }
}

impl Attached {
    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, needle: &str) {
        wait_until(needle, || self.output().contains(needle));
    }

    /// Its result once it ended by itself.
    fn result(self) -> Result<i32, MuxError> {
        let r = self.run.join().unwrap();
        self.reader.join().unwrap();
        r
    }
}

fn opts(a: SocketAddr, token: Option<&Path>, ca: Option<&Path>) -> AttachOptions {
    AttachOptions {
        target: format!("tcp://{a}"),
        token_file: token.map(Path::to_path_buf),
        ca: ca.map(Path::to_path_buf),
        ..Default::default()
    }
}

#[test]
fn strangers_and_web_pages_reach_nothing_and_are_told_why() {
    let s = Setup::new("strangers");
    let vm = Vm::start(&s.tokens_spec(""));
    vm.writer
        .clone()
        .write_all(b"boot log: root shell\r\n")
        .unwrap();
    wait_until("history", || !vm.hub.lock().unwrap().history().is_empty());
    let a = addr(&vm);
    let attempts: [(&[u8], &str); 5] = [
        (b"echo pwned\n", "expected 'token SECRET'"),
        (
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\necho pwned",
            "HTTP/1.1 403 Forbidden",
        ),
        (b"\x16\x03\x01\x00\x05hello", "speaks plain TCP, not TLS"),
        (
            b"token wrong-secret-0123456789\necho pwned\n",
            "wrong token",
        ),
        (&[b'x'; 4096], "expected 'token SECRET'"),
    ];
    for (sent, told) in attempts {
        let mut c = tcp_connect(a);
        c.write_all(sent).unwrap();
        let reply = read_to_close(&mut c);
        assert!(reply.contains(told), "{sent:?} was told {reply:?}");
        assert!(!reply.contains("root shell"), "{sent:?} saw the console");
    }
    // A browser's or curl's POST, as a web page could send it.
    let curl = pki::curl_post_pwned(&format!("http://{a}/"), None);
    let body = String::from_utf8_lossy(&curl.stdout);
    assert!(body.contains("not a web server"), "curl got {body:?}");
    wait_until("6 refusals counted", || unauthenticated(&vm) == 6);
    let st = vm.hub.lock().unwrap().stats();
    assert_eq!((st.listeners[0].clients_seen, st.input_bytes), (0, 0));
    assert!(received(&vm).is_empty(), "{:?}", received(&vm));
    vm.stop();
}

#[test]
fn viewer_token_watches_writer_token_types() {
    let s = Setup::new("roles");
    let vm = Vm::start(&s.tokens_spec(""));
    vm.writer.clone().write_all(b"history;").unwrap();
    wait_until("history", || !vm.hub.lock().unwrap().history().is_empty());
    let a = addr(&vm);
    let mut viewer = tcp_connect(a);
    viewer
        .write_all(format!("token {VIEWER}\n").as_bytes())
        .unwrap();
    let got = read_until(&mut viewer, "history;");
    assert_eq!(got, "microvm: ok viewer\r\nhistory;");
    viewer.write_all(b"rm -rf /\n").unwrap();
    // The writer types ahead in the same write as its token line.
    let mut writer = tcp_connect(a);
    writer
        .write_all(format!("token {WRITER}\r\ntyped-ahead\n").as_bytes())
        .unwrap();
    let got = read_until(&mut writer, "history;");
    assert_eq!(got, "microvm: ok writer\r\nhistory;");
    writer.write_all(b"more\n").unwrap();
    wait_until("the writer's input", || received(&vm).ends_with(b"more\n"));
    assert_eq!(
        received(&vm),
        b"typed-ahead\nmore\n",
        "viewer's bytes crept in"
    );
    vm.writer.clone().write_all(b"live").unwrap();
    read_until(&mut viewer, "live");
    read_until(&mut writer, "live");
    vm.stop();

    // On a read-only console even the writer's token only watches.
    let vm = Vm::start(&s.tokens_spec(":ro"));
    let mut c = tcp_connect(addr(&vm));
    c.write_all(format!("token {WRITER}\nx\n").as_bytes())
        .unwrap();
    read_until(&mut c, "microvm: ok viewer\r\n");
    vm.stop();
}

#[test]
fn silent_connections_cannot_stall_the_guest_or_lock_out_clients() {
    let s = Setup::new("silent");
    let cfg = HubConfig {
        handshake_timeout: Duration::from_secs(2),
        ..HubConfig::default()
    };
    let vm = Vm::start_with(&format!("{}{}", s.tokens_spec(""), s.tls()), cfg);
    let a = addr(&vm);
    // Ten connections that never say a word: the first two make room for the rest
    // (eight may wait), and every one is closed by its deadline.
    let mut silent: Vec<TcpStream> = (0..10).map(|_| tcp_connect(a)).collect();
    // Meanwhile the guest prints and a real client gets in, types and reads.
    let c = attach(opts(a, Some(&s.writer), Some(&s.pki.ca)));
    vm.writer.clone().write_all(b"guest goes on\r\n").unwrap();
    c.wait_for("guest goes on");
    (&c.input).write_all(b"typed over TLS\n").unwrap();
    wait_until("typed over TLS", || received(&vm) == b"typed over TLS\n");
    assert!(
        !c.output().contains("microvm: ok"),
        "the greeting is not relayed"
    );
    for s in silent.iter_mut() {
        assert_eq!(
            read_to_close(s),
            "",
            "a silent TLS client is closed, told nothing"
        );
    }
    wait_until("10 silent connections counted", || {
        unauthenticated(&vm) == 10
    });
    vm.writer.clone().write_all(b"still here\r\n").unwrap();
    c.wait_for("still here");
    let hub = vm.stop();
    drop(hub);
    assert_eq!(c.result().unwrap(), 0);

    // A plain token listener tells a client that never finishes its line.
    let cfg = HubConfig {
        handshake_timeout: Duration::from_millis(300),
        ..HubConfig::default()
    };
    let vm = Vm::start_with(&s.tokens_spec(""), cfg);
    let mut slow = tcp_connect(addr(&vm));
    slow.write_all(b"token writer-sec").unwrap();
    assert_eq!(
        read_to_close(&mut slow),
        "microvm: error: no token in time\r\n"
    );
    assert!(received(&vm).is_empty());
    vm.stop();
}

/// `openssl s_client` with `extra` arguments, `input` on stdin, until the server closes
/// or the VM stops: its stdout and whether it succeeded.
fn s_client(a: SocketAddr, ca: &Path, extra: &[&Path], input: &[u8]) -> std::process::Child {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-quiet", "-verify_return_error", "-connect"])
        .arg(a.to_string())
        .arg("-CAfile")
        .arg(ca);
    for pair in extra.chunks(2) {
        cmd.arg("-cert").arg(pair[0]).arg("-key").arg(pair[1]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl (scripts/deps.sh installs it)");
    child.stdin.as_mut().unwrap().write_all(input).unwrap();
    child
}

#[test]
fn tls_with_tokens_works_with_attach_and_openssl() {
    let s = Setup::new("tls");
    let vm = Vm::start(&format!("{}{}", s.tokens_spec(""), s.tls()));
    vm.writer.clone().write_all(b"history;").unwrap();
    wait_until("history", || !vm.hub.lock().unwrap().history().is_empty());
    let a = addr(&vm);
    let c = attach(opts(a, Some(&s.writer), Some(&s.pki.ca)));
    c.wait_for("history;");
    (&c.input).write_all(b"from attach\n").unwrap();
    wait_until("attach's input", || received(&vm) == b"from attach\n");

    // openssl s_client, as the README shows it.
    let child = s_client(
        a,
        &s.pki.ca,
        &[],
        format!("token {WRITER}\nfrom openssl\n").as_bytes(),
    );
    wait_until("openssl's input", || {
        received(&vm).ends_with(b"from openssl\n")
    });
    // Wrong trust, no TLS at all, no token: nothing gets in.
    let wrong_ca = attach(opts(a, Some(&s.writer), Some(&s.pki.client_cert)));
    assert!(wrong_ca.result().is_err(), "a server not signed by --ca");
    let plain = attach(opts(a, Some(&s.writer), None));
    assert!(plain.result().is_err(), "plain TCP to a TLS console");
    let viewer = attach(opts(a, Some(&s.viewer), Some(&s.pki.ca)));
    viewer.wait_for("history;");
    (&viewer.input).write_all(b"viewer typing\n").unwrap();
    vm.writer.clone().write_all(b"end").unwrap();
    c.wait_for("end");
    viewer.wait_for("end");
    let uart = vm.uart.clone();
    let hub = vm.stop();
    drop(hub);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("microvm: ok writer\r\nhistory;"),
        "{text:?}"
    );
    assert!(text.contains("end"), "{text:?}");
    assert_eq!(c.result().unwrap(), 0);
    assert_eq!(viewer.result().unwrap(), 0);
    assert_eq!(
        uart.lock().unwrap().received,
        b"from attach\nfrom openssl\n",
        "the viewer's typing crept in"
    );
}

#[test]
fn client_certificates_are_checked() {
    let s = Setup::new("certs");
    let vm = Vm::start(&format!(
        "tcp=127.0.0.1:0{}:tls-client-ca={}",
        s.tls(),
        s.pki.ca.display()
    ));
    vm.writer.clone().write_all(b"history;").unwrap();
    wait_until("history", || !vm.hub.lock().unwrap().history().is_empty());
    let a = addr(&vm);
    let with_cert = AttachOptions {
        cert: Some(s.pki.client_cert.clone()),
        key: Some(s.pki.client_key.clone()),
        ..opts(a, None, Some(&s.pki.ca))
    };
    let c = attach(with_cert);
    c.wait_for("history;");
    (&c.input).write_all(b"with a certificate\n").unwrap();
    wait_until("attach's input", || {
        received(&vm) == b"with a certificate\n"
    });
    let none = attach(opts(a, None, Some(&s.pki.ca)));
    let stranger = attach(AttachOptions {
        cert: Some(s.pki.stranger_cert.clone()),
        key: Some(s.pki.stranger_key.clone()),
        ..opts(a, None, Some(&s.pki.ca))
    });
    (&none.input).write_all(b"no certificate\n").unwrap();
    (&stranger.input).write_all(b"stranger\n").unwrap();
    assert!(none.result().is_err(), "no client certificate");
    assert!(stranger.result().is_err(), "a certificate from another CA");

    let ok = s_client(
        a,
        &s.pki.ca,
        &[&s.pki.client_cert, &s.pki.client_key],
        b"from openssl\n",
    );
    wait_until("openssl's input", || {
        received(&vm).ends_with(b"from openssl\n")
    });
    let bad = s_client(a, &s.pki.ca, &[], b"no cert\n")
        .wait_with_output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&bad.stdout).contains("history"));
    let uart = vm.uart.clone();
    let hub = vm.stop();
    drop(hub);
    let out = ok.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("microvm: ok writer\r\nhistory;"),
        "{text:?}"
    );
    assert_eq!(c.result().unwrap(), 0);
    assert_eq!(
        uart.lock().unwrap().received,
        b"with a certificate\nfrom openssl\n",
        "only certified clients typed"
    );
}

// ---- the real binary ---------------------------------------------------------------------

/// The whole path, seccomp filters on: a TLS console with tokens on the event loop; a
/// silent connection and an HTTP POST meanwhile; `microvm attach` over TLS drives the
/// echo guest, which powers off on `q`.
#[test]
fn tls_token_console_under_seccomp_with_attach() {
    let d = tmpdir("tls-console");
    let p = pki::Pki::make(&d).unwrap();
    let token = pki::token(&d, "vm.token", "kvm-tiny-secret-0123456789").unwrap();
    let port = free_port();
    let spec = format!(
        "mux:stdio,tcp=127.0.0.1:{port}:token-file={}:tls-cert={}:tls-key={}",
        token.display(),
        p.server_cert.display(),
        p.server_key.display()
    );
    let mut vm = Vmm::start(
        "tls-console",
        &echo_guest(),
        &["--console", &spec],
        Stdio::piped(),
        Stdio::piped(),
    );
    let silent = tcp_connect(([127, 0, 0, 1], port).into());
    let curl = pki::curl_post_pwned(&format!("https://127.0.0.1:{port}/"), Some(&p.ca));
    let body = String::from_utf8_lossy(&curl.stdout);
    assert!(
        body.contains("not a web server"),
        "curl over TLS got {body:?}, {}; microvm: {}",
        String::from_utf8_lossy(&curl.stderr),
        vm.stderr()
    );
    let mut attach = Command::new(MICROVM)
        .args(["attach", &format!("tcp://127.0.0.1:{port}"), "--token-file"])
        .arg(&token)
        .arg("--ca")
        .arg(&p.ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let attached = Arc::new(Mutex::new(Vec::new()));
    pump(attach.stdout.take().unwrap(), attached.clone());
    let mut input = attach.stdin.take().unwrap();
    input.write_all(b"hello over tls").unwrap();
    vm.wait_for("the echo", |v| v.stdout_has(b"hello over tls"));
    wait_until("attach to get the echo", || {
        String::from_utf8_lossy(&attached.lock().unwrap()).contains("hello over tls")
    });
    input.write_all(b"q").unwrap();
    let st = vm.wait();
    assert_eq!(st.code(), Some(0), "stderr {}", vm.stderr());
    assert!(
        vm.stderr().contains("an HTTP request"),
        "the refusal is logged: {}",
        vm.stderr()
    );
    assert!(attach.wait().unwrap().success());
    assert_eq!(
        String::from_utf8_lossy(&attached.lock().unwrap()),
        "hello over tlsq",
        "attach relays the console only"
    );
    drop(silent);
    let _ = std::fs::remove_dir_all(d);
}
