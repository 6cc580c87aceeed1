//! microvm's entry point: parse -> build -> run -> exit status.

use clap::Parser;

use microvm::cli::{Cli, Command};
use microvm::exit::{EXIT_RUNTIME_ERROR, EXIT_USAGE};

fn main() {
    let cli = Cli::parse();
    if let Some(Command::Attach { socket, read_only }) = cli.command {
        let code = microvm::mux::attach(&socket, read_only).unwrap_or_else(|e| {
            eprintln!("microvm: {e}");
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
            eprintln!("microvm: {e}");
            std::process::exit(EXIT_USAGE);
        }
    };
    let vmm = match microvm::builder::build(&config) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("microvm: {e}");
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
        eprintln!("microvm: {reason}");
    }
    std::process::exit(code);
}
