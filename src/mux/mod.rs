//! The console multiplexer ("mux-be" / hub): one guest console, many backends, nothing
//! lost, nothing unbounded.
//!
//! * Output: everything the frontends write forms ONE ordered stream; every backend sees
//!   the same bytes in the same order; one `write` from a frontend is never interleaved
//!   inside another. The vCPU side ([`HubWriter`]) never blocks.
//! * Input: each read from a backend is delivered whole, in arrival order, to the input
//!   target frontend; when the frontend is full the hub holds the bytes in a bounded
//!   buffer and stops reading sources until the frontend drains.
//! * Policies, decided in one table (`endpoint::plan`): the terminal and a log file are
//!   lossless (their backlog paces the guest through [`HubWriter::congested`]); a FIFO or
//!   device log drops and counts; a socket client that falls too far behind is cut off,
//!   never slowing the guest or anyone else.
//! * Bounds: every queue charges what it really costs, every user-sized value has a
//!   ceiling, and socket clients share one output ring instead of each holding a copy.
//! * Nothing on the event loop blocks: stdout is written through a private non-blocking
//!   description, a FIFO or device log without blocking, diagnostics through the
//!   non-blocking logger (`crate::host::logging`), and `accept` backs off when out of fds.
//!
//! One module per job:
//!
//! | module | job |
//! |---|---|
//! | `writer` | [`HubWriter`]: the cross-thread output queue and congestion |
//! | `frontend` | the frontend contract ([`FrontendOutput`], [`Frontend`]) and the input target (Ctrl-A c) |
//! | `fanout` | sinks, their queues and policies: WHERE A BYTE FANS OUT (`Hub::emit` calls it) |
//! | `input` | serialization of input, the terminal's reserve, back-pressure |
//! | `endpoint` | a backend's two halves, and the policy table |
//! | `listener` | socket admission (authentication, pending connections), idle clients, single-writer arbitration |
//! | `auth` | tokens and the judgement of a client's first bytes (the console protocol) |
//! | `tls` | TLS (rustls) configurations and the non-blocking TLS stream |
//! | `escape` | the Ctrl-A keys |
//! | `ring` | the output ring: history and every client's backlog |
//! | `stats` | counters for `--report` and memory figures |
//! | `hub` | event routing and shutdown |
//! | `spec` | the `--console` grammar ([`CONSOLE_SPEC_HELP`]) |
//! | `timer` | the hub's deadlines (pending admissions, idle clients, accept back-off) |
//! | `attach`, `backend/` | `microvm attach` (the client side), the ports |

pub mod attach;
pub mod auth;
pub mod backend;
mod endpoint;
pub mod escape;
mod fanout;
mod frontend;
pub mod hub;
mod input;
mod listener;
pub mod ring;
pub mod spec;
mod stats;
mod timer;
pub mod tls;
mod writer;

#[cfg(test)]
mod props;

pub use crate::host::term::TermError;
pub use attach::{AttachOptions, attach};
pub use backend::BackendError;
pub use fanout::{CHUNK_COST, NOTICE_MAX};
pub use frontend::{Frontend, FrontendOutput, MAX_FRONTENDS};
pub use hub::{Hub, HubConfig, Observer, ShutdownSummary};
pub use listener::{FdBudgetError, check_fd_budget};
pub use spec::{CONSOLE_SPEC_HELP, ConsoleSpec, SpecError};
pub use stats::{BackendStats, FrontendStats, HubStats, ListenerStats, MemoryUse};
pub use writer::HubWriter;

use std::io;

/// Errors of the console multiplexer.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// The console spec does not parse.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A backend could not be set up.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The terminal could not be configured.
    #[error(transparent)]
    Term(#[from] TermError),
    /// stdout cannot be written without blocking.
    #[error("cannot set up stdout for the console: {0}")]
    Stdout(io::Error),
    /// eventfd or timerfd creation failed.
    #[error("cannot create the console hub's eventfd: {0}")]
    EventFd(io::Error),
    /// Too many frontends on one hub.
    #[error("too many console devices on one console (at most {0})")]
    TooManyFrontends(usize),
    /// The open-file limit does not allow `max-clients`.
    #[error(transparent)]
    FdBudget(#[from] FdBudgetError),
    /// `attach` could not connect.
    #[error("cannot connect to console '{target}': {source}")]
    Connect {
        /// The socket path or `tcp://HOST:PORT`.
        target: String,
        /// The OS error.
        source: io::Error,
    },
    /// `attach` options that do not fit together.
    #[error("microvm attach: {0}")]
    AttachUsage(&'static str),
    /// The console refused `attach` (its message), or never answered.
    #[error("console refused the connection: {0}")]
    Refused(String),
    /// A token file cannot be used.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// `attach` relay failed.
    #[error("console attach: {0}")]
    Attach(io::Error),
}
