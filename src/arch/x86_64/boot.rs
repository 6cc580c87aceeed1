//! Linux boot protocol (x86 64-bit entry): loads a bzImage or an ELF vmlinux, the initrd
//! and the command line, and writes the zero page with the e820 map. A bzImage whose
//! payload microvm can unpack (LZ4, gzip) is unpacked on the host and loaded as the ELF
//! it holds ([`super::unpack`]); others boot through their own decompressor.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{Cmdline, KernelLoader, bzimage::BzImage, elf::Elf, load_cmdline};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion,
};

use super::layout::{CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START};
use super::unpack::{self, UnpackError};
use crate::arch::GuestMemory;

/// `boot_params.hdr.boot_flag` magic.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `boot_params.hdr.header` magic: "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id: we are not one of the registered loaders.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// xloadflags bit: the kernel has a 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// The kernel's own limit when the image does not say (COMMAND_LINE_SIZE on x86).
const DEFAULT_CMDLINE_MAX: usize = 2048;
/// initrd_addr_max for boot protocols older than 2.03.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PAGE_SIZE: u64 = 4096;

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}: {source}")]
    KernelFile {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The kernel is neither a bzImage nor an ELF vmlinux, or does not fit.
    #[error("kernel {path} is not a loadable x86_64 bzImage or ELF vmlinux: {reason}")]
    BadKernel {
        /// The path given.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The initrd cannot be opened or read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdFile {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The initrd does not fit in guest memory beside the kernel.
    #[error(
        "initrd {path} ({size_mib} MiB) does not fit in guest memory beside the kernel; raise --memory (now {mem_mib} MiB)"
    )]
    InitrdTooLarge {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size_mib: u64,
        /// Guest memory size.
        mem_mib: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit (excluding the NUL).
        max: usize,
    },
    /// The command line has a character the kernel cannot take (NUL, non-ASCII).
    #[error("kernel command line is invalid: {0}")]
    CmdlineInvalid(String),
    /// Writing boot structures to guest memory failed.
    #[error("cannot write {what} to guest memory: {reason}")]
    Memory {
        /// Which structure.
        what: &'static str,
        /// The error.
        reason: String,
    },
}

/// What the kernel loader found: where to start, and the header for the zero page.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: GuestAddress,
    /// First byte after the kernel image.
    pub end: u64,
    /// Setup header (from the bzImage, or synthesized for an ELF vmlinux).
    pub header: setup_header,
    /// Where the uncompressed kernel lies in guest memory (an ELF vmlinux, or a bzImage
    /// unpacked here); `None` for a bzImage left to the guest's decompressor.
    pub image: Option<(GuestAddress, u64)>,
}

impl LoadedKernel {
    /// The longest command line (without NUL) this kernel accepts.
    pub fn cmdline_max(&self) -> usize {
        let h = self.header;
        if h.version >= 0x206 && h.cmdline_size > 0 {
            h.cmdline_size as usize
        } else {
            DEFAULT_CMDLINE_MAX - 1
        }
    }
}

fn bad_kernel(path: &Path, reason: impl Into<String>) -> BootError {
    BootError::BadKernel {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads the kernel's version string from a bzImage header, if it has one (used to tell
/// PVM guest kernels apart).
pub fn kernel_version_string(path: &Path) -> Option<String> {
    let mut f = File::open(path).ok()?;
    let mut hdr = [0u8; 0x210];
    f.read_exact(&mut hdr).ok()?;
    if u32::from_le_bytes(hdr[0x202..0x206].try_into().ok()?) != HDRS_MAGIC {
        return None;
    }
    let offset = u16::from_le_bytes(hdr[0x20e..0x210].try_into().ok()?);
    f.seek(SeekFrom::Start(u64::from(offset) + 0x200)).ok()?;
    let mut buf = [0u8; 256];
    let n = f.read(&mut buf).ok()?;
    let end = buf[..n].iter().position(|&b| b == 0).unwrap_or(n);
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// True when the file has the bzImage "HdrS" magic at 0x202.
fn has_hdrs_magic(file: &mut File) -> bool {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0x202)).is_ok()
        && file.read_exact(&mut magic).is_ok()
        && u32::from_le_bytes(magic) == HDRS_MAGIC
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let file_err = |source| BootError::KernelFile {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(file_err)?;
    if !meta.is_file() {
        return Err(bad_kernel(path, "not a regular file"));
    }
    let mut file = File::open(path).map_err(file_err)?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(file_err)?;
    if n == 0 {
        return Err(bad_kernel(path, "the file is empty"));
    }
    let is_elf = n == 4 && magic == *b"\x7fELF";
    if !is_elf && !has_hdrs_magic(&mut file) {
        return Err(bad_kernel(
            path,
            "no bzImage header ('HdrS' at 0x202) and no ELF magic",
        ));
    }
    file.seek(SeekFrom::Start(0)).map_err(file_err)?;

    if is_elf {
        let (entry, end) = load_elf(mem, path, &mut file)?;
        let header = setup_header {
            boot_flag: BOOT_FLAG_MAGIC,
            header: HDRS_MAGIC,
            kernel_alignment: 0x0100_0000,
            ..Default::default()
        };
        return Ok(LoadedKernel {
            entry: GuestAddress(entry),
            end,
            header,
            image: Some((GuestAddress(entry), end.saturating_sub(entry))),
        });
    }

    if let Some(kernel) = load_unpacked(mem, path, &mut file, meta.len())? {
        return Ok(kernel);
    }
    file.seek(SeekFrom::Start(0)).map_err(file_err)?;
    let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| bad_kernel(path, format!("bzImage: {e}")))?;
    let header = result
        .setup_header
        .ok_or_else(|| bad_kernel(path, "bzImage without a setup header"))?;
    // A truncated image would load (the loader copies what the file has) and run into
    // garbage: the header says how long the protected-mode kernel is.
    check_bzimage(path, meta.len(), &header)?;
    Ok(LoadedKernel {
        entry: result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
        end: result.kernel_end,
        header,
        image: None,
    })
}

/// Where the setup header starts in a bzImage file.
const SETUP_HEADER_OFFSET: usize = 0x1f1;

/// The setup header in `head`, a kernel file's first bytes (at least up to the header's
/// end; `None` when shorter).
pub fn setup_header_in(head: &[u8]) -> Option<setup_header> {
    let mut header = setup_header::default();
    let raw = header.as_mut_slice();
    raw.copy_from_slice(head.get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + raw.len())?);
    Some(header)
}

/// Where a bzImage's compressed kernel lies in its file (offset, length), as boot
/// protocol 2.08+ says; `None` for an older protocol, no payload, or no bzImage.
pub fn payload_range(header: &setup_header) -> Option<(u64, u64)> {
    if header.header != HDRS_MAGIC || header.version < 0x208 || header.payload_length == 0 {
        return None;
    }
    Some((
        protected_mode_offset(header) + u64::from(header.payload_offset),
        u64::from(header.payload_length),
    ))
}

/// Where a bzImage's protected-mode code starts in the file.
fn protected_mode_offset(header: &setup_header) -> u64 {
    let setup_sects = if header.setup_sects == 0 {
        4
    } else {
        u64::from(header.setup_sects)
    };
    (setup_sects + 1) * 512
}

/// Refuses a truncated bzImage or one without a 64-bit entry point.
fn check_bzimage(path: &Path, file_len: u64, header: &setup_header) -> Result<(), BootError> {
    let payload = file_len.saturating_sub(protected_mode_offset(header));
    let declared = u64::from(header.syssize) * 16;
    if payload == 0 {
        return Err(bad_kernel(
            path,
            "bzImage: truncated: no kernel after the setup code",
        ));
    }
    if payload < declared {
        return Err(bad_kernel(
            path,
            format!(
                "bzImage: truncated: {payload} bytes of kernel after the setup code, the header says {declared}"
            ),
        ));
    }
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad_kernel(
            path,
            "this bzImage has no 64-bit entry point (XLF_KERNEL_64); build a 64-bit kernel",
        ));
    }
    Ok(())
}

/// Loads an ELF vmlinux from `image` (a file, or a kernel unpacked in memory).
fn load_elf<F>(mem: &GuestMemory, path: &Path, image: &mut F) -> Result<(u64, u64), BootError>
where
    F: Read + Seek + vm_memory::ReadVolatile,
{
    let result = Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| bad_kernel(path, format!("ELF: {e}")))?;
    let ram = mem.last_addr().raw_value();
    if result.kernel_end > ram {
        return Err(bad_kernel(
            path,
            format!(
                "ELF: its segments end at {:#x}, past the {} MiB of guest memory",
                result.kernel_end,
                (ram + 1) >> 20
            ),
        ));
    }
    Ok((result.kernel_load.raw_value(), result.kernel_end))
}

/// Unpacks a bzImage's kernel on the host and loads it as an ELF (see [`super::unpack`]).
/// `Ok(None)` when the payload is left to the guest's decompressor (an older boot
/// protocol, a compression microvm does not unpack, a kernel over the size limit).
fn load_unpacked(
    mem: &GuestMemory,
    path: &Path,
    file: &mut File,
    file_len: u64,
) -> Result<Option<LoadedKernel>, BootError> {
    let file_err = |source| BootError::KernelFile {
        path: path.to_path_buf(),
        source,
    };
    let mut header = setup_header::default();
    file.seek(SeekFrom::Start(SETUP_HEADER_OFFSET as u64))
        .map_err(file_err)?;
    file.read_exact(header.as_mut_slice()).map_err(file_err)?;
    let Some((start, len)) = payload_range(&header) else {
        return Ok(None);
    };
    check_bzimage(path, file_len, &header)?;
    if start.saturating_add(len) > file_len {
        return Err(bad_kernel(
            path,
            "bzImage: its payload runs past the end of the file",
        ));
    }
    let mut payload = vec![0u8; len as usize];
    file.seek(SeekFrom::Start(start)).map_err(file_err)?;
    file.read_exact(&mut payload).map_err(file_err)?;
    let vmlinux = match unpack::unpack(&payload) {
        Ok(v) => v,
        Err(UnpackError::Unsupported | UnpackError::TooLarge) => return Ok(None),
        Err(e) => return Err(bad_kernel(path, format!("bzImage: {e}"))),
    };
    drop(payload);
    let (entry, end) = load_elf(mem, path, &mut std::io::Cursor::new(vmlinux))?;
    Ok(Some(LoadedKernel {
        entry: GuestAddress(entry),
        end,
        header,
        image: Some((GuestAddress(entry), end.saturating_sub(entry))),
    }))
}

/// Where an initrd lives in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitrd {
    /// Start address.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// End of RAM below the MMIO gap.
fn low_mem_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .unwrap_or(0)
        .min(MMIO_GAP_START)
}

/// Loads the initrd as high in low memory as the kernel allows.
pub fn load_initrd(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<LoadedInitrd, BootError> {
    let file_err = |source| BootError::InitrdFile {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(file_err)?;
    if !meta.is_file() {
        return Err(file_err(std::io::Error::other("not a regular file")));
    }
    let size = meta.len();
    let h = kernel.header;
    let addr_max = if h.version >= 0x203 && h.initrd_addr_max != 0 {
        u64::from(h.initrd_addr_max)
    } else {
        DEFAULT_INITRD_ADDR_MAX
    };
    let top = low_mem_end(mem).min(addr_max + 1);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size_mib: size.div_ceil(1 << 20),
        mem_mib: mem.iter().map(|r| r.len()).sum::<u64>() >> 20,
    };
    let start = top.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    // Keep clear of the kernel image and the room it decompresses into.
    let kernel_reserved = kernel.end.max(HIMEM_START + u64::from(h.init_size));
    if start < kernel_reserved {
        return Err(too_large());
    }
    let mut file = File::open(path).map_err(file_err)?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|e| file_err(std::io::Error::other(e.to_string())))?;
    Ok(LoadedInitrd {
        addr: GuestAddress(start),
        size,
    })
}

/// Checks and writes the command line.
pub fn load_command_line(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &str,
) -> Result<(), BootError> {
    let max = kernel.cmdline_max();
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut c = Cmdline::new(max + 1).map_err(|e| BootError::CmdlineInvalid(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| BootError::CmdlineInvalid(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &c).map_err(|e| BootError::Memory {
        what: "command line",
        reason: e.to_string(),
    })
}

/// The e820 map: low RAM up to the EBDA, then every RAM region from 1 MiB.
pub fn e820_map(mem: &GuestMemory) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// Writes the zero page for the 64-bit boot protocol.
pub fn write_zero_page(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
    rsdp: GuestAddress,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: kernel.header,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp.raw_value();
    let map = e820_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(BootError::Memory {
            what: "e820 map",
            reason: format!("{} entries", map.len()),
        });
    }
    params.e820_table[..map.len()].copy_from_slice(&map);
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::Memory {
        what: "zero page",
        reason: e.to_string(),
    })
}

/// Copies a flat real-mode image to `addr` (tiny test guests).
pub fn load_raw(mem: &GuestMemory, path: &Path, addr: u64) -> Result<(), BootError> {
    let file_err = |source| BootError::KernelFile {
        path: path.to_path_buf(),
        source,
    };
    // A fifo or a device would block the read (or never end): only regular files.
    if !std::fs::metadata(path).map_err(file_err)?.is_file() {
        return Err(bad_kernel(path, "not a regular file"));
    }
    let bytes = std::fs::read(path).map_err(file_err)?;
    if bytes.is_empty() || addr + bytes.len() as u64 > EBDA_START {
        return Err(bad_kernel(
            path,
            "real-mode image is empty or larger than low memory",
        ));
    }
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|e| BootError::Memory {
            what: "real-mode image",
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemory {
        crate::arch::x86_64::test_memory(size)
    }

    fn tmpfile(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("microvm-boot-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn garbage_and_empty_kernels_are_refused() {
        let m = mem(64 << 20);
        let empty = tmpfile("empty", b"");
        let e = load_kernel(&m, &empty).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let garbage = tmpfile("garbage", &[0x5a; 8192]);
        let e = load_kernel(&m, &garbage).unwrap_err().to_string();
        assert!(e.contains("not a loadable"), "{e}");
        let elf = tmpfile("elf", b"\x7fELF\x02\x01\x01\0garbage");
        let e = load_kernel(&m, &elf).unwrap_err().to_string();
        assert!(e.contains("ELF"), "{e}");
        let e = load_kernel(&m, Path::new("/nonexistent/k"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read kernel"), "{e}");
        let e = load_kernel(&m, Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        for p in [empty, garbage, elf] {
            std::fs::remove_file(p).unwrap();
        }
    }

    fn fake_kernel() -> LoadedKernel {
        LoadedKernel {
            entry: GuestAddress(HIMEM_START + 0x200),
            end: 8 << 20,
            image: None,
            header: setup_header {
                version: 0x20f,
                cmdline_size: 2047,
                initrd_addr_max: 0x7fff_ffff,
                init_size: 16 << 20,
                ..Default::default()
            },
        }
    }

    #[test]
    fn initrd_goes_high_and_must_fit() {
        let m = mem(64 << 20);
        let k = fake_kernel();
        let small = tmpfile("initrd", &[1u8; 10000]);
        let i = load_initrd(&m, &k, &small).unwrap();
        assert_eq!(i.addr.raw_value(), ((64 << 20) - 10000) & !4095);
        let big = tmpfile("bigrd", &vec![0u8; 60 << 20]);
        let e = load_initrd(&m, &k, &big).unwrap_err().to_string();
        assert!(e.contains("raise --memory"), "{e}");
        std::fs::remove_file(small).unwrap();
        std::fs::remove_file(big).unwrap();
    }

    #[test]
    fn cmdline_limit() {
        let m = mem(64 << 20);
        let k = fake_kernel();
        load_command_line(&m, &k, "console=ttyS0").unwrap();
        let long = "a".repeat(2048);
        let e = load_command_line(&m, &k, &long).unwrap_err().to_string();
        assert!(e.contains("at most 2047"), "{e}");
    }

    #[test]
    fn e820_covers_ram_above_gap() {
        let m = mem(3 << 30 | 256 << 20);
        let map = e820_map(&m);
        assert_eq!(map.len(), 4);
        let (a2, s2, a3, s3) = (map[2].addr, map[2].size, map[3].addr, map[3].size);
        assert_eq!(a2, HIMEM_START);
        assert_eq!(a2 + s2, MMIO_GAP_START);
        assert_eq!((a3, s3), (1 << 32, 256 << 20));
    }
}
