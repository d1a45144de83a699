//! The `files` engine: a tar of paths keeping modes, owners, mtimes, symlinks, hard links,
//! empty directories and special files; restored through a staging directory so a bad
//! artifact leaves the target untouched.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
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
        let written = if kind.is_dir() {
            if !name.as_os_str().is_empty() {
                self.builder.append_data(&mut header, &name, io::empty())
            } else {
                Ok(()) // "/" itself has no entry; its children do
            }
        } else if kind.is_symlink() {
            let target = fs::read_link(path).map_err(|e| vanished_or(path, e))?;
            self.builder.append_link(&mut header, &name, target)
        } else if kind.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = self.hard_links.get(&(meta.dev(), meta.ino())) {
                    header.set_entry_type(EntryType::Link);
                    header.set_size(0);
                    let first = first.clone();
                    self.entries += 1;
                    return self
                        .builder
                        .append_link(&mut header, &name, first)
                        .map_err(|e| from_io("writing", e));
                }
                self.hard_links.insert((meta.dev(), meta.ino()), name.clone());
            }
            let file = File::open(path).map_err(|e| vanished_or(path, e))?;
            let data = ExactSize {
                inner: file,
                remaining: meta.len(),
                path,
                grew_checked: false,
            };
            self.builder.append_data(&mut header, &name, data)
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
                    .map_err(|e| from_io("archiving", e))?;
                header
                    .set_device_minor(device(nix::sys::stat::minor(rdev)))
                    .map_err(|e| from_io("archiving", e))?;
            }
            self.builder.append_data(&mut header, &name, io::empty())
        };
        written.map_err(|e| from_io(format!("archiving {}", path.display()), e))?;
        self.entries += 1;
        if kind.is_dir() && !(self.one_file_system && meta.dev() != root_dev) {
            self.add_children(path, root_dev)?;
        }
        Ok(())
    }

    fn add_children(&mut self, dir: &Path, root_dev: u64) -> Result<()> {
        let mut children = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| vanished_or(dir, e))? {
            children.push(entry.map_err(|e| vanished_or(dir, e))?.path());
        }
        children.sort();
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
            let meta = fs::symlink_metadata(&child).map_err(|e| vanished_or(&child, e))?;
            self.add(&child, &meta, root_dev)?;
        }
        Ok(())
    }
}

/// A file listed a moment ago and gone now is an error: the backup would not be what the
/// directory held.
fn vanished_or(path: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::new(
            bk_core::Kind::Io,
            format!("{} vanished while being backed up", path.display()),
        )
    } else {
        Error::io(format!("reading {}", path.display()), e)
    }
}

/// Yields exactly the size the tar header announced: a file that grew is cut at that size,
/// one that shrank is padded with zeros (as GNU tar does); both are reported.
struct ExactSize<'a> {
    inner: File,
    remaining: u64,
    path: &'a Path,
    grew_checked: bool,
}

impl Read for ExactSize<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            if !self.grew_checked {
                self.grew_checked = true;
                if self.inner.read(&mut [0u8])? > 0 {
                    eprintln!(
                        "bk-dump: warning: {} grew while being read; backed up as it was when the dump reached it",
                        self.path.display()
                    );
                }
            }
            return Ok(0);
        }
        let want = buf.len().min(self.remaining.try_into().unwrap_or(usize::MAX));
        let mut n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            eprintln!(
                "bk-dump: warning: {} shrank by {} bytes while being read; padded with zeros",
                self.path.display(),
                self.remaining
            );
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
    let created_target = !target.exists();
    if !created_target {
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
    let unpacked = unpack(artifact, decoder, &staging, &include);
    let result = unpacked.and_then(|(entries, archived_dirs)| {
        check_entries(artifact, entries, include.empty)?;
        merge_into(&staging, target, &archived_dirs)?;
        Ok(entries)
    });
    let _ = remove_tree(&staging);
    match result {
        Ok(entries) => Ok(RestoredInfo {
            target: path_target(target),
            counts: BTreeMap::from([(ENTRIES.to_string(), entries)]),
            complete: include.empty,
        }),
        Err(e) => {
            if created_target {
                let _ = fs::remove_dir(target);
            }
            Err(e)
        }
    }
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
    let mut count = 0;
    let mut archived_dirs = HashSet::new();
    {
        let mut dirs = Vec::new();
        let reading = |e| from_io(format!("reading {}", artifact.file), e);
        for entry in archive.entries().map_err(reading)? {
            let mut entry = entry.map_err(reading)?;
            let path = entry.path().map_err(reading)?.into_owned();
            let is_dir = entry.header().entry_type() == EntryType::Directory;
            if !include.empty && !is_dir && !include.matches(&Path::new("/").join(&path)) {
                continue;
            }
            count += 1;
            let kind = entry.header().entry_type();
            if is_dir {
                dirs.push(entry);
            } else if kind.is_fifo() || kind.is_character_special() || kind.is_block_special() {
                // tar-rs would make these regular files.
                if let Some(dst) = staged_path(staging, &path) {
                    unpack_special(entry.header(), staging, &dst)
                        .map_err(|e| from_io(format!("restoring {}", path.display()), e))?;
                }
            } else {
                entry
                    .unpack_in(staging)
                    .map_err(|e| from_io(format!("restoring {}", path.display()), e))?;
            }
        }
        for mut dir in dirs.into_iter().rev() {
            let path = dir.path().map_err(reading)?.into_owned();
            let restoring = |e| from_io(format!("restoring {}", path.display()), e);
            if dir.unpack_in(staging).map_err(restoring)? {
                // tar-rs sets a directory's mode and owner, not its mtime.
                if let Some(dst) = staged_path(staging, &path) {
                    set_mtime(&dst, dir.header()).map_err(restoring)?;
                    archived_dirs.insert(dst);
                }
            }
        }
    }
    archive.into_inner().finish(artifact)?;
    Ok((count, archived_dirs))
}

/// Where an entry lands below `staging`, as tar-rs places it: leading '/' and '.' dropped;
/// None for a path with '..' (tar-rs skips those).
fn staged_path(staging: &Path, path: &Path) -> Option<PathBuf> {
    let mut dst = staging.to_path_buf();
    for part in path.components() {
        match part {
            Component::Normal(p) => dst.push(p),
            Component::ParentDir => return None,
            _ => {}
        }
    }
    (dst != staging).then_some(dst)
}

fn set_mtime(dst: &Path, header: &Header) -> io::Result<()> {
    let mtime = filetime::FileTime::from_unix_time(header.mtime()? as i64, 0);
    // By path, not by opening: opening a FIFO would block.
    filetime::set_symlink_file_times(dst, mtime, mtime)
}

/// A FIFO or device node, with its mode, owner (as root) and mtime.
fn unpack_special(header: &Header, staging: &Path, dst: &Path) -> io::Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    use std::os::unix::fs::PermissionsExt;
    let parent = dst.parent().expect("below staging");
    fs::create_dir_all(parent)?;
    // As tar-rs does for files: never follow a symlink out of the staging directory.
    if !parent.canonicalize()?.starts_with(staging.canonicalize()?) {
        return Err(io::Error::other(format!("{} is outside the target", dst.display())));
    }
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
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
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
    let mut tail = TailReader {
        inner: decoder,
        total: 0,
        tail: Vec::new(),
    };
    let mut entries = 0;
    {
        let mut archive = tar::Archive::new(&mut tail);
        // The decoder's and the store's failures arrive as bk errors; any other is tar's
        // own complaint about the content: bad data (65), not an I/O error.
        let reading = |e: io::Error| {
            if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
                from_io(format!("reading {}", artifact.file), e)
            } else if e.kind() == io::ErrorKind::UnexpectedEof || e.to_string().contains("unexpected EOF") {
                Error::data(format!(
                    "{}: the tar ends in the middle of an entry: it is truncated",
                    artifact.file
                ))
            } else {
                Error::data(format!("{}: not a valid tar archive: {e}", artifact.file))
            }
        };
        for entry in archive.entries().map_err(reading)? {
            let mut entry = entry.map_err(reading)?;
            io::copy(&mut entry, &mut io::sink()).map_err(reading)?;
            entries += 1;
        }
    }
    io::copy(&mut tail, &mut io::sink()).map_err(|e| from_io(format!("reading {}", artifact.file), e))?;
    if tail.total % 512 != 0 || tail.tail.len() < 1024 || tail.tail.iter().any(|b| *b != 0) {
        return Err(Error::data(format!(
            "{}: the tar does not end with its two zero blocks: it is truncated",
            artifact.file
        )));
    }
    Ok(BTreeMap::from([(ENTRIES.to_string(), entries)]))
}

/// Passes bytes through, keeping the count and the last 1024 of them.
struct TailReader<'a> {
    inner: &'a mut Decoder,
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
