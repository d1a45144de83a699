//! bk-restore into MySQL/MariaDB without destroying first: the backup is loaded into a
//! fresh `bk_restore_<random>` database and checked there; only then are its tables moved
//! into the target by one `RENAME TABLE` (atomic), the target's old tables moved aside into
//! `bk_old_<random>` by the same statement. Views, triggers, routines and events cannot move
//! across databases (RENAME TABLE refuses views with 1450 and tables with triggers with
//! 1435): their definitions are taken from the loaded copy by mariadb-dump, the program that
//! wrote them into the backup, and created again in the target. The old copy is dropped
//! last.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use bk_core::error::{Error, Result};

use crate::conn::Mysql;
use crate::mysql::{classify, ident, literal, query};

/// Held while the target changes: a SIGINT or SIGTERM waits for the swap to end, which
/// leaves either the old database or the new one, never a half-swapped one.
static SWAPPING: Mutex<()> = Mutex::new(());

/// The loaded, checked copy and where it goes.
pub struct Swap<'a> {
    pub client: &'a Path,
    pub dump: &'a Path,
    pub server: &'a Mysql<'a>,
    pub scratch: &'a str,
    pub old: &'a str,
    pub target: &'a str,
    /// The target exists (possibly empty).
    pub exists: bool,
    /// `--table`: only these tables (and their triggers) are replaced; the target's other
    /// tables, views, routines and events stay.
    pub partial: bool,
}

impl Swap<'_> {
    fn rows(&self, sql: &str) -> Result<Vec<String>> {
        Ok(query(self.client, self.server, None, sql)?
            .into_iter()
            .filter_map(|r| r.into_iter().next())
            .collect())
    }

    fn objects(
        &self,
        db: &str,
        table: &str,
        schema_column: &str,
        name_column: &str,
        extra: &str,
    ) -> Result<Vec<String>> {
        self.rows(&format!(
            "SELECT {name_column} FROM information_schema.{table} WHERE {schema_column} = {} {extra} ORDER BY 1",
            literal(db)
        ))
    }

    fn base_tables(&self, db: &str) -> Result<Vec<String>> {
        self.objects(
            db,
            "TABLES",
            "TABLE_SCHEMA",
            "TABLE_NAME",
            "AND TABLE_TYPE = 'BASE TABLE'",
        )
    }

    fn views(&self, db: &str) -> Result<Vec<String>> {
        self.objects(db, "TABLES", "TABLE_SCHEMA", "TABLE_NAME", "AND TABLE_TYPE = 'VIEW'")
    }

    /// Triggers of `db`, with the table each is on.
    fn triggers(&self, db: &str) -> Result<Vec<(String, String)>> {
        let rows = query(self.client, self.server, None, &format!(
            "SELECT TRIGGER_NAME, EVENT_OBJECT_TABLE FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = {} ORDER BY 1",
            literal(db)
        ))?;
        Ok(rows
            .into_iter()
            .filter_map(|r| Some((r.first()?.clone(), r.get(1)?.clone())))
            .collect())
    }

    /// The statements that create `db`'s triggers (of `tables`, or of all), views (those
    /// named), and with `routines` its routines and events, as mariadb-dump writes them:
    /// names unqualified, DEFINER, sql_mode and character sets kept.
    fn definitions(&self, db: &str, tables: Option<&[String]>, views: &[String], routines: bool) -> Result<Vec<u8>> {
        let dump = |args: &[&str], names: &[String]| -> Result<Vec<u8>> {
            let mut cmd = Command::new(self.dump);
            cmd.args(self.server.args())
                .args(["--skip-comments", "--skip-lock-tables", "--no-data"])
                .args(args)
                .arg("--")
                .arg(db)
                .args(names);
            run(cmd, None)
        };
        let mut sql = Vec::new();
        match tables {
            Some([]) => {}
            _ => {
                let kinds: &[&str] = if routines {
                    &["--no-create-info", "--triggers", "--routines", "--events"]
                } else {
                    &["--no-create-info", "--triggers", "--skip-routines", "--skip-events"]
                };
                sql.extend(dump(kinds, tables.unwrap_or_default())?);
            }
        }
        if !views.is_empty() {
            sql.extend(dump(&["--skip-triggers", "--skip-routines", "--skip-events"], views)?);
        }
        Ok(sql)
    }

    /// Runs SQL in `db` (none: "").
    fn apply(&self, db: &str, sql: &[u8]) -> Result<()> {
        let mut cmd = Command::new(self.client);
        cmd.args(self.server.args()).args(["--batch", "--binary-mode"]);
        if !db.is_empty() {
            cmd.arg(db);
        }
        run(cmd, Some(sql)).map(drop)
    }

    fn create_like_scratch(&self, db: &str) -> Result<()> {
        let (charset, collation) = self.scratch_defaults()?;
        self.apply(
            "",
            format!(
                "CREATE DATABASE {} CHARACTER SET {charset} COLLATE {collation}",
                ident(db)
            )
            .as_bytes(),
        )
    }

    fn scratch_defaults(&self) -> Result<(String, String)> {
        let row = query(self.client, self.server, None, &format!(
            "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = {}",
            literal(self.scratch)
        ))?;
        match row.first().map(Vec::as_slice) {
            Some([charset, collation]) => Ok((charset.clone(), collation.clone())),
            _ => Err(Error::data(format!("no defaults for {}: {row:?}", self.scratch))),
        }
    }

    /// Puts the scratch database's content in the target. On an error before the tables
    /// moved, the target is as it was; after, the old tables are in `self.old`, which the
    /// error names.
    pub fn run(&self) -> Result<()> {
        let (target, scratch, old) = (self.target, self.scratch, self.old);
        let incoming = self.base_tables(scratch)?;
        // Everything of the backup's that cannot be renamed, read before the copy changes.
        let replacing_some = self.partial && self.exists;
        let incoming_views = if replacing_some {
            Vec::new()
        } else {
            self.views(scratch)?
        };
        let created = self.definitions(scratch, None, &incoming_views, !replacing_some)?;
        let (leaving, blocking_views) = if !self.exists {
            (Vec::new(), Vec::new())
        } else if self.partial {
            let present = self.base_tables(target)?;
            let views = self.views(target)?;
            (
                incoming.iter().filter(|t| present.contains(t)).cloned().collect(),
                incoming.iter().filter(|t| views.contains(t)).cloned().collect(),
            )
        } else {
            (self.base_tables(target)?, self.views(target)?)
        };
        let blocking_triggers: Vec<String> = if self.exists {
            self.triggers(target)?
                .into_iter()
                .filter(|(_, table)| leaving.contains(table))
                .map(|(name, _)| name)
                .collect()
        } else {
            Vec::new()
        };
        // What the target loses before the rename, to put back if the rename fails.
        let put_back = if self.exists {
            self.definitions(target, Some(&leaving), &blocking_views, false)?
        } else {
            Vec::new()
        };
        let mut unblock = String::new();
        for (name, _) in self.triggers(scratch)? {
            unblock += &format!("DROP TRIGGER {}.{};\n", ident(scratch), ident(&name));
        }
        self.apply(scratch, unblock.as_bytes())?;

        // From here on a signal waits: nothing is left half done (an empty old copy
        // included).
        let _wait = bk_core::cleanup::on_exit(|| drop(SWAPPING.lock()));
        let _swapping = SWAPPING.lock().unwrap_or_else(|p| p.into_inner());
        if !self.exists {
            self.create_like_scratch(target)?;
        }
        if !leaving.is_empty() {
            self.create_like_scratch(old)?;
        }
        let mut rename = Vec::new();
        rename.extend(
            leaving
                .iter()
                .map(|t| format!("{}.{} TO {}.{}", ident(target), ident(t), ident(old), ident(t))),
        );
        rename.extend(
            incoming
                .iter()
                .map(|t| format!("{}.{} TO {}.{}", ident(scratch), ident(t), ident(target), ident(t))),
        );
        let mut swap = String::new();
        for name in &blocking_triggers {
            swap += &format!("DROP TRIGGER {}.{};\n", ident(target), ident(name));
        }
        for name in &blocking_views {
            swap += &format!("DROP VIEW {}.{};\n", ident(target), ident(name));
        }
        if !rename.is_empty() {
            swap += &format!("RENAME TABLE {};\n", rename.join(", "));
        }
        if let Err(e) = self.apply(target, swap.as_bytes()) {
            if self.base_tables(scratch).is_ok_and(|left| left.len() == incoming.len()) {
                return Err(self.roll_back(&put_back, &leaving, e));
            }
            return Err(self.recreate_failed(e));
        }

        // The tables are in place; the rest of the backup follows.
        let mut finish = Vec::new();
        if !self.partial {
            let (charset, collation) = self.scratch_defaults()?;
            finish.extend(
                format!(
                    "ALTER DATABASE {} CHARACTER SET {charset} COLLATE {collation};\n",
                    ident(target)
                )
                .bytes(),
            );
            for (kind, name) in self.routines_and_events(target)? {
                finish.extend(format!("DROP {kind} {}.{};\n", ident(target), ident(&name)).bytes());
            }
        }
        finish.extend(created);
        self.apply(target, &finish).map_err(|e| self.recreate_failed(e))?;
        if !leaving.is_empty() {
            if let Err(e) = self.apply("", format!("DROP DATABASE {}", ident(old)).as_bytes()) {
                eprintln!(
                    "bk-restore: warning: {target} is restored, but its old tables, moved to {old}, could not be dropped: {}",
                    e.message
                );
            }
        }
        Ok(())
    }

    fn routines_and_events(&self, db: &str) -> Result<Vec<(String, String)>> {
        let mut found = Vec::new();
        let routines = query(
            self.client,
            self.server,
            None,
            &format!(
                "SELECT ROUTINE_TYPE, ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = {}",
                literal(db)
            ),
        )?;
        found.extend(
            routines
                .into_iter()
                .filter_map(|r| Some((r.first()?.clone(), r.get(1)?.clone()))),
        );
        let events = self.objects(db, "EVENTS", "EVENT_SCHEMA", "EVENT_NAME", "")?;
        found.extend(events.into_iter().map(|e| ("EVENT".to_string(), e)));
        Ok(found)
    }

    /// The rename did not happen: the dropped triggers and views go back, the empty old
    /// copy goes.
    fn roll_back(&self, put_back: &[u8], leaving: &[String], e: Error) -> Error {
        let (target, old) = (self.target, self.old);
        if let Err(again) = self.apply(target, put_back) {
            return e.context(format!(
                "moving the restored tables into {target} failed, its tables are untouched, but putting back its triggers and views failed ({}); their definitions: mariadb-dump --no-data --no-create-info --triggers of the backup",
                again.message
            ));
        }
        if !leaving.is_empty() {
            let _ = self.apply("", format!("DROP DATABASE IF EXISTS {}", ident(old)).as_bytes());
        }
        e.context(format!(
            "moving the restored tables into {target} failed; {target} is as it was"
        ))
    }

    /// The swap went (at least partly) through but not to its end.
    fn recreate_failed(&self, e: Error) -> Error {
        let (target, old) = (self.target, self.old);
        e.context(format!(
            "the restored tables are in {target}, but creating its views, triggers, routines and events failed; \
             its old tables are kept in database {old} (to go back: RENAME TABLE {old}.t TO {target}.t for each, \
             once the restored ones are dropped or moved)"
        ))
    }
}

/// Runs a client program in its own process group, so that a Ctrl-C meant for bk-restore
/// does not stop it half way (bk-restore finishes the swap, then exits), with `input` on
/// stdin; returns its stdout.
fn run(mut cmd: Command, input: Option<&[u8]>) -> Result<Vec<u8>> {
    let program = PathBuf::from(cmd.get_program())
        .file_name()
        .unwrap_or(OsStr::new("?"))
        .to_string_lossy()
        .into_owned();
    cmd.process_group(0)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| Error::io(format!("starting {program}"), e))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write error means the program stopped: its status says why.
        let _ = stdin.write_all(input);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("waiting for {program}"), e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        return Err(Error::new(
            classify(&stderr),
            format!("{program} failed: {}", said[said.len().saturating_sub(3)..].join(" / ")),
        ));
    }
    Ok(out.stdout)
}

/// Restored counts keyed by the target instead of the scratch database.
pub fn counts_in(counts: BTreeMap<String, u64>, scratch: &str, target: &str) -> BTreeMap<String, u64> {
    counts
        .into_iter()
        .map(
            |(k, v)| match k.strip_prefix(scratch).and_then(|t| t.strip_prefix('.')) {
                Some(table) => (format!("{target}.{table}"), v),
                None => (k, v),
            },
        )
        .collect()
}
