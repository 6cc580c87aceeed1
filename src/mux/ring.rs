//! A byte ring that keeps exactly the last `capacity` bytes written to it.
//!
//! The hub keeps ONE of these for its output stream: it is the history (what a
//! late-joining socket client is replayed, the `ring` content in `--report`) and the
//! backlog of every socket client at once (a client is a position in the stream; it
//! reads from here until it has caught up, so no client costs a copy). Never blocks,
//! never fails: old bytes are overwritten. Memory grows as bytes arrive, never beyond
//! the capacity.

/// Fixed-capacity byte ring keeping the most recent `capacity` bytes.
#[derive(Debug, Clone)]
pub struct ByteRing {
    buf: Vec<u8>,
    cap: usize,
    /// Index of the oldest byte.
    head: usize,
    len: usize,
    /// Total bytes ever pushed (so callers can tell how much was overwritten).
    total: u64,
}

impl ByteRing {
    /// A ring keeping the last `capacity` bytes. A capacity of 0 keeps nothing.
    /// Memory is allocated lazily, as bytes arrive, up to `capacity`.
    pub fn new(capacity: usize) -> Self {
        ByteRing {
            buf: Vec::new(),
            cap: capacity,
            head: 0,
            len: 0,
            total: 0,
        }
    }

    /// The configured capacity.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Number of bytes currently held (`min(total pushed, capacity)`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total number of bytes ever pushed.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Append `data`, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        if self.cap == 0 || data.is_empty() {
            return;
        }
        // Only the last `cap` bytes of `data` can survive.
        let data = if data.len() > self.cap {
            &data[data.len() - self.cap..]
        } else {
            data
        };
        // Still growing: the buffer is linear (head == 0) until it first fills.
        if self.buf.len() < self.cap {
            let room = self.cap - self.buf.len();
            let n = room.min(data.len());
            if self.buf.capacity() - self.buf.len() < n {
                // Grow geometrically, but never past the capacity (Vec's own doubling
                // could allocate twice what the limit promises).
                let want = (self.buf.len() * 2).max(self.buf.len() + n).max(4096);
                self.buf.reserve_exact(want.min(self.cap) - self.buf.len());
            }
            self.buf.extend_from_slice(&data[..n]);
            self.len = self.buf.len();
            if n == data.len() {
                return;
            }
            // Full now; the rest wraps below.
            return self.push_full(&data[n..]);
        }
        self.push_full(data);
    }

    /// Push into a buffer that already has `cap` bytes allocated and is full
    /// (or becomes full): overwrite from the oldest byte on.
    fn push_full(&mut self, data: &[u8]) {
        debug_assert_eq!(self.buf.len(), self.cap);
        debug_assert!(data.len() <= self.cap);
        // Write position: one past the newest byte.
        let tail = (self.head + self.len) % self.cap;
        let first = (self.cap - tail).min(data.len());
        self.buf[tail..tail + first].copy_from_slice(&data[..first]);
        let rest = data.len() - first;
        self.buf[..rest].copy_from_slice(&data[first..]);
        let new_len = self.len + data.len();
        if new_len > self.cap {
            self.head = (self.head + (new_len - self.cap)) % self.cap;
            self.len = self.cap;
        } else {
            self.len = new_len;
        }
    }

    /// The held bytes, oldest first, as (up to) two slices.
    pub fn as_slices(&self) -> (&[u8], &[u8]) {
        if self.len == 0 {
            return (&[], &[]);
        }
        let end = self.head + self.len;
        if end <= self.buf.len() {
            (&self.buf[self.head..end], &[])
        } else {
            (&self.buf[self.head..], &self.buf[..end - self.buf.len()])
        }
    }

    /// Bytes allocated for the ring now (at most the capacity).
    pub fn allocated(&self) -> usize {
        self.buf.capacity()
    }

    /// The bytes from absolute stream position `pos` (counted like [`ByteRing::total`])
    /// to the newest, as (up to) two slices; `None` when some of them were already
    /// overwritten, or `pos` lies beyond the stream.
    pub fn since(&self, pos: u64) -> Option<(&[u8], &[u8])> {
        let behind = usize::try_from(self.total.checked_sub(pos)?).ok()?;
        if behind > self.len {
            return None;
        }
        let (a, b) = self.as_slices();
        let skip = self.len - behind;
        if skip >= a.len() {
            Some((&b[skip - a.len()..], &[]))
        } else {
            Some((&a[skip..], b))
        }
    }

    /// A copy of the last `n` bytes held (fewer if fewer are held), oldest first.
    pub fn tail(&self, n: usize) -> Vec<u8> {
        let n = n.min(self.len);
        let (a, b) = self.since(self.total - n as u64).unwrap_or((&[], &[]));
        [a, b].concat()
    }

    /// Raises the capacity to `cap` (never lowers it), keeping what is held.
    pub fn grow_to(&mut self, cap: usize) {
        if cap <= self.cap {
            return;
        }
        if self.buf.len() == self.cap && self.cap > 0 {
            // Full and possibly wrapped: lay it out linearly, then it grows again.
            self.buf = self.to_vec();
            self.head = 0;
        }
        self.cap = cap;
    }

    /// A copy of the held bytes, oldest first.
    pub fn to_vec(&self) -> Vec<u8> {
        let (a, b) = self.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        v
    }

    /// Forget everything held (capacity and total are kept).
    pub fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keeps_last_bytes() {
        let mut r = ByteRing::new(4);
        r.push(b"ab");
        assert_eq!(r.to_vec(), b"ab");
        r.push(b"cde");
        assert_eq!(r.to_vec(), b"bcde");
        r.push(b"f");
        assert_eq!(r.to_vec(), b"cdef");
        r.push(b"0123456789");
        assert_eq!(r.to_vec(), b"6789");
        assert_eq!(r.total(), 16);
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut r = ByteRing::new(0);
        r.push(b"abc");
        assert!(r.is_empty());
        assert_eq!(r.total(), 3);
    }

    #[test]
    fn since_a_position() {
        let mut r = ByteRing::new(4);
        r.push(b"abcdef"); // holds cdef, total 6
        assert_eq!(r.since(6), Some((&b""[..], &b""[..])));
        assert_eq!(
            r.since(2).map(|(a, b)| [a, b].concat()),
            Some(b"cdef".to_vec())
        );
        assert_eq!(
            r.since(4).map(|(a, b)| [a, b].concat()),
            Some(b"ef".to_vec())
        );
        assert_eq!(r.since(1), None, "overwritten");
        assert_eq!(r.since(7), None, "beyond the stream");
        assert_eq!(r.tail(3), b"def");
        assert_eq!(r.tail(10), b"cdef");
    }

    #[test]
    fn grows_keeping_content_and_never_allocates_past_capacity() {
        let mut r = ByteRing::new(4);
        r.push(b"abcdef");
        r.grow_to(8);
        assert_eq!(r.to_vec(), b"cdef");
        r.push(b"ghijk");
        assert_eq!(r.to_vec(), b"defghijk");
        assert!(r.allocated() <= 8);
        let mut big = ByteRing::new(10_000);
        for _ in 0..100 {
            big.push(&[7; 333]);
        }
        assert!(big.allocated() <= 10_000, "{}", big.allocated());
    }

    proptest! {
        #[test]
        fn since_matches_the_stream(
            cap in 1usize..64,
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..20),
            grow in 0usize..64,
        ) {
            let mut r = ByteRing::new(cap);
            let mut all = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                r.push(c);
                all.extend_from_slice(c);
                if i == 3 {
                    r.grow_to(cap + grow);
                }
                for pos in 0..=all.len() as u64 {
                    let want = &all[pos as usize..];
                    match r.since(pos) {
                        Some((a, b)) => prop_assert_eq!([a, b].concat(), want.to_vec()),
                        None => prop_assert!(want.len() > r.len()),
                    }
                }
            }
        }

        #[test]
        fn ring_keeps_exactly_last_size_bytes(
            cap in 0usize..64,
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..40)
        ) {
            let mut r = ByteRing::new(cap);
            let mut all = Vec::new();
            for c in &chunks {
                r.push(c);
                all.extend_from_slice(c);
                let want = &all[all.len().saturating_sub(cap)..];
                prop_assert_eq!(r.to_vec(), want.to_vec());
                prop_assert_eq!(r.len(), want.len());
            }
            prop_assert_eq!(r.total(), all.len() as u64);
        }
    }
}
