-- One process at a time consumes into a SQLite database (a lock file beside
-- it, `<database>-consumer.lock`), so its consumer window lives in that
-- process's memory: the table cost an insert, an update and a delete per
-- message on the one writer connection. PostgreSQL keeps its shared table.
DROP TABLE IF EXISTS inflight;
