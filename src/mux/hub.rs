//! The hub: one ordered output stream fanned out to every backend, and one serialized
//! input stream from every backend to the input-target frontend.
//!
//! Threads: [`HubWriter`] runs on vCPU threads and only appends to a mutex-protected byte
//! queue and kicks an eventfd. Everything else runs on the event-loop thread inside
//! [`Hub`] (driven by `event_manager` through `MutEventSubscriber`).
//!
//! Ordering: the writer queue is a single byte vector appended under its lock, so each
//! `write` call is one contiguous chunk of the stream; the event loop takes the whole
//! queue at once and offers it to every backend in the same order. A backend either
//! receives the bytes or is dropped (cut off): no backend ever sees a reordered stream.

use super::MuxError;
use super::backend::Port;
use super::backend::file::FilePort;
use super::backend::socket::{self, Listener};
use super::backend::stdio::{StdinPort, StdoutPort};
use super::ring::ByteRing;
use super::spec::{BackendSpec, ConsoleSpec, Listen, SockSpec};
use super::term::{self, EscapeAction, EscapeKeys, EscapeParser, RawMode, log_line};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub mod fuzzing;

const TOK_WAKE: u32 = 0;
const TOK_STDIN: u32 = 1;
const TOK_STDOUT: u32 = 2;
const TOK_LISTENER: u32 = 16;
const TOK_FRONTEND: u32 = 64;
const TOK_DYNAMIC: u32 = 1024;
/// Most frontends one hub takes.
pub const MAX_FRONTENDS: usize = (TOK_DYNAMIC - TOK_FRONTEND) as usize;
/// Most listeners one hub takes (more than the spec allows).
const MAX_LISTENERS: usize = (TOK_FRONTEND - TOK_LISTENER) as usize;

/// An output observer: sees every chunk of the stream, in order, on the event-loop thread.
pub type Observer = Box<dyn FnMut(&[u8]) + Send>;

/// Only one hub in the process may own stdin/stdout.
static STDIO_CLAIMED: AtomicBool = AtomicBool::new(false);

/// Tunables; [`HubConfig::default`] is what `Hub::new` uses.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `HubWriter::congested()` is true while queued + lossless backlog exceeds this.
    pub high_water: usize,
    /// Hard cap of the writer queue and of each lossless backend's backlog. Beyond it
    /// bytes are dropped (counted, and a notice is put in the stream) instead of growing
    /// memory without bound when a guest ignores the pacing.
    pub hard_cap: usize,
    /// Input bytes held for the guest; sources stop being read while it is full.
    pub input_capacity: usize,
    /// History replayed to new socket clients when the spec has no `ring`.
    pub history: usize,
    /// Largest single read from an input source.
    pub read_chunk: usize,
    /// How long `shutdown` waits for a terminal that takes none of the rest of the
    /// output (one that keeps taking it is waited for, up to `shutdown_limit`).
    pub shutdown_timeout: Duration,
    /// The longest `shutdown` waits for the terminal and socket clients in all.
    pub shutdown_limit: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            high_water: 256 << 10,
            hard_cap: 16 << 20,
            input_capacity: 64 << 10,
            history: super::spec::DEFAULT_RING_SIZE,
            read_chunk: 4096,
            shutdown_timeout: Duration::from_secs(2),
            shutdown_limit: Duration::from_secs(60),
        }
    }
}

/// State shared between the writers (vCPU threads) and the hub.
struct Shared {
    queue: Mutex<Vec<u8>>,
    /// Bytes in `queue`.
    queued: AtomicUsize,
    /// Largest backlog of a lossless backend (kept by the hub).
    backlog: AtomicUsize,
    /// Bytes refused by the writer because the queue hit the hard cap.
    dropped: AtomicU64,
    /// Someone saw `congested() == true` since the last decongestion callback.
    reported: AtomicBool,
    high_water: usize,
    hard_cap: usize,
    wake: EventFd,
}

impl Shared {
    fn congested(&self) -> bool {
        self.queued.load(Ordering::Acquire) + self.backlog.load(Ordering::Acquire) > self.high_water
    }
}

/// A frontend's output sink (give it to the UART as its `Write`). Called on the vCPU
/// thread; never blocks on I/O: each `write` appends the whole buffer as one chunk to the
/// hub's queue and wakes the event loop.
#[derive(Clone)]
pub struct HubWriter {
    shared: Arc<Shared>,
    /// Bytes this writer (and its clones) put into the stream (see [`Hub::writer_for`]).
    sent: Arc<AtomicU64>,
}

impl HubWriter {
    /// True while the hub's output is above its high-water mark (a lossless backend such
    /// as the terminal is behind). A UART can hold THRE low meanwhile to pace the guest
    /// like a real slow line; the hub calls the `on_decongested` hook when it clears.
    pub fn congested(&self) -> bool {
        let c = self.shared.congested();
        if c {
            self.shared.reported.store(true, Ordering::Release);
        }
        c
    }
}

impl HubWriter {
    /// True while a lossless backend is more than the high-water mark behind (output not
    /// yet picked up by the hub does not count). Reports like [`HubWriter::congested`].
    pub fn backlogged(&self) -> bool {
        let c = self.shared.backlog.load(Ordering::Acquire) > self.shared.high_water;
        if c {
            self.shared.reported.store(true, Ordering::Release);
        }
        c
    }
}

impl std::fmt::Debug for HubWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubWriter")
            .field("queued", &self.shared.queued.load(Ordering::Relaxed))
            .finish()
    }
}

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let was_empty;
        {
            // A poisoned lock only means another writer panicked mid-append; the bytes
            // are still a valid Vec, so keep going.
            let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() + buf.len() > self.shared.hard_cap {
                self.shared
                    .dropped
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                return Ok(buf.len());
            }
            was_empty = q.is_empty();
            q.extend_from_slice(buf);
            self.sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
            self.shared.queued.store(q.len(), Ordering::Release);
        }
        if was_empty {
            // The hub drains the whole queue per wake-up, so only the first chunk after a
            // drain needs to kick it. An eventfd write only fails on counter overflow.
            let _ = self.shared.wake.write(1);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What went through a hub ([`Hub::stats`]), for `--report`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Bytes of the output stream (what every backend was offered).
    pub output_bytes: u64,
    /// Input bytes the frontends took.
    pub input_bytes: u64,
    /// Per frontend device.
    pub frontends: Vec<FrontendStats>,
    /// Per backend (socket clients are counted per listener instead).
    pub backends: Vec<BackendStats>,
    /// Per socket listener.
    pub listeners: Vec<ListenerStats>,
}

/// One frontend's traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontendStats {
    /// `ttyS0`, `hvc0`.
    pub name: String,
    /// Bytes the guest wrote through it.
    pub bytes_out: u64,
    /// Bytes of input it took.
    pub bytes_in: u64,
}

/// One backend's traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// `stdout`, `stdin`, `file PATH`, `ring`.
    pub name: String,
    /// Bytes delivered to it (for `ring`: bytes that went through it).
    pub bytes_out: u64,
    /// Bytes it lost (a lossless backend beyond the hard cap).
    pub dropped: u64,
    /// Bytes typed into it.
    pub bytes_in: u64,
    /// `open`, or `closed` (failed or hung up while the VM ran).
    pub state: &'static str,
}

/// One socket listener's clients, all of them together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// The socket path or TCP address.
    pub name: String,
    /// Clients accepted.
    pub clients_seen: u64,
    /// Clients connected now.
    pub clients_now: usize,
    /// Clients cut off because they stopped reading.
    pub clients_cut_off: u64,
    /// Clients refused (over `max-clients`).
    pub clients_refused: u64,
    /// Bytes delivered to clients (history replay included).
    pub bytes_out: u64,
    /// Bytes clients typed.
    pub bytes_in: u64,
}

/// Implemented by each frontend device; called on the event-loop thread to deliver input.
pub trait FrontendInput: Send {
    /// Offer bytes; returns how many the device took (0 when its FIFO/queue is full).
    fn accept(&mut self, data: &[u8]) -> usize;
    /// An fd that becomes readable when the device drained its input (e.g. an EventFd the
    /// UART signals from vm-superio's `in_buffer_empty`); the hub then offers more.
    fn drained_fd(&self) -> RawFd;
    /// Read/clear the drained fd.
    fn ack_drained(&mut self) {}
    /// Whether the guest is using this console for input now. Input follows the guest: it
    /// goes to the last-registered frontend that is open (a virtio console once the guest
    /// has opened its port, the UART before), until the user picks one with Ctrl-A c.
    fn is_open(&self) -> bool {
        true
    }
}

/// Epoll registration, abstracted so the hub logic runs without an event loop in tests.
pub(crate) trait Reg {
    fn add(&mut self, fd: RawFd, token: u32, set: EventSet) -> io::Result<()>;
    fn modify(&mut self, fd: RawFd, token: u32, set: EventSet) -> io::Result<()>;
    fn remove(&mut self, fd: RawFd, token: u32) -> io::Result<()>;
}

fn em_err(e: event_manager::Error) -> io::Error {
    match e {
        event_manager::Error::Epoll(errno) => io::Error::from_raw_os_error(errno.errno()),
        other => io::Error::other(other.to_string()),
    }
}

struct OpsReg<'a, 'b>(&'a mut EventOps<'b>);

impl Reg for OpsReg<'_, '_> {
    fn add(&mut self, fd: RawFd, token: u32, set: EventSet) -> io::Result<()> {
        self.0
            .add(Events::with_data_raw(fd, token, set))
            .map_err(em_err)
    }
    fn modify(&mut self, fd: RawFd, token: u32, set: EventSet) -> io::Result<()> {
        self.0
            .modify(Events::with_data_raw(fd, token, set))
            .map_err(em_err)
    }
    fn remove(&mut self, fd: RawFd, token: u32) -> io::Result<()> {
        self.0
            .remove(Events::with_data_raw(fd, token, EventSet::empty()))
            .map_err(em_err)
    }
}

/// No event loop (tests, shutdown).
pub(crate) struct NoReg;

impl Reg for NoReg {
    fn add(&mut self, _: RawFd, _: u32, _: EventSet) -> io::Result<()> {
        Ok(())
    }
    fn modify(&mut self, _: RawFd, _: u32, _: EventSet) -> io::Result<()> {
        Ok(())
    }
    fn remove(&mut self, _: RawFd, _: u32) -> io::Result<()> {
        Ok(())
    }
}

/// What happens when a backend's output queue would exceed its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Keep everything up to the hard cap (pacing the guest through `congested`);
    /// beyond it drop and say so in that backend's stream.
    Lossless,
    /// Disconnect the backend (a socket client that stopped reading).
    CutOff,
}

struct OutQueue {
    chunks: VecDeque<(Arc<[u8]>, usize)>,
    bytes: usize,
    limit: usize,
    policy: Policy,
    dropped: u64,
}

impl OutQueue {
    fn new(policy: Policy, limit: usize) -> Self {
        OutQueue {
            chunks: VecDeque::new(),
            bytes: 0,
            limit,
            policy,
            dropped: 0,
        }
    }
}

/// How input read from a backend is treated.
pub(crate) enum InMode {
    /// Goes to the guest.
    Plain,
    /// The VMM's terminal: Ctrl-A escapes are handled first.
    Escapes(EscapeParser),
    /// Read and dropped (read-only viewers).
    Discard,
}

struct InState {
    mode: InMode,
    eof: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stdout,
    Stdin,
    File,
    Client {
        listener: usize,
        id: u64,
    },
    /// An input-only source inside microvm ([`Hub::add_input_source`], `--send-after`).
    Source,
    #[cfg(test)]
    Mem,
}

struct Endpoint {
    name: String,
    port: Box<dyn Port>,
    /// Pollable fd (None: never polled).
    fd: Option<RawFd>,
    /// Interest currently registered with epoll.
    reg: Option<EventSet>,
    /// Input readable without polling (peer hung up, or stdin is a regular file).
    parked: bool,
    out: Option<OutQueue>,
    input: Option<InState>,
    kind: Kind,
    /// Set when the endpoint is to be removed; the message is logged (if any).
    dead: Option<Option<String>>,
    /// Single-writer: Ctrl-A w parser for non-holders, and "you are read-only" told once.
    takeover: EscapeParser,
    told_readonly: bool,
    /// Bytes written to it, and bytes it dropped (lossless overflow) or typed.
    written: u64,
    dropped: u64,
    typed: u64,
    /// Cut off by its queue's policy (a socket client that stopped reading).
    cut_off: bool,
}

impl Endpoint {
    fn new(name: String, port: Box<dyn Port>, kind: Kind) -> Self {
        let fd = port.fd();
        Endpoint {
            name,
            port,
            fd,
            reg: None,
            parked: false,
            out: None,
            input: None,
            kind,
            dead: None,
            takeover: EscapeParser::new(EscapeKeys::TakeOver),
            told_readonly: false,
            written: 0,
            dropped: 0,
            typed: 0,
            cut_off: false,
        }
    }

    fn kill(&mut self, why: Option<String>) {
        if self.dead.is_none() {
            self.dead = Some(why);
        }
    }

    /// The output side failed: stop writing; the endpoint goes away unless it still has
    /// input to deliver.
    fn out_failed(&mut self, why: String) {
        self.out = None;
        let input_live = self.input.as_ref().is_some_and(|i| !i.eof);
        if !input_live {
            let quiet = matches!(self.kind, Kind::Client { .. });
            self.kill((!quiet).then_some(why));
        }
    }

    fn pending(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.bytes)
    }

    fn stats(&self, state: &'static str) -> BackendStats {
        BackendStats {
            name: self.name.clone(),
            bytes_out: self.written,
            dropped: self.dropped,
            bytes_in: self.typed,
            state,
        }
    }

    /// Write queued output until it would block. Adds the drop notice when a lossless
    /// backend catches up after dropping.
    fn flush(&mut self) {
        loop {
            let Some(out) = self.out.as_mut() else {
                return;
            };
            let Some((buf, off)) = out.chunks.front_mut() else {
                if out.dropped > 0 {
                    let msg = format!(
                        "\r\n[microvm: {} bytes of console output dropped here: {} too slow]\r\n",
                        out.dropped, self.name
                    );
                    out.dropped = 0;
                    out.bytes += msg.len();
                    out.chunks.push_back((Arc::from(msg.as_bytes()), 0));
                    continue;
                }
                return;
            };
            match self.port.write(&buf[*off..]) {
                Ok(0) => return,
                Ok(n) => {
                    *off += n;
                    out.bytes -= n;
                    self.written += n as u64;
                    if *off == buf.len() {
                        out.chunks.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    let why = format!("console backend {} dropped: {e}", self.name);
                    self.out_failed(why);
                    return;
                }
            }
        }
    }

    /// Offer a chunk of the stream: write directly when nothing is queued, queue the rest
    /// under the backend's policy. `shared` is the chunk as an `Arc`, made on first need.
    fn offer(&mut self, data: &[u8], shared: &mut Option<Arc<[u8]>>) {
        let Some(out) = self.out.as_mut() else {
            return;
        };
        let mut off = 0;
        if out.bytes == 0 {
            while off < data.len() {
                match self.port.write(&data[off..]) {
                    Ok(0) => break,
                    Ok(n) => {
                        off += n;
                        self.written += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        let why = format!("console backend {} dropped: {e}", self.name);
                        self.out_failed(why);
                        return;
                    }
                }
            }
            if off == data.len() {
                return;
            }
        }
        let rest = data.len() - off;
        if out.bytes + rest > out.limit {
            match out.policy {
                Policy::Lossless => {
                    out.dropped += rest as u64;
                    self.dropped += rest as u64;
                }
                Policy::CutOff => {
                    self.cut_off = true;
                    let why = format!(
                        "console {} cut off: it stopped reading (more than {} bytes behind)",
                        self.name, out.limit
                    );
                    self.out = None;
                    self.kill(Some(why));
                }
            }
            return;
        }
        let arc = shared.get_or_insert_with(|| Arc::from(data)).clone();
        out.bytes += rest;
        out.chunks.push_back((arc, off));
    }

    /// A message for this backend only (not part of the console stream).
    fn notice(&mut self, msg: &str) {
        if let Some(out) = self.out.as_mut() {
            out.bytes += msg.len();
            out.chunks.push_back((Arc::from(msg.as_bytes()), 0));
        }
        self.flush();
    }
}

struct ListenerState {
    l: Listener,
    spec: SockSpec,
    clients: usize,
    holder: Option<u32>,
    next_id: u64,
    registered: bool,
    /// Clients gone so far: cut off, refused (over max-clients), and their byte counts.
    cut_off: u64,
    refused: u64,
    gone_written: u64,
    gone_typed: u64,
}

struct Frontend {
    name: String,
    input: Box<dyn FrontendInput>,
    registered: bool,
    /// Input bytes the device took.
    bytes_in: u64,
}

/// The console hub. Create it from a [`ConsoleSpec`], add frontends, register it with an
/// `event_manager::EventManager` (it registers its own fds in `init`), and call
/// [`Hub::shutdown`] when the VMM stops (dropping it does the same).
pub struct Hub {
    cfg: HubConfig,
    shared: Arc<Shared>,
    exit: EventFd,
    spare: Vec<u8>,
    history: ByteRing,
    endpoints: BTreeMap<u32, Endpoint>,
    listeners: Vec<ListenerState>,
    frontends: Vec<Frontend>,
    target: usize,
    /// The user chose the target with Ctrl-A c: stop following the guest.
    target_pinned: bool,
    input: VecDeque<u8>,
    observers: Vec<Observer>,
    on_decongested: Vec<Box<dyn FnMut() + Send>>,
    next_token: u32,
    initialized: bool,
    shut: bool,
    stdio: bool,
    raw: Option<RawMode>,
    scratch: Vec<u8>,
    /// Output counters of the frontends' writers ([`Hub::writer_for`]).
    sent: Vec<(String, Arc<AtomicU64>)>,
    /// Backends (not socket clients) removed so far.
    retired: Vec<BackendStats>,
    /// The spec has a `ring` backend.
    has_ring: bool,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("endpoints", &self.endpoints.len())
            .field("listeners", &self.listeners.len())
            .field("frontends", &self.frontends.len())
            .finish()
    }
}

enum ReadOutcome {
    Data,
    Eof,
    WouldBlock,
    NoSpace,
    Failed,
}

impl Hub {
    /// A hub with the backends of `spec`. `exit` is written (1) when the user asks to
    /// stop the VM (Ctrl-A x on the terminal).
    pub fn new(spec: &ConsoleSpec, exit: EventFd) -> Result<Hub, MuxError> {
        Self::with_config(spec, exit, HubConfig::default())
    }

    /// [`Hub::new`] with explicit tunables.
    pub fn with_config(spec: &ConsoleSpec, exit: EventFd, cfg: HubConfig) -> Result<Hub, MuxError> {
        let history = spec.ring_size().unwrap_or(cfg.history);
        let mut hub = Hub::bare(exit, cfg, history)?;
        // On error `hub` drops and `shutdown` undoes what was set up so far (socket
        // files); log files it created are removed here.
        for b in &spec.backends {
            if let Err(e) = hub.add_backend(b) {
                for ep in hub.endpoints.values_mut() {
                    ep.port.discard();
                }
                return Err(e);
            }
        }
        Ok(hub)
    }

    fn bare(exit: EventFd, cfg: HubConfig, history: usize) -> Result<Hub, MuxError> {
        let wake = EventFd::new(EFD_NONBLOCK).map_err(MuxError::EventFd)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            queued: AtomicUsize::new(0),
            backlog: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            reported: AtomicBool::new(false),
            high_water: cfg.high_water,
            hard_cap: cfg.hard_cap,
            wake,
        });
        let read_chunk = cfg.read_chunk.max(1);
        Ok(Hub {
            input: VecDeque::with_capacity(cfg.input_capacity.min(1 << 20)),
            cfg,
            shared,
            exit,
            spare: Vec::new(),
            history: ByteRing::new(history),
            endpoints: BTreeMap::new(),
            listeners: Vec::new(),
            frontends: Vec::new(),
            target: 0,
            target_pinned: false,
            observers: Vec::new(),
            on_decongested: Vec::new(),
            next_token: TOK_DYNAMIC,
            initialized: false,
            shut: false,
            stdio: false,
            raw: None,
            scratch: vec![0; read_chunk],
            sent: Vec::new(),
            retired: Vec::new(),
            has_ring: false,
        })
    }

    fn alloc_token(&mut self) -> u32 {
        // Tokens are never reused, so a stale event can never hit a new endpoint.
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(TOK_DYNAMIC);
        t
    }

    fn add_backend(&mut self, b: &BackendSpec) -> Result<(), MuxError> {
        match b {
            BackendSpec::Stdio => self.add_stdio(),
            BackendSpec::Ring { .. } => {
                self.has_ring = true;
                Ok(())
            }
            BackendSpec::File(f) => {
                let port = FilePort::open(f)?;
                let t = self.alloc_token();
                let mut ep = Endpoint::new(
                    format!("file {}", f.path.display()),
                    Box::new(port),
                    Kind::File,
                );
                ep.out = Some(OutQueue::new(Policy::Lossless, self.cfg.hard_cap));
                self.endpoints.insert(t, ep);
                Ok(())
            }
            BackendSpec::Sock(s) => {
                if self.listeners.len() >= MAX_LISTENERS {
                    return Err(super::spec::SpecError::TooMany(self.listeners.len() + 1).into());
                }
                let l = match &s.listen {
                    Listen::Unix(Some(p)) => socket::bind_unix(p, s.mode)?,
                    Listen::Unix(None) => {
                        let p = socket::default_socket_path();
                        let l = socket::bind_unix(&p, s.mode)?;
                        log_line(&format!("console socket: {}", p.display()));
                        l
                    }
                    Listen::Tcp(a) => socket::bind_tcp(*a)?,
                };
                self.listeners.push(ListenerState {
                    l,
                    spec: s.clone(),
                    clients: 0,
                    holder: None,
                    next_id: 1,
                    registered: false,
                    cut_off: 0,
                    refused: 0,
                    gone_written: 0,
                    gone_typed: 0,
                });
                Ok(())
            }
        }
    }

    fn add_stdio(&mut self) -> Result<(), MuxError> {
        if STDIO_CLAIMED
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(MuxError::StdioTaken);
        }
        self.stdio = true;
        // A closed stdout must not kill the VM (Rust binaries already ignore SIGPIPE;
        // make sure of it for embedders too).
        // SAFETY: setting a signal disposition to SIG_IGN has no memory effects.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        term::set_stdio_nonblocking(libc::STDOUT_FILENO)?;
        self.raw = RawMode::enter(libc::STDIN_FILENO)?;
        let mut out = Endpoint::new("stdout".into(), Box::new(StdoutPort), Kind::Stdout);
        out.out = Some(OutQueue::new(Policy::Lossless, self.cfg.hard_cap));
        self.endpoints.insert(TOK_STDOUT, out);
        let mut inp = Endpoint::new("stdin".into(), Box::new(StdinPort), Kind::Stdin);
        let mode = if self.raw.is_some() {
            InMode::Escapes(EscapeParser::new(EscapeKeys::Stdio))
        } else {
            InMode::Plain
        };
        inp.input = Some(InState { mode, eof: false });
        self.endpoints.insert(TOK_STDIN, inp);
        Ok(())
    }

    /// Registers a console frontend (the UART now, virtio-console later). Input goes to
    /// the first frontend until Ctrl-A c switches. Returns the frontend's output writer.
    pub fn add_frontend(
        &mut self,
        name: &str,
        input: Box<dyn FrontendInput>,
    ) -> Result<HubWriter, MuxError> {
        if self.frontends.len() >= MAX_FRONTENDS {
            return Err(MuxError::TooManyFrontends(MAX_FRONTENDS));
        }
        self.frontends.push(Frontend {
            name: name.to_string(),
            input,
            registered: false,
            bytes_in: 0,
        });
        if self.initialized {
            // Get the event loop to register the drained fd and offer held input.
            let _ = self.shared.wake.write(1);
        }
        Ok(self.writer())
    }

    /// An input-only source inside microvm (`--send-after`): what is written to the other
    /// end of `stream` (one end of a socketpair) reaches the guest like a socket client's
    /// input: each read whole, in arrival order, through the same bounded input buffer.
    /// It shows in [`Hub::stats`] as a backend named `name` (its bytes as `bytes_in`) and
    /// goes away quietly when the other end is closed. `stream` must be non-blocking.
    pub fn add_input_source(&mut self, name: &str, stream: std::os::unix::net::UnixStream) {
        let t = self.alloc_token();
        let mut ep = Endpoint::new(
            name.into(),
            Box::new(socket::Stream::Unix(stream)),
            Kind::Source,
        );
        ep.input = Some(InState {
            mode: InMode::Plain,
            eof: false,
        });
        self.endpoints.insert(t, ep);
        if self.initialized {
            let _ = self.shared.wake.write(1);
        }
    }

    /// Another writer on the same output stream (e.g. for VMM messages).
    pub fn writer(&self) -> HubWriter {
        HubWriter {
            shared: self.shared.clone(),
            sent: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A frontend's writer: what it writes is counted under `name` in [`Hub::stats`].
    pub fn writer_for(&mut self, name: &str) -> HubWriter {
        let w = self.writer();
        self.sent.push((name.to_string(), w.sent.clone()));
        w
    }

    /// What went through the hub so far: per frontend, per backend, per socket listener.
    pub fn stats(&self) -> HubStats {
        let mut frontends: Vec<FrontendStats> = self
            .sent
            .iter()
            .map(|(name, n)| FrontendStats {
                name: name.clone(),
                bytes_out: n.load(Ordering::Relaxed),
                bytes_in: 0,
            })
            .collect();
        for fe in &self.frontends {
            match frontends.iter_mut().find(|f| f.name == fe.name) {
                Some(f) => f.bytes_in += fe.bytes_in,
                None => frontends.push(FrontendStats {
                    name: fe.name.clone(),
                    bytes_out: 0,
                    bytes_in: fe.bytes_in,
                }),
            }
        }
        let mut backends = self.retired.clone();
        backends.extend(
            self.endpoints
                .values()
                .filter(|e| !matches!(e.kind, Kind::Client { .. }))
                .map(|e| e.stats(if e.dead.is_some() { "closed" } else { "open" })),
        );
        backends.sort_by(|a, b| a.name.cmp(&b.name));
        if self.has_ring {
            backends.push(BackendStats {
                name: "ring".into(),
                bytes_out: self.history.total(),
                dropped: 0,
                bytes_in: 0,
                state: "open",
            });
        }
        let listeners = self
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let live = self
                    .endpoints
                    .values()
                    .filter(|e| matches!(e.kind, Kind::Client { listener, .. } if listener == i));
                let (mut written, mut typed, mut cut) = (l.gone_written, l.gone_typed, l.cut_off);
                for e in live {
                    written += e.written;
                    typed += e.typed;
                    cut += u64::from(e.cut_off);
                }
                ListenerStats {
                    name: l.l.describe(),
                    clients_seen: l.next_id - 1,
                    clients_now: l.clients,
                    clients_cut_off: cut,
                    clients_refused: l.refused,
                    bytes_out: written,
                    bytes_in: typed,
                }
            })
            .collect();
        HubStats {
            output_bytes: self.history.total(),
            input_bytes: self.frontends.iter().map(|f| f.bytes_in).sum(),
            frontends,
            backends,
            listeners,
        }
    }

    /// Observers see every output chunk, in stream order, on the event-loop thread.
    pub fn add_observer(&mut self, f: Observer) {
        self.observers.push(f);
    }

    /// Called on the event-loop thread when output was congested (someone saw
    /// `HubWriter::congested() == true`) and no longer is: a UART raises THRE here.
    /// Every hook added is called.
    pub fn on_decongested(&mut self, f: Box<dyn FnMut() + Send>) {
        self.on_decongested.push(f);
    }

    /// The last bytes of the stream (the `ring` backend's content).
    pub fn history(&self) -> Vec<u8> {
        self.history.to_vec()
    }

    /// Paths of the unix sockets this hub listens on (default paths included).
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        self.listeners
            .iter()
            .filter_map(|l| match &l.l {
                Listener::Unix { path, .. } => Some(path.clone()),
                Listener::Tcp(_) => None,
            })
            .collect()
    }

    /// Local addresses of the TCP listeners (useful with port 0).
    pub fn tcp_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| match &l.l {
                Listener::Tcp(t) => t.local_addr().ok(),
                Listener::Unix { .. } => None,
            })
            .collect()
    }

    /// Connected socket clients.
    pub fn clients(&self) -> usize {
        self.listeners.iter().map(|l| l.clients).sum()
    }

    /// Name of the frontend receiving input.
    pub fn input_target(&self) -> Option<&str> {
        self.frontends.get(self.target).map(|f| f.name.as_str())
    }

    // ---- event handling -------------------------------------------------------------

    fn init_with(&mut self, reg: &mut dyn Reg) {
        if let Err(e) = reg.add(self.shared.wake.as_raw_fd(), TOK_WAKE, EventSet::IN) {
            log_line(&format!(
                "console hub: cannot watch its wake-up eventfd: {e}"
            ));
        }
        for (i, l) in self.listeners.iter_mut().enumerate() {
            match reg.add(l.l.fd(), TOK_LISTENER + i as u32, EventSet::IN) {
                Ok(()) => l.registered = true,
                Err(e) => log_line(&format!(
                    "cannot watch console socket {}: {e}",
                    l.l.describe()
                )),
            }
        }
        self.initialized = true;
        self.settle(reg);
    }

    fn handle(&mut self, token: u32, set: EventSet, reg: &mut dyn Reg) {
        match token {
            TOK_WAKE => {
                let _ = self.shared.wake.read();
                self.drain_writer();
            }
            t if (TOK_LISTENER..TOK_FRONTEND).contains(&t) => {
                self.accept((t - TOK_LISTENER) as usize);
            }
            t if (TOK_FRONTEND..TOK_DYNAMIC).contains(&t) => {
                if let Some(fe) = self.frontends.get_mut((t - TOK_FRONTEND) as usize) {
                    fe.input.ack_drained();
                }
            }
            t => self.endpoint_event(t, set),
        }
        self.settle(reg);
    }

    /// Run after every event: deliver input, read parked sources, remove dead endpoints,
    /// update epoll interest and the congestion state.
    fn settle(&mut self, reg: &mut dyn Reg) {
        for (i, fe) in self.frontends.iter_mut().enumerate() {
            if !fe.registered {
                fe.registered = true;
                if let Err(e) =
                    reg.add(fe.input.drained_fd(), TOK_FRONTEND + i as u32, EventSet::IN)
                {
                    log_line(&format!(
                        "console frontend {}: cannot watch its drained fd: {e}",
                        fe.name
                    ));
                }
            }
        }
        self.feed();
        self.service_parked();
        self.sweep(reg);
        let tokens: Vec<u32> = self.endpoints.keys().copied().collect();
        for t in tokens {
            self.sync(t, reg);
        }
        self.sweep(reg);
        self.update_congestion();
    }

    fn update_congestion(&mut self) {
        let backlog = self
            .endpoints
            .values()
            .filter_map(|e| e.out.as_ref())
            .filter(|o| o.policy == Policy::Lossless)
            .map(|o| o.bytes)
            .max()
            .unwrap_or(0);
        self.shared.backlog.store(backlog, Ordering::Release);
        if !self.shared.congested() && self.shared.reported.swap(false, Ordering::AcqRel) {
            for cb in &mut self.on_decongested {
                cb();
            }
        }
    }

    /// Take everything the writers queued and fan it out.
    fn drain_writer(&mut self) {
        let mut data = std::mem::take(&mut self.spare);
        {
            let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *q, &mut data);
            self.shared.queued.store(0, Ordering::Release);
        }
        if !data.is_empty() {
            self.emit(&data);
        }
        let dropped = self.shared.dropped.swap(0, Ordering::AcqRel);
        if dropped > 0 {
            let msg = format!(
                "\r\n[microvm: {dropped} bytes of console output dropped: console hub overloaded]\r\n"
            );
            self.emit(msg.as_bytes());
        }
        data.clear();
        if data.capacity() > (1 << 20) {
            data.shrink_to(1 << 20);
        }
        self.spare = data;
    }

    /// One chunk of the stream to observers, the history and every backend, in order.
    fn emit(&mut self, data: &[u8]) {
        for obs in self.observers.iter_mut() {
            obs(data);
        }
        self.history.push(data);
        let mut shared = None;
        for ep in self.endpoints.values_mut() {
            if ep.dead.is_none() && !ep.parked {
                ep.offer(data, &mut shared);
            }
        }
    }

    fn endpoint_event(&mut self, token: u32, set: EventSet) {
        let Some(ep) = self.endpoints.get_mut(&token) else {
            return;
        };
        let hup = set.intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP);
        if set.contains(EventSet::OUT) || hup {
            ep.flush();
        }
        if hup && ep.input.is_none() {
            // Output-only (stdout): the reader went away.
            let why = format!("console backend {} closed; the VM goes on", ep.name);
            ep.out = None;
            ep.kill(Some(why));
            return;
        }
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // The peer is gone both ways: no more output to it.
            ep.out = None;
        }
        if set.contains(EventSet::IN) || hup {
            // stdin stays a blocking fd (it is shared with the parent's terminal), so it
            // is read once per readiness event; sockets are read until they would block.
            let rounds = if token == TOK_STDIN { 1 } else { 16 };
            for _ in 0..rounds {
                match self.read_endpoint(token) {
                    ReadOutcome::Data => {
                        self.feed();
                        continue;
                    }
                    ReadOutcome::NoSpace if hup => {
                        // Peer gone while we cannot take its input: read it later
                        // without polling (it can no longer block).
                        if let Some(ep) = self.endpoints.get_mut(&token) {
                            ep.parked = true;
                        }
                    }
                    _ => {}
                }
                break;
            }
        }
    }

    /// Free input space for an endpoint. The terminal keeps a reserve so Ctrl-A x works
    /// even while socket clients have filled the buffer.
    fn space_for(&self, kind: Kind) -> usize {
        let cap = self.cfg.input_capacity;
        let reserve = if kind == Kind::Stdin {
            0
        } else {
            (cap / 4).min(4096)
        };
        cap.saturating_sub(reserve).saturating_sub(self.input.len())
    }

    /// True when this endpoint's input is read and dropped (viewers, non-holders).
    fn discards(&self, ep: &Endpoint, token: u32) -> bool {
        match &ep.input {
            Some(InState {
                mode: InMode::Discard,
                ..
            }) => true,
            Some(_) => match ep.kind {
                Kind::Client { listener, .. } => {
                    let l = &self.listeners[listener];
                    l.spec.single_writer && l.holder.is_some() && l.holder != Some(token)
                }
                _ => false,
            },
            None => false,
        }
    }

    fn read_endpoint(&mut self, token: u32) -> ReadOutcome {
        let Some(mut ep) = self.endpoints.remove(&token) else {
            return ReadOutcome::Failed;
        };
        let r = self.read_into(token, &mut ep);
        self.endpoints.insert(token, ep);
        r
    }

    fn read_into(&mut self, token: u32, ep: &mut Endpoint) -> ReadOutcome {
        if ep.dead.is_some() || ep.input.as_ref().is_none_or(|i| i.eof) {
            return ReadOutcome::Failed;
        }
        let discard = self.discards(ep, token);
        let max = if discard {
            self.scratch.len()
        } else {
            self.space_for(ep.kind).min(self.scratch.len())
        };
        if max == 0 {
            return ReadOutcome::NoSpace;
        }
        let n = match ep.port.read(&mut self.scratch[..max]) {
            Ok(0) => {
                if let Some(i) = ep.input.as_mut() {
                    i.eof = true;
                }
                match ep.kind {
                    Kind::Stdin => ep.kill(Some("stdin closed; the VM goes on".into())),
                    _ if ep.out.is_none() => ep.kill(None),
                    _ => {}
                }
                return ReadOutcome::Eof;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::WouldBlock,
            Err(e) => {
                let quiet = matches!(ep.kind, Kind::Client { .. });
                ep.kill((!quiet).then(|| format!("console backend {}: read failed: {e}", ep.name)));
                return ReadOutcome::Failed;
            }
        };
        let data = std::mem::take(&mut self.scratch);
        self.take_input(token, ep, &data[..n], discard);
        self.scratch = data;
        ReadOutcome::Data
    }

    /// One read from a backend: handled whole, appended to the input stream contiguously.
    fn take_input(&mut self, token: u32, ep: &mut Endpoint, data: &[u8], discard: bool) {
        if let Kind::Client { listener, id } = ep.kind {
            let l = &mut self.listeners[listener];
            if l.spec.single_writer
                && !matches!(ep.input.as_ref().map(|i| &i.mode), Some(InMode::Discard))
            {
                if l.holder.is_none() {
                    l.holder = Some(token);
                    self.announce_holder(listener, token, ep, id);
                } else if discard {
                    let (mut out, mut acts) = (Vec::new(), Vec::new());
                    ep.takeover.feed(data, &mut out, &mut acts);
                    if acts.contains(&EscapeAction::TakeOver) {
                        self.listeners[listener].holder = Some(token);
                        self.announce_holder(listener, token, ep, id);
                    } else if !ep.told_readonly {
                        ep.told_readonly = true;
                        ep.notice("\r\n[microvm: another client has the keyboard; Ctrl-A w takes it over]\r\n");
                    }
                    return;
                }
            }
        }
        if discard {
            return;
        }
        let Some(inp) = ep.input.as_mut() else {
            return;
        };
        ep.typed += data.len() as u64;
        match &mut inp.mode {
            InMode::Discard => {}
            InMode::Plain => self.input.extend(data),
            InMode::Escapes(p) => {
                let (mut out, mut acts) = (Vec::new(), Vec::new());
                p.feed(data, &mut out, &mut acts);
                self.input.extend(out);
                for a in acts {
                    self.escape_action(a, ep);
                }
            }
        }
    }

    fn announce_holder(&mut self, listener: usize, token: u32, ep: &mut Endpoint, id: u64) {
        ep.told_readonly = false;
        ep.notice("\r\n[microvm: you have the keyboard]\r\n");
        let msg =
            format!("\r\n[microvm: client {id} took the keyboard; Ctrl-A w takes it back]\r\n");
        for (t, other) in self.endpoints.iter_mut() {
            if *t != token
                && matches!(other.kind, Kind::Client { listener: l, .. } if l == listener)
            {
                other.told_readonly = true;
                other.notice(&msg);
            }
        }
    }

    fn escape_action(&mut self, a: EscapeAction, stdin: &mut Endpoint) {
        let _ = stdin;
        match a {
            EscapeAction::Quit => {
                self.local_notice("\r\n[microvm: quit]\r\n");
                if let Err(e) = self.exit.write(1) {
                    log_line(&format!("cannot signal VM exit: {e}"));
                }
            }
            EscapeAction::Help => self.local_notice(term::STDIO_ESCAPE_HELP),
            EscapeAction::SwitchInput => {
                if !self.frontends.is_empty() {
                    self.target = (self.target + 1) % self.frontends.len();
                    self.target_pinned = true;
                }
                let msg = match self.frontends.get(self.target) {
                    Some(f) => format!("\r\n[microvm: input goes to {}]\r\n", f.name),
                    None => "\r\n[microvm: no console device to send input to]\r\n".into(),
                };
                self.local_notice(&msg);
            }
            EscapeAction::Detach | EscapeAction::TakeOver => {}
        }
    }

    /// A message on the VMM's terminal only.
    fn local_notice(&mut self, msg: &str) {
        if let Some(ep) = self.endpoints.get_mut(&TOK_STDOUT) {
            ep.notice(msg);
        }
    }

    /// Offer held input to the input-target frontend.
    fn feed(&mut self) {
        let followed = self.frontends.iter().rposition(|f| f.input.is_open());
        if let Some(open) = followed.filter(|_| !self.target_pinned) {
            self.target = open;
        }
        while !self.input.is_empty() {
            let Some(fe) = self.frontends.get_mut(self.target) else {
                return;
            };
            let (a, _) = self.input.as_slices();
            let n = fe.input.accept(a).min(a.len());
            if n == 0 {
                return;
            }
            fe.bytes_in += n as u64;
            self.input.drain(..n);
        }
    }

    /// Read sources that need no polling (hung-up peers, a regular-file stdin) while
    /// there is room.
    fn service_parked(&mut self) {
        let parked: Vec<u32> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.parked && e.dead.is_none())
            .map(|(t, _)| *t)
            .collect();
        for t in parked {
            loop {
                match self.read_endpoint(t) {
                    ReadOutcome::Data => self.feed(),
                    ReadOutcome::Eof | ReadOutcome::Failed => {
                        if let Some(e) = self.endpoints.get_mut(&t) {
                            e.kill(None);
                        }
                        break;
                    }
                    ReadOutcome::WouldBlock | ReadOutcome::NoSpace => break,
                }
            }
        }
    }

    fn accept(&mut self, idx: usize) {
        loop {
            let Some(l) = self.listeners.get_mut(idx) else {
                return;
            };
            let stream = match l.l.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log_line(&format!(
                        "console socket {}: accept failed: {e}",
                        l.l.describe()
                    ));
                    return;
                }
            };
            let mut port: Box<dyn Port> = Box::new(stream);
            if l.clients >= l.spec.max_clients {
                let msg = format!(
                    "microvm: console busy: already {} clients (max-clients={})\r\n",
                    l.clients, l.spec.max_clients
                );
                let _ = port.write(msg.as_bytes());
                l.refused += 1;
                continue;
            }
            let id = l.next_id;
            l.next_id += 1;
            l.clients += 1;
            let name = format!("client {id} on {}", l.l.describe());
            let read_only = l.spec.read_only;
            let single_writer = l.spec.single_writer;
            let holder = l.holder;
            let limit = l.spec.queue + self.history.len();
            let token = self.alloc_token();
            let mut ep = Endpoint::new(name, port, Kind::Client { listener: idx, id });
            let mut out = OutQueue::new(Policy::CutOff, limit);
            let hist = self.history.to_vec();
            if !hist.is_empty() {
                out.bytes = hist.len();
                out.chunks.push_back((Arc::from(hist), 0));
            }
            ep.out = Some(out);
            ep.input = Some(InState {
                mode: if read_only {
                    InMode::Discard
                } else {
                    InMode::Plain
                },
                eof: false,
            });
            if single_writer && !read_only {
                match holder {
                    None => {
                        if let Some(l) = self.listeners.get_mut(idx) {
                            l.holder = Some(token);
                        }
                    }
                    Some(_) => {
                        ep.told_readonly = true;
                    }
                }
            }
            ep.flush();
            if single_writer && !read_only && holder.is_some() {
                ep.notice(
                    "\r\n[microvm: another client has the keyboard; Ctrl-A w takes it over]\r\n",
                );
            }
            self.endpoints.insert(token, ep);
        }
    }

    /// Remove dead endpoints.
    fn sweep(&mut self, reg: &mut dyn Reg) {
        let dead: Vec<u32> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.dead.is_some())
            .map(|(t, _)| *t)
            .collect();
        for t in dead {
            let Some(mut ep) = self.endpoints.remove(&t) else {
                continue;
            };
            if let (Some(fd), Some(_)) = (ep.fd, ep.reg) {
                let _ = reg.remove(fd, t);
            }
            if let Some(Some(msg)) = ep.dead.take() {
                log_line(&msg);
            }
            if !matches!(ep.kind, Kind::Client { .. }) {
                self.retired.push(ep.stats("closed"));
            }
            if let Kind::Client { listener, .. } = ep.kind
                && let Some(l) = self.listeners.get_mut(listener)
            {
                l.cut_off += u64::from(ep.cut_off);
                l.gone_written += ep.written;
                l.gone_typed += ep.typed;
                l.clients = l.clients.saturating_sub(1);
                if l.holder == Some(t) {
                    l.holder = None;
                }
            }
        }
    }

    /// Bring an endpoint's epoll interest in line with its state.
    fn sync(&mut self, token: u32, reg: &mut dyn Reg) {
        let Some(ep) = self.endpoints.get(&token) else {
            return;
        };
        let Some(fd) = ep.fd else {
            return;
        };
        let input_live = ep.input.as_ref().is_some_and(|i| !i.eof);
        let gone = ep.dead.is_some() || ep.parked || (!input_live && ep.out.is_none());
        if gone {
            if ep.reg.is_some() {
                let _ = reg.remove(fd, token);
            }
            if let Some(ep) = self.endpoints.get_mut(&token) {
                ep.reg = None;
                if !input_live && ep.out.is_none() {
                    ep.kill(None);
                }
            }
            return;
        }
        let mut want = EventSet::empty();
        if input_live && (self.discards(ep, token) || self.space_for(ep.kind) > 0) {
            want |= EventSet::IN;
        }
        if ep.pending() > 0 {
            want |= EventSet::OUT;
        }
        let cur = ep.reg;
        let res = match cur {
            None => reg.add(fd, token, want),
            Some(c) if c != want => reg.modify(fd, token, want),
            Some(_) => return,
        };
        let Some(ep) = self.endpoints.get_mut(&token) else {
            return;
        };
        match res {
            Ok(()) => ep.reg = Some(want),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                // Regular file or /dev/null: always ready, never polled.
                ep.fd = None;
                if input_live {
                    ep.parked = true;
                }
            }
            Err(e) => {
                let msg = format!("console backend {}: cannot watch it: {e}", ep.name);
                ep.kill(Some(msg));
            }
        }
    }

    /// Writes out what is queued to the terminal and to socket clients before the VM's
    /// exit, so a CI log and every attached viewer end with the guest's last words.
    /// It waits as long as they keep taking data (the terminal is lossless: a slow one
    /// delays the exit, it does not truncate the log), and gives up on a consumer that
    /// takes nothing for `shutdown_timeout` (the terminal) or 1 s (socket clients), or
    /// after `shutdown_limit` in all.
    fn flush_before_exit(&mut self) {
        const CLIENT_IDLE: Duration = Duration::from_secs(1);
        let start = Instant::now();
        let mut progress = start;
        let pending = |h: &Hub| -> usize { h.endpoints.values().map(Endpoint::pending).sum() };
        for ep in self.endpoints.values_mut() {
            ep.flush();
        }
        loop {
            let waiting: Vec<(libc::pollfd, bool)> = self
                .endpoints
                .values()
                .filter(|e| matches!(e.kind, Kind::Stdout | Kind::Client { .. }))
                .filter(|e| e.pending() > 0)
                .filter_map(|e| e.fd.map(|fd| (fd, e.kind == Kind::Stdout)))
                .map(|(fd, stdout)| {
                    let pfd = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    (pfd, stdout)
                })
                .collect();
            let idle_limit = if waiting.iter().any(|(_, stdout)| *stdout) {
                self.cfg.shutdown_timeout
            } else {
                CLIENT_IDLE
            };
            let idle_left = idle_limit.saturating_sub(progress.elapsed());
            if waiting.is_empty()
                || idle_left.is_zero()
                || start.elapsed() > self.cfg.shutdown_limit
            {
                return;
            }
            let mut pfds: Vec<libc::pollfd> = waiting.into_iter().map(|(p, _)| p).collect();
            let timeout = idle_left.as_millis().min(200) as i32;
            // SAFETY: `pfds` is a valid array of pollfds for its length; the timeout is
            // bounded.
            let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
            if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
            let before = pending(self);
            for ep in self.endpoints.values_mut() {
                ep.flush();
            }
            if pending(self) < before {
                progress = Instant::now();
            }
        }
    }

    /// Called when the VMM stops: write out what is queued to lossless backends and
    /// socket clients (bounded time), flush files, remove socket files, restore the
    /// terminal. Idempotent.
    pub fn shutdown(&mut self) {
        if self.shut {
            return;
        }
        self.shut = true;
        self.drain_writer();
        self.sweep(&mut NoReg);
        self.flush_before_exit();
        for ep in self.endpoints.values_mut() {
            if ep.kind == Kind::File
                && let Err(e) = ep.port.flush()
            {
                log_line(&format!("console backend {}: flush failed: {e}", ep.name));
            }
        }
        for l in &self.listeners {
            l.l.remove_file();
        }
        self.raw = None;
        if self.stdio {
            term::restore_terminal();
            self.stdio = false;
            STDIO_CLAIMED.store(false, Ordering::Release);
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl MutEventSubscriber for Hub {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.shut {
            return;
        }
        self.handle(events.data(), events.event_set(), &mut OpsReg(ops));
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.init_with(&mut OpsReg(ops));
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Drive a hub without an event loop, with in-memory ports.
    use super::*;

    impl Hub {
        /// A hub with no backends (history `history` bytes).
        pub(crate) fn for_test(cfg: HubConfig, history: usize) -> Hub {
            let exit = EventFd::new(EFD_NONBLOCK).unwrap();
            Hub::bare(exit, cfg, history).unwrap()
        }

        /// Add an in-memory backend.
        pub(crate) fn add_mem(
            &mut self,
            name: &str,
            port: Box<dyn Port>,
            policy: Option<(Policy, usize)>,
            input: Option<InMode>,
        ) -> u32 {
            let t = self.alloc_token();
            let mut ep = Endpoint::new(name.into(), port, Kind::Mem);
            ep.fd = None;
            ep.out = policy.map(|(p, l)| OutQueue::new(p, l));
            ep.input = input.map(|mode| InState { mode, eof: false });
            self.endpoints.insert(t, ep);
            t
        }

        /// Process the writer queue (what a wake-up event does).
        pub(crate) fn pump(&mut self) {
            self.handle(TOK_WAKE, EventSet::IN, &mut NoReg);
        }

        /// The backend became writable.
        pub(crate) fn writable(&mut self, t: u32) {
            self.handle(t, EventSet::OUT, &mut NoReg);
        }

        /// The backend became readable.
        pub(crate) fn readable(&mut self, t: u32) {
            self.handle(t, EventSet::IN, &mut NoReg);
        }

        /// Frontend `i` drained its input.
        pub(crate) fn drained(&mut self, i: usize) {
            self.handle(TOK_FRONTEND + i as u32, EventSet::IN, &mut NoReg);
        }

        pub(crate) fn exit_evt(&self) -> &EventFd {
            &self.exit
        }

        pub(crate) fn alive(&self, t: u32) -> bool {
            self.endpoints.contains_key(&t)
        }

        pub(crate) fn pending_of(&self, t: u32) -> usize {
            self.endpoints.get(&t).map_or(0, |e| e.pending())
        }

        pub(crate) fn held_input(&self) -> usize {
            self.input.len()
        }

        pub(crate) fn wants_input(&self, t: u32) -> bool {
            self.endpoints
                .get(&t)
                .is_some_and(|e| self.space_for(e.kind) > 0 && e.input.is_some())
        }
    }
}
