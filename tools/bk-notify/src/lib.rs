//! bk-notify: the last tool of a pipeline. It passes every record on unchanged and makes a
//! failure impossible to miss: its exit status is non-zero when anything upstream failed
//! (cron's /bin/sh has no pipefail, so the last tool's status is the pipeline's), and it
//! tells a person or a monitor through its sinks.

mod healthcheck;
mod http;
mod prom;
mod sink;
mod syslog;

use std::path::PathBuf;

use clap::Parser;
use serde_json::{json, Value};

use bk_core::cli::stdin_records;
use bk_core::error::{redact, Error, Result};
use bk_core::record::{Input, Output, Record};

use healthcheck::Healthcheck;
use http::{post, read_url, redact_url};
use syslog::Syslog;

/// Tell people and monitors how the pipeline went.
///
/// The last tool of a pipeline (bk-dump ... | bk-ship ... | bk-notify ...). Passes every
/// record on unchanged as it comes, then exits 1 if any error record came in, a verified
/// record says ok: false, or no record came at all (the job before was killed, crashed or
/// never ran), so that cron sees the pipeline fail.
///
/// With --webhook it POSTs a JSON body with a `text` field (one line per backup and per
/// failure: Slack, Mattermost, Rocket.Chat and Discord-compatible hooks show it as is) and a
/// `records` array. With --healthcheck it pings a healthchecks.io-style monitor: URL/start
/// when the first record comes, then URL on success or URL/fail on failure, the summary text
/// as the body (an Uptime Kuma push URL, /api/push/TOKEN, gets one GET with status=up or
/// down and the summary's first line as msg); the monitor alerts when no ping comes in time,
/// which also catches the job that never ran. URLs carry tokens, so they are never taken on the command line: @FILE
/// reads one from a file of mode 0600 or 0400, env:VAR from the environment. 5xx answers and
/// refused connections are retried (3 attempts, backing off); a 4xx is reported at once.
/// Prints a notified record per sink, its URL without path or query. A notification that
/// fails is an error record and exit 69, unless the backup failed too: then the exit status
/// stays the backup's (1). A start ping that fails is only a warning on stderr.
///
/// With --prom-file it writes, after every run, metrics per backup name (label name) for
/// node_exporter's textfile collector: bk_last_run_timestamp_seconds, bk_last_run_success,
/// bk_last_success_timestamp_seconds, bk_backup_bytes, bk_backup_duration_seconds,
/// bk_backup_rows_total, bk_verify_ok, and bk_unnamed_failure_timestamp_seconds for a failure
/// no record names. Jobs may share one file: each replaces its own names' lines under a lock
/// (PATH.lock) and renames a new file (mode 0644) into place. A file that is not in the
/// text format is left as it is and the sink fails.
///
/// With --syslog it sends every record as it comes, its JSON line as the message, to the local syslog
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
    /// Ping the healthcheck URL in FILE (mode 0600 or 0400) or in the environment variable
    /// VAR: URL/start when the first record comes, URL on success, URL/fail on failure
    /// (Uptime Kuma's /api/push/ URLs: status=up or down)
    #[arg(long, value_name = "@FILE|env:VAR")]
    pub healthcheck: Option<String>,
    /// Send the start ping at once, not when the first record comes (the monitor then times
    /// the whole job, and shows it running while the first tool works)
    #[arg(long, requires = "healthcheck")]
    pub start_now: bool,
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
    let records = stdin_records(out, "pipe a bk tool's records in (bk-dump ... | bk-notify)")?;
    // What the sinks report on: the records, and this run's own failures.
    let mut inputs: Vec<Input> = Vec::new();
    let mut syslog = cli
        .syslog
        .as_deref()
        .map(|tag| Syslog::new(tag, cli.syslog_socket.as_deref()));
    // The sinks are set up before the first record comes (the healthcheck pings when it
    // does). One misconfigured fails the run at once, and the others still tell.
    let webhook = sink_url(out, &mut inputs, "--webhook", cli.webhook.as_deref())?;
    let healthcheck = sink_url(out, &mut inputs, "--healthcheck", cli.healthcheck.as_deref())?;
    if let Some(syslog) = syslog.as_mut() {
        inputs.iter().for_each(|input| syslog.log(input));
    }
    let mut healthcheck = healthcheck.map(Healthcheck::new);
    if let Some(healthcheck) = healthcheck.as_mut().filter(|_| cli.start_now) {
        healthcheck.start();
    }
    // Each record goes on as it comes: no sink may hold one up or swallow it.
    for input in records {
        let input = match input {
            Ok(input) => {
                if let Some(healthcheck) = healthcheck.as_mut() {
                    healthcheck.start();
                }
                out.pass(&input)?;
                input
            }
            // Input that is not records, or none at all (the job before was killed, crashed
            // or never ran): this run failed, and the sinks still tell.
            Err(e) => own_failure(out, &e)?,
        };
        if let Some(syslog) = syslog.as_mut() {
            syslog.log(&input);
        }
        inputs.push(input);
    }
    let failed = inputs.iter().any(failed);
    if failed {
        out.upstream_failed();
    }
    let text = summary(&inputs);
    if let Some(url) = webhook.filter(|_| failed || cli.on == On::Always) {
        let body = json!({
            "text": text,
            "records": inputs.iter().map(|i| serde_json::from_str(&i.line).unwrap_or(Value::Null)).collect::<Vec<_>>(),
        });
        let sent = post(&url, "application/json", &body.to_string());
        sink::finish(out, "webhook", &redact_url(&url), sent.status, sent.outcome, failed)?;
    }
    if let Some(healthcheck) = healthcheck {
        let target = healthcheck.target();
        let sent = healthcheck.finish(failed, &text);
        sink::finish(out, "healthcheck", &target, sent.status, sent.outcome, failed)?;
    }
    if let Some(path) = &cli.prom_file {
        prom::notify(path, &inputs, failed, out)?;
    }
    if let Some(syslog) = syslog {
        syslog.finish(failed, out)?;
    }
    Ok(())
}

/// A sink's URL, if its option is given. One that cannot be read is this run's failure,
/// said at once and told by the other sinks; that sink is left out.
fn sink_url(
    out: &mut Output,
    inputs: &mut Vec<Input>,
    option: &str,
    reference: Option<&str>,
) -> Result<Option<String>> {
    match reference.map(|r| read_url(option, r)).transpose() {
        Ok(url) => Ok(url),
        Err(e) => {
            inputs.push(own_failure(out, &e)?);
            Ok(None)
        }
    }
}

/// Reports a failure of this run, and returns its error record for the sinks to tell.
fn own_failure(out: &mut Output, e: &Error) -> Result<Input> {
    out.error(e)?;
    let record = Record::Error(out.error_record(e));
    Ok(Input {
        line: record.to_line(),
        record,
    })
}

/// One line per failure, then one per backup, for people. A backup's line says only that it
/// exists: the records may be a listing (bk-ls --stale), not this run's work.
fn summary(inputs: &[Input]) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let (failures, backups): (Vec<&Input>, Vec<&Input>) = inputs.iter().partition(|i| failed(i));
    let lines: Vec<String> = failures
        .into_iter()
        .chain(backups)
        .filter_map(|input| match &input.record {
            Record::Artifact(a) => Some(format!(
                "bk on {host}: {}: backup {} ({} bytes) at {}",
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

/// Whether a record says that the backup failed: an error, or a verification that did not pass.
fn failed(input: &Input) -> bool {
    match &input.record {
        Record::Error(_) => true,
        Record::Verified(v) => v.get("ok").and_then(serde_json::Value::as_bool) != Some(true),
        _ => false,
    }
}
