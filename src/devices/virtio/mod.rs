//! Virtio devices over the virtio-mmio transport.
//!
//! Three parts, as in rust-vmm's vmm-reference: [`VirtioDevice`] (what a device offers:
//! type, queues, features, config space, activation), [`mmio::MmioTransport`] (the
//! virtio-mmio register block on the MMIO bus, driving the device's life cycle), and the
//! device itself ([`console`]) whose queue logic is generic over its output sink and over
//! [`InterruptSignal`], so it is unit-tested with virtio-queue's mock queues and no KVM.
//!
//! Byte paths: the guest fills the transmit queue and writes the queue index to QueueNotify;
//! the write exits to the vCPU thread, the transport hands it to the device
//! ([`VirtioDevice::queue_notify`]) and the console moves the chains to its sink right
//! there, before the guest resumes (see `console::Console::notify_tx`). The receive
//! queue's notifications go to an ioeventfd instead (KVM matches the write, no exit reaches
//! device code): they only tell the event loop that the guest posted buffers. Interrupts
//! go out through an irqfd, with the reason in [`VirtioInterrupt`]'s status bits.

pub mod chain;
pub mod console;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod mmio;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemory;

/// Device type of a virtio console.
pub const TYPE_CONSOLE: u32 = 3;

/// Feature bit: the device follows virtio 1.0 or later (required by the mmio v2 transport).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: queues may be used.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Errors activating a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    /// The driver gave a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues given.
        got: usize,
    },
    /// The device is already active.
    #[error("device already active")]
    AlreadyActive,
}

/// How a device raises its interrupt; implemented by [`VirtioInterrupt`] and by test doubles.
pub trait InterruptSignal: Send {
    /// A used ring was updated.
    fn signal_used_queue(&self);
    /// The configuration space changed (or the device needs a reset).
    fn signal_config_change(&self);
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device type (3 = console).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers.
    fn features(&self) -> u64;
    /// Records the features the driver accepted (a subset of [`VirtioDevice::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads the device-specific configuration space at `offset`; out-of-range bytes read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space at `offset`; unsupported writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Changes whenever the configuration space changes (virtio ConfigGeneration).
    fn config_generation(&self) -> u32;
    /// Starts the device with the driver's queues (after DRIVER_OK).
    fn activate(&mut self, mem: GuestMemory, queues: Vec<Queue>) -> Result<(), ActivateError>;
    /// Stops the device and forgets its queues and negotiated features.
    fn reset(&mut self);
    /// True when the device hit an unrecoverable guest error and needs a reset.
    fn needs_reset(&self) -> bool;
    /// The driver wrote `queue` to QueueNotify and no ioeventfd took the write: called on
    /// the vCPU thread, in the exit. Queues served through an ioeventfd never get here.
    fn queue_notify(&mut self, _queue: u32) {}
}

/// The interrupt shared by a transport and its device: the InterruptStatus bits and the
/// irqfd that raises the line.
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl VirtioInterrupt {
    /// An interrupt raised by writing `irq` (an irqfd registered with KVM, or any eventfd).
    pub fn new(irq: EventFd) -> Arc<Self> {
        Arc::new(VirtioInterrupt {
            status: AtomicU32::new(0),
            irq,
        })
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // The only failure is a full eventfd counter, which means the line is being raised
        // anyway.
        let _ = self.irq.write(1);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears every bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd behind the line.
    pub fn eventfd(&self) -> &EventFd {
        &self.irq
    }
}

impl InterruptSignal for Arc<VirtioInterrupt> {
    fn signal_used_queue(&self) {
        self.raise(INT_VRING);
    }
    fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }
}

/// When set, [`FaultLog`] counts but prints nothing (the fuzz harness, which creates a
/// device per input and would otherwise flood stderr).
static FAULTS_QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Silences (or re-enables) guest-fault messages process-wide.
pub fn set_faults_quiet(quiet: bool) {
    FAULTS_QUIET.store(quiet, Ordering::Relaxed);
}

/// Rate-limited error reporting for guest-driven faults: the first message always, then at
/// most one per interval, with a count of the ones left out.
#[derive(Debug)]
pub struct FaultLog {
    prefix: &'static str,
    last: Option<std::time::Instant>,
    suppressed: u64,
    total: u64,
}

impl FaultLog {
    /// Minimum time between two messages.
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

    /// A log whose lines start with `prefix` (e.g. `virtio-console:`, after the logger's
    /// `microvm: `).
    pub const fn new(prefix: &'static str) -> Self {
        FaultLog {
            prefix,
            last: None,
            suppressed: 0,
            total: 0,
        }
    }

    /// Reports one fault (to the log, if the rate limit allows).
    pub fn report(&mut self, msg: std::fmt::Arguments<'_>) {
        self.total += 1;
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        // Through the logger: never blocking (this may run on a vCPU thread), never
        // panicking on a closed stderr.
        if FAULTS_QUIET.load(Ordering::Relaxed) {
        } else if self.suppressed > 0 {
            log::warn!(
                "{} {msg} ({} similar errors not shown)",
                self.prefix,
                self.suppressed
            );
        } else {
            log::warn!("{} {msg}", self.prefix);
        }
        self.suppressed = 0;
        self.last = Some(now);
    }

    /// Faults reported so far (shown or not).
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// Test helpers: a split virtqueue laid out in guest memory, driven like a driver would.
#[cfg(test)]
pub(crate) mod testutil {
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    use crate::vstate::memory::GuestMemory;

    /// Descriptor flag: the chain continues at `next`.
    pub const NEXT: u16 = 1;
    /// Descriptor flag: device-writable buffer.
    pub const WRITE: u16 = 2;

    /// 1 MiB of guest memory.
    pub fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// A driver-side view of one split queue.
    pub struct Ring {
        pub mem: GuestMemory,
        pub size: u16,
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
    }

    impl Ring {
        /// A ring of `size` entries at `base` (desc table, then avail, then used, aligned).
        pub fn new(mem: &GuestMemory, base: u64, size: u16) -> Ring {
            let desc = base;
            let avail = desc + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
            Ring {
                mem: mem.clone(),
                size,
                desc,
                avail,
                used,
            }
        }

        /// A queue configured for this ring (as the transport would build it).
        pub fn queue(&self) -> virtio_queue::Queue {
            use virtio_queue::QueueT;
            let mut q = virtio_queue::Queue::new(self.size).unwrap();
            q.set_size(self.size);
            q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
            q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
            q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
            q.set_ready(true);
            q
        }

        /// Writes descriptor `i`.
        pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let a = GuestAddress(self.desc + 16 * u64::from(i));
            self.mem.write_obj(addr.to_le(), a).unwrap();
            self.mem.write_obj(len.to_le(), a.unchecked_add(8)).unwrap();
            self.mem
                .write_obj(flags.to_le(), a.unchecked_add(12))
                .unwrap();
            self.mem
                .write_obj(next.to_le(), a.unchecked_add(14))
                .unwrap();
        }

        /// Writes a chain of buffers at descriptors `first..`; each (addr, len, flags) gets
        /// NEXT added except the last. Returns the head.
        pub fn chain(&self, first: u16, bufs: &[(u64, u32, u16)]) -> u16 {
            for (k, &(addr, len, flags)) in bufs.iter().enumerate() {
                let i = first + k as u16;
                let last = k + 1 == bufs.len();
                let f = if last { flags } else { flags | NEXT };
                self.set_desc(i, addr, len, f, if last { 0 } else { i + 1 });
            }
            first
        }

        /// Publishes `head` in the available ring.
        pub fn push(&self, head: u16) {
            let idx = self.avail_idx();
            let slot = GuestAddress(self.avail + 4 + 2 * u64::from(idx % self.size));
            self.mem.write_obj(head.to_le(), slot).unwrap();
            self.set_avail_idx(idx.wrapping_add(1));
        }

        pub fn avail_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
        }

        pub fn set_avail_idx(&self, idx: u16) {
            self.mem
                .write_obj(idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        pub fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        /// Used element `i` (id, len).
        pub fn used_elem(&self, i: u16) -> (u32, u32) {
            let a = GuestAddress(self.used + 4 + 8 * u64::from(i % self.size));
            (
                self.mem.read_obj(a).unwrap(),
                self.mem.read_obj(a.unchecked_add(4)).unwrap(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_status_and_ack() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let i = VirtioInterrupt::new(irq.try_clone().unwrap());
        i.signal_used_queue();
        i.signal_config_change();
        assert_eq!(i.status(), INT_VRING | INT_CONFIG);
        assert_eq!(irq.read().unwrap(), 2);
        i.ack(INT_VRING);
        assert_eq!(i.status(), INT_CONFIG);
        i.clear();
        assert_eq!(i.status(), 0);
    }

    #[test]
    fn fault_log_is_rate_limited() {
        let mut l = FaultLog::new("test:");
        for _ in 0..5 {
            l.report(format_args!("fault"));
        }
        assert_eq!(l.total(), 5);
        assert_eq!(l.suppressed, 4);
    }
}
