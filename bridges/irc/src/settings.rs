//! Each user's own settings for one IRC server (nick, SASL login, server
//! password, on-connect commands), changed with `configure` on the server's
//! address and stored as JSON in the core store. They take precedence over the
//! admin's defaults for that server at the next connection.

use isthmus_config::{IrcServerConfig, SaslConfig, SaslMechanism, Secret};
use isthmus_core::network::{SettingField, SettingKind, SettingValues, SettingsError};
use serde::{Deserialize, Serialize};

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
];

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

    /// These settings with `values` applied, and the names of what changed; an
    /// invalid value or unknown field is an error and nothing is applied.
    pub fn apply(&self, values: &SettingValues) -> Result<(UserSettings, Vec<&'static str>), SettingsError> {
        let mut next = self.clone();
        for (var, given) in values {
            match var.as_str() {
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
                _ => next.on_connect != self.on_connect,
            })
            .collect();
        Ok((next, changed))
    }

    /// The admin's `server` configuration with these settings over it.
    pub fn over(&self, mut server: IrcServerConfig) -> IrcServerConfig {
        if let Some(user) = &self.sasl_user {
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
        server
    }

    /// A summary of what `changed` became, never showing a password.
    pub fn describe(&self, changed: &[&str]) -> String {
        if changed.is_empty() {
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
            assert!(matches!(s.apply(&bad), Err(SettingsError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn changes_are_named_and_passwords_never_shown() {
        let s = UserSettings::default();
        let (next, changed) = s.apply(&values(&[("nick", &["bob"]), ("sasl_password", &["hunter2"])])).expect("valid");
        assert_eq!(changed, vec!["nick", "sasl_password"]);
        let text = next.describe(&changed);
        assert!(text.contains("nick: bob") && text.contains("sasl_password: set") && !text.contains("hunter2"));
        let fields = next.fields();
        assert!(fields.iter().all(|f| !f.values.iter().any(|v| v.contains("hunter2"))));
        assert!(fields.iter().any(|f| f.var == "sasl_password" && f.is_set));
        let (_, unchanged) = next.apply(&values(&[("nick", &["bob"])])).expect("valid");
        assert!(unchanged.is_empty());
    }

    #[test]
    fn user_settings_win_over_the_admins() {
        let admin = IrcServerConfig { on_connect: vec!["JOIN #a".into()], ..Default::default() };
        let s = UserSettings { sasl_user: Some("u".into()), sasl_password: Some("p".into()), ..Default::default() };
        let merged = s.over(admin);
        assert_eq!(merged.on_connect, vec!["JOIN #a".to_owned()]);
        let sasl = merged.sasl.expect("sasl");
        assert_eq!(sasl.username.as_deref(), Some("u"));
        assert_eq!(sasl.password.map(|p| p.expose().to_owned()).as_deref(), Some("p"));
    }
}
