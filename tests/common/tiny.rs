//! Tiny hand-assembled real-mode guests (`--real-mode-image`): 16-bit code loaded at
//! [`LOAD_ADDR`] that drives the real UART (COM1 at 0x3f8), the ACPI power-off register
//! (0x600), the i8042 reset, the exit-code port (0xf4) and the boot-timer port (0xf5).
//! They run on any KVM, PVM included (it runs real-mode code).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where microvm loads a real-mode image (and where it starts running it).
pub const LOAD_ADDR: u16 = 0x1000;

/// Spins forever (jmp $): a guest that never stops by itself.
pub const SPIN: [u8; 2] = [0xeb, 0xfe];

/// Marks "init reached" on the boot-timer port 0xf5.
pub const BOOT_TIMER: [u8; 2] = [0xe6, 0xf5]; // out 0xf5,al

/// Assembles "mov dx, imm16".
pub fn mov_dx(port: u16) -> Vec<u8> {
    let [lo, hi] = port.to_le_bytes();
    vec![0xba, lo, hi]
}

/// Power off through the ACPI sleep control register: SLP_TYP=5, SLP_EN.
pub fn poweroff() -> Vec<u8> {
    let mut c = mov_dx(0x600);
    c.extend([0xb0, 0x34, 0xee, 0xf4]); // mov al,0x34; out dx,al; hlt
    c
}

/// Runs `before`, prints a message to COM1, then runs `after`.
pub fn print_between(before: &[u8], msg: &str, after: &[u8]) -> Vec<u8> {
    let mut c = before.to_vec();
    c.extend(mov_dx(0x3f8));
    let msg_addr = LOAD_ADDR + (c.len() + 11 + after.len()) as u16;
    let [lo, hi] = msg_addr.to_le_bytes();
    c.extend([0xbe, lo, hi]); // mov si, msg
    c.extend([0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]); // lodsb; test al,al; jz +3; out dx,al; jmp -8
    c.extend(after);
    assert_eq!(c.len(), usize::from(msg_addr - LOAD_ADDR));
    c.extend(msg.as_bytes());
    c.push(0);
    c
}

/// Prints a message to COM1, then runs `then`.
pub fn print_then(msg: &str, then: &[u8]) -> Vec<u8> {
    print_between(&[], msg, then)
}

/// `code` followed by: print `msg` on COM1, power off.
pub fn then_print(code: Vec<u8>, msg: &str) -> Vec<u8> {
    print_between(&code, msg, &poweroff())
}

/// Prints a NUL-terminated message to COM1, then powers off.
pub fn hello_guest(msg: &str) -> Vec<u8> {
    print_then(msg, &poweroff())
}

/// Writes `code` to the exit-code port 0xf4.
pub fn exit_code(code: u8) -> Vec<u8> {
    vec![0xb0, code, 0xe6, 0xf4, 0xf4] // mov al,code; out 0xf4,al; hlt
}

/// Echoes every byte received on COM1 (polling LSR.DR) until it sees 'q', then powers off.
pub fn echo_guest() -> Vec<u8> {
    let mut c = Vec::new();
    c.extend(mov_dx(0x3fd)); // 0: mov dx, LSR
    c.extend([0xec, 0xa8, 0x01, 0x74, 0xfb]); // 3: in al,dx; test al,1; jz 3
    c.extend(mov_dx(0x3f8)); // 8: mov dx, RBR/THR
    c.extend([0xec, 0xee]); // 11: in al,dx; out dx,al
    c.extend([0x3c, b'q', 0x75, 0xef]); // 13: cmp al,'q'; jne 0
    c.extend(poweroff()); // 17
    c
}

/// Resets the machine the way `reboot=k` does: command 0xFE to the i8042 at port 0x64.
pub fn i8042_reset_guest() -> Vec<u8> {
    vec![0xb0, 0xfe, 0xe6, 0x64, 0xf4] // mov al,0xfe; out 0x64,al; hlt
}

/// Writes to ports no device decodes, reads them back, and prints what it read.
pub fn unclaimed_port_guest() -> Vec<u8> {
    let mut c = vec![0xb0, 0x55, 0xe6, 0x70, 0xe4, 0x71]; // mov al,0x55; out 0x70,al; in al,0x71
    c.extend(mov_dx(0x3f8));
    c.push(0xee); // out dx,al
    c.extend(poweroff());
    c
}

/// Spins forever, never touching a device (so never reading its input).
pub fn spin_guest() -> Vec<u8> {
    SPIN.to_vec()
}

/// Writes bytes 0, 1, 2, ... (wrapping) to COM1 forever, waiting for LSR.THRE before
/// each one like a real driver (so a congested console paces it).
pub fn counter_flood_guest() -> Vec<u8> {
    let mut c = vec![0x30, 0xdb]; // 0: xor bl, bl
    c.extend(mov_dx(0x3fd)); // 2: mov dx, LSR
    c.extend([0xec, 0xa8, 0x20, 0x74, 0xfb]); // 5: in al,dx; test al,0x20; jz 5
    c.extend(mov_dx(0x3f8)); // 10
    c.extend([0x88, 0xd8, 0xee, 0xfe, 0xc3]); // 13: mov al,bl; out dx,al; inc bl
    c.extend([0xeb, 0xee]); // 18: jmp 2
    c
}

/// 4096 pseudo-random reads and writes over COM1's eight registers, then LCR, MCR and
/// IER set back to a sane state, then a message.
pub fn random_uart_guest(msg: &str) -> Vec<u8> {
    let mut c = vec![0xb9, 0x00, 0x10, 0xbb, 0x34, 0x12]; // mov cx,4096; mov bx,0x1234
    let top = c.len();
    c.extend([0x89, 0xd8, 0xd1, 0xe0, 0xd1, 0xe0, 0x01, 0xd8]); // ax = bx * 5
    c.extend([0x05, 0x3b, 0x00, 0x89, 0xc3]); // add ax,0x3b; mov bx,ax
    c.extend([0x89, 0xda, 0x83, 0xe2, 0x07, 0x81, 0xc2, 0xf8, 0x03]); // dx = 0x3f8 + (bx & 7)
    c.extend([0x88, 0xf8, 0xf6, 0xc3, 0x08, 0x74, 0x03]); // al = bh; test bl,8; jz in
    c.extend([0xee, 0xeb, 0x01, 0xec]); // out dx,al; jmp next; in: in al,dx
    let rel = top as isize - (c.len() as isize + 2);
    c.extend([0xe2, rel as i8 as u8]); // next: loop top
    for (port, val) in [(0x3fbu16, 0x03u8), (0x3fc, 0x08), (0x3f9, 0x00)] {
        c.extend(mov_dx(port));
        c.extend([0xb0, val, 0xee]);
    }
    then_print(c, msg)
}

/// Fails the test unless there is a `/dev/kvm` to run the guests on.
pub fn need_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (any KVM, PVM included)"
    );
}

/// Writes `code` to a file of its own (`$TMPDIR/microvm-test-PID-N-NAME.bin`) and
/// returns its path; the caller removes it.
pub fn image(name: &str, code: &[u8]) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!(
        "microvm-test-{}-{n}-{name}.bin",
        std::process::id()
    ));
    std::fs::write(&p, code).unwrap();
    p
}

/// A guest that powers off at once (ACPI S5), written as `dir/poweroff.bin`: enough to
/// reach console set-up.
pub fn poweroff_image(dir: &Path) -> PathBuf {
    let p = dir.join("poweroff.bin");
    std::fs::write(&p, poweroff()).unwrap();
    p
}
