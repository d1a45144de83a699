//! `files --incremental`: chains of GNU tar `--listed-incremental` dumps. GNU tar is the
//! trusted implementation of its own format: it writes every piece (so that `tar --extract
//! --listed-incremental=/dev/null`, piece after piece, restores a chain without bk) and
//! extracts them again. bk keeps GNU tar's snapshot file between runs, reads every piece as
//! it passes (entries, the listing of each directory), counts what changed, and checks
//! pieces and chains against their manifests.
//!
//! A piece holds every directory of the tree as a GNU "dumpdir" entry: the names the
//! directory held at that time, each flagged `Y` (its content is in this piece), `N` (it is
//! unchanged, in an older piece) or `D` (a directory); plus `R`/`T` pairs for renamed
//! directories. The snapshot file holds the same listings. So one piece's listings are the
//! whole tree at its time, and two successive ones tell what was added, changed and deleted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use bk_core::codec::Decoder;
use bk_core::error::{Error, Kind, Result};
use bk_core::record::Artifact;
use bk_core::retention::{Span, Zone};
use bk_core::store::Store;

use super::{bad_entry, check_entry_name, for_each_tar_entry, staged_path, tar_error};
use crate::process::{self, find_program};

/// When a chain ends: the next backup is a full (level 0).
#[derive(Debug, Clone, PartialEq)]
pub enum FullEvery {
    /// After this many backups in the chain, the full included (`24`: a full and 23 more).
    Backups(u32),
    /// Once the chain's full is this old (`7d`, `24h`).
    Age(Span),
}

impl std::str::FromStr for FullEvery {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        if let Ok(n) = text.trim().parse::<u32>() {
            return match n {
                0 => Err("--full-every 0: give a number of backups of 1 or more, or a duration such as 7d".into()),
                n => Ok(FullEvery::Backups(n)),
            };
        }
        Span::parse(text).map(FullEvery::Age)
    }
}

/// A cron job's start drifts by seconds: a full due "every 7d" comes in the same hour as the
/// last one, not an hour later.
const CRON_DRIFT: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

impl FullEvery {
    /// Why a chain whose full is `full` and whose newest backup is at `level` ends now, if it does.
    pub fn ends(&self, full: &Artifact, level: u32, now: chrono::DateTime<chrono::Utc>) -> Result<Option<String>> {
        Ok(match self {
            FullEvery::Backups(n) if level + 1 >= *n => Some(format!(
                "the chain of {} holds {} backups (--full-every {n})",
                full.id,
                level + 1
            )),
            FullEvery::Backups(_) => None,
            FullEvery::Age(span) => {
                let due = span.before(now, &Zone::parse("UTC").map_err(|e| Error::new(Kind::Io, e))?) + CRON_DRIFT;
                (full.made_at()? <= due)
                    .then(|| format!("the chain's full {} is older than {span} (--full-every)", full.id))
            }
        })
    }
}

/// The directories of a piece or a snapshot as GNU tar lists them: each directory's path (no
/// leading or trailing '/') and its raw dumpdir. A name flagged `N` is either unchanged since
/// the parent or left out by --exclude: only the parent's tree tells which.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Listing {
    dirs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The entries of a raw dumpdir: (flag, name), up to its empty terminating entry.
fn dumpdir_entries(raw: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    raw.split(|b| *b == 0)
        .take_while(|e| !e.is_empty())
        .map(|e| (e[0], &e[1..]))
}

/// The names of a dumpdir that are not directories, with their flags.
fn files_of(raw: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    dumpdir_entries(raw).filter(|(flag, _)| matches!(flag, b'Y' | b'N'))
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    [dir, b"/", name].concat()
}

impl Listing {
    fn insert(&mut self, dir: &[u8], dumpdir: Vec<u8>) {
        let dir = dir.strip_suffix(b"/").unwrap_or(dir);
        self.dirs.push((dir.to_vec(), dumpdir));
    }

    /// The directories renamed since the parent, as (old path, new path).
    fn renames(&self) -> Vec<(&[u8], &[u8])> {
        let mut renames = Vec::new();
        for (_, raw) in &self.dirs {
            let mut from = None;
            for (flag, name) in dumpdir_entries(raw) {
                match flag {
                    b'R' => from = Some(name),
                    b'T' => renames.extend(from.take().map(|f| (f, name))),
                    _ => {}
                }
            }
        }
        renames
    }
}

/// What a restore of a chain holds at one backup: each directory and its files (all but
/// directories).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tree {
    dirs: HashMap<Vec<u8>, HashSet<Vec<u8>>>,
}

impl Tree {
    /// The tree after a piece: a name is a file of it when the piece holds it (`members`), or
    /// when it is flagged unchanged and the parent's tree has it, where it was before its
    /// directory was renamed. Names GNU tar lists for excluded files or files it could not
    /// read are in no piece: they are not in the tree.
    pub fn after(parent: Option<&Tree>, listing: &Listing, members: &HashSet<Vec<u8>>) -> Tree {
        let renames = listing.renames();
        let before = |dir: &[u8]| -> Vec<u8> {
            for (from, to) in &renames {
                if let Some(rest) = dir.strip_prefix(*to).filter(|r| r.is_empty() || r[0] == b'/') {
                    return [*from, rest].concat();
                }
            }
            dir.to_vec()
        };
        let mut tree = Tree::default();
        for (dir, raw) in &listing.dirs {
            let had = parent.and_then(|p| p.dirs.get(&before(dir)));
            let files = files_of(raw)
                .filter(|(flag, name)| match flag {
                    b'Y' => members.contains(&join(dir, name)),
                    _ => had.is_some_and(|h| h.contains(*name)),
                })
                .map(|(_, name)| name.to_vec())
                .collect();
            tree.dirs.insert(dir.clone(), files);
        }
        tree
    }

    /// The tree of a snapshot whose listed names not in the tree (`absent`, full paths) were
    /// saved beside it.
    fn of_snapshot(listing: &Listing, absent: &HashSet<Vec<u8>>) -> Tree {
        let mut tree = Tree::default();
        for (dir, raw) in &listing.dirs {
            let files = files_of(raw)
                .map(|(_, name)| name.to_vec())
                .filter(|name| !absent.contains(&join(dir, name)))
                .collect();
            tree.dirs.insert(dir.clone(), files);
        }
        tree
    }

    /// The names `listing` gives that are not files of this tree (excluded, unreadable), as
    /// full paths: what [`Tree::of_snapshot`] needs to rebuild it.
    pub fn absent_from(&self, listing: &Listing) -> Vec<Vec<u8>> {
        let mut absent = Vec::new();
        for (dir, raw) in &listing.dirs {
            let files = self.dirs.get(dir);
            for (_, name) in files_of(raw) {
                if !files.is_some_and(|f| f.contains(name)) {
                    absent.push(join(dir, name));
                }
            }
        }
        absent
    }

    /// The number of files (everything but directories) in the tree.
    pub fn files(&self) -> u64 {
        self.dirs.values().map(|d| d.len() as u64).sum()
    }

    /// The directories, as relative paths.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        use std::os::unix::ffi::OsStrExt;
        self.dirs.keys().map(|d| Path::new(std::ffi::OsStr::from_bytes(d)))
    }
}

/// The counts key of the files a tree holds: a restore of the chain holds as many.
pub const FILES: &str = "files";

/// The counts of a piece: `entries` (tar members), and files `added`, `changed` (stored again)
/// and `deleted` since `parent`'s tree (all files are added in a full), and the `files` of
/// `tree`, the tree after it, which a restore of the chain holds. Directories are not counted
/// as files; a renamed directory's files count as deleted and added, though not stored again.
pub fn counts(parent: Option<&Tree>, piece: &Piece, tree: &Tree) -> BTreeMap<String, u64> {
    let empty = Tree::default();
    let parent = parent.unwrap_or(&empty);
    let (mut added, mut deleted) = (0u64, 0u64);
    for (dir, now) in &tree.dirs {
        let before = parent.dirs.get(dir);
        added += now.iter().filter(|n| !before.is_some_and(|b| b.contains(*n))).count() as u64;
    }
    for (dir, then) in &parent.dirs {
        let now = tree.dirs.get(dir);
        deleted += then.iter().filter(|n| !now.is_some_and(|d| d.contains(*n))).count() as u64;
    }
    let changed = piece
        .listing
        .dirs
        .iter()
        .flat_map(|(dir, raw)| {
            files_of(raw).filter(move |(flag, name)| {
                *flag == b'Y'
                    && piece.members.contains(&join(dir, name))
                    && parent.dirs.get(dir).is_some_and(|b| b.contains(*name))
            })
        })
        .count() as u64;
    BTreeMap::from([
        (super::ENTRIES.to_string(), piece.entries),
        ("added".to_string(), added),
        ("changed".to_string(), changed),
        ("deleted".to_string(), deleted),
        (FILES.to_string(), tree.files()),
    ])
}

/// GNU tar's snapshot file (format 2): when its dump started, and its listing.
#[derive(Debug)]
pub struct Snapshot {
    /// Seconds since the epoch.
    pub started: i64,
    pub listing: Listing,
}

impl Snapshot {
    /// The tree it stands for, given the names it lists that are not in the tree.
    pub fn tree(&self, absent: &HashSet<Vec<u8>>) -> Tree {
        Tree::of_snapshot(&self.listing, absent)
    }
}

/// Reads a snapshot file of GNU tar's format 2 (`GNU tar-<version>-2`, then NUL-terminated
/// fields: the dump's start, and for each directory nfs, mtime, dev, inode, name and its
/// dumpdir). `what` names it in errors (65: not one bk can continue from).
pub fn parse_snapshot(bytes: &[u8], what: &str) -> Result<Snapshot> {
    let bad = |why: &str| Error::data(format!("{what}: {why}: not a GNU tar snapshot of format 2"));
    let header_end = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| bad("no header line"))?;
    let header = &bytes[..header_end];
    if !header.starts_with(b"GNU tar-") || !header.ends_with(b"-2") {
        return Err(bad("its header is not 'GNU tar-VERSION-2'"));
    }
    let mut rest = &bytes[header_end + 1..];
    // The next NUL-terminated field; None at the end of the file.
    let mut field = || -> Option<&[u8]> {
        let end = rest.iter().position(|b| *b == 0)?;
        let (f, after) = (&rest[..end], &rest[end + 1..]);
        rest = after;
        Some(f)
    };
    let number = |f: Option<&[u8]>, name: &str| -> Result<i64> {
        f.and_then(|f| std::str::from_utf8(f).ok()?.parse().ok())
            .ok_or_else(|| bad(&format!("its {name} is not a number")))
    };
    let started = number(field(), "start time")?;
    number(field(), "start time's nanoseconds")?;
    let mut listing = Listing::default();
    // Each directory: nfs, mtime (two fields), dev, inode, name, then its dumpdir up to its
    // empty entry, then an empty field.
    while let Some(nfs) = field() {
        let record: Vec<&[u8]> = std::iter::once(Some(nfs))
            .chain((0..5).map(|_| field()))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("a directory's record is cut short"))?;
        let name = record[5];
        let mut dumpdir = Vec::new();
        loop {
            let entry = field().ok_or_else(|| bad("a dumpdir is cut short"))?;
            dumpdir.extend_from_slice(entry);
            dumpdir.push(0);
            if entry.is_empty() {
                break;
            }
        }
        // ... and one more NUL ends the directory's record.
        if field() != Some(&[][..]) {
            return Err(bad("a directory's record does not end with two NULs"));
        }
        check_dumpdir(&dumpdir).map_err(|why| bad(&format!("directory {:?}: {why}", String::from_utf8_lossy(name))))?;
        listing.insert(name, dumpdir);
    }
    if !rest.is_empty() {
        return Err(bad("it ends in the middle of a field"));
    }
    Ok(Snapshot { started, listing })
}

/// A dumpdir names what its directory holds by plain names (never '/', '.' or '..') and
/// renames by relative paths; anything else is not GNU tar's.
fn check_dumpdir(raw: &[u8]) -> std::result::Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    if !raw.ends_with(b"\0") || (raw.len() > 1 && !raw.ends_with(b"\0\0")) {
        return Err("its dumpdir does not end with an empty entry".into());
    }
    let mut renaming = false;
    for (flag, name) in dumpdir_entries(raw) {
        let bad = || {
            format!(
                "its dumpdir holds {:?}",
                String::from_utf8_lossy(&[&[flag], name].concat())
            )
        };
        match flag {
            b'Y' | b'N' | b'D' if !renaming => {
                if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
                    return Err(bad());
                }
            }
            b'R' | b'X' if !renaming || flag == b'X' => {
                if !name.is_empty() {
                    staged_path(Path::new(""), Path::new(std::ffi::OsStr::from_bytes(name)))
                        .map_err(|why| format!("{}: {why}", bad()))?;
                }
                renaming = flag == b'R';
            }
            b'T' if renaming => {
                if !name.is_empty() {
                    staged_path(Path::new(""), Path::new(std::ffi::OsStr::from_bytes(name)))
                        .map_err(|why| format!("{}: {why}", bad()))?;
                }
                renaming = false;
            }
            _ => return Err(bad()),
        }
    }
    if renaming {
        return Err("its dumpdir has a rename without its target".into());
    }
    Ok(())
}

/// What reading a piece found.
pub struct Piece {
    pub entries: u64,
    pub listing: Listing,
    /// The paths of the members that are not directories: the files it holds.
    pub members: HashSet<Vec<u8>>,
    /// With `Hashing::Contents`: what each member holds, and its hard links (path, target).
    contents: HashMap<Vec<u8>, Content>,
    hard_links: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Whether reading a piece also hashes what its files hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hashing {
    NamesOnly,
    Contents,
}

/// What a file of a tree holds, as a piece stores it and as a restore leaves it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    Data {
        size: u64,
        sha256: [u8; 32],
    },
    Symlink(Vec<u8>),
    /// A FIFO or a device node: its kind only.
    Special,
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Content::Data { size, sha256 } => write!(f, "{size} bytes, sha256 {}", hex::encode(&sha256[..8])),
            Content::Symlink(target) => write!(f, "a symlink to {:?}", String::from_utf8_lossy(target)),
            Content::Special => f.write_str("a FIFO or device"),
        }
    }
}

/// What every file of a chain's tree holds, piece after piece: for bk-verify to compare a
/// restored tree with the pieces it came from.
#[derive(Debug, Default)]
pub struct Contents(HashMap<Vec<u8>, Content>);

impl Contents {
    /// Adds what `piece` stores, moves what renamed directories hold, and keeps only the
    /// files of `tree`, the tree after it.
    fn apply(&mut self, piece: &Piece, tree: &Tree) {
        for (from, to) in piece.listing.renames() {
            let moved: Vec<Vec<u8>> = self
                .0
                .keys()
                .filter(|k| k.strip_prefix(from).is_some_and(|r| r.first() == Some(&b'/')))
                .cloned()
                .collect();
            for old in moved {
                let content = self.0.remove(&old).expect("listed");
                self.0.insert([to, &old[from.len()..]].concat(), content);
            }
        }
        self.0
            .extend(piece.contents.iter().map(|(k, v)| (k.clone(), v.clone())));
        for (path, target) in &piece.hard_links {
            if let Some(content) = self.0.get(target).cloned() {
                self.0.insert(path.clone(), content);
            }
        }
        self.0.retain(|path, _| {
            let (dir, name) = match path.iter().rposition(|b| *b == b'/') {
                Some(slash) => (&path[..slash], &path[slash + 1..]),
                None => (&[][..], &path[..]),
            };
            tree.dirs.get(dir).is_some_and(|files| files.contains(name))
        });
    }

    /// Compares the files below `root` (the tree restored there) with what the pieces
    /// stored: 65 naming the first differences.
    pub fn check(&self, root: &Path, id: &str) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let mut found = HashMap::new();
        restored_contents(root, root, &mut found)?;
        let mut differences: Vec<String> = Vec::new();
        for (path, want) in &self.0 {
            let shown = String::from_utf8_lossy(path);
            match found.remove(path) {
                None => differences.push(format!("{shown} is missing")),
                Some(got) if got != *want => differences.push(format!("{shown} is {got}, stored as {want}")),
                Some(_) => {}
            }
        }
        differences.extend(
            found
                .keys()
                .map(|p| format!("{} is in no piece", Path::new(std::ffi::OsStr::from_bytes(p)).display())),
        );
        if differences.is_empty() {
            return Ok(());
        }
        differences.sort();
        let more = differences.len().saturating_sub(5);
        differences.truncate(5);
        Err(Error::data(format!(
            "{id}: the restored tree differs from its pieces: {}{}",
            differences.join("; "),
            if more > 0 {
                format!(" (and {more} more)")
            } else {
                String::new()
            }
        )))
    }
}

/// What the files below `dir` hold, by path relative to `root`.
fn restored_contents(root: &Path, dir: &Path, found: &mut HashMap<Vec<u8>, Content>) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let reading = |p: &Path, e| Error::io(format!("reading {}", p.display()), e);
    for entry in std::fs::read_dir(dir).map_err(|e| reading(dir, e))? {
        let path = entry.map_err(|e| reading(dir, e))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| reading(&path, e))?;
        let content = if meta.is_dir() {
            restored_contents(root, &path, found)?;
            continue;
        } else if meta.file_type().is_symlink() {
            Content::Symlink(
                std::fs::read_link(&path)
                    .map_err(|e| reading(&path, e))?
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else if meta.is_file() {
            let mut file = std::fs::File::open(&path).map_err(|e| reading(&path, e))?;
            hash_content(&mut file).map_err(|e| reading(&path, e))?
        } else {
            Content::Special
        };
        let rel = path.strip_prefix(root).expect("below the root");
        found.insert(rel.as_os_str().as_bytes().to_vec(), content);
    }
    Ok(())
}

fn hash_content(input: &mut dyn Read) -> io::Result<Content> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let size = io::copy(input, &mut hasher)?;
    Ok(Content::Data {
        size,
        sha256: hasher.finalize().into(),
    })
}

/// Reads a piece to its end: every entry's name checked as bk-verify checks a full's, each
/// dumpdir checked and kept. `file` names the artifact in errors (65 for what GNU tar never
/// writes).
pub fn scan_piece(file: &str, input: &mut dyn Read, hashing: Hashing) -> Result<Piece> {
    let mut piece = Piece {
        entries: 0,
        listing: Listing::default(),
        members: HashSet::new(),
        contents: HashMap::new(),
        hard_links: Vec::new(),
    };
    let mut symlinks = HashSet::new();
    for_each_tar_entry(file, input, |entry| {
        let path = entry.path_bytes().into_owned();
        let name = || Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&path)).to_path_buf();
        check_entry_name(entry, &mut symlinks).map_err(|why| bad_entry(file, &name(), why))?;
        piece.entries += 1;
        if entry.header().entry_type() == tar::EntryType::new(b'D') {
            // A dumpdir lists names: a few bytes per file of the directory.
            let mut dumpdir = Vec::new();
            entry.read_to_end(&mut dumpdir).map_err(|e| tar_error(file, e))?;
            check_dumpdir(&dumpdir).map_err(|why| bad_entry(file, &name(), why))?;
            piece.listing.insert(&path, dumpdir);
        } else {
            let kind = entry.header().entry_type();
            if hashing == Hashing::Contents {
                let link =
                    || -> Result<Vec<u8>> { Ok(entry.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default()) };
                if kind.is_hard_link() {
                    piece.hard_links.push((path.clone(), link()?));
                } else if kind.is_symlink() {
                    piece.contents.insert(path.clone(), Content::Symlink(link()?));
                } else if kind.is_file() || kind.is_gnu_sparse() || kind.is_contiguous() {
                    piece
                        .contents
                        .insert(path.clone(), hash_content(entry).map_err(|e| tar_error(file, e))?);
                } else {
                    piece.contents.insert(path.clone(), Content::Special);
                }
            }
            piece.members.insert(path);
            io::copy(entry, &mut io::sink()).map_err(|e| tar_error(file, e))?;
        }
        Ok(())
    })?;
    if piece.listing.dirs.is_empty() && piece.entries > 0 {
        return Err(Error::data(format!(
            "{file}: no directory of it is a GNU incremental one (dumpdir): not a piece of an incremental chain"
        )));
    }
    Ok(piece)
}

/// The counts a piece's manifest must have, given its parent's tree; 65 when they differ.
/// Returns the tree after it.
pub fn check_piece(artifact: &Artifact, parent: Option<&Tree>, piece: &Piece) -> Result<Tree> {
    let tree = Tree::after(parent, &piece.listing, &piece.members);
    let found = counts(parent, piece, &tree);
    if found != artifact.counts {
        let show = |c: &BTreeMap<String, u64>| c.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
        return Err(Error::data(format!(
            "{}: the piece holds {}; its manifest says {}",
            artifact.file,
            show(&found),
            show(&artifact.counts)
        )));
    }
    Ok(tree)
}

/// The chain of `artifact` as `store`'s manifests give it, its full first and `artifact`
/// last: 66 when a piece is missing (a chain without it cannot be restored), 65 when the
/// manifests do not make one chain.
pub fn chain_of(store: &dyn Store, artifact: &Artifact) -> Result<Vec<Artifact>> {
    let listing = store.list(Some(&artifact.name))?;
    let mut chain = vec![artifact.clone()];
    while let Some(parent) = chain.last().and_then(|a| a.parent.clone()) {
        let child = chain.last().expect("not empty");
        let Some(found) = listing.artifacts.iter().find(|a| a.id == parent) else {
            let why = match listing.broken.iter().find(|b| b.id == parent) {
                Some(b) => return Err(b.error().context(format!("{} builds on {parent}", child.id))),
                None => format!("{} builds on {parent}, which is not in {}", child.id, store.url()),
            };
            return Err(Error::no_input(format!("{why}: the chain cannot be restored")));
        };
        if found.chain != child.chain || found.level.map(|l| l + 1) != child.level {
            return Err(Error::data(format!(
                "{} (level {:?} of chain {:?}) builds on {parent}, which is level {:?} of chain {:?}: not one chain",
                child.id, child.level, child.chain, found.level, found.chain
            )));
        }
        chain.push(found.clone());
    }
    chain.reverse();
    Ok(chain)
}

/// Reads every piece of `chain` (its full first), each checked against its manifest but the
/// last, whose counts (against the tree before it) are returned for the caller to compare.
pub fn derive_chain_counts(
    chain: &[Artifact],
    mut open: impl FnMut(&Artifact) -> Result<Decoder>,
) -> Result<BTreeMap<String, u64>> {
    let mut tree = None;
    for (i, piece) in chain.iter().enumerate() {
        let mut decoder = open(piece)?;
        let scanned = scan_piece(&piece.file, &mut decoder, Hashing::NamesOnly)?;
        decoder.finish(piece)?;
        if i + 1 == chain.len() {
            let after = Tree::after(tree.as_ref(), &scanned.listing, &scanned.members);
            return Ok(counts(tree.as_ref(), &scanned, &after));
        }
        let checked = check_piece(piece, tree.as_ref(), &scanned)
            .map_err(|e| e.context(format!("{} builds on {}", chain[chain.len() - 1].id, piece.id)))?;
        tree = Some(checked);
    }
    unreachable!("a chain holds its backup")
}

/// GNU tar, which writes and extracts the pieces.
pub fn gnu_tar() -> Result<PathBuf> {
    let tar = find_program(&["tar"], "tar (GNU tar)")?;
    let version = process::version_line(&tar);
    if !version.contains("GNU tar") {
        return Err(Error::unavailable(format!(
            "{} is not GNU tar ({version:?}): incremental backups need GNU tar",
            tar.display()
        )));
    }
    Ok(tar)
}

/// tar's exit status 2 is a fatal error; what it says decides the kind.
fn classify(stderr: &str) -> Kind {
    if stderr.contains("Cannot open") && stderr.contains("Permission denied") {
        Kind::NoPerm
    } else {
        Kind::Io
    }
}

/// The `tar --create` of one piece: named by path without the leading '/', sparse files
/// kept sparse, GNU format (the one whose dumpdirs GNU tar extracts).
pub fn create_command(
    tar: &Path,
    snapshot: &Path,
    roots: &[PathBuf],
    excludes: &[String],
    one_file_system: bool,
) -> Command {
    let mut cmd = Command::new(tar);
    cmd.args(["--create", "--file=-", "--format=gnu", "--sparse", "--numeric-owner"])
        .arg(format!("--listed-incremental={}", snapshot.display()))
        .args(["--directory=/", "--no-wildcards-match-slash", "--wildcards"]);
    if one_file_system {
        cmd.arg("--one-file-system");
    }
    for pattern in excludes {
        // A GLOB with '/' names whole paths (anchored at the root), one without it names
        // files anywhere, as bk-dump files --exclude does.
        match pattern.strip_prefix('/') {
            Some(path) => cmd.args(["--anchored", &format!("--exclude={path}")]),
            None if pattern.contains('/') => cmd.args(["--anchored", &format!("--exclude={pattern}")]),
            None => cmd.args(["--no-anchored", &format!("--exclude={pattern}")]),
        };
    }
    // The paths are names, not patterns (with --wildcards on, GNU tar would take them as
    // patterns and write no dumpdirs).
    cmd.args(["--no-wildcards", "--"]);
    for root in roots {
        let relative = root.strip_prefix("/").unwrap_or(root);
        cmd.arg(if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        });
    }
    cmd
}

/// Runs `tar --create`, its output into `out`, and reads the same bytes as they pass.
/// GNU tar's exit status 1 (a file changed while it was read) leaves a valid piece: its
/// warnings were relayed to stderr.
pub fn dump_piece(cmd: Command, out: &mut dyn io::Write) -> Result<Piece> {
    let (reader, mut writer) = io::pipe().map_err(|e| Error::io("creating a pipe", e))?;
    let scanner = std::thread::spawn(move || {
        let mut reader = reader;
        let scanned = scan_piece("the tar output", &mut reader, Hashing::NamesOnly);
        // Drained, so that the writer never waits on a scanner that stopped.
        let _ = io::copy(&mut reader, &mut io::sink());
        scanned
    });
    let dumped = process::stream_from_tar(
        cmd,
        out,
        |chunk| {
            let _ = io::Write::write_all(&mut writer, chunk);
        },
        classify,
    );
    drop(writer);
    let scanned = scanner
        .join()
        .map_err(|_| Error::new(Kind::Io, "the tar reader panicked"))?;
    dumped?;
    scanned
}

/// Extracts one piece into `staging` with GNU tar as it is decoded, reading the same bytes to
/// check them: the stored bytes' sha256 first, then the piece's entries and counts (against
/// `parent`, the tree before it), then tar's own success. Returns the piece's tree.
pub fn extract_piece(
    tar: &Path,
    artifact: &Artifact,
    mut decoder: Decoder,
    staging: &Path,
    parent: Option<&Tree>,
    contents: Option<&mut Contents>,
) -> Result<Tree> {
    let (reader, writer) = io::pipe().map_err(|e| Error::io("creating a pipe", e))?;
    let file = artifact.file.clone();
    let hashing = if contents.is_some() {
        Hashing::Contents
    } else {
        Hashing::NamesOnly
    };
    let scanner = std::thread::spawn(move || {
        let mut reader = reader;
        let scanned = scan_piece(&file, &mut reader, hashing);
        let _ = io::copy(&mut reader, &mut io::sink());
        scanned
    });
    let mut cmd = Command::new(tar);
    cmd.args([
        "--extract",
        "--file=-",
        "--listed-incremental=/dev/null",
        "--preserve-permissions",
        "--numeric-owner",
    ])
    .arg(format!("--directory={}", staging.display()));
    if !nix::unistd::geteuid().is_root() {
        cmd.arg("--no-same-owner");
    }
    let mut tee = Tee {
        input: &mut decoder,
        copy: Some(writer),
    };
    let extracted = process::stream_into(cmd, &mut tee, classify);
    // tar may stop early: the rest still goes through the checks.
    let rest = io::copy(&mut tee, &mut io::sink());
    drop(tee);
    let scanned = scanner
        .join()
        .map_err(|_| Error::new(Kind::Io, "the tar reader panicked"));
    rest.map_err(|e| super::tar_error(&artifact.file, e))?;
    decoder.finish(artifact)?;
    let piece = scanned??;
    let tree = check_piece(artifact, parent, &piece)?;
    extracted.map_err(|e| e.context(format!("extracting {}", artifact.file)))?;
    if let Some(contents) = contents {
        contents.apply(&piece, &tree);
    }
    Ok(tree)
}

/// Passes `input` on, copying every byte read into `copy` too (while it takes them).
struct Tee<'a> {
    input: &'a mut dyn Read,
    copy: Option<io::PipeWriter>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        if let Some(copy) = &mut self.copy {
            if io::Write::write_all(copy, &buf[..n]).is_err() {
                self.copy = None;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A piece of directories with their dumpdirs ("Da Yx Nz"); every Y name is a member
    /// but those in `unread`.
    fn piece(dirs: &[(&str, &str)], unread: &[&str]) -> Piece {
        let mut p = Piece {
            entries: 0,
            listing: Listing::default(),
            members: HashSet::new(),
            contents: HashMap::new(),
            hard_links: Vec::new(),
        };
        for (dir, entries) in dirs {
            let mut raw = Vec::new();
            for e in entries.split(' ').filter(|e| !e.is_empty()) {
                raw.extend_from_slice(e.as_bytes());
                raw.push(0);
                let path = format!("{dir}/{}", &e[1..]);
                if e.starts_with('Y') && !unread.contains(&path.as_str()) {
                    p.members.insert(path.into_bytes());
                }
            }
            raw.push(0);
            p.listing.insert(dir.as_bytes(), raw);
            p.entries += 1;
        }
        p.entries += p.members.len() as u64;
        p
    }

    fn counted(parent: Option<&Tree>, p: &Piece) -> (Tree, (u64, u64, u64, u64)) {
        let tree = Tree::after(parent, &p.listing, &p.members);
        let c = counts(parent, p, &tree);
        (tree, (c["added"], c["changed"], c["deleted"], c["files"]))
    }

    #[test]
    fn counts_tell_added_changed_and_deleted_files() {
        // x.log excluded (N in a full), "gone" vanished before tar read it (Y, no member).
        let full = piece(&[("srv", "Da Yx Yy Nx.log Ygone"), ("srv/a", "Yf Yg")], &["srv/gone"]);
        let (full_tree, c) = counted(None, &full);
        assert_eq!(c, (4, 0, 0, 4));
        // y changed, x unchanged, g deleted, h added, a renamed to b (f moves: deleted +
        // added, not stored again), x.log still excluded.
        let next = piece(&[("srv", "Db Nx Yy Yz Nx.log Rsrv/a Tsrv/b"), ("srv/b", "Nf Yh")], &[]);
        let (tree, c) = counted(Some(&full_tree), &next);
        assert_eq!(c, (3, 1, 2, 5));
        assert!(
            tree.dirs[&b"srv/b"[..]].contains(&b"f"[..]),
            "f, unchanged in a renamed directory"
        );
        // A snapshot with the names absent from its tree saved beside it gives the tree back.
        let absent: HashSet<Vec<u8>> = tree.absent_from(&next.listing).into_iter().collect();
        assert_eq!(absent, HashSet::from([b"srv/x.log".to_vec()]));
        assert_eq!(Tree::of_snapshot(&next.listing, &absent), tree);
    }

    #[test]
    fn snapshots_of_gnu_tar_parse_and_hostile_ones_are_refused() {
        let good = b"GNU tar-1.34-2\n1796335153\x00668938434\x000\x001796335153\x00664549459\x0065024\x0010060777\x00tmp/inc/src\x00Dd1\x00Yn\x00\x00\x000\x001\x002\x003\x004\x00tmp/inc/src/d1\x00Ya\x00\x00\x00";
        let s = parse_snapshot(good, "state").unwrap();
        assert_eq!(s.started, 1796335153);
        assert_eq!(s.tree(&HashSet::new()).files(), 2);
        let empty_dir = b"GNU tar-1.34-2\n1\x002\x000\x001\x002\x003\x004\x00d\x00\x00\x00";
        assert_eq!(parse_snapshot(empty_dir, "state").unwrap().listing.dirs.len(), 1);
        for bad in [
            &b"GNU tar-1.34-1\n1\x002\x00"[..],
            b"GNU tar-1.34-2\n1\x00",
            b"GNU tar-1.34-2\nx\x002\x00",
            b"GNU tar-1.34-2\n1\x002\x000\x001\x002\x003\x004\x00d\x00Y../x\x00\x00\x00",
            b"GNU tar-1.34-2\n1\x002\x000\x001\x002\x003\x004\x00d\x00Ya/b\x00\x00\x00",
            b"GNU tar-1.34-2\n1\x002\x000\x001\x002\x003\x004\x00d\x00R/etc\x00Tx\x00\x00\x00",
            b"GNU tar-1.34-2\n1\x002\x000\x001\x002\x003\x004\x00d\x00Qx\x00\x00\x00",
            b"GNU tar-1.34-2\n1\x002\x000\x001\x002\x003\x004\x00d\x00Yx\x00",
            b"GNU tar-1.34-2\n1\x002\x000\x001\x002\x003\x004\x00d\x00Yx\x00\x00",
        ] {
            let e = parse_snapshot(bad, "state").unwrap_err();
            assert_eq!(e.exit_code(), 65, "{:?}: {}", String::from_utf8_lossy(bad), e.message);
        }
    }

    #[test]
    fn a_restored_tree_is_compared_with_what_its_pieces_stored() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        std::fs::create_dir_all(dir.join("d")).unwrap();
        std::fs::write(dir.join("d/a"), "x").unwrap();
        std::os::unix::fs::symlink("a", dir.join("d/l")).unwrap();
        let stored = |content: &str| {
            let data = hash_content(&mut content.as_bytes()).unwrap();
            Contents(HashMap::from([
                (b"d/a".to_vec(), data),
                (b"d/l".to_vec(), Content::Symlink(b"a".to_vec())),
            ]))
        };
        stored("x").check(dir, "fs.1").unwrap();
        let e = stored("y").check(dir, "fs.1").unwrap_err();
        assert_eq!(e.exit_code(), 65);
        assert!(e.message.contains("d/a is 1 bytes"), "{}", e.message);
        std::fs::write(dir.join("d/extra"), "").unwrap();
        let e = stored("x").check(dir, "fs.1").unwrap_err();
        assert!(e.message.contains("d/extra is in no piece"), "{}", e.message);
    }

    #[test]
    fn full_every_is_a_count_or_a_duration() {
        assert_eq!("24".parse::<FullEvery>(), Ok(FullEvery::Backups(24)));
        assert!(matches!("7d".parse::<FullEvery>(), Ok(FullEvery::Age(_))));
        assert!("0".parse::<FullEvery>().is_err());
        assert!("soon".parse::<FullEvery>().is_err());
    }
}
