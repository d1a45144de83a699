//! bk-verify through the real binaries, against the real test servers: good backups of
//! every engine verify at both levels (integrity, and a restore into a scratch target),
//! corruptions of every kind are caught with exit 65 and a message naming the problem, the
//! scratch target is gone however the run ends (success, mismatch, SIGTERM), leftovers of
//! killed runs are swept, the source is never touched, and an unreachable scratch server is
//! exit 69.
//!
//! Each test works in databases of its own, named uniquely and dropped at the end. Scratch
//! databases are all named `bk_verify_*`, whoever made them: the tests that look at them
//! (or make them) take the server's scratch lock, so that they see only their own.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bk_core::record::{Artifact, Record};
use bk_tests::{
    age_keygen, artifact_line, files_below, free_port, have_root, mongo_server, mysql_ident, mysql_server,
    mysql_string, mysql_unique_name, pg_ident, pg_server, pg_unique_name, run_cmd, s, spawn_with_stdin, unique_name,
    unzstd, write_files, MysqlGuard, MysqlServer, PgDatabase, PgServer, Run, Sandbox, AS_NOBODY,
};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

type Verified = Map<String, Value>;

static MYSQL_SCRATCH: Mutex<()> = Mutex::new(());
static PG_SCRATCH: Mutex<()> = Mutex::new(());

/// Held while a test makes or looks at `bk_verify_*` databases on a server.
fn scratch_lock(lock: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Every verified record printed.
fn verified_all(run: &Run) -> Vec<Verified> {
    run.records()
        .into_iter()
        .filter_map(|r| if let Record::Verified(v) = r { Some(v) } else { None })
        .collect()
}

/// The one verified record printed.
#[track_caller]
fn verified(run: &Run) -> Verified {
    let mut all = verified_all(run);
    assert_eq!(
        all.len(),
        1,
        "one verified record expected\nstdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    all.remove(0)
}

/// A verified record that says the artifact is good at `level`.
#[track_caller]
fn assert_good(v: &Verified, a: &Artifact, level: &str) {
    let text = Value::Object(v.clone()).to_string();
    assert_eq!(v["id"], json!(a.id), "{text}");
    assert_eq!(v["name"], json!(a.name), "{text}");
    assert_eq!(v["location"], json!(a.location), "{text}");
    assert_eq!(v["ok"], json!(true), "{text}");
    assert_eq!(v["level"], json!(level), "{text}");
    assert_eq!(v["mismatches"], json!([]), "{text}");
    let integrity = &v["checks"]["integrity"];
    assert_eq!(integrity["ok"], json!(true), "{text}");
    assert!(integrity["seconds"].as_f64().is_some_and(|s| s >= 0.0), "{text}");
    let restore = &v["checks"]["restore"];
    if level == "restore" {
        assert_eq!(restore["ok"], json!(true), "{text}");
        assert!(restore["seconds"].as_f64().is_some(), "{text}");
        assert_eq!(
            restore["compared"],
            json!(a.counts.len()),
            "every table compared: {text}"
        );
    } else {
        assert!(restore.is_null(), "no restore at the integrity level: {text}");
    }
}

/// A run that caught a bad backup: exit 65, a verified record with ok false, and an error
/// record whose message holds every one of `words`. Returns the verified record.
#[track_caller]
fn assert_caught(run: &Run, a: &Artifact, words: &[&str]) -> Verified {
    assert_eq!(run.code, 65, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    let v = verified(run);
    assert_eq!(v["id"], json!(a.id));
    assert_eq!(v["ok"], json!(false), "{}", run.stdout);
    let e = run.error();
    assert_eq!(e.name.as_deref(), Some(a.name.as_str()));
    for w in words {
        assert!(e.message.contains(w), "the message should name {w:?}: {}", e.message);
    }
    v
}

/// The mismatches of a verified record, as (table, expected, found).
fn mismatches(v: &Verified) -> Vec<(String, Option<u64>, Option<u64>)> {
    v["mismatches"]
        .as_array()
        .expect("mismatches is a list")
        .iter()
        .map(|m| {
            (
                m["table"].as_str().expect("a table name").to_string(),
                m["expected"].as_u64(),
                m["found"].as_u64(),
            )
        })
        .collect()
}

/// Flips one bit in the middle of a file.
fn flip_middle_bit(path: &str) {
    let mut bytes = fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x08;
    fs::write(path, &bytes).unwrap();
}

/// `zstd -c` of `data`.
fn zstd(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("zstd")
        .args(["-q", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running zstd");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Replaces an artifact's content with `content` (compressed again with the zstd program)
/// and returns its record with sha256, bytes and content_bytes rewritten to match: only the
/// content itself can tell that something is wrong.
fn with_content(a: &Artifact, content: &[u8]) -> Artifact {
    assert_eq!(a.compression, bk_core::codec::Compression::Zstd);
    let stored = zstd(content);
    fs::write(&a.location, &stored).unwrap();
    let mut b = a.clone();
    b.sha256 = hex::encode(Sha256::digest(&stored));
    b.bytes = stored.len() as u64;
    b.content_bytes = content.len() as u64;
    b
}

/// The content of a text dump with the lines `drop` picks removed and `extra` put before
/// the first line `before` picks.
fn edit_lines(text: &str, mut drop: impl FnMut(&str) -> bool, before: impl Fn(&str) -> bool, extra: &str) -> Vec<u8> {
    let mut out = String::new();
    let mut inserted = extra.is_empty();
    for l in text.split_inclusive('\n') {
        if !inserted && before(l) {
            out.push_str(extra);
            inserted = true;
        }
        if !drop(l) {
            out.push_str(l);
        }
    }
    assert!(inserted, "no line to insert before");
    out.into_bytes()
}

/// Runs bk-verify until it exits; a timeout kills it (a hung verify fails the test).
fn wait_with_timeout(mut child: std::process::Child, limit: Duration) -> Run {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("bk-verify did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Run::from(child.wait_with_output().unwrap())
}

/// A directory that must be (or become) empty: the scratch directory of a run.
fn scratch_dir(sb: &Sandbox) -> PathBuf {
    let dir = sb.path("scratch");
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[track_caller]
fn assert_empty_dir(dir: &Path) {
    let left: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "left behind in {}: {left:?}", dir.display());
}

/// bk-verify of `a` piped in, at the restore level, restoring into `scratch`.
fn verify_in_scratch(sb: &Sandbox, scratch: &Path, a: &Artifact) -> Run {
    sb.run_with_stdin(
        "bk-verify",
        &["--scratch", "--scratch-dir", s(scratch)],
        &artifact_line(a),
    )
}

/// bk-verify at the restore level, restoring into `scratch`, of the backups that `pick`
/// (e.g. `--name NAME`) selects in the sandbox's store.
fn verify_from_store_in_scratch(sb: &Sandbox, scratch: &Path, pick: &[&str]) -> Run {
    let store = sb.store();
    let mut args = vec!["--from", &store];
    args.extend(pick);
    args.extend(["--scratch", "--scratch-dir", s(scratch)]);
    sb.run("bk-verify", &args)
}

// ---------------------------------------------------------------------------------------
// files and SQLite

fn small_tree(src: &Path) {
    fs::create_dir_all(src.join("sub/deeper")).unwrap();
    fs::create_dir_all(src.join("empty")).unwrap();
    for i in 0..40 {
        fs::write(
            src.join(format!("sub/file{i}.txt")),
            format!("line {i}\n").repeat(200 + i),
        )
        .unwrap();
    }
    fs::write(
        src.join("sub/deeper/data.bin"),
        (0..=255u8).cycle().take(300_000).collect::<Vec<_>>(),
    )
    .unwrap();
    std::os::unix::fs::symlink("sub/file1.txt", src.join("link")).unwrap();
}

fn sqlite_db(path: &Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=wal;
         CREATE TABLE people(id INTEGER PRIMARY KEY, name TEXT, photo BLOB);
         CREATE TABLE empty(x);
         CREATE VIEW named AS SELECT name FROM people;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)
         INSERT INTO people(name, photo) SELECT 'p' || i, randomblob(50) FROM n;",
    )
    .unwrap();
}

#[test]
fn files_backup_verifies_at_both_levels_and_leaves_nothing() {
    let (sb, src) = Sandbox::with_src(small_tree);
    let a = sb.dump(&["files", s(&src), "--name", "files-good"]);

    // Piped from bk-dump: the artifact is verified, what is not an artifact is passed on.
    let other = r#"{"bk":1,"type":"notified","name":"files-good","via":"webhook","future":[1,2]}"#;
    let input = format!("{other}\n{}", artifact_line(&a));
    let run = sb.run_with_stdin("bk-verify", &[], &input).ok();
    assert_good(&verified(&run), &a, "integrity");
    let lines = run.lines();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    assert_eq!(lines[0], other, "passed on unchanged");
    assert!(run.stderr.is_empty(), "{}", run.stderr);

    // The real pipeline, through /bin/sh.
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg("\"$1\" files \"$2\" --name files-piped --to \"$3\" | \"$4\" --scratch --scratch-dir \"$5\"")
        .arg("sh")
        .arg(bk_tests::bin("bk-dump"))
        .arg(&src)
        .arg(sb.store())
        .arg(bk_tests::bin("bk-verify"))
        .arg(scratch_dir(&sb))
        .current_dir(sb.root())
        .env("BK_LOCK_DIR", sb.path("locks"));
    let run = run_cmd(sh, "").ok();
    let v = verified(&run);
    assert_eq!(v["name"], json!("files-piped"));
    assert_eq!(v["ok"], json!(true), "{}", run.stdout);
    assert_eq!(run.records().len(), 1, "the artifact is not passed on: {}", run.stdout);

    // The restore level: a scratch directory, removed afterwards.
    let scratch = scratch_dir(&sb);
    let run = verify_in_scratch(&sb, &scratch, &a).ok();
    assert_good(&verified(&run), &a, "restore");
    assert_empty_dir(&scratch);

    // From the store, by name.
    let run = verify_from_store_in_scratch(&sb, &scratch, &["--name", "files-good"]).ok();
    assert_good(&verified(&run), &a, "restore");
    assert_empty_dir(&scratch);
}

#[test]
fn sqlite_backup_verifies_at_both_levels_and_leaves_nothing() {
    let sb = Sandbox::new();
    let db = sb.path("app.db");
    sqlite_db(&db);
    let a = sb.dump(&["sqlite", s(&db), "--name", "sqlite-good"]);
    assert_eq!(a.counts["people"], 3000);
    let scratch = scratch_dir(&sb);

    let run = sb
        .run_with_stdin("bk-verify", &["--scratch-dir", s(&scratch)], &artifact_line(&a))
        .ok();
    assert_good(&verified(&run), &a, "integrity");
    assert_empty_dir(&scratch);

    let run = verify_in_scratch(&sb, &scratch, &a).ok();
    assert_good(&verified(&run), &a, "restore");
    assert_empty_dir(&scratch);

    let run = verify_from_store_in_scratch(&sb, &scratch, &["--name", "sqlite-good", "-q"]).ok();
    assert_good(&verified(&run), &a, "restore");
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    assert_empty_dir(&scratch);
}

#[test]
fn files_corruptions_are_caught() {
    let (sb, src) = Sandbox::with_src(small_tree);
    let scratch = scratch_dir(&sb);
    let verify = |a: &Artifact| verify_in_scratch(&sb, &scratch, a);

    // One bit flipped in the middle of the stored bytes.
    let a = sb.dump(&["files", s(&src), "--name", "files-flipped"]);
    flip_middle_bit(&a.location);
    let v = assert_caught(&verify(&a), &a, &["sha256 mismatch", &a.file]);
    assert_eq!(v["checks"]["integrity"]["ok"], json!(false));
    assert!(v["checks"]["restore"].is_null(), "no restore of a corrupt backup");
    assert_empty_dir(&scratch);

    // Truncated in the middle of an entry, the record rewritten to match the bytes.
    let a = sb.dump(&["files", s(&src), "--name", "files-cut"]);
    let tar = unzstd(&a.location);
    let cut = with_content(&a, &tar[..tar.len() / 2 + 100]);
    let run = verify(&cut);
    assert_caught(&run, &cut, &[&a.file, "truncated"]);
    assert_empty_dir(&scratch);

    // Truncated at an entry's end: the archive lacks only tar's two closing zero blocks.
    let a = sb.dump(&["files", s(&src), "--name", "files-noend"]);
    let tar = unzstd(&a.location);
    let end = tar.len() - tar.iter().rev().take_while(|b| **b == 0).count();
    let cut = with_content(&a, &tar[..end.div_ceil(512) * 512]);
    assert_caught(&verify(&cut), &cut, &["two zero blocks", "truncated"]);
    assert_empty_dir(&scratch);

    // A manifest whose count was changed (in the store: verified with --from).
    let a = sb.dump(&["files", s(&src), "--name", "files-count"]);
    let manifest = Path::new(&a.location).with_file_name(format!("{}.json", a.id));
    let mut value: Value = serde_json::from_str(&fs::read_to_string(&manifest).unwrap()).unwrap();
    let entries = a.counts["entries"];
    value["counts"]["entries"] = json!(entries + 1);
    fs::write(&manifest, format!("{value}\n")).unwrap();
    let run = verify_from_store_in_scratch(&sb, &scratch, &["--name", "files-count"]);
    let v = assert_caught(
        &run,
        &a,
        &["entries", &format!("{} expected, {entries} found", entries + 1)],
    );
    assert_eq!(
        mismatches(&v),
        [("entries".to_string(), Some(entries + 1), Some(entries))]
    );
    assert_empty_dir(&scratch);
}

#[test]
fn sqlite_corruptions_are_caught() {
    let sb = Sandbox::new();
    let db = sb.path("app.db");
    sqlite_db(&db);
    let scratch = scratch_dir(&sb);
    let verify = |a: &Artifact| verify_in_scratch(&sb, &scratch, a);

    let a = sb.dump(&["sqlite", s(&db), "--name", "sqlite-flipped"]);
    flip_middle_bit(&a.location);
    assert_caught(&verify(&a), &a, &["sha256 mismatch"]);
    assert_empty_dir(&scratch);

    let mut a = sb.dump(&["sqlite", s(&db), "--name", "sqlite-count"]);
    a.counts.insert("people".into(), 2999);
    let v = assert_caught(&verify(&a), &a, &["people: 2999 expected, 3000 found"]);
    assert_eq!(mismatches(&v), [("people".to_string(), Some(2999), Some(3000))]);
    assert_empty_dir(&scratch);

    // A page of the database overwritten, the record rewritten to match.
    let a = sb.dump(&["sqlite", s(&db), "--name", "sqlite-pages"]);
    let mut content = unzstd(&a.location);
    let page = 4096 * 3;
    content[page..page + 4096].fill(0x5a);
    let bad = with_content(&a, &content);
    assert_caught(
        &verify(&bad),
        &bad,
        &[&a.file, "not a sound SQLite database", "malformed"],
    );
    assert_empty_dir(&scratch);
}

/// The first offset of `needle` in `haystack`.
#[track_caller]
fn offset_of(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not found", String::from_utf8_lossy(needle)))
}

/// A mongodb backup's archive is read whole at the integrity level (every document decoded,
/// every CRC, every namespace of the prelude ended) and its counts compared: a good one is
/// ok, and each corruption is 65 with a message naming it. The changed archives are
/// recompressed with their record rewritten to match, so only the content can tell.
#[test]
fn mongodb_backup_verifies_and_corruptions_are_caught() {
    let Some(server) = mongo_server() else { return };
    let sb = Sandbox::new();
    let db = server.database(&unique_name("bk_vfy_mongo_"));
    server.python(
        "db = client[sys.argv[1]]\n\
         db.people.insert_many([{'_id': i, 'name': f'name-{i:04}'} for i in range(500)])\n\
         db.create_collection('empty')\n\
         db.last.insert_one({'_id': 'only'})\n",
        &[&db.name],
    );
    let a = sb.dump(&["mongodb", "--uri", &server.url, "--database", &db.name]);
    let people = format!("{}.people", db.name);
    assert_eq!(a.counts[&people], 500);
    let verify = |a: &Artifact| sb.run_with_stdin("bk-verify", &[], &artifact_line(a));
    assert_good(&verified(&verify(&a).ok()), &a, "integrity");
    let archive = unzstd(&a.location);

    // A document's bytes changed, the document still sound: only its CRC can tell.
    let mut changed = archive.clone();
    changed[offset_of(&archive, b"name-0250") + 5] = b'9';
    // The archive ends with the last namespace's EOF header (db first) and a terminator.
    let eof = archive.windows(6).rposition(|w| w == b"\x08EOF\x00\x01").unwrap();
    let last_eof = archive[..eof].windows(4).rposition(|w| w == b"\x02db\x00").unwrap() - 4;
    let mut malformed = archive.clone();
    // The type byte of a field of a document: no BSON type.
    malformed[offset_of(&archive, b"\x02name\x00\x0a\x00\x00\x00name-0100")] = 0x7f;
    let cases: [(&str, Vec<u8>, &[&str]); 4] = [
        ("a changed document", changed, &["CRC mismatch", &people]),
        ("a malformed document", malformed, &["malformed document"]),
        (
            "cut inside a document",
            archive[..archive.len() / 2].to_vec(),
            &["truncated"],
        ),
        (
            "cut before the last EOF",
            archive[..last_eof].to_vec(),
            &["truncated", "ends before the end of"],
        ),
    ];
    for (case, content, says) in cases {
        let bad = with_content(&a, &content);
        let run = verify(&bad);
        let v = assert_caught(&run, &bad, says);
        assert!(run.error().message.contains(&a.file), "{case}: {}", run.error().message);
        assert_eq!(v["checks"]["integrity"]["ok"], json!(false), "{case}");
    }

    // The stored bytes changed: their sha256 says so.
    let a = sb.dump(&["mongodb", "--uri", &server.url, "--database", &db.name]);
    flip_middle_bit(&a.location);
    assert_caught(&verify(&a), &a, &["sha256 mismatch", &a.file]);

    // A manifest whose count was changed.
    let mut a = sb.dump(&["mongodb", "--uri", &server.url, "--database", &db.name]);
    a.counts.insert(people.clone(), 499);
    // Shown as MySQL's tables are: without the database, the backup's one.
    let v = assert_caught(&verify(&a), &a, &["people: 499 expected, 500 found"]);
    assert_eq!(mismatches(&v), [("people".to_string(), Some(499), Some(500))]);
}

#[test]
fn encrypted_and_gzip_backups_verify() {
    let sb = Sandbox::new();
    let db = sb.path("app.db");
    sqlite_db(&db);
    let key = sb.path("key.txt");
    let public = age_keygen(&key);
    let sealed = sb.dump(&["sqlite", s(&db), "--name", "sealed", "--encrypt-to", &public]);
    let gz = sb.dump(&["sqlite", s(&db), "--name", "gz", "--compress", "gzip"]);
    let scratch = scratch_dir(&sb);
    let args = ["--scratch", "--scratch-dir", s(&scratch), "--identity", s(&key)];
    let run = sb
        .run_with_stdin("bk-verify", &args, &(artifact_line(&sealed) + &artifact_line(&gz)))
        .ok();
    let all = verified_all(&run);
    assert_eq!(all.len(), 2);
    assert_good(&all[0], &sealed, "restore");
    assert_good(&all[1], &gz, "restore");
    assert_empty_dir(&scratch);

    // No identity: a usage error. Another one: it cannot decrypt, 65.
    let run = sb.run_with_stdin("bk-verify", &[], &artifact_line(&sealed)).code(64);
    assert!(run.error().message.contains("--identity"));
    let other = sb.path("other.txt");
    age_keygen(&other);
    fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let run = sb.run_with_stdin("bk-verify", &["--identity", s(&other)], &artifact_line(&sealed));
    assert_caught(&run, &sealed, &["no identity given can decrypt it"]);
}

#[test]
fn selection_from_a_store_all_id_latest_and_sample() {
    let (sb, src) = Sandbox::with_src(small_tree);
    let store = sb.store();
    let four: Vec<Artifact> = (0..4).map(|_| sb.dump(&["files", s(&src), "--name", "four"])).collect();
    let other = sb.dump(&["files", s(&src.join("sub")), "--name", "other"]);
    let ids = |run: &Run| -> Vec<String> {
        verified_all(run)
            .iter()
            .map(|v| {
                assert_eq!(v["ok"], json!(true), "{}", run.stdout);
                v["id"].as_str().unwrap().to_string()
            })
            .collect()
    };

    // Default and --latest: the newest of each name.
    let newest = vec![four[3].id.clone(), other.id.clone()];
    assert_eq!(ids(&sb.run("bk-verify", &["--from", &store]).ok()), newest);
    assert_eq!(ids(&sb.run("bk-verify", &["--from", &store, "--latest"]).ok()), newest);
    assert_eq!(
        ids(&sb.run("bk-verify", &["--from", &store, "--name", "four"]).ok()),
        [four[3].id.clone()]
    );

    // --all: every backup of the name, oldest first.
    let all: Vec<String> = four.iter().map(|a| a.id.clone()).collect();
    assert_eq!(
        ids(&sb.run("bk-verify", &["--from", &store, "--name", "four", "--all"]).ok()),
        all
    );

    // --id: that one.
    assert_eq!(
        ids(&sb.run("bk-verify", &["--from", &store, "--id", &four[1].id]).ok()),
        [four[1].id.clone()]
    );
    let run = sb
        .run("bk-verify", &["--from", &store, "--id", "four.20000101T000000Z"])
        .code(66);
    assert!(run.error().message.contains("four.20000101T000000Z"));

    // --sample 1: the newest and one older one, per name; over runs, older ones vary.
    let mut older_seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let got = ids(&sb
            .run("bk-verify", &["--from", &store, "--name", "four", "--sample", "1"])
            .ok());
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[1], four[3].id, "the newest is verified: {got:?}");
        assert!(all[..3].contains(&got[0]), "one older one: {got:?}");
        older_seen.insert(got[0].clone());
    }
    assert!(
        older_seen.len() > 1,
        "the older one is picked at random: {older_seen:?}"
    );
    // With two names: each gets its newest (the one of `other` has no older ones).
    let got = ids(&sb.run("bk-verify", &["--from", &store, "--sample", "1"]).ok());
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.contains(&four[3].id) && got.contains(&other.id), "{got:?}");

    // Usage: --sample 0, --id with --all, and selection options without --from.
    for args in [
        vec!["--from", &store, "--sample", "0"],
        vec!["--from", &store, "--all", "--id", &four[0].id],
        vec!["--all"],
    ] {
        let run = sb.run("bk-verify", &args).code(64);
        run.error();
    }
    sb.run("bk-verify", &["--from", &store, "--name", "nothing"]).code(66);
}

#[test]
fn an_upstream_error_is_passed_on_and_fails_the_run() {
    let (sb, src) = Sandbox::with_src(small_tree);
    let a = sb.dump(&["files", s(&src), "--name", "files-up"]);
    let upstream = r#"{"bk":1,"type":"error","tool":"bk-dump","name":"mysql-x","code":69,"message":"down"}"#;
    let run = sb
        .run_with_stdin("bk-verify", &[], &format!("{upstream}\n{}", artifact_line(&a)))
        .code(1);
    assert_good(&verified(&run), &a, "integrity");
    assert!(run.lines().contains(&upstream), "{}", run.stdout);

    // Nothing but the failure: passed on, exit 1.
    let run = sb.run_with_stdin("bk-verify", &[], &format!("{upstream}\n")).code(1);
    assert_eq!(run.lines(), [upstream]);
}

/// Every error record printed, in order.
fn errors(run: &Run) -> Vec<bk_core::record::ErrorRecord> {
    run.records()
        .into_iter()
        .filter_map(|r| if let Record::Error(e) = r { Some(e) } else { None })
        .collect()
}

#[test]
fn every_backup_is_verified_and_every_failure_reported() {
    let (sb, src) = Sandbox::with_src(small_tree);
    // A backup whose store is gone (66), a corrupt one (65), a good one: in that order.
    let mut gone = sb.dump(&["files", s(&src), "--name", "files-gone"]);
    gone.location = gone.location.replace(&sb.store(), s(&sb.path("gone")));
    let corrupt = sb.dump(&["files", s(&src), "--name", "files-corrupt"]);
    flip_middle_bit(&corrupt.location);
    let good = sb.dump(&["files", s(&src), "--name", "files-fine"]);
    let other = r#"{"bk":1,"type":"notified","name":"files-gone","via":"webhook"}"#;
    let later = r#"{"bk":1,"type":"kept","name":"files-fine","id":"files-fine.1","location":"x","reasons":[]}"#;
    let input = format!(
        "{}{other}\n{}{}{later}\n",
        artifact_line(&gone),
        artifact_line(&corrupt),
        artifact_line(&good)
    );

    let run = sb.run_with_stdin("bk-verify", &[], &input).code(65);
    let verdicts: Vec<(Value, Value)> = verified_all(&run)
        .iter()
        .map(|v| (v["id"].clone(), v["ok"].clone()))
        .collect();
    assert_eq!(
        verdicts,
        [
            (json!(gone.id), json!(false)),
            (json!(corrupt.id), json!(false)),
            (json!(good.id), json!(true)),
        ],
        "every backup is verified, whatever failed before it"
    );
    let failures: Vec<(Option<String>, u8)> = errors(&run).into_iter().map(|e| (e.name, e.code)).collect();
    assert_eq!(
        failures,
        [(Some(corrupt.name.clone()), 65), (Some(gone.name.clone()), 66)],
        "a bad backup at once, the other failure at the end: {}",
        run.stdout
    );
    assert_eq!(
        run.stderr.lines().filter(|l| l.starts_with("bk-verify: ")).count(),
        failures.len(),
        "one line each on stderr: {}",
        run.stderr
    );
    let passed: Vec<&str> = run.lines().into_iter().filter(|l| *l == other || *l == later).collect();
    assert_eq!(passed, [other, later], "every other record is passed on");

    // Without a bad backup, the first other failure is the exit status.
    let run = sb
        .run_with_stdin(
            "bk-verify",
            &[],
            &format!("{}{}", artifact_line(&gone), artifact_line(&good)),
        )
        .code(66);
    assert_eq!(verified_all(&run).len(), 2, "{}", run.stdout);
    assert_eq!(run.error().name.as_deref(), Some(gone.name.as_str()));
}

/// Leaves a broken backup: the artifact file of `a` removed (its manifest stays).
fn remove_artifact(a: &Artifact) {
    fs::remove_file(&a.location).unwrap();
}

#[test]
fn a_broken_backup_is_a_failure_and_the_newest_good_one_is_verified_or_restored() {
    let (sb, src) = Sandbox::with_src(small_tree);
    let store = sb.store();
    // fresh: two good backups, then a newer one whose artifact file is missing.
    let fresh: Vec<Artifact> = (0..3)
        .map(|_| sb.dump(&["files", s(&src), "--name", "fresh"]))
        .collect();
    remove_artifact(&fresh[2]);
    let missing = fresh[2].id.clone();
    // stale: a good backup, and an older manifest that is garbage.
    let stale = sb.dump(&["files", s(&src), "--name", "stale"]);
    let garbage = "stale.20000101T000000Z".to_string();
    fs::write(sb.path(&format!("store/stale/{garbage}.json")), "{garbage\n").unwrap();
    let (g1, g2, s1) = (fresh[0].id.clone(), fresh[1].id.clone(), stale.id.clone());

    // (arguments, exit code, the broken backups reported, the backups verified)
    let cases = [
        (vec![], 65, vec![&missing], vec![&g2, &s1]),
        (vec!["--latest", "--name", "fresh"], 65, vec![&missing], vec![&g2]),
        (vec!["--name", "stale"], 0, vec![], vec![&s1]),
        (vec!["--all"], 65, vec![&missing, &garbage], vec![&g1, &g2, &s1]),
        (vec!["--sample", "1"], 65, vec![&missing, &garbage], vec![&g1, &g2, &s1]),
        (vec!["--id", &missing], 65, vec![&missing], vec![]),
        (vec!["--id", &garbage], 65, vec![&garbage], vec![]),
    ];
    for (args, code, broken, good) in cases {
        let mut all = vec!["--from", &store];
        all.extend(&args);
        let run = sb.run("bk-verify", &all).code(code);
        let what = format!("bk-verify {args:?}\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
        let reported: Vec<String> = errors(&run)
            .iter()
            .map(|e| {
                assert_eq!(e.code, 65, "{what}");
                let id = e.message.split(':').next().unwrap().to_string();
                assert!(
                    e.name.as_deref().is_some_and(|n| id.starts_with(&format!("{n}."))),
                    "{what}"
                );
                assert!(e.message.contains("broken backup"), "{what}");
                id
            })
            .collect();
        assert_eq!(reported.iter().collect::<Vec<_>>(), broken, "{what}");
        let verified: Vec<String> = verified_all(&run)
            .iter()
            .map(|v| {
                assert_eq!(v["ok"], json!(true), "{what}");
                v["id"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(verified.iter().collect::<Vec<_>>(), good, "{what}");
        let instead = format!("the newest backup {missing} is broken; verifying {g2} instead");
        assert_eq!(
            run.stderr.contains(&instead),
            args.is_empty() || args.contains(&"--latest") || args.contains(&"--sample"),
            "{what}"
        );
    }
    let run = sb.run("bk-verify", &["--from", &store, "--id", &missing]).code(65);
    assert!(run.error().message.contains("is missing"), "{}", run.stderr);

    // bk-restore: the newest good backup, with a warning naming the broken one; a broken
    // one by --id is 65 with the reason.
    let restore = |args: &[&str]| {
        let target = sb.path(&format!("restored-{}", args.join("-").replace(':', "")));
        let mut all = vec!["--from", &store, "--to", s(&target)];
        all.extend(args);
        sb.run("bk-restore", &all)
    };
    let warning = format!("bk-restore: warning: fresh: a newer backup {missing} is broken");
    for args in [vec!["--name", "fresh"], vec!["--name", "fresh", "--at", "2999-01-01"]] {
        let run = restore(&args).ok();
        assert_eq!(run.restored().id, g2, "{args:?}");
        assert!(run.stderr.contains(&warning), "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains(&format!("restoring {g2} instead")),
            "{}",
            run.stderr
        );
    }
    let run = restore(&["--name", "stale"]).ok();
    assert_eq!(run.restored().id, s1);
    assert!(
        run.stderr.is_empty(),
        "an older broken backup is not in the way: {}",
        run.stderr
    );
    for (id, reason) in [(&missing, "is missing"), (&garbage, "unreadable manifest")] {
        let run = restore(&["--id", id]).code(65);
        let e = run.error();
        assert!(
            e.message.contains(id.as_str()) && e.message.contains(reason),
            "{}",
            e.message
        );
    }
    restore(&["--name", "fresh", "--at", "2000-01-01"]).code(66);
}

#[test]
fn a_fifo_named_like_a_manifest_is_reported_without_hanging() {
    let (sb, src) = Sandbox::with_src(small_tree);
    let a = sb.dump(&["files", s(&src), "--name", "piped"]);
    let fifo = sb.path("store/piped/piped.29991231T000000Z.json");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let child = sb.spawn("bk-verify", &["--from", &sb.store()]);
    let run = wait_with_timeout(child, Duration::from_secs(30)).code(65);
    let e = run.error();
    assert!(
        e.message.contains("piped.29991231T000000Z") && e.message.contains("not a regular file"),
        "{}",
        e.message
    );
    assert_good(&verified(&run), &a, "integrity");
}

#[test]
fn leftover_scratch_directories_are_removed() {
    let (sb, src) = Sandbox::with_src(small_tree);
    let a = sb.dump(&["files", s(&src), "--name", "files-left"]);
    let scratch = scratch_dir(&sb);
    let old = scratch.join("bk_verify_1000_abcdef");
    fs::create_dir_all(old.join("etc/ro")).unwrap();
    fs::write(old.join("etc/ro/file"), "x").unwrap();
    fs::set_permissions(old.join("etc/ro"), std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    let old_file = scratch.join("bk_verify_1000_abcdef.db");
    fs::write(&old_file, "x").unwrap();
    let young = scratch.join(format!("bk_verify_{}_abcdef", now()));
    fs::create_dir(&young).unwrap();
    let unrelated = scratch.join("bk_verify_notes");
    fs::write(&unrelated, "mine").unwrap();

    // Only the restore level sweeps.
    sb.run_with_stdin("bk-verify", &["--scratch-dir", s(&scratch)], &artifact_line(&a))
        .ok();
    assert!(old.exists());

    let run = verify_in_scratch(&sb, &scratch, &a).ok();
    assert_good(&verified(&run), &a, "restore");
    assert!(!old.exists() && !old_file.exists(), "the old ones are removed");
    for gone in [&old, &old_file] {
        assert!(
            run.stderr.contains(&format!("removing {}", gone.display())),
            "stderr says so: {}",
            run.stderr
        );
    }
    assert!(young.is_dir(), "a young one may belong to a running verify");
    assert!(unrelated.is_file());
    assert_eq!(fs::read_dir(&scratch).unwrap().count(), 2);
}

#[test]
fn a_restored_read_only_tree_is_removed_when_verifying_as_another_user() {
    if !have_root() {
        return;
    }
    let (sb, src) = Sandbox::with_src(small_tree);
    let ro = src.join("sub/deeper");
    fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    fs::set_permissions(src.join("sub"), std::os::unix::fs::PermissionsExt::from_mode(0o500)).unwrap();
    let a = sb.dump(&["files", s(&src), "--name", "files-ro"]);
    let scratch = scratch_dir(&sb);
    // nobody may read the store and write the scratch directory, nothing else.
    for p in [
        sb.root().to_path_buf(),
        sb.path("store"),
        sb.path("store/files-ro"),
        scratch.clone(),
    ] {
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
    }
    for p in files_below(&sb.path("store")) {
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
    }
    let cmd = sb.cmd_via(&AS_NOBODY, "bk-verify", &["--scratch", "--scratch-dir", s(&scratch)]);
    let run = run_cmd(cmd, &artifact_line(&a)).ok();
    assert_good(&verified(&run), &a, "restore");
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    assert_empty_dir(&scratch);
}

// ---------------------------------------------------------------------------------------
// What the MySQL and PostgreSQL tests share: a server to restore into and look at.

trait ScratchServer {
    /// bk-verify with the server's connection options and `args`.
    fn verify_cmd(&self, args: &[&str]) -> Command;
    /// The `bk_verify_*` databases on the server, sorted.
    fn scratch_dbs(&self) -> Vec<String>;
    /// Held while the test makes or looks at scratch databases.
    fn scratch_lock(&self) -> MutexGuard<'static, ()>;
    /// Makes a database `name` with a table, as a killed run leaves one; dropped with the guard.
    fn leave_scratch_db(&self, name: &str) -> Box<dyn std::any::Any>;

    /// bk-verify with the records on stdin.
    fn verify(&self, args: &[&str], stdin: &str) -> Run {
        run_cmd(self.verify_cmd(args), stdin)
    }

    /// Waits a little for the scratch databases to be `expected` (a DROP may still run).
    #[track_caller]
    fn assert_scratch_dbs(&self, expected: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.scratch_dbs();
            if now == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "scratch databases left: {now:?}, expected {expected:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A dump's text with rows deleted after the load (the stream's counts are right, the
/// restored database's are not: only the restore level can see it), then one with a
/// statement the server rejects; both fail at the restore level and leave no scratch database.
struct RestoreLevelCase<'a> {
    /// The dump's completion line, which the edits go before.
    marker: &'a str,
    delete_ten_rows: &'a str,
    /// (table, rows in the source) of the table the DELETE touches.
    table: (&'a str, u64),
    /// What the server says of "THIS IS NOT SQL".
    syntax_error: &'a str,
}

fn restore_level_failures_drop_the_scratch_database(server: &dyn ScratchServer, a: &Artifact, case: RestoreLevelCase) {
    let text = String::from_utf8(unzstd(&a.location)).unwrap();
    let marker = |l: &str| l.starts_with(case.marker);
    let _lock = server.scratch_lock();
    let before = server.scratch_dbs();

    let deleting = with_content(a, &edit_lines(&text, |_| false, marker, case.delete_ten_rows));
    server.verify(&[], &artifact_line(&deleting)).ok();
    let run = server.verify(&["--scratch"], &artifact_line(&deleting));
    let (table, rows) = case.table;
    let expected = format!("{table}: {rows} expected, {} found", rows - 10);
    let v = assert_caught(&run, a, &["restored", &expected]);
    assert_eq!(v["checks"]["integrity"]["ok"], json!(true));
    assert_eq!(v["checks"]["restore"]["ok"], json!(false));
    assert_eq!(mismatches(&v), [(table.to_string(), Some(rows), Some(rows - 10))]);
    server.assert_scratch_dbs(&before);

    let broken = with_content(a, &edit_lines(&text, |_| false, marker, "THIS IS NOT SQL;\n"));
    let run = server.verify(&["--scratch"], &artifact_line(&broken));
    let v = assert_caught(&run, a, &["does not restore", case.syntax_error]);
    assert_eq!(v["checks"]["restore"]["ok"], json!(false));
    assert!(v["checks"]["restore"]["error"]
        .as_str()
        .unwrap()
        .contains(case.syntax_error));
    server.assert_scratch_dbs(&before);
}

/// SIGTERM while a big backup loads into its scratch database: 143, nothing on stdout, and
/// the scratch database dropped.
fn sigterm_mid_restore_drops_the_scratch_database(server: &dyn ScratchServer, a: &Artifact) {
    let _lock = server.scratch_lock();
    let before = server.scratch_dbs();
    let mut child = spawn_with_stdin(server.verify_cmd(&["--scratch"]), &artifact_line(a));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !server.scratch_dbs().iter().any(|d| !before.contains(d)) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "bk-verify ended before its scratch database was seen"
        );
        assert!(Instant::now() < deadline, "no scratch database appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the load get going.
    std::thread::sleep(Duration::from_millis(600));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM).unwrap();
    let run = wait_with_timeout(child, Duration::from_secs(60));
    assert_eq!(
        run.code, 143,
        "128 + SIGTERM\nstdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    // No verdict; the error record of the signal, which fails the pipeline.
    let records = run.records();
    assert!(
        matches!(&records[..], [Record::Error(e)] if e.code == 143 && e.message.contains("signal 15")),
        "an interrupted run reports its interruption only: {}",
        run.stdout
    );
    assert!(run.stderr.contains("interrupted by signal 15"), "{}", run.stderr);
    server.assert_scratch_dbs(&before);
}

/// A scratch database older than a day is dropped, with a line on stderr; a young one (a
/// run going on) is left alone.
fn leftover_scratch_databases_are_dropped(server: &dyn ScratchServer, a: &Artifact) {
    let _lock = server.scratch_lock();
    let old = "bk_verify_1000_abcdef".to_string();
    let young = format!("bk_verify_{}_abcdef", now());
    let _guards = [server.leave_scratch_db(&old), server.leave_scratch_db(&young)];
    let before = server.scratch_dbs();
    assert!(before.contains(&old) && before.contains(&young));

    let run = server.verify(&["--scratch"], &artifact_line(a)).ok();
    assert_good(&verified(&run), a, "restore");
    assert!(
        run.stderr.contains(&format!(
            "dropping {old}, a scratch database left by an interrupted run"
        )),
        "stderr says so: {}",
        run.stderr
    );
    assert!(!run.stderr.contains(&young), "{}", run.stderr);
    let after: Vec<String> = before.into_iter().filter(|d| *d != old).collect();
    server.assert_scratch_dbs(&after);
}

// ---------------------------------------------------------------------------------------
// MySQL

struct My {
    server: MysqlServer,
    sb: Sandbox,
    admin: PathBuf,
}

impl My {
    fn new() -> Option<My> {
        let server = mysql_server()?;
        let sb = Sandbox::new();
        let admin = server.option_file(&sb, "admin.cnf");
        Some(My { server, sb, admin })
    }

    fn sql(&self, sql: &str) -> String {
        self.server.sql(&self.admin, sql)
    }

    /// A database with three tables (1000, 3 and 0 rows) and a view; dropped with the guard.
    fn sample(&self, prefix: &str) -> (String, MysqlGuard) {
        let db = mysql_unique_name(prefix);
        let guard = self.server.database(&db);
        self.sql(&format!(
            "CREATE DATABASE {d} CHARACTER SET utf8mb4;
             USE {d};
             CREATE TABLE a (id INT PRIMARY KEY, v VARCHAR(40)) ENGINE=InnoDB;
             INSERT INTO a SELECT seq, CONCAT('row ', seq, '; (x)') FROM seq_1_to_1000;
             CREATE TABLE b (x INT NULL, t TEXT NULL) ENGINE=InnoDB;
             INSERT INTO b VALUES (1, 'one'), (NULL, ''), (3, 'INSERT INTO a VALUES (1)');
             CREATE TABLE empty_one (z INT) ENGINE=InnoDB;
             CREATE VIEW va AS SELECT id FROM a WHERE id < 10;",
            d = mysql_ident(&db)
        ));
        (db, guard)
    }

    fn dump_with(&self, option_file: &Path, db: &str) -> Artifact {
        let store = self.sb.store();
        self.sb
            .run(
                "bk-dump",
                &[
                    "mysql",
                    "--defaults-file",
                    s(option_file),
                    "--database",
                    db,
                    "--to",
                    &store,
                ],
            )
            .ok()
            .artifact()
    }

    fn dump(&self, db: &str) -> Artifact {
        self.dump_with(&self.admin, db)
    }

    /// Every table's checksum and the definitions of a database.
    fn checksum(&self, db: &str) -> String {
        let tables = self.sql(&format!(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = {} ORDER BY 1",
            mysql_string(db)
        ));
        let mut out = tables.clone();
        for t in tables.lines() {
            let name = format!("{}.{}", mysql_ident(db), mysql_ident(t));
            out += &self.sql(&format!("SHOW CREATE TABLE {name}"));
            if !self
                .sql(&format!(
                    "SHOW FULL TABLES FROM {} LIKE {}",
                    mysql_ident(db),
                    mysql_string(t)
                ))
                .contains("VIEW")
            {
                out += &self.sql(&format!("CHECKSUM TABLE {name} EXTENDED"));
                out += &self.sql(&format!("SELECT COUNT(*) FROM {name}"));
            }
        }
        out
    }
}

impl ScratchServer for My {
    /// bk-verify with the admin's option file, then `args`.
    fn verify_cmd(&self, args: &[&str]) -> Command {
        let mut all = vec!["--defaults-file", s(&self.admin)];
        all.extend(args);
        self.sb.cmd("bk-verify", &all)
    }

    fn scratch_dbs(&self) -> Vec<String> {
        self.sql(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE 'bk\\_verify\\_%' ORDER BY 1",
        )
        .lines()
        .map(String::from)
        .collect()
    }

    fn scratch_lock(&self) -> MutexGuard<'static, ()> {
        scratch_lock(&MYSQL_SCRATCH)
    }

    fn leave_scratch_db(&self, name: &str) -> Box<dyn std::any::Any> {
        let guard = self.server.database(name);
        self.sql(&format!(
            "CREATE DATABASE IF NOT EXISTS {d}; CREATE TABLE {d}.t (x INT);",
            d = mysql_ident(name)
        ));
        Box::new(guard)
    }
}

#[test]
fn mysql_backup_verifies_at_both_levels_and_the_scratch_database_goes() {
    let Some(my) = My::new() else { return };
    // A dot and a space in the name: its tables are still told apart from the database.
    let (db, _source) = my.sample("bk_vfy.good ");
    let a = my.dump(&db);
    assert_eq!(a.counts.len(), 3, "{:?}", a.counts);

    let other = r#"{"bk":1,"type":"kept","id":"x.20260101T000000Z","name":"x","location":"/b/x","reasons":["daily 2026-01-01"]}"#;
    let run = my.verify(&[], &format!("{}{other}\n", artifact_line(&a))).ok();
    assert_good(&verified(&run), &a, "integrity");
    assert_eq!(run.lines().get(1), Some(&other), "passed on unchanged, in input order");

    let _lock = scratch_lock(&MYSQL_SCRATCH);
    let before = my.scratch_dbs();
    let run = my.verify(&["--scratch"], &artifact_line(&a)).ok();
    assert_good(&verified(&run), &a, "restore");
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    my.assert_scratch_dbs(&before);

    let store = my.sb.store();
    let run = my.verify(&["--from", &store, "--name", &a.name, "--scratch"], "").ok();
    assert_good(&verified(&run), &a, "restore");
    my.assert_scratch_dbs(&before);
}

#[test]
fn mysql_corruptions_are_caught() {
    let Some(my) = My::new() else { return };
    let (db, _source) = my.sample("bk_vfy_bad_");
    let _lock = scratch_lock(&MYSQL_SCRATCH);
    let before = my.scratch_dbs();
    let verify = |a: &Artifact| my.verify(&["--scratch"], &artifact_line(a));

    // One bit flipped in the middle.
    let a = my.dump(&db);
    flip_middle_bit(&a.location);
    let v = assert_caught(&verify(&a), &a, &["sha256 mismatch", &a.file]);
    assert!(v["checks"]["restore"].is_null());
    my.assert_scratch_dbs(&before);

    // Cut just before '-- Dump completed', sha256, bytes and content_bytes rewritten.
    let a = my.dump(&db);
    let text = String::from_utf8(unzstd(&a.location)).unwrap();
    let end = text.rfind("-- Dump completed").expect("the completion line");
    let cut = with_content(&a, &text.as_bytes()[..end]);
    assert_caught(&verify(&cut), &cut, &["-- Dump completed", "truncated"]);
    my.assert_scratch_dbs(&before);

    // A manifest whose count for one table was changed.
    let mut a = my.dump(&db);
    a.counts.insert(format!("{db}.a"), 999);
    let run = verify(&a);
    let v = assert_caught(&run, &a, &["a: 999 expected, 1000 found"]);
    assert_eq!(mismatches(&v), [("a".to_string(), Some(999), Some(1000))]);
    my.assert_scratch_dbs(&before);

    // One table's INSERTs removed from the stream, sha256 and sizes rewritten.
    let a = my.dump(&db);
    let text = String::from_utf8(unzstd(&a.location)).unwrap();
    let removed = edit_lines(&text, |l| l.starts_with("INSERT INTO `b` "), |_| false, "");
    assert!(removed.len() < text.len());
    let b = with_content(&a, &removed);
    let v = assert_caught(&verify(&b), &b, &["b: 3 expected, 0 found"]);
    assert_eq!(mismatches(&v), [("b".to_string(), Some(3), Some(0))]);
    my.assert_scratch_dbs(&before);
}

#[test]
fn mysql_restore_level_failures_drop_the_scratch_database() {
    let Some(my) = My::new() else { return };
    let (db, _source) = my.sample("bk_vfy_rl_");
    let a = my.dump(&db);
    let case = RestoreLevelCase {
        marker: "-- Dump completed",
        delete_ten_rows: "DELETE FROM `a` WHERE id <= 10;\n",
        table: ("a", 1000),
        syntax_error: "ERROR 1064",
    };
    restore_level_failures_drop_the_scratch_database(&my, &a, case);
}

#[test]
fn mysql_sigterm_mid_restore_drops_the_scratch_database() {
    let Some(my) = My::new() else { return };
    let db = mysql_unique_name("bk_vfy_big_");
    let _source = my.server.database(&db);
    my.sql(&format!(
        "CREATE DATABASE {d}; USE {d};
         CREATE TABLE t (id INT PRIMARY KEY, pad VARCHAR(200)) ENGINE=InnoDB;
         INSERT INTO t SELECT seq, REPEAT('p', 150) FROM seq_1_to_600000;",
        d = mysql_ident(&db)
    ));
    sigterm_mid_restore_drops_the_scratch_database(&my, &my.dump(&db));
}

#[test]
fn mysql_leftover_scratch_databases_are_dropped() {
    let Some(my) = My::new() else { return };
    let (db, _source) = my.sample("bk_vfy_lo_");
    leftover_scratch_databases_are_dropped(&my, &my.dump(&db));
}

#[test]
fn mysql_verification_never_touches_the_source() {
    let Some(my) = My::new() else { return };
    let (db, _source) = my.sample("bk_vfy_ro_");
    let user = mysql_unique_name("bk_vfy_ro_");
    let password = format!("Pw{}", &hex::encode(Sha256::digest(user.as_bytes()))[..24]);
    let _account = my.server.account(&user, "127.0.0.1");
    my.sql(&format!(
        "CREATE USER {u}@'127.0.0.1' IDENTIFIED BY {p};
         GRANT SELECT, LOCK TABLES, SHOW VIEW, TRIGGER, EVENT ON {d}.* TO {u}@'127.0.0.1';",
        u = mysql_string(&user),
        p = mysql_string(&password),
        d = mysql_ident(&db.replace('_', "\\_"))
    ));
    let reader = my.server.option_file_for(&my.sb, "reader.cnf", &user, &password, "");
    // The reader really cannot write.
    let denied = my
        .server
        .try_sql(&reader, &format!("INSERT INTO {}.b VALUES (9, 'no')", mysql_ident(&db)));
    assert_ne!(denied.code, 0, "the backup user may not write");

    let a = my.dump_with(&reader, &db);
    let checksum = my.checksum(&db);
    let _lock = scratch_lock(&MYSQL_SCRATCH);
    let before = my.scratch_dbs();
    let run = my.verify(&["--scratch"], &artifact_line(&a)).ok();
    assert_good(&verified(&run), &a, "restore");
    my.assert_scratch_dbs(&before);
    assert_eq!(my.checksum(&db), checksum, "the source is as it was");
}

#[test]
fn mysql_unreachable_scratch_server_is_69() {
    let Some(my) = My::new() else { return };
    let (db, _source) = my.sample("bk_vfy_down_");
    let a = my.dump(&db);
    let closed = free_port().to_string();
    let run = my
        .verify(&["--scratch", "--port", &closed], &artifact_line(&a))
        .code(69);
    let e = run.error();
    assert!(
        e.message.contains(&closed) || e.message.contains("connect"),
        "{}",
        e.message
    );
    let v = verified(&run);
    assert_eq!(v["ok"], json!(false));
    assert_eq!(
        v["checks"]["integrity"]["ok"],
        json!(true),
        "the integrity level still ran"
    );
    assert_eq!(v["checks"]["restore"]["ok"], json!(false));
    // Integrity alone needs no server.
    let run = my.verify(&["--port", &closed], &artifact_line(&a)).ok();
    assert_good(&verified(&run), &a, "integrity");
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

struct Pg {
    pg: PgServer,
    sb: Sandbox,
    pgpass: PathBuf,
}

/// Two schemas with a table of the same name, a table with rows, an empty one and a view.
const PG_SAMPLE: &str = "
CREATE SCHEMA a;
CREATE SCHEMA b;
CREATE TABLE a.t(id int PRIMARY KEY, v text);
INSERT INTO a.t SELECT g, 'a' || g FROM generate_series(1, 300) g;
CREATE TABLE b.t(id int, v text);
INSERT INTO b.t VALUES (1, NULL), (2, ''), (3, E'tab\\there'), (4, '🦀'), (5, '\\.');
CREATE TABLE public.items(id serial PRIMARY KEY, label text);
INSERT INTO public.items(label) SELECT 'item ' || g FROM generate_series(1, 1000) g;
CREATE TABLE public.empty(x int);
CREATE VIEW public.v AS SELECT id FROM public.items WHERE id < 10;
";

impl Pg {
    fn new() -> Option<Pg> {
        let pg = pg_server()?;
        let sb = Sandbox::new();
        let pgpass = pg.write_pgpass(&sb, "pgpass");
        Some(Pg { pg, sb, pgpass })
    }

    fn sample(&self) -> (String, PgDatabase) {
        let name = pg_unique_name("bk_vfy_");
        let db = self.pg.create_database(&name);
        self.pg.execute(&name, PG_SAMPLE);
        (name, db)
    }

    fn dump(&self, db: &str, format: &str) -> Artifact {
        let store = self.sb.store();
        let cmd = self.pg.cmd(
            &self.sb,
            &self.pgpass,
            "bk-dump",
            &["postgres", "--database", db, "--format", format, "--to", &store],
        );
        run_cmd(cmd, "").ok().artifact()
    }
}

impl ScratchServer for Pg {
    fn verify_cmd(&self, args: &[&str]) -> Command {
        self.pg.cmd(&self.sb, &self.pgpass, "bk-verify", args)
    }

    fn scratch_dbs(&self) -> Vec<String> {
        self.pg.strings(
            "postgres",
            "SELECT datname FROM pg_database WHERE datname LIKE 'bk\\_verify\\_%' ORDER BY 1",
        )
    }

    fn scratch_lock(&self) -> MutexGuard<'static, ()> {
        scratch_lock(&PG_SCRATCH)
    }

    fn leave_scratch_db(&self, name: &str) -> Box<dyn std::any::Any> {
        let guard = self.pg.database(name);
        self.pg.execute(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", pg_ident(name)),
        );
        self.pg
            .execute("postgres", &format!("CREATE DATABASE {}", pg_ident(name)));
        self.pg.execute(name, "CREATE TABLE t (x int)");
        Box::new(guard)
    }
}

fn pg_expected_counts() -> BTreeMap<String, u64> {
    [("a.t", 300), ("b.t", 5), ("public.items", 1000), ("public.empty", 0)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

#[test]
fn postgres_backups_verify_at_both_levels_in_both_formats() {
    let Some(pg) = Pg::new() else { return };
    let (db, _source) = pg.sample();
    let _lock = scratch_lock(&PG_SCRATCH);
    let before = pg.scratch_dbs();
    for format in ["custom", "plain"] {
        let a = pg.dump(&db, format);
        assert_eq!(a.format, if format == "custom" { "pgdump" } else { "pgsql" });
        assert_eq!(a.counts, pg_expected_counts());
        let run = pg.verify(&[], &artifact_line(&a)).ok();
        assert_good(&verified(&run), &a, "integrity");
        let run = pg.verify(&["--scratch"], &artifact_line(&a)).ok();
        assert_good(&verified(&run), &a, "restore");
        assert!(run.stderr.is_empty(), "{}", run.stderr);
        pg.assert_scratch_dbs(&before);
    }
    // From the store: both, the custom one older.
    let store = pg.sb.store();
    let run = pg.verify(&["--from", &store, "--all", "--scratch"], "").ok();
    let all = verified_all(&run);
    assert_eq!(all.len(), 2, "{}", run.stdout);
    assert!(all
        .iter()
        .all(|v| v["ok"] == json!(true) && v["level"] == json!("restore")));
    pg.assert_scratch_dbs(&before);
}

#[test]
fn postgres_corruptions_are_caught() {
    let Some(pg) = Pg::new() else { return };
    let (db, _source) = pg.sample();
    let _lock = scratch_lock(&PG_SCRATCH);
    let before = pg.scratch_dbs();
    let verify = |a: &Artifact| pg.verify(&["--scratch"], &artifact_line(a));

    // One bit flipped in the middle.
    let a = pg.dump(&db, "custom");
    flip_middle_bit(&a.location);
    assert_caught(&verify(&a), &a, &["sha256 mismatch", &a.file]);
    pg.assert_scratch_dbs(&before);

    // A custom archive cut short, the record rewritten to match.
    let a = pg.dump(&db, "custom");
    let archive = unzstd(&a.location);
    let cut = with_content(&a, &archive[..archive.len() * 3 / 5]);
    let run = verify(&cut);
    assert_caught(&run, &cut, &[&a.file, "not a readable pg_dump archive", "end of file"]);
    pg.assert_scratch_dbs(&before);

    // The count of a.t changed; b.t has the same table name in another schema.
    for format in ["custom", "plain"] {
        let mut a = pg.dump(&db, format);
        a.counts.insert("a.t".into(), 301);
        let v = assert_caught(&verify(&a), &a, &["a.t: 301 expected, 300 found"]);
        assert_eq!(mismatches(&v), [("a.t".to_string(), Some(301), Some(300))]);
        pg.assert_scratch_dbs(&before);
    }

    // A plain dump with one table's COPY data removed, the record rewritten to match.
    let a = pg.dump(&db, "plain");
    let text = String::from_utf8(unzstd(&a.location)).unwrap();
    let mut copying = false;
    let removed = edit_lines(
        &text,
        |l| {
            if l.starts_with("COPY public.items ") {
                copying = true;
            }
            let drop = copying;
            if copying && l == "\\.\n" {
                copying = false;
            }
            drop
        },
        |_| false,
        "",
    );
    assert!(removed.len() + 10_000 < text.len());
    let b = with_content(&a, &removed);
    let v = assert_caught(&verify(&b), &b, &["public.items: 1000 expected, none found"]);
    assert_eq!(mismatches(&v), [("public.items".to_string(), Some(1000), None)]);
    pg.assert_scratch_dbs(&before);
}

#[test]
fn postgres_restore_level_failures_drop_the_scratch_database() {
    let Some(pg) = Pg::new() else { return };
    let (db, _source) = pg.sample();
    let a = pg.dump(&db, "plain");
    let case = RestoreLevelCase {
        marker: "-- PostgreSQL database dump complete",
        delete_ten_rows: "DELETE FROM public.items WHERE id <= 10;\n",
        table: ("public.items", 1000),
        syntax_error: "syntax error",
    };
    restore_level_failures_drop_the_scratch_database(&pg, &a, case);
}

#[test]
fn postgres_sigterm_mid_restore_drops_the_scratch_database() {
    let Some(pg) = Pg::new() else { return };
    let name = pg_unique_name("bk_vfy_big_");
    let _source = pg.pg.create_database(&name);
    pg.pg.execute(
        &name,
        "CREATE TABLE t(id int PRIMARY KEY, pad text);
         INSERT INTO t SELECT g, repeat('p', 150) FROM generate_series(1, 1500000) g;",
    );
    sigterm_mid_restore_drops_the_scratch_database(&pg, &pg.dump(&name, "custom"));
}

#[test]
fn postgres_leftover_scratch_databases_are_dropped() {
    let Some(pg) = Pg::new() else { return };
    let (db, _source) = pg.sample();
    leftover_scratch_databases_are_dropped(&pg, &pg.dump(&db, "custom"));
}

#[test]
fn postgres_unreachable_scratch_server_is_69() {
    let Some(pg) = Pg::new() else { return };
    let (db, _source) = pg.sample();
    let a = pg.dump(&db, "custom");
    let closed = free_port().to_string();
    let mut cmd = pg.sb.cmd(
        "bk-verify",
        &[
            "--scratch",
            "--host",
            "127.0.0.1",
            "--port",
            &closed,
            "--user",
            &pg.pg.user,
        ],
    );
    cmd.env("PGPASSFILE", &pg.pgpass);
    let run = run_cmd(cmd, &artifact_line(&a)).code(69);
    run.error();
    let v = verified(&run);
    assert_eq!(v["checks"]["integrity"]["ok"], json!(true));
    assert_eq!(v["checks"]["restore"]["ok"], json!(false));
}

#[test]
fn every_copy_a_pipeline_made_is_verified() {
    let (sb, src) = Sandbox::with_src(|src| write_files(src, &[("a", "one")]));
    let a = sb.dump(&["files", s(&src), "--name", "copies"]);
    let offsite = sb.path("offsite").display().to_string();
    let shipped = sb
        .run_with_stdin("bk-ship", &["--to", &offsite], &artifact_line(&a))
        .ok();
    let copies = shipped.artifacts();
    assert_eq!(copies.len(), 2, "the original and its copy: {}", shipped.stdout);
    let run = sb.run_with_stdin("bk-verify", &[], &shipped.stdout).ok();
    let mut locations: Vec<String> = verified_all(&run)
        .iter()
        .map(|v| v["location"].as_str().unwrap().to_string())
        .collect();
    locations.sort();
    let mut expected: Vec<String> = copies.iter().map(|c| c.location.clone()).collect();
    expected.sort();
    assert_eq!(locations, expected);
}
