-- Roost schema v1. Migrations are append-only: never edit an applied file.
-- Every table is keyed by DID so more than one account can live here.

CREATE TABLE account (
    did            TEXT PRIMARY KEY,
    handle         TEXT NOT NULL UNIQUE,
    email          TEXT UNIQUE,
    password_hash  TEXT NOT NULL,
    -- 'pending' until the PLC directory has the genesis operation and the
    -- first commit exists; then 'active', 'deactivated', 'takendown' or 'deleted'.
    status         TEXT NOT NULL,
    -- The signed genesis operation, kept so a crash between PLC submission
    -- and the first commit can be resumed without minting a second DID.
    plc_genesis_op TEXT,
    created_at     TEXT NOT NULL
) STRICT;

CREATE TABLE repo_root (
    did        TEXT PRIMARY KEY REFERENCES account(did) ON DELETE CASCADE,
    commit_cid BLOB NOT NULL,
    data_cid   BLOB NOT NULL,
    rev        TEXT NOT NULL
) STRICT;

-- Exactly the blocks reachable from the current commit (plus nothing else):
-- commits delete what they make unreachable in the same transaction.
CREATE TABLE block (
    did  TEXT NOT NULL,
    cid  BLOB NOT NULL,
    data BLOB NOT NULL,
    rev  TEXT NOT NULL,
    PRIMARY KEY (did, cid)
) STRICT, WITHOUT ROWID;
CREATE INDEX block_by_rev ON block (did, rev);

CREATE TABLE record (
    did        TEXT NOT NULL,
    collection TEXT NOT NULL,
    rkey       TEXT NOT NULL,
    cid        BLOB NOT NULL,
    rev        TEXT NOT NULL,
    PRIMARY KEY (did, collection, rkey)
) STRICT, WITHOUT ROWID;
CREATE INDEX record_by_cid ON record (did, cid);

-- One row per login; access tokens name it, so deleting it revokes them.
CREATE TABLE session (
    id         TEXT PRIMARY KEY,
    did        TEXT NOT NULL REFERENCES account(did) ON DELETE CASCADE,
    scope      TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX session_by_did ON session (did);

-- Refresh tokens are single-use. `used_at`/`next_id` record the rotation so a
-- retry within the grace window gets the same successor, and a reuse after
-- it revokes the whole session.
CREATE TABLE refresh_token (
    id         TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES session(id) ON DELETE CASCADE,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER,
    next_id    TEXT
) STRICT;
CREATE INDEX refresh_by_session ON refresh_token (session_id);
