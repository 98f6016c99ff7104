//! Secrets: values that never appear in logs, read from the YAML text with
//! `${VAR}` interpolation, from `{ env: VAR }`, or from `{ file: PATH }`.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde_saphyr::Spanned;

/// How a secret was written in YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum SecretSpec {
    /// Text, with `${VAR}` replaced from the environment and `$$` for a literal `$`.
    Text(String),
    /// `{ env: VAR }`.
    Env { env: String },
    /// `{ file: PATH }`, relative to the configuration file's directory.
    File { file: PathBuf },
}

/// A secret value (password, component secret, token). Prints as `***`.
#[derive(Clone, Deserialize)]
#[serde(from = "Spanned<SecretSpec>")]
pub struct Secret {
    pub(crate) spec: Spanned<SecretSpec>,
    pub(crate) value: String,
}

impl From<Spanned<SecretSpec>> for Secret {
    fn from(spec: Spanned<SecretSpec>) -> Self {
        Secret { spec, value: String::new() }
    }
}

impl Secret {
    /// A secret with a known value (for programs that build configurations).
    pub fn new(value: impl Into<String>) -> Self {
        let value = value.into();
        let spec = Spanned::new(
            SecretSpec::Text(String::new()),
            serde_saphyr::Location::UNKNOWN,
            serde_saphyr::Location::UNKNOWN,
        );
        Secret { spec, value }
    }

    /// The secret value.
    pub fn expose(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Replace `${VAR}` with the variable's value; `$$` is a literal `$`.
pub(crate) fn interpolate(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail.find('}').ok_or_else(|| "`${` is not closed by `}`".to_owned())?;
            let name = &tail[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`${{{name}}}` is not a valid environment variable name"));
            }
            let value = lookup(name)
                .ok_or_else(|| format!("environment variable `{name}` is not set (referenced as `${{{name}}}`)"))?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "HOME_X").then(|| "/home/x".to_owned())
    }

    #[test]
    fn interpolates_variables_and_dollars() {
        assert_eq!(interpolate("a${HOME_X}b", env).unwrap(), "a/home/xb");
        assert_eq!(interpolate("cost $$5 and $x", env).unwrap(), "cost $5 and $x");
        assert_eq!(interpolate("plain", env).unwrap(), "plain");
    }

    #[test]
    fn reports_unset_and_malformed() {
        assert!(interpolate("${NOPE}", env).unwrap_err().contains("`NOPE` is not set"));
        assert!(interpolate("${OPEN", env).unwrap_err().contains("not closed"));
        assert!(interpolate("${a-b}", env).unwrap_err().contains("not a valid"));
    }

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }
}
