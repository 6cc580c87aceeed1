//! The virtio-mmio transport, version 2 (modern) only, as a [`BusDevice`].
//!
//! Registers (virtio 1.2, 4.2.2) are 32-bit and 4-byte aligned; other accesses below the
//! config space are ignored (reads return 0). The config space at 0x100 takes any size.
//! QueueNotify writes reach this transport only for queues the builder gave no ioeventfd
//! (the console's transmit queue): after DRIVER_OK they go to the device's
//! `queue_notify`, on the vCPU thread; the others KVM routes to the event loop.
//!
//! Status rules: bits only accumulate, in order ACKNOWLEDGE -> DRIVER -> FEATURES_OK ->
//! DRIVER_OK (FAILED at any time); a write that clears bits or skips a step is ignored;
//! FEATURES_OK is refused unless VIRTIO_F_VERSION_1 was negotiated; DRIVER_OK activates the
//! device only if every ready queue is valid (size a power of two no larger than the
//! maximum, rings inside guest memory), otherwise DEVICE_NEEDS_RESET is set. Writing 0
//! resets the device.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};

use super::{FaultLog, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, status};
use crate::vstate::bus::BusDevice;
use crate::vstate::memory::GuestMemory;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern transport.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("MVM ").
pub const VENDOR_ID: u32 = 0x204d_564d;
/// Offset of the QueueNotify register (where the builder puts the ioeventfds).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

mod reg {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_ID: u64 = 0x08;
    pub const VENDOR_ID: u64 = 0x0c;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const QUEUE_NOTIFY: u64 = 0x50;
    pub const INTERRUPT_STATUS: u64 = 0x60;
    pub const INTERRUPT_ACK: u64 = 0x64;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    pub const QUEUE_AVAIL_LOW: u64 = 0x90;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x94;
    pub const QUEUE_USED_LOW: u64 = 0xa0;
    pub const QUEUE_USED_HIGH: u64 = 0xa4;
    pub const CONFIG_GENERATION: u64 = 0xfc;
}

/// Per-queue state kept by the transport while the driver configures it.
struct QueueSlot {
    queue: Queue,
    /// The driver wrote a size the queue refused (not a power of two, too large, zero).
    bad_size: bool,
}

/// A virtio-mmio register block in front of device `D`.
pub struct MmioTransport<D: VirtioDevice> {
    device: Arc<Mutex<D>>,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<QueueSlot>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    log: FaultLog,
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmioError {
    /// The device declared a queue size virtio-queue refuses.
    #[error("device queue {index} has invalid maximum size {size}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// Declared size.
        size: u16,
    },
}

fn new_queues(sizes: &[u16]) -> Result<Vec<QueueSlot>, MmioError> {
    sizes
        .iter()
        .enumerate()
        .map(|(index, &size)| {
            Queue::new(size)
                .map(|queue| QueueSlot {
                    queue,
                    bad_size: false,
                })
                .map_err(|_| MmioError::QueueSize { index, size })
        })
        .collect()
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device`, with access to guest memory `mem` and raising `interrupt`.
    pub fn new(
        device: Arc<Mutex<D>>,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Self, MmioError> {
        let sizes = lock(&device).queue_max_sizes().to_vec();
        Ok(MmioTransport {
            queues: new_queues(&sizes)?,
            device,
            mem,
            interrupt,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            log: FaultLog::new("virtio-mmio:"),
        })
    }

    /// The device behind the transport.
    pub fn device(&self) -> &Arc<Mutex<D>> {
        &self.device
    }

    /// The Status register as the guest reads it.
    pub fn status(&self) -> u32 {
        let needs_reset = self.status & status::DRIVER_OK != 0 && lock(&self.device).needs_reset();
        self.status
            | if needs_reset {
                status::DEVICE_NEEDS_RESET
            } else {
                0
            }
    }

    fn has(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    fn selected(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may be written after FEATURES_OK and before DRIVER_OK.
    fn queue_writable(&self) -> bool {
        self.has(status::FEATURES_OK) && !self.has(status::DRIVER_OK)
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for slot in &mut self.queues {
            slot.queue.reset();
            slot.bad_size = false;
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.clear();
    }

    fn needs_reset(&mut self, why: std::fmt::Arguments<'_>) {
        self.log.report(why);
        self.status |= status::DEVICE_NEEDS_RESET;
        use super::InterruptSignal as _;
        self.interrupt.signal_config_change();
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status & !status::DEVICE_NEEDS_RESET;
        let new = value & !status::DEVICE_NEEDS_RESET;
        if new & old != old {
            // Bits can only be cleared by a reset.
            return;
        }
        let added = new & !old;
        let ordered = [
            (status::ACKNOWLEDGE, 0),
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::DRIVER),
            (status::DRIVER_OK, status::FEATURES_OK),
        ];
        for (bit, needs) in ordered {
            if added & bit != 0 && new & needs != needs {
                return;
            }
        }
        if added & status::FEATURES_OK != 0
            && self.driver_features & (1u64 << VIRTIO_F_VERSION_1) == 0
        {
            // Refused: the driver reads FEATURES_OK back as clear and gives up.
            self.status |= new & !status::FEATURES_OK & !status::DRIVER_OK;
            return;
        }
        self.status |= new;
        if added & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        for (i, slot) in self.queues.iter().enumerate() {
            if slot.queue.ready() && (slot.bad_size || !slot.queue.is_valid(&self.mem)) {
                let why = if slot.bad_size {
                    "size is not a power of two up to the maximum"
                } else {
                    "rings are misplaced or outside guest memory"
                };
                self.needs_reset(format_args!(
                    "queue {i} is invalid ({why}); device not activated"
                ));
                return;
            }
        }
        let queues = self
            .queues
            .iter()
            .filter_map(|slot| Queue::try_from(slot.queue.state()).ok())
            .collect();
        let result = lock(&self.device).activate(self.mem.clone(), queues);
        if let Err(e) = result {
            self.needs_reset(format_args!("activation failed: {e}"));
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize).map(|s| &s.queue);
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => lock(&self.device).device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let f = lock(&self.device).features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            reg::CONFIG_GENERATION => lock(&self.device).config_generation(),
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if !self.has(status::DRIVER) || self.has(status::FEATURES_OK) {
                    return;
                }
                let offered = lock(&self.device).features();
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.driver_features =
                    (self.driver_features & !mask) | ((u64::from(v) << shift) & offered);
                lock(&self.device).ack_features(self.driver_features);
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if self.queue_writable() => {
                if let Some(slot) = self.selected() {
                    let size = u16::try_from(v).unwrap_or(0);
                    slot.bad_size = slot.queue.try_set_size(size).is_err();
                }
            }
            reg::QUEUE_READY if self.queue_writable() => {
                if let Some(slot) = self.selected() {
                    slot.queue.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH if self.queue_writable() => {
                let (lo, hi) = split(offset == reg::QUEUE_DESC_LOW, v);
                if let Some(slot) = self.selected() {
                    slot.queue.set_desc_table_address(lo, hi);
                }
            }
            reg::QUEUE_AVAIL_LOW | reg::QUEUE_AVAIL_HIGH if self.queue_writable() => {
                let (lo, hi) = split(offset == reg::QUEUE_AVAIL_LOW, v);
                if let Some(slot) = self.selected() {
                    slot.queue.set_avail_ring_address(lo, hi);
                }
            }
            reg::QUEUE_USED_LOW | reg::QUEUE_USED_HIGH if self.queue_writable() => {
                let (lo, hi) = split(offset == reg::QUEUE_USED_LOW, v);
                if let Some(slot) = self.selected() {
                    slot.queue.set_used_ring_address(lo, hi);
                }
            }
            // Only for queues without an ioeventfd (those never exit here).
            reg::QUEUE_NOTIFY if self.has(status::DRIVER_OK) => lock(&self.device).queue_notify(v),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            _ => {}
        }
    }
}

fn split(low: bool, v: u32) -> (Option<u32>, Option<u32>) {
    if low {
        (Some(v), None)
    } else {
        (None, Some(v))
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::super::console::Console;
    use super::super::testutil::{Ring, mem};
    use super::super::{INT_CONFIG, INT_VRING, InterruptSignal, TYPE_CONSOLE};
    use super::*;

    type Dev = Console<Vec<u8>, Arc<VirtioInterrupt>>;

    struct T {
        t: MmioTransport<Dev>,
        dev: Arc<Mutex<Dev>>,
        irq: Arc<VirtioInterrupt>,
        mem: GuestMemory,
    }

    fn transport() -> T {
        let mem = mem();
        let irq = VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let dev = Arc::new(Mutex::new(Console::new(Vec::new(), irq.clone())));
        let t = MmioTransport::new(dev.clone(), mem.clone(), irq.clone()).unwrap();
        T { t, dev, irq, mem }
    }

    fn r(t: &mut MmioTransport<Dev>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport<Dev>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport<Dev>) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, 1); // VERSION_1
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, 0b101); // SIZE, EMERG_WRITE
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport<Dev>, index: u32, ring: &Ring) {
        w(t, reg::QUEUE_SEL, index);
        w(t, reg::QUEUE_NUM, u32::from(ring.size));
        w(t, reg::QUEUE_DESC_LOW, ring.desc as u32);
        w(t, reg::QUEUE_DESC_HIGH, 0);
        w(t, reg::QUEUE_AVAIL_LOW, ring.avail as u32);
        w(t, reg::QUEUE_AVAIL_HIGH, 0);
        w(t, reg::QUEUE_USED_LOW, ring.used as u32);
        w(t, reg::QUEUE_USED_HIGH, 0);
        w(t, reg::QUEUE_READY, 1);
    }

    const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identity_registers() {
        let mut x = transport();
        assert_eq!(r(&mut x.t, reg::MAGIC), MMIO_MAGIC);
        assert_eq!(r(&mut x.t, reg::VERSION), 2);
        assert_eq!(r(&mut x.t, reg::DEVICE_ID), TYPE_CONSOLE);
        assert_eq!(r(&mut x.t, reg::VENDOR_ID), VENDOR_ID);
        w(&mut x.t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut x.t, reg::QUEUE_NUM_MAX), 256);
        w(&mut x.t, reg::QUEUE_SEL, 2);
        assert_eq!(r(&mut x.t, reg::QUEUE_NUM_MAX), 0, "no such queue");
    }

    #[test]
    fn feature_selectors() {
        let mut x = transport();
        assert_eq!(r(&mut x.t, reg::DEVICE_FEATURES), 0b101);
        w(&mut x.t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut x.t, reg::DEVICE_FEATURES), 1);
        w(&mut x.t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut x.t, reg::DEVICE_FEATURES), 0);
        // Driver features before DRIVER are ignored; unknown bits are dropped.
        w(&mut x.t, reg::DRIVER_FEATURES, 0b101);
        assert_eq!(x.t.driver_features, 0);
        negotiate(&mut x.t);
        assert_eq!(x.t.driver_features, (1 << 32) | 0b101);
        w(&mut x.t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(
            x.t.driver_features,
            (1 << 32) | 0b101,
            "after FEATURES_OK: ignored"
        );
    }

    #[test]
    fn status_ordering() {
        let mut x = transport();
        w(&mut x.t, reg::STATUS, status::DRIVER);
        assert_eq!(r(&mut x.t, reg::STATUS), 0, "DRIVER before ACKNOWLEDGE");
        w(
            &mut x.t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER_OK,
        );
        assert_eq!(r(&mut x.t, reg::STATUS), 0, "DRIVER_OK skipping steps");
        w(&mut x.t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        // FEATURES_OK without VERSION_1 is refused
        w(&mut x.t, reg::DRIVER_FEATURES, 0b1);
        w(
            &mut x.t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            r(&mut x.t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        // clearing bits is refused
        w(&mut x.t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(
            r(&mut x.t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        // FAILED any time
        w(
            &mut x.t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
        );
        assert_ne!(r(&mut x.t, reg::STATUS) & status::FAILED, 0);
    }

    #[test]
    fn bring_up_transmit_and_reset() {
        let mut x = transport();
        let rx = Ring::new(&x.mem, 0x1000, 16);
        let tx = Ring::new(&x.mem, 0x2000, 16);
        // queue registers before FEATURES_OK are ignored
        w(&mut x.t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut x.t, reg::QUEUE_READY), 0);
        negotiate(&mut x.t);
        setup_queue(&mut x.t, 0, &rx);
        setup_queue(&mut x.t, 1, &tx);
        assert_eq!(r(&mut x.t, reg::QUEUE_READY), 1);
        assert!(!x.dev.lock().unwrap().is_active());
        w(&mut x.t, reg::STATUS, ALL);
        assert_eq!(r(&mut x.t, reg::STATUS), ALL);
        assert!(x.dev.lock().unwrap().is_active());
        // queue registers after DRIVER_OK are ignored
        w(&mut x.t, reg::QUEUE_NUM, 2);
        x.mem.write_slice(b"hey", GuestAddress(0x8_0000)).unwrap();
        tx.push(tx.chain(0, &[(0x8_0000, 3, 0)]));
        w(&mut x.t, reg::QUEUE_NOTIFY, 1); // the transmit queue: used in the exit
        assert_eq!(x.dev.lock().unwrap().sink(), b"hey");
        assert_eq!(r(&mut x.t, reg::INTERRUPT_STATUS), INT_VRING);
        w(&mut x.t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&mut x.t, reg::INTERRUPT_STATUS), 0);
        // config space through the transport, and generation
        x.dev.lock().unwrap().set_size(132, 43);
        assert_eq!(r(&mut x.t, reg::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(r(&mut x.t, reg::CONFIG_GENERATION), 1);
        let mut b = [0u8; 2];
        x.t.read(CONFIG_SPACE_OFFSET + 2, &mut b);
        assert_eq!(u16::from_le_bytes(b), 43);
        x.t.write(CONFIG_SPACE_OFFSET + 8, &u32::from(b'E').to_le_bytes());
        assert_eq!(x.dev.lock().unwrap().sink(), b"heyE");
        // reset
        w(&mut x.t, reg::STATUS, 0);
        assert_eq!(r(&mut x.t, reg::STATUS), 0);
        assert_eq!(r(&mut x.t, reg::INTERRUPT_STATUS), 0);
        assert_eq!(r(&mut x.t, reg::QUEUE_READY), 0);
        assert!(!x.dev.lock().unwrap().is_active());
        // and it comes up again
        negotiate(&mut x.t);
        setup_queue(&mut x.t, 0, &Ring::new(&x.mem, 0x4000, 16));
        setup_queue(&mut x.t, 1, &Ring::new(&x.mem, 0x5000, 16));
        w(&mut x.t, reg::STATUS, ALL);
        assert!(x.dev.lock().unwrap().is_active());
    }

    #[test]
    fn invalid_queue_size_needs_reset() {
        let mut x = transport();
        let rx = Ring::new(&x.mem, 0x1000, 16);
        negotiate(&mut x.t);
        setup_queue(&mut x.t, 0, &rx);
        w(&mut x.t, reg::QUEUE_NUM, 3);
        w(&mut x.t, reg::STATUS, ALL);
        assert_ne!(r(&mut x.t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(!x.dev.lock().unwrap().is_active());
        assert_eq!(r(&mut x.t, reg::INTERRUPT_STATUS), INT_CONFIG);
        // a reset clears it
        w(&mut x.t, reg::STATUS, 0);
        assert_eq!(r(&mut x.t, reg::STATUS), 0);
    }

    #[test]
    fn rings_outside_memory_need_reset() {
        let mut x = transport();
        negotiate(&mut x.t);
        let mut bad = Ring::new(&x.mem, 0x1000, 16);
        bad.used = 0x4000_0000;
        setup_queue(&mut x.t, 1, &bad);
        w(&mut x.t, reg::STATUS, ALL);
        assert_ne!(r(&mut x.t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(!x.dev.lock().unwrap().is_active());
    }

    #[test]
    fn device_fault_shows_in_status() {
        let mut x = transport();
        let rx = Ring::new(&x.mem, 0x1000, 16);
        let tx = Ring::new(&x.mem, 0x2000, 16);
        negotiate(&mut x.t);
        setup_queue(&mut x.t, 0, &rx);
        setup_queue(&mut x.t, 1, &tx);
        w(&mut x.t, reg::STATUS, ALL);
        tx.set_avail_idx(1000);
        x.dev.lock().unwrap().process_tx();
        assert_ne!(r(&mut x.t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        x.irq.signal_used_queue();
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let mut x = transport();
        let mut two = [0xaau8; 2];
        x.t.read(reg::MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
        let mut four = [0xaau8; 4];
        x.t.read(reg::MAGIC + 1, &mut four);
        assert_eq!(four, [0; 4]);
        x.t.write(reg::STATUS, &[1]);
        x.t.write(reg::STATUS + 2, &1u32.to_le_bytes());
        x.t.write(reg::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r(&mut x.t, reg::STATUS), 0);
        assert_eq!(r(&mut x.t, 0x0ff0 & !3), 0, "unknown register");
        let mut big = [0xaau8; 64];
        x.t.read(CONFIG_SPACE_OFFSET + 0xe00, &mut big);
        assert_eq!(big, [0u8; 64]);
    }
}
