//! The test-guest ports: an exit-code port and a boot-timer port, for guests that run
//! tests in CI.
//!
//! - `0xf4` (QEMU's isa-debug-exit habit): the guest writes a byte N; microvm stops the
//!   VM, flushes every console backend and exits with status N.
//! - `0xf5`: the guest writes any byte when its init is reached; microvm records the time
//!   since its own start (the first write counts) for `--boot-timer` and `--report`.
//!
//! From a busybox shell, no compiler needed (`/dev/port` writes each byte with `outb` at
//! the file offset):
//!
//! ```sh
//! printf '\003' | dd of=/dev/port bs=1 seek=244 count=1   # exit with status 3
//! printf x | dd of=/dev/port bs=1 seek=245 count=1        # boot timer: init reached
//! ```

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::bus::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

/// Offset of the exit-code port (0xf4) in the device's range.
const EXIT_OFFSET: u64 = 0;
/// Offset of the boot-timer port (0xf5).
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

/// The two ports at 0xf4..=0xf5.
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
