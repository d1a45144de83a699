//! Job names, UTC stamps and artifact ids (SPEC §2, §3).

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};

use crate::error::{Error, Result};

pub const STAMP_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// A name is `[a-z0-9][a-z0-9_-]*`: safe in paths, URLs, cron.d file names and lock files.
pub fn validate_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if first_ok && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-') {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "invalid name {name:?}: use lower-case letters, digits, '_' and '-', starting with a letter or digit"
        )))
    }
}

/// Turns any text into a valid name part: `My Site.db` -> `my-site-db`.
pub fn sanitize(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_matches(|c| c == '-' || c == '_');
    if trimmed.is_empty() {
        "root".to_string()
    } else {
        trimmed.to_string()
    }
}

pub fn stamp(t: DateTime<Utc>) -> String {
    t.format(STAMP_FORMAT).to_string()
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn artifact_id(name: &str, t: DateTime<Utc>) -> String {
    format!("{name}.{}", stamp(t))
}

/// Reads a time given by a user: RFC 3339, a bk stamp, `YYYY-MM-DD HH:MM[:SS]` (UTC) or a
/// date (its end, so `--at 2026-11-21` picks that day's last backup).
pub fn parse_time(text: &str) -> Result<DateTime<Utc>> {
    let t = text.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(d.with_timezone(&Utc));
    }
    for format in [
        STAMP_FORMAT,
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(n) = NaiveDateTime::parse_from_str(t, format) {
            return Ok(Utc.from_utc_datetime(&n));
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return Ok(Utc.from_utc_datetime(&d.and_hms_opt(23, 59, 59).expect("valid time")));
    }
    Err(Error::usage(format!(
        "cannot read time {text:?}: use RFC 3339 (2026-11-22T00:15:00Z), a stamp (20261122T001500Z) or a date"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["mysql-agama", "a", "0db_x"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "-a", "A", "a.b", "a/b", "_x", "é"] {
            assert_eq!(validate_name(bad).unwrap_err().exit_code(), 64, "{bad}");
        }
        assert_eq!(sanitize("My Site.db"), "my-site-db");
        assert_eq!(sanitize("/"), "root");
        assert_eq!(sanitize("/srv/www/"), "srv-www");
    }

    #[test]
    fn times() {
        let t = parse_time("2026-11-22T00:15:00Z").unwrap();
        assert_eq!(stamp(t), "20261122T001500Z");
        assert_eq!(parse_time("20261122T001500Z").unwrap(), t);
        assert_eq!(parse_time("2026-11-22T01:15:00+01:00").unwrap(), t);
        assert_eq!(stamp(parse_time("2026-11-21").unwrap()), "20261121T235959Z");
        assert_eq!(artifact_id("x", t), "x.20261122T001500Z");
        assert_eq!(rfc3339(t), "2026-11-22T00:15:00Z");
        assert!(parse_time("yesterday").is_err());
    }
}
