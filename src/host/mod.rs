//! What microvm needs from the host process, shared by every layer and knowing nothing of
//! VMs: the logger, the size and duration grammars, the files microvm creates (and the
//! private runtime directory), and the controlling terminal's modes.
//!
//! Nothing here depends on another top-level module of the crate (see the module graph
//! in docs/ARCHITECTURE.md).

pub mod files;
pub mod logging;
pub mod term;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
#[cfg(test)]
pub(crate) mod test_util;
pub mod units;
