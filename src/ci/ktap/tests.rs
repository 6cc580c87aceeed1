use super::*;
use proptest::prelude::*;

fn run(text: &str, why: &str, clean: bool) -> Results {
    let mut p = KtapParser::new();
    p.feed(text.as_bytes());
    p.finish(why, clean)
}

fn suite<'a>(r: &'a Results, name: &str) -> &'a Suite {
    r.suites
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no suite {name} in {r:#?}"))
}

/// KUnit's KTAP v1 as the kernel prints it through printk: timestamps, `\r\n`, a
/// nested suite per test suite, a failed expectation before its `not ok`.
pub const KUNIT: &str = "\
[    0.500000] KTAP version 1\r
[    0.500001] 1..2\r
[    0.500002]     KTAP version 1\r
[    0.500003]     # Subtest: example\r
[    0.500004]     1..4\r
[    0.500005]     ok 1 example_simple_test\r
[    0.500006]     # example_fail: EXPECTATION FAILED at lib/kunit/example.c:42\r
[    0.500007]     Expected 1 == 2\r
[    0.500008]     not ok 2 example_fail\r
[    0.500009]     ok 3 example_skip # SKIP this test should be skipped\r
[    0.500010]     not ok 4 example_todo # TODO not done yet\r
[    0.500011] random driver message\r
[    0.500012] # example: pass:1 fail:1 skip:2 total:4\r
[    0.500013] not ok 1 example\r
[    0.500014]     KTAP version 1\r
[    0.500015]     # Subtest: math\r
[    0.500016]     1..1\r
[    0.500017]     ok 1 add\r
[    0.500018] ok 2 math\r
";

/// kselftest's runner: TAP 13, each program's own TAP nested with `# `.
pub const KSELFTEST: &str = "\
TAP version 13
1..2
# timeout set to 45
# selftests: net: socket
# TAP version 13
# 1..3
# ok 1 socket create
# hello from the test
# not ok 2 socket bind # port in use
# ok 3 socket listen # SKIP no ipv6
ok 1 selftests: net: socket
# selftests: net: plain
not ok 2 selftests: net: plain # exit=1
";

#[test]
fn kunit_nested_skip_todo_and_failure() {
    let r = run(KUNIT, "poweroff", true);
    assert_eq!(r.suites.len(), 3, "{r:#?}");
    let ex = suite(&r, "ktap/example");
    assert_eq!(ex.plan, Some(4));
    let names: Vec<_> = ex.cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "example_simple_test",
            "example_fail",
            "example_skip",
            "example_todo"
        ]
    );
    assert_eq!(ex.cases[0].outcome, Outcome::Pass);
    assert_eq!(ex.cases[1].outcome, Outcome::Fail(String::new()));
    assert_eq!(
        ex.cases[1].output,
        ["example_fail: EXPECTATION FAILED at lib/kunit/example.c:42"]
    );
    assert_eq!(
        ex.cases[2].outcome,
        Outcome::Skip("this test should be skipped".into())
    );
    assert_eq!(ex.cases[3].outcome, Outcome::Todo("not done yet".into()));
    // The suites' own result lines are not extra cases; the top level has none.
    assert!(suite(&r, "ktap").cases.is_empty());
    assert_eq!(suite(&r, "ktap/math").cases.len(), 1);
    assert_eq!(
        r.counts(),
        Counts {
            tests: 5,
            failures: 1,
            errors: 0,
            skipped: 2
        }
    );
}

#[test]
fn kselftest_prefixed_children() {
    let r = run(KSELFTEST, "poweroff", true);
    let child = suite(&r, "ktap/net: socket");
    assert_eq!(child.plan, Some(3));
    assert_eq!(child.cases.len(), 3);
    assert_eq!(child.cases[1].outcome, Outcome::Fail("port in use".into()));
    assert_eq!(child.cases[1].output, ["hello from the test"]);
    assert_eq!(child.cases[2].outcome, Outcome::Skip("no ipv6".into()));
    let top = suite(&r, "ktap");
    assert_eq!(top.cases.len(), 1, "{top:#?}");
    assert_eq!(top.cases[0].name, "selftests: net: plain");
    assert_eq!(top.cases[0].outcome, Outcome::Fail("exit=1".into()));
    assert_eq!(r.counts().failures, 2);
}

#[test]
fn a_crash_mid_test_is_an_error_with_the_console_excerpt() {
    let text = "\
KTAP version 1
1..3
ok 1 first
# about to crash
[   12.000000] BUG: kernel NULL pointer dereference, address: 0000000000000000
[   12.000001] Kernel panic - not syncing: Fatal exception
";
    let r = run(text, "guest kernel panic", false);
    let s = suite(&r, "ktap");
    assert_eq!(s.cases.len(), 3, "{s:#?}");
    assert_eq!(s.cases[1].name, "test 2 (no result: guest kernel panic)");
    assert!(matches!(s.cases[1].outcome, Outcome::Error(_)));
    let out = s.cases[1].output.join("\n");
    assert!(out.contains("about to crash"), "{out}");
    assert!(
        out.contains("Kernel panic - not syncing: Fatal exception"),
        "{out}"
    );
    assert_eq!(s.cases[2].name, "tests 3..3 (never run)");
    assert_eq!(r.counts().errors, 2);
    // Complete documents get no error case, whatever the stop.
    let done = run(
        "TAP version 13\n1..1\nok 1 a\n",
        "guest kernel panic",
        false,
    );
    assert_eq!(
        done.counts(),
        Counts {
            tests: 1,
            ..Counts::default()
        }
    );
}

#[test]
fn nested_crash_names_the_suite_it_was_in() {
    let text = "KTAP version 1\n1..1\n    KTAP version 1\n    # Subtest: s\n    1..2\n    ok 1 a\n";
    let r = run(text, "timeout", false);
    let s = suite(&r, "ktap/s");
    assert_eq!(s.cases[1].name, "test 2 (no result: timeout)");
    // The parent's only test is the open suite: no second error for it.
    assert_eq!(r.counts().errors, 1, "{r:#?}");
}

#[test]
fn tap14_subtests_without_headers_and_bail_out() {
    let text = "TAP version 14\n1..2\n    # Subtest: inner\n    1..1\n    ok 1 - x\nok 1 - inner\nBail out! no disk\n";
    let r = run(text, "poweroff", true);
    assert_eq!(suite(&r, "ktap/inner").cases[0].name, "x");
    let top = suite(&r, "ktap");
    assert_eq!(
        top.cases[0].outcome,
        Outcome::Error("Bail out! no disk".into())
    );
}

#[test]
fn lines_before_any_header_and_odd_lines_are_ignored() {
    let r = run("ok 1 not a test\nnot ok 2 neither\n", "poweroff", true);
    assert!(r.suites.is_empty());
    let r = run("driver: TAP version 13\n1..1\nok 1 x\n", "poweroff", true);
    assert!(r.suites.is_empty(), "{r:#?}");
    let r = run("TAP version 13\n1..1\nokay\nok1\nok 1 - real\n", "x", true);
    assert_eq!(r.counts().tests, 1);
    assert_eq!(strip_timestamp("[    1.5] x"), "x");
    assert_eq!(strip_timestamp("[abc] x"), "[abc] x");
}

#[test]
fn two_documents_in_a_row() {
    let r = run(
        "TAP version 13\n1..1\nok 1 a\nTAP version 13\n1..1\nnot ok 1 b\n",
        "x",
        true,
    );
    assert_eq!(r.suites.len(), 2);
    assert_eq!(r.suites[1].name, "ktap-2");
    assert_eq!(r.counts().failures, 1);
}

#[test]
fn bounds_hold() {
    let mut p = KtapParser::new();
    p.feed(b"TAP version 13\n");
    p.feed(&vec![b'#'; 10 * MAX_LINE]);
    p.feed(b"\n");
    for _ in 0..(MAX_DIAG_LINES + 10) {
        p.feed(b"# diag\n");
    }
    p.feed(b"ok 1 x\n");
    let mut deep = String::new();
    for d in 0..(MAX_DEPTH + 5) {
        deep += &format!("{}KTAP version 1\n", "    ".repeat(d + 1));
    }
    p.feed(deep.as_bytes());
    let r = p.finish("x", true);
    assert!(r.suites.len() <= MAX_DEPTH + 1);
    assert_eq!(r.suites[0].cases[0].output.len(), MAX_DIAG_LINES);
}

proptest! {
    /// However the stream is cut into chunks, the results are the same.
    #[test]
    fn chunking_does_not_matter(cuts in proptest::collection::vec(0usize..800, 0..20)) {
        let text = format!("{KUNIT}{KSELFTEST}");
        let whole = run(&text, "x", true);
        let mut p = KtapParser::new();
        let mut cuts = cuts;
        cuts.sort_unstable();
        let mut at = 0;
        for c in cuts {
            let c = c.min(text.len());
            p.feed(&text.as_bytes()[at..c.max(at)]);
            at = c.max(at);
        }
        p.feed(&text.as_bytes()[at..]);
        prop_assert_eq!(p.finish("x", true), whole);
    }

    /// Any bytes: no panic, and the counts add up (through the fuzz harness, so only
    /// with the `fuzzing` feature, as `make test` builds).
    #[cfg(feature = "fuzzing")]
    #[test]
    fn any_bytes(data in proptest::collection::vec(any::<u8>(), 0..4096), clean: bool) {
        let r = fuzzing::check(&data, clean);
        let c = r.counts();
        prop_assert!(c.failures + c.errors + c.skipped <= c.tests);
    }
}
