-- traqmilter recipient directory on PostgreSQL, schema version 1.
-- The tables and columns are exactly those of the SQLite store (docs/directory.md):
-- Postfix's pgsql: maps (contrib/postfix/pgsql-*.cf) query them for delivery, traqmilter
-- answers "is this recipient known" from them. Apply with `traqmilter directory init`,
-- which records the version in traqmilter_schema; never edit an applied migration, add
-- the next numbered file instead.

CREATE TABLE domains (
  name TEXT PRIMARY KEY NOT NULL
);

CREATE TABLE mailboxes (
  address     TEXT PRIMARY KEY NOT NULL,
  local_part  TEXT NOT NULL,
  domain      TEXT NOT NULL,
  maildir     TEXT NOT NULL,
  quota_bytes BIGINT NOT NULL DEFAULT 0,
  active      INTEGER NOT NULL DEFAULT 1,   -- 1 or 0, as in SQLite: the maps say active=1
  settings    TEXT NOT NULL DEFAULT '{}',   -- JSON object, the mailbox's settings
  created_by  TEXT NOT NULL DEFAULT 'admin',
  created_at  TEXT NOT NULL
);

CREATE TABLE aliases (
  address    TEXT PRIMARY KEY NOT NULL,
  target     TEXT NOT NULL,
  active     INTEGER NOT NULL DEFAULT 1,
  created_by TEXT NOT NULL DEFAULT 'admin'
);

-- Every committed change to the rows a lookup reads tells each traqmilter process to
-- forget its cached answers (LISTEN traqmilter_directory). Statement-level, so a bulk
-- import sends one notification, and whoever writes (traqmilter on any host, psql, an
-- admin panel) is covered.
CREATE FUNCTION traqmilter_directory_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('traqmilter_directory', TG_TABLE_NAME);
  RETURN NULL;
END
$$;

CREATE TRIGGER traqmilter_mailboxes_changed
  AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON mailboxes
  FOR EACH STATEMENT EXECUTE FUNCTION traqmilter_directory_changed();

CREATE TRIGGER traqmilter_aliases_changed
  AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON aliases
  FOR EACH STATEMENT EXECUTE FUNCTION traqmilter_directory_changed();
