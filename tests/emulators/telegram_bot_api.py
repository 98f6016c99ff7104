#!/usr/bin/env python3
"""Telegram Bot API emulator for the Telegram bridge tests.

This is an in-memory HTTP server that behaves like the Telegram Bot API
(https://core.telegram.org/bots/api) for the subset of it that the bridge
uses. It was written from the Bot API documentation, with the error
descriptions Telegram really returns (clients such as teloxide map errors by
their exact text). The bridge reaches it only through its `api_url` setting,
exactly as it would reach https://api.telegram.org.

Start it with

    python3 tests/emulators/telegram_bot_api.py --port 0

It binds 127.0.0.1 only, prints one line `listening on 127.0.0.1:PORT` on
stdout once it accepts connections, and logs every request on stderr.

Three kinds of paths are served:

* `/bot<token>/<method>`: the Bot API. Method names match case-insensitively
  (teloxide sends `SendMessage`), GET and POST both work, and parameters come
  from the query string and from an `application/json`,
  `application/x-www-form-urlencoded` or `multipart/form-data` body. In form
  and multipart bodies, JSON-valued parameters (entities, reply_parameters,
  media, allowed_updates, reaction, ...) are JSON strings. Files are uploaded
  as multipart parts, either under the parameter's own name or referenced as
  `attach://<part name>`; a `file_id` reuses a stored file; HTTP URLs are
  refused with Telegram's "failed to get HTTP URL content" (the emulator never
  reaches the network).
* `/file/bot<token>/<file_path>`: file downloads, with `/` in the path either
  literal or percent-encoded as `%2F`.
* `/_control/...`: the control API the tests use to set the world up (bots,
  chats, users' messages, reactions, migrations, rate limits, injected faults)
  and to inspect what the bots did. See the `Control` section below and the
  handlers' docstrings.

Behaviour worth knowing when writing tests:

* Updates are queued per bot and filtered when they are created, by the
  bot's `allowed_updates` at that moment (as documented: the parameter does
  not affect updates created before the call). The default set excludes
  `chat_member`, `message_reaction` and `message_reaction_count`.
* A getUpdates call arriving while an earlier one of the same bot is still
  waiting makes the earlier one fail with 409 "Conflict: terminated by other
  getUpdates request; ...", as Telegram does.
* Privacy mode: a bot with `can_read_all_group_messages` false that is not
  an administrator only gets commands (`/cmd`, or `/cmd@its_name`), messages
  mentioning it, replies to its own messages, and service messages. Bots never
  receive messages sent by bots.
* In forum supergroups, a message in a topic that replies to nothing carries
  `reply_to_message` = the topic's `forum_topic_created` service message, as
  Telegram does. In non-forum supergroups a reply carries the
  `message_thread_id` of its reply thread.
* Entities are kept exactly as given (offsets and lengths in UTF-16 code
  units). The emulator is stricter than Telegram here, to catch bridge bugs:
  an entity that reaches past the end of the text, or starts or ends inside a
  surrogate pair, is refused with "Bad Request: can't parse entities: ...".
* `parse_mode` is recorded but not rendered: the text is stored as sent.
* Photos must be real PNG, JPEG, GIF, WebP or BMP images (the header is read
  for the dimensions); anything else fails with IMAGE_PROCESS_FAILED. Every
  photo is stored with several PhotoSize entries; all of them serve the bytes
  that were uploaded (the emulator does not resize images).
* Each bot sees its own `file_id`s; using another bot's `file_id` fails as
  on Telegram. `file_unique_id` is shared.
* Limits: uploads above 50 MiB fail with 413, photos above 10 MiB and
  getFile on files above 20 MiB fail as on Telegram. Queues and logs are
  bounded (see the constants below).
"""

import argparse
import asyncio
import base64
import hashlib
import json
import math
import mimetypes
import os
import random
import re
import secrets
import signal
import struct
import sys
import time
from collections import deque
from urllib.parse import parse_qsl, unquote

from aiohttp import hdrs, web
from aiohttp.multipart import MultipartReader, parse_content_disposition

# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------

MiB = 1024 * 1024
MAX_UPLOAD_BYTES = 50 * MiB  # a bot's multipart upload (Telegram's cloud limit)
MAX_REQUEST_BYTES = 52 * MiB  # a whole Bot API request body
MAX_CONTROL_BYTES = 128 * MiB  # a control API request (base64 files inside JSON)
MAX_PHOTO_BYTES = 10 * MiB  # Telegram refuses larger photos
MAX_DOWNLOAD_BYTES = 20 * MiB  # getFile refuses larger files
MAX_PENDING_UPDATES = 100_000  # per bot; the oldest are dropped beyond that
MAX_MESSAGES_PER_CHAT = 200_000  # the oldest are forgotten beyond that
MAX_CALLS_LOGGED = 100_000
MAX_LONG_POLL_SECS = 24 * 3600
MAX_TEXT_LENGTH = 4096
MAX_CAPTION_LENGTH = 1024
BOT_DELETE_WINDOW_SECS = 48 * 3600

# Descriptions clients match on.
CONFLICT_DESCRIPTION = (
    "Conflict: terminated by other getUpdates request; "
    "make sure that only one bot instance is running"
)
NOT_MODIFIED_DESCRIPTION = (
    "Bad Request: message is not modified: specified new message content and "
    "reply markup are exactly the same as a current content and reply markup "
    "of the message"
)
MIGRATED_DESCRIPTION = "Bad Request: group chat was upgraded to a supergroup chat"

# Update types a bot receives when allowed_updates is empty or was never set.
DEFAULT_EXCLUDED_UPDATES = {"chat_member", "message_reaction", "message_reaction_count"}

# The emoji a bot may react with (ReactionTypeEmoji in the Bot API docs).
REACTION_EMOJI = set(
    "❤ 👍 👎 🔥 🥰 👏 😁 🤔 🤯 😱 🤬 😢 🎉 🤩 🤮 💩 🙏 👌 🕊 🤡 🥱 🥴 😍 🐳 "
    "❤\u200d🔥 🌚 🌭 💯 🤣 ⚡ 🍌 🏆 💔 🤨 😐 🍓 🍾 💋 🖕 😈 😴 😭 🤓 👻 "
    "👨\u200d💻 👀 🎃 🙈 😇 😨 🤝 ✍ 🤗 🫡 🎅 🎄 ☃ 💅 🤪 🗿 🆒 💘 🙉 🦄 😘 💊 🙊 😎 "
    "👾 🤷\u200d♂ 🤷 🤷\u200d♀ 😡".split()
)

CHAT_ACTIONS = {
    "typing", "upload_photo", "record_video", "upload_video", "record_voice",
    "upload_voice", "upload_document", "choose_sticker", "find_location",
    "record_video_note", "upload_video_note",
}

ENTITY_TYPES = {
    "mention", "hashtag", "cashtag", "bot_command", "url", "email",
    "phone_number", "bold", "italic", "underline", "strikethrough", "spoiler",
    "blockquote", "expandable_blockquote", "code", "pre", "text_link",
    "text_mention", "custom_emoji", "date_time",
}

# Users Telegram itself posts as: their messages still reach bots.
SERVICE_USER_IDS = {777000, 1087968824, 136817688}
TELEGRAM_USER = {"id": 777000, "is_bot": False, "first_name": "Telegram"}

# Rights an administrator bot gets unless the chat says otherwise.
DEFAULT_ADMIN_RIGHTS = {
    "can_be_edited": False,
    "is_anonymous": False,
    "can_manage_chat": True,
    "can_delete_messages": True,
    "can_manage_video_chats": True,
    "can_restrict_members": True,
    "can_promote_members": False,
    "can_change_info": True,
    "can_invite_users": True,
    "can_post_stories": True,
    "can_edit_stories": True,
    "can_delete_stories": True,
    "can_pin_messages": True,
    "can_manage_topics": True,
}

DEFAULT_PERMISSIONS = {
    "can_send_messages": True,
    "can_send_audios": True,
    "can_send_documents": True,
    "can_send_photos": True,
    "can_send_videos": True,
    "can_send_video_notes": True,
    "can_send_voice_notes": True,
    "can_send_polls": True,
    "can_send_other_messages": True,
    "can_add_web_page_previews": True,
    "can_change_info": False,
    "can_invite_users": True,
    "can_pin_messages": False,
    "can_manage_topics": False,
}

# How each kind of file is named: file_id prefix, file_path directory, the
# default extension, and the name used in "can't use file of type X as Y".
FILE_KINDS = {
    "photo": ("AgAC", "photos", "jpg", "Photo"),
    "profile_photo": ("AgAC", "profile_photos", "jpg", "Photo"),
    "document": ("BQAC", "documents", "", "Document"),
    "video": ("BAAC", "videos", "mp4", "Video"),
    "voice": ("AwAC", "voice", "oga", "Voice"),
    "audio": ("CQAC", "music", "mp3", "Audio"),
    "animation": ("CgAC", "animations", "mp4", "Animation"),
    "sticker": ("CAAC", "stickers", "webp", "Sticker"),
}
DEFAULT_MIME = {
    "document": "application/octet-stream",
    "video": "video/mp4",
    "voice": "audio/ogg",
    "audio": "audio/mpeg",
    "animation": "video/mp4",
}
# The sizes Telegram generates for a photo (longest side), smallest first.
PHOTO_BOUNDS = (90, 320, 800, 1280)
PHOTO_MAX_SIDE = 2560
PROFILE_PHOTO_BOUNDS = (160, 320)
PROFILE_PHOTO_MAX_SIDE = 640


def log(text):
    """One line on stderr."""
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} {text}", file=sys.stderr, flush=True)


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def utf16_len(text):
    return len(text.encode("utf-16-le")) // 2


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class ApiError(Exception):
    """A Bot API failure: HTTP status, Telegram's description, parameters."""

    def __init__(self, status, description, parameters=None):
        super().__init__(description)
        self.status = status
        self.description = description
        self.parameters = parameters


class ControlError(Exception):
    """A control API failure (a test set something up wrong)."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(text):
    return ApiError(400, "Bad Request: " + text)


# ---------------------------------------------------------------------------
# Parameter helpers. Values arrive as JSON values (JSON bodies) or strings
# (query strings, forms, multipart); these accept both.
# ---------------------------------------------------------------------------


def str_param(p, name, default=None):
    v = p.get(name)
    if v is None:
        return default
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return v
    raise bad_request(f"parameter \"{name}\" must be a string")


def int_param(p, name, default=None):
    v = p.get(name)
    if v is None or v == "":
        return default
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise bad_request(f"parameter \"{name}\" must be a Number")


def bool_param(p, name, default=False):
    v = p.get(name)
    if v is None or v == "":
        return default
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v != 0
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v)


def json_param(p, name, default=None, what=None):
    """A JSON-valued parameter: a JSON string, or already a JSON value."""
    v = p.get(name)
    if v is None or v == "":
        return default
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            raise bad_request(f"can't parse {what or name} JSON object")
    return v


def clamp(value, low, high):
    return max(low, min(high, value))


# ---------------------------------------------------------------------------
# Images: the header gives the format and the dimensions.
# ---------------------------------------------------------------------------


def image_info(data):
    """(extension, width, height) of a PNG/JPEG/GIF/WebP/BMP image, or None."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return "png", w, h
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", data[6:10])
            return "gif", w, h
        if data[:2] == b"\xff\xd8":
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    i += 1
                    continue
                marker = data[i + 1]
                if marker == 0xFF:
                    i += 1
                    continue
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                    i += 2
                    continue
                seg_len = struct.unpack(">H", data[i + 2:i + 4])[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    h, w = struct.unpack(">HH", data[i + 5:i + 9])
                    return "jpg", w, h
                i += 2 + seg_len
            return None
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return "webp", w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return "webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return "webp", w, h
            return None
        if data[:2] == b"BM":
            w, h = struct.unpack("<ii", data[18:26])
            return "bmp", w, abs(h)
    except struct.error:
        return None
    return None


def scaled(width, height, bound):
    """Dimensions with the longest side brought down to `bound`."""
    longest = max(width, height)
    if longest <= bound:
        return width, height
    factor = bound / longest
    return max(1, round(width * factor)), max(1, round(height * factor))


def photo_dimensions(width, height, bounds, max_side):
    """The PhotoSize dimensions Telegram would generate, smallest first,
    always at least two."""
    sizes = [scaled(width, height, b) for b in bounds if b < max(width, height)]
    if not sizes:
        sizes.append((width, height))
    sizes.append(scaled(width, height, max_side))
    return sizes


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


class StoredFile:
    """One file as Telegram knows it (one PhotoSize of a photo is one file)."""

    def __init__(self, key, data, kind, ext, unique_id):
        self.key = key
        self.data = data
        self.kind = kind  # a key of FILE_KINDS
        self.ext = ext
        self.size = len(data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.unique_id = unique_id
        self.path = None  # given by the first getFile
        self.media = None  # the Media it belongs to, for reuse by file_id


class FileStore:
    """Files, their per-bot file_ids and their download paths."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self.next_key = 1
        self.by_id = {}  # file_id -> (StoredFile, owner id; 0 = control API)
        self.ids = {}  # (file key, owner id) -> file_id
        self.by_unique_id = {}
        self.by_path = {}

    def reserve(self, nbytes):
        if self.total_bytes + nbytes > self.max_bytes:
            raise bad_request(
                "the emulator's file store is full (start it with a larger "
                "--max-file-store-mb)"
            )
        self.total_bytes += nbytes

    def add(self, data, kind, ext, account=True):
        """Store a file; `account` is False for further PhotoSizes that share
        the bytes of one upload."""
        if account:
            self.reserve(len(data))
        key = self.next_key
        self.next_key += 1
        unique_id = "AQAD" + b64url(hashlib.sha256(f"{key}:{secrets.token_hex(4)}".encode()).digest()[:12])
        f = StoredFile(key, data, kind, ext, unique_id)
        self.by_unique_id[unique_id] = f
        return f

    def file_id(self, f, owner):
        """The file_id the given bot (or the control API, owner 0) sees."""
        k = (f.key, owner)
        fid = self.ids.get(k)
        if fid is None:
            prefix = FILE_KINDS[f.kind][0]
            fid = prefix + b64url(secrets.token_bytes(30))
            self.ids[k] = fid
            self.by_id[fid] = (f, owner)
        return fid

    def lookup(self, file_id):
        return self.by_id.get(file_id, (None, None))

    def path_of(self, f):
        if f.path is None:
            directory = FILE_KINDS[f.kind][1]
            suffix = f".{f.ext}" if f.ext else ""
            f.path = f"{directory}/file_{f.key}{suffix}"
            self.by_path[f.path] = f
        return f.path


class Media:
    """What a message carries besides text: a photo (a list of sizes) or one
    file of another kind with its attributes."""

    def __init__(self, kind, sizes=None, file=None, attrs=None):
        self.kind = kind
        self.sizes = sizes or []  # photo: [(StoredFile, width, height)], smallest first
        self.file = file
        self.attrs = attrs or {}

    def main_file(self):
        return self.sizes[-1][0] if self.kind == "photo" else self.file


class Upload:
    """A file part of a multipart request."""

    def __init__(self, name, filename, content_type, data):
        self.name = name
        self.filename = filename
        self.content_type = content_type
        self.data = data

    def describe(self):
        return {
            "file_name": self.filename,
            "content_type": self.content_type,
            "size": len(self.data),
            "sha256": hashlib.sha256(self.data).hexdigest(),
        }


# ---------------------------------------------------------------------------
# The world: bots, chats, messages
# ---------------------------------------------------------------------------


class Bot:
    def __init__(self, token, user_id, username, first_name, last_name=None,
                 can_read_all=False, can_join_groups=True, supports_inline=False):
        self.token = token
        self.id = user_id
        self.username = username
        self.first_name = first_name
        self.last_name = last_name
        self.can_read_all = can_read_all
        self.can_join_groups = can_join_groups
        self.supports_inline = supports_inline
        self.queue = deque(maxlen=MAX_PENDING_UPDATES)  # (update_id, update)
        # Telegram's update ids start at an arbitrary positive number.
        self.next_update_id = random.randint(10_000, 900_000_000)
        self.allowed_updates = None  # None: the default set
        self.poll_waiter = None  # the Future a waiting getUpdates sleeps on

    def user(self):
        u = {"id": self.id, "is_bot": True, "first_name": self.first_name}
        if self.last_name:
            u["last_name"] = self.last_name
        u["username"] = self.username
        return u

    def wants(self, kind):
        if self.allowed_updates:
            return kind in self.allowed_updates
        return kind not in DEFAULT_EXCLUDED_UPDATES

    def push(self, kind, obj):
        """Queue an update (if the bot's allowed_updates let it through)."""
        if not self.wants(kind):
            return False
        uid = self.next_update_id
        self.next_update_id += 1
        self.queue.append((uid, {"update_id": uid, kind: obj}))
        if self.poll_waiter is not None and not self.poll_waiter.done():
            self.poll_waiter.set_result(True)
        return True


class Chat:
    def __init__(self, chat_id, chat_type, title, is_forum=False, bot_is_admin=False,
                 bot_rights=None, admins=None, creator=None, members=None, username=None):
        self.id = chat_id
        self.type = chat_type
        self.title = title
        self.is_forum = is_forum
        self.username = username
        self.bot_is_admin = bot_is_admin
        self.bot_rights = dict(DEFAULT_ADMIN_RIGHTS, **(bot_rights or {}))
        self.admins = list(admins or [])
        self.creator = creator
        self.members = {}  # user id -> User
        for u in list(members or []) + self.admins + ([creator] if creator else []):
            self.members[u["id"]] = u
        self.messages = {}  # message_id -> Message, oldest first
        self.next_message_id = 1
        self.topics = {}  # message_thread_id -> name
        self.media_groups = {}  # media_group_id -> [message_id]
        self.sent = deque(maxlen=MAX_MESSAGES_PER_CHAT)  # messages bots sent
        self.migrated_to = None
        self.migrated_from = None
        self.rate_limit = None  # RateLimit

    def brief(self):
        """The Chat object embedded in messages."""
        c = {"id": self.id, "type": self.type, "title": self.title}
        if self.username:
            c["username"] = self.username
        if self.is_forum:
            c["is_forum"] = True
        return c

    def add(self, msg):
        self.messages[msg.message_id] = msg
        while len(self.messages) > MAX_MESSAGES_PER_CHAT:
            del self.messages[next(iter(self.messages))]

    def live(self, message_id):
        m = self.messages.get(message_id)
        return None if m is None or m.deleted else m

    def bot_can_delete(self):
        return self.bot_is_admin and self.bot_rights.get("can_delete_messages", False)


class RateLimit:
    """At most `calls` sending calls per `per_secs` in one chat."""

    def __init__(self, calls, per_secs, retry_after=None):
        self.calls = calls
        self.per_secs = per_secs
        self.retry_after = retry_after
        self.times = deque()

    def check(self):
        now = time.monotonic()
        while self.times and self.times[0] <= now - self.per_secs:
            self.times.popleft()
        if len(self.times) >= self.calls:
            wait = self.retry_after
            if wait is None:
                wait = max(1, math.ceil(self.times[0] + self.per_secs - now))
            raise ApiError(429, f"Too Many Requests: retry after {wait}", {"retry_after": wait})
        self.times.append(now)


class Message:
    def __init__(self, chat, message_id, sender, date):
        self.chat = chat
        self.message_id = message_id
        self.sender = sender  # User object
        self.sender_chat = None
        self.date = date
        self.text = None
        self.entities = None
        self.caption = None
        self.caption_entities = None
        self.media = None
        self.thread_id = None
        self.is_topic = False
        self.reply_to = None  # message_id in the same chat
        self.external_reply = None
        self.quote = None
        self.media_group_id = None
        self.service = None  # service message fields
        self.edit_date = None
        self.edits = 0
        self.deleted = False
        self.by_bot = None  # the Bot that sent it
        self.method = None
        self.parse_mode = None
        self.link_preview_options = None
        self.reply_markup = None
        self.disable_notification = False
        self.protect_content = False
        self.bot_reactions = {}  # bot id -> [ReactionType]
        self.user_reactions = {}  # user id -> [ReactionType]
        self.seen_by = set()  # ids of the bots that got it as an update
        self.extra = None  # fields a test wants merged in verbatim

    def body_text(self):
        return self.text if self.text is not None else (self.caption or "")


# ---------------------------------------------------------------------------
# Entities
# ---------------------------------------------------------------------------


def check_entities(raw, text, what="entities"):
    """Validate MessageEntity objects against the text (UTF-16 offsets) and
    return them unchanged."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise bad_request(f"can't parse {what} JSON object")
    units = text.encode("utf-16-le")
    total = len(units) // 2

    def inside_pair(pos):
        # True when `pos` falls between a high and a low surrogate.
        if pos <= 0 or pos >= total:
            return False
        unit = struct.unpack_from("<H", units, 2 * pos)[0]
        return 0xDC00 <= unit <= 0xDFFF

    for e in raw:
        if not isinstance(e, dict):
            raise bad_request("can't parse MessageEntity: expected an Object")
        etype = e.get("type")
        if etype not in ENTITY_TYPES:
            raise bad_request(f"can't parse MessageEntity: unsupported entity type \"{etype}\"")
        offset, length = e.get("offset"), e.get("length")
        if not isinstance(offset, int) or not isinstance(length, int) or isinstance(offset, bool):
            raise bad_request("can't parse MessageEntity: offset and length must be integers")
        if offset < 0 or length < 1:
            raise bad_request(f"can't parse entities: entity of type {etype} has offset {offset} and length {length}")
        if offset + length > total:
            raise bad_request(
                f"can't parse entities: entity of type {etype} at offset {offset} with length "
                f"{length} ends beyond the end of the text (UTF-16 length {total})"
            )
        if inside_pair(offset) or inside_pair(offset + length):
            raise bad_request(
                f"can't parse entities: entity of type {etype} at offset {offset} with length "
                f"{length} splits a UTF-16 surrogate pair"
            )
        if etype == "text_link" and not isinstance(e.get("url"), str):
            raise bad_request("can't parse MessageEntity: field \"url\" must be of type String")
        if etype == "text_mention" and not isinstance((e.get("user") or {}).get("id"), int):
            raise bad_request("can't parse MessageEntity: field \"user\" must be of type Object")
        if etype == "custom_emoji" and not isinstance(e.get("custom_emoji_id"), str):
            raise bad_request("can't parse MessageEntity: field \"custom_emoji_id\" must be of type String")
    return raw


AUTO_ENTITY_PATTERNS = (
    ("bot_command", re.compile(r"(?<![\w/])/[A-Za-z0-9_]{1,64}(?:@[A-Za-z0-9_]{3,32})?")),
    ("url", re.compile(r"\bhttps?://[^\s<>\"]+")),
    ("email", re.compile(r"\b[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+\b")),
    ("mention", re.compile(r"(?<![\w@])@[A-Za-z0-9_]{4,32}\b")),
    ("hashtag", re.compile(r"(?<![\w#])#\w+")),
)


def auto_entities(text):
    """The entities a Telegram client adds by itself (commands, mentions,
    URLs, e-mail addresses, hashtags), in UTF-16 units."""
    found = []
    taken = []
    for etype, pattern in AUTO_ENTITY_PATTERNS:
        for m in pattern.finditer(text):
            start, end = m.span()
            if any(start < t_end and t_start < end for t_start, t_end in taken):
                continue
            taken.append((start, end))
            found.append({
                "offset": utf16_len(text[:start]),
                "length": utf16_len(text[start:end]),
                "type": etype,
            })
    found.sort(key=lambda e: e["offset"])
    return found


def normalise_user(u, what="user"):
    if not isinstance(u, dict) or not isinstance(u.get("id"), int) or isinstance(u.get("id"), bool):
        raise ControlError(f"{what} must be a User object with an integer id")
    user = dict(u)
    user.setdefault("is_bot", False)
    user.setdefault("first_name", f"User{u['id']}")
    return user


def parse_chat_id(value):
    """A chat_id parameter: an integer, a numeric string or "@username"."""
    if isinstance(value, bool):
        raise bad_request("chat not found")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("@"):
            return s
        try:
            return int(s)
        except ValueError:
            pass
    raise bad_request("chat not found")


# ---------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------


class Emulator:
    def __init__(self, max_file_store_bytes):
        self.max_file_store_bytes = max_file_store_bytes
        self.reset()

    def reset(self):
        for bot in getattr(self, "bots", {}).values():
            if bot.poll_waiter is not None and not bot.poll_waiter.done():
                bot.poll_waiter.set_exception(ApiError(409, CONFLICT_DESCRIPTION))
        self.bots = {}  # token -> Bot
        self.chats = {}  # id -> Chat
        self.users = {}  # every user seen, id -> User
        self.files = FileStore(self.max_file_store_bytes)
        self.profile_photos = {}  # user id -> [Media], newest first
        self.calls = deque(maxlen=MAX_CALLS_LOGGED)
        self.faults = []
        self.clock_offset = 0
        self.next_media_group_id = random.randint(10**16, 10**17)

    # -- time ---------------------------------------------------------------

    def now(self):
        return int(time.time()) + self.clock_offset

    # -- lookups --------------------------------------------------------------

    def bot_by_id(self, user_id):
        for bot in self.bots.values():
            if bot.id == user_id:
                return bot
        return None

    def find_chat(self, value):
        """The Chat a chat_id names, with Telegram's errors."""
        key = parse_chat_id(value)
        if isinstance(key, str):
            name = key[1:].lower()
            chat = next((c for c in self.chats.values()
                         if c.username and c.username.lower() == name), None)
        else:
            chat = self.chats.get(key)
        if chat is None:
            raise bad_request("chat not found")
        if chat.migrated_to is not None:
            raise ApiError(400, MIGRATED_DESCRIPTION, {"migrate_to_chat_id": chat.migrated_to})
        return chat

    def chat_param(self, p, name="chat_id"):
        value = p.get(name)
        if value is None or value == "":
            raise bad_request("chat_id is empty")
        return self.find_chat(value)

    def rate_check(self, chat):
        if chat.rate_limit is not None:
            chat.rate_limit.check()

    def remember_user(self, user, chat=None):
        if user["id"] in SERVICE_USER_IDS:
            return
        self.users[user["id"]] = user
        if chat is not None:
            chat.members[user["id"]] = user

    # -- rendering ------------------------------------------------------------

    def render_media(self, media, viewer):
        """The message fields of a Media, with the viewer's file_ids."""
        def meta(f):
            return {
                "file_id": self.files.file_id(f, viewer),
                "file_unique_id": f.unique_id,
                "file_size": f.size,
            }

        if media.kind in ("photo", "profile_photo"):
            return {"photo": [dict(meta(f), width=w, height=h) for f, w, h in media.sizes]}
        a = media.attrs
        obj = meta(media.file)
        kind = media.kind
        if kind in ("video", "animation"):
            obj.update(width=a.get("width", 0), height=a.get("height", 0), duration=a.get("duration", 0))
        if kind in ("voice", "audio"):
            obj["duration"] = a.get("duration", 0)
        if kind == "audio":
            for k in ("performer", "title"):
                if a.get(k):
                    obj[k] = a[k]
        if kind == "sticker":
            obj.update(type="regular", width=a.get("width", 512), height=a.get("height", 512),
                       is_animated=a.get("is_animated", False), is_video=a.get("is_video", False))
            if a.get("emoji"):
                obj["emoji"] = a["emoji"]
        if kind in ("document", "video", "audio", "animation") and a.get("file_name"):
            obj["file_name"] = a["file_name"]
        if kind != "sticker" and a.get("mime_type"):
            obj["mime_type"] = a["mime_type"]
        out = {kind: obj}
        if kind == "animation":
            # Telegram also sends an animation as a document, for old clients.
            doc = meta(media.file)
            for k in ("file_name", "mime_type"):
                if a.get(k):
                    doc[k] = a[k]
            out["document"] = doc
        if a.get("has_spoiler"):
            out["has_media_spoiler"] = True
        return out

    def render(self, msg, viewer, with_reply=True):
        """The Message object as the viewer (a Bot, or None for the control
        API) sees it, in its current state."""
        owner = viewer.id if viewer is not None else 0
        d = {"message_id": msg.message_id}
        if msg.thread_id is not None:
            d["message_thread_id"] = msg.thread_id
        d["from"] = msg.sender
        if msg.sender_chat is not None:
            d["sender_chat"] = msg.sender_chat
        d["date"] = msg.date
        d["chat"] = msg.chat.brief()
        if msg.is_topic:
            d["is_topic_message"] = True
        if with_reply:
            target_id = msg.reply_to
            if target_id is None and msg.is_topic and msg.thread_id != msg.message_id:
                # Telegram makes a topic message without a reply a reply to
                # the topic's creation message.
                target_id = msg.thread_id
            target = msg.chat.live(target_id) if target_id is not None else None
            if target is not None:
                d["reply_to_message"] = self.render(target, viewer, with_reply=False)
        if msg.external_reply is not None:
            d["external_reply"] = msg.external_reply
        if msg.quote is not None:
            d["quote"] = msg.quote
        if msg.edit_date is not None:
            d["edit_date"] = msg.edit_date
        if msg.protect_content:
            d["has_protected_content"] = True
        if msg.media_group_id is not None:
            d["media_group_id"] = msg.media_group_id
        if msg.text is not None:
            d["text"] = msg.text
            if msg.entities:
                d["entities"] = msg.entities
            if msg.link_preview_options is not None:
                d["link_preview_options"] = msg.link_preview_options
        if msg.media is not None:
            d.update(self.render_media(msg.media, owner))
        if msg.caption:
            d["caption"] = msg.caption
            if msg.caption_entities:
                d["caption_entities"] = msg.caption_entities
        if msg.reply_markup is not None:
            d["reply_markup"] = msg.reply_markup
        if msg.service:
            d.update(msg.service)
        if msg.extra:
            d.update(msg.extra)
        return d

    def inspect(self, msg):
        """A message's current state for the control API."""
        viewer = msg.by_bot
        d = self.render(msg, viewer)
        d["parse_mode"] = msg.parse_mode
        d["edits"] = msg.edits
        d["deleted"] = msg.deleted
        d["bot_reactions"] = [r for rs in msg.bot_reactions.values() for r in rs]
        d["bot_reactions_by"] = {str(k): v for k, v in msg.bot_reactions.items()}
        d["user_reactions"] = {str(k): v for k, v in msg.user_reactions.items()}
        d["method"] = msg.method
        d["disable_notification"] = msg.disable_notification
        if msg.media is not None:
            f = msg.media.main_file()
            d["file_sha256"] = f.sha256
            d["file_size"] = f.size
        return d

    # -- delivery -------------------------------------------------------------

    def bot_sees(self, bot, msg):
        """Whether a message in a group reaches the bot (privacy mode)."""
        sender = msg.sender or {}
        if sender.get("is_bot") and sender.get("id") not in SERVICE_USER_IDS:
            return False  # bots never see other bots' messages
        if msg.service:
            return True
        if bot.can_read_all or msg.chat.bot_is_admin:
            return True
        text = msg.body_text()
        m = re.match(r"/[A-Za-z0-9_]{1,64}(?:@([A-Za-z0-9_]+))?", text)
        if m and (m.group(1) is None or m.group(1).lower() == bot.username.lower()):
            return True
        if re.search(r"(?<![\w@])@" + re.escape(bot.username) + r"\b", text, re.IGNORECASE):
            return True
        for e in (msg.entities or []) + (msg.caption_entities or []):
            if e.get("type") == "text_mention" and (e.get("user") or {}).get("id") == bot.id:
                return True
        if msg.reply_to is not None:
            target = msg.chat.messages.get(msg.reply_to)
            if target is not None and target.by_bot is bot:
                return True
        return False

    def deliver(self, msg, kind="message"):
        """Queue the update for every bot that gets it."""
        delivered = []
        for bot in self.bots.values():
            if kind == "message":
                if not self.bot_sees(bot, msg):
                    continue
                msg.seen_by.add(bot.id)
            elif bot.id not in msg.seen_by:
                continue
            if bot.push(kind, self.render(msg, bot)):
                delivered.append(bot.id)
        return delivered

    # -- message construction -------------------------------------------------

    def new_message(self, chat, sender, date=None):
        msg = Message(chat, chat.next_message_id, sender, self.now() if date is None else date)
        chat.next_message_id += 1
        chat.add(msg)
        return msg

    def service_message(self, chat, sender, fields, thread_id=None):
        msg = self.new_message(chat, sender)
        msg.service = fields
        if thread_id is not None:
            msg.thread_id = thread_id
            msg.is_topic = True
        self.deliver(msg)
        return msg

    def resolve_reply(self, chat, p):
        """(target chat, target message, quote) from reply_parameters or the
        legacy reply_to_message_id, or None."""
        rp = json_param(p, "reply_parameters", what="reply parameters")
        if rp is None:
            legacy = int_param(p, "reply_to_message_id")
            if legacy is None:
                return None
            rp = {"message_id": legacy,
                  "allow_sending_without_reply": bool_param(p, "allow_sending_without_reply")}
        if not isinstance(rp, dict):
            raise bad_request("can't parse reply parameters JSON object")
        mid = int_param(rp, "message_id")
        target_chat = chat
        if rp.get("chat_id") not in (None, ""):
            target_chat = self.find_chat(rp["chat_id"])
        target = target_chat.live(mid) if mid is not None else None
        if target is None:
            if bool_param(rp, "allow_sending_without_reply"):
                return None
            raise bad_request("message to be replied not found")
        quote = None
        qtext = rp.get("quote")
        if qtext:
            base = target.body_text()
            pos = base.find(qtext)
            if pos < 0:
                raise bad_request("QUOTE_TEXT_INVALID")
            quote = {"text": qtext, "position": utf16_len(base[:pos]), "is_manual": True}
            qents = check_entities(json_param(rp, "quote_entities"), qtext, "quote entities")
            if qents:
                quote["entities"] = qents
        return target_chat, target, quote

    def resolve_thread(self, chat, p, reply):
        """(message_thread_id, is_topic_message) of a new message."""
        tid = int_param(p, "message_thread_id")
        target = reply[1] if reply is not None and reply[0] is chat else None
        if chat.is_forum:
            if tid is not None:
                if tid not in chat.topics:
                    raise bad_request("message thread not found")
                return tid, True
            if target is not None and target.is_topic:
                return target.thread_id, True
            return None, False
        if chat.type == "supergroup" and target is not None:
            # A reply in a supergroup belongs to the reply thread of its root.
            return (target.thread_id if target.thread_id is not None else target.message_id), False
        return None, False

    def apply_reply(self, msg, reply):
        if reply is None:
            return
        target_chat, target, quote = reply
        if target_chat is msg.chat:
            msg.reply_to = target.message_id
        else:
            if target.sender_chat is not None:
                origin = {"type": "chat", "date": target.date, "sender_chat": target.sender_chat}
            else:
                origin = {"type": "user", "date": target.date, "sender_user": target.sender}
            msg.external_reply = {"origin": origin, "chat": target_chat.brief(),
                                  "message_id": target.message_id}
        msg.quote = quote

    def parse_mode(self, p):
        mode = str_param(p, "parse_mode")
        if mode in (None, ""):
            return None
        if mode.lower() not in ("html", "markdown", "markdownv2"):
            raise bad_request(f"unsupported parse_mode \"{mode}\"")
        return mode

    def link_preview(self, p):
        lpo = json_param(p, "link_preview_options", what="link preview options")
        if lpo is not None and not isinstance(lpo, dict):
            raise bad_request("can't parse link preview options JSON object")
        if lpo is None and bool_param(p, "disable_web_page_preview"):
            lpo = {"is_disabled": True}
        return lpo

    def bot_message(self, bot, chat, method, p, reply, thread):
        """A new message from the bot, with the options every send method
        shares."""
        msg = self.new_message(chat, bot.user())
        msg.by_bot = bot
        msg.method = method
        msg.thread_id, msg.is_topic = thread
        self.apply_reply(msg, reply)
        msg.disable_notification = bool_param(p, "disable_notification")
        msg.protect_content = bool_param(p, "protect_content")
        markup = json_param(p, "reply_markup", what="reply markup")
        if isinstance(markup, dict) and "inline_keyboard" in markup:
            msg.reply_markup = markup
        chat.sent.append(msg)
        return msg

    # -- files ----------------------------------------------------------------

    def input_file(self, bot, p, files, name, missing=None):
        """Where a file parameter's content comes from: an Upload or an
        existing StoredFile."""
        if name in files:
            return files[name]
        v = p.get(name)
        if v is None or v == "":
            raise bad_request(missing or f"there is no {name} in the request")
        if not isinstance(v, str):
            raise bad_request(f"wrong type of the parameter \"{name}\"")
        return self.file_reference(bot, files, v)

    def file_reference(self, bot, files, value, media_not_found=None):
        if value.startswith("attach://"):
            upload = files.get(value[len("attach://"):])
            if upload is None:
                raise bad_request(media_not_found or "wrong file identifier/HTTP URL specified")
            return upload
        if "://" in value or value.startswith("www."):
            raise bad_request("failed to get HTTP URL content")
        f, owner = self.files.lookup(value)
        if f is None or owner != bot.id:
            raise bad_request("wrong file identifier/HTTP URL specified")
        return f

    def plan_media(self, kind, source, attrs_from):
        """Check a file for a kind of message and describe the Media to make.
        Nothing is stored yet, so a call refused later has no effect."""
        a = {}
        if isinstance(source, StoredFile):
            existing = source.media
            compatible = {existing.kind, kind} <= {"document", "animation"} or existing.kind == kind
            if existing.kind == "profile_photo" and kind == "photo":
                compatible = True
            if not compatible:
                raise bad_request(
                    f"can't use file of type {FILE_KINDS[existing.kind][3]} as {FILE_KINDS[kind][3]}")
            return {"reuse": existing, "kind": kind}
        data = source.data
        if not data:
            raise bad_request("file must be non-empty")
        filename = os.path.basename((source.filename or "").replace("\\", "/"))
        ext = filename.rsplit(".", 1)[1].lower() if "." in filename else ""
        if kind == "photo":
            if len(data) > MAX_PHOTO_BYTES:
                raise bad_request(
                    f"file of size {len(data)} bytes is too big for a photo; "
                    f"the maximum size is {MAX_PHOTO_BYTES} bytes")
            info = image_info(data)
            if info is None:
                raise bad_request("IMAGE_PROCESS_FAILED")
            img_ext, w, h = info
            if w < 1 or h < 1 or w + h > 10000 or max(w, h) > 20 * min(w, h):
                raise bad_request("PHOTO_INVALID_DIMENSIONS")
            return {"kind": kind, "data": data, "ext": img_ext, "width": w, "height": h}
        mime = None
        if filename:
            mime = mimetypes.guess_type(filename)[0]
        if mime is None and source.content_type and source.content_type != "application/octet-stream":
            mime = source.content_type
        if mime is None:
            mime = DEFAULT_MIME.get(kind)
        if filename and kind in ("document", "video", "audio", "animation"):
            a["file_name"] = filename
        if kind != "sticker":
            a["mime_type"] = mime
        for k in ("width", "height", "duration"):
            if kind in ("video", "animation") or (k == "duration" and kind in ("voice", "audio")):
                a[k] = int_param(attrs_from, k, 0)
        if kind == "audio":
            for k in ("performer", "title"):
                if str_param(attrs_from, k):
                    a[k] = str_param(attrs_from, k)
        if kind == "sticker":
            a["is_animated"] = ext == "tgs"
            a["is_video"] = ext == "webm"
            info = image_info(data)
            a["width"], a["height"] = (info[1], info[2]) if info else (512, 512)
            if str_param(attrs_from, "emoji"):
                a["emoji"] = str_param(attrs_from, "emoji")
        if bool_param(attrs_from, "has_spoiler"):
            a["has_spoiler"] = True
        file_ext = ext or FILE_KINDS[kind][2]
        return {"kind": kind, "data": data, "ext": file_ext, "attrs": a}

    def commit_media(self, plan):
        """Store the files of a planned Media."""
        if "reuse" in plan:
            old = plan["reuse"]
            kind = plan["kind"]
            if old.kind == "profile_photo":
                kind = "photo"
            return Media(kind, sizes=old.sizes, file=old.file, attrs=dict(old.attrs))
        kind = plan["kind"]
        if kind in ("photo", "profile_photo"):
            bounds, max_side = ((PROFILE_PHOTO_BOUNDS, PROFILE_PHOTO_MAX_SIDE) if kind == "profile_photo"
                                else (PHOTO_BOUNDS, PHOTO_MAX_SIDE))
            dims = photo_dimensions(plan["width"], plan["height"], bounds, max_side)
            self.files.reserve(len(plan["data"]))
            sizes = [(self.files.add(plan["data"], kind, plan["ext"], account=False), w, h) for w, h in dims]
            media = Media(kind, sizes=sizes)
            for f, _, _ in sizes:
                f.media = media
            return media
        f = self.files.add(plan["data"], kind, plan["ext"])
        media = Media(kind, file=f, attrs=plan["attrs"])
        f.media = media
        return media

    def control_media(self, kind, spec):
        """A Media from a control API description {"bytes_b64", ...}."""
        if not isinstance(spec, dict) or not isinstance(spec.get("bytes_b64"), str):
            raise ControlError(f"{kind} needs bytes_b64")
        try:
            data = base64.b64decode(spec["bytes_b64"], validate=True)
        except ValueError:
            raise ControlError(f"{kind}.bytes_b64 is not base64")
        if not data:
            raise ControlError(f"{kind} is empty")
        if kind in ("photo", "profile_photo"):
            info = image_info(data)
            ext = info[0] if info else "jpg"
            w = spec.get("width") or (info[1] if info else None)
            h = spec.get("height") or (info[2] if info else None)
            if not w or not h:
                raise ControlError(f"{kind} needs width and height (or a PNG/JPEG/GIF/WebP header)")
            try:
                return self.commit_media({"kind": kind, "data": data, "ext": ext, "width": int(w), "height": int(h)})
            except ApiError as e:
                raise ControlError(e.description, 507)
        upload = Upload(kind, spec.get("file_name"), spec.get("mime_type"), data)
        try:
            plan = self.plan_media(kind, upload, spec)
            if spec.get("mime_type") and kind != "sticker":
                plan["attrs"]["mime_type"] = spec["mime_type"]
            return self.commit_media(plan)
        except ApiError as e:
            raise ControlError(e.description, 507 if "store" in e.description else 400)

    # =========================================================================
    # Bot API methods. Each takes (bot, params, uploads) and returns the result.
    # =========================================================================

    async def m_getme(self, bot, p, files):
        me = bot.user()
        me.update(can_join_groups=bot.can_join_groups,
                  can_read_all_group_messages=bot.can_read_all,
                  supports_inline_queries=bot.supports_inline,
                  can_connect_to_business=False,
                  has_main_web_app=False)
        return me

    async def m_logout(self, bot, p, files):
        return True

    async def m_close(self, bot, p, files):
        return True

    async def m_deletewebhook(self, bot, p, files):
        if bool_param(p, "drop_pending_updates"):
            bot.queue.clear()
        return True

    async def m_getwebhookinfo(self, bot, p, files):
        return {"url": "", "has_custom_certificate": False, "pending_update_count": len(bot.queue)}

    async def m_getupdates(self, bot, p, files):
        offset = int_param(p, "offset", 0)
        limit = clamp(int_param(p, "limit", 100), 1, 100)
        timeout = clamp(int_param(p, "timeout", 0), 0, MAX_LONG_POLL_SECS)
        allowed = json_param(p, "allowed_updates", what="allowed updates")
        if allowed is not None:
            if not isinstance(allowed, list) or not all(isinstance(x, str) for x in allowed):
                raise bad_request("can't parse allowed updates JSON object")
            # An empty list means the default set; a missing one keeps the last.
            bot.allowed_updates = set(allowed) or None

        # A newer request ends a waiting one, as on Telegram.
        if bot.poll_waiter is not None and not bot.poll_waiter.done():
            bot.poll_waiter.set_exception(ApiError(409, CONFLICT_DESCRIPTION))
        bot.poll_waiter = None

        # Confirm: updates below a positive offset are forgotten; a negative
        # offset keeps only the last -offset updates.
        if offset > 0:
            while bot.queue and bot.queue[0][0] < offset:
                bot.queue.popleft()
        elif offset < 0:
            while len(bot.queue) > -offset:
                bot.queue.popleft()

        if not bot.queue and timeout > 0:
            waiter = asyncio.get_running_loop().create_future()
            bot.poll_waiter = waiter
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                if bot.poll_waiter is waiter:
                    bot.poll_waiter = None
            if waiter.done() and waiter.exception() is not None:
                raise waiter.exception()
        return [u for _, u in list(bot.queue)[:limit]]

    async def m_sendmessage(self, bot, p, files):
        chat = self.chat_param(p)
        text = str_param(p, "text")
        if text is None or not text.strip():
            raise bad_request("message text is empty")
        if len(text) > MAX_TEXT_LENGTH:
            raise bad_request("message is too long")
        entities = check_entities(json_param(p, "entities"), text)
        parse_mode = self.parse_mode(p)
        lpo = self.link_preview(p)
        self.rate_check(chat)
        reply = self.resolve_reply(chat, p)
        thread = self.resolve_thread(chat, p, reply)
        msg = self.bot_message(bot, chat, "sendMessage", p, reply, thread)
        msg.text = text
        msg.entities = entities
        msg.parse_mode = parse_mode
        msg.link_preview_options = lpo
        return self.render(msg, bot)

    def caption_params(self, p):
        caption = str_param(p, "caption")
        if caption is not None and len(caption) > MAX_CAPTION_LENGTH:
            raise bad_request("message caption is too long")
        entities = check_entities(json_param(p, "caption_entities"), caption or "", "caption entities")
        return caption or None, entities, self.parse_mode(p)

    async def send_media(self, bot, p, files, kind, method):
        chat = self.chat_param(p)
        caption, caption_entities, parse_mode = (None, None, None)
        if kind != "sticker":
            caption, caption_entities, parse_mode = self.caption_params(p)
        source = self.input_file(bot, p, files, kind)
        plan = self.plan_media(kind, source, p)
        self.rate_check(chat)
        reply = self.resolve_reply(chat, p)
        thread = self.resolve_thread(chat, p, reply)
        media = self.commit_media(plan)
        msg = self.bot_message(bot, chat, method, p, reply, thread)
        msg.media = media
        msg.caption = caption
        msg.caption_entities = caption_entities
        msg.parse_mode = parse_mode
        return self.render(msg, bot)

    async def m_sendphoto(self, bot, p, files):
        return await self.send_media(bot, p, files, "photo", "sendPhoto")

    async def m_senddocument(self, bot, p, files):
        return await self.send_media(bot, p, files, "document", "sendDocument")

    async def m_sendvideo(self, bot, p, files):
        return await self.send_media(bot, p, files, "video", "sendVideo")

    async def m_sendvoice(self, bot, p, files):
        return await self.send_media(bot, p, files, "voice", "sendVoice")

    async def m_sendaudio(self, bot, p, files):
        return await self.send_media(bot, p, files, "audio", "sendAudio")

    async def m_sendanimation(self, bot, p, files):
        return await self.send_media(bot, p, files, "animation", "sendAnimation")

    async def m_sendsticker(self, bot, p, files):
        return await self.send_media(bot, p, files, "sticker", "sendSticker")

    async def m_sendmediagroup(self, bot, p, files):
        chat = self.chat_param(p)
        if p.get("media") is None:
            raise bad_request("parameter \"media\" is required")
        items = json_param(p, "media", what="media")
        if not isinstance(items, list):
            raise bad_request("can't parse media JSON object")
        if not items:
            raise bad_request("there are no messages to send")
        if len(items) > 10:
            raise bad_request("too many messages to send as an album")
        plans = []
        kinds = []
        for item in items:
            if not isinstance(item, dict):
                raise bad_request("can't parse InputMedia: expected an Object")
            kind = item.get("type")
            if kind not in ("photo", "video", "document", "audio"):
                raise bad_request(f"can't parse InputMedia: type \"{kind}\" can't be used in sendMediaGroup")
            ref = item.get("media")
            if not isinstance(ref, str) or not ref:
                raise bad_request("can't parse InputMedia: media not found")
            source = self.file_reference(bot, files, ref, media_not_found="can't parse InputMedia: media not found")
            caption, caption_entities, parse_mode = self.caption_params(item)
            plans.append((self.plan_media(kind, source, item), caption, caption_entities, parse_mode))
            kinds.append(kind)
        for special in ("document", "audio"):
            if special in kinds and any(k != special for k in kinds):
                raise bad_request(f"{special} can't be mixed with other media types")
        self.rate_check(chat)
        reply = self.resolve_reply(chat, p)
        thread = self.resolve_thread(chat, p, reply)
        group_id = None
        if len(plans) > 1:
            group_id = str(self.next_media_group_id)
            self.next_media_group_id += 1
            chat.media_groups[group_id] = []
        result = []
        for plan, caption, caption_entities, parse_mode in plans:
            media = self.commit_media(plan)
            msg = self.bot_message(bot, chat, "sendMediaGroup", p, reply, thread)
            msg.media = media
            msg.caption = caption
            msg.caption_entities = caption_entities
            msg.parse_mode = parse_mode
            msg.media_group_id = group_id
            if group_id is not None:
                chat.media_groups[group_id].append(msg.message_id)
            result.append(self.render(msg, bot))
        return result

    def message_param(self, p, missing="message identifier is not specified"):
        if p.get("inline_message_id"):
            raise bad_request("inline messages are not supported by the emulator")
        mid = int_param(p, "message_id")
        if mid is None:
            raise bad_request(missing)
        return mid

    async def m_editmessagetext(self, bot, p, files):
        mid = self.message_param(p)
        chat = self.chat_param(p)
        text = str_param(p, "text")
        if text is None or not text.strip():
            raise bad_request("message text is empty")
        if len(text) > MAX_TEXT_LENGTH:
            raise bad_request("MESSAGE_TOO_LONG")
        entities = check_entities(json_param(p, "entities"), text)
        parse_mode = self.parse_mode(p)
        lpo = self.link_preview(p)
        markup = json_param(p, "reply_markup", what="reply markup")
        self.rate_check(chat)
        msg = chat.live(mid)
        if msg is None:
            raise bad_request("message to edit not found")
        if msg.by_bot is not bot:
            raise bad_request("message can't be edited")
        if msg.text is None:
            raise bad_request("there is no text in the message to edit")
        if (text == msg.text and (entities or []) == (msg.entities or [])
                and (markup or None) == msg.reply_markup):
            raise ApiError(400, NOT_MODIFIED_DESCRIPTION)
        msg.text = text
        msg.entities = entities
        msg.parse_mode = parse_mode
        if lpo is not None:
            msg.link_preview_options = lpo
        if isinstance(markup, dict) and "inline_keyboard" in markup:
            msg.reply_markup = markup
        msg.edit_date = self.now()
        msg.edits += 1
        return self.render(msg, bot)

    async def m_editmessagecaption(self, bot, p, files):
        mid = self.message_param(p)
        chat = self.chat_param(p)
        caption, caption_entities, parse_mode = self.caption_params(p)
        markup = json_param(p, "reply_markup", what="reply markup")
        self.rate_check(chat)
        msg = chat.live(mid)
        if msg is None:
            raise bad_request("message to edit not found")
        if msg.by_bot is not bot:
            raise bad_request("message can't be edited")
        if msg.media is None:
            raise bad_request("there is no caption in the message to edit")
        if ((caption or None) == msg.caption and (caption_entities or []) == (msg.caption_entities or [])
                and (markup or None) == msg.reply_markup):
            raise ApiError(400, NOT_MODIFIED_DESCRIPTION)
        msg.caption = caption
        msg.caption_entities = caption_entities
        msg.parse_mode = parse_mode
        if isinstance(markup, dict) and "inline_keyboard" in markup:
            msg.reply_markup = markup
        msg.edit_date = self.now()
        msg.edits += 1
        return self.render(msg, bot)

    def check_deletable(self, bot, chat, msg):
        if msg.service and ("forum_topic_created" in msg.service or "migrate_from_chat_id" in msg.service
                            or "group_chat_created" in msg.service or "supergroup_chat_created" in msg.service):
            raise bad_request("message can't be deleted")
        if chat.bot_can_delete():
            return  # an administrator with can_delete_messages deletes anything
        if msg.by_bot is bot and self.now() - msg.date < BOT_DELETE_WINDOW_SECS:
            return
        raise bad_request("message can't be deleted for everyone")

    async def m_deletemessage(self, bot, p, files):
        chat = self.chat_param(p)
        mid = self.message_param(p)
        self.rate_check(chat)
        msg = chat.live(mid)
        if msg is None:
            raise bad_request("message to delete not found")
        self.check_deletable(bot, chat, msg)
        msg.deleted = True
        return True

    async def m_deletemessages(self, bot, p, files):
        chat = self.chat_param(p)
        ids = json_param(p, "message_ids", what="message identifiers")
        if not isinstance(ids, list) or not 1 <= len(ids) <= 100:
            raise bad_request("message_ids must be a list of 1-100 message identifiers")
        self.rate_check(chat)
        wanted = [int_param({"message_id": i}, "message_id") for i in ids]
        targets = [m for m in (chat.live(i) for i in wanted) if m is not None]
        if not targets:
            raise bad_request("message to delete not found")
        for m in targets:
            self.check_deletable(bot, chat, m)
        for m in targets:
            m.deleted = True
        return True

    async def m_setmessagereaction(self, bot, p, files):
        reaction = json_param(p, "reaction", default=[], what="reaction types")
        if not isinstance(reaction, list):
            raise bad_request("expected an Array of ReactionType")
        for r in reaction:
            if not isinstance(r, dict):
                raise bad_request("can't parse ReactionType: expected an Object")
            rtype = r.get("type")
            if rtype is None:
                raise bad_request("can't parse ReactionType: Can't find field \"type\"")
            if rtype == "emoji":
                if not isinstance(r.get("emoji"), str):
                    raise bad_request("can't parse ReactionType: Can't find field \"emoji\"")
            elif rtype != "custom_emoji":
                raise bad_request("can't parse ReactionType: invalid reaction type specified")
        chat = self.chat_param(p)
        mid = int_param(p, "message_id")
        self.rate_check(chat)
        msg = chat.live(mid) if mid is not None else None
        if msg is None:
            raise bad_request("message to react not found")
        if msg.media_group_id is not None:
            # A reaction to any message of an album goes to its first one.
            first = next((chat.live(i) for i in chat.media_groups.get(msg.media_group_id, [])
                          if chat.live(i) is not None), msg)
            msg = first
        if msg.service:
            raise bad_request("REACTION_INVALID")
        for r in reaction:
            if r["type"] != "emoji" or r["emoji"] not in REACTION_EMOJI:
                raise bad_request("REACTION_INVALID")
        if len(reaction) > 1:
            raise bad_request("REACTIONS_TOO_MANY")
        if reaction:
            msg.bot_reactions[bot.id] = [{"type": "emoji", "emoji": r["emoji"]} for r in reaction]
        else:
            msg.bot_reactions.pop(bot.id, None)
        return True

    async def m_sendchataction(self, bot, p, files):
        chat = self.chat_param(p)
        action = str_param(p, "action")
        if action not in CHAT_ACTIONS:
            raise bad_request("wrong parameter action in request")
        tid = int_param(p, "message_thread_id")
        if tid is not None and chat.is_forum and tid not in chat.topics:
            raise bad_request("message thread not found")
        return True

    async def m_getfile(self, bot, p, files):
        file_id = str_param(p, "file_id")
        if not file_id:
            raise bad_request("file_id not specified")
        f, owner = self.files.lookup(file_id)
        if f is None or owner != bot.id:
            raise bad_request("invalid file_id")
        if f.size > MAX_DOWNLOAD_BYTES:
            raise bad_request("file is too big")
        return {"file_id": file_id, "file_unique_id": f.unique_id, "file_size": f.size,
                "file_path": self.files.path_of(f)}

    async def m_getchat(self, bot, p, files):
        chat = self.chat_param(p)
        info = chat.brief()
        info.update(
            accent_color_id=0,
            max_reaction_count=11,
            accepted_gift_types={"unlimited_gifts": False, "limited_gifts": False,
                                 "unique_gifts": False, "premium_subscription": False},
            permissions=dict(DEFAULT_PERMISSIONS),
        )
        return info

    def member_object(self, chat, user_id):
        bot = self.bot_by_id(user_id)
        if bot is not None:
            if chat.bot_is_admin:
                return dict({"status": "administrator", "user": bot.user()}, **chat.bot_rights)
            return {"status": "member", "user": bot.user()}
        if chat.creator is not None and chat.creator["id"] == user_id:
            return {"status": "creator", "user": chat.creator, "is_anonymous": False}
        for admin in chat.admins:
            if admin["id"] == user_id:
                return dict({"status": "administrator", "user": admin}, **DEFAULT_ADMIN_RIGHTS)
        if user_id in chat.members:
            return {"status": "member", "user": chat.members[user_id]}
        if user_id in self.users:
            return {"status": "left", "user": self.users[user_id]}
        return None

    async def m_getchatadministrators(self, bot, p, files):
        chat = self.chat_param(p)
        result = []
        if chat.creator is not None:
            result.append(self.member_object(chat, chat.creator["id"]))
        for admin in chat.admins:
            result.append(self.member_object(chat, admin["id"]))
        if chat.bot_is_admin:
            for b in self.bots.values():
                result.append(self.member_object(chat, b.id))
        return result

    async def m_getchatmember(self, bot, p, files):
        chat = self.chat_param(p)
        user_id = int_param(p, "user_id")
        if user_id is None:
            raise bad_request("user_id is empty")
        member = self.member_object(chat, user_id)
        if member is None:
            raise bad_request("user not found")
        return member

    async def m_getchatmembercount(self, bot, p, files):
        chat = self.chat_param(p)
        ids = set(chat.members) | {b.id for b in self.bots.values()}
        return len(ids)

    async def m_getuserprofilephotos(self, bot, p, files):
        user_id = int_param(p, "user_id")
        if user_id is None:
            raise bad_request("user_id is empty")
        if user_id not in self.users and self.bot_by_id(user_id) is None:
            raise bad_request("user not found")
        offset = max(0, int_param(p, "offset", 0))
        limit = clamp(int_param(p, "limit", 100), 1, 100)
        photos = self.profile_photos.get(user_id, [])
        page = photos[offset:offset + limit]
        return {"total_count": len(photos),
                "photos": [self.render_media(m, bot.id)["photo"] for m in page]}

    async def m_createforumtopic(self, bot, p, files):
        chat = self.chat_param(p)
        name = str_param(p, "name")
        if not name:
            raise bad_request("topic name is empty")
        if not chat.is_forum:
            raise bad_request("the chat is not a forum")
        if not (chat.bot_is_admin and chat.bot_rights.get("can_manage_topics")):
            raise bad_request("not enough rights to create a topic")
        self.rate_check(chat)
        color = int_param(p, "icon_color", 7322096)
        msg = self.create_topic(chat, name, bot.user(), color)
        msg.by_bot = bot
        return {"message_thread_id": msg.message_id, "name": name, "icon_color": color}

    def create_topic(self, chat, name, sender, color=7322096):
        msg = self.new_message(chat, sender)
        msg.thread_id = msg.message_id
        msg.is_topic = True
        msg.service = {"forum_topic_created": {"name": name, "icon_color": color}}
        chat.topics[msg.message_id] = name
        self.deliver(msg)
        return msg

    METHODS = {
        "getme", "logout", "close", "deletewebhook", "getwebhookinfo", "getupdates",
        "sendmessage", "sendphoto", "senddocument", "sendvideo", "sendvoice", "sendaudio",
        "sendanimation", "sendsticker", "sendmediagroup", "editmessagetext",
        "editmessagecaption", "deletemessage", "deletemessages", "setmessagereaction",
        "sendchataction", "getfile", "getchat", "getchatadministrators", "getchatmember",
        "getchatmembercount", "getuserprofilephotos", "createforumtopic",
    }

    def method(self, name):
        lname = name.lower()
        if lname not in self.METHODS:
            return None
        return getattr(self, "m_" + lname)

    def take_fault(self, method, token):
        lname = method.lower()
        for fault in self.faults:
            if fault["method"] in (lname, "*") and fault["token"] in (None, token):
                fault["count"] -= 1
                if fault["count"] <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    # =========================================================================
    # Control API
    # =========================================================================

    def c_reset(self, body, query):
        """Forget everything."""
        self.reset()
        return {"ok": True}

    def c_bot(self, body, query):
        """Register a bot: {"token","id","username","first_name",
        "can_read_all_group_messages"?, "last_name"?, "can_join_groups"?,
        "supports_inline_queries"?}."""
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ControlError("token is required")
        if not isinstance(body.get("id"), int) or not body.get("username"):
            raise ControlError("id and username are required")
        if token in self.bots:
            raise ControlError("a bot with that token exists")
        bot = Bot(token, body["id"], body["username"], body.get("first_name") or body["username"],
                  last_name=body.get("last_name"),
                  can_read_all=bool(body.get("can_read_all_group_messages", False)),
                  can_join_groups=bool(body.get("can_join_groups", True)),
                  supports_inline=bool(body.get("supports_inline_queries", False)))
        self.bots[token] = bot
        return bot.user()

    def c_chat(self, body, query):
        """Create a group or supergroup: {"id","type","title","is_forum"?,
        "bot_is_admin"?, "bot_rights"?, "admins"?, "creator"?, "members"?,
        "username"?}. Every registered bot is a member."""
        chat_id = body.get("id")
        if not isinstance(chat_id, int) or chat_id >= 0:
            raise ControlError("id must be a negative integer")
        if chat_id in self.chats:
            raise ControlError("a chat with that id exists")
        ctype = body.get("type", "supergroup")
        if ctype not in ("group", "supergroup"):
            raise ControlError("type must be group or supergroup")
        is_forum = bool(body.get("is_forum", False))
        if is_forum and ctype != "supergroup":
            raise ControlError("only supergroups can be forums")
        admins = [normalise_user(u, "admins[]") for u in body.get("admins") or []]
        creator = normalise_user(body["creator"], "creator") if body.get("creator") else None
        members = [normalise_user(u, "members[]") for u in body.get("members") or []]
        chat = Chat(chat_id, ctype, body.get("title") or f"Chat {chat_id}", is_forum=is_forum,
                    bot_is_admin=bool(body.get("bot_is_admin", False)),
                    bot_rights=body.get("bot_rights"), admins=admins, creator=creator,
                    members=members, username=body.get("username"))
        for u in chat.members.values():
            self.users[u["id"]] = u
        self.chats[chat_id] = chat
        return chat.brief()

    def c_user_photo(self, body, query):
        """Add a profile photo: {"user_id","bytes_b64","width"?,"height"?}."""
        user_id = body.get("user_id")
        if not isinstance(user_id, int):
            raise ControlError("user_id is required")
        media = self.control_media("profile_photo", body)
        self.profile_photos.setdefault(user_id, []).insert(0, media)
        if user_id not in self.users and self.bot_by_id(user_id) is None:
            self.users[user_id] = {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"}
        return {"total_count": len(self.profile_photos[user_id]),
                "photo": self.render_media(media, 0)["photo"]}

    def control_chat(self, body, key="chat_id"):
        chat = self.chats.get(body.get(key))
        if chat is None:
            raise ControlError(f"no chat {body.get(key)!r}", 404)
        if chat.migrated_to is not None:
            raise ControlError(f"chat {chat.id} was migrated to {chat.migrated_to}")
        return chat

    def default_sender(self, chat, body):
        if body.get("from"):
            return normalise_user(body["from"], "from")
        if chat.creator is not None:
            return chat.creator
        if chat.admins:
            return chat.admins[0]
        return dict(TELEGRAM_USER)

    def c_topic(self, body, query):
        """Create a forum topic: {"chat_id","name","icon_color"?,"from"?} ->
        {"message_thread_id", "message"}."""
        chat = self.control_chat(body)
        if not chat.is_forum:
            raise ControlError("the chat is not a forum")
        name = body.get("name")
        if not name:
            raise ControlError("name is required")
        msg = self.create_topic(chat, name, self.default_sender(chat, body),
                                body.get("icon_color", 7322096))
        return {"message_thread_id": msg.message_id, "message": self.render(msg, None)}

    def user_message(self, chat, sender, body):
        """A message from a user, as Telegram clients send it."""
        text = body.get("text")
        media = None
        for kind in ("photo", "document", "video", "voice", "audio", "animation", "sticker"):
            if body.get(kind) is not None:
                if media is not None:
                    raise ControlError("a message carries at most one file")
                media = self.control_media(kind, body[kind])
        if text is None and media is None and not body.get("extra"):
            raise ControlError("a message needs text, a file or extra fields")
        if text is not None and media is not None:
            raise ControlError("text and a file don't go together: use caption")
        thread_id = body.get("message_thread_id")
        if thread_id is not None and (not chat.is_forum or thread_id not in chat.topics):
            raise ControlError(f"no topic {thread_id} in chat {chat.id}")
        reply_id = body.get("reply_to_message_id")
        target = None
        if reply_id is not None:
            target = chat.live(reply_id)
            if target is None:
                raise ControlError(f"no message {reply_id} in chat {chat.id}")
        try:
            entities = body.get("entities")
            if entities is None and text is not None and body.get("auto_entities"):
                entities = auto_entities(text)
            entities = check_entities(entities, text or "")
            caption = body.get("caption")
            caption_entities = body.get("caption_entities")
            if caption_entities is None and caption and body.get("auto_entities"):
                caption_entities = auto_entities(caption)
            caption_entities = check_entities(caption_entities, caption or "", "caption entities")
        except ApiError as e:
            raise ControlError(e.description)
        self.remember_user(sender, chat)
        msg = self.new_message(chat, sender, body.get("date"))
        msg.text = text
        msg.entities = entities or None
        msg.media = media
        msg.caption = caption or None
        msg.caption_entities = caption_entities or None
        if body.get("sender_chat"):
            msg.sender_chat = body["sender_chat"]
        if target is not None:
            msg.reply_to = target.message_id
        if chat.is_forum:
            if thread_id is None and target is not None and target.is_topic:
                thread_id = target.thread_id
            if thread_id is not None:
                msg.thread_id, msg.is_topic = thread_id, True
        elif chat.type == "supergroup" and target is not None:
            msg.thread_id = target.thread_id if target.thread_id is not None else target.message_id
        group_id = body.get("media_group_id")
        if group_id is not None:
            msg.media_group_id = str(group_id)
            chat.media_groups.setdefault(msg.media_group_id, []).append(msg.message_id)
        if body.get("extra"):
            msg.extra = dict(body["extra"])
        return msg

    def c_message(self, body, query):
        """Post a user's message: {"chat_id","from",...} -> the Message; each
        bot that may see it gets a `message` update."""
        chat = self.control_chat(body)
        if not body.get("from"):
            raise ControlError("from is required")
        sender = normalise_user(body["from"], "from")
        msg = self.user_message(chat, sender, body)
        self.deliver(msg)
        return self.render(msg, None)

    def c_messages(self, body, query):
        """Post many text messages: {"chat_id","from","texts":[...],
        "message_thread_id"?} -> {"message_ids":[...]}."""
        chat = self.control_chat(body)
        sender = normalise_user(body.get("from"), "from")
        texts = body.get("texts")
        if not isinstance(texts, list) or not texts:
            raise ControlError("texts must be a non-empty list")
        if len(texts) > 100_000:
            raise ControlError("at most 100000 texts at once")
        ids = []
        for text in texts:
            one = {"text": str(text), "message_thread_id": body.get("message_thread_id")}
            msg = self.user_message(chat, sender, one)
            self.deliver(msg)
            ids.append(msg.message_id)
        return {"message_ids": ids}

    def c_edit(self, body, query):
        """A user edits a message: {"chat_id","message_id","text"?,"entities"?,
        "caption"?,"caption_entities"?} -> the Message; bots that got the
        message get an `edited_message` update."""
        chat = self.control_chat(body)
        msg = chat.live(body.get("message_id"))
        if msg is None:
            raise ControlError("no such message", 404)
        try:
            if msg.text is not None:
                text = body.get("text")
                if not isinstance(text, str) or not text.strip():
                    raise ControlError("text is required for a text message")
                msg.text = text
                msg.entities = check_entities(body.get("entities"), text) or None
            else:
                caption = body.get("caption", body.get("text"))
                msg.caption = caption or None
                msg.caption_entities = check_entities(
                    body.get("caption_entities", body.get("entities")), caption or "") or None
        except ApiError as e:
            raise ControlError(e.description)
        msg.edit_date = body.get("edit_date") or self.now()
        msg.edits += 1
        self.deliver(msg, "edited_message")
        return self.render(msg, None)

    def c_delete(self, body, query):
        """A user deletes a message: {"chat_id","message_id"} (Telegram sends
        bots no update for it)."""
        chat = self.control_chat(body)
        msg = chat.live(body.get("message_id"))
        if msg is None:
            raise ControlError("no such message", 404)
        msg.deleted = True
        return {"ok": True}

    def c_reaction(self, body, query):
        """A user reacts: {"chat_id","message_id","user","new_reaction":[...]}.
        Administrator bots that listed message_reaction in allowed_updates get a
        `message_reaction` update with old_reaction computed."""
        chat = self.control_chat(body)
        msg = chat.live(body.get("message_id"))
        if msg is None:
            raise ControlError("no such message", 404)
        user = normalise_user(body.get("user"), "user")
        new = body.get("new_reaction", [])
        if not isinstance(new, list):
            raise ControlError("new_reaction must be a list")
        old = msg.user_reactions.get(user["id"], [])
        if new:
            msg.user_reactions[user["id"]] = new
        else:
            msg.user_reactions.pop(user["id"], None)
        self.remember_user(user, chat)
        delivered = []
        if old != new:
            update = {"chat": chat.brief(), "message_id": msg.message_id, "user": user,
                      "date": self.now(), "old_reaction": old, "new_reaction": new}
            if chat.bot_is_admin:
                for bot in self.bots.values():
                    if bot.allowed_updates and "message_reaction" in bot.allowed_updates:
                        bot.push("message_reaction", dict(update))
                        delivered.append(bot.id)
        return {"old_reaction": old, "new_reaction": new, "delivered_to": delivered}

    def c_migrate(self, body, query):
        """Upgrade a group to a supergroup: {"chat_id","by"?} ->
        {"new_chat_id"}."""
        old = self.control_chat(body)
        if old.type != "group":
            raise ControlError("only a group can be upgraded")
        new_id = body.get("new_chat_id") or -(10**12 + abs(old.id))
        while new_id in self.chats:
            new_id -= 1
        by = normalise_user(body["by"], "by") if body.get("by") else self.default_sender(old, {})
        new = Chat(new_id, "supergroup", old.title, bot_is_admin=old.bot_is_admin,
                   bot_rights=old.bot_rights, admins=old.admins, creator=old.creator,
                   members=list(old.members.values()), username=old.username)
        new.migrated_from = old.id
        self.chats[new_id] = new
        self.service_message(old, by, {"migrate_to_chat_id": new_id})
        old.migrated_to = new_id
        self.service_message(new, by, {"migrate_from_chat_id": old.id})
        return {"new_chat_id": new_id}

    def c_ratelimit(self, body, query):
        """Limit the sending calls in a chat: {"chat_id","calls","per_secs",
        "retry_after"?}; calls=0 removes the limit."""
        chat = self.chats.get(body.get("chat_id"))
        if chat is None:
            raise ControlError("no such chat", 404)
        calls = int(body.get("calls") or 0)
        if calls <= 0:
            chat.rate_limit = None
        else:
            per = float(body.get("per_secs") or 1)
            retry = body.get("retry_after")
            chat.rate_limit = RateLimit(calls, per, int(retry) if retry is not None else None)
        return {"ok": True}

    def c_fault(self, body, query):
        """Make the next `count` calls of a method fail: {"method" ("*" for
        any), "status", "description"?, "count"?, "parameters"?, "token"?,
        "delay_secs"?, "raw_body"?}."""
        method = body.get("method")
        if not isinstance(method, str) or not method:
            raise ControlError("method is required")
        status = int(body.get("status") or 500)
        default = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                   409: "Conflict", 429: "Too Many Requests: retry after 5", 500: "Internal Server Error",
                   502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
        parameters = body.get("parameters")
        if status == 429 and parameters is None:
            parameters = {"retry_after": 5}
        self.faults.append({
            "method": method.lower(), "status": status,
            "description": body.get("description") or default.get(status, "Internal Server Error"),
            "count": int(body.get("count") or 1), "parameters": parameters,
            "token": body.get("token"), "delay": float(body.get("delay_secs") or 0),
            "raw_body": body.get("raw_body"),
        })
        return {"ok": True, "pending_faults": len(self.faults)}

    def c_clock(self, body, query):
        """Move the emulator's clock (message dates, the 48-hour deletion
        window): {"advance_secs"} -> {"now"}."""
        self.clock_offset += int(body.get("advance_secs") or 0)
        return {"now": self.now()}

    def c_sent(self, body, query):
        """GET ?chat_id=X: every message the bots sent in that chat, in order,
        in its current state."""
        chat = self.chats.get(self.query_int(query, "chat_id"))
        if chat is None:
            raise ControlError("no such chat", 404)
        return [self.inspect(m) for m in chat.sent]

    def c_message_get(self, body, query):
        """GET ?chat_id=X&message_id=N: any message's current state."""
        chat = self.chats.get(self.query_int(query, "chat_id"))
        msg = chat.messages.get(self.query_int(query, "message_id")) if chat else None
        if msg is None:
            raise ControlError("no such message", 404)
        return self.inspect(msg)

    def c_calls(self, body, query):
        """GET: every Bot API call in order (?method= filters); DELETE clears."""
        method = query.get("method")
        return [c for c in self.calls if method is None or c["method"].lower() == method.lower()]

    def c_calls_clear(self, body, query):
        self.calls.clear()
        return {"ok": True}

    def c_updates_pending(self, body, query):
        """GET ?token=T -> {"pending": number of unconfirmed updates}."""
        bot = self.bots.get(query.get("token"))
        if bot is None:
            raise ControlError("no such bot", 404)
        return {"pending": len(bot.queue)}

    @staticmethod
    def query_int(query, name):
        try:
            return int(query.get(name))
        except (TypeError, ValueError):
            raise ControlError(f"{name} must be an integer")

    CONTROL = {
        ("POST", "reset"): "c_reset",
        ("POST", "bot"): "c_bot",
        ("POST", "chat"): "c_chat",
        ("POST", "user_photo"): "c_user_photo",
        ("POST", "topic"): "c_topic",
        ("POST", "message"): "c_message",
        ("GET", "message"): "c_message_get",
        ("POST", "messages"): "c_messages",
        ("POST", "edit"): "c_edit",
        ("POST", "delete"): "c_delete",
        ("POST", "reaction"): "c_reaction",
        ("POST", "migrate"): "c_migrate",
        ("POST", "ratelimit"): "c_ratelimit",
        ("POST", "fault"): "c_fault",
        ("POST", "clock"): "c_clock",
        ("GET", "sent"): "c_sent",
        ("GET", "calls"): "c_calls",
        ("DELETE", "calls"): "c_calls_clear",
        ("GET", "updates_pending"): "c_updates_pending",
    }


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


def tg_response(payload, status=200):
    return web.Response(status=status, text=dumps(payload), content_type="application/json")


def tg_error(e):
    body = {"ok": False, "error_code": e.status, "description": e.description}
    if e.parameters:
        body["parameters"] = e.parameters
    return tg_response(body, e.status)


async def read_params(request):
    """The request's parameters and uploaded files (part name -> Upload)."""
    params = {}
    for k, v in request.query.items():
        params.setdefault(k, v)
    files = {}
    ctype = request.content_type
    if ctype == "multipart/form-data":
        reader = await request.multipart()
        total = 0
        too_large = False
        while True:
            part = await reader.next()
            if part is None:
                break
            if isinstance(part, MultipartReader):
                continue  # nested multipart: not something the Bot API takes
            _, disp = parse_content_disposition(part.headers.get(hdrs.CONTENT_DISPOSITION))
            name = part.name or ""
            is_file = "filename" in disp or "filename*" in disp
            chunks = []
            size = 0
            while True:
                chunk = await part.read_chunk(256 * 1024)
                if not chunk:
                    break
                size += len(chunk)
                total += len(chunk)
                if total > 4 * MAX_REQUEST_BYTES:
                    raise ApiError(413, "Request Entity Too Large")
                if size > MAX_UPLOAD_BYTES or total > MAX_REQUEST_BYTES:
                    too_large = True
                if not too_large:
                    chunks.append(chunk)
            if too_large:
                continue  # keep reading, to answer the client properly
            data = b"".join(chunks)
            if is_file:
                files[name] = Upload(name, part.filename or "", part.headers.get(hdrs.CONTENT_TYPE), data)
            else:
                params[name] = data.decode("utf-8", errors="replace")
        if too_large:
            raise ApiError(413, "Request Entity Too Large")
        return params, files
    if request.can_read_body:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, "Request Entity Too Large")
        if len(raw) > MAX_REQUEST_BYTES:
            raise ApiError(413, "Request Entity Too Large")
        if ctype == "application/json":
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise bad_request("can't parse JSON encoded request")
                if not isinstance(body, dict):
                    raise bad_request("JSON request must be an object")
                params.update(body)
        elif ctype == "application/x-www-form-urlencoded":
            for k, v in parse_qsl(raw.decode("utf-8", errors="replace"), keep_blank_values=True):
                params[k] = v
    return params, files


def loggable(params, files):
    out = dict(params)
    for name, upload in files.items():
        out[name] = upload.describe()
    return out


class Server:
    def __init__(self, emulator):
        self.emu = emulator

    async def handle(self, request):
        raw_path = request.rel_url.raw_path
        started = time.monotonic()
        try:
            if raw_path.startswith("/_control/"):
                response = await self.control(request, raw_path[len("/_control/"):])
            elif raw_path.startswith("/file/bot"):
                response = await self.download(request, raw_path[len("/file/"):])
            elif raw_path.startswith("/bot"):
                response = await self.bot_api(request, raw_path[1:])
            else:
                response = tg_error(ApiError(404, "Not Found"))
        except asyncio.CancelledError:
            log(f"{request.method} {self.describe(raw_path)} -> client went away")
            raise
        ms = (time.monotonic() - started) * 1000
        log(f"{request.method} {self.describe(raw_path)} -> {response.status} ({ms:.0f} ms)")
        return response

    def describe(self, raw_path):
        """A path for the log, with the token replaced by the bot's id."""
        m = re.match(r"^/(file/)?bot([^/]*)(/.*)?$", raw_path)
        if not m:
            return raw_path
        bot = self.emu.bots.get(unquote(m.group(2)))
        who = f"bot#{bot.id}" if bot else "bot#?"
        return f"/{m.group(1) or ''}{who}{m.group(3) or ''}"

    async def bot_api(self, request, rest):
        """/bot<token>/<method>"""
        segments = rest.split("/")
        if len(segments) != 2 or not segments[1]:
            return tg_error(ApiError(404, "Not Found"))
        token = unquote(segments[0][len("bot"):])
        method = unquote(segments[1])
        entry = {"method": method, "params": {}, "status": None, "time": time.time()}
        bot = self.emu.bots.get(token)
        if bot is not None:
            entry["bot_id"] = bot.id
        self.emu.calls.append(entry)
        try:
            params, files = await read_params(request)
            entry["params"] = loggable(params, files)
            fault = self.emu.take_fault(method, token)
            if fault is not None:
                if fault["delay"]:
                    await asyncio.sleep(fault["delay"])
                entry["fault"] = True
                if fault["raw_body"] is not None:
                    response = web.Response(status=fault["status"], text=fault["raw_body"],
                                            content_type="text/html")
                    entry["status"] = fault["status"]
                    return response
                raise ApiError(fault["status"], fault["description"], fault["parameters"])
            if bot is None:
                raise ApiError(401, "Unauthorized")
            handler = self.emu.method(method)
            if handler is None:
                raise ApiError(404, "Not Found")
            result = await handler(bot, params, files)
            entry["status"] = 200
            return tg_response({"ok": True, "result": result})
        except ApiError as e:
            entry["status"] = e.status
            entry["description"] = e.description
            return tg_error(e)
        except asyncio.CancelledError:
            entry["status"] = 499  # the client closed the connection
            raise
        except Exception as e:  # a bug in the emulator: say so loudly
            log(f"internal error in {method}: {e!r}")
            import traceback
            traceback.print_exc()
            entry["status"] = 500
            return tg_error(ApiError(500, f"Internal Server Error: emulator bug: {e!r}"))

    async def download(self, request, rest):
        """/file/bot<token>/<file_path>, the path possibly with %2F."""
        token_part, _, path = rest.partition("/")
        token = unquote(token_part[len("bot"):])
        if token not in self.emu.bots:
            return tg_error(ApiError(401, "Unauthorized"))
        f = self.emu.files.by_path.get(unquote(path))
        if f is None:
            return tg_error(ApiError(404, "Not Found"))
        ctype = mimetypes.guess_type(f.path)[0] or "application/octet-stream"
        return web.Response(body=f.data, content_type=ctype)

    async def control(self, request, name):
        query = dict(request.query)
        if request.method == "GET" and name == "file":
            return self.control_file(query)
        handler_name = self.emu.CONTROL.get((request.method, name))
        if handler_name is None:
            return web.json_response({"error": f"no control endpoint {request.method} {name}"}, status=404)
        body = {}
        if request.method == "POST" and request.can_read_body:
            try:
                raw = await request.read()
                body = json.loads(raw) if raw.strip() else {}
            except web.HTTPRequestEntityTooLarge:
                return web.json_response({"error": "request too large"}, status=413)
            except ValueError:
                return web.json_response({"error": "body must be JSON"}, status=400)
            if not isinstance(body, dict):
                return web.json_response({"error": "body must be a JSON object"}, status=400)
        try:
            result = getattr(self.emu, handler_name)(body, query)
        except ControlError as e:
            return web.json_response({"error": e.message}, status=e.status, dumps=dumps)
        return web.json_response(result, dumps=dumps)

    def control_file(self, query):
        """GET /_control/file?file_id=X: the raw bytes of any stored file
        (any bot's file_id, or a file_unique_id)."""
        key = query.get("file_id", "")
        f, _ = self.emu.files.lookup(key)
        if f is None:
            f = self.emu.files.by_unique_id.get(key)
        if f is None:
            return web.json_response({"error": "no such file"}, status=404)
        return web.Response(body=f.data, content_type="application/octet-stream")


async def serve(port, max_file_store_bytes):
    emulator = Emulator(max_file_store_bytes)
    server = Server(emulator)
    app = web.Application(client_max_size=MAX_CONTROL_BYTES)
    app.router.add_route("*", "/{tail:.*}", server.handle)
    # handler_cancellation: a client that gives up on a long poll ends it, so
    # it can't be "terminated by other getUpdates request" later.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main():
    parser = argparse.ArgumentParser(description="Telegram Bot API emulator for the tests")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--max-file-store-mb", type=int, default=1024,
                        help="total size of the files kept in memory")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.max_file_store_mb * MiB))


if __name__ == "__main__":
    main()
