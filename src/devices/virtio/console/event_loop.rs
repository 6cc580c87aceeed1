//! How the event loop and the console hub reach the virtio console: [`ConsoleTxHandler`]
//! moves transmit output when the device defers it to the loop (leftovers after a full
//! batch, a congested sink), and [`ConsoleFrontend`] is the hub's input target for hvc0
//! (offers bytes to the posted receive buffers; the receive queue's notification says
//! there is room again). Both hold the device behind one mutex shared with the vCPU
//! thread, which serves QueueNotify exits itself.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::Console;
use crate::devices::FrontendOutput;
use crate::devices::virtio::InterruptSignal;
use crate::mux::Frontend;

/// Locks a shared console, surviving a poisoned lock (a panicked holder).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Event-loop glue for the transmit queue: moves output when `tx_evt` fires (kicked by
/// [`Console::notify_tx`] for leftovers, and by the hub's decongestion hook), and looks
/// again on a timer while paused.
pub struct ConsoleTxHandler<W: FrontendOutput, I: InterruptSignal> {
    device: Arc<Mutex<Console<W, I>>>,
    tx_evt: EventFd,
    recheck: TimerFd,
}

/// How soon a paused transmit queue is looked at again even without a decongestion call.
const PAUSE_RECHECK: Duration = Duration::from_millis(20);

impl<W: FrontendOutput, I: InterruptSignal> ConsoleTxHandler<W, I> {
    /// A handler for `device`'s transmit queue, notified through `tx_evt`.
    pub fn new(device: Arc<Mutex<Console<W, I>>>, tx_evt: EventFd) -> std::io::Result<Self> {
        let recheck = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(ConsoleTxHandler {
            device,
            tx_evt,
            recheck,
        })
    }
}

impl<W: FrontendOutput, I: InterruptSignal> MutEventSubscriber for ConsoleTxHandler<W, I> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.tx_evt.as_raw_fd() {
            let _ = self.tx_evt.read();
        } else if events.fd() == self.recheck.as_raw_fd() {
            let _ = self.recheck.wait();
        } else {
            return;
        }
        let mut dev = lock(&self.device);
        if dev.process_tx() {
            // Chains left after a full batch: come back after the other event sources.
            let _ = self.tx_evt.write(1);
        } else if dev.is_paused() {
            // The hub's decongestion hook resumes us; this timer is the safety net, so a
            // missed wake-up costs the guest milliseconds, never a hang.
            let _ = self.recheck.reset(PAUSE_RECHECK, None);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.tx_evt, EventSet::IN));
        let _ = ops.add(Events::new(&self.recheck, EventSet::IN));
    }
}

/// The virtio console as a console hub frontend: `take_input` offers bytes;
/// `drained_fd` (the receive queue's ioeventfd) becomes readable when the guest posts
/// receive buffers, i.e. when there is room for more; `resume_output` kicks the transmit
/// handler (through `resume`, its eventfd) once the hub's consumers have caught up.
pub struct ConsoleFrontend<W: FrontendOutput, I: InterruptSignal> {
    device: Arc<Mutex<Console<W, I>>>,
    rx_evt: Arc<EventFd>,
    resume: EventFd,
}

impl<W: FrontendOutput, I: InterruptSignal> ConsoleFrontend<W, I> {
    /// The frontend of `device`, whose receive queue notifies `rx_evt` and whose transmit
    /// handler `resume` wakes.
    pub fn new(device: Arc<Mutex<Console<W, I>>>, rx_evt: Arc<EventFd>, resume: EventFd) -> Self {
        ConsoleFrontend {
            device,
            rx_evt,
            resume,
        }
    }
}

impl<W: FrontendOutput, I: InterruptSignal> Frontend for ConsoleFrontend<W, I> {
    /// Offers bytes; returns how many the guest's posted buffers took.
    fn take_input(&mut self, data: &[u8]) -> usize {
        lock(&self.device).take_input(data)
    }

    /// Readable when the guest posted receive buffers (or the port opened).
    fn drained_fd(&self) -> RawFd {
        self.rx_evt.as_raw_fd()
    }

    fn ack_drained(&mut self) {
        let _ = self.rx_evt.read();
    }

    /// The guest has opened its port (written to it since activation).
    fn is_open(&self) -> bool {
        lock(&self.device).is_open()
    }

    fn resume_output(&mut self) {
        let _ = self.resume.write(1);
    }
}
