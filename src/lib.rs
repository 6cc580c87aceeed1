//! microvm: a small, fast KVM virtual machine monitor with a console multiplexer.
//!
//! Map: [`cli`] (clap) -> [`config`] (validated [`config::VmConfig`]) -> [`builder`] (one
//! function per boot step) -> [`vmm`] (event loop, shutdown). KVM state lives in
//! [`vstate`], x86 boot details in [`arch`], emulated devices in [`devices`]; per-thread
//! seccomp filters in [`seccomp`].

pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod console_checks;
pub mod devices;
pub mod exit;
pub mod files;
mod fuzz_input;
pub mod initramfs;
pub mod junit;
pub mod kernel_probe;
pub mod ktap;
pub mod logging;
pub mod mux;
pub mod panic_watch;
pub mod report;
pub mod run_program;
pub mod seccomp;
pub mod send_after;
pub mod signals;
#[cfg(test)]
mod test_util;
pub mod units;
pub mod vmm;
pub mod vstate;
