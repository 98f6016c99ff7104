//! Credentials at rest: after a real Matrix login through the gateway and IRC
//! settings with passwords made by an XMPP user, the SQLite file (and its WAL)
//! holds none of them in clear; the files are private; a restart opens them
//! again; a wrong key is refused at start with the key it expects.
//!
//! One gateway in embedded mode serves both networks (no components to set up):
//! IRC on ngIRCd, Matrix on Synapse.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_tests::matrix_scenario::{MATRIX_DOMAIN, login_adhoc, xml_escape};
use isthmus_tests::scenario::{IRC_DOMAIN, IrcSetup, T};
use isthmus_tests::{Synapse, SynapseOptions, XmppClient, XmppServerKind};

const SASL_PASSWORD: &str = "sasl-pw-Zq8rT4vN";
const SERVER_PASSWORD: &str = "server-pw-Hk2mX9wL";
const ON_CONNECT_SECRET: &str = "identify-pw-Jd5sP3cQ";

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path).with_context(|| format!("{}", path.display()))?.permissions().mode() & 0o777)
}

/// The database file and its WAL, as bytes.
fn database_bytes(dir: &Path) -> Result<Vec<u8>> {
    let mut bytes = std::fs::read(dir.join("isthmus.db"))?;
    if let Ok(wal) = std::fs::read(dir.join("isthmus.db-wal")) {
        bytes.extend_from_slice(&wal);
    }
    Ok(bytes)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Run the `configure` ad-hoc command on `server` with `fields` (form XML); the final answer.
async fn configure(xmpp: &mut XmppClient, server: &str, n: usize, fields: &str) -> Result<String> {
    let id = format!("cfg{n}");
    xmpp.send_raw(&format!(
        "<iq type='set' id='{id}' to='{server}'><command xmlns='http://jabber.org/protocol/commands' node='configure' action='execute'/></iq>"
    ))
    .await?;
    let form = xmpp.expect(T, |st| st.kind == "iq" && st.id == id).await?;
    let session =
        form.xml.split("sessionid=\"").nth(1).and_then(|t| t.split('"').next()).context("no sessionid")?.to_owned();
    let id = format!("cfg{n}b");
    xmpp.send_raw(&format!(
        "<iq type='set' id='{id}' to='{server}'><command xmlns='http://jabber.org/protocol/commands' node='configure' sessionid='{session}'>\
         <x xmlns='jabber:x:data' type='submit'>{fields}</x></command></iq>"
    ))
    .await?;
    Ok(xmpp.expect(T, |st| st.kind == "iq" && st.id == id).await?.xml)
}

/// The access tokens Synapse gave the gateway's device for `user_id`.
async fn gateway_tokens(synapse: &Synapse, user_id: &str) -> Result<Vec<String>> {
    use sqlx::Row;
    let url = format!("sqlite://{}?mode=ro", synapse.database_path().display());
    let pool = sqlx::SqlitePool::connect(&url).await?;
    let rows = sqlx::query(
        "SELECT t.token FROM access_tokens t JOIN devices d ON d.user_id = t.user_id AND d.device_id = t.device_id \
         WHERE t.user_id = ? AND d.display_name LIKE 'Isthmus gateway%'",
    )
    .bind(user_id)
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    Ok(rows.iter().map(|r| r.get::<String, _>("token")).collect())
}

#[tokio::test]
async fn credentials_are_sealed_in_the_database() -> Result<()> {
    let synapse = Synapse::start(SynapseOptions::default()).await?;
    let alice_mx = synapse.register("alice", "alice-mx-pass", false).await?;
    let hs = synapse.base_url();
    let matrix_yaml = format!(
        "matrix:\n  - domain: {MATRIX_DOMAIN}\n    default_homeserver: {hs}\n    allowed_homeservers: [\"{hs}\"]\n    data_dir: \"{{dir}}/matrix\"\n"
    );
    let mut s = IrcSetup::start_xmpp(XmppServerKind::Embedded, &matrix_yaml).await?;
    let dir = s.gateway.dir().to_path_buf();
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/r", "alicepass").await?;

    // A password in a chat message is not taken: the answer points to the form.
    alice
        .send_raw(&format!(
            "<message type='chat' to='{MATRIX_DOMAIN}' id='chatlogin'><body>login alice {}</body></message>",
            xml_escape(&alice_mx.password)
        ))
        .await?;
    let answer = alice.expect(T, |m| m.kind == "message" && m.from == MATRIX_DOMAIN).await?;
    let text = answer.body.unwrap_or_default();
    assert!(
        text.contains("XEP-0050") && text.contains("consider changing it") && !text.contains("Logged in"),
        "{text}"
    );

    // A real Matrix login through the ad-hoc command.
    let done = login_adhoc(&mut alice, "alice", &alice_mx.password).await?;
    if !(done.contains("status=\"completed\"") && done.contains(&alice_mx.user_id)) {
        bail!("login did not complete: {done}");
    }
    let tokens = gateway_tokens(&synapse, &alice_mx.user_id).await?;
    assert_eq!(tokens.len(), 1, "one device of the gateway: {tokens:?}");

    // IRC settings with secrets: SASL and server passwords, an on-connect line with a
    // password, a client certificate (its private key).
    let plain = format!("127.0.0.1@{IRC_DOMAIN}");
    let done = configure(
        &mut alice,
        &plain,
        1,
        &format!(
            "<field var='sasl_user'><value>dave</value></field>\
             <field var='sasl_password'><value>{SASL_PASSWORD}</value></field>\
             <field var='password'><value>{SERVER_PASSWORD}</value></field>\
             <field var='on_connect'><value>PRIVMSG NickServ :IDENTIFY dave {ON_CONNECT_SECRET}</value></field>"
        ),
    )
    .await?;
    assert!(done.contains("status=\"completed\"") && done.contains("sasl_password: set"), "{done}");
    let tls = format!("localhost@{IRC_DOMAIN}");
    let done = configure(&mut alice, &tls, 2, "<field var='certfp'><value>generate</value></field>").await?;
    assert!(done.contains("status=\"completed\"") && done.contains("CERT ADD"), "{done}");

    // The raw bytes: the values are there, sealed, and none of them in clear.
    let bytes = database_bytes(&dir)?;
    assert!(contains(&bytes, "$sealed1$"), "sealed values are written");
    for secret in [tokens[0].as_str(), SASL_PASSWORD, SERVER_PASSWORD, ON_CONNECT_SECRET, "PRIVATE KEY"] {
        assert!(!contains(&bytes, secret), "`{secret}` is in clear in the database");
    }
    // The database and the key are readable by the gateway's user only.
    assert_eq!(mode(&dir.join("isthmus.db"))?, 0o600, "database file mode");
    if dir.join("isthmus.db-wal").exists() {
        assert_eq!(mode(&dir.join("isthmus.db-wal"))?, 0o600, "WAL file mode");
    }
    assert_eq!(mode(&dir.join("isthmus.key"))?, 0o600, "key file mode");

    // After a restart, the login is restored (its crypto store's passphrase is derived
    // from the key, not stored) and the settings open again.
    drop(alice);
    s.gateway.restart().await?;
    s.gateway.wait_log("Matrix login restored", 1, Duration::from_secs(60)).await?;
    s.gateway.wait_log("accepting XMPP clients", 2, T).await?;
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/r2", "alicepass").await?;
    alice
        .send_raw(&format!(
            "<iq type='set' id='f1' to='{plain}'><command xmlns='http://jabber.org/protocol/commands' node='configure' action='execute'/></iq>"
        ))
        .await?;
    let form = alice.expect(T, |st| st.kind == "iq" && st.id == "f1").await?;
    assert!(form.xml.contains("<value>dave</value>") && !form.xml.contains(SASL_PASSWORD), "{}", form.xml);
    let bytes = database_bytes(&dir)?;
    for secret in [tokens[0].as_str(), SASL_PASSWORD, SERVER_PASSWORD, ON_CONNECT_SECRET, "PRIVATE KEY"] {
        assert!(!contains(&bytes, secret), "`{secret}` is in clear in the database after the restart");
    }
    drop(alice);
    s.gateway.stop().await;

    // Another key: the gateway refuses to start, naming the key it has and the one expected.
    let key_path = dir.join("isthmus.key");
    let key = std::fs::read_to_string(&key_path)?;
    std::fs::write(&key_path, format!("{}\n", "ab".repeat(32)))?;
    let out = std::process::Command::new(isthmus_tests::gateway::binary())
        .args(["migrate", "-c"])
        .arg(dir.join("isthmus.yaml"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a wrong key: {stderr}");
    assert!(stderr.contains("sealed with key") && stderr.contains("isthmus.key"), "{stderr}");
    // A key file of the wrong length is refused too, and is not replaced.
    std::fs::write(&key_path, "0123\n")?;
    let out = std::process::Command::new(isthmus_tests::gateway::binary())
        .args(["migrate", "-c"])
        .arg(dir.join("isthmus.yaml"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("holds no valid key"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&key_path)?, "0123\n");
    // The right key again: it starts.
    std::fs::write(&key_path, key)?;
    let out = std::process::Command::new(isthmus_tests::gateway::binary())
        .args(["migrate", "-c"])
        .arg(dir.join("isthmus.yaml"))
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
