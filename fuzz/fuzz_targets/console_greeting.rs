//! A network console client's first bytes, split into reads, through the code that takes
//! the token line and judges it (input format and properties:
//! `microvm::mux::auth::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = microvm::mux::auth::fuzzing::run(data);
});
