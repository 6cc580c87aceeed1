//! Guest physical memory map and fixed resources (ports, IRQs) of the microvm machine.
//!
//! ```text
//! 0x0000_0500  GDT                    0x0000_7000  zero page (boot_params)
//! 0x0000_0520  IDT (empty)            0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4                   0x0000_a000  PDPT
//! 0x0000_b000  4 page directories: identity map of the first 4 GiB (2 MiB pages)
//! 0x0002_0000  kernel command line    0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables (RSDP first, where the kernel scans for it)
//! 0x0010_0000  kernel (bzImage protected-mode part / vmlinux), then RAM
//! 0xc000_0000 - 0x1_0000_0000  MMIO gap (virtio-mmio, IOAPIC, LAPIC); RAM resumes at 4 GiB
//! ```

/// Global descriptor table.
pub const GDT_START: u64 = 0x500;
/// Interrupt descriptor table (left empty: the kernel installs its own).
pub const IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Start of the extended BIOS data area; RAM below 1 MiB ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables; the RSDP is the first of them.
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI area (exclusive).
pub const ACPI_END: u64 = 0x10_0000;
/// Where the kernel is loaded and high memory starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap: RAM never overlaps [MMIO_GAP_START, MMIO_GAP_END).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IOAPIC's MMIO base (fixed by KVM's in-kernel IOAPIC).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS area (three pages) just below the BIOS area; needed on Intel hosts.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// COM1: the 16550 UART's ports and interrupt line.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports the UART decodes.
pub const COM1_PORT_LEN: u16 = 8;
/// COM1's ISA interrupt (GSI).
pub const COM1_IRQ: u32 = 4;
/// The i8042 keyboard controller's command/status port (reset line for `reboot=k`).
pub const I8042_PORT: u16 = 0x60;
/// Ports the i8042 decodes (0x60..=0x64).
pub const I8042_PORT_LEN: u16 = 5;
/// The test-guest ports (`devices::debug_port`): 0xf4 exit code, 0xf5 boot timer.
pub const DEBUG_PORT: u16 = 0xf4;
/// Ports the test-guest device decodes.
pub const DEBUG_PORT_LEN: u16 = 2;
/// The same test-guest registers as an MMIO page at the start of the MMIO gap (byte 0
/// exit code, byte 1 boot timer), for guests whose kernel has no /dev/port
/// (`CONFIG_DEVPORT` unset, as in Debian's): busybox `devmem` writes it through /dev/mem.
pub const DEBUG_MMIO_START: u64 = MMIO_GAP_START;
/// Size of the test-guest MMIO window.
pub const DEBUG_MMIO_SIZE: u64 = 0x1000;
/// ACPI hardware-reduced sleep control register (S5 = power off).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// The SLP_TYP value the DSDT's `\_S5` object announces and the ACPI PM device treats as
/// power off.
pub const S5_SLEEP_TYPE: u8 = 5;
/// ACPI hardware-reduced sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register (FADT RESET_REG).
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the guest writes to the ACPI reset register.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// Ports of the ACPI power-management block.
pub const ACPI_PM_PORT_LEN: u16 = 3;
/// First interrupt line handed to virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// Maximum vCPUs: the MADT's local APIC ids are 8 bits and 0xff is broadcast.
pub const MAX_VCPUS: u8 = 254;

/// The guest-physical RAM ranges for `size` bytes of memory: below the MMIO gap first,
/// the rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(vm_memory::GuestAddress, usize)> {
    use vm_memory::GuestAddress;
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > MMIO_GAP_START {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize));
    }
    ranges
}
