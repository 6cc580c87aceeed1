//! x86_64 guest set-up: the physical memory layout, the boot protocol (kernel, initrd,
//! zero page, e820), the vCPU's initial state (registers, GDT, page tables, MSRs, CPUID)
//! and the ACPI tables the guest discovers its CPUs and power-off register through.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod regs;
pub mod unpack;
