//! The README's install commands, run as written but into the test's sandbox instead of
//! /usr/local, with the debug build instead of the release one: the binary, the links that
//! name the tools, the man pages, and `cargo install`.

use std::fs;
use std::path::Path;
use std::process::Command;

use bk_tests::{assert_tools_linked, bin_dir, run_cmd, sh_blocks, Sandbox};

#[test]
fn readme_install_commands_work() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = fs::read_to_string(repo.join("README.md")).expect("README.md");
    let install = readme
        .split("\n## ")
        .find(|s| s.starts_with("Install\n"))
        .expect("a section `## Install` in the README");
    let blocks: Vec<(usize, String)> = sh_blocks(install)
        .into_iter()
        .filter(|(_, script)| script.contains("--install-links"))
        .collect();
    assert_eq!(
        blocks.len(),
        2,
        "the README's Install section should show two ways to install, each with --install-links"
    );
    let target = bin_dir();
    let sb = Sandbox::new();
    for (i, (_, script)) in blocks.iter().enumerate() {
        let root = sb.path(&format!("root{i}"));
        fs::create_dir_all(root.join("bin")).unwrap();
        let script = script
            .replace("/usr/local", &root.display().to_string())
            .replace("target/release", &target.display().to_string())
            .replace("cargo install --locked", "cargo install --locked --debug --offline");
        // cargo install builds in a target dir of its own: in the suite's, it would replace
        // target/debug/bk (linked with other features) under the tests running meanwhile.
        let mut sh = Command::new("sh");
        sh.arg("-ec")
            .arg(&script)
            .current_dir(&repo)
            .env(
                "CARGO_TARGET_DIR",
                target.parent().expect("target/").join("install-test"),
            )
            .env("CARGO_PROFILE_DEV_DEBUG", "0");
        let run = run_cmd(sh, "");
        assert_eq!(
            run.code, 0,
            "the README's install commands:\n{script}\nstdout: {}\nstderr: {}",
            run.stdout, run.stderr
        );
        assert_tools_linked(&root.join("bin"));
        if script.contains("man1") {
            for page in ["man1/bk-dump.1", "man1/bk-ship.1", "man7/bk.7"] {
                assert!(
                    root.join("share/man").join(page).is_file(),
                    "{page} is not installed:\n{script}"
                );
            }
        }
    }
}
