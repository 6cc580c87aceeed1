//! Host tier (docs/TESTING.md).
//!
//! Every cargo-fuzz target as a plain test: replays its committed corpus (and any crash
//! artifacts left by `scripts/fuzz.sh`), checks that the seeds do what they are named
//! after, then feeds random inputs through proptest. The harnesses live in the library
//! (`microvm::devices::virtio::fuzzing`, `microvm::devices::uart::fuzzing`,
//! `microvm::mux::spec::fuzzing`, `microvm::mux::hub::fuzzing`,
//! `microvm::mux::auth::fuzzing`) and panic when a property
//! fails; `scripts/fuzz.sh` runs the real fuzzer (cargo-fuzz) for a bounded time.

#[cfg(not(feature = "fuzzing"))]
compile_error!(
    "tests/fuzz_corpus.rs replays the fuzz harnesses, which only the `fuzzing` feature builds: \
     run `make test`, or `cargo test --features fuzzing,test-hooks`"
);

use std::path::{Path, PathBuf};

use microvm::devices::uart::fuzzing as uart;
use microvm::devices::virtio::fuzzing::run;
use microvm::mux::auth::fuzzing as greeting;
use microvm::mux::auth::{ClientRole, Greeting, Refusal};
use microvm::mux::hub::fuzzing as hub_input;
use microvm::mux::spec::fuzzing as spec;
use proptest::prelude::*;

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Runs `f` on every corpus file and crash artifact of `target`; at least `min` seeds.
fn replay(target: &str, min: usize, f: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    let corpus = files(&root().join("corpus").join(target));
    assert!(corpus.len() >= min, "{target}: corpus seeds missing");
    for p in corpus
        .iter()
        .chain(files(&root().join("artifacts").join(target)).iter())
    {
        let data = std::fs::read(p).unwrap();
        let r = std::panic::catch_unwind(|| f(&data));
        assert!(r.is_ok(), "{target}: {} fails", p.display());
    }
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    std::fs::read(root().join("corpus").join(target).join(name)).unwrap()
}

#[test]
fn ktap_corpus() {
    use microvm::ci::ktap::fuzzing::check;
    replay("ktap", 4, |d| {
        check(d, true);
        check(d, false);
    });
    // the seeds exercise what they are named after
    let c = |n: &str, clean| check(&seed("ktap", n), clean).counts();
    let kunit = c("kunit", true);
    assert_eq!((kunit.tests, kunit.failures, kunit.skipped), (5, 1, 2));
    assert_eq!(c("kselftest", true).failures, 2);
    assert_eq!(c("crash_mid_test", false).errors, 2);
    assert_eq!(c("tap14_bail_out", true).errors, 1);
}

#[test]
fn corpus_replays_without_panics() {
    replay("virtio_console", 5, |d| {
        run(d);
    });
    // the seeds exercise what they are named after
    let seed = |n: &str| run(&seed("virtio_console", n));
    assert_eq!(seed("tx_one_chain").output, 5);
    assert_eq!(seed("tx_scatter").output, 6);
    assert!(seed("tx_loop").faults > 0);
    assert!(!seed("bad_queue_size").active);
    assert!(seed("rx_fill").active);
    assert!(seed("tx_write_only").faults > 0);
    assert!(seed("tx_outside_memory").faults > 0);
    assert!(!seed("no_version_1").active);
    assert_eq!(seed("notify_before_driver_ok").output, 0);
    // an indirect chain (not offered) is refused; the next chain goes out on the
    // QueueNotify write itself (the vCPU-thread path)
    let indirect = seed("tx_indirect_notify");
    assert_eq!((indirect.output, indirect.faults), (2, 1));
}

#[test]
fn console_spec_corpus() {
    replay("console_spec", 10, |d| {
        spec::run(d);
    });
    let s = |n: &str| spec::run(&seed("console_spec", n));
    assert_eq!(
        s("issue_example"),
        spec::Outcome::Parsed(
            "mux:sock=/run/vm.sock:ro,stdio,ring=2M,file=console.log:rotate=10M:keep=3".into()
        )
    );
    assert!(matches!(s("escaped_path"), spec::Outcome::Parsed(_)));
    assert!(matches!(s("tcp_v4_v6"), spec::Outcome::Parsed(_)));
    assert!(matches!(s("tcp_tls_tokens"), spec::Outcome::Parsed(_)));
    for refused in [
        "tcp_without_auth",
        "ring_zero",
        "two_stdio",
        "unknown",
        "dangling",
        "too_many",
        "empty",
    ] {
        assert!(matches!(s(refused), spec::Outcome::Refused(_)), "{refused}");
    }
}

#[test]
fn uart_corpus() {
    replay("uart", 5, |d| {
        uart::run(d);
    });
    let u = |n: &str| uart::run(&seed("uart", n));
    assert_eq!(u("thr_hello").output, b"hello\r\n");
    let l = u("loopback");
    assert_eq!(
        (l.output.as_slice(), l.looped, l.received),
        (&b"!"[..], 3, 3)
    );
    let f = u("input_fill");
    assert_eq!((f.accepted, f.received), (74, 66));
    assert_eq!(u("dlab_divisor").output, b"ok");
    assert_eq!(u("loopback_input_refused").accepted, 20);
}

#[test]
fn hub_input_corpus() {
    replay("hub_input", 5, |d| {
        hub_input::run(d);
    });
    let h = |n: &str| hub_input::run(&seed("hub_input", n));
    let t = h("terminal_escapes");
    assert_eq!(t.delivered, b"ab\x01cq");
    assert_eq!(t.quits, 1);
    assert_eq!(h("viewer_dropped").delivered, b"ls\n");
    assert_eq!(h("eof_with_pending").delivered, b"hello");
    let s = h("split_ctrl_a");
    assert_eq!((s.delivered.as_slice(), s.quits), (&b"mid\x01"[..], 1));
    let two = String::from_utf8(h("two_sources_interleaved").delivered).unwrap();
    assert_eq!(two.len(), 35);
    assert_eq!(h("backpressure").delivered.len(), 255 * 2 + 5);
}

#[test]
fn console_greeting_corpus() {
    replay("console_greeting", 5, |d| {
        greeting::run(d);
    });
    let g = |n: &str| greeting::run(&seed("console_greeting", n)).verdict;
    assert_eq!(g("writer_token"), Greeting::Admit(ClientRole::Writer));
    assert_eq!(g("viewer_token_split"), Greeting::Admit(ClientRole::Viewer));
    assert_eq!(g("wrong_token"), Greeting::Refuse(Refusal::WrongToken));
    assert_eq!(g("http_post"), Greeting::Refuse(Refusal::Http));
    assert_eq!(g("tls_hello"), Greeting::Refuse(Refusal::Tls));
    assert_eq!(g("not_protocol"), Greeting::Refuse(Refusal::NotProtocol));
    assert_eq!(g("too_long"), Greeting::Refuse(Refusal::TooLong));
    assert_eq!(g("unfinished"), Greeting::NeedMore);
    // The token line is taken, what follows it is not.
    let w = greeting::run(&seed("console_greeting", "writer_token"));
    assert_eq!(w.taken, "token fuzz-writer-token-0123\n".len());
}

/// A console spec built from pieces of the grammar, so that random specs often parse.
fn spec_text() -> impl Strategy<Value = String> {
    let item = prop_oneof![
        Just("stdio".to_string()),
        "ring(=[0-9]{1,4}[kKmMgG]?)?",
        "file=[a-z/.\\\\,:]{0,12}(:rotate=[0-9]{1,3}[KM]?)?(:keep=[0-9]{1,4})?(:timestamps|:ts)?",
        "sock(=[a-z/.\\\\,:]{0,12})?(:ro)?(:single-writer|:sw)?(:max-clients=[0-9]{1,4})?(:queue=[0-9]{1,3}K)?(:mode=0?[0-7]{1,4})?",
        "tcp=(127\\.0\\.0\\.1|\\[::1\\]|localhost|[0-9.]{1,9}):[0-9]{1,6}(:ro)?(:insecure|:token-file=[a-z/]{1,6}|:viewer-token-file=[a-z]{1,4})?(:tls-cert=[a-z]{1,3}:tls-key=[a-z]{1,3})?(:tls-client-ca=[a-z]{0,3})?",
        ".{0,12}",
    ];
    (
        any::<bool>(),
        proptest::collection::vec(item, 1..10),
        "[ \t\n]{0,2}",
    )
        .prop_map(|(mux, items, ws)| {
            format!(
                "{ws}{}{}{ws}",
                if mux { "mux:" } else { "" },
                items.join(",")
            )
        })
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

    #[test]
    fn random_console_specs(text in spec_text()) {
        spec::run(text.as_bytes());
    }

    #[test]
    fn random_console_spec_bytes(data in proptest::collection::vec(any::<u8>(), 0..80)) {
        spec::run(&data);
    }

    #[test]
    fn random_console_text_through_ktap(data in proptest::collection::vec(any::<u8>(), 0..2048), clean: bool) {
        microvm::ci::ktap::fuzzing::check(&data, clean);
    }

    #[test]
    fn random_uart_sessions(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
        uart::run(&data);
    }

    #[test]
    fn random_console_greetings(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        greeting::run(&data);
    }

    /// Token lines with the right, a near or a wrong secret, split anywhere.
    #[test]
    fn random_token_lines(
        pick in 0u8..4,
        secret in prop_oneof![
            Just(b"fuzz-writer-token-0123".to_vec()),
            Just(b"fuzz-viewer-token-4567".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..40),
        ],
        cr in any::<bool>(),
        cuts in proptest::collection::vec(1u8..30, 0..8),
    ) {
        let mut line = b"token ".to_vec();
        line.extend_from_slice(&secret);
        if cr {
            line.push(b'\r');
        }
        line.extend_from_slice(b"\nafter");
        let mut d = vec![pick];
        let mut rest = &line[..];
        for c in cuts.iter().chain(std::iter::once(&255)) {
            let (a, b) = rest.split_at(usize::from(*c).min(rest.len()));
            d.push(a.len() as u8);
            d.extend_from_slice(a);
            rest = b;
        }
        greeting::run(&d);
    }

    #[test]
    fn random_hub_input(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
        hub_input::run(&data);
    }

    /// Mostly well-formed operations with escape keys: the hub path gets past its header.
    #[test]
    fn random_hub_input_chunks(
        header in any::<[u8; 3]>(),
        ops in proptest::collection::vec(
            (0u8..5, 0u8..4, proptest::collection::vec(prop_oneof![Just(1u8), Just(b'x'), Just(b'c'), any::<u8>()], 0..40)),
            0..60,
        ),
    ) {
        let mut d = header.to_vec();
        for (op, src, bytes) in ops {
            d.push(op);
            d.push(src);
            if op == 0 {
                d.push(bytes.len() as u8);
                d.extend_from_slice(&bytes);
            }
        }
        hub_input::run(&d);
    }
}
