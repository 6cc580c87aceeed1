//! Where a byte fans out: each backend's output half (a [`Sink`]) and the policy that
//! says what happens when it cannot keep up.
//!
//! | policy | used for | behind |
//! |---|---|---|
//! | [`Policy::Lossless`] | the terminal, a log file | its backlog paces the guest (the UART holds THRE low, the virtio console leaves transmit buffers queued); past the hard cap, bytes are dropped and counted, and a notice says so where they are missing |
//! | [`Policy::DropAndCount`] | a FIFO or device as log | never paces the guest; past its limit bytes are dropped and counted, with the same notice |
//! | [`Policy::CutOff`] | a socket client | never paces anyone; more than its limit behind, it is disconnected |
//!
//! Memory is bounded by construction:
//! * A queued sink charges each chunk what it really costs: its payload plus
//!   [`CHUNK_COST`] for the bookkeeping, and small chunks (a UART writes one byte at a
//!   time) are copied into one growing buffer instead of queued one by one. Notices go
//!   through the same limit.
//! * A socket client has no queue at all: it is a position in the hub's one output ring
//!   (see `ring.rs`), catching up from there; only its notices (a few hundred bytes at
//!   most, [`NOTICE_MAX`]) are its own.
//!
//! Ordering: a sink writes the stream in order and whole; nothing is reordered, and a
//! notice goes between two chunks of the stream, never inside one.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use super::backend::Port;
use super::ring::ByteRing;

/// What one queued chunk costs beyond its payload (the `VecDeque` slot, the `Arc`'s
/// counters and the allocator's header, rounded up).
pub const CHUNK_COST: usize = 64;
/// Chunks smaller than this are copied into the queue's tail buffer instead of being
/// queued on their own.
const MERGE_BELOW: usize = 512;
/// The largest tail buffer small chunks are merged into.
const MERGED_MAX: usize = 16 << 10;
/// The most a socket client's waiting notices may cost (bytes and per-notice overhead);
/// more are dropped (it is not reading) and counted.
pub const NOTICE_MAX: usize = 4096;

/// What happens when a sink cannot keep up (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Keep everything up to the limit, pacing the guest meanwhile.
    Lossless,
    /// Keep up to the limit, drop the rest and count it; never pace.
    DropAndCount,
    /// Disconnect when more than the limit behind.
    CutOff,
}

/// Why a sink stopped.
#[derive(Debug)]
pub(crate) enum Gone {
    /// Writing failed (the peer went away, a disk error).
    Failed(io::Error),
    /// More than `limit` bytes behind (a [`Policy::CutOff`] sink).
    CutOff {
        /// The sink's limit.
        limit: usize,
    },
}

enum Chunk {
    /// A stream chunk shared with the other sinks.
    Shared(Arc<[u8]>),
    /// Small chunks merged, or a notice.
    Owned(Vec<u8>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Shared(a) => a,
            Chunk::Owned(v) => v,
        }
    }

    fn cost(&self) -> usize {
        CHUNK_COST
            + match self {
                Chunk::Shared(a) => a.len(),
                Chunk::Owned(v) => v.capacity(),
            }
    }
}

/// A FIFO of byte chunks that knows what it costs.
#[derive(Default)]
struct ChunkQueue {
    items: VecDeque<(Chunk, usize)>,
    /// Unwritten payload bytes.
    payload: usize,
    /// What the queue costs in memory (payload, buffer slack, per-chunk overhead).
    charged: usize,
}

impl ChunkQueue {
    /// Queues `data` if what it costs keeps the queue within `limit` charged bytes;
    /// false (nothing queued) otherwise. Small chunks are copied into the tail buffer,
    /// large ones shared (`shared` is `data` as an `Arc`, made on first need).
    fn push(&mut self, data: &[u8], shared: &mut Option<Arc<[u8]>>, limit: usize) -> bool {
        if data.len() < MERGE_BELOW
            && let Some((Chunk::Owned(tail), _)) = self.items.back_mut()
            && tail.len() + data.len() <= MERGED_MAX
        {
            let need = tail.len() + data.len();
            let before = tail.capacity();
            if need > before {
                let grown = (before * 2).clamp(need, MERGED_MAX);
                if self.charged + (grown - before) > limit {
                    return false;
                }
                tail.reserve_exact(grown - tail.len());
            }
            tail.extend_from_slice(data);
            self.charged += tail.capacity() - before;
            self.payload += data.len();
            return true;
        }
        let chunk = if data.len() < MERGE_BELOW {
            let mut v = Vec::with_capacity(MERGE_BELOW);
            v.extend_from_slice(data);
            Chunk::Owned(v)
        } else {
            if self.charged + CHUNK_COST + data.len() > limit {
                return false;
            }
            Chunk::Shared(shared.get_or_insert_with(|| Arc::from(data)).clone())
        };
        if self.charged + chunk.cost() > limit {
            return false;
        }
        self.charged += chunk.cost();
        self.payload += data.len();
        self.items.push_back((chunk, 0));
        true
    }

    /// Queues a copy of `data` (a notice) within `limit`; false when it does not fit.
    fn push_owned(&mut self, data: &[u8], limit: usize) -> bool {
        let chunk = Chunk::Owned(data.to_vec());
        if self.charged + chunk.cost() > limit {
            return false;
        }
        self.payload += data.len();
        self.charged += chunk.cost();
        self.items.push_back((chunk, 0));
        true
    }

    /// Writes from the front until the port would block. `Ok(n)`: bytes written.
    fn write_to(&mut self, port: &mut dyn Port) -> io::Result<u64> {
        let mut written = 0u64;
        while let Some((chunk, off)) = self.items.front_mut() {
            let buf = &chunk.bytes()[*off..];
            match port.write(buf) {
                Ok(0) => break,
                Ok(n) => {
                    *off += n;
                    self.payload -= n;
                    written += n as u64;
                    if *off == chunk.bytes().len() {
                        self.charged -= chunk.cost();
                        self.items.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }
}

/// A sink with its own queue: [`Policy::Lossless`] or [`Policy::DropAndCount`].
struct Queued {
    queue: ChunkQueue,
    /// Most charged bytes the queue may hold.
    limit: usize,
    /// Dropped since the last notice about it.
    unannounced: u64,
}

/// A socket client: a position in the hub's output ring, and its own notices.
struct Cursor {
    /// The next stream byte it gets (counted like `ByteRing::total`).
    pos: u64,
    /// How far behind it may fall (stream bytes and notices) before it is cut off.
    limit: usize,
    /// Notices, each with the stream position it goes before, oldest first.
    notices: VecDeque<(u64, Vec<u8>)>,
    /// Bytes of the front notice already written.
    notice_off: usize,
    /// Unwritten notice bytes.
    notice_bytes: usize,
}

enum Kind {
    Queued(Queued),
    Cursor(Cursor),
}

/// A backend's output half: its policy, its backlog, and what it delivered and lost.
pub(crate) struct Sink {
    policy: Policy,
    kind: Kind,
    /// Bytes delivered.
    pub written: u64,
    /// Bytes lost (dropped over the limit, notices dropped).
    pub dropped: u64,
}

impl Sink {
    /// A sink with its own queue of at most `limit` charged bytes.
    pub(crate) fn queued(policy: Policy, limit: usize) -> Sink {
        debug_assert!(policy != Policy::CutOff);
        Sink {
            policy,
            kind: Kind::Queued(Queued {
                queue: ChunkQueue::default(),
                limit,
                unannounced: 0,
            }),
            written: 0,
            dropped: 0,
        }
    }

    /// A [`Policy::CutOff`] sink reading the stream from position `pos` of `ring`, cut
    /// off when more than `limit` bytes behind (`ring` must hold at least `limit`).
    pub(crate) fn cursor(pos: u64, limit: usize) -> Sink {
        Sink {
            policy: Policy::CutOff,
            kind: Kind::Cursor(Cursor {
                pos,
                limit,
                notices: VecDeque::new(),
                notice_off: 0,
                notice_bytes: 0,
            }),
            written: 0,
            dropped: 0,
        }
    }

    pub(crate) fn policy(&self) -> Policy {
        self.policy
    }

    /// Its limit: charged bytes queued, or how far behind a cursor may fall.
    pub(crate) fn limit(&self) -> usize {
        match &self.kind {
            Kind::Queued(q) => q.limit,
            Kind::Cursor(c) => c.limit,
        }
    }

    /// Bytes it is behind: queued payload, or stream bytes and notices not yet written.
    pub(crate) fn pending(&self, ring: &ByteRing) -> usize {
        match &self.kind {
            Kind::Queued(q) => q.queue.payload,
            Kind::Cursor(c) => Self::lag(c, ring),
        }
    }

    /// What it holds in memory (the ring it reads from is the hub's, not counted here).
    pub(crate) fn charged(&self) -> usize {
        match &self.kind {
            Kind::Queued(q) => q.queue.charged,
            Kind::Cursor(c) => c.notice_bytes + c.notices.len() * CHUNK_COST,
        }
    }

    fn lag(c: &Cursor, ring: &ByteRing) -> usize {
        usize::try_from(ring.total().saturating_sub(c.pos))
            .unwrap_or(usize::MAX)
            .saturating_add(c.notice_bytes)
    }

    /// Offers the chunk `data` of the stream, which `ring` already holds (it is the
    /// ring's newest bytes). Written at once when the sink has nothing pending, else
    /// queued or dropped by its policy. `shared` is `data` as an `Arc`, made on first
    /// need and shared by every sink that queues it.
    pub(crate) fn offer(
        &mut self,
        port: &mut dyn Port,
        data: &[u8],
        ring: &ByteRing,
        shared: &mut Option<Arc<[u8]>>,
    ) -> Result<(), Gone> {
        match &mut self.kind {
            Kind::Queued(q) => {
                if q.unannounced > 0 {
                    // Dropping until the loss is announced: the notice must stand where
                    // the bytes are missing, so nothing later may get in before it.
                    q.unannounced += data.len() as u64;
                    self.dropped += data.len() as u64;
                    return Ok(());
                }
                let mut off = 0;
                if q.queue.payload == 0 {
                    off = write_some(port, data).map_err(Gone::Failed)?;
                    self.written += off as u64;
                    if off == data.len() {
                        return Ok(());
                    }
                }
                let rest = &data[off..];
                // Only the tail of a partly written chunk is queued as a copy of its own.
                let queued = if off == 0 {
                    q.queue.push(rest, shared, q.limit)
                } else {
                    q.queue.push(rest, &mut None, q.limit)
                };
                if !queued {
                    q.unannounced += rest.len() as u64;
                    self.dropped += rest.len() as u64;
                }
                Ok(())
            }
            Kind::Cursor(c) => {
                let before = ring.total() - data.len() as u64;
                if c.pos == before && c.notices.is_empty() {
                    let n = write_some(port, data).map_err(Gone::Failed)?;
                    c.pos += n as u64;
                    self.written += n as u64;
                }
                if Self::lag(c, ring) > c.limit {
                    return Err(Gone::CutOff { limit: c.limit });
                }
                Ok(())
            }
        }
    }

    /// Writes what is pending until the port would block. A queued sink that has
    /// caught up after dropping gets a notice saying how much it lost (`name` is how it
    /// is called there).
    pub(crate) fn flush(
        &mut self,
        port: &mut dyn Port,
        ring: &ByteRing,
        name: &str,
    ) -> Result<(), Gone> {
        match &mut self.kind {
            Kind::Queued(q) => {
                self.written += q.queue.write_to(port).map_err(Gone::Failed)?;
                if q.queue.payload == 0 && q.unannounced > 0 {
                    let msg = format!(
                        "\r\n[microvm: {} bytes of console output dropped here: {name} too slow]\r\n",
                        q.unannounced
                    );
                    q.unannounced = 0;
                    // Past the limit by one notice at most: it replaces what was lost.
                    q.queue.push_owned(msg.as_bytes(), usize::MAX);
                    self.written += q.queue.write_to(port).map_err(Gone::Failed)?;
                }
                Ok(())
            }
            Kind::Cursor(c) => {
                let written = Self::catch_up(c, port, ring)?;
                self.written += written;
                Ok(())
            }
        }
    }

    fn catch_up(c: &mut Cursor, port: &mut dyn Port, ring: &ByteRing) -> Result<u64, Gone> {
        let mut written = 0u64;
        loop {
            if let Some((at, text)) = c.notices.front()
                && *at <= c.pos
            {
                let n = write_some(port, &text[c.notice_off..]).map_err(Gone::Failed)?;
                if n == 0 {
                    return Ok(written);
                }
                c.notice_off += n;
                c.notice_bytes -= n;
                if c.notice_off == text.len() {
                    c.notices.pop_front();
                    c.notice_off = 0;
                }
                continue;
            }
            let end = c.notices.front().map_or(ring.total(), |(at, _)| *at);
            if c.pos >= end {
                return Ok(written);
            }
            let Some((a, b)) = ring.since(c.pos) else {
                // Overwritten before it was sent: cannot happen while the ring holds at
                // least the limit, which the hub guarantees.
                return Err(Gone::CutOff { limit: c.limit });
            };
            let want = usize::try_from(end - c.pos).unwrap_or(usize::MAX);
            let slice = if a.is_empty() { b } else { a };
            let slice = &slice[..slice.len().min(want)];
            let n = write_some(port, slice).map_err(Gone::Failed)?;
            c.pos += n as u64;
            written += n as u64;
            if n < slice.len() {
                return Ok(written);
            }
        }
    }

    /// A message for this sink only, between the stream bytes already offered and those
    /// to come. Charged like stream bytes; dropped (and counted) when it does not fit.
    pub(crate) fn notice(&mut self, msg: &str, ring: &ByteRing) {
        match &mut self.kind {
            Kind::Queued(q) => {
                if !q.queue.push_owned(msg.as_bytes(), q.limit) {
                    self.dropped += msg.len() as u64;
                }
            }
            Kind::Cursor(c) => {
                let charged = c.notice_bytes + c.notices.len() * CHUNK_COST;
                if charged + msg.len() + CHUNK_COST > NOTICE_MAX {
                    self.dropped += msg.len() as u64;
                } else {
                    c.notice_bytes += msg.len();
                    c.notices.push_back((ring.total(), msg.as_bytes().to_vec()));
                }
            }
        }
    }
}

/// Writes as much of `data` as the port takes now; `Ok(0)` when it would block at once.
fn write_some(port: &mut dyn Port, data: &[u8]) -> io::Result<usize> {
    let mut off = 0;
    while off < data.len() {
        match port.write(&data[off..]) {
            Ok(0) => break,
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::super::backend::mem::MemPort;
    use super::*;

    fn port(
        budget: Option<usize>,
    ) -> (
        MemPort,
        std::sync::Arc<std::sync::Mutex<super::super::backend::mem::MemState>>,
    ) {
        let (p, s) = MemPort::new();
        s.lock().unwrap().budget = budget;
        (p, s)
    }

    #[test]
    fn one_byte_chunks_are_merged_and_charged_what_they_cost() {
        let ring = ByteRing::new(0);
        let (mut p, s) = port(Some(0));
        let mut sink = Sink::queued(Policy::Lossless, 1 << 20);
        for _ in 0..100_000 {
            sink.offer(&mut p, b"x", &ring, &mut None).unwrap();
        }
        assert_eq!(sink.pending(&ring), 100_000);
        // 7 tail buffers of 16 KiB, not 100,000 chunks.
        assert!(
            sink.charged() < 100_000 + 8 * (CHUNK_COST + MERGED_MAX),
            "{}",
            sink.charged()
        );
        s.lock().unwrap().budget = None;
        sink.flush(&mut p, &ring, "t").unwrap();
        assert_eq!(s.lock().unwrap().written.len(), 100_000);
        assert_eq!(sink.charged(), 0);
    }

    #[test]
    fn the_limit_counts_chunk_overhead_and_notices() {
        let ring = ByteRing::new(0);
        let (mut p, s) = port(Some(0));
        let mut sink = Sink::queued(Policy::DropAndCount, 4096);
        for _ in 0..10_000 {
            sink.offer(&mut p, &[b'y'; 600], &ring, &mut None).unwrap();
            sink.notice("[notice]", &ring);
        }
        assert!(sink.charged() <= 4096, "{}", sink.charged());
        assert!(sink.dropped > 0);
        s.lock().unwrap().budget = None;
        sink.flush(&mut p, &ring, "slow log").unwrap();
        let out = String::from_utf8_lossy(&s.lock().unwrap().written).into_owned();
        assert!(
            out.contains("bytes of console output dropped here: slow log too slow"),
            "{out}"
        );
    }

    #[test]
    fn a_cursor_reads_from_the_ring_with_notices_in_place() {
        let mut ring = ByteRing::new(64);
        let (mut p, s) = port(Some(0));
        let mut sink = Sink::cursor(0, 64);
        ring.push(b"abc");
        sink.offer(&mut p, b"abc", &ring, &mut None).unwrap();
        sink.notice("<N>", &ring);
        ring.push(b"def");
        sink.offer(&mut p, b"def", &ring, &mut None).unwrap();
        assert_eq!(sink.pending(&ring), 9);
        assert_eq!(sink.charged(), 3 + CHUNK_COST);
        s.lock().unwrap().budget = Some(4);
        sink.flush(&mut p, &ring, "c").unwrap();
        s.lock().unwrap().budget = None;
        sink.flush(&mut p, &ring, "c").unwrap();
        assert_eq!(s.lock().unwrap().written, b"abc<N>def");
        // Caught up: the next chunk goes out at once.
        ring.push(b"g");
        sink.offer(&mut p, b"g", &ring, &mut None).unwrap();
        assert_eq!(s.lock().unwrap().written, b"abc<N>defg");
    }

    #[test]
    fn a_cursor_too_far_behind_is_cut_off_and_notices_are_capped() {
        let mut ring = ByteRing::new(100);
        let (mut p, _s) = port(Some(0));
        let mut sink = Sink::cursor(0, 100);
        for _ in 0..1000 {
            sink.notice("you lost the keyboard", &ring);
        }
        assert!(sink.charged() <= NOTICE_MAX);
        assert!(sink.pending(&ring) <= NOTICE_MAX);
        let mut sink = Sink::cursor(0, 100);
        ring.push(&[1; 60]);
        assert!(sink.offer(&mut p, &[1; 60], &ring, &mut None).is_ok());
        ring.push(&[2; 60]);
        assert!(matches!(
            sink.offer(&mut p, &[2; 60], &ring, &mut None),
            Err(Gone::CutOff { limit: 100 })
        ));
    }
}
