//! The `isthmus` command line: `check-config` reports problems with file:line:column
//! and exits non-zero; every shipped example passes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn isthmus() -> Command {
    Command::new(env!("CARGO_BIN_EXE_isthmus"))
}

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("config/examples exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

#[test]
fn check_config_accepts_every_example() {
    let files = examples();
    assert!(!files.is_empty(), "config/examples holds at least one example");
    for file in files {
        let out = isthmus()
            .arg("check-config")
            .arg(&file)
            .env("ISTHMUS_COMPONENT_SECRET", "example-secret")
            .output()
            .expect("isthmus runs");
        assert!(
            out.status.success(),
            "{} should be valid, got: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn check_config_reports_wrong_type_with_location() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "xmpp:\n  mode: component\n  component:\n    host: 127.0.0.1\n    port: not-a-port\n    secret: s\n",
    )
    .expect("write config");
    let out = isthmus().arg("check-config").arg(&file).output().expect("isthmus runs");
    assert!(!out.status.success(), "a wrong type must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let location = format!("{}:5:11", file.display());
    assert!(stderr.contains(&location), "expected `{location}` in: {stderr}");
    assert!(stderr.contains("u16"), "the message names the expected type: {stderr}");
}

#[test]
fn check_config_refuses_a_component_nobody_may_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("closed.yaml");
    std::fs::write(&file, "xmpp:\n  component:\n    secret: s\nirc:\n  - domain: irc.localhost\n")
        .expect("write config");
    let out = isthmus().arg("check-config").arg(&file).output().expect("isthmus runs");
    assert!(!out.status.success(), "an empty allow list must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let location = format!("{}:5:5: IRC network `irc.localhost`: nobody may use it", file.display());
    assert!(stderr.contains(&location), "expected `{location}` in: {stderr}");
    assert!(stderr.contains(r#"access: { allow: ["*"] }"#), "says how to open it: {stderr}");
}

#[test]
fn check_config_reports_missing_file() {
    let out = isthmus().arg("check-config").arg("/nonexistent/isthmus.yaml").output().expect("isthmus runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/isthmus.yaml"));
}

#[test]
fn migrate_creates_the_database_and_is_repeatable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("isthmus.yaml");
    std::fs::write(&file, "xmpp:\n  component:\n    secret: s\nstore:\n  url: sqlite://state/isthmus.db\n")
        .expect("write config");
    std::fs::create_dir(dir.path().join("state")).expect("state dir");
    for _ in 0..2 {
        let out = isthmus().arg("migrate").arg("-c").arg(&file).output().expect("isthmus runs");
        assert!(out.status.success(), "migrate failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // the relative SQLite path is resolved next to the configuration file
    let db = dir.path().join("state/isthmus.db");
    let bytes = std::fs::read(&db).expect("database file exists");
    assert!(bytes.starts_with(b"SQLite format 3"), "{} is a SQLite database", db.display());
}

#[test]
fn run_reports_an_unreachable_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("isthmus.yaml");
    std::fs::write(
        &file,
        "xmpp:\n  component:\n    secret: s\nstore:\n  url: sqlite:///nonexistent-dir/x/isthmus.db\n",
    )
    .expect("write config");
    let out = isthmus().arg("migrate").arg("-c").arg(&file).output().expect("isthmus runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot open the database"), "clear message: {stderr}");
}
