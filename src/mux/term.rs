//! Terminal handling for the `stdio` backend and `microvm attach`: raw mode that is
//! restored on every exit path (drop, `shutdown`, `process::exit` via `atexit`, panic,
//! SIGTERM/SIGHUP/SIGINT/SIGQUIT), and the Ctrl-A escape keys.

use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

/// Ctrl-A, the escape prefix (as in QEMU's mux).
pub const ESCAPE_PREFIX: u8 = 0x01;
/// Ctrl-], detaches `microvm attach` at once (as telnet's escape).
pub const DETACH_KEY: u8 = 0x1d;

/// Help text shown by Ctrl-A h on the VMM's terminal.
pub const STDIO_ESCAPE_HELP: &str = "\r\n\
[microvm console escape keys]\r\n\
  Ctrl-A x       quit (stop the VM)\r\n\
  Ctrl-A h       this help\r\n\
  Ctrl-A c       switch input to the next console device\r\n\
  Ctrl-A Ctrl-A  send Ctrl-A to the guest\r\n";

/// Help text for `microvm attach`.
pub const ATTACH_ESCAPE_HELP: &str = "Ctrl-] or Ctrl-A d detaches; Ctrl-A Ctrl-A sends Ctrl-A; \
in a single-writer console Ctrl-A w takes the keyboard.";

/// Terminal errors.
#[derive(Debug, thiserror::Error)]
pub enum TermError {
    /// `tcgetattr` failed on a tty.
    #[error("cannot read terminal attributes: {0}")]
    GetAttr(io::Error),
    /// `tcsetattr` failed.
    #[error("cannot put the terminal in raw mode: {0}")]
    SetAttr(io::Error),
    /// `fcntl` failed.
    #[error("cannot change file status flags of fd {0}: {1}")]
    Fcntl(RawFd, io::Error),
}

/// True when `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the fd number; any value is safe to pass.
    unsafe { libc::isatty(fd) == 1 }
}

/// Saved terminal state, readable from a signal handler.
struct Saved {
    /// 0 empty, 1 being written, 2 valid.
    state: AtomicU8,
    fd: AtomicI32,
    termios: UnsafeCell<libc::termios>,
}

// SAFETY: `termios` is only written while `state` is 1 (claimed by one thread through a
// compare-exchange from 0) and only read while `state` is 2; the atomics order the accesses.
unsafe impl Sync for Saved {}

static SAVED: Saved = Saved {
    state: AtomicU8::new(0),
    fd: AtomicI32::new(-1),
    // SAFETY: termios is a plain C struct of integers and arrays; all-zero is a valid value.
    termios: UnsafeCell::new(unsafe { std::mem::zeroed() }),
};

/// Original file status flags of fds 0, 1, 2 (or -1) so O_NONBLOCK can be undone.
static SAVED_FLAGS: [AtomicI32; 3] = [AtomicI32::new(-1), AtomicI32::new(-1), AtomicI32::new(-1)];

/// Restore whatever this module changed: termios and O_NONBLOCK on stdio.
/// Async-signal-safe (only atomics, `tcsetattr` and `fcntl`); idempotent.
pub fn restore_terminal() {
    if SAVED
        .state
        .compare_exchange(2, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        let fd = SAVED.fd.load(Ordering::Acquire);
        // SAFETY: state 1 is held by us, so nobody writes termios; the pointer is valid
        // for the static's lifetime. tcsetattr with a bad fd just fails.
        unsafe {
            libc::tcsetattr(fd, libc::TCSAFLUSH, SAVED.termios.get());
        }
        SAVED.state.store(0, Ordering::Release);
    }
    for (fd, slot) in SAVED_FLAGS.iter().enumerate() {
        let flags = slot.swap(-1, Ordering::AcqRel);
        if flags >= 0 {
            // SAFETY: F_SETFL on a std fd with flags we read from it earlier.
            unsafe {
                libc::fcntl(fd as RawFd, libc::F_SETFL, flags);
            }
        }
    }
}

/// Set O_NONBLOCK on one of fds 0..=2, remembering the old flags for [`restore_terminal`].
pub fn set_stdio_nonblocking(fd: RawFd) -> Result<(), TermError> {
    install_restore_hooks();
    // SAFETY: F_GETFL on a fd number has no memory effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(TermError::Fcntl(fd, io::Error::last_os_error()));
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    if let Some(slot) = usize::try_from(fd).ok().and_then(|i| SAVED_FLAGS.get(i)) {
        let _ = slot.compare_exchange(-1, flags, Ordering::AcqRel, Ordering::Acquire);
    }
    // SAFETY: F_SETFL with flags derived from F_GETFL.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(TermError::Fcntl(fd, io::Error::last_os_error()));
    }
    Ok(())
}

/// Raw mode on a tty; restores the saved mode when dropped.
#[derive(Debug)]
pub struct RawMode {
    _private: (),
}

impl RawMode {
    /// Put `fd` in raw mode if it is a tty; `Ok(None)` when it is not one (no change made).
    /// Only one raw-mode session exists per process; a second call while one is active
    /// returns `Ok(None)`.
    pub fn enter(fd: RawFd) -> Result<Option<RawMode>, TermError> {
        if !is_tty(fd) {
            return Ok(None);
        }
        install_restore_hooks();
        // SAFETY: all-zero termios is valid; tcgetattr fills it.
        let mut orig: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `orig` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut orig) } != 0 {
            return Err(TermError::GetAttr(io::Error::last_os_error()));
        }
        if SAVED
            .state
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Ok(None);
        }
        // SAFETY: state 1 is held by us: no reader or other writer touches termios.
        unsafe {
            *SAVED.termios.get() = orig;
        }
        SAVED.fd.store(fd, Ordering::Release);
        SAVED.state.store(2, Ordering::Release);
        let mut raw = orig;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            let err = io::Error::last_os_error();
            restore_terminal();
            return Err(TermError::SetAttr(err));
        }
        Ok(Some(RawMode { _private: () }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// True while a raw-mode session is active (log lines then need "\r\n").
pub fn raw_active() -> bool {
    SAVED.state.load(Ordering::Acquire) == 2
}

/// The size (columns, rows) of the terminal on `fd`, if it is one.
pub fn terminal_size(fd: RawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the live local `ws`; `fd` is only queried.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// The eventfd SIGWINCH writes to (-1 until [`resize_events`] installed it).
static WINCH_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_winch(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = WINCH_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; it reads 8 bytes from a live local.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// An eventfd that becomes readable whenever the terminal is resized (SIGWINCH). One per
/// process: a second call fails.
pub fn resize_events() -> io::Result<EventFd> {
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let signal_side = evt.try_clone()?;
    if WINCH_FD
        .compare_exchange(
            -1,
            signal_side.as_raw_fd(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .is_err()
    {
        return Err(io::Error::other("SIGWINCH is already routed"));
    }
    // The handler writes to this fd for the rest of the process's life.
    std::mem::forget(signal_side);
    vmm_sys_util::signal::register_signal_handler(libc::SIGWINCH, on_winch)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    Ok(evt)
}

/// Calls `on_resize(columns, rows)` on the event loop when the terminal on `fd` changes size.
pub struct ResizeWatcher {
    evt: EventFd,
    fd: RawFd,
    on_resize: Box<dyn FnMut(u16, u16) + Send>,
}

impl ResizeWatcher {
    /// Watches `fd`'s terminal, woken by `evt` (from [`resize_events`]).
    pub fn new(evt: EventFd, fd: RawFd, on_resize: Box<dyn FnMut(u16, u16) + Send>) -> Self {
        ResizeWatcher { evt, fd, on_resize }
    }
}

impl MutEventSubscriber for ResizeWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != self.evt.as_raw_fd() {
            return;
        }
        let _ = self.evt.read();
        if let Some((cols, rows)) = terminal_size(self.fd) {
            (self.on_resize)(cols, rows);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.evt, EventSet::IN));
    }
}

/// Print a log line to stderr, with "\r\n" when the terminal is raw.
pub fn log_line(msg: &str) {
    use std::io::Write;
    let end = if raw_active() { "\r\n" } else { "\n" };
    // Messages quote paths and names as given: keep them one line.
    let msg = super::spec::one_line(msg);
    let _ = write!(io::stderr(), "microvm: {msg}{end}");
}

const SIGNALS: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT];
static OLD_ACTIONS: OnceLock<Vec<(libc::c_int, libc::sigaction)>> = OnceLock::new();

extern "C" fn on_signal(sig: libc::c_int) {
    restore_terminal();
    // Reinstate the previous disposition and re-raise: the old handler (or the default
    // action) runs once this handler returns and the signal is unblocked.
    if let Some(old) = OLD_ACTIONS.get() {
        for (s, act) in old {
            if *s == sig {
                // SAFETY: `act` was filled by sigaction earlier; sigaction and raise are
                // async-signal-safe.
                unsafe {
                    libc::sigaction(sig, act, std::ptr::null_mut());
                    libc::raise(sig);
                }
            }
        }
    }
}

extern "C" fn on_exit() {
    restore_terminal();
}

/// Install (once) the panic hook, `atexit` handler and signal handlers that restore the terminal.
pub fn install_restore_hooks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            prev(info);
        }));
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe {
            libc::atexit(on_exit);
        }
        let mut old = Vec::new();
        for sig in SIGNALS {
            // SAFETY: zeroed sigaction is valid; sigaction with a null new action only reads.
            let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            if unsafe { libc::sigaction(sig, std::ptr::null(), &mut cur) } == 0 {
                // Respect an ignored signal (e.g. nohup): leave it alone.
                if cur.sa_sigaction != libc::SIG_IGN {
                    old.push((sig, cur));
                }
            }
        }
        let sigs: Vec<libc::c_int> = old.iter().map(|(s, _)| *s).collect();
        let _ = OLD_ACTIONS.set(old);
        for sig in sigs {
            // SAFETY: zeroed sigaction is valid; we fill in a handler that only calls
            // async-signal-safe functions.
            let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
            act.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            act.sa_flags = libc::SA_RESTART;
            // SAFETY: `act` is initialised; the old action was saved above.
            unsafe {
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(sig, &act, std::ptr::null_mut());
            }
        }
    });
}

/// What an escape sequence asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapeAction {
    /// Ctrl-A x: stop the VM.
    Quit,
    /// Ctrl-A h: show the keys.
    Help,
    /// Ctrl-A c: input goes to the next frontend.
    SwitchInput,
    /// Ctrl-A d or Ctrl-]: detach (attach client).
    Detach,
    /// Ctrl-A w: take the keyboard (single-writer sockets).
    TakeOver,
}

/// Which set of escape keys a parser knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapeKeys {
    /// The VMM's terminal: x, h, c, Ctrl-A; other keys after Ctrl-A are dropped (as QEMU).
    Stdio,
    /// `microvm attach`: Ctrl-], Ctrl-A d, Ctrl-A Ctrl-A; other pairs pass through whole.
    Attach,
    /// A non-holder client of a single-writer socket: only Ctrl-A w matters.
    TakeOver,
}

/// Incremental Ctrl-A escape parser (state survives across reads).
#[derive(Debug, Clone)]
pub struct EscapeParser {
    keys: EscapeKeys,
    pending: bool,
}

impl EscapeParser {
    /// A parser for `keys`.
    pub fn new(keys: EscapeKeys) -> Self {
        EscapeParser {
            keys,
            pending: false,
        }
    }

    /// Feed input; bytes for the guest are appended to `out`, actions to `actions`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>, actions: &mut Vec<EscapeAction>) {
        for &b in data {
            if self.pending {
                self.pending = false;
                let act = match (self.keys, b) {
                    (_, ESCAPE_PREFIX) => {
                        out.push(ESCAPE_PREFIX);
                        None
                    }
                    (EscapeKeys::Stdio, b'x' | b'X') => Some(EscapeAction::Quit),
                    (EscapeKeys::Stdio, b'h' | b'H' | b'?') => Some(EscapeAction::Help),
                    (EscapeKeys::Stdio, b'c' | b'C') => Some(EscapeAction::SwitchInput),
                    (EscapeKeys::Attach, b'd' | b'D') => Some(EscapeAction::Detach),
                    (EscapeKeys::TakeOver, b'w' | b'W') => Some(EscapeAction::TakeOver),
                    (EscapeKeys::Attach, other) => {
                        out.push(ESCAPE_PREFIX);
                        out.push(other);
                        None
                    }
                    _ => None,
                };
                actions.extend(act);
            } else if b == ESCAPE_PREFIX {
                self.pending = true;
            } else if self.keys == EscapeKeys::Attach && b == DETACH_KEY {
                actions.push(EscapeAction::Detach);
            } else {
                out.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(keys: EscapeKeys, chunks: &[&[u8]]) -> (Vec<u8>, Vec<EscapeAction>) {
        let mut p = EscapeParser::new(keys);
        let (mut out, mut acts) = (Vec::new(), Vec::new());
        for c in chunks {
            p.feed(c, &mut out, &mut acts);
        }
        (out, acts)
    }

    #[test]
    fn stdio_keys() {
        let (o, a) = run(
            EscapeKeys::Stdio,
            &[b"ab\x01", b"xc\x01\x01d\x01h\x01c\x01z!"],
        );
        assert_eq!(o, b"abc\x01d!");
        assert_eq!(
            a,
            vec![
                EscapeAction::Quit,
                EscapeAction::Help,
                EscapeAction::SwitchInput
            ]
        );
    }

    #[test]
    fn attach_keys() {
        let (o, a) = run(EscapeKeys::Attach, &[b"a\x01\x01\x01zb\x1d", b"\x01", b"d"]);
        assert_eq!(o, b"a\x01\x01zb");
        assert_eq!(a, vec![EscapeAction::Detach, EscapeAction::Detach]);
    }

    #[test]
    fn takeover_key() {
        let (o, a) = run(EscapeKeys::TakeOver, &[b"ls\x01w"]);
        assert_eq!(o, b"ls");
        assert_eq!(a, vec![EscapeAction::TakeOver]);
    }

    #[test]
    fn not_a_tty_is_left_alone() {
        // In tests stdin is rarely a tty; a pipe certainly is not.
        let mut fds = [0; 2];
        // SAFETY: fds is a valid 2-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert!(RawMode::enter(fds[0]).unwrap().is_none());
        // SAFETY: closing the fds we just created.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}
