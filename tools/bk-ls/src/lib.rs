//! bk-ls: lists the backups (manifests) in a store.

use clap::Parser;

pub use bk_core::cli::Format;
use bk_core::error::{Error, Result};
use bk_core::name::validate_name;
use bk_core::progress::human_bytes;
use bk_core::record::{Artifact, Output, Record};
use bk_core::store::{self, newest_per_name};

/// List the backups in a store.
///
/// Reads the manifests under STORE/<name>/ and prints one artifact record per complete
/// backup, oldest first within each name. Files without a manifest (left by a killed run, or
/// copied in by hand) are not backups: they are reported on stderr as warnings. A broken
/// backup (a manifest that cannot be read, or whose artifact file is missing or of another
/// size) is not listed as a backup either: it gets an error record (exit 65), and a BROKEN
/// row in the table.
#[derive(Debug, Parser)]
#[command(
    name = "bk-ls",
    version,
    after_help = bk_core::cli::exit_status_help()
)]
pub struct Cli {
    /// The store: a directory, file:// URL, s3://bucket/prefix, ssh://user@host[:port]/path,
    /// ftp:// or ftps://[user@]host[:port]/path, or rclone:remote:path
    pub store: String,
    /// Only the backups of this job name
    #[arg(long)]
    pub name: Option<String>,
    /// Only the newest backup of each name
    #[arg(long)]
    pub latest: bool,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    #[command(flatten)]
    pub s3: bk_core::cli::S3Opts,
}

impl bk_core::cli::Tool for Cli {
    fn prints_records(&self) -> bool {
        self.format == Format::Json
    }
}

pub fn run(cli: Cli, out: &mut Output) -> Result<()> {
    if let Some(n) = &cli.name {
        validate_name(n)?;
    }
    let store = bk_stores::open(&cli.store, &cli.s3.store_config())?;
    let listing = store.list(cli.name.as_deref())?;
    for leftover in &listing.leftovers {
        eprintln!("{}: warning: {leftover}", out.tool());
    }
    let mut artifacts = listing.artifacts;
    if cli.latest {
        artifacts = newest_per_name(artifacts);
    }
    if let (Some(n), true) = (&cli.name, artifacts.is_empty() && listing.broken.is_empty()) {
        return Err(Error::no_input(format!("no backup of {n} in {}", store.url())).named(n));
    }
    match cli.format {
        Format::Json => {
            artifacts.into_iter().try_for_each(|a| out.emit(&Record::Artifact(a)))?;
            listing.broken.iter().try_for_each(|b| out.error(&b.error()))
        }
        Format::Table => {
            print_table(&artifacts, &listing.broken, out)?;
            listing.broken.iter().try_for_each(|b| out.error(&b.error()))
        }
    }
}

fn print_table(artifacts: &[Artifact], broken: &[store::Broken], out: &mut Output) -> Result<()> {
    let header = ["ID", "ENGINE", "FINISHED", "SIZE", "CONTENT", "ENCRYPTED"].map(String::from);
    let mut rows: Vec<[String; 6]> = artifacts
        .iter()
        .map(|a| {
            [
                a.id.clone(),
                a.engine.clone(),
                a.finished.clone(),
                human_bytes(a.bytes),
                human_bytes(a.content_bytes),
                if a.encryption.is_some() { "age" } else { "no" }.to_string(),
            ]
        })
        .collect();
    rows.extend(broken.iter().map(|b| {
        [
            b.id.clone(),
            "BROKEN".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]
    }));
    for line in bk_core::table::aligned_lines(header, &rows) {
        out.text(&line)?;
    }
    Ok(())
}
