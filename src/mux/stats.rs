//! What went through a hub, for `--report` and for tests that check the bounds.

/// What went through a hub ([`crate::mux::Hub::stats`]).
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
    /// Bytes it lost (over its queue's limit).
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
    /// Clients refused (over `max-clients`, none idle enough to make room).
    pub clients_refused: u64,
    /// Connections refused or dropped before they proved who they are (wrong token,
    /// not the protocol, no token in time, a failed TLS handshake).
    pub clients_unauthenticated: u64,
    /// Clients disconnected for being idle (`idle-timeout`, or to make room for a new one).
    pub clients_idle_closed: u64,
    /// `accept` failures (e.g. out of file descriptors; accepting then backs off).
    pub accept_failures: u64,
    /// Bytes delivered to clients (history replay included).
    pub bytes_out: u64,
    /// Bytes clients typed.
    pub bytes_in: u64,
}

/// What a hub holds in memory now, by what its limits charge (payload plus per-chunk
/// overhead): every figure here is bounded by a limit checked at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Output frontends wrote that the hub has not taken yet.
    pub writer_queue: usize,
    /// Input held for the guest.
    pub input: usize,
    /// Bytes allocated for the shared output ring (history and clients' backlog).
    pub ring: usize,
    /// Charged bytes queued for each sink (name, bytes), socket clients included.
    pub sinks: Vec<(String, usize)>,
}

impl MemoryUse {
    /// Everything together.
    pub fn total(&self) -> usize {
        self.writer_queue
            + self.input
            + self.ring
            + self.sinks.iter().map(|(_, n)| n).sum::<usize>()
    }
}
