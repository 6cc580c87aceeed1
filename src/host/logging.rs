//! One logger for the whole process, behind the `log` facade: microvm's own diagnostics
//! and those of the crates it uses (event-manager, vm-superio, ... show with
//! `RUST_LOG=debug` or `RUST_LOG=event_manager=trace`).
//!
//! Every line is `microvm: MESSAGE` on stderr, control characters escaped (a path with a
//! newline or an escape sequence stays one line and cannot drive the terminal), ended with
//! `\r\n` while the terminal is in raw mode.
//!
//! Invariants, whatever stderr is:
//! * Logging never blocks: a line is written only when stderr can take it now (`poll`
//!   says writable, and one line is at most `PIPE_BUF` bytes, so a pipe takes it whole);
//!   otherwise it is dropped and counted, and the count is reported with the next line
//!   that gets through. A stopped terminal or a pipe nobody drains cannot freeze the VMM.
//! * Logging never panics (no `eprintln!`): write errors are ignored.
//! * Logging is rate-limited: a burst of [`BURST`] lines, then [`PER_SECOND`] a second;
//!   what is suppressed is counted and reported the same way. A client storm or an
//!   accept loop in trouble cannot flood the log.
//!
//! [`final_line`] is for the few lines a run ends with (the exit reason, the console
//! tail): not rate-limited, and it waits a bounded time for stderr to take them.

use std::io;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Lines that may go out at once before the rate limit applies.
pub const BURST: u32 = 50;
/// Lines a second after the burst.
pub const PER_SECOND: u32 = 10;
/// The longest line written (longer messages are cut): `PIPE_BUF`, so that a pipe takes
/// a line whole or not at all.
const MAX_LINE: usize = 4096;
/// How long [`final_line`] waits in all for stderr to take its lines.
const FINAL_WAIT: Duration = Duration::from_secs(2);

/// `s` with control characters (newlines, escapes, NUL...) written as Rust escapes, so
/// that a message quoting user input stays one line and cannot drive the terminal.
pub fn one_line(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Which levels are shown, per target prefix (`RUST_LOG`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Filter {
    /// microvm's own messages (target `microvm...`) unless a directive says otherwise.
    own: LevelFilter,
    /// Everyone else's.
    others: LevelFilter,
    /// `target=level` directives, longest prefix wins.
    directives: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// `RUST_LOG` syntax: comma-separated `level` or `target=level`; unknown parts are
    /// ignored (a typo must not stop a VM).
    fn parse(spec: Option<&str>) -> Filter {
        let mut f = Filter {
            own: LevelFilter::Info,
            others: LevelFilter::Warn,
            directives: Vec::new(),
        };
        for part in spec.unwrap_or("").split(',').map(str::trim) {
            match part.split_once('=') {
                Some((target, level)) => {
                    if let Ok(l) = level.trim().parse() {
                        f.directives.push((target.trim().to_string(), l));
                    }
                }
                None => {
                    if let Ok(l) = part.parse::<LevelFilter>() {
                        // A bare level applies to everyone, but never hides microvm's
                        // own warnings and errors.
                        f.others = l;
                        f.own = l.max(LevelFilter::Warn);
                    }
                }
            }
        }
        f.directives
            .sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        f
    }

    fn level_for(&self, target: &str) -> LevelFilter {
        if let Some((_, l)) = self.directives.iter().find(|(t, _)| target.starts_with(t)) {
            return *l;
        }
        if target.starts_with("microvm") {
            self.own
        } else {
            self.others
        }
    }

    fn max(&self) -> LevelFilter {
        self.directives
            .iter()
            .map(|(_, l)| *l)
            .chain([self.own, self.others])
            .max()
            .unwrap_or(LevelFilter::Info)
    }
}

/// The rate limiter and the lines lost so far.
struct State {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
    unwritten: u64,
}

struct Logger {
    filter: OnceLock<Filter>,
    state: Mutex<Option<State>>,
}

static LOGGER: Logger = Logger {
    filter: OnceLock::new(),
    state: Mutex::new(None),
};

/// Installs the logger (idempotent; `RUST_LOG` is read once).
pub fn init() {
    let filter = LOGGER
        .filter
        .get_or_init(|| Filter::parse(std::env::var("RUST_LOG").ok().as_deref()));
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(filter.max());
    }
}

impl Logger {
    fn filter(&self) -> &Filter {
        self.filter
            .get_or_init(|| Filter::parse(std::env::var("RUST_LOG").ok().as_deref()))
    }

    /// Takes a token; false when the line is to be suppressed.
    fn admit(state: &mut State, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
        state.refilled = now;
        state.tokens = (state.tokens + elapsed * f64::from(PER_SECOND)).min(f64::from(BURST));
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            true
        } else {
            state.suppressed += 1;
            false
        }
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.filter().level_for(metadata.target())
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let state = guard.get_or_insert_with(|| State {
            tokens: f64::from(BURST),
            refilled: now,
            suppressed: 0,
            unwritten: 0,
        });
        if !Self::admit(state, now) {
            return;
        }
        let mut line = String::from("microvm: ");
        let lost = state.suppressed + state.unwritten;
        if lost > 0 {
            line.push_str(&format!(
                "({lost} earlier log lines not shown: {} rate-limited, {} stderr not writable){}microvm: ",
                state.suppressed,
                state.unwritten,
                line_end()
            ));
        }
        // Messages say in their own words how bad things are; only the chatty
        // levels are marked.
        let level = match record.level() {
            Level::Error | Level::Warn | Level::Info => "",
            Level::Debug => "debug: ",
            Level::Trace => "trace: ",
        };
        let target = record.target();
        let msg = one_line(&record.args().to_string());
        if target.starts_with("microvm") {
            line.push_str(&format!("{level}{msg}"));
        } else {
            line.push_str(&format!("{level}[{target}] {msg}"));
        }
        if write_line(&line, Duration::ZERO) {
            state.suppressed = 0;
            state.unwritten = 0;
        } else {
            state.unwritten += 1;
        }
    }

    fn flush(&self) {}
}

fn line_end() -> &'static str {
    if crate::host::term::raw_active() {
        "\r\n"
    } else {
        "\n"
    }
}

/// Writes `line` and a line end to stderr if it can take it within `wait`. True when
/// written.
fn write_line(line: &str, wait: Duration) -> bool {
    let mut text = line.to_string();
    let end = line_end();
    if text.len() + end.len() > MAX_LINE {
        let mut cut = MAX_LINE - end.len() - 3;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text.push_str(end);
    write_stderr(text.as_bytes(), wait)
}

/// Writes `bytes` (at most `PIPE_BUF`) to fd 2 once it is writable, waiting at most
/// `wait`. Never blocks longer, never panics.
fn write_stderr(bytes: &[u8], wait: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: libc::STDERR_FILENO,
        events: libc::POLLOUT,
        revents: 0,
    };
    let timeout = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: one valid pollfd; the timeout is bounded.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if r > 0 && pfd.revents & libc::POLLOUT != 0 {
            break;
        }
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return false;
    }
    // SAFETY: `bytes` is valid for its length; fd 2 is only written.
    let r = unsafe { libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len()) };
    r >= 0 && r as usize == bytes.len()
}

/// The time left for final lines (2 s in all for every final line of the process).
fn final_wait() -> Duration {
    static DEADLINE: OnceLock<Instant> = OnceLock::new();
    let deadline = *DEADLINE.get_or_init(|| Instant::now() + FINAL_WAIT);
    deadline.saturating_duration_since(Instant::now())
}

/// A line a run ends with (its exit reason, the boot time): `microvm: MSG`, not
/// rate-limited, written if stderr takes it within a bounded wait, never panics.
pub fn final_line(msg: &str) {
    write_line(&format!("microvm: {}", one_line(msg)), final_wait());
}

/// Like [`final_line`] without the `microvm: ` prefix (the console tail's lines).
pub fn final_raw(msg: &str) {
    write_line(&one_line(msg), final_wait());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_directives() {
        let f = Filter::parse(None);
        assert_eq!(f.level_for("microvm::mux::hub"), LevelFilter::Info);
        assert_eq!(f.level_for("event_manager"), LevelFilter::Warn);
        let f = Filter::parse(Some("debug"));
        assert_eq!(f.level_for("event_manager"), LevelFilter::Debug);
        assert_eq!(f.level_for("microvm"), LevelFilter::Debug);
        let f = Filter::parse(Some("error"));
        assert_eq!(
            f.level_for("microvm::x"),
            LevelFilter::Warn,
            "own warnings stay"
        );
        let f = Filter::parse(Some("vm_superio=trace,microvm::mux=debug,bogus=nope,,x"));
        assert_eq!(f.level_for("vm_superio::serial"), LevelFilter::Trace);
        assert_eq!(f.level_for("microvm::mux::hub"), LevelFilter::Debug);
        assert_eq!(f.level_for("microvm::vmm"), LevelFilter::Info);
        assert_eq!(f.max(), LevelFilter::Trace);
    }

    #[test]
    fn rate_limit_burst_then_per_second() {
        let t0 = Instant::now();
        let mut s = State {
            tokens: f64::from(BURST),
            refilled: t0,
            suppressed: 0,
            unwritten: 0,
        };
        let admitted = (0..BURST + 20)
            .filter(|_| Logger::admit(&mut s, t0))
            .count();
        assert_eq!(admitted, BURST as usize);
        assert_eq!(s.suppressed, 20);
        let later = t0 + Duration::from_secs(1);
        let admitted = (0..100).filter(|_| Logger::admit(&mut s, later)).count();
        assert_eq!(admitted, PER_SECOND as usize);
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(one_line("a\nb\x1b[2J"), "a\\nb\\u{1b}[2J");
        assert_eq!(one_line("plain"), "plain");
    }
}
