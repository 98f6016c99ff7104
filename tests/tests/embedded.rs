//! The embedded XMPP server core: the quickstart configuration, logins (SCRAM
//! over STARTTLS, refusals), hostile streams, a second client implementation
//! (go-sendxmpp), and many logins at once. The IRC end-to-end tests run in
//! embedded mode too (`irc_path.rs`, `muc.rs`).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use isthmus_tests::peers::EmbeddedC2s;
use isthmus_tests::process::{find_program, free_port};
use isthmus_tests::scenario::{IrcSetup, T, embedded_password_hashes, room};
use isthmus_tests::{C2s, IrcClient, IrcServerKind, Isthmus, XmppClient, XmppServerKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn embedded() -> Result<IrcSetup> {
    IrcSetup::start_with(XmppServerKind::Embedded, IrcServerKind::Ngircd, "").await
}

const HEADER: &str = "<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

/// Read from `tcp` until `needle` shows up (or the peer closes); returns all read.
async fn read_until(tcp: &mut TcpStream, needle: &str) -> Result<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + T;
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .with_context(|| format!("waiting for {needle}; got {}", String::from_utf8_lossy(&got)))??;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test]
async fn the_quickstart_config_runs_with_nothing_else_and_says_how_to_connect() -> Result<()> {
    let example = std::fs::read_to_string(isthmus_tests::repo_root().join("config/examples/embedded.yaml"))?;
    let port = free_port();
    ensure!(example.contains("127.0.0.1:5222"), "the example listens on 127.0.0.1:5222");
    let config = example.replace("127.0.0.1:5222", &format!("127.0.0.1:{port}"));
    let gateway = Isthmus::start(&config, &[]).await?;
    gateway.wait_log("accepting XMPP clients", 1, T).await?;
    let log = gateway.log();
    ensure!(log.contains("log in as NAME@localhost"), "the log says how to connect:\n{log}");
    ensure!(log.contains("sha256="), "and the certificate fingerprint");
    let password = log
        .lines()
        .find(|l| l.contains("first start: created an account"))
        .and_then(|l| l.split("password=").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .context("the first start prints an account and its password")?
        .to_owned();
    ensure!(gateway.dir().join("isthmus.db").is_file(), "SQLite store next to the configuration");
    let server = EmbeddedC2s { port, ca_file: gateway.dir().join("tls/localhost.crt") };
    let admin = XmppClient::connect(&server, "admin@localhost/quickstart", &password).await?;
    ensure!(admin.tls, "logged in over TLS");
    admin.disconnect().await;
    Ok(())
}

#[tokio::test]
async fn scram_sha_256_over_starttls_and_refusals() -> Result<()> {
    let s = embedded().await?;
    let alice = XmppClient::connect(&s.prosody, "alice@localhost/r", "alicepass").await?;
    assert_eq!(alice.mechanism.as_deref(), Some("SCRAM-SHA-256"));
    assert!(alice.tls, "STARTTLS was used");

    let err = match XmppClient::connect(&s.prosody, "bob@localhost/r", "wrong").await {
        Ok(_) => bail!("a wrong password was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("not-authorized"), "SASL not-authorized: {err}");
    let err = match XmppClient::connect(&s.prosody, "nobody@localhost/r", "x").await {
        Ok(_) => bail!("an unknown account was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("not-authorized"), "unknown accounts fail the same way: {err}");

    // PLAIN is neither offered nor accepted before TLS.
    let mut tcp = TcpStream::connect(("127.0.0.1", s.prosody.c2s_port())).await?;
    tcp.write_all(HEADER.as_bytes()).await?;
    let features = read_until(&mut tcp, "</stream:features>").await?;
    assert!(features.contains("SCRAM-SHA-256") && features.contains("starttls"), "{features}");
    assert!(!features.contains(">PLAIN<"), "no PLAIN without TLS: {features}");
    // base64("\0alice\0alicepass")
    tcp.write_all(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAGFsaWNlcGFzcw==</auth>")
        .await?;
    let failure = read_until(&mut tcp, "</failure>").await?;
    assert!(failure.contains("encryption-required"), "{failure}");
    assert!(!failure.contains("<success"), "{failure}");

    // A stream for another domain is refused with host-unknown.
    let mut tcp = TcpStream::connect(("127.0.0.1", s.prosody.c2s_port())).await?;
    tcp.write_all(HEADER.replace("to='localhost'", "to='example.org'").as_bytes()).await?;
    let refused = read_until(&mut tcp, "</stream:stream>").await?;
    assert!(refused.contains("host-unknown"), "{refused}");
    alice.disconnect().await;
    Ok(())
}

#[tokio::test]
async fn a_ten_mib_stanza_ends_that_stream_and_nothing_else() -> Result<()> {
    let s = embedded().await?;
    let pid = s.gateway.pid().context("gateway running")?;

    // Before authentication, over raw TCP.
    let mut tcp = TcpStream::connect(("127.0.0.1", s.prosody.c2s_port())).await?;
    tcp.write_all(HEADER.as_bytes()).await?;
    read_until(&mut tcp, "</stream:features>").await?;
    let writer = {
        let (mut rd, mut wr) = tcp.into_split();
        let w = tokio::spawn(async move {
            let _ = wr.write_all(b"<message to='alice@localhost'><body>").await;
            let chunk = vec![b'a'; 64 * 1024];
            let mut sent = 0usize;
            while sent < 10 * 1024 * 1024 {
                if wr.write_all(&chunk).await.is_err() {
                    break; // the server closed the connection: expected
                }
                sent += chunk.len();
            }
            sent
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match tokio::time::timeout(T, rd.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => bail!("the server neither answered nor closed: {}", String::from_utf8_lossy(&got)),
            }
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(text.contains("policy-violation"), "stream error: {text}");
        assert!(text.contains("</stream:stream>"), "stream closed: {text}");
        w
    };
    let sent = writer.await?;
    assert!(sent < 10 * 1024 * 1024, "the server stopped reading long before 10 MiB (read {sent} bytes)");

    // After authentication, through slixmpp.
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/big", "alicepass").await?;
    let big = "a".repeat(10 * 1024 * 1024);
    alice.send_raw(&format!("<message to='bob@localhost' type='chat'><body>{big}</body></message>")).await?;
    alice.expect_disconnected(Duration::from_secs(60)).await?;
    s.gateway.wait_log("stanza over the size limit", 2, T).await?;

    // The server is unaffected: same process, logins and the IRC path work.
    assert_eq!(s.gateway.pid(), Some(pid));
    let mut irc = IrcClient::connect(s.irc.port(), "bob").await?;
    irc.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "again", &room, "alice").await?;
    alice.send_groupchat(&room, "still here").await?;
    irc.expect_line(T, |l| l.contains("PRIVMSG #test :still here")).await?;
    alice.disconnect().await;
    Ok(())
}

#[tokio::test]
async fn go_sendxmpp_and_slixmpp_talk_both_ways() -> Result<()> {
    let s = embedded().await?;
    let go_sendxmpp = find_program("go-sendxmpp", &[])?;
    let ca = s.prosody.ca_file().context("embedded has a certificate")?;
    let server = format!("localhost:{}", s.prosody.c2s_port());
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/slix", "alicepass").await?;

    // go-sendxmpp → slixmpp, verifying the certificate (SSL_CERT_FILE is Go's trust store).
    let mut send = tokio::process::Command::new(&go_sendxmpp)
        .args(["-u", "bob@localhost", "-p", "bobpass", "-j", &server, "alice@localhost"])
        .env("SSL_CERT_FILE", &ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    send.stdin.take().context("stdin")?.write_all(b"hello from go-sendxmpp\n").await?;
    let out = tokio::time::timeout(T, send.wait_with_output()).await??;
    ensure!(out.status.success(), "go-sendxmpp failed: {}", String::from_utf8_lossy(&out.stderr));
    let m = alice.expect(T, |st| st.kind == "message" && st.body.as_deref() == Some("hello from go-sendxmpp")).await?;
    assert!(m.from.starts_with("bob@localhost/"), "from bob's resource: {}", m.from);

    // slixmpp → go-sendxmpp (listening).
    let mut listen = tokio::process::Command::new(&go_sendxmpp)
        .args(["-l", "-u", "bob@localhost", "-p", "bobpass", "-j", &server])
        .env("SSL_CERT_FILE", &ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    s.gateway.wait_log("session started peer", 2, T).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    alice
        .send_raw("<message to='bob@localhost' type='chat' id='to-go'><body>reply from slixmpp</body></message>")
        .await?;
    let mut stdout = listen.stdout.take().context("stdout")?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("reply from slixmpp") {
        let n = tokio::time::timeout(T, stdout.read(&mut buf)).await.context("go-sendxmpp printed nothing")??;
        ensure!(n > 0, "go-sendxmpp exited: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).contains("alice@localhost"), "{}", String::from_utf8_lossy(&got));
    let _ = listen.kill().await;
    alice.disconnect().await;
    Ok(())
}

#[tokio::test]
async fn two_hundred_clients_log_in_at_once() -> Result<()> {
    const N: usize = 200;
    let hash = embedded_password_hashes()?.into_iter().find(|(u, _)| u == "alice").context("alice's hash")?.1;
    let port = free_port();
    let mut config = format!(
        "xmpp:\n  mode: embedded\n  embedded:\n    domain: localhost\n    listen: 127.0.0.1:{port}\n    users:\n"
    );
    for i in 0..N {
        config += &format!("      - {{ jid: u{i}@localhost, password_hash: \"{hash}\" }}\n");
    }
    config += "store:\n  url: sqlite://{dir}/isthmus.db\n";
    let gateway = Isthmus::start(&config, &[]).await?;
    gateway.wait_log("accepting XMPP clients", 1, T).await?;
    let ca = gateway.dir().join("tls/localhost.crt");
    let jids: Vec<String> = (0..N).map(|i| format!("u{i}@localhost/load")).collect();
    let out = tokio::process::Command::new(isthmus_tests::xmpp::python()?)
        .arg(isthmus_tests::repo_root().join("tests/clients/xmpp_load.py"))
        .args(["127.0.0.1", &port.to_string(), &ca.display().to_string(), "alicepass"])
        .args(&jids)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), out).await??;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("load script output: {}", String::from_utf8_lossy(&out.stderr)))?;
    println!("{N} concurrent logins: {report}");
    assert_eq!(report["ok"], N, "every login succeeds: {report}");
    Ok(())
}
