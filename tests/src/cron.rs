//! /etc/cron.d files as cron reads them, and their commands run as cron runs them: shared by
//! the example files' test (tests/cron.rs) and the Ansible role's (tests/ansible.rs).

use std::fs;
use std::path::Path;
use std::process::Command;

/// A cron.d file: its `NAME=value` lines and its jobs, in order.
pub struct CronFile {
    pub env: Vec<(String, String)>,
    pub jobs: Vec<Job>,
}

/// One job line of a cron.d file.
pub struct Job {
    /// 1-based, for messages.
    pub line: usize,
    pub user: String,
    pub command: String,
}

const NICKNAMES: [&str; 8] = [
    "@reboot",
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];

/// `NAME=value` (spaces allowed around `=`, as cron allows).
fn env_line(line: &str) -> Option<(String, String)> {
    let (name, value) = line.split_once('=')?;
    let name = name.trim();
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    ok.then(|| (name.to_string(), value.trim().to_string()))
}

/// Splits a system crontab line into schedule, user and command, as cron reads it:
/// 5 time fields (or one `@daily`-style word), the user, then the rest of the line.
fn job_line(path: &Path, n: usize, line: &str) -> Job {
    let at = |what: &str| format!("{}:{n}: {what}: {line}", path.display());
    let fields = if line.starts_with('@') { 1 } else { 5 };
    let mut rest = line.trim_start();
    let mut words = Vec::new();
    for _ in 0..fields + 1 {
        let end = rest
            .find(char::is_whitespace)
            .unwrap_or_else(|| panic!("{}", at("fewer than 5 time fields, a user and a command")));
        words.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    let (schedule, user) = words.split_at(fields);
    for field in schedule {
        let ok = if fields == 1 {
            NICKNAMES.contains(field)
        } else {
            field.chars().all(|c| c.is_ascii_alphanumeric() || "*,/-".contains(c))
        };
        assert!(ok, "{}", at(&format!("bad time field {field:?}")));
    }
    let user = user[0].to_string();
    assert!(
        user.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
            && !user.chars().all(|c| c.is_ascii_digit()),
        "{}",
        at("the sixth field of a cron.d line is a user name")
    );
    let command = rest.trim_end().to_string();
    assert!(!command.is_empty(), "{}", at("no command"));
    Job { line: n, user, command }
}

/// Reads a cron.d file, panicking with the file and line on anything cron would not take.
pub fn parse(path: &Path) -> CronFile {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        text.ends_with('\n'),
        "{}: cron ignores a last line without a newline",
        path.display()
    );
    let mut file = CronFile {
        env: Vec::new(),
        jobs: Vec::new(),
    };
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(kv) =
            env_line(trimmed).filter(|_| !trimmed.starts_with(|c: char| c.is_ascii_digit() || "*@".contains(c)))
        {
            file.env.push(kv);
        } else {
            file.jobs.push(job_line(path, i + 1, trimmed));
        }
    }
    file
}

/// A cron.d file name cron (run-parts) accepts: letters, digits, `_` and `-` only.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Whether a job's command holds a `%` not written `\%` (cron turns it into a newline).
pub fn has_bare_percent(command: &str) -> bool {
    command
        .char_indices()
        .any(|(i, c)| c == '%' && !command[..i].ends_with('\\'))
}

/// The words of a command (the examples quote nothing), shell operators among them.
pub fn words(command: &str) -> Vec<String> {
    command.split_whitespace().map(str::to_string).collect()
}

/// A word that is a shell operator or redirection rather than an argument.
pub fn is_operator(word: &str) -> bool {
    ["|", "||", "&&", ";", "&"].contains(&word)
        || word.starts_with('>')
        || word.starts_with("2>")
        || word.starts_with('<')
}

impl CronFile {
    /// The value of one of the file's variables.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// `command` as cron runs it: `/bin/sh -c` (the file's SHELL), with the file's variables,
    /// HOME and LOGNAME, and nothing else of this process's environment. `command` is the
    /// job's, with `\%` already turned back into `%` as cron does.
    pub fn shell(&self, command: &str, user: &str, home: &Path) -> Command {
        let mut cmd = Command::new(self.var("SHELL").unwrap_or("/bin/sh"));
        cmd.arg("-c").arg(command).env_clear();
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.env("HOME", home).env("LOGNAME", user);
        cmd
    }
}
