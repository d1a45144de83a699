//! The retention policy of bk-prune, with restic's `forget` semantics: pure, backups in,
//! one [`Decision`] per backup out ([`decide`]), and the `--keep-*` options that say it.

use std::str::FromStr;

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeDelta, TimeZone, Utc};

use crate::error::{Error, Result};

/// The reason of every backup kept under an empty policy.
pub const EMPTY_POLICY: &str = "empty policy: nothing is deleted";
/// The reason of a backup dated after the current time.
pub const IN_THE_FUTURE: &str = "in the future";
/// The reason of the newest backup when no rule keeps it (a safety net: every non-empty
/// policy keeps it anyway).
pub const NEWEST: &str = "newest backup";

// ---------------------------------------------------------------------------------------
// Durations

/// A duration of `--keep-within`: calendar years, months and days, then hours, as restic
/// counts them (`1y6m`, `30d`, `2w` = `14d`, `36h`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub years: i64,
    pub months: i64,
    pub days: i64,
    pub hours: i64,
    /// As the user wrote it, for reasons.
    text: String,
}

impl Span {
    /// Reads `<number><unit>...` with units y, m (months), w, d, h; e.g. `1y6m`, `2w3d`.
    pub fn parse(text: &str) -> std::result::Result<Span, String> {
        let bad = || {
            format!(
                "invalid duration {text:?}: use numbers with units y (years), m (months), w (weeks), d (days), h (hours), e.g. 30d, 2w, 1y6m, 12h"
            )
        };
        let mut span = Span {
            years: 0,
            months: 0,
            days: 0,
            hours: 0,
            text: text.trim().to_string(),
        };
        let mut digits = String::new();
        let mut parts = 0;
        for c in text.trim().chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let n: i64 = digits.parse().map_err(|_| bad())?;
            digits.clear();
            // Far beyond any retention, and small enough for calendar arithmetic.
            if n > 100_000 {
                return Err(format!("duration {text:?} is too long"));
            }
            let (field, factor) = match c {
                'y' => (&mut span.years, 1),
                'm' => (&mut span.months, 1),
                'w' => (&mut span.days, 7),
                'd' => (&mut span.days, 1),
                'h' => (&mut span.hours, 1),
                _ => return Err(bad()),
            };
            *field += n * factor;
            parts += 1;
        }
        if !digits.is_empty() || parts == 0 {
            return Err(bad());
        }
        if [span.years, span.months / 12, span.days / 366, span.hours / 8784]
            .iter()
            .sum::<i64>()
            > 100_000
        {
            return Err(format!("duration {text:?} is too long"));
        }
        Ok(span)
    }

    /// A span of nothing is no rule, as a count of 0 is none.
    pub fn is_zero(&self) -> bool {
        self.years == 0 && self.months == 0 && self.days == 0 && self.hours == 0
    }

    /// The time this span before `t`, on the calendar of `zone`, as restic (Go's AddDate)
    /// counts: years and months first, then days, and a day past the end of a month rolls
    /// over (one month before March 31 is March 3, or 2 in a leap year); then hours.
    pub fn before(&self, t: DateTime<Utc>, zone: &Zone) -> DateTime<Utc> {
        let wall = zone.civil(t);
        let months = i64::from(wall.year()) * 12 + i64::from(wall.month0()) - self.years * 12 - self.months;
        let date = i32::try_from(months.div_euclid(12))
            .ok()
            .and_then(|y| NaiveDate::from_ymd_opt(y, months.rem_euclid(12) as u32 + 1, 1))
            .and_then(|first| first.checked_add_signed(TimeDelta::days(i64::from(wall.day()) - 1 - self.days)));
        match date {
            Some(d) => zone.resolve(d.and_time(wall.time())) - TimeDelta::hours(self.hours),
            None => DateTime::<Utc>::MIN_UTC,
        }
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

// ---------------------------------------------------------------------------------------
// Time zones

/// The zone whose calendar the periods are counted in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Zone {
    /// The machine's zone: `TZ`, else /etc/localtime.
    Local,
    Named(chrono_tz::Tz),
}

impl Zone {
    /// Coordinated universal time, whose days are all 24 hours.
    pub const UTC: Zone = Zone::Named(chrono_tz::UTC);

    /// An IANA zone name (`Europe/Berlin`, `UTC`), or `local`.
    pub fn parse(name: &str) -> std::result::Result<Zone, String> {
        if name == "local" {
            return Ok(Zone::Local);
        }
        chrono_tz::Tz::from_str(name)
            .map(Zone::Named)
            .map_err(|_| format!("unknown time zone {name:?}: {USE_A_ZONE}"))
    }

    /// The machine's zone as `TZ` names it. A value that names no zone is refused (78):
    /// libc and chrono would count in UTC, or /etc/localtime's zone, without a word. Read as
    /// chrono (which does the counting) and libc read it: unset is /etc/localtime; empty is
    /// UTC; `:NAME` or `NAME` is a TZif file (an absolute path, or one under the zoneinfo
    /// directories), or an IANA name chrono-tz knows when no such file is installed; any
    /// other value must be a POSIX TZ string (`UTC0`, `CET-1CEST,M3.5.0,M10.5.0/3`).
    pub fn from_env() -> Result<Zone> {
        let Some(value) = std::env::var_os("TZ") else {
            return Ok(Zone::Local);
        };
        let zone = value.to_str().and_then(|tz| {
            if tz.is_empty() {
                return Some(Zone::Local);
            }
            let name = tz.strip_prefix(':').unwrap_or(tz);
            match tz_file(name) {
                // A name that opens is read as a file, never as a POSIX string.
                Some(mut file) => is_tzif(&mut file).then_some(Zone::Local),
                None => match chrono_tz::Tz::from_str(name) {
                    Ok(tz) => Some(Zone::Named(tz)),
                    Err(_) if name == tz && posix_tz(tz.trim_matches(|c: char| c.is_ascii_whitespace())) => {
                        Some(Zone::Local)
                    }
                    Err(_) => None,
                },
            }
        });
        zone.ok_or_else(|| {
            Error::config(format!(
                "TZ={:?} names no time zone: {USE_A_ZONE} (or a POSIX TZ string such as CET-1CEST,M3.5.0,M10.5.0/3), unset TZ to use /etc/localtime, or pass --tz ZONE",
                value.to_string_lossy()
            ))
        })
    }

    pub fn name(&self) -> String {
        match self {
            Zone::Local => "local time".to_string(),
            Zone::Named(tz) => tz.name().to_string(),
        }
    }

    /// The wall-clock time in this zone.
    pub fn civil(&self, t: DateTime<Utc>) -> NaiveDateTime {
        match self {
            Zone::Local => t.with_timezone(&chrono::Local).naive_local(),
            Zone::Named(tz) => t.with_timezone(tz).naive_local(),
        }
    }

    /// The instant of a wall-clock time: the earlier of two when clocks go back; in the gap
    /// when they go forward, the wall time read with the offset in force before it.
    pub fn resolve(&self, wall: NaiveDateTime) -> DateTime<Utc> {
        match self {
            Zone::Local => resolve_in(&chrono::Local, wall),
            Zone::Named(tz) => resolve_in(tz, wall),
        }
    }
}

/// How to name a zone, in messages.
const USE_A_ZONE: &str = "use an IANA name such as Europe/Berlin or UTC";

/// The directories chrono (and libc) look for a relative zone file in.
const ZONEINFO_DIRS: [&str; 4] = [
    "/usr/share/zoneinfo",
    "/share/zoneinfo",
    "/etc/zoneinfo",
    "/usr/share/lib/zoneinfo",
];

/// The zone file `TZ` names, opened as chrono opens it.
fn tz_file(name: &str) -> Option<std::fs::File> {
    if name.starts_with('/') {
        return std::fs::File::open(name).ok();
    }
    ZONEINFO_DIRS
        .iter()
        .find_map(|dir| std::fs::File::open(std::path::Path::new(dir).join(name)).ok())
}

fn is_tzif(file: &mut std::fs::File) -> bool {
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(file, &mut magic).is_ok() && &magic == b"TZif"
}

/// Whether `tz` is a POSIX TZ string as chrono reads one: `std offset [dst [offset] ,start[/time]
/// ,end[/time]]`, names of 3 to 7 letters (or `<...>` quoted), offsets within ±23:59:59, and a
/// DST zone only with its rules.
fn posix_tz(tz: &str) -> bool {
    let mut c = TzCursor(tz.as_bytes());
    if !(c.name() && c.offset()) {
        return false;
    }
    if c.0.is_empty() {
        return true;
    }
    c.name() && (c.0.first() == Some(&b',') || c.offset()) && c.rule() && c.rule() && c.0.is_empty()
}

/// What is left of a POSIX TZ string being read.
struct TzCursor<'a>(&'a [u8]);

impl TzCursor<'_> {
    fn eat(&mut self, byte: u8) -> bool {
        let found = self.0.first() == Some(&byte);
        if found {
            self.0 = &self.0[1..];
        }
        found
    }

    fn take_while(&mut self, keep: impl Fn(u8) -> bool) -> usize {
        let n = self.0.iter().take_while(|b| keep(**b)).count();
        self.0 = &self.0[n..];
        n
    }

    fn number(&mut self, range: std::ops::RangeInclusive<u32>) -> bool {
        let digits = &self.0[..self.0.iter().take_while(|b| b.is_ascii_digit()).count()];
        self.0 = &self.0[digits.len()..];
        std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .is_some_and(|n| range.contains(&n))
    }

    fn name(&mut self) -> bool {
        let len = if self.eat(b'<') {
            let len = self.take_while(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-');
            if !self.eat(b'>') {
                return false;
            }
            len
        } else {
            self.take_while(|b| b.is_ascii_alphabetic())
        };
        (3..=7).contains(&len)
    }

    fn hhmmss(&mut self, hours: u32) -> bool {
        self.number(0..=hours) && (!self.eat(b':') || (self.number(0..=59) && (!self.eat(b':') || self.number(0..=59))))
    }

    fn offset(&mut self) -> bool {
        let _signed = self.eat(b'+') || self.eat(b'-');
        self.hhmmss(23)
    }

    /// `,Mm.w.d`, `,Jn` or `,n`, then an optional `/time`.
    fn rule(&mut self) -> bool {
        if !self.eat(b',') {
            return false;
        }
        let day = if self.eat(b'M') {
            self.number(1..=12) && self.eat(b'.') && self.number(1..=5) && self.eat(b'.') && self.number(0..=6)
        } else if self.eat(b'J') {
            self.number(1..=365)
        } else {
            self.number(0..=365)
        };
        day && (!self.eat(b'/') || self.hhmmss(24))
    }
}

fn resolve_in<Z: TimeZone>(zone: &Z, wall: NaiveDateTime) -> DateTime<Utc> {
    match zone.from_local_datetime(&wall) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(a, b) => a.with_timezone(&Utc).min(b.with_timezone(&Utc)),
        LocalResult::None => {
            let before = zone.offset_from_utc_datetime(&(wall - TimeDelta::days(2))).fix();
            Utc.from_utc_datetime(&(wall - TimeDelta::seconds(i64::from(before.local_minus_utc()))))
        }
    }
}

// ---------------------------------------------------------------------------------------
// The policy

/// A calendar period of the `--keep-hourly` ... `--keep-yearly` rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Hour,
    Day,
    /// ISO 8601 weeks: Monday to Sunday, numbered within the ISO year (2020-W53 ends on
    /// 2021-01-03).
    Week,
    Month,
    Year,
}

impl Period {
    pub const ALL: [Period; 5] = [Period::Hour, Period::Day, Period::Week, Period::Month, Period::Year];

    /// The rule's adjective, as in reasons: `daily 2026-11-21`.
    pub fn adjective(self) -> &'static str {
        match self {
            Period::Hour => "hourly",
            Period::Day => "daily",
            Period::Week => "weekly",
            Period::Month => "monthly",
            Period::Year => "yearly",
        }
    }

    fn unit(self, n: i64) -> String {
        let unit = match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Year => "year",
        };
        format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
    }

    /// The period a wall-clock time falls in: a key that differs between periods, and its
    /// name (`2026-11-21T13`, `2026-11-21`, `2026-W47`, `2026-11`, `2026`).
    pub fn bucket(self, wall: NaiveDateTime) -> (i64, String) {
        let (y, m, d) = (i64::from(wall.year()), i64::from(wall.month()), i64::from(wall.day()));
        match self {
            Period::Hour => {
                let h = i64::from(chrono::Timelike::hour(&wall));
                (
                    ((y * 100 + m) * 100 + d) * 100 + h,
                    format!("{y:04}-{m:02}-{d:02}T{h:02}"),
                )
            }
            Period::Day => ((y * 100 + m) * 100 + d, format!("{y:04}-{m:02}-{d:02}")),
            Period::Week => {
                let w = wall.date().iso_week();
                (
                    i64::from(w.year()) * 100 + i64::from(w.week()),
                    format!("{:04}-W{:02}", w.year(), w.week()),
                )
            }
            Period::Month => (y * 100 + m, format!("{y:04}-{m:02}")),
            Period::Year => (y, format!("{y:04}")),
        }
    }
}

/// A retention policy. Counts: 0 is no rule, -1 unlimited. A zero or absent span is no
/// rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: i64,
    pub hourly: i64,
    pub daily: i64,
    pub weekly: i64,
    pub monthly: i64,
    pub yearly: i64,
    pub within: Option<Span>,
    pub within_hourly: Option<Span>,
    pub within_daily: Option<Span>,
    pub within_weekly: Option<Span>,
    pub within_monthly: Option<Span>,
    pub within_yearly: Option<Span>,
}

impl Policy {
    /// `--rolling`: what backup-container's users know, as calendar rules.
    pub fn rolling() -> Policy {
        Policy {
            daily: 6,
            weekly: 4,
            monthly: 1,
            ..Policy::default()
        }
    }

    fn counted(&self) -> [(Option<Period>, i64); 6] {
        [
            (None, self.last),
            (Some(Period::Hour), self.hourly),
            (Some(Period::Day), self.daily),
            (Some(Period::Week), self.weekly),
            (Some(Period::Month), self.monthly),
            (Some(Period::Year), self.yearly),
        ]
    }

    fn windows(&self) -> [(Period, Option<&Span>); 5] {
        [
            (Period::Hour, self.within_hourly.as_ref()),
            (Period::Day, self.within_daily.as_ref()),
            (Period::Week, self.within_weekly.as_ref()),
            (Period::Month, self.within_monthly.as_ref()),
            (Period::Year, self.within_yearly.as_ref()),
        ]
    }

    /// No rule at all: then nothing is deleted.
    pub fn is_empty(&self) -> bool {
        self.counted().iter().all(|(_, n)| *n == 0)
            && std::iter::once(self.within.as_ref())
                .chain(self.windows().map(|(_, s)| s))
                .all(|s| s.is_none_or(Span::is_zero))
    }
}

/// What the policy decided for one backup, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub keep: bool,
    /// Every rule that keeps it, or, for a backup to delete, why each rule does not.
    pub reasons: Vec<String>,
}

/// A `--keep-last` or `--keep-<period>` rule while the backups are walked.
struct Counter {
    period: Option<Period>,
    count: i64,
    left: i64,
    last: Option<i64>,
}

impl Counter {
    fn name(&self) -> &'static str {
        self.period.map_or("last", Period::adjective)
    }

    fn used_up(&self) -> String {
        match self.period {
            None => format!("last: the {} newest are kept", self.count),
            Some(p) => format!("{}: {} kept already", p.adjective(), p.unit(self.count)),
        }
    }
}

/// A `--keep-within-<period>` rule while the backups are walked.
struct Window<'a> {
    period: Period,
    span: &'a Span,
    cutoff: DateTime<Utc>,
    last: Option<i64>,
}

/// Applies a policy to the backups of one name, given as (id, UTC time); one decision per
/// backup, in the order given. The order given does not matter: backups are walked newest
/// first (by time, then id), as restic does:
///
/// - a counted rule keeps a backup when its period differs from that of the last backup the
///   rule kept, and the rule has count left; `--keep-last` counts backups, not periods;
/// - each rule counts on its own, also backups that another rule keeps already;
/// - a rule with count left when it reaches the oldest backup keeps that one too, and so
///   does a `within-<period>` rule whose span reaches back to it (restic >= 0.16);
/// - `within` rules are measured back from the newest backup, not from `now`;
/// - a backup after `now` is kept (reason "in the future") and takes no part in the rules;
/// - an empty policy keeps everything, and the newest backup is always kept.
pub fn decide(policy: &Policy, zone: &Zone, now: DateTime<Utc>, backups: &[(&str, DateTime<Utc>)]) -> Vec<Decision> {
    let mut decisions = vec![
        Decision {
            keep: false,
            reasons: Vec::new(),
        };
        backups.len()
    ];
    let kept = |reason: &str| Decision {
        keep: true,
        reasons: vec![reason.to_string()],
    };
    let mut order: Vec<usize> = (0..backups.len()).collect();
    order.sort_by(|&a, &b| (backups[b].1, backups[b].0).cmp(&(backups[a].1, backups[a].0)));
    let (future, past): (Vec<usize>, Vec<usize>) = order.into_iter().partition(|&i| backups[i].1 > now);
    for &i in &future {
        decisions[i] = kept(IN_THE_FUTURE);
    }
    if policy.is_empty() {
        for &i in &past {
            decisions[i] = kept(EMPTY_POLICY);
        }
        return decisions;
    }
    let Some(&newest) = past.first() else {
        return decisions;
    };
    let latest = backups[newest].1;
    let within = policy
        .within
        .as_ref()
        .filter(|s| !s.is_zero())
        .map(|s| (s, s.before(latest, zone)));
    let mut counters: Vec<Counter> = policy
        .counted()
        .into_iter()
        .filter(|(_, n)| *n != 0)
        .map(|(period, count)| Counter {
            period,
            count,
            left: count,
            last: None,
        })
        .collect();
    let mut windows: Vec<Window> = policy
        .windows()
        .into_iter()
        .filter_map(|(period, span)| {
            let span = span.filter(|s| !s.is_zero())?;
            Some(Window {
                period,
                span,
                cutoff: span.before(latest, zone),
                last: None,
            })
        })
        .collect();
    let oldest = past.len() - 1;
    for (pos, &i) in past.iter().enumerate() {
        let t = backups[i].1;
        let wall = zone.civil(t);
        let mut keep = Vec::new();
        let mut not = Vec::new();
        if let Some((span, cutoff)) = within {
            if t > cutoff {
                keep.push(format!("within {span}"));
            } else {
                not.push(format!("not within {span} of the newest"));
            }
        }
        for c in &mut counters {
            if c.left == 0 {
                not.push(c.used_up());
                continue;
            }
            let (key, label) = match c.period {
                None => (pos as i64, "last".to_string()),
                Some(p) => {
                    let (key, name) = p.bucket(wall);
                    (key, format!("{} {name}", p.adjective()))
                }
            };
            let new_period = c.last != Some(key);
            if new_period || pos == oldest {
                c.last = Some(key);
                if c.left > 0 {
                    c.left -= 1;
                }
                keep.push(if new_period {
                    label
                } else {
                    format!("oldest ({})", c.name())
                });
            } else {
                not.push(format!("{label} has a newer backup"));
            }
        }
        for w in &mut windows {
            let adjective = w.period.adjective();
            if t <= w.cutoff {
                not.push(format!("{adjective} within {}: too old", w.span));
                continue;
            }
            let (key, name) = w.period.bucket(wall);
            let new_period = w.last != Some(key);
            if new_period || pos == oldest {
                w.last = Some(key);
                keep.push(if new_period {
                    format!("{adjective} {name} within {}", w.span)
                } else {
                    format!("oldest ({adjective} within {})", w.span)
                });
            } else {
                not.push(format!("{adjective} {name} within {} has a newer backup", w.span));
            }
        }
        decisions[i] = if keep.is_empty() {
            Decision {
                keep: false,
                reasons: not,
            }
        } else {
            Decision {
                keep: true,
                reasons: keep,
            }
        };
    }
    if !decisions[newest].keep {
        decisions[newest] = kept(NEWEST);
    }
    decisions
}

// ---------------------------------------------------------------------------------------
// The options

/// The `--keep-*` and `--rolling` options of bk-prune, which say a [`Policy`].
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyArgs {
    /// Keep the N newest backups
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_count)]
    pub keep_last: Option<i64>,
    /// Keep the newest backup of each of the last N hours that have one
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_count)]
    pub keep_hourly: Option<i64>,
    /// Keep the newest backup of each of the last N days that have one
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_count)]
    pub keep_daily: Option<i64>,
    /// Keep the newest backup of each of the last N ISO weeks (Monday to Sunday) that have one
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_count)]
    pub keep_weekly: Option<i64>,
    /// Keep the newest backup of each of the last N months that have one
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_count)]
    pub keep_monthly: Option<i64>,
    /// Keep the newest backup of each of the last N years that have one
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_count)]
    pub keep_yearly: Option<i64>,
    /// Keep every backup made less than DURATION before the newest: numbers with units y, m
    /// (months), w, d, h, e.g. 30d, 2w, 1y6m, 36h
    #[arg(long, value_name = "DURATION", value_parser = Span::parse)]
    pub keep_within: Option<Span>,
    /// Keep the newest backup of each hour within DURATION of the newest backup, and the
    /// oldest backup if it is within DURATION
    #[arg(long, value_name = "DURATION", value_parser = Span::parse)]
    pub keep_within_hourly: Option<Span>,
    /// Keep the newest backup of each day within DURATION of the newest backup, and the
    /// oldest backup if it is within DURATION
    #[arg(long, value_name = "DURATION", value_parser = Span::parse)]
    pub keep_within_daily: Option<Span>,
    /// Keep the newest backup of each ISO week within DURATION of the newest backup, and the
    /// oldest backup if it is within DURATION
    #[arg(long, value_name = "DURATION", value_parser = Span::parse)]
    pub keep_within_weekly: Option<Span>,
    /// Keep the newest backup of each month within DURATION of the newest backup, and the
    /// oldest backup if it is within DURATION
    #[arg(long, value_name = "DURATION", value_parser = Span::parse)]
    pub keep_within_monthly: Option<Span>,
    /// Keep the newest backup of each year within DURATION of the newest backup, and the
    /// oldest backup if it is within DURATION
    #[arg(long, value_name = "DURATION", value_parser = Span::parse)]
    pub keep_within_yearly: Option<Span>,
    /// The preset --keep-daily 6 --keep-weekly 4 --keep-monthly 1 (backup-container's
    /// rotation, counted in calendar periods); --keep-* options given too override it
    #[arg(long)]
    pub rolling: bool,
}

fn parse_count(text: &str) -> std::result::Result<i64, String> {
    match text.trim().parse::<i64>() {
        Ok(n) if n >= -1 => Ok(n),
        _ => Err(format!(
            "invalid count {text:?}: a number of backups or periods, or -1 for unlimited"
        )),
    }
}

impl PolicyArgs {
    /// The policy of the options: `--rolling`'s values, overridden by any --keep-* given.
    pub fn policy(&self) -> Policy {
        let preset = if self.rolling {
            Policy::rolling()
        } else {
            Policy::default()
        };
        let span = |s: &Option<Span>, p: &Option<Span>| s.clone().or_else(|| p.clone());
        Policy {
            last: self.keep_last.unwrap_or(preset.last),
            hourly: self.keep_hourly.unwrap_or(preset.hourly),
            daily: self.keep_daily.unwrap_or(preset.daily),
            weekly: self.keep_weekly.unwrap_or(preset.weekly),
            monthly: self.keep_monthly.unwrap_or(preset.monthly),
            yearly: self.keep_yearly.unwrap_or(preset.yearly),
            within: span(&self.keep_within, &preset.within),
            within_hourly: span(&self.keep_within_hourly, &preset.within_hourly),
            within_daily: span(&self.keep_within_daily, &preset.within_daily),
            within_weekly: span(&self.keep_within_weekly, &preset.within_weekly),
            within_monthly: span(&self.keep_within_monthly, &preset.within_monthly),
            within_yearly: span(&self.keep_within_yearly, &preset.within_yearly),
        }
    }
}

#[cfg(test)]
mod tests;
