#!/usr/bin/env bash
# Install what the end-to-end tests need on a Debian machine, idempotently:
# Prosody, ejabberd, ngIRCd, InspIRCd, Atheme (IRC services for the SASL tests), PostgreSQL, go-sendxmpp (a second XMPP client) and Biboumi
# (the benchmark baseline) from Debian (as root), slixmpp and aiohttp (which runs the emulators in
# tests/emulators/) from PyPI in a venv, and the Synapse
# Matrix homeserver from PyPI in a venv of its own.
# Services are never started here: each test starts its own on loopback.
set -euo pipefail

CACHE=${ISTHMUS_TEST_CACHE:-$HOME/.cache/isthmus}
PACKAGES=(prosody lua-unbound lua-event ejabberd ngircd inspircd atheme-services postgresql openssl python3-venv go-sendxmpp biboumi)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
  # Keep package scripts from starting system daemons on the default ports.
  if [ ! -x /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
  fi
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# A system instance left running would hold the default ports; the tests use their own.
for svc in prosody ejabberd ngircd inspircd atheme-services postgresql biboumi; do
  if command -v service >/dev/null && service "$svc" status >/dev/null 2>&1; then
    service "$svc" stop >/dev/null 2>&1 || true
  fi
done

if [ ! -x "$CACHE/venv/bin/python" ] || ! "$CACHE/venv/bin/python" -c 'import slixmpp' 2>/dev/null; then
  echo "creating the slixmpp venv in $CACHE/venv"
  mkdir -p "$CACHE"
  python3 -m venv "$CACHE/venv"
  "$CACHE/venv/bin/pip" install -q slixmpp==1.17.0 aiohttp==3.12.15
fi
# A venv made before aiohttp was needed lacks it.
if ! "$CACHE/venv/bin/python" -c 'import aiohttp' 2>/dev/null; then
  echo "installing aiohttp in $CACHE/venv"
  "$CACHE/venv/bin/pip" install -q aiohttp==3.12.15
fi

# Synapse (the Matrix homeserver the Matrix tests run against), pinned, in its own venv.
SYNAPSE_VERSION=1.163.2
if [ ! -x "$CACHE/venv-synapse/bin/python" ] \
  || [ "$("$CACHE/venv-synapse/bin/python" -c 'import synapse; print(synapse.__version__)' 2>/dev/null)" != "$SYNAPSE_VERSION" ]; then
  echo "installing Synapse $SYNAPSE_VERSION in $CACHE/venv-synapse"
  mkdir -p "$CACHE"
  python3 -m venv "$CACHE/venv-synapse"
  "$CACHE/venv-synapse/bin/pip" install -q "matrix-synapse==$SYNAPSE_VERSION"
fi
echo "test dependencies ready"
