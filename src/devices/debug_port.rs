//! The test-guest device: an exit-code register and a boot-timer register, for guests
//! that run tests in CI. Two windows onto the same registers:
//!
//! | register | I/O port | MMIO (physical) | a write of N |
//! |---|---|---|---|
//! | exit code | `0xf4` (QEMU's isa-debug-exit habit) | `0xc000_0000` | microvm stops the VM, flushes every console backend, exits with status N (its low byte) |
//! | boot timer | `0xf5` | `0xc000_0001` | records the time since microvm's start (the first write counts) for `--boot-timer` and `--report` |
//!
//! From a busybox shell, no compiler needed: `devmem` writes physical memory through
//! /dev/mem, which distro kernels allow for MMIO outside RAM (Debian's has no /dev/port):
//!
//! ```sh
//! devmem 0xc0000001 8 1          # boot timer: init reached
//! devmem 0xc0000000 8 3          # exit with status 3
//! ```

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::exit::{ExitNotifier, ExitReason};
use crate::vstate::bus::BusDevice;

/// Offset of the exit-code register (port 0xf4, MMIO 0xc000_0000) in the device's range.
const EXIT_OFFSET: u64 = 0;
/// Offset of the boot-timer register (port 0xf5, MMIO 0xc000_0001).
const BOOT_TIMER_OFFSET: u64 = 1;

/// When the guest said its init was reached, counted from microvm's start.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    reached: OnceLock<Duration>,
}

impl BootTimer {
    /// A timer counting from `start` (microvm's process start).
    pub fn new(start: Instant) -> Arc<BootTimer> {
        Arc::new(BootTimer {
            start,
            reached: OnceLock::new(),
        })
    }

    /// Records now as the moment init was reached, unless it was recorded already.
    pub fn mark(&self) {
        let _ = self.reached.set(self.start.elapsed());
    }

    /// The time from microvm's start to the guest's first boot-timer write.
    pub fn boot_time(&self) -> Option<Duration> {
        self.reached.get().copied()
    }

    /// Time since microvm started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// The exit-code and boot-timer registers (on the port bus at 0xf4, on the MMIO bus at
/// 0xc000_0000).
pub struct DebugPort {
    exit: ExitNotifier,
    timer: Arc<BootTimer>,
}

impl DebugPort {
    /// Reports exit codes to `exit` and boot-timer marks to `timer`.
    pub fn new(exit: ExitNotifier, timer: Arc<BootTimer>) -> Self {
        DebugPort { exit, timer }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.first()) {
            (EXIT_OFFSET, Some(&code)) => self.exit.exit(ExitReason::GuestExit(code)),
            (BOOT_TIMER_OFFSET, Some(_)) => self.timer.mark(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_port() {
        let n = ExitNotifier::new().unwrap();
        let mut d = DebugPort::new(n.clone(), BootTimer::new(Instant::now()));
        d.write(EXIT_OFFSET, &[]);
        assert_eq!(n.reason(), None);
        d.write(EXIT_OFFSET, &[3]);
        assert_eq!(n.reason(), Some(ExitReason::GuestExit(3)));
        assert_eq!(n.reason().unwrap().exit_code(), 3);
    }

    #[test]
    fn boot_timer_keeps_the_first_mark() {
        let n = ExitNotifier::new().unwrap();
        let t = BootTimer::new(Instant::now());
        let mut d = DebugPort::new(n.clone(), t.clone());
        assert_eq!(t.boot_time(), None);
        d.write(BOOT_TIMER_OFFSET, b"x");
        let first = t.boot_time().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        d.write(BOOT_TIMER_OFFSET, b"x");
        assert_eq!(t.boot_time(), Some(first));
        assert!(first <= t.elapsed());
        assert_eq!(n.reason(), None, "the timer never stops the VM");
        let mut b = [9u8; 2];
        d.read(0, &mut b);
        assert_eq!(b, [0, 0]);
    }
}
