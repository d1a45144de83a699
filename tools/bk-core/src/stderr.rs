//! The stderr of a child program (a dump program, ssh, rclone...), read on a thread so that
//! the child never blocks on a full pipe, and bounded: only its tail is kept, where programs
//! say why they failed.

use std::io::Read;
use std::process::ChildStderr;
use std::thread::JoinHandle;

/// How much of a child's stderr is kept: its last bytes.
pub const TAIL: usize = 64 * 1024;

/// Reads `stderr` to its end on a thread; joining gives its last [`TAIL`] bytes.
pub fn collect_tail(stderr: ChildStderr) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || read_tail(stderr, TAIL, |_| {}))
}

/// As [`collect_tail`], also copying what the child says to bk's own stderr as it comes: for
/// a program of the user's, whose warnings are the user's to read.
pub fn relay_tail(stderr: ChildStderr) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        read_tail(stderr, TAIL, |said| {
            let _ = std::io::Write::write_all(&mut std::io::stderr(), said);
        })
    })
}

/// The last `keep` bytes of what `reader` gives, read to its end (or its first error), each
/// piece handed to `also` as it comes.
fn read_tail(mut reader: impl Read, keep: usize, mut also: impl FnMut(&[u8])) -> Vec<u8> {
    let mut tail = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            // A signal is no end: stopping here would leave the child blocked on a full pipe.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        also(&buf[..n]);
        tail.extend_from_slice(&buf[..n]);
        // Trimmed now and then, not on every read.
        if tail.len() > 2 * keep {
            tail.drain(..tail.len() - keep);
        }
    }
    if tail.len() > keep {
        tail.drain(..tail.len() - keep);
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_tail() {
        let text: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for keep in [1, 10, 8192, 20_000, 100_000, 200_000] {
            let tail = read_tail(&text[..], keep, |_| {});
            assert_eq!(tail, text[text.len().saturating_sub(keep)..], "keep {keep}");
        }
    }
}
