//! Blob storage in two tiers: small blobs in SQLite, large ones in the
//! large-blob store (a directory, or S3-compatible storage through
//! `object_store`).
//!
//! Uploads stream to a temporary file while being hashed and size-checked;
//! the MIME type is sniffed from the bytes. A blob is kept while a committed
//! record references it (`record_blob`); when the last reference goes, its
//! row goes in the same transaction and its large-store object right after
//! commit (with a queue that a restart finishes). Blobs never referenced are
//! swept after `PDS_BLOB_UNUSED_TTL_SECONDS`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use axum::body::Body;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{BlobstoreConfig, Config};
use crate::db::Db;
use crate::db::blobs::BlobRow;

/// Bytes kept from the start of an upload for MIME sniffing.
const SNIFF_BYTES: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("Blob is larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("Could not read the upload: {0}")]
    Body(String),
    /// A `Range` that starts at or past the end of a blob of `size` bytes.
    #[error("Range Not Satisfiable")]
    RangeNotSatisfiable { size: u64 },
    /// The blob's row exists but its bytes are gone from the store (a file
    /// deleted by hand, a bucket emptied, a restore that missed the store).
    /// Clients get the same 400 "Blob not found" as for an unknown blob
    /// (the reference PDS turns its store's `BlobNotFoundError` into that
    /// 400 too); the operator gets a warning, since this is lost data.
    #[error("blob {cid} has a row but no bytes in the {tier} store")]
    Missing { cid: String, tier: String },
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for BlobError {
    fn from(e: sqlx::Error) -> Self {
        BlobError::Internal(e.into())
    }
}

/// A blob's bytes on their way to a client.
pub struct BlobContent {
    pub row: BlobRow,
    /// The byte range served (inclusive start, exclusive end), when ranged.
    pub range: Option<(u64, u64)>,
    pub body: Body,
}

pub struct Blobs {
    db: Db,
    /// The store new large blobs go to, and its tier name.
    large: Arc<dyn ObjectStore>,
    large_tier: &'static str,
    disk: Arc<dyn ObjectStore>,
    s3: Option<Arc<dyn ObjectStore>>,
    tmp_dir: PathBuf,
    pub upload_limit: u64,
    pub sqlite_max_bytes: u64,
}

pub(crate) fn object_path(did: &str, cid: &str) -> ObjectPath {
    ObjectPath::from(format!("{}/{}", did.replace(':', "_"), cid))
}

pub fn s3_store(s3: &crate::config::S3Config, allow_http: bool) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let mut b = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&s3.bucket)
        .with_region(s3.region.as_deref().unwrap_or("us-east-1"))
        .with_virtual_hosted_style_request(!s3.force_path_style)
        .with_allow_http(allow_http);
    if let Some(endpoint) = &s3.endpoint {
        b = b.with_endpoint(endpoint);
    }
    if let (Some(id), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) {
        b = b.with_access_key_id(id).with_secret_access_key(secret);
    }
    Ok(Arc::new(b.build().context("configuring the S3 blob store")?))
}

impl Blobs {
    pub fn open(db: Db, config: &Config) -> anyhow::Result<Blobs> {
        let BlobstoreConfig { disk_location, s3, upload_limit, sqlite_max_bytes, .. } = &config.blobstore;
        std::fs::create_dir_all(disk_location)
            .with_context(|| format!("creating blob directory {}", disk_location.display()))?;
        let disk: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(disk_location)?);
        let s3 = s3.as_ref().map(|s| s3_store(s, config.dev_mode)).transpose()?;
        let (large, large_tier) = match &s3 {
            Some(s3) => (s3.clone(), "s3"),
            None => (disk.clone(), "disk"),
        };
        let tmp_dir = config.data_directory.join("tmp");
        std::fs::create_dir_all(&tmp_dir)?;
        Ok(Blobs {
            db,
            large,
            large_tier,
            disk,
            s3,
            tmp_dir,
            upload_limit: *upload_limit,
            sqlite_max_bytes: *sqlite_max_bytes,
        })
    }

    fn store_for(&self, tier: &str) -> Option<&Arc<dyn ObjectStore>> {
        match tier {
            "disk" => Some(&self.disk),
            "s3" => self.s3.as_ref(),
            _ => None,
        }
    }

    /// Streams an upload to a temporary file, then files it in its tier.
    pub async fn upload(
        &self,
        did: &str,
        declared_mime: Option<&str>,
        body: Body,
    ) -> Result<BlobRow, BlobError> {
        let tmp_path = self.tmp_dir.join(format!("upload-{}", crate::auth::random_id()));
        let result = self.upload_via(&tmp_path, did, declared_mime, body).await;
        let _ = tokio::fs::remove_file(&tmp_path).await;
        result
    }

    async fn upload_via(
        &self,
        tmp_path: &std::path::Path,
        did: &str,
        declared_mime: Option<&str>,
        body: Body,
    ) -> Result<BlobRow, BlobError> {
        let mut file = tokio::fs::File::create(tmp_path).await.map_err(anyhow::Error::from)?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut head: Vec<u8> = Vec::with_capacity(SNIFF_BYTES);
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BlobError::Body(e.to_string()))?;
            size += chunk.len() as u64;
            if size > self.upload_limit {
                return Err(BlobError::TooLarge(self.upload_limit));
            }
            if head.len() < SNIFF_BYTES {
                let take = (SNIFF_BYTES - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(anyhow::Error::from)?;
        }
        file.sync_all().await.map_err(anyhow::Error::from)?;
        drop(file);
        let cid = crate::atp::data::cid_for_raw_digest(&hasher.finalize().into()).to_string();
        let mime_type = sniff_mime(&head, declared_mime);
        if let Some(existing) = self.db.blob(did, &cid).await? {
            // The caller is about to reference it: the unused TTL restarts.
            self.db.touch_blob(did, &cid).await?;
            return Ok(existing);
        }
        let size_i64 = i64::try_from(size).map_err(|_| BlobError::TooLarge(self.upload_limit))?;
        if size <= self.sqlite_max_bytes {
            let data = tokio::fs::read(tmp_path).await.map_err(anyhow::Error::from)?;
            let row = BlobRow { cid, mime_type, size: size_i64, tier: "sqlite".into() };
            self.db.insert_blob(did, &row, Some(&data)).await?;
            return Ok(row);
        }
        self.copy_file_to_store(tmp_path, &self.large, &object_path(did, &cid)).await?;
        let row = BlobRow { cid, mime_type, size: size_i64, tier: self.large_tier.into() };
        self.db.insert_blob(did, &row, None).await?;
        Ok(row)
    }

    async fn copy_file_to_store(
        &self,
        path: &std::path::Path,
        store: &Arc<dyn ObjectStore>,
        to: &ObjectPath,
    ) -> anyhow::Result<()> {
        let mut file = tokio::fs::File::open(path).await?;
        let upload = store.put_multipart(to).await?;
        let mut writer = WriteMultipart::new(upload);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(4).await?;
            writer.write(&buf[..n]);
        }
        writer.finish().await?;
        Ok(())
    }

    /// Opens a blob for reading, optionally a byte range (start, inclusive end).
    pub async fn get(
        &self,
        did: &str,
        cid: &str,
        range: Option<(u64, Option<u64>)>,
    ) -> Result<Option<BlobContent>, BlobError> {
        let Some(row) = self.db.blob(did, cid).await? else { return Ok(None) };
        let size = u64::try_from(row.size).unwrap_or(0);
        let range = match range {
            Some((start, end)) if start < size => {
                Some((start, end.map_or(size, |e| e.saturating_add(1).min(size))))
            }
            Some(_) => return Err(BlobError::RangeNotSatisfiable { size }),
            None => None,
        };
        let missing = |row: &BlobRow| BlobError::Missing { cid: cid.to_owned(), tier: row.tier.clone() };
        if row.tier == "sqlite" {
            // A NULL `data` would otherwise be served as an empty blob.
            let Some(data) = self.db.blob_data(did, cid).await? else { return Err(missing(&row)) };
            let data = match range {
                Some((a, b)) => data[a as usize..b as usize].to_vec(),
                None => data,
            };
            return Ok(Some(BlobContent { row, range, body: Body::from(data) }));
        }
        let store = self.store_for(&row.tier).ok_or_else(|| {
            anyhow::anyhow!("blob {cid} is in the {} store, which is not configured", row.tier)
        })?;
        let options = GetOptions { range: range.map(|(a, b)| GetRange::Bounded(a..b)), ..Default::default() };
        let result = match store.get_opts(&object_path(did, cid), options).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Err(missing(&row)),
            Err(e) => return Err(anyhow::Error::from(e).into()),
        };
        let stream = result.into_stream().map_err(std::io::Error::other);
        Ok(Some(BlobContent { row, range, body: Body::from_stream(stream) }))
    }

    /// Deletes queued large-store objects (after commits, and at start).
    pub async fn process_deletions(&self) -> anyhow::Result<usize> {
        let mut done = 0;
        loop {
            let batch = self.db.pending_deletions(100).await?;
            if batch.is_empty() {
                return Ok(done);
            }
            for item in batch {
                let live = self.db.blob(&item.did, &item.cid).await?.is_some_and(|r| r.tier == item.tier);
                if live {
                    // Uploaded again since it was released: the object is live.
                } else if let Some(store) = self.store_for(&item.tier) {
                    match store.delete(&object_path(&item.did, &item.cid)).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                self.db.finish_deletion(item.id).await?;
                done += 1;
            }
        }
    }

    /// Moves every large blob of tier `from` into the `to` store.
    pub async fn migrate(&self, from: &str, to: &str) -> anyhow::Result<usize> {
        let source =
            self.store_for(from).ok_or_else(|| anyhow::anyhow!("the {from} store is not configured"))?;
        let target = self.store_for(to).ok_or_else(|| anyhow::anyhow!("the {to} store is not configured"))?;
        let mut moved = 0;
        let mut after = (String::new(), String::new());
        loop {
            let batch = self.db.blobs_in_tier(from, (&after.0, &after.1), 100).await?;
            let Some(last) = batch.last().cloned() else { return Ok(moved) };
            for (did, cid) in batch {
                let path = object_path(&did, &cid);
                let mut stream = source.get(&path).await?.into_stream();
                let mut writer = WriteMultipart::new(target.put_multipart(&path).await?);
                while let Some(chunk) = stream.try_next().await? {
                    writer.wait_for_capacity(4).await?;
                    writer.put(chunk);
                }
                writer.finish().await?;
                // The row moves only after the copy is complete; the old
                // object goes only after the row moved.
                self.db.set_blob_tier(&did, &cid, to).await?;
                source.delete(&path).await?;
                moved += 1;
            }
            after = last;
        }
    }
}

/// The MIME type from the bytes; the declared type only when sniffing finds
/// nothing. Types a browser would run (HTML, SVG, XML, scripts) are stored as
/// `application/octet-stream` whichever way they were found, so a blob can
/// never be served as a page from the PDS's origin.
fn sniff_mime(head: &[u8], declared: Option<&str>) -> String {
    let found = match infer::get(head) {
        Some(kind) => kind.mime_type().to_owned(),
        None => declared
            .map(|d| d.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
            .unwrap_or_default(),
    };
    if found.is_empty() || !found.contains('/') || is_active_content(&found) {
        "application/octet-stream".to_owned()
    } else {
        found
    }
}

fn is_active_content(mime: &str) -> bool {
    mime.contains("html") || mime.contains("svg") || mime.contains("javascript") || mime.contains("xml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_prefers_bytes_and_refuses_active_content() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert_eq!(sniff_mime(png, Some("text/html")), "image/png");
        assert_eq!(sniff_mime(b"<html><script>", Some("text/html")), "application/octet-stream");
        assert_eq!(sniff_mime(b"hello", Some("text/plain; charset=utf-8")), "text/plain");
        assert_eq!(sniff_mime(b"hello", None), "application/octet-stream");
    }
}
