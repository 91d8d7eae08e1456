-- comfyq schema, version 5: fewer pages and trigger programs per state change (SQLite only; the
-- PostgreSQL schema keeps its own). Every transition is written by the one writer thread, whose
-- CPU per job caps the store's throughput, so each index and trigger a change touches counts.

-- CHECK constraints without IN lists of three or more constants. SQLite evaluates such a list
-- through an ephemeral index it builds (a b-tree, two zeroed pages, a few mallocs) every time the
-- statement runs, so each claim and each end of a stage built three: a fifth of the writer's
-- instructions per job. Comparisons (OR, or IN of two, which SQLite codes as comparisons) check
-- the same thing. Only the constraints' text changes, not what is stored, which SQLite's manual
-- allows through writable_schema (https://sqlite.org/lang_altertable.html#otheralter); the DDL
-- below changes the schema cookie, so every connection reloads the schema.
PRAGMA writable_schema = ON;

UPDATE sqlite_schema
SET sql = replace(replace(replace(sql,
    'CHECK (state IN (''pending'', ''running'', ''completed'', ''failed'', ''cancelled''))',
    'CHECK (state = ''pending'' OR state = ''running'' OR state = ''completed'''
        || ' OR state = ''failed'' OR state = ''cancelled'')'),
    'CHECK (stage IN (''preprocess'', ''generate'', ''postprocess''))',
    'CHECK (stage = ''preprocess'' OR stage = ''generate'' OR stage = ''postprocess'')'),
    'CHECK ((state IN (''completed'', ''failed'', ''cancelled'')) = (finished_at IS NOT NULL))',
    'CHECK ((state NOT IN (''pending'', ''running'')) = (finished_at IS NOT NULL))')
WHERE type = 'table' AND name = 'jobs';

PRAGMA writable_schema = OFF;

-- jobs_leases duplicated jobs_state_created for running jobs (whose first column is the state),
-- and cost an entry added at every claim and removed at every release, plus a page per commit.
-- The queries on running jobs (reap, renew, recover, the cancel poll, counts) read the running
-- range of jobs_state_created instead: a few rows, one per job held.
DROP INDEX jobs_leases;

-- The three triggers on a state change (legality, the unfinished count, the webhook outbox) ran
-- as three trigger programs per change; one program with the same three statements, each guarded
-- by its former WHEN clause, does the same work. The webhook insert still reads the payload only
-- when the job ends.
DROP TRIGGER jobs_legal_transition;
DROP TRIGGER jobs_count_update;
DROP TRIGGER jobs_webhook_outbox;

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
