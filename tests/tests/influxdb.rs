//! The influxdb engine against a real InfluxDB 1.x (influxd from apt, started by
//! tests/services.sh; one test starts a private one it can kill): round trips compared point
//! by point, counts read from the artifact's TSM blocks against the server's count(*), and
//! every refusal and failure leaving the old data and nothing behind.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};

use bk_core::record::Artifact;
use bk_tests::{artifact_line, influx_server, unique_name, InfluxServer, Sandbox};
use serde_json::Value;

/// Held by every bk-verify --scratch on the shared server: each sweeps the day-old scratch
/// databases, which would take the one the sweep test leaves before its own run sees it.
static SCRATCH: Mutex<()> = Mutex::new(());

fn scratch_lock() -> MutexGuard<'static, ()> {
    SCRATCH.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// bk-verify --scratch of `a` on the shared server, which must pass.
fn verify_scratch(sb: &Sandbox, conn: &[String], a: &Artifact) -> bk_tests::Run {
    let _lock = scratch_lock();
    sb.run_with_stdin("bk-verify", &args(conn, &["--scratch"]), &artifact_line(a))
        .ok()
}

/// Measurements with tags and fields of every type, sparse points, nanosecond timestamps
/// (irregular and regular: simple8b and RLE blocks), a measurement name needing escapes,
/// in three retention policies.
fn fill(server: &InfluxServer, db: &str) {
    for rp in ["week", "forever"] {
        server.query(&format!(
            "CREATE RETENTION POLICY \"{rp}\" ON \"{db}\" DURATION 0s REPLICATION 1 SHARD DURATION 1w"
        ));
    }
    let mut lines = String::new();
    for i in 0..500u64 {
        let t = 1_700_000_000_123_456_789 + i * 1_000_003_007;
        let host = ["a", "b", "c"][(i % 3) as usize];
        if i % 4 == 0 {
            // sparse: one field only
            lines.push_str(&format!("cpu,host={host},region=eu usage={}.25 {t}\n", i));
        } else {
            lines.push_str(&format!(
                "cpu,host={host},region=eu usage={}.5,n={}i,state=\"s {i}, \\\"q\\\" é\",up={} {t}\n",
                i,
                i as i64 - 250,
                i % 2 == 0
            ));
        }
    }
    for i in 0..300u64 {
        lines.push_str(&format!(
            "mem,host=a free={}i {}\n",
            i * 7,
            1_700_000_000_000_000_000 + i * 10_000_000_000
        ));
    }
    lines.push_str("my\\ odd\\,name,tag\\ key=v\\ 1 f=1 1700000000000000001\n");
    server.write(db, "autogen", &lines);
    server.write(
        db,
        "week",
        "cpu,host=z usage=1 1700000000000000000\ncpu,host=z usage=2,up=false 1700000000000000001\n",
    );
    server.write(db, "forever", "events,kind=boot msg=\"up\" 946684800000000000\n");
}

/// The server's field values per `database.measurement` (count(*) summed over fields and
/// retention policies), keyed by measurement: what the manifest's counts must equal.
fn server_counts(server: &InfluxServer, db: &str) -> Vec<(String, u64)> {
    let mut counts = std::collections::BTreeMap::new();
    for rp in policies(server, db) {
        let result = server.query(&format!("SELECT count(*) FROM \"{db}\".\"{rp}\"./.*/"));
        for series in result["series"].as_array().into_iter().flatten() {
            let n: u64 = series["values"][0]
                .as_array()
                .unwrap()
                .iter()
                .skip(1)
                .filter_map(Value::as_u64)
                .sum();
            *counts.entry(series["name"].as_str().unwrap().to_string()).or_insert(0) += n;
        }
    }
    counts.into_iter().collect()
}

fn policies(server: &InfluxServer, db: &str) -> Vec<String> {
    server.query(&format!("SHOW RETENTION POLICIES ON \"{db}\""))["series"][0]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row[0].as_str().unwrap().to_string())
        .collect()
}

/// Everything a database holds, point by point: per retention policy and measurement, every
/// series (tags) with every point (time and fields), and the field keys with their types.
fn content(server: &InfluxServer, db: &str) -> Value {
    let mut all = serde_json::Map::new();
    for rp in policies(server, db) {
        let series = server.query(&format!("SELECT * FROM \"{db}\".\"{rp}\"./.*/ GROUP BY *"))["series"].clone();
        all.insert(rp.clone(), series);
    }
    all.insert(
        "field keys".into(),
        server.query(&format!("SHOW FIELD KEYS ON \"{db}\""))["series"].clone(),
    );
    all.insert(
        "policies".into(),
        server.query(&format!("SHOW RETENTION POLICIES ON \"{db}\""))["series"].clone(),
    );
    Value::Object(all)
}

/// The manifest's counts keyed by measurement alone (the database may be another).
fn by_measurement(a: &Artifact) -> Vec<(String, u64)> {
    a.counts
        .iter()
        .map(|(k, v)| (k.split_once('.').unwrap().1.to_string(), *v))
        .collect()
}

/// The server's options, then `more`: bk-restore's and bk-verify's arguments.
fn args<'a>(server: &'a [String], more: &[&'a str]) -> Vec<&'a str> {
    server.iter().map(String::as_str).chain(more.iter().copied()).collect()
}

/// bk-dump influxdb with the server's options, then `more`.
fn dump_args<'a>(server: &'a [String], more: &[&'a str]) -> Vec<&'a str> {
    std::iter::once("influxdb").chain(args(server, more)).collect()
}

#[test]
fn round_trip_point_by_point_with_exact_counts() {
    let Some(server) = influx_server() else { return };
    let sb = Sandbox::new();
    let db = unique_name("bk_influx_src_");
    let copy = unique_name("bk_influx_copy_");
    let mut guard = server.database(&db);
    guard.also(&copy);
    fill(&server, &db);
    let conn = server.args();

    let a = sb.dump(&dump_args(&conn, &["--database", &db]));
    assert_eq!((a.engine.as_str(), a.format.as_str()), ("influxdb", "influx-tar"));
    assert_eq!(a.name, format!("influxdb-{db}"));
    assert_eq!(a.source.database.as_deref(), Some(db.as_str()));
    assert_eq!(a.tool.program, "influxd");
    // The shards are gzip'd: not compressed again by default.
    assert!(a.file.ends_with(".influx-tar"), "{}", a.file);
    // Exact, from the TSM blocks: cpu has 500 points in autogen, 125 of them with one field
    // (4 fields otherwise), and 2 points with 1 and 2 fields in week.
    let cpu = 125 + 375 * 4 + 3;
    assert_eq!(a.counts[&format!("{db}.cpu")], cpu);
    assert_eq!(a.counts[&format!("{db}.mem")], 300);
    assert_eq!(a.counts[&format!("{db}.my odd,name")], 1);
    assert_eq!(a.counts[&format!("{db}.events")], 1);
    assert_eq!(by_measurement(&a), server_counts(&server, &db));

    // The tar holds what influxd restore -portable reads, and nothing else.
    let listing = String::from_utf8(bk_tests::output_of(Command::new("tar").args(["-tf", &a.location]))).unwrap();
    let names: Vec<&str> = listing.lines().collect();
    assert!(names.iter().any(|n| n.ends_with(".meta")), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with(".manifest")), "{names:?}");
    assert!(names.iter().all(|n| !n.contains('/')), "{names:?}");

    let restored = sb
        .run_with_stdin("bk-restore", &args(&conn, &["--database", &copy]), &artifact_line(&a))
        .ok()
        .restored();
    assert_eq!(restored.target["database"], copy.as_str());
    assert!(restored.complete);
    assert_eq!(content(&server, &copy), content(&server, &db));
    assert_eq!(server_counts(&server, &copy), by_measurement(&a));

    // Restoring over it is refused without --replace, and nothing changes.
    let refused = sb.run_with_stdin("bk-restore", &args(&conn, &["--database", &copy]), &artifact_line(&a));
    refused.failed("existing target", 73, &["exists", "--replace"]);
    assert_eq!(content(&server, &copy), content(&server, &db));

    // bk-verify at both levels; its scratch database is gone afterwards.
    let verified = verify_scratch(&sb, &conn, &a);
    assert!(verified.stdout.contains(r#""level":"restore""#), "{}", verified.stdout);
    assert!(verified.stdout.contains(r#""ok":true"#), "{}", verified.stdout);
    assert!(
        !server.databases().iter().any(|d| d.starts_with("bk_verify_")),
        "{:?}",
        server.databases()
    );
}

/// Deleted points not yet compacted away are still in the shard's TSM file, with a tombstone
/// that influxd restore leaves out: they come back with a restore, so they are counted, and
/// the dump says so. (One TSM file, so no level compaction; the compactor's tombstone rewrite
/// may still come first, see below. Overlapping blocks of several files, which the server's
/// compactions merge at their own time, are tested in tsm.rs.)
#[test]
fn uncompacted_deletes_come_back_with_a_restore_and_the_dump_says_so() {
    let Some(server) = influx_server() else { return };
    let sb = Sandbox::new();
    let db = unique_name("bk_influx_del_");
    let copy = unique_name("bk_influx_delcopy_");
    let mut guard = server.database(&db);
    guard.also(&copy);
    let conn = server.args();
    let at = |i: u64| 1_700_000_000_000_000_000 + i * 1_000_000_000;
    let points: String = (0..100).map(|i| format!("m,s=x v={i} {}\n", at(i))).collect();
    server.write(&db, "autogen", &points);
    // A backup flushes the cache into a TSM file: the delete then writes a tombstone.
    let before = sb.dump(&dump_args(&conn, &["--database", &db]));
    assert_eq!(before.counts[&format!("{db}.m")], 100);
    server
        .try_query_in(&db, &format!("DELETE FROM m WHERE time < {}", at(50)))
        .unwrap();
    assert_eq!(
        server_counts(&server, &db),
        [("m".to_string(), 50)],
        "50..99 on the server"
    );
    let run = sb
        .run("bk-dump", &dump_args(&conn, &["--database", &db, "--to", &sb.store()]))
        .ok();
    let a = run.artifact();
    // The server's compactor may apply the tombstone (a rewrite of the file without the
    // deleted values) between the DELETE and the backup, about once a second: then there is
    // nothing deleted in the backup, and nothing to say. Either way the count is what a
    // restore holds.
    let counted = a.counts[&format!("{db}.m")];
    let warned =
        run.stderr.contains("50 field value(s) in the backup were deleted") && run.stderr.contains("brings them back");
    match counted {
        100 => assert!(warned, "{}", run.stderr),
        50 => assert!(!run.stderr.contains("deleted"), "compacted first: {}", run.stderr),
        other => panic!("{other} values counted, 100 (not compacted yet) or 50 expected"),
    }
    sb.run_with_stdin("bk-restore", &args(&conn, &["--database", &copy]), &artifact_line(&a))
        .ok();
    assert_eq!(server_counts(&server, &copy), [("m".to_string(), counted)]);
    verify_scratch(&sb, &conn, &a);
}

#[test]
fn an_empty_database_round_trips() {
    let Some(server) = influx_server() else { return };
    let sb = Sandbox::new();
    let db = unique_name("bk_influx_empty_");
    let copy = unique_name("bk_influx_emptycopy_");
    let mut guard = server.database(&db);
    guard.also(&copy);
    let conn = server.args();
    let a = sb.dump(&dump_args(&conn, &["--database", &db]));
    assert!(a.counts.is_empty(), "{:?}", a.counts);
    sb.run_with_stdin("bk-restore", &args(&conn, &["--database", &copy]), &artifact_line(&a))
        .ok();
    assert!(server.databases().contains(&copy));
    verify_scratch(&sb, &conn, &a);
}

#[test]
fn verify_drops_scratch_databases_a_killed_run_left() {
    let Some(server) = influx_server() else { return };
    let sb = Sandbox::new();
    let _lock = scratch_lock();
    let db = unique_name("bk_influx_sweep_");
    let _guard = server.database(&db);
    // A day-old stamp: a killed run's leftover. A fresh one may be a running verify's.
    let (old, fresh) = (
        format!("bk_verify_1000_{}", unique_name("")),
        bk_engines::stamped_name("bk_verify_"),
    );
    let _leftovers = {
        let mut g = server.database(&old);
        g.also(&fresh);
        server.query(&format!("CREATE DATABASE \"{fresh}\""));
        g
    };
    let conn = server.args();
    server.write(&db, "autogen", "t v=1 1\n");
    let a = sb.dump(&dump_args(&conn, &["--database", &db]));
    let run = sb
        .run_with_stdin("bk-verify", &args(&conn, &["--scratch"]), &artifact_line(&a))
        .ok();
    assert!(run.stderr.contains(&format!("dropping {old}")), "{}", run.stderr);
    let left = server.databases();
    assert!(!left.contains(&old) && left.contains(&fresh), "{left:?}");
}

#[test]
fn a_missing_database_or_server_fails_without_an_artifact() {
    let Some(server) = influx_server() else { return };
    let sb = Sandbox::new();
    let conn = server.args();
    let missing = unique_name("bk_influx_nope_");
    let run = sb.run(
        "bk-dump",
        &dump_args(&conn, &["--database", &missing, "--to", &sb.store()]),
    );
    run.failed("missing database", 66, &[&missing]);
    let port = bk_tests::free_port().to_string();
    let run = sb.run(
        "bk-dump",
        &["influxdb", "--host", "127.0.0.1", "--port", &port, "--to", &sb.store()],
    );
    run.failed("no server", 69, &["cannot be reached"]);
    // The HTTP API answers but nothing listens on the RPC port: influxd backup is stopped at
    // its first refused connection instead of retrying for minutes.
    let db = unique_name("bk_influx_rpc_");
    let _guard = server.database(&db);
    let run = sb.run(
        "bk-dump",
        &[
            "influxdb",
            "--host",
            &server.host,
            "--port",
            &server.port.to_string(),
            "--rpc-port",
            &port,
            "--database",
            &db,
            "--to",
            &sb.store(),
        ],
    );
    run.failed("no RPC", 69, &["influxd stopped", "connection refused"]);
    assert!(!Path::new(&sb.store())
        .join(format!("influxdb-{db}"))
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some()));
}

#[test]
fn credentials_come_from_a_private_file() {
    let Some(server) = influx_server() else { return };
    let sb = Sandbox::new();
    let file = sb.path("influx.cred");
    std::fs::write(&file, "username=bk\npassword=s3cret-pw\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let conn = server.args();
    let run = sb.run(
        "bk-dump",
        &dump_args(&conn, &["--credentials-file", bk_tests::s(&file), "--to", &sb.store()]),
    );
    run.failed("loose credentials", 78, &["chmod 600"]);
    run.assert_hides("loose credentials", &["s3cret-pw"]);
}

/// The artifact's stored bytes (it is not compressed) replaced by `content`, and its record
/// with a matching sha256 and size: only the content can tell that something is wrong.
fn rewrite_plain(a: &Artifact, content: &[u8]) -> Artifact {
    use sha2::Digest;
    std::fs::write(&a.location, content).unwrap();
    let mut b = a.clone();
    b.sha256 = hex::encode(sha2::Sha256::digest(content));
    b.bytes = content.len() as u64;
    b.content_bytes = content.len() as u64;
    b
}

#[test]
fn replace_never_drops_the_old_data_before_the_backup_is_checked() {
    let Some(server) = influx_server() else { return };
    let sb = Sandbox::new();
    let db = unique_name("bk_influx_rep_");
    let _guard = server.database(&db);
    let conn = server.args();
    server.write(&db, "autogen", "t v=1 1000000000\nt v=2 2000000000\n");
    let a = sb.dump(&dump_args(&conn, &["--database", &db]));
    server.write(&db, "autogen", "t v=3 3000000000\nnew w=1 1000000000\n");
    let changed = content(&server, &db);
    let original = std::fs::read(&a.location).unwrap();

    // A shard whose bytes are damaged (its gzip fails), the counts of the manifest wrong, a
    // tar cut short: each refused before the server is touched.
    // A shard's tar header: its name, NUL-padded (the manifest's JSON names it too).
    let name_end = original.windows(8).position(|w| w == b".tar.gz\0").unwrap();
    let mut damaged = original.clone();
    let data = (name_end / 512 + 1) * 512 + 40;
    damaged[data] ^= 0xff;
    let mut miscounted = a.clone();
    miscounted.counts.insert(format!("{db}.t"), 5);
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("damaged shard", damaged, "gzip"),
        ("truncated", original[..original.len() - 2048].to_vec(), "truncated"),
        ("miscounted", original.clone(), "differ"),
    ];
    for (case, bytes, says) in cases {
        let mut artifact = rewrite_plain(&a, &bytes);
        if case == "miscounted" {
            artifact.counts = miscounted.counts.clone();
        }
        let run = sb.run_with_stdin("bk-restore", &args(&conn, &["--replace"]), &artifact_line(&artifact));
        run.failed(case, 65, &[says]);
        assert_eq!(content(&server, &db), changed, "{case}: the old data stays");
        assert!(
            !server.databases().iter().any(|d| d.starts_with("bk_restore_")),
            "{case}: {:?}",
            server.databases()
        );
    }

    std::fs::write(&a.location, &original).unwrap();
    // A restore the server cannot take (nothing listens on the RPC port): the old data stays.
    let port = bk_tests::free_port().to_string();
    let no_rpc = [
        "--host",
        &server.host,
        "--port",
        &server.port.to_string(),
        "--rpc-port",
        &port,
        "--replace",
    ]
    .map(String::from);
    let run = sb.run_with_stdin("bk-restore", &args(&no_rpc, &[]), &artifact_line(&a));
    run.failed("no RPC", 69, &["connection refused", "was left as it was"]);
    assert_eq!(content(&server, &db), changed, "no RPC: the old data stays");
    assert!(!server.databases().iter().any(|d| d.starts_with("bk_restore_")));

    let restored = sb
        .run_with_stdin("bk-restore", &args(&conn, &["--replace"]), &artifact_line(&a))
        .ok()
        .restored();
    assert_eq!(restored.counts, a.counts);
    let points = server.query(&format!("SELECT v FROM \"{db}\".\"autogen\".\"t\""))["series"][0]["values"].clone();
    assert_eq!(
        points,
        serde_json::json!([[1_000_000_000u64, 1], [2_000_000_000u64, 2]])
    );
    assert!(server.query(&format!("SELECT * FROM \"{db}\".\"autogen\".\"new\""))["series"].is_null());
    assert!(!server.databases().iter().any(|d| d.starts_with("bk_restore_")));
}

/// influxd restore opens the files its manifest names, relative to the backup's directory:
/// an artifact whose manifest names a file outside it is refused before anything is restored.
#[test]
fn a_manifest_naming_a_file_outside_the_artifact_is_refused() {
    let Some(server) = influx_server() else { return };
    let sb = Sandbox::new();
    let db = unique_name("bk_influx_hostile_");
    let copy = unique_name("bk_influx_hostilecopy_");
    let mut guard = server.database(&db);
    guard.also(&copy);
    let conn = server.args();
    server.write(&db, "autogen", "t v=1 1\n");
    let a = sb.dump(&dump_args(&conn, &["--database", &db]));
    let dir = sb.path("unpacked");
    std::fs::create_dir(&dir).unwrap();
    bk_tests::output_of(Command::new("tar").args(["-xf", &a.location, "-C"]).arg(&dir));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let manifest = dir.join(names.iter().find(|n| n.ends_with(".manifest")).unwrap());
    let text = std::fs::read_to_string(&manifest).unwrap();
    let meta = names.iter().find(|n| n.ends_with(".meta")).unwrap();
    std::fs::write(&manifest, text.replace(meta.as_str(), "../../../../etc/passwd")).unwrap();
    let tarred = sb.path("hostile.tar");
    bk_tests::output_of(
        Command::new("tar")
            .arg("-cf")
            .arg(&tarred)
            .arg("-C")
            .arg(&dir)
            .args(&names),
    );
    let hostile = rewrite_plain(&a, &std::fs::read(&tarred).unwrap());
    let run = sb.run_with_stdin("bk-verify", &args(&conn, &[]), &artifact_line(&hostile));
    run.failed("verify", 65, &["etc/passwd", "not a file of the artifact"]);
    let run = sb.run_with_stdin(
        "bk-restore",
        &args(&conn, &["--database", &copy]),
        &artifact_line(&hostile),
    );
    run.failed("restore", 65, &["etc/passwd"]);
    assert!(!server.databases().contains(&copy), "nothing restored");
}

/// A private influxd on free ports in the sandbox (the config of tests/services.sh, with
/// `http_config` lines added to its [http] section), killed when dropped.
struct PrivateInflux {
    child: Child,
    server: InfluxServer,
}

impl PrivateInflux {
    fn start(sb: &Sandbox, http_config: &str) -> PrivateInflux {
        let dir = sb.path("influxd");
        std::fs::create_dir_all(&dir).unwrap();
        let (http, rpc) = (bk_tests::free_port(), bk_tests::free_port());
        let d = dir.display();
        std::fs::write(
            dir.join("conf"),
            format!(
                "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n[meta]\n  dir = \"{d}/meta\"\n\
                 [data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n[http]\n  bind-address = \"127.0.0.1:{http}\"\n{http_config}\
                 [monitor]\n  store-enabled = false\n"
            ),
        )
        .unwrap();
        let child = Command::new("influxd")
            .args(["run", "-config"])
            .arg(dir.join("conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("influxd (apt install influxdb)");
        let server = InfluxServer {
            host: "127.0.0.1".into(),
            port: http,
            rpc_port: rpc,
            login: None,
        };
        // Started when it answers (and the RPC port with it).
        while ureq::get(format!("http://127.0.0.1:{http}/ping")).call().is_err()
            || std::net::TcpStream::connect(("127.0.0.1", rpc)).is_err()
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        PrivateInflux { child, server }
    }
}

impl Drop for PrivateInflux {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private server with a database of many one-hour shards, which influxd backup fetches
/// one by one, and bk-dump of it started with its TMPDIR in the sandbox: returned once
/// influxd backup has written its first shard there.
fn dump_in_the_middle(sb: &Sandbox) -> Option<(PrivateInflux, Child, std::path::PathBuf)> {
    bk_tests::needs(which("influxd"), || "no influxd".into(), "apt install influxdb")?;
    let influx = PrivateInflux::start(sb, "");
    let server = influx.server.clone();
    server.query("CREATE DATABASE big");
    server.query("CREATE RETENTION POLICY \"hourly\" ON \"big\" DURATION 0s REPLICATION 1 SHARD DURATION 1h DEFAULT");
    let lines: String = (0..400u64)
        .map(|i| format!("m v={i} {}\n", 1_600_000_000_000_000_000 + i * 3_600_000_000_000))
        .collect();
    server.write("big", "hourly", &lines);
    let tmp = sb.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let conn = server.args();
    let mut cmd = sb.cmd(
        "bk-dump",
        &dump_args(&conn, &["--database", "big", "--to", &sb.store()]),
    );
    let dump = cmd
        .env("TMPDIR", &tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first_shard = || {
        bk_tests::files_below(&tmp)
            .iter()
            .any(|p| p.to_string_lossy().ends_with(".tar.gz"))
    };
    while !first_shard() {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Some((influx, dump, tmp))
}

/// Nothing of a failed dump is left: no artifact, and no temporary directory.
fn nothing_left(sb: &Sandbox, tmp: &Path) {
    assert_eq!(
        bk_tests::files_below(tmp),
        Vec::<std::path::PathBuf>::new(),
        "the backup directory is removed"
    );
    let stored = bk_tests::files_below(Path::new(&sb.store()));
    assert!(
        stored.iter().all(|p| !p.to_string_lossy().contains("influx-tar")),
        "{stored:?}"
    );
}

#[test]
fn a_server_stopped_mid_backup_leaves_nothing() {
    let sb = Sandbox::new();
    let Some((mut influx, dump, tmp)) = dump_in_the_middle(&sb) else {
        return;
    };
    influx.child.kill().unwrap();
    influx.child.wait().unwrap();
    let run = bk_tests::Run::from(dump.wait_with_output().unwrap());
    run.failed("server killed", 69, &["influxd"]);
    nothing_left(&sb, &tmp);
}

#[test]
fn sigterm_mid_backup_leaves_nothing() {
    let sb = Sandbox::new();
    let Some((_influx, dump, tmp)) = dump_in_the_middle(&sb) else {
        return;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(dump.id() as i32), nix::sys::signal::SIGTERM).unwrap();
    let run = bk_tests::Run::from(dump.wait_with_output().unwrap());
    run.failed("SIGTERM", 143, &[]);
    nothing_left(&sb, &tmp);
}

#[test]
fn with_authentication_the_credentials_come_from_the_file() {
    if bk_tests::needs(which("influxd"), || "no influxd".into(), "apt install influxdb").is_none() {
        return;
    }
    let sb = Sandbox::new();
    let influx = PrivateInflux::start(&sb, "  auth-enabled = true\n");
    let mut server = influx.server.clone();
    // The first user, an admin, may be created without logging in.
    server.query("CREATE USER \"admin\" WITH PASSWORD 'pw-s3cret' WITH ALL PRIVILEGES");
    server.login = Some(("admin".into(), "pw-s3cret".into()));
    server.query("CREATE DATABASE lab");
    server.write("lab", "autogen", "t,k=v f=1.5,i=2i 1700000000000000000\n");
    let write_file = |name: &str, text: &str| {
        use std::os::unix::fs::PermissionsExt;
        let file = sb.path(name);
        std::fs::write(&file, text).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        file.display().to_string()
    };
    let good = write_file("good.cred", "username=admin\npassword=pw-s3cret\n");
    let wrong = write_file("wrong.cred", "username = admin\npassword = nope-s3cret\n");
    let conn = server.args();
    for (case, extra) in [
        ("no credentials", vec![]),
        ("wrong password", vec!["--credentials-file", wrong.as_str()]),
    ] {
        let store = sb.store();
        let mut more = extra.clone();
        more.extend(["--to", store.as_str()]);
        let run = sb.run("bk-dump", &dump_args(&conn, &more));
        run.failed(case, 78, &["refused the credentials"]);
        run.assert_hides(case, &["pw-s3cret", "nope-s3cret"]);
    }
    let run = sb
        .run(
            "bk-dump",
            &dump_args(&conn, &["--credentials-file", &good, "--to", &sb.store()]),
        )
        .ok();
    run.assert_hides("good", &["pw-s3cret"]);
    let a = run.artifact();
    assert_eq!(a.counts, [("lab.t".to_string(), 2)].into_iter().collect());
    let with_file = args(&conn, &["--credentials-file", &good]);
    let mut restore = with_file.clone();
    restore.extend(["--database", "lab_copy"]);
    sb.run_with_stdin("bk-restore", &restore, &artifact_line(&a)).ok();
    assert_eq!(content(&server, "lab_copy"), content(&server, "lab"));
    let mut verify = with_file.clone();
    verify.push("--scratch");
    sb.run_with_stdin("bk-verify", &verify, &artifact_line(&a)).ok();
}

fn which(program: &str) -> Option<()> {
    Command::new(program).arg("version").output().ok().map(drop)
}
