//! The console-greeting fuzz harness, shared by `fuzz/` (cargo-fuzz target
//! `console_greeting`) and the corpus replay test (`tests/fuzz_corpus.rs`): what an
//! untrusted client sends first, through the code that reads and judges it.
//!
//! Input: byte 0 picks the listener's tokens (bit 0: a writer token, bit 1: a viewer
//! token, neither: both); then chunks, each a length byte and that many bytes (what one
//! readiness event finds in the socket). The harness takes from each chunk what
//! `auth::line_part` says belongs to the first line and judges the line so far with
//! `auth::judge`, as `listener.rs` does for a plain socket. Properties checked, by
//! panicking:
//!
//! - nothing panics; no more than [`MAX_LINE`] bytes are ever taken, and nothing past
//!   the first newline;
//! - a final verdict comes by the first newline or the [`MAX_LINE`]th byte at the latest;
//! - the verdict does not depend on how the bytes were split into reads (the same
//!   stream fed byte by byte gives the same verdict, on a prefix of the same bytes);
//! - admission happens exactly when the line is `token SECRET` (optionally `\r`) and a
//!   newline, with SECRET one of the listener's tokens, and gives that token's role;
//! - every refusal has a reply that is one line (or an HTTP response) ending in `\n`.

use super::{ClientRole, Greeting, MAX_LINE, Secret, Tokens, judge, line_part};

const WRITER: &[u8] = b"fuzz-writer-token-0123";
const VIEWER: &[u8] = b"fuzz-viewer-token-4567";

/// What one input did, for tests that check the seeds reach each verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The final verdict (`NeedMore` if the input ended first).
    pub verdict: Greeting,
    /// Bytes taken from the client.
    pub taken: usize,
}

/// Feeds `chunks` as successive reads; the verdict and the bytes taken.
fn feed<'a>(tokens: &Tokens, chunks: impl Iterator<Item = &'a [u8]>) -> (Greeting, Vec<u8>) {
    let mut line = Vec::new();
    for chunk in chunks {
        let mut rest = chunk;
        while !rest.is_empty() {
            let n = line_part(line.len(), rest);
            assert!(
                n > 0 || line.len() >= MAX_LINE,
                "took nothing with room left"
            );
            line.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            assert!(line.len() <= MAX_LINE, "took {} bytes", line.len());
            let nl = line.iter().filter(|&&b| b == b'\n').count();
            assert!(
                nl <= 1 && (nl == 0 || line.ends_with(b"\n")),
                "read past the line"
            );
            match judge(&line, tokens) {
                Greeting::NeedMore => {
                    assert!(
                        !line.ends_with(b"\n") && line.len() < MAX_LINE,
                        "no verdict on a whole line: {line:?}"
                    );
                    if n == 0 {
                        break;
                    }
                }
                g => return (g, line),
            }
        }
    }
    (Greeting::NeedMore, line)
}

/// The verdict a token line deserves, computed the plain way.
fn reference(line: &[u8], tokens: &Tokens) -> Option<ClientRole> {
    let body = line.strip_suffix(b"\n")?;
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    let secret = body.strip_prefix(b"token ")?;
    let is = |s: &Option<Secret>| s.as_ref().is_some_and(|s| s.expose() == secret);
    if is(&tokens.writer) {
        Some(ClientRole::Writer)
    } else if is(&tokens.viewer) {
        Some(ClientRole::Viewer)
    } else {
        None
    }
}

/// Runs one input; panics when a property above does not hold.
pub fn run(data: &[u8]) -> Outcome {
    let (pick, mut rest) = match data.split_first() {
        Some((p, r)) => (p & 3, r),
        None => (0, data),
    };
    let secret = |s: &[u8]| Secret::new(s).ok();
    let tokens = Tokens {
        writer: (pick != 2).then(|| secret(WRITER)).flatten(),
        viewer: (pick != 1).then(|| secret(VIEWER)).flatten(),
    };
    let mut chunks: Vec<&[u8]> = Vec::new();
    while let Some((len, tail)) = rest.split_first() {
        let (chunk, after) = tail.split_at(usize::from(*len).min(tail.len()));
        chunks.push(chunk);
        rest = after;
    }
    let (verdict, line) = feed(&tokens, chunks.iter().copied());
    let stream: Vec<u8> = chunks.concat();
    let (bytewise, line2) = feed(&tokens, stream.chunks(1));
    // Byte by byte, the verdict comes as early as it can: on a prefix of what the
    // reads took (a refusal may come before the newline), never on other bytes.
    assert_eq!(verdict, bytewise, "depends on the split");
    assert!(line.starts_with(&line2), "{line:?} vs {line2:?}");
    match verdict {
        Greeting::Admit(role) => {
            assert_eq!(reference(&line, &tokens), Some(role), "admitted {line:?}");
        }
        Greeting::Refuse(r) => {
            assert_eq!(reference(&line, &tokens), None, "refused {line:?}");
            assert!(r.reply().ends_with('\n') && !r.what().is_empty());
        }
        Greeting::NeedMore => {
            assert!(line.len() < MAX_LINE && !line.contains(&b'\n'));
        }
    }
    Outcome {
        verdict,
        taken: line.len(),
    }
}
