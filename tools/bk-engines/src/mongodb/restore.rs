//! bk-restore's `mongodb` engine: an archive streamed into a database, its documents inserted
//! as their raw bytes in batches, each collection's count checked against the archive's and
//! the manifest's, its indexes built from the prelude's metadata, views created last.
//!
//! Into a target that holds none of the collections (or only empty ones), the collections
//! are loaded under their own names, and dropped again if anything fails. With --replace each
//! is loaded under a temporary name `bk_restore_<unix time>_<random>_<n>` in the target
//! database, checked and indexed; only when every one is good are they renamed over the
//! targets, one at a time. A failure before that drops the temporaries and leaves the target
//! as it was; temporaries a killed run left (a day old) are dropped by the next restore.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bson::{doc, Bson, Document, RawDocumentBuf};
use mongodb::{Client, Database};

use bk_core::codec::Decoder;
use bk_core::error::{Error, Result};
use bk_core::record::Artifact;

use super::archive::{ArchiveReader, Event, Namespace};
use super::{block, mongo_error};
use crate::{stamped_age, stamped_name, RestoreOptions, RestoredInfo, LEFTOVER_AGE};

/// The temporary collections of --replace: `<prefix><unix time>_<random>_<n>`, valid
/// collection names on every server (letters, digits and `_`).
const TEMPORARY_PREFIX: &str = "bk_restore_";
/// An insert holds at most this many documents (mongorestore's batch) or bytes (a larger
/// document goes alone): the driver copies a batch into its message, so this is held twice.
const BATCH_DOCUMENTS: usize = 1000;
const BATCH_BYTES: usize = 4 << 20;

/// Held while collections are renamed over the targets: a SIGINT or SIGTERM waits for the
/// swap to end rather than stopping between a drop and a rename.
static SWAPPING: Mutex<()> = Mutex::new(());

/// One collection or view of the archive to restore.
struct Planned {
    /// Its index in the archive's prelude.
    index: usize,
    /// Its name in the target database.
    name: String,
    /// Where it is loaded: its name, or a temporary one with --replace.
    load: String,
    metadata: Document,
    view: bool,
}

/// The collections this run created and has not handed over yet: dropped at the end (or on
/// SIGINT/SIGTERM) unless the restore took them.
#[derive(Clone)]
struct Created {
    db: Database,
    names: Arc<Mutex<Vec<String>>>,
}

impl Created {
    fn add(&self, name: &str) {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_string());
    }
    fn keep(&self, name: &str) {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|n| n != name);
    }
    /// The restore succeeded: nothing is dropped.
    fn keep_all(&self) {
        self.names.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
    fn drop_all(&self) {
        let names = std::mem::take(&mut *self.names.lock().unwrap_or_else(|p| p.into_inner()));
        for name in names {
            if let Err(e) = block(self.db.collection::<Document>(&name).drop()) {
                eprintln!(
                    "bk-restore: warning: could not drop {}.{name}: {e}; drop it by hand",
                    self.db.name()
                );
            }
        }
    }
}

/// Restores the archive into `--database NEW` (default: the source's) on the server of the
/// connection options. The stored bytes were checked before (bk-restore's check_stored).
pub fn restore(artifact: &Artifact, mut decoder: Decoder, opts: &RestoreOptions) -> Result<RestoredInfo> {
    let conn = opts.mongo.connect()?;
    let target = opts
        .database
        .clone()
        .or_else(|| artifact.source.database.clone())
        .ok_or_else(|| {
            Error::usage(format!(
                "{}: the backup names no database: give --database",
                artifact.id
            ))
        })?;
    check_target(artifact, &target, opts.database.is_some())?;
    let db = conn.client.database(&target);
    let mut reader = ArchiveReader::open(&mut decoder)?;
    let prelude = reader.prelude().to_vec();
    // A manifest and its archive may be anyone's: only collections bk-dump can have written
    // reach the server (no system collection but system.js, as mongodump's own rules).
    if let Some(ns) = prelude.iter().find(|ns| !super::dumpable_collection(&ns.collection)) {
        return Err(Error::data(format!(
            "{}: the archive holds {}, which no dump writes; refusing to restore it",
            artifact.id,
            ns.name()
        )));
    }
    // bk writes one database per archive; mongodump without --db writes several, which
    // would land in one target here.
    if let Some(other) = prelude.iter().find(|ns| ns.db != prelude[0].db) {
        return Err(Error::usage(format!(
            "{}: the archive holds more than one database ({} and {}); bk restores one",
            artifact.id, prelude[0].db, other.db
        )));
    }
    if let Some(missing) = opts
        .tables
        .iter()
        .find(|c| !prelude.iter().any(|ns| &ns.collection == *c))
    {
        return Err(Error::no_input(format!(
            "{}: the backup holds no collection {missing:?}",
            artifact.id
        )));
    }
    sweep(&db)?;
    let existing = names(&db)?;
    let stamp = stamped_name(TEMPORARY_PREFIX);
    let mut planned = Vec::new();
    for (index, ns) in prelude.iter().enumerate() {
        if !opts.tables.is_empty() && !opts.tables.contains(&ns.collection) {
            continue;
        }
        let metadata: Document = serde_json::from_str(&ns.metadata)
            .map_err(|e| Error::data(format!("the metadata of {} in the archive: {e}", ns.name())))?;
        let load = if opts.replace {
            format!("{stamp}_{index}")
        } else {
            ns.collection.clone()
        };
        planned.push(Planned {
            index,
            name: ns.collection.clone(),
            load,
            metadata,
            view: ns.is_view(),
        });
    }
    if !opts.replace {
        refuse_if_not_empty(&db, &planned, &existing)?;
    }
    let created = Created {
        db: db.clone(),
        names: Arc::default(),
    };
    let dropper = created.clone();
    let _drop = bk_core::cleanup::on_exit(move || dropper.drop_all());
    let untouched = format!("{target} was left as it was");
    let loaded = load(artifact, &mut reader, &prelude, &planned, &db, &created);
    drop(reader);
    let counts = loaded.and_then(|counts| decoder.finish(artifact).map(|_| counts));
    let counts = match counts {
        Ok(counts) => counts,
        Err(e) if opts.replace => return Err(e.context(&untouched)),
        Err(e) => return Err(e.context(format!("restoring into {target} failed; what it created was dropped"))),
    };
    if opts.replace {
        let _wait = bk_core::cleanup::on_exit(|| drop(SWAPPING.lock()));
        let _swapping = SWAPPING.lock().unwrap_or_else(|p| p.into_inner());
        for (i, p) in planned.iter().filter(|p| !p.view).enumerate() {
            swap_in(&conn.client, &db, p, counts[&p.name], &existing, &created).map_err(|e| {
                let done: Vec<&str> = planned
                    .iter()
                    .filter(|p| !p.view)
                    .take(i)
                    .map(|p| p.name.as_str())
                    .collect();
                e.context(format!(
                    "replacing {target}.{} failed; replaced before it: {}; the others were left as they were",
                    p.name,
                    if done.is_empty() {
                        "none".to_string()
                    } else {
                        done.join(", ")
                    }
                ))
            })?;
            created.keep(&p.load);
        }
    }
    for p in planned.iter().filter(|p| p.view) {
        create_view(&db, p, opts.replace && existing.contains(&p.name))?;
    }
    created.keep_all();
    let mut target_info = serde_json::Map::new();
    target_info.insert("host".into(), conn.host.clone().into());
    target_info.insert("port".into(), conn.port.into());
    target_info.insert("database".into(), target.clone().into());
    Ok(RestoredInfo {
        target: target_info,
        counts: counts.into_iter().map(|(c, n)| (format!("{target}.{c}"), n)).collect(),
        complete: opts.tables.is_empty(),
    })
}

/// A target database name the server takes, and, unless --database named it, none of the
/// server's own databases (a manifest saying `admin` must not aim a restore there).
fn check_target(artifact: &Artifact, target: &str, given: bool) -> Result<()> {
    let valid = !target.is_empty() && target.len() < 64 && !target.contains(['/', '\\', '.', ' ', '"', '$', '\0']);
    if !valid {
        return Err(Error::usage(format!(
            "{}: {target:?} is not a MongoDB database name",
            artifact.id
        )));
    }
    if !given && matches!(target, "admin" | "local" | "config") {
        return Err(Error::data(format!(
            "{}: the backup names the server's own database {target}: give --database to restore into it",
            artifact.id
        )));
    }
    Ok(())
}

/// The names of a database's collections and views.
fn names(db: &Database) -> Result<Vec<String>> {
    block(db.list_collection_names()).map_err(|e| mongo_error(&format!("listing the collections of {}", db.name()), e))
}

fn documents_in(db: &Database, name: &str) -> Result<u64> {
    block(db.collection::<Document>(name).count_documents(doc! {}))
        .map_err(|e| mongo_error(&format!("counting {}.{name}", db.name()), e))
}

/// Without --replace the collections to restore must be missing or empty (empty ones are
/// dropped, to be created with the backup's options and indexes); views must be missing.
fn refuse_if_not_empty(db: &Database, planned: &[Planned], existing: &[String]) -> Result<()> {
    let mut empty = Vec::new();
    for p in planned.iter().filter(|p| existing.contains(&p.name)) {
        if p.view || documents_in(db, &p.name)? > 0 {
            return Err(Error::cant_create(format!(
                "database {} is not empty: it holds {}; pass --replace to replace it",
                db.name(),
                p.name
            )));
        }
        empty.push(&p.name);
    }
    for name in empty {
        block(db.collection::<Document>(name).drop())
            .map_err(|e| mongo_error(&format!("dropping the empty {}.{name}", db.name()), e))?;
    }
    Ok(())
}

/// Drops the temporary collections a killed restore left in `db` (a day old: a younger one
/// may be another restore's, still running).
fn sweep(db: &Database) -> Result<()> {
    for name in names(db)?
        .into_iter()
        .filter(|n| stamped_age(TEMPORARY_PREFIX, n).is_some_and(|age| age > LEFTOVER_AGE))
    {
        eprintln!(
            "bk-restore: dropping {}.{name}, a temporary collection left by an interrupted restore",
            db.name()
        );
        block(db.collection::<Document>(&name).drop())
            .map_err(|e| mongo_error(&format!("dropping {}.{name}", db.name()), e))?;
    }
    Ok(())
}

/// The documents waiting for one insert.
struct Batch {
    namespace: usize,
    documents: Vec<RawDocumentBuf>,
    bytes: usize,
}

/// Creates every collection, streams the archive into them, and checks and indexes each at
/// its end; returns the documents per collection (by its name in the target).
fn load(
    artifact: &Artifact,
    reader: &mut ArchiveReader<&mut Decoder>,
    prelude: &[Namespace],
    planned: &[Planned],
    db: &Database,
    created: &Created,
) -> Result<BTreeMap<String, u64>> {
    for p in planned.iter().filter(|p| !p.view) {
        let mut create = doc! {"create": &p.load};
        if let Ok(options) = p.metadata.get_document("options") {
            create.extend(options.clone());
        }
        created.add(&p.load);
        block(db.run_command(create)).map_err(|e| mongo_error(&format!("creating {}.{}", db.name(), p.load), e))?;
    }
    let planned_at = |namespace: usize| planned.iter().find(|p| p.index == namespace && !p.view);
    let mut batch = Batch {
        namespace: usize::MAX,
        documents: Vec::new(),
        bytes: 0,
    };
    let mut counts = BTreeMap::new();
    while let Some(event) = reader.next_event()? {
        match event {
            Event::Document { namespace, bytes } => {
                let Some(p) = planned_at(namespace) else { continue };
                if batch.namespace != namespace
                    || batch.documents.len() >= BATCH_DOCUMENTS
                    || batch.bytes + bytes.len() > BATCH_BYTES
                {
                    insert(db, planned, &mut batch)?;
                    batch.namespace = p.index;
                }
                batch.bytes += bytes.len();
                let document = RawDocumentBuf::from_bytes(reader.take_document())
                    .map_err(|e| Error::data(format!("a document of {}: {e}", prelude[namespace].name())))?;
                batch.documents.push(document);
            }
            Event::End { namespace, count } => {
                let Some(p) = planned_at(namespace) else { continue };
                if batch.namespace == namespace {
                    insert(db, planned, &mut batch)?;
                }
                finish_collection(artifact, db, &prelude[namespace], p, count)?;
                counts.insert(p.name.clone(), count);
            }
        }
    }
    Ok(counts)
}

/// Sends the batch as one ordered insert of the raw documents, and empties it.
fn insert(db: &Database, planned: &[Planned], batch: &mut Batch) -> Result<()> {
    if batch.documents.is_empty() {
        return Ok(());
    }
    let p = planned
        .iter()
        .find(|p| p.index == batch.namespace)
        .expect("a planned namespace");
    let documents = std::mem::take(&mut batch.documents);
    batch.bytes = 0;
    block(
        db.collection::<RawDocumentBuf>(&p.load)
            .insert_many(documents)
            .ordered(true)
            .bypass_document_validation(true),
    )
    .map_err(|e| mongo_error(&format!("inserting into {}.{}", db.name(), p.load), e))?;
    Ok(())
}

/// At a collection's end in the archive: its count against the manifest's and the server's,
/// then its indexes (built after the data, as mongorestore does: faster).
fn finish_collection(artifact: &Artifact, db: &Database, ns: &Namespace, p: &Planned, count: u64) -> Result<()> {
    if let Some(&expected) = artifact.counts.get(&ns.name()) {
        if expected != count {
            return Err(Error::data(format!(
                "{}: the archive holds {count} documents of {}, the manifest says {expected}",
                artifact.id,
                ns.name()
            )));
        }
    }
    let found = documents_in(db, &p.load)?;
    if found != count {
        return Err(Error::data(format!(
            "{}: {} documents of {} were restored, the archive holds {count}",
            artifact.id,
            found,
            ns.name()
        )));
    }
    let indexes: Vec<Bson> = p
        .metadata
        .get_array("indexes")
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(Bson::as_document)
        .filter(|i| i.get_str("name").is_ok_and(|n| n != "_id_"))
        .map(|i| {
            let mut index = i.clone();
            index.remove("v");
            index.remove("ns");
            Bson::Document(index)
        })
        .collect();
    if !indexes.is_empty() {
        let command = doc! {"createIndexes": &p.load, "indexes": indexes, "ignoreUnknownIndexOptions": true};
        block(db.run_command(command))
            .map_err(|e| mongo_error(&format!("creating the indexes of {}.{}", db.name(), p.name), e))?;
    }
    Ok(())
}

/// Renames a loaded, checked temporary collection over its target: renameCollection with
/// dropTarget, on admin as servers require. A server that takes the command on the data's
/// own database and refuses an existing target (nx-27017 ignores dropTarget) gets drop then
/// rename: for a moment the target does not exist (and if the rename then fails, the
/// temporary is kept: it is the only copy). The result is checked either way.
fn swap_in(
    client: &Client,
    db: &Database,
    p: &Planned,
    expected: u64,
    existing: &[String],
    created: &Created,
) -> Result<()> {
    let (from, to) = (format!("{}.{}", db.name(), p.load), format!("{}.{}", db.name(), p.name));
    let rename = doc! {"renameCollection": &from, "to": &to, "dropTarget": true};
    let renaming = format!("renaming {from} to {to}");
    // Tried on the data's database first: a real server refuses that at once (Unauthorized,
    // "may only be run against the admin database"), with no effect; nx-27017 takes it there
    // (on admin it would answer ok, do nothing, and leave an empty admin.<name> behind).
    match block(db.run_command(rename.clone())) {
        Ok(_) => {}
        Err(e) if matches!(&*e.kind, mongodb::error::ErrorKind::Command(c) if c.code == 13) => {
            block(client.database("admin").run_command(rename)).map_err(|e| mongo_error(&renaming, e))?;
        }
        Err(_) if existing.contains(&p.name) => {
            eprintln!(
                "bk-restore: warning: the server refuses to rename {from} over the existing {to} \
                 (it ignores dropTarget): dropping {to}, then renaming; {to} is missing for a moment"
            );
            block(db.collection::<Document>(&p.name).drop()).map_err(|e| mongo_error(&format!("dropping {to}"), e))?;
            // From here the temporary is the only copy: never dropped, whatever happens.
            created.keep(&p.load);
            block(db.run_command(doc! {"renameCollection": &from, "to": &to})).map_err(|e| {
                mongo_error(&renaming, e).context(format!(
                    "{to} was dropped and {from} holds the backup's data: rename it by hand"
                ))
            })?;
        }
        Err(e) => return Err(mongo_error(&renaming, e)),
    }
    // A rename that answered ok must have happened: the temporary gone, the target whole.
    let names = names(db)?;
    let found = documents_in(db, &p.name)?;
    if names.contains(&p.load) || found != expected {
        return Err(Error::io(
            &renaming,
            std::io::Error::other(format!(
                "the server answered ok, but {to} holds {found} documents, not {expected}"
            )),
        ));
    }
    Ok(())
}

/// Creates a view from its metadata's options (viewOn, pipeline, collation); with --replace
/// an existing one is dropped first.
fn create_view(db: &Database, p: &Planned, replace: bool) -> Result<()> {
    if replace {
        block(db.collection::<Document>(&p.name).drop())
            .map_err(|e| mongo_error(&format!("dropping the view {}.{}", db.name(), p.name), e))?;
    }
    let mut create = doc! {"create": &p.name};
    if let Ok(options) = p.metadata.get_document("options") {
        create.extend(options.clone());
    }
    block(db.run_command(create))
        .map_err(|e| mongo_error(&format!("creating the view {}.{}", db.name(), p.name), e))?;
    Ok(())
}

/// The databases whose names start with `prefix` (bk-verify's scratch databases).
pub fn databases_like(opts: &RestoreOptions, prefix: &str) -> Result<Vec<String>> {
    let conn = opts.mongo.connect()?;
    let names = block(conn.client.list_database_names()).map_err(|e| mongo_error("listing databases", e))?;
    Ok(names.into_iter().filter(|n| n.starts_with(prefix)).collect())
}

pub fn drop_database(opts: &RestoreOptions, name: &str) -> Result<()> {
    let conn = opts.mongo.connect()?;
    block(conn.client.database(name).drop()).map_err(|e| mongo_error(&format!("dropping {name}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prelude's metadata read back keeps a compound key's order and every value's type.
    #[test]
    fn metadata_reads_back_in_order() {
        let index = bson::rawdoc! {
            "v": 2, "key": {"b": 1, "a": -1i64}, "name": "b_1_a_-1",
            "partialFilterExpression": {"at": {"$gt": bson::DateTime::from_millis(-1)},
                                        "id": bson::oid::ObjectId::from_bytes([1; 12]), "r": 0.5},
        };
        let json = super::super::ejson::metadata(None, std::slice::from_ref(&index), None, "c", "").unwrap();
        let read: Document = serde_json::from_str(&json).unwrap();
        let indexes = read.get_array("indexes").unwrap();
        assert_eq!(indexes[0], Bson::Document(Document::try_from(index.as_ref()).unwrap()));
        let keys: Vec<&String> = indexes[0]
            .as_document()
            .unwrap()
            .get_document("key")
            .unwrap()
            .keys()
            .collect();
        assert_eq!(keys, ["b", "a"]);
    }
}
