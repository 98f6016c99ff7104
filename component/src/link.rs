//! The XEP-0114 link to the XMPP server, kept up by itself.
//!
//! tokio-xmpp's `Component` neither reconnects nor survives a stanza it cannot
//! parse, so the link is built here on tokio-xmpp's `xmlstream` API: connect,
//! handshake, then read and write concurrently. A stanza that fails to parse is
//! answered with an error (when it has an id and a sender) and the link stays up;
//! silence is met with a ping through the server, well inside the read timeout;
//! any loss of the link is followed by a reconnect with exponential backoff and
//! jitter. Stanzas queued for sending while the link is down wait in the queue.
//!
//! XEP-0114 acknowledges nothing, and what the link wrote can still be in its
//! kernel's buffers when the process dies. So after the stanzas it writes, the
//! link sends an iq to itself through the server: the server handles a
//! component's stanzas in order, so when that iq comes back, everything written
//! before it was handled. Until then the copies' outbox rows stay, marked
//! written; after a crash they are written again (XMPP clients and archives
//! know a message by its stanza-id, so the server handling it twice shows it once).

use crate::nesting::Shaped;
use std::collections::VecDeque;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rand::Rng;
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_xmpp::Stanza;
use tokio_xmpp::parsers::component::Handshake;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::ping::Ping;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, ReadError, StreamElementError, StreamHeader, Timeouts, XmlStream, XmppStreamElement,
    initiate_stream,
};
use tracing::{debug, info, warn};

use tokio_xmpp::parsers::jid::Jid;

use crate::gateway::Outgoing;
use crate::stanza::parse_jid;
use isthmus_core::outbox::Receipt;

/// The start of the acknowledgement iqs' ids (the iq's number follows).
const ACK_ID: &str = "isthmus-ack-";

/// Outbox receipts of stanzas written and not yet acknowledged by the server.
#[derive(Default)]
struct Unacknowledged {
    /// Each with the number of the acknowledgement iq that settles it.
    receipts: VecDeque<(u64, Receipt)>,
    /// The number of the next acknowledgement iq.
    next: u64,
    /// An acknowledgement iq is on its way and has not come back.
    in_flight: bool,
}

impl Unacknowledged {
    fn written(&mut self, receipts: Vec<Receipt>) {
        let n = self.next;
        self.receipts.extend(receipts.into_iter().map(|r| (n, r)));
    }

    /// The acknowledgement iq to write after what was written, unless one is on its
    /// way already (its return is followed by the next one).
    fn ask(&mut self, me: &Jid) -> Option<Stanza> {
        if self.in_flight || self.receipts.back().is_none_or(|(n, _)| *n != self.next) {
            return None;
        }
        self.in_flight = true;
        let id = format!("{ACK_ID}{}", self.next);
        self.next += 1;
        Some(Stanza::Iq(Iq::from_get(id, Ping).with_to(me.clone()).with_from(me.clone())))
    }

    /// Whether `stanza` is an acknowledgement iq come back; if so, what was written
    /// before it leaves the outbox, and the next acknowledgement iq is returned.
    fn acknowledged(&mut self, stanza: &Stanza, me: &Jid) -> Option<Option<Stanza>> {
        let Stanza::Iq(iq) = stanza else { return None };
        if iq.from() != Some(me) {
            return None;
        }
        let n = iq.id().strip_prefix(ACK_ID)?.parse::<u64>().ok()?;
        self.in_flight = false;
        // The last handle of a receipt removes its row.
        while self.receipts.front().is_some_and(|(a, _)| *a <= n) {
            self.receipts.pop_front();
        }
        Some(self.ask(me))
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub domain: String,
    pub secret: String,
    pub host: String,
    pub port: u16,
    pub keepalive: Duration,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
}

/// What the link reports to the gateway. (Nearly every event is a stanza: boxing
/// it to shrink the rare others would cost an allocation per stanza.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum LinkEvent {
    /// The handshake succeeded (first time or after a reconnect).
    Up,
    /// A stanza arrived.
    Stanza(Stanza),
    /// The link went down; it is being re-established.
    Down(String),
}

/// Shaped: a hostile stanza forwarded by the server (too deep, over-long names or
/// attribute values) loses its excess instead of ending the link or the process.
type Stream = XmlStream<BufStream<Shaped<TcpStream>>, FallibleStreamElement>;

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("stream setup failed: {0}")]
    Stream(std::io::Error),
    #[error("the server sent no stream id")]
    NoStreamId,
    #[error("the server refused the component secret for this domain (check the secret and the Component block)")]
    HandshakeRefused,
    #[error("stream error from the server: {0}")]
    StreamError(String),
    #[error("the server closed the stream")]
    Closed,
    #[error("read failed: {0}")]
    Read(String),
    #[error("write failed: {0}")]
    Write(String),
    #[error("no answer to keepalive")]
    Timeout,
}

/// Run the link forever: connect, serve, reconnect. Outgoing stanzas are read from `outgoing`.
pub async fn run(config: LinkConfig, mut outgoing: mpsc::UnboundedReceiver<Outgoing>, events: mpsc::Sender<LinkEvent>) {
    let mut delay = config.reconnect_initial;
    loop {
        match connect(&config).await {
            Ok(stream) => {
                info!(domain = %config.domain, host = %config.host, port = config.port, "component link established");
                delay = config.reconnect_initial;
                if events.send(LinkEvent::Up).await.is_err() {
                    return;
                }
                let reason = serve(&config, stream, &mut outgoing, &events).await;
                warn!(domain = %config.domain, %reason, "component link lost; reconnecting");
                if events.send(LinkEvent::Down(reason.to_string())).await.is_err() {
                    return;
                }
            }
            Err(e) => warn!(domain = %config.domain, error = %e, retry_in = ?delay, "component link failed"),
        }
        tokio::time::sleep(jitter(delay)).await;
        delay = (delay * 2).min(config.reconnect_max);
    }
}

/// Spread reconnects of many links over time: 50–150 % of the delay.
fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(rand::rng().random_range(0.5..1.5))
}

async fn connect(config: &LinkConfig) -> Result<Stream, LinkError> {
    let addr = format!("{}:{}", config.host, config.port);
    let tcp = TcpStream::connect(&addr).await.map_err(|e| LinkError::Connect(addr.clone(), e))?;
    tcp.set_nodelay(true).map_err(|e| LinkError::Connect(addr.clone(), e))?;
    let timeouts = Timeouts { read_timeout: config.keepalive, response_timeout: config.keepalive };
    let header = StreamHeader { to: Some(config.domain.clone().into()), from: None, id: None };
    let mut pending = initiate_stream(BufStream::new(Shaped::new(tcp)), ns::COMPONENT, header, timeouts)
        .await
        .map_err(LinkError::Stream)?;
    let stream_id = pending.take_header().id.ok_or(LinkError::NoStreamId)?.into_owned();
    let mut stream: Stream = pending.skip_features();
    let handshake = Handshake::from_stream_id_and_password(stream_id, &config.secret);
    stream
        .send(&XmppStreamElement::ComponentHandshake(handshake))
        .await
        .map_err(|e| LinkError::Write(e.to_string()))?;
    loop {
        match stream.next().await {
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::ComponentHandshake(_)))) => return Ok(stream),
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::StreamError(e)))) => {
                return Err(if e.0.condition == tokio_xmpp::parsers::stream_error::DefinedCondition::NotAuthorized {
                    LinkError::HandshakeRefused
                } else {
                    LinkError::StreamError(format!("{:?}", e.0.condition))
                });
            }
            Some(Ok(_)) => return Err(LinkError::HandshakeRefused),
            Some(Err(ReadError::SoftTimeout)) => continue,
            Some(Err(ReadError::StreamFooterReceived)) | None => return Err(LinkError::Closed),
            Some(Err(e)) => return Err(LinkError::Read(e.to_string())),
        }
    }
}

async fn serve(
    config: &LinkConfig,
    mut stream: Stream,
    outgoing: &mut mpsc::UnboundedReceiver<Outgoing>,
    events: &mpsc::Sender<LinkEvent>,
) -> LinkError {
    let mut pings = 0u64;
    let me = own_jid(&config.domain);
    // What this connection wrote and the server has not acknowledged. Lost with the
    // link, it leaves the outbox as before: the server may have handled it.
    let mut unacknowledged = Unacknowledged::default();
    loop {
        // Reading and writing share one loop; the gateway never waits on the outgoing
        // queue (it is unbounded), so a slow reader here cannot deadlock it.
        let to_send = tokio::select! {
            item = stream.next() => match item {
                Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(stanza)))) => {
                    if let Some(next) = unacknowledged.acknowledged(&stanza, &me) {
                        next
                    } else if events.send(LinkEvent::Stanza(stanza)).await.is_err() {
                        return LinkError::Closed;
                    } else {
                        None
                    }
                }
                Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::StreamError(e)))) => {
                    return LinkError::StreamError(format!("{:?} {:?}", e.0.condition, e.0.texts));
                }
                Some(Ok(FallibleStreamElement::Ok(other))) => {
                    debug!(?other, "ignoring non-stanza element");
                    None
                }
                Some(Ok(FallibleStreamElement::Err(e))) => {
                    warn!(error = %e, "received an invalid stanza; answering with an error, link stays up");
                    invalid_stanza_reply(&config.domain, e)
                }
                Some(Err(ReadError::SoftTimeout)) => {
                    // Ping ourselves through the server: proves the whole path is alive.
                    pings += 1;
                    Some(Stanza::Iq(
                        Iq::from_get(format!("keepalive-{pings}"), Ping).with_to(me.clone()).with_from(me.clone()),
                    ))
                }
                Some(Err(ReadError::ParseError(e))) => {
                    warn!(error = %e, "unparsable element skipped");
                    None
                }
                Some(Err(ReadError::HardError(e))) if e.kind() == std::io::ErrorKind::TimedOut => return LinkError::Timeout,
                Some(Err(ReadError::HardError(e))) => return LinkError::Read(e.to_string()),
                Some(Err(ReadError::StreamFooterReceived)) | None => return LinkError::Closed,
            },
            item = outgoing.recv() => match item {
                Some(item) => {
                    // Marked written in the durable outbox (or past its gate) before it is
                    // written; out of it once the server acknowledged it.
                    let (stanzas, receipts) = Outgoing::written_batch(item, outgoing).await;
                    unacknowledged.written(receipts);
                    for stanza in stanzas.into_iter().chain(unacknowledged.ask(&me)) {
                        if let Err(e) = stream.feed(&XmppStreamElement::Stanza(stanza)).await {
                            return LinkError::Write(e.to_string());
                        }
                    }
                    if let Err(e) = SinkExt::<&XmppStreamElement>::flush(&mut stream).await {
                        return LinkError::Write(e.to_string());
                    }
                    None
                }
                None => return LinkError::Closed,
            },
        };
        if let Some(stanza) = to_send
            && let Err(e) = stream.send(&XmppStreamElement::Stanza(stanza)).await
        {
            return LinkError::Write(e.to_string());
        }
    }
}

/// The component's own JID. The domain was validated when the configuration was loaded.
fn own_jid(domain: &str) -> Jid {
    parse_jid(domain).unwrap_or_else(|| Jid::new("invalid.invalid").expect("a constant valid JID"))
}

/// The error answer to a stanza that failed to parse, when one can be addressed.
fn invalid_stanza_reply(domain: &str, error: StreamElementError) -> Option<Stanza> {
    let StreamElementError::InvalidStanza { name, header, error, .. } = error else { return None };
    if header.type_.as_deref() == Some("error") || header.type_.as_deref() == Some("result") {
        return None;
    }
    let from = parse_jid(header.from.as_deref()?)?;
    let to = header.to.as_deref().and_then(parse_jid).unwrap_or_else(|| own_jid(domain));
    let err =
        StanzaError::new(ErrorType::Modify, DefinedCondition::BadRequest, "en", format!("invalid stanza: {error}"));
    // The stanza kind is only exposed through its name.
    match name.to_string().as_str() {
        "iq" => {
            let id = header.id?;
            Some(Stanza::Iq(Iq::from_error(id, err).with_to(from).with_from(to)))
        }
        "message" => {
            let mut m = tokio_xmpp::parsers::message::Message::error(from);
            m.from = Some(to);
            m.id = header.id.map(tokio_xmpp::parsers::message::Id);
            m.payloads.push(err.into());
            Some(Stanza::Message(m))
        }
        _ => {
            let mut p = tokio_xmpp::parsers::presence::Presence::error().with_to(from).with_from(to);
            p.id = header.id;
            p.payloads.push(err.into());
            Some(Stanza::Presence(p))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::outbox::Outbox;
    use isthmus_core::store::Store;

    #[tokio::test]
    async fn rows_leave_the_outbox_when_the_server_gives_the_iq_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect(&format!("sqlite://{}/l.db", dir.path().display()), 2).await.expect("store");
        store.migrate().await.expect("migrate");
        let outbox = Outbox::spawn(store.clone());
        let me = own_jid("irc.example.org");
        let mut unacknowledged = Unacknowledged::default();
        let receipt = |n: u32| {
            let r = outbox.insert("xmpp", format!("{{\"n\":{n}}}"));
            async move {
                r.sending().await;
                r
            }
        };
        // Written: the first batch asks; the second waits for the answer.
        unacknowledged.written(vec![receipt(1).await, receipt(2).await]);
        let Some(Stanza::Iq(ask)) = unacknowledged.ask(&me) else { panic!("no acknowledgement iq") };
        unacknowledged.written(vec![receipt(3).await]);
        assert!(unacknowledged.ask(&me).is_none(), "one acknowledgement iq at a time");
        assert_eq!(store.outbox_pending().await.expect("pending").len(), 3);
        // Someone else's iq, or one that is not ours, is not an acknowledgement.
        let other = Stanza::Iq(Iq::from_get(ask.id().to_owned(), Ping).with_from(own_jid("other.example.org")));
        assert!(unacknowledged.acknowledged(&other, &me).is_none());
        let keepalive = Stanza::Iq(Iq::from_get("keepalive-1", Ping).with_from(me.clone()));
        assert!(unacknowledged.acknowledged(&keepalive, &me).is_none());
        // The iq came back: what was written before it leaves; the rest is asked for next.
        let back = Stanza::Iq(ask.clone());
        let next = unacknowledged.acknowledged(&back, &me).expect("an acknowledgement");
        let Some(Stanza::Iq(next)) = next else { panic!("no next acknowledgement iq") };
        assert_ne!(next.id(), ask.id());
        outbox.settled().await;
        let left: Vec<String> = store.outbox_pending().await.expect("pending").into_iter().map(|r| r.event).collect();
        assert_eq!(left, ["{\"n\":3}"]);
        assert!(unacknowledged.acknowledged(&Stanza::Iq(next), &me).expect("ours").is_none(), "nothing left to ask");
        outbox.settled().await;
        assert!(store.outbox_pending().await.expect("pending").is_empty());
    }
}
