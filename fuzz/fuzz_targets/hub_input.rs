//! Input chunks from several sources through the hub's input serializer and the Ctrl-A
//! escape parser (input format and properties: `microvm::mux::hub::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = microvm::mux::hub::fuzzing::run(data);
});
