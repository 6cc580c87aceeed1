//! KTAP and TAP results in the console stream (kselftest's TAP 13, KUnit's KTAP v1), for
//! `--junit` and the `tests` section of `--report`.
//!
//! The parser is fed the hub's output chunks as they come ([`KtapParser::feed`], a pure
//! function of the bytes: no I/O, no clock) and reads complete lines. A line is first
//! stripped of its `\r` and of a printk timestamp (`[    1.234567] `, KUnit prints
//! through printk). What it understands:
//! - `KTAP version N` / `TAP version N` opens a test document at the prefix before it
//!   (nothing, 4 spaces for KUnit subtests, `# ` for kselftest's nested runners); a
//!   result or plan line at the deepest prefix plus 4 spaces opens one without a header;
//! - `1..N` is the plan; `ok`/`not ok [N] [-] name [# SKIP|TODO reason]` a result;
//! - `# Subtest: name` names the document that follows; other `# ` lines are
//!   diagnostics, attached to the next result at that level (KUnit prints a failed
//!   expectation before its `not ok`); `Bail out!` ends a document with an error;
//! - a result line closes the deeper documents: they become that test's subtests (its
//!   suite in JUnit); everything else (kernel messages, program output) is ignored but
//!   kept, the last lines of it, as the excerpt for a test that never finished.
//!
//! [`KtapParser::finish`] closes what is still open when the VM stops: a document whose
//! plan promised more results gets an error test case (the test that was running, with
//! the console lines since the last result, e.g. a panic's), and one for the tests it
//! never reached.
//!
//! Memory is bounded whatever the guest prints: lines are cut at [`MAX_LINE`] bytes,
//! nesting at [`MAX_DEPTH`], the excerpt at [`EXCERPT_LINES`] lines, diagnostics per test
//! at [`MAX_DIAG_LINES`], and results at [`MAX_RESULTS`] (then counted, not kept).

use std::collections::VecDeque;

/// Longest line kept (the rest of a longer line is dropped).
pub const MAX_LINE: usize = 4096;
/// Deepest nesting of test documents followed.
pub const MAX_DEPTH: usize = 16;
/// Console lines kept for the error case of a test that never finished.
pub const EXCERPT_LINES: usize = 60;
/// Diagnostic lines kept per test.
pub const MAX_DIAG_LINES: usize = 200;
/// Test results kept in all (more are counted as dropped).
pub const MAX_RESULTS: usize = 100_000;

/// How a test ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `ok`.
    Pass,
    /// `not ok` (the text after ` # `, if any).
    Fail(String),
    /// `# SKIP reason`.
    Skip(String),
    /// `not ok ... # TODO reason`: an expected failure (not a failure).
    Todo(String),
    /// No result: the document ended (crash, bail out, the VM stopped) before it.
    Error(String),
}

/// One test result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// The test's name (`test N` when the line has none).
    pub name: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Diagnostics printed before its result (or the console excerpt of an error).
    pub output: Vec<String>,
}

/// One test document: its results and the documents nested in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Suite {
    /// `a/b/c`: the names of the documents it is nested in, and its own.
    pub name: String,
    /// The plan (`1..N`), if one was printed.
    pub plan: Option<u32>,
    /// Its results in order.
    pub cases: Vec<Case>,
}

/// Totals over every suite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Test cases.
    pub tests: usize,
    /// `not ok` without a directive.
    pub failures: usize,
    /// Tests that never reported (crash, bail out, missing results).
    pub errors: usize,
    /// `# SKIP` and `# TODO`.
    pub skipped: usize,
}

impl Counts {
    /// Counts of `cases`.
    pub fn of(cases: &[Case]) -> Counts {
        let mut c = Counts {
            tests: cases.len(),
            ..Counts::default()
        };
        for case in cases {
            match case.outcome {
                Outcome::Pass => {}
                Outcome::Fail(_) => c.failures += 1,
                Outcome::Error(_) => c.errors += 1,
                Outcome::Skip(_) | Outcome::Todo(_) => c.skipped += 1,
            }
        }
        c
    }

    fn add(&mut self, o: Counts) {
        self.tests += o.tests;
        self.failures += o.failures;
        self.errors += o.errors;
        self.skipped += o.skipped;
    }

    /// True when a test failed or never reported.
    pub fn failed(&self) -> bool {
        self.failures + self.errors > 0
    }
}

/// Everything the console showed, once the run is over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Results {
    /// Suites in the order their documents began (a parent before its children).
    pub suites: Vec<Suite>,
    /// Results not kept beyond [`MAX_RESULTS`].
    pub dropped: usize,
}

impl Results {
    /// Totals over every suite.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for s in &self.suites {
            c.add(Counts::of(&s.cases));
        }
        c
    }
}

/// An open test document.
#[derive(Debug)]
struct Level {
    prefix: String,
    /// Index of its suite in `Results::suites`.
    suite: usize,
    /// Results seen (the number the next one should have, minus one).
    seen: u32,
    /// Diagnostics since the last result at this level.
    diag: Vec<String>,
    /// `# Subtest: name` seen here, for the document nested next.
    subtest: Option<String>,
    /// A nested document was closed into a result line here: its suite index.
    child: Option<usize>,
}

/// The streaming parser; see the module doc.
#[derive(Debug, Default)]
pub struct KtapParser {
    line: Vec<u8>,
    levels: Vec<Level>,
    results: Results,
    /// The last lines since the last result (for the excerpt of a test that never ended).
    recent: VecDeque<String>,
    /// Top-level documents begun so far.
    documents: usize,
    kept: usize,
}

/// A line's meaning at one level (the text after the level's prefix).
enum Parsed<'a> {
    Version,
    Plan(u32),
    Result {
        ok: bool,
        name: &'a str,
        directive: Option<(bool, &'a str)>,
        comment: &'a str,
    },
    Subtest(&'a str),
    Diag(&'a str),
    BailOut(&'a str),
}

fn parse(rest: &str) -> Option<Parsed<'_>> {
    let t = rest.trim_end();
    if let Some(v) = t
        .strip_prefix("KTAP version ")
        .or(t.strip_prefix("TAP version "))
    {
        return v.trim().parse::<u32>().ok().map(|_| Parsed::Version);
    }
    if let Some(n) = t.strip_prefix("1..") {
        let digits: String = n.chars().take_while(char::is_ascii_digit).collect();
        let tail = n[digits.len()..].trim_start();
        if !digits.is_empty() && (tail.is_empty() || tail.starts_with('#')) {
            return digits.parse().ok().map(Parsed::Plan);
        }
        return None;
    }
    if let Some(d) = t.strip_prefix("# Subtest:") {
        return Some(Parsed::Subtest(d.trim()));
    }
    if let Some(r) = t.strip_prefix("Bail out!") {
        return Some(Parsed::BailOut(r.trim()));
    }
    if t == "#" || t.starts_with("# ") {
        return Some(Parsed::Diag(t[1..].trim_start()));
    }
    let (ok, after) = if let Some(a) = t.strip_prefix("not ok") {
        (false, a)
    } else if let Some(a) = t.strip_prefix("ok") {
        (true, a)
    } else {
        return None;
    };
    if !(after.is_empty() || after.starts_with(' ')) {
        return None;
    }
    let after = after.trim_start();
    let num_len = after.chars().take_while(char::is_ascii_digit).count();
    let after = after[num_len..].trim_start();
    let after = after.strip_prefix("- ").unwrap_or(after);
    let (name, comment) = match after.find('#') {
        Some(i) => (after[..i].trim(), after[i + 1..].trim()),
        None => (after.trim(), ""),
    };
    // Byte slices through `get`: the guest's text need not have a char boundary there.
    let word = |w: &str| {
        comment
            .get(..w.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(w))
            && comment
                .get(w.len()..)
                .is_some_and(|t| t.chars().next().is_none_or(|c| !c.is_alphanumeric()))
    };
    let directive = if word("SKIP") {
        Some((true, comment[4..].trim()))
    } else if word("TODO") {
        Some((false, comment[4..].trim()))
    } else {
        None
    };
    Some(Parsed::Result {
        ok,
        name,
        directive,
        comment,
    })
}

/// Removes a printk timestamp (`[    1.234567] `) from the start of a line.
fn strip_timestamp(line: &str) -> &str {
    let Some(rest) = line.strip_prefix('[') else {
        return line;
    };
    match rest.find(']') {
        Some(end)
            if end <= 20
                && rest[..end].contains('.')
                && rest[..end]
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.' || c == ' ') =>
        {
            let after = &rest[end + 1..];
            after.strip_prefix(' ').unwrap_or(after)
        }
        _ => line,
    }
}

impl KtapParser {
    /// A parser that has seen nothing.
    pub fn new() -> Self {
        KtapParser::default()
    }

    /// Feeds a chunk of the console stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.line_done(&String::from_utf8_lossy(&line));
                self.line = line;
                self.line.clear();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }

    /// True once any test document has begun.
    pub fn seen_any(&self) -> bool {
        self.documents > 0 || !self.results.suites.is_empty()
    }

    /// Closes what is still open and returns the results. `why` says how the VM
    /// stopped; `clean` is false for a crash, a timeout or a failing exit, when a
    /// document without a plan is taken to have been cut short too.
    pub fn finish(mut self, why: &str, clean: bool) -> Results {
        let tail = std::mem::take(&mut self.line);
        if !tail.is_empty() {
            self.line_done(&String::from_utf8_lossy(&tail));
        }
        let mut first = true;
        while let Some(level) = self.levels.pop() {
            let excerpt: Vec<String> = self.recent.iter().cloned().collect();
            let suite = &mut self.results.suites[level.suite];
            let planned = suite.plan.unwrap_or(0);
            // The parent waits for this document's result line: it is the open test.
            let missing = planned.saturating_sub(level.seen);
            if first && (missing > 0 || (suite.plan.is_none() && !clean)) {
                first = false;
                let name = match &level.subtest {
                    Some(s) if level.child.is_none() => s.clone(),
                    _ => format!("test {}", level.seen + 1),
                };
                let mut output = level.diag;
                output.extend(excerpt);
                suite.cases.push(Case {
                    name: format!("{name} (no result: {why})"),
                    outcome: Outcome::Error(format!("no result: {why}")),
                    output,
                });
                let rest = missing.saturating_sub(1);
                if rest > 0 {
                    suite.cases.push(Case {
                        name: format!("tests {}..{planned} (never run)", level.seen + 2),
                        outcome: Outcome::Error(format!("{rest} planned tests never ran: {why}")),
                        output: Vec::new(),
                    });
                }
            } else if missing > 1 {
                // The first missing one is the nested document's own result.
                suite.cases.push(Case {
                    name: format!("tests {}..{planned} (never run)", level.seen + 2),
                    outcome: Outcome::Error(format!(
                        "{} planned tests never ran: {why}",
                        missing - 1
                    )),
                    output: Vec::new(),
                });
            }
        }
        self.results
    }

    fn line_done(&mut self, raw: &str) {
        let line = strip_timestamp(raw.strip_suffix('\r').unwrap_or(raw));
        if self.recent.len() == EXCERPT_LINES {
            self.recent.pop_front();
        }
        self.recent.push_back(line.to_string());
        if let Some(vpos) = line.find("KTAP version ").or(line.find("TAP version ")) {
            let prefix = &line[..vpos];
            // Only indentation and kselftest's `# ` nest: "foo: TAP version 13" in some
            // program's output is not a header.
            let nesting = prefix.chars().all(|c| matches!(c, ' ' | '\t' | '#'));
            if nesting
                && matches!(parse(&line[vpos..]), Some(Parsed::Version))
                && self.version(prefix)
            {
                return;
            }
        }
        // The deepest level whose prefix the line has and where it means something.
        for depth in (0..self.levels.len()).rev() {
            let prefix = self.levels[depth].prefix.clone();
            let Some(rest) = line.strip_prefix(prefix.as_str()) else {
                continue;
            };
            let deepest = depth + 1 == self.levels.len();
            match parse(rest) {
                // Comments at a shallower level while a deeper document is open are
                // that document's (kselftest prints its children's output with `# `).
                Some(Parsed::Diag(d)) if !deepest => {
                    self.apply_at(self.levels.len() - 1, Parsed::Diag(d));
                }
                Some(p @ (Parsed::Result { .. } | Parsed::Plan(_) | Parsed::BailOut(_))) => {
                    // The deeper documents are over: the first is this test's subtests.
                    if !deepest {
                        self.levels[depth].child = Some(self.levels[depth + 1].suite);
                        self.levels.truncate(depth + 1);
                    }
                    self.apply_at(depth, p);
                }
                Some(p) => self.apply_at(depth, p),
                None => {
                    // A plan, result or subtest header four spaces deeper without a
                    // version line: a nested document all the same (TAP 14 style).
                    if let Some(deeper) = rest.strip_prefix("    ")
                        && deepest
                        && let Some(
                            p @ (Parsed::Plan(_) | Parsed::Result { .. } | Parsed::Subtest(_)),
                        ) = parse(deeper)
                    {
                        let nested = format!("{prefix}    ");
                        if self.open(&nested) {
                            self.apply_at(depth + 1, p);
                        }
                        return;
                    }
                    continue;
                }
            }
            return;
        }
    }

    /// A version line at `prefix`: a new document there, or nested in the current one.
    /// False when it is not taken (too deep).
    fn version(&mut self, prefix: &str) -> bool {
        // A header at the prefix of an open level starts a new document there.
        if let Some(depth) = self.levels.iter().position(|l| l.prefix == prefix) {
            let level = &self.levels[depth];
            let fresh = level.seen == 0 && self.results.suites[level.suite].plan.is_none();
            if fresh && depth + 1 == self.levels.len() {
                return true;
            }
            self.levels.truncate(depth);
        } else if self
            .levels
            .last()
            .is_some_and(|l| !prefix.starts_with(l.prefix.as_str()))
        {
            // Not nested in what is open: unrelated documents end.
            self.levels
                .retain(|l| prefix.starts_with(l.prefix.as_str()) && l.prefix.len() < prefix.len());
        }
        self.open(prefix)
    }

    fn open(&mut self, prefix: &str) -> bool {
        if self.levels.len() >= MAX_DEPTH {
            return false;
        }
        let name = match self.levels.last_mut() {
            Some(parent) => {
                // `# Subtest: name`, or kselftest's `# selftests: dir: name` comment.
                let selftest = parent
                    .diag
                    .iter()
                    .rev()
                    .find(|d| d.starts_with("selftests: "))
                    .map(|d| d["selftests: ".len()..].to_string());
                let own = parent
                    .subtest
                    .take()
                    .or(selftest)
                    .unwrap_or_else(|| format!("test {}", parent.seen + 1));
                format!("{}/{own}", self.results.suites[parent.suite].name)
            }
            None => {
                self.documents += 1;
                if self.documents == 1 {
                    "ktap".to_string()
                } else {
                    format!("ktap-{}", self.documents)
                }
            }
        };
        self.results.suites.push(Suite {
            name,
            plan: None,
            cases: Vec::new(),
        });
        self.levels.push(Level {
            prefix: prefix.to_string(),
            suite: self.results.suites.len() - 1,
            seen: 0,
            diag: Vec::new(),
            subtest: None,
            child: None,
        });
        true
    }

    fn apply_at(&mut self, depth: usize, p: Parsed<'_>) {
        let Some(level) = self.levels.get_mut(depth) else {
            return;
        };
        match p {
            Parsed::Version => {}
            Parsed::Plan(n) => self.results.suites[level.suite].plan = Some(n),
            Parsed::Subtest(name) => {
                level.subtest = Some(name.to_string());
                // The suite nested next takes this name; if it is the level's own
                // header (KUnit prints it after its version line), rename the level.
                let suite = &mut self.results.suites[level.suite];
                if level.seen == 0
                    && suite.cases.is_empty()
                    && suite.plan.is_none()
                    && let Some((parent, _)) = suite.name.rsplit_once('/')
                {
                    suite.name = format!("{parent}/{name}");
                    level.subtest = None;
                }
            }
            Parsed::Diag(d) => {
                if level.diag.len() < MAX_DIAG_LINES {
                    level.diag.push(d.to_string());
                }
            }
            Parsed::BailOut(why) => {
                let case = Case {
                    name: format!("test {} (bail out)", level.seen + 1),
                    outcome: Outcome::Error(format!("Bail out! {why}")),
                    output: std::mem::take(&mut level.diag),
                };
                let suite = level.suite;
                self.levels.truncate(depth);
                self.push(suite, case);
            }
            Parsed::Result {
                ok,
                name,
                directive,
                comment,
            } => {
                level.seen += 1;
                let name = if name.is_empty() {
                    format!("test {}", level.seen)
                } else {
                    name.to_string()
                };
                let outcome = match directive {
                    Some((true, why)) => Outcome::Skip(why.to_string()),
                    Some((false, why)) if !ok => Outcome::Todo(why.to_string()),
                    _ if ok => Outcome::Pass,
                    _ => Outcome::Fail(comment.to_string()),
                };
                let output = std::mem::take(&mut level.diag);
                let suite = level.suite;
                let child = level.child.take();
                self.recent.clear();
                // The result of a nested document: its cases stand for it, unless it
                // failed with none of them failing (e.g. the suite's init failed).
                if let Some(c) = child {
                    let inner = Counts::of(&self.results.suites[c].cases);
                    let own_failure = matches!(outcome, Outcome::Fail(_)) && !inner.failed();
                    if inner.tests > 0 && !own_failure {
                        return;
                    }
                }
                self.push(
                    suite,
                    Case {
                        name,
                        outcome,
                        output,
                    },
                );
            }
        }
    }

    fn push(&mut self, suite: usize, case: Case) {
        if self.kept >= MAX_RESULTS {
            self.results.dropped += 1;
            return;
        }
        self.kept += 1;
        self.results.suites[suite].cases.push(case);
    }
}

#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod watch;

pub use watch::{KtapWatch, is_clean, verdict};

#[cfg(test)]
mod tests;
