//! A real console hub on an event-loop thread, with a UART-like frontend drained by a
//! "guest" thread, for the hub's integration tests (tests/mux*.rs, tests/auth.rs). No KVM.

use event_manager::{EventManager, SubscriberOps};
use microvm::mux::{ConsoleSpec, Frontend, Hub, HubConfig, HubWriter};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// A UART-like frontend: 64-byte FIFO, drained by a "guest" thread that signals an eventfd.
pub struct MockUart {
    st: Arc<Mutex<UartState>>,
    evt: EventFd,
}

#[derive(Default)]
pub struct UartState {
    pub fifo: Vec<u8>,
    pub received: Vec<u8>,
}

impl Frontend for MockUart {
    fn take_input(&mut self, data: &[u8]) -> usize {
        let mut s = self.st.lock().unwrap();
        let n = data.len().min(64 - s.fifo.len());
        s.fifo.extend_from_slice(&data[..n]);
        n
    }
    fn drained_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
    fn ack_drained(&mut self) {
        let _ = self.evt.read();
    }
}

pub struct Vm {
    pub hub: Arc<Mutex<Hub>>,
    pub writer: HubWriter,
    pub uart: Arc<Mutex<UartState>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub exit: EventFd,
}

impl Vm {
    pub fn start(spec: &str) -> Vm {
        Vm::start_with(spec, HubConfig::default())
    }

    pub fn start_with(spec: &str, cfg: HubConfig) -> Vm {
        let spec: ConsoleSpec = spec.parse().unwrap();
        let exit = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut hub = Hub::with_config(&spec, exit.try_clone().unwrap(), cfg).unwrap();
        let uart = Arc::new(Mutex::new(UartState::default()));
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let guest_evt = evt.try_clone().unwrap();
        let writer = hub
            .add_frontend(
                "ttyS0",
                Box::new(MockUart {
                    st: uart.clone(),
                    evt,
                }),
            )
            .unwrap();
        let hub = Arc::new(Mutex::new(hub));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let hub = hub.clone();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut em = EventManager::<Arc<Mutex<Hub>>>::new().unwrap();
                em.add_subscriber(hub);
                while !stop.load(Ordering::Acquire) {
                    em.run_with_timeout(20).unwrap();
                }
            }));
        }
        {
            // The guest: drains the FIFO now and then, like a driver reading RBR.
            let uart = uart.clone();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    {
                        let mut s = uart.lock().unwrap();
                        if !s.fifo.is_empty() {
                            let f = std::mem::take(&mut s.fifo);
                            s.received.extend_from_slice(&f);
                            guest_evt.write(1).unwrap();
                        }
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
            }));
        }
        Vm {
            hub,
            writer,
            uart,
            stop,
            threads,
            exit,
        }
    }

    pub fn clients(&self) -> usize {
        self.hub.lock().unwrap().clients()
    }

    pub fn stop(mut self) -> Arc<Mutex<Hub>> {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        self.hub.lock().unwrap().shutdown();
        self.hub.clone()
    }
}

/// `n` pseudo-random bytes (xorshift from `seed`): a stream whose every byte is checked.
pub fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}
