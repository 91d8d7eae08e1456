-- comfyq schema, version 2: the webhook outbox.
--
-- When a job ends (completed, failed, cancelled) and its payload names a webhook URL, the trigger
-- below writes a delivery row in the same transaction that ended the job, whichever process ended
-- it (a stage worker, the reaper, `comfyq jobs cancel`). The sender (comfyq/webhooks.py) claims due
-- rows, posts them and records every attempt. Delivery is at least once: receivers deduplicate on
-- the webhook-id header, which is the delivery's id and the same on every attempt.

CREATE TABLE webhook_deliveries (
    id               TEXT PRIMARY KEY,     -- the webhook-id header
    job_id           TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    url              TEXT NOT NULL,
    host             TEXT NOT NULL,        -- host[:port] of url: caps concurrent posts per receiver
    secret           TEXT,                 -- the request's signing secret, erased when the delivery ends
    event            TEXT NOT NULL CHECK (event IN ('completed', 'failed', 'cancelled')),
    job_finished_at  TEXT NOT NULL,        -- which end of the job this reports (a retried job ends again)
    state            TEXT NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'sending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  TEXT NOT NULL,
    lease_owner      TEXT,
    lease_expires_at TEXT,
    last_status      INTEGER,              -- HTTP status of the last attempt, if it got one
    last_error       TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    finished_at      TEXT,
    CHECK ((state = 'sending') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK ((state IN ('delivered', 'failed')) = (finished_at IS NOT NULL)),
    CHECK (finished_at IS NULL OR secret IS NULL)
) STRICT;

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_sending ON webhook_deliveries (host) WHERE state = 'sending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id);

-- One row per attempt: when, how long, the HTTP status or the error, and what followed.
CREATE TABLE webhook_attempts (
    id          INTEGER PRIMARY KEY,
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    delivery_id TEXT NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL CHECK (attempt >= 1),
    at          TEXT NOT NULL,
    duration_ms INTEGER,
    status_code INTEGER,
    error       TEXT,
    outcome     TEXT NOT NULL CHECK (outcome IN ('delivered', 'retry', 'gave_up'))
) STRICT;

CREATE INDEX webhook_attempts_job ON webhook_attempts (job_id, id);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id);

-- The host (without any user info) is cut out of the URL here (not in Python) because any connection may end a job, the
-- CLI's included. It only groups deliveries for fairness, so an odd URL costs nothing worse than
-- a shared group. json_type checks keep a malformed payload from aborting the job's own update.
CREATE TRIGGER jobs_webhook_outbox
AFTER UPDATE OF state ON jobs
WHEN NEW.state IN ('completed', 'failed', 'cancelled') AND OLD.state <> NEW.state
 AND json_type(NEW.payload, '$.input.webhook.url') = 'text'
 AND json_extract(NEW.payload, '$.input.webhook.url') <> ''
BEGIN
    INSERT INTO webhook_deliveries
        (id, job_id, url, host, secret, event, job_finished_at, next_attempt_at, created_at, updated_at)
    SELECT 'msg_' || lower(hex(randomblob(16))), NEW.id, url,
           lower(substr(authority, instr(authority, '@') + 1)),
           (SELECT CASE json_type(s.data, '$.webhook_secret') WHEN 'text'
                   THEN nullif(json_extract(s.data, '$.webhook_secret'), '') END
            FROM job_secrets s WHERE s.job_id = NEW.id),
           NEW.state, NEW.finished_at, NEW.finished_at, NEW.finished_at, NEW.finished_at
    FROM (SELECT url, substr(rest, 1, min(
                     CASE instr(rest, '/') WHEN 0 THEN length(rest) + 1 ELSE instr(rest, '/') END,
                     CASE instr(rest, '?') WHEN 0 THEN length(rest) + 1 ELSE instr(rest, '?') END,
                     CASE instr(rest, '#') WHEN 0 THEN length(rest) + 1 ELSE instr(rest, '#') END) - 1)
                 AS authority
          FROM (SELECT url, substr(url, instr(url, '://') + 3) AS rest
                FROM (SELECT json_extract(NEW.payload, '$.input.webhook.url') AS url)));
END;

-- Deliveries newest first, without URLs (they may carry tokens) or secrets.
CREATE VIEW webhook_overview AS
SELECT d.job_id, d.id AS delivery_id, d.event, d.state, d.host, d.attempts, d.last_status,
       d.last_error, d.next_attempt_at, d.created_at, d.finished_at
FROM webhook_deliveries d
ORDER BY d.created_at DESC;
