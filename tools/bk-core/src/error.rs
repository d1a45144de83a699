//! The one error type of bk. Every failure knows its sysexits code (bk(7), SPEC §5).

use std::io;
use std::path::Path;

/// What went wrong, as far as the exit code is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An upstream tool failed: its `error` record came through (exit 1).
    Upstream,
    /// Bad command line (64).
    Usage,
    /// Bad input data: malformed JSON, checksum or count mismatch, corrupt artifact (65).
    Data,
    /// No such backup, file or input (66).
    NoInput,
    /// A database, server or store cannot be reached (69).
    Unavailable,
    /// Cannot create the output (73).
    CantCreate,
    /// Read or write failed (74).
    Io,
    /// Temporary failure, e.g. a lock held by another run: retry later (75).
    TempFail,
    /// Permission denied (77).
    NoPerm,
    /// Configuration error, e.g. a credentials file readable by others (78).
    Config,
    /// A bug in bk: a panic, turned into an error record (70).
    Internal,
    /// Whoever read our stdout went away (`bk-ls | head`): stop quietly, exit 0.
    Closed,
}

impl Kind {
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Upstream => 1,
            Kind::Usage => 64,
            Kind::Data => 65,
            Kind::NoInput => 66,
            Kind::Unavailable => 69,
            Kind::CantCreate => 73,
            Kind::Io => 74,
            Kind::TempFail => 75,
            Kind::NoPerm => 77,
            Kind::Config => 78,
            Kind::Internal => 70,
            Kind::Closed => 0,
        }
    }

    /// What the exit code means, for help texts.
    pub fn meaning(self) -> &'static str {
        match self {
            Kind::Upstream => "an upstream tool failed: its error record came through",
            Kind::Usage => "usage error",
            Kind::Data => "bad input data: malformed records, checksum or count mismatch, corrupt artifact",
            Kind::NoInput => "no such backup, source or input",
            Kind::Unavailable => "a server, store or program is unavailable",
            Kind::CantCreate => "cannot create the output (target not empty, store not writable)",
            Kind::Io => "I/O error (disk full, read error, incomplete dump)",
            Kind::TempFail => "temporary failure, e.g. another run holds the lock: retry later",
            Kind::NoPerm => "permission denied",
            Kind::Config => "configuration error: wrong credentials, a secrets file readable by others",
            Kind::Internal => "internal error: a bug in bk (please report it with the stderr line)",
            Kind::Closed => "stdout was closed",
        }
    }

    /// Every failing kind, for documentation and its staleness test.
    pub const ALL: [Kind; 11] = [
        Kind::Upstream,
        Kind::Usage,
        Kind::Data,
        Kind::NoInput,
        Kind::Unavailable,
        Kind::CantCreate,
        Kind::Io,
        Kind::TempFail,
        Kind::NoPerm,
        Kind::Config,
        Kind::Internal,
    ];
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: Kind,
    pub message: String,
    /// The job the error is about, for the `error` record.
    pub name: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            name: None,
        }
    }
    pub fn usage(m: impl Into<String>) -> Self {
        Self::new(Kind::Usage, m)
    }
    pub fn data(m: impl Into<String>) -> Self {
        Self::new(Kind::Data, m)
    }
    pub fn no_input(m: impl Into<String>) -> Self {
        Self::new(Kind::NoInput, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, m)
    }
    pub fn cant_create(m: impl Into<String>) -> Self {
        Self::new(Kind::CantCreate, m)
    }
    pub fn temp_fail(m: impl Into<String>) -> Self {
        Self::new(Kind::TempFail, m)
    }
    pub fn config(m: impl Into<String>) -> Self {
        Self::new(Kind::Config, m)
    }

    /// An I/O error with what was being done, its kind chosen from the OS error:
    /// not found is 66, permission denied 77, anything else 74.
    pub fn io(doing: impl std::fmt::Display, e: io::Error) -> Self {
        let kind = match e.kind() {
            io::ErrorKind::NotFound => Kind::NoInput,
            io::ErrorKind::PermissionDenied => Kind::NoPerm,
            _ => Kind::Io,
        };
        Self::new(kind, format!("{doing}: {}", describe_io(&e)))
    }

    /// An I/O error on a path being created: permission or a missing parent is 73.
    pub fn create(path: &Path, e: io::Error) -> Self {
        let kind = match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                Kind::CantCreate
            }
            _ => Kind::Io,
        };
        Self::new(kind, format!("cannot create {}: {}", path.display(), describe_io(&e)))
    }

    pub fn exit_code(&self) -> u8 {
        self.kind.exit_code()
    }

    /// The same error, about a job.
    pub fn named(mut self, name: &str) -> Self {
        self.name.get_or_insert_with(|| name.to_string());
        self
    }

    /// The same error with more context in front of its message.
    pub fn context(mut self, doing: impl std::fmt::Display) -> Self {
        self.message = format!("{doing}: {}", self.message);
        self
    }
}

/// The text with its secrets replaced, for every message bk prints: the password (or the
/// token) of a URL's userinfo, and age secret keys. One function, applied where errors are
/// rendered, so that no code path can forget it.
pub fn redact(text: &str) -> String {
    const AGE_KEY: &str = "AGE-SECRET-KEY-";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let key_at = rest.to_ascii_uppercase().find(AGE_KEY);
        let url_at = rest.find("://");
        match (key_at, url_at) {
            (Some(k), u) if u.is_none_or(|u| k < u) => {
                out.push_str(&rest[..k]);
                out.push_str("AGE-SECRET-KEY-(redacted)");
                let key = &rest[k + AGE_KEY.len()..];
                let end = key.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(key.len());
                rest = &key[end..];
            }
            (_, Some(u)) => {
                let scheme_start = rest[..u]
                    .char_indices()
                    .rfind(|(_, c)| !(c.is_ascii_alphanumeric() || "+-.".contains(*c)))
                    .map_or(0, |(i, c)| i + c.len_utf8());
                let scheme = &rest[scheme_start..u];
                let authority_end = rest[u + 3..]
                    .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"')
                    .map_or(rest.len(), |i| u + 3 + i);
                let authority = &rest[u + 3..authority_end];
                out.push_str(&rest[..u + 3]);
                match authority.rfind('@') {
                    Some(at) => {
                        let userinfo = &authority[..at];
                        // A bare user name of a login scheme is no secret; anything else is.
                        let login = ["ssh", "sftp", "ftp", "ftps", "rsync"].contains(&scheme);
                        match userinfo.split_once(':') {
                            Some((user, _)) => out.push_str(&format!("{user}:(redacted)")),
                            None if login => out.push_str(userinfo),
                            None => out.push_str("(redacted)"),
                        }
                        out.push_str(&authority[at..]);
                    }
                    None => out.push_str(authority),
                }
                rest = &rest[authority_end..];
            }
            (None, None) => {
                out.push_str(rest);
                rest = "";
            }
            (Some(_), None) => unreachable!("handled by the first arm"),
        }
    }
    out
}

/// The OS message without Rust's " (os error N)" suffix.
pub fn describe_io(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Errors that travel inside io::Error through readers and writers (e.g. a decoder that
/// finds corrupt data) are unwrapped back into their kind.
impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::other(e)
    }
}

/// Recovers a bk Error carried inside an io::Error, else classifies the io::Error.
pub fn from_io(doing: impl std::fmt::Display, e: io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        let inner = e.into_inner().expect("checked above");
        return *inner.downcast::<Error>().expect("checked above");
    }
    Error::io(doing, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_sysexits() {
        let e = Error::io("reading x", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.exit_code(), 66);
        let e = Error::io("reading x", io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(e.exit_code(), 77);
        assert_eq!(e.message, "reading x: Permission denied");
        let e = Error::io("writing x", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.exit_code(), 74);
    }

    #[test]
    fn secrets_are_redacted() {
        let cases = [
            ("ssh://bob:hunter2@db3/srv x", "ssh://bob:(redacted)@db3/srv x"),
            ("ssh://bob@db3:2222/srv", "ssh://bob@db3:2222/srv"),
            ("store \"https://TOKEN@host/x\"", "store \"https://(redacted)@host/x\""),
            ("http://u:p@h:9000", "http://u:(redacted)@h:9000"),
            (
                "key AGE-SECRET-KEY-1QQQ9ZZ, more",
                "key AGE-SECRET-KEY-(redacted), more",
            ),
            ("age-secret-key-1abc", "AGE-SECRET-KEY-(redacted)"),
            ("no secret here: /var/backups", "no secret here: /var/backups"),
            ("s3://bucket/a@b", "s3://bucket/a@b"),
            ("é://x:y@z ü", "é://x:(redacted)@z ü"),
        ];
        for (text, want) in cases {
            assert_eq!(redact(text), want, "{text}");
        }
    }

    #[test]
    fn bk_errors_survive_a_trip_through_io_error() {
        let io: io::Error = Error::data("bad frame").into();
        let back = from_io("decoding", io);
        assert_eq!(back.kind, Kind::Data);
        assert_eq!(back.message, "bad frame");
    }
}
