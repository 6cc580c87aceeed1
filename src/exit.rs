//! Why the VM stops, and how any thread asks the event loop to stop it.
//!
//! Devices (the i8042 reset line, the ACPI sleep register), vCPU threads (triple fault,
//! KVM errors), the console (Ctrl-A x) and signal handlers all report through one
//! [`ExitNotifier`]: the first reason recorded wins, and an eventfd wakes the event loop.

use std::fmt;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Exit status: the guest powered off or rebooted.
pub const EXIT_OK: i32 = 0;
/// Exit status: a runtime error in microvm or KVM.
pub const EXIT_RUNTIME_ERROR: i32 = 1;
/// Exit status: bad command-line usage.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: the guest stopped before every `--expect` pattern had appeared.
pub const EXIT_EXPECT_UNMET: i32 = 121;
/// Exit status: with `--junit`, a KTAP/TAP test failed or never reported, or there were
/// no results at all.
pub const EXIT_TESTS_FAILED: i32 = 122;
/// Exit status: a `--fail-on` pattern appeared on the console.
pub const EXIT_FAIL_ON: i32 = 123;
/// Exit status: `--timeout` expired (the habit of GNU timeout).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status: the guest kernel panicked.
pub const EXIT_GUEST_PANIC: i32 = 125;
/// Exit status base for a fatal host signal (128 + signal number, as shells report it).
pub const EXIT_SIGNAL_BASE: i32 = 128;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest reset the machine (i8042 reset line, ACPI reset register, triple fault).
    Reset,
    /// The guest kernel panicked; the text is the panic line.
    GuestPanic(String),
    /// The guest wrote this exit code to the exit-code register (port 0xf4 or MMIO
    /// 0xc000_0000).
    GuestExit(u8),
    /// Every `--expect` pattern appeared on the console, in order.
    ExpectMet,
    /// The guest stopped before every `--expect` pattern had appeared.
    ExpectUnmet {
        /// How many had appeared.
        matched: usize,
        /// The first that had not.
        missing: String,
        /// Why the guest stopped.
        stopped: Box<ExitReason>,
    },
    /// A `--fail-on` pattern appeared on the console.
    FailOn(String),
    /// `--timeout` expired.
    Timeout(std::time::Duration),
    /// With `--junit`: the guest stopped cleanly but a KTAP/TAP test failed or never
    /// reported (or no test reported at all).
    TestsFailed {
        /// Test cases seen.
        tests: usize,
        /// `not ok` results.
        failures: usize,
        /// Tests without a result.
        errors: usize,
        /// Why the guest stopped.
        stopped: Box<ExitReason>,
    },
    /// The user asked to quit from the console (Ctrl-A x).
    UserQuit,
    /// A host signal (SIGTERM, SIGINT, SIGHUP) asked microvm to stop.
    Signal(i32),
    /// microvm or KVM failed while the guest ran.
    Error(String),
}

impl ExitReason {
    /// A short stable name for reports (`--report`).
    pub fn kind(&self) -> &'static str {
        match self {
            ExitReason::PowerOff => "poweroff",
            ExitReason::Reset => "reset",
            ExitReason::GuestPanic(_) => "panic",
            ExitReason::GuestExit(_) => "guest-exit",
            ExitReason::ExpectMet => "expect-met",
            ExitReason::ExpectUnmet { .. } => "expect-unmet",
            ExitReason::FailOn(_) => "fail-on",
            ExitReason::Timeout(_) => "timeout",
            ExitReason::TestsFailed { .. } => "tests-failed",
            ExitReason::UserQuit => "user-quit",
            ExitReason::Signal(_) => "signal",
            ExitReason::Error(_) => "error",
        }
    }

    /// True when the guest's run failed (its test, its kernel, or the expectations on its
    /// console): microvm then shows the console's last lines on stderr.
    pub fn is_guest_failure(&self) -> bool {
        match self {
            ExitReason::GuestExit(code) => *code != 0,
            ExitReason::GuestPanic(_)
            | ExitReason::ExpectUnmet { .. }
            | ExitReason::FailOn(_)
            | ExitReason::TestsFailed { .. }
            | ExitReason::Timeout(_) => true,
            _ => false,
        }
    }

    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff
            | ExitReason::Reset
            | ExitReason::UserQuit
            | ExitReason::ExpectMet => EXIT_OK,
            ExitReason::GuestExit(code) => i32::from(*code),
            ExitReason::ExpectUnmet { .. } => EXIT_EXPECT_UNMET,
            ExitReason::FailOn(_) => EXIT_FAIL_ON,
            ExitReason::Timeout(_) => EXIT_TIMEOUT,
            ExitReason::TestsFailed { .. } => EXIT_TESTS_FAILED,
            ExitReason::GuestPanic(_) => EXIT_GUEST_PANIC,
            ExitReason::Signal(sig) => EXIT_SIGNAL_BASE + sig,
            ExitReason::Error(_) => EXIT_RUNTIME_ERROR,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "guest powered off"),
            ExitReason::Reset => write!(f, "guest rebooted"),
            ExitReason::GuestPanic(line) => write!(f, "guest kernel panic: {line}"),
            ExitReason::GuestExit(code) => write!(f, "guest exit code {code} (exit-code register)"),
            ExitReason::ExpectMet => write!(f, "every --expect pattern appeared"),
            ExitReason::ExpectUnmet {
                matched,
                missing,
                stopped,
            } => write!(
                f,
                "{stopped} before --expect {missing:?} appeared ({matched} of the patterns before it did)"
            ),
            ExitReason::FailOn(p) => write!(f, "--fail-on {p:?} appeared on the console"),
            ExitReason::Timeout(d) => write!(
                f,
                "--timeout {} expired",
                crate::host::units::format_duration(*d)
            ),
            ExitReason::TestsFailed {
                tests: 0, stopped, ..
            } => {
                write!(
                    f,
                    "{stopped}, and no KTAP/TAP test result appeared on the console"
                )
            }
            ExitReason::TestsFailed {
                tests,
                failures,
                errors,
                stopped,
            } => write!(
                f,
                "{stopped}, and {failures} of {tests} KTAP/TAP tests failed, {errors} never reported"
            ),
            ExitReason::UserQuit => write!(f, "quit from the console"),
            ExitReason::Signal(sig) => write!(f, "stopped by signal {sig}"),
            ExitReason::Error(msg) => write!(f, "{msg}"),
        }
    }
}

/// Shared by every thread that may end the VM. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct ExitNotifier {
    inner: Arc<Inner>,
}

struct Inner {
    reason: Mutex<Option<ExitReason>>,
    panic: Mutex<Option<String>>,
    event: EventFd,
}

impl ExitNotifier {
    /// Creates a notifier with a fresh non-blocking eventfd.
    pub fn new() -> std::io::Result<ExitNotifier> {
        Ok(ExitNotifier {
            inner: Arc::new(Inner {
                reason: Mutex::new(None),
                panic: Mutex::new(None),
                event: EventFd::new(libc::EFD_NONBLOCK)?,
            }),
        })
    }

    /// Records `reason` unless one was recorded already, and wakes the event loop.
    pub fn exit(&self, reason: ExitReason) {
        if let Ok(mut slot) = self.inner.reason.lock() {
            slot.get_or_insert(reason);
        }
        // A full eventfd counter still wakes the loop, so a failed write loses nothing.
        let _ = self.inner.event.write(1);
    }

    /// Records that the guest kernel panicked (seen on its console). A reset or power-off
    /// that follows is then reported as the panic.
    pub fn note_panic(&self, line: String) {
        if let Ok(mut p) = self.inner.panic.lock() {
            p.get_or_insert(line);
        }
    }

    /// The reason to report: the recorded one, with a reset or power-off that followed a
    /// panic reported as the panic.
    pub fn reason(&self) -> Option<ExitReason> {
        let reason = self.inner.reason.lock().ok().and_then(|r| r.clone())?;
        let panic = self.inner.panic.lock().ok().and_then(|p| p.clone());
        Some(match (reason, panic) {
            (ExitReason::Reset | ExitReason::PowerOff, Some(line)) => ExitReason::GuestPanic(line),
            (reason, _) => reason,
        })
    }

    /// The eventfd the event loop watches.
    pub fn event(&self) -> &EventFd {
        &self.inner.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let n = ExitNotifier::new().unwrap();
        n.exit(ExitReason::PowerOff);
        n.exit(ExitReason::Reset);
        assert_eq!(n.reason(), Some(ExitReason::PowerOff));
        assert_eq!(n.event().read().unwrap(), 2);
    }

    #[test]
    fn panic_explains_the_reset_after_it() {
        let n = ExitNotifier::new().unwrap();
        n.note_panic("Kernel panic - not syncing: x".into());
        assert_eq!(n.reason(), None);
        n.exit(ExitReason::Reset);
        assert_eq!(n.reason().unwrap().exit_code(), EXIT_GUEST_PANIC);
        let m = ExitNotifier::new().unwrap();
        m.note_panic("p".into());
        m.exit(ExitReason::UserQuit);
        assert_eq!(m.reason(), Some(ExitReason::UserQuit));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ExitReason::PowerOff.exit_code(), 0);
        assert_eq!(ExitReason::Signal(15).exit_code(), 143);
        assert_eq!(ExitReason::Error("x".into()).exit_code(), 1);
        assert_eq!(ExitReason::GuestExit(0).exit_code(), 0);
        assert_eq!(ExitReason::GuestExit(3).exit_code(), 3);
        assert_eq!(ExitReason::GuestExit(255).exit_code(), 255);
        assert_eq!(ExitReason::ExpectMet.exit_code(), 0);
        assert_eq!(ExitReason::FailOn("BUG:".into()).exit_code(), 123);
        assert_eq!(
            ExitReason::Timeout(std::time::Duration::from_secs(5)).exit_code(),
            124
        );
        let unmet = ExitReason::ExpectUnmet {
            matched: 1,
            missing: "done".into(),
            stopped: Box::new(ExitReason::PowerOff),
        };
        assert_eq!(unmet.exit_code(), 121);
        assert_eq!(
            unmet.to_string(),
            "guest powered off before --expect \"done\" appeared (1 of the patterns before it did)"
        );
    }

    #[test]
    fn guest_failures() {
        assert!(ExitReason::GuestExit(1).is_guest_failure());
        assert!(!ExitReason::GuestExit(0).is_guest_failure());
        assert!(ExitReason::Timeout(std::time::Duration::from_secs(1)).is_guest_failure());
        assert!(ExitReason::GuestPanic("p".into()).is_guest_failure());
        assert!(!ExitReason::PowerOff.is_guest_failure());
        assert!(!ExitReason::Error("x".into()).is_guest_failure());
        assert_eq!(ExitReason::FailOn("x".into()).kind(), "fail-on");
    }
}
