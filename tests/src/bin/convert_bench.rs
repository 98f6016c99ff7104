//! The converters of remote text on adversarial input: each converter on each
//! class of hostile input at 64 KiB and at 1 MiB.
//!
//! `cargo run --release -p isthmus-tests --bin convert_bench [-- [--callgrind] [FILTER]]`
//! prints one table and exits non-zero unless every converter takes under 100 ms
//! on 1 MiB and at most 20 times its 64 KiB time (linear time leaves 16), and
//! makes at most 20 times as many allocations (and, with `--callgrind`, executes
//! at most 20 times as many instructions). `FILTER` keeps the pairs whose
//! "converter input" contains it.
//!
//! Wall time on a shared machine is noisy, so each time is the best of many runs,
//! the two sizes taking turns (16 runs at 64 KiB, then one at 1 MiB), until the
//! best of neither has improved for [`SETTLE`] turns: the best run is the
//! converter's own cost, the median also the load of whatever else runs.
//!
//! Two measures do not depend on the machine's load: the allocations each
//! converter makes (counted by this binary's global allocator, in a run of its
//! own), and with `--callgrind` the instructions it executes, counted by
//! `valgrind --tool=callgrind` on this binary's `--run` mode:
//! `convert_bench --run CONVERTER CLASS BYTES [TIMES]` converts one input
//! (indices into [`CONVERTERS`] and [`CLASSES`]) and prints nothing, for profilers:
//! `valgrind --tool=callgrind --toggle-collect='*measure_once*' convert_bench --run 0 13 1048576`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use isthmus_core::markup::{html_to_styling, styling_to_html};
use isthmus_irc::format::{irc_to_styling, styling_to_irc};

const SMALL: usize = 64 * 1024;
const LARGE: usize = 1024 * 1024;
const LIMIT: Duration = Duration::from_millis(100);
const MAX_RATIO: f64 = 20.0;
/// Turns at least, and at most, per pair.
const MIN_TURNS: usize = 9;
const MAX_TURNS: usize = 200;
/// Turns without a better time after which the best is taken as found.
const SETTLE: usize = 12;
/// Time spent on one pair after which it stops at [`MIN_TURNS`] or more.
const PAIR_BUDGET: Duration = Duration::from_secs(4);
/// Small runs per turn.
const SMALL_PER_TURN: usize = 16;

/// The system allocator, counting allocations while [`COUNTING`] is set.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

impl Counting {
    fn count() {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call goes to `System` with the caller's arguments unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::count();
        // SAFETY: forwarded as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::count();
        // SAFETY: forwarded as given.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as given.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::count();
        // SAFETY: forwarded as given.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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

/// One conversion, its output dropped (what `--toggle-collect='*measure_once*'` counts).
#[inline(never)]
fn measure_once(convert: fn(&str) -> usize, input: &str) -> usize {
    black_box(convert(black_box(input)))
}

fn once(convert: fn(&str) -> usize, input: &str) -> Duration {
    let start = Instant::now();
    measure_once(convert, input);
    start.elapsed()
}

/// The allocations (and reallocations) one conversion makes.
fn allocations(convert: fn(&str) -> usize, input: &str) -> u64 {
    ALLOCATIONS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::SeqCst);
    measure_once(convert, input);
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// The best and the median time on each input, and how many turns it took.
struct Times {
    small: (Duration, Duration),
    large: (Duration, Duration),
    turns: usize,
}

/// Runs on both inputs, taking turns, until neither best time has improved for
/// [`SETTLE`] turns (at least [`MIN_TURNS`], at most [`MAX_TURNS`] or [`PAIR_BUDGET`]).
fn times(convert: fn(&str) -> usize, small: &str, large: &str) -> Times {
    let (mut s, mut l) = (Vec::new(), Vec::new());
    let (mut best_small, mut best_large) = (Duration::MAX, Duration::MAX);
    let mut since_better = 0;
    let start = Instant::now();
    let mut turns = 0;
    while turns < MAX_TURNS {
        let mut better = false;
        for _ in 0..SMALL_PER_TURN {
            let t = once(convert, small);
            s.push(t);
            if t < best_small {
                better |= best_small != Duration::MAX && t.as_secs_f64() < best_small.as_secs_f64() * 0.99;
                best_small = t;
            }
        }
        let t = once(convert, large);
        l.push(t);
        if t < best_large {
            better |= best_large != Duration::MAX && t.as_secs_f64() < best_large.as_secs_f64() * 0.99;
            best_large = t;
        }
        turns += 1;
        since_better = if better { 0 } else { since_better + 1 };
        if turns >= MIN_TURNS && (since_better >= SETTLE || start.elapsed() > PAIR_BUDGET) {
            break;
        }
    }
    let [small, large] = [s, l].map(|mut t| {
        t.sort();
        (t[0], t[t.len() / 2])
    });
    Times { small, large, turns }
}

/// The instructions one conversion of `len` bytes of `class` executes, counted by
/// callgrind on this binary's `--run` mode; `None` when valgrind cannot be run.
fn instructions(converter: usize, class: usize, len: usize) -> Option<u64> {
    let exe = std::env::current_exe().ok()?;
    let output = Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null", "--toggle-collect=*measure_once*"])
        .arg(exe)
        .args(["--run", &converter.to_string(), &class.to_string(), &len.to_string()])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr.lines().find(|l| l.contains("Collected :"))?;
    line.rsplit(' ').next()?.trim().parse().ok()
}

/// `--run CONVERTER CLASS BYTES [TIMES]`: convert one input, for a profiler.
fn run(args: &[String]) -> ExitCode {
    let number = |i: usize| args.get(i).and_then(|a| a.parse::<usize>().ok());
    let (Some(converter), Some(class), Some(len)) = (number(0), number(1), number(2)) else {
        eprintln!("usage: convert_bench --run CONVERTER CLASS BYTES [TIMES]");
        return ExitCode::FAILURE;
    };
    let (Some((_, convert)), Some(class)) = (CONVERTERS.get(converter), CLASSES.get(class)) else {
        eprintln!("no converter {converter} or class {class}");
        return ExitCode::FAILURE;
    };
    let input = (class.make)(len);
    for _ in 0..number(3).unwrap_or(1) {
        measure_once(*convert, &input);
    }
    ExitCode::SUCCESS
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--run") {
        return run(&args[1..]);
    }
    let callgrind = args.iter().any(|a| a == "--callgrind");
    let filter = args.iter().find(|a| !a.starts_with("--")).cloned().unwrap_or_default();
    let mut failed = 0;
    print!(
        "| converter | input | 64 KiB (ms) | 1 MiB (ms) | ratio | median 64 KiB / 1 MiB (ms) | turns \
         | allocations 64 KiB / 1 MiB | ratio |"
    );
    if callgrind {
        print!(" instructions 64 KiB / 1 MiB | ratio |");
    }
    println!(" < 100 ms | ratios ≤ 20 |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|{}---|---|", if callgrind { "---:|---:|" } else { "" });
    for (c, (converter, convert)) in CONVERTERS.iter().enumerate() {
        for (k, class) in CLASSES.iter().enumerate() {
            if !format!("{converter} {}", class.name).contains(&filter) {
                continue;
            }
            let small = (class.make)(SMALL);
            let large = (class.make)(LARGE);
            let Times { small: (t_small, m_small), large: (t_large, m_large), turns } = times(*convert, &small, &large);
            // Below a tenth of a millisecond the ratio says nothing but timer noise.
            let ratio = t_large.as_secs_f64() / t_small.as_secs_f64().max(1e-4);
            let a_small = allocations(*convert, &small);
            let a_large = allocations(*convert, &large);
            // A converter making a handful of allocations at either size is linear in them.
            let a_ratio = a_large as f64 / a_small.max(8) as f64;
            let mut linear = ratio <= MAX_RATIO && a_ratio <= MAX_RATIO;
            let counted = callgrind.then(|| (instructions(c, k, SMALL), instructions(c, k, LARGE)));
            let fast = t_large < LIMIT;
            let mut row = format!(
                "| {converter} | {} | {} | {} | {ratio:.1} | {} / {} | {turns} | {a_small} / {a_large} | {a_ratio:.1} |",
                class.name,
                ms(t_small),
                ms(t_large),
                ms(m_small),
                ms(m_large),
            );
            match counted {
                Some((Some(i_small), Some(i_large))) => {
                    let i_ratio = i_large as f64 / i_small.max(1) as f64;
                    linear &= i_ratio <= MAX_RATIO;
                    row += &format!(" {:.1} M / {:.1} M | {i_ratio:.1} |", i_small as f64 / 1e6, i_large as f64 / 1e6);
                }
                Some(_) => {
                    eprintln!("callgrind did not count {converter} on {}: is valgrind installed?", class.name);
                    row += " – | – |";
                }
                None => {}
            }
            if !(fast && linear) {
                failed += 1;
            }
            let mark = |ok: bool| if ok { "yes" } else { "**no**" };
            println!("{row} {} | {} |", mark(fast), mark(linear));
        }
    }
    if failed > 0 {
        eprintln!("{failed} converter × input pairs miss a target");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
