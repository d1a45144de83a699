//! The postgres engine through the real binaries against a real PostgreSQL 15 (the server
//! tests/services.sh starts, and private throwaway clusters where a test must stop one):
//! exact round trips in both formats, counts consistent with the dump while another
//! connection writes, no password on any command line, every failure leaving nothing in
//! the store, and bk-restore's refusals and partial restores.
//!
//! Every test works in databases of its own, named uniquely, dropped at the end.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bk_core::name::sanitize;
use bk_core::record::{Artifact, Record};
use bk_tests::{
    artifact_line, files_below, free_port, needs, output_of, pg_ident, pg_server, pg_unique_name, run_cmd,
    spawn_with_stdin, unzstd, PgDatabase, PgServer, Run, Sandbox,
};

/// A test's server, sandbox and password file.
struct Pg {
    pg: PgServer,
    sb: Sandbox,
    pgpass: PathBuf,
}

fn setup() -> Option<Pg> {
    let pg = pg_server()?;
    let sb = Sandbox::new();
    let pgpass = pg.write_pgpass(&sb, "pgpass");
    Some(Pg { pg, sb, pgpass })
}

impl Pg {
    fn with_server(pg: PgServer) -> Pg {
        let sb = Sandbox::new();
        let pgpass = pg.write_pgpass(&sb, "pgpass");
        Pg { pg, sb, pgpass }
    }

    /// `bk-dump postgres ARGS --to STORE` with the connection options and PGPASSFILE.
    fn dump_cmd(&self, args: &[&str]) -> Command {
        let store = self.sb.store();
        let mut all = vec!["postgres"];
        all.extend(args);
        all.extend(["--to", &store]);
        self.pg.cmd(&self.sb, &self.pgpass, "bk-dump", &all)
    }

    fn dump(&self, args: &[&str]) -> Run {
        run_cmd(self.dump_cmd(args), "")
    }

    /// bk-restore with the artifact record on stdin.
    fn restore(&self, artifact: &Artifact, args: &[&str]) -> Run {
        run_cmd(
            self.pg.cmd(&self.sb, &self.pgpass, "bk-restore", args),
            &artifact_line(artifact),
        )
    }

    /// A failed restore created nothing: no database of that name.
    fn assert_no_database(&self, name: &str) {
        let sql = format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'");
        assert_eq!(self.pg.strings("postgres", &sql), ["0"], "nothing was created");
    }

    /// The sample in a new database with an awkward name, and its backup (`dump_args` added):
    /// the name, the database's guard and the artifact.
    fn dumped_sample(&self, dump_args: &[&str]) -> (String, PgDatabase, Artifact) {
        let name = odd_name();
        let source = create_sample(&self.pg, &name);
        let mut args = vec!["--dbname", &name];
        args.extend(dump_args);
        let artifact = self.dump(&args).ok().artifact();
        (name, source, artifact)
    }

    fn store_files(&self) -> Vec<PathBuf> {
        files_below(&self.sb.path("store"))
    }
}

/// A database name with spaces, upper case and a dash: it needs quoting everywhere.
fn odd_name() -> String {
    format!("bk Test-db {}", pg_unique_name(""))
}

/// The sample: several schemas, NULLs, empty strings, bytea with every byte value, 4-byte
/// UTF-8, a row of several MB, zero-row tables, a view, a materialized view, a trigger and
/// its function, a sequence that has been used, a partitioned table.
const SAMPLE: &str = r#"
CREATE SCHEMA app;
CREATE SCHEMA "Other Schema";
CREATE TABLE app.people(
    id serial PRIMARY KEY, name text, note text, photo bytea, score numeric,
    tags text[], meta jsonb, born timestamptz);
CREATE INDEX people_name ON app.people(name);
CREATE TABLE app.audit(id bigint GENERATED ALWAYS AS IDENTITY, person int, what text);
CREATE FUNCTION app.log_person() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO app.audit(person, what) VALUES (NEW.id, 'insert of ' || coalesce(NEW.name, 'NULL'));
    RETURN NEW;
END $$;
CREATE TRIGGER people_log AFTER INSERT ON app.people FOR EACH ROW EXECUTE FUNCTION app.log_person();
INSERT INTO app.people(name, note, photo, score, tags, meta, born) VALUES
    (NULL, '', (SELECT decode(string_agg(lpad(to_hex(g), 2, '0'), '' ORDER BY g), 'hex')
                FROM generate_series(0, 255) g), NULL, NULL, NULL, NULL),
    ('🦀 𝄞 Ünïcødé 漢字 😀', E'tab\there\nnew line \\ backslash '' quote "double"', ''::bytea,
     'NaN', '{"a b", NULL, "🦀"}', '{"k": [1, null, "𝄞"]}', '2026-11-22 00:15:00+00'),
    ('long', (SELECT string_agg(md5(g::text), '' ORDER BY g) FROM generate_series(1, 100000) g),
     NULL, 1e-30, '{}', 'null', 'infinity'),
    ('', NULL, '\x00'::bytea, 123456789012345678901234567890.123456789, NULL, '{}', NULL);
INSERT INTO app.people(name, note, score)
    SELECT 'p' || g, repeat('n', g % 50), g / 3.0 FROM generate_series(1, 2000) g;
CREATE TABLE app.empty(x int, y text);
CREATE TABLE "Other Schema"."Mixed Case"("Key" int, "välue" text);
INSERT INTO "Other Schema"."Mixed Case" VALUES (1, 'one'), (2, NULL), (NULL, ''), (4, '🦀');
CREATE TABLE "Other Schema".nothing(z int);
CREATE TABLE public.plain_t(v text);
INSERT INTO public.plain_t SELECT 'v' || g FROM generate_series(1, 10) g;
CREATE VIEW app.named AS SELECT id, name FROM app.people WHERE name IS NOT NULL;
CREATE MATERIALIZED VIEW app.stats AS SELECT count(*) AS n, sum(length(note)) AS chars FROM app.people;
CREATE SEQUENCE app.counter START 100;
SELECT nextval('app.counter') FROM generate_series(1, 5);
CREATE TABLE app.events(id int, at date NOT NULL, what text) PARTITION BY RANGE (at);
CREATE TABLE app.events_2025 PARTITION OF app.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE app.events_2026 PARTITION OF app.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE app.events_other PARTITION OF app.events DEFAULT;
INSERT INTO app.events SELECT g, date '2025-06-01' + g, 'e' || g FROM generate_series(1, 400) g;
"#;

/// The tables with data in the sample, as the manifest names them, and their rows.
fn sample_counts() -> BTreeMap<String, u64> {
    [
        ("app.people", 2004),
        ("app.audit", 2004),
        ("app.empty", 0),
        ("Other Schema.Mixed Case", 4),
        ("Other Schema.nothing", 0),
        ("public.plain_t", 10),
        ("app.events_2025", 213),
        ("app.events_2026", 187),
        ("app.events_other", 0),
    ]
    .into_iter()
    .map(|(t, n)| (t.to_string(), n))
    .collect()
}

fn create_sample(pg: &PgServer, name: &str) -> PgDatabase {
    let db = pg.create_database(name);
    pg.execute(name, SAMPLE);
    db
}

const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'";

/// Everything a restore must bring back: every row of every table and materialized view
/// (a checksum over their text forms), and the definitions of relations, views,
/// functions, triggers, constraints, and every sequence's position.
fn fingerprint(pg: &PgServer, db: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let relations = pg.strings(
        db,
        &format!(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'm') AND {USER_SCHEMAS} ORDER BY 1"
        ),
    );
    for rel in relations {
        let sum = pg.strings(
            db,
            &format!(
                "SELECT count(*) || ' ' || md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {rel} t"
            ),
        );
        out.insert(format!("rows {rel}"), sum.join(""));
    }
    let catalog = [
        (
            "relation",
            format!(
                "SELECT n.nspname || '.' || c.relname || ' ' || c.relkind::text || ' ' || c.relpersistence::text FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_SCHEMAS}"
            ),
        ),
        (
            "partition",
            format!(
                "SELECT c.oid::regclass || ' ' || pg_get_expr(c.relpartbound, c.oid) FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relispartition AND {USER_SCHEMAS}"
            ),
        ),
        (
            "function",
            format!(
                "SELECT p.oid::regprocedure || ' ' || pg_get_functiondef(p.oid) FROM pg_proc p
                 JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {USER_SCHEMAS}"
            ),
        ),
        (
            "view",
            "SELECT schemaname || '.' || viewname || ' ' || definition FROM pg_views
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
                .to_string(),
        ),
        (
            "matview",
            "SELECT schemaname || '.' || matviewname || ' ' || ispopulated || ' ' || definition FROM pg_matviews"
                .to_string(),
        ),
        (
            "trigger",
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal".to_string(),
        ),
        (
            "constraint",
            format!(
                "SELECT c.conrelid::regclass || ' ' || c.conname || ' ' || pg_get_constraintdef(c.oid)
                 FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace WHERE {USER_SCHEMAS}"
            ),
        ),
        (
            "index",
            "SELECT indexdef FROM pg_indexes WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
                .to_string(),
        ),
        (
            "sequence",
            "SELECT schemaname || '.' || sequencename || ' last_value=' || coalesce(last_value::text, 'NULL')
             FROM pg_sequences"
                .to_string(),
        ),
    ];
    for (what, sql) in catalog {
        let mut items = pg.strings(db, &sql);
        items.sort();
        out.insert(what.to_string(), items.join("\n"));
    }
    out
}

/// Asserts the catalog and data of two databases are the same, naming what differs.
fn assert_same(pg: &PgServer, source: &str, restored: &str) {
    let (a, b) = (fingerprint(pg, source), fingerprint(pg, restored));
    for key in a.keys().chain(b.keys()) {
        assert_eq!(a.get(key), b.get(key), "{key} differs between {source} and {restored}");
    }
}

fn check_artifact(artifact: &Artifact, pg: &PgServer, db: &str, format: &str) {
    assert_eq!(artifact.engine, "postgres");
    assert_eq!(artifact.format, format);
    assert_eq!(artifact.name, format!("postgres-{}", sanitize(db)));
    assert!(artifact.file.ends_with(&format!(".{format}.zst")), "{}", artifact.file);
    assert_eq!(artifact.source.database.as_deref(), Some(db));
    assert_eq!(artifact.source.port, Some(pg.port));
    assert_eq!(artifact.tool.program, "pg_dump");
    assert!(artifact.tool.version.starts_with("15"), "{:?}", artifact.tool);
    assert_eq!(
        artifact.counts,
        sample_counts(),
        "rows per schema.table, zeros and leaf partitions included"
    );
    assert!(
        !artifact.counts.contains_key("app.events"),
        "a partitioned table holds no rows itself"
    );
    assert!(
        artifact.content_bytes > 3_200_000,
        "the long row is in: {}",
        artifact.content_bytes
    );
}

/// Restores into a new database and checks it against the source, row by row.
fn restore_and_compare(t: &Pg, artifact: &Artifact, source: &str, extra: &[&str]) -> PgDatabase {
    let target = t.pg.database(&odd_name());
    let mut args = vec!["--database", &target.name];
    args.extend(extra);
    let run = t.restore(artifact, &args).ok();
    let restored = run.restored();
    assert_eq!(
        restored.counts, artifact.counts,
        "the restored record's counts are the manifest's"
    );
    assert!(restored.complete);
    assert_eq!(restored.id, artifact.id);
    assert_eq!(restored.target["database"], target.name.as_str());
    assert_same(&t.pg, source, &target.name);
    target
}

/// The sequence, trigger and function came back working, not only as definitions.
fn check_restored_objects_work(pg: &PgServer, db: &str) {
    assert_eq!(pg.strings(db, "SELECT last_value FROM app.counter"), ["104"]);
    assert_eq!(pg.strings(db, "SELECT nextval('app.counter')"), ["105"]);
    pg.execute(db, "INSERT INTO app.people(name) VALUES ('after restore')");
    assert_eq!(
        pg.strings(
            db,
            "SELECT count(*) FROM app.audit WHERE what = 'insert of after restore'"
        ),
        ["1"],
        "the trigger fires in the restored database"
    );
    assert_eq!(
        pg.strings(db, "SELECT id FROM app.people WHERE name = 'after restore'"),
        ["2005"],
        "the serial's sequence went on from where it was"
    );
}

#[test]
fn custom_format_round_trip_is_exact() {
    let Some(t) = setup() else { return };
    let (name, _source, artifact) = t.dumped_sample(&[]);
    check_artifact(&artifact, &t.pg, &name, "pgdump");
    let stored = std::fs::read(&artifact.location).unwrap();
    assert_eq!(stored.len() as u64, artifact.bytes);

    let restored = restore_and_compare(&t, &artifact, &name, &[]);
    check_restored_objects_work(&t.pg, &restored.name);
    // Parallel pg_restore, from the temporary copy it needs.
    restore_and_compare(&t, &artifact, &name, &["--jobs", "2"]);
    assert!(
        !std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(&artifact.id)),
        "the temporary copy for --jobs is gone"
    );
}

#[test]
fn plain_format_round_trip_is_exact() {
    let Some(t) = setup() else { return };
    let (name, _source, artifact) = t.dumped_sample(&["--format", "plain"]);
    check_artifact(&artifact, &t.pg, &name, "pgsql");
    let restored = restore_and_compare(&t, &artifact, &name, &[]);
    check_restored_objects_work(&t.pg, &restored.name);
}

#[test]
fn globals_hold_roles_without_passwords() {
    let Some(t) = setup() else { return };
    let role = pg_unique_name("bk_role_");
    t.pg.execute(
        "postgres",
        &format!("CREATE ROLE {role} LOGIN PASSWORD 'Pw-{role}' CONNECTION LIMIT 3"),
    );
    struct DropRole<'a>(&'a PgServer, String);
    impl Drop for DropRole<'_> {
        fn drop(&mut self) {
            self.0.execute("postgres", &format!("DROP ROLE IF EXISTS {}", self.1));
        }
    }
    let _role = DropRole(&t.pg, role.clone());
    let name = pg_unique_name("bk_globals_");
    let _db = t.pg.create_database(&name);
    let run = t.dump(&["--globals", "--dbname", &name]).ok();
    let artifacts = run.artifacts();
    assert_eq!(artifacts.len(), 2, "{}", run.stdout);
    let globals = artifacts
        .iter()
        .find(|a| a.name == "postgres-globals")
        .expect("a postgres-globals artifact");
    assert_eq!(globals.engine, "postgres");
    assert_eq!(globals.format, "pgsql");
    assert!(globals.file.ends_with(".pgsql.zst"));
    assert_eq!(globals.tool.program, "pg_dumpall");
    assert!(globals.counts.is_empty());
    assert!(artifacts.iter().any(|a| a.name == format!("postgres-{name}")));

    let content = String::from_utf8(unzstd(&globals.location)).unwrap();
    assert!(content.contains(&format!("CREATE ROLE {role};")), "{content}");
    assert!(content.contains("CONNECTION LIMIT 3"), "the role's attributes are kept");
    assert!(!content.contains("SCRAM-SHA-256$"), "no password hash: {content}");
    assert!(!content.contains("PASSWORD 'md5"), "no password hash");
    assert!(!content.contains(&format!("Pw-{role}")));
    assert!(!content.contains("PASSWORD '"), "no password at all");
}

#[test]
fn standard_tools_alone_restore_the_custom_format() {
    let Some(t) = setup() else { return };
    let (name, _source, artifact) = t.dumped_sample(&[]);
    let target = t.pg.create_database(&odd_name());
    let file = t.sb.path("f.pgdump");
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        r#"zstd -dc "$1" > "$2" && pg_restore -h "$3" -p "$4" -U "$5" --exit-on-error -d "$6" "$2""#,
        "sh",
        &artifact.location,
        file.to_str().unwrap(),
        &t.pg.host,
        &t.pg.port.to_string(),
        &t.pg.user,
        &target.name,
    ])
    .env("PGPASSFILE", &t.pgpass);
    run_cmd(cmd, "").ok();
    assert_same(&t.pg, &name, &target.name);
    check_restored_objects_work(&t.pg, &target.name);
}

#[test]
fn counts_are_the_dumps_own_snapshot_while_another_connection_writes() {
    let Some(t) = setup() else { return };
    let name = pg_unique_name("bk_busy_");
    let _db = t.pg.create_database(&name);
    t.pg.execute(
        &name,
        "CREATE TABLE a(id bigserial PRIMARY KEY, v text); CREATE TABLE b(id bigserial PRIMARY KEY, v text);",
    );
    // Every transaction adds two rows to a and one to b: in any snapshot, a = 2 b.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, pg, name) = (stop.clone(), t.pg.clone(), name.clone());
        std::thread::spawn(move || {
            let mut client = pg.client(&name);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut tx = client.transaction().unwrap();
                tx.batch_execute(
                    "INSERT INTO a(v) VALUES (repeat(md5(random()::text), 10)), ('x');
                     INSERT INTO b(v) VALUES (repeat(md5(random()::text), 20));",
                )
                .unwrap();
                tx.commit().unwrap();
                n += 1;
            }
            n
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while t.pg.strings(&name, "SELECT count(*) FROM b")[0].parse::<u64>().unwrap() < 500 {
        assert!(Instant::now() < deadline, "the writer does not write");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut artifacts = Vec::new();
    for format in ["custom", "plain", "custom"] {
        artifacts.push(t.dump(&["--dbname", &name, "--format", format]).ok().artifact());
    }
    stop.store(true, Ordering::Relaxed);
    let transactions = writer.join().unwrap();
    assert!(transactions > 0);
    let mut seen = Vec::new();
    for artifact in &artifacts {
        let (a, b) = (artifact.counts["public.a"], artifact.counts["public.b"]);
        assert!(b >= 500);
        assert_eq!(a, 2 * b, "the manifest's counts are one snapshot");
        seen.push(b);
        let target = t.pg.database(&pg_unique_name("bk_busy_r_"));
        let run = t.restore(artifact, &["--database", &target.name]);
        assert_eq!(
            run.restored().counts,
            artifact.counts,
            "pg_dump dumped the very snapshot bk counted in"
        );
        run.ok();
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "the writer went on during the dumps: {seen:?}"
    );
}

/// The command lines of every process, NUL-separated arguments joined by spaces.
fn all_cmdlines() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .collect()
}

#[test]
fn no_password_on_any_command_line_while_a_dump_runs() {
    let Some(admin) = setup() else { return };
    // A backup user of its own, with a password nothing else uses, and only read rights.
    let user = pg_unique_name("bk_backup_");
    let password = format!("Secret-{}-pw", pg_unique_name(""));
    admin.pg.execute(
        "postgres",
        &format!("CREATE ROLE {user} LOGIN PASSWORD '{password}'; GRANT pg_read_all_data TO {user};"),
    );
    struct DropRole<'a>(&'a PgServer, String);
    impl Drop for DropRole<'_> {
        fn drop(&mut self) {
            self.0.execute("postgres", &format!("DROP ROLE IF EXISTS {}", self.1));
        }
    }
    let name = pg_unique_name("bk_cmdline_");
    let db = admin.pg.create_database(&name);
    let _role = DropRole(&admin.pg, user.clone());
    admin.pg.execute(
        &name,
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS v
         FROM generate_series(1, 100000) g;",
    );
    let t = Pg::with_server(PgServer {
        user: user.clone(),
        password: password.clone(),
        ..admin.pg.clone()
    });
    // A slow compression level keeps pg_dump running for seconds (its output waits for bk).
    let mut cmd = t.dump_cmd(&["--dbname", &name, "--level", "12"]);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let mut saw_pg_dump = 0;
    let mut scans = 0;
    loop {
        let done = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(") ").is_none_or(|(_, r)| r.starts_with('Z')))
            .unwrap_or(true);
        for cmdline in all_cmdlines() {
            assert!(
                !cmdline.contains(&password),
                "the password is on a command line: {cmdline}"
            );
            if cmdline.contains("pg_dump") && cmdline.contains("--snapshot=") {
                saw_pg_dump += 1;
            }
        }
        scans += 1;
        if done {
            break;
        }
    }
    let run = Run::from(child.wait_with_output().unwrap());
    let artifact = run.ok().artifact();
    assert_eq!(artifact.counts["public.big"], 100000);
    assert!(saw_pg_dump > 0, "pg_dump was never seen running ({scans} scans)");
    assert!(
        !std::fs::read_to_string(artifact.location.replace(".pgdump.zst", ".json"))
            .unwrap()
            .contains(&password)
    );
    drop(db);
}

/// The password a failing dump or restore is given in the wrong-password cases.
const WRONG_PASSWORD: &str = "not-the-password";

/// How a case makes a dump fail: the dump, what its message must say, the backup name its
/// error record must carry (where the case checks it), and the database it made for it.
struct Failing {
    cmd: Command,
    says: Vec<String>,
    name: Option<String>,
    db: Option<PgDatabase>,
}

/// A dump that must fail, with its exit code.
struct DumpFailure {
    case: &'static str,
    code: i32,
    fail: fn(&mut Pg) -> Failing,
}

/// Runs a dump that must fail: its error record (bk-dump's, saying all of `says`), its exit
/// code, nothing in the store, no password (right or wrong) in the output. `case` names it.
fn assert_dump_fails(case: &str, t: &Pg, cmd: Command, code: i32, says: &[&str]) -> Run {
    let run = run_cmd(cmd, "");
    assert_eq!(run.failed(case, code, says).tool, "bk-dump", "{case}");
    run.assert_hides(case, &[&t.pg.password, WRONG_PASSWORD]);
    assert_eq!(
        t.store_files(),
        Vec::<PathBuf>::new(),
        "{case}: nothing is left in the store"
    );
    run
}

/// A new database of the case (`<prefix><unique>`), and a dump of it that must fail.
fn failing_dump_of_new_database(t: &Pg, prefix: &str, says: &str) -> Failing {
    let name = pg_unique_name(prefix);
    Failing {
        db: Some(t.pg.create_database(&name)),
        cmd: t.dump_cmd(&["--dbname", &name]),
        says: vec![says.into()],
        name: None,
    }
}

/// Each case in a new sandbox: the error record and exit code, the message naming the cause,
/// nothing in the store, and no password (right or wrong) in the output.
#[test]
fn a_failed_dump_says_why_with_its_exit_code_and_leaves_nothing() {
    let cases = [
        DumpFailure {
            case: "a wrong password is a configuration error",
            code: 78,
            fail: |t| {
                let mut failing = failing_dump_of_new_database(t, "bk_pw_", "password authentication failed");
                failing.name = failing.db.as_ref().map(|db| format!("postgres-{}", db.name));
                let wrong = PgServer {
                    password: WRONG_PASSWORD.into(),
                    ..t.pg.clone()
                };
                wrong.write_pgpass(&t.sb, "pgpass");
                failing
            },
        },
        DumpFailure {
            case: "an unknown database is no input",
            code: 66,
            fail: |t| {
                let nope = pg_unique_name("nope_");
                Failing {
                    cmd: t.dump_cmd(&["--dbname", &nope]),
                    says: vec![nope, "does not exist".into()],
                    name: None,
                    db: None,
                }
            },
        },
        DumpFailure {
            case: "a password file readable by others is refused",
            code: 78,
            fail: |t| {
                std::fs::set_permissions(&t.pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
                failing_dump_of_new_database(t, "bk_loose_", "chmod 600")
            },
        },
        DumpFailure {
            case: "pg_dump missing from PATH is unavailable",
            code: 69,
            fail: |t| {
                let mut failing = failing_dump_of_new_database(t, "bk_nopath_", "pg_dump");
                let empty = t.sb.path("empty-bin");
                std::fs::create_dir(&empty).unwrap();
                failing.cmd.env("PATH", &empty);
                failing
            },
        },
        DumpFailure {
            case: "an unreachable server is unavailable",
            code: 69,
            fail: |t| {
                t.pg.port = free_port();
                Failing {
                    cmd: t.dump_cmd(&["--dbname", "postgres"]),
                    says: vec!["connecting to postgres".into()],
                    name: Some("postgres-postgres".into()),
                    db: None,
                }
            },
        },
        DumpFailure {
            case: "listing the databases of an unreachable server is unavailable",
            code: 69,
            fail: |t| {
                t.pg.port = free_port();
                Failing {
                    cmd: t.dump_cmd(&[]),
                    says: vec!["connecting".into()],
                    name: None,
                    db: None,
                }
            },
        },
    ];
    for DumpFailure { case, code, fail } in cases {
        let Some(mut t) = setup() else { return };
        let failing = fail(&mut t);
        let says: Vec<&str> = failing.says.iter().map(String::as_str).collect();
        let run = assert_dump_fails(case, &t, failing.cmd, code, &says);
        if let Some(name) = failing.name {
            assert_eq!(run.error().name, Some(name), "{case}");
        }
    }
}

#[test]
fn a_wrong_password_stops_a_restore_before_it_creates_anything() {
    let Some(t) = setup() else { return };
    let name = pg_unique_name("bk_pw_");
    let _db = t.pg.create_database(&name);
    let artifact = t.dump(&["--dbname", &name]).ok().artifact();
    let wrong = PgServer {
        password: WRONG_PASSWORD.into(),
        ..t.pg.clone()
    };
    wrong.write_pgpass(&t.sb, "pgpass");
    let target = t.pg.database(&pg_unique_name("bk_pw_r_"));
    let run = t.restore(&artifact, &["--database", &target.name]).code(78);
    run.error();
    t.assert_no_database(&target.name);
}

/// A throwaway PostgreSQL cluster of one test's own, which it may stop at will.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    server: PgServer,
}

impl Cluster {
    /// initdb and start on a free port (as user postgres when we are root: initdb refuses
    /// root); None (skipped) when PostgreSQL is not installed and the full suite is not running.
    fn start() -> Option<Cluster> {
        let bin = PathBuf::from(std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()));
        let initdb = bin.join("initdb");
        let why = || format!("no {}", initdb.display());
        needs(
            initdb.exists().then_some(()),
            why,
            "PG_BIN names the PostgreSQL bin directory",
        )?;
        let dir = tempfile::Builder::new().prefix("bk-pg-cluster-").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let password = pg_unique_name("pw");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, format!("{password}\n")).unwrap();
        if nix::unistd::geteuid().is_root() {
            let pg = nix::unistd::User::from_name("postgres")
                .unwrap()
                .expect("a postgres user");
            for p in [dir.path(), &pwfile] {
                nix::unistd::chown(p, Some(pg.uid), Some(pg.gid)).unwrap();
            }
        }
        let mut cluster = Cluster {
            server: PgServer {
                host: "127.0.0.1".into(),
                port: 0,
                user: "postgres".into(),
                password,
            },
            bin,
            dir,
        };
        let data = cluster.dir.path().join("data");
        cluster.run(&[
            "initdb",
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            &format!("--pwfile={}", pwfile.display()),
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]);
        for attempt in 0.. {
            cluster.server.port = free_port();
            let options = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                cluster.server.port,
                cluster.dir.path().display()
            );
            let log = cluster.dir.path().join("log");
            let started = cluster.try_run(&[
                "pg_ctl",
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ]);
            match started {
                Ok(()) => break,
                Err(e) if attempt >= 3 => panic!(
                    "the private cluster did not start: {e}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
                Err(_) => continue,
            }
        }
        Some(cluster)
    }

    fn command(&self, args: &[&str]) -> Command {
        let program = self.bin.join(args[0]);
        let mut cmd = if nix::unistd::geteuid().is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(&args[1..]).current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }

    fn try_run(&self, args: &[&str]) -> Result<(), String> {
        let out = self.command(args).output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn run(&self, args: &[&str]) {
        self.try_run(args).unwrap_or_else(|e| panic!("{e}"));
    }

    /// `pg_ctl stop -m immediate`: the server dies as in a crash.
    fn stop_immediately(&self) {
        let data = self.dir.path().join("data");
        self.run(&["pg_ctl", "-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self.try_run(&["pg_ctl", "-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
    }
}

#[test]
fn the_server_dying_mid_dump_leaves_nothing() {
    let Some(cluster) = Cluster::start() else { return };
    let t = Pg::with_server(cluster.server.clone());
    let name = "big one";
    t.pg.execute("postgres", &format!("CREATE DATABASE {}", pg_ident(name)));
    t.pg.execute(
        name,
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS v
         FROM generate_series(1, 500000) g;",
    );
    // The slowest compression holds pg_dump back in the middle of the table's COPY.
    let mut cmd = t.dump_cmd(&["--dbname", name, "--level", "19"]);
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let dir = t.sb.path("store/postgres-big-one");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the dump ended before the server could be stopped"
        );
        let written: u64 = files_below(&dir)
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        if written > 256 * 1024 {
            break;
        }
        assert!(Instant::now() < deadline, "the dump does not progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    cluster.stop_immediately();
    let run = Run::from(child.wait_with_output().unwrap()).code(69);
    let e = run.error();
    assert_eq!(e.name.as_deref(), Some("postgres-big-one"));
    assert!(e.message.contains("pg_dump"), "{}", e.message);
    assert_eq!(
        t.store_files(),
        Vec::<PathBuf>::new(),
        "no artifact, manifest or temporary file"
    );
}

#[test]
fn restore_refuses_a_database_that_is_not_empty_unless_replace() {
    let Some(t) = setup() else { return };
    let (name, _source, artifact) = t.dumped_sample(&[]);
    let target = t.pg.create_database(&odd_name());
    t.pg.execute(
        &target.name,
        "CREATE TABLE precious(v text); INSERT INTO precious VALUES ('keep me');",
    );
    let run = t.restore(&artifact, &["--database", &target.name]).code(73);
    assert!(run.error().message.contains("--replace"), "{}", run.stderr);
    assert_eq!(t.pg.strings(&target.name, "SELECT v FROM precious"), ["keep me"]);

    let restored = t
        .restore(&artifact, &["--database", &target.name, "--replace"])
        .ok()
        .restored();
    assert_eq!(restored.counts, artifact.counts);
    assert_eq!(
        t.pg.strings(
            &target.name,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'precious'"
        ),
        ["0"],
        "the old database was dropped"
    );
    assert_same(&t.pg, &name, &target.name);

    // An empty database that exists is fine without --replace.
    let empty = t.pg.create_database(&odd_name());
    t.restore(&artifact, &["--database", &empty.name]).ok();
    assert_same(&t.pg, &name, &empty.name);
}

#[test]
fn restore_of_one_table() {
    let Some(t) = setup() else { return };
    let (name, _source, artifact) = t.dumped_sample(&[]);

    let target = t.pg.database(&odd_name());
    let run = t
        .restore(&artifact, &["--database", &target.name, "--table", "plain_t"])
        .ok();
    let restored = run.restored();
    assert!(!restored.complete, "a partial restore says so");
    assert_eq!(restored.counts, BTreeMap::from([("public.plain_t".to_string(), 10)]));
    let table_sum = "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM public.plain_t t";
    assert_eq!(t.pg.strings(&target.name, table_sum), t.pg.strings(&name, table_sum));

    // A table in another schema than public.
    let target = t.pg.database(&odd_name());
    let run = t
        .restore(&artifact, &["--database", &target.name, "--table", "app.people"])
        .ok();
    let restored = run.restored();
    assert!(!restored.complete);
    assert_eq!(restored.counts, BTreeMap::from([("app.people".to_string(), 2004)]));
    let people_sum = "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM app.people t";
    assert_eq!(t.pg.strings(&target.name, people_sum), t.pg.strings(&name, people_sum));

    // pg_restore selects by schema and by name apart: tables of two schemas at once could
    // bring back others of the same names, so that is refused before anything is created.
    let target = t.pg.database(&odd_name());
    let run = t
        .restore(
            &artifact,
            &[
                "--database",
                &target.name,
                "--table",
                "app.people",
                "--table",
                "plain_t",
            ],
        )
        .code(64);
    assert!(run.error().message.contains("one schema"), "{}", run.stderr);
    assert_eq!(
        t.pg.strings(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{}'", target.name)
        ),
        ["0"]
    );
}

#[test]
fn table_restore_of_a_plain_backup_is_a_usage_error() {
    let Some(t) = setup() else { return };
    let name = pg_unique_name("bk_plain_");
    let _source = t.pg.create_database(&name);
    t.pg.execute(&name, "CREATE TABLE x(v int); INSERT INTO x VALUES (1);");
    let artifact = t.dump(&["--dbname", &name, "--format", "plain"]).ok().artifact();
    let target = t.pg.database(&pg_unique_name("bk_plain_r_"));
    let run = t
        .restore(&artifact, &["--database", &target.name, "--table", "x"])
        .code(64);
    assert!(run.error().message.contains("custom"), "{}", run.stderr);
    t.assert_no_database(&target.name);
}

#[test]
fn a_manifest_count_that_lies_is_reported_after_the_restore() {
    let Some(t) = setup() else { return };
    let (name, _source, mut artifact) = t.dumped_sample(&[]);
    let real = artifact.counts.clone();
    *artifact.counts.get_mut("app.people").unwrap() += 1;
    let target = t.pg.database(&odd_name());
    let run = t.restore(&artifact, &["--database", &target.name]).code(65);
    let e = run.error();
    assert!(
        e.message.contains("people: 2005 rows expected, 2004 found"),
        "{}",
        e.message
    );
    assert_eq!(e.name.as_deref(), Some(artifact.name.as_str()));
    let restored = run.restored();
    assert_eq!(
        restored.counts, real,
        "the restored record tells what the database holds"
    );
    assert_same(&t.pg, &name, &target.name);
}

#[test]
fn without_dbname_every_database_but_the_templates() {
    let Some(cluster) = Cluster::start() else { return };
    let t = Pg::with_server(cluster.server.clone());
    for db in ["bk Test-db", "Second_DB", "third"] {
        t.pg.execute("postgres", &format!("CREATE DATABASE {}", pg_ident(db)));
        t.pg.execute(db, "CREATE TABLE t(v int); INSERT INTO t VALUES (1), (2);");
    }
    let run = t.dump(&["--exclude-database", "third"]).ok();
    let mut names: Vec<String> = run.artifacts().iter().map(|a| a.name.clone()).collect();
    names.sort();
    assert_eq!(
        names,
        ["postgres-bk-test-db", "postgres-postgres", "postgres-second_db"]
    );
    for a in run.artifacts() {
        let db = a.source.database.clone().unwrap();
        let expected: BTreeMap<String, u64> = if db == "postgres" {
            BTreeMap::new()
        } else {
            BTreeMap::from([("public.t".to_string(), 2)])
        };
        assert_eq!(a.counts, expected, "{db}");
        assert!(Path::new(&a.location).exists());
    }
}

// ---- TLS and service files: bk's own connections follow libpq's sslmode, PGSSLROOTCERT and
// PGSERVICE, as pg_dump does. tests/services.sh turns TLS on with a CA of its own
// (TEST_PG_CA) and lets members of the role tls_only log in over TCP with TLS only.

/// The test server's CA certificate (TEST_PG_CA, written by tests/services.sh).
fn pg_ca() -> PathBuf {
    let ca = std::env::var("TEST_PG_CA").expect("TEST_PG_CA is set by tests/services.sh (source its env)");
    assert!(
        Path::new(&ca).is_file(),
        "TEST_PG_CA={ca} does not exist: run tests/services.sh start"
    );
    PathBuf::from(ca)
}

/// A login role that may connect over TLS only (a member of tls_only), with CREATEDB for
/// restores; dropped at the end, after the databases it owns (declare it first).
struct TlsRole {
    admin: PgServer,
    server: PgServer,
}

impl TlsRole {
    fn create(admin: &PgServer) -> TlsRole {
        let server = PgServer {
            user: pg_unique_name("bk_tls_"),
            password: pg_unique_name("pw"),
            ..admin.clone()
        };
        admin.execute(
            "postgres",
            &format!(
                "CREATE ROLE {} LOGIN CREATEDB PASSWORD '{}' IN ROLE tls_only",
                pg_ident(&server.user),
                server.password
            ),
        );
        TlsRole {
            admin: admin.clone(),
            server,
        }
    }

    /// A database the role owns with a table of three rows, created by the superuser
    /// (whose connections need no TLS) acting as the role.
    fn database(&self) -> PgDatabase {
        let db = self.admin.create_database(&pg_unique_name("bk_tls_db_"));
        let role = pg_ident(&self.server.user);
        self.admin.execute(
            "postgres",
            &format!("ALTER DATABASE {} OWNER TO {role}", pg_ident(&db.name)),
        );
        self.admin.execute(
            &db.name,
            &format!("SET ROLE {role}; CREATE TABLE t(v text); INSERT INTO t VALUES ('a'), ('b'), ('c');"),
        );
        db
    }
}

impl Drop for TlsRole {
    fn drop(&mut self) {
        let sql = format!("DROP ROLE IF EXISTS {}", pg_ident(&self.server.user));
        if let Err(e) = self.admin.client("postgres").batch_execute(&sql) {
            eprintln!("warning: {sql}: {e}");
        }
    }
}

/// The TLS settings of a run: PGSSLMODE (unset: libpq's default, prefer) and PGSSLROOTCERT.
fn with_tls(mut cmd: Command, sslmode: Option<&str>, root_cert: Option<&Path>) -> Command {
    cmd.env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT")
        .env_remove("PGSERVICE");
    if let Some(mode) = sslmode {
        cmd.env("PGSSLMODE", mode);
    }
    if let Some(f) = root_cert {
        cmd.env("PGSSLROOTCERT", f);
    }
    cmd
}

#[test]
fn a_tls_only_role_dumps_and_restores_under_every_sslmode_that_allows_tls() {
    let Some(admin) = pg_server() else { return };
    let ca = pg_ca();
    let role = TlsRole::create(&admin);
    let source = role.database();
    let expected = BTreeMap::from([("public.t".to_string(), 3)]);
    // allow: cleartext first, refused by the server, then TLS; prefer (the default) and require:
    // TLS without checking the certificate; verify-ca: its chain (the certificate names
    // localhost, not 127.0.0.1); verify-full: chain and name.
    let cases: [(Option<&str>, Option<&Path>, &str); 6] = [
        (None, None, "127.0.0.1"),
        (Some("allow"), None, "127.0.0.1"),
        (Some("prefer"), None, "127.0.0.1"),
        (Some("require"), None, "127.0.0.1"),
        (Some("verify-ca"), Some(&ca), "127.0.0.1"),
        (Some("verify-full"), Some(&ca), "localhost"),
    ];
    for (sslmode, root_cert, host) in cases {
        let t = Pg::with_server(PgServer {
            host: host.to_string(),
            ..role.server.clone()
        });
        let run = run_cmd(
            with_tls(t.dump_cmd(&["--dbname", &source.name]), sslmode, root_cert),
            "",
        )
        .ok();
        let artifact = run.artifact();
        assert_eq!(
            artifact.counts, expected,
            "sslmode {sslmode:?}: bk's own connection counted the rows"
        );
        let target = admin.database(&pg_unique_name("bk_tls_r_"));
        let restore = t.pg.cmd(&t.sb, &t.pgpass, "bk-restore", &["--database", &target.name]);
        let restored = run_cmd(with_tls(restore, sslmode, root_cert), &artifact_line(&artifact))
            .ok()
            .restored();
        assert_eq!(restored.counts, expected, "sslmode {sslmode:?}");
        assert_eq!(
            admin.strings(&target.name, "SELECT string_agg(v, ',' ORDER BY v) FROM t"),
            ["a,b,c"]
        );
        run.assert_hides(&format!("sslmode {sslmode:?}"), &[&t.pg.password]);
    }
}

#[test]
fn a_tls_only_role_with_sslmode_disable_is_refused() {
    let Some(admin) = pg_server() else { return };
    let role = TlsRole::create(&admin);
    let source = role.database();
    let t = Pg::with_server(role.server.clone());
    let cmd = with_tls(t.dump_cmd(&["--dbname", &source.name]), Some("disable"), None);
    let run = assert_dump_fails("sslmode=disable", &t, cmd, 78, &["no encryption"]);
    assert!(
        run.error().message.contains("pg_hba.conf rejects connection"),
        "{}",
        run.stderr
    );
}

/// A self-signed CA certificate that signed nothing the server holds.
fn wrong_ca(sb: &Sandbox) -> PathBuf {
    let (key, cert) = (sb.path("wrong-ca.key"), sb.path("wrong-ca.crt"));
    output_of(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
            ])
            .args(["-subj", "/CN=not the server's CA", "-days", "2", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    cert
}

#[test]
fn verification_against_a_wrong_or_missing_root_certificate_fails() {
    let Some(t) = setup() else { return };
    let wrong = wrong_ca(&t.sb);
    let missing = t.sb.path("no-such-root.crt");
    let missing_text = missing.display().to_string();
    // (sslmode, root certificate, exit code, what the message must say)
    let ca = pg_ca();
    let cases = [
        // the server's certificate names localhost, and this connects to 127.0.0.1
        ("verify-full", &ca, 69, "not valid for name"),
        ("verify-full", &wrong, 69, "certificate"),
        ("verify-ca", &wrong, 69, "certificate"),
        // require with a root certificate checks the chain, as libpq does
        ("require", &wrong, 69, "certificate"),
        ("verify-full", &missing, 78, missing_text.as_str()),
    ];
    for (sslmode, root_cert, code, says) in cases {
        let cmd = with_tls(
            t.dump_cmd(&["--dbname", "postgres"]),
            Some(sslmode),
            Some(root_cert.as_path()),
        );
        let run = assert_dump_fails(sslmode, &t, cmd, code, &[says]);
        let message = run.error().message;
        assert!(
            message.contains("TLS") || message.contains("root certificate"),
            "{sslmode}: {message}"
        );
        assert!(
            message.contains(&root_cert.display().to_string()),
            "names the root certificate: {message}"
        );
    }
}

#[test]
fn prefer_falls_back_to_cleartext_on_a_server_without_tls_and_require_does_not() {
    let Some(cluster) = Cluster::start() else { return };
    let t = Pg::with_server(cluster.server.clone());
    t.pg.execute("postgres", "CREATE TABLE t(v int); INSERT INTO t VALUES (1), (2);");
    for sslmode in [None, Some("prefer"), Some("allow"), Some("disable")] {
        let run = run_cmd(with_tls(t.dump_cmd(&["--dbname", "postgres"]), sslmode, None), "").ok();
        assert_eq!(
            run.artifact().counts,
            BTreeMap::from([("public.t".to_string(), 2)]),
            "{sslmode:?}"
        );
    }
    std::fs::remove_dir_all(t.sb.path("store")).unwrap();
    for sslmode in ["require", "verify-full"] {
        let cmd = with_tls(t.dump_cmd(&["--dbname", "postgres"]), Some(sslmode), Some(&pg_ca()));
        assert_dump_fails(sslmode, &t, cmd, 69, &["does not support TLS"]);
    }
}

#[test]
fn a_service_file_selects_the_server_and_its_tls_settings() {
    let Some(admin) = pg_server() else { return };
    let ca = pg_ca();
    let role = TlsRole::create(&admin);
    let source = role.database();
    let t = Pg::with_server(role.server.clone());
    let service_file = t.sb.path("pg_service.conf");
    std::fs::write(
        &service_file,
        format!(
            "# bk's test server (its certificate names localhost)\n[other]\nhost=192.0.2.1\n\n[bktest]\nhost=localhost\nport={}\nuser={}\nsslmode=verify-full\nsslrootcert={}\n[last]\nport=1\n",
            t.pg.port,
            t.pg.user,
            ca.display()
        ),
    )
    .unwrap();
    // No connection options: the service names the server. It overrides the environment, as
    // in libpq, for bk's own connection and for pg_dump's alike.
    let service_cmd = |service: &str| {
        let mut cmd = t.sb.cmd(
            "bk-dump",
            &["postgres", "--dbname", &source.name, "--to", &t.sb.store()],
        );
        cmd.env("PGPASSFILE", &t.pgpass)
            .env("PGSERVICEFILE", &service_file)
            .env("PGSERVICE", service)
            .env("PGPORT", free_port().to_string())
            .env("PGSSLMODE", "disable")
            .env_remove("PGHOST")
            .env_remove("PGUSER")
            .env_remove("PGSSLROOTCERT");
        cmd
    };
    let artifact = run_cmd(service_cmd("bktest"), "").ok().artifact();
    assert_eq!(artifact.counts, BTreeMap::from([("public.t".to_string(), 3)]));
    assert_eq!(artifact.source.database.as_deref(), Some(source.name.as_str()));
    std::fs::remove_dir_all(t.sb.path("store")).unwrap();
    let run = assert_dump_fails(
        "an unknown service",
        &t,
        service_cmd("nosuch"),
        78,
        &["definition of service \"nosuch\" not found"],
    );
    assert!(run.stderr.contains("PGSERVICE"), "{}", run.stderr);
    // libpq refuses a line that is not key=value: so does bk, before pg_dump would.
    std::fs::write(&service_file, "[bktest]\nport = 5432\n").unwrap();
    assert_dump_fails(
        "a service file with a syntax error",
        &t,
        service_cmd("bktest"),
        78,
        &["syntax error in service file"],
    );
}

// ---------------------------------------------------------------------------------------
// --replace: the old database stays until the new one is loaded and checked.

/// A role of a test, dropped at the end with any database it still owns.
struct PgRole {
    pg: PgServer,
    name: String,
}

impl PgRole {
    fn create(pg: &PgServer, prefix: &str) -> PgRole {
        let name = pg_unique_name(prefix);
        pg.execute("postgres", &format!("CREATE ROLE {}", pg_ident(&name)));
        PgRole { pg: pg.clone(), name }
    }
}

impl Drop for PgRole {
    fn drop(&mut self) {
        for db in databases_of(&self.pg, &self.name) {
            drop(self.pg.database(&db));
        }
        let _ = self
            .pg
            .client("postgres")
            .batch_execute(&format!("DROP ROLE IF EXISTS {}", pg_ident(&self.name)));
    }
}

/// The databases `role` owns: a --replace creates its new database with the old target's
/// owner, so this finds the target and, while a restore runs or if it left it, the new one.
fn databases_of(pg: &PgServer, role: &str) -> Vec<String> {
    pg.strings(
        "postgres",
        &format!(
            "SELECT datname FROM pg_database WHERE pg_get_userbyid(datdba) = '{}' ORDER BY 1",
            role.replace('\'', "''")
        ),
    )
}

/// A live database to replace: owned by a role of its own, with data unlike any backup's,
/// a grant, settings for everyone and for one role, a comment and a connection limit.
/// Fields drop in order: the database before the roles.
struct OldTarget {
    db: PgDatabase,
    owner: PgRole,
    _reader: PgRole,
}

fn old_target(pg: &PgServer) -> OldTarget {
    let owner = PgRole::create(pg, "bk_owner_");
    let reader = PgRole::create(pg, "bk_reader_");
    let name = odd_name();
    let (db, o, r) = (pg_ident(&name), pg_ident(&owner.name), pg_ident(&reader.name));
    pg.execute(
        "postgres",
        &format!("CREATE DATABASE {db} OWNER {o} CONNECTION LIMIT 7 TEMPLATE template0 ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'"),
    );
    let guard = pg.database(&name);
    pg.execute(
        &name,
        "CREATE TABLE precious(id int PRIMARY KEY, v text);
         INSERT INTO precious SELECT g, 'keep me ' || g FROM generate_series(1, 500) g;
         CREATE SCHEMA app; CREATE TABLE app.people(name text); INSERT INTO app.people VALUES ('old');",
    );
    pg.execute(
        "postgres",
        &format!(
            "REVOKE ALL ON DATABASE {db} FROM PUBLIC; GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {r};
             ALTER DATABASE {db} SET work_mem = '7MB';
             ALTER DATABASE {db} SET search_path = \"$user\", public, \"No Such Schema\";
             ALTER ROLE {r} IN DATABASE {db} SET statement_timeout = '5s';
             COMMENT ON DATABASE {db} IS 'the live one''s';"
        ),
    );
    OldTarget {
        db: guard,
        owner,
        _reader: reader,
    }
}

/// What a database is besides its data: owner, encoding, locale, grants, settings, comment.
fn database_settings(pg: &PgServer, name: &str) -> Vec<String> {
    let this = format!(
        "(SELECT oid FROM pg_database WHERE datname = '{}')",
        name.replace('\'', "''")
    );
    let mut settings = pg.strings(
        "postgres",
        &format!(
            "SELECT concat_ws(' | ', pg_get_userbyid(datdba), pg_encoding_to_char(encoding), datcollate, datctype,
                    datconnlimit, shobj_description(oid, 'pg_database'),
                    (SELECT string_agg(a::text, ',' ORDER BY a::text) FROM aclexplode(datacl) a))
             FROM pg_database WHERE oid = {this}"
        ),
    );
    settings.extend(pg.strings(
        "postgres",
        &format!(
            "SELECT coalesce(pg_get_userbyid(nullif(setrole, 0))::text, '') || ' ' || setconfig::text
             FROM pg_db_role_setting WHERE setdatabase = {this} ORDER BY 1"
        ),
    ));
    settings
}

#[test]
fn replace_loads_exactly_the_backup_and_keeps_the_database_settings() {
    let Some(t) = setup() else { return };
    let name = odd_name();
    let _source = create_sample(&t.pg, &name);
    for format in ["custom", "plain"] {
        let artifact = t.dump(&["--dbname", &name, "--format", format]).ok().artifact();
        let old = old_target(&t.pg);
        let settings = database_settings(&t.pg, &old.db.name);
        assert_eq!(settings.len(), 3, "{settings:?}");
        let restored = t
            .restore(&artifact, &["--database", &old.db.name, "--replace"])
            .ok()
            .restored();
        assert_eq!(restored.counts, artifact.counts, "{format}");
        assert!(restored.complete);
        assert_eq!(restored.target["database"], old.db.name.as_str());
        assert_same(&t.pg, &name, &old.db.name);
        assert_eq!(
            database_settings(&t.pg, &old.db.name),
            settings,
            "{format}: the old target's owner, encoding, grants and settings"
        );
        assert_eq!(
            databases_of(&t.pg, &old.owner.name),
            [old.db.name.as_str()],
            "{format}: neither the new database's temporary name nor the old database is left"
        );
    }
}

/// A copy of a plain artifact with its SQL edited, recompressed, its record's size and
/// sha256 made to match: only loading it can tell.
fn edited(artifact: &Artifact, tag: &str, edit: impl Fn(&str) -> String) -> Artifact {
    use sha2::Digest;
    use std::io::Write;
    let sql = String::from_utf8(unzstd(&artifact.location)).unwrap();
    let mut zstd = Command::new("zstd")
        .args(["-q", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    zstd.stdin.take().unwrap().write_all(edit(&sql).as_bytes()).unwrap();
    let bytes = zstd.wait_with_output().unwrap().stdout;
    let mut a = artifact.clone();
    a.file = artifact
        .file
        .replacen(&artifact.id, &format!("{}.{tag}", artifact.id), 1);
    a.location = artifact.location.replace(&artifact.file, &a.file);
    std::fs::write(&a.location, &bytes).unwrap();
    a.bytes = bytes.len() as u64;
    a.sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    a
}

#[test]
fn a_replace_that_fails_leaves_the_old_database_as_it_was() {
    let Some(t) = setup() else { return };
    // A backup whose table belongs to a role that is gone by the time it is restored.
    let gone = PgRole::create(&t.pg, "bk_gone_");
    let source = t.pg.create_database(&odd_name());
    t.pg.execute(
        &source.name,
        "CREATE TABLE a(v int); INSERT INTO a SELECT generate_series(1, 100);
             CREATE TABLE b(v text); INSERT INTO b SELECT 'b' || g FROM generate_series(1, 50) g;",
    );
    let plain = t.dump(&["--dbname", &source.name, "--format", "plain"]).ok().artifact();
    t.pg.execute(
        &source.name,
        &format!("ALTER TABLE b OWNER TO {}", pg_ident(&gone.name)),
    );
    let custom = t.dump(&["--dbname", &source.name]).ok().artifact();
    drop(source);
    drop(gone);

    let mut lying = custom.clone();
    *lying.counts.get_mut("public.a").unwrap() += 1;
    let truncated = edited(&plain, "truncated", |sql| {
        sql[..sql.rfind("\nCOPY ").unwrap()].to_string()
    });
    let fails_late = edited(&plain, "late", |sql| {
        sql.replace(
            "-- PostgreSQL database dump complete",
            "SELECT 1/0;\n-- PostgreSQL database dump complete",
        )
    });
    // (case, artifact, extra arguments, exit code, the error says)
    let cases: [(&str, &Artifact, &[&str], i32, &str); 5] = [
        ("a role that does not exist", &custom, &[], 78, "does not exist"),
        (
            "a statement that fails at the end",
            &fails_late,
            &[],
            74,
            "division by zero",
        ),
        (
            "a truncated backup",
            &truncated,
            &[],
            65,
            "b: 50 rows expected, 0 found",
        ),
        (
            "counts unlike the manifest's",
            &lying,
            &["--no-owner"],
            65,
            "a: 101 rows expected, 100 found",
        ),
        (
            "--table",
            &custom,
            &["--no-owner", "--table", "a"],
            64,
            "--table with --replace",
        ),
    ];
    for (case, artifact, extra, code, says) in cases {
        let old = old_target(&t.pg);
        let (data, settings) = (fingerprint(&t.pg, &old.db.name), database_settings(&t.pg, &old.db.name));
        let mut args = vec!["--database", &old.db.name, "--replace"];
        args.extend(extra);
        let run = t.restore(artifact, &args).code(code);
        let message = run.error().message;
        assert!(message.contains(says), "{case}: {message}");
        assert!(
            run.records().iter().all(|r| matches!(r, Record::Error(_))),
            "{case}: nothing restored: {}",
            run.stdout
        );
        assert_eq!(fingerprint(&t.pg, &old.db.name), data, "{case}: the old data");
        assert_eq!(database_settings(&t.pg, &old.db.name), settings, "{case}");
        assert_eq!(
            databases_of(&t.pg, &old.owner.name),
            [old.db.name.as_str()],
            "{case}: the new database was dropped"
        );
    }
}

#[test]
fn a_connected_session_makes_replace_fail_with_the_old_data_intact() {
    let Some(t) = setup() else { return };
    let source = t.pg.create_database(&odd_name());
    t.pg.execute(&source.name, "CREATE TABLE a(v int); INSERT INTO a VALUES (1), (2);");
    let artifact = t.dump(&["--dbname", &source.name]).ok().artifact();
    let old = old_target(&t.pg);
    let data = fingerprint(&t.pg, &old.db.name);
    let session = t.pg.client(&old.db.name);
    let run = t
        .restore(&artifact, &["--database", &old.db.name, "--replace"])
        .code(75);
    let message = run.error().message;
    assert!(
        message.contains(&format!("1 session(s) are connected to {}", old.db.name)),
        "{message}"
    );
    assert!(!session.is_closed(), "the session was not killed");
    assert_eq!(fingerprint(&t.pg, &old.db.name), data);
    assert_eq!(databases_of(&t.pg, &old.owner.name), [old.db.name.as_str()]);

    drop(session);
    t.restore(&artifact, &["--database", &old.db.name, "--replace"]).ok();
    assert_same(&t.pg, &source.name, &old.db.name);
}

#[test]
fn sigterm_mid_replace_leaves_the_old_database_as_it_was() {
    let Some(t) = setup() else { return };
    let source = t.pg.create_database(&odd_name());
    t.pg.execute(
        &source.name,
        "CREATE TABLE big(id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 600000) g;",
    );
    let artifact = t.dump(&["--dbname", &source.name]).ok().artifact();
    let old = old_target(&t.pg);
    let data = fingerprint(&t.pg, &old.db.name);
    let restore = t.pg.cmd(
        &t.sb,
        &t.pgpass,
        "bk-restore",
        &["--database", &old.db.name, "--replace"],
    );
    let mut child = spawn_with_stdin(restore, &artifact_line(&artifact));
    // Wait for pg_restore's COPY into the database being loaded (whatever its name).
    let loading = format!(
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_database d ON d.datname = a.datname
         WHERE a.application_name = 'pg_restore' AND a.query LIKE 'COPY %'
           AND (d.datname = '{}' OR pg_get_userbyid(d.datdba) = '{}')",
        old.db.name.replace('\'', "''"),
        old.owner.name
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while t.pg.strings("postgres", &loading) == ["0"] {
        assert!(
            child.try_wait().unwrap().is_none(),
            "bk-restore ended before its load was seen"
        );
        assert!(Instant::now() < deadline, "no load seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM).unwrap();
    let run = Run::from(child.wait_with_output().unwrap());
    assert_eq!(run.code, 143, "128 + SIGTERM\nstderr: {}", run.stderr);
    assert!(run.stderr.contains("interrupted by signal 15"), "{}", run.stderr);
    assert_eq!(fingerprint(&t.pg, &old.db.name), data, "the old data");
    assert_eq!(
        databases_of(&t.pg, &old.owner.name),
        [old.db.name.as_str()],
        "the new database was dropped"
    );
}
