//! What every tool's `main` shares: parsing, the exit code, errors printed once.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;

use crate::error::{Error, Kind, Result};
use crate::lock::{default_lock_dir, Lock};
use crate::record::{Input, Output, Records};
use crate::store::StoreConfig;

/// A tool's parsed command line.
pub trait Tool: clap::Parser {
    /// Whether stdout carries records (and so the `begin` and `end` records around them),
    /// rather than a table for people.
    fn prints_records(&self) -> bool {
        true
    }
}

/// Runs a tool: parses its command line `args` (the program name first; usage errors exit
/// 64), runs it, and turns the outcome into the exit code. A failure prints an `error` record on stdout and one line on
/// stderr, once; a closed stdout ends the run quietly with 0. Records are framed by `begin`
/// and `end` (bk(7)), so that a reader can tell a stream cut short by a kill.
pub fn main<C: Tool>(args: Vec<OsString>, run: fn(C, &mut Output) -> Result<()>) -> ExitCode {
    let tool = C::command().get_name().to_string();
    // Signals and panics undo unfinished work (temporary files, scratch databases) first,
    // then print an error record.
    crate::cleanup::install(&tool);
    let mut out = Output::stdout(&tool);
    let cli = match C::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Like any failure: an error record, one line on stderr, then where to look.
            let _ = out.error(&Error::usage(usage_line(&e)));
            eprintln!("{tool}: try '{tool} --help'");
            return ExitCode::from(out.exit_code());
        }
    };
    // Test builds only: the way tests/tests/hostile.rs proves a panic becomes an error record.
    #[cfg(debug_assertions)]
    if std::env::var_os("BK_DEBUG_PANIC").is_some() {
        let _ = out.begin();
        panic!("BK_DEBUG_PANIC is set");
    }
    let ran = if cli.prints_records() {
        out.begin().and_then(|()| run(cli, &mut out))
    } else {
        out.print_tables();
        run(cli, &mut out)
    };
    let ended = match ran {
        Err(e) if e.kind == Kind::Closed => return ExitCode::SUCCESS,
        Err(e) => out.error(&e).and_then(|()| out.end()),
        Ok(()) => out.end(),
    };
    match ended {
        Err(e) if e.kind == Kind::Closed => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: {}", e.message);
            ExitCode::from(Kind::Io.exit_code())
        }
        Ok(()) => ExitCode::from(out.exit_code()),
    }
}

/// clap's message in one line, naming what is missing or wrong: "the following required
/// arguments were not provided: --to <STORE>".
fn usage_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut lines = text
        .lines()
        .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"));
    let first = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string();
    let more: Vec<&str> = lines.map(str::trim).filter(|l| !l.is_empty()).collect();
    if more.is_empty() {
        first
    } else {
        format!("{} {}", first, more.join(", "))
    }
}

/// The exit status section of every tool's help and man page.
pub fn exit_status_help() -> String {
    let lines: Vec<String> = Kind::ALL
        .iter()
        .map(|k| format!("  {:>2}  {}", k.exit_code(), k.meaning()))
        .collect();
    format!(
        "Exit status:\n   0  success\n{}\n  Other non-zero codes mean failure too. See bk(7).",
        lines.join("\n")
    )
}

/// How a tool that can print a table prints its results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Records, one per line (JSON Lines)
    Json,
    /// Aligned columns for people
    Table,
}

/// Options of every tool that takes a per-name lock.
#[derive(Debug, Clone, clap::Args)]
pub struct LockOpts {
    /// Directory of the per-name lock files [default: /run/lock/bk for root, else
    /// $XDG_RUNTIME_DIR/bk or /tmp/bk-UID]
    #[arg(long, env = "BK_LOCK_DIR", value_name = "DIR", global = true)]
    pub lock_dir: Option<PathBuf>,
    /// Wait up to SECS for another run of the same name to finish, instead of exiting 75 at once
    #[arg(long, value_name = "SECS", global = true)]
    pub wait: Option<u64>,
}

impl LockOpts {
    pub fn acquire(&self, name: &str) -> Result<Lock> {
        let dir = self.lock_dir.clone().unwrap_or_else(default_lock_dir);
        Lock::acquire(&dir, name, self.wait.map(Duration::from_secs)).map_err(|e| e.named(name))
    }
}

/// Where s3:// stores are, for every tool that opens stores: the S3 part of the
/// [`StoreConfig`] the stores are opened with.
#[derive(Debug, Clone, clap::Args)]
pub struct S3Opts {
    /// S3 endpoint URL for s3:// stores, e.g. http://127.0.0.1:3900 for Garage or MinIO
    /// [default: AWS_ENDPOINT_URL, endpoint_url in ~/.aws/config, else AWS]
    #[arg(long, value_name = "URL", env = "BK_S3_ENDPOINT", global = true)]
    pub s3_endpoint: Option<String>,
    /// S3 region for s3:// stores [default: AWS_REGION, ~/.aws/config, else us-east-1]
    #[arg(long, value_name = "REGION", env = "BK_S3_REGION", global = true)]
    pub s3_region: Option<String>,
}

impl S3Opts {
    /// The configuration every store of the run is opened with.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            s3_endpoint: self.s3_endpoint.clone().filter(|e| !e.is_empty()),
            s3_region: self.s3_region.clone().filter(|r| !r.is_empty()),
        }
    }
}

/// Reads every record on stdin, for a tool whose input is records (no store given); refuses
/// a terminal, where nobody would type JSON. Nothing at all on stdin is an upstream failure
/// (see [`stdin_records`]).
pub fn read_stdin_records(out: &Output, hint: &str) -> Result<Vec<Input>> {
    stdin_records(out, hint)?.collect()
}

/// The records on stdin one at a time, as they come, for a tool whose input is records and
/// that acts on each at once (bk-notify); refuses a terminal, where nobody would type JSON.
/// Nothing at all on stdin means the command before failed or was killed before it printed
/// anything: the last item is then an upstream failure (exit 1), so that the pipeline fails
/// under cron's /bin/sh, which has no pipefail. `hint` says what to pipe in.
pub fn stdin_records(out: &Output, hint: &str) -> Result<StdinRecords> {
    if std::io::stdin().is_terminal() {
        return Err(Error::usage(format!("no records on stdin (it is a terminal); {hint}")));
    }
    Ok(StdinRecords::new(out, Some(hint)))
}

/// Reads the records on stdin of a tool given its store, which works standalone: an empty
/// stdin (cron's) or a terminal gives no records.
pub fn read_stdin_beside_store(out: &Output) -> Result<Vec<Input>> {
    if std::io::stdin().is_terminal() {
        return Ok(Vec::new());
    }
    StdinRecords::new(out, None).collect()
}

/// The records on stdin, as [`Records`] reads them, saying on stderr once why a stream was
/// cut short (its error record travels on).
pub struct StdinRecords {
    records: Records<std::io::StdinLock<'static>>,
    tool: String,
    /// What to pipe in, when records are required: nothing at all is then a failure.
    required: Option<String>,
    said: usize,
    any: bool,
}

impl StdinRecords {
    fn new(out: &Output, required: Option<&str>) -> Self {
        StdinRecords {
            records: Records::new(std::io::stdin().lock(), "stdin"),
            tool: out.tool().to_string(),
            required: required.map(str::to_string),
            said: 0,
            any: false,
        }
    }
}

impl Iterator for StdinRecords {
    type Item = Result<Input>;

    fn next(&mut self) -> Option<Result<Input>> {
        let next = self.records.next();
        for message in &self.records.cut_short[self.said..] {
            eprintln!("{}: {message}", self.tool);
        }
        self.said = self.records.cut_short.len();
        if next.is_some() {
            self.any = true;
            return next;
        }
        let hint = self.required.take().filter(|_| !self.any && !self.records.announced)?;
        Some(Err(Error::new(
            Kind::Upstream,
            format!("no records on stdin: the command before printed nothing, so it failed or was killed; {hint}"),
        )))
    }
}
