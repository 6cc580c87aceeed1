//! Guest memory: anonymous host mappings laid out around the 32-bit MMIO gap.
//!
//! Each region is mapped at a 2 MiB-aligned host address and advised for transparent
//! huge pages (MADV_HUGEPAGE). Alignment is what lets the host back guest RAM with 2 MiB
//! pages and KVM map them with 2 MiB entries in its nested page tables (guest-physical and
//! host-virtual addresses must agree modulo 2 MiB): one nested fault per 2 MiB of memory
//! the guest touches instead of one per 4 KiB. In the nested rig a Linux boot took
//! ~23,000 VM exits with unaligned memory and ~5,500 with aligned memory (Firecracker
//! aligns too); see docs/BENCHMARKS.md.
//!
//! The mappings live as long as the process (the VM's memory is never given back before
//! exit; exit frees it).

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestMemoryMmap, GuestRegionMmap};

pub use crate::arch::x86_64::layout::ram_ranges;

pub use crate::arch::GuestMemory;

/// Host alignment of guest RAM (a huge page).
pub const HOST_ALIGNMENT: usize = 2 << 20;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping.
    #[error("cannot map {size_mib} MiB of guest memory: {source}")]
    Map {
        /// Requested size.
        size_mib: u64,
        /// What the host said.
        source: std::io::Error,
    },
    /// vm-memory refused the regions (a bug in the layout).
    #[error("guest memory layout: {0}")]
    Layout(String),
}

/// Maps `len` bytes (a multiple of the page size) of anonymous memory at a
/// [`HOST_ALIGNMENT`]-aligned address: over-maps by the alignment, then unmaps the head
/// and tail around the aligned part.
fn map_aligned(len: usize) -> std::io::Result<*mut u8> {
    let total = len
        .checked_add(HOST_ALIGNMENT)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh anonymous private mapping at an address the kernel picks; the
    // result is checked.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = base as usize;
    let aligned = start.next_multiple_of(HOST_ALIGNMENT);
    let head = aligned - start;
    let tail = total - head - len;
    // SAFETY: both ranges lie inside the mapping just made and outside the part kept.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        // Advice only: without THP support the memory works the same, in 4 KiB pages.
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    Ok(aligned as *mut u8)
}

/// Maps `size` bytes of guest memory (see the module notes). Pages are allocated by the
/// host on first touch, so an idle guest costs only what it used.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    let map_err = |source| MemoryError::Map {
        size_mib: size >> 20,
        source,
    };
    let mut regions = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let ptr = map_aligned(len).map_err(map_err)?;
        // SAFETY: `ptr` is the start of a live mapping of `len` bytes made above, which
        // is never unmapped (see the module notes).
        let region = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(ptr) }
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        let region = GuestRegionMmap::new(region, addr)
            .ok_or_else(|| MemoryError::Layout(format!("region at {addr:?} overflows")))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};
    use vm_memory::GuestAddress;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn regions_are_host_aligned_and_usable() {
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
        let mem = create(6 << 20).unwrap();
        for r in mem.iter() {
            assert_eq!(r.as_ptr() as usize % HOST_ALIGNMENT, 0);
            assert_eq!(r.len(), 6 << 20);
        }
        mem.write_obj(0xdead_beef_u32, GuestAddress((6 << 20) - 4))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((6 << 20) - 4)).unwrap(),
            0xdead_beef
        );
        assert!(mem.read_obj::<u32>(GuestAddress(6 << 20)).is_err());
    }

    #[test]
    fn large_memory_skips_the_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), (1 << 30) as usize));
    }
}
