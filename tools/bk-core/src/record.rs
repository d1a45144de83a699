//! The records of SPEC §2, and reading and writing them as JSON Lines.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::codec::{Compression, Encryption};
use crate::error::{Error, Kind, Result};

/// The schema version written in every record's `bk` field.
pub const SCHEMA_VERSION: u64 = 1;

/// One backup file in one store; also the content of its sidecar manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    pub id: String,
    pub name: String,
    pub engine: String,
    pub source: Source,
    pub started: String,
    pub finished: String,
    pub file: String,
    pub format: String,
    pub compression: Compression,
    pub encryption: Option<Encryption>,
    pub bytes: u64,
    pub sha256: String,
    pub content_bytes: u64,
    pub counts: BTreeMap<String, u64>,
    pub tool: ToolInfo,
    pub bk_version: String,
    pub location: String,
}

/// Where a backup came from. Which fields are set depends on the engine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// The program that produced the artifact's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolInfo {
    pub program: String,
    pub version: String,
}

/// A failure, travelling in-band so that tools downstream skip dependent work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub tool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub code: u8,
    pub message: String,
}

/// What bk-restore restored, with the counts found in the target afterwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Restored {
    pub id: String,
    pub name: String,
    pub engine: String,
    pub target: Map<String, Value>,
    pub counts: BTreeMap<String, u64>,
    /// False for a partial restore (`--include`), whose counts are not the manifest's.
    pub complete: bool,
}

/// A backup that bk-prune's policy keeps, with every rule that keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kept {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub location: String,
    /// e.g. `["daily 2026-11-21", "weekly 2026-W47"]`.
    pub reasons: Vec<String>,
}

/// A backup that bk-prune deleted (or, with `dry_run`, would delete), with why no rule
/// keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pruned {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub location: String,
    pub reasons: Vec<String>,
    pub dry_run: bool,
}

/// Every record type. Types whose producer is not built yet are carried as plain objects,
/// so a pipeline through this version passes them on intact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // records are handled a few at a time; boxing buys nothing
pub enum Record {
    Artifact(Artifact),
    Error(ErrorRecord),
    Restored(Restored),
    Kept(Kept),
    Pruned(Pruned),
    Verified(Map<String, Value>),
    Notified(Map<String, Value>),
}

const KNOWN_TYPES: [&str; 7] = [
    "artifact", "error", "restored", "kept", "pruned", "verified", "notified",
];

impl Record {
    /// The record as one JSON line, `bk` first, without the newline.
    pub fn to_line(&self) -> String {
        let body = serde_json::to_string(self).expect("records always serialize");
        format!("{{\"bk\":{SCHEMA_VERSION},{}", &body[1..])
    }
}

/// One record read from input, with its original line so it can be passed on unchanged.
#[derive(Debug, Clone)]
pub struct Input {
    pub line: String,
    pub record: Record,
}

/// Parses one line; `what` names the input in messages (e.g. "stdin line 3").
pub fn parse_line(line: &str, what: &str) -> Result<Record> {
    let value: Value = serde_json::from_str(line).map_err(|e| Error::data(format!("{what}: malformed JSON: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(Error::data(format!("{what}: a record must be a JSON object")));
    };
    match map.get("bk").and_then(Value::as_u64) {
        Some(v) if v >= 1 => {}
        _ => {
            return Err(Error::data(format!(
                "{what}: not a bk record (no \"bk\" schema version)"
            )))
        }
    }
    let kind = map.get("type").and_then(Value::as_str).unwrap_or("").to_string();
    if !KNOWN_TYPES.contains(&kind.as_str()) {
        return Err(Error::data(format!("{what}: unknown record type {kind:?}")));
    }
    serde_json::from_value(value).map_err(|e| Error::data(format!("{what}: invalid {kind} record: {e}")))
}

/// Reads every record of a JSON Lines stream before anything is acted on, so that a
/// malformed line stops the tool with nothing done. Blank lines are ignored.
pub fn read_all(input: impl BufRead, what: &str) -> Result<Vec<Input>> {
    let mut records = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| Error::io(format!("reading {what}"), e))?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let record = parse_line(line, &format!("{what} line {}", i + 1))?;
        records.push(Input {
            line: line.to_string(),
            record,
        });
    }
    Ok(records)
}

/// Writes records to stdout, one flushed line each, and remembers how the run should end.
pub struct Output {
    tool: String,
    out: Box<dyn Write>,
    exit_code: u8,
}

impl Output {
    pub fn stdout(tool: &str) -> Self {
        Self::new(tool, Box::new(io::stdout()))
    }

    pub fn new(tool: &str, out: Box<dyn Write>) -> Self {
        Output {
            tool: tool.to_string(),
            out,
            exit_code: 0,
        }
    }

    pub fn tool(&self) -> &str {
        &self.tool
    }

    pub fn emit(&mut self, record: &Record) -> Result<()> {
        self.write_line(&record.to_line())
    }

    /// Passes an input record on unchanged. An upstream error makes this run fail too.
    pub fn pass(&mut self, input: &Input) -> Result<()> {
        if matches!(input.record, Record::Error(_)) {
            self.fail(Kind::Upstream.exit_code());
        }
        self.write_line(&input.line)
    }

    /// Reports a failure: an `error` record on stdout and one line on stderr. The run goes
    /// on (other items may still succeed) but will exit with the first failure's code.
    pub fn error(&mut self, e: &Error) -> Result<()> {
        let name = e.name.as_deref();
        eprintln!(
            "{}: {}{}",
            self.tool,
            name.map(|n| format!("{n}: ")).unwrap_or_default(),
            e.message
        );
        self.fail(e.exit_code());
        let record = Record::Error(ErrorRecord {
            tool: self.tool.clone(),
            name: name.map(str::to_string),
            code: e.exit_code(),
            message: e.message.clone(),
        });
        self.emit(&record)
    }

    /// Records that an upstream error came in without passing its line on (as a table
    /// for people does): the run will exit 1 unless it fails itself.
    pub fn upstream_failed(&mut self) {
        self.fail(Kind::Upstream.exit_code());
    }

    /// Human text on stdout, e.g. a table.
    pub fn text(&mut self, line: &str) -> Result<()> {
        self.write_line(line)
    }

    fn fail(&mut self, code: u8) {
        // A local failure outranks an upstream one; otherwise the first code stays.
        if self.exit_code == 0 || (self.exit_code == Kind::Upstream.exit_code() && code != self.exit_code) {
            self.exit_code = code;
        }
    }

    pub fn exit_code(&self) -> u8 {
        self.exit_code
    }

    fn write_line(&mut self, line: &str) -> Result<()> {
        let written = writeln!(self.out, "{line}").and_then(|()| self.out.flush());
        written.map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe => Error::new(Kind::Closed, "stdout closed"),
            _ => Error::io("writing to stdout", e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact_line() -> String {
        r#"{"bk":1,"type":"artifact","id":"files-etc.20261122T001500Z","name":"files-etc","engine":"files",
        "source":{"host":"h","paths":["/etc"]},"started":"2026-11-22T00:15:00Z","finished":"2026-11-22T00:15:07Z",
        "file":"files-etc.20261122T001500Z.tar.zst","format":"tar","compression":"zstd","encryption":null,
        "bytes":10,"sha256":"ab","content_bytes":20,"counts":{"entries":3},
        "tool":{"program":"bk","version":"0.1.0"},"bk_version":"0.1.0","location":"/b/files-etc/x","future":42}"#
            .replace('\n', "")
    }

    #[test]
    fn artifact_round_trips_and_ignores_unknown_fields() {
        let record = parse_line(&artifact_line(), "t").unwrap();
        let Record::Artifact(a) = &record else {
            panic!("{record:?}")
        };
        assert_eq!(a.counts["entries"], 3);
        assert_eq!(a.compression, Compression::Zstd);
        let again = parse_line(&record.to_line(), "t").unwrap();
        assert_eq!(again, record);
        assert!(record.to_line().starts_with(r#"{"bk":1,"type":"artifact","#));
    }

    #[test]
    fn kept_and_pruned_are_typed_and_tolerate_unknown_fields() {
        let kept = r#"{"bk":1,"type":"kept","id":"db.20261121T001500Z","name":"db","location":"/b/db/x","reasons":["daily 2026-11-21","weekly 2026-W47"],"future":1}"#;
        let Record::Kept(k) = parse_line(kept, "t").unwrap() else {
            panic!("not kept")
        };
        assert_eq!(k.reasons, ["daily 2026-11-21", "weekly 2026-W47"]);
        assert_eq!(k.name, "db");
        let pruned = Record::Pruned(Pruned {
            id: "db.20261101T001500Z".into(),
            name: "db".into(),
            location: "/b/db/y".into(),
            reasons: vec!["daily: 7 days kept already".into()],
            dry_run: true,
        });
        let line = pruned.to_line();
        assert!(
            line.starts_with(r#"{"bk":1,"type":"pruned","id":"db.20261101T001500Z","#),
            "{line}"
        );
        assert!(line.ends_with(r#""dry_run":true}"#), "{line}");
        assert_eq!(parse_line(&line, "t").unwrap(), pruned);
        // A pruned record must say whether anything was deleted.
        let e = parse_line(r#"{"bk":1,"type":"pruned","id":"x","location":"y","reasons":[]}"#, "t").unwrap_err();
        assert!(e.message.contains("dry_run"), "{}", e.message);
    }

    #[test]
    fn reader_names_the_malformed_line() {
        let input = format!("{}\n\n{{\"bk\":1,\"type\":\"artifact\"\n", artifact_line());
        let e = read_all(input.as_bytes(), "stdin").unwrap_err();
        assert_eq!(e.exit_code(), 65);
        assert!(e.message.starts_with("stdin line 3: malformed JSON"), "{}", e.message);
    }

    #[test]
    fn unknown_types_and_foreign_json_are_refused() {
        let e = parse_line(r#"{"bk":1,"type":"surprise"}"#, "stdin line 1").unwrap_err();
        assert_eq!(e.message, "stdin line 1: unknown record type \"surprise\"");
        let e = parse_line(r#"{"type":"artifact"}"#, "x").unwrap_err();
        assert!(e.message.contains("not a bk record"));
        let e = parse_line("[1]", "x").unwrap_err();
        assert_eq!(e.exit_code(), 65);
    }

    #[test]
    fn pass_keeps_the_line_and_upstream_errors_fail_the_run() {
        let line = r#"{"bk":1,"type":"error","tool":"bk-dump","code":69,"message":"down","extra":true}"#;
        let inputs = read_all(line.as_bytes(), "stdin").unwrap();
        let buf = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        struct Shared(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.borrow_mut().write(b)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut out = Output::new("bk-x", Box::new(Shared(buf.clone())));
        out.pass(&inputs[0]).unwrap();
        assert_eq!(out.exit_code(), 1);
        assert_eq!(String::from_utf8(buf.borrow().clone()).unwrap(), format!("{line}\n"));
        out.error(&Error::data("bad").named("job")).unwrap();
        assert_eq!(out.exit_code(), 65);
    }
}
