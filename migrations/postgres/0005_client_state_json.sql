-- A client's state is nudge's own, read and written whole by nudge and never
-- queried inside by SQL: kept as `json` (the text, checked once) rather
-- than `jsonb`, the server no longer converts about 2 KiB of it into its
-- binary form on every write and back into text on every read.
ALTER TABLE clients ALTER COLUMN state TYPE json USING state::json;
