//! bk-ship: copies artifacts to other stores. Push mode ships the artifacts whose records
//! come in on stdin (a pipeline after bk-dump); pull/sync mode (`--from STORE`) copies what
//! the destinations lack (a backup server that pulls from production hosts).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::time::Duration;

use bk_core::codec::sha256_through;
use bk_core::error::{from_io, Error, Kind, Result};
use bk_core::name::{parse_time, validate_name, DateIs};
use bk_core::record::{Artifact, Output, Record};
use bk_core::store::newest_per_name;
use bk_core::store::Store;
use clap::Parser;

/// Copy backups to other stores, checked.
///
/// Push mode (no --from): reads artifact records on stdin (from bk-dump, say), copies each
/// artifact and then its manifest to every --to store, and checks the copy's sha256. Every
/// input record is passed on, followed by one artifact record per new copy (with the copy's
/// location), so a bk-prune downstream sees every location. A copy already present with the
/// same sha256 is skipped. An upstream error record is passed on, nothing of its name is
/// shipped, and the run exits 1.
///
/// Pull/sync mode (--from STORE): copies the backups of STORE (all, or --latest, or
/// --since TIME; of one --name or of all) that a destination lacks, and prints a record per
/// new copy. A second run copies nothing. A destination that holds a backup of the same id
/// with a different sha256 is an error (65): it is neither kept silently nor overwritten. A
/// broken backup of STORE (an unreadable manifest, a missing or resized artifact file) is
/// reported (65), not copied.
///
/// Stores: a directory or file:// URL, s3://bucket/prefix (credentials and region from the
/// AWS variables and ~/.aws files; --s3-endpoint for other S3 servers), or
/// ssh://user@host[:port]/absolute/path (the system's ssh and ~/.ssh/config; BK_SSH_COMMAND
/// replaces `ssh`, e.g. `ssh -i KEY`), ftp:// or ftps://[user@]host[:port]/path (the password
/// from ~/.netrc, NETRC or BK_FTP_CREDENTIALS; SSL_CERT_FILE for a private CA), or
/// rclone:REMOTE:path (the system's rclone and its config, which keeps the credentials: every
/// rclone backend). Transient failures (an unreachable store, a lock held, an I/O error on
/// the way to or from a remote store) are retried with backoff; a local filesystem's errors
/// (a --to that is a file, a full disk) fail at once.
#[derive(Debug, Parser)]
#[command(name = "bk-ship", version, after_help = bk_core::cli::exit_status_help())]
pub struct Cli {
    /// A destination store (repeatable)
    #[arg(long = "to", value_name = "STORE", required = true)]
    pub to: Vec<String>,
    /// Pull/sync mode: copy the backups of this store instead of the records on stdin
    #[arg(long, value_name = "STORE")]
    pub from: Option<String>,
    /// With --from: only the backups of this job name
    #[arg(long, requires = "from")]
    pub name: Option<String>,
    /// With --from: only the newest backup of each name
    #[arg(long, requires = "from", conflicts_with_all = ["since", "all"])]
    pub latest: bool,
    /// With --from: only backups started at or after TIME (RFC 3339, a stamp,
    /// YYYY-MM-DD HH:MM[:SS] in UTC, or a date: its start)
    #[arg(long, value_name = "TIME", requires = "from", conflicts_with = "all")]
    pub since: Option<String>,
    /// With --from: every backup (the default)
    #[arg(long, requires = "from")]
    pub all: bool,
    /// Delete each backup from its source once every destination holds a checked copy, and
    /// only if the source store's own manifest of it says what the record says
    #[arg(long)]
    pub delete_source: bool,
    /// Attempts after the first for a copy that fails transiently
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub retries: u32,
    #[command(flatten)]
    pub s3: bk_core::cli::S3Opts,
    /// Only warnings and errors on stderr, not a line per copy (for cron, which mails any
    /// output)
    #[arg(short, long)]
    pub quiet: bool,
}

/// What a destination holds, per name, listed once per run.
struct Destination {
    store: Box<dyn Store>,
    held: BTreeMap<String, Vec<Artifact>>,
}

impl Destination {
    fn held(&mut self, name: &str) -> Result<&mut Vec<Artifact>> {
        if !self.held.contains_key(name) {
            let artifacts = match self.store.list(Some(name)) {
                Ok(listing) => listing.artifacts,
                Err(e) if e.kind == Kind::NoInput => Vec::new(),
                Err(e) => return Err(e),
            };
            self.held.insert(name.to_string(), artifacts);
        }
        Ok(self.held.get_mut(name).expect("inserted above"))
    }
}

impl bk_core::cli::Tool for Cli {}

pub fn run(cli: Cli, out: &mut Output) -> Result<()> {
    let config = cli.s3.store_config();
    if let Some(n) = &cli.name {
        validate_name(n)?;
    }
    let since = cli.since.as_deref().map(|t| parse_time(t, DateIs::Start)).transpose()?;
    let mut dests = Vec::new();
    for url in &cli.to {
        dests.push(Destination {
            store: bk_stores::open(url, &config)?,
            held: BTreeMap::new(),
        });
    }
    let shipper = Shipper {
        retries: cli.retries,
        delete_source: cli.delete_source,
        quiet: cli.quiet,
    };
    match &cli.from {
        None => {
            let inputs = bk_core::cli::read_stdin_records(out, "pipe bk-dump's output in, or pull with --from STORE")?;
            let failed: BTreeSet<String> = inputs
                .iter()
                .filter_map(|i| match &i.record {
                    Record::Error(e) => e.name.clone(),
                    _ => None,
                })
                .collect();
            for input in &inputs {
                out.pass(input)?;
                let Record::Artifact(a) = &input.record else { continue };
                if failed.contains(&a.name) {
                    shipper.say(out, &format!("{}: not shipped: its run failed upstream", a.id));
                    continue;
                }
                match bk_stores::open_location(a, &config) {
                    Ok(source) => shipper.ship(source.as_ref(), a, &mut dests, out)?,
                    Err(e) => out.error(&e.named(&a.name))?,
                }
            }
        }
        Some(from) => {
            let source = bk_stores::open(from, &config)?;
            let listing = source.list(cli.name.as_deref())?;
            let (mut artifacts, mut broken) = (listing.artifacts, listing.broken);
            if cli.latest {
                artifacts = newest_per_name(artifacts);
                // Only those newer than the newest good backup of their name (ids are
                // `<name>.<stamp>`).
                broken.retain(|b| !artifacts.iter().any(|a| a.name == b.name && a.id >= b.id));
            }
            if let Some(since) = since {
                artifacts.retain(|a| parse_time(&a.started, DateIs::Start).is_ok_and(|t| t >= since));
                broken.retain(|b| {
                    let stamp = b.id.rsplit_once('.').map(|(_, stamp)| stamp).unwrap_or_default();
                    parse_time(stamp, DateIs::Start).map_or(true, |t| t >= since)
                });
            }
            if let (Some(n), true) = (&cli.name, artifacts.is_empty() && broken.is_empty()) {
                return Err(Error::no_input(format!("no backup of {n} in {}", source.url())).named(n));
            }
            // A broken backup of the source is not copied: it is reported (65).
            for b in &broken {
                out.error(&b.error())?;
            }
            for a in &artifacts {
                shipper.ship(source.as_ref(), a, &mut dests, out)?;
            }
        }
    }
    Ok(())
}

struct Shipper {
    retries: u32,
    delete_source: bool,
    quiet: bool,
}

/// How a destination came to hold a backup.
enum Copied {
    /// Copied now, checked: its record, and the bytes an interrupted earlier copy had
    /// left there (rsync resumed it).
    New(Artifact, u64),
    /// Already there with the same sha256 (its record); not re-read.
    Present(Artifact),
    /// The destination is the source itself.
    Same,
}

impl Shipper {
    /// A line saying what was done, on stderr unless --quiet.
    fn say(&self, out: &Output, line: &str) {
        if !self.quiet {
            eprintln!("{}: {line}", out.tool());
        }
    }

    /// Copies one backup to every destination; failures become error records.
    fn ship(&self, source: &dyn Store, a: &Artifact, dests: &mut [Destination], out: &mut Output) -> Result<()> {
        let mut all_held = true;
        let mut present = Vec::new();
        for (i, dest) in dests.iter_mut().enumerate() {
            match self.copy_with_retries(source, a, dest) {
                Ok(Copied::New(copy, resumed)) => {
                    let how = match resumed {
                        0 => String::new(),
                        n => format!(" (resumed: {n} bytes were already there)"),
                    };
                    self.say(out, &format!("{}: copied to {}{how}", a.id, copy.location));
                    out.emit(&Record::Artifact(copy))?;
                }
                Ok(Copied::Present(copy)) => {
                    self.say(out, &format!("{}: already in {}", a.id, dest.store.url()));
                    present.push((i, copy));
                }
                Ok(Copied::Same) => all_held = false,
                Err(e) => {
                    all_held = false;
                    out.error(&e.named(&a.name))?;
                }
            }
        }
        if self.delete_source && all_held {
            // A copy found already there is re-read before the source goes.
            for (i, copy) in &present {
                if let Err(e) = check_copy(dests[*i].store.as_ref(), &copy_of(a, copy)) {
                    out.error(&e.context("source kept").named(&a.name))?;
                    return Ok(());
                }
            }
            if let Err(e) = check_source_manifest(source, a) {
                out.error(&e.context("source kept").named(&a.name))?;
                return Ok(());
            }
            match source.delete(a) {
                Ok(()) => self.say(out, &format!("{}: deleted from {}", a.id, source.url())),
                Err(e) => out.error(&e.context(format!("deleting {} from the source", a.id)).named(&a.name))?,
            }
        }
        Ok(())
    }

    fn copy_with_retries(&self, source: &dyn Store, a: &Artifact, dest: &mut Destination) -> Result<Copied> {
        let remote = source.local_root().is_none() || dest.store.local_root().is_none();
        let mut attempt = 0;
        loop {
            match copy(source, a, dest) {
                Err(e) if attempt < self.retries && transient(&e, remote) => {
                    attempt += 1;
                    let wait = Duration::from_secs(1 << attempt.min(6));
                    eprintln!(
                        "bk-ship: {}: {} (attempt {attempt} of {} in {}s)",
                        a.id,
                        e.message,
                        self.retries + 1,
                        wait.as_secs()
                    );
                    std::thread::sleep(wait);
                }
                other => return other,
            }
        }
    }
}

/// Whether waiting may cure a failure: an unreachable store, a lock held, or an I/O error
/// on the way to or from a remote store (a connection dropped). A local filesystem's errors
/// (not a directory, disk full, read-only) and every refusal fail at once.
fn transient(e: &Error, remote: bool) -> bool {
    match e.kind {
        Kind::Unavailable | Kind::TempFail => true,
        Kind::Io => remote,
        _ => false,
    }
}

/// The destination's record of a copy, for checking: the source's sha256 and file.
fn copy_of(a: &Artifact, copy: &Artifact) -> Artifact {
    let mut c = a.clone();
    c.location = copy.location.clone();
    c
}

/// Copies one artifact, then its manifest, unless the destination holds it already.
fn copy(source: &dyn Store, a: &Artifact, dest: &mut Destination) -> Result<Copied> {
    let location = dest.store.location(&a.name, &a.file);
    if location == a.location {
        return Ok(Copied::Same);
    }
    if let Some(held) = dest.held(&a.name)?.iter().find(|h| h.id == a.id).cloned() {
        if held.sha256 == a.sha256 && held.bytes == a.bytes && held.file == a.file {
            return Ok(Copied::Present(held));
        }
        return Err(Error::data(format!(
            "{} already holds a backup {} whose sha256 {} differs from the source's {} ({}): refusing to keep or overwrite it; check both copies",
            dest.store.url(),
            a.id,
            held.sha256,
            a.sha256,
            a.location
        )));
    }
    // A file on this machine may go by the destination's own way (rsync, resumable),
    // which checks the copy against the manifest's sha256 before publishing it.
    let file_copy = match source.local_root() {
        Some(root) => dest
            .store
            .put_file(&a.name, &a.file, &root.join(&a.name).join(&a.file), &a.sha256)?,
        None => None,
    };
    let resumed = match file_copy {
        Some(resumed) => resumed,
        None => {
            stream_copy(source, a, dest.store.as_ref(), &location)?;
            0
        }
    };
    let mut copy = a.clone();
    copy.location = location;
    if dest.store.local_root().is_some() {
        check_copy(dest.store.as_ref(), &copy)?;
    }
    dest.store.put_manifest(&copy)?;
    dest.held(&a.name)?.push(copy.clone());
    Ok(Copied::New(copy, resumed))
}

/// Streams an artifact into a new file of the destination, checking it against its manifest.
fn stream_copy(source: &dyn Store, a: &Artifact, dest: &dyn Store, location: &str) -> Result<()> {
    let mut reader = source.open(a)?;
    let mut upload = dest.create(&a.name, &a.file)?;
    let (sha, bytes) = copy_hashing(&mut reader, &mut upload, &a.location, location)?;
    if sha != a.sha256 || bytes != a.bytes {
        // Dropping the upload removes (or aborts) it.
        return Err(Error::data(format!(
            "{}: the source file differs from its manifest (sha256 {sha}, {bytes} bytes; manifest {}, {} bytes): not shipped",
            a.location, a.sha256, a.bytes
        )));
    }
    // Remote stores check the stored bytes against what was sent when they publish.
    upload.commit()
}

/// Streams `from` into `to`, hashing on the way.
fn copy_hashing(from: &mut dyn Read, to: &mut dyn Write, src: &str, dst: &str) -> Result<(String, u64)> {
    sha256_through(from, &format!("reading {src}"), |chunk| {
        to.write_all(chunk).map_err(|e| from_io(format!("writing {dst}"), e))
    })
}

/// Deleting goes by the source store's own manifest, never by a record alone (whose
/// `location` may point anywhere): it must be there, whole, and say what the record says.
fn check_source_manifest(source: &dyn Store, a: &Artifact) -> Result<()> {
    let listing = source.list(Some(&a.name))?;
    if let Some(broken) = listing.broken.iter().find(|b| b.id == a.id) {
        return Err(broken.error());
    }
    match listing.artifacts.iter().find(|m| m.id == a.id) {
        None => Err(Error::no_input(format!(
            "{} holds no manifest of {}: {} is not a backup of that store",
            source.url(),
            a.id,
            a.location
        ))),
        Some(m) if (&m.sha256, m.bytes, &m.file) != (&a.sha256, a.bytes, &a.file) => Err(Error::data(format!(
            "{}: the source's manifest says sha256 {} ({} bytes), the record {} ({} bytes)",
            a.id, m.sha256, m.bytes, a.sha256, a.bytes
        ))),
        Some(_) => Ok(()),
    }
}

/// Reads a copy back and compares its sha256 with the manifest's: 65 if it differs.
fn check_copy(store: &dyn Store, copy: &Artifact) -> Result<()> {
    let mut reader = store.open(copy)?;
    let (sha, bytes) = copy_hashing(&mut reader, &mut io::sink(), &copy.location, "nowhere")?;
    if sha != copy.sha256 || bytes != copy.bytes {
        return Err(Error::data(format!(
            "{}: the copy's sha256 is {sha} ({bytes} bytes), not {} ({} bytes)",
            copy.location, copy.sha256, copy.bytes
        )));
    }
    Ok(())
}
