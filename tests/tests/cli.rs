//! What every tool shares: records on stdin, in-band errors, usage errors, a closed stdout,
//! and bk-ls's listing and bk-restore's choice of a backup; and the one binary, `bk`, that
//! runs each tool.

use std::fs;
use std::path::PathBuf;

use bk_core::record::{Artifact, Record};
use bk_tests::{files_below, run_cmd, s, write_backup, write_files, Run, Sandbox};

/// A one-file tree at `<sandbox>/src`, backed up as `name`.
fn dumped(sb: &Sandbox, name: &str) -> (PathBuf, Artifact) {
    let src = sb.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.txt"), "alpha\n").unwrap();
    let a = sb.dump(&["files", s(&src), "--name", name]);
    (src, a)
}

#[test]
fn restore_refuses_malformed_input_naming_the_line() {
    let sb = Sandbox::new();
    let (_, a) = dumped(&sb, "job");
    let good = Record::Artifact(a).to_line();
    let target = sb.path("target");
    let restore = |stdin: &str| -> Run {
        let r = sb.run_with_stdin("bk-restore", &["--to", s(&target)], stdin).code(65);
        assert!(!target.exists(), "nothing written at the target: {}", r.stderr);
        assert_eq!(r.records().len(), 1, "nothing on stdout but the error: {}", r.stdout);
        r
    };
    let expect = |r: &Run, parts: &[&str]| {
        let e = r.error();
        assert_eq!(e.tool, "bk-restore");
        for part in parts {
            assert!(e.message.contains(part), "{part:?} not in {:?}", e.message);
        }
    };

    // A good record, a blank line, then a line cut short: line 3 (blank lines count).
    let r = restore(&format!("{good}\n\n{}\n", &good[..good.len() / 2]));
    expect(&r, &["stdin line 3", "malformed JSON"]);
    let r = restore(&format!("{good} trailing\n{good}\n"));
    expect(&r, &["stdin line 1", "malformed JSON"]);
    // JSON, but not a bk record.
    let r = restore("{\"hello\":\"world\",\"type\":\"artifact\"}\n");
    expect(&r, &["stdin line 1", "not a bk record"]);
    let r = restore("[1,2,3]\n");
    expect(&r, &["stdin line 1", "JSON object"]);
}

#[test]
fn an_upstream_error_is_passed_on_and_nothing_restored() {
    let sb = Sandbox::new();
    let (_, a) = dumped(&sb, "job");
    let target = sb.path("target");
    // Our own field order and an unknown field: passed on byte for byte all the same.
    let error = r#"{"type":"error","bk":1,"tool":"bk-dump","name":"job","code":69,"message":"db3:3306 unreachable","future":{"x":[1,2]}}"#;

    let r = sb
        .run_with_stdin("bk-restore", &["--to", s(&target)], &format!("{error}\n"))
        .code(1);
    assert_eq!(r.lines(), [error]);
    assert!(r.stderr.contains("upstream"), "{}", r.stderr);
    assert!(!target.exists());

    // With an artifact record too: still nothing restored.
    let input = format!("{}\n{error}\n", Record::Artifact(a).to_line());
    let r = sb.run_with_stdin("bk-restore", &["--to", s(&target)], &input).code(1);
    assert!(r.stdout.lines().any(|l| l == error), "{}", r.stdout);
    assert!(!r.records().iter().any(|rec| matches!(rec, Record::Restored(_))));
    assert!(!target.exists());
}

#[test]
fn usage_errors_exit_64_with_an_error_record() {
    let (sb, src) = Sandbox::with_src(|src| write_files(src, &[("x", "x")]));
    let store = sb.store();
    let target = sb.path("target");
    let (src, target) = (s(&src), s(&target));
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("bk-dump", vec!["files", src, "--to", &store, "--bogus"], "--bogus"),
        ("bk-ls", vec![&store, "--bogus"], "--bogus"),
        (
            "bk-restore",
            vec!["--from", &store, "--name", "x", "--to", target, "--bogus"],
            "--bogus",
        ),
        ("bk-dump", vec!["files", src], "--to"),
        (
            "bk-dump",
            vec!["files", src, "--to", &store, "--name", "Bad.Name"],
            "Bad.Name",
        ),
        ("bk-dump", vec!["files", src, "--to", &store, "--level", "99"], "99"),
        (
            "bk-dump",
            vec!["files", src, "--to", &store, "--encrypt-to", "age1notakey"],
            "age1notakey",
        ),
        ("bk-ls", vec![&store, "--name", "Bad.Name"], "Bad.Name"),
        (
            "bk-restore",
            vec!["--from", &store, "--name", "x", "--to", target, "--at", "yesterday"],
            "yesterday",
        ),
    ];
    for (tool, args, mentioned) in cases {
        let r = sb.run(tool, &args).code(64);
        let e = r.error();
        assert_eq!(e.tool, tool);
        assert!(
            e.message.contains(mentioned),
            "{tool} {args:?}: {mentioned:?} not in {:?}",
            e.message
        );
        assert!(files_below(&sb.path("store")).is_empty(), "{tool} {args:?} left files");
        assert!(!sb.path("target").exists());
    }

    for tool in ["bk-dump", "bk-ls", "bk-restore"] {
        let r = sb.run(tool, &["--help"]).ok();
        assert!(
            r.stdout.contains("Usage:") && r.stdout.contains("Exit status"),
            "{tool}: {}",
            r.stdout
        );
        assert!(r.stderr.is_empty(), "{}", r.stderr);
        let r = sb.run(tool, &["--version"]).ok();
        assert_eq!(r.stdout.trim(), format!("{tool} {}", bk_core::BK_VERSION));
        assert!(r.stderr.is_empty(), "{}", r.stderr);
    }
}

#[test]
fn a_closed_stdout_ends_quietly_with_0() {
    let sb = Sandbox::new();
    let (src, _) = dumped(&sb, "one");
    for name in ["two", "three"] {
        sb.dump(&["files", s(&src), "--name", name]);
    }
    for _ in 0..3 {
        let mut child = sb.spawn("bk-ls", &[&sb.store()]);
        drop(child.stdout.take());
        let r = Run::from(child.wait_with_output().unwrap());
        assert_eq!(r.code, 0, "{r:?}");
        assert!(r.stderr.is_empty(), "stderr: {}", r.stderr);
    }
}

#[test]
fn bk_ls_lists_manifests() {
    let sb = Sandbox::new();
    let (src, a1) = dumped(&sb, "alpha");
    let a2 = sb.dump(&["files", s(&src), "--name", "alpha"]);
    let b1 = sb.dump(&["files", s(&src), "--name", "beta"]);
    let store = sb.store();

    let r = sb.run("bk-ls", &[&store]).ok();
    assert_eq!(
        r.artifacts(),
        vec![a1.clone(), a2.clone(), b1.clone()],
        "by name, oldest first"
    );
    assert!(r.stderr.is_empty(), "{}", r.stderr);

    let r = sb.run("bk-ls", &[&store, "--format", "table"]).ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "a header and one row per backup: {}", r.stdout);
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("ENGINE"),
        "{}",
        lines[0]
    );
    for (line, a) in lines[1..].iter().zip([&a1, &a2, &b1]) {
        assert!(
            line.starts_with(&format!("{} ", a.id)) && line.contains("files"),
            "{line}"
        );
    }

    let r = sb.run("bk-ls", &[&store, "--latest"]).ok();
    assert_eq!(r.artifacts(), vec![a2.clone(), b1.clone()], "the newest of each name");
    let r = sb.run("bk-ls", &[&store, "--name", "alpha", "--latest"]).ok();
    assert_eq!(r.artifacts(), vec![a2.clone()]);
    let r = sb.run("bk-ls", &[&store, "--name", "alpha"]).ok();
    assert_eq!(r.artifacts(), vec![a1.clone(), a2.clone()]);

    let r = sb.run("bk-ls", &[&store, "--name", "gamma"]).code(66);
    assert!(r.error().message.contains("gamma"), "{}", r.stderr);
    let missing = sb.path("no-store");
    let r = sb.run("bk-ls", &[s(&missing)]).code(66);
    assert!(r.error().message.contains(s(&missing)), "{}", r.stderr);
    assert!(!missing.exists(), "listing creates no store");

    // A file without a manifest is not a backup: a warning on stderr, never on stdout.
    let leftover = sb.path("store/alpha/alpha.20200101T000000Z.tar.zst");
    fs::write(&leftover, "half a backup").unwrap();
    let r = sb.run("bk-ls", &[&store]).ok();
    assert_eq!(r.artifacts(), vec![a1, a2, b1], "stdout lists the same backups");
    assert_eq!(r.records().len(), 3);
    let warnings: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(warnings.len(), 1, "{}", r.stderr);
    assert!(
        warnings[0].starts_with("bk-ls: warning: ")
            && warnings[0].contains(s(&leftover))
            && warnings[0].contains("no manifest"),
        "{}",
        warnings[0]
    );
}

/// bk-ls --stale: an error record (code 1) for each name whose newest backup is older than
/// the duration, or that has none at all, and exit 1; the listing as without --stale.
#[test]
fn bk_ls_stale_reports_each_name_without_a_recent_backup() {
    let sb = Sandbox::new();
    let store = sb.store();
    let alpha = [
        write_backup(&store, "alpha", "20261120T001500Z"),
        write_backup(&store, "alpha", "20261121T001500Z"),
    ];
    let beta = write_backup(&store, "beta", "20261119T001500Z");
    let everything = vec![alpha[0].clone(), alpha[1].clone(), beta.clone()];
    const NOW: &str = "--now=2026-11-22T06:00:00Z";
    let beta_stale = "no backup of beta for 3d 5h, stale after 2d: the newest, beta.20261119T001500Z, \
                      was made 2026-11-19T00:15:00Z";
    /// (case, options, exit code, the names reported stale, each message says, listed)
    type Case<'a> = (&'a str, Vec<&'a str>, i32, Vec<&'a str>, Vec<&'a str>, Vec<Artifact>);
    let cases: Vec<Case> = vec![
        (
            "all fresh",
            vec!["--stale", "4d"],
            0,
            vec![],
            vec![],
            everything.clone(),
        ),
        (
            "one stale",
            vec!["--stale", "2d"],
            1,
            vec!["beta"],
            vec![beta_stale],
            everything.clone(),
        ),
        (
            "several stale",
            vec!["--stale", "26h"],
            1,
            vec!["alpha", "beta"],
            vec![
                "no backup of alpha for 1d 5h, stale after 26h",
                "no backup of beta for 3d 5h",
            ],
            everything.clone(),
        ),
        (
            "--name leaves the others out",
            vec!["--stale", "2d", "--name", "alpha"],
            0,
            vec![],
            vec![],
            alpha.to_vec(),
        ),
        (
            "several --name",
            vec!["--stale", "2d", "--name", "beta", "--name", "alpha"],
            1,
            vec!["beta"],
            vec![beta_stale],
            everything.clone(),
        ),
        (
            "a --name that never ran",
            vec!["--stale", "2d", "--name", "gamma", "--name", "alpha"],
            1,
            vec!["gamma"],
            vec!["no backup of gamma in", "stale after 2d"],
            alpha.to_vec(),
        ),
        (
            "--latest",
            vec!["--stale", "2d", "--latest"],
            1,
            vec!["beta"],
            vec![beta_stale],
            vec![alpha[1].clone(), beta.clone()],
        ),
    ];
    for (case, options, code, stale, says, listed) in cases {
        let r = sb.run("bk-ls", &[&[store.as_str(), NOW][..], &options].concat());
        assert_eq!(
            r.code, code,
            "{case}: exit code\nstdout: {}\nstderr: {}",
            r.stdout, r.stderr
        );
        assert_eq!(r.artifacts(), listed, "{case}: the listing");
        let errors: Vec<_> = r
            .records()
            .into_iter()
            .filter_map(|r| if let Record::Error(e) = r { Some(e) } else { None })
            .collect();
        assert_eq!(
            errors
                .iter()
                .map(|e| e.name.as_deref().unwrap_or(""))
                .collect::<Vec<_>>(),
            stale,
            "{case}: {}",
            r.stdout
        );
        for e in &errors {
            assert_eq!((e.code, e.tool.as_str()), (1, "bk-ls"), "{case}: {e:?}");
            assert!(says.iter().any(|w| e.message.contains(w)), "{case}: {}", e.message);
            assert!(r.stderr.contains(&e.message), "{case}: stderr carries it: {}", r.stderr);
        }
        for w in &says {
            assert!(
                errors.iter().any(|e| e.message.contains(w)),
                "{case}: none says {w:?}: {}",
                r.stdout
            );
        }
    }

    // BK_NOW is --now for a whole cron line.
    let mut cmd = sb.cmd("bk-ls", &[&store, "--stale", "2d"]);
    cmd.env("BK_NOW", "2026-11-22T06:00:00Z");
    let r = run_cmd(cmd, "");
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.error().name.as_deref(), Some("beta"));

    for (case, options, bad) in [
        ("a bad duration", ["--stale", "3x", NOW], "3x"),
        ("a bad time", ["--stale", "2d", "--now=yesterday"], "yesterday"),
    ] {
        let r = sb.run("bk-ls", &[&[store.as_str()][..], &options].concat()).code(64);
        assert!(r.error().message.contains(bad), "{case}: {}", r.stderr);
    }
}

#[test]
fn restore_from_a_store_picks_by_id_time_or_latest() {
    let sb = Sandbox::new();
    let (src, first) = dumped(&sb, "pick");
    fs::write(src.join("a.txt"), "bravo\n").unwrap();
    let second = sb.dump(&["files", s(&src), "--name", "pick"]);
    assert!(first.started < second.started, "{} {}", first.started, second.started);
    let store = sb.store();
    let n = std::cell::Cell::new(0);
    // Restores with the given selection; returns the restored id and a.txt's content.
    let restore = |select: &[&str]| -> (String, String) {
        n.set(n.get() + 1);
        let target = sb.path(&format!("target-{}", n.get()));
        let args = [&["--from", store.as_str(), "--to", s(&target)][..], select].concat();
        let r = sb.run("bk-restore", &args).ok();
        let content = fs::read_to_string(target.join(src.strip_prefix("/").unwrap()).join("a.txt")).unwrap();
        (r.restored().id, content)
    };
    let one = (first.id.clone(), "alpha\n".to_string());
    let two = (second.id.clone(), "bravo\n".to_string());

    assert_eq!(restore(&["--id", &first.id]), one);
    assert_eq!(restore(&["--name", "pick", "--id", &second.id]), two);
    assert_eq!(restore(&["--name", "pick", "--latest"]), two);
    assert_eq!(restore(&["--name", "pick"]), two, "the newest by default");
    // A time before the newest backup (as RFC 3339 or as a stamp) picks the one before.
    assert_eq!(restore(&["--name", "pick", "--at", &first.started]), one);
    let stamp = first.id.rsplit_once('.').unwrap().1;
    assert_eq!(restore(&["--name", "pick", "--at", stamp]), one);
    assert_eq!(restore(&["--name", "pick", "--at", &second.started]), two);
    assert_eq!(restore(&["--name", "pick", "--at", "2999-01-01"]), two);

    let target = sb.path("target-none");
    for select in [
        vec!["--name", "pick", "--at", "2000-01-01T00:00:00Z"],
        vec!["--name", "pick", "--id", "pick.20000101T000000Z"],
        vec!["--name", "nothing"],
    ] {
        let args = [&["--from", store.as_str(), "--to", s(&target)][..], &select].concat();
        let r = sb.run("bk-restore", &args).code(66);
        let e = r.error();
        assert!(e.message.starts_with("no backup of"), "{}", e.message);
        assert!(!target.exists());
    }
}

/// `bk TOOL` (or `bk bk-TOOL`) runs the tool; anything else is a usage error on stderr.
#[test]
fn bk_runs_each_tool_by_name_and_refuses_anything_else() {
    let sb = Sandbox::new();
    let missing = sb.path("missing");
    let version = |tool: &str| format!("{tool} {}\n", bk_core::BK_VERSION);
    let cases: [(&str, Vec<&str>, i32, String, &str); 6] = [
        ("a tool by name", vec!["ls", "--version"], 0, version("bk-ls"), ""),
        (
            "a tool by its own name",
            vec!["bk-prune", "--version"],
            0,
            version("bk-prune"),
            "",
        ),
        (
            "a tool's own usage error",
            vec!["dump", "--bogus"],
            64,
            String::new(),
            "bk-dump: unexpected argument '--bogus' found",
        ),
        (
            "no such tool",
            vec!["nope"],
            64,
            String::new(),
            "bk: no tool named 'nope'; try 'bk --help'",
        ),
        ("nothing to run", vec![], 64, String::new(), "Usage: bk TOOL [ARGS]..."),
        (
            "links into a missing directory",
            vec!["--install-links", s(&missing)],
            66,
            String::new(),
            "bk: ",
        ),
    ];
    for (case, args, code, stdout, stderr) in cases {
        let r = sb.run("bk", &args);
        assert_eq!(r.code, code, "{case}: exit code; stderr: {}", r.stderr);
        assert!(
            r.stderr.contains(stderr),
            "{case}: stderr {:?} lacks {stderr:?}",
            r.stderr
        );
        if code == 64 && args.first() == Some(&"dump") {
            let e = r.error();
            assert_eq!((e.tool.as_str(), e.code), ("bk-dump", 64), "{case}");
        } else {
            assert_eq!(r.stdout, stdout, "{case}: stdout");
        }
    }
    assert!(!missing.exists(), "no directory is created for links");
}
