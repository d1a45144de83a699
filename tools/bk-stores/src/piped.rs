//! Uploads and reads through a child program, what the ssh store (a remote `cat`) and the
//! rclone store (`rclone rcat` and `rclone cat`) share: the bytes go through the child's
//! stdin or stdout, its stderr is kept to say why it failed, and its exit status is checked
//! at the end of the stream.

use std::io::{self, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout};
use std::thread::JoinHandle;

use bk_core::error::{Error, Result};
use bk_core::store::Upload;
use sha2::{Digest, Sha256};

/// What a store backed by a program does around its children.
pub(crate) trait PipedStore {
    /// The error of a child that ended with `code` (None: killed) after saying `stderr`.
    fn child_failed(&self, code: Option<i32>, stderr: &[u8], doing: &str) -> Error;
    /// Checks the temporary file `temp` against the `sent` sha256, then renames it `target`.
    fn publish(&self, temp: &str, target: &str, sent: &str, location: &str) -> Result<()>;
    /// Removes a temporary file, as well as it can (an upload that failed).
    fn remove_temp(&self, temp: &str);
}

/// Waits for a child whose stdin is closed and reports how it ended.
fn finish<S: PipedStore>(
    store: &S,
    child: &mut Child,
    stderr: &mut Option<JoinHandle<Vec<u8>>>,
    doing: &str,
) -> Result<()> {
    let status = child.wait().map_err(|e| Error::io(doing.to_string(), e))?;
    let said = stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    Err(store.child_failed(status.code(), &said, doing))
}

/// An artifact written into a child's stdin under a temporary name, published by `commit`;
/// dropped first, the child is killed and the temporary file removed.
pub(crate) struct PipedUpload<S: PipedStore> {
    store: S,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    /// Emptied once there is no temporary file left to remove.
    temp: String,
    target: String,
    location: String,
    hasher: Sha256,
}

impl<S: PipedStore> PipedUpload<S> {
    /// `child` writes its stdin to `temp` (its stdin and stderr piped).
    pub(crate) fn new(store: S, mut child: Child, temp: String, target: String, location: String) -> Self {
        let stdin = child.stdin.take();
        let stderr = Some(bk_core::stderr::collect_tail(
            child.stderr.take().expect("stderr piped"),
        ));
        PipedUpload {
            store,
            child: Some(child),
            stdin,
            stderr,
            temp,
            target,
            location,
            hasher: Sha256::new(),
        }
    }

    /// The error of a write or commit after the transfer ended (the child failed): the
    /// first error said why; a compressor's last flush when it is dropped lands here.
    fn ended(&self) -> Error {
        Error::io(
            format!("writing {}", self.location),
            io::Error::new(io::ErrorKind::BrokenPipe, "the transfer has ended"),
        )
    }

    fn finish_transfer(&mut self) -> Result<()> {
        drop(self.stdin.take());
        let Some(mut child) = self.child.take() else {
            return Err(self.ended());
        };
        finish(
            &self.store,
            &mut child,
            &mut self.stderr,
            &format!("writing {}", self.location),
        )
    }
}

impl<S: PipedStore> Write for PipedUpload<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(self.ended().into());
        };
        match stdin.write_all(buf) {
            Ok(()) => {
                self.hasher.update(buf);
                Ok(buf.len())
            }
            // The program went away: say why, from its own words.
            Err(_) => Err(match self.finish_transfer() {
                Err(e) => e.into(),
                Ok(()) => io::Error::other(format!("writing {}: the copy stopped reading", self.location)),
            }),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stdin.as_mut().map_or(Ok(()), |s| s.flush())
    }
}

impl<S: PipedStore> Upload for PipedUpload<S> {
    fn commit(mut self: Box<Self>) -> Result<()> {
        self.finish_transfer()?;
        let sent = hex::encode(std::mem::take(&mut self.hasher).finalize());
        let published = self.store.publish(&self.temp, &self.target, &sent, &self.location);
        if published.is_ok() {
            self.temp.clear();
        }
        // Drop removes the temporary file if it was not published.
        published
    }
}

impl<S: PipedStore> Drop for PipedUpload<S> {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.temp.is_empty() {
            self.store.remove_temp(&self.temp);
        }
    }
}

/// A file read from a child's stdout; how the child ended is checked at the end of the stream,
/// and a reader dropped before it kills the child.
pub(crate) struct PipedReader<S: PipedStore> {
    store: S,
    child: Child,
    stdout: ChildStdout,
    stderr: Option<JoinHandle<Vec<u8>>>,
    doing: String,
    done: bool,
}

impl<S: PipedStore> PipedReader<S> {
    /// `child` writes the file on its stdout (its stdout and stderr piped).
    pub(crate) fn new(store: S, mut child: Child, doing: String) -> Self {
        let stdout = child.stdout.take().expect("stdout piped");
        let stderr = Some(bk_core::stderr::collect_tail(
            child.stderr.take().expect("stderr piped"),
        ));
        PipedReader {
            store,
            child,
            stdout,
            stderr,
            doing,
            done: false,
        }
    }
}

impl<S: PipedStore> Read for PipedReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.stdout.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.done = true;
            finish(&self.store, &mut self.child, &mut self.stderr, &self.doing)?;
        }
        Ok(n)
    }
}

impl<S: PipedStore> Drop for PipedReader<S> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
