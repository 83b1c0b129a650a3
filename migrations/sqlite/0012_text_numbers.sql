-- The numbers nudge has texted, with the client each belongs to: a reply
-- STOP names only the number, and is honoured for the client texted there.
-- Written before each text is sent; erased with the client.
CREATE TABLE text_numbers (
    phone     TEXT PRIMARY KEY,
    client_id TEXT NOT NULL
);
CREATE INDEX text_numbers_client ON text_numbers (client_id);
