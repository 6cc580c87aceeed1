//! `sock[=PATH]` and `tcp=ADDR:PORT`: where a console server listens, its options, and
//! who may get in (`AuthSpec`).
//!
//! A tcp console is authenticated or explicitly insecure: it needs a token file, a
//! viewer token file or a client-certificate CA (`tls-client-ca`), or the word
//! `insecure`; a unix socket is guarded by its file mode and may add tokens.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{
    DEFAULT_CLIENT_QUEUE, DEFAULT_MAX_CLIENTS, DEFAULT_SOCKET_MODE, MAX_CLIENTS, MAX_IDLE_TIMEOUT,
    MAX_QUEUE, SpecError, escape, parse_count, split_opt, unescape, usize_size,
};
use crate::host::units;

/// Where a socket server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix stream socket; `None` picks a default path at start.
    Unix(Option<PathBuf>),
    /// A TCP listener.
    Tcp(SocketAddr),
}

/// TLS for a tcp console: the server's certificate chain and key (PEM files), and
/// optionally the CA that client certificates must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpec {
    /// `tls-cert=`: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// `tls-key=`: its private key.
    pub key: PathBuf,
    /// `tls-client-ca=`: clients must present a certificate signed by it.
    pub client_ca: Option<PathBuf>,
}

/// Who may connect: tokens (secrets in files), TLS, or nobody checked (`insecure`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthSpec {
    /// `token-file=`: the writer token (a viewer's on a `ro` console).
    pub token_file: Option<PathBuf>,
    /// `viewer-token-file=`: a token that may watch, never type.
    pub viewer_token_file: Option<PathBuf>,
    /// `tls-cert=`, `tls-key=`, `tls-client-ca=`.
    pub tls: Option<TlsSpec>,
    /// `insecure`: a tcp console anyone who can connect may use.
    pub insecure: bool,
}

impl AuthSpec {
    /// Clients must prove who they are (a token or a client certificate).
    pub fn authenticates(&self) -> bool {
        self.token_file.is_some()
            || self.viewer_token_file.is_some()
            || self.tls.as_ref().is_some_and(|t| t.client_ca.is_some())
    }

    /// A client sends a token line before it is admitted.
    pub fn has_tokens(&self) -> bool {
        self.token_file.is_some() || self.viewer_token_file.is_some()
    }
}

/// `sock[=PATH]` / `tcp=ADDR:PORT` and their options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SockSpec {
    /// Address.
    pub listen: Listen,
    /// Clients are viewers: their input is ignored.
    pub read_only: bool,
    /// One client holds the keyboard at a time.
    pub single_writer: bool,
    /// Simultaneous clients.
    pub max_clients: usize,
    /// Per-client output queue in bytes.
    pub queue: usize,
    /// Permissions of a unix socket file ([`DEFAULT_SOCKET_MODE`] unless asked).
    pub mode: u32,
    /// Disconnect a client idle this long (neither typing nor taking output).
    pub idle_timeout: Option<Duration>,
    /// Who may connect.
    pub auth: AuthSpec,
}

impl SockSpec {
    pub(super) fn new(listen: Listen) -> Self {
        SockSpec {
            listen,
            read_only: false,
            single_writer: false,
            max_clients: DEFAULT_MAX_CLIENTS,
            queue: DEFAULT_CLIENT_QUEUE,
            mode: DEFAULT_SOCKET_MODE,
            idle_timeout: None,
            auth: AuthSpec::default(),
        }
    }

    fn is_tcp(&self) -> bool {
        matches!(self.listen, Listen::Tcp(_))
    }
}

/// TLS paths seen so far (checked together once every option is read).
#[derive(Default)]
struct TlsParts {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

/// Applies the options `opts` of backend item `item` (kind `kind`) to `s`, then checks
/// that they make sense together.
pub(super) fn apply_sock_opts(
    s: &mut SockSpec,
    kind: &str,
    opts: &[&str],
    item: &str,
) -> Result<(), SpecError> {
    let mut tls = TlsParts::default();
    for o in opts {
        let o = unescape(o, item)?;
        let (name, v) = split_opt(&o);
        let bad = |why| SpecError::BadOption {
            kind: kind.into(),
            opt: o.clone(),
            why,
        };
        let path = |v: &str| {
            if v.is_empty() {
                Err(bad("expected a file path"))
            } else {
                Ok(Some(PathBuf::from(v)))
            }
        };
        match (name, v) {
            ("ro", None) => s.read_only = true,
            ("single-writer" | "sw", None) => s.single_writer = true,
            ("max-clients", Some(v)) => {
                s.max_clients = parse_count(kind, &o, v, MAX_CLIENTS)? as usize
            }
            ("queue", Some(v)) => s.queue = usize_size(item, v, "queue size", MAX_QUEUE)?,
            ("idle-timeout", Some(v)) => {
                s.idle_timeout = Some(
                    units::parse_duration(v)
                        .filter(|d| *d <= MAX_IDLE_TIMEOUT)
                        .ok_or_else(|| bad("expected a duration from 1ms to 7 days, e.g. 10m"))?,
                )
            }
            ("mode", Some(v)) => {
                if s.is_tcp() {
                    return Err(bad("a tcp socket has no file mode"));
                }
                let digits = v.strip_prefix("0o").unwrap_or(v);
                s.mode = match u32::from_str_radix(digits, 8) {
                    Ok(m) if m <= 0o777 && !digits.starts_with('+') => m,
                    _ => return Err(bad("expected octal permissions from 0 to 0777, e.g. 0660")),
                };
            }
            ("token-file", Some(v)) => s.auth.token_file = path(v)?,
            ("viewer-token-file", Some(v)) => s.auth.viewer_token_file = path(v)?,
            ("tls-cert" | "tls-key" | "tls-client-ca", Some(_)) if !s.is_tcp() => {
                return Err(bad(
                    "TLS is for tcp consoles (a unix socket is guarded by its file mode)",
                ));
            }
            ("tls-cert", Some(v)) => tls.cert = path(v)?,
            ("tls-key", Some(v)) => tls.key = path(v)?,
            ("tls-client-ca", Some(v)) => tls.client_ca = path(v)?,
            ("insecure", None) if !s.is_tcp() => {
                return Err(bad(
                    "a unix socket is guarded by its file mode; insecure is for tcp",
                ));
            }
            ("insecure", None) => s.auth.insecure = true,
            _ => {
                return Err(SpecError::UnknownOption {
                    kind: kind.into(),
                    opt: o.clone(),
                });
            }
        }
    }
    let auth_err = |why| SpecError::Auth {
        part: item.to_string(),
        why,
    };
    s.auth.tls = match tls {
        TlsParts {
            cert: Some(cert),
            key: Some(key),
            client_ca,
        } => Some(TlsSpec {
            cert,
            key,
            client_ca,
        }),
        TlsParts {
            cert: None,
            key: None,
            client_ca: None,
        } => None,
        TlsParts {
            cert: None,
            key: None,
            ..
        } => return Err(auth_err("tls-client-ca needs tls-cert and tls-key too")),
        _ => return Err(auth_err("tls-cert and tls-key go together")),
    };
    if s.is_tcp() {
        match (s.auth.authenticates(), s.auth.insecure) {
            (false, false) => {
                return Err(auth_err(
                    "a tcp console needs authentication: add :token-file=PATH (a secret clients must send; :viewer-token-file=PATH for watchers), :tls-cert=PATH:tls-key=PATH:tls-client-ca=PATH (client certificates), or :insecure to let anyone who can connect type into the guest",
                ));
            }
            (true, true) => {
                return Err(auth_err(
                    "insecure and an authentication method contradict each other; drop :insecure",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn path_opt(f: &mut fmt::Formatter<'_>, name: &str, p: &Option<PathBuf>) -> fmt::Result {
    match p {
        Some(p) => write!(f, ":{name}={}", escape(&p.to_string_lossy())),
        None => Ok(()),
    }
}

impl fmt::Display for SockSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.listen {
            Listen::Unix(None) => write!(f, "sock")?,
            Listen::Unix(Some(p)) => write!(f, "sock={}", escape(&p.to_string_lossy()))?,
            Listen::Tcp(a) => write!(f, "tcp={a}")?,
        }
        if self.read_only {
            write!(f, ":ro")?;
        }
        if self.single_writer {
            write!(f, ":single-writer")?;
        }
        if self.max_clients != DEFAULT_MAX_CLIENTS {
            write!(f, ":max-clients={}", self.max_clients)?;
        }
        if self.queue != DEFAULT_CLIENT_QUEUE {
            write!(f, ":queue={}", units::format_size(self.queue as u64))?;
        }
        if self.mode != DEFAULT_SOCKET_MODE {
            write!(f, ":mode={:04o}", self.mode)?;
        }
        if let Some(d) = self.idle_timeout {
            write!(f, ":idle-timeout={}", units::format_duration(d))?;
        }
        let a = &self.auth;
        path_opt(f, "token-file", &a.token_file)?;
        path_opt(f, "viewer-token-file", &a.viewer_token_file)?;
        if let Some(t) = &a.tls {
            path_opt(f, "tls-cert", &Some(t.cert.clone()))?;
            path_opt(f, "tls-key", &Some(t.key.clone()))?;
            path_opt(f, "tls-client-ca", &t.client_ca)?;
        }
        if a.insecure {
            write!(f, ":insecure")?;
        }
        Ok(())
    }
}
