//! Interim console: guest output to stdout, stdin to the UART. Replaced by the console hub.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::panic_watch::PanicWatch;

/// Output sink: stdout, watched for panics.
pub struct StdoutSink {
    watch: Arc<Mutex<PanicWatch>>,
}

impl StdoutSink {
    /// A sink feeding `watch`.
    pub fn new(watch: Arc<Mutex<PanicWatch>>) -> Self {
        StdoutSink { watch }
    }
}

impl Write for StdoutSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut w) = self.watch.lock() {
            w.observe(buf);
        }
        // A closed stdout must not stop the guest.
        let _ = std::io::stdout().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stdout().flush();
        Ok(())
    }
}

/// Where input goes.
pub trait InputTarget: Send {
    /// Offers bytes; returns how many were taken.
    fn accept(&mut self, data: &[u8]) -> usize;
}

/// Reads stdin and feeds the target, holding what does not fit until `drained` fires.
pub struct StdinFeeder {
    target: Box<dyn InputTarget>,
    drained: Arc<EventFd>,
    pending: Vec<u8>,
    stdin_open: bool,
}

impl StdinFeeder {
    /// A feeder for `target`, whose `drained` eventfd fires when it has room again.
    pub fn new(target: Box<dyn InputTarget>, drained: Arc<EventFd>) -> Self {
        StdinFeeder {
            target,
            drained,
            pending: Vec::new(),
            stdin_open: true,
        }
    }

    fn push(&mut self) {
        let n = self.target.accept(&self.pending);
        self.pending.drain(..n);
    }
}

impl MutEventSubscriber for StdinFeeder {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            self.push();
            if self.pending.is_empty() && self.stdin_open {
                let _ = ops.add(Events::new(&stdin, EventSet::IN));
            }
            return;
        }
        let mut buf = [0u8; 4096];
        // SAFETY: reads into a stack buffer of the given length from fd 0, bypassing std's
        // buffered Stdin (whose buffer epoll cannot see).
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(0) | Err(_) => {
                self.stdin_open = false;
                let _ = ops.remove(Events::new(&stdin, EventSet::IN));
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.push();
                if !self.pending.is_empty() {
                    let _ = ops.remove(Events::new(&stdin, EventSet::IN));
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&std::io::stdin(), EventSet::IN));
        let _ = ops.add(Events::new(self.drained.as_ref(), EventSet::IN));
    }
}
