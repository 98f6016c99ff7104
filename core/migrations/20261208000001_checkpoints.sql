-- Where each bridge resumes reading its network (a Telegram poll offset, a Matrix
-- sync token, the last Discord message bridged per channel), by name.
CREATE TABLE checkpoints (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_us BIGINT NOT NULL
);
