-- comfyq schema for PostgreSQL, version 4: who created a job (as migrations/0004 for SQLite).
--
-- owner is the creating API key's id (``k_`` + 16 hex digits of its SHA-256), never the key;
-- NULL for jobs created without authentication (or by the CLI). A client key sees only its own
-- jobs, so its listing reads this index in the jobs table's listing order.
ALTER TABLE jobs ADD COLUMN owner text;

CREATE INDEX jobs_owner_created ON jobs (owner, created_at DESC, id DESC);

-- The dashboard's state filters, newest first, stay index reads however many jobs there are.
CREATE INDEX jobs_state_created ON jobs (state, created_at DESC, id DESC);
