//! The catch-all for XRPC methods Roost does not serve: forwards them to the
//! AppView, chat service or the `atproto-proxy` target (see `crate::proxy`).

use std::collections::HashMap;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;

use super::error::XrpcError;
use super::extract::Access;
use crate::app::AppState;
use crate::proxy::{PRIVILEGED_METHODS, PROTECTED_METHODS, ProxyError, Target};
use crate::read_after_write::{self as raw, LocalRecords, Viewer};

/// Request headers passed upstream (besides content headers on POST).
const FORWARDED_REQUEST_HEADERS: &[&str] = &["accept-language", "atproto-accept-labelers", "x-bsky-topics"];
/// Response headers passed back to the client.
const FORWARDED_RESPONSE_HEADERS: &[&str] = &[
    "content-type",
    "content-encoding",
    "content-language",
    "atproto-repo-rev",
    "atproto-content-labelers",
    "retry-after",
];
/// Largest proxied request body; procedures that take more (blobs) are served locally.
const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;
/// How much of an upstream error body is read to pass its error name on.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The response header telling the client how far behind the AppView is.
const UPSTREAM_LAG: HeaderName = HeaderName::from_static("atproto-upstream-lag");

pub async fn forward(State(state): State<AppState>, Path(nsid): Path<String>, request: Request) -> Response {
    let started = Instant::now();
    let result = forward_inner(&state, &nsid, request).await;
    let (upstream, response) = match result {
        Ok((upstream, response)) => (upstream, response),
        Err((upstream, e)) => (upstream, e.into_response()),
    };
    if let Some(upstream) = upstream {
        let status = response.status().as_u16().to_string();
        metrics::counter!("roost_proxy_requests_total", "upstream" => upstream.clone(), "status" => status)
            .increment(1);
        metrics::histogram!("roost_proxy_request_duration_seconds", "upstream" => upstream)
            .record(started.elapsed().as_secs_f64());
    }
    response
}

type Upstream = Option<String>;

async fn forward_inner(
    state: &AppState,
    nsid: &str,
    request: Request,
) -> Result<(Upstream, Response), (Upstream, XrpcError)> {
    let fail = |e: XrpcError| (None, e);
    let method = request.method().clone();
    if method != Method::GET && method != Method::HEAD && method != Method::POST {
        return Err(fail(XrpcError::invalid_request("XRPC requests only supports GET and POST")));
    }
    if crate::atp::syntax::Nsid::new(nsid).is_err() {
        return Err(fail(XrpcError::invalid_request(format!("Invalid XRPC method name: {nsid}"))));
    }
    if PROTECTED_METHODS.contains(&nsid) {
        return Err(fail(XrpcError::lexicon("InvalidToken", "Bad token method")));
    }
    let (parts, body) = request.into_parts();
    let proxy_header = match parts.headers.get("atproto-proxy") {
        Some(v) => {
            Some(v.to_str().map_err(|_| fail(XrpcError::invalid_request("invalid proxy header format")))?)
        }
        None => None,
    };
    // Nothing to forward to: say so before asking for credentials.
    let default = crate::proxy::default_target(&state.config.proxy, nsid);
    if proxy_header.is_none() && default.is_none() {
        return Err(fail(XrpcError::not_implemented(nsid)));
    }
    let auth = Access::verify(&parts, state).await.map_err(fail)?;
    if !auth.scope.is_privileged() && PRIVILEGED_METHODS.contains(&nsid) {
        return Err(fail(XrpcError::lexicon("InvalidToken", "Bad token method")));
    }
    let target = match (proxy_header, default) {
        (Some(header), _) => {
            state.did_resolver.target_for_header(header).await.map_err(|e| fail(proxy_error(e)))?
        }
        (None, Some(default)) => default,
        (None, None) => return Err(fail(XrpcError::not_implemented(nsid))),
    };
    let upstream = Some(target.aud.clone());
    let fail = |e: XrpcError| (upstream.clone(), e);
    let url = upstream_url(state, &target, &parts.uri).map_err(|e| fail(proxy_error(e)))?;
    let key = state.keys.repo_key(&auth.did).map_err(|e| fail(XrpcError::internal(e)))?;
    let token = crate::service_auth::mint(&key, &auth.did, &target.aud, Some(nsid), None);

    let mut outbound = state.outbound.request(method.clone(), url).bearer_auth(token);
    for name in FORWARDED_REQUEST_HEADERS {
        if let Some(v) = parts.headers.get(*name) {
            outbound = outbound.header(*name, v);
        }
    }
    // Pass the client's encodings on; we only read error bodies, and those we
    // ask to be plain by falling back to identity. Read-after-write methods
    // may have to be parsed, so they are always asked for plain.
    let read_after_write = raw::Method::from_nsid(nsid).filter(|_| method == Method::GET);
    let accept_encoding = match parts.headers.get(header::ACCEPT_ENCODING) {
        Some(client) if read_after_write.is_none() => client.clone(),
        _ => HeaderValue::from_static("identity"),
    };
    outbound = outbound.header(header::ACCEPT_ENCODING, accept_encoding);
    if method == Method::POST {
        for name in [header::CONTENT_TYPE, header::CONTENT_ENCODING, header::CONTENT_LENGTH] {
            if let Some(v) = parts.headers.get(&name) {
                outbound = outbound.header(name, v);
            }
        }
        if parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|n| n > MAX_REQUEST_BYTES)
        {
            return Err(fail(XrpcError::payload_too_large(format!(
                "Request body is larger than {MAX_REQUEST_BYTES} bytes"
            ))));
        }
        outbound = outbound.body(reqwest::Body::wrap_stream(limited(body, MAX_REQUEST_BYTES)));
    }
    // The span ends with the response headers; the body streams after it.
    let response = crate::telemetry::send(outbound).await.map_err(|e| {
        tracing::warn!(upstream = %target.aud, error = %e, "proxied call failed");
        fail(if e.is_timeout() {
            XrpcError::new(StatusCode::GATEWAY_TIMEOUT, "UpstreamTimeout", "Upstream service timed out")
        } else {
            XrpcError::new(StatusCode::BAD_GATEWAY, "UpstreamFailure", "Upstream service unreachable")
        })
    })?;
    let status = response.status();
    let mut headers = HeaderMap::new();
    for name in FORWARDED_RESPONSE_HEADERS {
        if let Some(v) = response.headers().get(*name) {
            headers.insert(HeaderName::from_static(name), v.clone());
        }
    }
    if status.as_u16() >= 400 {
        // A thread the AppView cannot find may be the account's fresh post.
        if read_after_write == Some(raw::Method::PostThread)
            && status == StatusCode::BAD_REQUEST
            && let Some(upstream_rev) = stale_rev(state, &auth.did, &response).await.map_err(fail)?
        {
            let body = crate::proxy::read_capped(response, MAX_ERROR_BODY).await;
            let error = upstream_error_from(status, body.as_deref());
            if error.error == "NotFound" {
                let rewrite = Rewrite {
                    target: &target,
                    did: &auth.did,
                    method: raw::Method::PostThread,
                    uri: &parts.uri,
                };
                if let Some(out) = fresh_thread(state, rewrite, &upstream_rev, headers).await.map_err(fail)? {
                    return Ok((upstream, out));
                }
            }
            return Err(fail(error));
        }
        return Err(fail(upstream_error(status, response).await));
    }
    let cap = state.config.proxy.max_response_bytes;
    if response.content_length().is_some_and(|n| n > cap) {
        return Err(fail(XrpcError::new(
            StatusCode::BAD_GATEWAY,
            "UpstreamFailure",
            "Upstream response is too large",
        )));
    }
    if let Some(raw_method) = read_after_write
        && let Some(upstream_rev) = stale_rev(state, &auth.did, &response).await.map_err(fail)?
    {
        let rewrite = Rewrite { target: &target, did: &auth.did, method: raw_method, uri: &parts.uri };
        let out =
            splice_local_writes(state, rewrite, &upstream_rev, response, headers).await.map_err(fail)?;
        return Ok((upstream, out));
    }
    if let Some(len) = response.content_length() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    // Stream the body through, cut off past the cap (the client then sees a
    // truncated response, never an unbounded one).
    let mut sent = 0u64;
    let stream = response.bytes_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        sent += chunk.len() as u64;
        if sent > cap {
            return Err(std::io::Error::other("upstream response exceeds the size limit"));
        }
        Ok(chunk)
    });
    let mut out = Response::new(Body::from_stream(stream));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    Ok((upstream, out))
}

/// The upstream's `atproto-repo-rev` when it is behind the account's
/// repository and the body is plain JSON we can patch; `None` means stream
/// it through untouched. Costs one primary-key read, and only when the
/// header is there.
async fn stale_rev(
    state: &AppState,
    did: &str,
    response: &reqwest::Response,
) -> Result<Option<String>, XrpcError> {
    let headers = response.headers();
    let Some(upstream_rev) = headers.get("atproto-repo-rev").and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let encoded = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let not_json = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| !v.to_str().is_ok_and(|t| t.to_ascii_lowercase().contains("json")));
    if encoded || not_json {
        return Ok(None);
    }
    let Some(root) = state.db.repo_root(did).await? else { return Ok(None) };
    // Revs are TIDs, which sort as strings in time order.
    Ok((root.rev.as_str() > upstream_rev).then(|| upstream_rev.to_owned()))
}

/// The request a read-after-write rewrite is for.
struct Rewrite<'a> {
    target: &'a Target,
    did: &'a str,
    method: raw::Method,
    uri: &'a axum::http::Uri,
}

/// Buffers the upstream's answer and splices the account's records written
/// since `upstream_rev` into it (see `crate::read_after_write`). Whatever
/// cannot be understood is sent on as it came.
async fn splice_local_writes(
    state: &AppState,
    rewrite: Rewrite<'_>,
    upstream_rev: &str,
    response: reqwest::Response,
    mut headers: HeaderMap,
) -> Result<Response, XrpcError> {
    let Rewrite { target, did, method, uri } = rewrite;
    let status = response.status();
    let cap = usize::try_from(state.config.proxy.max_response_bytes).unwrap_or(usize::MAX);
    let body = crate::proxy::read_capped(response, cap).await.ok_or_else(|| {
        XrpcError::new(StatusCode::BAD_GATEWAY, "UpstreamFailure", "Upstream response is too large or broken")
    })?;
    let send = |mut headers: HeaderMap, body: Vec<u8>| {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let mut out = Response::new(Body::from(body));
        *out.status_mut() = status;
        *out.headers_mut() = headers;
        out
    };
    let Ok(mut value) = serde_json::from_slice::<Value>(&body) else {
        return Ok(send(headers, body));
    };
    let Some((local, viewer)) = load_local(state, did, upstream_rev).await? else {
        return Ok(send(headers, body));
    };
    let params = query_params(uri)?;
    let cx = raw::Context { viewer: &viewer, local: &local, params: &params };
    let wanted = cx.posts_to_fetch(method);
    let fetched =
        if wanted.is_empty() { HashMap::new() } else { fetch_posts(state, target, did, &wanted).await };
    let original = value.clone();
    if let Err(e) = cx.apply(method, &mut value, &fetched) {
        tracing::debug!(upstream = %target.aud, error = %e, "read-after-write skipped");
        return Ok(send(headers, body));
    }
    lag_header(&mut headers, &local);
    if value == original {
        return Ok(send(headers, body));
    }
    let body = serde_json::to_vec(&value).map_err(|e| XrpcError::internal(anyhow::Error::from(e)))?;
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    Ok(send(headers, body))
}

/// The account's records written since `upstream_rev` (see
/// `crate::read_after_write`), and who they are shown as.
async fn load_local(
    state: &AppState,
    did: &str,
    upstream_rev: &str,
) -> Result<Option<(LocalRecords, Viewer)>, XrpcError> {
    let mut local = LocalRecords::default();
    for row in state.db.records_since_rev(did, upstream_rev, raw::MAX_LOCAL_RECORDS).await? {
        match decode_record(&row.data) {
            Ok(record) => local.push(did, &row.collection, &row.rkey, row.cid.to_string(), &row.rev, record),
            Err(e) => tracing::warn!(did, rkey = %row.rkey, error = %e, "undecodable record block skipped"),
        }
    }
    if local.is_empty() {
        return Ok(None);
    }
    let account = state
        .db
        .account_by_did(did)
        .await?
        .ok_or_else(|| XrpcError::internal(anyhow::anyhow!("account {did} vanished")))?;
    let profile = match &local.profile {
        Some(fresh) => Some(fresh.value.clone()),
        None => current_profile(state, did).await?,
    };
    let viewer = Viewer {
        did: did.to_owned(),
        handle: account.handle,
        public_url: state.config.public_url(),
        profile,
    };
    Ok(Some((local, viewer)))
}

fn query_params(uri: &axum::http::Uri) -> Result<Vec<(String, String)>, XrpcError> {
    serde_urlencoded::from_str(uri.query().unwrap_or_default())
        .map_err(|_| XrpcError::invalid_request("Malformed query string"))
}

fn lag_header(headers: &mut HeaderMap, local: &LocalRecords) {
    let now_micros =
        u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000).unwrap_or(0);
    if let Some(lag) = local.lag_ms(now_micros) {
        headers.insert(UPSTREAM_LAG, HeaderValue::from(lag));
    }
}

/// `getPostThread` of the account's fresh post, which the AppView answered
/// `NotFound` (the reference PDS does the same): built locally, under the
/// ancestors the AppView knows. `None` when it is no fresh post of the account.
async fn fresh_thread(
    state: &AppState,
    rewrite: Rewrite<'_>,
    upstream_rev: &str,
    mut headers: HeaderMap,
) -> Result<Option<Response>, XrpcError> {
    let Rewrite { target, did, uri, .. } = rewrite;
    let params = query_params(uri)?;
    let Some(post_uri) = params.iter().find(|(k, _)| k == "uri").map(|(_, v)| v.clone()) else {
        return Ok(None);
    };
    if !post_uri.starts_with(&format!("at://{did}/")) {
        return Ok(None);
    }
    let Some((local, viewer)) = load_local(state, did, upstream_rev).await? else { return Ok(None) };
    let cx = raw::Context { viewer: &viewer, local: &local, params: &params };
    let wanted = cx.posts_to_fetch(raw::Method::PostThread);
    let fetched =
        if wanted.is_empty() { HashMap::new() } else { fetch_posts(state, target, did, &wanted).await };
    let Some((mut body, ancestor)) = cx.fresh_thread(&post_uri, &fetched) else { return Ok(None) };
    if let Some(ancestor) = ancestor {
        let mut query = vec![("uri", ancestor.as_str()), ("depth", "0")];
        if let Some((_, height)) = params.iter().find(|(k, _)| k == "parentHeight") {
            query.push(("parentHeight", height.as_str()));
        }
        let thread = fetch_json(state, target, did, "app.bsky.feed.getPostThread", &query).await;
        if let Some(thread) = thread.and_then(|mut t| t.get_mut("thread").map(Value::take)) {
            raw::attach_ancestors(&mut body, thread);
        }
    }
    lag_header(&mut headers, &local);
    let body = serde_json::to_vec(&body).map_err(|e| XrpcError::internal(anyhow::Error::from(e)))?;
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let mut out = Response::new(Body::from(body));
    *out.headers_mut() = headers;
    Ok(Some(out))
}

fn decode_record(bytes: &[u8]) -> anyhow::Result<Value> {
    Ok(crate::atp::data::ipld_to_json(&crate::atp::data::decode_cbor_strict(bytes)?))
}

/// The account's `app.bsky.actor.profile/self`, for the author of spliced posts.
async fn current_profile(state: &AppState, did: &str) -> Result<Option<Value>, XrpcError> {
    let Some(cid) = state.db.record(did, "app.bsky.actor.profile", "self").await? else { return Ok(None) };
    let Some(bytes) = state.db.block(did, &cid).await? else { return Ok(None) };
    match decode_record(&bytes) {
        Ok(profile) => Ok(Some(profile)),
        Err(e) => {
            tracing::warn!(did, error = %e, "undecodable profile record ignored");
            Ok(None)
        }
    }
}

/// Post views of `uris` from the upstream (`app.bsky.feed.getPosts`), for
/// posts the fresh records quote or like. Best effort: on any failure the
/// splice goes on without them.
async fn fetch_posts(
    state: &AppState,
    target: &Target,
    did: &str,
    uris: &[String],
) -> HashMap<String, Value> {
    let query: Vec<(&str, &str)> = uris.iter().map(|u| ("uris", u.as_str())).collect();
    let body = fetch_json(state, target, did, "app.bsky.feed.getPosts", &query).await;
    let posts = body.as_ref().and_then(|v| v.get("posts")?.as_array());
    posts
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p.get("uri")?.as_str()?.to_owned(), p.clone())))
        .collect()
}

/// A query to the upstream as the account, for the read-after-write views.
/// Best effort: `None` on any failure, which is logged.
async fn fetch_json(
    state: &AppState,
    target: &Target,
    did: &str,
    nsid: &'static str,
    query: &[(&str, &str)],
) -> Option<Value> {
    let query = serde_urlencoded::to_string(query).ok()?;
    let url = format!("{}/xrpc/{nsid}?{query}", target.url.trim_end_matches('/'));
    let url = crate::proxy::check_url(&url, &state.config.proxy, state.config.dev_mode).ok()?;
    let key = match state.keys.repo_key(did) {
        Ok(key) => key,
        Err(e) => {
            tracing::warn!(did, error = %e, "no repo key for a read-after-write query");
            return None;
        }
    };
    let token = crate::service_auth::mint(&key, did, &target.aud, Some(nsid), None);
    let request = state.outbound.get(url).bearer_auth(token).header(header::ACCEPT_ENCODING, "identity");
    let response = match crate::telemetry::send(request).await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            tracing::debug!(upstream = %target.aud, nsid, status = %r.status(), "read-after-write query failed");
            return None;
        }
        Err(e) => {
            tracing::debug!(upstream = %target.aud, nsid, error = %e, "read-after-write query failed");
            return None;
        }
    };
    let cap = usize::try_from(state.config.proxy.max_response_bytes).unwrap_or(usize::MAX);
    let body = crate::proxy::read_capped(response, cap).await?;
    serde_json::from_slice(&body).ok()
}

fn upstream_url(
    state: &AppState,
    target: &Target,
    uri: &axum::http::Uri,
) -> Result<reqwest::Url, ProxyError> {
    let path_and_query = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    let url = format!("{}{}", target.url.trim_end_matches('/'), path_and_query);
    crate::proxy::check_url(&url, &state.config.proxy, state.config.dev_mode)
}

fn proxy_error(e: ProxyError) -> XrpcError {
    match e {
        ProxyError::Forbidden(why) => {
            XrpcError::invalid_request(format!("Proxy target is not allowed ({why})"))
        }
        other => XrpcError::invalid_request(other.to_string()),
    }
}

/// An upstream 4xx/5xx becomes an XRPC error with the upstream's name and
/// message (a 500 upstream is our 502 UpstreamFailure, as the reference PDS).
async fn upstream_error(status: StatusCode, response: reqwest::Response) -> XrpcError {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let body = if is_json { crate::proxy::read_capped(response, MAX_ERROR_BODY).await } else { None };
    upstream_error_from(status, body.as_deref())
}

/// [`upstream_error`] from a body already read (`None`: none, or not JSON).
fn upstream_error_from(status: StatusCode, body: Option<&[u8]>) -> XrpcError {
    let parsed: Option<serde_json::Value> = body.and_then(|b| serde_json::from_slice(b).ok());
    let field = |name: &str| parsed.as_ref().and_then(|v| v.get(name)?.as_str().map(str::to_owned));
    let (status, default_name) = if status == StatusCode::INTERNAL_SERVER_ERROR {
        (StatusCode::BAD_GATEWAY, "UpstreamFailure")
    } else {
        (status, status.canonical_reason().unwrap_or("UpstreamFailure"))
    };
    let mut error = XrpcError::new(status, "UpstreamFailure", field("message").unwrap_or_default());
    error.error = field("error").map_or(std::borrow::Cow::Borrowed(default_name), std::borrow::Cow::Owned);
    error
}

/// The request body as a stream that fails past `limit` bytes.
fn limited(body: Body, limit: usize) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    let mut seen = 0usize;
    body.into_data_stream().map_err(std::io::Error::other).and_then(move |chunk| {
        seen += chunk.len();
        let result = if seen > limit {
            Err(std::io::Error::other("request body exceeds the size limit"))
        } else {
            Ok(chunk)
        };
        futures::future::ready(result)
    })
}
