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

/// What a date without a time of day stands for. `--at 2026-11-21` picks that day's last
/// backup, so it is the day's end; `--since 2026-11-01` copies that day's backups too, so it
/// is the day's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateIs {
    /// Midnight UTC, the day's first second.
    Start,
    /// 23:59:59 UTC, the day's last second.
    End,
}

/// The time syntax of every `--at`, `--since` and `--now`: RFC 3339, a bk stamp,
/// `YYYY-MM-DD HH:MM[:SS]` or `YYYY-MM-DDTHH:MM[:SS]` (UTC), or a date `YYYY-MM-DD` (UTC;
/// its start or end as `date` says).
pub fn parse_time(text: &str, date: DateIs) -> Result<DateTime<Utc>> {
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
        let (h, m, s) = match date {
            DateIs::Start => (0, 0, 0),
            DateIs::End => (23, 59, 59),
        };
        return Ok(Utc.from_utc_datetime(&d.and_hms_opt(h, m, s).expect("valid time")));
    }
    Err(Error::usage(format!(
        "cannot read time {text:?}: use RFC 3339 (2026-11-22T00:15:00Z), a stamp (20261122T001500Z), YYYY-MM-DD HH:MM[:SS] (UTC) or a date (2026-11-22)"
    )))
}

/// The value parser of every `--now`: a time as [`parse_time`] reads it, a date being its
/// end.
pub fn parse_now(text: &str) -> std::result::Result<DateTime<Utc>, String> {
    parse_time(text, DateIs::End).map_err(|e| e.message)
}

/// The time in an id's stamp (`<name>.<stamp>`), if it has one.
pub fn stamp_time(id: &str) -> Option<DateTime<Utc>> {
    id.rsplit_once('.')
        .and_then(|(_, stamp)| NaiveDateTime::parse_from_str(stamp, STAMP_FORMAT).ok())
        .map(|n| Utc.from_utc_datetime(&n))
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
    fn time_syntax() {
        use DateIs::{End, Start};
        // (text, what a bare date means, the stamp it reads as; None: refused)
        let cases = [
            ("2026-11-22T00:15:00Z", End, Some("20261122T001500Z")),
            ("2026-11-22T01:15:00+01:00", Start, Some("20261122T001500Z")),
            ("20261122T001500Z", End, Some("20261122T001500Z")),
            ("2026-11-22 00:15:07", End, Some("20261122T001507Z")),
            ("2026-11-22 00:15", End, Some("20261122T001500Z")),
            ("2026-11-22T00:15:07", Start, Some("20261122T001507Z")),
            ("2026-11-22T00:15", Start, Some("20261122T001500Z")),
            (" 2026-11-22T00:15 ", End, Some("20261122T001500Z")),
            ("2026-11-21", End, Some("20261121T235959Z")),
            ("2026-11-21", Start, Some("20261121T000000Z")),
            ("yesterday", End, None),
            ("2026-11-31", Start, None),
            ("20261122", End, None),
            ("", Start, None),
        ];
        for (text, date, want) in cases {
            match (parse_time(text, date), want) {
                (Ok(t), Some(want)) => assert_eq!(stamp(t), want, "{text:?} {date:?}"),
                (Err(e), None) => assert_eq!(e.exit_code(), 64, "{text:?}"),
                (got, want) => panic!("{text:?} {date:?}: {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn stamps_and_ids() {
        let t = parse_time("2026-11-22T00:15:00Z", DateIs::End).unwrap();
        assert_eq!(artifact_id("x", t), "x.20261122T001500Z");
        assert_eq!(rfc3339(t), "2026-11-22T00:15:00Z");
    }
}
