//! Sizes and durations as users write them: ONE grammar for each, shared by every option
//! (`--memory`, `--timeout`, and the console spec's `ring=`, `queue=`, `rotate=`, ...).
//!
//! * Size: decimal digits, then an optional binary multiplier `K`, `M`, `G`, `T` (any
//!   case), optionally followed by `B` or `iB` (`64K` = `64KB` = `64KiB` = 65536 bytes), or
//!   a bare `B` for bytes (`4096B`). What a number without suffix means depends on the
//!   option ([`SizeUnit`]): bytes in the console spec, MiB for `--memory`.
//! * Duration: decimal digits, then an optional `ms`, `s`, `m` (or `min`) or `h`; a bare
//!   number is seconds.
//!
//! Both are checked for overflow; nothing here panics on any input.

use std::time::Duration;

/// What a size without a suffix counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeUnit {
    /// Bytes (the console spec).
    Bytes,
    /// MiB (`--memory 512`).
    MiB,
}

/// Parses a size (see the module doc). `None` when it does not follow the grammar or
/// does not fit in a `u64`. Zero is a valid size here; options that need more say so.
pub fn parse_size(s: &str, bare: SizeUnit) -> Option<u64> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return None;
    }
    let n: u64 = t[..digits_end].parse().ok()?;
    let suffix = t[digits_end..].to_ascii_lowercase();
    let shift = match suffix.as_str() {
        "" => match bare {
            SizeUnit::Bytes => 0,
            SizeUnit::MiB => 20,
        },
        "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// A size the way a user would write it: the largest binary unit that divides it.
pub fn format_size(n: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
    for (shift, unit) in UNITS {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// Parses a duration (see the module doc). `None` when it does not follow the grammar,
/// overflows, or is zero.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" | "min" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }?;
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// A duration the way a user would write it (`90s`, `1500ms`, `5m`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) && ms >= 60_000 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        let b = |s| parse_size(s, SizeUnit::Bytes);
        assert_eq!(b("4096"), Some(4096));
        assert_eq!(b("64K"), Some(65536));
        assert_eq!(b("64kb"), Some(65536));
        assert_eq!(b("2m"), Some(2 << 20));
        assert_eq!(b("1GiB"), Some(1 << 30));
        assert_eq!(b("3T"), Some(3 << 40));
        assert_eq!(b("16777216B"), Some(16 << 20));
        assert_eq!(b("0"), Some(0));
        assert_eq!(parse_size("512", SizeUnit::MiB), Some(512 << 20));
        assert_eq!(parse_size("512K", SizeUnit::MiB), Some(512 << 10));
        for bad in [
            "",
            "M",
            "-1M",
            "1.5G",
            "12X",
            "1iB",
            "B",
            "2 M",
            "99999999999999T",
            "99999999999999999999",
        ] {
            assert_eq!(b(bad), None, "{bad}");
        }
    }

    #[test]
    fn formatted_sizes_parse_back() {
        for n in [1, 1000, 1024, 3 << 20, 5 << 30, 7 << 40, (1 << 20) + 1] {
            assert_eq!(parse_size(&format_size(n), SizeUnit::Bytes), Some(n));
        }
        assert_eq!(format_size(2 << 20), "2M");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("5min"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        for bad in [
            "",
            "0",
            "0s",
            "s",
            "-1",
            "1.5s",
            "3d",
            "99999999999999999999h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        for d in ["90s", "1500ms", "5m"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in ".{0,30}") {
            let _ = parse_size(&s, SizeUnit::Bytes);
            let _ = parse_size(&s, SizeUnit::MiB);
            let _ = parse_duration(&s);
        }
    }
}
