//! bk's remote stores behind bk-core's `Store` trait: `s3://bucket/prefix`,
//! `ssh://user@host[:port]/abs/path`, `ftp://` and `ftps://[user@]host[:port]/path`, and
//! `rclone:remote:path` (SPEC §3). Local paths and `file://` stay bk-core's `LocalStore`. The heavy
//! S3 and async dependencies live here only.
//!
//! Every tool that takes stores opens them with [`open`] or [`open_location`], passing the
//! [`StoreConfig`] of its options.

pub mod ftp;
mod piped;
pub mod rclone;
pub mod s3;
pub mod ssh;

use bk_core::record::Artifact;
use bk_core::store::Store;
pub use bk_core::store::StoreConfig;
use bk_core::Result;

/// Opens a store from its URL: a path, `file://`, `s3://`, `ssh://`, `ftp://`, `ftps://` or
/// `rclone:`, with the run's `config`.
pub fn open(url: &str, config: &StoreConfig) -> Result<Box<dyn Store>> {
    if url.starts_with("s3://") {
        return Ok(Box::new(s3::S3Store::open(url, config)?));
    }
    if url.starts_with("ssh://") {
        return Ok(Box::new(ssh::SshStore::open(url)?));
    }
    if url.starts_with("ftp://") || url.starts_with("ftps://") {
        return Ok(Box::new(ftp::FtpStore::open(url)?));
    }
    if url.starts_with("rclone:") {
        return Ok(Box::new(rclone::RcloneStore::open(url)?));
    }
    bk_core::store::open(url)
}

/// Opens the store an artifact record's `location` points into.
pub fn open_location(artifact: &Artifact, config: &StoreConfig) -> Result<Box<dyn Store>> {
    open(bk_core::store::location_root(artifact)?, config)
}

/// Refuses (64) a URL that carries a secret in its userinfo, with a message that does not
/// repeat it: a password (`user:password@`) after any `://` in it (an rclone connection
/// string may hold a URL), or any userinfo at all unless `user_allowed` (an S3 endpoint
/// names no user). A URL shows in `ps`, logs, records and the argv of the programs a store
/// runs; `advice` says where the secret belongs instead. `what` names the URL ("store").
pub(crate) fn refuse_secret_in_url(what: &str, url: &str, user_allowed: bool, advice: &str) -> Result<()> {
    let mut shown = String::with_capacity(url.len());
    let mut rest = url;
    let mut secret = false;
    while let Some(at) = rest.find("://") {
        let start = at + 3;
        // RFC 3986: the authority ends at the path, query or fragment; a connection
        // string's quote or comma ends it too.
        let end = rest[start..]
            .find(|c: char| "/?#\"',".contains(c) || c.is_whitespace())
            .map_or(rest.len(), |i| start + i);
        shown.push_str(&rest[..start]);
        match rest[start..end].rsplit_once('@') {
            Some((userinfo, host)) if userinfo.contains(':') || !user_allowed => {
                secret = true;
                match userinfo.split_once(':') {
                    Some((user, _)) if user_allowed => shown.push_str(&format!("{user}@{host}")),
                    _ => shown.push_str(host),
                }
            }
            _ => shown.push_str(&rest[start..end]),
        }
        rest = &rest[end..];
    }
    if !secret {
        return Ok(());
    }
    shown.push_str(rest);
    let carried = if user_allowed { "a password" } else { "credentials" };
    Err(bk_core::Error::usage(format!(
        "{what} {shown}: {carried} in the URL would show in ps, logs and records, and is refused; {advice}"
    )))
}

pub(crate) use bk_core::store::MAX_MANIFEST;

/// The regular files of each name's directory, as a remote store lists them: name -> file
/// name -> its size, where the store tells it.
pub(crate) type Files = std::collections::BTreeMap<String, std::collections::BTreeMap<String, Option<u64>>>;

/// The temporary files of unfinished runs among the listed files of `name`.
pub(crate) fn temp_files<'a>(files: &'a Files, name: &str) -> impl Iterator<Item = &'a String> {
    files
        .get(name)
        .into_iter()
        .flat_map(|f| f.keys())
        .filter(|f| bk_core::store::is_temp(f))
}

/// What `remove_leftovers` does with the old temporary files it found: removes each
/// (`remove(file, doing)`) unless `dry_run`, and returns where they were, sorted.
pub(crate) fn remove_files<'a>(
    found: impl IntoIterator<Item = &'a String>,
    dry_run: bool,
    location: impl Fn(&str) -> String,
    mut remove: impl FnMut(&str, &str) -> Result<()>,
) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for f in found {
        let location = location(f);
        if !dry_run {
            remove(f, &format!("removing {location}"))?;
        }
        removed.push(location);
    }
    removed.sort();
    Ok(removed)
}

/// Builds a listing from the files of each name's directory and a way to read a manifest
/// (see [`bk_core::store::list_name_dir`]).
pub(crate) fn build_listing(
    files: Files,
    mut manifest: impl FnMut(&str, &str) -> Result<String>,
    location: impl Fn(&str, &str) -> String,
) -> bk_core::store::Listing {
    use bk_core::store::{list_name_dir, Entry};
    let mut listing = bk_core::store::Listing::default();
    for (name, names) in files {
        let entries = names.into_iter().map(|(f, size)| (f, Entry::File(size))).collect();
        list_name_dir(
            &name,
            &entries,
            |f| manifest(&name, f),
            |f| location(&name, f),
            &mut listing,
        );
    }
    listing.sort();
    listing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_urls_are_refused_without_showing_them() {
        // (URL, a user alone allowed, the URL as the message shows it)
        for (url, user_allowed, shown) in [
            ("ssh://bk:hunter2@host:22/srv/bk", true, "ssh://bk@host:22/srv/bk"),
            ("ftp://bk:@host/x", true, "ftp://bk@host/x"),
            (
                "rclone::http,url='http://u:hunter2@h/':bk",
                true,
                "rclone::http,url='http://u@h/':bk",
            ),
            ("http://AKIAKEY:hunter2@127.0.0.1:9000", false, "http://127.0.0.1:9000"),
            ("https://AKIAKEY@s3.example/", false, "https://s3.example/"),
        ] {
            let e = refuse_secret_in_url("store", url, user_allowed, "put it elsewhere").unwrap_err();
            assert_eq!(e.exit_code(), 64, "{url}");
            assert!(
                e.message.starts_with(&format!("store {shown}: ")) && e.message.ends_with("put it elsewhere"),
                "{}",
                e.message
            );
            assert!(
                !e.message.contains("hunter2") && !e.message.contains("AKIAKEY"),
                "{}",
                e.message
            );
        }
        for (url, user_allowed) in [
            ("ssh://bk@host/srv/a@b", true),
            ("ftps://[::1]:990/x", true),
            ("http://127.0.0.1:9000", false),
            ("s3://bucket/pre@fix", false),
            ("/var/backups/bk", false),
        ] {
            assert!(refuse_secret_in_url("store", url, user_allowed, "").is_ok(), "{url}");
        }
    }

    /// A manifest of `<name>.<stamp>` whose artifact file `<id>.tar` is 10 bytes.
    fn manifest(name: &str, stamp: &str) -> String {
        format!(
            r#"{{"bk":1,"type":"artifact","id":"{name}.{stamp}","name":"{name}","engine":"files","source":{{"host":"h","paths":["/etc"]}},"started":"2026-11-22T00:15:00Z","finished":"2026-11-22T00:15:07Z","file":"{name}.{stamp}.tar","format":"tar","compression":"none","encryption":null,"bytes":10,"sha256":"ab","content_bytes":10,"counts":{{}},"tool":{{"program":"bk","version":"0.1.0"}},"bk_version":"0.1.0","location":"x"}}"#
        )
    }

    #[test]
    fn listings_see_missing_and_resized_artifacts_and_oversized_manifests() {
        /// The artifact file as listed: None not listed, Some(None) of a size not known.
        type Listed = Option<Option<u64>>;
        // (stamp, the artifact file as listed, why the backup is broken)
        let cases: [(&str, Listed, Option<&str>); 5] = [
            ("20260101T000000Z", Some(Some(10)), None),
            ("20260102T000000Z", Some(None), None),
            (
                "20260103T000000Z",
                Some(Some(9)),
                Some("is 9 bytes, the manifest says 10"),
            ),
            ("20260104T000000Z", None, Some("is missing")),
            ("20260105T000000Z", Some(Some(10)), Some("too large for a manifest")),
        ];
        let mut files = Files::new();
        let db = files.entry("db".to_string()).or_default();
        for (stamp, artifact, _) in &cases {
            let manifest_size = if stamp.ends_with("5T000000Z") {
                MAX_MANIFEST + 1
            } else {
                900
            };
            db.insert(format!("db.{stamp}.json"), Some(manifest_size));
            if let Some(size) = artifact {
                db.insert(format!("db.{stamp}.tar"), *size);
            }
        }
        db.insert(".db.x.tar.tmp.1.2".to_string(), Some(3));
        let listing = build_listing(
            files,
            |n, f| Ok(manifest(n, f.trim_start_matches("db.").trim_end_matches(".json"))),
            |n, f| format!("s://{n}/{f}"),
        );
        let usable: Vec<&str> = listing.artifacts.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(usable, ["db.20260101T000000Z", "db.20260102T000000Z"]);
        assert_eq!(listing.artifacts[0].location, "s://db/db.20260101T000000Z.tar");
        let broken: Vec<(String, String)> = listing
            .broken
            .iter()
            .map(|b| (b.id.clone(), b.reason.clone()))
            .collect();
        let expected: Vec<(String, &str)> = cases
            .iter()
            .filter_map(|(stamp, _, why)| Some((format!("db.{stamp}"), (*why)?)))
            .collect();
        assert_eq!(broken.len(), expected.len(), "{broken:?}");
        for ((id, reason), (want_id, why)) in broken.iter().zip(&expected) {
            assert!(id == want_id && reason.contains(why), "{id}: {reason}");
        }
        // The resized artifact is claimed by its manifest; the oversized manifest claims none.
        assert_eq!(
            listing.leftovers,
            [
                "s://db/.db.x.tar.tmp.1.2: temporary file of an unfinished run",
                "s://db/db.20260105T000000Z.tar: no manifest"
            ]
        );
    }
}
