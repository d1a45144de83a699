//! The one harness every integration test uses: runs the built tools in a sandbox
//! directory, parses their JSON Lines into bk's own record types, and says whether the test
//! servers must be up (`BK_TEST_SERVICES=1`, set by tests/run.sh): then a test that needs
//! one fails instead of skipping.

pub mod cron;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use bk_core::record::{parse_line, Artifact, ErrorRecord, Kept, Pruned, Record, Restored};
use sha2::{Digest, Sha256};

/// target/<profile>/, where cargo put the multicall binary `bk` beside this test binary's
/// deps/ folder, with a link `bk-<tool>` to it for every tool, made once per test process by
/// `bk --install-links` (which replaces a leftover single-tool binary there: never tested).
pub fn bin_dir() -> PathBuf {
    static LINKED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LINKED
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("the test binary's path");
            let dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("target/<profile>/deps/<test>")
                .to_path_buf();
            let bk = dir.join("bk");
            assert!(
                bk.exists(),
                "{} is not built: run `cargo build --workspace` first (tests/run.sh does)",
                bk.display()
            );
            let mut links = Command::new(&bk);
            links.arg("--install-links");
            let run = run_cmd(links, "");
            assert_eq!(run.code, 0, "bk --install-links: {}", run.stderr);
            dir
        })
        .clone()
}

/// The path of a tool (`bk-dump`, ...) or of `bk` itself.
pub fn bin(tool: &str) -> PathBuf {
    let path = bin_dir().join(tool);
    assert!(path.exists(), "{}: no such tool", path.display());
    path
}

/// True when tests/run.sh started the servers: tests needing them must then fail, not skip.
pub fn services_required() -> bool {
    std::env::var("BK_TEST_SERVICES").is_ok_and(|v| v == "1")
}

/// Some tests need root (mounting a tmpfs, running a tool as another user). Without root
/// they are skipped with a note, unless the full suite is running, where that is a failure.
pub fn have_root() -> bool {
    let root = nix::unistd::geteuid().is_root().then_some(());
    needs(root, || "needs root".into(), "tests/run.sh runs as root").is_some()
}

/// The running test's name, for its notes and failures: libtest names each test's thread
/// after the test.
pub fn test_name() -> String {
    std::thread::current().name().unwrap_or("this test").to_string()
}

/// What a test needs from its machine (a server, a program, root): `found`, or when it is
/// missing, a failure if the full suite runs (BK_TEST_SERVICES=1 says everything is set up),
/// else a SKIPPED note and `None`. `why` says what is missing, `hint` how to get it.
pub fn needs<T>(found: Option<T>, why: impl FnOnce() -> String, hint: &str) -> Option<T> {
    if found.is_none() {
        let (test, why) = (test_name(), why());
        assert!(
            !services_required(),
            "{test}: {why}, and BK_TEST_SERVICES=1 says the full suite is running ({hint})"
        );
        eprintln!("SKIPPED {test}: {why} ({hint})");
    }
    found
}

/// The hint of a test that needs the servers of tests/services.sh.
pub const SERVICES_ENV: &str = "source $(tests/services.sh env)";

/// A port on loopback that nothing listens on now: the system's pick, free again once the
/// listener goes. For a server a test starts, or for one that must not answer.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
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

    /// A new sandbox and its source directory `<sandbox>/src`, made by `fill` (a tree of the
    /// test's, or [`write_files`]).
    pub fn with_src(fill: impl FnOnce(&Path)) -> (Sandbox, PathBuf) {
        let sb = Sandbox::new();
        let src = sb.path("src");
        fill(&src);
        (sb, src)
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
pub fn run_cmd(cmd: Command, stdin: &str) -> Run {
    Run::from(
        spawn_with_stdin(cmd, stdin)
            .wait_with_output()
            .expect("waiting for the tool"),
    )
}

/// Starts a command with `stdin` written and closed, its stdout and stderr piped: for a run
/// that a test watches or signals before it ends.
pub fn spawn_with_stdin(mut cmd: Command, stdin: &str) -> Child {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut pipe = child.stdin.take().expect("stdin piped");
    // A tool may exit before reading all of stdin; that is its business.
    let _ = pipe.write_all(stdin.as_bytes());
    child
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

    /// The records printed, without the `begin` and `end` around them. A run that began and
    /// exited by itself (not by a signal) must have ended with its exit status.
    pub fn records(&self) -> Vec<Record> {
        let all: Vec<Record> = self
            .stdout
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
            .map(|(i, l)| {
                parse_line(l, &format!("stdout line {}", i + 1)).unwrap_or_else(|e| panic!("{}: {l}", e.message))
            })
            .collect();
        if matches!(all.first(), Some(Record::Begin(_))) && (0..128).contains(&self.code) {
            match all.last() {
                Some(Record::End(end)) => assert_eq!(
                    end.status as i32, self.code,
                    "the end record's status is the exit code\nstdout: {}\nstderr: {}",
                    self.stdout, self.stderr
                ),
                // A run cut short by a panic says so in its last record.
                Some(Record::Error(e)) if e.code as i32 == self.code => {}
                _ => panic!(
                    "a run that began must end with an end record\nstdout: {}\nstderr: {}",
                    self.stdout, self.stderr
                ),
            }
        }
        all.into_iter()
            .filter(|r| !matches!(r, Record::Begin(_) | Record::End(_)))
            .collect()
    }

    /// The lines of stdout but the `begin` and `end` records: what was passed on or said.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| !l.is_empty() && !l.contains(r#""type":"begin""#) && !l.contains(r#""type":"end""#))
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

    /// bk-prune's decisions: the backups it kept, and those it pruned.
    pub fn decisions(&self) -> (Vec<Kept>, Vec<Pruned>) {
        let (mut kept, mut pruned) = (Vec::new(), Vec::new());
        for record in self.records() {
            match record {
                Record::Kept(k) => kept.push(k),
                Record::Pruned(p) => pruned.push(p),
                _ => {}
            }
        }
        (kept, pruned)
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

impl Run {
    /// A run that failed with `code`, an error record saying each of `says`, and no artifact;
    /// `case` names it in failures. Its error record.
    pub fn failed(&self, case: &str, code: i32, says: &[&str]) -> ErrorRecord {
        assert_eq!(
            self.code, code,
            "{case}: exit code\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        let e = self.error();
        for what in says {
            assert!(
                e.message.contains(what),
                "{case}: the message should say {what:?}: {}",
                e.message
            );
        }
        assert!(self.artifacts().is_empty(), "{case}: no artifact: {}", self.stdout);
        e
    }

    /// Neither stdout nor stderr carries any of `secrets` (passwords); `case` names the run.
    pub fn assert_hides(&self, case: &str, secrets: &[&str]) {
        for secret in secrets {
            assert!(
                !self.stdout.contains(secret) && !self.stderr.contains(secret),
                "{case}: a secret in the output\nstdout: {}\nstderr: {}",
                self.stdout,
                self.stderr
            );
        }
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

/// Runs a helper program of a test (not one of bk's tools) that must succeed: its stdout.
pub fn output_of(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `zstd -dc FILE`.
pub fn unzstd(path: &str) -> Vec<u8> {
    output_of(Command::new("zstd").args(["-dc", path]))
}

/// Replaces a zstd artifact's content with `content` (compressed with the zstd program) and
/// returns its record with sha256, bytes and content_bytes to match: only the content itself
/// can tell that something is wrong.
pub fn rewrite_artifact(a: &Artifact, content: &[u8]) -> Artifact {
    let plain = format!("{}.plain", a.location);
    fs::write(&plain, content).expect("writing the new content");
    let stored = output_of(Command::new("zstd").args(["-q", "-c", &plain]));
    fs::remove_file(&plain).expect("removing the plain copy");
    fs::write(&a.location, &stored).expect("writing the artifact");
    let mut b = a.clone();
    b.sha256 = hex::encode(Sha256::digest(&stored));
    b.bytes = stored.len() as u64;
    b.content_bytes = content.len() as u64;
    b
}

/// Makes an age key pair with age-keygen (apt install age) at `path`, mode 0600: the public key.
pub fn age_keygen(path: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    output_of(Command::new("age-keygen").arg("-o").arg(path));
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod 600");
    let text = fs::read_to_string(path).expect("reading the age key");
    text.lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .expect("age-keygen writes the public key in a comment")
        .to_string()
}

/// `len` bytes that no compressor can shrink, the same in every run (xorshift64).
pub fn noise(len: usize) -> Vec<u8> {
    let mut noise = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in noise.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    noise
}

/// An artifact's record line as a tool prints it, newline included: to pipe into a tool.
pub fn artifact_line(a: &Artifact) -> String {
    format!("{}\n", Record::Artifact(a.clone()).to_line())
}

/// A test's path as the `&str` an argument list takes: test paths are UTF-8.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test paths")
}

/// Writes files below `dir` (each a relative path and its content), making the directories.
pub fn write_files(dir: &Path, files: &[(&str, &str)]) {
    for (rel, content) in files {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().expect("a file below dir")).expect("creating the directories");
        fs::write(&path, content).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
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

/// The PostgreSQL test server (TEST_PG_URL, written by tests/services.sh), or a private
/// cluster a test starts itself: where it listens and the superuser to reach it as.
#[derive(Debug, Clone)]
pub struct PgServer {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
}

/// The PostgreSQL test server from TEST_PG_URL (`postgres://user:password@host:port/db`).
/// Without the variable: a failure when the full suite runs (BK_TEST_SERVICES=1), else a
/// SKIPPED note and `None`.
pub fn pg_server() -> Option<PgServer> {
    let url = std::env::var("TEST_PG_URL").ok().filter(|u| !u.is_empty());
    let url = needs(url, || "TEST_PG_URL is not set".into(), SERVICES_ENV)?;
    let parts = ServerUrl::parse(&url, &["postgres://", "postgresql://"], "postgres", 5432)
        .unwrap_or_else(|| panic!("TEST_PG_URL={url}: expected postgres://user:password@host:port/db"));
    Some(PgServer {
        host: parts.host,
        port: parts.port,
        user: parts.user,
        password: parts.password,
    })
}

/// The parts of a server's URL `scheme://user:password@host:port/...` as they are written.
struct ServerUrl {
    host: String,
    port: u16,
    user: String,
    password: String,
}

impl ServerUrl {
    /// `None` for another scheme or a bad port; the user and port default to those given.
    fn parse(url: &str, schemes: &[&str], default_user: &str, default_port: u16) -> Option<ServerUrl> {
        let rest = schemes.iter().find_map(|scheme| url.strip_prefix(scheme))?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let (userinfo, hostport) = authority.rsplit_once('@').unwrap_or((default_user, authority));
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().ok()?),
            None => (hostport, default_port),
        };
        Some(ServerUrl {
            host: host.to_string(),
            port,
            user: user.to_string(),
            password: password.to_string(),
        })
    }
}

impl PgServer {
    /// A libpq password file for this server in the sandbox (`<sandbox>/<file>`, mode 0600).
    pub fn write_pgpass(&self, sb: &Sandbox, file: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let esc = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
        let path = sb.path(file);
        fs::write(
            &path,
            format!("*:{}:*:{}:{}\n", self.port, esc(&self.user), esc(&self.password)),
        )
        .expect("writing the password file");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod 600");
        path
    }

    /// `--host H --port P --user U`, as bk-dump postgres and bk-restore take them.
    pub fn conn_args(&self) -> Vec<String> {
        vec![
            "--host".into(),
            self.host.clone(),
            "--port".into(),
            self.port.to_string(),
            "--user".into(),
            self.user.clone(),
        ]
    }

    /// A bk tool run against this server: the connection options after `args`, the
    /// password from `pgpass` by PGPASSFILE (never on a command line).
    pub fn cmd(&self, sb: &Sandbox, pgpass: &Path, tool: &str, args: &[&str]) -> Command {
        let mut cmd = sb.cmd(tool, args);
        cmd.args(self.conn_args()).env("PGPASSFILE", pgpass);
        cmd
    }

    /// A connection with the `postgres` crate to a database of this server.
    pub fn client(&self, database: &str) -> postgres::Client {
        let mut config = postgres::Config::new();
        config
            .user(&self.user)
            .password(&self.password)
            .dbname(database)
            .port(self.port)
            .connect_timeout(std::time::Duration::from_secs(10));
        if self.host.starts_with('/') {
            config.host_path(&self.host);
        } else {
            config.host(&self.host);
        }
        config
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting to {database} on {}:{}: {e}", self.host, self.port))
    }

    /// Runs SQL statements (no results) in a database.
    pub fn execute(&self, database: &str, sql: &str) {
        self.client(database)
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("in {database}: {}\n{sql}", pg_error_text(&e)));
    }

    /// The first column of every row of a query, as text.
    pub fn strings(&self, database: &str, sql: &str) -> Vec<String> {
        self.client(database)
            .simple_query(sql)
            .unwrap_or_else(|e| panic!("in {database}: {}\n{sql}", pg_error_text(&e)))
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
                _ => None,
            })
            .collect()
    }

    /// A new empty database, dropped (WITH (FORCE)) when the guard goes.
    pub fn create_database(&self, name: &str) -> PgDatabase {
        self.execute("postgres", &format!("CREATE DATABASE {}", pg_ident(name)));
        self.database(name)
    }

    /// A guard that drops the database (if it exists) when it goes, e.g. a restore's target.
    pub fn database(&self, name: &str) -> PgDatabase {
        PgDatabase {
            server: self.clone(),
            name: name.to_string(),
        }
    }
}

/// A database of a test, dropped at the end whatever happens.
pub struct PgDatabase {
    pub server: PgServer,
    pub name: String,
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", pg_ident(&self.name));
        let mut config = postgres::Config::new();
        config
            .user(&self.server.user)
            .password(&self.server.password)
            .dbname("postgres")
            .port(self.server.port)
            .connect_timeout(std::time::Duration::from_secs(10));
        if self.server.host.starts_with('/') {
            config.host_path(&self.server.host);
        } else {
            config.host(&self.server.host);
        }
        // The server may be gone (a test that stops it): nothing left to drop then.
        if let Ok(mut c) = config.connect(postgres::NoTls) {
            if let Err(e) = c.batch_execute(&sql) {
                eprintln!("warning: {sql}: {e}");
            }
        }
    }
}

/// The server's own message for a failed statement ("db error" says nothing).
fn pg_error_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.severity(), d.message()),
        None => e.to_string(),
    }
}

/// A name quoted as a PostgreSQL identifier.
pub fn pg_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A name no other test (or concurrent run) uses: `<prefix><pid>_<n>_<random>`, lower case for
/// a lower-case prefix: for databases, users, and directories on a test server.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}{}_{}_{:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// A PostgreSQL name no other test (or earlier run) uses: see [`unique_name`].
pub fn pg_unique_name(prefix: &str) -> String {
    unique_name(prefix)
}

/// An InfluxDB 1.x server: its HTTP API (queried and written to over HTTP by the tests) and
/// its backup RPC port. The shared one is [`influx_server`]; a test may start its own.
#[derive(Debug, Clone)]
pub struct InfluxServer {
    pub host: String,
    pub port: u16,
    pub rpc_port: u16,
    /// The user and password the test logs in with, on a server with authentication on.
    pub login: Option<(String, String)>,
}

/// The InfluxDB test server (TEST_INFLUX_HTTP `http://host:port`, TEST_INFLUX_RPC
/// `host:port`). When missing or not answering: a failure when the full suite runs, else a
/// SKIPPED note and `None`.
pub fn influx_server() -> Option<InfluxServer> {
    let vars = std::env::var("TEST_INFLUX_HTTP")
        .ok()
        .zip(std::env::var("TEST_INFLUX_RPC").ok());
    let (http, rpc) = needs(
        vars,
        || "TEST_INFLUX_HTTP or TEST_INFLUX_RPC is not set".into(),
        SERVICES_ENV,
    )?;
    let (host, port) = http
        .strip_prefix("http://")
        .and_then(|a| a.rsplit_once(':'))
        .unwrap_or_else(|| panic!("TEST_INFLUX_HTTP={http}: expected http://host:port"));
    let rpc_port = rpc.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
    let server = InfluxServer {
        host: host.to_string(),
        port: port.parse().expect("TEST_INFLUX_HTTP's port"),
        rpc_port: rpc_port.unwrap_or_else(|| panic!("TEST_INFLUX_RPC={rpc}: expected host:port")),
        login: None,
    };
    let answers = server.try_query("SHOW DATABASES").is_ok();
    needs(
        answers.then_some(()),
        || format!("no InfluxDB answers at {http}"),
        SERVICES_ENV,
    )?;
    Some(server)
}

impl InfluxServer {
    /// `--host H --port P --rpc-port R`, as bk-dump, bk-restore and bk-verify take them.
    pub fn args(&self) -> Vec<String> {
        [
            "--host",
            &self.host,
            "--port",
            &self.port.to_string(),
            "--rpc-port",
            &self.rpc_port.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.host, self.port)
    }

    /// One InfluxQL statement (timestamps in ns): its result, or the server's error.
    pub fn try_query(&self, statement: &str) -> Result<serde_json::Value, String> {
        self.try_query_in("", statement)
    }

    /// As [`InfluxServer::try_query`], in a database (for the statements that need one: DELETE).
    pub fn try_query_in(&self, database: &str, statement: &str) -> Result<serde_json::Value, String> {
        let mut request = ureq::post(self.url("/query"));
        if let Some((user, password)) = &self.login {
            request = request.query("u", user).query("p", password);
        }
        let mut response = request
            .send_form([("q", statement), ("epoch", "ns"), ("db", database)])
            .map_err(|e| e.to_string())?;
        let body: serde_json::Value =
            serde_json::from_str(&response.body_mut().read_to_string().map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        match body["results"][0]["error"].as_str().or(body["error"].as_str()) {
            Some(e) => Err(e.to_string()),
            None => Ok(body["results"][0].clone()),
        }
    }

    pub fn query(&self, statement: &str) -> serde_json::Value {
        self.try_query(statement).unwrap_or_else(|e| panic!("{statement}: {e}"))
    }

    /// Writes points in line protocol (timestamps in ns) into a database's retention policy.
    pub fn write(&self, database: &str, policy: &str, lines: &str) {
        let url = self.url(&format!("/write?db={database}&rp={policy}&precision=ns"));
        let mut request = ureq::post(url);
        if let Some((user, password)) = &self.login {
            request = request.query("u", user).query("p", password);
        }
        request
            .send(lines)
            .unwrap_or_else(|e| panic!("writing to {database}.{policy}: {e}"));
    }

    /// The databases on the server.
    pub fn databases(&self) -> Vec<String> {
        self.query("SHOW DATABASES")["series"][0]["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|row| row[0].as_str().map(String::from))
            .collect()
    }

    /// A new database, dropped when the guard goes.
    pub fn database(&self, name: &str) -> InfluxGuard {
        self.query(&format!("CREATE DATABASE \"{name}\""));
        InfluxGuard {
            server: self.clone(),
            names: vec![name.to_string()],
        }
    }
}

/// Databases dropped when it goes (a test's sources and restore targets).
pub struct InfluxGuard {
    server: InfluxServer,
    pub names: Vec<String>,
}

impl InfluxGuard {
    /// Another database to drop at the end (one the tools create).
    pub fn also(&mut self, name: &str) {
        self.names.push(name.to_string());
    }
}

impl Drop for InfluxGuard {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = self.server.try_query(&format!("DROP DATABASE \"{name}\""));
        }
    }
}

/// The MariaDB/MySQL test server (TEST_MYSQL_URL, written by tests/services.sh): where it
/// listens, and an admin user that may create databases and users (ALL ... WITH GRANT OPTION).
#[derive(Debug, Clone)]
pub struct MysqlServer {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
}

/// The MariaDB test server from TEST_MYSQL_URL (`mysql://user:password@host:port`). When the
/// variable is missing or the server does not answer: a failure when the full suite runs
/// (BK_TEST_SERVICES=1), else a SKIPPED note and `None`.
pub fn mysql_server() -> Option<MysqlServer> {
    let url = std::env::var("TEST_MYSQL_URL").ok().filter(|u| !u.is_empty());
    let url = needs(url, || "TEST_MYSQL_URL is not set".into(), SERVICES_ENV)?;
    let server = MysqlServer::from_url(&url)
        .unwrap_or_else(|| panic!("TEST_MYSQL_URL={url}: expected mysql://user:password@host:port"));
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&(server.host.as_str(), server.port))
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(5)).is_ok());
    let why = || format!("no MariaDB server answers at {}:{}", server.host, server.port);
    needs(reachable.then_some(()), why, SERVICES_ENV)?;
    Some(server)
}

impl MysqlServer {
    /// Parses `mysql://user:password@host:port` (port 3306 when absent).
    pub fn from_url(url: &str) -> Option<MysqlServer> {
        let parts = ServerUrl::parse(url, &["mysql://", "mariadb://"], "root", 3306)?;
        Some(MysqlServer {
            host: parts.host,
            port: parts.port,
            user: bk_core::store::percent_decode(&parts.user),
            password: bk_core::store::percent_decode(&parts.password),
        })
    }

    /// Writes an option file for the admin user at `<sandbox>/<file>`, mode 0600.
    pub fn option_file(&self, sb: &Sandbox, file: &str) -> PathBuf {
        self.option_file_for(sb, file, &self.user, &self.password, "")
    }

    /// Writes an option file at `<sandbox>/<file>`, mode 0600: `[client]` with user,
    /// password, host and port, then `extra` as it is (e.g. "[mysqldump]\nno_tablespaces\n").
    pub fn option_file_for(&self, sb: &Sandbox, file: &str, user: &str, password: &str, extra: &str) -> PathBuf {
        let path = sb.path(file);
        self.write_option_file(&path, user, password, extra);
        path
    }

    /// The option file's text, written 0600 whatever the umask.
    fn write_option_file(&self, path: &Path, user: &str, password: &str, extra: &str) {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let text = format!(
            "[client]\nuser={}\npassword={}\nhost={}\nport={}\n{extra}",
            quote(user),
            quote(password),
            self.host,
            self.port
        );
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        f.write_all(text.as_bytes()).expect("writing the option file");
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod 600");
    }

    /// `mariadb --defaults-file=F --batch --skip-column-names`, in utf8mb4 (the client's own
    /// default, utf8mb3, cannot carry 4-byte characters): add `-e SQL` or feed stdin.
    pub fn client(&self, option_file: &Path) -> Command {
        let mut cmd = Command::new("mariadb");
        let mut arg = std::ffi::OsString::from("--defaults-file=");
        arg.push(option_file);
        cmd.arg(arg)
            .args(["--batch", "--skip-column-names", "--default-character-set=utf8mb4"]);
        cmd
    }

    /// Runs SQL (read from stdin, so DELIMITER and long statements work) as the user of
    /// `option_file`; what the client did.
    pub fn try_sql(&self, option_file: &Path, sql: &str) -> Run {
        run_cmd(self.client(option_file), sql)
    }

    /// Runs SQL as the user of `option_file` and returns the output rows (tab-separated
    /// lines, batch escapes); panics with the client's message if it fails.
    pub fn sql(&self, option_file: &Path, sql: &str) -> String {
        let run = self.try_sql(option_file, sql);
        assert_eq!(
            run.code,
            0,
            "mariadb failed: {}\nSQL: {}",
            run.stderr,
            sql.chars().take(2000).collect::<String>()
        );
        run.stdout
    }

    /// As [`MysqlServer::sql`] with an admin option file of its own, for guards that may
    /// outlive a test's sandbox.
    fn admin_sql(&self, sql: &str) -> Run {
        let file = tempfile::Builder::new()
            .prefix("bk-test-my-")
            .suffix(".cnf")
            .tempfile()
            .expect("a temp file");
        self.write_option_file(file.path(), &self.user, &self.password, "");
        self.try_sql(file.path(), sql)
    }

    /// A guard that drops database `name` (if it exists) when it goes.
    pub fn database(&self, name: &str) -> MysqlGuard {
        MysqlGuard {
            server: self.clone(),
            drop_sql: format!("DROP DATABASE IF EXISTS {}", mysql_ident(name)),
        }
    }

    /// A guard that drops the account `'user'@'host'` (if it exists) when it goes.
    pub fn account(&self, user: &str, host: &str) -> MysqlGuard {
        MysqlGuard {
            server: self.clone(),
            drop_sql: format!("DROP USER IF EXISTS {}@{}", mysql_string(user), mysql_string(host)),
        }
    }
}

/// A database or account of a test, dropped at the end whatever happens.
pub struct MysqlGuard {
    pub server: MysqlServer,
    pub drop_sql: String,
}

impl Drop for MysqlGuard {
    fn drop(&mut self) {
        let run = self.server.admin_sql(&self.drop_sql);
        if run.code != 0 {
            eprintln!("warning: {}: {}", self.drop_sql, run.stderr.trim());
        }
    }
}

/// A name quoted as a MySQL identifier.
pub fn mysql_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A MySQL string literal.
pub fn mysql_string(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A name no other test (or concurrent run) uses: `<prefix><pid>_<n>_<random>`; database
/// and user names stay well under MySQL's limits (64 and 80 characters) for short prefixes.
pub fn mysql_unique_name(prefix: &str) -> String {
    unique_name(prefix)
}

/// A small complete backup of `name` made at `stamp` (`20250101T001500Z`), written straight
/// into `store` the way bk-dump leaves one (the artifact, then its manifest): for tests
/// that need backups of given dates, which bk-dump, on the real clock, cannot make.
pub fn write_backup(store: &str, name: &str, stamp: &str) -> Artifact {
    use bk_core::store::Store;
    let local = bk_core::store::LocalStore::new(store).expect("a store path");
    let id = format!("{name}.{stamp}");
    let file = format!("{id}.tar");
    let content = format!("the backup {id}\n");
    let mut upload = local.create(name, &file).expect("creating the artifact");
    upload.write_all(content.as_bytes()).expect("writing the artifact");
    upload.commit().expect("publishing the artifact");
    let started =
        bk_core::name::rfc3339(bk_core::name::parse_time(stamp, bk_core::name::DateIs::End).expect("a stamp"));
    let artifact = Artifact {
        id,
        name: name.to_string(),
        engine: "files".to_string(),
        source: bk_core::record::Source {
            host: "test".to_string(),
            paths: vec!["/srv".to_string()],
            ..Default::default()
        },
        started: started.clone(),
        finished: started,
        location: local.location(name, &file),
        file,
        format: "tar".to_string(),
        compression: bk_core::codec::Compression::None,
        encryption: None,
        bytes: content.len() as u64,
        sha256: hex::encode(Sha256::digest(content.as_bytes())),
        content_bytes: content.len() as u64,
        counts: BTreeMap::from([("entries".to_string(), 1)]),
        tool: bk_core::record::ToolInfo {
            program: "bk-tests".to_string(),
            version: bk_core::BK_VERSION.to_string(),
        },
        bk_version: bk_core::BK_VERSION.to_string(),
        level: None,
        parent: None,
        chain: None,
    };
    local.put_manifest(&artifact).expect("writing the manifest");
    artifact
}

/// The remote test servers of tests/services.sh: s3s-fs on TEST_S3_ENDPOINT, and sshd on
/// 127.0.0.1:TEST_SSH_PORT, logged into as TEST_SSH_USER with the key TEST_SSH_KEY.
pub struct Remote {
    pub s3_endpoint: String,
    pub s3_bucket: String,
    pub ssh_key: String,
    pub ssh_port: String,
    pub ssh_user: String,
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY with their values, for an environment
    /// that is cleared.
    pub aws_keys: [(String, String); 2],
}

impl Remote {
    /// The servers from the environment (`source $(tests/services.sh env)`); `None` (the
    /// test skips) without them, a failure if BK_TEST_SERVICES=1 says they are up.
    pub fn from_env() -> Option<Remote> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let key = |k: &str| Some((k.to_string(), var(k)?));
        let found = (|| {
            Some(Remote {
                s3_endpoint: var("TEST_S3_ENDPOINT")?,
                s3_bucket: var("TEST_S3_BUCKET")?,
                ssh_key: var("TEST_SSH_KEY")?,
                ssh_port: var("TEST_SSH_PORT")?,
                ssh_user: var("TEST_SSH_USER")?,
                aws_keys: [key("AWS_ACCESS_KEY_ID")?, key("AWS_SECRET_ACCESS_KEY")?],
            })
        })();
        let why = || "TEST_S3_ENDPOINT/TEST_SSH_*/AWS_* are not set".into();
        needs(found, why, SERVICES_ENV)
    }

    /// The ssh store URL of an absolute directory on the test sshd.
    pub fn ssh_url(&self, dir: &str) -> String {
        format!("ssh://{}@127.0.0.1:{}{dir}", self.ssh_user, self.ssh_port)
    }

    /// A new store on the test sshd: the URL of a directory of /tmp no other test uses.
    pub fn ssh_store(&self, prefix: &str) -> String {
        self.ssh_url(&format!("/tmp/{}", unique_name(&format!("{prefix}-"))))
    }

    /// A new store on the test S3 server: a prefix of its bucket no other test uses.
    pub fn s3_store(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.s3_bucket, unique_name(&format!("{prefix}-")))
    }

    /// BK_SSH_COMMAND for the test sshd: its key, any host key accepted.
    pub fn ssh_command(&self) -> String {
        self.ssh_command_with("/dev/null", "no")
    }

    /// BK_SSH_COMMAND for the test sshd that accepts only a host key of `known_hosts`.
    pub fn ssh_command_checking(&self, known_hosts: &Path) -> String {
        self.ssh_command_with(&known_hosts.display().to_string(), "yes")
    }

    fn ssh_command_with(&self, known_hosts: &str, strict: &str) -> String {
        format!(
            "ssh -i {} -o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking={strict} -o LogLevel=ERROR",
            self.ssh_key
        )
    }

    /// A tool with the S3 endpoint and the ssh key set up, as a user's environment would.
    pub fn cmd(&self, sb: &Sandbox, tool: &str, args: &[&str]) -> Command {
        let mut cmd = sb.cmd(tool, args);
        cmd.env("BK_S3_ENDPOINT", &self.s3_endpoint)
            .env("BK_SSH_COMMAND", self.ssh_command());
        cmd
    }

    /// [`Remote::cmd`] run with `stdin`.
    pub fn run(&self, sb: &Sandbox, tool: &str, args: &[&str], stdin: &str) -> Run {
        run_cmd(self.cmd(sb, tool, args), stdin)
    }

    /// Runs a script on the test sshd as its user, with `stdin`; its stdout. Panics if it fails.
    pub fn shell(&self, script: &str, stdin: &[u8]) -> String {
        let mut child = Command::new("ssh")
            .args(["-i", &self.ssh_key, "-p", &self.ssh_port])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no"])
            .args(["-o", "LogLevel=ERROR", "-o", "BatchMode=yes"])
            .arg(format!("{}@127.0.0.1", self.ssh_user))
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running ssh");
        child
            .stdin
            .take()
            .expect("stdin piped")
            .write_all(stdin)
            .expect("writing to ssh");
        let out = child.wait_with_output().expect("waiting for ssh");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 from the remote script")
    }
}

/// A private s3s-fs on a free port, serving the bucket `test-bucket` from a directory of the
/// sandbox (each object a file under `<root>/test-bucket/`), stopped when dropped; to kill and
/// restart.
pub struct PrivateS3 {
    pub port: u16,
    pub root: PathBuf,
    child: Option<Child>,
}

impl PrivateS3 {
    pub fn start(sb: &Sandbox) -> PrivateS3 {
        let root = sb.path("s3root");
        fs::create_dir_all(root.join("test-bucket")).expect("creating the bucket");
        let port = free_port();
        let mut s3 = PrivateS3 {
            port,
            root,
            child: None,
        };
        s3.restart();
        s3
    }

    /// Starts the server (again, after [`PrivateS3::kill`]) and waits until it listens.
    pub fn restart(&mut self) {
        let server = Path::new("/tmp/bk-test-tools/bin/s3s-fs");
        assert!(server.exists(), "s3s-fs is built by tests/services.sh");
        let key = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set by tests/services.sh env"));
        let child = Command::new(server)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", &key("AWS_ACCESS_KEY_ID")])
            .args(["--secret-key", &key("AWS_SECRET_ACCESS_KEY")])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        self.child = Some(child);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < until, "private s3s-fs did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Stops the server, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("killing s3s-fs");
            child.wait().expect("waiting for s3s-fs");
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The directory holding the objects of `test-bucket`.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.join("test-bucket")
    }

    /// The multipart uploads the server holds: s3s-fs keeps one `.upload-<id>.json` each in
    /// its root (it cannot list them over S3: no ListMultipartUploads).
    pub fn multipart_uploads(&self) -> usize {
        fs::read_dir(&self.root)
            .expect("reading the s3s-fs root")
            .filter(|e| {
                let name = e.as_ref().expect("a directory entry").file_name();
                let name = name.to_string_lossy();
                name.starts_with(".upload-") && name.ends_with(".json")
            })
            .count()
    }
}

impl Drop for PrivateS3 {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The ```sh blocks of a Markdown text, in order: each block's first line's number and its text.
pub fn sh_blocks(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match open.as_mut() {
            None if line == "```sh" => open = Some((i + 2, String::new())),
            None => {}
            Some(_) if line == "```" => blocks.push(open.take().expect("an open block")),
            Some((_, script)) => {
                script.push_str(line);
                script.push('\n');
            }
        }
    }
    assert!(open.is_none(), "the text ends inside a ```sh block");
    blocks
}

/// `bk` is installed in `bin`, every tool is a link `bk-<tool>` to it there, and each runs
/// as that tool.
#[track_caller]
pub fn assert_tools_linked(bin: &Path) {
    assert!(bin.join("bk").is_file(), "{}/bk is not installed", bin.display());
    for tool in &bk::TOOLS {
        let link = bin.join(format!("bk-{}", tool.name));
        let target = fs::read_link(&link).unwrap_or_else(|e| panic!("{}: not a link: {e}", link.display()));
        assert_eq!(target, Path::new("bk"), "{}", link.display());
        let mut version = Command::new(&link);
        version.arg("--version");
        let run = run_cmd(version, "");
        assert_eq!(
            (run.code, run.stdout.trim()),
            (0, format!("bk-{} {}", tool.name, bk_core::BK_VERSION).as_str()),
            "{} --version: {}",
            link.display(),
            run.stderr
        );
    }
}

/// Lines as a tool's stdin, each ended by a line feed.
pub fn stdin_of(lines: &[&str]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

impl Run {
    /// bk-notify's `notified` records, one per sink.
    pub fn notified(&self) -> Vec<serde_json::Map<String, serde_json::Value>> {
        self.records()
            .into_iter()
            .filter_map(|r| if let Record::Notified(n) = r { Some(n) } else { None })
            .collect()
    }

    /// Every error record printed, passed on or the tool's own.
    pub fn errors(&self) -> Vec<ErrorRecord> {
        self.records()
            .into_iter()
            .filter_map(|r| if let Record::Error(e) = r { Some(e) } else { None })
            .collect()
    }
}

/// One HTTP request a [`Receiver`] got.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub body: String,
}

/// A real HTTP server on loopback for bk-notify's tests: it records every request and
/// answers them with the programmed statuses in turn, then 200.
pub struct Receiver {
    port: u16,
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
}

impl Receiver {
    pub fn start(statuses: &[u16]) -> Receiver {
        let mut statuses: std::collections::VecDeque<u16> = statuses.iter().copied().collect();
        Receiver::serve(move || {
            let status = statuses.pop_front().unwrap_or(200);
            format!("HTTP/1.1 {status} Programmed\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        })
    }

    /// A server that records each request and answers it with something that is not HTTP
    /// (as an SSH or SMTP server at the URL's port would).
    pub fn garbage() -> Receiver {
        Receiver::serve(|| "SSH-2.0-OpenSSH_9.2p1 not HTTP\r\n".to_string())
    }

    fn serve(mut answer: impl FnMut() -> String + Send + 'static) -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().expect("its address").port();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = received.clone();
        // Serves until the test process ends.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let Some(request) = read_request(&mut stream) else {
                    continue;
                };
                log.lock().expect("the request log").push(request);
                let _ = stream.write_all(answer().as_bytes());
            }
        });
        Receiver { port, received }
    }

    /// A URL on this receiver with `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("the request log").clone()
    }

    /// The requests once there are `count` of them; panics after 30 s without.
    pub fn wait_for(&self, count: usize) -> Vec<Received> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{count} requests expected, got {received:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// One request: its head up to the blank line, then a Content-Length body.
fn read_request(stream: &mut std::net::TcpStream) -> Option<Received> {
    use std::io::{BufRead, BufReader, Read};
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Received {
        method,
        path,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The MongoDB-protocol test server (TEST_MONGO_URL, written by tests/services.sh): nx-27017,
/// not a real mongod (docs/engines.md says what it cannot exercise), and the Python with
/// pymongo beside it (TEST_MONGO_PYTHON) that the tests use as an independent client.
#[derive(Debug, Clone)]
pub struct MongoServer {
    /// A URI without credentials (nx-27017 has no authentication).
    pub url: String,
    pub host: String,
    pub port: u16,
    python: PathBuf,
}

/// The MongoDB test server. When a variable is missing or the server does not answer: a
/// failure when the full suite runs (BK_TEST_SERVICES=1), else a SKIPPED note and `None`.
pub fn mongo_server() -> Option<MongoServer> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let url = needs(
        var("TEST_MONGO_URL"),
        || "TEST_MONGO_URL is not set".into(),
        SERVICES_ENV,
    )?;
    let python = needs(
        var("TEST_MONGO_PYTHON"),
        || "TEST_MONGO_PYTHON is not set".into(),
        SERVICES_ENV,
    )?;
    let parts = ServerUrl::parse(&url, &["mongodb://"], "", 27017)
        .unwrap_or_else(|| panic!("TEST_MONGO_URL={url}: expected mongodb://host:port/..."));
    let reachable = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::new(parts.host.parse().expect("TEST_MONGO_URL: an IP address"), parts.port),
        std::time::Duration::from_secs(5),
    )
    .is_ok();
    let why = || format!("no MongoDB-protocol server answers at {}:{}", parts.host, parts.port);
    needs(reachable.then_some(()), why, SERVICES_ENV)?;
    Some(MongoServer {
        url,
        host: parts.host,
        port: parts.port,
        python: PathBuf::from(python),
    })
}

/// What every [`MongoServer::python`] script starts with: `client`, `digests(db)` and
/// `database_names()`.
const MONGO_PYTHON_PRELUDE: &str = r#"
import hashlib, json, os, sys, time
import bson
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient
from pymongo.errors import OperationFailure
client = MongoClient(os.environ["BK_TEST_MONGO_URL"], serverSelectionTimeoutMS=10000)
def database_names():
    """listDatabases, again when nx-27017 fails it with "disk I/O error": it opens every
    database's SQLite file, and one that another test drops meanwhile fails the whole list."""
    for attempt in range(5):
        try:
            return client.list_database_names()
        except OperationFailure as e:
            if "disk I/O error" not in str(e) or attempt == 4:
                raise
            time.sleep(0.2)
def digests(db):
    """Per collection of db, read raw in natural order: {"db.coll": {count, sha256}}."""
    out = {}
    for name in client[db].list_collection_names():
        h, n = hashlib.sha256(), 0
        for d in client[db].get_collection(name, codec_options=bson.CodecOptions(document_class=RawBSONDocument)).find():
            h.update(d.raw); n += 1
        out[f"{db}.{name}"] = {"count": n, "sha256": h.hexdigest()}
    return out
"#;

impl MongoServer {
    /// Runs a Python script with pymongo connected to this server (`client`; `args` are
    /// sys.argv[1:]): its stdout. The script must succeed.
    pub fn python(&self, script: &str, args: &[&str]) -> String {
        let out = output_of(&mut self.python_cmd(script, args));
        String::from_utf8(out).expect("UTF-8 from the script")
    }

    /// The command [`MongoServer::python`] runs, to start it in the background.
    pub fn python_cmd(&self, script: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg("-c")
            .arg(format!("{MONGO_PYTHON_PRELUDE}\n{script}"))
            .args(args)
            .env("BK_TEST_MONGO_URL", &self.url);
        cmd
    }

    /// A throwaway nx-27017 of one test (the one of tests/services.sh's venv), on a port of its
    /// own with its data in the sandbox: for tests that kill their server.
    pub fn start_private(&self, sb: &Sandbox) -> PrivateMongo {
        let dir = sb.path("private-mongo");
        fs::create_dir(&dir).expect("the private server's directory");
        let port = free_port();
        let program = self.python.with_file_name("nx-27017");
        let child = Command::new(&program)
            .arg("--data-dir")
            .arg(&dir)
            .args(["--host", "127.0.0.1", "-p", &port.to_string()])
            .arg("--log-file")
            .arg(dir.join("log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let server = MongoServer {
            url: format!("mongodb://127.0.0.1:{port}/?directConnection=true"),
            host: "127.0.0.1".into(),
            port,
            python: self.python.clone(),
        };
        let mut private = PrivateMongo { server, child };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                private.child.try_wait().expect("waiting").is_none(),
                "the private nx-27017 exited"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "the private nx-27017 is not ready"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        private
    }

    /// Every collection of `db` read back raw from the server: count and sha256 of its
    /// documents' bytes, keyed `db.collection` (what [`MongoServer::read_archive`] gives too).
    pub fn digests(&self, db: &str) -> serde_json::Value {
        let out = self.python("print(json.dumps(digests(sys.argv[1])))", &[db]);
        serde_json::from_str(&out).expect("digests as JSON")
    }

    /// An artifact's archive (decompressed, at `path`) read by tests/mongo/archive_reader.py,
    /// pymongo's decoder walking the format as its specification says: not bk's reader.
    pub fn read_archive(&self, path: &Path) -> serde_json::Value {
        let reader = Path::new(env!("CARGO_MANIFEST_DIR")).join("mongo/archive_reader.py");
        let out = output_of(Command::new(&self.python).arg(reader).arg(path));
        serde_json::from_slice(&out).expect("the reader's JSON")
    }

    /// A database of the test, dropped at the end whatever happens.
    pub fn database(&self, name: &str) -> MongoDatabase {
        MongoDatabase {
            server: self.clone(),
            name: name.to_string(),
        }
    }
}

/// A database of a test on the MongoDB test server, dropped at the end whatever happens.
pub struct MongoDatabase {
    pub server: MongoServer,
    pub name: String,
}

impl Drop for MongoDatabase {
    fn drop(&mut self) {
        // The server may be gone (a test that stops it): nothing left to drop then.
        let dropped = Command::new(&self.server.python)
            .arg("-c")
            .arg(format!("{MONGO_PYTHON_PRELUDE}\nclient.drop_database(sys.argv[1])"))
            .arg(&self.name)
            .env("BK_TEST_MONGO_URL", &self.server.url)
            .output();
        if !dropped.is_ok_and(|o| o.status.success()) {
            eprintln!("warning: could not drop the MongoDB database {}", self.name);
        }
    }
}

/// A private nx-27017 (see [`MongoServer::start_private`]), killed when it goes.
pub struct PrivateMongo {
    pub server: MongoServer,
    child: Child,
}

impl PrivateMongo {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateMongo {
    fn drop(&mut self) {
        self.kill();
    }
}
