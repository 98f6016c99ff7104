//! Resolving secrets and checking the rules that tie keys together.

use std::collections::HashMap;
use std::path::Path;

use crate::error::ConfigError;
use crate::schema::{Config, SaslMechanism, XmppMode};
use crate::secret::{Secret, SecretSpec, interpolate};

fn resolve(secret: &mut Secret, base_dir: &Path, file: &Path) -> Result<(), ConfigError> {
    let at = secret.spec.referenced;
    secret.value = match &secret.spec.value {
        SecretSpec::Text(text) => {
            interpolate(text, |name| std::env::var(name).ok()).map_err(|m| ConfigError::at(file, &at, m))?
        }
        SecretSpec::Env { env } => std::env::var(env)
            .map_err(|_| ConfigError::at(file, &at, format!("environment variable `{env}` is not set")))?,
        SecretSpec::File { file: path } => {
            let full = if path.is_absolute() { path.clone() } else { base_dir.join(path) };
            let text = std::fs::read_to_string(&full)
                .map_err(|e| ConfigError::at(file, &at, format!("cannot read secret file {}: {e}", full.display())))?;
            text.strip_suffix("\r\n").or_else(|| text.strip_suffix('\n')).unwrap_or(&text).to_owned()
        }
    };
    Ok(())
}

/// Fill in every secret's value.
pub(crate) fn resolve_secrets(config: &mut Config, file: &Path) -> Result<(), ConfigError> {
    let base = config.base_dir.clone();
    if let Some(s) = config.store.secret_key.as_mut() {
        resolve(s, &base, file)?;
    }
    if let Some(s) = config.xmpp.component.as_mut().and_then(|c| c.secret.as_mut()) {
        resolve(s, &base, file)?;
    }
    for net in &mut config.irc {
        if let Some(s) = net.secret.as_mut() {
            resolve(s, &base, file)?;
        }
        for server in net.servers.values_mut() {
            if let Some(s) = server.password.as_mut() {
                resolve(s, &base, file)?;
            }
            // Like the certificate paths below: relative to the configuration file.
            if let Some(path) = server.tls_ca_file.as_mut()
                && path.is_relative()
            {
                *path = base.join(&*path);
            }
            if let Some(sasl) = server.sasl.as_mut() {
                if let Some(s) = sasl.password.as_mut() {
                    resolve(s, &base, file)?;
                }
                // Certificate and key paths are relative to the configuration file.
                for path in [&mut sasl.client_cert, &mut sasl.client_key].into_iter().flatten() {
                    if path.is_relative() {
                        *path = base.join(&*path);
                    }
                }
            }
        }
    }
    for net in &mut config.telegram {
        if let Some(s) = net.secret.as_mut() {
            resolve(s, &base, file)?;
        }
        resolve(&mut net.token, &base, file)?;
    }
    for net in &mut config.discord {
        if let Some(s) = net.secret.as_mut() {
            resolve(s, &base, file)?;
        }
        resolve(&mut net.token, &base, file)?;
    }
    for net in &mut config.matrix {
        if let Some(s) = net.secret.as_mut() {
            resolve(s, &base, file)?;
        }
        if let Some(a) = net.appservice.as_mut() {
            resolve(&mut a.as_token, &base, file)?;
            resolve(&mut a.hs_token, &base, file)?;
        }
        if let Some(b) = net.bot.as_mut() {
            resolve(&mut b.password, &base, file)?;
        }
    }
    Ok(())
}

/// Whether the file at `path` (`what` in the configuration) is readable and holds
/// a PEM block whose label ends with `label` (e.g. `PRIVATE KEY`).
fn check_pem(path: &Path, label: &str, what: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read `{what}` {}: {e}", path.display()))?;
    if !text.lines().any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----"))) {
        return Err(format!("`{what}` {} holds no PEM `{label}`", path.display()));
    }
    if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(format!(
            "`{what}` {}: the key is encrypted; give it unencrypted (`openssl pkey -in KEY -out PLAIN`) and protect the file",
            path.display()
        ));
    }
    Ok(())
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && !d.starts_with('.')
        && !d.ends_with('.')
        && d.chars().all(|c| c.is_alphanumeric() || c == '.' || c == '-' || c == '_')
}

/// Check the rules no single key can express.
pub(crate) fn check(config: &Config, file: &Path) -> Result<(), ConfigError> {
    let top = serde_saphyr::Location::UNKNOWN;
    if config.xmpp.mode == XmppMode::Component && config.xmpp.component.is_none() {
        return Err(ConfigError::at(
            file,
            &top,
            "`xmpp.mode: component` needs an `xmpp.component` section (host, port, secret)",
        ));
    }
    if config.xmpp.mode == XmppMode::Embedded {
        let e = config.xmpp.embedded.clone().unwrap_or_default();
        if !valid_domain(&e.domain) {
            return Err(ConfigError::at(
                file,
                &top,
                format!("`xmpp.embedded.domain` `{}` is not a domain name", e.domain),
            ));
        }
        for listen in std::iter::once(&e.listen).chain(e.direct_tls_listen.iter()) {
            if listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::at(
                    file,
                    &top,
                    format!("`{listen}` is not an address to listen on: expected IP:PORT such as 127.0.0.1:5222"),
                ));
            }
        }
        if e.tls_cert.is_some() != e.tls_key.is_some() {
            return Err(ConfigError::at(
                file,
                &top,
                "`xmpp.embedded.tls_cert` and `tls_key` go together: give both or neither",
            ));
        }
        if e.scram_iterations < 4096 {
            return Err(ConfigError::at(
                file,
                &top,
                "`xmpp.embedded.scram_iterations` must be at least 4096 (RFC 7677); the default is 10000",
            ));
        }
        if e.max_stanza_bytes < 10_000 {
            return Err(ConfigError::at(file, &top, "`xmpp.embedded.max_stanza_bytes` must be at least 10000"));
        }
        for u in &e.users {
            match u.jid.split_once('@') {
                Some((node, domain)) if !node.is_empty() && domain == e.domain => {}
                _ => {
                    return Err(ConfigError::at(
                        file,
                        &top,
                        format!("user `{}` must be name@{} (the embedded server's domain)", u.jid, e.domain),
                    ));
                }
            }
        }
        for net in &config.irc {
            if net.domain == e.domain {
                return Err(ConfigError::at(
                    file,
                    &top,
                    format!(
                        "IRC domain `{}` is the users' domain; give the network its own, e.g. irc.{}",
                        net.domain, e.domain
                    ),
                ));
            }
        }
    }
    if let Some(c) = &config.xmpp.component
        && c.port == 0
    {
        return Err(ConfigError::at(file, &top, "`xmpp.component.port` must not be 0"));
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, net) in config.irc.iter().enumerate() {
        let at = config.irc_locations.get(i).copied().unwrap_or(top);
        let err = |m: String| Err(ConfigError::at(file, &at, format!("IRC network `{}`: {m}", net.domain)));
        if !valid_domain(&net.domain) {
            return err("`domain` must be a domain name like irc.example.org (no `@`, `/` or spaces)".into());
        }
        if let Some(prev) = seen.insert(net.domain.as_str(), i) {
            return err(format!(
                "the domain is already used by IRC network #{}: each network needs its own domain",
                prev + 1
            ));
        }
        if config.xmpp.mode == XmppMode::Component && config.component_secret_for(net).is_none() {
            return err("no component secret: set `secret` here or `xmpp.component.secret`".into());
        }
        if let Some(p) = &net.pinned_server
            && !net.servers.contains_key(p)
        {
            let known: Vec<&str> = net.servers.keys().map(String::as_str).collect();
            return err(format!("`pinned_server: {p}` is not one of the listed servers ({})", known.join(", ")));
        }
        let rate = net.flood.lines_per_second;
        if net.flood.enabled && (net.flood.burst < 1 || !(rate.is_finite() && rate > 0.0)) {
            return err(
                "`flood` needs `burst` of at least 1 and `lines_per_second` above 0 (or `enabled: false`)".into()
            );
        }
        if net.max_concurrent_connects == 0 {
            return err("`max_concurrent_connects` must be at least 1".into());
        }
        if net.max_servers_per_account == 0 {
            return err("`max_servers_per_account` must be at least 1".into());
        }
        for (name, server) in &net.servers {
            if server.port == Some(0) {
                return err(format!("server `{name}`: `port` must not be 0"));
            }
            if server.fallback_encoding().is_none() {
                return err(format!(
                    "server `{name}`: `encoding_fallback: {}` is not an encoding name (e.g. latin-1, windows-1251, iso-8859-15, shift_jis)",
                    server.encoding_fallback
                ));
            }
            if let Some(ca) = &server.tls_ca_file {
                if !server.tls {
                    return err(format!("server `{name}`: `tls_ca_file` is for TLS connections: it needs `tls: true`"));
                }
                if let Err(m) = check_pem(ca, "CERTIFICATE", "tls_ca_file") {
                    return err(format!("server `{name}`: {m}"));
                }
            }
            if let Some(sasl) = &server.sasl {
                match sasl.mechanism {
                    SaslMechanism::Plain if sasl.username.is_none() || sasl.password.is_none() => {
                        return err(format!("server `{name}`: SASL PLAIN needs `username` and `password`"));
                    }
                    SaslMechanism::External => {
                        let Some(cert) = &sasl.client_cert else {
                            return err(format!("server `{name}`: SASL EXTERNAL needs `client_cert`"));
                        };
                        if !server.tls {
                            return err(format!(
                                "server `{name}`: SASL EXTERNAL presents a TLS client certificate: it needs `tls: true`"
                            ));
                        }
                        if let Err(m) = check_pem(cert, "CERTIFICATE", "client_cert") {
                            return err(format!("server `{name}`: {m}"));
                        }
                        let (key, what) = match &sasl.client_key {
                            Some(key) => (key, "client_key"),
                            None => (cert, "client_cert (no client_key given: the key must be in it)"),
                        };
                        if let Err(m) = check_pem(key, "PRIVATE KEY", what) {
                            return err(format!("server `{name}`: {m}"));
                        }
                    }
                    SaslMechanism::Plain => {}
                }
            }
        }
    }
    let users_domain = config.xmpp.embedded.as_ref().map(|e| e.domain.clone()).unwrap_or_else(|| "localhost".into());
    for (i, net) in config.matrix.iter().enumerate() {
        let at = config.matrix_locations.get(i).copied().unwrap_or(top);
        let err = |m: String| Err(ConfigError::at(file, &at, format!("Matrix network `{}`: {m}", net.domain)));
        if !valid_domain(&net.domain) {
            return err("`domain` must be a domain name like matrix.example.org (no `@`, `/` or spaces)".into());
        }
        if config.irc.iter().any(|irc| irc.domain == net.domain) {
            return err("the domain is already used by an IRC network: each network needs its own domain".into());
        }
        if let Some(prev) = seen.insert(net.domain.as_str(), config.irc.len() + i) {
            return err(format!(
                "the domain is already used by Matrix network #{}: each network needs its own domain",
                prev - config.irc.len() + 1
            ));
        }
        if config.xmpp.mode == XmppMode::Embedded && net.domain == users_domain {
            return err(format!("this is the users' domain; give the network its own, e.g. matrix.{users_domain}"));
        }
        if config.xmpp.mode == XmppMode::Component && config.component_secret(net.secret.as_ref()).is_none() {
            return err("no component secret: set `secret` here or `xmpp.component.secret`".into());
        }
        for url in net.default_homeserver.iter().chain(net.allowed_homeservers.iter()) {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return err(format!("`{url}` is not a homeserver URL: expected https://HOST[:PORT]"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for p in &net.portals {
            let ok_name = !p.name.is_empty()
                && p.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.');
            if !ok_name {
                return err(format!(
                    "portal `{}`: `name` must be lower-case letters, digits, `-`, `_` or `.` (it is a JID's localpart)",
                    p.name
                ));
            }
            if !names.insert(p.name.as_str()) {
                return err(format!("portal `{}` is listed twice", p.name));
            }
            if !(p.room.starts_with('!') || p.room.starts_with('#')) {
                return err(format!("portal `{}`: `room` must be a room id (!…) or alias (#…:server)", p.name));
            }
        }
        if !net.portals.is_empty() && net.appservice.is_none() && net.bot.is_none() {
            return err("`portals` need an `appservice` (see `isthmus matrix-registration`) or a `bot` account".into());
        }
        if net.appservice.is_some() && net.bot.is_some() {
            return err("give either `appservice` or `bot` for the portal rooms, not both".into());
        }
        if let Some(b) = &net.bot {
            if !(b.homeserver.starts_with("http://") || b.homeserver.starts_with("https://")) {
                return err(format!("bot `homeserver: {}` is not a URL: expected https://HOST[:PORT]", b.homeserver));
            }
            let well_formed = b
                .user_id
                .strip_prefix('@')
                .and_then(|r| r.split_once(':'))
                .is_some_and(|(l, s)| !l.is_empty() && !s.is_empty());
            if !well_formed {
                return err(format!("bot `user_id: {}` is not a Matrix user id: expected @NAME:SERVER", b.user_id));
            }
        }
        if let Some(a) = &net.appservice {
            if a.listen.parse::<std::net::SocketAddr>().is_err() {
                return err(format!("appservice `listen: {}` is not IP:PORT", a.listen));
            }
            if !(a.homeserver.starts_with("http://") || a.homeserver.starts_with("https://")) {
                return err(format!("appservice `homeserver: {}` is not a URL", a.homeserver));
            }
        }
        if let Some(d) = &net.default_homeserver
            && !net.allows_homeserver(d)
        {
            return err(format!("`default_homeserver: {d}` is not in `allowed_homeservers`"));
        }
        if let Some(media) = &net.media {
            check_media(config, media, &net.domain).map_or(Ok(()), err)?;
        }
    }
    check_telegram(config, file, &users_domain, &mut seen)?;
    check_discord(config, file, &users_domain, &mut seen)?;
    check_portals(config, file)?;
    check_admins(config, file)?;
    check_open(config, file)
}

/// A network's media proxy settings (`net` is its domain): what is wrong, if anything.
fn check_media(config: &Config, media: &crate::MatrixMediaConfig, net: &str) -> Option<String> {
    if media.listen.parse::<std::net::SocketAddr>().is_err() {
        return Some(format!(
            "`media.listen: {}` is not an address to listen on: expected IP:PORT such as 127.0.0.1:8091",
            media.listen
        ));
    }
    let others = config
        .matrix
        .iter()
        .map(|n| (n.domain.as_str(), n.media.as_ref()))
        .chain(config.telegram.iter().map(|n| (n.domain.as_str(), n.media.as_ref())));
    if let Some((other, _)) =
        others.filter(|(d, _)| *d != net).find(|(_, m)| m.is_some_and(|m| m.listen == media.listen))
    {
        return Some(format!("`media.listen: {}` is already the media proxy of {other}", media.listen));
    }
    let host = media.public_url.strip_prefix("https://").or_else(|| media.public_url.strip_prefix("http://"));
    let host = host.map(|rest| rest.split('/').next().unwrap_or_default());
    if host.is_none_or(str::is_empty) || media.public_url.contains(['?', '#', ' ']) {
        return Some(format!(
            "`media.public_url: {}` is not a base URL: expected https://HOST[:PORT][/PATH], without `?` or `#`",
            media.public_url
        ));
    }
    None
}

/// A portal or Telegram portal name: a JID's localpart Isthmus can write as is.
fn valid_portal_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.')
}

fn check_telegram<'a>(
    config: &'a Config,
    file: &Path,
    users_domain: &str,
    seen: &mut std::collections::HashMap<&'a str, usize>,
) -> Result<(), ConfigError> {
    let top = serde_saphyr::Location::UNKNOWN;
    let base = config.irc.len() + config.matrix.len();
    for (i, net) in config.telegram.iter().enumerate() {
        let at = config.telegram_locations.get(i).copied().unwrap_or(top);
        let err = |m: String| Err(ConfigError::at(file, &at, format!("Telegram network `{}`: {m}", net.domain)));
        if let Some(problem) =
            check_network_domain(config, &net.domain, net.secret.as_ref(), "telegram", users_domain, seen, base + i)
        {
            return err(problem);
        }
        let token = net.token.expose();
        let well_formed = token.split_once(':').is_some_and(|(id, rest)| {
            !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()) && !rest.is_empty() && !rest.contains(['/', ' '])
        });
        if !well_formed {
            return err("`token` is not a bot token (BotFather gives `123456:ABC…`)".into());
        }
        if !(net.api_url.starts_with("https://") || net.api_url.starts_with("http://")) {
            return err(format!("`api_url: {}` is not a URL: expected https://HOST[:PORT]", net.api_url));
        }
        if let Err(e) = isthmus_relay_template_check(&net.relay_template) {
            return err(format!("`relay_template`: {e}"));
        }
        if !(1..=50).contains(&net.poll_timeout_secs) {
            return err("`poll_timeout_secs` must be between 1 and 50".into());
        }
        if let Some(problem) = net.media.as_ref().and_then(|m| check_media(config, m, &net.domain)) {
            return err(problem);
        }
        let mut names = std::collections::HashSet::new();
        let mut chats = std::collections::HashSet::new();
        for p in &net.portals {
            if !valid_portal_name(&p.name) {
                return err(format!(
                    "portal `{}`: `name` must be lower-case letters, digits, `-`, `_` or `.` (it is a JID's localpart)",
                    p.name
                ));
            }
            if !names.insert(p.name.as_str()) {
                return err(format!("portal `{}` is listed twice", p.name));
            }
            if p.chat >= 0 {
                return err(format!("portal `{}`: `chat: {}` is not a group (group ids are negative)", p.name, p.chat));
            }
            if p.topic.is_some_and(|t| !(1..=i64::from(i32::MAX)).contains(&t)) {
                return err(format!("portal `{}`: `topic` is a forum topic's id (a positive message id)", p.name));
            }
            if !chats.insert((p.chat, p.topic)) {
                return err(format!("portal `{}`: that chat is already another portal's", p.name));
            }
        }
    }
    Ok(())
}

/// What every bot network's domain must be: a domain name, its own, not the
/// users' domain (embedded mode), with a component secret (component mode).
/// `example` is the network's word for the example domain (`telegram`).
fn check_network_domain<'a>(
    config: &Config,
    domain: &'a str,
    secret: Option<&crate::Secret>,
    example: &str,
    users_domain: &str,
    seen: &mut std::collections::HashMap<&'a str, usize>,
    index: usize,
) -> Option<String> {
    if !valid_domain(domain) {
        return Some(format!("`domain` must be a domain name like {example}.example.org (no `@`, `/` or spaces)"));
    }
    if seen.insert(domain, index).is_some() {
        return Some("the domain is already used by another network: each network needs its own domain".into());
    }
    if config.xmpp.mode == XmppMode::Embedded && domain == users_domain {
        return Some(format!("this is the users' domain; give the network its own, e.g. {example}.{users_domain}"));
    }
    if config.xmpp.mode == XmppMode::Component && config.component_secret(secret).is_none() {
        return Some("no component secret: set `secret` here or `xmpp.component.secret`".into());
    }
    None
}

/// The relay template's rule (kept here so the configuration alone can be checked).
fn isthmus_relay_template_check(t: &str) -> Result<(), String> {
    let Some((head, tail)) = t.split_once("{text}") else {
        return Err("it must hold `{text}`".into());
    };
    if tail.contains("{text}") || tail.contains("{nick}") || head.matches("{nick}").count() > 1 {
        return Err("`{text}` once, and `{nick}` at most once before it".into());
    }
    Ok(())
}

fn check_portals(config: &Config, file: &Path) -> Result<(), ConfigError> {
    let top = serde_saphyr::Location::UNKNOWN;
    let domains: Vec<&str> = config
        .irc
        .iter()
        .map(|n| n.domain.as_str())
        .chain(config.matrix.iter().map(|n| n.domain.as_str()))
        .chain(config.telegram.iter().map(|n| n.domain.as_str()))
        .chain(config.discord.iter().map(|n| n.domain.as_str()))
        .collect();
    let mut names = std::collections::HashSet::new();
    let mut members = std::collections::HashSet::new();
    for (i, p) in config.portals.iter().enumerate() {
        let at = config.portal_locations.get(i).copied().unwrap_or(top);
        let err = |m: String| Err(ConfigError::at(file, &at, format!("portal `{}`: {m}", p.name)));
        if !valid_portal_name(&p.name) {
            return err("`name` must be lower-case letters, digits, `-`, `_` or `.`".into());
        }
        if !names.insert(p.name.as_str()) {
            return err("the name is listed twice".into());
        }
        let matrix =
            config.matrix.iter().flat_map(|n| n.portals.iter().map(move |q| format!("{}@{}", q.name, n.domain)));
        let telegram =
            config.telegram.iter().flat_map(|n| n.portals.iter().map(move |q| format!("{}@{}", q.name, n.domain)));
        let discord =
            config.discord.iter().flat_map(|n| n.portals.iter().map(move |q| format!("{}@{}", q.name, n.domain)));
        let mut own_rooms = matrix.chain(telegram).chain(discord);
        if let Some(taken) = own_rooms.find(|r| *r == p.room) {
            return err(format!("`room: {taken}` is already a portal of that network's own `portals` list"));
        }
        if config.portals[..i].iter().any(|q| q.room == p.room) {
            return err(format!("`room: {}` is already another portal's", p.room));
        }
        let room_ok =
            p.room.split_once('@').is_some_and(|(local, domain)| valid_portal_name(local) && domains.contains(&domain));
        if !room_ok {
            return err(format!(
                "`room: {}` must be NAME@DOMAIN with DOMAIN one of the networks' domains ({})",
                p.room,
                domains.join(", ")
            ));
        }
        if p.members.is_empty() {
            return err("`members` is empty: list the chats the portal links".into());
        }
        for m in &p.members {
            if !domains.contains(&m.network.as_str()) {
                return err(format!("member on `{}`: no network has this domain", m.network));
            }
            if config.irc.iter().any(|n| n.domain == m.network) {
                return err(format!(
                    "member on `{}`: IRC channels cannot be portal members yet (IRC has no relay connection); \
                     XMPP users reach IRC channels through their own connection",
                    m.network
                ));
            }
            if config.matrix.iter().any(|n| n.domain == m.network) {
                return err(format!(
                    "member on `{}`: a Matrix room joins portals through that network's own `portals` list for now",
                    m.network
                ));
            }
            if m.chat.is_empty() {
                return err(format!("member on `{}`: `chat` is empty", m.network));
            }
            if !members.insert((m.network.as_str(), m.chat.as_str())) {
                return err(format!("`{}` on {} is already a member of a portal", m.chat, m.network));
            }
        }
    }
    Ok(())
}

/// `access.admins` lists bare JIDs, matched exactly: a domain, a full JID or a
/// wildcard there would make nobody an admin, so it is refused rather than ignored.
fn check_admins(config: &Config, file: &Path) -> Result<(), ConfigError> {
    for entry in &config.access.admins {
        let bare = entry.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && !domain.is_empty() && !domain.contains(['@', '/']) && !entry.contains(['*', ' '])
        });
        if !bare {
            return Err(ConfigError::at(
                file,
                &serde_saphyr::Location::UNKNOWN,
                format!(
                    "`access.admins`: `{entry}` is not a bare JID; list accounts as `user@server` \
                     (no domains, resources or wildcards)"
                ),
            ));
        }
    }
    Ok(())
}

/// In component mode the gateway is closed unless the configuration says who may
/// use it: every network needs a non-empty allow list (its own or `access.allow`).
/// `"*"` written there opens it to everyone whose server reaches the component.
/// Embedded mode needs none: an empty list there means the server's own accounts.
fn check_open(config: &Config, file: &Path) -> Result<(), ConfigError> {
    if config.xmpp.mode != XmppMode::Component || !config.access.allow.is_empty() {
        return Ok(());
    }
    let top = serde_saphyr::Location::UNKNOWN;
    let irc = config.irc.iter().enumerate().map(|(i, n)| ("IRC", &n.domain, &n.allow, config.irc_locations.get(i)));
    let matrix =
        config.matrix.iter().enumerate().map(|(i, n)| ("Matrix", &n.domain, &n.allow, config.matrix_locations.get(i)));
    let telegram = config
        .telegram
        .iter()
        .enumerate()
        .map(|(i, n)| ("Telegram", &n.domain, &n.allow, config.telegram_locations.get(i)));
    let discord = config
        .discord
        .iter()
        .enumerate()
        .map(|(i, n)| ("Discord", &n.domain, &n.allow, config.discord_locations.get(i)));
    for (kind, domain, allow, at) in irc.chain(matrix).chain(telegram).chain(discord) {
        if allow.is_empty() {
            return Err(ConfigError::at(
                file,
                at.unwrap_or(&top),
                format!(
                    "{kind} network `{domain}`: nobody may use it: `access.allow` is empty and the network has no \
                     `allow` of its own, and a component is closed unless told who may use it. List the accounts \
                     or domains that may (`access: {{ allow: [example.org, alice@example.net] }}`), or open it \
                     to everyone whose server reaches the component with `access: {{ allow: [\"*\"] }}`"
                ),
            ));
        }
    }
    Ok(())
}

/// `scheme://HOST[:PORT]` with one of `schemes`, and a path only where `path` allows
/// one; never a query or fragment.
fn check_origin(url: &str, schemes: &[&str], path: bool) -> bool {
    let Some(rest) = schemes.iter().find_map(|s| url.strip_prefix(s).and_then(|r| r.strip_prefix("://"))) else {
        return false;
    };
    let (host, tail) = rest.split_once('/').map_or((rest, ""), |(h, t)| (h, t));
    let host_ok = !host.is_empty()
        && !host.contains(['@', ' ', '?', '#'])
        && host.rsplit_once(':').is_none_or(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
    host_ok && !tail.contains(['?', '#', ' ']) && (path || tail.is_empty())
}

/// A Discord snowflake written as text.
fn valid_snowflake(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.chars().all(|c| c.is_ascii_digit()) && s.parse::<u64>().is_ok_and(|n| n > 0)
}

fn check_discord<'a>(
    config: &'a Config,
    file: &Path,
    users_domain: &str,
    seen: &mut std::collections::HashMap<&'a str, usize>,
) -> Result<(), ConfigError> {
    let top = serde_saphyr::Location::UNKNOWN;
    let base = config.irc.len() + config.matrix.len() + config.telegram.len();
    for (i, net) in config.discord.iter().enumerate() {
        let at = config.discord_locations.get(i).copied().unwrap_or(top);
        let err = |m: String| Err(ConfigError::at(file, &at, format!("Discord network `{}`: {m}", net.domain)));
        if let Some(problem) =
            check_network_domain(config, &net.domain, net.secret.as_ref(), "discord", users_domain, seen, base + i)
        {
            return err(problem);
        }
        let token = net.token.expose();
        if token.starts_with("Bot ") || token.starts_with("Bearer ") {
            return err("`token`: write the bot token alone, without `Bot ` in front".into());
        }
        let well_formed = token.contains('.')
            && !token.starts_with('.')
            && token.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !well_formed {
            return err("`token` is not a bot token (the Developer Portal gives `MTIz…`, three parts joined by `.`: \
                 the application → Bot → Reset Token)"
                .into());
        }
        if !check_origin(net.api_url.trim_end_matches('/'), &["https", "http"], false) {
            return err(format!(
                "`api_url: {}` is not an origin: expected https://HOST[:PORT] (no path; Isthmus adds /api/v10)",
                net.api_url
            ));
        }
        if let Some(g) = &net.gateway_url
            && !check_origin(g.trim_end_matches('/'), &["wss", "ws"], true)
        {
            return err(format!("`gateway_url: {g}` is not a websocket URL: expected wss://HOST[:PORT][/PATH]"));
        }
        if !check_origin(net.cdn_url.trim_end_matches('/'), &["https", "http"], true) {
            return err(format!("`cdn_url: {}` is not a URL: expected https://HOST[:PORT][/PATH]", net.cdn_url));
        }
        let mut names = std::collections::HashSet::new();
        let mut channels = std::collections::HashSet::new();
        for p in &net.portals {
            if !valid_portal_name(&p.name) {
                return err(format!(
                    "portal `{}`: `name` must be lower-case letters, digits, `-`, `_` or `.` (it is a JID's localpart)",
                    p.name
                ));
            }
            if !names.insert(p.name.as_str()) {
                return err(format!("portal `{}` is listed twice", p.name));
            }
            if !valid_snowflake(&p.channel) {
                return err(format!(
                    "portal `{}`: `channel: {}` is not a channel id (digits, e.g. \"1234567890123456789\": \
                     Developer Mode on, then right-click the channel → Copy Channel ID)",
                    p.name, p.channel
                ));
            }
            if !channels.insert(p.channel.as_str()) {
                return err(format!("portal `{}`: that channel is already another portal's", p.name));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::from_str;

    const BASE: &str = "xmpp:\n  component:\n    secret: s\n";
    /// Appended to a configuration that must load: in component mode someone must be allowed.
    const OPEN: &str = "access: { allow: [\"*\"] }\n";

    fn err(src: &str) -> crate::ConfigError {
        from_str(src, Path::new("test.yaml")).expect_err("must be rejected")
    }

    #[test]
    fn full_config_loads() {
        let src = "xmpp:\n  mode: component\n  component:\n    host: 127.0.0.1\n    port: 5348\n    secret: s3cret\n    keepalive_secs: 30\nstore:\n  url: sqlite://data/isthmus.db\nlog:\n  filter: debug\naccess:\n  admins: [admin@localhost]\n  allow: [localhost]\nirc:\n  - domain: irc.localhost\n    pinned_server: libera\n    flood: { enabled: false }\n    servers:\n      libera:\n        host: irc.libera.chat\n        on_connect: [\"PRIVMSG NickServ :IDENTIFY x\"]\n      local:\n        tls: false\n";
        let c = from_str(src, Path::new("/etc/isthmus/isthmus.yaml")).expect("valid");
        let comp = c.xmpp.component.as_ref().expect("component");
        assert_eq!(
            (comp.port, comp.keepalive_secs, comp.secret.as_ref().map(|s| s.expose())),
            (5348, 30, Some("s3cret"))
        );
        assert_eq!(c.store.resolved_url(&c.base_dir), "sqlite:///etc/isthmus/data/isthmus.db");
        assert_eq!(c.log.filter, "debug");
        assert_eq!(c.access.admins, vec!["admin@localhost"]);
        let net = &c.irc[0];
        assert!(!net.flood.enabled);
        assert_eq!(net.servers["libera"].port(), 6697);
        assert_eq!(net.servers["libera"].host_or("libera"), "irc.libera.chat");
        assert_eq!(net.servers["local"].port(), 6667);
        assert_eq!(net.servers["local"].host_or("local"), "local");
        assert_eq!(c.component_secret_for(net).map(|s| s.expose()), Some("s3cret"));
    }

    #[test]
    fn wrong_type_is_located() {
        let e = err("xmpp:\n  component:\n    port: abc\n    secret: s\n");
        assert_eq!((e.line(), e.column()), (Some(3), Some(11)), "{e}");
        assert!(e.to_string().starts_with("test.yaml:3:11: "), "{e}");
        assert_eq!(e.message(), "expected u16, found `abc`", "{e}");
    }

    #[test]
    fn unknown_field_is_located() {
        let e = err("xmpp:\n  component:\n    secret: s\n    prot: 5347\n");
        assert_eq!(e.line(), Some(4), "{e}");
        assert!(e.message().contains("prot"), "{e}");
    }

    #[test]
    fn missing_field_is_reported() {
        let e = err(&format!("{BASE}irc:\n  - servers: {{}}\n"));
        assert!(e.message().contains("domain"), "{e}");
        assert!(e.line().is_some(), "{e}");
    }

    #[test]
    fn unset_variable_is_located() {
        let e = err("xmpp:\n  component:\n    secret: ${ISTHMUS_TEST_SURELY_UNSET}\n");
        assert_eq!((e.line(), e.column()), (Some(3), Some(13)), "{e}");
        assert!(e.message().contains("ISTHMUS_TEST_SURELY_UNSET"), "{e}");
    }

    #[test]
    fn file_secret_is_read_and_trimmed() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("secret.txt"), "from-file\n").expect("write");
        let c = from_str("xmpp:\n  component:\n    secret: { file: secret.txt }\n", &dir.path().join("c.yaml"))
            .expect("ok");
        assert_eq!(c.xmpp.component.and_then(|c| c.secret).map(|s| s.expose().to_owned()), Some("from-file".into()));
        let e = from_str("xmpp:\n  component:\n    secret: { file: missing.txt }\n", &dir.path().join("c.yaml"))
            .expect_err("missing file");
        assert_eq!(e.line(), Some(3), "{e}");
    }

    #[test]
    fn rules_between_keys() {
        let e = err("xmpp:\n  mode: component\n");
        assert!(e.message().contains("xmpp.component"), "{e}");
        let e = err("xmpp:\n  component: {}\nirc:\n  - domain: irc.localhost\n");
        assert!(e.message().contains("no component secret"), "{e}");
        assert_eq!(e.line(), Some(4), "{e}");
        let e = err(&format!("{BASE}irc:\n  - domain: irc.localhost\n  - domain: irc.localhost\n"));
        assert!(e.message().contains("already used"), "{e}");
        assert_eq!(e.line(), Some(6), "{e}");
        let e = err(&format!("{BASE}irc:\n  - domain: irc.localhost\n    pinned_server: nope\n"));
        assert!(e.message().contains("pinned_server"), "{e}");
        let e = err(&format!("{BASE}irc:\n  - domain: a@b\n"));
        assert!(e.message().contains("domain name"), "{e}");
        let e = err(&format!("{BASE}irc:\n  - domain: irc.localhost\n    flood: {{ burst: 0 }}\n"));
        assert!(e.message().contains("burst"), "{e}");
        let e = err(&format!(
            "{BASE}irc:\n  - domain: irc.localhost\n    servers:\n      x: {{ sasl: {{ mechanism: plain }} }}\n"
        ));
        assert!(e.message().contains("SASL PLAIN"), "{e}");
        let e = err(&format!(
            "{BASE}irc:\n  - domain: irc.localhost\n    servers:\n      x: {{ sasl: {{ mechanism: external }} }}\n"
        ));
        assert!(e.message().contains("client_cert"), "{e}");
        let e = err(&format!(
            "{BASE}irc:\n  - domain: irc.localhost\n    servers:\n      x: {{ tls: false, sasl: {{ mechanism: external, client_cert: c.pem }} }}\n"
        ));
        assert!(e.message().contains("needs `tls: true`"), "{e}");
        let e = err(&format!(
            "{BASE}irc:\n  - domain: irc.localhost\n    servers:\n      x: {{ sasl: {{ mechanism: external, client_cert: missing.pem }} }}\n"
        ));
        assert!(e.message().contains("cannot read `client_cert`"), "{e}");
        let e = err(&format!(
            "{BASE}irc:\n  - domain: irc.localhost\n    servers:\n      x: {{ encoding_fallback: klingon }}\n"
        ));
        assert!(e.message().contains("`encoding_fallback: klingon` is not an encoding name"), "{e}");
        let e = err(&format!("{BASE}irc:\n  - domain: irc.localhost\n    max_concurrent_connects: 0\n"));
        assert!(e.message().contains("`max_concurrent_connects` must be at least 1"), "{e}");
        let e = err(&format!("{BASE}irc:\n  - domain: irc.localhost\n    max_servers_per_account: 0\n"));
        assert!(e.message().contains("`max_servers_per_account` must be at least 1"), "{e}");
    }

    #[test]
    fn admins_must_be_bare_jids() {
        for entry in ["example.org", "\"*\"", "\"*@example.org\"", "alice@example.org/phone", "\"@example.org\""] {
            let e = err(&format!(
                "{BASE}irc:\n  - domain: irc.localhost\naccess:\n  allow: [\"*\"]\n  admins: [{entry}]\n"
            ));
            assert!(e.to_string().contains("is not a bare JID"), "{entry}: {e}");
        }
        let c = from_str(
            &format!("{BASE}access: {{ allow: [\"*\"], admins: [Alice@Example.org] }}\n"),
            Path::new("t.yaml"),
        )
        .expect("a bare JID is fine");
        assert_eq!(c.access.admins, vec!["Alice@Example.org"]);
    }

    #[test]
    fn component_mode_is_closed_unless_someone_is_allowed() {
        // No allow list anywhere: refused, at the network's entry, saying how to open it.
        let e = err(&format!("{BASE}store:\n  url: sqlite://x.db\nirc:\n  - domain: irc.localhost\n"));
        assert_eq!((e.line(), e.column()), (Some(7), Some(5)), "{e}");
        assert!(e.to_string().starts_with("test.yaml:7:5: IRC network `irc.localhost`: nobody may use it"), "{e}");
        assert!(e.message().contains(r#"`access: { allow: ["*"] }`"#), "{e}");
        assert!(e.message().contains("alice@example.net"), "{e}");
        // An explicitly empty list is the same; so is a Matrix network after an open IRC one.
        let e = err(&format!("{BASE}access: {{ allow: [] }}\nmatrix:\n  - domain: m.localhost\n    allow: []\n"));
        assert_eq!(e.line(), Some(6), "{e}");
        assert!(e.message().starts_with("Matrix network `m.localhost`: nobody may use it"), "{e}");
        let e = err(&format!(
            "{BASE}irc:\n  - domain: irc.localhost\n    allow: [example.org]\nmatrix:\n  - domain: m.localhost\n"
        ));
        assert!(e.message().starts_with("Matrix network `m.localhost`"), "{e}");
        assert_eq!(e.line(), Some(8), "{e}");

        // Opened explicitly: everyone, or a list, globally or per network.
        let file = Path::new("c.yaml");
        let c = from_str(&format!("{BASE}irc:\n  - domain: irc.localhost\n{OPEN}"), file).expect("open to everyone");
        assert_eq!(c.access.allow, vec!["*"]);
        from_str(&format!("{BASE}access: {{ allow: [example.org] }}\nirc:\n  - domain: irc.localhost\n"), file)
            .expect("a domain");
        from_str(&format!("{BASE}irc:\n  - domain: irc.localhost\n    allow: [alice@example.org]\n"), file)
            .expect("the network's own list");
        // No network, nothing to open; embedded mode needs no list (its own accounts).
        from_str(BASE, file).expect("no networks");
        from_str("xmpp:\n  mode: embedded\nirc:\n  - domain: irc.localhost\n", file).expect("embedded");
    }

    const TG: &str = "telegram:\n  - domain: tg.localhost\n    token: \"1:abc\"\n";

    #[test]
    fn telegram_networks_load_and_are_checked() {
        let c = from_str(
            &format!("{BASE}{TG}    portals:\n      - {{ name: lobby, chat: -100 }}\n{OPEN}"),
            Path::new("c.yaml"),
        )
        .expect("valid");
        assert_eq!(c.telegram[0].api_url, "https://api.telegram.org");
        assert_eq!(c.telegram[0].relay_template, "{nick}: {text}");
        let e = err(&format!("{BASE}telegram:\n  - domain: tg.localhost\n    token: \"nope\"\n{OPEN}"));
        assert!(e.to_string().contains("is not a bot token"), "{e}");
        let e = err(&format!("{BASE}{TG}    relay_template: \"{{nick}}\"\n{OPEN}"));
        assert!(e.to_string().contains("relay_template"), "{e}");
        let e = err(&format!("{BASE}{TG}    portals:\n      - {{ name: lobby, chat: 5 }}\n{OPEN}"));
        assert!(e.to_string().contains("not a group"), "{e}");
        let e = err(&format!("{BASE}{TG}    portals:\n      - {{ name: lobby, chat: -5, topic: 0 }}\n{OPEN}"));
        assert!(e.to_string().contains("`topic`"), "{e}");
        let e = err(&format!("{BASE}{TG}    portals:\n      - {{ name: Lobby, chat: -5 }}\n{OPEN}"));
        assert!(e.to_string().contains("lower-case"), "{e}");
        let e = err(&format!("{BASE}{TG}"));
        assert!(e.to_string().contains("Telegram network `tg.localhost`: nobody may use it"), "{e}");
    }

    #[test]
    fn portals_are_checked() {
        let irc = "irc:\n  - domain: irc.localhost\n";
        let ok = format!(
            "{BASE}{TG}{irc}portals:\n  - name: both\n    room: both@tg.localhost\n    members:\n      - {{ network: tg.localhost, chat: \"-1\" }}\n      - {{ network: tg.localhost, chat: \"-2\" }}\n{OPEN}"
        );
        let c = from_str(&ok, Path::new("c.yaml")).expect("two chats of one network in one portal");
        assert_eq!(c.portals[0].members.len(), 2);
        let bad = |members: &str, room: &str| {
            err(&format!("{BASE}{TG}{irc}portals:\n  - name: p\n    room: {room}\n    members:\n{members}{OPEN}"))
                .to_string()
        };
        let e = bad("      - { network: irc.localhost, chat: \"#a%srv\" }\n", "p@tg.localhost");
        assert!(e.contains("IRC channels cannot be portal members yet"), "{e}");
        let e = bad("      - { network: nowhere.localhost, chat: \"-1\" }\n", "p@tg.localhost");
        assert!(e.contains("no network has this domain"), "{e}");
        let e = bad("      - { network: tg.localhost, chat: \"-1\" }\n", "p@elsewhere.org");
        assert!(e.contains("must be NAME@DOMAIN"), "{e}");
        let e = err(&format!("{BASE}{TG}portals:\n  - {{ name: p, room: p@tg.localhost, members: [] }}\n{OPEN}"))
            .to_string();
        assert!(e.contains("`members` is empty"), "{e}");
        let e = err(&format!(
            "{BASE}{TG}    portals:\n      - {{ name: lobby, chat: -9 }}\nportals:\n  - {{ name: p, room: lobby@tg.localhost, members: [{{ network: tg.localhost, chat: \"-1\" }}] }}\n{OPEN}"
        ))
        .to_string();
        assert!(e.contains("already a portal of that network's own"), "{e}");
    }

    #[test]
    fn matrix_networks_load_and_are_checked() {
        let c = from_str(
            &format!("{BASE}matrix:\n  - domain: matrix.localhost\n    default_homeserver: https://matrix.org\n{OPEN}"),
            Path::new("/etc/isthmus/isthmus.yaml"),
        )
        .expect("valid");
        assert_eq!(c.matrix[0].domain, "matrix.localhost");
        assert_eq!(c.matrix[0].resolved_data_dir(&c.base_dir), Path::new("/etc/isthmus/matrix"));
        assert!(c.matrix[0].allows_homeserver("https://anywhere.example"));

        let e = err(&format!("{BASE}irc:\n  - domain: x.localhost\nmatrix:\n  - domain: x.localhost\n"));
        assert!(e.to_string().contains("already used by an IRC network"), "{e}");
        let e = err(&format!("{BASE}matrix:\n  - domain: m.localhost\n  - domain: m.localhost\n"));
        assert!(e.to_string().contains("Matrix network #1"), "{e}");
        let e = err(&format!("{BASE}matrix:\n  - domain: m.localhost\n    default_homeserver: matrix.org\n"));
        assert!(e.to_string().contains("not a homeserver URL"), "{e}");
        assert!(e.to_string().starts_with("test.yaml:5:"), "{e}");
        let e = err(&format!(
            "{BASE}matrix:\n  - domain: m.localhost\n    default_homeserver: https://a.org\n    allowed_homeservers: [https://b.org]\n"
        ));
        assert!(e.to_string().contains("not in `allowed_homeservers`"), "{e}");
        let e = err(&format!("{BASE}matrix:\n  - domain: m.localhost\n    homeserver: https://a.org\n"));
        assert!(e.to_string().contains("homeserver"), "{e}");
    }

    #[test]
    fn matrix_media_proxy_is_optional_and_checked() {
        let c =
            from_str(&format!("{BASE}matrix:\n  - domain: m.localhost\n{OPEN}"), Path::new("c.yaml")).expect("valid");
        assert!(c.matrix[0].media.is_none());
        let c = from_str(
            &format!(
                "{BASE}matrix:\n  - domain: m.localhost\n    media: {{ listen: \"127.0.0.1:8091\", public_url: \"https://example.org/mx-media/\" }}\n{OPEN}"
            ),
            Path::new("c.yaml"),
        )
        .expect("valid");
        let media = c.matrix[0].media.as_ref().expect("media");
        assert_eq!(
            (media.listen.as_str(), media.public_url.as_str()),
            ("127.0.0.1:8091", "https://example.org/mx-media/")
        );

        let media = |listen: &str, url: &str| {
            format!(
                "{BASE}matrix:\n  - domain: m.localhost\n    media:\n      listen: \"{listen}\"\n      public_url: \"{url}\"\n"
            )
        };
        let e = err(&media("localhost", "https://example.org"));
        assert!(e.message().contains("not an address to listen on"), "{e}");
        assert!(e.to_string().starts_with("test.yaml:5:"), "{e}");
        for url in ["example.org/media", "https://", "https:///media", "https://example.org/m?x=1", "ftp://example.org"]
        {
            let e = err(&media("127.0.0.1:8091", url));
            assert!(e.message().contains("not a base URL"), "{url}: {e}");
        }
        let e = err(&format!("{BASE}matrix:\n  - domain: m.localhost\n    media: {{ listen: \"127.0.0.1:1\" }}\n"));
        assert!(e.message().contains("public_url"), "{e}");
        let e = err(&format!(
            "{BASE}matrix:\n  - domain: a.localhost\n    media: {{ listen: \"127.0.0.1:1\", public_url: \"http://a\" }}\n  - domain: b.localhost\n    media: {{ listen: \"127.0.0.1:1\", public_url: \"http://b\" }}\n"
        ));
        assert!(e.message().contains("is already the media proxy of b.localhost"), "{e}");
    }

    #[test]
    fn matrix_portals_need_an_appservice_or_a_bot() {
        let portals = "    portals:\n      - { name: lobby, room: \"#lobby:example.org\" }\n";
        let bot = "    bot: { homeserver: \"https://example.org\", user_id: \"@isthmus:example.org\", password: pw }\n";
        let c = from_str(&format!("{BASE}matrix:\n  - domain: m.localhost\n{bot}{portals}{OPEN}"), Path::new("c.yaml"))
            .expect("valid");
        let b = c.matrix[0].bot.as_ref().expect("bot");
        assert_eq!((b.user_id.as_str(), b.password.expose()), ("@isthmus:example.org", "pw"));
        let e = err(&format!("{BASE}matrix:\n  - domain: m.localhost\n{portals}"));
        assert!(e.message().contains("`appservice`") && e.message().contains("`bot`"), "{e}");
        let appservice = "    appservice: { homeserver: \"http://h\", server_name: h, listen: \"127.0.0.1:1\", as_token: a, hs_token: h }\n";
        let e = err(&format!("{BASE}matrix:\n  - domain: m.localhost\n{bot}{appservice}{portals}"));
        assert!(e.message().contains("not both"), "{e}");
        let e = err(&format!(
            "{BASE}matrix:\n  - domain: m.localhost\n    bot: {{ homeserver: \"https://h\", user_id: isthmus, password: p }}\n"
        ));
        assert!(e.message().contains("not a Matrix user id"), "{e}");
        let e = err(&format!(
            "{BASE}matrix:\n  - domain: m.localhost\n    bot: {{ homeserver: h.org, user_id: \"@i:h\", password: p }}\n"
        ));
        assert!(e.message().contains("not a URL"), "{e}");
    }

    #[test]
    fn sasl_external_paths_are_relative_to_the_file_and_checked() {
        let dir = tempfile::tempdir().expect("dir");
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        std::fs::write(dir.path().join("c.pem"), cert).expect("write");
        std::fs::write(dir.path().join("k.pem"), key).expect("write");
        std::fs::write(dir.path().join("both.pem"), format!("{cert}{key}")).expect("write");
        let yaml = |sasl: &str| {
            format!("{BASE}irc:\n  - domain: irc.localhost\n    servers:\n      x: {{ sasl: {sasl} }}\n{OPEN}")
        };
        let c = from_str(
            &yaml("{ mechanism: external, client_cert: c.pem, client_key: k.pem }"),
            &dir.path().join("i.yaml"),
        )
        .expect("valid");
        let sasl = c.irc[0].servers["x"].sasl.clone().expect("sasl");
        assert_eq!(sasl.client_cert.as_deref(), Some(dir.path().join("c.pem").as_path()));
        assert_eq!(sasl.client_key.as_deref(), Some(dir.path().join("k.pem").as_path()));
        from_str(&yaml("{ mechanism: external, client_cert: both.pem }"), &dir.path().join("i.yaml"))
            .expect("key in the cert file");
        let e = from_str(&yaml("{ mechanism: external, client_cert: c.pem }"), &dir.path().join("i.yaml"))
            .expect_err("no key");
        assert!(e.message().contains("no PEM `PRIVATE KEY`"), "{e}");
        let e = from_str(
            &yaml("{ mechanism: external, client_cert: k.pem, client_key: k.pem }"),
            &dir.path().join("i.yaml"),
        )
        .expect_err("no certificate");
        assert!(e.message().contains("no PEM `CERTIFICATE`"), "{e}");
    }

    #[test]
    fn tls_ca_file_is_relative_to_the_file_and_checked() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("ca.pem"), "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
            .expect("write");
        std::fs::write(dir.path().join("junk.pem"), "not a certificate").expect("write");
        let yaml =
            |server: &str| format!("{BASE}irc:\n  - domain: irc.localhost\n    servers:\n      x: {server}\n{OPEN}");
        let file = dir.path().join("i.yaml");
        let c = from_str(&yaml("{ tls_ca_file: ca.pem }"), &file).expect("valid");
        assert_eq!(c.irc[0].servers["x"].tls_ca_file.as_deref(), Some(dir.path().join("ca.pem").as_path()));
        let e = from_str(&yaml("{ tls_ca_file: missing.pem }"), &file).expect_err("missing");
        assert!(e.message().contains("cannot read `tls_ca_file`"), "{e}");
        let e = from_str(&yaml("{ tls_ca_file: junk.pem }"), &file).expect_err("no certificate");
        assert!(e.message().contains("no PEM `CERTIFICATE`"), "{e}");
        let e = from_str(&yaml("{ tls: false, tls_ca_file: ca.pem }"), &file).expect_err("without TLS");
        assert!(e.message().contains("needs `tls: true`"), "{e}");
    }

    const DC: &str = "discord:\n  - domain: dc.localhost\n    token: \"MTIz.Gx.abc-_d\"\n";

    #[test]
    fn discord_networks_load_and_are_checked() {
        let c = from_str(
            &format!("{BASE}{DC}    portals:\n      - {{ name: general, channel: \"300000000000000001\" }}\n{OPEN}"),
            Path::new("c.yaml"),
        )
        .expect("valid");
        let d = &c.discord[0];
        assert_eq!((d.api_url.as_str(), d.cdn_url.as_str()), ("https://discord.com", "https://cdn.discordapp.com"));
        assert_eq!(d.gateway_url, None);
        assert_eq!(d.portals[0].channel, "300000000000000001");
        let c = from_str(
            &format!("{BASE}{DC}    api_url: http://127.0.0.1:8080\n    gateway_url: ws://127.0.0.1:8080/gateway\n    cdn_url: http://127.0.0.1:8080/\n{OPEN}"),
            Path::new("c.yaml"),
        )
        .expect("an emulator or proxy on loopback");
        assert_eq!(c.discord[0].gateway_url.as_deref(), Some("ws://127.0.0.1:8080/gateway"));

        // Each problem at the network's entry (line 5, column 5), saying what to write.
        let at = |extra: &str| {
            let e = err(&format!("{BASE}{DC}{extra}{OPEN}"));
            assert_eq!((e.line(), e.column()), (Some(5), Some(5)), "{e}");
            assert!(e.to_string().starts_with("test.yaml:5:5: Discord network `dc.localhost`: "), "{e}");
            e.message().to_owned()
        };
        let m = at("    api_url: https://discord.com/api/v10\n");
        assert!(m.contains("no path"), "{m}");
        assert!(at("    api_url: discord.com\n").contains("`api_url: discord.com` is not an origin"));
        assert!(at("    gateway_url: https://gateway.discord.gg\n").contains("not a websocket URL"));
        assert!(at("    cdn_url: cdn.discordapp.com\n").contains("`cdn_url"));
        let m = at("    portals:\n      - { name: general, channel: \"#general\" }\n");
        assert!(m.contains("not a channel id") && m.contains("Copy Channel ID"), "{m}");
        assert!(at("    portals:\n      - { name: General, channel: \"1\" }\n").contains("lower-case"));
        let m = at("    portals:\n      - { name: a, channel: \"1\" }\n      - { name: b, channel: \"1\" }\n");
        assert!(m.contains("already another portal's"), "{m}");
        let m = at("    portals:\n      - { name: a, channel: \"1\" }\n      - { name: a, channel: \"2\" }\n");
        assert!(m.contains("listed twice"), "{m}");
        let m = at("    portals:\n      - { name: a, channel: \"0\" }\n");
        assert!(m.contains("not a channel id"), "{m}");

        let e = err(&format!("{BASE}discord:\n  - domain: dc.localhost\n    token: \"Bot MTIz.Gx.abc\"\n{OPEN}"));
        assert!(e.message().contains("without `Bot `"), "{e}");
        let e = err(&format!("{BASE}discord:\n  - domain: dc.localhost\n    token: \"nope\"\n{OPEN}"));
        assert!(e.message().contains("is not a bot token"), "{e}");
        let e = err(&format!("{BASE}discord:\n  - domain: dc.localhost\n{OPEN}"));
        assert!(e.message().contains("token"), "a token is required: {e}");
        let e = err(&format!("{BASE}{DC}    guild: 5\n{OPEN}"));
        assert!(e.message().contains("guild"), "unknown keys are refused: {e}");
        let e = err(&format!("{BASE}{DC}"));
        assert!(e.message().starts_with("Discord network `dc.localhost`: nobody may use it"), "{e}");
        let e = err(&format!("{BASE}{TG}discord:\n  - domain: tg.localhost\n    token: \"a.b\"\n{OPEN}"));
        assert!(e.message().contains("already used by another network"), "{e}");
    }
}
