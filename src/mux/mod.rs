//! The console multiplexer ("mux-be" / hub): one guest console, many backends, nothing lost.
//!
//! * Output: everything the frontends write forms ONE ordered stream; every backend sees
//!   the same bytes in the same order; one `write` from a frontend is never interleaved
//!   inside another. The vCPU side ([`HubWriter`]) never blocks.
//! * Input: each read from a backend is delivered whole, in arrival order, to the input
//!   target frontend; when the frontend is full the hub holds the bytes in a bounded
//!   buffer and stops reading sources until the frontend drains.
//! * Policies: `stdio` and `file` lossless (a slow terminal paces the guest through
//!   [`HubWriter::congested`]); `ring` keeps the last N bytes; each socket client has a
//!   bounded queue and is cut off when it overflows, never slowing anyone else.
//!
//! Grammar and per-backend options: [`CONSOLE_SPEC_HELP`].

pub mod attach;
pub mod backend;
pub mod hub;
pub mod ring;
pub mod spec;
pub mod term;

#[cfg(test)]
mod props;

pub use attach::attach;
pub use backend::BackendError;
pub use hub::{
    BackendStats, FrontendInput, FrontendStats, Hub, HubConfig, HubStats, HubWriter, ListenerStats,
    Observer,
};
pub use spec::{CONSOLE_SPEC_HELP, ConsoleSpec, SpecError};
pub use term::TermError;

use std::io;
use std::path::PathBuf;

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
    /// Two hubs asked for stdio.
    #[error("stdio is already used by another console")]
    StdioTaken,
    /// eventfd creation failed.
    #[error("cannot create the console hub's eventfd: {0}")]
    EventFd(io::Error),
    /// Too many frontends on one hub.
    #[error("too many console devices on one console (at most {0})")]
    TooManyFrontends(usize),
    /// `attach` could not connect.
    #[error("cannot connect to console socket '{path}': {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `attach` relay failed.
    #[error("console attach: {0}")]
    Attach(io::Error),
}
