//! bk-restore's `influxdb` engine: the artifact is unpacked into a private directory and
//! checked whole (names, tar, influxd's manifest, every shard's blocks, counts, sha256)
//! before the server is touched; then `influxd restore -portable` loads it into a database
//! that must not exist.
//! InfluxDB 1.x can neither restore over a database nor rename one, so `--replace` loads
//! and counts a `bk_restore_<time>_<random>` copy first, and only then drops the target and
//! restores again under its name (the window is documented in docs/engines.md).

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bk_core::codec::Decoder;
use bk_core::error::{Error, Kind, Result};
use bk_core::record::Artifact;

use super::{classify, gives_up, unpack, Server};
use crate::process::{find_program, run_watched};
use crate::WorkDir;
use crate::{count_mismatch, stamped_name, RestoreOptions, RestoredInfo};

pub fn restore(artifact: &Artifact, mut decoder: Decoder, opts: &RestoreOptions) -> Result<RestoredInfo> {
    if !opts.tables.is_empty() {
        return Err(Error::usage(
            "--table: an InfluxDB backup is restored whole (influxd restore -portable)",
        ));
    }
    let server = Server::from_options(opts)?;
    let source = artifact
        .source
        .database
        .clone()
        .ok_or_else(|| Error::data(format!("{}: the manifest names no source database", artifact.id)))?;
    let target = opts.database.clone().unwrap_or_else(|| source.clone());
    let influxd = find_program(&["influxd"], "influxdb")?;
    let exists = server.databases()?.contains(&target);
    if exists && !opts.replace {
        return Err(Error::cant_create(format!(
            "InfluxDB database {target} exists; pass --replace to replace it"
        )));
    }
    let work = WorkDir::new(None, "influxdb-restore")?;
    let files = work.path.join("backup");
    let shards = work.path.join("shard");
    bk_core::private::create_private_dir(&files)?;
    bk_core::private::create_private_dir(&shards)?;
    let counts = unpack(artifact, &mut decoder, Some(&files), &shards)?;
    decoder.finish(artifact)?;
    if let Some(m) = count_mismatch(&artifact.counts, &counts, &[]) {
        return Err(Error::data(format!(
            "{}: the shards differ from the manifest's counts: {m}; nothing restored",
            artifact.id
        )));
    }
    let shardless = !std::fs::read_dir(&files)
        .map_err(|e| Error::io(format!("reading {}", files.display()), e))?
        .flatten()
        .any(|e| super::is_shard(&e.file_name().to_string_lossy()));
    let restore_into = |database: &str| {
        let mut cmd = Command::new(&influxd);
        cmd.args([
            "restore",
            "-portable",
            "-host",
            &server.rpc(),
            "-db",
            &source,
            "-newdb",
            database,
        ])
        .arg(&files);
        match run_watched(cmd, classify, gives_up) {
            // influxd 1.6 restores a backup without shards (an empty database), then says
            // that nothing changed and exits 1.
            Err(e) if shardless && e.message.contains("DB metadata not changed") => {
                match server.databases()?.iter().any(|d| d == database) {
                    true => Ok(()),
                    false => Err(e),
                }
            }
            restored => restored,
        }
    };
    let checked = |database: &str| -> Result<std::collections::BTreeMap<String, u64>> {
        let found = server.restored_count(database, &artifact.counts)?;
        match count_mismatch(&artifact.counts, &found, &[]) {
            Some(m) => Err(Error::data(format!(
                "{}: the restored database {database} differs from the backup: {m}",
                artifact.id
            ))),
            None => Ok(found),
        }
    };
    if !exists {
        let created = Dropped::unless_kept(&server, &target);
        restore_into(&target).inspect_err(|e| {
            // A database that appeared meanwhile is someone else's.
            if e.kind == Kind::CantCreate {
                created.keep();
            }
        })?;
        let found = checked(&target)?;
        created.keep();
        return Ok(RestoredInfo {
            target: server.target(&target),
            counts: found,
            complete: true,
        });
    }
    let copy = stamped_name("bk_restore_");
    let loaded = Dropped::unless_kept(&server, &copy);
    let untouched = format!("{target} was left as it was");
    restore_into(&copy).map_err(|e| e.context(format!("restoring into {copy}; {untouched}")))?;
    checked(&copy).map_err(|e| e.context(&untouched))?;
    // The window: from here until the second restore ends, the target is gone or partial.
    server.drop_database(&target).map_err(|e| {
        e.context(format!(
            "dropping {target} to replace it; the backup is loaded in {copy}"
        ))
    })?;
    let replaced = restore_into(&target).and_then(|()| checked(&target));
    let found = replaced.map_err(|e| {
        loaded.keep();
        e.context(format!(
            "{target} was dropped and restoring into it failed; the backup's data is in {copy}, kept: \
             run the restore again, then drop {copy}"
        ))
    })?;
    drop(loaded);
    Ok(RestoredInfo {
        target: server.target(&target),
        counts: found,
        complete: true,
    })
}

/// A database dropped when this goes (or on SIGINT/SIGTERM), unless kept.
struct Dropped {
    kept: Arc<AtomicBool>,
    _guard: bk_core::cleanup::Guard,
}

impl Dropped {
    fn unless_kept(server: &Server, name: &str) -> Self {
        let kept = Arc::new(AtomicBool::new(false));
        let (server, name, flag) = (server.clone(), name.to_string(), kept.clone());
        let guard = bk_core::cleanup::on_exit(move || {
            if flag.load(Ordering::SeqCst) {
                return;
            }
            if let Err(e) = server.drop_database(&name) {
                eprintln!(
                    "bk-restore: warning: could not drop {name}: {}; drop it by hand",
                    e.message
                );
            }
        });
        Dropped { kept, _guard: guard }
    }

    fn keep(&self) {
        self.kept.store(true, Ordering::SeqCst);
    }
}
