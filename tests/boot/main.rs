//! Boot tier (docs/TESTING.md): boot the reference Linux guest (Debian cloud kernel + our
//! busybox initramfs, prepared by `scripts/guest.sh`) with the real `microvm` binary.
//!
//! `harness = false`: this `main()` picks where the cases run (harness.rs).
//! - `MICROVM_RIG=inner` (we are inside the rig's L1) or a host whose KVM boots ordinary
//!   kernels (`direct`): run every case here.
//! - otherwise (`nested`, e.g. a PVM host): re-run this very executable inside the nested
//!   rig, `scripts/rig.sh --payload <this exe> -- /rig/<exe name> ARGS`, booting L1 once
//!   for all cases, streaming its output and propagating its status.
//!
//! `MICROVM_RIG=direct|nested|inner` decides; without it the binary under test does
//! (`microvm kvm-mode`, the one KVM-mode detection the scripts use too).
//!
//! Environment: `MICROVM_BIN` (default: the cargo-built binary), `MICROVM_KERNEL`,
//! `MICROVM_INITRD` (default: `$MICROVM_CACHE/guest/…`), `MICROVM_RIG=direct|nested|inner`,
//! `MICROVM_TEST_TIMEOUT` (seconds per wait; default 180 in the rig, 60 direct),
//! `MICROVM_TEST_REPEAT` (run each case N times, for flake hunting),
//! `MICROVM_TEST_BUDGET` (seconds for the whole suite, default 720; cases left when it is
//! spent fail), `MICROVM_RIG_ARGS` (extra scripts/rig.sh options in nested mode).
//! Output follows libtest's format; argv: first non-flag argument is a substring filter,
//! `--exact`, `--skip S`, `--list` are honoured, other libtest flags are ignored.
//!
//! Files: harness.rs (arguments, where the cases run, the watchdog), prepare.rs (the
//! guest and the CI example), vm.rs (one microvm process, a socket client), cases_*.rs
//! (the cases), tprog.rs (a host program for `microvm run`); helpers shared with the
//! host tier are in ../common.

use std::env;
use std::time::Instant;

use harness::{Mode, mode, parse_args, result_line, run_cases, run_nested, selected};
use prepare::{prepare_ci_example, prepare_guest_on_host};
use vm::Ctx;

type CaseFn = fn(&Ctx) -> Result<(), String>;

mod cases_boot;
mod cases_ci;
mod cases_console;
mod cases_run;
#[path = "../common/mod.rs"]
mod common;
mod harness;
mod prepare;
mod vm;

/// Every case, in run order.
fn all_cases() -> Vec<(&'static str, CaseFn)> {
    [
        cases_boot::CASES,
        cases_console::CASES,
        cases_ci::CASES,
        cases_run::CASES,
        cases_ci::LAST,
        cases_run::LAST,
        cases_boot::LAST,
    ]
    .concat()
}

pub const INIT_MARK: &str = "microvm-guest: init reached";
pub const SHELL_MARK: &str = "microvm-guest: shell ready";

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let opts = parse_args(&args);
    let cases = selected(&opts);
    let filtered = all_cases().len() - cases.len();
    if opts.list {
        for (name, _) in &cases {
            println!("{name}: test");
        }
        println!("\n{} tests, 0 benchmarks", cases.len());
        return;
    }
    let start = Instant::now();
    if cases.is_empty() {
        println!(
            "\nrunning 0 tests\n\n{}\n",
            result_line(0, 0, filtered, start)
        );
        return;
    }
    let code = match mode() {
        Ok(Mode::Inner) => run_cases(&cases, filtered, true),
        Ok(Mode::Direct) => {
            prepare_guest_on_host();
            prepare_ci_example();
            run_cases(&cases, filtered, false)
        }
        Ok(Mode::Nested(why)) => run_nested(&args, &cases, filtered, &why),
        Err(e) => {
            // Not knowing where the cases can run fails them all, loudly.
            println!("boot: where to run the cases: {e}");
            println!("\n{}\n", result_line(0, cases.len(), filtered, start));
            101
        }
    };
    std::process::exit(code);
}
