//! The hub: routes each event to the part that owns it, and shuts down.
//!
//! Threads: [`HubWriter`] runs on vCPU threads and only appends to the writer queue and
//! kicks an eventfd (`writer.rs`). Everything else runs on the event-loop thread inside
//! [`Hub`], driven by `event_manager` through `MutEventSubscriber`.
//!
//! Event routing (one epoll token per source of events):
//!
//! | token | what woke us | goes to |
//! |---|---|---|
//! | `Wake` | a frontend wrote | [`Hub::drain_writer`] -> [`Hub::emit`] (the fan-out) |
//! | `Timer` | an idle deadline or the end of an accept back-off | `expire_idle`, listeners |
//! | `Frontend(i)` | the guest drained frontend `i`'s input | `frontend.rs` (more input is fed) |
//! | `Listener(i)` | a client connects | `listener.rs` (admission) |
//! | `Endpoint(id)` | a backend is readable or writable | its sink (`fanout.rs`), its source -> `input.rs` |
//!
//! After every event, [`Hub::settle`] feeds held input to the target frontend, removes
//! dead endpoints, brings each fd's epoll interest in line with its state, and updates
//! the congestion the frontends see.
//!
//! Ordering: the writer queue is one byte vector appended under its lock, so each
//! `write` is one contiguous chunk of the stream; [`Hub::emit`] offers each chunk to the
//! observers, the ring and every sink in the same order. A sink either receives the bytes
//! or is cut off; no backend ever sees a reordered stream.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::MuxError;
use super::backend::file::FilePort;
use super::backend::socket::{self, Listener};
use super::backend::stdio::{StdinPort, StdoutPort};
use super::endpoint::{Endpoint, InputMode, Limits, Owner, Read, Role, plan};
use super::escape::{EscapeAction, STDIO_ESCAPE_HELP};
use super::fanout::Policy;
use super::frontend::{FrontendInput, Frontends, MAX_FRONTENDS};
use super::input::InputQueue;
use super::listener::{Accepted, Keyboard, ListenerState, READ_ONLY_NOTICE, busy_message};
use super::ring::ByteRing;
use super::spec::{BackendSpec, ConsoleSpec, Listen};
use super::stats::{BackendStats, HubStats, MemoryUse};
use super::term::RawMode;
use super::timer::Timer;
use super::writer::{HubWriter, Shared, WriterConfig};

pub mod fuzzing;

/// An output observer: sees every chunk of the stream, in order, on the event-loop thread.
pub type Observer = Box<dyn FnMut(&[u8]) + Send>;

/// Tunables; [`HubConfig::default`] is what `Hub::new` uses.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Frontends are told the output is congested while queued output plus the largest
    /// lossless backlog exceed this.
    pub high_water: usize,
    /// Most bytes the writer queue holds, and most a lossless sink queues; beyond it
    /// bytes are dropped (counted, with a notice in the stream) instead of memory
    /// growing without bound when a guest ignores the pacing.
    pub hard_cap: usize,
    /// Most a drop-and-count sink (a FIFO or device log) queues.
    pub drop_queue: usize,
    /// Input bytes held for the guest; sources stop being read while it is full.
    pub input_capacity: usize,
    /// History replayed to new socket clients when the spec has no `ring`.
    pub history: usize,
    /// Largest single read from an input source.
    pub read_chunk: usize,
    /// A full listener lets a new client in by closing one idle at least this long.
    pub evict_idle: Duration,
    /// How long `shutdown` waits for a terminal that takes none of the rest of the output.
    pub shutdown_idle: Duration,
    /// How long `shutdown` waits for a socket client that takes none of it.
    pub shutdown_client_idle: Duration,
    /// The longest `shutdown` waits for the terminal and socket clients in all.
    pub shutdown_limit: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            high_water: 256 << 10,
            hard_cap: 16 << 20,
            drop_queue: 1 << 20,
            input_capacity: 64 << 10,
            history: super::spec::DEFAULT_RING_SIZE,
            read_chunk: 4096,
            evict_idle: Duration::from_secs(30),
            shutdown_idle: Duration::from_secs(2),
            shutdown_client_idle: Duration::from_secs(1),
            shutdown_limit: Duration::from_secs(5),
        }
    }
}

/// What woke the hub (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Wake,
    Timer,
    Frontend(usize),
    Listener(usize),
    Endpoint(u32),
}

const TAG_SHIFT: u32 = 28;
const INDEX_MASK: u32 = (1 << TAG_SHIFT) - 1;

impl Token {
    fn encode(self) -> u32 {
        // Indexes are bounded (frontends, listeners) or masked (endpoint ids).
        match self {
            Token::Wake => 0,
            Token::Timer => 1,
            Token::Frontend(i) => (1 << TAG_SHIFT) | (i as u32 & INDEX_MASK),
            Token::Listener(i) => (2 << TAG_SHIFT) | (i as u32 & INDEX_MASK),
            Token::Endpoint(id) => (3 << TAG_SHIFT) | (id & INDEX_MASK),
        }
    }

    fn decode(v: u32) -> Option<Token> {
        let i = v & INDEX_MASK;
        match v >> TAG_SHIFT {
            0 if i == 0 => Some(Token::Wake),
            0 if i == 1 => Some(Token::Timer),
            1 => Some(Token::Frontend(i as usize)),
            2 => Some(Token::Listener(i as usize)),
            3 => Some(Token::Endpoint(i)),
            _ => None,
        }
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
        self.0.add(Events::with_data_raw(fd, token, set)).map_err(em_err)
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

/// What reading from a source gave.
enum Outcome {
    Data,
    Eof,
    WouldBlock,
    NoSpace,
    Failed,
}

/// How the last shutdown went (tests check the bound).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownSummary {
    /// Consumers that still had output pending when shutdown stopped waiting.
    pub gave_up: usize,
    /// Stopped because the overall limit was reached (not because all was delivered or
    /// every consumer stopped taking output).
    pub hit_limit: bool,
}

/// The console hub. Create it from a [`ConsoleSpec`], attach frontends, register it
/// with an `event_manager::EventManager` (it registers its own fds in `init`), and call
/// [`Hub::shutdown`] when the VMM stops (dropping it does the same).
pub struct Hub {
    cfg: HubConfig,
    limits: Limits,
    shared: Arc<Shared>,
    /// Written (1) when the user quits from the terminal (Ctrl-A x).
    quit: EventFd,
    /// The output stream's last bytes: history, and every client's backlog.
    ring: ByteRing,
    /// Bytes of history replayed to a new client and reported as the `ring`.
    history: usize,
    has_ring: bool,
    observers: Vec<Observer>,
    frontends: Frontends,
    input: InputQueue,
    endpoints: BTreeMap<u32, Endpoint>,
    listeners: Vec<ListenerState>,
    /// The stdout endpoint, for notices meant for the VMM's terminal only.
    stdout: Option<u32>,
    timer: Timer,
    next_id: u32,
    initialized: bool,
    shut: bool,
    raw: Option<RawMode>,
    spare: Vec<u8>,
    scratch: Vec<u8>,
    /// Backends (not socket clients) removed so far.
    retired: Vec<BackendStats>,
    last_shutdown: Option<ShutdownSummary>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("endpoints", &self.endpoints.len())
            .field("listeners", &self.listeners.len())
            .finish()
    }
}

impl Hub {
    /// A hub with the backends of `spec`. `quit` is written (1) when the user asks to
    /// stop the VM (Ctrl-A x on the terminal).
    pub fn new(spec: &ConsoleSpec, quit: EventFd) -> Result<Hub, MuxError> {
        Self::with_config(spec, quit, HubConfig::default())
    }

    /// [`Hub::new`] with explicit tunables.
    pub fn with_config(spec: &ConsoleSpec, quit: EventFd, cfg: HubConfig) -> Result<Hub, MuxError> {
        let history = spec.ring_size().unwrap_or(cfg.history);
        let mut hub = Hub::bare(quit, cfg, history)?;
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

    pub(crate) fn bare(quit: EventFd, cfg: HubConfig, history: usize) -> Result<Hub, MuxError> {
        let shared = Shared::new(WriterConfig {
            high_water: cfg.high_water,
            hard_cap: cfg.hard_cap,
        })
        .map_err(MuxError::EventFd)?;
        let timer = Timer::new().map_err(MuxError::EventFd)?;
        Ok(Hub {
            limits: Limits {
                lossless: cfg.hard_cap,
                drop_and_count: cfg.drop_queue,
                history,
            },
            input: InputQueue::new(cfg.input_capacity),
            scratch: vec![0; cfg.read_chunk.max(1)],
            cfg,
            shared,
            quit,
            ring: ByteRing::new(history),
            history,
            has_ring: false,
            observers: Vec::new(),
            frontends: Frontends::default(),
            endpoints: BTreeMap::new(),
            listeners: Vec::new(),
            stdout: None,
            timer,
            next_id: 0,
            initialized: false,
            shut: false,
            raw: None,
            spare: Vec::new(),
            retired: Vec::new(),
            last_shutdown: None,
        })
    }

    /// A fresh endpoint id. Ids are not reused while the hub lives (2^28 of them), so
    /// a stale event can never reach a new endpoint.
    fn alloc_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = (self.next_id + 1) & INDEX_MASK;
            if !self.endpoints.contains_key(&id) {
                return id;
            }
        }
    }

    /// Adds an endpoint; its cut-off sink (if any) gets a ring that holds its limit.
    pub(crate) fn insert(&mut self, ep: Endpoint) -> u32 {
        if let Some(s) = &ep.sink
            && s.policy() == Policy::CutOff
        {
            self.ring.grow_to(s.limit());
        }
        let id = self.alloc_id();
        self.endpoints.insert(id, ep);
        id
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
                let role = Role::Log {
                    regular: port.is_regular(),
                };
                let name = format!("file {}", f.path.display());
                let ep = Endpoint::new(name, Box::new(port), Owner::Backend, plan(role, &self.limits), 0);
                self.insert(ep);
                Ok(())
            }
            BackendSpec::Sock(s) => {
                let sock = match &s.listen {
                    Listen::Unix(Some(p)) => socket::bind_unix(p, s.mode)?,
                    Listen::Unix(None) => {
                        let p = socket::default_socket_path();
                        let l = socket::bind_unix(&p, s.mode)?;
                        log::info!("console socket: {}", p.display());
                        l
                    }
                    Listen::Tcp(a) => socket::bind_tcp(*a)?,
                };
                // Every client may fall this far behind: the ring keeps that much.
                self.ring.grow_to(s.queue.max(self.history));
                self.listeners.push(ListenerState::new(sock, s.clone()));
                Ok(())
            }
        }
    }

    fn add_stdio(&mut self) -> Result<(), MuxError> {
        self.raw = RawMode::enter(libc::STDIN_FILENO)?;
        let stdout = StdoutPort::open().map_err(MuxError::Stdout)?;
        let ep = Endpoint::new(
            "stdout".into(),
            Box::new(stdout),
            Owner::Backend,
            plan(Role::Stdout, &self.limits),
            0,
        );
        self.stdout = Some(self.insert(ep));
        let tty = self.raw.is_some();
        let ep = Endpoint::new(
            "stdin".into(),
            Box::new(StdinPort),
            Owner::Backend,
            plan(Role::Stdin { tty }, &self.limits),
            0,
        );
        self.insert(ep);
        Ok(())
    }

    /// Attaches a console frontend named `name` (`ttyS0`, `hvc0`): `make` gets the
    /// frontend's output writer and returns its input side and whatever the caller
    /// wants back (e.g. the device). What it writes is counted under `name`.
    pub fn attach_frontend<R>(
        &mut self,
        name: &str,
        make: impl FnOnce(HubWriter) -> (Box<dyn FrontendInput>, R),
    ) -> Result<R, MuxError> {
        let sent = Arc::new(AtomicU64::new(0));
        let (input, r) = make(HubWriter::new(self.shared.clone(), sent.clone()));
        self.frontends
            .attach(name, input, sent)
            .ok_or(MuxError::TooManyFrontends(MAX_FRONTENDS))?;
        if self.initialized {
            // Get the event loop to watch the drained fd and offer held input.
            self.shared.kick();
        }
        Ok(r)
    }

    /// [`Hub::attach_frontend`] for a frontend whose input side exists already; returns
    /// its output writer.
    pub fn add_frontend(
        &mut self,
        name: &str,
        input: Box<dyn FrontendInput>,
    ) -> Result<HubWriter, MuxError> {
        self.attach_frontend(name, |w| (input, w))
    }

    /// Another writer on the same output stream, counted under no frontend (e.g. for
    /// VMM messages).
    pub fn writer(&self) -> HubWriter {
        HubWriter::new(self.shared.clone(), Arc::new(AtomicU64::new(0)))
    }

    /// Observers see every output chunk, in stream order, on the event-loop thread.
    pub fn add_observer(&mut self, f: Observer) {
        self.observers.push(f);
    }

    /// The last bytes of the stream (the `ring` backend's content).
    pub fn history(&self) -> Vec<u8> {
        self.ring.tail(self.history)
    }

    /// Paths of the unix sockets this hub listens on (default paths included).
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        self.listeners
            .iter()
            .filter_map(|l| match &l.sock {
                Listener::Unix { path, .. } => Some(path.clone()),
                Listener::Tcp(_) => None,
            })
            .collect()
    }

    /// Local addresses of the TCP listeners (useful with port 0).
    pub fn tcp_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| match &l.sock {
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
        self.frontends.target_name()
    }

    /// How the last [`Hub::shutdown`] went.
    pub fn last_shutdown(&self) -> Option<&ShutdownSummary> {
        self.last_shutdown.as_ref()
    }

    /// What went through the hub so far: per frontend, per backend, per socket listener.
    pub fn stats(&self) -> HubStats {
        let mut backends = self.retired.clone();
        backends.extend(
            self.endpoints
                .values()
                .filter(|e| !e.is_client())
                .map(|e| e.stats(if e.dead.is_some() { "closed" } else { "open" })),
        );
        backends.sort_by(|a, b| a.name.cmp(&b.name));
        if self.has_ring {
            backends.push(BackendStats {
                name: "ring".into(),
                bytes_out: self.ring.total(),
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
                l.stats(self.endpoints.values().filter_map(|e| match e.owner {
                    Owner::Client { listener, .. } if listener == i => {
                        Some((e.cut_off, e.out_counts().0, e.typed))
                    }
                    _ => None,
                }))
            })
            .collect();
        HubStats {
            output_bytes: self.ring.total(),
            input_bytes: self.frontends.taken(),
            frontends: self.frontends.stats(),
            backends,
            listeners,
        }
    }

    /// What the hub holds in memory now, as its limits count it.
    pub fn memory(&self) -> MemoryUse {
        MemoryUse {
            writer_queue: self.shared.queued(),
            input: self.input.len(),
            ring: self.ring.allocated(),
            sinks: self
                .endpoints
                .values()
                .filter_map(|e| e.sink.as_ref().map(|s| (e.name.clone(), s.charged())))
                .collect(),
        }
    }

    // ---- event handling -------------------------------------------------------------

    fn init_with(&mut self, reg: &mut dyn Reg) {
        for (fd, token, what) in [
            (self.shared.wake.as_raw_fd(), Token::Wake, "wake-up eventfd"),
            (self.timer.fd(), Token::Timer, "timer"),
        ] {
            if let Err(e) = reg.add(fd, token.encode(), EventSet::IN) {
                log::error!("console hub: cannot watch its {what}: {e}");
            }
        }
        self.initialized = true;
        self.settle(reg);
    }

    fn handle(&mut self, data: u32, set: EventSet, reg: &mut dyn Reg) {
        match Token::decode(data) {
            Some(Token::Wake) => {
                let _ = self.shared.wake.read();
                self.drain_writer();
            }
            Some(Token::Timer) => {
                self.timer.ack();
                self.expire_idle(Instant::now());
            }
            Some(Token::Frontend(i)) => self.frontends.ack_drained(i),
            Some(Token::Listener(i)) => self.accept(i),
            Some(Token::Endpoint(id)) => self.endpoint_event(id, set),
            None => {}
        }
        self.settle(reg);
    }

    /// Run after every event (see the module doc).
    fn settle(&mut self, reg: &mut dyn Reg) {
        for (i, fd) in self.frontends.take_unwatched() {
            if let Err(e) = reg.add(fd, Token::Frontend(i).encode(), EventSet::IN) {
                log::error!("console frontend {i}: cannot watch its drained fd: {e}");
            }
        }
        self.frontends.feed(&mut self.input);
        self.service_parked();
        self.sweep(reg);
        let ids: Vec<u32> = self.endpoints.keys().copied().collect();
        for id in ids {
            self.sync(id, reg);
        }
        self.sweep(reg);
        self.sync_listeners(reg);
        self.update_congestion();
        self.arm_timer();
    }

    fn update_congestion(&mut self) {
        let backlog = self
            .endpoints
            .values()
            .filter_map(|e| e.sink.as_ref())
            .filter(|s| s.policy() == Policy::Lossless)
            .map(|s| s.pending(&self.ring))
            .max()
            .unwrap_or(0);
        if self.shared.set_backlog(backlog) {
            self.frontends.resume_output();
        }
    }

    /// Takes everything the writers queued and fans it out.
    fn drain_writer(&mut self) {
        let (data, dropped) = self.shared.take(std::mem::take(&mut self.spare));
        if !data.is_empty() {
            self.emit(&data);
        }
        if dropped > 0 {
            let msg = format!(
                "\r\n[microvm: {dropped} bytes of console output dropped: console hub overloaded]\r\n"
            );
            self.emit(msg.as_bytes());
        }
        let mut data = data;
        data.clear();
        if data.capacity() > (1 << 20) {
            data.shrink_to(1 << 20);
        }
        self.spare = data;
    }

    /// WHERE A BYTE FANS OUT: one chunk of the stream to the observers, the ring and
    /// every sink, in order.
    fn emit(&mut self, data: &[u8]) {
        for obs in self.observers.iter_mut() {
            obs(data);
        }
        self.ring.push(data);
        let mut shared = None;
        for ep in self.endpoints.values_mut() {
            ep.offer(data, &self.ring, &mut shared);
        }
    }

    fn endpoint_event(&mut self, id: u32, set: EventSet) {
        let Some(ep) = self.endpoints.get_mut(&id) else {
            return;
        };
        let hup = set.intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP);
        if set.contains(EventSet::OUT) || hup {
            ep.flush(&self.ring);
        }
        if hup && ep.source.is_none() {
            // Output only (stdout, a FIFO log): the reader went away.
            ep.drop_sink();
            let why = format!("console backend {} closed; the VM goes on", ep.name);
            ep.kill(Some(why));
            return;
        }
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // The peer is gone both ways: no more output to it.
            ep.drop_sink();
        }
        if set.contains(EventSet::IN) || hup {
            // stdin stays a blocking fd (it is shared with the parent's terminal), so it
            // is read once per readiness event; sockets are read until they would block.
            let rounds = if self.is_stdin(id) { 1 } else { 16 };
            for _ in 0..rounds {
                match self.read_from(id) {
                    Outcome::Data => {
                        self.frontends.feed(&mut self.input);
                        continue;
                    }
                    Outcome::NoSpace if hup => {
                        // Peer gone while we cannot take its input: read it later
                        // without polling (it can no longer block).
                        if let Some(ep) = self.endpoints.get_mut(&id) {
                            ep.parked = true;
                        }
                    }
                    _ => {}
                }
                break;
            }
        }
    }

    fn is_stdin(&self, id: u32) -> bool {
        self.endpoints
            .get(&id)
            .is_some_and(|e| !e.is_client() && e.sink.is_none() && e.fd == Some(libc::STDIN_FILENO))
    }

    /// True when endpoint `id`'s input is read and dropped (viewers, non-holders).
    fn discards(&self, id: u32, ep: &Endpoint) -> bool {
        let Some(source) = &ep.source else {
            return false;
        };
        match ep.owner {
            Owner::Client { listener, .. } => self
                .listeners
                .get(listener)
                .is_none_or(|l| l.discards(id, source)),
            Owner::Backend => matches!(source.mode, InputMode::Viewer),
        }
    }

    fn read_from(&mut self, id: u32) -> Outcome {
        let Some(ep) = self.endpoints.get(&id) else {
            return Outcome::Failed;
        };
        if ep.dead.is_some() || !ep.input_live() {
            return Outcome::Failed;
        }
        let discard = self.discards(id, ep);
        let max = match &ep.source {
            Some(s) if !discard => self.input.space_for(s.share()).min(self.scratch.len()),
            _ => self.scratch.len(),
        };
        if max == 0 {
            return Outcome::NoSpace;
        }
        let mut buf = std::mem::take(&mut self.scratch);
        let outcome = match self.endpoints.get_mut(&id).map(|ep| ep.read(&mut buf[..max])) {
            Some(Read::Data(n)) => {
                self.take_input(id, &buf[..n]);
                Outcome::Data
            }
            Some(Read::Eof) => {
                if let Some(ep) = self.endpoints.get_mut(&id) {
                    if !ep.is_client() {
                        let why = format!("{} closed; the VM goes on", ep.name);
                        ep.kill(Some(why));
                    } else if ep.sink.is_none() {
                        ep.kill(None);
                    }
                }
                Outcome::Eof
            }
            Some(Read::WouldBlock) => Outcome::WouldBlock,
            Some(Read::Failed(e)) => {
                if let Some(ep) = self.endpoints.get_mut(&id) {
                    let why = format!("console backend {}: read failed: {e}", ep.name);
                    let quiet = ep.is_client();
                    ep.kill((!quiet).then_some(why));
                }
                Outcome::Failed
            }
            None => Outcome::Failed,
        };
        self.scratch = buf;
        outcome
    }

    /// One read from a source: handled whole, appended to the input stream contiguously.
    fn take_input(&mut self, id: u32, data: &[u8]) {
        let Some(ep) = self.endpoints.get_mut(&id) else {
            return;
        };
        let Some(source) = ep.source.as_mut() else {
            return;
        };
        let (verdict, listener) = match ep.owner {
            Owner::Client { listener, id: no } => match self.listeners.get_mut(listener) {
                Some(l) => (l.keyboard(id, source, data), Some((listener, no))),
                None => (Keyboard::Drop, None),
            },
            Owner::Backend => (Keyboard::Deliver, None),
        };
        let mut actions = Vec::new();
        match verdict {
            Keyboard::Deliver | Keyboard::TookFree => {
                ep.typed += data.len() as u64;
                match &mut source.mode {
                    InputMode::Terminal(parser) => {
                        let mut out = Vec::with_capacity(data.len());
                        parser.feed(data, &mut out, &mut actions);
                        self.input.push(&out);
                    }
                    InputMode::Viewer => {}
                    InputMode::Guest | InputMode::Contender(_) => self.input.push(data),
                }
            }
            Keyboard::TellReadOnly => ep.notice(READ_ONLY_NOTICE, &self.ring),
            Keyboard::Drop | Keyboard::TookOver => {}
        }
        if matches!(verdict, Keyboard::TookFree | Keyboard::TookOver)
            && let Some((listener, no)) = listener
        {
            self.announce_holder(listener, id, no);
        }
        for a in actions {
            self.escape_action(a);
        }
    }

    /// Tells every client of `listener` who has the keyboard now.
    fn announce_holder(&mut self, listener: usize, holder: u32, no: u64) {
        let msg = format!("\r\n[microvm: client {no} took the keyboard; Ctrl-A w takes it back]\r\n");
        for (id, ep) in self.endpoints.iter_mut() {
            if !matches!(ep.owner, Owner::Client { listener: l, .. } if l == listener) {
                continue;
            }
            let mine = *id == holder;
            if let Some(s) = ep.source.as_mut() {
                s.told_readonly = !mine;
            }
            if mine {
                ep.notice("\r\n[microvm: you have the keyboard]\r\n", &self.ring);
            } else {
                ep.notice(&msg, &self.ring);
            }
        }
    }

    fn escape_action(&mut self, a: EscapeAction) {
        match a {
            EscapeAction::Quit => {
                self.local_notice("\r\n[microvm: quit]\r\n");
                if let Err(e) = self.quit.write(1) {
                    log::error!("cannot signal VM exit: {e}");
                }
            }
            EscapeAction::Help => self.local_notice(STDIO_ESCAPE_HELP),
            EscapeAction::SwitchInput => {
                let msg = self.frontends.switch();
                self.local_notice(&msg);
            }
            EscapeAction::Detach | EscapeAction::TakeOver => {}
        }
    }

    /// A message on the VMM's terminal only.
    fn local_notice(&mut self, msg: &str) {
        if let Some(ep) = self.stdout.and_then(|t| self.endpoints.get_mut(&t)) {
            ep.notice(msg, &self.ring);
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
        for id in parked {
            loop {
                match self.read_from(id) {
                    Outcome::Data => self.frontends.feed(&mut self.input),
                    Outcome::Eof | Outcome::Failed => {
                        if let Some(e) = self.endpoints.get_mut(&id) {
                            e.kill(None);
                        }
                        break;
                    }
                    Outcome::WouldBlock | Outcome::NoSpace => break,
                }
            }
        }
    }

    /// Admits the clients waiting on listener `i`.
    fn accept(&mut self, i: usize) {
        loop {
            let now = Instant::now();
            let Some(l) = self.listeners.get_mut(i) else {
                return;
            };
            let mut port = match l.accept_one(now) {
                Accepted::Client(p) => p,
                Accepted::Again => continue,
                Accepted::Done => return,
            };
            if l.clients >= l.spec.max_clients && !self.evict_idle_client(i, now) {
                let l = &mut self.listeners[i];
                let _ = port.write(busy_message(l.clients, l.spec.max_clients).as_bytes());
                l.refused += 1;
                continue;
            }
            let l = &mut self.listeners[i];
            let no = l.admit();
            let name = format!("client {no} on {}", l.sock.describe());
            let plan = plan(Role::Client(&l.spec), &self.limits);
            let contender = matches!(plan.input, Some(InputMode::Contender(_)));
            let take_keyboard = contender && l.holder.is_none();
            let told = contender && !take_keyboard;
            let start = self.ring.total() - self.ring.len().min(self.history) as u64;
            let mut ep = Endpoint::new(name, port, Owner::Client { listener: i, id: no }, plan, start);
            ep.flush(&self.ring);
            if told {
                if let Some(s) = ep.source.as_mut() {
                    s.told_readonly = true;
                }
                ep.notice(READ_ONLY_NOTICE, &self.ring);
            }
            let id = self.insert(ep);
            if take_keyboard {
                self.listeners[i].holder = Some(id);
            }
        }
    }

    /// Makes room on full listener `i` by closing its client idle the longest, if that
    /// one has been idle for [`HubConfig::evict_idle`]. True when it did.
    fn evict_idle_client(&mut self, i: usize, now: Instant) -> bool {
        let victim = self
            .endpoints
            .iter_mut()
            .filter(|(_, e)| e.dead.is_none())
            .filter(|(_, e)| matches!(e.owner, Owner::Client { listener, .. } if listener == i))
            .filter(|(_, e)| now.saturating_duration_since(e.last_active) >= self.cfg.evict_idle)
            .min_by_key(|(_, e)| e.last_active);
        let Some((_, ep)) = victim else {
            return false;
        };
        let idle = now.saturating_duration_since(ep.last_active).as_secs();
        ep.notice(
            &format!("\r\n[microvm: disconnected: idle for {idle} s and a new client needed the place]\r\n"),
            &self.ring,
        );
        ep.kill(None);
        self.listeners[i].idle_closed += 1;
        true
    }

    /// Disconnects clients idle past their listener's `idle-timeout`.
    fn expire_idle(&mut self, now: Instant) {
        for ep in self.endpoints.values_mut() {
            let Owner::Client { listener, .. } = ep.owner else {
                continue;
            };
            let Some(l) = self.listeners.get_mut(listener) else {
                continue;
            };
            let Some(limit) = l.spec.idle_timeout else {
                continue;
            };
            if ep.dead.is_none() && now.saturating_duration_since(ep.last_active) >= limit {
                let what = crate::units::format_duration(limit);
                ep.notice(&format!("\r\n[microvm: disconnected after {what} idle]\r\n"), &self.ring);
                ep.kill(Some(format!("console {}: idle for {what}, disconnected", ep.name)));
                l.idle_closed += 1;
            }
        }
    }

    /// Arms the timer for the next idle deadline or the end of an accept back-off.
    fn arm_timer(&mut self) {
        let idle = self.endpoints.values().filter_map(|e| match e.owner {
            Owner::Client { listener, .. } if e.dead.is_none() => self
                .listeners
                .get(listener)
                .and_then(|l| l.spec.idle_timeout)
                .map(|d| e.last_active + d),
            _ => None,
        });
        let backoff = self.listeners.iter().filter_map(|l| l.paused_until);
        let next = idle.chain(backoff).min();
        if let Err(e) = self.timer.arm(next) {
            log::error!("console hub: cannot arm its timer: {e}");
        }
    }

    /// Watches listeners that accept, and not those backing off.
    fn sync_listeners(&mut self, reg: &mut dyn Reg) {
        let now = Instant::now();
        for (i, l) in self.listeners.iter_mut().enumerate() {
            let want = l.accepting(now);
            if want == l.watched {
                continue;
            }
            let token = Token::Listener(i).encode();
            let res = if want {
                reg.add(l.sock.fd(), token, EventSet::IN)
            } else {
                reg.remove(l.sock.fd(), token)
            };
            match res {
                Ok(()) => l.watched = want,
                Err(e) => {
                    log::error!("cannot watch console socket {}: {e}", l.sock.describe());
                    l.watched = want;
                }
            }
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
        for id in dead {
            let Some(mut ep) = self.endpoints.remove(&id) else {
                continue;
            };
            if let (Some(fd), Some(_)) = (ep.fd, ep.reg) {
                let _ = reg.remove(fd, Token::Endpoint(id).encode());
            }
            if let Some(Some(msg)) = ep.dead.take() {
                log::warn!("{msg}");
            }
            match ep.owner {
                Owner::Client { listener, .. } => {
                    if let Some(l) = self.listeners.get_mut(listener) {
                        l.left(id, ep.cut_off, ep.out_counts().0, ep.typed);
                    }
                }
                Owner::Backend => self.retired.push(ep.stats("closed")),
            }
            if self.stdout == Some(id) {
                self.stdout = None;
            }
        }
    }

    /// Bring an endpoint's epoll interest in line with its state.
    fn sync(&mut self, id: u32, reg: &mut dyn Reg) {
        let Some(ep) = self.endpoints.get(&id) else {
            return;
        };
        let Some(fd) = ep.fd else {
            return;
        };
        let token = Token::Endpoint(id).encode();
        let input_live = ep.input_live();
        let gone = ep.dead.is_some() || ep.parked || (!input_live && ep.sink.is_none());
        if gone {
            if ep.reg.is_some() {
                let _ = reg.remove(fd, token);
            }
            if let Some(ep) = self.endpoints.get_mut(&id) {
                ep.reg = None;
                if !input_live && ep.sink.is_none() {
                    ep.kill(None);
                }
            }
            return;
        }
        let mut want = EventSet::empty();
        if let Some(s) = &ep.source
            && !s.eof
            && (self.discards(id, ep) || self.input.space_for(s.share()) > 0)
        {
            want |= EventSet::IN;
        }
        if ep.pending(&self.ring) > 0 {
            want |= EventSet::OUT;
        }
        let res = match ep.reg {
            None => reg.add(fd, token, want),
            Some(c) if c != want => reg.modify(fd, token, want),
            Some(_) => return,
        };
        let Some(ep) = self.endpoints.get_mut(&id) else {
            return;
        };
        match res {
            Ok(()) => ep.reg = Some(want),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                // A regular file or /dev/null: always ready, never polled.
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
    /// exit, so a CI log and every attached viewer end with the guest's last words. It
    /// waits while they keep taking data, gives up on a consumer that takes nothing for
    /// [`HubConfig::shutdown_idle`] (the terminal) or
    /// [`HubConfig::shutdown_client_idle`] (socket clients), and stops after
    /// [`HubConfig::shutdown_limit`] in all. A second SIGTERM ends the process at once
    /// (see `signals.rs`).
    fn flush_before_exit(&mut self) -> ShutdownSummary {
        let start = Instant::now();
        let mut progress = start;
        for ep in self.endpoints.values_mut() {
            ep.flush(&self.ring);
        }
        loop {
            let waiting: Vec<(libc::pollfd, bool)> = self
                .endpoints
                .iter()
                .filter(|(_, e)| e.dead.is_none() && e.pending(&self.ring) > 0)
                .filter_map(|(id, e)| {
                    let pfd = libc::pollfd {
                        fd: e.fd?,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    Some((pfd, self.stdout == Some(*id)))
                })
                .collect();
            let terminal = waiting.iter().any(|(_, t)| *t);
            let idle_limit = if terminal {
                self.cfg.shutdown_idle
            } else {
                self.cfg.shutdown_client_idle
            };
            let idle_left = idle_limit.saturating_sub(progress.elapsed());
            let hit_limit = start.elapsed() >= self.cfg.shutdown_limit;
            if waiting.is_empty() || idle_left.is_zero() || hit_limit {
                return ShutdownSummary {
                    gave_up: waiting.len(),
                    hit_limit: hit_limit && !waiting.is_empty(),
                };
            }
            let mut pfds: Vec<libc::pollfd> = waiting.into_iter().map(|(p, _)| p).collect();
            let left = self.cfg.shutdown_limit.saturating_sub(start.elapsed());
            let timeout = idle_left.min(left).as_millis().min(200) as i32;
            // SAFETY: `pfds` is a valid array of pollfds for its length; the timeout is
            // bounded.
            let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
            if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return ShutdownSummary::default();
            }
            let before: usize = self.endpoints.values().map(|e| e.pending(&self.ring)).sum();
            for ep in self.endpoints.values_mut() {
                ep.flush(&self.ring);
            }
            let after: usize = self.endpoints.values().map(|e| e.pending(&self.ring)).sum();
            if after < before {
                progress = Instant::now();
            }
        }
    }

    /// Called when the VMM stops: write out what is queued (bounded time), flush log
    /// files, remove socket files, restore the terminal. Idempotent.
    pub fn shutdown(&mut self) {
        if self.shut {
            return;
        }
        self.shut = true;
        self.drain_writer();
        self.sweep(&mut NoReg);
        self.last_shutdown = Some(self.flush_before_exit());
        for ep in self.endpoints.values_mut() {
            if let Err(e) = ep.port.flush() {
                log::warn!("console backend {}: flush failed: {e}", ep.name);
            }
        }
        for l in &self.listeners {
            l.sock.remove_file();
        }
        self.raw = None;
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
    use crate::mux::backend::Port;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    impl Hub {
        /// A hub with no backends (history `history` bytes).
        pub(crate) fn for_test(cfg: HubConfig, history: usize) -> Hub {
            let quit = EventFd::new(EFD_NONBLOCK).unwrap();
            Hub::bare(quit, cfg, history).unwrap()
        }

        /// Adds an in-memory backend with an output policy (and limit) and an input
        /// mode; a cut-off sink starts at the live end of the stream.
        pub(crate) fn add_mem(
            &mut self,
            name: &str,
            port: Box<dyn Port>,
            sink: Option<(Policy, usize)>,
            input: Option<InputMode>,
        ) -> u32 {
            let plan = crate::mux::endpoint::Plan { sink, input };
            let mut ep = Endpoint::new(name.into(), port, Owner::Backend, plan, self.ring.total());
            ep.fd = None;
            self.insert(ep)
        }

        /// Process the writer queue (what a wake-up event does).
        pub(crate) fn pump(&mut self) {
            self.handle(Token::Wake.encode(), EventSet::IN, &mut NoReg);
        }

        /// The backend became writable.
        pub(crate) fn writable(&mut self, t: u32) {
            self.handle(Token::Endpoint(t).encode(), EventSet::OUT, &mut NoReg);
        }

        /// The backend became readable.
        pub(crate) fn readable(&mut self, t: u32) {
            self.handle(Token::Endpoint(t).encode(), EventSet::IN, &mut NoReg);
        }

        /// Frontend `i` drained its input.
        pub(crate) fn drained(&mut self, i: usize) {
            self.handle(Token::Frontend(i).encode(), EventSet::IN, &mut NoReg);
        }

        pub(crate) fn quit_evt(&self) -> &EventFd {
            &self.quit
        }

        pub(crate) fn alive(&self, t: u32) -> bool {
            self.endpoints.contains_key(&t)
        }

        pub(crate) fn pending_of(&self, t: u32) -> usize {
            self.endpoints.get(&t).map_or(0, |e| e.pending(&self.ring))
        }

        pub(crate) fn held_input(&self) -> usize {
            self.input.len()
        }

        pub(crate) fn wants_input(&self, t: u32) -> bool {
            self.endpoints.get(&t).is_some_and(|e| {
                e.source
                    .as_ref()
                    .is_some_and(|s| self.input.space_for(s.share()) > 0)
            })
        }
    }

    #[test]
    fn tokens_round_trip() {
        for t in [
            Token::Wake,
            Token::Timer,
            Token::Frontend(63),
            Token::Listener(7),
            Token::Endpoint(INDEX_MASK),
            Token::Endpoint(0),
        ] {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_eq!(Token::decode(2), None);
        assert_eq!(Token::decode(4 << TAG_SHIFT), None);
    }
}
