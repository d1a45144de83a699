//! The example cron.d files: each must be a file cron accepts as it is, and each job must
//! really back up, run the way cron runs it (`/bin/sh -c`, the file's PATH, nothing else in
//! the environment), with the paths pointed into a sandbox.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use bk_core::record::{parse_line, Record};
use bk_tests::{bin_dir, run_cmd, Sandbox};

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

/// bk-dump options that take a value (the rest of a job's words after the engine are options
/// without a value or the sources).
const VALUE_OPTIONS: [&str; 11] = [
    "--to",
    "--name",
    "--compress",
    "--level",
    "--encrypt-to",
    "--recipients-file",
    "--lock-dir",
    "--wait",
    "--exclude",
    "--include",
    "--busy-timeout",
];

struct CronFile {
    env: Vec<(String, String)>,
    jobs: Vec<Job>,
}

struct Job {
    line: usize,
    user: String,
    command: String,
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

/// `NAME=value` (spaces allowed around `=`, as cron allows).
fn env_line(line: &str) -> Option<(String, String)> {
    let (name, value) = line.split_once('=')?;
    let name = name.trim();
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    ok.then(|| (name.to_string(), value.trim().to_string()))
}

/// Splits a system crontab line into schedule, user and command, as cron reads it:
/// 5 time fields (or one `@daily`-style word), the user, then the rest of the line.
fn job_line(path: &Path, n: usize, line: &str) -> Job {
    let at = |what: &str| format!("{}:{n}: {what}: {line}", path.display());
    let fields = if line.starts_with('@') { 1 } else { 5 };
    let mut rest = line.trim_start();
    let mut words = Vec::new();
    for _ in 0..fields + 1 {
        let end = rest
            .find(char::is_whitespace)
            .unwrap_or_else(|| panic!("{}", at("fewer than 5 time fields, a user and a command")));
        words.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    let (schedule, user) = words.split_at(fields);
    for field in schedule {
        let ok = if fields == 1 {
            [
                "@reboot",
                "@yearly",
                "@annually",
                "@monthly",
                "@weekly",
                "@daily",
                "@midnight",
                "@hourly",
            ]
            .contains(field)
        } else {
            field.chars().all(|c| c.is_ascii_alphanumeric() || "*,/-".contains(c))
        };
        assert!(ok, "{}", at(&format!("bad time field {field:?}")));
    }
    let user = user[0].to_string();
    assert!(
        user.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
            && !user.chars().all(|c| c.is_ascii_digit()),
        "{}",
        at("the sixth field of a cron.d line is a user name")
    );
    let command = rest.trim_end().to_string();
    assert!(!command.is_empty(), "{}", at("no command"));
    Job { line: n, user, command }
}

fn parse(path: &Path) -> CronFile {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        text.ends_with('\n'),
        "{}: cron ignores a last line without a newline",
        path.display()
    );
    let mut file = CronFile {
        env: Vec::new(),
        jobs: Vec::new(),
    };
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(kv) =
            env_line(trimmed).filter(|_| !trimmed.starts_with(|c: char| c.is_ascii_digit() || "*@".contains(c)))
        {
            file.env.push(kv);
        } else {
            file.jobs.push(job_line(path, i + 1, trimmed));
        }
    }
    file
}

/// The words of a command, with the shell's separators as words of their own.
fn words(command: &str) -> Vec<String> {
    command.split_whitespace().map(str::to_string).collect()
}

fn is_operator(word: &str) -> bool {
    ["|", "||", "&&", ";", "&"].contains(&word)
        || word.starts_with('>')
        || word.starts_with("2>")
        || word.starts_with('<')
}

#[test]
fn cron_files_are_what_cron_accepts() {
    for path in cron_files() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "cron.d/{name}: cron ignores files in /etc/cron.d whose names hold anything but letters, digits, '_' and '-'"
        );
        let file = parse(&path);
        for var in ["SHELL", "PATH", "MAILTO"] {
            assert!(file.env.iter().any(|(k, _)| k == var), "cron.d/{name}: no {var}= line");
        }
        let shell = file.env.iter().find(|(k, _)| k == "SHELL").map(|(_, v)| v.as_str());
        assert_eq!(
            shell,
            Some("/bin/sh"),
            "cron.d/{name}: the jobs are written for /bin/sh"
        );
        assert!(!file.jobs.is_empty(), "cron.d/{name}: no job");
        for job in &file.jobs {
            let at = format!("cron.d/{name}:{}", job.line);
            let unescaped = job
                .command
                .char_indices()
                .any(|(i, c)| c == '%' && !job.command[..i].ends_with('\\'));
            assert!(!unescaped, "{at}: cron turns a bare % into a newline; write \\%");
            let tools: Vec<String> = words(&job.command)
                .into_iter()
                .filter(|w| {
                    TOOLS.contains(
                        &Path::new(w)
                            .file_name()
                            .unwrap_or_default()
                            .to_str()
                            .unwrap_or_default(),
                    )
                })
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

/// Options whose value is a path that a job run in the sandbox must not use as it is: the
/// store to read (bk-verify --from), a scratch directory, an option file.
const PATH_OPTIONS: [&str; 3] = ["--from", "--scratch-dir", "--defaults-file"];

/// The sandbox's stand-in for the path an option of [`PATH_OPTIONS`] names.
fn sandbox_path(option: &str, sandbox: &Sandbox, store: &Path) -> String {
    match option {
        "--from" => store.display().to_string(),
        "--scratch-dir" => {
            let dir = sandbox.path("scratch");
            fs::create_dir_all(&dir).unwrap();
            dir.display().to_string()
        }
        _ => {
            // Private, as bk requires; read only for MySQL backups, which the store lacks.
            use std::os::unix::fs::PermissionsExt;
            let file = sandbox.path("my.cnf");
            fs::write(&file, "[client]\n").unwrap();
            fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
            file.display().to_string()
        }
    }
}

/// The job, with its tools, store and sources moved into the sandbox; and the store.
fn sandboxed(job: &Job, sandbox: &Sandbox, at: &str) -> (String, PathBuf) {
    let store = sandbox.path("store");
    let bin = format!("{}/", bin_dir().display());
    let mut out = Vec::new();
    let mut engine: Option<String> = None;
    let mut expect_value = false;
    let mut expect_path: Option<String> = None;
    let mut next_is_engine = false;
    for word in words(&job.command) {
        let mut word = word.replace("\\%", "%");
        if let Some(option) = expect_path.take() {
            word = sandbox_path(&option, sandbox, &store);
        } else if let Some(tool) = word.strip_prefix(INSTALL_DIR) {
            next_is_engine = tool == "bk-dump";
            engine = None;
            word = format!("{bin}{tool}");
        } else if is_operator(&word) {
            (engine, next_is_engine) = (None, false);
        } else if expect_value {
            expect_value = false;
            if out.last().is_some_and(|w: &String| w == "--to") {
                word = store.display().to_string();
            }
        } else if word.starts_with("--to=") {
            word = format!("--to={}", store.display());
        } else if word.starts_with('-') {
            expect_value = VALUE_OPTIONS.contains(&word.as_str());
            if PATH_OPTIONS.contains(&word.as_str()) {
                expect_path = Some(word.clone());
            }
        } else if next_is_engine {
            next_is_engine = false;
            engine = Some(word.clone());
        } else if let Some(engine) = &engine {
            word = source(engine, &word, sandbox, at);
        }
        out.push(word);
    }
    (out.join(" "), store)
}

/// A source of the job to back up in the sandbox: a new SQLite database for `sqlite`; for
/// `files`, the path itself when running as root (the example jobs' user) and it exists,
/// else a small tree.
fn source(engine: &str, path: &str, sandbox: &Sandbox, at: &str) -> String {
    let n = fs::read_dir(sandbox.root()).map(|d| d.count()).unwrap_or(0);
    match engine {
        "sqlite" => {
            let db = sandbox.path(&format!("source-{n}.db"));
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
            let dir = sandbox.path(&format!("source-{n}"));
            fs::create_dir_all(dir.join("sub")).unwrap();
            fs::write(dir.join("a.conf"), "key = value\n").unwrap();
            fs::write(dir.join("sub/b.conf"), "other = 1\n").unwrap();
            dir.display().to_string()
        }
        other => panic!("{at}: no sandbox source for the {other} engine yet"),
    }
}

#[test]
fn cron_jobs_back_up_when_run_as_cron_runs_them() {
    for path in cron_files() {
        let file = parse(&path);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let file_path = file
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .expect("checked above");
        for job in &file.jobs {
            let at = format!("cron.d/{name}:{}", job.line);
            let sandbox = Sandbox::new();
            let (command, store) = sandboxed(job, &sandbox, &at);
            // A job that reads backups (bk-verify --from) gets one to read.
            if !words(&job.command)
                .iter()
                .any(|w| w == &format!("{INSTALL_DIR}bk-dump"))
            {
                let db = source("sqlite", "", &sandbox, &at);
                sandbox.dump(&["sqlite", &db, "--name", "seeded"]);
            }
            // cron's environment: the file's variables, HOME, LOGNAME and nothing else.
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(&command).env_clear().current_dir(sandbox.root());
            for (k, v) in &file.env {
                cmd.env(k, v);
            }
            cmd.env("PATH", format!("{}:{file_path}", bin_dir().display()))
                .env("HOME", "/root")
                .env("LOGNAME", &job.user)
                .env("BK_LOCK_DIR", sandbox.path("locks"));
            let run = run_cmd(cmd, "");
            assert_eq!(
                run.code, 0,
                "{at}: `{command}` failed\nstdout: {}\nstderr: {}",
                run.stdout, run.stderr
            );
            // cron mails any output: a good run must print nothing.
            assert!(
                run.stdout.is_empty() && run.stderr.is_empty(),
                "{at}: a successful run would send cron mail\nstdout: {}\nstderr: {}",
                run.stdout,
                run.stderr
            );
            let manifests: Vec<PathBuf> = bk_tests::files_below(&store)
                .into_iter()
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            assert_eq!(
                manifests.len(),
                1,
                "{at}: one manifest expected in the store, found {manifests:?}"
            );
            let text = fs::read_to_string(&manifests[0]).unwrap();
            let Ok(Record::Artifact(a)) = parse_line(text.trim(), "manifest") else {
                panic!("{at}: {} is not an artifact manifest: {text}", manifests[0].display())
            };
            let named = words(&job.command)
                .windows(2)
                .find(|w| w[0] == "--name")
                .map(|w| w[1].clone());
            if let Some(n) = named {
                assert_eq!(a.name, n, "{at}");
            }
            assert!(Path::new(&a.location).is_file(), "{at}: {} missing", a.location);
            let scratch = sandbox.path("scratch");
            assert!(
                !scratch.exists() || bk_tests::files_below(&scratch).is_empty(),
                "{at}: left in the scratch directory: {:?}",
                bk_tests::files_below(&scratch)
            );
            assert!(
                a.counts.values().sum::<u64>() > 0,
                "{at}: an empty backup: {:?}",
                a.counts
            );
        }
    }
}
