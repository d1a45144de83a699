//! bk-ship and the remote stores against the real test servers (tests/services.sh): s3s-fs
//! on TEST_S3_ENDPOINT and sshd on 127.0.0.1:TEST_SSH_PORT. With BK_TEST_SERVICES=1 a
//! missing server is a failure, not a skip.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bk_core::record::Record;
use bk_tests::{
    artifact_line, needs, noise, spawn_with_stdin, unique_name, write_backup, PrivateS3, Remote, Run, Sandbox,
};

/// The restored data, without the parent directories a restore creates.
fn restored_data(root: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    let mut t = bk_tests::tree_digest(root);
    t.retain(|k, _| k.contains("/data"));
    t
}

fn artifacts(run: &Run) -> Vec<bk_core::record::Artifact> {
    run.records()
        .into_iter()
        .filter_map(|r| match r {
            Record::Artifact(a) => Some(a),
            _ => None,
        })
        .collect()
}

/// A files backup in the sandbox's store; its bk-dump output.
fn dump(sb: &Sandbox) -> String {
    std::fs::create_dir_all(sb.path("data/sub")).unwrap();
    std::fs::write(sb.path("data/a.txt"), "alpha\n").unwrap();
    std::fs::write(sb.path("data/sub/b.bin"), vec![7u8; 300_000]).unwrap();
    let data = sb.path("data").display().to_string();
    sb.run("bk-dump", &["files", &data, "--name", "web", "--to", &sb.store()])
        .ok()
        .stdout
}

#[test]
fn push_to_s3_and_ssh_then_every_tool_works_on_both() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    let dumped = dump(&sb);
    let (s3, ssh) = (r.s3_store("push"), r.ssh_store("push"));
    let shipped = r.run(&sb, "bk-ship", &["--to", &s3, "--to", &ssh], &dumped).ok();
    let records = artifacts(&shipped);
    assert_eq!(records.len(), 3, "{}", shipped.stdout);
    assert_eq!(shipped.lines()[0], dumped_line(&dumped), "input passed on unchanged");
    let original = &records[0];
    assert!(
        records[1].location.starts_with(&format!("{s3}/web/")),
        "{}",
        records[1].location
    );
    assert!(
        records[2].location.starts_with(&format!("{ssh}/web/")),
        "{}",
        records[2].location
    );
    for copy in &records[1..] {
        assert_eq!((&copy.id, &copy.sha256), (&original.id, &original.sha256));
    }

    // Shipping again copies nothing: the copies are there with the same sha256.
    let again = r.run(&sb, "bk-ship", &["--to", &s3, "--to", &ssh], &dumped).ok();
    assert_eq!(artifacts(&again).len(), 1, "{}", again.stdout);

    let local = sb.run(
        "bk-restore",
        &["--from", &sb.store(), "--name", "web", "--latest", "--to", "r-local"],
    );
    let expected = restored_data(&sb.path("r-local"));
    assert!(local.code == 0 && !expected.is_empty());
    for (i, store) in [&s3, &ssh].into_iter().enumerate() {
        let listed = r.run(&sb, "bk-ls", &[store], "").ok();
        let listed = artifacts(&listed);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].location, records[i + 1].location);
        let verified = r
            .run(&sb, "bk-verify", &["--from", store, "--name", "web", "--latest"], "")
            .ok();
        assert!(verified.stdout.contains(r#""ok":true"#), "{}", verified.stdout);
        let target = format!("r{i}");
        r.run(
            &sb,
            "bk-restore",
            &["--from", store, "--name", "web", "--latest", "--to", &target],
            "",
        )
        .ok();
        assert_eq!(restored_data(&sb.path(&target)), expected, "restored from {store}");
        // A record whose location is remote: bk-restore and bk-verify open its store.
        let line = Record::Artifact(records[i + 1].clone()).to_line();
        let target = format!("s{i}");
        r.run(&sb, "bk-restore", &["--to", &target], &line).ok();
        assert_eq!(restored_data(&sb.path(&target)), expected);
        r.run(&sb, "bk-verify", &[], &line).ok();
    }
    // bk-prune works there too; an empty policy deletes nothing.
    for store in [&s3, &ssh] {
        let pruned = r.run(&sb, "bk-prune", &[store, "--keep-last", "1"], "").ok();
        assert!(pruned.stdout.contains(r#""type":"kept""#), "{}", pruned.stdout);
    }
}

#[test]
fn an_upstream_error_is_passed_on_and_its_name_not_shipped() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    let dumped = dump(&sb);
    let error = r#"{"bk":1,"type":"error","tool":"bk-dump","name":"web","code":69,"message":"down"}"#;
    let s3 = r.s3_store("upstream");
    let run = r
        .run(&sb, "bk-ship", &["--to", &s3], &format!("{dumped}{error}\n"))
        .code(1);
    assert_eq!(run.lines().len(), 2, "{}", run.stdout);
    r.run(&sb, "bk-ls", &[&s3, "--name", "web"], "").code(66);
}

#[test]
fn pull_mode_is_idempotent_and_refuses_a_differing_copy() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    let source = sb.store();
    write_backup(&source, "db", "20261120T010000Z");
    write_backup(&source, "db", "20261121T010000Z");
    write_backup(&source, "other", "20261121T010000Z");
    let (s3, ssh, local) = (
        r.s3_store("pull"),
        r.ssh_store("pull"),
        sb.path("mirror").display().to_string(),
    );

    let latest = r
        .run(
            &sb,
            "bk-ship",
            &["--from", &source, "--name", "db", "--latest", "--to", &s3],
            "",
        )
        .ok();
    assert_eq!(artifacts(&latest).len(), 1);
    assert!(artifacts(&latest)[0].id.ends_with("20261121T010000Z"));
    let all = ["--from", &source, "--all", "--to", &s3, "--to", &ssh, "--to", &local];
    let first = r.run(&sb, "bk-ship", &all, "").ok();
    assert_eq!(artifacts(&first).len(), 3 + 3 + 2, "{}", first.stdout);
    let second = r.run(&sb, "bk-ship", &all, "").ok();
    assert!(
        second.lines().is_empty(),
        "a second run copies nothing: {}",
        second.stdout
    );
    let since = r
        .run(
            &sb,
            "bk-ship",
            &[
                "--from",
                &s3,
                "--since",
                "2026-11-21",
                "--to",
                &sb.path("recent").display().to_string(),
            ],
            "",
        )
        .ok();
    assert_eq!(artifacts(&since).len(), 2);

    // A destination copy whose manifest says another sha256: an error, never kept silently.
    let manifest = sb.path("mirror/db/db.20261120T010000Z.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let a = write_backup(&sb.path("elsewhere").display().to_string(), "db", "20261120T010000Z");
    std::fs::write(&manifest, text.replace(&a.sha256, &"0".repeat(64))).unwrap();
    let mismatch = r.run(&sb, "bk-ship", &all, "").code(65);
    assert_eq!(mismatch.error().code, 65);
    assert!(
        mismatch.error().message.contains("differs"),
        "{}",
        mismatch.error().message
    );

    // A source file that no longer matches its manifest is not shipped.
    std::fs::write(sb.path("store/other/other.20261121T010000Z.tar"), "tampered\n").unwrap();
    let fresh = r.ssh_store("corrupt");
    r.run(
        &sb,
        "bk-ship",
        &["--from", &source, "--name", "other", "--to", &fresh],
        "",
    )
    .code(65);
    let listed = r.run(&sb, "bk-ls", &[&fresh], "");
    assert!(listed.code == 0 || listed.code == 66, "{}", listed.stderr);
    assert!(artifacts(&listed).is_empty(), "{}", listed.stdout);

    // --delete-source: the source goes once the copy is checked.
    let moved = r.ssh_store("moved");
    let run = r
        .run(
            &sb,
            "bk-ship",
            &["--from", &s3, "--name", "db", "--to", &moved, "--delete-source"],
            "",
        )
        .ok();
    assert_eq!(artifacts(&run).len(), 2);
    r.run(&sb, "bk-ls", &[&s3, "--name", "db"], "").code(66);
    assert_eq!(artifacts(&r.run(&sb, "bk-ls", &[&moved], "").ok()).len(), 2);
}

#[test]
fn unreachable_stores_and_refused_hosts_have_clear_exit_codes() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    let dumped = dump(&sb);
    let s3 = r.s3_store("down");
    let mut cmd = r.cmd(
        &sb,
        "bk-ship",
        &["--to", &s3, "--retries", "0", "--s3-endpoint", "http://127.0.0.1:1"],
    );
    cmd.env("BK_S3_RETRIES", "0");
    let down = bk_tests::run_cmd(cmd, &dumped).code(69);
    assert!(
        down.lines().first() == Some(&dumped_line(&dumped)),
        "the input is passed on: {}",
        down.stdout
    );

    let refused = format!("ssh://{}@127.0.0.1:1/tmp/x", r.ssh_user);
    let run = r
        .run(&sb, "bk-ship", &["--to", &refused, "--retries", "0"], &dumped)
        .code(69);
    assert!(run.error().message.contains("cannot reach"), "{}", run.error().message);
    r.run(&sb, "bk-ls", &[&refused], "").code(69);

    // A host key that is not the server's: 78, saying so.
    let known = sb.path("known_hosts");
    std::fs::write(
        &known,
        format!(
            "[127.0.0.1]:{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n",
            r.ssh_port
        ),
    )
    .unwrap();
    let mut cmd = r.cmd(&sb, "bk-ls", &[&r.ssh_store("hostkey")]);
    cmd.env("BK_SSH_COMMAND", r.ssh_command_checking(&known));
    let run = bk_tests::run_cmd(cmd, "").code(78);
    assert!(run.error().message.contains("host key"), "{}", run.error().message);

    // A key the server does not accept: 77, in one line.
    let key = sb.path("stranger_key");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "stranger", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    let mut cmd = r.cmd(&sb, "bk-ls", &[&r.ssh_store("auth")]);
    cmd.env_remove("SSH_AUTH_SOCK").env(
        "BK_SSH_COMMAND",
        r.ssh_command().replacen(&r.ssh_key, &key.display().to_string(), 1) + " -o IdentitiesOnly=yes",
    );
    let run = bk_tests::run_cmd(cmd, "").code(77);
    assert!(
        run.error().message.contains("authentication") && !run.error().message.contains('\n'),
        "{}",
        run.error().message
    );
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);

    // A remote path the user may not write: 73.
    let forbidden = r.ssh_url("/root/bk-forbidden");
    r.run(&sb, "bk-ship", &["--to", &forbidden, "--retries", "0"], &dumped)
        .code(73);
}

/// An rclone config in the sandbox with `bktest`, an sftp remote on the test sshd, and
/// `bkdown`, the same on a port nobody listens on; its path, for RCLONE_CONFIG.
fn rclone_config(r: &Remote, sb: &Sandbox) -> String {
    let path = sb.path("rclone.conf");
    let remote = |name: &str, port: &str| {
        format!(
            "[{name}]\ntype = sftp\nhost = 127.0.0.1\nport = {port}\nuser = {}\nkey_file = {}\nknown_hosts_file =\n\n",
            r.ssh_user, r.ssh_key
        )
    };
    std::fs::write(&path, remote("bktest", &r.ssh_port) + &remote("bkdown", "1")).unwrap();
    path.display().to_string()
}

fn rclone_cmd(r: &Remote, sb: &Sandbox, config: &str, tool: &str, args: &[&str]) -> Command {
    let mut cmd = r.cmd(sb, tool, args);
    cmd.env("RCLONE_CONFIG", config);
    cmd
}

fn rclone_installed() -> bool {
    let found = Command::new("rclone")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let why = || "rclone is not installed".into();
    needs(found.then_some(()), why, "tests/services.sh installs it").is_some()
}

#[test]
fn push_to_rclone_sftp_then_every_tool_works_on_it() {
    let Some(r) = Remote::from_env() else { return };
    if !rclone_installed() {
        return;
    }
    let sb = Sandbox::new();
    let config = rclone_config(&r, &sb);
    let run =
        |tool: &str, args: &[&str], stdin: &str| bk_tests::run_cmd(rclone_cmd(&r, &sb, &config, tool, args), stdin);
    let dumped = dump(&sb);
    let store = format!("rclone:bktest:/home/{}/{}", r.ssh_user, unique_name("bk-rclone-"));
    let shipped = run("bk-ship", &["--to", &store], &dumped).ok();
    let records = artifacts(&shipped);
    assert_eq!(records.len(), 2, "{}", shipped.stdout);
    let copy = &records[1];
    assert!(copy.location.starts_with(&format!("{store}/web/")), "{}", copy.location);
    assert_eq!((&copy.id, &copy.sha256), (&records[0].id, &records[0].sha256));
    // No temporary file is left behind, and shipping again copies nothing.
    let listed = run("bk-ls", &[&store], "").ok();
    assert_eq!(artifacts(&listed), vec![copy.clone()], "{}", listed.stdout);
    assert!(!listed.stdout.contains(".tmp."), "{}", listed.stdout);
    let again = run("bk-ship", &["--to", &store], &dumped).ok();
    assert_eq!(artifacts(&again).len(), 1, "{}", again.stdout);

    sb.run(
        "bk-restore",
        &["--from", &sb.store(), "--name", "web", "--latest", "--to", "r-local"],
    )
    .ok();
    let expected = restored_data(&sb.path("r-local"));
    assert!(!expected.is_empty());
    let verified = run("bk-verify", &["--from", &store, "--name", "web", "--latest"], "").ok();
    assert!(verified.stdout.contains(r#""ok":true"#), "{}", verified.stdout);
    run(
        "bk-restore",
        &["--from", &store, "--name", "web", "--latest", "--to", "r-rclone"],
        "",
    )
    .ok();
    assert_eq!(restored_data(&sb.path("r-rclone")), expected);
    // A record whose location is the rclone store: bk-restore and bk-verify open it.
    let line = Record::Artifact(copy.clone()).to_line();
    run("bk-restore", &["--to", "s-rclone"], &line).ok();
    assert_eq!(restored_data(&sb.path("s-rclone")), expected);
    run("bk-verify", &[], &line).ok();
    // The same files are there through the ssh store: bk's layout, nothing rclone-specific.
    let over_ssh = r.ssh_url(store.strip_prefix("rclone:bktest:").unwrap());
    assert_eq!(artifacts(&r.run(&sb, "bk-ls", &[&over_ssh], "").ok()).len(), 1);

    // Pull from it into a local mirror; bk-prune keeps the one artifact.
    let mirror = sb.path("mirror").display().to_string();
    let pulled = run("bk-ship", &["--from", &store, "--all", "--to", &mirror], "").ok();
    assert_eq!(artifacts(&pulled).len(), 1, "{}", pulled.stdout);
    let pruned = run("bk-prune", &[&store, "--keep-last", "1"], "").ok();
    assert!(pruned.stdout.contains(r#""type":"kept""#), "{}", pruned.stdout);
    run("bk-ls", &[&store, "--name", "nothing-here"], "").code(66);
}

#[test]
fn rclone_unreachable_or_missing_has_clear_exit_codes() {
    let Some(r) = Remote::from_env() else { return };
    if !rclone_installed() {
        return;
    }
    let sb = Sandbox::new();
    let config = rclone_config(&r, &sb);
    let dumped = dump(&sb);
    let down = "rclone:bkdown:/home/citest/bk-down";
    let run = bk_tests::run_cmd(
        rclone_cmd(&r, &sb, &config, "bk-ship", &["--to", down, "--retries", "0"]),
        &dumped,
    )
    .code(69);
    assert_eq!(run.lines().first(), Some(&dumped_line(&dumped)), "{}", run.stdout);
    bk_tests::run_cmd(rclone_cmd(&r, &sb, &config, "bk-ls", &[down]), "").code(69);
    // No store there yet: 66.
    let missing = format!(
        "rclone:bktest:/home/{}/{}",
        r.ssh_user,
        unique_name("bk-rclone-missing-")
    );
    bk_tests::run_cmd(rclone_cmd(&r, &sb, &config, "bk-ls", &[&missing]), "").code(66);
    // rclone not installed: 69, saying so.
    let mut cmd = rclone_cmd(&r, &sb, &config, "bk-ls", &[&missing]);
    cmd.env("BK_RCLONE", "/nonexistent/rclone");
    let run = bk_tests::run_cmd(cmd, "").code(69);
    assert!(run.error().message.contains("not installed"), "{}", run.error().message);
}

/// A files backup `big` of `mib` MiB of incompressible data in the sandbox's store; its
/// bk-dump output and the data.
fn dump_random(sb: &Sandbox, mib: usize) -> (String, Vec<u8>) {
    std::fs::create_dir_all(sb.path("big")).unwrap();
    let random = noise(mib << 20);
    std::fs::write(sb.path("big/random.bin"), &random).unwrap();
    let big = sb.path("big").display().to_string();
    let dumped = sb
        .run(
            "bk-dump",
            &[
                "files",
                &big,
                "--name",
                "big",
                "--compress",
                "none",
                "--to",
                &sb.store(),
            ],
        )
        .ok()
        .stdout;
    (dumped, random)
}

/// A private s3s-fs, killed in the middle of multipart uploads: the unfinished upload is
/// aborted by bk-prune (once old enough) or by the next upload of the same file.
#[test]
fn s3_server_killed_mid_upload_leaves_no_manifest_and_a_rerun_completes() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    let mut s3 = PrivateS3::start(&sb);
    // 64 MiB: eight parts.
    let (dumped, _) = dump_random(&sb, 64);
    let endpoint = s3.endpoint();
    let store = "s3://test-bucket/killed";
    let cmd = |tool: &str, args: &[&str]| {
        let mut cmd = r.cmd(&sb, tool, args);
        cmd.env("BK_S3_ENDPOINT", &endpoint).env("BK_S3_RETRIES", "1");
        cmd
    };
    let ship = |retries: &str| cmd("bk-ship", &["--to", store, "--retries", retries]);
    let manifest = sb.path(&format!(
        "s3root/test-bucket/killed/big/{}.json",
        dumped_artifact(&dumped).id
    ));
    let markers = || -> Vec<std::path::PathBuf> {
        bk_tests::files_below(&sb.path("s3root/test-bucket/killed/big"))
            .into_iter()
            .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp."))
            .collect()
    };
    let kill_mid_upload = |s3: &mut PrivateS3| {
        let child = spawn_with_stdin(ship("0"), &dumped);
        // Kill the server once the upload has begun: a part is on its disk.
        let until = Instant::now() + Duration::from_secs(30);
        let parts = |root: &std::path::Path| {
            std::fs::read_dir(root)
                .unwrap()
                .any(|e| e.unwrap().file_name().to_string_lossy().starts_with(".upload_id-"))
        };
        while !parts(&s3.root) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        s3.kill();
        let out = child.wait_with_output().unwrap();
        let code = out.status.code().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(code == 69 || code == 74, "exit {code}: {stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).contains(r#""type":"error""#));
        assert!(stderr.contains("could not abort"), "{stderr}");
        s3.restart();
        assert!(!manifest.exists(), "no manifest after the failed upload");
        assert_eq!(s3.multipart_uploads(), 1, "the upload the server was killed in");
        assert_eq!(markers().len(), 1, "the hidden object naming it");
    };

    // bk-ls shows what is left; bk-prune (of a name it holds a backup of) aborts it once
    // older than a day.
    let older = sb.path("older").display().to_string();
    write_backup(&older, "big", "20261120T010000Z");
    bk_tests::run_cmd(cmd("bk-ship", &["--from", &older, "--to", store]), "").ok();
    kill_mid_upload(&mut s3);
    let listed = bk_tests::run_cmd(cmd("bk-ls", &[store]), "");
    assert!(listed.stderr.contains("unfinished run"), "{}", listed.stderr);
    let day_ago = filetime::FileTime::from_system_time(std::time::SystemTime::now() - Duration::from_secs(90_000));
    filetime::set_file_mtime(&markers()[0], day_ago).unwrap();
    let pruned = bk_tests::run_cmd(cmd("bk-prune", &[store, "--keep-last", "1"]), "");
    assert!(pruned.stderr.contains("removed"), "{}", pruned.stderr);
    assert_eq!((s3.multipart_uploads(), markers().len()), (0, 0), "{}", pruned.stderr);

    // The next upload of the same file aborts it, and completes.
    kill_mid_upload(&mut s3);
    let rerun = bk_tests::run_cmd(ship("2"), &dumped).ok();
    assert_eq!(artifacts(&rerun).len(), 2, "{}", rerun.stderr);
    assert!(manifest.exists());
    assert_eq!((s3.multipart_uploads(), markers().len()), (0, 0), "{}", rerun.stderr);
    bk_tests::run_cmd(cmd("bk-verify", &["--from", store, "--name", "big"]), "").ok();
}

/// A TCP proxy in front of a server: once `hold_after` bytes of answers went through, it
/// stops forwarding until `cut`, which drops that connection (a download cut in the middle);
/// later connections pass freely. It keeps what the clients sent, to see their requests.
struct CuttingProxy {
    port: u16,
    state: std::sync::Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    forwarded: std::sync::atomic::AtomicU64,
    holding: std::sync::atomic::AtomicBool,
    cut: std::sync::atomic::AtomicBool,
    requests: std::sync::Mutex<Vec<u8>>,
}

impl CuttingProxy {
    fn start(upstream: u16, hold_after: u64) -> CuttingProxy {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(ProxyState::default());
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let Ok(mut server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut client_in, mut server_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let requests = shared.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = client_in.read(&mut buf) {
                        requests.requests.lock().unwrap().extend_from_slice(&buf[..n]);
                        if server_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
                let state = shared.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = server.read(&mut buf) {
                        let total = state.forwarded.fetch_add(n as u64, SeqCst) + n as u64;
                        if total > hold_after && !state.cut.load(SeqCst) {
                            state.holding.store(true, SeqCst);
                            while !state.cut.load(SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            break;
                        }
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CuttingProxy { port, state }
    }

    fn wait_until_holding(&self) {
        let until = Instant::now() + Duration::from_secs(60);
        while !self.state.holding.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(Instant::now() < until, "the download did not reach the cut");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn cut(&self) {
        self.state.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn requests(&self) -> String {
        String::from_utf8_lossy(&self.state.requests.lock().unwrap()).to_ascii_lowercase()
    }
}

/// The server killed and restarted while bk-restore reads a large artifact: the download
/// resumes from where it stopped (a range request), and the restore is whole.
#[test]
fn an_s3_download_cut_in_the_middle_resumes_where_it_stopped() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    let mut s3 = PrivateS3::start(&sb);
    let (dumped, data) = dump_random(&sb, 48);
    let store = "s3://test-bucket/cut";
    let mut ship = r.cmd(&sb, "bk-ship", &["--to", store]);
    ship.env("BK_S3_ENDPOINT", s3.endpoint());
    bk_tests::run_cmd(ship, &dumped).ok();

    let proxy = CuttingProxy::start(s3.port, 16 << 20);
    let mut restore = r.cmd(
        &sb,
        "bk-restore",
        &["--from", store, "--name", "big", "--to", "restored"],
    );
    restore
        .env("BK_S3_ENDPOINT", format!("http://127.0.0.1:{}", proxy.port))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = restore.spawn().unwrap();
    proxy.wait_until_holding();
    s3.kill();
    s3.restart();
    proxy.cut();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let restored = bk_tests::files_below(&sb.path("restored"))
        .into_iter()
        .find(|p| p.ends_with("big/random.bin"))
        .expect("random.bin restored");
    assert!(std::fs::read(restored).unwrap() == data, "the restored file is whole");
    let requests = proxy.requests();
    let resumed = requests
        .lines()
        .filter_map(|l| l.strip_prefix("range: bytes="))
        .filter_map(|range| {
            range
                .trim()
                .trim_end_matches('-')
                .split('-')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .collect::<Vec<_>>();
    assert!(
        resumed.iter().any(|&from| from > 0),
        "the download resumed with a range request: {requests}"
    );
}

/// The artifact record's line of bk-dump's output (between its begin and end records).
fn dumped_line(dumped: &str) -> &str {
    let lines: Vec<&str> = dumped.lines().filter(|l| l.contains(r#""type":"artifact""#)).collect();
    assert_eq!(lines.len(), 1, "one artifact record: {dumped}");
    lines[0]
}

/// The artifact of bk-dump's output.
fn dumped_artifact(dumped: &str) -> bk_core::record::Artifact {
    match bk_core::record::parse_line(dumped_line(dumped), "bk-dump's output") {
        Ok(Record::Artifact(a)) => a,
        other => panic!("not an artifact record: {other:?}"),
    }
}

/// Where a program is on this machine's PATH.
fn program_path(name: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(found.status.success(), "{name} is not installed");
    String::from_utf8(found.stdout).unwrap().trim().to_string()
}

/// The remote directory of an ssh store URL.
fn remote_root(store: &str) -> &str {
    let rest = store.strip_prefix("ssh://").unwrap();
    &rest[rest.find('/').unwrap()..]
}

/// bk-ship copies a local file to an ssh store with rsync: a copy interrupted on the way
/// (bk-ship stopped, as a service manager stops it) is resumed, not sent again.
#[test]
fn ssh_copies_of_local_files_go_by_rsync_and_resume_an_interrupted_copy() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    let (dumped, _) = dump_random(&sb, 16);
    let original = dumped_artifact(&dumped);
    let size = std::fs::metadata(sb.path(&format!("store/big/{}", original.file)))
        .unwrap()
        .len();
    let store = r.ssh_store("rsync");
    let dir = format!("{}/big", remote_root(&store));
    // An rsync slowed to 2 MiB/s, so that the copy is stopped on its way.
    let slow = sb.path("slow-bin");
    std::fs::create_dir_all(&slow).unwrap();
    std::fs::write(
        slow.join("rsync"),
        format!("#!/bin/sh\nexec {} --bwlimit=2m \"$@\"\n", program_path("rsync")),
    )
    .unwrap();
    std::fs::set_permissions(slow.join("rsync"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cmd = r.cmd(&sb, "bk-ship", &["--to", &store]);
    cmd.env("PATH", format!("{}:{}", slow.display(), std::env::var("PATH").unwrap()))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(dumped.as_bytes()).unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let arrived = format!("find {dir} -type f -size +1024k 2>/dev/null | wc -l");
    while r.shell(&arrived, b"").trim() == "0" {
        assert!(Instant::now() < until, "the copy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // As a service manager stops a run: SIGTERM to bk-ship and its children.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", String::from_utf8_lossy(&out.stderr));
    // rsync keeps what arrived under the stable name.
    let stat = format!("stat -c %s {dir}/.{}.tmp.partial 2>/dev/null || echo 0", original.file);
    let until = Instant::now() + Duration::from_secs(20);
    let kept = loop {
        let kept: u64 = r.shell(&stat, b"").trim().parse().unwrap();
        if kept > 0 {
            break kept;
        }
        assert!(Instant::now() < until, "no partial file left");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(kept < size, "stopped on the way: {kept} bytes");

    let shipped = r.run(&sb, "bk-ship", &["--to", &store], &dumped).ok();
    assert_eq!(artifacts(&shipped).len(), 2, "{}", shipped.stdout);
    let reused: u64 = shipped
        .stderr
        .split("resumed: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resumed copy: {}", shipped.stderr));
    // rsync matches whole blocks (at most 128 KiB): all of what was kept but the last block.
    assert!(
        reused + (128 << 10) >= kept && reused < size,
        "{reused} of {size} bytes reused: {}",
        shipped.stderr
    );
    let verified = r.run(&sb, "bk-verify", &["--from", &store, "--name", "big"], "").ok();
    assert!(verified.stdout.contains(r#""ok":true"#), "{}", verified.stdout);
    // Published 0600 under its name; nothing hidden left.
    let listing = r.shell(&format!("cd {dir} && stat -c '%a %n' $(ls -A)"), b"");
    assert_eq!(
        listing.lines().collect::<Vec<_>>(),
        vec![format!("600 {}.json", original.id), format!("600 {}", original.file)],
        "{listing}"
    );
}

/// Without rsync here, a local file is streamed over ssh as any other upload: a partial
/// file under rsync's name is neither used nor touched.
#[test]
fn without_rsync_ssh_copies_are_streamed() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    let dumped = dump(&sb);
    let original = dumped_artifact(&dumped);
    let store = r.ssh_store("norsync");
    let partial = format!("{}/web/.{}.tmp.partial", remote_root(&store), original.file);
    r.shell(
        &format!("mkdir -p {}/web && cat > {partial}", remote_root(&store)),
        b"not the file\n",
    );
    let ssh = program_path("ssh");
    std::fs::create_dir_all(sb.path("no-rsync")).unwrap();
    let mut cmd = r.cmd(&sb, "bk-ship", &["--to", &store]);
    cmd.env("PATH", sb.path("no-rsync"))
        .env("BK_SSH_COMMAND", r.ssh_command().replacen("ssh", &ssh, 1));
    let shipped = bk_tests::run_cmd(cmd, &dumped).ok();
    assert_eq!(artifacts(&shipped).len(), 2, "{}", shipped.stdout);
    assert!(!shipped.stderr.contains("resumed"), "{}", shipped.stderr);
    assert_eq!(r.shell(&format!("cat {partial}"), b""), "not the file\n");
    r.run(&sb, "bk-verify", &["--from", &store, "--name", "web"], "").ok();
}

/// Credentials, region and endpoint from ~/.aws/credentials and ~/.aws/config (or the files
/// AWS_SHARED_CREDENTIALS_FILE and AWS_CONFIG_FILE name), of the profile AWS_PROFILE names.
#[test]
fn s3_settings_come_from_the_aws_files_of_the_profile() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    let dumped = dump(&sb);
    let key = std::env::var("AWS_ACCESS_KEY_ID").unwrap();
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap();
    let write_private = |path: std::path::PathBuf, text: String| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    let credentials = format!(
        "[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong\n\n# the test server's\n[bk]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"
    );
    let config = format!(
        "[default]\nregion = us-east-1\nendpoint_url = {e}\n\n[profile bk]\nregion = eu-west-3\nendpoint_url = {e}\n",
        e = r.s3_endpoint
    );
    write_private(sb.path("home/.aws/credentials"), credentials.clone());
    write_private(sb.path("home/.aws/config"), config.clone());
    let s3 = r.s3_store("aws-files");
    let cmd = |tool: &str, args: &[&str], home: &str| {
        let mut cmd = sb.cmd(tool, args);
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_CONFIG_FILE",
            "BK_S3_ENDPOINT",
            "BK_S3_REGION",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("HOME", sb.path(home)).env("BK_S3_RETRIES", "0");
        cmd
    };
    // The profile's keys, and its endpoint from the config file.
    let mut ship = cmd("bk-ship", &["--to", &s3, "--retries", "0"], "home");
    ship.env("AWS_PROFILE", "bk");
    let shipped = bk_tests::run_cmd(ship, &dumped).ok();
    assert_eq!(artifacts(&shipped).len(), 2, "{}", shipped.stderr);
    // The default profile's keys are not the server's.
    let refused = bk_tests::run_cmd(cmd("bk-ls", &[&s3], "home"), "");
    assert!(
        [77, 78].contains(&refused.code),
        "exit {}: {}",
        refused.code,
        refused.stderr
    );
    // The files where AWS_SHARED_CREDENTIALS_FILE and AWS_CONFIG_FILE say, not in HOME.
    write_private(sb.path("elsewhere/creds"), credentials);
    write_private(sb.path("elsewhere/conf"), config);
    let mut ls = cmd("bk-ls", &[&s3], "nowhere");
    ls.env("AWS_PROFILE", "bk")
        .env("AWS_SHARED_CREDENTIALS_FILE", sb.path("elsewhere/creds"))
        .env("AWS_CONFIG_FILE", sb.path("elsewhere/conf"));
    assert_eq!(artifacts(&bk_tests::run_cmd(ls, "").ok()).len(), 1);
    // A credentials file others may read is refused.
    std::fs::set_permissions(
        sb.path("home/.aws/credentials"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let mut ls = cmd("bk-ls", &[&s3], "home");
    ls.env("AWS_PROFILE", "bk");
    let run = bk_tests::run_cmd(ls, "").code(78);
    assert!(run.error().message.contains("credentials"), "{}", run.error().message);
}

#[test]
fn every_tool_takes_the_s3_endpoint_as_an_option() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    std::fs::create_dir_all(sb.path("data")).unwrap();
    std::fs::write(sb.path("data/a.txt"), "alpha\n").unwrap();
    let s3 = r.s3_store("option");
    let data = sb.path("data").display().to_string();
    let restored = sb.path("restored").display().to_string();
    // Only the options say where the server is.
    let run = |tool: &str, args: &[&str], stdin: &str| {
        let mut cmd = sb.cmd(tool, args);
        cmd.args(["--s3-endpoint", &r.s3_endpoint, "--s3-region", "us-east-1"])
            .env_remove("BK_S3_ENDPOINT")
            .env_remove("AWS_ENDPOINT_URL")
            .env("HOME", sb.path("home"));
        bk_tests::run_cmd(cmd, stdin).ok()
    };
    let dumped = run("bk-dump", &["files", &data, "--name", "web", "--to", &s3], "");
    let a = dumped.artifact();
    assert!(a.location.starts_with(&s3), "{}", a.location);
    run("bk-ship", &["--to", &sb.store()], &dumped.stdout);
    assert_eq!(run("bk-ls", &[&s3], "").artifacts().len(), 1);
    run("bk-verify", &["--from", &s3], "");
    run("bk-restore", &["--from", &s3, "--name", "web", "--to", &restored], "");
    assert_eq!(
        std::fs::read_to_string(
            sb.path("restored")
                .join(sb.path("data/a.txt").strip_prefix("/").unwrap())
        )
        .unwrap(),
        "alpha\n"
    );
    let pruned = run("bk-prune", &[&s3, "--keep-last", "1"], "");
    assert_eq!(pruned.records().len(), 1, "{}", pruned.stdout);
}

/// The test server gives S3's ETags, so an upload is checked by them and not read back:
/// the object's ETag is the MD5 of its 8 MiB parts' MD5s, then the number of parts.
#[test]
fn s3_uploads_are_checked_by_their_md5_etags() {
    use md5::{Digest, Md5};
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    let (dumped, _) = dump_random(&sb, 20);
    let s3 = r.s3_store("etag");
    let shipped = r.run(&sb, "bk-ship", &["--to", &s3], &dumped).ok();
    let copy = &artifacts(&shipped)[1];
    let key = copy.location.strip_prefix(&format!("s3://{}/", r.s3_bucket)).unwrap();
    let aws = format!(
        "{}/venv/bin/aws",
        std::env::var("TOOLS").unwrap_or("/tmp/bk-test-tools".into())
    );
    let head = Command::new(aws)
        .args([
            "--endpoint-url",
            &r.s3_endpoint,
            "s3api",
            "head-object",
            "--bucket",
            &r.s3_bucket,
            "--key",
            key,
        ])
        .output()
        .unwrap();
    assert!(head.status.success(), "{}", String::from_utf8_lossy(&head.stderr));
    let head: serde_json::Value = serde_json::from_slice(&head.stdout).unwrap();
    let local = std::fs::read(&artifacts(&shipped)[0].location).unwrap();
    let part_md5s: Vec<u8> = local
        .chunks(8 << 20)
        .flat_map(|part| Md5::digest(part).to_vec())
        .collect();
    let expected = format!(
        "\"{}-{}\"",
        hex::encode(Md5::digest(&part_md5s)),
        local.len().div_ceil(8 << 20)
    );
    assert_eq!(head["ETag"], serde_json::json!(expected));
}

// ---------------------------------------------------------------------------------------
// Local stores only: what bk-ship refuses, deletes and passes on (no server needed).

#[test]
fn a_destination_that_cannot_be_a_store_fails_at_once() {
    let sb = Sandbox::new();
    let backup = write_backup(&sb.store(), "job", "20260101T000000Z");
    std::fs::write(sb.path("plain"), "a file, not a directory\n").unwrap();
    let plain = sb.path("plain").display().to_string();
    let below = format!("{plain}/store");
    // (destination, the exit codes that say what is wrong with it)
    let cases: [(&str, &[i32]); 2] = [
        (&plain, &[73]),
        // 74 (an I/O error) as bk-core classifies ENOTDIR when listing, or 73.
        (&below, &[73, 74]),
    ];
    for (dest, codes) in cases {
        let started = Instant::now();
        let run = sb.run_with_stdin("bk-ship", &["--to", dest], &artifact_line(&backup));
        let took = started.elapsed();
        assert!(codes.contains(&run.code), "{dest}: exit {}\n{}", run.code, run.stderr);
        let e = run.error();
        assert_eq!(e.name.as_deref(), Some("job"));
        assert!(
            e.message.contains("not a directory") || e.message.contains("Not a directory"),
            "{}",
            e.message
        );
        assert!(!run.stderr.contains("attempt"), "not retried: {}", run.stderr);
        assert!(
            took < Duration::from_secs(2),
            "{dest}: failed after {took:?}, not at once"
        );
        assert_eq!(
            run.lines()[0],
            artifact_line(&backup).trim_end(),
            "the input is passed on"
        );
    }
}

#[test]
fn delete_source_goes_by_the_source_stores_own_manifest() {
    use sha2::{Digest, Sha256};
    let sb = Sandbox::new();
    let dest = sb.path("dest").display().to_string();
    let manifest =
        |a: &bk_core::record::Artifact| std::path::Path::new(&a.location).with_file_name(format!("{}.json", a.id));

    // A backup of the store, its record as bk-dump printed it: shipped, then deleted.
    let good = write_backup(&sb.store(), "good", "20260101T000000Z");
    // A hostile record: its location points into a directory that holds a file of that
    // name but no manifest of it (a backup whose manifest was removed stands for one).
    let victim = sb.path("victim").display().to_string();
    let foreign = write_backup(&victim, "job", "20260101T000000Z");
    std::fs::remove_file(manifest(&foreign)).unwrap();
    // A record that does not say what the source's manifest says: the file was replaced
    // by other bytes of the same size, and the record rewritten to match them.
    let changed = write_backup(&sb.store(), "changed", "20260101T000000Z");
    let other = "x".repeat(changed.bytes as usize);
    std::fs::write(&changed.location, &other).unwrap();
    let mut rewritten = changed.clone();
    rewritten.sha256 = hex::encode(Sha256::digest(other.as_bytes()));

    // (record, exit code, whether the source keeps the artifact and its manifest)
    let cases = [(&good, 0, false), (&foreign, 66, true), (&rewritten, 65, true)];
    for (record, code, kept) in cases {
        let run = sb
            .run_with_stdin("bk-ship", &["--to", &dest, "--delete-source"], &artifact_line(record))
            .code(code);
        let source = std::path::Path::new(&record.location);
        assert_eq!(source.exists(), kept, "{}: {}", record.id, run.stderr);
        if code == 0 {
            assert!(!manifest(record).exists(), "{}", run.stderr);
            assert!(run.stderr.contains("deleted from"), "{}", run.stderr);
        } else {
            let e = run.error();
            assert!(e.message.contains("source kept"), "{}", e.message);
            assert!(e.message.contains(&record.id), "{}", e.message);
        }
    }
    assert!(std::path::Path::new(&foreign.location).exists());
    assert!(manifest(&changed).exists());
}

#[test]
fn a_record_whose_file_leaves_the_store_makes_bk_ship_touch_nothing() {
    use sha2::{Digest, Sha256};
    let sb = Sandbox::new();
    // Deep enough that `<store>/<name>/./../../../../tmp/x/owned` is inside the sandbox
    // for the source and the destination: the file it names exists, to be read, copied
    // over or deleted.
    let dest = sb.path("d1/d2/dest");
    let source = sb.path("d1/d2/src");
    std::fs::create_dir_all(source.join("job")).unwrap();
    std::fs::create_dir_all(sb.path("tmp/x")).unwrap();
    std::fs::write(sb.path("tmp/x/owned"), "precious\n").unwrap();
    let good = write_backup(&sb.store(), "job", "20260101T000000Z");
    let mut hostile = serde_json::to_value(Record::Artifact(good.clone())).unwrap();
    hostile["file"] = "./../../../../tmp/x/owned".into();
    hostile["location"] = format!("{}/job/./../../../../tmp/x/owned", source.display()).into();
    hostile["sha256"] = hex::encode(Sha256::digest(b"precious\n")).into();
    hostile["bytes"] = 9.into();
    hostile["bk"] = 1.into();
    let input = format!("{}\n{hostile}\n", artifact_line(&good).trim_end());

    let before = bk_tests::tree_digest(sb.root());
    let run = sb
        .run_with_stdin(
            "bk-ship",
            &["--to", &dest.display().to_string(), "--delete-source"],
            &input,
        )
        .code(65);
    assert!(run.error().message.contains("field \"file\""), "{}", run.stderr);
    assert_eq!(bk_tests::tree_digest(sb.root()), before, "nothing written or deleted");
    assert!(!dest.exists());
}

#[test]
fn records_of_an_unknown_type_pass_through_unchanged() {
    let sb = Sandbox::new();
    let src = sb.path("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), "alpha\n").unwrap();
    let backup = sb.dump(&["files", &src.display().to_string(), "--name", "web"]);
    // A newer tool's record: a type and fields this version does not know, keys unsorted.
    let unknown = r#"{"zeta":[1,"two",null],"bk":1,"type":"frobnicated","name":"web","extra":{"b":2,"a":1.5}}"#;
    let input = format!("{unknown}\n{}{unknown}\n", artifact_line(&backup));
    let artifact = artifact_line(&backup);
    let artifact = artifact.trim_end();
    let dest = sb.path("dest").display().to_string();
    let restored = sb.path("restored").display().to_string();

    let ship = sb.run_with_stdin("bk-ship", &["--to", &dest], &input).ok();
    let verify = sb.run_with_stdin("bk-verify", &[], &input).ok();
    let restore = sb.run_with_stdin("bk-restore", &["--to", &restored], &input).ok();
    // (tool, its run, what it passes on besides the unknown records, its own record type)
    for (tool, run, passed, own) in [
        ("bk-ship", &ship, vec![artifact], "artifact"),
        ("bk-verify", &verify, vec![], "verified"),
        ("bk-restore", &restore, vec![], "restored"),
    ] {
        let own_type = format!(r#""type":"{own}""#);
        let (acted, passed_on): (Vec<&str>, Vec<&str>) = run
            .lines()
            .into_iter()
            .partition(|l| l.contains(&own_type) && !passed.contains(l));
        assert_eq!(acted.len(), 1, "{tool}: one {own} record of its own: {}", run.stdout);
        let mut expected = passed.clone();
        expected.insert(0, unknown);
        expected.push(unknown);
        assert_eq!(passed_on, expected, "{tool}: passed on unchanged, in input order");
    }
}
