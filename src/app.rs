//! Builds the application from a [`Config`] and serves it.
//!
//! `App::build` opens the database, loads keys, makes sure the configured
//! account exists, and assembles the router. Tests call it with a `Config`
//! value and a listener on `127.0.0.1:0`.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::auth::{TokenIssuer, random_password};
use crate::config::Config;
use crate::db::Db;
use crate::identity::{KeyStore, PlcClient, write_secret_file};
use crate::repo::RepoService;

/// Shared state handed to every handler.
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub db: Db,
    pub repo: RepoService,
    pub keys: KeyStore,
    pub tokens: TokenIssuer,
    pub plc: PlcClient,
    pub login_limiter: crate::auth::LoginLimiter,
    pub sequencer: Arc<crate::sequencer::Sequencer>,
    /// Flips to true when the server starts shutting down (ends firehose streams).
    pub shutdown: tokio::sync::watch::Sender<bool>,
    pub http: reqwest::Client,
    pub blobs: crate::blobs::Blobs,
    /// For untrusted destinations (proxied calls, did:web): SSRF-safe.
    pub outbound: reqwest::Client,
    pub did_resolver: crate::proxy::DidResolver,
    pub handle_resolver: crate::handle::HandleResolver,
    pub rate_limits: crate::ratelimit::RateLimits,
    /// Lexicons records are validated against (bundle, directory, network).
    pub lexicons: crate::lexicon_net::Lexicons,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

pub struct App {
    pub state: AppState,
    /// The `/metrics` listener (`PDS_METRICS_LISTEN`), when enabled.
    metrics: Option<crate::telemetry::metrics::Listener>,
}

/// How long shutdown waits for in-flight requests before closing them.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        std::fs::create_dir_all(&config.data_directory)
            .with_context(|| format!("creating data directory {}", config.data_directory.display()))?;
        {
            // The data directory holds keys and the database: owner only.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&config.data_directory, std::fs::Permissions::from_mode(0o700))?;
        }
        let db = Db::open(&config.db_path()).await.context("opening the database")?;
        let keys = KeyStore::open(config.keys_dir(), config.rotation_key_hex.as_deref())?;
        let jwt_secret = match &config.jwt_secret {
            Some(s) => s.clone().into_bytes(),
            None => load_or_create_jwt_secret(&config)?,
        };
        // reqwest uses rustls without a built-in provider; pick ring (idempotent).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .user_agent(concat!("roost/", env!("CARGO_PKG_VERSION")))
            .timeout(std::time::Duration::from_secs(20))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let sequencer = Arc::new(crate::sequencer::Sequencer::new(
            config.firehose_max_subscribers,
            config.firehose_max_per_ip,
        ));
        let outbound = crate::proxy::outbound_client(&config.proxy)?;
        let did_resolver = crate::proxy::DidResolver::new(
            http.clone(),
            outbound.clone(),
            config.plc_url.clone(),
            config.proxy.clone(),
            config.dev_mode,
        );
        let lexicons = build_lexicons(&config, &http)?;
        let state = AppState(Arc::new(Inner {
            rate_limits: crate::ratelimit::RateLimits::new(config.rate_limits_enabled),
            handle_resolver: crate::handle::HandleResolver::new(outbound.clone()),
            outbound,
            did_resolver,
            tokens: TokenIssuer::new(&jwt_secret, config.service_did.clone()),
            plc: PlcClient::new(http.clone(), config.plc_url.clone()),
            shutdown: tokio::sync::watch::channel(false).0,
            http,
            blobs: crate::blobs::Blobs::open(db.clone(), &config)?,
            lexicons,
            repo: RepoService::new(db.clone(), sequencer.clone()),
            sequencer,
            login_limiter: Default::default(),
            keys,
            db,
            config,
        }));
        ensure_configured_account(&state).await?;
        let metrics = crate::telemetry::metrics::bind(state.config.metrics_listen).await?;
        Ok(App { state, metrics })
    }

    /// Where `/metrics` is served, when enabled.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.listener.local_addr().ok())
    }

    pub fn router(&self) -> axum::Router {
        crate::xrpc::router(self.state.clone())
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let router = self.router();
        let App { state, metrics } = self;
        let db = state.db.clone();
        let mut background = vec![
            tokio::spawn(prune_events(state.clone())),
            tokio::spawn(sweep_blobs(state.clone())),
            tokio::spawn(crate::crawl::run(
                state.http.clone(),
                state.config.crawlers.clone(),
                state.config.hostname.clone(),
                state.sequencer.activity(),
            )),
        ];
        if let Some(m) = metrics {
            if let Ok(addr) = m.listener.local_addr() {
                tracing::info!(%addr, "serving /metrics");
            }
            let sources = crate::telemetry::metrics::SampleSources {
                db: db.clone(),
                db_path: state.config.db_path(),
                data_directory: state.config.data_directory.clone(),
                handle: m.handle.clone(),
            };
            // The first sample before serving, so the first scrape has every gauge.
            crate::telemetry::metrics::sample(&sources).await;
            background.push(tokio::spawn(crate::telemetry::metrics::run_sampler(sources)));
            let mut stopping = state.shutdown.subscribe();
            background.push(tokio::spawn(async move {
                let stopped = async move {
                    let _ = stopping.wait_for(|s| *s).await;
                };
                if let Err(e) = crate::telemetry::metrics::serve(m.listener, m.handle, stopped).await {
                    tracing::error!(error = %e, "metrics listener failed");
                }
            }));
        }
        let stop = state.clone();
        let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            shutdown.await;
            // Firehose streams end themselves, so draining can finish.
            let _ = stop.shutdown.send(true);
            let _ = signalled_tx.send(());
        };
        // No Nagle: a response's last small segment must not wait ~40 ms for
        // the client's delayed ACK (seen on 1 MB blob downloads).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
        });
        let server = std::future::IntoFuture::into_future(
            axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>())
                .with_graceful_shutdown(shutdown),
        );
        // Draining is bounded: a stuck client must not keep a stopping container alive.
        let drain_deadline = async move {
            if signalled_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        };
        tokio::select! {
            result = server => result?,
            () = drain_deadline => tracing::warn!("in-flight requests did not finish within 10 s; closing them"),
        }
        for task in background {
            task.abort();
        }
        // Upgraded WebSockets outlive `axum::serve`; let firehose streams send
        // their close frames before the pool goes away under them.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        while state.sequencer.subscriber_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Leave the whole database in the main file (an empty WAL) for file-level copies.
        let closing = async {
            match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&db.pool)
                .await
            {
                Ok((0, _, _)) => {}
                Ok(_) => tracing::warn!("WAL checkpoint incomplete at shutdown: the database was busy"),
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint at shutdown failed"),
            }
            db.pool.close().await;
        };
        // A request cut off by the drain deadline may still hold a connection.
        if tokio::time::timeout(std::time::Duration::from_secs(5), closing).await.is_err() {
            tracing::warn!("database connections still busy at shutdown; exiting without a final checkpoint");
        }
        Ok(())
    }
}

/// Finishes queued large-blob deletions (also those a crash left behind) and
/// deletes uploads no record adopted within the TTL, every [`sweep_interval`].
async fn sweep_blobs(state: AppState) {
    let ttl = state.config.blobstore.unused_ttl_seconds as i64;
    let mut tick = tokio::time::interval(sweep_interval(state.config.blobstore.unused_ttl_seconds));
    // With a short interval a slow sweep (many S3 deletions) could overrun
    // it; catching up with back-to-back sweeps would only repeat empty work.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match state.db.sweep_unused_blobs(crate::db::now_unix() - ttl).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(swept = n, "deleted unused blobs"),
            Err(e) => tracing::warn!(error = %e, "sweeping unused blobs failed"),
        }
        if let Err(e) = state.blobs.process_deletions().await {
            tracing::warn!(error = %e, "deleting released blobs failed");
        }
    }
}

/// How often the unused-blob sweep runs: half the TTL, so an unused upload
/// goes about 1.5 × TTL after it was made at the latest (a fixed ten minutes
/// kept a TTL of seconds waiting up to ten minutes); never less often than
/// every ten minutes, the former fixed interval, which the default TTL (an
/// hour) keeps; and at most every second, so a TTL of 0 does not make the
/// sweep spin on the database.
fn sweep_interval(unused_ttl_seconds: u64) -> std::time::Duration {
    use std::time::Duration;
    (Duration::from_secs(unused_ttl_seconds) / 2).clamp(Duration::from_secs(1), Duration::from_secs(600))
}

/// The start-up catalog (the installed bundle, then `PDS_LEXICON_DIRECTORY`,
/// whose documents replace the bundle's of the same NSID), and the network
/// resolver when enabled.
fn build_lexicons(config: &Config, http: &reqwest::Client) -> anyhow::Result<crate::lexicon_net::Lexicons> {
    use crate::lexicon_net::{HickoryTxt, Lexicons, NetworkFetcher, PinnedTxt, TxtLookup, guarded_client};
    let mut catalog = crate::lexicon::Catalog::new();
    if let Some(path) = &config.lexicons.bundle {
        match crate::lexicon_store::read_bundle(path)? {
            Some((bundle, loaded)) => {
                tracing::info!(
                    documents = loaded.len(),
                    package = %bundle.source.package,
                    version = %bundle.source.version,
                    "loaded the lexicon bundle"
                );
                catalog = loaded;
            }
            None => tracing::warn!(
                path = %path.display(),
                "no lexicon bundle: records are not validated against the Bluesky lexicons \
                 (run `roost lexicons install`)"
            ),
        }
    }
    if let Some(dir) = &config.lexicon_directory {
        load_lexicon_directory(&mut catalog, dir)?;
    }
    let resolver = if config.lexicons.resolution {
        let dns: Box<dyn TxtLookup> = Box::new(HickoryTxt::from_system()?);
        let txt = PinnedTxt::new(config.lexicons.authorities.clone(), Some(dns));
        let fetcher = NetworkFetcher::new(
            Box::new(txt),
            guarded_client(config.dev_mode)?,
            http.clone(),
            config.plc_url.clone(),
            config.dev_mode,
        );
        let ttl = std::time::Duration::from_secs(config.lexicons.resolution_ttl_seconds);
        Some(Lexicons::resolver(fetcher, ttl))
    } else {
        None
    };
    Ok(Lexicons::new(catalog, resolver))
}

/// Adds every `*.json` lexicon under `dir` (recursively).
fn load_lexicon_directory(
    catalog: &mut crate::lexicon::Catalog,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path)?;
                let json: serde_json::Value =
                    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
                catalog.add_document(&json).with_context(|| format!("loading lexicon {}", path.display()))?;
            }
        }
    }
    tracing::info!(documents = catalog.len(), dir = %dir.display(), "loaded lexicons");
    Ok(())
}

/// Drops firehose events older than the retention window, hourly.
async fn prune_events(state: AppState) {
    let retention = state.config.firehose_retention_hours as i64 * 3600;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tick.tick().await;
        match state.db.prune_events(crate::db::now_unix() - retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "pruned old firehose events"),
            Err(e) => tracing::warn!(error = %e, "pruning firehose events failed"),
        }
        // Limiter state for clients that went quiet: bounded memory.
        state.rate_limits.shrink();
    }
}

fn load_or_create_jwt_secret(config: &Config) -> anyhow::Result<Vec<u8>> {
    let path = config.keys_dir().join("jwt-secret");
    if path.exists() {
        return Ok(std::fs::read_to_string(&path)?.trim().as_bytes().to_vec());
    }
    let secret = crate::auth::random_id() + &crate::auth::random_id();
    write_secret_file(&path, &secret)?;
    Ok(secret.into_bytes())
}

/// Creates the account named by `PDS_HANDLE` on first start, and resumes a
/// first start that crashed half way. Never creates a second DID: the
/// pending account row (with its signed genesis op) is written before the
/// PLC directory hears of it.
async fn ensure_configured_account(state: &AppState) -> anyhow::Result<()> {
    let Some(seed) = &state.config.account else {
        return Ok(());
    };
    let account = match state.db.account_by_handle(&seed.handle).await? {
        Some(account) => account,
        None => {
            let (password, generated) = match &seed.password {
                Some(p) => (p.clone(), false),
                None => (random_password(), true),
            };
            let row = crate::accounts::pending_row(
                state,
                &seed.handle,
                seed.email.as_deref(),
                &password,
                seed.did_method,
            )?;
            state.db.insert_pending_account(&row).await?;
            if generated {
                // Printed once, on stdout, never logged.
                println!(
                    "roost: created account {} ({}); generated password: {password}",
                    row.handle, row.did
                );
            }
            row
        }
    };
    if account.status == "pending" {
        crate::accounts::finish_pending(state, &account).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn the_sweep_interval_follows_the_unused_blob_ttl() {
        // The default TTL keeps the former ten minutes.
        assert_eq!(super::sweep_interval(3600), Duration::from_secs(600));
        assert_eq!(super::sweep_interval(86_400), Duration::from_secs(600));
        assert_eq!(super::sweep_interval(60), Duration::from_secs(30));
        assert_eq!(super::sweep_interval(3), Duration::from_millis(1500));
        assert_eq!(super::sweep_interval(2), Duration::from_secs(1));
        assert_eq!(super::sweep_interval(0), Duration::from_secs(1));
    }
}
