//! The documentation: every relative link in the README, CONTRIBUTING.md, ansible/README.md
//! and docs/*.md names a file or directory of the repository and, with a `#fragment`, a
//! heading of that Markdown file (as GitHub makes anchors of headings); the README stays
//! short enough for a newcomer's ten minutes, depth going to docs/; and CONTRIBUTING.md's
//! layout table matches the tree.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The Markdown files read outside docs/ (every docs/*.md is read as well).
const DOCUMENTS: [&str; 3] = ["README.md", "CONTRIBUTING.md", "ansible/README.md"];

/// The README's length in lines: about 300, the issue's "ten minutes".
const README_MAX_LINES: usize = 320;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository")
}

/// Every Markdown document checked: DOCUMENTS and docs/*.md, relative to the repository.
fn documents() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = DOCUMENTS.iter().map(PathBuf::from).collect();
    let mut in_docs: Vec<PathBuf> = fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| Path::new("docs").join(p.file_name().expect("a file name")))
        .collect();
    in_docs.sort();
    docs.extend(in_docs);
    docs
}

/// The lines of a Markdown text outside fenced code blocks (``` or ````, closed by a fence
/// of at least the same length), with their 1-based numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fence: Option<usize> = None;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let ticks = line.trim_start().chars().take_while(|&c| c == '`').count();
        match fence {
            Some(open) if ticks >= open => fence = None,
            Some(_) => {}
            None if ticks >= 3 => fence = Some(ticks),
            None => lines.push((i + 1, line)),
        }
    }
    lines
}

/// The anchor GitHub gives a heading: lower case, punctuation dropped (but `-` and `_`),
/// each space a `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown text's headings; a repeated heading gets `-1`, `-2`, ...
fn anchors(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let level = line.chars().take_while(|&c| c == '#').count();
        let Some(title) = line[level..].strip_prefix(' ') else {
            continue;
        };
        if !(1..=6).contains(&level) {
            continue;
        }
        let base = slug(title);
        let mut anchor = base.clone();
        let mut n = 0;
        while found.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        found.insert(anchor);
    }
    found
}

/// The targets of a Markdown text's inline links `[text](target)` outside code blocks and
/// code spans, with their line numbers; absolute URLs (`scheme:`) are left out.
fn relative_links(text: &str) -> Vec<(usize, String)> {
    let mut links = Vec::new();
    for (number, line) in prose_lines(text) {
        // Code spans hold commands, not links: drop them first.
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join("");
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = &rest[..end];
            rest = &rest[end..];
            let scheme = target.split_once(':').is_some_and(|(s, _)| {
                !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
            });
            if !scheme {
                links.push((number, target.to_string()));
            }
        }
    }
    links
}

/// What is wrong with one link of `doc` (a path relative to the repository), if anything.
fn link_problem(repo: &Path, doc: &Path, target: &str) -> Option<String> {
    let (path, fragment) = match target.split_once('#') {
        Some((path, fragment)) => (path, Some(fragment)),
        None => (target, None),
    };
    let file = if path.is_empty() {
        repo.join(doc)
    } else {
        repo.join(doc.parent().expect("a document's directory")).join(path)
    };
    if !file.exists() {
        return Some(format!("{} does not exist", file.display()));
    }
    let fragment = fragment?;
    if file.extension().is_none_or(|e| e != "md") {
        return Some(format!("#{fragment} into {}, which is not Markdown", file.display()));
    }
    let text = fs::read_to_string(&file).expect("a Markdown file");
    (!anchors(&text).contains(fragment)).then(|| format!("{} has no heading #{fragment}", file.display()))
}

#[test]
fn every_relative_link_names_an_existing_file_and_heading() {
    let repo = repo();
    let mut problems = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = fs::read_to_string(repo.join(&doc)).unwrap_or_else(|e| panic!("{}: {e}", doc.display()));
        for (line, target) in relative_links(&text) {
            checked += 1;
            if let Some(problem) = link_problem(&repo, &doc, &target) {
                problems.push(format!("{}:{line}: ({target}): {problem}", doc.display()));
            }
        }
    }
    assert!(checked > 50, "only {checked} links found: is the link reader broken?");
    assert!(problems.is_empty(), "broken links:\n{}", problems.join("\n"));
}

#[test]
fn the_readme_stays_a_ten_minute_read() {
    let readme = fs::read_to_string(repo().join("README.md")).expect("README.md");
    let lines = readme.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines (at most {README_MAX_LINES}): move the depth to docs/ or CONTRIBUTING.md and link it"
    );
}

#[test]
fn headings_become_githubs_anchors() {
    let cases = [
        ("## Install", "install"),
        (
            "## Restoring with standard tools alone",
            "restoring-with-standard-tools-alone",
        ),
        (
            "## bk-dump files: directories and files",
            "bk-dump-files-directories-and-files",
        ),
        (
            "### The cron.d files and the Ansible role",
            "the-crond-files-and-the-ansible-role",
        ),
        (
            "## S3 (and every S3-compatible server)",
            "s3-and-every-s3-compatible-server",
        ),
        ("## bk-ship: pull (the backup server)", "bk-ship-pull-the-backup-server"),
        ("# bk — small Unix backup tools", "bk--small-unix-backup-tools"),
        ("## `--replace` and_more", "--replace-and_more"),
    ];
    for (heading, anchor) in cases {
        assert_eq!(anchors(heading), BTreeSet::from([anchor.to_string()]), "{heading}");
    }
    let repeated = anchors("## Check\ntext\n## Check\n");
    assert_eq!(repeated, BTreeSet::from(["check".to_string(), "check-1".to_string()]));
    let fenced = anchors("```sh\n# a shell comment\n```\n````markdown\n## Job\n```sh\nx\n```\n````\n## Real\n");
    assert_eq!(fenced, BTreeSet::from(["real".to_string()]));
}

#[test]
fn links_are_read_outside_code_only() {
    let cases: [(&str, &[&str]); 6] = [
        ("see [a](docs/a.md) and [b](#b)", &["docs/a.md", "#b"]),
        ("[site](https://example.net) [mail](mailto:x@y)", &[]),
        ("`[not](a-link.md)` but [this](one.md)", &["one.md"]),
        ("```\n[in](code.md)\n```\n[out](prose.md)", &["prose.md"]),
        (
            "[dir](cron.d/) [file](cron.d/bk-files-etc)",
            &["cron.d/", "cron.d/bk-files-etc"],
        ),
        ("no links here (really)", &[]),
    ];
    for (text, expected) in cases {
        let found: Vec<String> = relative_links(text).into_iter().map(|(_, t)| t).collect();
        assert_eq!(found, expected, "{text}");
    }
}

/// The paths CONTRIBUTING.md's layout table names in backquotes: every one exists, and every
/// crate under tools/ and every file of a crate's `src/` top level is named (by itself, or
/// in its crate's row).
#[test]
fn the_layout_table_matches_the_tree() {
    let repo = repo();
    let text = fs::read_to_string(repo.join("CONTRIBUTING.md")).expect("CONTRIBUTING.md");
    let section = text
        .split("\n## ")
        .find(|s| s.starts_with("Repository layout\n"))
        .expect("a section `## Repository layout` in CONTRIBUTING.md");
    let rows: Vec<&str> = section.lines().filter(|l| l.starts_with("| `")).collect();
    let mut problems = Vec::new();
    let mut rows_of: std::collections::BTreeMap<String, &str> = Default::default();
    for row in &rows {
        let path = row.split('`').nth(1).expect("a path in backquotes");
        if !repo.join(path).exists() {
            problems.push(format!("`{path}` is in the layout table but not in the tree"));
        }
        rows_of.insert(path.trim_end_matches('/').to_string(), row);
    }
    let mut crates: Vec<PathBuf> = fs::read_dir(repo.join("tools"))
        .expect("tools/")
        .map(|e| e.expect("a tools/ entry").path())
        .collect();
    crates.sort();
    for krate in crates {
        let name = format!("tools/{}", krate.file_name().unwrap().to_string_lossy());
        let Some(row) = rows_of.get(&name) else {
            problems.push(format!("`{name}/` has no row in the layout table"));
            continue;
        };
        let mut modules: Vec<String> = fs::read_dir(krate.join("src"))
            .expect("a crate's src/")
            .map(|e| e.expect("a src/ entry").file_name().to_string_lossy().into_owned())
            .filter(|f| f != "lib.rs" && f != "main.rs")
            .collect();
        modules.sort();
        for module in modules {
            let stem = module.trim_end_matches(".rs");
            if !row.contains(&format!("`{module}`")) && !row.contains(&format!("`{stem}/`")) {
                problems.push(format!(
                    "{name}/src/{module} is not named in its row of the layout table"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "CONTRIBUTING.md, Repository layout:\n{}",
        problems.join("\n")
    );
}
