//! The Ansible role ansible/roles/bk, applied for real to this machine (`ansible-playbook -c
//! local`, as root) against the test servers: it must converge (a second run changes nothing),
//! pass ansible-lint, keep secrets out of its output and its credential files private; the
//! cron.d jobs it writes must back up when run as cron runs them, fail loudly when their dump
//! fails (exit status, webhook, metrics), its stale-backup check must fire after a missed day,
//! and the restore commands of the runbook it writes must bring a database back equal to its
//! source.
//!
//! Everything the role writes goes into the test's sandbox (tools, home, store, cron.d
//! directory, runbook), except the backup user `bktest`, the database accounts (all removed
//! at the end) and a line in the ssh test user's authorized_keys (removed too).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bk_core::record::{parse_line, Artifact, Record};
use bk_tests::{
    assert_tools_linked, cron, have_root, influx_server, mongo_server, mysql_server, needs, pg_ident, pg_server,
    run_cmd, MysqlGuard, MysqlServer, PgServer, Receiver, Run, Sandbox,
};
use serde_json::{json, Value};

/// The backup user of the test: created by the role, removed at the end.
const USER: &str = "bktest";

/// Runs a closure when it goes, whatever happens: for what a test changed outside its sandbox.
struct Cleanup<F: FnMut()>(F);

impl<F: FnMut()> Drop for Cleanup<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// The database accounts a test's role run creates, the dumps' and verify restore's scratch
/// ones, on both servers (named `<unique>` and `<unique>_v`): dropped when it goes.
struct RoleAccounts<'a> {
    scratch: String,
    _mysql: [MysqlGuard; 2],
    pg: &'a PgServer,
    pg_roles: [String; 2],
}

impl<'a> RoleAccounts<'a> {
    fn new(mysql: &MysqlServer, pg: &'a PgServer, unique: &str) -> Self {
        let scratch = format!("{unique}_v");
        RoleAccounts {
            _mysql: [mysql.account(unique, "127.0.0.1"), mysql.account(&scratch, "127.0.0.1")],
            pg,
            pg_roles: [unique.to_string(), scratch.clone()],
            scratch,
        }
    }
}

impl Drop for RoleAccounts<'_> {
    fn drop(&mut self) {
        for role in &self.pg_roles {
            let sql = format!("DROP ROLE IF EXISTS {}", pg_ident(role));
            if let Err(e) = self.pg.client("postgres").batch_execute(&sql) {
                eprintln!("warning: {sql}: {e}");
            }
        }
    }
}

/// The venv of tests/services.sh with ansible-playbook and ansible-lint (TEST_ANSIBLE_VENV).
fn ansible_venv() -> Option<PathBuf> {
    let venv = std::env::var("TEST_ANSIBLE_VENV").ok().filter(|v| !v.is_empty());
    let found = venv
        .clone()
        .map(PathBuf::from)
        .filter(|v| v.join("bin/ansible-playbook").is_file());
    let why = || format!("no ansible-playbook in TEST_ANSIBLE_VENV={venv:?}");
    needs(found, why, "tests/services.sh start installs it")
}

/// A sandbox and the venv, for a test that needs no database server: None where it is
/// skipped (not root: the role runs as root).
fn ansible_sandbox() -> Option<(Sandbox, PathBuf)> {
    if !have_root() {
        return None;
    }
    let venv = ansible_venv()?;
    Some((Sandbox::new(), venv))
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: source $(tests/services.sh env)"))
}

/// A user's passwd entry: uid, gid, home.
fn passwd(user: &str) -> Option<(u32, u32, PathBuf)> {
    let out = Command::new("getent").args(["passwd", user]).output().expect("getent");
    let line = String::from_utf8(out.stdout).ok()?;
    let fields: Vec<&str> = line.trim().split(':').collect();
    (fields.len() == 7).then(|| (fields[2].parse().unwrap(), fields[3].parse().unwrap(), fields[5].into()))
}

fn userdel(user: &str) {
    if passwd(user).is_some() {
        let run = Run::from(Command::new("userdel").arg(user).output().expect("userdel"));
        assert_eq!(run.code, 0, "userdel {user}: {}", run.stderr);
    }
}

/// The backup user a test's role run creates: none before (one left by a killed run has a home
/// in a sandbox that is gone), none after. One such test at a time: useradd and userdel find
/// /etc/passwd locked by another's.
struct BackupUser {
    name: &'static str,
    _alone: std::sync::MutexGuard<'static, ()>,
}

static BACKUP_USERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn backup_user(name: &'static str) -> BackupUser {
    let alone = BACKUP_USERS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    userdel(name);
    BackupUser { name, _alone: alone }
}

impl Drop for BackupUser {
    fn drop(&mut self) {
        userdel(self.name)
    }
}

/// A successful ansible-playbook run: its output and the PLAY RECAP's count of changes.
struct Play {
    output: String,
    changed: u32,
}

fn recap_count(line: &str, key: &str) -> u32 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in the PLAY RECAP line: {line}"))
}

/// Everything one test needs to run the role: the sandbox, the venv, the files it writes.
struct Ansible<'a> {
    sb: &'a Sandbox,
    venv: PathBuf,
    repo: PathBuf,
}

impl<'a> Ansible<'a> {
    /// For a test's sandbox; the role is this repository's.
    fn new(sb: &'a Sandbox, venv: PathBuf) -> Self {
        Ansible {
            sb,
            venv,
            repo: Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.venv.join("bin").join(program));
        let path = format!("{}:{}", self.venv.join("bin").display(), env("PATH"));
        cmd.env("PATH", path)
            .env("ANSIBLE_NOCOLOR", "1")
            .env("NO_COLOR", "1")
            .env("ANSIBLE_HOME", self.sb.path("ansible-home"))
            .env("ANSIBLE_ROLES_PATH", self.repo.join("ansible/roles"))
            .env("ANSIBLE_RETRY_FILES_ENABLED", "0");
        cmd
    }

    /// `ansible-playbook --diff` of a playbook applying the role with `vars` to localhost.
    fn play(&self, vars: &serde_json::Value) -> Play {
        self.play_tasks("  roles: [bk]\n", vars)
    }

    /// `ansible-playbook --diff` of a playbook whose play ends with `tasks` (YAML under the
    /// play) with `vars`, on localhost.
    fn play_tasks(&self, tasks: &str, vars: &serde_json::Value) -> Play {
        let run = self.run_playbook(tasks, vars);
        let output = format!("{}{}", run.stdout, run.stderr);
        assert_eq!(run.code, 0, "ansible-playbook failed:\n{output}");
        let recap = output
            .lines()
            .skip_while(|l| !l.starts_with("PLAY RECAP"))
            .find(|l| l.starts_with("localhost"))
            .unwrap_or_else(|| panic!("no PLAY RECAP for localhost:\n{output}"))
            .to_string();
        Play {
            changed: recap_count(&recap, "changed"),
            output,
        }
    }

    /// The run of such a playbook, whatever its outcome.
    fn run_playbook(&self, tasks: &str, vars: &serde_json::Value) -> Run {
        let dir = self.sb.path("playbook");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("inventory"),
            format!(
                "localhost ansible_connection=local ansible_python_interpreter={}\n",
                self.venv.join("bin/python").display()
            ),
        )
        .unwrap();
        fs::write(
            dir.join("site.yml"),
            format!("- name: Back up this host with bk\n  hosts: all\n  gather_facts: false\n{tasks}"),
        )
        .unwrap();
        let vars_file = dir.join("vars.json");
        fs::write(&vars_file, vars.to_string()).unwrap();
        fs::set_permissions(&vars_file, fs::Permissions::from_mode(0o600)).unwrap();
        let mut cmd = self.command("ansible-playbook");
        cmd.current_dir(&dir)
            .args(["-i", "inventory", "site.yml", "--diff", "-e"])
            .arg(format!("@{}", vars_file.display()));
        run_cmd(cmd, "")
    }
}

/// The built tools, as they are now, in `<sandbox>/built`: hard links (copies across
/// filesystems), so that a rebuild meanwhile (cargo replaces the files) cannot make the second
/// run install something new.
fn snapshot_tools(sb: &Sandbox) -> PathBuf {
    let dir = sb.path("built");
    fs::create_dir_all(&dir).unwrap();
    let (from, to) = (bk_tests::bin("bk"), dir.join("bk"));
    // Once per sandbox: a copy onto a link of the same file would empty the built one.
    assert!(!to.exists(), "{} is there already", to.display());
    if fs::hard_link(&from, &to).is_err() {
        fs::copy(&from, &to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
    }
    dir
}

/// The value of `metric{name="<name>"}` in a node_exporter textfile.
fn prom_value(text: &str, metric: &str, name: &str) -> Option<f64> {
    let series = format!("{metric}{{name=\"{name}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Whether the last run of `name` shows as a success in the jobs' metrics file.
fn last_run_success(prom: &Path, name: &str, at: &str) -> Option<f64> {
    let text = fs::read_to_string(prom).unwrap_or_else(|e| panic!("{at}: {}: {e}", prom.display()));
    prom_value(&text, "bk_last_run_success", name)
}

/// The webhook bodies the receiver got: their `text`.
fn webhook_texts(receiver: &Receiver) -> Vec<String> {
    receiver
        .received()
        .into_iter()
        .map(|r| {
            assert_eq!(r.method, "POST", "a webhook is a POST: {r:?}");
            let body: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body));
            body["text"]
                .as_str()
                .unwrap_or_else(|| panic!("no text in {}", r.body))
                .to_string()
        })
        .collect()
}

/// The sh blocks under `### <step>` of `## Job <job>` in the runbook.
fn runbook_blocks(runbook: &str, job: &str, step: &str) -> String {
    let section = runbook
        .split("\n## ")
        .find(|s| s.starts_with(&format!("Job {job}\n")))
        .unwrap_or_else(|| panic!("no section `## Job {job}` in the runbook:\n{runbook}"));
    let part = section
        .split("\n### ")
        .find(|s| s.starts_with(&format!("{step}\n")))
        .unwrap_or_else(|| panic!("no `### {step}` under `## Job {job}`:\n{section}"));
    let blocks: String = bk_tests::sh_blocks(part)
        .into_iter()
        .map(|(_, script)| script)
        .collect();
    assert!(!blocks.is_empty(), "no sh block under `### {step}` of job {job}");
    blocks
}

/// The one manifest below `dir` (a store's name directory), as an artifact.
fn manifest(dir: &Path, at: &str) -> Artifact {
    let manifests: Vec<PathBuf> = bk_tests::files_below(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(manifests.len(), 1, "{at}: one manifest expected in {}", dir.display());
    let text = fs::read_to_string(&manifests[0]).unwrap();
    match parse_line(text.trim(), "manifest") {
        Ok(Record::Artifact(a)) => a,
        _ => panic!("{at}: {} is not an artifact manifest: {text}", manifests[0].display()),
    }
}

#[test]
fn role_converges_and_its_jobs_and_runbook_work() {
    if !have_root() {
        return;
    }
    let (Some(mysql), Some(pg), Some(mongo), Some(influx), Some(venv)) = (
        mysql_server(),
        pg_server(),
        mongo_server(),
        influx_server(),
        ansible_venv(),
    ) else {
        return;
    };
    let (s3_endpoint, s3_bucket) = (env("TEST_S3_ENDPOINT"), env("TEST_S3_BUCKET"));
    let (s3_key, s3_secret) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"));
    let (ssh_user, ssh_port, ssh_key) = (env("TEST_SSH_USER"), env("TEST_SSH_PORT"), env("TEST_SSH_KEY"));
    let sb = Sandbox::new();
    // The backup user must reach the tools, its home and the store inside the sandbox.
    fs::set_permissions(sb.root(), fs::Permissions::from_mode(0o755)).unwrap();
    let scratch = sb.path("scratch");
    fs::create_dir_all(&scratch).unwrap();
    fs::set_permissions(&scratch, fs::Permissions::from_mode(0o1777)).unwrap();
    let ansible = Ansible::new(&sb, venv);

    let _user = backup_user(USER);

    // The sources: a MariaDB and a PostgreSQL database, a directory.
    let unique = bk_tests::mysql_unique_name("bkans");
    let admin_cnf = mysql.option_file(&sb, "admin.cnf");
    let _source = mysql.database(&unique);
    let _restored = mysql.database(&format!("{unique}_restored"));
    mysql.sql(
        &admin_cnf,
        &format!(
            "CREATE DATABASE `{unique}`; USE `{unique}`;
             CREATE TABLE items (id INT PRIMARY KEY, label VARCHAR(40), price DECIMAL(8,2));
             INSERT INTO items VALUES (1, 'bolt', 0.25), (2, 'nut 50%', 0.10), (3, 'washer ø', NULL);
             CREATE TABLE notes (id INT AUTO_INCREMENT PRIMARY KEY, body TEXT);
             INSERT INTO notes (body) VALUES ('first'), ('second');
             CREATE VIEW cheap AS SELECT id, label FROM items WHERE price < 0.2;"
        ),
    );
    let _pg_source = pg.create_database(&unique);
    pg.execute(
        &unique,
        "CREATE TABLE t (id INT PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'a'), (2, 'b');
         CREATE VIEW vs AS SELECT v FROM t;",
    );
    // A MongoDB database (nx-27017: no authentication, so the URI holds no password; its
    // appName stands for one, a secret the output must not show).
    let _mongo_source = mongo.database(&unique);
    mongo.python(
        "client[sys.argv[1]].items.insert_many([{'_id': i, 'label': f'item {i}'} for i in range(20)])",
        &[&unique],
    );
    let mongo_uri = format!("{}&appName={unique}-uri-secret", mongo.url);
    // An InfluxDB database, in two retention policies.
    let mut influx_dbs = influx.database(&unique);
    influx_dbs.also(&format!("{unique}_restored"));
    influx.query(&format!(
        "CREATE RETENTION POLICY \"week\" ON \"{unique}\" DURATION 0s REPLICATION 1"
    ));
    influx.write(
        &unique,
        "autogen",
        "cpu,host=a usage=1.5,n=2i,ok=true 1700000000000000001\ncpu,host=b usage=3 1700000000000000002\n",
    );
    influx.write(&unique, "week", "mem free=7i 1700000000000000003\n");
    // The dumps' accounts, and verify restore's scratch accounts (the role creates all four).
    let accounts = RoleAccounts::new(&mysql, &pg, &unique);
    let scratch_user = accounts.scratch.clone();
    // A space and a % in the path: the cron line must quote one and escape the other.
    let data = sb.path("data 50%");
    fs::create_dir_all(data.join("sub")).unwrap();
    fs::write(data.join("a.conf"), "key = value\n").unwrap();
    fs::write(data.join("sub/b.txt"), "hello\n").unwrap();
    // What the job excludes, by name and by path: the runbook's Check must leave it out too.
    fs::create_dir_all(data.join("cache")).unwrap();
    fs::write(data.join("cache/page"), "stale\n").unwrap();
    fs::write(data.join("sub/run.log"), "noise\n").unwrap();
    // A file only root may read: the files job must back it up all the same.
    fs::write(data.join("sub/secret.key"), "root's alone\n").unwrap();
    fs::set_permissions(data.join("sub/secret.key"), fs::Permissions::from_mode(0o600)).unwrap();

    // The destinations: the test sshd (its user's home) and the test S3 server.
    let (_, _, ssh_home) = passwd(&ssh_user).expect("the ssh test user");
    let ssh_dir = ssh_home.join(&unique);
    let _ssh_dir = Cleanup(|| {
        let _ = fs::remove_dir_all(&ssh_dir);
    });
    let ssh_url = format!("ssh://{ssh_user}@127.0.0.1:{ssh_port}{}", ssh_dir.display());
    let s3_url = format!("s3://{s3_bucket}/{unique}");
    let host_key = fs::read_to_string(Path::new(&ssh_key).with_file_name("host.pub")).expect("the sshd host key");
    let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();

    let mysql_password = format!("my-{unique}-Pw");
    let pg_password = format!("pg-{unique}-Pw");
    let scratch_password = format!("scratch-{unique}-Pw");
    // The jobs' webhook, with the token in its path as Slack's and Mattermost's have.
    let receiver = Receiver::start(&[]);
    let webhook = receiver.url(&format!("/hooks/{unique}-token"));
    let healthcheck = receiver.url(&format!("/ping/{unique}-uuid"));
    let secrets = [
        mysql_password.as_str(),
        pg_password.as_str(),
        scratch_password.as_str(),
        mysql.password.as_str(),
        pg.password.as_str(),
        s3_secret.as_str(),
        webhook.as_str(),
        healthcheck.as_str(),
        mongo_uri.as_str(),
    ];
    let home = sb.path("home");
    let store = sb.path("store");
    let cron_dir = sb.path("cron.d");
    let runbook = sb.path("etc/bk/RESTORE.md");
    let prom = sb.path("prom/bk.prom");
    let mut jobs = vec![
        json!({"name": "db", "engine": "mysql", "databases": [unique], "schedule": "15 4 * * *",
               "destinations": [ssh_url], "retention": {"daily": 7, "weekly": 4, "monthly": 12},
               "notify": "dba@example.net", "verify": "restore"}),
        json!({"name": "pg", "engine": "postgres", "databases": [unique], "schedule": "45 4 * * *",
               "destinations": [s3_url], "retention": {"last": 3}, "verify": "restore"}),
        json!({"name": "data", "engine": "files", "paths": [data], "schedule": "@hourly",
               "retention": {"last": 2}, "verify": "restore", "options": ["--compress", "gzip"],
               "exclude": ["*.log", data.join("cache")]}),
        json!({"name": "mongo", "engine": "mongodb", "databases": [unique], "schedule": "30 4 * * *",
               "retention": {"last": 2}}),
        json!({"name": "influx", "engine": "influxdb", "databases": [unique], "schedule": "50 4 * * *",
               "retention": {"last": 2}, "verify": "restore"}),
        // A program's output; a % the cron line must escape, a marker the dump checks.
        json!({"name": "export", "engine": "command", "schedule": "20 4 * * *", "format": "txt",
               "command": ["sh", "-c", "printf 'row %s\\n' 1 2 3; echo '-- export complete'"],
               "end_marker": "-- export complete", "retention": {"last": 2},
               "restore_command": ["sh", "-c", "cat >/dev/null"]}),
    ];
    let mut vars = json!({
        "bk_install_src": snapshot_tools(&sb),
        "bk_bin_dir": sb.path("bin"),
        "bk_user": USER,
        "bk_home": home,
        "bk_store": store,
        "bk_lock_dir": sb.path("lock"),
        "bk_cron_dir": cron_dir,
        "bk_runbook_path": runbook,
        "bk_scratch_dir": scratch,
        "bk_jobs": jobs,
        "bk_mysql_host": mysql.host, "bk_mysql_port": mysql.port,
        "bk_mysql_user": unique, "bk_mysql_password": mysql_password,
        "bk_mysql_create_user": true, "bk_mysql_user_host": "127.0.0.1",
        "bk_mysql_login_host": mysql.host, "bk_mysql_login_port": mysql.port,
        "bk_mysql_login_user": mysql.user, "bk_mysql_login_password": mysql.password,
        "bk_mysql_restore_defaults_file": admin_cnf,
        "bk_postgres_host": pg.host, "bk_postgres_port": pg.port,
        "bk_postgres_user": unique, "bk_postgres_password": pg_password,
        "bk_postgres_create_user": true,
        "bk_postgres_login_host": pg.host, "bk_postgres_login_port": pg.port,
        "bk_postgres_login_user": pg.user, "bk_postgres_login_password": pg.password,
        "bk_postgres_restore_user": pg.user,
        "bk_postgres_restore_password": pg.password,
        "bk_postgres_restore_pgpass": sb.path("etc/bk/restore.pgpass"),
        "bk_install_python_db_drivers": false,
        "bk_s3_access_key_id": s3_key, "bk_s3_secret_access_key": s3_secret, "bk_s3_endpoint": s3_endpoint,
        "bk_ssh_known_hosts": [format!("[127.0.0.1]:{ssh_port} {}", host_key.join(" "))],
        "bk_notify_webhook": webhook,
        "bk_notify_prom_dir": prom.parent().unwrap(),
        "bk_stale_after": "26h",
    });
    vars["bk_influxdb_host"] = json!(influx.host);
    vars["bk_influxdb_port"] = json!(influx.port);
    vars["bk_influxdb_rpc_port"] = json!(influx.rpc_port);
    // verify restore's scratch accounts and the MongoDB URI (json! cannot take more lines at once).
    for (var, value) in [
        ("bk_mysql_scratch_user", &scratch_user),
        ("bk_mysql_scratch_password", &scratch_password),
        ("bk_postgres_scratch_user", &scratch_user),
        ("bk_postgres_scratch_password", &scratch_password),
        ("bk_mongodb_uri", &mongo_uri),
    ] {
        vars[var] = json!(value);
    }
    let no_secret = |play: &Play, which: &str| {
        for secret in secrets {
            assert!(
                !play.output.contains(secret),
                "the {which} ansible-playbook run printed a secret ({secret}):\n{}",
                play.output
            );
        }
    };

    // 1. The first run sets everything up, and tells the playbook the backup user's home and
    // public key.
    let facts = sb.path("facts.json");
    let first = ansible.play_tasks(
        &format!(
            "  roles: [bk]\n  tasks:\n    - name: Keep the facts\n      ansible.builtin.copy:\n        \
             content: \"{{{{ {{'home': bk_home, 'key': bk_ssh_public_key}} | to_json }}}}\"\n        \
             dest: {}\n        mode: \"0600\"\n",
            facts.display()
        ),
        &vars,
    );
    no_secret(&first, "first");
    assert_tools_linked(&sb.path("bin"));
    let (uid, gid, user_home) = passwd(USER).expect("the role creates the backup user");
    assert_eq!(user_home, home, "a new backup user gets bk_home");
    for file in [
        ".my.cnf",
        ".my-scratch.cnf",
        ".pgpass",
        ".pgpass-scratch",
        ".mongodb-uri",
        ".aws/credentials",
        ".aws/config",
        ".ssh/id_ed25519",
    ] {
        let meta = fs::metadata(home.join(file)).unwrap_or_else(|e| panic!("~{USER}/{file}: {e}"));
        assert_eq!(meta.mode() & 0o777, 0o600, "~{USER}/{file}: mode");
        assert_eq!((meta.uid(), meta.gid()), (uid, gid), "~{USER}/{file}: owner");
    }
    for dir in [&home, &store, &sb.path("lock")] {
        let meta = fs::metadata(dir).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.uid()), (0o700, uid), "{}", dir.display());
    }
    // The webhook's URL is a secret: in a file of the backup user's alone, named by the cron
    // lines, never in them; node_exporter must read the metrics directory.
    let url_file = home.join(".bk-notify/webhook.url");
    let meta = fs::metadata(&url_file).unwrap_or_else(|e| panic!("{}: {e}", url_file.display()));
    assert_eq!(
        (meta.mode() & 0o777, meta.uid()),
        (0o600, uid),
        "{}",
        url_file.display()
    );
    assert_eq!(fs::read_to_string(&url_file).unwrap().trim(), webhook);
    let meta = fs::metadata(prom.parent().unwrap()).expect("the metrics directory");
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o755, uid), "the metrics directory");
    for written in bk_tests::files_below(&cron_dir).into_iter().chain([runbook.clone()]) {
        let text = fs::read_to_string(&written).unwrap();
        assert!(!text.contains(&webhook), "{}: the webhook's URL", written.display());
        assert!(
            !text.contains("logger"),
            "{}: a pipe into logger hides the status",
            written.display()
        );
    }

    // The destination accepts the backup user's new key, as the fact gives it.
    let public_key = fs::read_to_string(home.join(".ssh/id_ed25519.pub")).expect("the backup user's public key");
    let facts: serde_json::Value = serde_json::from_str(&fs::read_to_string(&facts).expect("the facts")).unwrap();
    assert_eq!(facts["home"], json!(home), "bk_home");
    assert_eq!(facts["key"], json!(public_key.trim()), "bk_ssh_public_key");
    let authorized = ssh_home.join(".ssh/authorized_keys");
    let before = fs::read_to_string(&authorized).expect("the ssh test user's authorized_keys");
    fs::write(&authorized, format!("{before}{}\n", public_key.trim())).unwrap();
    let _authorized = Cleanup(|| {
        if let Ok(text) = fs::read_to_string(&authorized) {
            let kept: String = text
                .lines()
                .filter(|l| l.trim() != public_key.trim())
                .map(|l| format!("{l}\n"))
                .collect();
            let _ = fs::write(&authorized, kept);
        }
    });

    // 2. A second run changes nothing.
    let second = ansible.play(&vars);
    assert_eq!(
        second.changed, 0,
        "the second run changed something:\n{}",
        second.output
    );
    no_secret(&second, "second");

    let mut lint = ansible.command("ansible-lint");
    lint.current_dir(ansible.repo.join("ansible"));
    let lint = run_cmd(lint, "");
    assert_eq!(lint.code, 0, "ansible-lint:\n{}{}", lint.stdout, lint.stderr);

    // 3. Each job, run as cron runs it, as the backup user: a quiet run that stores a backup.
    for (job, name) in [
        ("db", format!("db-{unique}")),
        ("pg", format!("pg-{unique}")),
        ("data", "data".to_string()),
        ("mongo", format!("mongo-{unique}")),
        ("influx", format!("influx-{unique}")),
        ("export", "export".to_string()),
    ] {
        let path = cron_dir.join(format!("bk-{job}"));
        let at = path.display().to_string();
        let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(cron::valid_file_name(&file_name), "{at}: a name cron ignores");
        let file = cron::parse(&path);
        assert_eq!(file.var("SHELL"), Some("/bin/sh"), "{at}");
        assert!(file.var("PATH").is_some(), "{at}: no PATH");
        let mailto = if job == "db" { "dba@example.net" } else { "root" };
        assert_eq!(file.var("MAILTO"), Some(mailto), "{at}");
        assert_eq!(file.jobs.len(), 1, "{at}: one job");
        let cron_job = &file.jobs[0];
        // A files job is started by root (and drops to the backup user, able to read all).
        let (user, run_uid, run_gid, run_home) = match job {
            "data" => ("root", 0, 0, PathBuf::from("/root")),
            _ => (USER, uid, gid, home.clone()),
        };
        assert_eq!(cron_job.user, user, "{at}");
        assert!(
            !cron::has_bare_percent(&cron_job.command),
            "{at}: a bare % in {}",
            cron_job.command
        );
        assert!(
            job != "data" || cron_job.command.contains(" 50\\%'"),
            "{at}: the path with a space and a % is not quoted and escaped: {}",
            cron_job.command
        );
        let mut cmd = file.shell(&cron_job.command.replace("\\%", "%"), user, &run_home);
        cmd.current_dir(&home).uid(run_uid).gid(run_gid);
        let run = run_cmd(cmd, "");
        // nx-27017 is a standalone server: the dump says, every run, that it is not
        // point-in-time (a replica set's is); that line alone.
        let warned = run
            .stderr
            .strip_prefix("bk-dump: warning: ")
            .filter(|w| job == "mongo" && w.contains("a standalone server has no snapshots") && w.lines().count() == 1);
        assert_eq!(
            (
                run.code,
                run.stdout.as_str(),
                if warned.is_some() { "" } else { run.stderr.as_str() }
            ),
            (0, "", ""),
            "{at}: a good run prints nothing (cron would mail it): {}",
            cron_job.command
        );
        // The store stays the backup user's, whoever started the job.
        let owner = fs::metadata(store.join(&name)).unwrap().uid();
        assert_eq!(owner, uid, "{at}: the name's directory in the store");
        assert!(
            cron_job.command.contains("/bk-notify --webhook @"),
            "{at}: the pipeline does not end in bk-notify with the webhook's file: {}",
            cron_job.command
        );
        assert_eq!(
            last_run_success(&prom, &name, &at),
            Some(1.0),
            "{at}: the metrics of {name}"
        );
        assert_eq!(
            webhook_texts(&receiver),
            Vec::<String>::new(),
            "{at}: a good run sends nothing (--on failure)"
        );
        let local = manifest(&store.join(&name), &at);
        assert!(Path::new(&local.location).is_file(), "{at}: {} missing", local.location);
        assert!(
            local.counts.values().sum::<u64>() > 0,
            "{at}: an empty backup: {:?}",
            local.counts
        );
        match job {
            "db" => assert_eq!(
                manifest(&ssh_dir.join(&name), &at).sha256,
                local.sha256,
                "{at}: the ssh copy"
            ),
            "pg" => {
                let ls = sb
                    .cmd("bk-ls", &[&format!("s3://{s3_bucket}/{unique}"), "--name", &name])
                    .env("BK_S3_ENDPOINT", &s3_endpoint)
                    .output()
                    .expect("bk-ls");
                let ls = Run::from(ls).ok();
                assert_eq!(ls.artifact().sha256, local.sha256, "{at}: the S3 copy");
            }
            _ => {}
        }
    }

    // The whole store, as the backup user lists it (a stale check does): every job's backups.
    let mut ls = Command::new(sb.path("bin/bk-ls"));
    ls.arg(&store).current_dir(&home).uid(uid).gid(gid).env("HOME", &home);
    let listed: Vec<String> = Run::from(ls.output().expect("bk-ls"))
        .ok()
        .artifacts()
        .into_iter()
        .map(|a| a.name)
        .collect();
    for name in [
        format!("db-{unique}"),
        format!("pg-{unique}"),
        "data".to_string(),
        format!("mongo-{unique}"),
        format!("influx-{unique}"),
        "export".to_string(),
    ] {
        assert!(
            listed.contains(&name),
            "bk-ls of the store as {USER}: no {name} in {listed:?}"
        );
    }

    // 3b. verify restore restores each database, its view too, as the scratch account (the
    // dump's may not create databases): the job's command up to bk-verify, as cron runs it,
    // prints its verdict.
    for job in ["db", "pg"] {
        let path = cron_dir.join(format!("bk-{job}"));
        let file = cron::parse(&path);
        let command = file.jobs[0].command.replace("\\%", "%");
        let (to_verify, _) = command
            .rsplit_once(" | ")
            .unwrap_or_else(|| panic!("{}: no last stage after bk-verify", path.display()));
        assert!(
            to_verify.contains("bk-verify -q --scratch"),
            "{}: {to_verify}",
            path.display()
        );
        let mut cmd = file.shell(to_verify, USER, &home);
        cmd.current_dir(&home).uid(uid).gid(gid);
        let run = run_cmd(cmd, "");
        assert_eq!(run.code, 0, "{to_verify}:\n{}{}", run.stdout, run.stderr);
        let verified: Vec<serde_json::Map<String, serde_json::Value>> = run
            .stdout
            .lines()
            .filter_map(|l| match parse_line(l, "stdout") {
                Ok(Record::Verified(v)) => Some(v),
                _ => None,
            })
            .collect();
        // One per copy: the local store's and the destination's.
        assert_eq!(verified.len(), 2, "{job}: two verified records:\n{}", run.stdout);
        for v in &verified {
            assert_eq!(
                (&v["ok"], &v["level"]),
                (&json!(true), &json!("restore")),
                "{job}: {v:?}"
            );
        }
    }

    // 3c. The dump account's password changed on the server, not in the role: the job, run as
    // cron runs it, fails (exit 1, bk-notify's), a line on stderr for the mail, the webhook
    // says which backup failed, and the metrics say so.
    let db_file = cron::parse(&cron_dir.join("bk-db"));
    let db_name = format!("db-{unique}");
    let set_password = |password: &str| {
        mysql.sql(
            &admin_cnf,
            &format!("ALTER USER '{unique}'@'127.0.0.1' IDENTIFIED BY '{password}'"),
        )
    };
    set_password(&format!("changed-{unique}"));
    let mut cmd = db_file.shell(&db_file.jobs[0].command.replace("\\%", "%"), USER, &home);
    cmd.current_dir(&home).uid(uid).gid(gid);
    let run = run_cmd(cmd, "");
    set_password(&mysql_password);
    assert_eq!(run.code, 1, "the failing job's status, as cron sees it: {}", run.stderr);
    assert_eq!(run.stdout, "", "the records go to bk-notify's sinks, not to the mail");
    assert!(
        run.stderr.contains(&db_name) && run.stderr.contains("Access denied"),
        "the mail names the backup and the cause: {}",
        run.stderr
    );
    let texts = webhook_texts(&receiver);
    assert_eq!(texts.len(), 1, "one webhook for the failure: {texts:?}");
    assert!(
        texts[0].contains("FAILED") && texts[0].contains(&db_name),
        "the webhook's text names the failed backup: {}",
        texts[0]
    );
    assert_eq!(
        last_run_success(&prom, &db_name, "the failed job"),
        Some(0.0),
        "the metrics of {db_name}"
    );
    assert_eq!(
        last_run_success(&prom, "data", "the failed job"),
        Some(1.0),
        "another job's metrics kept"
    );

    // 3d. The stale-backup check, run as cron runs it: quiet while every name has a fresh
    // backup; a (simulated) day and more later, it fails and the webhook names each name.
    let stale_path = cron_dir.join("bk_stale");
    let stale_name = stale_path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(cron::valid_file_name(&stale_name), "{stale_name}: a name cron ignores");
    let stale_file = cron::parse(&stale_path);
    assert_eq!(stale_file.jobs.len(), 1, "{}: one job", stale_path.display());
    let stale_job = &stale_file.jobs[0];
    assert_eq!(stale_job.user, "root", "the check reads every job's backups");
    let stale_run = |now: Option<String>| {
        let mut cmd = stale_file.shell(&stale_job.command.replace("\\%", "%"), "root", Path::new("/root"));
        if let Some(now) = now {
            cmd.env("BK_NOW", now);
        }
        run_cmd(cmd, "")
    };
    let fresh = stale_run(None);
    assert_eq!(
        (fresh.code, fresh.stdout.as_str(), fresh.stderr.as_str()),
        (0, "", ""),
        "the check, all fresh"
    );
    assert_eq!(
        webhook_texts(&receiver).len(),
        1,
        "the check sent a webhook with all fresh"
    );
    let later = (chrono::Utc::now() + chrono::TimeDelta::hours(27)).to_rfc3339();
    let stale = stale_run(Some(later));
    assert_eq!(
        (stale.code, stale.stdout.as_str()),
        (1, ""),
        "the check, a day missed: {}",
        stale.stderr
    );
    let texts = webhook_texts(&receiver);
    assert_eq!(texts.len(), 2, "one webhook for the stale backups: {texts:?}");
    for name in [db_name.clone(), format!("pg-{unique}"), "data".to_string()] {
        assert!(stale.stderr.contains(&name), "the mail names {name}: {}", stale.stderr);
        assert!(texts[1].contains(&name), "the webhook names {name}: {}", texts[1]);
    }

    // 4. The runbook's Restore and Check commands of each job, run as root (the PostgreSQL
    // password in the file the role wrote, root's alone), bring the data back equal to its
    // source.
    let restore_pgpass = fs::metadata(sb.path("etc/bk/restore.pgpass")).expect("the restore password file");
    assert_eq!(
        (restore_pgpass.mode() & 0o777, restore_pgpass.uid()),
        (0o600, 0),
        "the restore password file"
    );
    let _pg_restored = pg.database(&format!("{unique}_restored"));
    let text = fs::read_to_string(&runbook).expect("the runbook");
    for job in ["db", "pg", "data", "influx", "export"] {
        for step in ["Restore", "Check"] {
            let script = runbook_blocks(&text, job, step);
            let mut sh = Command::new("/bin/sh");
            sh.args(["-e", "-c", &script])
                .current_dir(sb.root())
                .env_remove("PGPASSFILE");
            let run = run_cmd(sh, "");
            assert_eq!(
                run.code, 0,
                "the runbook's {step} of job {job} failed:\n{script}\n{}{}",
                run.stdout, run.stderr
            );
            if step == "Restore" {
                let restored = run.restored();
                assert!(restored.complete, "{restored:?}");
            }
        }
    }
    // The mongodb job's runbook: its Verify block reads the backup whole; its Restore block,
    // bk-restore into <database>_restored over the jobs' URI file, brings every document back.
    let script = runbook_blocks(&text, "mongo", "Verify");
    let run = run_cmd(
        {
            let mut sh = Command::new("/bin/sh");
            sh.args(["-e", "-c", &script]).current_dir(sb.root());
            sh
        },
        "",
    );
    assert_eq!(
        run.code, 0,
        "the runbook's Verify of job mongo:\n{script}\n{}",
        run.stderr
    );
    let verified: Vec<Record> = run.records();
    assert!(
        matches!(verified.as_slice(), [Record::Verified(v)] if v["ok"] == json!(true)),
        "{}",
        run.stdout
    );
    let restore = runbook_blocks(&text, "mongo", "Restore");
    assert_eq!(
        restore.trim(),
        format!(
            "{}/bk-restore --from {} --name mongo-{unique} --database {unique}_restored --uri-file {}",
            sb.path("bin").display(),
            store.display(),
            home.join(".mongodb-uri").display()
        ),
        "the runbook's Restore of job mongo"
    );
    let _mongo_restored = mongo.database(&format!("{unique}_restored"));
    let run = run_cmd(
        {
            let mut sh = Command::new("/bin/sh");
            sh.args(["-e", "-c", &restore]).current_dir(sb.root());
            sh
        },
        "",
    );
    assert_eq!(run.code, 0, "the runbook's Restore of job mongo:\n{}", run.stderr);
    assert!(run.restored().complete, "{}", run.stdout);
    // Digests are keyed `database.collection`: compared by collection.
    let by_collection = |db: &str| -> Vec<(String, Value)> {
        let digests = mongo.digests(db);
        let map = digests.as_object().expect("digests by collection");
        map.iter()
            .map(|(k, v)| (k.strip_prefix(&format!("{db}.")).unwrap_or(k).to_string(), v.clone()))
            .collect()
    };
    let source = by_collection(&unique);
    assert!(!source.is_empty(), "the source has collections");
    assert_eq!(
        by_collection(&format!("{unique}_restored")),
        source,
        "the restored documents are the source's"
    );
    // The Check commands compared whole dumps; the rows once more, through the server.
    for table in ["items", "notes", "cheap"] {
        let rows = |db: &str| mysql.sql(&admin_cnf, &format!("SELECT * FROM `{db}`.`{table}` ORDER BY id"));
        assert_eq!(rows(&format!("{unique}_restored")), rows(&unique), "table {table}");
    }

    // 5. A job taken out of bk_jobs loses its cron.d file; a hand-written one stays.
    let handmade = cron_dir.join("bk-handmade");
    fs::write(
        &handmade,
        "SHELL=/bin/sh\n# m h dom mon dow user command\n0 1 * * * root true\n",
    )
    .unwrap();
    jobs.retain(|j| j["name"] != "data");
    let pg_job = jobs.iter_mut().find(|j| j["name"] == "pg").expect("the pg job");
    pg_job["healthcheck"] = json!(healthcheck);
    vars["bk_jobs"] = json!(jobs);
    vars["bk_stale_after"] = json!("");
    vars["bk_notify_webhook"] = json!("");
    vars["bk_notify_prom_dir"] = json!("");
    let third = ansible.play(&vars);
    no_secret(&third, "third");
    assert!(
        !cron_dir.join("bk-data").exists(),
        "the removed job's file stays:\n{}",
        third.output
    );
    for kept in ["bk-db", "bk-pg", "bk-handmade"] {
        assert!(cron_dir.join(kept).exists(), "{kept} was removed:\n{}", third.output);
    }
    // Emptied variables: no stale check, no URL file, and the lines no longer name them.
    assert!(!stale_path.exists(), "bk_stale_after emptied, its file stays");
    assert!(!url_file.exists(), "bk_notify_webhook emptied, its file stays");
    let db_line = &cron::parse(&cron_dir.join("bk-db")).jobs[0].command;
    assert!(
        db_line.ends_with("/bk-notify >/dev/null") && !db_line.contains("--webhook"),
        "with no sink the line still ends in bk-notify, for its status: {db_line}"
    );
    assert!(
        !fs::read_to_string(&runbook).unwrap().contains("## Job data"),
        "the runbook still has the removed job"
    );
    // A job's own healthcheck: its URL in a file of its own, which only its line names.
    let hc_file = home.join(".bk-notify/healthcheck-pg.url");
    let meta = fs::metadata(&hc_file).unwrap_or_else(|e| panic!("{}: {e}", hc_file.display()));
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o600, uid), "{}", hc_file.display());
    assert_eq!(fs::read_to_string(&hc_file).unwrap().trim(), healthcheck);
    let pg_line = &cron::parse(&cron_dir.join("bk-pg")).jobs[0].command;
    assert!(
        pg_line.ends_with(&format!(
            "/bk-notify --healthcheck @{} --start-now >/dev/null",
            hc_file.display()
        )),
        "the pg job's line: {pg_line}"
    );
    assert!(
        !db_line.contains("--healthcheck"),
        "the db job has no healthcheck: {db_line}"
    );
    // Run as cron runs it, the job pings its check as it starts and when it succeeded.
    let pg_file = cron::parse(&cron_dir.join("bk-pg"));
    let before = receiver.received().len();
    let mut cmd = pg_file.shell(&pg_file.jobs[0].command.replace("\\%", "%"), USER, &home);
    cmd.current_dir(&home).uid(uid).gid(gid);
    let run = run_cmd(cmd, "");
    assert_eq!(
        (run.code, run.stdout.as_str(), run.stderr.as_str()),
        (0, "", ""),
        "{pg_line}"
    );
    let pinged: Vec<String> = receiver.received()[before..].iter().map(|r| r.path.clone()).collect();
    let check = format!("/ping/{unique}-uuid");
    assert_eq!(pinged, [format!("{check}/start"), check], "the pg job's pings");
    for written in bk_tests::files_below(&cron_dir) {
        let text = fs::read_to_string(&written).unwrap();
        assert!(
            !text.contains(&healthcheck),
            "{}: the healthcheck's URL",
            written.display()
        );
    }
}

/// The role's other install path: a release tarball with `bk` at its top, over an older
/// install whose tools were single binaries; a second run changes nothing.
#[test]
fn role_installs_from_a_release_tarball() {
    let Some((sb, venv)) = ansible_sandbox() else {
        return;
    };
    let ansible = Ansible::new(&sb, venv);
    let tarball = sb.path("bk.tar.gz");
    // A copy: linking the same file elsewhere meanwhile (the other test's snapshot) changes its
    // ctime, which tar takes for a file changed as it read it.
    let built = sb.path("built");
    fs::create_dir_all(&built).unwrap();
    fs::copy(bk_tests::bin("bk"), built.join("bk")).expect("copying bk");
    let mut tar = Command::new("tar");
    tar.arg("-C").arg(&built).arg("-czf").arg(&tarball).arg("bk");
    let made = run_cmd(tar, "");
    assert_eq!(made.code, 0, "tar: {}", made.stderr);
    let bin = sb.path("bin");
    fs::create_dir_all(&bin).unwrap();
    fs::write(bin.join("bk-dump"), "#!/bin/sh\necho an older bk-dump\n").unwrap();
    let vars = json!({"bk_install_src": tarball, "bk_bin_dir": bin, "bk_install_packages": false});
    let tasks =
        "  tasks:\n    - name: Install bk\n      ansible.builtin.include_role: {name: bk, tasks_from: install}\n";
    let first = ansible.play_tasks(tasks, &vars);
    assert!(first.changed > 0, "the first run installed nothing:\n{}", first.output);
    assert_tools_linked(&bin);
    let second = ansible.play_tasks(tasks, &vars);
    assert_eq!(
        second.changed, 0,
        "the second run changed something:\n{}",
        second.output
    );
}

/// `bk_state: absent` after present: what the role installed is gone (tools, cron.d files,
/// runbook, credential files, ssh key, lock directory, the database accounts it created, the
/// user when asked), the store and its backups and the user's home stay, and a second absent
/// run changes nothing.
#[test]
fn role_removes_what_it_installed() {
    if !have_root() {
        return;
    }
    let (Some(mysql), Some(pg), Some(venv)) = (mysql_server(), pg_server(), ansible_venv()) else {
        return;
    };
    // Not the other test's user: the tests run at the same time.
    const USER: &str = "bktestrm";
    let sb = Sandbox::new();
    fs::set_permissions(sb.root(), fs::Permissions::from_mode(0o755)).unwrap();
    let ansible = Ansible::new(&sb, venv);
    let _user = backup_user(USER);
    let unique = bk_tests::mysql_unique_name("bkrm");
    let accounts = RoleAccounts::new(&mysql, &pg, &unique);
    let scratch_user = accounts.scratch.clone();
    let data = sb.path("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("a.conf"), "key = value\n").unwrap();
    let (home, store, bin, cron_dir, lock) = (
        sb.path("home"),
        sb.path("store"),
        sb.path("bin"),
        sb.path("cron.d"),
        sb.path("lock"),
    );
    let (runbook, restore_pgpass) = (sb.path("etc/bk/RESTORE.md"), sb.path("etc/bk/restore.pgpass"));
    // Every kind of credential file: database jobs with verify restore, ssh and S3 destinations
    // (the role never connects to those).
    let jobs = json!([
        {"name": "data", "engine": "files", "paths": [data], "schedule": "@daily"},
        {"name": "plain", "engine": "files", "paths": [data], "schedule": "@daily", "user": USER},
        {"name": "db", "engine": "mysql", "databases": ["x"], "schedule": "@daily", "verify": "restore",
         "destinations": ["ssh://bk@backup.invalid/srv/bk"]},
        {"name": "pg", "engine": "postgres", "databases": ["x"], "schedule": "@daily", "verify": "restore",
         "destinations": ["s3://bucket/prefix"]},
    ]);
    let mut vars = json!({
        "bk_install_src": snapshot_tools(&sb), "bk_install_packages": false,
        "bk_bin_dir": bin, "bk_user": USER, "bk_home": home, "bk_store": store, "bk_lock_dir": lock,
        "bk_cron_dir": cron_dir, "bk_runbook_path": runbook, "bk_scratch_dir": sb.path("scratch"),
        "bk_jobs": jobs,
        "bk_mysql_host": mysql.host, "bk_mysql_port": mysql.port, "bk_mysql_user": unique,
        "bk_mysql_create_user": true, "bk_mysql_user_host": "127.0.0.1",
        "bk_mysql_login_host": mysql.host, "bk_mysql_login_port": mysql.port,
        "bk_mysql_login_user": mysql.user, "bk_mysql_login_password": mysql.password,
        "bk_mysql_scratch_user": scratch_user,
        "bk_postgres_host": pg.host, "bk_postgres_port": pg.port, "bk_postgres_user": unique,
        "bk_postgres_create_user": true, "bk_postgres_scratch_user": scratch_user,
        "bk_postgres_login_host": pg.host, "bk_postgres_login_port": pg.port,
        "bk_postgres_login_user": pg.user, "bk_postgres_login_password": pg.password,
        "bk_postgres_restore_password": pg.password, "bk_postgres_restore_pgpass": restore_pgpass,
        "bk_install_python_db_drivers": false, "bk_s3_access_key_id": "AKIA", "bk_s3_secret_access_key": "s",
    });
    ansible.play(&vars);
    let admin_cnf = mysql.option_file(&sb, "admin.cnf");
    let mysql_accounts = || {
        let users = mysql.sql(&admin_cnf, "SELECT User FROM mysql.user");
        users.lines().filter(|u| *u == unique || *u == scratch_user).count()
    };
    let pg_roles_left = || {
        let rows = pg
            .client("postgres")
            .query(
                "SELECT 1 FROM pg_roles WHERE rolname = $1 OR rolname = $2",
                &[&unique, &scratch_user],
            )
            .expect("pg_roles");
        rows.len()
    };
    let home_files = [
        ".my.cnf",
        ".my-scratch.cnf",
        ".pgpass",
        ".pgpass-scratch",
        ".aws/credentials",
        ".aws/config",
        ".ssh/id_ed25519",
        ".ssh/id_ed25519.pub",
    ];
    let cron_files = ["bk-data", "bk-plain", "bk-db", "bk-pg"].map(|f| cron_dir.join(f));
    let installed: Vec<PathBuf> = home_files
        .iter()
        .map(|f| home.join(f))
        .chain(cron_files.clone())
        .chain([
            bin.join("bk"),
            bin.join("bk-dump"),
            runbook.clone(),
            restore_pgpass.clone(),
            lock.clone(),
        ])
        .collect();
    for path in &installed {
        assert!(path.exists(), "the present run did not make {}", path.display());
    }
    assert_eq!((mysql_accounts(), pg_roles_left()), (2, 2), "the database accounts");

    // A backup in the store, as the files job makes it; and a cron.d file written by hand.
    let file = cron::parse(&cron_files[0]);
    assert_eq!(file.jobs[0].user, "root", "a files job is started by root");
    let mut job = file.shell(&file.jobs[0].command.replace("\\%", "%"), "root", Path::new("/root"));
    job.current_dir(&home);
    let run = run_cmd(job, "");
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "the files job");
    let backup = manifest(&store.join("data"), "the files job");
    // A files job whose user is the backup user: cron starts it as that user, as it is.
    let plain = cron::parse(&cron_files[1]);
    assert_eq!(
        (plain.jobs[0].user.as_str(), plain.jobs[0].command.contains("setpriv")),
        (USER, false),
        "a files job with user: {USER}"
    );
    let handmade = cron_dir.join("bk-handmade");
    fs::write(&handmade, "0 1 * * * root true\n").unwrap();
    // What the notifications leave (bk_notify_* and bk_stale_after): gone too.
    let metrics = sb.path("metrics");
    let notified = [
        cron_dir.join("bk_stale"),
        home.join(".bk-notify/webhook.url"),
        metrics.join("bk.prom"),
    ];
    for path in &notified {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, "").unwrap();
    }

    vars["bk_state"] = json!("absent");
    vars["bk_remove_user"] = json!(true);
    vars["bk_notify_prom_dir"] = json!(metrics);
    let absent = ansible.play(&vars);
    for path in installed.iter().chain(&notified) {
        assert!(
            !path.exists(),
            "{} is left after bk_state absent:\n{}",
            path.display(),
            absent.output
        );
    }
    assert_eq!(
        (mysql_accounts(), pg_roles_left()),
        (0, 0),
        "the database accounts are left"
    );
    assert!(passwd(USER).is_none(), "the backup user is left");
    assert!(
        home.is_dir() && metrics.is_dir(),
        "the backup user's home or the metrics directory is gone"
    );
    assert!(handmade.exists(), "a cron.d file the role did not write is gone");
    assert_eq!(
        manifest(&store.join("data"), "the store after absent").sha256,
        backup.sha256,
        "the store's backup"
    );
    assert!(Path::new(&backup.location).is_file(), "the backup's file is gone");

    let again = ansible.play(&vars);
    assert_eq!(
        again.changed, 0,
        "the second absent run changed something:\n{}",
        again.output
    );
}

/// Jobs the role cannot run as asked are refused before anything is changed, with a message
/// that says what to change.
#[test]
fn role_refuses_jobs_it_cannot_run() {
    let Some((sb, venv)) = ansible_sandbox() else {
        return;
    };
    let ansible = Ansible::new(&sb, venv);
    let files =
        |user: &str| json!({"name": "data", "engine": "files", "paths": ["/etc"], "schedule": "@daily", "user": user});
    let restore =
        json!({"name": "db", "engine": "mysql", "databases": ["x"], "schedule": "@daily", "verify": "restore"});
    let cases = [
        // Another user than root or bk_user could not write bk_user's store.
        (files("nobody"), json!({}), "a files job's user is root or bk_user"),
        // The scratch account would take the dump account's rights away.
        (
            restore.clone(),
            json!({"bk_mysql_create_user": true, "bk_mysql_scratch_user": "backup"}),
            "give it another name than",
        ),
        // bk restores a scratch copy only on a server it is told of.
        (
            json!({"name": "m", "engine": "mongodb", "databases": ["x"], "schedule": "@daily", "verify": "restore"}),
            json!({}),
            "a mongodb job with verify: restore needs a scratch server",
        ),
        // A command job: its command, a format that can be part of a file name, nothing to
        // restore a scratch copy into.
        (
            json!({"name": "c", "engine": "command", "schedule": "@daily"}),
            json!({}),
            "a command job has a command",
        ),
        (
            json!({"name": "c", "engine": "command", "command": ["true"], "format": "../x", "schedule": "@daily"}),
            json!({}),
            "a format of a-z, 0-9 and '-'",
        ),
        (
            json!({"name": "c", "engine": "command", "command": ["true"], "schedule": "@daily", "verify": "restore"}),
            json!({}),
            "verify integrity or none",
        ),
    ];
    let built = snapshot_tools(&sb);
    for (job, more, message) in cases {
        let mut vars = json!({"bk_install_src": built, "bk_bin_dir": sb.path("bin"),
                              "bk_install_packages": false, "bk_jobs": [job]});
        for (k, v) in more.as_object().unwrap() {
            vars[k] = v.clone();
        }
        let run = ansible.run_playbook("  roles: [bk]\n", &vars);
        let output = format!("{}{}", run.stdout, run.stderr);
        assert_eq!(run.code, 2, "{vars}: not refused:\n{output}");
        assert!(output.contains(message), "{vars}: no `{message}` in:\n{output}");
        assert!(!sb.path("bin").exists(), "{vars}: installed before refusing:\n{output}");
    }
}

/// Bad notification and stale-check settings are refused before anything is installed, with a
/// message naming the variable, and a refused URL is not shown.
#[test]
fn role_refuses_bad_notification_settings() {
    let Some(venv) = ansible_venv() else {
        return;
    };
    let sb = Sandbox::new();
    let ansible = Ansible::new(&sb, venv);
    let secret = "hooks.example.net/T0/secret-token";
    let job = |healthcheck: &str| json!([{"name": "etc", "engine": "files", "paths": ["/etc"], "schedule": "@daily", "healthcheck": healthcheck}]);
    // Each case: the variable, its bad value, what the message must name.
    let cases = [
        ("bk_notify_webhook", json!(secret), "bk_notify_webhook"),
        (
            "bk_notify_webhook",
            json!(format!("https://{secret} x")),
            "bk_notify_webhook",
        ),
        (
            "bk_notify_healthcheck",
            json!(format!("ftp://{secret}")),
            "bk_notify_healthcheck",
        ),
        ("bk_jobs", job(&format!("hc://{secret}")), "each job's healthcheck"),
        ("bk_notify_on", json!("sometimes"), "bk_notify_on"),
        ("bk_notify_syslog", json!("maybe"), "bk_notify_syslog"),
        ("bk_notify_prom_dir", json!("metrics"), "bk_notify_prom_dir"),
        ("bk_stale_after", json!("26 hours"), "bk_stale_after"),
        ("bk_stale_schedule", json!("hourly"), "bk_stale_schedule"),
    ];
    let tasks = "  tasks:\n    - name: Check\n      ansible.builtin.include_role: {name: bk, tasks_from: validate}\n";
    let good = json!({"bk_install_src": "/nonexistent", "bk_jobs": job("https://hc.example.net/ping/1")});
    let run = ansible.run_playbook(tasks, &good);
    assert_eq!(run.code, 0, "good settings refused:\n{}{}", run.stdout, run.stderr);
    for (variable, value, says) in cases {
        let mut vars = good.clone();
        vars[variable] = value.clone();
        let run = ansible.run_playbook(tasks, &vars);
        let output = format!("{}{}", run.stdout, run.stderr);
        let case = format!("{variable}: {value}");
        assert_ne!(run.code, 0, "{case}: accepted:\n{output}");
        assert!(
            output.contains(says),
            "{case}: the message does not name {says}:\n{output}"
        );
        assert!(!output.contains(secret), "{case}: the refused URL is shown:\n{output}");
    }
}
