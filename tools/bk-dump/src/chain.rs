//! Incremental chains from bk-dump's side: which backup the next one builds on, and the
//! chain state (GNU tar's snapshot file) kept in the store between runs.
//!
//! The state is `<name>.chain-state` beside the manifests: one JSON line saying which backup
//! it follows and the sha256 of the rest, then the snapshot file itself. It is written after
//! the manifest of the backup it follows, through the store's upload (0600, atomic), so a run
//! killed anywhere leaves either the old state, which then follows a backup that is no longer
//! the newest, or the new one: either way the next backup is right (a full, or the next level).

use std::io::{Read, Write};
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use bk_core::error::{from_io, Error, Kind, Result};
use bk_core::record::Artifact;
use bk_core::store::{chain_state_file, Store};
use bk_engines::files::incremental::{parse_snapshot, FullEvery, Snapshot, Tree};

/// What the next backup of an incremental name is.
pub struct Plan {
    pub level: u32,
    /// The backup it builds on, and that backup's chain; `None` for a full.
    pub parent: Option<(String, String)>,
    /// The snapshot file to continue from (`None`: a full), and the tree it stands for.
    pub snapshot: Option<(Vec<u8>, Tree)>,
}

impl Plan {
    fn full() -> Self {
        Plan {
            level: 0,
            parent: None,
            snapshot: None,
        }
    }

    /// The chain fields of the backup `id` made by this plan.
    pub fn fields(&self, id: &str) -> (Option<u32>, Option<String>, Option<String>) {
        match &self.parent {
            None => (Some(0), None, Some(id.to_string())),
            Some((parent, chain)) => (Some(self.level), Some(parent.clone()), Some(chain.clone())),
        }
    }
}

/// The first line of the state file.
#[derive(Debug, Serialize, Deserialize)]
struct StateHeader {
    /// The backup whose dump left this snapshot.
    follows: String,
    /// Of the bytes after the line: the snapshot file, then the paths it lists that are not
    /// in the backup (excluded, unreadable), each ended by a NUL.
    sha256: String,
    /// The size of the snapshot file.
    snapshot_bytes: usize,
}

/// Decides what the next backup of `name` is. An unexpected full (the state lost, damaged or
/// not the newest backup's, the chain broken, other paths) is said on stderr with its
/// reason; a due one (the first backup, --full-every) is not, so that cron mails only news.
pub fn plan(store: &dyn Store, name: &str, paths: &[String], every: &FullEvery, now: DateTime<Utc>) -> Result<Plan> {
    let unexpected = |why: String| {
        eprintln!("bk-dump: {name}: this backup is a full one (level 0): {why}");
        Ok(Plan::full())
    };
    let listing = match store.list(Some(name)) {
        // The store is made by the first backup's upload.
        Err(e) if e.kind == Kind::NoInput => return Ok(Plan::full()),
        listed => listed?,
    };
    let Some(newest) = listing.artifacts.last() else {
        return Ok(Plan::full());
    };
    if let Some(b) = listing.broken.iter().find(|b| b.is_newer_than(Some(newest))) {
        return unexpected(format!("the newest backup {} is broken ({})", b.id, b.reason));
    }
    let (Some(level), Some(chain)) = (newest.level, &newest.chain) else {
        return unexpected(format!("the newest backup {} is not incremental", newest.id));
    };
    if newest.source.paths != paths {
        return unexpected(format!(
            "the newest backup {} is of other paths ({})",
            newest.id,
            newest.source.paths.join(" ")
        ));
    }
    // Every piece of the chain must be there, or the new one could never be restored.
    let by_id = |id: &str| listing.artifacts.iter().find(|a| a.id == id);
    let mut piece = newest;
    while let Some(parent) = &piece.parent {
        match by_id(parent) {
            Some(p) if p.chain.as_ref() == Some(chain) => piece = p,
            _ => {
                return unexpected(format!(
                    "the chain of {} lacks {parent}, which {} builds on",
                    newest.id, piece.id
                ))
            }
        }
    }
    if let Some(why) = every.ends(piece, level, now)? {
        return Ok(Plan::full()).inspect(|_| {
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                eprintln!("bk-dump: {name}: a full backup starts a new chain: {why}");
            }
        });
    }
    let (bytes, snapshot, absent) = match read_state(store, name, &newest.id) {
        Ok(Some(state)) => state,
        Ok(None) => {
            return unexpected(format!(
                "no chain state in {} ({})",
                store.url(),
                chain_state_file(name)
            ))
        }
        Err(e) if e.kind == Kind::Data => return unexpected(format!("the chain state is not usable: {}", e.message)),
        Err(e) => return Err(e),
    };
    // GNU tar took the snapshot's time as its dump began: a planted state with a later time
    // would make tar skip every change since.
    let started = newest.made_at()?.timestamp();
    let finished = DateTime::parse_from_rfc3339(&newest.finished).map_or(started, |t| t.timestamp());
    if snapshot.started < started - 5 || snapshot.started > finished + 1 {
        return unexpected(format!(
            "the chain state's time ({}) is not that of {} ({} to {})",
            snapshot.started, newest.id, newest.started, newest.finished
        ));
    }
    Ok(Plan {
        level: level + 1,
        parent: Some((newest.id.clone(), chain.clone())),
        snapshot: Some((bytes, snapshot.tree(&absent))),
    })
}

/// The snapshot of the state file, if there is one and it follows `newest`; a state that
/// does not (a killed run's, an older one) or is damaged is bad data (65).
type State = (Vec<u8>, Snapshot, std::collections::HashSet<Vec<u8>>);

fn read_state(store: &dyn Store, name: &str, newest: &str) -> Result<Option<State>> {
    let file = chain_state_file(name);
    // A remote store may say that the file is missing only once it is read.
    let read = store.open_file(name, &file).and_then(|mut input| {
        let mut bytes = Vec::new();
        input
            .read_to_end(&mut bytes)
            .map_err(|e| from_io(format!("reading {file}"), e))?;
        Ok(bytes)
    });
    let mut bytes = match read {
        Ok(bytes) => bytes,
        Err(e) if e.kind == Kind::NoInput => return Ok(None),
        Err(e) => return Err(e),
    };
    let line_end = bytes
        .iter()
        .take(64 * 1024)
        .position(|b| *b == b'\n')
        .ok_or_else(|| Error::data(format!("{file} has no header line")))?;
    let header: StateHeader = serde_json::from_slice(&bytes[..line_end])
        .map_err(|e| Error::data(format!("{file}: its header line is not bk's: {e}")))?;
    let mut snapshot = bytes.split_off(line_end + 1);
    if hex::encode(Sha256::digest(&snapshot)) != header.sha256 || header.snapshot_bytes > snapshot.len() {
        return Err(Error::data(format!(
            "{file}: its sha256 is not the one its header says"
        )));
    }
    if header.follows != newest {
        return Err(Error::data(format!(
            "{file} follows {}, but the newest backup is {newest}",
            header.follows
        )));
    }
    let absent = snapshot.split_off(header.snapshot_bytes);
    let absent = absent
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let parsed = parse_snapshot(&snapshot, &file)?;
    Ok(Some((snapshot, parsed, absent)))
}

/// Saves the snapshot file that the dump of `artifact` left at `snapshot`, and what of it
/// `tree` (the tree after the dump) does not hold, as the name's state.
pub fn write_state(store: &dyn Store, artifact: &Artifact, snapshot: &Path, tree: &Tree) -> Result<()> {
    let mut bytes = std::fs::read(snapshot).map_err(|e| Error::io(format!("reading {}", snapshot.display()), e))?;
    let snapshot_bytes = bytes.len();
    for path in tree.absent_from(&parse_snapshot(&bytes, "the new snapshot")?.listing) {
        bytes.extend(path);
        bytes.push(0);
    }
    let header = StateHeader {
        follows: artifact.id.clone(),
        sha256: hex::encode(Sha256::digest(&bytes)),
        snapshot_bytes,
    };
    let file = chain_state_file(&artifact.name);
    let mut upload = store.create(&artifact.name, &file)?;
    let line = serde_json::to_string(&header).expect("a header serializes");
    let writing = |e| from_io(format!("writing {}", store.location(&artifact.name, &file)), e);
    upload.write_all(line.as_bytes()).map_err(writing)?;
    upload.write_all(b"\n").map_err(writing)?;
    upload.write_all(&bytes).map_err(writing)?;
    upload.commit()
}
