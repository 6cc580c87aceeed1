//! Admission on the hub's side: a listener's pending connections become client
//! endpoints (history first, then live output), idle clients make room or time out,
//! and the timer is armed for the next deadline. The rules are `listener.rs`'s.

use std::time::Instant;

use super::Hub;
use crate::mux::endpoint::{Endpoint, InputMode, Owner, Role, plan};
use crate::mux::listener::{Accepted, READ_ONLY_NOTICE, busy_message};

impl Hub {
    /// Admits the clients waiting on listener `i`.
    pub(super) fn accept(&mut self, i: usize) {
        loop {
            let now = Instant::now();
            let Some(l) = self.listeners.get_mut(i) else {
                return;
            };
            let mut port = match l.accept_one(now) {
                Accepted::Client(p) => p,
                Accepted::Again => continue,
                Accepted::Done => return,
            };
            if l.clients >= l.spec.max_clients && !self.evict_idle_client(i, now) {
                let l = &mut self.listeners[i];
                let _ = port.write(busy_message(l.clients, l.spec.max_clients).as_bytes());
                l.refused += 1;
                continue;
            }
            let l = &mut self.listeners[i];
            let no = l.admit();
            let name = format!("client {no} on {}", l.sock.describe());
            let plan = plan(Role::Client(&l.spec), &self.limits);
            let contender = matches!(plan.input, Some(InputMode::Contender(_)));
            let take_keyboard = contender && l.holder.is_none();
            let told = contender && !take_keyboard;
            let start = self.ring.total() - self.ring.len().min(self.history) as u64;
            let mut ep = Endpoint::new(
                name,
                port,
                Owner::Client {
                    listener: i,
                    id: no,
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
    }

    /// Makes room on full listener `i` by closing its client idle the longest, if that
    /// one has been idle for [`HubConfig::evict_idle`]. True when it did.
    fn evict_idle_client(&mut self, i: usize, now: Instant) -> bool {
        let victim = self
            .endpoints
            .iter_mut()
            .filter(|(_, e)| e.dead.is_none())
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
        ep.kill(None);
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
            if ep.dead.is_none() && now.saturating_duration_since(ep.last_active) >= limit {
                let what = crate::units::format_duration(limit);
                ep.notice(
                    &format!("\r\n[microvm: disconnected after {what} idle]\r\n"),
                    &self.ring,
                );
                ep.kill(Some(format!(
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
            Owner::Client { listener, .. } if e.dead.is_none() => self
                .listeners
                .get(listener)
                .and_then(|l| l.spec.idle_timeout)
                .map(|d| e.last_active + d),
            _ => None,
        });
        let backoff = self.listeners.iter().filter_map(|l| l.paused_until);
        let next = idle.chain(backoff).min();
        if let Err(e) = self.timer.arm(next) {
            log::error!("console hub: cannot arm its timer: {e}");
        }
    }
}
