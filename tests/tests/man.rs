//! The man pages in man/: the section 1 pages are generated from the tools' clap
//! definitions and must match them (`BK_UPDATE_MAN=1` rewrites them); bk(7) is written by
//! hand and must document every exit code and record type. Every page must render with no
//! groff warning.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use bk_core::error::Kind;
use clap::CommandFactory;

const UPDATE_HINT: &str = "run `BK_UPDATE_MAN=1 cargo test -p bk-tests --test man`";

/// The record types of SPEC §2, all of which bk(7) describes.
const RECORD_TYPES: [&str; 9] = [
    "artifact", "error", "restored", "kept", "pruned", "verified", "notified", "begin", "end",
];

fn man_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../man")
}

/// The preamble roff puts before every rendered piece; kept once, at the top of a page.
const PREAMBLE: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";

/// One rendered section of a page, without the preamble.
fn section(render: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> String {
    let mut buf = Vec::new();
    render(&mut buf).expect("rendering into memory");
    let text = String::from_utf8(buf).expect("roff is UTF-8");
    text.strip_prefix(PREAMBLE).expect("roff's preamble").to_string()
}

/// One page: clap_mangen's sections, with four changes. The title line is written by hand
/// (below); the synopsis is clap's own usage line (clap_mangen lists every option without
/// its value); the `Exit status:` list of after_help gets an EXIT STATUS section instead of
/// EXTRA; and SEE ALSO names bk(7) and the other pages.
fn page(mut cmd: clap::Command, see_also: &[&str]) -> (String, String) {
    cmd.build();
    let usage = cmd.render_usage().to_string();
    let usage = usage
        .trim()
        .strip_prefix("Usage: ")
        .expect("clap's usage line")
        .to_string();
    let cmd = cmd.override_usage(usage);
    let man = clap_mangen::Man::new(cmd.clone());
    let file = man.get_filename();
    let mut page = String::from(PREAMBLE);
    // By hand: clap_mangen writes an empty date as nothing, shifting source and manual left.
    let title = file.strip_suffix(".1").expect("a section 1 page");
    page += &format!(".TH {title} 1 \"\" \"bk {}\" \"bk manual\"\n", bk_core::BK_VERSION);
    page += &section(|w| man.render_name_section(w));
    page += &section(|w| man.render_synopsis_section(w));
    page += &section(|w| man.render_description_section(w));
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        page += &section(|w| man.render_options_section(w));
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        page += &section(|w| man.render_subcommands_section(w));
    }
    if let Some(after) = cmd.get_after_help() {
        let after = after.to_string();
        match after.strip_prefix("Exit status:\n") {
            Some(codes) => {
                // "  NN  meaning" lines become a tagged list; other lines a closing paragraph.
                let mut roff = clap_mangen::roff::Roff::new();
                roff.control("SH", ["EXIT STATUS"]);
                for line in codes.lines().map(str::trim) {
                    match line.split_once("  ") {
                        Some((code, meaning)) if code.parse::<u8>().is_ok() => {
                            roff.control("TP", []).text([clap_mangen::roff::bold(code)]);
                            roff.text([clap_mangen::roff::roman(meaning.trim())]);
                        }
                        _ => {
                            roff.control("PP", []).text([clap_mangen::roff::roman(line)]);
                        }
                    }
                }
                page += &section(|w| roff.to_writer(w));
            }
            None => page += &section(|w| man.render_extra_section(w)),
        }
    }
    page += ".SH \"SEE ALSO\"\n";
    let refs: Vec<String> = see_also
        .iter()
        .map(|p| p.rsplit_once('.').expect("name.section"))
        .map(|(n, s)| format!("\\fB{}\\fR({s})", n.replace('-', "\\-")))
        .collect();
    page += &refs.join(",\n");
    page += "\n";
    (file, page)
}

/// The tools' commands, each with its page's file name (e.g. `bk-dump-files.1`).
fn commands() -> Vec<(String, clap::Command)> {
    // The multicall binary's own page, bk(1), and each tool's.
    let mut commands: Vec<clap::Command> = std::iter::once(bk::command())
        .chain(bk::TOOLS.iter().filter(|t| t.name != "dump").map(|t| (t.command)()))
        .collect();
    // As clap_mangen::generate_to does: no `help` subcommand, and a built command, so that
    // the global options (--to, --name, ...) appear on each engine's page, and clap names
    // each engine's page bk-dump-<engine>.
    let mut dump = bk_dump::Cli::command().disable_help_subcommand(true);
    dump.build();
    for sub in dump.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("bk-dump-{}", sub.get_name());
        assert_eq!(
            sub.get_display_name(),
            Some(name.as_str()),
            "clap names the engine pages"
        );
        commands.push(sub.clone());
    }
    commands.push(dump);
    let mut named: Vec<(String, clap::Command)> = commands
        .into_iter()
        .map(|c| (clap_mangen::Man::new(c.clone()).get_filename(), c))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Every generated page: file name and roff text. Each page's SEE ALSO names bk(7) and
/// every other page.
fn generated_pages() -> Vec<(String, String)> {
    let commands = commands();
    let files: Vec<String> = commands.iter().map(|(f, _)| f.clone()).collect();
    commands
        .into_iter()
        .map(|(me, cmd)| {
            let others: Vec<&str> = std::iter::once("bk.7")
                .chain(files.iter().map(String::as_str).filter(|f| *f != me))
                .collect();
            page(cmd, &others)
        })
        .collect()
}

#[test]
fn man_pages_are_current() {
    let dir = man_dir();
    let update = std::env::var("BK_UPDATE_MAN").is_ok_and(|v| v == "1");
    let pages = generated_pages();
    let names: Vec<&str> = pages.iter().map(|(f, _)| f.as_str()).collect();
    for expected in [
        "bk.1",
        "bk-dump.1",
        "bk-dump-files.1",
        "bk-dump-sqlite.1",
        "bk-ls.1",
        "bk-prune.1",
        "bk-restore.1",
    ] {
        assert!(names.contains(&expected), "{expected} is not generated: {names:?}");
    }
    let mut stale = Vec::new();
    // A page no command generates any more (a tool or engine renamed or removed).
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let file = entry.expect("a man/ entry").file_name().to_string_lossy().into_owned();
        if file.ends_with(".1") && !names.contains(&file.as_str()) {
            if update {
                fs::remove_file(dir.join(&file)).unwrap_or_else(|e| panic!("removing man/{file}: {e}"));
            } else {
                stale.push(format!("man/{file} documents no command: {UPDATE_HINT}"));
            }
        }
    }
    for (file, text) in &pages {
        let path = dir.join(file);
        if update {
            fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        } else if fs::read_to_string(&path).ok().as_ref() != Some(text) {
            stale.push(format!("man/{file} is stale: {UPDATE_HINT}"));
        }
    }
    assert!(stale.is_empty(), "{}", stale.join("\n"));
}

#[test]
fn bk7_documents_every_exit_code_and_record_type() {
    let path = man_dir().join("bk.7");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Table rows and bold words are written in roff (`\fB65\fR`, `.B artifact`); plain words
    // are looked for as whole words.
    let words: Vec<String> = text
        .replace("\\fB", " ")
        .replace("\\fI", " ")
        .replace("\\fR", " ")
        .replace("\\fP", " ")
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    let has = |w: &str| words.iter().any(|x| x == w);
    let missing_codes: Vec<u8> = Kind::ALL
        .iter()
        .map(|k| k.exit_code())
        .filter(|c| !has(&c.to_string()))
        .collect();
    assert!(
        missing_codes.is_empty(),
        "man/bk.7 does not mention exit codes {missing_codes:?}"
    );
    let missing_types: Vec<&str> = RECORD_TYPES.into_iter().filter(|t| !has(t)).collect();
    assert!(
        missing_types.is_empty(),
        "man/bk.7 does not mention record types {missing_types:?}"
    );
    // Each record type has its own entry in the RECORDS section, not just a passing mention.
    for t in RECORD_TYPES {
        assert!(
            text.contains(&format!(".B {t}\n")),
            "man/bk.7 has no entry `.B {t}` for the {t} record"
        );
    }
}

#[test]
fn man_pages_render_without_warnings() {
    let dir = man_dir();
    let mut pages: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a man/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    assert!(pages.len() >= 5, "man/*.1 missing: {UPDATE_HINT}");
    pages.push(dir.join("bk.7"));
    let mut warnings = Vec::new();
    for p in &pages {
        let out = Command::new("groff")
            .args(["-man", "-z", "-ww"])
            .arg(p)
            .output()
            .unwrap_or_else(|e| panic!("running groff (apt-get install groff-base): {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || !stderr.is_empty() {
            warnings.push(format!("{}: {}\n{stderr}", p.display(), out.status));
        }
    }
    assert!(
        warnings.is_empty(),
        "groff -man -z -ww complains:\n{}",
        warnings.join("\n")
    );
}
