//! The embedded XMPP server core: the quickstart configuration, logins (SCRAM
//! over STARTTLS, refusals), hostile streams, a second client implementation
//! (go-sendxmpp), and many logins at once. The IRC end-to-end tests run in
//! embedded mode too (`irc_path.rs`, `muc.rs`).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use isthmus_tests::peers::EmbeddedC2s;
use isthmus_tests::process::{find_program, free_port};
use isthmus_tests::raw_c2s::{HEADER, RawC2s, read_until};
use isthmus_tests::scenario::{IrcSetup, T, embedded_password_hashes, room};
use isthmus_tests::{C2s, IrcClient, IrcServerKind, Isthmus, XmppClient, XmppServerKind};
use sasl::common::ChannelBinding;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn embedded() -> Result<IrcSetup> {
    IrcSetup::start_with(XmppServerKind::Embedded, IrcServerKind::Ngircd, "").await
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

    // No mechanism is offered before TLS, and STARTTLS is required.
    let mut tcp = TcpStream::connect(("127.0.0.1", s.prosody.c2s_port())).await?;
    tcp.write_all(HEADER.as_bytes()).await?;
    let features = read_until(&mut tcp, "</stream:features>").await?;
    assert!(features.contains("starttls") && features.contains("<required"), "STARTTLS required: {features}");
    // (xmpp-parsers always writes the `<mechanisms/>` element; it is empty)
    assert!(!features.contains("<mechanism>"), "no mechanism without TLS: {features}");
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
async fn scram_without_channel_binding_logs_in_and_plain_streams_get_no_mechanism() -> Result<()> {
    let s = embedded().await?;
    let ca = s.prosody.ca_file().context("embedded has a certificate")?;
    let port = s.prosody.c2s_port();
    for (mechanism, binding) in [
        ("SCRAM-SHA-256", ChannelBinding::None),
        ("SCRAM-SHA-1", ChannelBinding::None),
        ("SCRAM-SHA-256", ChannelBinding::Unsupported),
    ] {
        let mut c = RawC2s::connect(port).await?.starttls(&ca).await?;
        assert!(c.features.contains(mechanism), "{mechanism} offered over TLS: {}", c.features);
        let header = String::from_utf8_lossy(binding.header()).into_owned();
        let verdict = c.scram(mechanism, "alice", "alicepass", binding).await?;
        assert_eq!(verdict, Ok(()), "{mechanism} with GS2 header {header} and the right password");
    }
    let mut c = RawC2s::connect(port).await?.starttls(&ca).await?;
    let verdict = c.scram("SCRAM-SHA-256", "alice", "wrong", ChannelBinding::None).await?;
    let failure = verdict.err().context("a wrong password is refused")?;
    assert!(failure.contains("not-authorized"), "{failure}");
    s.gateway.wait_log("authentication failed client_ip=127.0.0.1", 1, T).await?;

    // PLAIN without its authorization-identity NUL: refused as malformed, and the
    // password (which would stand where the user name does) is not logged.
    let mut c = RawC2s::connect(port).await?.starttls(&ca).await?;
    // base64("alice\0s3cr3t-in-the-name-slot")
    let plain = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b"alice\0s3cr3t-in-the-name-slot");
    c.send(&format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>")).await?;
    let failure = c.read_until("</failure>").await?;
    assert!(failure.contains("malformed-request"), "{failure}");
    assert!(!s.gateway.log().contains("s3cr3t-in-the-name-slot"), "the password reached the log");

    // Without TLS: nothing offered, and SCRAM refused as PLAIN is.
    let mut c = RawC2s::connect(port).await?;
    assert!(!c.features.contains("<mechanism>"), "no mechanism on a plain stream: {}", c.features);
    let verdict = c.scram("SCRAM-SHA-256", "alice", "alicepass", ChannelBinding::None).await?;
    let failure = verdict.err().context("SCRAM on a plain stream is refused")?;
    assert!(failure.contains("encryption-required"), "{failure}");
    Ok(())
}

/// Connections that never finish TLS (or never start it) cannot keep a real
/// client out: past the cap the oldest go, and the rest meet the handshake deadline.
#[tokio::test]
async fn connections_that_never_finish_tls_do_not_keep_a_client_out() -> Result<()> {
    const N: usize = 300;
    let s = embedded().await?;
    let port = s.prosody.c2s_port();
    let mut stuck = Vec::new();
    for i in 0..N {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        if i % 2 == 0 {
            // Ask for TLS, then never send a ClientHello.
            tcp.write_all(HEADER.as_bytes()).await?;
            read_until(&mut tcp, "</stream:features>").await?;
            tcp.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>").await?;
            read_until(&mut tcp, "proceed").await?;
        }
        stuck.push(tcp);
    }
    let started = std::time::Instant::now();
    let alice = XmppClient::connect(&s.prosody, "alice@localhost/real", "alicepass").await?;
    println!("a real client logged in {:?} after {N} stuck connections", started.elapsed());
    assert!(alice.tls);
    alice.disconnect().await;
    s.gateway.wait_log("closed the oldest", 1, T).await?;
    // Every stuck connection is closed by the server: made room for, or past the deadlines.
    let closed = futures::future::join_all(stuck.into_iter().map(|mut tcp| async move {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(45), tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }))
    .await;
    let closed = closed.iter().filter(|c| **c).count();
    assert_eq!(closed, N, "the server closed every stuck connection ({closed}/{N})");
    Ok(())
}

/// A stranger's hostile streams before any login: the packet that once
/// overflowed the stack (closing tags hidden in CDATA), and markup XMPP
/// forbids. Each ends that stream with the right error; the gateway serves on.
#[tokio::test]
async fn hostile_streams_before_login_end_that_stream_and_nothing_else() -> Result<()> {
    let s = embedded().await?;
    let port = s.prosody.c2s_port();
    let pid = s.gateway.pid().context("gateway running")?;
    // About 220 kB in one write: the server stops reading at the second unit and
    // closes, so the rest of the write may reset the connection before the
    // stream error is read; what matters is that it is refused and nothing else is hurt.
    let unit = format!("{}<![CDATA[{}]]>", "<a>".repeat(60), "</>".repeat(60));
    let cdata_packet = format!("{HEADER}{}", unit.repeat(220_000 / unit.len()));
    let (mut rd, mut wr) = TcpStream::connect(("127.0.0.1", port)).await?.into_split();
    let writer = tokio::spawn(async move { wr.write_all(cdata_packet.as_bytes()).await.is_ok() });
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    let reset = loop {
        match tokio::time::timeout(T, rd.read(&mut buf)).await {
            Ok(Ok(0)) => break false,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break true,
            Err(_) => bail!("the server neither refused nor closed: {}", String::from_utf8_lossy(&answer)),
        }
    };
    let wrote_all = writer.await?;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("policy-violation") || reset, "refused: {answer}");
    assert!(answer.contains("policy-violation") || !wrote_all, "a stream error unless the write was cut: {answer}");
    s.gateway.wait_log("nested deeper than 64 levels", 1, T).await?;
    let cases = [
        (&*format!("{HEADER}<!-- a comment -->"), "restricted-xml"),
        (&*format!("{HEADER}<?php echo 1; ?>"), "restricted-xml"),
        (&*format!("{HEADER}<!DOCTYPE x [<!ENTITY a 'b'>]>"), "restricted-xml"),
        (
            &*format!("{HEADER}<message><body><![CDATA[{}]]><!-- --></body></message>", "<a>".repeat(500)),
            "restricted-xml",
        ),
    ];
    for (payload, condition) in cases {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let _ = tcp.write_all(payload.as_bytes()).await;
        let answer = read_until(&mut tcp, "</stream:stream>").await?;
        assert!(
            answer.contains(condition),
            "{condition} for {}…: {answer}",
            &payload[HEADER.len()..][..40.min(payload.len() - HEADER.len())]
        );
    }
    assert_eq!(s.gateway.pid(), Some(pid), "the gateway is the same process");
    let mut irc = IrcClient::connect(s.irc.port(), "bob").await?;
    irc.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "after", &room, "alice").await?;
    alice.send_groupchat(&room, "served after the hostile streams").await?;
    irc.expect_line(T, |l| l.contains("PRIVMSG #test :served after the hostile streams")).await?;
    alice.disconnect().await;
    Ok(())
}

/// A client that stops reading cannot make the server hold an unbounded
/// queue: past the bound its stream is closed, and the senders of what it did
/// not take get an error, not silence.
#[tokio::test]
async fn a_client_that_does_not_read_is_closed_and_its_senders_are_told() -> Result<()> {
    let s = embedded().await?;
    let ca = s.prosody.ca_file().context("embedded has a certificate")?;
    let bob = isthmus_tests::raw_c2s::log_in(s.prosody.c2s_port(), &ca, "bob", "bobpass", "deaf", 4096).await?;
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/talker", "alicepass").await?;
    let body = "x".repeat(1000);
    let mut sent = 0;
    let mut refused = None;
    while sent < 20_000 && refused.is_none() {
        for _ in 0..500 {
            alice
                .send_raw(&format!(
                    "<message to='bob@localhost' type='chat' id='m{sent}'><body>{body}</body></message>"
                ))
                .await?;
            sent += 1;
        }
        refused = alice.expect(Duration::from_millis(200), |st| st.kind == "message" && st.type_ == "error").await.ok();
    }
    let refused = refused.with_context(|| format!("no error after {sent} messages to a client that reads nothing"))?;
    println!("the first refusal came after {sent} messages: {}", refused.xml);
    assert!(refused.xml.contains("resource-constraint"), "{}", refused.xml);
    s.gateway.wait_log("does not read what is sent to it", 1, T).await?;
    drop(bob);
    // The server serves on: bob logs in again and gets a new message.
    let mut bob = XmppClient::connect(&s.prosody, "bob@localhost/again", "bobpass").await?;
    alice.send_raw("<message to='bob@localhost/again' type='chat' id='after'><body>after</body></message>").await?;
    bob.expect(T, |st| st.kind == "message" && st.body.as_deref() == Some("after")).await?;
    Ok(())
}

/// One account's connected clients are capped; the one past the cap is told why.
#[tokio::test]
async fn an_account_has_at_most_32_clients() -> Result<()> {
    let s = embedded().await?;
    let ca = s.prosody.ca_file().context("embedded has a certificate")?;
    let port = s.prosody.c2s_port();
    let mut clients = Vec::new();
    for i in 0..32 {
        clients.push(isthmus_tests::raw_c2s::log_in(port, &ca, "bob", "bobpass", &format!("r{i}"), 65536).await?);
    }
    let refused = match isthmus_tests::raw_c2s::log_in(port, &ca, "bob", "bobpass", "r32", 65536).await {
        Ok(_) => bail!("a 33rd client was bound"),
        Err(e) => e.to_string(),
    };
    assert!(refused.contains("resource-constraint") && refused.contains("32 clients"), "{refused}");
    // Another account is not affected, and a freed place can be taken again.
    let alice = XmppClient::connect(&s.prosody, "alice@localhost/r", "alicepass").await?;
    alice.disconnect().await;
    drop(clients.pop());
    let mut again = None;
    for _ in 0..50 {
        match isthmus_tests::raw_c2s::log_in(port, &ca, "bob", "bobpass", "r32", 65536).await {
            Ok(c) => {
                again = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    again.context("a client logs in once another of the account's has gone")?;
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
    s.gateway.wait_log("stanza over a limit", 2, T).await?;

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
    ensure!(out.status.success(), "go-sendxmpp failed: {}\n{}", String::from_utf8_lossy(&out.stderr), s.gateway.log());
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
    // All of them log in from one address at once: more than the default cap of
    // connections not logged in yet per address, which is for strangers.
    config += "    limits: { unauthenticated_per_ip: 1000 }\n";
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
