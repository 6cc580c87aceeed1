//! The VM core: the builder (one function per boot step), the running VM (the event loop
//! on the main thread, and an orderly shutdown), every process-wide signal disposition,
//! and the per-thread seccomp filters.
//!
//! | module | job |
//! |---|---|
//! | `builder` | `VmConfig` -> a running [`Vmm`], one function per boot step and device |
//! | this file | the event loop, the stop of the vCPUs, drain and shutdown of the hubs |
//! | `signals` | every disposition, installed once in a documented order |
//! | `seccomp` | per-thread allowlists (vCPU, event loop), the SIGSYS report |

pub mod builder;
pub mod seccomp;
pub mod signals;

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use vmm_sys_util::eventfd::EventFd;

use crate::ci::Outcome;
use crate::ci::console_checks::ConsoleChecks;
use crate::ci::ktap::{self, KtapWatch};
use crate::devices::debug_port::BootTimer;
use crate::exit::{ExitNotifier, ExitReason};
use crate::mux::Hub;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::{StopFlag, VcpuHandle};
use crate::vstate::vm::Vm;
use seccomp::ThreadKind;

/// How long the event loop sleeps at most between checks of the exit state.
const LOOP_TIMEOUT_MS: i32 = 500;
/// How long a vCPU thread may take to leave KVM_RUN once kicked.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// The console hubs, and the eventfd their escape key (Ctrl-A x) writes to quit.
pub struct Consoles {
    /// `--console` first, then the `--serial` hub if any.
    pub hubs: Vec<Arc<Mutex<Hub>>>,
    /// Written by a hub when the user quits from the console.
    pub quit: EventFd,
}

/// Wakes the event loop when any thread requests an exit, a signal arrives, or the user
/// quits from a console.
struct ExitWatcher {
    exit: ExitNotifier,
    quit: EventFd,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.quit.as_raw_fd() {
            let _ = self.quit.read();
            self.exit.exit(ExitReason::UserQuit);
            return;
        }
        let _ = self.exit.event().read();
        if let Some(sig) = crate::vmm::signals::stop_signal() {
            self.exit.exit(ExitReason::Signal(sig));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.exit.event(), EventSet::IN));
        let _ = ops.add(Events::new(&self.quit, EventSet::IN));
    }
}

/// What decides a test guest's verdict: the console checks, the boot timer, the timeout.
pub struct RunChecks {
    /// `--expect` / `--fail-on`.
    pub checks: ConsoleChecks,
    /// Counts from microvm's start; the guest marks init reached on its boot-timer
    /// register (port 0xf5, MMIO 0xc000_0001).
    pub timer: Arc<BootTimer>,
    /// `--timeout`, counted from microvm's start.
    pub timeout: Option<Duration>,
    /// The KTAP/TAP parsers (with `--junit` or `--report`).
    pub ktap: Option<KtapWatch>,
    /// `--junit`: failed or missing test results fail the run.
    pub junit: bool,
    /// `--send-after` steps done so far.
    pub send_after: crate::ci::send_after::Progress,
}

/// A running VM.
pub struct Vmm {
    event_manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    vcpus: Vec<VcpuHandle>,
    stop: StopFlag,
    exit: ExitNotifier,
    hubs: Vec<Arc<Mutex<Hub>>>,
    checks: RunChecks,
    /// The filters and the vCPUs' start gate, when seccomp is on: `run` installs the
    /// event loop's filter, then opens the gate.
    seccomp: Option<seccomp::SeccompStart>,
    // Kept alive until the vCPUs have stopped: KVM maps guest memory from these.
    _guest: (Vm, GuestMemory),
}

impl Vmm {
    /// Wraps the parts the builder made.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mut event_manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
        vcpus: Vec<VcpuHandle>,
        stop: StopFlag,
        exit: ExitNotifier,
        consoles: Consoles,
        checks: RunChecks,
        guest: (Vm, GuestMemory),
        seccomp: Option<seccomp::SeccompStart>,
    ) -> Vmm {
        event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
            exit: exit.clone(),
            quit: consoles.quit,
        })));
        Vmm {
            event_manager,
            vcpus,
            stop,
            exit,
            hubs: consoles.hubs,
            checks,
            seccomp,
            _guest: guest,
        }
    }

    /// Runs the event loop until the VM ends; stops the vCPUs and returns how it ended.
    /// With seccomp, the main thread installs the event-loop filter first, then lets the
    /// vCPU threads (filtered and waiting) enter the guest; it stays under the filter
    /// afterwards (writing the report, exiting).
    pub fn run(mut self) -> Outcome {
        if let Some(start) = self.seccomp.take() {
            let installed = seccomp::install(&start.filters, ThreadKind::EventLoop, "event-loop");
            drop(start.filters);
            #[cfg(feature = "test-hooks")]
            crate::host::test_hooks::violate_seccomp_if_asked(ThreadKind::EventLoop.name());
            start.gate.wait();
            if let Err(e) = installed {
                self.exit.exit(ExitReason::Error(e.to_string()));
            }
        } else {
            #[cfg(feature = "test-hooks")]
            crate::host::test_hooks::violate_seccomp_if_asked(ThreadKind::EventLoop.name());
        }
        while self.exit.reason().is_none() {
            let mut wait_ms = LOOP_TIMEOUT_MS;
            if let Some(limit) = self.checks.timeout {
                let left = limit.saturating_sub(self.checks.timer.elapsed());
                if left.is_zero() {
                    self.exit.exit(ExitReason::Timeout(limit));
                    break;
                }
                // Round up: waking just before the deadline would spin.
                wait_ms = wait_ms.min(i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX));
            }
            // A panic in a device or the hub stops the VM (the panic hook recorded the
            // reason) instead of unwinding past the shutdown below.
            let em = &mut self.event_manager;
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                #[cfg(feature = "test-hooks")]
                crate::host::test_hooks::panic_if_asked(ThreadKind::EventLoop.name());
                em.run_with_timeout(wait_ms)
            }));
            match ran {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => self
                    .exit
                    .exit(ExitReason::Error(format!("event loop failed: {e:?}"))),
                Err(_) => self.exit.exit(ExitReason::Error(
                    "internal error: the event loop panicked".into(),
                )),
            }
            self.checks.checks.poll();
        }
        self.stop.set();
        for v in &mut self.vcpus {
            v.stop_and_join(VCPU_STOP_TIMEOUT);
        }
        // Deliver what the guest wrote before it stopped (and let the panic watch see it),
        // then flush lossless backends, remove socket files and restore the terminal.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.event_manager.run_with_timeout(0)
        }));
        let mut consoles = Vec::with_capacity(self.hubs.len());
        for hub in &self.hubs {
            let mut hub = hub.lock().unwrap_or_else(|p| p.into_inner());
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hub.shutdown()));
            consoles.push((hub.stats(), hub.history()));
        }
        let reason = self
            .exit
            .reason()
            .unwrap_or_else(|| ExitReason::Error("VM stopped for no recorded reason".into()));
        let reason = self.checks.checks.verdict(reason);
        let tests = self.checks.ktap.as_ref().map(|k| k.finish(&reason));
        let reason = match &tests {
            Some(t) if self.checks.junit => ktap::verdict(reason, t),
            _ => reason,
        };
        Outcome {
            reason,
            tests,
            send_after_done: self
                .checks
                .send_after
                .load(std::sync::atomic::Ordering::Relaxed),
            boot_time: self.checks.timer.boot_time(),
            wall_time: self.checks.timer.elapsed(),
            expect_progress: self.checks.checks.expect_progress(),
            consoles,
        }
    }
}
