-- comfyq schema for PostgreSQL, version 1: jobs (the queue), their event log, and their outputs.
-- The same tables as migrations/0001_init.sql (SQLite), in Postgres's own types: timestamptz for
-- instants, boolean for flags, json for documents (kept as written: a workflow's key order is
-- the client's) and jsonb where the store edits in place (timings). Numbered like the SQLite
-- files, so that version N means the same schema on both engines.

-- The job state machine, as data: the trigger below refuses any state change not listed here.
CREATE TABLE job_states (
    state    text PRIMARY KEY,
    terminal boolean NOT NULL
);

INSERT INTO job_states (state, terminal) VALUES
    ('pending', false), ('running', false), ('completed', true), ('failed', true), ('cancelled', true);

CREATE TABLE job_transitions (
    from_state text NOT NULL REFERENCES job_states (state),
    to_state   text NOT NULL REFERENCES job_states (state),
    PRIMARY KEY (from_state, to_state)
);

INSERT INTO job_transitions (from_state, to_state) VALUES
    ('pending', 'running'),     -- claimed by a stage worker
    ('pending', 'cancelled'),   -- cancelled while waiting
    ('pending', 'failed'),      -- deadline passed while waiting
    ('running', 'pending'),     -- stage done (next stage), retry, lease expired, or shutdown
    ('running', 'completed'),
    ('running', 'failed'),
    ('running', 'cancelled'),
    ('failed', 'pending'),      -- `comfyq jobs retry`
    ('cancelled', 'pending');   -- `comfyq jobs retry`

CREATE TABLE jobs (
    id               text PRIMARY KEY,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    stage            text NOT NULL DEFAULT 'preprocess'
                     CHECK (stage IN ('preprocess', 'generate', 'postprocess')),
    priority         integer NOT NULL DEFAULT 0,
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    message          text NOT NULL DEFAULT '',
    kind             text NOT NULL DEFAULT '',          -- modifier name or 'workflow': groups ETAs
    payload          json NOT NULL,                     -- the request input, secrets removed
    payload_hash     text NOT NULL,                     -- idempotency: same id + other hash -> 409
    prepared         json,                              -- workflow + inputs
    result           json,                              -- ComfyUI outputs, warnings
    error            json,
    timings          jsonb NOT NULL DEFAULT '{}',       -- milliseconds per stage, updated in place
    lease_owner      text,                              -- the instance holding the job
    lease_expires_at timestamptz,
    run_after        timestamptz NOT NULL,              -- not claimable before (retry backoff)
    deadline_at      timestamptz NOT NULL,
    cancel_requested boolean NOT NULL DEFAULT false,
    comfy_prompt_id  text,
    comfy_backend    text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    stage_entered_at timestamptz NOT NULL,              -- when the job entered its current stage/state
    finished_at      timestamptz,
    CHECK ((state = 'running') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK ((state IN ('completed', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    CHECK (attempts <= max_attempts)
);

-- Claim order: priority, then age, among claimable jobs of one stage. Partial, so it stays small
-- (and a claim stays flat) however many finished jobs the table holds.
CREATE INDEX jobs_claim ON jobs (stage, priority DESC, created_at, id) WHERE state = 'pending';
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

-- Illegal transitions are refused by the database, whichever client writes.
CREATE FUNCTION jobs_legal_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM job_transitions
                   WHERE from_state = OLD.state AND to_state = NEW.state) THEN
        RAISE EXCEPTION 'illegal job transition % -> % (job %)', OLD.state, NEW.state, OLD.id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'jobs_legal_transition';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER jobs_legal_transition
BEFORE UPDATE OF state ON jobs
FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
EXECUTE FUNCTION jobs_legal_transition();

-- Unfinished jobs (pending or running), kept by triggers so admission need not count them. Striped
-- over 16 rows (by job id) so that instances finishing jobs at once do not queue on one row lock;
-- admission sums the stripes.
CREATE TABLE queue_stats (
    id         integer PRIMARY KEY CHECK (id BETWEEN 0 AND 15),
    unfinished bigint NOT NULL
);

INSERT INTO queue_stats (id, unfinished) SELECT i, 0 FROM generate_series(0, 15) AS i;

CREATE FUNCTION jobs_count_unfinished() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta integer := 0;
    key   text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        key := NEW.id;
        IF NEW.state IN ('pending', 'running') THEN delta := 1; END IF;
    ELSIF TG_OP = 'DELETE' THEN
        key := OLD.id;
        IF OLD.state IN ('pending', 'running') THEN delta := -1; END IF;
    ELSE
        key := NEW.id;
        IF (OLD.state IN ('pending', 'running')) <> (NEW.state IN ('pending', 'running')) THEN
            delta := CASE WHEN NEW.state IN ('pending', 'running') THEN 1 ELSE -1 END;
        END IF;
    END IF;
    IF delta <> 0 THEN
        UPDATE queue_stats SET unfinished = unfinished + delta
        WHERE id = abs(hashtext(key)) % 16;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_count_unfinished
AFTER INSERT OR DELETE OR UPDATE OF state ON jobs
FOR EACH ROW EXECUTE FUNCTION jobs_count_unfinished();

-- One row per state or stage change, written in the same transaction as the change.
CREATE TABLE job_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id     text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at         timestamptz NOT NULL,
    from_state text,
    to_state   text NOT NULL,
    stage      text NOT NULL,
    attempt    integer NOT NULL,
    message    text NOT NULL DEFAULT '',
    data       json
);

CREATE INDEX job_events_job ON job_events (job_id, id);

-- Per-request secrets (S3 keys, webhook secret): kept apart so that they never reach a Result,
-- and deleted as soon as the job no longer needs them.
CREATE TABLE job_secrets (
    job_id text PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    data   jsonb NOT NULL
);

-- A job that has ended no longer needs its secrets. (Triggers of one event run in name order:
-- the webhook outbox's, jobs_outbox_webhook, reads the signing secret before this one drops it.)
CREATE FUNCTION jobs_secrets_forget() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM job_secrets WHERE job_id = NEW.id;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_secrets_forget
AFTER UPDATE OF state ON jobs
FOR EACH ROW WHEN (NEW.state IN ('completed', 'failed', 'cancelled'))
EXECUTE FUNCTION jobs_secrets_forget();

CREATE TABLE outputs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id       text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    filename     text NOT NULL,
    node_id      text NOT NULL DEFAULT '',
    output_type  text NOT NULL DEFAULT 'images',   -- ComfyUI's key: images, gifs, video, audio, text...
    comfy_type   text NOT NULL DEFAULT 'output',   -- output | temp
    subfolder    text NOT NULL DEFAULT '',
    mimetype     text NOT NULL DEFAULT 'application/octet-stream',
    size         bigint NOT NULL DEFAULT 0,
    sha256       text,
    local_path   text,
    url          text,
    upload_error text,
    error        text,
    created_at   timestamptz NOT NULL,
    UNIQUE (job_id, filename)
);

-- What an operator types first: every job, newest first, with its story in one line.
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
       round(extract(epoch FROM coalesce(j.finished_at, now()) - j.created_at)::numeric, 3) AS age_s,
       j.comfy_backend AS backend,
       j.comfy_prompt_id AS prompt_id,
       j.error ->> 'type' AS error_type,
       j.error ->> 'node_id' AS error_node,
       j.message,
       (SELECT count(*) FROM outputs o WHERE o.job_id = j.id) AS outputs,
       (SELECT count(*) FROM job_events e WHERE e.job_id = j.id) AS events
FROM jobs j
ORDER BY j.created_at DESC;

-- Every event with its job's present state: `select * from job_history where job_id = '...'`.
CREATE VIEW job_history AS
SELECT e.job_id, e.id AS event_id, e.at, e.from_state, e.to_state, e.stage, e.attempt, e.message,
       e.data
FROM job_events e
ORDER BY e.job_id, e.id;

-- Waiting and running jobs per stage.
CREATE VIEW queue_depth AS
SELECT stage,
       count(*) FILTER (WHERE state = 'pending') AS waiting,
       count(*) FILTER (WHERE state = 'running') AS running,
       min(created_at) FILTER (WHERE state = 'pending') AS oldest_waiting
FROM jobs
WHERE state IN ('pending', 'running')
GROUP BY stage;

-- Failures with the node that failed and why.
CREATE VIEW failures AS
SELECT id, finished_at, attempts, kind,
       error ->> 'type' AS type,
       error ->> 'node_id' AS node_id,
       error ->> 'node_type' AS node_type,
       error ->> 'message' AS message
FROM jobs
WHERE state = 'failed'
ORDER BY finished_at DESC;
