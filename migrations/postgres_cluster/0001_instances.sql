-- Several comfyq instances on one PostgreSQL database: who is there, and how they hear each other.
-- Applied by comfyq.cluster.pg after the store's own migrations (it needs job_events).

-- One row per instance that ever started; an instance updates heartbeat_at every few seconds and
-- sets stopped_at when it stops cleanly. Times are the database's own clock (no skew between boxes).
CREATE TABLE instances (
    id           TEXT PRIMARY KEY,                 -- the lease owner written on the jobs it claims
    name         TEXT NOT NULL,                    -- instance_name: host name and port by default
    url          TEXT NOT NULL DEFAULT '',         -- where the others reach its API (output files)
    roles        TEXT NOT NULL DEFAULT '',         -- comma separated
    backends     TEXT NOT NULL DEFAULT '',         -- its ComfyUI URLs, credentials removed
    host         TEXT NOT NULL DEFAULT '',
    pid          INTEGER NOT NULL DEFAULT 0,
    version      TEXT NOT NULL DEFAULT '',
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    stopped_at   TIMESTAMPTZ
);

CREATE INDEX instances_heartbeat ON instances (heartbeat_at DESC);

-- Every committed state change tells the other instances at once, without a payload worth the
-- name: the origin (application_name of the writing connection, the instance id) and the new
-- event row ids, or their range when a statement wrote many. Receivers read the rows themselves.
-- One NOTIFY per statement that writes job_events; Postgres folds identical ones in a transaction.
CREATE FUNCTION comfyq_notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n      bigint;
    lo     bigint;
    hi     bigint;
    ids    text;
BEGIN
    SELECT count(*), min(id), max(id) INTO n, lo, hi FROM new_events;
    IF n = 0 THEN
        RETURN NULL;
    END IF;
    IF n <= 200 THEN
        SELECT string_agg(id::text, ',' ORDER BY id) INTO ids FROM new_events;
    ELSE
        ids := lo::text || '-' || hi::text;
    END IF;
    PERFORM pg_notify('comfyq_events', current_setting('application_name') || '|' || ids);
    RETURN NULL;
END;
$$;

CREATE TRIGGER job_events_notify
AFTER INSERT ON job_events
REFERENCING NEW TABLE AS new_events
FOR EACH STATEMENT EXECUTE FUNCTION comfyq_notify_events();
