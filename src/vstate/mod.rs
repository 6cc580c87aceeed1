//! KVM state: guest memory, the VM (irqchip, PIT, irqfds), the vCPU threads, and the
//! buses that route a vCPU's port-I/O and MMIO exits to the devices.

pub mod bus;
pub mod coalesced;
pub mod memory;
pub mod vcpu;
pub mod vm;
