//! Host-side fan-out throughput: MB/s written into a hub (through `HubWriter`, as a UART
//! would) until every backend has the bytes. 1 backend = ring; 3 = ring + 2 unix socket
//! clients reading; 8 = ring + 7 clients. Real event_manager loop on its own thread.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use event_manager::{EventManager, SubscriberOps};
use microvm::mux::{Frontend, Hub};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

struct NoInput(EventFd);
impl Frontend for NoInput {
    fn take_input(&mut self, data: &[u8]) -> usize {
        data.len()
    }
    fn drained_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

const CHUNK: usize = 64 << 10;
const PER_ITER: usize = 4 << 20;

fn bench_backends(c: &mut Criterion, clients: usize) {
    let dir = std::env::temp_dir().join(format!("mvbench-{}-{clients}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("c.sock");
    let spec = if clients == 0 {
        "ring".to_string()
    } else {
        format!("mux:ring,sock={}:queue=64M:max-clients=16", sock.display())
    };
    let exit = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut hub = Hub::new(&spec.parse().unwrap(), exit).unwrap();
    let mut w = hub
        .add_frontend(
            "ttyS0",
            Box::new(NoInput(EventFd::new(EFD_NONBLOCK).unwrap())),
        )
        .unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    hub.add_observer(Box::new(move |d| {
        s2.fetch_add(d.len() as u64, Ordering::Release);
    }));
    let hub = Arc::new(Mutex::new(hub));
    let stop = Arc::new(AtomicBool::new(false));
    let lp = {
        let (hub, stop) = (hub.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut em = EventManager::<Arc<Mutex<Hub>>>::new().unwrap();
            em.add_subscriber(hub);
            while !stop.load(Ordering::Acquire) {
                em.run_with_timeout(20).unwrap();
            }
        })
    };
    let counters: Vec<Arc<AtomicU64>> = (0..clients).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let readers: Vec<_> = counters
        .iter()
        .map(|ctr| {
            let mut s = UnixStream::connect(&sock).unwrap();
            let ctr = ctr.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 << 10];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    ctr.fetch_add(n as u64, Ordering::Release);
                }
            })
        })
        .collect();
    while hub.lock().unwrap().clients() < clients {
        std::thread::sleep(Duration::from_millis(1));
    }
    let data = vec![b'x'; CHUNK];
    let mut total = 0u64;
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Bytes(PER_ITER as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(4));
    g.bench_function(format!("{} backends", clients + 1), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                for _ in 0..PER_ITER / CHUNK {
                    w.write_all(&data).unwrap();
                }
                total += PER_ITER as u64;
                // Keep the writer within a few MiB of the slowest consumer, as the
                // UART's pacing would.
                while seen.load(Ordering::Acquire) + (8 << 20) < total
                    || counters
                        .iter()
                        .any(|c| c.load(Ordering::Acquire) + (8 << 20) < total)
                {
                    std::thread::yield_now();
                }
            }
            while seen.load(Ordering::Acquire) < total
                || counters.iter().any(|c| c.load(Ordering::Acquire) < total)
            {
                std::thread::yield_now();
            }
            start.elapsed()
        })
    });
    g.finish();
    stop.store(true, Ordering::Release);
    lp.join().unwrap();
    if let Ok(m) = Arc::try_unwrap(hub) {
        drop(m);
    }
    for r in readers {
        let _ = r.join();
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn fanout(c: &mut Criterion) {
    for clients in [0, 2, 7] {
        bench_backends(c, clients);
    }
}

criterion_group!(benches, fanout);
criterion_main!(benches);
