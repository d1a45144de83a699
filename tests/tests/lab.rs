//! docs/lab.md, run as a student runs it: its ```sh blocks in order, against the real
//! MariaDB server and the built tools, so the lab never goes stale. Only the lab's setup is
//! substituted (the lab directory, the database's name, the option file's `[client]`
//! section); each block must end with the exit status its last line states (`# exit: N`,
//! else 0), and the outcomes the lab teaches are checked: the corrupted artifact fails
//! bk-verify with 65, the killed pipeline ends non-zero and leaves no backup, the dropped
//! database comes back with the same rows, a failed `--replace` leaves the live rows as they
//! were.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bk_core::record::{parse_line, Artifact, ErrorRecord, Record};
use bk_tests::{bin_dir, mysql_server, mysql_unique_name, MysqlServer, Sandbox};

/// What docs/lab.md's setup block says, replaced by the test's values.
const LAB_DIR: &str = "export LAB=/tmp/bk-lab\n";
const DB_NAME: &str = " DB=bk_lab_shop\n";
const CLIENT_SECTION: &str = "[client]\nuser=root\npassword=change-me\nhost=127.0.0.1\nport=3306\n";

/// Longest a block may take (the setup inserts 131072 rows) before the test gives up.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(300);

/// One ```sh block of the lab: its text, its first line's number in the file, and the exit
/// status its last line states.
struct Block {
    script: String,
    line: usize,
    exit: i32,
}

/// The ```sh blocks of the lab, in order, each with the exit status its last line states.
fn lab_blocks(text: &str) -> Vec<Block> {
    bk_tests::sh_blocks(text)
        .into_iter()
        .map(|(line, script)| {
            let last = script.lines().last().unwrap_or_default();
            let exit = match last.strip_prefix("# exit: ") {
                Some(n) => n.parse().unwrap_or_else(|_| panic!("docs/lab.md:{line}: `{last}`")),
                None => 0,
            };
            Block { script, line, exit }
        })
        .collect()
}

/// `text` with `from` (which must occur exactly once: a lab that changed its setup fails
/// here, not later) replaced by `to`.
fn substitute(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "docs/lab.md should contain `{from:?}` once: the test substitutes it"
    );
    text.replacen(from, to, 1)
}

/// What a block printed and how it ended.
struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// The bk records among the lines printed.
    fn records(&self) -> Vec<Record> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| parse_line(l, "a block's stdout").unwrap_or_else(|e| panic!("{}: {l}", e.message)))
            .collect()
    }
}

/// Runs one block with `sh -e`, the built tools first in PATH. The variables of the setup
/// block are carried to the later ones through `env`, as a student's shell keeps them.
fn run_block(sb: &Sandbox, block: &Block, env: &Path, setup: bool) -> Outcome {
    let script = if setup {
        format!("{}export -p > '{}'\n", block.script, env.display())
    } else {
        format!(". '{}'\n{}", env.display(), block.script)
    };
    let path = format!("{}:{}", bin_dir().display(), std::env::var("PATH").unwrap_or_default());
    let mut child = Command::new("/bin/sh")
        .args(["-e", "-c", &script])
        .current_dir(sb.root())
        .env("PATH", path)
        .env("BK_LOCK_DIR", sb.path("locks"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning /bin/sh");
    let started = Instant::now();
    while child.try_wait().expect("waiting for /bin/sh").is_none() {
        if started.elapsed() > BLOCK_TIMEOUT {
            let _ = child.kill();
            panic!("docs/lab.md:{}: the block did not end in {BLOCK_TIMEOUT:?}", block.line);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("the block's output");
    let outcome = Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert_eq!(
        outcome.code, block.exit,
        "docs/lab.md:{}: the block should end with exit status {}\n{}\nstdout: {}\nstderr: {}",
        block.line, block.exit, block.script, outcome.stdout, outcome.stderr
    );
    outcome
}

/// The one error record a block printed.
fn error_record(outcome: &Outcome, at: &str) -> ErrorRecord {
    let mut errors: Vec<ErrorRecord> = outcome
        .records()
        .into_iter()
        .filter_map(|r| if let Record::Error(e) = r { Some(e) } else { None })
        .collect();
    assert_eq!(errors.len(), 1, "{at}: one error record\n{}", outcome.stdout);
    errors.remove(0)
}

/// The backups of `name` bk-ls lists in `store`.
fn backups(sb: &Sandbox, store: &Path, name: &str) -> Vec<Artifact> {
    sb.run("bk-ls", &[store.to_str().unwrap(), "--name", name])
        .ok()
        .artifacts()
}

/// Every row of the lab's table, as the server sees it: count and checksum.
fn rows(server: &MysqlServer, admin: &Path, db: &str) -> String {
    server.sql(
        admin,
        &format!("SELECT COUNT(*) FROM `{db}`.orders; CHECKSUM TABLE `{db}`.orders EXTENDED"),
    )
}

#[test]
fn the_lab_runs_as_written() {
    let Some(server) = mysql_server() else { return };
    let sb = Sandbox::new();
    let admin = server.option_file(&sb, "admin.cnf");
    let client_section = fs::read_to_string(&admin).expect("the option file");
    let db = mysql_unique_name("bk_lab_");
    let _drop_db = server.database(&db);
    let lab = sb.path("lab");
    let store = lab.join("store");
    let name = format!("mysql-{db}");

    let text = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/lab.md")).expect("docs/lab.md");
    let text = substitute(&text, LAB_DIR, &format!("export LAB={}\n", lab.display()));
    let text = substitute(&text, DB_NAME, &format!(" DB={db}\n"));
    let text = substitute(&text, CLIENT_SECTION, &client_section);
    let blocks = lab_blocks(&text);
    assert!(blocks.len() >= 8, "docs/lab.md has only {} ```sh blocks", blocks.len());

    let env = sb.path("lab.env");
    let (mut corrupted, mut killed, mut restored, mut replaced) = (false, false, false, false);
    let mut good: Option<Artifact> = None;
    for (i, block) in blocks.iter().enumerate() {
        let is = |s: &str| block.script.contains(s);
        let before = if is("bk-restore") {
            Some(rows(&server, &admin, &db))
        } else {
            None
        };
        let outcome = run_block(&sb, block, &env, i == 0);
        let at = format!("docs/lab.md:{}", block.line);

        if is("bk-dump mysql") && good.is_none() {
            let made = backups(&sb, &store, &name);
            assert_eq!(made.len(), 1, "{at}: one backup of the database");
            good = made.into_iter().next();
        }
        if is("dd of=") && is("bk-verify") {
            assert_eq!(block.exit, 65, "{at}: a corrupt artifact is bad data");
            let error = error_record(&outcome, &at);
            assert_eq!((error.name.as_deref(), error.code), (Some("lab-files"), 65), "{at}");
            assert!(error.message.contains("sha256 mismatch"), "{at}: {}", error.message);
            corrupted = true;
        }
        if is("kill -9") {
            assert_ne!(block.exit, 0, "{at}: a killed pipeline ends non-zero");
            assert!(
                outcome.stderr.contains("began but never ended"),
                "{at}: bk-verify says its upstream died\nstderr: {}",
                outcome.stderr
            );
            let good = good.as_ref().expect("a backup of the database before the kill");
            let listed = backups(&sb, &store, &name);
            assert_eq!(
                listed.iter().map(|a| &a.id).collect::<Vec<_>>(),
                [&good.id],
                "{at}: the store holds the last good backup only"
            );
            killed = true;
        }
        if is("--replace") {
            assert_eq!(block.exit, 65, "{at}: a damaged backup is bad data");
            let error = error_record(&outcome, &at);
            assert_eq!((error.name, error.code), (Some(name.clone()), 65), "{at}");
            let after = rows(&server, &admin, &db);
            assert_eq!(
                after,
                before.expect("rows"),
                "{at}: a failed --replace leaves the live database as it was"
            );
            replaced = true;
        } else if let Some(before) = before {
            assert_eq!(
                rows(&server, &admin, &db),
                before,
                "{at}: the dropped database comes back as it was"
            );
            assert!(
                outcome.stdout.contains("\n131072\n"),
                "{at}: the count shown\n{}",
                outcome.stdout
            );
            restored = true;
        }
    }
    assert!(
        corrupted && killed && restored && replaced,
        "docs/lab.md should corrupt an artifact ({corrupted}), kill a dump ({killed}), restore a dropped database \
         ({restored}) and fail a --replace ({replaced})"
    );
    assert!(!lab.exists(), "the lab's last block cleans up");
}
