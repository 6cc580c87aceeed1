//! Console bytes through the KTAP/TAP parser and the JUnit writer (input format and
//! properties: `microvm::ci::ktap::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let clean = data.first().is_some_and(|b| b & 1 == 0);
    let _ = microvm::ci::ktap::fuzzing::check(data, clean);
});
