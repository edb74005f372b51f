-- The durable event log behind com.atproto.sync.subscribeRepos. A row is
-- written in the same transaction as the change it describes. AUTOINCREMENT
-- guarantees a sequence number is never reused, even after pruning.
CREATE TABLE seq_event (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    did        TEXT NOT NULL,
    kind       TEXT NOT NULL,
    -- The complete WebSocket frame (header + body, DAG-CBOR), seq included.
    frame      BLOB NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX seq_event_by_time ON seq_event (created_at);
