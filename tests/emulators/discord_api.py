#!/usr/bin/env python3
"""A Discord API emulator for the Discord bridge's tests.

Written from Discord's API documentation, https://discord.com/developers/docs
(the REST resources, the gateway and its events, rate limits, opcodes and
status codes, the CDN). The bridge reaches it only through its API-origin,
gateway-URL and CDN-origin settings, all of which point at this one port:

  REST      /api/v10/...  (also /api/... unversioned), ``Authorization: Bot <token>``
  gateway   ws://127.0.0.1:PORT/gateway  (``?v=10&encoding=json``; ``compress`` is
            accepted and ignored, frames are plain-text JSON); sessions resume at
            ws://127.0.0.1:PORT/resume-gateway, the READY ``resume_gateway_url``
  CDN       /attachments/{channel}/{attachment}/{filename}, /avatars/..., /embed/avatars/...
  control   /_control/...  (JSON; sets up applications, guilds, members, threads,
            injects user activity and faults, reads back what the bridge did)

usage: discord_api.py --port 0 [--heartbeat-interval MS] [--resume-window SECS]
                      [--upload-limit BYTES] [--bucket-limit N] [--bucket-window SECS]

Binds 127.0.0.1 only; prints ``listening on 127.0.0.1:PORT`` on stdout once ready;
logs go to stderr (gateway connections and faults; every REST call too with --verbose).
All state is in memory and bounded.

Control API (every body and answer is JSON):
  POST /_control/app        {"token", "bot_user": {"id", "username", ...},
                             "privileged_intents": ["MESSAGE_CONTENT", "GUILD_MEMBERS", "GUILD_PRESENCES"],
                             "application_id"?}
  POST /_control/guild      {"id", "name", "owner_id"?, "channels": [{"id", "name", "type", "parent_id"?,
                             "topic"?, "position"?, "deny"?: [PERMISSION...], "access"?: bool}],
                             "roles": [{"id", "name", "permissions"?, "position"?, "color"?, "mentionable"?}],
                             "members": [{"user": User, "nick"?, "roles"?: [id]}]}   (replaces; GUILD_CREATE)
  POST /_control/channel    {"guild_id", "id"?, "name", "type"?, "parent_id"?}          (CHANNEL_CREATE)
  POST /_control/dm         {"id"?, "recipient": User, "bot_user_id"?}   (a DM channel, of one bot or any)
  POST /_control/member     {"guild_id", "user", "nick"?, "roles"?}     (GUILD_MEMBER_ADD or _UPDATE)
  POST /_control/permissions {"channel_id" | "guild_id", "deny"?: [...], "access"?: bool}
  POST /_control/thread     {"channel_id", "name", "owner"?: User, "type"?, "message_id"?, "archived"?}
  POST /_control/message    {"channel_id", "author": User, "content", "mentions"?: [User|id],
                             "mention_roles"?, "mention_everyone"?, "embeds"?, "message_reference"?,
                             "attachments"?: [{"filename", "bytes_b64", "content_type"?}]}  (MESSAGE_CREATE)
  POST /_control/messages   {"channel_id", "author", "contents": [...]}          (a burst, in order)
  POST /_control/edit       {"message_id", "content"?, "embeds"?}                (MESSAGE_UPDATE)
  POST /_control/delete     {"message_id"}                                       (MESSAGE_DELETE)
  POST /_control/reaction   {"message_id", "user", "emoji": "👍" | "name:id" | {"id", "name"},
                             "action": "add" | "remove"}                 (MESSAGE_REACTION_ADD/_REMOVE)
  POST /_control/typing     {"channel_id", "user"}                               (TYPING_START)
  POST /_control/link_preview {"message_id", "embeds"? | "url"?, "title"?, "description"?}
                             (MESSAGE_UPDATE changing only embeds, edited_timestamp null)
  POST /_control/config     {"heartbeat_interval"?, "resume_window"?, "upload_limit"?, "bucket_limit"?,
                             "bucket_window"?, "heartbeat_timeout_factor"?}
  POST /_control/reset      forget everything but the configuration
  GET  /_control/messages?channel_id=X   every message of the channel in order, deleted ones too
  GET  /_control/webhooks[?channel_id=X]
  GET  /_control/calls[?method=&path_prefix=]   REST and CDN requests: method, path, query, route,
                                                 status, body; DELETE /_control/calls forgets them
  GET  /_control/sessions   {"sessions": [...], "identify_count", "resume_count", ...}
  POST /_control/fault      {"kind": "reconnect", "close_after"?: 5}
                            {"kind": "invalid_session", "resumable": false}
                            {"kind": "drop"}                     (TCP closed, no close frame)
                            {"kind": "stop_acks", "dispatch"?: false}
                            {"kind": "heartbeat"}                (op 1 from the server)
                            {"kind": "outage", "secs": N, "drop_existing"?: true}
                            {"kind": "ratelimit", "route"?: "POST /channels/{id}/messages", "calls": N,
                             "per_secs": S, "scope"?: "user" | "shared"}
                            (a "shared" limit is the resource's: the headers keep showing the
                             client's own bucket, and only its 429s tell the client)
                            {"kind": "global_ratelimit", "secs": S}
                            {"kind": "http", "method"?, "path_prefix", "status", "count"?: 1, "code"?, "message"?}
                            {"kind": "clear"}                    (lifts every REST fault)
  GET  /_control/config, GET /_control/state (apps, guilds, channels, users)

Behaviour worth knowing (as Discord documents it unless said otherwise):
  * Every /api response of a known route carries X-RateLimit-Limit/-Remaining/-Reset/-Reset-After/
    -Bucket and X-RateLimit-Scope (Discord sends Scope on 429s only; twilight-http learns a bucket
    only from responses that have it). Buckets are per route (method + template) and top-level
    resource, 50 requests a second by default, enforced. Retry-After is whole seconds.
  * Without MESSAGE_CONTENT (identified, for the gateway; enabled for the app, for REST) content,
    embeds, attachments and components are empty, except for the bot's own messages, DMs and
    messages mentioning the bot. GUILD_CREATE lists every member only with GUILD_MEMBERS.
  * An empty message is 50006 "Cannot send an empty message" (what Discord answers), not 50035.
  * RESUME is honoured only at /resume-gateway; anywhere else, or for an unknown, invalidated or
    expired session, the answer is INVALID_SESSION (d=false). A client closing with 1000 or 1001
    ends its session. Events are kept per session (10000 at most) while it is disconnected.
  * A connection that sends no heartbeat for heartbeat_timeout_factor intervals + 1 s is closed
    with 4009 (the session stays resumable). stop_acks also withholds dispatches from the current
    connections (a zombie connection); they are replayed on RESUME. "dispatch": true keeps them.
  * During an outage the upgrade is answered 503.
"""

import argparse
import asyncio
import base64
import bisect
import hashlib
import itertools
import json
import logging
import math
import mimetypes
import os
import re
import secrets
import signal
import socket
import sys
import time
import urllib.parse
from collections import OrderedDict, deque
from datetime import datetime, timezone

try:
    from aiohttp import WSMsgType, web
except ImportError:
    # aiohttp lives in the tests' venv (tests/install-deps.sh): run there when started with another python.
    _VENV = os.path.join(os.environ.get("ISTHMUS_TEST_CACHE") or os.path.expanduser("~/.cache/isthmus"), "venv")
    if os.path.exists(os.path.join(_VENV, "bin", "python")) and os.path.abspath(sys.prefix) != os.path.abspath(_VENV):
        os.execv(os.path.join(_VENV, "bin", "python"), [os.path.join(_VENV, "bin", "python")] + sys.argv)
    raise

log = logging.getLogger("discord-emulator")

DISCORD_EPOCH_MS = 1420070400000

INTENTS = {
    "GUILDS": 1 << 0,
    "GUILD_MEMBERS": 1 << 1,
    "GUILD_MODERATION": 1 << 2,
    "GUILD_EXPRESSIONS": 1 << 3,
    "GUILD_INTEGRATIONS": 1 << 4,
    "GUILD_WEBHOOKS": 1 << 5,
    "GUILD_INVITES": 1 << 6,
    "GUILD_VOICE_STATES": 1 << 7,
    "GUILD_PRESENCES": 1 << 8,
    "GUILD_MESSAGES": 1 << 9,
    "GUILD_MESSAGE_REACTIONS": 1 << 10,
    "GUILD_MESSAGE_TYPING": 1 << 11,
    "DIRECT_MESSAGES": 1 << 12,
    "DIRECT_MESSAGE_REACTIONS": 1 << 13,
    "DIRECT_MESSAGE_TYPING": 1 << 14,
    "MESSAGE_CONTENT": 1 << 15,
    "GUILD_SCHEDULED_EVENTS": 1 << 16,
    "AUTO_MODERATION_CONFIGURATION": 1 << 20,
    "AUTO_MODERATION_EXECUTION": 1 << 21,
    "GUILD_MESSAGE_POLLS": 1 << 24,
    "DIRECT_MESSAGE_POLLS": 1 << 25,
}
ALL_INTENTS = 0
for _bit in INTENTS.values():
    ALL_INTENTS |= _bit
PRIVILEGED_INTENTS = ("GUILD_MEMBERS", "GUILD_PRESENCES", "MESSAGE_CONTENT")
# Application flags that say a privileged intent is enabled for the app.
APP_FLAG_FOR_INTENT = {"GUILD_PRESENCES": 1 << 12, "GUILD_MEMBERS": 1 << 14, "MESSAGE_CONTENT": 1 << 18}

PERMISSIONS = {
    "CREATE_INSTANT_INVITE": 0, "KICK_MEMBERS": 1, "BAN_MEMBERS": 2, "ADMINISTRATOR": 3,
    "MANAGE_CHANNELS": 4, "MANAGE_GUILD": 5, "ADD_REACTIONS": 6, "VIEW_AUDIT_LOG": 7,
    "PRIORITY_SPEAKER": 8, "STREAM": 9, "VIEW_CHANNEL": 10, "SEND_MESSAGES": 11,
    "SEND_TTS_MESSAGES": 12, "MANAGE_MESSAGES": 13, "EMBED_LINKS": 14, "ATTACH_FILES": 15,
    "READ_MESSAGE_HISTORY": 16, "MENTION_EVERYONE": 17, "USE_EXTERNAL_EMOJIS": 18,
    "CONNECT": 20, "SPEAK": 21, "CHANGE_NICKNAME": 26, "MANAGE_NICKNAMES": 27,
    "MANAGE_ROLES": 28, "MANAGE_WEBHOOKS": 29, "MANAGE_THREADS": 34,
    "CREATE_PUBLIC_THREADS": 35, "CREATE_PRIVATE_THREADS": 36, "SEND_MESSAGES_IN_THREADS": 38,
}
DEFAULT_EVERYONE_PERMISSIONS = 0
for _name in ("CREATE_INSTANT_INVITE", "ADD_REACTIONS", "STREAM", "VIEW_CHANNEL", "SEND_MESSAGES",
              "EMBED_LINKS", "ATTACH_FILES", "READ_MESSAGE_HISTORY", "USE_EXTERNAL_EMOJIS",
              "CONNECT", "SPEAK", "CHANGE_NICKNAME", "CREATE_PUBLIC_THREADS",
              "CREATE_PRIVATE_THREADS", "SEND_MESSAGES_IN_THREADS"):
    DEFAULT_EVERYONE_PERMISSIONS |= 1 << PERMISSIONS[_name]

# Channel types.
GUILD_TEXT, DM, GUILD_VOICE, GROUP_DM, GUILD_CATEGORY, GUILD_ANNOUNCEMENT = 0, 1, 2, 3, 4, 5
ANNOUNCEMENT_THREAD, PUBLIC_THREAD, PRIVATE_THREAD, GUILD_STAGE_VOICE = 10, 11, 12, 13
GUILD_FORUM, GUILD_MEDIA = 15, 16
THREAD_TYPES = (ANNOUNCEMENT_THREAD, PUBLIC_THREAD, PRIVATE_THREAD)
TEXT_TYPES = (GUILD_TEXT, DM, GUILD_VOICE, GROUP_DM, GUILD_ANNOUNCEMENT, GUILD_STAGE_VOICE) + THREAD_TYPES
THREAD_PARENT_TYPES = (GUILD_TEXT, GUILD_ANNOUNCEMENT, GUILD_FORUM, GUILD_MEDIA)

# Message types and flags.
MSG_DEFAULT, MSG_THREAD_CREATED, MSG_REPLY = 0, 18, 19
FLAG_SUPPRESS_EMBEDS, FLAG_HAS_THREAD, FLAG_SUPPRESS_NOTIFICATIONS = 1 << 2, 1 << 5, 1 << 12
SENDABLE_FLAGS = FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS | (1 << 13) | (1 << 15)

MAX_WEBHOOKS_PER_CHANNEL = 15
MAX_MESSAGES_PER_CHANNEL = 5000
MAX_ATTACHMENT_STORE = 256 * 1024 * 1024
MAX_CALLS = 5000
MAX_SESSIONS = 500
MAX_SESSION_LOG = 10000
MAX_CONN_QUEUE = 20000
GATEWAY_SEND_LIMIT = 120  # per 60 s, per connection
HARD_BODY_LIMIT = 200 * 1024 * 1024

USER_MENTION_RE = re.compile(r"<@!?(\d+)>")
ROLE_MENTION_RE = re.compile(r"<@&(\d+)>")
URL_RE = re.compile(r"https?://[^\s<>]+")
CUSTOM_EMOJI_RE = re.compile(r"^(?:a:)?([A-Za-z0-9_~]{1,32}):(\d{1,20})$")

# A 1x1 transparent PNG, served for avatars.
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")


def now_s():
    return time.time()


def iso(ts):
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")


def snowflake_time(sid):
    return ((int(sid) >> 22) + DISCORD_EPOCH_MS) / 1000.0


def dumps(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def is_snowflake(v):
    return isinstance(v, (str, int)) and not isinstance(v, bool) and re.fullmatch(r"\d{1,20}", str(v)) is not None


class SnowflakeGen:
    """Snowflakes as Discord makes them: ms since 2015 << 22 | worker | process | increment."""

    def __init__(self):
        self.last = 0
        self.inc = 0

    def next(self, at=None):
        ms = int((at if at is not None else time.time()) * 1000)
        value = ((ms - DISCORD_EPOCH_MS) << 22) | (1 << 17) | (1 << 12) | (self.inc & 0xFFF)
        self.inc += 1
        if value <= self.last:
            value = self.last + 1
        self.last = value
        return str(value)


class ApiError(Exception):
    def __init__(self, status, code, message, errors=None, headers=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors
        self.headers = headers or {}

    def body(self):
        body = {"message": self.message, "code": self.code}
        if self.errors is not None:
            body["errors"] = self.errors
        return body


def form_error(path, code, message):
    """50035 Invalid Form Body with the nested ``errors`` object Discord sends."""
    errors = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(str(path).split(".")):
        errors = {part: errors}
    return ApiError(400, 50035, "Invalid Form Body", errors)


def unknown(kind):
    codes = {"Channel": 10003, "Guild": 10004, "Member": 10007, "Message": 10008, "Role": 10011,
             "User": 10013, "Emoji": 10014, "Webhook": 10015}
    return ApiError(404 if kind != "Emoji" else 400, codes[kind], "Unknown " + kind)


MISSING_ACCESS = (403, 50001, "Missing Access")
MISSING_PERMISSIONS = (403, 50013, "Missing Permissions")


class Config:
    def __init__(self, args):
        self.heartbeat_interval = args.heartbeat_interval
        self.resume_window = args.resume_window
        self.upload_limit = args.upload_limit
        self.bucket_limit = args.bucket_limit
        self.bucket_window = args.bucket_window
        self.heartbeat_timeout_factor = args.heartbeat_timeout_factor

    def as_dict(self):
        return dict(self.__dict__)


class Bucket:
    __slots__ = ("limit", "window", "count", "reset_at")

    def __init__(self, limit, window):
        self.limit = max(0, int(limit))
        self.window = max(0.001, float(window))
        self.count = 0
        self.reset_at = 0.0

    def take(self, now):
        if now >= self.reset_at:
            self.count = 0
            self.reset_at = now + self.window
        if self.count >= self.limit:
            return False
        self.count += 1
        return True

    def remaining(self):
        return max(0, self.limit - self.count)

    def reset_after(self, now):
        return max(0.0, self.reset_at - now)


class App:
    def __init__(self, token, user_id, application_id, privileged):
        self.token = token
        self.user_id = user_id
        self.application_id = application_id
        self.privileged = set(privileged)

    def flags(self):
        flags = 0
        for name in self.privileged:
            flags |= APP_FLAG_FOR_INTENT.get(name, 0)
        return flags

    def as_dict(self):
        return {"token": self.token, "bot_user_id": self.user_id, "application_id": self.application_id,
                "privileged_intents": sorted(self.privileged), "flags": self.flags()}


class Session:
    ids = itertools.count(1)

    def __init__(self, app, intents, shard):
        self.id = secrets.token_hex(16)
        self.number = next(Session.ids)
        self.app = app
        self.intents = intents
        self.shard = shard
        self.seq = 0
        self.log = deque(maxlen=MAX_SESSION_LOG)
        self.conn = None
        self.created_at = now_s()
        self.disconnected_at = None
        self.invalid = None  # the reason, once the session can no longer be resumed
        self.resumed = 0
        self.identified = 1
        self.connections = 1

    def expired(self, window):
        return self.conn is None and self.disconnected_at is not None and now_s() - self.disconnected_at > window

    def push(self, event, data):
        self.seq += 1
        payload = dumps({"op": 0, "t": event, "s": self.seq, "d": data})
        self.log.append((self.seq, payload))
        conn = self.conn
        if conn is not None and not conn.zombie:
            conn.send_raw(payload)

    def detach(self):
        if self.conn is not None:
            self.conn.session = None
        self.conn = None
        self.disconnected_at = now_s()

    def as_dict(self, window):
        return {"id": self.id, "bot_user_id": self.app.user_id, "connected": self.conn is not None,
                "seq": self.seq, "resumed": self.resumed, "identified": self.identified,
                "intents": self.intents, "shard": self.shard, "connections": self.connections,
                "created_at": self.created_at, "disconnected_at": self.disconnected_at,
                "resumable": self.invalid is None and not self.expired(window),
                "invalid_reason": self.invalid, "logged_events": len(self.log)}


class GatewayConn:
    ids = itertools.count(1)

    def __init__(self, state, ws, transport, kind, interval):
        self.id = next(GatewayConn.ids)
        self.state = state
        self.ws = ws
        self.transport = transport
        self.kind = kind  # "main" or "resume"
        self.interval = interval
        self.queue = asyncio.Queue(maxsize=MAX_CONN_QUEUE)
        self.session = None
        self.stop_acks = False
        self.zombie = False
        self.open = True
        self.server_close = None
        self.last_heartbeat = time.monotonic()
        self.heartbeats = 0
        self.recv_times = deque()

    def send_obj(self, obj):
        self.send_raw(dumps(obj))

    def send_raw(self, text):
        if not self.open:
            return
        try:
            self.queue.put_nowait(("text", text))
        except asyncio.QueueFull:
            log.warning("gateway connection %d: send queue full, dropping it", self.id)
            self.abort()

    def close(self, code, reason):
        if not self.open:
            return
        self.open = False
        self.server_close = code
        try:
            self.queue.put_nowait(("close", code, reason))
        except asyncio.QueueFull:
            self.abort()

    def abort(self):
        self.open = False
        if self.server_close is None:
            self.server_close = -1
        if self.transport is not None:
            self.transport.abort()
        try:
            self.queue.put_nowait(("stop",))
        except asyncio.QueueFull:
            pass

    async def writer(self):
        try:
            while True:
                item = await self.queue.get()
                if item[0] == "text":
                    await self.ws.send_str(item[1])
                elif item[0] == "close":
                    log.info("gateway connection %d: closing with %d (%s)", self.id, item[1], item[2])
                    await self.ws.close(code=item[1], message=item[2].encode())
                    return
                else:
                    return
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            return
        except Exception:  # noqa: BLE001 - a broken socket must not kill the server
            log.exception("gateway connection %d: writer failed", self.id)

    async def watchdog(self):
        try:
            while self.open:
                await asyncio.sleep(max(0.05, min(1.0, self.interval / 4000.0)))
                factor = self.state.cfg.heartbeat_timeout_factor
                if factor and factor > 0 and self.open:
                    limit = self.interval / 1000.0 * factor + 1.0
                    if time.monotonic() - self.last_heartbeat > limit:
                        self.close(4009, "Session timed out.")
                        return
        except asyncio.CancelledError:
            return


class State:
    def __init__(self, cfg):
        self.cfg = cfg
        self.base = "http://127.0.0.1:0"
        self.ws_base = "ws://127.0.0.1:0"
        self.conns = set()
        self.calls = deque(maxlen=MAX_CALLS)
        self.reset()

    def reset(self):
        self.snow = SnowflakeGen()
        self.apps = {}
        self.apps_by_user = {}
        self.users = {}
        self.guilds = OrderedDict()
        self.channels = OrderedDict()
        self.messages = {}
        self.channel_msgs = {}
        self.webhooks = OrderedDict()
        self.attachments = OrderedDict()
        self.attachment_bytes = 0
        self.nonces = OrderedDict()
        self.sessions = OrderedDict()
        self.buckets = {}
        self.rl_faults = []
        self.http_faults = []
        self.global_until = 0.0
        self.outage_until = 0.0
        self.counters = {"identify_count": 0, "resume_count": 0, "invalid_session_count": 0,
                         "connection_count": 0, "refused_connections": 0}
        for conn in list(self.conns):
            conn.abort()
        self.calls.clear()

    # ----------------------------------------------------------------- builders

    def norm_user(self, u, bot=None):
        """Registers (or refreshes) a user from a control body; answers its id."""
        if isinstance(u, (str, int)) and not isinstance(u, bool):
            uid = str(u)
            if uid not in self.users:
                raise ApiError(400, 0, "unknown user %s (give a user object)" % uid)
            return uid
        if not isinstance(u, dict) or not is_snowflake(u.get("id")):
            raise ApiError(400, 0, "a user needs a snowflake id")
        uid = str(u["id"])
        old = self.users.get(uid, {})
        user = {
            "id": uid,
            "username": str(u.get("username", old.get("username", "user" + uid[-4:]))),
            "discriminator": str(u.get("discriminator", old.get("discriminator", "0"))),
            "global_name": u.get("global_name", old.get("global_name")),
            "avatar": u.get("avatar", old.get("avatar")),
            "banner": u.get("banner", old.get("banner")),
            "accent_color": u.get("accent_color", old.get("accent_color")),
            "avatar_decoration_data": None,
            "public_flags": int(u.get("public_flags", old.get("public_flags", 0))),
            "flags": int(u.get("public_flags", old.get("public_flags", 0))),
        }
        is_bot = u.get("bot", old.get("bot", False)) if bot is None else bot
        if is_bot:
            user["bot"] = True
        if u.get("system", old.get("system")):
            user["system"] = True
        self.users[uid] = user
        return uid

    def user_json(self, uid):
        user = self.users.get(uid)
        if user is None:
            return {"id": uid, "username": "unknown", "discriminator": "0", "global_name": None,
                    "avatar": None, "public_flags": 0, "flags": 0}
        return dict(user)

    def current_user_json(self, app):
        user = self.user_json(app.user_id)
        user.update({"bot": True, "mfa_enabled": False, "verified": True, "email": None,
                     "locale": "en-US", "premium_type": 0})
        return user

    def role_json(self, r):
        return {"id": r["id"], "name": r["name"], "color": r["color"],
                "colors": {"primary_color": r["color"], "secondary_color": None, "tertiary_color": None},
                "hoist": r["hoist"], "icon": None, "unicode_emoji": None, "position": r["position"],
                "permissions": str(r["permissions"]), "managed": r["managed"],
                "mentionable": r["mentionable"], "flags": 0}

    def member_json(self, g, uid, with_user=True):
        mem = g["members"][uid]
        d = {"avatar": None, "banner": None, "communication_disabled_until": None,
             "flags": 0, "joined_at": iso(mem["joined_at"]), "nick": mem["nick"], "pending": False,
             "premium_since": None, "roles": list(mem["roles"]), "deaf": False, "mute": False}
        if with_user:
            d["user"] = self.user_json(uid)
        return d

    def channel_json(self, ch):
        d = {"id": ch["id"], "type": ch["type"], "flags": 0}
        if ch["type"] in (DM, GROUP_DM):
            d["last_message_id"] = ch["last_message_id"]
            d["recipients"] = [self.user_json(u) for u in ch["recipients"]]
            return d
        d.update({"guild_id": ch["guild_id"], "name": ch["name"], "parent_id": ch["parent_id"],
                  "rate_limit_per_user": 0})
        if ch["type"] in THREAD_TYPES:
            meta = ch["thread"]
            d.update({"owner_id": ch["owner_id"], "last_message_id": ch["last_message_id"],
                      "message_count": ch["message_count"], "member_count": ch["member_count"],
                      "total_message_sent": ch["total_message_sent"], "applied_tags": [],
                      "thread_metadata": {"archived": meta["archived"],
                                          "auto_archive_duration": meta["auto_archive_duration"],
                                          "archive_timestamp": iso(meta["archive_timestamp"]),
                                          "locked": meta["locked"],
                                          "create_timestamp": iso(meta["create_timestamp"])}})
            if ch["type"] == PRIVATE_THREAD:
                d["thread_metadata"]["invitable"] = True
            return d
        d.update({"position": ch["position"], "permission_overwrites": [], "nsfw": False})
        if ch["type"] in (GUILD_VOICE, GUILD_STAGE_VOICE):
            d.update({"bitrate": 64000, "user_limit": 0, "rtc_region": None, "last_message_id": ch["last_message_id"]})
        elif ch["type"] != GUILD_CATEGORY:
            d.update({"topic": ch["topic"], "last_message_id": ch["last_message_id"]})
        if ch["type"] in (GUILD_TEXT, GUILD_ANNOUNCEMENT, GUILD_FORUM, GUILD_MEDIA):
            d["default_auto_archive_duration"] = 1440
        return d

    def guild_json(self, g, counts=False):
        d = {"id": g["id"], "name": g["name"], "icon": None, "icon_hash": None, "splash": None,
             "discovery_splash": None, "owner_id": g["owner_id"], "afk_channel_id": None,
             "afk_timeout": 300, "widget_enabled": False, "widget_channel_id": None,
             "verification_level": 0, "default_message_notifications": 0,
             "explicit_content_filter": 0, "roles": [self.role_json(r) for r in g["roles"].values()],
             "emojis": [], "features": [], "mfa_level": 0, "application_id": None,
             "system_channel_id": None, "system_channel_flags": 0, "rules_channel_id": None,
             "max_presences": None, "max_members": 500000, "vanity_url_code": None,
             "description": None, "banner": None, "premium_tier": 0,
             "premium_subscription_count": 0, "preferred_locale": "en-US",
             "public_updates_channel_id": None, "max_video_channel_users": 25,
             "max_stage_video_channel_users": 50, "nsfw_level": 0, "stickers": [],
             "premium_progress_bar_enabled": False, "safety_alerts_channel_id": None,
             "incidents_data": None}
        if counts:
            d["approximate_member_count"] = len(g["members"])
            d["approximate_presence_count"] = 0
        return d

    def guild_create_json(self, g, session):
        d = self.guild_json(g)
        channels = [self.channels[c] for c in g["channel_ids"] if c in self.channels]
        if session.intents & INTENTS["GUILD_MEMBERS"]:
            member_ids = list(g["members"])
        else:
            # Without GUILD_MEMBERS the member list only has the bot itself.
            member_ids = [u for u in g["members"] if u == session.app.user_id]
        d.update({"joined_at": iso(g["joined_at"]), "large": len(g["members"]) > 250,
                  "unavailable": False, "member_count": len(g["members"]), "voice_states": [],
                  "members": [self.member_json(g, u) for u in member_ids],
                  "channels": [self.channel_json(c) for c in channels if c["type"] not in THREAD_TYPES],
                  "threads": [self.channel_json(c) for c in channels
                              if c["type"] in THREAD_TYPES and not c["thread"]["archived"]],
                  "presences": [], "stage_instances": [], "guild_scheduled_events": [],
                  "soundboard_sounds": []})
        return d

    def attachment_json(self, a, control=False):
        q = urllib.parse.quote(a["filename"])
        expires = int(a["created"]) + 86400
        sig = hashlib.sha256(("%s:%d" % (a["id"], expires)).encode()).hexdigest()[:32]
        path = "/attachments/%s/%s/%s?ex=%x&is=%x&hm=%s&" % (a["channel_id"], a["id"], q, expires, int(a["created"]), sig)
        d = {"id": a["id"], "filename": a["filename"], "size": a["size"], "url": self.base + path,
             "proxy_url": self.base + path, "content_type": a["content_type"]}
        if a.get("description"):
            d["description"] = a["description"]
        if control:
            d["sha256"] = a["sha256"]
        return d

    def reaction_json(self, r, me_id, control=False):
        d = {"count": len(r["users"]), "count_details": {"burst": 0, "normal": len(r["users"])},
             "me": me_id in r["users"], "me_burst": False, "burst_colors": [], "emoji": dict(r["emoji"])}
        if control:
            d["users"] = list(r["users"])
        return d

    def msg_json(self, m, me_id=None, show=None, gateway=False, depth=0, control=False):
        """A message object; ``show(m)`` says whether its content fields may be shown."""
        visible = True if show is None else show(m)
        ch = self.channels.get(m["channel_id"])
        d = {"type": m["type"], "channel_id": m["channel_id"],
             "content": m["content"] if visible else "",
             "attachments": [self.attachment_json(a, control) for a in m["attachments"]] if visible else [],
             "embeds": json.loads(dumps(m["embeds"])) if visible else [],
             "timestamp": iso(m["ts"]), "edited_timestamp": iso(m["edited_ts"]),
             "flags": m["flags"], "components": [], "id": m["id"],
             "author": dict(m["author"]) if m["webhook_id"] else self.user_json(m["author_id"]),
             "mentions": [], "mention_roles": list(m["mention_roles"]),
             "mention_everyone": m["mention_everyone"], "pinned": False, "tts": m["tts"]}
        g = self.guilds.get(ch["guild_id"]) if ch and ch.get("guild_id") else None
        for uid in m["mention_ids"]:
            mention = self.user_json(uid)
            if gateway and g is not None and uid in g["members"]:
                mention["member"] = self.member_json(g, uid, with_user=False)
            d["mentions"].append(mention)
        if m["webhook_id"]:
            d["webhook_id"] = m["webhook_id"]
        if m["nonce"] is not None:
            d["nonce"] = m["nonce"]
        if m["reactions"]:
            d["reactions"] = [self.reaction_json(r, me_id, control) for r in m["reactions"]]
        if m["reference"] is not None:
            d["message_reference"] = dict(m["reference"])
            if m["type"] == MSG_REPLY and depth == 0:
                ref = self.messages.get(int(m["reference"]["message_id"]))
                if ref is None or ref["deleted"]:
                    d["referenced_message"] = None
                else:
                    d["referenced_message"] = self.msg_json(ref, me_id, show, gateway, depth + 1, control)
        if m["thread_id"] and m["thread_id"] in self.channels:
            d["thread"] = self.channel_json(self.channels[m["thread_id"]])
        if gateway and g is not None:
            d["guild_id"] = g["id"]
            if not m["webhook_id"] and m["author_id"] in g["members"]:
                d["member"] = self.member_json(g, m["author_id"], with_user=False)
        if control:
            d["guild_id"] = g["id"] if g is not None else None
            d["deleted"] = m["deleted"]
            d["edited"] = m["edited_ts"] is not None
            d["edit_history"] = list(m["history"])
            d["source"] = m["source"]
            d["allowed_mentions"] = m["allowed_mentions"]
            d["reactions"] = [self.reaction_json(r, me_id, True) for r in m["reactions"]]
            if m["webhook_id"]:
                d["username"] = m["webhook_username"]
                d["avatar_url"] = m["webhook_avatar_url"]
        return d

    # ------------------------------------------------------------------ lookups

    def channel(self, cid):
        ch = self.channels.get(str(cid)) if is_snowflake(cid) else None
        if ch is None:
            raise unknown("Channel")
        return ch

    def guild(self, gid):
        g = self.guilds.get(str(gid)) if is_snowflake(gid) else None
        if g is None:
            raise unknown("Guild")
        return g

    def message(self, mid, channel_id=None):
        m = self.messages.get(int(mid)) if is_snowflake(mid) else None
        if m is None or m["deleted"] or (channel_id is not None and m["channel_id"] != str(channel_id)):
            raise unknown("Message")
        return m

    def check_access(self, ch, *perms):
        """Raises 50001 / 50013 as Discord does when the bot can't see or act in a channel."""
        base = ch
        if ch["type"] in THREAD_TYPES and ch["parent_id"] in self.channels:
            base = self.channels[ch["parent_id"]]
        g = self.guilds.get(base.get("guild_id") or "")
        if not base.get("access", True) or (g is not None and not g.get("access", True)):
            raise ApiError(*MISSING_ACCESS)
        denied = set(base.get("deny", ())) | (set(g.get("deny", ())) if g else set())
        if "VIEW_CHANNEL" in denied:
            raise ApiError(*MISSING_ACCESS)
        for p in perms:
            if p in denied:
                raise ApiError(*MISSING_PERMISSIONS)

    def denied(self, ch, perm):
        try:
            self.check_access(ch, perm)
            return False
        except ApiError:
            return True

    def visible_messages(self, cid):
        out = []
        for mid in self.channel_msgs.get(cid, ()):
            m = self.messages.get(mid)
            if m is not None and not m["deleted"]:
                out.append(m)
        return out

    def content_visible_rest(self, app):
        has = app is None or "MESSAGE_CONTENT" in app.privileged
        return lambda m: has or self.content_exempt(m, app)

    def content_exempt(self, m, app):
        """Discord shows content without the MESSAGE_CONTENT intent for the app's own
        messages, DMs and messages that mention the app."""
        if app is None:
            return True
        if not m["webhook_id"] and m["author_id"] == app.user_id:
            return True
        ch = self.channels.get(m["channel_id"])
        if ch is not None and ch["type"] in (DM, GROUP_DM):
            return True
        return app.user_id in m["mention_ids"]

    # ----------------------------------------------------------------- dispatch

    def dispatch(self, event, build, intent=None, guild_id=None, dm_intent=None, only_bot=None):
        """Sends an event to every live session whose intents take it."""
        window = self.cfg.resume_window
        for s in list(self.sessions.values()):
            if s.invalid is not None or s.expired(window):
                continue
            if only_bot is not None and s.app.user_id != only_bot:
                continue
            wanted = intent if guild_id else (dm_intent if dm_intent is not None else intent)
            if wanted is not None and not s.intents & wanted:
                continue
            if guild_id and s.shard[1] > 1 and (int(guild_id) >> 22) % s.shard[1] != s.shard[0]:
                continue
            if not guild_id and s.shard[0] != 0:
                continue
            data = build(s)
            if data is not None:
                s.push(event, data)

    def dispatch_message(self, event, m):
        ch = self.channels[m["channel_id"]]
        gid = ch.get("guild_id")

        def build(s):
            has = bool(s.intents & INTENTS["MESSAGE_CONTENT"])
            return self.msg_json(m, s.app.user_id, lambda x: has or self.content_exempt(x, s.app), gateway=True)

        self.dispatch(event, build, INTENTS["GUILD_MESSAGES"], gid, INTENTS["DIRECT_MESSAGES"], ch.get("owner_app"))

    def dispatch_delete(self, m):
        ch = self.channels[m["channel_id"]]
        gid = ch.get("guild_id")
        data = {"id": m["id"], "channel_id": m["channel_id"]}
        if gid:
            data["guild_id"] = gid
        self.dispatch("MESSAGE_DELETE", lambda s: data, INTENTS["GUILD_MESSAGES"], gid, INTENTS["DIRECT_MESSAGES"],
                      ch.get("owner_app"))

    def dispatch_reaction(self, m, uid, emoji, added):
        ch = self.channels[m["channel_id"]]
        gid = ch.get("guild_id")
        data = {"user_id": uid, "type": 0, "channel_id": m["channel_id"], "message_id": m["id"],
                "emoji": dict(emoji), "burst": False, "burst_colors": []}
        if gid:
            data["guild_id"] = gid
        if added:
            data["message_author_id"] = m["author_id"]
            g = self.guilds.get(gid or "")
            if g is not None and uid in g["members"]:
                data["member"] = self.member_json(g, uid)
        self.dispatch("MESSAGE_REACTION_ADD" if added else "MESSAGE_REACTION_REMOVE", lambda s: data,
                      INTENTS["GUILD_MESSAGE_REACTIONS"], gid, INTENTS["DIRECT_MESSAGE_REACTIONS"], ch.get("owner_app"))

    def dispatch_typing(self, ch, uid):
        gid = ch.get("guild_id")
        data = {"channel_id": ch["id"], "user_id": uid, "timestamp": int(now_s())}
        if gid:
            data["guild_id"] = gid
            g = self.guilds.get(gid)
            if g is not None and uid in g["members"]:
                data["member"] = self.member_json(g, uid)
        self.dispatch("TYPING_START", lambda s: data, INTENTS["GUILD_MESSAGE_TYPING"], gid,
                      INTENTS["DIRECT_MESSAGE_TYPING"], ch.get("owner_app"))

    def dispatch_thread_create(self, th):
        data = self.channel_json(th)
        data["newly_created"] = True
        self.dispatch("THREAD_CREATE", lambda s: data, INTENTS["GUILDS"], th["guild_id"])

    # ----------------------------------------------------------------- mutation

    def add_guild_member(self, g, uid, nick=None, roles=()):
        g["members"][uid] = {"nick": nick, "roles": [str(r) for r in roles],
                             "joined_at": g["members"].get(uid, {}).get("joined_at", now_s())}

    def ensure_bots_in_guilds(self):
        for g in self.guilds.values():
            for app in self.apps.values():
                if app.user_id not in g["members"]:
                    self.add_guild_member(g, app.user_id)

    def new_channel(self, cid, ctype, guild_id=None, name=None, parent_id=None, topic=None, position=0):
        ch = {"id": cid, "type": ctype, "guild_id": guild_id, "name": name, "parent_id": parent_id,
              "topic": topic, "position": position, "last_message_id": None, "recipients": [],
              "deny": set(), "access": True}
        self.channels[cid] = ch
        self.channel_msgs.setdefault(cid, [])
        if guild_id and guild_id in self.guilds and cid not in self.guilds[guild_id]["channel_ids"]:
            self.guilds[guild_id]["channel_ids"].append(cid)
        return ch

    def new_thread(self, parent, name, owner_id, ttype=PUBLIC_THREAD, tid=None, auto_archive=1440, archived=False):
        tid = tid or self.snow.next()
        th = self.new_channel(tid, ttype, parent["guild_id"], name, parent["id"])
        created = now_s()
        th.update({"owner_id": owner_id, "message_count": 0, "member_count": 1, "total_message_sent": 0,
                   "thread": {"archived": bool(archived), "auto_archive_duration": auto_archive,
                              "archive_timestamp": created, "locked": False, "create_timestamp": created}})
        return th

    def store_attachment(self, channel_id, filename, data, content_type=None, description=None):
        aid = self.snow.next()
        filename = (filename or "unknown").replace("/", "_").replace("\\", "_").replace(" ", "_") or "unknown"
        if not content_type:
            content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        a = {"id": aid, "channel_id": channel_id, "filename": filename, "size": len(data),
             "content_type": content_type, "description": description, "data": bytes(data),
             "sha256": hashlib.sha256(data).hexdigest(), "created": now_s()}
        self.attachments[aid] = a
        self.attachment_bytes += len(data)
        while self.attachment_bytes > MAX_ATTACHMENT_STORE and len(self.attachments) > 1:
            _, old = self.attachments.popitem(last=False)
            self.attachment_bytes -= old["size"]
        return a

    def compute_mentions(self, content, ch, allowed=None, replied_author=None):
        g = self.guilds.get(ch.get("guild_id") or "")
        users = []
        for uid in USER_MENTION_RE.findall(content or ""):
            if uid in self.users and uid not in users:
                users.append(uid)
        roles = []
        for rid in ROLE_MENTION_RE.findall(content or ""):
            if g is not None and rid in g["roles"] and rid not in roles:
                roles.append(rid)
        everyone = "@everyone" in (content or "") or "@here" in (content or "")
        replied = True
        if allowed is not None:
            parse = allowed.get("parse") or []
            allowed_users = [str(u) for u in allowed.get("users") or []]
            allowed_roles = [str(r) for r in allowed.get("roles") or []]
            users = [u for u in users if "users" in parse or u in allowed_users]
            roles = [r for r in roles if "roles" in parse or r in allowed_roles]
            everyone = everyone and "everyone" in parse
            replied = bool(allowed.get("replied_user", False))
        if replied_author and replied and replied_author not in users:
            users.append(replied_author)
        return users, roles, everyone

    def create_message(self, ch, author_id, content="", embeds=None, attachments=None, mention_ids=(),
                       mention_roles=(), mention_everyone=False, reference=None, nonce=None,
                       webhook=None, webhook_username=None, webhook_avatar_url=None, source="rest",
                       tts=False, flags=0, allowed_mentions=None, mtype=None, dispatch=True):
        mid = self.snow.next()
        if mtype is None:
            mtype = MSG_REPLY if reference is not None else MSG_DEFAULT
        m = {"id": mid, "channel_id": ch["id"], "author_id": author_id, "content": content or "",
             "embeds": list(embeds or []), "attachments": list(attachments or []),
             "mention_ids": list(mention_ids), "mention_roles": list(mention_roles),
             "mention_everyone": bool(mention_everyone), "reference": reference, "nonce": nonce,
             "webhook_id": webhook["id"] if webhook else None, "webhook_username": webhook_username,
             "webhook_avatar_url": webhook_avatar_url, "author": None, "ts": snowflake_time(mid),
             "edited_ts": None, "deleted": False, "reactions": [], "history": [], "source": source,
             "tts": bool(tts), "flags": flags, "type": mtype, "thread_id": None,
             "allowed_mentions": allowed_mentions}
        if webhook is not None:
            avatar = webhook["avatar"]
            if webhook_avatar_url:
                avatar = hashlib.md5(webhook_avatar_url.encode()).hexdigest()
            m["author"] = {"id": webhook["id"], "username": webhook_username or webhook["name"],
                           "avatar": avatar, "discriminator": "0000", "bot": True, "public_flags": 0,
                           "flags": 0, "global_name": None}
            m["author_id"] = webhook["id"]
        self.messages[int(mid)] = m
        ids = self.channel_msgs.setdefault(ch["id"], [])
        ids.append(int(mid))
        while len(ids) > MAX_MESSAGES_PER_CHANNEL:
            old = ids.pop(0)
            self.messages.pop(old, None)
        ch["last_message_id"] = mid
        if ch["type"] in THREAD_TYPES:
            ch["message_count"] += 1
            ch["total_message_sent"] += 1
        if dispatch:
            self.dispatch_message("MESSAGE_CREATE", m)
        return m

    def message_reference(self, ch, ref, check=True):
        """Validates a message_reference for a reply; answers (reference, replied author)."""
        if not isinstance(ref, dict):
            raise form_error("message_reference", "MODEL_TYPE_CONVERT", "Only dictionaries may be used in a ModelType")
        if ref.get("type", 0) not in (0, None):
            raise form_error("message_reference.type", "ENUM_TYPE_COERCE", "Only replies are supported here")
        mid = ref.get("message_id")
        cid = str(ref.get("channel_id") or ch["id"])
        target = self.messages.get(int(mid)) if is_snowflake(mid) else None
        if target is None or target["deleted"] or target["channel_id"] != cid:
            if check and ref.get("fail_if_not_exists", True):
                raise form_error("message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
            return None, None
        out = {"type": 0, "channel_id": cid, "message_id": target["id"]}
        if ch.get("guild_id"):
            out["guild_id"] = ch["guild_id"]
        return out, (target["author_id"] if not target["webhook_id"] else None)

    def edit_message(self, m, content=None, embeds=None, keep_attachment_ids=None, new_attachments=(),
                     allowed_mentions=None, flags=None, link_preview=False):
        ch = self.channels[m["channel_id"]]
        if link_preview:
            m["embeds"] = list(embeds or [])
        else:
            if content is not None and content != m["content"]:
                m["history"].append(m["content"])
                m["content"] = content
                users, roles, everyone = self.compute_mentions(content, ch, allowed_mentions or m["allowed_mentions"])
                if m["type"] == MSG_REPLY and m["reference"] is not None:
                    # A reply keeps pinging the replied-to author it pinged when sent.
                    ref = self.messages.get(int(m["reference"]["message_id"]))
                    if ref is not None and ref["author_id"] in m["mention_ids"] and ref["author_id"] not in users:
                        users.append(ref["author_id"])
                m["mention_ids"], m["mention_roles"], m["mention_everyone"] = users, roles, everyone
            if embeds is not None:
                m["embeds"] = list(embeds)
            if keep_attachment_ids is not None:
                m["attachments"] = [a for a in m["attachments"] if a["id"] in keep_attachment_ids]
            m["attachments"].extend(new_attachments)
            if flags is not None:
                m["flags"] = (m["flags"] & ~SENDABLE_FLAGS) | (int(flags) & SENDABLE_FLAGS)
            m["edited_ts"] = now_s()
        self.dispatch_message("MESSAGE_UPDATE", m)

    def delete_message(self, m):
        m["deleted"] = True
        self.dispatch_delete(m)

    def react(self, m, uid, emoji, add):
        key = emoji["id"] or emoji["name"]
        for r in m["reactions"]:
            if (r["emoji"]["id"] or r["emoji"]["name"]) == key:
                break
        else:
            r = None
        if add:
            if r is None:
                r = {"emoji": dict(emoji), "users": []}
                m["reactions"].append(r)
            if uid in r["users"]:
                return False
            r["users"].append(uid)
        else:
            if r is None or uid not in r["users"]:
                return False
            r["users"].remove(uid)
            if not r["users"]:
                m["reactions"].remove(r)
        self.dispatch_reaction(m, uid, emoji, add)
        return True

    # ----------------------------------------------------------------- gateway

    def gc_sessions(self):
        window = self.cfg.resume_window
        for s in list(self.sessions.values()):
            if s.invalid is None and s.expired(window):
                s.invalid = "resume window elapsed"
            if s.invalid is not None:
                s.log.clear()
        while len(self.sessions) > MAX_SESSIONS:
            for sid, s in self.sessions.items():
                if s.conn is None:
                    del self.sessions[sid]
                    break
            else:
                break


def parse_emoji(text):
    text = text or ""
    m = CUSTOM_EMOJI_RE.match(text)
    if m:
        return {"id": m.group(2), "name": m.group(1), **({"animated": True} if text.startswith("a:") else {})}
    if not text or all(ord(c) < 128 for c in text) or len(text) > 32:
        raise unknown("Emoji")
    return {"id": None, "name": text}


def control_emoji(value):
    if isinstance(value, dict):
        if value.get("id"):
            return {"id": str(value["id"]), "name": value.get("name") or "emoji"}
        return {"id": None, "name": str(value.get("name") or "")}
    return parse_emoji(str(value))


def validate_webhook_name(field, name):
    if not isinstance(name, str) or not (1 <= len(name) <= 80):
        raise form_error(field, "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 80 in length.")
    lowered = name.lower()
    for word in ("clyde", "discord"):
        if word in lowered:
            raise form_error(field, "USERNAME_INVALID_CONTAINS", 'Username cannot contain "%s"' % word)
    if lowered in ("everyone", "here"):
        raise form_error(field, "USERNAME_INVALID", "Username is invalid")


def parse_image_data(field, value):
    if value is None:
        return None
    m = re.fullmatch(r"data:image/(png|jpeg|jpg|gif|webp);base64,([A-Za-z0-9+/=\s]+)", str(value))
    if not m:
        raise form_error(field, "IMAGE_INVALID", "Invalid image data")
    try:
        data = base64.b64decode(m.group(2), validate=False)
    except ValueError:
        raise form_error(field, "IMAGE_INVALID", "Invalid image data") from None
    return hashlib.md5(data).hexdigest()


def truthy(value):
    return str(value).lower() in ("true", "1", "yes")


# ============================================================================ REST


class Ctx:
    def __init__(self, state, request, params, route):
        self.st = state
        self.request = request
        self.params = params
        self.route = route
        self.app = None
        self.body = None  # parsed JSON (or payload_json)
        self.files = []   # [(field, filename, bytes, content_type)]
        self.body_error = None
        self.query = request.query

    def json(self):
        if self.body_error is not None:
            raise self.body_error
        return self.body if isinstance(self.body, dict) else {}


class Route:
    def __init__(self, method, template, handler, auth=True):
        self.method = method
        self.template = template
        self.segments = template.strip("/").split("/")
        self.handler = handler
        self.auth = auth
        self.key = "%s %s" % (method, re.sub(r"\{[^}]*\}", "{}", template))
        self.bucket = hashlib.sha1(self.key.encode()).hexdigest()[:32]

    def match(self, segs):
        if len(segs) != len(self.segments):
            return None
        params = {}
        for want, got in zip(self.segments, segs):
            if want.startswith("{"):
                if not got:
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


def major_parameter(route, params):
    first = route.segments[0]
    if first == "channels":
        return "c:" + params.get("channel_id", "")
    if first == "guilds":
        return "g:" + params.get("guild_id", "")
    if first == "webhooks":
        return "w:" + params.get("webhook_id", "") + "/" + params.get("webhook_token", "")
    return ""


def normalize_route(text):
    """"POST /channels/{id}/messages" -> "POST /channels/{}/messages"; no method: "* /path"."""
    text = str(text).strip()
    if text.startswith("/"):
        method, path = "*", text
    else:
        method, _, path = text.partition(" ")
    path = "/" + path.strip().strip("/")
    if path.startswith("/api/v10/"):
        path = path[len("/api/v10"):]
    return "%s %s" % (method.upper(), re.sub(r"\{[^}]*\}", "{}", path))


class Rest:
    def __init__(self, state):
        self.st = state
        R = Route
        self.routes = [
            R("GET", "/gateway", self.get_gateway, auth=False),
            R("GET", "/gateway/bot", self.get_gateway_bot),
            R("GET", "/users/@me", self.get_me),
            R("GET", "/users/@me/guilds", self.get_my_guilds),
            R("POST", "/users/@me/channels", self.create_dm),
            R("GET", "/applications/@me", self.get_application),
            R("GET", "/oauth2/applications/@me", self.get_application),
            R("GET", "/users/{user_id}", self.get_user),
            R("GET", "/guilds/{guild_id}", self.get_guild),
            R("GET", "/guilds/{guild_id}/channels", self.get_guild_channels),
            R("GET", "/guilds/{guild_id}/members", self.list_members),
            R("GET", "/guilds/{guild_id}/members/{user_id}", self.get_member),
            R("GET", "/guilds/{guild_id}/roles", self.get_roles),
            R("GET", "/guilds/{guild_id}/emojis", self.get_emojis),
            R("GET", "/guilds/{guild_id}/webhooks", self.get_guild_webhooks),
            R("GET", "/guilds/{guild_id}/threads/active", self.get_active_threads),
            R("GET", "/channels/{channel_id}", self.get_channel),
            R("GET", "/channels/{channel_id}/messages", self.get_messages),
            R("GET", "/channels/{channel_id}/pins", self.get_pins),
            R("POST", "/channels/{channel_id}/messages", self.post_message),
            R("GET", "/channels/{channel_id}/messages/{message_id}", self.get_message),
            R("PATCH", "/channels/{channel_id}/messages/{message_id}", self.patch_message),
            R("DELETE", "/channels/{channel_id}/messages/{message_id}", self.delete_message),
            R("PUT", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self.put_reaction),
            R("DELETE", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self.delete_own_reaction),
            R("DELETE", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/{user_id}", self.delete_user_reaction),
            R("GET", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}", self.get_reactions),
            R("DELETE", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}", self.delete_emoji_reactions),
            R("DELETE", "/channels/{channel_id}/messages/{message_id}/reactions", self.delete_all_reactions),
            R("POST", "/channels/{channel_id}/messages/{message_id}/threads", self.thread_from_message),
            R("POST", "/channels/{channel_id}/typing", self.typing),
            R("POST", "/channels/{channel_id}/threads", self.thread_without_message),
            R("GET", "/channels/{channel_id}/threads/archived/public", self.archived_public_threads),
            R("GET", "/channels/{channel_id}/webhooks", self.get_channel_webhooks),
            R("POST", "/channels/{channel_id}/webhooks", self.create_webhook),
            R("GET", "/webhooks/{webhook_id}", self.get_webhook),
            R("PATCH", "/webhooks/{webhook_id}", self.patch_webhook),
            R("DELETE", "/webhooks/{webhook_id}", self.delete_webhook),
            R("GET", "/webhooks/{webhook_id}/{webhook_token}", self.get_webhook_token, auth=False),
            R("PATCH", "/webhooks/{webhook_id}/{webhook_token}", self.patch_webhook_token, auth=False),
            R("DELETE", "/webhooks/{webhook_id}/{webhook_token}", self.delete_webhook_token, auth=False),
            R("POST", "/webhooks/{webhook_id}/{webhook_token}", self.execute_webhook, auth=False),
            R("GET", "/webhooks/{webhook_id}/{webhook_token}/messages/{message_id}", self.get_webhook_message, auth=False),
            R("PATCH", "/webhooks/{webhook_id}/{webhook_token}/messages/{message_id}", self.patch_webhook_message, auth=False),
            R("DELETE", "/webhooks/{webhook_id}/{webhook_token}/messages/{message_id}", self.delete_webhook_message, auth=False),
        ]

    # ------------------------------------------------------------------ entry

    async def entry(self, request):
        st = self.st
        raw = request.raw_path.split("?", 1)[0]
        m = re.match(r"^/api(?:/v(\d+))?(/.*)?$", raw)
        if not m or (m.group(1) is not None and m.group(1) not in ("9", "10")):
            return self.finish(request, None, 404, {"message": "404: Not Found", "code": 0}, {})
        sub = (m.group(2) or "/").strip("/")
        segs = [urllib.parse.unquote(s) for s in sub.split("/")] if sub else []
        route, params, path_matched = None, None, False
        for r in self.routes:
            p = r.match(segs)
            if p is None:
                continue
            path_matched = True
            if r.method == request.method:
                route, params = r, p
                break
        if route is None:
            status, body = (405, {"message": "405: Method Not Allowed", "code": 0}) if path_matched \
                else (404, {"message": "404: Not Found", "code": 0})
            return self.finish(request, None, status, body, {})
        ctx = Ctx(st, request, params, route)
        await self.read_body(ctx)
        headers = {}
        try:
            now = now_s()
            if st.global_until > now:
                wait = st.global_until - now
                return self.finish(request, ctx, 429, {"message": "You are being rate limited.",
                                                       "retry_after": round(wait, 3), "global": True},
                                   {"Retry-After": str(max(1, math.ceil(wait))), "X-RateLimit-Global": "true",
                                    "X-RateLimit-Scope": "global"})
            limited = self.take_bucket(ctx, headers, now, "/" + sub)
            if limited is not None:
                return self.finish(request, ctx, 429, limited[0], limited[1])
            if route.auth:
                auth = request.headers.get("Authorization", "")
                app = st.apps.get(auth[4:]) if auth.startswith("Bot ") else None
                if app is None:
                    raise ApiError(401, 0, "401: Unauthorized")
                ctx.app = app
            fault = self.take_http_fault(request, "/" + sub)
            if fault is not None:
                return self.finish(request, ctx, fault[0], fault[1], headers)
            result = await route.handler(ctx)
        except ApiError as err:
            headers.update(err.headers)
            return self.finish(request, ctx, err.status, err.body(), headers)
        except Exception:  # noqa: BLE001 - answer as Discord does, keep serving, log the cause
            log.exception("%s %s failed", request.method, request.path_qs)
            return self.finish(request, ctx, 500, {"message": "500: Internal Server Error", "code": 0}, headers)
        if result is None:
            return self.finish(request, ctx, 204, None, headers)
        if isinstance(result, tuple):
            return self.finish(request, ctx, result[0], result[1], headers)
        return self.finish(request, ctx, 200, result, headers)

    async def read_body(self, ctx):
        request = ctx.request
        if request.method in ("GET", "HEAD"):
            return
        ctype = request.headers.get("Content-Type", "")
        try:
            if ctype.startswith("multipart/form-data"):
                reader = await request.multipart()
                payload = None
                fields = {}
                total = 0
                too_big = False
                while True:
                    part = await reader.next()
                    if part is None:
                        break
                    chunks = []
                    size = 0
                    while True:
                        chunk = await part.read_chunk(65536)
                        if not chunk:
                            break
                        size += len(chunk)
                        if size <= HARD_BODY_LIMIT:
                            chunks.append(chunk)
                    data = b"".join(chunks)
                    name = part.name or ""
                    if part.filename is not None or name.startswith("files["):
                        total += size
                        if total > self.st.cfg.upload_limit:
                            too_big = True
                        ctx.files.append((name, part.filename or name, data if not too_big else b"",
                                          part.headers.get("Content-Type")))
                    elif name == "payload_json":
                        payload = json.loads(data.decode("utf-8"))
                    else:
                        fields[name] = data.decode("utf-8", "replace")
                if payload is None:
                    payload = fields
                ctx.body = payload
                if too_big:
                    ctx.body_error = ApiError(413, 40005, "Request entity too large")
            else:
                data = await request.read()
                if data.strip():
                    ctx.body = json.loads(data.decode("utf-8"))
                else:
                    ctx.body = {}
        except (ValueError, UnicodeDecodeError):
            ctx.body_error = ApiError(400, 50109, "The request body contains invalid JSON.")
        except Exception as err:  # noqa: BLE001 - a malformed upload is the client's error
            ctx.body_error = ApiError(400, 0, "400: Bad Request (%s)" % type(err).__name__)

    def take_bucket(self, ctx, headers, now, sub):
        st = self.st
        route = ctx.route
        major = major_parameter(route, ctx.params)
        actual = "%s %s" % (ctx.request.method, sub)
        chosen, scope = None, "user"
        for fault in st.rl_faults:
            want = fault["route"]
            if want is not None and want.startswith("* "):
                want = ctx.request.method + want[1:]
            if want is None or want == route.key or normalize_route(actual) == want:
                chosen = fault["buckets"].setdefault((route.bucket, major), Bucket(fault["calls"], fault["per_secs"]))
                scope = fault["scope"]
                break
        if chosen is not None and scope == "shared":
            # A shared limit is the resource's, not the client's: the headers keep
            # telling the client's own bucket, and only the 429 says otherwise.
            shared = chosen
            if not shared.take(now):
                own = st.buckets.setdefault((route.bucket, major), Bucket(st.cfg.bucket_limit, st.cfg.bucket_window))
                wait = shared.reset_after(now)
                h = dict(headers)
                h.update({"X-RateLimit-Limit": str(own.limit), "X-RateLimit-Remaining": str(own.remaining()),
                          "X-RateLimit-Reset": "%.3f" % (now + own.reset_after(now)),
                          "X-RateLimit-Reset-After": "%.3f" % own.reset_after(now),
                          "X-RateLimit-Bucket": route.bucket, "X-RateLimit-Scope": "shared",
                          "Retry-After": str(max(1, math.ceil(wait)))})
                return {"message": "You are being rate limited.", "retry_after": round(wait, 3), "global": False,
                        "code": 0}, h
            chosen = None
        if chosen is None:
            if len(st.buckets) > 20000:
                st.buckets = {k: b for k, b in st.buckets.items() if b.reset_at > now}
            chosen = st.buckets.setdefault((route.bucket, major), Bucket(st.cfg.bucket_limit, st.cfg.bucket_window))
        ok = chosen.take(now)
        reset_after = chosen.reset_after(now)
        headers.update({"X-RateLimit-Limit": str(chosen.limit), "X-RateLimit-Remaining": str(chosen.remaining()),
                        "X-RateLimit-Reset": "%.3f" % (now + reset_after),
                        "X-RateLimit-Reset-After": "%.3f" % reset_after,
                        "X-RateLimit-Bucket": route.bucket, "X-RateLimit-Scope": "user"})
        if ok:
            return None
        h = dict(headers)
        h["X-RateLimit-Scope"] = scope
        h["Retry-After"] = str(max(1, math.ceil(reset_after)))
        body = {"message": "You are being rate limited.", "retry_after": round(reset_after, 3), "global": False}
        if scope == "shared":
            body["code"] = 0
        return body, h

    def take_http_fault(self, request, sub):
        for fault in self.st.http_faults:
            if fault["count"] <= 0:
                continue
            if fault["method"] and fault["method"] != request.method:
                continue
            prefix = fault["path_prefix"]
            if not (sub.startswith(prefix) or request.path.startswith(prefix)):
                continue
            fault["count"] -= 1
            status = fault["status"]
            body = {"message": fault.get("message") or "%d: %s" % (status, self.reason(status)),
                    "code": fault.get("code", 0)}
            self.st.http_faults = [f for f in self.st.http_faults if f["count"] > 0]
            return status, body
        return None

    @staticmethod
    def reason(status):
        from http import HTTPStatus
        try:
            return HTTPStatus(status).phrase
        except ValueError:
            return "Error"

    def finish(self, request, ctx, status, body, headers):
        st = self.st
        recorded = None
        if ctx is not None:
            recorded = ctx.body
            if ctx.files:
                recorded = {"payload_json": ctx.body, "files": [
                    {"field": f[0], "filename": f[1], "size": len(f[2]), "content_type": f[3],
                     "sha256": hashlib.sha256(f[2]).hexdigest()} for f in ctx.files]}
        st.calls.append({"time": now_s(), "method": request.method, "path": request.path,
                         "query": dict(request.query), "route": ctx.route.key if ctx else None,
                         "status": status, "body": recorded,
                         "response": body if status >= 400 else None})
        log.debug("%s %s -> %d", request.method, request.path_qs, status)
        if status == 204 or body is None:
            resp = web.Response(status=status, headers=headers)
        else:
            resp = web.Response(status=status, text=dumps(body), content_type="application/json",
                                headers=headers)
        return resp

    # ----------------------------------------------------------------- helpers

    def ch_for_bot(self, ctx, *perms):
        ch = self.st.channel(ctx.params["channel_id"])
        if ch["type"] in (DM, GROUP_DM):
            if ch.get("owner_app") not in (None, ctx.app.user_id):
                raise ApiError(*MISSING_ACCESS)
        else:
            self.st.check_access(ch, *perms)
        return ch

    def message_payload(self, ctx, ch, body, require_content=True):
        """Validates a create-message body; answers its parts."""
        content = body.get("content")
        if content is not None and not isinstance(content, str):
            raise form_error("content", "BASE_TYPE_STRING", "Must be a string.")
        content = content or ""
        if len(content) > 2000:
            raise form_error("content", "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
        embeds = body.get("embeds")
        if embeds is None and isinstance(body.get("embed"), dict):
            embeds = [body["embed"]]
        embeds = embeds or []
        if not isinstance(embeds, list):
            raise form_error("embeds", "BASE_TYPE_ARRAY", "Must be an array.")
        if len(embeds) > 10:
            raise form_error("embeds", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        norm_embeds = []
        for i, e in enumerate(embeds):
            if not isinstance(e, dict):
                raise form_error("embeds.%d" % i, "MODEL_TYPE_CONVERT", "Only dictionaries may be used in a ModelType")
            e = dict(e)
            e.setdefault("type", "rich")
            e.setdefault("content_scan_version", 0)
            norm_embeds.append(e)
        allowed = body.get("allowed_mentions")
        if allowed is not None:
            if not isinstance(allowed, dict):
                raise form_error("allowed_mentions", "MODEL_TYPE_CONVERT", "Only dictionaries may be used in a ModelType")
            parse = allowed.get("parse") or []
            for i, p in enumerate(parse):
                if p not in ("users", "roles", "everyone"):
                    raise form_error("allowed_mentions.parse.%d" % i, "ENUM_TYPE_COERCE",
                                     "Value \"%s\" is not a valid enum value." % p)
            for kind in ("users", "roles"):
                if kind in parse and allowed.get(kind):
                    raise form_error("allowed_mentions", "MESSAGE_ALLOWED_MENTIONS_PARSE_EXCLUSIVE",
                                     "parse:[\"%s\"] and %s: [ids] are mutually exclusive." % (kind, kind))
        nonce = body.get("nonce")
        if nonce is not None:
            if isinstance(nonce, bool) or not isinstance(nonce, (str, int)) or (isinstance(nonce, str) and len(nonce) > 25):
                raise form_error("nonce", "BASE_TYPE_BAD_LENGTH", "Must be 25 or fewer in length.")
        files = ctx.files
        meta = {}
        for i, a in enumerate(body.get("attachments") or []):
            if isinstance(a, dict) and "id" in a:
                meta[str(a["id"])] = a
        new_attachments = []
        for field, filename, data, ctype in files:
            fid = field[6:-1] if field.startswith("files[") and field.endswith("]") else str(len(new_attachments))
            info = meta.get(fid, {})
            new_attachments.append(self.st.store_attachment(
                ch["id"], info.get("filename") or filename, data, ctype, info.get("description")))
        has_stickers = bool(body.get("sticker_ids")) or bool(body.get("components")) or bool(body.get("poll"))
        if require_content and not content and not norm_embeds and not new_attachments and not has_stickers:
            raise ApiError(400, 50006, "Cannot send an empty message")
        flags = body.get("flags") or 0
        if not isinstance(flags, int) or flags & ~SENDABLE_FLAGS:
            raise form_error("flags", "MESSAGE_FLAGS_INVALID", "Invalid flags")
        return {"content": content, "embeds": norm_embeds, "allowed": allowed, "nonce": nonce,
                "attachments": new_attachments, "tts": bool(body.get("tts")), "flags": flags,
                "attachment_meta": meta}

    def me(self, ctx):
        return ctx.app.user_id if ctx.app else None

    def out(self, ctx, m):
        return self.st.msg_json(m, self.me(ctx), self.st.content_visible_rest(ctx.app))

    # --------------------------------------------------------------- gateway

    async def get_gateway(self, ctx):
        return {"url": self.st.ws_base + "/gateway"}

    async def get_gateway_bot(self, ctx):
        used = sum(1 for s in self.st.sessions.values() if s.app is ctx.app)
        return {"url": self.st.ws_base + "/gateway", "shards": 1,
                "session_start_limit": {"total": 1000, "remaining": max(0, 1000 - used),
                                        "reset_after": 86400000, "max_concurrency": 1}}

    # ----------------------------------------------------------------- users

    async def get_me(self, ctx):
        return self.st.current_user_json(ctx.app)

    async def get_my_guilds(self, ctx):
        limit = self.int_param(ctx, "limit", 200, 1, 200)
        after = ctx.query.get("after", "0")
        gs = sorted((g for g in self.st.guilds.values() if int(g["id"]) > int(after if is_snowflake(after) else 0)
                     and g.get("access", True)), key=lambda g: int(g["id"]))[:limit]
        return [{"id": g["id"], "name": g["name"], "icon": None, "banner": None,
                 "owner": g["owner_id"] == ctx.app.user_id, "permissions": str(DEFAULT_EVERYONE_PERMISSIONS),
                 "features": []} for g in gs]

    async def get_application(self, ctx):
        app = ctx.app
        return {"id": app.application_id, "name": self.st.user_json(app.user_id)["username"], "icon": None,
                "description": "", "bot_public": True, "bot_require_code_grant": False,
                "verify_key": hashlib.sha256(app.application_id.encode()).hexdigest(),
                "flags": app.flags(), "bot": self.st.user_json(app.user_id), "owner": None, "team": None,
                "summary": "", "rpc_origins": [], "redirect_uris": [], "tags": [],
                "approximate_guild_count": len(self.st.guilds)}

    async def get_user(self, ctx):
        uid = ctx.params["user_id"]
        if uid not in self.st.users:
            raise unknown("User")
        return self.st.user_json(uid)

    async def create_dm(self, ctx):
        body = ctx.json()
        rid = str(body.get("recipient_id", ""))
        if rid not in self.st.users:
            raise form_error("recipient_id", "NUMBER_TYPE_COERCE", "Value is not snowflake.") \
                if not is_snowflake(rid) else unknown("User")
        for ch in self.st.channels.values():
            if ch["type"] == DM and ch["recipients"] == [rid] and ch.get("owner_app") == ctx.app.user_id:
                return self.st.channel_json(ch)
        ch = self.st.new_channel(self.st.snow.next(), DM)
        ch["recipients"] = [rid]
        ch["owner_app"] = ctx.app.user_id
        return self.st.channel_json(ch)

    # ---------------------------------------------------------------- guilds

    async def get_guild(self, ctx):
        g = self.st.guild(ctx.params["guild_id"])
        if not g.get("access", True):
            raise ApiError(*MISSING_ACCESS)
        return self.st.guild_json(g, counts=truthy(ctx.query.get("with_counts", "false")))

    async def get_guild_channels(self, ctx):
        g = self.st.guild(ctx.params["guild_id"])
        return [self.st.channel_json(self.st.channels[c]) for c in g["channel_ids"]
                if c in self.st.channels and self.st.channels[c]["type"] not in THREAD_TYPES
                and not self.st.denied(self.st.channels[c], "VIEW_CHANNEL")]

    async def get_active_threads(self, ctx):
        g = self.st.guild(ctx.params["guild_id"])
        threads = [self.st.channel_json(self.st.channels[c]) for c in g["channel_ids"]
                   if c in self.st.channels and self.st.channels[c]["type"] in THREAD_TYPES
                   and not self.st.channels[c]["thread"]["archived"]]
        return {"threads": threads, "members": []}

    async def get_member(self, ctx):
        g = self.st.guild(ctx.params["guild_id"])
        uid = ctx.params["user_id"]
        if uid == "@me":
            uid = ctx.app.user_id
        if uid not in g["members"]:
            raise unknown("Member")
        return self.st.member_json(g, uid)

    async def list_members(self, ctx):
        g = self.st.guild(ctx.params["guild_id"])
        if "GUILD_MEMBERS" not in ctx.app.privileged:
            raise ApiError(*MISSING_ACCESS)
        limit = self.int_param(ctx, "limit", 1, 1, 1000)
        after = ctx.query.get("after", "0")
        if not is_snowflake(after):
            raise form_error("after", "NUMBER_TYPE_COERCE", "Value \"%s\" is not snowflake." % after)
        ids = sorted((u for u in g["members"] if int(u) > int(after)), key=int)[:limit]
        return [self.st.member_json(g, u) for u in ids]

    async def get_roles(self, ctx):
        g = self.st.guild(ctx.params["guild_id"])
        return [self.st.role_json(r) for r in g["roles"].values()]

    async def get_emojis(self, ctx):
        self.st.guild(ctx.params["guild_id"])
        return []

    async def get_guild_webhooks(self, ctx):
        g = self.st.guild(ctx.params["guild_id"])
        if "MANAGE_WEBHOOKS" in g.get("deny", ()):
            raise ApiError(*MISSING_PERMISSIONS)
        return [self.webhook_json(w) for w in self.st.webhooks.values() if w["guild_id"] == g["id"]]

    @staticmethod
    def int_param(ctx, name, default, lo, hi):
        raw = ctx.query.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise form_error(name, "NUMBER_TYPE_COERCE", "Value \"%s\" is not int." % raw) from None
        if value < lo:
            raise form_error(name, "NUMBER_TYPE_MIN", "int value should be greater than or equal to %d." % lo)
        if value > hi:
            raise form_error(name, "NUMBER_TYPE_MAX", "int value should be less than or equal to %d." % hi)
        return value

    # -------------------------------------------------------------- channels

    async def get_channel(self, ctx):
        return self.st.channel_json(self.ch_for_bot(ctx))

    async def get_messages(self, ctx):
        ch = self.ch_for_bot(ctx)
        limit = self.int_param(ctx, "limit", 50, 1, 100)
        anchors = {}
        for key in ("around", "before", "after"):
            if key in ctx.query:
                if not is_snowflake(ctx.query[key]):
                    raise form_error(key, "NUMBER_TYPE_COERCE", "Value \"%s\" is not snowflake." % ctx.query[key])
                anchors[key] = int(ctx.query[key])
        if self.st.denied(ch, "READ_MESSAGE_HISTORY"):
            return []
        msgs = self.st.visible_messages(ch["id"])
        ids = [int(m["id"]) for m in msgs]
        if "around" in anchors:
            x = anchors["around"]
            older_n = limit // 2
            start = bisect.bisect_left(ids, x)  # first id >= x
            newer = msgs[start:start + (limit - older_n)]
            older = msgs[max(0, start - older_n):start]
            chosen = older + newer
        elif "before" in anchors:
            end = bisect.bisect_left(ids, anchors["before"])
            chosen = msgs[max(0, end - limit):end]
        elif "after" in anchors:
            start = bisect.bisect_right(ids, anchors["after"])
            chosen = msgs[start:start + limit]
        else:
            chosen = msgs[-limit:]
        return [self.out(ctx, m) for m in reversed(chosen)]

    async def get_pins(self, ctx):
        self.ch_for_bot(ctx, "READ_MESSAGE_HISTORY")
        return []

    async def get_message(self, ctx):
        ch = self.ch_for_bot(ctx, "READ_MESSAGE_HISTORY")
        if self.st.denied(ch, "READ_MESSAGE_HISTORY"):
            raise ApiError(*MISSING_ACCESS)
        return self.out(ctx, self.st.message(ctx.params["message_id"], ch["id"]))

    async def post_message(self, ctx):
        st = self.st
        ch = self.ch_for_bot(ctx)
        if ch["type"] not in TEXT_TYPES:
            raise ApiError(400, 50008, "Cannot send messages in a non-text channel")
        st.check_access(ch, "SEND_MESSAGES_IN_THREADS" if ch["type"] in THREAD_TYPES else "SEND_MESSAGES")
        if ch["type"] in THREAD_TYPES and (ch["thread"]["locked"]):
            raise ApiError(400, 50083, "Thread is archived")
        body = ctx.json()
        if ctx.files:
            st.check_access(ch, "ATTACH_FILES")
        reference, replied = None, None
        if body.get("message_reference") is not None:
            st.check_access(ch, "READ_MESSAGE_HISTORY")
            reference, replied = st.message_reference(ch, body["message_reference"])
        p = self.message_payload(ctx, ch, body)
        if p["nonce"] is not None and body.get("enforce_nonce"):
            key = (ch["id"], ctx.app.user_id, str(p["nonce"]))
            seen = st.nonces.get(key)
            if seen is not None and now_s() - seen[1] < 300 and int(seen[0]) in st.messages:
                return self.out(ctx, st.messages[int(seen[0])])
        users, roles, everyone = st.compute_mentions(p["content"], ch, p["allowed"], replied)
        if ch["type"] in THREAD_TYPES and ch["thread"]["archived"]:
            ch["thread"]["archived"] = False
        m = st.create_message(ch, ctx.app.user_id, p["content"], p["embeds"], p["attachments"], users, roles,
                              everyone, reference, p["nonce"], tts=p["tts"], flags=p["flags"],
                              allowed_mentions=p["allowed"], source="rest")
        if p["nonce"] is not None:
            st.nonces[(ch["id"], ctx.app.user_id, str(p["nonce"]))] = (m["id"], now_s())
            while len(st.nonces) > 2000:
                st.nonces.popitem(last=False)
        return self.out(ctx, m)

    async def patch_message(self, ctx):
        st = self.st
        ch = self.ch_for_bot(ctx)
        m = st.message(ctx.params["message_id"], ch["id"])
        body = ctx.json()
        if m["webhook_id"] or m["author_id"] != ctx.app.user_id:
            if set(body) - {"flags"}:
                raise ApiError(403, 50005, "Cannot edit a message authored by another user")
            st.check_access(ch, "MANAGE_MESSAGES")
        p = self.message_payload(ctx, ch, body, require_content=False)
        content = body["content"] if "content" in body else None
        embeds = p["embeds"] if ("embeds" in body or "embed" in body) else None
        keep = None
        if "attachments" in body:
            keep = set(p["attachment_meta"])
        remaining_content = content if content is not None else m["content"]
        remaining_embeds = embeds if embeds is not None else m["embeds"]
        remaining_files = [a for a in m["attachments"] if keep is None or a["id"] in keep] + p["attachments"]
        if not remaining_content and not remaining_embeds and not remaining_files:
            raise ApiError(400, 50006, "Cannot send an empty message")
        st.edit_message(m, content, embeds, keep, p["attachments"], p["allowed"], body.get("flags"))
        return self.out(ctx, m)

    async def delete_message(self, ctx):
        st = self.st
        ch = self.ch_for_bot(ctx)
        m = st.message(ctx.params["message_id"], ch["id"])
        if m["webhook_id"] or m["author_id"] != ctx.app.user_id:
            st.check_access(ch, "MANAGE_MESSAGES")
        st.delete_message(m)
        return None

    # ------------------------------------------------------------- reactions

    async def put_reaction(self, ctx):
        ch = self.ch_for_bot(ctx, "READ_MESSAGE_HISTORY")
        m = self.st.message(ctx.params["message_id"], ch["id"])
        emoji = parse_emoji(ctx.params["emoji"])
        existing = any((r["emoji"]["id"] or r["emoji"]["name"]) == (emoji["id"] or emoji["name"]) for r in m["reactions"])
        if not existing:
            self.st.check_access(ch, "ADD_REACTIONS")
        if len(m["reactions"]) >= 20 and not existing:
            raise ApiError(400, 30010, "Maximum number of reactions reached (20)")
        self.st.react(m, ctx.app.user_id, emoji, True)
        return None

    async def delete_own_reaction(self, ctx):
        ch = self.ch_for_bot(ctx)
        m = self.st.message(ctx.params["message_id"], ch["id"])
        self.st.react(m, ctx.app.user_id, parse_emoji(ctx.params["emoji"]), False)
        return None

    async def delete_user_reaction(self, ctx):
        ch = self.ch_for_bot(ctx)
        m = self.st.message(ctx.params["message_id"], ch["id"])
        uid = ctx.params["user_id"]
        if uid != ctx.app.user_id:
            self.st.check_access(ch, "MANAGE_MESSAGES")
        self.st.react(m, uid, parse_emoji(ctx.params["emoji"]), False)
        return None

    async def get_reactions(self, ctx):
        ch = self.ch_for_bot(ctx, "READ_MESSAGE_HISTORY")
        m = self.st.message(ctx.params["message_id"], ch["id"])
        emoji = parse_emoji(ctx.params["emoji"])
        limit = self.int_param(ctx, "limit", 25, 1, 100)
        after = int(ctx.query.get("after", "0")) if is_snowflake(ctx.query.get("after", "0")) else 0
        for r in m["reactions"]:
            if (r["emoji"]["id"] or r["emoji"]["name"]) == (emoji["id"] or emoji["name"]):
                ids = sorted((u for u in r["users"] if int(u) > after), key=int)[:limit]
                return [self.st.user_json(u) for u in ids]
        return []

    async def delete_emoji_reactions(self, ctx):
        ch = self.ch_for_bot(ctx, "MANAGE_MESSAGES")
        m = self.st.message(ctx.params["message_id"], ch["id"])
        emoji = parse_emoji(ctx.params["emoji"])
        for r in list(m["reactions"]):
            if (r["emoji"]["id"] or r["emoji"]["name"]) == (emoji["id"] or emoji["name"]):
                for uid in list(r["users"]):
                    self.st.react(m, uid, r["emoji"], False)
        return None

    async def delete_all_reactions(self, ctx):
        ch = self.ch_for_bot(ctx, "MANAGE_MESSAGES")
        m = self.st.message(ctx.params["message_id"], ch["id"])
        for r in list(m["reactions"]):
            for uid in list(r["users"]):
                self.st.react(m, uid, r["emoji"], False)
        return None

    async def typing(self, ctx):
        ch = self.ch_for_bot(ctx, "SEND_MESSAGES")
        self.st.dispatch_typing(ch, ctx.app.user_id)
        return None

    # --------------------------------------------------------------- threads

    def thread_body(self, body):
        name = body.get("name")
        if not isinstance(name, str) or not (1 <= len(name) <= 100):
            raise form_error("name", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
        duration = body.get("auto_archive_duration", 1440)
        if duration not in (60, 1440, 4320, 10080):
            raise form_error("auto_archive_duration", "BASE_TYPE_CHOICES", "Value must be one of {60, 1440, 4320, 10080}.")
        return name, duration

    async def thread_from_message(self, ctx):
        st = self.st
        ch = self.ch_for_bot(ctx, "CREATE_PUBLIC_THREADS", "READ_MESSAGE_HISTORY")
        if ch["type"] not in (GUILD_TEXT, GUILD_ANNOUNCEMENT):
            raise ApiError(400, 50024, "Cannot execute action on this channel type")
        m = st.message(ctx.params["message_id"], ch["id"])
        name, duration = self.thread_body(ctx.json())
        if m["thread_id"]:
            raise ApiError(400, 160004, "A thread has already been created for this message")
        th = st.new_thread(ch, name, ctx.app.user_id, ANNOUNCEMENT_THREAD if ch["type"] == GUILD_ANNOUNCEMENT else PUBLIC_THREAD,
                           tid=m["id"], auto_archive=duration)
        m["thread_id"] = th["id"]
        m["flags"] |= FLAG_HAS_THREAD
        st.dispatch_thread_create(th)
        return st.channel_json(th)

    async def thread_without_message(self, ctx):
        st = self.st
        ch = self.ch_for_bot(ctx)
        body = ctx.json()
        ttype = body.get("type", PUBLIC_THREAD)
        if ttype not in THREAD_TYPES:
            raise form_error("type", "BASE_TYPE_CHOICES", "Value must be one of {10, 11, 12}.")
        st.check_access(ch, "CREATE_PRIVATE_THREADS" if ttype == PRIVATE_THREAD else "CREATE_PUBLIC_THREADS")
        if ch["type"] not in THREAD_PARENT_TYPES:
            raise ApiError(400, 50024, "Cannot execute action on this channel type")
        name, duration = self.thread_body(body)
        th = st.new_thread(ch, name, ctx.app.user_id, ttype, auto_archive=duration)
        st.dispatch_thread_create(th)
        if ttype != PRIVATE_THREAD and ch["type"] in (GUILD_TEXT, GUILD_ANNOUNCEMENT):
            ref = {"type": 0, "channel_id": th["id"], "guild_id": ch["guild_id"]}
            st.create_message(ch, ctx.app.user_id, name, reference=ref, mtype=MSG_THREAD_CREATED, source="system")
        return st.channel_json(th)

    async def archived_public_threads(self, ctx):
        ch = self.ch_for_bot(ctx, "READ_MESSAGE_HISTORY")
        threads = [t for t in self.st.channels.values()
                   if t["type"] in (PUBLIC_THREAD, ANNOUNCEMENT_THREAD) and t["parent_id"] == ch["id"]
                   and t["thread"]["archived"]]
        limit = self.int_param(ctx, "limit", 50, 2, 100)
        threads.sort(key=lambda t: t["thread"]["archive_timestamp"], reverse=True)
        return {"threads": [self.st.channel_json(t) for t in threads[:limit]], "members": [],
                "has_more": len(threads) > limit}

    # -------------------------------------------------------------- webhooks

    def webhook_json(self, w, with_user=True, with_token=True):
        d = {"id": w["id"], "type": 1, "guild_id": w["guild_id"], "channel_id": w["channel_id"],
             "name": w["name"], "avatar": w["avatar"], "application_id": None}
        if with_token:
            d["token"] = w["token"]
            d["url"] = "%s/api/webhooks/%s/%s" % (self.st.base, w["id"], w["token"])
        if with_user and w["user_id"]:
            d["user"] = self.st.user_json(w["user_id"])
        return d

    def webhook_for_bot(self, ctx):
        w = self.st.webhooks.get(ctx.params["webhook_id"])
        if w is None:
            raise unknown("Webhook")
        ch = self.st.channels.get(w["channel_id"])
        if ch is not None:
            self.st.check_access(ch, "MANAGE_WEBHOOKS")
        return w

    def webhook_for_token(self, ctx):
        w = self.st.webhooks.get(ctx.params["webhook_id"])
        if w is None:
            raise unknown("Webhook")
        if not secrets.compare_digest(w["token"], ctx.params["webhook_token"]):
            raise ApiError(401, 50027, "Invalid Webhook Token")
        return w

    async def get_channel_webhooks(self, ctx):
        ch = self.ch_for_bot(ctx, "MANAGE_WEBHOOKS")
        return [self.webhook_json(w) for w in self.st.webhooks.values() if w["channel_id"] == ch["id"]]

    async def create_webhook(self, ctx):
        st = self.st
        ch = self.ch_for_bot(ctx, "MANAGE_WEBHOOKS")
        if ch["type"] not in (GUILD_TEXT, GUILD_ANNOUNCEMENT, GUILD_VOICE, GUILD_FORUM, GUILD_MEDIA, GUILD_STAGE_VOICE):
            raise ApiError(400, 50024, "Cannot execute action on this channel type")
        body = ctx.json()
        validate_webhook_name("name", body.get("name"))
        avatar = parse_image_data("avatar", body.get("avatar"))
        if sum(1 for w in st.webhooks.values() if w["channel_id"] == ch["id"]) >= MAX_WEBHOOKS_PER_CHANNEL:
            raise ApiError(400, 30007, "Maximum number of webhooks reached (%d)" % MAX_WEBHOOKS_PER_CHANNEL)
        w = {"id": st.snow.next(), "guild_id": ch["guild_id"], "channel_id": ch["id"], "name": body["name"],
             "avatar": avatar, "token": secrets.token_urlsafe(51)[:68], "user_id": ctx.app.user_id}
        st.webhooks[w["id"]] = w
        return self.webhook_json(w)

    async def get_webhook(self, ctx):
        return self.webhook_json(self.webhook_for_bot(ctx))

    def apply_webhook_patch(self, w, body, allow_channel):
        if "name" in body:
            validate_webhook_name("name", body["name"])
        avatar = parse_image_data("avatar", body["avatar"]) if "avatar" in body else w["avatar"]
        channel_id = w["channel_id"]
        if allow_channel and body.get("channel_id"):
            target = self.st.channel(body["channel_id"])
            if target.get("guild_id") != w["guild_id"]:
                raise form_error("channel_id", "CHANNEL_INVALID", "Unknown channel")
            channel_id = target["id"]
        if "name" in body:
            w["name"] = body["name"]
        w["avatar"] = avatar
        w["channel_id"] = channel_id

    async def patch_webhook(self, ctx):
        w = self.webhook_for_bot(ctx)
        self.apply_webhook_patch(w, ctx.json(), True)
        return self.webhook_json(w)

    async def delete_webhook(self, ctx):
        w = self.webhook_for_bot(ctx)
        del self.st.webhooks[w["id"]]
        return None

    async def get_webhook_token(self, ctx):
        return self.webhook_json(self.webhook_for_token(ctx), with_user=False)

    async def patch_webhook_token(self, ctx):
        w = self.webhook_for_token(ctx)
        self.apply_webhook_patch(w, ctx.json(), False)
        return self.webhook_json(w, with_user=False)

    async def delete_webhook_token(self, ctx):
        w = self.webhook_for_token(ctx)
        del self.st.webhooks[w["id"]]
        return None

    def webhook_target(self, ctx, w):
        ch = self.st.channels.get(w["channel_id"])
        if ch is None:
            raise unknown("Channel")
        tid = ctx.query.get("thread_id")
        if tid is not None:
            th = self.st.channels.get(tid) if is_snowflake(tid) else None
            if th is None or th["type"] not in THREAD_TYPES or th["parent_id"] != ch["id"]:
                raise unknown("Channel")
            return th
        if ch["type"] in (GUILD_FORUM, GUILD_MEDIA):
            raise ApiError(400, 220001, "Webhooks posted to forum channels must have a thread_name or thread_id")
        return ch

    async def execute_webhook(self, ctx):
        st = self.st
        w = self.webhook_for_token(ctx)
        target = self.webhook_target(ctx, w)
        body = ctx.json()
        username = body.get("username")
        if username is not None:
            validate_webhook_name("username", username)
        avatar_url = body.get("avatar_url")
        if avatar_url is not None and (not isinstance(avatar_url, str) or not re.match(r"^https?://", avatar_url)):
            raise form_error("avatar_url", "URL_TYPE_INVALID_URL", "Not a well formed URL.")
        p = self.message_payload(ctx, target, body)
        users, roles, everyone = st.compute_mentions(p["content"], target, p["allowed"], None)
        if target["type"] in THREAD_TYPES and target["thread"]["archived"]:
            target["thread"]["archived"] = False
        m = st.create_message(target, None, p["content"], p["embeds"], p["attachments"], users, roles, everyone,
                              None, p["nonce"], webhook=w, webhook_username=username,
                              webhook_avatar_url=avatar_url, source="webhook", tts=p["tts"], flags=p["flags"],
                              allowed_mentions=p["allowed"])
        if truthy(ctx.query.get("wait", "false")):
            return st.msg_json(m, None)
        return None

    def webhook_message(self, ctx, w):
        target = self.webhook_target(ctx, w)
        m = self.st.messages.get(int(ctx.params["message_id"])) if is_snowflake(ctx.params["message_id"]) else None
        if m is None or m["deleted"] or m["webhook_id"] != w["id"] or m["channel_id"] != target["id"]:
            raise unknown("Message")
        return m

    async def get_webhook_message(self, ctx):
        w = self.webhook_for_token(ctx)
        return self.st.msg_json(self.webhook_message(ctx, w), None)

    async def patch_webhook_message(self, ctx):
        w = self.webhook_for_token(ctx)
        m = self.webhook_message(ctx, w)
        ch = self.st.channels[m["channel_id"]]
        body = ctx.json()
        p = self.message_payload(ctx, ch, body, require_content=False)
        content = body["content"] if "content" in body else None
        embeds = p["embeds"] if ("embeds" in body or "embed" in body) else None
        keep = set(p["attachment_meta"]) if "attachments" in body else None
        self.st.edit_message(m, content, embeds, keep, p["attachments"], p["allowed"], body.get("flags"))
        return self.st.msg_json(m, None)

    async def delete_webhook_message(self, ctx):
        w = self.webhook_for_token(ctx)
        self.st.delete_message(self.webhook_message(ctx, w))
        return None


# ========================================================================= gateway


class Gateway:
    def __init__(self, state):
        self.st = state

    async def handle(self, request, kind):
        st = self.st
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.json_response({"message": "this is the gateway: connect with a websocket",
                                      "code": 0}, status=400)
        now = now_s()
        if st.outage_until > now:
            st.counters["refused_connections"] += 1
            log.info("gateway: refusing a connection (outage for %.1fs more)", st.outage_until - now)
            return web.Response(status=503, text="Service Unavailable")
        ws = web.WebSocketResponse(autoping=True, heartbeat=None, max_msg_size=16 * 1024 * 1024, compress=False,
                                   timeout=2.0)
        transport = request.transport
        await ws.prepare(request)
        interval = int(st.cfg.heartbeat_interval)
        conn = GatewayConn(st, ws, transport, kind, interval)
        st.conns.add(conn)
        st.counters["connection_count"] += 1
        log.info("gateway connection %d opened at %s (%s)", conn.id, request.path_qs, kind)
        writer = asyncio.ensure_future(conn.writer())
        watchdog = asyncio.ensure_future(conn.watchdog())
        version = request.query.get("v")
        encoding = request.query.get("encoding", "json")
        if version is not None and version != "10":
            conn.close(4012, "Invalid API version.")
        elif encoding != "json":
            conn.close(4002, "Error while decoding payload.")
        else:
            conn.send_obj({"op": 10, "d": {"heartbeat_interval": interval}, "s": None, "t": None})
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self.receive(conn, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    try:
                        self.receive(conn, msg.data.decode("utf-8"))
                    except UnicodeDecodeError:
                        conn.close(4002, "Error while decoding payload.")
                elif msg.type == WSMsgType.ERROR:
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            was_open = conn.open
            conn.open = False
            watchdog.cancel()
            try:
                conn.queue.put_nowait(("stop",))
            except asyncio.QueueFull:
                pass
            try:
                await asyncio.wait_for(writer, 2)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                writer.cancel()
            self.closed(conn, ws.close_code, was_open)
        return ws

    def closed(self, conn, code, client_initiated):
        st = self.st
        st.conns.discard(conn)
        s = conn.session
        log.info("gateway connection %d closed (code %s, %s)", conn.id, code,
                 "by the client" if client_initiated and conn.server_close is None else "by the server")
        if s is not None and s.conn is conn:
            s.detach()
            if conn.server_close is None and code in (1000, 1001):
                # Closing with 1000 or 1001 ends the session (Discord documents this).
                s.invalid = "client closed with %d" % code
                s.log.clear()

    def receive(self, conn, text):
        now = time.monotonic()
        conn.recv_times.append(now)
        while conn.recv_times and now - conn.recv_times[0] > 60:
            conn.recv_times.popleft()
        if len(conn.recv_times) > GATEWAY_SEND_LIMIT:
            conn.close(4008, "Rate limited.")
            return
        try:
            payload = json.loads(text)
            if not isinstance(payload, dict):
                raise ValueError("not an object")
            op = payload.get("op")
            data = payload.get("d")
        except ValueError:
            conn.close(4002, "Error while decoding payload.")
            return
        if op == 1:
            conn.last_heartbeat = now
            conn.heartbeats += 1
            if not conn.stop_acks:
                conn.send_obj({"op": 11})
        elif op == 2:
            self.identify(conn, data)
        elif op == 6:
            self.resume(conn, data)
        elif op in (3, 4, 8):
            if conn.session is None:
                conn.close(4003, "Not authenticated.")
            elif op == 8:
                self.request_members(conn, data)
        else:
            conn.close(4001, "Unknown opcode.")

    @staticmethod
    def token_of(data):
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str):
            return None
        return token[4:] if token.startswith("Bot ") else token

    def identify(self, conn, data):
        st = self.st
        if conn.session is not None:
            conn.close(4005, "Already authenticated.")
            return
        if not isinstance(data, dict):
            conn.close(4002, "Error while decoding payload.")
            return
        app = st.apps.get(self.token_of(data) or "")
        if app is None:
            conn.close(4004, "Authentication failed.")
            return
        intents = data.get("intents")
        if isinstance(intents, bool) or not isinstance(intents, int) or intents < 0 or intents & ~ALL_INTENTS:
            conn.close(4013, "Invalid intent(s).")
            return
        for name in PRIVILEGED_INTENTS:
            if intents & INTENTS[name] and name not in app.privileged:
                conn.close(4014, "Disallowed intent(s).")
                return
        shard = data.get("shard") or [0, 1]
        if (not isinstance(shard, list) or len(shard) != 2 or not all(isinstance(x, int) for x in shard)
                or shard[1] < 1 or not 0 <= shard[0] < shard[1]):
            conn.close(4010, "Invalid shard.")
            return
        s = Session(app, intents, list(shard))
        s.large_threshold = data.get("large_threshold", 50)
        st.sessions[s.id] = s
        st.counters["identify_count"] += 1
        s.conn = conn
        conn.session = s
        guilds = [g for g in st.guilds.values()
                  if shard[1] == 1 or (int(g["id"]) >> 22) % shard[1] == shard[0]]
        s.push("READY", {
            "v": 10,
            "user": st.current_user_json(app),
            "guilds": [{"id": g["id"], "unavailable": True} for g in guilds],
            "session_id": s.id,
            "resume_gateway_url": st.ws_base + "/resume-gateway",
            "shard": list(shard),
            "application": {"id": app.application_id, "flags": app.flags()},
        })
        if intents & INTENTS["GUILDS"]:
            for g in guilds:
                s.push("GUILD_CREATE", st.guild_create_json(g, s))
        log.info("gateway connection %d identified: session %s, intents %d", conn.id, s.id, intents)
        st.gc_sessions()

    def resume(self, conn, data):
        st = self.st
        if conn.session is not None:
            conn.close(4005, "Already authenticated.")
            return
        if not isinstance(data, dict):
            conn.close(4002, "Error while decoding payload.")
            return
        app = st.apps.get(self.token_of(data) or "")
        if app is None:
            conn.close(4004, "Authentication failed.")
            return
        s = st.sessions.get(str(data.get("session_id")))
        seq = data.get("seq")
        if seq is None:
            seq = 0
        reason = None
        if conn.kind != "resume":
            reason = "resume at the connect URL, not the session's resume_gateway_url"
        elif s is None:
            reason = "unknown session"
        elif s.app is not app:
            reason = "session of another application"
        elif s.invalid is not None:
            reason = s.invalid
        elif s.expired(st.cfg.resume_window):
            reason = "resume window elapsed"
            s.invalid = reason
            s.log.clear()
        elif not isinstance(seq, int) or isinstance(seq, bool):
            reason = "bad seq"
        elif seq > s.seq:
            conn.close(4007, "Invalid seq.")
            return
        elif s.log and seq < s.log[0][0] - 1:
            reason = "events since that seq are no longer kept"
        elif not s.log and seq < s.seq:
            reason = "events since that seq are no longer kept"
        if reason is not None:
            log.info("gateway connection %d: RESUME refused (%s)", conn.id, reason)
            st.counters["invalid_session_count"] += 1
            conn.send_obj({"op": 9, "d": False})
            return
        if s.conn is not None and s.conn is not conn:
            old = s.conn
            s.detach()
            old.close(4000, "Session resumed elsewhere.")
        s.conn = conn
        conn.session = s
        s.disconnected_at = None
        s.resumed += 1
        s.connections += 1
        st.counters["resume_count"] += 1
        replayed = 0
        for sq, payload in list(s.log):
            if sq > seq:
                conn.send_raw(payload)
                replayed += 1
        s.push("RESUMED", {})
        log.info("gateway connection %d resumed session %s from seq %d (%d replayed)", conn.id, s.id, seq, replayed)

    def request_members(self, conn, data):
        st = self.st
        s = conn.session
        if not isinstance(data, dict):
            conn.close(4002, "Error while decoding payload.")
            return
        g = st.guilds.get(str(data.get("guild_id")))
        if g is None:
            return
        query = data.get("query")
        user_ids = data.get("user_ids")
        if (query == "" or query is None) and not user_ids and not s.intents & INTENTS["GUILD_MEMBERS"]:
            conn.close(4013, "Invalid intent(s).")
            return
        limit = data.get("limit") or 0
        if user_ids:
            if isinstance(user_ids, (str, int)):
                user_ids = [user_ids]
            found = [str(u) for u in user_ids if str(u) in g["members"]]
            not_found = [str(u) for u in user_ids if str(u) not in g["members"]]
        else:
            q = (query or "").lower()
            found = [u for u in g["members"] if st.users.get(u, {}).get("username", "").lower().startswith(q)
                     or (g["members"][u]["nick"] or "").lower().startswith(q)]
            not_found = []
            if limit:
                found = found[:limit]
        chunk = {"guild_id": g["id"], "members": [st.member_json(g, u) for u in found],
                 "chunk_index": 0, "chunk_count": 1}
        if not_found:
            chunk["not_found"] = not_found
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        s.push("GUILD_MEMBERS_CHUNK", chunk)

    # ----------------------------------------------------------------- faults

    def fault(self, body):
        st = self.st
        kind = body.get("kind")
        conns = list(st.conns)
        if kind == "reconnect":
            close_after = float(body.get("close_after", 5))
            for c in conns:
                c.send_obj({"op": 7, "d": None})
                if close_after >= 0:
                    asyncio.get_running_loop().call_later(close_after, c.close, 4000, "Reconnect requested.")
            return {"connections": len(conns)}
        if kind == "invalid_session":
            resumable = bool(body.get("resumable", False))
            for c in conns:
                c.send_obj({"op": 9, "d": resumable})
                s = c.session
                if s is not None:
                    s.detach()
                    if not resumable:
                        s.invalid = "invalidated by the server"
                        s.log.clear()
            st.counters["invalid_session_count"] += len(conns)
            return {"connections": len(conns)}
        if kind == "drop":
            for c in conns:
                c.abort()
            return {"connections": len(conns)}
        if kind == "stop_acks":
            keep_dispatch = bool(body.get("dispatch", False))
            for c in conns:
                c.stop_acks = True
                c.zombie = not keep_dispatch
            return {"connections": len(conns)}
        if kind in ("heartbeat", "request_heartbeat"):
            for c in conns:
                c.send_obj({"op": 1, "d": None})
            return {"connections": len(conns)}
        if kind == "outage":
            st.outage_until = now_s() + float(body.get("secs", 5))
            if body.get("drop_existing", True):
                for c in conns:
                    c.abort()
            return {"until": st.outage_until}
        if kind == "ratelimit":
            route = body.get("route")
            st.rl_faults.insert(0, {"route": normalize_route(route) if route else None,
                                    "calls": int(body.get("calls", 1)), "per_secs": float(body.get("per_secs", 1)),
                                    "scope": body.get("scope", "user") if body.get("scope") in ("user", "shared") else "user",
                                    "buckets": {}})
            return {"ratelimits": len(st.rl_faults)}
        if kind == "global_ratelimit":
            st.global_until = now_s() + float(body.get("secs", 1))
            return {"until": st.global_until}
        if kind == "http":
            prefix = str(body.get("path_prefix", "/"))
            if prefix.startswith("/api/v10/"):
                prefix = prefix[len("/api/v10"):]
            st.http_faults.append({"method": (body.get("method") or "").upper() or None, "path_prefix": prefix,
                                   "status": int(body.get("status", 500)), "count": int(body.get("count", 1)),
                                   "code": body.get("code", 0), "message": body.get("message")})
            return {"http_faults": len(st.http_faults)}
        if kind == "clear":
            st.rl_faults = []
            st.http_faults = []
            st.global_until = 0.0
            st.outage_until = 0.0
            return {}
        raise ApiError(400, 0, "unknown fault kind %r" % kind)


# ========================================================================= control


class Control:
    def __init__(self, state, gateway):
        self.st = state
        self.gw = gateway

    async def entry(self, request):
        name = request.match_info["name"]
        handler = getattr(self, "%s_%s" % (request.method.lower(), name), None)
        if handler is None:
            return web.json_response({"error": "no control endpoint %s %s" % (request.method, name)}, status=404)
        body = {}
        if request.method in ("POST", "PUT", "PATCH"):
            try:
                raw = await request.read()
                body = json.loads(raw.decode("utf-8")) if raw.strip() else {}
            except ValueError as err:
                return web.json_response({"error": "invalid JSON: %s" % err}, status=400)
        try:
            result = handler(body, request)
        except ApiError as err:
            return web.json_response({"error": err.message, "code": err.code, "errors": err.errors},
                                     status=err.status if err.status != 401 else 400)
        except (KeyError, TypeError, ValueError) as err:
            return web.json_response({"error": "%s: %s" % (type(err).__name__, err)}, status=400)
        return web.Response(text=dumps(result if result is not None else {}), content_type="application/json")

    def author(self, body, key="author"):
        if key not in body:
            raise ApiError(400, 0, "%s is required" % key)
        return self.st.norm_user(body[key])

    # ---------------------------------------------------------------- set-up

    def post_app(self, body, request):
        st = self.st
        token = body["token"]
        uid = st.norm_user(body["bot_user"], bot=True)
        privileged = body.get("privileged_intents", [])
        for name in privileged:
            if name not in PRIVILEGED_INTENTS:
                raise ApiError(400, 0, "unknown privileged intent %r" % name)
        old = st.apps.get(token)
        if old is not None:
            st.apps_by_user.pop(old.user_id, None)
        app = App(token, uid, str(body.get("application_id") or uid), privileged)
        st.apps[token] = app
        st.apps_by_user[uid] = app
        st.ensure_bots_in_guilds()
        return app.as_dict()

    def post_guild(self, body, request):
        st = self.st
        gid = str(body["id"])
        if not is_snowflake(gid):
            raise ApiError(400, 0, "guild id must be a snowflake")
        old = st.guilds.get(gid)
        g = {"id": gid, "name": str(body.get("name", "guild")), "owner_id": None, "roles": OrderedDict(),
             "members": OrderedDict(), "channel_ids": [], "joined_at": old["joined_at"] if old else now_s(),
             "deny": set(body.get("deny", [])), "access": bool(body.get("access", True))}
        if old:
            for cid in old["channel_ids"]:
                ch = st.channels.get(cid)
                if ch is not None and ch["type"] in THREAD_TYPES:
                    g["channel_ids"].append(cid)
        st.guilds[gid] = g
        g["roles"][gid] = {"id": gid, "name": "@everyone", "color": 0, "hoist": False, "position": 0,
                           "permissions": DEFAULT_EVERYONE_PERMISSIONS, "managed": False, "mentionable": False}
        for i, r in enumerate(body.get("roles", [])):
            rid = str(r["id"])
            perms = r.get("permissions", DEFAULT_EVERYONE_PERMISSIONS)
            g["roles"][rid] = {"id": rid, "name": str(r.get("name", "role")), "color": int(r.get("color", 0)),
                               "hoist": bool(r.get("hoist", False)), "position": int(r.get("position", i + 1)),
                               "permissions": int(perms), "managed": bool(r.get("managed", False)),
                               "mentionable": bool(r.get("mentionable", False))}
        for i, c in enumerate(body.get("channels", [])):
            cid = str(c["id"])
            ch = st.new_channel(cid, int(c.get("type", GUILD_TEXT)), gid, str(c.get("name", "channel")),
                                str(c["parent_id"]) if c.get("parent_id") else None, c.get("topic"),
                                int(c.get("position", i)))
            ch["deny"] = set(c.get("deny", []))
            ch["access"] = bool(c.get("access", True))
            if cid not in g["channel_ids"]:
                g["channel_ids"].append(cid)
        for mem in body.get("members", []):
            uid = st.norm_user(mem["user"])
            st.add_guild_member(g, uid, mem.get("nick"), mem.get("roles", []))
        st.ensure_bots_in_guilds()
        owner = body.get("owner_id")
        g["owner_id"] = str(owner) if owner else (next(iter(g["members"]), None) or "0")
        if g["owner_id"] in st.users and g["owner_id"] not in g["members"]:
            st.add_guild_member(g, g["owner_id"])

        st.dispatch("GUILD_CREATE", lambda s: st.guild_create_json(g, s), INTENTS["GUILDS"], gid)
        return st.guild_json(g)

    def post_channel(self, body, request):
        st = self.st
        g = st.guild(body["guild_id"])
        cid = str(body.get("id") or st.snow.next())
        ch = st.new_channel(cid, int(body.get("type", GUILD_TEXT)), g["id"], str(body.get("name", "channel")),
                            str(body["parent_id"]) if body.get("parent_id") else None, body.get("topic"),
                            int(body.get("position", len(g["channel_ids"]))))
        ch["deny"] = set(body.get("deny", []))
        data = st.channel_json(ch)
        st.dispatch("CHANNEL_CREATE", lambda s: data, INTENTS["GUILDS"], g["id"])
        return data

    def post_dm(self, body, request):
        st = self.st
        uid = st.norm_user(body["recipient"])
        cid = str(body.get("id") or st.snow.next())
        ch = st.new_channel(cid, DM)
        ch["recipients"] = [uid]
        if body.get("bot_user_id"):
            ch["owner_app"] = str(body["bot_user_id"])
        return st.channel_json(ch)

    def post_member(self, body, request):
        st = self.st
        g = st.guild(body["guild_id"])
        uid = st.norm_user(body["user"])
        existed = uid in g["members"]
        st.add_guild_member(g, uid, body.get("nick"), body.get("roles", []))
        if existed:
            mj = st.member_json(g, uid)
            mj["guild_id"] = g["id"]
            st.dispatch("GUILD_MEMBER_UPDATE", lambda s: mj, INTENTS["GUILD_MEMBERS"], g["id"])
        else:
            mj = st.member_json(g, uid)
            mj["guild_id"] = g["id"]
            st.dispatch("GUILD_MEMBER_ADD", lambda s: mj, INTENTS["GUILD_MEMBERS"], g["id"])
        return mj

    def post_permissions(self, body, request):
        st = self.st
        target = st.channel(body["channel_id"]) if body.get("channel_id") else st.guild(body["guild_id"])
        if "deny" in body:
            unknown_perms = [p for p in body["deny"] if p not in PERMISSIONS]
            if unknown_perms:
                raise ApiError(400, 0, "unknown permissions %s" % unknown_perms)
            target["deny"] = set(body["deny"])
        if "access" in body:
            target["access"] = bool(body["access"])
        return {"deny": sorted(target["deny"]), "access": target.get("access", True)}

    def post_thread(self, body, request):
        st = self.st
        parent = st.channel(body["channel_id"])
        if parent["type"] not in THREAD_PARENT_TYPES:
            raise ApiError(400, 50024, "Cannot execute action on this channel type")
        owner = st.norm_user(body["owner"]) if body.get("owner") else (
            next(iter(st.guilds[parent["guild_id"]]["members"]), None) or "0")
        tid = None
        m = None
        if body.get("message_id"):
            m = st.message(body["message_id"], parent["id"])
            if m["thread_id"]:
                raise ApiError(400, 160004, "A thread has already been created for this message")
            tid = m["id"]
        th = st.new_thread(parent, str(body.get("name", "thread")), owner, int(body.get("type", PUBLIC_THREAD)),
                           tid=tid, archived=body.get("archived", False))
        if m is not None:
            m["thread_id"] = th["id"]
            m["flags"] |= FLAG_HAS_THREAD
        st.dispatch_thread_create(th)
        return st.channel_json(th)

    # -------------------------------------------------------------- activity

    def control_message(self, body, content, author):
        st = self.st
        ch = st.channel(body["channel_id"])
        if ch["type"] not in TEXT_TYPES:
            raise ApiError(400, 50008, "Cannot send messages in a non-text channel")
        reference, replied = None, None
        if body.get("message_reference"):
            reference, replied = st.message_reference(ch, body["message_reference"])
        users, roles, everyone = st.compute_mentions(content, ch, None, replied)
        for u in body.get("mentions") or []:
            uid = st.norm_user(u)
            if uid not in users:
                users.append(uid)
        for r in body.get("mention_roles") or []:
            if str(r) not in roles:
                roles.append(str(r))
        if body.get("mention_everyone") is not None:
            everyone = bool(body["mention_everyone"])
        attachments = []
        for a in body.get("attachments") or []:
            data = base64.b64decode(a.get("bytes_b64", ""))
            attachments.append(st.store_attachment(ch["id"], a.get("filename", "file"), data,
                                                   a.get("content_type"), a.get("description")))
        embeds = body.get("embeds") or []
        if ch["type"] in THREAD_TYPES and ch["thread"]["archived"]:
            ch["thread"]["archived"] = False
        m = st.create_message(ch, author, content, embeds, attachments, users, roles, everyone, reference,
                              body.get("nonce"), source="control")
        return st.msg_json(m, None, control=True)

    def post_message(self, body, request):
        return self.control_message(body, str(body.get("content", "")), self.author(body))

    def post_messages(self, body, request):
        author = self.author(body)
        return [self.control_message(body, str(c), author) for c in body.get("contents", [])]

    def find_message(self, body):
        return self.st.message(body["message_id"], body.get("channel_id"))

    def post_edit(self, body, request):
        st = self.st
        m = self.find_message(body)
        embeds = body.get("embeds")
        st.edit_message(m, body.get("content"), embeds)
        return st.msg_json(m, None, control=True)

    def post_delete(self, body, request):
        m = self.find_message(body)
        self.st.delete_message(m)
        return self.st.msg_json(m, None, control=True)

    def post_reaction(self, body, request):
        st = self.st
        m = self.find_message(body)
        uid = st.norm_user(body["user"])
        emoji = control_emoji(body["emoji"])
        action = body.get("action", "add")
        if action not in ("add", "remove"):
            raise ApiError(400, 0, "action is add or remove")
        changed = st.react(m, uid, emoji, action == "add")
        out = st.msg_json(m, None, control=True)
        out["changed"] = changed
        return out

    def post_typing(self, body, request):
        st = self.st
        ch = st.channel(body["channel_id"])
        uid = st.norm_user(body["user"])
        st.dispatch_typing(ch, uid)
        return {}

    def post_link_preview(self, body, request):
        st = self.st
        m = self.find_message(body)
        embeds = body.get("embeds")
        if embeds is None:
            url = body.get("url")
            if not url:
                found = URL_RE.findall(m["content"])
                if not found:
                    raise ApiError(400, 0, "the message has no URL; give url or embeds")
                url = found[0]
            embed = {"type": "article" if body.get("description") else "link", "url": url,
                     "title": body.get("title", url), "content_scan_version": 0}
            if body.get("description"):
                embed["description"] = body["description"]
            host = urllib.parse.urlparse(url).hostname
            if host:
                embed["provider"] = {"name": host}
            embeds = m["embeds"] + [embed]
        st.edit_message(m, embeds=embeds, link_preview=True)
        return st.msg_json(m, None, control=True)

    # -------------------------------------------------------------- read back

    def get_messages(self, body, request):
        st = self.st
        cid = request.query.get("channel_id")
        if cid is None:
            raise ApiError(400, 0, "channel_id is required")
        st.channel(cid)
        return [st.msg_json(st.messages[i], None, control=True) for i in st.channel_msgs.get(cid, ())
                if i in st.messages]

    def get_webhooks(self, body, request):
        cid = request.query.get("channel_id")
        rest = request.app["rest"]
        return [rest.webhook_json(w) for w in self.st.webhooks.values() if cid is None or w["channel_id"] == cid]

    def get_calls(self, body, request):
        method = request.query.get("method")
        prefix = request.query.get("path_prefix")
        out = []
        for c in self.st.calls:
            if method and c["method"] != method.upper():
                continue
            if prefix and not (c["path"].startswith(prefix) or c["path"].startswith("/api/v10" + prefix)):
                continue
            out.append(c)
        return out

    def delete_calls(self, body, request):
        self.st.calls.clear()
        return {}

    def get_sessions(self, body, request):
        st = self.st
        window = st.cfg.resume_window
        out = dict(st.counters)
        out["sessions"] = [s.as_dict(window) for s in st.sessions.values()]
        out["open_connections"] = [{"id": c.id, "kind": c.kind, "session_id": c.session.id if c.session else None,
                                    "heartbeats": c.heartbeats, "stop_acks": c.stop_acks}
                                   for c in st.conns]
        return out

    def post_fault(self, body, request):
        return self.gw.fault(body)

    def delete_fault(self, body, request):
        return self.gw.fault({"kind": "clear"})

    def post_config(self, body, request):
        cfg = self.st.cfg
        for key, value in body.items():
            if not hasattr(cfg, key):
                raise ApiError(400, 0, "unknown setting %r" % key)
            setattr(cfg, key, type(getattr(cfg, key))(value))
        # Route buckets start over with the new limits.
        self.st.buckets = {}
        return cfg.as_dict()

    def get_config(self, body, request):
        return self.st.cfg.as_dict()

    def post_reset(self, body, request):
        self.st.reset()
        return {}

    def get_state(self, body, request):
        st = self.st
        return {"apps": [a.as_dict() for a in st.apps.values()],
                "guilds": [st.guild_json(g) for g in st.guilds.values()],
                "channels": [st.channel_json(c) for c in st.channels.values()],
                "users": list(st.users.values())}


# ============================================================================ CDN


async def cdn_attachment(request):
    st = request.app["state"]
    a = st.attachments.get(request.match_info["aid"])
    ok = a is not None and a["channel_id"] == request.match_info["cid"] and a["filename"] == request.match_info["filename"]
    status = 200 if ok else 404
    st.calls.append({"time": now_s(), "method": request.method, "path": request.path, "query": dict(request.query),
                     "route": "GET /attachments/{}/{}/{}", "status": status, "body": None, "response": None})
    if not ok:
        return web.Response(status=404, text="This content is no longer available.")
    return web.Response(body=a["data"], content_type=a["content_type"].split(";")[0],
                        headers={"Content-Disposition": 'inline; filename="%s"' % a["filename"]})


async def cdn_avatar(request):
    return web.Response(body=TINY_PNG, content_type="image/png")


async def root(request):
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await request.app["gateway"].handle(request, "main")
    return web.json_response({"emulator": "discord", "api": "/api/v10", "gateway": "/gateway"})


def build_app(cfg):
    state = State(cfg)
    rest = Rest(state)
    gateway = Gateway(state)
    control = Control(state, gateway)
    app = web.Application(client_max_size=HARD_BODY_LIMIT)
    app["state"] = state
    app["rest"] = rest
    app["gateway"] = gateway
    app.router.add_route("*", "/_control/{name}", control.entry)
    app.router.add_get("/gateway", lambda r: gateway.handle(r, "main"))
    app.router.add_get("/gateway/", lambda r: gateway.handle(r, "main"))
    app.router.add_get("/resume-gateway", lambda r: gateway.handle(r, "resume"))
    app.router.add_get("/resume-gateway/", lambda r: gateway.handle(r, "resume"))
    app.router.add_get("/attachments/{cid}/{aid}/{filename}", cdn_attachment)
    app.router.add_get("/avatars/{uid}/{file}", cdn_avatar)
    app.router.add_get("/embed/avatars/{file}", cdn_avatar)
    app.router.add_route("*", "/api/{tail:.*}", rest.entry)
    app.router.add_get("/", root)

    async def gc_loop(app_):
        async def loop():
            while True:
                await asyncio.sleep(1)
                state.gc_sessions()
        task = asyncio.ensure_future(loop())
        yield
        task.cancel()

    app.cleanup_ctx.append(gc_loop)
    return app


async def serve(args):
    cfg = Config(args)
    app = build_app(cfg)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    port = sock.getsockname()[1]
    state = app["state"]
    state.base = "http://127.0.0.1:%d" % port
    state.ws_base = "ws://127.0.0.1:%d" % port
    site = web.SockSite(runner, sock, shutdown_timeout=1.0)
    await site.start()
    print("listening on 127.0.0.1:%d" % port, flush=True)
    log.info("Discord API emulator on %s (gateway %s/gateway)", state.base, state.ws_base)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:
            pass
    await stop.wait()
    for conn in list(state.conns):
        conn.abort()
    await runner.cleanup()


def main():
    parser = argparse.ArgumentParser(description="Discord API emulator (REST, gateway, CDN, control API)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--heartbeat-interval", type=int, default=41250, help="HELLO heartbeat_interval, ms")
    parser.add_argument("--resume-window", type=float, default=60.0,
                        help="seconds a disconnected session stays resumable")
    parser.add_argument("--upload-limit", type=int, default=10 * 1024 * 1024, help="bytes of attachments per message")
    parser.add_argument("--bucket-limit", type=int, default=50, help="requests per route bucket and window")
    parser.add_argument("--bucket-window", type=float, default=1.0, help="route bucket window, seconds")
    parser.add_argument("--heartbeat-timeout-factor", type=float, default=1.5,
                        help="close (4009) a connection that sent no heartbeat for this many intervals + 1 s; 0: never")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s discord-emulator %(levelname)s %(message)s")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
