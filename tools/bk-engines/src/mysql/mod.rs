//! The `mysql` engine (MySQL and MariaDB): the system's mariadb-dump or mysqldump, one
//! artifact per database, rows counted from the stream as it passes; restored through the
//! mariadb or mysql client into the same or another database.

pub mod filter;
pub mod scan;
pub mod swap;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use bk_core::codec::Decoder;
use bk_core::error::{Error, Kind, Result};
use bk_core::name::sanitize;
use bk_core::record::{Artifact, Source, ToolInfo};

use crate::conn::{ConnArgs, Mysql, MysqlOpts};
use crate::process::{find_program, output_of, stream_from, stream_into, version_line};
use crate::{DumpJob, Dumped, RestoreOptions, RestoredInfo};
use scan::SqlScanner;

/// The database a restore loads into before anything of the target changes.
const SCRATCH_PREFIX: &str = "bk_restore_";
/// Where `--replace` moves the target's old tables until the new ones are in place.
const OLD_PREFIX: &str = "bk_old_";
const SYSTEM_DATABASES: [&str; 4] = ["information_schema", "performance_schema", "sys", "mysql"];
const DEFAULT_OPTIONS: [&str; 5] = ["--quick", "--routines", "--triggers", "--events", "--hex-blob"];
/// Options that would remove the completion marker, write elsewhere, dump other databases
/// or put a password on the command line.
const REFUSED_OPTIONS: [&str; 9] = [
    "--skip-comments",
    "--compact",
    "--result-file",
    "--tab",
    "--databases",
    "--all-databases",
    "--password",
    "-p",
    "--xml",
];

#[derive(Debug, Clone, clap::Args)]
pub struct DumpArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub mysql: MysqlOpts,
    /// Back up this database (repeatable) [default: every database but the system ones]
    #[arg(long = "database", value_name = "DB")]
    pub databases: Vec<String>,
    /// Leave out this database (repeatable)
    #[arg(long, value_name = "DB")]
    pub exclude_database: Vec<String>,
    /// With no --database, include the `mysql` system database too
    #[arg(long)]
    pub include_system: bool,
    /// Do not pass --single-transaction (for servers or engines that forbid it)
    #[arg(long)]
    pub no_single_transaction: bool,
    /// Pass ARG to the dump program (repeatable), e.g. --extra-arg=--skip-lock-tables
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub extra_arg: Vec<String>,
}

/// What a failed MySQL program's stderr means: wrong credentials are a configuration
/// error (78), an unknown database a missing input (66), no server an unavailable one (69).
pub(crate) fn classify(stderr: &str) -> Kind {
    let has = |codes: &[&str]| {
        codes
            .iter()
            .any(|c| stderr.contains(&format!("ERROR {c} ")) || stderr.contains(&format!("error: {c}:")))
    };
    if has(&["1045", "1698", "1044"]) {
        Kind::Config
    } else if has(&["1049"]) {
        Kind::NoInput
    } else if has(&["2002", "2003", "2005", "2006", "2013"]) || stderr.contains("Lost connection") {
        Kind::Unavailable
    } else if stderr.contains("Access denied") {
        Kind::NoPerm
    } else {
        Kind::Io
    }
}

/// The MySQL client programs found in PATH.
struct Programs {
    dump: PathBuf,
    client: PathBuf,
}

impl Programs {
    fn find(need_dump: bool) -> Result<Self> {
        let client = find_program(&["mariadb", "mysql"], "mariadb-client")?;
        let dump = if need_dump {
            find_program(&["mariadb-dump", "mysqldump"], "mariadb-client")?
        } else {
            PathBuf::new()
        };
        Ok(Programs { dump, client })
    }
}

/// Runs one statement through the client in batch mode; returns the rows, tab-separated.
pub(crate) fn query(client: &Path, server: &Mysql, database: Option<&str>, sql: &str) -> Result<Vec<Vec<String>>> {
    let mut cmd = Command::new(client);
    cmd.args(server.args())
        .args(["--batch", "--skip-column-names", "--raw", "-e", sql]);
    if let Some(db) = database {
        cmd.arg(db);
    }
    let out = output_of(cmd, classify)?;
    Ok(out
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect())
}

/// A MySQL string literal.
pub(crate) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A MySQL identifier.
pub(crate) fn ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// The databases to dump: those named, else all the user can see but the system ones.
pub fn jobs(args: &DumpArgs) -> Result<Vec<Box<dyn DumpJob>>> {
    let server = Mysql {
        conn: &args.conn,
        opts: &args.mysql,
    };
    server.check()?;
    for extra in &args.extra_arg {
        let flag = extra.split('=').next().unwrap_or_default();
        if REFUSED_OPTIONS.contains(&flag) || (flag.starts_with("-p") && !flag.starts_with("--")) {
            return Err(Error::usage(format!("--extra-arg {extra} is not allowed: bk needs the dump complete, on stdout, and no password on a command line")));
        }
    }
    let programs = Programs::find(true)?;
    // Every database this user sees (as SHOW DATABASES), with its defaults: see MysqlJob::dump.
    let schemata = query(
        &programs.client,
        &server,
        None,
        "SELECT SCHEMA_NAME, DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA",
    )?;
    let visible: Vec<String> = schemata.iter().filter_map(|r| r.first().cloned()).collect();
    let databases: Vec<String> = if args.databases.is_empty() {
        visible
            .into_iter()
            .filter(|d| !SYSTEM_DATABASES.contains(&d.as_str()) || (args.include_system && d == "mysql"))
            .filter(|d| !args.exclude_database.contains(d))
            .collect()
    } else {
        for d in &args.databases {
            if !visible.contains(d) {
                return Err(Error::no_input(format!(
                    "no database {d} on the server (or this user may not see it)"
                )));
            }
        }
        args.databases
            .iter()
            .filter(|d| !args.exclude_database.contains(d))
            .cloned()
            .collect()
    };
    if databases.is_empty() {
        return Err(Error::no_input("no database to back up"));
    }
    // Without read access to mysql.proc, mariadb-dump leaves out the routines of other
    // definers silently (MariaDB before 11.3): say so, as the dump cannot.
    let proc_check = query(&programs.client, &server, None, "SELECT 1 FROM mysql.proc LIMIT 0");
    if proc_check.is_err_and(|e| e.message.contains("denied")) {
        eprintln!(
            "bk-dump: warning: this user cannot read mysql.proc, so stored routines it did not create \
             are left out of the dump; GRANT SELECT ON mysql.proc TO it (see bk-dump-mysql(1))"
        );
    }
    let version = version_line(&programs.dump);
    let version = version
        .split("Ver ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or(&version)
        .to_string();
    let program = programs
        .dump
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    Ok(databases
        .into_iter()
        .map(|database| {
            Box::new(MysqlJob {
                args: args.clone(),
                dump_program: programs.dump.clone(),
                tool: ToolInfo {
                    program: program.clone(),
                    version: version.clone(),
                },
                defaults: schemata
                    .iter()
                    .find(|r| r.first() == Some(&database))
                    .and_then(|r| database_defaults(r.get(1)?, r.get(2)?)),
                database,
            }) as Box<dyn DumpJob>
        })
        .collect())
}

pub struct MysqlJob {
    args: DumpArgs,
    dump_program: PathBuf,
    tool: ToolInfo,
    database: String,
    /// The statement that gives the restored database the source's default character set
    /// and collation.
    defaults: Option<String>,
}

/// Dumping one database, mysqldump writes no CREATE DATABASE (so that the dump can be
/// restored under another name), and with it would go the database's default character set
/// and collation, which tables, columns and routines created later inherit. An ALTER
/// DATABASE with no name, at the top of the dump, sets them on whichever database the dump
/// is loaded into, by bk-restore or by `mysql NEWDB < dump`.
fn database_defaults(charset: &str, collation: &str) -> Option<String> {
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    (plain(charset) && plain(collation)).then(|| {
        format!("-- bk: the database's defaults\n/*!40101 ALTER DATABASE CHARACTER SET {charset} COLLATE {collation} */;\n\n")
    })
}

impl DumpJob for MysqlJob {
    fn engine(&self) -> &'static str {
        "mysql"
    }
    fn format(&self) -> &'static str {
        "sql"
    }
    fn default_name(&self) -> String {
        format!("mysql-{}", sanitize(&self.database))
    }
    fn database(&self) -> Option<&str> {
        Some(&self.database)
    }
    fn source(&self) -> Source {
        let (host, port) = Mysql {
            conn: &self.args.conn,
            opts: &self.args.mysql,
        }
        .server();
        Source {
            host,
            port,
            database: Some(self.database.clone()),
            ..Source::default()
        }
    }

    fn dump(&self, out: &mut dyn Write) -> Result<Dumped> {
        let mut cmd = Command::new(&self.dump_program);
        cmd.args(
            Mysql {
                conn: &self.args.conn,
                opts: &self.args.mysql,
            }
            .args(),
        );
        if !self.args.no_single_transaction {
            cmd.arg("--single-transaction");
        }
        cmd.args(DEFAULT_OPTIONS).args(&self.args.extra_arg).arg(&self.database);
        if let Some(header) = &self.defaults {
            out.write_all(header.as_bytes())
                .map_err(|e| bk_core::error::from_io("writing the artifact", e))?;
        }
        let mut scanner = SqlScanner::new(&self.database);
        stream_from(cmd, out, |bytes| scanner.feed(bytes), classify)?;
        if !scanner.completed() {
            return Err(Error::new(
                Kind::Io,
                "the dump ended without its '-- Dump completed' line: it is incomplete",
            ));
        }
        Ok(Dumped {
            counts: scanner.counts().clone(),
            tool: self.tool.clone(),
        })
    }
}

/// Restores a dump into `--database NEW` (default: the source's name) on the server the
/// connection options name. The stored bytes were checked before (restore.rs). The dump is
/// loaded into a scratch database and checked there whole before the target changes: see
/// mysql_swap.rs.
pub fn restore(artifact: &Artifact, decoder: Decoder, opts: &RestoreOptions) -> Result<RestoredInfo> {
    let server = Mysql {
        conn: &opts.conn,
        opts: &opts.mysql,
    };
    server.check()?;
    let programs = Programs::find(true)?;
    let target = opts
        .database
        .clone()
        .or_else(|| artifact.source.database.clone())
        .ok_or_else(|| Error::usage("give --database NAME: the artifact names no source database"))?;
    let exists = !query(
        &programs.client,
        &server,
        None,
        &format!(
            "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = {}",
            literal(&target)
        ),
    )?
    .is_empty();
    let mut non_empty = false;
    if exists {
        let objects = query(
            &programs.client,
            &server,
            None,
            // Tables and views, and routines and events.
            &format!(
                "SELECT (SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = {t}) + (SELECT COUNT(*) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = {t}) + (SELECT COUNT(*) FROM information_schema.EVENTS WHERE EVENT_SCHEMA = {t})",
                t = literal(&target)
            ),
        )?;
        non_empty = objects.first().and_then(|r| r.first()).is_some_and(|n| n != "0");
        if non_empty && !opts.replace {
            return Err(Error::cant_create(format!(
                "database {target} is not empty; pass --replace to replace it"
            )));
        }
    }
    warn_leftovers(&programs.client, &server)?;
    let suffix = format!("{:08x}", rand::random::<u32>());
    let scratch = format!("{SCRATCH_PREFIX}{suffix}");
    let old = format!("{OLD_PREFIX}{suffix}");
    // A database that does not exist yet is itself a fresh one: the backup loads straight
    // into it (as bk-verify's scratch databases do). An existing one is not touched before
    // the swap.
    let into = if exists { scratch.clone() } else { target.clone() };
    let kept = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (dropper, dropped, keep) = (opts.clone(), into.clone(), kept.clone());
    // Whatever happens (a signal included), the database loaded into goes, unless it is
    // the new target, restored.
    let _drop_loaded = bk_core::cleanup::on_exit(move || {
        if keep.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Err(e) = drop_database(&dropper, &dropped) {
            eprintln!("bk-restore: warning: could not drop {dropped}: {}", e.message);
        }
    });
    let untouched = |e: Error| {
        let state = if exists { "untouched" } else { "not created" };
        e.context(format!("restoring into {target} failed ({target} is {state})"))
    };
    query(
        &programs.client,
        &server,
        None,
        &format!("CREATE DATABASE {}", ident(&into)),
    )
    .map_err(|e| {
        let why = if exists {
            " (the restoring user needs CREATE and DROP on `bk\\_restore\\_%` and `bk\\_old\\_%`)"
        } else {
            ""
        };
        untouched(e.context(format!("creating the database {into}{why}")))
    })?;
    load(artifact, decoder, &programs.client, &server, &into, &opts.tables).map_err(untouched)?;
    let counts = count_rows(&programs.client, &server, &into).map_err(untouched)?;
    if non_empty {
        // Data is only ever replaced by a copy that matches its manifest.
        if let Some(m) = crate::count_mismatch(&artifact.counts, &counts, &opts.tables) {
            return Err(untouched(Error::data(format!(
                "{}: the restored copy differs from the backup: {m}",
                artifact.id
            ))));
        }
    }
    if exists {
        swap::Swap {
            client: &programs.client,
            dump: &programs.dump,
            server: &server,
            scratch: &scratch,
            old: &old,
            target: &target,
            exists,
            partial: !opts.tables.is_empty(),
        }
        .run()
        .map_err(|e| e.context(format!("restoring into {target}")))?;
    }
    // A new target is the restore; a scratch database is dropped.
    kept.store(!exists, std::sync::atomic::Ordering::SeqCst);
    let (host, port) = server.server();
    let mut target_info = serde_json::Map::new();
    target_info.insert("host".into(), host.into());
    if let Some(p) = port {
        target_info.insert("port".into(), p.into());
    }
    target_info.insert("database".into(), target.clone().into());
    Ok(RestoredInfo {
        target: target_info,
        counts: swap::counts_in(counts, &into, &target),
        complete: opts.tables.is_empty(),
    })
}

/// Scratch databases of restores, and old copies that a `--replace` keeps until the swap is
/// over: a killed bk-restore may leave them; say so (an old copy may hold the only copy of
/// data a failed swap took out of its database: it is never dropped here).
fn warn_leftovers(client: &Path, server: &Mysql) -> Result<()> {
    for row in query(client, server, None, "SHOW DATABASES")? {
        let Some(db) = row.first() else { continue };
        if db.starts_with(SCRATCH_PREFIX) {
            eprintln!(
                "bk-restore: warning: {db} is the scratch database of an interrupted (or running) restore; once no bk-restore runs, DROP DATABASE `{db}`"
            );
        } else if db.starts_with(OLD_PREFIX) {
            eprintln!(
                "bk-restore: warning: {db} holds the old tables of a --replace that was interrupted while it swapped; see \"Restoring a database\" in bk's docs/engines.md before dropping it"
            );
        }
    }
    Ok(())
}

fn load(
    artifact: &Artifact,
    mut decoder: Decoder,
    client: &PathBuf,
    server: &Mysql,
    target: &str,
    tables: &[String],
) -> Result<()> {
    let mut cmd = Command::new(client);
    cmd.args(server.args()).arg("--binary-mode").arg(target);
    let mut scanned = Scanned {
        inner: &mut decoder,
        scanner: SqlScanner::new(artifact.source.database.as_deref().unwrap_or_default()),
    };
    if tables.is_empty() {
        stream_into(cmd, &mut scanned, classify)?;
    } else {
        let mut filtered = filter::TableFilter::new(&mut scanned, tables);
        stream_into(cmd, &mut filtered, classify)?;
        let missing = filtered.missing();
        if !missing.is_empty() {
            return Err(Error::no_input(format!(
                "{}: no table {} in this backup",
                artifact.id,
                missing.join(", ")
            )));
        }
    }
    if !scanned.scanner.completed() {
        return Err(Error::data(format!(
            "{}: the dump does not end with '-- Dump completed': it is truncated",
            artifact.file
        )));
    }
    decoder.finish(artifact).map(drop)
}

/// The dump as it is loaded, watched for its completion line.
struct Scanned<'a> {
    inner: &'a mut dyn std::io::Read,
    scanner: SqlScanner,
}

impl std::io::Read for Scanned<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.scanner.feed(&buf[..n]);
        Ok(n)
    }
}

/// Exact rows of every base table of a database, keyed `<database>.<table>`.
fn count_rows(client: &Path, server: &Mysql, database: &str) -> Result<BTreeMap<String, u64>> {
    let tables = query(client, server, None, &format!(
        "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = {} AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
        literal(database)
    ))?;
    let mut counts = BTreeMap::new();
    for chunk in tables.chunks(200) {
        let sql = chunk
            .iter()
            .map(|row| {
                format!(
                    "SELECT {}, COUNT(*) FROM {}.{}",
                    literal(&row[0]),
                    ident(database),
                    ident(&row[0])
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        for row in query(client, server, None, &sql)? {
            let n = row
                .get(1)
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Error::data(format!("unexpected count row {row:?}")))?;
            counts.insert(format!("{database}.{}", row[0]), n);
        }
    }
    Ok(counts)
}

/// Databases whose names start with `prefix` (bk-verify's scratch databases).
pub fn databases_like(opts: &RestoreOptions, prefix: &str) -> Result<Vec<String>> {
    let server = Mysql {
        conn: &opts.conn,
        opts: &opts.mysql,
    };
    let client = Programs::find(false)?.client;
    let rows = query(&client, &server, None, "SHOW DATABASES")?;
    Ok(rows
        .into_iter()
        .filter_map(|r| r.into_iter().next())
        .filter(|d| d.starts_with(prefix))
        .collect())
}

pub fn drop_database(opts: &RestoreOptions, name: &str) -> Result<()> {
    let server = Mysql {
        conn: &opts.conn,
        opts: &opts.mysql,
    };
    let client = Programs::find(false)?.client;
    query(
        &client,
        &server,
        None,
        &format!("DROP DATABASE IF EXISTS {}", ident(name)),
    )
    .map(drop)
}

/// Re-derives the counts of a dump from its bytes; it must end with the completion line.
pub fn derive_counts(artifact: &Artifact, decoder: &mut Decoder) -> Result<BTreeMap<String, u64>> {
    let mut scanner = SqlScanner::new(artifact.source.database.as_deref().unwrap_or_default());
    crate::for_each_chunk(decoder, |b| scanner.feed(b))?;
    if !scanner.completed() {
        return Err(Error::data(format!(
            "{}: the dump does not end with '-- Dump completed': it is truncated",
            artifact.file
        )));
    }
    Ok(scanner.counts().clone())
}
