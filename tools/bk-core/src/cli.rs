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
    let cli = match C::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                _ => Kind::Usage.exit_code(),
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let mut out = Output::stdout(&tool);
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

/// Reads every record on stdin; refuses a terminal, where nobody would type JSON.
pub fn read_stdin_records(hint: &str) -> Result<Vec<Input>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(Error::usage(format!("no records on stdin (it is a terminal); {hint}")));
    }
    read_all(stdin.lock(), "stdin")
}
