-- A copy written to a destination that acknowledges later (an IRC server's PONG
-- or echo) stays in the outbox until it does. `written_us` says when it was
-- written (0: not yet): after a crash such a copy is in doubt. It may or may not
-- have arrived, so it is not sent again; its sender is told instead.
ALTER TABLE outbox ADD COLUMN written_us BIGINT NOT NULL DEFAULT 0;
