//! A backend as the hub sees it: a [`Port`] with an optional output half (a [`Sink`])
//! and an optional input half (a [`Source`]), and the ONE table ([`plan`]) that decides,
//! from what the backend is, its output policy and its input mode.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use event_manager::EventSet;

use super::backend::Port;
use super::backend::file::LineStamper;
use super::escape::{EscapeKeys, EscapeParser};
use super::fanout::{Gone, Policy, Sink};
use super::input::Share;
use super::ring::ByteRing;
use super::spec::SockSpec;
use super::stats::BackendStats;

/// What a backend's input is for.
pub(crate) enum InputMode {
    /// Typed into the guest.
    Guest,
    /// The VMM's terminal: Ctrl-A keys first, the rest to the guest.
    Terminal(EscapeParser),
    /// Read and dropped (a read-only viewer).
    Viewer,
    /// A single-writer client: typed into the guest while it holds the keyboard (its
    /// listener knows who does), else read for Ctrl-A w only.
    Contender(EscapeParser),
}

/// A backend's input half.
pub(crate) struct Source {
    pub mode: InputMode,
    /// End of input seen.
    pub eof: bool,
    /// A contender was told it does not have the keyboard (told once per loss).
    pub told_readonly: bool,
}

impl Source {
    fn new(mode: InputMode) -> Source {
        Source {
            mode,
            eof: false,
            told_readonly: false,
        }
    }

    /// Which share of the input buffer its reads may use.
    pub fn share(&self) -> Share {
        match self.mode {
            InputMode::Terminal(_) => Share::Terminal,
            _ => Share::Other,
        }
    }
}

/// The key of an endpoint in its hub (and of its epoll token), unique while it lives.
pub(crate) type EndpointId = u32;

/// Who a backend belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// One of the spec's backends (stdin, stdout, a log file).
    Backend,
    /// A client of socket listener `listener`, the `number`-th it admitted ("client
    /// NUMBER on SOCKET" in messages).
    Client { listener: usize, number: u64 },
}

/// What a backend is, for [`plan`].
pub(crate) enum Role<'a> {
    /// The VMM's stdout.
    Stdout,
    /// The VMM's stdin; `tty` when it is a terminal in raw mode.
    Stdin { tty: bool },
    /// A `file=` log; `regular` when it is a regular file (not a FIFO or device).
    Log { regular: bool },
    /// A client of a socket listener with this spec; `viewer` when it proved a viewer's
    /// token.
    Client { spec: &'a SockSpec, viewer: bool },
    /// Input microvm itself types (`--send-after`).
    Script,
}

/// The limits [`plan`] hands out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most charged bytes a lossless sink queues (its backlog paces the guest well
    /// before that).
    pub lossless: usize,
    /// Most charged bytes a drop-and-count sink queues.
    pub drop_and_count: usize,
    /// History replayed to a new client; a client may always be this far behind.
    pub history: usize,
}

/// A backend's declared halves: the output policy with its limit, the input mode.
pub(crate) struct Plan {
    pub sink: Option<(Policy, usize)>,
    pub input: Option<InputMode>,
}

/// THE policy table: what each kind of backend does when behind, and what its input is.
///
/// | backend | output | input |
/// |---|---|---|
/// | stdout | lossless, paces the guest | - |
/// | stdin | - | escape keys on a tty, else to the guest |
/// | `file=` regular file | lossless, paces the guest | - |
/// | `file=` FIFO or device | drop and count | - |
/// | socket client | cut off when more than max(queue, history) behind | viewer (`ro`, or a viewer's token), contender (`single-writer`), or to the guest |
/// | `--send-after` script | - | to the guest |
pub(crate) fn plan(role: Role<'_>, limits: &Limits) -> Plan {
    match role {
        Role::Stdout => Plan {
            sink: Some((Policy::Lossless, limits.lossless)),
            input: None,
        },
        Role::Stdin { tty } => Plan {
            sink: None,
            input: Some(if tty {
                InputMode::Terminal(EscapeParser::new(EscapeKeys::Stdio))
            } else {
                InputMode::Guest
            }),
        },
        Role::Log { regular: true } => Plan {
            sink: Some((Policy::Lossless, limits.lossless)),
            input: None,
        },
        Role::Log { regular: false } => Plan {
            sink: Some((Policy::DropAndCount, limits.drop_and_count)),
            input: None,
        },
        Role::Script => Plan {
            sink: None,
            input: Some(InputMode::Guest),
        },
        Role::Client { spec, viewer } => Plan {
            sink: Some((Policy::CutOff, spec.queue.max(limits.history))),
            input: Some(if spec.read_only || viewer {
                InputMode::Viewer
            } else if spec.single_writer {
                InputMode::Contender(EscapeParser::new(EscapeKeys::TakeOver))
            } else {
                InputMode::Guest
            }),
        },
    }
}

/// One backend endpoint.
pub(crate) struct Endpoint {
    pub name: String,
    pub port: Box<dyn Port>,
    /// Pollable fd (None: never polled).
    pub fd: Option<RawFd>,
    /// Interest currently registered with epoll.
    pub reg: Option<EventSet>,
    /// Input readable without polling (peer hung up, or stdin is a regular file).
    pub parked: bool,
    pub owner: Owner,
    pub sink: Option<Sink>,
    pub source: Option<Source>,
    /// Bytes typed into it.
    pub typed: u64,
    /// Bytes delivered and lost by a sink it no longer has.
    pub retired_out: (u64, u64),
    /// Set when it is to be removed, and how.
    pub closing: Option<Closing>,
    /// Cut off by its sink's policy.
    pub cut_off: bool,
    /// Last time it typed or took output (idle clients).
    pub last_active: Instant,
    /// `:timestamps`: its copy of the stream gets line-start timestamps.
    pub stamper: Option<LineStamper>,
    /// The stamped copy of a chunk (reused).
    stamped: Vec<u8>,
}

/// How an endpoint leaves the hub.
pub(crate) enum Closing {
    /// Routine (a client hung up): nothing logged.
    Quietly,
    /// Worth a line in the log: this one.
    Logged(String),
}

/// What one read from a source gave.
pub(crate) enum Read {
    Data(usize),
    Eof,
    WouldBlock,
    Failed(io::Error),
}

impl Endpoint {
    /// An endpoint with the halves `plan` declares; a cut-off sink starts reading the
    /// stream at `pos`.
    pub(crate) fn new(
        name: String,
        port: Box<dyn Port>,
        owner: Owner,
        plan: Plan,
        pos: u64,
    ) -> Endpoint {
        let fd = port.fd();
        let sink = plan.sink.map(|(policy, limit)| match policy {
            Policy::CutOff => Sink::cursor(pos, limit),
            _ => Sink::queued(policy, limit),
        });
        Endpoint {
            name,
            port,
            fd,
            reg: None,
            parked: false,
            owner,
            sink,
            source: plan.input.map(Source::new),
            typed: 0,
            retired_out: (0, 0),
            closing: None,
            cut_off: false,
            last_active: Instant::now(),
            stamper: None,
            stamped: Vec::new(),
        }
    }

    pub(crate) fn is_client(&self) -> bool {
        matches!(self.owner, Owner::Client { .. })
    }

    /// Marks it for removal (the first reason wins).
    pub(crate) fn close(&mut self, how: Closing) {
        if self.closing.is_none() {
            self.closing = Some(how);
        }
    }

    /// Marked for removal.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.is_some()
    }

    pub(crate) fn input_live(&self) -> bool {
        self.source.as_ref().is_some_and(|s| !s.eof)
    }

    fn gone(&mut self, g: Gone) {
        let why = match g {
            Gone::CutOff { limit } => {
                self.cut_off = true;
                format!(
                    "console {} cut off: it stopped reading (more than {limit} bytes behind)",
                    self.name
                )
            }
            Gone::Failed(e) => format!("console backend {} dropped: {e}", self.name),
        };
        self.drop_sink();
        // A client leaving is routine; a backend failing is worth a line. An endpoint
        // whose input still has bytes to deliver stays until they are read.
        if self.cut_off || !self.input_live() {
            let quiet = self.is_client() && !self.cut_off;
            self.close(if quiet {
                Closing::Quietly
            } else {
                Closing::Logged(why)
            });
        }
    }

    /// Offers a chunk of the stream (already in `ring`) to its sink.
    pub(crate) fn offer(&mut self, data: &[u8], ring: &ByteRing, shared: &mut Option<Arc<[u8]>>) {
        if self.is_closing() || self.parked {
            return;
        }
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        let before = sink.written;
        let offered = match self.stamper.as_mut() {
            Some(stamper) => {
                self.stamped.clear();
                stamper.stamp(data, &mut self.stamped);
                // Its own copy: the stream's shared chunk is not what this sink gets.
                sink.offer(self.port.as_mut(), &self.stamped, ring, &mut None)
            }
            None => sink.offer(self.port.as_mut(), data, ring, shared),
        };
        match offered {
            Err(g) => self.gone(g),
            Ok(()) if sink.written > before => self.last_active = Instant::now(),
            Ok(()) => {}
        }
    }

    /// Stops its output (the peer is gone), keeping the counts.
    pub(crate) fn drop_sink(&mut self) {
        if let Some(s) = self.sink.take() {
            self.retired_out = (
                self.retired_out.0 + s.written,
                self.retired_out.1 + s.dropped,
            );
        }
    }

    /// Writes what its port holds of its own (TLS ciphertext), then what its sink has
    /// pending, until the port would block.
    pub(crate) fn flush(&mut self, ring: &ByteRing) {
        if self.sink.is_some()
            && self.port.buffered()
            && let Err(e) = self.port.push_buffered()
        {
            return self.gone(Gone::Failed(e));
        }
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        let before = sink.written;
        if let Err(g) = sink.flush(self.port.as_mut(), ring, &self.name) {
            return self.gone(g);
        }
        if sink.written > before {
            self.last_active = Instant::now();
        }
    }

    /// A message for this backend only.
    pub(crate) fn notice(&mut self, msg: &str, ring: &ByteRing) {
        if let Some(sink) = self.sink.as_mut() {
            sink.notice(msg, ring);
        }
        self.flush(ring);
    }

    /// Output it has yet to write: its sink's backlog, plus one when its port holds
    /// bytes of its own (TLS ciphertext waiting for the socket).
    pub(crate) fn pending(&self, ring: &ByteRing) -> usize {
        self.sink
            .as_ref()
            .map_or(0, |s| s.pending(ring) + usize::from(self.port.buffered()))
    }

    /// Reads into `buf`; marks end of input.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> Read {
        match self.port.read(buf) {
            Ok(0) => {
                if let Some(s) = self.source.as_mut() {
                    s.eof = true;
                }
                Read::Eof
            }
            Ok(n) => {
                self.last_active = Instant::now();
                Read::Data(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Read::WouldBlock,
            Err(e) => Read::Failed(e),
        }
    }

    /// Bytes delivered to it and bytes it lost, so far.
    pub(crate) fn out_counts(&self) -> (u64, u64) {
        let (w, d) = self
            .sink
            .as_ref()
            .map_or((0, 0), |s| (s.written, s.dropped));
        (self.retired_out.0 + w, self.retired_out.1 + d)
    }

    /// This backend's line in the stats.
    pub(crate) fn stats(&self, state: &'static str) -> BackendStats {
        let (bytes_out, dropped) = self.out_counts();
        BackendStats {
            name: self.name.clone(),
            bytes_out,
            dropped,
            bytes_in: self.typed,
            state,
        }
    }
}
