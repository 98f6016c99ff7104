-- The durable outbox: one row per event copy waiting to leave the process for one
-- destination network, in order. A row is removed right before its event is
-- written to the destination; rows left after a crash are replayed on start.
CREATE TABLE outbox (
    seq         BIGINT PRIMARY KEY,
    destination TEXT NOT NULL,
    event       TEXT NOT NULL,
    created_us  BIGINT NOT NULL
);

-- Where each XMPP account stands in each room (personal rooms), so a restart
-- rejoins the remote rooms and keeps serving the devices that were in them.
CREATE TABLE room_sessions (
    room       TEXT NOT NULL,
    account    TEXT NOT NULL,
    nick       TEXT NOT NULL,
    password   TEXT,
    -- Full JIDs of the account's devices in the room, one per line.
    resources  TEXT NOT NULL,
    updated_us BIGINT NOT NULL,
    PRIMARY KEY (room, account)
);
