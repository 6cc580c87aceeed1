//! The virtio-console fuzz harness, shared by `fuzz/` (cargo-fuzz) and the corpus replay
//! test: it builds 64 KiB of guest memory, a console behind a virtio-mmio transport, and
//! interprets the input as a sequence of operations a (hostile) driver could perform.
//!
//! Input format: a stream of operations, each one opcode byte (`op % 8`) and its operands
//! (little endian; a truncated operand ends the run):
//!
//! | op | operands | action |
//! |----|----------|--------|
//! | 0 | off:u16 size:u8 val:u32 | MMIO write of 1/2/4/8 bytes (`size % 4`) at `off % 0x200` |
//! | 1 | off:u16 size:u8 | MMIO read |
//! | 2 | addr:u16 len:u8 bytes | write guest memory (driver-side data, rings, descriptors) |
//! | 3 | - | process the transmit queue (an ioeventfd notify) |
//! | 4 | len:u8 | offer `len` bytes of input (`take_input`) |
//! | 5 | cols:u16 rows:u16 | terminal resize |
//! | 6 | rx_size:u16 tx_size:u16 feat:u8 | driver bring-up: status steps, features, both queues at fixed places, DRIVER_OK |
//! | 7 | q:u8 idx:u8 addr:u16 len:u16 flags:u8 next:u8 publish:u8 | write a descriptor; publish it in the avail ring when `publish & 1` |

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::console::Console;
use super::mmio::MmioTransport;
use super::{VirtioInterrupt, status};
use crate::fuzz_input::Input;
use crate::vstate::bus::BusDevice;

/// Guest memory size for the harness.
pub const MEM_SIZE: u64 = 0x1_0000;
/// Ring bases for queues 0 and 1 used by the bring-up operation.
pub const RING_BASE: [u64; 2] = [0x1000, 0x4000];

/// Counts output without keeping it (a fuzz run must not grow without bound).
#[derive(Default)]
pub struct CountingSink(pub u64);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl crate::devices::FrontendOutput for CountingSink {}

type Dev = Console<CountingSink, Arc<VirtioInterrupt>>;

fn lock(d: &Mutex<Dev>) -> std::sync::MutexGuard<'_, Dev> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

fn w32(t: &mut MmioTransport<Dev>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Ring layout (desc, avail, used) for a queue of `size` at `base`.
fn layout(base: u64, size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    let avail = base + 16 * n;
    let used = (avail + 6 + 2 * n + 3) & !3;
    (base, avail, used)
}

/// What a run did, for tests that check the seeds reach the device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes the console wrote to its sink.
    pub output: u64,
    /// Guest faults the console logged.
    pub faults: u64,
    /// The device was active at the end.
    pub active: bool,
}

/// Runs one input. Never panics on any input (that is what the fuzzer checks).
pub fn run(data: &[u8]) -> Outcome {
    super::set_faults_quiet(true);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
    else {
        return Outcome::default();
    };
    let Ok(evt) = EventFd::new(libc::EFD_NONBLOCK) else {
        return Outcome::default();
    };
    let irq = VirtioInterrupt::new(evt);
    let dev = Arc::new(Mutex::new(Console::new(
        CountingSink::default(),
        irq.clone(),
    )));
    let Ok(mut t) = MmioTransport::new(dev.clone(), mem.clone(), irq) else {
        return Outcome::default();
    };
    let mut sizes = [256u16; 2];
    let mut input = Input(data);
    while let Some(op) = input.u8() {
        let done = match op % 8 {
            0 => (|| {
                let off = u64::from(input.u16()? % 0x200);
                let size = [1usize, 2, 4, 8][usize::from(input.u8()? % 4)];
                let v = u64::from(input.u32()?);
                t.write(off, &v.to_le_bytes()[..size]);
                Some(())
            })(),
            1 => (|| {
                let off = u64::from(input.u16()? % 0x200);
                let size = [1usize, 2, 4, 8][usize::from(input.u8()? % 4)];
                let mut b = [0u8; 8];
                t.read(off, &mut b[..size]);
                Some(())
            })(),
            2 => (|| {
                let addr = input.u16()?;
                let len = usize::from(input.u8()?);
                let bytes = input.bytes(len)?;
                let _ = mem.write_slice(bytes, GuestAddress(u64::from(addr)));
                Some(())
            })(),
            3 => {
                let _ = lock(&dev).process_tx();
                Some(())
            }
            4 => (|| {
                let len = usize::from(input.u8()?);
                let buf = vec![b'i'; len];
                let _ = lock(&dev).take_input(&buf);
                Some(())
            })(),
            5 => (|| {
                let (c, r) = (input.u16()?, input.u16()?);
                lock(&dev).set_size(c, r);
                Some(())
            })(),
            6 => (|| {
                sizes = [input.u16()?, input.u16()?];
                let feat = input.u8()?;
                w32(&mut t, 0x70, 0);
                w32(&mut t, 0x70, status::ACKNOWLEDGE);
                w32(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
                w32(&mut t, 0x24, 0);
                w32(&mut t, 0x20, u32::from(feat & 0x7));
                w32(&mut t, 0x24, 1);
                w32(&mut t, 0x20, u32::from(feat >> 7));
                let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
                w32(&mut t, 0x70, s);
                for q in 0..2 {
                    let (d, a, u) = layout(RING_BASE[q], sizes[q]);
                    w32(&mut t, 0x30, q as u32);
                    w32(&mut t, 0x38, u32::from(sizes[q]));
                    w32(&mut t, 0x80, d as u32);
                    w32(&mut t, 0x90, a as u32);
                    w32(&mut t, 0xa0, u as u32);
                    w32(&mut t, 0x44, 1);
                }
                w32(&mut t, 0x70, s | status::DRIVER_OK);
                Some(())
            })(),
            _ => (|| {
                let q = usize::from(input.u8()? % 2);
                let idx = u64::from(input.u8()?);
                let addr = u64::from(input.u16()?);
                let len = u32::from(input.u16()?);
                let flags = u16::from(input.u8()? & 0x7);
                let next = u16::from(input.u8()?);
                let publish = input.u8()? & 1 == 1;
                let size = sizes[q].max(1);
                let (d, a, _) = layout(RING_BASE[q], size);
                let da = GuestAddress(d + 16 * (idx % u64::from(size)));
                let mut raw = [0u8; 16];
                raw[..8].copy_from_slice(&addr.to_le_bytes());
                raw[8..12].copy_from_slice(&len.to_le_bytes());
                raw[12..14].copy_from_slice(&flags.to_le_bytes());
                raw[14..].copy_from_slice(&next.to_le_bytes());
                let _ = mem.write_slice(&raw, da);
                if publish {
                    let aidx: u16 = mem.read_obj(GuestAddress(a + 2)).unwrap_or(0);
                    let slot = GuestAddress(a + 4 + 2 * u64::from(aidx % size));
                    let _ = mem.write_obj(idx as u16, slot);
                    let _ = mem.write_obj(aidx.wrapping_add(1), GuestAddress(a + 2));
                }
                Some(())
            })(),
        };
        if done.is_none() {
            break;
        }
    }
    let d = lock(&dev);
    Outcome {
        output: d.sink().0,
        faults: d.faults(),
        active: d.is_active(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bring-up, one transmit chain, one receive buffer: the harness reaches the queues.
    #[test]
    fn harness_reaches_the_queues() {
        let mut d = vec![6u8, 16, 0, 16, 0, 0x81];
        // data "hi" at 0x8000
        d.extend_from_slice(&[2, 0x00, 0x80, 2, b'h', b'i']);
        // tx descriptor 0 -> 0x8000 len 2, published
        d.extend_from_slice(&[7, 1, 0, 0x00, 0x80, 2, 0, 0, 0, 1]);
        d.push(3);
        // rx descriptor 0 (the port is open: the guest wrote to it) -> 0x9000 len 8 write-only, published; receive 4
        d.extend_from_slice(&[7, 0, 0, 0x00, 0x90, 8, 0, 2, 0, 1]);
        d.extend_from_slice(&[4, 4]);
        let o = run(&d);
        assert_eq!(o.output, 2);
        assert_eq!(o.faults, 0);
        assert!(o.active);
    }
}
