-- Every event and client write paid for these indexes, and nothing nudge
-- runs reads through them: the events by type and time and by calendar day
-- served ad-hoc reports only, and the staff search scans clients anyway
-- (it matches names and mails by pattern). An operator who reports on the
-- log can create the index their query needs.
DROP INDEX IF EXISTS events_type_time;
DROP INDEX IF EXISTS events_date;
DROP INDEX IF EXISTS clients_last_seen;
