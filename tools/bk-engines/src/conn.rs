//! How bk reaches a database server: the options shared by bk-dump's database engines and
//! bk-restore. Secrets never go on a command line: MySQL reads an option file
//! (--defaults-file, else ~/.my.cnf), PostgreSQL a password file (.pgpass / PGPASSFILE).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use bk_core::error::Result;
use bk_core::private::check_private_file;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnArgs {
    /// Server host name or address (PostgreSQL: or a socket directory) [default: the local
    /// socket]
    #[arg(long)]
    pub host: Option<String>,
    /// Server port [default: the server's usual one, 3306 or 5432]
    #[arg(long)]
    pub port: Option<u16>,
    /// User name [default: MySQL: from the option file; PostgreSQL: PGUSER or the login name]
    #[arg(long)]
    pub user: Option<String>,
}

/// What only MySQL's client programs take.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MysqlOpts {
    /// MySQL: option file with the credentials ([client] user=, password=); must be mode 0600
    /// [default: ~/.my.cnf]
    #[arg(long, value_name = "FILE")]
    pub defaults_file: Option<PathBuf>,
    /// MySQL: the server's Unix socket
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// A MySQL server as its client programs reach it.
pub struct Mysql<'a> {
    pub conn: &'a ConnArgs,
    pub opts: &'a MysqlOpts,
}

/// `$HOME/<name>`, whether or not it exists.
pub fn home_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| Path::new(&h).join(name))
}

fn home_file(name: &str) -> Option<PathBuf> {
    home_path(name).filter(|p| p.exists())
}

impl Mysql<'_> {
    /// The option file the client programs will read, if any.
    fn option_file(&self) -> Option<PathBuf> {
        self.opts.defaults_file.clone().or_else(|| home_file(".my.cnf"))
    }

    /// The option file must be private (exit 78 otherwise).
    pub fn check(&self) -> Result<()> {
        match self.option_file() {
            Some(f) => check_private_file(&f, "option file"),
            None => Ok(()),
        }
    }

    /// Arguments for the client programs; `--defaults-file` must come first.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut path_arg = |flag: &str, p: &Path| {
            let mut a = OsString::from(flag);
            a.push(p);
            args.push(a);
        };
        if let Some(f) = &self.opts.defaults_file {
            path_arg("--defaults-file=", f);
        }
        if let Some(s) = &self.opts.socket {
            path_arg("--socket=", s);
        }
        args.extend(self.conn.host.iter().map(|h| format!("--host={h}").into()));
        args.extend(self.conn.port.iter().map(|p| format!("--port={p}").into()));
        args.extend(self.conn.user.iter().map(|u| format!("--user={u}").into()));
        args
    }

    /// Host and port as recorded in artifacts: the options, else the option file's
    /// [client] section, else this machine.
    pub fn server(&self) -> (String, Option<u16>) {
        let from_file = |key: &str| self.option_file().and_then(|f| option_file_value(&f, key));
        let host = self.conn.host.clone().or_else(|| from_file("host"));
        let port = self
            .conn
            .port
            .or_else(|| from_file("port").and_then(|p| p.parse().ok()));
        (local_or(host), port)
    }
}

/// A host as recorded in artifacts: this machine's name stands for the local ones.
pub fn local_or(host: Option<String>) -> String {
    match host {
        Some(h) if !["localhost", "127.0.0.1", "::1"].contains(&h.as_str()) && !h.starts_with('/') => h,
        _ => crate::hostname(),
    }
}

/// `key = value` of the [client] section of a MySQL option file.
fn option_file_value(path: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut in_client = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_client = line == "[client]";
        } else if let (true, Some((k, v))) = (in_client, line.split_once('=')) {
            if k.trim() == key {
                return Some(v.trim().trim_matches(|c| c == '"' || c == '\'').to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_file_host_is_read_from_client() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("my.cnf");
        std::fs::write(
            &f,
            "[mysqldump]\nhost=other\n[client]\nuser = backup\nhost = \"db3\"\nport=3307\n",
        )
        .unwrap();
        assert_eq!(option_file_value(&f, "host").as_deref(), Some("db3"));
        assert_eq!(option_file_value(&f, "port").as_deref(), Some("3307"));
        assert_eq!(option_file_value(&f, "password"), None);
    }
}
