-- What each client was exposed to, per rule and experiment (empty: the
-- rule's own exposure, by its first mail), and what followed: the rows
-- behind `nudge report` and /api/reports. Written with the batch that
-- causes each change; rebuilt by `nudge replay` from the client states.
CREATE TABLE exposures (
    rule             TEXT NOT NULL,
    experiment       TEXT NOT NULL,
    client_id        TEXT NOT NULL,
    variant          TEXT NOT NULL,
    -- In the global control group: marketing mail was held out.
    held_out         INTEGER NOT NULL,
    exposed_at       TEXT NOT NULL,
    -- The rule's goal at exposure: {event, within_days, min_total}.
    goal             TEXT,
    mails            INTEGER NOT NULL,
    opened           INTEGER NOT NULL,
    clicked          INTEGER NOT NULL,
    converted_at     TEXT,
    revenue          REAL,
    conversion_event TEXT,
    PRIMARY KEY (rule, experiment, client_id)
);
CREATE INDEX exposures_by_client ON exposures (client_id);
