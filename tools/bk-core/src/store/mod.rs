//! Stores hold artifacts and their manifests under `<root>/<name>/` (SPEC §3).

mod local;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::SystemTime;

pub use local::{replace_file, LocalStore};

use crate::error::{Error, Result};
use crate::record::{parse_line, Artifact, Record};

/// An artifact being written. Dropping it without `commit` removes what was written, so a
/// failed dump never leaves a partial file under a final name.
pub trait Upload: Write {
    /// Makes the artifact durable and publishes it under its final name.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// What a store holds: complete artifacts (a manifest, and its artifact file of the size it
/// says), backups that are broken, and anything else.
#[derive(Debug, Default)]
pub struct Listing {
    /// Sorted by name, then by start time, oldest first.
    pub artifacts: Vec<Artifact>,
    /// Manifests that cannot be trusted as backups, sorted by name, then id: unreadable or
    /// invalid, or whose artifact file is missing or of another size. Never counted as a
    /// backup (bk-prune), reported by every tool that lists.
    pub broken: Vec<Broken>,
    /// Files without a manifest (a killed run's temporary file, say), each with why it is
    /// listed.
    pub leftovers: Vec<String>,
}

/// A manifest that does not stand for a usable backup.
#[derive(Debug, Clone)]
pub struct Broken {
    pub name: String,
    /// The id the manifest's file name gives (`<id>.json`).
    pub id: String,
    /// Where the manifest is.
    pub location: String,
    /// Why it is broken, e.g. "its artifact file x.sql.zst is missing".
    pub reason: String,
}

impl Broken {
    /// Whether it is newer than a good backup of its name (ids are `<name>.<stamp>`), or
    /// there is no good one: then the newest backup of the name is the broken one.
    pub fn is_newer_than(&self, good: Option<&Artifact>) -> bool {
        good.is_none_or(|a| self.id > a.id)
    }

    /// The error every tool reports for it (65: the store's data is bad).
    pub fn error(&self) -> Error {
        Error::data(format!(
            "{}: broken backup: {} ({})",
            self.id, self.reason, self.location
        ))
        .named(&self.name)
    }
}

/// Whether a manifest and the artifact file found beside it (`None`: none) make a backup;
/// `size` is `None` where the store does not tell sizes.
fn artifact_problem(artifact: &Artifact, found: Option<Option<u64>>) -> Option<String> {
    match found {
        None => Some(format!("its artifact file {} is missing", artifact.file)),
        Some(Some(size)) if size != artifact.bytes => Some(format!(
            "its artifact file {} is {size} bytes, the manifest says {}",
            artifact.file, artifact.bytes
        )),
        Some(_) => None,
    }
}

/// A hidden temporary name no listing mistakes for an artifact, where every store writes
/// before it publishes: `.<file>.tmp.<pid>.<random>`.
pub fn temp_name(file: &str) -> String {
    format!(".{file}.tmp.{}.{:08x}", std::process::id(), rand::random::<u32>())
}

/// Whether a file name is a [`temp_name`].
pub fn is_temp(file_name: &str) -> bool {
    file_name.starts_with('.') && file_name.contains(".tmp.")
}

/// An entry of a name's directory, as a store lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// A regular file, with its size where the store tells it.
    File(Option<u64>),
    /// Anything else (a directory, a symlink): never read as a manifest, as good as missing
    /// as an artifact file.
    Other,
}

/// Sorts the entries of one name's directory into `listing`, as every store lists: each
/// manifest (`*.json`, not temporary) read with `read_manifest` is a backup when its artifact
/// file is there with the size it says, else a broken backup; what no manifest claims is a
/// leftover. `location` gives where a file of the directory is.
pub fn list_name_dir(
    name: &str,
    entries: &BTreeMap<String, Entry>,
    mut read_manifest: impl FnMut(&str) -> Result<String>,
    location: impl Fn(&str) -> String,
    listing: &mut Listing,
) {
    // A set: a name directory may hold thousands of files.
    let mut claimed: std::collections::BTreeSet<&str> = Default::default();
    for (f, entry) in entries.iter().filter(|(f, _)| f.ends_with(".json") && !is_temp(f)) {
        claimed.insert(f);
        let broken = |reason: String| Broken {
            name: name.to_string(),
            id: f.trim_end_matches(".json").to_string(),
            location: location(f),
            reason,
        };
        let text = match entry {
            Entry::Other => {
                listing.broken.push(broken("its manifest is not a regular file".into()));
                continue;
            }
            Entry::File(Some(size)) if *size > MAX_MANIFEST => {
                Err(Error::data(format!("{size} bytes, too large for a manifest")))
            }
            Entry::File(_) => read_manifest(f),
        };
        match text.and_then(|text| parse_line(text.trim(), "manifest")) {
            Ok(Record::Artifact(mut a)) if a.name == name && manifest_file(&a.id) == *f => {
                let file = entries.get_key_value(&a.file);
                if let Some((file, _)) = file {
                    claimed.insert(file);
                }
                let found = match file {
                    Some((_, Entry::File(size))) => Some(*size),
                    Some((_, Entry::Other)) | None => None,
                };
                match artifact_problem(&a, found) {
                    Some(reason) => listing.broken.push(broken(reason)),
                    None => {
                        a.location = location(&a.file);
                        listing.artifacts.push(a);
                    }
                }
            }
            Ok(_) => listing.broken.push(broken(format!("it is not a manifest of {name}"))),
            Err(e) => listing
                .broken
                .push(broken(format!("unreadable manifest: {}", e.message))),
        }
    }
    let state = chain_state_file(name);
    for f in entries.keys().filter(|f| !claimed.contains(f.as_str()) && **f != state) {
        let why = if is_temp(f) {
            "temporary file of an unfinished run"
        } else {
            "no manifest"
        };
        listing.leftovers.push(format!("{}: {why}", location(f)));
    }
}

/// Keeps the last artifact of each name in a listing sorted by name, then time.
pub fn newest_per_name(artifacts: Vec<Artifact>) -> Vec<Artifact> {
    let mut newest: Vec<Artifact> = Vec::new();
    for a in artifacts {
        match newest.last_mut() {
            Some(last) if last.name == a.name => *last = a,
            _ => newest.push(a),
        }
    }
    newest
}

impl Listing {
    /// Sorts every part as documented.
    pub fn sort(&mut self) {
        self.artifacts
            .sort_by(|a, b| (&a.name, &a.started, &a.id).cmp(&(&b.name, &b.started, &b.id)));
        self.broken.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        self.leftovers.sort();
    }
}

pub trait Store {
    /// The store as the user named it, for messages.
    fn url(&self) -> String;
    /// Where an artifact file of a name lives, for the `location` field: by default
    /// `<url>/<name>/<file>`.
    fn location(&self, name: &str, file: &str) -> String {
        format!("{}/{name}/{file}", self.url())
    }
    fn create(&self, name: &str, file: &str) -> Result<Box<dyn Upload>>;
    /// Writes the manifest, last, which makes the artifact part of the store. By default it
    /// is written and published as an artifact file is (`create`, then `commit`).
    fn put_manifest(&self, artifact: &Artifact) -> Result<()> {
        let file = manifest_file(&artifact.id);
        let mut upload = self.create(&artifact.name, &file)?;
        let line = format!("{}\n", crate::record::Record::Artifact(artifact.clone()).to_line());
        upload
            .write_all(line.as_bytes())
            .map_err(|e| crate::error::from_io(format!("writing {}", self.location(&artifact.name, &file)), e))?;
        upload.commit()
    }
    fn has_manifest(&self, name: &str, id: &str) -> Result<bool>;
    /// Lists manifests, of one name or of all.
    fn list(&self, name: Option<&str>) -> Result<Listing>;
    fn open(&self, artifact: &Artifact) -> Result<Box<dyn Read>> {
        self.open_file(&artifact.name, &artifact.file)
    }
    /// Reads a file of a name's directory (an artifact's, or the chain state of incremental
    /// backups); a missing one is an error of kind `NoInput`.
    fn open_file(&self, name: &str, file: &str) -> Result<Box<dyn Read>>;
    /// The directory of a store on this machine's filesystem, if it is one.
    fn local_root(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// Copies a file of this machine in as an artifact file, checked against `sha256` and
    /// published, when the store has a better way than streaming it through `create`: the
    /// ssh store uses rsync, which resumes where an interrupted copy of the same file
    /// stopped. `Ok(None)`: no such way here, use `create`; `Ok(Some(n))`: copied, `n` bytes
    /// of it were already there from an interrupted copy.
    fn put_file(&self, name: &str, file: &str, path: &std::path::Path, sha256: &str) -> Result<Option<u64>> {
        let _ = (name, file, path, sha256);
        Ok(None)
    }
    /// Deletes the manifest first, then the artifact, so that an interrupted delete never
    /// leaves a manifest pointing at nothing.
    fn delete(&self, artifact: &Artifact) -> Result<()>;
    /// Removes the temporary files that unfinished runs left in a name's directory (hidden
    /// `.<file>.tmp.<pid>.<random>` files) last modified before `older_than`, and returns
    /// where they were, sorted; with `dry_run` it only returns them. A store whose uploads
    /// leave no such files has none to remove.
    fn remove_leftovers(&self, name: &str, older_than: SystemTime, dry_run: bool) -> Result<Vec<String>> {
        let _ = (name, older_than, dry_run);
        Ok(Vec::new())
    }
}

/// What opening a store needs besides its URL, from the tools' options: where S3 is.
#[derive(Debug, Clone, Default)]
pub struct StoreConfig {
    /// The S3 endpoint URL [default: the AWS variables and files'].
    pub s3_endpoint: Option<String>,
    /// The S3 region [default: the AWS variables and files'].
    pub s3_region: Option<String>,
}

/// Opens a local store from its URL: a path or `file://` URL. Other schemes are bk-stores'
/// (`bk_stores::open`); here they are refused with exit 64.
pub fn open(url: &str) -> Result<Box<dyn Store>> {
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(Box::new(LocalStore::new(path)?));
    }
    if let Some((scheme, _)) = url
        .split_once("://")
        .or_else(|| url.split_once(':').filter(|(s, _)| *s == "rclone"))
    {
        if !scheme.contains('/') {
            return Err(Error::usage(format!(
                "store {url}: {scheme} stores are not supported by this version of bk yet; use a local path"
            )));
        }
    }
    Ok(Box::new(LocalStore::new(url)?))
}

/// The URL of the store an artifact record's `location` points into: `<root>/<name>/<file>`.
pub fn location_root(artifact: &Artifact) -> Result<&str> {
    let suffix = format!("/{}/{}", artifact.name, artifact.file);
    let root = artifact.location.strip_suffix(&suffix).ok_or_else(|| {
        Error::data(format!(
            "{}: location {:?} does not end in {suffix}",
            artifact.id, artifact.location
        ))
    })?;
    Ok(if root.is_empty() { "/" } else { root })
}

/// The `%XX` escapes of a store URL's user or path (or a test server's URL), decoded.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The largest manifest any store reads: a manifest is one line of a few kilobytes.
pub const MAX_MANIFEST: u64 = 1 << 20;

/// The file beside a name's manifests that lets `bk-dump files --incremental` continue the
/// name's newest chain (never a manifest, never an artifact: no listing counts it).
pub fn chain_state_file(name: &str) -> String {
    format!("{name}.chain-state")
}

/// The manifest's file name of an artifact id.
pub fn manifest_file(id: &str) -> String {
    format!("{id}.json")
}
