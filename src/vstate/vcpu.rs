//! vCPU threads: `KVM_RUN` in a loop, each exit handed to [`handle_exit`], which routes
//! port I/O and MMIO to the buses and turns shutdowns and failures into an [`ExitReason`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, register_signal_handler};

use super::coalesced::{CoalescedRing, QueuedWrite};
use crate::exit::{ExitNotifier, ExitReason};
use crate::vstate::bus::Bus;

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Errors starting vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be spawned.
    #[error("cannot start vCPU thread {id}: {source}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The buses a vCPU's exits are routed to.
#[derive(Clone)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
    /// The VM's coalesced-write ring, when some range is coalesced: drained before any
    /// exit is handled.
    pub coalesced: Option<Arc<CoalescedRing>>,
}

impl Buses {
    /// Hands one write KVM queued in the coalesced ring to its bus.
    pub fn deliver(&self, w: QueuedWrite) {
        let data = &w.data[..w.len];
        if w.pio {
            self.pio.write(w.addr, data);
        } else {
            self.mmio.write(w.addr, data);
        }
    }

    /// Delivers every write queued in the coalesced ring; returns how many.
    pub fn drain_coalesced(&self) -> usize {
        self.coalesced
            .as_ref()
            .map_or(0, |ring| ring.drain(|w| self.deliver(w)))
    }
}

/// A vCPU's exits to microvm, by kind, and the coalesced writes it delivered.
/// `MICROVM_EXIT_STATS=1` prints them (one stderr line per vCPU) when the vCPU stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// Every other exit (HLT, shutdown, signals...).
    pub other: u64,
    /// Writes KVM queued in the coalesced ring instead of exiting, VM-wide (the ring is
    /// one per VM), as of when this vCPU stopped.
    pub coalesced: u64,
}

impl ExitCounts {
    fn count(&mut self, exit: &VcpuExit<'_>) {
        match exit {
            VcpuExit::IoIn(..) => self.io_in += 1,
            VcpuExit::IoOut(..) => self.io_out += 1,
            VcpuExit::MmioRead(..) => self.mmio_read += 1,
            VcpuExit::MmioWrite(..) => self.mmio_write += 1,
            _ => self.other += 1,
        }
    }

    /// The stats line (see [`EXIT_STATS_ENV`]).
    pub fn line(&self, vcpu_id: u8) -> String {
        format!(
            "vcpu{vcpu_id} exits: io_in={} io_out={} mmio_read={} mmio_write={} other={} coalesced_writes={}",
            self.io_in, self.io_out, self.mmio_read, self.mmio_write, self.other, self.coalesced
        )
    }
}

/// Set to 1 to have each vCPU print its [`ExitCounts`] when it stops.
pub const EXIT_STATS_ENV: &str = "MICROVM_EXIT_STATS";

/// What the vCPU loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Enter the guest again.
    Continue,
    /// Stop this vCPU: the VM is ending for the given reason.
    Stop(ExitReason),
}

/// Routes one vCPU exit. A free function over plain values so it can be tested without a
/// guest. Accesses no device decodes read as all ones and are otherwise ignored, as on a
/// real bus.
pub fn handle_exit(exit: VcpuExit<'_>, buses: &Buses, vcpu_id: u8) -> ExitAction {
    // Writes KVM queued before this exit reach their devices first (see
    // `vstate::coalesced`): the device sees every access in the guest's order.
    buses.drain_coalesced();
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            buses.pio.write(u64::from(port), data);
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            buses.mmio.write(addr, data);
            ExitAction::Continue
        }
        // A triple fault: real hardware resets. Linux may reboot this way on purpose
        // (reboot=t), but it is also how an early crash looks: say so.
        VcpuExit::Shutdown => {
            log::warn!(
                "vCPU {vcpu_id}: triple fault (KVM_EXIT_SHUTDOWN); treated as a guest reset"
            );
            ExitAction::Stop(ExitReason::Reset)
        }
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop(ExitReason::PowerOff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(ExitReason::Reset),
            kvm_bindings::KVM_SYSTEM_EVENT_CRASH => {
                ExitAction::Stop(ExitReason::GuestPanic(format!("vCPU {vcpu_id} crashed")))
            }
            other => ExitAction::Stop(ExitReason::Error(format!(
                "vCPU {vcpu_id}: unexpected KVM system event {other}"
            ))),
        },
        // Without an in-kernel irqchip (tiny test guests) HLT with interrupts off ends the run.
        VcpuExit::Hlt => ExitAction::Stop(ExitReason::PowerOff),
        VcpuExit::Intr => ExitAction::Continue,
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Stop(ExitReason::Error(format!(
            "vCPU {vcpu_id}: KVM could not enter the guest (hardware reason {reason:#x}, host cpu {cpu})"
        ))),
        VcpuExit::InternalError => ExitAction::Stop(ExitReason::Error(format!(
            "vCPU {vcpu_id}: KVM internal error (often an unsupported guest instruction)"
        ))),
        other => ExitAction::Stop(ExitReason::Error(format!(
            "vCPU {vcpu_id}: unexpected KVM exit {other:?}"
        ))),
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick signal handler; `KVM_RUN` then returns `EINTR` when kicked.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::SignalHandler)
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: Option<JoinHandle<()>>,
    done: Arc<AtomicBool>,
}

/// Tells every vCPU thread to stop.
#[derive(Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// Requests the stop.
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Pins the calling thread to `cpus` (no-op when empty).
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: CPU_SET writes one bit inside `set`; `c` was checked against the host's
        // CPU count, far below CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; `set` is a live, initialized cpu_set_t.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A vCPU thread's stack. Less than a huge page on purpose: with transparent huge pages
/// always on, a 2 MiB stack that happens to be 2 MiB-aligned is backed by one huge page
/// on first touch, 2 MiB of RSS for a few KiB of use. Exit handling (device emulation,
/// the virtio console's transmit path) needs far less.
const VCPU_STACK_SIZE: usize = 512 << 10;

/// Confines the calling vCPU thread (the VM core's seccomp filter for vCPU threads), given
/// the thread's name for its messages. The VM core passes it in, so this layer knows
/// nothing of seccomp.
pub type Confine = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What a vCPU thread does before it first enters the guest, when seccomp is on.
#[derive(Clone)]
pub struct ConfinedStart {
    /// Installs the thread's filter.
    pub confine: Confine,
    /// Released by the event loop once its own filter is in, so that no guest code runs
    /// while any thread of microvm is still unfiltered (and no filter is compiled into
    /// the kernel while a vCPU is in the guest).
    pub gate: Arc<Barrier>,
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Starts vCPU `id` on its own thread, pinned to `cpus` when not empty. With `confine`,
/// the thread installs its filter and waits at the gate before its first `KVM_RUN`.
pub fn spawn(
    id: u8,
    mut vcpu: VcpuFd,
    buses: Buses,
    exit: ExitNotifier,
    stop: StopFlag,
    cpus: Vec<usize>,
    confine: Option<ConfinedStart>,
) -> Result<VcpuHandle, VcpuError> {
    let done = Arc::new(AtomicBool::new(false));
    let done_thread = done.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .stack_size(VCPU_STACK_SIZE)
        .spawn(move || {
            // Marks the thread done however it ends, a panic included, so that
            // `stop_and_join` never waits for a thread that is gone.
            let _done = SetOnDrop(done_thread);
            if let Err(e) = pin_current_thread(&cpus) {
                log::warn!("vCPU {id}: cannot pin to host CPUs {cpus:?}: {e}; running unpinned");
            }
            if let Some(start) = confine {
                let installed = (start.confine)(&format!("vcpu{id}"));
                drop(start.confine);
                // Always arrive, or the event loop would wait forever.
                start.gate.wait();
                if let Err(e) = installed {
                    exit.exit(ExitReason::Error(format!("vCPU {id}: {e}")));
                    return;
                }
            }
            #[cfg(feature = "test-hooks")]
            {
                crate::host::test_hooks::violate_seccomp_if_asked("vcpu");
                crate::host::test_hooks::panic_if_asked("vcpu");
            }
            let mut counts = ExitCounts::default();
            while !stop.is_set() {
                let action = match vcpu.run() {
                    Ok(exit) => {
                        counts.count(&exit);
                        let shutdown = matches!(exit, VcpuExit::Shutdown);
                        let action = handle_exit(exit, &buses, id);
                        if shutdown {
                            log::warn!("vCPU {id} at the triple fault: {}", guest_state(&vcpu));
                        }
                        action
                    }
                    Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                        ExitAction::Continue
                    }
                    Err(e) => ExitAction::Stop(ExitReason::Error(format!(
                        "vCPU {id}: KVM_RUN failed: {e}"
                    ))),
                };
                if let ExitAction::Stop(reason) = action {
                    exit.exit(reason);
                    break;
                }
            }
            // A guest that ran out of time is often stuck: say where, for whoever debugs it.
            if let Some(ExitReason::Timeout(_)) = exit.reason() {
                log::warn!("vCPU {id} when the time ran out: {}", guest_state(&vcpu));
            }
            // What the guest wrote last reaches its device before the VM is torn down.
            buses.drain_coalesced();
            if let Some(ring) = &buses.coalesced {
                counts.coalesced = ring.delivered();
            }
            if std::env::var(EXIT_STATS_ENV).is_ok_and(|v| v == "1") {
                log::info!("{}", counts.line(id));
            }
        })
        .map_err(|source| VcpuError::Spawn { id, source })?;
    Ok(VcpuHandle {
        thread: Some(thread),
        done,
    })
}

/// Where the guest was, in one line: what a triple fault (an early crash, a broken
/// stack or IDT) is debugged from. Read-only ioctls the vCPU filter allows. On AMD,
/// KVM resets the vCPU when it reports the shutdown (the VMCB is undefined after one),
/// so all that is left is the reset state: said so instead of printing it.
fn guest_state(vcpu: &VcpuFd) -> String {
    let (r, s) = match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => (r, s),
        (Err(e), _) | (_, Err(e)) => return format!("unknown, its registers are unreadable ({e})"),
    };
    if (r.rip, s.cs.selector, s.cr0 & 1) == (0xfff0, 0xf000, 0) {
        return "unknown, KVM had already reset the vCPU (on AMD it does so at a shutdown)".into();
    }
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}+{:#x}",
        r.rip,
        r.rsp,
        r.rflags,
        r.rax,
        s.cs.selector,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer,
        s.idt.base,
        s.idt.limit
    )
}

impl VcpuHandle {
    /// Kicks the thread out of `KVM_RUN` until it has seen the stop flag, then joins it.
    /// Gives up after `timeout` (the thread is then left to die with the process).
    pub fn stop_and_join(&mut self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while !self.done.load(Ordering::SeqCst) {
            if let Some(t) = &self.thread {
                // The signal can arrive before KVM_RUN is entered; we retry until done.
                let _ = t.kill(kick_signal());
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::bus::BusDevice;
    use std::sync::Mutex;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    fn buses() -> Buses {
        let mut pio = Bus::new();
        pio.insert(0x3f8, 8, Arc::new(Mutex::new(Echo(0)))).unwrap();
        Buses {
            pio,
            mmio: Bus::new(),
            coalesced: None,
        }
    }

    #[test]
    fn guest_state_is_read_from_the_vcpu() {
        let kvm = kvm_ioctls::Kvm::new().expect("these tests need /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        (regs.rip, regs.rsp) = (0x1234, 0x5678);
        vcpu.set_regs(&regs).unwrap();
        let line = guest_state(&vcpu);
        for want in ["rip=0x1234 ", "rsp=0x5678 ", "cr0=", "idt="] {
            assert!(line.contains(want), "{want} in {line}");
        }
        // The reset state (what AMD leaves after a shutdown) is not presented as where
        // the guest was.
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.selector = 0xf000;
        sregs.cr0 = 0x6000_0010;
        vcpu.set_sregs(&sregs).unwrap();
        regs.rip = 0xfff0;
        vcpu.set_regs(&regs).unwrap();
        assert!(
            guest_state(&vcpu).starts_with("unknown"),
            "{}",
            guest_state(&vcpu)
        );
    }

    #[test]
    fn port_io_reaches_the_device() {
        let b = buses();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, &[0x41]), &b, 0),
            ExitAction::Continue
        );
        let mut data = [0u8];
        handle_exit(VcpuExit::IoIn(0x3f8, &mut data), &b, 0);
        assert_eq!(data[0], 0x41);
    }

    #[test]
    fn unclaimed_reads_are_all_ones() {
        let b = buses();
        let mut data = [0u8; 2];
        handle_exit(VcpuExit::IoIn(0x70, &mut data), &b, 0);
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut data), &b, 0);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn shutdowns_stop() {
        let b = buses();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &b, 0),
            ExitAction::Stop(ExitReason::Reset)
        );
        assert_eq!(
            handle_exit(
                VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN, &[]),
                &b,
                0
            ),
            ExitAction::Stop(ExitReason::PowerOff)
        );
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, &b, 1),
            ExitAction::Stop(ExitReason::Error(_))
        ));
    }
}
