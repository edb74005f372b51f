//! `roost backup` and `roost restore`.
//!
//! A backup directory holds `roost.sqlite` (a `VACUUM INTO` snapshot: one
//! read transaction, so consistent while the server keeps writing), `keys/`
//! (modes kept: the directory 0700, the files 0600 — the backup is as secret
//! as the data directory), `blobs/` (the disk-tier blobs the snapshot
//! references, streamed) and `manifest.json` with the size and SHA-256 of
//! every file. Blobs in the SQLite tier are inside the snapshot; blobs in the
//! S3 tier are not copied (the bucket is backed up by its provider), and the
//! manifest says how many there are.
//!
//! Restore checks every file against the manifest before writing anything,
//! refuses a non-empty data directory unless forced, and moves the database
//! and keys into place only once all of them are copied, so a failed restore
//! leaves the old data directory as it was.

use std::collections::HashSet;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sqlx::Connection as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode};

use crate::config::Config;
use crate::progress::{Progress, mib};

pub const MANIFEST: &str = "manifest.json";
/// Written into the data directory after each successful backup (read by the
/// `roost_backup_last_success_timestamp_seconds` gauge).
pub const LAST_BACKUP: &str = "last-backup.json";
pub(crate) const DB_FILE: &str = "roost.sqlite";
pub(crate) const FORMAT: u32 = 1;
const S3_NOTE: &str = "Blobs in the s3 tier are not copied: the bucket is backed up by its provider \
                       (enable versioning or replication there).";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub roost_version: String,
    pub hostname: String,
    pub started_at: i64,
    pub finished_at: i64,
    pub files: Vec<FileEntry>,
    pub blobs: BlobSummary,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the backup directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// Unix permission bits to restore.
    pub mode: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobSummary {
    /// Blobs stored inside roost.sqlite.
    pub sqlite_in_database: u64,
    /// Disk-tier blobs copied under `blobs/`.
    pub disk_copied: u64,
    /// S3-tier blobs, not copied (see `note`).
    pub s3_not_copied: u64,
    /// Disk-tier blobs in the snapshot whose file was gone by the time it was
    /// copied (deleted by a commit that came after the snapshot), as `did/cid`.
    pub disk_missing: Vec<String>,
    pub note: String,
}

/// The content of `last-backup.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastBackup {
    pub finished_at: i64,
    pub dir: String,
}

/// The last successful backup recorded in `data_directory`, if any.
pub fn last_backup(data_directory: &Path) -> Option<LastBackup> {
    let text = std::fs::read_to_string(data_directory.join(LAST_BACKUP)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes a backup of the configured data into `out` (which must be absent or
/// empty). Safe while the server runs.
pub async fn backup(config: &Config, out: &Path) -> anyhow::Result<Manifest> {
    let started_at = crate::db::now_unix();
    let db_path = config.db_path();
    ensure!(db_path.exists(), "no database at {}", db_path.display());
    if out.exists() {
        ensure!(is_empty_dir(out)?, "{} exists and is not empty", out.display());
    }
    create_private_dir(out)?;
    let out = out.canonicalize().with_context(|| format!("resolving {}", out.display()))?;

    // One read transaction copies the whole database: consistent while writers go on.
    let snapshot = out.join(DB_FILE);
    let mut live = SqliteConnection::connect_with(
        &SqliteConnectOptions::new()
            .filename(&db_path)
            .create_if_missing(false)
            .busy_timeout(Duration::from_secs(30)),
    )
    .await
    .with_context(|| format!("opening {}", db_path.display()))?;
    let snapshot_str = snapshot.to_str().context("backup path is not UTF-8")?;
    // VACUUM INTO is one statement: progress is the snapshot file growing.
    let watcher = {
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let mut progress = Progress::new("backup");
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let size = std::fs::metadata(&snapshot).map_or(0, |m| m.len());
                progress.tick(|| format!("database snapshot {} written", mib(size)));
            }
        })
    };
    let vacuum = sqlx::query("VACUUM INTO ?1").bind(snapshot_str).execute(&mut live).await;
    watcher.abort();
    vacuum.context("VACUUM INTO")?;
    live.close().await?;
    std::fs::set_permissions(&snapshot, std::fs::Permissions::from_mode(0o600))?;

    // The snapshot, not the live database, says which blob files belong to this backup.
    // Switching it to a rollback journal makes it a single self-contained file.
    let mut snap = SqliteConnection::connect_with(
        &SqliteConnectOptions::new().filename(&snapshot).journal_mode(SqliteJournalMode::Delete),
    )
    .await?;
    let tiers: Vec<(String, i64)> =
        sqlx::query_as("SELECT tier, COUNT(*) FROM blob GROUP BY tier").fetch_all(&mut snap).await?;
    let disk_blobs: Vec<(String, String)> =
        sqlx::query_as("SELECT did, cid FROM blob WHERE tier = 'disk' ORDER BY did, cid")
            .fetch_all(&mut snap)
            .await?;
    snap.close().await?;
    let count = |tier: &str| tiers.iter().find(|(t, _)| t == tier).map_or(0, |(_, n)| *n as u64);

    let keys_dir = config.keys_dir();
    let disk_location = config.blobstore.disk_location.clone();
    let out_dir = out.clone();
    let disk_total = disk_blobs.len();
    // File copying is blocking I/O; keep it off the runtime the server may share.
    let (files, missing) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut files = vec![hash_entry(&out_dir, DB_FILE, 0o600)?];
        copy_tree(&keys_dir, &out_dir, "keys", &mut files)?;
        let mut missing = Vec::new();
        if !disk_blobs.is_empty() {
            create_private_dir(&out_dir.join("blobs"))?;
        }
        let mut progress = Progress::new("backup");
        let mut copied_bytes = 0u64;
        for (i, (did, cid)) in disk_blobs.iter().enumerate() {
            progress.tick(|| format!("blobs {i}/{disk_total} ({})", mib(copied_bytes)));
            let rel = crate::blobs::object_path(did, cid).to_string();
            let src = disk_location.join(&rel);
            let rel = format!("blobs/{rel}");
            let dst = out_dir.join(&rel);
            if let Some(parent) = dst.parent() {
                create_private_dir(parent)?;
            }
            match copy_hashed(&src, &dst, 0o600) {
                Ok((size, sha256)) => {
                    copied_bytes += size;
                    files.push(FileEntry { path: rel, size, sha256, mode: 0o600 });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(format!("{did}/{cid}")),
                Err(e) => return Err(anyhow::Error::from(e).context(format!("copying {}", src.display()))),
            }
        }
        if progress.printed() {
            eprintln!("backup: blobs {disk_total}/{disk_total} ({})", mib(copied_bytes));
        }
        Ok((files, missing))
    })
    .await??;
    for blob in &missing {
        tracing::warn!(%blob, "blob deleted after the snapshot was taken; not in the backup");
    }

    let manifest = Manifest {
        format: FORMAT,
        roost_version: env!("CARGO_PKG_VERSION").into(),
        hostname: config.hostname.clone(),
        started_at,
        finished_at: crate::db::now_unix(),
        blobs: BlobSummary {
            sqlite_in_database: count("sqlite"),
            disk_copied: (disk_total - missing.len()) as u64,
            s3_not_copied: count("s3"),
            disk_missing: missing,
            note: S3_NOTE.into(),
        },
        files,
    };
    write_file_atomically(&out.join(MANIFEST), serde_json::to_vec_pretty(&manifest)?.as_slice())?;
    let last = LastBackup { finished_at: manifest.finished_at, dir: out.display().to_string() };
    write_file_atomically(&config.data_directory.join(LAST_BACKUP), &serde_json::to_vec(&last)?)?;
    Ok(manifest)
}

/// Restores the backup in `from` into the configured data directory (and disk
/// blob store). The server must be stopped.
pub async fn restore(config: &Config, from: &Path, force: bool) -> anyhow::Result<Manifest> {
    let text = std::fs::read_to_string(from.join(MANIFEST))
        .with_context(|| format!("reading {}", from.join(MANIFEST).display()))?;
    let manifest: Manifest = serde_json::from_str(&text).context("manifest.json is not a Roost manifest")?;
    ensure!(manifest.format == FORMAT, "unsupported backup format {}", manifest.format);
    check_paths(&manifest)?;
    let (config, from) = (config.clone(), from.to_owned());
    tokio::task::spawn_blocking(move || restore_files(&config, &from, &manifest, force).map(|()| manifest))
        .await?
}

fn restore_files(config: &Config, from: &Path, manifest: &Manifest, force: bool) -> anyhow::Result<()> {
    // Every checksum first: a damaged backup writes nothing.
    let mut bad = Vec::new();
    let total = manifest.files.len();
    let mut progress = Progress::new("restore");
    for (i, entry) in manifest.files.iter().enumerate() {
        progress.tick(|| format!("checking {i}/{total} files"));
        match hash_file(&from.join(&entry.path)) {
            Ok((size, sha256)) if size == entry.size && sha256 == entry.sha256 => {}
            Ok(_) => bad.push(format!("{}: checksum mismatch", entry.path)),
            Err(e) => bad.push(format!("{}: {e}", entry.path)),
        }
    }
    if !bad.is_empty() {
        bail!("backup {} failed verification, nothing restored:\n  {}", from.display(), bad.join("\n  "));
    }

    let data = &config.data_directory;
    if data.exists() && !is_empty_dir(data)? && !force {
        bail!(
            "data directory {} is not empty; pass --force to replace its database and keys",
            data.display()
        );
    }
    create_private_dir(data)?;
    // Database and keys go to a staging directory first, then move into place.
    let staging = data.join(".restore-staging");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    create_private_dir(&staging)?;
    let mut blobs = Vec::new();
    for entry in &manifest.files {
        if entry.path.starts_with("blobs/") {
            blobs.push(entry);
            continue;
        }
        let dst = staging.join(&entry.path);
        if let Some(parent) = dst.parent() {
            create_private_dir(parent)?;
        }
        copy_verified(&from.join(&entry.path), &dst, entry)?;
    }
    for name in [DB_FILE, "roost.sqlite-wal", "roost.sqlite-shm"] {
        match std::fs::remove_file(data.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    let keys = config.keys_dir();
    if keys.exists() {
        std::fs::remove_dir_all(&keys)?;
    }
    std::fs::rename(staging.join(DB_FILE), config.db_path())?;
    if staging.join("keys").exists() {
        std::fs::rename(staging.join("keys"), &keys)?;
    }
    std::fs::remove_dir_all(&staging)?;

    // Blob files are named by their content address, so writing them in place
    // is safe even if a later one fails.
    let disk = &config.blobstore.disk_location;
    let blob_total = blobs.len();
    for (i, entry) in blobs.into_iter().enumerate() {
        progress.tick(|| format!("blobs {i}/{blob_total} copied"));
        let rel = entry.path.trim_start_matches("blobs/");
        let dst = disk.join(rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = dst.with_extension("restore-tmp");
        copy_verified(&from.join(&entry.path), &tmp, entry)?;
        std::fs::rename(&tmp, &dst)?;
    }
    if progress.printed() {
        eprintln!("restore: done in {:.0} s", progress.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Manifest paths must stay inside the backup and the places restore writes
/// to: a hand-edited manifest must not make restore write elsewhere.
pub(crate) fn check_paths(manifest: &Manifest) -> anyhow::Result<()> {
    let mut seen = HashSet::new();
    for entry in &manifest.files {
        let path = Path::new(&entry.path);
        let normal = path.components().all(|c| matches!(c, Component::Normal(_)));
        let top = path.components().next().and_then(|c| c.as_os_str().to_str());
        let allowed = match top {
            Some(DB_FILE) => path.components().count() == 1,
            Some("keys" | "blobs") => path.components().count() > 1,
            _ => false,
        };
        ensure!(normal && allowed, "manifest lists an unexpected path: {}", entry.path);
        ensure!(seen.insert(entry.path.as_str()), "manifest lists {} twice", entry.path);
    }
    ensure!(seen.contains(DB_FILE), "manifest has no {DB_FILE}");
    Ok(())
}

/// Copies every file under `src` to `out/<prefix>/…`, keeping the permission bits.
fn copy_tree(src: &Path, out: &Path, prefix: &str, files: &mut Vec<FileEntry>) -> anyhow::Result<()> {
    if !src.exists() {
        return Ok(());
    }
    let dir_mode = std::fs::metadata(src)?.permissions().mode() & 0o7777;
    std::fs::create_dir_all(out.join(prefix))?;
    std::fs::set_permissions(out.join(prefix), std::fs::Permissions::from_mode(dir_mode))?;
    let mut entries: Vec<_> = std::fs::read_dir(src)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name.to_str().context("non-UTF-8 file name in the keys directory")?;
        let rel = format!("{prefix}/{name}");
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), out, &rel, files)?;
        } else if kind.is_file() {
            let mode = entry.metadata()?.permissions().mode() & 0o7777;
            let (size, sha256) = copy_hashed(&entry.path(), &out.join(&rel), mode)?;
            files.push(FileEntry { path: rel, size, sha256, mode });
        }
    }
    Ok(())
}

fn hash_entry(out: &Path, rel: &str, mode: u32) -> anyhow::Result<FileEntry> {
    let (size, sha256) = hash_file(&out.join(rel))?;
    Ok(FileEntry { path: rel.into(), size, sha256, mode })
}

const CHUNK: usize = 64 * 1024;

/// Size and SHA-256 of a file, read in chunks.
pub(crate) fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// Streams `src` to a new `dst` with `mode`, hashing on the way; fsyncs `dst`.
fn copy_hashed(src: &Path, dst: &Path, mode: u32) -> std::io::Result<(u64, String)> {
    let mut input = std::fs::File::open(src)?;
    let mut output =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(dst)?;
    // `mode` only applies to a file that did not exist yet.
    output.set_permissions(std::fs::Permissions::from_mode(mode))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        output.write_all(&buf[..n])?;
        size += n as u64;
    }
    output.sync_all()?;
    Ok((size, hex::encode(hasher.finalize())))
}

/// Copies and re-checks on the way (the backup could change after the first pass).
fn copy_verified(src: &Path, dst: &Path, entry: &FileEntry) -> anyhow::Result<()> {
    // Owner bits only: the manifest is not signed, and nothing here is for other users.
    let (size, sha256) = copy_hashed(src, dst, entry.mode & 0o700)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    if size != entry.size || sha256 != entry.sha256 {
        let _ = std::fs::remove_file(dst);
        bail!("{} changed during restore (checksum mismatch)", entry.path);
    }
    Ok(())
}

fn is_empty_dir(path: &Path) -> anyhow::Result<bool> {
    Ok(std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?.next().is_none())
}

fn create_private_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// Write to a temporary name and rename: readers see the old or the new file, never half.
fn write_file_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(paths: &[&str]) -> Manifest {
        Manifest {
            format: FORMAT,
            roost_version: "0".into(),
            hostname: "h".into(),
            started_at: 0,
            finished_at: 0,
            files: paths
                .iter()
                .map(|p| FileEntry { path: (*p).into(), size: 0, sha256: String::new(), mode: 0o600 })
                .collect(),
            blobs: BlobSummary {
                sqlite_in_database: 0,
                disk_copied: 0,
                s3_not_copied: 0,
                disk_missing: vec![],
                note: String::new(),
            },
        }
    }

    #[test]
    fn manifest_paths_cannot_escape() {
        assert!(check_paths(&manifest(&["roost.sqlite", "keys/jwt-secret", "blobs/did_plc_x/bafy"])).is_ok());
        assert!(check_paths(&manifest(&["keys/a"])).is_err(), "no database");
        assert!(check_paths(&manifest(&["roost.sqlite", "../etc/passwd"])).is_err());
        assert!(check_paths(&manifest(&["roost.sqlite", "keys/../../x"])).is_err());
        assert!(check_paths(&manifest(&["roost.sqlite", "/etc/passwd"])).is_err());
        assert!(check_paths(&manifest(&["roost.sqlite", "other/file"])).is_err());
        assert!(check_paths(&manifest(&["roost.sqlite", "keys"])).is_err());
        assert!(check_paths(&manifest(&["roost.sqlite", "roost.sqlite"])).is_err());
    }
}
