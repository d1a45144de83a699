//! Private files and directories: secrets must not be readable by others, as ssh insists
//! for its keys (SPEC §6), and everything bk creates is 0600/0700 whatever the umask.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// Refuses (exit 78) a secrets file that group or others may read or write.
pub fn check_private_file(path: &Path, what: &str) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(format!("{what} {}", path.display()), e))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::config(format!(
            "{what} {} is readable by others (mode {mode:04o}); run: chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// Creates a directory (and its missing parents) with mode 0700, whatever the umask.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::create(dir, e))?;
        // The mode given to mkdir is filtered by the umask; this is not.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::create(dir, e))?;
    }
    Ok(())
}

/// Creates a new file (never an existing one) with mode 0600, whatever the umask.
pub fn create_private_file(path: &Path) -> Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::create(path, e))?;
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::create(path, e))?;
    Ok(file)
}
