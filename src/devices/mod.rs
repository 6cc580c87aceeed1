//! Emulated devices and the buses that route vCPU exits to them.
//!
//! A port-I/O exit reaches the UART like this: `vstate::vcpu::handle_exit` ->
//! [`crate::vstate::bus::Bus::write`] on the PIO bus -> [`uart::Uart`]'s
//! [`crate::vstate::bus::BusDevice::write`].

pub mod acpi_pm;
pub mod debug_port;
pub mod i8042;
pub mod uart;
pub mod virtio;

pub use crate::mux::FrontendOutput;
