#!/usr/bin/env bash
# Build the fuzz targets and run each for a bounded time (default 30 s each):
#   tests/fuzz/run.sh [SECONDS]
# Installs cargo-fuzz when missing. Prints, per target, the executions libFuzzer
# reports; exits non-zero if any target crashed, with the input that did it
# under tests/fuzz/artifacts/<target>/ and the command that replays it.
#
# cargo-fuzz needs nightly compiler flags (-Z sanitizer, coverage passes); on a
# stable toolchain RUSTC_BOOTSTRAP=1 allows them. Targets run under
# AddressSanitizer, cargo-fuzz's default.
#
# The build and the grown corpus live under ~/.cache/isthmus/ so they survive
# between runs: the committed seeds in tests/fuzz/corpus/<target>/ are only read.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=${1:-30}
targets=(irc_line irc_text xmpp_stanza xml_shaper markup superlinear)
cache=${ISTHMUS_FUZZ_CACHE:-$HOME/.cache/isthmus/fuzz}
target_dir=${ISTHMUS_FUZZ_TARGET_DIR:-$cache/target}
cargo_fuzz_version=0.13.2

export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

if ! cargo fuzz --version 2>/dev/null | grep -qF "$cargo_fuzz_version"; then
    env -u CARGO_TARGET_DIR cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi

fuzz=(--fuzz-dir tests/fuzz --target-dir "$target_dir")
cargo fuzz build "${fuzz[@]}"

# Names and values are only cut past 1 KiB and 4 KiB: the shaper needs longer inputs.
max_len() {
    case $1 in
        xml_shaper) echo 12288 ;;
        *) echo 4096 ;;
    esac
}

failed=()
summary=()
for target in "${targets[@]}"; do
    corpus=$cache/corpus/$target
    log=$cache/logs/$target.log
    mkdir -p "$corpus" "$(dirname "$log")" "tests/fuzz/artifacts/$target"
    echo "== $target: ${seconds}s"
    # New inputs go to the first corpus directory (the cache); the seeds are read only.
    if cargo fuzz run "${fuzz[@]}" "$target" "$corpus" "tests/fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -max_len="$(max_len "$target")" -print_final_stats=1 \
        >"$log" 2>&1; then
        status=ok
    else
        status=CRASHED
        failed+=("$target")
        grep -E -A1 "panicked at" "$log" | head -n 4 || true
        grep -E "ERROR: |SUMMARY: |Test unit written to" "$log" | head -n 4 || true
    fi
    runs=$(grep -oE "Done [0-9]+ runs in [0-9]+ second" "$log" | tail -n 1 || true)
    if [ -z "$runs" ]; then
        runs=$(grep -oE "^#[0-9]+" "$log" | tail -n 1 | sed 's/#/stopped after /; s/$/ runs/' || true)
    fi
    summary+=("$(printf '%-12s %-8s %s' "$target" "$status" "${runs:-no executions reported}")")
done

echo "== fuzzing summary (${seconds}s per target; logs in $cache/logs)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "crashed: ${failed[*]}"
    echo "replay: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz <target> tests/fuzz/artifacts/<target>/<file>"
    exit 1
fi
