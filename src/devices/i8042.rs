//! A minimal i8042 keyboard controller: enough for the kernel's `reboot=k` reset, which
//! writes command 0xFE (pulse the reset line) to port 0x64.

use crate::exit::{ExitNotifier, ExitReason};
use crate::vstate::bus::BusDevice;

#[cfg(test)]
const DATA_OFFSET: u64 = 0; // port 0x60
const COMMAND_OFFSET: u64 = 4; // port 0x64
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 at ports 0x60..=0x64.
pub struct I8042 {
    exit: ExitNotifier,
}

impl I8042 {
    /// An i8042 that reports a reset to `exit`.
    pub fn new(exit: ExitNotifier) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output and input buffers empty (the kernel polls this before sending a
        // command); data reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.exit(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_exits() {
        let n = ExitNotifier::new().unwrap();
        let mut k = I8042::new(n.clone());
        k.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(n.reason(), None);
        k.write(COMMAND_OFFSET, &[0x20]);
        assert_eq!(n.reason(), None);
        k.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(n.reason(), Some(ExitReason::Reset));
    }
}
