-- Replays and backtests walk the shop's events in event-time order
-- (`events_page`: keyed by occurred_at, stream_seq, id). Without an index in
-- that order every page scanned and sorted the whole log, so a walk took time
-- quadratic in its length. PostgreSQL has had this index since 0001.
CREATE INDEX IF NOT EXISTS events_replay ON events (occurred_at, stream_seq, id) WHERE stream_seq IS NOT NULL;
