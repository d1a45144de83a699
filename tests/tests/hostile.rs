//! The trust boundary (issue 11): every record, manifest and store is hostile, every process
//! can be killed at any line. Nothing outside a store is read, written or deleted; a killed
//! or crashed tool fails its pipeline; no secret is printed. Each test plants the hostile
//! thing, runs the real tools, and checks the tree around the store did not change.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bk_core::record::{Artifact, Record};
use bk_tests::{bin, files_below, noise, s, tree_digest, write_backup, Run, Sandbox};

/// A sandbox with a store holding two good backups of `job`, and a victim directory beside
/// the store that no tool may touch.
struct Scene {
    sb: Sandbox,
    store: String,
    good: Vec<Artifact>,
}

impl Scene {
    fn new() -> Scene {
        let sb = Sandbox::new();
        let store = sb.store();
        let src = sb.path("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("a.txt"), "alpha\n").unwrap();
        // An old backup written by hand, and a real one (restorable) as the newest.
        let good = vec![
            write_backup(&store, "job", "20261101T001500Z"),
            sb.dump(&["files", s(&src), "--name", "job"]),
        ];
        let victim = sb.path("victim");
        fs::create_dir_all(&victim).unwrap();
        fs::write(victim.join("precious.txt"), "the only copy\n").unwrap();
        fs::write(victim.join("job.20991231T000000Z.tar"), "not a backup\n").unwrap();
        Scene { sb, store, good }
    }

    fn victim(&self) -> PathBuf {
        self.sb.path("victim")
    }

    /// Everything in the sandbox but the store and the lock directory.
    fn outside(&self) -> BTreeMap<String, String> {
        tree_digest(self.sb.root())
            .into_iter()
            .filter(|(path, _)| {
                !["store", "locks"]
                    .iter()
                    .any(|d| path == d || path.starts_with(&format!("{d}/")))
            })
            .collect()
    }

    /// A manifest written by hand: the good newest backup's, with one field replaced, under
    /// the file name of a newer backup.
    fn plant(&self, field: &str, value: serde_json::Value) -> PathBuf {
        let mut manifest: serde_json::Value =
            serde_json::from_str(&Record::Artifact(self.good[1].clone()).to_line()).unwrap();
        manifest[field] = value;
        let path = Path::new(&self.store).join("job/job.20991231T000000Z.json");
        fs::write(&path, manifest.to_string()).unwrap();
        path
    }
}

/// Values of `name`, `id` and `file` that leave the name's directory, each with the field
/// an error must name.
fn escapes(victim: &Path) -> Vec<(&'static str, serde_json::Value)> {
    let abs = victim.join("precious.txt").display().to_string();
    vec![
        ("file", "../../victim/precious.txt".into()),
        ("file", abs.into()),
        ("file", "job.20261102T001500Z.tar/../../../victim/precious.txt".into()),
        ("file", "./../../../victim/job.20991231T000000Z.tar".into()),
        ("id", "job.20261102T001500Z/../../victim".into()),
        ("name", "../../../tmp/pwn".into()),
        ("name", "../victim".into()),
    ]
}

#[test]
fn planted_manifests_never_reach_outside_the_store() {
    for (field, value) in escapes(&Scene::new().victim()) {
        let scene = Scene::new();
        let before = scene.outside();
        let planted = scene.plant(field, value.clone());
        let store = scene.store.as_str();
        let target = scene.sb.path("target");
        let case = format!("{field}={value}");
        // Every tool that lists: the planted manifest is a broken backup, reported (65).
        let runs = [
            scene.sb.run("bk-ls", &[store]),
            scene.sb.run("bk-prune", &[store, "--keep-last", "1"]),
            scene.sb.run("bk-verify", &["--from", store]),
        ];
        for r in &runs {
            assert_eq!(r.code, 65, "{case}\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
            assert!(r.stderr.contains("broken backup"), "{case}: {}", r.stderr);
        }
        // The newest good backup is what --latest means; the broken one is never picked.
        let restored = scene
            .sb
            .run(
                "bk-restore",
                &["--from", store, "--name", "job", "--latest", "--to", s(&target)],
            )
            .ok()
            .restored();
        assert_eq!(restored.id, scene.good[1].id, "{case}");
        assert!(
            planted.exists(),
            "{case}: a broken manifest is left for a person to look at"
        );
        assert!(scene.good.iter().all(|a| Path::new(&a.location).exists()), "{case}");
        let mut after = scene.outside();
        after.retain(|path, _| !(path == "target" || path.starts_with("target/")));
        assert_eq!(after, before, "{case}: something outside the store changed");
        assert!(!Path::new("/tmp/pwn.lock").exists() && !Path::new("/tmp/pwn").exists());
    }
}

#[test]
fn records_on_stdin_that_leave_the_store_are_refused() {
    for (field, value) in escapes(&Scene::new().victim()) {
        let scene = Scene::new();
        let before = scene.outside();
        let mut record: serde_json::Value =
            serde_json::from_str(&Record::Artifact(scene.good[1].clone()).to_line()).unwrap();
        record[field] = value.clone();
        let line = format!("{record}\n");
        let store2 = scene.sb.path("store2");
        let target = scene.sb.path("target");
        let case = format!("{field}={value}");
        for (tool, args) in [
            ("bk-prune", vec!["--keep-last", "1"]),
            ("bk-prune", vec![scene.store.as_str(), "--keep-last", "1"]),
            ("bk-ship", vec!["--to", s(&store2), "--delete-source"]),
            ("bk-verify", vec![]),
            ("bk-restore", vec!["--to", s(&target)]),
        ] {
            let r = scene.sb.run_with_stdin(tool, &args, &line).code(65);
            let e = r.error();
            assert_eq!(e.tool, tool, "{case}");
            assert!(
                e.message.contains(&format!("field \"{field}\"")),
                "{case}: {tool}: {}",
                e.message
            );
            assert!(e.message.starts_with("stdin line 1"), "{case}: {}", e.message);
        }
        assert!(!store2.exists() && !target.exists(), "{case}: nothing created");
        assert!(
            scene.good.iter().all(|a| Path::new(&a.location).exists()),
            "{case}: nothing deleted"
        );
        assert_eq!(scene.outside(), before, "{case}: something outside the store changed");
    }
}

#[test]
fn stores_others_can_write_are_refused() {
    // Each case makes one directory of the store loose: writable by others is refused by
    // every tool; owned by another user, by the tools that write or delete (reading what
    // another account wrote, as root restoring the backup user's store, is fine).
    type Loosen = fn(&Path);
    let cases: [(&str, &str, bool, Loosen); 4] = [
        ("", "chmod go-w", true, |d| {
            fs::set_permissions(d, fs::Permissions::from_mode(0o777)).unwrap()
        }),
        ("", "chmod go-w", true, |d| {
            fs::set_permissions(d, fs::Permissions::from_mode(0o770)).unwrap()
        }),
        ("job", "chmod go-w", true, |d| {
            fs::set_permissions(d, fs::Permissions::from_mode(0o757)).unwrap()
        }),
        ("job", "chown", false, |d| {
            std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap()
        }),
    ];
    for (dir, fix, reads_refused, loosen) in cases {
        let scene = Scene::new();
        let store = scene.store.as_str();
        let src = scene.sb.path("src");
        let loose = Path::new(store).join(dir);
        loosen(&loose);
        let target = scene.sb.path("target");
        let restore = ["--from", store, "--name", "job", "--latest", "--to", s(&target)];
        for (tool, args, reads) in [
            ("bk-ls", vec![store], true),
            ("bk-verify", vec!["--from", store], true),
            ("bk-restore", restore.to_vec(), true),
            ("bk-prune", vec![store, "--keep-last", "1"], false),
            ("bk-dump", vec!["files", s(&src), "--name", "job", "--to", store], false),
        ] {
            let r = scene.sb.run(tool, &args);
            if reads && !reads_refused {
                r.ok();
                continue;
            }
            let e = r.code(77).error();
            assert!(
                e.message.contains(s(&loose).trim_end_matches('/')),
                "{tool}: {}",
                e.message
            );
            assert!(e.message.contains(fix), "{tool}: {}", e.message);
        }
        let _ = fs::remove_dir_all(&target);
        assert_eq!(files_below(Path::new(store)).len(), 4, "nothing written or deleted");
    }
}

#[test]
fn a_symlinked_name_directory_is_not_followed() {
    let scene = Scene::new();
    // The victim directory, made to look like a name directory of old backups.
    let elsewhere = scene.sb.path("elsewhere");
    let old = write_backup(s(&elsewhere), "other", "20200101T000000Z");
    let before = tree_digest(&elsewhere);
    std::os::unix::fs::symlink(elsewhere.join("other"), Path::new(&scene.store).join("other")).unwrap();
    let r = scene
        .sb
        .run("bk-prune", &[&scene.store, "--name", "other", "--keep-last", "1"]);
    assert_eq!(r.code, 77, "{}", r.stderr);
    assert!(r.error().message.contains("not a directory (a symlink?)"));
    // Listing the whole store skips it as no name directory at all.
    let listed = scene.sb.run("bk-ls", &[&scene.store]).ok().artifacts();
    assert!(!listed.iter().any(|a| a.id == old.id));
    assert_eq!(tree_digest(&elsewhere), before);
}

/// Runs a tool that must finish: killed and failed after `limit`.
fn run_within(cmd: &mut Command, limit: Duration) -> Run {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} still runs after {limit:?}: {:?}", child.wait_with_output());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Run::from(child.wait_with_output().expect("output"))
}

#[test]
fn a_fifo_named_like_a_manifest_hangs_nothing() {
    let scene = Scene::new();
    let fifo = Path::new(&scene.store).join("job/job.20991231T000000Z.json");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for args in [
        vec!["bk-ls", &scene.store],
        vec!["bk-prune", &scene.store, "--keep-last", "1"],
    ] {
        let r = run_within(&mut scene.sb.cmd(args[0], &args[1..]), Duration::from_secs(30));
        assert_eq!(r.code, 65, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("not a regular file"), "{}", r.stderr);
    }
    assert!(scene.good.iter().all(|a| Path::new(&a.location).exists()));
}

#[test]
fn a_missing_artifact_is_no_backup() {
    let scene = Scene::new();
    // The newest backup's manifest without its artifact file: a phantom.
    let phantom = write_backup(&scene.store, "job", "20261103T001500Z");
    fs::remove_file(&phantom.location).unwrap();
    let r = scene.sb.run("bk-ls", &[&scene.store]).code(65);
    assert_eq!(r.artifacts().len(), 2, "only the real backups are listed");
    assert!(r.error().message.contains("is missing"));
    let table = scene.sb.run("bk-ls", &[&scene.store, "--format", "table"]).code(65);
    assert!(table
        .stdout
        .lines()
        .any(|l| l.starts_with(&phantom.id) && l.contains("BROKEN")));
    assert!(
        !table.stdout.contains('{'),
        "a table holds no records: {}",
        table.stdout
    );
    assert!(table.stderr.contains("is missing"), "{}", table.stderr);
    // A truncated artifact is as broken.
    fs::write(&scene.good[1].location, "cut").unwrap();
    let r = scene.sb.run("bk-ls", &[&scene.store]).code(65);
    assert_eq!(r.artifacts().len(), 1);
}

/// Holds the lock of a name, as a run in progress does, until dropped.
struct HeldLock(std::process::Child);

impl HeldLock {
    fn new(sb: &Sandbox, name: &str) -> HeldLock {
        let dir = sb.path("locks");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let lock = dir.join(format!("{name}.lock"));
        let child = Command::new("flock")
            .arg(&lock)
            .args(["sleep", "600"])
            .spawn()
            .expect("flock(1)");
        // Held once the file exists and flock(1) sleeps.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lock.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        HeldLock(child)
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_interrupted_tool_prints_an_error_record() {
    for (signal, number) in [
        (nix::sys::signal::SIGTERM, 15),
        (nix::sys::signal::SIGINT, 2),
        (nix::sys::signal::SIGHUP, 1),
    ] {
        let scene = Scene::new();
        let _held = HeldLock::new(&scene.sb, "job");
        // bk-prune waits for the lock: a point where it is surely running.
        let child = scene
            .sb
            .spawn("bk-prune", &[&scene.store, "--keep-last", "1", "--wait", "600"]);
        std::thread::sleep(Duration::from_millis(700));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let r = Run::from(child.wait_with_output().unwrap());
        assert_eq!(r.code, 128 + number, "{signal}: {}", r.stderr);
        let records = r.records();
        let Some(Record::Error(e)) = records.last() else {
            panic!("{signal}: no error record: {}", r.stdout)
        };
        assert_eq!((e.tool.as_str(), i32::from(e.code)), ("bk-prune", 128 + number));
        assert!(
            e.message.contains(&format!("interrupted by signal {number}")),
            "{}",
            e.message
        );
        assert!(r.stderr.contains(&e.message), "{}", r.stderr);
        // Downstream, that record fails the pipeline.
        scene.sb.run_with_stdin("bk-verify", &[], &r.stdout).code(1);
        assert!(scene.good.iter().all(|a| Path::new(&a.location).exists()));
    }
}

#[test]
fn a_panic_becomes_an_error_record() {
    let scene = Scene::new();
    let mut cmd = scene.sb.cmd("bk-ls", &[&scene.store]);
    cmd.env("BK_DEBUG_PANIC", "1");
    let r = run_within(&mut cmd, Duration::from_secs(30));
    assert_eq!(r.code, 70, "{}", r.stderr);
    let e = r.error();
    assert_eq!(e.code, 70);
    assert!(e.message.starts_with("internal error (a bug in bk"), "{}", e.message);
    scene
        .sb
        .run_with_stdin("bk-prune", &["--keep-last", "1"], &r.stdout)
        .code(1);
}

#[test]
fn no_input_in_records_mode_fails_but_a_store_runs_standalone() {
    let scene = Scene::new();
    let store2 = scene.sb.path("store2");
    let target = scene.sb.path("target");
    let begin_only = r#"{"bk":1,"type":"begin","tool":"bk-dump","pid":1}"#.to_string() + "\n";
    for stdin in ["", "\n", begin_only.as_str()] {
        for (tool, args) in [
            ("bk-prune", vec!["--keep-last", "1"]),
            ("bk-ship", vec!["--to", s(&store2)]),
            ("bk-verify", vec![]),
            ("bk-restore", vec!["--to", s(&target)]),
        ] {
            let r = scene.sb.run_with_stdin(tool, &args, stdin).code(1);
            let message = r.records().into_iter().find_map(|rec| match rec {
                Record::Error(e) => Some(e.message),
                _ => None,
            });
            let message = message.unwrap_or_else(|| panic!("{tool}: no error record: {}", r.stdout));
            assert!(
                message.contains("printed nothing") || message.contains("never ended"),
                "{tool} {stdin:?}: {message}"
            );
        }
    }
    // cron hands every job an empty stdin: given its store, bk-prune works.
    scene
        .sb
        .run_with_stdin("bk-prune", &[&scene.store, "--keep-last", "1"], "")
        .ok();
    assert!(!Path::new(&scene.good[0].location).exists() && Path::new(&scene.good[1].location).exists());
}

#[test]
fn records_of_unknown_type_pass_through() {
    let scene = Scene::new();
    let future = r#"{"bk":2,"type":"checkpoint","id":"x","nested":{"a":[1,2]}}"#;
    let artifact = Record::Artifact(scene.good[1].clone()).to_line();
    let input = format!("{future}\n{artifact}\n");
    let r = scene.sb.run_with_stdin("bk-prune", &["--keep-last", "1"], &input).ok();
    assert_eq!(r.lines()[..2], [future, artifact.as_str()]);
}

#[test]
fn secrets_given_by_mistake_are_never_printed() {
    let scene = Scene::new();
    let src = scene.sb.path("src");
    let key = "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX";
    let identity = scene.sb.path("identity.txt");
    fs::write(
        &identity,
        format!("# created: 2026-11-22\n# public key: age1xyz\n{key}\n"),
    )
    .unwrap();
    fs::set_permissions(&identity, fs::Permissions::from_mode(0o600)).unwrap();
    for args in [
        vec!["files", s(&src), "--to", &scene.store, "--encrypt-to", key],
        vec![
            "files",
            s(&src),
            "--to",
            &scene.store,
            "--recipients-file",
            s(&identity),
        ],
        vec![
            "files",
            s(&src),
            "--to",
            &scene.store,
            "--encrypt-to",
            &key.to_lowercase(),
        ],
    ] {
        let r = scene.sb.run("bk-dump", &args).code(64);
        let secret = &key["AGE-SECRET-KEY-".len()..];
        for text in [&r.stdout, &r.stderr] {
            assert!(!text.to_uppercase().contains(secret), "the key was printed: {text}");
        }
        assert!(r.error().message.contains("SECRET key"), "{}", r.stderr);
    }
}

#[test]
fn small_failures_have_the_right_code_and_say_what() {
    let scene = Scene::new();
    let src = scene.sb.path("src");
    let file = scene.sb.path("a-file");
    fs::write(&file, "x").unwrap();
    // A store path that is a regular file: the output cannot be created (73), at once.
    let started = Instant::now();
    let r = scene.sb.run("bk-dump", &["files", s(&src), "--to", s(&file)]).code(73);
    assert!(r.error().message.contains("not a directory"));
    let dumped = scene.sb.run("bk-dump", &["files", s(&src), "--to", &scene.store]).ok();
    let r = scene
        .sb
        .run_with_stdin("bk-ship", &["--to", s(&file)], &dumped.stdout)
        .code(73);
    assert!(r.error().message.contains("not a directory"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no retries of a permanent failure"
    );
    // Missing required arguments are named.
    let r = scene.sb.run("bk-dump", &["files", s(&src)]).code(64);
    assert!(r.error().message.contains("--to"), "{}", r.stderr);
    // Input that is not UTF-8: bad data, with its line.
    let mut cmd = scene.sb.cmd("bk-prune", &["--keep-last", "1"]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let artifact = Record::Artifact(scene.good[1].clone()).to_line();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        &[artifact.as_bytes(), b"\n{\"bk\":1,\"type\":\"x\xff\"}\n"].concat(),
    )
    .unwrap();
    drop(child.stdin.take());
    let r = Run::from(child.wait_with_output().unwrap()).code(65);
    assert!(r.error().message.starts_with("stdin line 2: not UTF-8"), "{}", r.stderr);
}

/// The pid of a tool started by the test's shell, found by its binary (every tool is the one
/// binary `bk`, told apart by the name it was run by) and working directory.
fn pid_of(tool: &str, cwd: &Path) -> Option<i32> {
    let exe = fs::canonicalize(bin("bk")).expect("the bk binary");
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
        let program = cmdline.split(|b| *b == 0).next()?;
        let same = fs::read_link(entry.path().join("exe")).ok()? == exe
            && Path::new(std::str::from_utf8(program).ok()?).file_name()? == tool
            && fs::read_link(entry.path().join("cwd")).ok()? == cwd;
        same.then_some(pid)
    })
}

/// Whether a process has a file open whose path contains `part`.
fn has_open(pid: i32, part: &str) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|p| p.to_string_lossy().contains(part)))
    })
}

fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A source directory with 24 MiB of incompressible bytes, so that every tool is busy for a
/// while with it.
fn noisy_source(sb: &Sandbox) -> PathBuf {
    let src = sb.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("noise"), noise(24 << 20)).unwrap();
    src
}

/// `bk-dump | bk-ship | bk-prune | bk-verify` under /bin/sh, as cron runs it (no pipefail,
/// stdin empty): whichever tool is killed, by SIGTERM or SIGKILL, at the point where it is
/// busy, the pipeline's status is non-zero, no file outside the stores changes, and no
/// partial file is published under a final name.
#[test]
fn killed_pipelines_end_non_zero_under_sh() {
    use nix::sys::signal::{kill, Signal};
    for victim in ["bk-dump", "bk-ship", "bk-prune", "bk-verify"] {
        for signal in [Signal::SIGTERM, Signal::SIGKILL] {
            let sb = Sandbox::new();
            let src = noisy_source(&sb);
            let (store, store2) = (sb.store(), sb.path("store2").display().to_string());
            // An older backup for bk-prune to consider.
            write_backup(&store2, "job", "20200101T000000Z");
            let before = tree_digest(&src);
            let mut held = None;
            let script = format!(
                "{dump} files {src} --name job --to {store} | {ship} --to {store2} | {prune} --keep-last 1 --wait 600 | {verify} >/dev/null; echo $? > status",
                dump = s(&bin("bk-dump")),
                ship = s(&bin("bk-ship")),
                prune = s(&bin("bk-prune")),
                verify = s(&bin("bk-verify")),
                src = s(&src),
            );
            let mut shell = Command::new("/bin/sh")
                .args(["-c", &script])
                .current_dir(sb.root())
                .env("BK_LOCK_DIR", sb.path("locks"))
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let case = format!("{victim} {signal}");
            let limit = Duration::from_secs(120);
            // The point where the victim is busy.
            let mut pid = None;
            wait_for(&format!("{case}: busy"), limit, || {
                // bk-dump takes the name's lock too: it is held once the dump is done and
                // while bk-ship copies, so that bk-prune waits for it.
                let dumped = files_below(Path::new(&store))
                    .iter()
                    .any(|p| p.extension().is_some_and(|e| e == "json"));
                if victim == "bk-prune" && held.is_none() && dumped {
                    held = Some(HeldLock::new(&sb, "job"));
                }
                pid = pid_of(victim, sb.root());
                pid.is_some_and(|p| match victim {
                    "bk-dump" => has_open(p, "/store/job/.job."),
                    "bk-ship" => has_open(p, "/store2/job/.job."),
                    // Waiting for the lock the test holds.
                    "bk-prune" => has_open(p, "/locks/job.lock"),
                    _ => has_open(p, "/store2/job/job.") || has_open(p, "/store/job/job."),
                })
            });
            kill(nix::unistd::Pid::from_raw(pid.unwrap()), signal).unwrap();
            drop(held);
            let deadline = Instant::now() + limit;
            while shell.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = shell.kill();
                    panic!("{case}: the pipeline did not end");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let stderr = std::io::read_to_string(shell.stderr.take().unwrap()).unwrap();
            let status = fs::read_to_string(sb.path("status")).unwrap();
            assert_ne!(status.trim(), "0", "{case}: the pipeline ended 0\n{stderr}");
            assert_eq!(tree_digest(&src), before, "{case}: the source changed");
            // Only manifests, the artifacts they name, and hidden temporary files.
            for store in [&store, &store2] {
                if !Path::new(store).exists() {
                    continue;
                }
                let listed = sb.run("bk-ls", &[store]);
                assert!(
                    !listed.stderr.contains("no manifest") && listed.code == 0,
                    "{case}: {store}: {}",
                    listed.stderr
                );
            }
            if signal == Signal::SIGTERM {
                let temps: Vec<PathBuf> = [&store, &store2]
                    .iter()
                    .flat_map(|s| files_below(Path::new(s)))
                    .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp."))
                    .collect();
                assert!(temps.is_empty(), "{case}: SIGTERM leaves no temporary file: {temps:?}");
            }
        }
    }
}

/// A file in /etc/cron.d for as long as it lives.
struct CronFile(PathBuf);

impl Drop for CronFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The real cron daemon starts a `bk-dump | bk-prune` job; the test kills bk-dump with
/// SIGKILL mid-dump. cron's job must end non-zero, and bk-prune must have seen why.
#[test]
fn a_job_started_by_cron_fails_when_its_dump_is_killed() {
    if !bk_tests::have_root() {
        return;
    }
    let sb = Sandbox::new();
    let src = noisy_source(&sb);
    let store = sb.store();
    write_backup(&store, "job", "20200101T000000Z");
    // cron runs at most one daemon; start one unless it runs already.
    let running = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|e| fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "cron"));
    let mut daemon = (!running).then(|| Command::new("/usr/sbin/cron").arg("-f").spawn().expect("cron -f"));
    let cron_d = CronFile(PathBuf::from(format!("/etc/cron.d/bk-hostile-{}", std::process::id())));
    fs::write(
        &cron_d.0,
        format!(
            "SHELL=/bin/sh\nPATH=/usr/bin:/bin\nMAILTO=\"\"\nBK_LOCK_DIR={locks}\n\
             * * * * * root cd {root} && {dump} files {src} --name job --to {store} | {prune} --keep-last 1 > out 2> err; echo $? > status\n",
            locks = s(&sb.path("locks")),
            root = s(sb.root()),
            dump = s(&bin("bk-dump")),
            prune = s(&bin("bk-prune")),
            src = s(&src),
        ),
    )
    .unwrap();
    fs::set_permissions(&cron_d.0, fs::Permissions::from_mode(0o644)).unwrap();
    let mut pid = None;
    wait_for(
        "cron to start the job and bk-dump to be busy",
        Duration::from_secs(150),
        || {
            pid = pid_of("bk-dump", sb.root());
            pid.is_some_and(|p| has_open(p, "/store/job/.job."))
        },
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid.unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the job to end", Duration::from_secs(120), || {
        sb.path("status").exists()
    });
    drop(cron_d);
    if let Some(d) = daemon.as_mut() {
        let _ = d.kill();
        let _ = d.wait();
    }
    std::thread::sleep(Duration::from_millis(100)); // the status line is written
    let status = fs::read_to_string(sb.path("status")).unwrap();
    assert_ne!(status.trim(), "0", "cron's job ended 0");
    let out = fs::read_to_string(sb.path("out")).unwrap();
    assert!(out.contains("began but never ended"), "{out}");
    assert!(
        Path::new(&store).join("job").read_dir().unwrap().count() == 3,
        "nothing pruned, the temporary file left"
    );
}
