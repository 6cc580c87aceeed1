//! `--junit FILE`: the KTAP/TAP results of a run ([`crate::ci::ktap::Results`]) as JUnit XML,
//! the format GitHub (test-reporter actions), GitLab (`artifacts:reports:junit`) and
//! Jenkins (the JUnit and xUnit plugins) read.
//!
//! Shape: one `<testsuites name="microvm">` with one flat `<testsuite>` per KTAP document
//! (nested documents are named `parent/child`, since GitLab reads only one level), one
//! `<testcase classname="SUITE">` per result: `<failure>` for `not ok` (its diagnostics
//! as text), `<skipped>` for `# SKIP` and `# TODO`, `<error>` for a test that never
//! reported (the console excerpt as text), `<system-out>` for a passing test's
//! diagnostics. It validates against the Jenkins xUnit plugin's `junit-10.xsd` (the test
//! `kvm_tiny::junit_from_a_ktap_guest_validates` checks with xmllint).
//!
//! quick-xml writes the document (escaping is its job); characters XML 1.0 forbids even
//! escaped (control characters from the guest's console) are shown as `\xNN` first.

use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};

use crate::ci::ktap::{Case, Counts, Outcome, Results};

/// Errors writing the JUnit file.
#[derive(Debug, thiserror::Error)]
#[error("cannot write --junit {path}: {source}")]
pub struct JunitError {
    /// The file.
    pub path: String,
    /// The OS error.
    pub source: std::io::Error,
}

/// Text as XML 1.0 allows it: control characters other than tab, newline and carriage
/// return become `\xNN`.
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

fn counts_attrs(e: &mut BytesStart<'_>, c: Counts, skipped: bool) {
    e.push_attribute(("tests", c.tests.to_string().as_str()));
    e.push_attribute(("failures", c.failures.to_string().as_str()));
    e.push_attribute(("errors", c.errors.to_string().as_str()));
    if skipped {
        e.push_attribute(("skipped", c.skipped.to_string().as_str()));
    }
}

type W = Writer<Vec<u8>>;

/// Writing to a `Vec` cannot fail; the results are ignored on purpose.
fn put(w: &mut W, e: Event<'_>) {
    let _ = w.write_event(e);
}

fn text_element(w: &mut W, name: &str, attrs: &[(&str, &str)], text: &str) {
    let mut e = BytesStart::new(name);
    for (k, v) in attrs {
        e.push_attribute((*k, clean(v).as_str()));
    }
    if text.is_empty() {
        put(w, Event::Empty(e));
        return;
    }
    put(w, Event::Start(e));
    put(w, Event::Text(BytesText::new(&clean(text))));
    put(w, Event::End(BytesEnd::new(name)));
}

fn case(w: &mut W, classname: &str, c: &Case) {
    let mut e = BytesStart::new("testcase");
    e.push_attribute(("name", clean(&c.name).as_str()));
    e.push_attribute(("classname", clean(classname).as_str()));
    e.push_attribute(("time", "0"));
    let output = c.output.join("\n");
    let (child, message) = match &c.outcome {
        Outcome::Pass if output.is_empty() => {
            put(w, Event::Empty(e));
            return;
        }
        Outcome::Pass => ("system-out", String::new()),
        Outcome::Fail(m) if m.is_empty() => ("failure", "not ok".to_string()),
        Outcome::Fail(m) => ("failure", format!("not ok: {m}")),
        Outcome::Skip(m) => ("skipped", m.clone()),
        Outcome::Todo(m) => ("skipped", format!("TODO {m}").trim_end().to_string()),
        Outcome::Error(m) => ("error", m.clone()),
    };
    put(w, Event::Start(e));
    if child == "system-out" {
        text_element(w, child, &[], &output);
    } else {
        text_element(w, child, &[("message", &message)], &output);
    }
    put(w, Event::End(BytesEnd::new("testcase")));
}

/// The JUnit document for `results`; `name` names the run (the `testsuites` element),
/// `seconds` is its wall time.
pub fn render(results: &Results, name: &str, seconds: f64) -> String {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    put(
        &mut w,
        Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)),
    );
    let mut root = BytesStart::new("testsuites");
    root.push_attribute(("name", clean(name).as_str()));
    counts_attrs(&mut root, results.counts(), false);
    root.push_attribute(("time", format!("{seconds:.3}").as_str()));
    put(&mut w, Event::Start(root));
    for s in results.suites.iter().filter(|s| !s.cases.is_empty()) {
        let mut e = BytesStart::new("testsuite");
        e.push_attribute(("name", clean(&s.name).as_str()));
        counts_attrs(&mut e, Counts::of(&s.cases), true);
        e.push_attribute(("time", "0"));
        put(&mut w, Event::Start(e));
        for c in &s.cases {
            case(&mut w, &s.name, c);
        }
        put(&mut w, Event::End(BytesEnd::new("testsuite")));
    }
    put(&mut w, Event::End(BytesEnd::new("testsuites")));
    let mut xml = String::from_utf8_lossy(&w.into_inner()).into_owned();
    xml.push('\n');
    xml
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ci::ktap::{KtapParser, Suite};

    #[test]
    fn renders_counts_and_elements() {
        let r = Results {
            suites: vec![
                Suite::default(),
                Suite {
                    name: "ktap/ex<1>".into(),
                    plan: Some(5),
                    cases: vec![
                        Case {
                            name: "a&b".into(),
                            outcome: Outcome::Pass,
                            output: vec![],
                        },
                        Case {
                            name: "f".into(),
                            outcome: Outcome::Fail("why".into()),
                            output: vec!["Expected 1 == 2".into(), "\x1b[31mred".into()],
                        },
                        Case {
                            name: "s".into(),
                            outcome: Outcome::Skip("no hw".into()),
                            output: vec![],
                        },
                        Case {
                            name: "t".into(),
                            outcome: Outcome::Todo(String::new()),
                            output: vec![],
                        },
                        Case {
                            name: "e".into(),
                            outcome: Outcome::Error("no result: panic".into()),
                            output: vec!["Kernel panic - not syncing".into()],
                        },
                    ],
                },
            ],
            dropped: 0,
        };
        let x = render(&r, "run \"1\"", 1.5);
        for want in [
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            r#"<testsuites name="run &quot;1&quot;" tests="5" failures="1" errors="1" time="1.500">"#,
            r#"<testsuite name="ktap/ex&lt;1&gt;" tests="5" failures="1" errors="1" skipped="2" time="0">"#,
            r#"<testcase name="a&amp;b" classname="ktap/ex&lt;1&gt;" time="0"/>"#,
            r#"<failure message="not ok: why">Expected 1 == 2"#,
            r#"\x1b[31mred</failure>"#,
            r#"<skipped message="no hw"/>"#,
            r#"<skipped message="TODO"/>"#,
            r#"<error message="no result: panic">Kernel panic - not syncing</error>"#,
        ] {
            assert!(x.contains(want), "{want}\nmissing in\n{x}");
        }
        assert!(!x.contains('\u{1b}'));
        assert_eq!(
            x.matches("<testsuite ").count(),
            1,
            "empty suites are left out"
        );
    }

    #[test]
    fn empty_results_are_a_valid_document() {
        let x = render(&KtapParser::new().finish("x", true), "r", 0.0);
        assert!(
            x.contains(r#"<testsuites name="r" tests="0" failures="0" errors="0" time="0.000">"#)
        );
        assert!(x.trim_end().ends_with("</testsuites>"), "{x}");
    }
}
