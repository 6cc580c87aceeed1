//! The input-path fuzz harness, shared by `fuzz/` (cargo-fuzz target `hub_input`) and the
//! corpus replay test: a real [`Hub`] (no event loop: events are delivered by hand) with
//! four in-memory input sources and one frontend with a small FIFO, and the Ctrl-A escape
//! parser on its own.
//!
//! Sources: 0 is the VMM's terminal (escape keys of [`EscapeKeys::Stdio`]), 1 and 2 are
//! plain sources (socket clients, a non-tty stdin), 3 is a read-only viewer (its input is
//! read and dropped). Input format: three header bytes (hub input buffer
//! `16 + 4 * b0` bytes, largest read `1 + b1` bytes, frontend FIFO `1 + b2 % 64` bytes),
//! then operations, one opcode byte (`op % 5`) and its operands:
//!
//! | op | operands | action |
//! |----|----------|--------|
//! | 0 | src:u8 len:u8 bytes | source `src % 4` receives `len` bytes (a client writes them) |
//! | 1 | src:u8 | source `src % 4` is readable (an epoll event) |
//! | 2 | n:u8 | the guest takes `n % 65` bytes from the FIFO; "drained" fires if it is empty |
//! | 3 | src:u8 | source `1 + src % 2` reaches end of input (after what it still holds) |
//! | 4 | - | a spurious wake-up and a spurious "drained" |
//!
//! At the end every source is read and the FIFO drained until all input is through.
//!
//! Properties (a panic is a failure): what the frontend receives is exactly the
//! concatenation, in read order, of every read from the sources, each read whole (never
//! interleaved with another), except that the terminal's reads pass through its escape
//! parser (Ctrl-A sequences removed, Ctrl-A Ctrl-A sent as one Ctrl-A) and the viewer's
//! are dropped; nothing is lost or duplicated; every byte a source received is read; the
//! hub never holds more input than its buffer; each Ctrl-A x asks the VM to stop once.
//! Escape parser: feeding a stream in any split gives the same bytes and actions as
//! feeding it whole, and both match a reference reading of the key table in
//! [`crate::host::term`], for all three key sets.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Hub, HubConfig, NoReg, Token};
use crate::fuzz_input::Input;
use crate::mux::backend::Port;
use crate::mux::endpoint::{Endpoint, InputMode, Owner, Plan};
use crate::mux::escape::{DETACH_KEY, ESCAPE_PREFIX, EscapeAction, EscapeKeys, EscapeParser};
use crate::mux::frontend::Frontend;

const SOURCES: usize = 4;
const TERMINAL: usize = 0;
const VIEWER: usize = 3;

#[derive(Default)]
struct SourceState {
    to_read: VecDeque<u8>,
    eof: bool,
    /// (global read sequence number, bytes) of every successful read.
    reads: Vec<(u64, Vec<u8>)>,
    pushed: usize,
}

struct FuzzPort {
    st: Arc<Mutex<SourceState>>,
    seq: Arc<AtomicU64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Port for FuzzPort {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = lock(&self.st);
        if s.to_read.is_empty() {
            return if s.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(s.to_read.len());
        for (d, b) in buf.iter_mut().zip(s.to_read.drain(..n)) {
            *d = b;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        s.reads.push((seq, buf[..n].to_vec()));
        Ok(n)
    }

    fn fd(&self) -> Option<RawFd> {
        None
    }
}

#[derive(Default)]
struct FrontendState {
    fifo: VecDeque<u8>,
    cap: usize,
    received: Vec<u8>,
}

struct FuzzFrontend {
    st: Arc<Mutex<FrontendState>>,
    evt: EventFd,
}

impl Frontend for FuzzFrontend {
    fn take_input(&mut self, data: &[u8]) -> usize {
        let mut s = lock(&self.st);
        let n = data.len().min(s.cap - s.fifo.len());
        s.fifo.extend(&data[..n]);
        n
    }
    fn drained_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

/// What a run did, for tests that check the seeds reach what they are named after.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes the frontend (the guest) received.
    pub delivered: Vec<u8>,
    /// Reads taken from the sources.
    pub reads: usize,
    /// Times the VM was asked to stop (Ctrl-A x on the terminal).
    pub quits: u64,
}

/// Runs one input through the escape parser and the hub; panics when a property fails.
pub fn run(data: &[u8]) -> Outcome {
    check_escape_parser(data);
    run_hub(data)
}

fn run_hub(data: &[u8]) -> Outcome {
    let mut input = Input(data);
    let (Some(b0), Some(b1), Some(b2)) = (input.u8(), input.u8(), input.u8()) else {
        return Outcome::default();
    };
    let cfg = HubConfig {
        input_capacity: 16 + 4 * usize::from(b0),
        read_chunk: 1 + usize::from(b1),
        ..HubConfig::default()
    };
    let capacity = cfg.input_capacity;
    let (Ok(exit), Ok(evt)) = (EventFd::new(EFD_NONBLOCK), EventFd::new(EFD_NONBLOCK)) else {
        return Outcome::default();
    };
    let Ok(exit_seen) = exit.try_clone() else {
        return Outcome::default();
    };
    let Ok(mut hub) = Hub::bare(exit, cfg, 0) else {
        return Outcome::default();
    };
    let fe = Arc::new(Mutex::new(FrontendState {
        cap: 1 + usize::from(b2 % 64),
        ..FrontendState::default()
    }));
    if hub
        .add_frontend(
            "ttyS0",
            Box::new(FuzzFrontend {
                st: fe.clone(),
                evt,
            }),
        )
        .is_err()
    {
        return Outcome::default();
    }
    let seq = Arc::new(AtomicU64::new(0));
    let mut sources = Vec::new();
    for i in 0..SOURCES {
        let st = Arc::new(Mutex::new(SourceState::default()));
        let port = FuzzPort {
            st: st.clone(),
            seq: seq.clone(),
        };
        let mode = match i {
            TERMINAL => InputMode::Terminal(EscapeParser::new(EscapeKeys::Stdio)),
            VIEWER => InputMode::Viewer,
            _ => InputMode::Guest,
        };
        let plan = Plan {
            sink: None,
            input: Some(mode),
        };
        let ep = Endpoint::new(
            format!("source {i}"),
            Box::new(port),
            Owner::Backend,
            plan,
            0,
        );
        let token = hub.insert(ep);
        sources.push((token, st));
    }
    hub.init_with(&mut NoReg);

    let drained = |hub: &mut Hub| hub.handle(Token::Frontend(0).encode(), EventSet::IN, &mut NoReg);
    while let Some(op) = input.u8() {
        match op % 5 {
            0 => {
                let (Some(src), Some(len)) = (input.u8(), input.u8()) else {
                    break;
                };
                let Some(bytes) = input.bytes(usize::from(len)) else {
                    break;
                };
                let mut s = lock(&sources[usize::from(src) % SOURCES].1);
                if !s.eof {
                    s.to_read.extend(bytes);
                    s.pushed += bytes.len();
                }
            }
            1 => {
                let Some(src) = input.u8() else { break };
                hub.handle(
                    Token::Endpoint(sources[usize::from(src) % SOURCES].0).encode(),
                    EventSet::IN,
                    &mut NoReg,
                );
            }
            2 => {
                let Some(n) = input.u8() else { break };
                let empty = {
                    let mut f = lock(&fe);
                    let n = usize::from(n % 65).min(f.fifo.len());
                    let taken: Vec<u8> = f.fifo.drain(..n).collect();
                    f.received.extend(taken);
                    f.fifo.is_empty()
                };
                if empty {
                    drained(&mut hub);
                }
            }
            3 => {
                let Some(src) = input.u8() else { break };
                lock(&sources[1 + usize::from(src) % 2].1).eof = true;
            }
            _ => {
                hub.handle(Token::Wake.encode(), EventSet::IN, &mut NoReg);
                drained(&mut hub);
            }
        }
        assert!(
            hub.input.len() <= capacity,
            "hub holds more than its buffer"
        );
    }

    // Finish: the guest keeps reading and every source is polled until all is through.
    let total: usize = sources.iter().map(|(_, s)| lock(s).pushed).sum();
    let mut rounds = 0;
    loop {
        let left = sources.iter().any(|(_, s)| !lock(s).to_read.is_empty());
        if !left && hub.input.is_empty() {
            break;
        }
        rounds += 1;
        assert!(
            rounds <= total + 16,
            "input stuck: {} bytes held, sources not empty: {left}",
            hub.input.len()
        );
        {
            let mut f = lock(&fe);
            let all: Vec<u8> = f.fifo.drain(..).collect();
            f.received.extend(all);
        }
        drained(&mut hub);
        for (t, _) in &sources {
            hub.handle(Token::Endpoint(*t).encode(), EventSet::IN, &mut NoReg);
        }
        assert!(
            hub.input.len() <= capacity,
            "hub holds more than its buffer"
        );
    }
    {
        let mut f = lock(&fe);
        let all: Vec<u8> = f.fifo.drain(..).collect();
        f.received.extend(all);
    }

    // What the guest must have received: every read, whole, in read order, through the
    // terminal's escape parser or dropped for the viewer.
    let mut parser = EscapeParser::new(EscapeKeys::Stdio);
    let mut quits = 0u64;
    let mut log: Vec<(u64, Vec<u8>)> = Vec::new();
    for (i, (_, s)) in sources.iter().enumerate() {
        let s = lock(s);
        let read: usize = s.reads.iter().map(|(_, d)| d.len()).sum();
        assert_eq!(
            read, s.pushed,
            "source {i}: not everything it received was read"
        );
        for (seq, d) in &s.reads {
            let out = match i {
                TERMINAL => {
                    let (mut out, mut acts) = (Vec::new(), Vec::new());
                    parser.feed(d, &mut out, &mut acts);
                    quits += acts.iter().filter(|a| **a == EscapeAction::Quit).count() as u64;
                    out
                }
                VIEWER => Vec::new(),
                _ => d.clone(),
            };
            log.push((*seq, out));
        }
    }
    let reads = log.len();
    log.sort_by_key(|(seq, _)| *seq);
    let want: Vec<u8> = log.into_iter().flat_map(|(_, d)| d).collect();
    let got = lock(&fe).received.clone();
    assert!(
        got == want,
        "the guest got {} bytes, the reads make {}: first difference at {:?}",
        got.len(),
        want.len(),
        got.iter().zip(&want).position(|(a, b)| a != b)
    );
    let asked = exit_seen.read().unwrap_or(0);
    assert_eq!(asked, quits, "Ctrl-A x and exit requests differ");
    Outcome {
        delivered: got,
        reads,
        quits,
    }
}

/// The key table of [`crate::host::term`], read straight: what `keys` makes of a whole stream.
fn reference(keys: EscapeKeys, data: &[u8]) -> (Vec<u8>, Vec<EscapeAction>) {
    let (mut out, mut acts) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        if b != ESCAPE_PREFIX {
            if keys == EscapeKeys::Attach && b == DETACH_KEY {
                acts.push(EscapeAction::Detach);
            } else {
                out.push(b);
            }
            i += 1;
            continue;
        }
        // A Ctrl-A at the very end waits for its key.
        let Some(&k) = data.get(i + 1) else { break };
        i += 2;
        let lower = k.to_ascii_lowercase();
        match keys {
            _ if k == ESCAPE_PREFIX => out.push(ESCAPE_PREFIX),
            EscapeKeys::Stdio => match lower {
                b'x' => acts.push(EscapeAction::Quit),
                b'h' | b'?' => acts.push(EscapeAction::Help),
                b'c' => acts.push(EscapeAction::SwitchInput),
                _ => {}
            },
            EscapeKeys::Attach if lower == b'd' => acts.push(EscapeAction::Detach),
            EscapeKeys::Attach => out.extend([ESCAPE_PREFIX, k]),
            EscapeKeys::TakeOver if lower == b'w' => acts.push(EscapeAction::TakeOver),
            EscapeKeys::TakeOver => {}
        }
    }
    (out, acts)
}

/// Escape parser: split-invariance and agreement with [`reference`].
fn check_escape_parser(data: &[u8]) {
    for keys in [EscapeKeys::Stdio, EscapeKeys::Attach, EscapeKeys::TakeOver] {
        let want = reference(keys, data);
        let mut whole = (Vec::new(), Vec::new());
        EscapeParser::new(keys).feed(data, &mut whole.0, &mut whole.1);
        assert_eq!(whole, want, "{keys:?}: parser and key table differ");
        // Split before every byte whose low bits say so (and at every Ctrl-A boundary
        // that it creates): the state must carry across reads.
        let mut p = EscapeParser::new(keys);
        let mut split = (Vec::new(), Vec::new());
        let mut start = 0;
        for (i, b) in data.iter().enumerate() {
            if b % 3 == 0 || i == data.len() - 1 {
                p.feed(&data[start..=i], &mut split.0, &mut split.1);
                start = i + 1;
            }
        }
        assert_eq!(split, want, "{keys:?}: split feeding differs");
    }
}
