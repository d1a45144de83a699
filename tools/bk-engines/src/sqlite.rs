//! The `sqlite` engine. The dump reads every page through the sqlite_dbpage virtual table
//! inside one read transaction: a consistent snapshot while other processes write (WAL or
//! rollback journal), streamed with no uncompressed temporary copy. The artifact is the
//! database file itself.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use bk_core::codec::Decoder;
use bk_core::error::{describe_io, from_io, Error, Kind, Result};
use bk_core::name::sanitize;
use bk_core::private::create_private_file;
use bk_core::record::{Artifact, Source, ToolInfo};

use crate::{count_mismatch, hidden_temp_beside, hostname, path_target, DumpJob, Dumped, RestoreOptions, RestoredInfo};

#[derive(Debug, Clone, clap::Args)]
pub struct DumpArgs {
    /// The SQLite database file
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// How long to wait for a writer's lock before giving up (exit 75)
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub busy_timeout: u64,
}

pub struct SqliteJob {
    path: PathBuf,
    busy_timeout: Duration,
}

impl SqliteJob {
    pub fn new(args: DumpArgs) -> Result<Self> {
        let path = std::path::absolute(&args.file).map_err(|e| Error::io(args.file.display(), e))?;
        let meta = fs::metadata(&path).map_err(|e| Error::io(format!("cannot back up {}", path.display()), e))?;
        if !meta.is_file() {
            return Err(Error::no_input(format!("{} is not a file", path.display())));
        }
        Ok(SqliteJob {
            path,
            busy_timeout: Duration::from_secs(args.busy_timeout),
        })
    }
}

/// Maps SQLite's failures to exit codes: busy or locked 75, not a database or corrupt 65.
fn sql_error(doing: impl std::fmt::Display, e: rusqlite::Error) -> Error {
    let kind = match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Kind::TempFail,
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => Kind::Data,
        Some(ErrorCode::CannotOpen) => Kind::NoInput,
        Some(ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => Kind::NoPerm,
        _ => Kind::Io,
    };
    Error::new(kind, format!("{doing}: {e}"))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Rows per table (user tables; SQLite's own but sqlite_sequence are left out).
fn count_rows(conn: &Connection, what: &Path) -> Result<BTreeMap<String, u64>> {
    let failed = |e| sql_error(format!("reading {}", what.display()), e);
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND (name NOT LIKE 'sqlite\\_%' ESCAPE '\\' OR name = 'sqlite_sequence') ORDER BY name")
        .map_err(failed)?;
    let tables: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .map_err(failed)?
        .collect::<Result<_, _>>()
        .map_err(failed)?;
    let mut counts = BTreeMap::new();
    for t in tables {
        let n: i64 = conn
            .query_row(&format!("SELECT count(*) FROM {}", quote_ident(&t)), [], |r| r.get(0))
            .map_err(failed)?;
        counts.insert(t, n as u64);
    }
    Ok(counts)
}

impl DumpJob for SqliteJob {
    fn engine(&self) -> &'static str {
        "sqlite"
    }
    fn format(&self) -> &'static str {
        "sqlite"
    }
    fn default_name(&self) -> String {
        let stem = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("sqlite-{}", sanitize(&stem))
    }
    fn source(&self) -> Source {
        Source {
            host: hostname(),
            path: Some(self.path.display().to_string()),
            ..Source::default()
        }
    }

    fn dump(&self, out: &mut dyn Write) -> Result<Dumped> {
        let path = &self.path;
        let failed = |e| sql_error(format!("reading {}", path.display()), e);
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(failed)?;
        conn.busy_timeout(self.busy_timeout).map_err(failed)?;
        // The first read takes the snapshot; every read until COMMIT sees the same database.
        conn.execute_batch("BEGIN").map_err(failed)?;
        let counts = count_rows(&conn, path)?;
        let page_count: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0)).map_err(failed)?;
        let mut pages = 0i64;
        {
            let mut stmt = conn
                .prepare("SELECT data FROM sqlite_dbpage ORDER BY pgno")
                .map_err(failed)?;
            let mut rows = stmt.query([]).map_err(failed)?;
            while let Some(row) = rows.next().map_err(failed)? {
                let data = row.get_ref(0).and_then(|v| Ok(v.as_blob()?)).map_err(failed)?;
                out.write_all(data).map_err(|e| from_io("writing the artifact", e))?;
                pages += 1;
            }
        }
        conn.execute_batch("COMMIT").map_err(failed)?;
        if pages != page_count {
            return Err(Error::new(
                Kind::Io,
                format!("{}: read {pages} pages of {page_count}", path.display()),
            ));
        }
        Ok(Dumped {
            counts,
            tool: ToolInfo {
                program: "sqlite".into(),
                version: rusqlite::version().into(),
            },
        })
    }
}

/// Restores a database file: written beside the target under a hidden name, checked
/// (sha256, `PRAGMA integrity_check`, rows per table), then renamed into place.
pub fn restore(
    artifact: &Artifact,
    mut decoder: Decoder,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoredInfo> {
    if !opts.include.is_empty() {
        return Err(Error::usage(
            "--include is for files backups; a SQLite backup restores whole",
        ));
    }
    if target.exists() && !opts.replace {
        return Err(Error::cant_create(format!(
            "{} exists; pass --replace to overwrite it",
            target.display()
        )));
    }
    let temp = hidden_temp_beside(target)?;
    let removed = temp.clone();
    let _remove_temp = bk_core::cleanup::on_exit(move || remove_with_side_files(&removed));
    let result = write_checked(artifact, &mut decoder, &temp)
        .and_then(|()| decoder.finish(artifact))
        .and_then(|_| {
            let counts = check_database(&temp)?;
            if let Some(m) = count_mismatch(&artifact.counts, &counts, &[]) {
                return Err(Error::data(format!(
                    "{}: the restored database differs from the backup: {m}",
                    artifact.file
                )));
            }
            replace_with(&temp, target)?;
            Ok(counts)
        });
    Ok(RestoredInfo {
        target: path_target(target),
        counts: result?,
        complete: true,
    })
}

/// Moves the target's `-wal`, `-shm` and `-journal` files aside, then the restored file
/// into place: SQLite would replay a stale WAL or hot journal onto the restored database.
/// A symlink is moved itself (what it points to is left alone). A directory, or a side
/// file that cannot be moved (a directory others own, read-only), fails the restore with
/// the old database and its side files as they were, as does a failed final rename.
fn replace_with(temp: &Path, target: &Path) -> Result<()> {
    let mut moved: Vec<(PathBuf, PathBuf)> = Vec::new();
    let put_back = |moved: &[(PathBuf, PathBuf)]| {
        for (side, aside) in moved.iter().rev() {
            if let Err(e) = fs::rename(aside, side) {
                eprintln!(
                    "bk-restore: warning: could not put {} back from {}: {}",
                    side.display(),
                    aside.display(),
                    describe_io(&e)
                );
            }
        }
    };
    let not_replaced = format!("{} was not replaced", target.display());
    for suffix in ["-wal", "-shm", "-journal"] {
        let side = with_suffix(target, suffix);
        let aside = with_suffix(temp, &format!(".old{suffix}"));
        let moved_aside = match fs::symlink_metadata(&side) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Ok(meta) if meta.is_dir() => Err(Error::cant_create(format!(
                "{not_replaced}: {} is a directory where SQLite keeps a side file; remove it",
                side.display()
            ))),
            Err(e) => Err(Error::io(format!("{not_replaced}: looking at {}", side.display()), e)),
            Ok(_) => fs::rename(&side, &aside)
                .map_err(|e| Error::io(format!("{not_replaced}: cannot remove {}", side.display()), e)),
        };
        if let Err(e) = moved_aside {
            put_back(&moved);
            return Err(e);
        }
        moved.push((side, aside));
    }
    if let Err(e) = fs::rename(temp, target) {
        put_back(&moved);
        return Err(Error::io(format!("moving the database to {}", target.display()), e));
    }
    for (_, aside) in &moved {
        if let Err(e) = fs::remove_file(aside) {
            eprintln!(
                "bk-restore: warning: could not remove {}, the old database's side file: {}",
                aside.display(),
                describe_io(&e)
            );
        }
    }
    Ok(())
}

/// Removes a temporary database and whatever side files SQLite left beside it.
fn remove_with_side_files(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = fs::remove_file(with_suffix(path, suffix));
    }
}

/// `path` with `suffix` appended to its file name (`app.db` → `app.db-wal`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

fn write_checked(artifact: &Artifact, decoder: &mut Decoder, temp: &Path) -> Result<()> {
    let mut file = create_private_file(temp)?;
    io::copy(decoder, &mut file).map_err(|e| from_io(format!("restoring {}", artifact.file), e))?;
    file.sync_all()
        .map_err(|e| Error::io(format!("writing {}", temp.display()), e))
}

/// Opens a restored database: it must pass SQLite's own integrity check.
pub fn check_database(path: &Path) -> Result<BTreeMap<String, u64>> {
    let failed = |e| sql_error(format!("checking the restored database {}", path.display()), e);
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(failed)?;
    let verdict: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(failed)?;
    if verdict != ["ok"] {
        return Err(Error::data(format!(
            "the restored database fails integrity_check: {}",
            verdict.join("; ")
        )));
    }
    let counts = count_rows(&conn, path)?;
    conn.close().map_err(|(_, e)| failed(e))?;
    Ok(counts)
}

/// Re-derives the counts of a SQLite backup: the database is decoded into a private
/// temporary file in `dir` (SQLite checks a file, not a stream), passes integrity_check,
/// and is removed, whatever happens.
pub fn derive_counts(artifact: &Artifact, decoder: &mut Decoder, dir: &Path) -> Result<BTreeMap<String, u64>> {
    let temp = dir.join(format!(".bk-verify-{}-{:08x}.db", artifact.id, rand::random::<u32>()));
    let removed = temp.clone();
    let _remove = bk_core::cleanup::on_exit(move || remove_with_side_files(&removed));
    write_checked(artifact, decoder, &temp)?;
    check_database(&temp).map_err(|e| match e.kind {
        Kind::Data => e.context(format!("{}: not a sound SQLite database", artifact.file)),
        _ => e,
    })
}
