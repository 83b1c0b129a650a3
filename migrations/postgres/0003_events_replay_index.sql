-- The index replays and backtests walk the event log by (`events_page`).
-- PostgreSQL's schema has had it since 0001; SQLite gets it in its own
-- 0003. This keeps the two schemas at the same version with the same indexes
-- (and does nothing where the index exists).
CREATE INDEX IF NOT EXISTS events_replay ON events (occurred_at, stream_seq, id) WHERE stream_seq IS NOT NULL;
