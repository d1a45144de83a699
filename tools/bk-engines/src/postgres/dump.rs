//! bk-dump's `postgres` engine: one pg_dump job per database, counted in its snapshot, and
//! pg_dumpall's globals.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use bk_core::error::{Error, Kind, Result};
use bk_core::name::sanitize;
use bk_core::record::{Source, ToolInfo};

use crate::conn::ConnArgs;
use crate::process::{find_program, keep_tail, stream_from, version_line};
use crate::{DumpJob, Dumped};

use super::conn::PgConn;
use super::{classify, count_rows, pg_error, MAINTENANCE_DB};

const PLAIN_END: &[u8] = b"-- PostgreSQL database dump complete";
const CUSTOM_MAGIC: &[u8] = b"PGDMP";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PgFormat {
    /// pg_dump's custom format, for pg_restore (selective and parallel restores)
    Custom,
    /// Plain SQL, for psql
    Plain,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DumpArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Back up this database (repeatable) [default: every database that accepts connections,
    /// but the templates]
    #[arg(long = "database", visible_alias = "dbname", value_name = "DB")]
    pub databases: Vec<String>,
    /// Leave out this database (repeatable)
    #[arg(long, value_name = "DB")]
    pub exclude_database: Vec<String>,
    /// Also back up roles and tablespaces (pg_dumpall --globals-only --no-role-passwords),
    /// as the artifact postgres-globals
    #[arg(long)]
    pub globals: bool,
    /// pg_dump's output format
    #[arg(long, value_enum, default_value_t = PgFormat::Custom)]
    pub format: PgFormat,
}

pub fn jobs(args: &DumpArgs) -> Result<Vec<Box<dyn DumpJob>>> {
    let conn = PgConn::new(&args.conn)?;
    let pg_dump = find_program(&["pg_dump"], "postgresql-client")?;
    let databases: Vec<String> = if args.databases.is_empty() {
        let mut client = conn.connect(MAINTENANCE_DB)?;
        let rows = client
            .query(
                "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
                &[],
            )
            .map_err(|e| pg_error("listing databases", e))?;
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|d| !args.exclude_database.contains(d))
            .collect()
    } else {
        args.databases
            .iter()
            .filter(|d| !args.exclude_database.contains(d))
            .cloned()
            .collect()
    };
    let version = version_line(&pg_dump)
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let tool = ToolInfo {
        program: "pg_dump".into(),
        version,
    };
    let mut jobs: Vec<Box<dyn DumpJob>> = Vec::new();
    if args.globals {
        let program = find_program(&["pg_dumpall"], "postgresql-client")?;
        let tool = ToolInfo {
            program: "pg_dumpall".into(),
            version: tool.version.clone(),
        };
        jobs.push(Box::new(GlobalsJob {
            conn: PgConn::new(&args.conn)?,
            program,
            tool,
            port: args.conn.port,
        }));
    }
    for database in databases {
        jobs.push(Box::new(PgJob {
            conn: PgConn::new(&args.conn)?,
            pg_dump: pg_dump.clone(),
            tool: tool.clone(),
            format: args.format,
            port: args.conn.port,
            database,
        }));
    }
    if jobs.is_empty() {
        return Err(Error::no_input("no database to back up"));
    }
    Ok(jobs)
}

pub struct PgJob {
    conn: PgConn,
    pg_dump: PathBuf,
    tool: ToolInfo,
    format: PgFormat,
    port: Option<u16>,
    database: String,
}

impl DumpJob for PgJob {
    fn engine(&self) -> &'static str {
        "postgres"
    }
    fn format(&self) -> &'static str {
        match self.format {
            PgFormat::Custom => "pgdump",
            PgFormat::Plain => "pgsql",
        }
    }
    fn default_name(&self) -> String {
        format!("postgres-{}", sanitize(&self.database))
    }
    fn database(&self) -> Option<&str> {
        Some(&self.database)
    }
    fn source(&self) -> Source {
        Source {
            host: self.conn.host_name(),
            port: self.port,
            database: Some(self.database.clone()),
            ..Source::default()
        }
    }

    fn dump(&self, out: &mut dyn Write) -> Result<Dumped> {
        let doing = format!("reading {}", self.database);
        let mut client = self.conn.connect(&self.database)?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .map_err(|e| pg_error(&doing, e))?;
        let snapshot: String = client
            .query_one("SELECT pg_export_snapshot()", &[])
            .map_err(|e| pg_error(&doing, e))?
            .get(0);
        // Count on a thread while pg_dump runs: both read the same snapshot.
        let counter = std::thread::spawn(move || {
            let counts = count_rows(&mut client, "counting rows");
            (client, counts)
        });
        let mut cmd = self.conn.command(&self.pg_dump);
        let format = match self.format {
            PgFormat::Custom => "--format=custom",
            PgFormat::Plain => "--format=plain",
        };
        cmd.arg(format)
            .arg("--compress=0")
            .arg(format!("--snapshot={snapshot}"))
            .arg(format!("--dbname={}", self.database));
        let mut start = Vec::new();
        let mut tail = Vec::new();
        let dumped = stream_from(cmd, out, |b| remember_ends(&mut start, &mut tail, b), classify);
        let (mut client, counts) = counter
            .join()
            .map_err(|_| Error::new(Kind::Io, "the row counter panicked"))?;
        let _ = client.batch_execute("COMMIT");
        dumped?;
        let counts = counts?;
        let complete = match self.format {
            PgFormat::Custom => start.starts_with(CUSTOM_MAGIC),
            PgFormat::Plain => String::from_utf8_lossy(&tail).contains(std::str::from_utf8(PLAIN_END).expect("ascii")),
        };
        if !complete {
            return Err(Error::new(Kind::Io, "pg_dump's output is not a complete dump"));
        }
        Ok(Dumped {
            counts,
            tool: self.tool.clone(),
        })
    }
}

/// Keeps the first and the last bytes of a stream, to check its format's markers.
fn remember_ends(start: &mut Vec<u8>, tail: &mut Vec<u8>, bytes: &[u8]) {
    const KEEP: usize = 256;
    if start.len() < KEEP {
        start.extend_from_slice(&bytes[..bytes.len().min(KEEP - start.len())]);
    }
    keep_tail(tail, KEEP, bytes);
}

/// Roles and tablespaces, without passwords.
pub struct GlobalsJob {
    conn: PgConn,
    program: PathBuf,
    tool: ToolInfo,
    port: Option<u16>,
}

impl DumpJob for GlobalsJob {
    fn engine(&self) -> &'static str {
        "postgres"
    }
    fn format(&self) -> &'static str {
        "pgsql"
    }
    fn default_name(&self) -> String {
        "postgres-globals".into()
    }
    fn database(&self) -> Option<&str> {
        Some("globals")
    }
    fn source(&self) -> Source {
        Source {
            host: self.conn.host_name(),
            port: self.port,
            ..Source::default()
        }
    }
    fn dump(&self, out: &mut dyn Write) -> Result<Dumped> {
        let mut cmd = self.conn.command(&self.program);
        cmd.args(["--globals-only", "--no-role-passwords"]);
        let (mut start, mut tail) = (Vec::new(), Vec::new());
        stream_from(cmd, out, |b| remember_ends(&mut start, &mut tail, b), classify)?;
        if !String::from_utf8_lossy(&tail).contains("PostgreSQL database cluster dump complete") {
            return Err(Error::new(Kind::Io, "pg_dumpall's output is not a complete dump"));
        }
        Ok(Dumped {
            counts: BTreeMap::new(),
            tool: self.tool.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_dump_end_is_seen_across_chunks() {
        let (mut start, mut tail) = (Vec::new(), Vec::new());
        let text = b"PGDMP....\n-- PostgreSQL database dump complete\n\n";
        for chunk in text.chunks(5) {
            remember_ends(&mut start, &mut tail, chunk);
        }
        assert!(start.starts_with(CUSTOM_MAGIC));
        assert!(String::from_utf8_lossy(&tail).contains("dump complete"));
    }
}
