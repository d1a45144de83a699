//! --prom-file: metrics per backup name in the text format node_exporter's textfile collector
//! reads. Several jobs share one file: each run reads it, replaces the samples of the names
//! it saw and keeps every other line, under a lock beside the file, and publishes the result
//! by rename (mode 0644: the exporter runs as another user).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::DateTime;
use serde_json::Value;

use bk_core::error::{Error, Result};
use bk_core::lock::Lock;
use bk_core::record::{Artifact, Input, Output, Record};
use bk_core::store::replace_file;

/// How long a run waits for another job that is rewriting the same file (a rewrite takes
/// milliseconds; a holder this slow is stuck).
const LOCK_WAIT: Duration = Duration::from_secs(30);

const LAST_RUN: &str = "bk_last_run_timestamp_seconds";
const LAST_RUN_SUCCESS: &str = "bk_last_run_success";
const LAST_SUCCESS: &str = "bk_last_success_timestamp_seconds";
const BYTES: &str = "bk_backup_bytes";
const DURATION: &str = "bk_backup_duration_seconds";
const ROWS: &str = "bk_backup_rows_total";
const VERIFY_OK: &str = "bk_verify_ok";
const UNNAMED_FAILURE: &str = "bk_unnamed_failure_timestamp_seconds";

/// Every metric bk-notify writes (each a gauge), with its help text.
const METRICS: [(&str, &str); 8] = [
    (
        LAST_RUN,
        "When a pipeline ending in bk-notify last ran for this backup name (Unix time).",
    ),
    (
        LAST_RUN_SUCCESS,
        "1 if the last run of this backup name succeeded, 0 if it failed.",
    ),
    (
        LAST_SUCCESS,
        "When the newest backup of a successful run finished (Unix time, from its manifest).",
    ),
    (BYTES, "Size of the newest backup as stored (compressed, encrypted)."),
    (
        DURATION,
        "Time the newest backup took to make: its finished minus its started time.",
    ),
    (
        ROWS,
        "Rows, documents or files in the newest backup: the sum of its counts.",
    ),
    (
        VERIFY_OK,
        "1 if the last verification of this backup name passed, 0 if it did not.",
    ),
    (
        UNNAMED_FAILURE,
        "When a run last failed with no record naming a backup, so that no name's metrics could say so (Unix time).",
    ),
];

/// Rewrites the file with what this run says, and prints the `notified` record.
pub fn notify(path: &Path, inputs: &[Input], failed: bool, out: &mut Output) -> Result<()> {
    let outcome = write(path, &RunOutcome::of(inputs, failed), now());
    crate::sink::finish(out, "prom", &path.display().to_string(), None, outcome, failed)
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as f64
}

/// Read, merge and replace, under the lock that makes the three one step for every job
/// sharing the file.
fn write(path: &Path, run: &RunOutcome, now: f64) -> Result<()> {
    let mut lock_path = PathBuf::from(path).into_os_string();
    lock_path.push(".lock");
    let _lock = Lock::shared(Path::new(&lock_path), LOCK_WAIT)?;
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io("reading it", e)),
    };
    // Lines of another job, or by hand, are never dropped: a file this run cannot read
    // whole is left as it is, and the run says so.
    let mut file = PromFile::parse(&text).map_err(|why| {
        Error::data(format!(
            "{why}: not the text format node_exporter reads; the file is left as it is: fix or remove it"
        ))
    })?;
    file.record(run, now);
    replace_file(path, 0o644, file.render().as_bytes())
}

/// What one run says about one backup name.
#[derive(Debug, Default)]
struct NameOutcome<'a> {
    failed: bool,
    /// The last artifact record of the name: the backup the run made (or passed on).
    artifact: Option<&'a Artifact>,
    /// Whether every verification of the name passed, when one came.
    verify_ok: Option<bool>,
}

#[derive(Debug)]
struct RunOutcome<'a> {
    names: BTreeMap<String, NameOutcome<'a>>,
    /// The run failed and no record says which name failed, nor names any backup at all.
    unnamed_failure: bool,
}

impl<'a> RunOutcome<'a> {
    fn of(inputs: &'a [Input], failed: bool) -> Self {
        let mut names: BTreeMap<String, NameOutcome> = BTreeMap::new();
        let mut unattributed = false;
        for input in inputs {
            match &input.record {
                Record::Artifact(a) => names.entry(a.name.clone()).or_default().artifact = Some(a),
                Record::Error(e) => match &e.name {
                    Some(name) => names.entry(name.clone()).or_default().failed = true,
                    None => unattributed = true,
                },
                Record::Verified(v) => {
                    let ok = !crate::failed(input);
                    // bk-verify names the backup; an id is `<name>.<stamp>` otherwise.
                    let name = v.get("name").and_then(Value::as_str).or_else(|| {
                        v.get("id")
                            .and_then(Value::as_str)
                            .and_then(|id| id.rsplit_once('.'))
                            .map(|(name, _)| name)
                    });
                    match name {
                        Some(name) => {
                            let named = names.entry(name.to_string()).or_default();
                            named.verify_ok = Some(named.verify_ok.unwrap_or(true) && ok);
                            named.failed |= !ok;
                        }
                        None => unattributed |= !ok,
                    }
                }
                _ => {}
            }
        }
        // A failure that no record puts on a name (an error record without one, no records
        // at all) fails every name of the run: better a false alarm than a silent failure.
        unattributed |= failed && !names.values().any(|n| n.failed);
        if unattributed {
            names.values_mut().for_each(|n| n.failed = true);
        }
        RunOutcome {
            unnamed_failure: unattributed && names.is_empty(),
            names,
        }
    }
}

/// Unix time of an RFC 3339 time.
fn unix_time(text: &str) -> Option<f64> {
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.timestamp() as f64)
}

/// The file as read: every sample by family and key, so that a run replaces exactly the
/// samples it writes and keeps the rest (other names, other metrics, a newer bk's).
#[derive(Debug, Default)]
struct PromFile {
    /// Comments other than HELP and TYPE, kept at the top.
    comments: Vec<String>,
    families: BTreeMap<String, Family>,
}

#[derive(Debug, Default)]
struct Family {
    /// The HELP and TYPE lines read; bk's own metrics get theirs written afresh.
    header: Vec<String>,
    /// Per key (metric and labels, in a canonical form): the line and its value.
    samples: BTreeMap<String, (String, f64)>,
}

impl PromFile {
    /// Reads the text format (version 0.0.4); the first line that is not in it is the error.
    fn parse(text: &str) -> std::result::Result<PromFile, String> {
        let mut file = PromFile::default();
        let mut current: Option<String> = None;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                match (words.next(), words.next()) {
                    (Some("HELP" | "TYPE"), Some(metric)) => {
                        let family = file.families.entry(metric.to_string()).or_default();
                        family.header.push(line.to_string());
                        current = Some(metric.to_string());
                    }
                    _ => file.comments.push(line.to_string()),
                }
                continue;
            }
            let (metric, key, value) = parse_sample(line).map_err(|why| format!("line {}: {why}", i + 1))?;
            // A histogram's or summary's samples (x_bucket, x_sum) belong to the family
            // x above them; bk's own metrics are families of their own.
            let family = match current {
                Some(ref c) if metric.starts_with(c.as_str()) && !is_ours(&metric) => c.clone(),
                _ => metric,
            };
            let samples = &mut file.families.entry(family).or_default().samples;
            samples.insert(key, (line.to_string(), value));
        }
        Ok(file)
    }

    /// Sets the samples this run has values for; the others (a failed run's last success,
    /// the size of a backup this run did not make) stay as they were.
    fn record(&mut self, run: &RunOutcome, now: f64) {
        for (name, outcome) in &run.names {
            let name = Some(name.as_str());
            self.set(LAST_RUN, name, now);
            self.set(LAST_RUN_SUCCESS, name, if outcome.failed { 0.0 } else { 1.0 });
            if let Some(a) = outcome.artifact {
                self.set(BYTES, name, a.bytes as f64);
                self.set(ROWS, name, a.counts.values().sum::<u64>() as f64);
                let finished = unix_time(&a.finished);
                if let (Some(started), Some(finished)) = (unix_time(&a.started), finished) {
                    self.set(DURATION, name, (finished - started).max(0.0));
                }
                let made = finished.or_else(|| a.made_at().ok().map(|t| t.timestamp() as f64));
                if let Some(made) = made.filter(|_| !outcome.failed) {
                    // Never back in time: a verify run may pass on an older backup.
                    let newest = self.get(LAST_SUCCESS, name).map_or(made, |before| before.max(made));
                    self.set(LAST_SUCCESS, name, newest);
                }
            }
            if let Some(ok) = outcome.verify_ok {
                self.set(VERIFY_OK, name, if ok { 1.0 } else { 0.0 });
            }
        }
        if run.unnamed_failure {
            self.set(UNNAMED_FAILURE, None, now);
        }
    }

    fn get(&self, metric: &str, name: Option<&str>) -> Option<f64> {
        let family = self.families.get(metric)?;
        family.samples.get(&sample_key(metric, name)).map(|(_, value)| *value)
    }

    fn set(&mut self, metric: &str, name: Option<&str>, value: f64) {
        let key = sample_key(metric, name);
        let line = format!("{key} {value}");
        let family = self.families.entry(metric.to_string()).or_default();
        family.samples.insert(key, (line, value));
    }

    /// Each family once, its HELP and TYPE first, then its samples.
    fn render(&self) -> String {
        let mut text = String::new();
        for comment in &self.comments {
            let _ = writeln!(text, "{comment}");
        }
        for (metric, family) in &self.families {
            match METRICS.iter().find(|(m, _)| m == metric) {
                Some((_, help)) => {
                    let _ = writeln!(text, "# HELP {metric} {help}\n# TYPE {metric} gauge");
                }
                None => family.header.iter().for_each(|line| {
                    let _ = writeln!(text, "{line}");
                }),
            }
            for (line, _) in family.samples.values() {
                let _ = writeln!(text, "{line}");
            }
        }
        text
    }
}

fn is_ours(metric: &str) -> bool {
    METRICS.iter().any(|(m, _)| *m == metric)
}

/// The key of one of bk's samples: the metric and its `name` label, if any.
fn sample_key(metric: &str, name: Option<&str>) -> String {
    let labels: Vec<(String, String)> = name.map(|n| ("name".to_string(), n.to_string())).into_iter().collect();
    render_key(metric, &labels)
}

/// `metric{label="value",...}`, the labels sorted, their values escaped as the format says
/// (backslash, double quote, line feed).
fn render_key(metric: &str, labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return metric.to_string();
    }
    let mut sorted = labels.to_vec();
    sorted.sort();
    let rendered: Vec<String> = sorted
        .iter()
        .map(|(label, value)| {
            let escaped = value.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n");
            format!("{label}=\"{escaped}\"")
        })
        .collect();
    format!("{metric}{{{}}}", rendered.join(","))
}

/// One sample line, `metric{label="value",...} value [timestamp]`: its metric, its key
/// (see [`render_key`]) and its value, or what is wrong with it.
fn parse_sample(line: &str) -> std::result::Result<(String, String, f64), String> {
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let end = line.find(|c| !is_name_char(c)).unwrap_or(line.len());
    let metric = &line[..end];
    if metric.is_empty() || metric.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("not a sample: it does not start with a metric name".into());
    }
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let label = &rest[..end];
            let quoted = rest[end..]
                .trim_start()
                .strip_prefix('=')
                .map(str::trim_start)
                .and_then(|r| r.strip_prefix('"'))
                .filter(|_| !label.is_empty())
                .ok_or_else(|| format!("{metric}: a label must be name=\"value\""))?;
            let (value, after) =
                unescape(quoted).ok_or_else(|| format!("{metric}: a label value is not one quoted string"))?;
            labels.push((label.to_string(), value));
            rest = after.trim_start();
            match rest.strip_prefix(',') {
                Some(after) => rest = after,
                None if rest.starts_with('}') => {}
                None => return Err(format!("{metric}: a label must be followed by ',' or '}}'")),
            }
        }
    }
    let mut fields = rest.split_whitespace();
    let value = fields
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("{metric}: no number after the metric"))?;
    let timestamp_ok = fields.next().is_none_or(|t| t.parse::<i64>().is_ok());
    if !timestamp_ok || fields.next().is_some() {
        return Err(format!("{metric}: more than a value and a timestamp"));
    }
    Ok((metric.to_string(), render_key(metric, &labels), value))
}

/// A label value up to its closing quote, unescaped, and what follows the quote.
fn unescape(quoted: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &quoted[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                c @ ('\\' | '"') => value.push(c),
                _ => return None,
            },
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_read_back_as_written_whatever_their_labels_hold() {
        let name = "we\"ird\\na\nme";
        let key = sample_key(BYTES, Some(name));
        assert_eq!(key, r#"bk_backup_bytes{name="we\"ird\\na\nme"}"#);
        let (metric, again, value) = parse_sample(&format!("{key} 12 1700000000000")).unwrap();
        assert_eq!((metric.as_str(), again, value), (BYTES, key, 12.0));
        let spaced = parse_sample(r#"x_bucket{ le = "+Inf" , b="1", } +Inf"#).unwrap();
        assert_eq!(spaced.1, r#"x_bucket{b="1",le="+Inf"}"#);
        for bad in [
            "bk_x{name=\"a} 1",
            "bk_x{name=a} 1",
            "bk_x{name=\"a\"",
            "bk_x{name=\"a\\t\"} 1",
            "bk_x one",
            "bk_x 1 2 3",
            "{name=\"a\"} 1",
            "bk_x{name=\"a\" other=\"b\"} 1",
        ] {
            assert!(parse_sample(bad).is_err(), "{bad}");
        }
    }
}
