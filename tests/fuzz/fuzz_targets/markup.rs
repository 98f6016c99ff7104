//! The converters of remote text (`isthmus_core::markup` for HTML ↔ XEP-0393,
//! `isthmus_irc::format` for IRC codes ↔ XEP-0393) on arbitrary input: none
//! panics, and each output stays within its stated bound of the input's length.

#![no_main]

use isthmus_core::markup::{HTML_TO_STYLING_FACTOR, STYLING_TO_HTML_FACTOR, html_to_styling, styling_to_html};
use isthmus_irc::format::{irc_to_styling, styling_to_irc};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let len = text.len();
    if let Some(html) = styling_to_html(&text) {
        assert!(html.len() <= STYLING_TO_HTML_FACTOR * len, "{} bytes of HTML from {len}", html.len());
    }
    let styled = html_to_styling(&text);
    assert!(styled.len() <= HTML_TO_STYLING_FACTOR * len, "{} bytes of styling from {len} of HTML", styled.len());
    let styled = irc_to_styling(&text);
    assert!(styled.len() <= 2 * len, "{} bytes of styling from {len} of IRC text", styled.len());
    let irc = styling_to_irc(&text);
    assert_eq!(irc.len(), len, "styling → IRC changed the length");
});
