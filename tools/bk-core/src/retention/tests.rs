//! The policy engine, table-driven: calendar edges (month ends, ISO week 53, year change,
//! DST), sparse and dense histories, `within`, empty and unlimited policies, the oldest
//! backup rule; then a property test over random histories and policies.

use std::collections::BTreeMap;

use clap::Parser;

use super::*;
use crate::name::{parse_time, DateIs, STAMP_FORMAT};

/// The command line of the policy's options alone, as bk-prune parses them.
#[derive(Parser)]
struct Options {
    #[command(flatten)]
    keep: PolicyArgs,
}

/// A UTC time: `2021-03-28 01:30` or any form `parse_time` reads.
fn t(s: &str) -> DateTime<Utc> {
    parse_time(s, DateIs::End).unwrap_or_else(|e| panic!("{s}: {}", e.message))
}

fn zone(name: &str) -> Zone {
    Zone::parse(name).unwrap()
}

/// The policy of bk-prune options, e.g. "--keep-daily 7 --keep-weekly 4".
fn policy(options: &str) -> Policy {
    let args = std::iter::once("bk-prune").chain(options.split_whitespace());
    Options::try_parse_from(args)
        .unwrap_or_else(|e| panic!("{options}: {e}"))
        .keep
        .policy()
}

/// The decisions for backups at the given times (ids are made from them), in that order.
fn run_policy(options: &str, tz: &str, now: &str, history: &[&str]) -> Vec<Decision> {
    let ids: Vec<String> = history
        .iter()
        .map(|h| format!("job.{}", t(h).format(STAMP_FORMAT)))
        .collect();
    let dated: Vec<(&str, DateTime<Utc>)> = ids.iter().zip(history).map(|(id, h)| (id.as_str(), t(h))).collect();
    decide(&policy(options), &zone(tz), t(now), &dated)
}

/// The times of the backups kept, in the order given.
fn kept<'a>(options: &str, tz: &str, history: &[&'a str]) -> Vec<&'a str> {
    let decisions = run_policy(options, tz, "2100-01-01T00:00:00Z", history);
    history
        .iter()
        .zip(&decisions)
        .filter(|(_, d)| d.keep)
        .map(|(h, _)| *h)
        .collect()
}

struct Case {
    what: &'static str,
    options: &'static str,
    tz: &'static str,
    history: &'static [&'static str],
    kept: &'static [&'static str],
}

const CASES: &[Case] = &[
    // Month ends: 31, 28 (2021), 30, and the first of the next month.
    Case {
        what: "month ends",
        options: "--keep-monthly 10",
        tz: "UTC",
        history: &[
            "2021-01-31 10:00",
            "2021-02-01 10:00",
            "2021-02-28 23:59",
            "2021-03-01 00:00",
            "2021-03-31 10:00",
            "2021-04-30 10:00",
            "2021-05-01 10:00",
        ],
        kept: &[
            "2021-01-31 10:00",
            "2021-02-28 23:59",
            "2021-03-31 10:00",
            "2021-04-30 10:00",
            "2021-05-01 10:00",
        ],
    },
    Case {
        what: "February 29 is a day of its own and of February",
        options: "--keep-daily 2",
        tz: "UTC",
        history: &[
            "2020-02-28 23:00",
            "2020-02-29 01:00",
            "2020-02-29 22:00",
            "2020-03-01 00:30",
        ],
        kept: &["2020-02-29 22:00", "2020-03-01 00:30"],
    },
    Case {
        what: "leap February as a month",
        options: "--keep-monthly 2",
        tz: "UTC",
        history: &["2020-02-28 23:00", "2020-02-29 23:00", "2020-03-01 00:30"],
        kept: &["2020-02-29 23:00", "2020-03-01 00:30"],
    },
    Case {
        what: "a month end in UTC is the next month in Berlin (UTC)",
        options: "--keep-monthly 2",
        tz: "UTC",
        history: &["2021-03-15 12:00", "2021-04-30 21:30", "2021-04-30 22:30"],
        kept: &["2021-03-15 12:00", "2021-04-30 22:30"],
    },
    Case {
        what: "a month end in UTC is the next month in Berlin (Berlin)",
        options: "--keep-monthly 2",
        tz: "Europe/Berlin",
        history: &["2021-03-15 12:00", "2021-04-30 21:30", "2021-04-30 22:30"],
        kept: &["2021-04-30 21:30", "2021-04-30 22:30"],
    },
    // ISO week 53: 2020-W53 is Mon 2020-12-28 to Sun 2021-01-03.
    Case {
        what: "2020-W53 spans the new year",
        options: "--keep-weekly 3",
        tz: "UTC",
        history: &[
            "2020-12-27 12:00",
            "2020-12-28 12:00",
            "2020-12-31 12:00",
            "2021-01-01 12:00",
            "2021-01-03 12:00",
            "2021-01-04 12:00",
        ],
        kept: &["2020-12-27 12:00", "2021-01-03 12:00", "2021-01-04 12:00"],
    },
    Case {
        what: "2026-W53 spans the new year",
        options: "--keep-weekly 3",
        tz: "UTC",
        history: &[
            "2026-12-27 12:00",
            "2026-12-28 12:00",
            "2027-01-01 12:00",
            "2027-01-03 23:59",
            "2027-01-04 00:00",
        ],
        kept: &["2026-12-27 12:00", "2027-01-03 23:59", "2027-01-04 00:00"],
    },
    Case {
        what: "the ISO week of a Sunday evening in Berlin",
        options: "--keep-weekly 2",
        tz: "Europe/Berlin",
        // 2027-01-03 23:30Z is Monday 00:30 in Berlin: week 1 of 2027.
        history: &["2026-12-30 12:00", "2027-01-03 22:30", "2027-01-03 23:30"],
        kept: &["2027-01-03 22:30", "2027-01-03 23:30"],
    },
    // Year change.
    Case {
        what: "year change (UTC)",
        options: "--keep-yearly 2",
        tz: "UTC",
        history: &["2020-12-31 22:30", "2020-12-31 23:30", "2021-06-01 12:00"],
        kept: &["2020-12-31 23:30", "2021-06-01 12:00"],
    },
    Case {
        what: "year change (Berlin: 23:30Z is already 2021)",
        options: "--keep-yearly 2",
        tz: "Europe/Berlin",
        history: &["2020-12-31 22:30", "2020-12-31 23:30", "2021-06-01 12:00"],
        kept: &["2020-12-31 22:30", "2021-06-01 12:00"],
    },
    // DST in Berlin: 2021-03-28 02:00 CET -> 03:00 CEST (01:00Z); 2021-10-31 03:00 CEST ->
    // 02:00 CET (01:00Z).
    Case {
        what: "the hour 02:00-03:00 happens twice on 2021-10-31 in Berlin: one period",
        options: "--keep-hourly 3",
        tz: "Europe/Berlin",
        history: &[
            "2021-10-31 00:10",
            "2021-10-31 00:40",
            "2021-10-31 01:10",
            "2021-10-31 01:40",
            "2021-10-31 02:10",
        ],
        // 02:10Z is 03:10 CET; 01:40Z, 01:10Z, 00:40Z and 00:10Z are all 02:xx; the
        // oldest is kept because the rule has count left.
        kept: &["2021-10-31 00:10", "2021-10-31 01:40", "2021-10-31 02:10"],
    },
    Case {
        what: "the same hours in UTC are three periods",
        options: "--keep-hourly 3",
        tz: "UTC",
        history: &[
            "2021-10-31 00:10",
            "2021-10-31 00:40",
            "2021-10-31 01:10",
            "2021-10-31 01:40",
            "2021-10-31 02:10",
        ],
        kept: &["2021-10-31 00:40", "2021-10-31 01:40", "2021-10-31 02:10"],
    },
    Case {
        what: "the 23-hour day 2021-03-28 in Berlin",
        options: "--keep-daily 2",
        tz: "Europe/Berlin",
        // 03-27 23:30Z is 03-28 00:30 CET; 03-28 21:30Z is 23:30 CEST; 22:30Z is 03-29.
        history: &["2021-03-27 23:30", "2021-03-28 21:30", "2021-03-28 22:30"],
        kept: &["2021-03-28 21:30", "2021-03-28 22:30"],
    },
    Case {
        what: "the same backups by UTC days",
        options: "--keep-daily 2",
        tz: "UTC",
        history: &["2021-03-27 23:30", "2021-03-28 21:30", "2021-03-28 22:30"],
        kept: &["2021-03-27 23:30", "2021-03-28 22:30"],
    },
    Case {
        what: "the 25-hour day 2021-10-31 in Berlin",
        options: "--keep-daily 2",
        tz: "Europe/Berlin",
        // 10-30 22:30Z is 10-31 00:30 CEST; 10-31 22:30Z is 23:30 CET; 23:30Z is 11-01.
        history: &["2021-10-30 22:30", "2021-10-31 22:30", "2021-10-31 23:30"],
        kept: &["2021-10-31 22:30", "2021-10-31 23:30"],
    },
    Case {
        what: "within 1d across the spring change in Berlin is 23 hours",
        options: "--keep-within 1d",
        tz: "Europe/Berlin",
        history: &["2021-03-27 10:30", "2021-03-27 11:30", "2021-03-28 10:00"],
        kept: &["2021-03-27 11:30", "2021-03-28 10:00"],
    },
    Case {
        what: "within 1d in UTC is 24 hours",
        options: "--keep-within 1d",
        tz: "UTC",
        history: &["2021-03-27 09:30", "2021-03-27 10:30", "2021-03-28 10:00"],
        kept: &["2021-03-27 10:30", "2021-03-28 10:00"],
    },
    // Dense and sparse histories.
    Case {
        what: "several backups a day: the newest of each day",
        options: "--keep-daily 3",
        tz: "UTC",
        history: &[
            "2021-05-01 01:00",
            "2021-05-01 13:00",
            "2021-05-01 23:59",
            "2021-05-02 00:00",
            "2021-05-02 12:00",
            "2021-05-03 00:01",
            "2021-05-03 06:00",
            "2021-05-03 12:00",
            "2021-05-03 18:00",
        ],
        kept: &["2021-05-01 23:59", "2021-05-02 12:00", "2021-05-03 18:00"],
    },
    Case {
        what: "missing days do not count",
        options: "--keep-daily 3",
        tz: "UTC",
        history: &[
            "2021-05-01 12:00",
            "2021-05-02 12:00",
            "2021-05-05 12:00",
            "2021-05-09 12:00",
            "2021-05-10 12:00",
        ],
        kept: &["2021-05-05 12:00", "2021-05-09 12:00", "2021-05-10 12:00"],
    },
    Case {
        what: "rules count on their own, also what another rule keeps",
        options: "--keep-daily 2 --keep-weekly 2",
        tz: "UTC",
        // Wed 05-05, Thu 05-06 (W18), Mon 05-10, Tue 05-11 (W19): daily keeps 05-11 and
        // 05-10, weekly keeps 05-11 (W19) and 05-06 (W18).
        history: &[
            "2021-05-05 12:00",
            "2021-05-06 12:00",
            "2021-05-10 12:00",
            "2021-05-11 12:00",
        ],
        kept: &["2021-05-06 12:00", "2021-05-10 12:00", "2021-05-11 12:00"],
    },
    Case {
        what: "keep-last counts backups, not periods",
        options: "--keep-last 3",
        tz: "UTC",
        history: &[
            "2021-05-01 01:00",
            "2021-05-01 02:00",
            "2021-05-01 03:00",
            "2021-05-01 04:00",
        ],
        kept: &["2021-05-01 02:00", "2021-05-01 03:00", "2021-05-01 04:00"],
    },
    // within, measured from the newest backup (not from now), across months.
    Case {
        what: "within 1m from March 31: the cutoff rolls over to March 3",
        options: "--keep-within 1m",
        tz: "UTC",
        history: &[
            "2021-02-28 12:00",
            "2021-03-03 12:00",
            "2021-03-03 13:00",
            "2021-03-31 12:00",
        ],
        kept: &["2021-03-03 13:00", "2021-03-31 12:00"],
    },
    Case {
        what: "within 1m from March 15: February 15, exclusive",
        options: "--keep-within 1m",
        tz: "UTC",
        history: &["2021-02-15 12:00", "2021-02-15 12:01", "2021-03-15 12:00"],
        kept: &["2021-02-15 12:01", "2021-03-15 12:00"],
    },
    Case {
        what: "within 2w3d12h",
        options: "--keep-within 2w3d12h",
        tz: "UTC",
        history: &["2021-04-12 23:59", "2021-04-13 00:01", "2021-04-30 12:00"],
        kept: &["2021-04-13 00:01", "2021-04-30 12:00"],
    },
    Case {
        what: "within-daily: the newest of each day within the span",
        options: "--keep-within-daily 2d",
        tz: "UTC",
        history: &[
            "2021-04-27 12:00",
            "2021-04-28 13:00",
            "2021-04-29 08:00",
            "2021-04-29 20:00",
            "2021-04-30 10:00",
            "2021-04-30 12:00",
        ],
        kept: &["2021-04-28 13:00", "2021-04-29 20:00", "2021-04-30 12:00"],
    },
    // Unlimited, and the oldest backup rule.
    Case {
        what: "unlimited daily: the newest of every day, and the oldest",
        options: "--keep-daily -1",
        tz: "UTC",
        history: &[
            "2019-01-01 01:00",
            "2019-01-01 02:00",
            "2019-06-01 02:00",
            "2020-01-01 02:00",
            "2020-01-01 03:00",
        ],
        kept: &[
            "2019-01-01 01:00",
            "2019-01-01 02:00",
            "2019-06-01 02:00",
            "2020-01-01 03:00",
        ],
    },
    Case {
        what: "unlimited last keeps everything",
        options: "--keep-last -1",
        tz: "UTC",
        history: &["2019-01-01 01:00", "2019-01-01 02:00", "2020-01-01 03:00"],
        kept: &["2019-01-01 01:00", "2019-01-01 02:00", "2020-01-01 03:00"],
    },
    Case {
        what: "a rule with count left keeps the oldest backup",
        options: "--keep-daily 7",
        tz: "UTC",
        history: &[
            "2021-05-01 06:00",
            "2021-05-01 18:00",
            "2021-05-02 18:00",
            "2021-05-03 18:00",
        ],
        kept: &[
            "2021-05-01 06:00",
            "2021-05-01 18:00",
            "2021-05-02 18:00",
            "2021-05-03 18:00",
        ],
    },
    Case {
        what: "a rule whose count ran out does not",
        options: "--keep-daily 3",
        tz: "UTC",
        history: &[
            "2021-05-01 06:00",
            "2021-05-01 18:00",
            "2021-05-02 18:00",
            "2021-05-03 18:00",
        ],
        kept: &["2021-05-01 18:00", "2021-05-02 18:00", "2021-05-03 18:00"],
    },
    Case {
        what: "a within-<period> rule keeps the oldest backup when its span reaches it",
        options: "--keep-within-daily 10d",
        tz: "UTC",
        history: &["2021-05-01 06:00", "2021-05-01 18:00", "2021-05-03 18:00"],
        kept: &["2021-05-01 06:00", "2021-05-01 18:00", "2021-05-03 18:00"],
    },
    Case {
        what: "and not when the oldest backup is older than its span",
        options: "--keep-within-daily 2d",
        tz: "UTC",
        history: &[
            "2021-04-20 06:00",
            "2021-05-02 06:00",
            "2021-05-02 18:00",
            "2021-05-03 18:00",
        ],
        kept: &["2021-05-02 18:00", "2021-05-03 18:00"],
    },
    Case {
        what: "the rolling preset: 6 daily, 4 weekly, 1 monthly",
        options: "--rolling",
        tz: "UTC",
        // Daily backups from Sun 04-04 to Fri 04-30, 2021 (W13 .. W17); plus March 31.
        history: &[
            "2021-03-31 03:00",
            "2021-04-04 03:00",
            "2021-04-05 03:00",
            "2021-04-11 03:00",
            "2021-04-12 03:00",
            "2021-04-18 03:00",
            "2021-04-19 03:00",
            "2021-04-24 03:00",
            "2021-04-25 03:00",
            "2021-04-26 03:00",
            "2021-04-27 03:00",
            "2021-04-28 03:00",
            "2021-04-29 03:00",
            "2021-04-30 03:00",
        ],
        // daily: 04-30 .. 04-25; weekly: 04-30 (W17), 04-25 (W16), 04-18 (W15), 04-11 (W14);
        // monthly: 04-30.
        kept: &[
            "2021-04-11 03:00",
            "2021-04-18 03:00",
            "2021-04-25 03:00",
            "2021-04-26 03:00",
            "2021-04-27 03:00",
            "2021-04-28 03:00",
            "2021-04-29 03:00",
            "2021-04-30 03:00",
        ],
    },
];

#[test]
fn policy_table() {
    let mut failures = Vec::new();
    for case in CASES {
        let got = kept(case.options, case.tz, case.history);
        if got != case.kept {
            let decisions = run_policy(case.options, case.tz, "2100-01-01T00:00:00Z", case.history);
            let detail: Vec<String> = case
                .history
                .iter()
                .zip(decisions)
                .map(|(h, d)| format!("  {h}  {}  {:?}", if d.keep { "kept  " } else { "pruned" }, d.reasons))
                .collect();
            failures.push(format!(
                "{} ({} in {}):\n  expected {:?}\n  got      {:?}\n{}",
                case.what,
                case.options,
                case.tz,
                case.kept,
                got,
                detail.join("\n")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The snapshots of restic's TestApplyPolicy (restic/restic, internal/data/snapshot_policy_test.go;
/// internal/restic/ before 0.17), in its order, UTC.
const RESTIC_HISTORY: &[&str] = &[
    "2014-09-01 10:20:30",
    "2014-09-02 10:20:30",
    "2014-09-05 10:20:30",
    "2014-09-06 10:20:30",
    "2014-09-08 10:20:30",
    "2014-09-09 10:20:30",
    "2014-09-10 10:20:30",
    "2014-09-11 10:20:30",
    "2014-09-20 10:20:30",
    "2014-09-22 10:20:30",
    "2014-08-08 10:20:30",
    "2014-08-10 10:20:30",
    "2014-08-12 10:20:30",
    "2014-08-13 10:20:30",
    "2014-08-13 10:20:30.1",
    "2014-08-15 10:20:30",
    "2014-08-18 10:20:30",
    "2014-08-20 10:20:30",
    "2014-08-21 10:20:30",
    "2014-08-22 10:20:30",
    "2014-10-01 10:20:30",
    "2014-10-02 10:20:30",
    "2014-10-05 10:20:30",
    "2014-10-06 10:20:30",
    "2014-10-08 10:20:30",
    "2014-10-09 10:20:30",
    "2014-10-10 10:20:30",
    "2014-10-11 10:20:30",
    "2014-10-20 10:20:30",
    "2014-10-22 10:20:30",
    "2014-11-08 10:20:30",
    "2014-11-10 10:20:30",
    "2014-11-12 10:20:30",
    "2014-11-13 10:20:30",
    "2014-11-13 10:20:30.1",
    "2014-11-15 10:20:30",
    "2014-11-18 10:20:30",
    "2014-11-20 10:20:30",
    "2014-11-21 10:20:30",
    "2014-11-22 10:20:30",
    "2015-09-01 10:20:30",
    "2015-09-02 10:20:30",
    "2015-09-05 10:20:30",
    "2015-09-06 10:20:30",
    "2015-09-08 10:20:30",
    "2015-09-09 10:20:30",
    "2015-09-10 10:20:30",
    "2015-09-11 10:20:30",
    "2015-09-20 10:20:30",
    "2015-09-22 10:20:30",
    "2015-08-08 10:20:30",
    "2015-08-10 10:20:30",
    "2015-08-12 10:20:30",
    "2015-08-13 10:20:30",
    "2015-08-13 10:20:30.1",
    "2015-08-15 10:20:30",
    "2015-08-18 10:20:30",
    "2015-08-20 10:20:30",
    "2015-08-21 10:20:30",
    "2015-08-22 10:20:30",
    "2015-10-01 10:20:30",
    "2015-10-02 10:20:30",
    "2015-10-05 10:20:30",
    "2015-10-06 10:20:30",
    "2015-10-08 10:20:30",
    "2015-10-09 10:20:30",
    "2015-10-10 10:20:30",
    "2015-10-11 10:20:30",
    "2015-10-20 10:20:30",
    "2015-10-22 10:20:30",
    "2015-10-22 10:20:30",
    "2015-10-22 10:20:30",
    "2015-10-22 10:20:30",
    "2015-10-22 10:20:30",
    "2015-11-08 10:20:30",
    "2015-11-10 10:20:30",
    "2015-11-12 10:20:30",
    "2015-11-13 10:20:30",
    "2015-11-13 10:20:30.1",
    "2015-11-15 10:20:30",
    "2015-11-18 10:20:30",
    "2015-11-20 10:20:30",
    "2015-11-21 10:20:30",
    "2015-11-22 10:20:30",
    "2016-01-01 01:02:03",
    "2016-01-01 01:03:03",
    "2016-01-01 07:08:03",
    "2016-01-03 07:02:03",
    "2016-01-04 10:23:03",
    "2016-01-04 11:23:03",
    "2016-01-04 12:23:03",
    "2016-01-04 12:24:03",
    "2016-01-04 12:28:03",
    "2016-01-04 12:30:03",
    "2016-01-04 16:23:03",
    "2016-01-05 09:02:03",
    "2016-01-06 08:02:03",
    "2016-01-07 10:02:03",
    "2016-01-08 20:02:03",
    "2016-01-09 21:02:03",
    "2016-01-12 21:02:03",
    "2016-01-12 21:08:03",
    "2016-01-18 12:02:03",
];

/// One of restic's golden files for a within-<period> policy: the snapshots it keeps.
struct Golden {
    /// testdata/policy_keep_snapshots_<n>, whose policy is the n-th of TestApplyPolicy.
    file: &'static str,
    options: &'static str,
    kept: &'static [&'static str],
}

/// restic's golden output (restic >= 0.16, which keeps the oldest snapshot in within-*
/// rules too) for every within-<period> policy of TestApplyPolicy: files 30 to 35 of
/// restic/restic internal/data/testdata (31, 34 and 35 as stored in internal/restic/testdata).
const RESTIC_WITHIN_GOLDEN: &[Golden] = &[
    Golden {
        file: "policy_keep_snapshots_30",
        options: "--keep-within-hourly 1y2m3d3h",
        kept: &[
            "2016-01-18 12:02:03",
            "2016-01-12 21:08:03",
            "2016-01-09 21:02:03",
            "2016-01-08 20:02:03",
            "2016-01-07 10:02:03",
            "2016-01-06 08:02:03",
            "2016-01-05 09:02:03",
            "2016-01-04 16:23:03",
            "2016-01-04 12:30:03",
            "2016-01-04 11:23:03",
            "2016-01-04 10:23:03",
            "2016-01-03 07:02:03",
            "2016-01-01 07:08:03",
            "2016-01-01 01:03:03",
            "2015-11-22 10:20:30",
            "2015-11-21 10:20:30",
            "2015-11-20 10:20:30",
            "2015-11-18 10:20:30",
            "2015-11-15 10:20:30",
            "2015-11-13 10:20:30.1",
            "2015-11-12 10:20:30",
            "2015-11-10 10:20:30",
            "2015-11-08 10:20:30",
            "2015-10-22 10:20:30",
            "2015-10-20 10:20:30",
            "2015-10-11 10:20:30",
            "2015-10-10 10:20:30",
            "2015-10-09 10:20:30",
            "2015-10-08 10:20:30",
            "2015-10-06 10:20:30",
            "2015-10-05 10:20:30",
            "2015-10-02 10:20:30",
            "2015-10-01 10:20:30",
            "2015-09-22 10:20:30",
            "2015-09-20 10:20:30",
            "2015-09-11 10:20:30",
            "2015-09-10 10:20:30",
            "2015-09-09 10:20:30",
            "2015-09-08 10:20:30",
            "2015-09-06 10:20:30",
            "2015-09-05 10:20:30",
            "2015-09-02 10:20:30",
            "2015-09-01 10:20:30",
            "2015-08-22 10:20:30",
            "2015-08-21 10:20:30",
            "2015-08-20 10:20:30",
            "2015-08-18 10:20:30",
            "2015-08-15 10:20:30",
            "2015-08-13 10:20:30.1",
            "2015-08-12 10:20:30",
            "2015-08-10 10:20:30",
            "2015-08-08 10:20:30",
            "2014-11-22 10:20:30",
            "2014-11-21 10:20:30",
            "2014-11-20 10:20:30",
            "2014-11-18 10:20:30",
            "2014-11-15 10:20:30",
        ],
    },
    Golden {
        file: "policy_keep_snapshots_31",
        options: "--keep-within-daily 1y2m3d3h",
        kept: &[
            "2016-01-18 12:02:03",
            "2016-01-12 21:08:03",
            "2016-01-09 21:02:03",
            "2016-01-08 20:02:03",
            "2016-01-07 10:02:03",
            "2016-01-06 08:02:03",
            "2016-01-05 09:02:03",
            "2016-01-04 16:23:03",
            "2016-01-03 07:02:03",
            "2016-01-01 07:08:03",
            "2015-11-22 10:20:30",
            "2015-11-21 10:20:30",
            "2015-11-20 10:20:30",
            "2015-11-18 10:20:30",
            "2015-11-15 10:20:30",
            "2015-11-13 10:20:30.1",
            "2015-11-12 10:20:30",
            "2015-11-10 10:20:30",
            "2015-11-08 10:20:30",
            "2015-10-22 10:20:30",
            "2015-10-20 10:20:30",
            "2015-10-11 10:20:30",
            "2015-10-10 10:20:30",
            "2015-10-09 10:20:30",
            "2015-10-08 10:20:30",
            "2015-10-06 10:20:30",
            "2015-10-05 10:20:30",
            "2015-10-02 10:20:30",
            "2015-10-01 10:20:30",
            "2015-09-22 10:20:30",
            "2015-09-20 10:20:30",
            "2015-09-11 10:20:30",
            "2015-09-10 10:20:30",
            "2015-09-09 10:20:30",
            "2015-09-08 10:20:30",
            "2015-09-06 10:20:30",
            "2015-09-05 10:20:30",
            "2015-09-02 10:20:30",
            "2015-09-01 10:20:30",
            "2015-08-22 10:20:30",
            "2015-08-21 10:20:30",
            "2015-08-20 10:20:30",
            "2015-08-18 10:20:30",
            "2015-08-15 10:20:30",
            "2015-08-13 10:20:30.1",
            "2015-08-12 10:20:30",
            "2015-08-10 10:20:30",
            "2015-08-08 10:20:30",
            "2014-11-22 10:20:30",
            "2014-11-21 10:20:30",
            "2014-11-20 10:20:30",
            "2014-11-18 10:20:30",
            "2014-11-15 10:20:30",
        ],
    },
    Golden {
        file: "policy_keep_snapshots_32",
        options: "--keep-within-weekly 1y2m3d3h",
        kept: &[
            "2016-01-18 12:02:03",
            "2016-01-12 21:08:03",
            "2016-01-09 21:02:03",
            "2016-01-03 07:02:03",
            "2015-11-22 10:20:30",
            "2015-11-15 10:20:30",
            "2015-11-08 10:20:30",
            "2015-10-22 10:20:30",
            "2015-10-11 10:20:30",
            "2015-10-02 10:20:30",
            "2015-09-22 10:20:30",
            "2015-09-20 10:20:30",
            "2015-09-11 10:20:30",
            "2015-09-06 10:20:30",
            "2015-08-22 10:20:30",
            "2015-08-15 10:20:30",
            "2015-08-08 10:20:30",
            "2014-11-22 10:20:30",
            "2014-11-15 10:20:30",
        ],
    },
    Golden {
        file: "policy_keep_snapshots_33",
        options: "--keep-within-monthly 1y2m3d3h",
        kept: &[
            "2016-01-18 12:02:03",
            "2015-11-22 10:20:30",
            "2015-10-22 10:20:30",
            "2015-09-22 10:20:30",
            "2015-08-22 10:20:30",
            "2014-11-22 10:20:30",
        ],
    },
    Golden {
        file: "policy_keep_snapshots_34",
        options: "--keep-within-yearly 1y2m3d3h",
        kept: &["2016-01-18 12:02:03", "2015-11-22 10:20:30", "2014-11-22 10:20:30"],
    },
    Golden {
        file: "policy_keep_snapshots_35",
        options: "--keep-within 1h --keep-within-hourly 1d --keep-within-daily 7d --keep-within-weekly 1m \
                  --keep-within-monthly 1y --keep-within-yearly 9999y",
        // The last is restic's "oldest yearly within 9999y".
        kept: &[
            "2016-01-18 12:02:03",
            "2016-01-12 21:08:03",
            "2016-01-09 21:02:03",
            "2016-01-03 07:02:03",
            "2015-11-22 10:20:30",
            "2015-10-22 10:20:30",
            "2015-09-22 10:20:30",
            "2015-08-22 10:20:30",
            "2014-11-22 10:20:30",
            "2014-08-08 10:20:30",
        ],
    },
];

#[test]
fn within_rules_agree_with_restics_golden_files() {
    let utc = |s: &str| {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .and_utc()
    };
    let ids: Vec<String> = (0..RESTIC_HISTORY.len()).map(|i| format!("job.{i:03}")).collect();
    let dated: Vec<(&str, DateTime<Utc>)> = ids
        .iter()
        .map(String::as_str)
        .zip(RESTIC_HISTORY.iter().map(|s| utc(s)))
        .collect();
    let mut failures = Vec::new();
    for golden in RESTIC_WITHIN_GOLDEN {
        let decisions = decide(&policy(golden.options), &zone("UTC"), t("2100-01-01"), &dated);
        // Compared as sorted lists: restic keeps one of several snapshots of the same time.
        let mut got: Vec<DateTime<Utc>> = dated
            .iter()
            .zip(&decisions)
            .filter(|(_, d)| d.keep)
            .map(|(b, _)| b.1)
            .collect();
        let mut want: Vec<DateTime<Utc>> = golden.kept.iter().map(|s| utc(s)).collect();
        got.sort();
        want.sort();
        if got != want {
            let missing: Vec<_> = want.iter().filter(|t| !got.contains(t)).collect();
            let extra: Vec<_> = got.iter().filter(|t| !want.contains(t)).collect();
            failures.push(format!(
                "{} ({}): bk does not keep {missing:?}, keeps {extra:?} too",
                golden.file, golden.options
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "bk and restic's golden files differ:\n{}",
        failures.join("\n")
    );
    // The oldest snapshot is kept by the yearly rule only because it is the oldest.
    let oldest = dated.iter().position(|b| b.1 == utc("2014-08-08 10:20:30")).unwrap();
    let decisions = decide(
        &policy(RESTIC_WITHIN_GOLDEN[5].options),
        &zone("UTC"),
        t("2100-01-01"),
        &dated,
    );
    assert_eq!(decisions[oldest].reasons, ["oldest (yearly within 9999y)"]);
}

#[test]
fn reasons_name_every_rule_and_why_not() {
    let history = [
        "2026-11-01 00:15",
        "2026-11-20 00:15",
        "2026-11-21 00:15",
        "2026-11-21 12:00",
    ];
    let d = run_policy(
        "--keep-daily 1 --keep-weekly 2 --keep-monthly 1",
        "UTC",
        "2026-11-22T00:00:00Z",
        &history,
    );
    assert_eq!(d[3].reasons, ["daily 2026-11-21", "weekly 2026-W47", "monthly 2026-11"]);
    assert!(d[3].keep);
    assert!(!d[2].keep);
    assert_eq!(
        d[2].reasons,
        [
            "daily: 1 day kept already",
            "weekly 2026-W47 has a newer backup",
            "monthly: 1 month kept already"
        ]
    );
    // Sunday 2026-11-01 is in week 44: the second week kept.
    assert_eq!(d[0].reasons, ["weekly 2026-W44"]);
    assert!(!d[1].keep);

    let d = run_policy(
        "--keep-last 1 --keep-within 1d --keep-within-weekly 1w --keep-hourly 5",
        "UTC",
        "2026-11-22T00:00:00Z",
        &history,
    );
    assert_eq!(
        d[3].reasons,
        ["within 1d", "last", "hourly 2026-11-21T12", "weekly 2026-W47 within 1w"]
    );
    assert_eq!(d[2].reasons, ["within 1d", "hourly 2026-11-21T00"]);
    assert_eq!(d[0].reasons, ["hourly 2026-11-01T00"]);
    let d = run_policy(
        "--keep-daily 7",
        "UTC",
        "2030-01-01",
        &["2021-05-01 06:00", "2021-05-01 18:00"],
    );
    assert_eq!(d[0].reasons, ["oldest (daily)"], "count left: the oldest is kept");
    assert_eq!(d[1].reasons, ["daily 2021-05-01"]);
    assert_eq!(
        run_policy("--keep-within 1d --keep-last 1", "UTC", "2027-01-01", &history)[1].reasons,
        ["not within 1d of the newest", "last: the 1 newest are kept"]
    );
    assert_eq!(
        run_policy("--keep-within-daily 1d", "UTC", "2027-01-01", &history)[1].reasons,
        ["daily within 1d: too old"]
    );
    assert_eq!(
        run_policy("--keep-within-daily 2d", "UTC", "2027-01-01", &history)[2].reasons,
        ["daily 2026-11-21 within 2d has a newer backup"]
    );
}

#[test]
fn an_empty_policy_keeps_everything() {
    let history = ["2021-01-01 00:00", "2021-01-02 00:00", "2021-01-02 01:00"];
    for options in [
        "",
        "--keep-daily 0",
        "--keep-within 0d --keep-last 0",
        "--keep-within-daily 0h",
    ] {
        assert!(policy(options).is_empty(), "{options:?}");
        let d = run_policy(options, "UTC", "2030-01-01", &history);
        assert!(
            d.iter().all(|d| d.keep && d.reasons == [EMPTY_POLICY]),
            "{options:?}: {d:?}"
        );
    }
    assert!(run_policy("--keep-last 1", "UTC", "2030-01-01", &[]).is_empty());
}

#[test]
fn a_backup_in_the_future_is_kept_and_takes_no_part() {
    // "now" is 2021-05-10 12:00: the backup on 05-20 is in the future.
    let history = [
        "2021-05-08 12:00",
        "2021-05-09 12:00",
        "2021-05-10 11:00",
        "2021-05-20 12:00",
    ];
    let d = run_policy(
        "--keep-last 1 --keep-within 1d",
        "UTC",
        "2021-05-10T12:00:00Z",
        &history,
    );
    assert_eq!(
        d[3],
        Decision {
            keep: true,
            reasons: vec![IN_THE_FUTURE.into()]
        }
    );
    // keep-last 1 keeps the newest backup that is not in the future; within counts from it.
    assert_eq!(d[2].reasons, ["within 1d", "last"]);
    assert!(d[1].keep, "05-09 12:00 is within a day of 05-10 11:00");
    assert!(!d[0].keep);
    // Only future backups: all kept.
    let d = run_policy("--keep-last 1", "UTC", "2020-01-01", &history);
    assert!(d.iter().all(|d| d.keep && d.reasons == [IN_THE_FUTURE]));
}

#[test]
fn ties_are_broken_by_id() {
    let time = t("2021-05-10 12:00");
    let dated = [("job.b", time), ("job.a", time), ("job.c", time)];
    let d = decide(&policy("--keep-last 1"), &zone("UTC"), t("2030-01-01"), &dated);
    let kept: Vec<&str> = dated.iter().zip(&d).filter(|(_, d)| d.keep).map(|(b, _)| b.0).collect();
    assert_eq!(kept, ["job.c"]);
}

#[test]
fn durations() {
    let ok = [
        ("30d", (0, 0, 30, 0)),
        ("2w", (0, 0, 14, 0)),
        ("1y6m", (1, 6, 0, 0)),
        ("12h", (0, 0, 0, 12)),
        ("1y2m3d4h", (1, 2, 3, 4)),
        ("2w3d", (0, 0, 17, 0)),
        ("0d", (0, 0, 0, 0)),
    ];
    for (text, (y, m, d, h)) in ok {
        let s = Span::parse(text).unwrap();
        assert_eq!((s.years, s.months, s.days, s.hours), (y, m, d, h), "{text}");
        assert_eq!(s.to_string(), text);
    }
    for bad in [
        "",
        "d",
        "30",
        "3x",
        "-1d",
        "1.5d",
        "30 d",
        "1D",
        "999999999999999999999d",
        "200000y",
    ] {
        assert!(Span::parse(bad).is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn spans_count_back_on_the_calendar() {
    let cases = [
        ("2021-03-31T12:00:00Z", "1m", "UTC", "2021-03-03T12:00:00Z"),
        ("2020-03-31T12:00:00Z", "1m", "UTC", "2020-03-02T12:00:00Z"),
        ("2021-03-15T12:00:00Z", "1y6m", "UTC", "2019-09-15T12:00:00Z"),
        ("2021-01-05T00:00:00Z", "1w", "UTC", "2020-12-29T00:00:00Z"),
        ("2021-03-01T06:00:00Z", "1d12h", "UTC", "2021-02-27T18:00:00Z"),
        ("2024-02-29T00:00:00Z", "1y", "UTC", "2023-03-01T00:00:00Z"),
        // One calendar day across the spring change in Berlin is 23 hours, across the autumn
        // change 25.
        ("2021-03-28T10:00:00Z", "1d", "Europe/Berlin", "2021-03-27T11:00:00Z"),
        ("2021-11-01T10:00:00Z", "1d", "Europe/Berlin", "2021-10-31T10:00:00Z"),
        ("2021-10-31T10:00:00Z", "1d", "Europe/Berlin", "2021-10-30T09:00:00Z"),
        ("2021-03-28T10:00:00Z", "24h", "Europe/Berlin", "2021-03-27T10:00:00Z"),
        // 02:30 did not happen on 2021-03-28 in Berlin: read with the winter offset.
        ("2021-03-29T00:30:00Z", "1d", "Europe/Berlin", "2021-03-28T01:30:00Z"),
        // 02:30 happened twice on 2021-10-31: the earlier one.
        ("2021-11-01T01:30:00Z", "1d", "Europe/Berlin", "2021-10-31T00:30:00Z"),
        ("2021-03-28T10:00:00Z", "100000y", "UTC", "-97979-03-28T10:00:00Z"),
    ];
    for (from, span, tz, expected) in cases {
        let got = Span::parse(span).unwrap().before(t(from), &zone(tz));
        assert_eq!(crate::name::rfc3339(got), expected, "{span} before {from} in {tz}");
    }
}

#[test]
fn options_make_the_policy() {
    assert_eq!(policy("--rolling"), Policy::rolling());
    assert_eq!(
        policy("--rolling --keep-daily 14 --keep-last 2"),
        Policy {
            last: 2,
            daily: 14,
            weekly: 4,
            monthly: 1,
            ..Policy::default()
        }
    );
    assert_eq!(policy("--keep-yearly -1").yearly, -1);
    assert_eq!(policy("--keep-yearly=-1").yearly, -1);
    for bad in [
        "--keep-daily -2",
        "--keep-daily x",
        "--keep-within 3x",
        "--keep-within-weekly -1d",
    ] {
        let args = std::iter::once("bk-prune").chain(bad.split_whitespace());
        assert!(Options::try_parse_from(args).is_err(), "{bad}");
    }
}

// ---------------------------------------------------------------------------------------
// Property test

/// xorshift64*: small, fixed-seed, good enough to generate histories.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn random_history(rng: &mut Rng) -> Vec<DateTime<Utc>> {
    let n = 1 + rng.below(60);
    let mut at = t("2019-06-01T00:00:00Z") + TimeDelta::seconds(rng.below(86_400 * 365) as i64);
    let mut history = Vec::new();
    for _ in 0..n {
        history.push(at);
        // Mostly daily, sometimes several a day, sometimes weeks missing.
        let step = match rng.below(10) {
            0..=5 => 86_400 + rng.below(3_600) as i64 - 1_800,
            6 | 7 => rng.below(6 * 3_600) as i64,
            8 => rng.below(40 * 86_400) as i64,
            _ => rng.below(3) as i64, // duplicates of a second, or nearly
        };
        at += TimeDelta::seconds(step);
    }
    history
}

fn random_policy(rng: &mut Rng) -> Policy {
    let count = |rng: &mut Rng| match rng.below(10) {
        0..=4 => 0,
        5 => -1,
        _ => 1 + rng.below(12) as i64,
    };
    let mut p = Policy {
        last: count(rng),
        hourly: count(rng),
        daily: count(rng),
        weekly: count(rng),
        monthly: count(rng),
        yearly: count(rng),
        ..Policy::default()
    };
    let units = ["h", "d", "w", "m", "y"];
    let span = |rng: &mut Rng| {
        rng.chance(20)
            .then(|| Span::parse(&format!("{}{}", rng.below(40), units[rng.below(5) as usize])).unwrap())
    };
    p.within = span(rng);
    p.within_hourly = span(rng);
    p.within_daily = span(rng);
    p.within_weekly = span(rng);
    p.within_monthly = span(rng);
    p.within_yearly = span(rng);
    p
}

#[test]
fn the_newest_is_always_kept_and_order_does_not_matter() {
    let zones = [
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "Australia/Lord_Howe",
        "Asia/Kathmandu",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..2_000 {
        let history = random_history(&mut rng);
        let policy = random_policy(&mut rng);
        let zone = zone(zones[rng.below(zones.len() as u64) as usize]);
        let newest_time = *history.iter().max().unwrap();
        // Sometimes "now" is before some backups.
        let now = if rng.chance(15) {
            newest_time - TimeDelta::seconds(rng.below(20 * 86_400) as i64)
        } else {
            newest_time + TimeDelta::seconds(rng.below(86_400) as i64)
        };
        let ids: Vec<String> = (0..history.len()).map(|i| format!("job.{i:03}")).collect();
        let dated: Vec<(&str, DateTime<Utc>)> = ids.iter().map(String::as_str).zip(history.iter().copied()).collect();
        let decisions = decide(&policy, &zone, now, &dated);
        let context = || format!("round {round}: {policy:?} in {zone:?}, now {now}\n{dated:?}\n{decisions:?}");

        // The newest backup is kept (by time, then id), and the newest not in the future.
        let newest = (0..dated.len()).max_by_key(|&i| (dated[i].1, dated[i].0)).unwrap();
        assert!(decisions[newest].keep, "newest not kept: {}", context());
        if let Some(newest_past) = (0..dated.len())
            .filter(|&i| dated[i].1 <= now)
            .max_by_key(|&i| (dated[i].1, dated[i].0))
        {
            assert!(decisions[newest_past].keep, "newest past not kept: {}", context());
        }
        // Every decision says why.
        assert!(decisions.iter().all(|d| !d.reasons.is_empty()), "{}", context());
        if policy.is_empty() {
            assert!(decisions.iter().all(|d| d.keep), "{}", context());
        }

        // The same decisions, per id, whatever the order of the listing.
        let mut shuffled = dated.clone();
        for i in (1..shuffled.len()).rev() {
            shuffled.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let again = decide(&policy, &zone, now, &shuffled);
        let by_id = |d: &[(&str, DateTime<Utc>)], dec: &[Decision]| -> BTreeMap<String, Decision> {
            d.iter().map(|b| b.0.to_string()).zip(dec.iter().cloned()).collect()
        };
        assert_eq!(by_id(&dated, &decisions), by_id(&shuffled, &again), "{}", context());
    }
}

#[test]
fn posix_tz_strings_as_chrono_reads_them() {
    for (tz, ok) in [
        ("UTC0", true),
        ("EST5", true),
        ("<+0330>-3:30", true),
        ("<-03>3", true),
        ("CET-1CEST,M3.5.0,M10.5.0/3", true),
        ("EST5EDT4,M3.2.0/2:00:00,M11.1.0/2:00:00", true),
        ("AAA3BBB,J60/2,300", true),
        ("NZST-12NZDT,M9.5.0,M4.1.0/3", true),
        ("UTC", false),
        ("AB0", false),
        ("ABCDEFGH0", false),
        ("UTC+", false),
        ("UTC24", false),
        ("IST-1GMT0", false),
        ("CET-1CEST", false),
        ("CET-1CEST,M13.5.0,M10.5.0", false),
        ("CET-1CEST,M3.6.0,M10.5.0", false),
        ("CET-1CEST,J0,M10.5.0", false),
        ("CET-1CEST,M3.5.0,M10.5.0/25", false),
        ("CET-1CEST,M3.5.0,M10.5.0,", false),
        ("<+03-3", false),
        ("Europe/Berlin", false),
    ] {
        assert_eq!(posix_tz(tz), ok, "{tz}");
    }
}
