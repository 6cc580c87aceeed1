//! The KTAP parsers of a run, one per console hub, as hub observers (`--junit`,
//! `--report`), and the verdict their results give.

use std::sync::{Arc, Mutex};

use super::{KtapParser, Results};
use crate::exit::ExitReason;
use crate::mux::Observer;

/// Shared by the observers of every hub and by the end of the run.
#[derive(Clone, Default)]
pub struct KtapWatch {
    parsers: Arc<Mutex<Vec<KtapParser>>>,
}

impl KtapWatch {
    /// A watch with no stream yet.
    pub fn new() -> Self {
        KtapWatch::default()
    }

    /// An observer for one hub's stream.
    pub fn observer(&self) -> Observer {
        let parsers = self.parsers.clone();
        let index = {
            let mut p = parsers.lock().unwrap_or_else(|e| e.into_inner());
            p.push(KtapParser::new());
            p.len() - 1
        };
        Box::new(move |chunk| {
            let mut p = parsers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(parser) = p.get_mut(index) {
                parser.feed(chunk);
            }
        })
    }

    /// The results of every stream once the VM stopped for `reason` (streams that showed
    /// no test document add nothing).
    pub fn finish(&self, reason: &ExitReason) -> Results {
        let parsers = std::mem::take(&mut *self.parsers.lock().unwrap_or_else(|e| e.into_inner()));
        let why = reason.to_string();
        let clean = is_clean(reason);
        let mut all = Results::default();
        for p in parsers.into_iter().filter(KtapParser::seen_any) {
            let r = p.finish(&why, clean);
            all.suites.extend(r.suites);
            all.dropped += r.dropped;
        }
        all
    }
}

/// True for the stops that leave the verdict to the tests.
pub fn is_clean(reason: &ExitReason) -> bool {
    matches!(
        reason,
        ExitReason::PowerOff | ExitReason::Reset | ExitReason::GuestExit(0) | ExitReason::ExpectMet
    )
}

/// The run's verdict with `--junit`: a clean stop with a failed or unreported test, or
/// with no test at all, becomes [`ExitReason::TestsFailed`]; other reasons stand.
pub fn verdict(reason: ExitReason, results: &Results) -> ExitReason {
    let c = results.counts();
    if !is_clean(&reason) || (c.tests > 0 && !c.failed()) {
        return reason;
    }
    ExitReason::TestsFailed {
        tests: c.tests,
        failures: c.failures,
        errors: c.errors,
        stopped: Box::new(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observers_per_stream_and_verdicts() {
        let w = KtapWatch::new();
        let mut a = w.observer();
        let mut b = w.observer();
        a(b"TAP version 13\n1..2\nok 1 x\n");
        b(b"unrelated\n");
        a(b"not ok 2 y\n");
        let r = w.finish(&ExitReason::PowerOff);
        assert_eq!(r.suites.len(), 1);
        let v = verdict(ExitReason::PowerOff, &r);
        assert_eq!(v.exit_code(), 122);
        assert_eq!(
            v.to_string(),
            "guest powered off, and 1 of 2 KTAP/TAP tests failed, 0 never reported"
        );
        // A panic or a failing exit code stands; passing tests leave a clean stop.
        assert_eq!(
            verdict(ExitReason::GuestExit(3), &r),
            ExitReason::GuestExit(3)
        );
        let ok = Results {
            suites: vec![super::super::Suite {
                name: "ktap".into(),
                plan: Some(1),
                cases: vec![super::super::Case {
                    name: "a".into(),
                    outcome: super::super::Outcome::Pass,
                    output: vec![],
                }],
            }],
            dropped: 0,
        };
        assert_eq!(verdict(ExitReason::PowerOff, &ok), ExitReason::PowerOff);
        let none = verdict(ExitReason::PowerOff, &Results::default());
        assert_eq!(
            none.to_string(),
            "guest powered off, and no KTAP/TAP test result appeared on the console"
        );
    }
}
