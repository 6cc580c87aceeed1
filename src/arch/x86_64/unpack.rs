//! A bzImage's kernel, unpacked on the host.
//!
//! A bzImage carries the kernel (an ELF vmlinux) compressed, behind a small decompressor
//! that runs in the guest: it unpacks the kernel, applies relocations, then jumps to it.
//! In a guest that runs slower than the host that is time spent before the kernel's first
//! instruction (in the nested rig 1-3 s of a ~10 s boot, docs/BENCHMARKS.md). The boot
//! protocol (2.08+) says where the compressed payload lies (`payload_offset`,
//! `payload_length`); when it is LZ4 (legacy frames, as `CONFIG_KERNEL_LZ4` builds it) or
//! gzip, microvm unpacks it here and loads the vmlinux like an ELF kernel, keeping the
//! bzImage's setup header for the zero page. Other formats (xz, zstd, bzip2, lzma, lzo)
//! are left to the guest's own decompressor, as before.
//!
//! The kernel then runs at its link address, as when booting an ELF vmlinux (Firecracker
//! boots this way): the in-guest decompressor's KASLR of the kernel image does not
//! happen (the kernel still randomizes its memory regions itself).

use std::io::Read;

/// LZ4 legacy frame magic (what the kernel's `lz4 -l` produces).
pub const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// The largest block a legacy LZ4 frame holds, uncompressed.
pub const LZ4_LEGACY_BLOCK: usize = 8 << 20;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// The largest kernel unpacked here (a bigger one is left to the guest).
pub const MAX_UNPACKED: usize = 512 << 20;
/// Threads that unpack LZ4 blocks at once (at most the host's CPUs).
const UNPACK_THREADS: usize = 4;

/// The compression of a payload, by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// LZ4 legacy frames.
    Lz4Legacy,
    /// gzip.
    Gzip,
    /// Anything else: the guest's decompressor handles it.
    Other,
}

/// The format of `payload`.
pub fn format(payload: &[u8]) -> Format {
    match payload {
        [a, b, c, d, ..] if u32::from_le_bytes([*a, *b, *c, *d]) == LZ4_LEGACY_MAGIC => {
            Format::Lz4Legacy
        }
        [a, b, ..] if [*a, *b] == GZIP_MAGIC => Format::Gzip,
        _ => Format::Other,
    }
}

/// Why a payload could not be unpacked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnpackError {
    /// Not a format unpacked here.
    #[error("payload compression not unpacked by microvm")]
    Unsupported,
    /// The compressed data is damaged.
    #[error("damaged {0} payload")]
    Corrupt(&'static str),
    /// More than [`MAX_UNPACKED`] bytes.
    #[error("unpacked kernel larger than {} MiB", MAX_UNPACKED >> 20)]
    TooLarge,
    /// The result is not an ELF file.
    #[error("the unpacked payload is not an ELF vmlinux")]
    NotElf,
}

/// The compressed blocks of LZ4 legacy frames: a magic, then blocks of (u32 compressed
/// size, data), each at most 8 MiB unpacked; the magic may repeat (concatenated frames).
/// The kernel's build appends the unpacked size (u32) after the last block; a "block"
/// that runs past the end of the input ends the stream.
pub fn lz4_legacy_blocks(payload: &[u8]) -> Vec<&[u8]> {
    let mut blocks = Vec::new();
    let mut pos = 4;
    while let Some(word) = payload.get(pos..pos + 4) {
        let size = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) as usize;
        pos += 4;
        if size as u32 == LZ4_LEGACY_MAGIC {
            continue;
        }
        let Some(block) = payload.get(pos..pos + size) else {
            break;
        };
        blocks.push(block);
        pos += size;
    }
    blocks
}

/// Unpacks LZ4 legacy frames. The blocks are independent and every block but the last
/// unpacks to exactly 8 MiB, so each has its own slot in the output and they are unpacked
/// on up to [`UNPACK_THREADS`] threads at once.
fn lz4_legacy(payload: &[u8]) -> Result<Vec<u8>, UnpackError> {
    let blocks = lz4_legacy_blocks(payload);
    let room = blocks.len().saturating_mul(LZ4_LEGACY_BLOCK);
    if room > MAX_UNPACKED {
        return Err(UnpackError::TooLarge);
    }
    // Zeroed pages straight from the kernel: no copying as it grows.
    let mut out = vec![0u8; room];
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, UNPACK_THREADS)
        .min(blocks.len().max(1));
    let mut slots: Vec<(&[u8], &mut [u8])> = blocks
        .iter()
        .copied()
        .zip(out.chunks_mut(LZ4_LEGACY_BLOCK))
        .collect();
    let per_thread = slots.len().div_ceil(threads).max(1);
    let sizes: Vec<Result<usize, UnpackError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = slots
            .chunks_mut(per_thread)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter_mut()
                        .map(|(block, slot)| {
                            lz4_flex::block::decompress_into(block, slot)
                                .map_err(|_| UnpackError::Corrupt("LZ4"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| {
                w.join()
                    .unwrap_or_else(|_| vec![Err(UnpackError::Corrupt("LZ4"))])
            })
            .collect()
    });
    let mut len = 0;
    let last = sizes.len().saturating_sub(1);
    for (i, size) in sizes.into_iter().enumerate() {
        let size = size?;
        // Only the last block may be short: a short one before it would leave a hole.
        if i < last && size != LZ4_LEGACY_BLOCK {
            return Err(UnpackError::Corrupt("LZ4"));
        }
        len += size;
    }
    out.truncate(len);
    Ok(out)
}

/// Unpacks one gzip member (the appended size after it is ignored).
fn gzip(payload: &[u8]) -> Result<Vec<u8>, UnpackError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(payload)
        .take(MAX_UNPACKED as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| UnpackError::Corrupt("gzip"))?;
    if out.len() > MAX_UNPACKED {
        return Err(UnpackError::TooLarge);
    }
    Ok(out)
}

/// Unpacks a bzImage payload into the vmlinux ELF it holds.
pub fn unpack(payload: &[u8]) -> Result<Vec<u8>, UnpackError> {
    let out = match format(payload) {
        Format::Lz4Legacy => lz4_legacy(payload)?,
        Format::Gzip => gzip(payload)?,
        Format::Other => return Err(UnpackError::Unsupported),
    };
    if !out.starts_with(b"\x7fELF") {
        return Err(UnpackError::NotElf);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn elf_like(len: usize) -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        v.extend((0..len).map(|i| (i % 251) as u8));
        v
    }

    /// LZ4 legacy frames as the kernel's build writes them: magic, blocks of at most
    /// 8 MiB, the unpacked size appended.
    fn lz4_frames(data: &[u8]) -> Vec<u8> {
        let mut v = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let c = lz4_flex::block::compress(chunk);
            v.extend((c.len() as u32).to_le_bytes());
            v.extend(c);
        }
        v.extend((data.len() as u32).to_le_bytes());
        v
    }

    #[test]
    fn lz4_legacy_roundtrip_across_blocks() {
        let data = elf_like(3 * LZ4_LEGACY_BLOCK + 12345);
        let payload = lz4_frames(&data);
        assert_eq!(format(&payload), Format::Lz4Legacy);
        assert_eq!(unpack(&payload).unwrap(), data);
    }

    #[test]
    fn lz4_legacy_refuses_a_short_block_before_the_last() {
        let mut payload = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in [&elf_like(100)[..], &[7u8; 100][..]] {
            let c = lz4_flex::block::compress(chunk);
            payload.extend((c.len() as u32).to_le_bytes());
            payload.extend(c);
        }
        assert_eq!(unpack(&payload), Err(UnpackError::Corrupt("LZ4")));
    }

    #[test]
    fn gzip_roundtrip() {
        let data = elf_like(100_000);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let mut payload = enc.finish().unwrap();
        payload.extend((data.len() as u32).to_le_bytes());
        assert_eq!(format(&payload), Format::Gzip);
        assert_eq!(unpack(&payload).unwrap(), data);
    }

    #[test]
    fn other_formats_and_damage_are_refused() {
        let xz = [0xfd, b'7', b'z', b'X', b'Z', 0];
        assert_eq!(unpack(&xz), Err(UnpackError::Unsupported));
        assert_eq!(unpack(&[]), Err(UnpackError::Unsupported));
        let mut payload = lz4_frames(&elf_like(1000));
        let n = payload.len();
        payload[10..n - 4].fill(0xff);
        assert_eq!(unpack(&payload), Err(UnpackError::Corrupt("LZ4")));
        let not_elf = lz4_frames(b"just some bytes, not a kernel");
        assert_eq!(unpack(&not_elf), Err(UnpackError::NotElf));
        assert_eq!(
            unpack(&[0x1f, 0x8b, 0, 0, 0]),
            Err(UnpackError::Corrupt("gzip"))
        );
    }
}
