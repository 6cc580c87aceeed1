//! Admission on the hub's side: a listener's new connections become client endpoints
//! (history first, then live output), at once or once they proved who they are (pending
//! admissions, moved on by their readiness events and closed at their deadline); idle
//! clients make room or time out, and the timer is armed for the next deadline. The
//! rules are `listener.rs`'s.

use std::time::Instant;

use super::epoll::INDEX_MASK;
use super::{Hub, Reg};
use crate::mux::auth::ClientRole;
use crate::mux::backend::Port;
use crate::mux::backend::socket::Stream;
use crate::mux::endpoint::{Closing, Endpoint, EndpointId, InputMode, Owner, Role, plan};
use crate::mux::listener::{Accepted, MAX_PENDING, Pending, READ_ONLY_NOTICE, Step, busy_message};

impl Hub {
    /// Takes the connections waiting on listener `i`: clients at once, or pending
    /// admissions where the listener authenticates.
    pub(super) fn accept(&mut self, i: usize, reg: &mut dyn Reg) {
        loop {
            let now = Instant::now();
            let Some(l) = self.listeners.get_mut(i) else {
                return;
            };
            let (stream, peer) = match l.accept_one(now) {
                Accepted::Client(s, peer) => (s, peer),
                Accepted::Again => continue,
                Accepted::Done => return,
            };
            if !l.admission.needed() {
                self.admit_client(i, Box::new(stream), None);
                continue;
            }
            let stream = match &l.admission.tls {
                Some(cfg) => match stream.into_tls(cfg.clone()) {
                    Ok(s) => s,
                    Err(e) => {
                        log::warn!("console {}: TLS for {peer}: {e}", l.sock.describe());
                        continue;
                    }
                },
                None => stream,
            };
            self.start_pending(i, stream, peer, now, reg);
        }
    }

    /// A new connection to authenticated listener `i` waits to prove who it is; the
    /// listener's oldest pending one makes room when [`MAX_PENDING`] wait already.
    fn start_pending(
        &mut self,
        i: usize,
        stream: Stream,
        peer: String,
        now: Instant,
        reg: &mut dyn Reg,
    ) {
        let waiting: Vec<(u32, Instant)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.listener == i)
            .map(|(id, p)| (*id, p.opened))
            .collect();
        if waiting.len() >= MAX_PENDING
            && let Some((oldest, _)) = waiting.iter().min_by_key(|(_, t)| *t)
            && let Some(p) = self.drop_pending(*oldest, reg)
            && let Some(l) = self.listeners.get_mut(i)
        {
            l.unauthenticated += 1;
            log::warn!(
                "console {}: dropped {}: {MAX_PENDING} connections were waiting to authenticate",
                l.sock.describe(),
                p.peer
            );
        }
        let id = loop {
            let id = self.next_pending;
            self.next_pending = (self.next_pending + 1) & INDEX_MASK;
            if !self.pending.contains_key(&id) {
                break id;
            }
        };
        let timeout = self.cfg.handshake_timeout;
        self.pending
            .insert(id, Pending::new(i, stream, peer, now, timeout));
    }

    /// Moves pending admission `id` on (its socket has something for it).
    pub(super) fn handshake(&mut self, id: EndpointId, reg: &mut dyn Reg) {
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        let Some(l) = self.listeners.get_mut(p.listener) else {
            return;
        };
        match p.step(&l.admission, Instant::now()) {
            Step::Wait => {}
            Step::Refused(r) => {
                l.unauthenticated += 1;
                log::warn!(
                    "console {}: refused {}: {}",
                    l.sock.describe(),
                    p.peer,
                    r.what()
                );
            }
            Step::Close => {
                if !p.closing {
                    l.unauthenticated += 1;
                }
                self.drop_pending(id, reg);
            }
            Step::Admit(role) => {
                let role = if l.spec.read_only {
                    ClientRole::Viewer
                } else {
                    role
                };
                if let Some(p) = self.drop_pending(id, reg) {
                    self.admit_client(p.listener, Box::new(p.stream), Some(role));
                }
            }
        }
    }

    /// Closes pending admissions past their deadline (telling those that got as far
    /// as the token line), and those pushed out to make room.
    pub(super) fn expire_pending(&mut self, now: Instant, reg: &mut dyn Reg) {
        let due: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(mut p) = self.drop_pending(id, reg) else {
                continue;
            };
            let refusal = p.expire();
            if let Some(l) = self.listeners.get_mut(p.listener)
                && (refusal.is_some() || !p.closing)
            {
                l.unauthenticated += 1;
                log::warn!(
                    "console {}: dropped {}: {}",
                    l.sock.describe(),
                    p.peer,
                    refusal.map_or("nothing proven in time", |r| r.what())
                );
            }
        }
    }

    /// Makes `port` a client of listener `i` (with `role` when it proved one): history
    /// first, then live output; refused with a message when the listener is full and
    /// no idle client makes room.
    fn admit_client(&mut self, i: usize, mut port: Box<dyn Port>, role: Option<ClientRole>) {
        let now = Instant::now();
        let Some(l) = self.listeners.get(i) else {
            return;
        };
        if l.clients >= l.spec.max_clients && !self.evict_idle_client(i, now) {
            let l = &mut self.listeners[i];
            let _ = port.write_first(busy_message(l.clients, l.spec.max_clients).as_bytes());
            l.refused += 1;
            return;
        }
        if let Some(role) = role {
            let _ = port.write_first(role.ok_line().as_bytes());
        }
        let l = &mut self.listeners[i];
        let number = l.admit();
        let name = format!("client {number} on {}", l.sock.describe());
        let viewer = role == Some(ClientRole::Viewer);
        let plan = plan(
            Role::Client {
                spec: &l.spec,
                viewer,
            },
            &self.limits,
        );
        let contender = matches!(plan.input, Some(InputMode::Contender(_)));
        let take_keyboard = contender && l.holder.is_none();
        let told = contender && !take_keyboard;
        let start = self.ring.total() - self.ring.len().min(self.history) as u64;
        let mut ep = Endpoint::new(
            name,
            port,
            Owner::Client {
                listener: i,
                number,
            },
            plan,
            start,
        );
        ep.flush(&self.ring);
        if told {
            if let Some(s) = ep.source.as_mut() {
                s.told_readonly = true;
            }
            ep.notice(READ_ONLY_NOTICE, &self.ring);
        }
        let id = self.insert(ep);
        if take_keyboard {
            self.listeners[i].holder = Some(id);
        }
    }

    /// Makes room on full listener `i` by closing its client idle the longest, if that
    /// one has been idle for [`HubConfig::evict_idle`]. True when it did.
    fn evict_idle_client(&mut self, i: usize, now: Instant) -> bool {
        let victim = self
            .endpoints
            .iter_mut()
            .filter(|(_, e)| !e.is_closing())
            .filter(|(_, e)| matches!(e.owner, Owner::Client { listener, .. } if listener == i))
            .filter(|(_, e)| now.saturating_duration_since(e.last_active) >= self.cfg.evict_idle)
            .min_by_key(|(_, e)| e.last_active);
        let Some((_, ep)) = victim else {
            return false;
        };
        let idle = now.saturating_duration_since(ep.last_active).as_secs();
        ep.notice(
            &format!("\r\n[microvm: disconnected: idle for {idle} s and a new client needed the place]\r\n"),
            &self.ring,
        );
        ep.close(Closing::Quietly);
        self.listeners[i].idle_closed += 1;
        true
    }

    /// Disconnects clients idle past their listener's `idle-timeout`.
    pub(super) fn expire_idle(&mut self, now: Instant) {
        for ep in self.endpoints.values_mut() {
            let Owner::Client { listener, .. } = ep.owner else {
                continue;
            };
            let Some(l) = self.listeners.get_mut(listener) else {
                continue;
            };
            let Some(limit) = l.spec.idle_timeout else {
                continue;
            };
            if !ep.is_closing() && now.saturating_duration_since(ep.last_active) >= limit {
                let what = crate::host::units::format_duration(limit);
                ep.notice(
                    &format!("\r\n[microvm: disconnected after {what} idle]\r\n"),
                    &self.ring,
                );
                ep.close(Closing::Logged(format!(
                    "console {}: idle for {what}, disconnected",
                    ep.name
                )));
                l.idle_closed += 1;
            }
        }
    }

    /// Arms the timer for the next idle deadline or the end of an accept back-off.
    pub(super) fn arm_timer(&mut self) {
        let idle = self.endpoints.values().filter_map(|e| match e.owner {
            Owner::Client { listener, .. } if !e.is_closing() => self
                .listeners
                .get(listener)
                .and_then(|l| l.spec.idle_timeout)
                .map(|d| e.last_active + d),
            _ => None,
        });
        let backoff = self.listeners.iter().filter_map(|l| l.paused_until);
        let pending = self.pending.values().map(|p| p.deadline);
        let next = idle.chain(backoff).chain(pending).min();
        if let Err(e) = self.timer.arm(next) {
            log::error!("console hub: cannot arm its timer: {e}");
        }
    }
}
