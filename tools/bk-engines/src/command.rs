//! The `command` engine: any program's stdout as the artifact (pg_dumpall, slapcat,
//! `redis-cli --rdb -`, an application's own export). The program runs without a shell, in
//! bk's environment; its exit status, a signal, an empty output and a missing end marker fail
//! the backup. Restored into a file, to stdout, or into a program's stdin.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use bk_core::codec::{read_chunks, Decoder};
use bk_core::error::{from_io, redact, Error, Kind, Result};
use bk_core::private::create_private_file;
use bk_core::record::{Artifact, Source, ToolInfo};

use crate::process::{keep_tail, stream_from_relaying, stream_into_relaying};
use crate::{hidden_temp_beside, hostname, path_target, DumpJob, Dumped, RestoreOptions, RestoredInfo};

/// The counts keys: the content's bytes, and its newline characters (as `wc -l` counts).
const BYTES: &str = "bytes";
const LINES: &str = "lines";

/// The end marker must lie in this many last bytes of the content: dump programs end with a
/// completion line, often followed by a date or a comment's closing lines.
const MARKER_WINDOW: usize = 4096;
/// The longest end marker taken: it must fit in the window with room to spare.
const MARKER_MAX: usize = 1024;

#[derive(Debug, Clone, clap::Args)]
pub struct DumpArgs {
    /// The content's format: a word of a-z, 0-9 and '-' (at most 32; not json, the
    /// manifests' suffix) that names the file's type in the store, e.g. sql, ldif, rdb
    #[arg(long, value_name = "F", default_value = "raw", value_parser = parse_format)]
    pub format: String,
    /// Fail unless TEXT occurs in the output's last 4 KiB (the program's completion line,
    /// e.g. '-- PostgreSQL database cluster dump complete'); bk-verify and bk-restore check it
    /// again
    #[arg(long, value_name = "TEXT", value_parser = parse_end_marker, allow_hyphen_values = true)]
    pub end_marker: Option<String>,
    /// Accept an empty output (else a program that writes nothing fails the backup)
    #[arg(long)]
    pub allow_empty: bool,
    /// Count no lines (binary output): counts are then {"bytes": N} alone
    #[arg(long)]
    pub no_count_lines: bool,
    /// The program and its arguments, after '--'. Run without a shell, with bk's environment
    /// (pass secrets through it or the program's own files, never here: the command is kept
    /// in the manifest, URL passwords redacted)
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    pub command: Vec<OsString>,
}

/// `--format`: `[a-z0-9-]{1,32}`, as it becomes part of the file name.
fn parse_format(text: &str) -> std::result::Result<String, String> {
    let ok = (1..=32).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && text != "json";
    ok.then(|| text.to_string())
        .ok_or_else(|| "a format is 1 to 32 of a-z, 0-9 and '-' (and not json)".to_string())
}

fn parse_end_marker(text: &str) -> std::result::Result<String, String> {
    if text.is_empty() || text.len() > MARKER_MAX {
        return Err(format!("an end marker is 1 to {MARKER_MAX} bytes"));
    }
    Ok(text.to_string())
}

pub struct CommandJob {
    name: String,
    args: DumpArgs,
}

impl CommandJob {
    /// `name` is --name: required, since nothing else tells two commands' backups apart.
    pub fn new(args: DumpArgs, name: Option<&str>) -> Result<Self> {
        let name = name.ok_or_else(|| {
            Error::usage("bk-dump command needs --name NAME: nothing else tells one program's backups from another's")
        })?;
        Ok(CommandJob {
            name: name.to_string(),
            args,
        })
    }

    fn program(&self) -> &OsString {
        &self.args.command[0]
    }
}

impl DumpJob for CommandJob {
    fn engine(&self) -> &'static str {
        "command"
    }
    fn format(&self) -> &str {
        &self.args.format
    }
    fn default_name(&self) -> String {
        self.name.clone()
    }
    fn source(&self) -> Source {
        Source {
            host: hostname(),
            command: self.args.command.iter().map(|a| redact(&a.to_string_lossy())).collect(),
            end_marker: self.args.end_marker.clone(),
            ..Source::default()
        }
    }

    fn dump(&self, out: &mut dyn Write) -> Result<Dumped> {
        let mut cmd = Command::new(self.program());
        cmd.args(&self.args.command[1..]);
        let mut scan = Scan::new(!self.args.no_count_lines);
        stream_from_relaying(cmd, out, |b| scan.feed(b), |_| Kind::Io)?;
        let what = format!("{}'s output", self.program().to_string_lossy());
        if scan.bytes == 0 && !self.args.allow_empty {
            return Err(Error::new(
                Kind::Io,
                format!("{what} is empty (pass --allow-empty if that is a backup)"),
            ));
        }
        scan.check_marker(self.args.end_marker.as_deref(), &what)?;
        Ok(Dumped {
            counts: scan.counts(),
            tool: ToolInfo {
                // A program of the user's is never run with --version: it might do anything.
                program: Path::new(self.program())
                    .file_name()
                    .unwrap_or(self.program().as_os_str())
                    .to_string_lossy()
                    .into_owned(),
                version: String::new(),
            },
        })
    }
}

/// What the engine reads in a content stream: its size, its lines, and its last bytes.
struct Scan {
    bytes: u64,
    lines: Option<u64>,
    tail: Vec<u8>,
}

impl Scan {
    fn new(count_lines: bool) -> Self {
        Scan {
            bytes: 0,
            lines: count_lines.then_some(0),
            tail: Vec::new(),
        }
    }

    /// A scan of an artifact's content: lines counted when its manifest counted them.
    fn of(artifact: &Artifact) -> Self {
        Scan::new(artifact.counts.contains_key(LINES))
    }

    fn feed(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        if let Some(lines) = &mut self.lines {
            *lines += memchr::memchr_iter(b'\n', chunk).count() as u64;
        }
        keep_tail(&mut self.tail, MARKER_WINDOW, chunk);
    }

    fn counts(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::from([(BYTES.to_string(), self.bytes)]);
        if let Some(lines) = self.lines {
            counts.insert(LINES.to_string(), lines);
        }
        counts
    }

    /// `what` names the content in the error: a dump's output, or an artifact.
    fn check_marker(&self, marker: Option<&str>, what: &str) -> Result<()> {
        let Some(marker) = marker else { return Ok(()) };
        let found = self.tail.windows(marker.len()).any(|w| w == marker.as_bytes());
        if found {
            return Ok(());
        }
        Err(Error::new(
            Kind::Io,
            format!("{what} does not end with {marker:?} (in its last {MARKER_WINDOW} bytes): it is incomplete"),
        ))
    }

    /// The checks of a stored artifact's content, once read: its end marker and its counts
    /// against the manifest (exit 65).
    fn check_artifact(&self, artifact: &Artifact) -> Result<()> {
        self.check_marker(artifact.source.end_marker.as_deref(), &artifact.file)
            .map_err(|e| Error::data(e.message))?;
        if let Some(m) = crate::count_mismatch(&artifact.counts, &self.counts(), &[]) {
            return Err(Error::data(format!(
                "{}: the content differs from the manifest: {m}",
                artifact.file
            )));
        }
        Ok(())
    }
}

/// bk-verify's integrity level: the counts re-derived from the content, its end marker.
pub fn derive_counts(artifact: &Artifact, decoder: &mut Decoder) -> Result<BTreeMap<String, u64>> {
    let mut scan = Scan::of(artifact);
    crate::for_each_chunk(decoder, |b| scan.feed(b))?;
    scan.check_marker(artifact.source.end_marker.as_deref(), &artifact.file)
        .map_err(|e| Error::data(e.message))?;
    Ok(scan.counts())
}

/// Where a command backup's content goes back to.
pub enum Target<'a> {
    /// A new file (or, with --replace, one replaced whole), renamed into place once checked.
    File(&'a Path),
    /// bk-restore's stdout.
    Stdout,
    /// A program's stdin (`psql`, `slapadd`, `mongorestore --archive`...).
    Program(&'a [OsString]),
}

/// Restores the content to `target`, checking all of it (sha256, end marker, counts). A
/// file is written beside the target under a hidden name and renamed over it only once
/// checked; stdout and a program get the bytes as they are decoded, so bk-restore checks the
/// stored bytes' sha256 before it starts.
pub fn restore(
    artifact: &Artifact,
    mut decoder: Decoder,
    target: Target,
    opts: &RestoreOptions,
) -> Result<RestoredInfo> {
    if !opts.include.is_empty() || !opts.tables.is_empty() || opts.database.is_some() {
        return Err(Error::usage(
            "--include, --table and --database are for other backups: a command backup restores whole",
        ));
    }
    let mut scan = Scan::of(artifact);
    let reading = format!("restoring {}", artifact.file);
    let (described, staged) = match target {
        Target::File(path) => {
            let staged = Staged::write(path, opts.replace, |file| {
                read_chunks(&mut decoder, &reading, |chunk| {
                    scan.feed(chunk);
                    file.write_all(chunk)
                        .map_err(|e| from_io("writing the restored file", e))
                })
            })?;
            (path_target(path), Some((staged, path)))
        }
        Target::Stdout => {
            let mut stdout = io::stdout().lock();
            read_chunks(&mut decoder, &reading, |chunk| {
                scan.feed(chunk);
                stdout.write_all(chunk).map_err(|e| from_io("writing to stdout", e))
            })?;
            stdout.flush().map_err(|e| from_io("writing to stdout", e))?;
            (serde_json::Map::from_iter([("stdout".to_string(), true.into())]), None)
        }
        Target::Program(command) => {
            let mut cmd = Command::new(&command[0]);
            cmd.args(&command[1..]);
            let mut input = Scanning {
                inner: &mut decoder,
                scan: &mut scan,
            };
            stream_into_relaying(cmd, &mut input, |_| Kind::Io)?;
            let words: Vec<serde_json::Value> = command.iter().map(|w| redact(&w.to_string_lossy()).into()).collect();
            (
                serde_json::Map::from_iter([("command".to_string(), words.into())]),
                None,
            )
        }
    };
    // What the consumer left unread, the stored bytes' sha256, then the content's own checks.
    decoder.finish(artifact)?;
    scan.check_artifact(artifact)?;
    if let Some((staged, path)) = staged {
        staged.publish(path)?;
    }
    Ok(RestoredInfo {
        target: described,
        counts: scan.counts(),
        complete: true,
    })
}

/// A restored file under a hidden name beside its target, removed unless published.
struct Staged {
    temp: PathBuf,
    _remove: bk_core::cleanup::Guard,
}

impl Staged {
    /// Refuses a directory, and an existing file unless `replace`; then writes the new file
    /// (mode 0600) with `fill` and syncs it.
    fn write(path: &Path, replace: bool, fill: impl FnOnce(&mut fs::File) -> Result<()>) -> Result<Staged> {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => {
                return Err(Error::cant_create(format!(
                    "{} is a directory; give the path of a file",
                    path.display()
                )))
            }
            Ok(_) if !replace => {
                return Err(Error::cant_create(format!(
                    "{} exists; pass --replace to overwrite it",
                    path.display()
                )))
            }
            _ => {}
        }
        let temp = hidden_temp_beside(path)?;
        let removed = temp.clone();
        let staged = Staged {
            temp,
            _remove: bk_core::cleanup::on_exit(move || {
                let _ = fs::remove_file(&removed);
            }),
        };
        let mut file = create_private_file(&staged.temp)?;
        fill(&mut file)?;
        file.sync_all()
            .map_err(|e| Error::io(format!("writing {}", staged.temp.display()), e))?;
        Ok(staged)
    }

    /// Renames the file over its target (a symlink there is replaced, not followed).
    fn publish(self, path: &Path) -> Result<()> {
        fs::rename(&self.temp, path)
            .map_err(|e| Error::io(format!("moving the restored file to {}", path.display()), e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename is durable once its directory is.
            let _ = fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

/// A reader that scans what passes through it.
struct Scanning<'a> {
    inner: &'a mut dyn Read,
    scan: &'a mut Scan,
}

impl Read for Scanning<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.scan.feed(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_the_end_marker_are_the_same_in_any_chunks() {
        let mut content = b"one\ntwo\n".repeat(1000);
        content.extend_from_slice(b"-- done on Tuesday\n\n");
        for size in [1, 7, 4096, 100_000] {
            let mut scan = Scan::new(true);
            content.chunks(size).for_each(|c| scan.feed(c));
            assert_eq!(
                scan.counts(),
                BTreeMap::from([("bytes".into(), content.len() as u64), ("lines".into(), 2002)])
            );
            assert!(scan.check_marker(Some("-- done"), "x").is_ok(), "chunks of {size}");
            assert!(scan.check_marker(Some("-- undone"), "x").is_err());
        }
    }

    #[test]
    fn a_marker_followed_by_more_than_the_window_is_missing() {
        let mut scan = Scan::new(false);
        scan.feed(b"-- done\n");
        scan.feed(&vec![b'x'; MARKER_WINDOW]);
        assert!(scan.check_marker(Some("-- done"), "x").is_err());
        assert_eq!(
            scan.counts(),
            BTreeMap::from([("bytes".into(), 8 + MARKER_WINDOW as u64)])
        );
    }

    #[test]
    fn formats_are_file_name_words() {
        for ok in ["raw", "sql", "mongo-archive", "a", &"x".repeat(32)] {
            assert!(parse_format(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Raw", "a/b", "a.b", "json", "..", &"x".repeat(33)] {
            assert!(parse_format(bad).is_err(), "{bad}");
        }
    }
}
