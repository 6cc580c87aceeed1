//! Who a console client is: tokens (secrets read from files) and the judgement of a
//! client's first bytes. Pure logic, no I/O on sockets: `listener.rs` feeds it what a
//! pending connection sent (the fuzz target `console_greeting` feeds it anything).
//!
//! The protocol, on an authenticated socket (plain or inside TLS):
//!
//! ```text
//! client: token SECRET\n           (\r\n accepted; at most MAX_LINE bytes)
//! server: microvm: ok writer\r\n   (or "ok viewer"), then the history and live output
//!   or    microvm: error: ...\r\n  and the connection is closed
//! ```
//!
//! Anything else is refused as soon as its first bytes show it cannot become a token
//! line: an HTTP request gets an HTTP 403 (a browser or curl shows why), a TLS hello on
//! a plain port and other bytes get one `microvm: error:` line. Nothing a client sends
//! before it is admitted reaches the guest, and it receives no output before that.
//!
//! Secrets are compared in constant time (for equal lengths), writer and viewer token
//! both, whichever matches.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::spec::AuthSpec;

#[cfg(feature = "fuzzing")]
pub mod fuzzing;

/// Shortest token accepted (printable ASCII, so about 6 bits a byte).
pub const MIN_TOKEN: usize = 16;
/// Longest token accepted.
pub const MAX_TOKEN: usize = 256;
/// Longest first line a client may send (`token ` + a token + `\r\n`).
pub const MAX_LINE: usize = 6 + MAX_TOKEN + 2;
/// The keyword a first line starts with.
const KEYWORD: &[u8] = b"token ";
/// HTTP methods whose request line is refused with an HTTP answer.
const HTTP_METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PRI ",
];

/// Errors loading a token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file cannot be read.
    #[error("cannot read token file '{}': {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a regular file (a FIFO would block the start, a device makes no sense).
    #[error("token file '{}' is not a regular file", .path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
    },
    /// Others may read or change it.
    #[error("token file '{}' has mode {mode:04o}: other users could read or change the secret (chmod 600 it)", .path.display())]
    Shared {
        /// The file.
        path: PathBuf,
        /// Its permissions.
        mode: u32,
    },
    /// Too short, too long or not printable.
    #[error("token file '{}': {why} (one line of {MIN_TOKEN} to {MAX_TOKEN} printable ASCII characters without spaces, e.g. from `head -c 24 /dev/urandom | base64 > FILE`)", .path.display())]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The viewer token would also be the writer's.
    #[error("the viewer token and the writer token are the same: a viewer could type")]
    SameTokens,
}

/// A secret: compared in constant time, never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(..{} bytes)", self.0.len())
    }
}

impl Secret {
    /// A secret from its bytes, checked like a token file's content.
    pub fn new(bytes: &[u8]) -> Result<Secret, String> {
        if bytes.len() < MIN_TOKEN {
            return Err(format!("{} characters is too short", bytes.len()));
        }
        if bytes.len() > MAX_TOKEN {
            return Err(format!("{} characters is too long", bytes.len()));
        }
        if let Some(b) = bytes.iter().find(|b| !(0x21..=0x7e).contains(*b)) {
            return Err(format!(
                "it holds a space, a control or a non-ASCII byte (0x{b:02x})"
            ));
        }
        Ok(Secret(bytes.to_vec()))
    }

    /// The secret's bytes (for the client's token line).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Constant time for inputs of its length.
    fn matches(&self, presented: &[u8]) -> bool {
        if presented.len() != self.0.len() {
            return false;
        }
        let diff = self
            .0
            .iter()
            .zip(presented)
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

/// Reads a token file: a regular file nobody else may read or write, whose content
/// (one trailing newline removed) is [`MIN_TOKEN`] to [`MAX_TOKEN`] printable ASCII
/// characters without spaces.
pub fn read_token_file(path: &Path) -> Result<Secret, AuthError> {
    let read_err = |source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    };
    // O_NONBLOCK: a FIFO put there must not hang the start in open.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(read_err)?;
    let m = f.metadata().map_err(read_err)?;
    if !m.is_file() {
        return Err(AuthError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    let mode = m.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuthError::Shared {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut buf = Vec::new();
    f.take(MAX_TOKEN as u64 + 3)
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    let text = buf
        .strip_suffix(b"\r\n")
        .or_else(|| buf.strip_suffix(b"\n"))
        .unwrap_or(&buf);
    Secret::new(text).map_err(|why| AuthError::Bad {
        path: path.to_path_buf(),
        why,
    })
}

/// What an admitted client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole {
    /// Watch and type.
    Writer,
    /// Watch only.
    Viewer,
}

impl ClientRole {
    /// The line an admitted client is told first.
    pub fn ok_line(self) -> &'static str {
        match self {
            ClientRole::Writer => "microvm: ok writer\r\n",
            ClientRole::Viewer => "microvm: ok viewer\r\n",
        }
    }
}

/// A listener's tokens.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// May type (a viewer's on a `ro` console).
    pub writer: Option<Secret>,
    /// May watch.
    pub viewer: Option<Secret>,
}

impl Tokens {
    /// Reads the token files `auth` names (at start, before the event loop).
    pub fn load(auth: &AuthSpec) -> Result<Tokens, AuthError> {
        let writer = auth
            .token_file
            .as_deref()
            .map(read_token_file)
            .transpose()?;
        let viewer = auth
            .viewer_token_file
            .as_deref()
            .map(read_token_file)
            .transpose()?;
        if writer.is_some() && writer == viewer {
            return Err(AuthError::SameTokens);
        }
        Ok(Tokens { writer, viewer })
    }

    /// True when clients must send a token line.
    pub fn required(&self) -> bool {
        self.writer.is_some() || self.viewer.is_some()
    }

    /// The role `presented` proves, if any (both secrets are always compared).
    pub fn check(&self, presented: &[u8]) -> Option<ClientRole> {
        let w = self.writer.as_ref().is_some_and(|s| s.matches(presented));
        let v = self.viewer.as_ref().is_some_and(|s| s.matches(presented));
        match (w, v) {
            (true, _) => Some(ClientRole::Writer),
            (false, true) => Some(ClientRole::Viewer),
            _ => None,
        }
    }
}

/// Why a client was refused; [`Refusal::reply`] is what it is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A well-formed token line with a token that is neither.
    WrongToken,
    /// An HTTP request (a browser, curl, a web page's fetch).
    Http,
    /// A TLS hello on a plain port.
    Tls,
    /// Anything else that cannot become a token line.
    NotProtocol,
    /// A token line longer than [`MAX_LINE`].
    TooLong,
    /// Nothing (complete) within the handshake deadline.
    Timeout,
}

impl Refusal {
    /// What the client is told before the connection closes.
    pub fn reply(self) -> &'static str {
        match self {
            Refusal::WrongToken => "microvm: error: wrong token\r\n",
            Refusal::Http => {
                "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 90\r\nConnection: close\r\n\r\nThis is a microvm console, not a web server; it takes 'token SECRET' from microvm attach.\n"
            }
            Refusal::Tls => {
                "microvm: error: this console speaks plain TCP, not TLS (attach without --ca)\r\n"
            }
            Refusal::NotProtocol => {
                "microvm: error: expected 'token SECRET' as the first line (microvm attach --token-file FILE sends it)\r\n"
            }
            Refusal::TooLong => "microvm: error: first line too long\r\n",
            Refusal::Timeout => "microvm: error: no token in time\r\n",
        }
    }

    /// A few words for the log.
    pub fn what(self) -> &'static str {
        match self {
            Refusal::WrongToken => "wrong token",
            Refusal::Http => "an HTTP request",
            Refusal::Tls => "a TLS hello on a plain port",
            Refusal::NotProtocol => "not the console protocol",
            Refusal::TooLong => "first line too long",
            Refusal::Timeout => "no token in time",
        }
    }
}

/// The verdict on what a client sent so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    /// It may still become a token line: wait for more.
    NeedMore,
    /// A complete line with a valid token.
    Admit(ClientRole),
    /// Refused.
    Refuse(Refusal),
}

/// How many of the bytes `available` (what the socket has now) belong to a first line
/// of which `have` bytes were taken already: up to and including the first newline, and
/// never past [`MAX_LINE`] in all. The rest is not read: it is the client's input once
/// it is admitted.
pub fn line_part(have: usize, available: &[u8]) -> usize {
    let room = MAX_LINE.saturating_sub(have).min(available.len());
    available[..room]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(room, |i| i + 1)
}

/// Judges `sent`, everything a client sent so far (up to and including its first
/// newline, at most [`MAX_LINE`] bytes: the caller reads no further).
pub fn judge(sent: &[u8], tokens: &Tokens) -> Greeting {
    let line_end = sent.iter().position(|&b| b == b'\n');
    let head = &sent[..line_end.unwrap_or(sent.len())];
    if let Some(token) = head.strip_prefix(KEYWORD) {
        return match line_end {
            None if sent.len() >= MAX_LINE => Greeting::Refuse(Refusal::TooLong),
            None => Greeting::NeedMore,
            Some(_) => {
                let token = token.strip_suffix(b"\r").unwrap_or(token);
                match tokens.check(token) {
                    Some(role) => Greeting::Admit(role),
                    None => Greeting::Refuse(Refusal::WrongToken),
                }
            }
        };
    }
    if KEYWORD.starts_with(sent) {
        return Greeting::NeedMore;
    }
    if sent.first() == Some(&0x16) {
        return Greeting::Refuse(Refusal::Tls);
    }
    if HTTP_METHODS.iter().any(|m| sent.starts_with(m)) {
        return Greeting::Refuse(Refusal::Http);
    }
    if line_end.is_none() && HTTP_METHODS.iter().any(|m| m.starts_with(sent)) {
        return Greeting::NeedMore;
    }
    Greeting::Refuse(Refusal::NotProtocol)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::PermissionsExt;

    fn tokens() -> Tokens {
        Tokens {
            writer: Some(Secret::new(b"writer-secret-0123456789").unwrap()),
            viewer: Some(Secret::new(b"viewer-secret-0123456789").unwrap()),
        }
    }

    #[test]
    fn token_lines() {
        let t = tokens();
        let w = ClientRole::Writer;
        assert_eq!(
            judge(b"token writer-secret-0123456789\n", &t),
            Greeting::Admit(w)
        );
        assert_eq!(
            judge(b"token writer-secret-0123456789\r\n", &t),
            Greeting::Admit(w)
        );
        assert_eq!(
            judge(b"token viewer-secret-0123456789\n", &t),
            Greeting::Admit(ClientRole::Viewer)
        );
        for wrong in [
            &b"token writer-secret-012345678\n"[..],
            b"token writer-secret-01234567899\n",
            b"token \n",
            b"token  writer-secret-0123456789\n",
        ] {
            assert_eq!(judge(wrong, &t), Greeting::Refuse(Refusal::WrongToken));
        }
        for partial in [&b""[..], b"t", b"toke", b"token ", b"token writer"] {
            assert_eq!(judge(partial, &t), Greeting::NeedMore, "{partial:?}");
        }
        let long = [KEYWORD, &[b'a'; MAX_LINE][..]].concat();
        assert_eq!(
            judge(&long[..MAX_LINE], &t),
            Greeting::Refuse(Refusal::TooLong)
        );
    }

    #[test]
    fn other_traffic_is_refused_early() {
        let t = tokens();
        let r = |s: &[u8]| judge(s, &t);
        assert_eq!(
            r(b"POST / HTTP/1.1\r\nHost: x\r\n"),
            Greeting::Refuse(Refusal::Http)
        );
        assert_eq!(r(b"GET "), Greeting::Refuse(Refusal::Http));
        assert_eq!(r(b"PO"), Greeting::NeedMore);
        assert_eq!(r(b"\x16\x03\x01\x02\x00"), Greeting::Refuse(Refusal::Tls));
        assert_eq!(r(b"echo pwned\n"), Greeting::Refuse(Refusal::NotProtocol));
        assert_eq!(r(b"x"), Greeting::Refuse(Refusal::NotProtocol));
        assert_eq!(r(b"TOKEN "), Greeting::Refuse(Refusal::NotProtocol));
        assert_eq!(r(b"\n"), Greeting::Refuse(Refusal::NotProtocol));
        let http = Refusal::Http.reply();
        let body = &http[http.find("\r\n\r\n").unwrap() + 4..];
        assert!(http.contains(&format!("Content-Length: {}\r\n", body.len())));
    }

    #[test]
    fn secrets_are_checked() {
        assert!(Secret::new(b"short").is_err());
        assert!(Secret::new(&[b'a'; MAX_TOKEN + 1]).is_err());
        assert!(Secret::new(b"has a space in it!!").is_err());
        assert!(Secret::new("nön-ascii-secret-1234".as_bytes()).is_err());
        assert_eq!(
            format!("{:?}", Secret::new(b"0123456789abcdef").unwrap()),
            "Secret(..16 bytes)"
        );
        let t = Tokens {
            writer: None,
            viewer: Some(Secret::new(b"viewer-secret-0123456789").unwrap()),
        };
        assert_eq!(
            judge(b"token writer-secret-0123456789\n", &t),
            Greeting::Refuse(Refusal::WrongToken)
        );
    }

    #[test]
    fn token_files() {
        let d = std::env::temp_dir().join(format!("mvauth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("t");
        std::fs::write(&p, b"0123456789abcdefXYZ\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_token_file(&p).unwrap().expose(),
            b"0123456789abcdefXYZ"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token_file(&p).unwrap_err().to_string();
        assert!(e.contains("mode 0644"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, b"short\n").unwrap();
        let e = read_token_file(&p).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");
        std::fs::write(&p, b"two\nlines-of-secret-text\n").unwrap();
        assert!(read_token_file(&p).is_err());
        assert!(read_token_file(&d.join("missing")).is_err());
        assert!(matches!(
            read_token_file(&d),
            Err(AuthError::NotRegular { .. })
        ));
        std::fs::write(&p, b"0123456789abcdefXYZ").unwrap();
        let same = AuthSpec {
            token_file: Some(p.clone()),
            viewer_token_file: Some(p.clone()),
            ..AuthSpec::default()
        };
        assert!(matches!(Tokens::load(&same), Err(AuthError::SameTokens)));
        let _ = std::fs::remove_dir_all(&d);
    }

    proptest! {
        /// Growing input: the verdict never goes from final back to NeedMore, and once
        /// final it stays the same (the caller stops reading at the first newline).
        #[test]
        fn verdicts_are_monotonic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let t = tokens();
            let mut last = Greeting::NeedMore;
            let end = data.iter().position(|&b| b == b'\n').map_or(data.len(), |i| i + 1);
            for n in 0..=end.min(MAX_LINE) {
                let g = judge(&data[..n], &t);
                if last != Greeting::NeedMore {
                    prop_assert_eq!(g, last);
                }
                last = g;
            }
        }
    }
}
