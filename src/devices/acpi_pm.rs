//! ACPI hardware-reduced power management registers: the sleep control register (the FADT's
//! SLEEP_CONTROL_REG; S5 = power off), the sleep status register and the reset register.
//!
//! Layout (port offsets from `ACPI_SLEEP_CONTROL_PORT`): 0 sleep control, 1 sleep status,
//! 2 reset. The DSDT's `_S5` package gives SLP_TYP = [`S5_SLEEP_TYPE`].

use crate::arch::x86_64::layout::S5_SLEEP_TYPE;
use crate::exit::{ExitNotifier, ExitReason};
use crate::vstate::bus::BusDevice;

const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u8 = 1 << 5;
const CONTROL_OFFSET: u64 = 0;
const RESET_OFFSET: u64 = 2;

/// The power-management block.
pub struct AcpiPm {
    exit: ExitNotifier,
    reset_value: u8,
}

impl AcpiPm {
    /// Reports power-off and reset to `exit`; `reset_value` is the FADT's RESET_VALUE.
    pub fn new(exit: ExitNotifier, reset_value: u8) -> Self {
        AcpiPm { exit, reset_value }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS never set (we never wake from sleep); the rest read 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            CONTROL_OFFSET
                if value & SLP_EN != 0
                    && (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLEEP_TYPE =>
            {
                self.exit.exit(ExitReason::PowerOff)
            }
            RESET_OFFSET if value == self.reset_value => self.exit.exit(ExitReason::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off() {
        let n = ExitNotifier::new().unwrap();
        let mut pm = AcpiPm::new(n.clone(), 1);
        pm.write(CONTROL_OFFSET, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]); // no SLP_EN
        pm.write(1, &[0x80]); // clearing WAK_STS
        pm.write(CONTROL_OFFSET, &[(3 << SLP_TYP_SHIFT) | SLP_EN]); // S3: ignored
        assert_eq!(n.reason(), None);
        pm.write(CONTROL_OFFSET, &[(S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN]);
        assert_eq!(n.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn reset_register() {
        let n = ExitNotifier::new().unwrap();
        let mut pm = AcpiPm::new(n.clone(), 1);
        pm.write(RESET_OFFSET, &[2]);
        assert_eq!(n.reason(), None);
        pm.write(RESET_OFFSET, &[1]);
        assert_eq!(n.reason(), Some(ExitReason::Reset));
    }
}
