//! bk-notify through the real binary: it passes every record on unchanged, as it comes, and
//! exits 1 when the pipeline before it failed (an error record, a verification that did not
//! pass, no record at all); its webhook and healthcheck reach a real HTTP receiver on
//! loopback, retry what may pass, keep the backup's own status when the receiver is down or
//! not HTTP, and never show the URL's token.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bk_tests::{
    artifact_line, free_port, have_root, run_cmd, stdin_of, write_backup, Received, Receiver, Run, Sandbox, AS_NOBODY,
};
use serde_json::Value;

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

/// The token a sink URL carries in its path: it must never be shown.
const TOKEN: &str = "T0KEN-s3cr3t";

/// A private file (mode 0600) in the sandbox holding `url`, and its `@FILE` argument.
fn url_file(sb: &Sandbox, name: &str, url: &str) -> (PathBuf, String) {
    let path = sb.path(name);
    fs::write(&path, format!("{url}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let arg = format!("@{}", path.display());
    (path, arg)
}

/// The method, path and body of each request a receiver got.
fn requests(received: &[Received]) -> Vec<(&str, &str, &str)> {
    received
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str(), r.body.as_str()))
        .collect()
}

/// The paths of the requests a receiver got, in order.
fn paths(received: &[Received]) -> Vec<&str> {
    received.iter().map(|r| r.path.as_str()).collect()
}

#[test]
fn no_records_at_all_fails_and_the_sinks_still_tell() {
    let sb = Sandbox::new();
    const BEGIN: &str = r#"{"bk":1,"type":"begin","tool":"bk-dump","pid":7}"#;
    // (case, stdin, exit code, the failing tool, its message says, pings)
    let cases = [
        (
            "nothing at all",
            String::new(),
            1,
            "bk-notify",
            "no records on stdin",
            vec!["/fail"],
        ),
        (
            "killed after it began",
            stdin_of(&[BEGIN]),
            1,
            "bk-dump",
            "began but never ended its output",
            vec!["/start", "/fail"],
        ),
        (
            "not records",
            "Segmentation fault\n".to_string(),
            65,
            "bk-notify",
            "stdin line 1: malformed JSON",
            vec!["/fail"],
        ),
    ];
    for (case, stdin, code, tool, says, pings) in cases {
        let hook = Receiver::start(&[]);
        let monitor = Receiver::start(&[]);
        let (_, hook_arg) = url_file(&sb, "hook.url", &hook.url(&format!("/{TOKEN}")));
        let (_, monitor_arg) = url_file(&sb, "monitor.url", &monitor.url(&format!("/{TOKEN}")));
        let run = sb.run_with_stdin(
            "bk-notify",
            &["--webhook", &hook_arg, "--healthcheck", &monitor_arg],
            &stdin,
        );
        assert_eq!(run.code, code, "{case}\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
        run.assert_hides(case, &[TOKEN]);
        let errors = run.errors();
        assert_eq!(errors.len(), 1, "{case}: one error record: {}", run.stdout);
        assert_eq!(errors[0].tool, tool, "{case}");
        assert_eq!(errors[0].code as i32, code, "{case}");
        assert!(errors[0].message.contains(says), "{case}: {}", errors[0].message);
        assert!(
            run.stderr
                .lines()
                .any(|l| l == format!("bk-notify: {}", errors[0].message)),
            "{case}: stderr says it: {}",
            run.stderr
        );

        let posted = hook.received();
        assert_eq!(paths(&posted), [format!("/{TOKEN}")], "{case}: the webhook is told");
        let body: Value = serde_json::from_str(&posted[0].body).unwrap();
        let text = body["text"].as_str().unwrap();
        assert!(
            text.contains(&format!("FAILED (no job name): {tool}: ")),
            "{case}: {text}"
        );
        assert!(text.contains(says), "{case}: {text}");
        let sent: Vec<Value> = run
            .lines()
            .iter()
            .take(1)
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            body["records"].as_array().unwrap(),
            &sent,
            "{case}: the error record is sent"
        );

        let pinged = monitor.received();
        let expected: Vec<String> = pings.iter().map(|p| format!("/{TOKEN}{p}")).collect();
        assert_eq!(paths(&pinged), expected, "{case}: the healthcheck is told");
        assert_eq!(pinged.last().unwrap().body, text, "{case}: the summary is the body");
        let sinks: Vec<(Value, Value)> = run
            .notified()
            .into_iter()
            .map(|n| (n["sink"].clone(), n["ok"].clone()))
            .collect();
        assert_eq!(
            sinks,
            [("webhook".into(), true.into()), ("healthcheck".into(), true.into())],
            "{case}"
        );
    }
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
            Some("files-etc: backup files-etc.20261122T001500Z"),
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
        let (_, arg) = url_file(&sb, "hook.url", &receiver.url(&format!("/hooks/{TOKEN}?key={TOKEN}")));
        let run = sb.run_with_stdin("bk-notify", &["--webhook", &arg, "--on", on], stdin);
        assert_eq!(run.code, code, "{case}\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
        run.assert_hides(case, &[TOKEN]);
        let received = receiver.received();
        let Some(says) = says else {
            assert!(received.is_empty(), "{case}: nothing sent: {received:?}");
            assert!(run.notified().is_empty(), "{case}: {}", run.stdout);
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
        let sinks = run.notified();
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
        let (_, arg) = url_file(&sb, "hook.url", &receiver.url(&format!("/{TOKEN}")));
        let run = sb.run_with_stdin("bk-notify", &["--webhook", &arg], &stdin);
        assert_eq!(
            run.code, code,
            "{case}: the backup's status is kept\nstdout: {}\nstderr: {}",
            run.stdout, run.stderr
        );
        assert_eq!(receiver.received().len(), requests, "{case}");
        let sinks = run.notified();
        assert_eq!(
            (sinks[0]["status"].clone(), sinks[0]["ok"].clone()),
            (status.into(), ok.into()),
            "{case}"
        );
        let errors = run.errors();
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
fn healthcheck_pings_start_then_success_or_fail_with_the_summary() {
    let sb = Sandbox::new();
    let artifact = backup(&sb, "files-etc");
    // (case, stdin, URL path, exit code, start ping, final ping, the summary says)
    let cases = [
        (
            "a good run",
            vec![artifact.as_str()],
            format!("/ping/{TOKEN}"),
            0,
            format!("/ping/{TOKEN}/start"),
            format!("/ping/{TOKEN}"),
            "files-etc: backup files-etc.20261122T001500Z",
        ),
        (
            "a failed run",
            vec![artifact.as_str(), ERROR],
            format!("/ping/{TOKEN}/"),
            1,
            format!("/ping/{TOKEN}/start"),
            format!("/ping/{TOKEN}/fail"),
            "FAILED db: bk-dump: cannot connect to db3",
        ),
        (
            "a failed verification, a URL with a query",
            vec![VERIFIED_BAD],
            format!("/ping/{TOKEN}/db?create=1"),
            1,
            format!("/ping/{TOKEN}/db/start?create=1"),
            format!("/ping/{TOKEN}/db/fail?create=1"),
            "FAILED db.20261122T001500Z: verification did not pass",
        ),
    ];
    for (case, lines, path, code, start, ping, says) in cases {
        let monitor = Receiver::start(&[]);
        let (_, arg) = url_file(&sb, "monitor.url", &monitor.url(&path));
        let run = sb.run_with_stdin("bk-notify", &["--healthcheck", &arg], &stdin_of(&lines));
        assert_eq!(run.code, code, "{case}\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
        assert_eq!(run.stderr, "", "{case}: nothing on stderr");
        run.assert_hides(case, &[TOKEN]);
        let out = run.lines();
        assert_eq!(out[..lines.len()], lines, "{case}: every record passed on unchanged");
        assert_eq!(
            out.len(),
            lines.len() + 1,
            "{case}: then the notified record: {}",
            run.stdout
        );
        let sinks = run.notified();
        assert_eq!(sinks.len(), 1, "{case}");
        assert_eq!(sinks[0]["sink"], "healthcheck", "{case}");
        assert_eq!(sinks[0]["target"], monitor.url("/(redacted)"), "{case}");
        assert_eq!(
            (&sinks[0]["status"], &sinks[0]["ok"]),
            (&200.into(), &true.into()),
            "{case}"
        );

        let received = monitor.received();
        let pings = requests(&received);
        assert_eq!(pings.len(), 2, "{case}: {pings:?}");
        assert_eq!(pings[0], ("POST", start.as_str(), ""), "{case}: the start ping first");
        assert_eq!((pings[1].0, pings[1].1), ("POST", ping.as_str()), "{case}");
        assert!(
            pings[1].2.contains(says),
            "{case}: the summary says {says:?}: {}",
            pings[1].2
        );
        assert!(!pings[1].2.contains(TOKEN), "{case}: no secret in the body");
    }
}

#[test]
fn an_uptime_kuma_push_url_gets_one_get_with_status_and_message() {
    let sb = Sandbox::new();
    let artifact = backup(&sb, "files-etc");
    // The URL as Uptime Kuma shows it, its own query replaced by bk-notify's.
    let push = format!("/api/push/{TOKEN}");
    // (case, stdin, exit code, the query says)
    let cases = [
        ("a good run", vec![artifact.as_str()], 0, "status=up&msg=bk%20on%20"),
        (
            "a failed run",
            vec![artifact.as_str(), ERROR],
            1,
            "status=down&msg=bk%20on%20",
        ),
    ];
    for (case, lines, code, says) in cases {
        let monitor = Receiver::start(&[]);
        let (_, arg) = url_file(&sb, "kuma.url", &monitor.url(&format!("{push}?status=up&msg=OK&ping=")));
        let run = sb.run_with_stdin("bk-notify", &["--healthcheck", &arg], &stdin_of(&lines));
        assert_eq!(run.code, code, "{case}\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
        assert_eq!(run.stderr, "", "{case}: nothing on stderr");
        run.assert_hides(case, &[TOKEN]);
        assert_eq!(run.notified()[0]["ok"], true, "{case}");
        let received = monitor.received();
        let pings = requests(&received);
        assert_eq!(pings.len(), 1, "{case}: no start ping, one final one: {pings:?}");
        let (method, path, _) = pings[0];
        assert_eq!(method, "GET", "{case}");
        let query = path
            .strip_prefix(&format!("{push}?"))
            .unwrap_or_else(|| panic!("{case}: {path}"));
        assert!(query.starts_with(says) && query.ends_with("&ping="), "{case}: {query}");
        assert_eq!(
            query.matches("status=").count(),
            1,
            "{case}: Kuma's own query replaced: {query}"
        );
        if code != 0 {
            assert!(query.contains("FAILED%20db"), "{case}: the failure first: {query}");
        }
    }
}

#[test]
fn syslog_gets_each_record_as_it_comes() {
    let sb = Sandbox::new();
    let artifact = backup(&sb, "files-etc");
    let socket_path = sb.path("log.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("binding a test /dev/log");
    listener.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let socket = socket_path.display().to_string();
    let mut live = Live::start(&sb, &["--syslog=bktest", "--syslog-socket", &socket]);
    assert!(live.next_line().contains(r#""type":"begin""#));
    live.write(&artifact);
    assert_eq!(live.next_line(), artifact);
    let mut datagram = [0u8; 65536];
    let n = listener.recv(&mut datagram).expect("a datagram before the input ends");
    let logged = String::from_utf8_lossy(&datagram[..n]).to_string();
    assert!(
        logged.starts_with("<14>") && logged.ends_with(&format!(": {artifact}")),
        "{logged}"
    );
    let run = live.finish();
    assert_eq!(run.code, 0, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    assert_eq!(run.notified()[0]["ok"], true);
}

/// bk-notify with its stdin left open, so that a test sees what it does before the input
/// ends: the records it passes on, the pings it sends.
struct Live {
    child: Child,
    stdin: ChildStdin,
    stdout: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Live {
    fn start(sb: &Sandbox, args: &[&str]) -> Live {
        let mut child = sb
            .cmd("bk-notify", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning bk-notify");
        let stdin = child.stdin.take().expect("stdin piped");
        let stdout = BufReader::new(child.stdout.take().expect("stdout piped"));
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Live {
            child,
            stdin,
            stdout: lines,
            seen: Vec::new(),
        }
    }

    fn write(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("writing to bk-notify");
    }

    /// The next line bk-notify prints; panics after 30 s without one.
    fn next_line(&mut self) -> String {
        let line = self
            .stdout
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no line from bk-notify ({e}) after {:?}", self.seen));
        self.seen.push(line.clone());
        line
    }

    /// Ends the input, and waits for bk-notify to finish.
    fn finish(mut self) -> Run {
        drop(self.stdin);
        let mut stderr = String::new();
        self.child
            .stderr
            .take()
            .expect("stderr piped")
            .read_to_string(&mut stderr)
            .unwrap();
        let status = self.child.wait().expect("waiting for bk-notify");
        let rest: Vec<String> = self.stdout.iter().collect();
        let mut stdout = self.seen.join("\n");
        for line in rest {
            stdout.push('\n');
            stdout.push_str(&line);
        }
        stdout.push('\n');
        Run {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr,
        }
    }
}

#[test]
fn records_pass_on_as_they_come_and_start_is_pinged_with_the_first_or_at_once() {
    let sb = Sandbox::new();
    let artifact = backup(&sb, "files-etc");
    for start_now in [false, true] {
        let case = if start_now { "--start-now" } else { "the first record" };
        let monitor = Receiver::start(&[]);
        let (_, arg) = url_file(&sb, "monitor.url", &monitor.url(&format!("/{TOKEN}")));
        let mut args = vec!["--healthcheck", &arg];
        if start_now {
            args.push("--start-now");
        }
        let mut live = Live::start(&sb, &args);
        assert!(live.next_line().contains(r#""type":"begin""#), "{case}");
        if start_now {
            assert_eq!(
                paths(&monitor.wait_for(1)),
                [format!("/{TOKEN}/start")],
                "{case}: before any record"
            );
        } else {
            std::thread::sleep(Duration::from_millis(500));
            assert!(monitor.received().is_empty(), "{case}: no ping before the first record");
        }
        live.write(&artifact);
        assert_eq!(live.next_line(), artifact, "{case}: passed on before the input ends");
        assert_eq!(paths(&monitor.wait_for(1)), [format!("/{TOKEN}/start")], "{case}");
        live.write(VERIFIED_OK);
        assert_eq!(live.next_line(), VERIFIED_OK, "{case}");
        let run = live.finish();
        assert_eq!(run.code, 0, "{case}\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
        assert_eq!(run.stderr, "", "{case}");
        assert_eq!(run.lines()[..2], [artifact.as_str(), VERIFIED_OK], "{case}");
        assert_eq!(run.notified().len(), 1, "{case}");
        let pinged = monitor.received();
        assert_eq!(
            paths(&pinged),
            [format!("/{TOKEN}/start"), format!("/{TOKEN}")],
            "{case}: one start ping"
        );
    }
}

#[test]
fn healthcheck_retries_5xx_and_reports_4xx_at_once() {
    let sb = Sandbox::new();
    let artifact = backup(&sb, "files-etc");
    let good = stdin_of(&[&artifact]);
    let bad = stdin_of(&[&artifact, ERROR]);
    let (start, success, fail) = ("/start", "", "/fail");
    // (case, programmed statuses, stdin, pings, exit code, last status, ok, stderr says)
    let cases = [
        (
            "a 500 on start, retried",
            vec![500],
            &good,
            vec![start, start, success],
            0,
            200,
            true,
            Some("answered HTTP 500; trying again in 500ms"),
        ),
        (
            "a 404 on start: a warning only",
            vec![404],
            &good,
            vec![start, success],
            0,
            200,
            true,
            Some("warning: healthcheck http://127.0.0.1:PORT/(redacted): start ping: answered HTTP 404"),
        ),
        (
            "two 5xx then 200 on the final ping",
            vec![200, 502, 503],
            &good,
            vec![start, success, success, success],
            0,
            200,
            true,
            Some("answered HTTP 503; trying again in 1s"),
        ),
        (
            "a 404 on the final ping",
            vec![200, 404],
            &good,
            vec![start, success],
            69,
            404,
            false,
            None,
        ),
        (
            "a 404 on the final ping of a failed backup",
            vec![200, 404],
            &bad,
            vec![start, fail],
            1,
            404,
            false,
            None,
        ),
    ];
    for (case, statuses, stdin, pings, code, status, ok, stderr_says) in cases {
        let monitor = Receiver::start(&statuses);
        let (_, arg) = url_file(&sb, "monitor.url", &monitor.url(&format!("/{TOKEN}")));
        let run = sb.run_with_stdin("bk-notify", &["--healthcheck", &arg], stdin);
        assert_eq!(run.code, code, "{case}\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
        run.assert_hides(case, &[TOKEN]);
        let expected: Vec<String> = pings.iter().map(|p| format!("/{TOKEN}{p}")).collect();
        assert_eq!(paths(&monitor.received()), expected, "{case}");
        let sinks = run.notified();
        assert_eq!(sinks.len(), 1, "{case}: {}", run.stdout);
        assert_eq!(
            (&sinks[0]["status"], &sinks[0]["ok"]),
            (&status.into(), &ok.into()),
            "{case}"
        );
        let errors = run.errors();
        let upstream = usize::from(stdin == &bad);
        assert_eq!(errors.len(), upstream + usize::from(!ok), "{case}: {}", run.stdout);
        if !ok {
            let e = &errors[upstream];
            assert_eq!((e.tool.as_str(), e.code), ("bk-notify", 69), "{case}");
            let says = format!("healthcheck {}: answered HTTP {status}", monitor.url("/(redacted)"));
            assert_eq!(e.message, says, "{case}");
            assert!(
                run.stderr.contains(&format!("bk-notify: {says}\n")),
                "{case}: {}",
                run.stderr
            );
        }
        match stderr_says {
            Some(says) => {
                let port = monitor.url("").rsplit(':').next().unwrap().to_string();
                let says = says.replace("PORT", &port);
                assert!(
                    run.stderr.contains(&says),
                    "{case}: stderr says {says:?}: {}",
                    run.stderr
                );
            }
            None if ok => assert_eq!(run.stderr, "", "{case}"),
            None => {}
        }
    }
}

/// What listens at a sink's URL when it does not answer HTTP.
#[derive(Debug, Clone, Copy)]
enum Broken {
    /// Nothing: the connection is refused.
    Down,
    /// A server that is not HTTP (a wrong port).
    Garbage,
}

#[test]
fn a_receiver_down_or_not_http_is_69_unless_the_backup_failed() {
    let sb = Sandbox::new();
    let artifact = backup(&sb, "files-etc");
    // (sink, how it is broken, the error says)
    let cases = [
        ("webhook", Broken::Down, "(after 3 attempts)"),
        ("healthcheck", Broken::Down, "(after 3 attempts)"),
        ("webhook", Broken::Garbage, "answered something that is not HTTP"),
        ("healthcheck", Broken::Garbage, "answered something that is not HTTP"),
    ];
    for (sink, broken, says) in cases {
        let case = format!("{sink}, {broken:?}");
        let receiver = match broken {
            Broken::Down => None,
            Broken::Garbage => Some(Receiver::garbage()),
        };
        let url = match &receiver {
            Some(r) => r.url(&format!("/{TOKEN}")),
            None => format!("http://127.0.0.1:{}/{TOKEN}", free_port()),
        };
        let (_, arg) = url_file(&sb, "sink.url", &url);
        let option = format!("--{sink}");
        // --on always: the webhook is due after a good run too.
        let args = [option.as_str(), &arg, "--on", "always"];
        for (backup_failed, stdin, code) in [
            (false, stdin_of(&[&artifact]), 69),
            (true, stdin_of(&[&artifact, ERROR]), 1),
        ] {
            let run = sb.run_with_stdin("bk-notify", &args, &stdin);
            assert_eq!(
                run.code, code,
                "{case}, backup failed: {backup_failed}: the backup's own status is kept\nstdout: {}\nstderr: {}",
                run.stdout, run.stderr
            );
            run.assert_hides(&case, &[TOKEN]);
            assert_eq!(run.lines()[0], artifact, "{case}: the records go on");
            let sinks = run.notified();
            assert_eq!(sinks.len(), 1, "{case}: {}", run.stdout);
            assert_eq!(
                (&sinks[0]["ok"], &sinks[0]["status"]),
                (&false.into(), &Value::Null),
                "{case}"
            );
            let errors = run.errors();
            assert_eq!(errors.len(), 1 + usize::from(backup_failed), "{case}: {}", run.stdout);
            let e = errors.last().unwrap();
            assert_eq!((e.tool.as_str(), e.code), ("bk-notify", 69), "{case}");
            let target = url.replace(&format!("/{TOKEN}"), "/(redacted)");
            assert!(
                e.message.starts_with(&format!("{sink} {target}: ")),
                "{case}: {}",
                e.message
            );
            assert!(e.message.contains(says), "{case}: {}", e.message);
            assert!(
                run.stderr.contains(&format!("bk-notify: {}\n", e.message)),
                "{case}: {}",
                run.stderr
            );
        }
        if let Some(receiver) = receiver {
            // Not HTTP will not become HTTP by retrying: one request per ping.
            let per_run = if sink == "healthcheck" { 2 } else { 1 };
            assert_eq!(receiver.received().len(), 2 * per_run, "{case}");
        }
    }
}

/// How a test gives bk-notify a sink's URL.
enum Reference {
    /// The URL itself, on the command line.
    Bare,
    /// A file that does not exist.
    Missing,
    /// A file with this content and mode.
    File(&'static str, u32),
    /// An environment variable with this value, or unset.
    Env(Option<&'static str>),
}

#[test]
fn sink_urls_come_from_private_files_or_the_environment_only() {
    let sb = Sandbox::new();
    let receiver = Receiver::start(&[]);
    let url = receiver.url(&format!("/{TOKEN}"));
    let port = url.split(['/', ':']).nth(4).unwrap().to_string();
    // (case, the reference, exit code, the error says)
    let cases = [
        (
            "a bare URL",
            Reference::Bare,
            64,
            vec!["takes @FILE or env:VAR, not a URL"],
        ),
        // Like every file bk is told to read: no such input.
        (
            "a missing URL file",
            Reference::Missing,
            66,
            vec!["missing.url: No such file or directory"],
        ),
        (
            "a URL file others may read",
            Reference::File("URL", 0o644),
            78,
            vec!["readable by others", "chmod 600"],
        ),
        (
            "a URL file without a URL",
            Reference::File("not a url", 0o400),
            78,
            vec!["not one http:// or https:// URL"],
        ),
        (
            "an empty URL file",
            Reference::File("", 0o600),
            78,
            vec!["not one http:// or https:// URL"],
        ),
        (
            "not an http(s) URL",
            Reference::File("ftp://127.0.0.1/T0KEN-s3cr3t", 0o600),
            78,
            vec!["not one http:// or https:// URL"],
        ),
        (
            "two URLs",
            Reference::File("URL URL", 0o600),
            78,
            vec!["not one http:// or https:// URL"],
        ),
        (
            "an unset variable",
            Reference::Env(None),
            78,
            vec!["env:BK_TEST_URL: the environment variable BK_TEST_URL is not set"],
        ),
        (
            "a variable without a URL",
            Reference::Env(Some("T0KEN-s3cr3t")),
            78,
            vec!["env:BK_TEST_URL: not one http:// or https:// URL"],
        ),
    ];
    for option in ["--webhook", "--healthcheck"] {
        for (what, reference, code, says) in &cases {
            let case = format!("{option}: {what}");
            let path = sb.path("sink.url");
            let _ = fs::remove_file(&path);
            let file_arg = format!("@{}", path.display());
            let arg = match reference {
                Reference::Bare => url.clone(),
                Reference::Missing => format!("@{}", sb.path("missing.url").display()),
                Reference::File(content, mode) => {
                    fs::write(&path, content.replace("URL", &url)).unwrap();
                    fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).unwrap();
                    file_arg
                }
                Reference::Env(_) => "env:BK_TEST_URL".to_string(),
            };
            let mut cmd = sb.cmd("bk-notify", &[option, &arg, "--on", "always"]);
            if let Reference::Env(Some(value)) = reference {
                cmd.env("BK_TEST_URL", value);
            }
            let run = run_cmd(cmd, &stdin_of(&[FUTURE]));
            let e = run.failed(&case, *code, says);
            assert_eq!(e.tool, "bk-notify", "{case}");
            assert!(e.message.starts_with(option), "{case}: names the option: {}", e.message);
            assert_eq!(
                run.lines()[1],
                FUTURE,
                "{case}: the records still go on: {}",
                run.stdout
            );
            assert!(run.notified().is_empty(), "{case}: no sink: {}", run.stdout);
            run.assert_hides(&case, &[TOKEN, &port]);
        }
    }
    assert!(receiver.received().is_empty(), "{:?}", receiver.received());

    let mut cmd = sb.cmd("bk-notify", &["--webhook", "env:BK_TEST_URL", "--on", "always"]);
    cmd.env("BK_TEST_URL", &url);
    let run = run_cmd(cmd, &stdin_of(&[FUTURE]));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(receiver.received().len(), 1);
    run.assert_hides("env:VAR", &[TOKEN]);
}

#[test]
fn a_url_file_the_user_cannot_read_is_77() {
    if !have_root() {
        return;
    }
    let sb = Sandbox::new();
    fs::set_permissions(sb.root(), fs::Permissions::from_mode(0o755)).unwrap();
    let (path, arg) = url_file(
        &sb,
        "root-only.url",
        &format!("http://127.0.0.1:{}/{TOKEN}", free_port()),
    );
    let cmd = sb.cmd_via(&AS_NOBODY, "bk-notify", &["--healthcheck", &arg]);
    let run = run_cmd(cmd, &stdin_of(&[FUTURE]));
    let e = run.failed(
        "root's URL file",
        77,
        &[&format!(
            "reading --healthcheck file {}: Permission denied",
            path.display()
        )],
    );
    assert_eq!(e.tool, "bk-notify");
    run.assert_hides("root's URL file", &[TOKEN]);
}

#[test]
fn a_misconfigured_sink_fails_the_run_and_the_others_still_tell() {
    let sb = Sandbox::new();
    let hook = Receiver::start(&[]);
    let (_, arg) = url_file(&sb, "hook.url", &hook.url(&format!("/{TOKEN}")));
    let run = sb.run_with_stdin(
        "bk-notify",
        &["--webhook", &arg, "--healthcheck", "env:BK_TEST_UNSET"],
        &stdin_of(&[FUTURE]),
    );
    let e = run.failed("a healthcheck misconfigured", 78, &["--healthcheck env:BK_TEST_UNSET"]);
    let posted = hook.received();
    assert_eq!(posted.len(), 1, "the webhook tells, on failure: {posted:?}");
    let body: Value = serde_json::from_str(&posted[0].body).unwrap();
    let text = body["text"].as_str().unwrap();
    assert!(
        text.contains(&format!("FAILED (no job name): bk-notify: {}", e.message)),
        "{text}"
    );
    let records: Vec<&str> = body["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(records, ["error", "hologram"]);
    assert_eq!(run.notified()[0]["ok"], true);
}

/// docs/notify.md's cron line for the backup server, run as cron runs it (`/bin/sh -c`, no
/// pipefail): a name without a recent backup makes the job exit 1 and the webhook say which;
/// when all are fresh, the job exits 0 and nothing is sent.
#[test]
fn the_stale_check_of_the_docs_tells_the_webhook() {
    let docs = fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/notify.md")).unwrap();
    let cron_line = docs
        .lines()
        .find(|l| l.contains("bk-ls /srv/bk/db1 --stale 26h"))
        .expect("the stale check's cron line in docs/notify.md");
    // m h dom mon dow user command
    let command = cron_line.splitn(7, ' ').nth(6).expect("a cron.d line");
    let sb = Sandbox::new();
    let hook = Receiver::start(&[]);
    let (_, arg) = url_file(&sb, "hook.url", &hook.url(&format!("/{TOKEN}")));
    let path = format!("{}:/usr/bin:/bin", bk_tests::bin_dir().display());
    // (case, the stamps of beta's backups, exit code, the webhook's text says); the check
    // runs at 06:00 on 2026-11-22, and alpha's last backup was made at 00:15 that day.
    let cases = [
        ("all fresh", "20261122T003000Z", 0, None),
        (
            "beta stale",
            "20261119T001500Z",
            1,
            Some("FAILED beta: bk-ls: no backup of beta for 3d 5h, stale after 26h"),
        ),
    ];
    for (case, beta, code, says) in cases {
        let store = sb.path(&case.replace(' ', "-")).display().to_string();
        write_backup(&store, "alpha", "20261122T001500Z");
        write_backup(&store, "beta", beta);
        let command = command
            .replace("/srv/bk/db1", &store)
            .replace("@/etc/bk/webhook.url", &arg);
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", &command])
            .env("PATH", &path)
            .env("BK_NOW", "2026-11-22T06:00:00Z");
        let before = hook.received().len();
        let run = run_cmd(cmd, "");
        assert_eq!(
            run.code, code,
            "{case}: {command}\nstdout: {}\nstderr: {}",
            run.stdout, run.stderr
        );
        assert_eq!(run.stdout, "", "{case}: the records go to /dev/null");
        run.assert_hides(case, &[TOKEN]);
        let posted = &hook.received()[before..];
        let Some(says) = says else {
            assert!(posted.is_empty(), "{case}: quiet: {posted:?}");
            assert_eq!(run.stderr, "", "{case}: no mail");
            continue;
        };
        assert_eq!(posted.len(), 1, "{case}");
        let body: Value = serde_json::from_str(&posted[0].body).unwrap();
        let text = body["text"].as_str().unwrap();
        let first = text.lines().next().unwrap();
        assert!(first.contains(says), "{case}: the failure comes first: {text}");
        assert!(!first.contains("alpha"), "{case}: alpha is fresh: {text}");
        assert!(
            run.stderr.contains("bk-ls: beta: no backup of beta"),
            "{case}: the mail: {}",
            run.stderr
        );
    }
}
