//! `--send-after PATTERN TEXT`: scripted input without a guest agent. Once PATTERN has
//! appeared on the `--console` hub's output, TEXT is typed into the guest; the steps run
//! in the order given, each pattern looked for after the previous one's match (so
//! `--send-after 'login: ' 'root\n' --send-after 'Password: ' 'secret\n'` logs in at a
//! getty). TEXT takes escapes for what a keyboard sends: `\n` (Enter sends `\r` on a
//! terminal; a getty takes either), `\r`, `\t`, `\e` (Escape), `\\`, `\xHH`, and `\cX`
//! for Ctrl-X (`\cc` is Ctrl-C, `\cd` Ctrl-D).
//!
//! [`Script`] is the pure part (feed output chunks, get the texts to type); [`attach`]
//! connects it to a hub: an observer that matches, and one end of a socketpair given to
//! [`crate::mux::Hub::add_input_source`], through which the texts reach the guest like
//! any client's input (whole, in order, paced by the guest's reading). The texts of a
//! run are bounded ([`MAX_TEXT`] in all, [`MAX_STEPS`] steps), less than the socketpair
//! holds, so a write never blocks the event loop and nothing is lost while the guest is
//! not reading.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::ci::console_checks::Pattern;
use crate::mux::Hub;

/// The most text all steps of a run may type, in bytes.
pub const MAX_TEXT: usize = 64 << 10;
/// The most steps a run may have. With [`MAX_TEXT`] this keeps what the socketpair may
/// have to hold (the texts and the kernel's per-write overhead, ~150 KiB at worst) under
/// the default socket send buffer (~208 KiB).
pub const MAX_STEPS: usize = 64;

/// Errors in `--send-after` values (usage errors).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendAfterError {
    /// An empty pattern would match at once.
    #[error("--send-after '' ...: empty pattern; give the text to wait for on the console")]
    EmptyPattern,
    /// An escape the text does not know.
    #[error("--send-after {pattern:?} {text:?}: {why}; use \\n \\r \\t \\e \\\\ \\xHH or \\cX")]
    BadEscape {
        /// The step's pattern.
        pattern: String,
        /// The text given.
        text: String,
        /// What is wrong.
        why: String,
    },
    /// More text than a run may type.
    #[error("--send-after: {0} bytes of text in all; at most {MAX_TEXT}")]
    TooMuch(usize),
    /// More steps than a run may have.
    #[error("--send-after: {0} steps; at most {MAX_STEPS}")]
    TooManySteps(usize),
    /// The socketpair could not be made.
    #[error("--send-after: cannot create its input socket: {0}")]
    Socket(String),
}

/// One step: wait for `pattern`, then type `text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What to wait for on the console.
    pub pattern: String,
    /// What to type (escapes resolved).
    pub text: Vec<u8>,
}

/// Resolves the escapes in `text` (see the module doc).
pub fn unescape(pattern: &str, text: &str) -> Result<Vec<u8>, SendAfterError> {
    let bad = |why: String| SendAfterError::BadEscape {
        pattern: pattern.to_string(),
        text: text.to_string(),
        why,
    };
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('n') => out.push(b'\n'),
            Some('r') => out.push(b'\r'),
            Some('t') => out.push(b'\t'),
            Some('e') => out.push(0x1b),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                let v = u8::from_str_radix(&hex, 16)
                    .ok()
                    .filter(|_| hex.len() == 2)
                    .ok_or_else(|| bad(format!("\\x{hex} needs two hex digits")))?;
                out.push(v);
            }
            Some('c') => match chars.next() {
                Some(k) if k.is_ascii_alphabetic() || "@[\\]^_?".contains(k) => {
                    let k = k.to_ascii_uppercase() as u8;
                    out.push(if k == b'?' { 0x7f } else { k & 0x1f });
                }
                other => {
                    return Err(bad(format!(
                        "\\c{} is not a control key",
                        other.unwrap_or(' ')
                    )));
                }
            },
            Some(other) => return Err(bad(format!("unknown escape \\{other}"))),
            None => return Err(bad("a lone \\ at the end".into())),
        }
    }
    Ok(out)
}

/// Builds the steps from `(PATTERN, TEXT)` pairs as given on the command line.
pub fn parse_steps(pairs: &[String]) -> Result<Vec<Step>, SendAfterError> {
    if pairs.len() / 2 > MAX_STEPS {
        return Err(SendAfterError::TooManySteps(pairs.len() / 2));
    }
    let mut steps = Vec::with_capacity(pairs.len() / 2);
    let mut total = 0;
    for pair in pairs.chunks(2) {
        let [pattern, text] = pair else {
            // clap takes exactly two values per occurrence.
            break;
        };
        if pattern.is_empty() {
            return Err(SendAfterError::EmptyPattern);
        }
        let text = unescape(pattern, text)?;
        total += text.len();
        steps.push(Step {
            pattern: pattern.clone(),
            text,
        });
    }
    if total > MAX_TEXT {
        return Err(SendAfterError::TooMuch(total));
    }
    Ok(steps)
}

/// The steps' progress over one output stream.
#[derive(Debug)]
pub struct Script {
    steps: Vec<(Pattern, Vec<u8>)>,
    next: usize,
    state: usize,
}

impl Script {
    /// A script that has typed nothing yet.
    pub fn new(steps: &[Step]) -> Script {
        Script {
            steps: steps
                .iter()
                .map(|s| (Pattern::new(&s.pattern), s.text.clone()))
                .collect(),
            next: 0,
            state: 0,
        }
    }

    /// Feeds an output chunk; returns the texts to type now, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        let mut typed = Vec::new();
        for &b in chunk {
            let Some((pattern, text)) = self.steps.get(self.next) else {
                break;
            };
            self.state = pattern.step(self.state, b);
            if self.state == pattern.len() {
                typed.push(text.clone());
                self.next += 1;
                self.state = 0;
            }
        }
        typed
    }

    /// Steps done, of how many.
    pub fn progress(&self) -> (usize, usize) {
        (self.next, self.steps.len())
    }
}

/// How many steps have typed their text (shared with the observer, read at the end).
pub type Progress = Arc<AtomicUsize>;

/// Watches `hub`'s output and types the steps' texts into it (see the module doc).
/// Returns the count of steps done, which the observer keeps up to date.
pub fn attach(hub: &mut Hub, steps: &[Step]) -> Result<Progress, SendAfterError> {
    let done = Progress::default();
    if steps.is_empty() {
        return Ok(done);
    }
    let (mut ours, theirs) =
        UnixStream::pair().map_err(|e| SendAfterError::Socket(e.to_string()))?;
    for s in [&ours, &theirs] {
        s.set_nonblocking(true)
            .map_err(|e| SendAfterError::Socket(e.to_string()))?;
    }
    hub.add_input_source("send-after", theirs);
    let mut script = Script::new(steps);
    let counter = done.clone();
    hub.add_observer(Box::new(move |chunk| {
        for text in script.feed(chunk) {
            counter.fetch_add(1, Ordering::Relaxed);
            // At most MAX_TEXT bytes in all, well below the socketpair's buffer: this
            // does not block nor come up short.
            if let Err(e) = ours.write_all(&text) {
                log::warn!("--send-after: cannot type: {e}");
            }
        }
    }));
    Ok(done)
}

/// One line for stderr when the run failed with steps left: the one it waited for.
pub fn waiting_for(steps: &[Step], done: usize) -> Option<String> {
    steps.get(done).map(|s| {
        format!(
            "--send-after: {done} of {} steps done; still waiting for {:?}",
            steps.len(),
            s.pattern
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(unescape("p", r"root\n").unwrap(), b"root\n");
        assert_eq!(
            unescape("p", r"a\tb\r\e\\\x41\cc\cD\c?").unwrap(),
            b"a\tb\r\x1b\\A\x03\x04\x7f"
        );
        assert_eq!(unescape("p", "é").unwrap(), "é".as_bytes());
        for bad in [r"\q", r"\x4", r"\xzz", r"\c1", "\\"] {
            let e = unescape("login:", bad).unwrap_err().to_string();
            assert!(e.starts_with("--send-after \"login:\" "), "{e}");
        }
    }

    #[test]
    fn steps_in_order_each_after_the_previous_match() {
        let steps = parse_steps(&[
            "login: ".into(),
            r"root\n".into(),
            "Password: ".into(),
            r"secret\n".into(),
            "# ".into(),
            r"echo hi\n".into(),
        ])
        .unwrap();
        let mut s = Script::new(&steps);
        // The later patterns before the first count for nothing.
        assert!(s.feed(b"Password: # boot\nhost log").is_empty());
        assert_eq!(s.feed(b"in: "), vec![b"root\n".to_vec()]);
        // Split across chunks; two steps in one chunk.
        assert!(s.feed(b"root\r\nPass").is_empty());
        assert_eq!(
            s.feed(b"word: \r\n# "),
            vec![b"secret\n".to_vec(), b"echo hi\n".to_vec()]
        );
        assert_eq!(s.progress(), (3, 3));
        assert!(s.feed(b"login: ").is_empty());
        assert_eq!(
            waiting_for(&steps, 1).as_deref(),
            Some(r#"--send-after: 1 of 3 steps done; still waiting for "Password: ""#)
        );
        assert_eq!(waiting_for(&steps, 3), None);
    }

    #[test]
    fn bounds_and_empty_patterns() {
        assert_eq!(
            parse_steps(&[String::new(), "x".into()]),
            Err(SendAfterError::EmptyPattern)
        );
        let big = "x".repeat(MAX_TEXT / 2 + 1);
        assert!(matches!(
            parse_steps(&["a".into(), big.clone(), "b".into(), big]),
            Err(SendAfterError::TooMuch(_))
        ));
        let many: Vec<String> = (0..2 * (MAX_STEPS + 1)).map(|i| format!("p{i}")).collect();
        assert_eq!(
            parse_steps(&many),
            Err(SendAfterError::TooManySteps(MAX_STEPS + 1))
        );
    }
}
