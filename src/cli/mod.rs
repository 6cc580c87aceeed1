//! The command line (clap types only) and its conversion into a [`VmConfig`].

pub mod config;
pub mod run;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::arch::x86_64::kernel_probe;
use crate::arch::x86_64::layout::MAX_VCPUS;
use crate::ci::Checks;
use crate::cli::config::{BootSource, ConfigError, DefaultConsole, VmConfig};
use crate::mux::CONSOLE_SPEC_HELP;

const EXAMPLES: &str = "\
Examples:
  Boot a kernel and initramfs with the console on this terminal:
    microvm --kernel bzImage --initrd initrd.gz
  Two vCPUs, 1 GiB, an extra kernel parameter:
    microvm --kernel bzImage --initrd initrd.gz --vcpus 2 --memory 1G --cmdline loglevel=7
  Console on the terminal and on a unix socket others can attach to:
    microvm --kernel bzImage --initrd initrd.gz --console mux:sock,stdio
    microvm attach $XDG_RUNTIME_DIR/microvm/microvm-<pid>.sock   (the path is printed)
  The same over the network, TLS and a token (head -c 24 /dev/urandom | base64 > vm.token):
    microvm ... --console mux:stdio,tcp=0.0.0.0:4444:token-file=vm.token:tls-cert=c.pem:tls-key=k.pem
    microvm attach tcp://HOST:4444 --token-file vm.token --ca ca.pem

  A CI test: pass when the guest prints ALL PASSED, fail on a panic or after 5 minutes,
  keep the log and a JSON report (the guest may also exit with a code, see below):
    microvm --kernel bzImage --initrd tests.gz --console mux:stdio,file=console.log \\
        --expect 'ALL PASSED' --fail-on 'Kernel panic' --timeout 5m --report report.json

Test-guest registers: write a byte N to physical address 0xc0000000 (or I/O port 0xf4)
and microvm exits with status N, after flushing every console backend; write one to
0xc0000001 (or port 0xf5) when init is reached, for --boot-timer. From busybox:
  devmem 0xc0000001 8 1; ...; devmem 0xc0000000 8 $status

  Kernel tests: KTAP/TAP on the console (kselftest, KUnit) to JUnit XML, failing on a
  failed test; scripted input at a login prompt; a host program in a fresh kernel:
    microvm --kernel bzImage --cmdline kunit_shutdown=poweroff --junit results.xml
    microvm --kernel bzImage --initrd distro.gz --send-after 'login: ' 'root\n'
    microvm run --kernel bzImage --modules /lib/modules/VERSION -- ./my-test arg

Exit status: 0 guest powered off or rebooted, every --expect pattern appeared, or
Ctrl-A x; 1 runtime error; 2 usage error; N the guest wrote N to its exit-code register
(microvm run: the program's status); 121 the guest stopped before every --expect pattern
appeared; 122 with --junit, a test failed or none reported; 123 a --fail-on pattern
appeared; 124 --timeout expired; 125 guest kernel panic; 128+N stopped by signal N.";

fn after_help() -> String {
    format!("{EXAMPLES}\n\n{CONSOLE_SPEC_HELP}")
}

/// microvm: a small, fast KVM virtual machine monitor with a console multiplexer.
#[derive(Debug, Parser)]
#[command(
    name = "microvm",
    version,
    about,
    after_help = after_help(),
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// Subcommands (omit to boot a VM).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// VM options.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands. Each one's options (and help text: its struct's doc comment) are built
/// only when it is invoked (`defer`): booting a VM, the common case, builds neither
/// table.
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum Command {
    /// Attach this terminal to a running VM's console (see `microvm attach --help`).
    Attach(AttachArgs),
    /// Run a host program in a fresh kernel (see `microvm run --help`).
    #[command(
        after_help = "Example:\n  microvm run --kernel /boot/vmlinuz-$(uname -r) --modules /lib/modules/$(uname -r) -- /bin/uname -a"
    )]
    Run(Box<RunCommand>),
    /// For the project's scripts and tests: prints `direct` when this host's KVM boots
    /// ordinary kernels, else `nested`, and the reason on stderr.
    #[command(hide = true)]
    KvmMode,
}

/// Run a host program in a fresh kernel: microvm builds an initramfs in memory (the
/// program, its shared libraries, busybox, --include'd files, the console's modules
/// from --modules), runs PROGRAM ARGS as the guest's workload with its output on the
/// console, and exits with its exit status.
#[derive(Debug, Args)]
pub struct RunCommand {
    /// VM options (as for booting a VM; --initrd is not taken: the initramfs is built).
    #[command(flatten)]
    pub vm: RunArgs,
    /// A host file or directory to put into the guest at its own path (repeatable);
    /// executables among them bring their shared libraries.
    #[arg(long, value_name = "PATH")]
    pub include: Vec<PathBuf>,
    /// Kernel modules (a /lib/modules/VERSION tree or a flat directory of .ko files):
    /// when the kernel has no virtio console built in, virtio_mmio and virtio_console
    /// and their dependencies are loaded from here, so the program's output goes through
    /// the fast hvc0 instead of the UART.
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,
    /// The program (a path, or a name looked up in PATH) and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    pub program: Vec<String>,
}

/// Attach this terminal to a running VM's console (a unix socket or tcp://HOST:PORT).
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The console: a unix socket path (`--console sock=PATH`) or tcp://HOST:PORT.
    pub target: String,
    /// Watch only: what you type is not sent to the guest.
    #[arg(long)]
    pub read_only: bool,
    /// Send the secret in FILE first (the console's token-file or viewer-token-file).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Speak TLS and trust the server certificate only if signed by CERT (PEM).
    #[arg(long, value_name = "CERT")]
    pub ca: Option<PathBuf>,
    /// TLS client certificate (PEM), for a console with tls-client-ca.
    #[arg(long, value_name = "CERT", requires_all = ["ca", "key"])]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "KEY", requires = "cert")]
    pub key: Option<PathBuf>,
}

impl AttachArgs {
    /// What to attach to, and how.
    pub fn options(&self) -> crate::mux::AttachOptions {
        crate::mux::AttachOptions {
            target: self.target.clone(),
            read_only: self.read_only,
            token_file: self.token_file.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// Options for booting a VM.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest kernel: a bzImage or an ELF vmlinux.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["real_mode_image", "print_default_cmdline"])]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (e.g. a gzip'd cpio).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel parameters appended to the default command line. A `console=` here is the
    /// only console: the default then names none.
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Replace the default kernel command line: the kernel gets exactly STR (and
    /// --cmdline, appended), nothing of microvm's (no console=, no virtio_mmio.device=).
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub cmdline_replace: Option<String>,
    /// Guest memory: a size with K, M, G or T suffix (plain numbers are MiB).
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_VCPUS)))]
    pub vcpus: u16,
    /// The console hub the guest's consoles attach to (see "Console spec" below).
    #[arg(long, value_name = "SPEC", default_value = "stdio")]
    pub console: String,
    /// Give the 16550 UART (ttyS0) a hub of its own instead of the --console hub.
    #[arg(long, value_name = "SPEC")]
    pub serial: Option<String>,
    /// No virtio console: the 16550 UART (ttyS0) is the guest's only console.
    #[arg(long)]
    pub no_virtio_console: bool,
    /// Pin the vCPU threads to these host CPUs (e.g. 2-3); the VMM's other threads (the
    /// event loop) then run on the remaining CPUs.
    #[arg(long, value_name = "CPUS")]
    pub vcpu_affinity: Option<String>,
    /// Stop with status 0 once PATTERN has appeared on the console (repeatable: the
    /// patterns must appear in the order given). If the guest stops first: status 121.
    #[arg(
        long,
        value_name = "PATTERN",
        allow_hyphen_values = true,
        help_heading = "Test guests (CI)"
    )]
    pub expect: Vec<String>,
    /// Stop at once with status 123 when PATTERN appears on the console (repeatable),
    /// e.g. --fail-on 'Kernel panic' --fail-on 'BUG:'.
    #[arg(
        long,
        value_name = "PATTERN",
        allow_hyphen_values = true,
        help_heading = "Test guests (CI)"
    )]
    pub fail_on: Vec<String>,
    /// Stop the guest after DURATION (e.g. 90s, 5m, 1500ms) with status 124.
    #[arg(long, value_name = "DURATION", help_heading = "Test guests (CI)")]
    pub timeout: Option<String>,
    /// Print the boot time on stderr at exit: from microvm's start to the guest's first
    /// write to the boot-timer register (0xc0000001, or port 0xf5).
    #[arg(long, help_heading = "Test guests (CI)")]
    pub boot_timer: bool,
    /// Write a JSON summary to FILE at exit (exit reason and status, guest exit code,
    /// boot time, bytes per console device and backend, socket clients).
    #[arg(long, value_name = "FILE", help_heading = "Test guests (CI)")]
    pub report: Option<PathBuf>,
    /// Read KTAP/TAP test results (kselftest, KUnit) from the console and write them to
    /// FILE as JUnit XML at exit (for GitHub, GitLab, Jenkins). A test that failed or
    /// never reported, or no test result at all, then fails the run with status 122
    /// (a guest exit code, panic, timeout or --fail-on keeps its own status).
    #[arg(long, value_name = "FILE", help_heading = "Test guests (CI)")]
    pub junit: Option<PathBuf>,
    /// Type TEXT into the guest once PATTERN has appeared on the console (repeatable: the
    /// steps run in order, each pattern looked for after the previous one's match). TEXT
    /// takes escapes: \n \r \t \e (Escape) \\ \xHH \cX (Ctrl-X), e.g.
    /// --send-after 'login: ' 'root\n' --send-after 'Password: ' 'secret\n'.
    #[arg(
        long,
        num_args = 2,
        value_names = ["PATTERN", "TEXT"],
        action = clap::ArgAction::Append,
        allow_hyphen_values = true,
        help_heading = "Test guests (CI)"
    )]
    pub send_after: Vec<String>,
    /// Console lines printed on stderr when the guest's run fails (0: none).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        help_heading = "Test guests (CI)"
    )]
    pub tail_lines: usize,
    /// Run without the seccomp filters (for debugging only). By default each vCPU thread
    /// and the event loop may make only the syscalls they need, and any other ends
    /// microvm with a one-line message naming the thread and the syscall (exit status 1).
    #[arg(long)]
    pub no_seccomp: bool,
    /// The kernel is a PVM guest kernel (CONFIG_PVM_GUEST): allow booting it on a PVM host.
    #[arg(long)]
    pub pvm_guest: bool,
    /// Print the kernel command line microvm would boot with and exit (for scripts
    /// comparing VMMs): the default for the console set-up and `--kernel` given (without
    /// `--kernel`, the line for a kernel with hvc0 built in), with `--cmdline` appended.
    #[arg(long, hide = true)]
    pub print_default_cmdline: bool,
    /// Boot a flat real-mode image at 0x1000 instead of a kernel (tiny test guests).
    #[arg(long, value_name = "PATH", hide = true, conflicts_with_all = ["initrd", "cmdline", "cmdline_replace"])]
    pub real_mode_image: Option<PathBuf>,
}

impl RunArgs {
    /// Validates the options into a [`VmConfig`].
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let bytes = config::parse_size(&self.memory)?;
        let memory = config::check_memory(&self.memory, bytes, config::host_memory())?;
        let boot = match (&self.real_mode_image, &self.kernel) {
            (Some(image), _) => BootSource::RealMode {
                image: image.clone(),
            },
            (None, kernel) => BootSource::Linux {
                kernel: kernel.clone().unwrap_or_default(),
                initrd: self.initrd.clone(),
                cmdline: self.cmdline_spec(),
                pvm_guest: self.pvm_guest,
            },
        };
        let console = config::parse_console("console", &self.console)?;
        let serial = self
            .serial
            .as_deref()
            .map(|s| config::parse_console("serial", s))
            .transpose()?;
        config::check_consoles(&console, serial.as_ref())?;
        Ok(VmConfig {
            boot,
            memory,
            // clap bounds it to 1..=MAX_VCPUS.
            vcpus: u8::try_from(self.vcpus).unwrap_or(MAX_VCPUS),
            console,
            serial,
            virtio_console: !self.no_virtio_console && self.real_mode_image.is_none(),
            vcpu_affinity: match &self.vcpu_affinity {
                Some(list) => config::parse_cpu_list(list, config::host_cpus())?,
                None => Vec::new(),
            },
            checks: self.checks()?,
            seccomp: !self.no_seccomp,
        })
    }

    /// The kernel command line as these options give it (see [`config::Cmdline`]).
    pub fn cmdline_spec(&self) -> config::Cmdline {
        config::Cmdline::new(
            self.cmdline_replace.as_deref(),
            self.cmdline.as_deref(),
            !self.no_virtio_console,
        )
    }

    /// The line microvm boots with for these options (`--print-default-cmdline`): the
    /// kernel image, when given, decides the default's console like at boot; without
    /// `--kernel`, the line for a kernel with hvc0 built in.
    pub fn cmdline_line(&self) -> String {
        self.cmdline_spec().render(|| match &self.kernel {
            Some(k) => DefaultConsole::for_kernel(&kernel_probe::probe(k)),
            None => DefaultConsole::Hvc0,
        })
    }

    fn checks(&self) -> Result<Checks, ConfigError> {
        config::check_patterns("expect", &self.expect)?;
        config::check_patterns("fail-on", &self.fail_on)?;
        if let Some(r) = &self.report {
            config::check_output_path("report", r)?;
        }
        if let Some(j) = &self.junit {
            config::check_output_path("junit", j)?;
        }
        Ok(Checks {
            expect: self.expect.clone(),
            fail_on: self.fail_on.clone(),
            timeout: self
                .timeout
                .as_deref()
                .map(config::parse_duration)
                .transpose()?,
            boot_timer: self.boot_timer,
            report: self.report.clone(),
            junit: self.junit.clone(),
            send_after: crate::ci::send_after::parse_steps(&self.send_after)?,
            tail_lines: self.tail_lines,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("microvm").chain(args.iter().copied()))
    }

    #[test]
    fn kernel_is_required() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--kernel", "k"]).is_ok());
    }

    #[test]
    fn vcpus_bounds() {
        assert!(parse(&["--kernel", "k", "--vcpus", "0"]).is_err());
        assert!(parse(&["--kernel", "k", "--vcpus", "255"]).is_err());
        assert!(parse(&["--kernel", "k", "--vcpus", "x"]).is_err());
        assert_eq!(
            parse(&["--kernel", "k", "--vcpus", "4"]).unwrap().run.vcpus,
            4
        );
    }

    #[test]
    fn config_from_args() {
        let cli = parse(&["--kernel", "k", "--memory", "512M", "--cmdline", "x=1"]).unwrap();
        let cfg = cli.run.to_config().unwrap();
        assert_eq!(cfg.memory, 512 << 20);
        match cfg.boot {
            BootSource::Linux { cmdline, .. } => {
                assert_eq!(cmdline.console, None, "the kernel image decides");
                assert!(cmdline.render(|| DefaultConsole::Uart).ends_with("x=1"));
            }
            other => panic!("{other:?}"),
        }
        let cli = parse(&["--kernel", "k", "--memory", "0"]).unwrap();
        assert!(cli.run.to_config().is_err());
    }

    #[test]
    fn console_specs() {
        let cli = parse(&[
            "--kernel",
            "k",
            "--console",
            "mux:ring,stdio",
            "--serial",
            "ring",
        ])
        .unwrap();
        let cfg = cli.run.to_config().unwrap();
        assert_eq!(cfg.console.backends.len(), 2);
        assert!(cfg.serial.is_some());
        let cli = parse(&["--kernel", "k", "--console", "mux:stdio,bogus"]).unwrap();
        let e = cli.run.to_config().unwrap_err().to_string();
        assert!(e.starts_with("--console mux:stdio,bogus: "), "{e}");
    }

    #[test]
    fn virtio_console_flag() {
        let cfg = parse(&["--kernel", "k"]).unwrap().run.to_config().unwrap();
        assert!(cfg.virtio_console);
        let cfg = parse(&["--kernel", "k", "--no-virtio-console"])
            .unwrap()
            .run
            .to_config()
            .unwrap();
        assert!(!cfg.virtio_console);
        match cfg.boot {
            BootSource::Linux { cmdline, .. } => {
                let line = cmdline.render(|| panic!("decided without the kernel image"));
                assert!(line.starts_with("console=ttyS0"));
                assert!(!line.contains("virtio_mmio"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn seccomp_on_unless_asked() {
        let cfg = parse(&["--kernel", "k"]).unwrap().run.to_config().unwrap();
        assert!(cfg.seccomp);
        let cfg = parse(&["--kernel", "k", "--no-seccomp"])
            .unwrap()
            .run
            .to_config()
            .unwrap();
        assert!(!cfg.seccomp);
    }

    #[test]
    fn attach_subcommand() {
        let cli = parse(&["attach", "/tmp/s.sock", "--read-only"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Attach(AttachArgs {
                read_only: true,
                ..
            }))
        ));
        let cli = parse(&[
            "attach",
            "tcp://127.0.0.1:1",
            "--token-file",
            "t",
            "--ca",
            "ca.pem",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
        ])
        .unwrap();
        let Some(Command::Attach(a)) = cli.command else {
            panic!("not attach");
        };
        let o = a.options();
        assert_eq!(o.target, "tcp://127.0.0.1:1");
        assert!(o.token_file.is_some() && o.ca.is_some() && o.key.is_some());
        assert!(parse(&["attach", "tcp://h:1", "--cert", "c"]).is_err());
        assert!(parse(&["attach", "tcp://h:1", "--key", "k"]).is_err());
    }

    #[test]
    fn ci_checks() {
        let cli = parse(&[
            "--kernel",
            "k",
            "--expect",
            "a",
            "--expect",
            "-b",
            "--fail-on",
            "BUG:",
            "--timeout",
            "90s",
            "--boot-timer",
            "--report",
            "r.json",
        ])
        .unwrap();
        let c = cli.run.to_config().unwrap().checks;
        assert_eq!(c.expect, ["a", "-b"]);
        assert_eq!(c.fail_on, ["BUG:"]);
        assert_eq!(c.timeout, Some(std::time::Duration::from_secs(90)));
        assert!(c.boot_timer);
        assert_eq!(c.tail_lines, 20);
        for bad in [
            &["--kernel", "k", "--timeout", "soon"][..],
            &["--kernel", "k", "--expect", ""],
            &["--kernel", "k", "--report", "/nonexistent-dir/r.json"],
        ] {
            let e = parse(bad).unwrap().run.to_config().unwrap_err().to_string();
            assert!(e.starts_with("--"), "{e}");
        }
    }

    #[test]
    fn help_renders() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
