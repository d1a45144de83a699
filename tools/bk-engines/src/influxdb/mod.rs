//! The `influxdb` engine (InfluxDB 1.x): `influxd backup -portable` of one database into a
//! private temporary directory, its files streamed into one tar (format `influx-tar`), then
//! removed; `influxd restore -portable` from the same files unpacked. bk talks to the HTTP
//! API itself (listing databases, counting, dropping) and runs influxd for the RPC port.

pub mod dump;
pub mod restore;
mod tsm;

pub use dump::{jobs, DumpArgs};
pub use restore::restore;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::WorkDir;
use bk_core::codec::Decoder;
use bk_core::error::{Error, Kind, Result};
use bk_core::private::check_private_file;
use bk_core::record::Artifact;

use crate::RestoreOptions;

/// InfluxDB's HTTP API and backup RPC ports when not given.
pub const DEFAULT_HTTP_PORT: u16 = 8086;
pub const DEFAULT_RPC_PORT: u16 = 8088;
/// InfluxDB's own database, left out unless named.
const INTERNAL_DATABASE: &str = "_internal";
/// The largest influxd manifest read (one line of JSON per shard).
const MANIFEST_MAX: u64 = 16 << 20;
/// How long the restored shards may take to open.
const SHARD_OPEN_WAIT: Duration = Duration::from_secs(60);
/// How long an HTTP request may take: a count over a large database is a full scan.
const HTTP_TIMEOUT: Duration = Duration::from_secs(3600);

/// What InfluxDB needs besides --host and --port (its HTTP API).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct InfluxOpts {
    /// InfluxDB: the backup and restore RPC port (influxd's bind-address; the HTTP API is
    /// --host and --port, default 127.0.0.1 and 8086) [default: 8088]
    #[arg(long, value_name = "PORT")]
    pub rpc_port: Option<u16>,
    /// InfluxDB: file with the HTTP API's credentials when authentication is on, lines
    /// `username=NAME` and `password=SECRET`; must be mode 0600
    #[arg(long, value_name = "FILE")]
    pub credentials_file: Option<PathBuf>,
}

/// An InfluxDB server: its HTTP API (bk's queries) and its RPC address (influxd's).
#[derive(Clone)]
pub struct Server {
    host: String,
    http_port: u16,
    rpc_port: u16,
    credentials: Option<(String, String)>,
    agent: ureq::Agent,
}

impl Server {
    /// `host` and `port` are the HTTP API's [default: 127.0.0.1 and 8086]. A credentials file
    /// must be private (78).
    pub fn new(host: Option<&str>, port: Option<u16>, opts: &InfluxOpts) -> Result<Self> {
        let credentials = opts.credentials_file.as_deref().map(read_credentials).transpose()?;
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(HTTP_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Ok(Server {
            host: host.unwrap_or("127.0.0.1").to_string(),
            http_port: port.unwrap_or(DEFAULT_HTTP_PORT),
            rpc_port: opts.rpc_port.unwrap_or(DEFAULT_RPC_PORT),
            credentials,
            agent,
        })
    }

    fn from_options(opts: &RestoreOptions) -> Result<Self> {
        Server::new(opts.conn.host.as_deref(), opts.conn.port, &opts.influx)
    }

    fn bracketed(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    fn url(&self) -> String {
        format!("http://{}:{}", self.bracketed(), self.http_port)
    }

    /// The RPC address, as influxd backup and restore take it (`-host`).
    fn rpc(&self) -> String {
        format!("{}:{}", self.bracketed(), self.rpc_port)
    }

    /// A restore target, as the `restored` record gives it.
    fn target(&self, database: &str) -> serde_json::Map<String, Value> {
        let mut t = serde_json::Map::new();
        t.insert("host".into(), crate::conn::local_or(Some(self.host.clone())).into());
        t.insert("port".into(), self.http_port.into());
        t.insert("rpc_port".into(), self.rpc_port.into());
        t.insert("database".into(), database.into());
        t
    }

    /// Runs one InfluxQL statement and returns its result (`series`...). Sent as a POST
    /// form, which the API takes for every statement; the credentials go in a Basic
    /// authorization header (InfluxDB reads `u` and `p` from the URL only, never the form).
    fn query(&self, statement: &str) -> Result<Value> {
        let mut request = self.agent.post(format!("{}/query", self.url()));
        if let Some((user, password)) = &self.credentials {
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            request = request.header("Authorization", format!("Basic {token}"));
        }
        let mut response = request
            .send_form([("q", statement), ("epoch", "ns")])
            .map_err(|e| Error::unavailable(format!("InfluxDB at {} cannot be reached: {e}", self.url())))?;
        let status = response.status().as_u16();
        let body: Value = response
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(Value::Null);
        let said = body["error"]
            .as_str()
            .or(body["results"][0]["error"].as_str())
            .map(str::to_string);
        match (status, said) {
            (401 | 403, said) => Err(Error::config(format!(
                "InfluxDB at {} refused the credentials{}: {}",
                self.url(),
                if self.credentials.is_none() {
                    " (none given: --credentials-file)"
                } else {
                    ""
                },
                said.unwrap_or_default()
            ))),
            (_, Some(said)) => {
                let kind = if said.contains("database not found") {
                    Kind::NoInput
                } else {
                    Kind::Io
                };
                Err(Error::new(kind, format!("InfluxDB: {statement}: {said}")))
            }
            (200..=299, None) => Ok(body["results"][0].clone()),
            (status, None) => Err(Error::unavailable(format!(
                "InfluxDB at {} answered HTTP {status} to {statement}",
                self.url()
            ))),
        }
    }

    /// The first column of every row of a statement's result.
    fn first_column(&self, statement: &str) -> Result<Vec<String>> {
        let result = self.query(statement)?;
        Ok(rows(&result)
            .filter_map(|(_, row)| row.first().and_then(Value::as_str).map(str::to_string))
            .collect())
    }

    pub fn databases(&self) -> Result<Vec<String>> {
        self.first_column("SHOW DATABASES")
    }

    /// The counts of a database that influxd restore has just loaded: the server reopens
    /// each restored shard after influxd restore has returned, and a query meanwhile fails
    /// ("engine is closed", "shard is disabled") or misses that shard. So the counts are
    /// read again until they are `expected` (or a minute has passed: then the last ones).
    pub fn restored_count(&self, database: &str, expected: &BTreeMap<String, u64>) -> Result<BTreeMap<String, u64>> {
        let deadline = std::time::Instant::now() + SHARD_OPEN_WAIT;
        loop {
            let waiting = std::time::Instant::now() < deadline;
            match self.count(database) {
                Err(e)
                    if waiting
                        && (e.message.contains("shard is disabled") || e.message.contains("engine is closed")) => {}
                Ok(found) if waiting && crate::count_mismatch(expected, &found, &[]).is_some() => {}
                counted => return counted,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Field values per `database.measurement`, summed over retention policies: what
    /// `SELECT count(*)` counts, the unit of the artifact's counts.
    pub fn count(&self, database: &str) -> Result<BTreeMap<String, u64>> {
        let mut counts = BTreeMap::new();
        for policy in self.first_column(&format!("SHOW RETENTION POLICIES ON {}", ident(database)))? {
            let result = self.query(&format!(
                "SELECT count(*) FROM {}.{}./.*/",
                ident(database),
                ident(&policy)
            ))?;
            for (measurement, row) in rows(&result) {
                // The first column is the time; the others count each field.
                let n: u64 = row.iter().skip(1).filter_map(Value::as_u64).sum();
                *counts.entry(format!("{database}.{measurement}")).or_insert(0) += n;
            }
        }
        Ok(counts)
    }

    fn drop_database(&self, database: &str) -> Result<()> {
        self.query(&format!("DROP DATABASE {}", ident(database))).map(drop)
    }
}

/// Every row of a result, with the name of its series (its measurement).
fn rows(result: &Value) -> impl Iterator<Item = (String, &Vec<Value>)> {
    result["series"].as_array().into_iter().flatten().flat_map(|series| {
        let name = series["name"].as_str().unwrap_or_default().to_string();
        series["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_array)
            .map(move |row| (name.clone(), row))
    })
}

/// An InfluxQL identifier, quoted.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `username=` and `password=` of a credentials file (mode 0600; 78 otherwise).
fn read_credentials(path: &Path) -> Result<(String, String)> {
    check_private_file(path, "credentials file")?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading the credentials file {}", path.display()), e))?;
    let value = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
    };
    match (value("username"), value("password")) {
        (Some(u), Some(p)) => Ok((u, p)),
        _ => Err(Error::config(format!(
            "the credentials file {} needs a username= and a password= line",
            path.display()
        ))),
    }
}

/// What a failed influxd's stderr means.
fn classify(stderr: &str) -> Kind {
    if stderr.contains("connection refused") || stderr.contains("no such host") || stderr.contains("i/o timeout") {
        Kind::Unavailable
    } else if stderr.contains("database may already exist") {
        Kind::CantCreate
    } else {
        Kind::Io
    }
}

/// influxd backup retries a refused connection for minutes: once refused, the server is down.
fn gives_up(line: &str) -> bool {
    line.contains("connection refused") && line.contains("retrying")
}

/// A file of a portable backup: `<stamp>.meta`, `<stamp>.manifest` or `<stamp>.s<N>.tar.gz`.
fn is_backup_file(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
        && (name.ends_with(".meta") || name.ends_with(".manifest") || name.ends_with(".tar.gz"))
}

fn is_shard(name: &str) -> bool {
    name.ends_with(".tar.gz")
}

/// Unpacks an influx-tar artifact into `dir` (or only reads it, without), counting every
/// shard as it comes; checks its names (each once, only influxd backup's files), the tar's
/// end, and that influxd's own manifest names only files of the artifact (influxd restore
/// opens what it names, relative to the directory: a hostile `../` would read any file).
/// Returns the counts; the caller checks the stored bytes' sha256 (`Decoder::finish`).
fn unpack(
    artifact: &Artifact,
    decoder: &mut Decoder,
    dir: Option<&Path>,
    work: &Path,
) -> Result<BTreeMap<String, u64>> {
    let bad = |why: String| Error::data(format!("{}: {why}", artifact.file));
    let mut counts = BTreeMap::new();
    let mut names: Vec<String> = Vec::new();
    let mut manifests: Vec<Vec<u8>> = Vec::new();
    crate::files::for_each_tar_entry(&artifact.file, decoder, |entry| {
        let path = entry.path().map_err(|e| crate::files::tar_error(&artifact.file, e))?;
        let name = path.to_string_lossy().into_owned();
        if !entry.header().entry_type().is_file() || !is_backup_file(&name) || names.contains(&name) {
            return Err(bad(format!(
                "{name:?} is not a file of influxd backup -portable, or is there twice"
            )));
        }
        names.push(name.clone());
        let mut kept = match dir {
            Some(dir) => {
                let path = dir.join(&name);
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| Error::create(&path, e))?;
                Some(file)
            }
            None => None,
        };
        let mut tee = Tee {
            inner: entry,
            copy: kept.as_mut(),
        };
        let input: &mut dyn Read = &mut tee;
        let reading = |e| crate::files::tar_error(&artifact.file, e);
        if is_shard(&name) {
            for (k, n) in tsm::count_shard(input, &format!("{} ({name})", artifact.file), work)?.values {
                *counts.entry(k).or_insert(0) += n;
            }
        } else if name.ends_with(".manifest") {
            let mut text = Vec::new();
            input.take(MANIFEST_MAX).read_to_end(&mut text).map_err(reading)?;
            manifests.push(text);
        }
        std::io::copy(input, &mut std::io::sink()).map_err(reading)?;
        Ok(())
    })?;
    let [manifest] = manifests.as_slice() else {
        return Err(bad(format!(
            "{} manifests of influxd backup in it, not one",
            manifests.len()
        )));
    };
    let manifest: Value =
        serde_json::from_slice(manifest).map_err(|e| bad(format!("its influxd manifest is not JSON: {e}")))?;
    let named = std::iter::once(&manifest["meta"]).chain(manifest["files"].as_array().into_iter().flatten());
    for entry in named {
        let name = entry["fileName"].as_str().unwrap_or_default();
        if !names.iter().any(|n| n == name) {
            return Err(bad(format!(
                "its influxd manifest names {name:?}, which is not a file of the artifact"
            )));
        }
    }
    Ok(counts)
}

/// Passes what it reads on to a file too, if any.
struct Tee<'a, R> {
    inner: R,
    copy: Option<&'a mut std::fs::File>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(copy) = self.copy.as_mut() {
            std::io::Write::write_all(copy, &buf[..n])?;
        }
        Ok(n)
    }
}

/// Re-derives the counts of an influx-tar artifact: its tar read to its end, every shard's
/// gzip, tar, TSM index and block CRCs read, and its field values counted.
/// The shards' TSM files are extracted one shard at a time into `scratch_dir`.
pub fn derive_counts(artifact: &Artifact, decoder: &mut Decoder, scratch_dir: &Path) -> Result<BTreeMap<String, u64>> {
    let work = WorkDir::new(Some(scratch_dir), "influxdb-verify")?;
    unpack(artifact, decoder, None, &work.path)
}

/// Databases whose names start with `prefix` (bk-verify's scratch databases).
pub fn databases_like(opts: &RestoreOptions, prefix: &str) -> Result<Vec<String>> {
    Ok(Server::from_options(opts)?
        .databases()?
        .into_iter()
        .filter(|d| d.starts_with(prefix))
        .collect())
}

pub fn drop_database(opts: &RestoreOptions, name: &str) -> Result<()> {
    Server::from_options(opts)?.drop_database(name)
}
