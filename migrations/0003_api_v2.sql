-- comfyq schema, version 3: what the Comfy API v2 surface adds (comfyq/v2, comfyq/store/assets.py).
--
-- Assets are UUID records over content-addressed blobs (blake3). An uploaded file is one blob,
-- kept once however many assets point at it; a job's outputs are assets too, but their bytes stay
-- where the job keeps them (the outputs table), so they get an asset id and a blake3 hash there.

CREATE TABLE blobs (
    hash       TEXT PRIMARY KEY CHECK (hash LIKE 'blake3:%'),
    size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
    path       TEXT NOT NULL,                 -- the file under the assets folder, named by its hash
    created_at TEXT NOT NULL
) STRICT;

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

CREATE INDEX assets_hash ON assets (hash);
CREATE INDEX assets_expires ON assets (expires_at) WHERE expires_at IS NOT NULL;

-- The uploaded assets a job's workflow refers to: such an asset cannot be deleted or pruned while
-- the job is unfinished (its preprocess stage still has to place the file on a backend).
CREATE TABLE job_assets (
    job_id   TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    asset_id TEXT NOT NULL,
    PRIMARY KEY (job_id, asset_id)
) STRICT;

CREATE INDEX job_assets_asset ON job_assets (asset_id);

-- Single-use Idempotency-Key values (reject on reuse, no replay), kept 24 hours. A key is
-- written in the same transaction as the job it admits, so concurrent duplicates make one job
-- and a submission that fails (queue full, invalid) leaves no key behind.
CREATE TABLE idempotency_keys (
    owner      TEXT NOT NULL DEFAULT '',
    scope      TEXT NOT NULL CHECK (scope IN ('jobs', 'assets')),
    key        TEXT NOT NULL,
    ref        TEXT,                          -- the job or asset it created
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    PRIMARY KEY (owner, scope, key)
) STRICT;

CREATE INDEX idempotency_keys_expires ON idempotency_keys (expires_at);

-- Each output is an asset: its id and its blake3 hash (computed while the file is read after the
-- download). Outputs recorded before this version get an id here.
ALTER TABLE outputs ADD COLUMN asset_id TEXT;
ALTER TABLE outputs ADD COLUMN blake3 TEXT;

UPDATE outputs SET asset_id = lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4'
    || substr(hex(randomblob(2)), 2) || '-' || substr('89ab', 1 + (abs(random()) % 4), 1)
    || substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6)))
WHERE asset_id IS NULL;

CREATE UNIQUE INDEX outputs_asset ON outputs (asset_id) WHERE asset_id IS NOT NULL;
