//! bk-notify through the real binary: it passes every record on unchanged and exits 1 when
//! the pipeline before it failed (an error record, a verification that did not pass).

use bk_tests::{artifact_line, write_backup, Sandbox};

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
