//! microvm: a small, fast KVM virtual machine monitor with a console multiplexer.
//!
//! The crate in layers, each using only the ones listed before it (no import cycles
//! between top-level modules; `tests/layout.rs` checks it, docs/ARCHITECTURE.md draws it):
//!
//! | module | responsibility |
//! |---|---|
//! | [`host`] | logger, size/duration grammars, files microvm creates, the terminal |
//! | [`exit`] | every reason a VM stops, exit statuses, the one funnel ([`exit::ExitNotifier`]) |
//! | [`arch`] | x86_64: memory layout, boot protocol, registers, CPUID, ACPI, kernel probe |
//! | [`vstate`] | KVM state: guest memory, the VM, vCPU threads (`handle_exit`), the buses |
//! | [`mux`] | the console hub: WHERE A BYTE FANS OUT, its backends, `microvm attach` |
//! | [`devices`] | UART, i8042, ACPI PM, debug port, virtio-mmio and the virtio console |
//! | [`ci`] | test guests: console checks, panic watch, KTAP -> JUnit, report, `microvm run` |
//! | [`cli`] | clap types and the validated [`cli::config::VmConfig`] they become |
//! | [`vmm`] | the VM core: builder, event loop, signals, seccomp |
//!
//! `main.rs` is parse -> build -> run -> report -> exit status.

/// The cursor over fuzz input the fuzz harnesses share (feature `fuzzing` only).
#[cfg(feature = "fuzzing")]
mod fuzz_input;

pub mod host;

pub mod exit;

pub mod arch;

pub mod vstate;

pub mod mux;

pub mod devices;

pub mod ci;

pub mod cli;

pub mod vmm;
