//! The console-spec fuzz harness, shared by `fuzz/` (cargo-fuzz target `console_spec`) and
//! the corpus replay test (`tests/fuzz_corpus.rs`).
//!
//! Input: the bytes of a `--console` value (invalid UTF-8 is read lossily, as a shell
//! argument would be by a caller that converted it). Properties checked, by panicking
//! (which the fuzzer reports as a crash):
//!
//! - parsing never panics, and gives either a spec or an error;
//! - an error's message is one non-empty line (no control characters), and so is the
//!   spec as the `--console SPEC: ...` usage error quotes it (`one_line`);
//! - a spec has 1 to [`MAX_BACKENDS`] backends, its `Display` form parses back to the
//!   same spec, and displaying that again gives the same text (a canonical form).

use super::{ConsoleSpec, MAX_BACKENDS};

/// What one input did, for tests that check the seeds reach both paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The spec parsed; its canonical form.
    Parsed(String),
    /// The spec was refused with this message.
    Refused(String),
}

fn assert_one_line(what: &str, input: &str, msg: &str) {
    assert!(!msg.is_empty(), "{what}: empty message for {input:?}");
    assert!(
        !msg.chars().any(char::is_control),
        "{what}: message for {input:?} is not one plain line: {msg:?}"
    );
}

/// Runs one input; panics when a property above does not hold.
pub fn run(data: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(data);
    match text.parse::<ConsoleSpec>() {
        Ok(spec) => {
            assert!(
                (1..=MAX_BACKENDS).contains(&spec.backends.len()),
                "{text:?} gave {} backends",
                spec.backends.len()
            );
            let shown = spec.to_string();
            let back: ConsoleSpec = match shown.parse() {
                Ok(b) => b,
                Err(e) => panic!("{text:?} parsed, but its display {shown:?} does not: {e}"),
            };
            assert_eq!(back, spec, "{text:?} -> {shown:?} parses to another spec");
            assert_eq!(
                back.to_string(),
                shown,
                "display of {text:?} is not canonical"
            );
            Outcome::Parsed(shown)
        }
        Err(e) => {
            let msg = e.to_string();
            assert_one_line("SpecError", &text, &msg);
            // The `--console SPEC: ...` usage error adds the spec, quoted by `one_line`
            // (empty when the spec is).
            let quoted = super::one_line(&text);
            assert!(
                !quoted.chars().any(char::is_control),
                "the usage error's quote of {text:?} is not one plain line: {quoted:?}"
            );
            Outcome::Refused(msg)
        }
    }
}
