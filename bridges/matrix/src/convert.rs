//! Converting remote text (XEP-0393 styling → HTML, HTML → styling) without
//! letting one message hold up the others, and the size limits on both sides.
//!
//! A small text is converted where it is (it takes microseconds). A large one is
//! converted on a blocking thread, with a deadline ([`DEADLINE`]): past it the
//! message goes on without the conversion (plain text) and a warning names it.
//! A copy kept in the durable outbox is stored before a conversion aside starts,
//! so a crash meanwhile replays it after the restart.
//!
//! Limits: an event content larger than [`MAX_CONTENT_BYTES`] is refused before it
//! is sent (the homeserver takes 65,536 bytes for the whole event, envelope
//! included); a body from Matrix that would make a stanza larger than the XMPP
//! side takes is cut, with a marker and a link to the whole event ([`fit_for_xmpp`]).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use isthmus_core::network::DeliveryError;
use isthmus_core::outbox::Receipt;
use tracing::{info, warn};

/// Texts smaller than this are converted inline.
pub const INLINE_BYTES: usize = 16 * 1024;

/// How long a conversion may take before the message goes on as plain text.
pub const DEADLINE: Duration = Duration::from_secs(2);

/// The largest event content sent to a homeserver (JSON bytes): Matrix takes 65,536
/// bytes for the whole event, and the envelope (ids, signatures, hashes) needs the rest.
pub const MAX_CONTENT_BYTES: usize = 60_000;

/// The XMPP stanza limit when none is configured: Prosody's for client streams
/// (`c2s_stanza_size_limit`) and the embedded server's default.
pub const DEFAULT_XMPP_STANZA_BYTES: usize = 256 * 1024;

/// Room left in a stanza for everything but the body (addresses, ids, reply and
/// thread elements, the archive's wrapping).
const STANZA_ENVELOPE_BYTES: usize = 8 * 1024;

static XMPP_STANZA_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_XMPP_STANZA_BYTES);

/// The largest stanza the XMPP side takes (the embedded server's `max_stanza_bytes`).
pub fn set_xmpp_stanza_limit(bytes: usize) {
    XMPP_STANZA_BYTES.store(bytes.max(1024), Ordering::Relaxed);
}

/// For tests only: `ISTHMUS_TEST_SLOW_CONVERSION_MS` makes every conversion of
/// remote text go aside and wait that long first (read once).
fn slow_for_tests() -> Option<Duration> {
    static SLOW: OnceLock<Option<Duration>> = OnceLock::new();
    *SLOW.get_or_init(|| {
        let ms = std::env::var("ISTHMUS_TEST_SLOW_CONVERSION_MS").ok()?.trim().parse::<u64>().ok()?;
        warn!(ms, "ISTHMUS_TEST_SLOW_CONVERSION_MS is set: every conversion is slowed down (for tests only)");
        Some(Duration::from_millis(ms))
    })
}

/// How a conversion runs (the defaults, or a test's).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub inline_bytes: usize,
    pub deadline: Duration,
    /// Wait this long before converting (the test knob).
    pub slow: Option<Duration>,
}

impl Bounds {
    pub fn standard() -> Bounds {
        let slow = slow_for_tests();
        // A slowed conversion must still finish, so a test can watch a crash in the middle of it.
        let deadline = slow.map_or(DEADLINE, |s| DEADLINE + s);
        Bounds { inline_bytes: INLINE_BYTES, deadline, slow }
    }
}

/// Run `convert` on a text of `input_len` bytes: inline when small, else on a
/// blocking thread once `stored` (the copy's outbox row) is durable, and `None`
/// when it took longer than the deadline. `what` and `id` name the conversion and
/// the message in the logs.
pub async fn bounded<T: Send + 'static>(
    what: &str,
    id: &str,
    input_len: usize,
    stored: Option<&Receipt>,
    convert: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    bounded_with(Bounds::standard(), what, id, input_len, stored, convert).await
}

pub async fn bounded_with<T: Send + 'static>(
    bounds: Bounds,
    what: &str,
    id: &str,
    input_len: usize,
    stored: Option<&Receipt>,
    convert: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    if input_len < bounds.inline_bytes && bounds.slow.is_none() {
        return Some(convert());
    }
    // A crash while converting must find the message in the outbox.
    if let Some(receipt) = stored {
        receipt.persisted().await;
    }
    let slow = bounds.slow;
    if let Some(slow) = slow {
        info!(conversion = what, id, input_len, ms = slow.as_millis() as u64, "slow conversion started");
    }
    let task = tokio::task::spawn_blocking(move || {
        if let Some(slow) = slow {
            std::thread::sleep(slow);
        }
        convert()
    });
    match tokio::time::timeout(bounds.deadline, task).await {
        Ok(Ok(out)) => Some(out),
        Ok(Err(e)) => {
            warn!(conversion = what, id, error = %e, "conversion failed; the message goes on as plain text");
            None
        }
        Err(_) => {
            warn!(
                conversion = what,
                id,
                input_len,
                deadline_ms = bounds.deadline.as_millis() as u64,
                "conversion past its deadline; the message goes on as plain text"
            );
            None
        }
    }
}

/// The text of an HTML fragment without its markup (entities decoded): what an
/// HTML body says when its conversion could not be waited for. Linear.
pub fn html_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find('>') else {
            // No tag after all: text.
            out.push_str(tag);
            rest = "";
            break;
        };
        let name = tag[1..end].trim_start_matches('/').split(|c: char| c.is_whitespace() || c == '/').next();
        if matches!(name.map(str::to_ascii_lowercase).as_deref(), Some("br" | "p" | "div" | "li" | "tr" | "blockquote"))
            && !out.ends_with('\n')
            && !out.is_empty()
        {
            out.push('\n');
        }
        rest = &tag[end + 1..];
    }
    out.push_str(rest);
    html_escape::decode_html_entities(out.trim_end()).into_owned()
}

/// Refuse an event content too large for the homeserver, with a text for the sender.
pub fn check_content_size(content: &serde_json::Value) -> Result<(), DeliveryError> {
    let size = content_size(content);
    if size > MAX_CONTENT_BYTES {
        return Err(too_large(size));
    }
    Ok(())
}

/// The size of `content` as JSON.
pub fn content_size(content: &serde_json::Value) -> usize {
    serde_json::to_vec(content).map_or(usize::MAX, |v| v.len())
}

/// The refusal of a message whose Matrix event would be `size` bytes.
pub fn too_large(size: usize) -> DeliveryError {
    DeliveryError::Rejected(format!(
        "this message is too large for Matrix: its event would be {size} bytes, and the limit is {MAX_CONTENT_BYTES} bytes"
    ))
}

/// How many bytes `text` takes as XML character data.
fn escaped_len(c: char) -> usize {
    match c {
        '&' => 5,
        '<' | '>' => 4,
        c => c.len_utf8(),
    }
}

/// The body a Matrix event `event_id` of room `room_id` becomes on XMPP: as it is
/// when its stanza fits the XMPP side's limit, else cut there with a marker that
/// says how long it was and links to the whole event.
pub fn fit_for_xmpp(body: String, room_id: &str, event_id: &str) -> String {
    fit_within(body, room_id, event_id, xmpp_body_budget())
}

/// Room for the body (as escaped XML) in one stanza.
fn xmpp_body_budget() -> usize {
    let limit = XMPP_STANZA_BYTES.load(Ordering::Relaxed);
    limit.saturating_sub(STANZA_ENVELOPE_BYTES).max(limit / 2)
}

fn fit_within(body: String, room_id: &str, event_id: &str, budget: usize) -> String {
    let total: usize = body.chars().map(escaped_len).sum();
    if total <= budget {
        return body;
    }
    let link = format!("https://matrix.to/#/{room_id}/{event_id}");
    let marker = format!("\n[… cut: the message is {} bytes, too long for XMPP; all of it: {link}]", body.len());
    let room = budget.saturating_sub(marker.chars().map(escaped_len).sum());
    let mut used = 0;
    let mut end = 0;
    for (i, c) in body.char_indices() {
        used += escaped_len(c);
        if used > room {
            break;
        }
        end = i + c.len_utf8();
    }
    warn!(event_id, bytes = body.len(), "a Matrix message too long for XMPP is cut");
    let mut out = body[..end].to_owned();
    out.push_str(&marker);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_conversion_past_its_deadline_gives_nothing_and_small_ones_run_inline() {
        let bounds = Bounds { inline_bytes: 16, deadline: Duration::from_millis(50), slow: None };
        // Large and slow: past the deadline, nothing (the caller goes on with plain text).
        let started = std::time::Instant::now();
        let out = bounded_with(bounds, "test", "$e", 1000, None, || {
            std::thread::sleep(Duration::from_millis(400));
            "converted"
        })
        .await;
        assert_eq!(out, None);
        assert!(started.elapsed() < Duration::from_millis(300), "waited {:?}", started.elapsed());
        // Large and quick: converted aside, on time.
        assert_eq!(bounded_with(bounds, "test", "$e", 1000, None, || 7).await, Some(7));
        // Small: inline, on this thread.
        let here = std::thread::current().id();
        assert_eq!(
            bounded_with(bounds, "test", "$e", 3, None, move || std::thread::current().id() == here).await,
            Some(true)
        );
        // The test knob sends even small ones aside, slowly.
        let slowed = Bounds { slow: Some(Duration::from_millis(200)), ..bounds };
        assert_eq!(bounded_with(slowed, "test", "$e", 3, None, || 1).await, None);
        let slowed = Bounds { deadline: Duration::from_secs(5), ..slowed };
        assert_eq!(bounded_with(slowed, "test", "$e", 3, None, || 1).await, Some(1));
    }

    #[test]
    fn html_text_is_the_text_without_markup() {
        assert_eq!(html_text("<b>bold</b> &amp; <i>it</i><br>next<p>para</p>"), "bold & it\nnext\npara");
        assert_eq!(html_text("a < b"), "a < b");
        assert_eq!(html_text("no markup"), "no markup");
    }

    #[test]
    fn contents_over_the_limit_are_refused_with_their_size() {
        assert_eq!(check_content_size(&serde_json::json!({"body": "x".repeat(1000)})), Ok(()));
        let big = serde_json::json!({"body": "x".repeat(70_000)});
        let Err(DeliveryError::Rejected(text)) = check_content_size(&big) else { panic!("not refused") };
        assert!(text.contains("60000") && text.contains(&content_size(&big).to_string()), "{text}");
    }

    #[test]
    fn bodies_too_long_for_xmpp_are_cut_with_a_link() {
        assert_eq!(fit_within("short".into(), "!r:l", "$e", 100), "short");
        let cut = fit_within("<".repeat(1000), "!r:l", "$e", 500);
        let escaped: usize = cut.chars().map(escaped_len).sum();
        assert!(escaped <= 500, "{escaped}");
        assert!(cut.starts_with("<<<"));
        assert!(cut.ends_with("all of it: https://matrix.to/#/!r:l/$e]"), "{cut}");
        assert!(cut.contains("1000 bytes"));
        // Never in the middle of a character.
        let cut = fit_within("é".repeat(1000), "!r:l", "$e", 300);
        assert!(cut.starts_with("éé"));
    }
}
