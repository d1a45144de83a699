//! A store on a local (or mounted) filesystem.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{is_temp, list_name_dir, manifest_file, temp_name, Entry, Listing, Store, Upload, MAX_MANIFEST};
use crate::error::{Error, Kind, Result};
use crate::name::validate_name;
use crate::private::create_private_dir;
use crate::record::{Artifact, Record};

pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(path: &str) -> Result<Self> {
        if path.is_empty() {
            return Err(Error::usage("empty store path"));
        }
        let path = Path::new(path);
        let root = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| Error::io("finding the current directory", e))?
                .join(path)
        };
        Ok(LocalStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn name_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Creates the root and the name's directory, 0700 whatever the umask, and checks that
    /// they can be trusted.
    fn ensure_name_dir(&self, name: &str) -> Result<PathBuf> {
        if self.root.exists() && !self.root.is_dir() {
            return Err(Error::cant_create(format!("store {} is not a directory", self.url())));
        }
        create_private_dir(&self.root)?;
        check_trusted(&self.root, Dir::Root, Access::Write)?;
        let dir = self.name_dir(name);
        if fs::symlink_metadata(&dir).is_err() {
            create_private_dir(&dir)?;
        }
        check_trusted(&dir, Dir::Name, Access::Write)?;
        Ok(dir)
    }

    /// The name's directory, checked, if the store has one: for reading or deleting.
    fn existing_name_dir(&self, name: &str, access: Access) -> Result<Option<PathBuf>> {
        self.check_root(access)?;
        let dir = self.name_dir(name);
        match fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", dir.display()), e)),
            Ok(_) => check_trusted(&dir, Dir::Name, access).map(|()| Some(dir)),
        }
    }

    fn check_root(&self, access: Access) -> Result<()> {
        match fs::metadata(&self.root) {
            Ok(meta) if meta.is_dir() => check_trusted(&self.root, Dir::Root, access),
            Ok(_) => Err(Error::no_input(format!("store {} is not a directory", self.url()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(Error::no_input(format!("no store at {}", self.url())))
            }
            Err(e) => Err(Error::io(format!("store {}", self.url()), e)),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    /// The store's root, which may be a symlink the administrator made.
    Root,
    /// A name's directory, which must be a real directory, not a symlink out of the store.
    Name,
}

/// What an operation does in a store.
#[derive(Clone, Copy, PartialEq)]
enum Access {
    Read,
    /// Creates, replaces or deletes files.
    Write,
}

/// Refuses (77) a store directory that someone else could change, as ssh refuses a loose
/// key: one writable by group or others, who could plant manifests that bk would act on.
/// Writing or deleting also needs the directory to be owned by the user running bk (or
/// root): otherwise its owner could swap a directory for a symlink under bk's feet, and a
/// root bk-prune would delete elsewhere. Reading another account's store (root restoring
/// what the backup user wrote) is fine.
fn check_trusted(dir: &Path, kind: Dir, access: Access) -> Result<()> {
    let meta = match kind {
        Dir::Root => fs::metadata(dir),
        Dir::Name => fs::symlink_metadata(dir),
    }
    .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::new(
            Kind::NoPerm,
            format!(
                "{} is not a directory (a symlink?): a store holds only real directories",
                dir.display()
            ),
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if access == Access::Write && meta.uid() != me && meta.uid() != 0 {
        return Err(Error::new(
            Kind::NoPerm,
            format!(
                "store directory {} is owned by uid {}, not by you (uid {me}) or root, so bk will not write there; run bk as its owner, or: chown {me} {}",
                dir.display(),
                meta.uid(),
                dir.display()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Error::new(
            Kind::NoPerm,
            format!(
                "store directory {} is writable by others (mode {:04o}), who could plant backups bk would act on; run: chmod go-w {}",
                dir.display(),
                mode,
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Opens a file of the store for reading only if it is a regular file: never through a
/// symlink, never a FIFO (which would block forever) or a device.
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Error::data(format!("{} is a symlink: not followed", path.display())),
            _ => Error::io(format!("opening {}", path.display()), e),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(Error::data(format!("{} is not a regular file", path.display())));
    }
    Ok(file)
}

/// Writes a new file (0600 in a store) under a hidden name; publishes it by fsync and rename.
struct LocalUpload {
    file: Option<File>,
    temp: PathBuf,
    target: PathBuf,
    /// Removes the temporary file if a signal ends the run first.
    _on_signal: crate::cleanup::Guard,
}

impl LocalUpload {
    fn create(dir: &Path, file: &str, mode: u32) -> Result<Self> {
        let temp = dir.join(temp_name(file));
        let handle = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
            .map_err(|e| Error::create(&temp, e))?;
        // The mode passed to open is filtered by the umask; this is not.
        handle
            .set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| Error::create(&temp, e))?;
        let removed = temp.clone();
        let on_signal = crate::cleanup::on_exit(move || {
            let _ = fs::remove_file(&removed);
        });
        Ok(LocalUpload {
            file: Some(handle),
            temp,
            target: dir.join(file),
            _on_signal: on_signal,
        })
    }

    fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("an upload is written only before commit")
    }
}

impl Write for LocalUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Upload for LocalUpload {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let file = self.file.take().expect("committed once");
        file.sync_all()
            .map_err(|e| Error::io(format!("writing {}", self.temp.display()), e))?;
        drop(file);
        fs::rename(&self.temp, &self.target)
            .map_err(|e| Error::io(format!("publishing {}", self.target.display()), e))?;
        sync_dir(self.target.parent().expect("a file in a name directory"))
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Replaces the file `path` with `content`, whole or not at all, as a store publishes: for a
/// file that others read while it changes (a node_exporter textfile). A temporary file
/// beside it, fsync, rename; `mode` whatever the umask.
pub fn replace_file(path: &Path, mode: u32, content: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(|| Error::usage(format!("{}: not a UTF-8 file name", path.display())))?;
    let mut upload = LocalUpload::create(dir, file, mode)?;
    upload
        .write_all(content)
        .map_err(|e| Error::io(format!("writing {}", upload.temp.display()), e))?;
    Box::new(upload).commit()
}

/// Makes a rename durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::ReadOnlyFilesystem => {
            // A store that cannot be written: 73, as for a dump into it.
            let mut err = Error::io(format!("deleting {}", path.display()), e);
            err.kind = crate::error::Kind::CantCreate;
            Err(err)
        }
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io(format!("deleting {}", path.display()), e)),
        _ => Ok(()),
    }
}

impl Store for LocalStore {
    fn url(&self) -> String {
        self.root.display().to_string()
    }

    fn local_root(&self) -> Option<PathBuf> {
        Some(self.root.clone())
    }

    fn location(&self, name: &str, file: &str) -> String {
        self.name_dir(name).join(file).display().to_string()
    }

    fn create(&self, name: &str, file: &str) -> Result<Box<dyn Upload>> {
        let dir = self.ensure_name_dir(name)?;
        Ok(Box::new(LocalUpload::create(&dir, file, 0o600)?))
    }

    fn put_manifest(&self, artifact: &Artifact) -> Result<()> {
        let dir = self.ensure_name_dir(&artifact.name)?;
        let mut upload = LocalUpload::create(&dir, &manifest_file(&artifact.id), 0o600)?;
        let line = Record::Artifact(artifact.clone()).to_line();
        writeln!(upload, "{line}").map_err(|e| Error::io(format!("writing {}", upload.temp.display()), e))?;
        Box::new(upload).commit()
    }

    fn has_manifest(&self, name: &str, id: &str) -> Result<bool> {
        if !self.root.is_dir() {
            return Ok(false); // a store yet to be made (or a file: creating says so)
        }
        let Some(dir) = self.existing_name_dir(name, Access::Read)? else {
            return Ok(false);
        };
        Ok(fs::symlink_metadata(dir.join(manifest_file(id))).is_ok())
    }

    fn list(&self, name: Option<&str>) -> Result<Listing> {
        self.check_root(Access::Read)?;
        let names: Vec<String> = match name {
            Some(n) => vec![n.to_string()],
            None => {
                let entries =
                    fs::read_dir(&self.root).map_err(|e| Error::io(format!("listing store {}", self.url()), e))?;
                let mut names = Vec::new();
                for entry in entries {
                    let entry = entry.map_err(|e| Error::io(format!("listing store {}", self.url()), e))?;
                    let n = entry.file_name().to_string_lossy().into_owned();
                    let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                    if is_dir && validate_name(&n).is_ok() {
                        names.push(n);
                    }
                }
                names
            }
        };
        let mut listing = Listing::default();
        for n in names {
            if let Some(dir) = self.existing_name_dir(&n, Access::Read)? {
                list_name(&dir, &n, &mut listing)?;
            }
        }
        listing.sort();
        Ok(listing)
    }

    fn open_file(&self, name: &str, file: &str) -> Result<Box<dyn Read>> {
        let dir = self
            .existing_name_dir(name, Access::Read)?
            .ok_or_else(|| Error::no_input(format!("no backups of {} in {}", name, self.url())))?;
        let file = open_regular(&dir.join(file))?;
        Ok(Box::new(BufReader::with_capacity(256 * 1024, file)))
    }

    fn delete(&self, artifact: &Artifact) -> Result<()> {
        let Some(dir) = self.existing_name_dir(&artifact.name, Access::Write)? else {
            return Ok(());
        };
        remove_if_present(&dir.join(manifest_file(&artifact.id)))?;
        remove_if_present(&dir.join(&artifact.file))?;
        sync_dir(&dir)
    }

    fn remove_leftovers(&self, name: &str, older_than: SystemTime, dry_run: bool) -> Result<Vec<String>> {
        let Some(dir) = self.existing_name_dir(name, Access::Write)? else {
            return Ok(Vec::new());
        };
        let entries = match fs::read_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            other => other.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?,
        };
        let mut removed = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            if !is_temp(&entry.file_name().to_string_lossy()) {
                continue;
            }
            let path = entry.path();
            let meta = match fs::symlink_metadata(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                other => other.map_err(|e| Error::io(format!("reading {}", path.display()), e))?,
            };
            let modified = meta
                .modified()
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            if !meta.is_file() || modified >= older_than {
                continue;
            }
            if !dry_run {
                remove_if_present(&path)?;
            }
            removed.push(path.display().to_string());
        }
        if !dry_run && !removed.is_empty() {
            sync_dir(&dir)?;
        }
        removed.sort();
        Ok(removed)
    }
}

fn list_name(dir: &Path, name: &str, listing: &mut Listing) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?,
    };
    // Each entry, a regular file with its size or not one (never followed: a symlink is not one).
    let mut files = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let regular = fs::symlink_metadata(entry.path()).ok().filter(|m| m.is_file());
        files.insert(
            entry.file_name().to_string_lossy().into_owned(),
            regular.map_or(Entry::Other, |m| Entry::File(Some(m.len()))),
        );
    }
    list_name_dir(
        name,
        &files,
        |f| read_manifest(&dir.join(f)),
        |f| dir.join(f).display().to_string(),
        listing,
    );
    Ok(())
}

/// Reads a manifest: a regular file of at most a megabyte.
fn read_manifest(path: &Path) -> Result<String> {
    let mut text = String::new();
    open_regular(path)?
        .take(MAX_MANIFEST)
        .read_to_string(&mut text)
        .map_err(|e| Error::data(format!("reading {}: {}", path.display(), crate::error::describe_io(&e))))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Source, ToolInfo};
    use std::os::unix::fs::MetadataExt;

    fn artifact(name: &str, id: &str, file: &str) -> Artifact {
        Artifact {
            id: id.into(),
            name: name.into(),
            engine: "files".into(),
            source: Source::default(),
            started: "2026-11-22T00:00:00Z".into(),
            finished: "2026-11-22T00:00:01Z".into(),
            file: file.into(),
            format: "tar".into(),
            compression: crate::codec::Compression::None,
            encryption: None,
            bytes: 5,
            sha256: String::new(),
            content_bytes: 5,
            counts: Default::default(),
            tool: ToolInfo {
                program: "t".into(),
                version: "0".into(),
            },
            bk_version: "0".into(),
            level: None,
            parent: None,
            chain: None,
            location: String::new(),
        }
    }

    #[test]
    fn upload_publishes_atomically_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let old = unsafe { libc::umask(0) };
        let store = LocalStore::new(tmp.path().join("store").to_str().unwrap()).unwrap();
        let mut up = store.create("job", "job.1.tar").unwrap();
        up.write_all(b"hello").unwrap();
        let dir = tmp.path().join("store/job");
        assert!(!dir.join("job.1.tar").exists(), "not published before commit");
        let listing = store.list(None).unwrap();
        assert_eq!(listing.artifacts.len(), 0);
        assert_eq!(listing.leftovers.len(), 1, "{:?}", listing.leftovers);
        up.commit().unwrap();
        let a = artifact("job", "job.1", "job.1.tar");
        store.put_manifest(&a).unwrap();
        unsafe { libc::umask(old) };
        for p in [dir.join("job.1.tar"), dir.join("job.1.json")] {
            assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600, "{}", p.display());
        }
        for d in [tmp.path().join("store"), dir.clone()] {
            assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        }
        let listing = store.list(Some("job")).unwrap();
        assert_eq!(listing.artifacts.len(), 1);
        assert!(listing.leftovers.is_empty(), "{:?}", listing.leftovers);
        assert_eq!(
            listing.artifacts[0].location,
            dir.join("job.1.tar").display().to_string()
        );
        let mut content = String::new();
        store
            .open(&listing.artifacts[0])
            .unwrap()
            .read_to_string(&mut content)
            .unwrap();
        assert_eq!(content, "hello");
        store.delete(&a).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn dropped_upload_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path().to_str().unwrap()).unwrap();
        let mut up = store.create("job", "job.1.tar").unwrap();
        up.write_all(b"partial").unwrap();
        drop(up);
        assert_eq!(fs::read_dir(tmp.path().join("job")).unwrap().count(), 0);
    }

    #[test]
    fn listing_reports_orphans_and_bad_manifests() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("job");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("job.2.tar"), "x").unwrap();
        fs::write(dir.join("job.3.json"), "{not json").unwrap();
        let listing = LocalStore::new(tmp.path().to_str().unwrap())
            .unwrap()
            .list(None)
            .unwrap();
        assert!(listing.artifacts.is_empty());
        assert_eq!(listing.leftovers.len(), 1, "{:?}", listing.leftovers);
        assert!(listing.leftovers[0].ends_with("job.2.tar: no manifest"));
        assert_eq!(listing.broken.len(), 1, "{:?}", listing.broken);
        assert_eq!(listing.broken[0].id, "job.3");
        assert!(listing.broken[0].reason.contains("unreadable manifest"));
    }

    #[test]
    fn only_old_temporary_files_are_removed_as_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path().to_str().unwrap()).unwrap();
        assert!(store
            .remove_leftovers("job", SystemTime::now(), false)
            .unwrap()
            .is_empty());
        let dir = tmp.path().join("job");
        fs::create_dir_all(&dir).unwrap();
        let old = dir.join(".job.1.tar.tmp.123.0badf00d");
        let young = dir.join(".job.2.tar.tmp.124.0badf00d");
        for p in [&old, &young, &dir.join("job.1.tar"), &dir.join(".hidden")] {
            fs::write(p, "x").unwrap();
        }
        let day_ago = SystemTime::now() - std::time::Duration::from_secs(86_400);
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(day_ago - std::time::Duration::from_secs(60))
            .unwrap();
        let found = store.remove_leftovers("job", day_ago, true).unwrap();
        assert_eq!(found, [old.display().to_string()]);
        assert!(old.exists(), "a dry run removes nothing");
        assert_eq!(store.remove_leftovers("job", day_ago, false).unwrap(), found);
        assert!(!old.exists() && young.exists() && dir.join("job.1.tar").exists() && dir.join(".hidden").exists());
    }

    #[test]
    fn remote_schemes_are_refused_clearly() {
        for url in ["s3://bucket/x", "ssh://u@h/x", "rclone:remote:path"] {
            let e = super::super::open(url).err().unwrap();
            assert_eq!(e.exit_code(), 64, "{url}");
        }
        assert!(super::super::open("file:///tmp/x").is_ok());
        assert!(super::super::open("relative/dir").is_ok());
    }
}
