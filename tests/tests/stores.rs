//! The remote stores (ssh, S3, rclone, FTP) against hostile input and unlucky failures:
//! secrets in URLs, a remote child dying mid-upload, truncated or missing artifacts, symlinks
//! and FIFOs in a remote store, and planted manifests that point out of it. The ssh tests use
//! the test sshd of tests/services.sh; the S3 ones a private s3s-fs whose objects are files
//! the test can change behind the server's back.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bk_core::record::{Artifact, Record};
use bk_tests::{spawn_with_stdin, tree_digest, unique_name, write_backup, PrivateS3, Remote, Run, Sandbox};

/// A password and an access key id that no output may repeat.
const PASSWORD: &str = "hunter2pw";
const KEY_ID: &str = "AKIAHOSTILE";

/// A stand-in for ssh and rclone that logs its arguments to `argv.log` and fails: any line
/// in the log is a child that was started.
fn logging_program(sb: &Sandbox) -> String {
    let path = sb.path("logging-program");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\nexit 255\n",
            sb.path("argv.log").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path.display().to_string()
}

/// A files backup of `web` in the sandbox's store: bk-dump's run.
fn dump(sb: &Sandbox) -> Run {
    std::fs::create_dir_all(sb.path("data")).unwrap();
    std::fs::write(sb.path("data/a.txt"), "alpha\n").unwrap();
    let data = sb.path("data").display().to_string();
    sb.run("bk-dump", &["files", &data, "--name", "web", "--to", &sb.store()])
        .ok()
}

/// Store URLs and S3 endpoints with a password (or, for S3, any credentials) are refused
/// with 64 before any child is started, and neither the password nor the key id shows on
/// stdout or stderr, whether the URL comes from the command line, the environment or a
/// record's location.
#[test]
fn secrets_in_store_urls_are_refused_never_shown_and_never_passed_to_a_child() {
    let sb = Sandbox::new();
    let dumped = dump(&sb);
    let program = logging_program(&sb);
    let ssh = format!("ssh://bk:{PASSWORD}@127.0.0.1:2222/srv/bk");
    let rclone = format!("rclone::sftp,host=127.0.0.1,user=bk,pass={PASSWORD}:/srv/bk");
    let rclone_url = format!(":http,url=http://bk:{PASSWORD}@127.0.0.1:1");
    let rclone_url = format!("rclone:{rclone_url}:bk");
    let ftp = format!("ftp://bk:{PASSWORD}@127.0.0.1:1/bk");
    let s3_userinfo = format!("s3://{KEY_ID}:{PASSWORD}@test-bucket/bk");
    let endpoint = format!("http://{KEY_ID}:{PASSWORD}@127.0.0.1:1");
    let key_only_endpoint = format!("http://{KEY_ID}@127.0.0.1:1");
    // A record whose location holds the password: bk-verify opens its store.
    let mut a = dumped.artifact();
    a.location = format!("{ssh}/web/{}", a.file);
    let record_line = format!("{}\n", Record::Artifact(a).to_line());
    let dumped = dumped.stdout;

    // (what, tool, arguments, environment, stdin)
    type Case<'a> = (&'a str, &'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("bk-ls of an ssh URL", "bk-ls", vec![&ssh], vec![], ""),
        ("bk-ship to an ssh URL", "bk-ship", vec!["--to", &ssh], vec![], &dumped),
        (
            "bk-dump to an ssh URL",
            "bk-dump",
            vec!["files", "data", "--name", "web", "--to", &ssh],
            vec![],
            "",
        ),
        (
            "bk-verify of a record in an ssh store",
            "bk-verify",
            vec![],
            vec![],
            &record_line,
        ),
        (
            "an rclone connection string's pass=",
            "bk-ls",
            vec![&rclone],
            vec![],
            "",
        ),
        (
            "a URL in an rclone connection string",
            "bk-ls",
            vec![&rclone_url],
            vec![],
            "",
        ),
        ("an ftp URL", "bk-ls", vec![&ftp], vec![], ""),
        ("an s3 URL", "bk-ls", vec![&s3_userinfo], vec![], ""),
        (
            "--s3-endpoint",
            "bk-ls",
            vec!["s3://test-bucket/bk", "--s3-endpoint", &endpoint],
            vec![],
            "",
        ),
        (
            "BK_S3_ENDPOINT",
            "bk-ls",
            vec!["s3://test-bucket/bk"],
            vec![("BK_S3_ENDPOINT", &endpoint)],
            "",
        ),
        (
            "AWS_ENDPOINT_URL",
            "bk-ls",
            vec!["s3://test-bucket/bk"],
            vec![("AWS_ENDPOINT_URL", &endpoint)],
            "",
        ),
        (
            "AWS_ENDPOINT_URL_S3",
            "bk-ls",
            vec!["s3://test-bucket/bk"],
            vec![("AWS_ENDPOINT_URL_S3", &endpoint)],
            "",
        ),
        (
            "a key id alone in the endpoint",
            "bk-ship",
            vec!["--to", "s3://test-bucket/bk", "--s3-endpoint", &key_only_endpoint],
            vec![],
            &dumped,
        ),
    ];
    for (what, tool, args, env, stdin) in cases {
        let mut cmd = sb.cmd(tool, &args);
        cmd.env("BK_SSH_COMMAND", &program)
            .env("BK_RCLONE", &program)
            .env_remove("BK_S3_ENDPOINT")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT_URL_S3")
            .envs(env);
        let run = bk_tests::run_cmd(cmd, stdin).code(64);
        for (stream, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
            assert!(
                !text.contains(PASSWORD) && !text.contains(KEY_ID),
                "{what}: the secret is on {stream}: {text}"
            );
        }
        let e = run.error();
        assert!(
            e.code == 64 && e.message.contains("would show in ps, logs and records"),
            "{what}: {}",
            e.message
        );
        assert!(
            !sb.path("argv.log").exists(),
            "{what}: a child was started: {}",
            std::fs::read_to_string(sb.path("argv.log")).unwrap()
        );
    }
}

/// Runs a command with `stdin`, failing the test if it has not ended within a minute (a tool
/// that opened a FIFO would never end).
fn run_within_a_minute(cmd: Command, stdin: &str) -> Run {
    let what = format!("{cmd:?}");
    let mut child = spawn_with_stdin(cmd, stdin);
    let until = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end within a minute");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Run::from(child.wait_with_output().unwrap())
}

/// The artifacts of a run's records.
fn artifacts(run: &Run) -> Vec<Artifact> {
    run.artifacts()
}

/// The ids of a run's artifact records.
fn ids(run: &Run) -> Vec<String> {
    artifacts(run).into_iter().map(|a| a.id).collect()
}

/// The error records of a run: (code, message).
fn errors(run: &Run) -> Vec<(u8, String)> {
    run.records()
        .into_iter()
        .filter_map(|r| match r {
            Record::Error(e) => Some((e.code, e.message)),
            _ => None,
        })
        .collect()
}

/// What is around a store: the digest of every file and directory below `dir` but those of
/// the store `dir/store`.
fn digest_around_store(dir: &Path) -> BTreeMap<String, String> {
    let mut digest = tree_digest(dir);
    digest.retain(|path, _| path != "store" && !path.starts_with("store/"));
    digest
}

/// A directory on the test sshd, `/tmp/<prefix><unique>`, removed however the test ends.
struct RemoteDir<'a> {
    remote: &'a Remote,
    path: String,
}

impl<'a> RemoteDir<'a> {
    fn new(remote: &'a Remote, prefix: &str) -> Self {
        RemoteDir {
            remote,
            path: format!("/tmp/{}", unique_name(prefix)),
        }
    }
}

impl Drop for RemoteDir<'_> {
    fn drop(&mut self) {
        self.remote.shell(&format!("rm -rf {}", self.path), b"");
    }
}

/// The ids bk-prune kept.
fn kept(run: &Run) -> Vec<String> {
    run.decisions().0.into_iter().map(|k| k.id).collect()
}

/// Backups of `db` made at `stamps`, in a local store of the sandbox: that store's path.
fn local_backups(sb: &Sandbox, stamps: &[&str]) -> String {
    let local = sb.path("local").display().to_string();
    for stamp in stamps {
        write_backup(&local, "db", stamp);
    }
    local
}

/// An ssh upload whose remote `cat` dies in the middle (the remote host allows files of
/// 1 MiB at most: cat is killed by SIGXFSZ) fails with 74 and an error record, whatever the
/// compression: gzip's last flush when its encoder is dropped used to panic. No temporary
/// file and no manifest are left.
#[test]
fn a_remote_child_dying_mid_upload_is_a_clean_error_not_a_panic() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    std::fs::create_dir_all(sb.path("big")).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let random: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(sb.path("big/random.bin"), random).unwrap();
    // ssh as bk-stores runs it, with a file size limit put before the remote command.
    let wrapper = sb.path("ssh-with-ulimit");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/bash\nexec {} \"${{@:1:$#-1}}\" \"ulimit -f 1024; ${{@: -1}}\"\n",
            r.ssh_command()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let remote_dir = RemoteDir::new(&r, "bk-dies-");
    let dir = remote_dir.path.clone();
    let big = sb.path("big").display().to_string();
    for compress in ["gzip", "zstd", "none"] {
        let store = r.ssh_url(&format!("{dir}/{compress}"));
        let mut cmd = r.cmd(
            &sb,
            "bk-dump",
            &["files", &big, "--name", "big", "--compress", compress, "--to", &store],
        );
        cmd.env("BK_SSH_COMMAND", &wrapper);
        let run = run_within_a_minute(cmd, "").code(74);
        assert!(!run.stderr.contains("panicked"), "{compress}: {}", run.stderr);
        let e = run.error();
        assert_eq!(
            (e.code, e.name.as_deref()),
            (74, Some("big")),
            "{compress}: {}",
            e.message
        );
        assert!(e.message.contains(&format!("writing {store}/big/")), "{}", e.message);
        let left = r.shell(&format!("find {dir}/{compress} -type f"), b"");
        assert_eq!(left, "", "{compress}: files left in the store");
    }
}

/// An ssh store's listing sees each file's size and type: a truncated artifact, one replaced
/// by a symlink (to a copy of itself outside the store) or by a FIFO, make broken backups;
/// a FIFO named like a manifest and a name directory that is a symlink out of the store are
/// never opened nor followed. bk-prune then keeps the one good backup, and nothing outside
/// the store changes.
#[test]
fn ssh_listings_see_sizes_and_never_follow_symlinks_or_open_fifos() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    let stamps = [
        "20250101T000000Z",
        "20250102T000000Z",
        "20250103T000000Z",
        "20250104T000000Z",
    ];
    let local = local_backups(&sb, &stamps);
    let remote_dir = RemoteDir::new(&r, "bk-sizes-");
    let dir = remote_dir.path.clone();
    let store = r.ssh_url(&format!("{dir}/store"));
    let run = |tool: &str, args: &[&str], stdin: &str| run_within_a_minute(r.cmd(&sb, tool, args), stdin);
    let shipped = run("bk-ship", &["--from", &local, "--all", "--to", &store], "").ok();
    let copies = artifacts(&shipped);
    assert_eq!(copies.len(), 4, "{}", shipped.stdout);
    // Backups of `evil`, outside the store, reached by a symlinked name directory.
    let evil = sb.path("evil").display().to_string();
    for stamp in &stamps[..2] {
        write_backup(&evil, "evil", stamp);
    }
    let outside = r.ssh_url(&format!("{dir}/outside"));
    run("bk-ship", &["--from", &evil, "--all", "--to", &outside], "").ok();
    let db = format!("{dir}/store/db");
    r.shell(
        &format!(
            "set -e; cd {db}
truncate -s 3 db.20250104T000000Z.tar
mkdir {dir}/victim; mv db.20250103T000000Z.tar {dir}/victim/precious.txt
ln -s {dir}/victim/precious.txt db.20250103T000000Z.tar
rm db.20250102T000000Z.tar; mkfifo db.20250102T000000Z.tar
mkfifo db.20250105T000000Z.json
ln -s {dir}/outside/evil {dir}/store/evil"
        ),
        b"",
    );
    let before = digest_around_store(Path::new(&dir));

    let listed = run("bk-ls", &[&store], "").code(65);
    assert_eq!(ids(&listed), ["db.20250101T000000Z"], "{}", listed.stdout);
    let errors = errors(&listed);
    let expected = [
        (
            "db.20250102T000000Z",
            "its artifact file db.20250102T000000Z.tar is missing",
        ),
        (
            "db.20250103T000000Z",
            "its artifact file db.20250103T000000Z.tar is missing",
        ),
        (
            "db.20250104T000000Z",
            "db.20250104T000000Z.tar is 3 bytes, the manifest says",
        ),
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:?}");
    for ((code, message), (id, why)) in errors.iter().zip(expected) {
        assert!(
            *code == 65 && message.starts_with(&format!("{id}: broken backup: ")) && message.contains(why),
            "{message}"
        );
    }
    // A record pointing at the FIFO or the symlink: refused, not opened (65).
    for (id, why) in [
        ("db.20250102T000000Z", "is not a regular file"),
        ("db.20250103T000000Z", "is a symlink: not followed"),
    ] {
        let copy = copies.iter().find(|a| a.id == id).unwrap();
        let line = format!("{}\n", Record::Artifact(copy.clone()).to_line());
        let verified = run("bk-verify", &[], &line).code(65);
        assert!(verified.error().message.contains(why), "{}", verified.error().message);
    }
    // The symlinked name directory holds no backup of the store, and is not cleaned up.
    run("bk-ls", &[&store, "--name", "evil"], "").code(66);
    let pruned = run("bk-prune", &[&store, "--keep-last", "1"], "");
    assert_eq!(kept(&pruned), ["db.20250101T000000Z"], "{}", pruned.stdout);
    assert_eq!(
        ids(&run("bk-ls", &[&outside], "").ok()),
        ["evil.20250101T000000Z", "evil.20250102T000000Z"]
    );
    assert_eq!(
        digest_around_store(Path::new(&dir)),
        before,
        "something outside the store changed"
    );
}

/// Manifests planted in a remote store whose `file`, `name` or `id` leave it, each older than
/// the one good backup (so that a retention trusting them would delete their files): as
/// `(id, field, manifest)`, from the good backup's manifest `good`. `victim` is the absolute
/// path of a file outside the store, `../victim/precious.txt` from the name's directory.
fn hostile_manifests(good: &Artifact, victim: &str) -> Vec<(String, &'static str, String)> {
    let with = |stamp: &str, field: &str, value: &str| {
        let id = format!("db.{stamp}");
        let mut m: serde_json::Value = serde_json::from_str(&Record::Artifact(good.clone()).to_line()).unwrap();
        m["id"] = id.clone().into();
        m["file"] = format!("{id}.tar").into();
        m[field] = value.into();
        (id, serde_json::to_string(&m).unwrap())
    };
    [
        ("20240101T000000Z", "file", "../victim/precious.txt".to_string()),
        ("20240102T000000Z", "file", victim.to_string()),
        ("20240103T000000Z", "name", "../victim".to_string()),
        ("20240104T000000Z", "id", "db.20240104T000000Z/../../victim".to_string()),
    ]
    .into_iter()
    .map(|(stamp, field, value)| {
        let (id, manifest) = with(stamp, field, &value);
        (id, field, manifest)
    })
    .collect()
}

/// bk-ls reports each planted manifest as a broken backup naming the offending field (65),
/// beside the good backup; bk-prune keeps the good one; nothing outside the store changes.
fn hostile_manifests_are_broken(
    run: &dyn Fn(&str, &[&str]) -> Run,
    store: &str,
    hostile: &[(String, &'static str, String)],
    around: &dyn Fn() -> BTreeMap<String, String>,
) {
    let before = around();
    assert!(before.keys().any(|k| k.ends_with("victim/precious.txt")), "{before:?}");
    let listed = run("bk-ls", &[store]).code(65);
    assert_eq!(ids(&listed), ["db.20250101T000000Z"], "{}", listed.stdout);
    let errors = errors(&listed);
    assert_eq!(errors.len(), hostile.len(), "{errors:?}");
    for ((code, message), (id, field, _)) in errors.iter().zip(hostile) {
        assert!(
            *code == 65
                && message.starts_with(&format!("{id}: broken backup: "))
                && message.contains(&format!("field \"{field}\"")),
            "{message}"
        );
    }
    let pruned = run("bk-prune", &[store, "--keep-last", "1"]);
    assert_eq!(kept(&pruned), ["db.20250101T000000Z"], "{}", pruned.stdout);
    assert_eq!(
        ids(&run("bk-ls", &[store, "--name", "db"]).code(65)),
        ["db.20250101T000000Z"]
    );
    assert_eq!(around(), before, "something outside the store changed");
}

#[test]
fn hostile_manifests_in_an_ssh_store_are_broken_and_nothing_outside_is_touched() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    let local = local_backups(&sb, &["20250101T000000Z"]);
    let remote_dir = RemoteDir::new(&r, "bk-hostile-");
    let dir = remote_dir.path.clone();
    let store = r.ssh_url(&format!("{dir}/store"));
    let run = |tool: &str, args: &[&str]| run_within_a_minute(r.cmd(&sb, tool, args), "");
    let good = artifacts(&run("bk-ship", &["--from", &local, "--all", "--to", &store]).ok()).remove(0);
    let victim = format!("{dir}/store/victim/precious.txt");
    r.shell(&format!("mkdir -p {dir}/store/victim && echo precious > {victim}"), b"");
    let hostile = hostile_manifests(&good, &victim);
    for (id, _, manifest) in &hostile {
        r.shell(&format!("cat > {dir}/store/db/{id}.json"), manifest.as_bytes());
    }
    // The victim is inside the store's root but outside every name's directory: what the
    // store may touch is `<root>/db/` alone here.
    let around = || {
        let mut digest = tree_digest(Path::new(&dir));
        digest.retain(|path, _| !path.starts_with("store/db"));
        digest
    };
    hostile_manifests_are_broken(&run, &store, &hostile, &around);
}

#[test]
fn hostile_manifests_in_an_s3_store_are_broken_and_nothing_outside_is_touched() {
    if Remote::from_env().is_none() {
        return;
    }
    let sb = Sandbox::new();
    let s3 = PrivateS3::start(&sb);
    let local = local_backups(&sb, &["20250101T000000Z"]);
    let store = "s3://test-bucket/store";
    let run = |tool: &str, args: &[&str]| {
        let mut cmd = sb.cmd(tool, args);
        cmd.env("BK_S3_ENDPOINT", s3.endpoint());
        run_within_a_minute(cmd, "")
    };
    let good = artifacts(&run("bk-ship", &["--from", &local, "--all", "--to", store]).ok()).remove(0);
    let bucket = s3.bucket_dir();
    std::fs::create_dir_all(bucket.join("store/victim")).unwrap();
    std::fs::write(bucket.join("store/victim/precious.txt"), "precious\n").unwrap();
    let hostile = hostile_manifests(&good, &bucket.join("store/victim/precious.txt").display().to_string());
    for (id, _, manifest) in &hostile {
        std::fs::write(bucket.join(format!("store/db/{id}.json")), manifest).unwrap();
    }
    let around = || {
        let mut digest = tree_digest(&bucket);
        digest.retain(|path, _| !path.starts_with("store/db"));
        digest
    };
    hostile_manifests_are_broken(&run, store, &hostile, &around);
}

/// An S3 store's listing sees object sizes: a truncated newest artifact is a broken backup,
/// and bk-prune --keep-last 1 keeps the older good backup instead of deleting it.
#[test]
fn s3_listings_see_truncated_artifacts_and_retention_keeps_the_good_backup() {
    if Remote::from_env().is_none() {
        return;
    }
    let sb = Sandbox::new();
    let s3 = PrivateS3::start(&sb);
    let local = local_backups(&sb, &["20250101T000000Z", "20250102T000000Z"]);
    let store = "s3://test-bucket/store";
    let run = |tool: &str, args: &[&str]| {
        let mut cmd = sb.cmd(tool, args);
        cmd.env("BK_S3_ENDPOINT", s3.endpoint());
        run_within_a_minute(cmd, "")
    };
    run("bk-ship", &["--from", &local, "--all", "--to", store]).ok();
    let newest = s3.bucket_dir().join("store/db/db.20250102T000000Z.tar");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(3)
        .unwrap();
    let listed = run("bk-ls", &[store]).code(65);
    assert_eq!(ids(&listed), ["db.20250101T000000Z"], "{}", listed.stdout);
    let e = listed.error();
    assert!(
        e.message.starts_with("db.20250102T000000Z: broken backup: ")
            && e.message
                .contains("db.20250102T000000Z.tar is 3 bytes, the manifest says"),
        "{}",
        e.message
    );
    let pruned = run("bk-prune", &[store, "--keep-last", "1"]);
    assert_eq!(kept(&pruned), ["db.20250101T000000Z"], "{}", pruned.stdout);
    assert_eq!(
        ids(&run("bk-ls", &[store, "--name", "db"]).code(65)),
        ["db.20250101T000000Z"]
    );
}

/// rclone (its sftp backend, on the test sshd) and FTP (the test pyftpdlib) listings see sizes
/// too: a truncated newest artifact is a broken backup (65), and bk-prune --keep-last 1 keeps
/// the older good backup.
#[test]
fn rclone_and_ftp_listings_see_truncated_artifacts() {
    let Some(r) = Remote::from_env() else { return };
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set: source $(tests/services.sh env)"));
    let sb = Sandbox::new();
    let local = local_backups(&sb, &["20250101T000000Z", "20250102T000000Z"]);
    let rclone_config = sb.path("rclone.conf");
    std::fs::write(
        &rclone_config,
        format!(
            "[bktest]\ntype = sftp\nhost = 127.0.0.1\nport = {}\nuser = {}\nkey_file = {}\nknown_hosts_file =\n",
            r.ssh_port, r.ssh_user, r.ssh_key
        ),
    )
    .unwrap();
    let ftp_credentials = sb.path("netrc");
    std::fs::write(
        &ftp_credentials,
        format!(
            "machine {} login {} password {}\n",
            var("TEST_FTP_HOST"),
            var("TEST_FTP_USER"),
            var("TEST_FTP_PASSWORD")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&ftp_credentials, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let rclone_dir = RemoteDir::new(&r, "bk-rclone-sizes-");
    let ftp_dir = unique_name("bk-ftp-sizes-");
    let ftp_files = Path::new(&var("TEST_FTP_HOME")).join(&ftp_dir);
    let newest = "db/db.20250102T000000Z.tar";
    let stores = [
        (
            format!("rclone:bktest:{}", rclone_dir.path),
            Path::new(&rclone_dir.path).join(newest),
        ),
        (
            format!(
                "ftp://{}@{}:{}/{ftp_dir}",
                var("TEST_FTP_USER"),
                var("TEST_FTP_HOST"),
                var("TEST_FTP_PORT")
            ),
            ftp_files.join(newest),
        ),
    ];
    for (store, newest) in &stores {
        let run = |tool: &str, args: &[&str]| {
            let mut cmd = r.cmd(&sb, tool, args);
            cmd.env("RCLONE_CONFIG", &rclone_config)
                .env("BK_FTP_CREDENTIALS", &ftp_credentials);
            run_within_a_minute(cmd, "")
        };
        run("bk-ship", &["--from", &local, "--all", "--to", store]).ok();
        // The servers keep the files on this machine.
        std::fs::OpenOptions::new()
            .write(true)
            .open(newest)
            .unwrap()
            .set_len(3)
            .unwrap();
        let listed = run("bk-ls", &[store]).code(65);
        assert_eq!(ids(&listed), ["db.20250101T000000Z"], "{store}: {}", listed.stdout);
        let e = listed.error();
        assert!(
            e.message.starts_with("db.20250102T000000Z: broken backup: ")
                && e.message
                    .contains("db.20250102T000000Z.tar is 3 bytes, the manifest says"),
            "{store}: {}",
            e.message
        );
        let pruned = run("bk-prune", &[store, "--keep-last", "1"]);
        assert_eq!(kept(&pruned), ["db.20250101T000000Z"], "{store}: {}", pruned.stdout);
    }
    let _ = std::fs::remove_dir_all(ftp_files);
}
