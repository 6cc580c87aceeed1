//! The UART fuzz harness, shared by `fuzz/` (cargo-fuzz target `uart`) and the corpus
//! replay test: a [`Uart`] with an in-memory sink, driven by a (hostile) guest's register
//! reads and writes and by the host's input, checked against a small model of the 16550
//! as vm-superio emulates it.
//!
//! Input format: a stream of operations, each one opcode byte (`op % 6`) and its operands
//! (a truncated operand ends the run):
//!
//! | op | operands | action |
//! |----|----------|--------|
//! | 0 | off:u8 val:u8 | guest writes `val` at offset `off % 10` (8 and 9 are outside the UART) |
//! | 1 | off:u8 | guest reads offset `off % 10` |
//! | 2 | len:u8 | host offers `len` input bytes (a running counter, so order is checkable) |
//! | 3 | - | the hub decongests: [`Uart::raise_thre`] |
//! | 4 | - | toggle the sink's congestion |
//! | 5 | off:u8 | a 2-byte read and a 2-byte write at `off % 10` (ignored by the UART) |
//!
//! Properties (a panic is a failure): nothing panics; every byte written to THR with DLAB
//! clear and loopback off reaches the sink, in order, and nothing else does; bytes read
//! from RBR (DLAB clear) are the offered-and-accepted input and loopback bytes, in order,
//! then 0 when empty; LSR shows data-ready exactly when the FIFO holds bytes and the
//! transmitter busy exactly while the sink is congested; the FIFO never holds more than
//! 64 bytes and `take_input` accepts what fits (nothing in loopback); the "drained"
//! eventfd fires once per RBR read that leaves the FIFO empty; odd-sized or out-of-range
//! accesses change nothing (reads give 0xff).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{LCR_DLAB, LSR_OFFSET, LSR_TEMT, LSR_THRE, Uart};
use crate::devices::FrontendOutput;
use crate::fuzz_input::Input;
use crate::vstate::bus::BusDevice;

const FIFO: usize = 64;
const MCR_LOOP: u8 = 0x10;
const LSR_DR: u8 = 0x01;

/// Records what the UART writes; congestion is set by the harness.
#[derive(Default)]
pub struct RecordingSink {
    /// Every byte written.
    pub out: Vec<u8>,
    /// What `congested()` reports.
    pub congested: bool,
}

impl Write for RecordingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl FrontendOutput for RecordingSink {
    fn congested(&self) -> bool {
        self.congested
    }
}

/// What a run did, for tests that check the seeds reach what they are named after.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes that reached the sink.
    pub output: Vec<u8>,
    /// Input bytes the UART accepted.
    pub accepted: usize,
    /// Bytes read from RBR (data, not empty reads).
    pub received: usize,
    /// Bytes written to THR in loopback mode that came back on RBR's side.
    pub looped: usize,
}

struct Model {
    dlab: bool,
    looping: bool,
    fifo: VecDeque<u8>,
    out: Vec<u8>,
    drains: u64,
    next_input: u8,
}

/// Runs one input; panics when the UART departs from the model.
pub fn run(data: &[u8]) -> Outcome {
    let (Ok(irq), Ok(drained)) = (
        EventFd::new(libc::EFD_NONBLOCK),
        EventFd::new(libc::EFD_NONBLOCK),
    ) else {
        return Outcome::default();
    };
    let drained = Arc::new(drained);
    let mut u = Uart::new(irq, drained.clone(), RecordingSink::default());
    let mut m = Model {
        dlab: false,
        looping: false,
        fifo: VecDeque::new(),
        out: Vec::new(),
        drains: 0,
        next_input: 0,
    };
    let mut o = Outcome::default();
    let mut input = Input(data);
    while let Some(op) = input.u8() {
        match op % 6 {
            0 => {
                let (Some(off), Some(val)) = (input.u8(), input.u8()) else {
                    break;
                };
                let off = u64::from(off % 10);
                u.write(off, &[val]);
                match off {
                    // Loopback: back into the FIFO if it has room, else lost.
                    0 if !m.dlab && m.looping && m.fifo.len() < FIFO => {
                        m.fifo.push_back(val);
                        o.looped += 1;
                    }
                    0 if !m.dlab && m.looping => {}
                    0 if !m.dlab => m.out.push(val),
                    3 => m.dlab = val & LCR_DLAB != 0,
                    4 => m.looping = val & MCR_LOOP != 0,
                    _ => {}
                }
            }
            1 => {
                let Some(off) = input.u8() else { break };
                let off = u64::from(off % 10);
                let mut b = [0u8];
                u.read(off, &mut b);
                match off {
                    0 if !m.dlab => {
                        let want = m.fifo.pop_front();
                        if want.is_some() {
                            o.received += 1;
                        }
                        assert_eq!(b[0], want.unwrap_or(0), "RBR returned another byte");
                        if m.fifo.is_empty() {
                            m.drains += 1;
                        }
                    }
                    o if o == u64::from(LSR_OFFSET) => {
                        let congested = u.serial.writer().congested;
                        let mut want = if congested { 0 } else { LSR_THRE | LSR_TEMT };
                        if !m.fifo.is_empty() {
                            want |= LSR_DR;
                        }
                        assert_eq!(b[0], want, "LSR");
                    }
                    8 | 9 => assert_eq!(b[0], 0xff, "read outside the UART"),
                    _ => {}
                }
            }
            2 => {
                let Some(len) = input.u8() else { break };
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        m.next_input = m.next_input.wrapping_add(1);
                        m.next_input
                    })
                    .collect();
                let n = u.take_input(&bytes);
                let want = if m.looping {
                    0
                } else {
                    bytes.len().min(FIFO - m.fifo.len())
                };
                assert_eq!(n, want, "take_input took another count");
                m.fifo.extend(&bytes[..n]);
                o.accepted += n;
                // What was not taken is offered again later by the hub: model the
                // counter so that the next offer starts with the first byte not taken.
                m.next_input = m.next_input.wrapping_sub((bytes.len() - n) as u8);
            }
            3 => u.raise_thre(),
            4 => {
                let s = u.serial.writer_mut();
                s.congested = !s.congested;
            }
            _ => {
                let Some(off) = input.u8() else { break };
                let off = u64::from(off % 10);
                let mut b = [0u8; 2];
                u.read(off, &mut b);
                assert_eq!(b, [0xff, 0xff], "2-byte read");
                u.write(off, &[0x80, 0x10]);
            }
        }
        assert_eq!(u.input_capacity(), FIFO - m.fifo.len(), "FIFO room");
    }
    assert_eq!(u.serial.writer().out, m.out, "sink != THR writes");
    let fired = drained.read().unwrap_or(0);
    assert_eq!(fired, m.drains, "drained signals");
    o.output = m.out;
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thr_reaches_sink_loopback_does_not() {
        // "hi", loopback on, "x" (looped back), read it, loopback off, "!"
        let d = [
            0, 0, b'h', 0, 0, b'i', 0, 4, 0x10, 0, 0, b'x', 1, 5, 1, 0, 0, 4, 0, 0, 0, b'!',
        ];
        let o = run(&d);
        assert_eq!(o.output, b"hi!");
        assert_eq!((o.looped, o.received), (1, 1));
    }
}
