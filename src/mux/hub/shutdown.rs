//! Shutdown: the guest's last words reach the terminal and every client for a bounded
//! time, log files are synced, socket files removed, the terminal restored.

use std::io;
use std::time::Instant;

use super::{Hub, NoReg};

/// How the last shutdown went (tests check the bound).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownSummary {
    /// Consumers that still had output pending when shutdown stopped waiting.
    pub gave_up: usize,
    /// Stopped because the overall limit was reached (not because all was delivered or
    /// every consumer stopped taking output).
    pub hit_limit: bool,
}

impl Hub {
    /// Writes out what is queued to the terminal and to socket clients before the VM's
    /// exit, so a CI log and every attached viewer end with the guest's last words. It
    /// waits while they keep taking data, gives up on a consumer that takes nothing for
    /// [`HubConfig::shutdown_idle`] (the terminal) or
    /// [`HubConfig::shutdown_client_idle`] (socket clients), and stops after
    /// [`HubConfig::shutdown_limit`] in all. A second SIGTERM ends the process at once
    /// (see `signals.rs`).
    fn flush_before_exit(&mut self) -> ShutdownSummary {
        let start = Instant::now();
        let mut progress = start;
        for ep in self.endpoints.values_mut() {
            ep.flush(&self.ring);
        }
        loop {
            let waiting: Vec<(libc::pollfd, bool)> = self
                .endpoints
                .iter()
                .filter(|(_, e)| !e.is_closing() && e.pending(&self.ring) > 0)
                .filter_map(|(id, e)| {
                    let pfd = libc::pollfd {
                        fd: e.fd?,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    Some((pfd, self.stdout == Some(*id)))
                })
                .collect();
            let terminal = waiting.iter().any(|(_, t)| *t);
            let idle_limit = if terminal {
                self.cfg.shutdown_idle
            } else {
                self.cfg.shutdown_client_idle
            };
            let idle_left = idle_limit.saturating_sub(progress.elapsed());
            let hit_limit = start.elapsed() >= self.cfg.shutdown_limit;
            if waiting.is_empty() || idle_left.is_zero() || hit_limit {
                return ShutdownSummary {
                    gave_up: waiting.len(),
                    hit_limit: hit_limit && !waiting.is_empty(),
                };
            }
            let mut pfds: Vec<libc::pollfd> = waiting.into_iter().map(|(p, _)| p).collect();
            let left = self.cfg.shutdown_limit.saturating_sub(start.elapsed());
            let timeout = idle_left.min(left).as_millis().min(200) as i32;
            // SAFETY: `pfds` is a valid array of pollfds for its length; the timeout is
            // bounded.
            let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
            if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return ShutdownSummary::default();
            }
            let before: usize = self.endpoints.values().map(|e| e.pending(&self.ring)).sum();
            for ep in self.endpoints.values_mut() {
                ep.flush(&self.ring);
            }
            let after: usize = self.endpoints.values().map(|e| e.pending(&self.ring)).sum();
            if after < before {
                progress = Instant::now();
            }
        }
    }

    /// Called when the VMM stops: write out what is queued (bounded time), flush log
    /// files, remove socket files, restore the terminal. Idempotent.
    pub fn shutdown(&mut self) {
        if self.shut {
            return;
        }
        self.shut = true;
        self.drain_writer();
        self.sweep(&mut NoReg);
        self.last_shutdown = Some(self.flush_before_exit());
        for ep in self.endpoints.values_mut() {
            if let Err(e) = ep.port.flush() {
                log::warn!("console backend {}: flush failed: {e}", ep.name);
            }
        }
        for l in &self.listeners {
            l.sock.remove_file();
        }
        self.raw = None;
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.shutdown();
    }
}
