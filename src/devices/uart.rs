//! The 16550A UART (COM1, ttyS0), emulated by vm-superio.
//!
//! Output: every byte the guest writes to THR goes to the console sink `W` (the console hub's
//! writer, which never blocks). Input: the event loop offers bytes with
//! [`Uart::take_input`]; when the guest empties the receive FIFO, vm-superio reports
//! `in_buffer_empty` and we signal `drained`, so the event loop offers more. Interrupts go
//! to the in-kernel IOAPIC through an irqfd.
//!
//! Pacing: while the sink reports [`FrontendOutput::congested`] (a slow terminal behind the
//! console hub), LSR reads show the transmitter busy, so the guest's driver holds its
//! output like on a slow line; [`Uart::raise_thre`] tells it when to resume. vm-superio
//! itself always reports THR empty, so this is done around it.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::FrontendOutput;
use crate::mux::Frontend;
use crate::vstate::bus::BusDevice;

#[cfg(feature = "fuzzing")]
pub mod fuzzing;

const IER_OFFSET: u8 = 1;
const LCR_OFFSET: u8 = 3;
const LSR_OFFSET: u8 = 5;
const LCR_DLAB: u8 = 0x80;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

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
pub struct Uart<W: FrontendOutput> {
    serial: Serial<IrqTrigger, DrainedSignal, W>,
}

impl<W: FrontendOutput> Uart<W> {
    /// A UART raising `irq` and writing guest output to `out`; `drained` is signalled when
    /// the guest empties the receive FIFO.
    pub fn new(irq: EventFd, drained: Arc<EventFd>, out: W) -> Self {
        Uart {
            serial: Serial::with_events(IrqTrigger(irq), DrainedSignal(drained), out),
        }
    }

    /// Offers guest input; returns how many bytes fit in the 64-byte receive FIFO.
    pub fn take_input(&mut self, data: &[u8]) -> usize {
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

    /// Raises the "transmitter empty" interrupt again (if the guest enabled it), for when
    /// the sink has caught up after a congestion.
    pub fn raise_thre(&mut self) {
        if self.serial.read(LCR_OFFSET) & LCR_DLAB != 0 {
            return;
        }
        // Rewriting IER makes vm-superio re-assert THRE when it is enabled.
        let ier = self.serial.read(IER_OFFSET);
        let _ = self.serial.write(IER_OFFSET, ier);
    }
}

impl<W: FrontendOutput> BusDevice for Uart<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        let mut value = self.serial.read(offset as u8);
        if offset as u8 == LSR_OFFSET && self.serial.writer().congested() {
            value &= !(LSR_THRE | LSR_TEMT);
        }
        data[0] = value;
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

/// The UART as a console hub frontend: input goes into its receive FIFO, its "drained"
/// eventfd tells the hub when the guest has emptied it, and THRE is raised again when
/// the hub's consumers have caught up after a congestion.
pub struct UartFrontend<W: FrontendOutput> {
    uart: Arc<Mutex<Uart<W>>>,
    drained: Arc<EventFd>,
}

impl<W: FrontendOutput> UartFrontend<W> {
    /// Input side of `uart`, whose FIFO drains signal `drained`.
    pub fn new(uart: Arc<Mutex<Uart<W>>>, drained: Arc<EventFd>) -> Self {
        UartFrontend { uart, drained }
    }
}

impl<W: FrontendOutput> Frontend for UartFrontend<W> {
    fn take_input(&mut self, data: &[u8]) -> usize {
        self.uart
            .lock()
            .map(|mut u| u.take_input(data))
            .unwrap_or(0)
    }

    fn drained_fd(&self) -> RawFd {
        self.drained.as_raw_fd()
    }

    fn ack_drained(&mut self) {
        let _ = self.drained.read();
    }

    fn resume_output(&mut self) {
        if let Ok(mut u) = self.uart.lock() {
            u.raise_thre();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

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
        assert_eq!(u.take_input(&data), 64);
        assert_eq!(u.take_input(&data), 0);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8];
        for _ in 0..64 {
            u.read(0, &mut b);
            assert_eq!(b[0], b'x');
        }
        assert_eq!(drained.read().unwrap(), 1);
        assert_eq!(u.input_capacity(), 64);
    }

    struct Slow(bool);
    impl Write for Slow {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl FrontendOutput for Slow {
        fn congested(&self) -> bool {
            self.0
        }
    }

    #[test]
    fn congested_sink_holds_thre_and_release_raises_it() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut u = Uart::new(irq.try_clone().unwrap(), drained, Slow(true));
        let mut lsr = [0u8];
        u.read(u64::from(LSR_OFFSET), &mut lsr);
        assert_eq!(lsr[0] & (LSR_THRE | LSR_TEMT), 0);
        u.write(u64::from(IER_OFFSET), &[0x02]); // THRI
        let _ = irq.read();
        let mut iir = [0u8];
        u.read(2, &mut iir); // the guest's handler acknowledges, sees LSR busy, sends nothing
        u.serial.writer_mut().0 = false;
        u.raise_thre();
        assert_eq!(irq.read().unwrap(), 1);
        u.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "IIR reports THR empty");
        u.read(u64::from(LSR_OFFSET), &mut lsr);
        assert_eq!(lsr[0] & LSR_THRE, LSR_THRE);
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
