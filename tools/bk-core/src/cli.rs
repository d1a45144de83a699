//! What every tool's `main` shares: parsing, the exit code, errors printed once.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;

use crate::error::{Error, Kind, Result};
use crate::lock::{default_lock_dir, NameLock};
use crate::record::{read_all, Input, Output};

/// Runs a tool: parses its command line (usage errors exit 64), runs it, and turns the
/// outcome into the exit code. A failure prints an `error` record on stdout and one line on
/// stderr, once; a closed stdout ends the run quietly with 0.
pub fn main<C: clap::Parser>(run: fn(C, &mut Output) -> Result<()>) -> ExitCode {
    let tool = C::command().get_name().to_string();
    // SIGINT and SIGTERM undo unfinished work (temporary files, scratch databases) first.
    crate::cleanup::install(&tool);
    let mut out = Output::stdout(&tool);
    let cli = match C::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Like any failure: an error record, one line on stderr, then where to look.
            let text = e.render().to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ")
                .to_string();
            let _ = out.error(&Error::usage(first));
            eprintln!("{tool}: try '{tool} --help'");
            return ExitCode::from(out.exit_code());
        }
    };
    match run(cli, &mut out) {
        Err(e) if e.kind == Kind::Closed => return ExitCode::SUCCESS,
        Err(e) => {
            if let Err(closed) = out.error(&e) {
                if closed.kind != Kind::Closed {
                    eprintln!("{tool}: {}", closed.message);
                }
            }
        }
        Ok(()) => {}
    }
    ExitCode::from(out.exit_code())
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
    pub fn acquire(&self, name: &str) -> Result<NameLock> {
        let dir = self.lock_dir.clone().unwrap_or_else(default_lock_dir);
        NameLock::acquire(&dir, name, self.wait.map(Duration::from_secs)).map_err(|e| e.named(name))
    }
}

/// Where s3:// stores are, for every tool that opens stores. The options only set
/// BK_S3_ENDPOINT and BK_S3_REGION for the run, which is where the S3 store reads them.
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
    /// Makes the options the S3 store's settings for this run; call before opening a store.
    pub fn apply(&self) {
        if let Some(endpoint) = &self.s3_endpoint {
            std::env::set_var("BK_S3_ENDPOINT", endpoint);
        }
        if let Some(region) = &self.s3_region {
            std::env::set_var("BK_S3_REGION", region);
        }
    }
}

/// Reads every record on stdin; refuses a terminal, where nobody would type JSON.
pub fn read_stdin_records(hint: &str) -> Result<Vec<Input>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(Error::usage(format!("no records on stdin (it is a terminal); {hint}")));
    }
    read_all(stdin.lock(), "stdin")
}
