//! bk's engines: how each kind of source is dumped and restored, shared by bk-dump,
//! bk-restore and bk-verify. Tools that need no engine (bk-ls, ...) do not link this.

pub mod command;
pub mod conn;
pub mod files;
pub mod influxdb;
pub mod mongodb;
pub mod mysql;
pub mod postgres;
pub mod process;
pub mod sqlite;

use std::collections::BTreeMap;
use std::io::Write;

use bk_core::record::{Source, ToolInfo};
use bk_core::Result;

/// What a dump produced besides its bytes.
pub struct Dumped {
    /// Exact rows, documents or entries in the artifact.
    pub counts: BTreeMap<String, u64>,
    pub tool: ToolInfo,
}

/// One source that becomes one artifact.
pub trait DumpJob {
    fn engine(&self) -> &'static str;
    fn format(&self) -> &str;
    fn default_name(&self) -> String;
    fn source(&self) -> Source;
    /// The database this job dumps, for `{database}` in a --name template.
    fn database(&self) -> Option<&str> {
        None
    }
    /// The compression bk-dump uses without --compress.
    fn default_compression(&self) -> bk_core::codec::Compression {
        bk_core::codec::Compression::Zstd
    }
    /// Writes the whole content to `out`; an error means the content is incomplete.
    fn dump(&self, out: &mut dyn Write) -> Result<Dumped>;
    /// Incremental jobs (files --incremental): when their chains end. `None`: every backup of
    /// the job is whole, and `dump` makes it.
    fn full_every(&self) -> Option<files::incremental::FullEvery> {
        None
    }
    /// Incremental jobs: writes what changed since GNU tar's snapshot file `snapshot`
    /// (missing: everything, a full), which it updates; `parent` is the tree the snapshot
    /// stands for. Returns the tree after this backup too.
    fn dump_since(
        &self,
        out: &mut dyn Write,
        snapshot: &std::path::Path,
        parent: Option<&files::incremental::Tree>,
    ) -> Result<(Dumped, files::incremental::Tree)> {
        let _ = (out, snapshot, parent);
        Err(bk_core::error::Error::usage(format!(
            "{} backups cannot be incremental",
            self.engine()
        )))
    }
}

/// The options of the tools that read backups back (bk-restore, bk-verify): where the
/// database server and S3 are, and the keys.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadOpts {
    #[command(flatten)]
    pub conn: conn::ConnArgs,
    #[command(flatten)]
    pub mysql: conn::MysqlOpts,
    #[command(flatten)]
    pub mongo: mongodb::UriArgs,
    #[command(flatten)]
    pub influx: influxdb::InfluxOpts,
    #[command(flatten)]
    pub s3: bk_core::cli::S3Opts,
    /// age identity file to decrypt with (repeatable; must be mode 0600)
    #[arg(long, value_name = "FILE")]
    pub identity: Vec<std::path::PathBuf>,
    /// No progress on stderr
    #[arg(short, long)]
    pub quiet: bool,
}

impl ReadOpts {
    /// Loads the identities, before any store is opened.
    pub fn start(&self) -> Result<bk_core::codec::Identities> {
        bk_core::codec::load_identity_files(&self.identity)
    }
}

#[derive(Clone)]
pub struct RestoreOptions {
    pub replace: bool,
    /// Files backups: restore only what these globs match.
    pub include: Vec<String>,
    /// Database backups: restore only these tables.
    pub tables: Vec<String>,
    /// Database backups: the database to restore into [default: the source's].
    pub database: Option<String>,
    pub conn: conn::ConnArgs,
    pub mysql: conn::MysqlOpts,
    /// MongoDB: the server (the URI, or --host/--port of `conn`).
    pub mongo: mongodb::MongoConnArgs,
    /// InfluxDB: the RPC port and the credentials (the HTTP API is --host/--port of `conn`).
    pub influx: influxdb::InfluxOpts,
    /// PostgreSQL: restore neither owners nor privileges (for another server's roles).
    pub no_owner: bool,
    /// PostgreSQL custom format: pg_restore jobs in parallel.
    pub jobs: Option<u32>,
}

/// What a restore left at its target.
pub struct RestoredInfo {
    pub target: serde_json::Map<String, serde_json::Value>,
    pub counts: BTreeMap<String, u64>,
    /// False for a partial restore.
    pub complete: bool,
}

/// Throwaway targets (bk-verify's scratch databases, bk-restore's temporary collections)
/// older than this were left by a killed run: younger ones may belong to a run in progress.
pub const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// `<prefix><unix seconds>_<random>`: a throwaway target's name, which tells its age.
pub fn stamped_name(prefix: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!("{prefix}{now}_{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// The age of a [`stamped_name`] (anything may follow its stamp); `None` for another name.
pub fn stamped_age(prefix: &str, name: &str) -> Option<std::time::Duration> {
    let stamp: u64 = name.strip_prefix(prefix)?.split(['_', '.']).next()?.parse().ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(std::time::Duration::from_secs(now.saturating_sub(stamp)))
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// A hidden name beside `target`, in its directory (made if missing), for a file written whole
/// before it is renamed over the target: the rename is atomic within one filesystem.
pub fn hidden_temp_beside(target: &std::path::Path) -> Result<std::path::PathBuf> {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| bk_core::error::Error::create(&dir, e))?;
    let file_name = target
        .file_name()
        .ok_or_else(|| bk_core::error::Error::usage(format!("{} is not a file path", target.display())))?;
    Ok(dir.join(format!(
        ".{}.bk-restore-{:08x}",
        file_name.to_string_lossy(),
        rand::random::<u32>()
    )))
}

/// A restore target that is a path.
pub fn path_target(path: &std::path::Path) -> serde_json::Map<String, serde_json::Value> {
    serde_json::Map::from_iter([("path".to_string(), path.display().to_string().into())])
}

/// Rows per table, restored against the manifest's, compared by table name (a restored
/// database may have another name than the source's); `None` when they agree.
pub fn count_mismatch(
    expected: &BTreeMap<String, u64>,
    found: &BTreeMap<String, u64>,
    only: &[String],
) -> Option<String> {
    let by_table = |counts: &BTreeMap<String, u64>| -> BTreeMap<String, u64> {
        counts
            .iter()
            .map(|(k, v)| (k.split_once('.').map_or(k.as_str(), |(_, t)| t).to_string(), *v))
            .filter(|(t, _)| {
                // --table may name the table alone or qualified (PostgreSQL's SCHEMA.TABLE).
                only.is_empty()
                    || only
                        .iter()
                        .any(|o| o == t || o.split_once('.').is_some_and(|(_, n)| n == t))
            })
            .collect()
    };
    let (expected, found) = (by_table(expected), by_table(found));
    let differences: Vec<String> = expected
        .keys()
        .chain(found.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|t| expected.get(*t) != found.get(*t))
        .map(|t| {
            let show = |n: Option<&u64>| n.map_or("none".to_string(), u64::to_string);
            format!(
                "{t}: {} rows expected, {} found",
                show(expected.get(t)),
                show(found.get(t))
            )
        })
        .collect();
    (!differences.is_empty()).then(|| differences.join("; "))
}

/// Reads `input` to its end in large chunks, giving each to `each`.
pub fn for_each_chunk(input: &mut dyn std::io::Read, mut each: impl FnMut(&[u8])) -> Result<()> {
    bk_core::codec::read_chunks(input, "decoding", |chunk| {
        each(chunk);
        Ok(())
    })
}

/// A private (0700) working directory, removed with everything in it when dropped or when a
/// signal ends the run.
pub struct WorkDir {
    pub path: std::path::PathBuf,
    _remove: bk_core::cleanup::Guard,
}

impl WorkDir {
    /// `.bk-<purpose>-<random>` in `parent`, or $TMPDIR.
    pub fn new(parent: Option<&std::path::Path>, purpose: &str) -> Result<Self> {
        let parent = parent.map_or_else(std::env::temp_dir, std::path::Path::to_path_buf);
        let path = parent.join(format!(".bk-{purpose}-{:016x}", rand::random::<u64>()));
        bk_core::private::create_private_dir(&path)?;
        let removed = path.clone();
        let remove = bk_core::cleanup::on_exit(move || {
            if let Err(e) = std::fs::remove_dir_all(&removed) {
                eprintln!("bk: warning: could not remove {}: {e}", removed.display());
            }
        });
        Ok(WorkDir { path, _remove: remove })
    }
}
