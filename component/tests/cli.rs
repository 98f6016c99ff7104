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
fn check_config_reports_missing_file() {
    let out = isthmus().arg("check-config").arg("/nonexistent/isthmus.yaml").output().expect("isthmus runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/isthmus.yaml"));
}
