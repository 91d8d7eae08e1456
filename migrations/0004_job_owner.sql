-- comfyq schema, version 4: who created a job, for API keys with roles (comfyq/api/auth.py).
--
-- owner is the creating API key's id (``k_`` + 16 hex digits of its SHA-256), never the key;
-- NULL for jobs created without authentication (or by the CLI). A client key sees only its own
-- jobs, so its listing reads this index in the jobs table's listing order.
ALTER TABLE jobs ADD COLUMN owner TEXT;

CREATE INDEX jobs_owner_created ON jobs (owner, created_at DESC, id DESC);

-- The dashboard's state filters, newest first, stay index reads at 100k jobs (a rare state
-- otherwise scans the whole listing index to fill one page).
CREATE INDEX jobs_state_created ON jobs (state, created_at DESC, id DESC);
