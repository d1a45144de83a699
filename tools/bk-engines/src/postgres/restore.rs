//! bk-restore's `postgres` engine: pg_restore (or psql) into a new or empty database, or,
//! with --replace, into a scratch database swapped in by renaming.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::PathBuf;

use postgres::error::SqlState;
use postgres::Client;

use bk_core::codec::Decoder;
use bk_core::error::{from_io, Error, Kind, Result};
use bk_core::record::Artifact;

use crate::process::{find_program, stream_into, stream_into_may_stop};
use crate::{RestoreOptions, RestoredInfo};

use super::conn::PgConn;
use super::{classify, count_rows, drop_database, ident, literal, pg_error, MAINTENANCE_DB};

/// Restores into `--database NEW` (default: the source's name), created from template0.
/// The stored bytes were checked before (restore.rs).
pub fn restore(artifact: &Artifact, mut decoder: Decoder, opts: &RestoreOptions) -> Result<RestoredInfo> {
    let conn = PgConn::new(&opts.conn)?;
    let target_of = |db: String| {
        let mut t = serde_json::Map::new();
        t.insert("host".into(), conn.host_name().into());
        t.insert("port".into(), conn.port.into());
        t.insert("database".into(), db.into());
        t
    };
    if artifact.source.database.is_none() {
        // Roles and tablespaces: replayed into the maintenance database; existing roles
        // are reported by psql and kept.
        let mut cmd = conn.command(&find_program(&["psql"], "postgresql-client")?);
        cmd.args(["--quiet", "--dbname", MAINTENANCE_DB]);
        stream_into(cmd, &mut decoder, classify)?;
        decoder.finish(artifact)?;
        return Ok(RestoredInfo {
            target: target_of(MAINTENANCE_DB.into()),
            counts: BTreeMap::new(),
            complete: true,
        });
    }
    let target = opts
        .database
        .clone()
        .or_else(|| artifact.source.database.clone())
        .expect("checked above");
    if artifact.format == "pgsql" && !opts.tables.is_empty() {
        return Err(Error::usage(
            "--table needs a custom-format backup (pg_restore); this one is plain SQL",
        ));
    }
    let schema = table_schema(&opts.tables)?;
    if opts.replace {
        if !opts.tables.is_empty() {
            // The swap replaces a whole database: with --table, by one that holds only those
            // tables. Refused rather than losing every other table of the live database.
            return Err(Error::usage(format!(
                "--table with --replace would replace the whole database {target} by one holding only \
                 these tables; restore them into another database (--database NEW) and copy them over"
            )));
        }
        let counts = replace_database(artifact, decoder, &conn, &target, opts)?;
        return Ok(RestoredInfo {
            target: target_of(target),
            counts,
            complete: true,
        });
    }
    prepare_database(&conn, &target)?;
    let loaded = load(artifact, decoder, &conn, &target, opts, schema.as_deref());
    if let Err(e) = loaded {
        let _ = conn.connect(MAINTENANCE_DB).and_then(|mut c| {
            c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(&target)))
                .map_err(|e| pg_error("dropping", e))
        });
        return Err(e.context(format!("restoring into {target} failed, the database was dropped")));
    }
    let mut client = conn.connect(&target)?;
    let counts = count_rows(&mut client, "counting the restored rows")?;
    Ok(RestoredInfo {
        target: target_of(target),
        counts,
        complete: opts.tables.is_empty(),
    })
}

/// Makes `target` an empty database: created if missing, refused if it holds anything.
fn prepare_database(conn: &PgConn, target: &str) -> Result<()> {
    let mut admin = conn.connect(MAINTENANCE_DB)?;
    let exists = !admin
        .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&target])
        .map_err(|e| pg_error("looking up the target", e))?
        .is_empty();
    if exists {
        let holds = count_rows(&mut conn.connect(target)?, "looking at the target")?;
        if !holds.is_empty() {
            return Err(Error::cant_create(format!(
                "database {target} is not empty; pass --replace to replace it"
            )));
        }
        admin
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", ident(target)))
            .map_err(|e| pg_error(&format!("dropping {target}"), e))?;
    }
    admin
        .batch_execute(&format!("CREATE DATABASE {} TEMPLATE template0", ident(target)))
        .map_err(|e| pg_error(&format!("creating {target}"), e))
}

/// `--replace`: the backup is loaded into a new database `bk_restore_<random>`, created like
/// the old target (owner, encoding, locale, tablespace), read to its end and checked, its
/// rows counted against the manifest's, the old target's database-level settings copied
/// onto it; only then are the names swapped in one transaction (the old target becomes
/// `bk_old_<random>`, dropped after the commit). Any failure or signal before the commit
/// leaves the old target as it was and drops the new database. Returns the restored counts.
fn replace_database(
    artifact: &Artifact,
    decoder: Decoder,
    conn: &PgConn,
    target: &str,
    opts: &RestoreOptions,
) -> Result<BTreeMap<String, u64>> {
    let mut admin = conn.connect(admin_database(target))?;
    let old = OldDatabase::look_up(&mut admin, target)?;
    if old.is_some() {
        refuse_if_in_use(&mut admin, target)?;
    }
    let random = format!("{:016x}", rand::random::<u64>());
    let scratch = format!("bk_restore_{random}");
    let retired = format!("bk_old_{random}");
    let created = format!(
        "CREATE DATABASE {} TEMPLATE template0{}",
        ident(&scratch),
        old.as_ref().map(OldDatabase::create_options).unwrap_or_default()
    );
    admin
        .batch_execute(&created)
        .map_err(|e| pg_error(&format!("creating {scratch} to restore {target} into"), e))?;
    // Dropped whatever happens: the new database if the swap did not happen, the old one
    // (under its retired name) if it did.
    let (dropper, names) = (opts.clone(), [scratch.clone(), retired.clone()]);
    let _drop = bk_core::cleanup::on_exit(move || {
        for name in names {
            if let Err(e) = drop_database(&dropper, &name) {
                eprintln!(
                    "bk-restore: warning: could not drop {name}: {}; drop it by hand",
                    e.message
                );
            }
        }
    });
    let untouched = format!("{target} was left as it was");
    load(artifact, decoder, conn, &scratch, opts, None).map_err(|e| e.context(&untouched))?;
    let counts = count_rows(&mut conn.connect(&scratch)?, "counting the restored rows")?;
    if let Some(m) = crate::count_mismatch(&artifact.counts, &counts, &[]) {
        return Err(Error::data(format!(
            "{}: the restored database differs from the backup: {m}; {untouched}",
            artifact.id
        )));
    }
    if let Some(old) = &old {
        old.copy_settings(&mut admin, &scratch)
            .map_err(|e| e.context(format!("copying the settings of {target}; {untouched}")))?;
    }
    swap(&mut admin, target, &scratch, old.as_ref().map(|_| retired.as_str())).map_err(|e| e.context(&untouched))?;
    Ok(counts)
}

/// Where to connect to create, rename and drop `target`: not into the target itself.
fn admin_database(target: &str) -> &'static str {
    if target == MAINTENANCE_DB {
        "template1"
    } else {
        MAINTENANCE_DB
    }
}

/// Sessions connected to `database` but this one (autovacuum workers are stopped by the
/// rename itself).
fn sessions_in(admin: &mut Client, database: &str) -> Result<i64> {
    Ok(admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()
               AND backend_type IS DISTINCT FROM 'autovacuum worker'",
            &[&database],
        )
        .map_err(|e| pg_error(&format!("looking for sessions connected to {database}"), e))?
        .get(0))
}

/// A database cannot be renamed while others use it: refused, never killed silently.
fn refuse_if_in_use(admin: &mut Client, database: &str) -> Result<()> {
    match sessions_in(admin, database)? {
        0 => Ok(()),
        n => Err(Error::temp_fail(format!(
            "{n} session(s) are connected to {database}; stop them (the application, psql...) \
             and restore again"
        ))),
    }
}

/// Gives the restored database the target's name, the old target (if any) `retired`, in
/// one transaction: the target's name always holds either the old or the new data.
fn swap(admin: &mut Client, target: &str, scratch: &str, retired: Option<&str>) -> Result<()> {
    let mut renames = String::from("BEGIN;");
    if let Some(retired) = retired {
        renames += &format!("ALTER DATABASE {} RENAME TO {};", ident(target), ident(retired));
    }
    renames += &format!("ALTER DATABASE {} RENAME TO {}; COMMIT;", ident(scratch), ident(target));
    if let Err(e) = admin.batch_execute(&renames) {
        let _ = admin.batch_execute("ROLLBACK");
        if e.code() == Some(&SqlState::OBJECT_IN_USE) {
            refuse_if_in_use(admin, target)?;
        }
        return Err(pg_error(&format!("renaming {scratch} to {target}"), e));
    }
    Ok(())
}

/// The old target of `--replace`: how it was created and what was set on it since, for the
/// database that replaces it. Its `pg_database` row is read as JSON: its columns differ
/// between PostgreSQL versions (daticulocale in 15 and 16, datlocale from 17...).
struct OldDatabase {
    name: String,
    row: serde_json::Value,
    owner: String,
    encoding: String,
    tablespace: String,
}

impl OldDatabase {
    fn look_up(admin: &mut Client, name: &str) -> Result<Option<OldDatabase>> {
        let rows = admin
            .query(
                "SELECT to_jsonb(d)::text, pg_get_userbyid(d.datdba)::text, pg_encoding_to_char(d.encoding)::text,
                        t.spcname::text
                 FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = $1",
                &[&name],
            )
            .map_err(|e| pg_error(&format!("looking up {name}"), e))?;
        let Some(row) = rows.first() else { return Ok(None) };
        let json: String = row.get(0);
        Ok(Some(OldDatabase {
            name: name.to_string(),
            row: serde_json::from_str(&json)
                .map_err(|e| Error::new(Kind::Io, format!("reading pg_database's row of {name}: {e}")))?,
            owner: row.get(1),
            encoding: row.get(2),
            tablespace: row.get(3),
        }))
    }

    fn text(&self, column: &str) -> Option<&str> {
        self.row.get(column).and_then(|v| v.as_str()).filter(|s| !s.is_empty())
    }

    /// ` OWNER ... ENCODING ... LC_COLLATE ...`, for CREATE DATABASE.
    fn create_options(&self) -> String {
        let mut options = format!(
            " OWNER {} ENCODING {} TABLESPACE {}",
            ident(&self.owner),
            literal(&self.encoding),
            ident(&self.tablespace)
        );
        for (option, column) in [("LC_COLLATE", "datcollate"), ("LC_CTYPE", "datctype")] {
            if let Some(v) = self.text(column) {
                options += &format!(" {option} {}", literal(v));
            }
        }
        let locale = self.text("datlocale").or_else(|| self.text("daticulocale"));
        match self.text("datlocprovider") {
            Some("i") => {
                options += " LOCALE_PROVIDER icu";
                if let Some(l) = locale {
                    options += &format!(" ICU_LOCALE {}", literal(l));
                }
                if let Some(rules) = self.text("daticurules") {
                    options += &format!(" ICU_RULES {}", literal(rules));
                }
            }
            Some("b") => {
                options += " LOCALE_PROVIDER builtin";
                if let Some(l) = locale {
                    options += &format!(" BUILTIN_LOCALE {}", literal(l));
                }
            }
            _ => {}
        }
        options
    }

    /// Copies onto `new` what pg_restore without --create does not restore and what was set
    /// on the old target: GRANTs on the database, `ALTER DATABASE ... SET` and `ALTER ROLE
    /// ... IN DATABASE ... SET`, its comment and connection limit.
    fn copy_settings(&self, admin: &mut Client, new: &str) -> Result<()> {
        let doing = format!("reading the settings of {}", self.name);
        let mut statements = Vec::new();
        let db = ident(new);
        if !self.row["datacl"].is_null() {
            statements.push(format!(
                "REVOKE ALL ON DATABASE {db} FROM PUBLIC, {}",
                ident(&self.owner)
            ));
            let grants = admin
                .query(
                    "SELECT a.privilege_type, a.is_grantable, CASE WHEN a.grantee = 0 THEN NULL
                            ELSE pg_get_userbyid(a.grantee)::text END
                     FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = $1",
                    &[&self.name],
                )
                .map_err(|e| pg_error(&doing, e))?;
            for g in grants {
                let (privilege, grantable, grantee): (String, bool, Option<String>) = (g.get(0), g.get(1), g.get(2));
                statements.push(format!(
                    "GRANT {privilege} ON DATABASE {db} TO {}{}",
                    grantee.as_deref().map_or("PUBLIC".to_string(), ident),
                    if grantable { " WITH GRANT OPTION" } else { "" }
                ));
            }
        }
        let settings = admin
            .query(
                "SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole)::text END, c
                 FROM pg_db_role_setting s, unnest(s.setconfig) c
                 WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = $1)",
                &[&self.name],
            )
            .map_err(|e| pg_error(&doing, e))?;
        for s in settings {
            let (role, setting): (Option<String>, String) = (s.get(0), s.get(1));
            let (variable, value) = setting.split_once('=').unwrap_or((&setting, ""));
            let on = match role {
                Some(role) => format!("ROLE {} IN DATABASE {db}", ident(&role)),
                None => format!("DATABASE {db}"),
            };
            statements.push(format!(
                "ALTER {on} SET {} TO {}",
                ident(variable),
                guc_value(variable, value)
            ));
        }
        let comment: Option<String> = admin
            .query_one(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
                &[&self.name],
            )
            .map_err(|e| pg_error(&doing, e))?
            .get(0);
        if let Some(comment) = comment {
            statements.push(format!("COMMENT ON DATABASE {db} IS {}", literal(&comment)));
        }
        if let Some(limit) = self.row["datconnlimit"].as_i64().filter(|l| *l != -1) {
            statements.push(format!("ALTER DATABASE {db} CONNECTION LIMIT {limit}"));
        }
        for statement in statements {
            admin
                .batch_execute(&statement)
                .map_err(|e| pg_error(&format!("copying a setting ({statement})"), e))?;
        }
        Ok(())
    }
}

/// A setting's stored value as SET takes it: a list setting is kept as the server stored it
/// (its elements already quoted as identifiers, as pg_dump does); any other is one literal.
fn guc_value(variable: &str, value: &str) -> String {
    const LISTS: [&str; 6] = [
        "local_preload_libraries",
        "search_path",
        "session_preload_libraries",
        "shared_preload_libraries",
        "temp_tablespaces",
        "unix_socket_directories",
    ];
    if LISTS.contains(&variable.to_ascii_lowercase().as_str()) {
        value.to_string()
    } else {
        literal(value)
    }
}

/// The schema `--table SCHEMA.TABLE` names. pg_restore takes no schema in --table, and
/// does not create the table's schema: bk creates it and adds --schema. One schema at a time,
/// or none (tables of any schema, found by name, whose schema must exist: public).
fn table_schema(tables: &[String]) -> Result<Option<String>> {
    let schemas: std::collections::BTreeSet<Option<&str>> =
        tables.iter().map(|t| t.split_once('.').map(|(s, _)| s)).collect();
    match schemas.len() {
        0 => Ok(None),
        1 => Ok(schemas.into_iter().next().flatten().map(str::to_string)),
        _ => Err(Error::usage(
            "--table: name tables of one schema at a time (SCHEMA.TABLE), or only unqualified names",
        )),
    }
}

fn load(
    artifact: &Artifact,
    mut decoder: Decoder,
    conn: &PgConn,
    target: &str,
    opts: &RestoreOptions,
    schema: Option<&str>,
) -> Result<()> {
    if artifact.format == "pgsql" {
        let mut cmd = conn.command(&find_program(&["psql"], "postgresql-client")?);
        cmd.args(["--quiet", "--set", "ON_ERROR_STOP=1", "--dbname", target]);
        stream_into(cmd, &mut decoder, classify)?;
        return decoder.finish(artifact).map(drop);
    }
    let mut cmd = conn.command(&find_program(&["pg_restore"], "postgresql-client")?);
    cmd.arg("--exit-on-error").arg(format!("--dbname={target}"));
    if opts.no_owner {
        cmd.args(["--no-owner", "--no-privileges"]);
    }
    if let Some(schema) = schema {
        conn.connect(target)?
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", ident(schema)))
            .map_err(|e| pg_error(&format!("creating schema {schema}"), e))?;
        cmd.arg(format!("--schema={schema}"));
    }
    for t in &opts.tables {
        let name = t.split_once('.').map_or(t.as_str(), |(_, name)| name);
        cmd.arg(format!("--table={name}"));
    }
    match opts.jobs {
        Some(jobs) if jobs > 1 => {
            // Parallel restore needs a seekable file: the one temporary copy bk makes.
            let temp = TempFile::create(artifact)?;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .open(&temp.0)
                .map_err(|e| Error::create(&temp.0, e))?;
            io::copy(&mut decoder, &mut file).map_err(|e| from_io(format!("decoding {}", artifact.file), e))?;
            decoder.finish(artifact)?;
            cmd.arg(format!("--jobs={jobs}")).arg(&temp.0);
            crate::process::output_of(cmd, classify).map(drop)
        }
        _ => {
            // pg_restore --table stops reading after its tables: finish() reads the rest.
            stream_into_may_stop(cmd, &mut decoder, classify)?;
            decoder.finish(artifact).map(drop)
        }
    }
}

/// A private temporary file, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn create(artifact: &Artifact) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            ".bk-restore-{}-{:08x}.pgdump",
            artifact.id,
            rand::random::<u32>()
        ));
        bk_core::private::create_private_file(&path)?;
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_of_one_schema_at_a_time() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(table_schema(&[]).unwrap(), None);
        assert_eq!(table_schema(&names(&["a", "b"])).unwrap(), None);
        assert_eq!(
            table_schema(&names(&["app.a", "app.b"])).unwrap().as_deref(),
            Some("app")
        );
        assert!(table_schema(&names(&["app.a", "b"])).is_err());
        assert!(table_schema(&names(&["app.a", "x.b"])).is_err());
    }
}
