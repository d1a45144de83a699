//! bk-dump: one artifact per source, streamed through the codec into a store.

mod chain;

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use clap::{Parser, Subcommand};

use bk_core::cli::{LockOpts, S3Opts};
use bk_core::codec::{parse_recipient, read_recipients_file, Compression, EncodeOptions, Encoder};
use bk_core::error::{Error, Result};
use bk_core::name::{artifact_id, rfc3339, sanitize, validate_name};
use bk_core::progress::Progress;
use bk_core::record::{Artifact, Output, Record};
use bk_core::store::Store;

use bk_engines::{command, files, influxdb, mongodb, mysql, postgres, sqlite, DumpJob};

/// Back up a source into a store.
///
/// Streams the source through compression (and age encryption) into STORE/<name>/ under a
/// hidden temporary name, publishes it by rename, then writes its manifest. Prints one
/// artifact record per backup on stdout; on failure an error record, and nothing is left
/// in the store.
#[derive(Debug, Parser)]
#[command(
    name = "bk-dump",
    version,
    subcommand_required = true,
    after_help = bk_core::cli::exit_status_help()
)]
pub struct Cli {
    #[command(subcommand)]
    pub engine: Engine,
    /// The store to write to: a directory or file:// URL
    #[arg(long, value_name = "STORE", global = true)]
    pub to: Option<String>,
    /// The job name (letters a-z, digits, '_' and '-'); {engine}, {host} and {database} in it
    /// are replaced, e.g. '{engine}-{host}-{database}' [default: from the engine and source]
    #[arg(long, global = true)]
    pub name: Option<String>,
    /// Compression of the stored bytes [default: zstd; none for influxdb, whose shards are
    /// gzip'd already]
    #[arg(long, value_enum, global = true)]
    pub compress: Option<Compression>,
    /// Compression level [default: 3 for zstd (1-19), 6 for gzip (1-9)]
    #[arg(long, global = true)]
    pub level: Option<i32>,
    /// Encrypt with age to this recipient (age1...; repeatable)
    #[arg(long, value_name = "RECIPIENT", global = true)]
    pub encrypt_to: Vec<String>,
    /// Encrypt to every recipient listed in FILE (one age1... per line; repeatable)
    #[arg(long, value_name = "FILE", global = true)]
    pub recipients_file: Vec<PathBuf>,
    #[command(flatten)]
    pub lock: LockOpts,
    #[command(flatten)]
    pub s3: S3Opts,
    /// No progress on stderr
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Engine {
    /// Files and directories, as a tar (modes, owners, mtimes, links kept)
    ///
    /// One artifact, a tar with GNU headers, of every PATH: regular files, directories
    /// (empty ones too), symlinks (kept as links; a symlink named as a PATH is followed), hard
    /// links (stored once), FIFOs and device nodes, with their modes, owners and mtimes.
    /// Extended attributes and ACLs are not kept; sockets are skipped. Entries are named by
    /// their absolute path without the leading '/', as GNU tar does. The store is never
    /// archived into itself. A file or directory that vanishes while the dump runs is left
    /// out with a warning; one that shrinks is padded with zeros and one that grows is cut at its size when read, both
    /// with a warning. counts: {"entries": N}.
    Files(files::DumpArgs),
    /// A SQLite database, consistent while other processes write to it
    ///
    /// Reads every page of the database through the sqlite_dbpage virtual table inside one
    /// read transaction: a consistent snapshot while others write (WAL or rollback journal),
    /// streamed without an uncompressed temporary copy. The artifact is the database file
    /// itself. A writer holding the database locked for longer than --busy-timeout makes the
    /// dump exit 75. counts: rows per table.
    Sqlite(sqlite::DumpArgs),
    /// MySQL or MariaDB databases, one artifact each, with mariadb-dump or mysqldump
    ///
    /// Runs the system's mariadb-dump (or mysqldump) with --single-transaction --quick
    /// --routines --triggers --events --hex-blob, credentials from --defaults-file or
    /// ~/.my.cnf (mode 0600). The dump must end with its '-- Dump completed' line. counts:
    /// rows per `database.table`, counted in the dump's bytes as they pass (0 for empty
    /// tables). A backup user needs SELECT, LOCK TABLES, SHOW VIEW, TRIGGER and EVENT, and on
    /// MariaDB before 11.3 SELECT on mysql.proc for other definers' routines (bk-dump warns
    /// when it is missing); put no_tablespaces in the [mysqldump] section of its option file.
    Mysql(mysql::DumpArgs),
    /// PostgreSQL databases, one artifact each, with pg_dump (counts from the same snapshot)
    ///
    /// Runs the system's pg_dump (custom format, or --format plain) on a snapshot exported by
    /// bk's own REPEATABLE READ transaction, and counts every table in that same snapshot, so
    /// counts (rows per `schema.table`) are exactly what the dump holds. The password comes
    /// from ~/.pgpass or $PGPASSFILE (mode 0600). A backup role needs pg_read_all_data (or
    /// superuser); --globals needs a superuser.
    Postgres(postgres::DumpArgs),
    /// MongoDB databases, one artifact each, in mongodump's archive format (native driver)
    ///
    /// Reads each database with bk's own driver into the format of `mongodump --archive`, so
    /// that `zstd -dc FILE | mongorestore --archive` restores it: every collection's and
    /// view's options and indexes first, then the documents as the server's raw BSON bytes,
    /// never re-encoded. The connection URI (credentials, TLS options) comes from --uri-file
    /// (mode 0600), or --uri without a password, or --host/--port. On a replica set or mongos
    /// every collection of a database is read in one snapshot; a standalone server has none,
    /// so its dump is not point-in-time (said on stderr and in the artifact's source, as
    /// "consistency": "none"). System collections are left out, as mongodump does; a time
    /// series collection must be excluded. counts: documents per `database.collection`. A
    /// backup user needs the role backup (or read on each database).
    Mongodb(mongodb::DumpArgs),
    /// InfluxDB 1.x databases, one artifact each, with influxd backup -portable, tarred
    ///
    /// Runs the system's influxd backup -portable against the RPC port (--rpc-port, default
    /// 8088) into a private temporary directory (0700, removed whatever happens), and streams
    /// its files (the metadata, one gzip'd tar per shard, the manifest) into one tar: format
    /// influx-tar, restorable with `tar -x` and `influxd restore -portable`. A server that
    /// refuses the connection stops the backup at once (influxd would retry for minutes).
    /// The HTTP API (--host, --port, default 127.0.0.1:8086) lists the databases (all but
    /// _internal by default); its credentials, when authentication is on, come from
    /// --credentials-file (mode 0600). The shards are compressed already: the default
    /// compression is none. counts: field values per `database.measurement` (all retention
    /// policies), read from the TSM blocks of the shards in the artifact: one per series,
    /// field and timestamp, as SELECT count(*) sums them after a restore, so a point with three
    /// fields counts 3 and a sparse point only the fields it has. Values deleted on the server
    /// but not yet compacted away are in the shards and come back with influxd restore, which
    /// ignores tombstones: they are counted, and a warning says how many.
    Influxdb(influxdb::DumpArgs),
    /// Any program's stdout, e.g. pg_dumpall, slapcat, redis-cli --rdb - (--name required)
    ///
    /// Runs PROGRAM with its ARGS (after '--'), without a shell, in bk's environment, stdin
    /// empty; its stdout is the artifact, its stderr goes to bk's stderr. A non-zero exit, a
    /// signal, an empty output (unless --allow-empty) or an output whose last 4 KiB lack
    /// --end-marker fails the backup (exit 74; 69 when the program is missing), the exit status
    /// or the signal in the message, nothing stored. Secrets go through the environment or the
    /// program's own files, never its arguments, which the manifest keeps (URL passwords
    /// redacted). The file is <name>.<stamp>.<format>[.zst]. counts: {"bytes": N, "lines": M},
    /// M the newline characters (no lines with --no-count-lines). bk-restore writes it back
    /// with --to FILE, --to - (stdout) or --to-command -- PROGRAM ARGS.
    Command(command::DumpArgs),
}

impl Engine {
    /// `name` is --name, which the command engine requires.
    fn jobs(&self, store: &dyn Store, name: Option<&str>) -> Result<Vec<Box<dyn DumpJob>>> {
        Ok(match self {
            Engine::Files(args) => vec![Box::new(files::FilesJob::new(
                args.clone(),
                store.local_root().into_iter().collect(),
            )?)],
            Engine::Sqlite(args) => vec![Box::new(sqlite::SqliteJob::new(args.clone())?)],
            Engine::Mysql(args) => mysql::jobs(args)?,
            Engine::Postgres(args) => postgres::jobs(args)?,
            Engine::Mongodb(args) => mongodb::jobs(args)?,
            Engine::Influxdb(args) => influxdb::jobs(args)?,
            Engine::Command(args) => vec![Box::new(command::CommandJob::new(args.clone(), name)?)],
        })
    }
}

impl Engine {
    /// The backups' names that --name gives before the server is asked anything: a literal
    /// name, or a template filled in with each --database ({host} is the server's to say).
    fn names_before_jobs(&self, template: Option<&str>) -> Vec<String> {
        let Some(template) = template else {
            return Vec::new();
        };
        if !template.contains('{') {
            return vec![template.to_string()];
        }
        let (engine, databases) = match self {
            Engine::Mysql(args) => ("mysql", &args.databases),
            Engine::Postgres(args) => ("postgres", &args.databases),
            Engine::Mongodb(args) => ("mongodb", &args.databases),
            Engine::Influxdb(args) => ("influxdb", &args.databases),
            Engine::Files(_) | Engine::Sqlite(_) | Engine::Command(_) => return Vec::new(),
        };
        if template.contains("{host}") {
            return Vec::new();
        }
        databases
            .iter()
            .map(|d| fill_name(template, engine, "", d))
            .filter(|n| validate_name(n).is_ok())
            .collect()
    }
}

impl bk_core::cli::Tool for Cli {}

pub fn run(cli: Cli, out: &mut Output) -> Result<()> {
    let to = cli
        .to
        .as_deref()
        .ok_or_else(|| Error::usage("--to STORE is required"))?;
    if let Some(template) = &cli.name {
        // Checked before any work; the filled-in names are checked again.
        validate_name(
            &template
                .replace("{engine}", "e")
                .replace("{host}", "h")
                .replace("{database}", "d"),
        )?;
    }
    let base = encode_options(&cli)?;
    let store = bk_stores::open(to, &cli.s3.store_config())?;
    let jobs = match cli.engine.jobs(store.as_ref(), cli.name.as_deref()) {
        Ok(jobs) => jobs,
        // A failure before the jobs are known (a login refused, a database missing) is said
        // for each backup the command line names, so that bk-notify can tell whose it is.
        Err(e) => {
            let names = cli.engine.names_before_jobs(cli.name.as_deref());
            if names.is_empty() {
                return Err(e);
            }
            for name in &names {
                out.error(&Error::new(e.kind, e.message.clone()).named(name))?;
            }
            return Ok(());
        }
    };
    let names = job_names(&jobs, cli.name.as_deref())?;
    for (job, name) in jobs.iter().zip(names) {
        let options = EncodeOptions::new(
            cli.compress.unwrap_or(job.default_compression()),
            cli.level,
            base.recipients.clone(),
        );
        match options.and_then(|options| dump_one(job.as_ref(), &name, store.as_ref(), &options, &cli)) {
            Ok(artifact) => out.emit(&Record::Artifact(artifact))?,
            Err(e) => out.error(&e.named(&name))?,
        }
    }
    Ok(())
}

/// Each job's name: the engine's default, or --name with its placeholders filled in. Two
/// jobs may not share a name.
/// A --name template filled in: `{engine}`, `{host}` and `{database}` (the last two made
/// name-safe).
fn fill_name(template: &str, engine: &str, host: &str, database: &str) -> String {
    template
        .replace("{engine}", engine)
        .replace("{host}", &sanitize(host))
        .replace("{database}", &sanitize(database))
}

fn job_names(jobs: &[Box<dyn DumpJob>], template: Option<&str>) -> Result<Vec<String>> {
    let names: Vec<String> = jobs
        .iter()
        .map(|job| match template {
            None => job.default_name(),
            Some(t) => fill_name(t, job.engine(), &job.source().host, job.database().unwrap_or_default()),
        })
        .collect();
    for (i, name) in names.iter().enumerate() {
        validate_name(name)?;
        if names[..i].contains(name) {
            return Err(Error::usage(format!(
                "two backups would both be named {name}; put {{database}} in --name to tell them apart"
            )));
        }
    }
    Ok(names)
}

/// The options of --compress (zstd without it), --level and the recipients, checked before
/// any work; each job's compression may differ (`DumpJob::default_compression`).
fn encode_options(cli: &Cli) -> Result<EncodeOptions> {
    let mut recipients: Vec<_> = cli
        .encrypt_to
        .iter()
        .map(|r| parse_recipient(r))
        .collect::<Result<_>>()?;
    for file in &cli.recipients_file {
        recipients.extend(read_recipients_file(file)?);
    }
    EncodeOptions::new(cli.compress.unwrap_or(Compression::Zstd), cli.level, recipients)
}

fn dump_one(job: &dyn DumpJob, name: &str, store: &dyn Store, options: &EncodeOptions, cli: &Cli) -> Result<Artifact> {
    let _lock = cli.lock.acquire(name)?;
    let started = unused_stamp(store, name)?;
    let id = artifact_id(name, started);
    let plan = match job.full_every() {
        Some(every) => Some(chain::plan(store, name, &job.source().paths, &every, started)?),
        None => None,
    };
    let file = format!("{id}.{}{}", job.format(), options.suffix());
    let upload = store.create(name, &file)?;
    let mut encoder = Encoder::new(upload, options, Progress::new(name, cli.quiet))?;
    // GNU tar updates the snapshot file in place: a private copy, the state in the store
    // replaced only once the backup is complete.
    let work = plan
        .as_ref()
        .map(|_| bk_engines::WorkDir::new(None, "dump"))
        .transpose()?;
    // On error the encoder, and with it the upload, is dropped: the temporary file goes.
    let (dumped, tree) = match (&plan, &work) {
        (Some(plan), Some(work)) => {
            let snapshot = work.path.join("snapshot");
            if let Some((bytes, _)) = &plan.snapshot {
                std::fs::write(&snapshot, bytes).map_err(|e| Error::create(&snapshot, e))?;
            }
            let (dumped, tree) = job.dump_since(&mut encoder, &snapshot, plan.snapshot.as_ref().map(|(_, t)| t))?;
            (dumped, Some(tree))
        }
        _ => (job.dump(&mut encoder)?, None),
    };
    let encoded = encoder.finish()?;
    encoded.inner.commit()?;
    let (level, parent, chain) = plan.as_ref().map_or((None, None, None), |p| p.fields(&id));
    let artifact = Artifact {
        id,
        name: name.to_string(),
        engine: job.engine().to_string(),
        source: job.source(),
        started: rfc3339(started),
        finished: rfc3339(Utc::now()),
        location: store.location(name, &file),
        file,
        format: job.format().to_string(),
        compression: options.compression,
        encryption: options.encryption(),
        bytes: encoded.bytes,
        sha256: encoded.sha256,
        content_bytes: encoded.content_bytes,
        counts: dumped.counts,
        tool: dumped.tool,
        bk_version: bk_core::BK_VERSION.to_string(),
        level,
        parent,
        chain,
    };
    if let Err(e) = store.put_manifest(&artifact) {
        let _ = store.delete(&artifact);
        return Err(e);
    }
    if let (Some(work), Some(tree)) = (&work, &tree) {
        // The backup is whole without it: only the next one becomes a full.
        if let Err(e) = chain::write_state(store, &artifact, &work.path.join("snapshot"), tree) {
            eprintln!(
                "bk-dump: warning: {name}: the chain state could not be saved, so the next backup will be a full one: {}",
                e.message
            );
        }
    }
    Ok(artifact)
}

/// Ids are `<name>.<UTC second>`: a second backup of a name within the same second waits
/// for the next one rather than overwrite the first.
fn unused_stamp(store: &dyn Store, name: &str) -> Result<DateTime<Utc>> {
    // A few seconds at most: a store that holds every second's id is not waited out.
    for _ in 0..50 {
        let now = Utc::now().trunc_subsecs(0);
        if !store.has_manifest(name, &artifact_id(name, now))? {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(Error::cant_create(format!(
        "{name}: {} holds a backup for every second of the last 5 s (the clock, or planted manifests?)",
        store.url()
    ))
    .named(name))
}
