//! Watches the guest's console stream for a kernel panic, so that the reset the kernel does
//! after one (`panic=1`) is reported as a panic (exit status 125), and so that microvm stops
//! as soon as the kernel has finished printing it.

use crate::exit::{ExitNotifier, ExitReason};

const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";
const END_MARK: &[u8] = b"---[ end Kernel panic";
/// The longest line kept while looking for the marks.
const MAX_LINE: usize = 512;

/// Feeds on console output, line by line.
pub struct PanicWatch {
    exit: ExitNotifier,
    line: Vec<u8>,
    panic_line: Option<String>,
}

impl PanicWatch {
    /// Reports panics to `exit`.
    pub fn new(exit: ExitNotifier) -> Self {
        PanicWatch {
            exit,
            line: Vec::with_capacity(MAX_LINE),
            panic_line: None,
        }
    }

    /// Observes one chunk of console output.
    pub fn observe(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        let contains = |mark: &[u8]| line.windows(mark.len()).any(|w| w == mark);
        if self.panic_line.is_none() && contains(PANIC_MARK) {
            let start = line
                .windows(PANIC_MARK.len())
                .position(|w| w == PANIC_MARK)
                .unwrap_or(0);
            let text = String::from_utf8_lossy(&line[start..])
                .trim_end()
                .to_string();
            self.exit.note_panic(text.clone());
            self.panic_line = Some(text);
        } else if contains(END_MARK) {
            let text = self
                .panic_line
                .clone()
                .unwrap_or_else(|| String::from_utf8_lossy(&line).trim().to_string());
            self.exit.exit(ExitReason::GuestPanic(text));
        }
        self.line = line;
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_then_end_mark_exits() {
        let n = ExitNotifier::new().unwrap();
        let mut w = PanicWatch::new(n.clone());
        w.observe(
            b"[    1.0] Kernel panic - not syncing: sysrq triggered crash\r\n[ 1.1] Call Trace:\n",
        );
        assert_eq!(n.reason(), None);
        w.observe(b"[ 1.2] ---[ end Kernel panic - not syncing: sysrq");
        w.observe(b" triggered crash ]---\r\n");
        assert_eq!(
            n.reason(),
            Some(ExitReason::GuestPanic(
                "Kernel panic - not syncing: sysrq triggered crash".into()
            ))
        );
    }

    #[test]
    fn split_across_chunks_and_ordinary_text() {
        let n = ExitNotifier::new().unwrap();
        let mut w = PanicWatch::new(n.clone());
        for b in b"hello\nKernel pa".iter().chain(b"nic - not syncing: x\n") {
            w.observe(&[*b]);
        }
        n.exit(ExitReason::Reset);
        assert_eq!(n.reason().unwrap().exit_code(), 125);
        let m = ExitNotifier::new().unwrap();
        let mut w = PanicWatch::new(m.clone());
        w.observe(&[b'x'; 10_000]);
        w.observe(b"\nno panic here\n");
        m.exit(ExitReason::Reset);
        assert_eq!(m.reason(), Some(ExitReason::Reset));
    }
}
