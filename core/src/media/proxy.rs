//! The media proxy: an HTTP server that makes a network's files fetchable by
//! XMPP clients under links the gateway signed, without handing out the
//! network's credentials (a Telegram bot token, a Matrix access token).
//!
//! A link is `{public_url}/{source}/{token}/{id}/{filename}`: `source` names the
//! network that holds the file, `id` is the network's id for it, and `token` is
//! HMAC-SHA256 of `source/id` under a random key kept in a file next to the store
//! ([`load_or_create_key`]). The proxy answers only links the gateway handed out
//! (anything else is 404: it is no open proxy), fetches the file from its source
//! ([`MediaSource`]) at most [`MAX_PROXIED_BYTES`] big and a few at a time, and
//! answers with a `Content-Type` taken from the link's file name among a fixed
//! list ([`mime_of_name`]; nothing a browser runs scripts from), `nosniff` and a
//! sandboxing CSP, so a link cannot be turned into a page of the gateway's origin.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rand::Rng;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span, warn};

type HmacSha256 = Hmac<Sha256>;

/// The largest file the proxy hands out (each is held in memory while it is).
pub const MAX_PROXIED_BYTES: usize = 100 * 1024 * 1024;
/// Downloads from the sources the proxy runs at once.
const MAX_DOWNLOADS: usize = 8;

/// File types the proxy names, by extension: (extension, type, shown inline).
/// Anything else is `application/octet-stream`, to be downloaded. No type that
/// a browser runs scripts from (HTML, SVG, XML) is here.
const TYPES: &[(&str, &str, bool)] = &[
    ("png", "image/png", true),
    ("jpg", "image/jpeg", true),
    ("jpeg", "image/jpeg", true),
    ("gif", "image/gif", true),
    ("webp", "image/webp", true),
    ("avif", "image/avif", true),
    ("apng", "image/apng", true),
    ("bmp", "image/bmp", true),
    ("heic", "image/heic", false),
    ("mp4", "video/mp4", true),
    ("m4v", "video/mp4", true),
    ("webm", "video/webm", true),
    ("mov", "video/quicktime", true),
    ("ogv", "video/ogg", true),
    ("mkv", "video/x-matroska", false),
    ("mp3", "audio/mpeg", true),
    ("m4a", "audio/mp4", true),
    ("ogg", "audio/ogg", true),
    ("oga", "audio/ogg", true),
    ("opus", "audio/ogg", true),
    ("wav", "audio/wav", true),
    ("flac", "audio/flac", true),
    ("aac", "audio/aac", true),
    ("txt", "text/plain; charset=utf-8", true),
    ("json", "application/json", true),
    ("pdf", "application/pdf", false),
    ("zip", "application/zip", false),
    ("gz", "application/gzip", false),
];

pub const OCTET_STREAM: &str = "application/octet-stream";

/// (extension, type, inline) of a file named `name`.
pub fn type_of_name(name: &str) -> Option<&'static (&'static str, &'static str, bool)> {
    let (_, ext) = name.rsplit_once('.')?;
    TYPES.iter().find(|(e, _, _)| e.eq_ignore_ascii_case(ext))
}

/// The `Content-Type` the proxy gives a file named `name`.
pub fn mime_of_name(name: &str) -> &'static str {
    type_of_name(name).map_or(OCTET_STREAM, |(_, mime, _)| mime)
}

/// Whether a file named `name` is shown in the browser rather than downloaded.
pub fn inline(name: &str) -> bool {
    type_of_name(name).is_some_and(|(_, _, inline)| *inline)
}

/// `text/plain; charset=utf-8` → `text/plain`.
pub fn essence(mime: &str) -> String {
    mime.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

/// The extension a file of type `mime` is given when its name has none of that type.
pub fn extension_of_mime(mime: &str) -> Option<&'static str> {
    let wanted = essence(mime);
    TYPES.iter().find(|(_, m, _)| essence(m) == wanted).map(|(e, _, _)| *e)
}

/// Percent-encode everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Undo percent-encoding; `None` on a malformed escape. Bytes that are no UTF-8 become U+FFFD.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

/// The file name a link ends with: the file's own name (its last path component,
/// without control characters), else `fallback`; with the extension of its type
/// added when the name does not already say that type.
pub fn link_file_name(name: Option<&str>, fallback: &str, mime: Option<&str>) -> String {
    let base = name
        .map(|n| n.rsplit(['/', '\\']).next().unwrap_or(n).trim())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .unwrap_or(fallback);
    let mut name: String = base.chars().filter(|c| !c.is_control()).take(200).collect();
    if let Some(ext) = mime.and_then(extension_of_mime) {
        let wanted = mime.map(essence).unwrap_or_default();
        if essence(mime_of_name(&name)) != wanted {
            name.push('.');
            name.push_str(ext);
        }
    }
    name
}

/// The key in `path`, made (random, readable by the owner only) when there is none yet.
pub fn load_or_create_key(path: &Path) -> Result<[u8; 32], String> {
    match std::fs::read_to_string(path) {
        Ok(text) => from_hex(text.trim()).and_then(|k| <[u8; 32]>::try_from(k).ok()).ok_or_else(|| {
            format!("{} is not a media proxy key (64 hex digits): remove it to make a new one", path.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::rng().random();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            std::io::Write::write_all(&mut file, format!("{}\n", to_hex(&key)).as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// A plain-text answer.
pub fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// A file named `name`, with the headers that keep it from being run as a page.
pub fn file_response(bytes: Vec<u8>, name: &str) -> Response<Full<Bytes>> {
    let len = bytes.len();
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime_of_name(name)));
    let disposition = if inline(name) { "inline" } else { "attachment" };
    h.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static(disposition));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'; img-src 'self'; media-src 'self'"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400"));
    r
}

/// What answers one request.
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFuture<'static, Response<Full<Bytes>>> + Send + Sync>;

/// Serve HTTP/1 on `listener` with `handler`, one task per connection, with
/// hyper's limit on reading a request's head.
pub async fn serve_http(listener: TcpListener, handler: Handler) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "media proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            // The timer enables hyper's 30-second limit on reading a request's head.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(peer = %peer, error = %e, "media proxy connection ended");
            }
        });
    }
}

/// Bind `listen` on the current runtime.
pub fn bind(listen: &str) -> Result<(TcpListener, SocketAddr), String> {
    let addr: SocketAddr = listen.parse().map_err(|_| format!("`{listen}` is not an address to listen on"))?;
    let listener = std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let listener = TcpListener::from_std(listener).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    Ok((listener, local))
}

/// Why a source did not hand out a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaError {
    NotFound,
    TooBig,
    Unavailable,
}

/// A network's files, fetched with its credentials.
#[async_trait]
pub trait MediaSource: Send + Sync + 'static {
    /// The bytes of the file `id` (at most `limit`).
    async fn fetch(&self, id: &str, limit: usize) -> Result<Vec<u8>, MediaError>;
}

/// Signs and checks links.
pub struct MediaLinks {
    key: [u8; 32],
    public_url: String,
    /// The path part of `public_url` (requests arrive with it, or without it when a
    /// reverse proxy strips it).
    prefix: String,
}

impl MediaLinks {
    pub fn new(key: [u8; 32], public_url: &str) -> MediaLinks {
        let public_url = public_url.trim_end_matches('/').to_owned();
        let after_scheme = public_url.split_once("://").map_or(public_url.as_str(), |(_, rest)| rest);
        let prefix = after_scheme.find('/').map_or(String::new(), |i| after_scheme[i..].to_owned());
        MediaLinks { key, public_url, prefix }
    }

    fn token(&self, source: &str, id: &str) -> String {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(source.as_bytes());
        mac.update(b"/");
        mac.update(id.as_bytes());
        to_hex(&mac.finalize().into_bytes()[..16])
    }

    /// The link to file `id` of `source`, named `name`.
    pub fn link(&self, source: &str, id: &str, name: &str) -> String {
        format!(
            "{}/{}/{}/{}/{}",
            self.public_url,
            percent_encode(source),
            self.token(source, id),
            percent_encode(id),
            percent_encode(name)
        )
    }

    /// (source, id, name) of a request path this gateway signed.
    pub fn parse(&self, path: &str) -> Option<(String, String, String)> {
        let rest = path.strip_prefix(self.prefix.as_str()).unwrap_or(path);
        let mut parts = rest.trim_start_matches('/').split('/');
        let (source, token, id, name) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let (source, id, name) = (percent_decode(source)?, percent_decode(id)?, percent_decode(name)?);
        let good = self.token(&source, &id);
        let same =
            good.len() == token.len() && good.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        same.then_some((source, id, name))
    }
}

/// A running media proxy; dropping it stops it.
pub struct MediaProxy {
    pub links: Arc<MediaLinks>,
    pub local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for MediaProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Start a proxy on `listen` for `sources` (by name), signing with the key at `key_path`.
pub fn start(
    listen: &str,
    public_url: &str,
    key_path: &Path,
    sources: HashMap<String, Arc<dyn MediaSource>>,
) -> Result<MediaProxy, String> {
    let key = load_or_create_key(key_path)?;
    let links = Arc::new(MediaLinks::new(key, public_url));
    let (listener, local_addr) = bind(listen)?;
    let downloads = Arc::new(Semaphore::new(MAX_DOWNLOADS));
    let sources = Arc::new(sources);
    let state_links = links.clone();
    let handler: Handler = Arc::new(move |req: Request<Incoming>| {
        let (links, sources, downloads) = (state_links.clone(), sources.clone(), downloads.clone());
        Box::pin(async move {
            let not_found = || plain(StatusCode::NOT_FOUND, "not found\n");
            if !matches!(*req.method(), Method::GET | Method::HEAD) {
                return not_found();
            }
            let Some((source, id, name)) = links.parse(req.uri().path()) else { return not_found() };
            let Some(src) = sources.get(&source) else { return not_found() };
            let Ok(_permit) = downloads.acquire().await else {
                return plain(StatusCode::SERVICE_UNAVAILABLE, "the gateway is stopping\n");
            };
            match src.fetch(&id, MAX_PROXIED_BYTES).await {
                Ok(bytes) => file_response(bytes, &name),
                Err(MediaError::NotFound) => not_found(),
                Err(MediaError::TooBig) => {
                    plain(StatusCode::PAYLOAD_TOO_LARGE, "the file is too big to be handed out\n")
                }
                Err(MediaError::Unavailable) => {
                    plain(StatusCode::BAD_GATEWAY, "the network did not hand out the file\n")
                }
            }
        })
    });
    let task = tokio::spawn(serve_http(listener, handler).instrument(info_span!("media_proxy")));
    info!(listen = %local_addr, public_url, "media proxy listening");
    Ok(MediaProxy { links, local_addr, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_signed_for_one_file_of_one_source() {
        let links = MediaLinks::new([7; 32], "https://example.org/media/");
        let link = links.link("telegram.example.org", "AgAD-x_1", "a b.png");
        let path = link.strip_prefix("https://example.org").expect("prefix");
        assert_eq!(links.parse(path), Some(("telegram.example.org".into(), "AgAD-x_1".into(), "a b.png".into())));
        // Without the prefix (a reverse proxy stripped it).
        assert!(links.parse(path.strip_prefix("/media").expect("media")).is_some());
        let other = links.link("telegram.example.org", "AgAD-x_2", "a.png");
        let token_of = |l: &str| l.split('/').nth_back(2).map(str::to_owned).expect("token");
        let forged = path.replace(&token_of(&link), &token_of(&other));
        assert_eq!(links.parse(&forged), None);
        assert_eq!(links.parse("/media/x/y"), None);
        let other_key = MediaLinks::new([8; 32], "https://example.org/media");
        assert_eq!(other_key.parse(path), None);
    }

    #[test]
    fn names_get_their_type_and_nothing_runs() {
        assert_eq!(link_file_name(Some("photo"), "id", Some("image/jpeg")), "photo.jpg");
        assert_eq!(link_file_name(None, "id", None), "id");
        assert_eq!(mime_of_name("x.html"), OCTET_STREAM);
        assert_eq!(mime_of_name("x.PNG"), "image/png");
        let r = file_response(b"<script>".to_vec(), "x.svg");
        assert_eq!(r.headers()[header::CONTENT_TYPE], OCTET_STREAM);
        assert_eq!(r.headers()[header::CONTENT_DISPOSITION], "attachment");
    }
}
