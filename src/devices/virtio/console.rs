//! The virtio console (device type 3), port 0 only: receiveq (0) and transmitq (1).
//!
//! - TX: every available chain's readable bytes are gathered (scatter-gather) and handed to
//!   the sink `W` in ONE `write()` call, so a hub sees one chunk per guest buffer.
//! - RX: [`Console::take_input`] fills the buffers the guest posted and returns how much it
//!   took; 0 when none are posted (the caller keeps the bytes and waits for the receive
//!   queue's notification, the "drained" fd of [`ConsoleFrontend`]). Input is taken only once
//!   the port is open ([`Console::is_open`]): the guest has written to it since activation.
//!   Linux posts receive buffers before it links the port into its list, and drops data
//!   that arrives in between (`in_intr` finds no port and flushes the buffers), so input
//!   offered right at DRIVER_OK would be lost; a guest that writes to hvc0 (a prompt, a
//!   log line) is past that point. This also tells the hub when to move its input target
//!   from the UART to hvc0.
//! - Features: VIRTIO_F_VERSION_1, VIRTIO_CONSOLE_F_SIZE (cols/rows in the config space,
//!   [`Console::set_size`]), VIRTIO_CONSOLE_F_EMERG_WRITE (a config write at offset 8 emits
//!   one byte).
//! - Guest faults (write-only buffers on TX, readable ones on RX, buffers outside guest
//!   memory, loops, indirect descriptors (not offered), chains longer than the queue or
//!   than [`MAX_CHAIN_BYTES`]) skip the chain and return it used with length 0; a queue
//!   that cannot be used at all (broken available index, used ring not writable) sets
//!   DEVICE_NEEDS_RESET. Each is logged, rate-limited, on stderr; nothing panics.
//! - Bounded work: chains are walked by [`super::chain::walk`] (at most
//!   [`MAX_CHAIN_DESCRIPTORS`] descriptor reads each), and one [`Console::process_tx`] or
//!   [`Console::take_input`] call handles a bounded number of chains, descriptors and bytes,
//!   so whatever the guest puts on its rings, the thread serving them is held a bounded
//!   time per call; leftovers are handled on the next call.

use std::io::Write;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

mod event_loop;
pub use event_loop::{ConsoleFrontend, ConsoleTxHandler};

use super::chain::{self, Buffer, ChainError};
use super::{
    ActivateError, FaultLog, InterruptSignal, TYPE_CONSOLE, VIRTIO_F_VERSION_1, VirtioDevice,
};
use crate::devices::FrontendOutput;
use crate::vstate::memory::GuestMemory;

/// Index of the receive queue (host to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to host).
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Feature bit: cols/rows in the configuration space.
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// Feature bit: emergency write through the configuration space.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;
/// The largest chain (readable bytes on TX) accepted as one chunk; Linux sends at most
/// 128 KiB per buffer.
pub const MAX_CHAIN_BYTES: usize = 1 << 20;
/// The most descriptors one chain may have (a longer one loops; indirect descriptors are
/// not offered, see [`super::chain`]).
pub const MAX_CHAIN_DESCRIPTORS: u16 = QUEUE_SIZE;
/// What one [`Console::process_tx`] call handles at most before it yields (returns true):
/// chains, descriptors read, bytes copied. Whatever the guest puts on the ring, one call
/// costs a bounded time.
const TX_BATCH_CHAINS: usize = QUEUE_SIZE as usize;
const TX_BATCH_DESCRIPTORS: usize = 4 * QUEUE_SIZE as usize;
const TX_BATCH_BYTES: usize = MAX_CHAIN_BYTES;
/// What one [`Console::take_input`] call handles at most: chains, descriptors read.
const RX_BATCH_CHAINS: usize = 2 * QUEUE_SIZE as usize;
const RX_BATCH_DESCRIPTORS: usize = 4 * QUEUE_SIZE as usize;
/// Offset of `emerg_wr` in the configuration space.
const EMERG_WR_OFFSET: u64 = 8;
/// Size of the configuration space (cols, rows, max_nr_ports, emerg_wr).
const CONFIG_LEN: usize = 12;

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];

/// A guest error in one chain or queue.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleFault {
    /// A device-writable buffer on the transmit queue.
    #[error("transmitq: write-only descriptor in chain {0}; chain skipped")]
    WriteOnlyOnTx(u16),
    /// A device-readable buffer on the receive queue.
    #[error("receiveq: read-only descriptor in chain {0}; chain skipped")]
    ReadOnlyOnRx(u16),
    /// A buffer outside guest memory.
    #[error(
        "{queue}: buffer {addr:#x}+{len:#x} in chain {head} is outside guest memory; chain skipped"
    )]
    OutOfMemory {
        /// Queue name.
        queue: &'static str,
        /// Chain head.
        head: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The chain loops, is too long, uses indirect descriptors, names a bad index or
    /// cannot be read.
    #[error("{queue}: chain {head} refused: {source}; chain skipped")]
    Chain {
        /// Queue name.
        queue: &'static str,
        /// Chain head.
        head: u16,
        /// What is wrong with it.
        source: ChainError,
    },
    /// More readable bytes than one chunk may hold.
    #[error("transmitq: chain {0} carries more than {MAX_CHAIN_BYTES} bytes; chain skipped")]
    ChainTooLarge(u16),
    /// The queue itself cannot be used.
    #[error("{queue}: queue unusable ({source}); device needs reset")]
    Queue {
        /// Queue name.
        queue: &'static str,
        /// What virtio-queue said.
        source: virtio_queue::Error,
    },
}

fn queue_name(index: usize) -> &'static str {
    if index == RX_QUEUE {
        "receiveq"
    } else {
        "transmitq"
    }
}

/// Who moves transmit chains: the event loop holds them back only for the consumers'
/// backlog (the hub takes its queued output right after), a vCPU thread also for output
/// the hub has yet to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxCaller {
    EventLoop,
    Vcpu,
}

/// A chain taken off the available ring: its head, and how walking it ended.
type Popped = (u16, Result<(), ChainError>);

/// The virtio console device, generic over its output sink and its interrupt.
pub struct Console<W: FrontendOutput, I: InterruptSignal> {
    out: W,
    interrupt: I,
    acked_features: u64,
    cols: u16,
    rows: u16,
    generation: u32,
    mem: Option<GuestMemory>,
    queues: Vec<Queue>,
    broken: bool,
    open: bool,
    log: FaultLog,
    input_ready: Option<Arc<EventFd>>,
    tx_buf: Vec<u8>,
    /// The buffers of the chain being handled (reused).
    chain: Vec<Buffer>,
    /// The last `process_tx` left chains queued because the sink was backlogged.
    paused: bool,
    /// Kicks the transmit handler on the event loop (see [`Console::notify_tx`]).
    tx_continue: Option<EventFd>,
}

impl<W: FrontendOutput, I: InterruptSignal> Console<W, I> {
    /// A console writing guest output to `out` and raising `interrupt`.
    pub fn new(out: W, interrupt: I) -> Self {
        Console {
            out,
            interrupt,
            acked_features: 0,
            cols: 0,
            rows: 0,
            generation: 0,
            mem: None,
            queues: Vec::new(),
            broken: false,
            open: false,
            log: FaultLog::new("virtio-console:"),
            input_ready: None,
            tx_buf: Vec::new(),
            chain: Vec::new(),
            paused: false,
            tx_continue: None,
        }
    }

    /// An eventfd written when the device becomes active, so that the input side offers
    /// what it holds (normally the receive queue's ioeventfd, the input's "drained" fd).
    pub fn set_input_ready_event(&mut self, evt: Arc<EventFd>) {
        self.input_ready = Some(evt);
    }

    /// True when the last [`Console::process_tx`] left chains queued for a backlogged sink.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// True once the driver set DRIVER_OK with valid queues (and no reset since).
    pub fn is_active(&self) -> bool {
        self.mem.is_some() && !self.queues.is_empty()
    }

    /// True once the guest has written to the port since activation: input is taken from
    /// then on (see the module notes).
    pub fn is_open(&self) -> bool {
        self.is_active() && self.open
    }

    /// The output sink.
    pub fn sink(&self) -> &W {
        &self.out
    }

    /// The output sink, mutably.
    pub fn sink_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Guest faults seen so far.
    pub fn faults(&self) -> u64 {
        self.log.total()
    }

    /// The terminal size the guest sees (columns, rows).
    pub fn size(&self) -> (u16, u16) {
        (self.cols, self.rows)
    }

    /// Sets the terminal size; the guest is told through a config-change interrupt when it
    /// negotiated VIRTIO_CONSOLE_F_SIZE.
    pub fn set_size(&mut self, cols: u16, rows: u16) {
        if (cols, rows) == (self.cols, self.rows) {
            return;
        }
        self.cols = cols;
        self.rows = rows;
        self.generation = self.generation.wrapping_add(1);
        if self.is_active() && self.acked(VIRTIO_CONSOLE_F_SIZE) {
            self.interrupt.signal_config_change();
        }
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    fn fault(&mut self, f: ConsoleFault) {
        self.log.report(format_args!("{f}"));
    }

    fn fail_queue(&mut self, index: usize, source: virtio_queue::Error) {
        self.fault(ConsoleFault::Queue {
            queue: queue_name(index),
            source,
        });
        self.broken = true;
        self.interrupt.signal_config_change();
    }

    /// Pops the next available chain of queue `index` and walks it into `self.chain`:
    /// `Ok(None)` when the ring is empty, `Ok(Some((head, walked)))` otherwise (`walked` is
    /// how the walk ended), `Err` when the queue itself is unusable.
    fn pop(
        &mut self,
        mem: &GuestMemory,
        index: usize,
    ) -> Result<Option<Popped>, virtio_queue::Error> {
        let q = &mut self.queues[index];
        let (table, size) = (GuestAddress(q.desc_table()), q.size());
        let Some(head) = q.iter(mem)?.next().map(|c| c.head_index()) else {
            return Ok(None);
        };
        let walked = chain::walk(
            mem,
            table,
            size,
            head,
            MAX_CHAIN_DESCRIPTORS,
            &mut self.chain,
        );
        Ok(Some((head, walked)))
    }

    /// Descriptors the last [`Console::pop`] read (the one that failed included).
    fn descriptors_read(&self, walked: &Result<(), ChainError>) -> usize {
        self.chain.len() + usize::from(walked.is_err())
    }

    fn add_used(&mut self, mem: &GuestMemory, index: usize, head: u16, len: u32) -> bool {
        match self.queues[index].add_used(mem, head, len) {
            Ok(()) => true,
            Err(e) => {
                self.fail_queue(index, e);
                false
            }
        }
    }

    /// Moves every available transmit chain to the sink (on the event loop). Returns true
    /// when chains may be left (the batch limit was reached): call again after other
    /// work. While the sink is backlogged (a lossless consumer is behind) chains stay
    /// queued, which paces the guest; the owner calls this again when the sink
    /// decongests.
    pub fn process_tx(&mut self) -> bool {
        self.move_tx(TxCaller::EventLoop)
    }

    /// The guest notified the transmit queue; called on its vCPU thread, in the MMIO exit
    /// of the QueueNotify write. Linux's hvc driver spins, interrupts off, until each
    /// buffer it queued is used, so the buffer is used right here, before the guest
    /// resumes: no ioeventfd, no event-loop wake-up between a buffer and its use. While
    /// the hub has not taken earlier output (`congested`), or after a full batch, the
    /// rest is left to the event loop (the transmit handler is kicked), which paces the
    /// guest as [`Console::process_tx`] does.
    pub fn notify_tx(&mut self) {
        let left = self.move_tx(TxCaller::Vcpu);
        if left && let Some(evt) = &self.tx_continue {
            let _ = evt.write(1);
        }
    }

    /// An eventfd the transmit handler waits on: written by [`Console::notify_tx`] when
    /// it leaves chains for the event loop.
    pub fn set_tx_continue_event(&mut self, evt: EventFd) {
        self.tx_continue = Some(evt);
    }

    fn move_tx(&mut self, caller: TxCaller) -> bool {
        self.paused = false;
        let Some(mem) = self
            .mem
            .clone()
            .filter(|_| self.is_active() && !self.broken)
        else {
            return false;
        };
        let mut used = false;
        let mut more = false;
        let (mut chains, mut descriptors, mut bytes) = (0, 0, 0);
        loop {
            if chains == TX_BATCH_CHAINS
                || descriptors >= TX_BATCH_DESCRIPTORS
                || bytes >= TX_BATCH_BYTES
            {
                more = true;
                break;
            }
            match caller {
                TxCaller::EventLoop if self.out.backlogged() => {
                    self.paused = true;
                    break;
                }
                TxCaller::Vcpu if self.out.congested() => {
                    more = true;
                    break;
                }
                _ => {}
            }
            let (head, walked) = match self.pop(&mem, TX_QUEUE) {
                Ok(Some(popped)) => popped,
                Ok(None) => break,
                Err(e) => {
                    self.fail_queue(TX_QUEUE, e);
                    break;
                }
            };
            chains += 1;
            descriptors += self.descriptors_read(&walked);
            let mut buf = std::mem::take(&mut self.tx_buf);
            let gathered = walked
                .map_err(|source| ConsoleFault::Chain {
                    queue: "transmitq",
                    head,
                    source,
                })
                .and_then(|()| gather(&mem, head, &self.chain, &mut buf));
            match gathered {
                Ok(()) => {
                    bytes += buf.len();
                    write_chunk(&mut self.out, &buf);
                }
                Err(f) => self.fault(f),
            }
            self.tx_buf = buf;
            if !self.add_used(&mem, TX_QUEUE, head, 0) {
                break;
            }
            used = true;
        }
        if self.tx_buf.capacity() > 4 * 65536 {
            self.tx_buf = Vec::new();
        }
        if used {
            self.interrupt.signal_used_queue();
            if !self.open {
                self.open = true;
                // Let the input side offer what it holds.
                if let Some(evt) = &self.input_ready {
                    let _ = evt.write(1);
                }
            }
        }
        more
    }

    /// Offers input to the guest: fills posted receive buffers and returns how many bytes
    /// were taken; 0 when no buffer is posted (or the port is not open yet).
    pub fn take_input(&mut self, data: &[u8]) -> usize {
        let Some(mem) = self.mem.clone().filter(|_| self.is_open() && !self.broken) else {
            return 0;
        };
        let mut done = 0;
        let mut used = false;
        let mut descriptors = 0;
        // Bounded: a guest that keeps posting empty or long chains cannot hold the caller.
        for _ in 0..RX_BATCH_CHAINS {
            if done == data.len() || descriptors >= RX_BATCH_DESCRIPTORS {
                break;
            }
            let (head, walked) = match self.pop(&mem, RX_QUEUE) {
                Ok(Some(popped)) => popped,
                Ok(None) => break,
                Err(e) => {
                    self.fail_queue(RX_QUEUE, e);
                    break;
                }
            };
            descriptors += self.descriptors_read(&walked);
            let scattered = walked
                .map_err(|source| ConsoleFault::Chain {
                    queue: "receiveq",
                    head,
                    source,
                })
                .and_then(|()| scatter(&mem, head, &self.chain, &data[done..]));
            let n = match scattered {
                Ok(n) => n,
                Err(f) => {
                    self.fault(f);
                    0
                }
            };
            // n <= data.len(), which is far below u32::MAX per buffer in practice; clamp.
            if !self.add_used(&mem, RX_QUEUE, head, u32::try_from(n).unwrap_or(u32::MAX)) {
                break;
            }
            done += n;
            used = true;
        }
        if used {
            self.interrupt.signal_used_queue();
        }
        done
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..2].copy_from_slice(&self.cols.to_le_bytes());
        c[2..4].copy_from_slice(&self.rows.to_le_bytes());
        // max_nr_ports (valid with MULTIPORT only) and emerg_wr read as 0.
        c
    }
}

/// Writes `buf` as one chunk (one `write()` call; the rest only if the sink took less).
fn write_chunk<W: Write>(out: &mut W, buf: &[u8]) {
    let mut off = 0;
    while off < buf.len() {
        match out.write(&buf[off..]) {
            Ok(0) => break,
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The sink never blocks; an error means the output is gone, like a cut cable.
            Err(_) => break,
        }
    }
}

/// Gathers the bytes of transmit chain `head` (its buffers `bufs`) into `buf`.
fn gather(
    mem: &GuestMemory,
    head: u16,
    bufs: &[Buffer],
    buf: &mut Vec<u8>,
) -> Result<(), ConsoleFault> {
    buf.clear();
    for b in bufs {
        if b.write_only {
            return Err(ConsoleFault::WriteOnlyOnTx(head));
        }
        let len = b.len as usize;
        let start = buf.len();
        if start + len > MAX_CHAIN_BYTES {
            buf.clear();
            return Err(ConsoleFault::ChainTooLarge(head));
        }
        buf.resize(start + len, 0);
        if mem.read_slice(&mut buf[start..], b.addr).is_err() {
            buf.clear();
            return Err(ConsoleFault::OutOfMemory {
                queue: "transmitq",
                head,
                addr: b.addr.0,
                len: b.len,
            });
        }
    }
    Ok(())
}

/// Copies `data` into the buffers `bufs` of receive chain `head`; returns the bytes
/// written. The chain is checked whole before anything is written.
fn scatter(
    mem: &GuestMemory,
    head: u16,
    bufs: &[Buffer],
    data: &[u8],
) -> Result<usize, ConsoleFault> {
    for b in bufs {
        if !b.write_only {
            return Err(ConsoleFault::ReadOnlyOnRx(head));
        }
        if b.len > 0 && !GuestMemoryBackend::check_range(mem, b.addr, b.len as usize) {
            return Err(ConsoleFault::OutOfMemory {
                queue: "receiveq",
                head,
                addr: b.addr.0,
                len: b.len,
            });
        }
    }
    let mut done = 0;
    for b in bufs {
        let n = (b.len as usize).min(data.len() - done);
        if n == 0 {
            break;
        }
        mem.write_slice(&data[done..done + n], b.addr)
            .map_err(|_| ConsoleFault::OutOfMemory {
                queue: "receiveq",
                head,
                addr: b.addr.0,
                len: b.len,
            })?;
        done += n;
    }
    Ok(done)
}

impl<W: FrontendOutput, I: InterruptSignal> VirtioDevice for Console<W, I> {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_CONSOLE_F_SIZE)
            | (1u64 << VIRTIO_CONSOLE_F_EMERG_WRITE)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The driver may use emerg_wr before negotiating anything (virtio 1.2, 5.3.4).
        if offset == EMERG_WR_OFFSET && (1..=4).contains(&data.len()) {
            write_chunk(&mut self.out, &data[..1]);
        }
    }

    fn config_generation(&self) -> u32 {
        self.generation
    }

    fn activate(&mut self, mem: GuestMemory, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if self.is_active() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        self.mem = Some(mem);
        self.queues = queues;
        self.broken = false;
        self.open = false;
        // Tell the driver the terminal size (Linux reads it on a config change).
        if self.acked(VIRTIO_CONSOLE_F_SIZE) && (self.cols, self.rows) != (0, 0) {
            self.interrupt.signal_config_change();
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.mem = None;
        self.queues.clear();
        self.acked_features = 0;
        self.broken = false;
        self.open = false;
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    fn queue_notify(&mut self, queue: u32) {
        if queue as usize == TX_QUEUE {
            self.notify_tx();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::mux::Frontend;
    use event_manager::MutEventSubscriber;
    use vm_memory::Bytes;

    use super::super::testutil::{Ring, WRITE, mem};
    use super::*;

    /// Records each write() call as one chunk; `.1` plays a backlogged consumer, `.2`
    /// output the hub has not taken yet (congested, not backlogged).
    #[derive(Default)]
    struct Chunks(Vec<Vec<u8>>, bool, bool);

    impl Write for Chunks {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl FrontendOutput for Chunks {
        fn congested(&self) -> bool {
            self.1 || self.2
        }
        fn backlogged(&self) -> bool {
            self.1
        }
    }

    #[derive(Default, Clone)]
    struct Irq {
        used: Arc<AtomicUsize>,
        config: Arc<AtomicUsize>,
    }

    impl InterruptSignal for Irq {
        fn signal_used_queue(&self) {
            self.used.fetch_add(1, Ordering::SeqCst);
        }
        fn signal_config_change(&self) {
            self.config.fetch_add(1, Ordering::SeqCst);
        }
    }

    const DATA: u64 = 0x8_0000;

    struct Setup {
        con: Console<Chunks, Irq>,
        irq: Irq,
        rx: Ring,
        tx: Ring,
        mem: GuestMemory,
    }

    fn setup() -> Setup {
        setup_with(0x1000, 0x2000, 16)
    }

    /// A console whose queues have `size` entries, at `rx_at` and `tx_at`.
    fn setup_with(rx_at: u64, tx_at: u64, size: u16) -> Setup {
        let mem = mem();
        let rx = Ring::new(&mem, rx_at, size);
        let tx = Ring::new(&mem, tx_at, size);
        let irq = Irq::default();
        let mut con = Console::new(Chunks::default(), irq.clone());
        con.ack_features(con.features());
        con.activate(mem.clone(), vec![rx.queue(), tx.queue()])
            .unwrap();
        Setup {
            con,
            irq,
            rx,
            tx,
            mem,
        }
    }

    fn put(mem: &GuestMemory, addr: u64, data: &[u8]) {
        mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// The guest writes to the port (a prompt), which opens it for input.
    fn open(s: &mut Setup) {
        put(&s.mem, DATA + 0xf000, b"$ ");
        let i = s.tx.avail_idx() % 16;
        s.tx.push(s.tx.chain(i, &[(DATA + 0xf000, 2, 0)]));
        s.con.process_tx();
        assert!(s.con.is_open());
    }

    #[test]
    fn tx_waits_while_the_sink_is_congested() {
        let mut s = setup();
        put(&s.mem, DATA, b"paced");
        s.tx.push(s.tx.chain(0, &[(DATA, 5, 0)]));
        s.con.sink_mut().1 = true;
        assert!(!s.con.process_tx());
        assert!(s.con.sink().0.is_empty());
        assert_eq!(s.tx.used_idx(), 0, "the chain stays with the device");
        s.con.sink_mut().1 = false;
        s.con.process_tx();
        assert_eq!(s.con.sink().0, vec![b"paced".to_vec()]);
        assert_eq!(s.tx.used_idx(), 1);
    }

    /// The QueueNotify exit uses the buffer before the guest resumes; while the hub has
    /// not taken earlier output, the chain is left for the event loop, which is kicked
    /// and (paced only by the consumers' backlog) moves it.
    #[test]
    fn notify_on_the_vcpu_uses_buffers_at_once_or_defers_to_the_event_loop() {
        let mut s = setup();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        s.con.set_tx_continue_event(kick.try_clone().unwrap());
        put(&s.mem, DATA, b"now");
        s.tx.push(s.tx.chain(0, &[(DATA, 3, 0)]));
        s.con.queue_notify(TX_QUEUE as u32);
        assert_eq!(s.con.sink().0, vec![b"now".to_vec()]);
        assert_eq!(s.tx.used_idx(), 1);
        assert!(kick.read().is_err(), "nothing left for the event loop");
        s.con.queue_notify(RX_QUEUE as u32); // not this device's business
        assert!(kick.read().is_err());
        // the hub has not taken earlier output: defer
        s.con.sink_mut().2 = true;
        put(&s.mem, DATA + 0x10, b"later");
        s.tx.push(s.tx.chain(1, &[(DATA + 0x10, 5, 0)]));
        s.con.queue_notify(TX_QUEUE as u32);
        assert_eq!(s.tx.used_idx(), 1, "left queued");
        assert_eq!(kick.read().unwrap(), 1, "event loop kicked");
        assert!(
            !s.con.process_tx(),
            "the event loop does not wait for the hub"
        );
        assert_eq!(s.con.sink().0[1], b"later".to_vec());
        assert_eq!(s.tx.used_idx(), 2);
    }

    #[test]
    fn tx_scatter_gather_is_one_chunk() {
        let mut s = setup();
        put(&s.mem, DATA, b"hel");
        put(&s.mem, DATA + 0x100, b"lo ");
        put(&s.mem, DATA + 0x200, b"world");
        let h = s.tx.chain(
            0,
            &[(DATA, 3, 0), (DATA + 0x100, 3, 0), (DATA + 0x200, 5, 0)],
        );
        s.tx.push(h);
        assert!(!s.con.process_tx());
        assert_eq!(s.con.sink().0, vec![b"hello world".to_vec()]);
        assert_eq!(s.tx.used_idx(), 1);
        assert_eq!(s.tx.used_elem(0), (0, 0));
        assert_eq!(s.irq.used.load(Ordering::SeqCst), 1);
        assert_eq!(s.con.faults(), 0);
    }

    #[test]
    fn tx_zero_length_and_many_chains_across_wraps() {
        let mut s = setup();
        let mut expected = Vec::new();
        for round in 0..5u64 {
            for i in 0..16u16 {
                let addr = DATA + 0x1000 * round + 0x40 * u64::from(i);
                let text = format!("r{round}c{i};");
                let len = if i == 7 { 0 } else { text.len() as u32 };
                put(&s.mem, addr, text.as_bytes());
                if len > 0 {
                    expected.push(text.into_bytes());
                }
                s.tx.push(s.tx.chain(i, &[(addr, len, 0)]));
            }
            s.con.process_tx();
        }
        assert_eq!(s.con.sink().0, expected);
        assert_eq!(s.tx.used_idx(), 80);
        assert_eq!(s.con.faults(), 0);
        // nothing left: another pass does nothing
        s.con.process_tx();
        assert_eq!(s.tx.used_idx(), 80);
    }

    #[test]
    fn tx_skips_bad_chains_and_keeps_going() {
        let mut s = setup();
        put(&s.mem, DATA, b"ok");
        // write-only buffer on TX
        s.tx.push(s.tx.chain(0, &[(DATA, 2, 0), (DATA, 2, WRITE)]));
        // outside guest memory
        s.tx.push(s.tx.chain(2, &[(0xfff_0000, 16, 0)]));
        // a loop: 4 -> 5 -> 4
        s.tx.set_desc(4, DATA, 2, 1, 5);
        s.tx.set_desc(5, DATA, 2, 1, 4);
        s.tx.push(4);
        // next index beyond the queue
        s.tx.set_desc(6, DATA, 2, 1, 100);
        s.tx.push(6);
        // too large
        s.tx.push(s.tx.chain(7, &[(DATA, (MAX_CHAIN_BYTES + 1) as u32, 0)]));
        // a good one after all that
        s.tx.push(s.tx.chain(8, &[(DATA, 2, 0)]));
        // a head index beyond the queue cannot be returned: the queue is unusable
        s.tx.push(200);
        s.tx.push(s.tx.chain(9, &[(DATA, 2, 0)]));
        s.con.process_tx();
        assert_eq!(s.con.sink().0, vec![b"ok".to_vec()]);
        // 6 bad chains + the failed add_used
        assert_eq!(s.con.faults(), 7);
        assert_eq!(s.tx.used_idx(), 6);
        assert!(s.con.needs_reset());
        let _ = s.rx;
    }

    #[test]
    fn tx_bad_chains_without_reset() {
        let mut s = setup();
        put(&s.mem, DATA, b"ok");
        s.tx.push(s.tx.chain(0, &[(DATA, 2, 0), (DATA, 2, WRITE)]));
        s.tx.set_desc(4, DATA, 2, 1, 5);
        s.tx.set_desc(5, DATA, 2, 1, 4);
        s.tx.push(4);
        s.tx.push(s.tx.chain(8, &[(DATA, 2, 0)]));
        s.con.process_tx();
        assert_eq!(s.con.sink().0, vec![b"ok".to_vec()]);
        assert_eq!(s.con.faults(), 2);
        assert!(!s.con.needs_reset());
        assert_eq!(s.tx.used_idx(), 3);
        assert_eq!(s.tx.used_elem(0), (0, 0));
        assert_eq!(s.tx.used_elem(1), (4, 0));
    }

    #[test]
    fn tx_broken_avail_index_needs_reset() {
        let mut s = setup();
        s.tx.set_avail_idx(100);
        s.con.process_tx();
        assert!(s.con.needs_reset());
        assert_eq!(s.irq.config.load(Ordering::SeqCst), 1);
        // stays quiet until reset
        s.con.process_tx();
        assert_eq!(s.con.faults(), 1);
        s.con.reset();
        assert!(!s.con.needs_reset());
        assert!(!s.con.is_active());
    }

    #[test]
    fn rx_waits_for_the_port_to_open() {
        let mut s = setup();
        let ready = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        s.con.set_input_ready_event(ready.clone());
        s.rx.push(s.rx.chain(0, &[(DATA, 4, WRITE)]));
        assert!(!s.con.is_open());
        assert_eq!(s.con.take_input(b"abc"), 0, "port not open yet");
        assert!(ready.read().is_err());
        open(&mut s);
        assert_eq!(ready.read().unwrap(), 1, "input side told to offer again");
        assert_eq!(s.con.take_input(b"abc"), 3);
        s.con.reset();
        assert!(!s.con.is_open());
    }

    #[test]
    fn rx_fills_posted_buffers_then_waits() {
        let mut s = setup();
        open(&mut s);
        assert_eq!(s.con.take_input(b"abc"), 0, "no buffers posted");
        s.rx.push(s.rx.chain(0, &[(DATA, 4, WRITE)]));
        s.rx.push(s.rx.chain(1, &[(DATA + 0x100, 2, WRITE), (DATA + 0x200, 2, WRITE)]));
        assert_eq!(s.con.take_input(b"abcdefghij"), 8);
        let mut b = [0u8; 4];
        s.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
        assert_eq!(&b, b"abcd");
        s.mem
            .read_slice(&mut b[..2], GuestAddress(DATA + 0x100))
            .unwrap();
        s.mem
            .read_slice(&mut b[2..], GuestAddress(DATA + 0x200))
            .unwrap();
        assert_eq!(&b, b"efgh");
        assert_eq!(s.rx.used_elem(0), (0, 4));
        assert_eq!(s.rx.used_elem(1), (1, 4));
        assert_eq!(
            s.irq.used.load(Ordering::SeqCst),
            2,
            "one for the tx, one for the rx"
        );
        assert_eq!(s.con.take_input(b"ij"), 0, "buffers used up");
        // a partial fill
        s.rx.push(s.rx.chain(2, &[(DATA, 64, WRITE)]));
        assert_eq!(s.con.take_input(b"ij"), 2);
        assert_eq!(s.rx.used_elem(2), (2, 2));
        assert_eq!(s.con.faults(), 0);
    }

    #[test]
    fn rx_rejects_bad_buffers() {
        let mut s = setup();
        open(&mut s);
        s.rx.push(s.rx.chain(0, &[(DATA, 4, 0)]));
        s.rx.push(s.rx.chain(1, &[(0xfff_0000, 4, WRITE)]));
        // an indirect descriptor (not offered)
        s.rx.set_desc(2, DATA, 16, 4 | WRITE, 0);
        s.rx.push(2);
        assert_eq!(s.con.take_input(b"abcd"), 0);
        assert_eq!(s.con.faults(), 3);
        assert_eq!(s.rx.used_idx(), 3);
        assert_eq!(s.rx.used_elem(0), (0, 0));
        assert!(!s.con.needs_reset());
    }

    #[test]
    fn inactive_device_takes_nothing() {
        let mut con = Console::new(Chunks::default(), Irq::default());
        assert_eq!(con.take_input(b"x"), 0);
        assert!(!con.process_tx());
        assert!(!con.is_active());
    }

    #[test]
    fn config_space_size_and_emergency_write() {
        let irq = Irq::default();
        let mut con = Console::new(Chunks::default(), irq.clone());
        assert_eq!(con.features() >> 32, 1, "VERSION_1");
        con.set_size(80, 25);
        assert_eq!(con.config_generation(), 1);
        let mut c = [0u8; 12];
        con.read_config(0, &mut c);
        assert_eq!(&c[..4], &[80, 0, 25, 0]);
        let mut r = [0u8; 2];
        con.read_config(2, &mut r);
        assert_eq!(u16::from_le_bytes(r), 25);
        con.read_config(11, &mut r);
        assert_eq!(r, [0, 0], "beyond the end reads 0");
        con.read_config(u64::MAX, &mut r);
        assert_eq!(
            irq.config.load(Ordering::SeqCst),
            0,
            "inactive: no interrupt"
        );
        con.write_config(8, &[b'!', 0, 0, 0]);
        con.write_config(0, &[1, 2]); // read-only fields
        assert_eq!(con.sink().0, vec![b"!".to_vec()]);
        // activation with F_SIZE tells the driver the size
        let mem = mem();
        con.ack_features(con.features());
        let (rx, tx) = (Ring::new(&mem, 0x1000, 16), Ring::new(&mem, 0x2000, 16));
        con.activate(mem.clone(), vec![rx.queue(), tx.queue()])
            .unwrap();
        assert_eq!(irq.config.load(Ordering::SeqCst), 1);
        con.set_size(100, 40);
        assert_eq!(irq.config.load(Ordering::SeqCst), 2);
        con.set_size(100, 40);
        assert_eq!(
            irq.config.load(Ordering::SeqCst),
            2,
            "unchanged: no interrupt"
        );
        assert_eq!(con.config_generation(), 2);
        assert_eq!(con.activate(mem, vec![]), Err(ActivateError::AlreadyActive));
    }

    /// A console whose queues have 256 entries (rx at 0x1_0000, tx at 0x2_0000).
    fn setup_256() -> Setup {
        setup_with(0x1_0000, 0x2_0000, 256)
    }

    /// Issue 11's case: a 1000-descriptor indirect chain on a 16-entry queue. Indirect
    /// descriptors are not offered, so the chain is refused unread; what follows goes out.
    #[test]
    fn tx_refuses_indirect_chains() {
        use virtio_queue::mock::MockSplitQueue;
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x3000_0000), 0x10_0000),
        ])
        .unwrap();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
        let mut tx = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        tx.add_indirect_chain(1000).unwrap();
        // then a plain chain, at descriptor 1 (the mock would reuse descriptor 0)
        let driver = Ring {
            mem: mem.clone(),
            size: 16,
            desc: tx.desc_table_addr().0,
            avail: tx.avail_addr().0,
            used: tx.used_addr().0,
        };
        put(&mem, 0x1000, &[b'z'; 0x1000]);
        driver.push(driver.chain(1, &[(0x1000, 0x1000, 0)]));
        let mut con = Console::new(Chunks::default(), Irq::default());
        con.ack_features(con.features());
        assert_eq!(con.features() & (1 << 28), 0, "INDIRECT_DESC not offered");
        con.activate(
            mem.clone(),
            vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()],
        )
        .unwrap();
        assert!(!con.process_tx());
        assert_eq!(con.faults(), 1);
        assert_eq!(con.sink().0, vec![vec![b'z'; 0x1000]]);
        assert_eq!(driver.used_idx(), 2, "both chains returned");
        assert!(!con.needs_reset());
    }

    /// A hostile guest publishes the same 256-descriptor chain in every slot of a
    /// 256-entry ring: one call reads at most TX_BATCH_DESCRIPTORS descriptors and says
    /// there is more; the rest goes out on later calls.
    #[test]
    fn tx_work_per_call_is_bounded_by_descriptors() {
        let mut s = setup_256();
        put(&s.mem, DATA, b"x");
        let head = s.tx.chain(0, &vec![(DATA, 1, 0); 256]);
        for _ in 0..256 {
            s.tx.push(head);
        }
        let per_call = TX_BATCH_DESCRIPTORS / 256;
        assert!(s.con.process_tx(), "more to do");
        assert_eq!(usize::from(s.tx.used_idx()), per_call);
        let mut calls = 1;
        while s.con.process_tx() {
            calls += 1;
        }
        assert_eq!(s.tx.used_idx(), 256);
        assert_eq!(calls, 256 / per_call);
        assert_eq!(s.con.sink().0.len(), 256);
        assert!(s.con.sink().0.iter().all(|c| c == &vec![b'x'; 256]));
        assert_eq!(s.con.faults(), 0);
    }

    #[test]
    fn tx_work_per_call_is_bounded_by_bytes_and_chains() {
        let mut s = setup_256();
        // one chain of MAX_CHAIN_BYTES (four 256 KiB buffers covering guest memory)
        let quarter = (MAX_CHAIN_BYTES / 4) as u32;
        let big = s.tx.chain(0, &[(0, quarter, 0); 4]);
        s.tx.push(big);
        s.tx.push(s.tx.chain(4, &[(DATA, 1, 0)]));
        assert!(
            s.con.process_tx(),
            "the byte budget is spent after the big chain"
        );
        assert_eq!(s.tx.used_idx(), 1);
        assert!(!s.con.process_tx());
        assert_eq!(s.tx.used_idx(), 2);
        // a full ring of one-descriptor chains is one call's worth at most
        for _ in 0..TX_BATCH_CHAINS {
            s.tx.push(s.tx.chain(5, &[(DATA, 1, 0)]));
        }
        assert!(s.con.process_tx(), "the chain budget is spent");
        assert_eq!(usize::from(s.tx.used_idx()), 2 + TX_BATCH_CHAINS);
        assert!(!s.con.process_tx());
        assert_eq!(s.con.faults(), 0);
    }

    #[test]
    fn rx_work_per_call_is_bounded_by_descriptors() {
        let mut s = setup_256();
        put(&s.mem, DATA + 0xf000, b"$ ");
        s.tx.push(s.tx.chain(0, &[(DATA + 0xf000, 2, 0)]));
        s.con.process_tx();
        let head = s.rx.chain(0, &vec![(DATA, 1, WRITE); 256]);
        for _ in 0..8 {
            s.rx.push(head);
        }
        let data = vec![b'i'; 8 * 256];
        let per_call = RX_BATCH_DESCRIPTORS / 256;
        assert_eq!(s.con.take_input(&data), per_call * 256);
        assert_eq!(usize::from(s.rx.used_idx()), per_call);
        assert_eq!(s.con.take_input(&data), (8 - per_call) * 256);
        assert_eq!(s.con.take_input(&data), 0);
        assert_eq!(s.con.faults(), 0);
    }

    #[test]
    fn activate_needs_both_queues() {
        let mut con = Console::new(Chunks::default(), Irq::default());
        assert_eq!(
            con.activate(mem(), vec![]),
            Err(ActivateError::QueueCount {
                expected: 2,
                got: 0
            })
        );
    }

    #[test]
    fn input_adapter_and_tx_handler() {
        use event_manager::{EventManager, SubscriberOps};
        let mut s = setup();
        open(&mut s);
        let rx_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let tx_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (rx, tx, mem) = (s.rx, s.tx, s.mem);
        let dev = Arc::new(Mutex::new(s.con));
        let mut input =
            ConsoleFrontend::new(dev.clone(), rx_evt.clone(), tx_evt.try_clone().unwrap());
        assert_eq!(input.take_input(b"hi"), 0);
        rx.push(rx.chain(0, &[(DATA, 8, WRITE)]));
        rx_evt.write(1).unwrap();
        assert_eq!(input.drained_fd(), rx_evt.as_raw_fd());
        input.ack_drained();
        assert!(rx_evt.read().is_err(), "acked");
        assert_eq!(input.take_input(b"hi"), 2);

        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(
            ConsoleTxHandler::new(dev.clone(), tx_evt.try_clone().unwrap()).unwrap(),
        )));
        put(&mem, DATA + 0x100, b"out");
        tx.push(tx.chain(1, &[(DATA + 0x100, 3, 0)]));
        tx_evt.write(1).unwrap();
        em.run_with_timeout(100).unwrap();
        assert_eq!(dev.lock().unwrap().sink().0[1], b"out".to_vec());
        // The hub's "caught up" reaches the transmit handler's eventfd.
        let _ = tx_evt.read();
        input.resume_output();
        assert_eq!(tx_evt.read().unwrap(), 1);
    }
}
