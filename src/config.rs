//! Configuration: defaults < `roost.toml` < environment, built by figment.
//!
//! Setting names follow the reference PDS (`PDS_HOSTNAME`, `PDS_PORT`, …) so an
//! existing `pds.env` mostly works; Roost's own settings use the same prefix.
//! [`RawConfig`] is what the sources say; [`Config`] is the validated result
//! that the rest of the program uses. Tests build a `Config` directly.

use std::net::IpAddr;
use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize};

/// Every setting, as read from the sources (all optional or defaulted).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    /// Public hostname of this PDS (`PDS_HOSTNAME`). Required.
    #[serde(deserialize_with = "stringish")]
    pub hostname: Option<String>,
    /// TCP port (`PDS_PORT`, default 2583).
    pub port: u16,
    /// Address to bind (`PDS_BIND_ADDRESS`, default 127.0.0.1; 0.0.0.0 in containers).
    #[serde(deserialize_with = "stringish")]
    pub bind_address: Option<String>,
    /// Where the database and keys live (`PDS_DATA_DIRECTORY`, default ./data).
    #[serde(deserialize_with = "stringish")]
    pub data_directory: Option<String>,
    /// PLC directory URL (`PDS_DID_PLC_URL`, default https://plc.directory).
    #[serde(deserialize_with = "stringish")]
    pub did_plc_url: Option<String>,
    /// Secret for session JWTs (`PDS_JWT_SECRET`); generated into the data
    /// directory (mode 0600) when unset.
    #[serde(deserialize_with = "stringish")]
    pub jwt_secret: Option<String>,
    /// Admin password for the admin API (`PDS_ADMIN_PASSWORD`).
    #[serde(deserialize_with = "stringish")]
    pub admin_password: Option<String>,
    /// PLC rotation key as hex (`PDS_PLC_ROTATION_KEY_K256_PRIVATE_KEY_HEX`);
    /// generated into the data directory when unset.
    #[serde(deserialize_with = "stringish")]
    pub plc_rotation_key_k256_private_key_hex: Option<String>,
    /// Comma-separated handle suffixes offered to accounts
    /// (`PDS_SERVICE_HANDLE_DOMAINS`, default `.<hostname>`).
    #[serde(deserialize_with = "stringish")]
    pub service_handle_domains: Option<String>,
    /// The server's own DID (`PDS_SERVICE_DID`, default `did:web:<hostname>`).
    #[serde(deserialize_with = "stringish")]
    pub service_did: Option<String>,
    /// Local development: allows `localhost`, plain-HTTP URLs and `.test` handles.
    pub dev_mode: bool,
    /// The account to create on first start (`PDS_HANDLE`).
    #[serde(deserialize_with = "stringish")]
    pub handle: Option<String>,
    /// Its password (`PDS_PASSWORD`); generated and printed once when unset.
    #[serde(deserialize_with = "stringish")]
    pub password: Option<String>,
    /// Its email (`PDS_EMAIL`).
    #[serde(deserialize_with = "stringish")]
    pub email: Option<String>,
    /// The AppView for `app.bsky.*` (`PDS_BSKY_APP_VIEW_URL` / `_DID`; empty URL disables).
    #[serde(deserialize_with = "stringish")]
    pub bsky_app_view_url: Option<String>,
    #[serde(deserialize_with = "stringish")]
    pub bsky_app_view_did: Option<String>,
    /// The chat service for `chat.bsky.*` (`PDS_BSKY_CHAT_URL` / `_DID`).
    #[serde(deserialize_with = "stringish")]
    pub bsky_chat_url: Option<String>,
    #[serde(deserialize_with = "stringish")]
    pub bsky_chat_did: Option<String>,
    /// Where `com.atproto.moderation.createReport` goes (`PDS_REPORT_SERVICE_URL` / `_DID`).
    #[serde(deserialize_with = "stringish")]
    pub report_service_url: Option<String>,
    #[serde(deserialize_with = "stringish")]
    pub report_service_did: Option<String>,
    /// The moderation service for `tools.ozone.*` (`PDS_MOD_SERVICE_URL` / `_DID`).
    #[serde(deserialize_with = "stringish")]
    pub mod_service_url: Option<String>,
    #[serde(deserialize_with = "stringish")]
    pub mod_service_did: Option<String>,
    /// Lets proxied calls reach private and loopback addresses (`PDS_DISABLE_SSRF_PROTECTION`; tests only).
    pub disable_ssrf_protection: bool,
    /// Upstream read timeout for proxied calls (`PDS_PROXY_TIMEOUT_SECONDS`, default 30).
    pub proxy_timeout_seconds: u64,
    /// Largest proxied response body (`PDS_PROXY_MAX_RESPONSE_BYTES`, default 16 MiB).
    pub proxy_max_response_bytes: u64,
    /// Whether `createAccount` needs an invite code (`PDS_INVITE_REQUIRED`, default true).
    pub invite_required: bool,
    /// DID method of the configured account (`PDS_DID_METHOD`: `plc`, the
    /// default, or `web` for `did:web:<handle>` with the document served here).
    #[serde(deserialize_with = "stringish")]
    pub did_method: Option<String>,
    /// Per-IP, per-account and per-login limits (`PDS_RATE_LIMITS_ENABLED`, default true).
    pub rate_limits_enabled: bool,
    /// How many reverse proxies in front of Roost append to `X-Forwarded-For`
    /// (`PDS_TRUSTED_PROXIES`, default 0: the header is ignored; the bundle's Caddy is 1).
    pub trusted_proxies: usize,
    /// How long a used refresh token may be replayed (`PDS_REFRESH_GRACE_SECONDS`, default 10).
    pub refresh_grace_seconds: u64,
    /// Largest JSON request body in bytes (`PDS_MAX_JSON_BYTES`, default 1 MiB).
    pub max_json_bytes: usize,
    /// Relays to ask for crawls (`PDS_CRAWLERS`, comma-separated).
    #[serde(deserialize_with = "stringish")]
    pub crawlers: Option<String>,
    /// Most concurrent firehose subscribers (`PDS_FIREHOSE_MAX_SUBSCRIBERS`, default 1000).
    pub firehose_max_subscribers: usize,
    /// Most firehose subscribers per IP (`PDS_FIREHOSE_MAX_PER_IP`, default 8).
    pub firehose_max_per_ip: usize,
    /// How long firehose events are kept (`PDS_FIREHOSE_RETENTION_HOURS`, default 72).
    pub firehose_retention_hours: u64,
    /// Largest blob upload in bytes (`PDS_BLOB_UPLOAD_LIMIT`, default 100 MB).
    pub blob_upload_limit: u64,
    /// Blobs up to this size live in SQLite (`PDS_SQLITE_BLOB_MAX_BYTES`, default 64 KiB).
    pub sqlite_blob_max_bytes: u64,
    /// Directory of the large-blob store (`PDS_BLOBSTORE_DISK_LOCATION`, default `<data>/blobs`).
    #[serde(deserialize_with = "stringish")]
    pub blobstore_disk_location: Option<String>,
    /// S3 bucket for large blobs (`PDS_BLOBSTORE_S3_BUCKET`); when set, S3 is the large store.
    #[serde(deserialize_with = "stringish")]
    pub blobstore_s3_bucket: Option<String>,
    #[serde(deserialize_with = "stringish")]
    pub blobstore_s3_region: Option<String>,
    #[serde(deserialize_with = "stringish")]
    pub blobstore_s3_endpoint: Option<String>,
    pub blobstore_s3_force_path_style: bool,
    #[serde(deserialize_with = "stringish")]
    pub blobstore_s3_access_key_id: Option<String>,
    #[serde(deserialize_with = "stringish")]
    pub blobstore_s3_secret_access_key: Option<String>,
    /// Uploaded blobs no record references are deleted after this
    /// (`PDS_BLOB_UNUSED_TTL_SECONDS`, default 3600).
    pub blob_unused_ttl_seconds: u64,
    /// A directory of lexicon JSON documents to validate records against
    /// (`PDS_LEXICON_DIRECTORY`, searched recursively). Records of collections
    /// without a loaded lexicon are accepted as `validationStatus: "unknown"`.
    #[serde(deserialize_with = "stringish")]
    pub lexicon_directory: Option<String>,
    /// The installed lexicon bundle (`PDS_LEXICON_BUNDLE`, default
    /// `<data>/lexicons.json`), written by `roost lexicons install`.
    #[serde(deserialize_with = "stringish")]
    pub lexicon_bundle: Option<String>,
    /// Whether `roost serve` installs a missing bundle from the npm registry
    /// (`PDS_LEXICON_AUTO_INSTALL`, default true).
    pub lexicon_auto_install: bool,
    /// The npm registry the bundle's package comes from
    /// (`PDS_LEXICON_NPM_REGISTRY`, default https://registry.npmjs.org).
    #[serde(deserialize_with = "stringish")]
    pub lexicon_npm_registry: Option<String>,
    /// Resolve lexicons the catalog lacks over the network
    /// (`PDS_LEXICON_RESOLUTION`, default false).
    pub lexicon_resolution: bool,
    /// How long a resolved lexicon is trusted (`PDS_LEXICON_RESOLUTION_TTL_SECONDS`, default 3600).
    pub lexicon_resolution_ttl_seconds: u64,
    /// Pinned authorities, `domain=did,…` (`PDS_LEXICON_AUTHORITIES`): the
    /// DID publishing an NSID authority's lexicons, used instead of DNS.
    #[serde(deserialize_with = "stringish")]
    pub lexicon_authorities: Option<String>,
    /// `IP:port` of the Prometheus `/metrics` listener (`PDS_METRICS_LISTEN`, default
    /// `127.0.0.1:9464`); an empty string disables it.
    #[serde(deserialize_with = "stringish")]
    pub metrics_listen: Option<String>,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            hostname: None,
            port: 2583,
            bind_address: None,
            data_directory: None,
            did_plc_url: None,
            jwt_secret: None,
            admin_password: None,
            plc_rotation_key_k256_private_key_hex: None,
            service_handle_domains: None,
            service_did: None,
            dev_mode: false,
            handle: None,
            password: None,
            email: None,
            bsky_app_view_url: Some("https://api.bsky.app".into()),
            bsky_app_view_did: Some("did:web:api.bsky.app".into()),
            bsky_chat_url: Some("https://api.bsky.chat".into()),
            bsky_chat_did: Some("did:web:api.bsky.chat".into()),
            report_service_url: Some("https://mod.bsky.app".into()),
            report_service_did: Some("did:plc:ar7c4by46qjdydhdevvrndac".into()),
            mod_service_url: None,
            mod_service_did: None,
            disable_ssrf_protection: false,
            proxy_timeout_seconds: 30,
            proxy_max_response_bytes: 16 * 1024 * 1024,
            invite_required: true,
            did_method: None,
            rate_limits_enabled: true,
            trusted_proxies: 0,
            refresh_grace_seconds: 10,
            max_json_bytes: 1024 * 1024,
            crawlers: None,
            firehose_max_subscribers: 1000,
            firehose_max_per_ip: 8,
            firehose_retention_hours: 72,
            blob_upload_limit: 100 * 1000 * 1000,
            sqlite_blob_max_bytes: 64 * 1024,
            blobstore_disk_location: None,
            blobstore_s3_bucket: None,
            blobstore_s3_region: None,
            blobstore_s3_endpoint: None,
            blobstore_s3_force_path_style: false,
            blobstore_s3_access_key_id: None,
            blobstore_s3_secret_access_key: None,
            blob_unused_ttl_seconds: 3600,
            lexicon_directory: None,
            lexicon_bundle: None,
            lexicon_auto_install: true,
            lexicon_npm_registry: None,
            lexicon_resolution: false,
            lexicon_resolution_ttl_seconds: 3600,
            lexicon_authorities: None,
            metrics_listen: Some("127.0.0.1:9464".into()),
        }
    }
}

/// Env values are parsed as TOML-ish values, so a numeric secret would
/// arrive as an integer; accept any scalar and keep its text.
fn stringish<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(Option::<Scalar>::deserialize(d)?.map(|s| match s {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::U(u) => u.to_string(),
        Scalar::F(f) => f.to_string(),
        Scalar::B(b) => b.to_string(),
    }))
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub hostname: String,
    pub port: u16,
    pub bind_address: IpAddr,
    pub data_directory: PathBuf,
    pub plc_url: String,
    pub jwt_secret: Option<String>,
    pub admin_password: Option<String>,
    pub rotation_key_hex: Option<String>,
    pub service_handle_domains: Vec<String>,
    pub service_did: String,
    pub dev_mode: bool,
    pub account: Option<AccountSeed>,
    pub proxy: ProxyConfig,
    pub invite_required: bool,
    pub rate_limits_enabled: bool,
    pub trusted_proxies: usize,
    pub refresh_grace_seconds: u64,
    pub max_json_bytes: usize,
    pub crawlers: Vec<String>,
    pub firehose_max_subscribers: usize,
    pub firehose_max_per_ip: usize,
    pub firehose_retention_hours: u64,
    pub blobstore: BlobstoreConfig,
    pub lexicon_directory: Option<PathBuf>,
    pub lexicons: LexiconConfig,
    /// Where `/metrics` is served; `None` disables metrics entirely.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Where lexicons come from (see `lexicon::bundled` and `lexicon_net`).
#[derive(Debug, Clone)]
pub struct LexiconConfig {
    /// The installed bundle file; `None` loads no bundle.
    pub bundle: Option<PathBuf>,
    pub auto_install: bool,
    pub npm_registry: String,
    /// Network resolution of lexicons the catalog lacks.
    pub resolution: bool,
    pub resolution_ttl_seconds: u64,
    /// NSID authority domain → DID, consulted before DNS.
    pub authorities: Vec<(String, String)>,
}

/// Where proxied XRPC calls go and how (see `crate::proxy`).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub appview: Option<ServiceEndpoint>,
    pub chat: Option<ServiceEndpoint>,
    pub report: Option<ServiceEndpoint>,
    pub moderation: Option<ServiceEndpoint>,
    pub disable_ssrf_protection: bool,
    pub timeout_secs: u64,
    pub max_response_bytes: u64,
}

impl Default for ProxyConfig {
    /// No upstream services, SSRF protection on.
    fn default() -> Self {
        ProxyConfig {
            appview: None,
            chat: None,
            report: None,
            moderation: None,
            disable_ssrf_protection: false,
            timeout_secs: 30,
            max_response_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A service Roost forwards to: its base URL and DID (the token audience).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEndpoint {
    pub url: String,
    pub did: String,
}

#[derive(Debug, Clone)]
pub struct BlobstoreConfig {
    pub upload_limit: u64,
    pub sqlite_max_bytes: u64,
    pub disk_location: PathBuf,
    pub s3: Option<S3Config>,
    pub unused_ttl_seconds: u64,
}

#[derive(Clone)]
pub struct S3Config {
    pub bucket: String,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub force_path_style: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Config {
    // Never print the secret key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// The account that the first start creates.
#[derive(Clone)]
pub struct AccountSeed {
    pub handle: String,
    pub password: Option<String>,
    pub email: Option<String>,
    pub did_method: DidMethod,
}

/// How an account's DID is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DidMethod {
    /// did:plc, registered with the PLC directory (recoverable, portable).
    Plc,
    /// did:web:<handle>: the DID document is served by this PDS at
    /// `https://<handle>/.well-known/did.json`; tied to the handle's domain.
    Web,
}

impl std::fmt::Debug for AccountSeed {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountSeed").field("handle", &self.handle).field("email", &self.email).finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl RawConfig {
    /// Reads defaults, then `roost.toml` (or `$ROOST_CONFIG`), then `PDS_*` variables.
    pub fn load() -> Result<RawConfig, ConfigError> {
        let toml_path = std::env::var("ROOST_CONFIG").unwrap_or_else(|_| "roost.toml".into());
        Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::file(toml_path))
            .merge(Env::prefixed("PDS_"))
            .extract()
            .map_err(|e| ConfigError(e.to_string()))
    }

    pub fn validate(self) -> Result<Config, ConfigError> {
        let err = |m: String| ConfigError(m);
        let hostname = self
            .hostname
            .filter(|h| !h.is_empty())
            .ok_or_else(|| err("PDS_HOSTNAME is required".into()))?
            .to_ascii_lowercase();
        let dev = self.dev_mode;
        if !dev && (hostname == "localhost" || hostname.parse::<IpAddr>().is_ok()) {
            return Err(err(format!(
                "PDS_HOSTNAME={hostname} is only allowed with PDS_DEV_MODE=true (a public PDS needs a domain name)"
            )));
        }
        let plc_url = self.did_plc_url.unwrap_or_else(|| "https://plc.directory".into());
        check_url("PDS_DID_PLC_URL", &plc_url, dev)?;
        let bind_address = self
            .bind_address
            .as_deref()
            .unwrap_or("127.0.0.1")
            .parse()
            .map_err(|e| err(format!("PDS_BIND_ADDRESS: {e}")))?;
        let service_handle_domains: Vec<String> = match self.service_handle_domains {
            Some(list) => {
                split_list(&list).map(|d| if d.starts_with('.') { d } else { format!(".{d}") }).collect()
            }
            None => vec![format!(".{hostname}")],
        };
        for domain in &service_handle_domains {
            if domain.ends_with(".test") && !dev {
                return Err(err(format!("handle domain {domain} needs PDS_DEV_MODE=true")));
            }
        }
        let account = match self.handle.filter(|h| !h.is_empty()) {
            Some(handle) => {
                let handle = handle.to_ascii_lowercase();
                crate::atp::syntax::Handle::new(handle.clone())
                    .map_err(|e| err(format!("PDS_HANDLE: {e}")))?;
                if handle.ends_with(".test") && !dev {
                    return Err(err("PDS_HANDLE ending in .test needs PDS_DEV_MODE=true".into()));
                }
                let did_method = match self.did_method.as_deref().unwrap_or("plc") {
                    "plc" | "" => DidMethod::Plc,
                    "web" => DidMethod::Web,
                    other => return Err(err(format!("PDS_DID_METHOD={other}: expected plc or web"))),
                };
                Some(AccountSeed {
                    did_method,
                    handle,
                    password: self.password.filter(|p| !p.is_empty()),
                    email: self.email.filter(|e| !e.is_empty()),
                })
            }
            None => None,
        };
        if let Some(secret) = &self.jwt_secret
            && secret.len() < 16
        {
            return Err(err("PDS_JWT_SECRET must be at least 16 characters".into()));
        }
        let data_directory = PathBuf::from(self.data_directory.unwrap_or_else(|| "./data".into()));
        let service = |name: &str, url: Option<String>, did: Option<String>| -> Result<_, ConfigError> {
            match (url.filter(|u| !u.is_empty()), did.filter(|d| !d.is_empty())) {
                (None, _) => Ok(None),
                (Some(url), Some(did)) => {
                    check_url(&format!("PDS_{name}_URL"), &url, dev)?;
                    crate::atp::syntax::Did::new(did.as_str())
                        .map_err(|e| ConfigError(format!("PDS_{name}_DID: {e}")))?;
                    Ok(Some(ServiceEndpoint { url: url.trim_end_matches('/').to_owned(), did }))
                }
                (Some(_), None) => Err(ConfigError(format!("PDS_{name}_URL needs PDS_{name}_DID"))),
            }
        };
        let proxy = ProxyConfig {
            appview: service("BSKY_APP_VIEW", self.bsky_app_view_url, self.bsky_app_view_did)?,
            chat: service("BSKY_CHAT", self.bsky_chat_url, self.bsky_chat_did)?,
            report: service("REPORT_SERVICE", self.report_service_url, self.report_service_did)?,
            moderation: service("MOD_SERVICE", self.mod_service_url, self.mod_service_did)?,
            disable_ssrf_protection: self.disable_ssrf_protection,
            timeout_secs: self.proxy_timeout_seconds.max(1),
            max_response_bytes: self.proxy_max_response_bytes,
        };
        let npm_registry =
            self.lexicon_npm_registry.unwrap_or_else(|| crate::lexicon_store::DEFAULT_REGISTRY.into());
        check_url("PDS_LEXICON_NPM_REGISTRY", &npm_registry, dev)?;
        let mut authorities = Vec::new();
        for pin in self.lexicon_authorities.as_deref().map(split_list).into_iter().flatten() {
            let (domain, did) = pin
                .split_once('=')
                .ok_or_else(|| err(format!("PDS_LEXICON_AUTHORITIES: {pin:?} is not domain=did")))?;
            crate::atp::syntax::Did::new(did.trim())
                .map_err(|e| err(format!("PDS_LEXICON_AUTHORITIES: {did:?}: {e}")))?;
            authorities.push((domain.trim().to_ascii_lowercase(), did.trim().to_owned()));
        }
        let lexicons = LexiconConfig {
            bundle: Some(
                self.lexicon_bundle
                    .filter(|b| !b.is_empty())
                    .map(PathBuf::from)
                    .unwrap_or_else(|| data_directory.join("lexicons.json")),
            ),
            auto_install: self.lexicon_auto_install,
            npm_registry: npm_registry.trim_end_matches('/').to_owned(),
            resolution: self.lexicon_resolution,
            resolution_ttl_seconds: self.lexicon_resolution_ttl_seconds,
            authorities,
        };
        let metrics_listen = match self.metrics_listen.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(addr) => Some(addr.parse().map_err(|e| {
                err(format!("PDS_METRICS_LISTEN={addr}: {e} (expected IP:port, or empty to disable)"))
            })?),
        };
        Ok(Config {
            proxy,
            invite_required: self.invite_required,
            rate_limits_enabled: self.rate_limits_enabled,
            trusted_proxies: self.trusted_proxies,
            lexicons,
            metrics_listen,
            service_did: self.service_did.unwrap_or_else(|| format!("did:web:{hostname}")),
            hostname,
            port: self.port,
            bind_address,
            data_directory: data_directory.clone(),
            plc_url: plc_url.trim_end_matches('/').to_owned(),
            jwt_secret: self.jwt_secret,
            admin_password: self.admin_password,
            rotation_key_hex: self.plc_rotation_key_k256_private_key_hex,
            service_handle_domains,
            dev_mode: dev,
            account,
            refresh_grace_seconds: self.refresh_grace_seconds,
            max_json_bytes: self.max_json_bytes,
            crawlers: self.crawlers.as_deref().map(|c| split_list(c).collect()).unwrap_or_default(),
            firehose_max_subscribers: self.firehose_max_subscribers,
            firehose_max_per_ip: self.firehose_max_per_ip,
            firehose_retention_hours: self.firehose_retention_hours,
            blobstore: BlobstoreConfig {
                upload_limit: self.blob_upload_limit,
                sqlite_max_bytes: self.sqlite_blob_max_bytes,
                disk_location: self
                    .blobstore_disk_location
                    .map(PathBuf::from)
                    .unwrap_or_else(|| data_directory.join("blobs")),
                s3: self.blobstore_s3_bucket.filter(|b| !b.is_empty()).map(|bucket| S3Config {
                    bucket,
                    region: self.blobstore_s3_region,
                    endpoint: self.blobstore_s3_endpoint,
                    force_path_style: self.blobstore_s3_force_path_style,
                    access_key_id: self.blobstore_s3_access_key_id,
                    secret_access_key: self.blobstore_s3_secret_access_key,
                }),
                unused_ttl_seconds: self.blob_unused_ttl_seconds,
            },
            lexicon_directory: self.lexicon_directory.filter(|d| !d.is_empty()).map(PathBuf::from),
        })
    }
}

fn split_list(list: &str) -> impl Iterator<Item = String> + '_ {
    list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned)
}

fn check_url(name: &str, url: &str, dev: bool) -> Result<(), ConfigError> {
    match url.split_once("://") {
        Some(("https", _)) => Ok(()),
        Some(("http", _)) if dev => Ok(()),
        Some(("http", _)) => Err(ConfigError(format!("{name}={url}: plain http needs PDS_DEV_MODE=true"))),
        _ => Err(ConfigError(format!("{name}={url} is not an http(s) URL"))),
    }
}

impl Config {
    /// The URL clients and the DID document use to reach this PDS.
    pub fn public_url(&self) -> String {
        if self.dev_mode && self.hostname == "localhost" {
            format!("http://localhost:{}", self.port)
        } else {
            format!("https://{}", self.hostname)
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_directory.join("roost.sqlite")
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.data_directory.join("keys")
    }

    /// Whether `handle` falls under one of this server's handle domains.
    pub fn is_service_handle(&self, handle: &str) -> bool {
        self.service_handle_domains.iter().any(|d| handle.ends_with(d.as_str()) && handle.len() > d.len())
    }

    /// A development configuration for tests: everything under `data_dir`.
    pub fn for_tests(data_dir: PathBuf, plc_url: String, handle: &str, password: &str) -> Config {
        Config {
            hostname: "localhost".into(),
            port: 0,
            bind_address: IpAddr::from([127, 0, 0, 1]),
            blobstore: BlobstoreConfig {
                upload_limit: 100 * 1000 * 1000,
                sqlite_max_bytes: 64 * 1024,
                disk_location: data_dir.join("blobs"),
                s3: None,
                unused_ttl_seconds: 3600,
            },
            lexicon_directory: None,
            // Tests start without a bundle and with no network resolution;
            // the lexicon tests opt in.
            lexicons: LexiconConfig {
                bundle: None,
                auto_install: false,
                npm_registry: crate::lexicon_store::DEFAULT_REGISTRY.into(),
                resolution: false,
                resolution_ttl_seconds: 3600,
                authorities: Vec::new(),
            },
            // Off: the Prometheus recorder is process-global, and tests that want it turn it on.
            metrics_listen: None,
            data_directory: data_dir,
            plc_url,
            jwt_secret: Some("test-secret-0123456789abcdef".into()),
            admin_password: Some("admin-pass".into()),
            rotation_key_hex: None,
            service_handle_domains: vec![".test".into()],
            service_did: "did:web:localhost".into(),
            dev_mode: true,
            account: Some(AccountSeed {
                did_method: DidMethod::Plc,
                handle: handle.into(),
                password: Some(password.into()),
                email: Some(format!("{}@example.com", handle.split('.').next().unwrap_or("user"))),
            }),
            proxy: ProxyConfig { disable_ssrf_protection: true, ..ProxyConfig::default() },
            invite_required: true,
            // Tests and load tools write far faster than a person; the
            // limits have their own tests that switch them on.
            rate_limits_enabled: false,
            trusted_proxies: 0,
            refresh_grace_seconds: 10,
            max_json_bytes: 1024 * 1024,
            crawlers: Vec::new(),
            firehose_max_subscribers: 1000,
            firehose_max_per_ip: 8,
            firehose_retention_hours: 72,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(host: &str) -> RawConfig {
        RawConfig { hostname: Some(host.into()), ..RawConfig::default() }
    }

    #[test]
    fn localhost_and_http_need_dev_mode() {
        assert!(raw("localhost").validate().is_err());
        let mut r = raw("pds.example.com");
        r.did_plc_url = Some("http://127.0.0.1:1234".into());
        assert!(r.clone().validate().is_err());
        r.dev_mode = true;
        assert!(r.validate().is_ok());
        let mut t = raw("pds.example.com");
        t.handle = Some("alice.test".into());
        assert!(t.validate().is_err());
    }

    #[test]
    fn defaults_are_sensible() {
        let c = raw("pds.example.com").validate().expect("valid");
        assert_eq!(c.port, 2583);
        assert_eq!(c.service_did, "did:web:pds.example.com");
        assert_eq!(c.service_handle_domains, vec![".pds.example.com".to_string()]);
        assert_eq!(c.public_url(), "https://pds.example.com");
        assert_eq!(c.plc_url, "https://plc.directory");
    }

    #[test]
    fn lexicon_settings() {
        let c = raw("pds.example.com").validate().expect("valid");
        assert_eq!(c.lexicons.bundle, Some(PathBuf::from("./data/lexicons.json")));
        assert!(c.lexicons.auto_install && !c.lexicons.resolution, "offline by default");
        let mut r = raw("pds.example.com");
        r.lexicon_authorities = Some(
            " Example.com = did:plc:abcdefghijklmnopqrstuvwx , fun.example.org=did:web:example.org".into(),
        );
        let c = r.clone().validate().expect("valid");
        assert_eq!(
            c.lexicons.authorities,
            vec![
                ("example.com".to_string(), "did:plc:abcdefghijklmnopqrstuvwx".to_string()),
                ("fun.example.org".to_string(), "did:web:example.org".to_string()),
            ]
        );
        r.lexicon_authorities = Some("example.com".into());
        assert!(r.clone().validate().is_err(), "a pin needs a DID");
        r.lexicon_authorities = Some("example.com=not-a-did".into());
        assert!(r.clone().validate().is_err(), "the DID must be valid");
        r.lexicon_authorities = None;
        r.lexicon_npm_registry = Some("http://mirror.internal".into());
        assert!(r.validate().is_err(), "a plain-http registry needs dev mode");
    }

    #[test]
    fn env_overrides_toml_and_numeric_secrets_stay_text() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("roost.toml", "hostname = \"from-toml.example.com\"\nport = 1000")?;
            jail.set_env("PDS_PORT", "2000");
            jail.set_env("PDS_JWT_SECRET", "12345678901234567890");
            let c = RawConfig::load().expect("load").validate().expect("valid");
            assert_eq!(c.hostname, "from-toml.example.com");
            assert_eq!(c.port, 2000);
            assert_eq!(c.jwt_secret.as_deref(), Some("12345678901234567890"));
            assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().expect("addr")));
            Ok(())
        });
    }

    #[test]
    fn metrics_listener_can_be_moved_or_disabled() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PDS_HOSTNAME", "pds.example.com");
            jail.set_env("PDS_METRICS_LISTEN", "0.0.0.0:9999");
            let c = RawConfig::load().expect("load").validate().expect("valid");
            assert_eq!(c.metrics_listen, Some("0.0.0.0:9999".parse().expect("addr")));
            jail.set_env("PDS_METRICS_LISTEN", "");
            let c = RawConfig::load().expect("load").validate().expect("valid");
            assert_eq!(c.metrics_listen, None);
            jail.set_env("PDS_METRICS_LISTEN", "localhost");
            assert!(RawConfig::load().expect("load").validate().is_err());
            Ok(())
        });
    }
}
