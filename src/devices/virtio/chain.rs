//! Walking one descriptor chain of a split virtqueue, under the device's limits.
//!
//! virtio-queue's `DescriptorChain` iterator follows an indirect descriptor whether or not
//! VIRTIO_F_INDIRECT_DESC was negotiated, and an indirect table may hold up to 65535
//! descriptors, whatever the queue size. This device offers no indirect descriptors, so
//! a chain is walked here, one descriptor read at a time, and refused as soon as it:
//! - holds a descriptor with VIRTQ_DESC_F_INDIRECT (not negotiated: a driver error),
//! - is longer than `max` descriptors (at most the queue size: a longer chain loops),
//! - names an index beyond the queue, or a descriptor that cannot be read.
//!
//! So one chain costs at most `max` descriptor reads, and the callers (the console's
//! transmit and receive paths) bound the chains per call: a faulty or hostile guest costs
//! the thread that serves its queues a bounded time per notification.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::vstate::memory::GuestMemory;

/// Size of one split-ring descriptor in the descriptor table.
const DESC_SIZE: u64 = 16;

/// One buffer of a chain, as the driver described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub write_only: bool,
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor refers to an indirect table, a feature this device does not offer.
    #[error("indirect descriptor (VIRTIO_F_INDIRECT_DESC was not negotiated)")]
    Indirect,
    /// More descriptors than allowed (or than the queue has: a loop).
    #[error("more than {0} descriptors (a loop, or longer than the queue)")]
    TooLong(u16),
    /// A descriptor index at or beyond the queue size.
    #[error("descriptor index {0} is beyond the queue")]
    BadIndex(u16),
    /// The descriptor table entry is outside guest memory.
    #[error("descriptor {0} is outside guest memory")]
    Unreadable(u16),
}

/// Walks the chain starting at `head` in the descriptor table at `table` (a queue of
/// `queue_size` entries), putting its buffers into `out` (cleared first). At most
/// `max.min(queue_size)` descriptors are read.
pub fn walk(
    mem: &GuestMemory,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    max: u16,
    out: &mut Vec<Buffer>,
) -> Result<(), ChainError> {
    out.clear();
    let limit = max.min(queue_size);
    let mut index = head;
    loop {
        if index >= queue_size {
            return Err(ChainError::BadIndex(index));
        }
        if out.len() >= usize::from(limit) {
            return Err(ChainError::TooLong(limit));
        }
        let at = table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(ChainError::Unreadable(index))?;
        let desc: Descriptor = mem
            .read_obj(at)
            .map_err(|_| ChainError::Unreadable(index))?;
        if desc.refers_to_indirect_table() {
            return Err(ChainError::Indirect);
        }
        out.push(Buffer {
            addr: desc.addr(),
            len: desc.len(),
            write_only: desc.is_write_only(),
        });
        if !desc.has_next() {
            return Ok(());
        }
        index = desc.next();
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    use super::super::testutil::{NEXT, Ring, mem};
    use super::*;

    #[test]
    fn a_plain_chain_is_walked_whole() {
        let mem = mem();
        let r = Ring::new(&mem, 0x1000, 16);
        let head = r.chain(3, &[(0x8000, 10, 0), (0x9000, 20, 2)]);
        let mut out = Vec::new();
        walk(&mem, GuestAddress(r.desc), 16, head, 16, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Buffer {
                    addr: GuestAddress(0x8000),
                    len: 10,
                    write_only: false
                },
                Buffer {
                    addr: GuestAddress(0x9000),
                    len: 20,
                    write_only: true
                },
            ]
        );
    }

    #[test]
    fn loops_bad_indices_and_long_chains_are_refused() {
        let mem = mem();
        let r = Ring::new(&mem, 0x1000, 16);
        let mut out = Vec::new();
        let table = GuestAddress(r.desc);
        r.set_desc(0, 0x8000, 1, NEXT, 1);
        r.set_desc(1, 0x8000, 1, NEXT, 0);
        assert_eq!(
            walk(&mem, table, 16, 0, 64, &mut out),
            Err(ChainError::TooLong(16)),
            "a loop ends at the queue size"
        );
        r.set_desc(2, 0x8000, 1, NEXT, 16);
        assert_eq!(
            walk(&mem, table, 16, 2, 64, &mut out),
            Err(ChainError::BadIndex(16))
        );
        assert_eq!(
            walk(&mem, table, 16, 99, 64, &mut out),
            Err(ChainError::BadIndex(99))
        );
        let h = r.chain(4, &[(0x8000, 1, 0); 5]);
        assert_eq!(
            walk(&mem, table, 16, h, 4, &mut out),
            Err(ChainError::TooLong(4))
        );
        walk(&mem, table, 16, h, 5, &mut out).unwrap();
        assert_eq!(out.len(), 5);
        // a descriptor table outside guest memory
        assert_eq!(
            walk(&mem, GuestAddress(0xffff_0000), 16, 0, 16, &mut out),
            Err(ChainError::Unreadable(0))
        );
    }

    /// The case from issue 11: a 1000-descriptor indirect chain on a 16-entry queue. The
    /// walk refuses it at its first descriptor, without reading the indirect table.
    #[test]
    fn an_indirect_chain_is_refused_without_following_it() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x3000_0000), 0x10_0000),
        ])
        .unwrap();
        let mut q = MockSplitQueue::new(&mem, 16);
        q.add_indirect_chain(1000).unwrap();
        let head: u16 = mem.read_obj(q.avail_addr().unchecked_add(4)).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            walk(&mem, q.desc_table_addr(), 16, head, 16, &mut out),
            Err(ChainError::Indirect)
        );
        assert!(out.is_empty());
    }
}
