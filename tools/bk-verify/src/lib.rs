//! bk-verify: proves that backups restore. Level `integrity` (always) reads the whole
//! artifact: sha256, full decode and decryption, the format's end marker, and the counts
//! re-derived from the stream against the manifest's. Level `restore` (--scratch) also
//! restores into a throwaway target named bk_verify_<unix time>_<random>, compares every
//! table's count, and drops it whatever happens (SIGINT and SIGTERM included).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Map, Value};

use bk_core::cli::read_stdin_records;
use bk_core::codec::{check_digest, sha256_of, Decoder, Identities};
use bk_core::error::{Error, Kind, Result};
use bk_core::name::validate_name;
use bk_core::progress::Progress;
use bk_core::record::{Artifact, Output, Record};
use bk_core::store::newest_per_name;
use bk_core::store::{Broken, Store};

use bk_engines::{command, files, influxdb, mongodb, mysql, postgres, sqlite, ReadOpts, RestoreOptions, LEFTOVER_AGE};

const SCRATCH_PREFIX: &str = "bk_verify_";

/// Prove that backups restore.
///
/// Reads artifact records on stdin (bk-dump ... | bk-verify), or picks backups from a store
/// with --from. Every artifact is read whole: its sha256, a full decode (and decryption),
/// its format's end marker, and the rows (entries) counted in the stream against the
/// manifest. With --scratch each is also restored into a throwaway target, its tables
/// compared with the manifest, and the target dropped whatever happens (SIGINT and SIGTERM
/// included); scratch targets older than a day, left by a killed run, are removed first,
/// with a line on stderr. Prints one verified record per artifact and passes other records
/// on. Every backup is read, whatever failed before it, and every failure is an error
/// record. The exit status is 65 if any backup is bad (a mismatch, corruption, or a broken
/// backup in the store: an unreadable manifest, a missing or resized artifact file),
/// otherwise that of the first other failure (69: a scratch server that cannot be reached).
/// With --from, a broken backup newer than a name's newest good one is reported, and the
/// good one verified instead, with a line on stderr saying so.
#[derive(Debug, Parser)]
#[command(name = "bk-verify", version, after_help = bk_core::cli::exit_status_help())]
pub struct Cli {
    /// Verify backups from this store instead of the records on stdin
    #[arg(long, value_name = "STORE")]
    pub from: Option<String>,
    /// With --from: only this job name
    #[arg(long, requires = "from")]
    pub name: Option<String>,
    /// With --from: the newest backup of each name (the default)
    #[arg(long, requires = "from", conflicts_with_all = ["id", "all", "sample"])]
    pub latest: bool,
    /// With --from: the backup with this id
    #[arg(long, requires = "from", conflicts_with_all = ["all", "sample"])]
    pub id: Option<String>,
    /// With --from: every backup (default: the newest of each name)
    #[arg(long, requires = "from", conflicts_with = "sample")]
    pub all: bool,
    /// With --from: per name, the N newest backups and N of the older ones picked at random
    /// (run nightly, every backup gets read in time)
    #[arg(long, value_name = "N", requires = "from", value_parser = clap::value_parser!(u32).range(1..))]
    pub sample: Option<u32>,
    /// Also restore each backup into a throwaway target named bk_verify_<time>_<random>: a
    /// database on the server the connection options name (MySQL, PostgreSQL, MongoDB,
    /// InfluxDB), or a file or directory in --scratch-dir (files, SQLite)
    #[arg(long)]
    pub scratch: bool,
    /// Where throwaway files and directories go, SQLite's decoded copies and InfluxDB's TSM
    /// files (one shard at a time) too [default: $TMPDIR or /tmp]
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    #[command(flatten)]
    pub read: ReadOpts,
}

impl bk_core::cli::Tool for Cli {}

pub fn run(cli: Cli, out: &mut Output) -> Result<()> {
    let identities = cli.read.start()?;
    let mut verifier = Verifier::new(&cli, identities);
    match &cli.from {
        Some(url) => {
            let store = bk_stores::open(url, &cli.read.s3.store_config())?;
            let picked = pick(store.as_ref(), &cli)?;
            for broken in &picked.broken {
                verifier.report(broken.error(), out)?;
            }
            for artifact in &picked.artifacts {
                verifier.verify(store.as_ref(), artifact, out)?;
            }
        }
        None => {
            let inputs = read_stdin_records(out, "pipe artifact records in (bk-dump ... | bk-verify) or use --from")?;
            // Every copy is verified: bk-ship adds a record per store a backup went to.
            let mut seen = Vec::new();
            for input in &inputs {
                match &input.record {
                    Record::Artifact(a) if !seen.contains(&a.location) => {
                        seen.push(a.location.clone());
                        match bk_stores::open_location(a, &cli.read.s3.store_config()) {
                            Ok(store) => verifier.verify(store.as_ref(), a, out)?,
                            Err(e) => verifier.report(e.named(&a.name), out)?,
                        }
                    }
                    _ => out.pass(input)?,
                }
            }
        }
    }
    verifier.finish(out)
}

/// What --from selects: the backups to read, and the broken ones among those asked for.
struct Picked {
    artifacts: Vec<Artifact>,
    broken: Vec<Broken>,
}

fn pick(store: &dyn Store, cli: &Cli) -> Result<Picked> {
    if let Some(n) = &cli.name {
        validate_name(n)?;
    }
    let listing = store.list(cli.name.as_deref())?;
    let (all, broken) = (listing.artifacts, listing.broken);
    let picked = if let Some(id) = &cli.id {
        Picked {
            artifacts: all.into_iter().filter(|a| &a.id == id).collect(),
            broken: broken.into_iter().filter(|b| &b.id == id).collect(),
        }
    } else if cli.all {
        Picked { artifacts: all, broken }
    } else {
        let newest = newest_per_name(all.clone());
        // Sampling reads a name's whole history over the nights: all of it is asked for.
        // The newest (the default) is asked for up to the newest good backup.
        let newest_of = |name: &str| newest.iter().find(|a| a.name == name);
        let broken: Vec<Broken> = if cli.sample.is_some() {
            broken
        } else {
            broken
                .into_iter()
                .filter(|b| b.is_newer_than(newest_of(&b.name)))
                .collect()
        };
        for a in &newest {
            if let Some(b) = broken.iter().rfind(|b| b.name == a.name && b.is_newer_than(Some(a))) {
                eprintln!(
                    "bk-verify: {}: the newest backup {} is broken; verifying {} instead",
                    a.name, b.id, a.id
                );
            }
        }
        let artifacts = match cli.sample {
            Some(n) => sample(all, n as usize),
            None => newest,
        };
        Picked { artifacts, broken }
    };
    if picked.artifacts.is_empty() && picked.broken.is_empty() {
        let what = cli.id.clone().or(cli.name.clone()).unwrap_or_else(|| "any name".into());
        return Err(Error::no_input(format!("no backup of {what} in {}", store.url())));
    }
    Ok(picked)
}

/// Per name: the `n` newest, and `n` of the older ones at random (restic's
/// --read-data-subset idea: over nights, every backup gets read).
fn sample(all: Vec<Artifact>, n: usize) -> Vec<Artifact> {
    use rand::seq::SliceRandom;
    let mut by_name: BTreeMap<String, Vec<Artifact>> = BTreeMap::new();
    for a in all {
        by_name.entry(a.name.clone()).or_default().push(a);
    }
    let mut picked = Vec::new();
    for (_, mut list) in by_name {
        let older = list.split_off(list.len().saturating_sub(n));
        let mut rest = list;
        rest.shuffle(&mut rand::rng());
        rest.truncate(n);
        rest.sort_by(|a, b| a.started.cmp(&b.started));
        picked.extend(rest);
        picked.extend(older);
    }
    picked
}

struct Verifier<'a> {
    cli: &'a Cli,
    identities: Identities,
    restore_options: RestoreOptions,
    /// Engines whose leftover scratch targets were already looked for.
    swept: Vec<String>,
    /// Failures that are not a bad backup, reported at the end (see `report`).
    deferred: Vec<Error>,
}

impl<'a> Verifier<'a> {
    fn new(cli: &'a Cli, identities: Identities) -> Self {
        let restore_options = RestoreOptions {
            replace: false,
            include: Vec::new(),
            tables: Vec::new(),
            database: None,
            conn: cli.read.conn.clone(),
            mysql: cli.read.mysql.clone(),
            mongo: cli.read.mongo.with(&cli.read.conn),
            influx: cli.read.influx.clone(),
            no_owner: true,
            jobs: None,
        };
        Verifier {
            cli,
            identities,
            restore_options,
            swept: Vec::new(),
            deferred: Vec::new(),
        }
    }

    fn scratch_dir(&self) -> PathBuf {
        self.cli.scratch_dir.clone().unwrap_or_else(std::env::temp_dir)
    }

    /// Verifies one artifact: a verified record, plus an error record if it failed.
    fn verify(&mut self, store: &dyn Store, artifact: &Artifact, out: &mut Output) -> Result<()> {
        let mut checks = Map::new();
        let mut mismatches = Vec::new();
        let level = if self.cli.scratch { "restore" } else { "integrity" };
        let outcome = self.check(store, artifact, &mut checks, &mut mismatches);
        let mut record = Map::new();
        record.insert("id".into(), artifact.id.clone().into());
        record.insert("name".into(), artifact.name.clone().into());
        record.insert("location".into(), artifact.location.clone().into());
        record.insert("ok".into(), outcome.is_ok().into());
        record.insert("level".into(), level.into());
        record.insert("checks".into(), Value::Object(checks));
        record.insert("mismatches".into(), Value::Array(mismatches));
        out.emit(&Record::Verified(record))?;
        match outcome {
            Ok(()) => Ok(()),
            Err(e) => self.report(e.named(&artifact.name), out),
        }
    }

    /// Reports a failure and goes on with the next backup. A bad backup (65) is reported at
    /// once; a failure that says nothing about the backup (the scratch server is down, say)
    /// at the end of the run, so that the exit status is 65 whenever a backup is bad, and
    /// otherwise that of the first other failure.
    fn report(&mut self, e: Error, out: &mut Output) -> Result<()> {
        if e.kind == Kind::Data {
            out.error(&e)
        } else {
            self.deferred.push(e);
            Ok(())
        }
    }

    /// Reports the failures kept for the end.
    fn finish(self, out: &mut Output) -> Result<()> {
        self.deferred.iter().try_for_each(|e| out.error(e))
    }

    fn check(
        &mut self,
        store: &dyn Store,
        artifact: &Artifact,
        checks: &mut Map<String, Value>,
        mismatches: &mut Vec<Value>,
    ) -> Result<()> {
        let started = Instant::now();
        let derived = self.integrity(store, artifact);
        let seconds = started.elapsed().as_secs_f64();
        match derived {
            Ok(counts) => {
                let found = differences(artifact, &counts, None);
                if !found.is_empty() {
                    let e = mismatch_error(artifact, "the counts in the stream differ from the manifest", &found);
                    checks.insert(
                        "integrity".into(),
                        json!({"ok": false, "seconds": round(seconds), "error": e.message}),
                    );
                    mismatches.extend(found);
                    return Err(e);
                }
                checks.insert("integrity".into(), json!({"ok": true, "seconds": round(seconds)}));
            }
            Err(e) => {
                checks.insert(
                    "integrity".into(),
                    json!({"ok": false, "seconds": round(seconds), "error": e.message}),
                );
                return Err(e);
            }
        }
        if !self.cli.scratch {
            return Ok(());
        }
        if artifact.engine == "postgres" && artifact.source.database.is_none() {
            // Roles and tablespaces belong to the whole cluster: replaying them would change
            // the server, so they are verified at the integrity level only.
            checks.insert(
                "restore".into(),
                json!({"ok": true, "skipped": "cluster-wide roles are not replayed"}),
            );
            return Ok(());
        }
        if artifact.engine == "command" {
            // A program's output has no place to be restored into and compared.
            checks.insert(
                "restore".into(),
                json!({"ok": true, "skipped": "a command backup has no restore level: its content was checked whole"}),
            );
            return Ok(());
        }
        let started = Instant::now();
        let restored = self.restore(store, artifact);
        let seconds = started.elapsed().as_secs_f64();
        match restored {
            Ok((scratch, counts)) => {
                let found = differences(artifact, &counts, Some(&scratch));
                if found.is_empty() {
                    checks.insert(
                        "restore".into(),
                        json!({"ok": true, "seconds": round(seconds), "compared": counts.len()}),
                    );
                    return Ok(());
                }
                let e = mismatch_error(artifact, "the restored copy differs from the manifest", &found);
                checks.insert(
                    "restore".into(),
                    json!({"ok": false, "seconds": round(seconds), "compared": counts.len(), "error": e.message}),
                );
                mismatches.extend(found);
                Err(e)
            }
            Err(e) => {
                // The server rejected what the dump holds (bad SQL, a broken archive): the
                // backup does not restore, which is what this run is here to find.
                let e = if e.kind == Kind::Io
                    && matches!(artifact.engine.as_str(), "mysql" | "postgres" | "mongodb" | "influxdb")
                {
                    Error::data(format!("{}: the backup does not restore: {}", artifact.id, e.message))
                } else {
                    e
                };
                checks.insert(
                    "restore".into(),
                    json!({"ok": false, "seconds": round(seconds), "error": e.message}),
                );
                Err(e)
            }
        }
    }

    fn decoder(&self, store: &dyn Store, artifact: &Artifact) -> Result<Decoder> {
        Decoder::new(
            store.open(artifact)?,
            artifact,
            &self.identities,
            Progress::new(&artifact.name, self.cli.read.quiet),
        )
    }

    /// Reads the whole artifact; returns the counts derived from its content. When the
    /// content is bad, the stored bytes are read again: if they no longer hash to the
    /// manifest's sha256, that is the problem to name (they changed after the backup).
    fn integrity(&self, store: &dyn Store, artifact: &Artifact) -> Result<BTreeMap<String, u64>> {
        self.decode(store, artifact).map_err(|e| {
            if e.kind != Kind::Data {
                return e;
            }
            match stored_digest(store, artifact) {
                Err(changed) if changed.kind == Kind::Data => changed,
                _ => e,
            }
        })
    }

    fn decode(&self, store: &dyn Store, artifact: &Artifact) -> Result<BTreeMap<String, u64>> {
        if artifact.is_incremental() {
            // Every piece it builds on is read and checked too: it restores only with them.
            let chain = files::incremental::chain_of(store, artifact)?;
            return files::incremental::derive_chain_counts(&chain, |a| self.decoder(store, a));
        }
        let mut decoder = self.decoder(store, artifact)?;
        let counts = match artifact.engine.as_str() {
            "files" => files::derive_counts(artifact, &mut decoder)?,
            "sqlite" => sqlite::derive_counts(artifact, &mut decoder, &self.scratch_dir())?,
            "mysql" => mysql::derive_counts(artifact, &mut decoder)?,
            "postgres" => postgres::derive_counts(artifact, &mut decoder)?,
            "mongodb" => mongodb::derive_counts(artifact, &mut decoder)?,
            "influxdb" => influxdb::derive_counts(artifact, &mut decoder, &self.scratch_dir())?,
            "command" => command::derive_counts(artifact, &mut decoder)?,
            other => {
                return Err(Error::usage(format!(
                    "{}: this bk-verify cannot verify {other} backups",
                    artifact.id
                )))
            }
        };
        decoder.finish(artifact)?;
        Ok(counts)
    }

    /// Restores into a scratch target, dropped whatever happens; returns the target's name
    /// and its counts.
    fn restore(&mut self, store: &dyn Store, artifact: &Artifact) -> Result<(String, BTreeMap<String, u64>)> {
        let engine = artifact.engine.clone();
        self.sweep(&engine)?;
        let scratch = scratch_name();
        let mut options = self.restore_options.clone();
        match engine.as_str() {
            "files" | "sqlite" => {
                let target = self.scratch_dir().join(&scratch);
                let removed = target.clone();
                let _remove = bk_core::cleanup::on_exit(move || remove_path(&removed));
                let restored = if artifact.is_incremental() {
                    let chain = files::incremental::chain_of(store, artifact)?;
                    files::restore_chain(
                        &chain,
                        |a| self.decoder(store, a),
                        &target,
                        &options,
                        files::incremental::Hashing::Contents,
                    )?
                } else if engine == "files" {
                    files::restore(artifact, self.decoder(store, artifact)?, &target, &options)?
                } else {
                    sqlite::restore(artifact, self.decoder(store, artifact)?, &target, &options)?
                };
                Ok((scratch, restored.counts))
            }
            "mysql" | "postgres" | "mongodb" | "influxdb" => {
                options.database = Some(scratch.clone());
                let dropper = options.clone();
                let dropped_name = scratch.clone();
                let _drop = bk_core::cleanup::on_exit(move || {
                    let scratch = dropped_name;
                    let dropped = match engine.as_str() {
                        "mysql" => mysql::drop_database(&dropper, &scratch),
                        "postgres" => postgres::drop_database(&dropper, &scratch),
                        "influxdb" => influxdb::drop_database(&dropper, &scratch),
                        _ => mongodb::drop_database(&dropper, &scratch),
                    };
                    if let Err(e) = dropped {
                        eprintln!(
                            "bk-verify: warning: could not drop the scratch database {scratch}: {}",
                            e.message
                        );
                    }
                });
                let decoder = self.decoder(store, artifact)?;
                let restored = match artifact.engine.as_str() {
                    "mysql" => mysql::restore(artifact, decoder, &options)?,
                    "postgres" => postgres::restore(artifact, decoder, &options)?,
                    "influxdb" => influxdb::restore(artifact, decoder, &options)?,
                    _ => mongodb::restore(artifact, decoder, &options)?,
                };
                Ok((scratch, restored.counts))
            }
            other => Err(Error::usage(format!(
                "{}: this bk-verify cannot restore {other} backups",
                artifact.id
            ))),
        }
    }

    /// Removes scratch targets a killed run left behind, once per engine, saying so.
    fn sweep(&mut self, engine: &str) -> Result<()> {
        if self.swept.iter().any(|e| e == engine) {
            return Ok(());
        }
        self.swept.push(engine.to_string());
        let stale = |name: &str| scratch_age(name).is_some_and(|age| age > LEFTOVER_AGE);
        match engine {
            "mysql" | "postgres" | "mongodb" | "influxdb" => {
                let (list, drop): ScratchDatabases = match engine {
                    "mysql" => (mysql::databases_like, mysql::drop_database),
                    "postgres" => (postgres::databases_like, postgres::drop_database),
                    "influxdb" => (influxdb::databases_like, influxdb::drop_database),
                    _ => (mongodb::databases_like, mongodb::drop_database),
                };
                for db in list(&self.restore_options, SCRATCH_PREFIX)?
                    .into_iter()
                    .filter(|d| stale(d))
                {
                    eprintln!("bk-verify: dropping {db}, a scratch database left by an interrupted run");
                    drop(&self.restore_options, &db)?;
                }
            }
            _ => {
                let dir = self.scratch_dir();
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if stale(&name) {
                        eprintln!(
                            "bk-verify: removing {}, left by an interrupted run",
                            entry.path().display()
                        );
                        remove_path(&entry.path());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reads the stored bytes as they are and checks their size and sha256 against the manifest.
fn stored_digest(store: &dyn Store, artifact: &Artifact) -> Result<()> {
    let mut raw = store.open(artifact)?;
    let (sha, bytes) =
        sha256_of(&mut raw, &format!("reading {}", artifact.file)).map_err(|e| Error::new(Kind::Io, e.message))?;
    check_digest(artifact, bytes, &sha)
}

/// How an engine lists and drops databases by name.
type ScratchDatabases = (
    fn(&RestoreOptions, &str) -> Result<Vec<String>>,
    fn(&RestoreOptions, &str) -> Result<()>,
);

/// `bk_verify_<unix seconds>_<random>`: its age can be read from its name.
fn scratch_name() -> String {
    bk_engines::stamped_name(SCRATCH_PREFIX)
}

fn scratch_age(name: &str) -> Option<Duration> {
    bk_engines::stamped_age(SCRATCH_PREFIX, name)
}

fn remove_path(path: &Path) {
    let removed = match std::fs::symlink_metadata(path) {
        // A restored tree may hold read-only directories (0555): made writable first.
        Ok(m) if m.is_dir() => files::remove_tree(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return,
    };
    if let Err(e) = removed {
        eprintln!("bk-verify: warning: could not remove {}: {e}", path.display());
    }
}

/// The tables whose counts differ, as `{"table", "expected", "found"}` objects (`null` for
/// a table on one side only). Keys are compared whole: PostgreSQL's are `schema.table` on
/// both sides. A MySQL (MongoDB) restore's are `<scratch>.table`, read as `<source database>.table`;
/// MySQL tables are shown without the database.
fn differences(artifact: &Artifact, found: &BTreeMap<String, u64>, scratch: Option<&str>) -> Vec<Value> {
    let database = artifact
        .source
        .database
        .as_deref()
        .filter(|_| matches!(artifact.engine.as_str(), "mysql" | "mongodb" | "influxdb"));
    let found: BTreeMap<String, u64> = match (database, scratch) {
        (Some(db), Some(scratch)) => found
            .iter()
            .map(
                |(k, v)| match k.strip_prefix(scratch).and_then(|t| t.strip_prefix('.')) {
                    Some(table) => (format!("{db}.{table}"), *v),
                    None => (k.clone(), *v),
                },
            )
            .collect(),
        _ => found.clone(),
    };
    // A restored chain is a tree of files: what the pieces add, change and delete is checked
    // as each one passes.
    let expected: BTreeMap<String, u64> = artifact
        .counts
        .iter()
        .filter(|(k, _)| !(artifact.is_incremental() && scratch.is_some()) || *k == files::incremental::FILES)
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let expected = &expected;
    let keys: std::collections::BTreeSet<&String> = expected.keys().chain(found.keys()).collect();
    keys.into_iter()
        .filter(|k| expected.get(*k) != found.get(*k))
        .map(|k| {
            let table = database
                .and_then(|db| k.strip_prefix(db)?.strip_prefix('.'))
                .unwrap_or(k);
            json!({"table": table, "expected": expected.get(k), "found": found.get(k)})
        })
        .collect()
}

/// The error of a count mismatch, naming every table that differs.
fn mismatch_error(artifact: &Artifact, what: &str, mismatches: &[Value]) -> Error {
    let show = |v: &Value| v.as_u64().map_or("none".to_string(), |n| n.to_string());
    let tables: Vec<String> = mismatches
        .iter()
        .map(|m| {
            format!(
                "{}: {} expected, {} found",
                m["table"].as_str().unwrap_or_default(),
                show(&m["expected"]),
                show(&m["found"])
            )
        })
        .collect();
    Error::data(format!("{}: {what}: {}", artifact.id, tables.join("; ")))
}

fn round(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names_tell_their_age() {
        let name = scratch_name();
        assert!(name.starts_with("bk_verify_"));
        assert!(scratch_age(&name).unwrap() < Duration::from_secs(5));
        assert!(scratch_age("bk_verify_1000_abc").unwrap() > LEFTOVER_AGE);
        assert!(scratch_age("bk_verify_x").is_none());
        assert!(scratch_age("bk_verify_1000_abc.db").is_some());
    }

    fn artifact(engine: &str, database: &str, counts: &[(&str, u64)]) -> Artifact {
        let counts: BTreeMap<&str, u64> = counts.iter().copied().collect();
        serde_json::from_value(json!({
            "id": "x.20260101T000000Z", "name": "x", "engine": engine,
            "source": {"host": "h", "database": database},
            "started": "", "finished": "", "file": "f", "format": "sql", "compression": "zstd",
            "encryption": null, "bytes": 0, "sha256": "", "content_bytes": 0, "counts": counts,
            "tool": {"program": "p", "version": "1"}, "bk_version": "0", "location": "l"
        }))
        .unwrap()
    }

    #[test]
    fn postgres_tables_are_compared_with_their_schema() {
        // Same table name in two schemas: each is compared on its own.
        let a = artifact("postgres", "shop", &[("a.t", 301), ("b.t", 5)]);
        let found = BTreeMap::from([("a.t".to_string(), 300), ("b.t".to_string(), 5)]);
        assert_eq!(
            differences(&a, &found, Some("bk_verify_1_x")),
            [json!({"table": "a.t", "expected": 301, "found": 300})]
        );
    }

    #[test]
    fn mysql_tables_of_the_scratch_database_stand_for_the_source_database() {
        let a = artifact("mysql", "my.db", &[("my.db.t", 2), ("my.db.u.v", 1), ("my.db.gone", 4)]);
        let found = BTreeMap::from([
            ("bk_verify_1_x.t".to_string(), 2),
            ("bk_verify_1_x.u.v".to_string(), 1),
            ("bk_verify_1_x.new".to_string(), 0),
        ]);
        assert_eq!(
            differences(&a, &found, Some("bk_verify_1_x")),
            [
                json!({"table": "gone", "expected": 4, "found": null}),
                json!({"table": "new", "expected": null, "found": 0}),
            ]
        );
        // The integrity level: keys as the stream has them.
        let same: BTreeMap<String, u64> = a.counts.clone();
        assert!(differences(&a, &same, None).is_empty());
    }
}
