//! House rules that are cheap to check mechanically.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("readable dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The protocol core stays pure: no runtime, database, HTTP server or client.
#[test]
fn protocol_core_does_no_io() {
    let core = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/atp");
    let files = rust_files(&core);
    assert!(files.len() >= 7, "expected the core modules under src/atp, found {}", files.len());
    let forbidden = ["tokio", "sqlx", "axum", "reqwest", "hyper", "std::net", "std::fs"];
    let mut offences = Vec::new();
    for file in &files {
        // `fixtures.rs` is compiled only for tests (it reads ../shared).
        if file.ends_with("fixtures.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("source");
        // Test modules may read fixtures from disk.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in code.lines().enumerate() {
            for word in forbidden {
                if line.contains(&format!("{word}::")) || line.contains(&format!("use {word}")) {
                    offences.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(offences.is_empty(), "I/O in the pure core:\n{}", offences.join("\n"));
}

#[test]
fn no_debug_macros_in_sources() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offences = Vec::new();
    for file in rust_files(&src) {
        let text = std::fs::read_to_string(&file).expect("source");
        for (n, line) in text.lines().enumerate() {
            if line.contains("dbg!(") || line.contains("todo!(") || line.contains("unimplemented!(") {
                offences.push(format!("{}:{}", file.display(), n + 1));
            }
        }
    }
    assert!(offences.is_empty(), "debug/unfinished macros: {offences:?}");
}
