//! `roost account …` and `roost handle set`: the operator's commands. They
//! call the running server's admin API (Basic auth with `PDS_ADMIN_PASSWORD`)
//! rather than writing the database behind its back, so every change takes
//! the same path as the API: one transaction, firehose events, PLC updates.

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::config::Config;

pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    admin_password: String,
}

impl AdminClient {
    /// Talks to the server on this machine (`--url` overrides).
    pub fn new(config: &Config, url: Option<String>) -> anyhow::Result<AdminClient> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let admin_password = config
            .admin_password
            .clone()
            .filter(|p| !p.is_empty())
            .context("PDS_ADMIN_PASSWORD is not set: the admin commands need it")?;
        let base = url.unwrap_or_else(|| format!("http://127.0.0.1:{}", config.port));
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60)).build()?;
        Ok(AdminClient { http, base: base.trim_end_matches('/').to_owned(), admin_password })
    }

    fn basic(&self) -> String {
        let raw = format!("admin:{}", self.admin_password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }

    async fn call(
        &self,
        method: reqwest::Method,
        nsid: &str,
        query: &[(&str, &str)],
        body: Option<Value>,
        auth: Option<String>,
    ) -> anyhow::Result<Value> {
        let mut url = format!("{}/xrpc/{nsid}", self.base);
        if !query.is_empty() {
            url.push('?');
            url.push_str(&form_urlencoded::Serializer::new(String::new()).extend_pairs(query).finish());
        }
        let mut req = self.http.request(method, url);
        if let Some(auth) = auth {
            req = req.header(reqwest::header::AUTHORIZATION, auth);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.with_context(|| format!("is the server running at {}?", self.base))?;
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "{nsid}: {} {}",
                value["error"].as_str().unwrap_or(status.as_str()),
                value["message"].as_str().unwrap_or("")
            );
        }
        Ok(value)
    }

    async fn admin_post(&self, nsid: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, nsid, &[], Some(body), Some(self.basic())).await
    }

    /// A DID for a handle or DID of an account here.
    pub async fn did_of(&self, account: &str) -> anyhow::Result<String> {
        if account.starts_with("did:") {
            return Ok(account.to_owned());
        }
        let v = self
            .call(
                reqwest::Method::GET,
                "com.atproto.identity.resolveHandle",
                &[("handle", account)],
                None,
                None,
            )
            .await?;
        v["did"].as_str().map(str::to_owned).context("resolveHandle returned no did")
    }

    pub async fn list(&self) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = vec![("limit", "100")];
            if let Some(c) = cursor.as_deref() {
                query.push(("cursor", c));
            }
            let page =
                self.call(reqwest::Method::GET, "com.atproto.sync.listRepos", &query, None, None).await?;
            let repos = page["repos"].as_array().cloned().unwrap_or_default();
            let dids: Vec<(&str, &str)> =
                repos.iter().filter_map(|r| r["did"].as_str()).map(|d| ("dids", d)).collect();
            if !dids.is_empty() {
                let infos = self
                    .call(
                        reqwest::Method::GET,
                        "com.atproto.admin.getAccountInfos",
                        &dids,
                        None,
                        Some(self.basic()),
                    )
                    .await?;
                for (repo, info) in repos.iter().zip(infos["infos"].as_array().cloned().unwrap_or_default()) {
                    let mut info = info;
                    info["active"] = repo["active"].clone();
                    info["status"] = repo["status"].clone();
                    out.push(info);
                }
            }
            match page["cursor"].as_str() {
                Some(c) if !repos.is_empty() => cursor = Some(c.to_owned()),
                _ => return Ok(out),
            }
        }
    }

    pub async fn create(
        &self,
        handle: &str,
        email: Option<&str>,
        password: &str,
        did_web: bool,
    ) -> anyhow::Result<Value> {
        let method = if did_web { "web" } else { "plc" };
        self.admin_post(
            "dev.roost.admin.createAccount",
            json!({"handle": handle, "email": email, "password": password, "didMethod": method}),
        )
        .await
    }

    pub async fn reset_password(&self, account: &str, password: &str) -> anyhow::Result<()> {
        let did = self.did_of(account).await?;
        self.admin_post("com.atproto.admin.updateAccountPassword", json!({"did": did, "password": password}))
            .await?;
        Ok(())
    }

    pub async fn create_invite(&self, uses: i64, for_account: Option<&str>) -> anyhow::Result<String> {
        let mut body = json!({"useCount": uses});
        if let Some(account) = for_account {
            body["forAccount"] = json!(self.did_of(account).await?);
        }
        let v = self.admin_post("com.atproto.server.createInviteCode", body).await?;
        v["code"].as_str().map(str::to_owned).context("no code in the response")
    }

    pub async fn set_handle(&self, account: &str, handle: &str) -> anyhow::Result<()> {
        let did = self.did_of(account).await?;
        self.admin_post("com.atproto.admin.updateAccountHandle", json!({"did": did, "handle": handle}))
            .await?;
        Ok(())
    }

    /// App passwords belong to the user: this logs in with the account's
    /// own password (never stored) and creates one.
    pub async fn app_password(
        &self,
        account: &str,
        password: &str,
        name: &str,
        privileged: bool,
    ) -> anyhow::Result<Value> {
        let session = self
            .call(
                reqwest::Method::POST,
                "com.atproto.server.createSession",
                &[],
                Some(json!({"identifier": account, "password": password})),
                None,
            )
            .await?;
        let access = session["accessJwt"].as_str().context("no access token")?;
        let created = self
            .call(
                reqwest::Method::POST,
                "com.atproto.server.createAppPassword",
                &[],
                Some(json!({"name": name, "privileged": privileged})),
                Some(format!("Bearer {access}")),
            )
            .await;
        if let Some(refresh) = session["refreshJwt"].as_str() {
            let _ = self
                .call(
                    reqwest::Method::POST,
                    "com.atproto.server.deleteSession",
                    &[],
                    None,
                    Some(format!("Bearer {refresh}")),
                )
                .await;
        }
        created
    }
}

/// Reads one line from stdin (a password piped in or typed).
pub fn read_secret_line(prompt: &str) -> anyhow::Result<String> {
    use std::io::{BufRead as _, Write as _};
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let line = line.trim_end_matches(['\r', '\n']).to_owned();
    anyhow::ensure!(!line.is_empty(), "no input");
    Ok(line)
}
