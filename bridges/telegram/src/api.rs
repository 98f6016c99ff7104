//! The Bot API methods the bridge uses, behind a small trait ([`BotApi`]), and
//! their implementation on teloxide-core ([`TeloxideBot`]).
//!
//! Errors come back as [`ApiError`], sorted by what the bridge does about them:
//! wait (`retry_after`), follow a group that became a supergroup, accept (an edit
//! that changes nothing), refuse to the sender, or try again later.

use std::time::Duration;

use async_trait::async_trait;
use teloxide_core::payloads::{
    EditMessageTextSetters, GetUpdatesSetters, SendMessageSetters, SetMessageReactionSetters,
};
use teloxide_core::requests::{Request, Requester};
use teloxide_core::types::{
    AllowedUpdate, ChatAction, ChatId, ChatMemberKind, FileId, InputFile, MessageEntity, MessageEntityKind, MessageId,
    ReactionType, Recipient, ReplyParameters, ThreadId, Update,
};
use teloxide_core::{ApiError as TgApiError, Bot, RequestError};
use thiserror::Error;

/// Why a Bot API call did not do what was asked.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ApiError {
    /// Flood control: the call may be repeated after this long.
    #[error("Telegram asks to wait {0:?}")]
    RetryAfter(Duration),
    /// The group became a supergroup with this id.
    #[error("the group is now the supergroup {0}")]
    Migrated(i64),
    /// An edit that changes nothing.
    #[error("the message is already like that")]
    NotModified,
    /// Another process polls with the same token.
    #[error("another process is reading this bot's updates (HTTP 409): only one may")]
    Conflict,
    /// The token is not valid.
    #[error("Telegram does not accept the bot token")]
    Unauthorized,
    /// Telegram refused the call; the text says why.
    #[error("{0}")]
    Refused(String),
    /// Telegram could not be reached, or answered with a server error.
    #[error("{0}")]
    Unavailable(String),
}

/// The bot, as `getMe` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotInfo {
    pub id: u64,
    pub username: String,
    /// False while privacy mode is on: the bot sees only commands, mentions and replies.
    pub can_read_all_group_messages: bool,
}

/// What kind of span an outgoing entity is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntityKind {
    Bold,
    Italic,
    Strike,
    Code,
    Pre,
    Blockquote,
    Link(String),
}

/// An entity of an outgoing text, in UTF-16 code units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    pub kind: EntityKind,
    pub offset: usize,
    pub length: usize,
}

/// A text to send or to put in place of an earlier one. Never sent with a parse
/// mode: styling travels as entities only, so no text can fail to parse.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutgoingText {
    pub text: String,
    pub entities: Vec<Entity>,
    /// The message this one answers.
    pub reply_to: Option<i32>,
}

/// Where a message goes: a chat, and in a forum supergroup one of its topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub chat: i64,
    pub topic: Option<i32>,
}

/// A chat administrator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub user_id: u64,
    pub name: String,
    pub creator: bool,
}

/// The Bot API methods the bridge uses.
#[async_trait]
pub trait BotApi: Send + Sync + 'static {
    async fn get_me(&self) -> Result<BotInfo, ApiError>;
    /// Updates from `offset` on (which confirms those before it), waiting up to `timeout`.
    async fn get_updates(&self, offset: i32, timeout: Duration) -> Result<Vec<Update>, ApiError>;
    /// Send a text; the message id Telegram gave it.
    async fn send_text(&self, to: Target, text: &OutgoingText) -> Result<i32, ApiError>;
    async fn edit_text(&self, chat: i64, message: i32, text: &OutgoingText) -> Result<(), ApiError>;
    async fn delete(&self, chat: i64, message: i32) -> Result<(), ApiError>;
    /// Set the bot's one reaction on a message (`None` removes it).
    async fn react(&self, chat: i64, message: i32, emoji: Option<&str>) -> Result<(), ApiError>;
    async fn typing(&self, to: Target) -> Result<(), ApiError>;
    async fn admins(&self, chat: i64) -> Result<Vec<Admin>, ApiError>;
    /// The size and the download path of a file (`getFile`).
    async fn file_path(&self, file_id: &str) -> Result<(u64, String), ApiError>;
    /// Download a file by its path, at most `limit` bytes.
    async fn download(&self, path: &str, limit: usize) -> Result<Vec<u8>, ApiError>;
    /// Send a file (a photo shown as one, or a document) with `caption`.
    async fn send_file(&self, to: Target, file: OutgoingFile, caption: &OutgoingText) -> Result<i32, ApiError>;
}

/// A file to send.
#[derive(Debug, Clone)]
pub struct OutgoingFile {
    pub bytes: Vec<u8>,
    pub name: String,
    /// Sent with `sendPhoto` (shown as a picture) rather than `sendDocument`.
    pub photo: bool,
}

/// The most bytes the Bot API lets a bot download (`getFile`).
pub const MAX_DOWNLOAD_BYTES: u64 = 20 * 1024 * 1024;
/// The most bytes a bot may upload.
pub const MAX_UPLOAD_BYTES: u64 = 50 * 1024 * 1024;
/// The most bytes a photo may have (`sendPhoto`); larger pictures go as documents.
pub const MAX_PHOTO_BYTES: u64 = 10 * 1024 * 1024;

/// [`BotApi`] on teloxide-core's `Bot`.
pub struct TeloxideBot {
    bot: Bot,
}

impl TeloxideBot {
    /// A bot on the Bot API server at `api_url` (Telegram's, a self-hosted one, a test's).
    /// Requests wait at most `poll_timeout` plus some slack (long polls wait that long).
    pub fn new(token: &str, api_url: &str, poll_timeout: Duration) -> Result<Self, ApiError> {
        let url = url::Url::parse(api_url).map_err(|e| ApiError::Refused(format!("`{api_url}` is not a URL: {e}")))?;
        let client = teloxide_core::net::default_reqwest_settings()
            .timeout(poll_timeout + Duration::from_secs(15))
            .build()
            .map_err(|e| ApiError::Unavailable(format!("cannot make an HTTP client: {e}")))?;
        Ok(TeloxideBot { bot: Bot::with_client(token, client).set_api_url(url) })
    }
}

fn tg_error(e: RequestError) -> ApiError {
    match e {
        RequestError::RetryAfter(s) => ApiError::RetryAfter(s.duration()),
        RequestError::MigrateToChatId(id) => ApiError::Migrated(id.0),
        RequestError::Api(TgApiError::MessageNotModified) => ApiError::NotModified,
        RequestError::Api(TgApiError::TerminatedByOtherGetUpdates) => ApiError::Conflict,
        RequestError::Api(TgApiError::InvalidToken) => ApiError::Unauthorized,
        RequestError::Api(e) => ApiError::Refused(e.to_string()),
        RequestError::Network(e) => ApiError::Unavailable(format!("Telegram cannot be reached: {e}")),
        RequestError::InvalidJson { source, .. } => {
            ApiError::Unavailable(format!("Telegram's answer could not be read: {source}"))
        }
        RequestError::Io(e) => ApiError::Unavailable(e.to_string()),
    }
}

fn entities(text: &OutgoingText) -> Vec<MessageEntity> {
    text.entities
        .iter()
        .filter_map(|e| {
            let kind = match &e.kind {
                EntityKind::Bold => MessageEntityKind::Bold,
                EntityKind::Italic => MessageEntityKind::Italic,
                EntityKind::Strike => MessageEntityKind::Strikethrough,
                EntityKind::Code => MessageEntityKind::Code,
                EntityKind::Pre => MessageEntityKind::Pre { language: None },
                EntityKind::Blockquote => MessageEntityKind::Blockquote,
                // A link Telegram would refuse is left as text.
                EntityKind::Link(url) => MessageEntityKind::TextLink { url: url.parse().ok()? },
            };
            Some(MessageEntity { kind, offset: e.offset, length: e.length })
        })
        .collect()
}

/// A reply to `message`, sent also when that message is gone.
fn reply_to(message: i32) -> ReplyParameters {
    ReplyParameters { message_id: MessageId(message), allow_sending_without_reply: Some(true), ..Default::default() }
}

fn recipient(chat: i64) -> Recipient {
    Recipient::Id(ChatId(chat))
}

#[async_trait]
impl BotApi for TeloxideBot {
    async fn get_me(&self) -> Result<BotInfo, ApiError> {
        let me = self.bot.get_me().send().await.map_err(tg_error)?;
        Ok(BotInfo {
            id: me.user.id.0,
            username: me.user.username.clone().unwrap_or_default(),
            can_read_all_group_messages: me.can_read_all_group_messages,
        })
    }

    async fn get_updates(&self, offset: i32, timeout: Duration) -> Result<Vec<Update>, ApiError> {
        self.bot
            .get_updates()
            .offset(offset)
            .timeout(u32::try_from(timeout.as_secs()).unwrap_or(30))
            .limit(100)
            .allowed_updates(vec![AllowedUpdate::Message, AllowedUpdate::EditedMessage, AllowedUpdate::MessageReaction])
            .send()
            .await
            .map_err(tg_error)
    }

    async fn send_text(&self, to: Target, text: &OutgoingText) -> Result<i32, ApiError> {
        let mut req = self.bot.send_message(recipient(to.chat), text.text.clone());
        let ents = entities(text);
        if !ents.is_empty() {
            req = req.entities(ents);
        }
        if let Some(topic) = to.topic {
            req = req.message_thread_id(ThreadId(MessageId(topic)));
        }
        if let Some(reply) = text.reply_to {
            req = req.reply_parameters(reply_to(reply));
        }
        Ok(req.send().await.map_err(tg_error)?.id.0)
    }

    async fn edit_text(&self, chat: i64, message: i32, text: &OutgoingText) -> Result<(), ApiError> {
        let mut req = self.bot.edit_message_text(recipient(chat), MessageId(message), text.text.clone());
        let ents = entities(text);
        if !ents.is_empty() {
            req = req.entities(ents);
        }
        req.send().await.map(|_| ()).map_err(tg_error)
    }

    async fn delete(&self, chat: i64, message: i32) -> Result<(), ApiError> {
        self.bot.delete_message(recipient(chat), MessageId(message)).send().await.map(|_| ()).map_err(tg_error)
    }

    async fn react(&self, chat: i64, message: i32, emoji: Option<&str>) -> Result<(), ApiError> {
        let reaction: Vec<ReactionType> =
            emoji.map(|e| ReactionType::Emoji { emoji: e.to_owned() }).into_iter().collect();
        self.bot
            .set_message_reaction(recipient(chat), MessageId(message))
            .reaction(reaction)
            .send()
            .await
            .map(|_| ())
            .map_err(tg_error)
    }

    async fn typing(&self, to: Target) -> Result<(), ApiError> {
        use teloxide_core::payloads::SendChatActionSetters;
        let mut req = self.bot.send_chat_action(recipient(to.chat), ChatAction::Typing);
        if let Some(topic) = to.topic {
            req = req.message_thread_id(ThreadId(MessageId(topic)));
        }
        req.send().await.map(|_| ()).map_err(tg_error)
    }

    async fn file_path(&self, file_id: &str) -> Result<(u64, String), ApiError> {
        let file = self.bot.get_file(FileId(file_id.to_owned())).send().await.map_err(tg_error)?;
        Ok((u64::from(file.meta.size), file.path))
    }

    async fn download(&self, path: &str, limit: usize) -> Result<Vec<u8>, ApiError> {
        use futures::StreamExt;
        use teloxide_core::net::Download;
        let mut stream = self.bot.download_file_stream(path);
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ApiError::Unavailable(format!("the file could not be downloaded: {e}")))?;
            if out.len() + chunk.len() > limit {
                return Err(ApiError::Refused("the file is too big".into()));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    async fn send_file(&self, to: Target, file: OutgoingFile, caption: &OutgoingText) -> Result<i32, ApiError> {
        use teloxide_core::payloads::{SendDocumentSetters, SendPhotoSetters};
        let input = InputFile::memory(file.bytes).file_name(file.name);
        let ents = entities(caption);
        let reply = caption.reply_to.map(reply_to);
        // sendPhoto and sendDocument take the same caption, topic and reply settings
        // (each through its own setter trait).
        macro_rules! placed {
            ($req:expr) => {{
                let mut req = $req;
                if !caption.text.is_empty() {
                    req = req.caption(caption.text.clone());
                    if !ents.is_empty() {
                        req = req.caption_entities(ents);
                    }
                }
                if let Some(topic) = to.topic {
                    req = req.message_thread_id(ThreadId(MessageId(topic)));
                }
                if let Some(reply) = reply {
                    req = req.reply_parameters(reply);
                }
                req.send().await
            }};
        }
        let sent = if file.photo {
            placed!(self.bot.send_photo(recipient(to.chat), input))
        } else {
            placed!(self.bot.send_document(recipient(to.chat), input))
        };
        Ok(sent.map_err(tg_error)?.id.0)
    }

    async fn admins(&self, chat: i64) -> Result<Vec<Admin>, ApiError> {
        let members = self.bot.get_chat_administrators(recipient(chat)).send().await.map_err(tg_error)?;
        Ok(members
            .into_iter()
            .filter(|m| !m.user.is_bot)
            .map(|m| Admin {
                user_id: m.user.id.0,
                name: crate::incoming::display_name(&m.user),
                creator: matches!(m.kind, ChatMemberKind::Owner(_)),
            })
            .collect())
    }
}
