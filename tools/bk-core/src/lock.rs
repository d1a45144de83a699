//! One run per name at a time (SPEC §6): an flock on `<lock dir>/<name>.lock`. The kernel
//! drops the lock when the process dies, so a crash never leaves a stale lock.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};
use crate::private::create_private_dir;

const POLL: Duration = Duration::from_millis(100);

/// Held for as long as it lives.
pub struct NameLock {
    _lock: Flock<File>,
}

/// `--lock-dir`, else `$BK_LOCK_DIR` (clap reads it), else /run/lock/bk for root and
/// `$XDG_RUNTIME_DIR/bk` or `/tmp/bk-<uid>` for others.
pub fn default_lock_dir() -> PathBuf {
    let uid = nix::unistd::geteuid();
    if uid.is_root() && Path::new("/run/lock").is_dir() {
        return PathBuf::from("/run/lock/bk");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("bk"),
        _ => PathBuf::from(format!("/tmp/bk-{uid}")),
    }
}

impl NameLock {
    /// Takes the lock at once, or waits up to `wait` for it; exit 75 if it stays held.
    pub fn acquire(dir: &Path, name: &str, wait: Option<Duration>) -> Result<Self> {
        ensure_private_dir(dir)?;
        let path = dir.join(format!("{name}.lock"));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::create(&path, e))?;
        let deadline = Instant::now() + wait.unwrap_or_default();
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(NameLock { _lock: lock }),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    if Instant::now() >= deadline {
                        let waited = wait
                            .map(|w| format!(" after waiting {}s", w.as_secs()))
                            .unwrap_or_default();
                        return Err(Error::temp_fail(format!(
                            "another run of {name} holds {}{waited}; retry later or pass --wait SECS",
                            path.display()
                        )));
                    }
                    file = f;
                    std::thread::sleep(POLL);
                }
                Err((_, errno)) => {
                    return Err(Error::io(
                        format!("locking {}", path.display()),
                        std::io::Error::from(errno),
                    ))
                }
            }
        }
    }
}

/// The lock directory is ours alone: a directory someone else owns in /tmp could be used to
/// hold our locks forever.
fn ensure_private_dir(dir: &Path) -> Result<()> {
    create_private_dir(dir)?;
    let meta = fs::metadata(dir).map_err(|e| Error::io(format!("lock directory {}", dir.display()), e))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && me != 0 {
        return Err(Error::config(format!(
            "lock directory {} belongs to uid {}, not to this user; pass --lock-dir",
            dir.display(),
            meta.uid()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_then_waits() {
        let tmp = tempfile::tempdir().unwrap();
        let first = NameLock::acquire(tmp.path(), "job", None).unwrap();
        let e = NameLock::acquire(tmp.path(), "job", None).err().unwrap();
        assert_eq!(e.exit_code(), 75);
        NameLock::acquire(tmp.path(), "other", None).unwrap();
        let start = Instant::now();
        let e = NameLock::acquire(tmp.path(), "job", Some(Duration::from_millis(300)))
            .err()
            .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(e.message.contains("after waiting"));
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        NameLock::acquire(tmp.path(), "job", Some(Duration::from_secs(5))).unwrap();
        releaser.join().unwrap();
    }
}
