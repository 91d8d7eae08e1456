-- comfyq schema for PostgreSQL, version 3: what the Comfy API v2 surface adds (as migrations/0003
-- for SQLite; comfyq/v2, comfyq/store/assets.py).
--
-- Assets are UUID records over content-addressed blobs (blake3). An uploaded file is one blob,
-- kept once however many assets point at it; a job's outputs are assets too, but their bytes stay
-- where the job keeps them (the outputs table), so they get an asset id and a blake3 hash there.

CREATE TABLE blobs (
    hash       text PRIMARY KEY CHECK (hash LIKE 'blake3:%'),
    size_bytes bigint NOT NULL CHECK (size_bytes >= 0),
    path       text NOT NULL,                 -- the file under the assets folder, named by its hash
    created_at timestamptz NOT NULL
);

CREATE TABLE assets (
    id           text PRIMARY KEY,            -- a UUID
    hash         text NOT NULL REFERENCES blobs (hash),
    owner        text NOT NULL DEFAULT '',    -- who may see it ('' while keys carry no identity)
    content_type text NOT NULL,
    file_path    text,                        -- the client's name for it: shown, never used as a path
    tags         json NOT NULL DEFAULT '[]',
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz                  -- NULL: kept until deleted
);

CREATE INDEX assets_hash ON assets (hash);
CREATE INDEX assets_expires ON assets (expires_at) WHERE expires_at IS NOT NULL;

-- The uploaded assets a job's workflow refers to: such an asset cannot be deleted or pruned while
-- the job is unfinished (its preprocess stage still has to place the file on a backend).
CREATE TABLE job_assets (
    job_id   text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    asset_id text NOT NULL,
    PRIMARY KEY (job_id, asset_id)
);

CREATE INDEX job_assets_asset ON job_assets (asset_id);

-- Single-use Idempotency-Key values (reject on reuse, no replay), kept 24 hours. A key is
-- written in the same transaction as the job it admits, so concurrent duplicates make one job
-- and a submission that fails (queue full, invalid) leaves no key behind.
CREATE TABLE idempotency_keys (
    owner      text NOT NULL DEFAULT '',
    scope      text NOT NULL CHECK (scope IN ('jobs', 'assets')),
    key        text NOT NULL,
    ref        text,                          -- the job or asset it created
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (owner, scope, key)
);

CREATE INDEX idempotency_keys_expires ON idempotency_keys (expires_at);

-- Each output is an asset: its id and its blake3 hash. Outputs recorded before this version get
-- an id here.
ALTER TABLE outputs ADD COLUMN asset_id text;
ALTER TABLE outputs ADD COLUMN blake3 text;

UPDATE outputs SET asset_id = gen_random_uuid()::text WHERE asset_id IS NULL;

CREATE UNIQUE INDEX outputs_asset ON outputs (asset_id) WHERE asset_id IS NOT NULL;
