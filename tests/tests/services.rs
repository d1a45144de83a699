//! The test command (tests/run.sh) starts every server later tests talk to; this proves
//! they answer, so a broken setup fails here first, with the server named.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bk_tests::services_required;

/// host:port of every server, from the variables tests/services.sh writes.
fn endpoints() -> Vec<(&'static str, String)> {
    let var = |v: &str| std::env::var(v).unwrap_or_else(|_| panic!("{v} is not set: source $(tests/services.sh env)"));
    let host_port = |url: String| {
        let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r).to_string();
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        authority.rsplit('@').next().unwrap_or_default().to_string()
    };
    vec![
        ("MariaDB", host_port(var("TEST_MYSQL_URL"))),
        ("PostgreSQL", host_port(var("TEST_PG_URL"))),
        ("MongoDB protocol (nx-27017)", host_port(var("TEST_MONGO_URL"))),
        ("InfluxDB HTTP", host_port(var("TEST_INFLUX_HTTP"))),
        ("InfluxDB RPC", var("TEST_INFLUX_RPC")),
        ("S3 (s3s-fs)", host_port(var("TEST_S3_ENDPOINT"))),
        ("sshd", format!("127.0.0.1:{}", var("TEST_SSH_PORT"))),
    ]
}

#[test]
fn every_test_server_answers() {
    if !services_required() {
        eprintln!("SKIPPED every_test_server_answers: BK_TEST_SERVICES is not 1 (tests/run.sh sets it)");
        return;
    }
    let down: Vec<String> = endpoints()
        .into_iter()
        .filter(|(_, addr)| {
            let addr: SocketAddr = addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_err()
        })
        .map(|(name, addr)| format!("{name} at {addr}"))
        .collect();
    assert!(down.is_empty(), "not answering: {}", down.join(", "));
}
