//! Random register writes and queue contents against the virtio console and its
//! virtio-mmio transport (format: `microvm::devices::virtio::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    microvm::devices::virtio::fuzzing::run(data);
});
