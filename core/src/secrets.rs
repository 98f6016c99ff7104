//! Secrets at rest: credentials are sealed before they reach the store and opened
//! after reading, with one 256-bit key the database never holds.
//!
//! [`SecretBox`] seals with XChaCha20-Poly1305 and a random 192-bit nonce. A sealed
//! value is versioned: `[1] [key id, 4 bytes] [nonce, 24 bytes] [ciphertext + tag]`;
//! in TEXT columns it is written as [`TEXT_PREFIX`] followed by that in base64. The
//! key id (derived from the key) says which key sealed a value, so that a gateway
//! started with another key can say so instead of failing on every row.
//!
//! The associated data binds a value to its row (see [`associated`]: table, account,
//! network…): the value of one row copied into another does not open there. The
//! version byte and the key id are authenticated too.
//!
//! Values written before sealing existed are in clear; [`is_sealed`] and
//! [`is_sealed_text`] tell them apart so they can be sealed once at start-up.
//!
//! The key comes from the configuration or from a key file made on first start
//! ([`load_or_generate_key_file`], mode 0600). [`SecretBox::derive`] gives keys for
//! other stores (e.g. the passphrase of the Matrix crypto store) from the same key.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use sha2::Sha256;
use thiserror::Error;

/// Length of a key, in bytes.
pub const KEY_LEN: usize = 32;
/// The format version written first in every sealed value.
pub const VERSION: u8 = 1;
/// What a sealed value starts with in a TEXT column.
pub const TEXT_PREFIX: &str = "$sealed1$";

const KEY_ID_LEN: usize = 4;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + KEY_ID_LEN;
const MIN_SEALED_LEN: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;

/// Which key sealed a value (derived from the key; shown as 8 hex digits).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; KEY_ID_LEN]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("the value is not sealed")]
    NotSealed,
    #[error("the value is sealed, and no key was given to open it")]
    NoKey,
    #[error("the sealed value is malformed (format version {0}, or cut short)")]
    Malformed(u8),
    #[error("the value was sealed with key {sealed_with}, not with this key ({have})")]
    WrongKey { sealed_with: KeyId, have: KeyId },
    #[error("the sealed value does not open: it was altered, or belongs to another row")]
    Tampered,
    #[error("the opened value is not UTF-8 text")]
    NotText,
    #[error("the key is not valid: {0}")]
    BadKey(String),
    #[error("the key file {path} {problem}")]
    KeyFile { path: PathBuf, problem: String },
}

/// Seals and opens values with one key. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
    hkdf: Hkdf<Sha256>,
    id: KeyId,
}

impl fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretBox").field("key_id", &self.id).finish_non_exhaustive()
    }
}

/// Associated data for a value of one row: the parts, each preceded by its length,
/// so that no two different lists give the same bytes.
pub fn associated(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p.as_bytes());
    }
    out
}

/// Whether `bytes` is a sealed value (of any key) rather than a value in clear.
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.first() == Some(&VERSION) && bytes.len() >= MIN_SEALED_LEN
}

/// Whether `text` is a sealed value written for a TEXT column.
pub fn is_sealed_text(text: &str) -> bool {
    text.starts_with(TEXT_PREFIX)
}

/// The key that sealed `bytes`, when it is a sealed value.
pub fn sealed_key_id(bytes: &[u8]) -> Option<KeyId> {
    is_sealed(bytes).then(|| {
        let mut id = [0; KEY_ID_LEN];
        id.copy_from_slice(&bytes[1..HEADER_LEN]);
        KeyId(id)
    })
}

/// A new random key.
pub fn generate_key() -> [u8; KEY_LEN] {
    XChaCha20Poly1305::generate_key(&mut OsRng).into()
}

/// A key as written in a key file or in the configuration: 64 hex digits.
pub fn encode_key(key: &[u8; KEY_LEN]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A key from text: 64 hex digits, or 32 bytes in base64 (surrounding blanks ignored).
pub fn parse_key(text: &str) -> Result<[u8; KEY_LEN], SecretError> {
    let text = text.trim();
    let bytes = if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..KEY_LEN).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16)).collect::<Result<Vec<u8>, _>>().ok()
    } else {
        STANDARD.decode(text).ok()
    };
    match bytes {
        Some(b) if b.len() == KEY_LEN => {
            let mut key = [0; KEY_LEN];
            key.copy_from_slice(&b);
            Ok(key)
        }
        Some(b) => Err(SecretError::BadKey(format!(
            "it is {} bytes long; expected {KEY_LEN} bytes, written as 64 hex digits (or base64)",
            b.len()
        ))),
        None => Err(SecretError::BadKey(format!(
            "it is neither 64 hex digits nor base64 ({} characters); generate one with `openssl rand -hex 32`",
            text.len()
        ))),
    }
}

/// The key in the file at `path`; when there is no file, a new key written there
/// (mode 0600, the directory created if needed). Returns the box and whether the
/// file was created. A file that exists but cannot be read or holds no valid key
/// is an error, never replaced.
pub fn load_or_generate_key_file(path: &Path) -> Result<(SecretBox, bool), SecretError> {
    let problem = |problem: String| SecretError::KeyFile { path: path.to_path_buf(), problem };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = parse_key(&text).map_err(|e| problem(format!("holds no valid key: {e}")))?;
            Ok((SecretBox::new(&key), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate_key();
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| problem(format!("cannot be created: {e}")))?;
            }
            write_new_private(path, format!("{}\n", encode_key(&key)).as_bytes())
                .map_err(|e| problem(format!("cannot be created: {e}")))?;
            Ok((SecretBox::new(&key), true))
        }
        Err(e) => Err(problem(format!("exists but cannot be read: {e}"))),
    }
}

/// Write a new file readable by its owner only; an existing file is an error.
fn write_new_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

impl SecretBox {
    pub fn new(key: &[u8; KEY_LEN]) -> SecretBox {
        let hkdf = Hkdf::<Sha256>::new(None, key);
        let mut id = [0; KEY_ID_LEN];
        // Infallible: 4 bytes is far below HKDF-SHA256's output limit.
        let _ = hkdf.expand(b"isthmus key id", &mut id);
        SecretBox { cipher: XChaCha20Poly1305::new(key.into()), hkdf, id: KeyId(id) }
    }

    /// Which key this is (safe to show: it reveals nothing of the key).
    pub fn key_id(&self) -> KeyId {
        self.id
    }

    /// A 256-bit key for another use, named by `label`, for `context` (HKDF-SHA256).
    pub fn derive(&self, label: &str, context: &[u8]) -> [u8; KEY_LEN] {
        let mut info = associated(&[label]);
        info.extend_from_slice(context);
        let mut out = [0; KEY_LEN];
        // Infallible: 32 bytes is far below HKDF-SHA256's output limit.
        let _ = self.hkdf.expand(&info, &mut out);
        out
    }

    fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0; HEADER_LEN];
        h[0] = VERSION;
        h[1..].copy_from_slice(&self.id.0);
        h
    }

    /// Seal `plaintext` for the row that `associated_data` names.
    pub fn seal(&self, plaintext: &[u8], associated_data: &[u8]) -> Vec<u8> {
        let header = self.header();
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = [&header[..], associated_data].concat();
        // Encryption fails only for plaintexts beyond 256 GiB.
        let ciphertext = self.cipher.encrypt(&nonce, Payload { msg: plaintext, aad: &aad }).unwrap_or_default();
        [&header[..], nonce.as_slice(), &ciphertext].concat()
    }

    /// Open a value sealed by [`SecretBox::seal`] for the same associated data.
    pub fn open(&self, sealed: &[u8], associated_data: &[u8]) -> Result<Vec<u8>, SecretError> {
        match sealed.first() {
            None => return Err(SecretError::NotSealed),
            Some(&VERSION) if sealed.len() >= MIN_SEALED_LEN => {}
            Some(&VERSION) => return Err(SecretError::Malformed(VERSION)),
            Some(_) => return Err(SecretError::NotSealed),
        }
        let (header, rest) = sealed.split_at(HEADER_LEN);
        let sealed_with = sealed_key_id(sealed).ok_or(SecretError::Malformed(VERSION))?;
        if sealed_with != self.id {
            return Err(SecretError::WrongKey { sealed_with, have: self.id });
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let aad = [header, associated_data].concat();
        self.cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: &aad })
            .map_err(|_| SecretError::Tampered)
    }

    /// [`SecretBox::seal`] for a TEXT column: [`TEXT_PREFIX`] and base64.
    pub fn seal_text(&self, plaintext: &str, associated_data: &[u8]) -> String {
        format!("{TEXT_PREFIX}{}", STANDARD.encode(self.seal(plaintext.as_bytes(), associated_data)))
    }

    /// Open a value written by [`SecretBox::seal_text`].
    pub fn open_text(&self, text: &str, associated_data: &[u8]) -> Result<String, SecretError> {
        let encoded = text.strip_prefix(TEXT_PREFIX).ok_or(SecretError::NotSealed)?;
        let sealed = STANDARD.decode(encoded).map_err(|_| SecretError::Malformed(VERSION))?;
        String::from_utf8(self.open(&sealed, associated_data)?).map_err(|_| SecretError::NotText)
    }

    /// The key that sealed a TEXT value, when it is one.
    pub fn sealed_text_key_id(text: &str) -> Option<KeyId> {
        let encoded = text.strip_prefix(TEXT_PREFIX)?;
        sealed_key_id(&STANDARD.decode(encoded).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(byte: u8) -> SecretBox {
        SecretBox::new(&[byte; KEY_LEN])
    }

    #[test]
    fn round_trip_bytes_and_text() {
        let b = boxed(7);
        let ad = associated(&["accounts", "alice@example.org", "matrix.example.org"]);
        let sealed = b.seal(b"syt_token", &ad);
        assert!(is_sealed(&sealed));
        assert_eq!(sealed[0], VERSION);
        assert!(!sealed.windows(9).any(|w| w == b"syt_token"));
        assert_eq!(b.open(&sealed, &ad), Ok(b"syt_token".to_vec()));
        let text = b.seal_text("{\"sasl_password\":\"hunter2\"}", &ad);
        assert!(is_sealed_text(&text) && !text.contains("hunter2"));
        assert_eq!(b.open_text(&text, &ad).as_deref(), Ok("{\"sasl_password\":\"hunter2\"}"));
        assert_eq!(b.open(&b.seal(b"", &ad), &ad), Ok(Vec::new()));
        // a random nonce: the same value seals differently each time
        assert_ne!(b.seal(b"x", &ad), b.seal(b"x", &ad));
    }

    #[test]
    fn a_wrong_key_is_named() {
        let ad = associated(&["t"]);
        let sealed = boxed(1).seal(b"secret", &ad);
        let other = boxed(2);
        assert_eq!(
            other.open(&sealed, &ad),
            Err(SecretError::WrongKey { sealed_with: boxed(1).key_id(), have: other.key_id() })
        );
        assert_eq!(sealed_key_id(&sealed), Some(boxed(1).key_id()));
        let text = boxed(1).seal_text("secret", &ad);
        assert_eq!(SecretBox::sealed_text_key_id(&text), Some(boxed(1).key_id()));
        assert!(matches!(other.open_text(&text, &ad), Err(SecretError::WrongKey { .. })));
    }

    #[test]
    fn a_tampered_byte_does_not_open() {
        let b = boxed(3);
        let ad = associated(&["t"]);
        let sealed = b.seal(b"secret value", &ad);
        for i in HEADER_LEN..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert_eq!(b.open(&t, &ad), Err(SecretError::Tampered), "byte {i}");
        }
        // a changed key id is a wrong key; a cut value is malformed
        let mut t = sealed.clone();
        t[1] ^= 0x01;
        assert!(matches!(b.open(&t, &ad), Err(SecretError::WrongKey { .. })));
        assert_eq!(b.open(&sealed[..MIN_SEALED_LEN - 1], &ad), Err(SecretError::Malformed(VERSION)));
        assert_eq!(b.open(&sealed[..sealed.len() - 1], &ad), Err(SecretError::Tampered));
    }

    #[test]
    fn a_value_moved_to_another_row_does_not_open() {
        let b = boxed(4);
        let alice = associated(&["user_settings", "alice@x", "irc.x", "srv"]);
        let bob = associated(&["user_settings", "bob@x", "irc.x", "srv"]);
        let sealed = b.seal_text("{}", &alice);
        assert_eq!(b.open_text(&sealed, &bob), Err(SecretError::Tampered));
        // the length prefixes keep the parts apart
        assert_ne!(associated(&["ab", "c"]), associated(&["a", "bc"]));
    }

    #[test]
    fn values_in_clear_are_recognised() {
        let b = boxed(5);
        let ad = associated(&["t"]);
        for clear in [&b"{\"homeserver\":\"https://m.org\"}"[..], b"", b"\x01short"] {
            assert!(!is_sealed(clear));
        }
        assert!(!is_sealed_text("{\"nick\":\"bob\"}") && !is_sealed_text("channel-key"));
        assert_eq!(b.open(b"{}", &ad), Err(SecretError::NotSealed));
        assert_eq!(b.open_text("{}", &ad), Err(SecretError::NotSealed));
        assert_eq!(b.open_text("$sealed1$!!", &ad), Err(SecretError::Malformed(VERSION)));
    }

    #[test]
    fn keys_parse_from_hex_or_base64_and_derive_apart() {
        let key = [0xab; KEY_LEN];
        assert_eq!(parse_key(&format!(" {}\n", encode_key(&key))), Ok(key));
        assert_eq!(parse_key(&STANDARD.encode(key)), Ok(key));
        assert!(parse_key("abcd").is_err_and(|e| e.to_string().contains("expected 32 bytes")));
        assert!(parse_key("not a key!").is_err_and(|e| e.to_string().contains("64 hex digits")));
        let b = SecretBox::new(&key);
        assert_ne!(b.derive("matrix store", b"alice"), b.derive("matrix store", b"bob"));
        assert_ne!(b.derive("matrix store", b"alice"), b.derive("other", b"alice"));
        assert_eq!(b.derive("matrix store", b"alice"), SecretBox::new(&key).derive("matrix store", b"alice"));
        assert!(!format!("{b:?}").contains("ab"));
    }

    #[test]
    fn the_key_file_is_made_once_private_and_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sub/isthmus.key");
        let (first, created) = load_or_generate_key_file(&path).expect("generated");
        assert!(created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("metadata").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (again, created) = load_or_generate_key_file(&path).expect("read back");
        assert!(!created);
        assert_eq!(first.key_id(), again.key_id());

        std::fs::write(&path, "0123").expect("write");
        let e = load_or_generate_key_file(&path).expect_err("too short");
        assert!(e.to_string().contains("holds no valid key") && e.to_string().contains("isthmus.key"), "{e}");
        let dir_as_file = dir.path().join("sub");
        let e = load_or_generate_key_file(&dir_as_file).expect_err("a directory");
        assert!(e.to_string().contains("cannot be read"), "{e}");
    }
}
