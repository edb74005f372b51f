//! The SQLite database: pool setup, migrations, and the queries, grouped by
//! table. Only this module writes SQL.
//!
//! One file (`roost.sqlite` under the data directory) holds accounts,
//! repositories and sessions. WAL mode lets readers run beside the single
//! writer. `synchronous = NORMAL` in WAL mode makes every committed
//! transaction survive a process crash (kill -9); only an OS crash or power
//! loss can drop the last transactions, which is the trade the reference PDS
//! makes too.

pub mod account_features;
pub mod accounts;
pub mod blobs;
pub mod read_after_write;
pub mod repo;
pub mod seq;
pub mod sessions;

use std::str::FromStr;
use std::time::Duration;

use cid::Cid;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

#[derive(Clone)]
pub struct Db {
    pub pool: SqlitePool,
}

/// SQLite's per-connection page cache, negative = KiB.
const PAGE_CACHE_KIB: &str = "-2000";
const MAX_CONNECTIONS: u32 = 4;

impl Db {
    // Memory is bounded by connections x page cache: at 8 x 16 MB a 1M-record build peaked at
    // 261 MiB RSS, at 2 x 2 MB at 63 MiB with the same write speed (BENCHMARKS.md, "Memory").
    // Four connections keep reads concurrent with the single writer on small boxes.
    pub async fn open(path: &std::path::Path) -> anyhow::Result<Db> {
        // Create the file owner-only before SQLite does: its -wal and -shm
        // files copy the main file's permissions.
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", PAGE_CACHE_KIB);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .min_connections(1)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Db { pool })
    }

    /// A write transaction that takes the write lock up front (`BEGIN
    /// IMMEDIATE`): a deferred one that reads first and writes later can fail
    /// with SQLITE_BUSY at the upgrade, which the busy timeout does not cover.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// Touches the database (for the health check).
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }
}

/// Reads a CID stored as its binary form.
pub(crate) fn cid_from_bytes(bytes: &[u8]) -> Result<Cid, sqlx::Error> {
    Cid::try_from(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

#[allow(dead_code)]
pub(crate) fn cid_from_str(s: &str) -> Result<Cid, sqlx::Error> {
    Cid::from_str(s).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

pub(crate) fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
