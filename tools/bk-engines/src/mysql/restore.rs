//! bk-restore's `mysql` engine: the dump is loaded through the client into a scratch
//! database (or a new target), counted, and swapped into the target (swap.rs).

use std::path::{Path, PathBuf};
use std::process::Command;

use bk_core::codec::Decoder;
use bk_core::error::{Error, Result};
use bk_core::record::Artifact;

use super::scan::SqlScanner;
use super::{classify, count_rows, drop_database, filter, ident, literal, query, swap, Programs};
use crate::conn::Mysql;
use crate::process::stream_into;
use crate::{RestoreOptions, RestoredInfo};

/// The database a restore loads into before anything of the target changes.
const SCRATCH_PREFIX: &str = "bk_restore_";
/// Where `--replace` moves the target's old tables until the new ones are in place.
const OLD_PREFIX: &str = "bk_old_";

/// Restores a dump into `--database NEW` (default: the source's name) on the server the
/// connection options name. The stored bytes were checked before (restore.rs). The dump is
/// loaded into a scratch database and checked there whole before the target changes: see
/// swap.rs.
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
