#!/usr/bin/env python3
"""Self-test of discord_api.py over real HTTP and real websockets (aiohttp client).

usage: test_discord_api.py   (exits non-zero on any failure)

Starts the emulator on a free loopback port and checks the REST API (objects, errors,
paging, uploads, reactions, threads, webhooks), the rate-limit headers and 429s, the
gateway (identify, READY, GUILD_CREATE, heartbeats, intents and message-content gating,
close codes, resume with replay at the resume URL, invalid sessions, the resume window)
and the control API's faults.
"""

import asyncio
import base64
import hashlib
import os
import subprocess
import sys
import time
import urllib.parse

try:
    import aiohttp
except ImportError:
    # aiohttp lives in the tests' venv (tests/install-deps.sh): run there when started with another python.
    _VENV = os.path.join(os.environ.get("ISTHMUS_TEST_CACHE") or os.path.expanduser("~/.cache/isthmus"), "venv")
    if os.path.exists(os.path.join(_VENV, "bin", "python")) and os.path.abspath(sys.prefix) != os.path.abspath(_VENV):
        os.execv(os.path.join(_VENV, "bin", "python"), [os.path.join(_VENV, "bin", "python")] + sys.argv)
    raise

HERE = os.path.dirname(os.path.abspath(__file__))
EMULATOR = os.path.join(HERE, "discord_api.py")

T1, T2 = "token-one.bridge", "token-two.plain"
BOT1, BOT2 = "100000000000000001", "100000000000000002"
GUILD = "200000000000000001"
GENERAL, RANDOM, VOICE, CATEGORY = ("300000000000000001", "300000000000000002",
                                    "300000000000000003", "300000000000000004")
MODS = "400000000000000001"
ALICE = {"id": "500000000000000001", "username": "alice", "global_name": "Alice A."}
BOB = {"id": "500000000000000002", "username": "bob"}
CAROL = {"id": "500000000000000099", "username": "carol"}

I = {"GUILDS": 1, "GUILD_MEMBERS": 2, "GUILD_MESSAGES": 1 << 9, "GUILD_MESSAGE_REACTIONS": 1 << 10,
     "GUILD_MESSAGE_TYPING": 1 << 11, "DIRECT_MESSAGES": 1 << 12, "MESSAGE_CONTENT": 1 << 15}
FULL = (I["GUILDS"] | I["GUILD_MEMBERS"] | I["GUILD_MESSAGES"] | I["GUILD_MESSAGE_REACTIONS"]
        | I["GUILD_MESSAGE_TYPING"] | I["DIRECT_MESSAGES"] | I["MESSAGE_CONTENT"])
PLAIN = I["GUILDS"] | I["GUILD_MESSAGES"]
RL_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "X-RateLimit-Reset-After",
              "X-RateLimit-Bucket", "X-RateLimit-Scope")

failures = []
checks = 0


def check(cond, what):
    global checks
    checks += 1
    if not cond:
        failures.append(what)
        print("FAIL:", what, flush=True)
    return cond


def section(name):
    print("--", name, flush=True)


class Api:
    def __init__(self, http, base):
        self.http = http
        self.base = base

    async def call(self, method, path, token=T1, json=None, data=None, headers=None, raw_path=False):
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = "Bot " + token
        url = (self.base + path) if raw_path else (self.base + "/api/v10" + path)
        async with self.http.request(method, url, json=json, data=data, headers=h) as resp:
            text = await resp.text()
            body = None
            if text:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = text
            return resp.status, resp.headers, body

    async def ctl(self, method, name, json=None, query=""):
        async with self.http.request(method, self.base + "/_control/" + name + query, json=json) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError("control %s %s failed: %s %s" % (method, name, resp.status, body))
            return body


class GW:
    """A raw gateway client: no heartbeats unless asked, every frame inspectable."""

    def __init__(self, http, ws_base, path="/gateway/?v=10&encoding=json&compress=zlib-stream"):
        self.http = http
        self.url = ws_base + path
        self.ws = None
        self.seq = None
        self.session_id = None
        self.resume_url = None
        self.closed = None  # (type, code) once the connection ended

    async def connect(self):
        self.ws = await self.http.ws_connect(self.url, autoping=True, autoclose=True)
        return self

    async def recv(self, timeout=5.0):
        if self.closed:
            return None
        try:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
        except asyncio.TimeoutError:
            return None
        if msg.type == aiohttp.WSMsgType.TEXT:
            p = __import__("json").loads(msg.data)
            if p.get("s") is not None:
                self.seq = p["s"]
            return p
        self.closed = (msg.type, self.ws.close_code if msg.type != aiohttp.WSMsgType.CLOSE else msg.data)
        return None

    async def expect(self, pred, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            p = await self.recv(left)
            if p is None:
                return None
            if pred(p):
                return p

    async def dispatch(self, event, timeout=5.0, pred=None):
        return await self.expect(lambda p: p.get("op") == 0 and p.get("t") == event and (pred is None or pred(p["d"])),
                                 timeout)

    async def next_dispatch(self, timeout=5.0):
        return await self.expect(lambda p: p.get("op") == 0, timeout)

    async def send(self, obj):
        await self.ws.send_json(obj)

    async def hello(self):
        p = await self.recv()
        return p if p and p.get("op") == 10 else None

    async def identify(self, token=T1, intents=FULL):
        hello = await self.hello()
        await self.send({"op": 2, "d": {"token": "Bot " + token, "intents": intents, "shard": [0, 1],
                                        "large_threshold": 50, "compress": False,
                                        "properties": {"os": "linux", "browser": "test", "device": "test"}}})
        ready = await self.dispatch("READY")
        if ready:
            self.session_id = ready["d"]["session_id"]
            self.resume_url = ready["d"]["resume_gateway_url"]
        return hello, ready

    async def wait_closed(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            await self.recv(deadline - time.monotonic())
        return self.closed

    async def close(self, code=4000):
        if self.ws is not None and not self.ws.closed:
            await self.ws.close(code=code)
        self.closed = self.closed or ("client", code)


async def start_emulator():
    errlog = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), "discord_emulator_selftest.log"), "w")
    proc = subprocess.Popen([sys.executable, EMULATOR, "--port", "0"], stdout=subprocess.PIPE, stderr=errlog,
                            text=True)
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 20)
    if not line.startswith("listening on 127.0.0.1:"):
        proc.kill()
        raise RuntimeError("emulator did not start: %r (see %s)" % (line, errlog.name))
    return proc, int(line.strip().rsplit(":", 1)[1]), errlog.name


async def setup(api):
    section("control set-up")
    app1 = await api.ctl("POST", "app", {"token": T1, "bot_user": {"id": BOT1, "username": "bridgebot"},
                                         "privileged_intents": ["MESSAGE_CONTENT", "GUILD_MEMBERS"]})
    check(app1["bot_user_id"] == BOT1, "app registered")
    await api.ctl("POST", "app", {"token": T2, "bot_user": {"id": BOT2, "username": "plainbot"},
                                  "privileged_intents": []})
    extra = [{"user": {"id": "5100000000000000%02d" % i, "username": "member%02d" % i}} for i in range(10)]
    g = await api.ctl("POST", "guild", {
        "id": GUILD, "name": "Test Guild",
        "channels": [{"id": GENERAL, "name": "general", "type": 0}, {"id": RANDOM, "name": "random", "type": 0},
                     {"id": VOICE, "name": "voice", "type": 2}, {"id": CATEGORY, "name": "cat", "type": 4}],
        "roles": [{"id": MODS, "name": "mods", "mentionable": True}],
        "members": [{"user": ALICE, "nick": "Alice", "roles": [MODS]}, {"user": BOB}] + extra})
    check(g["id"] == GUILD and g["name"] == "Test Guild", "guild registered")


async def test_rest_basics(api, port):
    section("REST basics and errors")
    st, h, me = await api.call("GET", "/users/@me")
    check(st == 200 and me["id"] == BOT1 and me.get("bot") is True and me["username"] == "bridgebot", "GET /users/@me")
    check(all(k in h for k in RL_HEADERS), "rate-limit headers on a 200: %s" % dict(h))
    check(h.get("X-RateLimit-Scope") == "user", "X-RateLimit-Scope: user")
    st, h, body = await api.call("GET", "/users/@me", token="wrong")
    check(st == 401 and body == {"message": "401: Unauthorized", "code": 0}, "bad token: 401 %s %s" % (st, body))
    check(all(k in h for k in RL_HEADERS), "rate-limit headers on a 401")
    st, _, body = await api.call("GET", "/users/@me", token=None)
    check(st == 401, "no token: 401")
    st, _, gw = await api.call("GET", "/gateway", token=None)
    check(st == 200 and gw["url"] == "ws://127.0.0.1:%d/gateway" % port, "GET /gateway %s" % gw)
    st, _, gwb = await api.call("GET", "/gateway/bot")
    check(st == 200 and gwb["shards"] == 1 and gwb["url"] == gw["url"]
          and set(gwb["session_start_limit"]) >= {"total", "remaining", "reset_after", "max_concurrency"},
          "GET /gateway/bot %s" % gwb)
    st, _, mg = await api.call("GET", "/users/@me/guilds")
    check(st == 200 and [g["id"] for g in mg] == [GUILD] and "permissions" in mg[0], "GET /users/@me/guilds")
    st, _, appl = await api.call("GET", "/oauth2/applications/@me")
    check(st == 200 and appl["id"] and appl["bot"]["id"] == BOT1 and "verify_key" in appl, "GET application")
    st, _, u = await api.call("GET", "/users/" + ALICE["id"])
    check(st == 200 and u["username"] == "alice" and u["global_name"] == "Alice A." and u["discriminator"] == "0",
          "GET /users/{id}")
    st, _, body = await api.call("GET", "/users/999999999999")
    check(st == 404 and body["code"] == 10013, "unknown user 10013")
    st, _, g = await api.call("GET", "/guilds/" + GUILD)
    check(st == 200 and g["name"] == "Test Guild" and any(r["id"] == GUILD and r["name"] == "@everyone"
                                                         for r in g["roles"]), "GET /guilds/{id}")
    for key in ("afk_timeout", "features", "mfa_level", "nsfw_level", "preferred_locale", "system_channel_flags",
                "verification_level", "premium_progress_bar_enabled", "explicit_content_filter"):
        check(key in g, "guild has %s" % key)
    st, _, body = await api.call("GET", "/guilds/299999999999")
    check(st == 404 and body["code"] == 10004, "unknown guild 10004")
    st, _, chans = await api.call("GET", "/guilds/%s/channels" % GUILD)
    check(st == 200 and {c["id"] for c in chans} == {GENERAL, RANDOM, VOICE, CATEGORY}, "GET guild channels")
    st, _, roles = await api.call("GET", "/guilds/%s/roles" % GUILD)
    check(st == 200 and any(r["id"] == MODS and r["name"] == "mods" and "colors" in r for r in roles), "GET roles")
    st, _, mem = await api.call("GET", "/guilds/%s/members/%s" % (GUILD, ALICE["id"]))
    check(st == 200 and mem["nick"] == "Alice" and mem["user"]["id"] == ALICE["id"] and mem["roles"] == [MODS]
          and "joined_at" in mem and "flags" in mem, "GET member")
    st, _, body = await api.call("GET", "/guilds/%s/members/%s" % (GUILD, "599999999999"))
    check(st == 404 and body["code"] == 10007, "unknown member 10007")
    st, _, page1 = await api.call("GET", "/guilds/%s/members?limit=5" % GUILD)
    ids1 = [m["user"]["id"] for m in page1]
    check(st == 200 and len(ids1) == 5 and ids1 == sorted(ids1, key=int), "members page 1 sorted %s" % ids1)
    st, _, page2 = await api.call("GET", "/guilds/%s/members?limit=5&after=%s" % (GUILD, ids1[-1]))
    ids2 = [m["user"]["id"] for m in page2]
    check(st == 200 and len(ids2) == 5 and int(ids2[0]) > int(ids1[-1]), "members page 2 after")
    st, _, body = await api.call("GET", "/guilds/%s/members?limit=5" % GUILD, token=T2)
    check(st == 403 and body["code"] == 50001, "member list without GUILD_MEMBERS: 50001")
    st, _, ch = await api.call("GET", "/channels/" + GENERAL)
    check(st == 200 and ch["type"] == 0 and ch["guild_id"] == GUILD and ch["name"] == "general", "GET channel")
    st, _, body = await api.call("GET", "/channels/399999999999")
    check(st == 404 and body == {"message": "Unknown Channel", "code": 10003}, "unknown channel 10003")
    st, _, body = await api.call("GET", "/channels/%s/messages/399999999999" % GENERAL)
    check(st == 404 and body["code"] == 10008, "unknown message 10008")
    st, _, body = await api.call("GET", "/nope/route")
    check(st == 404 and body["code"] == 0, "unknown route 404")
    st, _, body = await api.call("POST", "/channels/%s/messages" % CATEGORY, json={"content": "x"})
    check(st == 400 and body["code"] == 50008, "message to a category: 50008")


async def test_messages(api):
    section("REST messages")
    st, _, m1 = await api.call("POST", "/channels/%s/messages" % GENERAL, json={"content": "first"})
    st2, _, m2 = await api.call("POST", "/channels/%s/messages" % GENERAL, json={"content": "second"})
    check(st == 200 and st2 == 200 and m1["content"] == "first" and m1["author"]["id"] == BOT1, "POST message")
    check(int(m2["id"]) > int(m1["id"]), "snowflakes increase")
    ms = (int(m1["id"]) >> 22) + 1420070400000
    check(abs(ms / 1000 - time.time()) < 60, "snowflake carries the time")
    for key in ("type", "channel_id", "timestamp", "edited_timestamp", "tts", "mention_everyone", "mentions",
                "mention_roles", "attachments", "embeds", "pinned", "flags", "components"):
        check(key in m1, "message has %s" % key)
    check(m1["edited_timestamp"] is None and m1["type"] == 0, "new message shape")
    st, _, body = await api.call("POST", "/channels/%s/messages" % GENERAL, json={"content": ""})
    check(st == 400 and body["code"] == 50006, "empty message: 50006 %s" % body)
    st, _, body = await api.call("POST", "/channels/%s/messages" % GENERAL, json={"content": "x" * 2001})
    check(st == 400 and body["code"] == 50035 and "content" in body.get("errors", {}), "2001 chars: 50035 %s" % body)
    st, _, body = await api.call("POST", "/channels/%s/messages" % GENERAL, data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    check(st == 400 and body["code"] == 50109, "invalid JSON: 50109")

    alice_msg = await api.ctl("POST", "message", {"channel_id": GENERAL, "author": ALICE, "content": "hi bot"})
    st, _, reply = await api.call("POST", "/channels/%s/messages" % GENERAL, json={
        "content": "a reply", "message_reference": {"message_id": alice_msg["id"]}})
    check(st == 200 and reply["type"] == 19 and reply["referenced_message"]["id"] == alice_msg["id"]
          and reply["message_reference"]["message_id"] == alice_msg["id"]
          and [u["id"] for u in reply["mentions"]] == [ALICE["id"]], "reply pings the replied author")
    st, _, reply2 = await api.call("POST", "/channels/%s/messages" % GENERAL, json={
        "content": "quiet reply", "message_reference": {"message_id": alice_msg["id"]},
        "allowed_mentions": {"parse": [], "replied_user": False}})
    check(st == 200 and reply2["mentions"] == [], "allowed_mentions suppresses the reply ping")
    st, _, body = await api.call("POST", "/channels/%s/messages" % GENERAL, json={
        "content": "x", "message_reference": {"message_id": "399999999999"}})
    check(st == 400 and body["code"] == 50035, "reply to an unknown message: 50035")
    st, _, ment = await api.call("POST", "/channels/%s/messages" % GENERAL, json={
        "content": "hey <@%s> and <@&%s>" % (BOB["id"], MODS), "allowed_mentions": {"parse": ["users"]}})
    check(st == 200 and [u["id"] for u in ment["mentions"]] == [BOB["id"]] and ment["mention_roles"] == [],
          "allowed_mentions parse users only")
    st, _, body = await api.call("POST", "/channels/%s/messages" % GENERAL, json={
        "content": "x", "allowed_mentions": {"parse": ["users"], "users": [BOB["id"]]}})
    check(st == 400 and body["code"] == 50035, "parse users + users list: 50035")
    st, _, n1 = await api.call("POST", "/channels/%s/messages" % GENERAL, json={
        "content": "once", "nonce": "abc123", "enforce_nonce": True})
    st2, _, n2 = await api.call("POST", "/channels/%s/messages" % GENERAL, json={
        "content": "once", "nonce": "abc123", "enforce_nonce": True})
    check(st == 200 and st2 == 200 and n1["id"] == n2["id"] and n1.get("nonce") == "abc123", "enforce_nonce dedups")
    _, _, n3 = await api.call("POST", "/channels/%s/messages" % GENERAL, json={"content": "once", "nonce": "abc123"})
    check(n3["id"] != n1["id"], "a nonce without enforce_nonce does not dedup")
    st, _, got = await api.call("GET", "/channels/%s/messages/%s" % (GENERAL, m1["id"]))
    check(st == 200 and got["id"] == m1["id"] and got["content"] == "first", "GET message")
    st, _, ed = await api.call("PATCH", "/channels/%s/messages/%s" % (GENERAL, m1["id"]), json={"content": "first!"})
    check(st == 200 and ed["content"] == "first!" and ed["edited_timestamp"] is not None, "PATCH own message")
    st, _, body = await api.call("PATCH", "/channels/%s/messages/%s" % (GENERAL, alice_msg["id"]),
                                 json={"content": "hijack"})
    check(st == 403 and body["code"] == 50005, "PATCH someone else's: 50005")
    st, _, _ = await api.call("DELETE", "/channels/%s/messages/%s" % (GENERAL, m2["id"]))
    check(st == 204, "DELETE own message: 204")
    st, _, body = await api.call("GET", "/channels/%s/messages/%s" % (GENERAL, m2["id"]))
    check(st == 404 and body["code"] == 10008, "deleted message is gone")
    await api.ctl("POST", "permissions", {"channel_id": RANDOM, "deny": ["SEND_MESSAGES"]})
    st, _, body = await api.call("POST", "/channels/%s/messages" % RANDOM, json={"content": "x"})
    check(st == 403 and body["code"] == 50013, "no SEND_MESSAGES: 50013")
    await api.ctl("POST", "permissions", {"channel_id": RANDOM, "access": False, "deny": []})
    st, _, body = await api.call("GET", "/channels/%s/messages" % RANDOM)
    check(st == 403 and body["code"] == 50001, "no access: 50001")
    await api.ctl("POST", "permissions", {"channel_id": RANDOM, "access": True})
    state = await api.ctl("GET", "messages", query="?channel_id=" + GENERAL)
    deleted = [m for m in state if m["id"] == m2["id"]]
    check(deleted and deleted[0]["deleted"] is True, "control sees the deleted message")
    edited = [m for m in state if m["id"] == m1["id"]]
    check(edited and edited[0]["edited"] and edited[0]["edit_history"] == ["first"], "control sees the edit")
    return alice_msg


def twilight_form(payload_json, files):
    """A multipart body laid out exactly as twilight-http's Form writes it."""
    boundary = b"abcdefghijklmno"
    buf = b"--" + boundary
    buf += b"\r\nContent-Disposition: form-data; name=\"payload_json\"\r\nContent-Type: application/json\r\n\r\n"
    buf += payload_json.encode() + b"\r\n--" + boundary
    for name, filename, data in files:
        buf += b"\r\nContent-Disposition: form-data; name=\"" + name.encode() + b"\"; filename=\""
        buf += filename.encode() + b"\"\r\n\r\n" + data + b"\r\n--" + boundary
    buf += b"--"
    return buf, "multipart/form-data; boundary=" + boundary.decode()


async def test_uploads(api, port):
    section("uploads and the CDN")
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
    body, ctype = twilight_form('{"content":"a file","attachments":[{"id":0,"filename":"pic one.png"}]}',
                                [("files[0]", "pic one.png", png)])
    st, _, m = await api.call("POST", "/channels/%s/messages" % GENERAL, data=body,
                              headers={"Content-Type": ctype, "Content-Length": str(len(body))})
    check(st == 200 and len(m.get("attachments", [])) == 1, "multipart message: %s %s" % (st, m))
    if st != 200 or not m.get("attachments"):
        return
    a = m["attachments"][0]
    check(a["size"] == len(png) and a["content_type"] == "image/png" and a["filename"] == "pic_one.png",
          "attachment object %s" % a)
    check(a["url"].startswith("http://127.0.0.1:%d/attachments/%s/%s/" % (port, GENERAL, a["id"]))
          and "proxy_url" in a, "attachment url on the CDN path")
    async with api.http.get(a["url"]) as resp:
        data = await resp.read()
        check(resp.status == 200 and data == png and resp.headers["Content-Type"] == "image/png", "CDN serves it")
    state = await api.ctl("GET", "messages", query="?channel_id=" + GENERAL)
    sm = [x for x in state if x["id"] == m["id"]][0]
    check(sm["attachments"][0]["sha256"] == hashlib.sha256(png).hexdigest(), "control has the sha256")
    form = aiohttp.FormData()
    form.add_field("payload_json", '{"content":"two files"}', content_type="application/json")
    form.add_field("files[0]", b"hello", filename="a.txt", content_type="text/plain")
    form.add_field("files[1]", b"world", filename="b.bin")
    st, _, m2 = await api.call("POST", "/channels/%s/messages" % GENERAL, data=form)
    check(st == 200 and [x["filename"] for x in m2["attachments"]] == ["a.txt", "b.bin"], "two files")
    await api.ctl("POST", "config", {"upload_limit": 1000})
    body, ctype = twilight_form('{"content":"too big"}', [("files[0]", "big.bin", b"x" * 2000)])
    st, _, err = await api.call("POST", "/channels/%s/messages" % GENERAL, data=body, headers={"Content-Type": ctype})
    check(st == 413 and err["code"] == 40005, "upload over the limit: 413 40005 (%s %s)" % (st, err))
    await api.ctl("POST", "config", {"upload_limit": 10 * 1024 * 1024})
    cm = await api.ctl("POST", "message", {"channel_id": GENERAL, "author": BOB, "content": "see attached",
                                           "attachments": [{"filename": "x.jpg", "content_type": "image/jpeg",
                                                            "bytes_b64": base64.b64encode(b"jpegdata").decode()}]})
    async with api.http.get(cm["attachments"][0]["url"]) as resp:
        check(resp.status == 200 and await resp.read() == b"jpegdata", "control attachment served")
    async with api.http.get("http://127.0.0.1:%d/attachments/1/2/nope.png" % port) as resp:
        check(resp.status == 404, "unknown attachment: 404")


async def test_reactions_typing(api, alice_msg):
    section("reactions and typing")
    mid = alice_msg["id"]
    thumbs = urllib.parse.quote("👍")
    st, _, _ = await api.call("PUT", "/channels/%s/messages/%s/reactions/%s/@me" % (GENERAL, mid, thumbs))
    check(st == 204, "PUT reaction: 204")
    st, _, users = await api.call("GET", "/channels/%s/messages/%s/reactions/%s" % (GENERAL, mid, thumbs))
    check(st == 200 and [u["id"] for u in users] == [BOT1], "GET reaction users")
    st, _, m = await api.call("GET", "/channels/%s/messages/%s" % (GENERAL, mid))
    r = m.get("reactions", [{}])[0]
    check(r.get("count") == 1 and r.get("me") is True and r.get("emoji") == {"id": None, "name": "👍"}
          and "count_details" in r, "message reactions %s" % r)
    st, _, _ = await api.call("PUT", "/channels/%s/messages/%s/reactions/%s/@me" % (GENERAL, mid,
                                                                                    "blob%3A600000000000000001"))
    check(st == 204, "custom emoji reaction")
    st, _, body = await api.call("PUT", "/channels/%s/messages/%s/reactions/notanemoji/@me" % (GENERAL, mid))
    check(st == 400 and body["code"] == 10014, "unknown emoji: 10014")
    await api.ctl("POST", "reaction", {"message_id": mid, "user": ALICE["id"], "emoji": "👍"})
    state = [x for x in await api.ctl("GET", "messages", query="?channel_id=" + GENERAL) if x["id"] == mid][0]
    tr = [x for x in state["reactions"] if x["emoji"]["name"] == "👍"][0]
    check(tr["users"] == [BOT1, ALICE["id"]], "control reaction users %s" % tr)
    st, _, _ = await api.call("DELETE", "/channels/%s/messages/%s/reactions/%s/%s" % (GENERAL, mid, thumbs, ALICE["id"]))
    st2, _, _ = await api.call("DELETE", "/channels/%s/messages/%s/reactions/%s/@me" % (GENERAL, mid, thumbs))
    check(st == 204 and st2 == 204, "DELETE reactions")
    st, _, users = await api.call("GET", "/channels/%s/messages/%s/reactions/%s" % (GENERAL, mid, thumbs))
    check(users == [], "reaction gone")
    st, _, _ = await api.call("POST", "/channels/%s/typing" % GENERAL)
    check(st == 204, "typing: 204")


async def test_threads(api):
    section("threads")
    _, _, root = await api.call("POST", "/channels/%s/messages" % GENERAL, json={"content": "thread root"})
    st, _, th = await api.call("POST", "/channels/%s/messages/%s/threads" % (GENERAL, root["id"]),
                               json={"name": "a thread", "auto_archive_duration": 1440})
    check(st == 200 and th["id"] == root["id"] and th["type"] == 11 and th["parent_id"] == GENERAL
          and th["thread_metadata"]["archived"] is False, "thread from a message %s" % th)
    st, _, body = await api.call("POST", "/channels/%s/messages/%s/threads" % (GENERAL, root["id"]),
                                 json={"name": "again"})
    check(st == 400 and body["code"] == 160004, "second thread on a message: 160004")
    st, _, th2 = await api.call("POST", "/channels/%s/threads" % GENERAL, json={"name": "standalone", "type": 11})
    check(st == 200 and th2["type"] == 11 and th2["name"] == "standalone", "thread without a message")
    _, _, recent = await api.call("GET", "/channels/%s/messages?limit=1" % GENERAL)
    check(recent[0]["type"] == 18 and recent[0]["message_reference"]["channel_id"] == th2["id"],
          "thread-created system message")
    st, _, tm = await api.call("POST", "/channels/%s/messages" % th["id"], json={"content": "in thread"})
    check(st == 200 and tm["channel_id"] == th["id"], "message in a thread")
    _, _, root_again = await api.call("GET", "/channels/%s/messages/%s" % (GENERAL, root["id"]))
    check(root_again.get("thread", {}).get("id") == th["id"], "starter message links its thread")
    ctl_th = await api.ctl("POST", "thread", {"channel_id": GENERAL, "name": "old one", "archived": True,
                                              "owner": ALICE})
    st, _, arch = await api.call("GET", "/channels/%s/threads/archived/public" % GENERAL)
    check(st == 200 and [t["id"] for t in arch["threads"]] == [ctl_th["id"]] and arch["has_more"] is False,
          "archived public threads")
    return th


async def test_webhooks(api, thread):
    section("webhooks")
    st, _, w = await api.call("POST", "/channels/%s/webhooks" % GENERAL, json={"name": "Bridge"})
    check(st == 200 and w["name"] == "Bridge" and w["token"] and w["channel_id"] == GENERAL and w["type"] == 1
          and w["user"]["id"] == BOT1, "create webhook")
    for name in ("Clyde helper", "my DISCORD hook"):
        st, _, body = await api.call("POST", "/channels/%s/webhooks" % GENERAL, json={"name": name})
        check(st == 400 and body["code"] == 50035 and "name" in body["errors"], "webhook name %r refused" % name)
    for i in range(14):
        st, _, _ = await api.call("POST", "/channels/%s/webhooks" % GENERAL, json={"name": "hook %d" % i})
    st, _, body = await api.call("POST", "/channels/%s/webhooks" % GENERAL, json={"name": "one too many"})
    check(st == 400 and body["code"] == 30007, "16th webhook: 30007 (%s)" % body)
    st, _, hooks = await api.call("GET", "/channels/%s/webhooks" % GENERAL)
    check(st == 200 and len(hooks) == 15, "15 webhooks listed")
    for h in hooks[1:]:
        await api.call("DELETE", "/webhooks/" + h["id"])
    st, _, body = await api.call("GET", "/webhooks/" + hooks[1]["id"])
    check(st == 404 and body["code"] == 10015, "deleted webhook: 10015")
    st, _, pw = await api.call("PATCH", "/webhooks/" + w["id"], json={"name": "Bridge 2"})
    check(st == 200 and pw["name"] == "Bridge 2", "PATCH webhook")
    st, _, gw = await api.call("GET", "/webhooks/" + w["id"])
    check(st == 200 and gw["name"] == "Bridge 2", "GET webhook")
    base = "/webhooks/%s/%s" % (w["id"], w["token"])
    st, _, wm = await api.call("POST", base + "?wait=true", token=None, json={
        "content": "from xmpp", "username": "alice (xmpp)", "avatar_url": "https://example.org/a.png"})
    check(st == 200 and wm["webhook_id"] == w["id"] and wm["author"]["username"] == "alice (xmpp)"
          and wm["author"]["id"] == w["id"] and wm["author"].get("bot") is True, "execute webhook, wait=true")
    st, _, body = await api.call("POST", base, token=None, json={"content": "no wait"})
    check(st == 204 and body is None, "execute webhook without wait: 204")
    st, _, body = await api.call("POST", "/webhooks/%s/wrongtoken?wait=true" % w["id"], token=None,
                                 json={"content": "x"})
    check(st == 401 and body["code"] == 50027, "bad webhook token: 50027")
    st, _, body = await api.call("POST", base + "?wait=true", token=None, json={"content": "x", "username": "clyde"})
    check(st == 400 and body["code"] == 50035 and "username" in body["errors"], "username clyde refused")
    st, _, body = await api.call("POST", base + "?wait=true", token=None, json={"content": ""})
    check(st == 400 and body["code"] == 50006, "empty webhook message: 50006")
    st, _, tm = await api.call("POST", base + "?wait=true&thread_id=" + thread["id"], token=None,
                               json={"content": "in thread via hook", "username": "bob (xmpp)"})
    check(st == 200 and tm["channel_id"] == thread["id"], "execute into a thread")
    st, _, got = await api.call("GET", base + "/messages/%s?thread_id=%s" % (tm["id"], thread["id"]), token=None)
    check(st == 200 and got["id"] == tm["id"], "GET webhook message with thread_id")
    st, _, body = await api.call("GET", base + "/messages/%s" % tm["id"], token=None)
    check(st == 404 and body["code"] == 10008, "webhook message without its thread_id: 10008")
    st, _, ed = await api.call("PATCH", base + "/messages/%s?thread_id=%s" % (tm["id"], thread["id"]), token=None,
                               json={"content": "edited via hook"})
    check(st == 200 and ed["content"] == "edited via hook" and ed["edited_timestamp"], "PATCH webhook message")
    st, _, _ = await api.call("DELETE", base + "/messages/%s?thread_id=%s" % (tm["id"], thread["id"]), token=None)
    check(st == 204, "DELETE webhook message")
    st, _, viabot = await api.call("GET", "/channels/%s/messages/%s" % (GENERAL, wm["id"]))
    check(st == 200 and viabot["webhook_id"] == w["id"], "webhook message through the channel API")
    st, _, unv = await api.call("POST", "/api/webhooks/%s/%s?wait=1" % (w["id"], w["token"]), token=None,
                                json={"content": "unversioned"}, raw_path=True)
    check(st == 200 and unv["content"] == "unversioned", "the webhook url (unversioned /api) works")
    state = [x for x in await api.ctl("GET", "messages", query="?channel_id=" + GENERAL) if x["id"] == wm["id"]][0]
    check(state["username"] == "alice (xmpp)" and state["avatar_url"] == "https://example.org/a.png"
          and state["webhook_id"] == w["id"], "control sees webhook username/avatar_url")
    listed = await api.ctl("GET", "webhooks", query="?channel_id=" + GENERAL)
    check([x["id"] for x in listed] == [w["id"]] and listed[0]["token"] == w["token"], "control webhooks")
    return w


async def test_paging(api):
    section("paging")
    ch = await api.ctl("POST", "channel", {"guild_id": GUILD, "name": "paging"})
    cid = ch["id"]
    made = await api.ctl("POST", "messages", {"channel_id": cid, "author": ALICE,
                                              "contents": ["p%d" % i for i in range(30)]})
    ids = [m["id"] for m in made]
    check(ids == sorted(ids, key=int) and len(set(ids)) == 30, "burst ids increase")

    async def page(q):
        st, _, body = await api.call("GET", "/channels/%s/messages%s" % (cid, q))
        return st, ([m["content"] for m in body] if st == 200 else body)

    st, got = await page("")
    check(st == 200 and got == ["p%d" % i for i in range(29, -1, -1)], "default: all 30, newest first")
    st, got = await page("?limit=10")
    check(got == ["p%d" % i for i in range(29, 19, -1)], "limit=10: the newest 10")
    st, got = await page("?before=%s&limit=5" % ids[10])
    check(got == ["p9", "p8", "p7", "p6", "p5"], "before: the 5 just before, newest first %s" % got)
    st, got = await page("?after=%s&limit=5" % ids[10])
    check(got == ["p15", "p14", "p13", "p12", "p11"], "after: the 5 just after, newest first %s" % got)
    st, got = await page("?after=%s" % ids[27])
    check(got == ["p29", "p28"], "after near the end %s" % got)
    st, got = await page("?around=%s&limit=5" % ids[10])
    check(got == ["p12", "p11", "p10", "p9", "p8"], "around %s" % got)
    st, got = await page("?after=0&limit=3")
    check(got == ["p2", "p1", "p0"], "after=0: the oldest %s" % got)
    for q in ("?limit=0", "?limit=101", "?before=abc"):
        st, body = await page(q)
        check(st == 400 and body["code"] == 50035, "%s: 50035" % q)


async def test_ratelimits(api):
    section("rate limits")
    _, h1, _ = await api.call("GET", "/channels/" + GENERAL)
    _, h2, _ = await api.call("GET", "/channels/" + GENERAL)
    check(h1["X-RateLimit-Limit"] == "50" and int(h2["X-RateLimit-Remaining"]) == int(h1["X-RateLimit-Remaining"]) - 1,
          "remaining counts down %s %s" % (h1.get("X-RateLimit-Remaining"), h2.get("X-RateLimit-Remaining")))
    check(float(h1["X-RateLimit-Reset-After"]) <= 1.0 and float(h1["X-RateLimit-Reset"]) > time.time() - 5,
          "reset headers")
    await api.ctl("POST", "fault", {"kind": "ratelimit", "route": "POST /channels/{id}/messages", "calls": 2,
                                    "per_secs": 3})
    path = "/channels/%s/messages" % RANDOM
    s1, h1, _ = await api.call("POST", path, json={"content": "rl 1"})
    s2, h2, _ = await api.call("POST", path, json={"content": "rl 2"})
    s3, h3, b3 = await api.call("POST", path, json={"content": "rl 3"})
    check(s1 == 200 and s2 == 200 and h1["X-RateLimit-Limit"] == "2" and h1["X-RateLimit-Remaining"] == "1"
          and h2["X-RateLimit-Remaining"] == "0", "limited bucket counts down")
    check(s3 == 429 and b3.get("message") == "You are being rate limited." and b3.get("global") is False
          and 0 < b3.get("retry_after", 0) <= 3, "429 body %s" % b3)
    check(h3.get("Retry-After", "").isdigit() and h3.get("X-RateLimit-Scope") == "user"
          and h3.get("X-RateLimit-Bucket") == h1["X-RateLimit-Bucket"] and h3.get("X-RateLimit-Remaining") == "0",
          "429 headers %s" % dict(h3))
    s4, _, _ = await api.call("POST", "/channels/%s/messages" % GENERAL, json={"content": "other channel"})
    check(s4 == 200, "another channel has its own bucket")
    s5, h5, _ = await api.call("GET", path)
    check(s5 == 200 and h5["X-RateLimit-Bucket"] != h1["X-RateLimit-Bucket"], "another route has its own bucket")
    await api.ctl("POST", "fault", {"kind": "clear"})
    await api.ctl("POST", "fault", {"kind": "ratelimit", "calls": 1, "per_secs": 2, "scope": "shared"})
    await api.call("GET", "/users/@me")
    s6, h6, b6 = await api.call("GET", "/users/@me")
    check(s6 == 429 and h6.get("X-RateLimit-Scope") == "shared" and h6.get("Retry-After", "").isdigit()
          and "X-RateLimit-Bucket" in h6, "shared 429 %s %s" % (dict(h6), b6))
    await api.ctl("POST", "fault", {"kind": "clear"})
    await api.ctl("POST", "fault", {"kind": "global_ratelimit", "secs": 1})
    s7, h7, b7 = await api.call("GET", "/users/@me")
    check(s7 == 429 and b7.get("global") is True and h7.get("X-RateLimit-Global") == "true"
          and h7.get("X-RateLimit-Scope") == "global" and h7.get("Retry-After") == "1", "global 429 %s" % b7)
    await asyncio.sleep(1.1)
    s8, _, _ = await api.call("GET", "/users/@me")
    check(s8 == 200, "global limit lifts")
    await api.ctl("POST", "fault", {"kind": "http", "method": "POST", "path_prefix": "/channels/%s/messages" % GENERAL,
                                    "status": 500, "count": 1})
    s9, h9, b9 = await api.call("POST", "/channels/%s/messages" % GENERAL, json={"content": "will fail"})
    s10, _, _ = await api.call("POST", "/channels/%s/messages" % GENERAL, json={"content": "will work"})
    check(s9 == 500 and b9 == {"message": "500: Internal Server Error", "code": 0} and "X-RateLimit-Bucket" in h9,
          "http fault 500 %s" % b9)
    check(s10 == 200, "http fault count used up")
    await api.ctl("POST", "config", {"bucket_limit": 2, "bucket_window": 2})
    codes = [(await api.call("GET", "/users/" + BOB["id"]))[0] for _ in range(3)]
    check(codes == [200, 200, 429], "configured default bucket enforced %s" % codes)
    await api.ctl("POST", "config", {"bucket_limit": 50, "bucket_window": 1})
    calls = await api.ctl("GET", "calls", query="?method=POST&path_prefix=/channels/%s/messages" % RANDOM)
    check(any(c["status"] == 429 and c["body"] == {"content": "rl 3"} for c in calls), "calls record the 429")


async def test_gateway(api, http, port, webhook):
    section("gateway: identify, READY, GUILD_CREATE, heartbeats")
    ws_base = "ws://127.0.0.1:%d" % port
    g1 = await GW(http, ws_base).connect()
    hello, ready = await g1.identify(T1, FULL)
    check(hello is not None and hello["d"]["heartbeat_interval"] == 41250, "HELLO with heartbeat_interval")
    check(ready is not None and ready["s"] == 1, "READY is seq 1")
    if ready is None:
        return
    d = ready["d"]
    check(d["v"] == 10 and d["user"]["id"] == BOT1 and d["guilds"] == [{"id": GUILD, "unavailable": True}]
          and d["application"]["id"] and len(d["session_id"]) >= 16, "READY payload")
    check(d["resume_gateway_url"] == ws_base + "/resume-gateway" and d["resume_gateway_url"] != ws_base + "/gateway",
          "resume_gateway_url is a different URL")
    gc = await g1.dispatch("GUILD_CREATE")
    check(gc is not None and gc["d"]["id"] == GUILD and GENERAL in [c["id"] for c in gc["d"]["channels"]]
          and ALICE["id"] in [m["user"]["id"] for m in gc["d"]["members"]]
          and MODS in [r["id"] for r in gc["d"]["roles"]] and len(gc["d"]["threads"]) >= 2
          and gc["d"]["unavailable"] is False, "GUILD_CREATE with channels, threads, members, roles")
    await g1.send({"op": 1, "d": g1.seq})
    ack = await g1.expect(lambda p: p["op"] == 11, 3)
    check(ack is not None, "HEARTBEAT -> HEARTBEAT_ACK")
    await api.ctl("POST", "fault", {"kind": "heartbeat"})
    req = await g1.expect(lambda p: p["op"] == 1, 3)
    check(req is not None, "op 1 from the server")

    section("gateway: intents and message content")
    g2 = await GW(http, ws_base).connect()
    _, ready2 = await g2.identify(T2, PLAIN)
    gc2 = await g2.dispatch("GUILD_CREATE")
    check(gc2 is not None and [m["user"]["id"] for m in gc2["d"]["members"]] == [BOT2],
          "GUILD_CREATE without GUILD_MEMBERS only lists the bot")
    cm = await api.ctl("POST", "message", {"channel_id": GENERAL, "author": ALICE, "content": "hello world"})
    e1 = await g1.dispatch("MESSAGE_CREATE", pred=lambda d: d["id"] == cm["id"])
    e2 = await g2.dispatch("MESSAGE_CREATE", pred=lambda d: d["id"] == cm["id"])
    check(e1 is not None and e1["d"]["content"] == "hello world" and e1["d"]["guild_id"] == GUILD
          and e1["d"]["member"]["nick"] == "Alice" and e1["d"]["author"]["id"] == ALICE["id"],
          "MESSAGE_CREATE with MESSAGE_CONTENT")
    check(e2 is not None and e2["d"]["content"] == "" and e2["d"]["embeds"] == [], "content gated without the intent")
    cm2 = await api.ctl("POST", "message", {"channel_id": GENERAL, "author": ALICE, "content": "<@%s> hi" % BOT2})
    e3 = await g2.dispatch("MESSAGE_CREATE", pred=lambda d: d["id"] == cm2["id"])
    check(e3 is not None and e3["d"]["content"] == "<@%s> hi" % BOT2 and e3["d"]["mentions"][0]["id"] == BOT2,
          "content shown when the bot is mentioned")
    _, _, rest_view = await api.call("GET", "/channels/%s/messages/%s" % (GENERAL, cm["id"]), token=T2)
    check(rest_view["content"] == "", "REST gating for an app without MESSAGE_CONTENT")
    _, _, wm = await api.call("POST", "/webhooks/%s/%s?wait=true" % (webhook["id"], webhook["token"]), token=None,
                              json={"content": "hook says", "username": "carol (xmpp)"})
    e4 = await g1.dispatch("MESSAGE_CREATE", pred=lambda d: d["id"] == wm["id"])
    check(e4 is not None and e4["d"]["webhook_id"] == webhook["id"] and "member" not in e4["d"],
          "MESSAGE_CREATE for a webhook message has webhook_id")
    await api.ctl("POST", "typing", {"channel_id": GENERAL, "user": ALICE["id"]})
    sentinel = await api.ctl("POST", "message", {"channel_id": GENERAL, "author": BOB, "content": "sentinel 1"})
    t1 = await g1.dispatch("TYPING_START")
    check(t1 is not None and t1["d"]["user_id"] == ALICE["id"] and t1["d"]["channel_id"] == GENERAL, "TYPING_START")
    nxt = await g2.expect(lambda p: p.get("t") == "TYPING_START" or (p.get("t") == "MESSAGE_CREATE"
                                                                     and p["d"]["id"] == sentinel["id"]))
    check(nxt is not None and nxt["t"] == "MESSAGE_CREATE",
          "no TYPING_START without GUILD_MESSAGE_TYPING (got %s)" % (nxt and nxt["t"]))
    await api.ctl("POST", "reaction", {"message_id": cm["id"], "user": ALICE["id"], "emoji": "🎉"})
    ra = await g1.dispatch("MESSAGE_REACTION_ADD")
    check(ra is not None and ra["d"]["emoji"] == {"id": None, "name": "🎉"} and ra["d"]["user_id"] == ALICE["id"]
          and ra["d"]["message_id"] == cm["id"] and ra["d"]["guild_id"] == GUILD, "MESSAGE_REACTION_ADD")
    await api.ctl("POST", "reaction", {"message_id": cm["id"], "user": ALICE["id"],
                                       "emoji": {"id": "600000000000000002", "name": "party"}})
    await api.ctl("POST", "reaction", {"message_id": cm["id"], "user": ALICE["id"], "emoji": "🎉", "action": "remove"})
    rc = await g1.dispatch("MESSAGE_REACTION_ADD")
    check(rc is not None and rc["d"]["emoji"] == {"id": "600000000000000002", "name": "party"}, "custom emoji event")
    rr = await g1.dispatch("MESSAGE_REACTION_REMOVE")
    check(rr is not None and rr["d"]["emoji"]["name"] == "🎉", "MESSAGE_REACTION_REMOVE")
    await api.ctl("POST", "edit", {"message_id": cm["id"], "content": "hello world (edited)"})
    up = await g1.dispatch("MESSAGE_UPDATE")
    check(up is not None and up["d"]["content"] == "hello world (edited)" and up["d"]["edited_timestamp"]
          and up["d"]["author"]["id"] == ALICE["id"], "MESSAGE_UPDATE is a full message")
    lm = await api.ctl("POST", "message", {"channel_id": GENERAL, "author": ALICE,
                                           "content": "look https://example.org/page"})
    await api.ctl("POST", "link_preview", {"message_id": lm["id"], "title": "Example"})
    lp = await g1.dispatch("MESSAGE_UPDATE", pred=lambda d: d["id"] == lm["id"])
    check(lp is not None and lp["d"]["edited_timestamp"] is None and lp["d"]["embeds"][0]["url"] == "https://example.org/page"
          and lp["d"]["content"] == "look https://example.org/page", "link-preview MESSAGE_UPDATE")
    await api.ctl("POST", "delete", {"message_id": cm2["id"]})
    dl = await g1.dispatch("MESSAGE_DELETE")
    check(dl is not None and dl["d"] == {"id": cm2["id"], "channel_id": GENERAL, "guild_id": GUILD}, "MESSAGE_DELETE")
    th = await api.ctl("POST", "thread", {"channel_id": GENERAL, "name": "gw thread", "owner": BOB})
    tc = await g1.dispatch("THREAD_CREATE")
    check(tc is not None and tc["d"]["id"] == th["id"] and tc["d"]["parent_id"] == GENERAL, "THREAD_CREATE")
    await api.ctl("POST", "member", {"guild_id": GUILD, "user": CAROL, "nick": "Carol"})
    await api.ctl("POST", "member", {"guild_id": GUILD, "user": CAROL["id"], "nick": "Caz"})
    ma = await g1.dispatch("GUILD_MEMBER_ADD")
    mu = await g1.dispatch("GUILD_MEMBER_UPDATE")
    check(ma is not None and ma["d"]["user"]["id"] == CAROL["id"] and ma["d"]["guild_id"] == GUILD, "GUILD_MEMBER_ADD")
    check(mu is not None and mu["d"]["nick"] == "Caz", "GUILD_MEMBER_UPDATE")
    nc = await api.ctl("POST", "channel", {"guild_id": GUILD, "name": "new-channel"})
    cc1 = await g1.dispatch("CHANNEL_CREATE")
    cc2 = await g2.dispatch("CHANNEL_CREATE")
    check(cc1 is not None and cc1["d"]["id"] == nc["id"] and cc2 is not None, "CHANNEL_CREATE")
    # g2 got no member events: the next thing it sees after CHANNEL_CREATE is the next message.
    s2 = await api.ctl("POST", "message", {"channel_id": GENERAL, "author": BOB, "content": "sentinel 2"})
    nxt = await g2.expect(lambda p: p.get("t", "").startswith("GUILD_MEMBER") or p["d"].get("id") == s2["id"])
    check(nxt is not None and nxt["d"].get("id") == s2["id"], "no member events without GUILD_MEMBERS")
    await g2.close(1000)
    dm = await api.ctl("POST", "dm", {"recipient": ALICE, "bot_user_id": BOT2})
    g2d = await GW(http, ws_base).connect()
    await g2d.identify(T2, PLAIN | I["DIRECT_MESSAGES"])
    dmm = await api.ctl("POST", "message", {"channel_id": dm["id"], "author": ALICE, "content": "secret dm"})
    got = await g2d.dispatch("MESSAGE_CREATE", pred=lambda d: d["id"] == dmm["id"])
    check(got is not None and got["d"]["content"] == "secret dm" and "guild_id" not in got["d"],
          "DM content shown without MESSAGE_CONTENT")
    await g2d.close(1000)
    st, _, own_dm = await api.call("POST", "/users/@me/channels", json={"recipient_id": BOB["id"]})
    check(st == 200 and own_dm["type"] == 1 and own_dm["recipients"][0]["id"] == BOB["id"], "open a DM")
    st, _, _ = await api.call("POST", "/channels/%s/messages" % own_dm["id"], json={"content": "dm from bot"})
    check(st == 200, "message into the DM")
    st, _, body = await api.call("GET", "/channels/%s/messages" % dm["id"])
    check(st == 403 and body["code"] == 50001, "another bot's DM: 50001")

    section("gateway: close codes")
    for token, intents, code, what in ((("bad-token", FULL, 4004, "bad token")),
                                       (T2, PLAIN | I["MESSAGE_CONTENT"], 4014, "MESSAGE_CONTENT not enabled"),
                                       (T2, PLAIN | I["GUILD_MEMBERS"], 4014, "GUILD_MEMBERS not enabled"),
                                       (T1, FULL | (1 << 30), 4013, "unknown intent bit")):
        g = await GW(http, ws_base).connect()
        await g.identify(token, intents)
        closed = await g.wait_closed()
        check(closed is not None and closed[1] == code, "%s: close %d (%s)" % (what, code, closed))
    g = await GW(http, ws_base).connect()
    await g.hello()
    await g.send({"op": 3, "d": {"status": "online"}})
    closed = await g.wait_closed()
    check(closed is not None and closed[1] == 4003, "payload before identify: 4003")

    section("gateway: resume")
    sid, seq_before = g1.session_id, g1.seq
    await g1.close(4000)
    await asyncio.sleep(0.2)
    sessions = await api.ctl("GET", "sessions")
    me = [s for s in sessions["sessions"] if s["id"] == sid][0]
    check(me["connected"] is False and me["resumable"] is True, "session disconnected but resumable")
    missed = [await api.ctl("POST", "message", {"channel_id": GENERAL, "author": ALICE, "content": "missed %d" % i})
              for i in range(3)]
    await api.ctl("POST", "reaction", {"message_id": missed[0]["id"], "user": BOB, "emoji": "👀"})
    g1b = await GW(http, ws_base, "/resume-gateway/?v=10&encoding=json&compress=zlib-stream").connect()
    hello = await g1b.hello()
    await g1b.send({"op": 6, "d": {"token": "Bot " + T1, "session_id": sid, "seq": seq_before}})
    got = []
    while True:
        p = await g1b.recv(5)
        if p is None or p.get("t") == "RESUMED":
            resumed = p
            break
        got.append(p)
    check(hello is not None and resumed is not None, "RESUMED after the replay")
    check([p["d"]["content"] for p in got if p["t"] == "MESSAGE_CREATE" and p["d"]["content"].startswith("missed")]
          == ["missed 0", "missed 1", "missed 2"] and got[-1]["t"] == "MESSAGE_REACTION_ADD",
          "missed events replayed in order: %s" % [p["t"] for p in got])
    check([p["s"] for p in got] == list(range(seq_before + 1, seq_before + 1 + len(got)))
          and resumed is not None and resumed["s"] == seq_before + len(got) + 1, "replayed sequence numbers")
    live = await api.ctl("POST", "message", {"channel_id": GENERAL, "author": ALICE, "content": "live again"})
    lv = await g1b.dispatch("MESSAGE_CREATE")
    check(lv is not None and lv["d"]["id"] == live["id"] and lv["s"] == resumed["s"] + 1, "live after RESUMED")
    sessions = await api.ctl("GET", "sessions")
    me = [s for s in sessions["sessions"] if s["id"] == sid][0]
    check(me["connected"] and me["resumed"] == 1 and me["identified"] == 1 and me["intents"] == FULL
          and me["seq"] == g1b.seq, "sessions endpoint %s" % me)

    await g1b.close(4000)
    wrong = await GW(http, ws_base).connect()
    await wrong.hello()
    await wrong.send({"op": 6, "d": {"token": "Bot " + T1, "session_id": sid, "seq": g1b.seq}})
    inv = await wrong.expect(lambda p: p["op"] == 9, 3)
    check(inv is not None and inv["d"] is False, "RESUME at the connect URL: INVALID_SESSION false")
    await wrong.close(4000)
    again = await GW(http, ws_base, "/resume-gateway?v=10&encoding=json").connect()
    await again.hello()
    await again.send({"op": 6, "d": {"token": "Bot " + T1, "session_id": "nosuchsession", "seq": 1}})
    inv = await again.expect(lambda p: p["op"] == 9, 3)
    check(inv is not None and inv["d"] is False, "RESUME of an unknown session: INVALID_SESSION false")
    await again.send({"op": 6, "d": {"token": "Bot " + T1, "session_id": sid, "seq": g1b.seq}})
    ok = await again.dispatch("RESUMED", 3)
    check(ok is not None, "the session still resumes at the resume URL after a wrong try")
    await again.close(1000)
    await asyncio.sleep(0.2)
    after1000 = await GW(http, ws_base, "/resume-gateway?v=10&encoding=json").connect()
    await after1000.hello()
    await after1000.send({"op": 6, "d": {"token": "Bot " + T1, "session_id": sid, "seq": g1b.seq}})
    inv = await after1000.expect(lambda p: p["op"] == 9, 3)
    check(inv is not None and inv["d"] is False, "closing with 1000 ends the session")
    await after1000.close(1000)

    section("gateway: resume window")
    await api.ctl("POST", "config", {"resume_window": 1.0})
    g4 = await GW(http, ws_base).connect()
    await g4.identify(T1, PLAIN)
    await g4.close(4000)
    await api.ctl("POST", "message", {"channel_id": GENERAL, "author": ALICE, "content": "while away"})
    await asyncio.sleep(1.6)
    g4b = await GW(http, ws_base, "/resume-gateway?v=10&encoding=json").connect()
    await g4b.hello()
    await g4b.send({"op": 6, "d": {"token": "Bot " + T1, "session_id": g4.session_id, "seq": g4.seq}})
    inv = await g4b.expect(lambda p: p["op"] == 9, 3)
    check(inv is not None and inv["d"] is False, "RESUME after the window: INVALID_SESSION false")
    await g4b.close(1000)
    await api.ctl("POST", "config", {"resume_window": 60.0})

    section("gateway: faults")
    async def fresh(intents=PLAIN):
        g = await GW(http, ws_base).connect()
        await g.identify(T1, intents)
        await g.dispatch("GUILD_CREATE", 3)
        return g

    async def resume(old, expect_ok=True):
        g = await GW(http, ws_base, "/resume-gateway/?v=10&encoding=json").connect()
        await g.hello()
        await g.send({"op": 6, "d": {"token": "Bot " + T1, "session_id": old.session_id, "seq": old.seq}})
        g.session_id, g.seq = old.session_id, old.seq
        p = await g.expect(lambda p: p["op"] == 9 or p.get("t") == "RESUMED", 3)
        return g, p

    g5 = await fresh()
    await api.ctl("POST", "fault", {"kind": "reconnect"})
    rc = await g5.expect(lambda p: p["op"] == 7, 3)
    check(rc is not None, "RECONNECT (op 7)")
    await g5.close(4000)
    g5b, p = await resume(g5)
    check(p is not None and p.get("t") == "RESUMED", "resume after RECONNECT")
    await api.ctl("POST", "fault", {"kind": "invalid_session", "resumable": False})
    inv = await g5b.expect(lambda p: p["op"] == 9, 3)
    check(inv is not None and inv["d"] is False, "INVALID_SESSION false from the fault")
    await g5b.close(1000)
    _, p = await resume(g5b)
    check(p is not None and p["op"] == 9 and p["d"] is False, "an invalidated session does not resume")

    g6 = await fresh()
    await api.ctl("POST", "fault", {"kind": "invalid_session", "resumable": True})
    inv = await g6.expect(lambda p: p["op"] == 9, 3)
    check(inv is not None and inv["d"] is True, "INVALID_SESSION true")
    await g6.close(4000)
    g6b, p = await resume(g6)
    check(p is not None and p.get("t") == "RESUMED", "a resumable invalid session resumes")

    await api.ctl("POST", "fault", {"kind": "drop"})
    closed = await g6b.wait_closed(3)
    check(closed is not None and closed[0] != aiohttp.WSMsgType.CLOSE, "drop: no close frame (%s)" % (closed,))
    await api.ctl("POST", "message", {"channel_id": GENERAL, "author": ALICE, "content": "after the drop"})
    g6c, p = await resume(g6b)
    check(p is not None and p.get("t") == "RESUMED", "resume after a drop")

    await api.ctl("POST", "fault", {"kind": "stop_acks"})
    await g6c.send({"op": 1, "d": g6c.seq})
    zm = await api.ctl("POST", "message", {"channel_id": GENERAL, "author": ALICE, "content": "to a zombie"})
    quiet = await g6c.recv(1.0)
    check(quiet is None, "stop_acks: no ACK and no dispatch (%s)" % quiet)
    await g6c.close(4000)
    g6d = await GW(http, ws_base, "/resume-gateway/?v=10&encoding=json").connect()
    await g6d.hello()
    await g6d.send({"op": 6, "d": {"token": "Bot " + T1, "session_id": g6c.session_id, "seq": g6c.seq}})
    g6d.session_id = g6c.session_id
    replay = await g6d.dispatch("MESSAGE_CREATE", 3, pred=lambda d: d["id"] == zm["id"])
    check(replay is not None, "the message withheld from the zombie connection is replayed")
    check(await g6d.dispatch("RESUMED", 3) is not None, "resume after a zombie connection")
    await g6d.send({"op": 1, "d": g6d.seq})
    ack = await g6d.expect(lambda p: p["op"] == 11, 3)
    check(ack is not None, "ACKs again on the next connection")

    await api.ctl("POST", "fault", {"kind": "outage", "secs": 1.5})
    closed = await g6d.wait_closed(3)
    check(closed is not None, "outage drops the connection")
    try:
        await GW(http, ws_base).connect()
        refused = False
    except aiohttp.WSServerHandshakeError as err:
        refused = err.status == 503
    check(refused, "outage refuses websocket connections")
    await asyncio.sleep(1.7)
    g7 = await GW(http, ws_base).connect()
    h7 = await g7.hello()
    check(h7 is not None, "connections accepted after the outage")
    await g7.close(1000)

    await api.ctl("POST", "config", {"heartbeat_interval": 300})
    g8 = await GW(http, ws_base).connect()
    h8 = await g8.hello()
    check(h8 is not None and h8["d"]["heartbeat_interval"] == 300, "configured heartbeat_interval")
    closed = await g8.wait_closed(4)
    check(closed is not None and closed[1] == 4009, "no heartbeats: closed with 4009 (%s)" % (closed,))
    await api.ctl("POST", "config", {"heartbeat_interval": 41250})
    sessions = await api.ctl("GET", "sessions")
    check(sessions["identify_count"] >= 5 and sessions["resume_count"] >= 5 and sessions["invalid_session_count"] >= 3,
          "session counters %s" % {k: v for k, v in sessions.items() if k.endswith("count")})


async def test_calls(api):
    section("calls log")
    calls = await api.ctl("GET", "calls")
    check(any(c["method"] == "POST" and c["path"] == "/api/v10/channels/%s/messages" % GENERAL
              and c["status"] == 200 and isinstance(c["body"], dict) for c in calls), "calls recorded")
    check(any(c["body"] and isinstance(c["body"], dict) and "files" in c["body"] for c in calls),
          "multipart calls record their files")
    await api.ctl("DELETE", "calls")
    calls = await api.ctl("GET", "calls")
    check(calls == [], "calls cleared")


async def main():
    proc, port, logname = await start_emulator()
    try:
        async with aiohttp.ClientSession() as http:
            api = Api(http, "http://127.0.0.1:%d" % port)
            await setup(api)
            await test_rest_basics(api, port)
            alice_msg = await test_messages(api)
            await test_uploads(api, port)
            await test_reactions_typing(api, alice_msg)
            thread = await test_threads(api)
            webhook = await test_webhooks(api, thread)
            await test_paging(api)
            await test_ratelimits(api)
            await test_gateway(api, http, port, webhook)
            await test_calls(api)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    print("%d checks, %d failed (emulator log: %s)" % (checks, len(failures), logname), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
