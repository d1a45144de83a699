//! bk-prune through the real binary on a local store (backups of given dates are written
//! straight into the store; the clock is injected with --now or BK_NOW), and its policy
//! engine against restic's `forget --dry-run --json` as an oracle.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bk_core::record::{Artifact, Record};
use bk_core::retention::{decide, Zone};
use bk_prune::Cli;
use bk_tests::{files_below, have_root, needs, run_cmd, s, write_backup, Run, Sandbox, AS_NOBODY};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeDelta, Utc};
use clap::Parser;

/// `n` nightly backups of `name` at 00:15 UTC, the last on `last` (YYYY-MM-DD), oldest first.
fn nightly(store: &str, name: &str, last: &str, n: i64) -> Vec<Artifact> {
    let last = NaiveDate::parse_from_str(last, "%Y-%m-%d").unwrap();
    (0..n)
        .rev()
        .map(|i| {
            let day = last - TimeDelta::days(i);
            write_backup(store, name, &format!("{}T001500Z", day.format("%Y%m%d")))
        })
        .collect()
}

/// The manifest beside an artifact.
fn manifest(a: &Artifact) -> PathBuf {
    Path::new(&a.location).with_file_name(format!("{}.json", a.id))
}

/// Both files of a backup are there, or both are gone.
fn present(a: &Artifact) -> bool {
    let (m, f) = (manifest(a).exists(), Path::new(&a.location).exists());
    assert_eq!(m, f, "{}: manifest {m}, artifact {f}", a.id);
    m
}

fn ids<'a>(items: impl IntoIterator<Item = &'a String>) -> Vec<&'a str> {
    items.into_iter().map(String::as_str).collect()
}

const NOW: &str = "--now=2026-11-22T06:00:00Z";

#[test]
fn a_dry_run_prints_the_same_records_and_deletes_nothing() {
    let sb = Sandbox::new();
    let store = sb.store();
    // 2026-11-02 .. 2026-11-21 (a Saturday): daily keeps the last 7 days, weekly the week
    // of the 21st (W47) and Sunday the 15th (W46).
    let backups = nightly(&store, "alpha", "2026-11-21", 20);
    let before = files_below(&sb.path("store"));
    let args = [&store, "--keep-daily", "7", "--keep-weekly", "2", "--tz", "UTC", NOW];

    let dry = sb.run("bk-prune", &[&args[..], &["--dry-run"]].concat()).ok();
    assert!(dry.stderr.is_empty(), "{}", dry.stderr);
    assert_eq!(files_below(&sb.path("store")), before, "a dry run deletes nothing");
    let (kept, pruned) = dry.decisions();
    assert_eq!(dry.records().len(), 20, "one record per backup: {}", dry.stdout);
    assert_eq!(
        ids(kept.iter().map(|k| &k.id)),
        ids(backups[13..].iter().map(|a| &a.id))
    );
    assert_eq!(
        ids(pruned.iter().map(|p| &p.id)),
        ids(backups[..13].iter().map(|a| &a.id))
    );
    assert!(pruned.iter().all(|p| p.dry_run && p.name == "alpha"));
    let newest = kept.last().unwrap();
    assert_eq!(newest.reasons, ["daily 2026-11-21", "weekly 2026-W47"]);
    assert_eq!(newest.location, backups[19].location);
    assert_eq!(kept[0].reasons, ["daily 2026-11-15", "weekly 2026-W46"]);
    assert_eq!(
        pruned.last().unwrap().reasons,
        ["daily: 7 days kept already", "weekly: 2 weeks kept already"]
    );
    assert!(dry.stdout.lines().all(|l| l.starts_with(r#"{"bk":1,"type":""#)));

    // The real run: the same records but dry_run false, and exactly the pruned ones gone.
    let real = sb.run("bk-prune", &args).ok();
    assert!(real.stderr.is_empty(), "{}", real.stderr);
    let (kept2, pruned2) = real.decisions();
    assert_eq!(kept2, kept);
    assert_eq!(pruned2.len(), pruned.len());
    for (p2, p) in pruned2.iter().zip(&pruned) {
        assert_eq!(
            (&p2.id, &p2.reasons, &p2.location, p2.dry_run),
            (&p.id, &p.reasons, &p.location, false)
        );
    }
    for (i, a) in backups.iter().enumerate() {
        assert_eq!(present(a), i >= 13, "{}", a.id);
    }
    assert_eq!(files_below(&sb.path("store")).len(), 14, "nothing else deleted");

    // Again: nothing more to delete.
    let again = sb.run("bk-prune", &args).ok();
    let (kept3, pruned3) = again.decisions();
    assert_eq!((kept3, pruned3.len()), (kept, 0));
}

#[test]
fn the_newest_backup_is_never_deleted() {
    let sb = Sandbox::new();
    let store = sb.store();
    let alpha = nightly(&store, "alpha", "2026-11-21", 3);
    let beta = nightly(&store, "beta", "2026-10-01", 2);
    // Whatever the rule, the newest of each name stays.
    let r = sb.run("bk-prune", &[&store, "--keep-within", "1h", NOW]).ok();
    let (kept, pruned) = r.decisions();
    assert_eq!(ids(kept.iter().map(|k| &k.id)), [&alpha[2].id, &beta[1].id]);
    assert_eq!(kept[0].reasons, ["within 1h"]);
    assert_eq!(pruned.len(), 3);
    assert!(present(&alpha[2]) && present(&beta[1]));
    assert!(!present(&alpha[0]) && !present(&alpha[1]) && !present(&beta[0]));

    // A backup dated after "now" is kept, with a warning, and the rules count from the
    // newest one that is not in the future.
    let gamma = nightly(&store, "gamma", "2026-11-21", 3);
    let r = sb
        .run(
            "bk-prune",
            &[
                &store,
                "--name",
                "gamma",
                "--keep-last",
                "1",
                "--now",
                "2026-11-20T12:00:00Z",
            ],
        )
        .ok();
    let (kept, pruned) = r.decisions();
    assert_eq!(kept.len(), 2, "{}", r.stdout);
    assert_eq!(
        (kept[0].id.as_str(), &kept[0].reasons[..]),
        (gamma[1].id.as_str(), &["last".to_string()][..])
    );
    assert_eq!(kept[1].reasons, ["in the future"]);
    assert_eq!(ids(pruned.iter().map(|p| &p.id)), [&gamma[0].id]);
    assert!(
        r.stderr
            .contains("warning: gamma: gamma.20261121T001500Z is dated in the future"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_empty_policy_deletes_nothing_and_says_so() {
    let sb = Sandbox::new();
    let store = sb.store();
    let backups = nightly(&store, "alpha", "2026-11-21", 4);
    for options in [vec![], vec!["--keep-daily", "0"], vec!["--keep-within", "0d"]] {
        let r = sb
            .run("bk-prune", &[&[store.as_str(), NOW][..], &options].concat())
            .ok();
        let (kept, pruned) = r.decisions();
        assert_eq!((kept.len(), pruned.len()), (4, 0), "{options:?}");
        assert!(kept.iter().all(|k| k.reasons == ["empty policy: nothing is deleted"]));
        assert!(
            r.stderr.contains("the policy is empty, nothing is deleted"),
            "{}",
            r.stderr
        );
        assert!(backups.iter().all(present));
    }
}

#[test]
fn a_pipeline_prunes_only_the_names_that_came_in_in_their_stores() {
    let sb = Sandbox::new();
    let store = sb.store();
    let store2 = sb.path("store2").display().to_string();
    let old_alpha = nightly(&store, "alpha", "2020-01-10", 3);
    let beta = nightly(&store, "beta", "2020-01-10", 3);
    let far_alpha = nightly(&store2, "alpha", "2020-01-10", 2);
    let src = sb.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.txt"), "alpha\n").unwrap();
    let dump = sb
        .run("bk-dump", &["files", s(&src), "--name", "alpha", "--to", &store])
        .ok();
    let new_alpha = dump.artifact();

    let r = sb.run_with_stdin("bk-prune", &["--keep-last", "1"], &dump.stdout).ok();
    assert!(
        r.lines().starts_with(&dump.lines()),
        "the input record first, unchanged"
    );
    let (kept, pruned) = r.decisions();
    assert_eq!(ids(kept.iter().map(|k| &k.id)), [&new_alpha.id]);
    assert_eq!(pruned.len(), 3);
    assert!(present(&new_alpha) && !old_alpha.iter().any(present));
    assert!(beta.iter().all(present), "beta did not come in");
    assert!(far_alpha.iter().all(present), "store2 did not come in");

    // Records from two stores: each store is pruned (the newest of each stays).
    let other = Record::Artifact(far_alpha[1].clone()).to_line();
    let input = format!("{}{other}\n", dump.stdout);
    let r = sb.run_with_stdin("bk-prune", &["--keep-last", "1"], &input).ok();
    assert!(r.lines().starts_with(&[dump.lines(), vec![other.as_str()]].concat()));
    let (kept, pruned) = r.decisions();
    assert_eq!(kept.len(), 2, "{}", r.stdout);
    assert_eq!(ids(pruned.iter().map(|p| &p.id)), [&far_alpha[0].id]);
    assert!(!present(&far_alpha[0]) && present(&far_alpha[1]) && present(&new_alpha));

    // With a STORE argument, the names that came in are pruned in that store only.
    let more_beta = write_backup(&store, "beta", "20200201T001500Z");
    let beta_line = Record::Artifact(more_beta.clone()).to_line();
    let r = sb
        .run_with_stdin("bk-prune", &[&store, "--keep-last", "1"], &format!("{beta_line}\n"))
        .ok();
    let (kept, pruned) = r.decisions();
    assert_eq!(ids(kept.iter().map(|k| &k.id)), [&more_beta.id]);
    assert_eq!(pruned.len(), 3);
    assert!(!beta.iter().any(present) && present(&more_beta) && present(&new_alpha));
}

#[test]
fn an_upstream_error_stops_pruning_its_name() {
    let sb = Sandbox::new();
    let store = sb.store();
    let alpha = nightly(&store, "alpha", "2026-11-21", 3);
    let beta = nightly(&store, "beta", "2026-11-21", 3);
    let alpha_line = Record::Artifact(alpha[2].clone()).to_line();
    let error = |name: &str| {
        format!(
            r#"{{"bk":1,"type":"error","tool":"bk-dump"{name},"code":69,"message":"db3:3306 unreachable","future":[1]}}"#
        )
    };

    // The error of alpha's dump: nothing pruned for alpha, every record passed on, exit 1.
    let input = format!("{alpha_line}\n{}\n", error(r#","name":"alpha""#));
    let r = sb.run_with_stdin("bk-prune", &["--keep-last", "1"], &input).code(1);
    assert_eq!(
        r.lines(),
        input.lines().collect::<Vec<_>>(),
        "passed on unchanged, nothing added"
    );
    assert!(r.stderr.contains("alpha: nothing pruned"), "{}", r.stderr);
    assert!(alpha.iter().all(present));

    // The same with a STORE: beta is pruned, alpha is not.
    let r = sb
        .run_with_stdin(
            "bk-prune",
            &[&store, "--keep-last", "1", NOW],
            &error(r#","name":"alpha""#),
        )
        .code(1);
    let (kept, pruned) = r.decisions();
    assert_eq!(ids(kept.iter().map(|k| &k.id)), [&beta[2].id]);
    assert_eq!(pruned.len(), 2);
    assert!(alpha.iter().all(present) && !present(&beta[0]));

    // An error that names no job: nothing at all is pruned.
    let more = nightly(&store, "beta", "2026-11-25", 2);
    let input = format!("{}\n", error(""));
    let r = sb
        .run_with_stdin("bk-prune", &[&store, "--keep-last", "1", NOW], &input)
        .code(1);
    assert_eq!(r.lines(), input.lines().collect::<Vec<_>>());
    assert!(r.stderr.contains("nothing pruned"), "{}", r.stderr);
    assert!(alpha.iter().chain(&more).all(present) && present(&beta[2]));
}

#[test]
fn malformed_input_is_65_and_nothing_is_done() {
    let sb = Sandbox::new();
    let store = sb.store();
    let alpha = nightly(&store, "alpha", "2026-11-21", 3);
    let good = Record::Artifact(alpha[2].clone()).to_line();
    for args in [vec!["--keep-last", "1"], vec![store.as_str(), "--keep-last", "1"]] {
        let r = sb
            .run_with_stdin("bk-prune", &args, &format!("{good}\n{{\"bk\":1,\"type\"\n"))
            .code(65);
        assert!(r.error().message.contains("stdin line 2"), "{}", r.stderr);
        assert_eq!(r.records().len(), 1, "nothing but the error: {}", r.stdout);
        assert!(alpha.iter().all(present));
    }
}

#[test]
fn a_held_lock_is_75_and_other_names_go_on() {
    let sb = Sandbox::new();
    let store = sb.store();
    let alpha = nightly(&store, "alpha", "2026-11-21", 3);
    let beta = nightly(&store, "beta", "2026-11-21", 3);
    let _held = bk_core::lock::Lock::acquire(&sb.path("locks"), "alpha", None).unwrap();
    let r = sb.run("bk-prune", &[&store, "--keep-last", "1", NOW]).code(75);
    let e = r.error();
    assert_eq!(e.name.as_deref(), Some("alpha"));
    assert!(e.message.contains("holds"), "{}", e.message);
    assert!(alpha.iter().all(present));
    assert!(!present(&beta[0]) && present(&beta[2]), "beta was pruned");
    let (kept, _) = r.decisions();
    assert_eq!(ids(kept.iter().map(|k| &k.id)), [&beta[2].id]);
    // A dry run deletes nothing, so it does not wait for the lock.
    let r = sb.run("bk-prune", &[&store, "--keep-last", "1", "--dry-run", NOW]).ok();
    assert_eq!(r.decisions().1.len(), 2);
}

#[test]
fn old_leftover_temporary_files_are_removed_and_reported() {
    let sb = Sandbox::new();
    let store = sb.store();
    let alpha = nightly(&store, "alpha", "2020-01-10", 2);
    let dir = sb.path("store/alpha");
    let old = dir.join(".alpha.20261119T001500Z.tar.tmp.4242.0badf00d");
    let young = dir.join(".alpha.20261122T001500Z.tar.tmp.4243.cafe0001");
    fs::write(&old, "a killed run's partial file").unwrap();
    fs::write(&young, "a partial file").unwrap();
    let now = Utc::now();
    let two_days_ago = filetime::FileTime::from_unix_time((now - TimeDelta::days(2)).timestamp(), 0);
    filetime::set_file_mtime(&old, two_days_ago).unwrap();
    let now_text = bk_core::name::rfc3339(now);

    // BK_NOW is the clock when --now is not given.
    let mut cmd = sb.cmd("bk-prune", &[&store, "--keep-last", "5", "--dry-run"]);
    cmd.env("BK_NOW", &now_text);
    let r = run_cmd(cmd, "").ok();
    assert!(
        r.stderr.contains(&format!("alpha: would remove {}", s(&old))),
        "{}",
        r.stderr
    );
    assert!(old.exists() && young.exists());

    let mut cmd = sb.cmd("bk-prune", &[&store, "--keep-last", "5"]);
    cmd.env("BK_NOW", &now_text);
    let r = run_cmd(cmd, "").ok();
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stderr);
    assert!(
        lines[0].starts_with(&format!("bk-prune: warning: alpha: removed {}", s(&old))),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains(s(&young)) && lines[1].contains("temporary file of an unfinished run"),
        "the young one is only reported: {}",
        lines[1]
    );
    assert!(!old.exists() && young.exists());
    assert_eq!(r.decisions().0.len(), 2, "the backups stay");

    // Three days on, the young one is old too (--now wins over BK_NOW).
    let later = bk_core::name::rfc3339(now + TimeDelta::days(3));
    let mut cmd = sb.cmd("bk-prune", &[&store, "--keep-last", "5", "--now", &later]);
    cmd.env("BK_NOW", &now_text);
    let r = run_cmd(cmd, "").ok();
    assert!(r.stderr.contains(&format!("removed {}", s(&young))), "{}", r.stderr);
    assert!(!young.exists());
    assert!(alpha.iter().all(present));
}

#[test]
fn a_table_for_people() {
    let sb = Sandbox::new();
    let store = sb.store();
    nightly(&store, "alpha", "2026-11-21", 9);
    let r = sb
        .run(
            "bk-prune",
            &[
                &store,
                "--rolling",
                "--dry-run",
                "--format",
                "table",
                "--tz",
                "Europe/Berlin",
                NOW,
            ],
        )
        .ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 10, "a header and a row per backup: {}", r.stdout);
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("TIME (Europe/Berlin)") && lines[0].ends_with("REASONS"),
        "{}",
        lines[0]
    );
    let column = |line: &str, word: &str| line.find(word).unwrap_or_else(|| panic!("{word:?} in {line}"));
    let (time, decision) = (column(lines[0], "TIME"), column(lines[0], "DECISION"));
    // 00:15 UTC is 01:15 in Berlin in November.
    assert!(lines[9].starts_with("alpha.20261121T001500Z "), "{}", lines[9]);
    assert_eq!(column(lines[9], "Sat 2026-11-21 01:15"), time);
    assert_eq!(column(lines[9], "kept"), decision);
    assert!(
        lines[9].ends_with("daily 2026-11-21, weekly 2026-W47, monthly 2026-11"),
        "{}",
        lines[9]
    );
    // The oldest, 11-13, is kept because the weekly rule has count left; 11-14 is not.
    assert!(lines[1].ends_with("kept         oldest (weekly)"), "{}", lines[1]);
    assert_eq!(column(lines[2], "would prune"), decision, "{}", lines[2]);
    assert!(files_below(&sb.path("store")).len() == 18);
}

#[test]
fn usage_and_missing_stores() {
    let sb = Sandbox::new();
    let store = sb.store();
    nightly(&store, "alpha", "2026-11-21", 2);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![&store, "--keep-daily", "-2"], "-2"),
        (vec![&store, "--keep-within", "3x"], "3x"),
        (
            vec![&store, "--keep-daily", "7", "--tz", "Mars/Olympus"],
            "Mars/Olympus",
        ),
        (vec![&store, "--keep-daily", "7", "--now", "soon"], "soon"),
        (vec![&store, "--keep-daily", "7", "--name", "Bad.Name"], "Bad.Name"),
    ];
    for (args, mentioned) in cases {
        let r = sb.run("bk-prune", &args).code(64);
        assert!(r.error().message.contains(mentioned), "{args:?}: {}", r.stderr);
    }
    let missing = sb.path("no-store");
    let r = sb.run("bk-prune", &[s(&missing), "--keep-daily", "7"]).code(66);
    assert!(r.error().message.contains(s(&missing)));
    assert!(!missing.exists());
    let r = sb
        .run("bk-prune", &[&store, "--keep-daily", "7", "--name", "gamma"])
        .code(66);
    assert!(r.error().message.contains("no backup of gamma"));
    // No STORE and no records: the command before failed or was killed (SPEC §1).
    let r = sb.run("bk-prune", &["--keep-daily", "7"]).code(1);
    assert!(r.error().message.contains("printed nothing"), "{}", r.stderr);
    assert_eq!(files_below(&sb.path("store")).len(), 4);

    let r = sb.run("bk-prune", &["--help"]).ok();
    assert!(
        r.stdout.contains("Exit status") && r.stdout.contains("BK_NOW"),
        "{}",
        r.stdout
    );
    let r = sb.run("bk-prune", &["--version"]).ok();
    assert_eq!(r.stdout.trim(), format!("bk-prune {}", bk_core::BK_VERSION));
}

#[test]
fn a_failed_delete_is_an_error_record_and_the_rest_goes_on() {
    if !have_root() {
        return;
    }
    let sb = Sandbox::new();
    let store = sb.store();
    let alpha = nightly(&store, "alpha", "2026-11-21", 2);
    // nobody may read the store but not delete from it.
    for p in [sb.root().to_path_buf(), sb.path("store"), sb.path("store/alpha")] {
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    for f in files_below(&sb.path("store")) {
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let locks = sb.path("locks");
    fs::create_dir(&locks).unwrap();
    let nobody = nix::unistd::Uid::from_raw(65534);
    nix::unistd::chown(&locks, Some(nobody), Some(nix::unistd::Gid::from_raw(65534))).unwrap();
    let cmd = sb.cmd_via(&AS_NOBODY, "bk-prune", &[&store, "--keep-last", "1", NOW]);
    let r = run_cmd(cmd, "").code(77);
    let e = r.error();
    assert_eq!(e.name.as_deref(), Some("alpha"));
    assert!(
        e.message.contains("Permission denied") && e.message.contains(&alpha[0].id),
        "{}",
        e.message
    );
    let (kept, pruned) = r.decisions();
    assert_eq!(
        (kept.len(), pruned.len()),
        (1, 0),
        "no pruned record for what was not deleted"
    );
    assert!(alpha.iter().all(present));
}

// ---------------------------------------------------------------------------------------
// restic as the oracle

/// restic, or a SKIPPED note (a failure when the full suite runs: services.sh installs it).
fn restic_available() -> bool {
    let ok = Command::new("restic")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    let why = || "restic is not installed".into();
    needs(ok.then_some(()), why, "tests/services.sh installs it").is_some()
}

/// A restic repository in the sandbox.
struct Restic {
    repo: PathBuf,
    data: PathBuf,
}

impl Restic {
    fn cmd(&self, tz: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("restic");
        for var in [
            "RESTIC_PASSWORD_FILE",
            "RESTIC_PASSWORD_COMMAND",
            "RESTIC_REPOSITORY_FILE",
            "RESTIC_KEY_HINT",
            "RESTIC_CACHE_DIR",
        ] {
            cmd.env_remove(var);
        }
        cmd.arg("--no-cache")
            .args(args)
            .env("RESTIC_REPOSITORY", &self.repo)
            .env("RESTIC_PASSWORD", "bk-test")
            .env("TZ", tz)
            .stdin(Stdio::null());
        cmd
    }
}

/// Runs commands, `jobs` at a time; panics naming the first that fails.
fn run_all(cmds: Vec<Command>, jobs: usize) -> Vec<String> {
    let mut outputs = Vec::new();
    let mut cmds = cmds.into_iter().peekable();
    while cmds.peek().is_some() {
        let batch: Vec<(String, std::process::Child)> = cmds
            .by_ref()
            .take(jobs)
            .map(|mut c| {
                let what = format!("{c:?}");
                let child = c
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                (what, child)
            })
            .collect();
        for (what, child) in batch {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{what}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            outputs.push(String::from_utf8(out.stdout).unwrap());
        }
    }
    outputs
}

/// Backups in UTC across the calendar's edges: ISO weeks 2020-W01 (which starts in 2019)
/// and 2020-W53 (which ends in 2021), February 29, month ends, year ends; then two weeks
/// of nightly backups with missing days and days with several, and a busy last day.
fn utc_history() -> Vec<NaiveDateTime> {
    let mut times: Vec<NaiveDateTime> = [
        "2019-12-30 08:00:00",
        "2019-12-31 23:59:59",
        "2020-01-01 00:00:00",
        "2020-02-28 12:00:00",
        "2020-02-29 12:00:00",
        "2020-03-01 00:00:01",
        "2020-04-30 23:00:00",
        "2020-05-31 22:00:00",
        "2020-06-30 06:00:00",
        "2020-09-30 06:00:00",
        "2020-12-27 18:00:00",
        "2020-12-28 06:00:00",
        "2020-12-31 23:59:59",
        "2021-01-01 00:00:00",
        "2021-01-03 23:00:00",
        "2021-01-04 01:00:00",
    ]
    .iter()
    .map(|t| NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S").unwrap())
    .collect();
    let mut seed: u64 = 0x2545_f491;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    let mut day = NaiveDate::from_ymd_opt(2021, 2, 18).unwrap();
    while day <= NaiveDate::from_ymd_opt(2021, 3, 5).unwrap() {
        let backups = match next(8) {
            0 => 0,
            1 => 2,
            _ => 1,
        };
        for _ in 0..backups {
            let at = day
                .and_hms_opt(next(24) as u32, next(60) as u32, next(60) as u32)
                .unwrap();
            times.push(at);
        }
        day += TimeDelta::days(1);
    }
    for h in [3, 4, 7, 12] {
        times.push(
            NaiveDate::from_ymd_opt(2021, 3, 6)
                .unwrap()
                .and_hms_opt(h, 30, 0)
                .unwrap(),
        );
    }
    times.sort();
    times.dedup();
    times
}

/// Backups by Berlin's wall clock around a year end, a month end and both DST changes of
/// 2021 (never in the hour that is skipped or repeated: restic's --time could not say which).
fn berlin_history() -> Vec<NaiveDateTime> {
    [
        "2020-12-31 23:30:00",
        "2021-01-01 00:30:00",
        "2021-02-28 23:30:00",
        "2021-03-01 00:30:00",
        "2021-03-21 12:00:00",
        "2021-03-27 23:30:00",
        "2021-03-28 00:30:00",
        "2021-03-28 01:30:00",
        "2021-03-28 03:30:00",
        "2021-03-28 23:30:00",
        "2021-03-29 00:30:00",
        "2021-06-15 12:00:00",
        "2021-10-24 23:30:00",
        "2021-10-30 23:30:00",
        "2021-10-31 00:30:00",
        "2021-10-31 01:30:00",
        "2021-10-31 03:30:00",
        "2021-10-31 23:59:00",
        "2021-11-01 00:01:00",
    ]
    .iter()
    .map(|t| NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S").unwrap())
    .collect()
}

/// The policies both run. No -1 (restic 0.14 does not know it) and no rule may keep the
/// oldest backup only because it has count left (0.14 predates that rule): where bk keeps
/// the oldest for that reason alone, it is taken out before comparing.
const POLICIES: &[&str] = &[
    "--keep-last 5",
    "--keep-hourly 30",
    "--keep-daily 7",
    "--keep-daily 20 --keep-weekly 6",
    "--keep-weekly 10",
    "--keep-monthly 12",
    "--keep-yearly 3",
    "--keep-daily 7 --keep-weekly 4 --keep-monthly 12 --keep-yearly 2",
    "--keep-daily 6 --keep-weekly 4 --keep-monthly 1",
    "--keep-within 10d",
    "--keep-within 1m15d --keep-last 2",
    "--keep-within 2d12h --keep-hourly 10",
    "--keep-within-daily 20d --keep-within-weekly 2m",
    "--keep-within-hourly 3d --keep-within-monthly 1y",
    "--keep-within-yearly 2y --keep-last 3",
    "--keep-weekly 3 --keep-within-daily 1m --keep-monthly 30",
];

#[test]
fn the_same_decisions_as_restic_forget() {
    if !restic_available() {
        return;
    }
    let sb = Sandbox::new();
    let restic = Restic {
        repo: sb.path("repo"),
        data: sb.path("data"),
    };
    fs::create_dir_all(&restic.data).unwrap();
    fs::write(restic.data.join("f"), "x").unwrap();
    run_all(vec![restic.cmd("UTC", &["init", "--quiet"])], 1);

    // Each history is one restic group (by host), its snapshots made in its own zone, so
    // that restic counts the Berlin group's periods on Berlin's calendar.
    let berlin = Zone::parse("Europe/Berlin").unwrap();
    let groups: [(&str, &str, Zone, Vec<NaiveDateTime>); 2] = [
        ("utc", "UTC", Zone::parse("UTC").unwrap(), utc_history()),
        ("berlin", "Europe/Berlin", berlin, berlin_history()),
    ];
    let mut backups = Vec::new();
    for (host, tz, zone, walls) in &groups {
        for wall in walls {
            assert_eq!(zone.civil(zone.resolve(*wall)), *wall, "{wall} happens once in {tz}");
            let time = wall.format("%Y-%m-%d %H:%M:%S").to_string();
            let data = s(&restic.data);
            backups.push(restic.cmd(
                tz,
                &["backup", "--quiet", "--host", host, "--tag", "t", "--time", &time, data],
            ));
        }
    }
    let started = std::time::Instant::now();
    let count = backups.len();
    run_all(backups, 4);
    eprintln!("{count} restic snapshots in {:?}", started.elapsed());

    // Every policy at once, with Berlin as the local zone: the UTC group's snapshots carry
    // "Z" and stay in UTC.
    let forgets: Vec<Command> = POLICIES
        .iter()
        .map(|p| {
            let args = [
                &["--no-lock", "forget", "--dry-run", "--json"][..],
                &p.split_whitespace().collect::<Vec<_>>(),
            ]
            .concat();
            restic.cmd("Europe/Berlin", &args)
        })
        .collect();
    let outputs = run_all(forgets, 4);
    let mut failures = Vec::new();
    for (policy_text, output) in POLICIES.iter().zip(outputs) {
        let json: serde_json::Value =
            serde_json::from_str(&output).unwrap_or_else(|e| panic!("{policy_text}: {e}: {output}"));
        let policy = Cli::try_parse_from(std::iter::once("bk-prune").chain(policy_text.split_whitespace()))
            .unwrap()
            .keep
            .policy();
        for (host, tz, zone, walls) in &groups {
            let group = json
                .as_array()
                .unwrap()
                .iter()
                .find(|g| g["host"] == *host)
                .unwrap_or_else(|| panic!("{policy_text}: no group {host} in {output}"));
            let times = |key: &str| -> BTreeSet<DateTime<Utc>> {
                group[key]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|s| {
                                DateTime::parse_from_rfc3339(s["time"].as_str().unwrap())
                                    .unwrap()
                                    .with_timezone(&Utc)
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let (restic_kept, restic_removed) = (times("keep"), times("remove"));
            let utc: Vec<DateTime<Utc>> = walls.iter().map(|w| zone.resolve(*w)).collect();
            assert_eq!(
                restic_kept.len() + restic_removed.len(),
                utc.len(),
                "{policy_text}: restic saw every snapshot of {host}"
            );
            let ids: Vec<String> = (0..utc.len()).map(|i| format!("{host}.{i:03}")).collect();
            let dated: Vec<(&str, DateTime<Utc>)> = ids.iter().map(String::as_str).zip(utc.iter().copied()).collect();
            let far_future = DateTime::parse_from_rfc3339("2100-01-01T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc);
            let decisions = decide(&policy, zone, far_future, &dated);
            let oldest = (0..utc.len()).min_by_key(|&i| utc[i]).unwrap();
            let mut bk_kept = BTreeSet::new();
            let mut only_by_oldest_rule = false;
            for (i, d) in decisions.iter().enumerate() {
                if i == oldest && d.keep && d.reasons.iter().all(|r| r.starts_with("oldest (")) {
                    only_by_oldest_rule = true;
                } else if d.keep {
                    bk_kept.insert(utc[i]);
                }
            }
            if bk_kept != restic_kept {
                let reasons: BTreeMap<DateTime<Utc>, &Vec<String>> =
                    utc.iter().copied().zip(decisions.iter().map(|d| &d.reasons)).collect();
                let rows: Vec<String> = utc
                    .iter()
                    .map(|t| {
                        format!(
                            "  {}  ({} {tz})  bk {:5}  restic {:5}  {:?}",
                            bk_core::name::rfc3339(*t),
                            zone.civil(*t),
                            bk_kept.contains(t),
                            restic_kept.contains(t),
                            reasons[t]
                        )
                    })
                    .collect();
                failures.push(format!(
                    "{policy_text}, group {host} (oldest kept by the oldest rule alone: {only_by_oldest_rule}):\n{}",
                    rows.join("\n")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "bk and restic differ:\n{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------------------------------
// Retention sees reality (issue 11)

/// The kept records' reasons, by id.
fn kept_reasons(r: &Run) -> BTreeMap<String, Vec<String>> {
    r.decisions().0.into_iter().map(|k| (k.id, k.reasons)).collect()
}

#[test]
fn broken_backups_are_reported_never_counted_and_never_deleted() {
    let sb = Sandbox::new();
    let store = sb.store();
    // (what, the backup of 4 to break, how, the ids kept, whether nothing is deleted)
    type Break = fn(&Artifact);
    let missing: Break = |a| fs::remove_file(&a.location).unwrap();
    let resized: Break = |a| fs::write(&a.location, "cut").unwrap();
    let cases: [(&str, usize, Break, &str); 3] = [
        ("the newest artifact is missing", 3, missing, "is missing"),
        (
            "the newest artifact is of another size",
            3,
            resized,
            "is 3 bytes, the manifest says",
        ),
        ("an old artifact is missing", 1, missing, "is missing"),
    ];
    for (what, broken, how, why) in cases {
        fs::remove_dir_all(sb.path("store")).ok();
        let alpha = nightly(&store, "alpha", "2026-11-21", 4);
        how(&alpha[broken]);
        let manifests: Vec<PathBuf> = alpha.iter().map(manifest).collect();
        let args = [store.as_str(), "--keep-last", "1", NOW];
        let r = sb.run("bk-prune", &args).code(65);
        let e = r.error();
        assert_eq!(e.name.as_deref(), Some("alpha"), "{what}");
        assert!(
            e.message.contains(&alpha[broken].id) && e.message.contains("broken backup") && e.message.contains(why),
            "{what}: {}",
            e.message
        );
        let kept = kept_reasons(&r);
        assert!(
            !kept.contains_key(&alpha[broken].id),
            "{what}: a broken backup is no kept backup"
        );
        assert!(
            manifests[broken].exists(),
            "{what}: its manifest stays for a person to look at"
        );
        if broken == 3 {
            // The newest is broken: the older backups are all that is left, none is deleted.
            assert_eq!(r.decisions().1.len(), 0, "{what}: {}", r.stdout);
            assert_eq!(
                kept[&alpha[2].id],
                ["last"],
                "{what}: the newest good backup is counted"
            );
            for a in &alpha[..2] {
                assert!(present(a), "{what}: {}", a.id);
                assert_eq!(
                    kept[&a.id],
                    [format!(
                        "held: the newest backup {} is broken; nothing of alpha is deleted until it is repaired or removed",
                        alpha[3].id
                    )],
                    "{what}"
                );
            }
            assert!(
                r.stderr
                    .contains("warning: alpha: 2 backup(s) the policy would delete are kept"),
                "{}",
                r.stderr
            );
        } else {
            // An old broken backup stops nothing: the good ones are pruned by the policy.
            assert_eq!(ids(kept.keys()), [&alpha[3].id]);
            assert_eq!(ids(r.decisions().1.iter().map(|p| &p.id)), [&alpha[0].id, &alpha[2].id]);
            assert!(!present(&alpha[0]) && !present(&alpha[2]) && present(&alpha[3]));
        }
    }

    // In a pipeline: the record of a backup whose artifact then vanished.
    fs::remove_dir_all(sb.path("store")).ok();
    nightly(&store, "alpha", "2026-11-21", 2);
    let phantom = write_backup(&store, "alpha", "20261122T001500Z");
    fs::remove_file(&phantom.location).unwrap();
    let before = files_below(&sb.path("store"));
    let line = format!("{}\n", Record::Artifact(phantom.clone()).to_line());
    let r = sb
        .run_with_stdin("bk-prune", &["--keep-last", "1", NOW], &line)
        .code(65);
    assert!(r.error().message.contains(&phantom.id), "{}", r.stderr);
    assert_eq!(r.decisions().1.len(), 0);
    assert_eq!(files_below(&sb.path("store")), before, "nothing deleted");

    // A name whose every backup is broken is reported too, and other names are pruned.
    fs::remove_dir_all(sb.path("store")).ok();
    let beta = nightly(&store, "beta", "2026-11-21", 2);
    let gamma = nightly(&store, "gamma", "2026-11-21", 2);
    for a in &gamma {
        fs::remove_file(&a.location).unwrap();
    }
    let r = sb.run("bk-prune", &[&store, "--keep-last", "1", NOW]).code(65);
    let errors: Vec<String> = r
        .records()
        .into_iter()
        .filter_map(|rec| match rec {
            Record::Error(e) => Some(format!("{} {}", e.name.unwrap_or_default(), e.code)),
            _ => None,
        })
        .collect();
    assert_eq!(errors, ["gamma 65", "gamma 65"], "{}", r.stdout);
    assert!(!present(&beta[0]) && present(&beta[1]));
    assert!(gamma.iter().all(|a| manifest(a).exists()));
    let r = sb
        .run("bk-prune", &[&store, "--name", "gamma", "--keep-last", "1", NOW])
        .code(65);
    assert_eq!(r.decisions(), (vec![], vec![]));
}

#[test]
fn a_failed_verification_is_kept_and_not_counted() {
    let sb = Sandbox::new();
    let store = sb.store();
    let alpha = nightly(&store, "alpha", "2026-11-21", 4);
    // Rot inside an artifact, its size unchanged: only bk-verify can tell.
    let rot = |a: &Artifact| {
        let len = fs::read(&a.location).unwrap().len();
        fs::write(&a.location, "x".repeat(len)).unwrap();
    };
    // bk-verify's own record of it, without its error record (which would stop the name).
    let verified = |a: &Artifact| -> String {
        let r = sb.run("bk-verify", &["--from", &store, "--id", &a.id]).code(65);
        let line = r
            .lines()
            .into_iter()
            .find(|l| l.contains(r#""type":"verified""#))
            .unwrap_or_else(|| panic!("{}", r.stdout))
            .to_string();
        assert!(line.contains(r#""ok":false"#), "{line}");
        format!("{line}\n")
    };
    rot(&alpha[1]);
    let input = verified(&alpha[1]);
    let r = sb
        .run_with_stdin("bk-prune", &[&store, "--keep-last", "2", NOW], &input)
        .ok();
    assert_eq!(r.lines()[0], input.trim_end(), "passed on first");
    let kept = kept_reasons(&r);
    assert_eq!(kept[&alpha[3].id], ["last"]);
    assert_eq!(kept[&alpha[2].id], ["last"]);
    assert_eq!(
        kept[&alpha[1].id],
        ["not counted: its verification failed earlier in the pipeline"]
    );
    assert_eq!(ids(r.decisions().1.iter().map(|p| &p.id)), [&alpha[0].id]);
    assert!(!present(&alpha[0]) && alpha[1..].iter().all(present));

    // The newest failed: it is kept, and so is everything else.
    rot(&alpha[3]);
    let input = verified(&alpha[3]);
    let r = sb
        .run_with_stdin("bk-prune", &[&store, "--keep-last", "1", NOW], &input)
        .ok();
    let (kept, pruned) = r.decisions();
    assert_eq!((kept.len(), pruned.len()), (3, 0), "{}", r.stdout);
    assert!(kept[0].reasons[0].starts_with(&format!(
        "held: the newest backup {} failed its verification",
        alpha[3].id
    )));
    assert!(alpha[1..].iter().all(present));

    // A verified record of another copy (another location) does not name these backups.
    let elsewhere = input.replace(&alpha[3].location, "/elsewhere/alpha/x.tar");
    let r = sb
        .run_with_stdin("bk-prune", &[&store, "--keep-last", "1", NOW], &elsewhere)
        .ok();
    assert_eq!(ids(r.decisions().1.iter().map(|p| &p.id)), [&alpha[1].id, &alpha[2].id]);
}

#[test]
fn a_tz_that_names_no_zone_is_refused() {
    let sb = Sandbox::new();
    let store = sb.store();
    // 2026-11-21 12:00 UTC is already the 22nd at UTC+14.
    write_backup(&store, "alpha", "20261120T120000Z");
    let newest = write_backup(&store, "alpha", "20261121T120000Z");
    let day_of_newest = |tz: &str| -> Run {
        let mut cmd = sb.cmd("bk-prune", &[&store, "--keep-daily", "1", "--dry-run", NOW]);
        cmd.env("TZ", tz);
        run_cmd(cmd, "")
    };
    let resolved = [
        ("", "2026-11-21"),
        ("UTC0", "2026-11-21"),
        ("<+14>-14", "2026-11-22"),
        ("ABC-14", "2026-11-22"),
        ("CET-1CEST,M3.5.0,M10.5.0/3", "2026-11-21"),
        ("Pacific/Kiritimati", "2026-11-22"),
        (":Pacific/Kiritimati", "2026-11-22"),
        (":/usr/share/zoneinfo/Pacific/Kiritimati", "2026-11-22"),
        ("EST5EDT", "2026-11-21"),
    ];
    for (tz, day) in resolved {
        let r = day_of_newest(tz).ok();
        assert_eq!(kept_reasons(&r)[&newest.id], [format!("daily {day}")], "TZ={tz:?}");
    }
    for tz in [
        "Mars/Olympus",
        "Europe/Berlinx",
        ":Nowhere/Else",
        ":/etc/passwd",
        "Europe",
        "UTC+",
        "IST-1GMT0",
        "CET-1CEST,M13.5.0,M10.5.0",
        "AB0",
    ] {
        let r = day_of_newest(tz).code(78);
        let e = r.error();
        assert!(
            e.message
                .starts_with(&format!("TZ={tz:?} names no time zone: use an IANA name"))
                && e.message.contains("--tz"),
            "TZ={tz:?}: {}",
            e.message
        );
        assert_eq!(r.decisions(), (vec![], vec![]));
    }
    // --tz wins over TZ, and an unknown --tz is a usage error (64) worded alike.
    let mut cmd = sb.cmd(
        "bk-prune",
        &[&store, "--keep-daily", "1", "--tz", "UTC", "--dry-run", NOW],
    );
    cmd.env("TZ", "Mars/Olympus");
    run_cmd(cmd, "").ok();
    let r = sb
        .run("bk-prune", &[&store, "--keep-daily", "1", "--tz", "Mars/Olympus"])
        .code(64);
    assert!(
        r.error()
            .message
            .contains("unknown time zone \"Mars/Olympus\": use an IANA name"),
        "{}",
        r.stderr
    );
}

#[test]
fn names_from_records_never_leave_the_lock_directory() {
    let sb = Sandbox::new();
    let store = sb.store();
    let alpha = nightly(&store, "alpha", "2026-11-21", 2);
    let outside = Path::new("/tmp/pwn.lock");
    let existed = outside.exists();
    let hostile = Record::Artifact(alpha[1].clone())
        .to_line()
        .replace(r#""name":"alpha""#, r#""name":"../../../tmp/pwn""#);
    assert!(hostile.contains("../../../tmp/pwn"));
    let before = bk_tests::tree_digest(sb.root());
    for args in [vec!["--keep-last", "1"], vec![store.as_str(), "--keep-last", "1"]] {
        let r = sb.run_with_stdin("bk-prune", &args, &format!("{hostile}\n")).code(65);
        assert!(r.error().message.contains(r#"field "name""#), "{}", r.stderr);
        assert_eq!(
            bk_tests::tree_digest(sb.root()),
            before,
            "{args:?}: nothing created or deleted"
        );
        assert_eq!(outside.exists(), existed, "no lock outside the lock directory");
    }

    // The same name in a manifest in the store: a broken backup, and nothing else happens.
    let planted = sb.path("store/alpha/alpha.20261122T001500Z.json");
    fs::write(&planted, format!("{hostile}\n")).unwrap();
    let store_before = bk_tests::tree_digest(&sb.path("store"));
    let r = sb.run("bk-prune", &[&store, "--keep-last", "1", NOW]).code(65);
    assert!(r.error().message.contains("alpha.20261122T001500Z"), "{}", r.stderr);
    assert_eq!(
        bk_tests::tree_digest(&sb.path("store")),
        store_before,
        "nothing deleted"
    );
    let locks: Vec<String> = fs::read_dir(sb.path("locks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(locks, ["alpha.lock"]);
    assert_eq!(outside.exists(), existed);
}
