//! Helpers shared by the load examples (`loadgen`, `blobload`, `firehose_load`,
//! `scale`): reading a process's memory from /proc and logging in over XRPC.
//! Each example uses only part of this module.

use anyhow::Context as _;
use serde_json::{Value, json};

/// A field of `/proc/<pid>/status` (`pid` = "self" or a number), in KiB, e.g.
/// `VmRSS:` or `VmHWM:`; `None` when unreadable.
pub fn proc_status_kib(pid: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// A field of this process's `/proc/self/status` in KiB (0 when unreadable).
pub fn status_kib(field: &str) -> u64 {
    proc_status_kib("self", field).unwrap_or(0)
}

/// The DID and access token of a `createSession`.
pub struct Login {
    pub did: String,
    pub jwt: String,
}

/// `com.atproto.server.createSession` on the server at `url`.
pub async fn login(
    client: &reqwest::Client,
    url: &str,
    handle: &str,
    password: &str,
) -> anyhow::Result<Login> {
    let resp = client
        .post(format!("{url}/xrpc/com.atproto.server.createSession"))
        .json(&json!({ "identifier": handle, "password": password }))
        .send()
        .await?;
    let status = resp.status();
    let body: Value = resp.json().await?;
    anyhow::ensure!(status.is_success(), "createSession: {status} {body}");
    Ok(Login {
        did: body["did"].as_str().context("did")?.to_owned(),
        jwt: body["accessJwt"].as_str().context("accessJwt")?.to_owned(),
    })
}
