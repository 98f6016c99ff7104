//! Configuration errors, always naming the file and, when known, line and column.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_saphyr::{Location, RenderOptions, SnippetMode};

/// A problem with the configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    file: PathBuf,
    position: Option<(u64, u64)>,
    message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl ConfigError {
    pub(crate) fn io(file: &Path, e: std::io::Error) -> Self {
        ConfigError { file: file.to_path_buf(), position: None, message: format!("cannot read the file: {e}") }
    }

    pub(crate) fn at(file: &Path, location: &Location, message: impl Into<String>) -> Self {
        let position = (location.line() > 0).then(|| (location.line(), location.column()));
        ConfigError { file: file.to_path_buf(), position, message: message.into() }
    }

    pub(crate) fn from_yaml(file: &Path, src: &str, e: &serde_saphyr::Error) -> Self {
        let mut options = RenderOptions::default();
        options.snippets = SnippetMode::Off;
        let rendered = e.without_snippet().render_with_options(options);
        let position = e.location().filter(|l| l.line() > 0).map(|l| (l.line(), l.column()));
        let mut message = strip_location(&rendered);
        // "invalid u16" → "expected u16, found `abc`": say what was there too.
        if let (Some(ty), Some((line, column))) = (message.strip_prefix("invalid "), position)
            && !ty.contains(' ')
        {
            let found = token_at(src, line, column);
            message = format!("expected {ty}, found `{found}`");
        }
        ConfigError { file: file.to_path_buf(), position, message }
    }

    /// The 1-based line of the problem, when known.
    pub fn line(&self) -> Option<u64> {
        self.position.map(|p| p.0)
    }

    /// The 1-based column of the problem, when known.
    pub fn column(&self) -> Option<u64> {
        self.position.map(|p| p.1)
    }

    /// What is wrong, without the location.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// serde-saphyr appends the position to plain messages; we print it in front instead.
fn strip_location(msg: &str) -> String {
    let msg = msg.trim();
    for marker in [" at line ", " at "] {
        if let Some(i) = msg.rfind(marker) {
            let tail = &msg[i + marker.len()..];
            if tail.chars().next().is_some_and(|c| c.is_ascii_digit()) || tail.starts_with("line") {
                return msg[..i].trim_end_matches([',', ':']).to_owned();
            }
        }
    }
    msg.to_owned()
}

/// The scalar written at a 1-based line and column (to the end of the line, comments cut).
fn token_at(src: &str, line: u64, column: u64) -> String {
    let text = src.lines().nth(line.saturating_sub(1) as usize).unwrap_or("");
    let tail: String = text.chars().skip(column.saturating_sub(1) as usize).collect();
    let tail = tail.split(" #").next().unwrap_or("");
    tail.trim().trim_end_matches(',').to_owned()
}
