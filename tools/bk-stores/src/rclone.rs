//! `rclone:REMOTE:path`: a store on any rclone backend (Box, Google Drive, B2, sftp, ...)
//! through the system's `rclone` and its config (`~/.config/rclone/rclone.conf` or
//! `RCLONE_CONFIG`), so credentials stay in rclone's config and never reach a command line.
//! `BK_RCLONE` names another rclone program.
//!
//! Uploads stream into `rclone rcat` under a hidden temporary name, are checked against the
//! sha256 of what was sent (`rclone hashsum sha256` where the backend has it, else read back
//! with `rclone cat`), then published with `rclone moveto`; the manifest is written last the
//! same way. Listing is `rclone lsjson --recursive` plus `rclone cat` of each manifest;
//! deleting is `rclone deletefile`, manifest first.
//!
//! Exit codes: rclone not installed, or the remote unreachable, 69; no such store or file 66;
//! a remote missing from rclone's config 78.

use std::io::{self, Read};
use std::process::{Child, Command, Stdio};
use std::time::SystemTime;

use bk_core::error::{Error, Kind, Result};
use bk_core::record::Artifact;
use bk_core::store::{manifest_file, Listing, Store, Upload};

use crate::piped::{PipedReader, PipedStore, PipedUpload};

/// rclone's exit codes for a directory or a file that is not there.
const RCLONE_DIR_NOT_FOUND: i32 = 3;
const RCLONE_FILE_NOT_FOUND: i32 = 4;
/// rclone's exit code for a temporary error.
const RCLONE_TEMPORARY: i32 = 5;

#[derive(Debug, Clone)]
pub struct RcloneStore {
    /// `rclone:REMOTE:path`, without a trailing slash.
    url: String,
    /// `REMOTE:path`, as rclone takes it.
    root: String,
}

impl RcloneStore {
    pub fn open(url: &str) -> Result<Self> {
        let advice = "keep credentials in rclone's config (rclone config, or RCLONE_CONFIG_<REMOTE>_<OPTION> variables), where they never reach a command line";
        crate::refuse_secret_in_url("store", url, true, advice)?;
        let rest = url
            .strip_prefix("rclone:")
            .ok_or_else(|| Error::usage(format!("store {url}: not an rclone: URL")))?;
        if let Some(option) = secret_option(rest) {
            return Err(Error::usage(format!(
                "store rclone:...: the connection string's option {option} holds a secret, which would show in ps, logs and records, and is refused; {advice}"
            )));
        }
        let Some((remote, _)) = rest.split_once(':') else {
            return Err(Error::usage(format!(
                "store {url}: no remote (rclone:REMOTE:path, REMOTE as in `rclone listremotes`)"
            )));
        };
        if remote.starts_with('-') || rest.contains(char::is_control) {
            return Err(Error::usage(format!("store {url}: bad remote (rclone:REMOTE:path)")));
        }
        // `remote:/` is the backend's absolute root; other trailing slashes go.
        let trimmed = rest.trim_end_matches('/');
        let root = if trimmed.ends_with(':') && rest.len() > trimmed.len() {
            format!("{trimmed}/")
        } else {
            trimmed.to_string()
        };
        Ok(RcloneStore {
            url: format!("rclone:{root}"),
            root,
        })
    }

    /// `REMOTE:path/<parts>`.
    fn path(&self, parts: &[&str]) -> String {
        let mut p = self.root.clone();
        for part in parts {
            if !(p.ends_with(':') || p.ends_with('/')) {
                p.push('/');
            }
            p.push_str(part);
        }
        p
    }

    fn command(&self, args: &[&str]) -> Command {
        let program = std::env::var("BK_RCLONE")
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "rclone".into());
        let mut cmd = Command::new(program);
        // Never ask for a config password on a terminal; fail instead.
        cmd.arg("--ask-password=false");
        cmd.args(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }

    fn spawn(&self, mut cmd: Command, doing: &str) -> Result<Child> {
        cmd.spawn().map_err(|e| spawn_error(doing, e))
    }

    /// Runs rclone; its stdout, or the failure classified.
    fn run(&self, args: &[&str], doing: &str) -> Result<Vec<u8>> {
        let child = self.spawn(self.command(args), doing)?;
        let out = child.wait_with_output().map_err(|e| Error::io(doing.to_string(), e))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(classify(out.status.code(), &out.stderr, doing))
    }

    /// Deletes a file; one that is not there is no error.
    fn delete_file(&self, path: &str, doing: &str) -> Result<()> {
        match self.run(&["--retries", "1", "deletefile", path], doing) {
            Err(e) if e.kind == Kind::NoInput => Ok(()),
            r => r.map(drop),
        }
    }

    /// The sha256 of a remote file: from the backend if it has it, else read back.
    fn sha256(&self, path: &str, doing: &str) -> Result<String> {
        if let Ok(out) = self.run(&["hashsum", "sha256", path], doing) {
            let text = String::from_utf8_lossy(&out);
            if let Some(h) = text.split_whitespace().next().filter(|h| h.len() == 64) {
                return Ok(h.to_ascii_lowercase());
            }
        }
        bk_core::codec::sha256_of(&mut self.reader(path, doing.to_string())?, doing).map(|(sha, _)| sha)
    }

    fn reader(&self, path: &str, doing: String) -> Result<PipedReader<RcloneStore>> {
        let child = self.spawn(self.command(&["cat", path]), &doing)?;
        Ok(PipedReader::new(self.clone(), child, doing))
    }

    /// Starts `rclone rcat` of a temporary name; the upload is published by `commit`.
    fn upload(&self, name: &str, file: &str) -> Result<PipedUpload<RcloneStore>> {
        bk_core::name::validate_name(name)?;
        let temp = self.path(&[name, &bk_core::store::temp_name(file)]);
        let location = self.location(name, file);
        let doing = format!("writing {location}");
        let mut cmd = self.command(&["rcat", &temp]);
        cmd.stdin(Stdio::piped()).stdout(Stdio::null());
        let child = self.spawn(cmd, &doing)?;
        Ok(PipedUpload::new(
            self.clone(),
            child,
            temp,
            self.path(&[name, file]),
            location,
        ))
    }

    /// The files under the root (or one name's directory), with their sizes where the
    /// backend knows them.
    fn files(&self, name: Option<&str>, min_age: Option<u64>) -> Result<crate::Files> {
        let dir = match name {
            Some(n) => self.path(&[n]),
            None => self.root.clone(),
        };
        let min_age = min_age.map(|s| format!("{s}s"));
        let mut args = vec!["lsjson", "--recursive", "--files-only", "--no-mimetype", "--no-modtime"];
        if let Some(age) = &min_age {
            args.retain(|a| *a != "--no-modtime");
            args.extend(["--min-age", age]);
        }
        if name.is_some() {
            args.extend(["--max-depth", "1"]);
        } else {
            args.extend(["--max-depth", "2"]);
        }
        args.push(&dir);
        let out = match self.run(&args, &format!("listing store {}", self.url)) {
            Ok(out) => out,
            // A name's directory that is not there holds nothing.
            Err(e) if e.kind == Kind::NoInput && name.is_some() => return Ok(crate::Files::new()),
            Err(e) if e.kind == Kind::NoInput => {
                return Err(Error::new(Kind::NoInput, format!("no store at {}", self.url)))
            }
            Err(e) => return Err(e),
        };
        let entries: Vec<serde_json::Value> = serde_json::from_slice(&out).map_err(|e| {
            Error::data(format!(
                "listing store {}: unreadable rclone lsjson output: {e}",
                self.url
            ))
        })?;
        let mut files = crate::Files::new();
        for entry in entries {
            let Some(path) = entry.get("Path").and_then(|p| p.as_str()) else {
                continue;
            };
            let (n, f) = match name {
                Some(n) if !path.contains('/') => (n, path),
                Some(_) => continue,
                None => match path.split_once('/') {
                    Some((n, f)) if !f.contains('/') => (n, f),
                    _ => continue,
                },
            };
            if bk_core::name::validate_name(n).is_err() {
                continue;
            }
            // -1: a size the backend does not know.
            let size = entry.get("Size").and_then(|s| s.as_u64());
            files.entry(n.to_string()).or_default().insert(f.to_string(), size);
        }
        Ok(files)
    }
}

/// The first option of an rclone connection string (`remote,option=value:path` or
/// `:backend,option=value:path`) that holds a secret (a password, key or token), as
/// `option=`; a file that holds one (`key_file=`) is no secret.
fn secret_option(rest: &str) -> Option<String> {
    rest.split(',').skip(1).find_map(|part| {
        let (option, _) = part.split_once('=')?;
        let option = option.trim().to_ascii_lowercase();
        let secret =
            ["pass", "secret", "token", "key"].iter().any(|s| option.contains(s)) && !option.ends_with("_file");
        secret.then(|| format!("{option}="))
    })
}

fn spawn_error(doing: &str, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::new(
            Kind::Unavailable,
            format!("{doing}: rclone is not installed (apt-get install rclone, or see rclone.org): {e}"),
        )
    } else {
        Error::new(Kind::Unavailable, format!("{doing}: cannot run rclone: {e}"))
    }
}

/// What a failed rclone run means, from its exit code and its last words.
fn classify(code: Option<i32>, stderr: &[u8], doing: &str) -> Error {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let last = lines.last().copied().unwrap_or("");
    // rclone prefixes its log lines with a date and time.
    let last = strip_log_stamp(last);
    let has = |p: &str| text.contains(p);
    let kind = if has("didn't find section in config file") {
        Kind::Config
    } else if has("couldn't connect")
        || has("connection refused")
        || has("dial tcp")
        || has("no such host")
        || has("i/o timeout")
        || has("network is unreachable")
        || has("connection reset")
    {
        Kind::Unavailable
    } else if has("ermission denied") || (has("403") && has("orbidden")) {
        Kind::NoPerm
    } else {
        match code {
            Some(RCLONE_DIR_NOT_FOUND | RCLONE_FILE_NOT_FOUND) => Kind::NoInput,
            _ if has("doesn't exist") || has("not found") || has("object not found") => Kind::NoInput,
            Some(RCLONE_TEMPORARY) => Kind::Unavailable,
            _ => Kind::Io,
        }
    };
    let why = if last.is_empty() {
        format!("rclone failed (exit {})", code.unwrap_or(-1))
    } else {
        last.to_string()
    };
    Error::new(kind, format!("{doing}: {why}"))
}

fn strip_log_stamp(line: &str) -> &str {
    // `2026/11/22 07:14:24 ERROR : ...`
    let b = line.as_bytes();
    if b.len() > 20 && b[4] == b'/' && b[7] == b'/' && b[13] == b':' && b[19] == b' ' {
        &line[20..]
    } else {
        line
    }
}

impl PipedStore for RcloneStore {
    fn child_failed(&self, code: Option<i32>, stderr: &[u8], doing: &str) -> Error {
        classify(code, stderr, doing)
    }

    fn publish(&self, temp: &str, target: &str, sent: &str, location: &str) -> Result<()> {
        let doing = format!("checking {location}");
        let copy = self.sha256(temp, &doing)?;
        if copy != sent {
            return Err(Error::data(format!(
                "{doing}: the copy's sha256 is {copy}, not {sent} as sent"
            )));
        }
        self.run(&["moveto", temp, target], &format!("publishing {location}"))
            .map(drop)
    }

    fn remove_temp(&self, temp: &str) {
        let _ = self.delete_file(temp, "cleaning up");
    }
}

impl Store for RcloneStore {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn location(&self, name: &str, file: &str) -> String {
        format!("rclone:{}", self.path(&[name, file]))
    }

    fn create(&self, name: &str, file: &str) -> Result<Box<dyn Upload>> {
        Ok(Box::new(self.upload(name, file)?))
    }

    fn has_manifest(&self, name: &str, id: &str) -> Result<bool> {
        bk_core::name::validate_name(name)?;
        let file = manifest_file(id);
        let path = self.path(&[name, &file]);
        match self.run(
            &["lsjson", "--stat", "--no-mimetype", &path],
            &format!("looking for {}", self.location(name, &file)),
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.kind == Kind::NoInput => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn list(&self, name: Option<&str>) -> Result<Listing> {
        if let Some(n) = name {
            bk_core::name::validate_name(n)?;
        }
        let files = self.files(name, None)?;
        Ok(crate::build_listing(
            files,
            |n, f| {
                let doing = format!("reading {}", self.location(n, f));
                let mut text = String::new();
                self.reader(&self.path(&[n, f]), doing.clone())?
                    .read_to_string(&mut text)
                    .map_err(|e| bk_core::error::from_io(doing, e))?;
                Ok(text)
            },
            |n, f| self.location(n, f),
        ))
    }

    fn open_file(&self, name: &str, file: &str) -> Result<Box<dyn Read>> {
        let doing = format!("reading {}", self.location(name, file));
        let reader = self.reader(&self.path(&[name, file]), doing)?;
        Ok(Box::new(io::BufReader::with_capacity(256 * 1024, reader)))
    }

    fn delete(&self, artifact: &Artifact) -> Result<()> {
        let manifest = manifest_file(&artifact.id);
        self.delete_file(
            &self.path(&[&artifact.name, &manifest]),
            &format!("deleting {}", self.location(&artifact.name, &manifest)),
        )?;
        self.delete_file(
            &self.path(&[&artifact.name, &artifact.file]),
            &format!("deleting {}", self.location(&artifact.name, &artifact.file)),
        )
    }

    fn remove_leftovers(&self, name: &str, older_than: SystemTime, dry_run: bool) -> Result<Vec<String>> {
        bk_core::name::validate_name(name)?;
        let age = SystemTime::now().duration_since(older_than).unwrap_or_default();
        let files = self.files(Some(name), Some(age.as_secs()))?;
        crate::remove_files(
            crate::temp_files(&files, name),
            dry_run,
            |f| self.location(name, f),
            |f, doing| self.delete_file(&self.path(&[name, f]), doing),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let s = RcloneStore::open("rclone:box:backups/bk/").unwrap();
        assert_eq!(s.root, "box:backups/bk");
        assert_eq!(s.url(), "rclone:box:backups/bk");
        assert_eq!(s.location("db", "db.1.sql"), "rclone:box:backups/bk/db/db.1.sql");
        let s = RcloneStore::open("rclone:sftp:/srv/bk").unwrap();
        assert_eq!(s.path(&["db", "f"]), "sftp:/srv/bk/db/f");
        let s = RcloneStore::open("rclone:b2:").unwrap();
        assert_eq!(s.path(&["db", "f"]), "b2:db/f");
        assert!(RcloneStore::open("rclone:nocolon").is_err());
        assert!(RcloneStore::open("rclone:-x:y").is_err());
    }

    #[test]
    fn secrets_in_the_url_are_refused_without_showing_them() {
        for (url, option) in [
            (":sftp,host=h,pass=hunter2:/srv/bk", "pass="),
            ("s3x,secret_access_key=hunter2:b/bk", "secret_access_key="),
            (":webdav,url='http://u:hunter2@h/':/bk", ""),
            (":http,url=http://u:hunter2@h:bk", ""),
        ] {
            let e = RcloneStore::open(&format!("rclone:{url}")).unwrap_err();
            assert_eq!(e.exit_code(), 64, "{url}");
            assert!(!e.message.contains("hunter2"), "{}", e.message);
            assert!(
                e.message.contains(option) && e.message.contains("rclone's config"),
                "{}",
                e.message
            );
        }
        assert!(RcloneStore::open("rclone::sftp,host=h,key_file=/k:/srv/bk").is_ok());
    }

    #[test]
    fn failures_are_classified() {
        let e = classify(
            Some(1),
            b"2026/11/22 07:14:34 Failed to create file system for \"down:/x\": NewFs: couldn't connect SSH: dial tcp 127.0.0.1:1: connect: connection refused\n",
            "listing",
        );
        assert_eq!(e.kind, Kind::Unavailable);
        assert!(!e.message.contains("2026/11/22"), "{}", e.message);
        let e = classify(Some(3), b"ERROR : : error listing: directory not found\n", "x");
        assert_eq!(e.kind, Kind::NoInput);
        let e = classify(
            Some(1),
            b"Failed to create file system: didn't find section in config file\n",
            "x",
        );
        assert_eq!(e.kind, Kind::Config);
    }
}
