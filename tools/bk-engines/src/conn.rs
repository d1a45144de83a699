//! How bk reaches a database server: the options shared by bk-dump's database engines and
//! bk-restore. Secrets never go on a command line: MySQL reads an option file
//! (--defaults-file, else ~/.my.cnf), PostgreSQL a password file (.pgpass / PGPASSFILE).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use bk_core::error::Result;
use bk_core::private::check_private_file;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnArgs {
    /// MySQL: option file with the credentials ([client] user=, password=); must be mode 0600
    /// [default: ~/.my.cnf]
    #[arg(long, value_name = "FILE")]
    pub defaults_file: Option<PathBuf>,
    /// Server host name or address [default: the local socket]
    #[arg(long)]
    pub host: Option<String>,
    /// Server port [default: 3306 for MySQL, 5432 for PostgreSQL]
    #[arg(long)]
    pub port: Option<u16>,
    /// MySQL: the server's Unix socket
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// User name [default: from the option file, or the login name]
    #[arg(long)]
    pub user: Option<String>,
}

fn home_file(name: &str) -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(name))
        .filter(|p| p.exists())
}

impl ConnArgs {
    /// The option file the MySQL tools will read, checked to be private.
    pub fn check_mysql(&self) -> Result<()> {
        if let Some(f) = &self.defaults_file {
            check_private_file(f, "option file")?;
        } else if let Some(f) = home_file(".my.cnf") {
            check_private_file(&f, "option file")?;
        }
        Ok(())
    }

    /// Arguments for the MySQL client programs; `--defaults-file` must come first.
    pub fn mysql_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(f) = &self.defaults_file {
            let mut a = OsString::from("--defaults-file=");
            a.push(f);
            args.push(a);
        }
        if let Some(h) = &self.host {
            args.push(format!("--host={h}").into());
        }
        if let Some(p) = self.port {
            args.push(format!("--port={p}").into());
        }
        if let Some(s) = &self.socket {
            let mut a = OsString::from("--socket=");
            a.push(s);
            args.push(a);
        }
        if let Some(u) = &self.user {
            args.push(format!("--user={u}").into());
        }
        args
    }

    /// The host recorded in an artifact's source.
    pub fn host_name(&self) -> String {
        match &self.host {
            Some(h) if h != "localhost" && h != "127.0.0.1" && h != "::1" => h.clone(),
            _ => crate::hostname(),
        }
    }
}
