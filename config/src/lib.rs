//! Isthmus configuration: the typed YAML schema, secrets, and validation.
//!
//! One YAML file describes the XMPP link, the store, who may use the gateway and
//! the networks. It is read with serde-saphyr; every problem — a YAML syntax
//! error, a wrong type, an unknown or missing key, an unset environment variable,
//! a rule broken between keys — is reported as `FILE:LINE:COLUMN: message`.
//!
//! Secrets are never written in logs (`Secret` prints `***`); in YAML a secret is
//! a string with `${VAR}` interpolation, `{ env: VAR }`, or `{ file: PATH }`.
//!
//! This crate depends on no other Isthmus crate; all of them may depend on it.

mod error;
mod schema;
mod secret;
mod validate;

use std::path::{Path, PathBuf};

pub use error::ConfigError;
pub use schema::*;
pub use secret::Secret;

/// Read, parse and validate the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, e))?;
    from_str(&src, path)
}

/// Parse and validate configuration text; `origin` names it in messages and
/// anchors relative paths (its directory).
pub fn from_str(src: &str, origin: &Path) -> Result<Config, ConfigError> {
    let raw: schema::RawConfig = serde_saphyr::from_str(src).map_err(|e| ConfigError::from_yaml(origin, src, &e))?;
    let base_dir = match origin.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut config = raw.into_config(base_dir);
    validate::resolve_secrets(&mut config, origin)?;
    validate::check(&config, origin)?;
    Ok(config)
}
