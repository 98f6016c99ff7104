//! Files between Matrix and XMPP.
//!
//! **Matrix → XMPP.** XMPP clients cannot fetch `mxc://server/id` (and the
//! homeserver's download needs an access token), so the bridge runs a small
//! HTTP server, the media proxy, when the network's configuration has `media`.
//! Incoming attachments get a link of the form
//! `{public_url}/{token}/{server}/{media_id}/{filename}`, where `token` is
//! HMAC-SHA256 of `server/media_id` under a random key kept in the network's
//! data directory ([`KEY_FILE`]): the proxy only answers links the gateway
//! handed out (anything else is 404, it is no open proxy). It downloads the
//! file through one of the network's logged-in accounts and answers with a
//! `Content-Type` taken from the link's file name among a fixed list of types
//! ([`mime_of_name`]), with `nosniff` and a sandboxing CSP, so a link cannot be
//! turned into a page of the gateway's origin.
//!
//! **XMPP → Matrix.** [`upload_attachment`] fetches an attachment's URL (at most
//! [`MAX_FILE_BYTES`]) with a [`Fetcher`] and uploads it to the homeserver;
//! `session` then sends the file event that `outgoing::file_content` builds.
//! The fetcher refuses, unless the network's `fetch_private_addresses` allows
//! them, every address that is not public ([`is_public`], in [`crate::net_guard`]: loopback, private,
//! link-local, shared, unspecified, multicast…), whether the URL names it, its
//! host name resolves to it (checked on every connection, so a name cannot
//! change its answer between the check and the download) or a redirect leads there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, LazyLock, RwLock};

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use isthmus_config::MatrixMediaConfig;
use isthmus_core::model::{Attachment, EventKind, Message, NetworkId};
use isthmus_core::network::DeliveryError;
use matrix_sdk::Client;
use matrix_sdk::media::{MediaFormat, MediaRequestParameters};
use matrix_sdk::ruma::OwnedMxcUri;
use matrix_sdk::ruma::api::error::ErrorKind;
use matrix_sdk::ruma::events::room::MediaSource;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span};

use crate::outgoing::UploadedFile;
pub use isthmus_core::media::{Fetcher, attachment_name, is_public};

/// The signing key's file in the network's data directory (64 hex digits).
pub const KEY_FILE: &str = "media_proxy.key";
/// The largest file fetched from XMPP for Matrix.
pub const MAX_FILE_BYTES: u64 = 100 * 1024 * 1024;
/// Downloads from the homeserver the proxy runs at once (each is held in memory).
const MAX_DOWNLOADS: usize = 8;
/// How many of the network's accounts a download is tried with.
const MAX_TRIES: usize = 3;

type HmacSha256 = Hmac<Sha256>;

pub use isthmus_core::media::proxy::{
    OCTET_STREAM, essence, extension_of_mime, from_hex, inline, link_file_name, load_or_create_key, mime_of_name,
    percent_decode, percent_encode, to_hex, type_of_name,
};
use isthmus_core::media::proxy::{file_response, plain};

/// A homeserver name as in an `mxc://` URI: host name, IP literal, optional port.
fn valid_server(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

/// A media id (`[A-Za-z0-9_-]+`).
fn valid_media_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `mxc://server/media_id` → (server, media_id), when both are well-formed.
pub fn parse_mxc(url: &str) -> Option<(&str, &str)> {
    let (server, media_id) = url.strip_prefix("mxc://")?.split_once('/')?;
    (valid_server(server) && valid_media_id(media_id)).then_some((server, media_id))
}

/// How a file of an encrypted room is encrypted (its `file` object: the key, the
/// counter block and the ciphertext's SHA-256, as the event spells them). An
/// attachment carries it after its `mxc://` address as `#KEY.IV.SHA256`; the proxy
/// link carries it as one more path segment (under the link's token), so the proxy
/// can decrypt without storing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encryption {
    /// The AES-CTR key, unpadded URL-safe base64 (JWK `k`).
    pub key: String,
    /// The counter block, unpadded base64.
    pub iv: String,
    /// The ciphertext's SHA-256, unpadded base64.
    pub sha256: String,
}

fn is_base64(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/-_=".contains(&b))
}

impl Encryption {
    /// From an event's `file` object (version 2 of attachment encryption).
    pub fn of_file(file: &serde_json::Value) -> Option<Encryption> {
        let text = |v: &serde_json::Value| v.as_str().filter(|s| is_base64(s)).map(str::to_owned);
        Some(Encryption {
            key: text(&file["key"]["k"])?,
            iv: text(&file["iv"])?,
            sha256: text(&file["hashes"]["sha256"])?,
        })
    }

    /// `KEY.IV.SHA256`, percent-encoded (base64 has no `.`).
    pub fn segment(&self) -> String {
        format!("{}.{}.{}", percent_encode(&self.key), percent_encode(&self.iv), percent_encode(&self.sha256))
    }

    /// Read a [`Encryption::segment`] (already percent-decoded).
    pub fn parse(segment: &str) -> Option<Encryption> {
        let mut parts = segment.split('.');
        let (key, iv, sha256) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || ![key, iv, sha256].iter().all(|p| is_base64(p)) {
            return None;
        }
        Some(Encryption { key: key.to_owned(), iv: iv.to_owned(), sha256: sha256.to_owned() })
    }

    /// The event's `file` object for the file at `mxc`.
    pub fn file_json(&self, mxc: &str) -> serde_json::Value {
        serde_json::json!({
            "url": mxc,
            "key": {"kty": "oct", "key_ops": ["encrypt", "decrypt"], "alg": "A256CTR", "k": self.key, "ext": true},
            "iv": self.iv,
            "hashes": {"sha256": self.sha256},
            "v": "v2",
        })
    }
}

/// The attachment address of an encrypted file: `mxc://server/id#KEY.IV.SHA256`
/// (the media proxy turns it into a link; without one the part after `#` is dropped).
pub fn encrypted_attachment_url(file: &serde_json::Value) -> Option<String> {
    let url = file["url"].as_str()?;
    parse_mxc(url)?;
    Some(format!("{url}#{}", Encryption::of_file(file)?.segment()))
}

/// The parts of a proxy link's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPath {
    pub token: String,
    pub server: String,
    pub media_id: String,
    /// For a file of an encrypted room: how to decrypt it.
    pub encryption: Option<Encryption>,
    pub filename: String,
}

/// Makes and checks the proxy's links.
pub struct Links {
    key: [u8; 32],
    /// `public_url` without a trailing `/`.
    base: String,
    /// The path part of `public_url` (`/matrix-media`), or empty.
    prefix: String,
}

impl Links {
    pub fn new(key: [u8; 32], public_url: &str) -> Links {
        let base = public_url.trim_end_matches('/').to_owned();
        let after_scheme = base.split_once("://").map_or(base.as_str(), |(_, rest)| rest);
        let prefix = after_scheme.find('/').map(|i| after_scheme[i..].to_owned()).unwrap_or_default();
        Links { key, base, prefix }
    }

    fn mac(&self, server: &str, media_id: &str, encryption: Option<&Encryption>) -> HmacSha256 {
        // HMAC takes keys of any length: this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(server.as_bytes());
        mac.update(b"/");
        mac.update(media_id.as_bytes());
        if let Some(e) = encryption {
            mac.update(b"/");
            mac.update(e.segment().as_bytes());
        }
        mac
    }

    /// The token of `server/media_id` (64 hex digits).
    pub fn token(&self, server: &str, media_id: &str) -> String {
        self.token_of(server, media_id, None)
    }

    fn token_of(&self, server: &str, media_id: &str, encryption: Option<&Encryption>) -> String {
        to_hex(&self.mac(server, media_id, encryption).finalize().into_bytes())
    }

    /// Whether `token` is the one this gateway gives `server/media_id` (compared in constant time).
    pub fn check(&self, token: &str, server: &str, media_id: &str) -> bool {
        self.check_path(&ProxyPath {
            token: token.to_owned(),
            server: server.to_owned(),
            media_id: media_id.to_owned(),
            encryption: None,
            filename: String::new(),
        })
    }

    /// Whether the token of a link's path is the one this gateway gives its file.
    pub fn check_path(&self, p: &ProxyPath) -> bool {
        match from_hex(&p.token) {
            Some(bytes) if bytes.len() == 32 => {
                self.mac(&p.server, &p.media_id, p.encryption.as_ref()).verify_slice(&bytes).is_ok()
            }
            _ => false,
        }
    }

    /// The proxy link of `mxc` (with `#KEY.IV.SHA256` for an encrypted file), or
    /// `None` when it is no well-formed `mxc://` URI.
    pub fn link(&self, mxc: &str, name: Option<&str>, mime: Option<&str>) -> Option<String> {
        let (mxc, encryption) = match mxc.split_once('#') {
            Some((mxc, segment)) => (mxc, Some(Encryption::parse(&percent_decode(segment)?)?)),
            None => (mxc, None),
        };
        let (server, media_id) = parse_mxc(mxc)?;
        let file = link_file_name(name, media_id, mime);
        let encryption_segment = encryption.as_ref().map(|e| format!("/{}", e.segment())).unwrap_or_default();
        Some(format!(
            "{}/{}/{}/{}{encryption_segment}/{}",
            self.base,
            self.token_of(server, media_id, encryption.as_ref()),
            percent_encode(server),
            percent_encode(media_id),
            percent_encode(&file)
        ))
    }

    /// Give every `mxc://` attachment of `m` its proxy link.
    pub fn rewrite(&self, m: &mut Message) {
        for a in &mut m.attachments {
            if let Some(url) = self.link(&a.url, a.name.as_deref(), a.mime.as_deref()) {
                a.url = url;
            }
        }
    }

    /// Read a request path: `{prefix}/{token}/{server}/{media_id}[/{encryption}]/{filename}`,
    /// the prefix (the path of `public_url`) being optional for a reverse proxy that strips it.
    /// `None` for anything else, including server names and media ids that are not well-formed.
    pub fn parse_path(&self, path: &str) -> Option<ProxyPath> {
        let rest = match path.strip_prefix(self.prefix.as_str()) {
            Some(rest) if !self.prefix.is_empty() && rest.starts_with('/') => rest,
            _ => path,
        };
        let parts: Vec<&str> = rest.strip_prefix('/')?.split('/').collect();
        let (token, server, media_id, encryption, filename) = match parts.as_slice() {
            [token, server, media_id, filename] => (*token, *server, *media_id, None, *filename),
            [token, server, media_id, encryption, filename] => {
                (*token, *server, *media_id, Some(Encryption::parse(&percent_decode(encryption)?)?), *filename)
            }
            _ => return None,
        };
        if filename.is_empty() {
            return None;
        }
        let server = percent_decode(server)?;
        let media_id = percent_decode(media_id)?;
        if !valid_server(&server) || !valid_media_id(&media_id) {
            return None;
        }
        Some(ProxyPath { token: token.to_owned(), server, media_id, encryption, filename: percent_decode(filename)? })
    }
}

/// The links of the networks whose proxy runs, by network id: `session` reaches
/// them with [`proxied`] without holding a reference to the network.
static RUNNING: LazyLock<RwLock<HashMap<String, Arc<Links>>>> = LazyLock::new(Default::default);

/// `kind` with the attachments of a message or correction pointing at `network`'s
/// media proxy; unchanged when that network runs none.
pub fn proxied(network: &NetworkId, mut kind: EventKind) -> EventKind {
    let links = RUNNING.read().unwrap_or_else(|e| e.into_inner()).get(network.as_str()).cloned();
    if let EventKind::Message(m) | EventKind::Correction { message: m, .. } = &mut kind {
        match links {
            Some(links) => links.rewrite(m),
            None => {
                // No proxy: the bare mxc:// address (an encrypted file's key stays here).
                for a in &mut m.attachments {
                    if let Some(i) = a.url.find('#').filter(|_| a.url.starts_with("mxc://")) {
                        a.url.truncate(i);
                    }
                }
            }
        }
    }
    kind
}

/// The network's logged-in clients, for the proxy to download with.
pub type Clients = Arc<dyn Fn() -> BoxFuture<'static, Vec<Client>> + Send + Sync>;

/// Another way to download a (plain) file, `(server, media_id)`, when no linked account
/// has it: the portal rooms' application service or bot account.
pub type Fallback = Arc<dyn Fn(String, String) -> BoxFuture<'static, Result<Vec<u8>, StatusCode>> + Send + Sync>;

struct State {
    links: Arc<Links>,
    clients: Clients,
    fallback: Option<Fallback>,
    downloads: Semaphore,
}

/// A running media proxy; dropping it stops it.
pub struct MediaProxy {
    pub links: Arc<Links>,
    pub local_addr: SocketAddr,
    network: String,
    task: JoinHandle<()>,
}

impl Drop for MediaProxy {
    fn drop(&mut self) {
        self.task.abort();
        let mut running = RUNNING.write().unwrap_or_else(|e| e.into_inner());
        if running.get(&self.network).is_some_and(|l| Arc::ptr_eq(l, &self.links)) {
            running.remove(&self.network);
        }
    }
}

/// Start `network`'s media proxy on `config.listen` (on the current Tokio runtime),
/// with the key in `data_dir`; from then on [`proxied`] rewrites its attachments.
pub fn start(
    network: &NetworkId,
    config: &MatrixMediaConfig,
    data_dir: &Path,
    clients: Clients,
    fallback: Option<Fallback>,
) -> Result<MediaProxy, String> {
    let key = load_or_create_key(&data_dir.join(KEY_FILE))?;
    let links = Arc::new(Links::new(key, &config.public_url));
    let addr: SocketAddr =
        config.listen.parse().map_err(|_| format!("`{}` is not an address to listen on", config.listen))?;
    let runtime = tokio::runtime::Handle::try_current().map_err(|e| format!("no runtime to serve on: {e}"))?;
    let listener = std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local_addr = listener.local_addr().map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let listener = {
        let _entered = runtime.enter();
        TcpListener::from_std(listener).map_err(|e| format!("cannot listen on {addr}: {e}"))?
    };
    let state = Arc::new(State { links: links.clone(), clients, fallback, downloads: Semaphore::new(MAX_DOWNLOADS) });
    let span = info_span!("matrix_media", network = %network);
    let task = runtime.spawn(serve(listener, state).instrument(span));
    RUNNING.write().unwrap_or_else(|e| e.into_inner()).insert(network.as_str().to_owned(), links.clone());
    info!(network = %network, listen = %local_addr, public_url = %config.public_url, "Matrix media proxy listening");
    Ok(MediaProxy { links, local_addr, network: network.as_str().to_owned(), task })
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    let handler: isthmus_core::media::proxy::Handler = Arc::new(move |req| {
        let state = state.clone();
        Box::pin(async move { handle(&state, req).await })
    });
    isthmus_core::media::proxy::serve_http(listener, handler).await
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let not_found = || plain(StatusCode::NOT_FOUND, "not found\n");
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return not_found();
    }
    let Some(p) = state.links.parse_path(req.uri().path()) else { return not_found() };
    if !state.links.check_path(&p) {
        debug!(path = req.uri().path(), "media proxy: not a link of this gateway");
        return not_found();
    }
    match download(state, &p.server, &p.media_id, p.encryption.as_ref()).await {
        Ok(bytes) => file_response(bytes, &p.filename),
        Err(status) if status == StatusCode::NOT_FOUND => not_found(),
        Err(status) if status == StatusCode::SERVICE_UNAVAILABLE => {
            plain(status, "no Matrix account is logged in through this gateway right now\n")
        }
        Err(status) => plain(status, "the Matrix homeserver did not hand out the file\n"),
    }
}

/// The file's bytes, through the network's accounts (one of the media's own
/// homeserver first); the status to answer with when none has it.
async fn download(
    state: &State,
    server: &str,
    media_id: &str,
    encryption: Option<&Encryption>,
) -> Result<Vec<u8>, StatusCode> {
    let uri = OwnedMxcUri::from(format!("mxc://{server}/{media_id}"));
    if !uri.is_valid() {
        return Err(StatusCode::NOT_FOUND);
    }
    let source = match encryption {
        None => MediaSource::Plain(uri),
        Some(e) => {
            let file = serde_json::from_value(e.file_json(uri.as_str())).map_err(|e| {
                debug!(server, media_id, error = %e, "media proxy: unreadable encryption");
                StatusCode::NOT_FOUND
            })?;
            MediaSource::Encrypted(Box::new(file))
        }
    };
    let mut clients = (state.clients)().await;
    let _permit = state.downloads.acquire().await.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    if clients.is_empty() {
        // No linked account: the portal rooms' application service or bot, for plain files.
        return match (&state.fallback, encryption) {
            (Some(fallback), None) => fallback(server.to_owned(), media_id.to_owned()).await,
            _ => Err(StatusCode::SERVICE_UNAVAILABLE),
        };
    }
    clients.sort_by_key(|c| c.user_id().is_none_or(|u| u.server_name().as_str() != server));
    let request = MediaRequestParameters { source, format: MediaFormat::File };
    let mut status = StatusCode::BAD_GATEWAY;
    for client in clients.iter().take(MAX_TRIES) {
        match client.media().get_media_content(&request, true).await {
            Ok(bytes) => return Ok(bytes),
            Err(e) => {
                let missing = matches!(e.client_api_error_kind(), Some(ErrorKind::NotFound));
                debug!(server, media_id, error = %e, "media proxy: download failed");
                if missing {
                    status = StatusCode::NOT_FOUND;
                }
            }
        }
    }
    if let (Some(fallback), None) = (&state.fallback, encryption) {
        return fallback(server.to_owned(), media_id.to_owned()).await;
    }
    Err(status)
}

/// The type a file is sent to Matrix as: the attachment's own, else the one its
/// server gave, else the one its name says, else `application/octet-stream`.
pub fn choose_mime(declared: Option<&str>, served: Option<&str>, name: &str) -> mime::Mime {
    let known =
        |m: Option<&str>| m.and_then(|m| m.parse::<mime::Mime>().ok()).filter(|m| m.essence_str() != OCTET_STREAM);
    known(declared)
        .or_else(|| known(served))
        .or_else(|| known(type_of_name(name).map(|(_, m, _)| *m)))
        .unwrap_or(mime::APPLICATION_OCTET_STREAM)
}

/// Fetch attachment `a` and upload it to `client`'s homeserver; for an encrypted
/// room (`encrypt`), encrypted, with the `file` object that says how to decrypt it.
pub async fn upload_attachment(
    client: &Client,
    fetcher: &Fetcher,
    a: &Attachment,
    encrypt: bool,
) -> Result<UploadedFile, DeliveryError> {
    let refused = |why: String| DeliveryError::Rejected(format!("the file {} cannot be sent to Matrix: {why}", a.url));
    let (bytes, served) = fetcher.fetch(&a.url, MAX_FILE_BYTES).await.map_err(refused)?;
    let name = attachment_name(a);
    let mime = choose_mime(a.mime.as_deref(), served.as_deref(), &name);
    let size = bytes.len() as u64;
    let upload_error = |e: matrix_sdk::Error| match e.client_api_error_kind() {
        Some(kind) => refused(format!("the homeserver refused it ({})", kind.errcode())),
        None => DeliveryError::Unavailable(format!("cannot upload {} to the Matrix homeserver: {e}", a.url)),
    };
    let mime_text = mime.essence_str().to_owned();
    if encrypt {
        let file = client.upload_encrypted_file(&mut std::io::Cursor::new(bytes)).await.map_err(upload_error)?;
        let json = serde_json::to_value(&file)
            .map_err(|e| DeliveryError::Unavailable(format!("cannot describe the encrypted file: {e}")))?;
        return Ok(UploadedFile { url: file.url.to_string(), name, mime: mime_text, size, encrypted: Some(json) });
    }
    let response = client.media().upload(&mime, bytes, None).await.map_err(upload_error)?;
    Ok(UploadedFile { url: response.content_uri.to_string(), name, mime: mime_text, size, encrypted: None })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn links() -> Links {
        Links::new([7; 32], "https://gw.example/mx-media/")
    }

    #[tokio::test]
    async fn private_targets_are_refused_before_any_connection() {
        let fetcher = Fetcher::new(false);
        for url in [
            "http://127.0.0.1:9/x.png",
            "http://[::1]:9/x.png",
            "https://10.0.0.1/x.png",
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:127.0.0.1]:9/x",
            "http://localhost:9/x.png",
        ] {
            let e = fetcher.fetch(url, 10).await.expect_err(url);
            assert!(e.contains("does not fetch files from such addresses"), "{url}: {e}");
        }
        let e = fetcher.fetch("http://127.0.0.1:9/x", 10).await.expect_err("loopback");
        assert!(e.contains("127.0.0.1 is a loopback address"), "{e}");
    }

    #[test]
    fn tokens_sign_exactly_one_media() {
        let l = links();
        let token = l.token("localhost", "abcDEF");
        assert_eq!(token.len(), 64);
        assert!(l.check(&token, "localhost", "abcDEF"));
        // Another media id, another server, a tampered or truncated token, another key: refused.
        assert!(!l.check(&token, "localhost", "abcDEG"));
        assert!(!l.check(&token, "otherhost", "abcDEF"));
        let mut tampered = token.clone().into_bytes();
        tampered[10] = if tampered[10] == b'0' { b'1' } else { b'0' };
        assert!(!l.check(&String::from_utf8(tampered).unwrap(), "localhost", "abcDEF"));
        assert!(!l.check(&token[..62], "localhost", "abcDEF"));
        assert!(!l.check("zz", "localhost", "abcDEF"));
        assert!(!l.check("", "localhost", "abcDEF"));
        assert!(!Links::new([8; 32], "https://gw.example").check(&token, "localhost", "abcDEF"));
        // `server/media_id` is one message: moving the slash changes the token.
        assert_ne!(l.token("a", "bc"), l.token("ab", "c"));
    }

    #[test]
    fn links_are_made_and_read_back() {
        let l = links();
        let url = l.link("mxc://localhost:8448/AbC_d-1", Some("cat picture.png"), Some("image/png")).unwrap();
        let token = l.token("localhost:8448", "AbC_d-1");
        assert_eq!(url, format!("https://gw.example/mx-media/{token}/localhost%3A8448/AbC_d-1/cat%20picture.png"));
        let path = url.strip_prefix("https://gw.example").unwrap();
        let p = l.parse_path(path).unwrap();
        assert_eq!(
            p,
            ProxyPath {
                token: token.clone(),
                server: "localhost:8448".into(),
                media_id: "AbC_d-1".into(),
                encryption: None,
                filename: "cat picture.png".into()
            }
        );
        assert!(l.check(&p.token, &p.server, &p.media_id));
        // A reverse proxy may strip the prefix; a client may leave `:` unescaped.
        let stripped = format!("/{token}/localhost:8448/AbC_d-1/x.png");
        assert_eq!(l.parse_path(&stripped).map(|p| p.server), Some("localhost:8448".into()));
        // Not mxc, or not well-formed: no link.
        assert_eq!(l.link("https://example.org/a.png", None, None), None);
        assert_eq!(l.link("mxc://localhost/../../etc", None, None), None);
        assert_eq!(l.link("mxc://local host/x", None, None), None);
    }

    #[test]
    fn encrypted_files_carry_their_key_under_the_token() {
        let l = links();
        let file = serde_json::json!({"url": "mxc://localhost/EnC", "v": "v2",
            "key": {"kty": "oct", "alg": "A256CTR", "k": "qcHVMSgYg-71CauWBezXI5qkaRb0LuIy-Wx5kIaHMIA", "ext": true},
            "iv": "X85+XgHN+HEAAAAAAAAAAA", "hashes": {"sha256": "5qG4fFnbbVdlAB1Q72JDKwCagV6Dbkx9uds4rSak37c"}});
        let url = encrypted_attachment_url(&file).unwrap();
        assert!(url.starts_with("mxc://localhost/EnC#qcHVMSgYg-71"), "{url}");
        let link = l.link(&url, Some("secret.png"), None).unwrap();
        let p = l.parse_path(link.strip_prefix("https://gw.example").unwrap()).unwrap();
        let e = p.encryption.clone().unwrap();
        assert_eq!(
            (e.iv.as_str(), p.media_id.as_str(), p.filename.as_str()),
            ("X85+XgHN+HEAAAAAAAAAAA", "EnC", "secret.png")
        );
        assert!(l.check_path(&p));
        // The event's `file` comes back, and matrix-sdk reads it.
        let again = e.file_json("mxc://localhost/EnC");
        assert_eq!(
            (&again["key"]["k"], &again["iv"], &again["hashes"]),
            (&file["key"]["k"], &file["iv"], &file["hashes"])
        );
        let _: matrix_sdk::ruma::events::room::EncryptedFile = serde_json::from_value(again).unwrap();
        // Another key under the same token, or the plain file's token, is refused.
        let other = ProxyPath { encryption: Some(Encryption { key: "AAAA".into(), ..e }), ..p.clone() };
        assert!(!l.check_path(&other));
        assert!(!l.check(&p.token, &p.server, &p.media_id));
        // Without a proxy the key is not shown to XMPP.
        let kind = proxied(
            &NetworkId::new("no-proxy-here"),
            EventKind::Message(Message {
                attachments: vec![Attachment { url, name: None, mime: None, size: None }],
                ..Message::default()
            }),
        );
        let EventKind::Message(m) = kind else { panic!("a message") };
        assert_eq!(m.attachments[0].url, "mxc://localhost/EnC");
    }

    #[test]
    fn proxy_paths_that_are_not_links_are_refused() {
        let l = links();
        let t = l.token("localhost", "abc");
        for bad in [
            "/".to_owned(),
            "/mx-media".to_owned(),
            format!("/mx-media/{t}/localhost/abc"),
            format!("/mx-media/{t}/localhost/abc/"),
            format!("/mx-media/{t}/localhost/abc/f.png/more"),
            format!("/mx-media/{t}/localhost/a%2Fb/f.png"),
            format!("/mx-media/{t}/local%20host/abc/f.png"),
            format!("/mx-media/{t}/localhost/ab%/f.png"),
            format!("/mx-media/{t}/localhost/abc/f%zz.png"),
            format!("/mx-media/{t}//abc/f.png"),
            format!("mx-media/{t}/localhost/abc/f.png"),
        ] {
            assert_eq!(l.parse_path(&bad), None, "{bad}");
        }
        // Without a path in `public_url`, paths start at the token.
        let root = Links::new([7; 32], "http://127.0.0.1:8091");
        assert_eq!(root.parse_path(&format!("/{t}/localhost/abc/f.png")).map(|p| p.media_id), Some("abc".into()));
    }

    #[test]
    fn file_names_say_their_type() {
        assert_eq!(link_file_name(Some("cat.png"), "id", Some("image/png")), "cat.png");
        assert_eq!(link_file_name(Some("photo"), "id", Some("image/jpeg")), "photo.jpg");
        assert_eq!(link_file_name(Some("cat.JPEG"), "id", Some("image/jpeg")), "cat.JPEG");
        assert_eq!(link_file_name(Some("notes.txt"), "id", Some("text/plain; charset=utf-8")), "notes.txt");
        assert_eq!(link_file_name(None, "AbC", Some("video/mp4")), "AbC.mp4");
        assert_eq!(link_file_name(Some("../../x.bin"), "id", Some("application/x-unknown")), "x.bin");
        assert_eq!(link_file_name(Some("  "), "id", None), "id");
        assert_eq!(mime_of_name("a.PNG"), "image/png");
        assert_eq!(mime_of_name("page.html"), OCTET_STREAM);
        assert_eq!(mime_of_name("image.svg"), OCTET_STREAM);
        assert_eq!(mime_of_name("noextension"), OCTET_STREAM);
        assert!(inline("a.webm") && !inline("a.pdf") && !inline("a.html"));
    }

    #[test]
    fn percent_encoding_round_trips() {
        for s in ["plain", "a b/c?d#e%f", "é☃", ""] {
            assert_eq!(percent_decode(&percent_encode(s)).as_deref(), Some(s));
        }
        assert_eq!(percent_encode("a b"), "a%20b");
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%g0"), None);
    }

    #[test]
    fn attachments_of_a_running_proxy_are_rewritten() {
        let net = NetworkId::new("media-test-rewrite");
        let att = |url: &str| Attachment { url: url.into(), name: Some("a.png".into()), mime: None, size: None };
        let m = Message { attachments: vec![att("mxc://localhost/abc"), att("https://x/a.png")], ..Message::text("") };
        // No proxy: unchanged.
        assert_eq!(proxied(&net, EventKind::Message(m.clone())), EventKind::Message(m.clone()));
        RUNNING.write().unwrap().insert(net.as_str().to_owned(), Arc::new(links()));
        let EventKind::Message(out) = proxied(&net, EventKind::Message(m.clone())) else { panic!("not a message") };
        let token = links().token("localhost", "abc");
        assert_eq!(out.attachments[0].url, format!("https://gw.example/mx-media/{token}/localhost/abc/a.png"));
        assert_eq!(out.attachments[1].url, "https://x/a.png");
        let kind = EventKind::Correction { target: isthmus_core::model::MessageRef("$e".into()), message: m };
        let EventKind::Correction { message, .. } = proxied(&net, kind) else { panic!("not a correction") };
        assert!(message.attachments[0].url.starts_with("https://gw.example/mx-media/"));
        RUNNING.write().unwrap().remove(net.as_str());
    }

    #[test]
    fn the_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net").join(KEY_FILE);
        let key = load_or_create_key(&path).unwrap();
        assert_eq!(load_or_create_key(&path).unwrap(), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::write(&path, "not a key").unwrap();
        assert!(load_or_create_key(&path).unwrap_err().contains("not a media proxy key"));
    }

    #[test]
    fn outgoing_types_and_names() {
        assert_eq!(choose_mime(Some("image/png"), Some("text/plain"), "x"), mime::IMAGE_PNG);
        assert_eq!(choose_mime(None, Some("image/gif"), "x.png"), mime::IMAGE_GIF);
        assert_eq!(choose_mime(Some("garbage"), Some(OCTET_STREAM), "x.png"), mime::IMAGE_PNG);
        assert_eq!(choose_mime(None, None, "x.dat"), mime::APPLICATION_OCTET_STREAM);
        let a = |url: &str, name: Option<&str>| Attachment {
            url: url.into(),
            name: name.map(Into::into),
            mime: None,
            size: None,
        };
        assert_eq!(attachment_name(&a("https://h/up/abc/My%20Cat.png", None)), "My Cat.png");
        assert_eq!(attachment_name(&a("https://h/up/abc/x.png", Some("given.png"))), "given.png");
        assert_eq!(attachment_name(&a("https://h/up/abc/My%20Cat.png", Some("My%20Cat.png"))), "My Cat.png");
        assert_eq!(attachment_name(&a("https://h/", None)), "file");
        assert_eq!(attachment_name(&a("not a url", None)), "file");
    }

    /// One raw HTTP/1.0 request to the proxy; the status line and the whole answer.
    async fn get(addr: SocketAddr, method: &str, path: &str) -> (String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        (out.lines().next().unwrap_or_default().to_owned(), out)
    }

    #[tokio::test]
    async fn the_server_answers_only_its_links() {
        let dir = tempfile::tempdir().unwrap();
        let net = NetworkId::new("media-test-server");
        let config = MatrixMediaConfig { listen: "127.0.0.1:0".into(), public_url: "http://127.0.0.1/m".into() };
        let clients: Clients = Arc::new(|| Box::pin(async { Vec::new() }));
        let proxy = start(&net, &config, dir.path(), clients, None).unwrap();
        let link = proxy.links.link("mxc://localhost/abc", Some("a.png"), None).unwrap();
        let path = link.strip_prefix("http://127.0.0.1").unwrap();
        // A real link, with no account logged in: 503, said in words.
        let (status, all) = get(proxy.local_addr, "GET", path).await;
        assert_eq!(status, "HTTP/1.0 503 Service Unavailable", "{all}");
        assert!(all.contains("no Matrix account"), "{all}");
        // Anything else: 404.
        let wrong = path.replace("/abc/", "/abd/");
        assert_eq!(get(proxy.local_addr, "GET", &wrong).await.0, "HTTP/1.0 404 Not Found");
        assert_eq!(get(proxy.local_addr, "GET", "/m/x/y/z/w").await.0, "HTTP/1.0 404 Not Found");
        assert_eq!(get(proxy.local_addr, "POST", path).await.0, "HTTP/1.0 404 Not Found");
        assert_eq!(get(proxy.local_addr, "GET", "/").await.0, "HTTP/1.0 404 Not Found");
        assert!(proxied(&net, EventKind::Message(Message::text(""))) == EventKind::Message(Message::text("")));
        drop(proxy);
        assert!(!RUNNING.read().unwrap().contains_key(net.as_str()));
    }
}
