//! The epoll side of the hub: one token per source of events, and each fd's interest
//! kept in line with its state (read only while there is room for input, write only
//! while output is pending, listeners only while accepting).

use std::io;
use std::os::fd::RawFd;
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Hub;
use crate::mux::backend::Port;
use crate::mux::endpoint::{Closing, EndpointId, Owner};
use crate::mux::listener::Pending;

/// What woke the hub (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Token {
    Wake,
    Timer,
    Frontend(usize),
    Listener(usize),
    Endpoint(u32),
    /// A connection still proving who it is (`listener.rs`'s `Pending`).
    Pending(u32),
}

pub(super) const TAG_SHIFT: u32 = 28;
pub(super) const INDEX_MASK: u32 = (1 << TAG_SHIFT) - 1;

impl Token {
    pub(super) fn encode(self) -> u32 {
        // Indexes are bounded (frontends, listeners) or masked (endpoint ids).
        match self {
            Token::Wake => 0,
            Token::Timer => 1,
            Token::Frontend(i) => (1 << TAG_SHIFT) | (i as u32 & INDEX_MASK),
            Token::Listener(i) => (2 << TAG_SHIFT) | (i as u32 & INDEX_MASK),
            Token::Endpoint(id) => (3 << TAG_SHIFT) | (id & INDEX_MASK),
            Token::Pending(id) => (4 << TAG_SHIFT) | (id & INDEX_MASK),
        }
    }

    pub(super) fn decode(v: u32) -> Option<Token> {
        let i = v & INDEX_MASK;
        match v >> TAG_SHIFT {
            0 if i == 0 => Some(Token::Wake),
            0 if i == 1 => Some(Token::Timer),
            1 => Some(Token::Frontend(i as usize)),
            2 => Some(Token::Listener(i as usize)),
            3 => Some(Token::Endpoint(i)),
            4 => Some(Token::Pending(i)),
            _ => None,
        }
    }
}

/// Epoll registration, abstracted so the hub logic runs without an event loop in tests.
pub(crate) trait Reg {
    fn add(&mut self, fd: RawFd, token: u32, set: EventSet) -> io::Result<()>;
    fn modify(&mut self, fd: RawFd, token: u32, set: EventSet) -> io::Result<()>;
    fn remove(&mut self, fd: RawFd, token: u32) -> io::Result<()>;
}

fn em_err(e: event_manager::Error) -> io::Error {
    match e {
        event_manager::Error::Epoll(errno) => io::Error::from_raw_os_error(errno.errno()),
        other => io::Error::other(other.to_string()),
    }
}

struct OpsReg<'a, 'b>(&'a mut EventOps<'b>);

impl Reg for OpsReg<'_, '_> {
    fn add(&mut self, fd: RawFd, token: u32, set: EventSet) -> io::Result<()> {
        self.0
            .add(Events::with_data_raw(fd, token, set))
            .map_err(em_err)
    }
    fn modify(&mut self, fd: RawFd, token: u32, set: EventSet) -> io::Result<()> {
        self.0
            .modify(Events::with_data_raw(fd, token, set))
            .map_err(em_err)
    }
    fn remove(&mut self, fd: RawFd, token: u32) -> io::Result<()> {
        self.0
            .remove(Events::with_data_raw(fd, token, EventSet::empty()))
            .map_err(em_err)
    }
}

/// No event loop (tests, shutdown).
pub(crate) struct NoReg;

impl Reg for NoReg {
    fn add(&mut self, _: RawFd, _: u32, _: EventSet) -> io::Result<()> {
        Ok(())
    }
    fn modify(&mut self, _: RawFd, _: u32, _: EventSet) -> io::Result<()> {
        Ok(())
    }
    fn remove(&mut self, _: RawFd, _: u32) -> io::Result<()> {
        Ok(())
    }
}

impl Hub {
    /// Watches listeners that accept, and not those backing off.
    pub(super) fn sync_listeners(&mut self, reg: &mut dyn Reg) {
        let now = Instant::now();
        for (i, l) in self.listeners.iter_mut().enumerate() {
            let want = l.accepting(now);
            if want == l.watched {
                continue;
            }
            let token = Token::Listener(i).encode();
            let res = if want {
                reg.add(l.sock.fd(), token, EventSet::IN)
            } else {
                reg.remove(l.sock.fd(), token)
            };
            match res {
                Ok(()) => l.watched = want,
                Err(e) => {
                    log::error!("cannot watch console socket {}: {e}", l.sock.describe());
                    l.watched = want;
                }
            }
        }
    }

    /// Brings each pending admission's epoll interest in line with its state: readable
    /// always, writable while TLS ciphertext waits for its socket.
    pub(super) fn sync_pending(&mut self, reg: &mut dyn Reg) {
        let mut failed = Vec::new();
        for (id, p) in self.pending.iter_mut() {
            let mut want = EventSet::IN;
            if p.stream.buffered() {
                want |= EventSet::OUT;
            }
            let token = Token::Pending(*id).encode();
            let fd = p.stream.fd().unwrap_or(-1);
            let res = match p.reg {
                None => reg.add(fd, token, want),
                Some(c) if c != want => reg.modify(fd, token, want),
                Some(_) => continue,
            };
            match res {
                Ok(()) => p.reg = Some(want),
                Err(e) => {
                    log::warn!("console connection from {}: cannot watch it: {e}", p.peer);
                    failed.push(*id);
                }
            }
        }
        for id in failed {
            self.drop_pending(id, reg);
        }
    }

    /// Closes pending admission `id` (removing it from epoll first).
    pub(super) fn drop_pending(&mut self, id: EndpointId, reg: &mut dyn Reg) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if p.reg.is_some()
            && let Some(fd) = p.stream.fd()
        {
            let _ = reg.remove(fd, Token::Pending(id).encode());
        }
        Some(p)
    }

    /// Remove dead endpoints.
    pub(super) fn sweep(&mut self, reg: &mut dyn Reg) {
        let closing: Vec<EndpointId> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.is_closing())
            .map(|(id, _)| *id)
            .collect();
        for id in closing {
            let Some(mut ep) = self.endpoints.remove(&id) else {
                continue;
            };
            if let (Some(fd), Some(_)) = (ep.fd, ep.reg) {
                let _ = reg.remove(fd, Token::Endpoint(id).encode());
            }
            if let Some(Closing::Logged(msg)) = ep.closing.take() {
                log::warn!("{msg}");
            }
            match ep.owner {
                Owner::Client { listener, .. } => {
                    if let Some(l) = self.listeners.get_mut(listener) {
                        l.left(id, ep.cut_off, ep.out_counts().0, ep.typed);
                    }
                }
                Owner::Backend => self.retired.push(ep.stats("closed")),
            }
            if self.stdout == Some(id) {
                self.stdout = None;
            }
        }
    }

    /// Bring an endpoint's epoll interest in line with its state.
    pub(super) fn sync(&mut self, id: EndpointId, reg: &mut dyn Reg) {
        let Some(ep) = self.endpoints.get(&id) else {
            return;
        };
        let Some(fd) = ep.fd else {
            return;
        };
        let token = Token::Endpoint(id).encode();
        let input_live = ep.input_live();
        let gone = ep.is_closing() || ep.parked || (!input_live && ep.sink.is_none());
        if gone {
            if ep.reg.is_some() {
                let _ = reg.remove(fd, token);
            }
            if let Some(ep) = self.endpoints.get_mut(&id) {
                ep.reg = None;
                if !input_live && ep.sink.is_none() {
                    ep.close(Closing::Quietly);
                }
            }
            return;
        }
        let mut want = EventSet::empty();
        if let Some(s) = &ep.source
            && !s.eof
            && (self.discards(id, ep) || self.input.space_for(s.share()) > 0)
        {
            want |= EventSet::IN;
        }
        if ep.pending(&self.ring) > 0 {
            want |= EventSet::OUT;
        }
        let res = match ep.reg {
            None => reg.add(fd, token, want),
            Some(c) if c != want => reg.modify(fd, token, want),
            Some(_) => return,
        };
        let Some(ep) = self.endpoints.get_mut(&id) else {
            return;
        };
        match res {
            Ok(()) => ep.reg = Some(want),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                // A regular file or /dev/null: always ready, never polled.
                ep.fd = None;
                if input_live {
                    ep.parked = true;
                }
            }
            Err(e) => {
                let msg = format!("console backend {}: cannot watch it: {e}", ep.name);
                ep.close(Closing::Logged(msg));
            }
        }
    }
}

impl MutEventSubscriber for Hub {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.shut {
            return;
        }
        self.handle(events.data(), events.event_set(), &mut OpsReg(ops));
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.init_with(&mut OpsReg(ops));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for t in [
            Token::Wake,
            Token::Timer,
            Token::Frontend(63),
            Token::Listener(7),
            Token::Endpoint(INDEX_MASK),
            Token::Endpoint(0),
            Token::Pending(5),
        ] {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_eq!(Token::decode(2), None);
        assert_eq!(Token::decode(5 << TAG_SHIFT), None);
    }
}
