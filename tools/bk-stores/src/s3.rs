//! `s3://bucket/prefix`: any S3-compatible server, through the object_store crate.
//!
//! Configuration, in order of precedence: the [`StoreConfig`]'s endpoint and region (the
//! tools' `--s3-endpoint` / `--s3-region`, or `BK_S3_ENDPOINT` / `BK_S3_REGION`), the standard AWS variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
//! `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`, `AWS_PROFILE`), then `~/.aws/credentials`
//! and `~/.aws/config` of the profile. Requests are path-style unless
//! `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`. Credentials never come from a URL: an `s3://`
//! store or an endpoint with user info is refused (64) without showing it.
//!
//! Uploads are multipart, streamed without a temporary file in parts that grow with the
//! stream, since S3 takes at most 10,000 parts of one object (see [`part_size`]: 8 MiB
//! parts up to 7.8 GiB, 10,000 parts hold 5.59 TiB, beyond S3's 5 TiB limit of an object).
//! Parts are sent while the next fills, at most 64 MiB of them at once (4 parts of 8 MiB,
//! always at least one), which bounds an upload's memory (see [`parts_in_flight`]). A
//! stream beyond 10,000 parts fails when it gets there (73). The object appears only when
//! the upload completes, and a dropped upload is aborted. After completing, the stored object is checked against
//! what was sent: by its ETag where the server gives S3's own (each part's the MD5 of the
//! part, the object's the MD5 of those MD5s, then `-<parts>`), which costs no second
//! transfer; else it is read back and its sha256 compared. Requests are signed without a
//! sha256 of their body (`UNSIGNED-PAYLOAD`), since that check follows anyway. Requests are retried with exponential backoff on
//! 5xx answers, timeouts and connection failures (`BK_S3_RETRIES`, default 5); a download
//! cut in the middle resumes from where it stopped (a range request, same ETag).
//!
//! An upload that cannot be aborted (the server died, the run was killed) would stay on the
//! server, invisible and billed. Not every S3 server can list multipart uploads (s3s-fs
//! cannot), so each upload is named by a small hidden object `<name>/.<file>.tmp.<pid>.<random>`
//! holding its upload id, written when it starts and deleted when it completes or is
//! aborted. The next upload of the same file aborts the uploads such objects name, and so
//! does bk-prune's removal of leftovers for those older than its limit.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bk_core::error::{Error, Kind, Result};
use bk_core::record::{Artifact, Record};
use bk_core::store::{manifest_file, Listing, Store, StoreConfig, Upload};
use futures::{StreamExt, TryStreamExt};
use md5::Md5;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;

/// The size of the first parts of a multipart upload, and of each part of a small one.
const FIRST_PART_SIZE: usize = 8 << 20;
/// How many parts keep the first size (7.8 GiB) before parts grow.
const PARTS_OF_FIRST_SIZE: usize = 1000;
/// Past those, each part is 1 MiB larger every this many parts.
const PARTS_PER_MIB_MORE: usize = 7;
/// S3's limit of parts of one object.
const MAX_PARTS: usize = 10_000;
/// The bytes of the parts being sent at once, at most (and at least one part): with the part
/// being filled, what bounds an upload's memory.
const BYTES_IN_FLIGHT: usize = 64 << 20;
const MAX_PARTS_IN_FLIGHT: usize = 4;

/// The size of the part of 0-based `index`: 8 MiB for the first 1,000 parts, then 1 MiB
/// more every 7 parts, up to 1,293 MiB for the 10,000th: 10,000 parts hold 5.59 TiB, S3's
/// 5 TiB limit of an object and more, while a stream's first 7.8 GiB (most backups) go in
/// 8 MiB parts. Every part but the last is over S3's 5 MiB minimum and under its 5 GiB
/// maximum. A fixed size would need 525 MiB parts from the start to reach 5 TiB.
fn part_size(index: usize) -> usize {
    FIRST_PART_SIZE + ((index.saturating_sub(PARTS_OF_FIRST_SIZE) / PARTS_PER_MIB_MORE) << 20)
}

/// How many parts of `part_size` may be sent at once: 4 of up to 16 MiB, 3 of up to 21 MiB,
/// 2 of up to 32 MiB, then 1. An upload holds those and the part being filled: 40 MiB up to
/// 7.8 GiB, at most 96 MiB up to 11.2 GiB, then twice the part size (2 GiB from 3.5 TiB on,
/// at most 2.5 GiB near S3's 5 TiB limit).
fn parts_in_flight(part_size: usize) -> usize {
    (BYTES_IN_FLIGHT / part_size).clamp(1, MAX_PARTS_IN_FLIGHT)
}

pub struct S3Store {
    url: String,
    bucket: String,
    /// Without leading or trailing slashes; may be empty.
    prefix: String,
    rt: Arc<Runtime>,
    s3: Arc<AmazonS3>,
}

/// Classifies an object_store error: unreachable servers and exhausted retries are 69.
fn s3_error(doing: impl std::fmt::Display, e: object_store::Error) -> Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => Kind::NoInput,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => Kind::NoPerm,
        object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. } => Kind::CantCreate,
        _ => Kind::Unavailable,
    };
    // The whole chain: the outer message alone often says only "Generic S3 error".
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = s.source();
    }
    let mut message = message.replace('\n', " ");
    if ["InvalidAccessKeyId", "SignatureDoesNotMatch", "NotSignedUp"]
        .iter()
        .any(|code| message.contains(code))
    {
        return Error::new(Kind::Config, format!("{doing}: {message} (check the AWS credentials)"));
    }
    let kind = if message.contains("403 Forbidden") {
        Kind::NoPerm
    } else {
        kind
    };
    if message.len() > 600 {
        // At a character's boundary: a server's words need not be ASCII.
        let end = (0..=600).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
        message.truncate(end);
    }
    Error::new(kind, format!("{doing}: {message}"))
}

/// `[section]` → key → value of an INI-style AWS file.
fn read_ini(path: &std::path::Path) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return sections;
    };
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = section.trim().to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            sections
                .entry(current.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    sections
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

fn aws_file(var: &str, default: &str) -> Option<PathBuf> {
    env(var)
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws").join(default)))
}

/// Where S3 credentials belong: never in a URL.
const CREDENTIALS_ADVICE: &str =
    "give them by AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or in ~/.aws/credentials (chmod 600)";

/// The builder from the configuration, the environment and the AWS files, without bucket.
fn builder(settings: &StoreConfig) -> Result<AmazonS3Builder> {
    // reqwest is built without a TLS provider of its own (see Cargo.toml): it takes the
    // process's, set here once; an error means it is set already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = AmazonS3Builder::from_env();
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    if env("AWS_ACCESS_KEY_ID").is_none() {
        if let Some(path) = aws_file("AWS_SHARED_CREDENTIALS_FILE", "credentials").filter(|p| p.exists()) {
            bk_core::private::check_private_file(&path, "AWS credentials file")?;
            if let Some(s) = read_ini(&path).get(&profile) {
                if let Some(v) = s.get("aws_access_key_id") {
                    b = b.with_access_key_id(v);
                }
                if let Some(v) = s.get("aws_secret_access_key") {
                    b = b.with_secret_access_key(v);
                }
                if let Some(v) = s.get("aws_session_token") {
                    b = b.with_token(v);
                }
            }
        }
    }
    let config = aws_file("AWS_CONFIG_FILE", "config")
        .map(|p| read_ini(&p))
        .unwrap_or_default();
    let section = if profile == "default" {
        config.get("default")
    } else {
        config.get(&format!("profile {profile}"))
    };
    let region = settings
        .s3_region
        .clone()
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(|| section.and_then(|s| s.get("region").cloned()))
        .unwrap_or_else(|| "us-east-1".into());
    b = b.with_region(region);
    let endpoint = settings
        .s3_endpoint
        .clone()
        .or_else(|| env("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| section.and_then(|s| s.get("endpoint_url").cloned()));
    if let Some(endpoint) = endpoint {
        // Both keys: object_store prefers AWS_ENDPOINT_URL_S3, read from the environment,
        // to the endpoint, and bk's own settings come first.
        let endpoint = endpoint.trim_end_matches('/');
        b = b
            .with_endpoint(endpoint)
            .with_config(AmazonS3ConfigKey::S3Endpoint, endpoint);
    }
    // The endpoint in effect, from whichever variable or file object_store read it.
    let endpoint = b
        .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
        .or_else(|| b.get_config_value(&AmazonS3ConfigKey::Endpoint));
    if let Some(endpoint) = &endpoint {
        crate::refuse_secret_in_url("S3 endpoint", endpoint, false, CREDENTIALS_ADVICE)?;
    }
    let allow_http = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
    let retries = env("BK_S3_RETRIES").and_then(|r| r.parse().ok()).unwrap_or(5);
    // No sha256 of each request's body for its signature (UNSIGNED-PAYLOAD): an upload's
    // bytes are checked once, after it, by the ETags or a read-back, which spares the client
    // and the server a pass over every byte.
    b = b
        .with_unsigned_payload(true)
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(10),
                base: 2.0,
            },
            max_retries: retries,
            retry_timeout: Duration::from_secs(120),
        })
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(allow_http)
                .with_connect_timeout(Duration::from_secs(10))
                .with_timeout(Duration::from_secs(120)),
        );
    Ok(b)
}

impl S3Store {
    pub fn open(url: &str, config: &StoreConfig) -> Result<Self> {
        crate::refuse_secret_in_url("store", url, false, CREDENTIALS_ADVICE)?;
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| Error::usage(format!("store {url}: not an s3:// URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::usage(format!("store {url}: no bucket (s3://bucket/prefix)")));
        }
        let prefix = prefix.trim_matches('/').to_string();
        let s3 = builder(config)?
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| Error::config(format!("store {url}: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bk-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the S3 client", e))?;
        Ok(S3Store {
            url: format!(
                "s3://{bucket}{}",
                if prefix.is_empty() {
                    String::new()
                } else {
                    format!("/{prefix}")
                }
            ),
            bucket: bucket.to_string(),
            prefix,
            rt: Arc::new(rt),
            s3: Arc::new(s3),
        })
    }

    fn key(&self, name: &str, file: &str) -> Path {
        Path::from(self.rel(name, file))
    }

    fn rel(&self, name: &str, file: &str) -> String {
        if self.prefix.is_empty() {
            format!("{name}/{file}")
        } else {
            format!("{}/{name}/{file}", self.prefix)
        }
    }

    fn get_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        let what = format!("reading s3://{}/{path}", self.bucket);
        self.rt.block_on(async {
            let got = self.s3.get(path).await.map_err(|e| s3_error(&what, e))?;
            got.bytes().await.map(|b| b.to_vec()).map_err(|e| s3_error(&what, e))
        })
    }

    fn reader(&self, path: &Path) -> Result<S3Reader> {
        let what = format!("reading s3://{}/{path}", self.bucket);
        let got = self.rt.block_on(self.s3.get(path)).map_err(|e| s3_error(&what, e))?;
        Ok(S3Reader {
            rt: self.rt.clone(),
            stream: got.into_stream(),
            chunk: bytes::Bytes::new(),
            what,
        })
    }

    /// Aborts the multipart uploads named by the hidden marker objects of a name's directory
    /// (of one file, or of all; last modified before `older_than`, if given) and deletes the
    /// markers. Returns the markers' locations, sorted; with `dry_run`, only returns them.
    fn abort_unfinished(
        &self,
        name: &str,
        file: Option<&str>,
        older_than: Option<SystemTime>,
        dry_run: bool,
    ) -> Result<Vec<String>> {
        let dir = Path::from(self.rel(name, "").trim_end_matches('/'));
        let objects: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.s3.list(Some(&dir)).try_collect())
            .map_err(|e| s3_error(format!("listing {}", self.location(name, "")), e))?;
        let mut markers = Vec::new();
        for o in objects {
            let Some(marker) = o.location.filename().filter(|m| bk_core::store::is_temp(m)) else {
                continue;
            };
            // `.<file>.tmp.<pid>.<random>`
            let Some((of, _)) = marker.strip_prefix('.').and_then(|m| m.rsplit_once(".tmp.")) else {
                continue;
            };
            if o.location != self.key(name, marker)
                || file.is_some_and(|f| f != of)
                || older_than.is_some_and(|t| SystemTime::from(o.last_modified) >= t)
            {
                continue;
            }
            markers.push(self.location(name, marker));
            if dry_run {
                continue;
            }
            let id = String::from_utf8_lossy(&self.get_bytes(&o.location)?)
                .trim()
                .to_string();
            match self.rt.block_on(self.s3.abort_multipart(&self.key(name, of), &id)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    let doing = format!("aborting the unfinished upload of {}", self.location(name, of));
                    return Err(s3_error(doing, e));
                }
            }
            self.delete_key(&o.location)?;
        }
        markers.sort();
        Ok(markers)
    }

    fn delete_key(&self, path: &Path) -> Result<()> {
        match self.rt.block_on(self.s3.delete(path)) {
            Err(object_store::Error::NotFound { .. }) | Ok(()) => Ok(()),
            Err(e) => Err(s3_error(format!("deleting s3://{}/{path}", self.bucket), e)),
        }
    }
}

/// Streams an object's bytes.
struct S3Reader {
    rt: Arc<Runtime>,
    stream: futures::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
    chunk: bytes::Bytes,
    what: String,
}

impl Read for S3Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(s3_error(&self.what, e).into()),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}

/// A multipart upload: parts are sent as they fill; nothing is visible until `commit`
/// completes the upload; dropping it first aborts the upload.
struct S3Upload {
    rt: Arc<Runtime>,
    s3: Arc<AmazonS3>,
    path: Path,
    url: String,
    id: String,
    /// The hidden object naming this upload until it is completed or aborted.
    marker: Path,
    /// The part being filled.
    part: Vec<u8>,
    sending: tokio::task::JoinSet<(usize, [u8; 16], object_store::Result<PartId>)>,
    /// The parts sent, by index, with the MD5 of each.
    sent: Vec<Option<(PartId, [u8; 16])>>,
    /// Completed or aborted: nothing for `drop` to do.
    finished: bool,
    hasher: Sha256,
    bytes: u64,
}

impl S3Upload {
    /// Sends the part filled so far, first waiting while as many parts as may be in flight
    /// are being sent.
    fn send_part(&mut self) -> Result<()> {
        let index = self.sent.len();
        while self.sending.len() >= parts_in_flight(part_size(index)) {
            self.wait_for_part()?;
        }
        self.sent.push(None);
        let data = std::mem::replace(&mut self.part, Vec::with_capacity(part_size(index + 1)));
        let (s3, path, id) = (self.s3.clone(), self.path.clone(), self.id.clone());
        let _inside = self.rt.enter();
        self.sending.spawn(async move {
            let md5: [u8; 16] = Md5::digest(&data).into();
            (index, md5, s3.put_part(&path, &id, index, PutPayload::from(data)).await)
        });
        Ok(())
    }

    fn wait_for_part(&mut self) -> Result<()> {
        let Some(joined) = self.rt.block_on(self.sending.join_next()) else {
            return Ok(());
        };
        // Tasks are cancelled only when the upload is dropped; one that panicked failed.
        let (index, md5, sent) = joined.map_err(|e| {
            Error::new(
                Kind::Internal,
                format!("uploading {}: a part's upload failed: {e}", self.url),
            )
        })?;
        let part = sent.map_err(|e| s3_error(format!("uploading {}", self.url), e))?;
        self.sent[index] = Some((part, md5));
        Ok(())
    }
}

impl Write for S3Upload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let index = self.sent.len();
        if index >= MAX_PARTS {
            return Err(Error::new(
                Kind::CantCreate,
                format!(
                    "uploading {}: the stream is larger than one S3 object may be ({MAX_PARTS} parts, {} bytes)",
                    self.url, self.bytes
                ),
            )
            .into());
        }
        let n = buf.len().min(part_size(index) - self.part.len());
        self.part.extend_from_slice(&buf[..n]);
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        if self.part.len() == part_size(index) {
            self.send_part()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Upload for S3Upload {
    fn commit(mut self: Box<Self>) -> Result<()> {
        // The last part, which may be short (or empty, for an empty file).
        if !self.part.is_empty() || self.sent.is_empty() {
            self.send_part()?;
        }
        while !self.sending.is_empty() {
            self.wait_for_part()?;
        }
        let url = self.url.clone();
        let (parts, md5s): (Vec<PartId>, Vec<[u8; 16]>) = std::mem::take(&mut self.sent).into_iter().flatten().unzip();
        let parts_match = parts
            .iter()
            .zip(&md5s)
            .all(|(part, md5)| same_etag(&part.content_id, &hex::encode(md5)));
        let completed = self
            .rt
            .block_on(self.s3.complete_multipart(&self.path, &self.id, parts))
            .map_err(|e| s3_error(format!("completing the upload of {url}"), e))?;
        self.finished = true;
        let _ = self.rt.block_on(self.s3.delete(&self.marker));
        if parts_match
            && completed
                .e_tag
                .as_deref()
                .is_some_and(|e| same_etag(e, &multipart_etag(&md5s)))
        {
            return Ok(());
        }
        // Read back: what the server stores must be what was sent.
        let sent = hex::encode(std::mem::take(&mut self.hasher).finalize());
        let check = || -> Result<(String, u64)> {
            let got = self
                .rt
                .block_on(self.s3.get(&self.path))
                .map_err(|e| s3_error(format!("reading back {url}"), e))?;
            let mut reader = S3Reader {
                rt: self.rt.clone(),
                stream: got.into_stream(),
                chunk: bytes::Bytes::new(),
                what: format!("reading back {url}"),
            };
            bk_core::codec::sha256_of(&mut reader, &format!("reading back {url}"))
        };
        let (stored, stored_bytes) = check()?;
        if stored != sent || stored_bytes != self.bytes {
            let _ = self.rt.block_on(self.s3.delete(&self.path));
            return Err(Error::data(format!(
                "{url}: the stored object differs from what was sent (sha256 {stored}, {stored_bytes} bytes; sent {sent}, {} bytes); deleted it",
                self.bytes
            )));
        }
        Ok(())
    }
}

/// S3's ETag of a multipart upload: the MD5 of its parts' MD5s, then `-<parts>`.
fn multipart_etag(part_md5s: &[[u8; 16]]) -> String {
    format!("{}-{}", hex::encode(Md5::digest(part_md5s.concat())), part_md5s.len())
}

/// An ETag as a server sends it (quoted, maybe weak) is `expected`.
fn same_etag(etag: &str, expected: &str) -> bool {
    etag.trim_start_matches("W/")
        .trim_matches('"')
        .eq_ignore_ascii_case(expected)
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.sending.abort_all();
        match self.rt.block_on(self.s3.abort_multipart(&self.path, &self.id)) {
            Ok(()) => {
                let _ = self.rt.block_on(self.s3.delete(&self.marker));
            }
            Err(e) => eprintln!(
                "warning: could not abort the unfinished upload of {} ({e}); the next upload of it, or bk-prune, will",
                self.url
            ),
        }
    }
}

impl Store for S3Store {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn location(&self, name: &str, file: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.rel(name, file))
    }

    fn create(&self, name: &str, file: &str) -> Result<Box<dyn Upload>> {
        bk_core::name::validate_name(name)?;
        let path = self.key(name, file);
        let url = self.location(name, file);
        // An earlier run's unfinished uploads of this file are of no more use; one that
        // cannot be aborted now does not stop this upload (bk-prune tries again).
        if let Err(e) = self.abort_unfinished(name, Some(file), None, false) {
            eprintln!("warning: {}", e.message);
        }
        let id = self
            .rt
            .block_on(self.s3.create_multipart(&path))
            .map_err(|e| s3_error(format!("starting the upload of {url}"), e))?;
        let marker = self.key(name, &bk_core::store::temp_name(file));
        let upload = S3Upload {
            rt: self.rt.clone(),
            s3: self.s3.clone(),
            path,
            url,
            id: id.clone(),
            marker: marker.clone(),
            part: Vec::with_capacity(part_size(0)),
            sending: tokio::task::JoinSet::new(),
            sent: Vec::new(),
            finished: false,
            hasher: Sha256::new(),
            bytes: 0,
        };
        if let Err(e) = self.rt.block_on(self.s3.put(&marker, id.into_bytes().into())) {
            // Nothing would name this upload if it were left unfinished: abort it now.
            drop(upload);
            return Err(s3_error(
                format!("starting the upload of {}", self.location(name, file)),
                e,
            ));
        }
        Ok(Box::new(upload))
    }

    fn put_manifest(&self, artifact: &Artifact) -> Result<()> {
        let path = self.key(&artifact.name, &manifest_file(&artifact.id));
        let line = format!("{}\n", Record::Artifact(artifact.clone()).to_line());
        self.rt
            .block_on(self.s3.put(&path, line.into_bytes().into()))
            .map_err(|e| s3_error(format!("writing s3://{}/{path}", self.bucket), e))?;
        Ok(())
    }

    fn has_manifest(&self, name: &str, id: &str) -> Result<bool> {
        let path = self.key(name, &manifest_file(id));
        match self.rt.block_on(self.s3.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(s3_error(format!("looking for s3://{}/{path}", self.bucket), e)),
        }
    }

    fn list(&self, name: Option<&str>) -> Result<Listing> {
        if let Some(n) = name {
            bk_core::name::validate_name(n)?;
        }
        let base = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let prefix = match name {
            Some(n) => Path::from(format!("{base}{n}")),
            None => Path::from(self.prefix.as_str()),
        };
        let objects: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.s3.list(Some(&prefix)).try_collect())
            .map_err(|e| s3_error(format!("listing store {}", self.url), e))?;
        let mut files = crate::Files::new();
        for o in objects {
            let key = o.location.to_string();
            let Some(rel) = key.strip_prefix(&base) else { continue };
            let Some((n, f)) = rel.split_once('/') else { continue };
            if f.contains('/') || bk_core::name::validate_name(n).is_err() || name.is_some_and(|w| w != n) {
                continue;
            }
            files
                .entry(n.to_string())
                .or_default()
                .insert(f.to_string(), Some(o.size));
        }
        Ok(crate::build_listing(
            files,
            |n, f| {
                let bytes = self.get_bytes(&self.key(n, f))?;
                String::from_utf8(bytes).map_err(|_| Error::data("not UTF-8"))
            },
            |n, f| self.location(n, f),
        ))
    }

    fn open_file(&self, name: &str, file: &str) -> Result<Box<dyn Read>> {
        Ok(Box::new(io::BufReader::with_capacity(
            256 * 1024,
            self.reader(&self.key(name, file))?,
        )))
    }

    fn delete(&self, artifact: &Artifact) -> Result<()> {
        self.delete_key(&self.key(&artifact.name, &manifest_file(&artifact.id)))?;
        self.delete_key(&self.key(&artifact.name, &artifact.file))
    }

    fn remove_leftovers(&self, name: &str, older_than: SystemTime, dry_run: bool) -> Result<Vec<String>> {
        bk_core::name::validate_name(name)?;
        self.abort_unfinished(name, None, Some(older_than), dry_run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_to_hold_s3s_largest_object_in_bounded_memory() {
        const MIB: usize = 1 << 20;
        let sizes: Vec<usize> = (0..MAX_PARTS).map(part_size).collect();
        let total: u64 = sizes.iter().map(|&s| s as u64).sum();
        assert!(total >= 5u64 << 40, "10,000 parts hold {total} bytes, not 5 TiB");
        assert!(sizes[..PARTS_OF_FIRST_SIZE].iter().all(|&s| s == 8 * MIB));
        assert!(sizes.windows(2).all(|w| w[0] <= w[1]), "sizes never shrink");
        // S3: every part but the last at least 5 MiB, none over 5 GiB.
        assert!(sizes.iter().all(|&s| (5 * MIB..=5 << 30).contains(&s)));
        assert_eq!(sizes[MAX_PARTS - 1], 1293 * MIB, "the largest part, as documented");
        // Memory: the parts in flight and the one being filled, as documented.
        let peak = |index: usize| (parts_in_flight(part_size(index)) + 1) * part_size(index);
        assert_eq!(peak(0), 40 * MIB);
        assert!((0..MAX_PARTS).all(|i| peak(i) <= 2 * 1293 * MIB));
        assert!((0..MAX_PARTS)
            .filter(|&i| part_size(i) <= 32 * MIB)
            .all(|i| peak(i) <= 96 * MIB));
    }

    #[test]
    fn multipart_etags_are_s3s() {
        let md5s: Vec<[u8; 16]> = [&b"hello"[..], b"world"]
            .iter()
            .map(|p| Md5::digest(p).into())
            .collect();
        assert_eq!(multipart_etag(&md5s), "065947336a2f2a95ba8899f3675c3be6-2");
        assert!(same_etag(
            "\"065947336A2F2A95BA8899F3675C3BE6-2\"",
            &multipart_etag(&md5s)
        ));
        assert!(same_etag(
            "W/\"5d41402abc4b2a76b9719d911017c592\"",
            "5d41402abc4b2a76b9719d911017c592"
        ));
        assert!(!same_etag(
            "\"5d41402abc4b2a76b9719d911017c592-1\"",
            "5d41402abc4b2a76b9719d911017c592"
        ));
    }
}
