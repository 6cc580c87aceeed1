//! Console cases: the hub's backends and the virtio console with a real guest.

use crate::CaseFn;

pub const CASES: &[(&str, CaseFn)] = &[];
