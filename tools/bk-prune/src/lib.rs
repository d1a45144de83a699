//! bk-prune: deletes old backups by a retention policy with restic's `forget` semantics,
//! and says for every backup why it was kept or deleted.
//!
//! The policy engine is bk-core's pure `retention` module. The command around it finds the
//! backups (a store, or the artifact records on stdin), takes each name's lock, deletes, and
//! prints `kept` and `pruned` records.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use clap::Parser;
use serde_json::Value;

pub use bk_core::cli::Format;
use bk_core::cli::{LockOpts, S3Opts};
use bk_core::error::{Error, Result};
use bk_core::name::{parse_now, stamp_time, validate_name};
use bk_core::record::{Artifact, Input, Kept, Output, Pruned, Record};
use bk_core::retention::{decide, Decision, Policy, PolicyArgs, Zone, IN_THE_FUTURE};
use bk_core::store::Store;

/// How long a temporary file of a killed run stays before bk-prune removes it.
pub const LEFTOVER_AGE: TimeDelta = TimeDelta::days(1);

/// Delete old backups by a retention policy, saying why for each.
///
/// The rules are restic's forget: the backups of each name are taken newest first.
/// --keep-last N keeps the N newest. --keep-hourly, --keep-daily, --keep-weekly (ISO weeks),
/// --keep-monthly and --keep-yearly N keep the newest backup of each of the N most recent
/// hours, days, weeks, months or years that have a backup: periods without one do not
/// count. Each rule counts on its own, also backups another rule keeps, and a rule that
/// still has count left when it reaches the oldest backup keeps that one too. -1 means
/// unlimited. --keep-within DURATION keeps every backup made less than DURATION before the
/// newest backup (not before now); --keep-within-daily DURATION (and -hourly, -weekly,
/// -monthly, -yearly) keeps the newest backup of each day within DURATION, and the oldest
/// backup when it is within DURATION. Periods are those of --tz ZONE, the machine's zone by
/// default (a TZ that names no zone is refused); stamps stay UTC.
///
/// Prints a kept or pruned record for each backup, with reasons: every rule that keeps it
/// (["daily 2026-11-21","weekly 2026-W47"]), or why no rule does. The newest backup of a
/// name is never deleted; an empty policy deletes nothing; a backup dated in the future is
/// kept, with a warning. A backup is deleted manifest first, then artifact. Temporary files
/// of killed runs older than a day are removed and reported on stderr.
///
/// Only backups whose artifact is there, of the size its manifest says, are counted. A
/// broken one (a missing or resized artifact, an unreadable manifest) is an error record
/// (exit 65) and is never deleted; so is a backup a verified record with "ok":false earlier
/// in the pipeline names, which is kept and not counted. While such a backup is at least as
/// new as the newest good one, nothing of its name is deleted.
///
/// With artifact records on stdin (bk-dump ... | bk-prune --keep-daily 7) only their names
/// are pruned, in the stores the records came from (in STORE if one is given), and every
/// record read is passed on. An error record for a name means nothing is pruned for that
/// name, and exit 1; an error record without a name stops all pruning. Without artifact
/// records, bk-prune prunes the whole of STORE, or its --name. stdin is not read when it is
/// a terminal and STORE is given.
#[derive(Debug, Parser)]
#[command(
    name = "bk-prune",
    version,
    after_help = bk_core::cli::exit_status_help()
)]
pub struct Cli {
    /// The store to prune: a directory or file:// URL [default: the stores of the artifact
    /// records on stdin]
    pub store: Option<String>,
    /// Only the backups of this job name
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub keep: PolicyArgs,
    /// Delete nothing: print the same records, with "dry_run":true
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// The time zone whose days, weeks, months and years the rules count, e.g.
    /// Europe/Berlin or UTC [default: the machine's zone, from TZ or /etc/localtime; a TZ
    /// that names no zone is refused]
    #[arg(long, value_name = "ZONE", value_parser = Zone::parse)]
    pub tz: Option<Zone>,
    /// Take TIME as the current time, for tests and teaching: it decides which backups are
    /// in the future and how old temporary files are (RFC 3339, a stamp, YYYY-MM-DD HH:MM[:SS]
    /// in UTC, or a date: its end) [default: the clock]
    #[arg(long, value_name = "TIME", env = "BK_NOW", value_parser = parse_now)]
    pub now: Option<DateTime<Utc>>,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    #[command(flatten)]
    pub lock: LockOpts,
    #[command(flatten)]
    pub s3: S3Opts,
}

/// One line of `--format table`.
struct Row {
    id: String,
    time: String,
    decision: &'static str,
    reasons: String,
}

/// A backup that a `verified` record earlier in the pipeline says is bad: its id, and the
/// copy it was (`location`) if the record says.
struct FailedCheck {
    id: String,
    location: Option<String>,
}

impl FailedCheck {
    /// A `verified` record whose `ok` is anything but true, and that names a backup.
    fn of(input: &Input) -> Option<FailedCheck> {
        let Record::Verified(v) = &input.record else {
            return None;
        };
        if v.get("ok").and_then(Value::as_bool) == Some(true) {
            return None;
        }
        Some(FailedCheck {
            id: v.get("id")?.as_str()?.to_string(),
            location: v.get("location").and_then(Value::as_str).map(str::to_string),
        })
    }

    fn names(&self, a: &Artifact) -> bool {
        self.id == a.id && self.location.as_ref().is_none_or(|l| *l == a.location)
    }
}

/// The reason of a backup kept and not counted because its verification failed.
pub const FAILED_CHECK: &str = "not counted: its verification failed earlier in the pipeline";

/// What one run does, shared by every name it prunes.
struct Pruner {
    policy: Policy,
    zone: Zone,
    now: DateTime<Utc>,
    /// Nothing is deleted: --dry-run, or an empty policy.
    dry_run: bool,
    format: Format,
    failed_checks: Vec<FailedCheck>,
    rows: Vec<Row>,
}

impl Pruner {
    /// Prunes one name in one store; the caller holds the name's lock. Only backups whose
    /// artifact is there with its size, and whose verification did not fail, are counted;
    /// the others are never deleted, and while one of them is at least as new as the newest
    /// counted backup, nothing of the name is.
    fn prune(&mut self, store: &dyn Store, name: &str, out: &mut Output) -> Result<()> {
        let tool = out.tool().to_string();
        let older_than: std::time::SystemTime = (self.now - LEFTOVER_AGE).into();
        for path in store.remove_leftovers(name, older_than, self.dry_run)? {
            let done = if self.dry_run { "would remove" } else { "removed" };
            eprintln!(
                "{tool}: warning: {name}: {done} {path}: the temporary file of an unfinished run, older than a day"
            );
        }
        let listing = store.list(Some(name))?;
        for leftover in &listing.leftovers {
            eprintln!("{tool}: warning: {leftover}");
        }
        // Backups that cannot be trusted, with when they were made (None: cannot tell) and
        // what is wrong, newest first.
        let mut suspects: Vec<(&str, Option<DateTime<Utc>>, &str)> = Vec::new();
        for b in listing.broken.iter().filter(|b| b.name == name) {
            out.error(&b.error())?;
            suspects.push((&b.id, stamp_time(&b.id), "is broken"));
        }
        let artifacts: Vec<Artifact> = listing.artifacts.into_iter().filter(|a| a.name == name).collect();
        let mut times = Vec::with_capacity(artifacts.len());
        let mut counted = Vec::with_capacity(artifacts.len());
        for a in &artifacts {
            let time = a.made_at()?;
            let failed = self.failed_checks.iter().any(|f| f.names(a));
            times.push((time, !failed));
            if failed {
                suspects.push((&a.id, Some(time), "failed its verification"));
            } else {
                counted.push((a.id.as_str(), time));
            }
        }
        let mut decisions = decide(&self.policy, &self.zone, self.now, &counted).into_iter();
        // The newest backup failing means something is failing now (the disk, the dump, the
        // transfer): the older backups are what is left, so none is deleted.
        let newest_counted = counted.iter().map(|(_, t)| *t).filter(|t| *t <= self.now).max();
        suspects.sort_by_key(|s| std::cmp::Reverse(s.1));
        let hold = suspects
            .iter()
            .find(|(_, t, _)| t.is_none_or(|t| newest_counted.is_none_or(|n| t >= n)))
            .map(|(id, _, what)| {
                format!(
                    "held: the newest backup {id} {what}; nothing of {name} is deleted until it is repaired or removed"
                )
            });
        let mut held = 0;
        for (a, (time, is_counted)) in artifacts.iter().zip(times) {
            let d = if is_counted {
                let d = decisions.next().expect("a decision per counted backup");
                match &hold {
                    Some(reason) if !d.keep => {
                        held += 1;
                        Decision {
                            keep: true,
                            reasons: vec![reason.clone()],
                        }
                    }
                    _ => d,
                }
            } else {
                Decision {
                    keep: true,
                    reasons: vec![FAILED_CHECK.to_string()],
                }
            };
            if d.reasons.iter().any(|r| r == IN_THE_FUTURE) {
                eprintln!(
                    "{tool}: warning: {name}: {} is dated in the future ({} is after {}): kept; check the clocks",
                    a.id,
                    bk_core::name::rfc3339(time),
                    bk_core::name::rfc3339(self.now)
                );
            }
            if !d.keep && !self.dry_run {
                if let Err(e) = store.delete(a) {
                    out.error(&e.named(name))?;
                    continue;
                }
            }
            let record = if d.keep {
                Record::Kept(Kept {
                    id: a.id.clone(),
                    name: name.to_string(),
                    location: a.location.clone(),
                    reasons: d.reasons,
                })
            } else {
                Record::Pruned(Pruned {
                    id: a.id.clone(),
                    name: name.to_string(),
                    location: a.location.clone(),
                    reasons: d.reasons,
                    dry_run: self.dry_run,
                })
            };
            match self.format {
                Format::Json => out.emit(&record)?,
                Format::Table => self.rows.push(row(&record, self.zone.civil(time))),
            }
        }
        if let (Some(reason), true) = (&hold, held > 0) {
            eprintln!(
                "{tool}: warning: {name}: {held} backup(s) the policy would delete are kept: {}",
                reason.trim_start_matches("held: ")
            );
        }
        Ok(())
    }
}

fn row(record: &Record, wall: NaiveDateTime) -> Row {
    let (id, decision, reasons) = match record {
        Record::Kept(k) => (&k.id, "kept", &k.reasons),
        Record::Pruned(p) => (&p.id, if p.dry_run { "would prune" } else { "pruned" }, &p.reasons),
        _ => unreachable!("only decisions become rows"),
    };
    Row {
        id: id.clone(),
        time: wall.format("%a %Y-%m-%d %H:%M").to_string(),
        decision,
        reasons: reasons.join(", "),
    }
}

fn print_table(rows: &[Row], zone: &Zone, out: &mut Output) -> Result<()> {
    let header = [
        "ID".to_string(),
        format!("TIME ({})", zone.name()),
        "DECISION".to_string(),
        "REASONS".to_string(),
    ];
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|r| [r.id.clone(), r.time.clone(), r.decision.to_string(), r.reasons.clone()])
        .collect();
    for line in bk_core::table::aligned_lines(header, &cells) {
        out.text(&line)?;
    }
    Ok(())
}

impl bk_core::cli::Tool for Cli {
    fn prints_records(&self) -> bool {
        self.format == Format::Json
    }
}

pub fn run(cli: Cli, out: &mut Output) -> Result<()> {
    let config = cli.s3.store_config();
    let tool = out.tool().to_string();
    if let Some(n) = &cli.name {
        validate_name(n)?;
    }
    let zone = match cli.tz {
        Some(zone) => zone,
        None => Zone::from_env()?,
    };
    let named_store = cli
        .store
        .as_deref()
        .map(|url| bk_stores::open(url, &config))
        .transpose()?;
    // Everything on stdin is read before anything is done: a malformed line stops the run.
    let inputs: Vec<Input> = if named_store.is_some() {
        bk_core::cli::read_stdin_beside_store(out)?
    } else {
        bk_core::cli::read_stdin_records(
            out,
            "give a STORE, or pipe in artifact records (bk-dump ... | bk-prune --keep-daily 7)",
        )?
    };
    let mut failed_names = BTreeSet::new();
    let mut failed_all = false;
    for input in &inputs {
        if let Record::Error(e) = &input.record {
            match &e.name {
                Some(n) => {
                    failed_names.insert(n.clone());
                }
                None => failed_all = true,
            }
        }
        match cli.format {
            Format::Json => out.pass(input)?,
            Format::Table if matches!(input.record, Record::Error(_)) => out.upstream_failed(),
            Format::Table => {}
        }
    }
    for input in &inputs {
        if let (Record::Error(e), Format::Table) = (&input.record, cli.format) {
            let name = e.name.as_deref().map(|n| format!("{n}: ")).unwrap_or_default();
            eprintln!("{tool}: upstream error from {}: {name}{}", e.tool, e.message);
        }
    }

    // Which names to prune, and in which stores (by URL, each opened once).
    let wanted = |n: &str| cli.name.as_deref().is_none_or(|w| w == n);
    let incoming: Vec<&Artifact> = inputs
        .iter()
        .filter_map(|i| match &i.record {
            Record::Artifact(a) if wanted(&a.name) => Some(a),
            _ => None,
        })
        .collect();
    let mut stores: BTreeMap<String, Box<dyn Store>> = BTreeMap::new();
    let mut plan: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if let Some(s) = named_store {
        let names: BTreeSet<String> = if !incoming.is_empty() {
            incoming.iter().map(|a| a.name.clone()).collect()
        } else {
            let listing = s.list(cli.name.as_deref())?;
            // A name whose backups are all broken is pruned too: that is where they are reported.
            let names: BTreeSet<String> = listing
                .artifacts
                .into_iter()
                .map(|a| a.name)
                .chain(listing.broken.into_iter().map(|b| b.name))
                .collect();
            if let (Some(n), true) = (&cli.name, names.is_empty()) {
                return Err(Error::no_input(format!("no backup of {n} in {}", s.url())).named(n));
            }
            names
        };
        for n in names {
            plan.entry(n).or_default().insert(s.url());
        }
        stores.insert(s.url(), s);
    } else {
        for a in &incoming {
            let s = match bk_stores::open_location(a, &config) {
                Ok(s) => s,
                Err(e) => {
                    out.error(&e.named(&a.name))?;
                    continue;
                }
            };
            plan.entry(a.name.clone()).or_default().insert(s.url());
            stores.entry(s.url()).or_insert(s);
        }
        if incoming.is_empty() {
            eprintln!("{tool}: no artifact records on stdin: nothing to prune");
        }
    }

    let policy = cli.keep.policy();
    if policy.is_empty() {
        eprintln!("{tool}: warning: no --keep-* option: the policy is empty, nothing is deleted");
    }
    if failed_all {
        eprintln!("{tool}: nothing pruned: an upstream error record names no job, so any backup may have failed");
        plan.clear();
    }
    let mut pruner = Pruner {
        dry_run: cli.dry_run || policy.is_empty(),
        policy,
        zone,
        now: cli.now.unwrap_or_else(Utc::now),
        format: cli.format,
        failed_checks: inputs.iter().filter_map(FailedCheck::of).collect(),
        rows: Vec::new(),
    };
    for (name, urls) in &plan {
        if failed_names.contains(name) {
            eprintln!("{tool}: {name}: nothing pruned: its backup failed upstream (error record passed on)");
            continue;
        }
        // A dry run deletes nothing, so it need not wait for a dump of the name. `name` is a
        // valid name (a lock file name inside the lock directory): it came from --name
        // (validate_name), a parsed artifact record, or a store's listing, each validated.
        let _lock = if pruner.dry_run {
            None
        } else {
            match cli.lock.acquire(name) {
                Ok(lock) => Some(lock),
                Err(e) => {
                    out.error(&e)?;
                    continue;
                }
            }
        };
        for url in urls {
            if let Err(e) = pruner.prune(stores[url].as_ref(), name, out) {
                out.error(&e.named(name))?;
            }
        }
    }
    if cli.format == Format::Table {
        print_table(&pruner.rows, &pruner.zone, out)?;
    }
    Ok(())
}
