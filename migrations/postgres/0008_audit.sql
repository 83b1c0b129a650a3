-- Who did what through the HTTP API: exports, erasures, rule runs, tasks
-- closed. A client is named only by its erasure hash (sha256 of the id), so
-- the record outlives the client's erasure without keeping their id.
CREATE TABLE audit (
    id      BIGSERIAL PRIMARY KEY,
    at      TIMESTAMPTZ NOT NULL,
    -- The token's name (`http.tokens.<name>`; `admin` for `http.token`).
    actor   TEXT NOT NULL,
    role    TEXT NOT NULL,
    -- `export`, `erase`, `rule_run`, `task_done`.
    action  TEXT NOT NULL,
    -- `client:<erasure hash>`, `rule:<name>`, `task:<id>`.
    target  TEXT NOT NULL,
    -- `ok`, `not_found`, or the refusal.
    outcome TEXT NOT NULL
);
CREATE INDEX audit_target ON audit (target, id);
