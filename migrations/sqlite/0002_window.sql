-- The consumer's window: every message some instance pulled and has not yet
-- been passed by the stream's ack floor, with its client. An instance applies
-- an event only when every earlier message of the stream is known here and
-- none of the same client is still pending elsewhere: so each client's
-- events are applied in stream order across instances.
CREATE TABLE inflight (
    seq         INTEGER PRIMARY KEY,
    client_id   TEXT,
    owner       TEXT NOT NULL,
    done        INTEGER NOT NULL DEFAULT 0,
    lease_until TEXT NOT NULL
);
CREATE INDEX inflight_pending ON inflight (client_id, seq) WHERE done = 0;
