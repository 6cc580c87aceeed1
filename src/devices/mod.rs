//! Emulated devices and the buses that route vCPU exits to them.
//!
//! A port-I/O exit reaches the UART like this: `vstate::vcpu::handle_exit` ->
//! [`bus::Bus::write`] on the PIO bus -> [`uart::Uart`]'s [`bus::BusDevice::write`].

use std::io::Write;

use crate::mux::HubWriter;

pub mod acpi_pm;
pub mod bus;
pub mod debug_port;
pub mod i8042;
pub mod uart;
pub mod virtio;

/// Where a console frontend's output goes (the UART's THR, the virtio console's
/// transmitq): a writer that never blocks, and that tells when its consumer is behind.
pub trait ConsoleSink: Write + Send {
    /// True while the consumer is behind: the UART then reports its transmitter busy and
    /// the virtio console leaves transmit buffers queued, pacing the guest.
    fn congested(&self) -> bool {
        false
    }

    /// Like [`ConsoleSink::congested`], but counting only the consumers' backlog, not
    /// output the hub has yet to pick up. For a frontend served on the hub's own thread
    /// (the virtio console), whose queued output the hub always takes right after it.
    fn backlogged(&self) -> bool {
        self.congested()
    }
}

impl ConsoleSink for HubWriter {
    fn congested(&self) -> bool {
        HubWriter::congested(self)
    }

    fn backlogged(&self) -> bool {
        HubWriter::backlogged(self)
    }
}

impl ConsoleSink for Vec<u8> {}
