//! bk-dump's `mysql` engine: one job per database, the dump program's output streamed
//! into the artifact and scanned for rows and its completion line.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use bk_core::error::{Error, Kind, Result};
use bk_core::name::sanitize;
use bk_core::record::{Source, ToolInfo};

use super::scan::SqlScanner;
use super::{classify, query, Programs};
use crate::conn::{ConnArgs, Mysql, MysqlOpts};
use crate::process::{stream_from, version_line};
use crate::{DumpJob, Dumped};

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
