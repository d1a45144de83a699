//! bk-notify: the last tool of a pipeline. It passes every record on unchanged and makes a
//! failure impossible to miss: its exit status is non-zero when anything upstream failed
//! (cron's /bin/sh has no pipefail, so the last tool's status is the pipeline's), and it
//! tells a person or a monitor through its sinks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Map, Value};

use bk_core::cli::read_stdin_records;
use bk_core::error::{redact, Error, Result};
use bk_core::private::check_private_file;
use bk_core::record::{Input, Output, Record};

mod prom;
mod sink;
mod syslog;

/// Attempts per request: a receiver restarting or answering 5xx gets two more chances.
const ATTEMPTS: u32 = 3;
/// The wait before the second attempt; doubled before each next one.
const BACKOFF: Duration = Duration::from_millis(500);
/// No sink may hold a cron job for longer than this per attempt.
const TIMEOUT: Duration = Duration::from_secs(20);

/// Tell people and monitors how the pipeline went.
///
/// The last tool of a pipeline (bk-dump ... | bk-ship ... | bk-notify ...). Passes every
/// record on unchanged, then exits 1 if any error record came in or a verified record says
/// ok: false, so that cron sees the pipeline fail.
///
/// With --webhook it POSTs a JSON body with a `text` field (one line per backup and per
/// failure: Slack, Mattermost, Rocket.Chat and Discord-compatible hooks show it as is) and a
/// `records` array. URLs carry tokens, so they are never taken on the command line: @FILE
/// reads one from a file of mode 0600 or 0400, env:VAR from the environment. 5xx answers and
/// refused connections are retried (3 attempts, backing off); a 4xx is reported at once.
/// Prints a notified record per sink, its URL without path or query. A notification that
/// fails is an error record and exit 69, unless the backup failed too: then the exit status
/// stays the backup's (1).
///
/// With --prom-file it writes, after every run, metrics per backup name (label name) for
/// node_exporter's textfile collector: bk_last_run_timestamp_seconds, bk_last_run_success,
/// bk_last_success_timestamp_seconds, bk_backup_bytes, bk_backup_duration_seconds,
/// bk_backup_rows_total, bk_verify_ok, and bk_unnamed_failure_timestamp_seconds for a failure
/// no record names. Jobs may share one file: each replaces its own names' lines under a lock
/// (PATH.lock) and renames a new file (mode 0644) into place. A file that is not in the
/// text format is left as it is and the sink fails.
///
/// With --syslog it sends every record, its JSON line as the message, to the local syslog
/// (/dev/log, in the format syslog(3) writes) or to journald's native socket: this replaces
/// `| logger -t bk`, which hid the pipeline's exit status. No socket is a failed sink.
#[derive(Debug, Parser)]
#[command(name = "bk-notify", version, after_help = bk_core::cli::exit_status_help())]
pub struct Cli {
    /// POST the summary and the records to the URL in FILE (mode 0600 or 0400) or in the
    /// environment variable VAR
    #[arg(long, value_name = "@FILE|env:VAR")]
    pub webhook: Option<String>,
    /// When to send the webhook: on failure only, or after every run
    #[arg(long, value_enum, default_value_t = On::Failure)]
    pub on: On,
    /// Write metrics per backup name to PATH for node_exporter's textfile collector (after
    /// every run); jobs may share one file
    #[arg(long, value_name = "PATH")]
    pub prom_file: Option<PathBuf>,
    /// Send every record to the local syslog, tagged TAG (default bk): error records and
    /// failed verifications at priority err, the others at info; facility user
    #[arg(long, value_name = "TAG", num_args = 0..=1, require_equals = true,
          default_missing_value = "bk", value_parser = syslog::parse_tag)]
    pub syslog: Option<String>,
    /// The socket of --syslog: PATH speaks syslog's format, journal:PATH journald's native
    /// protocol [default: /dev/log, else /run/systemd/journal/socket when only it exists]
    #[arg(long, value_name = "PATH|journal:PATH", requires = "syslog")]
    pub syslog_socket: Option<String>,
}

/// When the webhook is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum On {
    /// Only when the pipeline failed
    Failure,
    /// After every run
    Always,
}

impl bk_core::cli::Tool for Cli {}

pub fn run(cli: Cli, out: &mut Output) -> Result<()> {
    let inputs = read_stdin_records(out, "pipe a bk tool's records in (bk-dump ... | bk-notify)")?;
    // The records go on first: a sink misconfigured or down must not swallow them.
    for input in &inputs {
        out.pass(input)?;
    }
    let failed = inputs.iter().any(failed);
    if failed {
        out.upstream_failed();
    }
    let webhook = cli.webhook.as_deref().map(|r| read_url("--webhook", r)).transpose()?;
    if let Some(url) = webhook.filter(|_| failed || cli.on == On::Always) {
        let body = json!({
            "text": summary(&inputs),
            "records": inputs.iter().map(|i| serde_json::from_str(&i.line).unwrap_or(Value::Null)).collect::<Vec<_>>(),
        });
        let sent = post(&url, &body.to_string());
        let target = redact_url(&url);
        let mut notified = Map::new();
        notified.insert("sink".into(), "webhook".into());
        notified.insert("target".into(), target.clone().into());
        notified.insert("status".into(), sent.status.into());
        notified.insert("ok".into(), sent.failure.is_none().into());
        out.emit(&Record::Notified(notified))?;
        if let Some(why) = sent.failure {
            let e = Error::unavailable(format!("webhook {target}: {}", why.replace(&url, &target)));
            // The backup's own failure (exit 1) is what cron must see; this one is said too.
            if failed {
                out.report(&e)?;
            } else {
                out.error(&e)?;
            }
        }
    }
    if let Some(path) = &cli.prom_file {
        prom::notify(path, &inputs, failed, out)?;
    }
    if let Some(tag) = &cli.syslog {
        syslog::notify(tag, cli.syslog_socket.as_deref(), &inputs, failed, out)?;
    }
    Ok(())
}

/// The URL a reference names: `@FILE` (a private file) or `env:VAR`. A URL itself is refused
/// without being repeated, since it carries a token that `ps` and logs would show.
fn read_url(option: &str, reference: &str) -> Result<String> {
    let (url, from) = if let Some(file) = reference.strip_prefix('@') {
        let path = Path::new(file);
        check_private_file(path, &format!("{option} file"))?;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {option} file {file}"), e))?;
        (text.trim().to_string(), format!("{option} file {file}"))
    } else if let Some(var) = reference.strip_prefix("env:") {
        let value = std::env::var(var)
            .map_err(|_| Error::config(format!("{option} env:{var}: the environment variable {var} is not set")))?;
        (value.trim().to_string(), format!("{option} env:{var}"))
    } else {
        return Err(Error::usage(format!(
            "{option} takes @FILE or env:VAR, not a URL: a URL on the command line shows its token to anyone running ps"
        )));
    };
    let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
    if !scheme_ok || url.contains(char::is_whitespace) {
        return Err(Error::config(format!("{from}: not one http:// or https:// URL")));
    }
    Ok(url)
}

/// The URL without what may be secret: userinfo, path and query (the token of a Slack hook
/// or a healthcheck lives there).
fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let host = rest[..end].rsplit('@').next().unwrap_or_default();
    let hidden = if rest[end..].trim_start_matches('/').is_empty() {
        ""
    } else {
        "/(redacted)"
    };
    format!("{scheme}://{host}{hidden}")
}

/// One line per backup and per failure, for people.
fn summary(inputs: &[Input]) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let lines: Vec<String> = inputs
        .iter()
        .filter_map(|input| match &input.record {
            Record::Artifact(a) => Some(format!(
                "bk on {host}: {}: backed up {} ({} bytes) to {}",
                a.name,
                a.id,
                a.bytes,
                redact(&a.location)
            )),
            Record::Error(e) => Some(format!(
                "bk on {host}: FAILED {}: {}: {}",
                e.name.as_deref().unwrap_or("(no job name)"),
                e.tool,
                e.message
            )),
            Record::Verified(v) if failed(input) => Some(format!(
                "bk on {host}: FAILED {}: verification did not pass",
                v.get("id").and_then(Value::as_str).unwrap_or("(no id)")
            )),
            _ => None,
        })
        .collect();
    if lines.is_empty() {
        return format!("bk on {host}: no backup in this run");
    }
    lines.join("\n")
}

/// How a request went: the last HTTP status, and why it failed if it did.
struct Sent {
    status: Option<u16>,
    failure: Option<String>,
}

/// POSTs a JSON body, retrying what may pass on its own (5xx, a refused connection, a
/// timeout) with a growing wait; a 4xx will not pass by retrying and is reported at once.
fn post(url: &str, body: &str) -> Sent {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(TIMEOUT))
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut wait = BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let last = attempt == ATTEMPTS;
        let sent = agent.post(url).header("Content-Type", "application/json").send(body);
        let (status, failure, transient) = match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let ok = (200..300).contains(&status);
                let failure = (!ok).then(|| format!("answered HTTP {status}"));
                (Some(status), failure, status >= 500)
            }
            Err(e) => {
                let transient = matches!(
                    e,
                    ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::Timeout(_)
                );
                (None, Some(e.to_string()), transient)
            }
        };
        match failure {
            Some(why) if transient && !last => {
                let target = redact_url(url);
                eprintln!(
                    "bk-notify: {target}: {}; trying again in {wait:?}",
                    why.replace(url, &target)
                );
                std::thread::sleep(wait);
                wait *= 2;
            }
            Some(why) => {
                let tries = if attempt > 1 {
                    format!(" (after {attempt} attempts)")
                } else {
                    String::new()
                };
                return Sent {
                    status,
                    failure: Some(format!("{why}{tries}")),
                };
            }
            None => return Sent { status, failure: None },
        }
    }
    unreachable!("the last attempt returns")
}

/// Whether a record says that the backup failed: an error, or a verification that did not pass.
fn failed(input: &Input) -> bool {
    match &input.record {
        Record::Error(_) => true,
        Record::Verified(v) => v.get("ok").and_then(serde_json::Value::as_bool) != Some(true),
        _ => false,
    }
}
