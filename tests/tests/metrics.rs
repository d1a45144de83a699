//! bk-notify's --prom-file and --syslog through the real binary. The prom file is read back
//! by a real Prometheus text-format parser (the Python prometheus_client's, which
//! tests/services.sh installs): the values of a good and a failed run, jobs sharing one file
//! at once, mode 0644 under any umask, no temporary file left, and a file it cannot read left
//! as it is. Syslog: a listener on a private datagram socket, in both protocols, gets one
//! message per record at the right priority; no socket fails the sink.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bk_core::record::ErrorRecord;
use bk_tests::{artifact_line, output_of, run_cmd, spawn_with_stdin, stdin_of, write_backup, Run, Sandbox};
use serde_json::Value;

/// Debian's python3, where the python3-prometheus-client package lives (a python3 earlier
/// on PATH, e.g. pyenv's, would not have it).
const PYTHON: &str = "/usr/bin/python3";

/// Every sample of a prom file, as the Python prometheus_client parser reads it: per
/// (metric, value of its `name` label or ""), the value. The parser refusing the file fails
/// the test.
fn parse_prom(path: &Path) -> BTreeMap<(String, String), f64> {
    let script = "import json, sys\n\
        from prometheus_client.parser import text_string_to_metric_families as parse\n\
        text = open(sys.argv[1]).read()\n\
        print(json.dumps([[s.name, s.labels, s.value] for f in parse(text) for s in f.samples]))";
    let out = output_of(Command::new(PYTHON).args(["-c", script]).arg(path));
    let samples: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&out).expect("the parser's JSON");
    let mut by_key = BTreeMap::new();
    for (metric, labels, value) in samples {
        let name = labels.get("name").cloned().unwrap_or_default();
        assert!(
            by_key.insert((metric.clone(), name.clone()), value).is_none(),
            "{metric} {name} twice"
        );
    }
    by_key
}

fn value(samples: &BTreeMap<(String, String), f64>, metric: &str, name: &str) -> Option<f64> {
    samples.get(&(metric.to_string(), name.to_string())).copied()
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as f64
}

fn unix_time(rfc3339: &str) -> f64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp() as f64
}

/// bk-notify's own error record (a sink's failure), which also went to stderr.
fn sink_error(run: &Run, case: &str) -> ErrorRecord {
    let e = run
        .errors()
        .into_iter()
        .find(|e| e.tool == "bk-notify")
        .unwrap_or_else(|| panic!("{case}: bk-notify's error: {}", run.stdout));
    assert_eq!(e.code, 69, "{case}");
    assert!(run.stderr.contains(&e.message), "{case}: {}", run.stderr);
    e
}

/// An artifact line of `name` whose backup took 7 seconds, with counts summing to 12.
fn backup_of(sb: &Sandbox, name: &str, stamp: &str) -> (bk_core::record::Artifact, String) {
    let mut a = write_backup(&sb.store(), name, stamp);
    a.finished = bk_core::name::rfc3339(
        chrono::DateTime::parse_from_rfc3339(&a.started).unwrap().to_utc() + chrono::Duration::seconds(7),
    );
    a.counts = BTreeMap::from([("db.a".to_string(), 5), ("db.b".to_string(), 7)]);
    let line = artifact_line(&a).trim_end().to_string();
    (a, line)
}

fn error_of(name: &str) -> String {
    format!(r#"{{"bk":1,"type":"error","tool":"bk-dump","name":"{name}","code":69,"message":"cannot connect"}}"#)
}

fn verified(name: &str, ok: bool) -> String {
    format!(
        r#"{{"bk":1,"type":"verified","id":"{name}.20261122T001500Z","name":"{name}","ok":{ok},"level":"integrity","checks":{{}},"mismatches":[]}}"#
    )
}

#[test]
fn prom_file_holds_a_good_run_and_a_failed_one_keeps_the_last_success() {
    let sb = Sandbox::new();
    let prom = sb.path("textfile/bk.prom");
    fs::create_dir(sb.path("textfile")).unwrap();
    let args = ["--prom-file", prom.to_str().unwrap()];
    let (a, good) = backup_of(&sb, "db", "20261122T001500Z");

    let before = unix_now();
    let run = sb.run_with_stdin("bk-notify", &args, &stdin_of(&[&good, &verified("db", true)]));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let sinks = run.notified();
    assert_eq!(sinks.len(), 1, "{}", run.stdout);
    assert_eq!(sinks[0]["sink"], "prom");
    assert_eq!(sinks[0]["target"], prom.to_str().unwrap());
    assert_eq!(
        (sinks[0]["status"].clone(), sinks[0]["ok"].clone()),
        (Value::Null, true.into())
    );
    let first = parse_prom(&prom);
    let after = unix_now();
    let last_run = value(&first, "bk_last_run_timestamp_seconds", "db").unwrap();
    assert!(
        (before..=after).contains(&last_run),
        "{before} <= {last_run} <= {after}"
    );
    // (metric, value)
    let expected = [
        ("bk_last_run_success", 1.0),
        ("bk_last_success_timestamp_seconds", unix_time(&a.finished)),
        ("bk_backup_bytes", a.bytes as f64),
        ("bk_backup_duration_seconds", 7.0),
        ("bk_backup_rows_total", 12.0),
        ("bk_verify_ok", 1.0),
    ];
    for (metric, expected) in expected {
        assert_eq!(value(&first, metric, "db"), Some(expected), "{metric}: {first:?}");
    }

    // The next run fails (its dump could not connect, the verification failed): its last
    // run and status change, the last success and the backup's size stay.
    let run = sb.run_with_stdin(
        "bk-notify",
        &args,
        &stdin_of(&[&error_of("db"), &verified("db", false)]),
    );
    assert_eq!(run.code, 1, "the backup's failure: {}", run.stderr);
    assert_eq!(run.notified()[0]["ok"], true);
    let second = parse_prom(&prom);
    assert_eq!(value(&second, "bk_last_run_success", "db"), Some(0.0));
    assert_eq!(value(&second, "bk_verify_ok", "db"), Some(0.0));
    assert!(value(&second, "bk_last_run_timestamp_seconds", "db").unwrap() >= last_run);
    for kept in [
        "bk_last_success_timestamp_seconds",
        "bk_backup_bytes",
        "bk_backup_duration_seconds",
        "bk_backup_rows_total",
    ] {
        assert_eq!(value(&second, kept, "db"), value(&first, kept, "db"), "{kept} kept");
    }
    assert_eq!(value(&second, "bk_unnamed_failure_timestamp_seconds", ""), None);

    // A failure no record puts on a name has a metric of its own; the names stay as they were.
    let unnamed = r#"{"bk":1,"type":"error","tool":"bk-ship","code":69,"message":"store down"}"#;
    let run = sb.run_with_stdin("bk-notify", &args, &stdin_of(&[unnamed]));
    assert_eq!(run.code, 1, "{}", run.stderr);
    let third = parse_prom(&prom);
    let at = value(&third, "bk_unnamed_failure_timestamp_seconds", "").expect("the unnamed failure");
    assert!(at >= last_run, "{third:?}");
    third
        .iter()
        .filter(|((metric, _), _)| metric != "bk_unnamed_failure_timestamp_seconds")
        .for_each(|(key, v)| assert_eq!(second.get(key), Some(v), "{key:?}"));
}

#[test]
fn jobs_sharing_one_file_at_once_keep_each_others_names() {
    let sb = Sandbox::new();
    let prom = sb.path("bk.prom");
    // Lines of another kind that the file may hold: a comment, a metric of someone else's,
    // with its header; they stay.
    let foreign = "# written by hand\n# HELP site_up Up.\n# TYPE site_up gauge\nsite_up{site=\"a b\"} 1\n";
    fs::write(&prom, foreign).unwrap();
    let names: Vec<String> = (0..8).map(|i| format!("job{i}")).collect();
    let children: Vec<_> = names
        .iter()
        .map(|name| {
            let (_, line) = backup_of(&sb, name, "20261122T001500Z");
            let stdin = if name.ends_with('3') {
                stdin_of(&[&line, &error_of(name)])
            } else {
                stdin_of(&[&line])
            };
            spawn_with_stdin(sb.cmd("bk-notify", &["--prom-file", prom.to_str().unwrap()]), &stdin)
        })
        .collect();
    for child in children {
        let run = Run::from(child.wait_with_output().unwrap());
        assert!(run.code == 0 || run.code == 1, "{}", run.stderr);
        assert_eq!(run.notified()[0]["ok"], true, "{}", run.stdout);
    }
    let samples = parse_prom(&prom);
    for name in &names {
        let success = if name.ends_with('3') { 0.0 } else { 1.0 };
        assert_eq!(
            value(&samples, "bk_last_run_success", name),
            Some(success),
            "{name}: {samples:?}"
        );
    }
    assert_eq!(samples.get(&("site_up".to_string(), String::new())), Some(&1.0));
    assert!(fs::read_to_string(&prom).unwrap().starts_with("# written by hand\n"));
    let mut left: Vec<String> = fs::read_dir(sb.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f != "store")
        .collect();
    left.sort();
    assert_eq!(left, ["bk.prom", "bk.prom.lock"], "no temporary file left");
}

#[test]
fn prom_file_is_0644_whatever_the_umask() {
    let sb = Sandbox::new();
    let prom = sb.path("bk.prom");
    let (_, line) = backup_of(&sb, "db", "20261122T001500Z");
    // The exporter runs as another user: the file (and the lock, which a job of another
    // user opens) must be readable whatever the umask of the job's cron line.
    for _ in 0..2 {
        let umask = ["sh", "-c", "umask 077 && exec \"$0\" \"$@\""];
        let cmd = sb.cmd_via(&umask, "bk-notify", &["--prom-file", prom.to_str().unwrap()]);
        let run = run_cmd(cmd, &stdin_of(&[&line]));
        assert_eq!(run.code, 0, "{}", run.stderr);
        for file in [&prom, &sb.path("bk.prom.lock")] {
            let mode = fs::metadata(file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644, "{}", file.display());
        }
    }
}

#[test]
fn a_file_it_cannot_read_is_left_as_it_is_and_the_sink_fails() {
    let sb = Sandbox::new();
    let prom = sb.path("bk.prom");
    let mangled = "bk_last_run_success{name=\"db\"} 1\nbk_backup_bytes{name=\"db\" 12\n";
    fs::write(&prom, mangled).unwrap();
    let (_, line) = backup_of(&sb, "db", "20261122T001500Z");
    let args = ["--prom-file", prom.to_str().unwrap()];
    // (case, stdin, exit code: 69 when only the sink failed, the backup's 1 when it failed)
    let cases = [
        ("good backup", stdin_of(&[&line]), 69),
        ("failed backup", stdin_of(&[&line, &error_of("db")]), 1),
    ];
    for (case, stdin, code) in cases {
        let run = sb.run_with_stdin("bk-notify", &args, &stdin);
        assert_eq!(run.code, code, "{case}\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
        assert_eq!(run.notified()[0]["ok"], false, "{case}");
        let e = sink_error(&run, case);
        for says in ["line 2", "left as it is"] {
            assert!(e.message.contains(says), "{case}: {says:?}: {}", e.message);
        }
        assert_eq!(fs::read_to_string(&prom).unwrap(), mangled, "{case}: untouched");
    }
}

/// Every datagram the listener got (it waits a little for the last).
fn datagrams(listener: &UnixDatagram) -> Vec<String> {
    listener.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0; 1 << 20];
    while let Ok(n) = listener.recv(&mut buf) {
        got.push(String::from_utf8(buf[..n].to_vec()).expect("UTF-8"));
    }
    got
}

#[test]
fn syslog_gets_every_record_at_its_priority_in_either_protocol() {
    let sb = Sandbox::new();
    let (_, good) = backup_of(&sb, "db", "20261122T001500Z");
    let bad_verify = verified("db", false);
    let error = error_of("db");
    let lines = [good.as_str(), error.as_str(), bad_verify.as_str()];
    // Facility user (1): err is <11>, info <14>; journald's PRIORITY is the severity alone.
    let severities = [6, 3, 3];
    for (case, prefix, tag) in [("syslog", "", "bk"), ("journal", "journal:", "bk-nightly")] {
        let path = sb.path(&format!("{case}.sock"));
        let listener = UnixDatagram::bind(&path).unwrap();
        let socket = format!("{prefix}{}", path.display());
        let syslog = if tag == "bk" {
            "--syslog".to_string()
        } else {
            format!("--syslog={tag}")
        };
        let run = sb.run_with_stdin("bk-notify", &[&syslog, "--syslog-socket", &socket], &stdin_of(&lines));
        assert_eq!(
            run.code, 1,
            "{case}: the backup's failure\nstdout: {}\nstderr: {}",
            run.stdout, run.stderr
        );
        let sinks = run.notified();
        assert_eq!(sinks.len(), 1, "{case}: {}", run.stdout);
        assert_eq!(sinks[0]["sink"], "syslog");
        assert_eq!(sinks[0]["target"], path.to_str().unwrap());
        assert_eq!(sinks[0]["ok"], true, "{case}");
        let got = datagrams(&listener);
        assert_eq!(got.len(), lines.len(), "{case}: one message per record: {got:?}");
        for ((datagram, line), severity) in got.iter().zip(lines).zip(severities) {
            if case == "journal" {
                let fields: BTreeMap<&str, &str> = datagram
                    .lines()
                    .map(|l| l.split_once('=').expect("KEY=VALUE"))
                    .collect();
                let expected = BTreeMap::from([
                    ("PRIORITY", severity.to_string()),
                    ("SYSLOG_FACILITY", "1".to_string()),
                    ("SYSLOG_IDENTIFIER", tag.to_string()),
                    ("MESSAGE", line.to_string()),
                ]);
                let fields: BTreeMap<&str, String> = fields.into_iter().map(|(k, v)| (k, v.to_string())).collect();
                assert_eq!(fields, expected, "{case}");
                continue;
            }
            // <PRI>Mmm dd hh:mm:ss TAG[PID]: MSG, as syslog(3) writes it on /dev/log.
            let pri = format!("<{}>", 8 + severity);
            let rest = datagram
                .strip_prefix(&pri)
                .unwrap_or_else(|| panic!("{case}: {pri} first: {datagram}"));
            let (time, rest) = rest.split_at(15);
            assert!(
                chrono::NaiveDateTime::parse_from_str(&format!("2026 {time}"), "%Y %b %e %H:%M:%S").is_ok(),
                "{time:?}"
            );
            let (head, message) = rest.split_once(": ").unwrap();
            let pid = head.strip_prefix(&format!(" {tag}[")).and_then(|p| p.strip_suffix(']'));
            assert!(
                pid.is_some_and(|p| p.parse::<u32>().is_ok()),
                "{case}: TAG[PID]: {datagram}"
            );
            assert_eq!(message, line, "{case}: the record's line is the message");
        }
    }
}

#[test]
fn no_syslog_socket_is_a_failed_sink_that_keeps_the_backups_failure() {
    let sb = Sandbox::new();
    let (_, good) = backup_of(&sb, "db", "20261122T001500Z");
    let absent = sb.path("no.sock");
    // (case, stdin, exit code)
    let cases = [
        ("good backup", stdin_of(&[&good]), 69),
        ("failed backup", stdin_of(&[&good, &error_of("db")]), 1),
    ];
    for (case, stdin, code) in cases {
        let run = sb.run_with_stdin(
            "bk-notify",
            &["--syslog", "--syslog-socket", absent.to_str().unwrap()],
            &stdin,
        );
        assert_eq!(run.code, code, "{case}\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
        let sinks = run.notified();
        assert_eq!(
            (sinks[0]["sink"].as_str(), sinks[0]["ok"].as_bool()),
            (Some("syslog"), Some(false)),
            "{case}"
        );
        let e = sink_error(&run, case);
        assert!(
            e.message
                .starts_with(&format!("syslog {}: no such socket", absent.display())),
            "{case}: {}",
            e.message
        );
    }
    let run = sb.run_with_stdin("bk-notify", &["--syslog=two words"], &stdin_of(&[&good]));
    run.failed("a tag with a blank", 64, &["a tag is"]);
}
