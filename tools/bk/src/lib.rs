//! The one binary behind every tool (as busybox and uutils' coreutils are): run through a
//! link named `bk-dump` it is bk-dump, and `bk dump ...` is the same. One binary links the
//! shared code once, so the tools build in a quarter of the time and take a sixth of the space.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Arg, ArgAction, Command, CommandFactory};

use bk_core::cli::main as run_tool;
use bk_core::error::{Error, Kind, Result};

/// A tool: its name after `bk-`, its command line, and how to run it.
pub struct Tool {
    pub name: &'static str,
    pub command: fn() -> Command,
    run: fn(Vec<OsString>) -> ExitCode,
}

/// The entry of the tool whose crate is `$krate`, named `$name` after `bk-`.
macro_rules! tool {
    ($name:literal, $krate:ident) => {
        Tool {
            name: $name,
            command: $krate::Cli::command,
            run: |args| run_tool(args, $krate::run),
        }
    };
}

/// Every tool, in pipeline order.
pub const TOOLS: [Tool; 7] = [
    tool!("dump", bk_dump),
    tool!("ship", bk_ship),
    tool!("ls", bk_ls),
    tool!("prune", bk_prune),
    tool!("verify", bk_verify),
    tool!("restore", bk_restore),
    tool!("notify", bk_notify),
];

/// `bk`'s own command line, for `bk --help` and bk(1).
pub fn command() -> Command {
    let tools: Vec<String> = TOOLS
        .iter()
        .map(|t| {
            let about = (t.command)().get_about().map(|a| a.to_string()).unwrap_or_default();
            format!("  {:<8} {about} (bk-{})", t.name, t.name)
        })
        .collect();
    Command::new("bk")
        .version(bk_core::BK_VERSION)
        .about("Every bk tool in one binary")
        .long_about(
            "Every bk tool in one binary. Run through a link named after a tool (bk-dump, bk-ship, \
             bk-ls, bk-prune, bk-verify, bk-restore, bk-notify) it is that tool; `bk TOOL ARGS...` is the \
             same as `bk-TOOL ARGS...`. `bk --install-links` creates the links.",
        )
        .override_usage("bk TOOL [ARGS]...\n       bk --install-links [DIR]")
        .arg(
            Arg::new("install-links")
                .long("install-links")
                .value_name("DIR")
                .num_args(0..=1)
                .value_parser(clap::value_parser!(PathBuf))
                .action(ArgAction::Set)
                .help(
                    "Create (or repair) the links bk-dump, bk-ship, ... to this binary in DIR \
                     [default: the directory bk is in]; an existing file of that name is replaced",
                ),
        )
        .allow_external_subcommands(true)
        .after_help(format!(
            "Tools:\n{}\n\nEach tool's options: bk TOOL --help, or its man page.",
            tools.join("\n")
        ))
}

/// Runs the tool that `args` name: by the program's file name (`bk-dump`), or by the first
/// argument after `bk`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let program = args.first().map(|p| file_name(p)).unwrap_or_default();
    if let Some(tool) = program.strip_prefix("bk-").and_then(find) {
        return (tool.run)(args);
    }
    let matches = match command().try_get_matches_from(&args) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { Kind::Usage.exit_code() } else { 0 });
        }
    };
    if matches.contains_id("install-links") {
        let dir = matches.get_one::<PathBuf>("install-links").cloned();
        return match install_links(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bk: {}", e.message);
                ExitCode::from(e.kind.exit_code())
            }
        };
    }
    let Some((name, rest)) = matches.subcommand() else {
        eprint!("{}", command().render_help());
        return ExitCode::from(Kind::Usage.exit_code());
    };
    let Some(tool) = find(name) else {
        eprintln!("bk: no tool named '{name}'; try 'bk --help'");
        return ExitCode::from(Kind::Usage.exit_code());
    };
    let mut tool_args = vec![OsString::from(format!("bk-{}", tool.name))];
    tool_args.extend(rest.get_many::<OsString>("").into_iter().flatten().cloned());
    (tool.run)(tool_args)
}

fn find(name: &str) -> Option<&'static Tool> {
    TOOLS
        .iter()
        .find(|t| t.name == name.strip_prefix("bk-").unwrap_or(name))
}

fn file_name(path: &OsStr) -> String {
    Path::new(path)
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// Makes DIR/bk-<tool> a symbolic link to this binary for every tool: a relative link when
/// DIR is the binary's own directory (so the pair can move together), else an absolute one.
/// Each link is made under a temporary name and renamed over the old one, so a tool that a
/// cron job runs meanwhile is always there.
fn install_links(dir: Option<PathBuf>) -> Result<()> {
    let exe = std::env::current_exe()
        .and_then(fs::canonicalize)
        .map_err(|e| Error::new(Kind::Io, format!("cannot find this binary's path: {e}")))?;
    let exe_dir = exe.parent().expect("a file's path has a parent").to_path_buf();
    let dir = dir.unwrap_or_else(|| exe_dir.clone());
    let dir_real = fs::canonicalize(&dir).map_err(|e| Error::new(Kind::NoInput, format!("{}: {e}", dir.display())))?;
    let target = if dir_real == exe_dir {
        PathBuf::from(exe.file_name().unwrap())
    } else {
        exe.clone()
    };
    for tool in &TOOLS {
        let link = dir.join(format!("bk-{}", tool.name));
        if fs::read_link(&link).is_ok_and(|t| t == target) {
            continue;
        }
        let temp = dir.join(format!(".bk-{}.link-{}", tool.name, std::process::id()));
        let made = symlink(&target, &temp).and_then(|()| fs::rename(&temp, &link));
        if let Err(e) = made {
            let _ = fs::remove_file(&temp);
            let kind = if e.kind() == io::ErrorKind::PermissionDenied {
                Kind::NoPerm
            } else {
                Kind::CantCreate
            };
            return Err(Error::new(kind, format!("cannot create {}: {e}", link.display())));
        }
        eprintln!("bk: {} -> {}", link.display(), target.display());
    }
    Ok(())
}
