//! The KVM VM: memory slots, the in-kernel interrupt controllers and PIT, and irqfds.

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestMemory;
use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` is missing or not accessible.
    #[error(
        "cannot open {path}: {source} (is KVM enabled, and may you use it? try: sudo usermod -aG kvm $USER, then log in again)"
    )]
    OpenKvm {
        /// The device path.
        path: String,
        /// The OS error.
        source: kvm_ioctls::Error,
    },
    /// The KVM API version is not the stable one.
    #[error("unsupported KVM API version {0} (expected 12)")]
    ApiVersion(i32),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The error from KVM.
        source: kvm_ioctls::Error,
    },
    /// A host address of guest memory could not be found.
    #[error("guest memory region at {0:#x} has no host mapping")]
    HostAddress(u64),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// The KVM device; the environment variable `MICROVM_KVM_DEVICE` may name another path
/// (used by tests to check the error for a missing device).
fn kvm_device_path() -> String {
    std::env::var("MICROVM_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string())
}

/// What the host's KVM can boot: the one detection microvm, its scripts and its tests
/// use (`microvm kvm-mode` prints it for the scripts and the boot tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKvm {
    /// Hardware virtualization (VT-x/AMD-V): ordinary kernels boot.
    Hardware,
    /// PVM (`/sys/module/kvm_pvm`): only PVM-enabled guest kernels boot; tiny real-mode
    /// guests run.
    Pvm,
    /// No KVM this process may use (the reason).
    Unusable(String),
}

impl HostKvm {
    /// Looks at this host.
    pub fn detect() -> HostKvm {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            return HostKvm::Pvm;
        }
        let path = kvm_device_path();
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(_) => HostKvm::Hardware,
            Err(e) => HostKvm::Unusable(format!("cannot open {path}: {e}")),
        }
    }

    /// True when an ordinary Linux kernel boots here.
    pub fn boots_linux(&self) -> bool {
        *self == HostKvm::Hardware
    }

    /// Why, in one line.
    pub fn reason(&self) -> String {
        match self {
            HostKvm::Hardware => "the host /dev/kvm is hardware KVM".into(),
            HostKvm::Pvm => "the host /dev/kvm is PVM (/sys/module/kvm_pvm), which boots only PVM-enabled kernels".into(),
            HostKvm::Unusable(why) => format!("the host has no usable KVM ({why})"),
        }
    }
}

/// Opens the KVM device and checks the API version.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let path = kvm_device_path();
    let open_err = |source| VmError::OpenKvm {
        path: path.clone(),
        source,
    };
    let c_path = std::ffi::CString::new(path.clone())
        .map_err(|_| open_err(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(open_err)?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(VmError::ApiVersion(version));
    }
    Ok(kvm)
}

/// A VM with guest memory registered and, on request, the in-kernel irqchip and PIT.
pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Creates the VM and registers every region of `memory` as a memory slot.
    pub fn new(kvm: &Kvm, memory: &GuestMemory) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        for (slot, region) in memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::HostAddress(region.start_addr().raw_value()))?;
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the host range belongs to `memory`'s mmap, which lives as long as the
            // guest runs (the builder keeps it alive beside the VM) and does not overlap other
            // slots.
            unsafe { fd.set_user_memory_region(mem_region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Vm { fd })
    }

    /// Creates the in-kernel PIC, IOAPIC and local APICs, and the PIT.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(())
    }

    /// Creates an eventfd that raises interrupt line `gsi` when written.
    pub fn irqfd(&self, gsi: u32) -> Result<EventFd, VmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Kvm {
            what: "eventfd",
            source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))?;
        Ok(evt)
    }

    /// Has KVM queue the guest's writes to ports `[port, port + len)` in the coalesced
    /// ring instead of exiting (see [`super::coalesced`]). `Ok(false)` when this KVM
    /// cannot (no `KVM_CAP_COALESCED_PIO`): the writes then exit as usual.
    pub fn coalesce_pio(&self, kvm: &Kvm, port: u16, len: u32) -> Result<bool, VmError> {
        if !kvm.check_extension(kvm_ioctls::Cap::CoalescedPio) {
            return Ok(false);
        }
        self.fd
            .register_coalesced_mmio(kvm_ioctls::IoEventAddress::Pio(u64::from(port)), len)
            .map_err(kvm_err("KVM_REGISTER_COALESCED_MMIO"))?;
        Ok(true)
    }

    /// The raw VM file descriptor wrapper.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
