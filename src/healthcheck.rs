//! `roost healthcheck`: the container's HEALTHCHECK. Asks the local server's
//! `/xrpc/_health` (which touches the database) and turns the answer into an
//! exit code, without loading the rest of the configuration: a healthcheck
//! must not fail because an unrelated setting is missing from its environment.

use std::time::Duration;

/// The whole check, request and body, must finish within this.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// The port from `PDS_PORT`, defaulting like the server does.
pub fn port_from_env() -> Result<u16, String> {
    match std::env::var("PDS_PORT") {
        Ok(p) if !p.trim().is_empty() => p.trim().parse().map_err(|_| format!("PDS_PORT={p} is not a port")),
        _ => Ok(2583),
    }
}

/// `Ok` when `GET http://127.0.0.1:<port>/xrpc/_health` answers 200 within
/// [`TIMEOUT`]; otherwise a one-line reason.
pub async fn check(port: u16) -> Result<(), String> {
    let url = format!("http://127.0.0.1:{port}/xrpc/_health");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))?;
    let response = http.get(&url).send().await.map_err(|e| {
        if e.is_timeout() {
            format!("{url}: no answer within {} s", TIMEOUT.as_secs())
        } else if e.is_connect() {
            format!("{url}: connection refused (is roost running?)")
        } else {
            format!("{url}: {e}")
        }
    })?;
    let status = response.status();
    if status == reqwest::StatusCode::OK {
        Ok(())
    } else {
        let body: String = response.text().await.unwrap_or_default().chars().take(200).collect();
        Err(format!("{url}: {status} {}", body.replace('\n', " ")))
    }
}
