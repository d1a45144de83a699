//! bk-verify: proves that backups restore. Level `integrity` (always) reads the whole
//! artifact: sha256, full decode and decryption, the format's end marker, and the counts
//! re-derived from the stream against the manifest's. Level `restore` (--scratch) also
//! restores into a throwaway target named bk_verify_<unix time>_<random>, compares every
//! table's count, and drops it whatever happens (SIGINT and SIGTERM included).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde_json::{json, Map, Value};

use bk_core::cli::read_stdin_records;
use bk_core::codec::{load_identities, Decoder, Identities};
use bk_core::error::{Error, Kind, Result};
use bk_core::ls::newest_per_name;
use bk_core::name::validate_name;
use bk_core::progress::Progress;
use bk_core::record::{Artifact, Output, Record};
use bk_core::store::{self, Store};

use crate::conn::{ConnArgs, MysqlOpts};
use crate::{count_mismatch, files, mysql, postgres, sqlite, RestoreOptions};

const SCRATCH_PREFIX: &str = "bk_verify_";
/// Scratch targets older than this were left by a killed run.
const LEFTOVER_AGE: Duration = Duration::from_secs(24 * 3600);

/// Prove that backups restore.
///
/// Reads artifact records on stdin (bk-dump ... | bk-verify), or picks backups from a store
/// with --from. Every artifact is read whole: its sha256, a full decode (and decryption),
/// its format's end marker, and the rows (entries) counted in the stream against the
/// manifest. With --scratch each is also restored into a throwaway target, its tables
/// compared with the manifest, and the target dropped whatever happens. Prints one verified
/// record per artifact; any mismatch or corruption also prints an error record and makes
/// the exit status 65.
#[derive(Debug, Parser)]
#[command(name = "bk-verify", version, after_help = bk_core::cli::exit_status_help())]
pub struct Cli {
    /// Verify backups from this store instead of the records on stdin
    #[arg(long, value_name = "STORE")]
    pub from: Option<String>,
    /// With --from: only this job name
    #[arg(long, requires = "from")]
    pub name: Option<String>,
    /// With --from: the backup with this id
    #[arg(long, requires = "from", conflicts_with_all = ["all", "sample"])]
    pub id: Option<String>,
    /// With --from: every backup (default: the newest of each name)
    #[arg(long, requires = "from", conflicts_with = "sample")]
    pub all: bool,
    /// With --from: the N newest backups of each name and N older ones picked at random
    #[arg(long, value_name = "N", requires = "from")]
    pub sample: Option<usize>,
    /// Also restore each backup into a throwaway target named bk_verify_<time>_<random>: a
    /// database on the server the connection options name (MySQL, PostgreSQL), or a file or
    /// directory in --scratch-dir (files, SQLite)
    #[arg(long)]
    pub scratch: bool,
    /// Where throwaway files and directories go [default: the temporary directory]
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub mysql: MysqlOpts,
    /// age identity file to decrypt with (repeatable; must be mode 0600)
    #[arg(long, value_name = "FILE")]
    pub identity: Vec<PathBuf>,
    /// No progress on stderr
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(cli: Cli, out: &mut Output) -> Result<()> {
    let identities: Identities = cli
        .identity
        .iter()
        .map(|p| load_identities(p))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    let mut verifier = Verifier::new(&cli, identities);
    match &cli.from {
        Some(url) => {
            let store = store::open(url)?;
            for artifact in pick(store.as_ref(), &cli)? {
                verifier.verify(store.as_ref(), &artifact, out)?;
            }
        }
        None => {
            let inputs = read_stdin_records("pipe artifact records in (bk-dump ... | bk-verify) or use --from")?;
            let mut seen = Vec::new();
            for input in &inputs {
                match &input.record {
                    Record::Artifact(a) if !seen.contains(&a.id) => {
                        seen.push(a.id.clone());
                        let store = store::open_location(a)?;
                        verifier.verify(store.as_ref(), a, out)?;
                    }
                    _ => out.pass(input)?,
                }
            }
        }
    }
    Ok(())
}

fn pick(store: &dyn Store, cli: &Cli) -> Result<Vec<Artifact>> {
    if let Some(n) = &cli.name {
        validate_name(n)?;
    }
    let all = store.list(cli.name.as_deref())?.artifacts;
    let picked: Vec<Artifact> = if let Some(id) = &cli.id {
        all.into_iter().filter(|a| &a.id == id).collect()
    } else if cli.all {
        all
    } else if let Some(n) = cli.sample {
        sample(all, n)
    } else {
        newest_per_name(all)
    };
    if picked.is_empty() {
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
}

impl<'a> Verifier<'a> {
    fn new(cli: &'a Cli, identities: Identities) -> Self {
        let restore_options = RestoreOptions {
            replace: false,
            include: Vec::new(),
            tables: Vec::new(),
            database: None,
            conn: cli.conn.clone(),
            mysql: cli.mysql.clone(),
            no_owner: true,
            jobs: None,
        };
        Verifier {
            cli,
            identities,
            restore_options,
            swept: Vec::new(),
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
        let failure = match outcome {
            Ok(()) if mismatches.is_empty() => None,
            Ok(()) => Some(Error::data(format!(
                "{}: {} count(s) differ from the manifest",
                artifact.id,
                mismatches.len()
            ))),
            Err(e) if e.kind == Kind::Data => Some(e),
            Err(e) => return Err(e.named(&artifact.name)),
        };
        let mut record = Map::new();
        record.insert("id".into(), artifact.id.clone().into());
        record.insert("name".into(), artifact.name.clone().into());
        record.insert("location".into(), artifact.location.clone().into());
        record.insert("ok".into(), failure.is_none().into());
        record.insert("level".into(), level.into());
        record.insert("checks".into(), Value::Object(checks));
        record.insert("mismatches".into(), Value::Array(mismatches));
        out.emit(&Record::Verified(record))?;
        match failure {
            Some(e) => out.error(&e.named(&artifact.name)),
            None => Ok(()),
        }
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
                checks.insert("integrity".into(), json!({"ok": true, "seconds": round(seconds)}));
                mismatches.extend(differences(&artifact.counts, &counts));
                if !mismatches.is_empty() {
                    return Ok(());
                }
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
        let started = Instant::now();
        let restored = self.restore(store, artifact);
        let seconds = started.elapsed().as_secs_f64();
        match restored {
            Ok(counts) => {
                let found = differences(&artifact.counts, &counts);
                checks.insert(
                    "restore".into(),
                    json!({"ok": found.is_empty(), "seconds": round(seconds), "compared": counts.len()}),
                );
                mismatches.extend(found);
                Ok(())
            }
            Err(e) => {
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
            Progress::new(&artifact.name, self.cli.quiet),
        )
    }

    /// Reads the whole artifact; returns the counts derived from its content.
    fn integrity(&self, store: &dyn Store, artifact: &Artifact) -> Result<BTreeMap<String, u64>> {
        let mut decoder = self.decoder(store, artifact)?;
        let counts = match artifact.engine.as_str() {
            "files" => files::derive_counts(artifact, &mut decoder)?,
            "sqlite" => sqlite::derive_counts(artifact, &mut decoder, &self.scratch_dir())?,
            "mysql" => mysql::derive_counts(artifact, &mut decoder)?,
            "postgres" => postgres::derive_counts(artifact, &mut decoder)?,
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

    /// Restores into a scratch target, dropped whatever happens; returns its counts.
    fn restore(&mut self, store: &dyn Store, artifact: &Artifact) -> Result<BTreeMap<String, u64>> {
        let engine = artifact.engine.clone();
        self.sweep(&engine)?;
        let scratch = scratch_name();
        let decoder = self.decoder(store, artifact)?;
        let mut options = self.restore_options.clone();
        match engine.as_str() {
            "files" | "sqlite" => {
                let target = self.scratch_dir().join(&scratch);
                let removed = target.clone();
                let _remove = bk_core::cleanup::on_exit(move || remove_path(&removed));
                let restored = if engine == "files" {
                    files::restore(artifact, decoder, &target, &options)?
                } else {
                    sqlite::restore(artifact, decoder, &target, &options)?
                };
                Ok(restored.counts)
            }
            "mysql" | "postgres" => {
                options.database = Some(scratch.clone());
                let dropper = options.clone();
                let _drop = bk_core::cleanup::on_exit(move || {
                    let dropped = if engine == "mysql" {
                        mysql::drop_database(&dropper, &scratch)
                    } else {
                        postgres::drop_database(&dropper, &scratch)
                    };
                    if let Err(e) = dropped {
                        eprintln!(
                            "bk-verify: warning: could not drop the scratch database {scratch}: {}",
                            e.message
                        );
                    }
                });
                let restored = if artifact.engine == "mysql" {
                    mysql::restore(artifact, decoder, &options)?
                } else {
                    postgres::restore(artifact, decoder, &options)?
                };
                Ok(restored.counts)
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
            "mysql" | "postgres" => {
                let (list, drop): (
                    fn(&RestoreOptions, &str) -> Result<Vec<String>>,
                    fn(&RestoreOptions, &str) -> Result<()>,
                ) = if engine == "mysql" {
                    (mysql::databases_like, mysql::drop_database)
                } else {
                    (postgres::databases_like, postgres::drop_database)
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

/// `bk_verify_<unix seconds>_<random>`: its age can be read from its name.
fn scratch_name() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!("{SCRATCH_PREFIX}{now}_{:06x}", rand::random::<u32>() & 0xff_ffff)
}

fn scratch_age(name: &str) -> Option<Duration> {
    let stamp: u64 = name
        .strip_prefix(SCRATCH_PREFIX)?
        .split(['_', '.'])
        .next()?
        .parse()
        .ok()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(now.saturating_sub(stamp)))
}

fn remove_path(path: &Path) {
    if path.is_dir() {
        let _ = std::fs::remove_dir_all(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// The tables whose counts differ, as `{"table", "expected", "found"}` objects.
fn differences(expected: &BTreeMap<String, u64>, found: &BTreeMap<String, u64>) -> Vec<Value> {
    if count_mismatch(expected, found, &[]).is_none() {
        return Vec::new();
    }
    let strip = |m: &BTreeMap<String, u64>| -> BTreeMap<String, u64> {
        m.iter()
            .map(|(k, v)| (k.split_once('.').map_or(k.as_str(), |(_, t)| t).to_string(), *v))
            .collect()
    };
    let (expected, found) = (strip(expected), strip(found));
    let mut tables: Vec<&String> = expected.keys().chain(found.keys()).collect();
    tables.sort();
    tables.dedup();
    tables
        .into_iter()
        .filter(|t| expected.get(*t) != found.get(*t))
        .map(|t| json!({"table": t, "expected": expected.get(t), "found": found.get(t)}))
        .collect()
}

fn round(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// The bk-verify program.
pub fn main() -> std::process::ExitCode {
    bk_core::cli::main(run)
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
}
