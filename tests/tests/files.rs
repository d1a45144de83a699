//! The files engine through the real binaries: bk-dump files, bk-ls and bk-restore, and the
//! standard tools (tar, zstd, gzip, age) that must be able to read what bk writes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{chown, lchown, symlink, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bk_core::codec::{Compression, Encryption};
use bk_core::record::{Artifact, Record};
use bk_tests::{files_below, have_root, run_cmd, tree_digest, Run, Sandbox, AS_NOBODY};
use filetime::FileTime;
use nix::sys::stat::Mode;

const NOBODY: u32 = 65534;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test paths")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    fs::File::open("/dev/urandom").unwrap().read_exact(&mut data).unwrap();
    data
}

/// Writes a file and gives it exactly `mode` (setuid included), whatever the umask.
fn write_mode(path: &Path, content: &[u8], mode: u32) {
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mkdir_mode(path: &Path, mode: u32) {
    fs::create_dir_all(path).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Gives everything below `dir` a distinct mtime in the past (2001 on), children before
/// their directory so that no later change touches a directory's mtime.
fn set_past_mtimes(dir: &Path, next: &mut i64) {
    let mut children: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    children.sort();
    for child in children {
        let meta = fs::symlink_metadata(&child).unwrap();
        if meta.is_dir() {
            set_past_mtimes(&child, next);
        }
        if !meta.file_type().is_symlink() {
            // Not set_file_mtime, which opens the file (and waits forever on a FIFO).
            let mtime = FileTime::from_unix_time(*next, 0);
            filetime::set_symlink_file_times(&child, FileTime::from_last_access_time(&meta), mtime).unwrap();
            *next += 3607;
        }
    }
}

/// Where bk-restore puts a tree dumped from `src`: TARGET/<src without its leading />.
fn restored_root(target: &Path, src: &Path) -> PathBuf {
    target.join(src.strip_prefix("/").unwrap())
}

/// Compares two tree digests, naming only what differs.
fn assert_same_tree(expected: &BTreeMap<String, String>, actual: &BTreeMap<String, String>, what: &str) {
    let mut diffs = Vec::new();
    for (path, want) in expected {
        match actual.get(path) {
            None => diffs.push(format!("missing {path}: {want}")),
            Some(got) if got != want => diffs.push(format!("differs {path}:\n    want {want}\n    got  {got}")),
            _ => {}
        }
    }
    for (path, got) in actual {
        if !expected.contains_key(path) {
            diffs.push(format!("extra {path}: {got}"));
        }
    }
    assert!(diffs.is_empty(), "{what}: the trees differ:\n  {}", diffs.join("\n  "));
}

fn rel_paths(root: &Path) -> BTreeSet<String> {
    tree_digest(root).into_keys().collect()
}

/// A tree with everything a backup of files must keep. Returns nothing: `tree_digest` of
/// `src` is the reference, and its size + 1 (`src` itself) the number of tar entries.
fn rich_tree(src: &Path) {
    let root = is_root();
    fs::create_dir_all(src).unwrap();
    let p = |rel: &str| src.join(rel);
    write_mode(&p("plain.txt"), b"hello, world\n", 0o644);
    write_mode(&p("secret.key"), b"not for others\n", 0o600);
    write_mode(&p("run.sh"), b"#!/bin/sh\necho hi\n", 0o755);
    write_mode(&p("setuid-tool"), b"\x7fELF pretend\n", 0o4755);
    write_mode(&p("empty"), b"", 0o644);
    write_mode(&p("random.bin"), &random_bytes(5 << 20), 0o640);
    if root {
        write_mode(&p("nobodys.txt"), b"owned by nobody\n", 0o640);
        chown(p("nobodys.txt"), Some(NOBODY), Some(NOBODY)).unwrap();
        mkdir_mode(&p("nobodys-dir"), 0o750);
        write_mode(&p("nobodys-dir/inside"), b"x\n", 0o600);
        chown(p("nobodys-dir/inside"), Some(NOBODY), Some(NOBODY)).unwrap();
        chown(p("nobodys-dir"), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    fs::create_dir(p("links")).unwrap();
    symlink("../plain.txt", p("links/relative")).unwrap();
    symlink("/etc/hostname", p("links/absolute")).unwrap();
    symlink("no/such/target", p("links/dangling")).unwrap();
    // A target longer than a tar header's 100 bytes.
    symlink(format!("{}/far-away", "t".repeat(120)), p("links/long-target")).unwrap();
    if root {
        symlink("relative", p("links/nobodys-link")).unwrap();
        lchown(p("links/nobodys-link"), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    fs::create_dir(p("hard")).unwrap();
    write_mode(&p("hard/first"), b"one inode, three names\n", 0o644);
    fs::hard_link(p("hard/first"), p("hard/second")).unwrap();
    fs::hard_link(p("hard/first"), p("hard-third")).unwrap();
    mkdir_mode(&p("empty-dir"), 0o750);
    fs::create_dir_all(p("empty-parent/empty-child")).unwrap();
    fs::create_dir(p("read-only")).unwrap();
    write_mode(&p("read-only/inside.txt"), b"in a 0555 directory\n", 0o444);
    fs::set_permissions(p("read-only"), fs::Permissions::from_mode(0o555)).unwrap();
    nix::unistd::mkfifo(&p("fifo"), Mode::from_bits_truncate(0o640)).unwrap();
    fs::set_permissions(p("fifo"), fs::Permissions::from_mode(0o640)).unwrap();
    let long_name = format!("long-{}.txt", "n".repeat(140));
    assert!(long_name.len() > 100);
    write_mode(&p(&long_name), b"a long name\n", 0o644);
    let mut deep = p("deep");
    for i in 0..6 {
        deep.push(format!("{i}-{}", "d".repeat(48)));
    }
    fs::create_dir_all(&deep).unwrap();
    let deep_file = deep.join("bottom.txt");
    assert!(deep_file.strip_prefix(src).unwrap().as_os_str().len() > 255);
    write_mode(&deep_file, b"deep down\n", 0o644);
    fs::create_dir(p("répertoire-日本語")).unwrap();
    write_mode(&p("répertoire-日本語/файл-ü.txt"), "ünïcödé\n".as_bytes(), 0o644);
    let mut next = 1_000_000_000;
    set_past_mtimes(src, &mut next);
}

/// A few plain files in a couple of directories.
fn small_tree(src: &Path) {
    fs::create_dir_all(src.join("sub/deeper")).unwrap();
    write_mode(&src.join("a.txt"), b"alpha\n", 0o644);
    write_mode(&src.join("sub/b.txt"), b"bravo\n", 0o600);
    write_mode(&src.join("sub/deeper/c.bin"), &random_bytes(200_000), 0o644);
    set_past_mtimes(src, &mut 1_500_000_000);
}

/// Mounts a tmpfs for a test, and unmounts it however the test ends.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Kills the children of a test however it ends (one may be stopped with SIGSTOP).
struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn dump_with_umask_000(sb: &Sandbox, args: &[&str]) -> Run {
    let mut cmd = sb.cmd("bk-dump", args);
    // SAFETY: umask(2) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::stat::umask(Mode::empty());
            Ok(())
        });
    }
    run_cmd(cmd, "")
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn bash(script: &str, args: &[&str]) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail; {script}"))
        .arg("bash")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} {args:?} failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The artifact file of a local store's artifact record.
fn artifact_path(a: &Artifact) -> PathBuf {
    PathBuf::from(&a.location)
}

fn manifest_path(sb: &Sandbox, a: &Artifact) -> PathBuf {
    sb.path("store").join(&a.name).join(format!("{}.json", a.id))
}

#[test]
fn round_trip_of_a_rich_tree() {
    let sb = Sandbox::new();
    let src = sb.path("src");
    rich_tree(&src);
    let before = tree_digest(&src);
    let store = sb.store();

    let run = dump_with_umask_000(&sb, &["files", s(&src), "--name", "rich", "--to", &store]).ok();
    let a = run.artifact();
    assert!(run.stderr.is_empty(), "stderr: {}", run.stderr);
    assert!(a.id.starts_with("rich.") && a.name == "rich", "{a:?}");
    assert_eq!(
        (a.engine.as_str(), a.format.as_str(), a.compression),
        ("files", "tar", Compression::Zstd)
    );
    assert_eq!(a.file, format!("{}.tar.zst", a.id));
    assert_eq!(a.encryption, None);
    assert_eq!(a.source.paths, vec![s(&src).to_string()]);
    assert_eq!(
        a.counts,
        BTreeMap::from([("entries".to_string(), before.len() as u64 + 1)]),
        "every entry and the root"
    );
    assert!(a.content_bytes > 5 << 20 && a.bytes > 0);

    // The store: 0700 directories, 0600 files, even under umask 000; only these two files.
    let artifact = artifact_path(&a);
    let manifest = manifest_path(&sb, &a);
    assert_eq!(artifact, sb.path("store/rich").join(&a.file));
    assert_eq!(files_below(&sb.path("store")), {
        let mut v = vec![artifact.clone(), manifest.clone()];
        v.sort();
        v
    });
    for dir in [sb.path("store"), sb.path("store/rich")] {
        assert_eq!(mode_of(&dir), 0o700, "{}", dir.display());
    }
    for file in [&artifact, &manifest] {
        assert_eq!(mode_of(file), 0o600, "{}", file.display());
    }
    assert_eq!(fs::metadata(&artifact).unwrap().len(), a.bytes);
    assert_same_tree(&before, &tree_digest(&src), "the source after the dump");

    // bk-ls STORE --latest | bk-restore --to T1
    let ls = sb.run("bk-ls", &[&store, "--latest"]).ok();
    assert!(ls.stderr.is_empty(), "{}", ls.stderr);
    assert_eq!(ls.artifact(), a);
    let t1 = sb.path("restored-from-stdin");
    let r = sb.run_with_stdin("bk-restore", &["--to", s(&t1)], &ls.stdout).ok();
    let restored = r.restored();
    assert_eq!(
        (restored.id.as_str(), restored.name.as_str(), restored.engine.as_str()),
        (a.id.as_str(), "rich", "files")
    );
    assert_eq!(restored.counts, a.counts);
    assert!(restored.complete);
    assert_eq!(restored.target.get("path").and_then(|v| v.as_str()), Some(s(&t1)));
    assert_eq!(r.records().len(), 1, "only the restored record: {}", r.stdout);
    let top = src
        .strip_prefix("/")
        .unwrap()
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_owned();
    let names: Vec<_> = fs::read_dir(&t1).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![top], "no staging directory left behind");
    let back = restored_root(&t1, &src);
    assert_same_tree(&before, &tree_digest(&back), "restored from stdin");
    let ino = |rel: &str| fs::metadata(back.join(rel)).unwrap().ino();
    assert_eq!(
        ino("hard/first"),
        ino("hard/second"),
        "hard links restored as one inode"
    );
    assert_eq!(ino("hard/first"), ino("hard-third"));
    assert_eq!(fs::metadata(back.join("hard/first")).unwrap().nlink(), 3);

    // bk-restore --from STORE --name N --to T2
    let t2 = sb.path("restored-from-store");
    let r = sb
        .run("bk-restore", &["--from", &store, "--name", "rich", "--to", s(&t2)])
        .ok();
    assert_eq!(r.restored().counts, a.counts);
    assert_same_tree(&before, &tree_digest(&restored_root(&t2, &src)), "restored with --from");
}

#[test]
fn standard_tools_read_every_compression() {
    let sb = Sandbox::new();
    let src = sb.path("src");
    rich_tree(&src);
    let before = tree_digest(&src);
    for (compress, suffix, script) in [
        ("zstd", ".tar.zst", r#"zstd -dc "$1" | tar -xpf - -C "$2""#),
        ("gzip", ".tar.gz", r#"gzip -dc "$1" | tar -xpf - -C "$2""#),
        ("none", ".tar", r#"tar -xpf "$1" -C "$2""#),
    ] {
        let a = sb.dump(&[
            "files",
            s(&src),
            "--name",
            &format!("compat-{compress}"),
            "--compress",
            compress,
        ]);
        assert_eq!(a.file, format!("{}{suffix}", a.id));
        let out = sb.path(&format!("extracted-{compress}"));
        fs::create_dir(&out).unwrap();
        bash(script, &[&a.location, s(&out)]);
        assert_same_tree(
            &before,
            &tree_digest(&restored_root(&out, &src)),
            &format!("tar of {compress}"),
        );
    }
}

/// Makes an age key pair with age-keygen; returns the public key.
fn age_keygen(path: &Path) -> String {
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(path)
        .output()
        .expect("age-keygen (apt install age)");
    assert!(
        out.status.success(),
        "age-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    let text = fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .expect("a public key comment")
        .to_string()
}

#[test]
fn age_encryption() {
    let sb = Sandbox::new();
    let src = sb.path("src");
    small_tree(&src);
    let before = tree_digest(&src);
    let store = sb.store();
    let key = sb.path("key.txt");
    let public = age_keygen(&key);

    let a = sb.dump(&["files", s(&src), "--name", "sealed", "--encrypt-to", &public]);
    assert!(a.file.ends_with(".tar.zst.age"), "{}", a.file);
    assert_eq!(
        a.encryption,
        Some(Encryption {
            scheme: "age".into(),
            recipients: vec![public.clone()]
        })
    );
    let stored = fs::read(&a.location).unwrap();
    assert!(stored.starts_with(b"age-encryption.org/v1\n"), "an age file");

    // Standard tools alone.
    let out = sb.path("by-hand");
    fs::create_dir(&out).unwrap();
    bash(
        r#"age -d -i "$3" "$1" | zstd -dc | tar -xpf - -C "$2""#,
        &[&a.location, s(&out), s(&key)],
    );
    assert_same_tree(
        &before,
        &tree_digest(&restored_root(&out, &src)),
        "age -d | zstd -dc | tar",
    );

    // bk-restore with the identity.
    let target = sb.path("restored");
    let from = ["--from", store.as_str(), "--name", "sealed", "--to", s(&target)];
    let r = sb
        .run("bk-restore", &[&from[..], &["--identity", s(&key)]].concat())
        .ok();
    assert!(r.restored().complete);
    assert_same_tree(
        &before,
        &tree_digest(&restored_root(&target, &src)),
        "bk-restore --identity",
    );
    fs::remove_dir_all(&target).unwrap();

    // No identity: a usage error that says what to give.
    let r = sb.run("bk-restore", &from).code(64);
    assert!(r.error().message.contains("--identity"), "{}", r.stderr);
    assert!(!target.exists());

    // A wrong identity: bad data (65), named as such, and nothing written.
    let other = sb.path("other.txt");
    let other_public = age_keygen(&other);
    let r = sb
        .run("bk-restore", &[&from[..], &["--identity", s(&other)]].concat())
        .code(65);
    let e = r.error();
    assert!(
        e.message.contains("no identity given can decrypt") && e.message.contains(&a.file),
        "{}",
        e.message
    );
    assert_eq!(e.name.as_deref(), Some("sealed"));
    assert!(!target.exists(), "nothing at the target, not even the directory");

    // An identity file others may read is refused (78), before anything is done.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let r = sb
        .run("bk-restore", &[&from[..], &["--identity", s(&key)]].concat())
        .code(78);
    let e = r.error();
    assert!(
        e.message.contains("chmod 600") && e.message.contains(s(&key)),
        "{}",
        e.message
    );
    assert!(!target.exists());
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();

    // A recipients file: comments and blank lines ignored, every key can decrypt.
    let recipients = sb.path("recipients.txt");
    fs::write(
        &recipients,
        format!("# the backup keys\n{public}\n\n  {other_public}  \n"),
    )
    .unwrap();
    let b = sb.dump(&[
        "files",
        s(&src),
        "--name",
        "sealed-two",
        "--recipients-file",
        s(&recipients),
    ]);
    assert!(b.file.ends_with(".tar.zst.age"), "{}", b.file);
    assert_eq!(
        b.encryption.as_ref().unwrap().recipients,
        vec![public.clone(), other_public]
    );
    for (i, identity) in [&key, &other].into_iter().enumerate() {
        let t = sb.path(&format!("two-{i}"));
        sb.run(
            "bk-restore",
            &[
                "--from",
                &store,
                "--name",
                "sealed-two",
                "--to",
                s(&t),
                "--identity",
                s(identity),
            ],
        )
        .ok();
        assert_same_tree(&before, &tree_digest(&restored_root(&t, &src)), "recipients file");
    }
}

/// keep.txt, skip.log, sub/keep2.txt, sub/skip2.log, cache/c.txt, cache/deeper/d.txt
fn selection_tree(src: &Path) {
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::create_dir_all(src.join("cache/deeper")).unwrap();
    for f in [
        "keep.txt",
        "skip.log",
        "sub/keep2.txt",
        "sub/skip2.log",
        "cache/c.txt",
        "cache/deeper/d.txt",
    ] {
        fs::write(src.join(f), f).unwrap();
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn exclude_include_and_partial_restore() {
    let sb = Sandbox::new();
    let src = sb.path("src");
    selection_tree(&src);
    let store = sb.store();
    let restores = std::cell::Cell::new(0);
    let restore = |name: &str, extra: &[&str]| -> (PathBuf, Run) {
        restores.set(restores.get() + 1);
        let t = sb.path(&format!("restored-{name}-{}", restores.get()));
        let r = sb
            .run(
                "bk-restore",
                &[&["--from", store.as_str(), "--name", name, "--to", s(&t)][..], extra].concat(),
            )
            .ok();
        (restored_root(&t, &src), r)
    };

    // --exclude: a name glob anywhere, and a whole path.
    let cache = format!("{}/cache", s(&src));
    let a = sb.dump(&[
        "files",
        s(&src),
        "--name",
        "excl",
        "--exclude",
        "*.log",
        "--exclude",
        &cache,
    ]);
    assert_eq!(a.counts["entries"], 4, "src, keep.txt, sub, sub/keep2.txt");
    let (back, _) = restore("excl", &[]);
    assert_eq!(rel_paths(&back), set(&["keep.txt", "sub", "sub/keep2.txt"]));

    // --include: only matching files, every directory.
    let a = sb.dump(&["files", s(&src), "--name", "incl", "--include", "*.txt"]);
    let with_dirs = set(&[
        "cache",
        "cache/c.txt",
        "cache/deeper",
        "cache/deeper/d.txt",
        "keep.txt",
        "sub",
        "sub/keep2.txt",
    ]);
    assert_eq!(a.counts["entries"], with_dirs.len() as u64 + 1);
    let (back, _) = restore("incl", &[]);
    assert_eq!(rel_paths(&back), with_dirs);

    // A partial restore of a full backup.
    let full = sb.dump(&["files", s(&src), "--name", "full"]);
    assert_eq!(full.counts["entries"], 10);
    let (back, r) = restore("full", &["--include", "*.txt"]);
    let rec = r.restored();
    assert!(!rec.complete, "a partial restore says so");
    assert_eq!(rec.counts["entries"], with_dirs.len() as u64 + 1);
    assert_eq!(rel_paths(&back), with_dirs);
    let sub_glob = format!("{}/sub/*", s(&src));
    let (back, r) = restore("full", &["--include", &sub_glob]);
    assert!(!r.restored().complete);
    assert_eq!(
        rel_paths(&back),
        set(&["cache", "cache/deeper", "sub", "sub/keep2.txt", "sub/skip2.log"])
    );
    assert_eq!(fs::read_to_string(back.join("sub/skip2.log")).unwrap(), "sub/skip2.log");
}

#[test]
fn one_file_system() {
    if !have_root("one_file_system") {
        return;
    }
    let sb = Sandbox::new();
    let src = sb.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("here.txt"), "on the root filesystem").unwrap();
    let _mount = Tmpfs::mount(&src.join("mnt"), "1m");
    fs::write(src.join("mnt/there.txt"), "on another filesystem").unwrap();
    let store = sb.store();

    let a = sb.dump(&["files", s(&src), "--name", "onefs", "--one-file-system"]);
    assert_eq!(a.counts["entries"], 3, "src, here.txt and the mount point itself");
    let t = sb.path("restored-onefs");
    sb.run("bk-restore", &["--from", &store, "--name", "onefs", "--to", s(&t)])
        .ok();
    assert_eq!(rel_paths(&restored_root(&t, &src)), set(&["here.txt", "mnt"]));

    let a = sb.dump(&["files", s(&src), "--name", "allfs"]);
    assert_eq!(a.counts["entries"], 4);
    let t = sb.path("restored-allfs");
    sb.run("bk-restore", &["--from", &store, "--name", "allfs", "--to", s(&t)])
        .ok();
    assert_eq!(
        rel_paths(&restored_root(&t, &src)),
        set(&["here.txt", "mnt", "mnt/there.txt"])
    );
}

#[test]
fn restore_refuses_a_non_empty_target_unless_replace() {
    let sb = Sandbox::new();
    let src = sb.path("src");
    small_tree(&src);
    let before = tree_digest(&src);
    let store = sb.store();
    sb.dump(&["files", s(&src), "--name", "rep"]);
    let target = sb.path("target");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("unrelated.txt"), "mine").unwrap();
    let args = ["--from", store.as_str(), "--name", "rep", "--to", s(&target)];

    let r = sb.run("bk-restore", &args).code(73);
    let e = r.error();
    assert!(
        e.message.contains("not empty") && e.message.contains("--replace"),
        "{}",
        e.message
    );
    assert_eq!(rel_paths(&target), set(&["unrelated.txt"]), "the target is untouched");

    // A file in the way is overwritten; what the backup does not hold stays, and so do the
    // attributes of directories above the restored tree.
    let back = restored_root(&target, &src);
    fs::create_dir_all(back.join("sub")).unwrap();
    fs::write(back.join("a.txt"), "old content").unwrap();
    fs::write(back.join("sub/local-only.txt"), "keep me").unwrap();
    let top = target.join(src.strip_prefix("/").unwrap().components().next().unwrap());
    fs::set_permissions(&top, fs::Permissions::from_mode(0o751)).unwrap();
    let r = sb.run("bk-restore", &[&args[..], &["--replace"]].concat()).ok();
    assert!(r.restored().complete);
    assert_eq!(fs::read_to_string(target.join("unrelated.txt")).unwrap(), "mine");
    assert_eq!(fs::read_to_string(back.join("a.txt")).unwrap(), "alpha\n");
    assert_eq!(
        mode_of(&top),
        0o751,
        "a directory that is not in the backup keeps its mode"
    );
    let mut after = tree_digest(&back);
    assert!(after.remove("sub/local-only.txt").is_some());
    // sub was merged: its mtime is the archived one even though a file was added before.
    assert_same_tree(&before, &after, "restored with --replace");
}

#[test]
fn corrupt_artifacts_are_refused_with_nothing_written() {
    let sb = Sandbox::new();
    let src = sb.path("src");
    small_tree(&src);
    let store = sb.store();
    let target = sb.path("target");

    // One byte flipped in the middle of the stored bytes.
    let a = sb.dump(&["files", s(&src), "--name", "flipped"]);
    let mut bytes = fs::read(&a.location).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&a.location, &bytes).unwrap();
    let r = sb
        .run(
            "bk-restore",
            &["--from", &store, "--name", "flipped", "--to", s(&target)],
        )
        .code(65);
    let e = r.error();
    assert!(e.message.contains(&a.file), "{}", e.message);
    assert!(!target.exists(), "nothing at the target");

    // A record whose sha256 is not the stored bytes'.
    let mut b = sb.dump(&["files", s(&src), "--name", "badsum"]);
    b.sha256 = "0".repeat(64);
    let line = Record::Artifact(b.clone()).to_line();
    let r = sb
        .run_with_stdin("bk-restore", &["--to", s(&target)], &format!("{line}\n"))
        .code(65);
    assert!(r.error().message.contains("sha256 mismatch"), "{}", r.stderr);
    assert!(!target.exists());

    // A manifest whose count was changed.
    let c = sb.dump(&["files", s(&src), "--name", "badcount"]);
    let manifest = manifest_path(&sb, &c);
    let mut value: serde_json::Value = serde_json::from_str(&fs::read_to_string(&manifest).unwrap()).unwrap();
    value["counts"]["entries"] = (c.counts["entries"] + 1).into();
    fs::write(&manifest, format!("{value}\n")).unwrap();
    let r = sb
        .run(
            "bk-restore",
            &["--from", &store, "--name", "badcount", "--to", s(&target)],
        )
        .code(65);
    let e = r.error();
    assert!(
        e.message.contains("entries") && e.message.contains("manifest"),
        "{}",
        e.message
    );
    assert!(!target.exists());

    // The same into an existing empty directory: it stays, empty.
    fs::create_dir(&target).unwrap();
    sb.run(
        "bk-restore",
        &["--from", &store, "--name", "badcount", "--to", s(&target)],
    )
    .code(65);
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0, "the target stays empty");
}

/// A failed dump leaves an error record, the code, and nothing in the store but `kept`.
fn assert_failed_cleanly(run: &Run, code: i32, store: &Path, kept: &[PathBuf]) -> String {
    let e = run.error();
    assert_eq!(run.code, code, "{}", run.stderr);
    assert_eq!(run.records().len(), 1, "nothing but the error record: {}", run.stdout);
    let mut kept = kept.to_vec();
    kept.sort();
    assert_eq!(files_below(store), kept, "no manifest and no temporary file left");
    e.message
}

#[test]
fn dump_of_a_missing_source_is_66() {
    let sb = Sandbox::new();
    let missing = sb.path("no-such-dir");
    let r = sb.run(
        "bk-dump",
        &["files", s(&missing), "--name", "missing", "--to", &sb.store()],
    );
    let message = assert_failed_cleanly(&r, 66, &sb.path("store"), &[]);
    assert!(message.contains(s(&missing)), "{message}");
}

/// Lets nobody reach the sandbox and own its lock directory and `dirs`.
fn open_sandbox_to_nobody(sb: &Sandbox, dirs: &[&str]) {
    fs::set_permissions(sb.root(), fs::Permissions::from_mode(0o755)).unwrap();
    for d in dirs.iter().chain(&["locks"]) {
        let dir = sb.path(d);
        mkdir_mode(&dir, 0o700);
        chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    }
}

#[test]
fn dump_of_an_unreadable_source_is_77() {
    if !have_root("dump_of_an_unreadable_source_is_77") {
        return;
    }
    let sb = Sandbox::new();
    open_sandbox_to_nobody(&sb, &["store"]);
    let private = sb.path("private");
    mkdir_mode(&private, 0o700);
    fs::write(private.join("secret"), "root only").unwrap();
    let store = sb.store();
    let cmd = sb.cmd_via(
        &AS_NOBODY,
        "bk-dump",
        &["files", s(&private), "--name", "private", "--to", &store],
    );
    let r = run_cmd(cmd, "");
    let message = assert_failed_cleanly(&r, 77, &sb.path("store"), &[]);
    assert!(
        message.contains("Permission denied") && message.contains(s(&private)),
        "{message}"
    );
}

#[test]
fn dump_into_an_unwritable_store_is_73() {
    if !have_root("dump_into_an_unwritable_store_is_73") {
        return;
    }
    let sb = Sandbox::new();
    open_sandbox_to_nobody(&sb, &[]);
    let src = sb.path("public");
    mkdir_mode(&src, 0o755);
    write_mode(&src.join("readable.txt"), b"anyone may read this", 0o644);
    let root_only = sb.path("root-only");
    mkdir_mode(&root_only, 0o755);
    let store = root_only.join("store");
    let cmd = sb.cmd_via(
        &AS_NOBODY,
        "bk-dump",
        &["files", s(&src), "--name", "public", "--to", s(&store)],
    );
    let r = run_cmd(cmd, "");
    let message = assert_failed_cleanly(&r, 73, &root_only, &[]);
    assert!(message.contains("cannot create"), "{message}");
    assert!(!store.exists());
}

#[test]
fn disk_full_keeps_older_backups_and_leaves_no_partial_file() {
    if !have_root("disk_full_keeps_older_backups_and_leaves_no_partial_file") {
        return;
    }
    let sb = Sandbox::new();
    let small = sb.path("small");
    let _mount = Tmpfs::mount(&small, "2m");
    let store = small.join("store");
    let little = sb.path("little");
    small_tree(&little);
    let first = sb
        .run("bk-dump", &["files", s(&little), "--name", "full", "--to", s(&store)])
        .ok()
        .artifact();
    let first_manifest = store.join("full").join(format!("{}.json", first.id));
    let kept = vec![PathBuf::from(&first.location), first_manifest.clone()];
    let snapshot: Vec<Vec<u8>> = kept.iter().map(|p| fs::read(p).unwrap()).collect();

    let big = sb.path("big");
    fs::create_dir(&big).unwrap();
    fs::write(big.join("random.bin"), random_bytes(10 << 20)).unwrap();
    let r = sb.run(
        "bk-dump",
        &[
            "files",
            s(&big),
            "--name",
            "full",
            "--compress",
            "none",
            "--to",
            s(&store),
        ],
    );
    let message = assert_failed_cleanly(&r, 74, &store, &kept);
    assert!(message.contains("No space left on device"), "{message}");
    let now: Vec<Vec<u8>> = kept.iter().map(|p| fs::read(p).unwrap()).collect();
    assert!(now == snapshot, "the first backup is untouched");
    let ls = sb.run("bk-ls", &[s(&store)]).ok();
    assert_eq!(ls.artifacts(), vec![first]);
    assert!(ls.stderr.is_empty(), "no leftovers: {}", ls.stderr);
}

#[test]
fn a_file_that_vanishes_during_the_dump_fails_it() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let sb = Sandbox::new();
    let src = sb.path("many");
    fs::create_dir(&src).unwrap();
    // Incompressible, so that the dump takes a while after it opens the first file.
    let noise = random_bytes(64 << 10);
    for i in 0..2000usize {
        let mut data = noise.clone();
        data[..8].copy_from_slice(&(i as u64).to_le_bytes());
        data.rotate_left(i * 31 % noise.len());
        fs::write(src.join(format!("f{i:04}")), data).unwrap();
    }
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    inotify.add_watch(&src, AddWatchFlags::IN_OPEN).unwrap();
    let store = sb.store();
    let mut reaper = Reaper(vec![sb.spawn(
        "bk-dump",
        &["files", s(&src), "--name", "many", "--compress", "none", "--to", &store],
    )]);

    // bk-dump reads the whole directory, then archives in sorted order: once it opens f0000
    // it has listed f1999, which it will not find.
    let deadline = Instant::now() + Duration::from_secs(120);
    'watch: loop {
        match inotify.read_events() {
            Ok(events) => {
                if events
                    .iter()
                    .any(|e| e.name.as_deref() == Some(std::ffi::OsStr::new("f0000")))
                {
                    fs::remove_file(src.join("f1999")).unwrap();
                    break 'watch;
                }
            }
            Err(nix::errno::Errno::EAGAIN) => {
                if let Some(status) = reaper.0[0].try_wait().unwrap() {
                    panic!("bk-dump ended ({status}) before it opened f0000");
                }
                assert!(Instant::now() < deadline, "bk-dump never opened f0000");
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("inotify: {e}"),
        }
    }
    let child = reaper.0.pop().unwrap();
    let r = Run::from(child.wait_with_output().unwrap());
    assert_ne!(r.code, 0);
    let message = assert_failed_cleanly(&r, r.code, &sb.path("store"), &[]);
    assert!(message.contains("vanished") && message.contains("f1999"), "{message}");
}

/// Holds `<locks>/<name>.lock` with the flock CLI until the returned child's stdin closes.
fn hold_lock(sb: &Sandbox, name: &str) -> Child {
    mkdir_mode(&sb.path("locks"), 0o700);
    let lock = sb.path(&format!("locks/{name}.lock"));
    let mut holder = Command::new("flock")
        .arg(&lock)
        .args(["sh", "-c", "echo locked; read line; true"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "locked\n");
    holder
}

#[test]
fn a_held_lock_fails_at_once_or_is_waited_for() {
    let sb = Sandbox::new();
    let src = sb.path("src");
    small_tree(&src);
    let store = sb.store();
    let dump = ["files", s(&src), "--name", "locked", "--to", store.as_str()];
    let mut holder = hold_lock(&sb, "locked");

    let started = Instant::now();
    let r = sb.run("bk-dump", &dump).code(75);
    assert!(started.elapsed() < Duration::from_secs(30), "at once, not after a wait");
    let e = r.error();
    assert!(
        e.message.contains("locked.lock") && e.message.contains("--wait"),
        "{}",
        e.message
    );
    assert_eq!(e.name.as_deref(), Some("locked"));
    assert!(files_below(&sb.path("store")).is_empty());

    let mut waiting = Reaper(vec![sb.spawn("bk-dump", &[&dump[..], &["--wait", "60"]].concat())]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        waiting.0[0].try_wait().unwrap().is_none(),
        "bk-dump --wait waits while the lock is held"
    );
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    let r = Run::from(waiting.0.pop().unwrap().wait_with_output().unwrap()).ok();
    assert_eq!(r.artifact().name, "locked");
}

/// The pid holding an flock on `path`, from /proc/locks.
fn flock_holder(path: &Path) -> Option<i32> {
    let meta = fs::metadata(path).ok()?;
    let ino = meta.ino().to_string();
    let locks = fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 6 && f[1] == "FLOCK" && f[5].rsplit(':').next() == Some(ino.as_str())).then(|| f[4].parse().ok())?
    })
}

#[test]
fn two_concurrent_dumps_of_one_name_one_succeeds() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let sb = Sandbox::new();
    let src = sb.path("src");
    fs::create_dir(&src).unwrap();
    for i in 0..4 {
        fs::write(src.join(format!("r{i}")), random_bytes(4 << 20)).unwrap();
    }
    let store = sb.store();
    let args = ["files", s(&src), "--name", "race", "--to", store.as_str()];
    let mut children = Reaper(vec![sb.spawn("bk-dump", &args), sb.spawn("bk-dump", &args)]);
    let lock = sb.path("locks/race.lock");

    // Whoever takes the lock is stopped while it holds it, so that the other one surely
    // meets the lock however the machine schedules them; then it goes on.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut stopped, mut resumed) = (None, false);
    let mut ended = [false, false];
    while ended != [true, true] {
        assert!(Instant::now() < deadline, "the dumps did not end");
        for (i, child) in children.0.iter_mut().enumerate() {
            ended[i] = ended[i] || child.try_wait().unwrap().is_some();
        }
        match stopped {
            None => {
                if let Some(pid) = flock_holder(&lock) {
                    let i = children.0.iter().position(|c| c.id() as i32 == pid);
                    if let Some(i) = i.filter(|&i| !ended[i]) {
                        kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
                        stopped = Some(i);
                    }
                }
            }
            Some(i) if !resumed && ended[1 - i] => {
                kill(Pid::from_raw(children.0[i].id() as i32), Signal::SIGCONT).unwrap();
                resumed = true;
            }
            Some(_) => {}
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let runs: Vec<Run> = children
        .0
        .drain(..)
        .map(|c| Run::from(c.wait_with_output().unwrap()))
        .collect();
    let mut codes: Vec<i32> = runs.iter().map(|r| r.code).collect();
    codes.sort();
    assert_eq!(codes, vec![0, 75], "{runs:#?}");
    for r in runs {
        if r.code == 0 {
            assert_eq!(r.artifact().name, "race");
        } else {
            assert!(r.error().message.contains("race.lock"));
        }
    }
    assert_eq!(sb.run("bk-ls", &[&store]).ok().artifacts().len(), 1);
}

#[test]
fn two_dumps_within_a_second_get_distinct_ids() {
    let sb = Sandbox::new();
    let src = sb.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("x"), "x").unwrap();
    let a = sb.dump(&["files", s(&src), "--name", "twice"]);
    let b = sb.dump(&["files", s(&src), "--name", "twice"]);
    assert_ne!(a.id, b.id);
    assert_ne!(a.file, b.file);
    let listed: Vec<String> = sb
        .run("bk-ls", &[&sb.store(), "--name", "twice"])
        .ok()
        .artifacts()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(listed, vec![a.id, b.id]);
}

#[test]
fn sigterm_mid_dump_removes_the_temporary_file() {
    let sb = Sandbox::new();
    fs::create_dir(sb.path("src")).unwrap();
    // Incompressible and large enough that the dump is still writing when the signal comes.
    fs::write(sb.path("src/big"), random_bytes(256 << 20)).unwrap();
    let store = sb.store();
    let mut child = sb.spawn(
        "bk-dump",
        &["files", "src", "--name", "big", "--to", &store, "--compress", "none"],
    );
    let name_dir = sb.path("store/big");
    let deadline = Instant::now() + Duration::from_secs(30);
    while files_below(&name_dir).is_empty() {
        assert!(Instant::now() < deadline, "no temporary file appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "128 + SIGTERM");
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(stderr.contains("interrupted by signal 15"), "{stderr}");
    assert_eq!(
        files_below(&name_dir),
        Vec::<PathBuf>::new(),
        "the temporary file is gone"
    );
}
