//! Test-only access to the shared interop fixtures, read in place from
//! `../shared` (they are never copied into the project).

use std::path::PathBuf;

pub fn shared_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared").join(rel)
}

pub fn read_json(rel: &str) -> serde_json::Value {
    let path = shared_path(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {} unreadable: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {} is not JSON: {e}", path.display()))
}

/// One value per line, `#` comments and empty lines skipped, no trimming
/// (some cases depend on leading or trailing spaces).
pub fn read_lines(rel: &str) -> Vec<String> {
    let path = shared_path(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {} unreadable: {e}", path.display()));
    text.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}
