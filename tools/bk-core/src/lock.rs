//! One run per name at a time (SPEC §6): an flock on `<lock dir>/<name>.lock`; and the lock
//! beside a file that several jobs rewrite. The kernel drops a lock when the process dies, so
//! a crash never leaves a stale lock.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};
use crate::private::create_private_dir;

const POLL: Duration = Duration::from_millis(100);

/// Held for as long as it lives.
pub struct Lock {
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

impl Lock {
    /// The lock of one name: takes it at once, or waits up to `wait` for it; exit 75 if it
    /// stays held.
    pub fn acquire(dir: &Path, name: &str, wait: Option<Duration>) -> Result<Self> {
        ensure_private_dir(dir)?;
        let path = dir.join(format!("{name}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::create(&path, e))?;
        hold(file, &path, wait, |waited| {
            format!(
                "another run of {name} holds {}{waited}; retry later or pass --wait SECS",
                path.display()
            )
        })
    }

    /// The lock file `path` that jobs of several users share (beside a file they all
    /// rewrite): made 0644 whatever the umask, so that a job running as another user can
    /// open it to lock it (flock needs no write access). Waits up to `wait`; exit 75 if it
    /// stays held.
    pub fn shared(path: &Path, wait: Duration) -> Result<Self> {
        // Not through a symlink: in a directory others may write, one could point it
        // anywhere.
        let opened = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path);
        let file = match opened {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let file = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o644)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(path)
                    .map_err(|e| Error::create(path, e))?;
                // The mode given to open is filtered by the umask; this is not.
                file.set_permissions(fs::Permissions::from_mode(0o644))
                    .map_err(|e| Error::create(path, e))?;
                file
            }
            opened => opened.map_err(|e| Error::io(format!("opening the lock {}", path.display()), e))?,
        };
        hold(file, path, Some(wait), |waited| {
            format!("another run holds {}{waited}; retry later", path.display())
        })
    }
}

/// Locks `file` (opened at `path`), polling for up to `wait`; `busy` says who holds it,
/// given how long it waited.
fn hold(mut file: File, path: &Path, wait: Option<Duration>, busy: impl Fn(String) -> String) -> Result<Lock> {
    let deadline = Instant::now() + wait.unwrap_or_default();
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(Lock { _lock: lock }),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                if Instant::now() >= deadline {
                    let waited = wait
                        .map(|w| format!(" after waiting {}s", w.as_secs()))
                        .unwrap_or_default();
                    return Err(Error::temp_fail(busy(waited)));
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
        let first = Lock::acquire(tmp.path(), "job", None).unwrap();
        let e = Lock::acquire(tmp.path(), "job", None).err().unwrap();
        assert_eq!(e.exit_code(), 75);
        Lock::acquire(tmp.path(), "other", None).unwrap();
        let start = Instant::now();
        let e = Lock::acquire(tmp.path(), "job", Some(Duration::from_millis(300)))
            .err()
            .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(e.message.contains("after waiting"));
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        Lock::acquire(tmp.path(), "job", Some(Duration::from_secs(5))).unwrap();
        releaser.join().unwrap();
    }

    #[test]
    fn a_shared_lock_is_readable_by_all_and_exclusive() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("bk.prom.lock");
        let first = Lock::shared(&path, Duration::ZERO).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
        let e = Lock::shared(&path, Duration::from_millis(200)).err().unwrap();
        assert_eq!(e.exit_code(), 75);
        assert!(e.message.contains("after waiting"), "{}", e.message);
        drop(first);
        Lock::shared(&path, Duration::ZERO).unwrap();
    }
}
