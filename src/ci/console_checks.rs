//! `--expect` and `--fail-on`: patterns matched against the guest's console stream, and
//! the verdict they give when the VM ends.
//!
//! Patterns are plain byte strings matched anywhere in the stream (across chunk and line
//! boundaries), each hub's stream on its own. `--expect` patterns must appear in the
//! order given, each after the end of the previous match; when the last one has, the VM
//! stops with [`ExitReason::ExpectMet`]. Any `--fail-on` pattern stops it at once with
//! [`ExitReason::FailOn`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::exit::{ExitNotifier, ExitReason};
use crate::mux::Observer;

/// How long a `--fail-on` match waits for the rest of its line.
pub const FAIL_LINE_GRACE: Duration = Duration::from_secs(1);

/// One pattern with its Knuth-Morris-Pratt failure table: fed a byte at a time, it finds
/// every occurrence in one pass, however the stream is chunked.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    text: String,
    fail: Vec<usize>,
}

impl Pattern {
    /// The table for `text` (non-empty).
    pub(crate) fn new(text: &str) -> Pattern {
        let p = text.as_bytes();
        let mut fail = vec![0; p.len()];
        let mut k = 0;
        for i in 1..p.len() {
            while k > 0 && p[i] != p[k] {
                k = fail[k - 1];
            }
            if p[i] == p[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Pattern {
            text: text.to_string(),
            fail,
        }
    }

    /// The state after `b`, from `state` (bytes of the pattern matched so far). Returns
    /// the pattern's length on a match.
    pub(crate) fn step(&self, mut state: usize, b: u8) -> usize {
        let p = self.text.as_bytes();
        if state == p.len() {
            state = self.fail[state - 1];
        }
        while state > 0 && p[state] != b {
            state = self.fail[state - 1];
        }
        if p[state] == b { state + 1 } else { 0 }
    }

    pub(crate) fn len(&self) -> usize {
        self.text.len()
    }
}

/// Partial-match state of one console stream.
#[derive(Debug, Default, Clone)]
struct StreamState {
    /// Bytes of `--expect` pattern `expect_for` matched so far.
    expect: usize,
    expect_for: usize,
    fail_on: Vec<usize>,
}

#[derive(Debug)]
struct State {
    expect: Vec<Pattern>,
    fail_on: Vec<Pattern>,
    /// Index of the next `--expect` pattern to look for.
    next: usize,
    /// The first `--fail-on` pattern seen.
    failed: Option<String>,
    /// A `--fail-on` match whose line is still being printed: the stream it is on, and
    /// when it was seen. The run stops at the end of that line (so the CI log shows the
    /// whole line), or [`FAIL_LINE_GRACE`] later.
    failing: Option<(usize, Instant)>,
    streams: Vec<StreamState>,
}

/// The patterns of one run, shared by the observers of every console hub.
#[derive(Clone)]
pub struct ConsoleChecks {
    state: Arc<Mutex<State>>,
    exit: ExitNotifier,
}

impl ConsoleChecks {
    /// Checks for `expect` (in order) and `fail_on` (any); reports to `exit`. Empty
    /// patterns are refused earlier (`config::check_patterns`) and ignored here.
    pub fn new(expect: &[String], fail_on: &[String], exit: ExitNotifier) -> ConsoleChecks {
        let pats = |v: &[String]| {
            v.iter()
                .filter(|p| !p.is_empty())
                .map(|p| Pattern::new(p))
                .collect()
        };
        ConsoleChecks {
            state: Arc::new(Mutex::new(State {
                expect: pats(expect),
                fail_on: pats(fail_on),
                next: 0,
                failed: None,
                failing: None,
                streams: Vec::new(),
            })),
            exit,
        }
    }

    /// True when there is nothing to look for.
    pub fn is_empty(&self) -> bool {
        self.with(|s| s.expect.is_empty() && s.fail_on.is_empty())
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// An observer for one hub's stream.
    pub fn observer(&self) -> Observer {
        let stream = self.with(|s| {
            let fail_on = vec![0; s.fail_on.len()];
            s.streams.push(StreamState {
                expect: 0,
                expect_for: s.next,
                fail_on,
            });
            s.streams.len() - 1
        });
        let me = self.clone();
        Box::new(move |chunk| me.observe(stream, chunk))
    }

    fn observe(&self, stream: usize, chunk: &[u8]) {
        let event = self.with(|s| s.feed(stream, chunk));
        match event {
            Some(Event::AllExpected) => self.exit.exit(ExitReason::ExpectMet),
            Some(Event::Failed(p)) => self.exit.exit(ExitReason::FailOn(p)),
            None => {}
        }
    }

    /// Ends the run for a `--fail-on` match whose line has not ended within
    /// [`FAIL_LINE_GRACE`]. The event loop calls this at least twice a second.
    pub fn poll(&self) {
        let overdue = self.with(|s| match s.failing {
            Some((_, at)) if at.elapsed() >= FAIL_LINE_GRACE => {
                s.failing = None;
                s.failed.clone()
            }
            _ => None,
        });
        if let Some(p) = overdue {
            self.exit.exit(ExitReason::FailOn(p));
        }
    }

    /// How many `--expect` patterns have appeared, of how many.
    pub fn expect_progress(&self) -> (usize, usize) {
        self.with(|s| (s.next, s.expect.len()))
    }

    /// The `--fail-on` pattern that appeared, if any.
    pub fn failed(&self) -> Option<String> {
        self.with(|s| s.failed.clone())
    }

    /// The run's verdict once the VM has stopped for `reason`: a `--fail-on` match that
    /// arrived with the guest's last output outweighs a clean stop, and a clean stop
    /// before every `--expect` pattern appeared is a failure. Other reasons stand.
    pub fn verdict(&self, reason: ExitReason) -> ExitReason {
        let clean = matches!(
            reason,
            ExitReason::PowerOff
                | ExitReason::Reset
                | ExitReason::GuestExit(0)
                | ExitReason::ExpectMet
        );
        if !clean {
            return reason;
        }
        if let Some(p) = self.failed() {
            return ExitReason::FailOn(p);
        }
        self.with(|s| match s.expect.get(s.next) {
            Some(missing) if reason != ExitReason::ExpectMet => ExitReason::ExpectUnmet {
                matched: s.next,
                missing: missing.text.clone(),
                stopped: Box::new(reason),
            },
            _ => reason,
        })
    }
}

enum Event {
    AllExpected,
    Failed(String),
}

impl State {
    fn feed(&mut self, stream: usize, chunk: &[u8]) -> Option<Event> {
        if let Some((on, _)) = self.failing {
            if on == stream && chunk.contains(&b'\n') {
                self.failing = None;
                return self.failed.clone().map(Event::Failed);
            }
            return None;
        }
        if self.failed.is_some() || (self.next >= self.expect.len() && self.fail_on.is_empty()) {
            return None;
        }
        let next = self.next;
        let st = self.streams.get_mut(stream)?;
        if st.expect_for != next {
            // Another stream matched the pattern this one was partway into.
            st.expect = 0;
            st.expect_for = next;
        }
        for (at, &b) in chunk.iter().enumerate() {
            for (i, p) in self.fail_on.iter().enumerate() {
                st.fail_on[i] = p.step(st.fail_on[i], b);
                if st.fail_on[i] == p.len() {
                    self.failed = Some(p.text.clone());
                    if chunk[at..].contains(&b'\n') {
                        return Some(Event::Failed(p.text.clone()));
                    }
                    self.failing = Some((stream, Instant::now()));
                    return None;
                }
            }
            let Some(p) = self.expect.get(self.next) else {
                continue;
            };
            st.expect = p.step(st.expect, b);
            if st.expect == p.len() {
                // The next pattern is looked for after this match, on every stream.
                self.next += 1;
                st.expect = 0;
                st.expect_for = self.next;
                if self.next == self.expect.len() {
                    return Some(Event::AllExpected);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks(expect: &[&str], fail_on: &[&str]) -> (ConsoleChecks, ExitNotifier) {
        let n = ExitNotifier::new().unwrap();
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        (ConsoleChecks::new(&v(expect), &v(fail_on), n.clone()), n)
    }

    #[test]
    fn kmp_finds_overlapping_prefixes() {
        let p = Pattern::new("aab");
        let mut st = 0;
        let mut hits = 0;
        for &b in b"aaabaab" {
            st = p.step(st, b);
            if st == p.len() {
                hits += 1;
            }
        }
        assert_eq!(hits, 2);
    }

    #[test]
    fn expects_in_order_across_chunks() {
        let (c, n) = checks(&["first", "second"], &[]);
        let mut obs = c.observer();
        // "second" before "first" does not count; split across chunks does.
        obs(b"second... fir");
        obs(b"st then sec");
        assert_eq!(c.expect_progress(), (1, 2));
        assert_eq!(n.reason(), None);
        obs(b"ond!");
        assert_eq!(c.expect_progress(), (2, 2));
        assert_eq!(n.reason(), Some(ExitReason::ExpectMet));
    }

    #[test]
    fn next_expect_starts_after_the_previous_match() {
        let (c, n) = checks(&["ab", "ab"], &[]);
        let mut obs = c.observer();
        obs(b"xab");
        assert_eq!(n.reason(), None);
        obs(b"b");
        assert_eq!(n.reason(), None, "the second 'ab' may not reuse the first");
        obs(b"ab");
        assert_eq!(n.reason(), Some(ExitReason::ExpectMet));
    }

    #[test]
    fn fail_on_stops_at_the_end_of_its_line() {
        let (c, n) = checks(&["never"], &["Kernel panic", "BUG:"]);
        let mut obs = c.observer();
        for &b in b"ok\r\n[ 1.0] BUG: unable to handle" {
            obs(&[b]);
        }
        assert_eq!(c.failed().as_deref(), Some("BUG:"));
        assert_eq!(n.reason(), None, "the rest of the line is still coming");
        c.poll();
        assert_eq!(n.reason(), None, "within the grace time");
        obs(b" page fault\r\n");
        assert_eq!(n.reason(), Some(ExitReason::FailOn("BUG:".into())));
        // A match in a chunk that ends its line stops at once.
        let (c, n) = checks(&[], &["BUG:"]);
        c.observer()(b"BUG: x\nmore");
        assert_eq!(n.reason(), Some(ExitReason::FailOn("BUG:".into())));
    }

    #[test]
    fn fail_on_without_a_line_end_stops_after_the_grace() {
        let (c, n) = checks(&[], &["BUG:"]);
        c.observer()(b"BUG: no newline ever");
        assert_eq!(n.reason(), None);
        std::thread::sleep(FAIL_LINE_GRACE + Duration::from_millis(50));
        c.poll();
        assert_eq!(n.reason(), Some(ExitReason::FailOn("BUG:".into())));
    }

    #[test]
    fn streams_are_matched_separately() {
        let (c, n) = checks(&["abc"], &[]);
        let mut a = c.observer();
        let mut b = c.observer();
        a(b"ab");
        b(b"c");
        assert_eq!(n.reason(), None, "no match across two hubs' streams");
        b(b"abc");
        assert_eq!(n.reason(), Some(ExitReason::ExpectMet));
    }

    #[test]
    fn verdicts() {
        let (c, _) = checks(&["one", "two"], &[]);
        let mut obs = c.observer();
        obs(b"one");
        match c.verdict(ExitReason::PowerOff) {
            ExitReason::ExpectUnmet {
                matched: 1,
                missing,
                stopped,
            } => {
                assert_eq!(missing, "two");
                assert_eq!(*stopped, ExitReason::PowerOff);
            }
            other => panic!("{other:?}"),
        }
        // A failing guest exit code, a timeout or a signal stand as they are.
        assert_eq!(
            c.verdict(ExitReason::GuestExit(3)),
            ExitReason::GuestExit(3)
        );
        assert_eq!(c.verdict(ExitReason::Signal(15)), ExitReason::Signal(15));
        obs(b"two");
        assert_eq!(c.verdict(ExitReason::ExpectMet), ExitReason::ExpectMet);
        assert_eq!(c.verdict(ExitReason::PowerOff), ExitReason::PowerOff);

        let (f, _) = checks(&[], &["BUG:"]);
        let mut obs = f.observer();
        obs(b"BUG: x");
        assert_eq!(
            f.verdict(ExitReason::PowerOff),
            ExitReason::FailOn("BUG:".into())
        );
        assert_eq!(
            f.verdict(ExitReason::Timeout(Duration::from_secs(1)))
                .kind(),
            "timeout"
        );
        let (none, _) = checks(&[], &[]);
        assert!(none.is_empty());
        assert_eq!(none.verdict(ExitReason::Reset), ExitReason::Reset);
    }
}
