//! `ssh://[user@]host[:port]/abs/path`: a store on another machine through the system's
//! `ssh`, so `~/.ssh/config`, agents and known_hosts work as users expect. `BK_SSH_COMMAND`
//! (words separated by spaces, as git's `GIT_SSH_COMMAND`) replaces `ssh`, e.g. to add
//! `-i KEY`. ssh runs in batch mode: it never asks for a password or a host key.
//!
//! The remote side needs only a POSIX shell, coreutils and `find` (with `-mindepth` and
//! `-maxdepth`, as GNU's and the BSDs' have): uploads go to a hidden temporary name (umask
//! 077: files 0600, directories 0700), are checked with `sha256sum` (or `shasum -a 256`)
//! against what was sent, synced, then renamed into place.
//!
//! A password in the URL is refused (64) without showing it (ssh would never send it, and a
//! URL shows in ps and records). The store touches regular files inside itself only: the
//! listing is `find -type f` with sizes (a truncated artifact is a broken backup), a name's
//! directory or an artifact that is a symlink is refused (65), and so is an artifact that
//! is not a regular file (a FIFO would hang `cat`).
//!
//! A file of this machine (bk-ship from a local store) goes by rsync when both sides have
//! it: to the stable hidden name `.<file>.tmp.partial` with `--partial`, so that a rerun
//! after an interrupted copy sends only what is missing; then the same check and rename.
//! Without rsync on either side, it is streamed as above.
//!
//! Exit codes: host unreachable or connection refused 69; host key unknown or changed 78;
//! authentication refused 77; a remote directory or file that cannot be created 73; a file
//! that cannot be written in full 74.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use bk_core::error::{Error, Kind, Result};
use bk_core::record::Artifact;
use bk_core::store::{manifest_file, Listing, Store, Upload};

use crate::piped::{PipedReader, PipedStore, PipedUpload};

#[derive(Debug, Clone)]
pub struct SshStore {
    /// Whether rsync runs on both sides, found out on the first file copied.
    rsync: std::sync::OnceLock<bool>,
    /// The URL without a trailing slash.
    url: String,
    /// `[user@]host`.
    destination: String,
    port: Option<u16>,
    /// The absolute root directory on the remote host.
    root: String,
}

/// A remote script's first line that refuses (65) a name's directory that is a symlink:
/// the store never reads, writes or deletes out of itself through one.
fn refuse_symlinked_dir(dir: &str) -> String {
    format!(
        "if [ -h {d} ]; then echo {m} >&2; exit {REMOTE_BAD_DATA}; fi",
        d = sh_quote(dir),
        m = sh_quote(&format!("{dir} is a symlink: not followed")),
    )
}

/// Single-quotes a word for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Exit codes the remote scripts use to say what failed.
const REMOTE_NO_INPUT: i32 = 66;
const REMOTE_CANT_CREATE: i32 = 73;
/// A copy that differs from what was sent, a symlink or a file that is not a regular one.
const REMOTE_BAD_DATA: i32 = 65;
const REMOTE_NO_PERM: i32 = 77;
/// A file that could be created but not written in full (a full disk, a quota, cat killed).
const REMOTE_IO: i32 = 74;

impl SshStore {
    pub fn open(url: &str) -> Result<Self> {
        crate::refuse_secret_in_url(
            "store",
            url,
            true,
            "bk's ssh runs in batch mode and never sends a password: give ssh a key (ssh-agent, IdentityFile in ~/.ssh/config, or BK_SSH_COMMAND='ssh -i KEY')",
        )?;
        let bad = |why: &str| Error::usage(format!("store {url}: {why} (ssh://user@host[:port]/absolute/path)"));
        let rest = url.strip_prefix("ssh://").ok_or_else(|| bad("not an ssh:// URL"))?;
        let slash = rest.find('/').ok_or_else(|| bad("no path"))?;
        let (authority, path) = rest.split_at(slash);
        let (userhost, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port = p.parse::<u16>().map_err(|_| bad("bad port"))?;
                (h, Some(port))
            }
            _ => (authority, None),
        };
        let host = userhost.rsplit('@').next().unwrap_or_default();
        let destination = userhost.replace(['[', ']'], "");
        if host.is_empty() || destination.starts_with('-') || destination.contains(char::is_whitespace) {
            return Err(bad("bad host"));
        }
        let root = path.trim_end_matches('/');
        let root = if root.is_empty() { "/" } else { root };
        Ok(SshStore {
            rsync: std::sync::OnceLock::new(),
            url: format!("ssh://{authority}{}", if root == "/" { "" } else { root }),
            destination,
            port,
            root: root.to_string(),
        })
    }

    fn dir(&self, name: &str) -> String {
        if self.root == "/" {
            format!("/{name}")
        } else {
            format!("{}/{name}", self.root)
        }
    }

    /// The ssh program and its options, without the destination: `BK_SSH_COMMAND` or `ssh`,
    /// batch mode, timeouts, the port.
    fn ssh_words(&self) -> Vec<String> {
        let ssh = std::env::var("BK_SSH_COMMAND").unwrap_or_else(|_| "ssh".into());
        let mut words: Vec<String> = ssh.split_whitespace().map(String::from).collect();
        if words.is_empty() {
            words.push("ssh".into());
        }
        for option in ["BatchMode=yes", "ConnectTimeout=20", "ServerAliveInterval=15"] {
            words.extend(["-o".to_string(), option.to_string()]);
        }
        if let Some(port) = self.port {
            words.extend(["-p".to_string(), port.to_string()]);
        }
        words
    }

    /// `ssh [opts] destination sh -c SCRIPT`.
    fn command(&self, script: &str) -> Command {
        let words = self.ssh_words();
        let mut cmd = Command::new(&words[0]);
        cmd.args(&words[1..]);
        cmd.arg(&self.destination);
        cmd.arg(format!("sh -c {}", sh_quote(script)));
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }

    /// Runs a script remotely; its stdout, or the failure classified.
    fn run(&self, script: &str, doing: &str, default: Kind) -> Result<Vec<u8>> {
        let out = self
            .command(script)
            .output()
            .map_err(|e| Error::new(Kind::Unavailable, format!("{doing}: cannot run ssh: {e}")))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(self.classify(out.status.code(), &out.stderr, doing, default))
    }

    /// What a failed ssh run means: ssh's own failures (exit 255) by their message, the
    /// remote scripts' by their exit code.
    fn classify(&self, code: Option<i32>, stderr: &[u8], doing: &str, default: Kind) -> Error {
        let text = String::from_utf8_lossy(stderr);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added"))
            .collect();
        let last = lines.last().copied().unwrap_or("");
        let has = |p: &str| text.contains(p);
        let host = self
            .port
            .map_or(self.destination.clone(), |p| format!("{}:{p}", self.destination));
        let (kind, why) = if has("REMOTE HOST IDENTIFICATION HAS CHANGED") {
            (
                Kind::Config,
                format!("the host key of {host} has CHANGED since it was recorded in known_hosts (a reinstalled host, or an attack): check it, then fix ~/.ssh/known_hosts"),
            )
        } else if has("Host key verification failed") || has("No ED25519 host key is known") || has("host key is known")
        {
            (
                Kind::Config,
                format!("host key verification failed for {host}: its key is not in ~/.ssh/known_hosts (add it with ssh-keyscan, after checking it)"),
            )
        } else if has("Permission denied (") || has("Too many authentication failures") {
            (Kind::NoPerm, format!("ssh authentication to {host} refused: {last}"))
        } else if code == Some(255) {
            (Kind::Unavailable, format!("cannot reach {host} over ssh: {last}"))
        } else {
            let kind = match code {
                Some(REMOTE_NO_INPUT) => Kind::NoInput,
                Some(REMOTE_CANT_CREATE) => Kind::CantCreate,
                Some(REMOTE_BAD_DATA) => Kind::Data,
                Some(REMOTE_NO_PERM) => Kind::NoPerm,
                Some(REMOTE_IO) => Kind::Io,
                _ if has("Permission denied") && default == Kind::CantCreate => Kind::CantCreate,
                _ if has("Permission denied") => Kind::NoPerm,
                _ if has("No such file") => Kind::NoInput,
                _ if has("No space left") => Kind::Io,
                _ => default,
            };
            let why = if last.is_empty() {
                format!("remote command failed (exit {})", code.unwrap_or(-1))
            } else {
                last.to_string()
            };
            (kind, why)
        };
        Error::new(kind, format!("{doing}: {why}"))
    }

    /// Starts `cat > tmp` on the remote host; the upload is published by `commit`.
    fn upload(&self, name: &str, file: &str) -> Result<PipedUpload<SshStore>> {
        bk_core::name::validate_name(name)?;
        let dir = self.dir(name);
        let temp = format!("{dir}/{}", bk_core::store::temp_name(file));
        let script = format!(
            "{l}\numask 077; mkdir -p {d} || exit {c}; : > {t} || exit {c}; cat > {t} || {{ rm -f {t}; exit {e}; }}",
            l = refuse_symlinked_dir(&dir),
            d = sh_quote(&dir),
            t = sh_quote(&temp),
            c = REMOTE_CANT_CREATE,
            e = REMOTE_IO,
        );
        let location = self.location(name, file);
        let mut cmd = self.command(&script);
        cmd.stdin(Stdio::piped()).stdout(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| Error::new(Kind::Unavailable, format!("writing {location}: cannot run ssh: {e}")))?;
        Ok(PipedUpload::new(
            self.clone(),
            child,
            temp,
            format!("{dir}/{file}"),
            location,
        ))
    }
    /// Checks the remote `temp` against `sha256` (removing it if it differs), syncs it and
    /// renames it to `target`. `expected` says where the sha256 comes from, for the message.
    fn check_and_rename(&self, temp: &str, target: &str, sha256: &str, expected: &str, location: &str) -> Result<()> {
        let script = format!(
            r#"t={t} s={s} e={e}
if command -v sha256sum >/dev/null 2>&1; then h=$(sha256sum < "$t") || exit 74
elif command -v shasum >/dev/null 2>&1; then h=$(shasum -a 256 < "$t") || exit 74
else echo "neither sha256sum nor shasum on the remote host" >&2; exit 69; fi
h=${{h%% *}}
if [ "$h" != "$s" ]; then rm -f "$t"; echo "the copy's sha256 is $h, not $s $e" >&2; exit {m}; fi
chmod 600 "$t" || exit 74
sync "$t" 2>/dev/null || sync
mv -f "$t" {f} || exit {c}
sync {d} 2>/dev/null || true"#,
            t = sh_quote(temp),
            s = sh_quote(sha256),
            e = sh_quote(expected),
            f = sh_quote(target),
            d = sh_quote(target.rsplit_once('/').map_or("/", |(d, _)| d)),
            m = REMOTE_BAD_DATA,
            c = REMOTE_CANT_CREATE,
        );
        self.run(&script, &format!("publishing {location}"), Kind::Io).map(drop)
    }

    /// Whether rsync runs here and on the remote host; asked once per store.
    fn has_rsync(&self) -> Result<bool> {
        if let Some(&known) = self.rsync.get() {
            return Ok(known);
        }
        let here = Command::new("rsync")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let both = here
            && self
                .run(
                    "command -v rsync >/dev/null 2>&1 && echo yes || echo no",
                    &format!("looking for rsync on {}", self.url),
                    Kind::Unavailable,
                )?
                .starts_with(b"yes");
        Ok(*self.rsync.get_or_init(|| both))
    }

    /// Copies a local file by rsync into `.<file>.tmp.partial`, which an interrupted copy
    /// leaves for the next one to resume, then checks and publishes it. The bytes rsync
    /// found already there.
    fn rsync_file(&self, name: &str, file: &str, path: &std::path::Path, sha256: &str) -> Result<u64> {
        let dir = self.dir(name);
        let location = self.location(name, file);
        let doing = format!("writing {location}");
        self.run(
            &format!(
                "{}\numask 077; mkdir -p {} || exit {REMOTE_CANT_CREATE}",
                refuse_symlinked_dir(&dir),
                sh_quote(&dir)
            ),
            &doing,
            Kind::CantCreate,
        )?;
        let partial = format!("{dir}/.{file}.tmp.partial");
        // A relative path with a colon would read as a remote one.
        let source = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::path::Path::new(".").join(path)
        };
        let out = Command::new("rsync")
            // Always compare the blocks (a partial may have any size and time), keep what
            // an interruption leaves, new files 0600, paths passed as they are.
            .args([
                "--ignore-times",
                "--partial",
                "--stats",
                "--chmod=F600",
                "--protect-args",
            ])
            .arg("-e")
            .arg(self.ssh_words().join(" "))
            .arg(&source)
            .arg(format!("{}:{partial}", self.destination))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::new(Kind::Unavailable, format!("{doing}: cannot run rsync: {e}")))?;
        if !out.status.success() {
            return Err(self.classify(out.status.code(), &out.stderr, &doing, Kind::Io));
        }
        self.check_and_rename(
            &partial,
            &format!("{dir}/{file}"),
            sha256,
            "as in the manifest",
            &location,
        )?;
        // "Matched data: 1,234 bytes": what the receiver had already.
        let stats = String::from_utf8_lossy(&out.stdout);
        let matched = stats
            .lines()
            .find_map(|l| l.strip_prefix("Matched data:"))
            .map(|n| n.chars().filter(char::is_ascii_digit).collect::<String>())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Ok(matched)
    }
}

impl PipedStore for SshStore {
    fn child_failed(&self, code: Option<i32>, stderr: &[u8], doing: &str) -> Error {
        self.classify(code, stderr, doing, Kind::Io)
    }

    fn publish(&self, temp: &str, target: &str, sent: &str, location: &str) -> Result<()> {
        self.check_and_rename(temp, target, sent, "as sent", location)
    }

    fn remove_temp(&self, temp: &str) {
        let _ = self.run(&format!("rm -f {}", sh_quote(temp)), "cleaning up", Kind::Io);
    }
}

impl Store for SshStore {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn create(&self, name: &str, file: &str) -> Result<Box<dyn Upload>> {
        Ok(Box::new(self.upload(name, file)?))
    }

    fn put_file(&self, name: &str, file: &str, path: &std::path::Path, sha256: &str) -> Result<Option<u64>> {
        bk_core::name::validate_name(name)?;
        if !self.has_rsync()? {
            return Ok(None);
        }
        self.rsync_file(name, file, path, sha256).map(Some)
    }

    fn has_manifest(&self, name: &str, id: &str) -> Result<bool> {
        let path = format!("{}/{}", self.dir(name), manifest_file(id));
        let out = self.run(
            // A regular file, as the listing sees one: not a symlink.
            &format!(
                "if [ -f {p} ] && [ ! -h {p} ]; then echo yes; else echo no; fi",
                p = sh_quote(&path)
            ),
            &format!("looking for {}", self.location(name, &manifest_file(id))),
            Kind::Io,
        )?;
        Ok(out.starts_with(b"yes"))
    }

    fn list(&self, name: Option<&str>) -> Result<Listing> {
        if let Some(n) = name {
            bk_core::name::validate_name(n)?;
        }
        // Regular files only (`find -type f`: no symlink, FIFO or directory, and find does
        // not follow a symlinked name's directory), with their sizes; a manifest's content
        // follows its path, at most MAX_MANIFEST bytes of it.
        let start = match name {
            Some(n) => format!(
                "[ -d ./{n} ] || exit 0; find ./{n} -mindepth 1 -maxdepth 1",
                n = sh_quote(n)
            ),
            None => "find . -mindepth 2 -maxdepth 2".to_string(),
        };
        let script = format!(
            r#"cd {root} 2>/dev/null || {{ if [ -e {root} ]; then echo "cannot enter {root}: permission denied" >&2; exit {p}; fi; echo "no store at {root}" >&2; exit {n}; }}
{start} -type f -exec sh -c '
for f; do
  s=$(wc -c < "$f") || continue
  case "$f" in
    *.json) printf "M %s %s	" $((s)) "$f"; head -c {max} < "$f" | tr -d "
"; echo ;;
    *) printf "F %s %s
" $((s)) "$f" ;;
  esac
done' sh {{}} +"#,
            root = sh_quote(&self.root),
            p = REMOTE_NO_PERM,
            n = REMOTE_NO_INPUT,
            max = crate::MAX_MANIFEST,
        );
        let out = self.run(&script, &format!("listing store {}", self.url), Kind::Io)?;
        let text = String::from_utf8_lossy(&out);
        let mut files = crate::Files::new();
        let mut manifests: BTreeMap<(String, String), String> = BTreeMap::new();
        for line in text.lines() {
            let Some((kind, rest)) = line.split_once(' ') else {
                continue;
            };
            let Some((size, rest)) = rest.split_once(' ') else {
                continue;
            };
            let (path, content) = match (kind, rest.split_once('\t')) {
                ("M", Some((p, c))) => (p, Some(c)),
                ("M", None) => (rest, Some("")),
                ("F", _) => (rest, None),
                _ => continue,
            };
            let Some((n, f)) = path.strip_prefix("./").and_then(|p| p.split_once('/')) else {
                continue;
            };
            if f.contains('/') || bk_core::name::validate_name(n).is_err() {
                continue;
            }
            let files = files.entry(n.to_string()).or_default();
            files.insert(f.to_string(), size.parse().ok());
            if let Some(c) = content {
                manifests.insert((n.to_string(), f.to_string()), c.to_string());
            }
        }
        Ok(crate::build_listing(
            files,
            |n, f| {
                Ok(manifests
                    .get(&(n.to_string(), f.to_string()))
                    .cloned()
                    .unwrap_or_default())
            },
            |n, f| self.location(n, f),
        ))
    }

    fn open_file(&self, name: &str, file: &str) -> Result<Box<dyn Read>> {
        let dir = self.dir(name);
        let path = format!("{dir}/{}", file);
        let doing = format!("reading {}", self.location(name, file));
        // A symlink is not followed, and a FIFO would never end: regular files only.
        let script = format!(
            r#"{l}
f={f}
if [ -h "$f" ]; then echo "$f is a symlink: not followed" >&2; exit {d}; fi
if [ -e "$f" ] && [ ! -f "$f" ]; then echo "$f is not a regular file" >&2; exit {d}; fi
exec cat "$f""#,
            l = refuse_symlinked_dir(&dir),
            f = sh_quote(&path),
            d = REMOTE_BAD_DATA,
        );
        let child = self
            .command(&script)
            .spawn()
            .map_err(|e| Error::new(Kind::Unavailable, format!("{doing}: cannot run ssh: {e}")))?;
        Ok(Box::new(io::BufReader::with_capacity(
            256 * 1024,
            PipedReader::new(self.clone(), child, doing),
        )))
    }

    fn delete(&self, artifact: &Artifact) -> Result<()> {
        let dir = self.dir(&artifact.name);
        let script = format!(
            "{l}\ncd {d} 2>/dev/null || exit 0; rm -f {m} && rm -f {f} && {{ sync . 2>/dev/null || true; }}",
            l = refuse_symlinked_dir(&dir),
            d = sh_quote(&dir),
            m = sh_quote(&manifest_file(&artifact.id)),
            f = sh_quote(&artifact.file),
        );
        self.run(
            &script,
            &format!("deleting {}", self.location(&artifact.name, &artifact.file)),
            Kind::Io,
        )
        .map(drop)
    }

    fn remove_leftovers(&self, name: &str, older_than: SystemTime, dry_run: bool) -> Result<Vec<String>> {
        bk_core::name::validate_name(name)?;
        let age = SystemTime::now().duration_since(older_than).unwrap_or_default();
        let minutes = age.as_secs().div_ceil(60);
        let action = if dry_run { "-print" } else { "-print -exec rm -f {} +" };
        let dir = self.dir(name);
        let script = format!(
            "{l}\ncd {d} 2>/dev/null || exit 0; find . -maxdepth 1 -type f -name '.*.tmp.*' -mmin +{minutes} {action}",
            l = refuse_symlinked_dir(&dir),
            d = sh_quote(&dir),
        );
        let out = self.run(
            &script,
            &format!("removing leftovers of {name} in {}", self.url),
            Kind::Io,
        )?;
        let mut removed: Vec<String> = String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.strip_prefix("./"))
            .map(|f| self.location(name, f))
            .collect();
        removed.sort();
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let s = SshStore::open("ssh://bk@backup.example:2222/srv/bk/").unwrap();
        assert_eq!(
            (s.destination.as_str(), s.port, s.root.as_str()),
            ("bk@backup.example", Some(2222), "/srv/bk")
        );
        assert_eq!(
            s.location("db", "db.1.sql"),
            "ssh://bk@backup.example:2222/srv/bk/db/db.1.sql"
        );
        let s = SshStore::open("ssh://host/b").unwrap();
        assert_eq!((s.destination.as_str(), s.port), ("host", None));
        assert!(SshStore::open("ssh://host").is_err());
        assert!(SshStore::open("ssh://-oProxyCommand=x/b").is_err());
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
