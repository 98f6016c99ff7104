//! Wiring: configuration → store → bridges → router → component links.

use std::time::Duration;

use isthmus_config::{Config, XmppMode};
use isthmus_core::address::Escaping;
use isthmus_core::model::{ChatRef, NetworkId};
use isthmus_core::network::{EventSink, Network};
use isthmus_core::portal::Portals;
use isthmus_core::router::Router;
use isthmus_core::secrets::SecretBox;
use isthmus_core::store::{Store, StoreError};
use isthmus_discord::DiscordNetwork;
use isthmus_irc::IrcNetwork;
use isthmus_matrix::MatrixNetwork;
use isthmus_telegram::TelegramNetwork;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::gateway::{Domain, Gateway};
use crate::link::{self, LinkConfig, LinkEvent};

#[derive(Debug, Error)]
pub enum AppError {
    #[error("cannot open the store: {0}")]
    Store(#[from] isthmus_core::store::StoreError),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error("{0}")]
    Secrets(String),
}

/// The name of the key file made next to the configuration when `store.secret_key` is not set.
pub const KEY_FILE: &str = "isthmus.key";

/// The key credentials are sealed with in the store, and where it came from (for
/// messages): `store.secret_key`, else the key file next to the configuration
/// (made, mode 0600, on first start).
pub fn store_key(config: &Config) -> Result<(SecretBox, String), AppError> {
    if let Some(secret) = &config.store.secret_key {
        let key = isthmus_core::secrets::parse_key(secret.expose())
            .map_err(|e| AppError::Secrets(format!("store.secret_key: {e}")))?;
        return Ok((SecretBox::new(&key), "store.secret_key".into()));
    }
    let path = config.base_dir.join(KEY_FILE);
    let (key, created) = isthmus_core::secrets::load_or_generate_key_file(&path).map_err(|e| {
        AppError::Secrets(format!(
            "{e}; it holds the key that seals credentials in the store (or set store.secret_key)"
        ))
    })?;
    if created {
        info!(path = %path.display(), key = %key.key_id(), "made the key that seals credentials in the store: keep it with the database's backups");
    }
    Ok((key, format!("the key file {}", path.display())))
}

/// Open the configured store and bring its schema up to date; credentials are
/// sealed with [`store_key`] (those still in clear are sealed now).
pub async fn open_store(config: &Config) -> Result<Store, AppError> {
    let url = config.store.resolved_url(&config.base_dir);
    let (key, source) = store_key(config)?;
    let store = Store::connect(&url, config.store.max_connections).await?.with_secrets(key);
    store.migrate().await?;
    match store.seal_existing().await {
        Ok(report) if report.sealed > 0 => info!(values = report.sealed, "sealed credentials stored in clear"),
        Ok(_) => {}
        Err(StoreError::WrongKey { table, sealed_with, have }) => {
            return Err(AppError::Secrets(format!(
                "the database holds credentials (in {table}) sealed with key {sealed_with}, but {source} is key {have}: \
                 start with the key that sealed them (key id {sealed_with}: the store.secret_key or {KEY_FILE} used before)"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(store)
}

/// Who may use a network whose own list is `own`: it, else `access.allow`; in
/// embedded mode, when both are empty, the embedded server's own accounts (its
/// domain: nobody else can reach it). An empty result lets nobody in.
pub(crate) fn effective_allow(config: &Config, own: &[String]) -> Vec<String> {
    let list = if own.is_empty() { &config.access.allow } else { own };
    if list.is_empty() && config.xmpp.mode == XmppMode::Embedded {
        return vec![config.xmpp.embedded.clone().unwrap_or_default().domain];
    }
    list.to_vec()
}

/// What one network's domain needs on the XMPP side.
struct DomainSpec<'a> {
    domain: &'a str,
    kind: &'static str,
    escaping: Escaping,
    persistent: bool,
    reconnect_grace: Duration,
    allow: &'a [String],
    secret: Option<&'a isthmus_config::Secret>,
}

impl<'a> DomainSpec<'a> {
    /// A bot network's domain (Telegram, Discord): ids are numbers, rooms are
    /// kept, nobody's connection needs a grace period.
    fn bot(
        domain: &'a str,
        kind: &'static str,
        allow: &'a [String],
        secret: Option<&'a isthmus_config::Secret>,
    ) -> Self {
        DomainSpec {
            domain,
            kind,
            escaping: Escaping::CaseInsensitive,
            persistent: true,
            reconnect_grace: Duration::ZERO,
            allow,
            secret,
        }
    }
}

/// The domains being set up, each with its way to the XMPP server: a component
/// link, or (embedded) the server in this process.
#[derive(Default)]
struct Wiring {
    domains: Vec<Domain>,
    links: Vec<(LinkConfig, mpsc::UnboundedReceiver<crate::gateway::Outgoing>)>,
    in_process: Vec<(String, mpsc::UnboundedReceiver<crate::gateway::Outgoing>)>,
    /// Each domain's link state, for the admins' link status (updated by the link tasks).
    link_states: std::collections::HashMap<String, std::sync::Arc<crate::admin::LinkState>>,
}

impl Wiring {
    fn add(
        &mut self,
        spec: DomainSpec<'_>,
        config: &Config,
        component: Option<&isthmus_config::ComponentConfig>,
    ) -> Result<NetworkId, AppError> {
        let id = NetworkId::new(spec.domain);
        let (tx, rx) = mpsc::unbounded_channel();
        let state = match component {
            Some(_) => crate::admin::LinkState::component(),
            None => crate::admin::LinkState::embedded(),
        };
        self.link_states.insert(spec.domain.to_owned(), state.clone());
        self.domains.push(Domain {
            name: spec.domain.to_owned(),
            network: id.clone(),
            escaping: spec.escaping,
            kind: spec.kind,
            persistent: spec.persistent,
            reconnect_grace: spec.reconnect_grace,
            allow: effective_allow(config, spec.allow),
            admins: config.access.admins.clone(),
            link: state,
            outgoing: crate::gateway::OutgoingQueue::new(tx),
        });
        match component {
            Some(component) => {
                let secret = config
                    .component_secret(spec.secret)
                    .ok_or_else(|| AppError::Config(format!("no component secret for {}", spec.domain)))?;
                self.links.push((link_config(component, spec.domain, secret.expose()), rx));
            }
            None => self.in_process.push((spec.domain.to_owned(), rx)),
        }
        Ok(id)
    }
}

/// Run the gateway until the process is asked to stop.
pub async fn run(config: Config) -> Result<(), AppError> {
    let store = open_store(&config).await?;
    let component = match config.xmpp.mode {
        XmppMode::Component => Some(
            config
                .xmpp
                .component
                .clone()
                .ok_or_else(|| AppError::Config("xmpp.mode is component but xmpp.component is missing".into()))?,
        ),
        XmppMode::Embedded => None,
    };
    let (sink, events) = EventSink::channel(4096);
    let mut wiring = Wiring::default();
    let mut networks = Vec::new();
    for net in &config.irc {
        let id = wiring.add(
            DomainSpec {
                domain: &net.domain,
                kind: "IRC",
                escaping: Escaping::CaseInsensitive,
                persistent: net.persistent_channels,
                reconnect_grace: std::time::Duration::from_secs(net.reconnect_grace_secs),
                allow: &net.allow,
                secret: net.secret.as_ref(),
            },
            &config,
            component.as_ref(),
        )?;
        networks.push(IrcNetwork::new(id, net.clone(), Some(store.clone()), sink.clone()));
    }
    let mut matrix_networks = Vec::new();
    // What Matrix sends the XMPP side must fit in one stanza of the server's.
    if let Some(embedded) = config.xmpp.embedded.as_ref().filter(|_| config.xmpp.mode == XmppMode::Embedded) {
        isthmus_matrix::convert::set_xmpp_stanza_limit(embedded.max_stanza_bytes);
    }
    for net in &config.matrix {
        let id = wiring.add(
            DomainSpec {
                domain: &net.domain,
                kind: "Matrix",
                // Matrix ids are case-sensitive: JIDs mark capitals so they survive case folding.
                escaping: Escaping::CaseSensitive,
                persistent: true,
                reconnect_grace: std::time::Duration::ZERO,
                allow: &net.allow,
                secret: net.secret.as_ref(),
            },
            &config,
            component.as_ref(),
        )?;
        matrix_networks.push(MatrixNetwork::new(id, net.clone(), &config.base_dir, store.clone(), sink.clone()));
    }
    let portals = Portals::load(store.clone()).await.map_err(|e| AppError::Config(e.to_string()))?;
    let mut telegram_networks = Vec::new();
    for net in &config.telegram {
        let id = wiring.add(
            DomainSpec::bot(&net.domain, "Telegram", &net.allow, net.secret.as_ref()),
            &config,
            component.as_ref(),
        )?;
        let network =
            TelegramNetwork::new(id, net.clone(), &config.base_dir, store.clone(), sink.clone(), portals.clone())
                .map_err(|e| AppError::Config(format!("Telegram network {}: {e}", net.domain)))?;
        telegram_networks.push(network);
    }
    let mut discord_networks = Vec::new();
    for net in &config.discord {
        let id = wiring.add(
            DomainSpec::bot(&net.domain, "Discord", &net.allow, net.secret.as_ref()),
            &config,
            component.as_ref(),
        )?;
        let network = DiscordNetwork::new(id, net.clone(), store.clone(), sink.clone(), portals.clone())
            .map_err(|e| AppError::Config(format!("Discord network {}: {e}", net.domain)))?;
        discord_networks.push(network);
    }
    let Wiring { domains, links, in_process, link_states } = wiring;
    for d in &domains {
        if d.allow.is_empty() {
            // Validation refuses this in component mode; should it get here, nobody is let in.
            warn!(domain = %d.name, "no allow list: nobody may use this network (set access.allow)");
        }
    }
    if domains.is_empty() {
        warn!("no networks are configured: the gateway has nothing to bridge");
    }
    let store_for_server = store.clone();
    let archive = crate::archive::Archive::spawn(store.clone(), config.archive.retention_days);
    // Portal rooms: `NAME@domain` on XMPP is one room shared by everyone, linked to
    // chats on the networks. Those of a network's own section are named by their room.
    let define = |name: String, room: String, members: Vec<ChatRef>| {
        let portals = portals.clone();
        async move {
            tokio_xmpp::parsers::jid::BareJid::new(&room)
                .map_err(|e| AppError::Config(format!("portal `{name}`: `{room}` is not a room address: {e}")))?;
            portals.define(&name, &room, members).await.map_err(|e| AppError::Config(format!("portal `{name}`: {e}")))
        }
    };
    for net in &config.matrix {
        for p in &net.portals {
            let room = format!("{}@{}", p.name, net.domain);
            let member = ChatRef::room(NetworkId::new(net.domain.clone()), p.room.clone());
            define(room.clone(), room, vec![member]).await?;
        }
    }
    for n in &telegram_networks {
        for (room, member) in n.configured_portals().await {
            define(room.clone(), room, vec![member]).await?;
        }
    }
    for n in &discord_networks {
        for (room, member) in n.configured_portals() {
            define(room.clone(), room, vec![member]).await?;
        }
    }
    for p in &config.portals {
        let members =
            p.members.iter().map(|m| ChatRef::room(NetworkId::new(m.network.clone()), m.chat.clone())).collect();
        define(p.name.clone(), p.room.clone(), members).await?;
    }
    let gateway = Gateway::with_portals(domains, archive, config.archive.history_on_join, portals.clone());
    let mut builder = Router::builder(store).portals(portals.clone()).network(gateway.clone());
    for n in &telegram_networks {
        builder = builder.network(n.clone());
    }
    for n in &discord_networks {
        builder = builder.network(n.clone());
    }
    for n in networks {
        builder = builder.network(n);
    }
    for n in &matrix_networks {
        builder = builder.network(n.clone());
    }
    let router = builder.build();
    gateway.attach(router.clone());
    // What an earlier run left: rejoin its rooms, then deliver what it had accepted,
    // before anything new is routed (the networks' events wait in their channel).
    for n in &matrix_networks {
        let logins = n.restore().await;
        if logins > 0 {
            info!(network = %n.id(), logins, "Matrix logins restored");
        }
        // Portal rooms: the application service's transaction endpoint and its bot.
        n.start_portals().await;
    }
    for n in &telegram_networks {
        n.start();
    }
    for n in &discord_networks {
        n.start();
    }
    let restored = gateway.restore_sessions().await;
    let replayed = router.replay().await;
    if restored > 0 || replayed > 0 {
        info!(rooms = restored, events = replayed, "restored the state of the previous run");
    }
    tokio::spawn(router.run(events));

    if config.xmpp.mode == XmppMode::Embedded {
        let embedded = config.xmpp.embedded.clone().unwrap_or_default();
        let names = config
            .irc
            .iter()
            .map(|n| (n.domain.clone(), format!("IRC ({})", n.domain)))
            .chain(config.matrix.iter().map(|n| (n.domain.clone(), format!("Matrix ({})", n.domain))))
            .chain(config.telegram.iter().map(|n| (n.domain.clone(), format!("Telegram ({})", n.domain))))
            .chain(config.discord.iter().map(|n| (n.domain.clone(), format!("Discord ({})", n.domain))))
            .collect();
        let server = crate::server::Server::new(&embedded, &config.base_dir, store_for_server, gateway.clone(), names)?;
        // The gateway's stanzas for users go straight to the server's router: no socket hop.
        for (domain, mut outgoing) in in_process {
            let server = server.clone();
            tokio::spawn(async move {
                while let Some(item) = outgoing.recv().await {
                    for stanza in crate::gateway::Outgoing::confirmed_batch(item, &mut outgoing).await {
                        let el = tokio_xmpp::minidom::Element::from(stanza);
                        server
                            .route(crate::server::xml::rename_ns(
                                &el,
                                crate::server::xml::COMPONENT,
                                crate::server::xml::CLIENT,
                            ))
                            .await;
                    }
                }
                warn!(domain, "gateway output closed");
            });
        }
        server.ensure_first_account().await?;
        server.listen(&embedded).await?;
    }

    for (link_config, outgoing) in links {
        let (ev_tx, mut ev_rx) = mpsc::channel(4096);
        let domain = link_config.domain.clone();
        tokio::spawn(link::run(link_config, outgoing, ev_tx));
        let gateway = gateway.clone();
        let state = link_states.get(&domain).cloned();
        tokio::spawn(async move {
            // When the link was lost: the rooms hear of the outage and of its end.
            let mut lost_at: Option<std::time::SystemTime> = None;
            while let Some(ev) = ev_rx.recv().await {
                match ev {
                    LinkEvent::Stanza(s) => gateway.handle(&domain, s).await,
                    LinkEvent::Up => {
                        info!(domain, "serving");
                        if let Some(state) = &state {
                            state.up();
                        }
                        if let Some(since) = lost_at.take() {
                            let now = std::time::SystemTime::now();
                            let secs = now.duration_since(since).unwrap_or_default().as_secs();
                            let text = format!(
                                "The gateway is connected to the XMPP server again at {} UTC, after {secs} s away.",
                                clock(now)
                            );
                            gateway.link_notice(&domain, &text, now);
                        }
                    }
                    LinkEvent::Down(reason) => {
                        warn!(domain, reason, "link down");
                        if let Some(state) = &state {
                            state.down(&reason);
                        }
                        let now = std::time::SystemTime::now();
                        lost_at.get_or_insert(now);
                        let text = format!(
                            "The gateway lost its connection to the XMPP server at {} UTC ({reason}). \
                             What was said in this room meanwhile follows.",
                            clock(now)
                        );
                        let devices = gateway.link_notice(&domain, &text, now);
                        info!(domain, devices, "outage notice queued");
                    }
                }
            }
        });
    }
    info!("isthmus is running; stop it with Ctrl-C or SIGTERM");
    shutdown_signal().await;
    info!("shutting down");
    Ok(())
}

/// `HH:MM:SS` of `time` in UTC, for notices.
fn clock(time: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).format("%H:%M:%S").to_string()
}

/// The XEP-0114 link settings of one component domain.
fn link_config(component: &isthmus_config::ComponentConfig, domain: &str, secret: &str) -> LinkConfig {
    LinkConfig {
        domain: domain.to_owned(),
        secret: secret.to_owned(),
        host: component.host.clone(),
        port: component.port,
        keepalive: Duration::from_secs(component.keepalive_secs.max(1)),
        reconnect_initial: Duration::from_millis(component.reconnect_initial_ms.max(1)),
        reconnect_max: Duration::from_millis(component.reconnect_max_ms.max(1)),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::effective_allow;

    fn config(yaml: &str) -> isthmus_config::Config {
        isthmus_config::from_str(yaml, Path::new("t.yaml")).expect("valid")
    }

    #[test]
    fn embedded_mode_without_a_list_admits_its_own_accounts() {
        let c =
            config("xmpp:\n  mode: embedded\n  embedded: { domain: example.org }\nirc:\n  - domain: irc.example.org\n");
        assert_eq!(effective_allow(&c, &c.irc[0].allow), vec!["example.org"]);
        let c =
            config("xmpp:\n  mode: embedded\naccess: { allow: [alice@localhost] }\nirc:\n  - domain: irc.localhost\n");
        assert_eq!(effective_allow(&c, &c.irc[0].allow), vec!["alice@localhost"]);
    }

    #[test]
    fn a_network_list_overrides_access_allow() {
        let c = config(
            "xmpp:\n  component: { secret: s }\naccess: { allow: [\"*\"] }\nirc:\n  - domain: a.localhost\n  - domain: b.localhost\n    allow: [example.org]\n",
        );
        assert_eq!(effective_allow(&c, &c.irc[0].allow), vec!["*"]);
        assert_eq!(effective_allow(&c, &c.irc[1].allow), vec!["example.org"]);
    }
}
