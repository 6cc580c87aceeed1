//! Socket listeners: who gets in (admission), and who may type on a single-writer
//! console (arbitration). Everything a client is allowed or refused is decided here.
//!
//! Admission:
//! * At most `max-clients` clients. When full, a newcomer takes the place of the client
//!   idle longest (neither typing nor taking output), if that one has been idle at least
//!   [`crate::mux::HubConfig::evict_idle`]; otherwise the newcomer is told the console is
//!   busy and closed. So idle connections cannot lock everyone out for good.
//! * `idle-timeout=`: a client idle that long is told so and disconnected.
//! * `accept` failing for lack of resources (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`)
//!   stops accepting for a while (100 ms, doubling up to 2 s) instead of spinning on a
//!   listener that stays readable; each failure is counted, and logged (rate-limited).
//! * The process's open-file limit is checked at start against every listener's
//!   `max-clients` ([`check_fd_budget`]).
//!
//! Authentication (`token-file`, `viewer-token-file`, TLS): a new connection is first a
//! [`Pending`] admission, not a client: it has a deadline
//! ([`crate::mux::HubConfig::handshake_timeout`]), counts against a small limit of its
//! own ([`MAX_PENDING`] per listener; when full, the oldest pending one is dropped, so
//! silent connections cannot lock real clients out), and gets nothing of the console.
//! Each readiness event moves it on without blocking: the TLS handshake, then the token
//! line (`auth.rs` judges it). Proven, it becomes a client with its role (writer or
//! viewer); refused, it is told why (`auth::Refusal::reply`), its write side is shut and
//! what it still sends is drained and dropped for a moment (so the reply is not lost to
//! a reset), then it is closed. Nothing it sent reaches the guest.
//!
//! Arbitration (`single-writer`): the first client to type holds the keyboard; another
//! takes it with Ctrl-A w, and every client of the listener is told. A non-holder's
//! other input is read and dropped, and it is told once why.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ServerConfig;

use super::auth::{self, ClientRole, Greeting, Refusal, Tokens};
use super::backend::socket::{Listener, Stream};
use super::backend::{BackendError, Port};
use super::endpoint::{EndpointId, InputMode, Source};
use super::escape::EscapeAction;
use super::spec::{Listen, SockSpec};
use super::stats::ListenerStats;
use super::tls;

/// File descriptors microvm needs besides socket clients (KVM, vCPUs, eventfds, epoll,
/// stdio, logs, listeners), with room to spare.
pub const RESERVED_FDS: u64 = 64;
/// The first accept back-off after a resource failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest accept back-off.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How the busy message starts.
const BUSY_PREFIX: &str = "microvm: console busy: ";

/// The busy message a refused client gets (then the connection is closed).
pub(crate) fn busy_message(clients: usize, max: usize) -> String {
    format!("{BUSY_PREFIX}already {clients} clients (max-clients={max})\r\n")
}

/// The refusal, when `all` (everything a connection received before it closed) is
/// exactly a busy message: `microvm attach` then exits 1 instead of 0.
pub(crate) fn busy_refusal(all: &[u8]) -> Option<String> {
    let line = std::str::from_utf8(all).ok()?.strip_suffix("\r\n")?;
    (line.starts_with(BUSY_PREFIX) && !line.contains('\n')).then(|| line.to_string())
}

/// Errors checking the open-file budget.
#[derive(Debug, thiserror::Error)]
#[error(
    "console sockets may have {clients} clients in all (max-clients), which needs about {need} open files, but this process may open {limit} (ulimit -n); lower max-clients or raise the limit"
)]
pub struct FdBudgetError {
    /// Sum of `max-clients`.
    pub clients: u64,
    /// File descriptors needed.
    pub need: u64,
    /// The limit.
    pub limit: u64,
}

/// Checks that `clients` socket clients (all listeners of all hubs) fit in the open-file
/// limit, raising the soft limit towards the hard one if that is enough.
pub fn check_fd_budget(clients: u64) -> Result<(), FdBudgetError> {
    if clients == 0 {
        return Ok(());
    }
    let need = clients.saturating_add(RESERVED_FDS);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Ok(());
    }
    if lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max >= need {
        let raised = libc::rlimit {
            rlim_cur: need,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one valid rlimit; raising the soft limit up to the
        // hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(());
        }
    }
    Err(FdBudgetError {
        clients,
        need,
        limit: lim.rlim_cur,
    })
}

/// Most connections per listener waiting to prove who they are.
pub const MAX_PENDING: usize = 8;
/// How long a refused connection is drained before it is closed.
const LINGER: Duration = Duration::from_secs(1);

/// How a listener lets clients in: its tokens and TLS, read at start.
pub(crate) struct Admission {
    pub tokens: Tokens,
    pub tls: Option<Arc<ServerConfig>>,
    /// TLS clients must present a certificate the listener's CA signed.
    pub client_certs: bool,
}

impl Admission {
    /// Reads the token files and TLS files `spec` names, and says on stderr what a
    /// listener without authentication lets in.
    pub(crate) fn load(spec: &SockSpec) -> Result<Admission, BackendError> {
        let tokens = Tokens::load(&spec.auth)?;
        let tls = spec.auth.tls.as_ref().map(tls::server_config).transpose()?;
        if let Listen::Tcp(addr) = spec.listen {
            if spec.auth.insecure {
                log::warn!(
                    "warning: console on tcp {addr} is insecure: anyone who can connect to it may type into the guest"
                );
            } else if tls.is_none() && !addr.ip().is_loopback() {
                log::warn!(
                    "warning: console on tcp {addr} is reachable from the network without TLS: tokens and the console cross it in clear (add tls-cert and tls-key)"
                );
            }
        }
        let client_certs = spec
            .auth
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca.is_some());
        Ok(Admission {
            tokens,
            tls,
            client_certs,
        })
    }

    /// New connections must prove who they are before they become clients.
    pub(crate) fn needed(&self) -> bool {
        self.tokens.required() || self.tls.is_some()
    }
}

/// A connection that has not proven who it is yet (see the module doc).
pub(crate) struct Pending {
    /// Its listener's index.
    pub listener: usize,
    pub stream: Stream,
    /// Its address, for the log.
    pub peer: String,
    /// What it sent of its first line so far.
    line: Vec<u8>,
    pub opened: Instant,
    pub deadline: Instant,
    /// Refused: drained until it closes or the deadline.
    pub closing: bool,
    /// Interest registered with epoll.
    pub reg: Option<event_manager::EventSet>,
}

/// What a step of a pending admission gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Waiting for the peer.
    Wait,
    /// Proven: a client with this role.
    Admit(ClientRole),
    /// Refused and told why; it lingers, draining, until closed.
    Refused(Refusal),
    /// Done: close it now.
    Close,
}

impl Pending {
    pub(crate) fn new(
        listener: usize,
        stream: Stream,
        peer: String,
        now: Instant,
        timeout: Duration,
    ) -> Pending {
        Pending {
            listener,
            stream,
            peer,
            line: Vec::new(),
            opened: now,
            deadline: now + timeout,
            closing: false,
            reg: None,
        }
    }

    /// Moves it on with what its socket has, never waiting.
    pub(crate) fn step(&mut self, adm: &Admission, now: Instant) -> Step {
        if self.closing {
            return self.drain();
        }
        if let Stream::Tls(t) = &mut self.stream {
            match t.handshake() {
                Ok(true) => {}
                Ok(false) => return Step::Wait,
                Err(_) => return Step::Close,
            }
            if !adm.tokens.required() {
                // The client certificate is the proof (rustls verified its chain), or
                // the listener is insecure.
                return if !adm.client_certs || self.stream.peer_verified() {
                    Step::Admit(ClientRole::Writer)
                } else {
                    Step::Close
                };
            }
        }
        let mut buf = [0u8; auth::MAX_LINE];
        loop {
            let room = auth::MAX_LINE - self.line.len();
            let got = match &mut self.stream {
                // One byte at a time from rustls' buffer: what follows the line stays
                // there for the client endpoint.
                Stream::Tls(t) => t.read(&mut buf[..1]),
                plain => match plain.peek(&mut buf[..room]) {
                    Ok(0) => Ok(0),
                    Ok(n) => {
                        let take = auth::line_part(self.line.len(), &buf[..n]);
                        plain.read(&mut buf[..take])
                    }
                    Err(e) => Err(e),
                },
            };
            match got {
                Ok(0) => return Step::Close,
                Ok(n) => self.line.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                Err(_) => return Step::Close,
            }
            match auth::judge(&self.line, &adm.tokens) {
                Greeting::NeedMore => {}
                Greeting::Admit(role) => return Step::Admit(role),
                Greeting::Refuse(r) => {
                    self.refuse(r, now);
                    return Step::Refused(r);
                }
            }
        }
    }

    /// Tells it why, shuts our side, and drains it for [`LINGER`].
    fn refuse(&mut self, r: Refusal, now: Instant) {
        let _ = self.stream.write_first(r.reply().as_bytes());
        self.stream.finish();
        self.closing = true;
        self.deadline = self.deadline.min(now + LINGER);
    }

    /// Reads and drops what a refused peer still sends; `Close` at its end.
    fn drain(&mut self) -> Step {
        let mut buf = [0u8; 4096];
        for _ in 0..16 {
            match self.stream.read(&mut buf) {
                Ok(0) => return Step::Close,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                Err(_) => return Step::Close,
            }
        }
        Step::Wait
    }

    /// Its deadline passed: told so if it got as far as the token line; the refusal,
    /// if any, for the log.
    pub(crate) fn expire(&mut self) -> Option<Refusal> {
        if self.closing || self.stream.handshaking() {
            return None;
        }
        let _ = self.stream.write_first(Refusal::Timeout.reply().as_bytes());
        self.stream.finish();
        Some(Refusal::Timeout)
    }
}

/// What an accept attempt gave.
pub(crate) enum Accepted {
    /// A new connection, and its peer's address.
    Client(Stream, String),
    /// Nothing (more) pending, or accepting is paused.
    Done,
    /// This connection failed before it was ours; try the next.
    Again,
}

/// One socket listener and its clients' bookkeeping.
pub(crate) struct ListenerState {
    pub sock: Listener,
    pub spec: SockSpec,
    pub admission: Admission,
    /// Live clients.
    pub clients: usize,
    /// The client holding the keyboard (single-writer), by endpoint token.
    pub holder: Option<EndpointId>,
    /// Clients accepted so far.
    pub seen: u64,
    /// Registered with epoll for readability now.
    pub watched: bool,
    /// Accepting is paused until then (after a resource failure).
    pub paused_until: Option<Instant>,
    backoff: Duration,
    pub refused: u64,
    /// Connections refused or dropped before they proved who they are.
    pub unauthenticated: u64,
    pub idle_closed: u64,
    pub accept_failures: u64,
    /// Traffic and cut-offs of clients already gone.
    pub gone_cut_off: u64,
    pub gone_written: u64,
    pub gone_typed: u64,
}

impl ListenerState {
    pub(crate) fn new(sock: Listener, spec: SockSpec, admission: Admission) -> ListenerState {
        ListenerState {
            sock,
            spec,
            admission,
            unauthenticated: 0,
            clients: 0,
            holder: None,
            seen: 0,
            watched: false,
            paused_until: None,
            backoff: BACKOFF_MIN,
            refused: 0,
            idle_closed: 0,
            accept_failures: 0,
            gone_cut_off: 0,
            gone_written: 0,
            gone_typed: 0,
        }
    }

    /// Whether the listener should be watched for new connections now.
    pub(crate) fn accepting(&mut self, now: Instant) -> bool {
        match self.paused_until {
            Some(t) if now < t => false,
            Some(_) => {
                self.paused_until = None;
                true
            }
            None => true,
        }
    }

    /// Accepts one pending connection (non-blocking).
    pub(crate) fn accept_one(&mut self, now: Instant) -> Accepted {
        if self.paused_until.is_some_and(|t| now < t) {
            return Accepted::Done;
        }
        match self.sock.accept() {
            Ok((s, peer)) => {
                self.backoff = BACKOFF_MIN;
                Accepted::Client(s, peer)
            }
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock => Accepted::Done,
                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => Accepted::Again,
                _ => {
                    // Out of file descriptors or memory, or anything else unexpected: the
                    // listener stays readable, so do not retry at once.
                    self.accept_failures += 1;
                    self.paused_until = Some(now + self.backoff);
                    log::warn!(
                        "console socket {}: cannot accept a client: {e}; trying again in {} ms",
                        self.sock.describe(),
                        self.backoff.as_millis()
                    );
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    Accepted::Done
                }
            },
        }
    }

    /// A new client's number (1, 2, ...).
    pub(crate) fn admit(&mut self) -> u64 {
        self.clients += 1;
        self.seen += 1;
        self.seen
    }

    /// A client of this listener went away.
    pub(crate) fn left(&mut self, id: EndpointId, cut_off: bool, written: u64, typed: u64) {
        self.clients = self.clients.saturating_sub(1);
        self.gone_cut_off += u64::from(cut_off);
        self.gone_written += written;
        self.gone_typed += typed;
        if self.holder == Some(id) {
            self.holder = None;
        }
    }

    /// True when `source` (a client of this listener, endpoint `id`) has its input
    /// read and dropped rather than delivered.
    pub(crate) fn discards(&self, id: EndpointId, source: &Source) -> bool {
        match source.mode {
            InputMode::Viewer => true,
            InputMode::Contender(_) => self.holder.is_some_and(|h| h != id),
            _ => false,
        }
    }

    /// Decides what happens to a read from `source` (endpoint `id`).
    pub(crate) fn keyboard(
        &mut self,
        id: EndpointId,
        source: &mut Source,
        data: &[u8],
    ) -> Keyboard {
        let InputMode::Contender(parser) = &mut source.mode else {
            return if matches!(source.mode, InputMode::Viewer) {
                Keyboard::Drop
            } else {
                Keyboard::Deliver
            };
        };
        match self.holder {
            Some(h) if h == id => Keyboard::Deliver,
            None => {
                self.holder = Some(id);
                source.told_readonly = false;
                Keyboard::TookFree
            }
            Some(_) => {
                let (mut out, mut acts) = (Vec::new(), Vec::new());
                parser.feed(data, &mut out, &mut acts);
                if acts.contains(&EscapeAction::TakeOver) {
                    self.holder = Some(id);
                    source.told_readonly = false;
                    Keyboard::TookOver
                } else if !source.told_readonly {
                    source.told_readonly = true;
                    Keyboard::TellReadOnly
                } else {
                    Keyboard::Drop
                }
            }
        }
    }

    /// This listener's line in the stats; `live` are its connected clients' (cut off,
    /// written, typed) counts.
    pub(crate) fn stats(&self, live: impl Iterator<Item = (bool, u64, u64)>) -> ListenerStats {
        let (mut cut, mut written, mut typed) =
            (self.gone_cut_off, self.gone_written, self.gone_typed);
        for (c, w, t) in live {
            cut += u64::from(c);
            written += w;
            typed += t;
        }
        ListenerStats {
            name: self.sock.describe(),
            clients_seen: self.seen,
            clients_now: self.clients,
            clients_cut_off: cut,
            clients_refused: self.refused,
            clients_unauthenticated: self.unauthenticated,
            clients_idle_closed: self.idle_closed,
            accept_failures: self.accept_failures,
            bytes_out: written,
            bytes_in: typed,
        }
    }
}

/// What [`ListenerState::keyboard`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keyboard {
    /// The bytes go to the guest.
    Deliver,
    /// The bytes are dropped.
    Drop,
    /// Dropped, and the client is told (once) that another has the keyboard.
    TellReadOnly,
    /// It typed on a free keyboard and holds it now: deliver, and tell everyone.
    TookFree,
    /// It took the keyboard with Ctrl-A w (this read is dropped): tell everyone.
    TookOver,
}

/// The notice a client gets when another holds the keyboard.
pub(crate) const READ_ONLY_NOTICE: &str =
    "\r\n[microvm: another client has the keyboard; Ctrl-A w takes it over]\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_refusal_is_the_whole_busy_message_only() {
        let msg = busy_message(2, 2);
        assert_eq!(
            busy_refusal(msg.as_bytes()).as_deref(),
            Some(msg.trim_end())
        );
        for other in [
            format!("boot log\r\n{msg}"),
            format!("{msg}more output"),
            msg.trim_end().to_string(),
            String::new(),
        ] {
            assert_eq!(busy_refusal(other.as_bytes()), None, "{other:?}");
        }
    }
}
