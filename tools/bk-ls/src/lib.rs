//! bk-ls: lists the backups (manifests) in a store.

use chrono::{DateTime, TimeDelta, Utc};
use clap::Parser;

pub use bk_core::cli::Format;
use bk_core::error::{Error, Kind, Result};
use bk_core::name::{parse_now, rfc3339, validate_name};
use bk_core::progress::human_bytes;
use bk_core::record::{Artifact, Output, Record};
use bk_core::retention::{Span, Zone};
use bk_core::store::{self, newest_per_name, Listing, Store};

/// List the backups in a store.
///
/// Reads the manifests under STORE/<name>/ and prints one artifact record per complete
/// backup, oldest first within each name. Files without a manifest (left by a killed run, or
/// copied in by hand) are not backups: they are reported on stderr as warnings. A broken
/// backup (a manifest that cannot be read, or whose artifact file is missing or of another
/// size) is not listed as a backup either: it gets an error record (exit 65), and a BROKEN
/// row in the table.
///
/// --stale DURATION catches the job that did not run (cron stopped, host down, job removed):
/// every name whose newest backup was made more than DURATION ago, and every --name without
/// any backup, gets an error record (code 1) saying how old its newest backup is, and the
/// run exits 1; the listing is printed as without --stale. Run it from a second cron line, or
/// on the backup server, piped into bk-notify: bk-ls STORE --stale 26h --latest | bk-notify ...
#[derive(Debug, Parser)]
#[command(
    name = "bk-ls",
    version,
    after_help = bk_core::cli::exit_status_help()
)]
pub struct Cli {
    /// The store: a directory, file:// URL, s3://bucket/prefix, ssh://user@host[:port]/path,
    /// ftp:// or ftps://[user@]host[:port]/path, or rclone:remote:path
    pub store: String,
    /// Only the backups of this job name; repeat for several
    #[arg(long, value_name = "N")]
    pub name: Vec<String>,
    /// Only the newest backup of each name
    #[arg(long)]
    pub latest: bool,
    /// Report every name whose newest backup is older than DURATION (numbers with units y,
    /// m (months), w, d, h, e.g. 26h, 2d, 1w), and every --name without a backup: an error
    /// record each, exit 1
    #[arg(long, value_name = "DURATION", value_parser = Span::parse)]
    pub stale: Option<Span>,
    /// Take TIME as the current time, for tests and teaching: the time --stale counts back
    /// from (RFC 3339, a stamp, YYYY-MM-DD HH:MM[:SS] in UTC, or a date: its end) [default:
    /// the clock]
    #[arg(long, value_name = "TIME", env = "BK_NOW", value_parser = parse_now)]
    pub now: Option<DateTime<Utc>>,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    #[command(flatten)]
    pub s3: bk_core::cli::S3Opts,
}

impl bk_core::cli::Tool for Cli {
    fn prints_records(&self) -> bool {
        self.format == Format::Json
    }
}

pub fn run(cli: Cli, out: &mut Output) -> Result<()> {
    let mut names = cli.name.clone();
    names.sort();
    names.dedup();
    names.iter().try_for_each(|n| validate_name(n))?;
    let store = bk_stores::open(&cli.store, &cli.s3.store_config())?;
    let listing = list(store.as_ref(), &names)?;
    for leftover in &listing.leftovers {
        eprintln!("{}: warning: {leftover}", out.tool());
    }
    let stale = match &cli.stale {
        Some(span) => stale(
            &listing.artifacts,
            &names,
            span,
            cli.now.unwrap_or_else(Utc::now),
            store.as_ref(),
        )?,
        None => Vec::new(),
    };
    let mut artifacts = listing.artifacts;
    if cli.latest {
        artifacts = newest_per_name(artifacts);
    }
    let missing: Vec<Error> = match cli.stale {
        // Under --stale a name without a backup is stale, not a usage slip.
        Some(_) => Vec::new(),
        None => names
            .iter()
            .filter(|n| !artifacts.iter().any(|a| a.name == **n) && !listing.broken.iter().any(|b| b.name == **n))
            .map(|n| Error::no_input(format!("no backup of {n} in {}", store.url())).named(n))
            .collect(),
    };
    match cli.format {
        Format::Json => artifacts.into_iter().try_for_each(|a| out.emit(&Record::Artifact(a)))?,
        Format::Table => print_table(&artifacts, &listing.broken, out)?,
    }
    let broken = listing.broken.iter().map(store::Broken::error);
    missing
        .into_iter()
        .chain(broken)
        .chain(stale)
        .try_for_each(|e| out.error(&e))
}

/// The listing of the whole store, or of each of `names`.
fn list(store: &dyn Store, names: &[String]) -> Result<Listing> {
    if names.is_empty() {
        return store.list(None);
    }
    let mut all = Listing::default();
    for n in names {
        let one = store.list(Some(n))?;
        all.artifacts.extend(one.artifacts);
        all.broken.extend(one.broken);
        all.leftovers.extend(one.leftovers);
    }
    Ok(all)
}

/// An error for each name whose newest backup was made before `span` ago, and for each of
/// `names` without a backup.
fn stale(
    artifacts: &[Artifact],
    names: &[String],
    span: &Span,
    now: DateTime<Utc>,
    store: &dyn Store,
) -> Result<Vec<Error>> {
    let cutoff = span.before(now, &Zone::UTC);
    let newest = newest_per_name(artifacts.to_vec());
    let mut errors = Vec::new();
    for n in names.iter().filter(|n| !newest.iter().any(|a| a.name == **n)) {
        errors.push(stale_error(
            n,
            format!("no backup of {n} in {}, stale after {span}", store.url()),
        ));
    }
    for a in &newest {
        let made = a.made_at()?;
        if made < cutoff {
            errors.push(stale_error(
                &a.name,
                format!(
                    "no backup of {} for {}, stale after {span}: the newest, {}, was made {}",
                    a.name,
                    age(now - made),
                    a.id,
                    rfc3339(made)
                ),
            ));
        }
    }
    errors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(errors)
}

fn stale_error(name: &str, message: String) -> Error {
    Error::new(Kind::Upstream, message).named(name)
}

/// A time span as people say it: `3d 4h`, `5h 12m`, `40m`.
fn age(d: TimeDelta) -> String {
    let (days, hours, minutes) = (d.num_days(), d.num_hours() % 24, d.num_minutes() % 60);
    match (days, hours) {
        (0, 0) => format!("{minutes}m"),
        (0, _) => format!("{hours}h {minutes}m"),
        _ => format!("{days}d {hours}h"),
    }
}

fn print_table(artifacts: &[Artifact], broken: &[store::Broken], out: &mut Output) -> Result<()> {
    let header = ["ID", "ENGINE", "FINISHED", "SIZE", "CONTENT", "ENCRYPTED"].map(String::from);
    let mut rows: Vec<[String; 6]> = artifacts
        .iter()
        .map(|a| {
            [
                a.id.clone(),
                a.engine.clone(),
                a.finished.clone(),
                human_bytes(a.bytes),
                human_bytes(a.content_bytes),
                if a.encryption.is_some() { "age" } else { "no" }.to_string(),
            ]
        })
        .collect();
    rows.extend(broken.iter().map(|b| {
        [
            b.id.clone(),
            "BROKEN".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]
    }));
    for line in bk_core::table::aligned_lines(header, &rows) {
        out.text(&line)?;
    }
    Ok(())
}
