//! The input path: a backend is readable -> one read, as large as the input buffer has
//! room for (or any size for a source whose input is dropped) -> its listener's verdict
//! (single-writer) -> the escape keys (the terminal) -> the input buffer, whole ->
//! `Frontends::feed`.

use super::Hub;
use crate::mux::endpoint::{Closing, Endpoint, EndpointId, InputMode, Owner, Read};
use crate::mux::escape::{EscapeAction, STDIO_ESCAPE_HELP};
use crate::mux::listener::{Keyboard, READ_ONLY_NOTICE};

/// What reading from a source gave.
pub(super) enum Outcome {
    Data,
    Eof,
    WouldBlock,
    NoSpace,
    Failed,
}

impl Hub {
    pub(super) fn is_stdin(&self, id: EndpointId) -> bool {
        self.endpoints
            .get(&id)
            .is_some_and(|e| !e.is_client() && e.sink.is_none() && e.fd == Some(libc::STDIN_FILENO))
    }

    /// True when endpoint `id`'s input is read and dropped (viewers, non-holders).
    pub(super) fn discards(&self, id: EndpointId, ep: &Endpoint) -> bool {
        let Some(source) = &ep.source else {
            return false;
        };
        match ep.owner {
            Owner::Client { listener, .. } => self
                .listeners
                .get(listener)
                .is_none_or(|l| l.discards(id, source)),
            Owner::Backend => matches!(source.mode, InputMode::Viewer),
        }
    }

    pub(super) fn read_from(&mut self, id: EndpointId) -> Outcome {
        let Some(ep) = self.endpoints.get(&id) else {
            return Outcome::Failed;
        };
        if ep.is_closing() || !ep.input_live() {
            return Outcome::Failed;
        }
        let discard = self.discards(id, ep);
        let max = match &ep.source {
            Some(s) if !discard => self.input.space_for(s.share()).min(self.scratch.len()),
            _ => self.scratch.len(),
        };
        if max == 0 {
            return Outcome::NoSpace;
        }
        let mut buf = std::mem::take(&mut self.scratch);
        let outcome = match self
            .endpoints
            .get_mut(&id)
            .map(|ep| ep.read(&mut buf[..max]))
        {
            Some(Read::Data(n)) => {
                self.take_input(id, &buf[..n]);
                Outcome::Data
            }
            Some(Read::Eof) => {
                if let Some(ep) = self.endpoints.get_mut(&id) {
                    if !ep.is_client() {
                        let why = format!("{} closed; the VM goes on", ep.name);
                        ep.close(Closing::Logged(why));
                    } else if ep.sink.is_none() {
                        ep.close(Closing::Quietly);
                    }
                }
                Outcome::Eof
            }
            Some(Read::WouldBlock) => Outcome::WouldBlock,
            Some(Read::Failed(e)) => {
                if let Some(ep) = self.endpoints.get_mut(&id) {
                    let why = format!("console backend {}: read failed: {e}", ep.name);
                    let quiet = ep.is_client();
                    ep.close(if quiet {
                        Closing::Quietly
                    } else {
                        Closing::Logged(why)
                    });
                }
                Outcome::Failed
            }
            None => Outcome::Failed,
        };
        self.scratch = buf;
        outcome
    }

    /// One read from a source: handled whole, appended to the input stream contiguously.
    fn take_input(&mut self, id: EndpointId, data: &[u8]) {
        let Some(ep) = self.endpoints.get_mut(&id) else {
            return;
        };
        let Some(source) = ep.source.as_mut() else {
            return;
        };
        let (verdict, listener) = match ep.owner {
            Owner::Client { listener, number } => match self.listeners.get_mut(listener) {
                Some(l) => (l.keyboard(id, source, data), Some((listener, number))),
                None => (Keyboard::Drop, None),
            },
            Owner::Backend => (Keyboard::Deliver, None),
        };
        let mut actions = Vec::new();
        match verdict {
            Keyboard::Deliver | Keyboard::TookFree => {
                ep.typed += data.len() as u64;
                match &mut source.mode {
                    InputMode::Terminal(parser) => {
                        let mut out = Vec::with_capacity(data.len());
                        parser.feed(data, &mut out, &mut actions);
                        self.input.push(&out);
                    }
                    InputMode::Viewer => {}
                    InputMode::Guest | InputMode::Contender(_) => self.input.push(data),
                }
            }
            Keyboard::TellReadOnly => ep.notice(READ_ONLY_NOTICE, &self.ring),
            Keyboard::Drop | Keyboard::TookOver => {}
        }
        if matches!(verdict, Keyboard::TookFree | Keyboard::TookOver)
            && let Some((listener, number)) = listener
        {
            self.announce_holder(listener, id, number);
        }
        for a in actions {
            self.escape_action(a);
        }
    }

    /// Tells every client of `listener` who has the keyboard now.
    fn announce_holder(&mut self, listener: usize, holder: EndpointId, number: u64) {
        let msg =
            format!("\r\n[microvm: client {number} took the keyboard; Ctrl-A w takes it back]\r\n");
        for (id, ep) in self.endpoints.iter_mut() {
            if !matches!(ep.owner, Owner::Client { listener: l, .. } if l == listener) {
                continue;
            }
            let mine = *id == holder;
            if let Some(s) = ep.source.as_mut() {
                s.told_readonly = !mine;
            }
            if mine {
                ep.notice("\r\n[microvm: you have the keyboard]\r\n", &self.ring);
            } else {
                ep.notice(&msg, &self.ring);
            }
        }
    }

    fn escape_action(&mut self, a: EscapeAction) {
        match a {
            EscapeAction::Quit => {
                self.local_notice("\r\n[microvm: quit]\r\n");
                if let Err(e) = self.quit.write(1) {
                    log::error!("cannot signal VM exit: {e}");
                }
            }
            EscapeAction::Help => self.local_notice(STDIO_ESCAPE_HELP),
            EscapeAction::SwitchInput => {
                let msg = self.frontends.switch();
                self.local_notice(&msg);
            }
            EscapeAction::Detach | EscapeAction::TakeOver => {}
        }
    }

    /// A message on the VMM's terminal only.
    fn local_notice(&mut self, msg: &str) {
        if let Some(ep) = self.stdout.and_then(|id| self.endpoints.get_mut(&id)) {
            ep.notice(msg, &self.ring);
        }
    }

    /// Read sources that need no polling (hung-up peers, a regular-file stdin) and
    /// those whose port holds input polling would not show (decrypted TLS bytes) while
    /// there is room.
    pub(super) fn service_parked(&mut self) {
        let parked: Vec<(EndpointId, bool)> = self
            .endpoints
            .iter_mut()
            .filter(|(_, e)| !e.is_closing())
            .filter(|(_, e)| e.parked || e.input_live())
            .filter_map(|(id, e)| (e.parked || e.port.input_buffered()).then_some((*id, e.parked)))
            .collect();
        for (id, hung_up) in parked {
            loop {
                match self.read_from(id) {
                    Outcome::Data => self.frontends.take_input(&mut self.input),
                    Outcome::Eof | Outcome::Failed => {
                        if hung_up && let Some(e) = self.endpoints.get_mut(&id) {
                            e.close(Closing::Quietly);
                        }
                        break;
                    }
                    Outcome::WouldBlock | Outcome::NoSpace => break,
                }
            }
        }
    }
}
