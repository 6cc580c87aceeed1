//! Every process-wide disposition microvm uses (signals, the panic hook, the exit-time
//! terminal restore), installed once, from one place, in this order:
//!
//! 1. `SIGPIPE` ignored: a console consumer that goes away is an `EPIPE` error on that
//!    one backend, never the end of the VM.
//! 2. The terminal restore: `atexit`, and `SIGQUIT`/`SIGABRT` (restore the terminal, then
//!    the default action, a core dump). A `process::exit`, an abort (a panic while
//!    panicking, a stack overflow) or a quit key leave the user's terminal as it was.
//! 3. The panic hook: the message goes through the logger (never blocks, never panics,
//!    and makes no syscall the seccomp filters forbid, unlike the default hook), and a
//!    panic on any thread becomes the VM's exit reason through the [`ExitNotifier`], so
//!    a vCPU thread that panics stops the VM with status 1 instead of leaving it hung.
//! 4. `SIGTERM`, `SIGINT`, `SIGHUP`: the first asks the event loop for a clean stop
//!    (backends flushed for a bounded time, report written, status 128+N); a second one
//!    while that is under way restores the terminal and exits at once with 128+N.
//! 5. `SIGWINCH`: wakes the terminal-size watcher ([`resize_events`]).
//! 6. The vCPU kick signal (its handler is empty: `KVM_RUN` returns `EINTR`).
//! 7. `SIGSYS`, when seccomp is on: the violation report (see [`crate::vmm::seccomp`]).
//!
//! `microvm attach` installs steps 1 and 2 and restores the terminal on `SIGTERM`,
//! `SIGINT` and `SIGHUP` before their default action ([`install_for_client`]).

use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

use crate::exit::{EXIT_SIGNAL_BASE, ExitNotifier, ExitReason};
use crate::host::term::restore_terminal;

/// Errors installing a disposition.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// `sigaction` refused a handler.
    #[error("cannot install the {what} signal handler: {source}")]
    Handler {
        /// Which signal.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The resize eventfd could not be made.
    #[error("cannot create the terminal-resize eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Where a stop request from a signal goes (the exit eventfd; -1 until installed).
static STOP_FD: AtomicI32 = AtomicI32::new(-1);
/// The first stop signal received (0 if none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Stop signals received so far.
static STOP_COUNT: AtomicU32 = AtomicU32::new(0);
/// The eventfd SIGWINCH writes to (-1 until [`resize_events`]).
static WINCH_FD: AtomicI32 = AtomicI32::new(-1);
/// Where the panic hook reports (set by [`install_for_vm`]).
static PANIC_EXIT: OnceLock<ExitNotifier> = OnceLock::new();

/// The signals that end the VM cleanly.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn os_err(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> SignalError {
    move |e| SignalError::Handler {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// Write an eventfd increment from a signal handler.
fn kick_fd(fd: i32) {
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; it reads 8 bytes from a live local.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

extern "C" fn on_stop(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if STOP_COUNT.fetch_add(1, Ordering::SeqCst) > 0 {
        // The second request: the user does not want to wait for the flush.
        restore_terminal();
        // SAFETY: _exit is async-signal-safe and ends the process at once.
        unsafe { libc::_exit(EXIT_SIGNAL_BASE + sig) };
    }
    let _ = STOP_SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    kick_fd(STOP_FD.load(Ordering::SeqCst));
}

extern "C" fn on_winch(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    kick_fd(WINCH_FD.load(Ordering::SeqCst));
}

/// Restores the terminal, then lets the signal's default action run.
extern "C" fn restore_and_reraise(sig: libc::c_int) {
    restore_terminal();
    // SAFETY: resetting to the default and re-raising are async-signal-safe; the signal
    // is delivered again when this handler returns.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

extern "C" fn restore_at_exit() {
    restore_terminal();
}

/// Installs `restore_and_reraise` for `sig`, unless the signal is ignored (nohup).
fn restore_on(sig: libc::c_int) {
    // SAFETY: a zeroed sigaction is valid; sigaction with a null new action only reads.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::sigaction(sig, std::ptr::null(), &mut cur) } != 0
        || cur.sa_sigaction == libc::SIG_IGN
    {
        return;
    }
    // SAFETY: a zeroed sigaction is valid; the handler only calls async-signal-safe
    // functions.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = restore_and_reraise as *const () as libc::sighandler_t;
    act.sa_flags = libc::SA_RESTART;
    // SAFETY: `act` is initialised.
    unsafe {
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(sig, &act, std::ptr::null_mut());
    }
}

/// Steps 1 and 2 of the module doc.
fn install_common() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: setting SIGPIPE's disposition to SIG_IGN has no memory effects.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe { libc::atexit(restore_at_exit) };
        for sig in [libc::SIGQUIT, libc::SIGABRT] {
            restore_on(sig);
        }
    });
}

/// For processes that only use the terminal (`microvm attach`, test harnesses): steps 1
/// and 2, and the terminal restored on `SIGTERM`/`SIGINT`/`SIGHUP` before their default
/// action.
pub fn install_for_client() {
    install_common();
    for sig in STOP_SIGNALS {
        restore_on(sig);
    }
}

/// Everything a running VM needs, in the documented order. `exit` is the VM's exit
/// funnel; `seccomp` whether the SIGSYS report is wanted.
pub fn install_for_vm(exit: &ExitNotifier, seccomp: bool) -> Result<(), SignalError> {
    install_common();
    let _ = PANIC_EXIT.set(exit.clone());
    std::panic::set_hook(Box::new(on_panic));
    STOP_FD.store(exit.event().as_raw_fd(), Ordering::SeqCst);
    for (sig, what) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
    ] {
        register_signal_handler(sig, on_stop).map_err(os_err(what))?;
    }
    register_signal_handler(libc::SIGWINCH, on_winch).map_err(os_err("SIGWINCH"))?;
    crate::vstate::vcpu::install_kick_handler().map_err(|e| SignalError::Handler {
        what: "vCPU kick",
        source: std::io::Error::other(e.to_string()),
    })?;
    if seccomp {
        crate::vmm::seccomp::install_sigsys_handler().map_err(|e| SignalError::Handler {
            what: "SIGSYS",
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    Ok(())
}

/// The stop signal received, if any (the event loop turns it into the exit reason).
pub fn stop_signal() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// An eventfd that becomes readable whenever the terminal is resized (`SIGWINCH`, whose
/// handler [`install_for_vm`] installed). One per process: a second call fails.
pub fn resize_events() -> Result<EventFd, SignalError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SignalError::EventFd)?;
    let signal_side = evt.try_clone().map_err(SignalError::EventFd)?;
    if WINCH_FD
        .compare_exchange(
            -1,
            signal_side.as_raw_fd(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .is_err()
    {
        return Err(SignalError::EventFd(std::io::Error::other(
            "SIGWINCH is already routed",
        )));
    }
    // The handler writes to this fd for the rest of the process's life.
    std::mem::forget(signal_side);
    Ok(evt)
}

/// The panic hook: one log line, and the panic becomes the VM's exit reason. It makes
/// only the syscalls every thread's filter allows (no terminal restore here: the exit
/// path that follows restores it).
fn on_panic(info: &std::panic::PanicHookInfo<'_>) {
    let msg = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    let place = info
        .location()
        .map(|l| format!(" at {}:{}", l.file(), l.line()))
        .unwrap_or_default();
    let thread = std::thread::current();
    let text = format!(
        "internal error: thread '{}' panicked{place}: {msg}",
        thread.name().unwrap_or("unnamed")
    );
    log::error!("{text}");
    if let Some(exit) = PANIC_EXIT.get() {
        exit.exit(ExitReason::Error(text));
    }
}
