#!/usr/bin/env bash
# Install what the tests need, build everything, run every test (unit, store on
# SQLite and PostgreSQL, end-to-end against real Prosody and ngIRCd on loopback),
# then run each fuzz target briefly.
# Each test starts and stops its own servers; nothing is left running.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/isthmus/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

./tests/install-deps.sh
# ejabberd's tooling may start an Erlang port mapper: stop it again if it was not running before.
if ! pgrep -x epmd >/dev/null; then trap 'pkill -x epmd 2>/dev/null || true' EXIT; fi
cargo build --workspace --all-targets --locked
cargo test --workspace --all-targets --locked
# The network emulators' own checks (they speak the wire formats the bridges are tested against).
PY=${ISTHMUS_TEST_CACHE:-$HOME/.cache/isthmus}/venv/bin/python
"$PY" tests/emulators/test_telegram_bot_api.py
"$PY" tests/emulators/test_discord_api.py
# Each fuzz target for a short bounded time (see docs/development.md).
./tests/fuzz/run.sh 30
echo "all tests passed"
