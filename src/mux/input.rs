//! The input side's serialization point: one bounded buffer that every source's reads
//! are appended to, whole and in arrival order, and from which the input-target
//! frontend takes what it can.
//!
//! Invariants:
//! * A read from a source is appended whole (the hub reads at most [`InputQueue::space_for`]
//!   bytes, so it always fits): two clients' pastes never interleave inside one read.
//! * The buffer never holds more than its capacity; while it is full the hub stops
//!   reading sources (back-pressure), so nothing typed is dropped.
//! * The terminal has a reserve that other sources cannot use, so `Ctrl-A x` works
//!   even while socket clients have filled the buffer.

use std::collections::VecDeque;

/// Which share of the buffer a source may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Share {
    /// The VMM's terminal: the whole buffer.
    Terminal,
    /// Everyone else: all but the terminal's reserve.
    Other,
}

/// The bounded input buffer.
#[derive(Debug)]
pub(crate) struct InputQueue {
    buf: VecDeque<u8>,
    capacity: usize,
}

impl InputQueue {
    pub(crate) fn new(capacity: usize) -> InputQueue {
        InputQueue {
            buf: VecDeque::with_capacity(capacity.min(64 << 10)),
            capacity,
        }
    }

    /// What the terminal keeps for itself.
    fn reserve(&self) -> usize {
        (self.capacity / 4).min(4096)
    }

    /// How many bytes a source with `share` may add now (0: do not read it).
    pub(crate) fn space_for(&self, share: Share) -> usize {
        let reserve = match share {
            Share::Terminal => 0,
            Share::Other => self.reserve(),
        };
        self.capacity
            .saturating_sub(reserve)
            .saturating_sub(self.buf.len())
    }

    /// Appends a read. The caller read at most `space_for` bytes; anything beyond the
    /// capacity (a caller bug) is not stored.
    pub(crate) fn push(&mut self, data: &[u8]) {
        let room = self.capacity.saturating_sub(self.buf.len());
        self.buf.extend(&data[..data.len().min(room)]);
    }

    /// The oldest held bytes (one contiguous slice; call again after [`InputQueue::consume`]).
    pub(crate) fn front(&self) -> &[u8] {
        self.buf.as_slices().0
    }

    /// Drops the first `n` held bytes (the frontend took them).
    pub(crate) fn consume(&mut self, n: usize) {
        self.buf.drain(..n.min(self.buf.len()));
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_the_terminals() {
        let mut q = InputQueue::new(256);
        assert_eq!(q.space_for(Share::Other), 192);
        q.push(&[1; 192]);
        assert_eq!(q.space_for(Share::Other), 0);
        assert_eq!(q.space_for(Share::Terminal), 64);
        q.push(&[2; 100]);
        assert_eq!(q.len(), 256, "never past the capacity");
        let mut got = Vec::new();
        while !q.is_empty() {
            let f = q.front().to_vec();
            got.extend_from_slice(&f[..f.len().min(50)]);
            q.consume(f.len().min(50));
        }
        assert_eq!(got.len(), 256);
    }
}
