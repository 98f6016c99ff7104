-- Accounts of the embedded XMPP server: SCRAM credentials only, never a password.
CREATE TABLE local_users (
    jid          TEXT PRIMARY KEY,
    scram_sha1   TEXT NOT NULL,
    scram_sha256 TEXT NOT NULL,
    created_us   BIGINT NOT NULL
);

-- Rosters of the embedded server's accounts (RFC 6121).
CREATE TABLE roster (
    owner        TEXT NOT NULL,
    contact      TEXT NOT NULL,
    name         TEXT,
    subscription TEXT NOT NULL,
    ask          TEXT,
    groups       TEXT NOT NULL,
    PRIMARY KEY (owner, contact)
);
