//! The 16550A UART (COM1, ttyS0), emulated by vm-superio.
//!
//! Output: every byte the guest writes to THR goes to the console sink `W` (the console hub's
//! writer, which never blocks). Input: the event loop offers bytes with
//! [`Uart::enqueue_input`]; when the guest empties the receive FIFO, vm-superio reports
//! `in_buffer_empty` and we signal `drained`, so the event loop offers more. Interrupts go
//! to the in-kernel IOAPIC through an irqfd.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Raises the UART's interrupt line by writing to its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals the event loop when the guest has drained the receive FIFO.
pub struct DrainedSignal(pub Arc<EventFd>);

impl SerialEvents for DrainedSignal {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // Counter overflow cannot happen in practice, and a failed write would only delay
        // input until the next drain.
        let _ = self.0.write(1);
    }
}

/// A 16550A UART on the port-I/O bus.
pub struct Uart<W: Write + Send> {
    serial: Serial<IrqTrigger, DrainedSignal, W>,
}

impl<W: Write + Send> Uart<W> {
    /// A UART raising `irq` and writing guest output to `out`; `drained` is signalled when
    /// the guest empties the receive FIFO.
    pub fn new(irq: EventFd, drained: Arc<EventFd>, out: W) -> Self {
        Uart {
            serial: Serial::with_events(IrqTrigger(irq), DrainedSignal(drained), out),
        }
    }

    /// Offers guest input; returns how many bytes fit in the 64-byte receive FIFO.
    pub fn enqueue_input(&mut self, data: &[u8]) -> usize {
        if data.is_empty() || self.serial.fifo_capacity() == 0 {
            return 0;
        }
        // The only error is a failed interrupt write (eventfd counter full), after the
        // bytes were queued; the guest still finds them on its next read.
        self.serial.enqueue_raw_bytes(data).unwrap_or(0)
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }
}

impl<W: Write + Send> BusDevice for Uart<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        // Errors are a failed output write (the sink is non-blocking and reports none) or a
        // failed interrupt write; the guest carries on either way, as with a real UART.
        let _ = self.serial.write(offset as u8, data[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uart() -> (Uart<Vec<u8>>, EventFd, Arc<EventFd>) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let u = Uart::new(irq.try_clone().unwrap(), drained.clone(), Vec::new());
        (u, irq, drained)
    }

    #[test]
    fn output_reaches_sink() {
        let (mut u, _, _) = uart();
        for b in b"hi" {
            u.write(0, &[*b]);
        }
        assert_eq!(u.serial.writer(), b"hi");
    }

    #[test]
    fn input_fills_fifo_then_drains_with_signal() {
        let (mut u, irq, drained) = uart();
        u.write(1, &[0x01]); // IER: receive-data interrupt
        let data = [b'x'; 100];
        assert_eq!(u.enqueue_input(&data), 64);
        assert_eq!(u.enqueue_input(&data), 0);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8];
        for _ in 0..64 {
            u.read(0, &mut b);
            assert_eq!(b[0], b'x');
        }
        assert_eq!(drained.read().unwrap(), 1);
        assert_eq!(u.input_capacity(), 64);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut u, _, _) = uart();
        let mut w = [0u8; 2];
        u.read(0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        u.write(0, &[1, 2]);
        assert!(u.serial.writer().is_empty());
    }
}
