//! The `seq_event` table: the firehose's durable log.

use sqlx::{Row, SqliteConnection};

use super::{Db, now_unix};

/// Appends an event in the caller's transaction. `build` receives the
/// assigned sequence number and returns the complete frame.
pub(crate) async fn append_event(
    conn: &mut SqliteConnection,
    did: &str,
    kind: &str,
    build: impl FnOnce(i64) -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<(i64, Vec<u8>)> {
    let seq = sqlx::query("INSERT INTO seq_event (did, kind, frame, created_at) VALUES (?, ?, x'', ?)")
        .bind(did)
        .bind(kind)
        .bind(now_unix())
        .execute(&mut *conn)
        .await?
        .last_insert_rowid();
    let frame = build(seq)?;
    sqlx::query("UPDATE seq_event SET frame = ? WHERE seq = ?")
        .bind(frame.as_slice())
        .bind(seq)
        .execute(&mut *conn)
        .await?;
    Ok((seq, frame))
}

impl Db {
    /// Up to `limit` events after `cursor`, oldest first.
    pub async fn events_after(&self, cursor: i64, limit: i64) -> Result<Vec<(i64, Vec<u8>)>, sqlx::Error> {
        let query = sqlx::query("SELECT seq, frame FROM seq_event WHERE seq > ? ORDER BY seq LIMIT ?")
            .bind(cursor)
            .bind(limit)
            .fetch_all(&self.pool);
        let rows = crate::telemetry::metrics::timed("events_after", query).await?;
        rows.iter().map(|r| Ok((r.try_get("seq")?, r.try_get("frame")?))).collect()
    }

    /// The lowest and highest retained sequence numbers, and the highest ever
    /// assigned (which survives pruning).
    pub async fn seq_bounds(&self) -> Result<SeqBounds, sqlx::Error> {
        let row = sqlx::query(
            "SELECT (SELECT MIN(seq) FROM seq_event) AS lo,
                    (SELECT COALESCE(MAX(seq), 0) FROM seq_event) AS hi,
                    (SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'seq_event') AS ever",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(SeqBounds {
            oldest: row.try_get("lo")?,
            newest: row.try_get("hi")?,
            highest_assigned: row.try_get("ever")?,
        })
    }

    /// Deletes events older than `cutoff` (unix seconds); returns how many.
    pub async fn prune_events(&self, cutoff: i64) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query("DELETE FROM seq_event WHERE created_at < ?")
            .bind(cutoff)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SeqBounds {
    pub oldest: Option<i64>,
    pub newest: i64,
    pub highest_assigned: i64,
}
