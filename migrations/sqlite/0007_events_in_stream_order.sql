-- Replays and backtests walk the shop's events in the order of the stream,
-- the order the daemon decides them in (`events_page`: keyed by stream_seq,
-- id), so that they decide what it decided, late events included. The index
-- in event-time order that walks used before goes: nothing else reads it,
-- and each index costs every event insert.
CREATE INDEX IF NOT EXISTS events_log_order ON events (stream_seq, id) WHERE stream_seq IS NOT NULL;
DROP INDEX IF EXISTS events_replay;
