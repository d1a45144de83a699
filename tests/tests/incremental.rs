//! Incremental files backups (bk-dump files --incremental) through the real binaries and
//! real GNU tar: chains over a changing tree restored at every point in time by bk-restore
//! and by GNU tar alone, the chain state lost or planted, missing and hostile pieces, a
//! signal mid-dump, and a remote store.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bk_core::record::Artifact;
use bk_tests::{artifact_line, have_root, output_of, s, tree_digest, unzstd, write_files, Remote, Run, Sandbox};
use filetime::FileTime;
use sha2::{Digest, Sha256};

/// `bk-dump files SRC --incremental --name fs` into the sandbox's store, with `extra` options.
fn dump(sb: &Sandbox, src: &Path, extra: &[&str]) -> Run {
    let store = sb.store();
    let mut args = vec!["files", s(src), "--incremental", "--name", "fs", "--to", &store];
    args.extend(extra);
    // Ids are per second: each backup of a chain its own.
    std::thread::sleep(Duration::from_millis(1100));
    sb.run("bk-dump", &args)
}

fn restored_root(target: &Path, src: &Path) -> PathBuf {
    target.join(src.strip_prefix("/").unwrap())
}

fn chain_fields(a: &Artifact) -> (Option<u32>, Option<&str>, Option<&str>) {
    (a.level, a.parent.as_deref(), a.chain.as_deref())
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
    diffs.extend(
        actual
            .iter()
            .filter(|(p, _)| !expected.contains_key(*p))
            .map(|(p, got)| format!("extra {p}: {got}")),
    );
    assert!(diffs.is_empty(), "{what}:\n  {}", diffs.join("\n  "));
}

/// A file's content replaced by other bytes of the same size, its mtime set back to what it
/// was: only the inode's change time (ctime) tells.
fn rewrite_same_size_same_mtime(path: &Path) {
    let meta = fs::metadata(path).unwrap();
    let old = fs::read(path).unwrap();
    let new: Vec<u8> = old.iter().map(|b| b.wrapping_add(1)).collect();
    fs::write(path, new).unwrap();
    filetime::set_file_mtime(path, FileTime::from_last_modification_time(&meta)).unwrap();
}

/// The README's commands: every piece, the full first, through GNU tar alone.
fn restore_with_gnu_tar(pieces: &[Artifact], target: &Path) {
    fs::create_dir_all(target).unwrap();
    for piece in pieces {
        let mut tar = Command::new("tar")
            .args([
                "--extract",
                "--listed-incremental=/dev/null",
                "--numeric-owner",
                "--file=-",
                "-C",
            ])
            .arg(target)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        tar.stdin.take().unwrap().write_all(&unzstd(&piece.location)).unwrap();
        assert!(tar.wait().unwrap().success(), "tar --extract of {}", piece.file);
    }
}

/// The README's loop that restores a chain with GNU tar alone, for the chain `chain` of the
/// store directory `dir`, into `target`.
fn readme_chain_loop(dir: &Path, chain: &str, target: &Path) -> String {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let start = readme
        .find("cd ../moodledata; for id in")
        .expect("the README's chain loop");
    let end = start + readme[start..].find("; done").expect("its end") + "; done".len();
    readme[start..end]
        .replace("../moodledata", s(dir))
        .replace("moodledata.20261130T000500Z", chain)
        .replace("/dest", s(target))
}

/// A tree with one of everything tar keeps: files, a sparse file, hard links, a symlink, a
/// FIFO, empty and nested directories.
fn first_tree(src: &Path) {
    write_files(
        src,
        &[
            ("a/old.txt", "to be deleted"),
            ("a/keep.txt", "unchanged"),
            ("b.txt", "same size, same second"),
            ("d/x", "in a directory that will be renamed"),
            ("f", "a file that becomes a directory"),
            ("h1", "hard linked"),
        ],
    );
    fs::hard_link(src.join("h1"), src.join("h2")).unwrap();
    symlink("b.txt", src.join("link")).unwrap();
    fs::create_dir(src.join("e")).unwrap();
    nix::unistd::mkfifo(&src.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
    let sparse = fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&sparse, b"the middle", 4 << 20).unwrap();
}

/// The changes between the backups of a chain, one step each.
fn change(src: &Path, step: usize) {
    match step {
        1 => {
            write_files(src, &[("a/new.txt", "added")]);
            fs::remove_file(src.join("a/old.txt")).unwrap();
            rewrite_same_size_same_mtime(&src.join("b.txt"));
            fs::rename(src.join("d"), src.join("d2")).unwrap();
            fs::set_permissions(src.join("a/keep.txt"), fs::Permissions::from_mode(0o600)).unwrap();
            if have_root() {
                std::os::unix::fs::chown(src.join("h1"), Some(65534), Some(65534)).unwrap();
            }
        }
        2 => {
            fs::remove_dir_all(src.join("d2")).unwrap();
            write_files(src, &[("d2", "a directory replaced by a file")]);
            fs::remove_file(src.join("f")).unwrap();
            write_files(src, &[("f/y", "a file replaced by a directory")]);
            fs::hard_link(src.join("h1"), src.join("a/h3")).unwrap();
            let sparse = fs::OpenOptions::new().write(true).open(src.join("sparse")).unwrap();
            std::os::unix::fs::FileExt::write_at(&sparse, b"THE MIDDLE", 4 << 20).unwrap();
        }
        _ => {
            fs::remove_file(src.join("d2")).unwrap();
            write_files(src, &[("d2/z", "and back to a directory")]);
            fs::remove_dir(src.join("e")).unwrap();
            fs::remove_file(src.join("h2")).unwrap();
        }
    }
}

#[test]
fn every_point_of_a_chain_restores_exactly_with_bk_and_with_gnu_tar_alone() {
    let (sb, src) = Sandbox::with_src(first_tree);
    let mut points: Vec<(Artifact, BTreeMap<String, String>)> = Vec::new();
    for step in 0..4 {
        if step > 0 {
            change(&src, step);
        }
        let run = dump(&sb, &src, &[]).ok();
        assert_eq!(
            run.stderr, "",
            "step {step}: a backup that continues its chain says nothing"
        );
        let a = run.artifact();
        let expected_parent = points.last().map(|(p, _)| p.id.as_str());
        let expected_chain = points.first().map_or(a.id.as_str(), |(f, _)| f.id.as_str());
        assert_eq!(
            chain_fields(&a),
            (Some(step as u32), expected_parent, Some(expected_chain)),
            "step {step}"
        );
        points.push((a, tree_digest(&src)));
    }
    let counts = |i: usize| {
        let c = &points[i].0.counts;
        (c["added"], c["changed"], c["deleted"], c["files"])
    };
    // The full: 10 files (directories are not files). Step 1: a/new.txt and d2/x added,
    // b.txt, a/keep.txt, h1 and h2 (its link) stored again, a/old.txt and d/x deleted.
    assert_eq!(counts(0), (10, 0, 0, 10));
    assert_eq!(counts(1).0, 2, "step 1: {:?}", points[1].0.counts);
    assert_eq!(counts(1).2, 2, "step 1: {:?}", points[1].0.counts);
    assert!(
        counts(1).1 >= 2,
        "b.txt, rewritten within its mtime second, is stored again: {:?}",
        points[1].0.counts
    );
    let b_txt = format!("{}/b.txt", src.strip_prefix("/").unwrap().display());
    let members = String::from_utf8_lossy(&output_of(Command::new("sh").args([
        "-c",
        &format!("zstd -dc {} | tar --list --file=-", points[1].0.location),
    ])))
    .into_owned();
    assert!(members.lines().any(|l| l == b_txt), "b.txt is in piece 1: {members}");

    for (i, (a, expected)) in points.iter().enumerate() {
        let target = sb.path(&format!("bk-{i}"));
        let restored = sb
            .run(
                "bk-restore",
                &["--from", &sb.store(), "--id", &a.id, "--to", s(&target)],
            )
            .ok()
            .restored();
        assert_eq!(restored.counts["files"], a.counts["files"], "point {i}");
        assert_same_tree(
            expected,
            &tree_digest(&restored_root(&target, &src)),
            &format!("bk-restore of point {i}"),
        );
        let by_tar = sb.path(&format!("tar-{i}"));
        let pieces: Vec<Artifact> = points[..=i].iter().map(|(p, _)| p.clone()).collect();
        restore_with_gnu_tar(&pieces, &by_tar);
        assert_same_tree(
            expected,
            &tree_digest(&restored_root(&by_tar, &src)),
            &format!("GNU tar's restore of point {i}"),
        );
    }
    // The README's loop restores the whole chain as bk-restore of its newest backup does.
    let by_readme = sb.path("readme");
    fs::create_dir(&by_readme).unwrap();
    let script = readme_chain_loop(&sb.path("store/fs"), &points[0].0.id, &by_readme);
    output_of(Command::new("sh").args(["-ec", &script]));
    assert_same_tree(
        &points[3].1,
        &tree_digest(&restored_root(&by_readme, &src)),
        "the README's loop",
    );
    // The sparse file stays sparse.
    let sparse = restored_root(&sb.path("bk-3"), &src).join("sparse");
    let blocks = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&sparse).unwrap());
    assert!(blocks * 512 < 1 << 20, "{} blocks: not sparse", blocks);

    // --at picks the state at a time; --include restores part of it across the chain.
    let at = &points[1].0.started;
    let target = sb.path("at");
    sb.run(
        "bk-restore",
        &[
            "--from",
            &sb.store(),
            "--name",
            "fs",
            "--at",
            at,
            "--include",
            "*.txt",
            "--to",
            s(&target),
        ],
    )
    .ok();
    let got: Vec<String> = tree_digest(&restored_root(&target, &src))
        .into_iter()
        .filter(|(_, v)| !v.starts_with("dir"))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(got, ["a/keep.txt", "a/new.txt", "b.txt"]);

    // Every piece checked, and the chain restored and counted in a scratch directory.
    let verified = sb
        .run(
            "bk-verify",
            &[
                "--from",
                &sb.store(),
                "--name",
                "fs",
                "--scratch",
                "--scratch-dir",
                s(&sb.path("scratch")),
            ],
        )
        .ok();
    assert!(verified.stdout.contains("\"ok\":true"), "{}", verified.stdout);
    let ls = sb.run("bk-ls", &[&sb.store(), "--format", "json"]).ok();
    let levels: Vec<Option<u32>> = ls.artifacts().iter().map(|a| a.level).collect();
    assert_eq!(levels, [Some(0), Some(1), Some(2), Some(3)]);
}

/// The chain state file of the sandbox's `fs` backups.
fn state_path(sb: &Sandbox) -> PathBuf {
    sb.path("store/fs/fs.chain-state")
}

/// A state file whose snapshot's start time is moved by `seconds`, its sha256 made to match.
fn shift_state_time(path: &Path, seconds: i64) {
    let bytes = fs::read(path).unwrap();
    let split = bytes.iter().position(|b| *b == b'\n').unwrap();
    let mut snapshot = bytes[split + 1..].to_vec();
    let header_end = snapshot.iter().position(|b| *b == b'\n').unwrap() + 1;
    let time_end = header_end + snapshot[header_end..].iter().position(|b| *b == 0).unwrap();
    let time: i64 = std::str::from_utf8(&snapshot[header_end..time_end])
        .unwrap()
        .parse()
        .unwrap();
    snapshot.splice(header_end..time_end, (time + seconds).to_string().into_bytes());
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[..split]).unwrap();
    header["sha256"] = hex::encode(Sha256::digest(&snapshot)).into();
    let mut out = format!("{header}\n").into_bytes();
    out.extend(snapshot);
    fs::write(path, out).unwrap();
}

#[test]
fn a_lost_damaged_planted_or_stale_chain_state_makes_a_full_that_says_why() {
    type Damage = fn(&Sandbox, &[u8]);
    let cases: [(&str, Damage, &str); 5] = [
        (
            "lost",
            |sb, _| fs::remove_file(state_path(sb)).unwrap(),
            "no chain state",
        ),
        (
            "garbled",
            |sb, _| fs::write(state_path(sb), b"{\"follows\":1}\nGNU tar").unwrap(),
            "the chain state is not usable",
        ),
        (
            "bit flip",
            |sb, _| {
                let mut b = fs::read(state_path(sb)).unwrap();
                let last = b.len() - 3;
                b[last] ^= 1;
                fs::write(state_path(sb), b).unwrap();
            },
            "its sha256 is not the one its header says",
        ),
        (
            "stale",
            |sb, older| fs::write(state_path(sb), older).unwrap(),
            "but the newest backup is",
        ),
        (
            "planted in the future",
            |sb, _| shift_state_time(&state_path(sb), 86_400),
            "the chain state's time",
        ),
    ];
    for (case, damage, says) in cases {
        let (sb, src) = Sandbox::with_src(|d| write_files(d, &[("a", "1")]));
        let full = dump(&sb, &src, &[]).ok().artifact();
        let older_state = fs::read(state_path(&sb)).unwrap();
        write_files(&src, &[("b", "2")]);
        let one = dump(&sb, &src, &[]).ok().artifact();
        assert_eq!(one.level, Some(1), "{case}");
        damage(&sb, &older_state);
        write_files(&src, &[("c", "3")]);
        let run = dump(&sb, &src, &[]).ok();
        let a = run.artifact();
        assert_eq!(chain_fields(&a), (Some(0), None, Some(a.id.as_str())), "{case}: a full");
        assert!(
            run.stderr.contains("this backup is a full one (level 0)") && run.stderr.contains(says),
            "{case}: {}",
            run.stderr
        );
        assert_eq!(a.counts["files"], 3, "{case}");
        // ... and the next one continues the new chain.
        let next = dump(&sb, &src, &[]).ok().artifact();
        assert_eq!(
            chain_fields(&next),
            (Some(1), Some(a.id.as_str()), Some(a.id.as_str())),
            "{case}"
        );
        assert_ne!(full.id, a.id);
    }
}

#[test]
fn full_every_starts_new_chains_and_other_paths_or_plain_backups_break_them() {
    let (sb, src) = Sandbox::with_src(|d| write_files(d, &[("a", "1")]));
    let levels = |runs: &[Artifact]| runs.iter().map(|a| a.level.unwrap()).collect::<Vec<_>>();
    let made: Vec<Artifact> = (0..5)
        .map(|_| dump(&sb, &src, &["--full-every", "2"]).ok().artifact())
        .collect();
    assert_eq!(levels(&made), [0, 1, 0, 1, 0]);
    // A plain backup of the name in between: the next incremental one is a full.
    sb.dump(&["files", s(&src), "--name", "fs"]);
    let run = dump(&sb, &src, &[]).ok();
    assert_eq!(run.artifact().level, Some(0));
    assert!(run.stderr.contains("is not incremental"), "{}", run.stderr);
    let other = sb.path("other");
    write_files(&other, &[("x", "y")]);
    let run = dump(&sb, &other, &[]).ok();
    assert_eq!(run.artifact().level, Some(0));
    assert!(run.stderr.contains("of other paths"), "{}", run.stderr);
    // What GNU tar cannot do is refused before any work.
    for (args, says) in [
        (
            vec!["--include", "*.txt"],
            "--include cannot be used with --incremental",
        ),
        (vec!["--exclude", "*.{log,tmp}"], "cannot be used with --incremental"),
        (vec!["--full-every", "0"], "--full-every"),
    ] {
        let run = dump(&sb, &src, &args).code(64);
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
    }
    let run = sb
        .run(
            "bk-dump",
            &["files", s(&src), "--full-every", "7d", "--to", &sb.store()],
        )
        .code(64);
    assert!(run.stderr.contains("--incremental"), "{}", run.stderr);
}

#[test]
fn excludes_and_the_store_inside_the_tree_stay_out_of_every_piece() {
    let (sb, src) =
        Sandbox::with_src(|d| write_files(d, &[("data/keep.txt", "k"), ("data/x.log", "l"), ("cache/c", "c")]));
    let exclude_cache = format!("{}/cache", src.display());
    let store = src.join("store").display().to_string();
    let args = [
        "files",
        s(&src),
        "--incremental",
        "--name",
        "fs",
        "--exclude",
        "*.log",
        "--exclude",
        &exclude_cache,
        "--to",
        &store,
    ];
    let full = sb.run("bk-dump", &args).ok().artifact();
    assert_eq!(full.counts["files"], 1, "{:?}", full.counts);
    std::thread::sleep(Duration::from_millis(1100));
    write_files(&src, &[("data/y.log", "l"), ("data/new.txt", "n")]);
    let next = sb.run("bk-dump", &args).ok().artifact();
    assert_eq!(
        (next.counts["added"], next.counts["files"]),
        (1, 2),
        "{:?}",
        next.counts
    );
    for piece in [&full, &next] {
        let members = String::from_utf8_lossy(&output_of(
            Command::new("sh").args(["-c", &format!("zstd -dc {} | tar --list --file=-", piece.location)]),
        ))
        .into_owned();
        assert!(members.contains("src/data/"), "{members}");
        for left_out in [".log", "cache/c", "store/"] {
            assert!(!members.contains(left_out), "{left_out} in {}: {members}", piece.file);
        }
    }
}

#[test]
fn a_missing_or_bad_piece_fails_restore_and_verify_and_leaves_the_target_alone() {
    let (sb, src) = Sandbox::with_src(|d| write_files(d, &[("a", "1")]));
    let mut chain = Vec::new();
    for i in 0..3 {
        write_files(&src, &[(&format!("f{i}"), "x")]);
        chain.push(dump(&sb, &src, &[]).ok().artifact());
    }
    let target = sb.path("target");
    write_files(&target, &[("precious", "mine")]);
    let before = tree_digest(&target);
    let store = sb.store();
    let restore = |extra: &[&str]| {
        let mut args = vec!["--from", &store, "--name", "fs", "--to", s(&target), "--replace"];
        args.extend(extra);
        sb.run("bk-restore", &args)
    };
    let verify = || sb.run("bk-verify", &["--from", &store, "--name", "fs"]);

    // A piece whose content was replaced (its manifest made to match): 65.
    let middle = &chain[1];
    let original = fs::read(&middle.location).unwrap();
    let content = unzstd(&middle.location);
    let name = "Yf1\0";
    let at = content
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .expect("f1 in a dumpdir");
    let mut hostile = content.clone();
    hostile[at..at + 4].copy_from_slice(b"Y..\0");
    let forged = bk_tests::rewrite_artifact(middle, &hostile);
    fs::write(sb.path(&format!("store/fs/{}.json", middle.id)), artifact_line(&forged)).unwrap();
    let run = restore(&[]).code(65);
    assert!(
        run.stderr.contains(&middle.file) && run.stderr.contains("\"Y..\""),
        "{}",
        run.stderr
    );
    assert_same_tree(&before, &tree_digest(&target), "a hostile piece");
    verify().code(65);

    // A piece that is gone: 66, named.
    fs::write(&middle.location, &original).unwrap();
    fs::write(sb.path(&format!("store/fs/{}.json", middle.id)), artifact_line(middle)).unwrap();
    restore(&[]).ok();
    let restored = tree_digest(&target);
    fs::remove_file(&middle.location).unwrap();
    fs::remove_file(sb.path(&format!("store/fs/{}.json", middle.id))).unwrap();
    let fresh = sb.path("fresh");
    let run = sb
        .run("bk-restore", &["--from", &store, "--name", "fs", "--to", s(&fresh)])
        .code(66);
    assert!(
        run.stderr
            .contains(&format!("builds on {}, which is not in", middle.id)),
        "{}",
        run.stderr
    );
    assert!(!fresh.exists(), "nothing written for a chain that cannot be restored");
    let run = restore(&[]).code(66);
    assert!(run.stderr.contains(&middle.id), "{}", run.stderr);
    assert_same_tree(&restored, &tree_digest(&target), "a missing piece");
    verify().code(66);
}

#[test]
fn sigterm_mid_incremental_leaves_the_chain_state_as_before() {
    let (sb, src) = Sandbox::with_src(|d| write_files(d, &[("a", "1")]));
    let full = dump(&sb, &src, &[]).ok().artifact();
    let state = fs::read(state_path(&sb)).unwrap();
    // Enough for the dump to be caught in the middle.
    fs::write(src.join("big"), bk_tests::noise(256 << 20)).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let store = sb.store();
    let child = sb.spawn(
        "bk-dump",
        &["files", s(&src), "--incremental", "--name", "fs", "--to", &store],
    );
    let started = Instant::now();
    while !bk_tests::files_below(&sb.path("store/fs"))
        .iter()
        .any(|p| p.to_string_lossy().contains(".tmp."))
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no temporary artifact appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(state_path(&sb)).unwrap(), state, "the state is the full's");
    let left: Vec<PathBuf> = bk_tests::files_below(&sb.path("store/fs"));
    assert_eq!(left.len(), 3, "the full, its manifest and the state: {left:?}");
    let next = dump(&sb, &src, &[]).ok().artifact();
    assert_eq!(
        chain_fields(&next),
        (Some(1), Some(full.id.as_str()), Some(full.id.as_str()))
    );
    assert_eq!(next.counts["added"], 1);
}

#[test]
fn a_chain_in_a_remote_store_continues_and_restores() {
    let Some(r) = Remote::from_env() else { return };
    let sb = Sandbox::new();
    for (i, store) in [r.s3_store("bk-incremental"), r.ssh_store("bk-incremental")]
        .into_iter()
        .enumerate()
    {
        let src = sb.path(&format!("src{i}"));
        write_files(&src, &[("a", "1"), ("d/b", "2")]);
        let mut made = Vec::new();
        for step in 0..3 {
            match step {
                1 => write_files(&src, &[("c", "3")]),
                2 => fs::remove_file(src.join("a")).unwrap(),
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(1100));
            let run = r.run(
                &sb,
                "bk-dump",
                &["files", s(&src), "--incremental", "--name", "fs", "--to", &store],
                "",
            );
            made.push(run.ok().artifact());
        }
        let levels: Vec<Option<u32>> = made.iter().map(|a| a.level).collect();
        assert_eq!(levels, [Some(0), Some(1), Some(2)], "{store}");
        let target = sb.path(&format!("restored-{}", store.split(':').next().unwrap()));
        r.run(
            &sb,
            "bk-restore",
            &["--from", &store, "--name", "fs", "--to", s(&target)],
            "",
        )
        .ok();
        assert_same_tree(&tree_digest(&src), &tree_digest(&restored_root(&target, &src)), &store);
        if let Some(dir) = store.strip_prefix(&r.ssh_url("")) {
            // A state lost on the remote side: the next backup is a full, and says why.
            r.shell(&format!("rm {dir}/fs/fs.chain-state"), b"");
            std::thread::sleep(Duration::from_millis(1100));
            let args = ["files", s(&src), "--incremental", "--name", "fs", "--to", &store];
            let run = r.run(&sb, "bk-dump", &args, "").ok();
            assert_eq!(run.artifact().level, Some(0), "{store}");
            assert!(run.stderr.contains("no chain state"), "{}", run.stderr);
        }
    }
}
