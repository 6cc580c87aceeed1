//! Property and unit tests of the hub logic with in-memory backends and a mock frontend
//! (no event loop, no KVM).

use super::backend::mem::{MemPort, MemState};
use super::endpoint::InputMode;
use super::escape::{EscapeKeys, EscapeParser};
use super::fanout::Policy;
use super::frontend::Frontend;
use super::hub::{Hub, HubConfig};
use proptest::prelude::*;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// A frontend with a FIFO of `fifo` bytes that the "guest" drains when told.
struct MockFrontend {
    st: Arc<Mutex<MockState>>,
    evt: EventFd,
}

/// A frontend that counts the hub's "resume output" calls.
struct Resumes(EventFd, Arc<Mutex<u32>>);

impl Frontend for Resumes {
    fn take_input(&mut self, _: &[u8]) -> usize {
        0
    }
    fn drained_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
    fn resume_output(&mut self) {
        *self.1.lock().unwrap() += 1;
    }
}

#[derive(Default)]
struct MockState {
    fifo: Vec<u8>,
    cap: usize,
    received: Vec<u8>,
}

impl MockState {
    fn drain(&mut self) {
        let f = std::mem::take(&mut self.fifo);
        self.received.extend_from_slice(&f);
    }
}

impl Frontend for MockFrontend {
    fn take_input(&mut self, data: &[u8]) -> usize {
        let mut s = self.st.lock().unwrap();
        let n = data.len().min(s.cap - s.fifo.len());
        s.fifo.extend_from_slice(&data[..n]);
        n
    }
    fn drained_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

fn mock(cap: usize) -> (Box<MockFrontend>, Arc<Mutex<MockState>>) {
    let st = Arc::new(Mutex::new(MockState {
        cap,
        ..Default::default()
    }));
    (
        Box::new(MockFrontend {
            st: st.clone(),
            evt: EventFd::new(EFD_NONBLOCK).unwrap(),
        }),
        st,
    )
}

fn mem(limit: Option<usize>, max_write: usize) -> (Box<MemPort>, Arc<Mutex<MemState>>) {
    let (p, s) = MemPort::new();
    {
        let mut g = s.lock().unwrap();
        g.budget = limit;
        g.max_write = max_write;
    }
    (Box::new(p), s)
}

fn cfg() -> HubConfig {
    HubConfig {
        high_water: 1 << 10,
        ..HubConfig::default()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(usize, Vec<u8>),
    Pump,
    /// Backend k gets `n` more bytes of room and a writable event.
    Room(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..2, proptest::collection::vec(any::<u8>(), 1..200)).prop_map(|(w, d)| Op::Write(w, d)),
        2 => Just(Op::Pump),
        2 => (0usize..3, 0usize..400).prop_map(|(k, n)| Op::Room(k, n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random chunk interleavings from 2 frontends, 3 lossless backends that accept
    /// random amounts: every backend ends with exactly the stream, in write order (so no
    /// chunk is split by another and nothing is lost); the ring holds its last bytes.
    #[test]
    fn same_order_everywhere_and_no_loss(ops in proptest::collection::vec(op(), 1..80), ring in 1usize..300) {
        let mut hub = Hub::for_test(cfg(), ring);
        let (f1, _) = mock(64);
        let (f2, _) = mock(64);
        let mut w = [hub.add_frontend("ttyS0", f1).unwrap(), hub.add_frontend("hvc0", f2).unwrap()];
        let mut states = Vec::new();
        let mut toks = Vec::new();
        for (i, max_write) in [0usize, 7, 33].into_iter().enumerate() {
            let budget = if i == 0 { None } else { Some(0) };
            let (p, s) = mem(budget, max_write);
            toks.push(hub.add_mem(&format!("m{i}"), p, Some((Policy::Lossless, 1 << 20)), None));
            states.push(s);
        }
        let mut stream = Vec::new();
        for o in ops {
            match o {
                Op::Write(k, d) => {
                    w[k].write_all(&d).unwrap();
                    stream.extend_from_slice(&d);
                }
                Op::Pump => hub.pump(),
                Op::Room(k, n) => {
                    if let Some(b) = states[k].lock().unwrap().budget.as_mut() {
                        *b += n;
                    }
                    hub.writable(toks[k]);
                }
            }
        }
        hub.pump();
        for (k, s) in states.iter().enumerate() {
            s.lock().unwrap().budget = None;
            hub.writable(toks[k]);
        }
        for s in &states {
            prop_assert_eq!(&s.lock().unwrap().written, &stream);
        }
        let tail = &stream[stream.len().saturating_sub(ring)..];
        prop_assert_eq!(hub.history(), tail.to_vec());
    }

    /// A stalled client (CutOff policy) is cut off once it is more than its limit behind;
    /// the other clients get everything.
    #[test]
    fn stalled_client_cut_off_others_complete(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..500), 1..60),
        stall_budget in 0usize..200,
        limit in 100usize..2000,
    ) {
        let mut hub = Hub::for_test(cfg(), 0);
        let (fe, _) = mock(64);
        let mut w = hub.add_frontend("ttyS0", fe).unwrap();
        let (p, stalled) = mem(Some(stall_budget), 0);
        let ts = hub.add_mem("stalled", p, Some((Policy::CutOff, limit)), None);
        let mut good = Vec::new();
        for i in 0..2 {
            let (p, s) = mem(None, 0);
            hub.add_mem(&format!("good{i}"), p, Some((Policy::CutOff, limit)), None);
            good.push(s);
        }
        let mut stream = Vec::new();
        for c in &chunks {
            w.write_all(c).unwrap();
            stream.extend_from_slice(c);
            hub.pump();
        }
        let total = stream.len();
        if total > stall_budget + limit {
            prop_assert!(!hub.alive(ts), "stalled client still there");
        } else {
            prop_assert!(hub.alive(ts));
            prop_assert_eq!(hub.pending_of(ts), total - stall_budget.min(total));
        }
        let got = stalled.lock().unwrap().written.clone();
        prop_assert!(stream.starts_with(&got), "the stalled client saw a prefix");
        for g in &good {
            prop_assert_eq!(&g.lock().unwrap().written, &stream);
        }
    }

    /// A drop-and-count sink (a FIFO log) behind a reader that takes random amounts:
    /// what it delivers is the stream with gaps, each gap exactly where a notice says
    /// how many bytes are missing, and the counts add up: nothing is reordered, and no
    /// loss is silent.
    #[test]
    fn drop_and_count_gaps_are_announced_where_they_are(
        ops in proptest::collection::vec(op(), 1..120),
        limit in 600usize..3000,
    ) {
        let mut hub = Hub::for_test(cfg(), 0);
        let (fe, _) = mock(64);
        let mut w = hub.add_frontend("ttyS0", fe).unwrap();
        let (p, s) = mem(Some(0), 0);
        let t = hub.add_mem("fifo", p, Some((Policy::DropAndCount, limit)), None);
        let mut stream = Vec::new();
        for o in ops {
            match o {
                Op::Write(_, d) => {
                    w.write_all(&d).unwrap();
                    stream.extend_from_slice(&d);
                }
                Op::Pump => hub.pump(),
                Op::Room(_, n) => {
                    if let Some(b) = s.lock().unwrap().budget.as_mut() {
                        *b += n;
                    }
                    hub.writable(t);
                }
            }
        }
        hub.pump();
        s.lock().unwrap().budget = None;
        hub.writable(t);
        let out = s.lock().unwrap().written.clone();
        // Walk the output: stream bytes, then "\r\n[microvm: N bytes ... dropped here",
        // which skips N stream bytes.
        let (mut at, mut pos) = (0usize, 0usize);
        let mark = b"\r\n[microvm: ";
        while at < out.len() {
            if out[at..].starts_with(mark) {
                let len = out[at + 2..].windows(2).position(|w| w == b"\r\n").unwrap() + 4;
                let text = String::from_utf8_lossy(&out[at + mark.len()..at + len]).into_owned();
                let (n, tail) = text.split_once(' ').unwrap();
                let n: usize = n.parse().unwrap();
                prop_assert!(tail.starts_with("bytes of console output dropped here"), "{}", text);
                pos += n;
                at += len;
            } else {
                prop_assert_eq!(out[at], stream[pos], "at output byte {}", at);
                at += 1;
                pos += 1;
            }
        }
        prop_assert_eq!(pos, stream.len(), "delivered and announced add up to the stream");
    }

    /// Input from two sources, read in random order in random sizes, into a frontend that
    /// takes 64 bytes at a time: the frontend gets exactly the reads, each whole, in the
    /// order they were read; nothing is dropped although the hub's buffer is small.
    #[test]
    fn input_reads_whole_in_order(
        a in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..20),
        b in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..20),
        steps in proptest::collection::vec(0u8..3, 0..400),
    ) {
        let mut hub = Hub::for_test(HubConfig { input_capacity: 512, read_chunk: 128, ..cfg() }, 0);
        let (fe, fst) = mock(64);
        let _w = hub.add_frontend("ttyS0", fe).unwrap();
        let mut srcs = Vec::new();
        for chunks in [&a, &b] {
            let (p, s) = MemPort::new();
            s.lock().unwrap().to_read = chunks.iter().cloned().collect();
            let t = hub.add_mem("src", Box::new(p), None, Some(InputMode::Guest));
            srcs.push((t, s));
        }
        let run = |hub: &mut Hub, step: u8| match step {
            0 | 1 => hub.readable(srcs[step as usize].0),
            _ => {
                fst.lock().unwrap().drain();
                hub.drained(0);
            }
        };
        for s in steps {
            run(&mut hub, s);
            prop_assert!(hub.held_input() <= 512);
        }
        // Finish: keep draining and reading until both sources are empty.
        for _ in 0..10_000 {
            let left = srcs.iter().any(|(_, s)| !s.lock().unwrap().to_read.is_empty());
            if !left && hub.held_input() == 0 {
                break;
            }
            run(&mut hub, 0);
            run(&mut hub, 1);
            run(&mut hub, 2);
        }
        fst.lock().unwrap().drain();
        let mut log: Vec<(u64, Vec<u8>)> = Vec::new();
        for (_, s) in &srcs {
            log.extend(s.lock().unwrap().read_log.iter().cloned());
        }
        log.sort_by_key(|(seq, _)| *seq);
        let want: Vec<u8> = log.into_iter().flat_map(|(_, d)| d).collect();
        prop_assert_eq!(&fst.lock().unwrap().received, &want);
        let total: usize = a.iter().chain(b.iter()).map(Vec::len).sum();
        prop_assert_eq!(want.len(), total);
    }
}

#[test]
fn concurrent_writers_chunks_stay_whole() {
    let mut hub = Hub::for_test(cfg(), 1 << 20);
    let (f1, _) = mock(64);
    let (f2, _) = mock(64);
    let writers = [
        hub.add_frontend("a", f1).unwrap(),
        hub.add_frontend("b", f2).unwrap(),
    ];
    let (p1, s1) = mem(None, 0);
    let (p2, s2) = mem(None, 5);
    hub.add_mem("m1", p1, Some((Policy::Lossless, 1 << 24)), None);
    hub.add_mem("m2", p2, Some((Policy::Lossless, 1 << 24)), None);
    let handles: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(k, mut w)| {
            std::thread::spawn(move || {
                for i in 0..2000u32 {
                    let chunk = format!("<{k}:{i:05}:{}>", "x".repeat((i % 17) as usize));
                    w.write_all(chunk.as_bytes()).unwrap();
                }
            })
        })
        .collect();
    let mut done = false;
    while !done {
        done = handles.iter().all(|h| h.is_finished());
        hub.pump();
    }
    hub.pump();
    let a = s1.lock().unwrap().written.clone();
    let b = s2.lock().unwrap().written.clone();
    assert_eq!(a, b);
    // Every chunk is whole, and each writer's chunks are in order.
    let text = String::from_utf8(a).unwrap();
    let mut next = [0u32; 2];
    for part in text.split_terminator('>') {
        let part = part.strip_prefix('<').unwrap();
        let mut it = part.split(':');
        let k: usize = it.next().unwrap().parse().unwrap();
        let i: u32 = it.next().unwrap().parse().unwrap();
        assert_eq!(it.next().unwrap(), "x".repeat((i % 17) as usize));
        assert_eq!(i, next[k]);
        next[k] += 1;
    }
    assert_eq!(next, [2000, 2000]);
}

#[test]
fn input_backpressure_stops_and_resumes_reading() {
    let mut hub = Hub::for_test(
        HubConfig {
            input_capacity: 256,
            read_chunk: 100,
            ..cfg()
        },
        0,
    );
    let (fe, fst) = mock(16);
    let _w = hub.add_frontend("ttyS0", fe).unwrap();
    let (p, s) = MemPort::new();
    s.lock().unwrap().to_read = (0..50).map(|i| vec![i as u8; 100]).collect();
    let t = hub.add_mem("sock", Box::new(p), None, Some(InputMode::Guest));
    for _ in 0..10 {
        hub.readable(t);
    }
    // 16 in the FIFO, at most 256 - 64 (reserve kept for the terminal) held.
    assert!(!hub.wants_input(t));
    assert!(hub.held_input() <= 192);
    let read_so_far = s.lock().unwrap().read_log.len();
    hub.readable(t);
    assert_eq!(
        s.lock().unwrap().read_log.len(),
        read_so_far,
        "read while full"
    );
    fst.lock().unwrap().drain();
    hub.drained(0);
    assert!(hub.wants_input(t));
}

#[test]
fn stdio_escapes_quit_and_literal() {
    let mut hub = Hub::for_test(cfg(), 0);
    let (fe, fst) = mock(64);
    let _w = hub.add_frontend("ttyS0", fe).unwrap();
    let (p, s) = MemPort::new();
    s.lock().unwrap().to_read = vec![b"ab\x01\x01c\x01".to_vec(), b"x".to_vec()].into();
    let t = hub.add_mem(
        "stdin",
        Box::new(p),
        None,
        Some(InputMode::Terminal(EscapeParser::new(EscapeKeys::Stdio))),
    );
    hub.readable(t);
    hub.readable(t);
    assert_eq!(fst.lock().unwrap().fifo, b"ab\x01c");
    assert_eq!(hub.quit_evt().read().unwrap(), 1);
}

#[test]
fn lossless_hard_cap_drops_with_notice_and_congestion_clears() {
    let mut hub = Hub::for_test(
        HubConfig {
            high_water: 100,
            hard_cap: 1000,
            ..HubConfig::default()
        },
        0,
    );
    let calls = Arc::new(Mutex::new(0));
    let fe = Resumes(EventFd::new(EFD_NONBLOCK).unwrap(), calls.clone());
    let mut w = hub.add_frontend("ttyS0", Box::new(fe)).unwrap();
    let (p, s) = mem(Some(0), 0);
    let t = hub.add_mem("stdout", p, Some((Policy::Lossless, 1000)), None);
    w.write_all(&[b'a'; 600]).unwrap();
    hub.pump();
    assert!(w.congested());
    w.write_all(&[b'b'; 600]).unwrap();
    hub.pump();
    assert_eq!(hub.pending_of(t), 600, "over the cap: dropped");
    s.lock().unwrap().budget = None;
    hub.writable(t);
    assert!(!w.congested());
    assert_eq!(*calls.lock().unwrap(), 1);
    let out = String::from_utf8(s.lock().unwrap().written.clone()).unwrap();
    assert!(out.starts_with(&"a".repeat(600)));
    assert!(out.contains("600 bytes of console output dropped"), "{out}");
}

#[test]
fn failing_backend_is_dropped_others_go_on() {
    let mut hub = Hub::for_test(cfg(), 0);
    let (fe, _) = mock(64);
    let mut w = hub.add_frontend("ttyS0", fe).unwrap();
    let (p, bad) = mem(None, 0);
    bad.lock().unwrap().fail = Some(std::io::ErrorKind::BrokenPipe);
    let tb = hub.add_mem("stdout", p, Some((Policy::Lossless, 1 << 20)), None);
    let (p, good) = mem(None, 0);
    hub.add_mem("file", p, Some((Policy::Lossless, 1 << 20)), None);
    w.write_all(b"hello").unwrap();
    hub.pump();
    w.write_all(b" world").unwrap();
    hub.pump();
    assert!(!hub.alive(tb));
    assert_eq!(good.lock().unwrap().written, b"hello world");
}
