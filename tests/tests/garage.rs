//! Garage, a distributed S3 store, as a private cluster of three nodes on loopback with
//! replication factor 3: bk-ship copies a backup to it, one node is killed, and bk-ls,
//! bk-restore and bk-verify still work through the other two. The garage binary is
//! TEST_GARAGE_BIN (tests/services.sh builds it); with BK_TEST_SERVICES=1 a missing one is
//! a failure.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bk_core::record::Record;
use bk_tests::{free_port, needs, run_cmd, tree_digest, Run, Sandbox};
use serde_json::{json, Value};

const NODES: usize = 3;
const REGION: &str = "garage";
const BUCKET: &str = "bk-test";
/// How long a node may take to start, or the cluster to become healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

fn garage_bin() -> Option<PathBuf> {
    let found = std::env::var_os("TEST_GARAGE_BIN")
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    let why = || "TEST_GARAGE_BIN is not set or not a file".into();
    needs(found, why, "tests/services.sh builds it")
}

/// `bytes` random bytes, as hex.
fn random_hex(bytes: u64) -> String {
    let mut buf = Vec::new();
    fs::File::open("/dev/urandom")
        .and_then(|f| f.take(bytes).read_to_end(&mut buf))
        .expect("reading /dev/urandom");
    hex::encode(buf)
}

struct Node {
    dir: PathBuf,
    s3_port: u16,
    server: Option<Child>,
}

impl Node {
    fn config(&self) -> PathBuf {
        self.dir.join("garage.toml")
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

/// The garage servers of a test: every one still running is killed when the cluster goes,
/// whatever happened.
struct Cluster {
    garage: PathBuf,
    nodes: Vec<Node>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.iter_mut().for_each(Node::kill);
    }
}

/// An S3 access key of the cluster.
struct Key {
    id: String,
    secret: String,
}

impl Cluster {
    /// Three nodes in `root`, connected, with a layout of one zone where each holds every
    /// object (replication factor 3), healthy as seen from each node.
    fn start(garage: PathBuf, root: &Path) -> Cluster {
        let rpc_secret = random_hex(32);
        let mut cluster = Cluster {
            garage,
            nodes: Vec::new(),
        };
        for i in 0..NODES {
            let dir = root.join(format!("garage{i}"));
            fs::create_dir_all(&dir).expect("a node directory");
            let (rpc_port, s3_port) = (free_port(), free_port());
            let config = format!(
                r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = {NODES}
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
"#,
                dir = dir.display()
            );
            fs::write(dir.join("garage.toml"), config).expect("writing garage.toml");
            let log = fs::File::create(dir.join("log")).expect("a log file");
            let server = Command::new(&cluster.garage)
                .arg("-c")
                .arg(dir.join("garage.toml"))
                .arg("server")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("the log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", cluster.garage.display()));
            cluster.nodes.push(Node {
                dir,
                s3_port,
                server: Some(server),
            });
        }
        let mut ids = Vec::new();
        for i in 0..NODES {
            cluster.wait_for(i, "answer", |c| c.json_api(i, "GetClusterHealth", None).ok());
            // `<public key>@127.0.0.1:<rpc port>`, from the key the server made in its metadata_dir
            ids.push(cluster.garage_ok(i, &["node", "id", "-q"]).stdout.trim().to_string());
        }
        for id in &ids[1..] {
            cluster.garage_ok(0, &["node", "connect", id]);
        }
        for id in &ids {
            let public_key = id.split('@').next().expect("an id");
            cluster.garage_ok(0, &["layout", "assign", "-z", "dc1", "-c", "1G", public_key]);
        }
        cluster.garage_ok(0, &["layout", "apply", "--version", "1"]);
        for i in 0..NODES {
            cluster.wait_for(i, "become healthy", |c| {
                let health = c.json_api(i, "GetClusterHealth", None).ok()?;
                let healthy = health["status"] == "healthy"
                    && health["storageNodesUp"] == json!(NODES)
                    && health["partitionsAllOk"] == health["partitions"];
                healthy.then_some(())
            });
            let addr = ("127.0.0.1", cluster.nodes[i].s3_port);
            cluster.wait_for(i, "open its S3 port", |_| std::net::TcpStream::connect(addr).ok());
        }
        cluster
    }

    /// `garage -c <node's config> ARGS...`: what it did.
    fn garage(&self, node: usize, args: &[&str]) -> Run {
        let mut cmd = Command::new(&self.garage);
        cmd.arg("-c").arg(self.nodes[node].config()).args(args);
        run_cmd(cmd, "")
    }

    fn garage_ok(&self, node: usize, args: &[&str]) -> Run {
        let run = self.garage(node, args);
        assert_eq!(
            run.code,
            0,
            "garage {} on node {node}\nstdout: {}\nstderr: {}",
            args.join(" "),
            run.stdout,
            run.stderr
        );
        run
    }

    /// A call of the admin API through the CLI; its JSON answer, or garage's stderr.
    fn json_api(&self, node: usize, endpoint: &str, payload: Option<Value>) -> Result<Value, String> {
        let payload = payload.map(|p| p.to_string());
        let mut args = vec!["json-api", endpoint];
        args.extend(payload.as_deref());
        let run = self.garage(node, &args);
        if run.code != 0 {
            return Err(run.stderr);
        }
        serde_json::from_str(&run.stdout).map_err(|e| format!("{e}: {}", run.stdout))
    }

    /// Polls `ready` until it gives a value; fails after READY_TIMEOUT, or as soon as the
    /// node's server has exited, with the end of its log.
    fn wait_for<T>(&mut self, node: usize, what: &str, ready: impl Fn(&Self) -> Option<T>) -> T {
        let until = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(value) = ready(self) {
                return value;
            }
            let server = self.nodes[node].server.as_mut().expect("a running node");
            let exited = server.try_wait().expect("the node's status");
            if exited.is_some() || Instant::now() > until {
                let log = fs::read_to_string(self.nodes[node].dir.join("log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "garage node {node} did not {what} (exit status: {exited:?}); the end of its log:\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A new access key that may read, write and own a new bucket `name`.
    fn bucket_with_key(&self, name: &str) -> Key {
        let created = self
            .json_api(0, "CreateKey", Some(json!({ "name": "bk-test" })))
            .expect("CreateKey");
        let field = |k: &str| {
            created[k]
                .as_str()
                .unwrap_or_else(|| panic!("{k} in {created}"))
                .to_string()
        };
        let key = Key {
            id: field("accessKeyId"),
            secret: field("secretAccessKey"),
        };
        self.garage_ok(0, &["bucket", "create", name]);
        self.garage_ok(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", name, "--key", &key.id,
            ],
        );
        key
    }
}

#[test]
fn a_backup_on_a_three_node_garage_survives_a_node_down() {
    let Some(garage) = garage_bin() else { return };
    let sb = Sandbox::new();
    // Declared after the sandbox, so dropped first: the servers stop before their files go.
    let mut cluster = Cluster::start(garage, sb.root());
    let key = cluster.bucket_with_key(BUCKET);
    let store = format!("s3://{BUCKET}/backups");
    // A bk tool talking to the S3 API of one node, configured as a user's environment would.
    let bk = |endpoint: &str, tool: &str, args: &[&str], stdin: &str| -> Run {
        let mut cmd = sb.cmd(tool, args);
        cmd.env("BK_S3_ENDPOINT", endpoint)
            .env("BK_S3_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", &key.id)
            .env("AWS_SECRET_ACCESS_KEY", &key.secret)
            .env_remove("AWS_SESSION_TOKEN");
        run_cmd(cmd, stdin)
    };

    // 20 MiB (random bytes in hex), not compressed: a multipart upload of three parts.
    fs::create_dir_all(sb.path("data")).unwrap();
    fs::write(sb.path("data/random.bin"), random_hex(10 << 20)).unwrap();
    fs::write(sb.path("data/note.txt"), "kept on three nodes\n").unwrap();
    let data = sb.path("data");
    let data_arg = data.display().to_string();
    let dumped = sb
        .run(
            "bk-dump",
            &[
                "files",
                &data_arg,
                "--name",
                "web",
                "--compress",
                "none",
                "--to",
                &sb.store(),
            ],
        )
        .ok();
    let original = dumped.artifact();
    assert!(original.bytes > 16 << 20, "{} bytes", original.bytes);

    let entry = cluster.nodes[0].endpoint();
    let shipped = bk(&entry, "bk-ship", &["--to", &store], &dumped.stdout).ok();
    let records = shipped.artifacts();
    assert_eq!(records.len(), 2, "{}", shipped.stdout);
    assert_eq!(records[0], original, "the input is passed on");
    let copy = &records[1];
    assert!(copy.location.starts_with(&format!("{store}/web/")), "{}", copy.location);
    assert_eq!(
        (&copy.id, &copy.sha256, copy.bytes),
        (&original.id, &original.sha256, original.bytes)
    );

    // The node the backup went through goes down; the other two answer for the cluster.
    cluster.nodes[0].kill();
    assert!(std::net::TcpStream::connect(("127.0.0.1", cluster.nodes[0].s3_port)).is_err());
    let other = cluster.nodes[1].endpoint();

    let listed = bk(&other, "bk-ls", &[&store], "").ok();
    assert_eq!(listed.artifacts(), vec![copy.clone()], "{}", listed.stderr);

    let restored = bk(
        &other,
        "bk-restore",
        &["--from", &store, "--name", "web", "--latest", "--to", "restored"],
        "",
    )
    .ok();
    assert_eq!(restored.restored().id, original.id);
    // bk-restore of files puts each source path below the target, whole.
    let restored_data = sb
        .path("restored")
        .join(data.strip_prefix("/").expect("an absolute sandbox"));
    assert_eq!(
        tree_digest(&restored_data),
        tree_digest(&data),
        "restored data equals the source"
    );

    let verified = bk(
        &other,
        "bk-verify",
        &["--from", &store, "--name", "web", "--latest"],
        "",
    )
    .ok();
    let verdicts: Vec<_> = verified
        .records()
        .into_iter()
        .filter_map(|r| if let Record::Verified(v) = r { Some(v) } else { None })
        .collect();
    assert_eq!(verdicts.len(), 1, "{}", verified.stdout);
    assert_eq!(verdicts[0]["ok"], json!(true), "{}", verified.stdout);
    assert_eq!(verdicts[0]["location"], json!(copy.location), "{}", verified.stdout);
}
