//! ACPI tables, built with the `acpi_tables` crate: RSDP -> XSDT -> {FADT -> DSDT, MADT}.
//!
//! The FADT is hardware-reduced: no PM timer, no SCI, no GPEs; power-off goes through the
//! sleep control register (emulated by `devices::acpi_pm`) with the SLP_TYP the DSDT's
//! `\_S5` object gives. The MADT lists one local APIC per vCPU and the IOAPIC. Devices the
//! guest cannot probe (virtio-mmio) add themselves to the DSDT through [`AcpiDevice`].

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress};

use super::layout::S5_SLEEP_TYPE;
use super::layout::{
    ACPI_END, ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT,
    ACPI_START, APIC_START, COM1_IRQ, COM1_PORT, COM1_PORT_LEN, IOAPIC_START,
};
use crate::arch::GuestMemory;

const OEM_ID: [u8; 6] = *b"MICROV";
const OEM_REVISION: u32 = 1;
/// IAPC_BOOT_ARCH: no VGA, no CMOS RTC (and, by omission, no i8042 for the kernel to probe;
/// the reset port still works).
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

/// Errors building or writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit their area below 1 MiB.
    #[error("ACPI tables need {0} bytes, more than the {1} bytes reserved for them")]
    TooLarge(u64, u64),
    /// Writing them to guest memory failed.
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A device described in the DSDT: name, _HID and a memory window plus interrupt.
#[derive(Debug, Clone)]
pub struct AcpiDevice {
    /// Four-character ACPI name, e.g. "VR00".
    pub name: String,
    /// Hardware id, e.g. "LNRO0005" for virtio-mmio.
    pub hid: &'static str,
    /// Unique id among devices with the same _HID.
    pub uid: u32,
    /// MMIO window base.
    pub mmio_base: u32,
    /// MMIO window length.
    pub mmio_len: u32,
    /// Interrupt (GSI), edge-triggered, active high.
    pub irq: u32,
}

fn gas_io_byte(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn aml_bytes(obj: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    obj.to_aml_bytes(&mut v);
    v
}

/// The DSDT body: `\_S5`, COM1 and the given devices.
fn dsdt(devices: &[AcpiDevice]) -> Sdt {
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"MVMDSDT ", OEM_REVISION);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    );
    table.append_slice(&aml_bytes(&s5));

    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORT_LEN as u8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    table.append_slice(&aml_bytes(&aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )));

    for dev in devices {
        let mem = aml::Memory32Fixed::new(true, dev.mmio_base, dev.mmio_len);
        let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid: &'static str = dev.hid;
        let path = format!("_SB_.{}", dev.name);
        table.append_slice(&aml_bytes(&aml::Device::new(
            path.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &hid),
                &aml::Name::new("_UID".into(), &dev.uid),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )));
    }
    table
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"MVMFACP ", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    fadt.sleep_control_reg = gas_io_byte(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = gas_io_byte(ACPI_SLEEP_STATUS_PORT);
    fadt.reset_reg = gas_io_byte(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    aml_bytes(&fadt.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"MVMMADT ",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    aml_bytes(&madt)
}

/// Builds the tables for `vcpus` CPUs and `devices`, writes them from `ACPI_START` and
/// returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemory,
    vcpus: u8,
    devices: &[AcpiDevice],
) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    // Tables follow the RSDP, each 8-byte aligned.
    let align = |a: u64| (a + 7) & !7;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(devices);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, *b"MVMXSDT ", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = aml_bytes(&xsdt);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - ACPI_START, ACPI_END - ACPI_START));
    }
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, bytes) in [
        (rsdp_addr, rsdp.as_slice()),
        (dsdt_addr, dsdt.as_slice()),
        (fadt_addr, fadt.as_slice()),
        (madt_addr, madt.as_slice()),
        (xsdt_addr, xsdt.as_slice()),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_valid_and_linked() {
        let mem = crate::arch::x86_64::test_memory(16 << 20);
        let dev = AcpiDevice {
            name: "VR00".into(),
            hid: "LNRO0005",
            uid: 0,
            mmio_base: 0xd000_0000,
            mmio_len: 0x1000,
            irq: 5,
        };
        let rsdp = write_tables(&mem, 4, &[dev]).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let read_table = |addr: u64| {
            let mut hdr = [0u8; 8];
            mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert!(checksum_ok(&t), "bad checksum for {:?}", &hdr[..4]);
            t
        };
        let xsdt = read_table(xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = read_table(entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read_table(dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(8).any(|w| w == b"LNRO0005"));
        let madt = read_table(entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        // header (44) + 4 local APICs (8 each) + IOAPIC (12)
        assert_eq!(madt.len(), 44 + 4 * 8 + 12);
    }
}
