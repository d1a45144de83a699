//! The sqlite engine through the real binaries: exact round trips, a consistent snapshot
//! while another process writes, and every failure leaving nothing behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bk_core::record::Artifact;
use bk_tests::{artifact_line, files_below, run_cmd, Sandbox};
use rusqlite::Connection;
use sha2::{Digest, Sha256};

fn create_sample(path: &Path, journal: &str) {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", journal).unwrap();
    conn.execute_batch(
        "CREATE TABLE people(id INTEGER PRIMARY KEY, name TEXT, note TEXT, photo BLOB, score REAL);
         CREATE TABLE empty(x);
         CREATE TABLE \"odd \"\"name\"\"\"(v);
         CREATE VIEW named AS SELECT name FROM people WHERE name IS NOT NULL;
         CREATE INDEX people_name ON people(name);
         CREATE TRIGGER touch AFTER INSERT ON people BEGIN UPDATE people SET score = 1.5 WHERE id = new.id AND score IS NULL; END;",
    )
    .unwrap();
    let every_byte: Vec<u8> = (0..=255u8).collect();
    let tx = conn.unchecked_transaction().unwrap();
    tx.execute(
        "INSERT INTO people(name, note, photo) VALUES (NULL, '', ?1)",
        [&every_byte],
    )
    .unwrap();
    tx.execute(
        "INSERT INTO people(name, note, photo) VALUES ('🦀 Ünïcødé', 'x', zeroblob(0))",
        [],
    )
    .unwrap();
    tx.execute(
        "INSERT INTO people(name, note) VALUES ('long', ?1)",
        [&"y".repeat(300_000)],
    )
    .unwrap();
    for i in 0..5000 {
        tx.execute(
            "INSERT INTO people(name, note, photo, score) VALUES (?1, 'n', randomblob(100), ?2)",
            rusqlite::params![format!("p{i}"), i as f64 / 3.0],
        )
        .unwrap();
    }
    tx.execute("INSERT INTO \"odd \"\"name\"\"\" VALUES (1), (2)", [])
        .unwrap();
    tx.commit().unwrap();
}

/// Rows per table and a hash over every value of every row, in rowid order.
fn content(path: &Path) -> (Vec<(String, u64)>, String) {
    let conn = Connection::open(path).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type='table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut sha = Sha256::new();
    let mut counts = Vec::new();
    for t in tables {
        let q = format!("SELECT * FROM \"{}\" ORDER BY rowid", t.replace('"', "\"\""));
        let mut stmt = conn.prepare(&q).unwrap();
        let columns = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        let mut n = 0;
        while let Some(row) = rows.next().unwrap() {
            for c in 0..columns {
                sha.update(format!("{:?}", row.get_ref(c).unwrap()).as_bytes());
            }
            n += 1;
        }
        counts.push((t, n));
    }
    let schema: Vec<String> = conn
        .prepare("SELECT sql FROM sqlite_schema ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get::<_, Option<String>>(0).map(|s| s.unwrap_or_default()))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    sha.update(schema.join(";").as_bytes());
    (counts, hex::encode(sha.finalize()))
}

#[test]
fn round_trip_is_exact_in_both_journal_modes() {
    for journal in ["wal", "delete"] {
        let (sb, db, artifact) = dumped_sample(journal);
        assert_eq!(artifact.name, "sqlite-app");
        assert_eq!(artifact.engine, "sqlite");
        assert_eq!(artifact.format, "sqlite");
        assert!(artifact.file.ends_with(".sqlite.zst"), "{}", artifact.file);
        assert_eq!(artifact.counts["people"], 5003);
        assert_eq!(artifact.counts["empty"], 0);
        assert_eq!(artifact.counts["odd \"name\""], 2);
        assert_eq!(artifact.source.path.as_deref(), db.to_str());

        let listed = sb.run("bk-ls", &[&sb.store(), "--latest"]).ok();
        let target = sb.path("restored/app.db");
        let restored = sb
            .run_with_stdin("bk-restore", &["--to", target.to_str().unwrap()], &listed.stdout)
            .ok()
            .restored();
        assert_eq!(restored.counts, artifact.counts);
        assert!(restored.complete);
        assert_eq!(content(&target), content(&db), "{journal}");
    }
}

/// A new sandbox with the sample database `<sandbox>/app.db` in `journal` mode, and its backup
/// into the sandbox's store.
fn dumped_sample(journal: &str) -> (Sandbox, PathBuf, Artifact) {
    let sb = Sandbox::new();
    let db = sb.path("app.db");
    create_sample(&db, journal);
    let artifact = sb.dump(&["sqlite", db.to_str().unwrap()]);
    (sb, db, artifact)
}

#[test]
fn standard_tools_read_the_artifact() {
    let (sb, db, artifact) = dumped_sample("wal");
    let plain = sb.path("plain.db");
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        &format!(
            "zstd -dc '{}' > '{}' && sqlite3 '{}' 'PRAGMA integrity_check'",
            artifact.location,
            plain.display(),
            plain.display()
        ),
    ]);
    let run = run_cmd(cmd, "").ok();
    assert_eq!(run.stdout.trim(), "ok");
    assert_eq!(content(&plain), content(&db));
}

#[test]
fn snapshot_is_consistent_while_another_process_writes() {
    for journal in ["wal", "delete"] {
        let sb = Sandbox::new();
        let db = sb.path("busy.db");
        {
            let conn = Connection::open(&db).unwrap();
            conn.pragma_update(None, "journal_mode", journal).unwrap();
            conn.execute_batch("CREATE TABLE a(x); CREATE TABLE b(x);").unwrap();
        }
        // Every transaction adds two rows to a and one to b: any consistent snapshot has
        // count(a) == 2 * count(b).
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (stop, db) = (stop.clone(), db.clone());
            std::thread::spawn(move || {
                let conn = Connection::open(&db).unwrap();
                conn.busy_timeout(Duration::from_secs(30)).unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    conn.execute_batch("BEGIN IMMEDIATE; INSERT INTO a VALUES (randomblob(500)); INSERT INTO a VALUES (1); INSERT INTO b VALUES (randomblob(2000)); COMMIT;").unwrap();
                    n += 1;
                }
                n
            })
        };
        while Connection::open(&db)
            .unwrap()
            .query_row("SELECT count(*) FROM b", [], |r| r.get::<_, i64>(0))
            .unwrap()
            < 200
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut artifacts = Vec::new();
        for _ in 0..3 {
            artifacts.push(sb.dump(&["sqlite", db.to_str().unwrap(), "--busy-timeout", "30"]));
        }
        stop.store(true, Ordering::Relaxed);
        let transactions = writer.join().unwrap();
        assert!(transactions > 0);
        for (i, artifact) in artifacts.iter().enumerate() {
            let (a, b) = (artifact.counts["a"], artifact.counts["b"]);
            assert_eq!(a, 2 * b, "{journal}: the manifest's counts are one snapshot");
            let target = sb.path(&format!("r{i}.db"));
            let line = artifact_line(artifact);
            let restored = sb
                .run_with_stdin("bk-restore", &["--to", target.to_str().unwrap()], &line)
                .ok()
                .restored();
            assert_eq!(
                restored.counts, artifact.counts,
                "{journal}: the restore holds exactly the snapshot"
            );
        }
    }
}

#[test]
fn a_locked_database_fails_with_75_and_leaves_nothing() {
    let sb = Sandbox::new();
    let db = sb.path("locked.db");
    create_sample(&db, "delete");
    let holder = Connection::open(&db).unwrap();
    holder
        .execute_batch("BEGIN EXCLUSIVE; INSERT INTO empty VALUES (1);")
        .unwrap();
    let run = sb
        .run(
            "bk-dump",
            &[
                "sqlite",
                db.to_str().unwrap(),
                "--busy-timeout",
                "1",
                "--to",
                &sb.store(),
            ],
        )
        .code(75);
    let e = run.error();
    assert_eq!(e.name.as_deref(), Some("sqlite-locked"));
    assert!(e.message.contains("locked"), "{}", e.message);
    assert_eq!(files_below(&sb.path("store")), Vec::<std::path::PathBuf>::new());
    holder.execute_batch("ROLLBACK").unwrap();
}

#[test]
fn a_corrupt_or_missing_database_is_refused() {
    let sb = Sandbox::new();
    let junk = sb.path("junk.db");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    let run = sb
        .run("bk-dump", &["sqlite", junk.to_str().unwrap(), "--to", &sb.store()])
        .code(65);
    assert!(run.error().message.contains("not a database"), "{}", run.stderr);
    assert!(files_below(&sb.path("store")).is_empty());

    let run = sb
        .run("bk-dump", &["sqlite", "/nonexistent/x.db", "--to", &sb.store()])
        .code(66);
    assert!(run.error().message.contains("/nonexistent/x.db"));
    let run = sb
        .run("bk-dump", &["sqlite", sb.root().to_str().unwrap(), "--to", &sb.store()])
        .code(66);
    assert!(run.error().message.contains("is not a file"));
}

#[test]
fn restore_refuses_an_existing_file_unless_replace() {
    let (sb, db, artifact) = dumped_sample("wal");
    let line = artifact_line(&artifact);
    let target = sb.path("live.db");
    std::fs::write(&target, "precious").unwrap();
    std::fs::write(sb.path("live.db-wal"), "stale wal of the old database").unwrap();
    let run = sb
        .run_with_stdin("bk-restore", &["--to", target.to_str().unwrap()], &line)
        .code(73);
    assert!(run.error().message.contains("--replace"));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    sb.run_with_stdin("bk-restore", &["--to", target.to_str().unwrap(), "--replace"], &line)
        .ok();
    assert!(
        !sb.path("live.db-wal").exists()
            || std::fs::read(sb.path("live.db-wal")).unwrap() != b"stale wal of the old database"
    );
    assert_eq!(content(&target), content(&db));
}

#[test]
fn a_manifest_count_that_lies_fails_the_restore_and_writes_nothing() {
    let (sb, _, mut artifact) = dumped_sample("wal");
    *artifact.counts.get_mut("people").unwrap() += 1;
    let line = artifact_line(&artifact);
    let target = sb.path("out/app.db");
    std::fs::create_dir(sb.path("out")).unwrap();
    let run = sb
        .run_with_stdin("bk-restore", &["--to", target.to_str().unwrap()], &line)
        .code(65);
    assert!(
        run.error().message.contains("people: 5004 rows expected, 5003 found"),
        "{}",
        run.stderr
    );
    assert!(files_below(&sb.path("out")).is_empty(), "nothing left at the target");
}

#[test]
fn replace_refuses_a_side_file_it_cannot_remove_and_removes_symlinks_not_their_targets() {
    let (sb, db, artifact) = dumped_sample("wal");
    let line = artifact_line(&artifact);
    let outside = sb.path("outside.txt");
    std::fs::write(&outside, "not the database's").unwrap();

    // (side file, what is made there, expected exit code)
    type Make = fn(&Path, &Path);
    let cases: [(&str, Make, i32); 3] = [
        (
            "-wal",
            |side, _| {
                std::fs::create_dir(side).unwrap();
                std::fs::write(side.join("inside"), "x").unwrap();
            },
            73,
        ),
        ("-journal", |side, _| std::fs::create_dir(side).unwrap(), 73),
        (
            "-wal",
            |side, outside| std::os::unix::fs::symlink(outside, side).unwrap(),
            0,
        ),
    ];
    for (suffix, make, code) in cases {
        let dir = sb.path(&format!("live{suffix}{code}"));
        std::fs::create_dir(&dir).unwrap();
        let target = dir.join("live.db");
        std::fs::write(&target, "precious").unwrap();
        std::fs::write(dir.join("live.db-shm"), "old shm").unwrap();
        let side = dir.join(format!("live.db{suffix}"));
        make(&side, &outside);
        let run = sb.run_with_stdin("bk-restore", &["--to", target.to_str().unwrap(), "--replace"], &line);
        if code == 0 {
            run.ok();
            assert!(
                std::fs::symlink_metadata(&side).is_err(),
                "the symlink {suffix} was removed"
            );
            assert_eq!(content(&target), content(&db));
        } else {
            let run = run.code(code);
            let message = run.error().message;
            assert!(
                message.contains(side.to_str().unwrap()) && message.contains("directory"),
                "{message}"
            );
            assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious", "{suffix}");
            assert!(side.is_dir(), "{suffix}");
            assert_eq!(
                std::fs::read_to_string(dir.join("live.db-shm")).unwrap(),
                "old shm",
                "a side file moved before the refusal is put back"
            );
        }
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("bk-restore"))
            .collect();
        left.sort();
        assert_eq!(left, Vec::<String>::new(), "no temporary file left ({suffix})");
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "not the database's");
    }
}

/// As on /tmp: a sticky directory where the restoring user may replace its own database but
/// not remove a `-wal` another user owns. The restore fails (77) before replacing anything.
#[test]
fn replace_refuses_a_side_file_it_has_no_permission_to_remove() {
    use std::os::unix::fs::{chown, PermissionsExt};
    if !bk_tests::have_root() {
        return;
    }
    const NOBODY: u32 = 65534;
    let (sb, _, artifact) = dumped_sample("wal");
    let line = artifact_line(&artifact);
    std::fs::set_permissions(sb.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = sb.path("store");
    let mut owned_by_nobody = files_below(&store);
    owned_by_nobody.extend([store.clone(), store.join("sqlite-app")]);
    std::fs::create_dir_all(sb.path("locks")).unwrap();
    owned_by_nobody.push(sb.path("locks"));
    let shared = sb.path("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let target = shared.join("live.db");
    std::fs::write(&target, "precious").unwrap();
    owned_by_nobody.push(target.clone());
    for p in &owned_by_nobody {
        chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let wal = shared.join("live.db-wal");
    std::fs::write(&wal, "root's wal").unwrap();

    let cmd = sb.cmd_via(
        &bk_tests::AS_NOBODY,
        "bk-restore",
        &["--to", target.to_str().unwrap(), "--replace"],
    );
    let run = run_cmd(cmd, &line).code(77);
    let message = run.error().message;
    assert!(
        message.contains(wal.to_str().unwrap()) && message.contains("not replaced"),
        "{message}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    assert_eq!(std::fs::read_to_string(&wal).unwrap(), "root's wal");
    assert_eq!(
        files_below(&shared),
        [target.clone(), wal.clone()],
        "no temporary file left"
    );
}
