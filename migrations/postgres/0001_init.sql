-- The PostgreSQL schema: the same tables as SQLite's, with native types
-- (timestamptz, jsonb, boolean). Several nudge instances share it.

-- The event log from the beginning of time: replayable, with its context.
CREATE TABLE events (
    id          TEXT PRIMARY KEY,
    client_id   TEXT NOT NULL,
    type        TEXT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    year        INTEGER NOT NULL,
    month       INTEGER NOT NULL,
    day         INTEGER NOT NULL,
    data        JSONB NOT NULL,
    context     JSONB NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    stream_seq  BIGINT
);
CREATE INDEX events_client_time ON events (client_id, occurred_at);
CREATE INDEX events_type_time ON events (type, occurred_at);
CREATE INDEX events_date ON events (year, month, day);
CREATE INDEX events_replay ON events (occurred_at, stream_seq, id) WHERE stream_seq IS NOT NULL;

-- One row per client: searchable profile columns plus the whole derived
-- state; `version` is the optimistic-concurrency counter that serialises the
-- instances' writes to one client.
CREATE TABLE clients (
    client_id           TEXT PRIMARY KEY,
    version             BIGINT NOT NULL,
    email               TEXT,
    first_name          TEXT,
    last_name           TEXT,
    acquisition_channel TEXT,
    marketing_consent   BOOLEAN NOT NULL DEFAULT FALSE,
    unsubscribed        BOOLEAN NOT NULL DEFAULT FALSE,
    locale              TEXT,
    timezone            TEXT,
    first_seen          TIMESTAMPTZ,
    last_seen           TIMESTAMPTZ,
    -- The soonest pending timer (from `state`), for the scheduler to find.
    next_due            TIMESTAMPTZ,
    state               JSONB NOT NULL
);
CREATE INDEX clients_email ON clients (lower(email));
CREATE INDEX clients_next_due ON clients (next_due) WHERE next_due IS NOT NULL;
CREATE INDEX clients_last_seen ON clients (last_seen);

-- The transactional outbox: effects written with their cause, sent later.
CREATE TABLE outbox (
    key         TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    rule        TEXT NOT NULL,
    client_id   TEXT NOT NULL,
    -- What caused the effect: an event id, or a timer's or a sweep's id.
    cause       TEXT NOT NULL,
    payload     JSONB NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'sending', 'sent', 'failed')),
    attempts    BIGINT NOT NULL DEFAULT 0,
    due_at      TIMESTAMPTZ NOT NULL,
    lease_until TIMESTAMPTZ,
    last_error  TEXT,
    message_id  TEXT,
    created_at  TIMESTAMPTZ NOT NULL,
    sent_at     TIMESTAMPTZ
);
CREATE INDEX outbox_due ON outbox (status, due_at);
CREATE INDEX outbox_client ON outbox (client_id);

-- Envelopes that failed validation, with the reason. A redelivered message
-- (same stream sequence) is kept once.
CREATE TABLE rejected (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at TIMESTAMPTZ NOT NULL,
    subject     TEXT NOT NULL,
    stream_seq  BIGINT UNIQUE,
    reason      TEXT NOT NULL,
    -- Raw text, not jsonb: a rejected envelope is often not JSON at all.
    payload     TEXT NOT NULL
);

-- What nudge decided and did, per client, for support staff.
CREATE TABLE client_log (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_id TEXT NOT NULL,
    at        TIMESTAMPTZ NOT NULL,
    level     TEXT NOT NULL,
    rule      TEXT,
    event_id  TEXT,
    message   TEXT NOT NULL
);
CREATE INDEX client_log_client ON client_log (client_id, id);

-- Scheduled rules: the sweep in progress or last done, claimed with a lease
-- so that one instance runs each occurrence, resuming from `cursor` if the
-- instance that had it died.
CREATE TABLE schedules (
    rule        TEXT PRIMARY KEY,
    slot        TIMESTAMPTZ NOT NULL,
    cursor      TEXT,
    done        BOOLEAN NOT NULL DEFAULT FALSE,
    lease_until TIMESTAMPTZ NOT NULL
);

-- Every sweep that ran: a replay runs them again at their times.
CREATE TABLE sweep_log (
    rule TEXT NOT NULL,
    slot TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (rule, slot)
);

-- Counters shared by all clients, per period; `version` makes each update a
-- compare-and-swap so concurrent instances stay exact.
CREATE TABLE counters (
    name    TEXT NOT NULL,
    period  TEXT NOT NULL,
    value   DOUBLE PRECISION NOT NULL,
    version BIGINT NOT NULL,
    PRIMARY KEY (name, period)
);

-- Members of distinct counters ("clients who ...").
CREATE TABLE counter_members (
    name   TEXT NOT NULL,
    period TEXT NOT NULL,
    member TEXT NOT NULL,
    PRIMARY KEY (name, period, member)
);

-- Work for staff that rules hand out; the id is the effect key.
CREATE TABLE tasks (
    id         TEXT PRIMARY KEY,
    team       TEXT NOT NULL,
    title      TEXT NOT NULL,
    client_id  TEXT NOT NULL,
    rule       TEXT NOT NULL,
    cause      TEXT NOT NULL,
    data       JSONB NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('open', 'done')),
    at         TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    done_at    TIMESTAMPTZ
);
CREATE INDEX tasks_status ON tasks (status, created_at);
CREATE INDEX tasks_client ON tasks (client_id);

-- Small settings nudge keeps for itself (e.g. the unsubscribe signing key).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Clients erased on request (GDPR), by hash, and when.
CREATE TABLE erasures (
    client_id TEXT PRIMARY KEY,
    at        TIMESTAMPTZ NOT NULL
);
