//! How bk connects to PostgreSQL itself, resolved as libpq resolves it: options, service
//! file, PG* variables, the password file, and sslmode with its TLS verifier.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use postgres::{Client, NoTls};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use bk_core::error::{Error, Result};
use bk_core::private::check_private_file;

use crate::conn::{home_path, ConnArgs};

use super::pg_error;

/// Where and as whom to connect, resolved as libpq resolves it for pg_dump and friends:
/// options, then the service file's section named by PGSERVICE, then PG* variables, then
/// defaults (libpq lets a service override the environment). The password comes from the
/// service, else from the password file (its `passfile`, PGPASSFILE or ~/.pgpass), which
/// must be private. TLS follows sslmode as libpq does (see [`SslMode`]).
pub(super) struct PgConn {
    host: String,
    pub(super) port: u16,
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
    pub(super) fn new(args: &ConnArgs) -> Result<Self> {
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

    pub(super) fn connect(&self, database: &str) -> Result<Client> {
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
    pub(super) fn command(&self, program: &Path) -> Command {
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

    pub(super) fn host_name(&self) -> String {
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

#[cfg(test)]
mod connection_settings_tests {
    use super::*;
    use bk_core::error::Kind;

    #[test]
    fn pgpass_lines_split_like_libpq() {
        assert_eq!(split_pgpass(r"h:5432:*:u:p\:w\\x"), ["h", "5432", "*", "u", r"p:w\x"]);
    }

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
