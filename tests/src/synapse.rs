//! A real Synapse Matrix homeserver started on loopback for one test.
//!
//! [`Synapse`] renders a `homeserver.yaml` into a temporary directory (server name
//! `localhost`, SQLite, plain HTTP on 127.0.0.1, no federation, rate limits off,
//! presence off), optionally with an application-service registration, starts the
//! homeserver from the venv `tests/install-deps.sh` creates, and registers users
//! through the shared-secret admin API.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha1::Sha1;
use tempfile::TempDir;
use tokio::process::Child;

use crate::matrix::MatrixClient;
use crate::process::{command, free_port, tail, terminate};

/// The shared secret of the admin registration API (loopback-only test servers).
const SHARED_SECRET: &str = "isthmus-test-registration-secret";

/// What a test's Synapse serves.
#[derive(Debug, Clone, Default)]
pub struct SynapseOptions {
    /// An application service (the gateway in portal mode), loaded at start.
    pub app_service: Option<AppServiceRegistration>,
}

/// An application-service registration, written to a file listed in
/// `app_service_config_files`. Namespaces are exclusive; the service is not rate limited.
#[derive(Debug, Clone)]
pub struct AppServiceRegistration {
    pub id: String,
    /// The token the service authenticates to the homeserver with.
    pub as_token: String,
    /// The token the homeserver authenticates to the service with.
    pub hs_token: String,
    /// Where Synapse pushes transactions (`PUT {url}/_matrix/app/v1/transactions/{txnId}`).
    pub url: String,
    /// The service's own user (`@{sender_localpart}:localhost`).
    pub sender_localpart: String,
    /// Regex of the user ids the service owns, e.g. `@_xmpp_.*:localhost`.
    pub user_regex: String,
    /// Regex of the room aliases the service owns, e.g. `#_xmpp_.*:localhost`.
    pub alias_regex: Option<String>,
}

/// A user registered on a [`Synapse`], logged in with one device.
#[derive(Debug, Clone)]
pub struct MatrixUser {
    /// `@localpart:localhost`.
    pub user_id: String,
    pub access_token: String,
    pub device_id: String,
    pub password: String,
}

/// A Synapse on its own port; `localhost` is its server name.
pub struct Synapse {
    dir: TempDir,
    port: u16,
    python: PathBuf,
    http: reqwest::Client,
    child: Option<Child>,
}

/// The venv's Python that runs Synapse.
fn synapse_python() -> Result<PathBuf> {
    let p = crate::cache_dir().join("venv-synapse/bin/python");
    if !p.is_file() {
        bail!("{} not found: run ./tests/install-deps.sh (it creates the Synapse venv)", p.display());
    }
    Ok(p)
}

/// A JSON string literal, which YAML reads as the same string.
fn yaml_str(s: &str) -> String {
    Value::from(s).to_string()
}

/// An ed25519 signing key in Synapse's file format (`ed25519 <version> <unpadded base64 seed>`),
/// written directly: `--generate-keys` would start a Python just for this (two seconds).
fn signing_key() -> Result<String> {
    let mut seed = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed)?;
    Ok(format!("ed25519 a_test {}\n", base64::engine::general_purpose::STANDARD_NO_PAD.encode(seed)))
}

fn app_service_yaml(a: &AppServiceRegistration) -> String {
    let aliases = match &a.alias_regex {
        Some(r) => format!("\n    - exclusive: true\n      regex: {}", yaml_str(r)),
        None => " []".into(),
    };
    format!(
        "id: {id}\nurl: {url}\nas_token: {as_token}\nhs_token: {hs_token}\nsender_localpart: {sender}\n\
         rate_limited: false\nnamespaces:\n  users:\n    - exclusive: true\n      regex: {users}\n  aliases:{aliases}\n  rooms: []\n",
        id = yaml_str(&a.id),
        url = yaml_str(&a.url),
        as_token = yaml_str(&a.as_token),
        hs_token = yaml_str(&a.hs_token),
        sender = yaml_str(&a.sender_localpart),
        users = yaml_str(&a.user_regex),
    )
}

impl Synapse {
    pub async fn start(opts: SynapseOptions) -> Result<Synapse> {
        let python = synapse_python()?;
        let dir = tempfile::Builder::new().prefix("isthmus-synapse-").tempdir()?;
        let port = free_port();
        let d = dir.path();
        std::fs::create_dir_all(d.join("media_store"))?;
        std::fs::write(d.join("localhost.signing.key"), signing_key()?)?;
        let mut app_services = String::from("app_service_config_files: []\n");
        if let Some(a) = &opts.app_service {
            let file = d.join("appservice.yaml");
            std::fs::write(&file, app_service_yaml(a))?;
            app_services = format!("app_service_config_files:\n  - {}\n", yaml_str(&file.display().to_string()));
        }
        // Everything on stderr, which `command` appends to synapse.log.
        std::fs::write(
            d.join("log.yaml"),
            "version: 1\nformatters:\n  precise:\n    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'\n\
             handlers:\n  console:\n    class: logging.StreamHandler\n    formatter: precise\n\
             loggers:\n  synapse.storage.SQL:\n    level: WARNING\n\
             root:\n  level: INFO\n  handlers: [console]\ndisable_existing_loggers: false\n",
        )?;
        let unlimited = "{per_second: 100000, burst_count: 100000}";
        let cfg = format!(
            r#"# Synapse for one Isthmus test: SQLite, plain HTTP on loopback, no federation, no rate limits.
server_name: "localhost"
public_baseurl: "http://127.0.0.1:{port}/"
pid_file: {d}/homeserver.pid
log_config: {d}/log.yaml
listeners:
  - port: {port}
    type: http
    tls: false
    x_forwarded: false
    bind_addresses: ['127.0.0.1']
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: {d}/homeserver.db
media_store_path: {d}/media_store
signing_key_path: {d}/localhost.signing.key
report_stats: false
registration_shared_secret: {secret}
macaroon_secret_key: "isthmus-test-macaroon-secret"
form_secret: "isthmus-test-form-secret"
enable_registration: false
trusted_key_servers: []
suppress_key_server_warning: true
federation_domain_whitelist: []
url_preview_enabled: false
presence:
  enabled: false
rc_message: {u}
rc_registration: {u}
rc_registration_token_validity: {u}
rc_login:
  address: {u}
  account: {u}
  failed_attempts: {u}
rc_admin_redaction: {u}
rc_joins:
  local: {u}
  remote: {u}
rc_joins_per_room: {u}
rc_invites:
  per_room: {u}
  per_user: {u}
  per_issuer: {u}
rc_third_party_invite: {u}
rc_3pid_validation: {u}
rc_media_create: {u}
rc_presence:
  per_user: {u}
rc_delayed_event_mgmt: {u}
rc_room_creation: {u}
rc_reports: {u}
rc_user_directory: {u}
rc_profile: {u}
rc_key_requests: {u}
{app_services}"#,
            d = d.display(),
            secret = yaml_str(SHARED_SECRET),
            u = unlimited,
        );
        std::fs::write(d.join("homeserver.yaml"), cfg)?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .context("build the HTTP client")?;
        let mut s = Synapse { dir, port, python, http, child: None };
        s.launch().await?;
        Ok(s)
    }

    async fn launch(&mut self) -> Result<()> {
        let log = self.log_path();
        let mut cmd = command(&self.python, &log)?;
        cmd.args(["-m", "synapse.app.homeserver", "-c"]).arg(self.dir.path().join("homeserver.yaml"));
        self.child = Some(cmd.spawn().context("start synapse")?);
        // Synapse takes a few seconds to import and migrate its database.
        let timeout = Duration::from_secs(60);
        let deadline = tokio::time::Instant::now() + timeout;
        let health = format!("{}/health", self.base_url());
        loop {
            if let Ok(r) = self.http.get(&health).timeout(Duration::from_secs(5)).send().await
                && r.status() == reqwest::StatusCode::OK
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("Synapse exited during start-up ({status}); log:\n{}", tail(&log, 40));
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("Synapse did not answer {health} within {timeout:?}; log:\n{}", tail(&log, 40));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `http://127.0.0.1:{port}`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The Matrix server name (the part after `:` in user ids).
    pub fn server_name(&self) -> &'static str {
        "localhost"
    }
    /// The running server's process id (for CPU and memory figures).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }
    /// Synapse's SQLite database (its users, devices and access tokens).
    pub fn database_path(&self) -> PathBuf {
        self.dir.path().join("homeserver.db")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("synapse.log")
    }

    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(10)).await;
        }
    }

    /// Stop and start again on the same port with the same data.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.launch().await
    }

    /// Register `user` (a localpart) through the shared-secret admin API, and log it in.
    pub async fn register(&self, user: &str, password: &str, admin: bool) -> Result<MatrixUser> {
        let url = format!("{}/_synapse/admin/v1/register", self.base_url());
        let nonce = self.admin_json(self.http.get(&url), "GET register nonce").await?;
        let nonce = nonce["nonce"].as_str().context("no nonce in the register answer")?.to_owned();
        let mut mac = Hmac::<Sha1>::new_from_slice(SHARED_SECRET.as_bytes()).context("HMAC key")?;
        let role = if admin { "admin" } else { "notadmin" };
        mac.update(format!("{nonce}\0{user}\0{password}\0{role}").as_bytes());
        let mac: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let body = json!({"nonce": nonce, "username": user, "password": password, "admin": admin, "mac": mac});
        let r = self.admin_json(self.http.post(&url).json(&body), &format!("register {user}")).await?;
        let field = |k: &str| -> Result<String> {
            Ok(r[k].as_str().with_context(|| format!("no {k} in the register answer: {r}"))?.to_owned())
        };
        Ok(MatrixUser {
            user_id: field("user_id")?,
            access_token: field("access_token")?,
            device_id: field("device_id")?,
            password: password.to_owned(),
        })
    }

    /// A client acting as `user` with its access token.
    pub fn client(&self, user: &MatrixUser) -> Result<MatrixClient> {
        MatrixClient::from_token(&self.base_url(), &user.user_id, &user.access_token)
    }

    async fn admin_json(&self, req: reqwest::RequestBuilder, what: &str) -> Result<Value> {
        let resp = req.send().await.with_context(|| format!("{what}: request to Synapse"))?;
        let status = resp.status();
        let bytes = resp.bytes().await.with_context(|| format!("{what}: read the answer"))?;
        if !status.is_success() {
            bail!("{what}: HTTP {status}: {}", String::from_utf8_lossy(&bytes));
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{what}: answer is not JSON: {}", String::from_utf8_lossy(&bytes)))
    }
}
