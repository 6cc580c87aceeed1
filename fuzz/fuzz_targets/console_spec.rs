//! The console-spec parser, the values of --console and --serial (input format and
//! properties: `microvm::mux::spec::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = microvm::mux::spec::fuzzing::run(data);
});
