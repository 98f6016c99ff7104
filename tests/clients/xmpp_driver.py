#!/usr/bin/env python3
"""A real XMPP client (slixmpp) driven by the Rust test harness over JSON lines.

usage: xmpp_driver.py JID PASSWORD HOST PORT [CA_FILE]

Without CA_FILE the client talks plain text (loopback Prosody/ejabberd); with it,
it requires STARTTLS and verifies the server certificate against CA_FILE.

stdout: {"event": "ready", "mechanism", "tls"} once logged in, then one line per received stanza:
  {"event": "stanza", "kind": "message|presence|iq", "from", "to", "type", "id", "body", "xml"}
  {"event": "disconnected"} / {"event": "failed", "reason"}
stdin commands:
  {"op": "send_raw", "xml": "<message .../>"}
  {"op": "join", "room": "...", "nick": "...", "password": null, "maxstanzas": null}
  {"op": "send", "to": "...", "type": "groupchat", "body": "...", "id": "..."}
  {"op": "verstring", "jid": "...", "node": "...", "hash": "sha-1"}: asks the entity for disco#info
      (at that node) and answers {"event": "verstring", "ver", "xml"} with the XEP-0115
      verification string slixmpp computes from the answer ({"ver": null, "error"} on failure)
  {"op": "disconnect"}
"""
import asyncio
import hashlib
import json
import sys
import types
from xml.sax.saxutils import quoteattr, escape

import slixmpp
from slixmpp.xmlstream import tostring
from slixmpp.plugins.xep_0115 import XEP_0115


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Driver(slixmpp.ClientXMPP):
    def __init__(self, jid, password, ca_file=None):
        super().__init__(jid, password)
        self.enable_direct_tls = False
        if ca_file:
            self.enable_plaintext = False
            self.enable_starttls = True
            self.ca_certs = ca_file
        else:
            self.enable_plaintext = True      # loopback tests: no TLS
            self.enable_starttls = False
            self.plugin["feature_mechanisms"].unencrypted_plain = True
            self.plugin["feature_mechanisms"].unencrypted_scram = True
        for p in ("xep_0004", "xep_0030", "xep_0045", "xep_0199", "xep_0359"):
            self.register_plugin(p)
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("failed_auth", lambda f: emit({"event": "failed", "reason": "authentication failed",
                                                                "xml": tostring(f.xml) if hasattr(f, "xml") else str(f)}))
        self.add_event_handler("disconnected", lambda _: emit({"event": "disconnected"}))
        for kind in ("message", "presence", "iq"):
            self.register_handler(slixmpp.xmlstream.handler.Callback(
                "driver-" + kind,
                slixmpp.xmlstream.matcher.MatchXPath("{%s}%s" % (self.default_ns, kind)),
                self.make_handler(kind)))

    def make_handler(self, kind):
        def handler(stanza):
            body = stanza["body"] if kind == "message" and stanza["body"] else None
            emit({"event": "stanza", "kind": kind, "from": str(stanza["from"]), "to": str(stanza["to"]),
                  "type": stanza["type"] or "", "id": stanza["id"] or "", "body": body, "xml": tostring(stanza.xml)})
        return handler

    async def on_start(self, _):
        self.send_presence()
        mech = self.plugin["feature_mechanisms"].mech
        emit({"event": "ready", "mechanism": mech.name if mech else None,
              "tls": self.transport is not None and self.transport.get_extra_info("sslcontext") is not None})


async def verstring(client, cmd):
    """slixmpp's own XEP-0115 algorithm over the entity's disco#info answer, without
    registering the caps plugin (which would change what the client sends)."""
    try:
        iq = await client.plugin["xep_0030"].get_info(jid=cmd["jid"], node=cmd.get("node"), cached=False, timeout=15)
        algo = cmd.get("hash", "sha-1")
        helper = types.SimpleNamespace(hashes={"sha-1": hashlib.sha1, "sha-256": hashlib.sha256}, xmpp=client)
        ver = XEP_0115.generate_verstring(helper, iq["disco_info"], algo)
        emit({"event": "verstring", "jid": cmd["jid"], "ver": ver, "xml": tostring(iq.xml)})
    except Exception as e:  # an error answer or a timeout: the test says which
        emit({"event": "verstring", "jid": cmd["jid"], "ver": None, "error": repr(e)})


async def commands(client):
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)  # tests send oversized stanzas on purpose
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            client.disconnect()
            return
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "send_raw":
            client.send_raw(cmd["xml"])
        elif op == "join":
            x = "<x xmlns='http://jabber.org/protocol/muc'>"
            if cmd.get("password"):
                x += "<password>%s</password>" % escape(cmd["password"])
            if cmd.get("maxstanzas") is not None:
                x += "<history maxstanzas='%d'/>" % int(cmd["maxstanzas"])
            x += "</x>"
            client.send_raw("<presence to=%s>%s</presence>" % (quoteattr(cmd["room"] + "/" + cmd["nick"]), x))
        elif op == "send":
            msg = client.make_message(mto=cmd["to"], mbody=cmd["body"], mtype=cmd.get("type", "chat"))
            if cmd.get("id"):
                msg["id"] = cmd["id"]
            msg.send()
        elif op == "verstring":
            asyncio.ensure_future(verstring(client, cmd))
        elif op == "disconnect":
            client.disconnect()
            return


async def main():
    jid, password, host, port = sys.argv[1:5]
    client = Driver(jid, password, sys.argv[5] if len(sys.argv) > 5 else None)
    client.connect(host, int(port))
    await commands(client)
    await asyncio.sleep(0.2)


if __name__ == "__main__":
    asyncio.run(main())
