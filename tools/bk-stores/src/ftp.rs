//! `ftp://[user@]host[:port]/path` and `ftps://[user@]host[:port]/path`: a store on an FTP
//! server. `ftps://` is explicit FTPS (AUTH TLS on port 21 unless given, then PROT P: every data
//! connection is encrypted too); it never falls back to plain FTP. Certificates are checked
//! against the system's CA store, or the PEM bundle named by `SSL_CERT_FILE` (`SSL_CERT_DIR`),
//! which replaces it, as in OpenSSL.
//!
//! The path is the server's, after login: relative to the login directory, as in curl and RFC
//! 1738 (`ftp://host/backups`); `ftp://host//srv/bk` is the absolute `/srv/bk`.
//!
//! Credentials: a password in the URL is refused (it would show in `ps`, logs and records).
//! The password comes from `BK_FTP_CREDENTIALS` if set, else from `NETRC` (as curl), else from
//! `~/.netrc`: netrc lines `machine HOST login USER password PASS` (or `default ...`). A file
//! that gives the password must not be readable by group or others (78). Without a user in the
//! URL the netrc's login is used, else `anonymous`.
//!
//! Uploads stream to a hidden temporary name while their sha256 is computed, are read back and
//! checked (FTP has no standard hash command), then renamed into place (RNFR/RNTO); the manifest
//! is written last the same way. Directories bk creates are made 0700 and files 0600 with SITE
//! CHMOD where the server allows it; elsewhere the server's umask decides. Listing is MLSD
//! (`LIST -a` where the server lacks it: the temporary files start with a dot).
//!
//! Exit codes: server unreachable 69; login refused 77; a directory or file the server will not
//! create 73; a copy that differs from what was sent 65; TLS refused or a certificate not
//! trusted 78.

use std::io::{self, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bk_core::error::{describe_io, Error, Kind, Result};
use bk_core::record::Artifact;
use bk_core::store::{manifest_file, percent_decode, Listing, Store, Upload};
use sha2::{Digest, Sha256};
use suppaftp::list::ListParser;
use suppaftp::rustls::client::Resumption;
use suppaftp::rustls::{ClientConfig, RootCertStore};
use suppaftp::types::FileType;
use suppaftp::{FtpError, FtpResult, Mode, RustlsConnector, RustlsFtpStream, Status, TlsStream, TransferStream};

/// An FTP control connection, logged in, in binary mode.
type Session = RustlsFtpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a control or data connection may stay silent.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
const BUFFER: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct FtpStore {
    /// The URL without a password or a trailing slash.
    url: String,
    secure: bool,
    host: String,
    port: u16,
    user: Option<String>,
    /// The directory on the server: "" is the login directory; relative paths are below it.
    root: String,
}

impl FtpStore {
    pub fn open(url: &str) -> Result<Self> {
        crate::refuse_secret_in_url(
            "store",
            url,
            true,
            "put it in ~/.netrc (machine HOST login USER password PASS, chmod 600) or a file named by BK_FTP_CREDENTIALS",
        )?;
        let (scheme, rest) = url
            .split_once("://")
            .filter(|(s, _)| ["ftp", "ftps"].contains(s))
            .ok_or_else(|| Error::usage(format!("store {url}: not an ftp:// or ftps:// URL")))?;
        let secure = scheme == "ftps";
        let bad = |why: &str| Error::usage(format!("store {url}: {why} ({scheme}://[user@]host[:port]/path)"));
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (host, port) = match hostport.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(|| bad("bad host"))?;
                (host, after.strip_prefix(':'))
            }
            None => match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            },
        };
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| bad("bad port"))?,
            None => 21,
        };
        if host.is_empty() || host.starts_with('-') || host.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(bad("bad host"));
        }
        // `/path` is relative to the login directory, `//path` absolute.
        let raw = path.strip_prefix('/').unwrap_or(path);
        let trimmed = raw.trim_end_matches('/');
        let raw = if trimmed.is_empty() && raw.starts_with('/') {
            "/"
        } else {
            trimmed
        };
        let root = percent_decode(raw);
        if root.contains(|c: char| c.is_control()) {
            return Err(bad("bad path"));
        }
        let user = userinfo.map(percent_decode).filter(|u| !u.is_empty());
        Ok(FtpStore {
            url: format!(
                "{scheme}://{}{hostport}{}",
                userinfo.map_or(String::new(), |u| format!("{u}@")),
                if raw.is_empty() {
                    String::new()
                } else {
                    format!("/{raw}")
                }
            ),
            secure,
            host: host.to_string(),
            port,
            user,
            root,
        })
    }

    /// `host:port`, for messages.
    fn server(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A path below the root, as the server takes it.
    fn path(&self, parts: &[&str]) -> String {
        let mut p = self.root.clone();
        for part in parts {
            if !(p.is_empty() || p.ends_with('/')) {
                p.push('/');
            }
            p.push_str(part);
        }
        p
    }

    /// Connects, secures (ftps) and logs in.
    fn connect(&self, doing: &str) -> Result<Session> {
        let login = self.credentials()?;
        let server = self.server();
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| Error::unavailable(format!("{doing}: cannot resolve {}: {e}", self.host)))?
            .collect();
        let mut last = None;
        let stream = addrs
            .iter()
            .find_map(|a| connect_tcp(a).map_err(|e| last = Some(e)).ok())
            .ok_or_else(|| {
                let why = last.map_or("no address".to_string(), |e| describe_io(&e));
                Error::unavailable(format!("{doing}: cannot reach the FTP server {server}: {why}"))
            })?;
        let ipv6 = stream.peer_addr().is_ok_and(|a| a.is_ipv6());
        let mut session = Session::connect_with_stream(stream)
            .map_err(|e| fail(doing, e, Kind::Unavailable))?
            .passive_stream_builder(|addr| connect_tcp(&addr).map_err(FtpError::ConnectionError));
        // The data connection goes to the control connection's address, whatever PASV says.
        session.set_passive_nat_workaround(true);
        if ipv6 {
            session.set_mode(Mode::ExtendedPassive);
        }
        if self.secure {
            session = session
                .into_secure(RustlsConnector::from(tls_config()?), &self.host)
                .map_err(|e| self.tls_failure(doing, e))?;
        }
        session.login(&login.user, &login.password).map_err(|e| {
            let mut e = match e {
                FtpError::UnexpectedResponse(r)
                    if matches!(
                        r.status,
                        Status::NotLoggedIn | Status::InvalidCredentials | Status::LoginNeedAccount
                    ) =>
                {
                    Error::new(
                        Kind::NoPerm,
                        format!(
                            "{doing}: login as {} to {server} refused: {}{}",
                            login.user,
                            reply_text(&r),
                            login.hint()
                        ),
                    )
                }
                e => fail(doing, e, Kind::NoPerm),
            };
            // A server that echoes what it was sent must not put the password in a record.
            if !login.password.is_empty() {
                e.message = e.message.replace(&login.password, "***");
            }
            e
        })?;
        session
            .transfer_type(FileType::Binary)
            .map_err(|e| fail(doing, e, Kind::Io))?;
        Ok(session)
    }

    fn tls_failure(&self, doing: &str, e: FtpError) -> Error {
        let server = self.server();
        match e {
            FtpError::UnexpectedResponse(r) => Error::config(format!(
                "{doing}: {server} refused TLS ({}): it does not offer FTPS; use ftp:// only where the network is trusted",
                reply_text(&r)
            )),
            FtpError::SecureError(why) => Error::config(format!("{doing}: TLS with {server} failed: {why}")),
            // rustls reports a refused certificate through the first read or write.
            FtpError::ConnectionError(io) if io.kind() == io::ErrorKind::InvalidData => Error::config(format!(
                "{doing}: TLS with {server} failed: {io} (a private CA: name a bundle holding it in SSL_CERT_FILE)"
            )),
            e => fail(doing, e, Kind::Unavailable),
        }
    }

    /// Who to log in as, and the password from the credentials file or netrc.
    fn credentials(&self) -> Result<Login> {
        let (file, named) = match std::env::var_os("BK_FTP_CREDENTIALS").filter(|v| !v.is_empty()) {
            Some(f) => (Some(PathBuf::from(f)), Some("BK_FTP_CREDENTIALS")),
            None => match std::env::var_os("NETRC").filter(|v| !v.is_empty()) {
                Some(f) => (Some(PathBuf::from(f)), Some("NETRC")),
                None => (std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".netrc")), None),
            },
        };
        let anonymous = || Login {
            user: self.user.clone().unwrap_or_else(|| "anonymous".into()),
            password: if self.user.is_none() {
                "bk@".into()
            } else {
                String::new()
            },
            source: None,
        };
        let Some(file) = file else { return Ok(anonymous()) };
        let shown = match named {
            Some(var) => format!("the {var} file {}", file.display()),
            None => "~/.netrc".to_string(),
        };
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            // No ~/.netrc: no password; a file named by a variable must be there.
            Err(e) if e.kind() == io::ErrorKind::NotFound && named.is_none() => return Ok(anonymous()),
            Err(e) => return Err(Error::config(format!("reading {shown}: {}", describe_io(&e)))),
        };
        let Some(entry) = find_netrc(&parse_netrc(&text), &self.host, self.user.as_deref()) else {
            if named == Some("BK_FTP_CREDENTIALS") {
                return Err(Error::config(format!(
                    "{shown} has no entry for {} (machine {} login USER password PASS)",
                    self.host, self.host
                )));
            }
            return Ok(Login {
                source: Some(shown),
                ..anonymous()
            });
        };
        if entry.password.is_some() {
            let what = match named {
                Some("BK_FTP_CREDENTIALS") => "FTP credentials file",
                _ => "netrc file",
            };
            bk_core::private::check_private_file(&file, what)?;
        }
        Ok(Login {
            user: self.user.clone().or(entry.login).unwrap_or_else(|| "anonymous".into()),
            password: entry.password.unwrap_or_default(),
            source: Some(shown),
        })
    }

    /// The files and directories of a directory on the server.
    fn entries(&self, session: &mut Session, dir: &str) -> FtpResult<Vec<Entry>> {
        let dir = if dir.is_empty() { None } else { Some(dir) };
        let lines = match session.mlsd(dir) {
            Err(FtpError::UnexpectedResponse(r))
                if matches!(
                    r.status,
                    Status::BadCommand | Status::NotImplemented | Status::NotImplementedParameter
                ) =>
            {
                // `-a`: vsftpd and others hide dot files (the temporary ones) from a bare LIST.
                let all = format!("-a {}", dir.unwrap_or_default());
                let lines = session.list(Some(all.trim_end())).or_else(|_| session.list(dir))?;
                return Ok(lines
                    .iter()
                    .filter_map(|l| ListParser::parse_posix(l).or_else(|_| ListParser::parse_dos(l)).ok())
                    .map(Entry::from)
                    .collect());
            }
            r => r?,
        };
        Ok(lines
            .iter()
            .filter_map(|l| {
                let mut entry = Entry::from(ListParser::parse_mlsd(l).ok()?);
                // The facts before the first space; a size the server leaves out is unknown.
                let facts = l.split(' ').next().unwrap_or_default().to_ascii_lowercase();
                if !facts.split(';').any(|f| f.starts_with("size=")) {
                    entry.size = None;
                }
                Some(entry)
            })
            .collect())
    }

    /// The regular files of each name's directory (of one name, or of all), with their sizes
    /// where the server tells them.
    fn files(&self, session: &mut Session, name: Option<&str>) -> Result<crate::Files> {
        let doing = format!("listing store {}", self.url);
        let names = match name {
            Some(n) => vec![n.to_string()],
            None => match self.entries(session, &self.root) {
                Ok(entries) => entries
                    .into_iter()
                    .filter(|e| e.is_dir && bk_core::name::validate_name(&e.name).is_ok())
                    .map(|e| e.name)
                    .collect(),
                Err(FtpError::UnexpectedResponse(r)) if no_such_dir(&r) => {
                    return Err(Error::no_input(format!(
                        "no store at {} ({})",
                        self.url,
                        reply_text(&r)
                    )))
                }
                Err(e) => return Err(fail(&doing, e, Kind::NoInput)),
            },
        };
        let mut files = crate::Files::new();
        for n in names {
            let list = match self.entries(session, &self.path(&[&n])) {
                Ok(entries) => entries
                    .into_iter()
                    .filter(|e| e.is_file)
                    .map(|e| (e.name, e.size))
                    .collect(),
                // A name's directory that is not there holds nothing.
                Err(FtpError::UnexpectedResponse(r)) if no_such_dir(&r) => Default::default(),
                Err(e) => return Err(fail(&doing, e, Kind::NoInput)),
            };
            files.insert(n, list);
        }
        Ok(files)
    }

    /// Creates a directory and its parents, as needed, 0700 where the server allows SITE CHMOD.
    fn ensure_dir(&self, session: &mut Session, dir: &str) -> FtpResult<()> {
        let home = session.pwd()?;
        let absolute = if dir.starts_with('/') {
            dir.to_string()
        } else {
            format!("{}/{dir}", home.trim_end_matches('/'))
        };
        if session.cwd(&absolute).is_err() {
            let mut prefix = String::new();
            for part in absolute.split('/').filter(|p| !p.is_empty()) {
                prefix.push('/');
                prefix.push_str(part);
                if session.cwd(&prefix).is_err() {
                    session.mkdir(&prefix)?;
                    let _ = session.site(format!("CHMOD 700 {prefix}"));
                }
            }
        }
        session.cwd(&home)
    }

    /// Removes a file; one that is not there is no error.
    fn remove(&self, session: &mut Session, name: &str, file: &str, doing: &str) -> Result<()> {
        match session.rm(self.path(&[name, file])) {
            Ok(()) => Ok(()),
            Err(FtpError::UnexpectedResponse(r)) if r.status == Status::FileUnavailable => {
                // 550 is also "permission denied": gone only if the listing says so.
                let still_there = self
                    .entries(session, &self.path(&[name]))
                    .map_err(|e| fail(doing, e, Kind::Io))?
                    .iter()
                    .any(|e| e.name == file);
                if still_there {
                    Err(Error::new(Kind::NoPerm, format!("{doing}: {}", reply_text(&r))))
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(fail(doing, e, Kind::Io)),
        }
    }

    /// Starts a STOR of a temporary name; the upload is published by `commit`.
    fn upload(&self, name: &str, file: &str) -> Result<FtpUpload> {
        bk_core::name::validate_name(name)?;
        let location = self.location(name, file);
        let doing = format!("writing {location}");
        let mut session = self.connect(&doing)?;
        let dir = self.path(&[name]);
        self.ensure_dir(&mut session, &dir)
            .map_err(|e| fail(&format!("creating {}/{name}", self.url), e, Kind::CantCreate))?;
        let temp = self.path(&[name, &bk_core::store::temp_name(file)]);
        let data = session
            .put_with_stream(&temp)
            .map_err(|e| fail(&doing, e, Kind::CantCreate))?;
        Ok(FtpUpload {
            store: self.clone(),
            session,
            data: Some(BufWriter::with_capacity(BUFFER, Box::new(data))),
            temp,
            target: self.path(&[name, file]),
            location,
            hasher: Sha256::new(),
        })
    }
}

/// Opens a TCP connection with the timeouts every FTP connection has.
fn connect_tcp(addr: &SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// The TLS settings of one FTP connection: the system's CA store (or SSL_CERT_FILE's), loaded
/// once, and a session cache of its own. Servers that require the data connections to resume
/// the control connection's TLS session (vsftpd's require_ssl_reuse) need the TLS 1.3 tickets
/// that connection got; rustls uses each ticket once, and one shared with earlier connections
/// would have spent them.
fn tls_config() -> Result<Arc<ClientConfig>> {
    static CONFIG: OnceLock<std::result::Result<Arc<ClientConfig>, String>> = OnceLock::new();
    let base = CONFIG
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map_or("none found".to_string(), |e| e.to_string());
                return Err(format!(
                    "no trusted CA certificates (system store, or SSL_CERT_FILE): {why}"
                ));
            }
            let provider = Arc::new(suppaftp::rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
        .map_err(Error::config)?;
    let mut config = ClientConfig::clone(&base);
    config.resumption = Resumption::in_memory_sessions(16);
    Ok(Arc::new(config))
}

/// An FTP failure as a bk error: `refused` is the kind of a 55x reply (the file or directory
/// cannot be had or made), which depends on what was being done.
fn fail(doing: &str, e: FtpError, refused: Kind) -> Error {
    match e {
        FtpError::ConnectionError(io) => {
            let kind = match io.kind() {
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::NotConnected
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::TimedOut
                | io::ErrorKind::WouldBlock
                | io::ErrorKind::UnexpectedEof
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable => Kind::Unavailable,
                _ => Kind::Io,
            };
            Error::new(kind, format!("{doing}: {}", describe_io(&io)))
        }
        FtpError::UnexpectedResponse(r) => {
            let kind = match r.status {
                Status::NotLoggedIn
                | Status::LoginNeedAccount
                | Status::StoringNeedAccount
                | Status::InvalidCredentials => Kind::NoPerm,
                Status::NotAvailable
                | Status::CannotOpenDataConnection
                | Status::TransferAborted
                | Status::HostUnavailable => Kind::Unavailable,
                Status::RequestFileActionIgnored
                | Status::ActionAborted
                | Status::RequestedActionNotTaken
                | Status::ExceededStorage => Kind::Io,
                Status::FileUnavailable | Status::BadFilename | Status::PageTypeUnknown => refused,
                _ => Kind::Io,
            };
            Error::new(kind, format!("{doing}: {}", reply_text(&r)))
        }
        FtpError::SecureError(why) => Error::config(format!("{doing}: TLS failed: {why}")),
        FtpError::BadResponse => Error::new(Kind::Io, format!("{doing}: the server's reply makes no sense")),
        FtpError::InvalidAddress(e) => Error::unavailable(format!("{doing}: bad data connection address: {e}")),
        FtpError::DataConnectionAlreadyOpen => Error::new(Kind::Io, format!("{doing}: a transfer is still open")),
    }
}

/// The reply to listing a directory that is not there: 550, or 501 from servers (pyftpdlib) that
/// find the argument is no directory.
fn no_such_dir(r: &suppaftp::types::Response) -> bool {
    matches!(r.status, Status::FileUnavailable | Status::BadArguments)
}

/// A server's reply on one line: `550 No such file or directory.`
fn reply_text(r: &suppaftp::types::Response) -> String {
    let text = String::from_utf8_lossy(&r.body);
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Who logs in; the password is never shown.
struct Login {
    user: String,
    password: String,
    /// The file the entry came from, for messages.
    source: Option<String>,
}

impl Login {
    /// Where to look when a login is refused.
    fn hint(&self) -> String {
        match (&self.source, self.password.is_empty()) {
            (Some(file), false) => format!(" (the password from {file})"),
            (Some(file), true) => format!(" ({file} has no password for this server)"),
            (None, _) => " (no password: put one in ~/.netrc, chmod 600)".to_string(),
        }
    }
}

/// One `machine` (or `default`) entry of a netrc file.
#[derive(Debug, Default, Clone, PartialEq)]
struct NetrcEntry {
    /// `None` for `default`.
    machine: Option<String>,
    login: Option<String>,
    password: Option<String>,
}

/// Parses netrc text as curl does: whitespace-separated tokens, `"quoted"` ones with
/// backslash escapes, `#` comment lines, `macdef` bodies (up to an empty line) skipped.
fn parse_netrc(text: &str) -> Vec<NetrcEntry> {
    let mut entries: Vec<NetrcEntry> = Vec::new();
    let mut lines = text.lines();
    let mut tokens: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut next = |tokens: &mut std::collections::VecDeque<String>| loop {
        if let Some(t) = tokens.pop_front() {
            return Some(t);
        }
        let line = lines.next()?;
        if line.trim_start().starts_with('#') {
            continue;
        }
        tokens.extend(netrc_tokens(line));
        if tokens.front().is_some_and(|t| t == "macdef") {
            tokens.clear();
            // The macro's body runs to the next empty line.
            for body in lines.by_ref() {
                if body.trim().is_empty() {
                    break;
                }
            }
        }
    };
    while let Some(token) = next(&mut tokens) {
        match token.as_str() {
            "machine" => entries.push(NetrcEntry {
                machine: Some(next(&mut tokens).unwrap_or_default()),
                ..Default::default()
            }),
            "default" => entries.push(NetrcEntry::default()),
            "login" | "password" | "account" => {
                let value = next(&mut tokens);
                if let Some(entry) = entries.last_mut() {
                    match token.as_str() {
                        "login" => entry.login = value,
                        "password" => entry.password = value,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    entries
}

/// The tokens of one netrc line.
fn netrc_tokens(line: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut token = String::new();
        if c == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('n') => token.push('\n'),
                        Some('r') => token.push('\r'),
                        Some('t') => token.push('\t'),
                        Some(other) => token.push(other),
                        None => {}
                    },
                    c => token.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                token.push(c);
                chars.next();
            }
        }
        tokens.push(token);
    }
    tokens
}

/// The entry for a host (and user, if the URL names one): the first matching `machine`,
/// else `default`.
fn find_netrc(entries: &[NetrcEntry], host: &str, user: Option<&str>) -> Option<NetrcEntry> {
    let fits = |e: &&NetrcEntry| user.is_none() || e.login.is_none() || e.login.as_deref() == user;
    entries
        .iter()
        .filter(fits)
        .find(|e| e.machine.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(host)))
        .or_else(|| entries.iter().filter(fits).find(|e| e.machine.is_none()))
        .cloned()
}

/// A directory entry, from MLSD or LIST.
struct Entry {
    name: String,
    is_dir: bool,
    /// A regular file: not a directory nor a symlink (LIST says which; MLSD lists no
    /// symlink as a file).
    is_file: bool,
    size: Option<u64>,
}

impl From<suppaftp::list::File> for Entry {
    fn from(f: suppaftp::list::File) -> Self {
        // Some servers give the path they were asked about in front of each name.
        let name = f.name().rsplit('/').next().unwrap_or_default().to_string();
        Entry {
            is_dir: f.is_directory(),
            is_file: f.is_file(),
            size: Some(f.size() as u64),
            name,
        }
    }
}

/// A data connection, whatever its TLS: read or written, then finished to learn how the
/// transfer ended.
trait Transfer: Read + Write {
    fn finish(self: Box<Self>) -> FtpResult<()>;
}

impl<T: TlsStream> Transfer for TransferStream<T> {
    fn finish(self: Box<Self>) -> FtpResult<()> {
        TransferStream::finish(*self)
    }
}

struct FtpUpload {
    store: FtpStore,
    session: Session,
    data: Option<BufWriter<Box<dyn Transfer>>>,
    /// The temporary file on the server; empty once published or removed.
    temp: String,
    target: String,
    location: String,
    hasher: Sha256,
}

impl FtpUpload {
    /// Closes the data connection and reads the server's word on the transfer.
    fn finish_transfer(&mut self) -> Result<()> {
        let doing = format!("writing {}", self.location);
        let Some(data) = self.data.take() else {
            return Err(Error::io(
                doing,
                io::Error::new(io::ErrorKind::BrokenPipe, "the transfer has ended"),
            ));
        };
        let (data, unsent) = match data.into_inner() {
            Ok(data) => (data, None),
            Err(e) => {
                let why = io::Error::new(e.error().kind(), e.error().to_string());
                (e.into_inner().into_parts().0, Some(why))
            }
        };
        // The server's reply says more than a broken connection does.
        data.finish().map_err(|e| fail(&doing, e, Kind::CantCreate))?;
        match unsent {
            Some(e) => Err(fail(&doing, FtpError::ConnectionError(e), Kind::Io)),
            None => Ok(()),
        }
    }

    /// The sha256 of the temporary file, read back from the server.
    fn read_back(&mut self) -> Result<String> {
        let doing = format!("checking {}", self.location);
        let mut data = self
            .session
            .retr_as_stream(&self.temp)
            .map_err(|e| fail(&doing, e, Kind::NoInput))?;
        let (copy, _) = bk_core::codec::sha256_of(&mut data, &doing)?;
        data.finish().map_err(|e| fail(&doing, e, Kind::Io))?;
        Ok(copy)
    }

    fn publish(&mut self) -> Result<()> {
        self.finish_transfer()?;
        // Its directory is 0700 already; SITE CHMOD is optional in FTP, so this may do nothing.
        let _ = self.session.site(format!("CHMOD 600 {}", self.temp));
        let sent = hex::encode(std::mem::take(&mut self.hasher).finalize());
        let copy = self.read_back()?;
        if copy != sent {
            return Err(Error::data(format!(
                "checking {}: the copy's sha256 is {copy}, not {sent} as sent",
                self.location
            )));
        }
        let doing = format!("publishing {}", self.location);
        // Some servers will not rename onto an existing file: remove it, then rename.
        let renamed = self.session.rename(&self.temp, &self.target).or_else(|_| {
            let _ = self.session.rm(&self.target);
            self.session.rename(&self.temp, &self.target)
        });
        renamed.map_err(|e| fail(&doing, e, Kind::CantCreate))
    }
}

impl Write for FtpUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(data) = self.data.as_mut() else {
            return Err(io::Error::other(format!(
                "writing {}: the transfer has ended",
                self.location
            )));
        };
        match data.write_all(buf) {
            Ok(()) => {
                self.hasher.update(buf);
                Ok(buf.len())
            }
            // The server closed the data connection: its reply says why.
            Err(e) => Err(match self.finish_transfer() {
                Err(reply) => reply.into(),
                Ok(()) => fail(
                    &format!("writing {}", self.location),
                    FtpError::ConnectionError(e),
                    Kind::Io,
                )
                .into(),
            }),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.data.as_mut().map_or(Ok(()), |d| d.flush())
    }
}

impl Upload for FtpUpload {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let published = self.publish();
        if published.is_ok() {
            self.temp.clear();
        }
        // Drop removes the temporary file if it was not published.
        published
    }
}

impl Drop for FtpUpload {
    fn drop(&mut self) {
        // Closing the data connection ends the transfer; the partial file is then removed.
        if let Some(data) = self.data.take() {
            let _ = data.into_parts().0.finish();
        }
        // After a failed transfer the connection may be of no more use: then a new one.
        if !self.temp.is_empty() && self.session.rm(&self.temp).is_err() {
            if let Ok(mut session) = self.store.connect("cleaning up") {
                let _ = session.rm(&self.temp);
                let _ = session.quit();
            }
        }
        let _ = self.session.quit();
    }
}

/// A RETR of a file; how the transfer ended is checked at the end of the stream.
struct FtpReader {
    session: Session,
    data: Option<Box<dyn Transfer>>,
    doing: String,
}

impl Read for FtpReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(data) = self.data.as_mut() else {
            return Ok(0);
        };
        let n = data
            .read(buf)
            .map_err(|e| fail(&self.doing, FtpError::ConnectionError(e), Kind::Io))?;
        if n == 0 && !buf.is_empty() {
            let data = self.data.take().expect("checked above");
            data.finish().map_err(|e| fail(&self.doing, e, Kind::Io))?;
            let _ = self.session.quit();
        }
        Ok(n)
    }
}

impl Store for FtpStore {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn create(&self, name: &str, file: &str) -> Result<Box<dyn Upload>> {
        Ok(Box::new(self.upload(name, file)?))
    }

    fn has_manifest(&self, name: &str, id: &str) -> Result<bool> {
        bk_core::name::validate_name(name)?;
        let file = manifest_file(id);
        let mut session = self.connect(&format!("looking for {}", self.location(name, &file)))?;
        let files = self.files(&mut session, Some(name))?;
        let _ = session.quit();
        Ok(files.get(name).is_some_and(|f| f.contains_key(&file)))
    }

    fn list(&self, name: Option<&str>) -> Result<Listing> {
        if let Some(n) = name {
            bk_core::name::validate_name(n)?;
        }
        let mut session = self.connect(&format!("listing store {}", self.url))?;
        let files = self.files(&mut session, name)?;
        let listing = crate::build_listing(
            files,
            |n, f| {
                let doing = format!("reading {}", self.location(n, f));
                let text = session
                    .retr_as_buffer(&self.path(&[n, f]))
                    .map_err(|e| fail(&doing, e, Kind::NoInput))?;
                Ok(String::from_utf8_lossy(text.get_ref()).into_owned())
            },
            |n, f| self.location(n, f),
        );
        let _ = session.quit();
        Ok(listing)
    }

    fn open_file(&self, name: &str, file: &str) -> Result<Box<dyn Read>> {
        let doing = format!("reading {}", self.location(name, file));
        let mut session = self.connect(&doing)?;
        let data = session
            .retr_as_stream(self.path(&[name, file]))
            .map_err(|e| fail(&doing, e, Kind::NoInput))?;
        Ok(Box::new(io::BufReader::with_capacity(
            BUFFER,
            FtpReader {
                session,
                data: Some(Box::new(data)),
                doing,
            },
        )))
    }

    fn delete(&self, artifact: &Artifact) -> Result<()> {
        let manifest = manifest_file(&artifact.id);
        let mut session = self.connect(&format!("deleting {}", self.location(&artifact.name, &artifact.file)))?;
        for file in [manifest.as_str(), artifact.file.as_str()] {
            let doing = format!("deleting {}", self.location(&artifact.name, file));
            self.remove(&mut session, &artifact.name, file, &doing)?;
        }
        let _ = session.quit();
        Ok(())
    }

    fn remove_leftovers(&self, name: &str, older_than: SystemTime, dry_run: bool) -> Result<Vec<String>> {
        bk_core::name::validate_name(name)?;
        let doing = format!("removing leftovers of {name} in {}", self.url);
        let mut session = self.connect(&doing)?;
        let files = self.files(&mut session, Some(name))?;
        // The modification time the server keeps, in UTC (MDTM, RFC 3659); a file whose age
        // the server will not tell is kept.
        let old: Vec<&String> = crate::temp_files(&files, name)
            .filter(|f| {
                session.mdtm(self.path(&[name, f])).is_ok_and(|modified| {
                    SystemTime::UNIX_EPOCH + Duration::from_secs(modified.and_utc().timestamp().max(0) as u64)
                        < older_than
                })
            })
            .collect();
        let removed = crate::remove_files(
            old,
            dry_run,
            |f| self.location(name, f),
            |f, doing| self.remove(&mut session, name, f, doing),
        )?;
        let _ = session.quit();
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let s = FtpStore::open("ftp://bk@backup.example:2121/backups/bk/").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.user.as_deref(), s.root.as_str(), s.secure),
            ("backup.example", 2121, Some("bk"), "backups/bk", false)
        );
        assert_eq!(
            s.location("db", "db.1.sql"),
            "ftp://bk@backup.example:2121/backups/bk/db/db.1.sql"
        );
        let s = FtpStore::open("ftps://host//srv/bk").unwrap();
        assert_eq!((s.port, s.root.as_str(), s.secure), (21, "/srv/bk", true));
        assert_eq!(s.path(&["db", "f"]), "/srv/bk/db/f");
        let s = FtpStore::open("ftp://host").unwrap();
        assert_eq!((s.url.as_str(), s.root.as_str()), ("ftp://host", ""));
        assert_eq!(s.path(&["db", "f"]), "db/f");
        let s = FtpStore::open("ftp://a%40b@[::1]:21/x%20y").unwrap();
        assert_eq!(
            (s.host.as_str(), s.user.as_deref(), s.root.as_str()),
            ("::1", Some("a@b"), "x y")
        );
        assert_eq!(s.server(), "[::1]:21");
        assert!(FtpStore::open("ftp://-oops/x").is_err());
        assert!(FtpStore::open("ftp://host:99999/x").is_err());
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_showing_it() {
        let e = FtpStore::open("ftp://bk:s3cret@host/x").unwrap_err();
        assert_eq!(e.exit_code(), 64);
        assert!(!e.message.contains("s3cret"), "{}", e.message);
        assert!(
            e.message.contains("ftp://bk@host/x") && e.message.contains("netrc"),
            "{}",
            e.message
        );
    }

    #[test]
    fn netrc_entries_are_found_as_curl_finds_them() {
        let text = "# backups\nmachine a.example login bk password \"p w\\\"x\"\n\
                    macdef init\ncd /x\n\nmachine b.example\n  login other\n  password two\n\
                    default login anonymous password me@\n";
        let entries = parse_netrc(text);
        assert_eq!(entries.len(), 3, "{entries:?}");
        let a = find_netrc(&entries, "A.example", None).unwrap();
        assert_eq!(
            (a.login.as_deref(), a.password.as_deref()),
            (Some("bk"), Some("p w\"x"))
        );
        let b = find_netrc(&entries, "b.example", Some("other")).unwrap();
        assert_eq!(b.password.as_deref(), Some("two"));
        // Another user of b.example: neither it nor the default (another login) fits.
        assert!(find_netrc(&entries, "b.example", Some("else")).is_none());
        let d = find_netrc(&entries, "c.example", Some("anonymous")).unwrap();
        assert_eq!(d.machine, None);
        assert!(find_netrc(&parse_netrc("machine x login y password z\n"), "other", None).is_none());
    }
}
