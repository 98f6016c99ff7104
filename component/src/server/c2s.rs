//! One client connection to the embedded server (RFC 6120): stream header,
//! STARTTLS, SASL (SCRAM-SHA-256, SCRAM-SHA-1, PLAIN over TLS only), resource
//! binding, legacy session, then stanzas both ways until the stream ends. The
//! stanza size limit is enforced on the bytes read between two elements.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::nesting::{NestingCounter, Refused};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::{SinkExt, StreamExt};
use sasl::common::scram::{Sha1, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, BufStream, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::bind::BindFeature;
use tokio_xmpp::parsers::starttls::StartTls;
use tokio_xmpp::parsers::stream_error::{DefinedCondition, StreamError};
use tokio_xmpp::parsers::stream_features::StreamFeatures;
use tokio_xmpp::xmlstream::{AcceptedStream, ReadError, StreamHeader, Timeouts, XmlStream, accept_stream};
use tracing::{debug, info, warn};

use super::Server;
use super::accounts;
use super::scram;
use super::xml::{self, BIND, CLIENT, SASL, SESSION, TLS, elem, with_child, with_text};

/// The transport under the XML stream: TCP, then TLS over it.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Counts bytes read since the last complete element; past the limit, reading fails.
struct Limited {
    conn: Conn,
    read: Arc<AtomicUsize>,
    limit: usize,
    nesting: NestingCounter,
}

impl AsyncRead for Limited {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.read.load(Ordering::Relaxed) > self.limit {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, TooLarge)));
        }
        if let Some(refused) = self.nesting.refused() {
            // Refused in an earlier read, whose bytes before the refused one were passed on.
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, refused)));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        let r = match &mut this.conn {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let Poll::Ready(Ok(())) = r {
            this.read.fetch_add(buf.filled().len() - before, Ordering::Relaxed);
            match this.nesting.scan(&buf.filled()[before..]) {
                Ok(()) => {}
                // Nothing from the refused byte on reaches the parser: the tree never grows
                // past the limit. What came before it does (the stream header among it, so
                // that the stream error can be sent), and the next read fails.
                Err((0, refused)) => {
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, refused)));
                }
                Err((passed, _)) => buf.set_filled(before + passed),
            }
        }
        r
    }
}

impl AsyncWrite for Limited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.conn {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, data),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.conn {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.conn {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[derive(Debug)]
struct TooLarge;
impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stanza larger than the limit")
    }
}
impl std::error::Error for TooLarge {}

type Io = BufStream<Limited>;
type Stream = XmlStream<Io, Element>;

/// Where the negotiation stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Fresh,
    Authenticated,
}

struct Negotiation {
    tls: bool,
    /// SASL allowed without TLS (a loopback client, when the configuration allows it).
    plain_auth: bool,
    phase: Phase,
    user: Option<String>,
    ip: IpAddr,
}

const TIMEOUTS: Timeouts =
    Timeouts { read_timeout: Duration::from_secs(240), response_timeout: Duration::from_secs(60) };

/// Serve one client connection until it ends.
pub async fn serve(server: Arc<Server>, tcp: TcpStream, direct_tls: bool) {
    let addr = tcp.peer_addr().ok();
    let ip = addr.map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    let peer = addr.map(|a| a.to_string()).unwrap_or_default();
    let _ = tcp.set_nodelay(true);
    let (ticket, evicted) = server.gate.admit(ip);
    if evicted > 0 {
        info!(%peer, evicted, pending = server.gate.pending(), "too many connections not logged in: closed the oldest");
    }
    let read = Arc::new(AtomicUsize::new(0));
    let deadline = Duration::from_secs(server.gate.limits().login_secs);
    let bound = tokio::select! {
        r = tokio::time::timeout(deadline, log_in(&server, tcp, direct_tls, ip, &read, &peer)) => match r {
            Ok(Some(bound)) => bound,
            Ok(None) => return,
            Err(_) => {
                info!(%peer, seconds = deadline.as_secs(), "not logged in in time; closing the connection");
                return;
            }
        },
        _ = ticket.evicted.cancelled() => {
            debug!(%peer, "closed to make room for newer connections");
            return;
        }
    };
    ticket.logged_in();
    let (stream, full) = bound;
    session(&server, stream, full, &read, &peer).await;
}

/// TLS (direct or STARTTLS), SASL and resource binding, with the TLS handshake
/// under its own deadline: the bound stream and its full JID, or `None`.
async fn log_in(
    server: &Arc<Server>,
    tcp: TcpStream,
    direct_tls: bool,
    ip: IpAddr,
    read: &Arc<AtomicUsize>,
    peer: &str,
) -> Option<(Stream, String)> {
    let limit = server.max_stanza_bytes;
    let handshake = Duration::from_secs(server.gate.limits().tls_handshake_secs);
    let tls_accept = |tcp: TcpStream| async move {
        match tokio::time::timeout(handshake, server.tls.acceptor.accept(tcp)).await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                debug!(%peer, "TLS handshake not finished in time");
                None
            }
        }
    };
    let conn = if direct_tls { Conn::Tls(Box::new(tls_accept(tcp).await?)) } else { Conn::Plain(tcp) };
    let io = BufStream::new(Limited { conn, read: read.clone(), limit, nesting: NestingCounter::default() });
    let mut accepted = match accept_stream(io, CLIENT, TIMEOUTS).await {
        Ok(a) => a,
        Err(e) => {
            debug!(%peer, error = %e, "no stream header");
            return None;
        }
    };
    let plain_auth = server.plaintext_auth_on_loopback && ip.is_loopback();
    let mut state = Negotiation { tls: direct_tls, plain_auth, phase: Phase::Fresh, user: None, ip };
    loop {
        match negotiate(server, accepted, &mut state, read, peer).await {
            Step::Restart(a) => accepted = a,
            Step::Bound(stream, full) => return Some((stream, full)),
            Step::StartTls(io) => {
                let Limited { conn, .. } = io.into_inner();
                let Conn::Plain(tcp) = conn else { return None };
                let tls = tls_accept(tcp).await?;
                state.tls = true;
                read.store(0, Ordering::Relaxed);
                let io = BufStream::new(Limited {
                    conn: Conn::Tls(Box::new(tls)),
                    read: read.clone(),
                    limit,
                    nesting: NestingCounter::default(),
                });
                accepted = accept_stream(io, CLIENT, TIMEOUTS).await.ok()?;
            }
            Step::End => return None,
        }
    }
}

enum Step {
    Restart(AcceptedStream<Io>),
    StartTls(Io),
    Bound(Stream, String),
    End,
}

async fn stream_error(stream: &mut Stream, condition: DefinedCondition, text: &str) {
    let error = StreamError::new(condition, "en", text);
    let _ = stream.send(&error).await;
    let _ = stream.shutdown().await;
}

async fn negotiate(
    server: &Server,
    mut accepted: AcceptedStream<Io>,
    state: &mut Negotiation,
    read: &AtomicUsize,
    peer: &str,
) -> Step {
    let to = accepted.take_header().to.map(|t| t.into_owned());
    let id = uuid::Uuid::new_v4().simple().to_string();
    let header = StreamHeader { from: Some(server.domain.clone().into()), to: None, id: Some(id.into()) };
    let pending = match accepted.send_header(header).await {
        Ok(p) => p,
        Err(_) => return Step::End,
    };
    if to.as_deref().map(str::to_lowercase).as_deref() != Some(server.domain.as_str()) {
        let text = format!("this server serves {}", server.domain);
        let _ = pending.send_error(&StreamError::new(DefinedCondition::HostUnknown, "en", text)).await;
        return Step::End;
    }
    let mut features = StreamFeatures::default();
    match state.phase {
        Phase::Fresh => {
            // No mechanism before TLS (RFC 6120 §13.8): a password is never offered up in clear.
            if !state.tls {
                features.starttls = Some(StartTls { required: !state.plain_auth });
            }
            if state.tls || state.plain_auth {
                features.sasl_mechanisms.insert("SCRAM-SHA-256".into());
                features.sasl_mechanisms.insert("SCRAM-SHA-1".into());
            }
            if state.tls {
                features.sasl_mechanisms.insert("PLAIN".into());
            }
        }
        Phase::Authenticated => {
            features.bind = Some(BindFeature { required: true });
            features.others.push(with_child(Element::bare("session", SESSION), Element::bare("optional", SESSION)));
        }
    }
    let mut stream: Stream = match pending.send_features(&features).await {
        Ok(s) => s,
        Err(_) => return Step::End,
    };
    let mut failures = 0;
    loop {
        let el = match next(&mut stream, read).await {
            Next::Element(el) => el,
            Next::TooLarge(text) => {
                warn!(%peer, %text, "stanza over a limit during negotiation; closing the stream");
                stream_error(&mut stream, DefinedCondition::PolicyViolation, &text).await;
                return Step::End;
            }
            Next::Restricted(text) => {
                warn!(%peer, %text, "forbidden XML during negotiation; closing the stream");
                stream_error(&mut stream, DefinedCondition::RestrictedXml, &text).await;
                return Step::End;
            }
            Next::Malformed(e) => {
                stream_error(&mut stream, DefinedCondition::NotWellFormed, &e).await;
                return Step::End;
            }
            Next::End => return Step::End,
        };
        match (state.phase, el.name(), el.ns().as_str()) {
            (Phase::Fresh, "starttls", TLS) if !state.tls => {
                if stream.send(&Element::bare("proceed", TLS)).await.is_err() {
                    return Step::End;
                }
                return Step::StartTls(stream.into_inner());
            }
            (Phase::Fresh, "auth", SASL) if !state.tls && !state.plain_auth => {
                let f = with_child(Element::bare("failure", SASL), Element::bare("encryption-required", SASL));
                let text = "use STARTTLS first: no password is taken on a stream without TLS";
                let f = with_child(f, with_text(elem("text", SASL, &[("xml:lang", "en")]), text));
                if stream.send(&f).await.is_err() {
                    return Step::End;
                }
            }
            (Phase::Fresh, "auth", SASL) => {
                match authenticate(server, &mut stream, &el, state.tls, read, state.ip, peer).await {
                    Ok(Some((user, success))) => {
                        info!(%peer, %user, "authenticated");
                        state.user = Some(user);
                        state.phase = Phase::Authenticated;
                        read.store(0, Ordering::Relaxed);
                        // A restart by hand rather than `accept_reset`: some clients (go-xmpp)
                        // send whitespace before the new header, which a reset parser refuses.
                        if stream.send(&success).await.is_err() {
                            return Step::End;
                        }
                        let mut io = stream.into_inner();
                        // A new stream: it may open with an XML declaration again.
                        io.get_mut().nesting = NestingCounter::default();
                        return match skip_whitespace(&mut io).await {
                            Ok(()) => match accept_stream(io, CLIENT, TIMEOUTS).await {
                                Ok(a) => Step::Restart(a),
                                Err(e) => {
                                    debug!(%peer, error = %e, "no stream restart after authentication");
                                    Step::End
                                }
                            },
                            Err(_) => Step::End,
                        };
                    }
                    Ok(None) => {
                        failures += 1;
                        if failures >= 3 {
                            warn!(%peer, "three failed logins on one connection; closing it");
                            stream_error(&mut stream, DefinedCondition::PolicyViolation, "too many failed logins")
                                .await;
                            return Step::End;
                        }
                    }
                    Err(()) => return Step::End,
                }
            }
            (Phase::Authenticated, "iq", CLIENT) if el.get_child("bind", BIND).is_some() => {
                let Some(user) = state.user.clone() else { return Step::End };
                let wanted = el
                    .get_child("bind", BIND)
                    .and_then(|b| b.get_child("resource", BIND))
                    .map(|r| r.text())
                    .filter(|r| !r.trim().is_empty());
                let Some(full) = server.bind_resource(&user, wanted) else {
                    let text = format!("{} clients of this account are connected already", super::MAX_RESOURCES);
                    let error = xml::error_reply(&el, "wait", "resource-constraint", Some(&text));
                    let _ = stream.send(&error).await;
                    continue;
                };
                let jid = with_text(Element::bare("jid", BIND), &full);
                let mut reply = xml::iq_result(&el, Some(with_child(Element::bare("bind", BIND), jid)));
                xml::set_attr(&mut reply, "from", None);
                xml::set_attr(&mut reply, "to", None);
                if stream.send(&reply).await.is_err() {
                    server.unbind(&full);
                    return Step::End;
                }
                return Step::Bound(stream, full);
            }
            _ => {
                let text = match state.phase {
                    Phase::Fresh => "authenticate first (SASL)",
                    Phase::Authenticated => "bind a resource first",
                };
                stream_error(&mut stream, DefinedCondition::NotAuthorized, text).await;
                return Step::End;
            }
        }
    }
}

/// Drop whitespace the client sent between two streams.
async fn skip_whitespace(io: &mut Io) -> io::Result<()> {
    use tokio::io::AsyncBufReadExt;
    loop {
        let buf = io.fill_buf().await?;
        if buf.is_empty() {
            return Ok(());
        }
        let n = buf.iter().take_while(|b| b.is_ascii_whitespace()).count();
        let done = n < buf.len();
        io.consume(n);
        if done {
            return Ok(());
        }
    }
}

enum Next {
    Element(Element),
    /// Over the size or depth limit: the text says which.
    TooLarge(String),
    /// Markup XMPP forbids (comments, processing instructions, declarations).
    Restricted(String),
    Malformed(String),
    End,
}

async fn next(stream: &mut Stream, read: &AtomicUsize) -> Next {
    loop {
        match stream.next().await {
            Some(Ok(el)) => {
                read.store(0, Ordering::Relaxed);
                return Next::Element(el);
            }
            Some(Err(ReadError::SoftTimeout)) => {
                // Ask the client for a sign of life (XEP-0199); the hard timeout follows.
                let ping = elem("iq", CLIENT, &[("type", "get"), ("id", "c2s-keepalive")]);
                let _ = stream.send(&with_child(ping, Element::bare("ping", xml::PING))).await;
            }
            Some(Err(ReadError::HardError(e))) if e.get_ref().is_some_and(|i| i.is::<TooLarge>()) => {
                return Next::TooLarge(e.to_string());
            }
            Some(Err(ReadError::HardError(e))) if e.get_ref().is_some_and(|i| i.is::<Refused>()) => {
                return match e.get_ref().and_then(|i| i.downcast_ref::<Refused>()) {
                    Some(Refused::Restricted(_)) => Next::Restricted(e.to_string()),
                    _ => Next::TooLarge(e.to_string()),
                };
            }
            Some(Err(ReadError::ParseError(e))) => return Next::Malformed(e.to_string()),
            Some(Err(ReadError::HardError(e))) if e.kind() == io::ErrorKind::InvalidData => {
                return Next::Malformed(e.to_string());
            }
            Some(Err(_)) | None => return Next::End,
        }
    }
}

/// Run one SASL exchange. `Ok(Some)`: the account and the `<success/>` to send;
/// `Ok(None)`: failed (the failure was sent); `Err`: the stream is gone.
async fn authenticate(
    server: &Server,
    stream: &mut Stream,
    auth: &Element,
    tls: bool,
    read: &AtomicUsize,
    ip: IpAddr,
    peer: &str,
) -> Result<Option<(String, Element)>, ()> {
    let mechanism = auth.attr("mechanism").unwrap_or_default().to_owned();
    let initial = decode(&auth.text());
    let fail = |condition: &str, text: &str| {
        let f = with_child(Element::bare("failure", SASL), Element::bare(condition, SASL));
        with_child(f, with_text(elem("text", SASL, &[("xml:lang", "en")]), text))
    };
    let Some(initial) = initial else {
        stream.send(&fail("incorrect-encoding", "not base64")).await.map_err(|_| ())?;
        return Ok(None);
    };
    let scram_first = match mechanism.as_str() {
        "PLAIN" => None,
        "SCRAM-SHA-1" | "SCRAM-SHA-256" => match scram::parse_client_first(&initial) {
            Ok(first) => Some(first),
            Err(e) => {
                stream.send(&fail("malformed-request", &e.to_string())).await.map_err(|_| ())?;
                return Ok(None);
            }
        },
        _ => {
            stream
                .send(&fail("invalid-mechanism", "offered: SCRAM-SHA-256, SCRAM-SHA-1, PLAIN"))
                .await
                .map_err(|_| ())?;
            return Ok(None);
        }
    };
    if mechanism == "PLAIN" && !tls {
        stream
            .send(&fail("encryption-required", "PLAIN is only accepted over TLS: use STARTTLS first"))
            .await
            .map_err(|_| ())?;
        return Ok(None);
    }
    // PLAIN is `authzid NUL authcid NUL password`: with a NUL missing, the password
    // would be taken for the user name (and logged as one), so it is refused as it is.
    if scram_first.is_none() && initial.iter().filter(|&&b| b == 0).count() != 2 {
        stream
            .send(&fail("malformed-request", "PLAIN takes authzid, NUL, user name, NUL, password"))
            .await
            .map_err(|_| ())?;
        return Ok(None);
    }
    let username = match &scram_first {
        Some(first) => Some(first.username.clone()),
        None => initial.split(|&b| b == 0).nth(1).map(|u| String::from_utf8_lossy(u).into_owned()),
    };
    let Some(username) = username.filter(|u| !u.is_empty() && !u.contains('@')) else {
        stream.send(&fail("malformed-request", "no username")).await.map_err(|_| ())?;
        return Ok(None);
    };
    let jid = format!("{}@{}", username.to_lowercase(), server.domain);
    // An authorization identity, if given, must be the account itself.
    let authzid = match &scram_first {
        Some(first) => first.authzid.clone(),
        None => initial.split(|&b| b == 0).next().map(|a| String::from_utf8_lossy(a).into_owned()),
    };
    if authzid.is_some_and(|a| !a.is_empty() && !a.eq_ignore_ascii_case(&jid)) {
        stream.send(&fail("invalid-authzid", "you may only act as your own account")).await.map_err(|_| ())?;
        return Ok(None);
    }
    let known = match accounts::lookup(&server.store, &server.listed_users, &jid).await {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot read accounts");
            stream.send(&fail("temporary-auth-failure", "the account store is unavailable")).await.map_err(|_| ())?;
            return Ok(None);
        }
    };
    // A failed login is logged for fail2ban (docs/security.md) and answered after a delay
    // that grows with each failure from this address or for this account.
    let refused = |jid: &str| {
        warn!(client_ip = %ip, %peer, user = %jid, mechanism = %mechanism, "authentication failed");
        let delay = server.gate.failed(ip, jid);
        (delay, fail("not-authorized", "wrong user name or password"))
    };
    let Some(first) = scram_first else {
        // PLAIN: authzid NUL authcid NUL password, checked in constant time.
        let password = initial.split(|&b| b == 0).nth(2).map(|p| String::from_utf8_lossy(p).into_owned());
        return match (known, password) {
            (Some(c), Some(p)) if c.check(&p) => {
                server.gate.succeeded(&jid);
                Ok(Some((jid, Element::bare("success", SASL))))
            }
            _ => {
                let (delay, failure) = refused(&jid);
                tokio::time::sleep(delay).await;
                stream.send(&failure).await.map_err(|_| ())?;
                Ok(None)
            }
        };
    };
    let fake_key = &server.auth_fake_key;
    let iterations = server.scram_iterations;
    // Each mechanism's exchange, as one closure over the client's final message.
    type Finish = Box<dyn FnOnce(&[u8]) -> Result<Vec<u8>, scram::ScramError> + Send>;
    let (challenge, finish): (Vec<u8>, Finish) = if mechanism == "SCRAM-SHA-1" {
        let secret = known.as_ref().map(|c| scram::StoredSecret {
            salt: &c.sha1.salt,
            iterations: c.sha1.iterations,
            salted_password: &c.sha1.digest,
        });
        let (exchange, challenge) = scram::Exchange::<Sha1>::start(first, secret, fake_key, iterations);
        (challenge, Box::new(move |m| exchange.finish(m)))
    } else {
        let secret = known.as_ref().map(|c| scram::StoredSecret {
            salt: &c.sha256.salt,
            iterations: c.sha256.iterations,
            salted_password: &c.sha256.digest,
        });
        let (exchange, challenge) = scram::Exchange::<Sha256>::start(first, secret, fake_key, iterations);
        (challenge, Box::new(move |m| exchange.finish(m)))
    };
    let c = with_text(Element::bare("challenge", SASL), &B64.encode(challenge));
    stream.send(&c).await.map_err(|_| ())?;
    let response = match next(stream, read).await {
        Next::Element(el) if el.is("response", SASL) => match decode(&el.text()) {
            Some(d) => d,
            None => {
                stream.send(&fail("incorrect-encoding", "not base64")).await.map_err(|_| ())?;
                return Ok(None);
            }
        },
        Next::Element(el) if el.is("abort", SASL) => {
            stream.send(&fail("aborted", "aborted")).await.map_err(|_| ())?;
            return Ok(None);
        }
        _ => return Err(()),
    };
    match finish(&response) {
        Ok(server_final) => {
            server.gate.succeeded(&jid);
            let mut success = Element::bare("success", SASL);
            success.append_text(B64.encode(server_final));
            Ok(Some((jid, success)))
        }
        Err(scram::ScramError::AuthenticationFailed) => {
            let (delay, failure) = refused(&jid);
            tokio::time::sleep(delay).await;
            stream.send(&failure).await.map_err(|_| ())?;
            Ok(None)
        }
        Err(e) => {
            debug!(%peer, user = %jid, error = %e, "malformed SCRAM response");
            stream.send(&fail("malformed-request", &e.to_string())).await.map_err(|_| ())?;
            Ok(None)
        }
    }
}

/// SASL payloads: base64, with `=` meaning empty.
fn decode(text: &str) -> Option<Vec<u8>> {
    let t = text.trim();
    if t.is_empty() || t == "=" {
        return Some(Vec::new());
    }
    B64.decode(t).ok()
}

/// The bound session: stanzas from the client go to the server's router; what
/// the router has for this resource goes to the client.
async fn session(server: &Arc<Server>, mut stream: Stream, full: String, read: &AtomicUsize, peer: &str) {
    let (tx, mut rx) = mpsc::channel::<Element>(super::SESSION_QUEUE);
    let congested = tokio_util::sync::CancellationToken::new();
    server.attach(&full, tx, congested.clone());
    info!(%peer, jid = %full, "session started");
    let reason = loop {
        tokio::select! {
            item = next(&mut stream, read) => match item {
                Next::Element(el) => {
                    if el.is("iq", CLIENT) && el.attr("id") == Some("c2s-keepalive") {
                        continue;
                    }
                    if el.is("iq", CLIENT) && el.get_child("session", SESSION).is_some() {
                        let mut reply = xml::iq_result(&el, None);
                        xml::set_attr(&mut reply, "from", Some(&server.domain));
                        xml::set_attr(&mut reply, "to", Some(&full));
                        if stream.send(&reply).await.is_err() { break "write failed"; }
                        continue;
                    }
                    server.handle_from_client(&full, el).await;
                }
                Next::TooLarge(text) => {
                    warn!(jid = %full, %peer, %text, "stanza over a limit; closing the stream");
                    stream_error(&mut stream, DefinedCondition::PolicyViolation, &text).await;
                    break "stanza over a limit";
                }
                Next::Restricted(text) => {
                    warn!(jid = %full, %peer, %text, "forbidden XML; closing the stream");
                    stream_error(&mut stream, DefinedCondition::RestrictedXml, &text).await;
                    break "forbidden XML";
                }
                Next::Malformed(e) => {
                    stream_error(&mut stream, DefinedCondition::NotWellFormed, &e).await;
                    break "malformed XML";
                }
                Next::End => {
                    let _ = stream.shutdown().await;
                    break "closed";
                }
            },
            out = rx.recv() => match out {
                Some(el) => {
                    // A write blocks while the client reads nothing: its queue filling up ends it.
                    tokio::select! {
                        written = stream.send(&el) => if written.is_err() { break "write failed"; },
                        _ = congested.cancelled() => {}
                    }
                }
                None => {
                    stream_error(&mut stream, DefinedCondition::Conflict, "replaced by a new session").await;
                    break "replaced";
                }
            },
            _ = congested.cancelled() => {
                let text = format!("{} stanzas waited for this client to read them; its stream is closed", super::SESSION_QUEUE);
                warn!(jid = %full, %peer, "the client does not read what is sent to it; closing its stream");
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    stream_error(&mut stream, DefinedCondition::PolicyViolation, &text),
                )
                .await;
                break "not reading";
            }
        }
    };
    info!(jid = %full, reason, "session ended");
    server.detach(&full).await;
}
