//! Builds a running VM from a [`VmConfig`], one function per boot step.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::kernel_probe;
use crate::arch::x86_64::layout::{
    ACPI_PM_PORT_LEN, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT, COM1_IRQ, COM1_PORT,
    COM1_PORT_LEN, DEBUG_MMIO_SIZE, DEBUG_MMIO_START, DEBUG_PORT, DEBUG_PORT_LEN, I8042_PORT,
    I8042_PORT_LEN, VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::arch::x86_64::{acpi, boot, cpuid, regs};
use crate::ci::console_checks::ConsoleChecks;
use crate::ci::ktap::KtapWatch;
use crate::ci::panic_watch::PanicWatch;
use crate::cli::config::{BootSource, ConfigError, DefaultConsole, VmConfig};
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::debug_port::{BootTimer, DebugPort};
use crate::devices::i8042::I8042;
use crate::devices::uart::{Uart, UartFrontend};
use crate::devices::virtio::VirtioInterrupt;
use crate::devices::virtio::console::{Console, ConsoleFrontend, ConsoleTxHandler, RX_QUEUE};
use crate::devices::virtio::mmio::{MmioError, MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::exit::ExitNotifier;
use crate::host::term;
use crate::mux::{ConsoleSpec, Frontend, Hub, HubWriter, MuxError};
use crate::vmm::seccomp::{SeccompError, SeccompStart};
use crate::vmm::{Consoles, RunChecks, Vmm};
use crate::vstate::bus::{Bus, BusError};
use crate::vstate::coalesced::{CoalescedFlush, CoalescedRing};
use crate::vstate::memory::{self, GuestMemory};
use crate::vstate::vcpu::{self, Buses, StopFlag};
use crate::vstate::vm::{self, Vm};

/// Where tiny real-mode guests are loaded and started.
pub const REAL_MODE_ENTRY: u16 = 0x1000;

/// Errors building the VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration does not fit this host (a usage error).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The host's KVM is PVM and the kernel is an ordinary one.
    #[error(
        "this host's KVM is PVM (kvm_pvm), which boots only PVM guest kernels, and {0} is an ordinary kernel that would hang; run microvm on a host with VT-x/AMD-V, inside the nested rig (make run), or pass --pvm-guest if it is a PVM guest kernel"
    )]
    PvmHost(String),
    /// KVM set-up failed.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// Guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Loading the guest failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Writing ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// vCPU register set-up failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// The vCPUs' CPUID could not be built.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// vCPU threads could not start.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// A console hub could not be set up (a socket path in use, a missing directory...).
    #[error(transparent)]
    Console(#[from] MuxError),
    /// A signal handler could not be installed.
    #[error(transparent)]
    Signals(#[from] crate::vmm::signals::SignalError),
    /// The seccomp filters could not be built or their SIGSYS handler installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// `--send-after` could not be set up.
    #[error(transparent)]
    SendAfter(#[from] crate::ci::send_after::SendAfterError),
    /// Two devices claim the same addresses (a bug).
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// The virtio-mmio transport refused its device (a bug).
    #[error("virtio-mmio: {0}")]
    Virtio(#[from] MmioError),
    /// A host resource (eventfd, epoll) could not be created.
    #[error("cannot create {what}: {source}")]
    Host {
        /// Which resource.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A KVM vCPU ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
}

impl BuildError {
    /// True when the user must change the command line (exit status 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            BuildError::Config(_)
                | BuildError::Console(MuxError::FdBudget(_))
                | BuildError::Boot(
                    boot::BootError::CmdlineTooLong { .. } | boot::BootError::InitrdTooLarge { .. }
                )
        )
    }
}

fn host_err(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |source| BuildError::Host { what, source }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

/// Refuses, in one line, to boot an ordinary kernel on a PVM host.
fn check_pvm(boot: &BootSource) -> Result<(), BuildError> {
    if let BootSource::Linux {
        kernel, pvm_guest, ..
    } = boot
    {
        let looks_pvm = boot::kernel_version_string(kernel)
            .is_some_and(|v| v.to_ascii_lowercase().contains("pvm"));
        if !pvm_guest && !looks_pvm && vm::HostKvm::detect() == vm::HostKvm::Pvm {
            return Err(BuildError::PvmHost(kernel.display().to_string()));
        }
    }
    Ok(())
}

/// Opens KVM and checks the configuration against what it supports.
fn open_kvm(config: &VmConfig) -> Result<Kvm, BuildError> {
    let kvm = vm::open_kvm()?;
    crate::cli::config::check_vcpus(config.vcpus, kvm.get_max_vcpus())?;
    Ok(kvm)
}

/// Loads the guest image(s) and boot structures; returns the boot vCPU's entry point and
/// whether it starts in long mode.
fn load_guest(
    mem: &GuestMemory,
    config: &VmConfig,
    acpi_devices: &[acpi::AcpiDevice],
) -> Result<(u64, bool), BuildError> {
    match &config.boot {
        BootSource::Linux {
            kernel,
            initrd,
            cmdline,
            ..
        } => {
            let k = boot::load_kernel(mem, kernel)?;
            // The default console, when the image decides it: scanned where the kernel
            // now lies uncompressed, else read from the file.
            let cmdline = cmdline.render(|| {
                DefaultConsole::for_kernel(&match k.image {
                    Some((start, len)) => kernel_probe::probe_loaded(mem, start, len),
                    None => kernel_probe::probe(kernel),
                })
            });
            let rd = initrd
                .as_deref()
                .map(|p| boot::load_initrd(mem, &k, p))
                .transpose()?;
            boot::load_command_line(mem, &k, &cmdline)?;
            let rsdp = acpi::write_tables(mem, config.vcpus, acpi_devices)?;
            boot::write_zero_page(mem, &k, cmdline.len(), rd, rsdp)?;
            regs::write_boot_tables(mem)?;
            Ok((k.entry.0, true))
        }
        BootSource::RealMode { image } => {
            boot::load_raw(mem, image, u64::from(REAL_MODE_ENTRY))?;
            Ok((u64::from(REAL_MODE_ENTRY), false))
        }
    }
}

/// Creates a console hub for `spec`, watched for guest panics, by the run's
/// `--expect`/`--fail-on` checks and by the KTAP parser (`--junit`, `--report`).
fn create_hub(
    spec: &ConsoleSpec,
    consoles: &Consoles,
    exit: &ExitNotifier,
    checks: &ConsoleChecks,
    ktap: Option<&KtapWatch>,
) -> Result<Arc<Mutex<Hub>>, BuildError> {
    let quit = consoles.quit.try_clone().map_err(host_err("eventfd"))?;
    let mut hub = Hub::new(spec, quit)?;
    let mut watch = PanicWatch::new(exit.clone());
    hub.add_observer(Box::new(move |chunk| watch.observe(chunk)));
    if !checks.is_empty() {
        hub.add_observer(checks.observer());
    }
    if let Some(k) = ktap {
        hub.add_observer(k.observer());
    }
    Ok(Arc::new(Mutex::new(hub)))
}

/// Creates the console hubs: `--console`, and `--serial` when the UART has its own.
fn create_consoles(
    config: &VmConfig,
    exit: &ExitNotifier,
    checks: &ConsoleChecks,
    ktap: Option<&KtapWatch>,
) -> Result<Consoles, BuildError> {
    // Every socket client needs a file descriptor: check the limit before any exists.
    let clients =
        config.console.max_clients() + config.serial.as_ref().map_or(0, ConsoleSpec::max_clients);
    crate::mux::check_fd_budget(clients).map_err(MuxError::from)?;
    let mut consoles = Consoles {
        hubs: Vec::new(),
        quit: EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("eventfd"))?,
    };
    let console = create_hub(&config.console, &consoles, exit, checks, ktap)?;
    consoles.hubs.push(console);
    if let Some(serial) = &config.serial {
        let hub = create_hub(serial, &consoles, exit, checks, ktap)?;
        consoles.hubs.push(hub);
    }
    Ok(consoles)
}

/// Creates the 16550 UART on the last hub (the `--serial` hub if there is one).
fn create_uart(vm: &Vm, consoles: &Consoles, pio: &mut Bus) -> Result<(), BuildError> {
    let Some(hub) = consoles.hubs.last() else {
        return Ok(());
    };
    let mut hub = hub.lock().unwrap_or_else(|p| p.into_inner());
    let irq = vm.irqfd(COM1_IRQ)?;
    let drained = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("eventfd"))?);
    let uart = hub.attach_frontend("ttyS0", |out| {
        let uart = Arc::new(Mutex::new(Uart::new(irq, drained.clone(), out)));
        let input: Box<dyn Frontend> = Box::new(UartFrontend::new(uart.clone(), drained));
        (input, uart)
    })?;
    pio.insert(u64::from(COM1_PORT), u64::from(COM1_PORT_LEN), uart)?;
    Ok(())
}

/// Creates the legacy devices on the port-I/O bus, and the test-guest device on both
/// buses (ports 0xf4-0xf5 and an MMIO page).
fn create_devices(
    vm: &Vm,
    exit: &ExitNotifier,
    consoles: &Consoles,
    timer: &Arc<BootTimer>,
    mmio: &mut Bus,
) -> Result<Bus, BuildError> {
    let mut pio = Bus::new();
    create_uart(vm, consoles, &mut pio)?;
    let debug = Arc::new(Mutex::new(DebugPort::new(exit.clone(), timer.clone())));
    pio.insert(
        u64::from(DEBUG_PORT),
        u64::from(DEBUG_PORT_LEN),
        debug.clone(),
    )?;
    mmio.insert(DEBUG_MMIO_START, DEBUG_MMIO_SIZE, debug)?;
    pio.insert(
        u64::from(I8042_PORT),
        u64::from(I8042_PORT_LEN),
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;
    pio.insert(
        u64::from(ACPI_SLEEP_CONTROL_PORT),
        u64::from(ACPI_PM_PORT_LEN),
        Arc::new(Mutex::new(AcpiPm::new(exit.clone(), ACPI_RESET_VALUE))),
    )?;
    Ok(pio)
}

/// The virtio console as built here: output to a console hub, interrupts through an irqfd.
type VirtioConsole = Console<HubWriter, Arc<VirtioInterrupt>>;

/// Creates the virtio console (hvc0) on a virtio-mmio window at `VIRTIO_MMIO_START` with
/// interrupt `VIRTIO_IRQ_BASE`: irqfd for the interrupt, one ioeventfd per queue at
/// QueueNotify (datamatch = queue index), the transmit handler on the event loop, the
/// transport on `mmio`, and the device as the `--console` hub's "hvc0" frontend.
fn create_virtio_console(
    vm: &Vm,
    mem: &GuestMemory,
    consoles: &Consoles,
    mmio: &mut Bus,
    event_manager: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
) -> Result<(), BuildError> {
    let Some(hub) = consoles.hubs.first() else {
        return Ok(());
    };
    let mut hub = hub.lock().unwrap_or_else(|p| p.into_inner());
    let interrupt = VirtioInterrupt::new(vm.irqfd(VIRTIO_IRQ_BASE)?);
    let tty_size = term::terminal_size(libc::STDOUT_FILENO);
    let rx_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("eventfd"))?);
    let tx_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("eventfd"))?;
    // The receive queue's notifications only say "buffers posted": an ioeventfd. The
    // transmit queue's exit to the vCPU thread, which uses the buffers at once (the
    // guest's hvc driver spins until it does); `tx_evt` hands leftovers to the event loop.
    let notify = IoEventAddress::Mmio(VIRTIO_MMIO_START + QUEUE_NOTIFY_OFFSET);
    vm.fd()
        .register_ioevent(rx_evt.as_ref(), &notify, RX_QUEUE as u32)
        .map_err(kvm_err("KVM_IOEVENTFD"))?;
    let tx_continue = tx_evt.try_clone().map_err(host_err("eventfd"))?;
    // Pacing: the device leaves transmit chains queued while the hub is congested; the
    // hub kicks the transmit handler to look again once its consumers have caught up.
    let resume = tx_evt.try_clone().map_err(host_err("eventfd"))?;
    let console: Arc<Mutex<VirtioConsole>> = hub.attach_frontend("hvc0", |out| {
        let mut console = Console::new(out, interrupt.clone());
        if let Some((cols, rows)) = tty_size {
            console.set_size(cols, rows);
        }
        console.set_input_ready_event(rx_evt.clone());
        console.set_tx_continue_event(tx_continue);
        let console = Arc::new(Mutex::new(console));
        let frontend: Box<dyn Frontend> = Box::new(ConsoleFrontend::new(
            console.clone(),
            rx_evt.clone(),
            resume,
        ));
        (frontend, console)
    })?;
    // The guest's hvc0 follows the host terminal's size (VIRTIO_CONSOLE_F_SIZE).
    if tty_size.is_some() {
        let resized = console.clone();
        let watcher = term::ResizeWatcher::new(
            crate::vmm::signals::resize_events()?,
            libc::STDOUT_FILENO,
            Box::new(move |cols, rows| {
                if let Ok(mut c) = resized.lock() {
                    c.set_size(cols, rows);
                }
            }),
        );
        event_manager.add_subscriber(Arc::new(Mutex::new(watcher)));
    }
    let transport = MmioTransport::new(console.clone(), mem.clone(), interrupt)?;
    mmio.insert(
        VIRTIO_MMIO_START,
        VIRTIO_MMIO_SIZE,
        Arc::new(Mutex::new(transport)),
    )?;
    let tx_handler = ConsoleTxHandler::new(console.clone(), tx_evt).map_err(host_err("timerfd"))?;
    event_manager.add_subscriber(Arc::new(Mutex::new(tx_handler)));
    Ok(())
}

/// The DSDT entry through which ACPI kernels find the virtio console.
fn virtio_console_acpi() -> acpi::AcpiDevice {
    acpi::AcpiDevice {
        name: "VR00".into(),
        hid: "LNRO0005",
        uid: 0,
        mmio_base: VIRTIO_MMIO_START as u32,
        mmio_len: VIRTIO_MMIO_SIZE as u32,
        irq: VIRTIO_IRQ_BASE,
    }
}

/// Creates and configures the vCPUs (CPUID, MSRs, FPU, LAPIC; the boot vCPU's entry).
fn create_vcpus(
    kvm: &Kvm,
    vm: &Vm,
    config: &VmConfig,
    entry: (u64, bool),
) -> Result<Vec<VcpuFd>, BuildError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let features = cpuid::KvmCpuFeatures {
        tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
    };
    let mut fds = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let vcpu_cpuid =
            cpuid::for_vcpu(&supported, &cpuid::NativeCpuid, features, id, config.vcpus)?;
        fd.set_cpuid2(&vcpu_cpuid)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        regs::setup_msrs(&fd)?;
        regs::setup_fpu(&fd)?;
        regs::setup_lapic(&fd)?;
        if id == 0 {
            match entry {
                (rip, true) => regs::setup_long_mode(&fd, rip)?,
                (rip, false) => regs::setup_real_mode(&fd, rip as u16)?,
            }
        }
        fds.push(fd);
    }
    Ok(fds)
}

/// Has KVM queue the guest's writes to the UART's transmit holding register in the
/// coalesced ring instead of exiting for each byte (`vstate::coalesced`), when this KVM
/// can. The ring is mapped first: a registered range nobody reads would lose output.
fn coalesce_uart_output(
    kvm: &Kvm,
    vm: &Vm,
    vcpu: &VcpuFd,
) -> Result<Option<Arc<CoalescedRing>>, BuildError> {
    if !kvm.check_extension(Cap::CoalescedPio) {
        return Ok(None);
    }
    let ring = CoalescedRing::map(vcpu).map_err(host_err("the coalesced I/O ring"))?;
    if !vm.coalesce_pio(kvm, COM1_PORT, 1)? {
        return Ok(None);
    }
    Ok(Some(Arc::new(ring)))
}

/// Starts the vCPU threads (with `seccomp`, each installs its filter and waits at the gate
/// before it first enters the guest) and keeps the event loop off their CPUs.
fn start_vcpus(
    fds: Vec<VcpuFd>,
    config: &VmConfig,
    buses: &Buses,
    exit: &ExitNotifier,
    stop: &StopFlag,
    seccomp: Option<&SeccompStart>,
) -> Result<Vec<vcpu::VcpuHandle>, BuildError> {
    let mut handles = Vec::with_capacity(fds.len());
    for (id, fd) in fds.into_iter().enumerate() {
        handles.push(vcpu::spawn(
            id as u8,
            fd,
            buses.clone(),
            exit.clone(),
            stop.clone(),
            config.vcpu_affinity.clone(),
            seccomp.map(SeccompStart::confine_vcpu),
        )?);
    }
    // The calling thread runs the event loop: keep it off the vCPUs' CPUs when others
    // are left, so that a vCPU spinning in the guest never delays the device work it
    // waits for.
    let others: Vec<usize> = (0..crate::cli::config::host_cpus())
        .filter(|c| !config.vcpu_affinity.is_empty() && !config.vcpu_affinity.contains(c))
        .collect();
    if let Err(e) = vcpu::pin_current_thread(&others) {
        log::warn!("cannot pin the event loop to host CPUs {others:?}: {e}; running unpinned");
    }
    Ok(handles)
}

/// Builds the VM described by `config` and starts its vCPUs. `started` is microvm's
/// start, from which the boot timer and `--timeout` count.
pub fn build(config: &VmConfig, started: Instant) -> Result<Vmm, BuildError> {
    let kvm = open_kvm(config)?;
    let mem = memory::create(config.memory)?;
    let vm = Vm::new(&kvm, &mem)?;
    vm.setup_irqchip()?;
    let exit = ExitNotifier::new().map_err(host_err("exit eventfd"))?;
    // Before any console exists: the terminal is restored on every exit path from the
    // moment raw mode can be entered.
    crate::vmm::signals::install_for_vm(&exit, config.seccomp)?;
    let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(|e| host_err("epoll")(std::io::Error::other(format!("{e:?}"))))?;
    let acpi_devices: Vec<acpi::AcpiDevice> = config
        .virtio_console
        .then(virtio_console_acpi)
        .into_iter()
        .collect();
    let entry = load_guest(&mem, config, &acpi_devices)?;
    // After loading, so that a missing or garbage kernel is reported as such first.
    check_pvm(&config.boot)?;
    // Consoles last: bad input must not leave a socket or log file behind.
    let checks = ConsoleChecks::new(&config.checks.expect, &config.checks.fail_on, exit.clone());
    let ktap =
        (config.checks.junit.is_some() || config.checks.report.is_some()).then(KtapWatch::new);
    let consoles = create_consoles(config, &exit, &checks, ktap.as_ref())?;
    let send_after = match consoles.hubs.first() {
        Some(hub) => {
            let mut hub = hub.lock().unwrap_or_else(|p| p.into_inner());
            crate::ci::send_after::attach(&mut hub, &config.checks.send_after)?
        }
        None => Default::default(),
    };
    let timer = BootTimer::new(started);
    let mut mmio = Bus::new();
    let pio = create_devices(&vm, &exit, &consoles, &timer, &mut mmio)?;
    if config.virtio_console {
        create_virtio_console(&vm, &mem, &consoles, &mut mmio, &mut event_manager)?;
    }
    let fds = create_vcpus(&kvm, &vm, config, entry)?;
    let mut buses = Buses {
        pio,
        mmio,
        coalesced: None,
    };
    if let Some(fd) = fds.first() {
        buses.coalesced = coalesce_uart_output(&kvm, &vm, fd)?;
    }
    if let Some(ring) = &buses.coalesced {
        let target = buses.clone();
        let flush = CoalescedFlush::new(ring.clone(), move |w| target.deliver(w))
            .map_err(host_err("timerfd"))?;
        event_manager.add_subscriber(Arc::new(Mutex::new(flush)));
    }
    let stop = StopFlag::default();
    // Everything is set up: from here on each thread may do only what its filter allows.
    // The vCPU threads wait at the gate until `Vmm::run` has filtered the event loop.
    let seccomp = if config.seccomp {
        Some(SeccompStart::new(usize::from(config.vcpus))?)
    } else {
        None
    };
    let vcpus = start_vcpus(fds, config, &buses, &exit, &stop, seccomp.as_ref())?;
    for hub in &consoles.hubs {
        event_manager.add_subscriber(hub.clone());
    }
    Ok(Vmm::new(
        event_manager,
        vcpus,
        stop,
        exit,
        consoles,
        RunChecks {
            checks,
            timer,
            timeout: config.checks.timeout,
            ktap,
            junit: config.checks.junit.is_some(),
            send_after,
        },
        (vm, mem),
        seccomp,
    ))
}
