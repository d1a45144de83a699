//! `bk-dump influxdb`: one artifact per database. `influxd backup -portable` writes the
//! database's metadata and shards into a private temporary directory; bk counts the shards'
//! field values from their bytes, streams the files into one tar and removes the directory,
//! whatever happens.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use bk_core::codec::Compression;
use bk_core::error::{from_io, Error, Result};
use bk_core::name::sanitize;
use bk_core::record::{Source, ToolInfo};

use super::{classify, gives_up, is_backup_file, is_shard, tsm, InfluxOpts, Server, INTERNAL_DATABASE};
use crate::process::{find_program, output_of, run_watched};
use crate::WorkDir;
use crate::{DumpJob, Dumped};

#[derive(Debug, Clone, clap::Args)]
pub struct DumpArgs {
    /// The server's host name or address [default: 127.0.0.1]
    #[arg(long)]
    pub host: Option<String>,
    /// The HTTP API's port (listing databases) [default: 8086]
    #[arg(long)]
    pub port: Option<u16>,
    #[command(flatten)]
    pub influx: InfluxOpts,
    /// Back up this database (repeatable) [default: every database but _internal]
    #[arg(long = "database", value_name = "DB")]
    pub databases: Vec<String>,
    /// Leave out this database (repeatable)
    #[arg(long, value_name = "DB")]
    pub exclude_database: Vec<String>,
}

pub fn jobs(args: &DumpArgs) -> Result<Vec<Box<dyn DumpJob>>> {
    let server = Server::new(args.host.as_deref(), args.port, &args.influx)?;
    let influxd = find_program(&["influxd"], "influxdb")?;
    let existing = server.databases()?;
    for d in &args.databases {
        if !existing.contains(d) {
            return Err(Error::no_input(format!("InfluxDB has no database {d}")));
        }
    }
    let databases: Vec<String> = if args.databases.is_empty() {
        existing.into_iter().filter(|d| d != INTERNAL_DATABASE).collect()
    } else {
        args.databases.clone()
    };
    let databases: Vec<String> = databases
        .into_iter()
        .filter(|d| !args.exclude_database.contains(d))
        .collect();
    if databases.is_empty() {
        return Err(Error::no_input("no database to back up"));
    }
    // "InfluxDB v1.6.7~rc0 (git: ...)" -> "1.6.7~rc0"
    let mut version = Command::new(&influxd);
    version.arg("version");
    let version = output_of(version, classify)?
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .trim_start_matches('v')
        .to_string();
    let tool = ToolInfo {
        program: "influxd".into(),
        version,
    };
    Ok(databases
        .into_iter()
        .map(|database| {
            Box::new(InfluxJob {
                server: server.clone(),
                influxd: influxd.clone(),
                tool: tool.clone(),
                database,
            }) as Box<dyn DumpJob>
        })
        .collect())
}

pub struct InfluxJob {
    server: Server,
    influxd: PathBuf,
    tool: ToolInfo,
    database: String,
}

impl DumpJob for InfluxJob {
    fn engine(&self) -> &'static str {
        "influxdb"
    }
    fn format(&self) -> &'static str {
        "influx-tar"
    }
    fn default_name(&self) -> String {
        format!("influxdb-{}", sanitize(&self.database))
    }
    fn database(&self) -> Option<&str> {
        Some(&self.database)
    }
    fn default_compression(&self) -> Compression {
        // The shards are gzip'd tars already (docs/engines.md has the figures).
        Compression::None
    }
    fn source(&self) -> Source {
        Source {
            host: crate::conn::local_or(Some(self.server.host.clone())),
            port: Some(self.server.http_port),
            database: Some(self.database.clone()),
            ..Source::default()
        }
    }

    fn dump(&self, out: &mut dyn Write) -> Result<Dumped> {
        let work = WorkDir::new(None, "influxdb-dump")?;
        let backup = work.path.join("backup");
        let shards = work.path.join("shard");
        bk_core::private::create_private_dir(&shards)?;
        let mut cmd = Command::new(&self.influxd);
        cmd.args([
            "backup",
            "-portable",
            "-host",
            &self.server.rpc(),
            "-database",
            &self.database,
        ])
        .arg(&backup);
        run_watched(cmd, classify, gives_up)?;
        let mut names: Vec<String> = std::fs::read_dir(&backup)
            .map_err(|e| Error::io(format!("reading {}", backup.display()), e))?
            .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io(format!("reading {}", backup.display()), e))?;
        names.sort();
        if let Some(odd) = names.iter().find(|n| !is_backup_file(n)) {
            return Err(Error::data(format!(
                "influxd backup wrote {odd:?}, which bk does not know: not backed up"
            )));
        }
        if !names.iter().any(|n| n.ends_with(".manifest")) {
            return Err(Error::data(
                "influxd backup wrote no manifest: the backup is incomplete",
            ));
        }
        let (mut counts, mut deleted) = (BTreeMap::new(), 0);
        let mut tar = tar::Builder::new(out);
        tar.mode(tar::HeaderMode::Deterministic);
        for name in &names {
            let path = backup.join(name);
            let open = || std::fs::File::open(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e));
            if is_shard(name) {
                let shard = tsm::count_shard(&mut open()?, name, &shards)?;
                for (k, n) in shard.values {
                    *counts.entry(k).or_insert(0) += n;
                }
                deleted += shard.deleted;
            }
            tar.append_file(name, &mut open()?)
                .map_err(|e| from_io("writing the artifact", e))?;
        }
        tar.into_inner().map_err(|e| from_io("writing the artifact", e))?;
        if deleted > 0 {
            eprintln!(
                "bk-dump: warning: {}: {deleted} field value(s) in the backup were deleted on the server but not \
                 compacted away yet; influxd restore ignores such deletes, so a restore brings them back (the \
                 counts include them)",
                self.database
            );
        }
        Ok(Dumped {
            counts,
            tool: self.tool.clone(),
        })
    }
}
