//! The `mysql` engine (MySQL and MariaDB): the system's mariadb-dump or mysqldump, one
//! artifact per database, rows counted from the stream as it passes; restored through the
//! mariadb or mysql client into the same or another database. This file holds what dump and
//! restore share: the client programs, queries, quoting and row counts.

pub mod dump;
pub mod filter;
pub mod restore;
pub mod scan;
pub mod swap;

pub use dump::{jobs, DumpArgs, MysqlJob};
pub use restore::restore;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use bk_core::codec::Decoder;
use bk_core::error::{Error, Kind, Result};
use bk_core::record::Artifact;

use crate::conn::Mysql;
use crate::process::{find_program, output_of};
use crate::RestoreOptions;
use scan::SqlScanner;

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
