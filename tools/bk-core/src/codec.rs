//! The streaming codec: compression (zstd, gzip, none), optional age encryption, and the
//! sha256 and sizes of what is stored, all computed on the fly. Nothing is buffered beyond
//! the compressor's window, whatever the size of the stream.

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::path::Path;
use std::rc::Rc;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{from_io, Error, Result};
use crate::private::check_private_file;
use crate::progress::Progress;
use crate::record::Artifact;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Gzip,
    None,
}

impl Compression {
    /// The file name suffix, with its dot.
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::Zstd => ".zst",
            Compression::Gzip => ".gz",
            Compression::None => "",
        }
    }

    fn level(self, level: Option<i32>) -> Result<i32> {
        let (range, default) = match self {
            Compression::Zstd => (1..=19, 3),
            Compression::Gzip => (1..=9, 6),
            Compression::None if level.is_some() => {
                return Err(Error::usage("--level needs a compression (--compress zstd or gzip)"))
            }
            Compression::None => return Ok(0),
        };
        match level {
            None => Ok(default),
            Some(l) if range.contains(&l) => Ok(l),
            Some(l) => Err(Error::usage(format!(
                "--level {l} is out of range for {} ({}..={})",
                format!("{self:?}").to_lowercase(),
                range.start(),
                range.end()
            ))),
        }
    }
}

/// How an artifact is encrypted, as recorded in its manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Encryption {
    pub scheme: String,
    pub recipients: Vec<String>,
}

pub struct EncodeOptions {
    pub compression: Compression,
    pub level: Option<i32>,
    pub recipients: Vec<age::x25519::Recipient>,
}

impl EncodeOptions {
    /// Checks the level against the compression before any work is done.
    pub fn new(compression: Compression, level: Option<i32>, recipients: Vec<age::x25519::Recipient>) -> Result<Self> {
        compression.level(level)?;
        Ok(EncodeOptions {
            compression,
            level,
            recipients,
        })
    }

    pub fn encryption(&self) -> Option<Encryption> {
        (!self.recipients.is_empty()).then(|| Encryption {
            scheme: "age".into(),
            recipients: self.recipients.iter().map(|r| r.to_string()).collect(),
        })
    }

    /// The artifact's file name suffix after its format: compression, then `.age`.
    pub fn suffix(&self) -> String {
        let age = if self.recipients.is_empty() { "" } else { ".age" };
        format!("{}{age}", self.compression.suffix())
    }
}

/// Parses an `age1...` recipient. A secret key given by mistake is refused without being
/// repeated: the message says where it was, never what.
pub fn parse_recipient(text: &str) -> Result<age::x25519::Recipient> {
    let text = text.trim();
    if text.to_ascii_uppercase().starts_with("AGE-SECRET-KEY-") {
        return Err(Error::usage(
            "that is an age SECRET key (an identity), not a recipient: give its public key, \
             from `age-keygen -y IDENTITY-FILE`, and keep the secret key off the backup host",
        ));
    }
    age::x25519::Recipient::from_str(text).map_err(|e| {
        let shown: String = text.chars().take(70).collect();
        Error::usage(format!("not an age recipient {shown:?}: {e}"))
    })
}

/// Reads a recipients file: one `age1...` per line, blank lines and `#` comments ignored.
pub fn read_recipients_file(path: &Path) -> Result<Vec<age::x25519::Recipient>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading recipients file {}", path.display()), e))?;
    let recipients: Vec<_> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| parse_recipient(line).map_err(|e| e.context(format!("recipients file {}", path.display()))))
        .collect::<Result<_>>()?;
    if recipients.is_empty() {
        return Err(Error::usage(format!(
            "recipients file {} names no recipient",
            path.display()
        )));
    }
    Ok(recipients)
}

pub type Identities = Vec<Box<dyn age::Identity + Send + Sync>>;

/// Loads an age identity file (`AGE-SECRET-KEY-...` lines); it must be private.
pub fn load_identities(path: &Path) -> Result<Identities> {
    check_private_file(path, "identity file")?;
    let file = age::IdentityFile::from_file(path.to_string_lossy().into_owned())
        .map_err(|e| Error::io(format!("reading identity file {}", path.display()), e))?;
    file.into_identities()
        .map_err(|e| Error::usage(format!("identity file {}: {e}", path.display())))
}

/// Loads every identity of every file given with --identity.
pub fn load_identity_files(paths: &[std::path::PathBuf]) -> Result<Identities> {
    let mut all = Identities::new();
    for path in paths {
        all.extend(load_identities(path)?);
    }
    Ok(all)
}

/// Counts and hashes the bytes that pass, shared between a reader and whoever checks it.
#[derive(Default)]
struct Tally {
    bytes: Cell<u64>,
    sha: RefCell<Sha256>,
}

impl Tally {
    fn add(&self, data: &[u8]) {
        self.bytes.set(self.bytes.get() + data.len() as u64);
        self.sha.borrow_mut().update(data);
    }
    fn hex(&self) -> String {
        hex::encode(self.sha.borrow().clone().finalize())
    }
}

/// The outermost writer: what passes here is exactly what is stored.
struct HashWriter<W> {
    inner: W,
    tally: Tally,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.tally.add(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Sealer<W: Write> {
    Plain(HashWriter<W>),
    Age(age::stream::StreamWriter<HashWriter<W>>),
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sealer::Plain(w) => w.write(buf),
            Sealer::Age(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealer::Plain(w) => w.flush(),
            Sealer::Age(w) => w.flush(),
        }
    }
}

impl<W: Write> Sealer<W> {
    fn finish(self) -> io::Result<HashWriter<W>> {
        match self {
            Sealer::Plain(w) => Ok(w),
            Sealer::Age(w) => w.finish(),
        }
    }
}

enum Compressor<W: Write> {
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Gzip(flate2::write::GzEncoder<W>),
    None(W),
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Zstd(w) => w.write(buf),
            Compressor::Gzip(w) => w.write(buf),
            Compressor::None(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Zstd(w) => w.flush(),
            Compressor::Gzip(w) => w.flush(),
            Compressor::None(w) => w.flush(),
        }
    }
}

impl<W: Write> Compressor<W> {
    fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Zstd(w) => w.finish(),
            Compressor::Gzip(w) => w.finish(),
            Compressor::None(w) => Ok(w),
        }
    }
}

/// Content in, stored bytes out to `W`.
pub struct Encoder<W: Write> {
    inner: Compressor<Sealer<W>>,
    content_bytes: u64,
    progress: Progress,
}

/// What an encoder wrote, once finished.
pub struct Encoded<W> {
    pub inner: W,
    pub bytes: u64,
    pub sha256: String,
    pub content_bytes: u64,
}

impl<W: Write> Encoder<W> {
    pub fn new(inner: W, options: &EncodeOptions, progress: Progress) -> Result<Self> {
        let level = options.compression.level(options.level)?;
        let hashed = HashWriter {
            inner,
            tally: Tally::default(),
        };
        let sealed = if options.recipients.is_empty() {
            Sealer::Plain(hashed)
        } else {
            let recipients = options.recipients.iter().map(|r| r as &dyn age::Recipient);
            let encryptor = age::Encryptor::with_recipients(recipients)
                .map_err(|e| Error::usage(format!("age encryption: {e}")))?;
            Sealer::Age(
                encryptor
                    .wrap_output(hashed)
                    .map_err(|e| Error::io("writing the age header", e))?,
            )
        };
        let inner = match options.compression {
            Compression::Zstd => {
                let mut zstd =
                    zstd::stream::write::Encoder::new(sealed, level).map_err(|e| Error::io("starting zstd", e))?;
                // One worker thread compresses while this one reads the source, as
                // `dump | zstd` runs both at once; memory stays bounded by zstd's job size.
                zstd.multithread(1)
                    .map_err(|e| Error::io("starting zstd's worker", e))?;
                // Small jobs bound the memory whatever the level (level 19 would buffer
                // 64 MiB), and keep the source program paced by the compressor. 1 MiB
                // rather than 4 costs ~1.3% of ratio and saves ~13 MiB (docs/performance.md).
                zstd.set_parameter(zstd::stream::raw::CParameter::JobSize(1 << 20))
                    .map_err(|e| Error::io("setting zstd's job size", e))?;
                Compressor::Zstd(zstd)
            }
            Compression::Gzip => Compressor::Gzip(flate2::write::GzEncoder::new(
                sealed,
                flate2::Compression::new(level as u32),
            )),
            Compression::None => Compressor::None(sealed),
        };
        Ok(Encoder {
            inner,
            content_bytes: 0,
            progress,
        })
    }

    /// Ends compression and encryption; the stored bytes are then complete in `inner`.
    pub fn finish(mut self) -> Result<Encoded<W>> {
        self.progress.finish();
        let sealed = self.inner.finish().map_err(|e| from_io("writing the artifact", e))?;
        let mut hashed = sealed.finish().map_err(|e| from_io("writing the artifact", e))?;
        hashed.flush().map_err(|e| from_io("writing the artifact", e))?;
        Ok(Encoded {
            bytes: hashed.tally.bytes.get(),
            sha256: hashed.tally.hex(),
            content_bytes: self.content_bytes,
            inner: hashed.inner,
        })
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.content_bytes += n as u64;
        self.progress.add(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The innermost reader: hashes the stored bytes, and turns the store's own read errors
/// into bk errors so they are not mistaken for corrupt data further up.
struct HashReader {
    inner: Box<dyn Read>,
    tally: Rc<Tally>,
    what: String,
}

impl Read for HashReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self
            .inner
            .read(buf)
            .map_err(|e| io::Error::from(from_io(format!("reading {}", self.what), e)))?;
        self.tally.add(&buf[..n]);
        Ok(n)
    }
}

/// Stored bytes in, content out; checks the stored bytes against the manifest at the end.
pub struct Decoder {
    inner: Box<dyn Read>,
    tally: Rc<Tally>,
    file: String,
    content_bytes: u64,
    progress: Progress,
}

impl Decoder {
    pub fn new(raw: Box<dyn Read>, artifact: &Artifact, identities: &Identities, progress: Progress) -> Result<Self> {
        let tally = Rc::new(Tally::default());
        let hashed = HashReader {
            inner: raw,
            tally: tally.clone(),
            what: artifact.file.clone(),
        };
        let file = &artifact.file;
        let opened: Box<dyn Read> = match &artifact.encryption {
            None => Box::new(hashed),
            Some(enc) => {
                if identities.is_empty() {
                    return Err(Error::usage(format!(
                        "{file} is encrypted to {}; give --identity FILE",
                        enc.recipients.join(", ")
                    )));
                }
                let decryptor = age::Decryptor::new(hashed).map_err(|e| decrypt_error(file, enc, e))?;
                let ids = identities.iter().map(|i| i.as_ref() as &dyn age::Identity);
                Box::new(decryptor.decrypt(ids).map_err(|e| decrypt_error(file, enc, e))?)
            }
        };
        let buffered = io::BufReader::with_capacity(128 * 1024, opened);
        let inner: Box<dyn Read> = match artifact.compression {
            Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(|e| Error::io("starting zstd", e))?)
            }
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
            Compression::None => Box::new(buffered),
        };
        Ok(Decoder {
            inner,
            tally,
            file: file.clone(),
            content_bytes: 0,
            progress,
        })
    }

    /// Reads what the consumer left (tar's padding, say) and checks the stored bytes'
    /// size and sha256 against the manifest: exit 65 on any difference.
    pub fn finish(mut self, artifact: &Artifact) -> Result<u64> {
        io::copy(&mut self, &mut io::sink()).map_err(|e| from_io(format!("decoding {}", self.file), e))?;
        self.progress.finish();
        check_digest(artifact, self.tally.bytes.get(), &self.tally.hex())?;
        Ok(self.content_bytes)
    }
}

/// Reads `input` to its end, a chunk at a time, handing each to `each` (which may fail, as a
/// write of the same bytes elsewhere does). `reading` names the input in its errors.
pub fn read_chunks(input: &mut dyn Read, reading: &str, mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => each(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(from_io(reading, e)),
        }
    }
}

/// The sha256 (hex) and the size of what passes through [`read_chunks`] to `each`.
pub fn sha256_through(
    input: &mut dyn Read,
    reading: &str,
    mut each: impl FnMut(&[u8]) -> Result<()>,
) -> Result<(String, u64)> {
    let (mut sha, mut bytes) = (Sha256::new(), 0u64);
    read_chunks(input, reading, |chunk| {
        sha.update(chunk);
        bytes += chunk.len() as u64;
        each(chunk)
    })?;
    Ok((hex::encode(sha.finalize()), bytes))
}

/// The sha256 (hex) and the size of what a reader gives, to its end.
pub fn sha256_of(input: &mut dyn Read, reading: &str) -> Result<(String, u64)> {
    sha256_through(input, reading, |_| Ok(()))
}

/// Compares what was read of an artifact with its manifest: exit 65 on any difference.
pub fn check_digest(artifact: &Artifact, bytes: u64, sha256: &str) -> Result<()> {
    if bytes != artifact.bytes {
        return Err(Error::data(format!(
            "{}: {bytes} bytes stored, the manifest says {}: truncated or altered",
            artifact.file, artifact.bytes
        )));
    }
    if sha256 != artifact.sha256 {
        return Err(Error::data(format!(
            "{}: sha256 mismatch: the stored bytes hash to {sha256}, the manifest says {}",
            artifact.file, artifact.sha256
        )));
    }
    Ok(())
}

impl Read for Decoder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| {
            if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
                e
            } else {
                Error::data(format!("{}: corrupt or truncated data: {e}", self.file)).into()
            }
        })?;
        self.content_bytes += n as u64;
        self.progress.add(n as u64);
        Ok(n)
    }
}

fn decrypt_error(file: &str, enc: &Encryption, e: age::DecryptError) -> Error {
    match e {
        age::DecryptError::NoMatchingKeys => Error::data(format!(
            "{file}: no identity given can decrypt it (it is encrypted to {})",
            enc.recipients.join(", ")
        )),
        age::DecryptError::Io(io) => from_io(format!("reading {file}"), io),
        other => Error::data(format!("{file}: cannot decrypt: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Source, ToolInfo};
    use age::secrecy::ExposeSecret;

    fn artifact_for(encoded: &Encoded<Vec<u8>>, compression: Compression, enc: Option<Encryption>) -> Artifact {
        Artifact {
            id: "t.20260101T000000Z".into(),
            name: "t".into(),
            engine: "command".into(),
            source: Source::default(),
            started: String::new(),
            finished: String::new(),
            file: "t.raw".into(),
            format: "raw".into(),
            compression,
            encryption: enc,
            bytes: encoded.bytes,
            sha256: encoded.sha256.clone(),
            content_bytes: encoded.content_bytes,
            counts: Default::default(),
            tool: ToolInfo {
                program: "test".into(),
                version: "0".into(),
            },
            bk_version: "0".into(),
            level: None,
            parent: None,
            chain: None,
            location: String::new(),
        }
    }

    fn encode(data: &[u8], options: &EncodeOptions) -> Encoded<Vec<u8>> {
        let mut enc = Encoder::new(Vec::new(), options, Progress::hidden()).unwrap();
        // Odd-sized writes, as a tar or dump stream does.
        for chunk in data.chunks(7919) {
            enc.write_all(chunk).unwrap();
        }
        enc.finish().unwrap()
    }

    fn decode(stored: Vec<u8>, artifact: &Artifact, ids: &Identities) -> Result<Vec<u8>> {
        let mut dec = Decoder::new(Box::new(io::Cursor::new(stored)), artifact, ids, Progress::hidden())?;
        let mut out = Vec::new();
        dec.read_to_end(&mut out).map_err(|e| from_io("decoding", e))?;
        let content = dec.finish(artifact)?;
        assert_eq!(content, out.len() as u64);
        Ok(out)
    }

    fn sample() -> Vec<u8> {
        (0..300_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect()
    }

    #[test]
    fn sha256_of_a_reader_gives_digest_and_size() {
        let data = vec![7u8; 300 * 1024]; // more than one chunk
        let (sha, bytes) = sha256_of(&mut &data[..], "reading data").unwrap();
        assert_eq!((sha, bytes), (hex::encode(Sha256::digest(&data)), data.len() as u64));
        let mut copy = Vec::new();
        let through = sha256_through(&mut &data[..], "reading data", |b| {
            copy.extend_from_slice(b);
            Ok(())
        });
        assert_eq!(through.unwrap().1, data.len() as u64);
        assert_eq!(copy, data);
        let failing = sha256_through(&mut &data[..], "reading data", |_| Err(Error::data("stop")));
        assert_eq!(failing.unwrap_err().message, "stop");
    }

    #[test]
    fn every_compression_round_trips_with_sizes_and_sha() {
        let data = sample();
        for compression in [Compression::Zstd, Compression::Gzip, Compression::None] {
            let options = EncodeOptions {
                compression,
                level: None,
                recipients: vec![],
            };
            let encoded = encode(&data, &options);
            assert_eq!(encoded.content_bytes, data.len() as u64);
            assert_eq!(encoded.bytes, encoded.inner.len() as u64);
            assert_eq!(encoded.sha256, hex::encode(Sha256::digest(&encoded.inner)));
            let artifact = artifact_for(&encoded, compression, None);
            assert_eq!(
                decode(encoded.inner, &artifact, &vec![]).unwrap(),
                data,
                "{compression:?}"
            );
        }
    }

    #[test]
    fn age_round_trip_and_wrong_identity() {
        let key = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let options = EncodeOptions {
            compression: Compression::Zstd,
            level: Some(5),
            recipients: vec![key.to_public()],
        };
        let encoded = encode(&sample(), &options);
        let artifact = artifact_for(&encoded, Compression::Zstd, options.encryption());
        let right: Identities = vec![Box::new(key.clone())];
        assert_eq!(decode(encoded.inner.clone(), &artifact, &right).unwrap(), sample());
        let wrong: Identities = vec![Box::new(other)];
        let e = decode(encoded.inner.clone(), &artifact, &wrong).unwrap_err();
        assert_eq!(e.exit_code(), 65);
        assert!(e.message.contains("no identity given can decrypt it"), "{}", e.message);
        let e = decode(encoded.inner, &artifact, &vec![]).unwrap_err();
        assert!(e.message.contains("give --identity"), "{}", e.message);
        assert!(key.to_string().expose_secret().starts_with("AGE-SECRET-KEY-"));
    }

    #[test]
    fn corruption_is_caught_as_bad_data() {
        let options = EncodeOptions {
            compression: Compression::Zstd,
            level: None,
            recipients: vec![],
        };
        let encoded = encode(&sample(), &options);
        let artifact = artifact_for(&encoded, Compression::Zstd, None);
        let mut flipped = encoded.inner.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x10;
        assert_eq!(decode(flipped, &artifact, &vec![]).unwrap_err().exit_code(), 65);
        let truncated = encoded.inner[..encoded.inner.len() - 100].to_vec();
        let e = decode(truncated, &artifact, &vec![]).unwrap_err();
        assert_eq!(e.exit_code(), 65, "{}", e.message);
        // Uncompressed: only the sha256 can tell.
        let options = EncodeOptions {
            compression: Compression::None,
            level: None,
            recipients: vec![],
        };
        let encoded = encode(b"hello world", &options);
        let artifact = artifact_for(&encoded, Compression::None, None);
        let e = decode(b"hello World".to_vec(), &artifact, &vec![]).unwrap_err();
        assert!(e.message.contains("sha256 mismatch"), "{}", e.message);
    }

    #[test]
    fn levels_are_checked() {
        assert_eq!(Compression::Zstd.level(Some(25)).unwrap_err().exit_code(), 64);
        assert_eq!(Compression::Gzip.level(None).unwrap(), 6);
        assert!(Compression::None.level(Some(3)).is_err());
    }
}
