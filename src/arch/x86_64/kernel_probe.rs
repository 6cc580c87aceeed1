//! What the kernel image tells about its consoles: whether hvc0 (virtio-console over
//! virtio-mmio) exists before init runs, which decides the default command line's
//! `console=` (see [`crate::cli::config::default_cmdline`]).
//!
//! Why it matters: with `console=hvc0` and virtio_console built as a module (Debian's
//! stock kernel), the kernel has no console when it starts init, so a plain init's
//! stdout and stderr go nowhere. With `console=ttyS0` every kernel has a console, but
//! the UART is slow (one VM exit per byte). Naming both makes the kernel print its log to
//! both (every line twice in the hub's stream). So the default names exactly one, the one
//! that exists when init starts: hvc0 when the kernel has both virtio_mmio and
//! virtio_console built in, ttyS0 otherwise.
//!
//! How: the kernel image is scanned for the two drivers' names (`virtio-mmio`, the
//! platform driver, and `virtio_console`, the virtio driver). Built-in drivers carry them
//! in their `struct device_driver`; a kernel where they are modules has neither. An ELF
//! vmlinux is scanned as it is; a bzImage's payload (boot protocol 2.08+:
//! `payload_offset`, `payload_length`) is decompressed as a stream (gzip, LZ4 legacy
//! frames as Debian builds them, zstd) with bounded memory. Anything else (xz, bzip2,
//! lzma, lzo, an unreadable file) is [`KernelConsoles::Unknown`]: the default then takes
//! the console every kernel has, ttyS0.
//!
//! At boot the builder scans the kernel it has just loaded into guest memory
//! ([`probe_loaded`]: an ELF vmlinux, or a bzImage microvm unpacked itself), so the
//! image is read and unpacked once; [`probe`] reads the file (for
//! `--print-default-cmdline`, `microvm run`, and a bzImage left to the guest's own
//! decompressor). Cost of [`probe`]: Debian's 6.1 cloud kernel (14 MB LZ4, 53 MB
//! decompressed) takes ~40 ms here.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The names of the drivers that must be built in for hvc0 to exist before init.
const NEEDLES: [&[u8]; 2] = [b"virtio-mmio", b"virtio_console"];
/// Chunks scanned at a time.
const CHUNK: usize = 1 << 20;
use crate::arch::x86_64::boot::{payload_range, setup_header_in};
use crate::arch::x86_64::unpack::{self, Format, LZ4_LEGACY_BLOCK};

/// What the image says about hvc0 at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelConsoles {
    /// virtio_mmio and virtio_console are built in: hvc0 exists before init.
    Hvc0AtBoot,
    /// At least one of them is not built in (a module, or absent).
    NoHvc0AtBoot,
    /// The image could not be read through (the reason, for `--print-default-cmdline`).
    Unknown(String),
}

/// Scans a kernel already loaded, uncompressed, at `start` (`len` bytes) in guest
/// memory: the builder's way, so that an image is read and unpacked once.
pub fn probe_loaded(
    mem: &crate::arch::GuestMemory,
    start: vm_memory::GuestAddress,
    len: u64,
) -> KernelConsoles {
    match scan(GuestReader {
        mem,
        at: start,
        left: len,
    }) {
        Ok(true) => KernelConsoles::Hvc0AtBoot,
        Ok(false) => KernelConsoles::NoHvc0AtBoot,
        Err(e) => KernelConsoles::Unknown(e.to_string()),
    }
}

/// Reads `left` bytes of guest memory from `at` on.
struct GuestReader<'a> {
    mem: &'a crate::arch::GuestMemory,
    at: vm_memory::GuestAddress,
    left: u64,
}

impl Read for GuestReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use vm_memory::{Bytes, GuestAddress};
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self
            .mem
            .read(&mut buf[..want], self.at)
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.at = GuestAddress(self.at.0 + n as u64);
        self.left -= n as u64;
        Ok(n)
    }
}

/// Scans the kernel at `path`.
pub fn probe(path: &Path) -> KernelConsoles {
    match probe_file(path) {
        Ok(Some(true)) => KernelConsoles::Hvc0AtBoot,
        Ok(Some(false)) => KernelConsoles::NoHvc0AtBoot,
        Ok(None) => KernelConsoles::Unknown("compression not recognized".into()),
        Err(e) => KernelConsoles::Unknown(e.to_string()),
    }
}

fn probe_file(path: &Path) -> io::Result<Option<bool>> {
    // Never open a fifo or a device: opening a fifo blocks.
    if !std::fs::metadata(path)?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let mut f = File::open(path)?;
    let mut head = [0u8; HEAD];
    let n = read_full(&mut f, &mut head)?;
    let head = &head[..n];
    if head.starts_with(b"\x7fELF") {
        f.seek(SeekFrom::Start(0))?;
        return scan(BufReader::new(f)).map(Some);
    }
    let Some((offset, len)) = bzimage_payload(head) else {
        return Ok(None);
    };
    f.seek(SeekFrom::Start(offset))?;
    let mut payload = Vec::new();
    f.take(len).read_to_end(&mut payload)?;
    scan_compressed(&payload)
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Bytes read from the start of a kernel file: through the bzImage setup header.
const HEAD: usize = 0x300;

/// The compressed kernel's place in a bzImage (file offset, length), read from the setup
/// header in `head` the way the loader reads it.
fn bzimage_payload(head: &[u8]) -> Option<(u64, u64)> {
    payload_range(&setup_header_in(head)?)
}

/// A decompressing reader over `payload`, by its magic (the loader's formats, plus
/// zstd); `None` for formats not handled.
fn decoder(payload: &[u8]) -> io::Result<Option<Box<dyn Read + '_>>> {
    Ok(match (unpack::format(payload), payload) {
        (Format::Gzip, _) => Some(Box::new(flate2::read::GzDecoder::new(payload))),
        (Format::Lz4Legacy, _) => Some(Box::new(Lz4Legacy::new(payload))),
        (Format::Other, [0x28, 0xb5, 0x2f, 0xfd, ..]) => Some(Box::new(
            ruzstd::decoding::StreamingDecoder::new(payload)
                .map_err(|e| io::Error::other(format!("zstd: {e}")))?,
        )),
        (Format::Other, _) => None,
    })
}

/// Decompresses `payload` and scans it; `None` for formats not handled.
fn scan_compressed(payload: &[u8]) -> io::Result<Option<bool>> {
    decoder(payload)?.map(scan).transpose()
}

/// The ELF vmlinux inside the bzImage at `path` (gzip, LZ4 or zstd payloads), as
/// scripts/extract-vmlinux gives it; `None` for other compressions.
pub fn extract_vmlinux(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut f = File::open(path)?;
    let mut head = [0u8; HEAD];
    let n = read_full(&mut f, &mut head)?;
    let Some((offset, len)) = bzimage_payload(&head[..n]) else {
        return Ok(None);
    };
    f.seek(SeekFrom::Start(offset))?;
    let mut payload = Vec::new();
    f.take(len).read_to_end(&mut payload)?;
    let Some(mut d) = decoder(&payload)? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    d.read_to_end(&mut out)?;
    Ok(Some(out))
}

/// True when every needle occurs in the stream. Reads in chunks, keeping the tail of
/// the previous chunk so that a name split between two chunks is still found.
fn scan(mut r: impl Read) -> io::Result<bool> {
    let keep = NEEDLES.iter().map(|n| n.len()).max().unwrap_or(1) - 1;
    let finders: Vec<_> = NEEDLES.iter().map(memchr::memmem::Finder::new).collect();
    let mut found = [false; NEEDLES.len()];
    let mut buf = vec![0u8; keep + CHUNK];
    let mut have = 0;
    loop {
        let n = read_full(&mut r, &mut buf[have..])?;
        let end = have + n;
        for (hit, f) in found.iter_mut().zip(&finders) {
            *hit = *hit || f.find(&buf[..end]).is_some();
        }
        if found.iter().all(|&h| h) {
            return Ok(true);
        }
        if n == 0 || end < buf.len() {
            return Ok(false);
        }
        buf.copy_within(end - keep..end, 0);
        have = keep;
    }
}

/// A reader over an LZ4 legacy stream, one block (at most 8 MiB) decompressed at a time;
/// the blocks are found by the loader's own [`unpack::lz4_legacy_blocks`].
struct Lz4Legacy<'a> {
    blocks: std::vec::IntoIter<&'a [u8]>,
    block: Vec<u8>,
    pos: usize,
    len: usize,
}

impl<'a> Lz4Legacy<'a> {
    fn new(payload: &'a [u8]) -> Self {
        Lz4Legacy {
            blocks: unpack::lz4_legacy_blocks(payload).into_iter(),
            block: Vec::new(),
            pos: 0,
            len: 0,
        }
    }

    /// Decompresses the next block; false at the end of the stream.
    fn next_block(&mut self) -> io::Result<bool> {
        let Some(data) = self.blocks.next() else {
            return Ok(false);
        };
        self.block.resize(LZ4_LEGACY_BLOCK, 0);
        self.len = lz4_flex::block::decompress_into(data, &mut self.block)
            .map_err(|e| io::Error::other(format!("lz4: {e}")))?;
        self.pos = 0;
        Ok(true)
    }
}

impl Read for Lz4Legacy<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.len {
            if !self.next_block()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::unpack::LZ4_LEGACY_MAGIC;
    use std::io::Write;

    #[test]
    fn a_kernel_loaded_in_guest_memory_is_scanned_where_it_lies() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = crate::arch::x86_64::test_memory(32 << 20);
        let start = GuestAddress(16 << 20);
        for (with_console, want) in [
            (true, KernelConsoles::Hvc0AtBoot),
            (false, KernelConsoles::NoHvc0AtBoot),
        ] {
            let img = image(with_console);
            mem.write_slice(&img, start).unwrap();
            assert_eq!(probe_loaded(&mem, start, img.len() as u64), want);
        }
        // Only what lies in the range counts.
        let img = image(true);
        assert_eq!(
            probe_loaded(&mem, start, 1000),
            KernelConsoles::NoHvc0AtBoot
        );
        assert!(matches!(
            probe_loaded(&mem, GuestAddress(31 << 20), img.len() as u64),
            KernelConsoles::NoHvc0AtBoot | KernelConsoles::Unknown(_)
        ));
    }

    /// A stream holding both names, one split across the scanner's chunk boundary.
    fn image(with_console: bool) -> Vec<u8> {
        let mut v = vec![0u8; CHUNK - 5];
        v.extend_from_slice(b"virtio-mmio\0");
        v.extend(std::iter::repeat_n(7u8, 3 * CHUNK));
        if with_console {
            v.extend_from_slice(b"\0virtio_console\0");
        }
        v.extend_from_slice(b"tail");
        v
    }

    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 5 * 512];
        v[0x1f1] = 4;
        v[0x202..0x206].copy_from_slice(b"HdrS");
        v[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        v[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
        v[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend(std::iter::repeat_n(0xcc, 100));
        v.extend_from_slice(payload);
        v.extend_from_slice(b"trailer virtio_console");
        v
    }

    fn lz4_legacy(data: &[u8]) -> Vec<u8> {
        let mut v = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for block in data.chunks(LZ4_LEGACY_BLOCK) {
            let c = lz4_flex::block::compress(block);
            v.extend_from_slice(&(c.len() as u32).to_le_bytes());
            v.extend_from_slice(&c);
        }
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn probe_bytes(bytes: &[u8]) -> KernelConsoles {
        let dir = std::env::temp_dir().join(format!("mvprobe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = dir.join(format!("k{n}"));
        std::fs::write(&p, bytes).unwrap();
        let r = probe(&p);
        std::fs::remove_file(&p).unwrap();
        r
    }

    #[test]
    fn scans_across_chunks() {
        assert!(scan(&image(true)[..]).unwrap());
        assert!(!scan(&image(false)[..]).unwrap());
        assert!(!scan(&b""[..]).unwrap());
    }

    #[test]
    fn elf_gzip_and_lz4_kernels() {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend(image(true));
        assert_eq!(probe_bytes(&elf), KernelConsoles::Hvc0AtBoot);
        for with in [true, false] {
            let want = if with {
                KernelConsoles::Hvc0AtBoot
            } else {
                KernelConsoles::NoHvc0AtBoot
            };
            // The names only after the payload (the trailer) must not count.
            assert_eq!(probe_bytes(&bzimage(&gzip(&image(with)))), want);
            let dir = std::env::temp_dir().join(format!("mvextract-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let k = dir.join(format!("k{with}"));
            std::fs::write(&k, bzimage(&lz4_legacy(&image(with)))).unwrap();
            assert_eq!(extract_vmlinux(&k).unwrap(), Some(image(with)));
            std::fs::remove_dir_all(&dir).unwrap();
            assert_eq!(probe_bytes(&bzimage(&lz4_legacy(&image(with)))), want);
        }
    }

    #[test]
    fn unknown_formats_and_files() {
        let xz = bzimage(b"\xfd7zXZ\0 not really");
        assert!(matches!(probe_bytes(&xz), KernelConsoles::Unknown(_)));
        assert!(matches!(
            probe(Path::new("/nonexistent/kernel")),
            KernelConsoles::Unknown(_)
        ));
        assert!(matches!(
            probe(Path::new("/tmp")),
            KernelConsoles::Unknown(_)
        ));
        // A corrupt LZ4 block is an error, not a panic.
        let mut bad = lz4_legacy(&image(true));
        bad[10] ^= 0xff;
        bad[20] ^= 0xff;
        let _ = probe_bytes(&bzimage(&bad));
        assert_eq!(
            probe_bytes(&bzimage(&[])),
            KernelConsoles::Unknown("compression not recognized".into())
        );
    }
}
