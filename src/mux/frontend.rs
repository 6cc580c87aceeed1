//! The frontend side of the hub (QEMU's "mux" role): the contract a console device
//! (the UART, the virtio console) has with the hub, and which of them gets the input.
//!
//! * Output: a frontend writes into a [`FrontendOutput`] (the hub gives it a
//!   [`HubWriter`]); it asks the sink whether the consumers are behind, and the hub
//!   calls [`Frontend::resume_output`] when they have caught up.
//! * Input: the hub offers bytes with [`Frontend::take_input`]; the device takes what
//!   fits and signals its "drained" fd when the guest has made room again.
//! * Target: input goes to the last-attached frontend the guest has open (the virtio
//!   console once the guest opened its port, the UART before), until the user picks one
//!   with `Ctrl-A c`; from then on it stays where the user put it.

use std::io::Write;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::input::InputQueue;
use super::stats::FrontendStats;
use super::writer::HubWriter;

/// Most frontends one hub takes.
pub const MAX_FRONTENDS: usize = 64;

/// Where a console frontend's output goes (the UART's THR, the virtio console's
/// transmitq): a writer that never blocks, and that tells when its consumer is behind.
pub trait FrontendOutput: Write + Send {
    /// True while the consumer is behind: the UART then reports its transmitter busy and
    /// the virtio console leaves transmit buffers queued, pacing the guest.
    fn congested(&self) -> bool {
        false
    }

    /// Like [`FrontendOutput::congested`], but counting only the consumers' backlog, not
    /// output the hub has yet to pick up. For a frontend served on the hub's own thread
    /// (the virtio console), whose queued output the hub always takes right after it.
    fn backlogged(&self) -> bool {
        self.congested()
    }
}

impl FrontendOutput for HubWriter {
    fn congested(&self) -> bool {
        HubWriter::congested(self)
    }

    fn backlogged(&self) -> bool {
        HubWriter::backlogged(self)
    }
}

impl FrontendOutput for Vec<u8> {}

/// Implemented by each frontend device; called on the event-loop thread.
pub trait Frontend: Send {
    /// Offer bytes; returns how many the device took (0 when its FIFO/queue is full).
    fn take_input(&mut self, data: &[u8]) -> usize;
    /// An fd that becomes readable when the device drained its input (e.g. an EventFd the
    /// UART signals from vm-superio's `in_buffer_empty`); the hub then offers more.
    fn drained_fd(&self) -> RawFd;
    /// Read/clear the drained fd.
    fn ack_drained(&mut self) {}
    /// Whether the guest is using this console for input now (see the module doc).
    fn is_open(&self) -> bool {
        true
    }
    /// The consumers have caught up after the sink reported them behind: resume output
    /// (the UART raises THRE, the virtio console looks at its transmit queue again).
    fn resume_output(&mut self) {}
}

struct Attached {
    name: String,
    input: Box<dyn Frontend>,
    /// Its drained fd is watched by the event loop.
    registered: bool,
    /// Input bytes the device took.
    taken: u64,
    /// Output bytes it wrote (its writer's counter).
    sent: Arc<AtomicU64>,
}

/// The frontends of one hub and the input target.
#[derive(Default)]
pub(crate) struct Frontends {
    list: Vec<Attached>,
    target: usize,
    /// The user chose the target with Ctrl-A c: stop following the guest.
    pinned: bool,
}

impl Frontends {
    /// Adds a frontend; `None` when the hub has [`MAX_FRONTENDS`] already.
    pub(crate) fn attach(
        &mut self,
        name: &str,
        input: Box<dyn Frontend>,
        sent: Arc<AtomicU64>,
    ) -> Option<usize> {
        if self.list.len() >= MAX_FRONTENDS {
            return None;
        }
        self.list.push(Attached {
            name: name.to_string(),
            input,
            registered: false,
            taken: 0,
            sent,
        });
        Some(self.list.len() - 1)
    }

    /// Frontends whose drained fd is not watched yet (index, fd); marks them watched.
    pub(crate) fn take_unwatched(&mut self) -> Vec<(usize, RawFd)> {
        self.list
            .iter_mut()
            .enumerate()
            .filter(|(_, f)| !f.registered)
            .map(|(i, f)| {
                f.registered = true;
                (i, f.input.drained_fd())
            })
            .collect()
    }

    /// Frontend `i` signalled that the guest drained its input.
    pub(crate) fn ack_drained(&mut self, i: usize) {
        if let Some(f) = self.list.get_mut(i) {
            f.input.ack_drained();
        }
    }

    /// The consumers caught up: every frontend may resume output.
    pub(crate) fn resume_output(&mut self) {
        for f in &mut self.list {
            f.input.resume_output();
        }
    }

    /// Offers held input to the target frontend until it or the buffer is empty.
    pub(crate) fn take_input(&mut self, input: &mut InputQueue) {
        if !self.pinned
            && let Some(open) = self.list.iter().rposition(|f| f.input.is_open())
        {
            self.target = open;
        }
        let Some(fe) = self.list.get_mut(self.target) else {
            return;
        };
        while !input.is_empty() {
            let data = input.front();
            let n = fe.input.take_input(data).min(data.len());
            if n == 0 {
                return;
            }
            fe.taken += n as u64;
            input.consume(n);
        }
    }

    /// Ctrl-A c: input goes to the next frontend from now on. Returns the notice for the
    /// user.
    pub(crate) fn switch(&mut self) -> String {
        if !self.list.is_empty() {
            self.target = (self.target + 1) % self.list.len();
            self.pinned = true;
        }
        match self.list.get(self.target) {
            Some(f) => format!("\r\n[microvm: input goes to {}]\r\n", f.name),
            None => "\r\n[microvm: no console device to send input to]\r\n".into(),
        }
    }

    /// Name of the frontend receiving input.
    pub(crate) fn target_name(&self) -> Option<&str> {
        self.list.get(self.target).map(|f| f.name.as_str())
    }

    /// Input bytes all frontends took.
    pub(crate) fn taken(&self) -> u64 {
        self.list.iter().map(|f| f.taken).sum()
    }

    /// Per-frontend traffic (frontends of the same name counted together).
    pub(crate) fn stats(&self) -> Vec<FrontendStats> {
        let mut out: Vec<FrontendStats> = Vec::new();
        for f in &self.list {
            let sent = f.sent.load(Ordering::Relaxed);
            match out.iter_mut().find(|s| s.name == f.name) {
                Some(s) => {
                    s.bytes_out += sent;
                    s.bytes_in += f.taken;
                }
                None => out.push(FrontendStats {
                    name: f.name.clone(),
                    bytes_out: sent,
                    bytes_in: f.taken,
                }),
            }
        }
        out
    }
}
