//! Progress goes to stderr only when it is a terminal, and -q silences it.

use bk_tests::{bin, run_cmd, Sandbox};

/// Runs a command line under `script`, which gives it a pseudo-terminal.
fn on_a_tty(sb: &Sandbox, line: &str) -> String {
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", line, "/dev/null"])
        .current_dir(sb.root())
        .env("BK_LOCK_DIR", sb.path("locks"));
    run_cmd(cmd, "").ok().stdout
}

#[test]
fn progress_on_a_terminal_only() {
    let sb = Sandbox::new();
    std::fs::create_dir(sb.path("src")).unwrap();
    std::fs::write(sb.path("src/data"), vec![7u8; 3 << 20]).unwrap();
    let dump = bin("bk-dump").display().to_string();

    let shown = on_a_tty(&sb, &format!("{dump} files src --name job --to store"));
    assert!(shown.contains("\r\x1b[Kjob: 3.0 MiB at "), "{shown:?}");

    let quiet = on_a_tty(&sb, &format!("{dump} files src --name job --to store -q"));
    assert!(!quiet.contains("\x1b[K"), "{quiet:?}");

    // Not a terminal: stderr stays clean.
    let piped = sb
        .run("bk-dump", &["files", "src", "--name", "job", "--to", "store"])
        .ok();
    assert_eq!(piped.stderr, "");
}
