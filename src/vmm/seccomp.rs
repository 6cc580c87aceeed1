//! Least privilege: one seccomp-bpf filter per kind of thread, built with `seccompiler`.
//!
//! * vCPU threads install theirs at the top of the thread, then wait at a start gate.
//! * The event loop (the main thread) installs its own when [`crate::vmm::Vmm::run`] starts,
//!   after the VM, the devices, the console sockets and log files exist, and then opens
//!   the gate: the guest's first instruction runs with every thread filtered.
//!
//! Each filter allows only the syscalls its thread makes from then on (see
//! [`vcpu_rules`] and [`event_loop_rules`], and docs/SECURITY.md); anything else traps
//! (`SECCOMP_RET_TRAP`): the SIGSYS handler writes ONE line naming the thread and the
//! syscall to stderr, restores the terminal (the same async-signal-safe restore the
//! SIGTERM path uses) and exits the process with status 1. `--no-seccomp` turns the
//! filters off for debugging.
//!
//! Where cheap, arguments are checked too: `ioctl` only with the request numbers the
//! thread uses (on vCPU threads `KVM_RUN`, and `KVM_GET_REGS`/`KVM_GET_SREGS` to say
//! where the guest was at a triple fault or a timeout), `mmap`/`mprotect` never with
//! `PROT_EXEC`, `tgkill` only towards this process, `fcntl` only for the status flags.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Barrier};

use crate::vstate::vcpu::ConfinedStart;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// `KVM_RUN`: `_IO(KVMIO, 0x80)` with `KVMIO` = 0xAE.
pub const KVM_RUN: u64 = 0xAE80;
/// `KVM_GET_REGS`: `_IOR(KVMIO, 0x81, struct kvm_regs)`.
pub const KVM_GET_REGS: u64 = kvm_ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
/// `KVM_GET_SREGS`: `_IOR(KVMIO, 0x83, struct kvm_sregs)`.
pub const KVM_GET_SREGS: u64 = kvm_ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>());

/// `_IOR(KVMIO, nr, size)`: read direction (2) in bits 30-31, the size in bits 16-29.
const fn kvm_ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}

/// Errors building or installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules (a bug in this module).
    #[error("cannot build the {thread} seccomp filter: {source}")]
    Build {
        /// Which thread's filter.
        thread: &'static str,
        /// seccompiler's error.
        source: BackendError,
    },
    /// The kernel refused the filter (no seccomp support, or a bad program).
    #[error(
        "cannot install the {thread} seccomp filter (run with --no-seccomp to go without): {source}"
    )]
    Install {
        /// Which thread's filter.
        thread: &'static str,
        /// seccompiler's error (prctl or seccomp failed).
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the seccomp SIGSYS handler: {0}")]
    Handler(io::Error),
}

/// The kinds of thread that get a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN` and the device emulation it does on exits.
    Vcpu,
    /// The main thread's event loop: consoles, virtio queues, shutdown.
    EventLoop,
}

impl ThreadKind {
    /// The name used in messages (and by the `test-hooks` feature's hooks).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EventLoop => "event-loop",
        }
    }
}

/// The filters and the vCPUs' start gate, when seccomp is on: each vCPU thread installs
/// its filter (through [`SeccompStart::confine_vcpu`]) and waits at the gate; `Vmm::run`
/// installs the event loop's, then opens the gate.
pub struct SeccompStart {
    /// The compiled filters.
    pub filters: Arc<Filters>,
    /// Released by the event loop once its own filter is in, so that no guest code runs
    /// while any thread of microvm is still unfiltered (and no filter is compiled into
    /// the kernel while a vCPU is in the guest).
    pub gate: Arc<Barrier>,
}

impl SeccompStart {
    /// Compiles the filters; the gate waits for `vcpus` threads and the event loop.
    pub fn new(vcpus: usize) -> Result<SeccompStart, SeccompError> {
        Ok(SeccompStart {
            filters: Arc::new(Filters::build()?),
            gate: Arc::new(Barrier::new(vcpus + 1)),
        })
    }

    /// What a vCPU thread runs before it first enters the guest: install the vCPU
    /// filter under the thread's name, then wait at the gate.
    pub fn confine_vcpu(&self) -> ConfinedStart {
        let filters = self.filters.clone();
        ConfinedStart {
            confine: Arc::new(move |label: &str| {
                install(&filters, ThreadKind::Vcpu, label).map_err(|e| e.to_string())
            }),
            gate: self.gate.clone(),
        }
    }
}

/// The compiled filters, built once before any thread is filtered.
#[derive(Debug, Clone)]
pub struct Filters {
    /// For every vCPU thread: the program that turns `open`/`openat` into EACCES (see
    /// [`vcpu_open_errno_rules`]), then the allowlist. The kernel runs every program and
    /// takes the strictest answer (EACCES beats the allowlist's Allow).
    pub vcpu: Vec<BpfProgram>,
    /// For the event-loop thread.
    pub event_loop: Vec<BpfProgram>,
}

impl Filters {
    /// Compiles both filters for this process.
    pub fn build() -> Result<Filters, SeccompError> {
        // SAFETY: getpid has no preconditions and cannot fail.
        let pid = unsafe { libc::getpid() };
        // The EACCES program goes first: once the allowlist is in, installing another
        // filter (prctl, seccomp) is itself forbidden.
        let vcpu = vec![
            compile(
                ThreadKind::Vcpu,
                vcpu_open_errno_rules(),
                SeccompAction::Allow,
                SeccompAction::Errno(libc::EACCES as u32),
            )?,
            compile(
                ThreadKind::Vcpu,
                vcpu_rules(pid),
                SeccompAction::Trap,
                SeccompAction::Allow,
            )?,
        ];
        let event_loop = vec![compile(
            ThreadKind::EventLoop,
            event_loop_rules(pid),
            SeccompAction::Trap,
            SeccompAction::Allow,
        )?];
        Ok(Filters { vcpu, event_loop })
    }

    /// The programs for `kind`.
    pub fn for_thread(&self, kind: ThreadKind) -> &[BpfProgram] {
        match kind {
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::EventLoop => &self.event_loop,
        }
    }
}

type Rules = Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError>;

fn compile(
    kind: ThreadKind,
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build {
        thread: kind.name(),
        source,
    };
    let filter = SeccompFilter::new(rules.map_err(build)?, mismatch, matched, TargetArch::x86_64)
        .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// `arg` (32 bits) == `value`.
fn arg_eq(arg: u8, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// One rule per allowed value of `arg`.
fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, BackendError> {
    values
        .iter()
        .map(|&v| SeccompRule::new(vec![arg_eq(arg, v)?]))
        .collect()
}

/// `arg` has no `PROT_EXEC` bit: memory may be mapped, never made executable.
fn no_exec(arg: u8) -> Result<Vec<SeccompRule>, BackendError> {
    let c = SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?;
    Ok(vec![SeccompRule::new(vec![c])?])
}

/// Syscalls both kinds of thread make: memory management by the allocator, locks, the
/// signal handlers (kick, SIGTERM & co., SIGWINCH, the terminal-restoring SIGQUIT path
/// and this module's SIGSYS handler), stderr messages, panics and thread exit.
fn common_rules(
    pid: libc::pid_t,
    rules: &mut BTreeMap<i64, Vec<SeccompRule>>,
) -> Result<(), BackendError> {
    for nr in [
        libc::SYS_write,
        libc::SYS_futex,
        libc::SYS_close,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_sched_yield,
        libc::SYS_getrandom,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_restart_syscall,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // The logger writes to stderr only when poll says it takes a line now.
        libc::SYS_poll,
        libc::SYS_ppoll,
    ] {
        rules.insert(nr, Vec::new());
    }
    rules.insert(libc::SYS_mmap, no_exec(2)?);
    rules.insert(libc::SYS_mprotect, no_exec(2)?);
    // Kicks and raise(): signals to this process's own threads only.
    rules.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![arg_eq(0, pid as u64)?])?],
    );
    // File status flags: a reopened (rotated) log file gets O_NONBLOCK cleared.
    rules.insert(
        libc::SYS_fcntl,
        any_of(1, &[libc::F_GETFL as u64, libc::F_SETFL as u64])?,
    );
    Ok(())
}

/// The vCPU thread's allowlist: `KVM_RUN`, and what device emulation on its exits needs
/// (eventfd writes for interrupts and wake-ups, stderr, locks, the allocator).
pub fn vcpu_rules(pid: libc::pid_t) -> Rules {
    let mut rules = BTreeMap::new();
    common_rules(pid, &mut rules)?;
    // Turned into EACCES by the other vCPU program, never executed: see
    // `vcpu_open_errno_rules`.
    rules.insert(libc::SYS_open, Vec::new());
    rules.insert(libc::SYS_openat, Vec::new());
    // KVM_RUN; the registers, read to report a triple fault or a timeout; and what
    // restoring the terminal takes (panic hook, SIGQUIT, SIGSYS): glibc's tcsetattr
    // reads the attributes back (TCGETS) after TCSETSF.
    rules.insert(
        libc::SYS_ioctl,
        any_of(
            1,
            &[
                KVM_RUN,
                KVM_GET_REGS,
                KVM_GET_SREGS,
                libc::TCSETSF,
                libc::TCGETS,
            ],
        )?,
    );
    Ok(rules)
}

/// The other vCPU program: `open` and `openat` fail with EACCES instead of trapping.
/// glibc opens /proc/sys/vm/overcommit_memory the first time a thread's malloc arena
/// shrinks (and copes with failure); a vCPU thread may be that thread under a console
/// flood, and must neither die for it nor be able to open files.
pub fn vcpu_open_errno_rules() -> Rules {
    Ok(BTreeMap::from([
        (libc::SYS_open, Vec::new()),
        (libc::SYS_openat, Vec::new()),
    ]))
}

/// The event loop's allowlist: epoll, eventfd/timerfd/stdio/socket I/O, accepting console
/// clients, log files (append, rotation, fsync), the terminal, kicking and joining vCPU
/// threads, removing socket files and unmapping guest memory at shutdown.
pub fn event_loop_rules(pid: libc::pid_t) -> Rules {
    let mut rules = BTreeMap::new();
    common_rules(pid, &mut rules)?;
    for nr in [
        libc::SYS_read,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_timerfd_settime,
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_getsockname,
        libc::SYS_setsockopt,
        // A refused console connection: its write side is shut after the reply.
        libc::SYS_shutdown,
        // rustls sends TLS records with one vectored write.
        libc::SYS_writev,
        // A reopened (rotated) log is checked for another owner (files::open_append).
        libc::SYS_geteuid,
        // Log files: open/create, rotate, sync; socket files: remove. The older and the
        // *at forms of each are listed as libc picks one or the other.
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_statx,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_lstat,
        libc::SYS_stat,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
    ] {
        rules.insert(nr, Vec::new());
    }
    // Restoring the terminal (tcsetattr(TCSAFLUSH) is TCSETSF then TCGETS), its size for
    // hvc0 on SIGWINCH, non-blocking accepted sockets (std uses FIONBIO). Raw mode itself
    // (TCSETS) is entered during set-up.
    rules.insert(
        libc::SYS_ioctl,
        any_of(
            1,
            &[libc::TCGETS, libc::TCSETSF, libc::TIOCGWINSZ, libc::FIONBIO],
        )?,
    );
    Ok(rules)
}

thread_local! {
    /// This thread's name for the SIGSYS message (NUL-padded), set when it is filtered.
    static LABEL: Cell<[u8; 16]> = const { Cell::new(*b"unknown\0\0\0\0\0\0\0\0\0") };
}

fn set_label(label: &str) {
    let mut buf = [0u8; 16];
    for (d, s) in buf.iter_mut().zip(label.bytes()) {
        *d = s;
    }
    LABEL.set(buf);
}

/// Installs `filters`' programs for `kind` on the calling thread, named `label` in the
/// SIGSYS message (e.g. "vcpu0"). The thread cannot undo it.
pub fn install(filters: &Filters, kind: ThreadKind, label: &str) -> Result<(), SeccompError> {
    set_label(label);
    for prog in filters.for_thread(kind) {
        seccompiler::apply_filter(prog).map_err(|source| SeccompError::Install {
            thread: kind.name(),
            source,
        })?;
    }
    Ok(())
}

/// Offset of `si_syscall` in x86_64's `siginfo_t` (`_sigsys`: `_call_addr` at 16, then
/// the syscall number as an int).
const SI_SYSCALL_OFFSET: usize = 24;
/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: i32 = 1;

/// A fixed buffer a signal handler can format into.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; 192],
            len: 0,
        }
    }

    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_num(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The one line the SIGSYS handler writes.
fn violation_line(label: &[u8], nr: i64, raw_terminal: bool) -> Line {
    let mut l = Line::new();
    l.push(b"microvm: seccomp: thread ");
    l.push(label.split(|&b| b == 0).next().unwrap_or(label));
    l.push(b" made forbidden syscall ");
    l.push_num(nr);
    if let Some(name) = syscall_name(nr) {
        l.push(b" (");
        l.push(name.as_bytes());
        l.push(b")");
    }
    l.push(b"; exiting (--no-seccomp turns the filters off)");
    l.push(if raw_terminal { b"\r\n" } else { b"\n" });
    l
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; si_code is
    // read through libc's field.
    let code = unsafe { (*info).si_code };
    let nr = if code == SYS_SECCOMP {
        // SAFETY: for a seccomp SIGSYS the kernel fills `_sigsys`, whose int `_syscall`
        // lies at SI_SYSCALL_OFFSET inside the (128-byte) siginfo_t.
        i64::from(unsafe {
            info.cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<i32>()
                .read_unaligned()
        })
    } else {
        -1
    };
    let label = LABEL.get();
    let line = violation_line(&label, nr, crate::host::term::raw_active());
    let bytes = line.as_bytes();
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `bytes` is a live local buffer.
    // restore_terminal is async-signal-safe (atomics, tcsetattr, fcntl), and both filters
    // allow what it calls.
    unsafe {
        libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len());
        crate::host::term::restore_terminal();
        libc::_exit(crate::exit::EXIT_RUNTIME_ERROR);
    }
}

/// Routes SIGSYS to the handler that reports a violation and exits (status 1).
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| SeccompError::Handler(io::Error::from_raw_os_error(e.errno())))
}

/// Names of the syscalls the filters mention and of a few a compromised thread would
/// reach for, for the violation message (unlisted ones are reported by number only).
const SYSCALL_NAMES: &[(i64, &str)] = &[
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_open, "open"),
    (libc::SYS_close, "close"),
    (libc::SYS_stat, "stat"),
    (libc::SYS_fstat, "fstat"),
    (libc::SYS_lstat, "lstat"),
    (libc::SYS_poll, "poll"),
    (libc::SYS_lseek, "lseek"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_pwrite64, "pwrite64"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_geteuid, "geteuid"),
    (libc::SYS_access, "access"),
    (libc::SYS_pipe, "pipe"),
    (libc::SYS_select, "select"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_dup, "dup"),
    (libc::SYS_dup2, "dup2"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_sendfile, "sendfile"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_accept, "accept"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_getsockname, "getsockname"),
    (libc::SYS_getpeername, "getpeername"),
    (libc::SYS_socketpair, "socketpair"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_vfork, "vfork"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_wait4, "wait4"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_uname, "uname"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_flock, "flock"),
    (libc::SYS_fsync, "fsync"),
    (libc::SYS_fdatasync, "fdatasync"),
    (libc::SYS_truncate, "truncate"),
    (libc::SYS_ftruncate, "ftruncate"),
    (libc::SYS_getdents64, "getdents64"),
    (libc::SYS_getcwd, "getcwd"),
    (libc::SYS_chdir, "chdir"),
    (libc::SYS_rename, "rename"),
    (libc::SYS_mkdir, "mkdir"),
    (libc::SYS_rmdir, "rmdir"),
    (libc::SYS_link, "link"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_symlink, "symlink"),
    (libc::SYS_readlink, "readlink"),
    (libc::SYS_chmod, "chmod"),
    (libc::SYS_fchmod, "fchmod"),
    (libc::SYS_chown, "chown"),
    (libc::SYS_umask, "umask"),
    (libc::SYS_gettimeofday, "gettimeofday"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_getuid, "getuid"),
    (libc::SYS_setuid, "setuid"),
    (libc::SYS_setgid, "setgid"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_arch_prctl, "arch_prctl"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_gettid, "gettid"),
    (libc::SYS_tkill, "tkill"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_sched_setaffinity, "sched_setaffinity"),
    (libc::SYS_sched_getaffinity, "sched_getaffinity"),
    (libc::SYS_epoll_create, "epoll_create"),
    (libc::SYS_getdents, "getdents"),
    (libc::SYS_restart_syscall, "restart_syscall"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_clock_getres, "clock_getres"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_exit_group, "exit_group"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_mkdirat, "mkdirat"),
    (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_renameat, "renameat"),
    (libc::SYS_linkat, "linkat"),
    (libc::SYS_symlinkat, "symlinkat"),
    (libc::SYS_readlinkat, "readlinkat"),
    (libc::SYS_fchmodat, "fchmodat"),
    (libc::SYS_faccessat, "faccessat"),
    (libc::SYS_ppoll, "ppoll"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_timerfd_create, "timerfd_create"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_timerfd_settime, "timerfd_settime"),
    (libc::SYS_timerfd_gettime, "timerfd_gettime"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_epoll_create1, "epoll_create1"),
    (libc::SYS_dup3, "dup3"),
    (libc::SYS_pipe2, "pipe2"),
    (libc::SYS_prlimit64, "prlimit64"),
    (libc::SYS_renameat2, "renameat2"),
    (libc::SYS_seccomp, "seccomp"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_memfd_create, "memfd_create"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_rseq, "rseq"),
    (libc::SYS_pidfd_open, "pidfd_open"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_openat2, "openat2"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
];

/// The name of syscall `nr`, when this module knows it. Async-signal-safe.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    SYSCALL_NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(rules: &BTreeMap<i64, Vec<SeccompRule>>) -> Vec<&'static str> {
        rules
            .keys()
            .map(|nr| syscall_name(*nr).unwrap_or_else(|| panic!("no name for syscall {nr}")))
            .collect()
    }

    #[test]
    fn kvm_ioctl_numbers() {
        // _IO(type, nr) = (type << 8) | nr; the _IOR ones as <linux/kvm.h> gives them.
        assert_eq!(KVM_RUN, (0xAE << 8) | 0x80);
        assert_eq!(KVM_GET_REGS, 0x8090_AE81);
        assert_eq!(KVM_GET_SREGS, 0x8138_AE83);
    }

    #[test]
    fn both_filters_compile() {
        let f = Filters::build().unwrap();
        assert_eq!(f.vcpu.len(), 2);
        assert_eq!(f.event_loop.len(), 1);
        for p in f.vcpu.iter().chain(&f.event_loop) {
            assert!(!p.is_empty() && p.len() < 4096, "{}", p.len());
        }
    }

    #[test]
    fn every_allowed_syscall_has_a_name() {
        names(&vcpu_rules(1).unwrap());
        names(&event_loop_rules(1).unwrap());
    }

    #[test]
    fn vcpu_is_narrower_than_the_event_loop() {
        let vcpu = vcpu_rules(1).unwrap();
        let el = event_loop_rules(1).unwrap();
        for nr in vcpu.keys() {
            assert!(el.contains_key(nr), "{:?} only on vCPUs", syscall_name(*nr));
        }
        for forbidden in [
            libc::SYS_read,
            libc::SYS_accept4,
            libc::SYS_rename,
            libc::SYS_unlink,
            libc::SYS_epoll_wait,
            libc::SYS_sendto,
        ] {
            assert!(
                !vcpu.contains_key(&forbidden),
                "{:?}",
                syscall_name(forbidden)
            );
        }
    }

    #[test]
    fn nobody_may_make_sockets_processes_or_executable_memory() {
        for rules in [vcpu_rules(1).unwrap(), event_loop_rules(1).unwrap()] {
            for nr in [
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_bind,
                libc::SYS_listen,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_ptrace,
                libc::SYS_process_vm_writev,
                libc::SYS_seccomp,
                libc::SYS_prctl,
                libc::SYS_kill,
                libc::SYS_memfd_create,
                libc::SYS_mount,
            ] {
                assert!(!rules.contains_key(&nr), "{:?}", syscall_name(nr));
            }
            // mmap/mprotect carry the no-PROT_EXEC condition, tgkill the pid condition.
            for nr in [
                libc::SYS_mmap,
                libc::SYS_mprotect,
                libc::SYS_tgkill,
                libc::SYS_ioctl,
            ] {
                assert!(
                    !rules[&nr].is_empty(),
                    "{:?} unconditioned",
                    syscall_name(nr)
                );
            }
        }
    }

    #[test]
    fn vcpu_ioctls_are_kvm_run_register_reads_and_the_terminal_restore() {
        let vcpu = vcpu_rules(1).unwrap();
        let want = any_of(
            1,
            &[
                KVM_RUN,
                KVM_GET_REGS,
                KVM_GET_SREGS,
                libc::TCSETSF,
                libc::TCGETS,
            ],
        )
        .unwrap();
        assert_eq!(vcpu[&libc::SYS_ioctl], want);
    }

    #[test]
    fn violation_line_names_thread_and_syscall() {
        let mut label = [0u8; 16];
        label[..5].copy_from_slice(b"vcpu0");
        let l = violation_line(&label, libc::SYS_socket, false);
        assert_eq!(
            std::str::from_utf8(l.as_bytes()).unwrap(),
            "microvm: seccomp: thread vcpu0 made forbidden syscall 41 (socket); exiting (--no-seccomp turns the filters off)\n"
        );
        let l = violation_line(b"event-loop\0\0\0\0\0\0", 9999, true);
        let s = std::str::from_utf8(l.as_bytes()).unwrap();
        assert!(
            s.contains("thread event-loop made forbidden syscall 9999;"),
            "{s}"
        );
        assert!(s.ends_with("\r\n"));
        let mut n = Line::new();
        n.push_num(0);
        n.push(b" ");
        n.push_num(-12);
        n.push(b" ");
        n.push_num(i64::MAX);
        assert_eq!(n.as_bytes(), b"0 -12 9223372036854775807");
    }

    /// Installs the vCPU filter on a scratch thread and checks that it refuses what it
    /// should with the action it should (EACCES for openat), without trapping (a trap
    /// would end the test process).
    #[test]
    fn vcpu_filter_turns_open_into_eacces() {
        let f = Filters::build().unwrap();
        let r = std::thread::spawn(move || {
            install(&f, ThreadKind::Vcpu, "test").unwrap();
            // SAFETY: a NUL-terminated path; the result is checked.
            let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
            (fd, io::Error::last_os_error().raw_os_error())
        })
        .join()
        .unwrap();
        assert_eq!(r, (-1, Some(libc::EACCES)));
    }
}
