//! Asks relays (`PDS_CRAWLERS`) to crawl this PDS: once at start, then again
//! after new events when it has been quiet, throttled per relay with backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Never ask one relay more often than this.
const MIN_INTERVAL: Duration = Duration::from_secs(5 * 60);
const MAX_BACKOFF: Duration = Duration::from_secs(60 * 60);

/// Sends one `com.atproto.sync.requestCrawl` to `relay` for `hostname`.
pub async fn request_crawl(http: &reqwest::Client, relay: &str, hostname: &str) -> anyhow::Result<()> {
    let base = if relay.contains("://") { relay.to_owned() } else { format!("https://{relay}") };
    let url = format!("{}/xrpc/com.atproto.sync.requestCrawl", base.trim_end_matches('/'));
    let request = http.post(&url).json(&serde_json::json!({ "hostname": hostname }));
    let resp = crate::telemetry::send(request).await?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        let body: String = resp.text().await.unwrap_or_default().chars().take(200).collect();
        anyhow::bail!("{url}: {status} {body}")
    }
}

/// Runs until the process ends; `activity` is notified after new events.
pub async fn run(http: reqwest::Client, relays: Vec<String>, hostname: String, activity: Arc<Notify>) {
    if relays.is_empty() {
        return;
    }
    let mut tasks = Vec::new();
    for relay in relays {
        let (http, hostname, activity) = (http.clone(), hostname.clone(), activity.clone());
        tasks.push(tokio::spawn(async move {
            let mut backoff = MIN_INTERVAL;
            let mut last: Option<Instant> = None;
            loop {
                if let Some(at) = last {
                    // Wait for activity, then respect the interval.
                    activity.notified().await;
                    let since = at.elapsed();
                    if since < backoff {
                        tokio::time::sleep(backoff - since).await;
                    }
                }
                last = Some(Instant::now());
                match request_crawl(&http, &relay, &hostname).await {
                    Ok(()) => {
                        metrics::counter!("roost_relay_crawl_requests_total", "relay" => relay.clone(), "result" => "ok")
                            .increment(1);
                        crate::telemetry::metrics::record_crawl_success(&relay);
                        tracing::info!(%relay, "requested crawl");
                        backoff = MIN_INTERVAL;
                    }
                    Err(e) => {
                        metrics::counter!("roost_relay_crawl_requests_total", "relay" => relay.clone(), "result" => "error")
                            .increment(1);
                        tracing::warn!(%relay, error = %e, "requestCrawl failed");
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}
