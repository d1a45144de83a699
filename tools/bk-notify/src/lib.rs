//! bk-notify: the last tool of a pipeline. It passes every record on unchanged and makes a
//! failure impossible to miss: its exit status is non-zero when anything upstream failed
//! (cron's /bin/sh has no pipefail, so the last tool's status is the pipeline's), and it
//! tells a person or a monitor through its sinks.

use clap::Parser;

use bk_core::cli::read_stdin_records;
use bk_core::error::Result;
use bk_core::record::{Input, Output, Record};

/// Tell people and monitors how the pipeline went.
///
/// The last tool of a pipeline (bk-dump ... | bk-ship ... | bk-notify ...). Passes every
/// record on unchanged, then exits 1 if any error record came in or a verified record says
/// ok: false, so that cron sees the pipeline fail.
#[derive(Debug, Parser)]
#[command(name = "bk-notify", version, after_help = bk_core::cli::exit_status_help())]
pub struct Cli {}

impl bk_core::cli::Tool for Cli {}

pub fn run(_cli: Cli, out: &mut Output) -> Result<()> {
    let inputs = read_stdin_records(out, "pipe a bk tool's records in (bk-dump ... | bk-notify)")?;
    for input in &inputs {
        out.pass(input)?;
    }
    if inputs.iter().any(failed) {
        out.upstream_failed();
    }
    Ok(())
}

/// Whether a record says that the backup failed: an error, or a verification that did not pass.
fn failed(input: &Input) -> bool {
    match &input.record {
        Record::Error(_) => true,
        Record::Verified(v) => v.get("ok").and_then(serde_json::Value::as_bool) != Some(true),
        _ => false,
    }
}
