//! microvm's entry point: parse -> build -> run -> report -> exit status.

use std::io::Write;
use std::time::Instant;

use clap::Parser;

use microvm::cli::{Cli, Command};
use microvm::config::{Checks, VmConfig};
use microvm::exit::{EXIT_RUNTIME_ERROR, EXIT_USAGE, ExitReason};
// Every line goes through the logger: one line whatever it quotes, never blocking on a
// stderr nobody reads, never panicking on a closed one.
use microvm::logging::final_line;
use microvm::report;
use microvm::vmm::Outcome;

fn main() {
    let started = Instant::now();
    microvm::logging::init();
    let cli = Cli::parse();
    if let Some(Command::Attach(a)) = cli.command {
        microvm::signals::install_for_client();
        let code = microvm::mux::attach(&a.options()).unwrap_or_else(|e| {
            final_line(&e.to_string());
            EXIT_RUNTIME_ERROR
        });
        std::process::exit(code);
    }
    if cli.run.print_default_cmdline {
        // The line `--cmdline-replace` stands in for, for the console set-up asked for.
        let line = if cli.run.no_virtio_console {
            microvm::config::DEFAULT_CMDLINE
        } else {
            microvm::config::DEFAULT_CMDLINE_VIRTIO
        };
        let status = match writeln!(std::io::stdout(), "{line}") {
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
    let vmm = match microvm::builder::build(&config, started) {
        Ok(v) => v,
        Err(e) => {
            final_line(&e.to_string());
            let code = if e.is_usage() {
                EXIT_USAGE
            } else {
                EXIT_RUNTIME_ERROR
            };
            let reason = ExitReason::Error(e.to_string());
            finish(&config.checks, &reason, code, None);
        }
    };
    let outcome = vmm.run();
    let code = outcome.reason.exit_code();
    if code != 0 {
        final_line(&outcome.reason.to_string());
    }
    show_outcome(&config, &outcome);
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
            microvm::logging::final_raw(&format!("  | {l}"));
        }
    }
}

/// Writes the `--report` (if asked) and exits with `code`.
fn finish(checks: &Checks, reason: &ExitReason, code: i32, outcome: Option<&Outcome>) -> ! {
    if let Some(path) = &checks.report {
        let text = report::render(checks, reason, code, outcome);
        if let Err(e) = report::write_atomic(path, &text) {
            final_line(&e.to_string());
            if code == 0 {
                std::process::exit(EXIT_RUNTIME_ERROR);
            }
        }
    }
    std::process::exit(code);
}
