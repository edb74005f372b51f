//! The catch-all for XRPC methods Roost does not serve: forwards them to the
//! AppView, chat service or the `atproto-proxy` target (see `crate::proxy`).

use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};

use super::error::XrpcError;
use super::extract::Access;
use crate::app::AppState;
use crate::proxy::{PRIVILEGED_METHODS, PROTECTED_METHODS, ProxyError, Target};

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
    // ask to be plain by falling back to identity.
    outbound = outbound.header(
        header::ACCEPT_ENCODING,
        parts.headers.get(header::ACCEPT_ENCODING).cloned().unwrap_or(HeaderValue::from_static("identity")),
    );
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
    let response = outbound.send().await.map_err(|e| {
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
    let parsed: Option<serde_json::Value> = body.and_then(|b| serde_json::from_slice(&b).ok());
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
