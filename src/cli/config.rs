//! The VM's configuration, validated: what the builder needs, with no clap or KVM types.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::arch::x86_64::kernel_probe::KernelConsoles;
use crate::arch::x86_64::layout::{VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::host::units::{self, SizeUnit};
use crate::mux::{ConsoleSpec, SpecError};

/// The default kernel command line with the UART as the only console, chosen for a fast
/// microVM boot: the console on the 16550, reset through the i8042 (`reboot=k`), reboot one
/// second after a panic (microvm reports the panic and exits non-zero), no PCI bus to scan,
/// one legacy UART to probe, no PS/2 mouse or mux probing, and a quiet log (raise it with
/// `--cmdline loglevel=7`).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off 8250.nr_uarts=1 \
i8042.noaux i8042.nomux i8042.dumbkbd quiet";

/// The default command line with the virtio console present: the 16550 as early console
/// until hvc0 registers, then hvc0 as the console. The kernel does not replay the log to
/// hvc0 when a boot console was active, so the stream holds the boot log once.
pub const DEFAULT_CMDLINE_VIRTIO: &str = "earlycon=uart8250,io,0x3f8 console=hvc0 reboot=k \
panic=1 pci=off 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd quiet";

/// The 16550 as the boot console, until the real console registers.
pub const EARLYCON: &str = "earlycon=uart8250,io,0x3f8";

/// Describes the virtio-mmio console to kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES
/// (others, like Debian's, find it in the ACPI DSDT and ignore this).
pub fn virtio_mmio_cmdline_device() -> String {
    format!(
        "virtio_mmio.device={}K@{:#x}:{}",
        VIRTIO_MMIO_SIZE >> 10,
        VIRTIO_MMIO_START,
        VIRTIO_IRQ_BASE
    )
}

/// Default guest memory.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// The least memory microvm accepts (Linux needs more to do anything useful).
pub const MIN_MEMORY: u64 = 16 << 20;

/// Errors in the user's configuration (exit status 2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size could not be parsed.
    #[error(
        "invalid size '{}': use a number with an optional K, M, G or T suffix, e.g. 256M",
        crate::mux::spec::one_line(.0)
    )]
    BadSize(String),
    /// Memory below the minimum.
    #[error("--memory {}: too small; give at least 16M", crate::mux::spec::one_line(.0))]
    MemoryTooSmall(String),
    /// Memory not page-aligned.
    #[error("--memory {}: not a multiple of 4K", crate::mux::spec::one_line(.0))]
    MemoryUnaligned(String),
    /// Memory beyond the host's RAM.
    #[error(
        "--memory {}: more than this host's {host_mib} MiB of RAM",
        crate::mux::spec::one_line(given)
    )]
    MemoryBeyondHost {
        /// What the user gave.
        given: String,
        /// Host RAM.
        host_mib: u64,
    },
    /// A console spec does not parse.
    #[error("--{option} {}: {source}", crate::mux::spec::one_line(spec))]
    Console {
        /// `console` or `serial`.
        option: &'static str,
        /// What the user gave.
        spec: String,
        /// What is wrong with it.
        source: SpecError,
    },
    /// A host CPU list does not parse or names CPUs this host does not have.
    #[error(
        "--vcpu-affinity {given}: {why}; give host CPU numbers and ranges below {ncpus}, e.g. 1 or 2-3,6"
    )]
    BadCpuList {
        /// What the user gave.
        given: String,
        /// What is wrong with it.
        why: String,
        /// Host CPUs (numbered 0..ncpus).
        ncpus: usize,
    },
    /// A duration could not be parsed.
    #[error(
        "--timeout {0}: invalid duration; use a number with an optional ms, s, m or h suffix, e.g. 90s or 5m"
    )]
    BadDuration(String),
    /// An empty `--expect` or `--fail-on` pattern (it would match at once).
    #[error("--{0} '': empty pattern; give the text to look for on the console")]
    EmptyPattern(&'static str),
    /// `--report FILE` or `--junit FILE` cannot be written where asked.
    #[error("--{option} {path}: {why}")]
    BadOutputPath {
        /// `report` or `junit`.
        option: &'static str,
        /// What the user gave.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// `--console` and `--serial` both name `stdio`.
    #[error("stdio is already used by another console: --console and --serial cannot both use it")]
    StdioTwice,
    /// A bad `--send-after` step.
    #[error(transparent)]
    SendAfter(#[from] crate::ci::send_after::SendAfterError),
    /// vCPUs beyond KVM's limit.
    #[error("--vcpus {given}: this host's KVM supports at most {max}")]
    TooManyVcpus {
        /// What the user gave.
        given: u16,
        /// KVM's limit.
        max: usize,
    },
}

/// How the guest starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSource {
    /// A Linux kernel (bzImage or ELF vmlinux) with an optional initrd.
    Linux {
        /// Kernel image.
        kernel: PathBuf,
        /// Initial ramdisk.
        initrd: Option<PathBuf>,
        /// The command line, rendered once the kernel is loaded (the default console may
        /// depend on what the kernel image holds).
        cmdline: Cmdline,
        /// The kernel is a PVM guest kernel (may boot on a PVM host).
        pvm_guest: bool,
    },
    /// A flat real-mode image loaded at 0x1000 and started there (tiny test guests).
    RealMode {
        /// The image.
        image: PathBuf,
    },
}

/// Everything needed to build and run a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// What to boot.
    pub boot: BootSource,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The console hub every guest console attaches to (`--console`).
    pub console: ConsoleSpec,
    /// A hub of the UART's own (`--serial`); when absent the UART joins `console`.
    pub serial: Option<ConsoleSpec>,
    /// Whether the guest gets a virtio console (hvc0) beside the UART.
    pub virtio_console: bool,
    /// Host CPUs the vCPU threads run on (`--vcpu-affinity`); the VMM's other threads
    /// then run on the remaining CPUs. Empty: no pinning.
    pub vcpu_affinity: Vec<usize>,
    /// Pass/fail checks for test guests and what to report at the end.
    pub checks: crate::ci::Checks,
    /// Whether vCPU threads and the event loop run under their seccomp filters
    /// (`--no-seccomp` turns them off).
    pub seccomp: bool,
}

/// Parses `90`, `90s`, `1500ms`, `5m`, `1h` (a bare number is seconds; see
/// [`crate::host::units`]).
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    units::parse_duration(s).ok_or_else(|| ConfigError::BadDuration(s.to_string()))
}

/// Checks `--expect`/`--fail-on` patterns (non-empty).
pub fn check_patterns(option: &'static str, patterns: &[String]) -> Result<(), ConfigError> {
    if patterns.iter().any(String::is_empty) {
        return Err(ConfigError::EmptyPattern(option));
    }
    Ok(())
}

/// Checks that `--{option} FILE` can be created: its directory exists and it is not a
/// directory itself. Nothing is written until the VM ends.
pub fn check_output_path(option: &'static str, path: &Path) -> Result<(), ConfigError> {
    let bad = |why: String| ConfigError::BadOutputPath {
        option,
        path: path.display().to_string(),
        why,
    };
    if path.is_dir() {
        return Err(bad("is a directory; give a file name".into()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(bad(format!(
            "directory {} does not exist; create it first",
            dir.display()
        )));
    }
    Ok(())
}

/// Parses a host CPU list such as `1`, `2-3,6` (sorted, without duplicates).
pub fn parse_cpu_list(s: &str, ncpus: usize) -> Result<Vec<usize>, ConfigError> {
    let bad = |why: String| ConfigError::BadCpuList {
        given: s.to_string(),
        why,
        ncpus,
    };
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| bad(format!("'{part}' is not a CPU number or range")))
        };
        let (lo, hi) = (num(lo)?, num(hi)?);
        if lo > hi {
            return Err(bad(format!("range '{part}' is backwards")));
        }
        if hi >= ncpus {
            return Err(bad(format!("CPU {hi} does not exist")));
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Host CPUs, numbered 0..n (for `--vcpu-affinity`): all configured CPUs, not only those
/// this process may use now (a cpuset narrower than the list is the kernel's to refuse).
pub fn host_cpus() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    usize::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// Parses a console spec given to `--{option}`.
pub fn parse_console(option: &'static str, spec: &str) -> Result<ConsoleSpec, ConfigError> {
    spec.parse().map_err(|source| ConfigError::Console {
        option,
        spec: spec.to_string(),
        source,
    })
}

/// Parses a `--memory` size: `256M`, `1G`, `512` (MiB when no suffix), `4096K`, `1GiB`,
/// `16777216B` (bytes); see [`crate::host::units`].
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    units::parse_size(s, SizeUnit::MiB).ok_or_else(|| ConfigError::BadSize(s.to_string()))
}

/// Checks that at most one console hub owns the terminal.
pub fn check_consoles(
    console: &ConsoleSpec,
    serial: Option<&ConsoleSpec>,
) -> Result<(), ConfigError> {
    if console.has_stdio() && serial.is_some_and(ConsoleSpec::has_stdio) {
        return Err(ConfigError::StdioTwice);
    }
    Ok(())
}

/// Checks a memory size against the minimum, alignment and the host's RAM.
pub fn check_memory(given: &str, bytes: u64, host_bytes: Option<u64>) -> Result<u64, ConfigError> {
    if bytes < MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall(given.to_string()));
    }
    if !bytes.is_multiple_of(4096) {
        return Err(ConfigError::MemoryUnaligned(given.to_string()));
    }
    if let Some(host) = host_bytes.filter(|&host| bytes > host) {
        return Err(ConfigError::MemoryBeyondHost {
            given: given.to_string(),
            host_mib: host >> 20,
        });
    }
    Ok(bytes)
}

/// Checks the vCPU count against what the host's KVM supports (`KVM_CAP_MAX_VCPUS`).
pub fn check_vcpus(vcpus: u8, kvm_max: usize) -> Result<(), ConfigError> {
    if usize::from(vcpus) > kvm_max {
        return Err(ConfigError::TooManyVcpus {
            given: u16::from(vcpus),
            max: kvm_max,
        });
    }
    Ok(())
}

/// The host's RAM from /proc/meminfo, if readable.
pub fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// Which console the default command line names (see [`crate::arch::x86_64::kernel_probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultConsole {
    /// `earlycon=uart8250,io,0x3f8 console=ttyS0`: the console every kernel has when
    /// init starts.
    Uart,
    /// `earlycon=uart8250,io,0x3f8 console=hvc0`: for kernels with virtio_mmio and
    /// virtio_console built in (hvc0 exists when init starts).
    Hvc0,
}

impl DefaultConsole {
    /// The default line's console for a kernel: hvc0 only when it exists at boot.
    pub fn for_kernel(kernel: &KernelConsoles) -> DefaultConsole {
        match kernel {
            KernelConsoles::Hvc0AtBoot => DefaultConsole::Hvc0,
            _ => DefaultConsole::Uart,
        }
    }
}

/// True when `cmdline` has a `console=` parameter of its own.
pub fn names_a_console(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .any(|p| p.starts_with("console="))
}

/// The kernel command line as the options give it. The console of the default line is
/// either fixed, or (`console: None`) decided from the kernel image: the builder scans
/// the kernel it has just loaded (`kernel_probe`), so an image is read and unpacked once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// `--cmdline-replace`.
    pub replace: Option<String>,
    /// `--cmdline`.
    pub append: Option<String>,
    /// The guest has a virtio console.
    pub virtio_console: bool,
    /// The default line's console; `None`: from the kernel image.
    pub console: Option<DefaultConsole>,
}

impl Cmdline {
    /// The options' line. The kernel image decides its console only where the choice
    /// matters: a virtio console, no replacement and no `console=` of the user's.
    pub fn new(replace: Option<&str>, append: Option<&str>, virtio_console: bool) -> Cmdline {
        let decided = !virtio_console || replace.is_some() || append.is_some_and(names_a_console);
        Cmdline {
            replace: replace.map(str::to_string),
            append: append.map(str::to_string),
            virtio_console,
            // When it does not matter, any console gives the same line.
            console: decided.then_some(DefaultConsole::Uart),
        }
    }

    /// The line, with `probe` asked for the console when the image is to decide.
    pub fn render(&self, probe: impl FnOnce() -> DefaultConsole) -> String {
        let console = self.console.unwrap_or_else(probe);
        build_cmdline(
            self.replace.as_deref(),
            self.append.as_deref(),
            self.virtio_console,
            console,
        )
    }
}

/// The command line.
/// - `--cmdline-replace STR`: exactly STR, then `--cmdline` (nothing of microvm's).
/// - otherwise the default: the console chosen for the kernel (`console`; none when
///   `--cmdline` names a console itself, so that the user's choice is the only one), the
///   fixed parameters, the virtio-mmio device parameter when the virtio console is
///   present, then `--cmdline` (last, so that a user's `-- init args` stay at the end).
pub fn build_cmdline(
    replace: Option<&str>,
    append: Option<&str>,
    virtio_console: bool,
    console: DefaultConsole,
) -> String {
    let mut parts: Vec<String> = Vec::new();
    match replace {
        Some(r) => parts.push(r.trim().to_string()),
        None => {
            let line = match (console, virtio_console) {
                (DefaultConsole::Hvc0, true) => DEFAULT_CMDLINE_VIRTIO.to_string(),
                // earlycon shows the boot log from the first line (the real ttyS0
                // console takes over from it without a replay).
                (DefaultConsole::Uart, true) => format!("{EARLYCON} {DEFAULT_CMDLINE}"),
                (_, false) => DEFAULT_CMDLINE.to_string(),
            };
            if append.is_some_and(names_a_console) {
                parts.extend(
                    line.split_whitespace()
                        .filter(|p| !names_a_console(p) && !p.starts_with("earlycon"))
                        .map(str::to_string),
                );
            } else {
                parts.push(line.to_string());
            }
            if virtio_console {
                parts.push(virtio_mmio_cmdline_device());
            }
        }
    }
    if let Some(extra) = append {
        parts.push(extra.trim().to_string());
    }
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
}

#[cfg(test)]
mod cpu_list_tests {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("1", 4).unwrap(), vec![1]);
        assert_eq!(parse_cpu_list("3,0-1,1", 4).unwrap(), vec![0, 1, 3]);
        for bad in ["", "x", "2-1", "4", "0-9", "1,,2", "-1"] {
            let e = parse_cpu_list(bad, 4).unwrap_err().to_string();
            assert!(e.starts_with("--vcpu-affinity "), "{bad}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        // The grammar is `units`'s (tested there); this is the option's error.
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("3d"),
            Err(ConfigError::BadDuration("3d".into()))
        );
        assert_eq!(
            units::format_duration(Duration::from_millis(1500)),
            "1500ms"
        );
    }

    #[test]
    fn patterns_and_report_path() {
        assert!(check_patterns("expect", &["a".into()]).is_ok());
        let e = check_patterns("fail-on", &["a".into(), String::new()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--fail-on '': empty pattern; give the text to look for on the console"
        );
        assert!(check_output_path("report", Path::new("r.json")).is_ok());
        let e = check_output_path("report", Path::new("/nonexistent-dir/r.json")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(check_output_path("report", Path::new("/tmp")).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("4096k"), Ok(4 << 20));
        assert_eq!(parse_size("16777216B"), Ok(16 << 20));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        for bad in ["", "M", "-1M", "1.5G", "12X", "99999999999999T", "1iB", "B"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn memory_checks() {
        assert!(matches!(
            check_memory("0", 0, None),
            Err(ConfigError::MemoryTooSmall(_))
        ));
        assert!(matches!(
            check_memory("x", (64 << 20) + 1, None),
            Err(ConfigError::MemoryUnaligned(_))
        ));
        assert!(matches!(
            check_memory("2G", 2 << 30, Some(1 << 30)),
            Err(ConfigError::MemoryBeyondHost { host_mib: 1024, .. })
        ));
        assert_eq!(check_memory("64M", 64 << 20, Some(1 << 30)), Ok(64 << 20));
    }

    #[test]
    fn vcpus_over_the_kvm_limit() {
        assert_eq!(check_vcpus(4, 4), Ok(()));
        let e = check_vcpus(5, 4).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--vcpus 5: this host's KVM supports at most 4"
        );
    }

    #[test]
    fn cmdline() {
        use DefaultConsole::{Hvc0, Uart};
        assert_eq!(build_cmdline(None, None, false, Hvc0), DEFAULT_CMDLINE);
        assert!(build_cmdline(None, Some("x=1"), false, Uart).ends_with(" quiet x=1"));
        // --cmdline-replace is exact.
        assert_eq!(build_cmdline(Some("a"), Some("b"), true, Hvc0), "a b");
        assert_eq!(build_cmdline(Some(""), None, false, Uart), "");
        assert_eq!(build_cmdline(Some(""), Some(" "), true, Uart), "");
        let v = build_cmdline(None, Some("x=1"), true, Hvc0);
        assert!(
            v.starts_with("earlycon=uart8250,io,0x3f8 console=hvc0 "),
            "{v}"
        );
        assert!(!v.contains("ttyS0"));
        assert!(
            v.ends_with(" quiet virtio_mmio.device=4K@0xd0000000:5 x=1"),
            "{v}"
        );
        // A kernel without hvc0 at boot gets the UART, with the device still described.
        let u = build_cmdline(None, None, true, Uart);
        assert!(
            u.starts_with("earlycon=uart8250,io,0x3f8 console=ttyS0 ") && !u.contains("hvc0 "),
            "{u}"
        );
        assert!(u.ends_with(" virtio_mmio.device=4K@0xd0000000:5"), "{u}");
        // A console named in --cmdline is the only one.
        let c = build_cmdline(None, Some("console=hvc0 y=2"), true, Uart);
        assert_eq!(c.matches("console=").count(), 1, "{c}");
        assert!(
            !c.contains("earlycon") && c.ends_with(" console=hvc0 y=2"),
            "{c}"
        );
        assert!(c.starts_with("reboot=k "), "{c}");
    }
}
