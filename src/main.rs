//! The `roost` binary: parse the command line, build the app, run it.

use clap::{Parser, Subcommand};
use roost::app::App;
use roost::config::RawConfig;

#[derive(Parser)]
#[command(name = "roost", version, about = "A small, fast AT Protocol PDS")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (configuration from roost.toml and PDS_* variables).
    Serve {
        /// Local development: PDS_DEV_MODE=true and, unless set, PDS_HOSTNAME=localhost.
        #[arg(long)]
        dev: bool,
    },
    /// Blob storage: statistics, and moving large blobs between stores.
    Blobs {
        #[command(subcommand)]
        command: BlobsCommand,
    },
    /// Ask the relays in PDS_CRAWLERS (or those given) to crawl this PDS now.
    Crawl {
        /// Relay hosts; defaults to PDS_CRAWLERS.
        relays: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BlobsCommand {
    /// Count and bytes of blobs per tier (sqlite, disk, s3).
    Stats,
    /// Move every large blob into another store (configure both first:
    /// PDS_BLOBSTORE_DISK_LOCATION and the PDS_BLOBSTORE_S3_* settings).
    /// Safe to interrupt and re-run: each blob's row moves only after its copy.
    Migrate {
        /// Target store.
        #[arg(long, value_parser = ["s3", "disk"])]
        to: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Serve { dev } => serve(dev).await,
        Command::Crawl { relays } => crawl(relays).await,
        Command::Blobs { command } => blobs(command).await,
    }
}

async fn serve(dev: bool) -> anyhow::Result<()> {
    let mut raw = RawConfig::load()?;
    if dev {
        raw.dev_mode = true;
        raw.hostname.get_or_insert_with(|| "localhost".into());
    }
    let config = raw.validate()?;
    let addr = std::net::SocketAddr::new(config.bind_address, config.port);
    let app = App::build(config).await?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "roost listening");
    println!("roost listening on http://{}", listener.local_addr()?);
    app.serve(listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = terminate => {} }
    tracing::info!("shutting down");
}

async fn crawl(relays: Vec<String>) -> anyhow::Result<()> {
    let config = RawConfig::load()?.validate()?;
    let relays = if relays.is_empty() { config.crawlers.clone() } else { relays };
    anyhow::ensure!(!relays.is_empty(), "no relays: set PDS_CRAWLERS or name them");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(20)).build()?;
    let mut failed = 0;
    for relay in &relays {
        match roost::crawl::request_crawl(&http, relay, &config.hostname).await {
            Ok(()) => println!("{relay}: crawl requested for {}", config.hostname),
            Err(e) => {
                failed += 1;
                eprintln!("{relay}: {e}");
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} of {} relays refused", relays.len());
    Ok(())
}

async fn blobs(command: BlobsCommand) -> anyhow::Result<()> {
    let config = RawConfig::load()?.validate()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db = roost::db::Db::open(&config.db_path()).await?;
    match command {
        BlobsCommand::Stats => {
            println!("{:<8} {:>10} {:>16}", "tier", "blobs", "bytes");
            for (tier, count, bytes) in db.blob_stats().await? {
                println!("{tier:<8} {count:>10} {bytes:>16}");
            }
        }
        BlobsCommand::Migrate { to } => {
            let blobs = roost::blobs::Blobs::open(db, &config)?;
            let from = if to == "s3" { "disk" } else { "s3" };
            let moved = blobs.migrate(from, &to).await?;
            println!("moved {moved} blobs from {from} to {to}");
            if to == "s3" {
                println!("keep PDS_BLOBSTORE_S3_BUCKET set so new large blobs go to S3 too");
            } else {
                println!("unset PDS_BLOBSTORE_S3_BUCKET so new large blobs go to disk too");
            }
        }
    }
    Ok(())
}
