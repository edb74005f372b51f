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
    /// Accounts on the running server (uses PDS_ADMIN_PASSWORD and the admin API).
    Account {
        /// The server's base URL (default http://127.0.0.1:$PDS_PORT).
        #[arg(long, global = true)]
        url: Option<String>,
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Handles of accounts on the running server.
    Handle {
        #[arg(long, global = true)]
        url: Option<String>,
        #[command(subcommand)]
        command: HandleCommand,
    },
    /// The offline lexicon bundle: install it from the pinned npm package, or
    /// show what is installed.
    Lexicons {
        #[command(subcommand)]
        command: LexiconsCommand,
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
    /// Check a backup (manifest checksums) or a data directory without a server:
    /// SQLite integrity, every repository's signed commit and MST, the record
    /// index, blobs. Exit status 0 only when every check passes.
    Verify {
        /// A directory written by `roost backup`, or a data directory.
        dir: std::path::PathBuf,
        /// Disk-tier blobs of a data directory (default PDS_BLOBSTORE_DISK_LOCATION
        /// when set, else DIR/blobs); a backup's are in its blobs/.
        #[arg(long, value_name = "DIR")]
        blobs: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Every account: DID, handle, email, status.
    List,
    /// A new account (no invite needed); prints the password if generated.
    Create {
        handle: String,
        #[arg(long)]
        email: Option<String>,
        /// Read the password from stdin instead of generating one.
        #[arg(long)]
        password_stdin: bool,
        /// did:web:<handle> (document served by this server) instead of did:plc.
        #[arg(long)]
        did_web: bool,
    },
    /// Sets a new password (generated and printed, or from stdin) and ends all sessions.
    ResetPassword {
        /// Handle or DID.
        account: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// An invite code for `com.atproto.server.createAccount`.
    CreateInvite {
        #[arg(long, default_value_t = 1)]
        uses: i64,
        /// Handle or DID the code is issued to.
        #[arg(long = "for")]
        for_account: Option<String>,
    },
    /// An app password for an account (asks for the account's password on stdin).
    AppPassword {
        /// Handle or DID.
        account: String,
        name: String,
        /// May also use DMs.
        #[arg(long)]
        privileged: bool,
    },
    /// Pending out-of-band tokens (e.g. for deleteAccount) of an account.
    Tokens {
        /// Handle or DID.
        account: String,
    },
}

#[derive(Subcommand)]
enum HandleCommand {
    /// Changes an account's handle (PLC update and #identity event).
    Set {
        /// Current handle or DID.
        account: String,
        new_handle: String,
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

#[derive(Subcommand)]
enum LexiconsCommand {
    /// Download the pinned package (or read it with --from), check its
    /// SHA-512, and write the bundle (default PDS_LEXICON_BUNDLE).
    Install {
        /// A tarball of the pinned package version, for hosts without registry access.
        #[arg(long)]
        from: Option<std::path::PathBuf>,
        /// Where to write the bundle.
        #[arg(long)]
        to: Option<std::path::PathBuf>,
    },
    /// The installed bundle's source and document counts.
    Status,
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
        Command::Account { url, command } => account(url, command).await,
        Command::Handle { url, command: HandleCommand::Set { account, new_handle } } => {
            let config = RawConfig::load()?.validate()?;
            roost::admin_cli::AdminClient::new(&config, url)?.set_handle(&account, &new_handle).await?;
            println!("{account} is now {}", new_handle.to_ascii_lowercase());
            Ok(())
        }
        Command::Lexicons { command } => lexicons(command).await,
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
        Command::Verify { dir, blobs } => {
            // No validated configuration needed: a backup can be checked anywhere.
            let disk_blobs = blobs.or_else(|| {
                RawConfig::load().ok()?.blobstore_disk_location.filter(|l| !l.is_empty()).map(Into::into)
            });
            let report = roost::verify::verify(&dir, &roost::verify::Options { disk_blobs }).await?;
            for line in &report.checks {
                println!("{line}");
            }
            for problem in &report.problems {
                println!("problem: {problem}");
            }
            if report.problem_count > report.problems.len() {
                println!("… and {} more problems", report.problem_count - report.problems.len());
            }
            println!("{}", report.summary());
            if !report.ok() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn account(url: Option<String>, command: AccountCommand) -> anyhow::Result<()> {
    use roost::admin_cli::{AdminClient, read_secret_line};
    let config = RawConfig::load()?.validate()?;
    let password_from = |stdin: bool| -> anyhow::Result<(String, bool)> {
        if stdin {
            Ok((read_secret_line("password: ")?, false))
        } else {
            Ok((roost::auth::random_password(), true))
        }
    };
    if let AccountCommand::Tokens { account } = &command {
        // Read-only and local: tokens are never sent over the admin API.
        let db = roost::db::Db::open(&config.db_path()).await?;
        let row = if account.starts_with("did:") {
            db.account_by_did(account).await?
        } else {
            db.account_by_handle(&account.to_ascii_lowercase()).await?
        };
        let row = row.ok_or_else(|| anyhow::anyhow!("no account {account}"))?;
        match db.account_token(&row.did, "delete_account").await? {
            Some(token) => println!("delete_account: {token}"),
            None => println!("no pending tokens for {}", row.handle),
        }
        return Ok(());
    }
    let client = AdminClient::new(&config, url)?;
    match command {
        AccountCommand::List => {
            for a in client.list().await? {
                println!(
                    "{}\t{}\t{}\t{}",
                    a["did"].as_str().unwrap_or(""),
                    a["handle"].as_str().unwrap_or(""),
                    a["email"].as_str().unwrap_or("-"),
                    a["status"].as_str().unwrap_or(if a["active"] == true { "active" } else { "inactive" }),
                );
            }
        }
        AccountCommand::Create { handle, email, password_stdin, did_web } => {
            let (password, generated) = password_from(password_stdin)?;
            let created = client.create(&handle, email.as_deref(), &password, did_web).await?;
            println!(
                "created {} ({})",
                created["handle"].as_str().unwrap_or(""),
                created["did"].as_str().unwrap_or("")
            );
            if generated {
                println!("password: {password}");
            }
        }
        AccountCommand::ResetPassword { account, password_stdin } => {
            let (password, generated) = password_from(password_stdin)?;
            client.reset_password(&account, &password).await?;
            println!("password of {account} changed; its sessions were ended");
            if generated {
                println!("password: {password}");
            }
        }
        AccountCommand::CreateInvite { uses, for_account } => {
            println!("{}", client.create_invite(uses, for_account.as_deref()).await?);
        }
        AccountCommand::AppPassword { account, name, privileged } => {
            let password = read_secret_line(&format!("password of {account}: "))?;
            let created = client.app_password(&account, &password, &name, privileged).await?;
            println!(
                "{}: {}",
                created["name"].as_str().unwrap_or(&name),
                created["password"].as_str().unwrap_or("")
            );
        }
        AccountCommand::Tokens { .. } => unreachable!("handled above"),
    }
    Ok(())
}

async fn serve(dev: bool) -> anyhow::Result<()> {
    let mut raw = RawConfig::load()?;
    if dev {
        raw.dev_mode = true;
        raw.hostname.get_or_insert_with(|| "localhost".into());
    }
    let config = raw.validate()?;
    if let Some(bundle) = &config.lexicons.bundle
        && config.lexicons.auto_install
        && bundle_needs_install(bundle)
    {
        // First start, or a Roost upgrade that pins another package version:
        // fetch the pinned, checksummed bundle once. Offline this fails fast
        // and the server runs with what it has (App::build says what).
        println!(
            "roost: installing the lexicon bundle ({} {})",
            roost::lexicon_store::PACKAGE,
            roost::lexicon_store::VERSION
        );
        let http = registry_client()?;
        if let Err(e) =
            roost::lexicon_store::install(&http, &config.lexicons.npm_registry, None, bundle).await
        {
            tracing::warn!(error = %format!("{e:#}"), "could not install the lexicon bundle");
        }
    }
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

/// No bundle, or one built from another package version than this binary
/// pins. A damaged bundle is left for `App::build` to refuse loudly.
fn bundle_needs_install(path: &std::path::Path) -> bool {
    match roost::lexicon_store::read_bundle(path) {
        Ok(None) => true,
        Ok(Some((bundle, _))) => bundle.source != roost::lexicon_store::source(),
        Err(_) => false,
    }
}

fn registry_client() -> anyhow::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(reqwest::Client::builder()
        .user_agent(concat!("roost/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(120))
        .build()?)
}

async fn lexicons(command: LexiconsCommand) -> anyhow::Result<()> {
    // No full validation: installing into an image at build time has no
    // hostname or account to configure.
    let raw = RawConfig::load()?;
    let default_bundle = || {
        raw.lexicon_bundle.clone().filter(|b| !b.is_empty()).map(std::path::PathBuf::from).unwrap_or_else(
            || {
                std::path::PathBuf::from(raw.data_directory.clone().unwrap_or_else(|| "./data".into()))
                    .join("lexicons.json")
            },
        )
    };
    match command {
        LexiconsCommand::Install { from, to } => {
            let dest = to.unwrap_or_else(default_bundle);
            let registry = raw
                .lexicon_npm_registry
                .clone()
                .unwrap_or_else(|| roost::lexicon_store::DEFAULT_REGISTRY.into());
            let bundle =
                roost::lexicon_store::install(&registry_client()?, &registry, from.as_deref(), &dest).await?;
            println!(
                "installed {} lexicon documents from {} {} into {}",
                bundle.documents.len(),
                bundle.source.package,
                bundle.source.version,
                dest.display()
            );
        }
        LexiconsCommand::Status => {
            let path = default_bundle();
            let Some((bundle, catalog)) = roost::lexicon_store::read_bundle(&path)? else {
                anyhow::bail!("no lexicon bundle at {}: run `roost lexicons install`", path.display());
            };
            println!(
                "{}: {} {} ({})",
                path.display(),
                bundle.source.package,
                bundle.source.version,
                bundle.source.integrity
            );
            let mut counts = std::collections::BTreeMap::<String, usize>::new();
            for doc in catalog.docs() {
                let id = doc.id().as_str();
                let ns = id.splitn(3, '.').take(2).collect::<Vec<_>>().join(".");
                *counts.entry(ns).or_default() += 1;
            }
            for (ns, n) in counts {
                println!("{ns:<16} {n:>5}");
            }
        }
    }
    Ok(())
}
