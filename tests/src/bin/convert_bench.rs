//! The converters of remote text on adversarial input: each converter on each
//! class of hostile input at 64 KiB and at 1 MiB. Each time is the best of
//! several runs, the two sizes taking turns: on a shared machine the best run is
//! the converter's own cost, the median also the load of whatever else runs.
//!
//! `cargo run --release -p isthmus-tests --bin convert_bench` prints one table
//! and exits non-zero unless every converter takes under 100 ms on 1 MiB and at
//! most 20 times its 64 KiB time (linear time leaves 16).

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use isthmus_core::markup::{html_to_styling, styling_to_html};
use isthmus_irc::format::{irc_to_styling, styling_to_irc};

const SMALL: usize = 64 * 1024;
const LARGE: usize = 1024 * 1024;
const LIMIT: Duration = Duration::from_millis(100);
const MAX_RATIO: f64 = 20.0;

/// A class of hostile input: how to make `len` bytes of it.
struct Class {
    name: &'static str,
    make: fn(usize) -> String,
}

fn repeat(pattern: &str, len: usize) -> String {
    pattern.repeat(len.div_ceil(pattern.len()))
}

/// `open` × k, a word, `close` × k: about `len` bytes.
fn nested(open: &str, close: &str, len: usize) -> String {
    let k = len / (open.len() + close.len());
    format!("{}x{}", open.repeat(k), close.repeat(k))
}

const CLASSES: &[Class] = &[
    Class { name: "unclosed openers `*word `", make: |n| repeat("*word ", n) },
    Class { name: "deep quote `>`", make: |n| format!("{} x", repeat(">", n)) },
    Class { name: "quote lines `> > … a`", make: |n| repeat(&format!("{}a\n", "> ".repeat(40)), n) },
    Class { name: "unclosed tags `<b>`", make: |n| format!("{}x", repeat("<b>", n)) },
    Class { name: "unclosed tags `<div>`", make: |n| format!("{}x", repeat("<div>", n)) },
    Class { name: "nested closed `<b><i>`", make: |n| nested("<b><i>", "</i></b>", n) },
    Class { name: "nested closed `<div>`", make: |n| nested("<div>", "</div>", n) },
    Class { name: "nested quotes `<blockquote>`", make: |n| nested("<blockquote>", "</blockquote>", n) },
    Class { name: "mentions `<a href>`", make: |n| repeat(r#"<a href="https://x/u/1">n</a> "#, n) },
    Class { name: "run `*`", make: |n| repeat("*", n) },
    Class { name: "run `_`", make: |n| repeat("_", n) },
    Class { name: "run `` ` ``", make: |n| repeat("`", n) },
    Class { name: "alternating `*_~``", make: |n| repeat("*_~`", n) },
    Class { name: "nested spans `*_~`x`~_*`", make: |n| repeat("*_~`x`~_* ", n) },
    Class { name: "IRC bold `\\x02`", make: |n| repeat("\u{2}", n) },
    Class { name: "IRC bold and text", make: |n| repeat("\u{2}a\u{1d}b ", n) },
    Class { name: "IRC colours `\\x03NN`", make: |n| repeat("\u{3}04", n) },
    Class { name: "IRC colours `\\x03N,N`", make: |n| repeat("\u{3}4,5", n) },
];

type Converter = (&'static str, fn(&str) -> usize);

const CONVERTERS: &[Converter] = &[
    ("styling→HTML", |s| styling_to_html(s).map_or(0, |h| h.len())),
    ("HTML→styling", |s| html_to_styling(s).len()),
    ("IRC→styling", |s| irc_to_styling(s).len()),
    ("styling→IRC", |s| styling_to_irc(s).len()),
];

fn once(convert: fn(&str) -> usize, input: &str) -> Duration {
    let start = Instant::now();
    black_box(convert(black_box(input)));
    start.elapsed()
}

/// The best and the median times of `runs` runs on each input, taking turns (16 runs on the small one per turn).
fn times(convert: fn(&str) -> usize, small: &str, large: &str, runs: usize) -> [(Duration, Duration); 2] {
    let (mut s, mut l) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        s.extend((0..16).map(|_| once(convert, small)));
        l.push(once(convert, large));
    }
    [s, l].map(|mut t| {
        t.sort();
        (t[0], t[t.len() / 2])
    })
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn main() -> ExitCode {
    let mut failed = 0;
    println!(
        "| converter | input | 64 KiB (ms) | 1 MiB (ms) | ratio | median 64 KiB / 1 MiB (ms) | < 100 ms | ratio ≤ 20 |"
    );
    println!("|---|---|---:|---:|---:|---:|---|---|");
    for (converter, convert) in CONVERTERS {
        for class in CLASSES {
            let small = (class.make)(SMALL);
            let large = (class.make)(LARGE);
            let [(t_small, m_small), (t_large, m_large)] = times(*convert, &small, &large, 9);
            // Below a tenth of a millisecond the ratio says nothing but timer noise.
            let ratio = t_large.as_secs_f64() / t_small.as_secs_f64().max(1e-4);
            let fast = t_large < LIMIT;
            let linear = ratio <= MAX_RATIO;
            if !(fast && linear) {
                failed += 1;
            }
            let mark = |ok: bool| if ok { "yes" } else { "**no**" };
            println!(
                "| {converter} | {} | {} | {} | {ratio:.1} | {} / {} | {} | {} |",
                class.name,
                ms(t_small),
                ms(t_large),
                ms(m_small),
                ms(m_large),
                mark(fast),
                mark(linear)
            );
        }
    }
    if failed > 0 {
        eprintln!("{failed} converter × input pairs miss a target");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
