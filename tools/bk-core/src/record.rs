//! The records of SPEC §2, and reading and writing them as JSON Lines.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Read, Write};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::codec::{Compression, Encryption};
use crate::error::{redact, Error, Kind, Result};
use crate::name::{stamp_time, validate_name};

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
    /// Incremental backups (`files --incremental`): 0 for the full a chain starts with, n for
    /// the n-th backup after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<u32>,
    /// Incremental backups above level 0: the id of the backup whose changes this one holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Incremental backups: the id of the full the chain starts with (its own id at level 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
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
    /// MongoDB: "snapshot" when every collection was read at one cluster time, "none" when
    /// the server (a standalone) has no snapshots and the dump is not point-in-time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    /// Command backups: the program and its arguments as given (a URL's password redacted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Command backups: the text the content must end with (in its last 4 KiB), checked again
    /// by bk-verify and bk-restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_marker: Option<String>,
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

/// The first record a tool prints, before any work: a reader that sees it knows a complete
/// stream ends with the same tool's `end` record (bk(7), "Streams cut short").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Begin {
    pub tool: String,
    pub pid: u32,
}

/// The last record of a tool that ran to its end (its exit status follows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct End {
    pub tool: String,
    pub pid: u32,
    pub status: u8,
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
    Begin(Begin),
    End(End),
    /// A type this version does not know (a newer tool's): passed on unchanged, never acted on.
    #[serde(skip)]
    Unknown(Map<String, Value>),
}

const KNOWN_TYPES: [&str; 9] = [
    "artifact", "error", "restored", "kept", "pruned", "verified", "notified", "begin", "end",
];

impl Record {
    /// The record as one JSON line, `bk` first, without the newline.
    pub fn to_line(&self) -> String {
        if let Record::Unknown(map) = self {
            // It came with its own `bk` field, which made it a record.
            return Value::Object(map.clone()).to_string();
        }
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

impl Artifact {
    /// When the backup was made: its `started` time, else the stamp of its id.
    pub fn made_at(&self) -> Result<DateTime<Utc>> {
        if let Ok(t) = DateTime::parse_from_rfc3339(&self.started) {
            return Ok(t.with_timezone(&Utc));
        }
        stamp_time(&self.id).ok_or_else(|| {
            Error::data(format!(
                "{}: cannot tell when it was made: started {:?} is not an RFC 3339 time",
                self.id, self.started
            ))
        })
    }

    /// The confinement rule of SPEC §3, checked where records and manifests are parsed so that
    /// a parsed artifact is safe to turn into paths anywhere: `name` matches the name
    /// pattern, `id` is `<name>.<stamp>`, `file` one path component starting with `<id>.`.
    fn check_confined(&self) -> Result<()> {
        validate_name(&self.name).map_err(|e| Error::data(format!("field \"name\": {}", e.message)))?;
        let stamp = self.id.strip_prefix(&format!("{}.", self.name)).unwrap_or_default();
        if stamp.is_empty()
            || !stamp
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(Error::data(format!(
                "field \"id\": {:?} is not {:?} followed by '.' and a stamp",
                self.id, self.name
            )));
        }
        let suffix = self.file.strip_prefix(&format!("{}.", self.id)).unwrap_or_default();
        let suffix_ok = !suffix.is_empty()
            && self.file.len() <= 255
            && !suffix.contains("..")
            && suffix != "json"
            && !suffix.ends_with(".json")
            && suffix.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !suffix_ok {
            return Err(Error::data(format!(
                "field \"file\": {:?} is not one file name starting with {:?} and '.'",
                self.file, self.id
            )));
        }
        self.check_chain()
    }

    /// The chain fields of an incremental backup agree: a full (level 0) is its own chain and
    /// has no parent; a level n > 0 names an older parent and a chain no newer than that
    /// parent, both backups of the same name. Tools then follow `parent` without checking.
    fn check_chain(&self) -> Result<()> {
        let same_name_older = |field: &str, id: &str, than: &str| -> Result<()> {
            let stamp = id.strip_prefix(&format!("{}.", self.name)).unwrap_or_default();
            let ok = !stamp.is_empty()
                && stamp
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                && id <= than;
            if ok {
                Ok(())
            } else {
                Err(Error::data(format!(
                    "field {field:?}: {id:?} is not an older backup of {:?} than {than:?}",
                    self.name
                )))
            }
        };
        match (self.level, &self.parent, &self.chain) {
            (None, None, None) => Ok(()),
            (Some(0), None, Some(chain)) if *chain == self.id => Ok(()),
            (Some(level), Some(parent), Some(chain)) if level > 0 && *parent != self.id => {
                same_name_older("parent", parent, &self.id)?;
                same_name_older("chain", chain, parent)?;
                if level == 1 && chain != parent {
                    return Err(Error::data(format!(
                        "level 1 backup {:?}: its parent {parent:?} must be its chain's full {chain:?}",
                        self.id
                    )));
                }
                Ok(())
            }
            (level, parent, chain) => Err(Error::data(format!(
                "fields \"level\", \"parent\", \"chain\": {level:?}, {parent:?}, {chain:?} do not make an \
                 incremental backup (a full: level 0, no parent, chain its own id; above: level n, an \
                 older parent and chain)"
            ))),
        }
    }

    /// Whether it belongs to an incremental chain.
    pub fn is_incremental(&self) -> bool {
        self.level.is_some()
    }
}

/// Parses one line; `what` names the input in messages (e.g. "stdin line 3"). A record of a
/// type this version does not know is returned as `Unknown`, to be passed on unchanged.
pub fn parse_line(line: &str, what: &str) -> Result<Record> {
    let value: Value = serde_json::from_str(line).map_err(|e| Error::data(format!("{what}: malformed JSON: {e}")))?;
    let Value::Object(map) = value else {
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
    let Some(kind) = map.get("type").and_then(Value::as_str).map(str::to_string) else {
        return Err(Error::data(format!("{what}: a record needs a \"type\"")));
    };
    if !KNOWN_TYPES.contains(&kind.as_str()) {
        return Ok(Record::Unknown(map));
    }
    let record: Record = serde_json::from_value(Value::Object(map))
        .map_err(|e| Error::data(format!("{what}: invalid {kind} record: {e}")))?;
    if let Record::Artifact(a) = &record {
        a.check_confined()
            .map_err(|e| e.context(format!("{what}: artifact {:?}", a.id)))?;
    }
    Ok(record)
}

/// The longest record line read; anything longer is not a record bk wrote.
const MAX_LINE: usize = 16 << 20;

/// The records of a JSON Lines stream one at a time, as they come, for a tool that acts on
/// each before the next is written (bk-notify passes a long pipeline's records on at once).
/// Blank lines are ignored; `begin` and `end` are taken out. A `begin` without its `end`
/// (the tool was killed after it started) becomes an `error` record at the end of the
/// stream, so that everything downstream fails as if the tool had said so. The first line
/// that is not a record is an error, after which the iterator ends.
pub struct Records<R> {
    input: R,
    what: String,
    number: usize,
    open: Vec<Begin>,
    ended: bool,
    /// An upstream tool announced itself with a `begin` record.
    pub announced: bool,
    /// Why the stream is incomplete, once it has ended: a `begin` without its `end`.
    pub cut_short: Vec<String>,
}

impl<R: BufRead> Records<R> {
    /// `what` names the input in messages ("stdin" gives "stdin line 3: ...").
    pub fn new(input: R, what: &str) -> Self {
        Records {
            input,
            what: what.to_string(),
            number: 0,
            open: Vec::new(),
            ended: false,
            announced: false,
            cut_short: Vec::new(),
        }
    }

    /// The next line's record, `None` at the end of input.
    fn read_record(&mut self) -> Result<Option<Input>> {
        let what = &self.what;
        let mut buf = Vec::new();
        loop {
            buf.clear();
            self.number += 1;
            let number = self.number;
            let read = self
                .input
                .by_ref()
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|e| Error::io(format!("reading {what}"), e))?;
            if read == 0 {
                return Ok(None);
            }
            if buf.len() > MAX_LINE {
                return Err(Error::data(format!(
                    "{what} line {number}: longer than 16 MiB: not a record"
                )));
            }
            let line = std::str::from_utf8(&buf).map_err(|e| {
                Error::data(format!(
                    "{what} line {number}: not UTF-8 (byte {})",
                    e.valid_up_to() + 1
                ))
            })?;
            let line = line.trim_end_matches(['\n', '\r']);
            if line.trim().is_empty() {
                continue;
            }
            match parse_line(line, &format!("{what} line {number}"))? {
                Record::Begin(begin) => {
                    self.announced = true;
                    self.open.push(begin);
                }
                Record::End(end) => {
                    if let Some(i) = self.open.iter().rposition(|b| b.tool == end.tool && b.pid == end.pid) {
                        self.open.remove(i);
                    }
                }
                record => {
                    return Ok(Some(Input {
                        line: line.to_string(),
                        record,
                    }))
                }
            }
        }
    }

    /// At the end of input: the error record of the first tool that began and never ended.
    fn cut_short_record(&mut self) -> Option<Input> {
        if self.open.is_empty() {
            return None;
        }
        let begin = self.open.remove(0);
        let message = format!(
            "{} (pid {}) began but never ended its output: it was killed or crashed, so its records are incomplete",
            begin.tool, begin.pid
        );
        self.cut_short.push(message.clone());
        let record = Record::Error(ErrorRecord {
            tool: begin.tool,
            name: None,
            code: Kind::Upstream.exit_code(),
            message,
        });
        Some(Input {
            line: record.to_line(),
            record,
        })
    }
}

impl<R: BufRead> Iterator for Records<R> {
    type Item = Result<Input>;

    fn next(&mut self) -> Option<Result<Input>> {
        if self.ended {
            return self.cut_short_record().map(Ok);
        }
        match self.read_record() {
            Ok(Some(input)) => Some(Ok(input)),
            Ok(None) => {
                self.ended = true;
                self.cut_short_record().map(Ok)
            }
            Err(e) => {
                // Nothing after a line that is not a record can be trusted to follow it.
                self.ended = true;
                self.open.clear();
                Some(Err(e))
            }
        }
    }
}

/// Writes records to stdout, one flushed line each, and remembers how the run should end.
pub struct Output {
    tool: String,
    out: Box<dyn Write>,
    exit_code: u8,
    began: bool,
    /// False when stdout is a table for people: errors then go to stderr only.
    records: bool,
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
            began: false,
            records: true,
        }
    }

    /// Makes stdout a table for people: no records on it, errors on stderr only.
    pub fn print_tables(&mut self) {
        self.records = false;
    }

    /// Announces the run with a `begin` record, before any work.
    pub fn begin(&mut self) -> Result<()> {
        self.began = true;
        self.emit(&Record::Begin(Begin {
            tool: self.tool.clone(),
            pid: std::process::id(),
        }))
    }

    /// Closes an announced run with its `end` record, whose status is the exit code.
    pub fn end(&mut self) -> Result<()> {
        if !self.began {
            return Ok(());
        }
        self.emit(&Record::End(End {
            tool: self.tool.clone(),
            pid: std::process::id(),
            status: self.exit_code,
        }))
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
    /// Messages are redacted here, where every error is rendered: no secret a message might
    /// quote (a URL's password, an age secret key) reaches stdout or stderr.
    pub fn error(&mut self, e: &Error) -> Result<()> {
        self.fail(e.exit_code());
        self.report(e)
    }

    /// An `error` record and its line on stderr that leave the exit status as it is: a
    /// failure secondary to one already reported (a notification that could not be sent
    /// about a backup that failed).
    pub fn report(&mut self, e: &Error) -> Result<()> {
        let record = self.error_record(e);
        eprintln!(
            "{}: {}{}",
            self.tool,
            record.name.as_deref().map(|n| format!("{n}: ")).unwrap_or_default(),
            record.message
        );
        if !self.records {
            return Ok(());
        }
        self.emit(&Record::Error(record))
    }

    /// The `error` record this tool prints for `e`, its message redacted.
    pub fn error_record(&self, e: &Error) -> ErrorRecord {
        ErrorRecord {
            tool: self.tool.clone(),
            name: e.name.clone(),
            code: e.exit_code(),
            message: redact(&e.message),
        }
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

    /// A whole stream read as a tool that takes all its input first does.
    #[derive(Debug)]
    struct Stream {
        inputs: Vec<Input>,
        announced: bool,
        cut_short: Vec<String>,
    }

    fn read_all(input: &[u8], what: &str) -> Result<Stream> {
        let mut records = Records::new(input, what);
        let inputs = records.by_ref().collect::<Result<Vec<_>>>()?;
        Ok(Stream {
            inputs,
            announced: records.announced,
            cut_short: records.cut_short,
        })
    }

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
    fn artifacts_are_confined_to_their_name_directory() {
        let with = |field: &str, value: &str| {
            let mut v: Value = serde_json::from_str(&artifact_line()).unwrap();
            v[field] = value.into();
            parse_line(&v.to_string(), "m")
        };
        for (field, value) in [
            ("file", "../../victim/precious.txt"),
            ("file", "/etc/passwd"),
            ("file", "files-etc.20261122T001500Z./../x"),
            ("file", "files-etc.20261122T001500Z.tar/../../x"),
            ("file", "files-etc.20261122T001500Z.json"),
            ("file", "files-etc.20261122T001500Z."),
            ("file", "other.20261122T001500Z.tar"),
            ("file", "files-etc.20261122T001500Z.t\0ar"),
            ("id", "files-etc"),
            ("id", "files-etc./x"),
            ("id", "files-etc.2026/../x"),
            ("name", "../../../tmp/pwn"),
            ("name", "Files"),
        ] {
            let e = with(field, value).unwrap_err();
            assert_eq!(e.exit_code(), 65, "{field}={value:?}");
            assert!(
                e.message.contains(&format!("field \"{field}\"")),
                "{field}={value:?}: {}",
                e.message
            );
        }
        with("file", "files-etc.20261122T001500Z.tar.zst.age").unwrap();
    }

    #[test]
    fn chain_fields_must_make_a_chain() {
        let id = "files-etc.20261122T001500Z";
        let with = |level: Value, parent: Value, chain: Value| {
            let mut v: Value = serde_json::from_str(&artifact_line()).unwrap();
            for (field, value) in [("level", level), ("parent", parent), ("chain", chain)] {
                if !value.is_null() {
                    v[field] = value;
                }
            }
            parse_line(&v.to_string(), "m")
        };
        let (older, oldest) = ("files-etc.20261122T001000Z", "files-etc.20261122T000000Z");
        let good: [(Value, Value, Value); 4] = [
            (Value::Null, Value::Null, Value::Null),
            (0.into(), Value::Null, id.into()),
            (1.into(), older.into(), older.into()),
            (5.into(), older.into(), oldest.into()),
        ];
        for (level, parent, chain) in good {
            with(level.clone(), parent.clone(), chain.clone())
                .unwrap_or_else(|e| panic!("{level} {parent} {chain}: {e}"));
        }
        let bad: [(Value, Value, Value); 11] = [
            (0.into(), older.into(), id.into()),
            (0.into(), Value::Null, older.into()),
            (1.into(), Value::Null, older.into()),
            (2.into(), id.into(), oldest.into()),
            (2.into(), "files-etc.20261122T002000Z".into(), oldest.into()),
            (2.into(), "other.20261122T001000Z".into(), oldest.into()),
            (2.into(), "files-etc.x/../../y".into(), oldest.into()),
            (2.into(), oldest.into(), older.into()),
            (1.into(), older.into(), oldest.into()),
            (Value::Null, older.into(), oldest.into()),
            ("1".into(), older.into(), older.into()),
        ];
        for (level, parent, chain) in bad {
            let e = with(level.clone(), parent.clone(), chain.clone()).unwrap_err();
            assert_eq!(e.exit_code(), 65, "{level} {parent} {chain}: {}", e.message);
        }
    }

    #[test]
    fn a_stream_cut_short_ends_in_an_error_record() {
        let begin = r#"{"bk":1,"type":"begin","tool":"bk-dump","pid":7}"#;
        let end = r#"{"bk":1,"type":"end","tool":"bk-dump","pid":7,"status":0}"#;
        let whole = format!("{begin}\n{}\n{end}\n", artifact_line());
        let stream = read_all(whole.as_bytes(), "stdin").unwrap();
        assert!(stream.announced && stream.cut_short.is_empty());
        assert_eq!(stream.inputs.len(), 1, "begin and end are taken out");
        let cut = format!("{begin}\n{}\n", artifact_line());
        let stream = read_all(cut.as_bytes(), "stdin").unwrap();
        assert_eq!(stream.inputs.len(), 2);
        let Record::Error(e) = &stream.inputs[1].record else {
            panic!("{:?}", stream.inputs[1])
        };
        assert_eq!((e.tool.as_str(), e.code, e.name.as_deref()), ("bk-dump", 1, None));
        assert_eq!(stream.cut_short.len(), 1);
        // Without a begin (bk-ls | jq ... | bk-restore) nothing is expected.
        let bare = read_all(artifact_line().as_bytes(), "stdin").unwrap();
        assert!(!bare.announced && bare.cut_short.is_empty() && bare.inputs.len() == 1);
    }

    #[test]
    fn records_come_as_they_are_read() {
        // Input that fails after its first line: the first record comes before the failure.
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("the pipe broke"))
            }
        }
        let first = format!("{}\n", artifact_line());
        let mut records = Records::new(io::BufReader::new(first.as_bytes().chain(Broken)), "stdin");
        assert!(matches!(
            records.next(),
            Some(Ok(Input {
                record: Record::Artifact(_),
                ..
            }))
        ));
        let e = records.next().expect("the failure").unwrap_err();
        assert_eq!(
            (e.exit_code(), e.message.as_str()),
            (74, "reading stdin: the pipe broke")
        );
        assert!(records.next().is_none(), "nothing after a failure");
    }

    #[test]
    fn non_utf8_input_is_bad_data_with_its_line() {
        let input = [artifact_line().as_bytes(), b"\n{\"bk\":1,\xff}\n"].concat();
        let e = read_all(&input[..], "stdin").unwrap_err();
        assert_eq!(e.exit_code(), 65);
        assert!(e.message.starts_with("stdin line 2: not UTF-8"), "{}", e.message);
    }

    #[test]
    fn reader_names_the_malformed_line() {
        let input = format!("{}\n\n{{\"bk\":1,\"type\":\"artifact\"\n", artifact_line());
        let e = read_all(input.as_bytes(), "stdin").unwrap_err();
        assert_eq!(e.exit_code(), 65);
        assert!(e.message.starts_with("stdin line 3: malformed JSON"), "{}", e.message);
    }

    #[test]
    fn unknown_types_pass_and_foreign_json_is_refused() {
        let line = r#"{"bk":1,"type":"surprise","n":1}"#;
        let record = parse_line(line, "stdin line 1").unwrap();
        assert!(matches!(&record, Record::Unknown(m) if m["n"] == 1), "{record:?}");
        assert_eq!(parse_line(&record.to_line(), "again").unwrap(), record);
        let e = parse_line(r#"{"bk":1}"#, "x").unwrap_err();
        assert!(e.message.contains("needs a \"type\""), "{}", e.message);
        let e = parse_line(r#"{"type":"artifact"}"#, "x").unwrap_err();
        assert!(e.message.contains("not a bk record"));
        let e = parse_line("[1]", "x").unwrap_err();
        assert_eq!(e.exit_code(), 65);
    }

    #[test]
    fn pass_keeps_the_line_and_upstream_errors_fail_the_run() {
        let line = r#"{"bk":1,"type":"error","tool":"bk-dump","code":69,"message":"down","extra":true}"#;
        let inputs = read_all(line.as_bytes(), "stdin").unwrap().inputs;
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

    /// Artifact records with each confined field replaced by arbitrary text: either refused,
    /// or every path built from them stays in the name's directory of the store.
    fn hostile_artifact() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let text = prop_oneof![
            "\\PC{0,24}",
            "[a-z0-9./_-]{0,24}",
            Just("..".to_string()),
            Just("/".to_string())
        ];
        (text.clone(), text.clone(), text, 0..3usize).prop_map(|(name, id, file, prefixed)| {
            let mut v: Value = serde_json::from_str(&artifact_line()).unwrap();
            // Often keep the required prefixes, to get past them to what follows.
            let id = if prefixed > 0 { format!("{name}.{id}") } else { id };
            let file = if prefixed > 1 { format!("{id}.{file}") } else { file };
            v["name"] = name.into();
            v["id"] = id.into();
            v["file"] = file.into();
            v.to_string()
        })
    }

    proptest::proptest! {
        #[test]
        fn parsed_artifacts_stay_in_their_name_directory(line in hostile_artifact()) {
            if let Ok(Record::Artifact(a)) = parse_line(&line, "fuzz") {
                let root = std::path::Path::new("/store");
                let dir = root.join(&a.name);
                for path in [dir.join(&a.file), dir.join(format!("{}.json", a.id))] {
                    proptest::prop_assert_eq!(path.parent(), Some(dir.as_path()), "{:?}", path);
                    proptest::prop_assert!(path.components().all(|c| matches!(c,
                        std::path::Component::RootDir | std::path::Component::Normal(_))));
                }
                proptest::prop_assert_eq!(dir.parent(), Some(root));
            }
        }

        /// Any bytes at all: an error or records, never a panic.
        #[test]
        fn any_input_reads_or_fails_cleanly(lines in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::strategy::Just(artifact_line()),
                proptest::strategy::Just(r#"{"bk":1,"type":"begin","tool":"t","pid":1}"#.to_string()),
                proptest::strategy::Just(r#"{"bk":1,"type":"end","tool":"t","pid":1,"status":0}"#.to_string()),
                proptest::strategy::Just(r#"{"bk":1,"type":"error","tool":"t","code":1,"message":"m"}"#.to_string()),
                "\\PC{0,40}",
            ],
            0..8,
        ), noise in proptest::collection::vec(proptest::num::u8::ANY, 0..32)) {
            let mut bytes = lines.join("\n").into_bytes();
            bytes.extend(noise);
            if let Ok(stream) = read_all(&bytes[..], "fuzz") {
                proptest::prop_assert!(stream.inputs.iter().all(|i| !matches!(i.record, Record::Begin(_) | Record::End(_))));
            }
        }
    }
}
