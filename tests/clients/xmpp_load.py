#!/usr/bin/env python3
"""Log many accounts in at once (slixmpp, one asyncio loop) and report how many made it.

usage: xmpp_load.py HOST PORT CA_FILE PASSWORD JID...

Every client requires STARTTLS against CA_FILE. Prints one JSON line:
  {"ok": N, "failed": M, "seconds": S}
"""
import asyncio
import json
import sys
import time

import slixmpp


class Client(slixmpp.ClientXMPP):
    def __init__(self, jid, password, ca_file, done):
        super().__init__(jid, password)
        self.enable_plaintext = False
        self.enable_starttls = True
        self.enable_direct_tls = False
        self.ca_certs = ca_file
        self.done = done
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("failed_auth", lambda _: self.finish(False))

    async def on_start(self, _):
        self.send_presence()
        self.finish(True)

    def finish(self, ok):
        if not self.done.done():
            self.done.set_result(ok)


async def main():
    host, port, ca_file, password = sys.argv[1:5]
    jids = sys.argv[5:]
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    clients = []
    for jid in jids:
        done = loop.create_future()
        c = Client(jid, password, ca_file, done)
        c.connect(host, int(port))
        clients.append(c)
    results = await asyncio.gather(*(asyncio.wait_for(c.done, 120) for c in clients), return_exceptions=True)
    ok = sum(1 for r in results if r is True)
    print(json.dumps({"ok": ok, "failed": len(jids) - ok, "seconds": round(time.monotonic() - start, 2)}), flush=True)
    for c in clients:
        c.disconnect()
    await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main())
