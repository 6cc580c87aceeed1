//! KVM state: guest memory, the VM (irqchip, PIT, irqfds) and the vCPU threads.

pub mod coalesced;
pub mod memory;
pub mod vcpu;
pub mod vm;
