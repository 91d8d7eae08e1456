-- comfyq schema for PostgreSQL, version 2: the webhook outbox (as migrations/0002 for SQLite).
--
-- When a job ends (completed, failed, cancelled) and its payload names a webhook URL, the trigger
-- below writes a delivery row in the same transaction that ended the job, whichever instance or
-- client ended it. Senders claim due rows with FOR UPDATE SKIP LOCKED, post them and record every
-- attempt. Delivery is at least once: receivers deduplicate on the webhook-id header, which is the
-- delivery's id and the same on every attempt.

CREATE TABLE webhook_deliveries (
    id               text PRIMARY KEY,     -- the webhook-id header
    job_id           text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    url              text NOT NULL,
    host             text NOT NULL,        -- host[:port] of url: caps concurrent posts per receiver
    secret           text,                 -- the request's signing secret, erased when the delivery ends
    event            text NOT NULL CHECK (event IN ('completed', 'failed', 'cancelled')),
    job_finished_at  timestamptz NOT NULL, -- which end of the job this reports (a retried job ends again)
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'sending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL,
    lease_owner      text,
    lease_expires_at timestamptz,
    last_status      integer,              -- HTTP status of the last attempt, if it got one
    last_error       text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    finished_at      timestamptz,
    CHECK ((state = 'sending') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK ((state IN ('delivered', 'failed')) = (finished_at IS NOT NULL)),
    CHECK (finished_at IS NULL OR secret IS NULL)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_sending ON webhook_deliveries (host) WHERE state = 'sending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id);

-- One row per attempt: when, how long, the HTTP status or the error, and what followed.
CREATE TABLE webhook_attempts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    delivery_id text NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     integer NOT NULL CHECK (attempt >= 1),
    at          timestamptz NOT NULL,
    duration_ms integer,
    status_code integer,
    error       text,
    outcome     text NOT NULL CHECK (outcome IN ('delivered', 'retry', 'gave_up'))
);

CREATE INDEX webhook_attempts_job ON webhook_attempts (job_id, id);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id);

-- The host (without any user info) is cut out of the URL here, because any client may end a job.
-- It only groups deliveries for fairness, so an odd URL costs nothing worse than a shared group.
-- json_typeof checks keep a malformed payload from aborting the job's own update.
-- Named so that it runs before jobs_secrets_forget (triggers of one event run in name order).
CREATE FUNCTION jobs_outbox_webhook() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    hook_url text;
    authority text;
BEGIN
    IF json_typeof(NEW.payload #> '{input,webhook,url}') IS DISTINCT FROM 'string' THEN
        RETURN NULL;
    END IF;
    hook_url := NEW.payload #>> '{input,webhook,url}';
    IF hook_url = '' THEN
        RETURN NULL;
    END IF;
    authority := substring(hook_url FROM '://([^/?#]*)');
    INSERT INTO webhook_deliveries
        (id, job_id, url, host, secret, event, job_finished_at, next_attempt_at, created_at, updated_at)
    VALUES (
        'msg_' || replace(gen_random_uuid()::text, '-', ''),
        NEW.id,
        hook_url,
        lower(regexp_replace(coalesce(authority, hook_url), '^[^@]*@', '')),
        (SELECT CASE WHEN jsonb_typeof(s.data -> 'webhook_secret') = 'string'
                     THEN nullif(s.data ->> 'webhook_secret', '') END
         FROM job_secrets s WHERE s.job_id = NEW.id),
        NEW.state, NEW.finished_at, NEW.finished_at, NEW.finished_at, NEW.finished_at);
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_outbox_webhook
AFTER UPDATE OF state ON jobs
FOR EACH ROW
WHEN (NEW.state IN ('completed', 'failed', 'cancelled') AND OLD.state IS DISTINCT FROM NEW.state)
EXECUTE FUNCTION jobs_outbox_webhook();

-- Deliveries newest first, without URLs (they may carry tokens) or secrets.
CREATE VIEW webhook_overview AS
SELECT d.job_id, d.id AS delivery_id, d.event, d.state, d.host, d.attempts, d.last_status,
       d.last_error, d.next_attempt_at, d.created_at, d.finished_at
FROM webhook_deliveries d
ORDER BY d.created_at DESC;
