-- PostgreSQL's 0005 keeps client states as `json` instead of `jsonb`;
-- SQLite has kept them as text from the start. This keeps the two schemas
-- at the same version.
SELECT 1;
