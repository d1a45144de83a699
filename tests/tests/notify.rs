//! bk-notify through the real binary: it passes every record on unchanged and exits 1 when
//! the pipeline before it failed (an error record, a verification that did not pass); its
//! webhook reaches a real HTTP receiver on loopback, retries what may pass, keeps the
//! backup's own status when the receiver is down, and never shows the URL's token.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use bk_core::record::Record;
use bk_tests::{artifact_line, free_port, write_backup, Receiver, Run, Sandbox};
use serde_json::{Map, Value};

/// A backup's artifact line, written into the sandbox's store.
fn backup(sb: &Sandbox, name: &str) -> String {
    artifact_line(&write_backup(&sb.store(), name, "20261122T001500Z"))
        .trim_end()
        .to_string()
}

const FUTURE: &str = r#"{"bk":1,"type":"hologram","id":"x","shape":[1,2]}"#;
const ERROR: &str =
    r#"{"bk":1,"type":"error","tool":"bk-dump","name":"db","code":69,"message":"cannot connect to db3"}"#;
const VERIFIED_OK: &str = r#"{"bk":1,"type":"verified","id":"db.20261122T001500Z","ok":true,"level":"integrity","checks":{},"mismatches":[]}"#;
const VERIFIED_BAD: &str = r#"{"bk":1,"type":"verified","id":"db.20261122T001500Z","ok":false,"level":"integrity","checks":{},"mismatches":[]}"#;

#[test]
fn passes_every_record_and_fails_when_the_pipeline_did() {
    let sb = Sandbox::new();
    let artifact = backup(&sb, "files-etc");
    let cases: [(&str, Vec<&str>, i32); 4] = [
        ("a good run", vec![&artifact, FUTURE, VERIFIED_OK], 0),
        ("an upstream error", vec![&artifact, ERROR], 1),
        ("a failed verification", vec![&artifact, VERIFIED_BAD], 1),
        ("an unknown record alone", vec![FUTURE], 0),
    ];
    for (case, lines, code) in cases {
        let stdin = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
        let run = sb.run_with_stdin("bk-notify", &[], &stdin);
        assert_eq!(
            run.code, code,
            "{case}: exit code\nstdout: {}\nstderr: {}",
            run.stdout, run.stderr
        );
        assert_eq!(run.lines(), lines, "{case}: every record passed on unchanged");
        assert_eq!(run.records().len(), lines.len(), "{case}");
        assert_eq!(run.stderr, "", "{case}: nothing on stderr");
    }
}

#[test]
fn nothing_on_stdin_is_an_upstream_failure() {
    let sb = Sandbox::new();
    let run = sb.run_with_stdin("bk-notify", &[], "");
    let e = run.failed("empty stdin", 1, &["no records on stdin"]);
    assert_eq!(e.tool, "bk-notify");
}

/// The token a webhook URL carries in its path: it must never be shown.
const TOKEN: &str = "T0KEN-s3cr3t";

/// A private file (mode 0600) holding `url`, as `@FILE`.
fn url_file(sb: &Sandbox, url: &str) -> (PathBuf, String) {
    let path = sb.path("webhook.url");
    fs::write(&path, format!("{url}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let arg = format!("@{}", path.display());
    (path, arg)
}

fn stdin_of(lines: &[&str]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn notified(run: &Run) -> Vec<Map<String, Value>> {
    run.records()
        .into_iter()
        .filter_map(|r| if let Record::Notified(n) = r { Some(n) } else { None })
        .collect()
}

fn error_records(run: &Run) -> Vec<bk_core::record::ErrorRecord> {
    run.records()
        .into_iter()
        .filter_map(|r| if let Record::Error(e) = r { Some(e) } else { None })
        .collect()
}

#[test]
fn webhook_is_posted_on_failure_or_always_without_its_token() {
    let sb = Sandbox::new();
    let artifact = backup(&sb, "files-etc");
    let good = stdin_of(&[&artifact]);
    let bad = stdin_of(&[&artifact, ERROR]);
    // (case, stdin, --on, exit code, the text says)
    let cases = [
        ("good run, on failure", &good, "failure", 0, None),
        (
            "good run, always",
            &good,
            "always",
            0,
            Some("files-etc: backed up files-etc.20261122T001500Z"),
        ),
        (
            "failed run",
            &bad,
            "failure",
            1,
            Some("FAILED db: bk-dump: cannot connect to db3"),
        ),
    ];
    for (case, stdin, on, code, says) in cases {
        let receiver = Receiver::start(&[]);
        let (_, arg) = url_file(&sb, &receiver.url(&format!("/hooks/{TOKEN}?key={TOKEN}")));
        let run = sb.run_with_stdin("bk-notify", &["--webhook", &arg, "--on", on], stdin);
        assert_eq!(run.code, code, "{case}\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
        run.assert_hides(case, &[TOKEN]);
        let received = receiver.received();
        let Some(says) = says else {
            assert!(received.is_empty(), "{case}: nothing sent: {received:?}");
            assert!(notified(&run).is_empty(), "{case}: {}", run.stdout);
            continue;
        };
        assert_eq!(received.len(), 1, "{case}: one request: {received:?}");
        assert_eq!(received[0].method, "POST", "{case}");
        assert_eq!(received[0].path, format!("/hooks/{TOKEN}?key={TOKEN}"), "{case}");
        let body: Value = serde_json::from_str(&received[0].body).unwrap();
        let text = body["text"].as_str().unwrap();
        assert!(text.contains(says), "{case}: the text says {says:?}: {text}");
        let records = body["records"].as_array().unwrap();
        let passed: Vec<Value> = stdin.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(records, &passed, "{case}: the body has the records");
        assert!(!received[0].body.contains(TOKEN), "{case}: no secret in the body");
        let sinks = notified(&run);
        assert_eq!(sinks.len(), 1, "{case}: {}", run.stdout);
        assert_eq!(sinks[0]["sink"], "webhook");
        assert_eq!(sinks[0]["target"], receiver.url("/(redacted)"));
        assert_eq!(sinks[0]["status"], 200);
        assert_eq!(sinks[0]["ok"], true);
    }
}

#[test]
fn webhook_retries_5xx_and_reports_4xx_at_once() {
    let sb = Sandbox::new();
    let stdin = stdin_of(&[ERROR]);
    // (case, programmed statuses, requests expected, exit code, last status, ok)
    let cases = [
        ("two 500s then 200", vec![500, 502], 3, 1, 200, true),
        ("always 503", vec![503, 503, 503], 3, 1, 503, false),
        ("a 404", vec![404], 1, 1, 404, false),
    ];
    for (case, statuses, requests, code, status, ok) in cases {
        let receiver = Receiver::start(&statuses);
        let (_, arg) = url_file(&sb, &receiver.url(&format!("/{TOKEN}")));
        let run = sb.run_with_stdin("bk-notify", &["--webhook", &arg], &stdin);
        assert_eq!(
            run.code, code,
            "{case}: the backup's status is kept\nstdout: {}\nstderr: {}",
            run.stdout, run.stderr
        );
        assert_eq!(receiver.received().len(), requests, "{case}");
        let sinks = notified(&run);
        assert_eq!(
            (sinks[0]["status"].clone(), sinks[0]["ok"].clone()),
            (status.into(), ok.into()),
            "{case}"
        );
        let errors = error_records(&run);
        assert_eq!(errors.len(), if ok { 1 } else { 2 }, "{case}: {}", run.stdout);
        if !ok {
            assert_eq!((errors[1].tool.as_str(), errors[1].code), ("bk-notify", 69), "{case}");
            assert!(
                errors[1].message.contains(&format!("HTTP {status}")),
                "{case}: {}",
                errors[1].message
            );
        }
        run.assert_hides(case, &[TOKEN]);
    }
}

#[test]
fn a_receiver_down_is_69_unless_the_backup_failed() {
    let sb = Sandbox::new();
    let artifact = backup(&sb, "files-etc");
    let url = format!("http://127.0.0.1:{}/{TOKEN}", free_port());
    let (_, arg) = url_file(&sb, &url);
    let run = sb.run_with_stdin(
        "bk-notify",
        &["--webhook", &arg, "--on", "always"],
        &stdin_of(&[&artifact]),
    );
    assert_eq!(run.code, 69, "{}", run.stderr);
    let e = run.error();
    assert_eq!(e.tool, "bk-notify");
    for says in ["webhook http://127.0.0.1:", "(after 3 attempts)"] {
        assert!(e.message.contains(says), "{says:?}: {}", e.message);
    }
    assert_eq!(notified(&run)[0]["ok"], false);
    assert_eq!(notified(&run)[0]["status"], Value::Null);
    run.assert_hides("receiver down", &[TOKEN]);

    let run = sb.run_with_stdin("bk-notify", &["--webhook", &arg], &stdin_of(&[&artifact, ERROR]));
    assert_eq!(run.code, 1, "the backup's failure is what cron sees: {}", run.stderr);
    let errors = error_records(&run);
    assert_eq!(errors.len(), 2, "{}", run.stdout);
    assert_eq!((errors[1].tool.as_str(), errors[1].code), ("bk-notify", 69));
}

#[test]
fn webhook_urls_come_from_private_files_or_the_environment_only() {
    let sb = Sandbox::new();
    let receiver = Receiver::start(&[]);
    let url = receiver.url(&format!("/{TOKEN}"));
    let stdin = stdin_of(&[FUTURE]);

    let run = sb.run_with_stdin("bk-notify", &["--webhook", &url], &stdin);
    run.failed("a bare URL", 64, &["takes @FILE or env:VAR, not a URL"]);
    run.assert_hides("a bare URL", &[TOKEN, "127.0.0.1"]);

    let (path, arg) = url_file(&sb, &url);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let run = sb.run_with_stdin("bk-notify", &["--webhook", &arg], &stdin);
    run.failed("a loose URL file", 78, &["readable by others", "chmod 600"]);
    run.assert_hides("a loose URL file", &[TOKEN]);

    fs::write(&path, "not a url\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    let run = sb.run_with_stdin("bk-notify", &["--webhook", &arg], &stdin);
    run.failed("a file without a URL", 78, &["not one http:// or https:// URL"]);
    assert!(receiver.received().is_empty());

    let mut cmd = sb.cmd("bk-notify", &["--webhook", "env:BK_TEST_HOOK", "--on", "always"]);
    cmd.env("BK_TEST_HOOK", &url);
    let run = bk_tests::run_cmd(cmd, &stdin);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(receiver.received().len(), 1);
    run.assert_hides("env:VAR", &[TOKEN]);
}
