//! The fuzz harness of the KTAP parser and the JUnit writer (fuzz target `ktap`, replayed
//! by tests/fuzz_corpus.rs): any console bytes, fed in the chunks the input asks for.

use super::{Counts, KtapParser, Results};

/// Feeds `data` (its first byte picks the chunk size), finishes, renders JUnit, and
/// checks: the counts add up, the XML is well-formed (every element closed, quick-xml
/// reads it back) and holds one `<testcase>` per case.
pub fn check(data: &[u8], clean: bool) -> Results {
    let (size, rest) = match data.split_first() {
        Some((s, r)) => (usize::from(*s).max(1), r),
        None => (1, data),
    };
    let mut p = KtapParser::new();
    for chunk in rest.chunks(size) {
        p.feed(chunk);
    }
    let r = p.finish("fuzz", clean);
    let c: Counts = r.counts();
    assert!(c.failures + c.errors + c.skipped <= c.tests);
    let xml = crate::ci::junit::render(&r, "fuzz", 0.0);
    assert!(
        !xml.chars()
            .any(|c| (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r')),
        "a character XML 1.0 forbids: {xml:?}"
    );
    let mut reader = quick_xml::Reader::from_str(&xml);
    let mut cases = 0;
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e))
                if e.name().as_ref() == "testcase" =>
            {
                cases += 1
            }
            Ok(_) => {}
            Err(e) => panic!("junit output does not parse: {e}\n{xml}"),
        }
    }
    assert_eq!(cases, c.tests);
    r
}
