//! The ftp:// and ftps:// stores against the real test servers tests/services.sh starts:
//! pyftpdlib (plain FTP on TEST_FTP_PORT, explicit FTPS on TEST_FTPS_PORT with a certificate of
//! the private CA TEST_FTP_CA), and vsftpd (FTPS on TEST_VSFTPD_PORT, anonymous, without MLSD,
//! requiring TLS session reuse). With BK_TEST_SERVICES=1 a missing server is a failure, not a
//! skip.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bk_core::record::{Artifact, Record};
use bk_tests::{needs, tree_digest, unique_name, write_backup, Sandbox, SERVICES_ENV};

/// The FTP test server, from the TEST_FTP_* variables tests/services.sh writes.
struct Ftp {
    host: String,
    port: String,
    ftps_port: String,
    user: String,
    readonly_user: String,
    password: String,
    /// The CA certificate the FTPS server's certificate is signed by.
    ca: String,
    /// The users' home directory on this machine, where the server keeps the files.
    home: PathBuf,
    vsftpd_port: String,
    /// vsftpd's anonymous root on this machine; `pub` below it is writable.
    vsftpd_root: PathBuf,
}

fn ftp() -> Option<Ftp> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let found = (|| {
        Some(Ftp {
            host: var("TEST_FTP_HOST")?,
            port: var("TEST_FTP_PORT")?,
            ftps_port: var("TEST_FTPS_PORT")?,
            user: var("TEST_FTP_USER")?,
            readonly_user: var("TEST_FTP_READONLY_USER")?,
            password: var("TEST_FTP_PASSWORD")?,
            ca: var("TEST_FTP_CA")?,
            home: PathBuf::from(var("TEST_FTP_HOME")?),
            vsftpd_port: var("TEST_VSFTPD_PORT")?,
            vsftpd_root: PathBuf::from(var("TEST_VSFTPD_ROOT")?),
        })
    })();
    let why = || "TEST_FTP_* or TEST_VSFTPD_* are not set".into();
    needs(found, why, SERVICES_ENV)
}

impl Ftp {
    /// A fresh store below the login directory: `ftp://host:port/<unique>`.
    fn store(&self, prefix: &str) -> String {
        format!("ftp://{}:{}/{}", self.host, self.port, unique_name(prefix))
    }

    /// A fresh store on the FTPS port.
    fn ftps_store(&self, prefix: &str) -> String {
        format!("ftps://{}:{}/{}", self.host, self.ftps_port, unique_name(prefix))
    }

    /// Where the server keeps a store's files on this machine.
    fn dir_of(&self, store: &str) -> PathBuf {
        self.home.join(store.rsplit('/').next().expect("a store path"))
    }

    /// A credentials file in netrc format at `<sandbox>/<file>` with the given mode.
    fn credentials(&self, sb: &Sandbox, file: &str, login: &str, password: &str, mode: u32) -> PathBuf {
        let path = sb.path(file);
        std::fs::write(
            &path,
            format!(
                "# the test server\nmachine {} login {login} password {password}\n",
                self.host
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// A tool with the password from `netrc` (NETRC) and the test CA trusted (SSL_CERT_FILE).
    fn cmd(&self, sb: &Sandbox, netrc: &Path, tool: &str, args: &[&str]) -> Command {
        let mut cmd = sb.cmd(tool, args);
        cmd.env("NETRC", netrc)
            .env("SSL_CERT_FILE", &self.ca)
            .env("HOME", sb.root())
            .env_remove("BK_FTP_CREDENTIALS");
        cmd
    }
}

/// A files backup of `<sandbox>/data`; its record as a line, and the data's digest.
fn dump(sb: &Sandbox) -> (String, std::collections::BTreeMap<String, String>) {
    std::fs::create_dir_all(sb.path("data/sub")).unwrap();
    std::fs::write(sb.path("data/a.txt"), "alpha\n").unwrap();
    std::fs::write(sb.path("data/sub/b.bin"), vec![9u8; 700_000]).unwrap();
    let data = sb.path("data").display().to_string();
    let a = sb.dump(&["files", &data, "--name", "web"]);
    (Record::Artifact(a).to_line(), tree_digest(&sb.path("data")))
}

/// The data as restored into `<sandbox>/<target>` (a files restore recreates the full path).
fn restored(sb: &Sandbox, target: &str) -> std::collections::BTreeMap<String, String> {
    let data = sb.path("data");
    tree_digest(&sb.path(target).join(data.strip_prefix("/").unwrap()))
}

#[test]
fn push_to_ftp_and_ftps_then_every_tool_works_on_both() {
    let Some(f) = ftp() else { return };
    let sb = Sandbox::new();
    let netrc = f.credentials(&sb, "netrc", &f.user, &f.password, 0o600);
    let run = |tool: &str, args: &[&str], stdin: &str| bk_tests::run_cmd(f.cmd(&sb, &netrc, tool, args), stdin);
    let (line, expected) = dump(&sb);
    let (plain, secure) = (f.store("bk-ftp"), f.ftps_store("bk-ftps"));

    let shipped = run("bk-ship", &["--to", &plain, "--to", &secure], &line).ok();
    let records = shipped.artifacts();
    assert_eq!(records.len(), 3, "{}", shipped.stdout);
    assert_eq!(shipped.lines()[0], line.trim_end(), "the input is passed on unchanged");
    for (copy, store) in records[1..].iter().zip([&plain, &secure]) {
        assert_eq!(copy.location, format!("{store}/web/{}", records[0].file));
        assert_eq!((&copy.id, &copy.sha256), (&records[0].id, &records[0].sha256));
    }
    // Nothing of an upload is left beside the published files.
    let mut on_server: Vec<String> = std::fs::read_dir(f.dir_of(&plain).join("web"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    on_server.sort();
    assert_eq!(on_server, [format!("{}.json", records[0].id), records[0].file.clone()]);

    // Shipping again copies nothing.
    let again = run("bk-ship", &["--to", &plain, "--to", &secure], &line).ok();
    assert_eq!(again.artifacts().len(), 1, "{}", again.stdout);
    assert!(again.stderr.contains("already in"), "{}", again.stderr);

    for (i, (store, copy)) in [&plain, &secure].into_iter().zip(&records[1..]).enumerate() {
        let listed = run("bk-ls", &[store], "").ok();
        assert_eq!(listed.artifacts(), std::slice::from_ref(copy));
        assert_eq!(listed.stderr, "", "no warnings");
        let verified = run("bk-verify", &["--from", store, "--name", "web", "--latest"], "").ok();
        assert!(verified.stdout.contains(r#""ok":true"#), "{}", verified.stdout);
        let target = format!("r{i}");
        run(
            "bk-restore",
            &["--from", store, "--name", "web", "--latest", "--to", &target],
            "",
        )
        .ok();
        assert_eq!(restored(&sb, &target), expected, "restored from {store}");
        // A record whose location is on the server: bk-restore and bk-verify open it there.
        let record = Record::Artifact(copy.clone()).to_line();
        let target = format!("s{i}");
        run("bk-restore", &["--to", &target], &record).ok();
        assert_eq!(restored(&sb, &target), expected);
        run("bk-verify", &[], &record).ok();
    }

    // Pull from the FTP store to a local one: idempotent.
    let mirror = sb.path("mirror").display().to_string();
    let pulled = run("bk-ship", &["--from", &plain, "--all", "--to", &mirror], "").ok();
    assert_eq!(pulled.artifacts().len(), 1, "{}", pulled.stdout);
    assert!(pulled.artifacts()[0].location.starts_with(&mirror));
    assert_eq!(
        run("bk-ship", &["--from", &plain, "--all", "--to", &mirror], "")
            .ok()
            .lines(),
        Vec::<&str>::new()
    );
    run(
        "bk-restore",
        &["--from", &mirror, "--name", "web", "--latest", "--to", "r-mirror"],
        "",
    )
    .ok();
    assert_eq!(restored(&sb, "r-mirror"), expected);
}

#[test]
fn prune_deletes_on_the_ftp_store_manifest_and_file() {
    let Some(f) = ftp() else { return };
    let sb = Sandbox::new();
    let netrc = f.credentials(&sb, "netrc", &f.user, &f.password, 0o600);
    let run = |tool: &str, args: &[&str]| bk_tests::run_cmd(f.cmd(&sb, &netrc, tool, args), "");
    let source = sb.store();
    let old = write_backup(&source, "db", "20261120T010000Z");
    let new = write_backup(&source, "db", "20261121T010000Z");
    let store = f.ftps_store("bk-prune");
    assert_eq!(
        run("bk-ship", &["--from", &source, "--all", "--to", &store])
            .ok()
            .artifacts()
            .len(),
        2
    );

    let pruned = run("bk-prune", &[&store, "--keep-last", "1"]).ok();
    let (kept, gone) = pruned.decisions();
    let kept: Vec<_> = kept.into_iter().map(|k| k.id).collect();
    let gone: Vec<_> = gone.into_iter().map(|p| p.location).collect();
    assert_eq!(kept, [new.id.as_str()]);
    assert_eq!(gone, [format!("{store}/db/{}", old.file)]);
    let listed: Vec<Artifact> = run("bk-ls", &[&store]).ok().artifacts();
    assert_eq!(listed.iter().map(|a| &a.id).collect::<Vec<_>>(), [&new.id]);
    let dir = f.dir_of(&store).join("db");
    assert!(!dir.join(&old.file).exists() && !dir.join(format!("{}.json", old.id)).exists());
    assert!(dir.join(&new.file).exists());
}

#[test]
fn credentials_come_from_a_private_file_and_failures_have_clear_exit_codes() {
    let Some(f) = ftp() else { return };
    let sb = Sandbox::new();
    let (line, _) = dump(&sb);
    let store = f.store("bk-creds");
    // BK_FTP_CREDENTIALS: a 0600 file in netrc format, for bk alone.
    let private = f.credentials(&sb, "bk-ftp", &f.user, &f.password, 0o600);
    let with_file = |file: &Path, tool: &str, args: &[&str], stdin: &str| {
        let mut cmd = f.cmd(&sb, Path::new("/nonexistent/netrc"), tool, args);
        cmd.env("BK_FTP_CREDENTIALS", file);
        bk_tests::run_cmd(cmd, stdin)
    };
    let shipped = with_file(&private, "bk-ship", &["--to", &store], &line).ok();
    assert_eq!(shipped.artifacts().len(), 2);
    with_file(&private, "bk-ls", &[&store], "").ok();

    // Readable by its group: refused before connecting (78), saying what to do.
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o640)).unwrap();
    let loose = with_file(&private, "bk-ls", &[&store], "").code(78);
    assert!(loose.error().message.contains("chmod 600"), "{}", loose.error().message);
    assert!(!loose.stderr.contains(&f.password) && !loose.stdout.contains(&f.password));

    // A wrong password: 77, one line on stderr, and the password nowhere.
    let wrong_password = "not-the-password-42";
    let netrc = f.credentials(&sb, "netrc", &f.user, wrong_password, 0o600);
    let refused = bk_tests::run_cmd(f.cmd(&sb, &netrc, "bk-ls", &[&store]), "").code(77);
    assert_eq!(refused.stderr.lines().count(), 1, "{}", refused.stderr);
    assert!(
        refused.error().message.contains("refused"),
        "{}",
        refused.error().message
    );
    for text in [&refused.stdout, &refused.stderr] {
        assert!(!text.contains(wrong_password), "{text}");
    }
    let refused = bk_tests::run_cmd(
        f.cmd(&sb, &netrc, "bk-ship", &["--to", &store, "--retries", "0"]),
        &line,
    )
    .code(77);
    assert!(!refused.stderr.contains(wrong_password) && !refused.stdout.contains(wrong_password));

    // A password in the URL: a usage error that does not repeat it.
    let good = f.credentials(&sb, "netrc-good", &f.user, &f.password, 0o600);
    let in_url = format!("ftp://{}:{}@{}:{}/x", f.user, wrong_password, f.host, f.port);
    let run = bk_tests::run_cmd(f.cmd(&sb, &good, "bk-ls", &[&in_url]), "").code(64);
    assert!(run.error().message.contains("netrc"), "{}", run.error().message);
    assert!(!run.stderr.contains(wrong_password) && !run.stdout.contains(wrong_password));

    // Nobody listening: 69, and the input is passed on.
    let closed = format!("ftp://{}:1/x", f.host);
    let down = bk_tests::run_cmd(
        f.cmd(&sb, &good, "bk-ship", &["--to", &closed, "--retries", "0"]),
        &line,
    )
    .code(69);
    assert!(
        down.error().message.contains("cannot reach"),
        "{}",
        down.error().message
    );
    assert_eq!(down.lines()[0], line.trim_end());
    bk_tests::run_cmd(f.cmd(&sb, &good, "bk-ls", &[&closed]), "").code(69);

    // A user who may not write there: 73.
    let readonly = f.credentials(&sb, "netrc-ro", &f.readonly_user, &f.password, 0o600);
    let ro_store = format!(
        "ftp://{}@{}:{}/{}",
        f.readonly_user,
        f.host,
        f.port,
        unique_name("bk-ro")
    );
    bk_tests::run_cmd(
        f.cmd(&sb, &readonly, "bk-ship", &["--to", &ro_store, "--retries", "0"]),
        &line,
    )
    .code(73);

    // FTPS with a certificate nobody vouches for (the system CAs only): 78, never plain FTP.
    let secure = f.ftps_store("bk-untrusted");
    let mut cmd = f.cmd(&sb, &good, "bk-ls", &[&secure]);
    cmd.env_remove("SSL_CERT_FILE");
    let untrusted = bk_tests::run_cmd(cmd, "").code(78);
    assert!(
        untrusted.error().message.contains("SSL_CERT_FILE"),
        "{}",
        untrusted.error().message
    );
    // ftps:// to a server without TLS: refused, 78.
    let plain_port = format!("ftps://{}:{}/x", f.host, f.port);
    let no_tls = bk_tests::run_cmd(f.cmd(&sb, &good, "bk-ls", &[&plain_port]), "").code(78);
    assert!(no_tls.error().message.contains("FTPS"), "{}", no_tls.error().message);
}

#[test]
fn prune_removes_old_temporary_files_an_unfinished_upload_left() {
    let Some(f) = ftp() else { return };
    let sb = Sandbox::new();
    let netrc = f.credentials(&sb, "netrc", &f.user, &f.password, 0o600);
    let run = |tool: &str, args: &[&str]| bk_tests::run_cmd(f.cmd(&sb, &netrc, tool, args), "");
    let source = sb.store();
    let kept = write_backup(&source, "db", "20261120T010000Z");
    let store = f.store("bk-leftovers");
    run("bk-ship", &["--from", &source, "--all", "--to", &store]).ok();
    // What a killed bk-ship leaves on the server: hidden temporary files, one of them old.
    let dir = f.dir_of(&store).join("db");
    let old = dir.join(".db.20261121T010000Z.tar.tmp.4242.0badf00d");
    let young = dir.join(".db.20261122T010000Z.tar.tmp.4243.cafe0001");
    std::fs::write(&old, "a killed run's partial file").unwrap();
    std::fs::write(&young, "a partial file").unwrap();
    let two_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
    filetime::set_file_mtime(&old, filetime::FileTime::from_system_time(two_days_ago)).unwrap();
    let location = |p: &Path| format!("{store}/db/{}", p.file_name().unwrap().to_str().unwrap());

    let listed = run("bk-ls", &[&store]).ok();
    assert_eq!(listed.artifacts().len(), 1);
    for p in [&old, &young] {
        assert!(
            listed
                .stderr
                .contains(&format!("{}: temporary file of an unfinished run", location(p))),
            "{}",
            listed.stderr
        );
    }
    let dry = run("bk-prune", &[&store, "--keep-last", "5", "--dry-run"]).ok();
    assert!(
        dry.stderr.contains(&format!("would remove {}", location(&old))),
        "{}",
        dry.stderr
    );
    assert!(old.exists());

    let pruned = run("bk-prune", &[&store, "--keep-last", "5"]).ok();
    assert!(
        pruned.stderr.contains(&format!("removed {}", location(&old))),
        "{}",
        pruned.stderr
    );
    assert!(
        !pruned.stderr.contains(&format!("removed {}", location(&young))),
        "{}",
        pruned.stderr
    );
    assert!(!old.exists() && young.exists());
    assert_eq!(run("bk-ls", &[&store]).ok().artifacts()[0].id, kept.id);
}

#[test]
fn vsftpd_without_mlsd_and_requiring_tls_session_reuse_works_anonymously() {
    let Some(f) = ftp() else { return };
    let sb = Sandbox::new();
    // No user and no netrc: bk logs in as anonymous.
    let run = |tool: &str, args: &[&str], stdin: &str| {
        let mut cmd = sb.cmd(tool, args);
        cmd.env("HOME", sb.root())
            .env("SSL_CERT_FILE", &f.ca)
            .env_remove("NETRC")
            .env_remove("BK_FTP_CREDENTIALS");
        bk_tests::run_cmd(cmd, stdin)
    };
    let dir = unique_name("bk-vsftpd");
    let store = format!("ftps://{}:{}/pub/{dir}", f.host, f.vsftpd_port);
    let (line, expected) = dump(&sb);
    let shipped = run("bk-ship", &["--to", &store], &line).ok();
    assert_eq!(shipped.artifacts().len(), 2, "{}", shipped.stderr);
    let source = sb.store();
    let old = write_backup(&source, "db", "20261120T010000Z");
    let new = write_backup(&source, "db", "20261121T010000Z");
    // Several uploads in one run, each on a connection with several TLS data connections.
    let pulled = run("bk-ship", &["--from", &source, "--name", "db", "--to", &store], "").ok();
    assert_eq!(pulled.artifacts().len(), 2, "{}", pulled.stderr);

    let listed = run("bk-ls", &[&store], "").ok();
    assert_eq!(listed.artifacts().len(), 3);
    assert_eq!(listed.stderr, "");
    run("bk-verify", &["--from", &store, "--name", "web"], "").ok();
    run(
        "bk-restore",
        &["--from", &store, "--name", "web", "--latest", "--to", "r"],
        "",
    )
    .ok();
    assert_eq!(restored(&sb, "r"), expected);

    // A killed run's temporary file: vsftpd's bare LIST hides it; bk still finds and removes it.
    let db_dir = f.vsftpd_root.join("pub").join(&dir).join("db");
    let temp = db_dir.join(".db.20261122T010000Z.tar.tmp.4242.0badf00d");
    std::fs::write(&temp, "partial").unwrap();
    let two_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
    filetime::set_file_mtime(&temp, filetime::FileTime::from_system_time(two_days_ago)).unwrap();
    let pruned = run("bk-prune", &[&store, "--name", "db", "--keep-last", "1"], "").ok();
    assert!(
        pruned.stderr.contains("removed") && pruned.stderr.contains(".tmp.4242."),
        "{}",
        pruned.stderr
    );
    assert!(!temp.exists());
    let names: Vec<String> = run("bk-ls", &[&store, "--name", "db"], "")
        .ok()
        .artifacts()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(names, [new.id.as_str()]);
    assert!(!db_dir.join(&old.file).exists() && !db_dir.join(format!("{}.json", old.id)).exists());
}
