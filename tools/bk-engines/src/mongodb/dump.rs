//! `bk-dump mongodb`: one archive per database, as `mongodump --archive --db DB` writes it.
//! The prelude (every collection's and view's options and indexes) is read first, then each
//! collection's documents are copied from the server's replies into the archive as their raw
//! bytes, counted as they go. On a replica set or mongos every collection is read in one
//! snapshot session, its cursors all opened at the start; a standalone server has no
//! snapshots, which the dump says on stderr and in the artifact's source.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use bson::{doc, RawDocument, RawDocumentBuf};
use futures_util::{Stream, StreamExt};
use globset::{Glob, GlobSet, GlobSetBuilder};
use mongodb::action::{Action, RunCursorCommand};
use mongodb::raw_batch_cursor::RawBatch;
use mongodb::{Client, Database};

use bk_core::error::{Error, Result};
use bk_core::name::sanitize;
use bk_core::record::{Source, ToolInfo};

use super::archive::{ArchiveWriter, Header, Namespace};
use super::{block, ejson, mongo_error, Connection, MongoConnArgs};
use crate::{DumpJob, Dumped};

/// Databases no dump takes unless named: the server's own.
const SYSTEM_DATABASES: [&str; 3] = ["admin", "local", "config"];
/// What a getMore's reply should hold at most, in bytes (see [`batch_size`]).
const REPLY_BYTES: u32 = 4 << 20;
/// The largest piece [`SmallWrites`] passes on: the zstd crate's stream writer buffer.
const SMALL_WRITE: usize = 32 << 10;
/// The oldest wire version with snapshot reads (MongoDB 5.0).
const SNAPSHOT_WIRE_VERSION: i32 = 13;

#[derive(Debug, Clone, clap::Args)]
pub struct DumpArgs {
    #[command(flatten)]
    pub conn: MongoConnArgs,
    /// Back up this database (repeatable) [default: every database but admin, local and config]
    #[arg(long = "database", value_name = "DB")]
    pub databases: Vec<String>,
    /// Leave out this database (repeatable)
    #[arg(long, value_name = "DB")]
    pub exclude_database: Vec<String>,
    /// Back up only the collections (and views) whose names match this glob (repeatable)
    #[arg(long = "collection", value_name = "GLOB")]
    pub collections: Vec<String>,
    /// Leave out the collections (and views) whose names match this glob (repeatable)
    #[arg(long, value_name = "GLOB")]
    pub exclude_collection: Vec<String>,
    /// A standalone server, known to have no snapshots: do not warn that the dump is not
    /// point-in-time (its source still says "consistency": "none"), so that a cron job's mail
    /// is only for news
    #[arg(long)]
    pub no_snapshot_ok: bool,
}

/// What bk learns of the server once, before the jobs.
struct Server {
    /// buildInfo's version, for the archive's header (mongorestore compares it with its own).
    version: String,
    /// A replica set or mongos recent enough for snapshot reads.
    snapshots: bool,
}

/// Which collections of a database are dumped.
struct CollectionFilter {
    only: Option<GlobSet>,
    excluded: GlobSet,
}

impl CollectionFilter {
    fn new(args: &DumpArgs) -> Result<Self> {
        let set = |patterns: &[String], flag: &str| -> Result<GlobSet> {
            let mut set = GlobSetBuilder::new();
            for p in patterns {
                set.add(Glob::new(p).map_err(|e| Error::usage(format!("{flag} {p:?}: {e}")))?);
            }
            set.build().map_err(|e| Error::usage(format!("{flag}: {e}")))
        };
        Ok(CollectionFilter {
            only: (!args.collections.is_empty())
                .then(|| set(&args.collections, "--collection"))
                .transpose()?,
            excluded: set(&args.exclude_collection, "--exclude-collection")?,
        })
    }

    /// mongodump's rules first, then --collection and --exclude-collection.
    fn keeps(&self, name: &str) -> bool {
        super::dumpable_collection(name)
            && self.only.as_ref().is_none_or(|only| only.is_match(name))
            && !self.excluded.is_match(name)
    }
}

pub fn jobs(args: &DumpArgs) -> Result<Vec<Box<dyn DumpJob>>> {
    let filter = Arc::new(CollectionFilter::new(args)?);
    let conn = Arc::new(args.conn.connect()?);
    let server = Arc::new(block(server(&conn.client))?);
    // authorizedDatabases: a user with read rights on some databases only may list those.
    let existing = block(conn.client.list_database_names().authorized_databases(true))
        .map_err(|e| mongo_error("listing databases", e))?;
    let databases: Vec<String> = if args.databases.is_empty() {
        existing
            .into_iter()
            .filter(|d| !SYSTEM_DATABASES.contains(&d.as_str()))
            .collect()
    } else {
        if let Some(missing) = args.databases.iter().find(|d| !existing.contains(d)) {
            return Err(Error::no_input(format!("no database {missing:?} on the server")));
        }
        args.databases.clone()
    };
    let jobs: Vec<Box<dyn DumpJob>> = databases
        .into_iter()
        .filter(|d| !args.exclude_database.contains(d))
        .map(|database| -> Box<dyn DumpJob> {
            Box::new(MongoJob {
                conn: conn.clone(),
                server: server.clone(),
                filter: filter.clone(),
                database,
                warn_no_snapshot: !args.no_snapshot_ok,
            })
        })
        .collect();
    if jobs.is_empty() {
        return Err(Error::no_input("no database to back up"));
    }
    Ok(jobs)
}

/// The server's version and whether it can read in snapshots. `hello` says what the server
/// is (never infer support from an unknown command's `ok: 1`: some servers answer that to
/// anything).
async fn server(client: &Client) -> Result<Server> {
    let admin = client.database("admin");
    let failed = |doing| move |e| mongo_error(doing, e);
    let hello = admin
        .run_command(doc! {"hello": 1})
        .await
        .map_err(failed("asking the server hello"))?;
    let cluster = hello.contains_key("setName") || hello.get_str("msg").is_ok_and(|m| m == "isdbgrid");
    let wire = hello.get_i32("maxWireVersion").unwrap_or(0);
    let info = admin
        .run_command(doc! {"buildInfo": 1})
        .await
        .map_err(failed("asking the server its version"))?;
    let version = info
        .get_str("version")
        .map_err(|_| Error::unavailable("the server does not say its version (buildInfo)"))?;
    Ok(Server {
        version: version.to_string(),
        snapshots: cluster && wire >= SNAPSHOT_WIRE_VERSION,
    })
}

pub struct MongoJob {
    conn: Arc<Connection>,
    server: Arc<Server>,
    filter: Arc<CollectionFilter>,
    database: String,
    warn_no_snapshot: bool,
}

impl DumpJob for MongoJob {
    fn engine(&self) -> &'static str {
        "mongodb"
    }
    fn format(&self) -> &'static str {
        "mongo-archive"
    }
    fn default_name(&self) -> String {
        format!("mongodb-{}", sanitize(&self.database))
    }
    fn database(&self) -> Option<&str> {
        Some(&self.database)
    }
    fn source(&self) -> Source {
        Source {
            host: self.conn.host.clone(),
            port: self.conn.port,
            database: Some(self.database.clone()),
            consistency: Some(if self.server.snapshots { "snapshot" } else { "none" }.into()),
            ..Source::default()
        }
    }

    fn dump(&self, out: &mut dyn Write) -> Result<Dumped> {
        if !self.server.snapshots && self.warn_no_snapshot {
            eprintln!(
                "bk-dump: warning: {}{}: a standalone server has no snapshots: this dump of {} is not \
                 point-in-time (writes while it runs may be partly in it), as mongodump without --oplog",
                self.conn.host,
                self.conn.port.map(|p| format!(":{p}")).unwrap_or_default(),
                self.database
            );
        }
        let counts = block(self.dump_database(out))?;
        Ok(Dumped {
            counts,
            tool: ToolInfo {
                program: "bk-dump".into(),
                version: bk_core::BK_VERSION.into(),
            },
        })
    }
}

impl MongoJob {
    async fn dump_database(&self, out: &mut dyn Write) -> Result<BTreeMap<String, u64>> {
        let db = self.conn.client.database(&self.database);
        let prelude = self.prelude(&db).await?;
        let header = Header {
            server_version: self.server.version.clone(),
            tool_version: format!("bk {}", bk_core::BK_VERSION),
        };
        let mut out = SmallWrites(out);
        let mut writer = ArchiveWriter::start(&mut out, &header, &prelude)?;
        let mut counts = BTreeMap::new();
        let reading = |ns: &Namespace| format!("reading {}", ns.name());
        let mut batch_sizes = Vec::new();
        for ns in &prelude {
            batch_sizes.push(if ns.is_view() {
                None
            } else {
                Some(batch_size(&db, &ns.collection).await)
            });
        }
        if self.server.snapshots {
            // Every cursor is opened now, in one snapshot session: each keeps the snapshot
            // for its getMores, however long the collections before it take to copy.
            let mut session = self
                .conn
                .client
                .start_session()
                .snapshot(true)
                .await
                .map_err(|e| mongo_error("starting a snapshot session", e))?;
            let mut cursors = Vec::new();
            for (ns, batch_size) in prelude.iter().zip(&batch_sizes) {
                let cursor = match batch_size {
                    None => None,
                    Some(size) => {
                        let find = find(&db, ns, *size, true)?.session(&mut session).batch().await;
                        Some(find.map_err(|e| mongo_error(&reading(ns), e))?)
                    }
                };
                if cursor.is_some() && session.snapshot_time().is_none() {
                    return Err(Error::unavailable(format!(
                        "{}: the server gave no snapshot time: it did not read in a snapshot",
                        self.conn.host
                    )));
                }
                cursors.push(cursor);
            }
            for (ns, mut cursor) in prelude.iter().zip(cursors) {
                let batches = cursor.as_mut().map(|c| c.stream(&mut session));
                copy_collection(&mut writer, ns, batches, &mut counts).await?;
            }
        } else {
            for (ns, batch_size) in prelude.iter().zip(&batch_sizes) {
                let batches = match batch_size {
                    None => None,
                    Some(size) => Some(
                        find(&db, ns, *size, false)?
                            .batch()
                            .await
                            .map_err(|e| mongo_error(&reading(ns), e))?,
                    ),
                };
                copy_collection(&mut writer, ns, batches, &mut counts).await?;
            }
        }
        Ok(counts)
    }

    /// The collections and views to dump, with their metadata, in listCollections' order.
    async fn prelude(&self, db: &Database) -> Result<Vec<Namespace>> {
        let listing = format!("listing the collections of {}", self.database);
        let failed = |e| mongo_error(&listing, e);
        let malformed = |e: bson::error::Error| Error::data(format!("{listing}: {e}"));
        // Not in a snapshot session: listCollections and listIndexes take no snapshot read concern.
        let mut cursor = db
            .run_cursor_command(doc! {"listCollections": 1})
            .await
            .map_err(failed)?;
        let mut prelude = Vec::new();
        while cursor.advance().await.map_err(failed)? {
            let info = cursor.current();
            let name = info.get_str("name").map_err(malformed)?;
            if !self.filter.keeps(name) {
                continue;
            }
            let kind = info.get_str("type").unwrap_or("collection");
            if kind == "timeseries" {
                return Err(Error::config(format!(
                    "{}.{name} is a time series collection, which bk cannot dump yet: leave it out with \
                     --exclude-collection {name}",
                    self.database
                )));
            }
            // mongodump records the UUID only when it is one (binary subtype 4).
            let uuid = info
                .get_document("info")
                .ok()
                .and_then(|i| i.get_binary("uuid").ok())
                .filter(|b| b.subtype == bson::spec::BinarySubtype::Uuid)
                .map(|b| b.bytes);
            let indexes = if kind == "view" {
                Vec::new()
            } else {
                self.indexes(db, name).await?
            };
            let options = info.get_document("options").ok();
            prelude.push(Namespace {
                db: self.database.clone(),
                collection: name.to_string(),
                metadata: ejson::metadata(options, &indexes, uuid, name, kind)?,
                kind: kind.to_string(),
            });
        }
        Ok(prelude)
    }

    /// listIndexes' documents whole (every option, in the server's order). A collection
    /// dropped since it was listed has none, as mongodump has it.
    async fn indexes(&self, db: &Database, collection: &str) -> Result<Vec<RawDocumentBuf>> {
        let doing = format!("listing the indexes of {}.{collection}", self.database);
        let mut cursor = match db.run_cursor_command(doc! {"listIndexes": collection}).await {
            Ok(cursor) => cursor,
            Err(e) if matches!(&*e.kind, mongodb::error::ErrorKind::Command(c) if c.code == 26) => {
                return Ok(Vec::new())
            }
            Err(e) => return Err(mongo_error(&doing, e)),
        };
        let mut indexes = Vec::new();
        while cursor.advance().await.map_err(|e| mongo_error(&doing, e))? {
            indexes.push(cursor.current().to_owned());
        }
        Ok(indexes)
    }
}

/// A find of every document of a namespace, as a cursor command: its first batch is empty
/// (with a snapshot, every cursor is opened before any is read: none holds documents while
/// it waits) and each getMore asks for `batch_size` documents. The URI's read preference and
/// read concern apply as to the driver's own find (a snapshot session sets its read concern).
fn find<'a>(db: &'a Database, ns: &Namespace, batch_size: Option<u32>, snapshot: bool) -> Result<RunCursorCommand<'a>> {
    let mut command = doc! {"find": &ns.collection, "filter": {}, "batchSize": 0};
    if let (false, Some(concern)) = (snapshot, db.read_concern()) {
        let concern =
            bson::serialize_to_bson(concern).map_err(|e| Error::usage(format!("the URI's read concern: {e}")))?;
        command.insert("readConcern", concern);
    }
    Ok(db
        .run_cursor_command(command)
        .optional(db.selection_criteria().cloned(), |find, c| find.selection_criteria(c))
        .optional(batch_size, |find, size| find.batch_size(size)))
}

/// How many documents a getMore should ask for so that its reply is about [`REPLY_BYTES`],
/// from the collection's average document size: the driver holds a reply twice while it
/// parses it, and a server fills a batch up to 16 MiB unless asked for fewer documents.
/// `None` (the server's batches) where the server does not say (collStats needs no more
/// rights than find).
async fn batch_size(db: &Database, collection: &str) -> Option<u32> {
    let stats = db.run_command(doc! {"collStats": collection}).await.ok()?;
    let average = match stats.get("avgObjSize")? {
        bson::Bson::Int32(n) => f64::from(*n),
        bson::Bson::Int64(n) => *n as f64,
        bson::Bson::Double(n) => *n,
        _ => return None,
    };
    (average >= 1.0).then(|| (REPLY_BYTES as f64 / average).clamp(1.0, f64::from(u32::MAX)) as u32)
}

/// Passes writes on in pieces no larger than zstd's output buffer: a zstd write takes up to
/// a whole job (4 MiB) of input but hands on at most that buffer (32 KiB) of compressed
/// bytes, so a large write (a 16 MiB document) queues jobs whose outputs, 4 MiB each, wait
/// their turn; in small pieces the output leaves as fast as the input comes.
struct SmallWrites<'a>(&'a mut dyn Write);

impl Write for SmallWrites<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(&buf[..buf.len().min(SMALL_WRITE)])
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// One namespace's block: its documents (none for a view) from the server's batches, as
/// their raw bytes; a collection's count goes into `counts`.
async fn copy_collection(
    writer: &mut ArchiveWriter<'_>,
    ns: &Namespace,
    batches: Option<impl Stream<Item = mongodb::error::Result<RawBatch>>>,
    counts: &mut BTreeMap<String, u64>,
) -> Result<()> {
    let reading = format!("reading {}", ns.name());
    let failed = |e| mongo_error(&reading, e);
    writer.begin(&ns.db, &ns.collection)?;
    if let Some(batches) = batches {
        let mut batches = std::pin::pin!(batches);
        while let Some(batch) = batches.next().await {
            let batch = batch.map_err(failed)?;
            for document in batch.doc_slices().map_err(failed)? {
                let document: &RawDocument = document
                    .map_err(|e| Error::data(format!("{reading}: {e}")))?
                    .as_document()
                    .ok_or_else(|| Error::data(format!("{reading}: the server sent a non-document")))?;
                writer.document(document.as_bytes())?;
            }
        }
    }
    let count = writer.end()?;
    if !ns.is_view() {
        counts.insert(ns.name(), count);
    }
    Ok(())
}
