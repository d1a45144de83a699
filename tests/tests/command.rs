//! The command engine through the real binaries: a program's stdout as the artifact, its
//! failures (exit status, signal, empty output, missing end marker) leaving nothing behind,
//! restores into a file, to stdout and into a program, pg_dumpall and psql as the programs,
//! and the memory of a large dump.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use bk_core::record::{Artifact, Record};
use bk_tests::{artifact_line, bin, files_below, pg_server, pg_unique_name, rewrite_artifact, run_cmd, s, Sandbox};
use serde_json::json;

/// A script whose output ends with its own completion line, as dump programs do.
const SCRIPT: &str = "printf 'alpha\\nbeta 50%%\\n'; printf 'gamma without newline\\n-- export complete\\n'";
const CONTENT: &str = "alpha\nbeta 50%\ngamma without newline\n-- export complete\n";

fn counts(bytes: u64, lines: u64) -> BTreeMap<String, u64> {
    BTreeMap::from([("bytes".to_string(), bytes), ("lines".to_string(), lines)])
}

/// `bk-dump command --name NAME ARGS... --to STORE -- PROGRAM...`, run in the sandbox.
fn dump(sb: &Sandbox, name: &str, args: &[&str], program: &[&str]) -> bk_tests::Run {
    let store = sb.store();
    let mut all = vec!["command", "--name", name];
    all.extend(args);
    all.extend(["--to", &store, "--"]);
    all.extend(program);
    sb.run("bk-dump", &all)
}

#[test]
fn a_script_is_backed_up_listed_verified_and_restored() {
    let sb = Sandbox::new();
    let a = dump(
        &sb,
        "export",
        &["--format", "txt", "--end-marker", "-- export complete"],
        &["sh", "-c", SCRIPT],
    )
    .ok()
    .artifact();
    assert_eq!((a.engine.as_str(), a.format.as_str()), ("command", "txt"));
    assert!(a.file.ends_with(".txt.zst"), "{}", a.file);
    assert_eq!(a.counts, counts(CONTENT.len() as u64, 4));
    assert_eq!(a.content_bytes, CONTENT.len() as u64);
    assert_eq!(a.source.command, ["sh", "-c", SCRIPT]);
    assert_eq!(a.source.end_marker.as_deref(), Some("-- export complete"));
    assert_eq!(a.tool.program, "sh");
    assert_eq!(
        bk_tests::unzstd(&a.location),
        CONTENT.as_bytes(),
        "zstd -dc gives the output back"
    );

    let listed = sb.run("bk-ls", &[&sb.store(), "--name", "export"]).ok().artifact();
    assert_eq!(listed, a);

    // Integrity: every check passes; the restore level has nothing to restore into.
    let verified = sb
        .run("bk-verify", &["--from", &sb.store(), "--scratch"])
        .ok()
        .records();
    let [Record::Verified(v)] = verified.as_slice() else {
        panic!("{verified:?}")
    };
    assert_eq!((&v["ok"], &v["level"]), (&json!(true), &json!("restore")));
    assert_eq!(v["checks"]["integrity"]["ok"], json!(true));
    assert_eq!(v["checks"]["restore"]["ok"], json!(true));
    assert!(v["checks"]["restore"]["skipped"].is_string(), "{v:?}");

    // Into a new file, mode 0600; an existing one only with --replace.
    let target = sb.path("out/export.txt");
    let restored = sb
        .run(
            "bk-restore",
            &["--from", &sb.store(), "--name", "export", "--to", s(&target)],
        )
        .ok()
        .restored();
    assert_eq!(restored.counts, a.counts);
    assert_eq!(restored.target["path"], json!(s(&target)));
    assert_eq!(fs::read_to_string(&target).unwrap(), CONTENT);
    assert_eq!(fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);
    fs::write(&target, "old").unwrap();
    let refused = sb.run(
        "bk-restore",
        &["--from", &sb.store(), "--name", "export", "--to", s(&target)],
    );
    refused.failed("an existing file", 73, &["exists", "--replace"]);
    assert_eq!(fs::read_to_string(&target).unwrap(), "old", "left as it was");
    sb.run(
        "bk-restore",
        &[
            "--from",
            &sb.store(),
            "--name",
            "export",
            "--to",
            s(&target),
            "--replace",
        ],
    )
    .ok();
    assert_eq!(fs::read_to_string(&target).unwrap(), CONTENT);
    assert_eq!(files_below(&sb.path("out")), [target.clone()], "no temporary file left");

    // To stdout: the content alone, from --from or from a record on stdin.
    let to_stdout = sb.run(
        "bk-restore",
        &["--from", &sb.store(), "--name", "export", "--to", "-", "-q"],
    );
    assert_eq!(
        (to_stdout.code, to_stdout.stdout.as_str(), to_stdout.stderr.as_str()),
        (0, CONTENT, "")
    );
    let piped = sb.run_with_stdin("bk-restore", &["--to", "-"], &artifact_line(&a));
    assert_eq!((piped.code, piped.stdout.as_str()), (0, CONTENT));
    assert!(piped.stderr.contains(&a.id), "the summary on stderr: {}", piped.stderr);
}

#[test]
fn binary_output_counts_bytes_only() {
    let sb = Sandbox::new();
    let a = dump(
        &sb,
        "blob",
        &["--no-count-lines", "--format", "bin", "--compress", "none"],
        &["head", "-c", "100000", "/dev/urandom"],
    )
    .ok()
    .artifact();
    assert_eq!(a.counts, BTreeMap::from([("bytes".to_string(), 100_000)]));
    assert!(a.file.ends_with(".bin"), "{}", a.file);
    let target = sb.path("blob.bin");
    sb.run(
        "bk-restore",
        &["--from", &sb.store(), "--name", "blob", "--to", s(&target)],
    )
    .ok();
    assert_eq!(fs::read(&target).unwrap(), fs::read(&a.location).unwrap());
}

/// Each way a program can fail: exit status 74 (69: no such program), an error record whose
/// message says why (the exit code, the signal), no artifact, and nothing in the store.
#[test]
fn failed_programs_leave_nothing_in_the_store() {
    let cases: [(&str, &[&str], &[&str], i32, &[&str]); 6] = [
        (
            "exit 3",
            &[],
            &["sh", "-c", "echo partial; echo 'pg_dump: error: gone' >&2; exit 3"],
            74,
            &["sh exited with 3", "gone"],
        ),
        (
            "killed",
            &[],
            &["sh", "-c", "echo partial; kill -9 $$"],
            74,
            &["sh was killed by signal 9 (SIGKILL)"],
        ),
        ("empty", &[], &["true"], 74, &["empty", "--allow-empty"]),
        (
            "no end marker",
            &["--end-marker", "-- done"],
            &["sh", "-c", "echo half of it"],
            74,
            &["does not end with", "-- done"],
        ),
        (
            "marker too early",
            &["--end-marker", "-- done"],
            &["sh", "-c", "echo '-- done'; head -c 5000 /dev/zero"],
            74,
            &["-- done"],
        ),
        ("no program", &[], &["bk-no-such-program"], 69, &["bk-no-such-program"]),
    ];
    for (case, args, program, code, says) in cases {
        let sb = Sandbox::new();
        let run = dump(&sb, "job", args, program);
        let e = run.failed(case, code, says);
        assert_eq!(e.name.as_deref(), Some("job"), "{case}");
        assert_eq!(
            files_below(&sb.path("store")),
            Vec::<std::path::PathBuf>::new(),
            "{case}: left in the store"
        );
    }
    // What the program says on stderr reaches bk's stderr as it is.
    let sb = Sandbox::new();
    let run = dump(&sb, "job", &[], &["sh", "-c", "echo 'a warning' >&2; echo data"]).ok();
    assert!(run.stderr.contains("a warning\n"), "{}", run.stderr);
    // An empty output is a backup when --allow-empty says so.
    let a = dump(&sb, "empty", &["--allow-empty"], &["true"]).ok().artifact();
    assert_eq!(a.counts, counts(0, 0));
}

#[test]
fn bad_command_lines_are_usage_errors() {
    let sb = Sandbox::new();
    let store = sb.store();
    let cases: [(&str, &[&str], &str); 5] = [
        ("no name", &["command", "--to", &store, "--", "true"], "--name"),
        ("no program", &["command", "--name", "x", "--to", &store], "PROGRAM"),
        (
            "capital format",
            &[
                "command", "--name", "x", "--format", "Raw", "--to", &store, "--", "true",
            ],
            "format",
        ),
        (
            "format with a slash",
            &[
                "command", "--name", "x", "--format", "a/b", "--to", &store, "--", "true",
            ],
            "format",
        ),
        (
            "empty end marker",
            &[
                "command",
                "--name",
                "x",
                "--end-marker",
                "",
                "--to",
                &store,
                "--",
                "true",
            ],
            "end marker",
        ),
    ];
    for (case, args, says) in cases {
        let run = sb.run("bk-dump", args);
        run.failed(case, 64, &[says]);
    }
    assert!(files_below(&sb.path("store")).is_empty());
}

/// Secrets reach the program through the environment, and never a record or a message; a
/// URL's password on the command line is redacted in the manifest.
#[test]
fn the_environment_reaches_the_program_and_secrets_stay_out_of_the_records() {
    let sb = Sandbox::new();
    let secret = "s3cr3t-token-for-the-test";
    let mut cmd = sb.cmd(
        "bk-dump",
        &[
            "command",
            "--name",
            "envjob",
            "--to",
            &sb.store(),
            "--",
            "sh",
            "-c",
            "echo \"token=$BK_TEST_TOKEN\"",
            "mongodb://user:hunter2@db1/x",
        ],
    );
    cmd.env("BK_TEST_TOKEN", secret);
    let run = run_cmd(cmd, "").ok();
    run.assert_hides("the dump", &[secret, "hunter2"]);
    let a = run.artifact();
    assert_eq!(a.source.command[3], "mongodb://user:(redacted)@db1/x");
    let manifest = fs::read_to_string(sb.path(&format!("store/envjob/{}.json", a.id))).unwrap();
    assert!(
        !manifest.contains(secret) && !manifest.contains("hunter2"),
        "{manifest}"
    );
    let restored = sb
        .run(
            "bk-restore",
            &["--from", &sb.store(), "--name", "envjob", "--to", "-", "-q"],
        )
        .ok();
    assert_eq!(restored.stdout, format!("token={secret}\n"));
}

/// A stored artifact whose content lost its end marker, or whose counts differ, fails
/// bk-verify and bk-restore (65), and a restore into a file then leaves nothing.
#[test]
fn verify_and_restore_check_the_end_marker_and_the_counts() {
    let sb = Sandbox::new();
    let a = dump(
        &sb,
        "export",
        &["--end-marker", "-- export complete"],
        &["sh", "-c", SCRIPT],
    )
    .ok()
    .artifact();
    let cases: [(&str, &str, &[&str]); 2] = [
        (
            "cut before its marker",
            "alpha\nbeta 50%\ngamma without newline\n",
            &["does not end with"],
        ),
        (
            "a line more",
            "alpha\nbeta\n50%\ngamma without newline\n-- export complete\n",
            &["lines"],
        ),
    ];
    for (case, content, says) in cases {
        let changed = rewrite_artifact(&a, content.as_bytes());
        let line = artifact_line(&changed);
        let run = sb.run_with_stdin("bk-verify", &[], &line);
        run.failed(case, 65, says);
        let target = sb.path("restored.txt");
        let run = sb.run_with_stdin("bk-restore", &["--to", s(&target)], &line);
        run.failed(case, 65, says);
        assert!(
            !target.exists(),
            "{case}: a restore that fails a check publishes nothing"
        );
        assert_eq!(
            files_below(sb.root())
                .iter()
                .filter(|p| p.to_string_lossy().contains("bk-restore"))
                .count(),
            0
        );
    }
}

/// `pg_dumpall --globals-only` as the program, checked by its own completion line; a
/// pg_dump restored by bk-restore --to-command into psql; psql and a script that fail.
#[test]
fn postgres_programs_dump_and_psql_restores() {
    let Some(pg) = pg_server() else { return };
    let sb = Sandbox::new();
    let pgpass = pg.write_pgpass(&sb, "pgpass");
    let role = pg_unique_name("bkcmd_role_");
    pg.execute("postgres", &format!("CREATE ROLE {role} NOLOGIN"));
    let _drop_role = DropRole(pg.clone(), role.clone());
    let conn: Vec<String> = pg.conn_args();
    let with_conn = |program: &str, rest: &[&str]| -> Vec<String> {
        let mut words = vec![program.to_string()];
        words.extend(conn.iter().cloned());
        words.extend(rest.iter().map(|w| w.to_string()));
        words
    };
    let run_dump = |name: &str, args: &[&str], program: &[String]| {
        let mut all: Vec<&str> = vec!["command", "--name", name];
        all.extend(args);
        let store = sb.store();
        all.extend(["--to", &store, "--"]);
        all.extend(program.iter().map(String::as_str));
        let mut cmd = sb.cmd("bk-dump", &all);
        cmd.env("PGPASSFILE", &pgpass);
        run_cmd(cmd, "")
    };

    let globals = with_conn("pg_dumpall", &["--globals-only", "--no-role-passwords"]);
    let a = run_dump(
        "pg-globals",
        &[
            "--format",
            "sql",
            "--end-marker",
            "PostgreSQL database cluster dump complete",
        ],
        &globals,
    )
    .ok()
    .artifact();
    let content = String::from_utf8(bk_tests::unzstd(&a.location)).unwrap();
    assert!(content.contains(&format!("CREATE ROLE {role};")), "{content}");
    assert_eq!(a.counts["lines"], content.matches('\n').count() as u64);
    assert_eq!(a.counts["bytes"], content.len() as u64);
    assert_eq!(a.tool.program, "pg_dumpall");

    // A database, dumped by pg_dump as the program and restored through psql.
    let source = pg.create_database(&pg_unique_name("bkcmd_src_"));
    pg.execute(
        &source.name,
        "CREATE TABLE t (id INT PRIMARY KEY, v TEXT); INSERT INTO t SELECT i, 'row ' || i FROM generate_series(1, 500) i;",
    );
    let dumped = with_conn("pg_dump", &["--format", "plain", "--no-owner", &source.name]);
    run_dump(
        "pg-src",
        &["--format", "sql", "--end-marker", "PostgreSQL database dump complete"],
        &dumped,
    )
    .ok();
    let target = pg.create_database(&pg_unique_name("bkcmd_dst_"));
    let psql = with_conn("psql", &["--quiet", "-v", "ON_ERROR_STOP=1", "--dbname", &target.name]);
    let store = sb.store();
    let mut restore_args = vec!["--from", &store, "--name", "pg-src", "--to-command", "--"];
    restore_args.extend(psql.iter().map(String::as_str));
    let mut cmd = sb.cmd("bk-restore", &restore_args);
    cmd.env("PGPASSFILE", &pgpass);
    let restored = run_cmd(cmd, "").ok().restored();
    assert_eq!(restored.target["command"][0], json!("psql"));
    let rows = |db: &str| pg.strings(db, "SELECT id || ':' || v FROM t ORDER BY id");
    assert_eq!(rows(&target.name), rows(&source.name));
    assert_eq!(rows(&target.name).len(), 500);

    // psql that fails (ON_ERROR_STOP: the table exists now), and a script that exits 5.
    let failing: [(&str, Vec<String>, &[&str]); 2] = [
        (
            "psql into a database that has the table",
            psql.clone(),
            &["psql exited with 3"],
        ),
        (
            "a script",
            vec![
                "sh".into(),
                "-c".into(),
                "cat >/dev/null; echo 'no space' >&2; exit 5".into(),
            ],
            &["sh exited with 5", "no space"],
        ),
    ];
    for (case, program, says) in failing {
        let mut args = vec!["--from", &store, "--name", "pg-src", "--to-command", "--"];
        args.extend(program.iter().map(String::as_str));
        let mut cmd = sb.cmd("bk-restore", &args);
        cmd.env("PGPASSFILE", &pgpass);
        let run = run_cmd(cmd, "");
        run.failed(case, 74, says);
        assert!(!run.stdout.contains("\"restored\""), "{case}: {}", run.stdout);
    }
}

/// Drops a role of a test when it goes.
struct DropRole(bk_tests::PgServer, String);

impl Drop for DropRole {
    fn drop(&mut self) {
        let mut client = self.0.client("postgres");
        let _ = client.batch_execute(&format!("DROP ROLE IF EXISTS {}", self.1));
    }
}

/// A large output is streamed: the dump's peak memory stays far below the output's size.
#[test]
fn a_large_output_is_dumped_in_bounded_memory() {
    let sb = Sandbox::new();
    let rss = sb.path("rss");
    let size = 1u64 << 30;
    let mut cmd = Command::new("/usr/bin/time");
    cmd.args(["-f", "%M", "-o", s(&rss)])
        .arg(bin("bk-dump"))
        .args([
            "command",
            "--name",
            "big",
            "--to",
            &sb.store(),
            "-q",
            "--",
            "head",
            "-c",
            &size.to_string(),
            "/dev/zero",
        ])
        .current_dir(sb.root())
        .env("BK_LOCK_DIR", sb.path("locks"));
    let a: Artifact = run_cmd(cmd, "").ok().artifact();
    assert_eq!(a.counts, counts(size, 0));
    let kib: u64 = fs::read_to_string(&rss).unwrap().trim().parse().unwrap();
    assert!(kib < 64 * 1024, "peak RSS {kib} KiB for a {size}-byte output");
}

/// SIGTERM to bk-dump while its program runs: the program is stopped too, the temporary
/// file removed, and the error record says so (exit 143).
#[test]
fn sigterm_stops_the_program_and_removes_the_temporary_file() {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let sb = Sandbox::new();
    let pid_file = sb.path("program.pid");
    let script = format!("echo $$ > {}; echo data; exec sleep 300", s(&pid_file));
    let store = sb.store();
    let mut child = sb
        .cmd(
            "bk-dump",
            &["command", "--name", "slow", "--to", &store, "--", "sh", "-c", &script],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let program = loop {
        if let Some(pid) = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            break nix::unistd::Pid::from_raw(pid);
        }
        assert!(Instant::now() < deadline, "the program did not start");
        std::thread::sleep(Duration::from_millis(10));
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "128 + SIGTERM");
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(
        stdout.contains(r#""type":"error""#) && stdout.contains(r#""code":143"#),
        "{stdout}"
    );
    assert_eq!(
        files_below(&sb.path("store")),
        Vec::<std::path::PathBuf>::new(),
        "the temporary file is gone"
    );
    // The program was stopped with bk-dump (an orphan is reaped by init soon after).
    while nix::sys::signal::kill(program, None).is_ok() {
        assert!(Instant::now() < deadline, "the program outlived bk-dump");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `--to -` and `--to-command` are for command backups; with `--to -` stdout stays the
/// content's alone, even for an upstream failure (exit 1, nothing on stdout).
#[test]
fn stdout_and_program_targets_are_for_command_backups_only() {
    let sb = Sandbox::new();
    fs::create_dir(sb.path("src")).unwrap();
    fs::write(sb.path("src/a"), "a\n").unwrap();
    let files = sb.dump(&["files", "src", "--name", "tree"]);
    let line = artifact_line(&files);
    let run = sb.run_with_stdin("bk-restore", &["--to-command", "--", "cat"], &line);
    run.failed(
        "--to-command of a files backup",
        64,
        &["--to-command is for command backups"],
    );
    let run = sb.run_with_stdin("bk-restore", &["--to", "-"], &line);
    assert_eq!((run.code, run.stdout.as_str()), (64, ""), "{}", run.stderr);
    assert!(run.stderr.contains("--to - is for command backups"), "{}", run.stderr);
    let upstream = r#"{"bk":1,"type":"error","tool":"bk-dump","name":"x","code":74,"message":"sh exited with 3"}"#;
    let run = sb.run_with_stdin("bk-restore", &["--to", "-"], &format!("{upstream}\n"));
    assert_eq!((run.code, run.stdout.as_str()), (1, ""), "{}", run.stderr);
}
