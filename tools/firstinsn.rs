//! firstinsn: writes a minimal ELF64 "kernel" for scripts/bench.sh's first-instruction
//! case. Built by cargo (`cargo build --release -p microvm-tools`), std only.
//!
//! usage: firstinsn OUT.elf
//!
//! Any VMM that boots an ELF vmlinux with the Linux 64-bit boot protocol (microvm,
//! Firecracker) enters it in long mode at its entry point; its first instructions print
//! `MVFIRST\n` on COM1 (port 0x3f8, one `out` per byte, no LSR polling) and then reset
//! the machine through the i8042 (command 0xFE to port 0x64), which both VMMs treat as
//! the end of the run. So "VMM start -> the marker on the VMM's stdout" is the VMM's
//! start-up cost up to the guest's first instruction (plus 8 port writes), and the run's
//! total is start-up plus tear-down, with no guest kernel in between.
use std::io::Write;

/// Load (physical) address and entry: 1 MiB, where both VMMs accept ELF segments.
const BASE: u64 = 0x10_0000;
const EHDR: usize = 64;
const PHDR: usize = 56;

fn code() -> Vec<u8> {
    let msg = b"MVFIRST\n";
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    // lea rsi, [rip + disp32] (disp filled below), mov ecx, len
    c.extend([0x48, 0x8d, 0x35, 0, 0, 0, 0]);
    let lea_end = c.len();
    c.extend([0xb9, msg.len() as u8, 0, 0, 0]);
    c.extend([0xac, 0xee, 0xff, 0xc9, 0x75, 0xfa]); // lodsb; out dx,al; dec ecx; jnz lodsb
    c.extend([0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    c.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    let disp = (c.len() - lea_end) as u32;
    c[lea_end - 4..lea_end].copy_from_slice(&disp.to_le_bytes());
    c.extend(msg);
    c
}

fn elf() -> Vec<u8> {
    let code = code();
    let size = (EHDR + PHDR + code.len()) as u64;
    let entry = BASE + (EHDR + PHDR) as u64;
    let mut e = Vec::new();
    e.extend(b"\x7fELF");
    e.extend([2, 1, 1, 0]); // 64-bit, little endian, version 1, System V
    e.extend([0u8; 8]);
    e.extend(2u16.to_le_bytes()); // ET_EXEC
    e.extend(0x3eu16.to_le_bytes()); // x86-64
    e.extend(1u32.to_le_bytes());
    e.extend(entry.to_le_bytes());
    e.extend((EHDR as u64).to_le_bytes()); // phoff
    e.extend(0u64.to_le_bytes()); // shoff
    e.extend(0u32.to_le_bytes()); // flags
    e.extend((EHDR as u16).to_le_bytes());
    e.extend((PHDR as u16).to_le_bytes());
    e.extend(1u16.to_le_bytes()); // phnum
    e.extend(64u16.to_le_bytes()); // shentsize
    e.extend(0u16.to_le_bytes()); // shnum
    e.extend(0u16.to_le_bytes()); // shstrndx
    // PT_LOAD, R+X, the whole file at BASE
    e.extend(1u32.to_le_bytes());
    e.extend(5u32.to_le_bytes());
    e.extend(0u64.to_le_bytes()); // offset
    e.extend(BASE.to_le_bytes()); // vaddr
    e.extend(BASE.to_le_bytes()); // paddr
    e.extend(size.to_le_bytes()); // filesz
    e.extend(size.to_le_bytes()); // memsz
    e.extend(0x1000u64.to_le_bytes()); // align
    e.extend(code);
    e
}

fn main() {
    let Some(out) = std::env::args().nth(1) else {
        eprintln!("usage: firstinsn OUT.elf");
        std::process::exit(2);
    };
    let mut f = std::fs::File::create(&out).unwrap_or_else(|e| {
        eprintln!("firstinsn: cannot create {out}: {e}");
        std::process::exit(1);
    });
    if let Err(e) = f.write_all(&elf()) {
        eprintln!("firstinsn: cannot write {out}: {e}");
        std::process::exit(1);
    }
}
