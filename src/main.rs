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
    /// Exit 0 when the server on 127.0.0.1:$PDS_PORT answers /xrpc/_health within 3 s, else 1.
    Healthcheck,
    /// Write a consistent snapshot (database, keys, disk blobs, manifest.json) into DIR.
    /// Safe while the server runs. S3-tier blobs are not copied.
    Backup {
        /// Target directory; must be absent or empty.
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
    /// Restore a backup into PDS_DATA_DIRECTORY after checking every checksum.
    /// Stop the server first.
    Restore {
        /// A directory written by `roost backup`.
        #[arg(long, value_name = "DIR")]
        from: std::path::PathBuf,
        /// Replace the database and keys of a non-empty data directory.
        #[arg(long)]
        force: bool,
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
    let cli = Cli::parse();
    if let Command::Healthcheck = cli.command {
        // No logging setup and no configuration: one line and an exit code.
        let result = match roost::healthcheck::port_from_env() {
            Ok(port) => roost::healthcheck::check(port).await,
            Err(e) => Err(e),
        };
        if let Err(reason) = result {
            eprintln!("unhealthy: {reason}");
            std::process::exit(1);
        }
        return Ok(());
    }
    // Held until exit: flushes buffered trace spans when dropped.
    let _telemetry = roost::telemetry::init(matches!(cli.command, Command::Serve { .. }))?;
    match cli.command {
        Command::Serve { dev } => serve(dev).await,
        Command::Crawl { relays } => crawl(relays).await,
        Command::Blobs { command } => blobs(command).await,
        Command::Healthcheck => Ok(()),
        Command::Backup { out } => {
            let config = RawConfig::load()?.validate()?;
            let manifest = roost::backup::backup(&config, &out).await?;
            println!(
                "backup written to {} ({} files; {} disk blobs copied, {} S3 blobs left to the bucket's own backup)",
                out.display(),
                manifest.files.len(),
                manifest.blobs.disk_copied,
                manifest.blobs.s3_not_copied,
            );
            Ok(())
        }
        Command::Restore { from, force } => {
            let config = RawConfig::load()?.validate()?;
            let manifest = roost::backup::restore(&config, &from, force).await?;
            println!(
                "restored {} files from {} into {}",
                manifest.files.len(),
                from.display(),
                config.data_directory.display()
            );
            if manifest.blobs.s3_not_copied > 0 {
                println!("{} blobs live in S3 and were not part of the backup", manifest.blobs.s3_not_copied);
            }
            Ok(())
        }
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
