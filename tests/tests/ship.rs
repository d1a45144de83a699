//! bk-ship and the remote stores against the real test servers (tests/services.sh): s3s-fs
//! on TEST_S3_ENDPOINT and sshd on 127.0.0.1:TEST_SSH_PORT. With BK_TEST_SERVICES=1 a
//! missing server is a failure, not a skip.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bk_core::record::Record;
use bk_tests::{services_required, write_backup, Run, Sandbox};

/// The restored data, without the parent directories a restore creates.
fn tree_digest(root: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    let mut t = bk_tests::tree_digest(root);
    t.retain(|k, _| k.contains("/data"));
    t
}

struct Remote {
    s3_endpoint: String,
    s3_bucket: String,
    ssh_key: String,
    ssh_port: String,
    ssh_user: String,
}

fn remote(test: &str) -> Option<Remote> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let found = (|| {
        Some(Remote {
            s3_endpoint: var("TEST_S3_ENDPOINT")?,
            s3_bucket: var("TEST_S3_BUCKET")?,
            ssh_key: var("TEST_SSH_KEY")?,
            ssh_port: var("TEST_SSH_PORT")?,
            ssh_user: var("TEST_SSH_USER")?,
        })
    })();
    if found.is_none() {
        assert!(
            !services_required(),
            "{test}: TEST_S3_ENDPOINT/TEST_SSH_* are not set, and BK_TEST_SERVICES=1 says the servers are up: source $(tests/services.sh env)"
        );
        eprintln!("SKIPPED {test}: TEST_S3_ENDPOINT/TEST_SSH_* are not set (source $(tests/services.sh env))");
    }
    found
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:08x}", std::process::id())
}

impl Remote {
    fn s3(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.s3_bucket, unique(prefix))
    }
    fn ssh(&self, prefix: &str) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}/tmp/{}",
            self.ssh_user,
            self.ssh_port,
            unique(prefix)
        )
    }
    fn ssh_command(&self, known_hosts: &str, strict: &str) -> String {
        format!(
            "ssh -i {} -o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking={strict} -o LogLevel=ERROR",
            self.ssh_key
        )
    }
    /// A tool with the S3 endpoint and ssh key set up, as a user's environment would.
    fn cmd(&self, sb: &Sandbox, tool: &str, args: &[&str]) -> Command {
        let mut cmd = sb.cmd(tool, args);
        cmd.env("BK_S3_ENDPOINT", &self.s3_endpoint)
            .env("BK_SSH_COMMAND", self.ssh_command("/dev/null", "no"));
        cmd
    }
    fn run(&self, sb: &Sandbox, tool: &str, args: &[&str], stdin: &str) -> Run {
        bk_tests::run_cmd(self.cmd(sb, tool, args), stdin)
    }
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
    let Some(r) = remote("push_to_s3_and_ssh_then_every_tool_works_on_both") else {
        return;
    };
    let sb = Sandbox::new();
    let dumped = dump(&sb);
    let (s3, ssh) = (r.s3("push"), r.ssh("push"));
    let shipped = r.run(&sb, "bk-ship", &["--to", &s3, "--to", &ssh], &dumped).ok();
    let records = artifacts(&shipped);
    assert_eq!(records.len(), 3, "{}", shipped.stdout);
    assert_eq!(
        shipped.stdout.lines().next().unwrap(),
        dumped.trim_end(),
        "input passed on unchanged"
    );
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
    let expected = tree_digest(&sb.path("r-local"));
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
        assert_eq!(tree_digest(&sb.path(&target)), expected, "restored from {store}");
        // A record whose location is remote: bk-restore and bk-verify open its store.
        let line = Record::Artifact(records[i + 1].clone()).to_line();
        let target = format!("s{i}");
        r.run(&sb, "bk-restore", &["--to", &target], &line).ok();
        assert_eq!(tree_digest(&sb.path(&target)), expected);
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
    let Some(r) = remote("an_upstream_error_is_passed_on_and_its_name_not_shipped") else {
        return;
    };
    let sb = Sandbox::new();
    let dumped = dump(&sb);
    let error = r#"{"bk":1,"type":"error","tool":"bk-dump","name":"web","code":69,"message":"down"}"#;
    let s3 = r.s3("upstream");
    let run = r
        .run(&sb, "bk-ship", &["--to", &s3], &format!("{dumped}{error}\n"))
        .code(1);
    assert_eq!(run.stdout.lines().count(), 2, "{}", run.stdout);
    r.run(&sb, "bk-ls", &[&s3, "--name", "web"], "").code(66);
}

#[test]
fn pull_mode_is_idempotent_and_refuses_a_differing_copy() {
    let Some(r) = remote("pull_mode_is_idempotent_and_refuses_a_differing_copy") else {
        return;
    };
    let sb = Sandbox::new();
    let source = sb.store();
    write_backup(&source, "db", "20261120T010000Z");
    write_backup(&source, "db", "20261121T010000Z");
    write_backup(&source, "other", "20261121T010000Z");
    let (s3, ssh, local) = (r.s3("pull"), r.ssh("pull"), sb.path("mirror").display().to_string());

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
    assert_eq!(second.stdout, "", "a second run copies nothing");
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
    let fresh = r.ssh("corrupt");
    r.run(
        &sb,
        "bk-ship",
        &["--from", &source, "--name", "other", "--to", &fresh],
        "",
    )
    .code(65);
    r.run(&sb, "bk-ls", &[&fresh], "").code(66);

    // --delete-source: the source goes once the copy is checked.
    let moved = r.ssh("moved");
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
    let Some(r) = remote("unreachable_stores_and_refused_hosts_have_clear_exit_codes") else {
        return;
    };
    let sb = Sandbox::new();
    let dumped = dump(&sb);
    let s3 = r.s3("down");
    let mut cmd = r.cmd(
        &sb,
        "bk-ship",
        &["--to", &s3, "--retries", "0", "--s3-endpoint", "http://127.0.0.1:1"],
    );
    cmd.env("BK_S3_RETRIES", "0");
    let down = bk_tests::run_cmd(cmd, &dumped).code(69);
    assert!(
        down.stdout.starts_with(dumped.trim_end()),
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
    let mut cmd = r.cmd(&sb, "bk-ls", &[&r.ssh("hostkey")]);
    cmd.env("BK_SSH_COMMAND", r.ssh_command(&known.display().to_string(), "yes"));
    let run = bk_tests::run_cmd(cmd, "").code(78);
    assert!(run.error().message.contains("host key"), "{}", run.error().message);

    // A remote path the user may not write: 73.
    let forbidden = format!("ssh://{}@127.0.0.1:{}/root/bk-forbidden", r.ssh_user, r.ssh_port);
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

fn rclone_installed(test: &str) -> bool {
    let found = Command::new("rclone")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            !services_required(),
            "{test}: rclone is not installed, and BK_TEST_SERVICES=1 says the test services are set up"
        );
        eprintln!("SKIPPED {test}: rclone is not installed (tests/services.sh installs it)");
    }
    found
}

#[test]
fn push_to_rclone_sftp_then_every_tool_works_on_it() {
    let test = "push_to_rclone_sftp_then_every_tool_works_on_it";
    let Some(r) = remote(test) else { return };
    if !rclone_installed(test) {
        return;
    }
    let sb = Sandbox::new();
    let config = rclone_config(&r, &sb);
    let run =
        |tool: &str, args: &[&str], stdin: &str| bk_tests::run_cmd(rclone_cmd(&r, &sb, &config, tool, args), stdin);
    let dumped = dump(&sb);
    let store = format!("rclone:bktest:/home/{}/{}", r.ssh_user, unique("bk-rclone"));
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
    let expected = tree_digest(&sb.path("r-local"));
    assert!(!expected.is_empty());
    let verified = run("bk-verify", &["--from", &store, "--name", "web", "--latest"], "").ok();
    assert!(verified.stdout.contains(r#""ok":true"#), "{}", verified.stdout);
    run(
        "bk-restore",
        &["--from", &store, "--name", "web", "--latest", "--to", "r-rclone"],
        "",
    )
    .ok();
    assert_eq!(tree_digest(&sb.path("r-rclone")), expected);
    // A record whose location is the rclone store: bk-restore and bk-verify open it.
    let line = Record::Artifact(copy.clone()).to_line();
    run("bk-restore", &["--to", "s-rclone"], &line).ok();
    assert_eq!(tree_digest(&sb.path("s-rclone")), expected);
    run("bk-verify", &[], &line).ok();
    // The same files are there through the ssh store: bk's layout, nothing rclone-specific.
    let over_ssh = store.replace(
        "rclone:bktest:",
        &format!("ssh://{}@127.0.0.1:{}", r.ssh_user, r.ssh_port),
    );
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
    let test = "rclone_unreachable_or_missing_has_clear_exit_codes";
    let Some(r) = remote(test) else { return };
    if !rclone_installed(test) {
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
    assert!(run.stdout.starts_with(dumped.trim_end()), "{}", run.stdout);
    bk_tests::run_cmd(rclone_cmd(&r, &sb, &config, "bk-ls", &[down]), "").code(69);
    // No store there yet: 66.
    let missing = format!("rclone:bktest:/home/{}/{}", r.ssh_user, unique("bk-rclone-missing"));
    bk_tests::run_cmd(rclone_cmd(&r, &sb, &config, "bk-ls", &[&missing]), "").code(66);
    // rclone not installed: 69, saying so.
    let mut cmd = rclone_cmd(&r, &sb, &config, "bk-ls", &[&missing]);
    cmd.env("BK_RCLONE", "/nonexistent/rclone");
    let run = bk_tests::run_cmd(cmd, "").code(69);
    assert!(run.error().message.contains("not installed"), "{}", run.error().message);
}

/// A private s3s-fs, killed in the middle of a multipart upload.
#[test]
fn s3_server_killed_mid_upload_leaves_no_manifest_and_a_rerun_completes() {
    let Some(r) = remote("s3_server_killed_mid_upload_leaves_no_manifest_and_a_rerun_completes") else {
        return;
    };
    let server = std::path::Path::new("/tmp/bk-test-tools/bin/s3s-fs");
    assert!(server.exists(), "s3s-fs is built by tests/services.sh");
    let sb = Sandbox::new();
    std::fs::create_dir_all(sb.path("s3root/test-bucket")).unwrap();
    let port = 18000 + (std::process::id() % 900) as u16 + 100;
    let start = || -> Child {
        let child = Command::new(server)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", &std::env::var("AWS_ACCESS_KEY_ID").unwrap()])
            .args(["--secret-key", &std::env::var("AWS_SECRET_ACCESS_KEY").unwrap()])
            .arg(sb.path("s3root"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "private s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    };
    let mut s3s = start();
    // 64 MiB of incompressible data: eight parts.
    std::fs::create_dir_all(sb.path("big")).unwrap();
    let mut random = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in random.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(sb.path("big/random.bin"), &random).unwrap();
    drop(random);
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
    let endpoint = format!("http://127.0.0.1:{port}");
    let store = "s3://test-bucket/killed";
    let ship = |retries: &str| {
        let mut cmd = r.cmd(
            &sb,
            "bk-ship",
            &["--to", store, "--retries", retries, "--s3-endpoint", &endpoint],
        );
        cmd.env("BK_S3_RETRIES", "1");
        cmd
    };
    let mut cmd = ship("0");
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(dumped.as_bytes()).unwrap();
    // Kill the server once the upload has begun: a part is on its disk.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let busy = walk_size(&sb.path("s3root")) > 0;
        if busy || Instant::now() > until {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    s3s.kill().unwrap();
    s3s.wait().unwrap();
    let out = child.wait_with_output().unwrap();
    let code = out.status.code().unwrap();
    assert!(
        code == 69 || code == 74,
        "exit {code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#""type":"error""#));

    let mut s3s = start();
    let manifests = |dir: &std::path::Path| -> usize {
        bk_tests::files_below(dir)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json") && p.display().to_string().contains("killed/big"))
            .count()
    };
    assert_eq!(manifests(&sb.path("s3root")), 0, "no manifest after the failed upload");
    let rerun = bk_tests::run_cmd(ship("2"), &dumped).ok();
    assert_eq!(artifacts(&rerun).len(), 2, "{}", rerun.stderr);
    let mut cmd = r.cmd(&sb, "bk-verify", &["--from", store, "--name", "big"]);
    cmd.env("BK_S3_ENDPOINT", &endpoint);
    bk_tests::run_cmd(cmd, "").ok();
    s3s.kill().unwrap();
    let _ = s3s.wait();
}

fn walk_size(dir: &std::path::Path) -> u64 {
    bk_tests::files_below(dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}
