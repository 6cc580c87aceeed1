//! x86_64 guest set-up: the physical memory layout, the boot protocol (kernel, initrd,
//! zero page, e820), the vCPU's initial state (registers, GDT, page tables, MSRs, CPUID)
//! and the ACPI tables the guest discovers its CPUs and power-off register through.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod kernel_probe;
pub mod layout;
pub mod regs;
pub mod unpack;

/// Guest memory laid out like the VM's, for the unit tests of this layer (the VM's own,
/// huge-page aligned, comes from `vstate::memory`).
#[cfg(test)]
pub(crate) fn test_memory(size: u64) -> super::GuestMemory {
    super::GuestMemory::from_ranges(&layout::ram_ranges(size)).unwrap()
}
