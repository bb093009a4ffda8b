//! `spec.rotationInterval`: Go-style durations (`24h`, `90m`, `1h30m`, `1.5h`).
//!
//! ```text
//!  "1h30m" ──parse──► Duration(5400 s) ──► decide::interval_due(lastRotationTime + it)
//! ```

use std::time::Duration;

/// Parses a Go-style duration: one or more `<number><unit>` with units `ns`, `us`, `µs`,
/// `ms`, `s`, `m`, `h`; the number may have a fraction. `None` when it is not one.
pub fn parse(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_durations_parse_to_seconds() {
        assert_eq!(parse("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse("1h30m"), Some(Duration::from_secs(5_400)));
        assert_eq!(parse("90m"), Some(Duration::from_secs(5_400)));
        assert_eq!(parse("1.5h"), Some(Duration::from_secs(5_400)));
        assert_eq!(parse("1500ms"), Some(Duration::from_millis(1_500)));
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in ["", "h", "24", "1d", "-1h", "1h 30m", "1..5h"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
