//! The mongodb engine against the MongoDB-protocol server of tests/services.sh: nx-27017, a
//! Python server over SQLite, not a real mongod (it is a standalone, has no authentication,
//! no views and no collection options; docs/engines.md lists what it cannot exercise). The
//! archive bk writes is read back by bk's own reader and by an independent one
//! (tests/mongo/archive_reader.py: pymongo's BSON decoder walking the format's spec), and
//! both must find exactly the documents the server holds.
//!
//! Every test works in databases of its own, named uniquely, dropped at the end.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bk_core::record::Artifact;
use bk_engines::mongodb::archive::{ArchiveReader, ArchiveWriter, Event};
use bk_tests::{age_keygen, free_port, mongo_server, unique_name, unzstd, MongoDatabase, MongoServer, Run, Sandbox};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// A database name no other test uses (nx-27017 takes `[A-Za-z0-9_]` names).
fn db_name() -> String {
    unique_name("bk_mongo_")
}

/// Seeds `db` with: `people`, 1000 documents of every BSON type nx-27017 keeps unchanged
/// (int32, int64 beyond int32, doubles, UTF-8 strings, ObjectId, dates before 1970, generic
/// binary, bools, null, nested documents and arrays, non-ASCII keys) and an index on `name`;
/// `empty`, with no document; `large`, one document of 8 MiB.
const SEED: &str = r#"
import datetime
from bson import Binary, Int64, ObjectId
db = client[sys.argv[1]]
db.people.insert_many([{
    "_id": i, "name": f"nom-{i}-é😀", "big": Int64(2**40 + i), "ratio": i / 7, "neg": -0.0,
    "oid": ObjectId(), "born": datetime.datetime(1900, 1, 1) + datetime.timedelta(days=i),
    "bin": Binary(bytes([i % 256]) * 8, 0), "flag": i % 2 == 0, "nothing": None,
    "nested": {"a": [1, {"b": "c"}, []], "ключ": i, "empty": {}},
} for i in range(1000)])
db.people.create_index([("name", 1)])
db.create_collection("empty")
db.large.insert_one({"_id": "big", "blob": Binary(b"x" * (8 << 20), 0)})
"#;

/// A test's server and sandbox.
struct Mongo {
    server: MongoServer,
    sb: Sandbox,
}

fn setup() -> Option<Mongo> {
    Some(Mongo {
        server: mongo_server()?,
        sb: Sandbox::new(),
    })
}

impl Mongo {
    /// A new database of the test, seeded with `script` (the database's name is sys.argv[1]).
    fn database(&self, script: &str) -> MongoDatabase {
        let db = self.server.database(&db_name());
        self.server.python(script, &[&db.name]);
        db
    }

    /// `bk-dump mongodb ARGS --to STORE`.
    fn dump(&self, args: &[&str]) -> Run {
        let store = self.sb.store();
        let mut all = vec!["mongodb"];
        all.extend(args);
        all.extend(["--to", &store]);
        self.sb.run("bk-dump", &all)
    }

    /// The artifact's archive, decompressed into the sandbox.
    fn archive(&self, artifact: &Artifact) -> std::path::PathBuf {
        let path = self.sb.path(&format!("{}.archive", artifact.id));
        std::fs::write(&path, unzstd(&artifact.location)).expect("writing the archive");
        path
    }

    /// A URI file of `mode` holding `uri`.
    fn uri_file(&self, uri: &str, mode: u32) -> String {
        let path = self.sb.path("uri");
        std::fs::write(&path, format!("{uri}\n")).expect("writing the URI file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path.display().to_string()
    }
}

/// bk's reader over an archive: per namespace, the count and the sha256 of its documents'
/// bytes, in the shape of the server's digests and of the Python reader's.
fn read_with_bk(path: &Path) -> Value {
    let file = std::fs::File::open(path).expect("the archive");
    let mut reader = ArchiveReader::open(std::io::BufReader::new(file)).expect("bk reads the archive");
    let mut hashes: BTreeMap<usize, Sha256> = BTreeMap::new();
    let mut ended = Vec::new();
    while let Some(event) = reader.next_event().expect("every block is sound") {
        match event {
            Event::Document { namespace, bytes } => hashes.entry(namespace).or_default().update(bytes),
            Event::End { namespace, .. } => ended.push(namespace),
        }
    }
    assert_eq!(ended.len(), reader.prelude().len(), "every namespace ended");
    let counts = reader.counts();
    let digests = reader
        .prelude()
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let sha = hashes.remove(&i).unwrap_or_default().finalize();
            (
                ns.name(),
                json!({"count": counts[&ns.name()], "sha256": hex::encode(sha)}),
            )
        })
        .collect();
    Value::Object(digests)
}

#[test]
fn a_dump_holds_every_document_as_the_server_sent_it() {
    let Some(t) = setup() else { return };
    let db = t.database(SEED);
    let run = t.dump(&["--uri", &t.server.url, "--database", &db.name]).ok();
    let artifact = run.artifact();
    assert_eq!(artifact.name, format!("mongodb-{}", db.name));
    assert_eq!(
        (artifact.engine.as_str(), artifact.format.as_str()),
        ("mongodb", "mongo-archive")
    );
    assert!(artifact.file.ends_with(".mongo-archive.zst"), "{}", artifact.file);
    assert_eq!(artifact.source.database.as_deref(), Some(db.name.as_str()));
    assert_eq!(
        (artifact.source.host.as_str(), artifact.source.port),
        (t.server.host.as_str(), Some(t.server.port))
    );
    // nx-27017 is a standalone: no snapshot, and the dump says so.
    assert_eq!(artifact.source.consistency.as_deref(), Some("none"));
    assert!(run.stderr.contains("not point-in-time"), "{}", run.stderr);
    // Acknowledged: the record stays, the warning goes.
    let acknowledged = t
        .dump(&["--uri", &t.server.url, "--database", &db.name, "--no-snapshot-ok"])
        .ok();
    assert_eq!(acknowledged.artifact().source.consistency.as_deref(), Some("none"));
    assert!(
        !acknowledged.stderr.contains("point-in-time"),
        "{}",
        acknowledged.stderr
    );
    let expected = BTreeMap::from([
        (format!("{}.people", db.name), 1000),
        (format!("{}.empty", db.name), 0),
        (format!("{}.large", db.name), 1),
    ]);
    assert_eq!(artifact.counts, expected);

    let archive = t.archive(&artifact);
    let on_server = t.server.digests(&db.name);
    assert_eq!(
        read_with_bk(&archive),
        on_server,
        "bk's reader finds the server's documents, byte for byte"
    );
    let independent = t.server.read_archive(&archive);
    assert_eq!(independent["namespaces"], on_server, "so does pymongo's decoder");
    assert_eq!(independent["header"]["version"], "0.1");
    assert_eq!(
        independent["header"]["server_version"], "7.0.0",
        "nx-27017's buildInfo version"
    );
    // The prelude holds each collection's indexes, as mongodump writes them.
    let people = independent["prelude"]
        .as_array()
        .expect("a prelude")
        .iter()
        .find(|m| m["collection"] == "people")
        .expect("people in the prelude");
    assert_eq!(people["type"], "collection");
    assert_eq!(people["metadata"]["collectionName"], "people");
    let keys: Vec<&Value> = people["metadata"]["indexes"]
        .as_array()
        .expect("indexes")
        .iter()
        .map(|i| &i["key"])
        .collect();
    assert_eq!(
        keys,
        [
            &json!({"_id": {"$numberInt": "1"}}),
            &json!({"name": {"$numberInt": "1"}})
        ]
    );
}

#[test]
fn databases_and_collections_are_chosen_by_name() {
    let Some(t) = setup() else { return };
    let script = r#"
db = client[sys.argv[1]]
for name in ["keep_a", "keep_b", "keep_not", "other"]:
    db[name].insert_one({"_id": name})
"#;
    let (a, b) = (t.database(script), t.database(script));
    let run = t
        .dump(&[
            "--host",
            &t.server.host,
            "--port",
            &t.server.port.to_string(),
            "--database",
            &a.name,
            "--database",
            &b.name,
            "--exclude-database",
            &b.name,
            "--collection",
            "keep_*",
            "--exclude-collection",
            "*_not",
            "--name",
            "m-{engine}-{database}",
        ])
        .ok();
    let artifact = run.artifact();
    assert_eq!(artifact.name, format!("m-mongodb-{}", a.name));
    let keys: Vec<String> = artifact.counts.keys().cloned().collect();
    assert_eq!(keys, [format!("{}.keep_a", a.name), format!("{}.keep_b", a.name)]);
    let independent = t.server.read_archive(&t.archive(&artifact));
    let prelude: Vec<&str> = independent["prelude"]
        .as_array()
        .expect("a prelude")
        .iter()
        .map(|m| m["collection"].as_str().expect("a name"))
        .collect();
    assert_eq!(prelude.len(), 2, "{prelude:?}");

    let missing = t.dump(&["--uri", &t.server.url, "--database", "bk_no_such_database"]);
    missing.failed("a missing database", 66, &["bk_no_such_database"]);
}

#[test]
fn connection_secrets_and_failures() {
    let Some(t) = setup() else { return };
    let db = t.database("client[sys.argv[1]].c.insert_one({'_id': 1})");
    let store = t.sb.path("store");

    // A private URI file is how credentials come in.
    let private = t.uri_file(&t.server.url, 0o600);
    let artifact = t
        .dump(&["--uri-file", &private, "--database", &db.name])
        .ok()
        .artifact();
    assert_eq!(artifact.counts, BTreeMap::from([(format!("{}.c", db.name), 1)]));

    let password = "Sup3r-secret-pw";
    let with_password = format!(
        "mongodb://bk:{password}@{}:{}/?directConnection=true",
        t.server.host, t.server.port
    );
    let loose = t.uri_file(&t.server.url, 0o644);
    let unreachable = format!("mongodb://127.0.0.1:{}/?serverSelectionTimeoutMS=1000", free_port());
    let cases: [(&str, Vec<&str>, i32, &[&str]); 3] = [
        (
            "a URI with a password on the command line",
            vec!["--uri", &with_password],
            64,
            &["--uri-file"],
        ),
        (
            "a URI file others may read",
            vec!["--uri-file", &loose],
            78,
            &["chmod 600"],
        ),
        ("an unreachable server", vec!["--uri", &unreachable], 69, &[]),
    ];
    for (case, args, code, says) in cases {
        let before = bk_tests::files_below(&store).len();
        let mut args = args;
        args.extend(["--database", &db.name]);
        let run = t.dump(&args);
        run.failed(case, code, says);
        run.assert_hides(case, &[password]);
        assert_eq!(
            bk_tests::files_below(&store).len(),
            before,
            "{case}: nothing new in the store"
        );
    }

    // A failure before the databases are known is said for each backup the command line names.
    let run = t.dump(&[
        "--uri",
        &unreachable,
        "--database",
        "x1",
        "--database",
        "x2",
        "--name",
        "m-{database}",
    ]);
    assert_eq!(run.code, 69, "{}", run.stderr);
    let named: Vec<Option<String>> = run
        .records()
        .into_iter()
        .filter_map(|r| {
            if let bk_core::record::Record::Error(e) = r {
                Some(e.name)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(named, [Some("m-x1".to_string()), Some("m-x2".to_string())]);
}

/// A mongodb backup goes through the other tools like any other: listed, shipped to a
/// second store, verified there (zstd, and gzip with age), pruned.
#[test]
fn a_backup_is_listed_shipped_verified_and_pruned() {
    let Some(t) = setup() else { return };
    let db = t.database("client[sys.argv[1]].c.insert_many([{'_id': i} for i in range(50)])");
    let key = t.sb.path("key.txt");
    let recipient = age_keygen(&key);
    let first = t
        .dump(&["--uri", &t.server.url, "--database", &db.name])
        .ok()
        .artifact();
    let second = t
        .dump(&[
            "--uri",
            &t.server.url,
            "--database",
            &db.name,
            "--compress",
            "gzip",
            "--encrypt-to",
            &recipient,
        ])
        .ok()
        .artifact();
    let ids = |run: &Run| -> Vec<String> { run.artifacts().into_iter().map(|a| a.id).collect() };
    let (store, copies) = (t.sb.store(), t.sb.path("copies").display().to_string());

    let listed = t.sb.run("bk-ls", &[&store]).ok();
    assert_eq!(ids(&listed), [first.id.clone(), second.id.clone()]);
    assert!(listed.artifacts().iter().all(|a| a.engine == "mongodb"));

    let shipped = t.sb.run("bk-ship", &["--from", &store, "--to", &copies]).ok();
    assert_eq!(ids(&shipped), [first.id.clone(), second.id.clone()]);

    let verified =
        t.sb.run(
            "bk-verify",
            &["--from", &copies, "--all", "--identity", &key.display().to_string()],
        )
        .ok();
    let outcomes: Vec<(Value, Value, Value)> = verified
        .records()
        .into_iter()
        .filter_map(|r| match r {
            bk_core::record::Record::Verified(v) => Some((v["id"].clone(), v["ok"].clone(), v["level"].clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            (json!(first.id), json!(true), json!("integrity")),
            (json!(second.id), json!(true), json!("integrity"))
        ]
    );

    let (kept, pruned) = t.sb.run("bk-prune", &[&copies, "--keep-last", "1"]).ok().decisions();
    let kept: Vec<&str> = kept.iter().map(|k| k.id.as_str()).collect();
    let pruned: Vec<&str> = pruned.iter().map(|p| p.id.as_str()).collect();
    assert_eq!((kept, pruned), (vec![second.id.as_str()], vec![first.id.as_str()]));
    assert_eq!(ids(&t.sb.run("bk-ls", &[&copies]).ok()), [second.id]);
}

/// Counts are what the artifact holds, whatever the server does meanwhile: a writer inserts
/// all through the dump (each collection's find is point-in-time on nx-27017, which reads
/// the whole result at once; a real standalone mongod gives no such promise).
#[test]
fn counts_are_exact_while_others_write() {
    let Some(t) = setup() else { return };
    let db = t.database(SEED);
    let mut writer = t
        .server
        .python_cmd(
            "import time\nfor i in range(10**6):\n    client[sys.argv[1]].people.insert_one({'_id': 10**6 + i})\n",
            &[&db.name],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the writer");
    let before = t.server.digests(&db.name)[format!("{}.people", db.name)]["count"]
        .as_u64()
        .unwrap();
    let artifact = t
        .dump(&["--uri", &t.server.url, "--database", &db.name])
        .ok()
        .artifact();
    let after = t.server.digests(&db.name)[format!("{}.people", db.name)]["count"]
        .as_u64()
        .unwrap();
    let _ = writer.kill();
    let _ = writer.wait();
    let people = artifact.counts[&format!("{}.people", db.name)];
    assert!(before <= people && people <= after, "{before} <= {people} <= {after}");
    assert!(before < after, "the writer wrote during the dump");
    let archive = t.archive(&artifact);
    let counts = |digests: &Value| -> BTreeMap<String, u64> {
        let map = digests.as_object().expect("digests");
        map.iter()
            .map(|(ns, d)| (ns.clone(), d["count"].as_u64().unwrap()))
            .collect()
    };
    assert_eq!(counts(&read_with_bk(&archive)), artifact.counts);
    assert_eq!(counts(&t.server.read_archive(&archive)["namespaces"]), artifact.counts);
}

/// The server killed while the dump copies documents: an error record named after the
/// backup, exit 69, and nothing in the store, not even a temporary file.
#[test]
fn the_server_dying_mid_dump_leaves_nothing() {
    let Some(t) = setup() else { return };
    let mut private = t.server.start_private(&t.sb);
    // 48 MiB that no compressor shrinks, in 48 documents: many replies and slow zstd work.
    private.server.python(
        "import os\nfor c in range(4):\n    client.big[f'c{c}'].insert_many([{'_id': i, 'pad': os.urandom(1 << 20)} for i in range(12)])\n",
        &[],
    );
    let store = t.sb.store();
    let child = t.sb.spawn(
        "bk-dump",
        &[
            "mongodb",
            "--uri",
            &private.server.url,
            "--database",
            "big",
            "--level",
            "19",
            "--to",
            &store,
        ],
    );
    // The temporary file appears when the dump starts writing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while bk_tests::files_below(&t.sb.path("store")).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the dump never started");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    private.kill();
    let run = Run::from(child.wait_with_output().expect("bk-dump"));
    let e = run.failed("the server killed mid-dump", 69, &["reading big."]);
    assert_eq!(e.name.as_deref(), Some("mongodb-big"));
    assert_eq!(
        bk_tests::files_below(&t.sb.path("store")),
        Vec::<std::path::PathBuf>::new()
    );
}

// ---- bk-restore and bk-verify --scratch ----

/// Index keys per collection of `db` ({"coll": [["field", ...], ...]}): nx-27017 renames
/// indexes and sorts compound keys, so the key fields are what can be compared.
const INDEX_KEYS: &str = r#"
db = client[sys.argv[1]]
print(json.dumps({c: sorted(sorted(i["key"].keys()) for i in db[c].list_indexes()) for c in db.list_collection_names()}))
"#;

/// A small database: `people` (300 documents, an index on `name`, another unique on `tag`)
/// and `empty`.
const SMALL: &str = r#"
db = client[sys.argv[1]]
db.people.insert_many([{"_id": i, "name": f"n{i}", "tag": f"t{i}", "n": i * 2**33} for i in range(300)])
db.people.create_index([("name", 1)])
db.people.create_index([("tag", 1)], unique=True)
db.create_collection("empty")
"#;

/// Changes `people` and adds `extra`, which no backup holds.
const CHANGE: &str = r#"
db = client[sys.argv[1]]
db.people.delete_many({"_id": {"$lt": 100}})
db.people.insert_one({"_id": "new"})
db.extra.insert_one({"_id": 1})
"#;

impl Mongo {
    /// `bk-restore` of `artifact` (its record on stdin) with `args`, on the test server.
    fn restore(&self, artifact: &Artifact, args: &[&str]) -> Run {
        let mut all = vec!["--uri", &self.server.url];
        all.extend(args);
        self.sb
            .run_with_stdin("bk-restore", &all, &bk_tests::artifact_line(artifact))
    }

    /// The per-collection digests of `db`, keyed by collection alone.
    fn collections(&self, db: &str) -> Value {
        let all = self.server.digests(db);
        let prefix = format!("{db}.");
        Value::Object(
            all.as_object()
                .expect("digests")
                .iter()
                .map(|(k, v)| (k.strip_prefix(&prefix).unwrap_or(k).to_string(), v.clone()))
                .collect(),
        )
    }

    /// The artifact of a dump of `db`.
    fn backup(&self, db: &str) -> Artifact {
        self.dump(&["--uri", &self.server.url, "--database", db])
            .ok()
            .artifact()
    }

    /// The names of the collections of `db` that bk-restore made as temporaries.
    fn temporaries(&self, db: &str) -> Vec<String> {
        let out = self.server.python(
            "print(json.dumps([c for c in client[sys.argv[1]].list_collection_names() if c.startswith('bk_restore_')]))",
            &[db],
        );
        serde_json::from_str(&out).expect("names")
    }

    /// `artifact` rewritten with its archive edited by `edit` (the manifest's sha256 made to
    /// match: only the content can tell).
    fn edited(&self, artifact: &Artifact, edit: impl FnOnce(&mut Vec<u8>)) -> Artifact {
        let mut archive = unzstd(&artifact.location);
        edit(&mut archive);
        // A store of its own: a location ends in <name>/<file>.
        let file = Path::new(&artifact.location).file_name().expect("a file name");
        let dir = self.sb.path(&unique_name("edited_")).join(&artifact.name);
        std::fs::create_dir_all(&dir).expect("the copy's directory");
        let copy = dir.join(file);
        std::fs::copy(&artifact.location, &copy).expect("copying the artifact");
        let mut moved = artifact.clone();
        moved.location = copy.display().to_string();
        bk_tests::rewrite_artifact(&moved, &archive)
    }
}

/// The position of `needle` in `haystack` (the last one).
fn position(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .rposition(|w| w == needle)
        .expect("the bytes are in the archive")
}

#[test]
fn a_restore_into_another_database_gives_the_same_documents_and_indexes() {
    let Some(t) = setup() else { return };
    let source = t.database(SEED);
    let artifact = t.backup(&source.name);
    let copy = t.server.database(&db_name());
    let run = t.restore(&artifact, &["--database", &copy.name]).ok();
    let restored = run.restored();
    let expected: BTreeMap<String, u64> = ["people", "empty", "large"]
        .iter()
        .map(|c| {
            (
                format!("{}.{c}", copy.name),
                artifact.counts[&format!("{}.{c}", source.name)],
            )
        })
        .collect();
    assert_eq!(restored.counts, expected);
    assert!(restored.complete);
    assert_eq!(restored.target["database"], copy.name.as_str());
    assert_eq!(restored.target["port"], t.server.port);
    assert_eq!(
        t.collections(&copy.name),
        t.collections(&source.name),
        "every document byte for byte"
    );
    let indexes = |db: &str| -> Value { serde_json::from_str(&t.server.python(INDEX_KEYS, &[db])).unwrap() };
    assert_eq!(indexes(&copy.name), indexes(&source.name));
    assert_eq!(indexes(&copy.name)["people"], json!([["_id"], ["name"]]));

    // A subset: only what --collection names, and the record says it is partial.
    let subset = t.server.database(&db_name());
    let run = t
        .restore(&artifact, &["--database", &subset.name, "--collection", "people"])
        .ok();
    let restored = run.restored();
    assert_eq!(
        restored.counts,
        BTreeMap::from([(format!("{}.people", subset.name), 1000)])
    );
    assert!(!restored.complete);
    assert_eq!(
        t.collections(&subset.name),
        json!({"people": t.collections(&source.name)["people"]})
    );
    let run = t
        .restore(&artifact, &["--database", &subset.name, "--collection", "nothing"])
        .code(66);
    assert!(
        run.error().message.contains("no collection \"nothing\""),
        "{}",
        run.stderr
    );
}

#[test]
fn a_non_empty_target_is_refused_and_replace_puts_the_backup_in_its_place() {
    let Some(t) = setup() else { return };
    let db = t.database(SMALL);
    let backed_up = t.collections(&db.name);
    let artifact = t.backup(&db.name);
    t.server.python(CHANGE, &[&db.name]);
    let changed = t.collections(&db.name);

    let run = t.restore(&artifact, &[]).code(73);
    assert!(run.error().message.contains("pass --replace"), "{}", run.stderr);
    assert_eq!(t.collections(&db.name), changed, "the target untouched");

    let run = t.restore(&artifact, &["--replace"]).ok();
    assert_eq!(run.restored().counts, artifact.counts);
    let mut expected = backed_up.clone();
    expected["extra"] = changed["extra"].clone();
    assert_eq!(
        t.collections(&db.name),
        expected,
        "the backup's collections replaced, the others left alone"
    );
    assert_eq!(t.temporaries(&db.name), Vec::<String>::new());
    let keys: Value = serde_json::from_str(&t.server.python(INDEX_KEYS, &[&db.name])).unwrap();
    assert_eq!(keys["people"], json!([["_id"], ["name"], ["tag"]]));
}

/// A change made to an archive's bytes.
type Edit = Box<dyn FnOnce(&mut Vec<u8>)>;

#[test]
fn replace_with_a_bad_archive_leaves_the_target_untouched() {
    let Some(t) = setup() else { return };
    let db = t.database(SMALL);
    let artifact = t.backup(&db.name);
    t.server.python(CHANGE, &[&db.name]);
    let changed = t.collections(&db.name);
    let cases: [(&str, Edit, &str); 2] = [
        (
            "a document's byte changed",
            Box::new(|a: &mut Vec<u8>| {
                let at = position(a, b"n299\0");
                a[at + 1] = b'8';
            }),
            "CRC mismatch",
        ),
        (
            "the archive cut short",
            Box::new(|a: &mut Vec<u8>| a.truncate(a.len() - 100)),
            "truncated",
        ),
    ];
    for (case, edit, says) in cases {
        let bad = t.edited(&artifact, edit);
        let run = t.restore(&bad, &["--replace"]).code(65);
        let e = run.error();
        assert!(e.message.contains(says), "{case}: {}", e.message);
        assert!(e.message.contains("was left as it was"), "{case}: {}", e.message);
        assert_eq!(t.collections(&db.name), changed, "{case}: the target untouched");
        assert_eq!(t.temporaries(&db.name), Vec::<String>::new(), "{case}: no temporaries");
    }
    // A manifest whose count the archive does not match: found before anything is swapped.
    let mut lying = artifact.clone();
    *lying.counts.get_mut(&format!("{}.people", db.name)).expect("people") += 1;
    let run = t.restore(&lying, &["--replace"]).code(65);
    assert!(
        run.error().message.contains("the archive holds 300 documents of"),
        "{}",
        run.stderr
    );
    assert_eq!(t.collections(&db.name), changed, "the target untouched");
    assert_eq!(t.temporaries(&db.name), Vec::<String>::new());
}

/// The archive at `path` written again by bk's writer with the first document of every
/// collection twice: a sound archive (its CRCs and counts match) that no server restores,
/// the same `_id` coming twice. Its counts, one more per non-empty collection.
fn with_duplicates(archive: &[u8]) -> (Vec<u8>, BTreeMap<String, u64>) {
    let mut reader = ArchiveReader::open(archive).expect("a sound archive");
    let prelude = reader.prelude().to_vec();
    let header = reader.header().clone();
    let mut out = Vec::new();
    let mut writer = ArchiveWriter::start(&mut out, &header, &prelude).expect("writing");
    let mut open = None;
    let mut counts = BTreeMap::new();
    while let Some(event) = reader.next_event().expect("every block is sound") {
        let namespace = match &event {
            Event::Document { namespace, .. } | Event::End { namespace, .. } => *namespace,
        };
        if open != Some(namespace) {
            let ns = &prelude[namespace];
            writer.begin(&ns.db, &ns.collection).expect("writing");
            open = Some(namespace);
            if let Event::Document { bytes, .. } = &event {
                writer.document(bytes).expect("writing");
            }
        }
        match event {
            Event::Document { bytes, .. } => writer.document(bytes).expect("writing"),
            Event::End { .. } => {
                counts.insert(prelude[namespace].name(), writer.end().expect("writing"));
                open = None;
            }
        }
    }
    drop(writer);
    (out, counts)
}

#[test]
fn a_killed_restore_leaves_the_target_and_old_temporaries_are_dropped() {
    let Some(t) = setup() else { return };
    // 40 MiB of documents: the restore takes a while on nx-27017.
    let db = t.database(
        "import os\nclient[sys.argv[1]].big.insert_many([{'_id': i, 'pad': os.urandom(1 << 20)} for i in range(40)])\n",
    );
    let backed_up = t.collections(&db.name);
    let artifact = t.backup(&db.name);
    t.server.python(CHANGE, &[&db.name]);
    let changed = t.collections(&db.name);
    let old = "bk_restore_1000_abcdef_0";
    let mut child = bk_tests::spawn_with_stdin(
        {
            let mut cmd = std::process::Command::new(bk_tests::bin("bk-restore"));
            cmd.args(["--uri", &t.server.url, "--replace"]);
            cmd
        },
        &bk_tests::artifact_line(&artifact),
    );
    // Killed once its temporary holds documents.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let filling = t.server.python(
            "db = client[sys.argv[1]]\nprint(sum(db[c].estimated_document_count() for c in db.list_collection_names() if c.startswith('bk_restore_') and c != sys.argv[2]))",
            &[&db.name, old],
        );
        if filling.trim() != "0" {
            break;
        }
        assert!(
            child.try_wait().expect("waiting").is_none(),
            "the restore ended before it was killed"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the restore never loaded anything"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("waiting");
    assert_eq!(
        t.collections(&db.name).get("big"),
        changed.get("big"),
        "the target untouched"
    );

    // What a restore killed a day ago left.
    t.server
        .python("client[sys.argv[1]][sys.argv[2]].insert_one({})", &[&db.name, old]);

    let run = t.restore(&artifact, &["--replace"]).ok();
    assert!(
        run.stderr.contains(&format!(
            "dropping {}.{old}, a temporary collection left by an interrupted restore",
            db.name
        )),
        "{}",
        run.stderr
    );
    let temporaries = t.temporaries(&db.name);
    assert!(!temporaries.contains(&old.to_string()), "{temporaries:?}");
    // The killed run's own temporary is a day from being taken for a leftover.
    assert!(temporaries.len() <= 1, "{temporaries:?}");
    assert_eq!(t.collections(&db.name)["big"], backed_up["big"]);
}

/// Scratch databases bk-verify left on the test server.
fn scratch_databases(server: &MongoServer) -> Vec<String> {
    let out = server.python(
        "print(json.dumps([d for d in database_names() if d.startswith('bk_verify_')]))",
        &[],
    );
    serde_json::from_str(&out).expect("names")
}

#[test]
fn verify_restores_into_a_scratch_database_and_drops_it() {
    let Some(t) = setup() else { return };
    let db = t.database(SMALL);
    let artifact = t.backup(&db.name);
    let verify = |a: &Artifact| {
        t.sb.run_with_stdin(
            "bk-verify",
            &["--scratch", "--uri", &t.server.url],
            &bk_tests::artifact_line(a),
        )
    };
    let run = verify(&artifact).ok();
    let verified: Value = serde_json::from_str(run.lines()[0]).expect("a verified record");
    assert_eq!(verified["ok"], true, "{}", run.stdout);
    assert_eq!(verified["level"], "restore");
    assert_eq!(verified["checks"]["restore"]["ok"], true);
    assert_eq!(verified["checks"]["restore"]["compared"], 2);
    assert_eq!(scratch_databases(&t.server), Vec::<String>::new());

    // Sound and counted right, but the server refuses it: a bad backup, and no scratch left.
    let (content, counts) = with_duplicates(&unzstd(&artifact.location));
    let mut bad = t.edited(&artifact, |a| *a = content);
    bad.counts = counts;
    let run = verify(&bad).code(65);
    let verified: Value = serde_json::from_str(run.lines()[0]).expect("a verified record");
    assert_eq!(verified["ok"], false);
    assert_eq!(verified["checks"]["integrity"]["ok"], true);
    assert_eq!(verified["checks"]["restore"]["ok"], false);
    assert!(run.error().message.contains("does not restore"), "{}", run.stderr);
    assert_eq!(scratch_databases(&t.server), Vec::<String>::new());
}

#[test]
fn a_hostile_manifest_or_archive_does_not_aim_a_restore_at_the_servers_own_databases() {
    let Some(t) = setup() else { return };
    let source = t.database(SEED);
    let artifact = t.backup(&source.name);
    let before = t.collections(&source.name);

    // A manifest that names `admin` (its sha256 still matches: the file is untouched).
    let mut admin = artifact.clone();
    admin.source.database = Some("admin".to_string());
    let run = t.restore(&admin, &[]);
    assert_eq!(run.code, 65, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    assert!(
        run.error().message.contains("the server's own database admin"),
        "{}",
        run.error().message
    );

    // A target the server cannot take.
    let run = t.restore(&artifact, &["--database", "a.b"]);
    assert_eq!(run.code, 64, "stderr: {}", run.stderr);

    // An archive naming a collection no dump writes (`$` in its name), under --replace.
    let hostile = t.edited(&artifact, |archive| {
        while let Some(at) = archive.windows(6).position(|w| w == b"people") {
            archive[at + 3] = b'$';
        }
    });
    let run = t.restore(&hostile, &["--replace"]);
    assert_eq!(run.code, 65, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    assert!(
        run.error().message.contains("which no dump writes"),
        "{}",
        run.error().message
    );
    assert_eq!(t.collections(&source.name), before, "the target untouched");
}
