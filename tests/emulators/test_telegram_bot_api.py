#!/usr/bin/env python3
"""Self-test of the Telegram Bot API emulator (telegram_bot_api.py).

Starts the emulator on a free port and exercises its Bot API and control API
over real HTTP. Run it with the test venv's interpreter (it needs aiohttp):

    ~/.cache/isthmus/venv/bin/python tests/emulators/test_telegram_bot_api.py

It exits non-zero when a test fails. The emulator's request log goes to a
temporary file whose path is printed when something fails.
"""

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import select
import struct
import subprocess
import sys
import tempfile
import time
import unittest
import uuid
import zlib

import aiohttp

HERE = os.path.dirname(os.path.abspath(__file__))
EMULATOR = os.path.join(HERE, "telegram_bot_api.py")

TOKEN = "111111:test-token-main"
TOKEN2 = "222222:test-token-other"
BOT = {"token": TOKEN, "id": 111111, "username": "bridge_bot", "first_name": "Bridge",
       "can_read_all_group_messages": True}
BOT2 = {"token": TOKEN2, "id": 222222, "username": "quiet_bot", "first_name": "Quiet",
        "can_read_all_group_messages": False}
CHAT = -1001000000001
ALICE = {"id": 5001, "is_bot": False, "first_name": "Alice", "username": "alice"}
BOB = {"id": 5002, "is_bot": False, "first_name": "Bob"}
OWNER = {"id": 5000, "is_bot": False, "first_name": "Owner"}

CONFLICT = ("Conflict: terminated by other getUpdates request; "
            "make sure that only one bot instance is running")
NOT_MODIFIED = ("Bad Request: message is not modified: specified new message content and "
                "reply markup are exactly the same as a current content and reply markup of "
                "the message")

PROC = None
BASE = None
LOG_PATH = None
LOG_FILE = None


def png(width, height):
    """A valid PNG image of the given size."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    row = b"\x00" + b"\x40\x80\xc0" * width
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height))
            + chunk(b"IEND", b""))


def webp_header(width, height):
    """Enough of a WebP (VP8X) file for its dimensions to be read."""
    body = (b"WEBP" + b"VP8X" + (10).to_bytes(4, "little") + b"\x00\x00\x00\x00"
            + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little"))
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def utf16_len(text):
    return len(text.encode("utf-16-le")) // 2


def multipart(fields, files):
    """A multipart/form-data body built by hand, so that the exact shape
    (teloxide's `filename=""`, attach:// names) is under control.
    files: {part name: (filename, bytes, content type)}."""
    boundary = uuid.uuid4().hex
    out = []
    for name, value in fields.items():
        if not isinstance(value, str):
            value = json.dumps(value)
        out.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode()
                   + value.encode() + b"\r\n")
    for name, (filename, data, ctype) in files.items():
        head = f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
        if ctype:
            head += f"Content-Type: {ctype}\r\n"
        out.append(head.encode() + b"\r\n" + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def setUpModule():
    global PROC, BASE, LOG_PATH, LOG_FILE
    fd, LOG_PATH = tempfile.mkstemp(prefix="telegram-emulator-", suffix=".log")
    LOG_FILE = os.fdopen(fd, "w")
    PROC = subprocess.Popen([sys.executable, EMULATOR, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=LOG_FILE, text=True)
    ready, _, _ = select.select([PROC.stdout], [], [], 15)
    if not ready:
        PROC.kill()
        raise RuntimeError("the emulator did not start within 15 s")
    line = PROC.stdout.readline()
    m = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
    if not m:
        PROC.kill()
        raise RuntimeError(f"unexpected first line {line!r}")
    BASE = f"http://127.0.0.1:{m.group(1)}"


def tearDownModule():
    if PROC is not None:
        PROC.terminate()
        try:
            PROC.wait(10)
        except subprocess.TimeoutExpired:
            PROC.kill()
            PROC.wait()
        PROC.stdout.close()
    if LOG_FILE is not None:
        LOG_FILE.close()


class EmulatorTest(unittest.IsolatedAsyncioTestCase):
    """Each test starts from a reset emulator with the main bot registered and
    one ordinary supergroup."""

    chat_spec = {"id": CHAT, "type": "supergroup", "title": "Lounge", "admins": [ALICE]}

    async def asyncSetUp(self):
        # Encoding the big test files takes a moment; that is not a bug here.
        asyncio.get_running_loop().slow_callback_duration = 5
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        await self.ctl("reset")
        await self.ctl("bot", BOT)
        await self.ctl("chat", self.chat_spec)

    async def asyncTearDown(self):
        await self.http.close()

    # -- helpers --------------------------------------------------------------

    async def ctl(self, name, body=None, http="POST", expect=200, **query):
        data = io.BytesIO(json.dumps(body).encode()) if body is not None else None
        async with self.http.request(http, f"{BASE}/_control/{name}", data=data,
                                     headers={"Content-Type": "application/json"},
                                     params=query or None) as r:
            data = await r.read()
            self.assertEqual(r.status, expect, data[:500])
            if r.content_type == "application/json":
                return json.loads(data)
            return data

    async def raw(self, method, token=TOKEN, http="POST", **kwargs):
        async with self.http.request(http, f"{BASE}/bot{token}/{method}", **kwargs) as r:
            body = await r.read()
            try:
                return r.status, json.loads(body)
            except ValueError:
                return r.status, body

    async def call(self, method, token=TOKEN, **params):
        return await self.raw(method, token, json=params)

    async def ok(self, method, token=TOKEN, **params):
        status, body = await self.call(method, token, **params)
        self.assertEqual((status, body.get("ok")), (200, True), body)
        return body["result"]

    async def fails(self, method, status, description, token=TOKEN, **params):
        got_status, body = await self.call(method, token, **params)
        self.assertEqual(body, {"ok": False, "error_code": status, "description": description,
                                **({"parameters": body["parameters"]} if "parameters" in body else {})})
        self.assertEqual(got_status, status)
        return body

    async def upload(self, method, fields, files, token=TOKEN):
        data, ctype = multipart(fields, files)
        return await self.raw(method, token, data=io.BytesIO(data), headers={"Content-Type": ctype})

    async def upload_ok(self, method, fields, files, token=TOKEN):
        status, body = await self.upload(method, fields, files, token)
        self.assertEqual(status, 200, body)
        return body["result"]

    async def updates(self, token=TOKEN, **params):
        return await self.ok("getUpdates", token, **params)

    async def drain(self, token=TOKEN):
        """Every pending update, confirmed."""
        got = await self.updates(token)
        if got:
            await self.updates(token, offset=got[-1]["update_id"] + 1)
        return got

    async def post(self, text, sender=ALICE, chat=CHAT, **extra):
        return await self.ctl("message", dict({"chat_id": chat, "from": sender, "text": text}, **extra))

    async def sent(self, chat=CHAT):
        return await self.ctl("sent", http="GET", chat_id=chat)


class CommandLineTest(unittest.TestCase):
    def test_listens_on_loopback_only(self):
        port = int(BASE.rsplit(":", 1)[1])
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        listening = [r[1] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == port]
        self.assertEqual(listening, [f"0100007F:{port:04X}"])
        if os.path.exists("/proc/net/tcp6"):
            with open("/proc/net/tcp6") as f:
                rows6 = [line.split() for line in f.readlines()[1:]]
            self.assertFalse([r for r in rows6 if r[3] == "0A" and int(r[1].split(":")[1], 16) == port])


class BasicsTest(EmulatorTest):
    async def test_get_me(self):
        me = await self.ok("getMe")
        self.assertEqual(me["id"], BOT["id"])
        self.assertTrue(me["is_bot"])
        self.assertEqual(me["username"], "bridge_bot")
        self.assertEqual(me["first_name"], "Bridge")
        self.assertIs(me["can_join_groups"], True)
        self.assertIs(me["can_read_all_group_messages"], True)
        self.assertIs(me["supports_inline_queries"], False)

    async def test_method_names_are_case_insensitive_and_get_works(self):
        for name in ("getMe", "GetMe", "getme", "GETME"):
            status, body = await self.raw(name, http="GET")
            self.assertEqual((status, body["ok"], body["result"]["id"]), (200, True, BOT["id"]))

    async def test_unknown_token_and_method(self):
        await self.fails("getMe", 401, "Unauthorized", token="999:nope")
        await self.fails("sendTelepathy", 404, "Not Found")
        async with self.http.get(f"{BASE}/nothing/here") as r:
            self.assertEqual(r.status, 404)
            self.assertEqual(await r.json(), {"ok": False, "error_code": 404, "description": "Not Found"})

    async def test_parameter_encodings(self):
        text = "bold 👍 text"
        entities = [{"type": "bold", "offset": 0, "length": 4}]
        # Query string (GET).
        _, b1 = await self.raw("sendMessage", http="GET",
                               params={"chat_id": str(CHAT), "text": text, "entities": json.dumps(entities)})
        # JSON.
        _, b2 = await self.call("sendMessage", chat_id=CHAT, text=text, entities=entities)
        # application/x-www-form-urlencoded, entities as a JSON string.
        _, b3 = await self.raw("SendMessage", data={"chat_id": str(CHAT), "text": text,
                                                     "entities": json.dumps(entities)})
        # multipart/form-data text fields.
        _, b4 = await self.upload("SendMessage", {"chat_id": str(CHAT), "text": text, "entities": entities}, {})
        for body in (b1, b2, b3, b4):
            self.assertTrue(body["ok"], body)
            self.assertEqual(body["result"]["text"], text)
            self.assertEqual(body["result"]["entities"], entities)
        self.assertEqual([b["result"]["message_id"] for b in (b1, b2, b3, b4)], [1, 2, 3, 4])

    async def test_webhook_and_session_methods(self):
        await self.post("queued")
        self.assertIs(await self.ok("deleteWebhook"), True)
        info = await self.ok("getWebhookInfo")
        self.assertEqual(info["url"], "")
        self.assertEqual(info["pending_update_count"], 1)
        self.assertIs(await self.ok("deleteWebhook", drop_pending_updates=True), True)
        self.assertEqual((await self.ctl("updates_pending", http="GET", token=TOKEN))["pending"], 0)
        self.assertIs(await self.ok("logOut"), True)
        self.assertIs(await self.ok("close"), True)

    async def test_send_chat_action(self):
        self.assertIs(await self.ok("sendChatAction", chat_id=CHAT, action="typing"), True)
        await self.fails("sendChatAction", 400, "Bad Request: wrong parameter action in request",
                         chat_id=CHAT, action="dancing")
        await self.fails("sendChatAction", 400, "Bad Request: chat not found", chat_id=-42, action="typing")

    async def test_calls_log(self):
        await self.ctl("calls", http="DELETE")
        await self.raw("SendMessage", json={"chat_id": CHAT, "text": "hi"})
        await self.call("getMe")
        await self.call("sendMessage", chat_id=CHAT, text=" ")
        calls = await self.ctl("calls", http="GET")
        self.assertEqual([(c["method"], c["status"]) for c in calls],
                         [("SendMessage", 200), ("getMe", 200), ("sendMessage", 400)])
        self.assertEqual(calls[0]["params"], {"chat_id": CHAT, "text": "hi"})
        only = await self.ctl("calls", http="GET", **{"method": "sendmessage"})
        self.assertEqual(len(only), 2)
        await self.ctl("calls", http="DELETE")
        self.assertEqual(await self.ctl("calls", http="GET"), [])


class SendMessageTest(EmulatorTest):
    async def test_message_object(self):
        text = "héllo 👍 wörld 🇫🇷 end"
        start = utf16_len("héllo 👍 ")
        entities = [{"type": "bold", "offset": start, "length": utf16_len("wörld")},
                    {"type": "text_link", "offset": utf16_len("héllo 👍 wörld "),
                     "length": utf16_len("🇫🇷"), "url": "https://example.org/"}]
        m1 = await self.ok("sendMessage", chat_id=CHAT, text=text, entities=entities,
                           parse_mode="HTML", disable_notification=True,
                           link_preview_options={"is_disabled": True})
        self.assertEqual(m1["message_id"], 1)
        self.assertEqual(m1["from"], {"id": BOT["id"], "is_bot": True, "first_name": "Bridge",
                                      "username": "bridge_bot"})
        self.assertEqual(m1["chat"], {"id": CHAT, "type": "supergroup", "title": "Lounge"})
        self.assertIsInstance(m1["date"], int)
        self.assertLess(abs(m1["date"] - time.time()), 5)
        self.assertEqual(m1["text"], text)
        self.assertEqual(m1["entities"], entities)
        self.assertEqual(m1["link_preview_options"], {"is_disabled": True})
        self.assertNotIn("edit_date", m1)
        m2 = await self.ok("sendMessage", chat_id=str(CHAT), text="second")
        self.assertEqual(m2["message_id"], 2)
        sent = await self.sent()
        self.assertEqual([s["message_id"] for s in sent], [1, 2])
        self.assertEqual(sent[0]["parse_mode"], "HTML")
        self.assertIsNone(sent[1]["parse_mode"])
        self.assertIs(sent[0]["disable_notification"], True)
        self.assertEqual((sent[0]["edits"], sent[0]["deleted"], sent[0]["bot_reactions"]), (0, False, []))

    async def test_entities_are_checked_in_utf16(self):
        text = "a👍b"  # 4 UTF-16 units
        await self.ok("sendMessage", chat_id=CHAT, text=text,
                      entities=[{"type": "italic", "offset": 1, "length": 2}])
        _, body = await self.call("sendMessage", chat_id=CHAT, text=text,
                                  entities=[{"type": "italic", "offset": 1, "length": 4}])
        self.assertTrue(body["description"].startswith("Bad Request: can't parse entities"), body)
        _, body = await self.call("sendMessage", chat_id=CHAT, text=text,
                                  entities=[{"type": "italic", "offset": 2, "length": 1}])
        self.assertTrue(body["description"].startswith("Bad Request: can't parse entities"), body)
        self.assertEqual(len(await self.sent()), 1)

    async def test_empty_and_long_text(self):
        await self.fails("sendMessage", 400, "Bad Request: message text is empty", chat_id=CHAT, text="")
        await self.fails("sendMessage", 400, "Bad Request: message text is empty", chat_id=CHAT, text=" \n ")
        await self.fails("sendMessage", 400, "Bad Request: message is too long", chat_id=CHAT, text="x" * 4097)
        await self.fails("sendMessage", 400, "Bad Request: chat not found", chat_id=-77, text="x")

    async def test_replies(self):
        original = await self.post("question?")
        r1 = await self.ok("sendMessage", chat_id=CHAT, text="answer",
                           reply_parameters={"message_id": original["message_id"]})
        self.assertEqual(r1["reply_to_message"]["message_id"], original["message_id"])
        self.assertEqual(r1["reply_to_message"]["text"], "question?")
        self.assertEqual(r1["reply_to_message"]["from"]["id"], ALICE["id"])
        self.assertEqual(r1["reply_to_message"]["chat"]["id"], CHAT)
        # Replies in a supergroup belong to the thread of the root message.
        self.assertEqual(r1["message_thread_id"], original["message_id"])
        self.assertNotIn("is_topic_message", r1)
        # Only one level of reply_to_message.
        r2 = await self.ok("sendMessage", chat_id=CHAT, text="again", reply_to_message_id=r1["message_id"])
        self.assertEqual(r2["reply_to_message"]["message_id"], r1["message_id"])
        self.assertNotIn("reply_to_message", r2["reply_to_message"])
        # With chat_id in reply_parameters too.
        r3 = await self.ok("sendMessage", chat_id=CHAT, text="x",
                           reply_parameters={"message_id": original["message_id"], "chat_id": CHAT})
        self.assertEqual(r3["reply_to_message"]["message_id"], original["message_id"])
        await self.fails("sendMessage", 400, "Bad Request: message to be replied not found",
                         chat_id=CHAT, text="x", reply_parameters={"message_id": 999})
        r4 = await self.ok("sendMessage", chat_id=CHAT, text="x",
                           reply_parameters={"message_id": 999, "allow_sending_without_reply": True})
        self.assertNotIn("reply_to_message", r4)
        # A quote must be part of the replied-to text.
        r5 = await self.ok("sendMessage", chat_id=CHAT, text="x",
                           reply_parameters={"message_id": original["message_id"], "quote": "tion"})
        self.assertEqual(r5["quote"]["text"], "tion")
        self.assertEqual(r5["quote"]["position"], 4)


class TopicsTest(EmulatorTest):
    chat_spec = {"id": CHAT, "type": "supergroup", "title": "Forum", "is_forum": True,
                 "creator": OWNER}

    async def test_topics(self):
        topic = await self.ctl("topic", {"chat_id": CHAT, "name": "Rust"})
        tid = topic["message_thread_id"]
        self.assertEqual(topic["message"]["message_id"], tid)
        self.assertEqual(topic["message"]["forum_topic_created"]["name"], "Rust")
        [update] = await self.drain()
        created = update["message"]
        self.assertEqual((created["message_thread_id"], created["is_topic_message"]), (tid, True))
        self.assertEqual(created["chat"], {"id": CHAT, "type": "supergroup", "title": "Forum", "is_forum": True})

        m = await self.ok("sendMessage", chat_id=CHAT, text="in topic", message_thread_id=tid)
        self.assertEqual((m["message_thread_id"], m["is_topic_message"]), (tid, True))
        # As on Telegram, a topic message that replies to nothing replies to
        # the topic's creation message.
        self.assertEqual(m["reply_to_message"]["message_id"], tid)
        self.assertIn("forum_topic_created", m["reply_to_message"])
        await self.fails("sendMessage", 400, "Bad Request: message thread not found",
                         chat_id=CHAT, text="x", message_thread_id=4242)

        user = await self.post("user in topic", message_thread_id=tid)
        [update] = await self.drain()
        self.assertEqual(update["message"]["message_thread_id"], tid)
        self.assertIs(update["message"]["is_topic_message"], True)
        # A reply without message_thread_id lands in the replied-to topic.
        reply = await self.ok("sendMessage", chat_id=CHAT, text="reply",
                              reply_parameters={"message_id": user["message_id"]})
        self.assertEqual((reply["message_thread_id"], reply["reply_to_message"]["message_id"]),
                         (tid, user["message_id"]))
        # The General topic has no thread id.
        general = await self.ok("sendMessage", chat_id=CHAT, text="general")
        self.assertNotIn("message_thread_id", general)
        self.assertNotIn("is_topic_message", general)

        chat = await self.ok("getChat", chat_id=CHAT)
        self.assertEqual((chat["id"], chat["type"], chat["title"], chat["is_forum"]),
                         (CHAT, "supergroup", "Forum", True))


class UpdatesTest(EmulatorTest):
    async def test_offsets(self):
        for text in ("one", "two", "three"):
            await self.post(text)
        got = await self.updates()
        self.assertEqual([u["message"]["text"] for u in got], ["one", "two", "three"])
        ids = [u["update_id"] for u in got]
        self.assertEqual(ids, list(range(ids[0], ids[0] + 3)))
        self.assertGreater(ids[0], 0)
        # Nothing is confirmed until an offset above it is given.
        self.assertEqual(len(await self.updates()), 3)
        self.assertEqual([u["update_id"] for u in await self.updates(offset=ids[2])], [ids[2]])
        self.assertEqual((await self.ctl("updates_pending", http="GET", token=TOKEN))["pending"], 1)
        self.assertEqual(await self.updates(offset=ids[2] + 1), [])
        self.assertEqual((await self.ctl("updates_pending", http="GET", token=TOKEN))["pending"], 0)

    async def test_negative_offset_and_limit(self):
        await self.ctl("messages", {"chat_id": CHAT, "from": ALICE, "texts": [f"m{i}" for i in range(5)]})
        got = await self.updates(offset=-2)
        self.assertEqual([u["message"]["text"] for u in got], ["m3", "m4"])
        self.assertEqual((await self.ctl("updates_pending", http="GET", token=TOKEN))["pending"], 2)
        self.assertEqual(len(await self.updates(limit=1)), 1)
        self.assertEqual(len(await self.updates(limit=0)), 1)  # clamped to 1..100

    async def test_burst_and_paging(self):
        texts = [f"burst {i}" for i in range(300)]
        result = await self.ctl("messages", {"chat_id": CHAT, "from": ALICE, "texts": texts})
        self.assertEqual(result["message_ids"], list(range(1, 301)))
        seen = []
        offset = None
        while True:
            params = {"limit": 500} if offset is None else {"limit": 500, "offset": offset}
            page = await self.updates(**params)
            if not page:
                break
            self.assertLessEqual(len(page), 100)
            seen += [u["message"]["text"] for u in page]
            offset = page[-1]["update_id"] + 1
        self.assertEqual(seen, texts)

    async def test_long_poll_returns_when_an_update_arrives(self):
        started = time.monotonic()
        poll = asyncio.create_task(self.updates(timeout=10))
        await asyncio.sleep(0.3)
        self.assertFalse(poll.done())
        await self.post("wake up")
        got = await asyncio.wait_for(poll, 5)
        self.assertEqual([u["message"]["text"] for u in got], ["wake up"])
        self.assertLess(time.monotonic() - started, 3)
        # And an empty long poll lasts its timeout.
        started = time.monotonic()
        self.assertEqual(await self.updates(offset=got[0]["update_id"] + 1, timeout=1), [])
        self.assertGreaterEqual(time.monotonic() - started, 0.9)

    async def test_concurrent_get_updates_conflict(self):
        first = asyncio.create_task(self.call("getUpdates", timeout=10))
        await asyncio.sleep(0.3)
        second = asyncio.create_task(self.call("getUpdates", timeout=1))
        status, body = await asyncio.wait_for(first, 5)
        self.assertEqual((status, body), (409, {"ok": False, "error_code": 409, "description": CONFLICT}))
        status, body = await second
        self.assertEqual((status, body), (200, {"ok": True, "result": []}))

    async def test_abandoned_long_poll_is_no_conflict(self):
        await self.ctl("calls", http="DELETE")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as impatient:
            with self.assertRaises((asyncio.TimeoutError, aiohttp.ClientError)):
                async with impatient.post(f"{BASE}/bot{TOKEN}/GetUpdates", json={"timeout": 10}) as r:
                    await r.read()
        await asyncio.sleep(0.3)
        await self.post("after")
        got = await self.updates(timeout=1)
        self.assertEqual([u["message"]["text"] for u in got], ["after"])
        calls = await self.ctl("calls", http="GET")
        self.assertEqual([(c["method"], c["status"]) for c in calls], [("GetUpdates", 499), ("getUpdates", 200)])

    async def test_form_encoded_get_updates(self):
        await self.post("one")
        status, body = await self.raw("getUpdates", data={"offset": "0", "limit": "10", "timeout": "0",
                                                          "allowed_updates": json.dumps(["message"])})
        self.assertEqual((status, [u["message"]["text"] for u in body["result"]]), (200, ["one"]))

    async def test_allowed_updates_are_remembered(self):
        await self.ctl("reset")
        await self.ctl("bot", BOT)
        await self.ctl("chat", {"id": CHAT, "type": "supergroup", "title": "Admins", "bot_is_admin": True})
        m = await self.post("react to me")
        await self.drain()
        # Only reactions from now on.
        self.assertEqual(await self.updates(allowed_updates=["message_reaction"]), [])
        await self.post("not wanted")
        await self.ctl("reaction", {"chat_id": CHAT, "message_id": m["message_id"], "user": BOB,
                                    "new_reaction": [{"type": "emoji", "emoji": "👍"}]})
        got = await self.updates()  # no allowed_updates: the last setting holds
        self.assertEqual([list(u)[1] for u in got], ["message_reaction"])
        await self.updates(offset=got[-1]["update_id"] + 1, allowed_updates=[])
        # The default set again: messages, but not reactions.
        await self.post("wanted")
        await self.ctl("reaction", {"chat_id": CHAT, "message_id": m["message_id"], "user": BOB,
                                    "new_reaction": []})
        got = await self.updates()
        self.assertEqual([u["message"]["text"] for u in got], ["wanted"])

    async def test_edits_make_edited_message_updates(self):
        m = await self.post("tpyo")
        await self.drain()
        edited = await self.ctl("edit", {"chat_id": CHAT, "message_id": m["message_id"], "text": "typo",
                                         "entities": [{"type": "italic", "offset": 0, "length": 4}]})
        self.assertEqual(edited["text"], "typo")
        [update] = await self.drain()
        self.assertEqual(update["edited_message"]["text"], "typo")
        self.assertEqual(update["edited_message"]["message_id"], m["message_id"])
        self.assertIn("edit_date", update["edited_message"])
        self.assertEqual(update["edited_message"]["entities"][0]["type"], "italic")

    async def test_auto_entities(self):
        m = await self.post("/start@bridge_bot hi @alice_x see https://example.org #tag",
                            auto_entities=True)
        self.assertEqual([e["type"] for e in m["entities"]], ["bot_command", "mention", "url", "hashtag"])
        self.assertEqual(m["entities"][0], {"offset": 0, "length": 17, "type": "bot_command"})


class PrivacyTest(EmulatorTest):
    async def asyncSetUp(self):
        await super().asyncSetUp()
        await self.ctl("bot", BOT2)

    async def texts(self, token):
        return [u["message"]["text"] for u in await self.drain(token) if "message" in u]

    async def test_privacy_mode(self):
        await self.post("hello all")
        await self.post("/start")
        await self.post("/start@bridge_bot")
        await self.post("/help@quiet_bot")
        await self.post("hey @Quiet_Bot look")
        mine = await self.ok("sendMessage", token=TOKEN2, chat_id=CHAT, text="from quiet")
        await self.post("replying", reply_to_message_id=mine["message_id"])
        await self.ctl("message", {"chat_id": CHAT, "from": {"id": 9, "is_bot": True, "first_name": "Other"},
                                   "text": "/start from a bot"})
        self.assertEqual(await self.texts(TOKEN),
                         ["hello all", "/start", "/start@bridge_bot", "/help@quiet_bot", "hey @Quiet_Bot look",
                          "replying"])
        self.assertEqual(await self.texts(TOKEN2),
                         ["/start", "/help@quiet_bot", "hey @Quiet_Bot look", "replying"])

    async def test_admin_bots_see_everything(self):
        admin_chat = CHAT - 1
        await self.ctl("chat", {"id": admin_chat, "type": "group", "title": "G", "bot_is_admin": True})
        await self.post("plain words", chat=admin_chat)
        self.assertEqual(await self.texts(TOKEN2), ["plain words"])


class EditDeleteTest(EmulatorTest):
    async def test_edit_message_text(self):
        m = await self.ok("sendMessage", chat_id=CHAT, text="first")
        e = await self.ok("editMessageText", chat_id=CHAT, message_id=m["message_id"], text="second",
                          entities=[{"type": "code", "offset": 0, "length": 6}])
        self.assertEqual((e["message_id"], e["text"]), (m["message_id"], "second"))
        self.assertIsInstance(e["edit_date"], int)
        await self.fails("editMessageText", 400, NOT_MODIFIED, chat_id=CHAT, message_id=m["message_id"],
                         text="second", entities=[{"type": "code", "offset": 0, "length": 6}])
        await self.ok("editMessageText", chat_id=CHAT, message_id=m["message_id"], text="second")
        await self.fails("editMessageText", 400, "Bad Request: message to edit not found",
                         chat_id=CHAT, message_id=999, text="x")
        user = await self.post("user text")
        await self.fails("editMessageText", 400, "Bad Request: message can't be edited",
                         chat_id=CHAT, message_id=user["message_id"], text="x")
        [s] = await self.sent()
        self.assertEqual((s["text"], s["edits"], "entities" in s), ("second", 2, False))

    async def test_edit_caption(self):
        photo = await self.upload_ok("sendPhoto", {"chat_id": str(CHAT), "caption": "old"},
                                     {"photo": ("p.png", png(40, 30), "image/png")})
        await self.fails("editMessageText", 400, "Bad Request: there is no text in the message to edit",
                         chat_id=CHAT, message_id=photo["message_id"], text="x")
        e = await self.ok("editMessageCaption", chat_id=CHAT, message_id=photo["message_id"], caption="new")
        self.assertEqual(e["caption"], "new")
        self.assertIn("edit_date", e)
        await self.fails("editMessageCaption", 400, NOT_MODIFIED, chat_id=CHAT,
                         message_id=photo["message_id"], caption="new")
        text = await self.ok("sendMessage", chat_id=CHAT, text="t")
        await self.fails("editMessageCaption", 400, "Bad Request: there is no caption in the message to edit",
                         chat_id=CHAT, message_id=text["message_id"], caption="c")

    async def test_delete_own_messages(self):
        m = await self.ok("sendMessage", chat_id=CHAT, text="bye")
        self.assertIs(await self.ok("deleteMessage", chat_id=CHAT, message_id=m["message_id"]), True)
        await self.fails("deleteMessage", 400, "Bad Request: message to delete not found",
                         chat_id=CHAT, message_id=m["message_id"])
        await self.fails("editMessageText", 400, "Bad Request: message to edit not found",
                         chat_id=CHAT, message_id=m["message_id"], text="x")
        [s] = await self.sent()
        self.assertIs(s["deleted"], True)
        old = await self.ok("sendMessage", chat_id=CHAT, text="old")
        await self.ctl("clock", {"advance_secs": 49 * 3600})
        await self.fails("deleteMessage", 400, "Bad Request: message can't be deleted for everyone",
                         chat_id=CHAT, message_id=old["message_id"])

    async def test_delete_others_messages_needs_admin(self):
        user = await self.post("spam")
        await self.fails("deleteMessage", 400, "Bad Request: message can't be deleted for everyone",
                         chat_id=CHAT, message_id=user["message_id"])
        admin_chat = CHAT - 5
        await self.ctl("chat", {"id": admin_chat, "type": "supergroup", "title": "A", "bot_is_admin": True})
        user = await self.post("spam", chat=admin_chat)
        await self.ctl("clock", {"advance_secs": 72 * 3600})
        self.assertIs(await self.ok("deleteMessage", chat_id=admin_chat, message_id=user["message_id"]), True)
        limited = CHAT - 6
        await self.ctl("chat", {"id": limited, "type": "supergroup", "title": "L", "bot_is_admin": True,
                                "bot_rights": {"can_delete_messages": False}})
        user = await self.post("spam", chat=limited)
        await self.fails("deleteMessage", 400, "Bad Request: message can't be deleted for everyone",
                         chat_id=limited, message_id=user["message_id"])


class ReactionsTest(EmulatorTest):
    async def test_bot_reactions(self):
        m = await self.ok("sendMessage", chat_id=CHAT, text="nice")
        thumbs = [{"type": "emoji", "emoji": "👍"}]
        self.assertIs(await self.ok("setMessageReaction", chat_id=CHAT, message_id=m["message_id"],
                                    reaction=thumbs), True)
        [s] = await self.sent()
        self.assertEqual(s["bot_reactions"], thumbs)
        await self.fails("setMessageReaction", 400, "Bad Request: REACTIONS_TOO_MANY", chat_id=CHAT,
                         message_id=m["message_id"], reaction=thumbs + [{"type": "emoji", "emoji": "🔥"}])
        await self.fails("setMessageReaction", 400, "Bad Request: REACTION_INVALID", chat_id=CHAT,
                         message_id=m["message_id"], reaction=[{"type": "emoji", "emoji": "🙂"}])
        await self.fails("setMessageReaction", 400, "Bad Request: message to react not found", chat_id=CHAT,
                         message_id=999, reaction=thumbs)
        # Form-encoded, as a JSON string; a user's message this time.
        user = await self.post("hello")
        status, body = await self.raw("setMessageReaction", data={
            "chat_id": str(CHAT), "message_id": str(user["message_id"]),
            "reaction": json.dumps([{"type": "emoji", "emoji": "❤"}])})
        self.assertEqual((status, body["result"]), (200, True))
        state = await self.ctl("message", http="GET", chat_id=CHAT, message_id=user["message_id"])
        self.assertEqual(state["bot_reactions"], [{"type": "emoji", "emoji": "❤"}])
        await self.ok("setMessageReaction", chat_id=CHAT, message_id=m["message_id"], reaction=[])
        [s] = await self.sent()
        self.assertEqual((s["bot_reactions"], (await self.sent())[0]["message_id"]), ([], m["message_id"]))

    async def test_user_reaction_updates(self):
        admin_chat = CHAT - 1
        await self.ctl("chat", {"id": admin_chat, "type": "supergroup", "title": "A", "bot_is_admin": True})
        await self.updates(allowed_updates=["message", "message_reaction"])
        m = await self.post("rate me", chat=admin_chat)
        plain = await self.post("rate me too")  # the bot is no admin here
        await self.drain()
        thumbs, fire = [{"type": "emoji", "emoji": "👍"}], [{"type": "emoji", "emoji": "🔥"}]
        await self.ctl("reaction", {"chat_id": admin_chat, "message_id": m["message_id"], "user": BOB,
                                    "new_reaction": thumbs})
        await self.ctl("reaction", {"chat_id": admin_chat, "message_id": m["message_id"], "user": BOB,
                                    "new_reaction": fire})
        await self.ctl("reaction", {"chat_id": CHAT, "message_id": plain["message_id"], "user": BOB,
                                    "new_reaction": thumbs})
        got = [u["message_reaction"] for u in await self.drain()]
        self.assertEqual([(r["old_reaction"], r["new_reaction"]) for r in got], [([], thumbs), (thumbs, fire)])
        self.assertEqual((got[0]["chat"]["id"], got[0]["message_id"], got[0]["user"]["id"]),
                         (admin_chat, m["message_id"], BOB["id"]))
        self.assertIsInstance(got[0]["date"], int)


class FilesTest(EmulatorTest):
    async def download(self, path, token=TOKEN):
        async with self.http.get(f"{BASE}/file/bot{token}/{path}") as r:
            return r.status, await r.read()

    async def test_send_photo_teloxide_style(self):
        image = png(640, 480)
        part = uuid.uuid4().hex
        m = await self.upload_ok("SendPhoto", {"chat_id": str(CHAT), "photo": f"attach://{part}",
                                               "caption": "look 👀",
                                               "caption_entities": [{"type": "bold", "offset": 0, "length": 4}]},
                                 {part: ("", image, None)})
        sizes = m["photo"]
        self.assertGreaterEqual(len(sizes), 2)
        for size in sizes:
            self.assertEqual(set(size), {"file_id", "file_unique_id", "width", "height", "file_size"})
        self.assertEqual((sizes[-1]["width"], sizes[-1]["height"]), (640, 480))
        self.assertLessEqual(max(sizes[0]["width"], sizes[0]["height"]), 90)
        self.assertEqual(len({s["file_unique_id"] for s in sizes}), len(sizes))
        self.assertEqual(m["caption"], "look 👀")
        self.assertEqual(m["caption_entities"], [{"type": "bold", "offset": 0, "length": 4}])
        [s] = await self.sent()
        self.assertEqual((s["file_sha256"], s["file_size"]), (hashlib.sha256(image).hexdigest(), len(image)))

        f = await self.ok("getFile", file_id=sizes[-1]["file_id"])
        self.assertEqual((f["file_unique_id"], f["file_size"]), (sizes[-1]["file_unique_id"], len(image)))
        self.assertIn("/", f["file_path"])
        self.assertEqual(await self.download(f["file_path"]), (200, image))
        self.assertEqual(await self.download(f["file_path"].replace("/", "%2F")), (200, image))
        self.assertEqual((await self.download("photos%2Fnope.jpg"))[0], 404)
        self.assertEqual(await self.ctl("file", http="GET", file_id=sizes[-1]["file_id"]), image)

        # Sent again by file_id (JSON), the same file.
        again = await self.ok("sendPhoto", chat_id=CHAT, photo=sizes[-1]["file_id"])
        self.assertEqual(again["photo"][-1]["file_unique_id"], sizes[-1]["file_unique_id"])
        # Another bot can't use this bot's file_id.
        await self.ctl("bot", BOT2)
        await self.fails("sendPhoto", 400, "Bad Request: wrong file identifier/HTTP URL specified",
                         token=TOKEN2, chat_id=CHAT, photo=sizes[-1]["file_id"])
        await self.fails("getFile", 400, "Bad Request: invalid file_id", token=TOKEN2,
                         file_id=sizes[-1]["file_id"])

    async def test_photo_checks(self):
        m = await self.upload_ok("sendPhoto", {"chat_id": str(CHAT)}, {"photo": ("a.png", png(8, 8), "image/png")})
        self.assertGreaterEqual(len(m["photo"]), 2)
        status, body = await self.upload("sendPhoto", {"chat_id": str(CHAT)},
                                         {"photo": ("a.png", b"not an image at all", "image/png")})
        self.assertEqual((status, body["description"]), (400, "Bad Request: IMAGE_PROCESS_FAILED"))
        await self.fails("sendPhoto", 400, "Bad Request: failed to get HTTP URL content",
                         chat_id=CHAT, photo="https://example.org/cat.png")
        await self.fails("sendPhoto", 400, "Bad Request: there is no photo in the request", chat_id=CHAT)
        status, body = await self.upload("sendPhoto", {"chat_id": str(CHAT), "photo": "attach://missing"}, {})
        self.assertEqual(body["description"], "Bad Request: wrong file identifier/HTTP URL specified")
        self.assertEqual(len(await self.sent()), 1)

    async def test_other_kinds(self):
        doc = await self.upload_ok("sendDocument", {"chat_id": str(CHAT), "caption": "notes"},
                                   {"document": ("notes.txt", b"some notes\n", "application/octet-stream")})
        self.assertEqual(doc["document"]["file_name"], "notes.txt")
        self.assertEqual(doc["document"]["mime_type"], "text/plain")
        self.assertEqual(doc["document"]["file_size"], 11)
        self.assertTrue({"file_id", "file_unique_id"} <= set(doc["document"]))

        video = await self.upload_ok("sendVideo", {"chat_id": str(CHAT), "width": "320", "height": "240",
                                                   "duration": "3"},
                                     {"video": ("clip.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, None)})
        self.assertEqual({k: video["video"][k] for k in ("width", "height", "duration", "mime_type", "file_name")},
                         {"width": 320, "height": 240, "duration": 3, "mime_type": "video/mp4",
                          "file_name": "clip.mp4"})
        voice = await self.upload_ok("sendVoice", {"chat_id": str(CHAT), "duration": "2"},
                                     {"voice": ("", b"OggS" + b"\x00" * 100, None)})
        self.assertEqual((voice["voice"]["duration"], voice["voice"]["mime_type"]), (2, "audio/ogg"))
        audio = await self.upload_ok("sendAudio", {"chat_id": str(CHAT), "performer": "Band", "title": "Song",
                                                   "duration": "180"},
                                     {"audio": ("song.mp3", b"ID3" + b"\x00" * 100, None)})
        self.assertEqual({k: audio["audio"][k] for k in ("performer", "title", "duration", "mime_type")},
                         {"performer": "Band", "title": "Song", "duration": 180, "mime_type": "audio/mpeg"})
        anim = await self.upload_ok("sendAnimation", {"chat_id": str(CHAT)},
                                    {"animation": ("fun.gif", b"GIF89a\x10\x00\x10\x00" + b"\x00" * 20, None)})
        self.assertEqual(anim["animation"]["file_id"], anim["document"]["file_id"])
        self.assertEqual(anim["animation"]["mime_type"], "image/gif")
        sticker = await self.upload_ok("sendSticker", {"chat_id": str(CHAT), "emoji": "😀"},
                                       {"sticker": ("s.webp", webp_header(512, 300), None)})
        self.assertEqual({k: sticker["sticker"][k] for k in ("type", "width", "height", "is_animated",
                                                              "is_video", "emoji")},
                         {"type": "regular", "width": 512, "height": 300, "is_animated": False,
                          "is_video": False, "emoji": "😀"})
        sent = await self.sent()
        self.assertEqual([s["method"] for s in sent], ["sendDocument", "sendVideo", "sendVoice", "sendAudio",
                                                        "sendAnimation", "sendSticker"])
        self.assertEqual(sent[0]["file_sha256"], hashlib.sha256(b"some notes\n").hexdigest())
        await self.fails("sendDocument", 400, "Bad Request: can't use file of type Video as Document",
                         chat_id=CHAT, document=video["video"]["file_id"])

    async def test_size_limits(self):
        big = os.urandom(21 * 1024 * 1024)
        m = await self.ctl("message", {"chat_id": CHAT, "from": ALICE, "caption": "big",
                                       "document": {"bytes_b64": base64.b64encode(big).decode(),
                                                    "file_name": "big.bin", "mime_type": "application/x-big"}})
        self.assertEqual(m["document"]["mime_type"], "application/x-big")
        [update] = await self.drain()
        doc = update["message"]["document"]
        self.assertEqual((doc["file_size"], doc["file_name"]), (len(big), "big.bin"))
        self.assertNotEqual(doc["file_id"], m["document"]["file_id"])  # each viewer has its own ids
        self.assertEqual(doc["file_unique_id"], m["document"]["file_unique_id"])
        await self.fails("getFile", 400, "Bad Request: file is too big", file_id=doc["file_id"])

        huge = b"\x00" * (50 * 1024 * 1024 + 1)
        status, body = await self.upload("sendDocument", {"chat_id": str(CHAT)},
                                         {"document": ("huge.bin", huge, None)})
        self.assertEqual((status, body), (413, {"ok": False, "error_code": 413,
                                                "description": "Request Entity Too Large"}))
        self.assertEqual(await self.sent(), [])

    async def test_media_group(self):
        a, b = png(100, 50), png(50, 100)
        msgs = await self.upload_ok("sendMediaGroup", {
            "chat_id": str(CHAT),
            "media": [{"type": "photo", "media": "attach://a", "caption": "two pics"},
                      {"type": "photo", "media": "attach://b"}]},
            {"a": ("", a, None), "b": ("", b, None)})
        self.assertEqual(len(msgs), 2)
        self.assertEqual(msgs[1]["message_id"], msgs[0]["message_id"] + 1)
        self.assertEqual(msgs[0]["media_group_id"], msgs[1]["media_group_id"])
        self.assertIsInstance(msgs[0]["media_group_id"], str)
        self.assertEqual(msgs[0]["caption"], "two pics")
        self.assertNotIn("caption", msgs[1])
        self.assertEqual((msgs[1]["photo"][-1]["width"], msgs[1]["photo"][-1]["height"]), (50, 100))
        sent = await self.sent()
        self.assertEqual([s["file_sha256"] for s in sent],
                         [hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()])

        eleven = [{"type": "photo", "media": "attach://a"}] * 11
        _, body = await self.upload("sendMediaGroup", {"chat_id": str(CHAT), "media": eleven},
                                         {"a": ("", a, None)})
        self.assertEqual(body["description"], "Bad Request: too many messages to send as an album")
        _, body = await self.upload("sendMediaGroup", {"chat_id": str(CHAT), "media": []}, {})
        self.assertEqual(body["description"], "Bad Request: there are no messages to send")
        mixed = [{"type": "photo", "media": "attach://a"}, {"type": "document", "media": "attach://d"}]
        _, body = await self.upload("sendMediaGroup", {"chat_id": str(CHAT), "media": mixed},
                                         {"a": ("", a, None), "d": ("d.txt", b"doc", None)})
        self.assertEqual(body["description"], "Bad Request: document can't be mixed with other media types")
        docs = [{"type": "document", "media": "attach://d"}, {"type": "document", "media": "attach://e"}]
        msgs = await self.upload_ok("sendMediaGroup", {"chat_id": str(CHAT), "media": docs},
                                    {"d": ("d.txt", b"doc", None), "e": ("e.txt", b"doc2", None)})
        self.assertEqual([m["document"]["file_name"] for m in msgs], ["d.txt", "e.txt"])
        self.assertEqual(len(await self.sent()), 4)

    async def test_user_photo_message(self):
        image = png(1000, 700)
        m = await self.ctl("message", {"chat_id": CHAT, "from": ALICE, "caption": "holiday",
                                       "photo": {"bytes_b64": base64.b64encode(image).decode(),
                                                 "width": 1000, "height": 700},
                                       "media_group_id": "777"})
        self.assertEqual(m["media_group_id"], "777")
        [update] = await self.drain()
        photo = update["message"]["photo"]
        self.assertEqual((photo[-1]["width"], photo[-1]["height"]), (1000, 700))
        self.assertEqual([p["width"] for p in photo], [90, 320, 800, 1000])
        f = await self.ok("getFile", file_id=photo[0]["file_id"])
        self.assertEqual(await self.download(f["file_path"].replace("/", "%2F")), (200, image))


class ChatInfoTest(EmulatorTest):
    chat_spec = {"id": CHAT, "type": "supergroup", "title": "Lounge", "creator": OWNER, "admins": [ALICE],
                 "bot_is_admin": True, "members": [BOB]}

    async def test_chat_methods(self):
        chat = await self.ok("getChat", chat_id=CHAT)
        self.assertEqual((chat["id"], chat["type"], chat["title"]), (CHAT, "supergroup", "Lounge"))
        self.assertNotIn("is_forum", chat)
        self.assertIn("accepted_gift_types", chat)
        admins = await self.ok("getChatAdministrators", chat_id=CHAT)
        self.assertEqual([(a["status"], a["user"]["id"]) for a in admins],
                         [("creator", OWNER["id"]), ("administrator", ALICE["id"]),
                          ("administrator", BOT["id"])])
        self.assertIs(admins[2]["can_delete_messages"], True)
        me = await self.ok("getChatMember", chat_id=CHAT, user_id=BOT["id"])
        self.assertEqual(me["status"], "administrator")
        bob = await self.ok("getChatMember", chat_id=CHAT, user_id=BOB["id"])
        self.assertEqual((bob["status"], bob["user"]["first_name"]), ("member", "Bob"))
        await self.fails("getChatMember", 400, "Bad Request: user not found", chat_id=CHAT, user_id=424242)
        self.assertEqual(await self.ok("getChatMemberCount", chat_id=CHAT), 4)
        await self.fails("getChat", 400, "Bad Request: chat not found", chat_id=-5)

    async def test_profile_photos(self):
        first, second = png(200, 200), png(300, 300)
        for image in (first, second):
            await self.ctl("user_photo", {"user_id": ALICE["id"], "bytes_b64": base64.b64encode(image).decode(),
                                          "width": 0, "height": 0})
        result = await self.ok("getUserProfilePhotos", user_id=ALICE["id"])
        self.assertEqual(result["total_count"], 2)
        newest = result["photos"][0]
        self.assertGreaterEqual(len(newest), 2)
        self.assertEqual(newest[-1]["width"], 300)
        f = await self.ok("getFile", file_id=newest[-1]["file_id"])
        async with self.http.get(f"{BASE}/file/bot{TOKEN}/{f['file_path']}") as r:
            self.assertEqual(await r.read(), second)
        page = await self.ok("getUserProfilePhotos", user_id=ALICE["id"], offset=1, limit=1)
        self.assertEqual((page["total_count"], len(page["photos"]), page["photos"][0][-1]["width"]), (2, 1, 200))
        none = await self.ok("getUserProfilePhotos", user_id=BOB["id"])
        self.assertEqual(none, {"total_count": 0, "photos": []})


class RateLimitAndFaultTest(EmulatorTest):
    async def test_rate_limit(self):
        other = CHAT - 1
        await self.ctl("chat", {"id": other, "type": "group", "title": "Other"})
        await self.ctl("ratelimit", {"chat_id": CHAT, "calls": 2, "per_secs": 60, "retry_after": 7})
        m = await self.ok("sendMessage", chat_id=CHAT, text="1")
        await self.ok("editMessageText", chat_id=CHAT, message_id=m["message_id"], text="1b")
        body = await self.fails("sendMessage", 429, "Too Many Requests: retry after 7", chat_id=CHAT, text="2")
        self.assertEqual(body["parameters"], {"retry_after": 7})
        await self.fails("deleteMessage", 429, "Too Many Requests: retry after 7",
                         chat_id=CHAT, message_id=m["message_id"])
        await self.ok("sendMessage", chat_id=other, text="elsewhere")
        sent = await self.sent()
        self.assertEqual([(s["text"], s["deleted"]) for s in sent], [("1b", False)])
        await self.ctl("ratelimit", {"chat_id": CHAT, "calls": 0})
        await self.ok("sendMessage", chat_id=CHAT, text="2")
        # Without retry_after, the wait left in the window.
        await self.ctl("ratelimit", {"chat_id": CHAT, "calls": 1, "per_secs": 30})
        await self.ok("sendMessage", chat_id=CHAT, text="3")
        _, body = await self.call("sendMessage", chat_id=CHAT, text="4")
        self.assertTrue(1 <= body["parameters"]["retry_after"] <= 30, body)
        self.assertEqual(body["description"], f"Too Many Requests: retry after {body['parameters']['retry_after']}")

    async def test_faults(self):
        await self.ctl("calls", http="DELETE")
        await self.ctl("fault", {"method": "sendMessage", "status": 502, "description": "Bad Gateway", "count": 2})
        for _ in range(2):
            await self.fails("SendMessage", 502, "Bad Gateway", chat_id=CHAT, text="x")
        await self.ok("sendMessage", chat_id=CHAT, text="x")
        calls = await self.ctl("calls", http="GET")
        self.assertEqual([c["status"] for c in calls], [502, 502, 200])
        self.assertEqual(len(await self.sent()), 1)
        await self.ctl("fault", {"method": "getUpdates", "status": 502, "raw_body": "<html>502</html>"})
        status, body = await self.call("getUpdates")
        self.assertEqual((status, body), (502, b"<html>502</html>"))
        await self.ctl("fault", {"method": "*", "status": 429})
        body = await self.fails("getMe", 429, "Too Many Requests: retry after 5")
        self.assertEqual(body["parameters"], {"retry_after": 5})


class MigrationTest(EmulatorTest):
    chat_spec = {"id": -4001, "type": "group", "title": "Small group", "creator": OWNER}

    async def test_migrate(self):
        await self.ok("sendMessage", chat_id=-4001, text="before")
        result = await self.ctl("migrate", {"chat_id": -4001})
        new_id = result["new_chat_id"]
        self.assertTrue(str(new_id).startswith("-100"), new_id)
        got = [u["message"] for u in await self.drain()]
        self.assertEqual([(m["chat"]["id"], m["chat"]["type"]) for m in got],
                         [(-4001, "group"), (new_id, "supergroup")])
        self.assertEqual(got[0]["migrate_to_chat_id"], new_id)
        self.assertEqual(got[1]["migrate_from_chat_id"], -4001)
        self.assertEqual(got[1]["message_id"], 1)
        body = await self.fails("sendMessage", 400, "Bad Request: group chat was upgraded to a supergroup chat",
                                chat_id=-4001, text="after")
        self.assertEqual(body["parameters"], {"migrate_to_chat_id": new_id})
        await self.fails("getChat", 400, "Bad Request: group chat was upgraded to a supergroup chat",
                         chat_id=-4001)
        m = await self.ok("sendMessage", chat_id=new_id, text="after")
        self.assertEqual((m["chat"]["type"], m["message_id"]), ("supergroup", 2))
        self.assertEqual((await self.ok("getChat", chat_id=new_id))["type"], "supergroup")
        self.assertEqual([s["text"] for s in await self.sent(-4001)], ["before"])


if __name__ == "__main__":
    program = unittest.main(exit=False, verbosity=2)
    ok = program.result.wasSuccessful()
    if not ok and LOG_PATH:
        print(f"emulator log: {LOG_PATH}", file=sys.stderr)
    elif LOG_PATH:
        os.unlink(LOG_PATH)
    sys.exit(0 if ok else 1)
