//! Running the trusted dump and restore programs (mariadb-dump, pg_dump, psql, ...):
//! found in PATH, streamed through bk with bounded memory, their exit status and stderr
//! turned into bk errors.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

use bk_core::cleanup;
use bk_core::error::{from_io, Error, Kind, Result};

/// The first of `names` found in PATH.
pub fn find_program(names: &[&str], package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(Error::unavailable(format!(
        "{} not found in PATH; install {package}",
        names.join(" or ")
    )))
}

/// A program's first `--version` line.
pub fn version_line(program: &PathBuf) -> String {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Turns a failed program's stderr into the kind of failure.
pub type Classify = fn(&str) -> Kind;

fn program_name(cmd: &Command) -> String {
    PathBuf::from(cmd.get_program())
        .file_name()
        .unwrap_or(OsStr::new("?"))
        .to_string_lossy()
        .into_owned()
}

fn spawn(cmd: &mut Command) -> Result<Child> {
    cmd.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::unavailable(format!("{} not found", program_name(cmd))),
        _ => Error::io(format!("starting {}", program_name(cmd)), e),
    })
}

/// What becomes of a program's stderr, whose tail is kept for the error message either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stderr {
    /// Kept only: the programs bk knows, whose failures bk's own message explains.
    Keep,
    /// Also copied to bk's stderr as it comes: a program of the user's (the command engine).
    Relay,
}

/// A running program: stopped with bk on SIGINT/SIGTERM, its stderr collected.
struct Running {
    child: Child,
    _tracked: cleanup::ChildGuard,
    stderr: JoinHandle<Vec<u8>>,
}

/// Starts `cmd`, whose stderr must be piped.
fn start(cmd: &mut Command, said: Stderr) -> Result<Running> {
    let mut child = spawn(cmd)?;
    let tracked = cleanup::track_child(child.id());
    let piped = child.stderr.take().expect("stderr piped");
    let stderr = match said {
        Stderr::Keep => bk_core::stderr::collect_tail(piped),
        Stderr::Relay => bk_core::stderr::relay_tail(piped),
    };
    Ok(Running {
        child,
        _tracked: tracked,
        stderr,
    })
}

impl Running {
    /// Waits for the end: the exit status and the tail of stderr.
    fn wait(mut self, cmd: &Command) -> Result<(std::process::ExitStatus, String)> {
        let status = self
            .child
            .wait()
            .map_err(|e| Error::io(format!("waiting for {}", program_name(cmd)), e))?;
        let said = self.stderr.join().unwrap_or_default();
        Ok((status, String::from_utf8_lossy(&said).into_owned()))
    }
}

/// The error of a program that exited non-zero: its last stderr lines, classified.
fn failure(cmd: &Command, status: std::process::ExitStatus, stderr: &str, classify: Classify) -> Error {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let said = lines
        .iter()
        .rev()
        .take(3)
        .rev()
        .cloned()
        .collect::<Vec<_>>()
        .join(" / ");
    let how = match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with {c}"),
        (None, Some(n)) => match nix::sys::signal::Signal::try_from(n) {
            Ok(signal) => format!("was killed by signal {n} ({signal})"),
            Err(_) => format!("was killed by signal {n}"),
        },
        (None, None) => "was killed".to_string(),
    };
    let message = if said.is_empty() {
        format!("{} {how}", program_name(cmd))
    } else {
        format!("{} {how}: {said}", program_name(cmd))
    };
    Error::new(classify(stderr), message)
}

/// Runs a dump program, passing its stdout to `observe` and then to `out`. Fails if the
/// program exits non-zero or is killed; if writing fails, the program is killed.
pub fn stream_from(cmd: Command, out: &mut dyn Write, observe: impl FnMut(&[u8]), classify: Classify) -> Result<u64> {
    pump(cmd, Stderr::Keep, out, observe, classify, ExitStatus::success)
}

/// As [`stream_from_relaying`], for GNU tar --create, whose exit status 1 says that a file
/// changed while it was read (relayed on stderr): the archive is complete all the same.
pub fn stream_from_tar(
    cmd: Command,
    out: &mut dyn Write,
    observe: impl FnMut(&[u8]),
    classify: Classify,
) -> Result<u64> {
    pump(cmd, Stderr::Relay, out, observe, classify, |s| {
        s.success() || s.code() == Some(1)
    })
}

/// As [`stream_from`], for a program of the user's: its stderr also goes to bk's as it comes.
pub fn stream_from_relaying(
    cmd: Command,
    out: &mut dyn Write,
    observe: impl FnMut(&[u8]),
    classify: Classify,
) -> Result<u64> {
    pump(cmd, Stderr::Relay, out, observe, classify, ExitStatus::success)
}

fn pump(
    mut cmd: Command,
    said: Stderr,
    out: &mut dyn Write,
    mut observe: impl FnMut(&[u8]),
    classify: Classify,
    succeeded: fn(&ExitStatus) -> bool,
) -> Result<u64> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut running = start(&mut cmd, said)?;
    let mut stdout = running.child.stdout.take().expect("piped");
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let pumped: Result<()> = loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(Error::io(format!("reading from {}", program_name(&cmd)), e)),
        };
        observe(&buf[..n]);
        if let Err(e) = out.write_all(&buf[..n]) {
            break Err(from_io("writing the artifact", e));
        }
        total += n as u64;
    };
    if pumped.is_err() {
        let _ = running.child.kill();
    }
    drop(stdout);
    let (status, stderr) = running.wait(&cmd)?;
    pumped?;
    if !succeeded(&status) {
        return Err(failure(&cmd, status, &stderr, classify));
    }
    Ok(total)
}

/// Runs a restore program, feeding it `input` on stdin. Fails if the program exits
/// non-zero.
pub fn stream_into(cmd: Command, input: &mut dyn Read, classify: Classify) -> Result<()> {
    feed(cmd, input, classify, false, Stderr::Keep)
}

/// As [`stream_into`], for a program of the user's: its stderr also goes to bk's as it comes.
pub fn stream_into_relaying(cmd: Command, input: &mut dyn Read, classify: Classify) -> Result<()> {
    feed(cmd, input, classify, false, Stderr::Relay)
}

/// As [`stream_into`], for a program that rightly stops reading once it has what it wants
/// (pg_restore --table): a broken pipe after it succeeded is no error. The caller reads
/// the rest of `input` to check it.
pub fn stream_into_may_stop(cmd: Command, input: &mut dyn Read, classify: Classify) -> Result<()> {
    feed(cmd, input, classify, true, Stderr::Keep)
}

fn feed(mut cmd: Command, input: &mut dyn Read, classify: Classify, may_stop: bool, said: Stderr) -> Result<()> {
    cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut running = start(&mut cmd, said)?;
    let mut stdin = running.child.stdin.take().expect("piped");
    let fed = io::copy(input, &mut stdin);
    drop(stdin);
    let (status, stderr) = running.wait(&cmd)?;
    if !status.success() {
        return Err(failure(&cmd, status, &stderr, classify));
    }
    // A broken pipe means the program stopped reading: its own failure was reported above.
    match fed {
        Err(e) if may_stop && e.kind() == io::ErrorKind::BrokenPipe => {}
        fed => {
            fed.map_err(|e| from_io(format!("feeding {}", program_name(&cmd)), e))?;
        }
    }
    Ok(())
}

/// Runs a program that writes its results into files (influxd backup and restore) to its
/// end, its stdout discarded. Each line of its stderr goes to `gives_up`: a line on which the
/// program would only wait and retry in vain (a server that refuses connections) stops it at
/// once, with that line as the error.
pub fn run_watched(mut cmd: Command, classify: Classify, gives_up: fn(&str) -> bool) -> Result<()> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = spawn(&mut cmd)?;
    let _tracked = cleanup::track_child(child.id());
    let stderr = io::BufReader::new(child.stderr.take().expect("piped"));
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut gave_up = None;
    for line in io::BufRead::lines(stderr) {
        let Ok(line) = line else { break };
        if gave_up.is_none() && gives_up(&line) {
            let _ = child.kill();
            gave_up = Some(line.clone());
        }
        tail.push_back(line);
        if tail.len() > 20 {
            tail.pop_front();
        }
    }
    let status = child
        .wait()
        .map_err(|e| Error::io(format!("waiting for {}", program_name(&cmd)), e))?;
    if let Some(line) = gave_up {
        return Err(Error::new(
            classify(&line),
            format!("{} stopped: {}", program_name(&cmd), line.trim()),
        ));
    }
    if !status.success() {
        let said = Vec::from(tail).join("\n");
        return Err(failure(&cmd, status, &said, classify));
    }
    Ok(())
}

/// Runs a short query-like command to the end and returns its stdout.
pub fn output_of(mut cmd: Command, classify: Classify) -> Result<String> {
    cmd.stdin(Stdio::null());
    let out = cmd.output().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::unavailable(format!("{} not found", program_name(&cmd))),
        _ => Error::io(format!("running {}", program_name(&cmd)), e),
    })?;
    if !out.status.success() {
        return Err(failure(
            &cmd,
            out.status,
            &String::from_utf8_lossy(&out.stderr),
            classify,
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a converting program with `input` on its stdin, its stdout fed to `scanner` on a
/// thread; returns the scanner. A failure of the input (corrupt data, say) comes first:
/// the program's own failure is then only its consequence.
pub fn scan_through<S: Send + 'static>(
    mut cmd: Command,
    input: &mut dyn Read,
    mut scanner: S,
    feed: fn(&mut S, &[u8]),
    classify: Classify,
) -> Result<S> {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut running = start(&mut cmd, Stderr::Keep)?;
    let mut stdout = running.child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            feed(&mut scanner, &buf[..n]);
        }
        scanner
    });
    let mut stdin = running.child.stdin.take().expect("piped");
    let fed = io::copy(input, &mut stdin);
    drop(stdin);
    let (status, stderr) = running.wait(&cmd)?;
    let scanner = reader
        .join()
        .map_err(|_| Error::new(Kind::Io, "the output reader panicked"))?;
    match fed {
        Err(e) if e.get_ref().is_some_and(|inner| inner.is::<Error>()) => return Err(from_io("decoding", e)),
        _ if !status.success() => return Err(failure(&cmd, status, &stderr, classify)),
        Err(e) => return Err(from_io(format!("feeding {}", program_name(&cmd)), e)),
        Ok(_) => {}
    }
    Ok(scanner)
}

/// Keeps the last `keep` bytes of a stream in `tail`, a chunk at a time: where a dump
/// program's completion marker is.
pub fn keep_tail(tail: &mut Vec<u8>, keep: usize, chunk: &[u8]) {
    tail.extend_from_slice(&chunk[chunk.len().saturating_sub(keep)..]);
    if tail.len() > keep {
        tail.drain(..tail.len() - keep);
    }
}
