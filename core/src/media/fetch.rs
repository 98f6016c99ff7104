//! Fetching a file a user or a remote party named by URL, with the address policy
//! of [`super::guard`]: unless allowed, every address that is not public is
//! refused, whether the URL names it, its host name resolves to it (checked on
//! every connection, so a name cannot change its answer between the check and the
//! download) or a redirect leads there; sizes and times are bounded.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use reqwest::header;

use super::guard::is_public;
use crate::model::Attachment;

/// Why an address is refused, for the sender.
fn refusal(host: &str, ip: IpAddr) -> String {
    let what = if ip.is_loopback() { "a loopback address" } else { "a private, local or reserved address" };
    format!(
        "{host} is {what} ({ip}): the gateway does not fetch files from such addresses \
         (an admin can allow them with `fetch_private_addresses`)"
    )
}

/// Resolves host names to public addresses only (every connection of a [`Fetcher`]
/// that refuses private addresses goes through it, redirects included).
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            match addrs.iter().find(|a| !is_public(a.ip())) {
                Some(bad) => Err(refusal(&host, bad.ip()).into()),
                None => Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// The host of `url` when it is an IP address that is not public.
fn private_literal(url: &reqwest::Url) -> Option<(String, IpAddr)> {
    let ip = match url.host()? {
        url::Host::Ipv4(v4) => IpAddr::V4(v4),
        url::Host::Ipv6(v6) => IpAddr::V6(v6),
        url::Host::Domain(_) => return None,
    };
    (!is_public(ip)).then(|| (url.host_str().unwrap_or_default().to_owned(), ip))
}

/// Fetches the files XMPP users send, over HTTP(S), with the network's address policy.
pub struct Fetcher {
    http: Result<reqwest::Client, String>,
    allow_private: bool,
}

impl Fetcher {
    /// `allow_private`: whether loopback, private and link-local addresses may be fetched.
    pub fn new(allow_private: bool) -> Fetcher {
        let mut builder = reqwest::Client::builder()
            // HTTP(S)_PROXY from the environment would hand the name to a proxy to resolve,
            // past the address check below: files are fetched directly.
            .no_proxy()
            .user_agent(concat!("Isthmus/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .timeout(Duration::from_secs(600));
        if !allow_private {
            builder = builder.dns_resolver(PublicOnly).redirect(reqwest::redirect::Policy::custom(|attempt| {
                if let Some((host, ip)) = private_literal(attempt.url()) {
                    let why = refusal(&host, ip);
                    attempt.error(why)
                } else if attempt.previous().len() >= 10 {
                    attempt.error("too many redirects")
                } else {
                    attempt.follow()
                }
            }));
        }
        Fetcher { http: builder.build().map_err(|e| e.to_string()), allow_private }
    }

    /// Fetch `url` (http or https), at most `limit` bytes: the bytes and the `Content-Type` the server gave.
    pub async fn fetch(&self, url: &str, limit: u64) -> Result<(Vec<u8>, Option<String>), String> {
        let parsed = reqwest::Url::parse(url).map_err(|_| "it is not a URL".to_owned())?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("only http and https links can be fetched".into());
        }
        if !self.allow_private {
            if let Some((host, ip)) = private_literal(&parsed) {
                return Err(refusal(&host, ip));
            }
            // The same check the connection makes, for a clear answer rather than a connect error.
            if let Some(url::Host::Domain(host)) = parsed.host() {
                let port = parsed.port_or_known_default().unwrap_or(443);
                if let Ok(addrs) = tokio::net::lookup_host((host, port)).await
                    && let Some(bad) = addrs.map(|a| a.ip()).find(|ip| !is_public(*ip))
                {
                    return Err(refusal(host, bad));
                }
            }
        }
        let http = self.http.as_ref().map_err(|e| format!("no HTTP client: {e}"))?;
        fetch_with(http, parsed, limit).await
    }
}

/// Download `url` with `http`, at most `limit` bytes.
async fn fetch_with(
    http: &reqwest::Client,
    parsed: reqwest::Url,
    limit: u64,
) -> Result<(Vec<u8>, Option<String>), String> {
    let too_big = || format!("it is larger than the {} MB the gateway takes", limit / (1024 * 1024));
    let mut response = http.get(parsed).send().await.map_err(|e| format!("cannot fetch it: {}", error_chain(&e)))?;
    if !response.status().is_success() {
        return Err(format!("its server answered {}", response.status()));
    }
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(too_big());
    }
    let content_type = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut bytes = Vec::with_capacity(response.content_length().unwrap_or(0).min(limit) as usize);
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("cannot fetch it: {}", error_chain(&e)))? {
        if (bytes.len() + chunk.len()) as u64 > limit {
            return Err(too_big());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok((bytes, content_type))
}

/// An error with its causes (a refused address is the innermost one).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The file name of an attachment: its own, else the last segment of its URL's
/// path (decoded, also when the XMPP side gave that segment as the name), else `file`.
pub fn attachment_name(a: &Attachment) -> String {
    let last = reqwest::Url::parse(&a.url).ok().and_then(|u| u.path_segments()?.next_back().map(str::to_owned));
    let decoded = last.as_deref().and_then(super::proxy::percent_decode).filter(|n| !n.trim().is_empty());
    match a.name.as_deref().map(str::trim).filter(|n| !n.is_empty()) {
        Some(own) if Some(own) != last.as_deref() => own.to_owned(),
        own => decoded.or(own.map(str::to_owned)).unwrap_or_else(|| "file".to_owned()),
    }
}
