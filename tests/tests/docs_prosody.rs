//! The Prosody configuration docs/admin-prosody.md tells admins to add passes
//! `prosodyctl check config` without a warning (options meant to be global must
//! come before any VirtualHost or Component line, or Prosody ignores them).

use anyhow::{Context, Result, ensure};
use isthmus_tests::process::find_program;
use isthmus_tests::repo_root;

/// The first ```lua block of the page.
fn lua_snippet(page: &str) -> Option<&str> {
    let start = page.find("```lua\n")? + "```lua\n".len();
    let len = page[start..].find("```")?;
    Some(&page[start..start + len])
}

#[test]
fn the_prosody_snippet_in_the_admin_guide_passes_prosodys_config_check() -> Result<()> {
    let page = std::fs::read_to_string(repo_root().join("docs/admin-prosody.md"))?;
    let snippet = lua_snippet(&page).context("docs/admin-prosody.md has no ```lua block")?;
    let dir = tempfile::Builder::new().prefix("isthmus-prosody-check-").tempdir()?;
    let d = dir.path();
    std::fs::create_dir_all(d.join("data"))?;
    std::fs::create_dir_all(d.join("certs"))?;
    // What a test server needs (as tests/src/peers.rs writes it: runs as root here,
    // everything under the temp dir), then the snippet as an admin adds it, then the
    // admin's host: the component is a subdomain of it.
    let cfg = format!(
        r#"run_as_root = true
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
certificates = "{d}/certs"
log = {{ {{ levels = {{ min = "info" }}, to = "console" }} }}
modules_enabled = {{ "roster"; "saslauth"; "disco"; "posix"; }}
modules_disabled = {{ "s2s"; }}
c2s_require_encryption = false
{snippet}
VirtualHost "example.org"
"#,
        d = d.display()
    );
    let file = d.join("prosody.cfg.lua");
    std::fs::write(&file, &cfg)?;
    let out = std::process::Command::new(find_program("prosodyctl", &[])?)
        .arg("--config")
        .arg(&file)
        .args(["check", "config"])
        .output()
        .context("run prosodyctl")?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("prosodyctl check config on the admin guide's snippet:\n{report}");
    ensure!(report.contains(&file.display().to_string()), "prosodyctl did not read the test's config:\n{report}");
    ensure!(out.status.success(), "prosodyctl check config failed ({}):\n{report}\nconfig:\n{cfg}", out.status);
    ensure!(
        report.contains("All checks passed") && !report.contains("Problems found"),
        "prosodyctl reports a problem with the snippet:\n{report}\nconfig:\n{cfg}"
    );
    Ok(())
}
