-- index assets_expires
CREATE INDEX assets_expires ON assets (expires_at) WHERE expires_at IS NOT NULL;

-- index assets_hash
CREATE INDEX assets_hash ON assets (hash);

-- index idempotency_keys_expires
CREATE INDEX idempotency_keys_expires ON idempotency_keys (expires_at);

-- index job_assets_asset
CREATE INDEX job_assets_asset ON job_assets (asset_id);

-- index job_events_job
CREATE INDEX job_events_job ON job_events (job_id, id);

-- index jobs_claim
CREATE INDEX jobs_claim ON jobs (stage, priority DESC, created_at, id) WHERE state = 'pending';

-- index jobs_created
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);

-- index jobs_finished
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

-- index jobs_owner_created
CREATE INDEX jobs_owner_created ON jobs (owner, created_at DESC, id DESC);

-- index jobs_state_created
CREATE INDEX jobs_state_created ON jobs (state, created_at DESC, id DESC);

-- index outputs_asset
CREATE UNIQUE INDEX outputs_asset ON outputs (asset_id) WHERE asset_id IS NOT NULL;

-- index webhook_attempts_delivery
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id);

-- index webhook_attempts_job
CREATE INDEX webhook_attempts_job ON webhook_attempts (job_id, id);

-- index webhook_deliveries_due
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at, id) WHERE state = 'pending';

-- index webhook_deliveries_job
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id);

-- index webhook_deliveries_sending
CREATE INDEX webhook_deliveries_sending ON webhook_deliveries (host) WHERE state = 'sending';

-- table assets
CREATE TABLE assets (
    id           TEXT PRIMARY KEY,            -- a UUID
    hash         TEXT NOT NULL REFERENCES blobs (hash),
    owner        TEXT NOT NULL DEFAULT '',    -- who may see it ('' while keys carry no identity)
    content_type TEXT NOT NULL,
    file_path    TEXT,                        -- the client's name for it: shown, never used as a path
    tags         TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(tags)),
    created_at   TEXT NOT NULL,
    expires_at   TEXT                         -- NULL: kept until deleted
) STRICT;

-- table blobs
CREATE TABLE blobs (
    hash       TEXT PRIMARY KEY CHECK (hash LIKE 'blake3:%'),
    size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
    path       TEXT NOT NULL,                 -- the file under the assets folder, named by its hash
    created_at TEXT NOT NULL
) STRICT;

-- table idempotency_keys
CREATE TABLE idempotency_keys (
    owner      TEXT NOT NULL DEFAULT '',
    scope      TEXT NOT NULL CHECK (scope IN ('jobs', 'assets')),
    key        TEXT NOT NULL,
    ref        TEXT,                          -- the job or asset it created
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    PRIMARY KEY (owner, scope, key)
) STRICT;

-- table job_assets
CREATE TABLE job_assets (
    job_id   TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    asset_id TEXT NOT NULL,
    PRIMARY KEY (job_id, asset_id)
) STRICT;

-- table job_events
CREATE TABLE job_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at         TEXT NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    stage      TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    message    TEXT NOT NULL DEFAULT '',
    data       TEXT CHECK (data IS NULL OR json_valid(data))
) STRICT;

-- table job_secrets
CREATE TABLE job_secrets (
    job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    data   TEXT NOT NULL CHECK (json_valid(data))
) STRICT;

-- table job_states
CREATE TABLE job_states (
    state    TEXT PRIMARY KEY,
    terminal INTEGER NOT NULL CHECK (terminal IN (0, 1))
) STRICT;

-- table job_transitions
CREATE TABLE job_transitions (
    from_state TEXT NOT NULL REFERENCES job_states (state),
    to_state   TEXT NOT NULL REFERENCES job_states (state),
    PRIMARY KEY (from_state, to_state)
) STRICT;

-- table jobs
CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    state            TEXT NOT NULL DEFAULT 'pending'
                     CHECK (state = 'pending' OR state = 'running' OR state = 'completed' OR state = 'failed' OR state = 'cancelled'),
    stage            TEXT NOT NULL DEFAULT 'preprocess'
                     CHECK (stage = 'preprocess' OR stage = 'generate' OR stage = 'postprocess'),
    priority         INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     INTEGER NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    message          TEXT NOT NULL DEFAULT '',
    kind             TEXT NOT NULL DEFAULT '',          -- modifier name or 'workflow': groups ETAs
    payload          TEXT NOT NULL CHECK (json_valid(payload)),   -- the request input, secrets removed
    payload_hash     TEXT NOT NULL,                     -- idempotency: same id + other hash -> 409
    prepared         TEXT CHECK (prepared IS NULL OR json_valid(prepared)),  -- workflow + inputs
    result           TEXT CHECK (result IS NULL OR json_valid(result)),      -- ComfyUI outputs, warnings
    error            TEXT CHECK (error IS NULL OR json_valid(error)),
    timings          TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(timings)),
    lease_owner      TEXT,
    lease_expires_at TEXT,
    run_after        TEXT NOT NULL,                     -- not claimable before (retry backoff)
    deadline_at      TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    comfy_prompt_id  TEXT,
    comfy_backend    TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    stage_entered_at TEXT NOT NULL,                     -- when the job entered its current stage/state
    finished_at      TEXT, owner TEXT,
    CHECK ((state = 'running') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK ((state NOT IN ('pending', 'running')) = (finished_at IS NOT NULL)),
    CHECK (attempts <= max_attempts)
) STRICT;

-- table outputs
CREATE TABLE outputs (
    id           INTEGER PRIMARY KEY,
    job_id       TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    filename     TEXT NOT NULL,
    node_id      TEXT NOT NULL DEFAULT '',
    output_type  TEXT NOT NULL DEFAULT 'images',   -- ComfyUI's key: images, gifs, video, audio, text...
    comfy_type   TEXT NOT NULL DEFAULT 'output',   -- output | temp
    subfolder    TEXT NOT NULL DEFAULT '',
    mimetype     TEXT NOT NULL DEFAULT 'application/octet-stream',
    size         INTEGER NOT NULL DEFAULT 0,
    sha256       TEXT,
    local_path   TEXT,
    url          TEXT,
    upload_error TEXT,
    error        TEXT,
    created_at   TEXT NOT NULL, asset_id TEXT, blake3 TEXT,
    UNIQUE (job_id, filename)
) STRICT;

-- table queue_stats
CREATE TABLE queue_stats (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    unfinished INTEGER NOT NULL CHECK (unfinished >= 0)
) STRICT;

-- table schema_migrations
CREATE TABLE schema_migrations ( version INTEGER PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL, applied_at TEXT NOT NULL) STRICT;

-- table webhook_attempts
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

-- table webhook_deliveries
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

-- trigger jobs_count_delete
CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs
WHEN OLD.state IN ('pending', 'running')
BEGIN
    UPDATE queue_stats SET unfinished = unfinished - 1 WHERE id = 1;
END;

-- trigger jobs_count_insert
CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs
WHEN NEW.state IN ('pending', 'running')
BEGIN
    UPDATE queue_stats SET unfinished = unfinished + 1 WHERE id = 1;
END;

-- trigger jobs_state_change
CREATE TRIGGER jobs_state_change
AFTER UPDATE OF state ON jobs
WHEN OLD.state <> NEW.state
BEGIN
    SELECT RAISE(ABORT, 'illegal job transition')
    WHERE NOT EXISTS (SELECT 1 FROM job_transitions
                      WHERE from_state = OLD.state AND to_state = NEW.state);
    UPDATE queue_stats
    SET unfinished = unfinished + CASE WHEN NEW.state IN ('pending', 'running') THEN 1 ELSE -1 END
    WHERE id = 1
      AND (OLD.state IN ('pending', 'running')) <> (NEW.state IN ('pending', 'running'));
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
                FROM (SELECT json_extract(NEW.payload, '$.input.webhook.url') AS url
                      WHERE NEW.state NOT IN ('pending', 'running')
                        AND json_type(NEW.payload, '$.input.webhook.url') = 'text')))
    WHERE url <> '';
END;

-- view failures
CREATE VIEW failures AS
SELECT id, finished_at, attempts, kind,
       json_extract(error, '$.type') AS type,
       json_extract(error, '$.node_id') AS node_id,
       json_extract(error, '$.node_type') AS node_type,
       json_extract(error, '$.message') AS message
FROM jobs
WHERE state = 'failed'
ORDER BY finished_at DESC;

-- view job_history
CREATE VIEW job_history AS
SELECT e.job_id, e.id AS event_id, e.at, e.from_state, e.to_state, e.stage, e.attempt, e.message,
       e.data
FROM job_events e
ORDER BY e.job_id, e.id;

-- view jobs_overview
CREATE VIEW jobs_overview AS
SELECT j.id,
       j.state,
       j.stage,
       CASE
           WHEN j.state IN ('completed', 'failed', 'cancelled') THEN j.state
           WHEN j.stage = 'preprocess' AND j.state = 'pending' THEN 'queued'
           WHEN j.stage = 'preprocess' THEN 'processing'
           WHEN j.stage = 'generate' AND j.state = 'pending' THEN 'processing'
           WHEN j.stage = 'generate' THEN 'generating'
           ELSE 'postprocessing'
       END AS status,
       j.priority,
       j.attempts || '/' || j.max_attempts AS tries,
       j.kind,
       j.created_at,
       j.updated_at,
       round((julianday(coalesce(j.finished_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))
              - julianday(j.created_at)) * 86400.0, 3) AS age_s,
       j.comfy_backend AS backend,
       j.comfy_prompt_id AS prompt_id,
       json_extract(j.error, '$.type') AS error_type,
       json_extract(j.error, '$.node_id') AS error_node,
       j.message,
       (SELECT count(*) FROM outputs o WHERE o.job_id = j.id) AS outputs,
       (SELECT count(*) FROM job_events e WHERE e.job_id = j.id) AS events
FROM jobs j
ORDER BY j.created_at DESC;

-- view queue_depth
CREATE VIEW queue_depth AS
SELECT stage,
       sum(state = 'pending') AS waiting,
       sum(state = 'running') AS running,
       min(CASE WHEN state = 'pending' THEN created_at END) AS oldest_waiting
FROM jobs
WHERE state IN ('pending', 'running')
GROUP BY stage;

-- view webhook_overview
CREATE VIEW webhook_overview AS
SELECT d.job_id, d.id AS delivery_id, d.event, d.state, d.host, d.attempts, d.last_status,
       d.last_error, d.next_attempt_at, d.created_at, d.finished_at
FROM webhook_deliveries d
ORDER BY d.created_at DESC;
