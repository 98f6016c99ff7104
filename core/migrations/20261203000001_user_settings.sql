-- Each XMPP account's own settings for one target on one network (an IRC
-- server: nick, SASL login, server password, on-connect commands), as JSON.
-- They take precedence over the admin's defaults for that target.
CREATE TABLE user_settings (
    account    TEXT NOT NULL,
    network    TEXT NOT NULL,
    target     TEXT NOT NULL,
    settings   TEXT NOT NULL,
    updated_us BIGINT NOT NULL,
    PRIMARY KEY (account, network, target)
);
