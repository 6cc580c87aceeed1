//! microvm's entry point: parse -> build -> run -> exit status.

use clap::Parser;

use microvm::cli::{Cli, Command};
use microvm::exit::{EXIT_RUNTIME_ERROR, EXIT_USAGE};
// Errors quote paths and values as given: one line on stderr whatever they contain.
use microvm::mux::spec::one_line;

fn main() {
    let cli = Cli::parse();
    if let Some(Command::Attach { socket, read_only }) = cli.command {
        let code = microvm::mux::attach(&socket, read_only).unwrap_or_else(|e| {
            eprintln!("microvm: {}", one_line(&e.to_string()));
            EXIT_RUNTIME_ERROR
        });
        std::process::exit(code);
    }
    if cli.run.print_default_cmdline {
        println!("{}", microvm::config::DEFAULT_CMDLINE);
        return;
    }
    let config = match cli.run.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("microvm: {}", one_line(&e.to_string()));
            std::process::exit(EXIT_USAGE);
        }
    };
    let vmm = match microvm::builder::build(&config) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("microvm: {}", one_line(&e.to_string()));
            std::process::exit(if e.is_usage() {
                EXIT_USAGE
            } else {
                EXIT_RUNTIME_ERROR
            });
        }
    };
    let reason = vmm.run();
    let code = reason.exit_code();
    if code != 0 {
        eprintln!("microvm: {}", one_line(&reason.to_string()));
    }
    std::process::exit(code);
}
