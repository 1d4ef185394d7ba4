//! The xPyD proxy: one OpenAI-compatible front over pools of prefill (`kv_producer`) and
//! decode (`kv_consumer`) instances.
//!
//! Per request: the prefill instance gets the request with `max_tokens=1`, `stream=false` and
//! `kv_transfer_params: {"do_remote_decode": true}`; its response's `kv_transfer_params` go
//! with the original request to a decode instance, whose answer (SSE or JSON) is passed
//! through. A one-token request is answered by the prefill instance alone (nothing to
//! decode, so no KV to ship). `X-Request-Id` is kept end to end. Errors before the first byte are 502/503 with
//! an OpenAI error body; after it, an SSE error event and the end of the stream.
//!
//! Admin routes (on their own loopback listener, see [`admin_router`]) drain a decode
//! instance: it leaves the rotation and its live requests migrate to the others.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use splitserve_kv::{Ask, KvTransferParams};
use splitserve_server::http::ApiKey;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The instances behind the proxy.
#[derive(Clone, Debug)]
pub struct Pools {
    pub prefill: Vec<String>,
    pub decode: Vec<String>,
    /// Prompts shorter than this many tokens are prefilled on the decode instance itself
    /// (conditional disaggregation); 0 disaggregates every request.
    pub disagg_threshold: usize,
    /// Admin base URL of each decode instance, in `decode`'s order (empty: no draining).
    pub decode_admin: Vec<String>,
    /// Clients must present this key; the proxy presents it to the instances too.
    pub api_key: Option<ApiKey>,
}

struct Inner {
    pools: Pools,
    /// Per decode instance: whether it gets new requests (false once drained).
    in_rotation: Vec<AtomicBool>,
    next_prefill: AtomicUsize,
    next_decode: AtomicUsize,
    counter: AtomicUsize,
    client: reqwest::Client,
}

#[derive(Clone)]
pub struct Proxy(Arc<Inner>);

impl Proxy {
    pub fn new(pools: Pools) -> Result<Self, String> {
        if pools.prefill.is_empty() || pools.decode.is_empty() {
            return Err("give at least one --prefill and one --decode URL".into());
        }
        if !pools.decode_admin.is_empty() && pools.decode_admin.len() != pools.decode.len() {
            return Err(format!(
                "give one --decode-admin URL per --decode URL ({} and {})",
                pools.decode_admin.len(),
                pools.decode.len()
            ));
        }
        let trim = |v: Vec<String>| -> Vec<String> {
            v.into_iter()
                .map(|u| u.trim_end_matches('/').to_string())
                .collect()
        };
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(v) = pools.api_key.as_ref().and_then(ApiKey::header) {
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .default_headers(headers)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self(Arc::new(Inner {
            in_rotation: pools.decode.iter().map(|_| AtomicBool::new(true)).collect(),
            pools: Pools {
                prefill: trim(pools.prefill),
                decode: trim(pools.decode),
                disagg_threshold: pools.disagg_threshold,
                decode_admin: trim(pools.decode_admin),
                api_key: pools.api_key,
            },
            next_prefill: AtomicUsize::new(0),
            next_decode: AtomicUsize::new(0),
            counter: AtomicUsize::new(0),
            client,
        })))
    }
}

impl Proxy {
    /// Decode instances that take new requests.
    fn active_decode(&self) -> Vec<String> {
        self.0
            .pools
            .decode
            .iter()
            .zip(&self.0.in_rotation)
            .filter(|(_, on)| on.load(Ordering::Relaxed))
            .map(|(u, _)| u.clone())
            .collect()
    }
}

/// The proxy's routes: the API behind `--api-key` when one is set, `/health` open.
pub fn router(proxy: Proxy) -> Router {
    let key = proxy.0.pools.api_key.clone();
    let protected = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .with_state(proxy.clone());
    let open = Router::new()
        .route("/health", get(health))
        .with_state(proxy);
    splitserve_server::http::with_layers(protected, open, key)
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    proxy: Proxy,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    splitserve_server::http::serve_router(
        listener,
        router(proxy),
        splitserve_server::http::DEFAULT_HEADER_READ_TIMEOUT,
        shutdown,
    )
    .await
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}});
    (status, Json(body)).into_response()
}

fn with_id(mut r: Response, id: &HeaderValue) -> Response {
    r.headers_mut().insert(REQUEST_ID, id.clone());
    r
}

async fn completions(State(p): State<Proxy>, headers: HeaderMap, body: Bytes) -> Response {
    handle(p, headers, body, "/v1/completions").await
}

async fn chat(State(p): State<Proxy>, headers: HeaderMap, body: Bytes) -> Response {
    handle(p, headers, body, "/v1/chat/completions").await
}

fn pick(n: usize, next: &AtomicUsize) -> usize {
    next.fetch_add(1, Ordering::Relaxed) % n
}

/// Sends `body` to the instances in round-robin order starting at the next one, moving on
/// only when an instance cannot be reached (a request is never sent twice once accepted).
async fn send_round_robin(
    p: &Proxy,
    urls: &[String],
    next: &AtomicUsize,
    path: &str,
    id: &HeaderValue,
    body: &Value,
    timeout: Option<Duration>,
) -> Result<(String, reqwest::Response), String> {
    let start = pick(urls.len(), next);
    let mut errors = Vec::new();
    for k in 0..urls.len() {
        let url = &urls[(start + k) % urls.len()];
        let mut req =
            p.0.client
                .post(format!("{url}{path}"))
                .header(REQUEST_ID, id.clone())
                .json(body);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        match req.send().await {
            Ok(r) => return Ok((url.clone(), r)),
            Err(e) if e.is_connect() => errors.push(format!("{url}: {e}")),
            Err(e) => return Err(format!("{url}: {e}")),
        }
    }
    Err(errors.join("; "))
}

async fn passthrough_error(url: &str, stage: &str, r: reqwest::Response) -> Response {
    let status = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = r.bytes().await.unwrap_or_default();
    match serde_json::from_slice::<Value>(&body) {
        // A client error is the client's to see as the instance said it.
        Ok(v) if status.is_client_error() && v.get("error").is_some() => {
            (status, Json(v)).into_response()
        }
        Ok(v) => {
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!("{stage} instance {url} failed ({status}): {msg}"),
            )
        }
        Err(_) => error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!(
                "{stage} instance {url} failed ({status}): {}",
                String::from_utf8_lossy(&body)
            ),
        ),
    }
}

async fn handle(p: Proxy, headers: HeaderMap, body: Bytes, path: &str) -> Response {
    let id = headers
        .get(&REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 256)
        .cloned()
        .unwrap_or_else(|| {
            let n = p.0.counter.fetch_add(1, Ordering::Relaxed);
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros())
                .unwrap_or(0);
            HeaderValue::from_str(&format!("pd-{t:x}{n:04x}"))
                .unwrap_or(HeaderValue::from_static("pd"))
        });
    let r = handle_inner(&p, &id, body, path).await;
    with_id(r, &id)
}

async fn handle_inner(p: &Proxy, id: &HeaderValue, body: Bytes, path: &str) -> Response {
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "request body must be a JSON object",
            )
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("malformed JSON: {e}"),
            )
        }
    };
    let stream = req["stream"].as_bool().unwrap_or(false);
    let pools = &p.0.pools;
    // Conditional disaggregation: a short prompt is cheaper to prefill where it decodes than
    // to ship its KV.
    let local = pools.disagg_threshold > 0
        && prompt_tokens(p, &req, path)
            .await
            .is_some_and(|n| n < pools.disagg_threshold);
    // A one-token answer is complete once the prompt is prefilled: the prefill instance
    // serves it whole, so no KV is held, shipped, or loaded by a decode instance for it.
    let one_token = [&req["max_tokens"], &req["max_completion_tokens"]]
        .iter()
        .any(|v| v.as_u64() == Some(1))
        && req["n"].as_u64().unwrap_or(1) == 1;
    if one_token && !local {
        return match to_prefill(p, id, &req, path).await {
            Ok((purl, presp)) => forward(purl, presp, stream).await,
            Err(resp) => resp,
        };
    }
    let mut dec = req;
    if !local {
        match prefill(p, id, &dec, path).await {
            // The decode instance gets the original request plus where its KV waits.
            Ok(params) => dec["kv_transfer_params"] = params,
            Err(resp) => return resp,
        }
    }
    let active = p.active_decode();
    if active.is_empty() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "every decode instance is drained",
        );
    }
    match send_round_robin(p, &active, &p.0.next_decode, path, id, &dec, None).await {
        Ok((durl, dresp)) => forward(durl, dresp, stream).await,
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("no decode instance answered: {e}"),
        ),
    }
}

/// `body` to the next prefill instance that answers (a long prompt may take minutes).
async fn to_prefill(
    p: &Proxy,
    id: &HeaderValue,
    body: &Value,
    path: &str,
) -> Result<(String, reqwest::Response), Response> {
    let pools = &p.0.pools;
    let timeout = Some(Duration::from_secs(600));
    send_round_robin(
        p,
        &pools.prefill,
        &p.0.next_prefill,
        path,
        id,
        body,
        timeout,
    )
    .await
    .map_err(|e| {
        error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("no prefill instance answered: {e}"),
        )
    })
}

/// Prefill: one token, no stream, the KV held for a remote decode. Returns the producer's
/// `kv_transfer_params`, or the response the client gets instead.
async fn prefill(p: &Proxy, id: &HeaderValue, req: &Value, path: &str) -> Result<Value, Response> {
    let mut pre = req.clone();
    pre["max_tokens"] = json!(1);
    if let Some(o) = pre.as_object_mut() {
        o.remove("max_completion_tokens");
        o.remove("stream_options");
    }
    pre["stream"] = json!(false);
    if pre["min_tokens"].as_u64().is_some_and(|m| m > 1) {
        pre["min_tokens"] = json!(1);
    }
    pre["kv_transfer_params"] = json!({"do_remote_decode": true});
    let t0 = std::time::Instant::now();
    let (purl, presp) = to_prefill(p, id, &pre, path).await?;
    if !presp.status().is_success() {
        return Err(passthrough_error(&purl, "prefill", presp).await);
    }
    let pjson: Value = presp.json().await.map_err(|e| {
        error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("prefill instance {purl} sent a bad response: {e}"),
        )
    })?;
    // Passed on as they came (a producer's own fields included), once they say where the
    // KV waits.
    let params = match KvTransferParams::parse(pjson.get("kv_transfer_params")) {
        Ok(Some(p)) if p.ask == Ask::Consume => p.to_value(),
        _ => {
            return Err(error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!(
                    "prefill instance {purl} returned no kv_transfer_params for a remote decode (is it a kv_producer?)"
                ),
            ))
        }
    };
    let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    tracing::debug!(id = ?id, prefill = %purl, prefill_ms, "prefilled");
    Ok(params)
}

/// The prompt's token count: an id list's length, else the decode instance's `/tokenize`.
async fn prompt_tokens(p: &Proxy, req: &Value, path: &str) -> Option<usize> {
    if let Some(a) = req["prompt"].as_array() {
        if a.iter().all(Value::is_number) {
            return Some(a.len());
        }
    }
    let body = if path.ends_with("chat/completions") {
        json!({"messages": req["messages"]})
    } else {
        json!({"prompt": req["prompt"].as_str()?})
    };
    let url = &p.0.pools.decode[0];
    let r =
        p.0.client
            .post(format!("{url}/tokenize"))
            .json(&body)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
    let v: Value = r.json().await.ok()?;
    v["count"].as_u64().map(|n| n as usize)
}

/// Passes a decode instance's answer through to the client.
async fn forward(durl: String, dresp: reqwest::Response, stream: bool) -> Response {
    if !dresp.status().is_success() {
        return passthrough_error(&durl, "decode", dresp).await;
    }
    if !stream {
        return match dresp.bytes().await {
            Ok(b) => (
                StatusCode::OK,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                b,
            )
                .into_response(),
            Err(e) => error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!("decode instance {durl} failed mid-response: {e}"),
            ),
        };
    }
    // SSE passthrough; a stream that breaks or ends without [DONE] gets an error event.
    let upstream = dresp.bytes_stream();
    let state = (upstream, Vec::<u8>::new(), false, durl);
    let body = futures_util::stream::unfold(state, |(mut up, mut tail, ended, url)| async move {
        if ended {
            return None;
        }
        let fail = |msg: String| {
            let ev = json!({"error": {"message": msg, "type": "upstream_error", "param": null, "code": null}});
            Bytes::from(format!("data: {ev}\n\n"))
        };
        match up.next().await {
            Some(Ok(b)) => {
                tail.extend_from_slice(&b);
                let keep = tail.len().saturating_sub(32);
                tail.drain(..keep);
                Some((Ok::<Bytes, std::io::Error>(b), (up, tail, false, url)))
            }
            Some(Err(e)) => {
                tracing::warn!(decode = %url, error = %e, "decode stream broke");
                let ev = fail(format!("decode instance {url} failed mid-stream: {e}"));
                Some((Ok(ev), (up, tail, true, url)))
            }
            None if !String::from_utf8_lossy(&tail).contains("[DONE]") => {
                let ev = fail(format!("decode instance {url} ended the stream early"));
                Some((Ok(ev), (up, tail, true, url)))
            }
            None => None,
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(axum::http::header::CONTENT_TYPE, "text/event-stream")
        .header(axum::http::header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                e.to_string(),
            )
        })
}

async fn models(State(p): State<Proxy>) -> Response {
    let url = &p.0.pools.decode[0];
    match p.0.client.get(format!("{url}/v1/models")).send().await {
        Ok(r) if r.status().is_success() => match r.json::<Value>().await {
            Ok(v) => Json(v).into_response(),
            Err(e) => error(StatusCode::BAD_GATEWAY, "upstream_error", e.to_string()),
        },
        Ok(r) => passthrough_error(url, "decode", r).await,
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("{url}: {e}"),
        ),
    }
}

/// Every instance's `/health`; 200 when each pool has at least one healthy instance.
async fn health(State(p): State<Proxy>) -> Response {
    let check = |url: String| {
        let c = p.0.client.clone();
        async move {
            let r = c
                .get(format!("{url}/health"))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            let v = match r {
                Ok(r) if r.status().is_success() => r.json::<Value>().await.unwrap_or(json!({})),
                Ok(r) => json!({"status": format!("HTTP {}", r.status())}),
                Err(e) => json!({"status": format!("unreachable: {e}")}),
            };
            (url, v)
        }
    };
    let pre = futures_util::future::join_all(p.0.pools.prefill.iter().cloned().map(check)).await;
    let dec = futures_util::future::join_all(p.0.pools.decode.iter().cloned().map(check)).await;
    let ok = |v: &[(String, Value)]| v.iter().any(|(_, x)| x["status"] == "ok");
    let healthy = ok(&pre) && ok(&dec);
    let list = |v: Vec<(String, Value)>| -> Vec<Value> {
        v.into_iter()
            .map(|(u, mut x)| {
                x["url"] = json!(u);
                x
            })
            .collect()
    };
    let body = json!({
        "status": if healthy { "ok" } else { "degraded" },
        "prefill": list(pre),
        "decode": list(dec),
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Admin routes of the proxy (mount them on a loopback listener):
/// `GET /admin/instances`; `POST /admin/drain {"decode": URL}` takes a decode instance out of
/// the rotation and migrates its live requests to the others (by free KV blocks);
/// `POST /admin/undrain {"decode": URL}` puts it back.
pub fn admin_router(proxy: Proxy) -> Router {
    Router::new()
        .route("/admin/instances", get(instances))
        .route("/admin/drain", post(drain))
        .route("/admin/undrain", post(undrain))
        .with_state(proxy)
}

async fn instances(State(p): State<Proxy>) -> Response {
    let pools = &p.0.pools;
    let decode: Vec<Value> = pools
        .decode
        .iter()
        .enumerate()
        .map(|(i, u)| {
            json!({
                "url": u,
                "admin": pools.decode_admin.get(i),
                "in_rotation": p.0.in_rotation[i].load(Ordering::Relaxed),
            })
        })
        .collect();
    Json(json!({"prefill": pools.prefill, "decode": decode})).into_response()
}

/// The index of decode instance `url` named in an admin body, or the error response.
fn decode_index(p: &Proxy, body: &Bytes) -> Result<usize, Box<Response>> {
    let bad = |code, msg: String| Box::new(error(code, "invalid_request_error", msg));
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))?;
    let url = v["decode"].as_str().ok_or_else(|| {
        bad(
            StatusCode::BAD_REQUEST,
            "give the decode instance as {\"decode\": URL}".into(),
        )
    })?;
    let url = url.trim_end_matches('/');
    let pools = &p.0.pools;
    let i = pools.decode.iter().position(|u| u == url).ok_or_else(|| {
        bad(
            StatusCode::NOT_FOUND,
            format!("{url} is not a decode instance of this proxy"),
        )
    })?;
    if pools.decode_admin.is_empty() {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            "this proxy was started without --decode-admin URLs".into(),
        ));
    }
    Ok(i)
}

async fn drain(State(p): State<Proxy>, body: Bytes) -> Response {
    let i = match decode_index(&p, &body) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let pools = &p.0.pools;
    let targets: Vec<&String> = (0..pools.decode.len())
        .filter(|&j| j != i && p.0.in_rotation[j].load(Ordering::Relaxed))
        .map(|j| &pools.decode_admin[j])
        .collect();
    if targets.is_empty() {
        return error(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "no other decode instance in rotation to take its requests",
        );
    }
    // Out of rotation first, so nothing new lands there while its requests move.
    p.0.in_rotation[i].store(false, Ordering::Relaxed);
    let url = &pools.decode[i];
    tracing::info!(decode = %url, targets = ?targets, "draining decode instance");
    let r =
        p.0.client
            .post(format!("{}/admin/drain", pools.decode_admin[i]))
            .json(&json!({ "targets": targets }))
            .timeout(Duration::from_secs(600))
            .send()
            .await;
    match r {
        Ok(r) if r.status().is_success() => match r.json::<Value>().await {
            Ok(mut v) => {
                v["decode"] = json!(url);
                v["in_rotation"] = json!(false);
                Json(v).into_response()
            }
            Err(e) => error(StatusCode::BAD_GATEWAY, "upstream_error", e.to_string()),
        },
        Ok(r) => passthrough_error(&pools.decode_admin[i], "drain of", r).await,
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!(
                "{url} is out of rotation, but its admin endpoint {} failed: {e}",
                pools.decode_admin[i]
            ),
        ),
    }
}

async fn undrain(State(p): State<Proxy>, body: Bytes) -> Response {
    let i = match decode_index(&p, &body) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let pools = &p.0.pools;
    let r =
        p.0.client
            .post(format!("{}/admin/undrain", pools.decode_admin[i]))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
    match r {
        Ok(r) if r.status().is_success() => {
            p.0.in_rotation[i].store(true, Ordering::Relaxed);
            Json(json!({"decode": pools.decode[i], "in_rotation": true})).into_response()
        }
        Ok(r) => passthrough_error(&pools.decode_admin[i], "undrain of", r).await,
        Err(e) => error(StatusCode::BAD_GATEWAY, "upstream_error", format!("{e}")),
    }
}
