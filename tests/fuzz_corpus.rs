//! The virtio-console fuzz target as a plain test: replays the committed corpus (and any
//! crash artifacts), then random inputs through proptest. `scripts/fuzz.sh` runs the real
//! fuzzer (cargo-fuzz) for a bounded time.

use std::path::Path;

use microvm::devices::virtio::fuzzing::run;
use proptest::prelude::*;

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn corpus_replays_without_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files(&root.join("corpus/virtio_console"));
    assert!(corpus.len() >= 5, "corpus seeds missing");
    for f in corpus
        .iter()
        .chain(files(&root.join("artifacts/virtio_console")).iter())
    {
        let data = std::fs::read(f).unwrap();
        let _ = run(&data);
    }
    // the seeds exercise what they are named after
    let seed = |n: &str| run(&std::fs::read(root.join("corpus/virtio_console").join(n)).unwrap());
    assert_eq!(seed("tx_one_chain").output, 5);
    assert_eq!(seed("tx_scatter").output, 6);
    assert!(seed("tx_loop").faults > 0);
    assert!(!seed("bad_queue_size").active);
    assert!(seed("rx_fill").active);
    assert!(seed("tx_write_only").faults > 0);
    assert!(seed("tx_outside_memory").faults > 0);
    assert!(!seed("no_version_1").active);
    assert_eq!(seed("notify_before_driver_ok").output, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_inputs_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = run(&data);
    }

    #[test]
    fn random_queue_contents_after_bring_up(
        sizes in (any::<u16>(), any::<u16>()),
        ops in proptest::collection::vec(
            (any::<u8>(), any::<u8>(), 0x7000u16..0x8000, any::<u16>(), any::<u8>(), any::<u8>()),
            0..40,
        ),
    ) {
        let mut d = vec![6u8];
        // mostly valid sizes, sometimes not
        let pick = |s: u16| if s.is_multiple_of(4) { s } else { 1 << (s % 9) };
        d.extend_from_slice(&pick(sizes.0).to_le_bytes());
        d.extend_from_slice(&pick(sizes.1).to_le_bytes());
        d.push(0x87);
        for (q, idx, addr, len, flags, next) in ops {
            d.extend_from_slice(&[7, q, idx]);
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&[flags, next, 1]);
            d.extend_from_slice(&[3, 4, 200]);
        }
        let _ = run(&d);
    }
}
