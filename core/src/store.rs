//! The SQL store: SQLite by default, PostgreSQL by URL, one migration set for both.
//!
//! Built on sqlx's `Any` driver so one code path serves both backends; only
//! portable types cross it (BIGINT, INTEGER, TEXT, bytes) and placeholders are
//! `$1, $2, …`, which both accept. Times are microseconds since the Unix epoch.
//!
//! Tables: puppets, rooms, portals and their members, linked accounts, the
//! many-to-many message id map, the room archive (for XEP-0313), and per-user
//! settings (an IRC user's nick and logins per server).
//!
//! Credentials are sealed on their way in and opened on their way out when the
//! store has a key ([`Store::with_secrets`]; see [`sealed`]).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Executor, Row};
use thiserror::Error;

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
mod sealed;

pub use sealed::SealReport;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "cannot open the database at {url}: {source}; check that the URL is right, the directory exists and is writable, or the server is running"
    )]
    Connect { url: String, source: sqlx::Error },
    #[error("the store URL `{0}` is not supported: use sqlite://PATH, sqlite::memory: or postgres://…")]
    UnsupportedUrl(String),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("a sealed value in {table} cannot be opened: {source}")]
    Sealed { table: &'static str, source: crate::secrets::SecretError },
    #[error("the database holds values (in {table}) sealed with key {sealed_with}, and the key given is {have}")]
    WrongKey { table: &'static str, sealed_with: crate::secrets::KeyId, have: crate::secrets::KeyId },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The store. Cheap to clone (a connection pool).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Seals credentials (see [`sealed`]); `None`: they are stored as given.
    secrets: Option<std::sync::Arc<crate::secrets::SecretBox>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PuppetRecord {
    pub network: String,
    pub remote_id: String,
    pub jid: String,
    pub name: String,
    pub avatar_hash: Option<String>,
    pub updated_us: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRecord {
    pub network: String,
    pub remote_id: String,
    pub jid: String,
    pub name: Option<String>,
    pub portal: Option<String>,
}

/// A linked remote account. The store seals `credentials` when it has a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    pub xmpp_jid: String,
    pub network: String,
    pub remote_user: String,
    pub credentials: Vec<u8>,
    /// JSON.
    pub settings: String,
    pub updated_us: i64,
}

/// An account of the embedded XMPP server. The credentials are SCRAM salted
/// passwords (`iterations$salt$digest`, base64), never the password itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalUserRecord {
    pub jid: String,
    pub scram_sha1: String,
    pub scram_sha256: String,
    pub created_us: i64,
}

/// One roster entry of an embedded-server account (RFC 6121).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterRecord {
    pub owner: String,
    pub contact: String,
    pub name: Option<String>,
    /// `none`, `to`, `from` or `both`.
    pub subscription: String,
    /// `Some("subscribe")` while our subscription request is pending.
    pub ask: Option<String>,
    /// Group names, newline-separated.
    pub groups: String,
}

/// One event copy waiting in the durable outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Order of acceptance (time-ordered, unique).
    pub seq: i64,
    /// The network the copy goes to.
    pub destination: String,
    /// The event, as JSON.
    pub event: String,
    pub created_us: i64,
    /// When the copy was written to a destination that acknowledges later (0: not
    /// yet). A row still written after a crash is in doubt: it may have arrived.
    pub written_us: i64,
}

/// How much waits in the durable outbox for one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxDepth {
    pub destination: String,
    /// Rows waiting.
    pub rows: i64,
    /// When the oldest of them was accepted.
    pub oldest_us: i64,
}

/// Where one XMPP account stands in one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSessionRecord {
    pub room: String,
    pub account: String,
    pub nick: String,
    pub password: Option<String>,
    /// Full JIDs of the account's devices in the room.
    pub resources: Vec<String>,
}

/// One archived room message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveEntry {
    /// Time-ordered id from [`next_archive_id`].
    pub archive_id: i64,
    pub stanza_id: String,
    pub origin_id: Option<String>,
    /// The room's bare JID.
    pub room: String,
    /// Per-user archives: the XMPP account the entry belongs to; `None` = shared.
    pub owner: Option<String>,
    pub sender_nick: String,
    pub sender_jid: Option<String>,
    pub time_us: i64,
    pub body: String,
    /// The serialised stanza, for faithful replay.
    pub payload: Option<String>,
}

/// An archive query (XEP-0313 filters and XEP-0059 paging).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveQuery {
    pub room: String,
    /// Entries owned by this account or shared.
    pub owner: Option<String>,
    pub start_us: Option<i64>,
    pub end_us: Option<i64>,
    pub with_nick: Option<String>,
    pub with_jid: Option<String>,
    /// Entries after this stanza id (forward paging).
    pub after: Option<String>,
    /// Entries before this stanza id (backward paging).
    pub before: Option<String>,
    /// RSM `<before/>` without an id: the newest page.
    pub last_page: bool,
    /// Page size (capped at [`MAX_PAGE`]).
    pub max: u32,
}

/// Largest archive page.
pub const MAX_PAGE: u32 = 250;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchivePage {
    /// Ascending time order.
    pub entries: Vec<ArchiveEntry>,
    /// No more entries in the paging direction.
    pub complete: bool,
    pub first: Option<String>,
    pub last: Option<String>,
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// The ids one message has on one network, in one scope (room or contact), in part order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMapEntry {
    pub key: String,
    pub network: String,
    pub scope: String,
    pub remote_ids: Vec<String>,
}

/// A process-wide, strictly increasing, time-ordered id (microseconds, bumped on ties).
pub fn next_archive_id() -> i64 {
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = now_us();
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// Write message ids inside a transaction (recording the same ids again is not an error).
async fn map_messages_in(tx: &mut sqlx::Transaction<'_, sqlx::Any>, entries: &[IdMapEntry]) -> Result<()> {
    let rows: Vec<(&IdMapEntry, i64, &String)> = entries
        .iter()
        .flat_map(|e| e.remote_ids.iter().enumerate().map(move |(part, id)| (e, part as i64, id)))
        .collect();
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO message_map (msg_key, network, scope, remote_id, part) VALUES {}
             ON CONFLICT (network, scope, remote_id) DO NOTHING",
            values_placeholders(chunk.len(), 5)
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (e, part, id) in chunk {
            query = query.bind(&e.key).bind(&e.network).bind(&e.scope).bind(*id).bind(*part);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Rows written by one multi-row INSERT: each statement is one round trip to the
/// database (for SQLite, to its worker thread), so a batch goes in a few of them.
/// Not more: SQLite looks each numbered parameter up by a linear scan, so binding
/// costs grow with the square of a statement's parameter count.
const ROWS_PER_INSERT: usize = 32;

/// `($1, $2), ($3, $4)` for `rows` rows of `columns` values: only numbers are
/// interpolated into the statement.
fn values_placeholders(rows: usize, columns: usize) -> String {
    let mut out = String::with_capacity(rows * columns * 5);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..columns {
            if c > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(r * columns + c + 1).to_string());
        }
        out.push(')');
    }
    out
}

fn outbox_row(row: &AnyRow) -> Result<OutboxRow> {
    Ok(OutboxRow {
        seq: row.try_get("seq")?,
        destination: row.try_get("destination")?,
        event: row.try_get("event")?,
        created_us: row.try_get("created_us")?,
        written_us: row.try_get("written_us")?,
    })
}

fn puppet(row: &AnyRow) -> Result<PuppetRecord> {
    Ok(PuppetRecord {
        network: row.try_get("network")?,
        remote_id: row.try_get("remote_id")?,
        jid: row.try_get("jid")?,
        name: row.try_get("name")?,
        avatar_hash: row.try_get("avatar_hash")?,
        updated_us: row.try_get("updated_us")?,
    })
}

fn room(row: &AnyRow) -> Result<RoomRecord> {
    Ok(RoomRecord {
        network: row.try_get("network")?,
        remote_id: row.try_get("remote_id")?,
        jid: row.try_get("jid")?,
        name: row.try_get("name")?,
        portal: row.try_get("portal")?,
    })
}

fn account(row: &AnyRow) -> Result<AccountRecord> {
    Ok(AccountRecord {
        xmpp_jid: row.try_get("xmpp_jid")?,
        network: row.try_get("network")?,
        remote_user: row.try_get("remote_user")?,
        credentials: row.try_get::<Option<Vec<u8>>, _>("credentials")?.unwrap_or_default(),
        settings: row.try_get("settings")?,
        updated_us: row.try_get("updated_us")?,
    })
}

fn roster_item(row: &AnyRow) -> Result<RosterRecord> {
    Ok(RosterRecord {
        owner: row.try_get("owner")?,
        contact: row.try_get("contact")?,
        name: row.try_get("name")?,
        subscription: row.try_get("subscription")?,
        ask: row.try_get("ask")?,
        groups: row.try_get("groups")?,
    })
}

fn archive_entry(row: &AnyRow) -> Result<ArchiveEntry> {
    Ok(ArchiveEntry {
        archive_id: row.try_get("archive_id")?,
        stanza_id: row.try_get("stanza_id")?,
        origin_id: row.try_get("origin_id")?,
        room: row.try_get("room")?,
        owner: row.try_get("owner")?,
        sender_nick: row.try_get("sender_nick")?,
        sender_jid: row.try_get("sender_jid")?,
        time_us: row.try_get("time_us")?,
        body: row.try_get("body")?,
        payload: row.try_get("payload")?,
    })
}

const ARCHIVE_COLUMNS: &str =
    "archive_id, stanza_id, origin_id, room, owner, sender_nick, sender_jid, time_us, body, payload";

/// The file of a `sqlite:` URL (`sqlite://PATH?…`, percent-decoded as SQLx does); none for `:memory:`.
fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let encoded = rest.split('?').next().unwrap_or_default();
    if encoded.is_empty() || encoded == ":memory:" {
        return None;
    }
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut it = encoded.bytes();
    while let Some(b) = it.next() {
        let hex = |h: Option<u8>| h.and_then(|h| (h as char).to_digit(16));
        match b {
            b'%' => {
                let (hi, lo) = (it.next(), it.next());
                match (hex(hi), hex(lo)) {
                    (Some(hi), Some(lo)) => bytes.push((hi * 16 + lo) as u8),
                    _ => bytes.extend([Some(b'%'), hi, lo].into_iter().flatten()),
                }
            }
            _ => bytes.push(b),
        }
    }
    use std::os::unix::ffi::OsStringExt;
    Some(std::ffi::OsString::from_vec(bytes).into())
}

impl Store {
    /// Open a store: `sqlite://PATH` (created if missing), `sqlite::memory:`, or `postgres://…`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (backend, url, max) = if url.starts_with("sqlite::memory:") {
            // One connection: every connection to :memory: is a separate database.
            (Backend::Sqlite, url.to_owned(), 1)
        } else if url.starts_with("sqlite:") {
            let url = if url.contains('?') { url.to_owned() } else { format!("{url}?mode=rwc") };
            // The file holds credentials: created readable by its owner only, before
            // SQLite opens it (SQLite gives its -wal and -shm files the same mode).
            if let Some(path) = sqlite_path(&url)
                && url.contains("mode=rwc")
            {
                use std::os::unix::fs::OpenOptionsExt;
                match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(StoreError::Connect { url: redact(&url), source: sqlx::Error::Io(e) }),
                }
            }
            (Backend::Sqlite, url, max_connections.max(1))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned(), max_connections.max(1))
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };
        let mut options = AnyPoolOptions::new().max_connections(max);
        if backend == Backend::Sqlite {
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA busy_timeout = 5000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(&url).await.map_err(|source| StoreError::Connect { url: redact(&url), source })?;
        if let Some(path) = sqlite_path(&url).filter(|_| backend == Backend::Sqlite) {
            // A database made by an earlier version, or by hand: no longer readable by others.
            for file in ["", "-wal", "-shm"].map(|suffix| format!("{}{suffix}", path.display())) {
                use std::os::unix::fs::PermissionsExt;
                if let Ok(meta) = std::fs::metadata(&file)
                    && meta.permissions().mode() & 0o077 != 0
                    && let Err(e) = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                {
                    tracing::warn!(file, error = %e, "cannot make the database file readable by its owner only");
                }
            }
        }
        Ok(Store { pool, backend, secrets: None })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Create or update the schema. Running it again is a no-op.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    // --- puppets -------------------------------------------------------------------------

    pub async fn upsert_puppet(&self, p: &PuppetRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO puppets (network, remote_id, jid, name, avatar_hash, updated_us) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (network, remote_id) DO UPDATE SET jid = excluded.jid, name = excluded.name,
             avatar_hash = excluded.avatar_hash, updated_us = excluded.updated_us",
        )
        .bind(&p.network)
        .bind(&p.remote_id)
        .bind(&p.jid)
        .bind(&p.name)
        .bind(&p.avatar_hash)
        .bind(p.updated_us)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn puppet_by_remote(&self, network: &str, remote_id: &str) -> Result<Option<PuppetRecord>> {
        sqlx::query("SELECT * FROM puppets WHERE network = $1 AND remote_id = $2")
            .bind(network)
            .bind(remote_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(puppet)
            .transpose()
    }

    pub async fn puppet_by_jid(&self, jid: &str) -> Result<Option<PuppetRecord>> {
        sqlx::query("SELECT * FROM puppets WHERE jid = $1")
            .bind(jid)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(puppet)
            .transpose()
    }

    // --- rooms and portals ---------------------------------------------------------------

    pub async fn upsert_room(&self, r: &RoomRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO rooms (network, remote_id, jid, name, portal) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (network, remote_id) DO UPDATE SET jid = excluded.jid, name = excluded.name, portal = excluded.portal",
        )
        .bind(&r.network)
        .bind(&r.remote_id)
        .bind(&r.jid)
        .bind(&r.name)
        .bind(&r.portal)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn room_by_jid(&self, jid: &str) -> Result<Option<RoomRecord>> {
        sqlx::query("SELECT * FROM rooms WHERE jid = $1")
            .bind(jid)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(room)
            .transpose()
    }

    pub async fn room_by_remote(&self, network: &str, remote_id: &str) -> Result<Option<RoomRecord>> {
        sqlx::query("SELECT * FROM rooms WHERE network = $1 AND remote_id = $2")
            .bind(network)
            .bind(remote_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(room)
            .transpose()
    }

    pub async fn rooms_of_network(&self, network: &str) -> Result<Vec<RoomRecord>> {
        sqlx::query("SELECT * FROM rooms WHERE network = $1 ORDER BY remote_id")
            .bind(network)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(room)
            .collect()
    }

    /// Replace the members of portal `name` (creating the portal).
    pub async fn set_portal_members(&self, name: &str, members: &[(String, String)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO portals (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM portal_members WHERE portal = $1").bind(name).execute(&mut *tx).await?;
        for (network, remote_id) in members {
            sqlx::query(
                "INSERT INTO portal_members (portal, network, remote_id) VALUES ($1, $2, $3)
                 ON CONFLICT (network, remote_id) DO UPDATE SET portal = excluded.portal",
            )
            .bind(name)
            .bind(network)
            .bind(remote_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn portal_members(&self, name: &str) -> Result<Vec<(String, String)>> {
        let rows =
            sqlx::query("SELECT network, remote_id FROM portal_members WHERE portal = $1 ORDER BY network, remote_id")
                .bind(name)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| Ok((r.try_get("network")?, r.try_get("remote_id")?))).collect()
    }

    /// Every stored portal's members, as (portal, network, remote id), by portal.
    pub async fn all_portal_members(&self) -> Result<Vec<(String, String, String)>> {
        let rows =
            sqlx::query("SELECT portal, network, remote_id FROM portal_members ORDER BY portal, network, remote_id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| Ok((r.try_get("portal")?, r.try_get("network")?, r.try_get("remote_id")?))).collect()
    }

    /// Remove portal `name` and its members.
    pub async fn delete_portal(&self, name: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM portal_members WHERE portal = $1").bind(name).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM portals WHERE name = $1").bind(name).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The value kept under `name` (a bridge's resume point: a poll offset, a sync token).
    pub async fn checkpoint(&self, name: &str) -> Result<Option<String>> {
        let row =
            sqlx::query("SELECT value FROM checkpoints WHERE name = $1").bind(name).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.try_get("value")).transpose()?)
    }

    /// Keep `value` under `name`, replacing what was there.
    pub async fn set_checkpoint(&self, name: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO checkpoints (name, value, updated_us) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_us = excluded.updated_us",
        )
        .bind(name)
        .bind(value)
        .bind(now_us())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn portal_of(&self, network: &str, remote_id: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT portal FROM portal_members WHERE network = $1 AND remote_id = $2")
            .bind(network)
            .bind(remote_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("portal")).transpose()?)
    }

    // --- linked accounts -----------------------------------------------------------------

    pub async fn upsert_account(&self, a: &AccountRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO accounts (xmpp_jid, network, remote_user, credentials, settings, updated_us) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (xmpp_jid, network) DO UPDATE SET remote_user = excluded.remote_user,
             credentials = excluded.credentials, settings = excluded.settings, updated_us = excluded.updated_us",
        )
        .bind(&a.xmpp_jid)
        .bind(&a.network)
        .bind(&a.remote_user)
        .bind(self.seal_credentials(a))
        .bind(&a.settings)
        .bind(a.updated_us)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn account(&self, xmpp_jid: &str, network: &str) -> Result<Option<AccountRecord>> {
        sqlx::query("SELECT * FROM accounts WHERE xmpp_jid = $1 AND network = $2")
            .bind(xmpp_jid)
            .bind(network)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(|r| account(r).and_then(|a| self.open_account(a)))
            .transpose()
    }

    pub async fn accounts_of_network(&self, network: &str) -> Result<Vec<AccountRecord>> {
        sqlx::query("SELECT * FROM accounts WHERE network = $1 ORDER BY xmpp_jid")
            .bind(network)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| account(r).and_then(|a| self.open_account(a)))
            .collect()
    }

    pub async fn delete_account(&self, xmpp_jid: &str, network: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM accounts WHERE xmpp_jid = $1 AND network = $2")
            .bind(xmpp_jid)
            .bind(network)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    // --- per-user settings ---------------------------------------------------------------

    /// `account`'s settings (JSON) for `target` on `network` (an IRC server), if any.
    pub async fn user_settings(&self, account: &str, network: &str, target: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT settings FROM user_settings WHERE account = $1 AND network = $2 AND target = $3")
            .bind(account)
            .bind(network)
            .bind(target)
            .fetch_optional(&self.pool)
            .await?;
        let settings: Option<String> = row.map(|r| r.try_get("settings")).transpose()?;
        settings.map(|s| self.open_settings(account, network, target, s)).transpose()
    }

    /// Store `account`'s settings (JSON) for `target` on `network`, replacing what was there.
    pub async fn set_user_settings(&self, account: &str, network: &str, target: &str, settings: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO user_settings (account, network, target, settings, updated_us) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (account, network, target) DO UPDATE SET settings = excluded.settings, updated_us = excluded.updated_us",
        )
        .bind(account)
        .bind(network)
        .bind(target)
        .bind(self.seal_settings(account, network, target, settings))
        .bind(now_us())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forget `account`'s settings for `target`; false when there were none.
    pub async fn delete_user_settings(&self, account: &str, network: &str, target: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM user_settings WHERE account = $1 AND network = $2 AND target = $3")
            .bind(account)
            .bind(network)
            .bind(target)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    // --- message id map ------------------------------------------------------------------

    /// Record the ids a message has on `network` in `scope` (room or contact), in order.
    /// Recording the same ids again is not an error.
    pub async fn map_message(&self, key: &str, network: &str, scope: &str, remote_ids: &[String]) -> Result<()> {
        let entry = IdMapEntry {
            key: key.to_owned(),
            network: network.to_owned(),
            scope: scope.to_owned(),
            remote_ids: remote_ids.to_vec(),
        };
        self.map_messages(std::slice::from_ref(&entry)).await
    }

    /// Record several messages' ids in one transaction.
    pub async fn map_messages(&self, entries: &[IdMapEntry]) -> Result<()> {
        if entries.iter().all(|e| e.remote_ids.is_empty()) {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        map_messages_in(&mut tx, entries).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The message key of an id seen on `network` in `scope`.
    pub async fn key_for_remote(&self, network: &str, scope: &str, remote_id: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT msg_key FROM message_map WHERE network = $1 AND scope = $2 AND remote_id = $3")
            .bind(network)
            .bind(scope)
            .bind(remote_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("msg_key")).transpose()?)
    }

    /// The ids message `key` has on `network`, in part order.
    pub async fn remote_ids_for(&self, key: &str, network: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT remote_id FROM message_map WHERE msg_key = $1 AND network = $2 ORDER BY part")
            .bind(key)
            .bind(network)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("remote_id")?)).collect()
    }

    // --- outbox --------------------------------------------------------------------------

    /// Apply one batch of outbox changes in one transaction: message ids that must be
    /// durable with them, new rows, rows marked written (at `written_us`), then removals.
    pub async fn outbox_apply(
        &self,
        inserts: &[OutboxRow],
        written: &[i64],
        written_us: i64,
        removals: &[i64],
        ids: &[IdMapEntry],
    ) -> Result<()> {
        if inserts.is_empty() && written.is_empty() && removals.is_empty() && ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        map_messages_in(&mut tx, ids).await?;
        for chunk in inserts.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO outbox (seq, destination, event, created_us, written_us) VALUES {} \
                 ON CONFLICT (seq) DO NOTHING",
                values_placeholders(chunk.len(), 5)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for r in chunk {
                query = query.bind(r.seq).bind(&r.destination).bind(&r.event).bind(r.created_us).bind(r.written_us);
            }
            query.execute(&mut *tx).await?;
        }
        for chunk in written.chunks(256) {
            let list = chunk.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
            // Only integers are interpolated.
            tx.execute(AssertSqlSafe(format!("UPDATE outbox SET written_us = {written_us} WHERE seq IN ({list})")))
                .await?;
        }
        for chunk in removals.chunks(256) {
            let list = chunk.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
            // Only integers are interpolated.
            tx.execute(AssertSqlSafe(format!("DELETE FROM outbox WHERE seq IN ({list})"))).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every row still in the outbox, oldest first.
    pub async fn outbox_pending(&self) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query("SELECT seq, destination, event, created_us, written_us FROM outbox ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(outbox_row).collect()
    }

    /// Per destination, how many rows wait in the outbox and since when (one
    /// aggregate query, for status commands), by destination name.
    pub async fn outbox_depth(&self) -> Result<Vec<OutboxDepth>> {
        let rows = sqlx::query(
            "SELECT destination, COUNT(*) AS n, MIN(created_us) AS oldest FROM outbox \
             GROUP BY destination ORDER BY destination",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxDepth {
                    destination: r.try_get("destination")?,
                    rows: r.try_get("n")?,
                    oldest_us: r.try_get("oldest")?,
                })
            })
            .collect()
    }

    // --- room sessions ---------------------------------------------------------------------

    /// Record where an account stands in a room (replacing what was there).
    pub async fn upsert_room_session(&self, r: &RoomSessionRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO room_sessions (room, account, nick, password, resources, updated_us)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (room, account) DO UPDATE SET nick = excluded.nick, password = excluded.password,
               resources = excluded.resources, updated_us = excluded.updated_us",
        )
        .bind(&r.room)
        .bind(&r.account)
        .bind(&r.nick)
        .bind(self.seal_room_password(&r.room, &r.account, r.password.as_deref()))
        .bind(r.resources.join("\n"))
        .bind(now_us())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn delete_room_session(&self, room: &str, account: &str) -> Result<()> {
        sqlx::query("DELETE FROM room_sessions WHERE room = $1 AND account = $2")
            .bind(room)
            .bind(account)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every recorded room session.
    pub async fn room_sessions(&self) -> Result<Vec<RoomSessionRecord>> {
        let rows =
            sqlx::query("SELECT room, account, nick, password, resources FROM room_sessions ORDER BY room, account")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                let resources: String = r.try_get("resources")?;
                let (room, account): (String, String) = (r.try_get("room")?, r.try_get("account")?);
                let password = self.open_room_password(&room, &account, r.try_get("password")?)?;
                Ok(RoomSessionRecord {
                    room,
                    account,
                    nick: r.try_get("nick")?,
                    password,
                    resources: resources.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect(),
                })
            })
            .collect()
    }

    // --- archive -------------------------------------------------------------------------

    /// Append a batch of entries in one transaction.
    pub async fn archive_append(&self, entries: &[ArchiveEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for chunk in entries.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO archive ({ARCHIVE_COLUMNS}) VALUES {} ON CONFLICT (stanza_id) DO NOTHING",
                values_placeholders(chunk.len(), 10)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for e in chunk {
                query = query
                    .bind(e.archive_id)
                    .bind(&e.stanza_id)
                    .bind(&e.origin_id)
                    .bind(&e.room)
                    .bind(&e.owner)
                    .bind(&e.sender_nick)
                    .bind(&e.sender_jid)
                    .bind(e.time_us)
                    .bind(&e.body)
                    .bind(&e.payload);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn archive_get(&self, stanza_id: &str) -> Result<Option<ArchiveEntry>> {
        sqlx::query(AssertSqlSafe(format!("SELECT {ARCHIVE_COLUMNS} FROM archive WHERE stanza_id = $1")))
            .bind(stanza_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(archive_entry)
            .transpose()
    }

    /// Remove the message with `stanza_id` from `room`'s archive as `account` sees it
    /// (its own entries and the shared ones; `None`: the shared ones only); returns
    /// how many entries went.
    pub async fn archive_remove(&self, room: &str, account: Option<&str>, stanza_id: &str) -> Result<u64> {
        let r = sqlx::query("DELETE FROM archive WHERE stanza_id = $1 AND room = $2 AND (owner IS NULL OR owner = $3)")
            .bind(stanza_id)
            .bind(room)
            .bind(account)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn archive_id_of(&self, stanza_id: &str) -> Result<Option<i64>> {
        Ok(self.archive_get(stanza_id).await?.map(|e| e.archive_id))
    }

    /// Query the archive; results are in ascending order whatever the paging direction.
    pub async fn archive_query(&self, q: &ArchiveQuery) -> Result<ArchivePage> {
        let max = q.max.clamp(1, MAX_PAGE);
        let backward = q.before.is_some() || q.last_page;
        // Paging bounds by archive id (the id of an unknown stanza id bounds nothing:
        // an empty page is returned rather than everything).
        let after_id = match &q.after {
            Some(s) => match self.archive_id_of(s).await? {
                Some(id) => Some(id),
                None => return Ok(ArchivePage { complete: true, ..Default::default() }),
            },
            None => None,
        };
        let before_id = match &q.before {
            Some(s) => match self.archive_id_of(s).await? {
                Some(id) => Some(id),
                None => return Ok(ArchivePage { complete: true, ..Default::default() }),
            },
            None => None,
        };
        let mut sql = format!("SELECT {ARCHIVE_COLUMNS} FROM archive WHERE room = $1");
        let mut n = 1;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if q.owner.is_some() {
            sql += &format!(" AND (owner IS NULL OR owner = {})", next());
        } else {
            sql += " AND owner IS NULL";
        }
        if q.start_us.is_some() {
            sql += &format!(" AND time_us >= {}", next());
        }
        if q.end_us.is_some() {
            sql += &format!(" AND time_us <= {}", next());
        }
        if q.with_nick.is_some() {
            sql += &format!(" AND sender_nick = {}", next());
        }
        if q.with_jid.is_some() {
            sql += &format!(" AND sender_jid = {}", next());
        }
        if after_id.is_some() {
            sql += &format!(" AND archive_id > {}", next());
        }
        if before_id.is_some() {
            sql += &format!(" AND archive_id < {}", next());
        }
        sql += if backward { " ORDER BY archive_id DESC" } else { " ORDER BY archive_id ASC" };
        sql += &format!(" LIMIT {}", max + 1);

        // Only fixed fragments and numbered placeholders went into `sql`; values are bound.
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(&q.room);
        if let Some(o) = &q.owner {
            query = query.bind(o);
        }
        if let Some(v) = q.start_us {
            query = query.bind(v);
        }
        if let Some(v) = q.end_us {
            query = query.bind(v);
        }
        if let Some(v) = &q.with_nick {
            query = query.bind(v);
        }
        if let Some(v) = &q.with_jid {
            query = query.bind(v);
        }
        if let Some(v) = after_id {
            query = query.bind(v);
        }
        if let Some(v) = before_id {
            query = query.bind(v);
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut entries = rows.iter().map(archive_entry).collect::<Result<Vec<_>>>()?;
        let complete = entries.len() <= max as usize;
        entries.truncate(max as usize);
        if backward {
            entries.reverse();
        }
        Ok(ArchivePage {
            first: entries.first().map(|e| e.stanza_id.clone()),
            last: entries.last().map(|e| e.stanza_id.clone()),
            entries,
            complete,
        })
    }

    // --- embedded server accounts and rosters --------------------------------------------

    pub async fn upsert_local_user(&self, u: &LocalUserRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO local_users (jid, scram_sha1, scram_sha256, created_us) VALUES ($1, $2, $3, $4)
             ON CONFLICT (jid) DO UPDATE SET scram_sha1 = excluded.scram_sha1, scram_sha256 = excluded.scram_sha256",
        )
        .bind(&u.jid)
        .bind(&u.scram_sha1)
        .bind(&u.scram_sha256)
        .bind(u.created_us)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn local_user(&self, jid: &str) -> Result<Option<LocalUserRecord>> {
        let row = sqlx::query("SELECT jid, scram_sha1, scram_sha256, created_us FROM local_users WHERE jid = $1")
            .bind(jid)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| -> Result<LocalUserRecord> {
            Ok(LocalUserRecord {
                jid: r.try_get("jid")?,
                scram_sha1: r.try_get("scram_sha1")?,
                scram_sha256: r.try_get("scram_sha256")?,
                created_us: r.try_get("created_us")?,
            })
        })
        .transpose()
    }

    pub async fn count_local_users(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM local_users").fetch_one(&self.pool).await?;
        Ok(row.try_get("n")?)
    }

    /// Delete an account and its roster; false when there was no such account.
    pub async fn delete_local_user(&self, jid: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM local_users WHERE jid = $1").bind(jid).execute(&self.pool).await?;
        sqlx::query("DELETE FROM roster WHERE owner = $1").bind(jid).execute(&self.pool).await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn roster(&self, owner: &str) -> Result<Vec<RosterRecord>> {
        sqlx::query("SELECT * FROM roster WHERE owner = $1 ORDER BY contact")
            .bind(owner)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(roster_item)
            .collect()
    }

    pub async fn roster_item(&self, owner: &str, contact: &str) -> Result<Option<RosterRecord>> {
        sqlx::query("SELECT * FROM roster WHERE owner = $1 AND contact = $2")
            .bind(owner)
            .bind(contact)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(roster_item)
            .transpose()
    }

    pub async fn upsert_roster_item(&self, r: &RosterRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO roster (owner, contact, name, subscription, ask, groups) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (owner, contact) DO UPDATE SET name = excluded.name, subscription = excluded.subscription,
             ask = excluded.ask, groups = excluded.groups",
        )
        .bind(&r.owner)
        .bind(&r.contact)
        .bind(&r.name)
        .bind(&r.subscription)
        .bind(&r.ask)
        .bind(&r.groups)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn delete_roster_item(&self, owner: &str, contact: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM roster WHERE owner = $1 AND contact = $2")
            .bind(owner)
            .bind(contact)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Delete entries older than `older_than_us`; returns how many.
    pub async fn archive_expire(&self, older_than_us: i64) -> Result<u64> {
        let r = sqlx::query("DELETE FROM archive WHERE time_us < $1").bind(older_than_us).execute(&self.pool).await?;
        Ok(r.rows_affected())
    }
}

/// A URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance_on_sqlite_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("isthmus.db").display());
        let store = Store::connect(&url, 4).await.expect("open");
        conformance::run_all(&store).await;
    }

    #[tokio::test]
    async fn conformance_on_sqlite_memory() {
        let store = Store::connect("sqlite::memory:", 4).await.expect("open");
        conformance::run_all(&store).await;
    }

    #[tokio::test]
    async fn unsupported_url_is_explained() {
        let e = Store::connect("mysql://x", 1).await.expect_err("unsupported");
        assert!(e.to_string().contains("sqlite://PATH"), "{e}");
    }

    #[test]
    fn archive_ids_strictly_increase() {
        let ids: Vec<i64> = (0..10_000).map(|_| next_archive_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn placeholders_number_every_value_in_order() {
        assert_eq!(values_placeholders(1, 2), "($1, $2)");
        assert_eq!(values_placeholders(2, 3), "($1, $2, $3), ($4, $5, $6)");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("sqlite:///x.db"), "sqlite:///x.db");
    }

    #[tokio::test]
    async fn the_sqlite_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let mode = |p: &std::path::Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
        let db = dir.path().join("new store.db");
        let store = Store::connect(&format!("sqlite://{}", db.display()), 2).await.expect("connect");
        store.migrate().await.expect("migrate");
        assert_eq!(mode(&db), 0o600, "a new database");
        for suffix in ["-wal", "-shm"] {
            let side = dir.path().join(format!("new store.db{suffix}"));
            if side.exists() {
                assert_eq!(mode(&side), 0o600, "{}", side.display());
            }
        }
        // One an earlier version left readable by everyone is tightened.
        let old = dir.path().join("old.db");
        std::fs::write(&old, b"").expect("write");
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        Store::connect(&format!("sqlite://{}", old.display()), 1).await.expect("connect");
        assert_eq!(mode(&old), 0o600, "an existing database");
        assert_eq!(sqlite_path("sqlite:///a%20b.db?mode=rwc"), Some("/a b.db".into()));
        assert_eq!(sqlite_path("sqlite:rel.db"), Some("rel.db".into()));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
    }
}
