//! `--report FILE`: a JSON summary of a run, written atomically when microvm exits, and
//! the console tail shown on stderr when a test guest fails.
//!
//! Format (stable keys; numbers are plain JSON numbers, times in milliseconds):
//!
//! ```json
//! {
//!   "microvm": "0.1.0",
//!   "exit": { "reason": "guest-exit", "status": 3, "message": "guest exit code 3 (exit-code register)" },
//!   "guest_exit_code": 3,
//!   "boot_time_ms": 812.4,
//!   "wall_time_ms": 1630.2,
//!   "expect": { "patterns": ["ALL PASSED"], "matched": 0 },
//!   "fail_on": { "patterns": ["BUG:"], "matched": null },
//!   "timeout_ms": 300000,
//!   "send_after": { "steps": 3, "done": 3 },
//!   "consoles": [ { "hub": "console", "output_bytes": 5120, "input_bytes": 12,
//!       "frontends": [ { "name": "hvc0", "bytes_out": 4000, "bytes_in": 12 } ],
//!       "backends": [ { "name": "stdout", "bytes_out": 5120, "dropped": 0, "bytes_in": 12, "state": "open" } ],
//!       "sockets": [ { "name": "/tmp/vm.sock", "clients_seen": 2, "clients_now": 0,
//!                      "clients_cut_off": 1, "clients_refused": 0,
//!                      "clients_unauthenticated": 0, "bytes_out": 9000, "bytes_in": 0 } ] } ],
//!   "tests": { "tests": 3, "failures": 1, "errors": 0, "skipped": 1, "dropped": 0,
//!       "suites": [ { "name": "ktap/example", "plan": 3, "cases": [
//!           { "name": "example_simple_test", "result": "pass", "message": "" } ] } ] }
//! }
//!
//! `tests` (KTAP/TAP results, [`crate::ci::ktap`]) is null unless `--junit` or `--report` was
//! given and the VM ran; `result` is `pass`, `fail`, `skip`, `todo` or `error`.
//! ```

use std::path::Path;
use std::time::Duration;

use crate::ci::ktap::{self, Case, Results};
use crate::ci::{Checks, Outcome};
use crate::exit::ExitReason;
use crate::mux::HubStats;

/// Errors writing the report (or the JUnit file).
#[derive(Debug, thiserror::Error)]
#[error("cannot write --{option} {path}: {source}")]
pub struct ReportError {
    /// `report` or `junit`.
    option: &'static str,
    /// The report's path.
    path: String,
    /// The OS error.
    source: std::io::Error,
}

/// A JSON value, just what the report needs.
enum Json {
    Null,
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    fn int(n: impl Into<u64>) -> Json {
        Json::Num(n.into().to_string())
    }

    fn ms(d: Duration) -> Json {
        Json::Num(format!("{:.1}", d.as_secs_f64() * 1000.0))
    }

    fn str(s: &str) -> Json {
        Json::Str(s.to_string())
    }

    fn strs(v: &[String]) -> Json {
        Json::Arr(v.iter().map(|s| Json::str(s)).collect())
    }

    fn render(&self, out: &mut String, indent: usize) {
        let pad = |out: &mut String, n: usize| out.extend(std::iter::repeat_n(' ', n));
        match self {
            Json::Null => out.push_str("null"),
            Json::Num(n) => out.push_str(n),
            Json::Str(s) => escape(s, out),
            Json::Arr(items) if items.is_empty() => out.push_str("[]"),
            Json::Arr(items) => {
                out.push_str("[\n");
                for (i, v) in items.iter().enumerate() {
                    pad(out, indent + 2);
                    v.render(out, indent + 2);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                pad(out, indent);
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push_str("{\n");
                for (i, (k, v)) in fields.iter().enumerate() {
                    pad(out, indent + 2);
                    escape(k, out);
                    out.push_str(": ");
                    v.render(out, indent + 2);
                    out.push_str(if i + 1 < fields.len() { ",\n" } else { "\n" });
                }
                pad(out, indent);
                out.push('}');
            }
        }
    }
}

/// Appends `s` as a JSON string literal.
fn escape(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn hub_json(name: &str, s: &HubStats) -> Json {
    Json::Obj(vec![
        ("hub", Json::str(name)),
        ("output_bytes", Json::int(s.output_bytes)),
        ("input_bytes", Json::int(s.input_bytes)),
        (
            "frontends",
            Json::Arr(
                s.frontends
                    .iter()
                    .map(|f| {
                        Json::Obj(vec![
                            ("name", Json::str(&f.name)),
                            ("bytes_out", Json::int(f.bytes_out)),
                            ("bytes_in", Json::int(f.bytes_in)),
                        ])
                    })
                    .collect(),
            ),
        ),
        (
            "backends",
            Json::Arr(
                s.backends
                    .iter()
                    .map(|b| {
                        Json::Obj(vec![
                            ("name", Json::str(&b.name)),
                            ("bytes_out", Json::int(b.bytes_out)),
                            ("dropped", Json::int(b.dropped)),
                            ("bytes_in", Json::int(b.bytes_in)),
                            ("state", Json::str(b.state)),
                        ])
                    })
                    .collect(),
            ),
        ),
        (
            "sockets",
            Json::Arr(
                s.listeners
                    .iter()
                    .map(|l| {
                        Json::Obj(vec![
                            ("name", Json::str(&l.name)),
                            ("clients_seen", Json::int(l.clients_seen)),
                            ("clients_now", Json::int(l.clients_now as u64)),
                            ("clients_cut_off", Json::int(l.clients_cut_off)),
                            ("clients_refused", Json::int(l.clients_refused)),
                            (
                                "clients_unauthenticated",
                                Json::int(l.clients_unauthenticated),
                            ),
                            ("bytes_out", Json::int(l.bytes_out)),
                            ("bytes_in", Json::int(l.bytes_in)),
                        ])
                    })
                    .collect(),
            ),
        ),
    ])
}

/// The KTAP/TAP results: totals, then each suite's cases with their result and message.
fn tests_json(r: &Results) -> Json {
    let c = r.counts();
    let case = |c: &Case| {
        let (result, message) = match &c.outcome {
            ktap::Outcome::Pass => ("pass", ""),
            ktap::Outcome::Fail(m) => ("fail", m.as_str()),
            ktap::Outcome::Skip(m) => ("skip", m.as_str()),
            ktap::Outcome::Todo(m) => ("todo", m.as_str()),
            ktap::Outcome::Error(m) => ("error", m.as_str()),
        };
        Json::Obj(vec![
            ("name", Json::str(&c.name)),
            ("result", Json::str(result)),
            ("message", Json::str(message)),
        ])
    };
    let suites = r
        .suites
        .iter()
        .filter(|s| !s.cases.is_empty())
        .map(|s| {
            Json::Obj(vec![
                ("name", Json::str(&s.name)),
                ("plan", s.plan.map_or(Json::Null, Json::int)),
                ("cases", Json::Arr(s.cases.iter().map(case).collect())),
            ])
        })
        .collect();
    Json::Obj(vec![
        ("tests", Json::int(c.tests as u64)),
        ("failures", Json::int(c.failures as u64)),
        ("errors", Json::int(c.errors as u64)),
        ("skipped", Json::int(c.skipped as u64)),
        ("dropped", Json::int(r.dropped as u64)),
        ("suites", Json::Arr(suites)),
    ])
}

/// The report's text. `outcome` is absent when the VM could not be built (`status` then
/// says whether it was a usage or a runtime error).
pub fn render(
    checks: &Checks,
    reason: &ExitReason,
    status: i32,
    outcome: Option<&Outcome>,
) -> String {
    let code = match reason {
        ExitReason::GuestExit(c) => Json::int(*c),
        _ => Json::Null,
    };
    let opt_ms = |d: Option<Duration>| d.map_or(Json::Null, Json::ms);
    let consoles = outcome.map_or_else(Vec::new, |o| {
        o.consoles
            .iter()
            .enumerate()
            .map(|(i, (s, _))| hub_json(if i == 0 { "console" } else { "serial" }, s))
            .collect()
    });
    let matched = match reason {
        ExitReason::FailOn(p) => Json::str(p),
        _ => Json::Null,
    };
    let doc = Json::Obj(vec![
        ("microvm", Json::str(env!("CARGO_PKG_VERSION"))),
        (
            "exit",
            Json::Obj(vec![
                ("reason", Json::str(reason.kind())),
                ("status", Json::Num(status.to_string())),
                ("message", Json::Str(reason.to_string())),
            ]),
        ),
        ("guest_exit_code", code),
        ("boot_time_ms", opt_ms(outcome.and_then(|o| o.boot_time))),
        ("wall_time_ms", opt_ms(outcome.map(|o| o.wall_time))),
        (
            "expect",
            Json::Obj(vec![
                ("patterns", Json::strs(&checks.expect)),
                (
                    "matched",
                    Json::int(outcome.map_or(0, |o| o.expect_progress.0) as u64),
                ),
            ]),
        ),
        (
            "fail_on",
            Json::Obj(vec![
                ("patterns", Json::strs(&checks.fail_on)),
                ("matched", matched),
            ]),
        ),
        ("timeout_ms", opt_ms(checks.timeout)),
        (
            "send_after",
            Json::Obj(vec![
                ("steps", Json::int(checks.send_after.len() as u64)),
                (
                    "done",
                    Json::int(outcome.map_or(0, |o| o.send_after_done) as u64),
                ),
            ]),
        ),
        ("consoles", Json::Arr(consoles)),
        (
            "tests",
            outcome
                .and_then(|o| o.tests.as_ref())
                .map_or(Json::Null, tests_json),
        ),
    ]);
    let mut out = String::new();
    doc.render(&mut out, 0);
    out.push('\n');
    out
}

/// Writes `text` to `path` (given as `--{option}`) atomically (`files::write_atomic`: a
/// fresh temporary file beside it with an unpredictable name, mode 0600, synced, then
/// renamed), so a reader never sees half a file and a planted link is replaced, never
/// written through.
pub fn write_atomic(option: &'static str, path: &Path, text: &str) -> Result<(), ReportError> {
    let what = if option == "junit" {
        "--junit"
    } else {
        "--report"
    };
    crate::host::files::write_atomic(path, text.as_bytes(), what).map_err(|e| ReportError {
        option,
        path: path.display().to_string(),
        source: e.into_io(),
    })
}

/// The last `n` lines of `stream`, as text (control characters other than tab removed,
/// so a guest cannot drive the CI log's terminal).
pub fn tail_lines(stream: &[u8], n: usize) -> Vec<String> {
    if n == 0 {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(stream);
    let lines: Vec<&str> = text.trim_end_matches(['\r', '\n']).split('\n').collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| {
            l.chars()
                .filter(|c| !c.is_control() || *c == '\t')
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mux::{BackendStats, FrontendStats, ListenerStats};

    #[test]
    fn json_escaping() {
        let mut s = String::new();
        escape("a\"b\\c\nd\u{1}é", &mut s);
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
    }

    #[test]
    fn renders_every_field() {
        let checks = Checks {
            expect: vec!["ok".into()],
            fail_on: vec!["BUG:".into()],
            timeout: Some(Duration::from_secs(5)),
            ..Checks::default()
        };
        let stats = HubStats {
            output_bytes: 10,
            input_bytes: 2,
            frontends: vec![FrontendStats {
                name: "ttyS0".into(),
                bytes_out: 10,
                bytes_in: 2,
            }],
            backends: vec![BackendStats {
                name: "stdout".into(),
                bytes_out: 10,
                dropped: 0,
                bytes_in: 2,
                state: "open",
            }],
            listeners: vec![ListenerStats {
                name: "/tmp/s".into(),
                clients_seen: 3,
                clients_cut_off: 1,
                ..ListenerStats::default()
            }],
        };
        let o = Outcome {
            reason: ExitReason::GuestExit(3),
            boot_time: Some(Duration::from_millis(812)),
            wall_time: Duration::from_millis(1000),
            expect_progress: (0, 1),
            send_after_done: 0,
            consoles: vec![(stats, b"x".to_vec())],
            tests: Some(crate::ci::ktap::Results {
                suites: vec![crate::ci::ktap::Suite {
                    name: "ktap".into(),
                    plan: Some(2),
                    cases: vec![
                        crate::ci::ktap::Case {
                            name: "t1".into(),
                            outcome: crate::ci::ktap::Outcome::Skip("no hw".into()),
                            output: vec![],
                        },
                        crate::ci::ktap::Case {
                            name: "t2".into(),
                            outcome: crate::ci::ktap::Outcome::Fail(String::new()),
                            output: vec![],
                        },
                    ],
                }],
                dropped: 0,
            }),
        };
        let j = render(&checks, &o.reason, 3, Some(&o));
        for want in [
            r#""reason": "guest-exit""#,
            r#""status": 3"#,
            r#""guest_exit_code": 3"#,
            r#""boot_time_ms": 812.0"#,
            r#""wall_time_ms": 1000.0"#,
            r#""timeout_ms": 5000.0"#,
            r#""clients_seen": 3"#,
            r#""clients_cut_off": 1"#,
            r#""name": "ttyS0""#,
            r#""matched": null"#,
            r#""tests": {"#,
            r#""failures": 1"#,
            r#""skipped": 1"#,
            r#""result": "skip""#,
            r#""message": "no hw""#,
        ] {
            assert!(j.contains(want), "{want} missing in\n{j}");
        }
        let e = render(
            &Checks::default(),
            &ExitReason::Error("no kvm".into()),
            1,
            None,
        );
        assert!(e.contains(r#""boot_time_ms": null"#), "{e}");
        assert!(e.contains(r#""consoles": []"#), "{e}");
        assert!(e.contains(r#""tests": null"#), "{e}");
    }

    #[test]
    fn atomic_write_and_tail() {
        let dir = std::env::temp_dir().join(format!("mvreport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.json");
        write_atomic("report", &p, "{}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{}\n");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary left"
        );
        assert!(write_atomic("report", &dir.join("missing/r.json"), "x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(tail_lines(b"a\r\nb\r\n\x1b[2Jc\r\n", 2), ["b", "[2Jc"]);
        assert!(tail_lines(b"a\nb", 0).is_empty());
    }
}
