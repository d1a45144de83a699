//! bk-restore: puts a backup back, into the same or another place.

use std::path::PathBuf;

use clap::Parser;

use bk_core::cli::read_stdin_records;
use bk_core::codec::{check_digest, sha256_of, Decoder, Identities};
use bk_core::error::{Error, Result};
use bk_core::name::{parse_time, rfc3339, stamp, validate_name, DateIs};
use bk_core::progress::Progress;
use bk_core::record::{Artifact, Output, Record, Restored};
use bk_core::store::{Broken, Store, StoreConfig};

use bk_engines::{
    command, count_mismatch, files, influxdb, mongodb, mysql, postgres, sqlite, ReadOpts, RestoreOptions,
};

/// Restore a backup.
///
/// Takes the artifact record on stdin (as bk-dump or bk-ls print it), or picks a backup
/// from a store with --from. The artifact is checked while it is restored (sha256, full
/// decode, counts); a restore that fails a check leaves the target as it was. With --from, a
/// broken backup (an unreadable manifest, a missing or resized artifact file) is never
/// picked: a warning names one newer than the backup restored, and --id of one is 65.
#[derive(Debug, Parser)]
#[command(
    name = "bk-restore",
    version,
    after_help = bk_core::cli::exit_status_help()
)]
pub struct Cli {
    /// Pick the backup from this store instead of reading a record on stdin
    #[arg(long, value_name = "STORE")]
    pub from: Option<String>,
    /// With --from: the job name
    #[arg(long, requires = "from")]
    pub name: Option<String>,
    /// With --from: the newest backup (the default)
    #[arg(long, requires = "from", conflicts_with_all = ["id", "at"])]
    pub latest: bool,
    /// With --from: the backup with this id
    #[arg(long, requires = "from", conflicts_with = "at")]
    pub id: Option<String>,
    /// With --from: the newest backup started at or before TIME (RFC 3339, a stamp,
    /// YYYY-MM-DD HH:MM[:SS] in UTC, or a date: its end)
    #[arg(long, value_name = "TIME", requires = "from")]
    pub at: Option<String>,
    /// Where to restore: a directory for files backups, a file for SQLite and command backups
    /// ('-': a command backup's content to stdout, which then carries nothing else: no
    /// record, and records piped in are not passed on); database backups go to the server the
    /// connection options name
    #[arg(long, value_name = "TARGET")]
    pub to: Option<PathBuf>,
    /// Command backups: pipe the content into PROGRAM ARGS (after '--'), run without a
    /// shell, its stdout discarded; the stored bytes' sha256 is checked before it starts, and
    /// the restore fails (74) when it fails
    #[arg(long, requires = "program", conflicts_with = "to")]
    pub to_command: bool,
    /// The program of --to-command and its arguments
    #[arg(last = true, value_name = "PROGRAM", requires = "to_command")]
    pub program: Vec<std::ffi::OsString>,
    /// Restore into a target that is not empty (files are overwritten, directories merged;
    /// a SQLite or command backup's file is replaced; a database is replaced: MySQL loads and checks a
    /// bk_restore_* copy first, then swaps its tables in with one RENAME TABLE, the old ones
    /// kept in bk_old_* until the end; with --table only those tables are replaced).
    /// PostgreSQL: loaded and checked in a new database that takes the target's name only
    /// then, the old one dropped after; refused (75) while sessions are connected to it.
    /// MongoDB: each collection of the backup is loaded and checked under a temporary name,
    /// then renamed over its target; the database's other collections are left alone.
    /// InfluxDB: loaded and counted in a bk_restore_* database first, then the target is
    /// dropped and the backup restored again under its name (InfluxDB cannot rename)
    #[arg(long)]
    pub replace: bool,
    /// Database backups: restore into this database [default: the source's name]
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
    /// Database backups: restore only this table (MongoDB: collection; repeatable)
    #[arg(long, value_name = "TABLE", visible_alias = "collection")]
    pub table: Vec<String>,
    /// PostgreSQL: restore neither owners nor privileges (restoring where the roles differ)
    #[arg(long)]
    pub no_owner: bool,
    /// PostgreSQL custom format: run N pg_restore jobs in parallel (decodes to a temporary
    /// file first, as pg_restore needs one)
    #[arg(long, value_name = "N")]
    pub jobs: Option<u32>,
    #[command(flatten)]
    pub read: ReadOpts,
    /// Restore only the files matching GLOB (repeatable; as bk-dump files --include)
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
}

impl bk_core::cli::Tool for Cli {
    /// `--to -` makes stdout the restored content.
    fn prints_records(&self) -> bool {
        !self.to_stdout()
    }
}

impl Cli {
    fn to_stdout(&self) -> bool {
        self.to.as_deref() == Some(std::path::Path::new("-"))
    }
}

pub fn run(cli: Cli, out: &mut Output) -> Result<()> {
    let identities = cli.read.start()?;
    if let Some(at) = &cli.at {
        parse_time(at, DateIs::End)?; // a usage error before any store is opened
    }
    let (store, artifact) = match &cli.from {
        Some(url) => {
            let store = bk_stores::open(url, &cli.read.s3.store_config())?;
            let artifact = pick(store.as_ref(), &cli)?;
            (store, artifact)
        }
        None => match from_stdin(out, &cli.read.s3.store_config(), !cli.to_stdout())? {
            Some(found) => found,
            None => return Ok(()),
        },
    };
    let name = artifact.name.clone();
    restore(store.as_ref(), &artifact, &cli, &identities, out).map_err(|e| e.named(&name))
}

/// Reads the records on stdin: passes on what is not an artifact (unless `pass_on` is false:
/// stdout is then the restored content), and returns the one artifact to restore, or none
/// when an upstream tool failed.
fn from_stdin(out: &mut Output, config: &StoreConfig, pass_on: bool) -> Result<Option<(Box<dyn Store>, Artifact)>> {
    let inputs = read_stdin_records(
        out,
        "pipe an artifact record in (bk-ls STORE --latest | bk-restore ...) or use --from",
    )?;
    let mut chosen: Option<Artifact> = None;
    let mut upstream_failed = false;
    for input in &inputs {
        match &input.record {
            Record::Artifact(a) => match &chosen {
                Some(c) if c.id != a.id => {
                    return Err(Error::usage(format!(
                        "more than one backup on stdin ({} and {}); restore one at a time",
                        c.id, a.id
                    )))
                }
                Some(_) => {}
                None => chosen = Some(a.clone()),
            },
            Record::Error(_) => upstream_failed = true,
            _ => {}
        }
    }
    // What is not restored is passed on: everything, when an upstream tool failed.
    for input in inputs
        .iter()
        .filter(|i| upstream_failed || !matches!(i.record, Record::Artifact(_)))
    {
        if pass_on {
            out.pass(input)?;
        } else if matches!(input.record, Record::Error(_)) {
            out.upstream_failed();
        }
    }
    if upstream_failed {
        eprintln!("{}: an upstream tool failed; nothing restored", out.tool());
        return Ok(None);
    }
    let artifact = chosen.ok_or_else(|| Error::usage("no artifact record on stdin"))?;
    Ok(Some((bk_stores::open_location(&artifact, config)?, artifact)))
}

fn pick(store: &dyn Store, cli: &Cli) -> Result<Artifact> {
    let name = match (&cli.name, &cli.id) {
        (Some(n), _) => n.clone(),
        (None, Some(id)) => id.rsplit_once('.').map(|(n, _)| n.to_string()).unwrap_or_default(),
        (None, None) => return Err(Error::usage("--from needs --name NAME (or --id ID)")),
    };
    validate_name(&name)?;
    let listing = store.list(Some(&name))?;
    // The broken backups that could have been picked: the one of --id, or any up to --at.
    let (found, mut broken): (Option<Artifact>, Vec<Broken>) = if let Some(id) = &cli.id {
        let broken = listing.broken.into_iter().filter(|b| &b.id == id).collect();
        (listing.artifacts.into_iter().find(|a| &a.id == id), broken)
    } else if let Some(at) = &cli.at {
        let at = parse_time(at, DateIs::End)?;
        let limit = format!("{name}.{}", stamp(at));
        let at = rfc3339(at);
        let broken = listing.broken.into_iter().filter(|b| b.id <= limit).collect();
        (listing.artifacts.into_iter().rfind(|a| a.started <= at), broken)
    } else {
        (listing.artifacts.into_iter().next_back(), listing.broken)
    };
    broken.retain(|b| b.is_newer_than(found.as_ref()));
    let Some(found) = found else {
        // Nothing good to restore: the newest broken one says why.
        if let Some(b) = broken.last() {
            return Err(b.error());
        }
        let which = cli
            .id
            .clone()
            .or(cli.at.as_ref().map(|t| format!("at or before {t}")))
            .unwrap_or_default();
        return Err(
            Error::no_input(format!("no backup of {name} {which} in {}", store.url()).replace("  ", " ")).named(&name),
        );
    };
    for b in &broken {
        eprintln!(
            "bk-restore: warning: {name}: a newer backup {} is broken ({}); restoring {} instead",
            b.id, b.reason, found.id
        );
    }
    Ok(found)
}

fn restore(store: &dyn Store, artifact: &Artifact, cli: &Cli, identities: &Identities, out: &mut Output) -> Result<()> {
    let options = RestoreOptions {
        replace: cli.replace,
        include: cli.include.clone(),
        tables: cli.table.clone(),
        database: cli.database.clone(),
        conn: cli.read.conn.clone(),
        mysql: cli.read.mysql.clone(),
        mongo: cli.read.mongo.with(&cli.read.conn),
        influx: cli.read.influx.clone(),
        no_owner: cli.no_owner,
        jobs: cli.jobs,
    };
    if (cli.to_command || cli.to_stdout()) && artifact.engine != "command" {
        let to = if cli.to_command { "--to-command" } else { "--to -" };
        return Err(Error::usage(format!(
            "{} is a {} backup: {to} is for command backups",
            artifact.id, artifact.engine
        )));
    }
    let is_database = matches!(artifact.engine.as_str(), "mysql" | "postgres" | "mongodb" | "influxdb");
    let streamed_out = artifact.engine == "command" && (cli.to_command || cli.to_stdout());
    // InfluxDB: unpacked whole and checked before the server is touched (influxdb::restore).
    if (is_database && artifact.engine != "influxdb") || streamed_out {
        // A database is loaded, a program or stdout fed, as the bytes come: check them all
        // before the first one goes.
        check_stored(store.open(artifact)?, artifact)?;
    }
    let open = |a: &Artifact| Decoder::new(store.open(a)?, a, identities, Progress::new(&a.name, cli.read.quiet));
    let target = || -> Result<PathBuf> {
        let to = cli.to.as_ref().ok_or_else(|| {
            Error::usage(format!(
                "{} is a {} backup: give --to PATH",
                artifact.id, artifact.engine
            ))
        })?;
        std::path::absolute(to).map_err(|e| Error::io(to.display(), e))
    };
    let restored = match artifact.engine.as_str() {
        "files" if artifact.is_incremental() => {
            let chain = files::incremental::chain_of(store, artifact)?;
            files::restore_chain(
                &chain,
                open,
                &target()?,
                &options,
                files::incremental::Hashing::NamesOnly,
            )?
        }
        "files" => files::restore(artifact, open(artifact)?, &target()?, &options)?,
        "sqlite" => sqlite::restore(artifact, open(artifact)?, &target()?, &options)?,
        "mysql" => mysql::restore(artifact, open(artifact)?, &options)?,
        "postgres" => postgres::restore(artifact, open(artifact)?, &options)?,
        "mongodb" => mongodb::restore(artifact, open(artifact)?, &options)?,
        "influxdb" => influxdb::restore(artifact, open(artifact)?, &options)?,
        "command" => {
            let file;
            let to = if cli.to_command {
                command::Target::Program(&cli.program)
            } else if cli.to_stdout() {
                command::Target::Stdout
            } else {
                file = target()?;
                command::Target::File(&file)
            };
            command::restore(artifact, open(artifact)?, to, &options)?
        }
        other => {
            return Err(Error::usage(format!(
                "{}: this bk-restore cannot restore {other} backups",
                artifact.id
            )))
        }
    };
    let mismatch = is_database
        .then(|| count_mismatch(&artifact.counts, &restored.counts, &options.tables))
        .flatten();
    if cli.to_stdout() {
        if !cli.read.quiet {
            let counts: Vec<String> = restored.counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
            eprintln!("bk-restore: restored {} to stdout: {}", artifact.id, counts.join(", "));
        }
        return Ok(());
    }
    out.emit(&Record::Restored(Restored {
        id: artifact.id.clone(),
        name: artifact.name.clone(),
        engine: artifact.engine.clone(),
        target: restored.target,
        counts: restored.counts,
        complete: restored.complete,
    }))?;
    match mismatch {
        Some(m) => Err(Error::data(format!(
            "{}: the restored database differs from the backup: {m}",
            artifact.id
        ))),
        None => Ok(()),
    }
}

/// Reads the stored bytes once, to check their size and sha256 against the manifest.
fn check_stored(mut raw: Box<dyn std::io::Read>, artifact: &Artifact) -> Result<()> {
    let (sha, bytes) = sha256_of(&mut raw, &format!("reading {}", artifact.file))?;
    check_digest(artifact, bytes, &sha)
}
