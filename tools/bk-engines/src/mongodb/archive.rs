//! mongodump's archive format (`mongodump --archive`; mongo-tools common/archive/spec.md),
//! written and read as a stream:
//!
//! ```text
//! magic (6D E2 99 81), header document, one collection-metadata document per namespace
//! (the prelude), terminator (FF FF FF FF), then blocks: a namespace header {db, collection,
//! EOF: false, CRC: 0}, documents, terminator; and per namespace once, an EOF header
//! {..., EOF: true, CRC: CRC-64/XZ of all its documents' bytes}, terminator.
//! ```
//!
//! The writer produces what mongodump produces (one segment per namespace, in prelude order,
//! an empty one for an empty collection or a view); the reader also takes interleaved
//! segments, as mongodump writes them with several collections in parallel. The reader
//! trusts nothing: every length is checked before anything is allocated, every document is
//! decoded element by element, every CRC and every namespace's EOF checked; any fault is a
//! `Kind::Data` error (65), never a panic.

use std::collections::BTreeMap;
use std::io::{ErrorKind as IoKind, Read, Write};

use bson::{rawdoc, RawBsonRef, RawDocument, RawDocumentBuf};
use crc_fast::{CrcAlgorithm, Digest};

use bk_core::error::{Error, Kind, Result};

/// `0x8199e26d`, little-endian.
const MAGIC: [u8; 4] = [0x6d, 0xe2, 0x99, 0x81];
/// Ends the prelude and every block: an int32 -1 where a document's length would be.
const TERMINATOR: [u8; 4] = [0xff; 4];
/// The archive format version mongodump writes in its header.
const FORMAT_VERSION: &str = "0.1";
/// The largest document mongorestore reads (and MongoDB stores): 16 MiB.
pub const MAX_DOCUMENT: usize = 16 * 1024 * 1024;
/// A BSON document's smallest length: the int32 length and the closing NUL.
const MIN_DOCUMENT: usize = 5;

/// The archive's header, as far as bk uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The server's version (buildInfo), which mongorestore compares with its target's.
    pub server_version: String,
    /// The program that wrote the archive.
    pub tool_version: String,
}

/// One namespace of the prelude: a collection or a view, with mongodump's metadata JSON
/// (options, indexes, uuid) for the restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub db: String,
    pub collection: String,
    /// Canonical Extended JSON: {options, indexes, uuid, collectionName, type}.
    pub metadata: String,
    /// listCollections' type: "collection", "view" or "timeseries".
    pub kind: String,
}

impl Namespace {
    /// `db.collection`, the key of the counts.
    pub fn name(&self) -> String {
        format!("{}.{}", self.db, self.collection)
    }

    /// A view holds no documents of its own; it is not counted.
    pub fn is_view(&self) -> bool {
        self.kind == "view"
    }
}

fn crc64() -> Digest {
    Digest::new(CrcAlgorithm::Crc64Xz)
}

fn write_all(out: &mut dyn Write, bytes: &[u8]) -> Result<()> {
    out.write_all(bytes)
        .map_err(|e| bk_core::error::from_io("writing the archive", e))
}

/// The namespace header or EOF header of a block; the CRC is stored as the int64 of its bits.
fn block_header(db: &str, collection: &str, eof: bool, crc: u64) -> RawDocumentBuf {
    rawdoc! { "db": db, "collection": collection, "EOF": eof, "CRC": crc as i64 }
}

/// The namespace a writer's segment is open for.
struct Segment {
    db: String,
    collection: String,
    crc: Digest,
    count: u64,
}

/// Writes an archive as mongodump does: [`ArchiveWriter::start`] writes everything up to the
/// end of the prelude; then each namespace of the prelude, in its order, gets
/// [`ArchiveWriter::begin`], its documents and [`ArchiveWriter::end`].
pub struct ArchiveWriter<'a> {
    out: &'a mut dyn Write,
    segment: Option<Segment>,
}

impl<'a> ArchiveWriter<'a> {
    pub fn start(out: &'a mut dyn Write, header: &Header, prelude: &[Namespace]) -> Result<Self> {
        write_all(out, &MAGIC)?;
        // concurrent_collections: bk writes one collection at a time.
        let header = rawdoc! {
            "concurrent_collections": 1i32,
            "version": FORMAT_VERSION,
            "server_version": header.server_version.as_str(),
            "tool_version": header.tool_version.as_str(),
        };
        write_all(out, header.as_bytes())?;
        for ns in prelude {
            // size: mongodump always writes 0 (the prelude precedes the data).
            let meta = rawdoc! {
                "db": ns.db.as_str(),
                "collection": ns.collection.as_str(),
                "metadata": ns.metadata.as_str(),
                "size": 0i32,
                "type": ns.kind.as_str(),
            };
            write_all(out, meta.as_bytes())?;
        }
        write_all(out, &TERMINATOR)?;
        Ok(ArchiveWriter { out, segment: None })
    }

    /// Opens the segment of a namespace.
    pub fn begin(&mut self, db: &str, collection: &str) -> Result<()> {
        if let Some(open) = &self.segment {
            return Err(Error::new(
                Kind::Internal,
                format!(
                    "archive: {}.{} begun while {}.{} is open",
                    db, collection, open.db, open.collection
                ),
            ));
        }
        write_all(self.out, block_header(db, collection, false, 0).as_bytes())?;
        self.segment = Some(Segment {
            db: db.to_string(),
            collection: collection.to_string(),
            crc: crc64(),
            count: 0,
        });
        Ok(())
    }

    /// Appends one document, as its raw bytes, to the open segment.
    pub fn document(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(segment) = self.segment.as_mut() else {
            return Err(Error::new(Kind::Internal, "archive: a document outside any segment"));
        };
        // The archive's reader (mongorestore's too) would refuse it: it never goes in.
        let declared = bytes
            .get(..4)
            .map(|l| i32::from_le_bytes(l.try_into().expect("4 bytes")));
        if !(MIN_DOCUMENT..=MAX_DOCUMENT).contains(&bytes.len()) || declared != Some(bytes.len() as i32) {
            return Err(Error::data(format!(
                "{}.{}: a document of {} bytes is not a BSON document of at most 16 MiB",
                segment.db,
                segment.collection,
                bytes.len()
            )));
        }
        write_all(self.out, bytes)?;
        segment.crc.update(bytes);
        segment.count += 1;
        Ok(())
    }

    /// Closes the open segment with the namespace's EOF block; returns its document count.
    pub fn end(&mut self) -> Result<u64> {
        let Some(segment) = self.segment.take() else {
            return Err(Error::new(Kind::Internal, "archive: end without begin"));
        };
        write_all(self.out, &TERMINATOR)?;
        let eof = block_header(&segment.db, &segment.collection, true, segment.crc.finalize());
        write_all(self.out, eof.as_bytes())?;
        write_all(self.out, &TERMINATOR)?;
        Ok(segment.count)
    }
}

/// What [`ArchiveReader::next_event`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A document of the prelude's namespace at this index, as its raw bytes (decoded and
    /// checked, its length and CRC accounted for).
    Document { namespace: usize, bytes: &'a [u8] },
    /// The namespace at this index is complete: its EOF came and its CRC matched.
    End { namespace: usize, count: u64 },
}

/// Per namespace of the prelude, what the reader has seen of it.
struct Progress {
    crc: Digest,
    count: u64,
    closed: bool,
}

/// Where the reader is between two calls of `next_event`.
enum State {
    /// Before a namespace header, or at the end of the archive.
    BetweenBlocks,
    /// Inside a segment of documents of this namespace.
    InSegment(usize),
    Finished,
}

/// Reads an archive as it streams: [`ArchiveReader::open`] reads the header and the prelude,
/// then [`ArchiveReader::next_event`] yields each document and each namespace's end, and `None`
/// once every namespace of the prelude is complete and the stream has ended.
pub struct ArchiveReader<R: Read> {
    input: R,
    /// Bytes consumed so far, for the messages.
    offset: u64,
    header: Header,
    prelude: Vec<Namespace>,
    progress: Vec<Progress>,
    state: State,
    /// The current document; never longer than MAX_DOCUMENT.
    buffer: Vec<u8>,
}

/// A length field read where a document or a terminator may stand.
enum Block {
    Document,
    Terminator,
    /// The stream ended cleanly before this block.
    End,
}

fn string_field(doc: &RawDocument, key: &str, what: &str) -> Result<String> {
    doc.get_str(key)
        .map(str::to_string)
        .map_err(|e| Error::data(format!("the {what} has no string {key:?}: {e}")))
}

impl<R: Read> ArchiveReader<R> {
    pub fn open(input: R) -> Result<Self> {
        let mut reader = ArchiveReader {
            input,
            offset: 0,
            header: Header {
                server_version: String::new(),
                tool_version: String::new(),
            },
            prelude: Vec::new(),
            progress: Vec::new(),
            state: State::BetweenBlocks,
            buffer: Vec::new(),
        };
        let mut magic = [0; 4];
        if !reader.fill(&mut magic)? || magic != MAGIC {
            return Err(Error::data("not a mongodump archive (no archive magic number)"));
        }
        let Block::Document = reader.block()? else {
            return Err(reader.fault("the archive has no header"));
        };
        let header = RawDocument::from_bytes(&reader.buffer).map_err(|e| reader.fault(format!("header: {e}")))?;
        let version = string_field(header, "version", "header")?;
        if version != FORMAT_VERSION {
            return Err(reader.fault(format!("archive format version {version:?}, not {FORMAT_VERSION}")));
        }
        // Archives of mongodump before 3.4 say neither.
        let optional = |key| header.get_str(key).unwrap_or_default().to_string();
        reader.header = Header {
            server_version: optional("server_version"),
            tool_version: optional("tool_version"),
        };
        loop {
            match reader.block()? {
                Block::Terminator => break,
                Block::End => return Err(reader.fault("truncated in the prelude")),
                Block::Document => {
                    let doc =
                        RawDocument::from_bytes(&reader.buffer).map_err(|e| reader.fault(format!("prelude: {e}")))?;
                    let what = "collection metadata";
                    let ns = Namespace {
                        db: string_field(doc, "db", what)?,
                        collection: string_field(doc, "collection", what)?,
                        metadata: string_field(doc, "metadata", what)?,
                        // mongodump before 4.x wrote no type.
                        kind: doc.get_str("type").unwrap_or_default().to_string(),
                    };
                    if reader.find(&ns.db, &ns.collection).is_some() {
                        return Err(reader.fault(format!("{} appears twice in the prelude", ns.name())));
                    }
                    reader.prelude.push(ns);
                    reader.progress.push(Progress {
                        crc: crc64(),
                        count: 0,
                        closed: false,
                    });
                }
            }
        }
        Ok(reader)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The namespaces of the prelude, in its order (the events' indexes).
    pub fn prelude(&self) -> &[Namespace] {
        &self.prelude
    }

    /// Documents per `db.collection` so far (every collection's, once `next_event` gave `None`);
    /// views are not counted.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.prelude
            .iter()
            .zip(&self.progress)
            .filter(|(ns, _)| !ns.is_view())
            .map(|(ns, p)| (ns.name(), p.count))
            .collect()
    }

    /// The document of the last [`Event::Document`], taken rather than copied: a restore
    /// hands it to the driver, so that a 16 MiB document is not held twice.
    pub fn take_document(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }

    pub fn next_event(&mut self) -> Result<Option<Event<'_>>> {
        loop {
            match self.state {
                State::Finished => return Ok(None),
                State::InSegment(namespace) => match self.block()? {
                    Block::Terminator => self.state = State::BetweenBlocks,
                    Block::End => return Err(self.truncated()),
                    Block::Document => {
                        check_document(&self.buffer).map_err(|e| self.fault(e))?;
                        let progress = &mut self.progress[namespace];
                        progress.crc.update(&self.buffer);
                        progress.count += 1;
                        return Ok(Some(Event::Document {
                            namespace,
                            bytes: &self.buffer,
                        }));
                    }
                },
                State::BetweenBlocks => match self.block()? {
                    Block::End => {
                        if let Some(open) = self.progress.iter().position(|p| !p.closed) {
                            return Err(self.fault(format!(
                                "truncated: the archive ends before the end of {}",
                                self.prelude[open].name()
                            )));
                        }
                        self.state = State::Finished;
                    }
                    Block::Terminator => return Err(self.fault("a terminator where a namespace header must be")),
                    Block::Document => {
                        let (namespace, eof, crc) = self.block_header()?;
                        if !eof {
                            self.state = State::InSegment(namespace);
                            continue;
                        }
                        match self.block()? {
                            Block::Terminator => {}
                            Block::End => return Err(self.truncated()),
                            Block::Document => return Err(self.fault("documents after an EOF header")),
                        }
                        let progress = &mut self.progress[namespace];
                        progress.closed = true;
                        let (found, count) = (progress.crc.finalize(), progress.count);
                        if found != crc {
                            return Err(self.fault(format!(
                                "CRC mismatch for {}: the archive says {crc:016x}, its documents give {found:016x}",
                                self.prelude[namespace].name()
                            )));
                        }
                        return Ok(Some(Event::End { namespace, count }));
                    }
                },
            }
        }
    }

    /// Reads the archive to its end, for its counts.
    pub fn read_to_end(mut self) -> Result<BTreeMap<String, u64>> {
        while self.next_event()?.is_some() {}
        Ok(self.counts())
    }

    /// The namespace header in the buffer: its namespace's index, EOF and CRC.
    fn block_header(&self) -> Result<(usize, bool, u64)> {
        let doc = RawDocument::from_bytes(&self.buffer).map_err(|e| self.fault(format!("namespace header: {e}")))?;
        let what = "namespace header";
        let (db, collection) = (string_field(doc, "db", what)?, string_field(doc, "collection", what)?);
        let eof = doc
            .get_bool("EOF")
            .map_err(|e| self.fault(format!("{what}: EOF: {e}")))?;
        let crc = doc
            .get_i64("CRC")
            .map_err(|e| self.fault(format!("{what}: CRC: {e}")))? as u64;
        let Some(namespace) = self.find(&db, &collection) else {
            return Err(self.fault(format!("data for {db}.{collection}, which the prelude does not list")));
        };
        if self.progress[namespace].closed {
            return Err(self.fault(format!("data for {db}.{collection} after its EOF")));
        }
        Ok((namespace, eof, crc))
    }

    fn find(&self, db: &str, collection: &str) -> Option<usize> {
        self.prelude
            .iter()
            .position(|ns| ns.db == db && ns.collection == collection)
    }

    fn fault(&self, what: impl std::fmt::Display) -> Error {
        Error::data(format!("mongo archive, byte {}: {what}", self.offset))
    }

    fn truncated(&self) -> Error {
        self.fault("truncated inside a block")
    }

    /// Fills `buf`; false if the stream ended before its first byte, an error if it ended
    /// after.
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool> {
        let mut read = 0;
        while read < buf.len() {
            match self.input.read(&mut buf[read..]) {
                Ok(0) if read == 0 => return Ok(false),
                Ok(0) => {
                    self.offset += read as u64;
                    return Err(self.fault("truncated"));
                }
                Ok(n) => read += n,
                Err(e) if e.kind() == IoKind::Interrupted => {}
                Err(e) => return Err(bk_core::error::from_io("reading the archive", e)),
            }
        }
        self.offset += read as u64;
        Ok(true)
    }

    /// Reads a length and, for a document, the document into the buffer.
    fn block(&mut self) -> Result<Block> {
        let mut length = [0; 4];
        if !self.fill(&mut length)? {
            return Ok(Block::End);
        }
        if length == TERMINATOR {
            return Ok(Block::Terminator);
        }
        let size = i32::from_le_bytes(length);
        let Some(size) = usize::try_from(size)
            .ok()
            .filter(|s| (MIN_DOCUMENT..=MAX_DOCUMENT).contains(s))
        else {
            return Err(self.fault(format!("{size} is neither a BSON document's length nor a terminator")));
        };
        self.buffer.clear();
        self.buffer.extend_from_slice(&length);
        self.buffer.resize(size, 0);
        let mut rest = std::mem::take(&mut self.buffer);
        let filled = self.fill(&mut rest[4..]);
        self.buffer = rest;
        if !filled? {
            return Err(self.truncated());
        }
        if self.buffer[size - 1] != 0 {
            return Err(self.fault("a document that does not end with NUL"));
        }
        Ok(Block::Document)
    }
}

/// Decodes every element of a document, nested documents and arrays included (strings as
/// UTF-8, lengths within their parents), without building anything.
pub fn check_document(bytes: &[u8]) -> std::result::Result<(), String> {
    fn malformed(e: bson::error::Error) -> String {
        format!("a malformed document: {e}")
    }
    fn walk(value: RawBsonRef, depth: usize) -> std::result::Result<(), String> {
        // MongoDB nests at most 100 levels (180 with its own margin); bound the recursion.
        if depth > 200 {
            return Err("a document nested more than 200 levels deep".into());
        }
        match value {
            RawBsonRef::Document(d) => d.iter().try_for_each(|e| walk(e.map_err(malformed)?.1, depth + 1)),
            RawBsonRef::Array(a) => a.into_iter().try_for_each(|v| walk(v.map_err(malformed)?, depth + 1)),
            RawBsonRef::JavaScriptCodeWithScope(c) => walk(RawBsonRef::Document(c.scope), depth + 1),
            _ => Ok(()),
        }
    }
    walk(
        RawBsonRef::Document(RawDocument::from_bytes(bytes).map_err(malformed)?),
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// mongo-probes/example.archive of the design note (§1.4), made by pymongo's encoder.
    const GOLDEN: &[u8] = include_bytes!("testdata/example.archive");
    const GOLDEN_METADATA: &str = r#"{"indexes":[{"v":{"$numberInt":"2"},"key":{"_id":{"$numberInt":"1"}},"name":"_id_"},{"v":{"$numberInt":"2"},"key":{"sku":{"$numberInt":"1"}},"name":"sku_1"}],"uuid":"0679db720f4944de90ae27472664e94a","collectionName":"items","type":"collection"}"#;

    fn shop_items() -> Namespace {
        Namespace {
            db: "shop".into(),
            collection: "items".into(),
            metadata: GOLDEN_METADATA.into(),
            kind: "collection".into(),
        }
    }

    fn header() -> Header {
        Header {
            server_version: "7.0.0".into(),
            tool_version: "bk 0.1.0".into(),
        }
    }

    /// An archive of `namespaces`, each with its documents.
    fn archive(namespaces: &[(Namespace, Vec<RawDocumentBuf>)]) -> Vec<u8> {
        let mut out = Vec::new();
        let prelude: Vec<Namespace> = namespaces.iter().map(|(ns, _)| ns.clone()).collect();
        let mut writer = ArchiveWriter::start(&mut out, &header(), &prelude).unwrap();
        for (ns, docs) in namespaces {
            writer.begin(&ns.db, &ns.collection).unwrap();
            for d in docs {
                writer.document(d.as_bytes()).unwrap();
            }
            assert_eq!(writer.end().unwrap(), docs.len() as u64);
        }
        out
    }

    /// Every document (namespace, bytes) and end (namespace, count) a reader yields, and its counts.
    type Yielded = (Vec<(usize, Vec<u8>)>, Vec<(usize, u64)>, BTreeMap<String, u64>);

    fn read(bytes: &[u8]) -> Result<Yielded> {
        let mut reader = ArchiveReader::open(bytes)?;
        let (mut docs, mut ends) = (Vec::new(), Vec::new());
        while let Some(event) = reader.next_event()? {
            match event {
                Event::Document { namespace, bytes } => docs.push((namespace, bytes.to_vec())),
                Event::End { namespace, count } => ends.push((namespace, count)),
            }
        }
        Ok((docs, ends, reader.counts()))
    }

    #[test]
    fn crc_is_crc64_xz() {
        let mut d = crc64();
        d.update(b"123456789");
        assert_eq!(d.finalize(), 0x995D_C9BB_DF19_39FA);
        assert_eq!(crc64().finalize(), 0);
    }

    #[test]
    fn writes_the_golden_archive_byte_for_byte() {
        let docs = vec![rawdoc! {"_id": 1, "sku": "a1"}, rawdoc! {"_id": 2, "sku": "b2"}];
        let written = archive(&[(shop_items(), docs.clone())]);
        assert_eq!(written, GOLDEN);
        let (read_docs, ends, counts) = read(GOLDEN).unwrap();
        let expected: Vec<_> = docs.iter().map(|d| (0, d.as_bytes().to_vec())).collect();
        assert_eq!(read_docs, expected);
        assert_eq!(ends, vec![(0, 2)]);
        assert_eq!(counts, BTreeMap::from([("shop.items".to_string(), 2)]));
        let reader = ArchiveReader::open(GOLDEN).unwrap();
        assert_eq!(reader.header(), &header());
        assert_eq!(reader.prelude(), &[shop_items()]);
    }

    #[test]
    fn empty_collections_and_views_get_an_empty_block() {
        let view = Namespace {
            collection: "v".into(),
            kind: "view".into(),
            ..shop_items()
        };
        let bytes = archive(&[(view, vec![])]);
        let block = [
            block_header("shop", "v", false, 0).as_bytes(),
            &TERMINATOR,
            block_header("shop", "v", true, 0).as_bytes(),
            &TERMINATOR,
        ]
        .concat();
        assert!(bytes.ends_with(&block));
        let (docs, ends, counts) = read(&bytes).unwrap();
        assert!(docs.is_empty());
        assert_eq!(ends, vec![(0, 0)]);
        assert!(counts.is_empty(), "views are not counted: {counts:?}");
    }

    /// Every BSON type, the ones nx-27017 refuses or alters included, comes back byte for byte.
    #[test]
    fn every_bson_type_round_trips_byte_for_byte() {
        use bson::spec::BinarySubtype;
        use bson::{Binary, DateTime, Decimal128, Regex, Timestamp};
        let doc = rawdoc! {
            "double": 1.5, "nan": f64::NAN, "inf": f64::NEG_INFINITY, "negzero": -0.0,
            "string": "é 😀", "empty": "",
            "doc": { "b": 1, "a": { "deep": [1, "x", { "z": null }] } },
            "array": [1, 2.5, "three"],
            "binary": Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 1, 2] },
            "uuid": Binary { subtype: BinarySubtype::Uuid, bytes: vec![7; 16] },
            "oid": bson::oid::ObjectId::from_bytes([1; 12]),
            "true": true, "false": false,
            "date": DateTime::from_millis(-62_135_596_800_001),
            "far": DateTime::from_millis(i64::MAX),
            "null": null,
            "regex": Regex { pattern: "^a.*".try_into().unwrap(), options: "im".try_into().unwrap() },
            "code": bson::RawBson::JavaScriptCode("function() {}".into()),
            "symbol": bson::RawBson::Symbol("sym".into()),
            "scope": bson::RawJavaScriptCodeWithScope { code: "x".into(), scope: rawdoc! {"x": 1} },
            "int32": 7, "int64small": 7i64, "int64": i64::MIN,
            "timestamp": Timestamp { time: 1, increment: 2 },
            "decimal": Decimal128::from_bytes([3; 16]),
            "min": bson::RawBson::MinKey, "max": bson::RawBson::MaxKey,
            "undefined": bson::RawBson::Undefined,
        };
        // bson has no public constructor of a DBPointer: {"p": DBPointer("db.c", 02 * 12)}
        let mut pointer = vec![0x0c, b'p', 0, 5, 0, 0, 0];
        pointer.extend_from_slice(b"db.c\0");
        pointer.extend_from_slice(&[2; 12]);
        let pointer = [&((4 + pointer.len() + 1) as i32).to_le_bytes()[..], &pointer, &[0]].concat();
        let pointer = RawDocumentBuf::from_bytes(pointer).unwrap();
        let docs = vec![doc, pointer, rawdoc! {}];
        let (read_docs, _, counts) = read(&archive(&[(shop_items(), docs.clone())])).unwrap();
        for (read, written) in read_docs.iter().zip(&docs) {
            assert_eq!(read.1, written.as_bytes());
        }
        assert_eq!(counts["shop.items"], 3);
    }

    #[test]
    fn interleaved_segments_are_read() {
        let (a, b) = (
            shop_items(),
            Namespace {
                collection: "other".into(),
                ..shop_items()
            },
        );
        let mut out = Vec::new();
        ArchiveWriter::start(&mut out, &header(), &[a.clone(), b.clone()]).unwrap();
        let docs = [rawdoc! {"_id": 1}, rawdoc! {"_id": 2}, rawdoc! {"_id": 3}];
        let mut crc_a = crc64();
        // a: doc 1; b: doc 2; a: doc 3; then both EOFs, b first.
        for (ns, doc) in [(&a, &docs[0]), (&b, &docs[1]), (&a, &docs[2])] {
            out.extend_from_slice(block_header(&ns.db, &ns.collection, false, 0).as_bytes());
            out.extend_from_slice(doc.as_bytes());
            out.extend_from_slice(&TERMINATOR);
        }
        crc_a.update(docs[0].as_bytes());
        crc_a.update(docs[2].as_bytes());
        let mut crc_b = crc64();
        crc_b.update(docs[1].as_bytes());
        for (ns, crc) in [(&b, crc_b.finalize()), (&a, crc_a.finalize())] {
            out.extend_from_slice(block_header(&ns.db, &ns.collection, true, crc).as_bytes());
            out.extend_from_slice(&TERMINATOR);
        }
        let (read_docs, ends, counts) = read(&out).unwrap();
        assert_eq!(read_docs.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [0, 1, 0]);
        assert_eq!(ends, [(1, 1), (0, 2)]);
        assert_eq!(
            counts,
            BTreeMap::from([("shop.items".into(), 2), ("shop.other".into(), 1)])
        );
    }

    #[test]
    fn the_writer_refuses_what_is_not_a_document() {
        let mut out = Vec::new();
        let mut writer = ArchiveWriter::start(&mut out, &header(), &[shop_items()]).unwrap();
        writer.begin("shop", "items").unwrap();
        for bad in [&b""[..], b"\x05\x00\x00", b"\x06\x00\x00\x00\x00"] {
            assert_eq!(writer.document(bad).unwrap_err().kind, Kind::Data);
        }
    }

    /// A table of corruptions of the golden archive: each is a Data error, never a panic.
    #[test]
    fn corruptions_are_data_errors() {
        let golden = GOLDEN.to_vec();
        let at = |offset: usize, bytes: &[u8]| {
            let mut b = golden.clone();
            b[offset..offset + bytes.len()].copy_from_slice(bytes);
            b
        };
        let with = |tail: &[u8]| [GOLDEN, tail].concat();
        let first_doc = 0x1f5;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "magic"),
            ("bad magic", at(0, b"\x6d\xe2\x99\x82"), "magic"),
            ("no header", golden[..4].to_vec(), "no header"),
            (
                "a flipped byte in a document",
                at(first_doc + 12, b"\x07"),
                "CRC mismatch",
            ),
            ("a flipped CRC", at(0x268 - 2, b"\x00"), "CRC mismatch"),
            ("truncated before the EOF", golden[..0x22d].to_vec(), "truncated"),
            (
                "truncated in a document",
                golden[..first_doc + 10].to_vec(),
                "truncated",
            ),
            ("truncated in a length", golden[..first_doc + 2].to_vec(), "truncated"),
            (
                "cut before the last terminator",
                golden[..golden.len() - 4].to_vec(),
                "truncated",
            ),
            ("a length of 4", at(first_doc, &4i32.to_le_bytes()), "neither"),
            (
                "a length of 16 MiB + 1",
                at(first_doc, &(MAX_DOCUMENT as i32 + 1).to_le_bytes()),
                "neither",
            ),
            ("a negative length", at(first_doc, &(-2i32).to_le_bytes()), "neither"),
            ("a document without its NUL", at(first_doc + 25, b"\x01"), "NUL"),
            ("a malformed element", at(first_doc + 4, b"\x55"), "malformed"),
            ("a doubled terminator", with(&TERMINATOR), "terminator"),
            ("trailing garbage", with(b"\x01\x02"), "truncated"),
            (
                "data after the EOF",
                with(block_header("shop", "items", false, 0).as_bytes()),
                "after its EOF",
            ),
            (
                "an unknown namespace",
                with(block_header("shop", "nope", false, 0).as_bytes()),
                "does not list",
            ),
            (
                "a document after an EOF header",
                {
                    let mut b = golden.clone();
                    b.truncate(b.len() - 4);
                    b.extend_from_slice(rawdoc! {"_id": 3}.as_bytes());
                    b
                },
                "after an EOF header",
            ),
            ("a prelude that never ends", golden[..0x1b6].to_vec(), "prelude"),
            (
                "a header of another version",
                {
                    let mut b = MAGIC.to_vec();
                    b.extend_from_slice(
                        rawdoc! {"version": "0.2", "server_version": "", "tool_version": ""}.as_bytes(),
                    );
                    b
                },
                "version",
            ),
        ];
        for (what, bytes, expected) in cases {
            let e = read(&bytes).expect_err(what);
            assert_eq!(e.kind, Kind::Data, "{what}: {e}");
            assert!(e.message.contains(expected), "{what}: {e}");
        }
    }

    /// Every truncation and every single-byte change of the golden archive is refused or
    /// (where the change is in the metadata text, which only the restore parses) read,
    /// never a panic.
    #[test]
    fn every_truncation_and_byte_flip_is_handled() {
        for len in 0..GOLDEN.len() {
            assert_eq!(read(&GOLDEN[..len]).unwrap_err().kind, Kind::Data, "cut at {len}");
        }
        for i in 0..GOLDEN.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut b = GOLDEN.to_vec();
                b[i] ^= flip;
                if let Err(e) = read(&b) {
                    assert_eq!(e.kind, Kind::Data, "byte {i} ^ {flip:#x}: {e}");
                }
            }
        }
    }

    /// Reads at most `cut` bytes per call, as a pipe may.
    struct Chunked<'a> {
        bytes: &'a [u8],
        cut: usize,
    }

    impl Read for Chunked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.cut.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    /// Pieces an archive is made of, right and wrong: the golden archive's own blocks,
    /// headers of known and unknown namespaces with any CRC, odd lengths, and noise.
    fn piece() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        prop_oneof![
            Just(GOLDEN[..0x1ba].to_vec()),
            Just(GOLDEN[0x1ba..].to_vec()),
            Just(MAGIC.to_vec()),
            Just(TERMINATOR.to_vec()),
            Just(rawdoc! {"_id": 1, "sku": "a1"}.into_bytes()),
            (any::<bool>(), any::<u64>(), prop_oneof![Just("items"), Just("other")])
                .prop_map(|(eof, crc, c)| block_header("shop", c, eof, crc).into_bytes()),
            prop_oneof![
                Just(0i32),
                Just(4),
                Just(5),
                Just(-2),
                Just(i32::MAX),
                Just(MAX_DOCUMENT as i32 + 1)
            ]
            .prop_map(|n| n.to_le_bytes().to_vec()),
            proptest::collection::vec(any::<u8>(), 0..24),
        ]
    }

    proptest::proptest! {
        /// Whatever the bytes (a corrupt or hostile artifact), the reader never panics, fails
        /// only with a Data error, and reads the same however the stream is cut into reads.
        #[test]
        fn any_archive_reads_or_fails_cleanly(
            pieces in proptest::collection::vec(piece(), 0..12),
            cut in 1usize..17,
        ) {
            let bytes = pieces.concat();
            let whole = read(&bytes);
            let mut chunked = Vec::new();
            let result = ArchiveReader::open(Chunked { bytes: &bytes, cut }).and_then(|mut reader| {
                while let Some(event) = reader.next_event()? {
                    chunked.push(format!("{event:?}"));
                }
                Ok(reader.counts())
            });
            match (&whole, &result) {
                (Ok((_, _, counts)), Ok(chunked_counts)) => proptest::prop_assert_eq!(counts, chunked_counts),
                (Err(a), Err(b)) => {
                    proptest::prop_assert_eq!(a.kind, Kind::Data);
                    proptest::prop_assert_eq!(&a.message, &b.message);
                }
                _ => proptest::prop_assert!(false, "{:?} vs {:?}", whole.is_ok(), result.is_ok()),
            }
        }
    }
}
