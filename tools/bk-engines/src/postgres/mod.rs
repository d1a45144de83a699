//! The `postgres` engine: the system's pg_dump (custom format by default, uncompressed:
//! bk compresses), one artifact per database. bk's own connection opens a REPEATABLE READ
//! transaction, exports its snapshot to pg_dump and counts every table inside that same
//! snapshot, so the counts are exactly what the dump holds. Restored with pg_restore (or
//! psql for plain dumps) into the same or another database.

mod conn;
pub mod dump;
pub mod restore;
pub mod scan;

pub use dump::{jobs, DumpArgs, GlobalsJob, PgFormat, PgJob};
pub use restore::restore;

use std::collections::BTreeMap;
use std::process::Command;

use postgres::error::SqlState;
use postgres::Client;

use bk_core::codec::Decoder;
use bk_core::error::{Error, Kind, Result};
use bk_core::record::Artifact;

use crate::process::find_program;
use crate::RestoreOptions;
use conn::PgConn;

const MAINTENANCE_DB: &str = "postgres";

fn pg_error(doing: &str, e: postgres::Error) -> Error {
    let kind = match e.code() {
        Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            Kind::Config
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME || *c == SqlState::UNDEFINED_TABLE => Kind::NoInput,
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => Kind::NoPerm,
        Some(_) => Kind::Io,
        None => Kind::Unavailable,
    };
    // The client's own errors name their cause only as their source.
    let detail = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| {
        let mut text = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            text = format!("{text}: {c}");
            cause = c.source();
        }
        text
    });
    Error::new(kind, format!("{doing}: {detail}"))
}

/// What a failed PostgreSQL program's stderr means.
fn classify(stderr: &str) -> Kind {
    if stderr.contains("password authentication failed")
        || stderr.contains("no password supplied")
        || stderr.contains("role \"") && stderr.contains("does not exist")
    {
        Kind::Config
    } else if stderr.contains("database \"") && stderr.contains("does not exist") {
        Kind::NoInput
    } else if [
        "Connection refused",
        "could not connect",
        "server closed the connection",
        "terminating connection",
        "connection to server",
    ]
    .iter()
    .any(|s| stderr.contains(s))
    {
        Kind::Unavailable
    } else if [
        "permission denied",
        "must be member of role",
        "must be owner of",
        "must be superuser",
    ]
    .iter()
    .any(|s| stderr.contains(s))
    {
        // The server's insufficient-privilege messages (ALTER ... OWNER TO another role).
        Kind::NoPerm
    } else {
        Kind::Io
    }
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Rows of every table whose data pg_dump dumps (ordinary tables and leaf partitions, not
/// those of extensions), keyed `<schema>.<table>`.
fn count_rows(client: &mut Client, doing: &str) -> Result<BTreeMap<String, u64>> {
    let tables = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
             ORDER BY 1, 2",
            &[],
        )
        .map_err(|e| pg_error(doing, e))?;
    let mut counts = BTreeMap::new();
    for row in tables {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        let n: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {}.{}", ident(&schema), ident(&table)),
                &[],
            )
            .map_err(|e| pg_error(doing, e))?
            .get(0);
        counts.insert(format!("{schema}.{table}"), n as u64);
    }
    Ok(counts)
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Databases whose names start with `prefix` (bk-verify's scratch databases).
pub fn databases_like(opts: &RestoreOptions, prefix: &str) -> Result<Vec<String>> {
    let mut admin = PgConn::new(&opts.conn)?.connect(MAINTENANCE_DB)?;
    let rows = admin
        .query("SELECT datname FROM pg_database ORDER BY 1", &[])
        .map_err(|e| pg_error("listing databases", e))?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|d| d.starts_with(prefix))
        .collect())
}

pub fn drop_database(opts: &RestoreOptions, name: &str) -> Result<()> {
    let mut admin = PgConn::new(&opts.conn)?.connect(MAINTENANCE_DB)?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(name)))
        .map_err(|e| pg_error(&format!("dropping {name}"), e))
}

/// Re-derives the counts of a dump from its bytes: plain SQL is scanned as it comes; a
/// custom archive is turned into SQL by `pg_restore -f -`, which also proves its TOC and
/// data readable. Either must end with pg_dump's completion comment.
pub fn derive_counts(artifact: &Artifact, decoder: &mut Decoder) -> Result<BTreeMap<String, u64>> {
    let marker = if artifact.source.database.is_none() {
        "-- PostgreSQL database cluster dump complete"
    } else {
        "-- PostgreSQL database dump complete"
    };
    let scanner = scan::CopyScanner::new(marker);
    let scanner = if artifact.format == "pgdump" {
        let mut cmd = Command::new(find_program(&["pg_restore"], "postgresql-client")?);
        cmd.args(["--file", "-"]);
        crate::process::scan_through(cmd, decoder, scanner, scan::CopyScanner::feed, |_| Kind::Data).map_err(|e| {
            match e.kind {
                Kind::Data if e.message.starts_with("pg_restore") => {
                    e.context(format!("{}: not a readable pg_dump archive", artifact.file))
                }
                _ => e,
            }
        })?
    } else {
        let mut scanner = scanner;
        crate::for_each_chunk(decoder, |b| scanner.feed(b))?;
        scanner
    };
    if !scanner.complete() {
        return Err(Error::data(format!(
            "{}: the dump does not end with {marker:?}: it is truncated",
            artifact.file
        )));
    }
    Ok(scanner.counts().clone())
}
