//! KVM's coalesced I/O ring: guest writes to registered port (or MMIO) ranges that KVM
//! queues in a page shared with userspace instead of exiting to it.
//!
//! Used for the UART's transmit holding register (port 0x3f8): a guest printing through
//! ttyS0 writes each byte there, and without the ring every byte is a full exit to
//! userspace. With it, KVM appends the write to the ring (one entry per byte) and resumes
//! the guest at once; microvm replays the queued writes, oldest first, to the port-I/O bus:
//! - on the vCPU thread, before it handles ANY exit (`handle_exit` drains first), so a
//!   guest that reads LSR or IIR, or writes any other register, sees the device as if
//!   every earlier write had exited: order is kept across all registers;
//! - on the event loop, on a short timer while output flows (see [`CoalescedFlush`]),
//!   for the bytes a guest writes last before it stops exiting (an early console's final
//!   newline);
//! - when a vCPU thread ends, so nothing is left behind at shutdown.
//!
//! KVM takes a write into the ring only if there is room (170 entries with 4 KiB pages);
//! when it is full the write exits as usual, and the drain that precedes its handling
//! keeps the order. The ring is one per VM, shared by all vCPUs; draining is serialized
//! by a mutex held while the writes are delivered, and an entry is released to KVM only
//! after it was delivered, so a thread that finds the ring empty knows that everything
//! queued before has reached the device.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_bindings::KVM_COALESCED_MMIO_PAGE_OFFSET;
use vmm_sys_util::timerfd::TimerFd;

/// Size of the ring header (`first`, `last`).
const HEADER: usize = 8;
/// Size of one entry: phys_addr u64, len u32, pio u32, data [u8; 8].
const ENTRY: usize = 24;

/// The mapped ring page.
struct Mapping {
    addr: NonNull<u8>,
    len: usize,
    /// Entries in the ring (KVM_COALESCED_MMIO_MAX).
    max: u32,
}

// SAFETY: the mapping is plain shared memory owned by this value; the indices are only
// accessed as atomics, and entries are read only by a drain, which `CoalescedRing`
// serializes with its mutex.
unsafe impl Send for Mapping {}
// SAFETY: as above: concurrent access is atomics (indices) or serialized (entries).
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are the mapping made in `CoalescedRing::map`, unmapped once.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

impl Mapping {
    fn index(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: offsets 0 and 4 are the u32 indices `first` and `last` of the ring
        // header, inside the mapping and 4-byte aligned; KVM updates `last` concurrently,
        // which is why they are accessed as atomics.
        unsafe { &*self.addr.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn first(&self) -> &AtomicU32 {
        self.index(0)
    }

    fn last(&self) -> &AtomicU32 {
        self.index(4)
    }

    /// Entry `i` (< max): (address, is_pio, data).
    fn entry(&self, i: u32) -> (u64, bool, [u8; 8], usize) {
        let mut raw = [0u8; ENTRY];
        // SAFETY: i < max, so the entry lies inside the mapping; KVM wrote it before it
        // advanced `last` (smp_wmb), which our Acquire load of `last` observed.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.addr.as_ptr().add(HEADER + i as usize * ENTRY),
                raw.as_mut_ptr(),
                ENTRY,
            )
        };
        let word = |at: usize| u32::from_ne_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
        let addr = u64::from(word(0)) | (u64::from(word(4)) << 32);
        let len = (word(8) as usize).min(8);
        let pio = word(12) != 0;
        let mut data = [0u8; 8];
        data.copy_from_slice(&raw[16..24]);
        (addr, pio, data, len)
    }
}

/// The VM's coalesced I/O ring, mapped from a vCPU file descriptor.
pub struct CoalescedRing {
    map: Mapping,
    /// Held while a drain delivers writes.
    draining: Mutex<()>,
    /// Writes delivered so far (by any thread).
    delivered: AtomicU64,
}

/// One queued guest write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedWrite {
    /// A port-I/O write (else MMIO).
    pub pio: bool,
    /// Port or guest-physical address.
    pub addr: u64,
    /// The bytes written (1 to 8).
    pub data: [u8; 8],
    /// How many of `data` are valid.
    pub len: usize,
}

impl CoalescedRing {
    /// Maps the ring page of the VM that `vcpu` belongs to (KVM_COALESCED_MMIO_PAGE_OFFSET
    /// of the vCPU's mmap area).
    pub fn map(vcpu: &impl AsRawFd) -> std::io::Result<CoalescedRing> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let len = usize::try_from(page).map_err(|_| std::io::Error::last_os_error())?;
        let offset = libc::off_t::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * page as libc::off_t;
        // SAFETY: a fresh shared mapping of one page of the vCPU fd at the offset KVM
        // documents for the coalesced ring; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast()).ok_or_else(std::io::Error::last_os_error)?;
        let max = ((len - HEADER) / ENTRY) as u32;
        Ok(CoalescedRing {
            map: Mapping { addr, len, max },
            draining: Mutex::new(()),
            delivered: AtomicU64::new(0),
        })
    }

    /// Delivers every queued write, oldest first, to `deliver`; returns how many. Cheap
    /// when the ring is empty (two atomic loads, no lock).
    pub fn drain(&self, mut deliver: impl FnMut(QueuedWrite)) -> usize {
        if self.is_empty() {
            return 0;
        }
        let _draining = self.draining.lock().unwrap_or_else(|p| p.into_inner());
        let map = &self.map;
        let mut n = 0;
        loop {
            let first = map.first().load(Ordering::Relaxed);
            let last = map.last().load(Ordering::Acquire);
            if first == last || first >= map.max {
                break;
            }
            let (addr, pio, data, len) = map.entry(first);
            deliver(QueuedWrite {
                pio,
                addr,
                data,
                len,
            });
            // Released only after delivery (see the module notes).
            map.first().store((first + 1) % map.max, Ordering::Release);
            n += 1;
        }
        if n > 0 {
            self.delivered.fetch_add(n as u64, Ordering::Relaxed);
        }
        n
    }

    /// True when nothing is queued and no drain is delivering (no lock taken: a drain
    /// releases an entry only after delivering it).
    pub fn is_empty(&self) -> bool {
        self.map.first().load(Ordering::Acquire) == self.map.last().load(Ordering::Acquire)
    }

    /// Writes delivered so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

/// How often [`CoalescedFlush`] drains while output flows, and while idle.
const FLUSH_ACTIVE: Duration = Duration::from_millis(5);
const FLUSH_IDLE: Duration = Duration::from_millis(100);

/// Event-loop glue: drains the ring on a timer, every [`FLUSH_ACTIVE`] while writes keep
/// coming (drained here or by a vCPU), every [`FLUSH_IDLE`] otherwise. Bounds how long a
/// write can wait when the guest stops exiting right after it.
pub struct CoalescedFlush<F: FnMut(QueuedWrite) + Send> {
    ring: std::sync::Arc<CoalescedRing>,
    deliver: F,
    timer: TimerFd,
    seen: u64,
}

impl<F: FnMut(QueuedWrite) + Send> CoalescedFlush<F> {
    /// A flusher for `ring`, handing writes to `deliver`.
    pub fn new(ring: std::sync::Arc<CoalescedRing>, deliver: F) -> std::io::Result<Self> {
        let mut timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        timer
            .reset(FLUSH_IDLE, None)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(CoalescedFlush {
            ring,
            deliver,
            timer,
            seen: 0,
        })
    }
}

impl<F: FnMut(QueuedWrite) + Send> MutEventSubscriber for CoalescedFlush<F> {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        self.ring.drain(&mut self.deliver);
        let now = self.ring.delivered();
        let next = if now != self.seen {
            FLUSH_ACTIVE
        } else {
            FLUSH_IDLE
        };
        self.seen = now;
        // A failure leaves the timer stopped: vCPU exits still drain the ring.
        let _ = self.timer.reset(next, None);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.timer, EventSet::IN));
    }
}
