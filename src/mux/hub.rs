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
//! | `Pending(id)` | a connection proving who it is sent something | `listener.rs` (TLS handshake, token line) |
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
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use event_manager::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::MuxError;
use super::backend::BackendError;
use super::backend::file::{FilePort, LineStamper};
use super::backend::socket::{self, Listener};
use super::backend::stdio::{StdinPort, StdoutPort};
use super::endpoint::{Closing, Endpoint, EndpointId, Limits, Owner, Role, plan};
use super::fanout::Policy;
use super::frontend::{Frontend, Frontends, MAX_FRONTENDS};
use super::input::InputQueue;
use super::listener::{Admission, ListenerState, Pending};
use super::ring::ByteRing;
use super::spec::{BackendSpec, ConsoleSpec, Listen};
use super::stats::{BackendStats, HubStats, MemoryUse};
use super::timer::Timer;
use super::writer::{HubWriter, Shared, WriterConfig};
use crate::host::term::RawMode;

mod admission;
mod epoll;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod incoming;
mod shutdown;

use epoll::{INDEX_MASK, Token};
pub(crate) use epoll::{NoReg, Reg};
use incoming::Outcome;
pub use shutdown::ShutdownSummary;

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
    /// How long a new connection to an authenticated listener has to finish its TLS
    /// handshake and send its token line.
    pub handshake_timeout: Duration,
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
            handshake_timeout: Duration::from_secs(10),
            shutdown_idle: Duration::from_secs(2),
            shutdown_client_idle: Duration::from_secs(1),
            shutdown_limit: Duration::from_secs(5),
        }
    }
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
    endpoints: BTreeMap<EndpointId, Endpoint>,
    listeners: Vec<ListenerState>,
    /// Connections still proving who they are, by id.
    pending: BTreeMap<u32, Pending>,
    next_pending: u32,
    /// The stdout endpoint, for notices meant for the VMM's terminal only.
    stdout: Option<EndpointId>,
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
            pending: BTreeMap::new(),
            next_pending: 0,
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
                let mut ep = Endpoint::new(
                    name,
                    Box::new(port),
                    Owner::Backend,
                    plan(role, &self.limits),
                    0,
                );
                ep.stamper = f.timestamps.then(LineStamper::new);
                self.insert(ep);
                Ok(())
            }
            BackendSpec::Sock(s) => {
                // Tokens and certificates first: a bad one leaves no socket behind.
                let admission = Admission::load(s)?;
                let sock = match &s.listen {
                    Listen::Unix(Some(p)) => socket::bind_unix(p, s.mode)?,
                    Listen::Unix(None) => {
                        let p = socket::default_socket_path().map_err(BackendError::Files)?;
                        let l = socket::bind_unix(&p, s.mode)?;
                        log::info!("console socket: {}", p.display());
                        l
                    }
                    Listen::Tcp(a) => socket::bind_tcp(*a)?,
                };
                // Every client may fall this far behind: the ring keeps that much.
                self.ring.grow_to(s.queue.max(self.history));
                self.listeners
                    .push(ListenerState::new(sock, s.clone(), admission));
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
        make: impl FnOnce(HubWriter) -> (Box<dyn Frontend>, R),
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
        input: Box<dyn Frontend>,
    ) -> Result<HubWriter, MuxError> {
        self.attach_frontend(name, |w| (input, w))
    }

    /// An input-only source inside microvm (`--send-after`): what is written to the other
    /// end of `stream` (one end of a socketpair) reaches the guest like a socket client's
    /// input: each read whole, in arrival order, through the same bounded input buffer.
    /// It shows in [`Hub::stats`] as a backend named `name` (its bytes as `bytes_in`) and
    /// goes away quietly when the other end is closed. `stream` must be non-blocking.
    pub fn add_input_source(&mut self, name: &str, stream: std::os::unix::net::UnixStream) {
        let ep = Endpoint::new(
            name.into(),
            Box::new(socket::Stream::Unix(stream)),
            Owner::Backend,
            plan(Role::Script, &self.limits),
            0,
        );
        self.insert(ep);
        if self.initialized {
            self.shared.kick();
        }
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
                .map(|e| e.stats(if e.is_closing() { "closed" } else { "open" })),
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
                self.expire_pending(Instant::now(), reg);
            }
            Some(Token::Frontend(i)) => self.frontends.ack_drained(i),
            Some(Token::Listener(i)) => self.accept(i, reg),
            Some(Token::Endpoint(id)) => self.endpoint_event(id, set),
            Some(Token::Pending(id)) => self.handshake(id, reg),
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
        self.frontends.take_input(&mut self.input);
        self.service_parked();
        self.sweep(reg);
        let ids: Vec<EndpointId> = self.endpoints.keys().copied().collect();
        for id in ids {
            self.sync(id, reg);
        }
        self.sweep(reg);
        self.sync_pending(reg);
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

    fn endpoint_event(&mut self, id: EndpointId, set: EventSet) {
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
            ep.close(Closing::Logged(why));
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
                        self.frontends.take_input(&mut self.input);
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
}

#[cfg(test)]
pub(crate) mod testing {
    //! Drive a hub without an event loop, with in-memory ports.
    use super::*;
    use crate::mux::backend::Port;
    use crate::mux::endpoint::InputMode;
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
        pub(crate) fn writable(&mut self, id: EndpointId) {
            self.handle(Token::Endpoint(id).encode(), EventSet::OUT, &mut NoReg);
        }

        /// The backend became readable.
        pub(crate) fn readable(&mut self, id: EndpointId) {
            self.handle(Token::Endpoint(id).encode(), EventSet::IN, &mut NoReg);
        }

        /// Frontend `i` drained its input.
        pub(crate) fn drained(&mut self, i: usize) {
            self.handle(Token::Frontend(i).encode(), EventSet::IN, &mut NoReg);
        }

        pub(crate) fn quit_evt(&self) -> &EventFd {
            &self.quit
        }

        pub(crate) fn alive(&self, id: EndpointId) -> bool {
            self.endpoints.contains_key(&id)
        }

        pub(crate) fn pending_of(&self, id: EndpointId) -> usize {
            self.endpoints.get(&id).map_or(0, |e| e.pending(&self.ring))
        }

        pub(crate) fn held_input(&self) -> usize {
            self.input.len()
        }

        pub(crate) fn wants_input(&self, id: EndpointId) -> bool {
            self.endpoints.get(&id).is_some_and(|e| {
                e.source
                    .as_ref()
                    .is_some_and(|s| self.input.space_for(s.share()) > 0)
            })
        }
    }
}
