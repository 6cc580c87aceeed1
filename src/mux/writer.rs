//! The cross-thread half of the hub: [`HubWriter`], what a frontend writes its output
//! into from a vCPU thread (or the event loop), and the congestion state it reads back.
//!
//! Invariants:
//! * A `write` never blocks on I/O and never fails: it appends the whole buffer to one
//!   byte queue under a mutex (so each `write` is one contiguous chunk of the stream,
//!   never interleaved with another) and kicks an eventfd when the queue was empty.
//! * The queue is bounded by [`WriterConfig::hard_cap`] bytes: beyond it a write is
//!   dropped whole and counted, and the hub puts a notice in the stream. Pacing keeps a
//!   well-behaved guest far below it (see [`HubWriter::congested`]).
//! * The queue costs exactly its bytes: chunks are appended to one `Vec`, no per-write
//!   allocation or bookkeeping.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The writer queue's limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriterConfig {
    /// Congested while queued + the paced sinks' backlog exceed this.
    pub high_water: usize,
    /// Most bytes the queue holds.
    pub hard_cap: usize,
}

/// State shared between the writers (vCPU threads) and the hub.
pub(crate) struct Shared {
    queue: Mutex<Vec<u8>>,
    /// Bytes in `queue`.
    queued: AtomicUsize,
    /// Largest backlog of a sink that paces the guest (kept by the hub).
    backlog: AtomicUsize,
    /// Bytes refused because the queue hit the hard cap.
    dropped: AtomicU64,
    /// Someone saw `congested() == true` since the last decongestion callback.
    reported: AtomicBool,
    cfg: WriterConfig,
    /// Kicked when the queue goes from empty to non-empty.
    pub wake: EventFd,
}

impl Shared {
    pub(crate) fn new(cfg: WriterConfig) -> io::Result<Arc<Shared>> {
        Ok(Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            queued: AtomicUsize::new(0),
            backlog: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            reported: AtomicBool::new(false),
            cfg,
            wake: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    fn congested(&self) -> bool {
        self.queued.load(Ordering::Acquire) + self.backlog.load(Ordering::Acquire)
            > self.cfg.high_water
    }

    /// Takes everything queued, swapping in `spare` (an empty buffer to reuse), and the
    /// count of bytes dropped since the last take.
    pub(crate) fn take(&self, spare: Vec<u8>) -> (Vec<u8>, u64) {
        let mut spare = spare;
        spare.clear();
        {
            // A poisoned lock only means another writer panicked mid-append; the bytes
            // are still a valid Vec, so keep going.
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *q, &mut spare);
            self.queued.store(0, Ordering::Release);
        }
        (spare, self.dropped.swap(0, Ordering::AcqRel))
    }

    /// Records the largest paced backlog; true when output was congested (someone was
    /// told so) and no longer is: the frontends may resume output.
    pub(crate) fn set_backlog(&self, backlog: usize) -> bool {
        self.backlog.store(backlog, Ordering::Release);
        !self.congested() && self.reported.swap(false, Ordering::AcqRel)
    }

    /// Bytes waiting in the queue.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Asks the event loop to run the hub (e.g. a frontend was attached).
    pub(crate) fn kick(&self) {
        // An eventfd write only fails on counter overflow, which a wake-up cannot reach.
        let _ = self.wake.write(1);
    }
}

/// A frontend's output sink (give it to the UART as its `Write`). Called on the vCPU
/// thread; never blocks on I/O: each `write` appends the whole buffer as one chunk to the
/// hub's queue and wakes the event loop.
#[derive(Clone)]
pub struct HubWriter {
    shared: Arc<Shared>,
    /// Bytes this writer (and its clones) put into the stream.
    sent: Arc<AtomicU64>,
}

impl HubWriter {
    pub(crate) fn new(shared: Arc<Shared>, sent: Arc<AtomicU64>) -> HubWriter {
        HubWriter { shared, sent }
    }

    /// True while the hub's output is above its high-water mark (a sink that paces the
    /// guest, such as the terminal, is behind). A UART holds THRE low meanwhile to pace
    /// the guest like a real slow line; the hub tells the frontend when it clears
    /// ([`crate::mux::Frontend::resume_output`]).
    pub fn congested(&self) -> bool {
        let c = self.shared.congested();
        if c {
            self.shared.reported.store(true, Ordering::Release);
        }
        c
    }

    /// True while a paced sink is more than the high-water mark behind (output not yet
    /// picked up by the hub does not count). Reports like [`HubWriter::congested`].
    pub fn backlogged(&self) -> bool {
        let c = self.shared.backlog.load(Ordering::Acquire) > self.shared.cfg.high_water;
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
            let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.len().saturating_add(buf.len()) > self.shared.cfg.hard_cap {
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
            // drain needs to kick it.
            self.shared.kick();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
