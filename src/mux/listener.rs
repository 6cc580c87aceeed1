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
//! Arbitration (`single-writer`): the first client to type holds the keyboard; another
//! takes it with Ctrl-A w, and every client of the listener is told. A non-holder's
//! other input is read and dropped, and it is told once why.

use std::io;
use std::time::{Duration, Instant};

use super::backend::Port;
use super::backend::socket::Listener;
use super::endpoint::{InputMode, Source};
use super::escape::EscapeAction;
use super::spec::SockSpec;
use super::stats::ListenerStats;

/// File descriptors microvm needs besides socket clients (KVM, vCPUs, eventfds, epoll,
/// stdio, logs, listeners), with room to spare.
pub const RESERVED_FDS: u64 = 64;
/// The first accept back-off after a resource failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest accept back-off.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The busy message a refused client gets.
pub(crate) fn busy_message(clients: usize, max: usize) -> String {
    format!("microvm: console busy: already {clients} clients (max-clients={max})\r\n")
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

/// What an accept attempt gave.
pub(crate) enum Accepted {
    /// A new connection.
    Client(Box<dyn Port>),
    /// Nothing (more) pending, or accepting is paused.
    Done,
    /// This connection failed before it was ours; try the next.
    Again,
}

/// One socket listener and its clients' bookkeeping.
pub(crate) struct ListenerState {
    pub sock: Listener,
    pub spec: SockSpec,
    /// Live clients.
    pub clients: usize,
    /// The client holding the keyboard (single-writer), by endpoint token.
    pub holder: Option<u32>,
    /// Clients accepted so far.
    pub seen: u64,
    /// Registered with epoll for readability now.
    pub watched: bool,
    /// Accepting is paused until then (after a resource failure).
    pub paused_until: Option<Instant>,
    backoff: Duration,
    pub refused: u64,
    pub idle_closed: u64,
    pub accept_failures: u64,
    /// Traffic and cut-offs of clients already gone.
    pub gone_cut_off: u64,
    pub gone_written: u64,
    pub gone_typed: u64,
}

impl ListenerState {
    pub(crate) fn new(sock: Listener, spec: SockSpec) -> ListenerState {
        ListenerState {
            sock,
            spec,
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
            Ok(s) => {
                self.backoff = BACKOFF_MIN;
                Accepted::Client(Box::new(s))
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
    pub(crate) fn left(&mut self, token: u32, cut_off: bool, written: u64, typed: u64) {
        self.clients = self.clients.saturating_sub(1);
        self.gone_cut_off += u64::from(cut_off);
        self.gone_written += written;
        self.gone_typed += typed;
        if self.holder == Some(token) {
            self.holder = None;
        }
    }

    /// True when `source` (a client of this listener, endpoint `token`) has its input
    /// read and dropped rather than delivered.
    pub(crate) fn discards(&self, token: u32, source: &Source) -> bool {
        match source.mode {
            InputMode::Viewer => true,
            InputMode::Contender(_) => self.holder.is_some_and(|h| h != token),
            _ => false,
        }
    }

    /// Decides what happens to a read from `source` (endpoint `token`).
    pub(crate) fn keyboard(&mut self, token: u32, source: &mut Source, data: &[u8]) -> Keyboard {
        let InputMode::Contender(parser) = &mut source.mode else {
            return if matches!(source.mode, InputMode::Viewer) {
                Keyboard::Drop
            } else {
                Keyboard::Deliver
            };
        };
        match self.holder {
            Some(h) if h == token => Keyboard::Deliver,
            None => {
                self.holder = Some(token);
                source.told_readonly = false;
                Keyboard::TookFree
            }
            Some(_) => {
                let (mut out, mut acts) = (Vec::new(), Vec::new());
                parser.feed(data, &mut out, &mut acts);
                if acts.contains(&EscapeAction::TakeOver) {
                    self.holder = Some(token);
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
