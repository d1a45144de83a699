//! The `mongodb` engine: a native dump with the `mongodb` driver, into mongodump's archive
//! format (`zstd -dc FILE | mongorestore --archive` restores it), one artifact per database.
//! Documents go from the server's replies into the archive as their raw bytes.
//!
//! The driver is async; bk is not. One small runtime per process (one worker, which runs the
//! driver's monitors and pools) and [`block`] at the engine's edge keep the rest blocking.

pub mod archive;
pub mod dump;
mod ejson;
pub mod restore;

pub use dump::{jobs, DumpArgs};
pub use restore::{databases_like, drop_database, restore};

use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use mongodb::error::ErrorKind;
use mongodb::options::{ClientOptions, ConnectionString};
use mongodb::Client;

use bk_core::error::{Error, Kind, Result};
use bk_core::private::check_private_file;

/// How long to look for a server before saying it is unreachable, unless the URI says
/// (serverSelectionTimeoutMS): the driver's 30 s is long for a backup that will fail anyway.
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection URI, for the tools that also reach other servers with --host/--port.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UriArgs {
    /// MongoDB: file holding the connection URI (mongodb:// or mongodb+srv://, with
    /// credentials and TLS options); must be mode 0600 or 0400
    #[arg(long, value_name = "FILE", conflicts_with_all = ["uri", "host", "port"])]
    pub uri_file: Option<PathBuf>,
    /// MongoDB: connection URI without a password (one with a password is refused: use
    /// --uri-file); without either, --host and --port [default: 127.0.0.1 and 27017]
    #[arg(long, value_name = "URI", conflicts_with_all = ["host", "port"])]
    pub uri: Option<String>,
}

/// Where the MongoDB server is. Credentials and TLS options come from the URI, which holds
/// secrets only when read from a file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MongoConnArgs {
    #[command(flatten)]
    pub uri: UriArgs,
    /// Server host name or address, connected to directly [default: 127.0.0.1]
    #[arg(long)]
    pub host: Option<String>,
    /// Server port [default: 27017]
    #[arg(long)]
    pub port: Option<u16>,
}

impl UriArgs {
    /// With the host and port of the other engines' options.
    pub fn with(&self, conn: &crate::conn::ConnArgs) -> MongoConnArgs {
        MongoConnArgs {
            uri: self.clone(),
            host: conn.host.clone(),
            port: conn.port,
        }
    }
}

/// A connected client and what bk records of the server.
pub struct Connection {
    pub client: Client,
    /// The seed host as recorded in artifacts (never the URI: it may hold a password).
    pub host: String,
    pub port: Option<u16>,
}

impl MongoConnArgs {
    /// The URI to connect with, checked: a URI file must be private (78), and a URI on the
    /// command line must not hold a password (64; the message never repeats the URI).
    fn connection_uri(&self) -> Result<String> {
        if let Some(file) = &self.uri.uri_file {
            check_private_file(file, "URI file")?;
            let text = std::fs::read_to_string(file)
                .map_err(|e| Error::io(format!("reading the URI file {}", file.display()), e))?;
            let uri = text.trim().to_string();
            if uri.is_empty() {
                return Err(Error::config(format!("the URI file {} is empty", file.display())));
            }
            return Ok(uri);
        }
        if let Some(uri) = &self.uri.uri {
            let parsed = ConnectionString::parse(uri)
                .map_err(|_| Error::usage("--uri is not a valid MongoDB connection URI"))?;
            if parsed.credential.as_ref().is_some_and(|c| c.password.is_some()) {
                return Err(Error::usage(
                    "--uri holds a password, which any user may read on the command line: put the URI \
                     in a file of mode 0600 and pass --uri-file",
                ));
            }
            return Ok(uri.clone());
        }
        let host = self.host.as_deref().unwrap_or("127.0.0.1");
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        Ok(format!(
            "mongodb://{host}:{}/?directConnection=true",
            self.port.unwrap_or(27017)
        ))
    }

    /// Connects (the driver connects lazily: the first command says whether the server answers).
    pub fn connect(&self) -> Result<Connection> {
        let uri = self.connection_uri()?;
        let mut options =
            block(ClientOptions::parse(&uri)).map_err(|e| mongo_error("reading the connection URI", e))?;
        options.server_selection_timeout.get_or_insert(SERVER_SELECTION_TIMEOUT);
        options.app_name.get_or_insert_with(|| "bk".to_string());
        let seed = options.hosts.first().map(ToString::to_string).unwrap_or_default();
        let (host, port) = match seed.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() && !h.ends_with(':') => {
                (h.trim_matches(['[', ']']).to_string(), p.parse().ok())
            }
            _ => (seed, None),
        };
        // The client starts its monitors on the runtime it is made in.
        let _runtime = runtime().enter();
        let client = Client::with_options(options).map_err(|e| mongo_error("connecting", e))?;
        Ok(Connection { client, host, port })
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bk-mongodb")
            .enable_all()
            .build()
            .expect("starting the MongoDB driver's runtime")
    })
}

/// Runs one of the driver's futures to its end on bk's runtime.
pub fn block<F: IntoFuture>(future: F) -> F::Output {
    runtime().block_on(future.into_future())
}

/// A driver error as a bk error, its kind from what failed (bk's messages are redacted where
/// they are printed: driver messages may name hosts and URIs).
pub(crate) fn mongo_error(doing: &str, e: mongodb::error::Error) -> Error {
    let kind = match &*e.kind {
        ErrorKind::ServerSelection { .. } | ErrorKind::Io(_) | ErrorKind::DnsResolve { .. } => Kind::Unavailable,
        ErrorKind::ConnectionPoolCleared { .. } | ErrorKind::Shutdown => Kind::Unavailable,
        ErrorKind::Authentication { .. } | ErrorKind::InvalidTlsConfig { .. } => Kind::Config,
        ErrorKind::InvalidArgument { .. } => Kind::Usage,
        ErrorKind::Command(c) => match c.code {
            18 => Kind::Config,
            13 => Kind::NoPerm,
            26 => Kind::NoInput,
            _ => Kind::Io,
        },
        _ => Kind::Io,
    };
    Error::new(kind, format!("{doing}: {e}"))
}

/// bk-verify's integrity level: reads the whole archive with the checked reader (its
/// structure, every document decoded, every CRC, every namespace of the prelude ended, nothing
/// after the end) and returns its documents per `db.collection`. Any fault is 65.
pub fn derive_counts(
    artifact: &bk_core::record::Artifact,
    decoder: &mut bk_core::codec::Decoder,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let input = std::io::BufReader::with_capacity(1 << 18, decoder);
    archive::ArchiveReader::open(input)
        .and_then(archive::ArchiveReader::read_to_end)
        .map_err(|e| match e.kind {
            Kind::Data => e.context(&artifact.file),
            _ => e,
        })
}

/// A collection name bk-dump writes, by mongodump's rules (mongodump/prepare.go): not empty,
/// no `$` or NUL, no system collection but `system.js`. The restore refuses any other.
pub(crate) fn dumpable_collection(name: &str) -> bool {
    !name.is_empty() && !name.contains(['$', '\0']) && (!name.starts_with("system.") || name == "system.js")
}
