//! HTTP plumbing shared by `serve` and the proxy: the accept loop (TCP_NODELAY and a
//! header-read timeout on every connection), `--api-key` checking, and errors that leave
//! in OpenAI's shape whatever produced them (a body over the limit, an unknown route).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};

/// Largest request body accepted; more is answered 413 in OpenAI's shape.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Time a client has to send a request's headers, on a new or a kept-alive connection.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time live connections get to finish once shutdown starts.
const DRAIN_ON_SHUTDOWN: Duration = Duration::from_secs(10);

/// The header that names a request end to end (client, proxy, instances, logs).
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The client's `X-Request-Id` (1 to 256 bytes of visible ASCII), else a fresh
/// `{prefix}-{hex}` id; as a string and as the header value to answer with.
pub fn request_id(headers: &HeaderMap, prefix: &str) -> (String, HeaderValue) {
    let given = headers
        .get(&REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 256)
        .and_then(|v| Some((v.to_str().ok()?.to_string(), v.clone())));
    if let Some(g) = given {
        return g;
    }
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let id = format!("{prefix}-{t:x}{n:04x}");
    let hv = HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("request"));
    (id, hv)
}

/// `resp` with the request's id in its headers.
pub fn with_request_id(mut resp: Response, id: HeaderValue) -> Response {
    resp.headers_mut().insert(REQUEST_ID, id);
    resp
}

/// A bearer token clients must present. Its `Debug` never shows it.
#[derive(Clone)]
pub struct ApiKey(Arc<[u8]>);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiKey {
    /// `None` for an empty key (no check).
    pub fn new(key: &str) -> Option<Self> {
        let k = key.trim();
        (!k.is_empty()).then(|| Self(k.as_bytes().into()))
    }

    /// Whether `headers` carry `Authorization: Bearer <key>` (compared in constant time).
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(got) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let got = got.trim().as_bytes();
        got.len() == self.0.len()
            && got
                .iter()
                .zip(self.0.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// The header value that presents this key to a server that checks it.
    pub fn header(&self) -> Option<HeaderValue> {
        let mut v = HeaderValue::from_bytes(&[b"Bearer ", &self.0[..]].concat()).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

/// Where the fleet's admin token is read from: admin listeners off loopback require it, and
/// admin calls between processes (drain, import) present it.
pub const ADMIN_TOKEN_ENV: &str = "SPLITSERVE_ADMIN_TOKEN";

/// The admin token from [`ADMIN_TOKEN_ENV`], if set.
pub fn admin_token() -> Option<ApiKey> {
    std::env::var(ADMIN_TOKEN_ENV)
        .ok()
        .and_then(|t| ApiKey::new(&t))
}

/// `rb` presenting the admin token, where one is set (a loopback admin listener ignores it).
pub fn with_admin_token(rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match admin_token().as_ref().and_then(ApiKey::header) {
        Some(v) => rb.header(header::AUTHORIZATION, v),
        None => rb,
    }
}

/// OpenAI's error body.
pub fn error_response(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    message: &str,
) -> Response {
    (status, Json(crate::error_body(kind, message, None, code))).into_response()
}

/// Middleware: 401 unless the request presents the key.
pub async fn require_api_key(State(key): State<ApiKey>, req: Request, next: Next) -> Response {
    if key.admits(req.headers()) {
        return next.run(req).await;
    }
    let mut r = error_response(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        Some("invalid_api_key"),
        "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Middleware: an error that is not JSON already (axum's own rejections: a body over the
/// limit, a wrong method, an unknown path) is rewritten in OpenAI's shape.
pub async fn openai_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("text/event-stream"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let (kind, code) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ("invalid_request_error", Some("request_too_large")),
        StatusCode::NOT_FOUND => ("invalid_request_error", Some("not_found")),
        s if s.is_server_error() => ("internal_error", None),
        _ => ("invalid_request_error", None),
    };
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("{message} (the limit is {MAX_BODY_BYTES} bytes)")
    } else {
        message
    };
    let mut r = error_response(status, kind, code, &message);
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            r.headers_mut().insert(k.clone(), v.clone());
        }
    }
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body was never read: the connection cannot carry another
        // request, and a client that tried would see it cut.
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    r
}

/// The routes with the shared layers: `protected` behind the key (when one is set),
/// `open` (health, metrics) not; a body limit and OpenAI-shaped errors on both.
pub fn with_layers(protected: Router, open: Router, key: Option<ApiKey>) -> Router {
    let protected = match key {
        Some(k) => protected.layer(axum::middleware::from_fn_with_state(k, require_api_key)),
        None => protected,
    };
    protected
        .merge(open)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(openai_errors))
}

/// Serves `app` on `listener` until `shutdown` completes: HTTP/1.1, TCP_NODELAY, and a
/// connection that has not sent a request's headers within `header_timeout` is closed.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    app: Router,
    header_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors, say: wait a little rather than spin on the error.
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Each SSE event is a small write: with Nagle's algorithm on, one that follows
        // another unacknowledged one waits for the peer's delayed ACK (40 ms on Linux).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_ON_SHUTDOWN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open {DRAIN_ON_SHUTDOWN:?} after shutdown began; closing them"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_compared_whole() {
        let k = ApiKey::new("s3cret-key").unwrap();
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(k.admits(&h("Bearer s3cret-key")));
        for bad in [
            "Bearer s3cret-ke",
            "Bearer s3cret-key2",
            "s3cret-key",
            "Basic s3cret-key",
            "Bearer ",
        ] {
            assert!(!k.admits(&h(bad)), "{bad}");
        }
        assert!(!k.admits(&HeaderMap::new()));
        assert!(ApiKey::new("  ").is_none());
        assert_eq!(format!("{k:?}"), "ApiKey(<redacted>)");
        assert!(k.admits(&h(k.header().unwrap().to_str().unwrap())));
    }
}
