//! The Ctrl-A escape keys: one incremental parser for the three key sets (the VMM's
//! terminal, `microvm attach`, a single-writer socket client), whose state survives
//! across reads, so a key pair split between two reads is still one key.

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
}
