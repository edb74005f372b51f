-- Blobs. Small ones (up to PDS_SQLITE_BLOB_MAX_BYTES) live in `data`; larger
-- ones in the large-blob store (`tier` says which: 'disk' or 's3').
CREATE TABLE blob (
    did        TEXT NOT NULL,
    cid        TEXT NOT NULL,
    mime_type  TEXT NOT NULL,
    size       INTEGER NOT NULL,
    tier       TEXT NOT NULL CHECK (tier IN ('sqlite', 'disk', 's3')),
    data       BLOB,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (did, cid)
) STRICT;
CREATE INDEX blob_by_created ON blob (created_at);

-- Which committed record references which blob. A blob with no row here is
-- either fresh (swept after the unused TTL) or was just released (deleted in
-- the releasing commit's transaction).
CREATE TABLE record_blob (
    did        TEXT NOT NULL,
    collection TEXT NOT NULL,
    rkey       TEXT NOT NULL,
    blob_cid   TEXT NOT NULL,
    rev        TEXT NOT NULL,
    PRIMARY KEY (did, collection, rkey, blob_cid)
) STRICT, WITHOUT ROWID;
CREATE INDEX record_blob_by_blob ON record_blob (did, blob_cid);
CREATE INDEX record_blob_by_rev ON record_blob (did, rev);

-- Large-store objects whose rows are gone: deleted after commit, and by a
-- sweep at start, so a crash between the two never leaks a file.
CREATE TABLE blob_deletion (
    id          INTEGER PRIMARY KEY,
    did         TEXT NOT NULL,
    cid         TEXT NOT NULL,
    tier        TEXT NOT NULL,
    enqueued_at INTEGER NOT NULL
) STRICT;
