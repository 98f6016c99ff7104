//! The `isthmus` binary under test.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use tokio::process::Child;

use crate::process::{command, tail, terminate};

/// The built binary: `$ISTHMUS_BIN`, else next to the test executable's directory.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ISTHMUS_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin> → target/<profile>/isthmus
    let dir = exe.parent().expect("the executable has a directory");
    let candidates = [dir.join("isthmus"), dir.parent().map(|d| d.join("isthmus")).unwrap_or_default()];
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!("{} not found: build it first with `cargo build -p isthmus`", candidates[0].display()),
    }
}

/// A running gateway with its own configuration file and log.
pub struct Isthmus {
    dir: TempDir,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Isthmus {
    /// Write `config_yaml` and start `isthmus run -c` on it. `{dir}` in the YAML is
    /// replaced by the gateway's own temporary directory.
    pub async fn start(config_yaml: &str, env: &[(&str, &str)]) -> Result<Isthmus> {
        let dir = tempfile::Builder::new().prefix("isthmus-gw-").tempdir()?;
        let yaml = config_yaml.replace("{dir}", &dir.path().display().to_string());
        std::fs::write(dir.path().join("isthmus.yaml"), yaml)?;
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut gw = Isthmus { dir, env, child: None };
        gw.launch()?;
        Ok(gw)
    }

    fn launch(&mut self) -> Result<()> {
        let mut cmd = command(binary(), &self.log_path())?;
        cmd.arg("run").arg("-c").arg(self.dir.path().join("isthmus.yaml"));
        cmd.env("RUST_LOG", "info,isthmus=debug,isthmus_irc=debug,isthmus_matrix=debug,isthmus_core=debug");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().context("start isthmus")?);
        Ok(())
    }

    /// The gateway's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("isthmus.log")
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Wait until the log contains `needle` at least `count` times.
    pub async fn wait_log(&self, needle: &str, count: usize, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= count {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "isthmus did not log `{needle}` ×{count} within {timeout:?}; log:\n{}",
                    tail(&self.log_path(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// SIGTERM and wait.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(10)).await;
        }
    }

    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.launch()
    }
}
