//! The mysql engine against a real MariaDB (tests/services.sh): exact round trips into
//! another database name, a dump consistent while another connection writes, no password on
//! any command line, a backup user with minimal privileges, restores that refuse, filter and
//! check, several databases in one run, and every failure leaving nothing in the store.
//!
//! Each test makes its own uniquely named databases and accounts and drops them at the end
//! (tests run in parallel, and the server is shared).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bk_core::record::{Artifact, Record};
use bk_tests::{
    artifact_line, files_below, free_port, have_root, mysql_ident, mysql_server, mysql_string, mysql_unique_name,
    run_cmd, spawn_with_stdin, MysqlGuard, MysqlServer, Run, Sandbox,
};
use sha2::{Digest, Sha256};

/// A test's server, sandbox and admin option file.
struct Env {
    server: MysqlServer,
    sb: Sandbox,
    admin: PathBuf,
}

impl Env {
    fn new() -> Option<Env> {
        let server = mysql_server()?;
        let sb = Sandbox::new();
        let admin = server.option_file(&sb, "admin.cnf");
        Some(Env { server, sb, admin })
    }

    fn sql(&self, sql: &str) -> String {
        self.server.sql(&self.admin, sql)
    }

    /// A new empty database (utf8mb4), dropped when the guard goes.
    fn create_db(&self, name: &str) -> MysqlGuard {
        let guard = self.server.database(name);
        self.sql(&format!(
            "CREATE DATABASE {} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
            mysql_ident(name)
        ));
        guard
    }

    /// A new empty database named `<prefix><unique>`: its name, and the guard dropping it.
    fn new_db(&self, prefix: &str) -> (String, MysqlGuard) {
        let name = mysql_unique_name(prefix);
        let guard = self.create_db(&name);
        (name, guard)
    }

    /// An account at 127.0.0.1 with a random password, dropped when the guard goes.
    fn create_user(&self, prefix: &str) -> (String, String, MysqlGuard) {
        let user = mysql_unique_name(prefix);
        let password = random_password();
        let guard = self.server.account(&user, "127.0.0.1");
        self.sql(&format!(
            "CREATE USER {}@'127.0.0.1' IDENTIFIED BY {}",
            mysql_string(&user),
            mysql_string(&password)
        ));
        (user, password, guard)
    }

    /// bk-dump mysql with an option file, into the sandbox's store (or `store`).
    fn dump_to(&self, option_file: &Path, store: &str, args: &[&str]) -> Run {
        let file = option_file.to_str().unwrap();
        let mut all = vec!["mysql", "--defaults-file", file];
        all.extend(args);
        all.extend(["--to", store]);
        self.sb.run("bk-dump", &all)
    }

    fn dump(&self, args: &[&str]) -> Run {
        self.dump_to(&self.admin, &self.sb.store(), args)
    }

    /// bk-restore, as the admin, of the artifact record piped in.
    fn restore(&self, artifact: &Artifact, args: &[&str]) -> Run {
        let mut all = vec!["--defaults-file", self.admin.to_str().unwrap()];
        all.extend(args);
        self.sb.run_with_stdin("bk-restore", &all, &artifact_line(artifact))
    }

    /// Base tables of a database.
    fn tables(&self, db: &str) -> Vec<String> {
        self.sql(&format!(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = {} AND TABLE_TYPE = 'BASE TABLE' ORDER BY 1",
            mysql_string(db)
        ))
        .lines()
        .map(String::from)
        .collect()
    }

    fn count(&self, db: &str, table: &str) -> u64 {
        self.sql(&format!(
            "SELECT COUNT(*) FROM {}.{}",
            mysql_ident(db),
            mysql_ident(table)
        ))
        .trim()
        .parse()
        .unwrap()
    }

    /// Everything a restore must bring back of a database, keyed by what it is: per table
    /// and view its definition and a digest over every value of every row (NULL told apart
    /// from any string, bytes exact), and the definitions of its triggers, routines and
    /// events. The database's own name is replaced by `DB`, as a restore may rename it.
    fn content(&self, db: &str) -> BTreeMap<String, String> {
        let lit = mysql_string(db);
        let mut out = BTreeMap::new();
        let objects = self.sql(&format!(
            "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES WHERE TABLE_SCHEMA = {lit} ORDER BY 1"
        ));
        for line in objects.lines() {
            let (name, kind) = line.split_once('\t').unwrap();
            let columns: Vec<String> = self
                .sql(&format!(
                    "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = {lit} AND TABLE_NAME = {} ORDER BY ORDINAL_POSITION",
                    mysql_string(name)
                ))
                .lines()
                .map(String::from)
                .collect();
            let values = columns
                .iter()
                .map(|c| {
                    let c = mysql_ident(c);
                    format!("IF({c} IS NULL, 'N', SHA2(CAST({c} AS BINARY), 256))")
                })
                .collect::<Vec<_>>()
                .join(", ");
            let rows = self.sql(&format!(
                "SELECT CONCAT_WS(',', {values}) FROM {}.{}",
                mysql_ident(db),
                mysql_ident(name)
            ));
            // Every row's digest, sorted: the same multiset of rows whatever the order.
            let mut rows: Vec<&str> = rows.lines().collect();
            rows.sort_unstable();
            let digest = hex::encode(Sha256::digest(rows.join("\n")));
            out.insert(format!("{kind} {name}: rows"), format!("{} {digest}", rows.len()));
            let definition = self.sql(&format!("SHOW CREATE TABLE {}.{}", mysql_ident(db), mysql_ident(name)));
            let definition = definition.split_once('\t').map_or("", |(_, d)| d).trim_end();
            out.insert(
                format!("{kind} {name}: definition"),
                definition.replace(&mysql_ident(db), "`DB`"),
            );
        }
        let schema = self.sql(&format!(
            "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = {lit}"
        ));
        out.insert("database: default character set".into(), schema.trim().to_string());
        let described = [
            ("view", "VIEWS", "TABLE_SCHEMA", "TABLE_NAME, VIEW_DEFINITION, CHECK_OPTION, DEFINER, SECURITY_TYPE, ALGORITHM"),
            ("trigger", "TRIGGERS", "TRIGGER_SCHEMA", "TRIGGER_NAME, EVENT_MANIPULATION, EVENT_OBJECT_TABLE, ACTION_TIMING, ACTION_ORDER, ACTION_STATEMENT, DEFINER, SQL_MODE, CHARACTER_SET_CLIENT, COLLATION_CONNECTION"),
            ("routine", "ROUTINES", "ROUTINE_SCHEMA", "ROUTINE_NAME, ROUTINE_TYPE, DTD_IDENTIFIER, ROUTINE_DEFINITION, IS_DETERMINISTIC, SQL_DATA_ACCESS, SECURITY_TYPE, SQL_MODE, ROUTINE_COMMENT, DEFINER, CHARACTER_SET_CLIENT"),
            ("parameter", "PARAMETERS", "SPECIFIC_SCHEMA", "SPECIFIC_NAME, ORDINAL_POSITION, PARAMETER_MODE, PARAMETER_NAME, DTD_IDENTIFIER, ROUTINE_TYPE"),
            ("event", "EVENTS", "EVENT_SCHEMA", "EVENT_NAME, DEFINER, TIME_ZONE, EVENT_DEFINITION, EVENT_TYPE, INTERVAL_VALUE, INTERVAL_FIELD, STARTS, ENDS, STATUS, ON_COMPLETION, SQL_MODE, EVENT_COMMENT"),
        ];
        for (what, table, schema_column, columns) in described {
            let rows = self.sql(&format!(
                "SELECT CONCAT_WS(' | ', {columns}) FROM information_schema.{table} WHERE {schema_column} = {lit} ORDER BY 1"
            ));
            for (i, row) in rows.lines().enumerate() {
                out.insert(format!("{what} {i}"), row.replace(&mysql_ident(db), "`DB`"));
            }
        }
        out
    }
}

/// Two databases' [`Env::content`] are the same; else the differences, one per line.
#[track_caller]
fn assert_same_content(copy: &BTreeMap<String, String>, source: &BTreeMap<String, String>) {
    let differences: Vec<String> = source
        .keys()
        .chain(copy.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| source.get(*k) != copy.get(*k))
        .map(|k| format!("{k}:\n  source: {:?}\n  copy:   {:?}", source.get(k), copy.get(k)))
        .collect();
    assert!(differences.is_empty(), "the copy differs:\n{}", differences.join("\n"));
}

fn random_password() -> String {
    let mut bytes = [0u8; 18];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .expect("/dev/urandom");
    format!("Pw{}", hex::encode(bytes))
}

/// A database name in a GRANT, where `_` and `%` are wildcards unless escaped.
fn grant_db(db: &str) -> String {
    mysql_ident(&db.replace('_', "\\_").replace('%', "\\%"))
}

/// The job name bk gives a database: `mysql-<db>` with anything but [a-z0-9_] made '-'.
fn default_name(db: &str) -> String {
    let mut name = String::from("mysql-");
    for c in db.to_lowercase().chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
            name.push(c);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    name.trim_end_matches(['-', '_']).to_string()
}

/// Counts keyed by table alone (a restore may rename the database).
fn by_table(counts: &BTreeMap<String, u64>, db: &str) -> BTreeMap<String, u64> {
    counts
        .iter()
        .map(|(k, v)| {
            let table = k
                .strip_prefix(&format!("{db}."))
                .unwrap_or_else(|| panic!("{k} is not <{db}>.<table>"));
            (table.to_string(), *v)
        })
        .collect()
}

/// A long row for the sample: 6 MiB of text ending in a 4-byte character.
const LONG_TEXT_BYTES: usize = 6 * 1024 * 1024;

/// Fills a database with what a dump must carry exactly: NULLs, empty strings, every byte
/// value, 4-byte UTF-8, a row of several MB, zero-row tables (InnoDB and MyISAM, with and
/// without keys), names that need quoting, a view, a trigger, a procedure, a function and an
/// event. Returns the rows per table.
fn create_sample(env: &Env, db: &str) -> BTreeMap<String, u64> {
    let packet: usize = env.sql("SELECT @@GLOBAL.max_allowed_packet").trim().parse().unwrap();
    assert!(
        packet >= 2 * LONG_TEXT_BYTES,
        "the server's max_allowed_packet ({packet}) is too small for the long row: raise it in tests/services.sh"
    );
    let every_byte = hex::encode((0..=255u8).collect::<Vec<_>>());
    let sql = format!(
        r#"USE {db};
CREATE TABLE `people` (
  `id` INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  `name` VARCHAR(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
  `note` TEXT CHARACTER SET utf8mb4 NULL,
  `photo` BLOB NULL,
  `code` VARBINARY(16) NULL,
  `score` DOUBLE NULL,
  `price` DECIMAL(14,4) NULL,
  `born` DATETIME(6) NULL,
  `flags` BIT(8) NULL,
  `doc` JSON NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE `log` (`id` INT NOT NULL AUTO_INCREMENT PRIMARY KEY, `person` INT NULL, `what` VARCHAR(200) CHARACTER SET utf8mb4 NULL) ENGINE=InnoDB;
CREATE TRIGGER `people log` AFTER INSERT ON `people` FOR EACH ROW
  INSERT INTO `log` (`person`, `what`) VALUES (NEW.`id`, CONCAT('added; (', IFNULL(NEW.`name`, '?'), ')'));
INSERT INTO `people` (`name`, `note`, `photo`, `code`, `score`, `price`, `born`, `flags`, `doc`) VALUES
  (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
  ('', '', '', '', 0, 0, '1970-01-01 00:00:01', b'0', '{{}}'),
  ('🦀 Ünïcødé 𝄞 😀', 'emoji 🎉 and 中文 text', UNHEX('{every_byte}'), UNHEX('00FF00FF'), 1.5e300, -12345678.1234, '2026-11-22 05:30:07.123456', b'10101010', '{{"k": "v 🦀", "n": [1, null]}}'),
  ('it''s \\ a "quote"; INSERT INTO x VALUES (1); -- no comment', 'tab\there\nnewline\r\n\0nul /* c */ #hash ;;', UNHEX('5C27220A0D001A3B'), NULL, -0.5, 0.0001, NULL, b'11111111', NULL);
CREATE TABLE `big row` (`id` INT NOT NULL PRIMARY KEY, `body` LONGTEXT CHARACTER SET utf8mb4 NOT NULL) ENGINE=InnoDB;
INSERT INTO `big row` VALUES (1, CONCAT(REPEAT('0123456789abcdef', {repeat}), '🦀')), (2, '');
CREATE TABLE `empty one` (`x` INT NULL) ENGINE=InnoDB;
CREATE TABLE `Empty``Two` (`id` INT NOT NULL PRIMARY KEY, `b` LONGBLOB NULL) ENGINE=MyISAM;
CREATE TABLE `many` (`id` INT NOT NULL PRIMARY KEY, `v` VARCHAR(40) NULL, `n` INT NULL) ENGINE=InnoDB;
INSERT INTO `many` SELECT seq, CONCAT('row ', seq, IF(seq % 7 = 0, ' (x); -- y', '')), IF(seq % 3 = 0, NULL, seq) FROM seq_1_to_5000;
CREATE TABLE `no key` (`a` VARCHAR(10) NULL, `b` INT NULL) ENGINE=InnoDB;
INSERT INTO `no key` VALUES ('dup', 1), ('dup', 1), (NULL, NULL), ('', 0), ('NULL', NULL);
CREATE TABLE `we``ird; (name)` (`v` INT NULL) ENGINE=InnoDB;
INSERT INTO `we``ird; (name)` VALUES (1), (-2);
CREATE VIEW `named people` AS SELECT `id`, `name` FROM `people` WHERE `name` IS NOT NULL AND `name` <> '';
DELIMITER //
CREATE PROCEDURE `add person`(IN n VARCHAR(100))
BEGIN
  INSERT INTO `people` (`name`) VALUES (n);
  INSERT INTO `log` (`person`, `what`) VALUES (LAST_INSERT_ID(), 'by procedure; (1)');
END//
CREATE FUNCTION `twice`(x INT) RETURNS INT DETERMINISTIC RETURN x * 2//
DELIMITER ;
CREATE EVENT `nightly purge` ON SCHEDULE EVERY 1 DAY STARTS '2030-01-01 00:00:00' DISABLE
  DO DELETE FROM `log` WHERE `id` < 0;
"#,
        db = mysql_ident(db),
        repeat = LONG_TEXT_BYTES / 16,
    );
    env.sql(&sql);
    [
        ("people", 4),
        ("log", 4),
        ("big row", 2),
        ("empty one", 0),
        ("Empty`Two", 0),
        ("many", 5000),
        ("no key", 5),
        ("we`ird; (name)", 2),
    ]
    .into_iter()
    .map(|(t, n)| (t.to_string(), n))
    .collect()
}

/// Checks the routines work where they were restored.
fn routines_work(env: &Env, db: &str) {
    let db = mysql_ident(db);
    assert_eq!(env.sql(&format!("SELECT {db}.`twice`(21)")).trim(), "42");
    let before = env.sql(&format!("SELECT COUNT(*) FROM {db}.`log`"));
    env.sql(&format!("USE {db}; CALL `add person`('from the restore');"));
    let after = env.sql(&format!("SELECT COUNT(*) FROM {db}.`log`"));
    let (before, after): (u64, u64) = (before.trim().parse().unwrap(), after.trim().parse().unwrap());
    assert_eq!(after, before + 2, "the trigger and the procedure each logged once");
}

#[test]
fn round_trip_into_another_database_is_exact() {
    let Some(env) = Env::new() else { return };
    let (db, _source) = env.new_db("bk test-db ");
    let rows = create_sample(&env, &db);

    let artifact = env
        .dump(&["--database", &db, "--extra-arg=--max-allowed-packet=64M"])
        .ok()
        .artifact();
    assert_eq!(artifact.engine, "mysql");
    assert_eq!(artifact.format, "sql");
    assert_eq!(artifact.name, default_name(&db));
    assert!(artifact.file.ends_with(".sql.zst"), "{}", artifact.file);
    assert_eq!(artifact.source.database.as_deref(), Some(db.as_str()));
    assert!(
        ["mariadb-dump", "mysqldump"].contains(&artifact.tool.program.as_str()),
        "{:?}",
        artifact.tool
    );
    assert!(artifact.content_bytes > LONG_TEXT_BYTES as u64);
    let expected: BTreeMap<String, u64> = rows.iter().map(|(t, n)| (format!("{db}.{t}"), *n)).collect();
    assert_eq!(
        artifact.counts, expected,
        "exact rows per table, 0 for empty ones, no view"
    );
    let dir = env.sb.path("store").join(&artifact.name);
    for file in [artifact.file.clone(), format!("{}.json", artifact.id)] {
        let mode = std::fs::metadata(dir.join(&file)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }

    let new = mysql_unique_name("bk restored ");
    let _target = env.server.database(&new);
    let run = env.restore(&artifact, &["--database", &new]).ok();
    let restored = run.restored();
    assert_eq!(restored.id, artifact.id);
    assert!(restored.complete);
    assert_eq!(
        restored.target.get("database").and_then(|d| d.as_str()),
        Some(new.as_str())
    );
    assert_eq!(by_table(&restored.counts, &new), rows, "the restored record's counts");
    assert_eq!(by_table(&restored.counts, &new), by_table(&artifact.counts, &db));
    let (source, copy) = (env.content(&db), env.content(&new));
    assert!(source.keys().any(|k| k.starts_with("routine")) && source.keys().any(|k| k.starts_with("event")));
    assert_same_content(&copy, &source);
    routines_work(&env, &new);
}

#[test]
fn standard_tools_alone_restore_the_artifact() {
    let Some(env) = Env::new() else { return };
    let (db, _source) = env.new_db("bk_std ");
    create_sample(&env, &db);
    let artifact = env.dump(&["--database", &db]).ok().artifact();

    // Created with the server's defaults: the dump itself sets the source's.
    let new = mysql_unique_name("bk_std_copy_");
    let _target = env.server.database(&new);
    env.sql(&format!("CREATE DATABASE {}", mysql_ident(&new)));
    let mut sh = Command::new("sh");
    sh.args([
        "-c",
        "zstd -dc \"$1\" | mariadb --defaults-file=\"$2\" \"$3\"",
        "sh",
        &artifact.location,
        env.admin.to_str().unwrap(),
        &new,
    ]);
    let run = run_cmd(sh, "");
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_same_content(&env.content(&new), &env.content(&db));
    routines_work(&env, &new);
}

#[test]
fn a_dump_during_writes_is_one_snapshot() {
    let Some(env) = Env::new() else { return };
    let (db, _source) = env.new_db("bk_busy_");
    // Every transaction adds two rows to a and one to b: in any consistent snapshot,
    // count(a) == 2 * count(b).
    env.sql(&format!(
        "USE {};
         CREATE TABLE a (id BIGINT AUTO_INCREMENT PRIMARY KEY, pad VARCHAR(200)) ENGINE=InnoDB;
         CREATE TABLE b (id BIGINT AUTO_INCREMENT PRIMARY KEY, pad VARCHAR(200)) ENGINE=InnoDB;
         START TRANSACTION;
         INSERT INTO a (pad) SELECT REPEAT('a', 150) FROM seq_1_to_100000;
         INSERT INTO b (pad) SELECT REPEAT('b', 150) FROM seq_1_to_50000;
         COMMIT;",
        mysql_ident(&db)
    ));
    let mut writer = env
        .server
        .client(&env.admin)
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        let mut stdin = writer.stdin.take().unwrap();
        std::thread::spawn(move || {
            let tx = "START TRANSACTION; INSERT INTO a (pad) VALUES (REPEAT('x', 150)); INSERT INTO a (pad) VALUES ('y'); INSERT INTO b (pad) VALUES (REPEAT('z', 150)); COMMIT;\n";
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if stdin.write_all(tx.as_bytes()).is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        })
    };
    let b_count = || env.count(&db, "b");
    let deadline = Instant::now() + Duration::from_secs(60);
    while b_count() < 50_200 {
        assert!(Instant::now() < deadline, "the writer does not write");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut artifacts = Vec::new();
    let mut wrote_during_a_dump = false;
    for _ in 0..3 {
        let before = b_count();
        artifacts.push(env.dump(&["--database", &db]).ok().artifact());
        wrote_during_a_dump |= b_count() > before;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = feeder.join().unwrap();
    let out = writer.wait_with_output().unwrap();
    assert!(out.status.success(), "writer: {}", String::from_utf8_lossy(&out.stderr));
    assert!(sent > 0);
    assert!(wrote_during_a_dump, "the writer should have committed while a dump ran");
    let final_b = b_count();
    assert_eq!(env.count(&db, "a"), 2 * final_b);

    for artifact in &artifacts {
        let counts = by_table(&artifact.counts, &db);
        assert_eq!(counts["a"], 2 * counts["b"], "one snapshot: {counts:?}");
        assert!(counts["b"] >= 50_200 && counts["b"] <= final_b, "{counts:?}");
        let new = mysql_unique_name("bk_busy_copy_");
        let _target = env.server.database(&new);
        let restored = env.restore(artifact, &["--database", &new]).ok().restored();
        assert_eq!(
            by_table(&restored.counts, &new),
            counts,
            "the restore holds exactly the snapshot"
        );
        assert_eq!(env.count(&new, "a"), counts["a"]);
        assert_eq!(env.count(&new, "b"), counts["b"]);
    }
}

/// Every process whose command line or environment holds `secret`, and whether a dump
/// program was seen running with `marker` on its command line.
fn scan_processes(secret: &[u8], marker: &str) -> (Vec<String>, bool) {
    let mut offenders = Vec::new();
    let mut saw_dump = false;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return (offenders, saw_dump);
    };
    for entry in entries.flatten() {
        let pid = entry.file_name();
        if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        for what in ["cmdline", "environ"] {
            // The process may have gone in between: nothing to read then.
            let Ok(bytes) = std::fs::read(entry.path().join(what)) else {
                continue;
            };
            if what == "cmdline" {
                let line = String::from_utf8_lossy(&bytes);
                saw_dump |= (line.contains("mariadb-dump") || line.contains("mysqldump")) && line.contains(marker);
            }
            if bytes.windows(secret.len()).any(|w| w == secret) {
                offenders.push(format!(
                    "{} {what}: {}",
                    pid.to_string_lossy(),
                    String::from_utf8_lossy(&bytes).replace('\0', " ")
                ));
            }
        }
    }
    (offenders, saw_dump)
}

#[test]
fn no_password_on_any_command_line_while_dumping() {
    let Some(env) = Env::new() else { return };
    let (db, _source) = env.new_db("bk_secret_");
    env.sql(&format!(
        "USE {};
         CREATE TABLE t (id INT PRIMARY KEY, pad VARCHAR(200)) ENGINE=InnoDB;
         INSERT INTO t SELECT seq, CONCAT(seq, REPEAT('p', 150)) FROM seq_1_to_300000;",
        mysql_ident(&db)
    ));
    let (user, password, _account) = env.create_user("bk_pw_");
    env.sql(&format!(
        "GRANT SELECT, LOCK TABLES, SHOW VIEW, TRIGGER, EVENT ON {}.* TO {}@'127.0.0.1'",
        grant_db(&db),
        mysql_string(&user)
    ));
    let option_file = env.server.option_file_for(&env.sb, "secret.cnf", &user, &password, "");
    let store = env.sb.store();
    let mut child = env.sb.spawn(
        "bk-dump",
        &[
            "mysql",
            "--defaults-file",
            option_file.to_str().unwrap(),
            "--database",
            &db,
            "--to",
            &store,
        ],
    );
    let (mut scans, mut saw_dump, mut offenders) = (0, false, Vec::new());
    while child.try_wait().unwrap().is_none() {
        let (found, saw) = scan_processes(password.as_bytes(), &db);
        offenders.extend(found);
        saw_dump |= saw;
        scans += 1;
    }
    let run = Run::from(child.wait_with_output().unwrap()).ok();
    let artifact = run.artifact();
    assert_eq!(artifact.counts[&format!("{db}.t")], 300_000);
    assert!(offenders.is_empty(), "the password is visible: {offenders:#?}");
    assert!(
        saw_dump,
        "the dump program was never seen running ({scans} scans): nothing proven"
    );
    let printed = format!("{}{}", run.stdout, run.stderr);
    assert!(!printed.contains(&password));
}

#[test]
fn a_backup_user_with_minimal_privileges_suffices() {
    let Some(env) = Env::new() else { return };
    let (db, _source) = env.new_db("bk_lab_");
    create_sample(&env, &db);
    let (user, password, _account) = env.create_user("bk_backup_");
    // What a backup user needs. SELECT on mysql.proc: without it MariaDB 10.11's
    // mariadb-dump cannot SHOW CREATE the routines of another definer and leaves them out,
    // silently (MariaDB 11.3+ has SHOW CREATE ROUTINE for this; MySQL 8.0.20+ SHOW_ROUTINE).
    env.sql(&format!(
        "GRANT SELECT, LOCK TABLES, SHOW VIEW, TRIGGER, EVENT ON {db}.* TO {user}@'127.0.0.1';
         GRANT SELECT ON mysql.proc TO {user}@'127.0.0.1';",
        db = grant_db(&db),
        user = mysql_string(&user)
    ));
    let option_file =
        env.server
            .option_file_for(&env.sb, "backup.cnf", &user, &password, "[mysqldump]\nno_tablespaces\n");
    let grants = env.server.sql(&option_file, "SHOW GRANTS");
    assert!(!grants.contains("ALL PRIVILEGES") && !grants.contains("RELOAD") && !grants.contains("PROCESS"));

    let artifact = env
        .dump_to(&option_file, &env.sb.store(), &["--database", &db])
        .ok()
        .artifact();
    let new = mysql_unique_name("bk_lab_copy_");
    let _target = env.server.database(&new);
    let restored = env.restore(&artifact, &["--database", &new]).ok().restored();
    assert_eq!(by_table(&restored.counts, &new), by_table(&artifact.counts, &db));
    assert_same_content(&env.content(&new), &env.content(&db));
    routines_work(&env, &new);
}

/// The password of the option file a failing dump is given in the wrong-password case.
const WRONG_PASSWORD: &str = "not-the-password";

/// A dump that must fail: how the case makes it fail (the run, and what its message must
/// name), and the exit code it must fail with.
struct DumpFailure {
    case: &'static str,
    code: i32,
    fail: fn(&Env) -> (Run, Vec<String>),
}

/// Each case in a new sandbox: the error record and exit code, the message naming the cause,
/// nothing at all in the store, and no password (right or wrong) in the output.
#[test]
fn a_failed_dump_says_why_with_its_exit_code_and_leaves_nothing() {
    let cases = [
        DumpFailure {
            case: "a wrong password is a configuration error",
            code: 78,
            fail: |env| {
                let wrong = env
                    .server
                    .option_file_for(&env.sb, "wrong.cnf", &env.server.user, WRONG_PASSWORD, "");
                let run = env.dump_to(&wrong, &env.sb.store(), &["--database", "mysql"]);
                (run, vec!["Access denied".into()])
            },
        },
        DumpFailure {
            case: "an unknown database is no input",
            code: 66,
            fail: |env| {
                let nope = mysql_unique_name("bk_nope_");
                (env.dump(&["--database", &nope]), vec![nope])
            },
        },
        DumpFailure {
            case: "an option file readable by others is refused",
            code: 78,
            fail: |env| {
                std::fs::set_permissions(&env.admin, std::fs::Permissions::from_mode(0o644)).unwrap();
                let run = env.dump(&["--database", "mysql"]);
                (run, vec!["admin.cnf".into(), "chmod 600".into()])
            },
        },
        DumpFailure {
            case: "a missing dump program is unavailable",
            code: 69,
            fail: |env| {
                let (db, _source) = env.new_db("bk_nodump_");
                let bin = env.sb.path("bin");
                std::fs::create_dir(&bin).unwrap();
                let client = ["/usr/bin/mariadb", "/usr/local/bin/mariadb", "/usr/bin/mysql"]
                    .into_iter()
                    .find(|p| Path::new(p).exists())
                    .expect("the mariadb client");
                std::os::unix::fs::symlink(client, bin.join("mariadb")).unwrap();
                let store = env.sb.store();
                let admin = env.admin.to_str().unwrap();
                let mut cmd = env.sb.cmd(
                    "bk-dump",
                    &["mysql", "--defaults-file", admin, "--database", &db, "--to", &store],
                );
                cmd.env("PATH", &bin);
                (run_cmd(cmd, ""), vec!["mariadb-dump".into(), "PATH".into()])
            },
        },
        DumpFailure {
            case: "an unreachable server is unavailable",
            code: 69,
            fail: |env| {
                let port = free_port().to_string();
                let run = env.dump(&["--host", "127.0.0.1", "--port", &port, "--database", "mysql"]);
                (run, vec![])
            },
        },
    ];
    for DumpFailure { case, code, fail } in cases {
        let Some(env) = Env::new() else { return };
        let (run, says) = fail(&env);
        let says: Vec<&str> = says.iter().map(String::as_str).collect();
        run.failed(case, code, &says);
        assert_eq!(files_below(&env.sb.path("store")), Vec::<PathBuf>::new(), "{case}");
        run.assert_hides(case, &[&env.server.password, WRONG_PASSWORD]);
    }
}

/// A failure before any dump (the login refused, a database missing) names each backup the
/// command line names, so that bk-notify can say whose backups failed; with {host} in --name,
/// which the server decides, it stays unnamed.
#[test]
fn a_failure_before_the_dump_names_the_backups_of_the_command_line() {
    let Some(env) = Env::new() else { return };
    let wrong = env
        .server
        .option_file_for(&env.sb, "wrong.cnf", &env.server.user, WRONG_PASSWORD, "");
    let nope = mysql_unique_name("bk_nope_");
    // Each case: the option file, bk-dump's arguments, the exit code, the error records' names.
    let two = [
        "--database",
        "mysql",
        "--database",
        "Other DB",
        "--name",
        "job-{database}",
    ];
    let missing = ["--database", &nope, "--name", "{engine}-{database}"];
    let host = ["--database", "mysql", "--name", "{host}-{database}"];
    let cases = [
        (
            "a wrong password, two databases",
            &wrong,
            &two[..],
            78,
            vec![Some("job-mysql".to_string()), Some("job-other-db".to_string())],
        ),
        (
            "a missing database",
            &env.admin,
            &missing[..],
            66,
            vec![Some(format!("mysql-{nope}"))],
        ),
        ("{host} in --name", &wrong, &host[..], 78, vec![None]),
    ];
    for (case, option_file, args, code, names) in cases {
        let run = env.dump_to(option_file, &env.sb.store(), args);
        assert_eq!(run.code, code, "{case}: {}", run.stderr);
        let named: Vec<Option<String>> = run
            .records()
            .into_iter()
            .filter_map(|r| if let Record::Error(e) = r { Some(e.name) } else { None })
            .collect();
        assert_eq!(named, names, "{case}: the error records' names\n{}", run.stdout);
    }
}

/// A throwaway MariaDB server of one test: its own data directory, on a Unix socket only,
/// killed when it goes.
struct PrivateServer {
    child: Child,
    dir: PathBuf,
}

impl PrivateServer {
    fn start(sb: &Sandbox) -> PrivateServer {
        let dir = sb.path("private-mariadb");
        std::fs::create_dir(&dir).unwrap();
        let as_root: &[&str] = if nix::unistd::geteuid().is_root() {
            &["--user=root"]
        } else {
            &[]
        };
        let install = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .args(as_root)
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args(["--auth-root-authentication-method=socket", "--skip-test-db"])
            .output()
            .expect("mariadb-install-db");
        assert!(
            install.status.success(),
            "mariadb-install-db: {}{}",
            String::from_utf8_lossy(&install.stdout),
            String::from_utf8_lossy(&install.stderr)
        );
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .args(as_root)
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-error={}", dir.join("err.log").display()))
            .args(["--skip-networking", "--innodb-buffer-pool-size=64M"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd");
        let mut server = PrivateServer { child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if server.try_sql("SELECT 1").is_ok() {
                return server;
            }
            let log = std::fs::read_to_string(server.dir.join("err.log")).unwrap_or_default();
            assert!(
                server.child.try_wait().unwrap().is_none(),
                "the private mariadbd exited: {log}"
            );
            assert!(Instant::now() < deadline, "the private mariadbd is not ready: {log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("sock")
    }

    fn try_sql(&self, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new("mariadb");
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["--user=root", "--batch", "--skip-column-names"]);
        let run = run_cmd(cmd, sql);
        if run.code == 0 {
            Ok(run.stdout)
        } else {
            Err(run.stderr)
        }
    }

    fn sql(&self, sql: &str) -> String {
        self.try_sql(sql).unwrap_or_else(|e| panic!("{e}\nSQL: {sql}"))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn the_server_dying_mid_dump_leaves_nothing() {
    if !have_root() {
        return;
    }
    let sb = Sandbox::new();
    let mut server = PrivateServer::start(&sb);
    server.sql(
        "CREATE DATABASE big;
         USE big;
         CREATE TABLE big.t (id INT PRIMARY KEY, pad VARCHAR(200)) ENGINE=InnoDB;
         INSERT INTO big.t SELECT seq, CONCAT(seq, REPEAT('q', 150)) FROM seq_1_to_300000;",
    );
    let option_file = sb.path("private.cnf");
    std::fs::write(
        &option_file,
        format!("[client]\nuser=root\nsocket={}\n", server.socket().display()),
    )
    .unwrap();
    std::fs::set_permissions(&option_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // zstd at level 19 is slow enough that the dump is still reading rows when the
    // server goes, however fast the machine.
    let store = sb.store();
    let child = sb.spawn(
        "bk-dump",
        &[
            "mysql",
            "--defaults-file",
            option_file.to_str().unwrap(),
            "--database",
            "big",
            "--level",
            "19",
            "--to",
            &store,
        ],
    );
    // Wait until mariadb-dump is reading the table's rows.
    let deadline = Instant::now() + Duration::from_secs(60);
    while server
        .sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT /*!40001 SQL_NO_CACHE */%'")
        .trim()
        == "0"
    {
        assert!(Instant::now() < deadline, "the dump never started reading rows");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    server.kill();
    let run = Run::from(child.wait_with_output().unwrap());
    assert_ne!(run.code, 0);
    assert_eq!(run.code, 69, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    let e = run.error();
    assert!(e.message.contains("Lost connection"), "{}", e.message);
    assert_eq!(e.name.as_deref(), Some("mysql-big"));
    assert!(run.artifacts().is_empty());
    assert_eq!(files_below(&sb.path("store")), Vec::<PathBuf>::new());
}

#[test]
fn restore_refuses_replaces_filters_and_checks_counts() {
    let Some(env) = Env::new() else { return };
    let (db, _source) = env.new_db("bk_rs_");
    env.sql(&format!(
        "USE {};
         CREATE TABLE t1 (id INT PRIMARY KEY, v VARCHAR(20));
         INSERT INTO t1 VALUES (1, 'a'), (2, 'b'), (3, 'c');
         CREATE TABLE t2 (id INT PRIMARY KEY);
         CREATE TABLE `t 3` (x INT);
         CREATE TABLE audit (id INT);
         CREATE TRIGGER t2_audit AFTER INSERT ON t2 FOR EACH ROW INSERT INTO audit VALUES (NEW.id);
         INSERT INTO t2 SELECT seq FROM seq_1_to_5;
         CREATE VIEW v2 AS SELECT id FROM t2;
         CREATE FUNCTION thrice(x INT) RETURNS INT DETERMINISTIC RETURN x * 3;",
        mysql_ident(&db)
    ));
    let artifact = env.dump(&["--database", &db]).ok().artifact();
    assert_eq!(
        by_table(&artifact.counts, &db),
        [("t1", 3), ("t2", 5), ("t 3", 0), ("audit", 5)]
            .into_iter()
            .map(|(t, n)| (t.to_string(), n))
            .collect()
    );

    // A target holding a table: refused, and left as it was.
    let (target, _target) = env.new_db("bk_rs_live_");
    env.sql(&format!(
        "CREATE TABLE {}.keep (x INT); INSERT INTO {}.keep VALUES (42);",
        mysql_ident(&target),
        mysql_ident(&target)
    ));
    let run = env.restore(&artifact, &["--database", &target]).code(73);
    assert!(run.error().message.contains("--replace"), "{}", run.stderr);
    assert_eq!(env.tables(&target), ["keep"]);
    assert_eq!(env.count(&target, "keep"), 1);

    // A target holding only a routine is not empty either.
    let (routine_only, _routine_only) = env.new_db("bk_rs_proc_");
    env.sql(&format!(
        "CREATE FUNCTION {}.precious() RETURNS INT DETERMINISTIC RETURN 7",
        mysql_ident(&routine_only)
    ));
    let run = env.restore(&artifact, &["--database", &routine_only]).code(73);
    assert!(run.error().message.contains("--replace"), "{}", run.stderr);
    assert_eq!(
        env.sql(&format!("SELECT {}.precious()", mysql_ident(&routine_only)))
            .trim(),
        "7"
    );

    // --replace: dropped and created again, holding exactly the backup.
    let restored = env
        .restore(&artifact, &["--database", &target, "--replace"])
        .ok()
        .restored();
    assert!(restored.complete);
    assert_eq!(by_table(&restored.counts, &target), by_table(&artifact.counts, &db));
    assert_same_content(&env.content(&target), &env.content(&db));

    // --table: that table only, and the record says the restore is partial.
    let partial = mysql_unique_name("bk_rs_part_");
    let _partial = env.server.database(&partial);
    let restored = env
        .restore(&artifact, &["--database", &partial, "--table", "t1"])
        .ok()
        .restored();
    assert!(!restored.complete);
    assert_eq!(restored.counts, BTreeMap::from([(format!("{partial}.t1"), 3)]));
    assert_eq!(env.tables(&partial), ["t1"]);
    let views = env.sql(&format!(
        "SELECT COUNT(*) FROM information_schema.VIEWS WHERE TABLE_SCHEMA = {}",
        mysql_string(&partial)
    ));
    assert_eq!(views.trim(), "0");

    // A table the backup does not hold: nothing restored.
    let none = mysql_unique_name("bk_rs_none_");
    let _none = env.server.database(&none);
    let run = env
        .restore(&artifact, &["--database", &none, "--table", "nope"])
        .code(66);
    assert!(run.error().message.contains("nope"), "{}", run.stderr);
    let exists = env.sql(&format!(
        "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = {}",
        mysql_string(&none)
    ));
    assert_eq!(exists.trim(), "0");

    // A manifest whose count lies: the data is restored, the difference reported, exit 65.
    let mut lying = artifact.clone();
    *lying.counts.get_mut(&format!("{db}.t2")).unwrap() += 1;
    let checked = mysql_unique_name("bk_rs_lie_");
    let _checked = env.server.database(&checked);
    let run = env.restore(&lying, &["--database", &checked]).code(65);
    let message = run.error().message;
    assert!(message.contains("t2: 6 rows expected, 5 found"), "{message}");
    let restored = run.restored();
    assert_eq!(restored.counts[&format!("{checked}.t2")], 5);
    assert_eq!(env.count(&checked, "t2"), 5);
}

#[test]
fn several_databases_make_one_artifact_each() {
    let Some(env) = Env::new() else { return };
    let dbs = [
        mysql_unique_name("bk_multi_a_"),
        mysql_unique_name("bk Multi-B "),
        mysql_unique_name("bk_multi_c_"),
    ];
    let _guards: Vec<MysqlGuard> = dbs.iter().map(|d| env.create_db(d)).collect();
    for (i, db) in dbs.iter().enumerate() {
        env.sql(&format!(
            "USE {db}; CREATE TABLE t (id INT PRIMARY KEY); INSERT INTO t SELECT seq FROM seq_1_to_{};",
            i + 1,
            db = mysql_ident(db)
        ));
    }
    // A user who sees these databases only: "every database" is then exactly them, whatever
    // other tests create and drop meanwhile.
    let (user, password, _account) = env.create_user("bk_multi_");
    for db in &dbs {
        env.sql(&format!(
            "GRANT SELECT, LOCK TABLES, SHOW VIEW, TRIGGER, EVENT ON {}.* TO {}@'127.0.0.1'",
            grant_db(db),
            mysql_string(&user)
        ));
    }
    let option_file =
        env.server
            .option_file_for(&env.sb, "multi.cnf", &user, &password, "[mysqldump]\nno_tablespaces\n");

    let run = env.dump_to(&option_file, &env.sb.store(), &[]).ok();
    let mut artifacts = run.artifacts();
    artifacts.sort_by(|a, b| a.source.database.cmp(&b.source.database));
    let mut expected: Vec<&String> = dbs.iter().collect();
    expected.sort();
    assert_eq!(
        artifacts
            .iter()
            .map(|a| a.source.database.as_ref().unwrap())
            .collect::<Vec<_>>(),
        expected
    );
    for a in &artifacts {
        let db = a.source.database.as_ref().unwrap();
        let i = dbs.iter().position(|d| d == db).unwrap();
        assert_eq!(a.name, default_name(db));
        assert_eq!(a.counts, BTreeMap::from([(format!("{db}.t"), i as u64 + 1)]));
        let manifest = env.sb.path("store").join(&a.name).join(format!("{}.json", a.id));
        assert!(manifest.is_file(), "{}", manifest.display());
    }
    assert_eq!(
        artifacts[..]
            .iter()
            .map(|a| &a.name)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3
    );

    // A template names each database's backup.
    let store2 = env.sb.path("store2").display().to_string();
    let run = env
        .dump_to(&option_file, &store2, &["--name", "{engine}-{database}"])
        .ok();
    let mut names: Vec<String> = run.artifacts().into_iter().map(|a| a.name).collect();
    names.sort();
    let mut expected: Vec<String> = dbs.iter().map(|d| default_name(d)).collect();
    expected.sort();
    assert_eq!(names, expected);
    let run = env
        .dump_to(
            &option_file,
            &store2,
            &["--database", &dbs[1], "--name", "nightly-{database}"],
        )
        .ok();
    assert_eq!(
        run.artifact().name,
        default_name(&dbs[1]).replacen("mysql-", "nightly-", 1)
    );

    // One literal name for two databases: refused before anything is written.
    let store3 = env.sb.path("store3");
    let run = env.dump_to(
        &option_file,
        store3.to_str().unwrap(),
        &["--database", &dbs[0], "--database", &dbs[2], "--name", "fixed"],
    );
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(run.error().message.contains("fixed"), "{}", run.stderr);
    assert_eq!(files_below(&store3), Vec::<PathBuf>::new());
}

/// Databases a restore works in (`bk_restore_*` scratch copies, `bk_old_*` old tables).
fn restore_work_databases(env: &Env) -> Vec<String> {
    env.sql("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE 'bk\\_restore\\_%' OR SCHEMA_NAME LIKE 'bk\\_old\\_%'")
        .lines()
        .map(String::from)
        .collect()
}

/// No restore work database besides those of `before` stays behind (other tests' restores
/// may run meanwhile: theirs go when they end).
#[track_caller]
fn assert_no_work_database_left(env: &Env, before: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<String> = restore_work_databases(env)
            .into_iter()
            .filter(|d| !before.contains(d))
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What must not change in a database: [`Env::content`] and CHECKSUM TABLE of every table.
fn snapshot(env: &Env, db: &str) -> (BTreeMap<String, String>, String) {
    let tables: Vec<String> = env
        .tables(db)
        .iter()
        .map(|t| format!("{}.{}", mysql_ident(db), mysql_ident(t)))
        .collect();
    (
        env.content(db),
        env.sql(&format!("CHECKSUM TABLE {} EXTENDED", tables.join(", "))),
    )
}

/// A live database unlike the sample: same table names with other rows and columns, a view
/// where the backup has a table, a trigger, a routine and an event of its own.
fn create_live(env: &Env, db: &str) {
    env.sql(&format!(
        "USE {};
         CREATE TABLE `people` (`id` INT PRIMARY KEY, `old` VARCHAR(20));
         INSERT INTO `people` VALUES (1, 'old one'), (2, 'old two');
         CREATE TABLE `old only` (`x` INT);
         INSERT INTO `old only` SELECT seq FROM seq_1_to_300;
         CREATE TABLE `old log` (`x` INT);
         CREATE TRIGGER `old trigger` AFTER INSERT ON `people` FOR EACH ROW INSERT INTO `old log` VALUES (NEW.`id`);
         CREATE VIEW `many` AS SELECT `id` FROM `people`;
         CREATE FUNCTION `twice`(x INT) RETURNS INT DETERMINISTIC RETURN x * 200;
         CREATE FUNCTION `old function`() RETURNS INT DETERMINISTIC RETURN 1;
         CREATE EVENT `old event` ON SCHEDULE EVERY 1 DAY STARTS '2031-01-01 00:00:00' DISABLE DO DELETE FROM `old log`;",
        mysql_ident(db)
    ));
}

#[test]
fn replace_swaps_in_exactly_the_backup() {
    let Some(env) = Env::new() else { return };
    let (db, _source) = env.new_db("bk_swap_src_");
    let rows = create_sample(&env, &db);
    let artifact = env.dump(&["--database", &db]).ok().artifact();
    let (live, _live) = env.new_db("bk_swap_live_");
    create_live(&env, &live);
    let before = restore_work_databases(&env);

    let run = env.restore(&artifact, &["--database", &live, "--replace"]).ok();
    let restored = run.restored();
    assert!(restored.complete);
    assert_eq!(by_table(&restored.counts, &live), rows);
    assert_same_content(&env.content(&live), &env.content(&db));
    routines_work(&env, &live);
    assert_no_work_database_left(&env, &before);

    // --table with --replace: only that table (and its triggers) is replaced.
    let (partial, _partial) = env.new_db("bk_swap_part_");
    create_live(&env, &partial);
    let run = env
        .restore(&artifact, &["--database", &partial, "--replace", "--table", "people"])
        .ok();
    assert!(!run.restored().complete);
    assert_eq!(
        env.tables(&partial),
        ["old log", "old only", "people"],
        "people comes from the backup, the rest stays"
    );
    assert_eq!(env.count(&partial, "people"), 4);
    assert_eq!(env.count(&partial, "old only"), 300);
    let objects = env.sql(&format!(
        "SELECT GROUP_CONCAT(TRIGGER_NAME ORDER BY 1) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = {p};
         SELECT GROUP_CONCAT(ROUTINE_NAME ORDER BY 1) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = {p};
         SELECT COUNT(*) FROM information_schema.VIEWS WHERE TABLE_SCHEMA = {p};",
        p = mysql_string(&partial)
    ));
    assert_eq!(objects, "people log\nold function,twice\n1\n");
    assert_eq!(
        env.sql(&format!("SELECT {}.`twice`(1)", mysql_ident(&partial))).trim(),
        "200"
    );
    assert_no_work_database_left(&env, &before);
}

/// The artifact of a dump made with `--compress none`, its content changed by `change`,
/// the record updated to match (size and sha256): a backup that passes every check of the
/// stored bytes and fails only as it is loaded or at its end.
fn altered(env: &Env, artifact: &Artifact, tag: &str, change: impl Fn(&str) -> String) -> Artifact {
    let path = env.sb.path("store").join(&artifact.name).join(&artifact.file);
    let content = change(&std::fs::read_to_string(&path).unwrap());
    let mut altered = artifact.clone();
    altered.file = format!("{}.{tag}.sql", artifact.id);
    let altered_path = path.with_file_name(&altered.file);
    std::fs::write(&altered_path, &content).unwrap();
    altered.location = altered.location.replace(&artifact.file, &altered.file);
    altered.bytes = content.len() as u64;
    altered.content_bytes = content.len() as u64;
    altered.sha256 = hex::encode(Sha256::digest(content.as_bytes()));
    altered
}

#[test]
fn a_failed_replace_leaves_the_live_database_as_it_was() {
    let Some(env) = Env::new() else { return };
    let (db, _source) = env.new_db("bk_fail_src_");
    create_sample(&env, &db);
    let artifact = env.dump(&["--database", &db, "--compress", "none"]).ok().artifact();
    let (live, _live) = env.new_db("bk_fail_live_");
    create_live(&env, &live);
    let live_before = snapshot(&env, &live);
    let before = restore_work_databases(&env);

    let mut lying = artifact.clone();
    *lying.counts.get_mut(&format!("{db}.many")).unwrap() += 1;
    let cases: [(&str, Artifact, i32, &str); 3] = [
        (
            // The server refuses a statement late in the dump.
            "a server error midway",
            altered(&env, &artifact, "refused", |sql| {
                let at = sql.rfind("INSERT INTO `no key`").unwrap();
                format!(
                    "{}INSERT INTO `no such table`{}",
                    &sql[..at],
                    &sql[at + "INSERT INTO `no key`".len()..]
                )
            }),
            74,
            "no such table",
        ),
        (
            // Every statement loads; the end marker is missing.
            "a dump cut short",
            altered(&env, &artifact, "cut", |sql| {
                sql.replace("-- Dump completed", "-- Dump interrupted")
            }),
            65,
            "Dump completed",
        ),
        (
            "a count that differs from the manifest",
            lying,
            65,
            "many: 5001 rows expected, 5000 found",
        ),
    ];
    for (case, artifact, code, said) in cases {
        let run = env.restore(&artifact, &["--database", &live, "--replace"]);
        assert_eq!(run.code, code, "{case}: stdout: {}\nstderr: {}", run.stdout, run.stderr);
        let message = run.error().message;
        assert!(
            message.contains(said) && message.contains("untouched"),
            "{case}: {message}"
        );
        assert!(
            run.records().iter().all(|r| !matches!(r, Record::Restored(_))),
            "{case}: {}",
            run.stdout
        );
        assert_eq!(snapshot(&env, &live), live_before, "{case}: the live database changed");
        assert_no_work_database_left(&env, &before);
    }
}

/// Starts bk-restore --replace of `artifact` into `live` and returns it once it is loading
/// rows of `table` into its scratch database, with that database's name.
fn restore_until_loading(env: &Env, artifact: &Artifact, live: &str, table: &str) -> (Child, String) {
    let restore = env.sb.cmd(
        "bk-restore",
        &[
            "--defaults-file",
            env.admin.to_str().unwrap(),
            "--database",
            live,
            "--replace",
        ],
    );
    let mut child = spawn_with_stdin(restore, &artifact_line(artifact));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let scratch = env.sql(&format!(
            // (or in the live database itself, where a restore that drops first loads)
            "SELECT TABLE_SCHEMA FROM information_schema.TABLES WHERE (TABLE_SCHEMA LIKE 'bk\\_restore\\_%' OR TABLE_SCHEMA = {}) AND TABLE_NAME = {}",
            mysql_string(live),
            mysql_string(table)
        ));
        if let Some(scratch) = scratch.lines().next() {
            let rows = env.sql(&format!(
                "SELECT COUNT(*) FROM {}.{} LIMIT 1",
                mysql_ident(scratch),
                mysql_ident(table)
            ));
            if rows.trim() != "0" {
                return (child, scratch.to_string());
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "bk-restore ended before loading {table}"
        );
        assert!(Instant::now() < deadline, "bk-restore never loaded {table}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_replace_leaves_the_live_database_as_it_was() {
    let Some(env) = Env::new() else { return };
    let (db, _source) = env.new_db("bk_kill_src_");
    // A table of its own name, so that this test finds its restore's scratch database.
    let big = mysql_unique_name("big_");
    env.sql(&format!(
        "USE {};
         CREATE TABLE {big} (id INT PRIMARY KEY, pad VARCHAR(200)) ENGINE=InnoDB;
         INSERT INTO {big} SELECT seq, CONCAT(seq, REPEAT('q', 150)) FROM seq_1_to_400000;",
        mysql_ident(&db),
        big = mysql_ident(&big)
    ));
    let artifact = env.dump(&["--database", &db]).ok().artifact();
    let (live, _live) = env.new_db("bk_kill_live_");
    create_live(&env, &live);
    let live_before = snapshot(&env, &live);
    let before = restore_work_databases(&env);

    // SIGTERM: the scratch database is dropped, the live one untouched.
    let (child, scratch) = restore_until_loading(&env, &artifact, &live, &big);
    let _scratch = env.server.database(&scratch);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM).unwrap();
    let run = Run::from(child.wait_with_output().unwrap());
    assert_eq!(run.code, 143, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    assert!(
        run.records().iter().all(|r| !matches!(r, Record::Restored(_))),
        "{}",
        run.stdout
    );
    assert_eq!(snapshot(&env, &live), live_before, "SIGTERM: the live database changed");
    assert_no_work_database_left(&env, &before);

    // SIGKILL: nothing can clean up; the live database is untouched all the same, and the
    // scratch database left behind is named by the next restore.
    let (mut child, scratch) = restore_until_loading(&env, &artifact, &live, &big);
    let _scratch = env.server.database(&scratch);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(snapshot(&env, &live), live_before, "SIGKILL: the live database changed");
    let copy = mysql_unique_name("bk_kill_copy_");
    let _copy = env.server.database(&copy);
    let run = env.restore(&artifact, &["--database", &copy]).ok();
    assert!(
        run.stderr
            .contains(&format!("warning: {scratch} is the scratch database")),
        "{}",
        run.stderr
    );
    assert_eq!(env.count(&copy, &big), 400000);
}
