//! The `files` engine: a tar of paths keeping modes, owners, mtimes, symlinks, hard links,
//! empty directories and special files; restored through a staging directory so a bad
//! artifact leaves the target untouched.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use globset::{GlobSet, GlobSetBuilder};
use tar::{EntryType, Header, HeaderMode};

use bk_core::codec::Decoder;
use bk_core::error::{from_io, Error, Result};
use bk_core::name::sanitize;
use bk_core::private::create_private_dir;
use bk_core::record::{Artifact, Source, ToolInfo};

use crate::{hostname, path_target, DumpJob, Dumped, RestoreOptions, RestoredInfo};

pub mod incremental;
use incremental::FullEvery;

/// The counts key of this engine: every tar entry (files, directories, links, ...).
const ENTRIES: &str = "entries";

#[derive(Debug, Clone, clap::Args)]
pub struct DumpArgs {
    /// Files and directories to back up (a symlink named here is followed)
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Leave out what matches GLOB (repeatable): a GLOB without '/' matches file names
    /// anywhere ('*.log'), one with '/' matches whole paths ('/srv/www/cache', '/home/*/.cache')
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Keep only files that match GLOB (repeatable, same matching as --exclude); directories
    /// are always kept so the tree stays whole
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Do not descend into other filesystems (the mount point itself is kept)
    #[arg(long)]
    pub one_file_system: bool,
    /// Back up only what changed since the name's previous backup, with GNU tar's
    /// --listed-incremental: a chain of a full (level 0) and pieces that each hold the files
    /// changed or added since the one before and the listing of every directory (so a restore
    /// deletes what was deleted). A change is seen by mtime or ctime (inode change time), so a
    /// file rewritten with the same size and its mtime set back is seen too. The state that
    /// continues the chain (GNU tar's snapshot file) is kept in the store beside the manifests
    /// (<name>.chain-state, 0600); when it is missing, damaged or not that of the newest
    /// backup, the backup is a full and says why. Not with --include
    #[arg(long)]
    pub incremental: bool,
    /// With --incremental: start a new chain with a full once the chain's full is older than
    /// DURATION (7d, 24h; 10 minutes early, for cron's drift) or holds N backups [default: 7d]
    #[arg(long, value_name = "DURATION|N", requires = "incremental")]
    pub full_every: Option<FullEvery>,
}

/// Globs matched against a whole path (those with '/') or a file name (those without).
struct PathGlobs {
    by_path: GlobSet,
    by_name: GlobSet,
    empty: bool,
}

impl PathGlobs {
    fn new(patterns: &[String], flag: &str) -> Result<Self> {
        let (mut by_path, mut by_name) = (GlobSetBuilder::new(), GlobSetBuilder::new());
        for p in patterns {
            let trimmed = if p.len() > 1 {
                p.trim_end_matches('/')
            } else {
                p.as_str()
            };
            let glob = globset::GlobBuilder::new(trimmed)
                .literal_separator(true)
                .build()
                .map_err(|e| Error::usage(format!("{flag} {p:?}: {e}")))?;
            if trimmed.contains('/') {
                by_path.add(glob);
            } else {
                by_name.add(glob);
            }
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| Error::usage(format!("{flag}: {e}")));
        Ok(PathGlobs {
            by_path: build(by_path)?,
            by_name: build(by_name)?,
            empty: patterns.is_empty(),
        })
    }

    fn matches(&self, path: &Path) -> bool {
        self.by_path.is_match(path) || path.file_name().is_some_and(|n| self.by_name.is_match(n))
    }
}

pub struct FilesJob {
    args: DumpArgs,
    roots: Vec<PathBuf>,
    /// Never archived: the store itself, when it lies inside a source path.
    skip: Vec<PathBuf>,
}

impl FilesJob {
    pub fn new(args: DumpArgs, skip: Vec<PathBuf>) -> Result<Self> {
        let mut roots = Vec::new();
        for p in &args.paths {
            let abs = std::path::absolute(p).map_err(|e| Error::io(format!("{}", p.display()), e))?;
            fs::metadata(&abs).map_err(|e| Error::io(format!("cannot back up {}", p.display()), e))?;
            roots.push(abs);
        }
        PathGlobs::new(&args.exclude, "--exclude")?;
        PathGlobs::new(&args.include, "--include")?;
        if args.incremental {
            if !args.include.is_empty() {
                return Err(Error::usage(
                    "--include cannot be used with --incremental (GNU tar's incremental dumps take whole trees): use --exclude",
                ));
            }
            // GNU tar's --exclude is fnmatch: no braces, and '*' never crosses a '/'.
            if let Some(glob) = args.exclude.iter().find(|g| g.contains('{') || g.contains("**")) {
                return Err(Error::usage(format!(
                    "--exclude {glob:?}: '{{...}}' and '**' cannot be used with --incremental (GNU tar matches with fnmatch): give one --exclude per pattern"
                )));
            }
        }
        Ok(FilesJob { args, roots, skip })
    }
}

impl DumpJob for FilesJob {
    fn engine(&self) -> &'static str {
        "files"
    }
    fn format(&self) -> &'static str {
        "tar"
    }
    fn default_name(&self) -> String {
        let first = self.roots[0].to_string_lossy();
        format!("files-{}", sanitize(&first))
    }
    fn source(&self) -> Source {
        Source {
            host: hostname(),
            paths: self.roots.iter().map(|p| p.display().to_string()).collect(),
            ..Source::default()
        }
    }

    fn full_every(&self) -> Option<FullEvery> {
        self.args.incremental.then(|| {
            self.args.full_every.clone().unwrap_or(FullEvery::Age(
                bk_core::retention::Span::parse("7d").expect("a duration"),
            ))
        })
    }

    fn dump_since(
        &self,
        out: &mut dyn Write,
        snapshot: &Path,
        parent: Option<&incremental::Tree>,
    ) -> Result<(Dumped, incremental::Tree)> {
        let tar = incremental::gnu_tar()?;
        // GNU tar archives a symlink named as a path as a link: bk-dump follows it.
        let roots = self
            .roots
            .iter()
            .map(|r| fs::canonicalize(r).map_err(|e| Error::io(format!("reading {}", r.display()), e)))
            .collect::<Result<Vec<_>>>()?;
        let mut excludes = self.args.exclude.clone();
        excludes.extend(self.skip.iter().map(|p| p.display().to_string()));
        let cmd = incremental::create_command(&tar, snapshot, &roots, &excludes, self.args.one_file_system);
        let piece = incremental::dump_piece(cmd, out)?;
        let tree = incremental::Tree::after(parent, &piece.listing, &piece.members);
        let version = crate::process::version_line(&tar);
        let dumped = Dumped {
            counts: incremental::counts(parent, &piece, &tree),
            tool: ToolInfo {
                program: "tar".into(),
                version: version.rsplit(' ').next().unwrap_or_default().to_string(),
            },
        };
        Ok((dumped, tree))
    }

    fn dump(&self, out: &mut dyn Write) -> Result<Dumped> {
        let mut archiver = Archiver {
            builder: tar::Builder::new(out),
            exclude: PathGlobs::new(&self.args.exclude, "--exclude")?,
            include: PathGlobs::new(&self.args.include, "--include")?,
            one_file_system: self.args.one_file_system,
            skip: &self.skip,
            hard_links: HashMap::new(),
            entries: 0,
        };
        archiver.builder.mode(HeaderMode::Complete);
        for root in &self.roots {
            // A named root that is gone fails the dump, as it would have when the job began.
            let meta = fs::metadata(root).map_err(|e| Error::io(format!("reading {}", root.display()), e))?;
            archiver.add(root, &meta, meta.dev())?;
        }
        let entries = archiver.entries;
        archiver
            .builder
            .into_inner()
            .map_err(|e| from_io("writing the tar end", e))?;
        Ok(Dumped {
            counts: BTreeMap::from([(ENTRIES.to_string(), entries)]),
            tool: ToolInfo {
                program: "tar-rs".into(),
                version: "0.4".into(),
            },
        })
    }
}

struct Archiver<'a> {
    builder: tar::Builder<&'a mut dyn Write>,
    exclude: PathGlobs,
    include: PathGlobs,
    one_file_system: bool,
    skip: &'a [PathBuf],
    /// (device, inode) of files with several links -> the name first archived.
    hard_links: HashMap<(u64, u64), PathBuf>,
    entries: u64,
}

impl Archiver<'_> {
    /// Archives `path` (metadata already read) and, for a directory, what is below it.
    fn add(&mut self, path: &Path, meta: &Metadata, root_dev: u64) -> Result<()> {
        // Entry names are relative, as GNU tar stores them: /srv/www -> srv/www.
        let name = path.strip_prefix("/").unwrap_or(path).to_path_buf();
        let kind = meta.file_type();
        let mut header = Header::new_gnu();
        // --include keeps directories (the tree stays whole) and filters everything else,
        // as bk-restore --include does.
        if !kind.is_dir() && !self.include.empty && !self.include.matches(path) {
            return Ok(());
        }
        header.set_metadata_in_mode(meta, HeaderMode::Complete);
        if !kind.is_file() {
            header.set_size(0);
        }
        let archiving = |e| from_io(format!("archiving {}", path.display()), e);
        if kind.is_dir() {
            let descend = !(self.one_file_system && meta.dev() != root_dev);
            // Listed before its entry is written: a directory gone by now is not archived.
            let children = if descend {
                match vanished(path, list_dir(path))? {
                    Some(children) => children,
                    None => return Ok(()),
                }
            } else {
                Vec::new()
            };
            if !name.as_os_str().is_empty() {
                self.builder
                    .append_data(&mut header, &name, io::empty())
                    .map_err(archiving)?;
                self.entries += 1;
            } // "/" itself has no entry; its children do
            return self.add_children(children, root_dev);
        }
        if kind.is_symlink() {
            let Some(target) = vanished(path, fs::read_link(path))? else {
                return Ok(());
            };
            self.builder
                .append_link(&mut header, &name, target)
                .map_err(archiving)?;
        } else if kind.is_file() {
            let inode = (meta.dev(), meta.ino());
            if let Some(first) = self.hard_links.get(&inode).filter(|_| meta.nlink() > 1) {
                header.set_entry_type(EntryType::Link);
                header.set_size(0);
                let first = first.clone();
                self.builder.append_link(&mut header, &name, first).map_err(archiving)?;
            } else {
                let Some(file) = vanished(path, File::open(path))? else {
                    return Ok(());
                };
                let data = ExactSize {
                    inner: file,
                    remaining: meta.len(),
                    path,
                    grew_checked: false,
                    shrank: false,
                };
                self.builder.append_data(&mut header, &name, data).map_err(archiving)?;
                if meta.nlink() > 1 {
                    self.hard_links.insert(inode, name);
                }
            }
        } else if kind.is_socket() {
            eprintln!("bk-dump: warning: {}: socket ignored", path.display());
            return Ok(());
        } else {
            // FIFOs and devices: the header is the whole entry.
            if kind.is_block_device() || kind.is_char_device() {
                let rdev = meta.rdev();
                let device = |n: u64| n.try_into().unwrap_or(u32::MAX);
                header
                    .set_device_major(device(nix::sys::stat::major(rdev)))
                    .map_err(archiving)?;
                header
                    .set_device_minor(device(nix::sys::stat::minor(rdev)))
                    .map_err(archiving)?;
            }
            self.builder
                .append_data(&mut header, &name, io::empty())
                .map_err(archiving)?;
        }
        self.entries += 1;
        Ok(())
    }

    fn add_children(&mut self, children: Vec<PathBuf>, root_dev: u64) -> Result<()> {
        for child in children {
            if self.exclude.matches(&child) {
                continue;
            }
            if self.skip.contains(&child) {
                eprintln!(
                    "bk-dump: note: {} is the store; not backed up into itself",
                    child.display()
                );
                continue;
            }
            if let Some(meta) = vanished(&child, fs::symlink_metadata(&child))? {
                self.add(&child, &meta, root_dev)?;
            }
        }
        Ok(())
    }
}

/// The paths in `dir`, sorted.
fn list_dir(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut children = fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<io::Result<Vec<_>>>()?;
    children.sort();
    Ok(children)
}

/// A busy tree changes while it is read: an entry listed a moment ago and gone now is left
/// out with a warning (None), as tar and restic do; the backup holds what was there when
/// the dump reached each entry. Any other failure to read fails the dump.
fn vanished<T>(path: &Path, read: io::Result<T>) -> Result<Option<T>> {
    match read {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            eprintln!(
                "bk-dump: warning: {} vanished while being read: not in the backup",
                path.display()
            );
            Ok(None)
        }
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

/// Yields exactly the size the tar header announced, so that the tar stays valid: a file
/// that grew is cut at that size, one that shrank is padded with zeros (as GNU tar does);
/// both are reported once.
struct ExactSize<'a> {
    inner: File,
    remaining: u64,
    path: &'a Path,
    grew_checked: bool,
    shrank: bool,
}

impl Read for ExactSize<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            if !self.grew_checked {
                self.grew_checked = true;
                if !self.shrank && self.inner.read(&mut [0u8])? > 0 {
                    eprintln!(
                        "bk-dump: warning: {} grew while being read; backed up as it was when the dump reached it",
                        self.path.display()
                    );
                }
            }
            return Ok(0);
        }
        let want = buf.len().min(self.remaining.try_into().unwrap_or(usize::MAX));
        let mut n = if self.shrank {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        if n == 0 {
            if !self.shrank {
                self.shrank = true;
                eprintln!(
                    "bk-dump: warning: {} shrank by {} bytes while being read; padded with zeros",
                    self.path.display(),
                    self.remaining
                );
            }
            buf[..want].fill(0);
            n = want;
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Restores a tar artifact into `target`: unpacked into a staging directory inside it,
/// checked (sha256, entry count), then moved into place.
pub fn restore(artifact: &Artifact, decoder: Decoder, target: &Path, opts: &RestoreOptions) -> Result<RestoredInfo> {
    let include = PathGlobs::new(&opts.include, "--include")?;
    let counts = into_target(target, opts, |staging| {
        let (entries, archived_dirs) = unpack(artifact, decoder, staging, &include)?;
        check_entries(artifact, entries, include.empty)?;
        Ok((BTreeMap::from([(ENTRIES.to_string(), entries)]), archived_dirs))
    })?;
    Ok(RestoredInfo {
        target: path_target(target),
        counts,
        complete: include.empty,
    })
}

/// Restores an incremental chain (`chain`: the full first, the backup to restore last) into
/// `target`: every piece extracted in order by GNU tar into a staging directory (which
/// deletes what each piece's listings no longer hold), each checked as it passes (sha256,
/// entries, counts against the tree before it), then the files counted against the last
/// manifest, then moved into place. `open` opens a piece's stored bytes. With `Hashing::Contents`
/// (bk-verify) every file restored is also compared with what the pieces stored: size,
/// sha256, symlink target.
pub fn restore_chain(
    chain: &[Artifact],
    mut open: impl FnMut(&Artifact) -> Result<Decoder>,
    target: &Path,
    opts: &RestoreOptions,
    hashing: incremental::Hashing,
) -> Result<RestoredInfo> {
    let include = PathGlobs::new(&opts.include, "--include")?;
    let tar = incremental::gnu_tar()?;
    let newest = chain.last().expect("a chain holds its backup");
    let counts = into_target(target, opts, |staging| {
        let mut tree = None;
        let mut contents = (hashing == incremental::Hashing::Contents).then(incremental::Contents::default);
        for piece in chain {
            let decoder = open(piece)?;
            tree = Some(incremental::extract_piece(
                &tar,
                piece,
                decoder,
                staging,
                tree.as_ref(),
                contents.as_mut(),
            )?);
        }
        let tree = tree.expect("a chain holds its backup");
        if let Some(contents) = &contents {
            contents.check(staging, &newest.id)?;
        }
        if !include.empty {
            keep_only(staging, staging, &include)?;
        }
        let files = count_files(staging)?;
        let expected = newest.counts.get(incremental::FILES).copied();
        if include.empty && expected != Some(files) {
            return Err(Error::data(format!(
                "{}: the restored chain holds {files} files, the manifest says {}",
                newest.id,
                expected.map_or("none".into(), |n| n.to_string())
            )));
        }
        let archived_dirs = tree.dirs().map(|d| staging.join(d)).collect();
        Ok((BTreeMap::from([(incremental::FILES.to_string(), files)]), archived_dirs))
    })?;
    Ok(RestoredInfo {
        target: path_target(target),
        counts,
        complete: include.empty,
    })
}

/// Removes from `dir` (inside `staging`) every file that `include` does not match;
/// directories stay, as a partial restore of a full keeps them.
fn keep_only(staging: &Path, dir: &Path, include: &PathGlobs) -> Result<()> {
    for path in list_dir(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))? {
        let meta = fs::symlink_metadata(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        if meta.is_dir() {
            keep_only(staging, &path, include)?;
        } else if !include
            .matches(&Path::new("/").join(path.strip_prefix(staging).expect("below the staging directory")))
        {
            fs::remove_file(&path).map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
        }
    }
    Ok(())
}

/// Everything below `dir` that is not a directory.
fn count_files(dir: &Path) -> Result<u64> {
    let mut files = 0;
    for path in list_dir(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))? {
        let meta = fs::symlink_metadata(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        files += if meta.is_dir() { count_files(&path)? } else { 1 };
    }
    Ok(files)
}

/// Restores into `target` through a staging directory inside it that `fill` fills and
/// checks, returning the counts and the staged directories the backup holds; then moves what
/// it holds into place. A target that is not empty is refused without --replace; whatever
/// fails, the staging directory goes and the target is as it was.
fn into_target(
    target: &Path,
    opts: &RestoreOptions,
    fill: impl FnOnce(&Path) -> Result<(BTreeMap<String, u64>, HashSet<PathBuf>)>,
) -> Result<BTreeMap<String, u64>> {
    // The target and its missing parents, innermost first: removed again if the restore fails.
    let created: Vec<&Path> = target
        .ancestors()
        .take_while(|dir| !dir.as_os_str().is_empty() && !dir.exists())
        .collect();
    if created.is_empty() {
        if !target.is_dir() {
            return Err(Error::cant_create(format!(
                "{} exists and is not a directory",
                target.display()
            )));
        }
        let non_empty = fs::read_dir(target)
            .map_err(|e| Error::io(target.display(), e))?
            .next()
            .is_some();
        if non_empty && !opts.replace {
            return Err(Error::cant_create(format!(
                "{} is not empty; pass --replace to restore over what it holds",
                target.display()
            )));
        }
    }
    create_private_dir(target)?;
    let staging = target.join(format!(".bk-restore-{:08x}", rand::random::<u32>()));
    create_private_dir(&staging)?;
    let result = fill(&staging).and_then(|(counts, archived_dirs)| {
        merge_into(&staging, target, &archived_dirs)?;
        Ok(counts)
    });
    let _ = remove_tree(&staging);
    if result.is_err() {
        for dir in created {
            let _ = fs::remove_dir(dir);
        }
    }
    result
}

fn check_entries(artifact: &Artifact, found: u64, complete: bool) -> Result<()> {
    let expected = artifact.counts.get(ENTRIES).copied();
    if complete && expected != Some(found) {
        return Err(Error::data(format!(
            "{}: {found} entries in the archive, the manifest says {}",
            artifact.file,
            expected.map_or("none".into(), |n| n.to_string())
        )));
    }
    Ok(())
}

/// Unpacks every entry (or those `include` matches), directories last so their modes and
/// mtimes are not disturbed by what is written inside them; then checks the stored bytes.
/// Returns the number of entries and the staged paths of the directories the archive holds.
/// Every entry is checked before anything is written for it (see `Staging`): the first one
/// that could land outside the staging directory fails the whole restore.
fn unpack(
    artifact: &Artifact,
    decoder: Decoder,
    staging: &Path,
    include: &PathGlobs,
) -> Result<(u64, HashSet<PathBuf>)> {
    let mut archive = tar::Archive::new(decoder);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(nix::unistd::geteuid().is_root());
    archive.set_overwrite(true);
    let staging = Staging {
        dir: staging,
        file: &artifact.file,
        partial: !include.empty,
    };
    let mut count = 0;
    let mut archived_dirs = HashSet::new();
    {
        let mut dirs = Vec::new();
        // The directory above the last entry, already found to be a chain of real
        // directories: nothing an archive holds can turn a directory into a link later
        // (tar-rs, like unpack_special, only ever removes non-directories).
        let mut checked_parent = PathBuf::new();
        let reading = |e| from_io(format!("reading {}", artifact.file), e);
        for entry in archive.entries().map_err(reading)? {
            let mut entry = entry.map_err(reading)?;
            let path = entry.path().map_err(reading)?.into_owned();
            let kind = entry.header().entry_type();
            let is_dir = kind == EntryType::Directory;
            if staging.partial && !is_dir && !include.matches(&Path::new("/").join(&path)) {
                continue;
            }
            count += 1;
            let dst = staging.dst(&path)?;
            let parent = dst.parent().expect("below the staging directory");
            if parent != checked_parent {
                staging.check_dirs_above(&path, &dst, true)?;
                checked_parent = parent.to_path_buf();
            }
            if is_dir {
                dirs.push((entry, path, dst));
                continue;
            }
            if fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir()) {
                return Err(staging.refuse(&path, "would replace a directory of the same archive"));
            }
            let restoring = |e| from_io(format!("restoring {}", path.display()), e);
            if kind.is_hard_link() {
                staging.check_hard_link(&path, entry.link_name().map_err(reading)?.as_deref())?;
            }
            if kind.is_fifo() || kind.is_character_special() || kind.is_block_special() {
                // tar-rs would make these regular files.
                unpack_special(entry.header(), &dst).map_err(restoring)?;
            } else {
                entry.unpack_in(staging.dir).map_err(restoring)?;
            }
        }
        for (mut dir, path, dst) in dirs.into_iter().rev() {
            if fs::symlink_metadata(&dst).is_ok_and(|m| !m.is_dir()) {
                return Err(staging.refuse(&path, "is a directory and another entry of the same archive is not"));
            }
            let restoring = |e| from_io(format!("restoring {}", path.display()), e);
            dir.unpack_in(staging.dir).map_err(restoring)?;
            // tar-rs sets a directory's mode and owner, not its mtime.
            set_mtime(&dst, dir.header()).map_err(restoring)?;
            archived_dirs.insert(dst);
        }
    }
    archive.into_inner().finish(artifact)?;
    Ok((count, archived_dirs))
}

/// Where an entry lands below `staging`: '.' components dropped; refused (with the reason)
/// for what bk-dump never writes: a '..' component, an absolute path, a path that names no
/// file. The result is always strictly inside `staging`.
fn staged_path(staging: &Path, path: &Path) -> std::result::Result<PathBuf, &'static str> {
    let mut dst = staging.to_path_buf();
    for part in path.components() {
        match part {
            Component::Normal(p) => dst.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("has a '..' component"),
            Component::RootDir | Component::Prefix(_) => return Err("is an absolute path"),
        }
    }
    if dst == staging {
        return Err("names no file");
    }
    Ok(dst)
}

/// An entry that bk-dump never writes: the artifact is bad (65).
fn bad_entry(file: &str, entry: &Path, why: impl std::fmt::Display) -> Error {
    // {:?}: a name with a newline or bytes that are not UTF-8 still makes one line.
    Error::data(format!("{file}: entry {entry:?} {why}: refused"))
}

/// The rules of `Staging` that the names alone show, for bk-verify, which unpacks nothing:
/// a path that `staged_path` accepts, below no symlink of the archive (`symlinks`, the
/// entries seen so far), and a hard link to such a path.
fn check_entry_name<R: Read>(
    entry: &tar::Entry<R>,
    symlinks: &mut HashSet<PathBuf>,
) -> std::result::Result<(), String> {
    let path = entry.path().map_err(|e| e.to_string())?;
    let rel = staged_path(Path::new(""), &path)?;
    if let Some(link) = rel.ancestors().skip(1).find(|dir| symlinks.contains(*dir)) {
        return Err(format!(
            "goes through {link:?}, which is a symbolic link in the archive"
        ));
    }
    let kind = entry.header().entry_type();
    if kind.is_hard_link() {
        let target = entry
            .link_name()
            .map_err(|e| e.to_string())?
            .ok_or("is a hard link to nothing")?;
        staged_path(Path::new(""), &target).map_err(|why| format!("is a hard link to {target:?}, which {why}"))?;
    } else if kind.is_symlink() {
        symlinks.insert(rel);
    }
    Ok(())
}

/// The staging directory of one restore, and the rules that keep every entry inside it.
/// An entry that breaks them is one bk-dump never writes: the artifact is bad data (65),
/// whoever made it, and the restore stops before anything reaches the target.
struct Staging<'a> {
    dir: &'a Path,
    /// The artifact's file name, for messages.
    file: &'a str,
    /// --include leaves entries out.
    partial: bool,
}

impl Staging<'_> {
    fn refuse(&self, entry: &Path, why: impl std::fmt::Display) -> Error {
        bad_entry(self.file, entry, why)
    }

    fn dst(&self, entry: &Path) -> Result<PathBuf> {
        staged_path(self.dir, entry).map_err(|why| self.refuse(entry, why))
    }

    /// Checks that the directories above `dst` are real directories, and with `create`
    /// makes those not there yet (0700 whatever the umask: they are bk's until an entry of
    /// the archive gives one its own mode). A symbolic link of the archive on the way
    /// (`dir -> /etc`, then `dir/passwd`) would lead outside the target.
    fn check_dirs_above(&self, entry: &Path, dst: &Path, create: bool) -> Result<()> {
        let above = dst.parent().and_then(|p| p.strip_prefix(self.dir).ok());
        let mut dir = self.dir.to_path_buf();
        for part in above.expect("below the staging directory").components() {
            dir.push(part);
            match fs::symlink_metadata(&dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) => {
                    let what = if meta.file_type().is_symlink() {
                        "a symbolic link"
                    } else {
                        "not a directory"
                    };
                    let rel = dir.strip_prefix(self.dir).expect("below the staging directory");
                    return Err(self.refuse(entry, format!("goes through {rel:?}, which is {what} in the archive")));
                }
                // Nothing below a missing directory exists either.
                Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => create_private_dir(&dir)?,
                Err(e) => return Err(Error::io(format!("restoring {}", entry.display()), e)),
            }
        }
        Ok(())
    }

    /// A hard link names a file that an earlier entry restored, inside the staging
    /// directory: never a file of the system (`/etc/shadow`, `../../etc/shadow`).
    fn check_hard_link(&self, entry: &Path, link: Option<&Path>) -> Result<()> {
        let link = link.ok_or_else(|| self.refuse(entry, "is a hard link to nothing"))?;
        let src = staged_path(self.dir, link)
            .map_err(|why| self.refuse(entry, format!("is a hard link to {link:?}, which {why}")))?;
        self.check_dirs_above(entry, &src, false)?;
        if fs::symlink_metadata(&src).is_ok_and(|m| m.is_file()) {
            return Ok(());
        }
        if self.partial {
            return Err(Error::usage(format!(
                "{entry:?} is a hard link to {link:?}, which --include leaves out: include both"
            )));
        }
        Err(self.refuse(
            entry,
            format!("is a hard link to {link:?}, which no earlier entry restored as a file"),
        ))
    }
}

fn set_mtime(dst: &Path, header: &Header) -> io::Result<()> {
    let mtime = filetime::FileTime::from_unix_time(header.mtime()? as i64, 0);
    // By path, not by opening: opening a FIFO would block.
    filetime::set_symlink_file_times(dst, mtime, mtime)
}

/// A FIFO or device node, with its mode, owner (as root) and mtime, at `dst` (checked by
/// `Staging`: the directories above it are real ones).
fn unpack_special(header: &Header, dst: &Path) -> io::Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    use std::os::unix::fs::PermissionsExt;
    if fs::symlink_metadata(dst).is_ok() {
        fs::remove_file(dst)?;
    }
    let kind = match header.entry_type() {
        EntryType::Fifo => SFlag::S_IFIFO,
        EntryType::Char => SFlag::S_IFCHR,
        _ => SFlag::S_IFBLK,
    };
    let number = |n: io::Result<Option<u32>>| n.map(|n| u64::from(n.unwrap_or(0)));
    let dev = makedev(number(header.device_major())?, number(header.device_minor())?);
    let mode = header.mode()?;
    mknod(dst, kind, Mode::from_bits_truncate(mode & 0o777), dev).map_err(io::Error::from)?;
    if nix::unistd::geteuid().is_root() {
        let id = |n: u64| u32::try_from(n).map_err(io::Error::other);
        std::os::unix::fs::lchown(dst, Some(id(header.uid()?)?), Some(id(header.gid()?)?))?;
    }
    fs::set_permissions(dst, fs::Permissions::from_mode(mode & 0o7777))?;
    set_mtime(dst, header)
}

/// Moves what `from` holds into `to`, replacing files and merging directories. A merged
/// directory takes the archived attributes only if the archive holds it (not, say, the
/// `srv` above a backup of /srv/www).
fn merge_into(from: &Path, to: &Path, archived_dirs: &HashSet<PathBuf>) -> Result<()> {
    let moving = |p: &Path, e| Error::io(format!("moving {} into place", p.display()), e);
    for entry in fs::read_dir(from).map_err(|e| moving(from, e))? {
        let entry = entry.map_err(|e| moving(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let src_is_dir = entry.file_type().map_err(|e| moving(&src, e))?.is_dir();
        match fs::symlink_metadata(&dst) {
            Ok(m) if m.is_dir() && src_is_dir => {
                // Read first: moving the children out changes the staged directory's mtime.
                let archived = fs::metadata(&src).map_err(|e| Error::io(src.display(), e))?;
                merge_into(&src, &dst, archived_dirs)?;
                if archived_dirs.contains(&src) {
                    copy_dir_attributes(&archived, &dst)?;
                }
                continue;
            }
            Ok(m) if m.is_dir() => remove_tree(&dst).map_err(|e| moving(&dst, e))?,
            Ok(_) => fs::remove_file(&dst).map_err(|e| moving(&dst, e))?,
            Err(_) => {}
        }
        fs::rename(&src, &dst).map_err(|e| moving(&src, e))?;
    }
    Ok(())
}

/// A directory merged into an existing one takes the archived mode, owner and mtime.
fn copy_dir_attributes(meta: &Metadata, dst: &Path) -> Result<()> {
    let set = |e| Error::io(format!("setting attributes of {}", dst.display()), e);
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(dst, Some(meta.uid()), Some(meta.gid())).map_err(set)?;
    }
    fs::set_permissions(dst, meta.permissions()).map_err(set)?;
    filetime::set_file_mtime(dst, filetime::FileTime::from_last_modification_time(meta)).map_err(set)
}

/// Removes a tree even where a restored directory is read-only (0555 and the like).
pub fn remove_tree(path: &Path) -> io::Result<()> {
    if fs::remove_dir_all(path).is_ok() {
        return Ok(());
    }
    use std::os::unix::fs::PermissionsExt;
    for entry in fs::read_dir(path)? {
        let p = entry?.path();
        if fs::symlink_metadata(&p)?.is_dir() {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700))?;
        }
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    for entry in fs::read_dir(path)? {
        let p = entry?.path();
        if fs::symlink_metadata(&p)?.is_dir() {
            remove_tree(&p)?;
        }
    }
    fs::remove_dir_all(path)
}

/// Re-derives the entry count of a tar from its bytes, which must end as tar ends: whole
/// 512-byte blocks, the last two of them zero.
pub fn derive_counts(artifact: &Artifact, decoder: &mut Decoder) -> Result<BTreeMap<String, u64>> {
    let mut entries = 0;
    let mut symlinks = HashSet::new();
    for_each_tar_entry(&artifact.file, decoder, |entry| {
        check_entry_name(entry, &mut symlinks).map_err(|why| {
            let path = entry.path_bytes();
            bad_entry(&artifact.file, Path::new(std::ffi::OsStr::from_bytes(&path)), why)
        })?;
        io::copy(entry, &mut io::sink()).map_err(|e| tar_error(&artifact.file, e))?;
        entries += 1;
        Ok(())
    })?;
    Ok(BTreeMap::from([(ENTRIES.to_string(), entries)]))
}

/// Reads a tar to its end, giving each entry to `each`; the tar must end as tar ends: whole
/// 512-byte blocks, the last two of them zero (else it is truncated: 65). `file` names the
/// artifact in errors.
pub(crate) fn for_each_tar_entry(
    file: &str,
    input: &mut dyn Read,
    mut each: impl FnMut(&mut tar::Entry<&mut TailReader>) -> Result<()>,
) -> Result<()> {
    let mut tail = TailReader {
        inner: input,
        total: 0,
        tail: Vec::new(),
    };
    {
        let mut archive = tar::Archive::new(&mut tail);
        for entry in archive.entries().map_err(|e| tar_error(file, e))? {
            each(&mut entry.map_err(|e| tar_error(file, e))?)?;
        }
    }
    io::copy(&mut tail, &mut io::sink()).map_err(|e| from_io(format!("reading {file}"), e))?;
    if !tail.total.is_multiple_of(512) || tail.tail.len() < 1024 || tail.tail.iter().any(|b| *b != 0) {
        return Err(Error::data(format!(
            "{file}: the tar does not end with its two zero blocks: it is truncated"
        )));
    }
    Ok(())
}

/// A failure reading a tar. The decoder's and the store's failures arrive as bk errors; any
/// other is tar's own complaint about the content: bad data (65), not an I/O error.
pub(crate) fn tar_error(file: &str, e: io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        from_io(format!("reading {file}"), e)
    } else if e.kind() == io::ErrorKind::UnexpectedEof || e.to_string().contains("unexpected EOF") {
        Error::data(format!(
            "{file}: the tar ends in the middle of an entry: it is truncated"
        ))
    } else {
        Error::data(format!("{file}: not a valid tar archive: {e}"))
    }
}

/// Passes bytes through, keeping the count and the last 1024 of them.
pub(crate) struct TailReader<'a> {
    inner: &'a mut dyn Read,
    total: u64,
    tail: Vec<u8>,
}

impl Read for TailReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total += n as u64;
        self.tail.extend_from_slice(&buf[n.saturating_sub(1024)..n]);
        if self.tail.len() > 1024 {
            self.tail.drain(..self.tail.len() - 1024);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::ffi::OsStr;

    /// Entry names as a hostile tar may hold them: '..', '.', '/', empty and long parts,
    /// bytes that are not UTF-8 (never NUL, which ends a name in a tar header).
    fn entry_name() -> impl Strategy<Value = Vec<u8>> {
        let part = prop_oneof![
            Just(b"..".to_vec()),
            Just(b".".to_vec()),
            Just(b"/".to_vec()),
            Just(Vec::new()),
            "[a-z.]{1,6}".prop_map(String::into_bytes),
            proptest::collection::vec(1..=u8::MAX, 1..300),
        ];
        proptest::collection::vec(part, 0..8).prop_map(|parts| parts.join(&b'/'))
    }

    proptest! {
        // 256 cases by default; PROPTEST_CASES=100000 for a longer run.
        #[test]
        fn an_entry_is_refused_or_lands_strictly_inside_the_staging_directory(name in entry_name()) {
            let staging = Path::new("/target/.bk-restore-0123abcd");
            let name = Path::new(OsStr::from_bytes(&name));
            let escapes = name.has_root() || name.components().any(|c| c == Component::ParentDir);
            let empty = name.components().all(|c| c == Component::CurDir);
            match staged_path(staging, name) {
                Ok(dst) => {
                    prop_assert!(!escapes && !empty, "{name:?} accepted as {dst:?}");
                    let below = dst.strip_prefix(staging).expect("below the staging directory");
                    prop_assert!(below.components().next().is_some());
                    prop_assert!(below.components().all(|c| matches!(c, Component::Normal(_))), "{dst:?}");
                }
                Err(_) => prop_assert!(escapes || empty, "{name:?} refused"),
            }
        }
    }
}
