//! Host tier (docs/TESTING.md): running test guests in CI, with the real binary and tiny
//! real-mode guests on the host's KVM: the exit-code port, `--expect`, `--fail-on`,
//! `--timeout`, `--boot-timer` and `--report`, `--junit` (KTAP/TAP to JUnit, validated
//! with xmllint against junit-10.xsd) and `--send-after` (scripted input).

mod common;

use common::tiny::{BOOT_TIMER, LOAD_ADDR, SPIN, echo_guest, exit_code, hello_guest, print_then};
use common::vmm::run_with;
use common::{cache_dir, fs::tmpdir};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[test]
fn exit_code_port_sets_the_status_after_flushing_the_console() {
    let d = tmpdir("exit3");
    let log = d.join("console.log");
    let spec = format!("mux:stdio,file={}", log.display());
    let r = run_with(
        "exit3",
        &print_then("last words\n", &exit_code(3)),
        b"",
        &["--console", &spec],
    );
    assert_eq!(r.status, 3, "stderr: {}", r.stderr);
    assert_eq!(r.stdout, b"last words\n");
    assert_eq!(std::fs::read(&log).unwrap(), b"last words\n");
    assert!(r.stderr.contains("guest exit code 3"), "{}", r.stderr);
    assert!(r.stderr.contains("  | last words"), "tail: {}", r.stderr);
    let r = run_with("exit0", &print_then("fine\n", &exit_code(0)), b"", &[]);
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    assert!(r.stderr.is_empty(), "a pass prints nothing: {}", r.stderr);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn expect_patterns_in_order_end_the_run_with_zero() {
    let g = print_then("step one\nstep two\n", &SPIN);
    let r = run_with(
        "expect",
        &g,
        b"",
        &["--expect", "one", "--expect", "two", "--timeout", "60s"],
    );
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    // Out of order: "one" never follows "two", so the timeout ends the run.
    let r = run_with(
        "expect-order",
        &g,
        b"",
        &[
            "--expect",
            "two",
            "--expect",
            "one",
            "--timeout",
            "2s",
            "--tail-lines",
            "1",
        ],
    );
    assert_eq!(r.status, 124, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("--timeout 2s expired"), "{}", r.stderr);
    assert!(r.stderr.contains("  | step two"), "{}", r.stderr);
    // Where the stuck guest was: SPIN (jmp $) right after the 14-byte print loop.
    let spin = u64::from(LOAD_ADDR) + 14;
    assert!(
        r.stderr
            .contains(&format!("vCPU 0 when the time ran out: rip={spin:#x} ")),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("  | step one"),
        "one tail line only: {}",
        r.stderr
    );
}

#[test]
fn fail_on_ends_the_run_at_once() {
    let g = print_then("booting\nBUG: kernel NULL pointer dereference\n", &SPIN);
    let r = run_with(
        "fail-on",
        &g,
        b"",
        &[
            "--fail-on",
            "Kernel panic",
            "--fail-on",
            "BUG:",
            "--timeout",
            "60s",
        ],
    );
    assert_eq!(r.status, 123, "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains(r#"--fail-on "BUG:" appeared"#),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("  | BUG: kernel NULL"), "{}", r.stderr);
}

#[test]
fn guest_stopping_before_its_expectations_fails() {
    let r = run_with(
        "unmet",
        &hello_guest("nothing to see\n"),
        b"",
        &["--expect", "ALL PASSED"],
    );
    assert_eq!(r.status, 121, "stderr: {}", r.stderr);
    assert!(
        r.stderr
            .contains(r#"guest powered off before --expect "ALL PASSED" appeared"#),
        "{}",
        r.stderr
    );
}

#[test]
fn report_and_boot_timer() {
    let d = tmpdir("report");
    let report = d.join("report.json");
    let spec = format!("mux:stdio,ring,sock={}", d.join("c.sock").display());
    let mut then = BOOT_TIMER.to_vec();
    then.extend(exit_code(0));
    let start = Instant::now();
    let r = run_with(
        "report",
        &print_then("hello\n", &then),
        b"",
        &[
            "--boot-timer",
            "--console",
            &spec,
            "--report",
            report.to_str().unwrap(),
        ],
    );
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    let boot_ms: f64 = r
        .stderr
        .split("boot time: ")
        .nth(1)
        .and_then(|s| s.split(" ms").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no boot time on stderr: {}", r.stderr));
    assert!(
        boot_ms > 0.0 && boot_ms < wall_ms,
        "{boot_ms} ms of {wall_ms} ms"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(j["exit"]["reason"], "guest-exit");
    assert_eq!(j["exit"]["status"], 0);
    assert_eq!(j["guest_exit_code"], 0);
    let boot = j["boot_time_ms"].as_f64().unwrap();
    assert!(
        (boot - boot_ms).abs() < 0.2,
        "report {boot} vs stderr {boot_ms}"
    );
    assert!(boot <= j["wall_time_ms"].as_f64().unwrap());
    let c = &j["consoles"][0];
    assert_eq!(c["output_bytes"], 6);
    assert_eq!(c["frontends"][0]["name"], "ttyS0");
    assert_eq!(c["frontends"][0]["bytes_out"], 6);
    let backend = |name: &str| {
        c["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("no backend {name} in {c}"))
            .clone()
    };
    assert_eq!(backend("stdout")["bytes_out"], 6);
    assert_eq!(backend("stdout")["dropped"], 0);
    assert_eq!(backend("ring")["bytes_out"], 6);
    assert_eq!(c["sockets"][0]["clients_seen"], 0);
    assert!(!d.join("c.sock").exists(), "socket file removed at exit");
    std::fs::remove_dir_all(d).unwrap();
}

// ---- --junit: KTAP/TAP results from the console ----------------------------------------

/// KUnit's output as the kernel prints it (timestamps, `\r\n`, nested suites, a failed
/// expectation, a skip and a todo), then kselftest's runner with a nested program.
const KTAP_SAMPLE: &str = "[    0.5] KTAP version 1\r\n[    0.5] 1..2\r\n\
[    0.5]     KTAP version 1\r\n[    0.5]     # Subtest: example\r\n\
[    0.5]     1..4\r\n[    0.5]     ok 1 example_simple_test\r\n\
[    0.5]     # example_fail: EXPECTATION FAILED at lib/kunit/example.c:42\r\n\
[    0.5]     not ok 2 example_fail\r\n\
[    0.5]     ok 3 example_skip # SKIP this test should be skipped\r\n\
[    0.5]     not ok 4 example_todo # TODO not done yet\r\n\
[    0.5] not ok 1 example\r\n[    0.5]     KTAP version 1\r\n\
[    0.5]     # Subtest: math\r\n[    0.5]     1..1\r\n[    0.5]     ok 1 add\r\n\
[    0.5] ok 2 math\r\n\
TAP version 13\n1..2\n# selftests: net: socket\n# TAP version 13\n# 1..3\n\
# ok 1 socket create\n# not ok 2 socket bind # port in use\n# ok 3 socket listen # SKIP no ipv6\n\
ok 1 selftests: net: socket\nnot ok 2 selftests: net: plain # exit=1\n";

/// `$MICROVM_CACHE/junit-10.xsd` (scripts/deps.sh fetches it from pytest's sdist).
fn junit_xsd() -> PathBuf {
    let xsd = cache_dir().join("junit-10.xsd");
    assert!(
        xsd.exists(),
        "{} missing: run scripts/deps.sh (make test does)",
        xsd.display()
    );
    xsd
}

/// `xmllint --schema junit-10.xsd FILE` accepts it.
fn assert_valid_junit(file: &std::path::Path) {
    let out = Command::new("xmllint")
        .arg("--noout")
        .arg("--schema")
        .arg(junit_xsd())
        .arg(file)
        .output()
        .expect("xmllint (libxml2-utils, installed by scripts/deps.sh)");
    assert!(
        out.status.success(),
        "xmllint rejects {}:\n{}\n{}",
        file.display(),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(file).unwrap_or_default()
    );
}

#[test]
fn junit_from_a_ktap_guest_validates() {
    let d = tmpdir("junit");
    let (junit, report) = (d.join("results.xml"), d.join("report.json"));
    let r = run_with(
        "junit",
        &hello_guest(KTAP_SAMPLE),
        b"",
        &[
            "--junit",
            junit.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(r.status, 122, "stderr: {}", r.stderr);
    assert!(
        r.stderr
            .contains("3 of 9 KTAP/TAP tests failed, 0 never reported"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("microvm: not ok: ktap/example: example_fail"),
        "{}",
        r.stderr
    );
    assert_valid_junit(&junit);
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains(r#"<testsuites name="microvm" tests="9" failures="3" errors="0""#),
        "{xml}"
    );
    assert!(
        xml.contains(
            r#"<testsuite name="ktap/example" tests="4" failures="1" errors="0" skipped="2""#
        ),
        "{xml}"
    );
    assert!(
        xml.contains("EXPECTATION FAILED at lib/kunit/example.c:42</failure>"),
        "{xml}"
    );
    assert!(
        xml.contains(r#"<testsuite name="ktap-2/net: socket""#),
        "{xml}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(j["exit"]["reason"], "tests-failed");
    assert_eq!(j["exit"]["status"], 122);
    assert_eq!(j["tests"]["tests"], 9);
    assert_eq!(j["tests"]["failures"], 3);
    assert_eq!(j["tests"]["skipped"], 3);
    // Every test passing: the guest's clean stop stands (status 0), the file validates.
    let r = run_with(
        "junit-pass",
        &hello_guest("TAP version 13\n1..2\nok 1 a\nok 2 b # SKIP later\n"),
        b"",
        &["--junit", junit.to_str().unwrap()],
    );
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    assert_valid_junit(&junit);
    // No result at all fails a --junit run: a CI job must not pass on no tests.
    let r = run_with(
        "junit-none",
        &hello_guest("hello\n"),
        b"",
        &["--junit", junit.to_str().unwrap()],
    );
    assert_eq!(r.status, 122, "stderr: {}", r.stderr);
    assert!(r.stderr.contains("no KTAP/TAP test result"), "{}", r.stderr);
    assert_valid_junit(&junit);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn junit_error_case_for_a_guest_that_panics_mid_test() {
    let d = tmpdir("junit-panic");
    let junit = d.join("results.xml");
    let text = "KTAP version 1\n1..3\nok 1 first\n# running second\n\
[   12.0] Kernel panic - not syncing: test crash\n\
[   12.1] ---[ end Kernel panic - not syncing: test crash ]---\n";
    let r = run_with(
        "junit-panic",
        &print_then(text, &SPIN),
        b"",
        &["--junit", junit.to_str().unwrap()],
    );
    assert_eq!(
        r.status, 125,
        "a panic keeps its status; stderr: {}",
        r.stderr
    );
    assert_valid_junit(&junit);
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains(r#"tests="3" failures="0" errors="2""#),
        "{xml}"
    );
    assert!(
        xml.contains(r#"<testcase name="test 2 (no result: guest kernel panic: Kernel panic - not syncing: test crash)""#),
        "{xml}"
    );
    assert!(
        xml.contains("Kernel panic - not syncing: test crash\n"),
        "{xml}"
    );
    assert!(xml.contains("running second"), "{xml}");
    std::fs::remove_dir_all(d).unwrap();
}

// ---- --send-after: scripted input --------------------------------------------------------

#[test]
fn send_after_types_each_text_once_its_pattern_appeared() {
    let d = tmpdir("send-after");
    let report = d.join("report.json");
    // The guest prints a prompt, then echoes what it gets until 'q'.
    let r = run_with(
        "send-after",
        &print_then("login: ", &echo_guest()),
        b"",
        &[
            "--send-after",
            "login: ",
            r"root\n",
            "--send-after",
            "root",
            r"\x41\cdq",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    assert_eq!(r.stdout, b"login: root\nA\x04q");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let source = j["consoles"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "send-after")
        .cloned()
        .unwrap_or_default();
    assert_eq!(source["bytes_in"], 8, "{j}");
    assert_eq!(j["send_after"]["done"], 2, "{j}");
    // A step whose pattern never comes: the timeout says which one it waited for.
    let r = run_with(
        "send-after-stuck",
        &print_then("login: ", &SPIN),
        b"",
        &[
            "--send-after",
            "login: ",
            "x",
            "--send-after",
            "Password: ",
            "y",
            "--timeout",
            "2s",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(r.status, 124, "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains(
            r#"microvm: --send-after: 1 of 2 steps done; still waiting for "Password: ""#
        ),
        "{}",
        r.stderr
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(j["send_after"]["steps"], 2, "{j}");
    assert_eq!(j["send_after"]["done"], 1, "{j}");
    std::fs::remove_dir_all(d).unwrap();
}
