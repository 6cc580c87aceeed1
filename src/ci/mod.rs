//! Test guests in CI: everything that turns a console stream into a verdict and a
//! result file, and that prepares a guest to run a host program.
//!
//! | module | job |
//! |---|---|
//! | `console_checks` | `--expect` / `--fail-on`: streaming pattern matches, the run's verdict |
//! | `panic_watch` | spots "Kernel panic" in the stream (status 125) |
//! | `ktap` | KTAP/TAP parser fed the console stream (`ktap/watch.rs`: the hub observer) |
//! | `junit` | `--junit`: the parsed results as JUnit XML |
//! | `send_after` | `--send-after`: type text once a pattern has appeared |
//! | `report` | `--report` JSON and the console tail on failure |
//! | `initramfs` | in-memory newc cpio: files, shared-library closure, modules |
//! | `run_program` | `microvm run`: the initramfs and init for a host program |
//!
//! These are observers of a hub's output (they see exactly the stream the backends get,
//! in order) or producers of files; none of them touches KVM.

pub mod console_checks;
pub mod initramfs;
pub mod junit;
pub mod ktap;
pub mod panic_watch;
pub mod report;
pub mod run_program;
pub mod send_after;

use std::path::PathBuf;
use std::time::Duration;

use crate::exit::ExitReason;
use crate::mux::HubStats;

/// What decides a test guest's verdict, and what microvm reports when it ends
/// (`--expect`, `--fail-on`, `--timeout`, `--boot-timer`, `--report`, `--tail-lines`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checks {
    /// Patterns that must appear on the console, in this order; when the last has, the
    /// VM stops with status 0.
    pub expect: Vec<String>,
    /// Patterns that end the run at once with a failure when they appear.
    pub fail_on: Vec<String>,
    /// Stop the VM after this long (status 124).
    pub timeout: Option<Duration>,
    /// Print the boot time (start to the guest's boot-timer write) on stderr at exit.
    pub boot_timer: bool,
    /// Write a JSON summary here at exit.
    pub report: Option<PathBuf>,
    /// `--send-after`: texts typed into the guest once their patterns appeared.
    pub send_after: Vec<send_after::Step>,
    /// Write the console's KTAP/TAP results here as JUnit XML at exit; a failed or
    /// unreported test (or none at all) then fails the run (status 122).
    pub junit: Option<PathBuf>,
    /// Console lines shown on stderr when the guest's run fails.
    pub tail_lines: usize,
}

/// How a run ended, and what went through its consoles (for stderr and `--report`).
#[derive(Debug)]
pub struct Outcome {
    /// The verdict.
    pub reason: ExitReason,
    /// microvm's start to the guest's boot-timer write.
    pub boot_time: Option<Duration>,
    /// microvm's start to the end of the run.
    pub wall_time: Duration,
    /// `--expect` patterns seen, of how many.
    pub expect_progress: (usize, usize),
    /// Per console hub (`--console` first, then `--serial`): its traffic and the last
    /// bytes of its stream.
    pub consoles: Vec<(HubStats, Vec<u8>)>,
    /// The KTAP/TAP results on the consoles (with `--junit` or `--report`).
    pub tests: Option<ktap::Results>,
    /// `--send-after` steps that typed their text.
    pub send_after_done: usize,
}
