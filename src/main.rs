//! microvm's entry point: parse -> build -> run -> report -> exit status.

use std::io::Write;
use std::time::Instant;

use clap::Parser;

use microvm::ci::{Checks, Outcome};
use microvm::cli::config::VmConfig;
use microvm::cli::{Cli, Command};
use microvm::exit::{EXIT_RUNTIME_ERROR, EXIT_USAGE, ExitReason};
// Errors quote paths and values as given: one line on stderr whatever they contain.
// Every line goes through the logger: one line whatever it quotes, never blocking on a
// stderr nobody reads, never panicking on a closed one.
use microvm::ci::report;
use microvm::host::logging::{final_line, final_raw};

fn main() {
    let started = Instant::now();
    microvm::host::logging::init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Attach(a)) => {
            microvm::vmm::signals::install_for_client();
            let code = microvm::mux::attach(&a.options()).unwrap_or_else(|e| {
                final_line(&e.to_string());
                EXIT_RUNTIME_ERROR
            });
            std::process::exit(code);
        }
        Some(Command::KvmMode) => {
            let kvm = microvm::vstate::vm::HostKvm::detect();
            final_line(&format!("kvm-mode: {}", kvm.reason()));
            let mode = if kvm.boots_linux() {
                "direct"
            } else {
                "nested"
            };
            let status = match writeln!(std::io::stdout(), "{mode}") {
                Ok(()) => 0,
                Err(_) => EXIT_RUNTIME_ERROR,
            };
            std::process::exit(status);
        }
        Some(Command::Run(run)) => match microvm::cli::run::prepare(&run) {
            // The memfd holding the initramfs stays open until the process exits.
            Ok((config, _initramfs)) => boot(&config, started),
            Err(e) => {
                let checks = run.vm.to_config().map(|c| c.checks).unwrap_or_default();
                refuse_start(&checks, &e.to_string(), e.is_usage());
            }
        },
        None => {}
    }
    if cli.run.print_default_cmdline {
        // The line microvm boots with for these options (and --kernel, when given).
        let status = match writeln!(std::io::stdout(), "{}", cli.run.cmdline_line()) {
            Ok(()) => 0,
            Err(_) => EXIT_RUNTIME_ERROR,
        };
        std::process::exit(status);
    }
    let config = match cli.run.to_config() {
        Ok(c) => c,
        Err(e) => {
            final_line(&e.to_string());
            std::process::exit(EXIT_USAGE);
        }
    };
    boot(&config, started);
}

/// The VM could not start: one line on stderr, the report (if asked), exit 2 for a usage
/// error and 1 for another.
fn refuse_start(checks: &Checks, msg: &str, usage: bool) -> ! {
    final_line(msg);
    let code = if usage {
        EXIT_USAGE
    } else {
        EXIT_RUNTIME_ERROR
    };
    finish(checks, &ExitReason::Error(msg.to_string()), code, None);
}

/// Builds and runs the VM, reports, and exits with the run's status.
fn boot(config: &VmConfig, started: Instant) -> ! {
    let vmm = match microvm::vmm::builder::build(config, started) {
        Ok(v) => v,
        Err(e) => refuse_start(&config.checks, &e.to_string(), e.is_usage()),
    };
    let outcome = vmm.run();
    let code = outcome.reason.exit_code();
    if code != 0 {
        final_line(&outcome.reason.to_string());
    }
    show_outcome(config, &outcome);
    finish(&config.checks, &outcome.reason, code, Some(&outcome));
}

/// The boot timer and, when the guest's run failed, the console's last lines on stderr.
fn show_outcome(config: &VmConfig, outcome: &Outcome) {
    if config.checks.boot_timer {
        match outcome.boot_time {
            Some(t) => final_line(&format!(
                "boot time: {:.1} ms (microvm start to the guest's boot-timer write)",
                t.as_secs_f64() * 1000.0
            )),
            None => final_line(
                "boot time: unknown: the guest never wrote to the boot-timer register (0xc0000001 or port 0xf5)",
            ),
        }
    }
    let n = config.checks.tail_lines;
    if !outcome.reason.is_guest_failure() || n == 0 {
        return;
    }
    show_failed_tests(outcome);
    if let Some(line) =
        microvm::ci::send_after::waiting_for(&config.checks.send_after, outcome.send_after_done)
    {
        final_line(&line);
    }
    for (i, (_, history)) in outcome.consoles.iter().enumerate() {
        let lines = report::tail_lines(history, n);
        if lines.is_empty() {
            continue;
        }
        let which = if i == 0 { "--console" } else { "--serial" };
        final_line(&format!(
            "last {} lines of the {which} output:",
            lines.len()
        ));
        for l in lines {
            final_raw(&format!("  | {l}"));
        }
    }
}

/// With `--junit`, the tests that failed or never reported (at most 20) on stderr.
fn show_failed_tests(outcome: &Outcome) {
    use microvm::ci::ktap::Outcome as T;
    let Some(tests) = &outcome.tests else { return };
    let failed: Vec<String> = tests
        .suites
        .iter()
        .flat_map(|s| s.cases.iter().map(move |c| (s, c)))
        .filter_map(|(s, c)| match &c.outcome {
            T::Fail(_) => Some(format!("not ok: {}: {}", s.name, c.name)),
            T::Error(m) => Some(format!("error: {}: {} ({m})", s.name, c.name)),
            _ => None,
        })
        .collect();
    for f in failed.iter().take(20) {
        final_line(f);
    }
    if failed.len() > 20 {
        final_line(&format!("... and {} more failed tests", failed.len() - 20));
    }
}

/// Writes the `--junit` file and the `--report` (if asked) and exits with `code`.
fn finish(checks: &Checks, reason: &ExitReason, code: i32, outcome: Option<&Outcome>) -> ! {
    let mut code = code;
    if let Some(path) = &checks.junit {
        let empty = microvm::ci::ktap::Results::default();
        let tests = outcome.and_then(|o| o.tests.as_ref()).unwrap_or(&empty);
        let secs = outcome.map_or(0.0, |o| o.wall_time.as_secs_f64());
        let xml = microvm::ci::junit::render(tests, "microvm", secs);
        if let Err(e) = report::write_atomic("junit", path, &xml) {
            final_line(&e.to_string());
            if code == 0 {
                code = EXIT_RUNTIME_ERROR;
            }
        }
    }
    if let Some(path) = &checks.report {
        let text = report::render(checks, reason, code, outcome);
        if let Err(e) = report::write_atomic("report", path, &text) {
            final_line(&e.to_string());
            if code == 0 {
                std::process::exit(EXIT_RUNTIME_ERROR);
            }
        }
    }
    std::process::exit(code);
}
