//! Guest register reads and writes and host input against the 16550 UART (input format
//! and properties: `microvm::devices::uart::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = microvm::devices::uart::fuzzing::run(data);
});
