//! The example cron.d files: each must be a file cron accepts as it is, and each job must
//! really back up, run the way cron runs it (`/bin/sh -c`, the file's variables, nothing else
//! in the environment), with its hosts, stores and sources replaced by the test servers and a
//! sandbox. A file's jobs run in order against the same replacements, so the nightly
//! verification of cron.d/bk-mysql-ssh reads what its backup job shipped. Their webhook is a
//! receiver of the test's, which a good run must not call (bk-notify --on failure).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use bk_core::record::Artifact;
use bk_tests::cron::{has_bare_percent, is_operator, parse, valid_file_name, words, CronFile, Job};
use bk_tests::{
    bin_dir, influx_server, mysql_server, mysql_unique_name, pg_server, pg_unique_name, run_cmd, InfluxGuard,
    InfluxServer, MysqlGuard, MysqlServer, PgDatabase, PgServer, Receiver, Remote, Run, Sandbox,
};

/// The tools whose path a job must spell out in full.
const TOOLS: [&str; 7] = [
    "bk-dump",
    "bk-ls",
    "bk-restore",
    "bk-ship",
    "bk-prune",
    "bk-verify",
    "bk-notify",
];

/// Where the example jobs expect the tools.
const INSTALL_DIR: &str = "/usr/local/bin/";

/// The options of the tools that take a value, besides `--keep-*` (the rest of a job's words
/// are options without a value, engines, sources and stores).
const VALUE_OPTIONS: [&str; 29] = [
    "--to",
    "--from",
    "--name",
    "--compress",
    "--level",
    "--encrypt-to",
    "--recipients-file",
    "--identity",
    "--lock-dir",
    "--wait",
    "--exclude",
    "--include",
    "--busy-timeout",
    "--defaults-file",
    "--socket",
    "--host",
    "--port",
    "--rpc-port",
    "--user",
    "--database",
    "--exclude-database",
    "--scratch-dir",
    "--sample",
    "--since",
    "--id",
    "--retries",
    "--tz",
    "--format",
    "--webhook",
];

fn takes_value(option: &str) -> bool {
    option.starts_with("--keep-") || VALUE_OPTIONS.contains(&option)
}

fn cron_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cron.d")
}

fn cron_files() -> Vec<PathBuf> {
    let dir = cron_dir();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a cron.d entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no example in {}", dir.display());
    files
}

fn tool_name(word: &str) -> Option<&str> {
    let name = Path::new(word).file_name()?.to_str()?;
    TOOLS.contains(&name).then_some(name)
}

#[test]
fn cron_files_are_what_cron_accepts() {
    for path in cron_files() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            valid_file_name(&name),
            "cron.d/{name}: cron ignores files in /etc/cron.d whose names hold anything but letters, digits, '_' and '-'"
        );
        let file = parse(&path);
        for var in ["SHELL", "PATH", "MAILTO"] {
            assert!(file.var(var).is_some(), "cron.d/{name}: no {var}= line");
        }
        assert_eq!(
            file.var("SHELL"),
            Some("/bin/sh"),
            "cron.d/{name}: the jobs are written for /bin/sh"
        );
        assert!(!file.jobs.is_empty(), "cron.d/{name}: no job");
        for job in &file.jobs {
            let at = format!("cron.d/{name}:{}", job.line);
            assert!(
                !has_bare_percent(&job.command),
                "{at}: cron turns a bare % into a newline; write \\%"
            );
            let tools: Vec<String> = words(&job.command)
                .into_iter()
                .filter(|w| tool_name(w).is_some())
                .collect();
            assert!(!tools.is_empty(), "{at}: the job runs no bk tool");
            for t in tools {
                assert!(
                    t.starts_with(INSTALL_DIR),
                    "{at}: {t}: write the tool's absolute path ({INSTALL_DIR}...)"
                );
            }
        }
    }
}

/// What a file's jobs need of the test servers.
#[derive(Default)]
struct Needs {
    mysql: bool,
    pg: bool,
    influx: bool,
    remote: bool,
}

fn needs(file: &CronFile) -> Needs {
    let mut needs = Needs::default();
    for job in &file.jobs {
        let words = words(&job.command);
        for (i, w) in words.iter().enumerate() {
            needs.remote |= w.starts_with("ssh://") || w.starts_with("s3://");
            if i > 0 && tool_name(&words[i - 1]) == Some("bk-dump") {
                needs.mysql |= w == "mysql";
                needs.pg |= w == "postgres";
                needs.influx |= w == "influxdb";
            }
        }
    }
    needs
}

/// One cron.d file's jobs in a sandbox: the stores they name, each replaced by a test store
/// (the same one every time the file names it), and the databases made for them.
struct SandboxedFile {
    sandbox: Sandbox,
    file: CronFile,
    name: String,
    remote: Option<Remote>,
    mysql: Option<(MysqlServer, PathBuf)>,
    pg: Option<(PgServer, PathBuf)>,
    influx: Option<InfluxServer>,
    stores: BTreeMap<String, String>,
    /// The test stores some job of the file has written to.
    filled: BTreeSet<String>,
    /// Stands for the webhook of every `--webhook @FILE`.
    receiver: Receiver,
    databases: (Vec<MysqlGuard>, Vec<PgDatabase>, Vec<InfluxGuard>),
}

/// A job with its words replaced: the command to run and what it writes and reads.
struct Sandboxed {
    command: String,
    to: Vec<String>,
    from: Option<String>,
    name: Option<String>,
}

impl SandboxedFile {
    /// The file in a new sandbox, or `None` (a skip) when a server it needs is missing and the
    /// suite does not require them.
    fn new(path: &Path) -> Option<SandboxedFile> {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let file = parse(path);
        let needs = needs(&file);
        let sandbox = Sandbox::new();
        let remote = if needs.remote { Some(Remote::from_env()?) } else { None };
        let mysql = if needs.mysql {
            let server = mysql_server()?;
            let option_file = server.option_file(&sandbox, "my.cnf");
            Some((server, option_file))
        } else {
            None
        };
        let pg = if needs.pg {
            let server = pg_server()?;
            let pgpass = server.write_pgpass(&sandbox, "pgpass");
            Some((server, pgpass))
        } else {
            None
        };
        let influx = if needs.influx { Some(influx_server()?) } else { None };
        Some(SandboxedFile {
            sandbox,
            file,
            name,
            remote,
            mysql,
            pg,
            influx,
            stores: BTreeMap::new(),
            filled: BTreeSet::new(),
            receiver: Receiver::start(&[]),
            databases: (Vec::new(), Vec::new(), Vec::new()),
        })
    }

    /// The test store standing for a store the file names.
    fn store(&mut self, original: &str) -> String {
        if let Some(s) = self.stores.get(original) {
            return s.clone();
        }
        let n = self.stores.len();
        // Short: s3s-fs names a multipart upload's file after the whole key (255 bytes at most).
        let unique = format!("cron{n}-{}", pg_unique_name(""));
        let replaced = match &self.remote {
            Some(r) if original.starts_with("ssh://") => r.ssh_url(&format!("/tmp/{unique}")),
            Some(r) if original.starts_with("s3://") => format!("s3://{}/{unique}", r.s3_bucket),
            _ => self.sandbox.path(&format!("store-{n}")).display().to_string(),
        };
        self.stores.insert(original.to_string(), replaced.clone());
        replaced
    }

    /// The variables a job gets besides the file's: the sandbox's tools first on PATH, its
    /// lock directory and home, and how to reach the test servers.
    fn env(&self) -> Vec<(String, String)> {
        let file_path = self.file.var("PATH").unwrap_or("/usr/bin:/bin");
        let mut env = vec![
            ("PATH".into(), format!("{}:{file_path}", bin_dir().display())),
            ("BK_LOCK_DIR".into(), self.sandbox.path("locks").display().to_string()),
        ];
        if let Some(r) = &self.remote {
            env.push(("BK_SSH_COMMAND".into(), r.ssh_command()));
            env.push(("BK_S3_ENDPOINT".into(), r.s3_endpoint.clone()));
            env.extend(r.aws_keys.iter().cloned());
        }
        if let Some((pg, pgpass)) = &self.pg {
            env.push(("PGHOST".into(), pg.host.clone()));
            env.push(("PGPORT".into(), pg.port.to_string()));
            env.push(("PGUSER".into(), pg.user.clone()));
            env.push(("PGPASSFILE".into(), pgpass.display().to_string()));
        }
        env
    }

    /// A bk tool run with the jobs' environment, to seed and inspect the stores.
    fn tool(&self, tool: &str, args: &[&str], stdin: &str) -> Run {
        let mut cmd = self.sandbox.cmd(tool, args);
        cmd.envs(self.env());
        run_cmd(cmd, stdin)
    }

    /// A database with a few rows (points) on the test server of `engine`, dropped with the
    /// sandbox.
    fn database(&mut self, engine: &str) -> String {
        let name = mysql_unique_name("bkc");
        if engine == "influxdb" {
            let server = self.influx.as_ref().expect("checked by needs()");
            self.databases.2.push(server.database(&name));
            server.write(
                &name,
                "autogen",
                "cpu,host=a value=1 1000000000\ncpu,host=b value=2 2000000000\n",
            );
            return name;
        }
        let sql = "CREATE TABLE items(id INTEGER PRIMARY KEY, label TEXT); \
                   INSERT INTO items VALUES (1, 'a'), (2, 'b'), (3, 'c');";
        if engine == "mysql" {
            let (server, option_file) = self.mysql.as_ref().expect("checked by needs()");
            self.databases.0.push(server.database(&name));
            server.sql(option_file, &format!("CREATE DATABASE {name}; USE {name}; {sql}"));
        } else {
            let (server, _) = self.pg.as_ref().expect("checked by needs()");
            self.databases.1.push(server.create_database(&name));
            server.execute(&name, sql);
        }
        name
    }

    /// A source of `engine` to back up in the sandbox: a new SQLite database for `sqlite`;
    /// for `files`, the path itself when running as root (the example jobs' user) and it
    /// exists, else a small tree.
    fn source(&self, engine: &str, path: &str, at: &str) -> String {
        let n = fs::read_dir(self.sandbox.root()).map(|d| d.count()).unwrap_or(0);
        match engine {
            "sqlite" => {
                let db = self.sandbox.path(&format!("source-{n}.db"));
                let conn = rusqlite::Connection::open(&db).expect("a new database");
                conn.execute_batch(
                    "PRAGMA journal_mode=wal;
                     CREATE TABLE items(id INTEGER PRIMARY KEY, label TEXT);
                     INSERT INTO items(label) VALUES ('a'), ('b'), ('c');",
                )
                .expect("filling the database");
                db.display().to_string()
            }
            "files" if nix::unistd::geteuid().is_root() && Path::new(path).exists() => path.to_string(),
            "files" => {
                let dir = self.sandbox.path(&format!("source-{n}"));
                fs::create_dir_all(dir.join("sub")).unwrap();
                fs::write(dir.join("a.conf"), "key = value\n").unwrap();
                fs::write(dir.join("sub/b.conf"), "other = 1\n").unwrap();
                dir.display().to_string()
            }
            other => panic!("{at}: no sandbox source for the {other} engine"),
        }
    }

    /// The job with its tools, stores, sources and files moved into the sandbox. A database
    /// engine gets a database of its own to back up (the examples back up every database,
    /// which on the shared test server are other tests' too, or a database of their own
    /// named by --database), on the test server (--host, --port and --rpc-port replaced).
    fn sandboxed(&mut self, job: &Job, at: &str) -> Sandboxed {
        let names_database = words(&job.command).iter().any(|w| w == "--database");
        let mut database: Option<String> = None;
        let mut out = Sandboxed {
            command: String::new(),
            to: Vec::new(),
            from: None,
            name: None,
        };
        let mut words_out: Vec<String> = Vec::new();
        let (mut tool, mut engine): (Option<&str>, Option<String>) = (None, None);
        let mut pending: Option<String> = None;
        for word in words(&job.command) {
            let mut word = word.replace("\\%", "%");
            if let Some(option) = pending.take() {
                word = match option.as_str() {
                    "--to" | "--from" => {
                        let store = self.store(&word);
                        if option == "--to" {
                            out.to.push(store.clone());
                        } else {
                            out.from = Some(store.clone());
                        }
                        store
                    }
                    "--scratch-dir" => {
                        let dir = self.sandbox.path("scratch");
                        fs::create_dir_all(&dir).unwrap();
                        dir.display().to_string()
                    }
                    "--defaults-file" => self.option_file(),
                    "--webhook" => self.webhook_file(&word, at),
                    "--name" => {
                        out.name = Some(word.clone());
                        word
                    }
                    "--database" => database.clone().unwrap_or(word),
                    "--host" | "--port" | "--rpc-port" if engine.as_deref() == Some("influxdb") => {
                        let server = self.influx.as_ref().expect("checked by needs()");
                        match option.as_str() {
                            "--host" => server.host.clone(),
                            "--port" => server.port.to_string(),
                            _ => server.rpc_port.to_string(),
                        }
                    }
                    _ => word,
                };
            } else if let Some(name) = word
                .strip_prefix(INSTALL_DIR)
                .and_then(|w| TOOLS.iter().copied().find(|t| *t == w))
            {
                tool = Some(name);
                engine = None;
                word = format!("{}/{name}", bin_dir().display());
            } else if is_operator(&word) {
                (tool, engine) = (None, None);
            } else if word.starts_with('-') {
                assert!(!word.contains('='), "{at}: write {word} as two words");
                if takes_value(&word) {
                    pending = Some(word.clone());
                }
            } else if tool == Some("bk-dump") && engine.is_none() {
                engine = Some(word.clone());
                if ["mysql", "postgres", "influxdb"].contains(&word.as_str()) {
                    let made = self.database(&word);
                    if !names_database {
                        word = format!("{word} --database {made}");
                    }
                    database = Some(made);
                }
            } else if let Some(engine) = &engine {
                word = self.source(engine, &word, at);
            } else if tool == Some("bk-prune") {
                word = self.store(&word);
            }
            words_out.push(word);
        }
        out.command = words_out.join(" ");
        out
    }

    /// `--defaults-file`'s stand-in: the test server's option file, or (for a job without
    /// MySQL backups) an empty private one.
    fn option_file(&self) -> String {
        if let Some((_, file)) = &self.mysql {
            return file.display().to_string();
        }
        use std::os::unix::fs::PermissionsExt;
        let file = self.sandbox.path("empty-my.cnf");
        fs::write(&file, "[client]\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        file.display().to_string()
    }

    /// `--webhook @FILE`'s stand-in: a private file with the receiver's URL.
    fn webhook_file(&self, word: &str, at: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        assert!(
            word.starts_with('@'),
            "{at}: --webhook {word}: a URL belongs in a file (@FILE)"
        );
        let file = self.sandbox.path("webhook.url");
        fs::write(&file, format!("{}\n", self.receiver.url("/hook"))).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        format!("@{}", file.display())
    }

    /// Puts a backup named `name` into `store`, for a job that reads backups it did not make.
    fn seed(&mut self, store: &str, name: &str) {
        let db = self.source("sqlite", "", "seed");
        let local = self.sandbox.path("seed-store").display().to_string();
        let to = if store.contains("://") { local.as_str() } else { store };
        let dumped = self.tool("bk-dump", &["sqlite", &db, "--name", name, "--to", to], "");
        assert_eq!(dumped.code, 0, "seeding {store}: {}", dumped.stderr);
        if store.contains("://") {
            let shipped = self.tool("bk-ship", &["--to", store], &dumped.stdout);
            assert_eq!(shipped.code, 0, "seeding {store}: {}", shipped.stderr);
        }
        self.filled.insert(store.to_string());
    }

    /// Runs every job of the file in order, as cron would, and checks what each left.
    fn run_jobs(&mut self) {
        let jobs = std::mem::take(&mut self.file.jobs);
        for job in &jobs {
            let at = format!("cron.d/{}:{}", self.name, job.line);
            let job_run = self.sandboxed(job, &at);
            if let Some(from) = job_run.from.as_ref().filter(|s| !self.filled.contains(*s)) {
                let from = from.clone();
                self.seed(&from, job_run.name.as_deref().unwrap_or("seeded"));
            }
            let home = self.sandbox.path("home");
            fs::create_dir_all(&home).unwrap();
            let mut cmd = self.file.shell(&job_run.command, &job.user, &home);
            cmd.envs(self.env()).current_dir(self.sandbox.root());
            let run = run_cmd(cmd, "");
            assert_eq!(
                run.code, 0,
                "{at}: `{}` failed\nstdout: {}\nstderr: {}",
                job_run.command, run.stdout, run.stderr
            );
            // cron mails any output: a good run must print nothing.
            assert!(
                run.stdout.is_empty() && run.stderr.is_empty(),
                "{at}: a successful run would send cron mail\nstdout: {}\nstderr: {}",
                run.stdout,
                run.stderr
            );
            let called: Vec<String> = self.receiver.received().into_iter().map(|r| r.body).collect();
            assert!(called.is_empty(), "{at}: a good run called the webhook: {called:?}");
            for store in &job_run.to {
                self.check_store(store, &job_run, &at);
                self.filled.insert(store.clone());
            }
            let scratch = self.sandbox.path("scratch");
            assert!(
                !scratch.exists() || bk_tests::files_below(&scratch).is_empty(),
                "{at}: left in the scratch directory: {:?}",
                bk_tests::files_below(&scratch)
            );
        }
        self.file.jobs = jobs;
    }

    /// A store a job wrote to holds complete backups of the job's name, with rows in them.
    fn check_store(&self, store: &str, job: &Sandboxed, at: &str) {
        let listed = self.tool("bk-ls", &[store], "");
        assert_eq!(listed.code, 0, "{at}: bk-ls {store}: {}", listed.stderr);
        let artifacts: Vec<Artifact> = listed.artifacts();
        assert!(!artifacts.is_empty(), "{at}: no backup in {store}");
        if let Some(name) = &job.name {
            assert!(
                artifacts.iter().all(|a| &a.name == name),
                "{at}: {store} holds backups not named {name}: {artifacts:?}"
            );
        }
        assert!(
            artifacts.iter().any(|a| a.counts.values().sum::<u64>() > 0),
            "{at}: only empty backups in {store}: {artifacts:?}"
        );
        for a in artifacts.iter().filter(|a| !a.location.contains("://")) {
            assert!(Path::new(&a.location).is_file(), "{at}: {} missing", a.location);
        }
    }
}

#[test]
fn cron_jobs_back_up_when_run_as_cron_runs_them() {
    for path in cron_files() {
        if let Some(mut file) = SandboxedFile::new(&path) {
            file.run_jobs();
        }
    }
}
