//! The `--console` / `--serial` grammar: `mux:` + comma-separated backends.
//!
//! See [`CONSOLE_SPEC_HELP`] for the user-facing description; it is the contract.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::host::units::{self, SizeUnit};

/// Most backends one hub may have (a socket listener counts once, whatever its clients).
pub const MAX_BACKENDS: usize = 8;
/// Default `ring` size, also the history replayed to late-joining socket clients.
pub const DEFAULT_RING_SIZE: usize = 1 << 20;
/// Default limit of simultaneous clients per socket listener.
pub const DEFAULT_MAX_CLIENTS: usize = 16;
/// Default per-client output queue: a client further behind than this is cut off.
pub const DEFAULT_CLIENT_QUEUE: usize = 1 << 20;
/// Default number of rotated log files kept.
pub const DEFAULT_KEEP: u32 = 5;
/// Default permissions of a unix socket file: only the owner may attach.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Longest path a unix socket address can hold (`sun_path` minus the NUL).
pub const MAX_UNIX_PATH: usize = 107;
/// The largest `ring=` (history kept in memory).
pub const MAX_RING: usize = 256 << 20;
/// The largest `queue=` (how far a client may fall behind; the hub keeps one shared
/// buffer of the largest of `ring` and `queue`, not one per client).
pub const MAX_QUEUE: usize = 256 << 20;
/// The largest `max-clients=`.
pub const MAX_CLIENTS: u64 = 1024;
/// The largest `rotate=` (1 TiB).
pub const MAX_ROTATE: u64 = 1 << 40;
/// The longest `idle-timeout=`.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod sock;

use sock::apply_sock_opts;
pub use sock::{AuthSpec, Listen, SockSpec, TlsSpec};

/// Text for `--help`: the console spec grammar and each backend's policy.
pub const CONSOLE_SPEC_HELP: &str = "\
Console spec: BACKEND, or mux:BACKEND,BACKEND,... (at most 8 backends).
All backends see the same output bytes in the same order; input from every
backend is merged (each read delivered whole, in arrival order) into the guest.
Each BACKEND is KIND[=VALUE][:OPTION]...; write ',' ':' '\\' inside a path as
'\\,' '\\:' '\\\\'. Sizes: bytes, or with K, M, G suffix (binary: 2M = 2 MiB).
Durations: seconds, or with ms, s, m, h suffix.

  stdio              this terminal. Lossless: a slow terminal paces the guest.
                     On a tty: raw mode, escape keys Ctrl-A then: x quit,
                     h help, c switch input to the next console, Ctrl-A send
                     Ctrl-A. Not a tty: no raw mode, no escapes; EOF on stdin
                     or a closed stdout never stops the VM.
  ring[=SIZE]        in-memory log of the last SIZE bytes (default 1M, at most
                     256M); never blocks. It is also the history a socket
                     client is sent when it connects (1M even without 'ring').
  file=PATH          lossless log, opened in append mode (copytruncate-safe),
                     flushed on exit. A FIFO or device is written without
                     blocking and drops (and counts) what its reader does not
                     take; a FIFO needs its reader running first. Options:
                       :rotate=SIZE  rotate when PATH would exceed SIZE
                       :keep=N       rotated files kept, PATH.1..PATH.N (5)
                       :timestamps   UTC time at the start of each line (this
                                     file only; other backends stay byte-exact)
  sock[=PATH]        unix socket server, mode 0600 (only this user may attach;
                     see :mode). Without PATH: microvm-PID.sock in a private
                     directory, $XDG_RUNTIME_DIR/microvm/, /run/microvm/ (root)
                     or /tmp/microvm-UID/ (0700, checked; printed on stderr and
                     in --report). PATH.lock guards the name against a second
                     microvm. A stale socket is replaced; any other existing
                     file is refused. Clients get the history, then live
                     output; 'microvm attach PATH', socat or nc -U work.
                     A client that stops reading is cut off when its queue
                     overflows; it never slows the guest or anyone else.
                     Options:
                       :ro             clients are viewers; their input is ignored
                       :single-writer  one client holds the keyboard; another
                                       takes it over with Ctrl-A w (all told)
                       :max-clients=N  simultaneous clients (16, at most 1024
                                       and what the open-file limit allows);
                                       when full, a new client takes the place
                                       of one idle for 30 s or more
                       :queue=SIZE     how far behind a client may fall (1M, at
                                       most 256M; all clients share one buffer)
                       :idle-timeout=DURATION
                                       disconnect a client that neither typed
                                       nor took output for that long
                       :mode=OCTAL     socket file permissions instead of 0600,
                                       e.g. mode=0660 lets the file's group attach
                                       (exactly OCTAL: the umask is not applied;
                                       wider than 0600 warns)
                       :token-file=PATH
                                       clients must first send the line
                                       'token SECRET' with the secret in PATH
                                       (at least 16 printable characters, mode
                                       0600); they are told 'microvm: ok writer'
                       :viewer-token-file=PATH
                                       a second secret that may watch, never type
  tcp=ADDR:PORT      the same server on TCP, same options but :mode. It needs an
                     authentication method (token-file, viewer-token-file or
                     tls-client-ca) or the word :insecure (then anyone who can
                     connect may type into the guest; it warns). Anything that
                     is not the protocol (an HTTP request, a TLS hello on a
                     plain port) is refused before it reaches the guest.
                       :tls-cert=PATH:tls-key=PATH
                                       TLS 1.3 (PEM certificate chain and key)
                       :tls-client-ca=PATH
                                       clients need a certificate signed by
                                       this CA ('microvm attach --cert --key')
                       :insecure       no authentication (not recommended)

Example: --console mux:sock=/run/vm.sock:ro,stdio,ring=2M,file=console.log:rotate=10M:keep=3
         --console mux:stdio,tcp=0.0.0.0:4444:token-file=vm.token:tls-cert=c.pem:tls-key=k.pem";

pub use crate::host::logging::one_line;

/// Errors in a console spec. Each is one line naming the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Nothing given.
    #[error("empty console spec")]
    Empty,
    /// `mux:a,,b`.
    #[error("empty backend in console spec '{}'", one_line(.0))]
    EmptyBackend(String),
    /// `stdio,ring` without the `mux:` prefix.
    #[error("'{}': several backends need the 'mux:' prefix, e.g. 'mux:{}'", one_line(.0), one_line(.0))]
    NeedsMux(String),
    /// A KIND that does not exist.
    #[error("unknown console backend '{}' (expected stdio, ring, file, sock or tcp)", one_line(.0))]
    UnknownBackend(String),
    /// `stdio` twice, `ring` twice, the same file or socket twice.
    #[error("duplicate console backend '{}'", one_line(.0))]
    Duplicate(String),
    /// A size that does not parse or is zero.
    #[error(
        "bad size '{}' in '{}' (expected e.g. 4096, 64K, 2M, 1G)",
        one_line(value),
        one_line(part)
    )]
    BadSize {
        /// The backend item the size is in.
        part: String,
        /// The size text.
        value: String,
    },
    /// A size over its ceiling.
    #[error("'{}': {what} too large (at most {max})", one_line(part))]
    TooLarge {
        /// The backend item.
        part: String,
        /// Which value.
        what: &'static str,
        /// The ceiling, as a user writes it.
        max: String,
    },
    /// More than [`MAX_BACKENDS`].
    #[error("too many console backends: {0} (at most 8)")]
    TooMany(usize),
    /// `file` or `tcp` without a value.
    #[error("console backend '{}' needs a value: {hint}", one_line(kind))]
    MissingValue {
        /// The backend kind.
        kind: String,
        /// What the value should look like.
        hint: &'static str,
    },
    /// `stdio=...`.
    #[error("console backend '{}' takes no value", one_line(.0))]
    UnexpectedValue(String),
    /// An option the backend does not know.
    #[error(
        "unknown option '{}' for console backend '{}'",
        one_line(opt),
        one_line(kind)
    )]
    UnknownOption {
        /// The backend kind.
        kind: String,
        /// The option text.
        opt: String,
    },
    /// A known option with a bad value.
    #[error(
        "bad option '{}' for console backend '{}': {why}",
        one_line(opt),
        one_line(kind)
    )]
    BadOption {
        /// The backend kind.
        kind: String,
        /// The option text.
        opt: String,
        /// What is wrong.
        why: &'static str,
    },
    /// `tcp=` value that is not ADDR:PORT.
    #[error("bad tcp address '{}' (expected ADDR:PORT, e.g. 127.0.0.1:4444)", one_line(.0))]
    BadAddress(String),
    /// A unix socket path longer than `sun_path` allows.
    #[error(
        "unix socket path '{}' is too long ({len} bytes, at most 107)",
        one_line(path)
    )]
    PathTooLong {
        /// The path.
        path: String,
        /// Its length in bytes.
        len: usize,
    },
    /// Authentication options that do not fit together, or none on a tcp console.
    #[error("'{}': {why}", one_line(part))]
    Auth {
        /// The backend item.
        part: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A trailing lone backslash.
    #[error("dangling '\\' at the end of '{}'", one_line(.0))]
    DanglingEscape(String),
}

/// A parsed console spec: the backends of one hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSpec {
    /// The backends, in the order given.
    pub backends: Vec<BackendSpec>,
}

/// One backend of a hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// The process's stdin/stdout.
    Stdio,
    /// In-memory ring of the last `size` bytes.
    Ring {
        /// Bytes kept.
        size: usize,
    },
    /// Append-mode log file.
    File(FileSpec),
    /// Unix or TCP socket server.
    Sock(SockSpec),
}

/// `file=PATH[:rotate=SIZE][:keep=N][:timestamps]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// The log file.
    pub path: PathBuf,
    /// Rotate when the file would grow beyond this many bytes.
    pub rotate: Option<u64>,
    /// Rotated files kept (PATH.1 .. PATH.keep).
    pub keep: u32,
    /// Prefix each line with a UTC timestamp.
    pub timestamps: bool,
}

impl ConsoleSpec {
    /// The configured ring size, if a `ring` backend is present.
    pub fn ring_size(&self) -> Option<usize> {
        self.backends.iter().find_map(|b| match b {
            BackendSpec::Ring { size } => Some(*size),
            _ => None,
        })
    }

    /// The most socket clients its listeners take together.
    pub fn max_clients(&self) -> u64 {
        self.backends
            .iter()
            .map(|b| match b {
                BackendSpec::Sock(s) => s.max_clients as u64,
                _ => 0,
            })
            .sum()
    }

    /// True when the spec has a `stdio` backend.
    pub fn has_stdio(&self) -> bool {
        self.backends
            .iter()
            .any(|b| matches!(b, BackendSpec::Stdio))
    }
}

/// Split `s` on `sep` where it is not escaped by a backslash. Escapes are kept.
fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            out.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    out.push(&s[start..]);
    out
}

/// Byte index of the first unescaped `sep`.
fn find_unescaped(s: &str, seps: &[char]) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if seps.contains(&c) {
            return Some(i);
        }
    }
    None
}

fn unescape(s: &str, whole: &str) -> Result<String, SpecError> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n) => out.push(n),
                None => return Err(SpecError::DanglingEscape(whole.to_string())),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ',' | ':') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Parses a size of the console spec (bytes unless suffixed, see [`crate::host::units`]);
/// `None` if bad or 0.
pub fn parse_size(s: &str) -> Option<u64> {
    units::parse_size(s, SizeUnit::Bytes).filter(|&v| v > 0)
}

/// A size in `part`, at most `max`.
fn size_of(part: &str, value: &str, what: &'static str, max: u64) -> Result<u64, SpecError> {
    let v = parse_size(value).ok_or_else(|| SpecError::BadSize {
        part: part.to_string(),
        value: value.to_string(),
    })?;
    if v > max {
        return Err(SpecError::TooLarge {
            part: part.to_string(),
            what,
            max: units::format_size(max),
        });
    }
    Ok(v)
}

fn usize_size(part: &str, value: &str, what: &'static str, max: usize) -> Result<usize, SpecError> {
    // `max` fits in a usize, so the checked value does too.
    size_of(part, value, what, max as u64).map(|v| v as usize)
}

/// Parse the tcp value at the start of `rest`: `ADDR:PORT` or `[V6]:PORT`.
/// Returns the address and what follows it (options, starting with ':' or empty).
fn parse_tcp(rest: &str) -> Result<(SocketAddr, &str), SpecError> {
    let bad = || SpecError::BadAddress(rest.split(',').next().unwrap_or(rest).to_string());
    let host_end = if rest.starts_with('[') {
        rest.find(']').map(|i| i + 1).ok_or_else(bad)?
    } else {
        rest.find(':').ok_or_else(bad)?
    };
    let host = &rest[..host_end];
    let after = rest[host_end..].strip_prefix(':').ok_or_else(bad)?;
    let port_end = after.find(':').unwrap_or(after.len());
    let port: u16 = after[..port_end].parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = if host == "localhost" {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse().map_err(|_| bad())?
    };
    Ok((SocketAddr::new(ip, port), &after[port_end..]))
}

fn parse_count(kind: &str, opt: &str, v: &str, max: u64) -> Result<u64, SpecError> {
    match v.parse::<u64>() {
        Ok(n) if n >= 1 && n <= max => Ok(n),
        _ => Err(SpecError::BadOption {
            kind: kind.to_string(),
            opt: opt.to_string(),
            why: "expected a number from 1 to 1024",
        }),
    }
}

fn parse_backend(item: &str) -> Result<BackendSpec, SpecError> {
    let kind_end = find_unescaped(item, &['=', ':']).unwrap_or(item.len());
    let kind = &item[..kind_end];
    let rest = &item[kind_end..];
    let (value, opts): (Option<String>, Vec<&str>) = if kind == "tcp" {
        let Some(v) = rest.strip_prefix('=') else {
            return Err(SpecError::MissingValue {
                kind: kind.into(),
                hint: "tcp=ADDR:PORT",
            });
        };
        let (addr, tail) = parse_tcp(v)?;
        let opts = match tail.strip_prefix(':') {
            Some(t) => split_unescaped(t, ':'),
            None => Vec::new(),
        };
        let mut s = SockSpec::new(Listen::Tcp(addr));
        apply_sock_opts(&mut s, kind, &opts, item)?;
        return Ok(BackendSpec::Sock(s));
    } else if let Some(v) = rest.strip_prefix('=') {
        let mut parts = split_unescaped(v, ':');
        let value = parts.remove(0);
        (Some(unescape(value, item)?), parts)
    } else if let Some(o) = rest.strip_prefix(':') {
        (None, split_unescaped(o, ':'))
    } else {
        (None, Vec::new())
    };
    let value = value.filter(|v| !v.is_empty());
    match kind {
        "stdio" => {
            if value.is_some() {
                return Err(SpecError::UnexpectedValue(kind.into()));
            }
            no_opts(kind, &opts)?;
            Ok(BackendSpec::Stdio)
        }
        "ring" => {
            no_opts(kind, &opts)?;
            let size = match value {
                Some(v) => usize_size(item, &v, "ring size", MAX_RING)?,
                None => DEFAULT_RING_SIZE,
            };
            Ok(BackendSpec::Ring { size })
        }
        "file" => {
            let Some(path) = value else {
                return Err(SpecError::MissingValue {
                    kind: kind.into(),
                    hint: "file=PATH",
                });
            };
            let mut f = FileSpec {
                path: PathBuf::from(path),
                rotate: None,
                keep: DEFAULT_KEEP,
                timestamps: false,
            };
            for o in &opts {
                let o = unescape(o, item)?;
                let (name, v) = split_opt(&o);
                match (name, v) {
                    ("rotate", Some(v)) => {
                        f.rotate = Some(size_of(item, v, "rotate size", MAX_ROTATE)?)
                    }
                    ("keep", Some(v)) => f.keep = parse_count(kind, &o, v, 1024)? as u32,
                    ("timestamps" | "ts", None) => f.timestamps = true,
                    _ => {
                        return Err(SpecError::UnknownOption {
                            kind: kind.into(),
                            opt: o.clone(),
                        });
                    }
                }
            }
            Ok(BackendSpec::File(f))
        }
        "sock" => {
            let path = value.map(PathBuf::from);
            if let Some(p) = &path {
                let len = p.as_os_str().len();
                if len > MAX_UNIX_PATH {
                    return Err(SpecError::PathTooLong {
                        path: p.display().to_string(),
                        len,
                    });
                }
            }
            let mut s = SockSpec::new(Listen::Unix(path));
            apply_sock_opts(&mut s, kind, &opts, item)?;
            Ok(BackendSpec::Sock(s))
        }
        "" => Err(SpecError::EmptyBackend(item.to_string())),
        other => Err(SpecError::UnknownBackend(other.to_string())),
    }
}

fn split_opt(o: &str) -> (&str, Option<&str>) {
    match o.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (o, None),
    }
}

fn no_opts(kind: &str, opts: &[&str]) -> Result<(), SpecError> {
    match opts.first() {
        Some(o) => Err(SpecError::UnknownOption {
            kind: kind.into(),
            opt: (*o).to_string(),
        }),
        None => Ok(()),
    }
}

impl FromStr for ConsoleSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let s = s.trim();
        let (body, is_mux) = match s.strip_prefix("mux:") {
            Some(b) => (b, true),
            None => (s, false),
        };
        if body.is_empty() {
            return Err(SpecError::Empty);
        }
        let items = split_unescaped(body, ',');
        if !is_mux && items.len() > 1 {
            return Err(SpecError::NeedsMux(s.to_string()));
        }
        if items.len() > MAX_BACKENDS {
            return Err(SpecError::TooMany(items.len()));
        }
        let mut backends: Vec<BackendSpec> = Vec::with_capacity(items.len());
        for item in items {
            if item.is_empty() {
                return Err(SpecError::EmptyBackend(s.to_string()));
            }
            let b = parse_backend(item)?;
            let dup = backends.iter().any(|old| match (old, &b) {
                (BackendSpec::Stdio, BackendSpec::Stdio) => true,
                (BackendSpec::Ring { .. }, BackendSpec::Ring { .. }) => true,
                (BackendSpec::File(a), BackendSpec::File(b)) => a.path == b.path,
                (BackendSpec::Sock(a), BackendSpec::Sock(b)) => a.listen == b.listen,
                _ => false,
            });
            if dup {
                return Err(SpecError::Duplicate(item.to_string()));
            }
            backends.push(b);
        }
        Ok(ConsoleSpec { backends })
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::Stdio => write!(f, "stdio"),
            BackendSpec::Ring { size } => write!(f, "ring={}", units::format_size(*size as u64)),
            BackendSpec::File(s) => {
                write!(f, "file={}", escape(&s.path.to_string_lossy()))?;
                if let Some(r) = s.rotate {
                    write!(f, ":rotate={}", units::format_size(r))?;
                }
                if s.keep != DEFAULT_KEEP {
                    write!(f, ":keep={}", s.keep)?;
                }
                if s.timestamps {
                    write!(f, ":timestamps")?;
                }
                Ok(())
            }
            BackendSpec::Sock(s) => write!(f, "{s}"),
        }
    }
}

impl fmt::Display for ConsoleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.backends.len() == 1 {
            return write!(f, "{}", self.backends[0]);
        }
        write!(f, "mux:")?;
        for (i, b) in self.backends.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{b}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Result<ConsoleSpec, SpecError> {
        s.parse()
    }

    #[test]
    fn issue_example() {
        let s = p("mux:sock=/run/vm.sock,stdio,ring=2M,file=console.log").unwrap();
        assert_eq!(s.backends.len(), 4);
        assert_eq!(s.ring_size(), Some(2 << 20));
        assert!(s.has_stdio());
        match &s.backends[0] {
            BackendSpec::Sock(k) => {
                assert_eq!(k.listen, Listen::Unix(Some("/run/vm.sock".into())));
                assert!(!k.read_only);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.to_string(),
            "mux:sock=/run/vm.sock,stdio,ring=2M,file=console.log"
        );
    }

    #[test]
    fn bare_backends() {
        assert_eq!(p("stdio").unwrap().backends, vec![BackendSpec::Stdio]);
        assert_eq!(
            p("ring").unwrap().backends,
            vec![BackendSpec::Ring {
                size: DEFAULT_RING_SIZE
            }]
        );
        match &p("sock").unwrap().backends[0] {
            BackendSpec::Sock(s) => assert_eq!(s.listen, Listen::Unix(None)),
            o => panic!("{o:?}"),
        }
        assert_eq!(p("mux:stdio").unwrap(), p("stdio").unwrap());
    }

    #[test]
    fn options() {
        let s = p("mux:sock=/tmp/a.sock:ro:max-clients=8:queue=64K,file=log.txt:rotate=10M:keep=3:timestamps,sock:sw")
            .unwrap();
        match &s.backends[0] {
            BackendSpec::Sock(k) => {
                assert!(k.read_only);
                assert_eq!(k.max_clients, 8);
                assert_eq!(k.queue, 64 << 10);
            }
            o => panic!("{o:?}"),
        }
        match &s.backends[1] {
            BackendSpec::File(f) => {
                assert_eq!(f.path, PathBuf::from("log.txt"));
                assert_eq!(f.rotate, Some(10 << 20));
                assert_eq!(f.keep, 3);
                assert!(f.timestamps);
            }
            o => panic!("{o:?}"),
        }
        match &s.backends[2] {
            BackendSpec::Sock(k) => {
                assert!(k.single_writer);
                assert_eq!(k.listen, Listen::Unix(None));
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(p(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn tcp_addresses() {
        let s = p(
            "mux:tcp=127.0.0.1:4444:ro:insecure,tcp=[::1]:5555:insecure,tcp=localhost:1:insecure",
        )
        .unwrap();
        let addrs: Vec<_> = s
            .backends
            .iter()
            .map(|b| match b {
                BackendSpec::Sock(k) => (k.listen.clone(), k.read_only),
                o => panic!("{o:?}"),
            })
            .collect();
        assert_eq!(
            addrs[0],
            (Listen::Tcp("127.0.0.1:4444".parse().unwrap()), true)
        );
        assert_eq!(
            addrs[1],
            (Listen::Tcp("[::1]:5555".parse().unwrap()), false)
        );
        assert_eq!(
            addrs[2],
            (Listen::Tcp("127.0.0.1:1".parse().unwrap()), false)
        );
        assert_eq!(p(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn escaped_paths() {
        let s = p(r"mux:file=/tmp/a\,b\:c.log,stdio").unwrap();
        match &s.backends[0] {
            BackendSpec::File(f) => assert_eq!(f.path, PathBuf::from("/tmp/a,b:c.log")),
            o => panic!("{o:?}"),
        }
        assert_eq!(p(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(65536));
        assert_eq!(parse_size("2m"), Some(2 << 20));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("2X"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
    }

    #[test]
    fn errors_name_the_bad_part() {
        let cases: &[(&str, SpecError)] = &[
            ("", SpecError::Empty),
            ("mux:", SpecError::Empty),
            (
                "mux:stdio,,ring",
                SpecError::EmptyBackend("mux:stdio,,ring".into()),
            ),
            ("stdio,ring", SpecError::NeedsMux("stdio,ring".into())),
            (
                "mux:stdio,serial",
                SpecError::UnknownBackend("serial".into()),
            ),
            ("mux:stdio,stdio", SpecError::Duplicate("stdio".into())),
            ("mux:ring,ring=2M", SpecError::Duplicate("ring=2M".into())),
            ("mux:file=a,file=a", SpecError::Duplicate("file=a".into())),
            (
                "ring=2X",
                SpecError::BadSize {
                    part: "ring=2X".into(),
                    value: "2X".into(),
                },
            ),
            (
                "ring=0",
                SpecError::BadSize {
                    part: "ring=0".into(),
                    value: "0".into(),
                },
            ),
            (
                "file=a:rotate=lots",
                SpecError::BadSize {
                    part: "file=a:rotate=lots".into(),
                    value: "lots".into(),
                },
            ),
            (
                "mux:ring,stdio,sock,file=1,file=2,file=3,file=4,file=5,file=6",
                SpecError::TooMany(9),
            ),
            (
                "file",
                SpecError::MissingValue {
                    kind: "file".into(),
                    hint: "file=PATH",
                },
            ),
            (
                "tcp",
                SpecError::MissingValue {
                    kind: "tcp".into(),
                    hint: "tcp=ADDR:PORT",
                },
            ),
            ("stdio=x", SpecError::UnexpectedValue("stdio".into())),
            (
                "sock:rw",
                SpecError::UnknownOption {
                    kind: "sock".into(),
                    opt: "rw".into(),
                },
            ),
            (
                "ring:ro",
                SpecError::UnknownOption {
                    kind: "ring".into(),
                    opt: "ro".into(),
                },
            ),
            (
                "sock:max-clients=0",
                SpecError::BadOption {
                    kind: "sock".into(),
                    opt: "max-clients=0".into(),
                    why: "expected a number from 1 to 1024",
                },
            ),
            ("tcp=4444", SpecError::BadAddress("4444".into())),
            (
                "tcp=host.example:4444",
                SpecError::BadAddress("host.example:4444".into()),
            ),
            (
                "tcp=127.0.0.1:99999",
                SpecError::BadAddress("127.0.0.1:99999".into()),
            ),
            ("file=a\\", SpecError::DanglingEscape("file=a\\".into())),
        ];
        for (spec, want) in cases {
            assert_eq!(p(spec).as_ref(), Err(want), "spec {spec:?}");
            let msg = want.to_string();
            assert!(!msg.contains('\n'), "{msg}");
        }
        let long = format!("sock=/tmp/{}", "x".repeat(120));
        match p(&long) {
            Err(SpecError::PathTooLong { len, .. }) => assert_eq!(len, 125),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn user_sized_values_have_ceilings() {
        for (spec, what) in [
            ("ring=100G", "ring size too large (at most 256M)"),
            ("sock=/s:queue=18446744073709551615", "queue size too large"),
            ("sock=/s:queue=99999999999999999999", "bad size"),
            ("sock=/s:queue=512M", "queue size too large (at most 256M)"),
            ("file=/l:rotate=2T", "rotate size too large (at most 1T)"),
            ("sock=/s:max-clients=1025", "from 1 to 1024"),
            ("sock=/s:idle-timeout=8d", "expected a duration"),
            ("sock=/s:idle-timeout=0", "expected a duration"),
        ] {
            let e = p(spec).unwrap_err().to_string();
            assert!(e.contains(what), "{spec}: {e}");
        }
        let s = p("mux:ring=256M,sock=/s:queue=256M:idle-timeout=90s").unwrap();
        assert_eq!(
            s.to_string(),
            "mux:ring=256M,sock=/s:queue=256M:idle-timeout=90s"
        );
    }

    #[test]
    fn socket_mode_option() {
        let mode = |s: &str| match &p(s).unwrap().backends[0] {
            BackendSpec::Sock(k) => k.mode,
            o => panic!("{o:?}"),
        };
        assert_eq!(mode("sock"), 0o600);
        assert_eq!(mode("sock=/tmp/a.sock:mode=0660"), 0o660);
        assert_eq!(mode("sock:mode=640"), 0o640);
        assert_eq!(mode("sock:mode=0o700"), 0o700);
        assert_eq!(p("sock:mode=0660").unwrap().to_string(), "sock:mode=0660");
        assert_eq!(p("sock:mode=600").unwrap().to_string(), "sock");
        for bad in [
            "sock:mode=8",
            "sock:mode=01000",
            "sock:mode=rw",
            "sock:mode=+7",
        ] {
            assert!(
                matches!(p(bad), Err(SpecError::BadOption { .. })),
                "{bad}: {:?}",
                p(bad)
            );
        }
        let e = p("tcp=127.0.0.1:1:mode=0666").unwrap_err().to_string();
        assert!(e.contains("no file mode"), "{e}");
    }

    #[test]
    fn tcp_needs_authentication_or_insecure() {
        let auth = |s: &str| match &p(s).unwrap().backends[0] {
            BackendSpec::Sock(k) => k.auth.clone(),
            o => panic!("{o:?}"),
        };
        let e = p("tcp=127.0.0.1:1").unwrap_err().to_string();
        assert!(
            e.contains("needs authentication") && e.contains(":insecure"),
            "{e}"
        );
        assert!(auth("tcp=127.0.0.1:1:insecure").insecure);
        let a = auth("tcp=127.0.0.1:1:token-file=/k/t:viewer-token-file=v");
        assert_eq!(a.token_file, Some(PathBuf::from("/k/t")));
        assert_eq!(a.viewer_token_file, Some(PathBuf::from("v")));
        let a = auth("tcp=127.0.0.1:1:tls-cert=c.pem:tls-key=k.pem:tls-client-ca=ca.pem");
        let t = a.tls.unwrap();
        assert_eq!(
            (t.cert, t.key),
            (PathBuf::from("c.pem"), PathBuf::from("k.pem"))
        );
        assert_eq!(t.client_ca, Some(PathBuf::from("ca.pem")));
        // Unix sockets may use tokens; TLS and insecure are tcp words.
        assert!(auth("sock=/s:token-file=t").token_file.is_some());
        for (spec, why) in [
            (
                "tcp=127.0.0.1:1:tls-cert=c:tls-key=k",
                "needs authentication",
            ),
            ("tcp=127.0.0.1:1:token-file=t:insecure", "contradict"),
            ("tcp=127.0.0.1:1:tls-cert=c:token-file=t", "go together"),
            (
                "tcp=127.0.0.1:1:tls-client-ca=c:token-file=t",
                "needs tls-cert",
            ),
            ("tcp=127.0.0.1:1:token-file=", "expected a file path"),
            ("sock:insecure", "insecure is for tcp"),
            ("sock:tls-cert=c:tls-key=k", "TLS is for tcp"),
        ] {
            let e = p(spec).unwrap_err().to_string();
            assert!(e.contains(why), "{spec}: {e}");
            assert!(!e.contains('\n'));
        }
        let s =
            "mux:tcp=127.0.0.1:1:token-file=/a\\:b:tls-cert=c:tls-key=k,sock:viewer-token-file=v";
        assert_eq!(p(s).unwrap().to_string(), s);
    }

    #[test]
    fn messages_quoting_input_stay_one_line() {
        // Found by the console_spec fuzz target: input with control characters made
        // multi-line (or terminal-driving) error messages.
        for spec in [
            "bo\ngus",
            "mux:stdio,\x1b[2J",
            "file=a:x\0",
            "\r",
            "tcp=\t:1",
        ] {
            let msg = p(spec).unwrap_err().to_string();
            assert!(!msg.chars().any(char::is_control), "{msg:?}");
        }
        assert_eq!(one_line("a\nb\x1b"), "a\\nb\\u{1b}");
        assert_eq!(one_line("plain"), "plain");
    }

    #[test]
    fn help_mentions_every_kind() {
        for k in [
            "stdio",
            "ring",
            "file=",
            "sock",
            "tcp=",
            "rotate=",
            "keep=",
            "timestamps",
            "mode=",
        ] {
            assert!(CONSOLE_SPEC_HELP.contains(k), "{k}");
        }
    }

    fn arb_backend() -> impl Strategy<Value = BackendSpec> {
        let path = "[a-z/:,\\\\.]{1,20}".prop_map(PathBuf::from);
        prop_oneof![
            Just(BackendSpec::Stdio),
            (1usize..(1 << 24)).prop_map(|size| BackendSpec::Ring { size }),
            (
                path.clone(),
                proptest::option::of(1u64..(1 << 32)),
                1u32..100,
                any::<bool>()
            )
                .prop_map(|(path, rotate, keep, timestamps)| BackendSpec::File(
                    FileSpec {
                        path,
                        rotate,
                        keep,
                        timestamps
                    }
                )),
            (
                proptest::option::of(path),
                any::<bool>(),
                any::<bool>(),
                1usize..1024,
                1usize..(1 << 24),
                0u32..0o1000,
                proptest::option::of(1u64..604_800_000),
            )
                .prop_map(
                    |(p, read_only, single_writer, max_clients, queue, mode, idle)| {
                        BackendSpec::Sock(SockSpec {
                            listen: Listen::Unix(p),
                            read_only,
                            single_writer,
                            max_clients,
                            queue,
                            mode,
                            idle_timeout: idle.map(Duration::from_millis),
                            auth: AuthSpec::default(),
                        })
                    }
                ),
            (any::<[u8; 4]>(), any::<u16>(), any::<bool>(), 0u8..4).prop_map(
                |(ip, port, read_only, auth)| {
                    let mut s = SockSpec::new(Listen::Tcp(SocketAddr::from((ip, port))));
                    s.read_only = read_only;
                    match auth {
                        0 => s.auth.insecure = true,
                        1 => s.auth.token_file = Some("/t:k".into()),
                        2 => {
                            s.auth.viewer_token_file = Some("v".into());
                            s.auth.tls = Some(TlsSpec {
                                cert: "c".into(),
                                key: "k,".into(),
                                client_ca: None,
                            });
                        }
                        _ => {
                            s.auth.tls = Some(TlsSpec {
                                cert: "c".into(),
                                key: "k".into(),
                                client_ca: Some("ca".into()),
                            });
                        }
                    }
                    BackendSpec::Sock(s)
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn display_round_trips(b in proptest::collection::vec(arb_backend(), 1..4)) {
            let spec = ConsoleSpec { backends: b };
            match spec.to_string().parse::<ConsoleSpec>() {
                Ok(back) => prop_assert_eq!(back, spec),
                // Random specs may repeat stdio/ring/a path: that must be the only failure.
                Err(SpecError::Duplicate(_)) => {}
                Err(e) => prop_assert!(false, "{} did not parse: {}", spec, e),
            }
        }

        #[test]
        fn parser_never_panics(s in ".{0,60}") {
            let _ = s.parse::<ConsoleSpec>();
        }
    }
}
