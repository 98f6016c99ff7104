//! The converters of remote text take time linear in their input: a short
//! input repeated N times and 8N times (`before` × N, `middle`, `after` × N,
//! the input being a count byte then the three parts separated by NUL) costs
//! each converter at most about 8 times as much the second time.
//!
//! Times are noisy (the fuzzer's own instrumentation, other processes), so the
//! check is generous: the best of three runs, against 40 times the smaller
//! one's plus a floor of 5 ms. Quadratic work shows as 64 times and more once
//! the input is long enough to take over the floor.

#![no_main]

use std::hint::black_box;
use std::time::{Duration, Instant};

use isthmus_core::markup::{html_to_styling, styling_to_html};
use isthmus_irc::format::{irc_to_styling, styling_to_irc};
use libfuzzer_sys::fuzz_target;

const CONVERTERS: [(&str, fn(&str) -> usize); 4] = [
    ("styling_to_html", |s| styling_to_html(s).map_or(0, |h| h.len())),
    ("html_to_styling", |s| html_to_styling(s).len()),
    ("irc_to_styling", |s| irc_to_styling(s).len()),
    ("styling_to_irc", |s| styling_to_irc(s).len()),
];

fn best_of_three(convert: fn(&str) -> usize, input: &str) -> Duration {
    (0..3)
        .map(|_| {
            let start = Instant::now();
            black_box(convert(black_box(input)));
            start.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    let [count, rest @ ..] = data else { return };
    let mut parts = rest.splitn(3, |b| *b == 0);
    let before = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let middle = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let after = String::from_utf8_lossy(parts.next().unwrap_or_default());
    if before.len() + after.len() == 0 || before.len() + middle.len() + after.len() > 64 {
        return;
    }
    // N from 256 to 2,295 repetitions: up to 150 kB, then 1.2 MB
    let n = 256 + 8 * usize::from(*count);
    let make = |n: usize| format!("{}{middle}{}", before.repeat(n), after.repeat(n));
    let (small, large) = (make(n), make(8 * n));
    for (name, convert) in CONVERTERS {
        let t_small = best_of_three(convert, &small);
        let t_large = best_of_three(convert, &large);
        let limit = t_small * 40 + Duration::from_millis(5);
        assert!(
            t_large <= limit,
            "{name}: {t_large:?} on {} bytes against {t_small:?} on {} bytes of {before:?} {middle:?} {after:?}",
            large.len(),
            small.len()
        );
    }
});
