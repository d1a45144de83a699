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
use bk_tests::{age_keygen, files_below, have_root, run_cmd, s, tree_digest, write_files, Run, Sandbox, AS_NOBODY};
use filetime::FileTime;
use nix::sys::stat::Mode;

const NOBODY: u32 = 65534;

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

/// Runs a tool under umask 000, where only what bk sets itself keeps a mode private.
fn with_umask_000(sb: &Sandbox, tool: &str, args: &[&str]) -> Run {
    let mut cmd = sb.cmd(tool, args);
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
    let (sb, src) = Sandbox::with_src(rich_tree);
    let before = tree_digest(&src);
    let store = sb.store();

    let run = with_umask_000(&sb, "bk-dump", &["files", s(&src), "--name", "rich", "--to", &store]).ok();
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
    let (sb, src) = Sandbox::with_src(rich_tree);
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

#[test]
fn age_encryption() {
    let (sb, src) = Sandbox::with_src(small_tree);
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
    let (sb, src) = Sandbox::with_src(selection_tree);
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
    if !have_root() {
        return;
    }
    let (sb, src) = Sandbox::with_src(|src| write_files(src, &[("here.txt", "on the root filesystem")]));
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
    let (sb, src) = Sandbox::with_src(small_tree);
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
    let (sb, src) = Sandbox::with_src(small_tree);
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
    if !have_root() {
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
    if !have_root() {
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
    if !have_root() {
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

/// Holds the open(2) of chosen files and directories by bk-dump until the test lets it go
/// (fanotify permission events; root only): a deterministic moment in the middle of a dump
/// at which the test changes the tree, where a race would flake.
struct OpenGate {
    fanotify: std::os::fd::OwnedFd,
}

/// One open held by an [`OpenGate`]: of `path`, by the process being watched.
struct HeldOpen {
    path: PathBuf,
    event: std::os::fd::OwnedFd,
}

impl OpenGate {
    fn new(paths: &[&Path]) -> OpenGate {
        use nix::libc;
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: plain system calls; the descriptor is owned at once.
        let fd = unsafe { libc::fanotify_init(libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC, libc::O_RDONLY as u32) };
        assert!(fd >= 0, "fanotify_init: {}", std::io::Error::last_os_error());
        let fanotify = unsafe { OwnedFd::from_raw_fd(fd) };
        for path in paths {
            let c_path = std::ffi::CString::new(s(path)).unwrap();
            let marked = unsafe {
                libc::fanotify_mark(
                    fanotify.as_raw_fd(),
                    libc::FAN_MARK_ADD,
                    libc::FAN_OPEN_PERM | libc::FAN_ONDIR,
                    libc::AT_FDCWD,
                    c_path.as_ptr(),
                )
            };
            assert_eq!(
                marked,
                0,
                "fanotify_mark {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        OpenGate { fanotify }
    }

    /// Waits until `child` opens one of the gate's paths, and holds that open.
    fn wait(&self, child: &mut Child) -> HeldOpen {
        use nix::libc;
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "bk-dump opened none of the gated paths");
            if let Some(status) = child.try_wait().unwrap() {
                panic!("bk-dump ended ({status}) before it opened a gated path");
            }
            let mut poll = libc::pollfd {
                fd: self.fanotify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call.
            if unsafe { libc::poll(&mut poll, 1, 100) } <= 0 {
                continue;
            }
            let mut event: libc::fanotify_event_metadata = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of_val(&event);
            // SAFETY: reads at most one event into a buffer of its size.
            let n = unsafe { libc::read(self.fanotify.as_raw_fd(), (&raw mut event).cast(), size) };
            assert_eq!(n, size as isize, "reading a fanotify event");
            let held = HeldOpen {
                path: fs::read_link(format!("/proc/self/fd/{}", event.fd)).unwrap(),
                event: unsafe { OwnedFd::from_raw_fd(event.fd) },
            };
            if event.pid == child.id() as i32 {
                return held;
            }
            self.allow(held); // someone else's open: none of this test's business
        }
    }

    fn allow(&self, held: HeldOpen) {
        use nix::libc;
        use std::os::fd::AsRawFd;
        let response = libc::fanotify_response {
            fd: held.event.as_raw_fd(),
            response: libc::FAN_ALLOW,
        };
        let size = std::mem::size_of_val(&response);
        // SAFETY: writes one response struct.
        let n = unsafe { libc::write(self.fanotify.as_raw_fd(), (&raw const response).cast(), size) };
        assert_eq!(n, size as isize, "answering a fanotify event");
    }
}

/// Names in an uncompressed tar, as GNU tar lists them (and proof that it reads it whole).
fn tar_names(tar: &Path) -> Vec<String> {
    let out = Command::new("tar").arg("-tf").arg(tar).output().unwrap();
    assert!(
        out.status.success(),
        "tar -tf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// bk-verify of one backup name: it must pass.
fn assert_verifies(sb: &Sandbox, name: &str) {
    let r = sb.run("bk-verify", &["--from", &sb.store(), "--name", name]).ok();
    let verified: Vec<_> = r
        .records()
        .into_iter()
        .filter_map(|rec| match rec {
            Record::Verified(v) => Some(v),
            _ => None,
        })
        .collect();
    assert_eq!(verified.len(), 1, "{}", r.stdout);
    assert_eq!(verified[0]["ok"], serde_json::Value::Bool(true), "{}", r.stdout);
}

#[test]
fn entries_that_vanish_during_the_dump_are_left_out_with_a_warning() {
    if !have_root() {
        return;
    }
    let sb = Sandbox::new();
    let src = sb.path("busy");
    let p = |rel: &str| src.join(rel);
    fs::create_dir(&src).unwrap();
    for (file, content) in [("a-first", "first"), ("b-gone", "gone"), ("z-last", "last")] {
        fs::write(p(file), content).unwrap();
    }
    fs::create_dir(p("c-dir")).unwrap();
    fs::write(p("c-dir/inside"), "inside").unwrap();
    symlink("a-first", p("d-link")).unwrap();
    fs::create_dir(p("e-dir")).unwrap();
    fs::write(p("e-dir/inside"), "inside").unwrap();
    let gate = OpenGate::new(&[&p("a-first"), &p("e-dir")]);
    let store = sb.store();
    let mut reaper = Reaper(vec![sb.spawn(
        "bk-dump",
        &["files", s(&src), "--name", "busy", "--compress", "none", "--to", &store],
    )]);

    // bk-dump has listed busy/ and is opening a-first: what comes after it goes away.
    let held = gate.wait(&mut reaper.0[0]);
    assert_eq!(held.path, p("a-first"));
    fs::remove_file(p("b-gone")).unwrap();
    fs::remove_dir_all(p("c-dir")).unwrap();
    fs::remove_file(p("d-link")).unwrap();
    gate.allow(held);
    // It has found e-dir and is opening it to list it: it goes (without opening it here).
    // A directory removed once opened lists as empty (POSIX; glibc turns getdents' ENOENT
    // into the end): e-dir is archived, empty, as it was when the dump read it.
    let held = gate.wait(&mut reaper.0[0]);
    assert_eq!(held.path, p("e-dir"));
    fs::remove_file(p("e-dir/inside")).unwrap();
    fs::remove_dir(p("e-dir")).unwrap();
    gate.allow(held);

    let r = Run::from(reaper.0.pop().unwrap().wait_with_output().unwrap()).ok();
    let warnings: Vec<String> = ["b-gone", "c-dir", "d-link"]
        .iter()
        .map(|gone| {
            format!(
                "bk-dump: warning: {} vanished while being read: not in the backup",
                s(&p(gone))
            )
        })
        .collect();
    assert_eq!(r.stderr.lines().collect::<Vec<_>>(), warnings);
    let a = r.artifact();
    let top = s(&src).trim_start_matches('/');
    let kept: Vec<String> = ["", "/a-first", "/e-dir", "/z-last"]
        .iter()
        .map(|rel| format!("{top}{rel}"))
        .collect();
    assert_eq!(tar_names(&artifact_path(&a)), kept, "a valid tar of what was there");
    assert_eq!(a.counts, BTreeMap::from([("entries".to_string(), kept.len() as u64)]));
    assert_verifies(&sb, "busy");
    let target = sb.path("target");
    sb.run("bk-restore", &["--from", &store, "--name", "busy", "--to", s(&target)])
        .ok();
    assert_eq!(
        rel_paths(&restored_root(&target, &src)),
        set(&["a-first", "e-dir", "z-last"])
    );
}

#[test]
fn files_that_shrink_or_grow_during_the_dump_keep_their_size_with_a_warning() {
    if !have_root() {
        return;
    }
    let sb = Sandbox::new();
    let src = sb.path("changing");
    fs::create_dir(&src).unwrap();
    let original = random_bytes(3 << 20);
    for file in ["grows", "shrinks"] {
        fs::write(src.join(file), &original).unwrap();
    }
    let gate = OpenGate::new(&[&src.join("grows"), &src.join("shrinks")]);
    let store = sb.store();
    let mut reaper = Reaper(vec![sb.spawn(
        "bk-dump",
        &[
            "files",
            s(&src),
            "--name",
            "changing",
            "--compress",
            "none",
            "--to",
            &store,
        ],
    )]);
    // truncate(2) by path: opening the file here would wait on the gate too.
    for (file, new_len) in [("grows", 5 << 20), ("shrinks", 1000)] {
        let held = gate.wait(&mut reaper.0[0]);
        assert_eq!(held.path, src.join(file));
        nix::unistd::truncate(&held.path, new_len).unwrap();
        gate.allow(held);
    }

    let r = Run::from(reaper.0.pop().unwrap().wait_with_output().unwrap()).ok();
    let path = |file: &str| s(&src.join(file)).to_string();
    assert_eq!(
        r.stderr.lines().collect::<Vec<_>>(),
        vec![
            format!(
                "bk-dump: warning: {} grew while being read; backed up as it was when the dump reached it",
                path("grows")
            ),
            format!(
                "bk-dump: warning: {} shrank by {} bytes while being read; padded with zeros",
                path("shrinks"),
                original.len() - 1000
            ),
        ]
    );
    let a = r.artifact();
    assert_eq!(tar_names(&artifact_path(&a)).len(), 3, "a valid tar");
    assert_eq!(a.counts, BTreeMap::from([("entries".to_string(), 3)]));
    assert_verifies(&sb, "changing");
    let target = sb.path("target");
    sb.run(
        "bk-restore",
        &["--from", &store, "--name", "changing", "--to", s(&target)],
    )
    .ok();
    let back = restored_root(&target, &src);
    assert!(
        fs::read(back.join("grows")).unwrap() == original,
        "cut at the size it had"
    );
    let mut padded = original[..1000].to_vec();
    padded.resize(original.len(), 0);
    assert!(fs::read(back.join("shrinks")).unwrap() == padded, "padded with zeros");
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
    let (sb, src) = Sandbox::with_src(small_tree);
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
    let (sb, src) = Sandbox::with_src(|src| write_files(src, &[("x", "x")]));
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

/// A tar written byte by byte, as a hostile one would be: names and link targets exactly as
/// given (tar-rs and GNU tar refuse to write most of them).
#[derive(Default)]
struct RawTar {
    bytes: Vec<u8>,
    entries: u64,
}

impl RawTar {
    fn entry(mut self, name: &[u8], kind: u8, link: &[u8], data: &[u8]) -> Self {
        let mut header = [0u8; 512];
        header[..name.len()].copy_from_slice(name);
        let mut octal = |at: usize, len: usize, value: usize| {
            header[at..at + len].copy_from_slice(format!("{value:0w$o}\0", w = len - 1).as_bytes());
        };
        octal(100, 8, if kind == b'5' { 0o755 } else { 0o644 });
        octal(108, 8, 0); // uid
        octal(116, 8, 0); // gid
        octal(124, 12, data.len());
        octal(136, 12, 1_500_000_000); // mtime
        header[156] = kind;
        header[157..157 + link.len()].copy_from_slice(link);
        header[257..265].copy_from_slice(b"ustar\x0000");
        header[148..156].fill(b' ');
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.bytes.extend_from_slice(&header);
        self.bytes.extend_from_slice(data);
        self.bytes.resize(self.bytes.len().next_multiple_of(512), 0);
        self.entries += 1;
        self
    }
    fn file(self, name: &[u8]) -> Self {
        self.entry(name, b'0', b"", b"written by a hostile tar\n")
    }
    fn dir(self, name: &[u8]) -> Self {
        self.entry(name, b'5', b"", b"")
    }
    fn symlink(self, name: &[u8], target: &[u8]) -> Self {
        self.entry(name, b'2', target, b"")
    }
    fn hard_link(self, name: &[u8], target: &[u8]) -> Self {
        self.entry(name, b'1', target, b"")
    }
    fn fifo(self, name: &[u8]) -> Self {
        self.entry(name, b'6', b"", b"")
    }
}

/// Puts `tar` in the store as the artifact of a backup `name`, with a manifest that matches
/// it (size, sha256, entry count): only the tar itself is hostile.
fn plant_tar(sb: &Sandbox, name: &str, tar: RawTar) {
    use sha2::{Digest, Sha256};
    let src = sb.path("planted-src");
    fs::create_dir_all(&src).unwrap();
    let a = sb.dump(&["files", s(&src), "--name", name, "--compress", "none"]);
    let mut bytes = tar.bytes;
    bytes.resize(bytes.len() + 1024, 0);
    fs::write(&a.location, &bytes).unwrap();
    let manifest = manifest_path(sb, &a);
    let mut value: serde_json::Value = serde_json::from_str(&fs::read_to_string(&manifest).unwrap()).unwrap();
    value["bytes"] = bytes.len().into();
    value["content_bytes"] = bytes.len().into();
    value["sha256"] = hex::encode(Sha256::digest(&bytes)).into();
    value["counts"]["entries"] = tar.entries.into();
    fs::write(&manifest, format!("{value}\n")).unwrap();
}

#[test]
fn hostile_tar_entries_are_refused_as_bad_data_and_nothing_is_written() {
    let sb = Sandbox::new();
    let outside = sb.path("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("precious"), "must not change\n").unwrap();
    let outside_abs = s(&outside).as_bytes().to_vec();
    let precious_abs = s(&outside.join("precious")).as_bytes().to_vec();
    let up = [b"../".repeat(12), precious_abs[1..].to_vec()].concat();
    let ok = || RawTar::default().file(b"ok.txt");
    // (what, the tar, the entry that the message names)
    let cases: Vec<(&str, RawTar, String)> = vec![
        ("a '..' component", ok().file(b"../../escaped"), "../../escaped".into()),
        (
            "'..' inside a name",
            ok().file(b"a/../../escaped"),
            "a/../../escaped".into(),
        ),
        (
            "'..' and a newline",
            ok().file(b"../evil\nname"),
            "../evil\nname".into(),
        ),
        (
            "an absolute path",
            ok().file(&[&precious_abs[..], b"-abs"].concat()),
            format!("{}-abs", s(&outside.join("precious"))),
        ),
        ("a name that names nothing", ok().dir(b"./"), "./".into()),
        (
            "a hard link to an absolute path",
            ok().hard_link(b"hl", &precious_abs),
            "hl".into(),
        ),
        ("a hard link up and out", ok().hard_link(b"hl", &up), "hl".into()),
        (
            "a hard link to a link that leads out",
            ok().symlink(b"sym", &precious_abs).hard_link(b"hl", b"sym"),
            "hl".into(),
        ),
        ("a hard link to no file", ok().hard_link(b"hl", b"missing"), "hl".into()),
        (
            "a file through a symlink out (dir -> /etc, dir/passwd)",
            ok().symlink(b"dir", &outside_abs).file(b"dir/pwned"),
            "dir/pwned".into(),
        ),
        (
            "a FIFO below a symlink out",
            ok().symlink(b"dir", &outside_abs).fifo(b"dir/sub/fifo"),
            "dir/sub/fifo".into(),
        ),
        (
            "a directory below a symlink out",
            ok().symlink(b"dir", &outside_abs).dir(b"dir/sub/"),
            "dir/sub/".into(),
        ),
        (
            "a file through a symlink to the target",
            ok().symlink(b"up", b"..").file(b"up/pwned"),
            "up/pwned".into(),
        ),
        (
            "a directory that is also a symlink",
            ok().symlink(b"d", &outside_abs).dir(b"d/"),
            "d/".into(),
        ),
        (
            "a symlink over a directory",
            ok().file(b"d/inside").symlink(b"d", &outside_abs),
            "d".into(),
        ),
    ];
    let before = tree_digest(&outside);
    let store = sb.store();
    let occupied = sb.path("occupied");
    fs::create_dir(&occupied).unwrap();
    fs::write(occupied.join("kept"), "what the target held\n").unwrap();
    let occupied_before = tree_digest(&occupied);
    for (i, (what, tar, entry)) in cases.into_iter().enumerate() {
        let name = format!("hostile{i}");
        plant_tar(&sb, &name, tar);
        let fresh = sb.path(&format!("fresh{i}/deeper/target"));
        for (target, extra) in [(&fresh, None), (&occupied, Some("--replace"))] {
            let mut args = vec!["--from", store.as_str(), "--name", name.as_str(), "--to", s(target)];
            args.extend(extra);
            let r = sb.run("bk-restore", &args);
            assert_eq!(r.code, 65, "{what}: {}", r.stderr);
            let e = r.error();
            assert!(
                e.message.contains(&format!("entry {entry:?} ")) && !e.message.contains('\n'),
                "{what}: one line naming the entry {entry:?}: {}",
                e.message
            );
            assert_eq!(r.stderr.lines().count(), 1, "{what}: {}", r.stderr);
            assert_eq!(r.records().len(), 1, "{what}: only the error record: {}", r.stdout);
        }
        assert!(
            !sb.path(&format!("fresh{i}")).exists(),
            "{what}: the target and its parents are gone"
        );
        // bk-verify, which unpacks nothing, sees what the names alone show.
        let by_name_alone = ![
            "a hard link to a link",
            "a hard link to no file",
            "that is also",
            "over a",
        ]
        .iter()
        .any(|w| what.contains(w));
        if by_name_alone {
            let r = sb.run("bk-verify", &["--from", &store, "--name", &name]).code(65);
            assert!(r.stderr.contains(&format!("entry {entry:?} ")), "{what}: {}", r.stderr);
        }
        assert_same_tree(&occupied_before, &tree_digest(&occupied), what);
        assert_same_tree(&before, &tree_digest(&outside), what);
    }
}

#[test]
fn directories_a_restore_creates_are_0700_under_umask_000() {
    let (sb, src) = Sandbox::with_src(small_tree);
    fs::set_permissions(&src, fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o751)).unwrap();
    let store = sb.store();
    sb.dump(&["files", s(&src), "--name", "modes"]);
    let target = sb.path("new/parent/target");
    with_umask_000(
        &sb,
        "bk-restore",
        &["--from", &store, "--name", "modes", "--to", s(&target)],
    )
    .ok();
    // bk's: the target, its missing parents, and the directories above the archived root
    // (the sandbox's own path, which the archive names but holds no entry for).
    let back = restored_root(&target, &src);
    for dir in back.ancestors().skip(1).take_while(|d| *d != sb.root()) {
        assert_eq!(mode_of(dir), 0o700, "{}", dir.display());
    }
    // The archive's: their archived modes.
    assert_eq!(mode_of(&back), 0o750);
    assert_eq!(mode_of(&back.join("sub")), 0o751);
    assert_eq!(mode_of(&back.join("sub/deeper")), mode_of(&src.join("sub/deeper")));
}

#[test]
fn a_partial_restore_of_a_hard_link_without_its_file_is_64() {
    let sb = Sandbox::new();
    let src = sb.path("linked");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/first"), "one inode\n").unwrap();
    fs::hard_link(src.join("d/first"), src.join("second")).unwrap();
    let store = sb.store();
    sb.dump(&["files", s(&src), "--name", "linked"]);
    let target = sb.path("target");
    let restore = |include: &str| {
        let args = [
            "--from",
            &store,
            "--name",
            "linked",
            "--include",
            include,
            "--to",
            s(&target),
        ];
        sb.run("bk-restore", &args)
    };
    let e = restore("*second").code(64).error();
    let rel = |p: &str| format!("{:?}", s(&src.join(p)).trim_start_matches('/'));
    assert!(
        e.message.contains(&rel("second")) && e.message.contains(&rel("d/first")) && e.message.contains("--include"),
        "{}",
        e.message
    );
    assert!(!target.exists());
    let r = restore("**").ok();
    assert!(!r.restored().complete);
    let back = restored_root(&target, &src);
    let ino = |p: &str| fs::metadata(back.join(p)).unwrap().ino();
    assert_eq!(ino("second"), ino("d/first"));
}
