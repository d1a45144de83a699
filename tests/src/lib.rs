//! The one harness every integration test uses: runs the built tools in a sandbox
//! directory, parses their JSON Lines into bk's own record types, and says whether the test
//! servers must be up (`BK_TEST_SERVICES=1`, set by tests/run.sh): then a test that needs
//! one fails instead of skipping.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use bk_core::record::{parse_line, Artifact, ErrorRecord, Record, Restored};
use sha2::{Digest, Sha256};

/// target/<profile>/, where cargo put the tools beside this test binary's deps/ folder.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

pub fn bin(tool: &str) -> PathBuf {
    let path = bin_dir().join(tool);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` first (tests/run.sh does)",
        path.display()
    );
    path
}

/// True when tests/run.sh started the servers: tests needing them must then fail, not skip.
pub fn services_required() -> bool {
    std::env::var("BK_TEST_SERVICES").is_ok_and(|v| v == "1")
}

/// Some tests need root (mounting a tmpfs, running a tool as another user). Without root
/// they are skipped with a note, unless the full suite is running, where that is a failure.
pub fn have_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        !services_required(),
        "{test} needs root, and BK_TEST_SERVICES=1 says the full suite is running"
    );
    eprintln!("SKIPPED {test}: needs root (tests/run.sh runs as root)");
    false
}

/// A private directory per test, with its own lock directory and store.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Self {
        Sandbox {
            dir: tempfile::Builder::new()
                .prefix("bk-test-")
                .tempdir()
                .expect("a temp dir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The default store of a test: `<sandbox>/store`.
    pub fn store(&self) -> String {
        self.path("store").display().to_string()
    }

    pub fn cmd(&self, tool: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin(tool));
        cmd.args(args)
            .current_dir(self.root())
            .env("BK_LOCK_DIR", self.path("locks"));
        cmd
    }

    pub fn run(&self, tool: &str, args: &[&str]) -> Run {
        self.run_with_stdin(tool, args, "")
    }

    pub fn run_with_stdin(&self, tool: &str, args: &[&str], stdin: &str) -> Run {
        run_cmd(self.cmd(tool, args), stdin)
    }

    pub fn spawn(&self, tool: &str, args: &[&str]) -> Child {
        self.cmd(tool, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    }

    /// bk-dump into the sandbox's store; panics unless it succeeds.
    pub fn dump(&self, args: &[&str]) -> Artifact {
        let store = self.store();
        let mut all = args.to_vec();
        all.extend(["--to", &store]);
        self.run("bk-dump", &all).ok().artifact()
    }
}

/// Runs a command to the end with the given stdin.
pub fn run_cmd(mut cmd: Command, stdin: &str) -> Run {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut pipe = child.stdin.take().expect("stdin piped");
    // A tool may exit before reading all of stdin; that is its business.
    let _ = pipe.write_all(stdin.as_bytes());
    drop(pipe);
    Run::from(child.wait_with_output().expect("waiting for the tool"))
}

/// What a tool did: exit code, stdout and stderr, kept apart.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn ok(self) -> Self {
        self.code(0)
    }

    pub fn code(self, expected: i32) -> Self {
        assert_eq!(
            self.code, expected,
            "exit code\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn records(&self) -> Vec<Record> {
        self.stdout
            .lines()
            .enumerate()
            .map(|(i, l)| {
                parse_line(l, &format!("stdout line {}", i + 1)).unwrap_or_else(|e| panic!("{}: {l}", e.message))
            })
            .collect()
    }

    pub fn artifacts(&self) -> Vec<Artifact> {
        self.records()
            .into_iter()
            .filter_map(|r| if let Record::Artifact(a) = r { Some(a) } else { None })
            .collect()
    }

    /// The one record of a kind, picked out by `pick`.
    fn only<T>(&self, what: &str, pick: impl Fn(Record) -> Option<T>) -> T {
        let mut all: Vec<T> = self.records().into_iter().filter_map(pick).collect();
        assert_eq!(
            all.len(),
            1,
            "one {what} record expected\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        all.remove(0)
    }

    /// The one artifact record printed.
    pub fn artifact(&self) -> Artifact {
        self.only("artifact", |r| if let Record::Artifact(x) = r { Some(x) } else { None })
    }

    pub fn restored(&self) -> Restored {
        self.only("restored", |r| if let Record::Restored(x) = r { Some(x) } else { None })
    }

    /// The one error record printed; stderr must carry the same message once, prefixed with
    /// the tool's name.
    pub fn error(&self) -> ErrorRecord {
        let e = self.only("error", |r| if let Record::Error(x) = r { Some(x) } else { None });
        assert_eq!(e.code as i32, self.code, "the error record's code is the exit code");
        assert!(
            self.stderr
                .lines()
                .any(|l| l.starts_with(&format!("{}: ", e.tool)) && l.ends_with(&e.message)),
            "stderr should carry the error once: {}",
            self.stderr
        );
        e
    }
}

/// Everything a restore must bring back of a tree: per relative path, the kind, mode,
/// owner, mtime, and the content's sha256 or the link's target.
pub fn tree_digest(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, path: &Path, out: &mut BTreeMap<String, String>) {
    let meta = fs::symlink_metadata(path).expect("lstat");
    let rel = path.strip_prefix(root).expect("below root").display().to_string();
    let ft = meta.file_type();
    let what = if ft.is_symlink() {
        format!("link {}", fs::read_link(path).unwrap().display())
    } else if ft.is_file() {
        format!("file {}", hex::encode(Sha256::digest(fs::read(path).unwrap())))
    } else if ft.is_dir() {
        "dir".to_string()
    } else if ft.is_fifo() {
        "fifo".to_string()
    } else {
        format!("special {}", meta.rdev())
    };
    // A directory's mtime changes as its children are written; the restore sets it last.
    let mtime = if ft.is_symlink() { 0 } else { meta.mtime() };
    if !rel.is_empty() {
        out.insert(
            rel,
            format!(
                "{what} mode={:o} uid={} gid={} mtime={mtime}",
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid()
            ),
        );
    }
    if ft.is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            walk(root, &entry.unwrap().path(), out);
        }
    }
}

/// Files in a directory tree, recursively, with any name: to prove nothing was left behind.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                found.extend(files_below(&p));
            } else {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

impl Sandbox {
    /// A tool run through a wrapper program, e.g. `setpriv --reuid=65534 ...` to run it as
    /// another user; the same directory and lock directory as [`Sandbox::cmd`].
    pub fn cmd_via(&self, wrapper: &[&str], tool: &str, args: &[&str]) -> Command {
        let (program, wrapper_args) = wrapper.split_first().expect("a wrapper program");
        let mut cmd = Command::new(program);
        cmd.args(wrapper_args)
            .arg(bin(tool))
            .args(args)
            .current_dir(self.root())
            .env("BK_LOCK_DIR", self.path("locks"));
        cmd
    }
}

/// The wrapper that runs a tool as nobody (uid and gid 65534, no supplementary groups).
pub const AS_NOBODY: [&str; 4] = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];
