//! The `postgres` engine: the system's pg_dump (custom format by default, uncompressed:
//! bk compresses), one artifact per database. bk's own connection opens a REPEATABLE READ
//! transaction, exports its snapshot to pg_dump and counts every table inside that same
//! snapshot, so the counts are exactly what the dump holds. Restored with pg_restore (or
//! psql for plain dumps) into the same or another database.

pub mod scan;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, NoTls};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use bk_core::codec::Decoder;
use bk_core::error::{from_io, Error, Kind, Result};
use bk_core::name::sanitize;
use bk_core::private::check_private_file;
use bk_core::record::{Artifact, Source, ToolInfo};

use crate::conn::{home_path, ConnArgs};
use crate::process::{find_program, stream_from, stream_into, stream_into_may_stop, version_line};
use crate::{DumpJob, Dumped, RestoreOptions, RestoredInfo};

const MAINTENANCE_DB: &str = "postgres";
const PLAIN_END: &[u8] = b"-- PostgreSQL database dump complete";
const CUSTOM_MAGIC: &[u8] = b"PGDMP";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PgFormat {
    /// pg_dump's custom format, for pg_restore (selective and parallel restores)
    Custom,
    /// Plain SQL, for psql
    Plain,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DumpArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Back up this database (repeatable) [default: every database that accepts connections,
    /// but the templates]
    #[arg(long = "database", visible_alias = "dbname", value_name = "DB")]
    pub databases: Vec<String>,
    /// Leave out this database (repeatable)
    #[arg(long, value_name = "DB")]
    pub exclude_database: Vec<String>,
    /// Also back up roles and tablespaces (pg_dumpall --globals-only --no-role-passwords),
    /// as the artifact postgres-globals
    #[arg(long)]
    pub globals: bool,
    /// pg_dump's output format
    #[arg(long, value_enum, default_value_t = PgFormat::Custom)]
    pub format: PgFormat,
}

/// Where and as whom to connect, resolved as libpq resolves it for pg_dump and friends:
/// options, then the service file's section named by PGSERVICE, then PG* variables, then
/// defaults (libpq lets a service override the environment). The password comes from the
/// service, else from the password file (its `passfile`, PGPASSFILE or ~/.pgpass), which
/// must be private. TLS follows sslmode as libpq does (see [`SslMode`]).
struct PgConn {
    host: String,
    port: u16,
    user: String,
    passfile: Option<PathBuf>,
    /// A password written in the service file (which must then be private).
    service_password: Option<String>,
    sslmode: SslMode,
    /// None when no TLS is tried: sslmode disable, or a Unix socket (libpq ignores sslmode there).
    tls: Option<MakeRustlsConnect>,
    /// The root certificate TLS verifies the server with, for error messages.
    root_cert: Option<PathBuf>,
}

impl PgConn {
    fn new(args: &ConnArgs) -> Result<Self> {
        let service = match env_var("PGSERVICE") {
            Some(name) => Service::find(&name)?,
            None => Service::default(),
        };
        let setting = |key: &str, var: &str| -> Option<(String, String)> {
            match service.get(key) {
                Some(v) => Some((v.to_string(), format!("{key} in service {}", service.label()))),
                None => env_var(var).map(|v| (v, var.to_string())),
            }
        };
        let host = args
            .host
            .clone()
            .or_else(|| setting("host", "PGHOST").map(|(v, _)| v))
            .unwrap_or_else(|| {
                if Path::new("/var/run/postgresql").is_dir() {
                    "/var/run/postgresql".into()
                } else {
                    "localhost".into()
                }
            });
        let port = match (args.port, setting("port", "PGPORT")) {
            (Some(p), _) => p,
            (None, Some((p, from))) => p
                .parse()
                .map_err(|_| Error::config(format!("{from}: {p} is not a port")))?,
            (None, None) => 5432,
        };
        let user = args
            .user
            .clone()
            .or_else(|| setting("user", "PGUSER").map(|(v, _)| v))
            .or_else(|| env_var("USER"))
            .unwrap_or_else(|| "postgres".into());
        let passfile = setting("passfile", "PGPASSFILE")
            .map(|(f, _)| PathBuf::from(f))
            .or_else(|| home_path(".pgpass"))
            .filter(|p| p.exists());
        if let Some(f) = &passfile {
            check_private_file(f, "password file")?;
        }
        let service_password = service.get("password").map(str::to_string);
        if service_password.is_some() {
            check_private_file(&service.file, "service file holding a password")?;
        }
        let sslmode = match setting("sslmode", "PGSSLMODE") {
            Some((mode, from)) => SslMode::parse(&mode, &from)?,
            None => SslMode::Prefer,
        };
        let root_cert = setting("sslrootcert", "PGSSLROOTCERT")
            .map(|(f, _)| PathBuf::from(f))
            .or_else(|| home_path(".postgresql/root.crt"));
        let over_tcp = !host.starts_with('/');
        let (tls, root_cert) = if over_tcp && sslmode != SslMode::Disable {
            let root_cert = root_cert.filter(|f| sslmode.verifies() || f.exists());
            (Some(tls_connector(sslmode, root_cert.as_deref())?), root_cert)
        } else {
            (None, None)
        };
        Ok(PgConn {
            host,
            port,
            user,
            passfile,
            service_password,
            sslmode,
            tls,
            root_cert,
        })
    }

    /// The service's password, else the password file's entry for a database, as libpq
    /// matches it.
    fn password(&self, database: &str) -> Result<Option<String>> {
        if self.service_password.is_some() {
            return Ok(self.service_password.clone());
        }
        let Some(file) = &self.passfile else { return Ok(None) };
        let text = fs::read_to_string(file).map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
        let host = if self.host.starts_with('/') {
            "localhost"
        } else {
            &self.host
        };
        let wanted = [
            host.to_string(),
            self.port.to_string(),
            database.to_string(),
            self.user.clone(),
        ];
        Ok(text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .find_map(|line| {
                let fields = split_pgpass(line);
                (fields.len() == 5 && fields[..4].iter().zip(&wanted).all(|(f, w)| f == "*" || f == w))
                    .then(|| fields[4].clone())
            }))
    }

    fn connect(&self, database: &str) -> Result<Client> {
        let mut config = postgres::Config::new();
        config
            .user(&self.user)
            .dbname(database)
            .port(self.port)
            .connect_timeout(Duration::from_secs(30));
        if self.host.starts_with('/') {
            config.host_path(&self.host);
        } else {
            config.host(&self.host);
        }
        if let Some(pw) = self.password(database)? {
            config.password(pw);
        }
        let doing = format!("connecting to {database} on {}:{}", self.host, self.port);
        let attempt = |tls: Option<&MakeRustlsConnect>, mode: postgres::config::SslMode| {
            let mut config = config.clone();
            config.ssl_mode(mode);
            match tls {
                Some(tls) => config.connect(tls.clone()),
                None => config.connect(NoTls),
            }
        };
        use postgres::config::SslMode as Wire;
        let Some(tls) = &self.tls else {
            return attempt(None, Wire::Disable).map_err(|e| self.connect_error(&doing, e));
        };
        // libpq's second tries: `allow` retries with TLS when the server refuses cleartext,
        // `prefer` without TLS when the TLS session fails or is refused.
        let (first, second) = match self.sslmode {
            SslMode::Allow => (attempt(None, Wire::Disable), Some((Some(tls), Wire::Require))),
            SslMode::Prefer => (attempt(Some(tls), Wire::Prefer), Some((None, Wire::Disable))),
            _ => (attempt(Some(tls), Wire::Require), None),
        };
        match (first, second) {
            (Err(e), Some((tls, mode))) if e.as_db_error().is_some() || tls_failure(&e).is_some() => attempt(tls, mode)
                .map_err(|again| {
                    let first = self.connect_error(&doing, e);
                    let mut last = self.connect_error(&doing, again);
                    let how = if tls.is_some() { "without" } else { "with" };
                    let detail = first.message.strip_prefix(&doing).unwrap_or(&first.message);
                    last.message = format!("{}; first tried {how} TLS{detail}", last.message);
                    last
                }),
            (result, _) => result.map_err(|e| self.connect_error(&doing, e)),
        }
    }

    /// A failed connection, saying which TLS settings failed when the TLS session did.
    fn connect_error(&self, doing: &str, e: postgres::Error) -> Error {
        match tls_failure(&e) {
            Some(tls) => {
                let root = match &self.root_cert {
                    Some(f) => format!("root certificate {}", f.display()),
                    None => "server certificate not verified".to_string(),
                };
                let why = match tls {
                    rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                        "the server's certificate is not signed by the root certificate's CA".to_string()
                    }
                    other => other.to_string(),
                };
                Error::unavailable(format!(
                    "{doing}: TLS failed (sslmode {}, {root}): {why}",
                    self.sslmode.name()
                ))
            }
            None => pg_error(doing, e),
        }
    }

    /// Arguments for pg_dump, pg_restore and psql. They read PGSERVICE and the PG* variables
    /// themselves; bk hands them what it resolved, so that both connect alike: the same
    /// server, the same sslmode, the same password file (by environment, never argv).
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg(format!("--host={}", self.host))
            .arg(format!("--port={}", self.port))
            .arg(format!("--username={}", self.user));
        cmd.arg("--no-password");
        cmd.env("PGSSLMODE", self.sslmode.name());
        if let Some(f) = &self.passfile {
            cmd.env("PGPASSFILE", f);
        }
        cmd
    }

    fn host_name(&self) -> String {
        crate::conn::local_or(Some(self.host.clone()))
    }
}

/// A PG* variable, unset when empty (as libpq treats it).
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

/// libpq's sslmode, for bk's own connections as for pg_dump's. With a root certificate
/// (sslrootcert, PGSSLROOTCERT, else ~/.postgresql/root.crt if it exists) every mode that
/// uses TLS checks the server's certificate chain, as libpq does; verify-ca and verify-full
/// require one, and verify-full also checks the host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

const SSL_MODES: [(SslMode, &str); 6] = [
    (SslMode::Disable, "disable"),
    (SslMode::Allow, "allow"),
    (SslMode::Prefer, "prefer"),
    (SslMode::Require, "require"),
    (SslMode::VerifyCa, "verify-ca"),
    (SslMode::VerifyFull, "verify-full"),
];

impl SslMode {
    /// `from` says where the value was set, for the error.
    fn parse(value: &str, from: &str) -> Result<Self> {
        SSL_MODES
            .iter()
            .find(|(_, name)| *name == value)
            .map(|(mode, _)| *mode)
            .ok_or_else(|| {
                let names: Vec<&str> = SSL_MODES.iter().map(|(_, name)| *name).collect();
                Error::config(format!("{from}: {value:?} is not an sslmode ({})", names.join(", ")))
            })
    }

    fn name(self) -> &'static str {
        SSL_MODES
            .iter()
            .find(|(mode, _)| *mode == self)
            .expect("every mode is named")
            .1
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// A section of a connection service file (pg_service.conf), found where libpq looks: the
/// user's file (PGSERVICEFILE, else ~/.pg_service.conf), then the system's
/// (PGSYSCONFDIR/pg_service.conf, else /etc/postgresql-common/pg_service.conf).
#[derive(Default)]
struct Service {
    name: String,
    file: PathBuf,
    settings: BTreeMap<String, String>,
}

impl Service {
    fn find(name: &str) -> Result<Self> {
        let user_file = env_var("PGSERVICEFILE")
            .map(PathBuf::from)
            .or_else(|| home_path(".pg_service.conf"));
        let system_dir = env_var("PGSYSCONFDIR").unwrap_or_else(|| "/etc/postgresql-common".into());
        let system_file = Path::new(&system_dir).join("pg_service.conf");
        for file in user_file.into_iter().chain([system_file]).filter(|f| f.exists()) {
            let text = fs::read_to_string(&file)
                .map_err(|e| Error::io(format!("reading service file {}", file.display()), e))?;
            let section = service_section(&text, name).map_err(|line| {
                Error::config(format!("syntax error in service file {}, line {line}", file.display()))
            })?;
            if let Some(settings) = section {
                return Ok(Service {
                    name: name.to_string(),
                    file,
                    settings,
                });
            }
        }
        Err(Error::config(format!(
            "PGSERVICE: definition of service {name:?} not found (in PGSERVICEFILE or ~/.pg_service.conf, \
             then PGSYSCONFDIR/pg_service.conf or /etc/postgresql-common/pg_service.conf)"
        )))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.settings.get(key).map(String::as_str)
    }

    /// `NAME (FILE)`, for messages.
    fn label(&self) -> String {
        format!("{} ({})", self.name, self.file.display())
    }
}

/// The settings of the first `[name]` section, read as libpq reads them: lines trimmed, `#`
/// comments, `key=value` with nothing trimmed around `=`, the first value of a key kept.
/// Err: the number of a line that is not `keyword=value` (libpq refuses `port = 5432`: there
/// is no keyword "port "), or that names another service.
fn service_section(text: &str, name: &str) -> std::result::Result<Option<BTreeMap<String, String>>, usize> {
    let mut section: Option<BTreeMap<String, String>> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(group) = line.strip_prefix('[') {
            if section.is_some() {
                break;
            }
            if group.strip_prefix(name).is_some_and(|rest| rest.starts_with(']')) {
                section = Some(BTreeMap::new());
            }
        } else if let Some(settings) = &mut section {
            let keyword = |key: &str| {
                !key.is_empty() && key != "service" && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            };
            match line.split_once('=') {
                Some((key, value)) if keyword(key) => {
                    settings.entry(key.to_string()).or_insert_with(|| value.to_string());
                }
                _ => return Err(n + 1),
            }
        }
    }
    Ok(section)
}

/// The TLS client of bk's own connections: the server's chain checked against `root_cert`
/// when there is one (required by verify-ca and verify-full), its name by verify-full only.
fn tls_connector(mode: SslMode, root_cert: Option<&Path>) -> Result<MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = match root_cert.filter(|f| f.exists()) {
        Some(file) => Some(root_verifier(file, &provider)?),
        None if mode.verifies() => {
            let file = root_cert.map_or("~/.postgresql/root.crt".into(), |f| f.display().to_string());
            return Err(Error::config(format!(
                "sslmode {}: root certificate file {file} does not exist; name the server's CA \
                 certificate with PGSSLROOTCERT (or sslrootcert in the service file), or use sslmode require",
                mode.name()
            )));
        }
        None => None,
    };
    let verifier = Arc::new(ServerVerifier {
        chain,
        check_name: mode == SslMode::VerifyFull,
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// A verifier of certificate chains that end at one of the certificates of a PEM file.
fn root_verifier(file: &Path, provider: &Arc<CryptoProvider>) -> Result<Arc<WebPkiServerVerifier>> {
    let bad = |why: String| Error::config(format!("root certificate file {}: {why}", file.display()));
    let certs = CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    if roots.add_parsable_certificates(certs).0 == 0 {
        return Err(bad("holds no usable certificate".into()));
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad(e.to_string()))
}

/// libpq's checks of the server's certificate: none without a root certificate (sslmode
/// require and weaker), the chain only (verify-ca, or a weaker mode with a root
/// certificate), chain and host name (verify-full).
#[derive(Debug)]
struct ServerVerifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // The name is checked after the chain: a name error means the chain is good.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            verified => verified,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS error under a failed connection, if the TLS session is what failed.
fn tls_failure(e: &postgres::Error) -> Option<&rustls::Error> {
    std::error::Error::source(e)?
        .downcast_ref::<io::Error>()?
        .get_ref()?
        .downcast_ref::<rustls::Error>()
}

#[cfg(test)]
mod connection_settings_tests {
    use super::*;

    #[test]
    fn service_sections_read_like_libpq() {
        let text = "# comment\n[a]\nport=1\n[ab]\n  host=h2  \nport=2\nport=3\nsslmode=require\n[ab]\nport=9\n";
        let ab = service_section(text, "ab").unwrap().unwrap();
        assert_eq!(ab.get("host").map(String::as_str), Some("h2"), "lines are trimmed");
        assert_eq!(ab.get("port").map(String::as_str), Some("2"), "the first value wins");
        assert_eq!(ab.len(), 3, "only the first [ab] section");
        assert_eq!(service_section(text, "b").unwrap(), None);
        assert_eq!(service_section("[x]\nport = 1\n", "x"), Err(2));
        assert_eq!(service_section("[x]\n\nport\n", "x"), Err(3));
        assert_eq!(service_section("[x]\nservice=y\n", "x"), Err(2));
        assert_eq!(
            service_section("[y]\nnot a setting\n", "x"),
            Ok(None),
            "other sections are not read"
        );
    }

    #[test]
    fn sslmodes_are_libpqs() {
        for (mode, name) in SSL_MODES {
            assert_eq!(SslMode::parse(name, "PGSSLMODE").unwrap(), mode);
            assert_eq!(mode.name(), name);
        }
        let e = SslMode::parse("on", "PGSSLMODE").unwrap_err();
        assert_eq!(e.kind, Kind::Config);
        assert!(
            e.message.contains("PGSSLMODE") && e.message.contains("verify-full"),
            "{}",
            e.message
        );
    }
}

/// One line of a password file: five fields split at unescaped ':', `\:` and `\\` unescaped.
fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut().expect("one field").push(chars.next().unwrap_or('\\')),
            ':' => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

fn pg_error(doing: &str, e: postgres::Error) -> Error {
    let kind = match e.code() {
        Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            Kind::Config
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME || *c == SqlState::UNDEFINED_TABLE => Kind::NoInput,
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => Kind::NoPerm,
        Some(_) => Kind::Io,
        None => Kind::Unavailable,
    };
    // The client's own errors name their cause only as their source.
    let detail = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| {
        let mut text = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            text = format!("{text}: {c}");
            cause = c.source();
        }
        text
    });
    Error::new(kind, format!("{doing}: {detail}"))
}

/// What a failed PostgreSQL program's stderr means.
fn classify(stderr: &str) -> Kind {
    if stderr.contains("password authentication failed")
        || stderr.contains("no password supplied")
        || stderr.contains("role \"") && stderr.contains("does not exist")
    {
        Kind::Config
    } else if stderr.contains("database \"") && stderr.contains("does not exist") {
        Kind::NoInput
    } else if [
        "Connection refused",
        "could not connect",
        "server closed the connection",
        "terminating connection",
        "connection to server",
    ]
    .iter()
    .any(|s| stderr.contains(s))
    {
        Kind::Unavailable
    } else if [
        "permission denied",
        "must be member of role",
        "must be owner of",
        "must be superuser",
    ]
    .iter()
    .any(|s| stderr.contains(s))
    {
        // The server's insufficient-privilege messages (ALTER ... OWNER TO another role).
        Kind::NoPerm
    } else {
        Kind::Io
    }
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Rows of every table whose data pg_dump dumps (ordinary tables and leaf partitions, not
/// those of extensions), keyed `<schema>.<table>`.
fn count_rows(client: &mut Client, doing: &str) -> Result<BTreeMap<String, u64>> {
    let tables = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
             ORDER BY 1, 2",
            &[],
        )
        .map_err(|e| pg_error(doing, e))?;
    let mut counts = BTreeMap::new();
    for row in tables {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        let n: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {}.{}", ident(&schema), ident(&table)),
                &[],
            )
            .map_err(|e| pg_error(doing, e))?
            .get(0);
        counts.insert(format!("{schema}.{table}"), n as u64);
    }
    Ok(counts)
}

pub fn jobs(args: &DumpArgs) -> Result<Vec<Box<dyn DumpJob>>> {
    let conn = PgConn::new(&args.conn)?;
    let pg_dump = find_program(&["pg_dump"], "postgresql-client")?;
    let databases: Vec<String> = if args.databases.is_empty() {
        let mut client = conn.connect(MAINTENANCE_DB)?;
        let rows = client
            .query(
                "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
                &[],
            )
            .map_err(|e| pg_error("listing databases", e))?;
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|d| !args.exclude_database.contains(d))
            .collect()
    } else {
        args.databases
            .iter()
            .filter(|d| !args.exclude_database.contains(d))
            .cloned()
            .collect()
    };
    let version = version_line(&pg_dump)
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let tool = ToolInfo {
        program: "pg_dump".into(),
        version,
    };
    let mut jobs: Vec<Box<dyn DumpJob>> = Vec::new();
    if args.globals {
        let program = find_program(&["pg_dumpall"], "postgresql-client")?;
        let tool = ToolInfo {
            program: "pg_dumpall".into(),
            version: tool.version.clone(),
        };
        jobs.push(Box::new(GlobalsJob {
            conn: PgConn::new(&args.conn)?,
            program,
            tool,
            port: args.conn.port,
        }));
    }
    for database in databases {
        jobs.push(Box::new(PgJob {
            conn: PgConn::new(&args.conn)?,
            pg_dump: pg_dump.clone(),
            tool: tool.clone(),
            format: args.format,
            port: args.conn.port,
            database,
        }));
    }
    if jobs.is_empty() {
        return Err(Error::no_input("no database to back up"));
    }
    Ok(jobs)
}

pub struct PgJob {
    conn: PgConn,
    pg_dump: PathBuf,
    tool: ToolInfo,
    format: PgFormat,
    port: Option<u16>,
    database: String,
}

impl DumpJob for PgJob {
    fn engine(&self) -> &'static str {
        "postgres"
    }
    fn format(&self) -> &'static str {
        match self.format {
            PgFormat::Custom => "pgdump",
            PgFormat::Plain => "pgsql",
        }
    }
    fn default_name(&self) -> String {
        format!("postgres-{}", sanitize(&self.database))
    }
    fn database(&self) -> Option<&str> {
        Some(&self.database)
    }
    fn source(&self) -> Source {
        Source {
            host: self.conn.host_name(),
            port: self.port,
            database: Some(self.database.clone()),
            ..Source::default()
        }
    }

    fn dump(&self, out: &mut dyn Write) -> Result<Dumped> {
        let doing = format!("reading {}", self.database);
        let mut client = self.conn.connect(&self.database)?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .map_err(|e| pg_error(&doing, e))?;
        let snapshot: String = client
            .query_one("SELECT pg_export_snapshot()", &[])
            .map_err(|e| pg_error(&doing, e))?
            .get(0);
        // Count on a thread while pg_dump runs: both read the same snapshot.
        let counter = std::thread::spawn(move || {
            let counts = count_rows(&mut client, "counting rows");
            (client, counts)
        });
        let mut cmd = self.conn.command(&self.pg_dump);
        let format = match self.format {
            PgFormat::Custom => "--format=custom",
            PgFormat::Plain => "--format=plain",
        };
        cmd.arg(format)
            .arg("--compress=0")
            .arg(format!("--snapshot={snapshot}"))
            .arg(format!("--dbname={}", self.database));
        let mut start = Vec::new();
        let mut tail = Vec::new();
        let dumped = stream_from(cmd, out, |b| remember_ends(&mut start, &mut tail, b), classify);
        let (mut client, counts) = counter
            .join()
            .map_err(|_| Error::new(Kind::Io, "the row counter panicked"))?;
        let _ = client.batch_execute("COMMIT");
        dumped?;
        let counts = counts?;
        let complete = match self.format {
            PgFormat::Custom => start.starts_with(CUSTOM_MAGIC),
            PgFormat::Plain => String::from_utf8_lossy(&tail).contains(std::str::from_utf8(PLAIN_END).expect("ascii")),
        };
        if !complete {
            return Err(Error::new(Kind::Io, "pg_dump's output is not a complete dump"));
        }
        Ok(Dumped {
            counts,
            tool: self.tool.clone(),
        })
    }
}

/// Keeps the first and the last bytes of a stream, to check its format's markers.
fn remember_ends(start: &mut Vec<u8>, tail: &mut Vec<u8>, bytes: &[u8]) {
    const KEEP: usize = 256;
    if start.len() < KEEP {
        start.extend_from_slice(&bytes[..bytes.len().min(KEEP - start.len())]);
    }
    tail.extend_from_slice(&bytes[bytes.len().saturating_sub(KEEP)..]);
    if tail.len() > KEEP {
        tail.drain(..tail.len() - KEEP);
    }
}

/// Roles and tablespaces, without passwords.
pub struct GlobalsJob {
    conn: PgConn,
    program: PathBuf,
    tool: ToolInfo,
    port: Option<u16>,
}

impl DumpJob for GlobalsJob {
    fn engine(&self) -> &'static str {
        "postgres"
    }
    fn format(&self) -> &'static str {
        "pgsql"
    }
    fn default_name(&self) -> String {
        "postgres-globals".into()
    }
    fn database(&self) -> Option<&str> {
        Some("globals")
    }
    fn source(&self) -> Source {
        Source {
            host: self.conn.host_name(),
            port: self.port,
            ..Source::default()
        }
    }
    fn dump(&self, out: &mut dyn Write) -> Result<Dumped> {
        let mut cmd = self.conn.command(&self.program);
        cmd.args(["--globals-only", "--no-role-passwords"]);
        let (mut start, mut tail) = (Vec::new(), Vec::new());
        stream_from(cmd, out, |b| remember_ends(&mut start, &mut tail, b), classify)?;
        if !String::from_utf8_lossy(&tail).contains("PostgreSQL database cluster dump complete") {
            return Err(Error::new(Kind::Io, "pg_dumpall's output is not a complete dump"));
        }
        Ok(Dumped {
            counts: BTreeMap::new(),
            tool: self.tool.clone(),
        })
    }
}

/// Restores into `--database NEW` (default: the source's name), created from template0.
/// The stored bytes were checked before (restore.rs).
pub fn restore(artifact: &Artifact, mut decoder: Decoder, opts: &RestoreOptions) -> Result<RestoredInfo> {
    let conn = PgConn::new(&opts.conn)?;
    let target_of = |db: String| {
        let mut t = serde_json::Map::new();
        t.insert("host".into(), conn.host_name().into());
        t.insert("port".into(), conn.port.into());
        t.insert("database".into(), db.into());
        t
    };
    if artifact.source.database.is_none() {
        // Roles and tablespaces: replayed into the maintenance database; existing roles
        // are reported by psql and kept.
        let mut cmd = conn.command(&find_program(&["psql"], "postgresql-client")?);
        cmd.args(["--quiet", "--dbname", MAINTENANCE_DB]);
        stream_into(cmd, &mut decoder, classify)?;
        decoder.finish(artifact)?;
        return Ok(RestoredInfo {
            target: target_of(MAINTENANCE_DB.into()),
            counts: BTreeMap::new(),
            complete: true,
        });
    }
    let target = opts
        .database
        .clone()
        .or_else(|| artifact.source.database.clone())
        .expect("checked above");
    if artifact.format == "pgsql" && !opts.tables.is_empty() {
        return Err(Error::usage(
            "--table needs a custom-format backup (pg_restore); this one is plain SQL",
        ));
    }
    let schema = table_schema(&opts.tables)?;
    if opts.replace {
        if !opts.tables.is_empty() {
            // The swap replaces a whole database: with --table, by one that holds only those
            // tables. Refused rather than losing every other table of the live database.
            return Err(Error::usage(format!(
                "--table with --replace would replace the whole database {target} by one holding only \
                 these tables; restore them into another database (--database NEW) and copy them over"
            )));
        }
        let counts = replace_database(artifact, decoder, &conn, &target, opts)?;
        return Ok(RestoredInfo {
            target: target_of(target),
            counts,
            complete: true,
        });
    }
    prepare_database(&conn, &target)?;
    let loaded = load(artifact, decoder, &conn, &target, opts, schema.as_deref());
    if let Err(e) = loaded {
        let _ = conn.connect(MAINTENANCE_DB).and_then(|mut c| {
            c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(&target)))
                .map_err(|e| pg_error("dropping", e))
        });
        return Err(e.context(format!("restoring into {target} failed, the database was dropped")));
    }
    let mut client = conn.connect(&target)?;
    let counts = count_rows(&mut client, "counting the restored rows")?;
    Ok(RestoredInfo {
        target: target_of(target),
        counts,
        complete: opts.tables.is_empty(),
    })
}

/// Makes `target` an empty database: created if missing, refused if it holds anything.
fn prepare_database(conn: &PgConn, target: &str) -> Result<()> {
    let mut admin = conn.connect(MAINTENANCE_DB)?;
    let exists = !admin
        .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&target])
        .map_err(|e| pg_error("looking up the target", e))?
        .is_empty();
    if exists {
        let holds = count_rows(&mut conn.connect(target)?, "looking at the target")?;
        if !holds.is_empty() {
            return Err(Error::cant_create(format!(
                "database {target} is not empty; pass --replace to replace it"
            )));
        }
        admin
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", ident(target)))
            .map_err(|e| pg_error(&format!("dropping {target}"), e))?;
    }
    admin
        .batch_execute(&format!("CREATE DATABASE {} TEMPLATE template0", ident(target)))
        .map_err(|e| pg_error(&format!("creating {target}"), e))
}

/// `--replace`: the backup is loaded into a new database `bk_restore_<random>`, created like
/// the old target (owner, encoding, locale, tablespace), read to its end and checked, its
/// rows counted against the manifest's, the old target's database-level settings copied
/// onto it; only then are the names swapped in one transaction (the old target becomes
/// `bk_old_<random>`, dropped after the commit). Any failure or signal before the commit
/// leaves the old target as it was and drops the new database. Returns the restored counts.
fn replace_database(
    artifact: &Artifact,
    decoder: Decoder,
    conn: &PgConn,
    target: &str,
    opts: &RestoreOptions,
) -> Result<BTreeMap<String, u64>> {
    let mut admin = conn.connect(admin_database(target))?;
    let old = OldDatabase::look_up(&mut admin, target)?;
    if old.is_some() {
        refuse_if_in_use(&mut admin, target)?;
    }
    let random = format!("{:016x}", rand::random::<u64>());
    let scratch = format!("bk_restore_{random}");
    let retired = format!("bk_old_{random}");
    let created = format!(
        "CREATE DATABASE {} TEMPLATE template0{}",
        ident(&scratch),
        old.as_ref().map(OldDatabase::create_options).unwrap_or_default()
    );
    admin
        .batch_execute(&created)
        .map_err(|e| pg_error(&format!("creating {scratch} to restore {target} into"), e))?;
    // Dropped whatever happens: the new database if the swap did not happen, the old one
    // (under its retired name) if it did.
    let (dropper, names) = (opts.clone(), [scratch.clone(), retired.clone()]);
    let _drop = bk_core::cleanup::on_exit(move || {
        for name in names {
            if let Err(e) = drop_database(&dropper, &name) {
                eprintln!(
                    "bk-restore: warning: could not drop {name}: {}; drop it by hand",
                    e.message
                );
            }
        }
    });
    let untouched = format!("{target} was left as it was");
    load(artifact, decoder, conn, &scratch, opts, None).map_err(|e| e.context(&untouched))?;
    let counts = count_rows(&mut conn.connect(&scratch)?, "counting the restored rows")?;
    if let Some(m) = crate::count_mismatch(&artifact.counts, &counts, &[]) {
        return Err(Error::data(format!(
            "{}: the restored database differs from the backup: {m}; {untouched}",
            artifact.id
        )));
    }
    if let Some(old) = &old {
        old.copy_settings(&mut admin, &scratch)
            .map_err(|e| e.context(format!("copying the settings of {target}; {untouched}")))?;
    }
    swap(&mut admin, target, &scratch, old.as_ref().map(|_| retired.as_str())).map_err(|e| e.context(&untouched))?;
    Ok(counts)
}

/// Where to connect to create, rename and drop `target`: not into the target itself.
fn admin_database(target: &str) -> &'static str {
    if target == MAINTENANCE_DB {
        "template1"
    } else {
        MAINTENANCE_DB
    }
}

/// Sessions connected to `database` but this one (autovacuum workers are stopped by the
/// rename itself).
fn sessions_in(admin: &mut Client, database: &str) -> Result<i64> {
    Ok(admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()
               AND backend_type IS DISTINCT FROM 'autovacuum worker'",
            &[&database],
        )
        .map_err(|e| pg_error(&format!("looking for sessions connected to {database}"), e))?
        .get(0))
}

/// A database cannot be renamed while others use it: refused, never killed silently.
fn refuse_if_in_use(admin: &mut Client, database: &str) -> Result<()> {
    match sessions_in(admin, database)? {
        0 => Ok(()),
        n => Err(Error::temp_fail(format!(
            "{n} session(s) are connected to {database}; stop them (the application, psql...) \
             and restore again"
        ))),
    }
}

/// Gives the restored database the target's name, the old target (if any) `retired`, in
/// one transaction: the target's name always holds either the old or the new data.
fn swap(admin: &mut Client, target: &str, scratch: &str, retired: Option<&str>) -> Result<()> {
    let mut renames = String::from("BEGIN;");
    if let Some(retired) = retired {
        renames += &format!("ALTER DATABASE {} RENAME TO {};", ident(target), ident(retired));
    }
    renames += &format!("ALTER DATABASE {} RENAME TO {}; COMMIT;", ident(scratch), ident(target));
    if let Err(e) = admin.batch_execute(&renames) {
        let _ = admin.batch_execute("ROLLBACK");
        if e.code() == Some(&SqlState::OBJECT_IN_USE) {
            refuse_if_in_use(admin, target)?;
        }
        return Err(pg_error(&format!("renaming {scratch} to {target}"), e));
    }
    Ok(())
}

/// The old target of `--replace`: how it was created and what was set on it since, for the
/// database that replaces it. Its `pg_database` row is read as JSON: its columns differ
/// between PostgreSQL versions (daticulocale in 15 and 16, datlocale from 17...).
struct OldDatabase {
    name: String,
    row: serde_json::Value,
    owner: String,
    encoding: String,
    tablespace: String,
}

impl OldDatabase {
    fn look_up(admin: &mut Client, name: &str) -> Result<Option<OldDatabase>> {
        let rows = admin
            .query(
                "SELECT to_jsonb(d)::text, pg_get_userbyid(d.datdba)::text, pg_encoding_to_char(d.encoding)::text,
                        t.spcname::text
                 FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = $1",
                &[&name],
            )
            .map_err(|e| pg_error(&format!("looking up {name}"), e))?;
        let Some(row) = rows.first() else { return Ok(None) };
        let json: String = row.get(0);
        Ok(Some(OldDatabase {
            name: name.to_string(),
            row: serde_json::from_str(&json)
                .map_err(|e| Error::new(Kind::Io, format!("reading pg_database's row of {name}: {e}")))?,
            owner: row.get(1),
            encoding: row.get(2),
            tablespace: row.get(3),
        }))
    }

    fn text(&self, column: &str) -> Option<&str> {
        self.row.get(column).and_then(|v| v.as_str()).filter(|s| !s.is_empty())
    }

    /// ` OWNER ... ENCODING ... LC_COLLATE ...`, for CREATE DATABASE.
    fn create_options(&self) -> String {
        let mut options = format!(
            " OWNER {} ENCODING {} TABLESPACE {}",
            ident(&self.owner),
            literal(&self.encoding),
            ident(&self.tablespace)
        );
        for (option, column) in [("LC_COLLATE", "datcollate"), ("LC_CTYPE", "datctype")] {
            if let Some(v) = self.text(column) {
                options += &format!(" {option} {}", literal(v));
            }
        }
        let locale = self.text("datlocale").or_else(|| self.text("daticulocale"));
        match self.text("datlocprovider") {
            Some("i") => {
                options += " LOCALE_PROVIDER icu";
                if let Some(l) = locale {
                    options += &format!(" ICU_LOCALE {}", literal(l));
                }
                if let Some(rules) = self.text("daticurules") {
                    options += &format!(" ICU_RULES {}", literal(rules));
                }
            }
            Some("b") => {
                options += " LOCALE_PROVIDER builtin";
                if let Some(l) = locale {
                    options += &format!(" BUILTIN_LOCALE {}", literal(l));
                }
            }
            _ => {}
        }
        options
    }

    /// Copies onto `new` what pg_restore without --create does not restore and what was set
    /// on the old target: GRANTs on the database, `ALTER DATABASE ... SET` and `ALTER ROLE
    /// ... IN DATABASE ... SET`, its comment and connection limit.
    fn copy_settings(&self, admin: &mut Client, new: &str) -> Result<()> {
        let doing = format!("reading the settings of {}", self.name);
        let mut statements = Vec::new();
        let db = ident(new);
        if !self.row["datacl"].is_null() {
            statements.push(format!(
                "REVOKE ALL ON DATABASE {db} FROM PUBLIC, {}",
                ident(&self.owner)
            ));
            let grants = admin
                .query(
                    "SELECT a.privilege_type, a.is_grantable, CASE WHEN a.grantee = 0 THEN NULL
                            ELSE pg_get_userbyid(a.grantee)::text END
                     FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = $1",
                    &[&self.name],
                )
                .map_err(|e| pg_error(&doing, e))?;
            for g in grants {
                let (privilege, grantable, grantee): (String, bool, Option<String>) = (g.get(0), g.get(1), g.get(2));
                statements.push(format!(
                    "GRANT {privilege} ON DATABASE {db} TO {}{}",
                    grantee.as_deref().map_or("PUBLIC".to_string(), ident),
                    if grantable { " WITH GRANT OPTION" } else { "" }
                ));
            }
        }
        let settings = admin
            .query(
                "SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole)::text END, c
                 FROM pg_db_role_setting s, unnest(s.setconfig) c
                 WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = $1)",
                &[&self.name],
            )
            .map_err(|e| pg_error(&doing, e))?;
        for s in settings {
            let (role, setting): (Option<String>, String) = (s.get(0), s.get(1));
            let (variable, value) = setting.split_once('=').unwrap_or((&setting, ""));
            let on = match role {
                Some(role) => format!("ROLE {} IN DATABASE {db}", ident(&role)),
                None => format!("DATABASE {db}"),
            };
            statements.push(format!(
                "ALTER {on} SET {} TO {}",
                ident(variable),
                guc_value(variable, value)
            ));
        }
        let comment: Option<String> = admin
            .query_one(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
                &[&self.name],
            )
            .map_err(|e| pg_error(&doing, e))?
            .get(0);
        if let Some(comment) = comment {
            statements.push(format!("COMMENT ON DATABASE {db} IS {}", literal(&comment)));
        }
        if let Some(limit) = self.row["datconnlimit"].as_i64().filter(|l| *l != -1) {
            statements.push(format!("ALTER DATABASE {db} CONNECTION LIMIT {limit}"));
        }
        for statement in statements {
            admin
                .batch_execute(&statement)
                .map_err(|e| pg_error(&format!("copying a setting ({statement})"), e))?;
        }
        Ok(())
    }
}

/// A setting's stored value as SET takes it: a list setting is kept as the server stored it
/// (its elements already quoted as identifiers, as pg_dump does); any other is one literal.
fn guc_value(variable: &str, value: &str) -> String {
    const LISTS: [&str; 6] = [
        "local_preload_libraries",
        "search_path",
        "session_preload_libraries",
        "shared_preload_libraries",
        "temp_tablespaces",
        "unix_socket_directories",
    ];
    if LISTS.contains(&variable.to_ascii_lowercase().as_str()) {
        value.to_string()
    } else {
        literal(value)
    }
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The schema `--table SCHEMA.TABLE` names. pg_restore takes no schema in --table, and
/// does not create the table's schema: bk creates it and adds --schema. One schema at a time,
/// or none (tables of any schema, found by name, whose schema must exist: public).
fn table_schema(tables: &[String]) -> Result<Option<String>> {
    let schemas: std::collections::BTreeSet<Option<&str>> =
        tables.iter().map(|t| t.split_once('.').map(|(s, _)| s)).collect();
    match schemas.len() {
        0 => Ok(None),
        1 => Ok(schemas.into_iter().next().flatten().map(str::to_string)),
        _ => Err(Error::usage(
            "--table: name tables of one schema at a time (SCHEMA.TABLE), or only unqualified names",
        )),
    }
}

fn load(
    artifact: &Artifact,
    mut decoder: Decoder,
    conn: &PgConn,
    target: &str,
    opts: &RestoreOptions,
    schema: Option<&str>,
) -> Result<()> {
    if artifact.format == "pgsql" {
        let mut cmd = conn.command(&find_program(&["psql"], "postgresql-client")?);
        cmd.args(["--quiet", "--set", "ON_ERROR_STOP=1", "--dbname", target]);
        stream_into(cmd, &mut decoder, classify)?;
        return decoder.finish(artifact).map(drop);
    }
    let mut cmd = conn.command(&find_program(&["pg_restore"], "postgresql-client")?);
    cmd.arg("--exit-on-error").arg(format!("--dbname={target}"));
    if opts.no_owner {
        cmd.args(["--no-owner", "--no-privileges"]);
    }
    if let Some(schema) = schema {
        conn.connect(target)?
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", ident(schema)))
            .map_err(|e| pg_error(&format!("creating schema {schema}"), e))?;
        cmd.arg(format!("--schema={schema}"));
    }
    for t in &opts.tables {
        let name = t.split_once('.').map_or(t.as_str(), |(_, name)| name);
        cmd.arg(format!("--table={name}"));
    }
    match opts.jobs {
        Some(jobs) if jobs > 1 => {
            // Parallel restore needs a seekable file: the one temporary copy bk makes.
            let temp = TempFile::create(artifact)?;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .open(&temp.0)
                .map_err(|e| Error::create(&temp.0, e))?;
            io::copy(&mut decoder, &mut file).map_err(|e| from_io(format!("decoding {}", artifact.file), e))?;
            decoder.finish(artifact)?;
            cmd.arg(format!("--jobs={jobs}")).arg(&temp.0);
            crate::process::output_of(cmd, classify).map(drop)
        }
        _ => {
            // pg_restore --table stops reading after its tables: finish() reads the rest.
            stream_into_may_stop(cmd, &mut decoder, classify)?;
            decoder.finish(artifact).map(drop)
        }
    }
}

/// A private temporary file, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn create(artifact: &Artifact) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            ".bk-restore-{}-{:08x}.pgdump",
            artifact.id,
            rand::random::<u32>()
        ));
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::create(&path, e))?;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::create(&path, e))?;
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Databases whose names start with `prefix` (bk-verify's scratch databases).
pub fn databases_like(opts: &RestoreOptions, prefix: &str) -> Result<Vec<String>> {
    let mut admin = PgConn::new(&opts.conn)?.connect(MAINTENANCE_DB)?;
    let rows = admin
        .query("SELECT datname FROM pg_database ORDER BY 1", &[])
        .map_err(|e| pg_error("listing databases", e))?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|d| d.starts_with(prefix))
        .collect())
}

pub fn drop_database(opts: &RestoreOptions, name: &str) -> Result<()> {
    let mut admin = PgConn::new(&opts.conn)?.connect(MAINTENANCE_DB)?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(name)))
        .map_err(|e| pg_error(&format!("dropping {name}"), e))
}

/// Re-derives the counts of a dump from its bytes: plain SQL is scanned as it comes; a
/// custom archive is turned into SQL by `pg_restore -f -`, which also proves its TOC and
/// data readable. Either must end with pg_dump's completion comment.
pub fn derive_counts(artifact: &Artifact, decoder: &mut Decoder) -> Result<BTreeMap<String, u64>> {
    let marker = if artifact.source.database.is_none() {
        "-- PostgreSQL database cluster dump complete"
    } else {
        "-- PostgreSQL database dump complete"
    };
    let scanner = scan::CopyScanner::new(marker);
    let scanner = if artifact.format == "pgdump" {
        let mut cmd = Command::new(find_program(&["pg_restore"], "postgresql-client")?);
        cmd.args(["--file", "-"]);
        crate::process::scan_through(cmd, decoder, scanner, scan::CopyScanner::feed, |_| Kind::Data).map_err(|e| {
            match e.kind {
                Kind::Data if e.message.starts_with("pg_restore") => {
                    e.context(format!("{}: not a readable pg_dump archive", artifact.file))
                }
                _ => e,
            }
        })?
    } else {
        let mut scanner = scanner;
        crate::for_each_chunk(decoder, |b| scanner.feed(b))?;
        scanner
    };
    if !scanner.complete() {
        return Err(Error::data(format!(
            "{}: the dump does not end with {marker:?}: it is truncated",
            artifact.file
        )));
    }
    Ok(scanner.counts().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgpass_lines_split_like_libpq() {
        assert_eq!(split_pgpass(r"h:5432:*:u:p\:w\\x"), ["h", "5432", "*", "u", r"p:w\x"]);
    }

    #[test]
    fn table_names_of_one_schema_at_a_time() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(table_schema(&[]).unwrap(), None);
        assert_eq!(table_schema(&names(&["a", "b"])).unwrap(), None);
        assert_eq!(
            table_schema(&names(&["app.a", "app.b"])).unwrap().as_deref(),
            Some("app")
        );
        assert!(table_schema(&names(&["app.a", "b"])).is_err());
        assert!(table_schema(&names(&["app.a", "x.b"])).is_err());
    }

    #[test]
    fn plain_dump_end_is_seen_across_chunks() {
        let (mut start, mut tail) = (Vec::new(), Vec::new());
        let text = b"PGDMP....\n-- PostgreSQL database dump complete\n\n";
        for chunk in text.chunks(5) {
            remember_ends(&mut start, &mut tail, chunk);
        }
        assert!(start.starts_with(CUSTOM_MAGIC));
        assert!(String::from_utf8_lossy(&tail).contains("dump complete"));
    }
}
