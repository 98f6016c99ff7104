//! Each user's own settings for one IRC server (nick, SASL login, client
//! certificate, server password, on-connect commands), changed with `configure`
//! on the server's address and stored as JSON in the core store. They take
//! precedence over the admin's defaults for that server at the next connection.

use isthmus_config::{IrcServerConfig, SaslConfig, SaslMechanism, Secret};
use isthmus_core::network::{SettingField, SettingKind, SettingValues, SettingsError};
use serde::{Deserialize, Serialize};

use crate::certfp::ClientIdentity;

/// The longest nick accepted (servers may allow less: they then cut it or refuse it).
const MAX_NICK_LEN: usize = 30;

/// One user's settings for one server; `None`/empty: the admin's default.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UserSettings {
    pub nick: Option<String>,
    pub sasl_user: Option<String>,
    pub sasl_password: Option<String>,
    pub password: Option<String>,
    pub on_connect: Vec<String>,
    /// The client certificate the gateway made for this user here (`certfp`):
    /// presented on TLS connections, and SASL EXTERNAL logs in with it.
    pub client_cert: Option<ClientIdentity>,
}

/// Passwords are never logged.
impl std::fmt::Debug for UserSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserSettings")
            .field("nick", &self.nick)
            .field("sasl_user", &self.sasl_user)
            .field("sasl_password", &self.sasl_password.as_ref().map(|_| "<set>"))
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("on_connect", &self.on_connect)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

/// The field names, in form order, with their labels and kinds.
const FIELDS: &[(&str, &str, SettingKind)] = &[
    ("nick", "Your nick on this server (empty: the nick you join rooms with)", SettingKind::Text),
    ("sasl_user", "SASL PLAIN username (services account)", SettingKind::Text),
    ("sasl_password", "SASL PLAIN password (empty: unchanged)", SettingKind::Secret),
    ("password", "Server password (empty: unchanged)", SettingKind::Secret),
    ("on_connect", "IRC commands sent after connecting, one per line", SettingKind::Lines),
    (
        "certfp",
        "Client certificate for SASL EXTERNAL: `generate` makes one (or shows yours), `regenerate` replaces it, empty removes it",
        SettingKind::Text,
    ),
];

/// What `certfp=` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CertRequest {
    /// Make one unless there is one; show it.
    Generate,
    /// Replace it with a new one.
    Regenerate,
    /// Remove it.
    Remove,
    /// Keep it (the form sends back the fingerprint it showed).
    Keep,
}

/// Whether `nick` is a valid IRC nickname (RFC 2812 letters, digits and specials).
pub fn valid_nick(nick: &str) -> bool {
    let special = |c: char| "[]\\`_^{|}".contains(c);
    let mut chars = nick.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || special(c))
        && chars.all(|c| c.is_ascii_alphanumeric() || special(c) || c == '-')
        && nick.len() <= MAX_NICK_LEN
}

fn no_line_breaks(var: &str, value: &str) -> Result<(), SettingsError> {
    if value.contains(['\r', '\n', '\0']) {
        return Err(SettingsError::Invalid(format!("`{var}` cannot contain line breaks or NUL characters")));
    }
    Ok(())
}

/// A single value: none when cleared.
fn single(var: &str, values: &[String]) -> Result<Option<String>, SettingsError> {
    match values {
        [] => Ok(None),
        [v] if v.is_empty() => Ok(None),
        [v] => no_line_breaks(var, v).map(|()| Some(v.clone())),
        _ => Err(SettingsError::Invalid(format!("`{var}` takes one value"))),
    }
}

impl UserSettings {
    /// The fields with their current values (secrets only say whether they are set).
    pub fn fields(&self) -> Vec<SettingField> {
        FIELDS
            .iter()
            .map(|&(var, label, kind)| {
                let values: Vec<String> = match var {
                    "nick" => self.nick.iter().cloned().collect(),
                    "sasl_user" => self.sasl_user.iter().cloned().collect(),
                    "on_connect" => self.on_connect.clone(),
                    "certfp" => self.sha256().into_iter().collect(),
                    _ => Vec::new(),
                };
                let is_set = match var {
                    "sasl_password" => self.sasl_password.is_some(),
                    "password" => self.password.is_some(),
                    _ => !values.is_empty(),
                };
                SettingField { var, label, kind, values, is_set }
            })
            .collect()
    }

    /// The SHA-256 fingerprint of the client certificate, if there is one.
    fn sha256(&self) -> Option<String> {
        self.client_cert.as_ref().and_then(|c| c.fingerprints().ok()).map(|f| f.sha256)
    }

    fn cert_request(&self, values: &[String]) -> Result<CertRequest, SettingsError> {
        match values {
            [] => Ok(CertRequest::Remove),
            [v] if v.is_empty() => Ok(CertRequest::Remove),
            [v] if v.eq_ignore_ascii_case("generate") => Ok(CertRequest::Generate),
            [v] if v.eq_ignore_ascii_case("regenerate") => Ok(CertRequest::Regenerate),
            [v] if self.sha256().is_some_and(|fp| v.trim().eq_ignore_ascii_case(&fp)) => Ok(CertRequest::Keep),
            _ => Err(SettingsError::Invalid(
                "`certfp` takes `generate` (make a client certificate, or show yours), `regenerate` (replace it with a new one) or nothing (`certfp=`: remove it)".to_owned(),
            )),
        }
    }

    /// These settings with `values` applied, and the names of what changed; an
    /// invalid value or unknown field is an error and nothing is applied.
    /// `server` is the admin's configuration of the server (a client certificate needs TLS).
    pub fn apply(
        &self,
        values: &SettingValues,
        server: &str,
        config: &IrcServerConfig,
    ) -> Result<(UserSettings, Vec<&'static str>), SettingsError> {
        let mut next = self.clone();
        for (var, given) in values {
            match var.as_str() {
                "certfp" => match self.cert_request(given)? {
                    CertRequest::Generate | CertRequest::Regenerate if !config.tls => {
                        return Err(SettingsError::Invalid(format!(
                            "a client certificate needs TLS, and the gateway connects to {server} without TLS: it could not present the certificate, nor log in with SASL EXTERNAL. Use sasl_user and sasl_password instead, or ask the admin to connect to {server} with TLS"
                        )));
                    }
                    CertRequest::Generate if self.client_cert.is_some() => {}
                    CertRequest::Generate | CertRequest::Regenerate => {
                        let made = ClientIdentity::generate().map_err(|e| SettingsError::Unavailable(e.to_string()))?;
                        next.client_cert = Some(made);
                    }
                    CertRequest::Remove => next.client_cert = None,
                    CertRequest::Keep => {}
                },
                "nick" => {
                    let nick = single(var, given)?;
                    if let Some(n) = nick.as_deref().filter(|n| !valid_nick(n)) {
                        return Err(SettingsError::Invalid(format!(
                            "`{n}` is not a valid IRC nick: it must start with a letter or one of []\\`_^{{|}}, continue with letters, digits, those or `-`, and have at most {MAX_NICK_LEN} characters"
                        )));
                    }
                    next.nick = nick;
                }
                "sasl_user" => next.sasl_user = single(var, given)?,
                "sasl_password" => next.sasl_password = single(var, given)?,
                "password" => next.password = single(var, given)?,
                "on_connect" => {
                    let mut lines = Vec::new();
                    for line in given.iter().filter(|l| !l.trim().is_empty()) {
                        no_line_breaks(var, line)?;
                        format!("{line}\r\n")
                            .parse::<irc::proto::Message>()
                            .map_err(|e| SettingsError::Invalid(format!("`{line}` is not a valid IRC command: {e}")))?;
                        lines.push(line.clone());
                    }
                    next.on_connect = lines;
                }
                other => {
                    let known: Vec<&str> = FIELDS.iter().map(|f| f.0).collect();
                    return Err(SettingsError::Invalid(format!(
                        "unknown setting `{other}`; the settings are {}",
                        known.join(", ")
                    )));
                }
            }
        }
        let changed = FIELDS
            .iter()
            .map(|f| f.0)
            .filter(|&var| match var {
                "nick" => next.nick != self.nick,
                "sasl_user" => next.sasl_user != self.sasl_user,
                "sasl_password" => next.sasl_password != self.sasl_password,
                "password" => next.password != self.password,
                "certfp" => next.client_cert != self.client_cert,
                _ => next.on_connect != self.on_connect,
            })
            .collect();
        Ok((next, changed))
    }

    /// The admin's `server` configuration with these settings over it, and the
    /// client certificate to present (only on TLS connections): with one, SASL
    /// EXTERNAL replaces any other SASL login.
    pub fn over(&self, mut server: IrcServerConfig) -> (IrcServerConfig, Option<ClientIdentity>) {
        let identity = self.client_cert.clone().filter(|_| server.tls);
        if identity.is_some() {
            server.sasl = Some(SaslConfig {
                mechanism: SaslMechanism::External,
                username: None,
                password: None,
                client_cert: None,
                client_key: None,
            });
        } else if let Some(user) = &self.sasl_user {
            let admin_password = server.sasl.as_ref().and_then(|s| s.password.clone());
            server.sasl = Some(SaslConfig {
                mechanism: SaslMechanism::Plain,
                username: Some(user.clone()),
                password: self.sasl_password.clone().map(Secret::new).or(admin_password),
                client_cert: None,
                client_key: None,
            });
        } else if let (Some(password), Some(sasl)) = (&self.sasl_password, server.sasl.as_mut()) {
            sasl.password = Some(Secret::new(password.clone()));
        }
        if let Some(p) = &self.password {
            server.password = Some(Secret::new(p.clone()));
        }
        if !self.on_connect.is_empty() {
            server.on_connect = self.on_connect.clone();
        }
        (server, identity)
    }

    /// What to do with the client certificate: its fingerprints (the SHA-256
    /// one first, what InspIRCd and Atheme show) and how to register it.
    fn certificate_text(&self) -> String {
        let Some(cert) = &self.client_cert else {
            return "certfp: no client certificate (SASL EXTERNAL is not used)".to_owned();
        };
        match cert.fingerprints() {
            Ok(fp) => format!(
                "certfp: your client certificate, presented from the next connection to this server, which then logs in with SASL EXTERNAL.\n\
                 SHA-256 fingerprint: {sha256}\n\
                 SHA-512 fingerprint: {sha512}\n\
                 Add it to your services account while identified to it: send here `PRIVMSG NickServ :CERT ADD {sha256}` (in an IRC client: /msg NickServ CERT ADD {sha256}); where the server shows SHA-512 fingerprints, add that one. Then leave all rooms on this server and join again.",
                sha256 = fp.sha256,
                sha512 = fp.sha512
            ),
            Err(e) => format!("certfp: {e}; make a new one with certfp=regenerate"),
        }
    }

    /// A summary of what `changed` became, never showing a password nor the
    /// private key; with `certfp` asked for, the certificate's fingerprints even
    /// when it did not change.
    pub fn describe(&self, changed: &[&str], certfp_asked: bool) -> String {
        if changed.is_empty() {
            if certfp_asked {
                return format!("Nothing changed.\n{}", self.certificate_text());
            }
            return "Nothing changed.".to_owned();
        }
        let lines: Vec<String> = changed
            .iter()
            .map(|&var| match var {
                "nick" => format!("nick: {}", self.nick.as_deref().unwrap_or("(the nick you join rooms with)")),
                "sasl_user" => format!("sasl_user: {}", self.sasl_user.as_deref().unwrap_or("(server default)")),
                "sasl_password" => {
                    format!("sasl_password: {}", if self.sasl_password.is_some() { "set" } else { "cleared" })
                }
                "password" => format!("password: {}", if self.password.is_some() { "set" } else { "cleared" }),
                "certfp" => self.certificate_text(),
                _ if self.on_connect.is_empty() => "on_connect: (server default)".to_owned(),
                _ => format!("on_connect: {}", self.on_connect.join(" | ")),
            })
            .collect();
        format!("Changed (used from the next connection to this server):\n{}", lines.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls() -> IrcServerConfig {
        IrcServerConfig::default()
    }

    fn values(pairs: &[(&str, &[&str])]) -> SettingValues {
        pairs.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect()
    }

    #[test]
    fn nicks_are_checked() {
        assert!(valid_nick("alice") && valid_nick("[al]-1") && valid_nick("_x"));
        assert!(
            !valid_nick("") && !valid_nick("1abc") && !valid_nick("a b") && !valid_nick("a:b") && !valid_nick("a,b")
        );
    }

    #[test]
    fn invalid_input_changes_nothing() {
        let s = UserSettings { nick: Some("al".into()), ..Default::default() };
        for bad in [
            values(&[("nick", &["bo"]), ("sasl_password", &["x\r\nQUIT"])]),
            values(&[("nick", &["no way"])]),
            values(&[("colour", &["red"])]),
            values(&[("on_connect", &[""]), ("password", &["a\nb"])]),
        ] {
            assert!(matches!(s.apply(&bad, "irc", &tls()), Err(SettingsError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn changes_are_named_and_passwords_never_shown() {
        let s = UserSettings::default();
        let (next, changed) =
            s.apply(&values(&[("nick", &["bob"]), ("sasl_password", &["hunter2"])]), "irc", &tls()).expect("valid");
        assert_eq!(changed, vec!["nick", "sasl_password"]);
        let text = next.describe(&changed, false);
        assert!(text.contains("nick: bob") && text.contains("sasl_password: set") && !text.contains("hunter2"));
        let fields = next.fields();
        assert!(fields.iter().all(|f| !f.values.iter().any(|v| v.contains("hunter2"))));
        assert!(fields.iter().any(|f| f.var == "sasl_password" && f.is_set));
        let (_, unchanged) = next.apply(&values(&[("nick", &["bob"])]), "irc", &tls()).expect("valid");
        assert!(unchanged.is_empty());
    }

    #[test]
    fn user_settings_win_over_the_admins() {
        let admin = IrcServerConfig { on_connect: vec!["JOIN #a".into()], ..Default::default() };
        let s = UserSettings { sasl_user: Some("u".into()), sasl_password: Some("p".into()), ..Default::default() };
        let (merged, identity) = s.over(admin);
        assert!(identity.is_none());
        assert_eq!(merged.on_connect, vec!["JOIN #a".to_owned()]);
        let sasl = merged.sasl.expect("sasl");
        assert_eq!(sasl.username.as_deref(), Some("u"));
        assert_eq!(sasl.password.map(|p| p.expose().to_owned()).as_deref(), Some("p"));
    }

    #[test]
    fn certfp_is_generated_once_shown_again_and_needs_tls() {
        let s = UserSettings { sasl_user: Some("u".into()), ..Default::default() };
        let (next, changed) = s.apply(&values(&[("certfp", &["generate"])]), "irc", &tls()).expect("generate");
        assert_eq!(changed, vec!["certfp"]);
        let fp = next.client_cert.as_ref().expect("made").fingerprints().expect("fingerprints");
        let text = next.describe(&changed, true);
        assert!(text.contains(&fp.sha256) && text.contains(&format!("CERT ADD {}", fp.sha256)), "{text}");
        assert!(text.find(&fp.sha256) < text.find(&fp.sha512), "SHA-256 first: {text}");
        assert!(!text.contains("PRIVATE KEY") && !format!("{next:?}").contains("PRIVATE KEY"));
        // asked again: the same certificate, shown again
        let (again, changed) = next.apply(&values(&[("certfp", &["generate"])]), "irc", &tls()).expect("again");
        assert!(changed.is_empty() && again == next);
        assert!(again.describe(&changed, true).contains(&fp.sha256));
        // the form shows the fingerprint and sends it back: kept
        let field = next.fields().into_iter().find(|f| f.var == "certfp").expect("field");
        assert_eq!(field.values, vec![fp.sha256.clone()]);
        let (kept, changed) = next.apply(&values(&[("certfp", &[fp.sha256.as_str()])]), "irc", &tls()).expect("kept");
        assert!(changed.is_empty() && kept == next);
        // only an explicit request makes a new one
        let (new, changed) = next.apply(&values(&[("certfp", &["regenerate"])]), "irc", &tls()).expect("new");
        assert_eq!(changed, vec!["certfp"]);
        assert_ne!(new.client_cert.as_ref().expect("new").fingerprints().expect("fp").sha256, fp.sha256);
        // with it, the connection presents it and logs in with SASL EXTERNAL
        let (merged, identity) = next.over(tls());
        assert_eq!(identity.as_ref(), next.client_cert.as_ref());
        assert_eq!(merged.sasl.expect("sasl").mechanism, SaslMechanism::External);
        // removed
        let (gone, changed) = next.apply(&values(&[("certfp", &[])]), "irc", &tls()).expect("removed");
        assert!(changed == vec!["certfp"] && gone.client_cert.is_none());
        // anything else, and any request without TLS, is refused
        assert!(matches!(next.apply(&values(&[("certfp", &["yes"])]), "irc", &tls()), Err(SettingsError::Invalid(_))));
        let plain = IrcServerConfig { tls: false, ..Default::default() };
        let Err(SettingsError::Invalid(why)) = s.apply(&values(&[("certfp", &["generate"])]), "irc", &plain) else {
            panic!("a certificate without TLS");
        };
        assert!(why.contains("needs TLS") && why.contains("irc"), "{why}");
        let (merged, identity) = next.over(plain);
        assert!(identity.is_none() && merged.sasl.is_some_and(|s| s.mechanism == SaslMechanism::Plain));
    }
}
