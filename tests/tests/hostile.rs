//! Bad input never hurts: generated corpora of hostile input over both links.
//!
//! - 5,000 hostile stanzas from an XMPP client through Prosody (injection
//!   attempts, unknown payloads, deep nesting, over-long names and attribute
//!   values, invalid addresses, references to
//!   unknown messages, bogus queries and commands);
//! - 5,000 hostile lines from an IRC client through ngIRCd (invalid UTF-8,
//!   characters XML cannot carry, broken formatting and CTCP, XML injection);
//! - 300 connections sending malformed XML to the embedded server.
//!
//! After each corpus the gateway is still running, its links never dropped,
//! a normal message still goes through, and its memory stayed bounded. Each
//! test prints its counts. The corpora come from a fixed seed, so a failure
//! reproduces.

use std::time::Duration;

use anyhow::{Context, Result};
use isthmus_tests::process::rss_kb;
use isthmus_tests::scenario::{IRC_DOMAIN, IrcSetup, T, room};
use isthmus_tests::{IrcClient, XmppClient, XmppServer, XmppServerKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A small deterministic generator (xorshift64*), so every run sends the same corpus.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The first few warnings and errors of a log, to show why an assertion failed.
fn first_problems(log: &str) -> String {
    log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(8).collect::<Vec<_>>().join("\n")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// Bodies an XMPP user could send (already XML-escaped where needed; `&#13;` is a real CR).
const XMPP_BODIES: &[&str] = &[
    "&#13;&#10;QUIT :x",
    "&#13;&#10;PRIVMSG #other :x",
    "x&#10;JOIN #evil",
    "a&#13;b",
    "*bold* _it_ ~strike~ `code`",
    "```&#10;code&#10;```",
    "&gt; quote&#10;&gt;&gt; nested",
    "\u{202e}right to left",
    "zero\u{200b}width",
    "&lt;/body&gt;&lt;/message&gt;&lt;message&gt;",
    "/me does",
    "/me",
    "/",
    "//",
    ":",
    " ",
    "\t",
    "%s%n%x",
    "\u{1F600}\u{1F600}\u{1F600}",
    "é\u{301}",
    "\u{fffd}",
];

fn xmpp_corpus(room: &str, n: usize) -> Vec<String> {
    let mut rng = Rng(0x5eed_0001);
    let gw = IRC_DOMAIN;
    let server = format!("127.0.0.1@{gw}");
    let puppet = format!("nobody-here%127.0.0.1@{gw}");
    let targets = [
        gw.to_owned(),
        server.clone(),
        room.to_owned(),
        format!("{room}/bob"),
        puppet.clone(),
        format!("%@{gw}"),
        format!("#@{gw}"),
        format!("%%%%@{gw}"),
        format!("#x%evil.example@{gw}"),
        format!("nick%evil.example@{gw}"),
        format!("#x%127.0.0.1%more@{gw}"),
        format!("a\\20b%127.0.0.1@{gw}"),
        format!("{gw}/resource"),
    ];
    let namespaces = ["urn:example:unknown", "jabber:iq:register", "urn:xmpp:mam:2", "vcard-temp", ""];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("h{i}");
        let to = escape(rng.pick::<String>(&targets));
        let stanza = match rng.below(12) {
            // hostile bodies into the room (relayed to IRC)
            0..=2 => {
                let mut body = (*rng.pick(XMPP_BODIES)).to_owned();
                if rng.below(10) == 0 {
                    body = body.repeat(200);
                }
                format!("<message type='groupchat' to='{room}' id='{id}'><body>{body}</body></message>")
            }
            // hostile bodies to any address on the gateway but the server JID,
            // whose messages are the user's own raw IRC commands by design
            3 => {
                let kind = rng.pick(&["chat", "normal", "headline", "error", "groupchat"]);
                let body = rng.pick(XMPP_BODIES);
                let to = if to == escape(&server) { escape(&puppet) } else { to };
                format!("<message type='{kind}' to='{to}' id='{id}'><body>{body}</body></message>")
            }
            // references to messages nobody knows
            4 => {
                let r = format!("unknown-{}", rng.next());
                let payloads = [
                    format!("<replace xmlns='urn:xmpp:message-correct:0' id='{r}'/><body>fixed</body>"),
                    format!("<retract xmlns='urn:xmpp:message-retract:1' id='{r}'/>"),
                    format!(
                        "<reactions xmlns='urn:xmpp:reactions:0' id='{r}'><reaction>\u{1F44D}</reaction></reactions>"
                    ),
                    format!("<displayed xmlns='urn:xmpp:chat-markers:0' id='{r}'/>"),
                    format!("<reply xmlns='urn:xmpp:reply:0' to='{room}/nobody' id='{r}'/><body>re</body>"),
                    "<composing xmlns='http://jabber.org/protocol/chatstates'/>".to_owned(),
                ];
                let payload = rng.pick(&payloads);
                format!("<message type='groupchat' to='{room}' id='{id}'>{payload}</message>")
            }
            // unknown payloads, deep nesting, huge attributes
            5 => {
                let depth = 1 + rng.below(120);
                // (within Prosody's stanza size limit of 256 KiB)
                let long_name = "n".repeat(if depth <= 5 && rng.below(2) == 0 { 10_000 } else { 1 });
                let open: String = (0..depth).map(|d| format!("<e{d}{long_name} xmlns='urn:example:deep'>")).collect();
                let close: String = (0..depth).rev().map(|d| format!("</e{d}{long_name}>")).collect();
                let attr = "v".repeat(rng.below(20_000));
                format!("<message type='groupchat' to='{room}' id='{id}' x-junk='{attr}'>{open}{close}</message>")
            }
            // iq of every type, with and without children, to every address
            6..=7 => {
                let kind = rng.pick(&["get", "set", "result", "error"]);
                let ns = rng.pick(&namespaces);
                let child = match rng.below(4) {
                    0 => String::new(),
                    1 => format!("<query xmlns='{ns}'/>"),
                    2 => format!(
                        "<query xmlns='{ns}'><set xmlns='http://jabber.org/protocol/rsm'><max>{}</max><before>nope</before></set></query>",
                        rng.pick(&["-1", "abc", "99999999999", "0"])
                    ),
                    _ => format!(
                        "<command xmlns='http://jabber.org/protocol/commands' node='{}' sessionid='{}' action='{}'/>",
                        rng.pick(&["status", "leave", "configure", "nope", ""]),
                        rng.next(),
                        rng.pick(&["execute", "next", "complete", "cancel", "bogus"])
                    ),
                };
                format!("<iq type='{kind}' to='{to}' id='{id}'>{child}</iq>")
            }
            // MAM queries with bogus filters
            8 => format!(
                "<iq type='set' to='{room}' id='{id}'><query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>urn:xmpp:mam:2</value></field><field var='start'><value>{}</value></field><field var='with'><value>{}</value></field></x></query></iq>",
                rng.pick(&["yesterday", "2026-13-45T99:99:99Z", "0", ""]),
                escape(rng.pick::<String>(&targets))
            ),
            // presence junk (never a nick change in the room: that is a legitimate action)
            9 => {
                let kind = rng.pick(&["subscribe", "unsubscribe", "probe", "error", "unsubscribed"]);
                format!("<presence type='{kind}' to='{to}' id='{id}'/>")
            }
            // joins to rooms on servers the gateway must not reach
            10 => format!(
                "<presence to='{}/x' id='{id}'><x xmlns='http://jabber.org/protocol/muc'/></presence>",
                escape(rng.pick::<String>(&[format!("#x%evil.example@{gw}"), format!("%@{gw}"), format!("#@{gw}")]))
            ),
            // a message without a body, or with several
            _ => format!(
                "<message type='groupchat' to='{room}' id='{id}'><body/><body>a</body><body xml:lang='xx'>b</body><subject/></message>"
            ),
        };
        out.push(stanza);
    }
    out
}

#[tokio::test]
async fn hostile_xmpp_stanzas_never_hurt() -> Result<()> {
    let s = IrcSetup::start_xmpp(XmppServerKind::Prosody, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/hostile", "alicepass").await?;
    alice.join(&room, "alice").await?;
    alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/alice") && st.has_status(110)).await?;
    let pid = s.gateway.pid().context("gateway pid")?;
    let rss_before = rss_kb(pid);

    let corpus = xmpp_corpus(&room, 5000);
    for stanza in &corpus {
        alice.send_raw(stanza).await?;
    }
    alice.send_groupchat(&room, "sentinel after the corpus").await?;
    if let Err(e) =
        bob.expect_line(Duration::from_secs(120), |l| l.ends_with("PRIVMSG #test :sentinel after the corpus")).await
    {
        let log = s.gateway.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        anyhow::bail!(
            "{e:#}\nfirst problems:\n{}\nlog tail (newest first):\n{}",
            first_problems(&log),
            tail.join("\n")
        );
    }
    // alice still gets what IRC says
    bob.privmsg("#test", "still there?").await?;
    alice.expect(T, |st| st.kind == "message" && st.body.as_deref() == Some("still there?")).await?;
    // an unlisted server is refused with an error, and never contacted
    alice
        .send_raw(&format!("<message type='chat' to='x%evil.example@{IRC_DOMAIN}' id='last'><body>hi</body></message>"))
        .await?;
    let refusal = alice.expect(T, |st| st.kind == "message" && st.id == "last").await?;
    assert_eq!(refusal.type_, "error", "unlisted server refused: {}", refusal.xml);
    assert!(refusal.xml.contains("not one this gateway connects to"), "the refusal says why: {}", refusal.xml);

    let rss_after = rss_kb(pid);
    let log = s.gateway.log();
    let links = log.matches("component link established").count();
    let panics = log.matches("panicked").count();
    let from_alice: Vec<&String> = bob.seen().iter().filter(|l| l.starts_with(":alice!")).collect();
    let stray: Vec<&&String> = from_alice
        .iter()
        .filter(|l| {
            let command = l.split(' ').nth(1).unwrap_or("");
            let target = l.split(' ').nth(2).unwrap_or("");
            !(matches!(command, "PRIVMSG" | "NOTICE") && (target == "#test" || target == "bob"))
        })
        .skip_while(|l| l.ends_with(" JOIN :#test")) // alice's own join, before the corpus
        .collect();
    println!(
        "hostile XMPP corpus: {} stanzas sent; {} lines from alice on IRC, {} of them not a message to #test or bob; component link established {links} time(s); {panics} panics; gateway RSS {rss_before} → {rss_after} kB",
        corpus.len(),
        from_alice.len(),
        stray.len()
    );
    assert!(stray.is_empty(), "no hostile body became an IRC command: {stray:#?}");
    assert!(
        !bob.seen().iter().any(|l| l.contains(" QUIT ") && l.starts_with(":alice!")),
        "alice's IRC connection stayed up"
    );
    assert_eq!(links, 1, "the component link never dropped");
    assert_eq!(panics, 0, "nothing panicked");
    let contacted: Vec<&str> =
        log.lines().filter(|l| l.contains("opening IRC connection") && l.contains("evil.example")).take(3).collect();
    assert!(contacted.is_empty(), "no connection to an unlisted server was attempted: {contacted:#?}");
    assert!(rss_after < rss_before + 64 * 1024, "memory stayed bounded: {rss_before} → {rss_after} kB");
    alice.disconnect().await;
    Ok(())
}

/// Lines an IRC user could send in a channel or to a person: raw bytes after `PRIVMSG target :`.
fn irc_payloads() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = vec![
        b"\xff\xfe invalid".to_vec(),
        b"lone \x80 continuation".to_vec(),
        b"overlong \xc0\xaf slash".to_vec(),
        b"truncated \xe2\x82".to_vec(),
        "U+FFFE \u{fffe} and U+FFFF \u{ffff}".as_bytes().to_vec(),
        b"controls \x02\x0b\x0c\x0e\x0f\x10\x11\x1b[31m\x1f\x7f end".to_vec(),
        b"\x03".to_vec(),
        b"\x0399,99colour".to_vec(),
        b"\x03,5comma".to_vec(),
        b"\x04FF00FFhex\x04".to_vec(),
        b"\x16reverse\x1d\x1e\x11".to_vec(),
        b"\x01ACTION unterminated".to_vec(),
        b"\x01ACTION\x01".to_vec(),
        b"\x01VERSION\x01".to_vec(),
        b"\x01DCC SEND x 1 2 3\x01".to_vec(),
        b"\x01\x01\x01".to_vec(),
        b"<script>&amp;]]></body></message><message to='admin@localhost'>".to_vec(),
        b"&#0; &#xD800; &bogus;".to_vec(),
        b"]]>".to_vec(),
        "\u{202e}rtl \u{200b}zw \u{1F600}".as_bytes().to_vec(),
    ];
    v.push(vec![b'x'; 400]);
    v.push("é".repeat(200).into_bytes());
    v
}

#[tokio::test]
async fn hostile_irc_lines_never_hurt() -> Result<()> {
    let s = IrcSetup::start_xmpp(XmppServerKind::Prosody, "").await?;
    let room = room("#test");
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/hostile", "alicepass").await?;
    alice.join(&room, "alice").await?;
    alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/alice") && st.has_status(110)).await?;
    let mut mallory = IrcClient::connect(s.irc.port(), "mallory").await?;
    mallory.join("#test").await?;
    alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/mallory")).await?;
    let pid = s.gateway.pid().context("gateway pid")?;
    let rss_before = rss_kb(pid);

    let mut rng = Rng(0x5eed_0002);
    let payloads = irc_payloads();
    let nicks = ["m[a]l", "m`x", "m^_|", "m{}\\", "mallory"];
    let n = 5000;
    for i in 0..n {
        let payload = rng.pick(&payloads).clone();
        let mut line: Vec<u8> = match rng.below(10) {
            0..=4 => b"PRIVMSG #test :".to_vec(),
            5 => b"NOTICE #test :".to_vec(),
            6 => b"PRIVMSG alice :".to_vec(),
            7 => b"NOTICE alice :".to_vec(),
            8 => b"TOPIC #test :".to_vec(),
            _ if i % 50 == 0 => format!("NICK {}\r\n", rng.pick(&nicks)).into_bytes(),
            _ => b"PRIVMSG #test :".to_vec(),
        };
        if !line.ends_with(b"\r\n") {
            line.extend_from_slice(&payload);
            line.extend_from_slice(b"\r\n");
        }
        mallory.send_bytes(&line).await?;
    }
    mallory.privmsg("#test", "sentinel after the corpus").await?;
    alice
        .expect(Duration::from_secs(120), |st| {
            st.kind == "message" && st.body.as_deref() == Some("sentinel after the corpus")
        })
        .await?;
    // and the other way still works
    alice.send_groupchat(&room, "alice is fine").await?;
    mallory.expect_line(T, |l| l.ends_with("PRIVMSG #test :alice is fine")).await?;

    let rss_after = rss_kb(pid);
    let log = s.gateway.log();
    let links = log.matches("component link established").count();
    let panics = log.matches("panicked").count();
    let prosody_log = match &s.prosody {
        XmppServer::Prosody(p) => std::fs::read_to_string(p.log_path()).unwrap_or_default(),
        _ => String::new(),
    };
    let xml_errors = prosody_log.matches("not-well-formed").count() + prosody_log.matches("invalid-xml").count();
    println!(
        "hostile IRC corpus: {n} lines sent; component link established {links} time(s); {xml_errors} XML errors at Prosody; {panics} panics; gateway RSS {rss_before} → {rss_after} kB"
    );
    assert_eq!(xml_errors, 0, "nothing from IRC made the gateway send bad XML");
    assert_eq!(links, 1, "the component link never dropped:\n{}", first_problems(&log));
    assert_eq!(panics, 0, "nothing panicked");
    assert!(rss_after < rss_before + 64 * 1024, "memory stayed bounded: {rss_before} → {rss_after} kB");
    alice.disconnect().await;
    Ok(())
}

/// Malformed XML, one connection each, to the embedded server.
fn malformed_xml(rng: &mut Rng) -> Vec<u8> {
    let header = b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>".to_vec();
    let with_header = |rest: &[u8]| -> Vec<u8> {
        let mut v = header.clone();
        v.extend_from_slice(rest);
        v
    };
    match rng.below(14) {
        0 => (0..rng.below(4096)).map(|_| rng.next() as u8).collect(),
        1 => with_header(&(0..rng.below(4096)).map(|_| rng.next() as u8).collect::<Vec<_>>()),
        2 => with_header(b"<message><body>unclosed"),
        3 => with_header(&b"<a>".repeat(20_000)),
        4 => b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;&lol;&lol;'>]><stream:stream xmlns:stream='http://etherx.jabber.org/streams'>&lol2;".to_vec(),
        5 => with_header(b"<message to='a@b' to='c@d'/>"),
        6 => with_header(b"<undeclared:message/>"),
        7 => with_header(b"<m\xff\xfe/>"),
        8 => b"<stream:stream xmlns='jabber:server' xmlns:stream='http://wrong.example'>".to_vec(),
        9 => with_header(&header),
        10 => b"</stream:stream>".to_vec(),
        11 => with_header(b"<iq type='get' id='1'><query xmlns='jabber:iq:roster'/></iq>"),
        12 => with_header(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!!not base64!!!</auth>"),
        _ => with_header(b"<message>&#0;&#xFFFE;&undefined;</message>"),
    }
}

#[tokio::test]
async fn malformed_xml_never_hurts_the_embedded_server() -> Result<()> {
    let s = IrcSetup::start_xmpp(XmppServerKind::Embedded, "").await?;
    let port = s.prosody.c2s_port();
    let pid = s.gateway.pid().context("gateway pid")?;
    let rss_before = rss_kb(pid);
    let mut rng = Rng(0x5eed_0003);
    let mut tasks = Vec::new();
    let connections = 300;
    for _ in 0..connections {
        let payload = malformed_xml(&mut rng);
        tasks.push(tokio::spawn(async move {
            let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return anyhow::Ok((false, false, true));
            };
            let _ = tcp.write_all(&payload).await;
            // The server answers (a stream error) and closes, or waits for more: either is fine,
            // as long as it neither crashes nor holds this connection's input unbounded.
            let mut answer = Vec::new();
            let closed =
                matches!(tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await, Ok(Ok(_)));
            anyhow::Ok((closed, String::from_utf8_lossy(&answer).contains("stream:error"), false))
        }));
    }
    let (mut closed, mut stream_errors, mut refused) = (0, 0, 0);
    for t in tasks {
        let (c, e, r) = t.await??;
        closed += usize::from(c);
        stream_errors += usize::from(e);
        refused += usize::from(r);
    }
    assert_eq!(
        refused,
        0,
        "every connection was accepted:\n{}",
        s.gateway.log().lines().rev().take(15).collect::<Vec<_>>().join("\n")
    );
    // The server still serves: a real client logs in and the IRC path works.
    let log = s.gateway.log();
    anyhow::ensure!(
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok(),
        "the embedded server stopped accepting connections; log ends:\n{}",
        log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/after", "alicepass").await?;
    alice.join(&room, "alice").await?;
    alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/alice") && st.has_status(110)).await?;
    alice.send_groupchat(&room, "after the malformed XML").await?;
    bob.expect_line(T, |l| l.ends_with("PRIVMSG #test :after the malformed XML")).await?;
    let rss_after = rss_kb(pid);
    let panics = s.gateway.log().matches("panicked").count();
    println!(
        "malformed XML: {connections} connections; {closed} closed by the server ({stream_errors} with a stream error), {} still waiting after 10 s; {panics} panics; gateway RSS {rss_before} → {rss_after} kB",
        connections - closed
    );
    assert_eq!(panics, 0, "nothing panicked");
    assert!(closed >= connections * 3 / 4, "most malformed streams are closed by the server ({closed}/{connections})");
    assert!(rss_after < rss_before + 64 * 1024, "memory stayed bounded: {rss_before} → {rss_after} kB");
    alice.disconnect().await;
    Ok(())
}
